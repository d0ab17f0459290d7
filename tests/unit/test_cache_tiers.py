"""Cache tiers over temporary directories: atomic checksummed block files, restart scans, and disk health."""

from __future__ import annotations

import errno
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from libs.blocks import BlockId
from services.agent.cache import BlockCache
from services.agent.cache import tiers as tiers_module
from services.agent.cache.tiers import HEADER, MARKER, DiskTier, Health, MemoryTier, ScanCancelled, ScannedBlock

COOLDOWN = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def block(index: int, key: str = "train/part-0.tar", etag: str = "e1") -> BlockId:
    return BlockId(mount=0, key=key, etag=etag, index=index)


def payload(index: int, size: int = 4096) -> bytes:
    return bytes((index * 7 + i) % 251 for i in range(size))


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and path.name != MARKER)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tier(tmp_path: Path, clock: Clock) -> DiskTier:
    disk = DiskTier(tmp_path / "cache", 1 << 20, cooldown_seconds=COOLDOWN, now=clock)
    assert disk.scan() == []
    return disk


# -- memory -----------------------------------------------------------------------------------------------


def test_memory_tier_stores_blocks_and_forgets_on_remove() -> None:
    memory = MemoryTier(1000, high=0.9, low=0.5)
    assert memory.write(block(0), b"abc")
    assert memory.read(block(0).name) == b"abc"
    assert memory.remove(block(0).name)
    assert memory.read(block(0).name) is None
    assert memory.scan() == []
    assert (memory.medium, memory.health, memory.corrupt_blocks, memory.available()) == ("MEM", Health.NORMAL, 0, True)


def test_limits_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quota"):
        MemoryTier(0)
    with pytest.raises(ValueError, match="watermarks"):
        DiskTier(tmp_path, 100, high=0.5, low=0.6)


# -- disk: layout and atomic writes -----------------------------------------------------------------------


def test_blocks_round_trip_under_sharded_names_with_no_temporary_files_left(tier: DiskTier) -> None:
    for index in range(20):
        assert tier.write(block(index), payload(index))
    for index in range(20):
        assert tier.read(block(index).name) == payload(index)
    files = files_under(tier.directory)
    assert sorted(path.name for path in files) == sorted(block(index).name for index in range(20))
    for path in files:
        assert path.parent.parent == tier.directory
        assert path.parent.name == path.name[:2]
    # header, chunk checksums, data, then the block id, so a restart can rebuild the index
    path = Path(tier.path_of(block(0).name))
    ident = msgspec.msgpack.encode(block(0))
    assert path.stat().st_size == HEADER.size + 8 + 4096 + len(ident)
    assert path.read_bytes().endswith(ident)


def test_an_empty_block_and_an_overwrite_are_fine(tier: DiskTier) -> None:
    assert tier.write(block(0), b"")
    assert tier.read(block(0).name) == b""
    assert tier.write(block(0), b"same block again")
    assert tier.read(block(0).name) == b"same block again"


def test_a_crash_mid_write_leaves_only_a_temporary_file_that_the_scan_deletes(tier: DiskTier) -> None:
    assert tier.write(block(1), payload(1))
    name = block(2).name
    shard = tier.directory / name[:2]
    shard.mkdir(exist_ok=True)
    # What a crash between open and os.replace leaves: a partial temporary file, never the final name.
    temp = shard / f".{name}.4242.0.tmp"
    temp.write_bytes(payload(2)[:100])
    assert tier.read(name) is None
    scanned = tier.scan()
    assert [(s.block, s.name, s.size) for s in scanned] == [(block(1), block(1).name, 4096)]
    assert not temp.exists()


def test_a_failing_write_removes_its_temporary_file_and_publishes_nothing(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiers_module.os, "writev", no_space)  # buffered writes
    monkeypatch.setattr(tiers_module.os, "pwrite", no_space)  # O_DIRECT writes
    assert not tier.write(block(3), payload(3))
    assert files_under(tier.directory) == []
    assert tier.health is Health.DOWN  # a full disk: down at once, until the cool-down's probe fits


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path / "buffered", 64 * 1024 * 1024, direct_io=False)
    tier.scan()
    real_writev = os.writev

    def short_writev(fd: int, parts: tuple[bytes, ...]) -> int:
        return real_writev(fd, [parts[0], parts[1][:1000]])  # header and 1000 bytes of data only

    monkeypatch.setattr(tiers_module.os, "writev", short_writev)
    assert tier.write(block(4), payload(4))
    monkeypatch.undo()
    assert tier.read(block(4).name) == payload(4)
    assert [s.block for s in tier.scan()] == [block(4)]


