"""The FUSE metadata and small-file warm path of one mount, measured in CPU and requests rather than wall time
(issue 14): ``python -m tests.bench.metapath [--dir DIR] [--meta N] [--small N]``.

A local tree (``meta/``: 20k files of 16 bytes in folders of 200, as the agent bench's walk; ``small/``: 2,000
files of 100 KiB) is served by ``DatasetFS`` over a MEM-tier block cache in a child process, mounted with the
options ``mountd`` uses and with the FUSE handlers timed for /metrics as in production. The parent walks the
tree with find(1) three times and reads ``small/`` with 16 threads three times (from ``tests.bench.worker``),
and reports for each pass: the serving process's CPU seconds (from /proc/<pid>/stat) per 10k operations (stats
or files), the FUSE requests it answered (counted by handler), and the wall time next to the same pass over
the local tree. CPU and requests hold on a busy machine, where wall times do not. Not part of ``make bench``:
no NATS, no object store, only the mount process's own paths.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.processes import PROJECT_ROOT
from tests.bench.worker import run_worker

KiB = 1024
READERS = 16
# Enough passes that the third (all pages and entries in the kernel's caches) is the warm number.
PASSES = 3
DEADLINE = 300.0
# Set for the serving child by --with-opens.
WITH_OPENS = "SHOAL_BENCH_METAPATH_WITH_OPENS"


def build_tree(root: Path, meta: int, small: int) -> None:
    marker = root / f".done-{meta}-{small}"
    if marker.exists():
        return
    for i in range(meta):
        folder = root / "meta" / f"d{i // 200:03d}"
        if i % 200 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"m{i:05d}.bin").write_bytes(i.to_bytes(16, "little"))
    (root / "small").mkdir(parents=True, exist_ok=True)
    for i in range(small):
        (root / "small" / f"small-{i:05d}.bin").write_bytes(i.to_bytes(8, "little") * (100 * KiB // 8))
    marker.touch()


# --- the serving child ------------------------------------------------------------------------------------------


def serve(source: Path, mountpoint: Path, counts_file: Path) -> None:
    from services.agent.mountd import enable_asyncio_fuse

    enable_asyncio_fuse()
    asyncio.run(_serve(source, mountpoint, counts_file))


async def _serve(source: Path, mountpoint: Path, counts_file: Path) -> None:
    import pyfuse3

    from libs.events.dataset import ManifestEntry
    from libs.events.runtime import Level
    from libs.ufs import open_store
    from libs.ufs.base import LocalLocation
    from services.agent.cache import BlockCache
    from services.agent.fs import NO_OPEN, DatasetFS, time_operations
    from services.agent.metrics import MountMetrics
    from services.agent.mountd import fuse_options, raise_read_ahead
    from services.agent.namespace import InodeAllocator, Namespace
    from services.agent.readahead import MemoryBudget
    from services.agent.reader import BlockReader, StoreGate

    store = open_store(LocalLocation(root=source))
    entries = [ManifestEntry(path="/" + info.key, mount=0, key=info.key, size=info.size, etag=info.etag,
                             mtime=info.mtime) async for info in store.list() if not info.key.startswith(".")]
    block_size = 4 * 1024 * KiB
    cache_root = Path(tempfile.mkdtemp(prefix="metapath-cache-"))
    cache = BlockCache.from_levels([Level(mediumtype="MEM", quota="1Gi", path=str(cache_root))], "bench")
    reader = BlockReader(cache, [StoreGate(store)], block_size, MemoryBudget(256 * 1024 * KiB),
                         write_block=cache.put_async)
    fs = DatasetFS(Namespace.build(entries, InodeAllocator()), reader, uid=None, gid=None, block_size=block_size,
                   no_open=NO_OPEN and not os.environ.get(WITH_OPENS))
    counts: collections.Counter[str] = collections.Counter()
    metrics = MountMetrics("bench-node", "default/metapath")
    production = metrics.fuse_observer()

    def observer(name: str) -> Callable[[float], None]:
        observe = production(name) if production is not None else None

        def counted(seconds: float) -> None:
            counts[name] += 1
            if observe is not None:
                observe(seconds)

        return counted

    time_operations(fs, observer)
    pyfuse3.init(fs, str(mountpoint), fuse_options("default/metapath", allow_other=False))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    def write_counts() -> None:
        partial = counts_file.with_suffix(".partial")
        partial.write_text(json.dumps(counts))
        partial.rename(counts_file)  # the parent never reads half a file

    loop.add_signal_handler(signal.SIGUSR1, write_counts)
    fuse_loop = asyncio.create_task(pyfuse3.main())
    await asyncio.to_thread(os.statvfs, mountpoint)
    raise_read_ahead(str(mountpoint))
    write_counts()
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([fuse_loop, stopper], return_when=asyncio.FIRST_COMPLETED)
    pyfuse3.terminate()
    try:
        await fuse_loop
    finally:
        pyfuse3.close(unmount=True)
        await store.close()


# --- the measuring parent ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """User + system (or system only) CPU seconds of ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / os.sysconf("SC_CLK_TCK")


