"""A block cache restarted on a real disk tier: the index a clean stop writes, what the start does without one (a
crash), a stale or garbled index, and the background scan that finds the rest while the cache serves: a clean
while it runs, and a quota that shrank."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from libs.blocks import BlockId
from libs.events.agent import CachedFile
from libs.events.common import ObjectRef
from libs.events.operation import NodeTask
from services.agent.cache import BlockCache, DiskTier, LruPolicy
from services.agent.cache.store import SCAN_THREADS
from services.agent.cache.tiers import HEADER, INDEX_FILE, INDEX_HEADER, TEMP_SUFFIX, ScanCancelled, ShardScan
from services.agent.tasks import PartLedger, TaskRunner
from tests.helpers import eventually
from tests.unit.test_block_cache import SIZE, Inventory, block, payload

BLOCKS = 12


async def _now(value: bool) -> bool:
    return value


def tier(path: Path, blocks: int = 100) -> DiskTier:
    return DiskTier(path, blocks * SIZE, high=1.0, low=0.5)


def cache_on(path: Path, inventory: Inventory, blocks: int = 100) -> BlockCache:
    return BlockCache([tier(path, blocks)], LruPolicy, inventory.on_cached, inventory.on_evicted)


def file_of(cache: BlockCache, block_id: BlockId) -> Path:
    return Path(cache.tiers[0].location, block_id.name[:2], block_id.name)


def filled(path: Path, count: int = BLOCKS) -> BlockCache:
    """A cache that wrote ``count`` blocks, the files' modification times in the order written."""
    cache = cache_on(path, Inventory())
    cache.load(SIZE)
    for index in range(count):
        assert cache.put(block(index), payload(index))
        os.utime(file_of(cache, block(index)), (1000 + index, 1000 + index))
    return cache


async def test_a_clean_stop_writes_an_index_the_next_start_serves_from_at_once(tmp_path: Path) -> None:
    first = filled(tmp_path / "ssd")
    first.get(block(0))  # the most recently used now: last to be evicted
    assert first.save_index(SIZE) == BLOCKS
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == BLOCKS  # every block, from the index alone
    assert not (tmp_path / "ssd" / INDEX_FILE).exists()  # read once: a crash later must not find it again
    assert [cache.get(block(index)) for index in range(BLOCKS)] == [payload(index) for index in range(BLOCKS)]
    assert await cache.scan_rest() == 0  # nothing the index did not list
    assert set(inventory.blocks) == {block(index) for index in range(BLOCKS)}


async def test_eviction_order_survives_a_clean_restart(tmp_path: Path) -> None:
    first = filled(tmp_path / "ssd")
    first.get(block(0))  # block 0 is now the most recently used, block 1 the least
    first.save_index(SIZE)
    cache = BlockCache([tier(tmp_path / "ssd", BLOCKS)], LruPolicy)  # full: the next put evicts
    cache.start(SIZE)
    assert cache.put(block(100), payload(100))
    assert not cache.contains(block(1)) and cache.contains(block(0))


async def test_after_a_crash_with_a_partial_block_file_the_sound_blocks_are_found_and_the_rest_deleted(
        tmp_path: Path) -> None:
    first = filled(tmp_path / "ssd")
    shard = file_of(first, block(3)).parent
    # What a crash leaves: a write that never got renamed (another process's temporary file), and a block file
    # cut short (renamed, but not all of it reached the disk before a power loss).
    leftover = shard / f".{block(3).name}.999999.0{TEMP_SUFFIX}"
    leftover.write_bytes(b"half a block")
    torn = file_of(first, block(4))
    torn.write_bytes(torn.read_bytes()[:HEADER.size + 10])
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0  # no index: a crash
    assert cache.get(block(5)) == payload(5)  # not scanned yet: found on disk when asked for
    assert await cache.scan_rest() == BLOCKS - 2  # the others but the torn one
    assert not leftover.exists() and not torn.exists()
    assert not cache.contains(block(4))
    for index in set(range(BLOCKS)) - {4}:
        assert cache.get(block(index)) == payload(index)
    assert set(inventory.blocks) == {block(index) for index in range(BLOCKS)} - {block(4)}


