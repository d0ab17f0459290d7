"""A mount's life on real FUSE over SeaweedFS and nats-server: inventory of thousands of long keys, inventory
publishes that fail, a mount that keeps failing (and shows it in status), a mount process killed under a reader,
mounts added to a Bound dataset, and a deleted dataset's cache freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from nats.js.api import StreamConfig

from libs import subjects
from libs.bus import MESSAGE_LIMIT, Bus, kv_load
from libs.config import Settings
from libs.embedded import LOOPBACK
from libs.events.agent import InventoryRequest
from libs.events.common import ObjectMeta, format_bytes
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetResync, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeDelete, RuntimeSpec, TieredStore
from libs.inventory import DatasetInventory
from libs.manifest import ManifestStore
from libs.ufs.base import S3Location
from services.agent import app as agent_app
from services.agent.fs import NO_OPEN
from services.agent.ledger import FILE_NAME as LEDGER_FILE_NAME
from services.agent.mountinfo import device_of
from services.agent.mountstatus import STARTING_CACHE, read_status
from services.dataset import app as dataset_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.faults import CuttableProxy, ListingHold, StalledCacheFile
from tests.helpers import dataset_record, eventually, running, runtime_record
from tests.integration.agent_stack import (
    NODE,
    Cluster,
    cluster_stack,
    md5,
    mounted_paths,
    node_stack,
    read_file,
    run_tool,
)
from tests.integration.test_agent_cache import InventoryWatch, mount_pids
from tests.integration.test_agent_health import last_beat
from tests.integration.test_security import local_dataset, ssd_runtime

# The CLI of the interpreter running the tests (its venv), wherever the checkout is.
SHOAL = str(Path(sys.executable).parent / "shoal")


def long_key(i: int) -> str:
    """A 1,000-character key (S3 allows 1,024 bytes) in 200-character folders (a path segment must stay under 255
    bytes)."""
    folders = "/".join(c * 199 for c in "abcd")
    return f"{folders}/{i:05d}-" + "f" * (KEY_LENGTH - len(folders) - 7)


KEY_LENGTH = 1000


def block_files(directory: Path, temporary: bool = False) -> list[Path]:
    """Block files under ``directory`` (named by their hash); blocks still being written (``.<name>.tmp``) too
    if ``temporary``. Not the tier's ownership marker."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.rglob("*") if p.is_file() and (
        not p.name.startswith(".") or (temporary and p.name.endswith(".tmp"))))


async def test_inventory_of_thousands_of_blocks_under_long_keys_arrives_and_the_mount_restarts(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # 1,300 blocks with 1,000-character keys: ~1.3 MB as one v1 snapshot, beyond NATS's 1 MiB payload limit.
    count = 1300
    objects = {long_key(i): f"{i:08d}".encode() for i in range(count)}
    assert {len(key) for key in objects} == {KEY_LENGTH}
    # A local folder as the store: the keys are what matters here, and writing them takes no time.
    source = tmp_path / "source"
    for key, data in objects.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("wide", bucket, block_size="64Ki", mount_point=f"local://{source}")
        root = await node.wait_mounted("wide", expect=long_key(count - 1))
        await run_tool("sh", "-c", f"find '{root}' -type f -print0 | xargs -0 -P 8 -n 100 cat > /dev/null")

        async def all_cached() -> Any:
            record = await node.record("wide")
            return record if record.status.cache_states.cached_percentage == "100.0%" else None

        await eventually(all_cached, timeout=30, what="every block in cacheStates")
        [pid] = mount_pids(root)
        first = inventory.latest()
        assert first is not None
        os.kill(pid, signal.SIGKILL)

        async def all_found() -> dict[str, Any] | None:
            # After a crash the restarted mount serves at once and finds its blocks on disk in the background.
            event = inventory.latest()
            return event if event is not None and event["incarnation"] != first["incarnation"] \
                and event["counters"]["cachedBytes"] == first["counters"]["cachedBytes"] else None

        found = await eventually(all_found, timeout=60, what="the restarted mount's blocks found again")
        # Asked for a snapshot (as a consumer that saw a gap does), it sends all 1,300 blocks, in parts.
        await bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=found["node"]))

        async def whole_snapshot() -> list[dict[str, Any]] | None:
            parts = [e for e in inventory.events if e["incarnation"] == found["incarnation"]
                     and e["type"] == "agent.inventory.snapshot.v2" and e["seq"] > found["seq"]]
            return parts if parts and len(parts) == parts[-1]["parts"] else None

        parts = await eventually(whole_snapshot, timeout=60, what="the restarted mount's snapshot, every part")
        assert len(parts) > 1 and [p["part"] for p in parts] == list(range(1, len(parts) + 1))
        assert [p["seq"] for p in parts] == list(range(parts[0]["seq"], parts[0]["seq"] + len(parts)))
        assert all(len(msgspec.json.encode(p)) < MESSAGE_LIMIT for p in parts)
        assert sum(len(indices) for p in parts for *_, indices in p["files"]) == count
        await node.wait_mounted("wide")
        assert mount_pids(root) and mount_pids(root) != [pid]
        assert await read_file(root / long_key(7)) == objects[long_key(7)]


async def set_agent_stream_subjects(bus: Bus, subject_list: list[str]) -> None:
    info = await bus.js.stream_info(subjects.STREAM_AGENT)
    config: StreamConfig = info.config
    config.subjects = subject_list
    await bus.js.update_stream(config)


