"""The agent's pure pieces: the tree from a manifest, the read-ahead window and budget, inventory numbering,
and which mounts a node wants. (The inventory fold is tested in test_inventory.py.)"""

from __future__ import annotations

from libs.events.agent import BlockId, CacheCounters
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetStatus, ManifestEntry
from libs.events.runtime import Runtime, RuntimeRecord
from services.agent import domain as agent_domain
from services.agent.inventory import SNAPSHOT_PART_BLOCKS, InventoryLog
from services.agent.namespace import ROOT_INODE, InodeAllocator, Namespace
from services.agent.readahead import MemoryBudget, ReadAhead


def entry(path: str, etag: str = "e1", size: int = 10) -> ManifestEntry:
    return ManifestEntry(path=path, mount=0, key=path.lstrip("/"), size=size, etag=etag, mtime=1.0)


# --- namespace ---


def test_tree_has_folders_files_and_sizes() -> None:
    tree = Namespace.build([entry("/a/b/c.txt", size=3), entry("/a/d.txt", size=4), entry("/top")],
                           InodeAllocator())
    a = tree.lookup(ROOT_INODE, "a")
    assert a is not None and a.is_dir
    assert [n.name for n in tree.children(a.inode)] == ["b", "d.txt"]
    b = tree.lookup(a.inode, "b")
    assert b is not None
    c = tree.lookup(b.inode, "c.txt")
    assert c is not None and c.size == 3 and c.entry is not None
    assert tree.lookup(ROOT_INODE, "missing") is None
    assert tree.lookup(c.inode, "x") is None  # a file has no children
    assert tree.total_bytes == 3 + 4 + 10


def test_unusable_paths_are_left_out() -> None:
    tree = Namespace.build([entry("/ok"), entry("/../escape"), entry("/a/./b"), entry("/a//b"),
                            entry("/" + "x" * 256), entry("/f"), entry("/f/inside")], InodeAllocator())
    names = {n.name for n in tree.children(ROOT_INODE)}
    assert names == {"ok", "f"}
    f = tree.lookup(ROOT_INODE, "f")
    assert f is not None and f.is_dir  # "f/inside" makes "f" a folder, which shadows the file "f"


def test_inodes_are_stable_for_unchanged_files_and_new_for_changed_ones() -> None:
    allocator = InodeAllocator()
    first = Namespace.build([entry("/same"), entry("/changed", "v1")], allocator)
    second = Namespace.build([entry("/same"), entry("/changed", "v2")], allocator)
    same1, same2 = first.lookup(ROOT_INODE, "same"), second.lookup(ROOT_INODE, "same")
    old, new = first.lookup(ROOT_INODE, "changed"), second.lookup(ROOT_INODE, "changed")
    assert same1 is not None and same2 is not None and same1.inode == same2.inode
    assert old is not None and new is not None and old.inode != new.inode


# --- read-ahead ---


def test_window_doubles_while_sequential_and_resets_on_a_jump() -> None:
    ahead = ReadAhead(max_blocks=8)
    windows = [ahead.on_read(i * 100, 100) for i in range(6)]
    assert windows == [1, 2, 4, 8, 8, 8]
    assert ahead.on_read(10_000, 100) == 0
    assert not ahead.sequential
    assert ahead.on_read(10_100, 100) == 1


def test_budget_is_shared_and_never_negative() -> None:
    budget = MemoryBudget(limit=10)
    assert budget.try_take(6) and not budget.try_take(5) and budget.try_take(4)
    budget.give_back(20)
    assert budget.used == 0


# --- inventory numbering ---


def block(i: int) -> BlockId:
    return BlockId(0, "k", "e", i)


def test_snapshot_then_consecutive_deltas_and_nothing_when_idle() -> None:
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"))
    counters = CacheCounters(cached_bytes=1)
    parts = log.snapshot([(block(i), 1) for i in range(SNAPSHOT_PART_BLOCKS + 1)], counters)
    assert [(p.seq, p.part, p.parts) for p in parts] == [(1, 1, 2), (2, 2, 2)]
    assert log.delta(counters) is None
    log.cached(block(99), 5)
    log.evicted(block(1), 1)
    delta = log.delta(CacheCounters(cached_bytes=5))
    assert delta is not None and delta.seq == 3
    assert [b.block for b in delta.cached] == [block(99)] and [b.block for b in delta.evicted] == [block(1)]
    log.cached(block(7), 1)
    log.evicted(block(7), 1)  # cached and gone again within one batch: nothing to tell
    assert log.delta(CacheCounters(cached_bytes=5)) is None


# --- which mounts a node wants ---


def record(name: str, phase: str = "Bound", manifest: str = "m") -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name=name)), generation=1,
                         status=DatasetStatus(phase=phase, manifest=manifest))  # type: ignore[arg-type]


def test_bound_datasets_of_served_runtimes_are_mounted() -> None:
    runtimes = [RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name=n)), generation=1) for n in ("a", "b")]
    served = agent_domain.served_runtimes(runtimes, ["default/a"])
    assert served == [("default", "a")]
    assert agent_domain.served_runtimes(runtimes, []) == [("default", "a"), ("default", "b")]
    datasets = [record("a"), record("b"), record("c")]
    assert agent_domain.wanted_mounts(datasets, served) == {("default", "a")}
    assert agent_domain.wanted_mounts([record("a", phase="NotBound")], served) == set()
    assert agent_domain.wanted_mounts([record("a", manifest="")], served) == set()
