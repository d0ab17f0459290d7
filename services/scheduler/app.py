"""Scheduler service wiring: which subject goes to which handler, and the loops of the process.

| stream / bucket / subject | what | handler |
|---|---|---|
| SHOAL_AGENT | shoal.agent.inventory.* (this replica's ordered consumer) | SchedulerHandlers.on_inventory |
| KV shoal_datasets | every key (watch) | SchedulerHandlers.watch_datasets (totals, manifests, deletions) |
| Object Store shoal_manifests | a manifest that failed to load, again (periodic) | SchedulerHandlers.retry_catalogs |
| KV shoal_agents | every key (mirror) | node labels and liveness |
| core NATS shoal.sched.score | ScoreRequest → ScoreReply (queue group) | SchedulerHandlers.answer_raw |
| core NATS shoal.ctl.inventory.request | published: InventoryRequest on a gap, and to every agent at start | — |
| SHOAL_FACTS | published: shoal.evt.scheduler.dataset.cache (bytes cached, each block once) | publish_cache (1/s) |
| KV shoal_members | this replica's beat, the live replicas (``libs.members``) | who publishes a dataset's facts |

Every replica folds every inventory event (its own ``Follower``: replicas sharing a durable would each fold part of
them and answer differently) and answers from its whole fold; the live replicas split the datasets whose cache facts
they publish, so two of them never publish one dataset's figure from folds a moment apart.

With ``SHOAL_SCHED_HTTP_PORT`` set, the HTTP front (admission webhook and extender, ``services.scheduler.http``)
runs as one more loop on ``handlers.answer``, the same decision function, with TLS from ``SHOAL_SCHED_TLS_*``.
``extra_loops``: more loops made from the handlers (tests), run and stopped with the others. Ready (``/readyz``)
when connected to NATS and every loop runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import msgspec

from libs import metrics, subjects
from libs.bus import MESSAGE_LIMIT, Bus, Follower, KvMirror, connect, stream_end
from libs.config import SchedulerSettings, Settings
from libs.events.agent import AgentRecord, AnyInventory
from libs.members import Members
from libs.service import Loop, Periodic, StartsWhen, nats_check, run_loops
from libs.side_server import Readiness
from libs.telemetry import get_logger
from services.scheduler.domain import Weights
from services.scheduler.handlers import NOT_READY, SchedulerHandlers
from services.scheduler.http import HttpLimits, http_loop

log = get_logger(__name__)

SERVICE_NAME = "shoal-scheduler"
REPLICAS_OF = subjects.MEMBERS_SCHEDULER  # this service's replicas' keys in shoal_members
# The inventory follower's name in metrics (``shoal_messages_handled{consumer=}``): the durable's name it replaced.
INVENTORY_CONSUMER = "scheduler-inventory"
# Replicas of the scheduler share score requests (each holds the whole fold, so any of them can answer).
QUEUE_GROUP = "shoal-scheduler"
# How often nodes whose agent went away are looked for; their cache stops counting within this of the timeout.
SWEEP_SECONDS = 5.0
# How often labels and liveness are compared for the decision cache: a relabelled node counts within a second.
LABELS_SECONDS = 1.0
# How often manifests that failed to load are looked at (``SchedulerHandlers.retry_catalogs``): the first retry is
# due half a second after the failure, so a catalog is back within about a second of NATS answering again.
CATALOG_RETRY_SECONDS = 0.5
# How often changed figures of datasets' unique cached bytes are published (``SchedulerHandlers.publish_cache``):
# the status follows within about a second, and a dataset being loaded (thousands of events a second) costs one fact
# a second, not one per event.
CACHE_FACTS_SECONDS = 1.0
_NATS_SECONDS = metrics.DECISION_SECONDS.labels(metrics.WAY_NATS)

# Makes extra loops from the running handlers and the settings (e.g. the webhook and extender server).
LoopFactory = Callable[[SchedulerHandlers, Settings], Loop]


def weights_of(settings: SchedulerSettings) -> Weights:
    return Weights(node=settings.node_weight, zone=settings.zone_weight, region=settings.region_weight,
                   zone_label=settings.zone_label, region_label=settings.region_label)


class ScoreServer:
    """The ``sched.score.v1`` request/reply subscription, as a loop."""

    name = "score-requests"

    def __init__(self, bus: Bus, handlers: SchedulerHandlers) -> None:
        self.bus = bus
        self.handlers = handlers
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        subscription = await self.bus.serve(subjects.SCHED_SCORE, self.answer, queue=QUEUE_GROUP)
        try:
            await self._stopping.wait()
        finally:
            await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    def answer(self, data: bytes) -> bytes:
        """``SchedulerHandlers.answer_raw``, timed (``libs.metrics.DECISION_SECONDS``, way nats)."""
        started = time.perf_counter()
        try:
            return self.handlers.answer_raw(data)
        finally:
            _NATS_SECONDS.observe(time.perf_counter() - started)


class DatasetWatch:
    """The ``shoal_datasets`` watch (``SchedulerHandlers.watch_datasets``), as a loop."""

    name = "datasets"

    def __init__(self, handlers: SchedulerHandlers) -> None:
        self.handlers = handlers
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await self.handlers.watch_datasets(self._stopping)

    def stop(self) -> None:
        self._stopping.set()


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time,
              readiness: Readiness | None = None, extra_loops: Sequence[LoopFactory] = (),
              started: Callable[[SchedulerHandlers], None] | None = None,
              inventory_start: int | None = None) -> None:
    """Run until ``stop``. ``started`` is handed the handlers once wired (tests and benches read the fold).
    ``inventory_start``: the SHOAL_AGENT sequence the fold starts at, None for the stream's end (the scheduler bench
    starts at 1 to time the fold of a backlog)."""
    readiness = readiness or Readiness()
    bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        # Where this replica's fold starts: the snapshots it asks every agent for at start come after it (older
        # events would only be replaced by them).
        start = await stream_end(bus, subjects.STREAM_AGENT) if inventory_start is None else inventory_start
        agents = KvMirror(await bus.kv(subjects.KV_AGENTS), AgentRecord, bus.reconnects)
        members = Members(await bus.kv(subjects.KV_MEMBERS), REPLICAS_OF, settings.service.replica_name,
                          reconnects=bus.reconnects)
        handlers = SchedulerHandlers(bus, agents, weights_of(settings.scheduler), settings.scheduler.node_timeout,
                                     clock, publisher=members)
        readiness.add("datasets", lambda: None if handlers.datasets_ready.is_set() else NOT_READY)
        readiness.add("inventory", lambda: handlers.warming() or None)
        inventory = Follower(bus, subjects.STREAM_AGENT, subjects.AGENT_INVENTORY, msgspec.json.Decoder(AnyInventory),
                             handlers.on_inventory, max_event_bytes=MESSAGE_LIMIT, start=start,
                             name=INVENTORY_CONSUMER)
        loops: list[Loop] = [agents, members, DatasetWatch(handlers), StartsWhen(inventory, handlers.datasets_ready),
                             ScoreServer(bus, handlers),
                             Periodic("sweep", handlers.sweep, SWEEP_SECONDS),
                             Periodic("labels", handlers.refresh_labels, LABELS_SECONDS),
                             Periodic("catalogs", handlers.retry_catalogs, CATALOG_RETRY_SECONDS),
                             Periodic("cache facts", handlers.publish_cache, CACHE_FACTS_SECONDS)]
        sched = settings.scheduler
        if sched.http_port is not None:
            loops.append(http_loop(handlers.answer, host=sched.http_host, port=sched.http_port,
                                   timeout=sched.http_timeout, tls_cert=sched.tls_cert, tls_key=sched.tls_key,
                                   limits=HttpLimits.of(sched), labels=handlers.view.labels))
        loops += [make(handlers, settings) for make in extra_loops]
        if started is not None:
            started(handlers)
        await run_loops(loops, stop, readiness)
    finally:
        await bus.close()
