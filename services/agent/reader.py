"""The agent's read path for one dataset: block cache → blocks in flight → the block's owners → the object store.

What it decides:
- concurrent misses for one block are coalesced into one fetch;
- where a missing block comes from (``BlockRouter``, over the ring of the runtime's cache workers): its first
  owner reads the store and caches; its second owner asks the first, then the store, and caches; any other node
  asks owner 1, owner 2, then the store, and keeps nothing on disk (Fluid's clients hold no cache). Without a
  ring (no workers with a peer endpoint, or no peer secret) every node reads the store and caches. A peer that
  fails or lies (``PeerError``) only sends the read to the next source;
- a block the peer server is asked for comes from the cache or the store (``serve_block``), never another peer,
  coalesced with this mount's own store fetch of it;
- a block a DataLoad warms (``warm``) comes from the store into the cache whatever its route, never a peer,
  coalesced the same way; with a disk-only cache its body goes straight into the buffer its block file is written
  from (``FillBuffer``), and becomes ``bytes`` only if a read or a peer joins that fetch. Its bytes count as
  ``loaded_bytes``, not as a store read (``miss_bytes``): no reader asked for them, and the runtime's autoscaler
  reads a low hit ratio from the misses. A fetch a reader or a peer joined while it was in flight is a read's;
- sequential readers get blocks fetched ahead (window from ``readahead``), within one memory budget;
- each read stream holds the block it read last, for its next reads inside it, but the mount holds at most
  ``MAX_HELD_BLOCKS`` such blocks: past that, the stream read least lately lets its block go, and a stream that holds
  none reads just the chunks it needs of a cached block (``BlockCache.get_range``) instead of holding it whole. So the
  memory of many readers at once is bounded, not one block per reader (200 readers of 4 MiB blocks held 800 MiB);
- a small random read inside an uncached block is answered with a GET of just those bytes, while the whole
  block is fetched in the background for next time; when the block's source is a peer, the whole block is
  fetched from the peer instead (the protocol serves whole blocks; one round trip on the cluster network);
- every GET is pinned to the manifest's ETag (If-Match), so a changed object fails the read (``ObjectChanged``)
  instead of mixing versions;
- an unreachable object store is remembered for a moment, so reads of uncached data fail fast instead of each
  waiting for a connect timeout, and cached reads never touch it.
Errors are ``UfsError`` here; the FUSE layer turns them into errnos.

Traces: a miss (a block fetched, or the bytes of a small random read) is a ``read miss`` span with a child span per
peer request (``peer GET``) and per store GET (``store GET``, made in ``StoreGate`` inside a trace only); a hit
makes no span (a span costs more than serving a block from memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from opentelemetry import trace

from libs.blocks import BlockId, block_span, blocks_touched
from libs.events.dataset import ManifestEntry
from libs.events.runtime import CacheWorker
from libs.metrics import FOR_LOAD, FOR_PEER, FOR_READ, GET, PEER, STORE
from libs.paths import quoted_key
from libs.redact import cut_error
from libs.ring import owners
from libs.telemetry import child_span, get_logger, server_attributes, tracer
from libs.ufs.base import EndpointUnreachable, ObjectChanged, ObjectStore, UfsError
from services.agent.cache import FillBuffer
from services.agent.metrics import ReadMetrics, StoreMetrics
from services.agent.peer import PeerError
from services.agent.readahead import MemoryBudget, ReadAhead

log = get_logger(__name__)

# After an endpoint was unreachable, further misses fail at once for this long instead of each waiting for
# a connect timeout; short, so recovery is noticed within a second or two.
UNREACHABLE_COOLDOWN_SECONDS = 1.0
# Ranged GETs in flight per mount: enough to fill a 10 Gbit/s link with 4 MiB blocks at ~30 ms latency.
MAX_CONCURRENT_GETS = 32
# A failing peer is logged at most this often (with the count of failures so far).
PEER_LOG_SECONDS = 5.0
# A read smaller than this fraction of a block, off the sequential path, is a "small random read".
SMALL_READ_FRACTION = 4
# Blocks the read streams of a mount hold at once (each the block it read last, so the next FUSE reads inside it,
# 128 KiB to 1 MiB each, are served without reading the cache again): 128 MiB with 4 MiB blocks, more readers
# streaming at once than two cores feed. Past it a stream reads the chunks it needs from the cache, which costs a
# few more system calls per read, not a block of memory per reader.
MAX_HELD_BLOCKS = 32
# Fetched blocks waiting for their cache write at once (each held in memory until its file is written). Past it a
# block fetched for a read or a peer is not cached (counted: ``ReadStats.dropped_writes``): a reader faster than the
# disk otherwise queued writes, and their blocks, without limit. 32 keeps asyncio's worker threads (at most 32) busy
# and rides out a stall of a fraction of a second at disk speed: 128 MiB with 4 MiB blocks. A DataLoad's writes are
# never dropped (a load that did not cache its block fails it); its concurrency bounds them.
MAX_WRITING_BLOCKS = 32

T = TypeVar("T")


class BlockCacheLike(Protocol):
    def get(self, block: BlockId) -> bytes | None: ...

    def get_range(self, block: BlockId, start: int, end: int | None, access: bool = True) -> bytes | None: ...

    def contains(self, block: BlockId) -> bool: ...

    def present(self, block: BlockId) -> bool: ...

    def prefetch(self, block: BlockId) -> None: ...


class StoreGate:
    """One mount's object store, failing fast for a moment after the endpoint was found unreachable."""

    def __init__(self, store: ObjectStore, clock: Callable[[], float] = time.monotonic,
                 cooldown: float = UNREACHABLE_COOLDOWN_SECONDS, metrics: StoreMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.cooldown = cooldown
        self._down_until = 0.0
        self._last_error: EndpointUnreachable | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_GETS)
        self._tracer = tracer(__name__)

    async def get_range(self, key: str, start: int, length: int, etag: str) -> bytes:
        if self._last_error is not None and self.clock() < self._down_until:
            raise self._last_error
        with child_span(self._tracer, "store GET", trace.SpanKind.CLIENT,
                        {"shoal.object.key": key, "shoal.range.start": start, "shoal.range.length": length}):
            return await self._guarded(lambda: self.store.get_range(key, start, length, etag=etag))

    async def get_range_into(self, key: str, start: int, into: memoryview, etag: str) -> int:
        """``get_range`` of ``len(into)`` bytes written into ``into``; the count written. Stores without
        ``get_range_into`` (local files, http, test fakes) are read with ``get_range`` and copied."""
        if self._last_error is not None and self.clock() < self._down_until:
            raise self._last_error
        with child_span(self._tracer, "store GET", trace.SpanKind.CLIENT,
                        {"shoal.object.key": key, "shoal.range.start": start, "shoal.range.length": len(into)}):
            return await self._guarded(lambda: self._get_into(key, start, into, etag))

    async def prepare(self) -> None:
        """Ready the store's client ahead of the first GET (stores that have nothing to ready: nothing to do)."""
        prepare = getattr(self.store, "prepare", None)
        if prepare is not None:
            await prepare()

    async def _get_into(self, key: str, start: int, into: memoryview, etag: str) -> int:
        getter = getattr(self.store, "get_range_into", None)
        if getter is not None:
            got: int = await getter(key, start, into, etag=etag)
            return got
        data = await self.store.get_range(key, start, len(into), etag=etag)
        if len(data) > len(into):
            raise UfsError(f"{quoted_key(key)}: expected at most {len(into)} bytes at offset {start}, got {len(data)}")
        into[:len(data)] = data
        return len(data)

    async def _guarded(self, get: Callable[[], Awaitable[T]]) -> T:
        async with self._slots:
            observe = self.metrics.observe_get if self.metrics is not None else None
            started = time.perf_counter() if observe is not None else 0.0
            try:
                data = await get()
            except EndpointUnreachable as err:
                self._last_error = err
                self._down_until = self.clock() + self.cooldown
                if self.metrics is not None:
                    self.metrics.failed(GET, err)
                raise
            except Exception as err:
                if self.metrics is not None:
                    self.metrics.failed(GET, err)
                raise
            finally:
                if observe is not None:
                    observe(time.perf_counter() - started)
        self._last_error = None
        return data


