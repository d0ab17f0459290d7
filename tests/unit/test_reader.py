"""The agent's block reader on real parts: a local-directory object store (wrapped to count GETs) and a real
disk-tier block cache. Each test pins one behaviour by what reaches the store: blocks fetched ahead for a
sequential reader, one GET for concurrent misses of one block, the read-ahead memory budget (respected and given
back), the fail-fast cooldown after the store was unreachable, and small random reads answered by a small GET.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from libs.blocks import BlockId
from libs.events.dataset import ManifestEntry
from libs.ufs import LocalLocation, LocalObjectStore
from libs.ufs.base import EndpointUnreachable, ObjectChanged, ObjectInfo
from services.agent.cache import BlockCache, DiskTier, FillBuffer, FrequencyAdmissionPolicy, MemoryTier
from services.agent.readahead import MemoryBudget
from services.agent.reader import MAX_HELD_BLOCKS, BlockReader, StoreGate
from tests.faults import CountingStore, Get
from tests.helpers import eventually

BLOCK = 64 * 1024
BLOCKS = 16
QUARTER = BLOCK // 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Setup:
    reader: BlockReader
    store: CountingStore
    cache: BlockCache
    budget: MemoryBudget
    entry: ManifestEntry
    body: bytes
    clock: Clock
    recording: RecordingCache

    def blocks_fetched(self) -> list[int]:
        """Indices of the whole blocks GET so far, in order."""
        return [get.start // BLOCK for get in self.store.gets if get.length == BLOCK and get.start % BLOCK == 0]


class RecordingCache:
    """The real block cache, recording which blocks the reader hinted to the kernel (``prefetch``)."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.hinted: list[int] = []

    def get(self, block: BlockId) -> bytes | None:
        return self.cache.get(block)

    def get_range(self, block: BlockId, start: int, end: int | None, access: bool = True) -> bytes | None:
        return self.cache.get_range(block, start, end, access=access)

    def contains(self, block: BlockId) -> bool:
        return self.cache.contains(block)

    def present(self, block: BlockId) -> bool:
        return self.cache.present(block)

    def prefetch(self, block: BlockId) -> None:
        self.hinted.append(block.index)
        self.cache.prefetch(block)

    # A disk-only cache: loads (``warm``) fetch straight into the block file's buffer, as in the mount process.
    @property
    def writes_files(self) -> bool:
        return self.cache.writes_files

    async def put_filled(self, fill: FillBuffer) -> bool:
        return await self.cache.put_filled(fill)


async def make(tmp_path: Path, budget_blocks: int = 64, size: int = BLOCKS * BLOCK,
               max_ahead_blocks: int | None = None) -> Setup:
    source = tmp_path / "source"
    source.mkdir()
    body = os.urandom(size)
    (source / "data.bin").write_bytes(body)
    local = LocalObjectStore(LocalLocation(root=source))
    info = await local.head("data.bin")
    store = CountingStore(local)
    clock = Clock()
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * BLOCKS * BLOCK)])
    cache.load()
    budget = MemoryBudget(budget_blocks * BLOCK)
    recording = RecordingCache(cache)
    reader = BlockReader(recording, [StoreGate(store, clock=clock)], BLOCK, budget, write_block=cache.put_async,
                         max_ahead_blocks=max_ahead_blocks)
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag,
                          mtime=info.mtime)
    return Setup(reader, store, cache, budget, entry, body, clock, recording)


async def read_sequentially(setup: Setup, handle, start: int, stop: int, step: int = QUARTER) -> None:
    for offset in range(start, stop, step):
        data = await setup.reader.read(handle, offset, step)
        assert bytes(data) == setup.body[offset:offset + step]


# --- read-ahead ---


