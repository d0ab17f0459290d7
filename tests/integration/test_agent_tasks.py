"""The agent side of DataLoad and DataClean (issue 9): a mount process executes the ``NodeTask`` parts published to
it, on a real nats-server, SeaweedFS behind a counting HTTP proxy (every store GET is seen), the dataset and runtime
services and the node agent in-process, and the agent's real mount process with its real FUSE mount.

The tests play the loader: they write the operation's record (Executing at run 1) into KV ``shoal_operations``,
publish parts by hand on ``subjects.node_task`` and read ``TaskProgress`` from ``subjects.task_progress``.

Shown: a load caches exactly its blocks (inventory snapshot), each fetched once, and a read through the mount then
makes no store GET; a second load skips what is cached and fails blocks of objects the manifest does not have (or
has at another version) with a message, and loads again the blocks whose files were deleted under the running
mount; a clean frees the bytes (``cachedBytes`` drops) of the blocks named, of
whole files, then of everything; a part whose run is not current is skipped; ``TaskCancel`` ends a running part
at once ("cancelled") and nothing more is fetched for it; a mount process killed (SIGKILL) or stopped (SIGTERM) in
the middle of a part gets it again after its restart, skips the blocks it cached before and fetches each of the
others once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from libs import subjects
from libs.blocks import block_count, block_span
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.events.agent import CachedFile, InventoryRequest
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import DatasetDelete, ManifestEntry
from libs.events.operation import (
    DataLoadSpec,
    DatasetRef,
    MovedParts,
    NodeTask,
    OperationRecord,
    OperationStatus,
    TaskAction,
    TaskCancel,
    TaskProgress,
)
from libs.manifest import ManifestStore
from services.agent import tasks
from tests.conftest import SeaweedServer, put_objects
from tests.faults import HttpProxy
from tests.helpers import dataset_record, eventually, json_lines
from tests.integration.agent_stack import (
    NODE,
    InventoryWatch,
    Node,
    md5,
    mount_pids,
    node_stack,
    read_file,
    scrape,
    series,
    target_port,
)

pytestmark = pytest.mark.needs("fuse")

MiB = 1024 * 1024
BLOCK = MiB
NAME = "warm"
OBJECTS = {
    "data/a.bin": os.urandom(3 * MiB + 100),
    "data/b.bin": os.urandom(2 * MiB + 5),
    "c.bin": os.urandom(MiB),
}


class PassingProxy(HttpProxy):
    """The counting proxy, letting ``passes`` ranged GETs through before ``hold()`` holds the others."""

    passes = 0

    async def _pass_gate(self) -> None:
        if self.passes > 0:
            self.passes -= 1
            return
        await super()._pass_gate()


@dataclass
class Loader:
    """The test's stand-in for the loader: operation records, parts, and the progress they report."""

    bus: Bus
    node: Node
    store: PassingProxy
    bucket: str
    entries: dict[str, ManifestEntry]
    progress: list[TaskProgress] = field(default_factory=list)
    inventory: InventoryWatch = field(default_factory=InventoryWatch)

    async def operation(self, op: str, *, runs: int = 1, phase: str = "Executing") -> str:
        """Write DataLoad ``op``'s record at ``runs`` and ``phase``; returns the id of that run."""
        key = subjects.operation_key("DataLoad", "default", op)
        record = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name=op),
                                 load=DataLoadSpec(dataset=DatasetRef(name=NAME)),
                                 status=OperationStatus(phase=phase, runs=runs))  # type: ignore[arg-type]
        await (await self.bus.kv(subjects.KV_OPERATIONS)).put(key, msgspec.json.encode(record))
        return f"{key}.{runs}"

    def blocks(self, key: str, indices: list[int] | None = None, etag: str | None = None) -> CachedFile:
        entry = self.entries[key]
        chosen = range(block_count(entry.size, BLOCK)) if indices is None else indices
        return CachedFile(entry.mount, key, etag or entry.etag,
                          [(i, block_span(entry.size, BLOCK, i)[1]) for i in chosen])

    async def incarnation(self) -> str:
        """The life of the dataset its record shows now (its parts' subject and its mount's durable are that life's)."""
        return (await self.node.record(NAME)).incarnation

    async def publish(self, run: str, action: TaskAction, blocks: list[CachedFile], part: int = 0,
                      incarnation: str | None = None, **extra: Any) -> None:
        """A part of ``run`` on the subject of the dataset's ``incarnation`` (None: the one its record shows)."""
        task = NodeTask(id=f"{run}.{part}", run=run, part=part, parts=part + 1, node=NODE,
                        dataset=ObjectRef(name=NAME), action=action, blocks=blocks, **extra)
        life = await self.incarnation() if incarnation is None else incarnation
        await self.bus.publish(subjects.node_task(NODE, "default", NAME, life), task)

    async def durable(self) -> str:
        return subjects.task_durable(NODE, "default", NAME, await self.incarnation())

    async def final(self, run: str, part: int = 0, timeout: float = 20.0) -> TaskProgress:
        async def probe() -> TaskProgress | None:
            done = [p for p in self.progress if p.run == run and p.part == part and p.done]
            return done[-1] if done else None

        return await eventually(probe, timeout, f"the final progress of {run}.{part}")

    async def snapshot(self) -> dict[str, Any]:
        """A fresh inventory snapshot of the mount (asked for now, so it holds every block cached so far)."""
        before = len(self.inventory.events)
        await self.bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=NODE,
                                                                               dataset=ObjectRef(name=NAME)))

        async def fresh() -> dict[str, Any] | None:
            events = [e for e in self.inventory.events[before:] if e["type"] == "agent.inventory.snapshot.v2"]
            return events[-1] if events else None

        return await eventually(fresh, what="an inventory snapshot on request")

    def gets(self, since: int = 0) -> list[tuple[str, str]]:
        return [(call.path.split(f"/{self.bucket}/", 1)[1], call.range or "")
                for call in self.store.ranged_gets()[since:]]


