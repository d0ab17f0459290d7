"""The inventory fold, pure: what each node caches of a dataset, from its numbered snapshot and delta events.

Decides, per (dataset, node):
- the position (incarnation, last ``seq``) and the cache totals, which every event carries, so totals stay right
  even across a gap;
- the set of cached blocks with their sizes: a snapshot may come in parts 1..n with consecutive ``seq``, in any
  order; only a complete snapshot replaces the set; deltas add and remove blocks;
- when to ask the agent for a snapshot: a delta that does not follow the last event (a sequence gap), comes from
  a new incarnation (the mount process restarted) or from a node never seen, or arrives while a snapshot is
  still missing parts;
- that an event of an incarnation the node's events moved on from (``retired``) is old, snapshot or delta.

Block identity is opaque here (any hashable value from the events), so the encoding of block ids can change
without touching the fold. Holders that persist the fold as JSON (the dataset service, in KV) fold with
``track_blocks=False``: positions and totals only. Holders that keep it in memory (the scheduler) track blocks.
Old and redelivered events are ignored; the fold returns the very same object when nothing changed.
Two agents given one node name each send their mounts' inventory as that node: the holders count only the one the
node's record holds (``other_instance``), or the node's figures switched between the two at each event. A gap asks
once: deltas that follow it are consecutive again, so a replay of many queued deltas costs one snapshot.

Without the block sets, the nodes' totals cannot tell a block two nodes hold from two blocks: a holder that folds
with ``track_blocks=False`` keeps beside them the scheduler's count of the dataset's bytes cached, each block once
(``DatasetInventory.unique``, from ``scheduler.dataset.cache.v1``); the fold carries it along untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from libs.events.agent import AgentRecord, CacheCounters, Inventory, InventoryDelta, InventorySnapshot, ungroup

# How often the events ignored from another agent process of a node (``other_instance``) are logged per node: each
# of its mounts sends them at every change, and one line a minute names the node (the runtime service's warning of
# the two agents has the same pace).
OTHER_INSTANCE_LOG_SECONDS = 60.0
# Incarnations a node's position remembers as superseded (``NodeInventory.retired``): a late event of the mount
# process before the last restart (a snapshot it answered just before it stopped, delivered after the new process's
# events) is the case; a few cover restarts in quick succession and keep a persisted position small (~35 bytes each).
RETIRED_KEPT = 3


class Assembly(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A snapshot being put together: the ``seq`` of its part 1, its number of parts, what has arrived."""

    start: int
    parts: int
    received: frozenset[int] = frozenset()
    blocks: dict[Any, int] = {}

    @property
    def end(self) -> int:
        return self.start + self.parts - 1


