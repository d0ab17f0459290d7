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

import pytest

from libs.manifest import ManifestEntry
from libs.ufs import LocalLocation, LocalObjectStore
from libs.ufs.base import EndpointUnreachable
from services.agent.cache import BlockCache, DiskTier
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate
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

    def blocks_fetched(self) -> list[int]:
        """Indices of the whole blocks GET so far, in order."""
        return [get.start // BLOCK for get in self.store.gets if get.length == BLOCK and get.start % BLOCK == 0]


async def make(tmp_path: Path, budget_blocks: int = 64, size: int = BLOCKS * BLOCK) -> Setup:
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
    reader = BlockReader(cache, [StoreGate(store, clock=clock)], BLOCK, budget, write_block=cache.put_async)
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag,
                          mtime=info.mtime)
    return Setup(reader, store, cache, budget, entry, body, clock)


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
    setup.store.unreachable = True
    with pytest.raises(EndpointUnreachable):
        await gate.get_range("data.bin", 0, 10, setup.entry.etag)
    setup.store.unreachable = False
    setup.clock.now += 4.9
    with pytest.raises(EndpointUnreachable):
        await gate.get_range("data.bin", 0, 10, setup.entry.etag)
    assert len(setup.store.gets) == 1
    setup.clock.now += 0.2
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
    assert bytes(await setup.reader.read(other, offset + 8192, 4096)) == setup.body[offset + 8192:offset + 12288]
    assert len(setup.store.gets) == 2  # served from the cached block
    assert setup.reader.stats.hit_bytes == 4096


async def test_large_random_read_fetches_whole_blocks(tmp_path: Path) -> None:
    setup = await make(tmp_path)
    handle = setup.reader.open(setup.entry)
    offset = 5 * BLOCK + 1000
    assert bytes(await setup.reader.read(handle, offset, BLOCK // 2)) == setup.body[offset:offset + BLOCK // 2]
    await setup.reader.drain()
    assert setup.store.gets == [Get("data.bin", 5 * BLOCK, BLOCK)]


async def _true(value: bool) -> bool:
    return value