async def test_a_stale_index_is_corrected_by_reads_and_the_background_scan(tmp_path: Path) -> None:
    first = filled(tmp_path / "ssd")
    first.save_index(SIZE)
    # While the cache is stopped: a block file deleted, one garbled, one added (by a run that crashed, say).
    file_of(first, block(1)).unlink()
    garbled = file_of(first, block(2))
    raw = bytearray(garbled.read_bytes())
    raw[-SIZE // 2 - 20] ^= 0xFF  # in the data
    garbled.write_bytes(bytes(raw))
    other = cache_on(tmp_path / "ssd", Inventory())
    assert other.put(block(50), payload(50))  # (its scan-less start left the index in place)
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == BLOCKS  # the index as written
    assert cache.get(block(2)) is None  # verified as every read is: a miss, deleted, never the garbled bytes
    assert cache.stats().corrupt_blocks == 1 and not garbled.exists()
    assert await cache.scan_rest() == 1  # block 50, which the index did not list
    assert not cache.contains(block(1)) and block(1) not in inventory.blocks  # its file was gone: forgotten
    assert cache.get(block(50)) == payload(50)
    for index in set(range(BLOCKS)) - {1, 2}:
        assert cache.get(block(index)) == payload(index)


@pytest.mark.parametrize("damage", ["garbled", "cut short", "other block size", "empty"])
async def test_an_unusable_index_is_ignored_and_every_block_found_by_the_scan(tmp_path: Path, damage: str) -> None:
    first = filled(tmp_path / "ssd")
    first.save_index(SIZE)
    index = tmp_path / "ssd" / INDEX_FILE
    raw = bytearray(index.read_bytes())
    if damage == "garbled":
        raw[-3] ^= 0xFF
    elif damage == "cut short":
        raw = raw[:len(raw) // 2]
    elif damage == "other block size":
        raw[8:16] = (SIZE * 2).to_bytes(8, "little")
        assert INDEX_HEADER.unpack_from(raw)[3] == SIZE * 2
    else:
        raw = bytearray()
    index.write_bytes(bytes(raw))
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0
    assert not index.exists()
    assert await cache.scan_rest() == BLOCKS
    assert [cache.get(block(index)) for index in range(BLOCKS)] == [payload(index) for index in range(BLOCKS)]


async def test_the_background_scan_leaves_alone_a_block_written_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = filled(tmp_path / "ssd", 3)
    garbled = file_of(first, block(1))
    garbled.write_bytes(b"garbage")  # found unsound by the scan...
    cache = cache_on(tmp_path / "ssd", Inventory())
    cache.start(SIZE)
    loop = asyncio.get_running_loop()
    original = DiskTier.scan_shard

    def scan_then_write(self: DiskTier, shard: str, known: frozenset[str], cancelled: object = None) -> ShardScan:
        scanned = original(self, shard, known)
        if any(path.endswith(block(1).name) for path in scanned.garbage):
            # ...but written again (a read missed it meanwhile) before the scan's result reaches the cache
            asyncio.run_coroutine_threadsafe(cache.put_async(block(1), payload(1)), loop).result(10)
        return scanned

    monkeypatch.setattr(DiskTier, "scan_shard", scan_then_write)
    assert await asyncio.wait_for(cache.scan_rest(), 30) == 2
    assert cache.get(block(1)) == payload(1) and garbled.exists()  # the new file, not deleted as garbage
    assert cache.get(block(0)) == payload(0) and cache.get(block(2)) == payload(2)


async def test_a_block_asked_for_before_the_scan_reaches_its_shard_is_found_on_disk_not_fetched_again(
        tmp_path: Path) -> None:
    # After a crash every block waits for the background scan. One asked for meanwhile (a DataLoad's part resumed
    # right after the restart, a reader) was a miss: fetched from the store a second time.
    filled(tmp_path / "ssd")
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0  # no index: a crash
    entered, release = threading.Event(), threading.Event()

    def held() -> bool:  # asked by the scan's thread before each file it opens: the scan waits here
        entered.set()
        release.wait(30)
        return False

    scan = asyncio.create_task(cache.scan_rest(cancelled=held))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        assert cache.contains(block(7)) and cache.get(block(7)) == payload(7)
        assert cache.present(block(8)) and cache.get(block(8)) == payload(8)
        assert not cache.contains(block(100))  # never cached: still a miss
        assert {block(7), block(8)} <= set(inventory.blocks)
    finally:
        release.set()
    await scan
    indexed = cache.blocks()
    assert len(indexed) == BLOCKS and set(indexed) == {(block(index), SIZE) for index in range(BLOCKS)}  # each once
    assert [cache.get(block(index)) for index in range(BLOCKS)] == [payload(index) for index in range(BLOCKS)]


class Settled:
    """The reader a clean settles first: nothing in flight here."""

    async def settle(self) -> None:
        return None


def held_scan() -> tuple[threading.Event, threading.Event, Callable[[], bool]]:
    """(entered, release, cancelled): a scan given ``cancelled`` waits in its thread before its first file until
    ``release`` is set; ``entered`` says it got there."""
    entered, release = threading.Event(), threading.Event()

    def held() -> bool:
        entered.set()
        release.wait(30)
        return False

    return entered, release, held


async def test_a_clean_while_the_scan_runs_deletes_the_blocks_it_had_not_reached_and_counts_them(
        tmp_path: Path) -> None:
    # A DataClean right after a crash saw only the index: the blocks the background scan had not reached were
    # neither freed nor counted, and the scan indexed them afterwards: the cleaned data came back.
    first = filled(tmp_path / "ssd")
    for index in range(3):
        assert first.put(block(index, key="other"), payload(index))
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0  # no index: a crash
    entered, release, held = held_scan()
    scan = asyncio.create_task(cache.scan_rest(cancelled=held))
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cache, cast(Any, Settled()), dict,
                        concurrency=1)
    clean = NodeTask(run="dataclean.default.free.1", part=0, parts=1, node="n", dataset=ObjectRef(name="ds"),
                     action="clean", files=[(0, "train/shard-0.tar")],
                     blocks=[CachedFile(0, "other", "e1", [(0, SIZE)])])
    ledger = PartLedger.of(clean)
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        cleaning = asyncio.create_task(runner._clean(clean, ledger, asyncio.Event()))
        await eventually(lambda: _now(ledger.version > 0 or cleaning.done()), what="the clean's blocks selected")
    finally:
        release.set()
    await asyncio.wait_for(scan, 30)
    await asyncio.wait_for(cleaning, 30)
    cleaned = [block(index) for index in range(BLOCKS)] + [block(0, key="other")]
    assert not any(cache.contains(victim) or file_of(cache, victim).exists() for victim in cleaned)
    assert ledger.bytes_done == len(cleaned) * SIZE and ledger.bytes_total == len(cleaned) * SIZE
    assert ledger.bytes_skipped == 0 and ledger.blocks_done == len(cleaned)
    kept = {block(1, key="other"), block(2, key="other")}
    assert set(inventory.blocks) == kept and all(cache.get(b) is not None for b in kept)


async def test_a_clean_during_a_scan_that_is_stopped_is_not_done(tmp_path: Path) -> None:
    # The files the scan did not reach wait for the next start, whose scan knows nothing of the clean: the part
    # must go back to be run again, not be reported done.
    filled(tmp_path / "ssd")
    cache = cache_on(tmp_path / "ssd", Inventory())
    cache.start(SIZE)
    sweep = cache.sweep(lambda _: True)
    assert sweep is not None
    with pytest.raises(ScanCancelled):
        await cache.scan_rest(cancelled=lambda: True)
    assert not await asyncio.wait_for(sweep.wait(), 10)
    assert cache.sweep(lambda _: True) is None  # no scan due any more: the index is all there is


async def test_after_a_crash_with_a_smaller_quota_the_scan_keeps_the_newest_blocks_of_the_tier(
        tmp_path: Path) -> None:
    # Each shard was weighed against the quota on its own: the shards scanned first kept all theirs, however old,
    # and the newest blocks, in shards scanned later, were deleted for want of room.
    count, room = 40, 10
    filled(tmp_path / "ssd", count)  # block i written at time 1000 + i: the newest are the last
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory, room)
    assert cache.start(SIZE) == 0
    assert await cache.scan_rest() == room
    newest = {block(index) for index in range(count - room, count)}
    assert set(inventory.blocks) == newest
    assert all(cache.get(b) is not None for b in newest)
    on_disk = {path.name for path in (tmp_path / "ssd").rglob("*") if path.is_file() and len(path.name) == 32}
    assert on_disk == {b.name for b in newest}
    assert cache.stats().tiers[0].used_bytes == room * SIZE


