"""The agent's cache and consistency behaviour on real FUSE mounts over SeaweedFS: restart reuse, overwritten
objects, a full cache, corrupt block files, the object store going away, inventory and cacheStates, manifest
reloads, and fio verification. Services and the node agent run in-process; mounts are real processes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus, Conflict, kv_load, kv_save
from libs.cli import render
from libs.config import Settings
from libs.documents import documents_to_commands, parse_documents
from libs.events.agent import InventoryRequest
from libs.events.common import ObjectRef
from libs.events.dataset import DatasetDelete, DatasetRecord, NodeCache
from services.agent.cache.tiers import INDEX_FILE
from tests.conftest import SeaweedServer, put_objects
from tests.faults import CuttableProxy, StalledCacheFile
from tests.helpers import dataset_record, eventually
from tests.integration.agent_stack import (
    NODE,
    InventoryWatch,
    Node,
    drop_page_cache,
    md5,
    mount_pids,
    mounted_paths,
    node_stack,
    read_file,
    read_range,
    run_tool,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.needs("fuse")


async def test_restart_after_kill_reuses_the_disk_cache(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                        bucket: str, tmp_path: Path) -> None:
    objects = {f"part-{i}.bin": os.urandom(3 * MiB + i) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("warm", bucket)
        root = await node.wait_mounted("warm", expect="part-3.bin")
        for key, body in objects.items():
            assert md5(await read_file(root / key)) == md5(body)
        total = sum(len(b) for b in objects.values())

        async def all_cached() -> dict[str, Any] | None:
            event = inventory.latest()
            return event if event and event["counters"]["cachedBytes"] == total else None

        first = await eventually(all_cached, what="every block cached")
        assert first["counters"]["missBytes"] == total
        # Which life of the dataset the mount serves: a late event of it must not count for the name applied again.
        record = await dataset_record(bus, "warm")
        assert record is not None and record.incarnation
        assert {event["datasetIncarnation"] for event in inventory.events} == {record.incarnation}

        (pid,) = mount_pids(root)
        os.kill(pid, signal.SIGKILL)  # the mount process dies; the agent replaces it and its stale mount

        async def new_incarnation() -> dict[str, Any] | None:
            event = inventory.latest()
            return event if event and event["incarnation"] != first["incarnation"] else None

        snapshot = await eventually(new_incarnation, timeout=30, what="a restarted mount process")
        assert snapshot["type"] == "agent.inventory.snapshot.v2"

        async def found_again() -> dict[str, Any] | None:  # by the scan the restarted mount runs as it serves
            event = inventory.latest(snapshot["incarnation"])
            return event if event and event["counters"]["cachedBytes"] == total else None

        await eventually(found_again, what="every block found again on disk, nothing downloaded")
        await node.wait_mounted("warm", expect="part-3.bin")
        assert mount_pids(root) and mount_pids(root) != [pid]
        for key, body in objects.items():
            assert md5(await read_file(root / key)) == md5(body)

        async def read_back_counted() -> dict[str, Any] | None:
            event = inventory.latest(snapshot["incarnation"])
            return event if event and event["counters"]["hitBytes"] >= total else None

        after = await eventually(read_back_counted, what="hits counted after the restart")
        assert after["counters"]["missBytes"] == 0  # not one GET to the object store


async def test_after_a_crash_the_mount_serves_correct_bytes_while_its_cache_scan_goes_on(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # Before, a restarted mount opened every block file before serving: 46 s with 200,000 blocks. Now it serves at
    # once and scans in the background. Here the scan is held at a file whose open never returns (a block-named
    # FIFO), so the mount must serve, with the right bytes, while the scan has not finished.
    objects = {f"part-{i}.bin": os.urandom(3 * MiB + i) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    total = sum(len(body) for body in objects.values())
    inventory = InventoryWatch()
    await inventory.start(bus)
    stall: StalledCacheFile | None = None
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        try:
            await node.apply("scan", bucket)
            root = await node.wait_mounted("scan", expect="part-3.bin")
            for key, body in objects.items():
                assert md5(await read_file(root / key)) == md5(body)

            async def all_cached() -> dict[str, Any] | None:
                event = inventory.latest()
                return event if event and event["counters"]["cachedBytes"] == total else None

            first = await eventually(all_cached, what="every block cached")
            (pid,) = mount_pids(root)
            os.kill(pid, signal.SIGKILL)  # a crash: no index written
            tier = node.cache_dir / "default" / "scan"
            assert not (tier / INDEX_FILE).exists()
            stall = StalledCacheFile(tier, 1)  # the scan of the next start stops at it
            await eventually(lambda: _new_pid(root, pid), timeout=30, what="the mount process restarted")
            await node.wait_mounted("scan", expect="part-3.bin")
            for key, body in objects.items():  # served while the scan waits at the FIFO
                assert md5(await read_file(root / key)) == md5(body)
            await asyncio.to_thread(drop_page_cache)
            for key, body in objects.items():  # and again from the cache or the store, not the page cache
                assert await asyncio.to_thread(read_range, root / key, MiB, 2 * MiB) == body[MiB:3 * MiB]
            # Its cached bytes may be partial meanwhile: the events, the dataset's status and describe say so.
            async def restarted_events() -> list[dict[str, Any]] | None:
                return [event for event in inventory.events if event["incarnation"] != first["incarnation"]] or None

            since = await eventually(restarted_events, what="an inventory event of the restarted mount")
            assert all(event["counters"]["counting"] is True for event in since)
            counting = await eventually(lambda: scan_record(node, True), what="the status saying the node counts")
            assert f"Counting blocks on node {NODE} after a restart" in render.describe_dataset(counting)
            assert stall.release()  # the scan was still waiting there: it goes on now

            async def all_cached_again() -> dict[str, Any] | None:
                event = inventory.latest()
                return (event if event and event["incarnation"] != first["incarnation"]
                        and event["counters"]["cachedBytes"] == total and not event["counters"]["counting"] else None)

            await eventually(all_cached_again, timeout=30, what="every block indexed once the scan is done")
            counted = await eventually(lambda: scan_record(node, False), what="the status saying the count is done")
            assert "Counting blocks" not in render.describe_dataset(counted)
            for key, body in objects.items():
                assert md5(await read_file(root / key)) == md5(body)
        finally:
            if stall is not None:
                stall.release()
                stall.remove()


async def scan_record(node: Node, counting: bool) -> DatasetRecord | None:
    """The dataset ``scan``'s record once its one node's row says ``counting``."""
    record = await node.record("scan")
    return record if [row.counting for row in record.status.nodes] == [counting] else None


async def _new_pid(root: Path, old: int) -> bool:
    pids = mount_pids(root)
    return bool(pids) and old not in pids


async def test_overwritten_object_never_mixes_versions(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                       bucket: str, tmp_path: Path) -> None:
    old = os.urandom(32 * MiB)
    new = os.urandom(32 * MiB)
    await put_objects(seaweedfs, bucket, {"model.bin": old})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("ver", bucket)
        root = await node.wait_mounted("ver", expect="model.bin")
        head = await asyncio.to_thread(read_range, root / "model.bin", 0, 4096)
        assert head == old[:4096]
        await put_objects(seaweedfs, bucket, {"model.bin": new})
        # Cached bytes are the manifest's version; uncached bytes of the old version no longer exist.
        assert await asyncio.to_thread(read_range, root / "model.bin", 0, 4096) == old[:4096]
        with pytest.raises(OSError) as raised:
            await asyncio.to_thread(read_range, root / "model.bin", 31 * MiB, 4096)
        assert raised.value.errno == errno.ESTALE
        await node.resync("ver")

        async def new_version_served() -> bool:
            try:
                return md5(await read_file(root / "model.bin")) == md5(new)
            except OSError:
                return False

        await eventually(new_version_served, what="the new version after a resync")


async def test_a_manifest_that_cannot_be_loaded_leaves_the_mount_serving_its_tree(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    # A record naming a manifest the store does not hold (as when NATS fails mid-load): the reload fails, the mount
    # process keeps serving what it has and takes the next good record without a restart.
    await put_objects(seaweedfs, bucket, {"a.txt": b"alpha"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("rel", bucket)
        root = await node.wait_mounted("rel", expect="a.txt")
        device = os.stat(root).st_dev  # a mount process started again would be another FUSE connection
        kv = await bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key("default", "rel")

        async def name_a_missing_manifest() -> bool:
            # Compare-and-set: the dataset service writes the status too (cache figures from the inventory).
            record, revision = await kv_load(kv, key, DatasetRecord)
            assert record is not None
            try:
                await kv_save(kv, key, msgspec.structs.replace(record, status=msgspec.structs.replace(
                    record.status, manifest="default.ghost", synced_generation=record.status.synced_generation + 1)),
                    revision)
            except Conflict:
                return False
            return True

        await eventually(name_a_missing_manifest, what="the record naming a manifest the store does not hold")
        errors: list[str] = []

        async def reload_failed() -> bool:
            errors.append(capfd.readouterr().err)
            return "manifest reload failed" in "".join(errors)

        await eventually(reload_failed, what="the mount process's failed reload")
        assert await read_file(root / "a.txt") == b"alpha"
        await put_objects(seaweedfs, bucket, {"b.txt": b"beta"})
        await node.resync("rel")

        async def new_file_served() -> bool:
            try:
                return await read_file(root / "b.txt") == b"beta"
            except OSError:
                return False

        await eventually(new_file_served, what="the next good manifest")
        assert os.stat(root).st_dev == device


@pytest.mark.needs("fuse", "page-cache")
async def test_full_cache_evicts_stays_within_quota_and_reads_stay_correct(bus: Bus, settings: Settings,
                                                                          seaweedfs: SeaweedServer, bucket: str,
                                                                          tmp_path: Path) -> None:
    objects = {f"f{i:02d}.bin": os.urandom(2 * MiB) for i in range(12)}
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    # LRU evicts to make room (the default policy would mostly turn newcomers away instead).
    async with node_stack(bus, settings, seaweedfs, tmp_path, cache_policy="lru") as node:
        await node.apply("small", bucket, ssd="8Mi")
        root = await node.wait_mounted("small", expect="f11.bin")
        for _ in range(2):
            for key, body in objects.items():
                assert md5(await read_file(root / key)) == md5(body)
            await asyncio.to_thread(drop_page_cache)

        async def settled() -> dict[tuple[str, int], int] | None:
            # The first files read made room for the last ones (a policy that only turns newcomers away would
            # still hold f00 and never f11). Inventory lags the reads by up to a second, and mid-way through the
            # second pass it still shows f11 of the first: wait for the final set rather than the first with f11.
            cached = cached_blocks(inventory)
            keys = {key for key, _ in cached}
            return cached if "f11.bin" in keys and "f00.bin" not in keys else None

        cached = await eventually(settled, what="the last file read in the cache, the least recently used evicted")
        assert 0 < sum(cached.values()) <= 8 * MiB
        assert len({key for key, _ in cached}) < len(objects)
        event = inventory.latest()
        assert event is not None and event["counters"]["capacityBytes"] == 8 * MiB
        assert event["counters"]["cachedBytes"] == sum(cached.values())
        used = sum(f.stat().st_size for f in node.cache_dir.rglob("*") if f.is_file())
        assert used <= 8 * MiB + 64 * 1024  # block files plus their small headers


FLUID_QUOTA_LIST = """
apiVersion: data.fluid.io/v1alpha1
kind: AlluxioRuntime
metadata: {name: split}
spec:
  properties: {alluxio.user.block.size.bytes.default: 1MB}
  tieredstore:
    levels:
      - mediumtype: SSD
        path: %s,%s
        quotaList: 6Mi,3Mi
        high: "0.95"
        low: "0.8"