async def test_a_failing_inventory_publish_leaves_the_mount_serving(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("pub", bucket)
        root = await node.wait_mounted("pub", expect="f3.bin")
        [pid] = mount_pids(root)
        assert await read_file(root / "f0.bin") == objects["f0.bin"]
        first = await eventually(lambda: _async(inventory.latest()), what="inventory of the first read")
        # JetStream stops taking inventory (heartbeats still go through): every inventory publish now fails.
        await set_agent_stream_subjects(bus, [subjects.AGENT_HEARTBEATS])
        before = len(inventory.events)
        assert await read_file(root / "f1.bin") == objects["f1.bin"]  # a change the next delta must carry

        async def snapshot_after_failure() -> dict[str, Any] | None:
            # The failed publish is seen by this core subscriber, and the publisher starts over with a snapshot
            # from the same process (same incarnation): the failure was noticed and the mount lived on.
            later = inventory.events[before:]
            deltas = [e for e in later if e["type"] == "agent.inventory.delta.v2"]
            snapshots = [e for e in later if e["type"] == "agent.inventory.snapshot.v2"
                         and deltas and e["seq"] > deltas[0]["seq"]]
            return snapshots[0] if snapshots else None

        snapshot = await eventually(snapshot_after_failure, timeout=30, what="a snapshot after a failed publish")
        assert snapshot["incarnation"] == first["incarnation"]
        assert mount_pids(root) == [pid]
        for key, body in objects.items():
            assert md5(await read_file(root / key)) == md5(body)
        await set_agent_stream_subjects(bus, [subjects.ALL_AGENT])
        total = sum(len(body) for body in objects.values())

        async def caught_up() -> Any:
            record = await node.record("pub")
            return record if record.status.cache_states.cached == format_bytes(total) else None

        await eventually(caught_up, timeout=30, what="cacheStates once inventory flows again")
        assert mount_pids(root) == [pid]


async def _async(value: Any) -> Any:
    return value


async def test_a_mount_that_keeps_failing_shows_in_dataset_and_runtime_status(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.txt": b"a"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("sad", bucket)
        root = await node.wait_mounted("sad", expect="a.txt")
        record = await node.record("sad")

        async def mounted_condition(status: str) -> Any:
            dataset = await node.record("sad")
            runtime = await runtime_record(bus, "sad")
            found = [c for c in dataset.status.conditions if c.type == "Mounted" and c.status == status]
            found_rt = [c for c in runtime.status.conditions if c.type == "Mounted" and c.status == status] \
                if runtime else []
            return (dataset, runtime, found[0]) if found and found_rt else None

        await eventually(lambda: mounted_condition("True"), what="Mounted=True while serving")
        # Every restart of the mount now fails: its manifest is gone from the object store.
        await (await ManifestStore.of(bus)).delete(record.status.manifest)
        [pid] = mount_pids(root)
        os.kill(pid, signal.SIGKILL)
        dataset, runtime, condition = await eventually(lambda: mounted_condition("False"), timeout=30,
                                                       what="Mounted=False on dataset and runtime")
        assert condition.reason == "MountFailing" and "node-a: mount process exited with code" in condition.message
        assert dataset.status.phase == "Bound" and dataset.status.message == condition.message
        assert "not serving on node-a" in runtime.status.message
        cli = await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "get", "datasets", "-o", "wide")
        assert "not serving on node-a" in cli.stdout
        with pytest.raises(OSError) as raised:  # the dead mount stays: readers get an error, not an empty folder
            await asyncio.to_thread(os.listdir, root)
        assert raised.value.errno == errno.ENOTCONN
        await node.resync("sad")  # a new manifest: the next restart succeeds
        dataset, _, _ = await eventually(lambda: mounted_condition("True"), timeout=30, what="serving again")
        assert dataset.status.message == ""
        assert await read_file(root / "a.txt") == b"a"


async def test_a_mount_process_whose_start_hangs_is_reported_failing_stopped_and_started_again(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.txt": b"a"})
    # The first start hangs reading its cache's index (a file whose open never returns, as on a dead disk). The deadline
    # is short for the test, yet well above how long a healthy start takes here, even with the machine loaded (at 10 s
    # a start under a load average of 11 had not reached its first step, so the message named none).
    stall = StalledCacheFile(tmp_path / "cache" / "default" / "hung")
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path, mount_start_seconds=20.0) as node:
            await node.apply("hung", bucket)
            root = node.mountpoint("hung")
            [pid] = await eventually(lambda: _async(mount_pids(root)), timeout=30, what="the mount process started")

            async def failing() -> Any:
                beat = await last_beat(bus)
                report = beat.mount_of("default", "hung") if beat else None
                return report if report is not None and report.state == "Failing" else None

            report = await eventually(failing, timeout=60, what="the hung start reported Failing")
            assert report.message == ("mount process did not start within 20 s (it was loading the cache); "
                                      "stopped, restarting with backoff")

            async def runtime_says_so() -> Any:
                record = await runtime_record(bus, "hung")
                found = [c for c in record.status.conditions if c.type == "Mounted"] if record else []
                return found[0] if found and found[0].reason == "MountFailing" else None

            condition = await eventually(runtime_says_so, what="Mounted=False on the runtime")
            assert "did not start within 20 s (it was loading the cache)" in condition.message
            stall.release()  # the disk answers again; the next start goes through
            stall.remove()
            await node.wait_mounted("hung", expect="a.txt", timeout=60)
            assert pid not in mount_pids(root) and not os.path.exists(f"/proc/{pid}")  # stopped, not left behind
            assert await read_file(root / "a.txt") == b"a"

            async def serving() -> Any:
                beat = await last_beat(bus)
                reports = beat.mount_reports() if beat else []
                return beat if [(m.dataset.name, m.state) for m in reports] == [("hung", "Serving")] else None

            await eventually(serving, what="the mount reported Serving again")
    finally:
        stall.release()


async def test_readers_never_see_an_empty_folder_while_a_killed_mount_restarts(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"img_{i}.jpg": os.urandom(1000) for i in range(20)}
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("steady", bucket)
        root = await node.wait_mounted("steady", expect="img_19.jpg")
        [pid] = mount_pids(root)
        seen: list[str] = []
        stop = threading.Event()

        def poll() -> None:
            # Paced a little so the test's own event loop (which runs the services) keeps the GIL often enough.
            while not stop.is_set():
                try:
                    names = os.listdir(root)
                    seen.append("listing" if sorted(names) == sorted(objects) else f"WRONG {sorted(names)[:3]}")
                except OSError as err:
                    seen.append(errno.errorcode.get(err.errno or 0, str(err)))
                try:
                    os.stat(root / "img_3.jpg")
                except OSError as err:
                    seen.append(f"stat {errno.errorcode.get(err.errno or 0, str(err))}")
                time.sleep(0.001)

        reader = threading.Thread(target=poll)
        reader.start()
        try:
            await eventually(lambda: _async("listing" in seen), what="the reader under way")
            dead_device = device_of(str(root))
            os.kill(pid, signal.SIGKILL)

            replaced_at: list[int] = []

            async def restarted() -> bool:
                # The new mount moved in (another device), not only its process started: a dead mount still
                # serves what the kernel caches (with no-open, the whole listing).
                if device_of(str(root)) in (None, dead_device):
                    return False
                replaced_at[:] = replaced_at or [len(seen)]
                return seen[replaced_at[0]:].count("listing") >= 50  # the new mount, listed many times over

            await eventually(restarted, timeout=30, what="the replacement mount serving the reader")
        finally:
            stop.set()
            await asyncio.to_thread(reader.join)
        outcomes = set(seen)
        if not NO_OPEN:
            assert "ENOTCONN" in outcomes  # the reader did see the dead mount
        # else the kernel holds the folder's listing and attributes itself: the reader may never notice
        # Errors only (ECONNABORTED: a request in flight when the process died): never an empty or partial
        # listing, never ENOENT for a file of the dataset.
        errors = {"ENOTCONN", "ECONNABORTED"}
        assert outcomes <= {"listing", *errors, *(f"stat {e}" for e in errors)}, sorted(outcomes)
        assert md5(await read_file(root / "img_3.jpg")) == md5(objects["img_3.jpg"])


async def test_a_mount_added_to_a_bound_dataset_reads_through_the_running_mount(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {"train/a.bin": os.urandom(300_000), "train/later.bin": os.urandom(200_000),
               "extra/b.bin": os.urandom(250_000)}
    await put_objects(seaweedfs, bucket, objects)
    proxy = CuttableProxy(seaweedfs.config.s3_port)
    await proxy.start()
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("grow", bucket, prefix="train/", endpoint=proxy.endpoint)
            root = await node.wait_mounted("grow", expect="a.bin")
            assert md5(await read_file(root / "a.bin")) == md5(objects["train/a.bin"])
            [pid] = mount_pids(root)
            # Re-applied: the first mount now reads straight from the store (its endpoint option changed), and a
            # second mount over the whole bucket is added.
            grown = Dataset(metadata=ObjectMeta(name="grow"), spec=DatasetSpec(mounts=[
                Mount(mount_point=f"s3://{bucket}/train/", name="train", options={"endpoint": seaweedfs.endpoint}),
                Mount(mount_point=f"s3://{bucket}/", name="all"),
            ]))
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=grown))
            await node.wait_mounted("grow", expect="all/extra/b.bin")
            await proxy.cut()  # the old endpoint is gone: reads must use the new one
            for path, key in [("all/extra/b.bin", "extra/b.bin"), ("all/train/a.bin", "train/a.bin"),
                              ("train/later.bin", "train/later.bin")]:
                result = await run_tool("md5sum", str(root / path), check=False)
                assert result.returncode == 0, f"{path}: {result.stderr}"
                assert result.stdout.split()[0] == md5(objects[key])
            piped = await run_tool("sh", "-c", f"cat '{root / 'all/train/later.bin'}' | md5sum")
            assert piped.stdout.split()[0] == md5(objects["train/later.bin"])
            assert mount_pids(root) == [pid]  # the running mount, not a new one
    finally:
        await proxy.cut()


