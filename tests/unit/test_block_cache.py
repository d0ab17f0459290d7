"""BlockCache over memory and temporary-directory tiers: placement, quotas, restarts, failures and callbacks."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.blocks import BlockId
from libs.events.runtime import Level
from services.agent.cache import BlockCache, DiskTier, FrequencyAdmissionPolicy, LruPolicy, MemoryTier, PolicyFactory
from services.agent.cache import tiers as tiers_module
from services.agent.cache.tiers import BLOCK_SIZE_FILE, HEADER, MARKER

SIZE = 1000
COOLDOWN = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Inventory:
    """What a consumer of the callbacks knows; fails on a double add or a remove of something never added."""

    def __init__(self) -> None:
        self.blocks: dict[BlockId, int] = {}
        self.cached: list[BlockId] = []
        self.evicted: list[BlockId] = []

    def on_cached(self, block: BlockId, size: int) -> None:
        assert block not in self.blocks, f"{block} cached twice"
        self.blocks[block] = size
        self.cached.append(block)

    def on_evicted(self, block: BlockId, size: int) -> None:
        assert self.blocks.pop(block) == size, f"{block} evicted but never cached"
        self.evicted.append(block)


def block(index: int, etag: str = "e1", key: str = "train/shard-0.tar") -> BlockId:
    return BlockId(mount=0, key=key, etag=etag, index=index)


def payload(index: int, size: int = SIZE) -> bytes:
    return bytes((index * 13 + i) % 253 for i in range(size))


def disk(path: Path, blocks: int, clock: Clock | None = None, high: float = 0.95, low: float = 0.7) -> DiskTier:
    return DiskTier(path, blocks * SIZE, high=high, low=low, now=clock or Clock(), cooldown_seconds=COOLDOWN)


def block_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and path.name not in (MARKER, BLOCK_SIZE_FILE)]


@pytest.fixture
def inventory() -> Inventory:
    return Inventory()


def make_cache(*tiers: MemoryTier | DiskTier, inventory: Inventory, policy: PolicyFactory = LruPolicy) -> BlockCache:
    cache = BlockCache(list(tiers), policy, inventory.on_cached, inventory.on_evicted)
    cache.load()
    return cache


# -- basics -----------------------------------------------------------------------------------------------


def test_put_then_get_counts_hits_and_misses(inventory: Inventory) -> None:
    cache = make_cache(MemoryTier(10 * SIZE), inventory=inventory)
    assert cache.get(block(0)) is None
    assert cache.put(block(0), payload(0))
    assert cache.contains(block(0))
    assert cache.get(block(0)) == payload(0)
    assert cache.put(block(0), payload(0))  # already cached: nothing changes
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.cached_bytes, stats.capacity_bytes) == (1, 1, SIZE, 10 * SIZE)
    assert cache.blocks() == [(block(0), SIZE)]
    assert inventory.cached == [block(0)]


def test_memory_first_then_disk_whatever_order_the_tiers_are_given(tmp_path: Path, inventory: Inventory) -> None:
    ssd = disk(tmp_path / "ssd", 10, high=1.0, low=0.5)
    memory = MemoryTier(2 * SIZE, high=1.0, low=0.5)
    cache = make_cache(ssd, memory, inventory=inventory, policy=FrequencyAdmissionPolicy)
    assert [tier.medium for tier in cache.tiers] == ["MEM", "SSD"]
    for index in range(4):
        cache.get(block(index))
        assert cache.put(block(index), payload(index))
    # Memory took the first two; it refused the next ones (seen once, like its residents), so they went to disk.
    assert memory.read(block(0).name) == payload(0) and memory.read(block(1).name) == payload(1)
    assert {path.name for path in block_files(tmp_path / "ssd")} == {block(2).name, block(3).name}
    assert all(cache.get(block(index)) == payload(index) for index in range(4))
    usage = [(t.medium, t.used_bytes, t.blocks) for t in cache.stats().tiers]
    assert usage == [("MEM", 2 * SIZE, 2), ("SSD", 2 * SIZE, 2)]


def test_with_lru_the_first_tier_always_admits_so_lower_tiers_get_only_what_does_not_fit(
    tmp_path: Path, inventory: Inventory
) -> None:
    cache = make_cache(MemoryTier(3 * SIZE, high=1.0, low=0.5), disk(tmp_path / "ssd", 10), inventory=inventory)
    for index in range(6):
        assert cache.put(block(index), payload(index))
    assert cache.put(block(9), payload(9, 4 * SIZE))  # larger than memory's high watermark
    assert {path.name for path in block_files(tmp_path / "ssd")} == {block(9).name}


def test_a_block_larger_than_every_tier_is_not_cached(inventory: Inventory) -> None:
    cache = make_cache(MemoryTier(SIZE), inventory=inventory)
    assert not cache.put(block(0), payload(0, 2 * SIZE))
    assert cache.get(block(0)) is None
    assert inventory.cached == []


# -- quota and watermarks ---------------------------------------------------------------------------------


def test_disk_usage_stays_under_the_high_watermark_and_eviction_goes_down_to_the_low_one(
    tmp_path: Path, inventory: Inventory
) -> None:
    ssd = disk(tmp_path / "ssd", 10, high=0.8, low=0.5)  # 8 blocks at most; evict down to 5
    cache = make_cache(ssd, inventory=inventory)
    used = []
    for index in range(30):
        assert cache.put(block(index), payload(index))
        stats = cache.stats()
        used.append(stats.cached_bytes // SIZE)
        assert stats.cached_bytes <= 0.8 * 10 * SIZE
        files = block_files(tmp_path / "ssd")
        assert len(files) == stats.tiers[0].blocks
        assert sum(path.stat().st_size - HEADER.size for path in files) < ssd.quota_bytes
    assert used[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6]  # the 9th block evicts 4 (8 + 1 - 5), oldest first
    assert inventory.evicted[:4] == [block(0), block(1), block(2), block(3)]
    assert set(inventory.blocks) == {b for b, _ in cache.blocks()}


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["get", "put", "drop"]), st.integers(0, 15), st.integers(1, 3 * SIZE)),
        max_size=80,
    ),
    frequency=st.booleans(),
)
def test_any_sequence_keeps_every_tier_within_its_quota_and_the_callbacks_exact(
    ops: list[tuple[str, int, int]], frequency: bool
) -> None:
    inventory = Inventory()
    memory = MemoryTier(4 * SIZE, high=0.9, low=0.6)
    second = MemoryTier(6 * SIZE, high=0.95, low=0.7)
    second.medium = "SSD"  # a second level without a disk, to keep this property test fast
    cache = make_cache(memory, second, inventory=inventory, policy=FrequencyAdmissionPolicy if frequency else LruPolicy)
    for op, index, size in ops:
        if op == "get":
            data = cache.get(block(index))
            assert data is None or data == payload(index, len(data))
        elif op == "put":
            cache.put(block(index), payload(index, size))
        else:
            cache.drop_stale(lambda b: b.index != index)  # noqa: B023 - called right here, in this iteration
        stats = cache.stats()
        for tier in stats.tiers:
            assert tier.used_bytes <= tier.quota_bytes
        assert dict(cache.blocks()) == inventory.blocks
        assert stats.cached_bytes == sum(inventory.blocks.values())


# -- restart ----------------------------------------------------------------------------------------------


def test_a_new_cache_over_the_same_directories_serves_every_block_without_any_put(
    tmp_path: Path, inventory: Inventory
) -> None:
    policy = FrequencyAdmissionPolicy
    first = make_cache(MemoryTier(2 * SIZE), disk(tmp_path / "ssd", 20), inventory=inventory, policy=policy)
    for index in range(12):
        assert first.put(block(index), payload(index))
    on_disk = {b for b, _ in first.blocks()} - {block(0)}  # memory holds one block (0.95 x 2), refused the rest
    assert {path.name for path in block_files(tmp_path / "ssd")} == {b.name for b in on_disk}

    restarted = Inventory()
    second = BlockCache(
        [MemoryTier(2 * SIZE), disk(tmp_path / "ssd", 20)], policy, restarted.on_cached, restarted.on_evicted
    )
    assert second.load() == len(on_disk) == 11
    assert set(restarted.cached) == on_disk
    for b in on_disk:
        assert second.contains(b)
        assert second.get(b) == payload(b.index)
    assert second.stats().misses == 0
    assert second.load() == 0  # idempotent
    assert restarted.evicted == []


def test_blocks_cut_at_another_block_size_are_deleted_at_the_restart_not_served(tmp_path: Path) -> None:
    # Block 1 cut at 1,000 bytes and block 1 cut at 500 are other bytes of the file under the same block name.
    first = BlockCache([disk(tmp_path / "ssd", 20)], LruPolicy)
    assert first.load(SIZE) == 0
    for index in range(4):
        assert first.put(block(index), payload(index))
    same = BlockCache([disk(tmp_path / "ssd", 20)], LruPolicy)
    assert same.load(SIZE) == 4  # the same size: every block kept
    restarted = Inventory()
    smaller = BlockCache([disk(tmp_path / "ssd", 20)], LruPolicy, restarted.on_cached, restarted.on_evicted)
    assert smaller.load(SIZE // 2) == 0
    assert block_files(tmp_path / "ssd") == [] and restarted.cached == []
    assert smaller.get(block(1)) is None
    assert smaller.put(block(1), payload(1, SIZE // 2))
    assert BlockCache([disk(tmp_path / "ssd", 20)], LruPolicy).load(SIZE // 2) == 1  # the new size is recorded


def test_a_tier_emptied_of_blocks_leaves_no_folder_behind_with_its_block_size_record(tmp_path: Path) -> None:
    tier = disk(tmp_path / "ssd", 20)
    assert tier.scan(SIZE) == [] and (tmp_path / "ssd" / BLOCK_SIZE_FILE).exists()
    tier.remove_empty_directories()
    assert not (tmp_path / "ssd").exists()


def test_after_a_restart_with_a_smaller_quota_the_newest_blocks_are_kept(tmp_path: Path, inventory: Inventory) -> None:
    first = make_cache(disk(tmp_path / "ssd", 20, high=1.0, low=0.5), inventory=inventory)
    for index in range(10):
        assert first.put(block(index), payload(index))
        path = Path(first.tiers[0].location, block(index).name[:2], block(index).name)
        os.utime(path, (1000 + index, 1000 + index))  # strictly increasing, whatever the clock's granularity
    smaller = make_cache(disk(tmp_path / "ssd", 4, high=1.0, low=0.5), inventory=Inventory())
    kept = [b for b, _ in smaller.blocks()]
    assert kept == [block(6), block(7), block(8), block(9)]  # oldest first, as the LRU order
    assert len(block_files(tmp_path / "ssd")) == 4
    assert smaller.stats().tiers[0].used_bytes == 4 * SIZE


# -- corruption, staleness --------------------------------------------------------------------------------


def test_a_corrupt_block_is_a_miss_reported_once_and_cached_again_by_the_next_put(
    tmp_path: Path, inventory: Inventory
) -> None:
    cache = make_cache(disk(tmp_path / "ssd", 10), inventory=inventory)
    assert cache.put(block(0), payload(0))
    path = tmp_path / "ssd" / block(0).name[:2] / block(0).name
    raw = bytearray(path.read_bytes())
    raw[HEADER.size + 10] ^= 1
    path.write_bytes(bytes(raw))

    assert cache.get(block(0)) is None
    assert not path.exists()
    assert inventory.evicted == [block(0)]
    assert not cache.contains(block(0))
    stats = cache.stats()
    assert (stats.corrupt_blocks, stats.cached_bytes, stats.misses) == (1, 0, 1)
    assert cache.get(block(0)) is None  # a plain miss now, not counted again
    assert cache.put(block(0), payload(0))
    assert cache.get(block(0)) == payload(0)
    assert cache.stats().corrupt_blocks == 1


def test_a_block_file_deleted_behind_the_cache_is_forgotten(tmp_path: Path, inventory: Inventory) -> None:
    cache = make_cache(disk(tmp_path / "ssd", 10), inventory=inventory)
    assert cache.put(block(0), payload(0))
    (tmp_path / "ssd" / block(0).name[:2] / block(0).name).unlink()
    assert cache.get(block(0)) is None
    assert inventory.evicted == [block(0)]
    assert cache.blocks() == []


def test_drop_stale_removes_blocks_of_objects_that_changed(tmp_path: Path, inventory: Inventory) -> None:
    cache = make_cache(disk(tmp_path / "ssd", 10), inventory=inventory)
    for index in range(3):
        assert cache.put(block(index, etag="old"), payload(index))
        assert cache.put(block(index, etag="new"), payload(index))
    assert cache.put(block(0, key="other"), payload(0))
    current = {("train/shard-0.tar", "new"), ("other", "e1")}

    assert cache.drop_stale(lambda b: (b.key, b.etag) in current) == 3

    assert sorted(b.etag for b, _ in cache.blocks()) == ["e1", "new", "new", "new"]
    assert sorted(inventory.evicted, key=lambda b: b.index) == [block(i, etag="old") for i in range(3)]
    assert {path.name for path in block_files(tmp_path / "ssd")} == {b.name for b, _ in cache.blocks()}
    assert cache.get(block(1, etag="old")) is None
    assert cache.get(block(1, etag="new")) == payload(1)


# -- failing disks ----------------------------------------------------------------------------------------


def test_a_removed_cache_directory_is_bypassed_then_used_again_after_the_cool_down(
    tmp_path: Path, inventory: Inventory
) -> None:
    clock = Clock()
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 10, clock), inventory=inventory)
    assert cache.put(block(0), payload(0))
    shutil.rmtree(root)

    assert cache.get(block(0)) is None  # file gone: forgotten
    for index in range(1, 4):
        assert cache.put(block(index), payload(index)) is False  # never raises
    stats = cache.stats()
    assert stats.tiers[0].health == "down"
    assert cache.blocks() == []
    assert not cache.put(block(4), payload(4))  # bypassed: no write attempted while down
    assert not root.exists()

    root.mkdir()
    clock.now += COOLDOWN
    assert cache.put(block(4), payload(4))
    assert cache.stats().tiers[0].health == "normal"
    assert cache.get(block(4)) == payload(4)
    assert inventory.cached == [block(0), block(4)] and inventory.evicted == [block(0)]


def test_blocks_on_a_tier_with_io_errors_stay_indexed_and_are_served_after_recovery(
    tmp_path: Path, inventory: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    cache = make_cache(
        MemoryTier(4 * SIZE), disk(tmp_path / "ssd", 10, clock), inventory=inventory, policy=FrequencyAdmissionPolicy
    )
    for index in range(5):
        assert cache.put(block(index), payload(index))
    on_disk = block(4)  # memory took 0-2 (3.8 blocks fit) and refused the rest, which went to disk
    assert not cache.tiers[0].read(on_disk.name)

    def broken_pread(fd: int, size: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tiers_module.os, "pread", broken_pread)
    for _ in range(3):
        assert cache.get(on_disk) is None
    assert cache.stats().tiers[1].health == "down"
    assert not cache.contains(on_disk)
    assert on_disk in dict(cache.blocks())  # its disk may come back
    assert cache.get(block(0)) == payload(0)  # memory unaffected
    assert inventory.evicted == []

    monkeypatch.undo()
    assert cache.get(on_disk) is None  # still cooling down
    clock.now += COOLDOWN
    assert cache.contains(on_disk)
    assert cache.get(on_disk) == payload(4)
    assert cache.stats().tiers[1].health == "normal"


# -- reservations and writes in worker threads ------------------------------------------------------------


def test_reservations_hold_room_are_invisible_until_committed_and_release_room_on_failure(
    inventory: Inventory,
) -> None:
    cache = make_cache(MemoryTier(3 * SIZE, high=1.0, low=0.5), inventory=inventory)
    first = cache.reserve(block(0), 2 * SIZE)
    assert first is not None
    assert cache.reserve(block(0), 2 * SIZE) is None  # being written
    assert cache.reserve(block(1), 2 * SIZE) is None  # 2 + 2 > 3 and nothing resident to evict
    assert cache.get(block(0)) is None and not cache.contains(block(0))
    assert cache.commit(first, False) is False
    assert cache.commit(first, True) is False  # committed already
    second = cache.reserve(block(1), 2 * SIZE)
    assert second is not None
    assert second.write(payload(1, 2 * SIZE))
    assert cache.commit(second, True)
    assert cache.get(block(1)) == payload(1, 2 * SIZE)
    assert inventory.cached == [block(1)]


def test_victim_files_are_deleted_by_the_write_and_cannot_be_reserved_meanwhile(
    tmp_path: Path, inventory: Inventory
) -> None:
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 3, high=1.0, low=0.67), inventory=inventory)
    for index in range(3):
        assert cache.put(block(index), payload(index))
    reservation = cache.reserve(block(3), SIZE)  # 4 blocks down to 2.01 (the low watermark): two go
    assert reservation is not None and reservation.victims == [block(0).name, block(1).name]
    assert inventory.evicted == [block(0), block(1)]  # out of the index at once
    assert len(block_files(root)) == 3  # the files go in write(), off the loop
    assert cache.reserve(block(0), SIZE) is None  # its old file is still to be deleted
    assert reservation.write(payload(3))
    assert cache.commit(reservation, True)
    assert {path.name for path in block_files(root)} == {block(2).name, block(3).name}
    assert cache.reserve(block(0), SIZE) is not None


def test_drop_stale_during_a_write_deletes_the_block_when_it_lands(tmp_path: Path, inventory: Inventory) -> None:
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 4), inventory=inventory)
    reservation = cache.reserve(block(0, etag="old"), SIZE)
    assert reservation is not None
    assert cache.drop_stale(lambda b: b.etag != "old") == 0
    assert reservation.write(payload(0))
    assert cache.commit(reservation, True) is False
    assert block_files(root) == []
    assert inventory.cached == [] and cache.stats().cached_bytes == 0


async def test_put_async_writes_disk_blocks_in_a_worker_thread(
    tmp_path: Path, inventory: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryTier(SIZE, high=1.0, low=0.5)
    cache = make_cache(memory, disk(tmp_path / "ssd", 4), inventory=inventory, policy=FrequencyAdmissionPolicy)
    loop_thread = threading.get_ident()
    threads: list[int] = []
    disk_tier = cache.tiers[1]
    original = disk_tier.write

    def recording_write(b: BlockId, data: bytes) -> bool:
        threads.append(threading.get_ident())
        return original(b, data)

    monkeypatch.setattr(disk_tier, "write", recording_write)
    assert await cache.put_async(block(0), payload(0))  # memory: inline
    assert await cache.put_async(block(1), payload(1))  # memory refuses it (full, not hotter): disk, in a thread
    assert threads and threads[0] != loop_thread
    assert cache.get(block(0)) == payload(0)
    assert cache.get(block(1)) == payload(1)
    assert await cache.put_async(block(1), payload(1))  # cached already
    assert inventory.cached == [block(0), block(1)]


async def test_a_cancelled_put_async_still_commits_the_write_that_ran(
    tmp_path: Path, inventory: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = asyncio.Event()

    def on_cached(b: BlockId, size: int) -> None:
        inventory.on_cached(b, size)
        committed.set()

    cache = BlockCache([disk(tmp_path / "ssd", 4)], LruPolicy, on_cached, inventory.on_evicted)
    cache.load()
    entered, release = threading.Event(), threading.Event()
    disk_tier = cache.tiers[0]
    original = disk_tier.write

    def slow_write(b: BlockId, data: bytes) -> bool:
        entered.set()
        release.wait(timeout=10)
        return original(b, data)

    monkeypatch.setattr(disk_tier, "write", slow_write)
    task = asyncio.create_task(cache.put_async(block(0), payload(0)))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.wait_for(committed.wait(), timeout=10)
    assert cache.get(block(0)) == payload(0)
    assert inventory.cached == [block(0)]


# -- from_levels ------------------------------------------------------------------------------------------


def test_from_levels_builds_the_tiers_of_a_runtime_under_a_per_dataset_folder(tmp_path: Path) -> None:
    levels = [
        Level(mediumtype="SSD", quota="10Mi", path=f"{tmp_path}/nvme0,{tmp_path}/nvme1", high="0.9", low="0.6"),
        Level(mediumtype="MEM", quota="1Mi"),
        Level(mediumtype="HDD", quota=4096, path=f"{tmp_path}/hdd"),
    ]
    cache = BlockCache.from_levels(levels, "default/demo")
    assert [(t.medium, t.location, t.quota_bytes, t.high, t.low) for t in cache.tiers] == [
        ("MEM", "memory", 1 << 20, 0.95, 0.7),
        ("SSD", f"{tmp_path}/nvme0/default/demo", 5 << 20, 0.9, 0.6),
        ("SSD", f"{tmp_path}/nvme1/default/demo", 5 << 20, 0.9, 0.6),
        ("HDD", f"{tmp_path}/hdd/default/demo", 4096, 0.95, 0.7),
    ]
    assert cache.stats().capacity_bytes == (1 << 20) + (10 << 20) + 4096
    assert cache.load() == 0
    assert (tmp_path / "nvme1" / "default" / "demo").is_dir()


@pytest.mark.parametrize("policy", [LruPolicy, FrequencyAdmissionPolicy])
def test_a_quota_list_keeps_each_directory_under_its_own_quota_and_fills_them_by_free_room(
        tmp_path: Path, policy: PolicyFactory) -> None:
    """Fluid's ``quotaList``: each directory of the tier holds at most its own quota, whatever is read. New blocks
    go to a directory with room, by free room, so both fill together (before: in the order listed, and with LRU
    the second directory got nothing while the first evicted); once both are full, eviction keeps each under its
    quota."""
    level = Level(mediumtype="SSD", quota=30 * SIZE, quota_list=f"{20 * SIZE},{10 * SIZE}",
                  path=f"{tmp_path}/big,{tmp_path}/small", high="1", low="0.5")
    cache = BlockCache.from_levels([level], "default/demo", policy_factory=policy)
    assert [t.quota_bytes for t in cache.tiers] == [20 * SIZE, 10 * SIZE]
    assert cache.load() == 0
    big, small = (tmp_path / "big" / "default" / "demo"), (tmp_path / "small" / "default" / "demo")
    for index in range(24):
        assert cache.put(block(index), payload(index))
    # 24 blocks fit in 30 without evicting: both directories took some, in proportion to their room.
    assert len(block_files(big)) + len(block_files(small)) == 24
    assert len(block_files(small)) >= 4 and len(block_files(big)) >= 8
    for epoch in range(3):
        for index in range(100):
            for _ in range(epoch + 1):
                if cache.get(block(index)) is None:
                    cache.put(block(index), payload(index))
            assert len(block_files(big)) <= 20 and len(block_files(small)) <= 10, (epoch, index)
    assert [t.used_bytes <= t.quota_bytes for t in cache.stats().tiers] == [True, True]
    assert len(block_files(small)) > 0 and len(block_files(big)) > 0


def test_a_quota_list_level_evicts_its_least_recently_used_blocks_whichever_directory_holds_them(
        tmp_path: Path) -> None:
    """Once every directory of a level is full, the one holding the level's least recently used block evicts, so
    new blocks replace old ones in every directory, and a block read again stays. Before, the one with the most
    free room evicted: it took every new block (its eviction left room there only), while the other directory kept
    the first blocks it got for ever, never read again (two thirds of the level, with quotaList 20,10 here)."""
    level = Level(mediumtype="SSD", quota=30 * SIZE, quota_list=f"{20 * SIZE},{10 * SIZE}",
                  path=f"{tmp_path}/big,{tmp_path}/small", high="0.95", low="0.8")
    cache = BlockCache.from_levels([level], "default/demo", policy_factory=LruPolicy)
    assert cache.load() == 0
    names = {block(index).name: index for index in range(300)}
    for index in range(300):
        assert cache.put(block(index), payload(index))
        assert cache.get(block(0)) == payload(0)  # read all along: the level's most recently used block
    for folder in ("big", "small"):
        held = sorted(names[path.name] for path in block_files(tmp_path / folder / "default" / "demo"))
        # Each directory holds only recent blocks (a single LRU over the level would keep the last 27 or so).
        assert held and all(index == 0 or index >= 300 - 60 for index in held), (folder, held)
    assert 0 in {b.index for b, _ in cache.blocks()}
    assert [t.used_bytes <= t.quota_bytes for t in cache.stats().tiers] == [True, True]


def test_a_quota_list_level_finds_its_blocks_again_in_their_directories_and_evicts_them_first(
        tmp_path: Path) -> None:
    """A restart finds each directory's blocks and counts them against that directory's quota; they are older than
    any block used since, so new blocks replace them in every directory before any new one goes (before, the
    directory with less free room kept its blocks from before the restart for ever)."""
    level = Level(mediumtype="SSD", quota=30 * SIZE, quota_list=f"{20 * SIZE},{10 * SIZE}",
                  path=f"{tmp_path}/big,{tmp_path}/small", high="0.95", low="0.8")
    before = BlockCache.from_levels([level], "default/demo", policy_factory=LruPolicy)
    before.load()
    for index in range(40):
        assert before.put(block(index), payload(index))
    held = [(t.location, t.used_bytes, t.blocks) for t in before.stats().tiers]
    assert all(blocks for _, _, blocks in held)

    cache = BlockCache.from_levels([level], "default/demo", policy_factory=LruPolicy)
    assert cache.load() == sum(blocks for _, _, blocks in held)
    assert [(t.location, t.used_bytes, t.blocks) for t in cache.stats().tiers] == held
    for index in range(100, 130):  # 30 new blocks: more than the level holds (19 + 9 under the watermarks)
        assert cache.put(block(index), payload(index))
    assert all(b.index >= 100 for b, _ in cache.blocks())
    assert [t.used_bytes <= t.quota_bytes and t.blocks > 0 for t in cache.stats().tiers] == [True, True]


@pytest.mark.parametrize("suffix", ["", "/abs", "default/../other"])
def test_from_levels_refuses_a_suffix_that_escapes_the_level_directory(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError, match="cache_root_suffix"):
        BlockCache.from_levels([Level(mediumtype="SSD", quota="1Mi", path=str(tmp_path))], suffix)


def test_from_levels_refuses_unknown_media_and_disk_levels_without_a_path() -> None:
    with pytest.raises(ValueError, match="mediumtype"):
        BlockCache.from_levels([Level(mediumtype="TAPE", quota="1Mi")], "default/demo")
    with pytest.raises(ValueError, match="path"):
        BlockCache.from_levels([Level(mediumtype="HDD", quota="1Mi")], "default/demo")
    with pytest.raises(ValueError, match="at least one tier"):
        BlockCache([])


# -- evictions asked for (DataClean) ---------------------------------------------------------------------


def test_evict_frees_the_blocks_named_through_the_inventory(tmp_path: Path, inventory: Inventory) -> None:
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 10), inventory=inventory)
    for index in range(5):
        assert cache.put(block(index), payload(index))

    evicted = cache.evict([block(1), block(4), block(9)])  # 9 was never cached

    assert evicted == [(block(1), SIZE), (block(4), SIZE)]
    assert inventory.evicted == [block(1), block(4)]
    assert cache.get(block(1)) is None and cache.get(block(4)) is None
    assert cache.stats().cached_bytes == 3 * SIZE
    assert {path.name for path in block_files(root)} == {block(i).name for i in (0, 2, 3)}


def test_cached_blocks_selects_every_version_of_a_file_for_evict(tmp_path: Path, inventory: Inventory) -> None:
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 10), inventory=inventory)
    for index in range(2):
        assert cache.put(block(index, etag="old"), payload(index))
        assert cache.put(block(index, etag="new"), payload(index))
    assert cache.put(block(0, key="other"), payload(0))

    chosen = cache.cached_blocks(lambda b: b.key == "train/shard-0.tar")
    assert sorted(b.name for b in chosen) == sorted(block(i, etag=e).name for i in range(2) for e in ("old", "new"))
    assert len(cache.evict(chosen)) == 4
    assert [b for b, _ in cache.blocks()] == [block(0, key="other")]
    assert [path.name for path in block_files(root)] == [block(0, key="other").name]


def test_evict_during_a_write_deletes_the_block_when_it_lands(tmp_path: Path, inventory: Inventory) -> None:
    root = tmp_path / "ssd"
    cache = make_cache(disk(root, 4), inventory=inventory)
    reservation = cache.reserve(block(0), SIZE)
    assert reservation is not None
    assert cache.evict([block(0)]) == []
    assert reservation.write(payload(0))
    assert cache.commit(reservation, True) is False
    assert block_files(root) == [] and inventory.cached == []
