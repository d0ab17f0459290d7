"""The scheduler's fold (``services.scheduler.fold``), pure: blocks per node and file, current versions against the
manifest's catalog, whole files, bytes under path hints, forgetting; and, with Hypothesis, that for *any* sequence
of events (parts out of order, gaps, redeliveries, new incarnations) it holds exactly the blocks the shared fold
``libs.inventory`` holds with ``track_blocks=True``, and asks for a snapshot exactly when it does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from libs.events.agent import (
    BlockId,
    CacheCounters,
    CachedFile,
    Inventory,
    InventoryDelta,
    InventorySnapshot,
    group_blocks,
)
from libs.events.common import ObjectRef
from libs.events.dataset import ManifestEntry
from libs.events.schedule import DatasetUse, ScoreRequest
from libs.inventory import DatasetInventory, fold
from services.scheduler import fold as fold_module
from services.scheduler.domain import Weights, _derive, score
from services.scheduler.fold import CacheFold, Catalog, FileKey, LiveView, path_matches

DATASET = ObjectRef(name="d", namespace="ml")
KEY = ("ml", "d")
MiB = 1 << 20


def blocks(key: str, etag: str, sizes: Iterable[tuple[int, int]]) -> list[tuple[BlockId, int]]:
    return [(BlockId(0, key, etag, index), size) for index, size in sizes]


def snapshot(seq: int, items: list[tuple[BlockId, int]], *, node: str = "n1", incarnation: str = "i1",
             part: int = 1, parts: int = 1) -> InventorySnapshot:
    return InventorySnapshot(node=node, dataset=DATASET, incarnation=incarnation, seq=seq, part=part, parts=parts,
                             files=group_blocks(items), counters=CacheCounters())


def delta(seq: int, add: list[tuple[BlockId, int]] = (), remove: list[tuple[BlockId, int]] = (),  # type: ignore[assignment]
          *, node: str = "n1", incarnation: str = "i1") -> InventoryDelta:
    return InventoryDelta(node=node, dataset=DATASET, incarnation=incarnation, seq=seq, cached=group_blocks(add),
                          evicted=group_blocks(remove), counters=CacheCounters())


def entry(path: str, key: str, size: int, etag: str = "e1") -> ManifestEntry:
    return ManifestEntry(path=path, mount=0, key=key, size=size, etag=etag, mtime=0.0)


CATALOG = Catalog([entry("/train/a.bin", "train/a.bin", 2 * MiB + 10), entry("/train/b.bin", "train/b.bin", MiB),
                   entry("/val/c.bin", "val/c.bin", 3 * MiB), entry("/train/", "train/", 0)])


def test_blocks_per_file_current_versions_and_whole_files() -> None:
    state = CacheFold()
    state.set_catalog(KEY, CATALOG)
    a = blocks("train/a.bin", "e1", [(0, MiB), (1, MiB)])
    assert not state.apply(snapshot(1, a))
    cache = state.datasets[KEY]["n1"]
    assert cache.total == cache.current == 2 * MiB and state.whole_files(KEY, "n1") == 0
    # The last (short) block makes a.bin whole; a block of an old version is cached but does not count.
    assert not state.apply(delta(2, blocks("train/a.bin", "e1", [(2, 10)]) + blocks("val/c.bin", "old", [(0, MiB)])))
    assert cache.total == 3 * MiB + 10 and cache.current == 2 * MiB + 10
    assert state.whole_files(KEY, "n1") == 1
    # A resync whose manifest has c.bin at version "old": now it counts.
    state.set_catalog(KEY, Catalog([*[entry(p, k, s) for p, k, s in [("/train/a.bin", "train/a.bin", 2 * MiB + 10)]],
                                    entry("/val/c.bin", "val/c.bin", 3 * MiB, etag="old")]))
    assert cache.current == 3 * MiB + 10
    # Evictions give the memory back: a file without blocks leaves the node.
    assert not state.apply(delta(3, remove=blocks("val/c.bin", "old", [(0, MiB)])))
    assert ("0", "val/c.bin", "old") not in cache.files and (0, "val/c.bin", "old") not in cache.files
    assert cache.total == 2 * MiB + 10 and state.blocks() == 3


def test_a_gap_asks_and_the_snapshot_replaces_the_blocks_once_all_parts_are_in() -> None:
    state = CacheFold()
    a0, a1, b0 = (blocks("train/a.bin", "e1", [(i, MiB)]) for i in (0, 1, 2))
    assert not state.apply(snapshot(1, a0))
    assert state.apply(delta(3, a1))  # seq 2 lost
    assert state.datasets[KEY]["n1"].total == 2 * MiB
    assert not state.apply(snapshot(5, b0, part=2, parts=2))
    assert state.datasets[KEY]["n1"].total == 2 * MiB  # incomplete: the old blocks stay
    assert not state.apply(snapshot(4, a0, part=1, parts=2))
    assert state.datasets[KEY]["n1"].total == 2 * MiB and set(state.datasets[KEY]["n1"].files) == {
        (0, "train/a.bin", "e1")}
    assert state.datasets[KEY]["n1"].files[(0, "train/a.bin", "e1")] == {0: MiB, 2: MiB}
    assert state.apply(delta(1, node="n2"))  # a node never seen


def test_forgetting_datasets_and_nodes() -> None:
    state = CacheFold()
    state.apply(snapshot(1, blocks("k", "e", [(0, 5)])))
    state.apply(snapshot(1, blocks("k", "e", [(0, 5)]), node="n2"))
    state.forget_node("n1")
    assert state.nodes() == {"n2"} and state.caching_nodes() == {"n2"}
    state.forget_dataset(KEY)
    assert state.nodes() == set() and state.blocks() == 0


def test_churn_leaves_no_bookkeeping_behind() -> None:
    """Datasets created and deleted, nodes coming and going, agents restarting with new incarnations: everything the
    fold keeps per dataset or per node (change stamps included) is bounded by the datasets and nodes that exist now,
    so a long-running scheduler's memory does not grow with churn. A forgotten dataset's stamp still moves for a
    reader that kept one, and one applied again never reuses a stamp."""
    state = CacheFold()
    catalog = Catalog([entry("/a", "a", 8, etag="e")])
    live_datasets: set[tuple[str, str]] = set()
    live_nodes: set[str] = set()
    stamps_seen: set[int] = set()
    for round_ in range(300):
        key = ("ml", f"d{round_}")
        ref = ObjectRef(name=key[1], namespace=key[0])
        state.set_catalog(key, catalog)
        live_datasets.add(key)
        for node in (f"n{round_}", f"n{round_ + 1}"):
            live_nodes.add(node)
            state.apply(replace(snapshot(1, blocks("a", "e", [(0, 4)]), node=node, incarnation=f"i{round_}"),
                                dataset=ref))
            # The agent restarts: a new incarnation's delta (asks for a snapshot), then its snapshot.
            assert state.apply(replace(delta(1, blocks("a", "e", [(1, 4)]), node=node, incarnation=f"j{round_}"),
                                       dataset=ref))
            state.apply(replace(snapshot(2, blocks("a", "e", [(0, 4), (1, 4)]), node=node,
                                         incarnation=f"j{round_}"), dataset=ref))
        # The newer node claims 12 bytes of the 8-byte file: an excess, counted when a decision reads the dataset.
        state.apply(replace(delta(3, blocks("a", "e", [(2, 4)]), node=f"n{round_ + 1}", incarnation=f"j{round_}"),
                            dataset=ref))
        assert state.settle(key) == {f"n{round_ + 1}": 4}
        assert state.published_unique(key) == 8 and state.unique[key] == 12
        stamps_seen.add(state.versions[key])
        if round_ >= 2:  # the dataset of two rounds ago is deleted, the node of two rounds ago goes away
            gone = ("ml", f"d{round_ - 2}")
            stamp = state.versions[gone]
            state.forget_dataset(gone)
            live_datasets.discard(gone)
            assert state.versions.get(gone, 0) != stamp  # a reader that kept the old stamp sees the change
            state.forget_node(f"n{round_ - 2}")
            live_nodes.discard(f"n{round_ - 2}")
        state.forget_dataset(("ml", f"reference-{round_}"))  # a key the fold never held (a reference's)
        kept_maps: list[tuple[str, Mapping[tuple[str, str], object]]] = [
            ("versions", state.versions), ("datasets", state.datasets), ("held", state.held),
            ("catalogs", state.catalogs), ("moves", state.moves), ("moves_base", state.moves_base),
            ("holders", state.holders), ("unique", state.unique), ("excess", state.excess),
            ("settled", state._settled), ("unique_excess", state.unique_excess),
            ("unique_settled", state._unique_settled)]
        for name, kept in kept_maps:
            assert set(kept) <= live_datasets, f"{name} keeps {len(kept)} datasets, {len(live_datasets)} exist"
        assert set(state.node_entries) <= live_nodes
        assert all(set(nodes) <= live_nodes for nodes in state.datasets.values())
        assert all(set(nodes) <= live_nodes for nodes in state.held.values())
        assert all(set(nodes) <= live_nodes for nodes in state.excess.values())
    assert len(state.versions) == len(live_datasets) == 2
    assert state.nodes() == live_nodes
    # Applied again after being forgotten: a stamp no reader can hold.
    state.apply(replace(snapshot(1, blocks("a", "e", [(0, 4)])), dataset=ObjectRef(name="d0", namespace="ml")))
    assert state.versions[("ml", "d0")] > max(stamps_seen)


def test_path_hints_select_files_and_folders() -> None:
    assert CATALOG.total == 6 * MiB + 10
    assert CATALOG.total_under(["/train"]) == CATALOG.total_under(["/train/"]) == 3 * MiB + 10
    assert CATALOG.total_under(["/train/b.bin", "/train"]) == 3 * MiB + 10  # overlaps count once
    assert CATALOG.total_under(["/val/c.bin"]) == 3 * MiB
    assert CATALOG.total_under(["/tra"]) == 0 and CATALOG.total_under(["/"]) == CATALOG.total
    assert path_matches("/train/a.bin", ["/train"]) and not path_matches("/trainer/x", ["/train"])
    # A file named with a trailing '/' is selected, as the loader's targets select it (libs.paths.selects): the
    # scheduler counted nothing for such a hint where a load of the same path loads the file.
    assert CATALOG.total_under(["/val/c.bin/"]) == 3 * MiB and path_matches("/val/c.bin", ["/val/c.bin/"])


def test_the_live_view_scores_from_the_fold() -> None:
    state = CacheFold()
    state.set_catalog(KEY, CATALOG)
    state.apply(snapshot(1, blocks("train/a.bin", "e1", [(0, MiB), (1, MiB), (2, 10)])))
    state.apply(snapshot(1, blocks("val/c.bin", "e1", [(0, MiB), (1, MiB), (2, MiB)]), node="n2"))
    view = LiveView(state, {KEY: CATALOG.total}, lambda node: {}, lambda: ["n3"])
    from libs.events.schedule import DatasetUse, ScoreRequest

    whole = score(ScoreRequest(datasets=[DatasetUse(name="d", namespace="ml")]), view, Weights())
    assert [s.node for s in whole.scores] == ["n2", "n1", "n3"]
    train = score(ScoreRequest(datasets=[DatasetUse(name="d", namespace="ml", paths=["/train"])]), view, Weights())
    assert [(s.node, s.score) for s in train.scores] == [("n1", 67), ("n2", 0), ("n3", 0)]
    assert train.scores[0].reason.endswith(" (1 whole file)")  # not "1 whole files"
    unknown = score(ScoreRequest(datasets=[DatasetUse(name="x", namespace="ml")]), view, Weights())
    assert unknown.error == "unknown dataset ml/x"


def test_a_block_reported_with_a_negative_size_takes_nothing_from_other_files_or_nodes() -> None:
    """A block reported with a negative size (an agent's bug, or one that lies) holds nothing, and no less: taken as
    reported, it took bytes off the node's other blocks and off the dataset's ``unique``, which went below zero, and
    the scheduler published that (the dataset service refuses such a fact, so the dataset's cachedPercentage stayed
    where it was); a node's own ``cachedBytes`` below zero the same for ``reported``."""
    state = CacheFold()
    state.set_catalog(KEY, Catalog([entry("/a", "a", MiB), entry("/b", "b", MiB)]))
    state.apply(snapshot(1, blocks("a", "e1", [(0, MiB)]), node="n1"))
    lying = snapshot(1, blocks("a", "e1", [(1, -5 * MiB)]) + blocks("b", "e1", [(0, MiB)]), node="n2")
    state.apply(replace(lying, counters=CacheCounters(cached_bytes=-10 * MiB)))
    assert state.held[KEY] == {"n1": MiB, "n2": MiB}  # n2: b, not b less 5 MiB
    assert state.unique[KEY] == 2 * MiB and KEY not in state.reported  # n1's a and n2's b, each block once
    state.apply(delta(2, blocks("b", "e1", [(1, -3 * MiB), (0, -MiB)]), node="n2"))
    assert state.held[KEY] == {"n1": MiB} and state.unique[KEY] == MiB
    state.apply(delta(3, blocks("b", "e1", [(0, MiB)]), remove=blocks("a", "e1", [(1, 0)]), node="n2"))
    assert state.held[KEY] == {"n1": MiB, "n2": MiB} and state.unique[KEY] == 2 * MiB
    state.forget_node("n2")
    assert state.held[KEY] == {"n1": MiB} and state.unique[KEY] == MiB and KEY not in state.reported


def test_a_node_claiming_more_of_a_file_than_its_size_counts_the_file_once() -> None:
    """Blocks partition a file, so a node's blocks of one file count up to the file's size: a lying agent claiming
    4 MiB of a 1 MiB file scored 100 ("holds 100.0%") and outranked a node holding two thirds of the dataset. The
    cap is taken where decisions read (``CacheFold.settle``), not per event; ``held`` stays as reported."""
    state = CacheFold()
    state.set_catalog(KEY, Catalog([entry("/a", "a", MiB), entry("/b", "b", 2 * MiB)]))
    state.apply(snapshot(1, blocks("b", "e1", [(0, MiB), (1, MiB)]), node="honest"))
    state.apply(snapshot(1, blocks("a", "e1", [(0, MiB), (1, MiB)]), node="liar"))
    state.apply(delta(2, blocks("a", "e1", [(2, MiB), (3, MiB)]), node="liar"))
    view = LiveView(state, {KEY: 3 * MiB}, lambda node: {}, lambda: [])
    request = ScoreRequest(datasets=[DatasetUse(name="d", namespace="ml")], limit=0)
    assert [(s.node, s.score) for s in score(request, view, Weights()).scores] == [("honest", 67), ("liar", 33)]
    assert view.cached(KEY, ()) == {"honest": 2 * MiB, "liar": MiB}
    assert view.cached(KEY, ("/",)) == {"honest": 2 * MiB, "liar": MiB}  # a path hint's recount caps it too
    assert state.held[KEY]["liar"] == 4 * MiB and state.excess[KEY] == {"liar": 3 * MiB}
    assert state.whole_files(KEY, "liar") == 0 and state.whole_files(KEY, "honest") == 1
    # Evicting the blocks it never had brings it back within the file's size: nothing is taken off it then.
    state.apply(delta(3, remove=blocks("a", "e1", [(1, 0), (2, 0), (3, 0)]), node="liar"))
    assert view.cached(KEY, ()) == {"honest": 2 * MiB, "liar": MiB} and KEY not in state.excess
    # Forgotten, its excess goes with it.
    state.apply(delta(4, blocks("a", "e1", [(5, 9 * MiB)]), node="liar"))
    assert view.cached(KEY, ()) == {"honest": 2 * MiB, "liar": MiB}
    state.forget_node("liar")
    assert view.cached(KEY, ()) == {"honest": 2 * MiB} and KEY not in state.excess


def test_the_published_unique_bytes_count_each_file_up_to_its_size() -> None:
    """What the scheduler publishes (the dataset's cachedPercentage) counts a file's blocks, each once, up to the
    file's size: a liar claiming 4 MiB of a 1 MiB file, or two nodes each within a file's size claiming different
    blocks, published more than the dataset holds (a percentage over the truth, up to 100 % of files nobody has)."""
    state = CacheFold()
    state.set_catalog(KEY, Catalog([entry("/a", "a", MiB), entry("/b", "b", 2 * MiB)]))
    state.apply(snapshot(1, blocks("b", "e1", [(0, MiB)]), node="honest"))
    assert state.published_unique(KEY) == MiB
    state.apply(snapshot(1, blocks("a", "e1", [(0, MiB), (1, MiB)]), node="liar"))
    state.apply(delta(2, blocks("a", "e1", [(2, MiB), (3, MiB)]), node="liar"))
    assert state.unique[KEY] == 5 * MiB  # as reported
    assert state.published_unique(KEY) == 2 * MiB  # a: 1 MiB, b: 1 MiB
    # Two nodes each within b's 2 MiB, with different blocks: 3 MiB of it claimed, 2 counted.
    state.apply(delta(2, blocks("b", "e1", [(1, MiB), (2, MiB)]), node="honest"))
    assert state.published_unique(KEY) == 3 * MiB
    state.apply(delta(3, blocks("b", "e1", [(4, MiB)]), node="liar"))
    assert state.published_unique(KEY) == 3 * MiB and state.unique[KEY] == 8 * MiB
    # Evicting what it never had brings the figure back as reported; forgetting the liar the same.
    state.apply(delta(4, remove=blocks("a", "e1", [(1, 0), (2, 0), (3, 0)]) + blocks("b", "e1", [(4, 0)]),
                      node="liar"))
    assert state.published_unique(KEY) == 3 * MiB and KEY in state.unique_excess  # b: 3 of 2 MiB, honest alone
    state.apply(delta(3, remove=blocks("b", "e1", [(2, 0)]), node="honest"))
    assert state.published_unique(KEY) == state.unique[KEY] == 3 * MiB and KEY not in state.unique_excess
    state.apply(delta(5, blocks("a", "e1", [(7, 9 * MiB)]), node="liar"))
    assert state.published_unique(KEY) == 3 * MiB
    state.forget_node("liar")
    assert state.published_unique(KEY) == state.unique[KEY] == 2 * MiB
    # A new catalog where b is larger: its blocks count again; without a catalog every block counts as reported.
    state.apply(delta(4, blocks("b", "e1", [(2, MiB), (3, MiB)]), node="honest"))
    assert state.published_unique(KEY) == 2 * MiB
    state.set_catalog(KEY, Catalog([entry("/a", "a", MiB), entry("/b", "b", 8 * MiB)]))
    assert state.published_unique(KEY) == 4 * MiB
    state.set_catalog(KEY, None)
    assert state.published_unique(KEY) == 4 * MiB and KEY not in state._unique_settled
    # Past the moves kept, every held file is counted again.
    state.set_catalog(KEY, Catalog([entry("/a", "a", MiB), entry("/b", "b", 2 * MiB)]))
    assert state.published_unique(KEY) == 2 * MiB
    for seq in range(5, 5 + 2 * fold_module.MOVES_KEPT):
        state.apply(delta(seq, blocks("b", "e1", [(seq, 1)]), node="honest"))
    assert state.published_unique(KEY) == 2 * MiB
    state.forget_dataset(KEY)
    assert KEY not in state.unique_excess and KEY not in state._unique_settled


def test_a_snapshot_of_an_older_incarnation_after_the_newer_ones_events_is_stale() -> None:
    """The mount process restarted (incarnation i2); a complete snapshot its predecessor (i1) answered arrives after
    i2's events: it replaced the node's blocks with i1's until i2's next delta. Now nothing moves (the handlers count
    it ``stale``), and i2's next delta follows."""
    state = CacheFold()
    state.set_catalog(KEY, Catalog([entry("/a", "a", 4 * MiB), entry("/b", "b", 4 * MiB)]))
    state.apply(snapshot(1, blocks("a", "e1", [(0, MiB)]), incarnation="i1"))
    state.apply(snapshot(1, blocks("b", "e1", [(0, MiB), (1, MiB)]), incarnation="i2"))
    generation = state.generation
    assert not state.apply(snapshot(5, blocks("a", "e1", [(0, MiB), (1, MiB), (2, MiB)]), incarnation="i1"))
    assert state.generation == generation and state.held[KEY] == {"n1": 2 * MiB}
    assert set(state.datasets[KEY]["n1"].files) == {(0, "b", "e1")}
    assert not state.apply(delta(2, blocks("b", "e1", [(2, MiB)]), incarnation="i2"))  # follows: no snapshot asked
    assert state.held[KEY] == {"n1": 3 * MiB} and state.datasets[KEY]["n1"].position.exact


# --- the same decisions and blocks as the shared fold, for any event sequence ---

SIZES = st.integers(1, 4)
ITEMS = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5), SIZES), max_size=4)