class NodeInventory(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """One node's cache of one dataset, as far as its events tell."""

    incarnation: str
    seq: int
    counters: CacheCounters = CacheCounters()
    # Block → size. Exact only when ``exact``: built from a complete snapshot and every delta since.
    blocks: dict[Any, int] = {}
    exact: bool = False
    assembly: Assembly | None = None
    # Incarnations this one superseded, newest first (at most ``RETIRED_KEPT``): their events are old, whenever they
    # arrive. Incarnations are random tokens, so which one is newer is known only from the order they came in.
    retired: tuple[str, ...] = ()


class UniqueCached(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The scheduler's count of a dataset's bytes in the cache, each block once however many nodes hold it
    (``scheduler.dataset.cache.v1``), and the fact's sequence in its stream: only a fact published later replaces
    it (a redelivered or reordered older one does not). ``nodes_bytes``: the nodes' ``cachedBytes`` summed in the
    fold that counted it (None: a fact, or an entry, from before the field)."""

    bytes: int
    sequence: int
    observed_at: str = ""
    nodes_bytes: int | None = None


class DatasetInventory(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Every node's cache of one dataset."""

    nodes: dict[str, NodeInventory] = {}
    # None until the scheduler said it (an entry written before the field decodes as that too).
    unique: UniqueCached | None = None
    # The incarnation of the dataset whose mounts these are (``DatasetRecord.incarnation``; "": not known, an entry
    # written before the field or by a fact): the holder checks it against the events' ``dataset_incarnation``.
    incarnation: str = ""


class Fold(NamedTuple):
    inventory: DatasetInventory
    # True when the node should be asked for a snapshot (``InventoryRequest``).
    ask_snapshot: bool


def fold(inventory: DatasetInventory | None, event: Inventory, *, track_blocks: bool = True) -> Fold:
    """The dataset's inventory after one event of one of its nodes."""
    inventory = inventory or DatasetInventory()
    node, ask = fold_node(inventory.nodes.get(event.node), event, track_blocks=track_blocks)
    if node is inventory.nodes.get(event.node):
        return Fold(inventory, ask)
    return Fold(msgspec.structs.replace(inventory, nodes={**inventory.nodes, event.node: node}), ask)


def fold_node(node: NodeInventory | None, event: Inventory, *,
              track_blocks: bool = True) -> tuple[NodeInventory, bool]:
    """One node's inventory after ``event``, and whether to ask that node for a snapshot."""
    if isinstance(event, InventorySnapshot):
        return _snapshot_part(node, event, track_blocks), False
    return _delta(node, event, track_blocks)


def _retired(node: NodeInventory | None) -> tuple[str, ...]:
    """What a position of another incarnation than ``node``'s, following it, remembers as superseded."""
    return (node.incarnation, *node.retired)[:RETIRED_KEPT] if node is not None else ()


def _snapshot_part(node: NodeInventory | None, part: InventorySnapshot, track_blocks: bool) -> NodeInventory:
    start = part.seq - part.part + 1
    same = node if node is not None and node.incarnation == part.incarnation else None
    if same is None and node is not None and part.incarnation in node.retired:
        return node  # see ``_delta``
    pending = same.assembly if same is not None else None
    if same is not None and pending is not None and (pending.start, pending.parts) == (start, part.parts):
        if part.part in pending.received:
            return same  # a redelivered part
        assembly = pending
    elif same is not None and part.seq <= same.seq:
        return same  # a part of an older snapshot, already superseded
    else:
        assembly = Assembly(start=start, parts=part.parts)
    blocks = {**assembly.blocks, **{b.block: b.size for b in part.cached_blocks()}} if track_blocks else {}
    assembly = Assembly(start=assembly.start, parts=assembly.parts, received=assembly.received | {part.part},
                        blocks=blocks)
    # Position and totals follow the newest event (parts may arrive out of order).
    seq, counters = (part.seq, part.counters) if same is None or part.seq > same.seq else (same.seq, same.counters)
    retired = same.retired if same is not None else _retired(node)
    if len(assembly.received) == assembly.parts:
        return NodeInventory(incarnation=part.incarnation, seq=seq, counters=counters, blocks=assembly.blocks,
                             exact=True, retired=retired)
    # Until the snapshot is complete, the blocks known so far stay (possibly stale, so not exact).
    return NodeInventory(incarnation=part.incarnation, seq=seq, counters=counters,
                         blocks=node.blocks if node is not None else {}, exact=False, assembly=assembly,
                         retired=retired)


def _delta(node: NodeInventory | None, delta: InventoryDelta, track_blocks: bool) -> tuple[NodeInventory, bool]:
    same = node if node is not None and node.incarnation == delta.incarnation else None
    if same is not None:
        if delta.seq <= same.seq:
            return same, False  # a redelivered or reordered old event
        retired = same.retired
    elif node is not None and delta.incarnation in node.retired:
        # An event of a mount process the node's events already moved on from (it restarted since): taken, a
        # complete snapshot of it replaced the newer process's blocks, and a delta asked for a snapshot.
        return node, False
    else:
        retired = _retired(node)
    follows = same is not None and delta.seq == same.seq + 1 and same.assembly is None
    blocks = node.blocks if node is not None else {}
    if track_blocks and (delta.cached or delta.evicted):
        blocks = {**blocks, **{b.block: b.size for b in ungroup(delta.cached)}}
        for evicted in ungroup(delta.evicted):
            blocks.pop(evicted.block, None)
    exact = follows and node is not None and node.exact
    # After a gap the blocks are a best guess (deltas still apply) until the snapshot asked for arrives; a
    # snapshot still missing parts is dropped, since this delta's changes would be lost under it.
    return NodeInventory(incarnation=delta.incarnation, seq=delta.seq, counters=delta.counters, blocks=blocks,
                         exact=exact, retired=retired), not follows


def other_instance(event: Inventory, agent: AgentRecord | None) -> bool:
    """Whether ``event`` comes from another agent process than the one the node's record holds (``AgentRecord``,
    written by the runtime service): one that beat as the node lately (``instances``). Two agents given one node
    name beat by turns; the record holds one of them while it beats, and its mounts' inventory is the node's. Events
    of the other, counted too, made the node's figures and blocks switch between two caches at each event (each a
    new incarnation: a snapshot asked for, answered by both). An event of an agent before ``instance``, of a node
    with no record (a simulated agent) or of an instance the record does not know yet (a restarted agent before its
    first beat is in) counts as before. So does one of an earlier instance while the node is not flagged: after a
    restart the agent's mount processes live on (they are handed over) and still name the instance that started them,
    which beat as the node lately too; only while two agents beat by turns (``conflict_at``) is it another agent."""
    return (bool(event.instance) and agent is not None and bool(agent.heartbeat.instance) and agent.conflict_at > 0
            and event.instance != agent.heartbeat.instance and event.instance in agent.instances)


def other_instance_over(nodes: Iterable[str], agents: Mapping[str, AgentRecord]) -> list[str]:
    """Of ``nodes`` (those whose other agent's events were counted, ``other_instance``), the ones where that no
    longer applies: the node's record is gone (the node left) or no longer flagged (one agent beats as it again).
    Their series of the count are removed: kept, every node that ever had two agents stayed a series for ever."""
    return sorted(node for node in nodes if (record := agents.get(node)) is None or record.conflict_at <= 0)


@dataclass
class NodeNotes:
    """When something was last said about each node: at most once every ``every`` seconds per node (``now`` a
    parameter); only nodes said within that long are kept."""

    every: float = OTHER_INSTANCE_LOG_SECONDS
    said: dict[str, float] = field(default_factory=dict)

    def due(self, node: str, now: float) -> bool:
        if now - self.said.get(node, -math.inf) < self.every:
            return False
        self.said = {other: at for other, at in self.said.items() if now - at < self.every}
        self.said[node] = now
        return True
