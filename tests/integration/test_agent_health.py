"""The agent's health is real: a mount process that keeps failing and a cache directory that goes down make its
heartbeats unhealthy (with the reason) and the runtime name the node; on real nats-server, SeaweedFS and FUSE
mounts. Its readiness is narrower (the agent can serve its node): a failing mount is a note in ``/readyz``, a node
whose every cache directory is down is unready.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
from click.testing import CliRunner
from prometheus_client import REGISTRY

from libs import subjects
from libs.bus import Bus, kv_load
from libs.cli.main import cli
from libs.config import Settings
from libs.embedded import LOOPBACK
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import ObjectMeta, format_bytes
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount, find_condition
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeRecord, RuntimeSpec, TieredStore
from libs.side_server import Readiness, SideServer
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually, runtime_record
from tests.integration.agent_stack import NODE, Node, node_stack, read_file, run_tool, scrape, series
from tests.integration.test_agent_cache import drop_page_cache, mount_pids

MiB = 1024 * 1024


async def listening_port(pids: list[int]) -> int | None:
    """The TCP port a mount process listens on (its side server), from ss(8)."""
    result = await run_tool("ss", "-ltnpH")
    for line in result.stdout.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            return int(line.split()[3].rsplit(":", 1)[1])
    return None


async def last_beat(bus: Bus) -> AgentHeartbeat | None:
    record, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), NODE, AgentRecord)
    return record.heartbeat if record is not None else None


async def newer_beat(bus: Bus, than: AgentHeartbeat) -> AgentHeartbeat | None:
    beat = await last_beat(bus)
    return beat if beat is not None and beat.sent_at > than.sent_at else None


async def unhealthy_with(node: Node, text: str) -> AgentHeartbeat | None:
    beat = await last_beat(node.bus)
    return beat if beat is not None and not beat.healthy and any(text in p for p in beat.problems) else None


async def runtime_naming_the_node(node: Node, name: str, text: str) -> RuntimeRecord | None:
    record = await runtime_record(node.bus, name)
    if record is None or record.status.phase != "PartialReady":
        return None
    return record if f"{NODE} unhealthy" in record.status.message and text in record.status.message else None


async def test_a_mount_process_that_keeps_failing_makes_the_agent_unhealthy(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000})
    readiness = Readiness()
    # Mount processes refuse their settings and exit at once, every time; the agent itself is fine.
    async with node_stack(bus, settings, seaweedfs, tmp_path, mount_env={"SHOAL_CACHE_POLICY": "bogus"},
                          readiness=readiness) as node:
        await eventually(lambda: last_beat(bus), what="a first heartbeat")
        beat = await last_beat(bus)
        assert beat is not None and beat.healthy and beat.problems == []
        # The agent process's token, the same in every beat it sends: the runtime service tells two agents given
        # one node name apart by it.
        instance = beat.instance
        assert instance
        await node.apply("broken", bucket)

        beat = await eventually(lambda: unhealthy_with(node, "mount default/broken keeps failing"), 60,
                                "an unhealthy heartbeat naming the failing mount")
        # Why, in the mount process's words: the exit code alone sent the operator to the node's logs.
        reason = "invalid settings: SHOAL_CACHE_POLICY='bogus': use lfu-admission or lru"
        assert f"exit code 2: {reason}" in beat.problems[0] and beat.instance == instance, beat.problems
        failing = beat.mount_of("default", "broken")
        assert failing is not None and failing.state == "Failing" and reason in failing.message, failing
        # Still ready: one dataset's mount failing says nothing about the agent, and an unready agent would hold
        # a rolling update of every node's. /readyz names it, as a note (a real side server over the agent's checks).
        server = SideServer(readiness, LOOPBACK, 0)
        await server.start()
        try:
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                        session.get(f"http://{LOOPBACK}:{server.port}/readyz") as response):
                body = await response.json()
        finally:
            await server.stop()
        assert response.status == 200 and body["ready"], body
        assert set(body["checks"]) == {"nats", "watches", "loops", "mount root", "cache"}, body
        assert "mount default/broken keeps failing" in body["notes"]["mounts"], body
        record = await eventually(lambda: runtime_naming_the_node(node, "broken", reason), 15,
                                  "the runtime naming the unhealthy node and why its mount fails")
        assert record.status.ready_nodes == [] and record.status.worker_number_ready == 0


async def test_a_cache_directory_that_goes_down_makes_the_agent_unhealthy_and_reads_still_work(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"b{i}.bin": os.urandom(2 * MiB) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    readiness = Readiness()
    async with node_stack(bus, settings, seaweedfs, tmp_path, readiness=readiness) as node:
        await node.apply("sick", bucket)
        root = await node.wait_mounted("sick", expect="b3.bin")
        assert await read_file(root / "b0.bin") == objects["b0.bin"]

        async def healthy_with_capacity() -> AgentHeartbeat | None:
            beat = await last_beat(bus)
            return beat if beat is not None and beat.healthy and beat.capacity_bytes == 256 * MiB else None

        await eventually(healthy_with_capacity, 15, "a healthy heartbeat with the mount's cache capacity")
        assert readiness.report()[0], readiness.report()
        # The agent's own series (it runs in this process): the configured cache directory is healthy.
        directory = {"node": NODE, "dir": str(node.cache_dir)}
        assert REGISTRY.get_sample_value("shoal_cache_dir_healthy", directory) == 1
        assert REGISTRY.get_sample_value("shoal_readahead_budget_bytes", {"node": NODE}) == 512 * MiB
        assert REGISTRY.get_sample_value("shoal_readahead_bytes", {"node": NODE}) is not None

        # The disk under the cache goes away: its folder is replaced by a file, so every cache I/O fails.
        dataset_cache = node.cache_dir / "default" / "sick"
        await asyncio.to_thread(shutil.rmtree, dataset_cache)
        dataset_cache.write_bytes(b"not a directory")
        await asyncio.to_thread(drop_page_cache)
        for key, body in objects.items():  # reads bypass the broken directory
            assert await read_file(root / key) == body

        beat = await eventually(lambda: unhealthy_with(node, f"cache directory {dataset_cache} is down"), 15,
                                "an unhealthy heartbeat naming the cache directory")
        assert beat.capacity_bytes == 0  # its only tier is down
        # The error and its own fix: "recreate it (mkdir -p ...)" would fail on the file in the way.
        fix = ("(its I/O failed: Not a directory; reads go to the store): a part of its path is a file, not a folder: "
               "change the runtime's tier path, or make that part a folder")
        assert any(fix in problem for problem in beat.problems), beat.problems
        assert REGISTRY.get_sample_value("shoal_cache_dir_healthy", directory) == 0  # set before that beat
        ready, checks = readiness.report()
        # Its only cache directory down: the node caches nothing, so it is not ready (the mount itself is a note).
        assert not ready and str(node.cache_dir) in checks["cache"], checks
        assert str(dataset_cache) in readiness.noted()["mounts"]
        await eventually(lambda: runtime_naming_the_node(node, "sick", fix), 15,
                         "the runtime naming the unhealthy node, the error and its fix")
        # The mount process's own side server says so too.
        port = await eventually(lambda: listening_port(mount_pids(root)), 15, "the mount process's side server")
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.get(f"http://{LOOPBACK}:{port}/readyz") as response):
            body = await response.json()
            assert response.status == 503 and str(dataset_cache) in body["checks"]["cache"], body
            assert fix in body["checks"]["cache"], body
            assert body["checks"]["nats"] == body["checks"]["fuse"] == body["checks"]["loops"] == "ok", body
        mine = {"node": NODE, "dataset": "default/sick"}
        samples = await scrape(port)
        assert series(samples, "shoal_cache_capacity_bytes", **mine, tier="disk") == 0  # a tier down has none
        # The dataset stays Bound and mounted: reads still work through the object store.
        assert (await node.record("sick")).status.phase == "Bound"
        assert await read_file(root / "b1.bin") == objects["b1.bin"]


async def test_a_cache_directory_down_makes_the_node_unhealthy_only_for_its_own_runtime(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # One dataset's cache folder removed (an operator freeing space, a disk full under one tier path) took the node
    # from every runtime it served: the other runtime went PartialReady with 0 B of capacity, and a worker of it
    # there would be not ready (out of the ring, replaced by a spare after the grace period), for a problem not
    # its own. (Here the one agent is "sick"'s Exclusive worker; "well" counts it as a ready node.)
    await put_objects(seaweedfs, bucket, {f"b{i}.bin": os.urandom(2 * MiB) for i in range(2)})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("sick", bucket)
        await node.apply("well", bucket)
        root = await node.wait_mounted("sick", expect="b1.bin")
        await node.wait_mounted("well", expect="b1.bin")

        dataset_cache = node.cache_dir / "default" / "sick"
        await asyncio.to_thread(shutil.rmtree, dataset_cache)
        dataset_cache.write_bytes(b"not a directory")
        await asyncio.to_thread(drop_page_cache)
        for name in ("b0.bin", "b1.bin"):  # misses try to write the broken directory
            await read_file(root / name)
        await eventually(lambda: runtime_naming_the_node(node, "sick", str(dataset_cache)), 20,
                         "the sick runtime naming the unhealthy node")
        beat = await last_beat(bus)
        assert beat is not None and not beat.healthy

        well = await runtime_record(bus, "well")
        assert well is not None
        assert well.status.phase == "Ready" and well.status.ready_nodes == [NODE], well.status
        assert well.status.cache_capacity_bytes > 0
        assert str(dataset_cache) not in well.status.message


async def test_a_tier_quota_larger_than_the_nodes_disk_is_said_and_the_node_never_picked(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # A runtime could ask a tier quota of 1Pi on a disk of a few GiB and have the node picked as its cache worker:
    # the tier fills the disk long before its watermarks evict. The agent now reports the file system under each
    # tier directory in its heartbeat, and the runtime service does not pick a node whose disk is smaller, saying why.
    # Not even at first: the agent serves every runtime, so the node served the new runtime before its agent had
    # seen it, and was picked unweighed, then dropped one beat later (a mount started, then stopped). And with no
    # node able to hold the tiers, the runtime says so (TiersFit), and ``shoal describe runtime`` shows it.
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000})
    facts = FactCollector()
    await facts.start(bus, subjects.RUNTIME_STATUS)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        # The Dataset first, so the runtime's apply finds it and picks at once, from the agent's beat before it.
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
            metadata=ObjectMeta(name="huge"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))
        await eventually(lambda: dataset_record(bus, "huge"), 15, "the dataset applied")
        first = await eventually(lambda: last_beat(bus), 15, "a heartbeat")
        await eventually(lambda: newer_beat(bus, first), 15, "a heartbeat after the dataset")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name="huge"), spec=(
            RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="1Pi", path=str(node.cache_dir))])
                        )))))

        async def beat_with_disk() -> AgentHeartbeat | None:
            beat = await last_beat(bus)
            return beat if beat is not None and beat.tier_disks else None

        beat = await eventually(beat_with_disk, 15, "a heartbeat with the tier directory's file system")
        folder = node.cache_dir if node.cache_dir.is_dir() else node.cache_dir.parent
        fs = os.statvfs(folder)
        [disk] = beat.tier_disks
        assert (disk.path, disk.size_bytes) == (str(node.cache_dir), fs.f_blocks * fs.f_frsize)
        assert 0 < disk.free_bytes <= disk.size_bytes
        assert disk.device == os.stat(folder).st_dev and beat.tier_disks_complete

        async def not_picked() -> RuntimeRecord | None:
            record = await runtime_record(node.bus, "huge")
            return record if record is not None and find_condition(record.status.conditions, "TiersFit") else None

        record = await eventually(not_picked, 15, "the runtime saying why the node is no cache worker")
        assert record.status.workers == [] and [entry.node for entry in record.status.not_picked] == [NODE]
        reason = record.status.not_picked[0].reason
        assert f"gives {node.cache_dir} a quota of 1.00PiB, more than its file system on this node" in reason
        largest = (f"the largest file system seen under this runtime's tier directories is "
                   f"{format_bytes(disk.size_bytes)} ({NODE}, {node.cache_dir})")
        condition = find_condition(record.status.conditions, "TiersFit")
        assert condition is not None and (condition.status, condition.reason) == ("False", "QuotaOverDisk")
        assert largest in condition.message and largest in record.status.message, record.status.message
        described = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", settings.nats.urls[0], "describe",
                                                                      "runtime", "huge"])
        assert described.exit_code == 0 and "QuotaOverDisk" in described.stdout, described.output
        assert largest in described.stdout, described.stdout
        await bus.nc.flush()
    picked = [fact["status"].get("workers") for fact in facts.of_type("runtime.status.v1", name="huge")
              if fact["status"].get("workers")]
    assert picked == [], "the node was picked before its disk was weighed, then dropped"


async def test_two_tiers_on_one_file_system_are_weighed_together(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # Two tiers each of 60% of one disk were each weighed alone against it, and the node picked: together they fill
    # it. The agent reports each directory's device, and the runtime service sums the quotas that share one.
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000})
    fs = os.statvfs(tmp_path)
    share = fs.f_blocks * fs.f_frsize * 6 // 10
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        levels = [Level(mediumtype="SSD", quota=share, path=str(node.cache_dir / "ssd")),
                  Level(mediumtype="HDD", quota=share, path=str(node.cache_dir / "hdd"))]
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name="twice"), spec=RuntimeSpec(tieredstore=TieredStore(levels=levels)))))
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
            metadata=ObjectMeta(name="twice"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))

        async def refused() -> RuntimeRecord | None:
            record = await runtime_record(node.bus, "twice")
            return record if record is not None and record.status.not_picked and "in all" in \
                record.status.not_picked[0].reason else None

        record = await eventually(refused, 15, "the node not picked for two tiers on one disk")
        assert record.status.workers == []
        assert f"on one file system with {node.cache_dir / 'hdd'} (spec.tieredstore.levels[1]" in \
            record.status.not_picked[0].reason, record.status.not_picked
