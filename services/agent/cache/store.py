"""The agent's block cache: which tier holds each block, lookups, admission and eviction applied to the tiers.

``BlockCache`` keeps one index (block name → block id, tier, size) and one eviction policy per tier, and applies
the policies' plans to the tiers' storage. Tiers are tried in the order MEM, SSD, HDD: a new block goes to the
first medium with a tier that is available and whose policy admits it (among a level's directories, one with free
room, by free room; when all are full, the one holding the level's least recently used block evicts: ``reserve``);
a block lives in exactly one tier (no promotion or
demotion: a block evicted from memory is dropped, not written to disk). Every policy sees every lookup, so each
tier's admission knows how popular a block is even while another tier holds it. With ``LruPolicy`` the first
tier admits everything that fits, so lower tiers only get blocks too large for it; the default frequency policy
refuses newcomers that are not hotter than its residents, and those go down to the next tier.

Rules for callers:

* Everything runs on one asyncio event loop, except ``Reservation.write``, which may run in a worker thread.
  ``put`` does all of it inline (tests, memory tiers, tools); ``put_async`` runs the file writes of disk tiers
  through ``asyncio.to_thread``. The split by hand is ``reserve`` → ``Reservation.write`` → ``commit``; commit
  every reservation, also after a failed write, or its bytes stay reserved.
* A reservation counts against its tier's high watermark from ``reserve`` on, so concurrent writes never take a
  tier over its quota, and it is invisible to ``get`` until ``commit``. Victims leave the index at ``reserve``
  (``on_evicted`` is called then); their files are deleted by ``Reservation.write``, off the loop, and the same
  block cannot be reserved again until that reservation is committed.
* ``on_cached(block, size)`` is called once when a block becomes servable (``commit``, ``load``) and
  ``on_evicted(block, size)`` once when it stops being so (evicted, dropped as stale, found corrupt or missing),
  so the callbacks alone keep an exact inventory. At a restart ``start`` indexes what the last clean stop wrote
  down (``save_index``) and ``scan_rest``, on the loop with its file I/O in threads, finds the rest while the cache
  serves: a block it has not reached yet is looked for on disk when asked for (from ``start`` on), and a clean
  meanwhile hands the scan its selection (``sweep``) so the blocks it finds later are deleted, not indexed, and
  scans the shards nobody has taken yet itself (``sweep_rest``). ``on_tier_evicted(medium)`` is
  called for each block evicted to make room or by ``evict`` (a DataClean), not for stale, corrupt or purged ones:
  the agent's eviction counter.
  Blocks on a tier that is down stay indexed: its disk may come back, and meanwhile reads of them miss and go to
  the object store.

Hot path: ``get`` of a memory block is a dict lookup and one ``record_access`` per tier; of a disk block add
one open, two preads, one xxh3 and one close (see ``tiers``). Measured with 4 MiB blocks: 5 µs from memory,
0.6 ms from a page-cached disk tier, 2.5 µs for a miss.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePosixPath

import msgspec

from libs.blocks import BlockId
from libs.events.common import parse_quantity
from libs.events.runtime import Level, directory_quotas
from libs.hostpaths import cache_path_error
from libs.telemetry import get_logger
from services.agent.cache.eviction import EvictionPolicy, FrequencyAdmissionPolicy, PolicyFactory
from services.agent.cache.locks import Holder, holders
from services.agent.cache.tiers import (
    DEFAULT_COOLDOWN_SECONDS,
    LOCK_FILE,
    SHARD_LENGTH,
    BlockFile,
    DiskTier,
    FillBuffer,
    Health,
    MemoryTier,
    ScanCancelled,
    ScannedBlock,
    ShardScan,
    Tier,
)

log = get_logger(__name__)

BlockCallback = Callable[[BlockId, int], None]
# Told the medium of the tier a block was evicted from (to make room, or by ``evict``): the agent's metrics.
EvictionCallback = Callable[[str], None]

# Shard folders ``scan_rest`` scans at once, each in a worker thread.
SCAN_THREADS = 4

# Faster media first; unknown media (custom tiers in tests) after the known ones, in the order given.
MEDIUM_ORDER = {"MEM": 0, "SSD": 1, "HDD": 2}


def place(name: str, rooms: Sequence[tuple[int, int]]) -> int:
    """One of the tiers ``rooms`` lists (index, free bytes), with a chance proportional to its free bytes, drawn
    from the block's name: the same block and rooms give the same tier (tests, and no random state), and a level's
    directories fill in proportion to their quotas rather than one after another, so each keeps to its own."""
    total = sum(room for _, room in rooms)
    point = zlib.crc32(name.encode()) % total if total > 0 else 0
    for index, room in rooms:
        if point < room:
            return index
        point -= room
    return rooms[-1][0]


class TierStats(msgspec.Struct, frozen=True, kw_only=True):
    medium: str
    location: str
    quota_bytes: int
    used_bytes: int
    blocks: int
    health: str
    # Why the tier is not used at all (its folder holds files Shoal did not write), or empty; its health is down.
    refused: str = ""
    # The system's word for its last I/O error while failing ("No space left on device"), or empty.
    error: str = ""


class CacheStats(msgspec.Struct, frozen=True, kw_only=True):
    cached_bytes: int
    capacity_bytes: int  # the sum of the tier quotas
    hits: int
    misses: int
    corrupt_blocks: int
    tiers: list[TierStats]


class Sweep:
    """A clean's selection applied to the block files a restart's scan finds after the clean ran (``BlockCache.sweep``):
    such a file is deleted as it is found, not indexed, so the cleaned data does not come back."""

    __slots__ = ("_ended", "complete", "freed", "select")

    def __init__(self, select: Callable[[BlockId], bool]) -> None:
        self.select = select
        self.freed: list[tuple[BlockId, int]] = []  # the blocks deleted so, with their sizes
        self.complete = False  # the scan went through every shard: ``freed`` is all there was
        self._ended = asyncio.Event()

    async def wait(self) -> bool:
        """Until the scan ends; whether it went through every shard (else it was stopped: the files it did not
        reach wait for the next start, whose scan knows nothing of this selection)."""
        await self._ended.wait()
        return self.complete

    def _end(self, complete: bool) -> None:
        self.complete = complete
        self._ended.set()


class _Entry:
    __slots__ = ("block", "size", "tier", "used")

    def __init__(self, block: BlockId, tier: int, size: int, used: int) -> None:
        self.block = block
        self.tier = tier
        self.size = size
        # When the block was last written or read (``BlockCache._uses``; 0: found at start, older than any use
        # since): which of a level's directories evicts next (``_choose``).
        self.used = used


class Reservation:
    """Room reserved in one tier for one block; ``write`` is the only part allowed off the event loop."""

    __slots__ = ("block", "name", "size", "stale", "tier", "tier_index", "victims")

    def __init__(self, block: BlockId, name: str, size: int, tier_index: int, tier: Tier, victims: list[str]) -> None:
        self.block = block
        self.name = name
        self.size = size
        self.tier_index = tier_index
        self.tier = tier
        self.victims = victims  # evicted from the index at reserve time; their files go in write()
        self.stale = False  # set by drop_stale meanwhile: commit deletes instead of indexing

    @property
    def offload(self) -> bool:
        """Whether ``write`` does file I/O worth a worker thread."""
        return self.tier.offload_writes

    def write(self, data: bytes) -> bool:
        """Deletes the victims' files, then stores the block. Touches only the tier, never the index."""
        for victim in self.victims:
            self.tier.remove(victim)
        return self.tier.write(self.block, data)

    def write_filled(self, fill: FillBuffer) -> bool:
        """``write`` of a block fetched into a ``FillBuffer`` (only disk tiers take those)."""
        for victim in self.victims:
            self.tier.remove(victim)
        assert isinstance(self.tier, DiskTier)
        return self.tier.write_filled(fill)