class Child:
    def __init__(self, source: Path, mountpoint: Path, counts_file: Path) -> None:
        self.counts_file = counts_file
        counts_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.metapath", "--serve", str(source),
                                      str(mountpoint), str(counts_file)], cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 60
        while not counts_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the serving process did not mount")
            time.sleep(0.05)

    def counts(self) -> dict[str, int]:
        before = self.counts_file.stat().st_mtime_ns
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while self.counts_file.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.01)
        result: dict[str, int] = json.loads(self.counts_file.read_text())
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(child: Child, spec: dict[str, Any]) -> dict[str, Any]:
    counts_before = child.counts()
    cpu_before = cpu_seconds(child.proc.pid)
    kernel_before = cpu_seconds(child.proc.pid, kernel_only=True)
    result = run_worker(spec, DEADLINE + 30)
    cpu = cpu_seconds(child.proc.pid) - cpu_before
    kernel = cpu_seconds(child.proc.pid, kernel_only=True) - kernel_before
    counts_after = child.counts()
    requests = {k: v - counts_before.get(k, 0) for k, v in counts_after.items() if v - counts_before.get(k, 0)}
    ops = result.get("entries") or result.get("files") or 0
    if not ops or not result.get("complete"):
        raise RuntimeError(f"pass failed: {json.dumps(result)[:600]}")
    return {"ops": ops, "seconds": result["seconds"], "cpu": cpu, "cpu_per_10k": cpu / ops * 1e4,
            "kernel_share": kernel / cpu if cpu else 0.0,
            "requests": requests, "requests_per_op": sum(requests.values()) / ops if ops else None,
            "complete": result.get("complete")}


def local_pass(spec: dict[str, Any]) -> dict[str, Any]:
    result = run_worker(spec, DEADLINE + 30)
    ops = result.get("entries") or result.get("files") or 0
    if not ops or not result.get("complete"):
        raise RuntimeError(f"pass failed: {json.dumps(result)[:600]}")
    return {"ops": ops, "seconds": result["seconds"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.metapath", description=__doc__)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shoal-metapath"))
    parser.add_argument("--meta", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--passes", type=int, default=PASSES, help="passes per workload (the first is cold)")
    parser.add_argument("--only", choices=("walk", "read"), help="one workload")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="py-spy the serving process's warm passes into PREFIX-<workload>.txt (collapsed stacks)")
    parser.add_argument("--with-opens", action="store_true",
                        help="answer open and opendir as stock pyfuse3 must (the mount's no-open mode off)")
    parser.add_argument("--serve", nargs=3, metavar=("SOURCE", "MOUNTPOINT", "COUNTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.with_opens:
        os.environ[WITH_OPENS] = "1"  # read by the serving child
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), Path(args.serve[2]))
        return
    work = Path(args.dir)
    source = work / "source"
    build_tree(source, args.meta, args.small)
    mountpoint = work / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    small = [(f"small/small-{i:05d}.bin", 100 * KiB) for i in range(args.small)]

    def walk(root: Path) -> dict[str, Any]:
        return {"kind": "walk", "root": str(root / "meta"), "deadline": DEADLINE}

    def read(root: Path) -> dict[str, Any]:
        return {"kind": "read", "files": [(str(root / p), s) for p, s in small], "readers": READERS,
                "deadline": DEADLINE, "chunk": 1024 * KiB}

    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for name, spec in (("walk", walk), ("read", read)):
        if args.only and name != args.only:
            continue
        local_pass(spec(source))
        local = local_pass(spec(source))
        child = Child(source, mountpoint, work / "counts.json")
        profiler = None
        try:
            for number in range(1, args.passes + 1):
                if args.profile and number == 2:  # the warm passes only
                    profiler = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                                                 "--native", "-r", "200", "-f", "raw",
                                                 "-o", f"{args.profile}-{name}.txt", "-p", str(child.proc.pid)],
                                                stdout=subprocess.DEVNULL)
                rows.append((f"{name} {number}", measure(child, spec(mountpoint)), local))
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait()
            child.stop()
    print(f"{'pass':8} {'ops':>6} {'CPU s/10k':>9} {'sys':>4} {'req/op':>7} {'ops/s':>9} {'local ops/s':>11} "
          f"{'ratio':>6}  requests")
    for label, row, local in rows:
        rate = row["ops"] / row["seconds"]
        local_rate = local["ops"] / local["seconds"]
        requests = " ".join(f"{k}={v}" for k, v in sorted(row["requests"].items()))
        print(f"{label:8} {row['ops']:>6} {row['cpu_per_10k']:>9.3f} {row['kernel_share']:>4.0%} "
              f"{row['requests_per_op']:>7.3f} {rate:>9,.0f} "
              f"{local_rate:>11,.0f} {rate / local_rate:>6.2f}  {requests}")
    for name in ("walk", "read"):
        warm = [row for label, row, _ in rows if label.startswith(name) and not label.endswith(" 1")]
        if warm:
            ops = sum(row["ops"] for row in warm)
            answered = sum(sum(row["requests"].values()) for row in warm)
            print(f"{name} warm passes: {sum(row['cpu'] for row in warm) / ops * 1e4:.3f} CPU s per 10k, "
                  f"{answered / ops:.3f} requests per op, {ops / sum(row['seconds'] for row in warm):,.0f} ops/s")
    (work / "last.json").write_text(json.dumps([{"pass": label, **row, "local": local} for label, row, local in rows]))


if __name__ == "__main__":
    main()
