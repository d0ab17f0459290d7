"""Memory per file of a dataset's manifest where it is held for long: a mount process's file tree and the scheduler's
catalog (issue 15): ``python -m tests.bench.tree_memory [--files 200000,1000000]``.

An ImageNet-shaped manifest (``train/n01440764/n01440764_10026.JPEG``, 1,000 folders, ~110 KB files, S3 ETags) of
N files is written as the dataset service writes it and read back as ``ManifestStore.load`` reads it; then, each in
a fresh child process so one's freed memory does not hide the next's growth:
- ``mount``: what a mount process keeps after loading it (``services.agent.mountd``: the tree, which holds the
  entries as columns and answers the peer server's and the loader's (mount, key) look-ups);
- ``catalog``: what the scheduler keeps (``services.scheduler.fold.Catalog``), the entries dropped after.

Reported per file: the bytes tracemalloc counts as still allocated (the structures themselves), the growth of the
process's RSS in another child without tracemalloc (allocator overhead and what loading freed but the allocator kept
included), and that child's load time (decode and build). Not part of ``make bench``: pure, no NATS.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, cast

from libs.events.dataset import ManifestEntry
from libs.manifest import read_entries, write_entry

CLASSES = 1000
MTIME = 1_700_000_000.0


def imagenet_entries(files: int, classes: int = CLASSES) -> list[ManifestEntry]:
    """``files`` entries shaped as ImageNet's train set: ``classes`` folders, ~110 KB JPEGs, 32-hex ETags."""
    entries = []
    for i in range(files):
        wnid = f"n{1440764 + (i % classes) * 9973:08d}"
        key = f"train/{wnid}/{wnid}_{10026 + i // classes}.JPEG"
        entries.append(ManifestEntry(path="/" + key, mount=0, key=key, size=110_000 + (i * 7919) % 20_000,
                                     etag=f"{(i * 2654435761) % 2**128:032x}", mtime=MTIME + i * 0.001))
    return entries


def manifest_bytes(files: int, classes: int = CLASSES) -> bytes:
    out = io.BytesIO()
    for entry in imagenet_entries(files, classes):
        write_entry(out, entry)
    return out.getvalue()


def load(data: bytes) -> list[ManifestEntry]:
    """As ``ManifestStore.load`` decodes a manifest it fetched."""
    return list(read_entries(io.BytesIO(data)))


def keep_mount(entries: list[ManifestEntry]) -> Any:
    """What ``MountProcess`` keeps: the tree (its allocator remembers it) and the tree's (mount, key) index."""
    from services.agent.namespace import InodeAllocator, Namespace
    allocator = InodeAllocator()
    tree = Namespace.build(entries, allocator)
    return allocator, tree, tree.by_key


def keep_catalog(entries: list[ManifestEntry]) -> Any:
    from services.scheduler.fold import Catalog
    return Catalog(entries)


KEEPERS: dict[str, Callable[[list[ManifestEntry]], Any]] = {"mount": keep_mount, "catalog": keep_catalog}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(what: str, files: int, traced: bool) -> dict[str, float]:
    """In this process: bytes per file kept by ``what``, counted by tracemalloc (``traced``) or as the growth of RSS
    (without tracemalloc, whose own bookkeeping would count), and the seconds the load took."""
    data = manifest_bytes(files)
    keep = KEEPERS[what]
    keep(load(manifest_bytes(100)))  # imports and first-use caches outside the measurement
    gc.collect()
    rss_before = rss_bytes()
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    kept = keep(load(data))
    seconds = time.perf_counter() - started
    del data
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] if traced else rss_bytes() - rss_before
    tracemalloc.stop()
    del kept
    return {"per_file": grown / files, "seconds": seconds}


def child(what: str, files: int, traced: bool) -> dict[str, float]:
    argv = [sys.executable, "-m", "tests.bench.tree_memory", "--only", what, "--files", str(files)]
    out = subprocess.run([*argv, "--traced"] if traced else argv, check=True, capture_output=True, text=True).stdout
    return cast(dict[str, float], json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default="200000,1000000", help="comma-separated manifest sizes")
    parser.add_argument("--only", choices=sorted(KEEPERS), help=argparse.SUPPRESS)  # the child's one measurement
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(n) for n in args.files.split(",")]
    if args.only:
        print(json.dumps(measure(args.only, sizes[0], args.traced)))
        return
    print(f"{'structure':<10} {'files':>10} {'traced B/file':>14} {'RSS B/file':>11} {'load s':>7}")
    for files in sizes:
        for what in KEEPERS:
            traced, rss = child(what, files, traced=True), child(what, files, traced=False)
            print(f"{what:<10} {files:>10} {traced['per_file']:>14.0f} {rss['per_file']:>11.0f} "
                  f"{rss['seconds']:>7.2f}")


if __name__ == "__main__":
    main()