class BlockCache:
    def __init__(
        self,
        tiers: Sequence[Tier],
        policy_factory: PolicyFactory = FrequencyAdmissionPolicy,
        on_cached: BlockCallback | None = None,
        on_evicted: BlockCallback | None = None,
        on_tier_evicted: EvictionCallback | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a block cache needs at least one tier")
        self._tiers = sorted(tiers, key=lambda tier: MEDIUM_ORDER.get(tier.medium, len(MEDIUM_ORDER)))
        self._policies: list[EvictionPolicy] = [
            policy_factory(int(tier.high * tier.quota_bytes), int(tier.low * tier.quota_bytes)) for tier in self._tiers
        ]
        self._on_cached = on_cached
        self._on_evicted = on_evicted
        self.on_tier_evicted = on_tier_evicted
        # The medium (MEM, SSD, HDD) that served the last ``get``/``get_range``, None after a miss: the agent's
        # hit counters read it right after a lookup (cheaper than looking the block up again).
        self.last_medium: str | None = None
        self._index: dict[str, _Entry] = {}
        self._pending: dict[str, Reservation] = {}
        self._in_flight = [0] * len(self._tiers)
        self._unlinking: set[str] = set()  # victims whose files a pending reservation has yet to delete
        self._hits = 0
        self._misses = 0
        self._uses = 0  # counts writes and hits: ``_Entry.used``
        # Per disk tier and shard, the names its index listed at ``start``: ``scan_rest`` opens only other files.
        self._known: dict[int, dict[str, frozenset[str]]] = {}
        # From ``start`` until ``scan_rest`` ends (the scan is due or running): per disk tier, the shard folders
        # done (a miss in another is looked for on disk at once, ``_found_early``), those taken by the scan or by a
        # clean (``_scan_shards``), its shard folders (listed once, by whoever comes first) and the heap of the
        # blocks found (modification time, name: ``_displace``); and what the scan keeps (``keep``).
        self._scanned: dict[int, set[str]] = {}
        self._claimed: dict[int, set[str]] = {}
        self._shards: dict[int, list[str]] = {}
        self._ages: dict[int, list[tuple[float, str]]] = {}
        self._scan_keeps: Callable[[BlockId, int], bool] | None = None
        # Set and replaced each time shards are done or given back: who waits for another's shards waits on it.
        self._progress: asyncio.Event | None = None
        # From ``start`` until ``scan_rest`` ends, every block reserved since: a file of that name found by the scan
        # may be the old one or the new one, so the scan leaves it to the write (None: no scan due).
        self._written: set[str] | None = None
        # From ``start`` until ``scan_rest`` ends: a scan is due or running, so a clean's selection must outlive it.
        self._scan_due = False
        self._sweeps: list[Sweep] = []
        # Set by ``purge``: nothing is written or found on disk any more (its files are being deleted).
        self._purged = False

    @classmethod
    def from_levels(
        cls,
        levels: Iterable[Level],
        cache_root_suffix: str,
        *,
        policy_factory: PolicyFactory = FrequencyAdmissionPolicy,
        on_cached: BlockCallback | None = None,
        on_evicted: BlockCallback | None = None,
        now: Callable[[], float] = time.monotonic,
        cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS,
        fsync: bool = False,
    ) -> BlockCache:
        """The cache of a Runtime's tiered store on this node.

        Each disk level's directory gets ``/<cache_root_suffix>`` (e.g. ``default/demo``) appended, so datasets
        on one node never share a folder. A comma-separated ``path`` becomes one disk tier per directory, with its
        own quota (``quotaList``) or an equal share of the level's (``directory_quotas``); ``reserve`` spreads new
        blocks over them by free room.
        """
        suffix = PurePosixPath(cache_root_suffix)
        if not cache_root_suffix or suffix.is_absolute() or ".." in suffix.parts:
            raise ValueError(f"cache_root_suffix must be a relative path without '..', got {cache_root_suffix!r}")
        tiers: list[Tier] = []
        for level in levels:
            quota = parse_quantity(level.quota)
            high, low = float(level.high), float(level.low)
            if level.mediumtype == "MEM":
                tiers.append(MemoryTier(quota, high=high, low=low))
            elif level.mediumtype in ("SSD", "HDD"):
                directories = directory_quotas(level)
                if not directories:
                    raise ValueError(f"{level.mediumtype} level needs a path")
                for directory, share in directories:
                    refused = cache_path_error(directory)
                    if refused:  # validated at apply too; the agent does not trust whoever published
                        raise ValueError(f"{level.mediumtype} level path {refused}")
                    tiers.append(
                        DiskTier(
                            PurePosixPath(directory) / suffix,
                            share,
                            medium=level.mediumtype,
                            high=high,
                            low=low,
                            cooldown_seconds=cooldown_seconds,
                            now=now,
                            fsync=fsync,
                        )
                    )
            else:
                raise ValueError(f"unknown mediumtype {level.mediumtype!r} (use MEM, SSD or HDD)")
        return cls(tiers, policy_factory, on_cached, on_evicted)

    @property
    def tiers(self) -> list[Tier]:
        return list(self._tiers)

    # -- lookups ------------------------------------------------------------------------------------------

    def get(self, block: BlockId) -> bytes | None:
        """The block's bytes from the tier that holds it, or None (a miss: fetch it and ``put`` it)."""
        return self.get_range(block, 0, None)

    def get_range(self, block: BlockId, start: int, end: int | None, access: bool = True) -> bytes | None:
        """Bytes [start, end) of the block (end None: all of it), or None on a miss. ``access=False``: a further
        piece of a block whose lookup the eviction policies were told of already (one reader, one access)."""
        name = block.name
        if access:
            for policy in self._policies:
                policy.record_access(name)
        entry = self._lookup(name)
        if entry is None:
            self._misses += 1
            self.last_medium = None
            return None
        tier = self._tiers[entry.tier]
        data = tier.read_range(name, start, end)
        if data is None:
            self._misses += 1
            self.last_medium = None
            if tier.health is Health.NORMAL and not tier.read_failed:
                self._forget(name, entry)  # missing or corrupt (already deleted): gone for good
            return None
        self._hits += 1
        self._uses += 1
        entry.used = self._uses
        self.last_medium = tier.medium
        return data

    def open_block(self, block: BlockId) -> BlockFile | None:
        """The block's file open for sending as it is (``DiskTier.open_block``), or None: not cached, or in a
        memory tier (then ``get``), or garbled (then forgotten, like a corrupt read)."""
        name = block.name
        entry = self._lookup(name)
        if entry is None:
            return None
        for policy in self._policies:
            policy.record_access(name)
        tier = self._tiers[entry.tier]
        opened = tier.open_block(name)
        if opened is not None:
            self._hits += 1
            self._uses += 1
            entry.used = self._uses
        elif isinstance(tier, DiskTier) and tier.health is Health.NORMAL and not tier.read_failed:
            self._forget(name, entry)  # missing or corrupt (already deleted): gone for good
        return opened

    def prefetch(self, block: BlockId) -> None:
        """Start bringing a cached block into memory ahead of its read (sequential readers of the disk tier)."""
        entry = self._lookup(block.name)
        if entry is not None:
            self._tiers[entry.tier].prefetch(block.name)

    def _lookup(self, name: str) -> _Entry | None:
        """The index's entry for ``name``; while ``scan_rest`` runs, also a block file the scan has not reached yet,
        found on disk and indexed now (``_found_early``)."""
        entry = self._index.get(name)
        if entry is None and self._written is not None:
            entry = self._found_early(name)
        return entry

    def _found_early(self, name: str) -> _Entry | None:
        """A block no index listed whose shard ``scan_rest`` has not done yet (from ``start`` on, also before the
        scan's first step): its file looked for in each disk tier, fastest first (one open and two small reads, as
        the scan does), and indexed as the scan would. Else a block cached before a crash would be fetched again,
        however soon after the start it is asked for: a DataLoad resumed after a restart must not fetch a block
        twice. A tier over its quota makes room for it as a write would, evicting its least recently used blocks
        (without the admission test: the block is here already, and refusing it would fetch it again to serve it).
        None when no sound file is there, or the scan would not keep it (not in the manifest, cleaned since the
        start: the scan deletes it when it gets there), or it cannot fit (room held by writes in flight)."""
        if self._purged or name in (self._written or ()) or name in self._pending or name in self._unlinking:
            return None  # being written: its file is not the one to index
        shard = name[:SHARD_LENGTH]
        for index, tier in self._disk_tiers():
            if shard in self._scanned.get(index, ()) or not tier.available():
                continue
            scanned = tier.probe(name)
            if scanned is None:
                continue
            if self._scan_keeps is not None and not self._scan_keeps(scanned.block, scanned.size):
                return None
            if self._swept(scanned.block):
                return None  # cleaned while the scan ran: the scan deletes it when it gets there
            policy = self._policies[index]
            needed = scanned.size - (policy.high_bytes - policy.resident_bytes - self._in_flight[index])
            if needed > 0 and not self._make_room(index, needed):
                return None
            policy.inserted(name, scanned.size)
            self._index_found(index, scanned)
            return self._index[name]
        return None

    def _make_room(self, index: int, needed: int) -> bool:
        """Evicts the least recently used blocks of tier ``index`` until ``needed`` bytes are free, as a write's
        plan would (only as many: each unlink runs inline); False, evicting nothing, when its resident blocks
        together are too few (writes in flight hold the room)."""
        victims = self._policies[index].victims(needed)
        if sum(self._index[victim].size for victim in victims) < needed:
            return False
        tier = self._tiers[index]
        for victim in victims:
            self._forget(victim, self._index[victim])
            tier.remove(victim)
            if self.on_tier_evicted is not None:
                self.on_tier_evicted(tier.medium)
        return True

    def contains(self, block: BlockId) -> bool:
        entry = self._lookup(block.name)
        return entry is not None and self._tiers[entry.tier].available()

    def present(self, block: BlockId) -> bool:
        """``contains``, asking the tier: a disk block's file found with its header and chunk table sound (one open
        and two small reads), not its data. The index is only corrected by reads otherwise, so a file deleted
        under it (a person freeing room, a cleaner of old files) or garbled stays "cached" until read; one found
        gone here is forgotten like a failed read's (``on_evicted``), so it can be cached again."""
        name = block.name
        entry = self._lookup(name)
        if entry is None:
            return False
        tier = self._tiers[entry.tier]
        if not tier.available():
            return False
        if not isinstance(tier, DiskTier):
            return True
        opened = tier.open_block(name)
        if opened is not None:
            opened.file.close()
            return True
        if tier.health is Health.NORMAL and not tier.read_failed:
            self._forget(name, entry)  # missing or garbled (already deleted): gone for good
        return False

    def blocks(self) -> list[tuple[BlockId, int]]:
        """Every indexed block and its size, for inventory snapshots (pending writes are not included)."""
        return [(entry.block, entry.size) for entry in self._index.values()]

    @property
    def counting(self) -> bool:
        """Whether the restart's scan (``start`` to the end of ``scan_rest``) still looks for block files: until
        then the index, and every figure from it, may miss blocks on disk. One read of a flag: asked per event."""
        return self._scan_due

    def stats(self) -> CacheStats:
        tiers = [
            TierStats(
                medium=tier.medium,
                location=tier.location,
                quota_bytes=tier.quota_bytes,
                used_bytes=policy.resident_bytes,
                blocks=len(policy),
                health=str(tier.health),
                refused=tier.refused,
                error=tier.last_error,
            )
            for tier, policy in zip(self._tiers, self._policies, strict=True)
        ]
        return CacheStats(
            cached_bytes=sum(t.used_bytes for t in tiers),
            capacity_bytes=sum(t.quota_bytes for t in tiers),
            hits=self._hits,
            misses=self._misses,
            corrupt_blocks=sum(tier.corrupt_blocks for tier in self._tiers),
            tiers=tiers,
        )

    # -- writes -------------------------------------------------------------------------------------------

    def put(self, block: BlockId, data: bytes) -> bool:
        """Caches the block if a tier admits it, all inline. True if the block is servable afterwards."""
        reservation = self.reserve(block, len(data))
        if reservation is None:
            return self.contains(block)
        return self._write_inline(reservation, data)

    def _write_inline(self, reservation: Reservation, data: bytes) -> bool:
        written = False
        try:
            written = reservation.write(data)
        finally:
            committed = self.commit(reservation, written)
        return committed

    async def put_async(self, block: BlockId, data: bytes) -> bool:
        """``put`` with disk writes in a worker thread; a cancelled caller still gets the write committed."""
        reservation = self.reserve(block, len(data))
        if reservation is None:
            return self.contains(block)
        if not reservation.offload:
            return self._write_inline(reservation, data)
        return await self._write_in_thread(reservation, lambda: reservation.write(data))

    @property
    def writes_files(self) -> bool:
        """Whether every tier is a disk tier, so a block can be fetched straight into a ``FillBuffer`` and
        stored with ``put_filled`` whichever tier admits it."""
        return all(isinstance(tier, DiskTier) for tier in self._tiers)

    async def put_filled(self, fill: FillBuffer) -> bool:
        """``put_async`` of a block fetched into ``fill`` (only when ``writes_files``). The caller releases
        ``fill`` afterwards, except after a cancellation: the write may still be using it then."""
        reservation = self.reserve(fill.block, fill.length)
        if reservation is None:
            return self.contains(fill.block)
        return await self._write_in_thread(reservation, lambda: reservation.write_filled(fill))

    async def _write_in_thread(self, reservation: Reservation, write: Callable[[], bool]) -> bool:
        """``write`` in a worker thread, then committed; a cancelled caller still gets the write committed."""
        task = asyncio.ensure_future(asyncio.to_thread(write))
        try:
            written = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self.commit(reservation, _write_result(done)))
            raise
        except BaseException:
            self.commit(reservation, False)
            raise
        return self.commit(reservation, written)

    def reserve(self, block: BlockId, size: int) -> Reservation | None:
        """Room for the block in the first medium with a tier that admits it, victims already out of the index; or
        None.

        Within a medium (a level's directories, each a tier with its own quota), a tier with room for the block
        without evicting is preferred, picked with a chance proportional to its free room (``place``); only when
        none has room does one evict: the one whose least recently used block is the level's, so the level keeps
        its most recently used blocks as one LRU would, whatever directory holds them. None also when the block is
        cached, being written, or its old file is still being deleted.
        """
        name = block.name
        if self._purged or name in self._index or name in self._pending or name in self._unlinking:
            return None
        start = 0
        while start < len(self._tiers):
            end = start
            while end < len(self._tiers) and self._tiers[end].medium == self._tiers[start].medium:
                end += 1
            chosen = self._choose(name, size, range(start, end))
            start = end
            if chosen is None:
                continue
            index, plan = chosen
            tier = self._tiers[index]
            for victim in plan:
                self._forget(victim, self._index[victim])
                if self.on_tier_evicted is not None:
                    self.on_tier_evicted(tier.medium)
            self._unlinking.update(plan)
            if self._written is not None:
                self._written.add(name)
            self._in_flight[index] += size
            reservation = Reservation(block, name, size, index, tier, plan)
            self._pending[name] = reservation
            return reservation
        return None

    def _choose(self, name: str, size: int, indexes: range) -> tuple[int, list[str]] | None:
        """The tier of ``indexes`` (one medium) that takes the block, and the residents to evict first; or None."""
        # (index, free bytes below the high watermark, plan) of the available tiers whose policy admits the block
        admitting: list[tuple[int, int, list[str]]] = []
        for index in indexes:
            if self._tiers[index].available():
                policy = self._policies[index]
                plan = policy.plan(name, size, self._in_flight[index])
                if plan is not None:
                    admitting.append((index, policy.high_bytes - policy.resident_bytes - self._in_flight[index], plan))
        roomy = [(index, room) for index, room, plan in admitting if room >= size and not plan]
        if roomy:
            return place(name, roomy), []
        if not admitting:
            return None
        # The directory whose first victim was used least recently evicts (ties: the one with the most free room,
        # then the first listed). Not the most free room alone: the directories fill up at once, each eviction
        # leaves room in that one only, and so one directory would evict and take every new block while the others
        # kept their first blocks for ever, read or not.
        _, _, index, plan = min((self._index[plan[0]].used if plan else -1, -room, index, plan)
                                for index, room, plan in admitting)
        return index, plan

    def commit(self, reservation: Reservation, written: bool) -> bool:
        """Indexes the block if ``written`` (the result of ``Reservation.write``); True if it is now cached."""
        name = reservation.name
        if self._pending.get(name) is not reservation:
            return False  # committed already
        del self._pending[name]
        self._in_flight[reservation.tier_index] -= reservation.size
        self._unlinking.difference_update(reservation.victims)
        if reservation.stale:
            if written:
                reservation.tier.remove(name)
            return False
        if not written:
            return False
        self._policies[reservation.tier_index].inserted(name, reservation.size)
        self._uses += 1
        self._index[name] = _Entry(reservation.block, reservation.tier_index, reservation.size, self._uses)
        if self._on_cached is not None:
            self._on_cached(reservation.block, reservation.size)
        return True

    # -- maintenance --------------------------------------------------------------------------------------

    def load(self, block_size: int = 0, cancelled: Callable[[], bool] | None = None) -> int:
        """``start`` and then the whole scan of ``scan_rest`` inline: every block a previous run kept is indexed
        when it returns; returns how many. For tools and tests; a mount process serves after ``start`` and scans
        the rest in the background.

        Being file I/O, it may run in a worker thread while nothing else uses the cache yet (``on_cached`` then
        runs in that thread). ``cancelled`` is asked before each file opened: ``ScanCancelled`` then ends the
        load, the blocks indexed so far stay in the index and the files not scanned stay on disk.
        """
        loaded = self.start(block_size, cancelled)
        for index, tier in self._disk_tiers():
            # All shards as one: the newest blocks of the whole tier are kept when the quota shrank.
            whole = ShardScan([], [], set())
            for shard in tier.shards():
                scanned = tier.scan_shard(shard, self._known_in(index, shard), cancelled)
                whole.found.extend(scanned.found)
                whole.garbage.extend(scanned.garbage)
                whole.missing.update(scanned.missing)
            loaded += self._adopt(index, whole)
        self._known = {}
        self._end_scan(True)
        return loaded

    def start(self, block_size: int = 0, cancelled: Callable[[], bool] | None = None,
              keep: Callable[[BlockId, int], bool] | None = None) -> int:
        """Indexes the blocks the index of each disk tier lists (written by the last clean stop, ``save_index``);
        returns how many. Call it at startup, before the first ``put``; then ``scan_rest``, which finds what no
        index listed (after a crash: every block) while the cache serves. May run in a worker thread while nothing
        else uses the cache yet, like ``load``.

        Reads one file per tier, no block file: a listed block is verified when it is read, as every read is
        (a block file deleted or garbled since is a miss then, and forgotten). ``block_size`` (0: not checked) is
        the size blocks are cut at now: a tier whose blocks were cut at another size is emptied (the same block
        name would be other bytes). Within a tier the most recently used blocks are kept when they no longer fit
        under the high watermark (the quota shrank), the rest are deleted. A block listed by two tiers is kept in
        the faster one. ``cancelled`` is asked after each tier (``ScanCancelled``). From here on a block not indexed
        is looked for on disk when asked for (``_found_early``), kept only if ``keep`` (as ``scan_rest`` takes it)
        says so: the scan's first step comes later, after the mount serves.
        """
        loaded = 0
        self._known = {}
        self._begin_scan(keep)
        for index, tier in self._disk_tiers():
            if not tier.prepare(block_size):
                continue
            listed = tier.take_index(block_size)
            if cancelled is not None and cancelled():
                raise ScanCancelled(tier.location)
            shards: dict[str, set[str]] = {}
            for scanned in listed:
                shards.setdefault(scanned.name[:SHARD_LENGTH], set()).add(scanned.name)
            self._known[index] = {shard: frozenset(names) for shard, names in shards.items()}
            policy = self._policies[index]
            room = policy.high_bytes - policy.resident_bytes - self._in_flight[index]
            kept: list[ScannedBlock] = []
            copies = over_quota = 0
            for scanned in reversed(listed):  # most recently used first
                entry = self._index.get(scanned.name)
                if entry is not None or scanned.size > room:
                    tier.remove(scanned.name)  # a copy of a block a faster tier holds, or over the quota
                    copies, over_quota = copies + (entry is not None), over_quota + (entry is None)
                    continue
                room -= scanned.size
                kept.append(scanned)
            if copies or over_quota:
                log.info("cache start removed blocks", tier=tier.location, copies_of_faster_tiers=copies,
                         over_quota=over_quota)
            for scanned in reversed(kept):  # least recently used first: the policy's order
                policy.inserted(scanned.name, scanned.size)
                self._index_found(index, scanned)
            loaded += len(kept)
        return loaded

    async def scan_rest(self, keep: Callable[[BlockId, int], bool] | None = None,
                        cancelled: Callable[[], bool] | None = None) -> int:
        """After ``start``: lists every shard folder of the disk tiers and opens the block files no index listed
        (in worker threads, ``SCAN_THREADS`` shards at a time), indexing the sound ones as each shard is done, while
        the cache serves; returns how many. A block asked for before its shard is done is looked for on disk then
        (``_found_early``). Listed blocks whose files are gone are forgotten. A shard a clean took meanwhile
        (``sweep_rest``) is left to it, and waited for before the tier is done.

        Found blocks go first in eviction order (older than any block used since the start; by modification time
        among them once the tier is scanned). When they no longer fit under the high watermark (after a crash with a
        quota that shrank) the newest are kept: a block found that does not fit takes the place of found blocks
        older than it that nothing used since (``_displace``), else it is deleted. A block a clean selected while
        the scan ran (``sweep``) is deleted as it is found. ``keep(block, size)`` False (an object gone from the
        manifest, a block of the wrong length) deletes one too. A file found unsound is deleted unless its block was
        written since the start (it may be the new file by now).
        ``cancelled`` is asked before each file opened: the files not opened yet wait for the next start.
        """
        if not self._scan_due:  # without ``start`` (tests): the scan begins here
            self._begin_scan(keep)
        if keep is not None:
            self._scan_keeps = keep
        found = 0
        complete = False
        try:
            for index, _ in self._disk_tiers():  # a tier at a time: a block in two is kept in the faster
                while (left := await self._shards_left(index)) is not None:
                    if left:
                        # A few shards at once: on a cold disk each file costs two reads waiting on the device, and
                        # several in flight keep it busy (200,000 blocks: 62 s one at a time, tests/bench/cache_start).
                        found += await self._scan_shards(index, left[:SCAN_THREADS], cancelled)
                    else:
                        await self._wait_progress()  # the last shards are a clean's: done when it is
                self._reorder(index, self._ages.get(index, []))
            complete = True
        finally:
            self._end_scan(complete)
        return found

    async def sweep_rest(self, sweep: Sweep, cancelled: Callable[[], bool] | None = None) -> bool:
        """A clean's own share of its ``sweep``: the shard folders no scan has taken yet are scanned here, as the scan
        would (``_scan_shards``: the files the sweep selects deleted and counted in ``sweep.freed``, the others
        indexed), and those the scan has in hand are waited for; then the sweep is done, whether or not the scan
        still runs. Without this the clean of a whole dataset freed what was indexed at once but was done only when
        the scan ended (about 30 s for 200,000 blocks). True when every shard was done; False when the scan was
        stopped, or ``cancelled`` (asked before each file) said so, meanwhile: the files not reached wait for the
        next start, whose scan knows nothing of this selection."""
        try:
            for index, _ in self._disk_tiers():
                while not sweep._ended.is_set() and (left := await self._shards_left(index)) is not None:
                    if left:
                        await self._scan_shards(index, left[:SCAN_THREADS], cancelled)
                    else:
                        await self._wait_progress()  # the scan's shards in hand
        except ScanCancelled:
            return False
        if sweep._ended.is_set() or not self._scan_due:
            return sweep.complete
        self._sweeps.remove(sweep)  # every shard is done: there is nothing left for it to select
        sweep._end(True)
        return True

    async def _shards_left(self, index: int) -> list[str] | None:
        """The shard folders of disk tier ``index`` nobody has taken yet ([] while the last ones are in hand), or None
        when every one is done or no scan is due any more. Lists them first if nobody has."""
        if not self._scan_due:
            return None
        if index not in self._shards:
            tier = self._tiers[index]
            assert isinstance(tier, DiskTier)
            shards = await asyncio.to_thread(tier.shards)
            if not self._scan_due:
                return None
            self._shards.setdefault(index, shards)
        claimed, scanned, shards = self._claimed[index], self._scanned[index], self._shards[index]
        if len(scanned) == len(shards):  # shard names are unique, and only listed ones are scanned
            return None
        return [shard for shard in shards if shard[-SHARD_LENGTH:] not in claimed]

    async def _scan_shards(self, index: int, batch: list[str], cancelled: Callable[[], bool] | None) -> int:
        """Takes the ``batch`` of shard folders of tier ``index``, scans them in worker threads and indexes what they
        hold (``_adopt``); returns how many blocks. Shards not done (an error, a cancellation) are given back, for
        the scan or a clean to take again."""
        tier = self._tiers[index]
        assert isinstance(tier, DiskTier)
        names = [shard[-SHARD_LENGTH:] for shard in batch]  # a shard's path ends with its name (``DiskTier.shards``)
        claimed, done = self._claimed[index], self._scanned[index]
        claimed.update(names)
        found = 0
        try:
            results = await asyncio.gather(*(
                asyncio.to_thread(tier.scan_shard, shard, self._known_in(index, shard), cancelled) for shard in batch))
            if self._scan_due:  # not when the scan ended meanwhile: what the start knew is gone
                ages = self._ages.setdefault(index, [])
                for scanned in results:
                    found += self._adopt(index, scanned, self._scan_keeps, ages)
                done.update(names)
        finally:
            claimed.difference_update(name for name in names if name not in done)
            self._notify()
        return found

    def _notify(self) -> None:
        """Wakes whoever waits for shards in another's hands (``_wait_progress``)."""
        if self._progress is not None:
            self._progress.set()
        self._progress = asyncio.Event()

    async def _wait_progress(self) -> None:
        if self._progress is None:
            self._progress = asyncio.Event()
        await self._progress.wait()

    def _begin_scan(self, keep: Callable[[BlockId, int], bool] | None) -> None:
        self._scan_due = True
        self._written = set()
        disk = [index for index, _ in self._disk_tiers()]
        self._scanned = {index: set() for index in disk}
        self._claimed = {index: set() for index in disk}
        self._shards, self._ages = {}, {}
        self._scan_keeps = keep
        self._progress = None

    def _end_scan(self, complete: bool) -> None:
        self._scan_due = False
        self._written = None
        self._scanned, self._claimed, self._shards, self._ages = {}, {}, {}, {}
        self._scan_keeps = None
        self._known = {}
        for sweep in self._sweeps:
            sweep._end(complete)
        self._sweeps = []
        if self._progress is not None:
            self._progress.set()  # whoever waits for shards in hand: there are none any more

    def sweep(self, select: Callable[[BlockId], bool]) -> Sweep | None:
        """While a restart's scan is due or running (from ``start`` to the end of ``scan_rest``), a clean's
        selection for the block files the scan has not found yet: ``cached_blocks`` sees only indexed blocks, and
        the scan would index the others after the clean, bringing the cleaned data back. Those ``select`` accepts
        are deleted as they are found instead, and counted in the returned ``Sweep``; None when no scan is due (the
        index holds every block). Call it before ``cached_blocks``, on the loop."""
        if not self._scan_due:
            return None
        sweep = Sweep(select)
        self._sweeps.append(sweep)
        return sweep

    def _swept(self, block: BlockId) -> Sweep | None:
        for sweep in self._sweeps:
            if sweep.select(block):
                return sweep
        return None

    def _displace(self, index: int, ages: list[tuple[float, str]], mtime: float, needed: int) -> tuple[int, int]:
        """Room for a found block of modification time ``mtime`` that does not fit in tier ``index`` by ``needed``
        bytes: the found blocks older than it that nothing used since (``ages``, a heap, oldest first) are
        forgotten and deleted, if together they free enough; returns the bytes and blocks freed (0, 0: none)."""
        taken: list[tuple[float, str]] = []
        freed = 0
        while ages and freed < needed and ages[0][0] < mtime:
            age, name = heapq.heappop(ages)
            entry = self._index.get(name)
            if entry is None or entry.tier != index or entry.used != 0:
                continue  # gone, or used since: no longer a candidate
            taken.append((age, name))
            freed += entry.size
        if freed < needed:
            for item in taken:
                heapq.heappush(ages, item)
            return 0, 0
        tier = self._tiers[index]
        for _, name in taken:
            self._forget(name, self._index[name])
            tier.remove(name)
        return freed, len(taken)

    def _reorder(self, index: int, ages: list[tuple[float, str]]) -> None:
        """Puts the blocks a scan of tier ``index`` found (modification time, name) that nothing used since in
        eviction order by age, oldest first, all before the blocks used since: each shard was ordered on its own."""
        policy = self._policies[index]
        for _, name in sorted(ages, reverse=True):  # newest first, each put first: the oldest ends first
            entry = self._index.get(name)
            if entry is not None and entry.tier == index and entry.used == 0:
                policy.adopted(name, entry.size)

    def _disk_tiers(self) -> list[tuple[int, DiskTier]]:
        return [(index, tier) for index, tier in enumerate(self._tiers) if isinstance(tier, DiskTier)]

    def _known_in(self, index: int, shard: str) -> frozenset[str]:
        return self._known.get(index, {}).get(PurePosixPath(shard).name, frozenset())

    def _adopt(self, index: int, scanned: ShardScan, keep: Callable[[BlockId, int], bool] | None = None,
               ages: list[tuple[float, str]] | None = None) -> int:
        """Indexes what ``scan_shard`` found in one shard of tier ``index``; deletes what cannot be indexed, or a clean
        selected (``sweep``). ``ages``: the heap of the blocks found in the tier's shards before (modification time,
        name), which a newer block over the quota takes the place of (``_displace``); those indexed now join it."""
        tier, policy = self._tiers[index], self._policies[index]
        written = self._written or ()
        assert isinstance(tier, DiskTier)
        for path in scanned.garbage:
            if PurePosixPath(path).name not in written:
                tier.remove_garbage(path)
        for name in scanned.missing:
            entry = self._index.get(name)
            if name not in written and entry is not None and entry.tier == index:
                self._forget(name, entry)  # listed by the index, its file deleted since
        room = policy.high_bytes - policy.resident_bytes - self._in_flight[index]
        kept: list[tuple[float, ScannedBlock]] = []
        copies = over_quota = dropped = cleaned = displaced = 0
        for mtime, block in sorted(scanned.found, key=lambda item: item[0], reverse=True):  # newest first
            name = block.name
            if name in written or name in self._pending or name in self._unlinking:
                continue  # written since the start (or being written): its file is not the one scanned
            entry = self._index.get(name)
            if entry is not None and entry.tier == index:
                continue
            sweep = self._swept(block.block)
            if sweep is not None:
                tier.remove(name)  # cleaned while the scan ran
                sweep.freed.append((block.block, block.size))
                cleaned += 1
                continue
            wanted = keep is None or keep(block.block, block.size)
            if entry is None and wanted and block.size > room and ages is not None:
                freed, older = self._displace(index, ages, mtime, block.size - room)
                room += freed
                displaced += older
            fits = entry is None and block.size <= room
            if not (fits and wanted):
                tier.remove(name)  # a copy of a block another tier holds, over the quota, or not wanted
                copies += entry is not None
                over_quota += entry is None and block.size > room
                dropped += entry is None and block.size <= room
                continue
            room -= block.size
            kept.append((mtime, block))
        if copies or over_quota or dropped or cleaned or displaced:
            log.info("cache scan removed blocks", tier=tier.location, copies_of_other_tiers=copies,
                     over_quota=over_quota, stale=dropped, cleaned=cleaned, older_over_quota=displaced)
        for _, block in kept:  # newest first, each put first in eviction order: the oldest ends first
            policy.adopted(block.name, block.size)
        for mtime, block in reversed(kept):
            self._index_found(index, block)
            if ages is not None:
                heapq.heappush(ages, (mtime, block.name))
        return len(kept) - displaced  # those found before and deleted now were counted then

    def _index_found(self, index: int, scanned: ScannedBlock) -> None:
        self._index[scanned.name] = _Entry(scanned.block, index, scanned.size, 0)
        if self._on_cached is not None:
            self._on_cached(scanned.block, scanned.size)

    def save_index(self, block_size: int) -> int:
        """Writes each disk tier's index for the next start (``start``), its blocks in eviction order; returns
        how many blocks it lists. Call it on a clean stop, once nothing writes (a block committed afterwards is
        found by the next start's scan, as is one the scan had not reached yet)."""
        saved = 0
        for index, tier in self._disk_tiers():
            blocks = [(self._index[name].block, self._index[name].size) for name in self._policies[index].residents()
                      if name in self._index and self._index[name].tier == index]
            if tier.write_index(blocks, block_size):
                saved += len(blocks)
        return saved

    def drop_stale(self, keep: Callable[[BlockId], bool]) -> int:
        """Deletes every block ``keep`` rejects (e.g. its mount, key and ETag left the manifest); returns how many.

        Runs on the loop, one unlink per stale block, normally a handful after a re-sync; at start, before anything
        else uses the cache, in the thread that builds the mount's first tree (as ``start`` may).
        """
        stale = [(name, entry) for name, entry in self._index.items() if not keep(entry.block)]
        for name, entry in stale:
            self._forget(name, entry)
            self._tiers[entry.tier].remove(name)
        for reservation in self._pending.values():
            if not keep(reservation.block):
                reservation.stale = True
        return len(stale)

    def cached_blocks(self, select: Callable[[BlockId], bool]) -> list[BlockId]:
        """The indexed blocks ``select`` accepts (e.g. every block of some files), for ``evict``."""
        return [entry.block for entry in self._index.values() if select(entry.block)]

    def cached_bytes(self, blocks: Iterable[BlockId]) -> int:
        """The bytes of those of ``blocks`` that are indexed (what a clean of them is to free)."""
        return sum(entry.size for block in blocks if (entry := self._index.get(block.name)) is not None)

    def evict(self, blocks: Iterable[BlockId]) -> list[tuple[BlockId, int]]:
        """Deletes these blocks (a DataClean); returns those that were cached, with their sizes.

        The path of every eviction: out of the index and the policy (``on_evicted``, so the inventory reports it),
        then the file. While a restart's scan runs, a block it has not reached yet is looked for on disk
        (``_found_early``), so a clean of named blocks frees those too. A write of one of them still in flight is
        marked stale, so its file is deleted when it commits. Runs on the loop, one unlink per block: callers evict
        in slices and yield between them.
        """
        evicted: list[tuple[BlockId, int]] = []
        for block in blocks:
            name = block.name
            entry = self._lookup(name)  # while the scan runs, also a block file it has not reached yet
            if entry is not None:
                self._forget(name, entry)
                self._tiers[entry.tier].remove(name)
                evicted.append((entry.block, entry.size))
                if self.on_tier_evicted is not None:
                    self.on_tier_evicted(self._tiers[entry.tier].medium)
            pending = self._pending.get(name)
            if pending is not None:
                pending.stale = True
        return evicted

    def purge(self) -> int:
        """Deletes every block and then the emptied folders (the dataset was deleted); returns how many blocks.

        ``purge_async`` with the file I/O on the caller's thread (the agent's sweep of a deleted dataset's cache,
        in a worker thread already; tests).
        """
        return self._purge_files(self._purge_index())

    async def purge_async(self) -> int:
        """``purge`` with its file I/O in a worker thread: one unlink per block file, 200,000 for a large cache,
        which on the loop stalled the process (its last inventory delta, its side server) for seconds.

        The order keeps it safe: first, on the loop, every block leaves the index (``on_evicted``, so the inventory
        reports it), writes in flight are marked stale (their files are deleted when they commit) and no block is
        written or found on disk from then on; only then are the files deleted, and the folders last. A cancelled
        caller still waits for the deletions to end: the mount process exits only after them. A purge never deletes
        a new mount's blocks, even one an agent restarted meanwhile started (a mount process can outlive its
        agent): the folders' locks (``hold_folders``) make the new mount wait for the purge, and a purge leaves a
        folder that a mount started before it holds to that mount.
        """
        work = asyncio.ensure_future(asyncio.to_thread(self._purge_files, self._purge_index()))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    def _purge_index(self) -> list[tuple[Tier, str]]:
        """``purge``'s part on the loop: empties the index and stops every write; returns the blocks whose files
        are to go (tier, name)."""
        self._purged = True
        entries = list(self._index.items())
        for name, entry in entries:
            self._forget(name, entry)
        for reservation in self._pending.values():
            reservation.stale = True
        return [(self._tiers[entry.tier], name) for name, entry in entries]

    def _purge_files(self, indexed: list[tuple[Tier, str]]) -> int:
        """``purge``'s file I/O: the indexed blocks' files, then every other block file in the disk tiers' shard
        folders (after a crash the files a restart's scan had not reached are indexed by no one, and would stay on
        disk; their temporary files are left to writes in flight), then the emptied folders; returns how many.

        A disk tier's folder only while no other process holds its lock (``DiskTier.hold``): a mount process of
        the dataset started meanwhile (by an agent restarted while this purge ran, or a new incarnation's) uses
        it, and its blocks are its own, so this purge leaves the folder to it; one started later waits for the
        purge to end."""
        left: set[int] = set()
        for tier in self._tiers:
            if not isinstance(tier, DiskTier) or not tier.available():
                continue
            try:
                held = tier.hold(exclusive=True)
            except OSError as err:
                log.warning("cache folder not locked: its blocks are left", directory=tier.location, error=str(err))
                held = False
            if not held:
                left.add(id(tier))
                log.info("cache folder in use by another mount process: its blocks are left to it",
                         directory=tier.location)
        removed = 0
        for tier, name in indexed:
            if id(tier) not in left:
                tier.remove(name)
                removed += 1
        for tier in self._tiers:
            if id(tier) in left:
                continue
            if isinstance(tier, DiskTier):
                removed += tier.remove_block_files()
                tier.discard_index()
            tier.remove_empty_directories()
            if isinstance(tier, DiskTier):
                tier.release()
        return removed

    def hold_folders_to_delete(self) -> bool:
        """Takes the lock of each disk tier's folder that exists, exclusive (``DiskTier.hold``), as whoever deletes
        a cache it does not serve does before it reads the folders (the agent freeing a deleted dataset's cache):
        reading one takes its index and deletes unfinished writes, which are a live mount process's. False, and
        nothing held, while another process uses one of them (a mount process that outlived its agent): ask again
        later. ``release_folders`` drops them."""
        for _, tier in self._disk_tiers():
            if not tier.directory.is_dir():
                continue  # nothing there to guard (``load`` makes it, and ``purge`` locks it before deleting)
            try:
                held = tier.hold(exclusive=True)
            except OSError:
                held = False
            if not held:
                self.release_folders()
                return False
        return True

    def release_folders(self) -> None:
        """Drops every disk tier folder's lock this cache holds (``hold_folders``, ``hold_folders_to_delete``)."""
        for _, tier in self._disk_tiers():
            tier.release()

    def hold_folders(self, block_size: int = 0) -> bool:
        """Takes each disk tier's folder lock, shared (``DiskTier.hold``), as a mount process does before its
        cache starts and keeps until it exits; False while another process deletes a folder's blocks (a purge of
        the dataset's previous mount, which may outlive its agent), or still uses blocks cut at another size than
        ``block_size`` (0: not checked), which the start deletes: ask again later."""
        held = True
        for _, tier in self._disk_tiers():
            try:
                held = tier.hold(block_size=block_size) and held
            except OSError:
                continue  # no folder to lock: the start finds it failing and takes the tier down, as before
        return held

    def folder_holders(self) -> list[Holder]:
        """The other processes holding a disk tier folder's lock (``locks.holders``): whom a start that cannot
        hold its folders (``hold_folders``) waits for, when /proc/locks says."""
        found = {holder.pid: holder for _, tier in self._disk_tiers()
                 for holder in holders(str(tier.directory / LOCK_FILE))}
        return sorted(found.values(), key=lambda holder: holder.pid)

    def _forget(self, name: str, entry: _Entry) -> None:
        del self._index[name]
        self._policies[entry.tier].removed(name)
        if self._on_evicted is not None:
            self._on_evicted(entry.block, entry.size)


def _write_result(task: asyncio.Future[bool]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result()