async def test_deleting_a_dataset_frees_its_cached_blocks(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(3)}
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("gone", bucket)
        await node.apply("kept", bucket)
        root = await node.wait_mounted("gone", expect="d2.bin")
        kept_root = await node.wait_mounted("kept", expect="d2.bin")
        for key in objects:
            await read_file(root / key)
            await read_file(kept_root / key)
        cache = node.cache_dir / "default" / "gone"
        await eventually(lambda: _async(len(block_files(cache)) >= 6), what="blocks of 'gone' on disk")
        kept = node.cache_dir / "default" / "kept"
        kept_blocks = await eventually(lambda: _async(len(block_files(kept)) >= 6 and
                                                      block_files(kept, temporary=True) == block_files(kept)
                                                      and block_files(kept)), what="blocks of 'kept' on disk")
        await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "delete", "dataset", "gone")

        async def freed() -> bool:
            return not cache.exists() and str(root) not in mounted_paths()

        # Its folder goes too: block files, shards and the tier's marker, nothing else was in it.
        await eventually(freed, timeout=30, what="the deleted dataset's blocks removed from the cache directory")
        assert not root.exists()  # no bare mount point left behind either

        await eventually(lambda: _async(not mount_pids(root)), what="the mount process gone, its last events sent")

        async def holds_nothing() -> bool:
            # Folded, the node's events say it holds no block of the dataset any more (every freed block is
            # listed as evicted).
            events = [e for e in inventory.events if e["dataset"]["name"] == "gone"]
            held: set[tuple[int, str, str, int]] = set()
            for event in events:
                if event["type"] == "agent.inventory.snapshot.v2" and event["part"] == 1:
                    held = set()
                for mount, key, etag, indices in event.get("files", []) + event.get("cached", []):
                    held |= {(mount, key, etag, index) for index, _ in indices}
                for mount, key, etag, indices in event.get("evicted", []):
                    held -= {(mount, key, etag, index) for index, _ in indices}
            return bool(events) and events[-1]["counters"]["cachedBytes"] == 0 and not held

        await eventually(holds_nothing, what="inventory saying the node caches nothing of it")
        listing = await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "get", "datasets")
        assert "gone" not in listing.stdout and "kept" in listing.stdout
        node_cache, _ = await kv_load(await bus.kv(subjects.KV_NODE_CACHE), subjects.resource_key("default", "gone"),
                                      DatasetInventory)
        assert node_cache is None
        assert block_files(kept) == kept_blocks  # other datasets untouched