@st.composite
def events(draw: st.DrawFn) -> Inventory:
    node = draw(st.sampled_from(["n1", "n2"]))
    incarnation = draw(st.sampled_from(["i1", "i2"]))
    seq = draw(st.integers(1, 8))

    def items(raw: list[tuple[str, int, int]]) -> list[tuple[BlockId, int]]:
        return [(BlockId(0, key, "e", index), size) for key, index, size in raw]

    if draw(st.booleans()):
        parts = draw(st.integers(1, 3))
        part = draw(st.integers(1, parts))
        return snapshot(seq + part - 1, items(draw(ITEMS)), node=node, incarnation=incarnation, part=part,
                        parts=parts)
    return delta(seq, items(draw(ITEMS)), items(draw(ITEMS)), node=node, incarnation=incarnation)


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), max_size=25))
def test_same_blocks_and_same_snapshot_requests_as_the_shared_fold(sequence: list[Inventory]) -> None:
    state = CacheFold()
    shared: DatasetInventory | None = None
    for event in sequence:
        shared, expected_ask = fold(shared, event, track_blocks=True)
        assert state.apply(event) == expected_ask
    for node, position in (shared.nodes.items() if shared else []):
        cache = state.datasets[KEY][node]
        mine = {BlockId(*file, index): size for file, held in cache.files.items() for index, size in held.items()}
        assert mine == position.blocks
        assert cache.total == cache.current == sum(position.blocks.values())


