"""Ordinary tools against a real FUSE mount of odd object layouts: names no one would choose, sizes on block
boundaries, writes of every kind, and listings read while the tree is reloaded underneath them.

Services and the node agent run in-process on a real nats-server over SeaweedFS; each mount is a real process.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from pathlib import Path

import pytest

from libs.bus import Bus
from libs.config import Settings
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import node_stack, run_tool

pytestmark = pytest.mark.needs("fuse")


def getdents(fd: int, buffer_bytes: int) -> list[str]:
    """One getdents64 call on the open folder ``fd``: the names it returns (few with a small buffer), [] at the end.
    Python's listdir and scandir read a whole folder in large batches; this reads it a little at a time, the way
    a program paging through a huge folder does."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(buffer_bytes)
    got = libc.getdents64(fd, buffer, buffer_bytes)
    if got < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    names, at = [], 0
    while at < got:
        # struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, then the name (NUL-terminated).
        reclen = struct.unpack_from("<H", buffer.raw, at + 16)[0]
        names.append(buffer.raw[at + 19:at + reclen].split(b"\0", 1)[0].decode())
        at += reclen
    return names


async def test_a_listing_read_across_a_resync_repeats_and_skips_nothing(bus: Bus, settings: Settings,
                                                                         seaweedfs: SeaweedServer, bucket: str,
                                                                         tmp_path: Path) -> None:
    names = [f"f{i:03d}" for i in range(200)]
    await put_objects(seaweedfs, bucket, {f"big/{name}": b"x" for name in names})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("paged", bucket)
        root = await node.wait_mounted("paged", expect="big/f199")
        fd = await asyncio.to_thread(os.open, root / "big", os.O_RDONLY | os.O_DIRECTORY)
        try:
            seen = await asyncio.to_thread(getdents, fd, 1024)
            assert 0 < len(seen) < 100, seen
            # Meanwhile the folder changes and the mount reloads its tree: three names before the reader's position
            # (each would shift the position of every later name) and one after it gone.
            await put_objects(seaweedfs, bucket, {f"big/a-new-{i}": b"new" for i in range(3)})
            async with seaweedfs.client() as client:
                await client.delete_object(Bucket=bucket, Key="big/f199")
            await node.resync("paged")
            await eventually(lambda: asyncio.to_thread(os.path.exists, root / "big/a-new-0"), what="the reload")
            while batch := await asyncio.to_thread(getdents, fd, 1024):
                seen += batch
        finally:
            os.close(fd)
        # The listing goes on after the last name it gave: none twice, none skipped, the deleted one not shown.
        assert seen == names[:-1]


async def test_the_mount_folder_has_the_time_of_its_newest_object(bus: Bus, settings: Settings,
                                                                 seaweedfs: SeaweedServer, bucket: str,
                                                                 tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"top.txt": b"top", "sub/below.txt": b"below"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("times", bucket)
        root = await node.wait_mounted("times", expect="sub/below.txt")
        times = {path: (await asyncio.to_thread(os.stat, root / path)).st_mtime
                 for path in (".", "top.txt", "sub", "sub/below.txt")}
        newest = max(times["top.txt"], times["sub/below.txt"])
        # A folder's time is the latest of what is below it, the mount's own folder too (it was the epoch: `ls -l`
        # of its parent and a copy made with `tar` showed 1970).
        assert times["."] == newest
        assert times["sub"] == times["sub/below.txt"]
        listed = await run_tool("tar", "-C", str(root), "-cf", str(tmp_path / "copy.tar"), ".")
        assert listed.returncode == 0
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        await run_tool("tar", "-C", str(extracted), "-xf", str(tmp_path / "copy.tar"))
        assert (await asyncio.to_thread(os.stat, extracted)).st_mtime == newest