async def test_deleting_a_dataset_whose_mount_is_down_frees_its_cached_blocks_too(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """Its task durable goes too: the dead mount process could not delete it, and it stayed on the server a day."""
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    await bus.provision_node_tasks(NODE)  # as the loader does before the node's first part: the mount makes its durable
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("down", bucket)
        root = await node.wait_mounted("down", expect="d1.bin")
        stream = subjects.task_stream(NODE)
        durable = subjects.task_durable(NODE, "default", "down", (await node.record("down")).incarnation)

        async def durable_made() -> bool:
            return any(info.name == durable for info in await bus.js.consumers_info(stream))

        await eventually(durable_made, what="the mount's task durable")
        for key in objects:
            await read_file(root / key)
        cache = node.cache_dir / "default" / "down"
        await eventually(lambda: _async(len(block_files(cache)) >= 4), what="blocks on disk")
        # The mount process dies and cannot come back (its manifest is gone): nobody in it to free the cache.
        record = await node.record("down")
        await (await ManifestStore.of(bus)).delete(record.status.manifest)
        [pid] = mount_pids(root)
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: _async(not mount_pids(root)), what="the mount process gone")
        await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "delete", "dataset", "down")

        async def freed() -> bool:
            return not cache.exists() and str(root) not in mounted_paths() and not root.exists()

        await eventually(freed, timeout=30, what="the agent freeing the deleted dataset's blocks")

        async def durable_gone() -> bool:
            return all(info.name != durable for info in await bus.js.consumers_info(stream))

        await eventually(durable_gone, what="the deleted dataset's task durable deleted by the agent")


async def test_a_dataset_deleted_after_its_runtime_still_has_its_cached_blocks_freed(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime goes first: the mount stops after the unbound grace (shortened here; the agent runs in this
    # process) and its blocks stay, the dataset still existing. Deleting the dataset then frees them, though no
    # runtime says any more where its tiers were.
    monkeypatch.setattr(agent_app, "UNBOUND_GRACE_SECONDS", 0.5)
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("orphan", bucket)
        root = await node.wait_mounted("orphan", expect="d1.bin")
        for key in objects:
            await read_file(root / key)
        cache = node.cache_dir / "default" / "orphan"
        await eventually(lambda: _async(len(block_files(cache)) >= 4), what="blocks on disk")
        await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "delete", "runtime", "orphan")
        await eventually(lambda: _async(not mount_pids(root) and str(root) not in mounted_paths()),
                         what="the unbound mount stopped")
        assert len(block_files(cache)) >= 4  # the dataset may be bound again: its blocks are kept meanwhile
        await run_tool(SHOAL, "--nats", ",".join(settings.nats.urls), "delete", "dataset", "orphan")
        await eventually(lambda: _async(not cache.exists()), timeout=30,
                         what="the agent freeing the blocks of the runtime-less dataset")


async def test_a_dataset_deleted_while_the_agent_was_down_has_its_blocks_freed_when_it_comes_back(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # Nothing of the node ran when the delete was handled: the agent, back, finds the blocks of a dataset that no
    # longer exists in its runtime's tiers and frees them; those of a dataset that exists stay for its mount.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"n1": {}}) as cluster:
        await _mount_and_read_gone_and_kept(bus, bucket, cluster, objects, lambda name: cluster.cache_dir)
        caches = {name: cluster.cache_dir / "n1" / "default" / name for name in ("gone", "kept")}
        for cache in caches.values():

            async def on_disk(cache: Path = cache) -> bool:
                return len(block_files(cache)) >= 4

            await eventually(on_disk, what="blocks on disk")
        await cluster.stop_agent("n1")
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="gone"))
        await eventually(lambda: _async_not(dataset_record(bus, "gone")), what="the dataset deleted")
        assert len(block_files(caches["gone"])) >= 4  # no process of the node was there to free them
        cluster.start_agent("n1")
        await eventually(lambda: _async(not caches["gone"].exists()), timeout=30,
                         what="the agent back, freeing the blocks of the dataset deleted while it was down")
        await cluster.wait_mounted("kept", "d1.bin")
        assert len(block_files(caches["kept"])) >= 4


async def _gone_and_kept_cached_in_own_tiers(bus: Bus, bucket: str, cluster: Cluster,
                                             objects: dict[str, bytes]) -> dict[str, Path]:
    """``gone`` and ``kept`` mounted and read, each runtime with a tier of its own, and each one's blocks on disk
    there: their cache folders."""
    await _mount_and_read_gone_and_kept(bus, bucket, cluster, objects, lambda name: cluster.cache_dir / name)
    caches = {name: cluster.cache_dir / name / "n1" / "default" / name for name in ("gone", "kept")}
    for cache in caches.values():

        async def on_disk(cache: Path = cache) -> bool:
            return len(block_files(cache)) >= 4

        await eventually(on_disk, what="blocks on disk")
    return caches


async def test_a_dataset_and_its_runtime_deleted_while_the_agent_was_down_have_their_blocks_freed(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # As above, but the runtime goes too, and each runtime has tiers of its own: no runtime that still exists says
    # where the deleted dataset's blocks are. The agent wrote down the tiers its mounts were started with (in its
    # mount root), so, back, it still finds and frees them; a folder there without a tier's marker stays.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"n1": {}}) as cluster:
        caches = await _gone_and_kept_cached_in_own_tiers(bus, bucket, cluster, objects)
        # Where a dataset's cache would be, in the deleted runtime's tier, but no tier's marker: not Shoal's.
        stray = cluster.cache_dir / "gone" / "n1" / "default" / "stray"
        stray.mkdir()
        (stray / "data.bin").write_bytes(b"not a block")
        await cluster.stop_agent("n1")
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="gone"))
        await bus.publish(subjects.RUNTIME_DELETE, RuntimeDelete(name="gone"))
        await eventually(lambda: _async_not(dataset_record(bus, "gone")), what="the dataset deleted")
        await eventually(lambda: _async_not(runtime_record(bus, "gone")), what="the runtime deleted")
        assert len(block_files(caches["gone"])) >= 4  # no process of the node was there to free them
        cluster.start_agent("n1")
        await eventually(lambda: _async(not caches["gone"].exists()), timeout=30,
                         what="the agent back, freeing the blocks of the dataset deleted with its runtime")
        await cluster.wait_mounted("kept", "d1.bin")
        assert len(block_files(caches["kept"])) >= 4
        assert (stray / "data.bin").read_bytes() == b"not a block"


