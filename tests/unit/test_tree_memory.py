"""Bytes per file a mount process's tree and the scheduler's catalog keep (issue 15), counted by tracemalloc on an
ImageNet-shaped manifest (``tests.bench.tree_memory`` measures the same at 200k and 1M files).

The bounds are 1.5x what the columnar tree and catalog measured (~517 and ~217 bytes per file at 1M files): the
object-per-file structures they replaced kept ~1,060 and ~505, and a change that brings back an object per file
fails here."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

from tests.bench.tree_memory import keep_catalog, keep_mount, load, manifest_bytes

FILES = 10_000
CLASSES = 10  # 1,000 files a folder, as ImageNet's 1,281 a class
MOUNT_BYTES_PER_FILE = 775
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