def test_decisions_are_kept_only_while_what_they_read_is_unchanged() -> None:
    import asyncio
    from types import SimpleNamespace

    from libs.events.agent import AgentHeartbeat, AgentRecord
    from libs.events.schedule import DatasetUse, ScoreRequest
    from services.scheduler.handlers import NOT_READY, DatasetInfo, SchedulerHandlers

    beat = AgentHeartbeat(node="n2", labels={"topology.kubernetes.io/zone": "z1"})
    agents = SimpleNamespace(values={"n2": AgentRecord(heartbeat=beat, received_at=100.0)}, ready=asyncio.Event())
    handlers = SchedulerHandlers(bus=None, agents=agents, clock=lambda: 100.0)  # type: ignore[arg-type]
    question = [DatasetUse(name="d", namespace="ml")]
    assert handlers.answer(ScoreRequest(id="q0", datasets=question)).error == NOT_READY  # no records read yet
    handlers.datasets[KEY] = DatasetInfo(total=4 * MiB, manifest_version=("", 0, 0, ""))
    handlers.datasets_ready.set()  # as the watch does once the records are in
    handlers.fold.apply(snapshot(1, blocks("k", "e", [(0, MiB)])))
    asyncio.run(handlers.refresh_labels())  # as the periodic refresh does at start
    first = handlers.answer(ScoreRequest(id="q1", datasets=question))
    again = handlers.answer(ScoreRequest(id="q2", datasets=question))
    assert again.scores is first.scores and (again.id, again.causation_id) == ("q2.reply", "q2")
    assert [(s.node, s.score) for s in first.scores] == [("n1", 25), ("n2", 0)]
    # A delta of the requested dataset: a new decision.
    handlers.fold.apply(delta(2, blocks("k", "e", [(1, MiB)])))
    moved = handlers.answer(ScoreRequest(id="q3", datasets=question))
    assert [(s.node, s.score) for s in moved.scores] == [("n1", 50), ("n2", 0)]
    # A label change, noticed by the periodic refresh: n2 is now in n1's zone.
    agents.values["n1"] = AgentRecord(heartbeat=AgentHeartbeat(node="n1", labels={"topology.kubernetes.io/zone": "z1"}),
                                      received_at=100.0)
    assert handlers.answer(ScoreRequest(id="q4", datasets=question)).scores is moved.scores
    asyncio.run(handlers.refresh_labels())
    relabelled = handlers.answer(ScoreRequest(id="q5", datasets=question))
    assert [(s.node, s.score) for s in relabelled.scores] == [("n1", 50), ("n2", 25)]
    # The dataset's total changes (a resync): a new decision.
    handlers.datasets[KEY] = DatasetInfo(total=8 * MiB, manifest_version=("", 0, 1, ""))
    handlers.info_version += 1
    assert [s.score for s in handlers.answer(ScoreRequest(datasets=question)).scores] == [25, 12]