# A mount process killed with its agent (the container OOM-killed, kill -9 of the whole node), reduced to what it
# leaves: a Shoal FUSE mount whose server is gone. pyfuse3.init mounts; nothing ever answers.
DEAD_MOUNT = """\
import sys, pyfuse3
pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"fsname=shoal:default/" + sys.argv[2], "subtype=shoal"})
print("mounted", flush=True)
sys.stdin.read()
"""


async def leave_a_dead_mount(mountpoint: Path) -> None:
    mountpoint.mkdir(parents=True)
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", DEAD_MOUNT, str(mountpoint), mountpoint.name,
                                                   stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"mounted\n"
    finally:
        process.kill()
        await process.wait()
    with pytest.raises(OSError) as raised:
        await asyncio.to_thread(os.stat, mountpoint)
    assert raised.value.errno == errno.ENOTCONN


async def test_dead_mounts_an_earlier_agent_left_are_removed_unless_their_dataset_is_still_wanted(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The dataset of "gone" was deleted while nothing of the node ran: nothing else would ever unmount it, and its
    # mount point answers ENOTCONN to every ls, du and backup of the mount root (and `make clean` cannot remove it).
    # "kept", applied again once the agent runs, is mounted at its place all the same.
    await put_objects(seaweedfs, bucket, {"k.bin": b"kept"})
    gone, kept = tmp_path / "mnt" / "default" / "gone", tmp_path / "mnt" / "default" / "kept"
    try:
        await leave_a_dead_mount(gone)
        await leave_a_dead_mount(kept)
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("kept", bucket)
            await node.wait_mounted("kept", expect="k.bin", timeout=60)
            await eventually(lambda: _async(str(gone) not in mounted_paths() and not os.path.lexists(gone)),
                             timeout=30, what="the dead mount of a dataset no longer there removed")
            assert await read_file(kept / "k.bin") == b"kept"
    finally:
        for path in (gone, kept):
            if str(path) in mounted_paths():
                await run_tool("fusermount3", "-u", "-z", str(path), check=False)


async def _async_not(value: Any) -> bool:
    return not await value


async def test_a_resync_right_after_a_nats_server_restart_reaches_the_running_mount(
        bus: Bus, settings: Settings, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str,
        tmp_path: Path) -> None:
    # Every watch (the dataset service's reconciler, the agent's mirrors, the mount's own watch of its dataset)
    # starts again on reconnect; nats-py alone noticed the restarted server only after ~20 s of missed heartbeats.
    await put_objects(seaweedfs, bucket, {"a.bin": b"before"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("steady", bucket)
        root = await node.wait_mounted("steady", expect="a.bin")
        [pid] = mount_pids(root)
        nats_server.restart()
        await put_objects(seaweedfs, bucket, {"b.bin": b"after the restart"})
        await eventually(lambda: _async(bus.nc.is_connected), what="the test's client reconnected")
        await bus.publish(subjects.DATASET_RESYNC, DatasetResync(name="steady"))
        await eventually(lambda: _async((root / "b.bin").exists()), timeout=10,
                         what="the new file in the running mount within 10 s of the resync")
        assert (await read_file(root / "b.bin")) == b"after the restart"
        assert mount_pids(root) == [pid]  # the same mount process, reconnected


async def _recreation_stage(settings: Settings, nats_server: NatsServer, seaweedfs: SeaweedServer,
                            ) -> tuple[str, ListingHold, CuttableProxy, Settings]:
    """For a dataset deleted and applied again unseen: another bucket holding ``new.bin``, a hold on listing it (so
    the new dataset stays unlisted, without a manifest, until released), and a proxy to NATS the test can cut, with
    the settings of a node that connects through it. The caller cuts the proxy at the end."""
    other = f"t-{uuid.uuid4().hex[:12]}"
    async with seaweedfs.client() as client:
        await client.create_bucket(Bucket=other)
    await put_objects(seaweedfs, other, {"new.bin": b"the new dataset's"})
    hold = ListingHold(held=lambda location: isinstance(location, S3Location) and location.bucket == other)
    proxy = CuttableProxy(nats_server.config.port)
    await proxy.start()
    proxied = dataclasses.replace(settings, nats=dataclasses.replace(settings.nats,
                                                                     urls=[f"nats://{LOOPBACK}:{proxy.port}"]))
    return other, hold, proxy, proxied


async def test_a_dataset_deleted_and_applied_again_while_the_mounts_watch_restarts_stops_serving_the_old_tree(
        bus: Bus, settings: Settings, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str,
        tmp_path: Path) -> None:
    # The node (agent, mount process, runtime service) reaches NATS through a proxy the test cuts, and the server
    # restarts meanwhile, so the watches' consumers are gone: back, each watch starts again and its replay shows only
    # the newest record of the name, the delete between never. The new dataset (another bucket) is not listed yet,
    # so it has no manifest: the mount served the deleted dataset's files under its name until it had one (the
    # agent keeps a mount no longer Bound for UNBOUND_GRACE_SECONDS, 30 s; for ever while the new one fails).
    await put_objects(seaweedfs, bucket, {"old.bin": b"the deleted dataset's"})
    other, hold, proxy, proxied = await _recreation_stage(settings, nats_server, seaweedfs)
    try:
        async with (running(lambda stop: dataset_app.run(settings, stop, opener=hold.opener)),
                    node_stack(bus, proxied, seaweedfs, tmp_path, dataset_service=False) as node):
            await node.apply("ds", bucket)
            root = await node.wait_mounted("ds", expect="old.bin")
            old = await node.record("ds")
            await proxy.cut()
            nats_server.restart()
            await eventually(lambda: _async(bus.nc.is_connected), what="the test's client reconnected")
            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="ds"))
            await node.apply("ds", other)
            await asyncio.wait_for(hold.started.wait(), 15)  # applied again, its listing held
            assert (await node.record("ds")).incarnation != old.incarnation
            await proxy.restore()
            await eventually(lambda: _async_not(asyncio.to_thread(os.path.exists, root / "old.bin")), timeout=10,
                             what="the deleted dataset's file gone from the mount point")
            hold.release.set()
            await node.wait_mounted("ds", expect="new.bin")
            assert await read_file(root / "new.bin") == b"the new dataset's"
            assert not await asyncio.to_thread(os.path.exists, root / "old.bin")
    finally:
        hold.release.set()
        await proxy.cut()


async def test_a_dataset_deleted_and_applied_again_unseen_while_its_mount_is_down_has_its_old_blocks_freed_at_once(
        bus: Bus, settings: Settings, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str,
        tmp_path: Path) -> None:
    # The mount process is down (killed, and it cannot come back: its manifest is gone), so nobody in it frees the
    # blocks. The dataset is deleted and applied again while the agent's watches restart (the node's NATS cut, the
    # server restarted): the agent's mirror shows only the new record, not Bound yet, never the delete. Taken as the
    # old dataset no longer Bound, its mount was kept for the unbound grace (30 s) and its blocks after it (the
    # dataset "still existing"); another incarnation is a delete, then an apply: the blocks go at once.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    other, hold, proxy, proxied = await _recreation_stage(settings, nats_server, seaweedfs)
    try:
        async with (running(lambda stop: dataset_app.run(settings, stop, opener=hold.opener)),
                    node_stack(bus, proxied, seaweedfs, tmp_path, dataset_service=False) as node):
            await node.apply("ds", bucket)
            root = await node.wait_mounted("ds", expect="d1.bin")
            for key in objects:
                await read_file(root / key)
            cache = node.cache_dir / "default" / "ds"
            await eventually(lambda: _async(len(block_files(cache)) >= 4), what="blocks on disk")
            old = await node.record("ds")
            await (await ManifestStore.of(bus)).delete(old.status.manifest)
            [pid] = mount_pids(root)
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: _async(not mount_pids(root)), what="the mount process gone")
            await proxy.cut()
            nats_server.restart()
            await eventually(lambda: _async(bus.nc.is_connected), what="the test's client reconnected")
            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="ds"))
            await node.apply("ds", other)
            await asyncio.wait_for(hold.started.wait(), 15)  # applied again, its listing held: not Bound
            assert (await node.record("ds")).incarnation != old.incarnation
            assert len(block_files(cache)) >= 4  # no process of the node saw the delete
            await proxy.restore()
            await eventually(lambda: _async(not block_files(cache)), timeout=15,
                             what="the old dataset's blocks freed, well inside the unbound grace")
            hold.release.set()
            await node.wait_mounted("ds", expect="new.bin")
            assert await read_file(root / "new.bin") == b"the new dataset's"
            assert not await asyncio.to_thread(os.path.exists, root / "d0.bin")
    finally:
        hold.release.set()
        await proxy.cut()