async def test_sequential_reader_gets_blocks_fetched_ahead_once_each(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    # Two blocks' worth of sequential reads: the window grows 1, 2, 4, 8, 16 blocks.
    await read_sequentially(setup, handle, 0, 2 * BLOCK)
    await setup.reader.drain()
    assert sorted(setup.blocks_fetched()) == list(range(BLOCKS)), "blocks beyond the ones read are fetched ahead"
    assert setup.store.bytes_read == BLOCKS * BLOCK
    # The rest of the file is served from the blocks fetched ahead: not one more GET.
    await read_sequentially(setup, handle, 2 * BLOCK, BLOCKS * BLOCK)
    setup.reader.close(handle)
    await setup.reader.drain()
    assert len(setup.store.gets) == BLOCKS
    assert setup.reader.stats.gets == BLOCKS and setup.reader.stats.miss_bytes == BLOCKS * BLOCK


async def test_random_reader_gets_no_read_ahead(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    for index in (9, 3, 12):  # whole-block reads, never where the last one ended
        assert bytes(await setup.reader.read(handle, index * BLOCK, BLOCK)) == setup.body[index * BLOCK:][:BLOCK]
    await setup.reader.drain()
    assert setup.blocks_fetched() == [9, 3, 12]


async def test_read_ahead_reaches_a_short_last_block(tmp_path: Path) -> None:
    setup = await make(tmp_path, size=4 * BLOCK + 1)
    handle = setup.reader.open(setup.entry)
    await read_sequentially(setup, handle, 0, BLOCK)
    await setup.reader.drain()
    assert sorted(get.start // BLOCK for get in setup.store.gets) == [0, 1, 2, 3, 4]
    assert Get("data.bin", 4 * BLOCK, 1) in setup.store.gets
    assert bytes(await setup.reader.read(handle, BLOCK, 4 * BLOCK)) == setup.body[BLOCK:]
    assert await setup.reader.read(handle, 4 * BLOCK + 1, 100) == b""  # at the end: nothing, no GET
    assert len(setup.store.gets) == 5
    setup.reader.close(handle)
    await setup.reader.drain()


async def test_read_ahead_window_is_capped(tmp_path: Path) -> None:
    setup = await make(tmp_path, max_ahead_blocks=2)
    handle = setup.reader.open(setup.entry)
    await read_sequentially(setup, handle, 0, 2 * BLOCK)  # eight sequential reads: the window would reach 16
    await setup.reader.drain()
    assert sorted(setup.blocks_fetched()) == [0, 1, 2, 3]
    setup.reader.close(handle)


async def test_read_ahead_skips_cached_blocks_hints_them_once_and_fetches_beyond(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    for index in (2, 3):  # cached beforehand by a random reader
        other = setup.reader.open(setup.entry)
        await setup.reader.read(other, index * BLOCK, BLOCK)
        setup.reader.close(other)
    await setup.reader.drain()
    assert setup.blocks_fetched() == [2, 3]
    handle = setup.reader.open(setup.entry)
    await read_sequentially(setup, handle, 0, 2 * BLOCK)
    await setup.reader.drain()
    assert sorted(setup.blocks_fetched()) == list(range(BLOCKS)), "blocks after the cached ones are fetched ahead"
    assert setup.blocks_fetched().count(2) == 1 and setup.blocks_fetched().count(3) == 1
    assert sorted(setup.recording.hinted) == [2, 3]  # each cached block ahead hinted to the kernel, once
    setup.reader.close(handle)


async def test_reads_are_pinned_to_the_manifest_etag(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    assert bytes(await setup.reader.read(handle, 0, BLOCK)) == setup.body[:BLOCK]
    await setup.reader.drain()
    source = tmp_path / "source" / "data.bin"
    source.write_bytes(os.urandom(len(setup.body)))  # overwritten after the manifest was made
    os.utime(source, ns=(1, 1))
    for offset, length in ((5 * BLOCK, BLOCK), (9 * BLOCK + 10, 100)):  # a whole block, a small random read
        fresh = setup.reader.open(setup.entry)
        with pytest.raises(ObjectChanged):
            await setup.reader.read(fresh, offset, length)
        setup.reader.close(fresh)
    assert bytes(await setup.reader.read(handle, 0, 100)) == setup.body[:100]  # cached bytes are the manifest's
    await setup.reader.drain()


class SameEtagStore(CountingStore):
    """A local folder whose every file has the ETag ``ETAG`` (reads asking for it read the file as it is)."""

    ETAG = "shared-etag"

    async def head(self, key: str) -> ObjectInfo:
        return msgspec.structs.replace(await self.inner.head(key), etag=self.ETAG)

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        return await super().get_range(key, start, length, etag=None if etag == self.ETAG else etag)


async def test_same_key_and_etag_on_two_mounts_are_different_blocks(tmp_path: Path) -> None:
    bodies = []
    gates = []
    for mount in range(2):
        folder = tmp_path / f"mount-{mount}"
        folder.mkdir()
        bodies.append(os.urandom(2 * BLOCK))
        (folder / "same.bin").write_bytes(bodies[-1])
        # Two buckets' objects may share an ETag (S3's is the MD5 of the bytes); local files never do (the inode is
        # in it), so each store here answers for the ETag the manifest gives, as a bucket would.
        gates.append(StoreGate(SameEtagStore(LocalObjectStore(LocalLocation(root=folder)))))
    etag = SameEtagStore.ETAG
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * BLOCK)])
    cache.load()
    reader = BlockReader(cache, gates, BLOCK, MemoryBudget(8 * BLOCK), write_block=cache.put_async)
    for mount in (0, 1):
        entry = ManifestEntry(path=f"/m{mount}/same.bin", mount=mount, key="same.bin", size=2 * BLOCK, etag=etag,
                              mtime=1.0)
        handle = reader.open(entry)
        assert bytes(await reader.read(handle, 0, 2 * BLOCK)) == bodies[mount]
        reader.close(handle)
        await reader.drain()


async def test_a_new_version_or_another_file_never_gets_cached_bytes_of_the_old_one(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    assert bytes(await setup.reader.read(handle, 0, BLOCK)) == setup.body[:BLOCK]
    setup.reader.close(handle)
    await setup.reader.drain()
    source = tmp_path / "source"
    new_body = os.urandom(len(setup.body))
    (source / "data.bin").write_bytes(new_body)  # overwritten; the next manifest has its new ETag
    (source / "twin.bin").write_bytes(os.urandom(len(setup.body)))  # same size and mtime: same local ETag
    stat = (source / "data.bin").stat()
    os.utime(source / "twin.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for key in ("data.bin", "twin.bin"):
        info = await setup.store.head(key)
        entry = ManifestEntry(path=f"/{key}", mount=0, key=key, size=info.size, etag=info.etag, mtime=info.mtime)
        fresh = setup.reader.open(entry)
        assert bytes(await setup.reader.read(fresh, 0, BLOCK)) == (source / key).read_bytes()[:BLOCK]
        setup.reader.close(fresh)
        await setup.reader.drain()
    assert (await setup.store.head("twin.bin")).etag == (await setup.store.head("data.bin")).etag


async def test_a_block_file_copied_over_another_is_read_from_the_store_not_served(tmp_path: Path) -> None:
    # Each chunk of a block file copied over another block's matches its own table, so reads served its bytes as
    # the other block's (a restart's scan caught it, by the id at the end of the file). Its id is now checked on
    # every read: the file is dropped and the block read from the store.
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    assert bytes(await setup.reader.read(handle, 0, 2 * BLOCK)) == setup.body[:2 * BLOCK]
    setup.reader.close(handle)
    await setup.reader.drain()
    first, second = (setup.reader.block_id(setup.entry, index) for index in (0, 1))
    path = tmp_path / "cache" / second.name[:2] / second.name
    path.write_bytes((tmp_path / "cache" / first.name[:2] / first.name).read_bytes())
    handle = setup.reader.open(setup.entry)
    assert bytes(await setup.reader.read(handle, BLOCK + 10, 100)) == setup.body[BLOCK + 10:BLOCK + 110]
    setup.reader.close(handle)
    await setup.reader.drain()
    assert setup.cache.stats().corrupt_blocks == 1
    assert setup.cache.get(second) == setup.body[BLOCK:2 * BLOCK], "the block is cached again from the store"


async def test_cached_blocks_ahead_are_not_fetched_again(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    first = setup.reader.open(setup.entry)
    await read_sequentially(setup, first, 0, BLOCKS * BLOCK, BLOCK)
    setup.reader.close(first)
    await setup.reader.drain()
    assert len(setup.store.gets) == BLOCKS
    second = setup.reader.open(setup.entry)
    await read_sequentially(setup, second, 0, BLOCKS * BLOCK, BLOCK)
    setup.reader.close(second)
    await setup.reader.drain()
    assert len(setup.store.gets) == BLOCKS  # every block came from the disk cache
    assert setup.reader.stats.hit_bytes == BLOCKS * BLOCK
    assert setup.budget.used == 0  # cached blocks ahead are hinted to the kernel, not held in memory


# --- GET coalescing ---


async def test_concurrent_misses_of_one_block_make_one_get(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    setup.store.hold()
    handles = [setup.reader.open(setup.entry) for _ in range(4)]
    reads = [asyncio.ensure_future(setup.reader.read(handle, 5 * BLOCK, BLOCK)) for handle in handles]
    await eventually(lambda: _true(setup.store.waiting >= 1), what="a GET held at the store")
    setup.store.release()
    for read in reads:
        assert bytes(await read) == setup.body[5 * BLOCK:6 * BLOCK]
    await setup.reader.drain()
    assert setup.blocks_fetched() == [5]


async def test_small_read_joins_a_get_in_flight(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    setup.store.hold()
    whole = setup.reader.open(setup.entry)
    small = setup.reader.open(setup.entry)
    big_read = asyncio.ensure_future(setup.reader.read(whole, 7 * BLOCK, BLOCK))
    await eventually(lambda: _true(setup.store.waiting >= 1), what="the block's GET held at the store")
    small_read = asyncio.ensure_future(setup.reader.read(small, 7 * BLOCK + 100, 1000))
    await eventually(lambda: _true(setup.store.waiting >= 1 and len(setup.store.gets) >= 1))
    setup.store.release()
    assert bytes(await small_read) == setup.body[7 * BLOCK + 100:7 * BLOCK + 1100]
    assert bytes(await big_read) == setup.body[7 * BLOCK:8 * BLOCK]
    await setup.reader.drain()
    assert setup.store.gets == [Get("data.bin", 7 * BLOCK, BLOCK)]


# --- the read-ahead memory budget ---


async def test_read_ahead_stays_within_the_budget_and_gives_it_all_back(tmp_path: Path) -> None:
    setup = await make(tmp_path, budget_blocks=2)
    handle = setup.reader.open(setup.entry)
    await read_sequentially(setup, handle, 0, 2 * BLOCK)  # the window asks for 16 blocks ahead
    await setup.reader.drain()
    assert setup.budget.used == 2 * BLOCK
    assert sorted(setup.blocks_fetched()) == [0, 1, 2, 3], "only two blocks beyond the ones read"
    for offset in range(2 * BLOCK, BLOCKS * BLOCK, QUARTER):
        assert bytes(await setup.reader.read(handle, offset, QUARTER)) == setup.body[offset:offset + QUARTER]
        assert setup.budget.used <= 2 * BLOCK
    await setup.reader.drain()
    assert sorted(setup.blocks_fetched()) == list(range(BLOCKS))  # consumed blocks made room for the next ones
    assert setup.budget.used == 0  # nothing is ahead at the end of the file


async def test_closing_a_handle_gives_its_read_ahead_back(tmp_path: Path) -> None:
    setup = await make(tmp_path, budget_blocks=4)
    handle = setup.reader.open(setup.entry)
    await read_sequentially(setup, handle, 0, BLOCK)
    assert setup.budget.used == 4 * BLOCK
    setup.reader.close(handle)
    assert setup.budget.used == 0
    # The budget is usable again by the next reader.
    other = setup.reader.open(setup.entry)
    await read_sequentially(setup, other, 0, BLOCK)
    assert setup.budget.used == 4 * BLOCK
    await setup.reader.read(other, 10 * BLOCK, QUARTER)  # a jump: blocks ahead that were passed are let go
    assert setup.budget.used == 0
    setup.reader.close(other)
    await setup.reader.drain()


async def test_many_readers_hold_at_most_the_mounts_bound_of_blocks_and_read_the_rest_from_the_cache(
        tmp_path: Path) -> None:
    # Each stream holds the block it read last; one per reader grew the mount without bound (200 readers of 4 MiB
    # blocks held 800 MiB, whatever the read-ahead budget).
    setup = await make(tmp_path, size=4 * BLOCK, budget_blocks=0)
    handles = [setup.reader.open(setup.entry) for _ in range(MAX_HELD_BLOCKS + 8)]

    async def read_in_turns(start: int, stop: int) -> None:
        for offset in range(start, stop, QUARTER):
            for handle in handles:  # every reader in turn, as concurrent readers' reads arrive
                data = await setup.reader.read(handle, offset, QUARTER)
                assert bytes(data) == setup.body[offset:offset + QUARTER]
                held = sum(1 for each in handles if each.current is not None)
                assert held <= MAX_HELD_BLOCKS
                assert setup.reader.held_blocks == held

    await read_in_turns(0, 2 * BLOCK)  # cold: blocks from the store, each held by the streams that read it last
    await setup.reader.drain()
    gets = len(setup.store.gets)
    await read_in_turns(2 * BLOCK, 4 * BLOCK)
    await read_in_turns(0, BLOCK)  # the readers start again: warm, from the cache
    await setup.reader.drain()
    assert len(setup.store.gets) == gets + 2, "blocks 2 and 3 fetched once each, cached blocks never again"
    for handle in handles:
        setup.reader.close(handle)
    assert setup.reader.held_blocks == 0


async def test_a_stream_reading_a_cached_block_in_pieces_counts_one_access(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    reader = BlockReader(setup.recording, setup.reader.gates, BLOCK, setup.budget, write_block=setup.cache.put_async,
                         max_held_blocks=1)
    await read_sequentially(setup, setup.reader.open(setup.entry), 0, BLOCK, BLOCK)
    await setup.reader.drain()
    holder, pieces = reader.open(setup.entry), reader.open(setup.entry)
    await reader.read(holder, 0, QUARTER)  # holds block 0: the mount's one
    policy = setup.cache._policies[0]
    assert isinstance(policy, FrequencyAdmissionPolicy)
    name = reader.block_id(setup.entry, 0).name
    before = policy.count(name)
    for offset in range(0, BLOCK, QUARTER):
        assert bytes(await reader.read(pieces, offset, QUARTER)) == setup.body[offset:offset + QUARTER]
    assert pieces.current is None and holder.current is not None
    assert policy.count(name) == before + 1  # one reader, one access: not one per FUSE read
    await reader.drain()


async def test_a_miss_of_a_stream_holding_no_block_counts_one_access(tmp_path: Path) -> None:
    # Past the mount's bound of held blocks, a stream first asks the cache for the chunks it needs; on a miss it
    # asked it again to fetch the block: two accesses and two misses per miss. The admission policy then let every
    # newcomer in over blocks read again (the bench's epoch hit ratio fell from 0.469 to 0.19).
    setup = await make(tmp_path)
    reader = BlockReader(setup.recording, setup.reader.gates, BLOCK, setup.budget, write_block=setup.cache.put_async,
                         max_held_blocks=1)
    holder, other = reader.open(setup.entry), reader.open(setup.entry)
    # Holds block 0, the mount's one. Not from offset 0: a read there looks sequential and fetches block 1 ahead,
    # which would make the read below a hit.
    await reader.read(holder, QUARTER, QUARTER)
    policy = setup.cache._policies[0]
    assert isinstance(policy, FrequencyAdmissionPolicy)
    name = reader.block_id(setup.entry, 1).name
    before, misses = policy.count(name), setup.cache.stats().misses
    assert bytes(await reader.read(other, BLOCK, BLOCK)) == setup.body[BLOCK:2 * BLOCK]  # a whole block: no small read
    assert policy.count(name) == before + 1
    assert setup.cache.stats().misses == misses + 1
    await reader.drain()


# --- fail fast while the store is unreachable ---


async def test_unreachable_store_fails_fast_for_the_cooldown_then_is_tried_again(tmp_path: Path) -> None:
    setup = await make(tmp_path)

    async def read_block(index: int) -> bytes:
        handle = setup.reader.open(setup.entry)  # a fresh handle per read: no read-ahead in the way
        try:
            return bytes(await setup.reader.read(handle, index * BLOCK, BLOCK))
        finally:
            setup.reader.close(handle)

    assert await read_block(1) == setup.body[BLOCK:2 * BLOCK]
    await setup.reader.drain()
    setup.store.unreachable = True
    with pytest.raises(EndpointUnreachable):
        await read_block(8)
    assert len(setup.store.gets) == 2
    for index in (9, 10):  # within the cooldown: the error again, without asking the store
        with pytest.raises(EndpointUnreachable):
            await read_block(index)
    assert len(setup.store.gets) == 2
    assert await read_block(1) == setup.body[BLOCK:2 * BLOCK]  # cached: served, the store not asked
    assert len(setup.store.gets) == 2
    setup.store.unreachable = False
    setup.clock.now += 1.01  # the cooldown is over: the store is asked again
    assert await read_block(11) == setup.body[11 * BLOCK:12 * BLOCK]
    assert len(setup.store.gets) == 3
    await setup.reader.drain()


async def test_store_gate_counts_the_cooldown_from_the_failure(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    gate = StoreGate(setup.store, clock=setup.clock, cooldown=5.0)
    assert setup.clock.now == 1000.0
    setup.store.unreachable = True
    with pytest.raises(EndpointUnreachable):
        await gate.get_range("data.bin", 0, 10, setup.entry.etag)
    setup.store.unreachable = False
    setup.clock.now += 4.9
    with pytest.raises(EndpointUnreachable):
        await gate.get_range("data.bin", 0, 10, setup.entry.etag)
    assert len(setup.store.gets) == 1
    setup.clock.now = 1005.0  # the failure was at 1000.0: the cooldown ends exactly now
    assert await gate.get_range("data.bin", 0, 10, setup.entry.etag) == setup.body[:10]
    assert await gate.get_range("data.bin", 10, 10, setup.entry.etag) == setup.body[10:20]
    assert len(setup.store.gets) == 3


# --- small random reads ---


async def test_small_random_read_gets_just_its_bytes_and_warms_the_block(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    offset = 5 * BLOCK + 1000
    assert bytes(await setup.reader.read(handle, offset, 4096)) == setup.body[offset:offset + 4096]
    assert Get("data.bin", offset, 4096) in setup.store.gets  # answered by a GET of just those bytes
    await setup.reader.drain()
    assert sorted(setup.store.gets, key=lambda get: get.length) == [Get("data.bin", offset, 4096),
                                                                     Get("data.bin", 5 * BLOCK, BLOCK)]
    assert setup.cache.contains(setup.reader.block_id(setup.entry, 5))  # the whole block, for next time
    other = setup.reader.open(setup.entry)
    for start in (offset + 8192, offset + 20000):
        assert bytes(await setup.reader.read(other, start, 4096)) == setup.body[start:start + 4096]
    assert len(setup.store.gets) == 2  # served from the cached block
    assert setup.reader.stats.hit_bytes == 2 * 4096
    assert setup.reader.stats.gets == 2 and setup.reader.stats.miss_bytes == 4096 + BLOCK


async def test_a_quarter_block_is_still_a_small_read(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    offset = 3 * BLOCK + QUARTER
    assert bytes(await setup.reader.read(handle, offset, QUARTER)) == setup.body[offset:offset + QUARTER]
    assert Get("data.bin", offset, QUARTER) in setup.store.gets
    await setup.reader.drain()


async def test_large_random_read_fetches_whole_blocks(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    offset = 5 * BLOCK + 1000
    assert bytes(await setup.reader.read(handle, offset, BLOCK // 2)) == setup.body[offset:offset + BLOCK // 2]
    await setup.reader.drain()
    assert setup.store.gets == [Get("data.bin", 5 * BLOCK, BLOCK)]


async def _true(value: bool) -> bool:
    return value


# --- warm (DataLoad) ---


async def test_warm_fetches_a_block_into_the_cache_once_and_then_skips_it(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    block = setup.reader.block_id(setup.entry, 3)
    assert await setup.reader.warm(setup.entry, 3) is True
    assert setup.cache.contains(block)  # written when warm returns, not later
    assert await setup.reader.warm(setup.entry, 3) is False
    assert setup.blocks_fetched() == [3]
    handle = setup.reader.open(setup.entry)
    assert bytes(await setup.reader.read(handle, 3 * BLOCK, BLOCK)) == setup.body[3 * BLOCK:4 * BLOCK]
    assert setup.blocks_fetched() == [3]


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
async def test_warm_fetches_again_a_block_whose_file_went_from_under_the_cache(tmp_path: Path, damage: str) -> None:
    # A block file deleted while the mount runs (a person freeing room, a cleaner of old files) or garbled stayed in
    # the cache's index until a read: a DataLoad took the block for cached and skipped it, so the load ended done
    # with the block on no disk (and the inventory still counting it).
    setup = await make(tmp_path)
    block = setup.reader.block_id(setup.entry, 3)
    assert await setup.reader.warm(setup.entry, 3) is True
    path = tmp_path / "cache" / block.name[:2] / block.name
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"")
    assert await setup.reader.warm(setup.entry, 3) is True
    assert setup.blocks_fetched() == [3, 3]
    assert setup.cache.get(block) == setup.body[3 * BLOCK:4 * BLOCK]
    assert await setup.reader.warm(setup.entry, 3) is False, "a sound file is still skipped"


async def test_warm_joins_a_read_in_flight_and_a_read_joins_a_warm(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    setup.store.hold()
    handle = setup.reader.open(setup.entry)
    read = asyncio.ensure_future(setup.reader.read(handle, 5 * BLOCK, BLOCK))
    await eventually(lambda: _true(setup.store.waiting >= 1), what="a GET held at the store")
    warms = [asyncio.ensure_future(setup.reader.warm(setup.entry, index)) for index in (5, 6)]
    await eventually(lambda: _true(setup.store.waiting >= 2), what="the second block's GET held too")
    other = setup.reader.open(setup.entry)
    read_6 = asyncio.ensure_future(setup.reader.read(other, 6 * BLOCK, BLOCK))
    setup.store.release()
    assert bytes(await read) == setup.body[5 * BLOCK:6 * BLOCK]
    assert bytes(await read_6) == setup.body[6 * BLOCK:7 * BLOCK]
    assert [await warm for warm in warms] == [True, True]
    await setup.reader.drain()
    assert sorted(setup.blocks_fetched()) == [5, 6]
    assert all(setup.cache.contains(setup.reader.block_id(setup.entry, i)) for i in (5, 6))


async def test_warm_fills_the_block_file_that_a_plain_write_would_and_nothing_else(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    assert setup.cache.writes_files
    for index in (0, BLOCKS - 1):
        assert await setup.reader.warm(setup.entry, index) is True
    plain = BlockCache([DiskTier(tmp_path / "plain", 64 * BLOCKS * BLOCK)])
    plain.load()
    for index in (0, BLOCKS - 1):
        block = setup.reader.block_id(setup.entry, index)
        assert plain.put(block, setup.body[index * BLOCK:(index + 1) * BLOCK])
        name = block.name
        filled, written = (root / name[:2] / name for root in (tmp_path / "cache", tmp_path / "plain"))
        assert filled.read_bytes() == written.read_bytes()
        assert setup.cache.get(block) == setup.body[index * BLOCK:(index + 1) * BLOCK]
    # Fetched for a load, not for a read: loaded bytes, no miss (the autoscaler reads its hit ratio off misses).
    stats = setup.reader.stats
    assert (stats.gets, stats.loaded_bytes, stats.miss_bytes, stats.hit_bytes) == (2, 2 * BLOCK, 0, 0)
    assert not setup.reader._store_inflight and not setup.reader._filling and not setup.reader._loading


async def test_warm_into_a_cache_with_a_memory_tier_keeps_the_plain_path(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    cache = BlockCache([MemoryTier(64 * BLOCK), DiskTier(tmp_path / "mixed", 64 * BLOCK)])
    assert not cache.writes_files
    reader = BlockReader(cache, setup.reader.gates, BLOCK, setup.budget, write_block=cache.put_async)
    assert await reader.warm(setup.entry, 2) is True
    assert cache.get(reader.block_id(setup.entry, 2)) == setup.body[2 * BLOCK:3 * BLOCK]
    assert (reader.stats.loaded_bytes, reader.stats.miss_bytes) == (BLOCK, 0)
    assert not reader._loading


@pytest.mark.parametrize("memory_tier", [False, True], ids=["fill into the block file", "plain fetch"])
async def test_a_loads_fetch_is_a_read_miss_once_a_reader_joins_it_and_a_read_after_the_load_is_a_hit(
        tmp_path: Path, memory_tier: bool) -> None:
    # Warming a dataset counted every block as a store read: its hit ratio read 0 % and the runtime's autoscaler
    # added a worker for it. Only what readers (and peers) asked the store for is a miss.
    setup = await make(tmp_path)
    reader = setup.reader
    if memory_tier:
        cache = BlockCache([MemoryTier(64 * BLOCK), DiskTier(tmp_path / "mixed", 64 * BLOCK)])
        reader = BlockReader(cache, reader.gates, BLOCK, setup.budget, write_block=cache.put_async)
    setup.store.hold()
    alone = asyncio.ensure_future(reader.warm(setup.entry, 1))
    joined = asyncio.ensure_future(reader.warm(setup.entry, 2))
    await eventually(lambda: _true(setup.store.waiting >= 2), what="both loads' GETs held at the store")
    read = asyncio.ensure_future(reader.read(reader.open(setup.entry), 2 * BLOCK, BLOCK))
    second = reader.block_id(setup.entry, 2)
    await eventually(lambda: _true(second not in reader._loading), what="the read joined the load's fetch")
    setup.store.release()
    assert await alone is True and await joined is True
    assert bytes(await read) == setup.body[2 * BLOCK:3 * BLOCK]
    await reader.drain()
    assert (reader.stats.loaded_bytes, reader.stats.miss_bytes, reader.stats.hit_bytes) == (BLOCK, BLOCK, 0)
    assert bytes(await reader.read(reader.open(setup.entry), BLOCK, BLOCK)) == setup.body[BLOCK:2 * BLOCK]
    assert (reader.stats.loaded_bytes, reader.stats.miss_bytes, reader.stats.hit_bytes) == (BLOCK, BLOCK, BLOCK)
    assert not reader._loading


async def test_warm_raises_the_store_error_and_caches_nothing(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    setup.store.unreachable = True
    with pytest.raises(EndpointUnreachable):
        await setup.reader.warm(setup.entry, 0)
    assert not setup.cache.contains(setup.reader.block_id(setup.entry, 0))


async def test_a_file_of_a_mount_a_resync_removed_is_stale_not_an_unexpected_error(tmp_path: Path) -> None:
    gates = []
    for mount in range(2):
        folder = tmp_path / f"mount-{mount}"
        folder.mkdir()
        (folder / "f.bin").write_bytes(os.urandom(BLOCK))
        gates.append(StoreGate(LocalObjectStore(LocalLocation(root=folder))))
    info = await gates[1].store.head("f.bin")
    cache = BlockCache([MemoryTier(8 * BLOCK)])
    reader = BlockReader(cache, gates, BLOCK, MemoryBudget(8 * BLOCK), write_block=cache.put_async)
    handle = reader.open(ManifestEntry(path="/m1/f.bin", mount=1, key="f.bin", size=BLOCK, etag=info.etag,
                                       mtime=1.0))
    del gates[1]  # the resync's new list of stores, edited in place as the mount process does
    with pytest.raises(ObjectChanged, match="no longer in the dataset"):
        await reader.read(handle, 0, BLOCK)


async def test_a_removed_mount_never_lends_its_blocks_to_the_mount_moved_into_its_place(tmp_path: Path) -> None:
    """Two local mounts, each with x.bin of one size and time but other bytes, both read (and cached). The next
    sync removes mount 0, so mount 1 is now at position 0, and the mount process keeps the blocks whose (position,
    key, ETag) the new manifest still names (``mountd._drop_stale``). The ETag names the mount point, so none of
    mount 0's blocks is kept for it: the read returns mount 1's bytes, fetched from its store."""
    stores, bodies = [], []
    for index in range(2):
        body = os.urandom(100_000)
        path = tmp_path / f"m{index}" / "x.bin"
        path.parent.mkdir()
        path.write_bytes(body)
        os.utime(path, ns=(10**18, 10**18))
        stores.append(LocalObjectStore(LocalLocation(root=path.parent, source=f"local:///data/m{index}/")))
        bodies.append(body)
    infos = [await store.head("x.bin") for store in stores]
    cache = BlockCache([DiskTier(tmp_path / "cache", 1 << 24)])
    cache.load()
    gates = [StoreGate(store) for store in stores]
    reader = BlockReader(cache, gates, 65536, MemoryBudget(1 << 22), write_block=cache.put_async)
    for index in range(2):
        entry = ManifestEntry(path=f"/m{index}/x.bin", mount=index, key="x.bin", size=100_000,
                              etag=infos[index].etag, mtime=1.0)
        handle = reader.open(entry)
        assert bytes(await reader.read(handle, 0, 100_000)) == bodies[index]
        reader.close(handle)
        await reader.drain()
    moved = ManifestEntry(path="/m1/x.bin", mount=0, key="x.bin", size=100_000, etag=infos[1].etag, mtime=1.0)
    cache.drop_stale(lambda block: (block.mount, block.key, block.etag) == (moved.mount, moved.key, moved.etag))
    gates[:] = [gates[1]]
    handle = reader.open(moved)
    assert bytes(await reader.read(handle, 0, 100_000)) == bodies[1]
    reader.close(handle)


async def test_a_long_lived_reader_remembers_only_the_hints_of_its_read_ahead_window(tmp_path: Path) -> None:
    # OpenFile.advised kept every cached block ever hinted to the kernel: a long-lived process reading a huge
    # cached file held one entry per block for as long as it read. Now only the window's are kept, and each
    # block is still hinted once.
    blocks = 200
    setup = await make(tmp_path, size=blocks * BLOCK, max_ahead_blocks=4)
    first = setup.reader.open(setup.entry)
    await read_sequentially(setup, first, 0, blocks * BLOCK, BLOCK)  # every block cached
    setup.reader.close(first)
    await setup.reader.drain()
    setup.recording.hinted.clear()
    handle = setup.reader.open(setup.entry)
    most = 0
    for offset in range(0, blocks * BLOCK, QUARTER):
        assert bytes(await setup.reader.read(handle, offset, QUARTER)) == setup.body[offset:offset + QUARTER]
        most = max(most, len(handle.advised))
    assert most <= 4, f"at most the read-ahead window's blocks remembered, not {most}"
    assert sorted(setup.recording.hinted) == list(range(1, blocks)), "every cached block ahead hinted, once"
    setup.reader.close(handle)
    await setup.reader.drain()


class SlowDisk:
    """Cache writes that wait until ``go`` is set (a disk slower than the reader), counting those waiting."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.go = asyncio.Event()
        self.waiting = 0
        self.most_waiting = 0

    async def write(self, block: BlockId, data: bytes) -> bool:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.go.wait()
        finally:
            self.waiting -= 1
        return await self.cache.put_async(block, data)


class NoFills(RecordingCache):
    """A cache a load cannot fill in place (a MEM tier beside the disk): its blocks are written as a read's are."""

    @property
    def writes_files(self) -> bool:
        return False


async def test_cache_writes_behind_a_slow_disk_are_bounded_and_the_rest_are_not_cached_and_counted(
        tmp_path: Path) -> None:
    # A reader faster than the disk queued a write, holding its block, for every block it fetched: memory grew
    # without limit. Past max_writing_blocks a fetched block is served and not cached (a later miss), counted.
    setup = await make(tmp_path)
    disk = SlowDisk(setup.cache)
    dropped: list[None] = []
    reader = BlockReader(setup.recording, setup.reader.gates, BLOCK, setup.budget, write_block=disk.write,
                         max_ahead_blocks=2)
    reader.max_writing_blocks, reader.write_dropped = 4, lambda: dropped.append(None)
    handle = reader.open(setup.entry)
    for offset in range(0, BLOCKS * BLOCK, BLOCK):
        assert bytes(await reader.read(handle, offset, BLOCK)) == setup.body[offset:offset + BLOCK]
    reader.close(handle)
    assert disk.most_waiting == 4, f"at most 4 writes wait for the disk, not {disk.most_waiting}"
    assert reader.stats.dropped_writes == len(dropped) == BLOCKS - 4
    disk.go.set()
    await reader.drain()
    cached = [index for index in range(BLOCKS) if setup.cache.contains(reader.block_id(setup.entry, index))]
    assert len(cached) == 4, cached
    assert len(setup.store.gets) == BLOCKS, "every block fetched once: the dropped ones were served all the same"


async def test_a_loads_block_is_written_whatever_waits_for_the_disk(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    disk = SlowDisk(setup.cache)
    reader = BlockReader(NoFills(setup.cache), setup.reader.gates, BLOCK, setup.budget, write_block=disk.write,
                         max_ahead_blocks=0, max_writing_blocks=1)
    handle = reader.open(setup.entry)
    await reader.read(handle, 0, BLOCK)  # its write waits: the one allowed
    reader.close(handle)

    async def ahead_dropped() -> bool:  # block 1, fetched ahead, is not cached
        return reader.stats.dropped_writes == 1

    await eventually(ahead_dropped, 5, "the write of the block fetched ahead dropped")
    warming = asyncio.ensure_future(reader.warm(setup.entry, 5))

    async def load_write_waits() -> bool:
        return disk.waiting >= 2

    await eventually(load_write_waits, 5, "the load's block waiting for the disk beside the read's")
    assert reader.stats.dropped_writes == 1, "block 1's write only"
    disk.go.set()
    assert await warming
    assert setup.cache.contains(reader.block_id(setup.entry, 5)), "the load's block cached"
    await reader.drain()
