"""``spec.ttlSecondsAfterFinished`` through the Kubernetes bridge: once the loader removes a finished DataLoad or
DataClean, the bridge writes its final status onto the custom resource and then deletes it, as Fluid does; after
a restart, it deletes the resources whose operations were removed while it was down, and only those.

The API server is the project's kmock subclass (``tests/kube.py``: there is no kube-apiserver here), reached through
kubernetes-asyncio; NATS is a real nats-server, with the real dataset, runtime and loader services in-process (no
agents: heartbeats are published as an agent would). What a watcher sees is read from the kmock subclass's event log,
which is what every watch streams. One test drives the handlers by hand, for an order of events the whole bridge
cannot be made to see on demand (an object replaced before the watch shows it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import structlog
from kmock import Server
from kubernetes_asyncio import client

from libs import kube, subjects
from libs.bus import Bus, KvMirror, kv_load
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.events.operation import OperationRecord
from libs.events.runtime import RuntimeRecord
from services.bridge import app as bridge_app
from services.bridge.domain import Applied
from services.bridge.handlers import BridgeHandlers, Mirrors
from services.dataset import app as dataset_app
from services.loader import app as loader_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, make_settings, running
from tests.integration.test_kube_bridge import (  # noqa: F401 (``cluster`` is a fixture)
    DATALOAD,
    MEM_TIER,
    MERGE,
    SHOAL,
    SHOAL_RUNTIME,
    Cluster,
    cluster,
    everything,
    heartbeat,
)
from tests.kube import FakeApiServer

DATACLEAN = next(r for r in kube.SHOAL_RESOURCES if r.kind == "DataClean")
FLUID_DATALOAD = next(r for r in kube.FLUID_RESOURCES if r.kind == "DataLoad")
REBORN = "DataLoad.shoal.io default/reborn"  # as the bridge's log lines name it


async def test_ttl_0_deletes_the_resources_after_writing_their_final_status(
        cluster: Cluster, bus: Bus, tmp_path: Path) -> None:  # noqa: F811 (the fixture of test_kube_bridge)
    """A shoal.io DataLoad that completes (nothing to load), a Fluid DataLoad and a DataClean that fail, all with
    ``ttlSecondsAfterFinished: 0``: the loader removes each as it ends, within one bridge pass. Each custom resource
    shows its final phase (and duration) to a watcher, then is deleted (with its uid as a precondition) and goes
    once Shoal's finalizer lets go; a DataLoad without a TTL stays. Before, every one of them stayed, most with no
    status at all."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing").write_bytes(b"")
    async with everything(cluster.settings):
        await cluster.create(SHOAL, "demo", {"mounts": [{"mountPoint": f"local://{empty}"}]})
        await cluster.create(SHOAL_RUNTIME, "demo", {"replicas": 1, "tieredstore": MEM_TIER})
        await cluster.status(SHOAL, "demo", phase="NotBound")
        await heartbeat(bus, "demo")
        await cluster.status(SHOAL, "demo", phase="Bound")

        expiring = [(DATALOAD, "warm", "Complete"), (FLUID_DATALOAD, "fluid-orphan", "Failed"),
                    (DATACLEAN, "tidy", "Failed")]
        await cluster.create(DATALOAD, "warm", {"dataset": {"name": "demo"}, "ttlSecondsAfterFinished": 0})
        # Runs that fail at once: of a reference (one of a missing dataset would wait for it).
        await cluster.create(SHOAL, "pointer", {"mounts": [{"mountPoint": "dataset://default/nothere"}]})
        await cluster.create(FLUID_DATALOAD, "fluid-orphan",
                             {"dataset": {"name": "pointer", "namespace": "default"}, "ttlSecondsAfterFinished": 0})
        await cluster.create(DATACLEAN, "tidy", {"dataset": {"name": "pointer"}, "ttlSecondsAfterFinished": 0})
        await cluster.create(DATALOAD, "kept", {"dataset": {"name": "pointer"}})  # no TTL: stays
        for resource, name, _ in expiring:
            await eventually(lambda r=resource, n=name: _gone(cluster, r, n),  # type: ignore[misc]
                             what=f"{resource.kind} {name} deleted after its TTL")
            assert await _operation(bus, resource.kind, name) is None
        kept = await cluster.status(DATALOAD, "kept", phase="Failed")
        assert kube.FINALIZER in kept["metadata"]["finalizers"]

    for resource, name, phase in expiring:
        seen = _watched(cluster, resource, name)
        assert seen[-1]["type"] == "DELETED", seen
        deleting = next(i for i, e in enumerate(seen) if e["object"]["metadata"].get("deletionTimestamp"))
        final = [e["object"].get("status") or {} for e in seen[:deleting]]
        assert final and final[-1].get("phase") == phase, f"{name}: a watcher saw {final} before the delete"
        assert final[-1].get("duration"), final[-1]
        deletes = cluster.server.recorded("DELETE", f"/{resource.plural}/{name}")
        assert len(deletes) == 1 and deletes[0].data["preconditions"]["uid"] == seen[0]["object"]["metadata"]["uid"]
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in cluster.server.objects("", "events")}
    assert ("warm", "DataLoadComplete") in reasons, reasons  # the run's Event, though the bridge never saw it run