@dataclass
class ReadStats:
    hit_bytes: int = 0  # from this node's cache tiers
    miss_bytes: int = 0  # from the object store for this node's readers and for peers
    loaded_bytes: int = 0  # from the object store for a DataLoad (``warm``) that no reader or peer joined
    remote_bytes: int = 0  # from peers
    gets: int = 0  # store GETs
    peer_failures: int = 0  # peer requests that failed or were not believed (the read moved on)
    dropped_writes: int = 0  # blocks fetched for a read or a peer and not cached: ``MAX_WRITING_BLOCKS`` waiting


# --- routing ---


@dataclass(frozen=True)
class Route:
    """Where a missing block comes from: these peers in order, then the store; and whether to cache it here."""

    peers: tuple[str, ...] = ()
    cache: bool = True


LOCAL = Route()


def ring_of(workers: Iterable[CacheWorker]) -> dict[str, str]:
    """The ring of block owners from a runtime's ``status.workers``: ready workers with a peer endpoint."""
    return {worker.node: worker.peer_url for worker in workers if worker.ready and worker.peer_url}


def plan_route(block_name: str, ring: Mapping[str, str], me: str) -> Route:
    """The route of one block for node ``me`` (pure). ``ring``: node → peer URL."""
    ranked = owners(block_name, ring, 2)
    if not ranked or ranked[0] == me:
        return LOCAL
    if len(ranked) > 1 and ranked[1] == me:
        return Route(peers=(ring[ranked[0]],), cache=True)
    return Route(peers=tuple(ring[node] for node in ranked), cache=False)


