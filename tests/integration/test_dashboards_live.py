"""Every Grafana panel's query (``deploy/grafana``) against a real Prometheus scraping a real stack (issue 11).

The stack: the dataset, runtime, loader and scheduler services and two node agents in-process (``cluster_stack``),
served on one side server of the test process (they share prometheus-client's registry, as one process would),
and the agents' mount processes, real subprocesses with their own side servers, found through the file_sd targets
they write into ``SHOAL_PROMETHEUS_TARGETS_DIR``. Prometheus (Debian's binary, ``libs.cli.stack.prometheus``, as
``shoal up`` runs it) scrapes both every second into a temporary TSDB.

The work: a dataset synced, a DataLoad of a folder, reads through both mounts (cache hits, peer reads, store
misses), a read of an object deleted from the store after the sync (a store error), a scheduling question, a
malformed command (rejected), a compare-and-set that loses (a KV conflict) and two agents beating as one node (the
inventory of the one not held is ignored). Then every target of every panel,
with ``$__rate_interval`` and the variables at "All" filled in as Grafana would, must return at least one series:
this catches a ``_total`` or ``_seconds`` naming mistake, a label a query groups by that the code never sets, and a
metric nobody moves. A query Prometheus refuses fails at once; the ones still empty at the deadline are all named.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from deploy.grafana import build
from libs import subjects
from libs.bus import Bus, Conflict, kv_load, kv_save
from libs.cli.stack.prometheus import TARGETS_DIR_VARIABLE, PrometheusConfig, find_tool
from libs.config import Settings
from libs.embedded import LOOPBACK
from libs.events.agent import AgentHeartbeat, AgentRecord, InventorySnapshot
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.operation import TargetPath
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.events.schedule import DatasetUse, ScoreRequest
from libs.side_server import Readiness, SideServer
from services.loader import app as loader_app
from services.scheduler import app as scheduler_app
from services.scheduler.handlers import NOT_WARM, WARMUP_SECONDS
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually, running, start_prometheus_on_a_free_port
from tests.integration.agent_stack import cluster_stack, read_file
from tests.integration.test_loader import dataload, operation

pytestmark = [pytest.mark.needs("fuse", "prometheus"), pytest.mark.timeout(120)]

NAME = "observed"
NODES: dict[str, dict[str, str]] = {"node-a": {}, "node-b": {}}
# A node name two simulated agent processes share (no mount: only their beats and a snapshot).
SHARED_NODE = "node-z"
MiB = 1024 * 1024
# Several 1 MiB blocks under train/ (loaded, then read: hits and peer reads), one object read cold (store misses),
# one deleted from the store after the sync (a store error).
OBJECTS = {"train/a.bin": b"a" * (3 * MiB), "train/b.bin": b"b" * (MiB + MiB // 2), "top.bin": b"t" * (MiB // 2),
           "gone.bin": b"g" * (MiB // 4)}
# Prometheus scrapes every second; 30 s holds enough samples for rate() whatever the machine's load.
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "30s"
# Targets are "up" a few seconds after Prometheus starts; data of a finished load lands within a few scrapes.
TARGETS_TIMEOUT = 30.0
DATA_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, services: dict[str, int], targets_dir: Path) -> AsyncIterator[str]:
    """Prometheus scraping ``services`` (name → side-server port) and the file_sd targets in ``targets_dir``;
    stopped by its PID on exit, also on failure."""
    binary = find_tool("prometheus")
    assert binary is not None
    config, server = await asyncio.to_thread(
        start_prometheus_on_a_free_port, binary,
        lambda port: PrometheusConfig(port, tmp_path / "tsdb", tmp_path / "prometheus.yml", targets_dir,
                                      scrape_interval=SCRAPE_INTERVAL),
        services, tmp_path / "prometheus.log")
    try:
        yield config.url
    finally:
        await asyncio.to_thread(server.stop)


async def query(session: aiohttp.ClientSession, url: str, expr: str) -> list[Any]:
    async with session.get(f"{url}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body.get("status") == "success", f"Prometheus refused {expr!r}: {body}"
    result: list[Any] = body["data"]["result"]
    return result


async def targets_up(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]] | None:
    async with session.get(f"{url}/api/v1/targets") as response:
        active: list[dict[str, Any]] = (await response.json())["data"]["activeTargets"]
    return active if active and all(target["health"] == "up" for target in active) else None


def every_target() -> dict[str, str]:
    """"<dashboard> / <panel> / <refId>" → the query as Prometheus gets it from Grafana."""
    return {f"{model['title']} / {panel['title']} / {target['refId']}": build.concrete(target["expr"], RATE_WINDOW)
            for model in build.dashboards().values() for panel in build.panels(model)
            for target in panel.get("targets") or []}


async def apply(bus: Bus, bucket: str, cache_dir: Path, endpoint: str) -> None:
    runtime = Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
        replicas=2, block_size="1Mi",
        tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="64Mi"),
                                        Level(mediumtype="SSD", quota="64Mi", path=str(cache_dir))])))
    dataset = Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(
        mounts=[Mount(mount_point=f"s3://{bucket}/", options={"endpoint": endpoint})]))
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))


async def lose_a_compare_and_set(bus: Bus) -> None:
    """A second writer's create of a key that exists: the compare-and-set loses (``Conflict``)."""
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", NAME)
    record, _ = await kv_load(kv, key, DatasetRecord)
    assert record is not None
    with pytest.raises(Conflict):
        await kv_save(kv, key, record, None)