def test_late_inventory_of_a_deleted_datasets_mount_does_not_count_for_the_name_applied_again() -> None:
    """Inventory events name their dataset by namespace and name: an event of a deleted dataset's mount handled
    after the name was applied again was folded into the new dataset, which then ranked that node for blocks it
    does not hold (the same files, when the same source was applied again). The events say which incarnation of
    the dataset their mount serves; a record of another incarnation than the one known (its delete unseen: a
    replay after a reconnect shows only the newest record) drops the old one's caches."""
    import asyncio
    from types import SimpleNamespace

    from libs.bus import Delivery
    from libs.events.common import ObjectMeta
    from libs.events.dataset import Dataset, DatasetRecord
    from services.scheduler.handlers import SchedulerHandlers

    def record(incarnation: str) -> DatasetRecord:
        return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="d", namespace="ml")), generation=1,
                             incarnation=incarnation)

    def mount_snapshot(node: str, seq: int, incarnation: str) -> InventorySnapshot:
        return replace(snapshot(seq, blocks("k", "e", [(0, MiB)]), node=node, incarnation=f"{node}-mount"),
                       dataset_incarnation=incarnation)

    async def scenario(delete_seen: bool) -> dict[str, int]:
        handlers = SchedulerHandlers(bus=None, agents=SimpleNamespace(values={}, ready=asyncio.Event()),  # type: ignore[arg-type]
                                     clock=lambda: 100.0)
        handlers.datasets_ready.set()
        delivered = Delivery(subject="s", headers={}, deliveries=1, stream_sequence=1)
        await handlers.dataset_changed(KEY, record("life-1"))
        await handlers.on_inventory(mount_snapshot("n1", 1, "life-1"), delivered)
        assert set(handlers.fold.datasets[KEY]) == {"n1"}
        if delete_seen:
            handlers.forget_dataset(KEY)
        await handlers.dataset_changed(KEY, record("life-2"))
        await handlers.on_inventory(mount_snapshot("n1", 2, "life-1"), delivered)  # the old mount, late
        await handlers.on_inventory(mount_snapshot("n2", 1, "life-2"), delivered)  # the new dataset's mount
        return {node: cache.total for node, cache in handlers.fold.datasets.get(KEY, {}).items()}

    for delete_seen in (True, False):
        assert asyncio.run(scenario(delete_seen)) == {"n2": MiB}, delete_seen


