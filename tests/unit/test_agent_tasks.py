"""The pure pieces of the agent's task executor (``services.agent.tasks``): which runs are current, which blocks of
a load can be fetched against the manifest, the cumulative counts a part reports; and that a load on any node
reads the store, never a peer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, cast

import msgspec

from libs.blocks import BlockId
from libs.events.agent import CachedFile
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, ManifestEntry
from libs.events.operation import (
    DataLoadSpec,
    DatasetRef,
    MovedParts,
    NodeTask,
    OperationRecord,
    OperationStatus,
    TaskCancel,
    TaskPartsCancel,
)
from services.agent.tasks import (
    CANCELLED_SECONDS,
    CHANGED,
    LEFT,
    PartLedger,
    TaskRunner,
    block_problem,
    given_up,
    load_blocks,
    manifest_behind,
    manifest_version,
    moved_off,
    not_current,
    parse_run,
    progress_id,
)
from tests.unit.test_peer import RBLOCK, node

BLOCK = 1024


def record(runs: int, phase: str = "Executing") -> OperationRecord:
    return OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"),
                           load=DataLoadSpec(dataset=DatasetRef(name="ds")),
                           status=OperationStatus(phase=phase, runs=runs))  # type: ignore[arg-type]


def task(*files: CachedFile) -> NodeTask:
    return NodeTask(run="dataload.default.warm.3", part=1, parts=2, node="n", dataset=ObjectRef(name="ds"),
                    action="load", blocks=list(files))


def test_parse_run() -> None:
    assert parse_run("dataload.default.warm.3") == ("dataload.default.warm", 3)
    assert parse_run("dataload.default.warm") is None
    assert parse_run("3") is None
    assert parse_run("dataload.default.warm.-1") is None


def test_a_run_is_current_only_while_its_operation_executes_it() -> None:
    run = "dataload.default.warm.3"
    assert not_current(run, record(3)) is None
    assert not_current(run, record(4)) == "the operation is at run 4"
    assert not_current(run, record(3, "Complete")) == "the operation is Complete"
    assert not_current(run, record(3, "Failed")) == "the operation is Failed"
    assert not_current(run, None) == "its operation no longer exists"
    assert "not <operation>.<number>" in (not_current("nonsense", record(3)) or "")


def test_a_part_is_moved_off_a_node_only_when_the_record_names_that_run_node_and_part() -> None:
    """The record's ``movedParts`` (kept by the loader for a node that missed its ``TaskPartsCancel``)."""
    run = "dataload.default.warm.3"
    moved = msgspec.structs.replace(record(3), moved_parts=[MovedParts(run=run, node="n", parts=[1, 2])])
    assert moved_off(run, 1, "n", moved) and moved_off(run, 2, "n", moved)
    assert not moved_off(run, 0, "n", moved)
    assert not moved_off(run, 1, "other", moved)
    assert not moved_off("dataload.default.warm.2", 1, "n", moved)
    assert not moved_off(run, 1, "n", record(3)) and not moved_off(run, 1, "n", None)


def test_a_block_is_fetched_only_at_the_manifest_version_and_within_the_object() -> None:
    entry = ManifestEntry(path="/a", mount=0, key="a", size=2 * BLOCK + 1, etag="e1", mtime=0.0)
    assert block_problem(entry, "e1", 0, BLOCK) is None
    assert block_problem(entry, "e1", 2, BLOCK) is None
    assert block_problem(entry, "e2", 0, BLOCK) == CHANGED
    # A key the manifest has no more (the object deleted, the dataset's prefix changed): not "changed", and the
    # message says what to do.
    assert block_problem(None, "e1", 0, BLOCK) == LEFT
    assert "left the dataset" in LEFT and "apply the load again" in LEFT
    assert "past the end" in (block_problem(entry, "e1", 3, BLOCK) or "")
    assert "past the end" in (block_problem(entry, "e1", -1, BLOCK) or "")


def test_a_mount_is_behind_when_the_dataset_record_names_another_manifest_version() -> None:
    def synced(generation: int, at: str, manifest: str = "default.ds.1", requests: int = 0) -> DatasetRecord:
        return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="ds"), spec=DatasetSpec()), generation=generation,
                             status=DatasetStatus(synced_generation=generation, last_sync_time=at, manifest=manifest,
                                                  synced_requests=requests))

    serving = manifest_version(synced(2, "t2"))
    assert not manifest_behind(synced(2, "t2"), serving)
    assert manifest_behind(synced(2, "t3"), serving), "a resync of the same generation is a new manifest"
    assert manifest_behind(synced(2, "t2", requests=1), serving), "a resync within the second of the listing before"
    assert manifest_behind(synced(2, "t2", manifest="default.ds.2"), serving), "the dataset made again"
    assert manifest_behind(synced(3, "t2"), serving)
    assert not manifest_behind(synced(3, "t3", manifest=""), serving), "no manifest to wait for"
    assert not manifest_behind(None, serving), "a deleted dataset: nothing to wait for"


