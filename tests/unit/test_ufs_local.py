"""LocalObjectStore over temporary directories: listing, HEAD, ranged reads, links, and refused keys."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from libs.ufs import (
    AccessDenied,
    LocalLocation,
    LocalObjectStore,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    open_store,
)
from libs.ufs import local as local_module
from libs.ufs.local import LOST_FOUND_UNREADABLE
from tests.helpers import nest_beyond_path_max


def store_at(root: Path) -> LocalObjectStore:
    return LocalObjectStore(LocalLocation(root=root))


async def collect(store: LocalObjectStore, page_size: int = 1000) -> list[ObjectInfo]:
    return [info async for info in store.list(page_size)]


def write(root: Path, key: str, body: bytes) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def expected_etag(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


async def test_list_pages_through_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"d{i % 7}/sub{i % 3}/f-{i:04d}.bin": b"x" * i for i in range(250)}
    for key, body in files.items():
        write(tmp_path, key, body)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)

    pages: list[int] = []
    original = local_module._Walk.page

    def counting(self: local_module._Walk, n: int) -> list[ObjectInfo]:
        found = original(self, n)
        pages.append(len(found))
        return found

    monkeypatch.setattr(local_module._Walk, "page", counting)
    listed = await collect(store_at(tmp_path), page_size=100)

    assert pages == [100, 100, 50]
    assert [info.key for info in listed] == sorted(files)
    for info in listed:
        path = tmp_path / info.key
        assert info.size == len(files[info.key])
        assert info.etag == expected_etag(path)
        assert info.mtime == path.stat().st_mtime


async def test_listing_is_sorted_by_key_like_s3(tmp_path: Path) -> None:
    # '-' and ' ' sort before '/', so a folder's files must not all come before its look-alike siblings.
    keys = ["a-c", "a/b", "a b", "a/x/y", "a0", "b", "ünï"]
    for key in keys:
        write(tmp_path, key, key.encode())
    assert [info.key for info in await collect(store_at(tmp_path))] == sorted(keys)


async def test_exact_page_multiple_ends_cleanly(tmp_path: Path) -> None:
    for i in range(10):
        write(tmp_path, f"f{i}", b"")
    assert len(await collect(store_at(tmp_path), page_size=5)) == 10


async def test_empty_directory_lists_nothing(tmp_path: Path) -> None:
    assert await collect(store_at(tmp_path)) == []


async def test_head_and_ranged_reads(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4
    path = write(tmp_path, "set/blob.bin", body)
    write(tmp_path, "empty", b"")
    store = store_at(tmp_path)
    info = await store.head("set/blob.bin")
    assert info == ObjectInfo("set/blob.bin", len(body), expected_etag(path), path.stat().st_mtime,
                              mtime_ns=path.stat().st_mtime_ns)
    assert await store.get_range("set/blob.bin", 100, 50) == body[100:150]
    assert await store.get_range("set/blob.bin", 100, 50, etag=info.etag) == body[100:150]
    assert await store.get_range("set/blob.bin", 1000, 100) == body[1000:]  # tail past the end
    assert await store.get_range("set/blob.bin", len(body) + 5, 10) == b""
    assert await store.get_range("set/blob.bin", 10, 0) == b""
    assert await store.get_range("empty", 0, 10) == b""
    with pytest.raises(ValueError):
        await store.get_range("set/blob.bin", -1, 1)


async def test_missing_keys_and_folders_are_no_such_key(tmp_path: Path) -> None:
    write(tmp_path, "set/blob.bin", b"data")
    store = store_at(tmp_path)
    for key in ("missing", "set", "set/blob.bin/below", "set/missing"):
        with pytest.raises(NoSuchKey):
            await store.head(key)
        with pytest.raises(NoSuchKey):
            await store.get_range(key, 0, 1)


async def test_rewritten_file_is_object_changed(tmp_path: Path) -> None:
    path = write(tmp_path, "obj", b"first version")
    store = store_at(tmp_path)
    old = (await store.head("obj")).etag
    path.write_bytes(b"second, longer version")
    # Move the clock on explicitly: a coarse file-system timestamp must not hide the rewrite.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    new = (await store.head("obj")).etag
    assert new != old
    with pytest.raises(ObjectChanged, match=re.escape(f"no longer {old}")):
        await store.get_range("obj", 0, 5, etag=old)
    assert await store.get_range("obj", 0, 6, etag=new) == b"second"


async def test_copies_of_a_folder_on_two_nodes_have_the_same_etags(tmp_path: Path) -> None:
    # A manifest listed on one node is read on the others: the ETag may hold nothing node-specific (an inode).
    first = write(tmp_path / "node-1", "obj", b"the same bytes")
    second = write(tmp_path / "node-2", "obj", b"the same bytes")
    st = first.stat()
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns))  # rsync -a, cp -p
    etags = [(await store_at(root).head("obj")).etag for root in (tmp_path / "node-1", tmp_path / "node-2")]
    assert etags[0] == etags[1]
    assert await store_at(tmp_path / "node-2").get_range("obj", 0, 4, etag=etags[0]) == b"the "


async def test_a_fifo_where_a_file_was_listed_is_no_object_and_does_not_block(tmp_path: Path) -> None:
    path = write(tmp_path, "obj", b"first")
    store = store_at(tmp_path)
    etag = (await store.head("obj")).etag
    path.unlink()
    os.mkfifo(path)  # nobody writes to it: a blocking open would never return
    with pytest.raises(NoSuchKey):
        await asyncio.wait_for(store.get_range("obj", 0, 5, etag=etag), 10)


async def test_a_special_file_where_a_file_was_listed_is_not_opened_for_reading(tmp_path: Path) -> None:
    """Opening is an act on some special files (a device may rewind or reset; a FIFO's open lets its writer go on):
    the file is looked at first, and only a regular file is opened. Seen here through a FIFO whose writer waits in
    open() until a reader opens it."""
    path = write(tmp_path, "obj", b"first")
    store = store_at(tmp_path)
    etag = (await store.head("obj")).etag
    path.unlink()
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        with pytest.raises(NoSuchKey):
            await asyncio.wait_for(store.get_range("obj", 0, 5, etag=etag), 10)
        writer.join(0.5)  # a reader's open would have let it return at once
        assert writer.is_alive(), "the FIFO was opened for reading"
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        writer.join(10)


@pytest.mark.parametrize(
    "key", ["../outside.txt", "a/../../outside.txt", "a/../b", "./b", "a//b", "", "/etc/passwd", "a/\0"]
)
async def test_keys_that_are_not_plain_relative_paths_are_refused(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    write(root, "a/b", b"inside")
    write(root, "b", b"inside")
    write(tmp_path, "outside.txt", b"secret")
    store = store_at(root)
    with pytest.raises(NoSuchKey):
        await store.head(key)
    with pytest.raises(NoSuchKey):
        await store.get_range(key, 0, 100)


async def test_links_out_of_the_root_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "real/data.txt", b"inside")
    outside = write(tmp_path, "outside/secret.txt", b"secret")
    (root / "out-file").symlink_to(outside)
    (root / "out-dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "in-file").symlink_to(root / "real" / "data.txt")
    (root / "loop").symlink_to(root, target_is_directory=True)  # would never end if followed
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "fifo")  # never opened: a listing must not block on it
    store = store_at(root)

    listed = {info.key: info for info in await collect(store) if not info.unusable}
    assert sorted(listed) == ["in-file", "real/data.txt"]
    assert listed["in-file"].etag == listed["real/data.txt"].etag
    # The links not followed are listed as unusable, each with its reason (never where it leads), so the sync
    # reports them instead of the files going missing in silence.
    assert {info.key: info.unusable for info in await collect(store) if info.unusable} == {
        "out-file": local_module.LINK_OUT, "out-dir": local_module.LINK_OUT, "loop": local_module.LINK_TO_FOLDER,
        "dangling": local_module.LINK_DANGLING, "fifo": local_module.NOT_A_FILE}

    assert await store.get_range("in-file", 0, 100) == b"inside"
    for key in ("out-file", "out-dir/secret.txt", "dangling"):
        with pytest.raises(NoSuchKey):
            await store.head(key)
        with pytest.raises(NoSuchKey):
            await store.get_range(key, 0, 100)


@pytest.mark.parametrize("boundary", ["local_root", "claim_root"])
async def test_a_root_replaced_by_a_link_out_of_its_boundary_is_refused(tmp_path: Path, boundary: str) -> None:
    """The SHOAL_LOCAL_ROOTS root (or the claim) a location lies below is checked at every use, not only when the
    mount started: its folder replaced by a link to elsewhere later serves nothing from there."""
    allowed = tmp_path / "allowed"
    folder = allowed / "team" / "x"
    write(folder, "f", b"inside")
    outside = write(tmp_path, "outside/f", b"OUTSIDE")
    bounds: dict[str, Any] = {boundary: allowed}
    store = LocalObjectStore(LocalLocation(root=folder, **bounds))
    listed = await collect(store)
    assert [info.key for info in listed] == ["f"]

    shutil.rmtree(folder)
    folder.symlink_to(outside.parent, target_is_directory=True)
    os.utime(outside, ns=(0, 0))
    with pytest.raises(AccessDenied, match="outside"):
        await collect(store)
    with pytest.raises(AccessDenied, match="outside"):
        await store.head("f")
    with pytest.raises(AccessDenied, match="outside"):
        await store.get_range("f", 0, 100)


async def test_root_reached_through_a_link_works(tmp_path: Path) -> None:
    write(tmp_path, "real/x", b"x")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    store = store_at(tmp_path / "alias")
    assert [info.key for info in await collect(store)] == ["x"]
    assert await store.get_range("x", 0, 1) == b"x"


async def test_missing_root_is_no_such_bucket(tmp_path: Path) -> None:
    root = tmp_path / "not-there"
    store = store_at(root)
    message = re.escape(f"local directory '{root}' does not exist")
    with pytest.raises(NoSuchBucket, match=message):
        await collect(store)
    with pytest.raises(NoSuchBucket, match=message):
        await store.head("x")
    with pytest.raises(NoSuchBucket, match=message):
        await store.get_range("x", 0, 1)
    write(tmp_path, "a-file", b"")
    with pytest.raises(NoSuchBucket, match="is not a directory"):
        await collect(store_at(tmp_path / "a-file"))


async def test_a_root_that_is_a_dangling_or_looping_link_says_so(tmp_path: Path) -> None:
    """Such a root was "does not exist", while `ls` shows it there: the message now says what it is."""
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "through").symlink_to(tmp_path / "loop")
    cases = {"dangling": "is a symbolic link to nothing", "loop": "is a symbolic link that loops",
             "through": "is a symbolic link that loops", "loop/below": "has a symbolic link on its path that loops"}
    for name, said in cases.items():
        store = store_at(tmp_path / name)
        with pytest.raises(NoSuchBucket, match=re.escape(f"local directory '{tmp_path / name}' {said}")):
            await collect(store)
        with pytest.raises(NoSuchBucket, match=re.escape(said)):
            await store.get_range("x", 0, 1)


async def test_unreadable_folder_is_access_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "ok/a", b"a")
    write(tmp_path, "locked/b", b"b")
    real_open = os.open

    def open_(path: str, flags: int, *args: int) -> int:
        # Simulated, so the test also holds when run as root, where permissions do not apply. (A folder is opened,
        # then read through its descriptor.)
        if os.path.basename(str(path).rstrip("/")) == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(local_module.os, "open", open_)
    with pytest.raises(AccessDenied, match=r"permission denied listing local directory '.*locked'"):
        await collect(store_at(tmp_path))


async def test_an_unreadable_lost_and_found_at_the_root_is_left_out_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root of an ext4 volume (a pvc:// dataset of a block-storage claim) holds lost+found, 0700 and owned by
    root, and the services run as another user (deploy/: uid 10001): it is left out with the reason and the rest of
    the volume is listed. Any other unreadable folder still fails the listing, lost+found below the root too."""
    write(tmp_path, "train/a", b"a")
    write(tmp_path, "lost+found/#1234", b"orphan")
    write(tmp_path, "deep/lost+found/b", b"b")
    real_open = os.open
    locked = {"lost+found"}

    def open_(path: str, flags: int, *args: int) -> int:
        # Simulated, as above: the suite runs as root, where modes do not apply.
        if os.path.relpath(str(path).rstrip("/"), tmp_path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(local_module.os, "open", open_)
    listed = [(info.key, info.unusable) for info in await collect(store_at(tmp_path))]
    assert listed == [("deep/lost+found/b", ""), ("lost+found/", LOST_FOUND_UNREADABLE), ("train/a", "")]
    locked.add("deep/lost+found")
    with pytest.raises(AccessDenied, match=r"permission denied listing local directory '.*deep/lost\+found'"):
        await collect(store_at(tmp_path))


async def test_files_of_two_mounts_alike_in_key_size_and_time_have_etags_of_their_own(tmp_path: Path) -> None:
    """Two mounts of one dataset, each with x.bin of the same size and time but other bytes (archives unpacked with
    a fixed time): their ETags differ, by the mount point the spec names, so a cached block of one is never taken
    for the other's when a removed mount moves the next one into its position. The same mount point read from
    another folder (a node holding a copy, or the claim mounted elsewhere) gives the same ETag: nodes agree."""
    for folder, body in (("a", b"1.0.1"), ("b", b"1.0.2"), ("copy-of-a", b"1.0.1")):
        path = write(tmp_path / folder, "x.bin", body)
        os.utime(path, ns=(10**18, 10**18))

    async def etag(folder: str, source: str) -> str:
        return (await LocalObjectStore(LocalLocation(root=tmp_path / folder, source=source)).head("x.bin")).etag

    first, second = await etag("a", "local:///data/a/"), await etag("b", "local:///data/b/")
    assert first != second
    assert await etag("copy-of-a", "local:///data/a/") == first
    listed = await collect(LocalObjectStore(LocalLocation(root=tmp_path / "b", source="local:///data/b/")))
    assert [info.etag for info in listed] == [second]
    store = LocalObjectStore(LocalLocation(root=tmp_path / "b", source="local:///data/b/"))
    assert await store.get_range("x.bin", 0, 5, etag=second) == b"1.0.2"
    with pytest.raises(ObjectChanged):
        await store.get_range("x.bin", 0, 5, etag=first)  # the other mount's version of x.bin: not these bytes
    # A manifest listed before versions named their mount is still read, until the next sync lists it again.
    before = (await LocalObjectStore(LocalLocation(root=tmp_path / "b")).head("x.bin")).etag
    assert before != second and await store.get_range("x.bin", 0, 5, etag=before) == b"1.0.2"


async def test_open_store_gives_a_local_store(tmp_path: Path) -> None:
    write(tmp_path, "k", b"v")
    store = open_store(LocalLocation(root=tmp_path))
    assert isinstance(store, LocalObjectStore)
    assert str(tmp_path) in repr(store)
    assert await store.get_range("k", 0, 1) == b"v"
    await store.close()


async def test_abandoned_listing_leaves_nothing_open(tmp_path: Path) -> None:
    for i in range(30):
        write(tmp_path, f"d/f{i:02d}", b"")
    listing = store_at(tmp_path).list(page_size=10)
    first = [await anext(listing) for _ in range(12)]
    await listing.aclose()  # no directory handle is held between pages, so no ResourceWarning follows
    assert [info.key for info in first] == [f"d/f{i:02d}" for i in range(12)]


async def test_a_folder_nested_beyond_path_max_is_left_out_with_its_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "a.txt", b"a")
    write(root, "z/after.txt", b"after")
    (root / "deep").mkdir()
    nest_beyond_path_max(str(root / "deep"), b"too deep to open")
    store = store_at(root)

    listed = await collect(store)
    # The rest of the tree is listed, in order; the folder whose path no call accepts is one unusable entry
    # (the listing used to fail as a whole, and the dataset with it).
    assert [info.key for info in listed if not info.unusable] == ["a.txt", "z/after.txt"]
    (deep,) = [info for info in listed if info.unusable]
    assert deep.key.startswith("deep/d") and deep.key.endswith("/")
    assert len(os.fsencode(str(root / deep.key))) >= local_module.PATH_MAX
    assert deep.unusable == "has a path longer than the system's limit (4096 bytes): it cannot be opened"


async def test_a_file_rewritten_while_it_is_read_is_object_changed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "obj", b"old bytes, old bytes")
    store = store_at(tmp_path)
    old = (await store.head("obj")).etag
    etag_of = local_module._etag
    rewrites: list[Path] = []

    def rewritten_right_after_the_check(st: os.stat_result, source: str = "") -> str:
        # The ETag is taken from the open file, then the file is rewritten in place (same size, as a program
        # updating it would) before its bytes are read: the read must not hand them over as the old version.
        etag = etag_of(st, source)
        if not rewrites:
            with open(path, "r+b") as file:
                file.write(b"NEW BYTES")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            rewrites.append(path)
        return etag

    monkeypatch.setattr(local_module, "_etag", rewritten_right_after_the_check)
    with pytest.raises(ObjectChanged, match=re.escape(f"no longer {old}")):
        await store.get_range("obj", 0, 20, etag=old)
    assert rewrites == [path]