"""


async def _apply_fluid_quota_list(bus: Bus, cache_dir: Path, bucket: str) -> tuple[Path, Path]:
    """A Fluid runtime whose tier's two directories (returned: big, small) have quotas 6Mi and 3Mi, and dataset
    "split" of ``bucket``, applied as `shoal apply -f` would."""
    big, small = cache_dir / "big", cache_dir / "small"
    text = FLUID_QUOTA_LIST % (big, small) + f"""---
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: split}}
spec: {{mounts: [{{mountPoint: "s3://{bucket}/"}}]}}
"""
    commands, _, errors = documents_to_commands(parse_documents(text))
    assert errors == [] and len(commands) == 2
    for command in commands:
        await bus.publish(command.subject, command.event)
    return big, small


@pytest.mark.needs("fuse", "page-cache")
async def test_a_fluid_quota_list_keeps_each_tier_directory_under_its_own_quota(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A Fluid runtime whose tier gives its two directories different quotas (``quotaList: 6Mi,3Mi``) applies
    (before, it was refused: Shoal split a tier's quota equally), and reading more than the tier holds keeps each
    directory under its own quota, both of them used."""
    objects = {f"f{i:02d}.bin": os.urandom(2 * MiB) for i in range(10)}
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path, cache_policy="lru") as node:
        big, small = await _apply_fluid_quota_list(bus, node.cache_dir, bucket)
        root = await node.wait_mounted("split", expect="f09.bin")

        def used(directory: Path) -> int:
            return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())

        for _ in range(2):
            for key, body in objects.items():
                assert md5(await read_file(root / key)) == md5(body)
                assert used(big) <= 6 * MiB + 64 * 1024 and used(small) <= 3 * MiB + 64 * 1024  # blocks + headers
            await asyncio.to_thread(drop_page_cache)
        assert used(big) > 3 * MiB and used(small) > MiB


