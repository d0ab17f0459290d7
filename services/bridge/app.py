"""Bridge wiring: a list-and-watch loop per custom resource, KV mirrors of Shoal's state, the rejection facts, and
the periodic reflection of that state onto the custom resources.

| source | what | handler |
|---|---|---|
| Kubernetes API | every resource of ``libs.kube.RESOURCES`` (list, then watch) | BridgeHandlers.on_listing / on_event |
| KV shoal_datasets, shoal_runtimes, shoal_operations | every key (watch) | Mirrors (read by tick) |
| KV shoal_bridge_applied (its own) | every key (watch; read before the first list) | BridgeHandlers.applied |
| SHOAL_FACTS | shoal.evt.*.rejected (ordered consumer, from the start) | BridgeHandlers.on_rejection |
| — | every REFLECT_SECONDS | BridgeHandlers.tick (status, volume and claim, Events, TTL deletes, retries) |
| — | every 10 min | MarkerSweeper (libs.markers): delete markers older than a week in shoal_bridge_applied |

Ready (``/readyz``) when connected to NATS, every resource was listed once and the loops run. A resource whose CRD
is not installed (Fluid's, in a cluster with Shoal's only) counts as listed, empty (``watch.py``): it must not keep
the bridge from serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import msgspec
from kubernetes_asyncio import client, config
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from libs import kube, subjects
from libs.bus import KvMirror, connect
from libs.config import KubeSettings, Settings
from libs.events.common import DECODE_ERRORS
from libs.events.dataset import DatasetRecord
from libs.events.operation import OperationRecord
from libs.events.runtime import RuntimeRecord
from libs.markers import BRIDGE_SWEEP, MARKER_SWEEP_SECONDS, MarkerSweeper
from libs.service import Loop, Periodic, nats_check, run_loops
from libs.side_server import Readiness
from services.bridge import domain
from services.bridge.handlers import BridgeHandlers, Mirrors, RejectionFact
from services.bridge.watch import CrdNotices, ResourceWatcher

SERVICE_NAME = "shoal-bridge"
# How often Shoal's state is compared with what the custom resources show: "within seconds" for kubectl get,
# and cheap (in-memory comparisons; a write only when something changed).
REFLECT_SECONDS = 0.25


async def api_client(settings: KubeSettings) -> client.ApiClient:
    """A client of the API server: the kubeconfig file when one is set, else the pod's service account."""
    configuration = client.Configuration()
    try:
        if settings.kubeconfig:
            await config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as err:
        where = f"SHOAL_KUBECONFIG={settings.kubeconfig!r}" if settings.kubeconfig else "the in-cluster service account"
        raise BridgeConfigError(f"cannot reach Kubernetes through {where}: {err}; set SHOAL_KUBECONFIG to a kubeconfig "
                                "file, or run the bridge in a pod") from err
    return client.ApiClient(configuration)


class BridgeConfigError(RuntimeError):
    """The Kubernetes client cannot be configured (no kubeconfig, not in a pod)."""


async def run(settings: Settings, stop: asyncio.Event, readiness: Readiness | None = None,
              clock: Callable[[], float] = time.time) -> None:
    readiness = readiness or Readiness()
    api = await api_client(settings.kube)
    try:
        bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    except BaseException:
        await api.close()
        raise
    readiness.add("nats", nats_check(bus))
    rejections = None
    try:
        await bus.provision()
        mirrors = Mirrors(
            datasets=KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord, bus.reconnects),
            runtimes=KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord, bus.reconnects),
            operations=KvMirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord, bus.reconnects),
        )
        # What an earlier run published: a restart sends only what changed, and the deletes of what went meanwhile.
        applied = KvMirror(await bus.kv(subjects.KV_BRIDGE_APPLIED), domain.Applied, bus.reconnects)
        handlers = BridgeHandlers(bus, api, settings, mirrors, clock, applied=applied)
        decoder = msgspec.json.Decoder(RejectionFact)

        async def on_rejection(message: Msg) -> None:
            with contextlib.suppress(*DECODE_ERRORS):  # not a rejection we can read
                await handlers.on_rejection(decoder.decode(message.data), message.metadata.sequence.stream)

        # Every rejection kept in the stream, so one published before a restart still reaches its object.
        rejections = await bus.js.subscribe(subjects.ALL_REJECTIONS, cb=on_rejection, ordered_consumer=True,
                                            deliver_policy=DeliverPolicy.ALL)
        namespaces: list[str | None] = list(settings.kube.namespaces) or [None]
        notices = CrdNotices()  # a CRD missing in every namespace watched is said once
        watchers = [ResourceWatcher(api, resource, namespace, handlers.on_listing, handlers.on_event,
                                    settings.kube.watch_seconds, notices)
                    for resource in kube.RESOURCES for namespace in namespaces]

        def listed() -> str | None:
            waiting = [w.name for w in watchers if not w.synced.is_set()]
            return f"not listed yet: {', '.join(waiting)}" if waiting else None

        readiness.add("kubernetes", listed)
        loops: list[Loop] = [mirrors.datasets, mirrors.runtimes, mirrors.operations, applied, *watchers,
                             # Cancelled by a stop: a pass may be waiting on an API server that does not answer.
                             Periodic("reflect", handlers.tick, REFLECT_SECONDS, cancel_on_stop=True),
                             Periodic("old delete markers", MarkerSweeper(bus, BRIDGE_SWEEP).tick,
                                      MARKER_SWEEP_SECONDS)]
        await run_loops(loops, stop, readiness)
    finally:
        if rejections is not None:
            with contextlib.suppress(Exception):
                await rejections.unsubscribe()
        await api.close()
        await bus.close()
