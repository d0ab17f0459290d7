"""Admission and eviction decisions of one cache tier: a pure in-memory index (no I/O, no clock).

A policy knows which blocks are resident in its tier (name → size, in LRU order) and the tier's watermarks in
bytes. The store asks it ``plan(name, size)`` before writing a block: ``None`` means "do not cache it here",
otherwise the list of residents to evict first. A plan never lets resident plus in-flight bytes exceed the high
watermark, and when it has to evict, it evicts down to the low watermark so that disk tiers delete files in
batches instead of one per write (Fluid's and Alluxio's watermark semantics).

Two policies:

* ``LruPolicy`` admits everything and evicts the least recently used block. Good with locality, but with
  shuffled epochs over a dataset larger than the tier most blocks are evicted before their next use: a block
  hits only if the next epoch reaches it early enough, about 0.10 per epoch for a dataset twice the tier with
  watermarks 0.95/0.7 (1/8 in theory for a full tier), 0.04 for three times the tier.
* ``FrequencyAdmissionPolicy`` (default, TinyLFU-like) evicts in the same LRU order but admits a new block over
  the LRU victim only if the new block was accessed more often than the victim. Ties keep the resident, so a
  stable subset stays cached across shuffled epochs and earns ``high x tier / dataset`` hits per epoch (0.475
  for a dataset twice the tier). Counts are halved periodically (aging) so a new working set takes over.

Callers report every lookup with ``record_access`` (hits and misses) and every change with ``inserted`` and
``removed``. All operations are O(1) except ``victims`` (O(victims)) and the amortised aging pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

# A fresh policy has no resident blocks to estimate the tier's block count from; it assumes this many until
# the first insert (bounds the count table at 4 x 256 entries meanwhile).
DEFAULT_CAPACITY_ENTRIES = 256


class EvictionPolicy(Protocol):
    """The index of one tier: which blocks are resident, which may enter, which leave first."""

    @property
    def high_bytes(self) -> int: ...

    @property
    def low_bytes(self) -> int: ...

    @property
    def resident_bytes(self) -> int: ...

    def __contains__(self, name: object) -> bool: ...

    def __len__(self) -> int: ...

    def record_access(self, name: str) -> None:
        """A lookup of ``name`` (hit or miss) happened."""

    def admit(self, name: str, size: int, in_flight: int = 0) -> bool:
        """May block ``name`` of ``size`` bytes enter, given ``in_flight`` bytes reserved but not inserted yet?"""

    def victims(self, bytes_to_free: int) -> list[str]:
        """Residents to evict first, oldest first, adding up to at least ``bytes_to_free`` (all if too few)."""

    def plan(self, name: str, size: int, in_flight: int = 0) -> list[str] | None:
        """``None`` if the block is refused, else the residents to evict before inserting it."""

    def inserted(self, name: str, size: int) -> None:
        """Block ``name`` became resident (the caller made room per ``plan``)."""

    def removed(self, name: str) -> None:
        """Block ``name`` left the tier (evicted, dropped or lost); unknown names are ignored."""

    def adopted(self, name: str, size: int) -> None:
        """``inserted``, for a block found on disk after the tier was in use: it goes first in eviction order,
        before every resident (a background scan after a restart finds blocks older than any used since)."""

    def residents(self) -> list[str]:
        """Every resident block, in eviction order (the next to go first): what a clean stop writes down."""


PolicyFactory = Callable[[int, int], EvictionPolicy]
"""Builds a tier's policy from its (high watermark bytes, low watermark bytes)."""


class LruPolicy:
    """Least recently used eviction, admits every block that fits under the high watermark."""

    def __init__(self, high_bytes: int, low_bytes: int) -> None:
        if not 0 <= low_bytes <= high_bytes:
            raise ValueError(f"watermarks must satisfy 0 <= low <= high, got low={low_bytes} high={high_bytes}")
        self._high = high_bytes
        self._low = low_bytes
        # Oldest first: move_to_end on access, iteration from the front finds the victims.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0

    @property
    def high_bytes(self) -> int:
        return self._high

    @property
    def low_bytes(self) -> int:
        return self._low

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def __contains__(self, name: object) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def record_access(self, name: str) -> None:
        if name in self._lru:
            self._lru.move_to_end(name)

    def victims(self, bytes_to_free: int) -> list[str]:
        return self._take(bytes_to_free)[0]

    def admit(self, name: str, size: int, in_flight: int = 0) -> bool:
        return self.plan(name, size, in_flight) is not None

    def plan(self, name: str, size: int, in_flight: int = 0) -> list[str] | None:
        if size > self._high or name in self._lru:
            return None
        excess = self._bytes + in_flight + size - self._high
        if excess <= 0:
            return []
        displaced, freed = self._take(excess)
        if freed < excess or not self._beats(name, displaced):
            return None  # in-flight writes hold the room, or the candidate loses against the residents
        return self._take(self._bytes + in_flight + size - self._low)[0]

    def inserted(self, name: str, size: int) -> None:
        previous = self._lru.pop(name, None)
        if previous is not None:
            self._bytes -= previous
        self._lru[name] = size
        self._bytes += size

    def removed(self, name: str) -> None:
        size = self._lru.pop(name, None)
        if size is not None:
            self._bytes -= size

    def adopted(self, name: str, size: int) -> None:
        self.inserted(name, size)
        self._lru.move_to_end(name, last=False)

    def residents(self) -> list[str]:
        return list(self._lru)

    def _take(self, bytes_to_free: int) -> tuple[list[str], int]:
        names: list[str] = []
        freed = 0
        if bytes_to_free <= 0:
            return names, freed
        for name, size in self._lru.items():
            names.append(name)
            freed += size
            if freed >= bytes_to_free:
                break
        return names, freed

    def _beats(self, name: str, displaced: list[str]) -> bool:
        """Whether ``name`` may displace these residents; LRU always says yes."""
        return True