async def test_a_purge_while_the_scan_had_not_finished_deletes_the_block_files_it_never_reached(
        tmp_path: Path) -> None:
    # A dataset deleted right after a crash: its mount stops, cancelling the background scan, and purges. Only the
    # indexed blocks were deleted; the files the scan had not reached stayed on disk, indexed by no one.
    first = filled(tmp_path / "ssd")
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0  # no index: a crash
    halt = threading.Event()
    entered, release = threading.Event(), threading.Event()

    def held() -> bool:  # the scan's thread waits before its first file, then stops as the mount's halt says
        entered.set()
        release.wait(30)
        return halt.is_set()

    shard = file_of(first, block(0)).parent
    leftover = shard / f".{block(0).name}.999999.0{TEMP_SUFFIX}"  # a write a crash interrupted
    leftover.write_bytes(b"half a block")
    scan = asyncio.create_task(cache.scan_rest(cancelled=held))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        assert cache.put(block(100), payload(100))  # indexed: written since the start
        in_flight = shard / f".{block(1).name}.{os.getpid()}.999{TEMP_SUFFIX}"  # this process's write, going on
        in_flight.write_bytes(b"being written")
        halt.set()
        scan.cancel()  # as the mount's stop does: its thread stops at its next file
        await asyncio.gather(scan, return_exceptions=True)
        assert cache.purge() == BLOCKS + 1
    finally:
        release.set()
    left = [path for path in (tmp_path / "ssd").rglob("*/*") if path.is_file()]  # in the shard folders
    assert left == [in_flight]  # every block file and the crash's leftover gone, the write in flight left to it
    assert not inventory.blocks and not cache.contains(block(100))
    in_flight.unlink()


