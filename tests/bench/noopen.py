"""What zero-message opens would buy (issue 14), on a minimal pyfuse3 filesystem: ``python -m tests.bench.noopen``.

N files of 100 KiB with the same content in one folder, served from memory. With ``open`` answered normally
(``keep_cache``, as the mount does) every warm read of a file costs the daemon an OPEN and a RELEASE; answered with
ENOSYS, this kernel stops sending OPEN and RELEASE altogether and opens files with ``keep_cache`` itself, so warm
reads never reach the daemon. The catch that keeps it out of the mount: the reads that do come (cold ones) arrive
with fh = 0, and pyfuse3 3.5 passes ``read()`` only the file handle, not the inode, so a real filesystem cannot
tell which file to read (here every file has the same bytes, so it does not matter). Lifting it needs pyfuse3 to
pass the inode to ``read`` (a few lines in its handlers.pxi). Prints, for each mode, the daemon's CPU seconds per
10k warm file reads, the requests it answered, and the files/s of 16 readers.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.metapath import READERS, cpu_seconds
from tests.bench.passthrough import serve_until_sigterm
from tests.bench.worker import run_worker

KiB = 1024
SIZE = 100 * KiB


def serve(mountpoint: str, files: int, no_open: bool, counts_file: str) -> None:
    import pyfuse3


    data = bytes(range(256)) * (SIZE // 256)
    counts: collections.Counter[str] = collections.Counter()

    def attrs(inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = (stat.S_IFDIR | 0o555) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
        entry.st_size = 0 if inode == pyfuse3.ROOT_INODE else SIZE
        entry.st_nlink = 1
        entry.entry_timeout = entry.attr_timeout = 86400.0
        return entry

    class Minimal(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            counts["getattr"] += 1
            return attrs(inode)

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            counts["lookup"] += 1
            if parent != pyfuse3.ROOT_INODE or not name.startswith(b"f") or int(name[1:]) >= files:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(int(name[1:]) + 2)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            counts["open"] += 1
            if no_open:
                raise pyfuse3.FUSEError(errno.ENOSYS)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            counts["read"] += 1
            return data[off:off + size]

        async def release(self, fh: int) -> None:
            counts["release"] += 1

        async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
            return pyfuse3.StatvfsData()

    def write_counts() -> None:
        Path(counts_file + ".partial").write_text(json.dumps(counts))
        os.rename(counts_file + ".partial", counts_file)

    signal.signal(signal.SIGUSR1, lambda *_: write_counts())
    serve_until_sigterm(Minimal(), mountpoint, "noopen", lambda _: write_counts())

def measure(mountpoint: Path, files: int, no_open: bool, passes: int) -> list[dict[str, Any]]:
    counts_file = mountpoint.parent / "noopen-counts.json"
    counts_file.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-m", "tests.bench.noopen", "--serve", str(mountpoint), str(files),
                              "1" if no_open else "0", str(counts_file)])
    rows = []
    try:
        deadline = time.monotonic() + 30
        while not counts_file.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the minimal filesystem did not mount")
            time.sleep(0.05)

        def counts() -> dict[str, int]:
            before = counts_file.stat().st_mtime_ns
            child.send_signal(signal.SIGUSR1)
            until = time.monotonic() + 10
            while counts_file.stat().st_mtime_ns == before and time.monotonic() < until:
                time.sleep(0.01)
            result: dict[str, int] = json.loads(counts_file.read_text())
            return result

        spec = {"kind": "read", "files": [(str(mountpoint / f"f{i}"), SIZE) for i in range(files)],
                "readers": READERS, "deadline": 120, "chunk": 1024 * KiB}
        for number in range(1, passes + 1):
            before, cpu = counts(), cpu_seconds(child.pid)
            result = run_worker(spec, 150)
            cpu = cpu_seconds(child.pid) - cpu
            after = counts()
            requests = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            rows.append({"pass": number, "files": result["files"], "seconds": result["seconds"],
                         "cpu_per_10k": cpu / files * 1e4, "requests": requests})
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if os.path.ismount(mountpoint):  # the child died before unmounting
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.noopen", description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2] == "1", args.serve[3])
        return
    mountpoint = Path(tempfile.mkdtemp(prefix="noopen-")) / "mnt"
    mountpoint.mkdir()
    for no_open in (False, True):
        for row in measure(mountpoint, args.files, no_open, args.passes):
            requests = " ".join(f"{k}={v}" for k, v in sorted(row["requests"].items()))
            print(f"{'ENOSYS open' if no_open else 'keep_cache open':16} pass {row['pass']}: "
                  f"{row['cpu_per_10k']:.3f} CPU s per 10k files, {row['files'] / row['seconds']:,.0f} files/s, "
                  f"{requests}")


if __name__ == "__main__":
    main()