def test_short_direct_writes_are_completed(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        return real_pwrite(fd, data[:8192], offset)  # two aligned pages at a time

    monkeypatch.setattr(tiers_module.os, "pwrite", short_pwrite)
    assert tier.write(block(5), payload(5))
    monkeypatch.undo()
    assert tier.read(block(5).name) == payload(5)
    assert [s.block for s in tier.scan()] == [block(5)]


def test_fsync_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(tiers_module.os, "fsync", synced.append)
    durable = DiskTier(tmp_path / "durable", 1 << 20, fsync=True)
    durable.scan()
    assert durable.write(block(0), b"data")
    assert len(synced) == 1


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_filled_buffer_writes_the_same_file_as_write(tmp_path: Path, direct_io: bool) -> None:
    plain = DiskTier(tmp_path / "plain", 1 << 22, direct_io=direct_io)
    filled = DiskTier(tmp_path / "filled", 1 << 22, direct_io=direct_io)
    for disk in (plain, filled):
        assert disk.scan() == []
    for index, size in enumerate((0, 1, 4096, 65536, 65537, 300_001)):
        data = payload(index, size)
        assert plain.write(block(index), data)
        fill = filled.fill_buffer(block(index), size)
        fill.data[:] = data
        assert filled.write_filled(fill)
        fill.release()
        name = block(index).name
        files = [tmp_path / tier_dir / name[:2] / name for tier_dir in ("filled", "plain")]
        assert files[0].read_bytes() == files[1].read_bytes()
        assert filled.read(name) == data
    # Buffers are reused: a smaller block in a larger buffer leaves nothing of the larger one in its file.
    fill = filled.fill_buffer(block(9), 10)
    fill.data[:] = b"0123456789"
    assert filled.write_filled(fill)
    fill.release()
    assert filled.read(block(9).name) == b"0123456789"
    assert [scanned.size for scanned in sorted(filled.scan(), key=lambda s: s.block.index)] == [
        0, 1, 4096, 65536, 65537, 300_001, 10]


def test_concurrent_writes_from_worker_threads(tier: DiskTier) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: tier.write(block(i), payload(i)), range(64)))
    assert all(results)
    assert all(tier.read(block(i).name) == payload(i) for i in range(64))
    assert len(files_under(tier.directory)) == 64


# -- disk: checksums and garbage --------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    ["data byte", "last data byte", "magic", "version", "truncated", "empty", "length beyond the file", "huge length"],
)
def test_a_damaged_block_is_never_served_but_deleted_and_counted(tier: DiskTier, damage: str) -> None:
    assert tier.write(block(5), payload(5))
    path = Path(tier.path_of(block(5).name))
    if damage == "data byte":
        flip_byte(path, HEADER.size + 100)
    elif damage == "last data byte":
        flip_byte(path, HEADER.size + 4095)
    elif damage == "magic":
        flip_byte(path, 0)
    elif damage == "version":
        flip_byte(path, 4)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: HEADER.size + 2000])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        length = 8192 if damage == "length beyond the file" else 1 << 40
        raw = bytearray(path.read_bytes())
        struct.pack_into("<Q", raw, 8, length)  # the data length field
        path.write_bytes(bytes(raw))
    assert tier.read(block(5).name) is None
    assert not path.exists()
    assert tier.corrupt_blocks == 1
    assert tier.health is Health.NORMAL  # rot in one file says nothing about the disk


