"""``DatasetFS`` without opens (the patched pyfuse3 of deploy/pyfuse3): reads and listings name their file or folder
by inode, and a file's read state lives until it is idle. Driven directly (no kernel): the kernel side is in
tests/integration/test_agent_mount.py."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgspec
import pyfuse3
import pytest

from libs.events.dataset import ManifestEntry
from libs.ufs import LocalLocation, LocalObjectStore
from libs.ufs.base import ObjectStore
from services.agent import fs as fs_module
from services.agent.cache import BlockCache, MemoryTier
from services.agent.fs import IDLE_HANDLE_SECONDS, DatasetFS
from services.agent.namespace import ROOT_INODE, InodeAllocator, Namespace
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate
from tests.faults import CountingStore
from tests.helpers import eventually

BLOCK = 64 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_open_fs(tmp_path: Path, wrap: Callable[[ObjectStore], ObjectStore] = lambda store: store,
                     ) -> tuple[DatasetFS, dict[str, bytes], MemoryBudget, Clock, InodeAllocator]:
    source = tmp_path / "source"
    (source / "d").mkdir(parents=True)
    bodies = {"big.bin": os.urandom(8 * BLOCK), "d/small.txt": b"small"}
    for key, body in bodies.items():
        (source / key).write_bytes(body)
    store = LocalObjectStore(LocalLocation(root=source))
    entries = []
    for key in bodies:
        info = await store.head(key)
        entries.append(ManifestEntry(path="/" + key, mount=0, key=key, size=info.size, etag=info.etag,
                                     mtime=info.mtime))
    cache = BlockCache([MemoryTier(64 * BLOCK)])
    budget = MemoryBudget(64 * BLOCK)
    reader = BlockReader(cache, [StoreGate(wrap(store))], BLOCK, budget, write_block=cache.put_async)
    clock = Clock()
    allocator = InodeAllocator()
    fs = DatasetFS(Namespace.build(entries, allocator), reader, uid=None, gid=None, block_size=BLOCK, clock=clock,
                   no_open=True)
    return fs, bodies, budget, clock, allocator


async def test_open_and_opendir_answer_enosys_and_reads_and_listings_go_by_inode(tmp_path: Path) -> None:
    fs, bodies, _, _, _ = await no_open_fs(tmp_path)
    big = await fs.lookup(ROOT_INODE, b"big.bin")
    folder = await fs.lookup(ROOT_INODE, b"d")
    for call in (fs.open(big.st_ino, os.O_RDONLY, None), fs.opendir(ROOT_INODE, None)):  # type: ignore[arg-type]
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await call
        assert raised.value.errno == errno.ENOSYS
    # The patched pyfuse3 passes the inode where the kernel sent handle 0.
    assert bytes(await fs.read(big.st_ino, BLOCK - 10, 20)) == bodies["big.bin"][BLOCK - 10:BLOCK + 10]
    names: list[bytes] = []

    def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, offset: int) -> bool:
        names.append(name)
        return True

    original = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = reply  # type: ignore[assignment]
    try:
        await fs.readdir(folder.st_ino, 0, None)  # type: ignore[arg-type]
    finally:
        pyfuse3.readdir_reply = original
    assert names == [b"small.txt"]
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fs.readdir(big.st_ino, 0, None)  # type: ignore[arg-type]
    assert raised.value.errno == errno.ENOTDIR
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fs.read(folder.st_ino, 0, 10)
    assert raised.value.errno == errno.EISDIR


async def test_a_files_read_state_is_dropped_when_idle_giving_back_what_it_fetched_ahead(tmp_path: Path) -> None:
    fs, bodies, budget, clock, _ = await no_open_fs(tmp_path)
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    # Sequential reads: the read-ahead window opens and blocks ahead hold budget.
    for offset in range(0, 3 * BLOCK, BLOCK // 2):
        assert bytes(await fs.read(big, offset, BLOCK // 2)) == bodies["big.bin"][offset:offset + BLOCK // 2]
    assert budget.used > 0
    clock.now += IDLE_HANDLE_SECONDS - 1
    fs.every_second(clock.now)
    assert budget.used > 0  # still being read, as far as anyone knows
    clock.now += 1
    fs.every_second(clock.now)
    assert budget.used == 0
    # Read again afterwards: a new state, the same bytes.
    assert bytes(await fs.read(big, 4 * BLOCK, 10)) == bodies["big.bin"][4 * BLOCK:4 * BLOCK + 10]


def counting() -> tuple[list[CountingStore], Callable[[ObjectStore], ObjectStore]]:
    stores: list[CountingStore] = []

    def counted(inner: ObjectStore) -> ObjectStore:
        stores.append(CountingStore(inner))
        return stores[-1]

    return stores, counted


async def test_two_readers_of_one_file_at_once_each_keep_their_read_ahead(tmp_path: Path) -> None:
    stores, counted = counting()
    fs, bodies, _, _, _ = await no_open_fs(tmp_path, wrap=counted)
    (store,) = stores
    fs.reader.max_ahead_blocks = 1  # a window shorter than the file, as a file of many blocks has
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    body = bodies["big.bin"]
    piece = BLOCK // 4  # small enough that a read taken for a random one gets a ranged GET of its own
    # The kernel names neither reader: the second starts from 0 once the first is a block in, then they alternate.
    offsets = [0, 0]
    for turn in [0] * 4 + [1, 0] * (len(body) // piece) + [1] * 4:
        offset = offsets[turn]
        if offset < len(body):
            assert bytes(await fs.read(big, offset, piece)) == body[offset:offset + piece]
            offsets[turn] += piece
    assert offsets == [len(body), len(body)]
    # Each block from the store once, whole: neither reader's reads were taken for random ones (one read state
    # for the file saw them interleave, answered them with 16 KiB GETs and fetched blocks again behind them).
    assert sorted((get.start, get.length) for get in store.gets) == [(i * BLOCK, BLOCK) for i in range(8)]


async def test_a_reader_that_stopped_gives_back_its_blocks_ahead_while_another_reads_on(tmp_path: Path) -> None:
    fs, bodies, budget, clock, _ = await no_open_fs(tmp_path)
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    for offset in range(0, 2 * BLOCK, BLOCK // 2):  # the first reader, then it stops
        await fs.read(big, offset, BLOCK // 2)
    held = budget.used
    assert held > 0
    # Another reads only the file's start, again and again: the first reader's blocks ahead are held while it
    # could still go on, and given back once it has been idle for the idle time.
    for _ in range(int(IDLE_HANDLE_SECONDS)):
        assert bytes(await fs.read(big, 0, 100)) == bodies["big.bin"][:100]
        assert budget.used >= held
        clock.now += 1
        fs.every_second(clock.now)
    assert budget.used < held
    assert bytes(await fs.read(big, 0, 100)) == bodies["big.bin"][:100]


async def test_a_file_the_tree_dropped_reads_on_through_old_descriptors_until_forgotten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, _, _, clock, allocator = await no_open_fs(tmp_path)
    small = (await fs.lookup((await fs.lookup(ROOT_INODE, b"d")).st_ino, b"small.txt")).st_ino
    assert await fs.read(small, 0, 100) == b"small"
    fs.replace_namespace(Namespace.build([], allocator))  # a sync found the folder empty
    assert await fs.read(small, 1, 100) == b"mall"  # a descriptor still reading it
    assert await fs.read(small, 0, 100) == b"small"  # from the start again
    clock.now += IDLE_HANDLE_SECONDS
    fs.every_second(clock.now)
    # Idle, its read state gone: the removed file's entry is remembered, so an old descriptor still reads it.
    assert await fs.read(small, 1, 100) == b"mall"
    # Once more files were removed than are remembered, it is stale.
    monkeypatch.setattr(fs_module, "REMOVED_FILES_KEPT", 0)
    fs.replace_namespace(Namespace.build([], allocator))
    clock.now += IDLE_HANDLE_SECONDS
    fs.every_second(clock.now)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fs.read(small, 1, 100)
    assert raised.value.errno == errno.ESTALE


async def test_a_file_whose_entry_a_reload_changed_is_read_by_its_new_entry(tmp_path: Path) -> None:
    fs, bodies, _, _, allocator = await no_open_fs(tmp_path)
    entries = [node.entry for node in fs.namespace.nodes() if node.entry is not None]
    # The dataset had a mount before this one (a folder of its own); the mount's files are mount 1.
    (tmp_path / "other").mkdir()
    fs.reader.gates.insert(0, StoreGate(LocalObjectStore(LocalLocation(root=tmp_path / "other"))))  # type: ignore[attr-defined]
    fs.replace_namespace(Namespace.build([msgspec.structs.replace(e, mount=1) for e in entries], allocator))
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    assert bytes(await fs.read(big, 0, 100)) == bodies["big.bin"][:100]
    # The first mount is removed: the same file and object (the same inode), now mount 0. A reader still reading
    # it, or one that opened it after the reload, reads it from its store, not ESTALE ("no longer in the dataset").
    del fs.reader.gates[0]  # type: ignore[attr-defined]
    _, changed, _ = fs.replace_namespace(Namespace.build(entries, allocator))
    assert big in changed
    assert bytes(await fs.read(big, 4 * BLOCK, 100)) == bodies["big.bin"][4 * BLOCK:4 * BLOCK + 100]
    assert bytes(await fs.read(big, 0, 100)) == bodies["big.bin"][:100]


async def test_a_file_being_read_is_not_idle_however_long_its_read_takes(tmp_path: Path) -> None:
    stores, counted = counting()

    async def get_waiting() -> bool:
        return store.waiting > 0

    fs, bodies, _, clock, allocator = await no_open_fs(tmp_path, wrap=counted)
    (store,) = stores
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    assert bytes(await fs.read(big, 0, 100)) == bodies["big.bin"][:100]
    fs.replace_namespace(Namespace.build([], allocator))  # a descriptor still reads it, as it may
    store.hold()  # a slow store: this read takes longer than the idle time
    reading = asyncio.ensure_future(fs.read(big, 5 * BLOCK, 100))
    await eventually(get_waiting, what="the read's GET")
    clock.now += IDLE_HANDLE_SECONDS + 1
    fs.every_second(clock.now)
    store.release()
    assert bytes(await reading) == bodies["big.bin"][5 * BLOCK:5 * BLOCK + 100]
    # The descriptor was never idle: it reads on (it would be ESTALE had its state been dropped mid-read).
    assert bytes(await fs.read(big, 6 * BLOCK, 100)) == bodies["big.bin"][6 * BLOCK:6 * BLOCK + 100]


async def test_a_wall_clock_set_back_does_not_keep_a_files_read_state(tmp_path: Path) -> None:
    fs, _, budget, clock, _ = await no_open_fs(tmp_path)
    big = (await fs.lookup(ROOT_INODE, b"big.bin")).st_ino
    for offset in range(0, 3 * BLOCK, BLOCK // 2):
        await fs.read(big, offset, BLOCK // 2)
    assert budget.used > 0
    clock.now -= 3600  # the node's clock is stepped back an hour (NTP, a VM resumed)
    fs.every_second(clock.now)
    clock.now += IDLE_HANDLE_SECONDS
    fs.every_second(clock.now)
    # Idle for the idle time, as the clock goes: its blocks ahead are given back now, not an hour later.
    assert budget.used == 0


async def test_a_reload_keeps_only_the_listings_of_folders_whose_listing_changed(tmp_path: Path) -> None:
    fs, _, _, _, allocator = await no_open_fs(tmp_path)
    folder = (await fs.lookup(ROOT_INODE, b"d")).st_ino
    original = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = lambda token, name, attrs, offset: True  # type: ignore[assignment]
    try:
        for inode in (ROOT_INODE, folder):
            await fs.readdir(inode, 0, None)  # type: ignore[arg-type]
    finally:
        pyfuse3.readdir_reply = original
    assert set(fs._folders) == {ROOT_INODE, folder}
    # The same tree again: no listing changed, none is kept (there is no releasedir to drop them later).
    fs.replace_namespace(Namespace.build(list(fs.namespace.files()), allocator))
    assert fs._folders == {}


def many_files(names: list[str]) -> list[ManifestEntry]:
    return [ManifestEntry(path=f"/big/{name}", mount=0, key=f"big/{name}", size=1, etag="e1", mtime=0.0)
            for name in names]


class Pages:
    """The kernel's side of readdir: pages of ``size`` entries, each next one asked from the last offset given."""

    def __init__(self, fs: DatasetFS, folder: int, size: int = 30) -> None:
        self.fs, self.folder, self.size = fs, folder, size
        self.offset = 0
        self.fh = folder

    async def opendir(self) -> None:
        if not self.fs.no_open:
            self.fh = await self.fs.opendir(self.folder, None)  # type: ignore[arg-type]

    async def page(self) -> list[str]:
        got: list[tuple[bytes, int]] = []

        def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, offset: int) -> bool:
            if len(got) == self.size:
                return False  # the buffer is full: this entry is asked for again from the last offset
            got.append((name, offset))
            return True

        original = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = reply  # type: ignore[assignment]
        try:
            await self.fs.readdir(self.fh, self.offset, None)  # type: ignore[arg-type]
        finally:
            pyfuse3.readdir_reply = original
        if got:
            self.offset = got[-1][1]
        return [os.fsdecode(name) for name, _ in got]