async def test_a_mount_process_stopped_while_it_loads_its_cache_ends_at_once_and_starts_clean_later(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # The cache holds two files whose open hangs (a disk that stopped answering), its index and a block file: the
    # index is let through after the SIGTERM, the block file never is, so a start that went on after the stop (to
    # serve, and scan the block files in the background) would hang there until killed.
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_bytes(b"a" * 5000)
    stalls = [StalledCacheFile(tmp_path / "cache" / "default" / "big", index) for index in range(2)]
    mountpoint, status = tmp_path / "mnt" / "default" / "big", tmp_path / "status.json"
    env = {**os.environ, "NATS_URL": ",".join(settings.nats.urls), "SHOAL_NODE_NAME": "node-a",
           "SHOAL_LOCAL_ROOTS": str(tmp_path), "SHOAL_HTTP_PORT": "off", "SHOAL_LOG_FORMAT": "json"}
    log = tmp_path / "mount.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "services.agent.mountd", "--namespace", "default", "--name", "big",
                 "--mountpoint", str(mountpoint), "--status-file", str(status)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)):
            await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("big", tmp_path / "cache"))
            await bus.publish(subjects.DATASET_APPLY, local_dataset("big", source))
            await eventually(lambda: _manifest_of(bus, "big"), what="big synced")
            processes.append(first := start())

            async def loading_cache() -> bool:
                current = read_status(str(status))
                return current is not None and current.starting == STARTING_CACHE

            await eventually(loading_cache, timeout=30, what=f"the cache being loaded; log: {log.read_text()[-2000:]}")
            first.send_signal(signal.SIGTERM)
            # The stop must have reached the scan before an open is let through, or the scan, not told yet, would
            # go on to the next stalled file.
            await eventually(lambda: _said(log, "stop requested while loading the cache"), timeout=30,
                             what="the stop noticed while the cache loads")
            released: list[bool] = []

            async def exited() -> bool:
                if not any(released):  # one stalled open let through, if the scan waits at one
                    released.append(any(stall.release() for stall in stalls))
                return first.poll() is not None

            await eventually(exited, timeout=30, what="the mount process gone after SIGTERM")
            assert first.returncode == 0, log.read_text()[-2000:]
            assert str(mountpoint) not in mounted_paths()
            assert not list(mountpoint.parent.glob(".big.staging-*"))  # no staging mount or folder left behind
            assert "stopped while starting, nothing mounted" in log.read_text()
            # The next start, once the disk answers again, finds nothing in its way and serves.
            for stall in stalls:
                stall.remove()
            processes.append(second := start())

            async def serving() -> bool:
                return str(mountpoint) in mounted_paths() and await asyncio.to_thread(os.path.exists,
                                                                                      mountpoint / "a.txt")

            await eventually(serving, timeout=30, what=f"the next start serving; log: {log.read_text()[-2000:]}")
            assert await read_file(mountpoint / "a.txt") == b"a" * 5000
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for stall in stalls:
            stall.release()
        if str(mountpoint) in mounted_paths():
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