def cached(snapshot: dict[str, Any]) -> set[tuple[str, int]]:
    return {(key, index) for _, key, _, blocks in snapshot["files"] for index, _ in blocks}


def ranges(file: CachedFile, entry: ManifestEntry) -> list[tuple[str, str]]:
    """The store GETs that fetch ``file``'s blocks, as the proxy sees them."""
    spans = [block_span(entry.size, BLOCK, index) for index, _ in file.blocks]
    return [(file.key, f"bytes={start}-{start + length - 1}") for start, length in spans]


def size(file: CachedFile) -> int:
    return sum(length for _, length in file.blocks)


@asynccontextmanager
async def loader_stack(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
                       max_deliver: int | None = None, task_stream: bool = True,
                       **agent_options: Any) -> AsyncIterator[Loader]:
    """``max_deliver``: the mount's durable is changed to this ``max_deliver`` once the mount process made it (a
    process started after uses the durable it finds as it is, as after a change of ``tasks.MAX_DELIVER``; the durable
    is the dataset's life's, named once the dataset is applied). ``task_stream``: the node's task stream is made
    before the mount process starts (otherwise the test makes it)."""
    await put_objects(seaweedfs, bucket, OBJECTS)
    if task_stream or max_deliver is not None:
        await bus.provision_node_tasks(NODE)  # what the loader does before the node's first part
    store = PassingProxy(seaweedfs.endpoint)
    await store.start()
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path, **agent_options) as node:
            await node.apply(NAME, bucket, endpoint=store.endpoint)
            await node.wait_mounted(NAME, expect="data/b.bin")
            record = await node.record(NAME)
            entries = await (await ManifestStore.of(bus)).load(record.status.manifest)
            loader = Loader(bus, node, store, bucket, {entry.key: entry for entry in entries})
            if max_deliver is not None:
                stream, durable = subjects.task_stream(NODE), await loader.durable()

                async def made() -> js_api.ConsumerInfo | None:
                    with contextlib.suppress(NotFoundError):
                        return await bus.js.consumer_info(stream, durable)
                    return None

                info = await eventually(made, what="the mount's task durable")
                await bus.js.add_consumer(stream, dataclasses.replace(info.config, max_deliver=max_deliver))

            async def collect(msg: Any) -> None:
                loader.progress.append(msgspec.json.decode(msg.data, type=TaskProgress))

            subscription = await bus.nc.subscribe(subjects.task_progress(NODE), cb=collect)
            await loader.inventory.start(bus)
            try:
                yield loader
            finally:
                store.release()
                await subscription.unsubscribe()
    finally:
        store.release()
        await store.stop()