async def test_a_restart_deletes_what_ttl_removed_while_the_bridge_was_down_and_nothing_else(
        cluster: Cluster, bus: Bus) -> None:  # noqa: F811 (the fixture of test_kube_bridge)
    """DataLoads ``expired`` and ``reborn`` (TTL 600 s, runs that fail) are removed by the loader (its clock moved on)
    while the bridge is down; ``expired`` had not even been seen running by the bridge (no status). Meanwhile
    ``reborn`` is deleted by hand and made again under its name (a new uid) and applied by no loader yet. The
    restarted bridge writes ``expired``'s final status from Shoal's KV history, then deletes it; the new ``reborn``
    (whose operation was never accepted: the removal Shoal holds under its name is the old one's) stays. Before, the
    restarted bridge deleted nothing."""
    now = [time.time()]
    load = {"dataset": {"name": "pointer"}, "ttlSecondsAfterFinished": 600}  # a reference: its runs fail at once
    services = (lambda stop: dataset_app.run(cluster.settings, stop),
                lambda stop: runtime_app.run(cluster.settings, stop))
    async with running(*services):
        async with running(lambda stop: bridge_app.run(cluster.settings, stop)):
            await cluster.create(SHOAL, "pointer", {"mounts": [{"mountPoint": "dataset://default/nothere"}]})
            await eventually(lambda: dataset_record(bus, "pointer"), what="the reference applied")
            async with running(lambda stop: loader_app.run(cluster.settings, stop, clock=lambda: now[0])):
                first = await cluster.create(DATALOAD, "reborn", load)
                await cluster.status(DATALOAD, "reborn", phase="Failed")
            await cluster.create(DATALOAD, "expired", load)  # applied, and no loader takes it in yet
            await eventually(lambda: _async(kube.FINALIZER in ((cluster.get(DATALOAD, "expired") or {})
                                                                ["metadata"].get("finalizers") or [])),
                             what="expired applied")
            await eventually(lambda: _applied(bus, (cluster.get(DATALOAD, "expired") or {})["metadata"]["uid"]),
                             what="expired's apply published")
        assert "status" not in (cluster.get(DATALOAD, "expired") or {})

        async with running(lambda stop: loader_app.run(cluster.settings, stop, clock=lambda: now[0])):
            await eventually(lambda: _phase(bus, "expired", "Failed"), what="expired run and failed")
            now[0] += 601
            for name in ("expired", "reborn"):
                await eventually(lambda n=name: _removed(bus, n), what=f"{name} removed by its TTL")  # type: ignore[misc]
        await cluster.custom.patch_namespaced_custom_object(
            DATALOAD.group, DATALOAD.version, "default", DATALOAD.plural, "reborn", {"metadata": {"finalizers": []}},
            _content_type=MERGE)  # type: ignore[call-arg]
        await cluster.custom.delete_namespaced_custom_object(DATALOAD.group, DATALOAD.version, "default",
                                                             DATALOAD.plural, "reborn")
        second = await cluster.create(DATALOAD, "reborn", load)
        assert second["metadata"]["uid"] != first["metadata"]["uid"]

        with structlog.testing.capture_logs() as logs:
            async with running(lambda stop: bridge_app.run(cluster.settings, stop)):
                await eventually(lambda: _gone(cluster, DATALOAD, "expired"), what="expired deleted after a restart")
                await eventually(lambda: _applied(bus, second["metadata"]["uid"]), what="the new reborn applied")
                await eventually(lambda: _async(any(e.get("object") == REBORN and "stays" in e["event"] for e in logs)),
                                 what="the new reborn looked at and kept")
        reborn = cluster.get(DATALOAD, "reborn")
        assert reborn is not None and reborn["metadata"]["uid"] == second["metadata"]["uid"]
        assert kube.FINALIZER in reborn["metadata"]["finalizers"] and not reborn["metadata"].get("deletionTimestamp")
        assert not cluster.server.recorded("DELETE", f"/{DATALOAD.plural}/reborn")[1:], "the new reborn deleted"

    seen = _watched(cluster, DATALOAD, "expired")
    assert seen[-1]["type"] == "DELETED", seen
    deleting = next(i for i, e in enumerate(seen) if e["object"]["metadata"].get("deletionTimestamp"))
    final = (seen[deleting - 1]["object"].get("status") or {})
    assert final.get("phase") == "Failed" and "nothere" in final.get("message", ""), final