async def _manifest_of(bus: Bus, name: str) -> str:
    record = await dataset_record(bus, name)
    return record.status.manifest if record else ""


async def _said(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text()


async def _mount_and_read_gone_and_kept(bus: Bus, bucket: str, cluster: Cluster, objects: dict[str, bytes],
                                        tier_path: Callable[[str], Path]) -> None:
    """Runtimes and S3 datasets "gone" and "kept" (an SSD tier at ``tier_path(name)``, 1 MiB blocks), mounted on
    node n1, every object read through both mounts so both caches hold blocks."""
    for name in ("gone", "kept"):
        level = Level(mediumtype="SSD", quota="256Mi", path=str(tier_path(name)), high="0.95", low="0.8")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name=name),
            spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]), block_size="1Mi"))))
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
            metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))
    for name in ("gone", "kept"):
        await cluster.wait_mounted(name, "d1.bin")
        for key in objects:
            await read_file(cluster.agents["n1"].mountpoint(name) / key)


async def test_a_runtime_applied_again_with_other_tiers_restarts_its_mount_with_them(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A user re-applies the runtime with a larger SSD tier. Before, the running mount process kept the tiers it
    started with: the runtime said 512 MiB while the node's capacity (and the dataset's, from its reports) stayed
    at 256 MiB until the process happened to restart. Now the agent restarts it at once with the new tiers."""
    await put_objects(seaweedfs, bucket, {"a.txt": b"a"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("tiers", bucket, ssd="256Mi")
        root = await node.wait_mounted("tiers", expect="a.txt")
        [pid] = mount_pids(root)

        async def capacity(expected: int) -> bool:
            beat = await last_beat(bus)
            return beat is not None and beat.capacity_bytes == expected

        await eventually(lambda: capacity(256 * 2**20), what="the node's capacity from the first tiers")
        await node.apply("tiers", bucket, ssd="512Mi")
        await eventually(lambda: capacity(512 * 2**20), timeout=30, what="the node's capacity from the new tiers")
        [restarted] = mount_pids(root)
        assert restarted != pid and not os.path.exists(f"/proc/{pid}")
        assert await read_file(root / "a.txt") == b"a"


async def test_blocks_in_a_tier_directory_the_runtime_dropped_are_freed_once_the_mount_runs_on_the_new_tiers(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A user moves a runtime's SSD tier to another directory. Before, the agent restarted the mount on the new
    tiers and its blocks in the old directory stayed on disk for ever, in nobody's quota. Now they are freed once
    the mount is up on the new tiers, and the bytes are logged; another dataset's blocks in the same directory
    stay, and a directory that comes back is a fresh tier (its old blocks were freed) whose blocks are used."""
    data = os.urandom(3 * 2**20)  # three 1 MiB blocks
    await put_objects(seaweedfs, bucket, {"a.bin": data})
    old, new = tmp_path / "old-tier", tmp_path / "new-tier"

    async def apply(name: str, directory: Path) -> None:
        level = Level(mediumtype="SSD", quota="64Mi", path=str(directory), high="0.95", low="0.8")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name=name), spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]),
                                                             block_size="1Mi"))))

    async def cached(directory: Path) -> bool:
        return len(block_files(directory)) == 3

    async def freed(logs: list[MutableMapping[str, Any]], count: int) -> list[MutableMapping[str, Any]] | None:
        lines = [line for line in logs if line["event"] == "blocks of a tier the runtime no longer names freed"]
        return lines if len(lines) == count else None

    with structlog.testing.capture_logs() as logs:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            for name in ("moved", "neighbour"):
                await apply(name, old)
                await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                    metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))
            for name in ("moved", "neighbour"):
                root = await node.wait_mounted(name, expect="a.bin")
                assert await read_file(root / "a.bin") == data
                await eventually(lambda: cached(old / "default" / name), what=f"{name}'s blocks on disk")  # noqa: B023
            root = node.mountpoint("moved")
            [pid] = mount_pids(root)

            await apply("moved", new)
            lines = await eventually(lambda: freed(logs, 1), timeout=30, what="the old tier's blocks freed")
            assert [(line["folder"], line["blocks"], line["freed_bytes"]) for line in lines] == [
                (str(old / "default" / "moved"), 3, len(data))]
            assert not (old / "default" / "moved").exists()
            [restarted] = mount_pids(root)
            assert restarted != pid
            assert len(block_files(old / "default" / "neighbour")) == 3, "another dataset's blocks there stay"
            assert await read_file(root / "a.bin") == data
            await eventually(lambda: cached(new / "default" / "moved"), what="the blocks cached in the new tier")

            await apply("moved", old)  # the directory comes back: a fresh tier there, the new one freed in turn
            lines = await eventually(lambda: freed(logs, 2), timeout=30, what="the second change's dropped tier freed")
            assert lines[1]["folder"] == str(new / "default" / "moved")
            assert await read_file(root / "a.bin") == data
            await eventually(lambda: cached(old / "default" / "moved"), what="the blocks cached again where they were")
            assert len(block_files(old / "default" / "neighbour")) == 3