def test_kept_decisions_hold_little_when_every_question_names_other_candidates() -> None:
    """The extender asks with the nodes kube-scheduler found feasible, as full Node objects (with all their labels),
    and a different sample of them for most pods (it starts each search where the last one stopped). Keeping the
    last 1,024 such decisions held every candidate's labels and a score per candidate: ~0.3 MB a question over
    200 nodes, gigabytes on a large cluster, past the pod's memory limit. What they hold is bounded whatever the
    questions."""
    import asyncio
    import gc
    import tracemalloc
    from types import SimpleNamespace

    import msgspec

    from libs.events.schedule import Candidate, DatasetUse, ScoreRequest
    from services.scheduler.handlers import DatasetInfo, SchedulerHandlers

    nodes = 2000
    handlers = SchedulerHandlers(bus=None, agents=SimpleNamespace(values={}, ready=asyncio.Event()),  # type: ignore[arg-type]
                                 clock=lambda: 100.0)
    handlers.datasets[KEY] = DatasetInfo(total=100 * MiB, manifest_version=("", 0, 0, ""))
    handlers.datasets_ready.set()
    for index in range(0, nodes, 10):
        handlers.fold.apply(snapshot(1, blocks("k", "e", [(i, MiB) for i in range(index % 100)]),
                                     node=f"ip-10-0-{index // 250}-{index % 250}.ec2.internal"))

    def node_object(index: int) -> bytes:
        zone = f"us-east-1{'abc'[index % 3]}"
        name = f"ip-10-0-{index // 250}-{index % 250}.ec2.internal"
        labels = {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone,
                  "topology.kubernetes.io/region": "us-east-1", "node.kubernetes.io/instance-type": "m5.2xlarge",
                  "eks.amazonaws.com/nodegroup": "workers-2026-12", "eks.amazonaws.com/capacityType": "ON_DEMAND"}
        return msgspec.json.encode(Candidate(name=name, labels=labels))

    encoded = [node_object(index) for index in range(nodes)]
    decoder = msgspec.json.Decoder(list[Candidate])
    gc.collect()
    tracemalloc.start()
    try:
        for question in range(550):  # 110,000 scores: past what may be kept once
            # As decoded from a request: fresh strings every time.
            candidates = decoder.decode(b"[" + b",".join(encoded[(question * 7 + k) % nodes] for k in range(200))
                                        + b"]")
            reply = handlers.answer(ScoreRequest(datasets=[DatasetUse(name="d", namespace="ml")],
                                                 candidates=candidates, limit=0))
            assert len(reply.scores) == 200
            if tracemalloc.get_traced_memory()[0] > 128 << 20:
                break  # enough to tell, without taking the machine's memory
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 32 << 20, f"{held >> 20} MiB held after {question + 1} questions"
    # Still kept: the same question again is the same decision.
    again = handlers.answer(ScoreRequest(datasets=[DatasetUse(name="d", namespace="ml")], candidates=candidates,
                                         limit=0))
    assert again.scores is reply.scores