def test_a_block_file_cut_at_a_chunk_boundary_is_corrupt_not_a_shorter_block(tier: DiskTier) -> None:
    # The chunk table still vouches for the chunks that are left, so only the file's length can tell: the block id
    # at its end is gone, so even a read of the first chunk, still whole, finds the file corrupt.
    chunk = tiers_module.CHUNK_BYTES
    data = os.urandom(4 * chunk)
    assert tier.write(block(7), data)
    path = Path(tier.path_of(block(7).name))
    table = 4 * tiers_module.CHUNK_SUM.size
    os.truncate(path, HEADER.size + table + chunk)
    assert tier.read_range(block(7).name, 0, chunk) is None
    assert not path.exists()
    assert tier.corrupt_blocks == 1


def test_a_missing_block_file_is_a_plain_miss(tier: DiskTier) -> None:
    assert tier.read(block(6).name) is None
    assert (tier.corrupt_blocks, tier.health) == (0, Health.NORMAL)


def test_scan_finds_blocks_oldest_first_and_deletes_garbage_in_the_shards(tier: DiskTier) -> None:
    for index in range(5):
        assert tier.write(block(index, etag=f"e{index}"), payload(index, 100 + index))
        os.utime(tier.path_of(block(index, etag=f"e{index}").name), (1000 + 10 * (5 - index),) * 2)
    keep_name = block(0, etag="e0").name
    shard = tier.directory / keep_name[:2]
    # Garbage: a file whose name is not a block name, a valid file under the wrong name, and a short header.
    (shard / "notes.txt").write_text("hello")
    wrong = block(9).name
    (tier.directory / wrong[:2]).mkdir(exist_ok=True)
    shutil.copy(tier.path_of(keep_name), tier.path_of(wrong))
    short = block(10).name
    (tier.directory / short[:2]).mkdir(exist_ok=True)
    Path(tier.path_of(short)).write_bytes(b"SHBK")
    # Not ours to judge: things outside the shard directories stay.
    (tier.directory / "README").write_text("cache of default/demo")
    (tier.directory / "lost+found").mkdir()

    scanned = tier.scan()

    assert scanned == [
        ScannedBlock(block(index, etag=f"e{index}"), block(index, etag=f"e{index}").name, 100 + index)
        for index in reversed(range(5))
    ]
    assert not (shard / "notes.txt").exists()
    assert not Path(tier.path_of(wrong)).exists()
    assert not Path(tier.path_of(short)).exists()
    assert (tier.directory / "README").exists() and (tier.directory / "lost+found").is_dir()
    assert tier.read(keep_name) == payload(0, 100)


def test_a_cancelled_scan_stops_at_the_next_file_and_leaves_the_rest_for_the_next_one(tier: DiskTier) -> None:
    for index in range(6):
        assert tier.write(block(index), payload(index, 100))
    asked: list[int] = []

    def cancelled() -> bool:  # told to stop once two files were looked at
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(ScanCancelled):
        tier.scan(cancelled=cancelled)
    assert len(asked) == 3
    assert len(tier.scan()) == 6  # nothing was deleted or damaged by the stop


def test_scan_defers_the_data_checksum_to_the_first_read(tier: DiskTier) -> None:
    assert tier.write(block(7), payload(7))
    flip_byte(Path(tier.path_of(block(7).name)), HEADER.size + 1)
    assert [s.name for s in tier.scan()] == [block(7).name]
    assert tier.read(block(7).name) is None
    assert tier.corrupt_blocks == 1


# -- disk: health -----------------------------------------------------------------------------------------


def test_a_removed_directory_takes_the_tier_down_and_a_restored_one_brings_it_back(
    tier: DiskTier, clock: Clock
) -> None:
    assert tier.write(block(0), payload(0))
    shutil.rmtree(tier.directory)

    assert tier.read(block(0).name) is None  # the file is gone: a miss, not a disk error
    assert tier.health is Health.NORMAL
    assert not tier.write(block(1), payload(1))
    assert (tier.health, tier.consecutive_errors) == (Health.UNSTABLE, 1)
    assert not tier.write(block(2), payload(2))
    assert tier.health is Health.UNSTABLE
    assert not tier.write(block(3), payload(3))
    assert tier.health is Health.DOWN
    assert not tier.available()
    assert not tier.directory.exists()  # writes never recreate the root: it may be an unmounted disk's mountpoint

    tier.directory.mkdir()
    clock.now += COOLDOWN - 1
    assert not tier.write(block(4), payload(4))  # still cooling down: not even tried
    assert tier.health is Health.DOWN
    clock.now += 1
    assert tier.available()
    assert tier.write(block(4), payload(4))  # the probe
    assert (tier.health, tier.consecutive_errors) == (Health.NORMAL, 0)
    assert tier.read(block(4).name) == payload(4)


