"""Agent events: heartbeats (which runtimes a node serves) and block inventory (which blocks a node caches).

Inventory per (node, dataset) is a numbered stream: a snapshot (possibly in several parts) starts it, deltas
follow with consecutive ``seq``; a consumer that sees a gap, or a new ``incarnation`` (the mount process
restarted), asks for a snapshot with ``InventoryRequest``.
"""

from __future__ import annotations

import msgspec
import xxhash

from libs.events.common import Event, ObjectRef


class BlockId(msgspec.Struct, frozen=True, array_like=True):
    """A block of a file: mount index, object key, ETag and block index. Encoded as a 4-element array."""

    mount: int
    key: str
    etag: str
    index: int

    @property
    def name(self) -> str:
        """32 hex characters, stable across processes and versions (xxh3-128 of the id)."""
        return xxhash.xxh3_128_hexdigest(f"{self.mount}\0{self.key}\0{self.etag}\0{self.index}".encode())

    def describe(self) -> str:
        return f"{self.mount}:{self.key}@{self.etag}#{self.index}"


class CachedBlock(msgspec.Struct, frozen=True, array_like=True):
    block: BlockId
    size: int


class CacheCounters(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Totals of one (node, dataset) cache at the time of the event."""

    cached_bytes: int = 0
    capacity_bytes: int = 0
    # Bytes served from the cache / fetched from the object store since the mount process started.
    hit_bytes: int = 0
    miss_bytes: int = 0


class InventorySnapshot(Event, frozen=True, kw_only=True, tag="agent.inventory.snapshot.v1", rename="camel"):
    node: str
    dataset: ObjectRef
    incarnation: str
    seq: int
    part: int = 1
    parts: int = 1
    blocks: list[CachedBlock] = []
    counters: CacheCounters = CacheCounters()


class InventoryDelta(Event, frozen=True, kw_only=True, tag="agent.inventory.delta.v1", rename="camel"):
    node: str
    dataset: ObjectRef
    incarnation: str
    seq: int
    cached: list[CachedBlock] = []
    evicted: list[CachedBlock] = []
    counters: CacheCounters = CacheCounters()


Inventory = InventorySnapshot | InventoryDelta


class InventoryRequest(Event, frozen=True, kw_only=True, tag="agent.inventory.request.v1", rename="camel"):
    """Ask agents for a fresh snapshot; empty node or dataset means all."""

    node: str = ""
    dataset: ObjectRef | None = None


class AgentHeartbeat(Event, frozen=True, kw_only=True, tag="agent.heartbeat.v1", rename="camel"):
    node: str
    runtimes: list[ObjectRef] = []
    # False while a mount process keeps failing or a cache directory is down; ``problems`` says which.
    healthy: bool = True
    # Unix seconds at the agent; the runtime service judges freshness by its own clock of receipt.
    sent_at: float = 0.0
    # How often the agent beats; a node missing three beats in a row is not ready.
    interval_seconds: float = 5.0
    # Bytes of cache this node's mounts can use: the quotas of their tiers that are not down.
    capacity_bytes: int = 0
    problems: list[str] = []


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    heartbeat: AgentHeartbeat
    received_at: float