class PeerSource(Protocol):
    async def get_block(self, url: str, block: BlockId, length: int, block_size: int) -> bytes: ...


class BlockRouter:
    """The reader's view of the ring, kept current by the mount's watch of its runtime record."""

    def __init__(self, me: str, client: PeerSource | None) -> None:
        self.me = me
        self.client = client
        self.ring: dict[str, str] = {}

    def update(self, workers: Iterable[CacheWorker]) -> bool:
        """Take the runtime's current workers; True if the ring changed."""
        ring = ring_of(workers) if self.client is not None else {}
        changed = ring != self.ring
        self.ring = ring
        return changed

    def route(self, block: BlockId) -> Route:
        return plan_route(block.name, self.ring, self.me) if self.ring else LOCAL


@dataclass
class OpenFile:
    entry: ManifestEntry
    readahead: ReadAhead
    current: tuple[int, bytes] | None = None
    ahead: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    # Cached blocks of the current read-ahead window already hinted to the kernel (``_prefetch`` keeps no others:
    # a set of every block ever hinted grew for as long as a long-lived reader of a large file read).
    advised: set[int] = field(default_factory=set)
    # The cached block this stream reads chunk by chunk, holding none (``MAX_HELD_BLOCKS``): its lookup counted
    # once for the eviction policy, as a held block's is, not once per FUSE read.
    pieces_of: int = -1


BlockWriter = Callable[[BlockId, bytes], Awaitable[object]]