def test_failing_writes_take_the_tier_down_though_reads_of_its_blocks_succeed_between_them(
    tier: DiskTier, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks already there read fine, but every write fails; the reads must not keep resetting the count
    (the tier would stay unstable, failing every write, and never be reported down)."""
    assert tier.write(block(0), payload(0))

    def no_space(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    real_writev, real_pwrite = tiers_module.os.writev, tiers_module.os.pwrite
    monkeypatch.setattr(tiers_module.os, "writev", no_space)
    monkeypatch.setattr(tiers_module.os, "pwrite", no_space)
    for index in (1, 2, 3):
        assert not tier.write(block(index), payload(index))
        assert tier.read(block(0).name) == payload(0) or index == 3  # the third failure takes it down
    assert tier.health is Health.DOWN
    monkeypatch.setattr(tiers_module.os, "writev", real_writev)
    monkeypatch.setattr(tiers_module.os, "pwrite", real_pwrite)
    clock.now += COOLDOWN
    assert tier.read(block(0).name) == payload(0)  # a read probe: not proof that writes work again
    assert tier.health is Health.DOWN
    assert tier.write(block(4), payload(4))  # room again: the write probe brings it back
    assert (tier.health, tier.consecutive_errors) == (Health.NORMAL, 0)


def test_a_directory_replaced_by_a_file_fails_the_probe_and_stays_down(tier: DiskTier, clock: Clock) -> None:
    shutil.rmtree(tier.directory)
    tier.directory.write_text("not a directory")
    for index in range(3):
        assert not tier.write(block(index), payload(index))
    assert tier.health is Health.DOWN
    clock.now += COOLDOWN
    assert not tier.write(block(3), payload(3))  # probe fails: down for another cool-down
    assert tier.health is Health.DOWN
    assert not tier.available()
    assert tier.scan() == []  # never raises either
    assert tier.remove(block(0).name) is False
    clock.now += COOLDOWN
    tier.directory.unlink()
    assert tier.scan() == []  # recreates the directory: scan runs at startup and owns that
    assert tier.health is Health.DOWN  # a scan of nothing proves little; the next block operation decides
    assert tier.write(block(3), payload(3))
    assert tier.health is Health.NORMAL


def test_read_errors_count_and_a_down_tier_does_no_io_until_the_cool_down(
    tier: DiskTier, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tier.write(block(0), payload(0))
    calls: list[int] = []

    def broken_pread(fd: int, size: int, offset: int) -> bytes:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tiers_module.os, "pread", broken_pread)
    for expected in (Health.UNSTABLE, Health.UNSTABLE, Health.DOWN):
        assert tier.read(block(0).name) is None
        assert tier.health is expected
    assert len(calls) == 3
    assert tier.read(block(0).name) is None
    assert not tier.write(block(1), payload(1))
    assert len(calls) == 3  # refused without touching the disk
    assert Path(tier.path_of(block(0).name)).exists()  # an I/O error is not corruption: the file stays
    assert tier.corrupt_blocks == 0

    monkeypatch.undo()
    clock.now += COOLDOWN
    assert tier.read(block(0).name) == payload(0)
    assert tier.health is Health.NORMAL


def test_one_success_resets_the_error_count(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tier.write(block(0), payload(0))
    real_pread = os.pread
    failures = iter([True, True, False, True, True])

    def flaky_pread(fd: int, size: int, offset: int) -> bytes:
        if offset == 0 and next(failures):
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(tiers_module.os, "pread", flaky_pread)
    assert tier.read(block(0).name) is None
    assert tier.read(block(0).name) is None
    assert tier.read(block(0).name) == payload(0)
    assert tier.health is Health.NORMAL
    assert tier.read(block(0).name) is None
    assert tier.read(block(0).name) is None
    assert tier.health is Health.UNSTABLE  # two in a row, not three


def test_remove_errors_count_but_never_raise(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tier.write(block(0), payload(0))

    def broken_unlink(path: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tiers_module.os, "unlink", broken_unlink)
    assert tier.remove(block(0).name) is False
    assert tier.health is Health.UNSTABLE
    monkeypatch.undo()
    assert tier.remove(block(0).name) is True
    assert tier.remove(block(0).name) is True  # already gone is fine
    assert files_under(tier.directory) == []


def test_a_range_read_verifies_only_the_chunks_it_touches(tier: DiskTier) -> None:
    data = bytes(range(256)) * (1024 + 3)  # a little over four 64 KiB chunks
    assert tier.write(block(7), data)
    assert tier.read_range(block(7).name, 70_000, 70_010) == data[70_000:70_010]
    assert tier.read_range(block(7).name, 0, None) == data
    assert tier.read_range(block(7).name, len(data) - 5, len(data) + 100) == data[-5:]
    assert tier.read_range(block(7).name, 10, 10) == b""
    # Corrupt the last chunk: reads of the first chunk still verify, a read touching the last one drops the block.
    path = Path(tier.path_of(block(7).name))
    raw = bytearray(path.read_bytes())
    raw[-len(msgspec.msgpack.encode(block(7))) - 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert tier.read_range(block(7).name, 0, 100) == data[:100]
    assert tier.read_range(block(7).name, len(data) - 100, None) is None
    assert not path.exists()
    assert tier.corrupt_blocks == 1


@pytest.mark.parametrize("how", ["read", "range read", "open for sending"])
def test_another_blocks_file_copied_over_a_block_is_never_served_but_deleted_and_counted(
        tier: DiskTier, how: str) -> None:
    # A block file copied (or renamed) over another block's is self-consistent: its header, chunk table and data
    # all agree, so only the id at its end tells it is not the block asked for. Reads used to serve its bytes as
    # the other block's until a restart's scan caught it.
    assert tier.write(block(1), payload(1, 70_000))
    assert tier.write(block(2), payload(2, 70_000))
    path = Path(tier.path_of(block(2).name))
    shutil.copyfile(tier.path_of(block(1).name), path)
    if how == "read":
        assert tier.read(block(2).name) is None
    elif how == "range read":
        assert tier.read_range(block(2).name, 100, 200) is None
    else:
        opened = tier.open_block(block(2).name)
        if opened is not None:
            opened.file.close()
        assert opened is None
    assert not path.exists()
    assert tier.corrupt_blocks == 1
    assert tier.health is Health.NORMAL
    assert tier.read(block(1).name) == payload(1, 70_000)  # the block whose file it is still reads


def test_a_header_claiming_a_huge_block_id_is_corrupt(tier: DiskTier) -> None:
    # The id's length comes from the header: garbage there must not make a read allocate gigabytes.
    assert tier.write(block(3), payload(3))
    path = Path(tier.path_of(block(3).name))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 24, 0xFFFF_FFFF)  # the id length field
    path.write_bytes(bytes(raw))
    assert tier.read_range(block(3).name, 0, 10) is None
    assert not path.exists()
    assert tier.corrupt_blocks == 1


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_no_descriptor_left_is_not_the_disks_fault_the_tier_never_goes_down_and_the_block_stays_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # The mount process out of descriptors took a sound tier down after three reads (its directory reported down
    # for the cool-down), and the cache forgot the first block whose read found none while its file stayed.
    tier = DiskTier(tmp_path / "cache", 1 << 20)
    tier.scan()
    cache = BlockCache([tier])
    assert cache.put(block(0), payload(0))
    real_open = tiers_module.os.open

    def no_descriptor(*args: object, **kwargs: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tiers_module.os, "open", no_descriptor)
    for _ in range(5):
        assert cache.get(block(0)) is None
        assert not cache.put(block(1), payload(1))
        assert tier.health is not Health.DOWN
    assert cache.contains(block(0)), "the block is still cached: its file is there"
    monkeypatch.setattr(tiers_module.os, "open", real_open)
    assert cache.get(block(0)) == payload(0)
    assert tier.health is Health.NORMAL
    assert cache.put(block(1), payload(1))