async def test_an_expired_resource_made_again_before_the_bridge_deletes_it_is_left_alone(
        nats_server: NatsServer, bus: Bus) -> None:
    """The handlers driven by hand (the watch's events are the test's to give): a DataLoad with TTL 0 expires, and
    before the watch shows it the object is deleted by hand and made again under its name. The bridge's delete names
    the old uid as a precondition: the kmock subclass answers 409 as the apiserver does, and the new object stays."""
    settings = make_settings(nats_server.url)
    async with FakeApiServer() as server, Server(server) as http, \
            client.ApiClient(client.Configuration(host=str(http.url).rstrip("/"))) as api:
        mirrors = Mirrors(datasets=KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                          runtimes=KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord),
                          operations=KvMirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord))
        applied = KvMirror(await bus.kv(subjects.KV_BRIDGE_APPLIED), Applied)
        loops = (mirrors.datasets, mirrors.runtimes, mirrors.operations, applied)
        tasks = [asyncio.create_task(loop.run()) for loop in loops]
        try:
            await eventually(lambda: _async(mirrors.ready() and applied.ready.is_set()), what="the KV mirrors")
            handlers = BridgeHandlers(bus, api, settings, mirrors, applied=applied)
            custom = client.CustomObjectsApi(api)
            for resource in kube.RESOURCES:
                await handlers.on_listing(resource, None, [])
            body = {"apiVersion": DATALOAD.api_version, "kind": DATALOAD.kind, "metadata": {"name": "race"},
                    "spec": {"dataset": {"name": "pointer"}, "ttlSecondsAfterFinished": 0}}
            # A reference, written as the dataset service would: its load fails at once (a missing dataset waits).
            reference = Dataset(metadata=ObjectMeta(name="pointer"),
                                spec=DatasetSpec(mounts=[Mount(mount_point="dataset://default/nothere")]))
            await (await bus.kv(subjects.KV_DATASETS)).put(
                subjects.resource_key("default", "pointer"),
                msgspec.json.encode(DatasetRecord(dataset=reference, generation=1)))
            old = await custom.create_namespaced_custom_object(DATALOAD.group, DATALOAD.version, "default",
                                                               DATALOAD.plural, body)
            await handlers.on_event(DATALOAD, "ADDED", old)
            kv_key = subjects.operation_key("DataLoad", "default", "race")
            async with running(lambda stop: loader_app.run(settings, stop)):
                await eventually(lambda: _async(mirrors.operations.revision(kv_key) > 0
                                                and kv_key not in mirrors.operations.values),
                                 what="the operation run, failed and removed by its TTL")
            await custom.patch_namespaced_custom_object(
                DATALOAD.group, DATALOAD.version, "default", DATALOAD.plural, "race", {"metadata": {"finalizers": []}},
                _content_type=MERGE)  # type: ignore[call-arg]
            await custom.delete_namespaced_custom_object(DATALOAD.group, DATALOAD.version, "default",
                                                         DATALOAD.plural, "race")
            new = await custom.create_namespaced_custom_object(DATALOAD.group, DATALOAD.version, "default",
                                                               DATALOAD.plural, body)

            async def deleted_once() -> bool:
                await handlers.tick()
                return bool(server.recorded("DELETE", f"/{DATALOAD.plural}/race")[1:])

            await eventually(deleted_once, what="the bridge's delete of the expired object")
            kept = server.stored(DATALOAD.group, DATALOAD.plural, "default", "race")
            assert kept is not None and kept["metadata"]["uid"] == new["metadata"]["uid"]
            assert not kept["metadata"].get("deletionTimestamp"), "the new object deleted"
            (_, ours) = server.recorded("DELETE", f"/{DATALOAD.plural}/race")
            assert ours.data["preconditions"]["uid"] == old["metadata"]["uid"]
        finally:
            for loop in loops:
                loop.stop()
            await asyncio.gather(*tasks)


# --- helpers ---


async def _async(value: Any) -> Any:
    return value


async def _gone(api: Cluster, resource: kube.Resource, name: str) -> bool:
    return api.get(resource, name) is None


def _watched(api: Cluster, resource: kube.Resource, name: str) -> list[dict[str, Any]]:
    """Every event a watch of ``resource`` streamed (or would have) about ``name``, in order."""
    return [event for _, which, event in api.server.log
            if which == (resource.group, resource.plural) and event["object"]["metadata"]["name"] == name]


async def _operation(bus: Bus, kind: str, name: str) -> OperationRecord | None:
    record, _ = await kv_load(await bus.kv(subjects.KV_OPERATIONS), subjects.operation_key(kind, "default", name),
                              OperationRecord)
    return record


async def _phase(bus: Bus, name: str, phase: str) -> bool:
    record = await _operation(bus, "DataLoad", name)
    return record is not None and record.status.phase == phase


async def _removed(bus: Bus, name: str) -> bool:
    return await _operation(bus, "DataLoad", name) is None


async def _applied(bus: Bus, uid: str) -> bool:
    kv = await bus.kv(subjects.KV_BRIDGE_APPLIED)
    try:
        return (await kv.get(uid)).value is not None
    except nats.js.errors.KeyNotFoundError:  # not there yet
        return False