class BlockReader:
    def __init__(self, cache: BlockCacheLike, gates: Sequence[StoreGate], block_size: int, budget: MemoryBudget,
                 write_block: BlockWriter, max_ahead_blocks: int | None = None,
                 router: BlockRouter | None = None, metrics: ReadMetrics | None = None,
                 max_held_blocks: int = MAX_HELD_BLOCKS, max_writing_blocks: int = MAX_WRITING_BLOCKS,
                 write_dropped: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.gates = gates
        self.block_size = block_size
        self.budget = budget
        self.write_block = write_block
        self.max_ahead_blocks = max_ahead_blocks
        self.router = router
        # Block reads by source for /metrics; None with SHOAL_METRICS=off (then the read path skips them).
        self.metrics = metrics
        self.stats = ReadStats()
        self.max_held_blocks = max_held_blocks
        self.max_writing_blocks = max_writing_blocks
        # Told of each write dropped (``MAX_WRITING_BLOCKS``): the mount's counter on /metrics.
        self.write_dropped = write_dropped
        # The streams holding a block (``OpenFile.current``), by id, least lately read first: at most
        # ``max_held_blocks`` of them (the dict's reference keeps each id unique while it is listed).
        self._held: OrderedDict[int, OpenFile] = OrderedDict()
        self._inflight: dict[BlockId, asyncio.Future[bytes]] = {}
        # Store fetches in flight, shared by this mount's reads and its peer server's (which must never join a
        # read that is asking a peer: two nodes with different views of the ring could wait on each other).
        self._store_inflight: dict[BlockId, asyncio.Future[bytes]] = {}
        self._peer_logged: dict[str, float] = {}
        self._writing: dict[BlockId, bytes] = {}  # fetched, being written to the cache
        self._written: dict[BlockId, asyncio.Future[object]] = {}  # the writes of ``_writing``, for ``warm``
        self._cache_wanted: set[BlockId] = set()  # store fetches in flight that some caller wants cached
        # A DataLoad's fetches straight into the block file's buffer (``_fill``), by block: True once another
        # caller joined one (it then gets a copy of the bytes; alone, the load needs none).
        self._filling: dict[BlockId, bool] = {}
        self._fills = bool(getattr(cache, "writes_files", False))
        # Store fetches in flight that a DataLoad started and no reader or peer joined yet: their bytes are
        # ``loaded_bytes`` (``_count_store``).
        self._loading: set[BlockId] = set()
        # Store fetches in flight that the peer server started for another node's reader and no reader of this
        # node joined: not this node's reads in its metrics (the other node counts them, as peer reads).
        self._for_peer: set[BlockId] = set()
        self._background: set[asyncio.Future[object]] = set()
        self._tracer = tracer(__name__)

    def open(self, entry: ManifestEntry) -> OpenFile:
        readahead = ReadAhead() if self.max_ahead_blocks is None else ReadAhead(max_blocks=self.max_ahead_blocks)
        return OpenFile(entry=entry, readahead=readahead)

    def close(self, handle: OpenFile) -> None:
        for _ in handle.ahead:
            self.budget.give_back(self.block_size)
        handle.ahead.clear()
        handle.current = None
        self._held.pop(id(handle), None)

    @property
    def held_blocks(self) -> int:
        """How many blocks the read streams hold now (at most ``max_held_blocks``)."""
        return len(self._held)

    async def read(self, handle: OpenFile, offset: int, length: int) -> bytes | memoryview:
        """The bytes of [offset, offset+length); a view into a cached block when one block holds them all."""
        entry = handle.entry
        indices = blocks_touched(offset, length, entry.size, self.block_size)
        if not indices:
            return b""
        window = handle.readahead.on_read(offset, length)
        self._forget_passed(handle, indices.start)
        if window:
            self._prefetch(handle, indices.stop, indices.stop + window)
        small = not handle.readahead.sequential and length * SMALL_READ_FRACTION <= self.block_size
        parts: list[bytes | memoryview] = []
        for index in indices:
            block_start, _ = block_span(entry.size, self.block_size, index)
            lo = max(offset, block_start) - block_start
            hi = min(offset + length, block_start + self.block_size) - block_start
            if small and len(indices) == 1:
                parts.append(await self._small_read(handle, index, lo, hi))
                continue
            piece = self._cached_piece(handle, index, lo, hi)
            if piece is not None:
                parts.append(piece)
                continue
            data = await self._block(handle, index)
            parts.append(memoryview(data)[lo:hi])  # no copy: FUSE replies straight from the block
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _cached_piece(self, handle: OpenFile, index: int, lo: int, hi: int) -> bytes | None:
        """Bytes [lo, hi) of a cached block read from the cache alone (only the chunks holding them), when this
        stream holds no block and the mount holds as many as it may: holding this one would push another stream's
        out. None when the stream may hold the block (or has it, or fetched it ahead), or it is not cached."""
        if (id(handle) in self._held or len(self._held) < self.max_held_blocks or index in handle.ahead
                or (handle.current is not None and handle.current[0] == index)):
            return None
        block = self.block_id(handle.entry, index)
        if not self.cache.contains(block):
            # Not cached: the fetch's own lookup is the one access (and miss) the cache is told of. Asking here too
            # counted every miss twice, and the admission policy then let each newcomer in over a block read again.
            return None
        counted = handle.pieces_of == index
        piece = self.cache.get_range(block, lo, hi, access=not counted)
        if piece is None:
            return None
        handle.pieces_of = index
        self.stats.hit_bytes += len(piece)
        if self.metrics is not None:
            self.metrics.hit(len(piece))
        return piece

    def _hold(self, handle: OpenFile, index: int, data: bytes) -> None:
        """``data`` becomes the block ``handle`` holds; the stream read least lately lets its block go when more
        than ``max_held_blocks`` would be held (its next read takes the block from the cache again)."""
        handle.current = (index, data)
        handle.pieces_of = -1
        key = id(handle)
        self._held[key] = handle
        self._held.move_to_end(key)
        while len(self._held) > self.max_held_blocks:
            _, other = self._held.popitem(last=False)
            other.current = None

    # --- blocks ---

    def block_id(self, entry: ManifestEntry, index: int) -> BlockId:
        return BlockId(mount=entry.mount, key=entry.key, etag=entry.etag, index=index)

    async def _block(self, handle: OpenFile, index: int) -> bytes:
        if handle.current is not None and handle.current[0] == index:
            return handle.current[1]
        ahead = handle.ahead.pop(index, None)
        if ahead is not None:
            self.budget.give_back(self.block_size)
            data = await ahead
        else:
            data = await self.fetch(handle.entry, index)
        self._hold(handle, index, data)
        return data

    async def fetch(self, entry: ManifestEntry, index: int) -> bytes:
        """The whole block: from the cache, or the GET already in flight, or a new GET."""
        block = self.block_id(entry, index)
        cached = self._local(block)
        if cached is not None:
            self.stats.hit_bytes += len(cached)
            if self.metrics is not None:
                self.metrics.hit(len(cached))
            return cached
        return await self._start(entry, index, block)

    def _start(self, entry: ManifestEntry, index: int, block: BlockId) -> asyncio.Future[bytes]:
        return _coalesced(self._inflight, block, lambda: self._get_and_cache(entry, index, block))

    def _gate(self, entry: ManifestEntry) -> StoreGate:
        """The store of the entry's mount. A file opened in an older tree whose mount a resync removed (the list
        shrank under its index) is stale; one whose index now names another mount is refused by that store's
        If-Match (another object, another ETag)."""
        if entry.mount >= len(self.gates):
            raise ObjectChanged(f"{quoted_key(entry.key)}: its mount is no longer in the dataset; open the file again")
        return self.gates[entry.mount]

    def route(self, block: BlockId) -> Route:
        return self.router.route(block) if self.router is not None else LOCAL

    async def _get_and_cache(self, entry: ManifestEntry, index: int, block: BlockId) -> bytes:
        """The block from its route: peers in order, then the store; cached here if the route says so."""
        writing = self._writing.get(block)
        if writing is not None:  # fetched a moment ago (e.g. for a peer), not yet in the cache
            return writing
        with self._tracer.start_as_current_span("read miss", attributes=_block_attributes(block)):
            return await self._from_route(entry, index, block)

    async def _from_route(self, entry: ManifestEntry, index: int, block: BlockId) -> bytes:
        route = self.route(block)
        _, length = block_span(entry.size, self.block_size, index)
        client = self.router.client if self.router is not None else None
        for url in route.peers:
            if client is None:
                break
            try:
                with self._tracer.start_as_current_span("peer GET", kind=trace.SpanKind.CLIENT,
                                                        attributes=server_attributes(url)):
                    data = await client.get_block(url, block, length, self.block_size)
            except PeerError as err:
                self.stats.peer_failures += 1
                self._log_peer_failure(url, block, err)
                continue
            self.stats.remote_bytes += length
            if self.metrics is not None:
                self.metrics.read(PEER, length)
            if route.cache:
                self._keep(block, data)
            return data
        return await self._store_block(entry, index, block, cache=route.cache)

    def _log_peer_failure(self, url: str, block: BlockId, err: PeerError) -> None:
        # Once per peer every few seconds: a dead owner fails every block it owns until the ring drops it.
        now = time.monotonic()
        if now - self._peer_logged.get(url, -PEER_LOG_SECONDS) >= PEER_LOG_SECONDS:
            self._peer_logged[url] = now
            log.info("peer read failed, trying the next source", peer=url, block=block.describe(),
                     reason=cut_error(str(err)), failures=self.stats.peer_failures)

    async def serve_block(self, entry: ManifestEntry, index: int) -> bytes:
        """The whole block for the peer server: from the cache, else from the store (never a peer), cached."""
        block = self.block_id(entry, index)
        cached = self._local(block)
        if cached is not None:
            return cached
        return await self._store_block(entry, index, block, cache=True, peer=True)

    async def warm(self, entry: ManifestEntry, index: int) -> bool:
        """Bring one block into this node's cache straight from the store, for a DataLoad (never a peer: the
        loader already picked this node as an owner; never FUSE). False when it was cached or being written
        already; True when it was fetched for this call (joining a store fetch of it in flight). Returns once the
        block's cache write is over; whether the cache kept it is ``cache.contains``. Store errors raise
        ``UfsError``."""
        block = self.block_id(entry, index)
        # Asking the disk: a load is how a cache whose files went from under the index is filled again.
        if self.cache.present(block):
            return False
        written = self._written.get(block)
        if written is not None:
            await asyncio.shield(written)
            return False
        if self._fills and block not in self._store_inflight and block not in self._writing:
            await asyncio.shield(self._fill(entry, index, block))
            return True
        await self._store_block(entry, index, block, cache=True, load=True)
        written = self._written.get(block)
        if written is not None:
            await asyncio.shield(written)
        return True

    def _fill(self, entry: ManifestEntry, index: int, block: BlockId) -> asyncio.Future[bytes]:
        """A DataLoad's store fetch of a block into the buffer its block file is written from (``FillBuffer``):
        no joined copy of the body, no copy into an aligned buffer, no ``bytes`` of the block at all unless a
        reader or a peer joins the fetch meanwhile. It is the block's store fetch until its write is committed,
        so whoever asks for the block meanwhile joins it instead of fetching it again."""
        future = asyncio.ensure_future(self._fill_and_write(entry, index, block))
        self._store_inflight[block] = future
        self._filling[block] = False
        self._loading.add(block)
        future.add_done_callback(_retrieve)
        return future

    async def _fill_and_write(self, entry: ManifestEntry, index: int, block: BlockId) -> bytes:
        start, length = block_span(entry.size, self.block_size, index)
        fill = FillBuffer(block, length)
        release = True
        try:
            got = await self._gate(entry).get_range_into(entry.key, start, fill.data, entry.etag)
            if got != length:
                raise UfsError(f"{quoted_key(entry.key)}: expected {length} bytes at offset {start}, got {got}")
            self._count_store(block, length)
            await self.cache.put_filled(fill)  # type: ignore[attr-defined]
            return bytes(fill.data) if self._filling.get(block) else b""
        except asyncio.CancelledError:
            release = False  # the write may still be reading the buffer in its thread
            raise
        finally:
            # Before the result is set: a caller from now on finds the block cached, or starts a fetch of its own.
            self._store_inflight.pop(block, None)
            self._filling.pop(block, None)
            self._loading.discard(block)
            self._cache_wanted.discard(block)
            if release:
                fill.release()

    async def _store_block(self, entry: ManifestEntry, index: int, block: BlockId, cache: bool,
                           load: bool = False, peer: bool = False) -> bytes:
        """The block from the store, joining its fetch in flight. ``load``: for a DataLoad, whose fetch (when it
        starts one) counts as loaded, until a reader or a peer joins it. ``peer``: for another node's reader,
        whose fetch (when it starts one, or joins a load's) is not a read of this node's, until a reader of this
        node joins it."""
        if block in self._filling:
            self._filling[block] = True  # the load's fill must hand over the bytes
        if load:
            if block not in self._store_inflight:
                self._loading.add(block)
        else:
            if peer and (block not in self._store_inflight or block in self._loading):
                self._for_peer.add(block)
            elif not peer:
                self._for_peer.discard(block)
            self._loading.discard(block)
        if cache:
            self._cache_wanted.add(block)
        future = _coalesced(self._store_inflight, block, lambda: self._store_get(entry, index, block))
        # Shielded: one waiter going away (a peer client hanging up) must not cancel the fetch for the others.
        data = await asyncio.shield(future)
        if cache:  # joined a fetch that had just finished: keep it too (a no-op if it is kept already)
            # Quiet: a write the fetch itself dropped is counted once, there.
            self._keep(block, data, needed=load, quiet=True)
        return data

    def _keep(self, block: BlockId, data: bytes, needed: bool = False, quiet: bool = False) -> None:
        """Write the block to the cache in the background; until it is written, lookups find it here (a peer
        asking right after the fetch must not cause a second GET). Not written, and counted unless ``quiet``, when
        ``max_writing_blocks`` writes wait already, unless ``needed`` (a DataLoad's block: the load waits for it)."""
        if block in self._writing:
            return
        if not needed and len(self._writing) >= self.max_writing_blocks:
            if not quiet:
                self.stats.dropped_writes += 1
                if self.write_dropped is not None:
                    self.write_dropped()
            return
        self._writing[block] = data

        async def write() -> None:
            try:
                await self.write_block(block, data)
            finally:
                self._writing.pop(block, None)
                self._written.pop(block, None)

        self._written[block] = self._spawn(write())

    def _local(self, block: BlockId) -> bytes | None:
        cached = self.cache.get(block)
        return cached if cached is not None else self._writing.get(block)

    async def _store_get(self, entry: ManifestEntry, index: int, block: BlockId) -> bytes:
        start, length = block_span(entry.size, self.block_size, index)
        try:
            data = await self._gate(entry).get_range(entry.key, start, length, entry.etag)
        except BaseException:
            self._cache_wanted.discard(block)
            self._loading.discard(block)
            self._for_peer.discard(block)
            raise
        if len(data) != length:
            self._cache_wanted.discard(block)
            self._loading.discard(block)
            self._for_peer.discard(block)
            raise UfsError(f"{quoted_key(entry.key)}: expected {length} bytes at offset {start}, got {len(data)}")
        loading = block in self._loading
        self._count_store(block, length)
        # Kept before the fetch counts as done: a lookup right after must find the block, not fetch it again.
        if block in self._cache_wanted:
            self._cache_wanted.discard(block)
            self._keep(block, data, needed=loading)
        return data

    def _count_store(self, block: BlockId, length: int) -> None:
        """One whole block fetched from the store: a read's miss, or a DataLoad's that nobody else joined. In the
        metrics, a read of this node's (``shoal_read_bytes{source="store"}``) only when one of its readers asked
        for it; every fetch counts once in ``shoal_store_fetched_bytes`` by whom it was for."""
        self.stats.gets += 1
        if block in self._loading:
            self._loading.discard(block)
            self.stats.loaded_bytes += length
            purpose = FOR_LOAD
        else:
            self.stats.miss_bytes += length
            purpose = FOR_PEER if block in self._for_peer else FOR_READ
        self._for_peer.discard(block)
        if self.metrics is not None:
            if purpose == FOR_READ:
                self.metrics.read(STORE, length)
            self.metrics.fetched(purpose, length)

    async def _small_read(self, handle: OpenFile, index: int, lo: int, hi: int) -> bytes | memoryview:
        entry = handle.entry
        block = self.block_id(entry, index)
        if handle.current is not None and handle.current[0] == index:
            return memoryview(handle.current[1])[lo:hi]
        # Only the chunks holding these bytes are read and verified, not the whole block.
        cached = self.cache.get_range(block, lo, hi)
        if cached is not None:
            self.stats.hit_bytes += len(cached)
            if self.metrics is not None:
                self.metrics.hit(len(cached))
            return cached
        inflight = self._inflight.get(block)
        if inflight is not None:
            return memoryview(await inflight)[lo:hi]
        if self.route(block).peers:  # peers serve whole blocks: fetch it from the owner, answer from it
            return memoryview(await self._start(entry, index, block))[lo:hi]
        # Answer with just these bytes now; bring the whole block into the cache in the background.
        self._spawn(self._warm(entry, index, block))
        block_start, _ = block_span(entry.size, self.block_size, index)
        with self._tracer.start_as_current_span("read miss", attributes=_block_attributes(block)):
            data = await self._gate(entry).get_range(entry.key, block_start + lo, hi - lo, entry.etag)
        expected = min(block_start + hi, entry.size) - block_start - lo  # a read may ask past the end of the file
        if len(data) != expected:  # a short answer passed on would read as the end of the file
            raise UfsError(f"{quoted_key(entry.key)}: expected {expected} bytes at offset {block_start + lo}, "
                           f"got {len(data)}")
        self.stats.gets += 1
        self.stats.miss_bytes += len(data)
        if self.metrics is not None:
            self.metrics.read(STORE, len(data))
            self.metrics.fetched(FOR_READ, len(data))
        return data

    async def _warm(self, entry: ManifestEntry, index: int, block: BlockId) -> None:
        with contextlib.suppress(UfsError):
            await self._start(entry, index, block)

    def _prefetch(self, handle: OpenFile, first: int, stop: int) -> None:
        last = (handle.entry.size - 1) // self.block_size
        if handle.advised:
            # The window only moves on (or starts again after a jump): a block behind it, or beyond it after a
            # jump back, is hinted again only if a window reaches it again. At most a window's blocks are kept.
            handle.advised.intersection_update(range(first, stop))
        for index in range(first, min(stop, last + 1)):
            if index in handle.ahead:
                continue
            block = self.block_id(handle.entry, index)
            if self.cache.contains(block) and block not in self._inflight:
                if index not in handle.advised:
                    handle.advised.add(index)
                    self.cache.prefetch(block)  # the kernel reads it from disk while earlier blocks are served
                continue  # served from the cache when reached; no need to hold it in memory
            if not self.budget.try_take(self.block_size):
                return
            handle.ahead[index] = self._start(handle.entry, index, block)

    def _forget_passed(self, handle: OpenFile, first_needed: int) -> None:
        for index in [i for i in handle.ahead if i < first_needed]:
            del handle.ahead[index]
            self.budget.give_back(self.block_size)

    def _spawn(self, work: Awaitable[object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def settle(self) -> None:
        """Wait until the blocks being fetched or written now are in the cache (or failed), not for fetches started
        meanwhile: readers go on. A clean settles first, so what it frees includes the last fetches of a load
        cancelled just before it, which otherwise landed in the cache after the clean had finished."""
        blocks = {*self._inflight, *self._store_inflight, *self._writing}
        # A fetch, then the cache write it starts: two rounds; one more for a write a peer's fetch joined.
        for _ in range(3):
            fetches = [f for b, f in (*self._inflight.items(), *self._store_inflight.items()) if b in blocks]
            writes = [f for b, f in self._written.items() if b in blocks]
            pending: list[Awaitable[object]] = [*fetches, *writes]
            if not pending:
                return
            # Shielded: a clean cancelled while it waits must not cancel fetches that readers wait on too.
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))

    async def drain(self) -> None:
        """Wait for background fetches and cache writes (used at shutdown and by tests)."""
        while self._background or self._inflight or self._store_inflight:
            await asyncio.gather(*self._background, *self._inflight.values(), *self._store_inflight.values(),
                                 return_exceptions=True)


def _block_attributes(block: BlockId) -> dict[str, str | int]:
    return {"shoal.object.key": block.key, "shoal.block.index": block.index, "shoal.block.mount": block.mount}


def _coalesced(inflight: dict[BlockId, asyncio.Future[bytes]], block: BlockId,
               fetch: Callable[[], Awaitable[bytes]]) -> asyncio.Future[bytes]:
    """The fetch of ``block`` already in ``inflight``, or a new one (``fetch()``) kept there until it is done."""
    future = inflight.get(block)
    if future is None:
        future = asyncio.ensure_future(fetch())
        inflight[block] = future
        future.add_done_callback(lambda _: inflight.pop(block, None))
        # Fetches nobody ends up waiting for (prefetches) must not log "exception was never retrieved".
        future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()
