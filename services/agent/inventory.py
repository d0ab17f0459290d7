"""Inventory of one mount's block cache as numbered events: a snapshot at start and on request, then deltas.

``InventoryLog`` is pure: it collects blocks cached and evicted, and turns them into events with consecutive
sequence numbers, cut into parts by encoded size so no event passes NATS's payload limit however many blocks
or however long the keys. ``InventoryPublisher`` owns the I/O: it publishes a delta at most once a second when
something changed, and answers snapshot requests. A publish that fails is logged and followed by a fresh
snapshot once publishing works again; it never ends the publisher (nor, with it, the mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from libs import subjects
from libs.bus import MESSAGE_LIMIT, Bus
from libs.events.agent import (
    BlockId,
    CacheCounters,
    CachedFile,
    InventoryDelta,
    InventoryRequest,
    InventorySnapshot,
    group_blocks,
)
from libs.events.common import ObjectRef
from libs.paths import quoted_key
from libs.telemetry import get_logger

log = get_logger(__name__)

# Bytes of block lists per event. The rest of an event (ids, names of at most 253 characters, counters) is under
# 2 KiB, and headers (Nats-Msg-Id, traceparent) are a few hundred bytes: 64 KiB of margin covers both.
PART_BYTES = MESSAGE_LIMIT - 64 * 1024
# Deltas are batched: at most one per second per mount.
FLUSH_SECONDS = 1.0
# After a failed publish, wait this long before trying again (doubling up to the cap), then send a snapshot.
RETRY_START_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

_encoder = msgspec.json.Encoder()
_REQUEST_DECODER = msgspec.json.Decoder(InventoryRequest)


def _file_bytes(file: CachedFile) -> int:
    """Encoded size of ``file`` in a list, comma included; exact for the header, digits counted for blocks."""
    header = len(_encoder.encode(CachedFile(file.mount, file.key, file.etag, [])))
    return header + 1 + sum(len(str(index)) + len(str(size)) + 4 for index, size in file.blocks)


def cut_files(files: Iterable[CachedFile], budget: int) -> list[list[CachedFile]]:
    """Files packed into parts of at most ``budget`` encoded bytes; a file with too many blocks is split."""
    parts: list[list[CachedFile]] = []
    current: list[CachedFile] = []
    used = 0
    for file in files:
        header = _file_bytes(CachedFile(file.mount, file.key, file.etag, []))
        if header > budget:
            raise ValueError(f"an inventory entry of {header} bytes cannot fit in {budget} bytes")
        blocks = file.blocks
        while blocks:
            room = budget - used - header
            taken = 0
            for index, size in blocks:
                cost = len(str(index)) + len(str(size)) + 4
                if cost > room:
                    break
                room -= cost
                taken += 1
            if taken == 0:
                if not current:
                    raise ValueError(f"one block of {quoted_key(file.key)} cannot fit in {budget} bytes")
                parts.append(current)
                current, used = [], 0
                continue
            piece = CachedFile(file.mount, file.key, file.etag, blocks[:taken])
            current.append(piece)
            used += _file_bytes(piece)
            blocks = blocks[taken:]
    if current or not parts:
        parts.append(current)
    return [part for part in parts if part] or [[]]


@dataclass
class InventoryLog:
    node: str
    dataset: ObjectRef
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The agent process that started this mount process (``AgentHeartbeat.instance``), in every event.
    instance: str = ""
    # The incarnation of the dataset this mount process serves (``DatasetRecord.incarnation``), in every event.
    dataset_incarnation: str = ""
    seq: int = 0
    part_bytes: int = PART_BYTES
    _cached: dict[BlockId, int] = field(default_factory=dict)
    _evicted: dict[BlockId, int] = field(default_factory=dict)
    _last_counters: CacheCounters | None = None

    def cached(self, block: BlockId, size: int) -> None:
        self._evicted.pop(block, None)
        self._cached[block] = size

    def evicted(self, block: BlockId, size: int) -> None:
        # Always reported, even when cached earlier in this batch: the block may have been in the cache (and in
        # what consumers hold) before the batch, and an eviction of a block they never saw changes nothing.
        self._cached.pop(block, None)
        self._evicted[block] = size

    def snapshot(self, blocks: list[tuple[BlockId, int]], counters: CacheCounters) -> list[InventorySnapshot]:
        """A full snapshot in parts; pending changes are included in it, so they are dropped."""
        self._cached.clear()
        self._evicted.clear()
        self._last_counters = counters
        chunks = cut_files(group_blocks(blocks), self.part_bytes)
        events = []
        for part, chunk in enumerate(chunks, start=1):
            self.seq += 1
            events.append(InventorySnapshot(
                id=f"{self.incarnation}-{self.seq}", node=self.node, dataset=self.dataset,
                incarnation=self.incarnation, seq=self.seq, part=part, parts=len(chunks), files=chunk,
                counters=counters, instance=self.instance, dataset_incarnation=self.dataset_incarnation,
            ))
        return events

    def delta(self, counters: CacheCounters) -> list[InventoryDelta]:
        """The changes since the last event (in as many events as their size needs); empty if nothing changed."""
        if not self._cached and not self._evicted and counters == self._last_counters:
            return []
        cached = cut_files(group_blocks(self._cached.items()), self.part_bytes) if self._cached else []
        evicted = cut_files(group_blocks(self._evicted.items()), self.part_bytes) if self._evicted else []
        pairs: list[tuple[list[CachedFile], list[CachedFile]]] = [(part, []) for part in cached]
        if pairs and evicted and _part_bytes(pairs[-1][0]) + _part_bytes(evicted[0]) <= self.part_bytes:
            pairs[-1] = (pairs[-1][0], evicted.pop(0))  # the usual small delta is one event
        pairs += [([], part) for part in evicted]
        events = []
        for cached_part, evicted_part in pairs or [([], [])]:
            self.seq += 1
            events.append(InventoryDelta(
                id=f"{self.incarnation}-{self.seq}", node=self.node, dataset=self.dataset,
                incarnation=self.incarnation, seq=self.seq, cached=cached_part, evicted=evicted_part,
                counters=counters, instance=self.instance, dataset_incarnation=self.dataset_incarnation,
            ))
        self._cached.clear()
        self._evicted.clear()
        self._last_counters = counters
        return events


def _part_bytes(part: list[CachedFile]) -> int:
    return sum(_file_bytes(file) for file in part)


@dataclass
class InventoryPublisher:
    bus: Bus
    log: InventoryLog
    blocks: Callable[[], list[tuple[BlockId, int]]]
    counters: Callable[[], CacheCounters]
    interval: float = FLUSH_SECONDS
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _snapshot_wanted: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    failures: int = field(default=0, init=False)

    async def run(self) -> None:
        """Publish until ``stop``; failures are logged and retried with backoff, never raised."""
        subject = subjects.agent_inventory(self.log.node)
        subscription = None
        self._snapshot_wanted.set()  # the first thing published is a snapshot
        try:
            while not self._stopping.is_set():
                try:
                    if subscription is None:
                        subscription = await self.bus.subscribe(subjects.INVENTORY_REQUEST, _REQUEST_DECODER,
                                                                self._on_request)
                    await self._publish_pending(subject)
                    self.failures = 0
                except Exception as err:
                    self.failures += 1
                    self._snapshot_wanted.set()  # events may be lost: start over from a snapshot
                    shown = subjects.object_name(self.log.dataset.namespace, self.log.dataset.name)
                    log.warning("inventory publish failed", dataset=shown, error=repr(err), failures=self.failures)
                await self._wait(self._delay())
            # A last delta on the way out, so a clean stop loses no change.
            with contextlib.suppress(Exception):
                await self._publish_pending(subject)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    def _delay(self) -> float:
        if self.failures == 0:
            return self.interval
        return min(RETRY_MAX_SECONDS, RETRY_START_SECONDS * 2 ** min(self.failures - 1, 8))

    async def _wait(self, seconds: float) -> None:
        """Until the next flush, a snapshot request (when healthy) or stop."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if self.failures == 0:
            waits.append(asyncio.ensure_future(self._snapshot_wanted.wait()))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), seconds)
        finally:
            for wait in waits:
                wait.cancel()

    async def _publish_pending(self, subject: str) -> None:
        if self._snapshot_wanted.is_set():
            self._snapshot_wanted.clear()
            events: list[InventorySnapshot] | list[InventoryDelta] = self.log.snapshot(self.blocks(), self.counters())
        else:
            events = self.log.delta(self.counters())
        for event in events:
            await self.bus.publish(subject, event)

    async def _on_request(self, request: InventoryRequest) -> None:
        if request.node and request.node != self.log.node:
            return
        if request.dataset is not None and request.dataset != self.log.dataset:
            return
        self._snapshot_wanted.set()