def test_the_ledger_counts_cumulatively_and_names_files_done_without_failures() -> None:
    part = task(CachedFile(0, "a", "e", [(0, BLOCK), (1, 10)]), CachedFile(0, "b", "e", [(0, BLOCK)]),
                CachedFile(0, "c", "e", [(0, 5)]))
    assert list(load_blocks(part)) == [(0, 0, BLOCK), (0, 1, 10), (1, 0, BLOCK), (2, 0, 5)]
    ledger = PartLedger.of(part)
    assert ledger.progress(part, "x").files_done == []
    ledger.done(0, BLOCK)
    ledger.done(1, BLOCK, skipped=True)
    ledger.fail(2, "c: object changed since the load was planned")
    ledger.fail(0, "a: store down")
    ledger.done(None, 7)  # a block of a whole-file clean: counted, in no file
    progress = ledger.progress(part, "x")
    assert (progress.blocks_done, progress.bytes_done, progress.bytes_skipped) == (3, BLOCK + 7, BLOCK)
    assert (progress.failed, progress.message) == (2, "c: object changed since the load was planned")
    assert progress.files_done == [1]  # a has a failed block, c failed
    final = ledger.progress(part, "y", done=True, message="cancelled")
    assert (final.done, final.message, final.id, final.run, final.part) == (True, "cancelled", "y", part.run, 1)


def test_the_ledger_version_moves_with_every_change() -> None:
    ledger = PartLedger.of(task(CachedFile(0, "a", "e", [(0, 1)])))
    versions = [ledger.version]
    ledger.done(0, 1)
    versions.append(ledger.version)
    ledger.fail(None, "x")
    versions.append(ledger.version)
    assert versions == sorted(set(versions))


def testprogress_ids_differ_across_deliveries_of_a_part() -> None:
    part = task()
    ids = {progress_id(part, delivery, k) for delivery in (1, 2) for k in ("1", "2", "final")}
    assert len(ids) == 6
    assert all(i.startswith("dataload.default.warm.3.1.") for i in ids)


async def test_a_load_on_a_non_owner_fetches_from_the_store_never_a_peer(tmp_path: Path) -> None:
    """``warm`` is the store path whatever the ring says: the loader picked this node to hold the block."""
    n = await node(tmp_path, me="me", ring_nodes=("a", "b", "c"))  # "me" is not even in the ring: a client
    for index in range(3):
        assert await n.reader.warm(n.entry, index) is True
    assert n.peers.asks == []
    assert sorted(get.start // RBLOCK for get in n.store.gets) == [0, 1, 2]
    assert all(n.cache.contains(n.reader.block_id(n.entry, index)) for index in range(3))


async def test_a_failed_parts_message_quotes_an_odd_key(tmp_path: Path) -> None:
    """A key may hold quotes, line breaks and escape sequences: a part's message (the operation's message, shown by
    ``shoal describe`` and printed by ``--wait``) names it quoted, and so does the store's error it carries, rather
    than raw, where a line break reads as the end of the message and a quote as the end of the key."""
    n = await node(tmp_path)
    odd = 'say "it\'s"\n\x1b[31mred.bin'
    source = tmp_path / "source"
    (source / odd).write_bytes(b"x" * RBLOCK)
    info = await n.store.head(odd)
    entry = ManifestEntry(path=f"/{odd}", mount=0, key=odd, size=info.size, etag=info.etag, mtime=info.mtime)
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), n.cache, n.reader, lambda: {(0, odd): entry},
                        concurrency=1)

    async def message(part: NodeTask) -> str:
        ledger = PartLedger.of(part)
        await runner._load(part, ledger, asyncio.Event())
        assert ledger.failed == 1
        return ledger.message

    # Not in the manifest at the version the loader planned.
    planned_elsewhere = task(CachedFile(0, odd, "other-etag", [(0, RBLOCK)]))
    assert await message(planned_elsewhere) == f"{odd!r}: {CHANGED}"
    # Not in the manifest at all (the dataset's prefix changed): the object left the dataset.
    left = task(CachedFile(0, "elsewhere/" + odd, info.etag, [(0, RBLOCK)]))
    assert await message(left) == f"{'elsewhere/' + odd!r}: {LEFT}"
    # In the manifest, gone from the store: the local store's error names it quoted too.
    (source / odd).unlink()
    gone = await message(task(CachedFile(0, odd, info.etag, [(0, RBLOCK)])))
    assert gone == f"{odd!r}: file {odd!r} does not exist in local directory '{source}'"
    assert "\n" not in gone and "\x1b" not in gone