@pytest.mark.needs("fuse", "page-cache")
async def test_a_fluid_quota_list_level_keeps_the_recently_read_blocks_in_every_directory(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """With LRU, the tier (``quotaList: 6Mi,3Mi``) keeps what was read last in both of its directories: reading
    20 MiB after a first 20 MiB leaves none of the first files' blocks (before, the directory with the most free
    room took every new block while the other kept the first ones it got for ever, never read again)."""
    first = {f"a{i:02d}.bin": os.urandom(2 * MiB) for i in range(10)}
    then = {f"b{i:02d}.bin": os.urandom(2 * MiB) for i in range(10)}
    await put_objects(seaweedfs, bucket, {**first, **then})
    async with node_stack(bus, settings, seaweedfs, tmp_path, cache_policy="lru") as node:
        big, small = await _apply_fluid_quota_list(bus, node.cache_dir, bucket)
        root = await node.wait_mounted("split", expect="b09.bin")

        def block_files() -> dict[str, set[str]]:
            return {folder.name: {f.name for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")}
                    for folder in (big, small)}

        for key, body in first.items():
            assert md5(await read_file(root / key)) == md5(body)
        old = block_files()
        assert old["big"] and old["small"]
        await asyncio.to_thread(drop_page_cache)
        for key, body in then.items():
            assert md5(await read_file(root / key)) == md5(body)
        now = block_files()
        assert now["big"] and now["small"]
        assert not old["big"] & now["big"] and not old["small"] & now["small"], "first blocks kept"


def cached_blocks(inventory: InventoryWatch) -> dict[tuple[str, int], int]:
    """(key, block index) → size of every cached block, folded from the inventory events of the last incarnation."""
    latest = inventory.latest()
    blocks: dict[tuple[str, int], int] = {}
    for event in inventory.events:
        if latest is None or event["incarnation"] != latest["incarnation"]:
            continue
        if event["type"] == "agent.inventory.snapshot.v2" and event["part"] == 1:
            blocks.clear()
        for _, key, _, indices in event.get("cached", []) + event.get("files", []):
            blocks.update({(key, index): size for index, size in indices})
        for _, key, _, indices in event.get("evicted", []):
            for index, _ in indices:
                blocks.pop((key, index), None)
    return blocks


@pytest.mark.needs("fuse", "page-cache")
async def test_corrupt_block_file_is_dropped_and_fetched_again(bus: Bus, settings: Settings,
                                                               seaweedfs: SeaweedServer, bucket: str,
                                                               tmp_path: Path) -> None:
    body = os.urandom(4 * MiB)
    await put_objects(seaweedfs, bucket, {"data.bin": body})
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("rot", bucket)
        root = await node.wait_mounted("rot", expect="data.bin")
        assert await read_file(root / "data.bin") == body

        async def cached() -> bool:
            event = inventory.latest()
            return bool(event and event["counters"]["cachedBytes"] == len(body))

        await eventually(cached)
        block_files = [f for f in node.cache_dir.rglob("*") if f.is_file() and not f.name.startswith(".")]
        assert len(block_files) == 4
        for block_file in block_files:  # flip one byte in the data of every block
            raw = bytearray(block_file.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            block_file.write_bytes(bytes(raw))
        await asyncio.to_thread(drop_page_cache)
        assert await read_file(root / "data.bin") == body  # fetched again, never the corrupt bytes


@pytest.mark.needs("fuse", "page-cache")
async def test_store_unreachable_cached_reads_work_uncached_fail_then_recover(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    cached_body, uncached_body = os.urandom(3 * MiB), os.urandom(3 * MiB)
    await put_objects(seaweedfs, bucket, {"cached.bin": cached_body, "uncached.bin": uncached_body})
    proxy = CuttableProxy(seaweedfs.config.s3_port)
    await proxy.start()
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("flaky", bucket, endpoint=proxy.endpoint)
            root = await node.wait_mounted("flaky", expect="cached.bin")
            assert await read_file(root / "cached.bin") == cached_body
            await eventually(lambda: _blocks_on_disk(node.cache_dir, 3))
            await proxy.cut()
            await asyncio.to_thread(drop_page_cache)
            assert await read_file(root / "cached.bin") == cached_body  # from the agent's disk cache
            with pytest.raises(OSError) as raised:
                await read_file(root / "uncached.bin")
            assert raised.value.errno == errno.EIO
            # A listing in the outage (a resync here; autoSync alike) keeps the dataset Bound with its tree, saying
            # what failed: Failed would take the mount away from every node after the unbound grace.
            await node.resync("flaky")
            record = await node.record("flaky")
            synced = next(c for c in record.status.conditions if c.type == "MetadataSynced")
            assert (record.status.phase, synced.status, synced.reason) == ("Bound", "False", "StoreUnreachable")
            assert record.status.manifest and "cannot reach" in record.status.message
            assert await read_file(root / "cached.bin") == cached_body
            await proxy.restore()

            async def recovered() -> bool:
                try:
                    return await read_file(root / "uncached.bin") == uncached_body
                except OSError:
                    return False

            await eventually(recovered, what="reads after the store came back")
    finally:
        await proxy.cut()


async def _blocks_on_disk(cache_dir: Path, count: int) -> bool:
    return len([f for f in cache_dir.rglob("*") if f.is_file() and not f.name.startswith(".")]) >= count


@pytest.mark.needs("fuse", "page-cache")
async def test_inventory_sequence_and_cache_states(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                  bucket: str, tmp_path: Path) -> None:
    objects = {f"s{i}.bin": os.urandom(MiB + 1000 * i) for i in range(6)}
    total = sum(len(b) for b in objects.values())
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("inv", bucket)
        root = await node.wait_mounted("inv", expect="s5.bin")
        for key in objects:
            await read_file(root / key)

        async def percent_cached() -> Any:
            record = await node.record("inv")
            states = record.status.cache_states
            return record if states.cached_percentage == "100.0%" else None

        record = await eventually(percent_cached, what="cacheStates at 100%")
        states = record.status.cache_states
        assert states.cache_capacity == "256.00MiB"
        assert states.cache_hit_ratio == "0.0%"  # every byte so far came from the object store
        events = [e for e in inventory.events if e["incarnation"] == inventory.events[0]["incarnation"]]
        assert events[0]["type"] == "agent.inventory.snapshot.v2"
        assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + len(events)))
        blocks: dict[tuple[int, str, str, int], int] = {}
        for event in events:
            for mount, key, etag, indices in event.get("cached", []) + event.get("files", []):
                blocks.update({(mount, key, etag, index): size for index, size in indices})
            for mount, key, etag, indices in event.get("evicted", []):
                for index, _ in indices:
                    blocks.pop((mount, key, etag, index), None)
        assert sum(blocks.values()) == total == events[-1]["counters"]["cachedBytes"]
        shoal = str(Path(sys.executable).parent / "shoal")
        cli = await run_tool(shoal, "--nats", ",".join(settings.nats.urls), "get", "datasets")
        assert "100.0%" in cli.stdout

        # A consumer that saw a gap asks for a snapshot; the mount answers with the whole inventory.
        before = len(inventory.events)
        request = InventoryRequest(node=NODE, dataset=ObjectRef(name="inv"))
        await bus.nc.publish(subjects.INVENTORY_REQUEST, msgspec.json.encode(request))

        async def snapshot_after_request() -> dict[str, Any] | None:
            fresh = [e for e in inventory.events[before:] if e["type"] == "agent.inventory.snapshot.v2"]
            return fresh[-1] if fresh else None

        snapshot = await eventually(snapshot_after_request, what="a snapshot on request")
        assert sum(size for *_, indices in snapshot["files"] for _, size in indices) == total
        assert snapshot["seq"] > events[-1]["seq"]

        # Read everything again from the agent's cache: as many bytes hit as missed before.
        await asyncio.to_thread(drop_page_cache)
        for key, body in objects.items():
            assert await read_file(root / key) == body

        async def half_hits() -> Any:
            record = await node.record("inv")
            return record if record.status.cache_states.cache_hit_ratio == "50.0%" else None

        record = await eventually(half_hits, what="a cache hit ratio of 50.0%")
        # One node, no peers: every hit is local; its row says where the bytes are and how they were read.
        states = record.status.cache_states
        assert (states.local_hit_ratio, states.remote_hit_ratio) == ("50.0%", "0.0%")
        assert record.status.nodes == [NodeCache(node=NODE, cached_bytes=total, local_read_bytes=total,
                                                 store_read_bytes=total)]


@pytest.mark.needs("fuse", "page-cache")
async def test_failing_cache_directory_is_bypassed(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                  bucket: str, tmp_path: Path) -> None:
    objects = {f"b{i}.bin": os.urandom(2 * MiB) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("sick", bucket)
        root = await node.wait_mounted("sick", expect="b3.bin")
        assert await read_file(root / "b0.bin") == objects["b0.bin"]
        await eventually(lambda: _blocks_on_disk(node.cache_dir, 2))
        # The disk under the cache goes away: its folder is replaced by a file, so every cache I/O fails.
        dataset_cache = node.cache_dir / "default" / "sick"
        await asyncio.to_thread(shutil.rmtree, dataset_cache)
        dataset_cache.write_bytes(b"not a directory")
        await asyncio.to_thread(drop_page_cache)
        for key, body in objects.items():  # cached and uncached files alike come from the object store
            assert await read_file(root / key) == body


async def test_manifest_reload_and_unmount_on_delete(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                    bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"keep.txt": b"keep", "gone.txt": b"gone"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("live", bucket)
        root = await node.wait_mounted("live", expect="gone.txt")
        await put_objects(seaweedfs, bucket, {"added/new.txt": b"new"})
        async with seaweedfs.client() as s3:
            await s3.delete_object(Bucket=bucket, Key="gone.txt")
        await node.resync("live")

        async def reloaded() -> bool:
            names = await run_tool("find", str(root), "-type", "f")
            return sorted(os.path.relpath(p, root) for p in names.stdout.split()) == ["added/new.txt", "keep.txt"]

        await eventually(reloaded, what="the new manifest in the mount")
        assert (await read_file(root / "added/new.txt")) == b"new"
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="live"))

        async def unmounted() -> bool:
            return str(root) not in mounted_paths()

        await eventually(unmounted, what="the mount removed after delete")


@pytest.mark.needs("fuse", "fio")
async def test_fio_verifies_data_written_with_checksums(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                       bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "fio.dat"
    subprocess.run(["fio", "--name=write", f"--filename={source}", "--rw=write", "--bs=64k", "--size=24m",
                    "--verify=crc32c", "--do_verify=0", "--verify_state_save=0"], check=True, capture_output=True)
    await put_objects(seaweedfs, bucket, {"fio.dat": source.read_bytes()})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("fio", bucket)
        root = await node.wait_mounted("fio", expect="fio.dat")
        for pattern in ("read", "randread"):
            result = await run_tool("fio", f"--name=verify-{pattern}", f"--filename={root / 'fio.dat'}",
                                    f"--rw={pattern}", "--bs=64k", "--size=24m", "--verify=crc32c",
                                    "--verify_only=1", "--readonly", "--numjobs=4", "--group_reporting",
                                    check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "err= 0" in result.stdout