async def share_a_node_name(bus: Bus) -> None:
    """Two agent processes beating as one node (``SHARED_NODE``) by turns, and a snapshot of the one its record does
    not hold: the scheduler and the dataset service ignore it and count it (``other_instance``)."""
    agents = await bus.kv(subjects.KV_AGENTS)

    async def beat(instance: str) -> None:
        beat = AgentHeartbeat(node=SHARED_NODE, sent_at=time.time(), instance=instance)
        await bus.js.publish(subjects.agent_heartbeat(SHARED_NODE), msgspec.json.encode(beat))

    async def record() -> AgentRecord | None:
        return (await kv_load(agents, SHARED_NODE, AgentRecord))[0]

    await beat("first")
    await eventually(lambda: _holding(record, "first", False), what="the first agent's beat in its node's record")
    await beat("second")  # as far as anyone can tell, the first one restarted
    await eventually(lambda: _holding(record, "second", False), what="the second agent's beat in the record")
    await beat("first")  # the first one again: two agents share the name, and the record keeps the second
    await eventually(lambda: _holding(record, "second", True), what="the node flagged")
    snapshot = InventorySnapshot(node=SHARED_NODE, dataset=ObjectRef(name=NAME), incarnation="first-mount", seq=1,
                                 instance="first")
    await bus.js.publish(subjects.agent_inventory(SHARED_NODE), msgspec.json.encode(snapshot))


async def _holding(record: Callable[[], Awaitable[AgentRecord | None]], instance: str, flagged: bool) -> bool:
    found = await record()
    return found is not None and found.heartbeat.instance == instance and (found.conflict_at > 0) == flagged


@pytest.mark.timeout(240)
async def test_every_dashboard_query_returns_data_from_a_running_stack(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir()
    (tmp_path / "stack").mkdir()
    # The agents' mount processes get the agents' environment: each writes its file_sd target there.
    monkeypatch.setenv(TARGETS_DIR_VARIABLE, str(targets_dir))
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service, http_port=0))
    await put_objects(seaweedfs, bucket, OBJECTS)
    side = SideServer(Readiness(), LOOPBACK, 0)
    port = await side.start()
    try:
        async with (cluster_stack(bus, settings, seaweedfs, tmp_path / "stack", NODES) as cluster,
                    running(lambda stop: loader_app.run(settings, stop),
                            lambda stop: scheduler_app.run(settings, stop)),
                    prometheus(tmp_path, {"services": port}, targets_dir) as url,
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session):
            await apply(bus, bucket, cluster.cache_dir, seaweedfs.endpoint)
            # Mount processes take seconds to start, many more on a machine busy with other tests.
            await cluster.wait_mounted(NAME, "train/a.bin", timeout=90)

            # A load of train/, then reads: its blocks from this node's cache or its peer's; top.bin from the store.
            await bus.publish(subjects.DATALOAD_APPLY, dataload("warm", dataset=NAME,
                                                                target=[TargetPath(path="/train")]))

            async def loaded() -> bool:
                record = await operation(bus, "warm")
                return record is not None and record.status.phase in ("Complete", "Failed")

            await eventually(loaded, 60, "the DataLoad finished")
            for node in NODES:
                mount = cluster.agents[node].mountpoint(NAME)
                for key in ("train/a.bin", "train/b.bin", "top.bin"):
                    assert await read_file(mount / key) == OBJECTS[key]

            # What goes wrong, once each: an object gone from the store, a malformed command, a lost write.
            async with seaweedfs.client() as client:
                await client.delete_object(Bucket=bucket, Key="gone.bin")
            with contextlib.suppress(OSError):
                await read_file(cluster.agents["node-a"].mountpoint(NAME) / "gone.bin")
            await bus.nc.jetstream().publish(subjects.DATASET_APPLY, b"{not a command")
            await lose_a_compare_and_set(bus)
            await share_a_node_name(bus)

            # A decision, for the scheduler's panels. Until the agents' inventory snapshots are folded (at most
            # WARMUP_SECONDS after its start) the scheduler answers "ask again shortly", as callers are told to.
            async def decided() -> bool:
                reply = await bus.nc.request(subjects.SCHED_SCORE, msgspec.json.encode(
                    ScoreRequest(datasets=[DatasetUse(name=NAME)])), timeout=5)
                error = json.loads(reply.data).get("error")
                assert error in (None, "", NOT_WARM), reply.data
                return not error

            await eventually(decided, WARMUP_SECONDS + 15, "a scheduler decision without error")

            up = await eventually(lambda: targets_up(session, url), TARGETS_TIMEOUT, "every scrape target up")
            assert any(target["labels"].get("service") == "services" for target in up)

            pending = every_target()

            async def all_answer() -> bool:
                for name, expr in list(pending.items()):
                    if await query(session, url, expr):
                        del pending[name]
                return not pending

            try:
                await eventually(all_answer, DATA_TIMEOUT, "every dashboard query returning data")
            except AssertionError:
                mounts = sorted(path.name for path in targets_dir.glob("*.json"))
                pytest.fail(f"{len(pending)} of {len(every_target())} dashboard queries returned no data "
                            f"(mount targets found: {mounts}):\n  "
                            + "\n  ".join(f"{name}: {expr}" for name, expr in sorted(pending.items())),
                            pytrace=False)
    finally:
        await side.stop()


def test_every_target_is_named_once() -> None:
    """The live test's names identify each query (a duplicate would hide one from the report)."""
    names = [f"{m['title']} / {p['title']} / {t['refId']}" for m in build.dashboards().values()
             for p in build.panels(m) for t in p.get("targets") or []]
    assert len(names) == len(set(names)) == len(every_target())

