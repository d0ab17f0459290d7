"""The inventory fold (libs.inventory): positions, totals, block sets, snapshot parts, gaps. Pure, with properties.

The agent side is the real ``InventoryLog``, so these also check that what an agent numbers, a holder folds back
into exactly the agent's cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from random import Random

import msgspec
from hypothesis import example, given
from hypothesis import strategies as st

from libs.events.agent import (
    AgentHeartbeat,
    AgentRecord,
    BlockId,
    CacheCounters,
    Inventory,
    InventoryDelta,
    InventorySnapshot,
    group_blocks,
)
from libs.events.common import ObjectRef
from libs.inventory import DatasetInventory, NodeInventory, NodeNotes, fold, other_instance
from services.agent.inventory import InventoryLog

DATASET = ObjectRef(name="d")


def block(i: int) -> BlockId:
    return BlockId(0, "k", "e", i)


def snapshot(seq: int, cached: int = 0, *, node: str = "n1", incarnation: str = "i1", part: int = 1,
             parts: int = 1, blocks: Iterable[int] = ()) -> InventorySnapshot:
    return InventorySnapshot(node=node, dataset=DATASET, incarnation=incarnation, seq=seq, part=part, parts=parts,
                             files=group_blocks((block(i), 1) for i in blocks),
                             counters=CacheCounters(cached_bytes=cached))


def delta(seq: int, cached: int = 0, *, node: str = "n1", incarnation: str = "i1", add: Iterable[int] = (),
          remove: Iterable[int] = ()) -> InventoryDelta:
    return InventoryDelta(node=node, dataset=DATASET, incarnation=incarnation, seq=seq,
                          cached=group_blocks((block(i), 1) for i in add),
                          evicted=group_blocks((block(i), 1) for i in remove),
                          counters=CacheCounters(cached_bytes=cached))


def fold_all(events: Iterable[Inventory], inventory: DatasetInventory | None = None,
             ) -> tuple[DatasetInventory, list[bool]]:
    asks = []
    for event in events:
        inventory, ask = fold(inventory, event)
        asks.append(ask)
    return inventory or DatasetInventory(), asks


def blocks_of(inventory: DatasetInventory, node: str = "n1") -> set[BlockId]:
    return set(inventory.nodes[node].blocks)


# --- examples ---


def test_gaps_and_new_incarnations_ask_for_a_snapshot_and_old_events_are_ignored() -> None:
    cache, ask = fold(None, snapshot(1, 10))
    assert not ask
    cache, ask = fold(cache, delta(2, 20))
    assert not ask and cache.nodes["n1"].counters.cached_bytes == 20
    same, ask = fold(cache, delta(2, 99))  # redelivered
    assert same is cache and not ask
    cache, ask = fold(cache, delta(5, 30))
    assert ask and cache.nodes["n1"].counters.cached_bytes == 30  # totals stay right across a gap
    assert not cache.nodes["n1"].exact
    _, ask = fold(cache, delta(1, 30, incarnation="i2"))
    assert ask
    _, ask = fold(None, delta(7, 30))  # a node never seen
    assert ask


def test_a_snapshot_in_parts_replaces_the_blocks_only_once_complete() -> None:
    cache, _ = fold_all([snapshot(1, blocks=[1, 2]), delta(2, add=[3])])
    assert blocks_of(cache) == {block(1), block(2), block(3)} and cache.nodes["n1"].exact
    cache, asks = fold_all([snapshot(4, part=2, parts=3, blocks=[8]), snapshot(3, part=1, parts=3, blocks=[7])],
                           cache)
    assert not any(asks)
    assert blocks_of(cache) == {block(1), block(2), block(3)}  # still the old set, not exact
    assert not cache.nodes["n1"].exact
    cache, _ = fold(cache, snapshot(5, part=3, parts=3, blocks=[9]))
    assert blocks_of(cache) == {block(7), block(8), block(9)} and cache.nodes["n1"].exact
    assert cache.nodes["n1"].seq == 5 and cache.nodes["n1"].assembly is None


def test_a_delta_after_a_snapshot_with_a_lost_part_asks_for_a_snapshot() -> None:
    # Parts 1 and 3 arrive, part 2 is lost; the next delta follows part 3 in seq but the set is incomplete.
    cache, asks = fold_all([snapshot(1, part=1, parts=3, blocks=[1]), snapshot(3, part=3, parts=3, blocks=[3]),
                            delta(4, add=[4])])
    assert asks == [False, False, True]
    assert not cache.nodes["n1"].exact and cache.nodes["n1"].assembly is None


def test_a_new_incarnation_keeps_the_old_blocks_until_its_snapshot_is_complete() -> None:
    cache, _ = fold_all([snapshot(1, blocks=[1]), snapshot(1, incarnation="i2", part=1, parts=2, blocks=[2])])
    assert blocks_of(cache) == {block(1)} and cache.nodes["n1"].incarnation == "i2"
    cache, _ = fold(cache, snapshot(2, incarnation="i2", part=2, parts=2, blocks=[3]))
    assert blocks_of(cache) == {block(2), block(3)} and cache.nodes["n1"].exact


def test_events_of_an_incarnation_the_node_moved_on_from_are_old() -> None:
    """A complete snapshot of the mount process before a restart, delivered after the new process's events,
    replaced the node's blocks and position until the new process's next delta (which then asked for a snapshot):
    incarnations are random, so the ones superseded are remembered, and their events changed nothing."""
    cache, _ = fold_all([snapshot(1, 10, incarnation="old", blocks=[1, 2]), snapshot(1, 30, incarnation="new",
                                                                                     blocks=[3])])
    assert cache.nodes["n1"].retired == ("old",)
    for late in (snapshot(7, 99, incarnation="old", blocks=[9]), delta(8, 99, incarnation="old", add=[9]),
                 snapshot(9, 99, incarnation="old", part=1, parts=2, blocks=[9])):
        same, ask = fold(cache, late)
        assert same is cache and not ask
    cache, ask = fold(cache, delta(2, 40, incarnation="new", add=[4]))
    assert not ask and blocks_of(cache) == {block(3), block(4)} and cache.nodes["n1"].exact
    # The node's restarts are remembered, a few of them (``RETIRED_KEPT``), newest first; its own position is not.
    for incarnation in ("i3", "i4", "i5"):
        cache, _ = fold(cache, snapshot(1, 0, incarnation=incarnation))
    assert cache.nodes["n1"].retired == ("i4", "i3", "new")
    assert b"retired" not in msgspec.json.encode(fold_all([snapshot(1, 10)])[0])  # nothing stored before a restart


def test_nodes_are_folded_apart() -> None:
    cache, asks = fold_all([snapshot(1, 10, blocks=[1]), snapshot(1, 20, node="n2", blocks=[2]), delta(2, 11)])
    assert not any(asks)
    assert blocks_of(cache) == {block(1)} and blocks_of(cache, "n2") == {block(2)}
    assert cache.nodes["n1"].counters.cached_bytes == 11 and cache.nodes["n2"].counters.cached_bytes == 20


def test_totals_only_fold_is_small_json_and_reads_what_older_versions_stored() -> None:
    events: list[Inventory] = [snapshot(1, 10, part=1, parts=2, blocks=[1]),
                               snapshot(2, 10, part=2, parts=2, blocks=[2]), delta(3, 12, add=[3])]
    inventory: DatasetInventory | None = None
    for event in events:
        inventory, _ = fold(inventory, event, track_blocks=False)
    assert inventory is not None
    decoded = msgspec.json.decode(msgspec.json.encode(inventory), type=DatasetInventory)
    assert decoded == inventory and decoded.nodes["n1"].blocks == {}
    assert decoded.nodes["n1"].seq == 3 and decoded.nodes["n1"].counters.cached_bytes == 12
    # What the dataset service stored before the fold moved to libs: position and totals per node.
    older = b'{"nodes":{"n1":{"incarnation":"i1","seq":3,"counters":{"cachedBytes":12}}}}'
    stored = msgspec.json.decode(older, type=DatasetInventory)
    assert stored.nodes["n1"] == NodeInventory(incarnation="i1", seq=3, counters=CacheCounters(cached_bytes=12))
    assert fold(stored, delta(4, 13), track_blocks=False).ask_snapshot is False


# --- properties, with the agent's own numbering ---

BLOCK_IDS = st.integers(min_value=0, max_value=40)
# A batch of changes between two deltas: (True, i) caches block i, (False, i) evicts it.
BATCHES = st.lists(st.lists(st.tuples(st.booleans(), BLOCK_IDS), max_size=8), max_size=8)


def agent_events(initial: set[int], batches: list[list[tuple[bool, int]]], part_blocks: int,
                 ) -> tuple[list[Inventory], set[BlockId]]:
    """What a real ``InventoryLog`` publishes for a cache that starts with ``initial`` and then changes."""
    # ``part_blocks`` blocks per part: the object's header (15 bytes) and at most 7 bytes per block of it.
    log = InventoryLog(node="n1", dataset=DATASET, incarnation="i1", part_bytes=15 + 7 * part_blocks)
    cached = {block(i) for i in initial}
    events: list[Inventory] = list(log.snapshot([(b, 1) for b in sorted(cached, key=lambda b: b.index)],
                                                CacheCounters(cached_bytes=len(cached))))
    for batch in batches:
        for add, i in batch:
            if add and block(i) not in cached:
                cached.add(block(i))
                log.cached(block(i), 1)
            elif not add and block(i) in cached:
                cached.discard(block(i))
                log.evicted(block(i), 1)
        events.extend(log.delta(CacheCounters(cached_bytes=len(cached))))
    return events, cached


@given(st.sets(BLOCK_IDS), BATCHES, st.integers(min_value=1, max_value=5))
# Found by Hypothesis: a cached block evicted, cached again and evicted within one batch must still be gone.
@example({0}, [[(False, 0), (True, 0), (False, 0)]], 1)
def test_snapshot_then_deltas_equal_the_agents_final_set(initial: set[int], batches: list[list[tuple[bool, int]]],
                                                           part_blocks: int) -> None:
    events, cached = agent_events(initial, batches, part_blocks)
    inventory, asks = fold_all(events)
    assert not any(asks)
    assert blocks_of(inventory) == cached
    node = inventory.nodes["n1"]
    assert node.exact and node.seq == events[-1].seq and node.counters.cached_bytes == len(cached)


@given(st.sets(BLOCK_IDS), st.integers(min_value=1, max_value=5), st.randoms(use_true_random=False),
       st.sets(BLOCK_IDS))
def test_snapshot_parts_in_any_order_assemble(initial: set[int], part_blocks: int, random: Random,
                                              before: set[int]) -> None:
    events, cached = agent_events(initial, [], part_blocks)
    parts = list(events)
    random.shuffle(parts)
    start, _ = fold(None, snapshot(0, incarnation="old", blocks=before))
    inventory, asks = fold_all(parts[:-1], start)
    if len(parts) > 1:
        assert not inventory.nodes["n1"].exact and blocks_of(inventory) == {block(i) for i in before}
    inventory, last_ask = fold(inventory, parts[-1])
    assert not any(asks) and not last_ask
    assert blocks_of(inventory) == cached and inventory.nodes["n1"].exact


@given(st.sets(BLOCK_IDS), BATCHES.filter(lambda b: len(b) > 1), st.integers(min_value=1, max_value=5),
       st.data())
def test_a_gap_always_asks_for_a_snapshot_and_the_snapshot_makes_it_exact(
        initial: set[int], batches: list[list[tuple[bool, int]]], part_blocks: int, data: st.DataObject) -> None:
    events, cached = agent_events(initial, batches, part_blocks)
    if len(events) < 2:
        return
    lost = data.draw(st.integers(min_value=0, max_value=len(events) - 2), label="lost event")
    inventory, asks = fold_all(events[:lost] + events[lost + 1:])
    # The first delta after the lost event (in the folded list, one index earlier) must ask.
    after = [i - 1 for i in range(lost + 1, len(events)) if isinstance(events[i], InventoryDelta)]
    if after:
        assert asks[after[0]], "the first delta after a lost event must ask for a snapshot"
    assert not inventory.nodes["n1"].exact
    # The agent answers the request: a fresh snapshot, numbered after everything it sent.
    log = InventoryLog(node="n1", dataset=DATASET, incarnation="i1", seq=events[-1].seq)
    answer = log.snapshot([(b, 1) for b in cached], CacheCounters(cached_bytes=len(cached)))
    inventory, again = fold_all(answer, inventory)
    assert not any(again)
    assert blocks_of(inventory) == cached and inventory.nodes["n1"].exact


@given(st.sets(BLOCK_IDS), BATCHES, st.integers(min_value=1, max_value=5), st.data())
def test_redelivered_events_change_nothing(initial: set[int], batches: list[list[tuple[bool, int]]],
                                           part_blocks: int, data: st.DataObject) -> None:
    events, cached = agent_events(initial, batches, part_blocks)
    again = data.draw(st.lists(st.integers(min_value=0, max_value=len(events) - 1), max_size=5), label="again")
    replayed: list[Inventory] = []
    for index, event in enumerate(events):
        replayed.append(event)
        replayed.extend(events[i] for i in again if i <= index)  # redelivered after it was already folded
    inventory, asks = fold_all(replayed)
    assert not any(asks)
    assert inventory == fold_all(events)[0]
    assert blocks_of(inventory) == cached


def test_a_new_incarnation_delta_asks_even_when_its_seq_follows() -> None:
    events, _ = agent_events({1, 2}, [[(True, 3)]], part_blocks=1)
    inventory, _ = fold_all(events)
    _, ask = fold(inventory, delta(events[-1].seq + 1, incarnation="i2"))
    assert ask


def test_inventory_of_another_agent_process_of_the_node_than_the_one_its_record_holds_is_not_the_nodes() -> None:
    record = AgentRecord(heartbeat=AgentHeartbeat(node="n1", instance="held"), received_at=100.0,
                         instances={"other": 99.0}, conflict_at=99.0)
    event = InventoryDelta(node="n1", dataset=ObjectRef(name="d"), incarnation="i", seq=1, instance="other")
    assert other_instance(event, record)
    assert not other_instance(msgspec.structs.replace(event, instance="held"), record)
    # An instance the record does not know yet (a restarted agent before its first beat is in), an agent before
    # ``instance``, a node with no record (a simulated agent): counted as before.
    assert not other_instance(msgspec.structs.replace(event, instance="new"), record)
    assert not other_instance(msgspec.structs.replace(event, instance=""), record)
    assert not other_instance(event, None)
    # A restart: the old instance beat lately, but no two agents beat by turns. The mount processes it started live
    # on under the new agent and still name it: their inventory is the node's.
    restarted = msgspec.structs.replace(record, instances={"other": 99.0}, conflict_at=0.0)
    assert not other_instance(event, restarted)
    notes = NodeNotes(every=60.0)
    assert notes.due("n1", 0.0) and not notes.due("n1", 59.0) and notes.due("n2", 59.0)
    assert notes.due("n1", 60.0) and set(notes.said) == {"n1", "n2"}
    assert notes.due("n3", 200.0) and set(notes.said) == {"n3"}  # the others said long ago are forgotten
