"""The agent bench's FUSE reference: a minimal read-only pyfuse3 passthrough of a local folder (issue 14's row).

What a Python FUSE daemon costs with nothing of Shoal's on top: files opened with ``keep_cache`` (as the mount
opens them), entries and attributes that never expire, reads answered with one ``os.pread``, the same pyfuse3,
asyncio integration (``enable_asyncio_fuse``) and kernel read-ahead as Shoal's mount. Warm large reads through
Shoal are compared with warm reads through this in the same run: once the pages are resident, neither daemon is
asked, so the ratio shows what Shoal adds beyond FUSE itself.

Run by the bench as a child process: ``python -m tests.bench.passthrough SOURCE MOUNTPOINT`` (SIGTERM unmounts).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any

# Never expire: the bench's folder does not change while it is mounted.
FOREVER = 365 * 24 * 3600.0


def serve_until_sigterm(operations: Any, mountpoint: str, fsname: str,
                        mounted: Callable[[str], None] | None = None) -> None:
    """Mount ``operations`` read-only at ``mountpoint`` on asyncio (as Shoal's mount runs pyfuse3), call ``mounted``
    once the kernel answers for it, serve until SIGTERM, then unmount."""
    import pyfuse3

    from services.agent.mountd import enable_asyncio_fuse

    async def main() -> None:
        pyfuse3.init(operations, mountpoint, set(pyfuse3.default_options) | {"ro", f"fsname={fsname}"})
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        fuse = asyncio.create_task(pyfuse3.main())
        if mounted is not None:
            await asyncio.to_thread(os.statvfs, mountpoint)  # answered by the loop above: the mount is live
            mounted(mountpoint)
        await stop.wait()
        pyfuse3.terminate()
        await fuse
        pyfuse3.close(unmount=True)

    enable_asyncio_fuse()
    asyncio.run(main())


def serve(source: str, mountpoint: str) -> None:
    import pyfuse3

    from services.agent.mountd import raise_read_ahead

    paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
    inodes: dict[str, int] = {source: pyfuse3.ROOT_INODE}

    def inode_of(path: str) -> int:
        inode = inodes.get(path)
        if inode is None:
            inode = inodes[path] = len(paths) + pyfuse3.ROOT_INODE
            paths[inode] = path
        return inode

    def attrs(inode: int) -> pyfuse3.EntryAttributes:
        try:
            info = os.lstat(paths[inode])
        except (KeyError, OSError) as err:
            raise pyfuse3.FUSEError(getattr(err, "errno", None) or errno.ENOENT) from None
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = (stat.S_IFDIR | 0o555) if stat.S_ISDIR(info.st_mode) else (stat.S_IFREG | 0o444)
        entry.st_size = info.st_size
        entry.st_nlink = 1
        entry.st_mtime_ns = info.st_mtime_ns
        entry.entry_timeout = entry.attr_timeout = FOREVER
        return entry

    class Passthrough(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            return attrs(inode)

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            return attrs(inode_of(os.path.join(paths[parent], os.fsdecode(name))))

        async def opendir(self, inode: int, ctx: Any) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            names = sorted(os.listdir(paths[fh]))
            for index in range(start_id, len(names)):
                entry = attrs(inode_of(os.path.join(paths[fh], names[index])))
                if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), entry, index + 1):
                    return

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=os.open(paths[inode], os.O_RDONLY), keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return os.pread(fh, size, off)

        async def release(self, fh: int) -> None:
            os.close(fh)

        async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
            return pyfuse3.StatvfsData()

    serve_until_sigterm(Passthrough(), mountpoint, "passthrough", raise_read_ahead)

if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tests.bench.passthrough SOURCE MOUNTPOINT")
    serve(os.path.abspath(sys.argv[1]), sys.argv[2])