def test_a_part_given_up_fails_every_block_it_names_and_at_least_one() -> None:
    load = NodeTask(id="r.1.0", run="r.1", part=0, parts=1, node="n", dataset=ObjectRef(name="d"), action="load",
                    blocks=[CachedFile(0, "a", "e", [(0, 10), (1, 5)]), CachedFile(0, "b", "e", [(0, 1)])])
    final = given_up(load, 20, "r.1.0.20-final", lambda _: False)
    assert (final.done, final.failed, final.blocks_done, final.files_done) == (True, 3, 0, [])
    assert final.message.startswith("part 0 of run r.1 was delivered 20 times without finishing")
    everything = msgspec.structs.replace(load, action="clean", blocks=[], everything=True)
    assert given_up(everything, 20, "x", lambda _: True).failed == 1
    assert given_up(everything, 20, "x", lambda _: True, victims_left=4).failed == 4


def test_a_part_given_up_counts_what_the_earlier_deliveries_left_in_the_cache() -> None:
    """The earlier deliveries' ledgers died with their processes; the cache says what they did. A load's block
    cached at the part's version is done, a clean's block no longer cached is done; the rest fail. The run still
    fails (at least one block), even when everything is found done."""
    load = NodeTask(id="r.1.0", run="r.1", part=0, parts=1, node="n", dataset=ObjectRef(name="d"), action="load",
                    blocks=[CachedFile(0, "a", "e", [(0, 10), (1, 5)]), CachedFile(0, "b", "e", [(0, 1)])])
    cached = {BlockId(0, "a", "e", 0), BlockId(0, "b", "e", 0), BlockId(0, "a", "other-version", 1)}
    final = given_up(load, 20, "x", cached.__contains__)
    assert (final.blocks_done, final.bytes_done, final.bytes_skipped) == (2, 0, 11)
    assert (final.failed, final.files_done, final.done) == (1, [1], True)
    assert final.message.startswith("part 0 of run r.1 was delivered 20 times")

    clean = msgspec.structs.replace(load, action="clean")
    freed = given_up(clean, 20, "x", cached.__contains__)
    assert (freed.blocks_done, freed.bytes_skipped, freed.failed, freed.files_done) == (1, 5, 2, [])

    every = given_up(load, 20, "x", lambda _: True)
    assert (every.blocks_done, every.bytes_skipped, every.files_done, every.failed) == (3, 16, [0, 1], 1)


class SwallowingMessage:
    """A part's JetStream message whose ``in_progress`` swallows a cancellation landing in it, as nats-py's own
    flush does (``Client._flush_pending`` catches ``CancelledError``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()

    async def in_progress(self) -> None:
        self.calls += 1
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # a flush that never completes until cancelled


async def test_a_part_heartbeat_ends_even_when_its_cancellation_is_swallowed() -> None:
    """The part's end sets ``ended`` and cancels the heartbeat; the cancellation lands in ``in_progress``, which
    swallows it: the heartbeat still ends (it looks at ``ended``), so the part's end does not wait for ever."""
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cast(Any, None), cast(Any, None), dict,
                        concurrency=1)
    message = SwallowingMessage()
    one = task(CachedFile(0, "a", "e", [(0, BLOCK)]))
    ended = asyncio.Event()
    beating = asyncio.ensure_future(runner._heartbeat(cast(Any, message), one, PartLedger.of(one), 1, ended))
    await asyncio.wait_for(message.entered.wait(), 10)
    ended.set()
    beating.cancel()
    await asyncio.wait_for(asyncio.shield(beating), 10)
    assert message.calls == 1


def test_a_cancelled_run_is_remembered_as_long_as_its_parts_can_be_delivered_not_longer() -> None:
    """A run cancelled more than a day ago (its parts out of the task stream) no longer skips parts: once the
    operation's delete marker is purged (``libs.markers``), the name applied again numbers its runs from 1 anew, and
    a run id remembered for ever would drop that run's parts as cancelled."""
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cast(Any, None), cast(Any, None), dict,
                        concurrency=1)
    runner._cancel("dataload.default.warm.1")
    now = time.monotonic()
    assert runner._was_cancelled("dataload.default.warm.1", now)
    assert not runner._was_cancelled("dataload.default.warm.2", now)
    assert not runner._was_cancelled("dataload.default.warm.1", now + CANCELLED_SECONDS + 1)


async def test_a_parts_cancel_skips_only_the_parts_it_names_on_its_node() -> None:
    """The loader moved parts 1 and 2 of a run off node n (scaled in): those are skipped there, and a part of the
    run it gets later (n a worker again) is not; another node's cancel of its parts changes nothing on n."""
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cast(Any, None), cast(Any, None), dict,
                        concurrency=1)
    run = "dataload.default.warm.1"
    await runner._on_cancel(TaskPartsCancel(run=run, node="other", parts=[0]))
    assert not runner._was_cancelled(run, part=0)
    await runner._on_cancel(TaskPartsCancel(run=run, node="n", parts=[1, 2]))
    assert runner._was_cancelled(run, part=1) and runner._was_cancelled(run, part=2)
    assert not runner._was_cancelled(run, part=3) and not runner._was_cancelled(run)
    await runner._on_cancel(TaskCancel(run=run))
    assert runner._was_cancelled(run, part=3)
