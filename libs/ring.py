"""The ring of block owners, pure: which cache workers own a block, in order.

Rendezvous (highest-random-weight) hashing: every worker gets a score for the block, a hash of the two names,
and the owners are the workers by falling score. Each block gets its own ordered list (the first owner fetches
it from the store and keeps it; the next is where readers go when the first is gone), one large file spreads
over every worker, and a change of workers moves only the blocks whose owners changed: a worker that leaves
hands each of its blocks to that block's next owner, one that joins takes only the blocks it now scores
highest on. Unlike a ring of virtual nodes there is nothing to tune, and unlike hash-mod-N (Alluxio 2) a resize
does not remap everything.

Shared by the agent's read path (where to read a block) and the loader (which agent warms which block).
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

__all__ = ["owners", "primary_owner"]


def _score(worker: str, block: str) -> int:
    # The NUL keeps ("ab", "c") and ("a", "bc") apart.
    return xxhash.xxh3_64_intdigest(f"{worker}\0{block}".encode())


def owners(block: str, workers: Iterable[str], count: int | None = None) -> list[str]:
    """The workers owning ``block`` (a block name), best first; at most ``count`` of them (all if None).

    Equal scores (a 1 in 2**64 event) are broken by worker name, so every process computes the same list.
    """
    ranked = sorted(set(workers), key=lambda worker: (-_score(worker, block), worker))
    return ranked if count is None else ranked[:count]


def primary_owner(block: str, workers: Iterable[str]) -> str | None:
    """The first owner of ``block``, or None without workers."""
    best = owners(block, workers, 1)
    return best[0] if best else None