async def test_a_load_caches_exactly_its_blocks_and_the_next_read_makes_no_store_get(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path,
                            prometheus_targets_dir=str(tmp_path / "targets")) as loader:
        run = await loader.operation("first")
        a, b0 = loader.blocks("data/a.bin"), loader.blocks("data/b.bin", [0])
        await loader.publish(run, "load", [a, b0])
        final = await loader.final(run)
        assert (final.done, final.failed, final.message) == (True, 0, "")
        assert (final.blocks_done, final.bytes_done, final.bytes_skipped) == (5, size(a) + size(b0), 0)
        assert final.files_done == [0, 1]
        entries = loader.entries
        expected = ranges(a, entries["data/a.bin"]) + ranges(b0, entries["data/b.bin"])
        assert sorted(loader.gets()) == sorted(expected), "each block of the load fetched once, nothing else"
        assert cached(await loader.snapshot()) == {("data/a.bin", i) for i in range(4)} | {("data/b.bin", 0)}

        # Read through the mount: every block is in the cache, the store is not asked.
        root = loader.node.mountpoint(NAME)
        assert md5(await read_file(root / "data/a.bin")) == md5(OBJECTS["data/a.bin"])
        assert len(loader.gets()) == len(expected)

        # Run 2 of the same operation: what is cached is skipped; an object the manifest does not have, or has at
        # another version, fails its blocks with a message; the rest is fetched once.
        run2 = await loader.operation("first", runs=2)
        b, c = loader.blocks("data/b.bin"), loader.blocks("c.bin")
        gone = CachedFile(0, "data/gone.bin", "0" * 32, [(0, 100)])
        stale = loader.blocks("c.bin", etag="f" * 32)
        await loader.publish(run2, "load", [a, b, gone, stale, c])
        second = await loader.final(run2)
        assert second.done and second.failed == 2
        # The first failure's reason: an object the manifest has no more left the dataset (it did not change).
        assert "data/gone.bin" in second.message and "left the dataset since the load was planned" in second.message
        assert second.bytes_skipped == size(a) + size(b0)
        assert second.bytes_done == size(b) - size(b0) + size(c)
        assert second.files_done == [0, 1, 4]  # not the failed ones
        assert second.blocks_done == 4 + 3 + 1
        expected += ranges(loader.blocks("data/b.bin", [1, 2]), entries["data/b.bin"])
        expected += ranges(c, entries["c.bin"])
        assert sorted(loader.gets()) == sorted(expected)
        # The mount process's /metrics counts the bytes loads fetched (not those skipped).
        port = target_port(tmp_path / "targets", NAME)
        assert port is not None
        warmed = series(await scrape(port), "shoal_warmup_bytes_total", node=NODE, dataset=f"default/{NAME}")
        assert warmed == final.bytes_done + second.bytes_done


async def test_a_load_fetches_again_the_blocks_whose_files_were_deleted_under_the_running_mount(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The cache's index learns that a block file went only when the block is read: a load after the files were
    # deleted (a person freeing room, a cleaner of old files) took every block for cached, skipped them all and
    # ended done, the disk empty.
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path) as loader:
        run = await loader.operation("first")
        a = loader.blocks("data/a.bin")
        await loader.publish(run, "load", [a])
        assert (await loader.final(run)).bytes_done == size(a)
        files = [f for f in loader.node.cache_dir.rglob("*") if f.is_file() and not f.name.startswith(".")]
        assert len(files) == 4
        for file in files:
            file.unlink()
        run2 = await loader.operation("first", runs=2)
        await loader.publish(run2, "load", [a])
        second = await loader.final(run2)
        assert (second.failed, second.bytes_done, second.bytes_skipped) == (0, size(a), 0)
        assert sorted(loader.gets()) == sorted(ranges(a, loader.entries["data/a.bin"]) * 2)
        assert all(file.exists() for file in files)
        root = loader.node.mountpoint(NAME)
        assert md5(await read_file(root / "data/a.bin")) == md5(OBJECTS["data/a.bin"])
        assert len(loader.gets()) == 8, "read from the blocks loaded again"