@pytest.mark.parametrize("no_open", [True, False])
async def test_a_huge_folders_first_page_costs_a_page_and_a_reload_midway_goes_on_after_the_last_name(
        no_open: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole listing (names and attributes of every child) was built before the first entry was replied:
    # `ls` of a folder of 300,000 files waited 5-9 s for its first name, and the listing stayed in memory.
    names = [f"f{i:06d}" for i in range(0, 40_000, 2)]
    allocator = InodeAllocator()
    fs = DatasetFS(Namespace.build(many_files(names), allocator), None, uid=None, gid=None,  # type: ignore[arg-type]
                   block_size=BLOCK, no_open=no_open)
    built = 0
    build = fs._build_attributes

    def counted(node: object) -> pyfuse3.EntryAttributes:
        nonlocal built
        built += 1
        return build(node)  # type: ignore[arg-type]

    monkeypatch.setattr(fs, "_build_attributes", counted)
    folder = (await fs.lookup(ROOT_INODE, b"big")).st_ino
    built = 0
    pages = Pages(fs, folder)
    await pages.opendir()
    seen = await pages.page()
    assert seen == names[:30]
    assert built <= 31, built
    while len(seen) < 100:
        seen += await pages.page()
    # A reload midway: a name before the place reached and one after it come, one before it goes.
    reloaded = sorted([*names[1:], "f000001", names[-1] + "x"])
    fs.replace_namespace(Namespace.build(many_files(reloaded), allocator))
    while page := await pages.page():
        seen += page
    after = seen[120:]  # ...the listing went on after the last name given, with the new one's names
    assert seen[:120] == names[:120]
    assert after == [name for name in reloaded if name > names[119]]


async def test_a_listing_the_kernel_keeps_leaves_nothing_per_file_in_the_mount() -> None:
    # Without opens the kernel keeps a listing and its attributes; the mount kept every entry's attributes too:
    # `find` of 300,000 files left it 80 MiB larger (~270 bytes a file, half again what the tree holds).
    files = 20_000
    fs = DatasetFS(Namespace.build(many_files([f"f{i:06d}" for i in range(files)]), InodeAllocator()),
                   None, uid=None, gid=None, block_size=BLOCK, no_open=True)  # type: ignore[arg-type]
    folder = (await fs.lookup(ROOT_INODE, b"big")).st_ino
    pages = Pages(fs, folder, size=200)
    gc.collect()
    tracemalloc.start()
    try:
        listed = 0
        while page := await pages.page():
            listed += len(page)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed == files
    assert held < 10 * files, f"{held / files:.0f} bytes a file listed"