async def test_a_block_asked_for_before_the_scans_first_step_is_found_on_disk(tmp_path: Path) -> None:
    # The mount serves (FUSE, peers, a DataLoad's part resumed) from the end of ``start``; the scan's first step
    # comes later, and a block asked for in between was a miss: fetched from the store a second time.
    filled(tmp_path / "ssd")
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    unwanted = block(3)
    assert cache.start(SIZE, keep=lambda found, _: found != unwanted) == 0  # no index: a crash; no scan yet
    assert cache.contains(block(7)) and cache.get(block(7)) == payload(7)
    assert cache.get(unwanted) is None  # what the scan would not keep is not found early either
    assert set(inventory.blocks) == {block(7)}
    assert await cache.scan_rest(lambda found, _: found != unwanted) == BLOCKS - 2
    assert set(inventory.blocks) == {block(index) for index in range(BLOCKS)} - {unwanted}  # each once
    assert not file_of(cache, unwanted).exists()


async def test_a_block_found_on_disk_while_its_tier_is_full_takes_the_place_of_the_least_recently_used(
        tmp_path: Path) -> None:
    # A block found before the scan reached it, in a tier at its quota (found early, or written, since the start),
    # was refused and so fetched from the store again; the write of that fetch then evicted a block anyway.
    room = 4
    filled(tmp_path / "ssd")
    inventory = Inventory()
    evicted: list[str] = []
    cache = cache_on(tmp_path / "ssd", inventory, room)
    cache.on_tier_evicted = evicted.append
    assert cache.start(SIZE) == 0  # a crash
    entered, release, held = held_scan()
    scan = asyncio.create_task(cache.scan_rest(cancelled=held))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        for index in range(room):
            assert cache.get(block(index)) == payload(index)
        assert cache.get(block(room)) == payload(room)  # served from its file, not a miss
        assert not cache.contains(block(0)) and not file_of(cache, block(0)).exists()  # the least recently used
        assert evicted == ["SSD"]
        assert set(inventory.blocks) == {block(index) for index in range(1, room + 1)}
        assert cache.stats().tiers[0].used_bytes == room * SIZE
    finally:
        release.set()
    await asyncio.wait_for(scan, 30)
    assert set(inventory.blocks) == {block(index) for index in range(1, room + 1)}  # used since: kept
    assert cache.stats().tiers[0].used_bytes == room * SIZE


def clean_of_everything() -> tuple[NodeTask, PartLedger]:
    clean = NodeTask(run="dataclean.default.free.1", part=0, parts=1, node="n", dataset=ObjectRef(name="ds"),
                     action="clean", everything=True)
    return clean, PartLedger.of(clean)