def test_the_sweep_forgets_agents_whose_records_expired() -> None:
    """The agents bucket's TTL removes a silent agent's record without a delete the mirror sees: the sweep drops it
    itself after AGENTS_TTL_SECONDS, with the node's cache and its name, so node churn grows no memory. A beating
    agent is kept, and so is its cache."""
    import asyncio

    from libs.bus import AGENTS_TTL_SECONDS, KvMirror
    from libs.events.agent import AgentHeartbeat, AgentRecord
    from services.scheduler.handlers import SchedulerHandlers

    now = [1000.0]
    agents = KvMirror(None, AgentRecord)  # type: ignore[arg-type]  # fed by hand, never watching
    agents.ready.set()
    handlers = SchedulerHandlers(bus=None, agents=agents, node_timeout=10.0,  # type: ignore[arg-type]
                                 clock=lambda: now[0])

    def beat(node: str) -> None:
        agents.values[node] = AgentRecord(heartbeat=AgentHeartbeat(node=node), received_at=now[0])

    for index in range(100):  # agents that came, beat once and went (no cache)
        beat(f"gone-{index}")
    beat("n1")  # the one that keeps beating, with a cache
    handlers.fold.apply(snapshot(1, blocks("k", "e", [(0, MiB)])))
    asyncio.run(handlers.sweep())
    assert len(handlers.beating) == 101
    now[0] += AGENTS_TTL_SECONDS  # not yet past it: the records stay (the bucket's TTL has not run out either)
    beat("n1")
    asyncio.run(handlers.sweep())
    assert len(agents.values) == 101
    now[0] += 1
    beat("n1")
    asyncio.run(handlers.sweep())
    assert set(agents.values) == {"n1"} and handlers.beating == {"n1"}
    assert handlers.fold.nodes() == {"n1"}
    # n1 goes silent too: its cache is forgotten after node_timeout, its record and name after the bucket's TTL.
    now[0] += 11
    asyncio.run(handlers.sweep())
    assert handlers.fold.nodes() == set() and set(agents.values) == {"n1"}
    now[0] += AGENTS_TTL_SECONDS
    asyncio.run(handlers.sweep())
    assert agents.values == {} and handlers.beating == set()


def test_a_node_without_an_agent_record_counts_only_until_the_node_timeout_after_the_start() -> None:
    """The nodes the sweep forgot live in memory: after a restart, a node whose agent went away (no record) while its
    mount processes still publish came back from their inventory as a node that never beat, which no sweep forgot.
    Until ``node_timeout`` after the start (a new agent's first beat may be on its way) such a node is taken in; from
    then on the sweep forgets it and its inventory is ignored until its agent beats, when it is asked for a
    snapshot. A node with a fresh record is kept throughout."""
    import asyncio

    from libs.bus import Delivery, KvMirror
    from libs.events.agent import AgentHeartbeat, AgentRecord
    from libs.events.common import ObjectMeta
    from libs.events.dataset import Dataset, DatasetRecord
    from services.scheduler.handlers import SchedulerHandlers

    async def scenario() -> None:
        now = [1000.0]
        agents = KvMirror(None, AgentRecord)  # type: ignore[arg-type]  # fed by hand, never watching
        agents.ready.set()
        handlers = SchedulerHandlers(bus=None, agents=agents, node_timeout=10.0,  # type: ignore[arg-type]
                                     clock=lambda: now[0])
        asked: list[str] = []

        async def ask_snapshot(node: str = "", dataset: ObjectRef | None = None) -> None:
            asked.append(node)

        handlers.ask_snapshot = ask_snapshot  # type: ignore[method-assign]
        handlers.datasets_ready.set()
        dataset = Dataset(metadata=ObjectMeta(name="d", namespace="ml"))
        await handlers.dataset_changed(KEY, DatasetRecord(dataset=dataset, generation=1))
        delivered = Delivery(subject="s", headers={}, deliveries=1, stream_sequence=1)

        def beat(node: str) -> None:
            agents.values[node] = AgentRecord(heartbeat=AgentHeartbeat(node=node), received_at=now[0])

        beat("alive")
        await handlers.on_inventory(snapshot(1, blocks("k", "e", [(0, MiB)]), node="alive"), delivered)
        await handlers.on_inventory(snapshot(1, blocks("k", "e", [(0, MiB)]), node="ghost"), delivered)
        await handlers.sweep()
        assert handlers.fold.nodes() == {"alive", "ghost"}  # within the node timeout of the start
        now[0] += 10
        beat("alive")
        await handlers.sweep()
        assert handlers.fold.nodes() == {"alive"} and list(handlers.gone) == ["ghost"]
        await handlers.on_inventory(delta(2, blocks("k", "e", [(1, MiB)]), node="ghost"), delivered)
        await handlers.on_inventory(snapshot(1, blocks("k", "e", [(0, MiB)]), node="stranger"), delivered)
        assert handlers.fold.nodes() == {"alive"} and handlers.counts["inventory_node_gone"] == 2
        assert list(handlers.gone) == ["ghost", "stranger"]
        beat("stranger")  # a new agent whose first beat came after its mount's first snapshot: asked for it
        await handlers.sweep()
        assert asked == ["stranger"] and list(handlers.gone) == ["ghost"]
        await handlers.on_inventory(snapshot(2, blocks("k", "e", [(0, MiB)]), node="stranger"), delivered)
        assert handlers.fold.nodes() == {"alive", "stranger"}

    asyncio.run(scenario())