async def test_blocks_in_a_tier_directory_dropped_while_the_agent_was_down_are_freed_when_it_mounts_again(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The runtime's tier moves while no agent runs to see the change: the agent wrote down the tiers its mount
    # started with (in its mount root), so, back, it frees the blocks in the directory the runtime dropped once the
    # mount is up on the new one. Another dataset's cache, in a directory of its own, stays.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"n1": {}}) as cluster:
        caches = await _gone_and_kept_cached_in_own_tiers(bus, bucket, cluster, objects)
        await cluster.stop_agent("n1")
        level = Level(mediumtype="SSD", quota="256Mi", path=str(cluster.cache_dir / "moved"), high="0.95", low="0.8")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name="kept"), spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]),
                                                               block_size="1Mi"))))

        async def moved() -> bool:
            record = await runtime_record(bus, "kept")
            return record is not None and record.runtime.spec.tieredstore.levels == [level]

        await eventually(moved, what="the runtime's tier moved")
        cluster.start_agent("n1")
        await eventually(lambda: _async(not caches["kept"].exists()), timeout=30,
                         what="the agent back, freeing the blocks of the directory the runtime dropped")
        await cluster.wait_mounted("kept", "d1.bin")
        assert await read_file(cluster.agents["n1"].mountpoint("kept") / "d1.bin") == objects["d1.bin"]
        assert len(block_files(caches["gone"])) >= 4


async def _kept_moved_to_a_tier_and_agent_stopped(bus: Bus, cluster: Cluster, moved: Path) -> Path:
    """Runtime "kept" applied again with its tier in ``moved`` (a stalled cache file there holds its new mount
    process at start); returns the agent's ledger once the agent wrote the new tier down (it does just before it
    starts the mount process on it) and was stopped."""
    level = Level(mediumtype="SSD", quota="256Mi", path=str(moved), high="0.95", low="0.8")
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
        metadata=ObjectMeta(name="kept"), spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]),
                                                           block_size="1Mi"))))
    ledger = cluster.agents["n1"].mount_root / LEDGER_FILE_NAME

    async def started_on_the_new_tier() -> bool:
        return ledger.exists() and str(moved) in ledger.read_text()

    await eventually(started_on_the_new_tier, what="the mount process started on the new tier")
    await cluster.stop_agent("n1")
    return ledger


async def test_blocks_of_a_dropped_tier_are_freed_when_the_agent_restarts_before_the_new_mount_is_up(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The agent sees the runtime's tier move and starts the mount on the new tier, but is restarted before that
    # mount is up (its start hangs reading the new tier's index, as on a slow disk). It had written down only the new
    # tier then, so, back, it did not know the old directory held the dataset's blocks: they stayed for ever. The tiers
    # waiting to be freed are written down too, and freed once the mount runs on the new tier.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"n1": {}}) as cluster:
        caches = await _gone_and_kept_cached_in_own_tiers(bus, bucket, cluster, objects)
        moved = cluster.cache_dir / "moved"
        stall = StalledCacheFile(moved / "n1" / "default" / "kept")
        try:
            await _kept_moved_to_a_tier_and_agent_stopped(bus, cluster, moved)
            assert len(block_files(caches["kept"])) >= 4  # never mounted on the new tier: nothing freed yet
            stall.remove()
            cluster.start_agent("n1")
            await cluster.wait_mounted("kept", "d1.bin")
            await eventually(lambda: _async(not caches["kept"].exists()), timeout=30,
                             what="the agent back, freeing the blocks of the directory the runtime dropped")
            assert await read_file(cluster.agents["n1"].mountpoint("kept") / "d1.bin") == objects["d1.bin"]
            assert len(block_files(caches["gone"])) >= 4
        finally:
            stall.release()
            stall.remove()


# The variants past the first take ~16 s each on 2 cores: run by `make soak`, with the first one in `make test`.
VARIANT_IN_SOAK = pytest.mark.soak("a variant of a ~16 s mount-lifecycle test; its first case runs in make test")


@pytest.mark.parametrize("case", ["new-folder-made", pytest.param("new-folder-never-made", marks=VARIANT_IN_SOAK),
                                  pytest.param("runtime-deleted-first", marks=VARIANT_IN_SOAK)])
async def test_blocks_of_a_dropped_tier_are_freed_when_the_dataset_is_deleted_before_the_new_mount_is_up(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path, case: str) -> None:
    # As above, but the dataset is deleted while the agent is down. Back, the agent freed the deleted dataset's
    # cache in the tiers its mount was last started with, and forgot it with the tiers waiting to be freed: the
    # blocks in the directory the runtime dropped stayed for ever; and when the new tier held no cache folder yet
    # (the process died before making it) the dataset was not even found. The same when only the runtime went while
    # the agent was down (the dataset's cache is kept for it) and the dataset is deleted once the agent is back.
    objects = {f"d{i}.bin": os.urandom(1_500_000) for i in range(2)}
    await put_objects(seaweedfs, bucket, objects)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"n1": {}}) as cluster:
        caches = await _gone_and_kept_cached_in_own_tiers(bus, bucket, cluster, objects)
        moved = cluster.cache_dir / "moved"
        new_cache = moved / "n1" / "default" / "kept"
        stall = StalledCacheFile(new_cache)
        try:
            ledger = await _kept_moved_to_a_tier_and_agent_stopped(bus, cluster, moved)
            stall.remove()
            if case == "new-folder-never-made":
                shutil.rmtree(new_cache)
            if case == "runtime-deleted-first":
                await bus.publish(subjects.RUNTIME_DELETE, RuntimeDelete(name="kept"))
                await eventually(lambda: _async_not(runtime_record(bus, "kept")), what="the runtime deleted")
                cluster.start_agent("n1")
                await cluster.wait_mounted("gone", "d1.bin")
                assert len(block_files(caches["kept"])) >= 4  # the dataset may be bound again: kept meanwhile
            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="kept"))
            await eventually(lambda: _async_not(dataset_record(bus, "kept")), what="the dataset deleted")
            if case != "runtime-deleted-first":
                assert len(block_files(caches["kept"])) >= 4  # no process of the node was there to free them
                cluster.start_agent("n1")

            async def freed() -> bool:
                names = {entry["name"] for entry in msgspec.json.decode(ledger.read_bytes())["caches"]}
                return not caches["kept"].exists() and not new_cache.exists() and "kept" not in names

            await eventually(freed, timeout=30,
                             what="the agent back, freeing the blocks of the deleted dataset's dropped tier")
            await cluster.wait_mounted("gone", "d1.bin")
            assert len(block_files(caches["gone"])) >= 4
        finally:
            stall.release()
            stall.remove()