async def test_a_clean_of_everything_during_the_scan_is_done_when_its_own_part_is_not_when_the_scan_ends(
        tmp_path: Path) -> None:
    # The clean freed the indexed blocks at once, then waited for the scan to end to count the files the scan found
    # and deleted for it: after a crash with 200,000 blocks, about 30 s. It now scans the shards nobody has taken
    # itself, and waits only for those the scan holds.
    first = filled(tmp_path / "ssd")
    first.save_index(SIZE)
    for index in range(BLOCKS, 2 * BLOCKS):  # written after the index: found by the scan alone
        assert first.put(block(index), payload(index))
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == BLOCKS
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cache, cast(Any, Settled()), dict,
                        concurrency=1)
    clean, ledger = clean_of_everything()
    # The scan's first step has not come yet (it comes once the mount serves, and may be slow to get there): the
    # clean does not wait for it.
    await asyncio.wait_for(runner._clean(clean, ledger, asyncio.Event()), 30)
    assert ledger.bytes_done == ledger.bytes_total == 2 * BLOCKS * SIZE and ledger.blocks_done == 2 * BLOCKS
    assert not inventory.blocks
    assert not [path for path in (tmp_path / "ssd").rglob("*/*") if path.is_file()]
    assert await asyncio.wait_for(cache.scan_rest(), 30) == 0  # nothing left for it
    assert cache.put(block(0), payload(0)) and set(inventory.blocks) == {block(0)}


async def test_a_clean_beside_a_running_scan_takes_the_shards_it_has_not_reached(tmp_path: Path) -> None:
    # Both at once: the scan holds its first shards (in its threads), the clean scans every other one meanwhile and
    # is done once the scan's are; each file is deleted and counted once.
    filled(tmp_path / "ssd", 40)
    cache = cache_on(tmp_path / "ssd", Inventory())

    def shards_left() -> set[Path]:
        return {path.parent for path in (tmp_path / "ssd").rglob("*/*") if path.is_file()}

    assert len(shards_left()) > SCAN_THREADS
    assert cache.start(SIZE) == 0
    entered, release, held = held_scan()
    scan = asyncio.create_task(cache.scan_rest(cancelled=held))
    runner = TaskRunner(cast(Any, None), "n", ObjectRef(name="ds"), cache, cast(Any, Settled()), dict,
                        concurrency=1)
    clean, ledger = clean_of_everything()
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        cleaning = asyncio.create_task(runner._clean(clean, ledger, asyncio.Event()))
        # The clean's own part: every shard folder but those in the scan's hands emptied, while it waits for those.
        await eventually(lambda: _now(len(shards_left()) <= SCAN_THREADS), what="the clean's own part")
        assert shards_left() and not cleaning.done()
    finally:
        release.set()
    await asyncio.wait_for(cleaning, 30)
    await asyncio.wait_for(scan, 30)
    assert ledger.blocks_done == 40 and ledger.bytes_done == ledger.bytes_total == 40 * SIZE
    assert not shards_left()


async def test_a_purge_deletes_the_files_in_a_worker_thread_after_emptying_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A deleted dataset's mount purged its cache on the event loop: one unlink per block file, 200,000 for a large
    # cache, while nothing else ran. The files now go in a thread, once every block left the index and no write or
    # look on disk can add one back.
    filled(tmp_path / "ssd")
    inventory = Inventory()
    cache = cache_on(tmp_path / "ssd", inventory)
    assert cache.start(SIZE) == 0  # a crash: the scan had not run
    assert cache.get(block(1)) == payload(1)  # found on disk: indexed
    entered, release = threading.Event(), threading.Event()
    original = DiskTier.remove_block_files

    def held(self: DiskTier) -> int:
        entered.set()
        assert release.wait(30), "the loop did not run while the purge deleted files"
        return original(self)

    monkeypatch.setattr(DiskTier, "remove_block_files", held)
    purging = asyncio.create_task(cache.purge_async())
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        assert not inventory.blocks and not file_of(cache, block(1)).exists()  # the indexed one: first
        assert not cache.contains(block(2))  # its file is still there, but not found any more
        assert not cache.put(block(100), payload(100))  # nothing is written into a folder being emptied
    finally:
        release.set()
    assert await asyncio.wait_for(purging, 30) == BLOCKS
    assert not (tmp_path / "ssd").exists() and not inventory.blocks


async def test_after_a_crash_the_cache_says_it_is_counting_until_the_scan_has_found_every_block(
        tmp_path: Path) -> None:
    # What the inventory events carry (``CacheCounters.counting``): without it the cached bytes of a node grew for
    # seconds after a crash with nothing to tell a partial count from a cache that was lost.
    filled(tmp_path / "ssd")  # no index written: a crash
    cache = cache_on(tmp_path / "ssd", Inventory())
    assert not cache.counting
    assert cache.start(SIZE) == 0
    assert cache.counting and cache.stats().cached_bytes == 0
    assert await cache.scan_rest() == BLOCKS
    assert not cache.counting and cache.stats().cached_bytes == BLOCKS * SIZE
