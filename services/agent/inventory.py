"""Inventory of one mount's block cache as numbered events: a snapshot at start and on request, then deltas.

``InventoryLog`` is pure: it collects blocks cached and evicted, and turns them into events with consecutive
sequence numbers. ``InventoryPublisher`` owns the I/O: it publishes a delta at most once a second when
something changed, and answers snapshot requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from libs import subjects
from libs.bus import Bus
from libs.events.agent import (
    BlockId,
    CacheCounters,
    CachedBlock,
    InventoryDelta,
    InventoryRequest,
    InventorySnapshot,
)
from libs.events.common import ObjectRef
from libs.telemetry import get_logger

log = get_logger(__name__)

# Blocks per snapshot part. Each carries its id (mount, object key, ETag, index) and size: ~60 bytes plus the key
# in JSON, so 5000 stay below JetStream's 1 MiB message limit only while keys are shorter than ~150 bytes.
SNAPSHOT_PART_BLOCKS = 5000
# Deltas are batched: at most one per second per mount.
FLUSH_SECONDS = 1.0
_REQUEST_DECODER = msgspec.json.Decoder(InventoryRequest)


@dataclass
class InventoryLog:
    node: str
    dataset: ObjectRef
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    _cached: dict[BlockId, int] = field(default_factory=dict)
    _evicted: dict[BlockId, int] = field(default_factory=dict)
    _last_counters: CacheCounters | None = None

    def cached(self, block: BlockId, size: int) -> None:
        self._evicted.pop(block, None)
        self._cached[block] = size

    def evicted(self, block: BlockId, size: int) -> None:
        if self._cached.pop(block, None) is None:
            self._evicted[block] = size

    def snapshot(self, blocks: list[tuple[BlockId, int]], counters: CacheCounters) -> list[InventorySnapshot]:
        """A full snapshot in parts; pending changes are included in it, so they are dropped."""
        self._cached.clear()
        self._evicted.clear()
        self._last_counters = counters
        chunks = [blocks[i:i + SNAPSHOT_PART_BLOCKS] for i in range(0, len(blocks), SNAPSHOT_PART_BLOCKS)] or [[]]
        events = []
        for part, chunk in enumerate(chunks, start=1):
            self.seq += 1
            events.append(InventorySnapshot(
                id=f"{self.incarnation}-{self.seq}", node=self.node, dataset=self.dataset,
                incarnation=self.incarnation, seq=self.seq, part=part, parts=len(chunks),
                blocks=[CachedBlock(block=b, size=s) for b, s in chunk], counters=counters,
            ))
        return events

    def delta(self, counters: CacheCounters) -> InventoryDelta | None:
        """The changes since the last event, or None when nothing changed."""
        if not self._cached and not self._evicted and counters == self._last_counters:
            return None
        self.seq += 1
        event = InventoryDelta(
            id=f"{self.incarnation}-{self.seq}", node=self.node, dataset=self.dataset, incarnation=self.incarnation,
            seq=self.seq, cached=[CachedBlock(block=b, size=s) for b, s in self._cached.items()],
            evicted=[CachedBlock(block=b, size=s) for b, s in self._evicted.items()], counters=counters,
        )
        self._cached.clear()
        self._evicted.clear()
        self._last_counters = counters
        return event


@dataclass
class InventoryPublisher:
    bus: Bus
    log: InventoryLog
    blocks: Callable[[], list[tuple[BlockId, int]]]
    counters: Callable[[], CacheCounters]
    interval: float = FLUSH_SECONDS
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _snapshot_wanted: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def run(self) -> None:
        subject = subjects.agent_inventory(self.log.node)
        subscription = await self.bus.subscribe(subjects.INVENTORY_REQUEST, _REQUEST_DECODER, self._on_request)
        try:
            await self._publish_snapshot(subject)
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._snapshot_wanted.wait(), timeout=self.interval)
                if self._snapshot_wanted.is_set():
                    self._snapshot_wanted.clear()
                    await self._publish_snapshot(subject)
                    continue
                delta = self.log.delta(self.counters())
                if delta is not None:
                    await self.bus.publish(subject, delta)
            # A last delta on the way out, so a clean stop loses no change.
            delta = self.log.delta(self.counters())
            if delta is not None:
                await self.bus.publish(subject, delta)
        finally:
            await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def _publish_snapshot(self, subject: str) -> None:
        for event in self.log.snapshot(self.blocks(), self.counters()):
            await self.bus.publish(subject, event)

    async def _on_request(self, request: InventoryRequest) -> None:
        if request.node and request.node != self.log.node:
            return
        if request.dataset is not None and request.dataset != self.log.dataset:
            return
        self._snapshot_wanted.set()
