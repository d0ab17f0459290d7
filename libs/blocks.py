"""Block identity and arithmetic: how a file is cut into fixed-size blocks and how a block is named.

A block id (``libs.events.agent.BlockId``) pins the mount, the object key, the object's ETag and the block
index, so bytes of an overwritten object can never be mixed with the old ones: a new ETag is a different block.
Its name, a hash of the id, is the block's file name in a disk tier; inventory events carry the id itself.
Shared by the agent's cache and read path and by whoever reasons about blocks (the scheduler next).
"""

from __future__ import annotations

import xxhash

from libs.events.agent import BlockId

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockId", "block_count", "block_name", "block_span", "blocks_touched", "checksum",
           "checksum_stream"]

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024


def block_name(block: BlockId) -> str:
    return block.name


def block_span(file_size: int, block_size: int, index: int) -> tuple[int, int]:
    """(start offset, length) of block ``index`` of a file; the last block may be short."""
    start = index * block_size
    return start, max(0, min(block_size, file_size - start))


def block_count(file_size: int, block_size: int) -> int:
    return (file_size + block_size - 1) // block_size


def blocks_touched(offset: int, length: int, file_size: int, block_size: int) -> range:
    """Indices of the blocks that hold bytes [offset, offset+length) of the file, clipped to its size."""
    end = min(offset + length, file_size)
    if end <= offset:
        return range(0)
    return range(offset // block_size, (end - 1) // block_size + 1)


def checksum(data: bytes | memoryview) -> int:
    """64-bit xxh3 of a block's bytes: fast enough (~10 GB/s) to verify every block read from disk."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_stream() -> xxhash.xxh3_64:
    """``checksum`` fed in pieces (``update``, then ``intdigest``; ``reset`` to start over): the same digest over
    the same bytes, for data that arrives in pieces that do not line up with what is checksummed."""
    return xxhash.xxh3_64()