def held_recounted(state: CacheFold) -> dict[tuple[str, str], dict[str, int]]:
    """What ``CacheFold.held`` must be: every node cache's ``current`` bytes, nodes holding none left out."""
    return {key: {node: cache.current for node, cache in nodes.items() if cache.current > 0}
            for key, nodes in state.datasets.items()}


def take_step(state: CacheFold, step: str, catalog: Catalog) -> None:
    """A step of the property tests that is no event: the catalog set or dropped, n1 or the dataset forgotten."""
    if step == "catalog":
        state.set_catalog(KEY, catalog)
    elif step == "no catalog":
        state.set_catalog(KEY, None)
    elif step == "forget n1":
        state.forget_node("n1")
    else:
        assert step == "forget dataset", step
        state.forget_dataset(KEY)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(events(), st.sampled_from(["catalog", "no catalog", "forget n1", "forget dataset"])),
                max_size=25))
def test_the_held_bytes_kept_as_events_arrive_equal_a_recount(sequence: list[Inventory | str]) -> None:
    """``held`` (what decisions read) is kept incrementally; after any events, catalog changes and forgetting, it
    equals a recount of the node caches (empty maps aside)."""
    state = CacheFold()
    catalog = Catalog([entry("/a", "a", 8, etag="e"), entry("/b", "b", 8, etag="other")])
    for step in sequence:
        if isinstance(step, str):
            take_step(state, step, catalog)
        else:
            state.apply(step)
        held = {key: nodes for key, nodes in state.held.items() if nodes}
        assert held == {key: nodes for key, nodes in held_recounted(state).items() if nodes}


OTHER = ObjectRef(name="e", namespace="ml")
OTHER_KEY = ("ml", "e")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.tuples(events(), st.booleans()),
                          st.sampled_from(["catalog", "no catalog", "forget n1", "forget dataset", "n3 beats"])),
                max_size=30))
def test_what_the_live_view_keeps_and_patches_equals_a_fresh_read(sequence: list[tuple[Inventory, bool] | str]) -> None:
    """The live view keeps each dataset's column and the sum of the requested datasets' columns, and patches them
    from the fold's moves; read after every step (so patches are taken), they equal a fresh view's, and the whole
    files kept per node and the published unique bytes equal a recount. So do the zones' and regions' best holders
    and the nodes' keys scoring derives from a kept sum, patched where it moved. The fold remembers only 2 moves
    here, so readers that fall behind the dropped ones read every node again, and readers that keep up patch across
    the drops."""
    kept_moves, fold_module.MOVES_KEPT = fold_module.MOVES_KEPT, 2
    try:
        live_view_steps(sequence)
    finally:
        fold_module.MOVES_KEPT = kept_moves


def live_view_steps(sequence: list[tuple[Inventory, bool] | str]) -> None:
    state = CacheFold()
    catalog = Catalog([entry("/a", "a", 8, etag="e"), entry("/b", "b", 8, etag="other")])
    alive = ["n1"]
    table = {"n1": {"zone": "z1", "region": "r1"}, "n2": {"zone": "z1", "region": "r1"}, "n3": {"region": "r1"}}
    labels = lambda node: table.get(node, {})  # noqa: E731
    kept = LiveView(state, {KEY: 10, OTHER_KEY: 6}, labels, lambda: alive, lambda: len(alive))
    parts = ((KEY, (), 10), (OTHER_KEY, (), 6))
    for step in sequence:
        if step == "n3 beats":
            alive.append("n3")
        elif isinstance(step, str):
            take_step(state, step, catalog)
        else:
            assert not isinstance(step, str)
            event, other = step
            state.apply(replace(event, dataset=OTHER) if other else event)
        places = kept.places("zone", "region")
        fresh = LiveView(state, {KEY: 10, OTHER_KEY: 6}, labels, lambda: alive)
        fresh_places = fresh.places("zone", "region")
        assert places.nodes == fresh_places.nodes
        for key in (KEY, OTHER_KEY):
            assert kept.column(key, (), places) == fresh.column(key, (), fresh_places)
        for asked in (parts, parts[1:]):
            sums, fresh_sums = kept.known(asked, places), fresh.known(asked, fresh_places)
            assert list(sums.column) == list(fresh_sums.column)
            requested = sum(cap for _, _, cap in asked)
            assert _derive(sums, places, requested) == _derive(fresh_sums, fresh_places, requested)
        # Scoring keeps its terms with a kept sum and drops those of the groups whose best holders moved: the
        # answers equal a fresh view's (which keeps nothing) after every step.
        for uses in ([DatasetUse(name="d", namespace="ml"), DatasetUse(name="e", namespace="ml")],
                     [DatasetUse(name="e", namespace="ml")]):
            asking = ScoreRequest(id="q", datasets=uses, limit=0)
            assert score(asking, kept, Weights(zone_label="zone", region_label="region")) == score(
                asking, fresh, Weights(zone_label="zone", region_label="region"))
        for node in places.nodes:
            cache = state.datasets.get(KEY, {}).get(node)
            recount = 0 if cache is None or KEY not in state.catalogs else sum(
                1 for file, held in cache.files.items()
                if (size := state.catalogs[KEY].size(file)) is not None and sum(held.values()) == size)
            assert state.whole_files(KEY, node) == recount
        # What decisions read counts each file of the catalog up to its size (the events claim up to 24 bytes of
        # these 8-byte files).
        for key in (KEY, OTHER_KEY):
            assert kept.column(key, (), places)[0] == [capped_recount(state, key, node) for node in places.nodes]
            # What is published counts each file's blocks, each once, up to its size, taken from the nodes that
            # moved since it was last counted: a recount of every held file says the same.
            assert state.published_unique(key) == capped_union(state, key)