async def test_a_mount_started_before_its_nodes_task_stream_gets_the_first_part(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The loader makes a node's task stream before the node's first part: a mount serving already waits for it,
    and looks again as soon as the server announces the stream (its poll, ``tasks.STREAM_WAIT_SECONDS``, is for a
    missed announcement: the part arrives well before it)."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, task_stream=False) as loader:
        with pytest.raises(NotFoundError):
            await bus.js.stream_info(subjects.task_stream(NODE))
        await bus.provision_node_tasks(NODE)
        run = await loader.operation("first")
        a = loader.blocks("data/a.bin")
        await loader.publish(run, "load", [a])
        final = await loader.final(run, timeout=tasks.STREAM_WAIT_SECONDS / 3)
        assert (final.done, final.failed, final.blocks_done) == (True, 0, len(a.blocks))


async def test_a_clean_frees_the_bytes_of_blocks_files_and_everything(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path) as loader:
        everything = [loader.blocks(key) for key in OBJECTS]
        total = sum(size(file) for file in everything)
        run = await loader.operation("load")
        await loader.publish(run, "load", everything)
        assert (await loader.final(run)).bytes_done == total
        assert (await loader.snapshot())["counters"]["cachedBytes"] == total

        clean = await loader.operation("clean")
        a = loader.blocks("data/a.bin")
        await loader.publish(clean, "clean", [], files=[(0, "data/a.bin")])
        freed = await loader.final(clean)
        assert (freed.bytes_done, freed.failed) == (size(a), 0)
        snapshot = await loader.snapshot()
        assert snapshot["counters"]["cachedBytes"] == total - size(a)
        assert not any(key == "data/a.bin" for key, _ in cached(snapshot))

        # Blocks named: cached ones are freed, the others skipped (nothing to free).
        named = await loader.operation("named")
        b0 = loader.blocks("data/b.bin", [0])
        await loader.publish(named, "clean", [b0, loader.blocks("data/a.bin", [0])])
        result = await loader.final(named)
        assert (result.bytes_done, result.bytes_skipped, result.files_done) == (size(b0), BLOCK, [0, 1])
        everything_run = await loader.operation("all")
        await loader.publish(everything_run, "clean", [], everything=True)
        rest = await loader.final(everything_run)
        assert rest.bytes_done == total - size(a) - size(b0)
        assert (await loader.snapshot())["counters"]["cachedBytes"] == 0

        # A read after the clean goes to the store again.
        gets = len(loader.gets())
        root = loader.node.mountpoint(NAME)
        assert md5(await read_file(root / "c.bin")) == md5(OBJECTS["c.bin"])
        assert len(loader.gets()) == gets + 1


async def test_a_part_whose_run_is_not_current_is_skipped(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path) as loader:
        finished = await loader.operation("finished", phase="Complete")
        superseded = (await loader.operation("moved-on", runs=3)).rsplit(".", 1)[0] + ".2"
        deleted = subjects.operation_key("DataLoad", "default", "deleted") + ".1"
        for run in (finished, superseded, deleted):
            await loader.publish(run, "load", [loader.blocks("data/a.bin")])
        current = await loader.operation("current")
        await loader.publish(current, "load", [loader.blocks("c.bin")])
        # Parts run one at a time in order: once the current one is done, the others were looked at.
        assert (await loader.final(current)).bytes_done == MiB
        assert {p.run for p in loader.progress} == {current}
        assert [key for key, _ in loader.gets()] == ["c.bin"]
        # The run's record as the loader left it: the agent writes nothing there.
        record, _ = await kv_load(await bus.kv(subjects.KV_OPERATIONS), current.rsplit(".", 1)[0], OperationRecord)
        assert record is not None and record.status.phase == "Executing"


async def test_a_dataset_deleted_and_applied_again_is_delivered_its_new_parts_and_none_of_its_old_life(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A dataset's parts were all on one subject, and its durable delivered all of them once made: the parts of a
    deleted life still in the node's task stream (kept a day) that no durable had taken (published after its mount
    process stopped, by a loader that had not seen the delete yet) came again to the new life's mount, each skipped
    only after a KV read; and the deleted life's durable stayed on the server for a day. Now parts and durables are
    per life: the deleted life's durable goes with its mount, and the new life's mount gets the part the loader
    published for it before the mount process started, and none of the old life's."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path) as loader:
        old = await loader.operation("old")
        old_life, old_durable = await loader.incarnation(), await loader.durable()
        await loader.publish(old, "load", [loader.blocks("c.bin")], part=0)
        await loader.final(old, part=0)
        await loader.operation("old", phase="Failed")  # as the loader fails a run whose dataset is deleted
        mountpoint = loader.node.mountpoint(NAME)
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name=NAME))

        async def stopped() -> bool:
            return not mount_pids(mountpoint)

        await eventually(stopped, timeout=30, what="the deleted dataset's mount process ended")
        with pytest.raises(NotFoundError):  # it went with its mount, not a day later
            await bus.js.consumer_info(subjects.task_stream(NODE), old_durable)
        for part in range(1, 4):  # no mount takes these: the loader planned them before it saw the delete
            await loader.publish(old, "load", [loader.blocks("c.bin")], part=part, incarnation=old_life)
        capfd.readouterr()  # the old life's output
        new = await loader.operation("new")
        await loader.node.apply(NAME, bucket, endpoint=loader.store.endpoint)

        async def new_life() -> str | None:
            record = await dataset_record(bus, NAME)
            return record.incarnation if record is not None and record.incarnation != old_life else None

        await eventually(new_life, what="the dataset's new life")
        await loader.publish(new, "load", [loader.blocks("c.bin")])  # before the new life's mount process starts
        await loader.node.wait_mounted(NAME, expect="data/b.bin")
        final = await loader.final(new)
        events = json_lines(capfd.readouterr().err)
    assert (final.failed, final.bytes_done, final.bytes_skipped) == (0, MiB, 0), final  # its cache went with it
    replayed = [line for line in events if line.get("event") == "part skipped: its run is not current"]
    assert len(replayed) == 0, f"{len(replayed)} parts of the deleted life delivered again: {replayed}"


