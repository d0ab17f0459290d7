"""How long a mount's block cache takes to start on a big disk tier: ``python -m tests.bench.cache_start``.

Fills a disk tier folder with N block files in the real layout (``services.agent.cache.tiers``: shard folders,
header, chunk table, data, block id), then times what a restarted mount process does before it can serve:
``BlockCache.from_levels`` and ``BlockCache.load`` (the restart scan), the way ``mountd`` calls them. Each file
holds a whole block of zeros as a hole (a sparse file), so its chunk table and checksums are right, a read of it
verifies, and 200,000 blocks of 4 MiB need a few hundred MiB of disk rather than 800 GB.

Two starts are timed: one after a crash (no index: every block file is opened, in the background while the mount
serves) and one after a clean stop (the index the stop wrote), each with the page cache dropped first when run as
root (``--warm`` keeps it: the Python cost alone). Each says how long until the cache serves and until every block
is indexed. ``--profile`` prints the top of a cProfile of the crash start and its scan. It runs on a Shoal from
before the index too (``load``, everything before serving), for before/after numbers. The folder is kept under
``.shoal/bench/cache-start-<N>`` so later runs skip the fill (``--fresh`` fills it again).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

from libs.blocks import DEFAULT_BLOCK_SIZE, BlockId
from libs.events.runtime import Level
from services.agent.cache import BlockCache, LruPolicy
from services.agent.cache.tiers import (
    CHUNK_BYTES,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MARKER,
    MARKER_TEXT,
    SHARD_LENGTH,
    _chunk_table,
    _data_offset,
)

DEFAULT_BLOCKS = 200_000
SUFFIX = "default/bench"


def block_of(number: int) -> BlockId:
    """Block ``number``: 25 blocks per object, as a dataset of 100 MiB files cut at 4 MiB."""
    return BlockId(0, f"train/shard-{number // 25_000:03d}/file-{number // 25:06d}.bin", "etag-1", number % 25)


def fill(root: Path, blocks: int, block_size: int) -> None:
    """``blocks`` block files of ``block_size`` zero bytes under the tier folder ``root``, as ``DiskTier.write``
    lays them out (its encoder, header and chunk table); the data is left as a hole, which reads as the zeros."""
    import msgspec

    encoder = msgspec.msgpack.Encoder()
    table = _chunk_table(bytes(CHUNK_BYTES)) * (block_size // CHUNK_BYTES)
    offset = _data_offset(block_size // CHUNK_BYTES)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_bytes(MARKER_TEXT)
    (root / ".shoal-block-size").write_text(f"{block_size}\n")
    from libs.blocks import checksum

    digest = checksum(table)
    for number in range(blocks):
        block = block_of(number)
        ident = encoder.encode(block)
        name = block.name
        shard = root / name[:SHARD_LENGTH]
        if number < 256 or not shard.exists():
            shard.mkdir(exist_ok=True)
        fd = os.open(shard / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, HEADER.pack(MAGIC, FORMAT_VERSION, 0, block_size, digest, len(ident), 0) + table, 0)
            os.pwrite(fd, ident, offset + block_size)
        finally:
            os.close(fd)


def drop_page_cache() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def start(cache_root: Path, blocks: int, block_size: int) -> tuple[BlockCache, float]:
    """A mount's cache start, as ``mountd`` does it: built from its level, then ``start`` (the index of a clean
    stop); ``load`` (the whole scan) on a Shoal from before ``start`` existed. (cache, seconds to serve)."""
    level = Level(mediumtype="SSD", path=str(cache_root), quota=str(blocks * block_size * 2), high="0.95", low="0.7")
    started = time.perf_counter()
    cache = BlockCache.from_levels([level], SUFFIX, policy_factory=LruPolicy)
    getattr(cache, "start", cache.load)(block_size)
    return cache, time.perf_counter() - started


def rest(cache: BlockCache) -> float:
    """Seconds the background scan takes to index the blocks ``start`` did not (0 on a Shoal without one)."""
    began = time.perf_counter()
    if hasattr(cache, "scan_rest"):
        asyncio.run(cache.scan_rest())
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--dir", type=Path, default=None, help="the cache root (default .shoal/bench/...)")
    parser.add_argument("--fresh", action="store_true", help="fill the folder again")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it, as root)")
    parser.add_argument("--profile", action="store_true", help="cProfile the crash start")
    args = parser.parse_args()
    cache_root = args.dir or Path(".shoal/bench") / f"cache-start-{args.blocks}"
    tier = cache_root / SUFFIX
    if args.fresh and cache_root.exists():
        shutil.rmtree(cache_root)
    if not tier.exists():
        began = time.perf_counter()
        fill(tier, args.blocks, args.block_size)
        print(f"filled {tier} with {args.blocks} blocks in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    # A crash: no index, so the start scans every file.
    for leftover in tier.glob(".shoal-index*"):
        leftover.unlink()
    cold = not args.warm and drop_page_cache()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    cache, crash_seconds = start(cache_root, args.blocks, args.block_size)
    serving = len(cache.blocks())
    background = rest(cache)
    if profiler is not None:
        profiler.disable()
    print(f"crash start: {crash_seconds:.2f} s to serve ({serving} blocks indexed then), "
          f"{crash_seconds + background:.2f} s until all {len(cache.blocks())} are "
          f"({'cold' if cold else 'warm'} page cache)")
    if hasattr(cache, "save_index"):
        began = time.perf_counter()
        cache.save_index(args.block_size)
        print(f"clean stop: {time.perf_counter() - began:.2f} s to write the index")
        cold = not args.warm and drop_page_cache()
        cache, clean_seconds = start(cache_root, args.blocks, args.block_size)
        serving = len(cache.blocks())
        background = rest(cache)
        print(f"clean restart: {clean_seconds:.2f} s to serve ({serving} blocks indexed then), "
              f"{clean_seconds + background:.2f} s until the background scan is done "
              f"({'cold' if cold else 'warm'} page cache)")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
