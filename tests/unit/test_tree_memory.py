"""Bytes per file a mount process's tree and the scheduler's catalog keep (issue 15), counted by tracemalloc on an
ImageNet-shaped manifest (``tests.bench.tree_memory`` measures the same at 200k and 1M files).

The bounds are 1.5x what the columnar tree (its manifest entries columns too) and catalog measured (~153 and ~217
bytes per file at 1M files): the object-per-file structures they replaced kept ~1,060 and ~505 (the tree ~504 while
it held an entry object per file), and a change that brings back an object per file fails here. A walk of the whole
mount keeps what its caches hold, bounded whatever the number of files (``services.agent.fs.ATTRIBUTES_KEPT``)."""

from __future__ import annotations

import asyncio
import gc
import stat
import tracemalloc
from collections.abc import Callable
from typing import Any

import pyfuse3
import pytest

from services.agent import fs as fs_module
from services.agent.namespace import ROOT_INODE
from tests.bench.tree_memory import keep_catalog, keep_mount, load, manifest_bytes

FILES = 10_000
CLASSES = 10  # 1,000 files a folder, as ImageNet's 1,281 a class
MOUNT_BYTES_PER_FILE = 230
CATALOG_BYTES_PER_FILE = 325


def bytes_per_file(keep: Callable[[list[Any]], Any]) -> float:
    data = manifest_bytes(FILES, CLASSES)
    keep(load(manifest_bytes(10, CLASSES)))  # imports and first-use caches outside the count
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = keep(load(data))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        if started:
            tracemalloc.stop()
    assert kept is not None
    return grown / FILES


def test_a_mounts_tree_keeps_a_few_hundred_bytes_a_file() -> None:
    per_file = bytes_per_file(keep_mount)
    assert per_file < MOUNT_BYTES_PER_FILE, f"the mount keeps {per_file:.0f} bytes per file"


def test_the_schedulers_catalog_keeps_a_few_hundred_bytes_a_file() -> None:
    per_file = bytes_per_file(keep_catalog)
    assert per_file < CATALOG_BYTES_PER_FILE, f"the catalog keeps {per_file:.0f} bytes per file"


async def walk(fs: Any) -> int:
    """What `find` over the whole mount asks of ``fs``: every folder's listing (readdirplus, through ``readdir``
    with pyfuse3's reply caught) and each entry's attributes (getattr); the files seen."""
    files, folders = 0, [ROOT_INODE]
    original = pyfuse3.readdir_reply
    listed: list[Any] = []

    def reply(token: Any, name: bytes, attrs: Any, offset: int) -> bool:
        listed.append(attrs)
        return True

    while folders:
        listed.clear()
        fh = await fs.opendir(folders.pop(), None)
        pyfuse3.readdir_reply = reply  # type: ignore[assignment]
        try:
            await fs.readdir(fh, 0, None)
        finally:
            pyfuse3.readdir_reply = original
        await fs.releasedir(fh)
        for attrs in list(listed):
            if stat.S_ISDIR(attrs.st_mode):
                folders.append(attrs.st_ino)
            else:
                files += 1
            assert (await fs.getattr(attrs.st_ino)).st_size == attrs.st_size
    return files


def test_a_walk_of_the_whole_mount_keeps_its_caches_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # ~400 bytes a file were kept for good by the attributes and listings of a walk, more than the tree itself.
    # With stock pyfuse3 (opens), the one case the mount keeps attributes: every `ls` comes back to it.
    monkeypatch.setattr(fs_module, "ATTRIBUTES_KEPT", 1_000)

    def mounted(files: int) -> Any:
        tree = keep_mount(load(manifest_bytes(files, CLASSES)))[1]
        return fs_module.DatasetFS(tree, reader=None, uid=None, gid=None, block_size=4096,  # type: ignore[arg-type]
                                   no_open=False)

    asyncio.run(walk(mounted(10)))  # first-use caches outside the count
    fs = mounted(FILES)
    gc.collect()
    tracemalloc.start()
    try:
        assert asyncio.run(walk(fs)) == FILES
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Two generations of the cache, ~300 bytes an entry, whatever the walk's length.
    assert kept < 2 * 1_000 * 300, f"a walk of {FILES} files keeps {kept} bytes"
    assert asyncio.run(walk(fs)) == FILES  # and is answered the same from the tree again


def test_folders_read_a_page_at_a_time_in_turns_give_each_name_once_and_are_never_listed_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two large folders read in turns (two `ls` at once), with a small attributes cache: each page goes on where
    # its handle left off, every name once, and no page lists its folder whole.
    monkeypatch.setattr(fs_module, "ATTRIBUTES_KEPT", 10)
    tree = keep_mount(load(manifest_bytes(200, 2)))[1]
    fs = fs_module.DatasetFS(tree, reader=None, uid=None, gid=None, block_size=4096,  # type: ignore[arg-type]
                             no_open=False)
    train = tree.lookup(ROOT_INODE, "train")
    assert train is not None
    folders = [child.inode for child in tree.children(train.inode)]
    listed: list[int] = []
    children = tree.children

    def counted(inode: int) -> Any:
        listed.append(inode)
        return children(inode)

    monkeypatch.setattr(tree, "children", counted)
    seen: dict[int, list[bytes]] = {inode: [] for inode in folders}
    page: list[bytes] = []

    def reply(token: object, name: bytes, attrs: Any, offset: int) -> bool:
        page.append(name)
        return len(page) < 7  # a page holds 7 names

    monkeypatch.setattr(fs_module.pyfuse3, "readdir_reply", reply)

    async def read_in_turns() -> None:
        handles = {inode: await fs.opendir(inode, None) for inode in folders}  # type: ignore[arg-type]
        while any(len(seen[inode]) < 100 for inode in folders):
            for inode in folders:
                page.clear()
                await fs.readdir(handles[inode], len(seen[inode]), None)  # type: ignore[arg-type]
                seen[inode] += page

    asyncio.run(read_in_turns())
    assert all(len(names) == 100 == len(set(names)) for names in seen.values())
    assert not listed  # pages come from the tree's columns, never a folder's whole listing