async def test_task_cancel_stops_a_running_part(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as loader:
        run = await loader.operation("cancelled")
        loader.store.hold()
        await loader.publish(run, "load", [loader.blocks("data/a.bin"), loader.blocks("data/b.bin")])

        async def two_waiting() -> bool:
            return loader.store.waiting == 2

        await eventually(two_waiting, what="two block GETs in flight (SHOAL_LOAD_CONCURRENCY=2)")
        await bus.publish_core(subjects.TASK_CANCEL, TaskCancel(run=run))
        final = await loader.final(run)  # while both GETs are still held: the part does not wait for them
        assert (final.done, final.message, final.blocks_done) == (True, "cancelled", 0)
        loader.store.release()

        # Once a later part is done, the cancelled one has certainly stopped: only its two GETs reached the store.
        later = await loader.operation("later")
        await loader.publish(later, "load", [loader.blocks("c.bin")])
        assert (await loader.final(later)).bytes_done == MiB
        assert len(loader.gets()) == 3


async def test_a_part_moved_off_the_node_whose_parts_cancel_was_missed_stops_at_its_next_check(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The loader moved this node's part to the ring (the node was scaled in) and its ``TaskPartsCancel``, a plain
    NATS message, never reached the mount process: the part fetched on to its last block into a cache no reader asks,
    the run being current all along. Now the record names the moved part (``movedParts``), and the part stops as
    cancelled at its next look at the record (``CURRENT_CHECK_SECONDS``); the run's other parts still run here."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as loader:
        run = await loader.operation("scaled")
        loader.store.hold()
        await loader.publish(run, "load", [loader.blocks("data/a.bin"), loader.blocks("data/b.bin")], part=0)

        async def two_waiting() -> bool:
            return loader.store.waiting == 2

        await eventually(two_waiting, what="two block GETs in flight (SHOAL_LOAD_CONCURRENCY=2)")
        key = run.rsplit(".", 1)[0]
        kv = await bus.kv(subjects.KV_OPERATIONS)
        record, revision = await kv_load(kv, key, OperationRecord)
        assert record is not None
        await kv.update(key, msgspec.json.encode(msgspec.structs.replace(
            record, moved_parts=[MovedParts(run=run, node="another-node", parts=[0]),
                                 MovedParts(run=run, node=NODE, parts=[0])])), revision)
        final = await loader.final(run, timeout=4 * tasks.CURRENT_CHECK_SECONDS)  # the GETs still held
        assert (final.done, final.message, final.blocks_done) == (True, "cancelled", 0)
        loader.store.release()
        # A later part of the same run is not moved: it runs, and once it is done the moved one certainly stopped.
        await loader.publish(run, "load", [loader.blocks("c.bin")], part=1)
        assert (await loader.final(run, part=1)).bytes_done == MiB
        assert len(loader.gets()) == 3, loader.gets()


@pytest.mark.parametrize(("stop_signal", "kept"), [(signal.SIGKILL, 3), (signal.SIGTERM, 4)], ids=["kill", "term"])
async def test_a_stopped_mount_process_resumes_its_part_and_fetches_each_block_once(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        stop_signal: signal.Signals, kept: int) -> None:
    """SIGKILL: the block whose GET the kill cut is fetched again by the next process, nothing else is. SIGTERM:
    the process stops between blocks, lets the block in flight land in the cache, and gives the part back."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=1) as loader:
        run = await loader.operation("resumed")
        files = [loader.blocks("data/a.bin"), loader.blocks("data/b.bin")]
        loader.store.passes = 3  # three blocks fetched and cached, the fourth held
        loader.store.hold()
        await loader.publish(run, "load", files)

        async def three_done() -> TaskProgress | None:
            return next((p for p in loader.progress if p.run == run and p.blocks_done == 3), None)

        midway = await eventually(three_done, what="progress of three blocks")
        assert not midway.done and midway.bytes_done == 3 * BLOCK
        assert loader.store.waiting == 1
        before = set(loader.gets())
        root = loader.node.mountpoint(NAME)
        (pid,) = mount_pids(root)
        os.kill(pid, stop_signal)
        killed_at = len(loader.gets())
        loader.store.release()

        final = await loader.final(run, timeout=40)
        assert (final.failed, final.blocks_done) == (0, 7)
        sizes = [length for f in files for _, length in f.blocks]
        assert final.bytes_skipped == sum(sizes[:kept])
        assert final.bytes_done == sum(sizes[kept:])
        entries = loader.entries
        every = ranges(files[0], entries["data/a.bin"]) + ranges(files[1], entries["data/b.bin"])
        after = loader.gets(killed_at)
        # The blocks cached before the restart are not fetched again; every other block once.
        assert sorted(after) == sorted(every[kept:])
        assert len(before) == 4 and set(every[:3]) < before
        assert mount_pids(root) != [pid]
        assert cached(await loader.snapshot()) == {(f.key, i) for f in files for i, _ in f.blocks}


async def test_a_part_on_its_last_delivery_is_given_up_and_reported_failed(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The server delivers a part ``max_deliver`` times (2 here, 20 by default), then no more: a part whose mount
    process is killed on it every time would leave its run Executing for ever, the node still ready. On its last
    delivery the restarted process does not execute it (the store still holds every GET: executing, it would hang
    there too) but reports it done, saying it was delivered 2 times without finishing: the block the first delivery
    cached is done (found in the cache), every other block failed."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, max_deliver=2, load_concurrency=1) as loader:
        run = await loader.operation("doomed")
        files = [loader.blocks("data/a.bin"), loader.blocks("data/b.bin")]
        loader.store.passes = 1
        loader.store.hold()
        await loader.publish(run, "load", files)

        async def one_done() -> TaskProgress | None:
            return next((p for p in loader.progress if p.run == run and p.blocks_done == 1), None)

        await eventually(one_done, what="progress of one block")
        await eventually(lambda: _true(loader.store.waiting == 1), what="the second block's GET held")
        root = loader.node.mountpoint(NAME)
        (pid,) = mount_pids(root)
        os.kill(pid, signal.SIGKILL)
        held = len(loader.gets())
        final = await loader.final(run, timeout=40)
        assert (final.done, final.failed, final.blocks_done, final.files_done) == (True, 6, 1, [])
        assert (final.bytes_done, final.bytes_skipped) == (0, files[0].blocks[0][1])
        assert final.message == (f"part 0 of run {run} was delivered 2 times without finishing (the mount process "
                                 f"stopped or crashed during each); given up: run the operation again")
        assert len(loader.gets()) == held, "the given-up delivery fetched nothing"


async def _true(result: bool) -> bool:
    return result


REPORT_NOT_PUBLISHED = ("final progress not published, trying again", "final progress not published, part given back",
                        "part given up, its final progress not published")


async def stored_progress(bus: Bus, run: str) -> list[TaskProgress]:
    """The ``TaskProgress`` of ``run`` the progress stream holds (what the loader would read), in order."""
    sub = await bus.js.pull_subscribe(subjects.task_progress(NODE), stream=subjects.STREAM_TASKS,
                                      config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL,
                                                                   ack_policy=js_api.AckPolicy.NONE))
    found: list[TaskProgress] = []
    try:
        while (await sub.consumer_info()).num_pending:
            for message in await sub.fetch(100, timeout=5):
                found.append(msgspec.json.decode(message.data, type=TaskProgress))
    finally:
        await sub.unsubscribe()
    return [progress for progress in found if progress.run == run]


async def test_a_final_report_the_stream_refuses_is_published_again_until_it_is_taken(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The progress stream refuses every report for a while as a part ends (full, discarding new messages, as when
    its storage is short; a NATS outage or a publish without acknowledgement fail the same publish). The mount
    process keeps its finished part and publishes the same final report again, with backoff, until the stream takes
    it: the stream holds one final report, with the blocks counted once, as fetched; the part is acknowledged,
    neither run again nor given up as failed after ``max_deliver`` (3 here) deliveries."""
    async with loader_stack(bus, settings, seaweedfs, bucket, tmp_path, max_deliver=3) as loader:
        run = await loader.operation("refused")
        file = loader.blocks("data/a.bin")
        await bus.publish(subjects.task_progress(NODE), TaskProgress(id="before", run="other.1", part=0, node=NODE))
        info = await bus.js.stream_info(subjects.STREAM_TASKS)
        config = info.config
        await bus.js.update_stream(dataclasses.replace(config, max_msgs=info.state.messages,
                                                       discard=js_api.DiscardPolicy.NEW))
        output: list[str] = []
        try:
            await loader.publish(run, "load", [file])

            async def refused() -> bool:
                output.append(capfd.readouterr().err)
                events = [line.get("event") for line in json_lines("".join(output))]
                return sum(event in REPORT_NOT_PUBLISHED for event in events) >= 3

            await eventually(refused, timeout=60, what="the final report refused three times")
        finally:
            await bus.js.update_stream(config)

        async def reported() -> list[TaskProgress] | None:
            finals = [progress for progress in await stored_progress(bus, run) if progress.done]
            return finals or None

        finals = await eventually(reported, timeout=30, what="the final report in the stream")

        async def acknowledged() -> bool:
            info = await bus.js.consumer_info(subjects.task_stream(NODE), await loader.durable())
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(acknowledged, what="the part acknowledged")
        consumer = await bus.js.consumer_info(subjects.task_stream(NODE), await loader.durable())
    [final] = finals
    assert (final.failed, final.blocks_done, final.bytes_done, final.bytes_skipped) == \
        (0, len(file.blocks), size(file), 0), final
    assert consumer.num_redelivered == 0, "the part ran once"
    assert loader.gets() == ranges(file, loader.entries["data/a.bin"]), "each block fetched once"
