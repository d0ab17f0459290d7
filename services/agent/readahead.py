"""Per-handle sequential detection and the read-ahead window, and the global read-ahead memory budget. Pure.

The window starts at one block and doubles while reads stay sequential, up to ``max_blocks``; a jump resets it.
Memory for blocks fetched ahead is budgeted across all open files (per-handle windows multiplied by open files
caused out-of-memory waves in Mountpoint-S3 and JuiceFS), so a handle prefetches only what the budget allows; under
an agent, across all the node's mounts too (``MemoryBudget.node``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# 16 blocks of 4 MiB = 64 MiB ahead per sequential reader: enough parallel GETs to fill a fast link
# (Mountpoint-S3 reaches its ceiling with a comparable window), small enough for many readers.
DEFAULT_MAX_BLOCKS = 16


@dataclass
class ReadAhead:
    max_blocks: int = DEFAULT_MAX_BLOCKS
    next_offset: int = -1
    window: int = 0

    def on_read(self, offset: int, length: int) -> int:
        """Record a read; returns how many blocks beyond the current one to keep fetched ahead."""
        sequential = offset == self.next_offset or (self.next_offset == -1 and offset == 0)
        self.next_offset = offset + length
        if not sequential:
            self.window = 0
            return 0
        self.window = 1 if self.window == 0 else min(self.window * 2, self.max_blocks)
        return self.window

    @property
    def sequential(self) -> bool:
        return self.window > 0


class NodeLedger(Protocol):
    """The node's budget shared with the other mount processes (``services.agent.nodebudget``)."""

    def try_take(self, size: int) -> bool: ...

    def give_back(self, size: int) -> None: ...


@dataclass
class MemoryBudget:
    """Bytes of blocks fetched ahead and not yet consumed, across every open handle; with ``node``, taken from
    the node's budget shared by every mount process (``limit`` is then the node's), else from ``limit`` alone."""

    limit: int
    used: int = 0
    node: NodeLedger | None = None

    def try_take(self, size: int) -> bool:
        if self.node is not None:
            if not self.node.try_take(size):
                return False
        elif self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        size = min(size, self.used)
        self.used -= size
        if self.node is not None and size:
            self.node.give_back(size)