class FrequencyAdmissionPolicy(LruPolicy):
    """LRU eviction order with TinyLFU-like admission: a newcomer must have been seen more often than its victim.

    Knobs:
      ``admission_margin`` — the newcomer's count must exceed the victim's by more than this, so that blocks seen
        equally often tie (and ties keep the resident). Two counts of noise separate equals: the newcomer's count
        already includes the lookup that missed while the resident's turn in the current pass may still be ahead
        (one), and a halving in the middle of a pass leaves blocks read before it one count behind blocks read
        after it (one more). With margin 1 every halving sets off a churn of several epochs (hit ratio 0.1 instead
        of 0.475 for a shuffled dataset twice the tier); with 2 the subset stays put for any dataset size.
      ``table_factor`` — the count table holds at most this many x the tier's block count entries; past that the
        least-seen non-residents are forgotten (residents never are). 4 remembers a whole dataset up to about 4x
        the tier; bigger datasets still keep a stable subset, since forgetting only makes admission harder.
      ``aging_factor`` — every ``aging_factor`` x block-count lookups all counts are halved (TinyLFU's reset with
        its sample size of 10 x the cache), so a new working set overtakes the old one (≈ 11 passes over it after
        50 passes over the old one, in the tests).

    Memory: a table entry costs ~100 bytes (dict slot, 32-character name, int), so a 1 TiB tier of 4 MiB blocks
    (262,144 blocks) holds at most ~1M entries ≈ 100 MB.
    """

    def __init__(
        self,
        high_bytes: int,
        low_bytes: int,
        *,
        admission_margin: int = 2,
        table_factor: int = 4,
        aging_factor: int = 10,
    ) -> None:
        super().__init__(high_bytes, low_bytes)
        if admission_margin < 0 or table_factor < 1 or aging_factor < 1:
            raise ValueError("admission_margin must be >= 0, table_factor and aging_factor >= 1")
        self._margin = admission_margin
        self._table_factor = table_factor
        self._aging_factor = aging_factor
        self._counts: dict[str, int] = {}
        self._since_aging = 0
        self._capacity_entries = DEFAULT_CAPACITY_ENTRIES

    def count(self, name: str) -> int:
        """How often ``name`` was accessed, as remembered after aging (0 if forgotten)."""
        return self._counts.get(name, 0)

    @property
    def table_size(self) -> int:
        return len(self._counts)

    @property
    def max_table_size(self) -> int:
        return self._table_factor * self._capacity_entries

    def record_access(self, name: str) -> None:
        if name in self._lru:
            self._lru.move_to_end(name)
        counts = self._counts
        counts[name] = counts.get(name, 0) + 1
        self._since_aging += 1
        if self._since_aging >= self._aging_factor * self._capacity_entries:
            self._age()
        if len(counts) > self._table_factor * self._capacity_entries:
            self._prune()

    def inserted(self, name: str, size: int) -> None:
        super().inserted(name, size)
        # A block found on disk after a restart was accessed at least once; without this a newcomer seen once
        # more would displace it in the first epoch after the restart.
        if self._counts.get(name, 0) < 1:
            self._counts[name] = 1
        self._update_capacity()

    def removed(self, name: str) -> None:
        super().removed(name)  # its count stays: the history of non-residents is what admission compares
        self._update_capacity()

    def _beats(self, name: str, displaced: list[str]) -> bool:
        needed = max((self._counts.get(victim, 0) for victim in displaced), default=0) + self._margin
        return self._counts.get(name, 0) > needed

    def _update_capacity(self) -> None:
        """Estimated number of blocks at the high watermark, from the mean resident block size."""
        if self._lru:
            mean = max(1, self._bytes // len(self._lru))
            self._capacity_entries = max(len(self._lru), self._high // mean, 1)

    def _age(self) -> None:
        """Halve every count, forgetting those that reach 0 (TinyLFU's reset)."""
        self._counts = {name: count >> 1 for name, count in self._counts.items() if count > 1}
        self._since_aging = 0

    def _prune(self) -> None:
        """Forget the least-seen non-residents until a quarter of the table is free.

        Residents keep their counts (they are at most a quarter of the table), so the table never forgets what a
        newcomer has to beat; forgetting a non-resident only makes its next admission harder. Freeing a quarter
        keeps the next prune ``max_table_size / 4`` new names away, so each O(table) pass is amortised.
        """
        target = self.max_table_size * 3 // 4
        resident = self._lru
        threshold = 1
        while len(self._counts) > target:
            kept = {n: c for n, c in self._counts.items() if c > threshold or n in resident}
            if len(kept) == len(self._counts) and threshold > max(self._counts.values(), default=0):
                break  # only residents left
            self._counts = kept
            threshold *= 2