def capped_union(state: CacheFold, key: tuple[str, str]) -> int:
    """The bytes of the dataset's current files that any node holds, each block once and each file up to its size
    (every version as held without a catalog)."""
    catalog = state.catalogs.get(key)
    files = state.holders.get(key, {})
    if catalog is None:
        return sum(size for shared in files.values() for _, size in shared.values())
    return sum(min(sum(size for _, size in shared.values()), whole) for file, shared in files.items()
               if (whole := catalog.size(file)) is not None)


def capped_recount(state: CacheFold, key: tuple[str, str], node: str) -> int:
    """A node's bytes of the dataset's current files, each file up to its size (every version without a catalog)."""
    cache = state.datasets.get(key, {}).get(node)
    catalog = state.catalogs.get(key)
    if cache is None:
        return 0
    if catalog is None:
        return sum(sum(blocks.values()) for blocks in cache.files.values())
    return sum(min(sum(blocks.values()), size) for file, blocks in cache.files.items()
               if (size := catalog.size(file)) is not None)


# --- each block once: the bytes of the dataset in the cache, however many nodes hold a block ---


def test_a_block_on_two_nodes_counts_once_in_the_unique_bytes() -> None:
    """A DataLoad with ``replicas: 2`` puts the same blocks on two nodes: the nodes' bytes add up to twice what is
    cached of the dataset, the unique bytes do not."""
    state = CacheFold()
    state.set_catalog(KEY, CATALOG)  # 6 MiB + 10 bytes in all
    a = blocks("train/a.bin", "e1", [(0, MiB), (1, MiB)])
    state.apply(snapshot(1, a, node="n1"))
    state.apply(snapshot(1, a, node="n2"))
    assert state.held[KEY] == {"n1": 2 * MiB, "n2": 2 * MiB}
    assert state.unique[KEY] == 2 * MiB
    assert state.holders[KEY][(0, "train/a.bin", "e1")] == {0: (2, MiB), 1: (2, MiB)}
    # One copy evicted: still cached. A block of an old version, on one node: held, but not of the dataset.
    state.apply(delta(2, [*blocks("train/b.bin", "e1", [(0, MiB)]), *blocks("val/c.bin", "old", [(0, MiB)])],
                      blocks("train/a.bin", "e1", [(1, MiB)]), node="n1"))
    assert state.unique[KEY] == 3 * MiB
    # A resync whose manifest has c.bin at version "old": now it counts.
    state.set_catalog(KEY, Catalog([entry("/train/a.bin", "train/a.bin", 2 * MiB + 10),
                                    entry("/val/c.bin", "val/c.bin", 3 * MiB, etag="old")]))
    assert state.unique[KEY] == 3 * MiB  # a.bin's two blocks and c.bin's (b.bin left the manifest)
    state.forget_node("n2")  # its agent went away: a.bin's block 1 with it
    assert state.unique[KEY] == 2 * MiB
    state.apply(snapshot(3, [], node="n1"))  # a snapshot of an empty cache replaces what n1 held
    assert KEY not in state.unique and KEY not in state.holders
    state.apply(snapshot(4, a, node="n1"))
    state.forget_dataset(KEY)
    assert KEY not in state.unique and KEY not in state.holders


def consistent(event: Inventory) -> Inventory:
    """``event`` with each block's size a function of its file and index, as blocks that partition a file are, and
    counters of its own (the node's ``cachedBytes``, which the fold sums apart from the blocks)."""
    def sized(files: list[CachedFile]) -> list[CachedFile]:
        return [replace(file, blocks=[(index, 1 + (index + len(file.key)) % 4) for index, _ in file.blocks])
                for file in files]

    counters = CacheCounters(cached_bytes=3 * event.seq + (event.node == "n2"))
    if isinstance(event, InventorySnapshot):
        return replace(event, files=sized(event.files), counters=counters)
    return replace(event, cached=sized(event.cached), evicted=sized(event.evicted), counters=counters)


def union_bytes(state: CacheFold, key: tuple[str, str]) -> int:
    """The bytes of the union of every node's blocks of current file versions: each block once."""
    catalog = state.catalogs.get(key)
    union = {(file, index): size for cache in state.datasets.get(key, {}).values()
             for file, held in cache.files.items() if catalog is None or file in catalog
             for index, size in held.items()}
    return sum(union.values())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.tuples(events(), st.booleans()),
                          st.sampled_from(["catalog", "no catalog", "forget n1", "forget dataset"])), max_size=30))
def test_the_unique_bytes_kept_as_events_arrive_equal_the_bytes_of_the_union(
        sequence: list[tuple[Inventory, bool] | str]) -> None:
    """For any events of two nodes over two datasets (gaps, parts out of order, new incarnations, redeliveries),
    catalog changes and forgetting: ``unique`` is the bytes of the union of every node's blocks, ``holders`` counts
    the nodes holding each block, ``reported`` is the nodes' own ``cachedBytes`` summed (what the dataset service's
    ``cached`` is), and nothing is kept for a dataset none holds."""
    state = CacheFold()
    catalog = Catalog([entry("/a", "a", 8, etag="e"), entry("/b", "b", 8, etag="other")])
    for step in sequence:
        if isinstance(step, str):
            take_step(state, step, catalog)
        else:
            event, other = step
            state.apply(consistent(replace(event, dataset=OTHER) if other else event))
        for key in (KEY, OTHER_KEY):
            assert state.unique.get(key, 0) == union_bytes(state, key)
            assert state.reported.get(key, 0) == sum(cache.position.counters.cached_bytes
                                                     for cache in state.datasets.get(key, {}).values())
            counted: dict[tuple[FileKey, int], int] = {}
            for cache in state.datasets.get(key, {}).values():
                for file, held in cache.files.items():
                    for index in held:
                        counted[(file, index)] = counted.get((file, index), 0) + 1
            kept = {(file, index): holding for file, shared in state.holders.get(key, {}).items()
                    for index, (holding, _) in shared.items()}
            assert kept == counted
        assert all(state.unique.values()) and all(state.holders.values()) and all(state.reported.values())
