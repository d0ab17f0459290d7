"""The agent's pure pieces: the tree from a manifest, the read-ahead window and budget, inventory numbering,
and which mounts a node wants. (The inventory fold is tested in test_inventory.py.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest

from libs.bus import MESSAGE_LIMIT
from libs.config import AgentSettings, Settings
from libs.events.agent import (
    AgentHeartbeat,
    BlockId,
    CacheCounters,
    CachedBlock,
    InventoryDelta,
    InventoryDeltaV1,
    InventorySnapshot,
    InventorySnapshotV1,
    MountReadFailures,
    ReadFailure,
    group_mounts,
    peer_url,
    upgrade,
)
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetStatus, ManifestEntry
from libs.events.runtime import Level, Runtime, RuntimeRecord
from services.agent import domain as agent_domain
from services.agent.app import tier_disks
from services.agent.inventory import InventoryLog
from services.agent.mountd import fuse_unavailable
from services.agent.mountstatus import FAILED_MAX_CHARS, fatal_status
from services.agent.namespace import ROOT_INODE, InodeAllocator, Namespace
from services.agent.readahead import MemoryBudget, ReadAhead
from tests.helpers import agent_shaped_heartbeat


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


def test_the_allocator_keeps_only_the_last_trees_identities_and_never_reuses_a_number() -> None:
    allocator = InodeAllocator()
    seen: set[int] = set()
    for version in range(50):  # a file that changes at every sync, next to one that never does
        tree = Namespace.build([entry("/stable"), entry("/log", f"v{version}")], allocator)
        log_node = tree.lookup(ROOT_INODE, "log")
        assert log_node is not None and log_node.inode not in seen
        seen.add(log_node.inode)
    assert allocator.last is tree and len(tree) == 3  # the root, /stable and the last /log
    stable = Namespace.build([entry("/stable")], allocator).lookup(ROOT_INODE, "stable")
    again = Namespace.build([entry("/stable"), entry("/log", "v0")], allocator).lookup(ROOT_INODE, "log")
    assert stable is not None and stable.inode == tree.lookup(ROOT_INODE, "stable").inode  # type: ignore[union-attr]
    assert again is not None and again.inode not in seen  # a version gone and back is a new inode, never an old one


def test_a_new_tree_names_the_entries_gone_and_the_inodes_whose_attributes_changed() -> None:
    # The kernel keeps names and attributes until told (fs.ENTRY_TIMEOUT), so this list is all it is told.
    from services.agent.fs import DatasetFS

    allocator = InodeAllocator()
    local = ManifestEntry(path="/d/local", mount=0, key="d/local", size=1, etag="l1", mtime=1.0, mode=0o644)
    first = Namespace.build([entry("/same"), entry("/changed", "v1"), entry("/d/gone"), local], allocator)
    fs = DatasetFS(first, reader=None, uid=None, gid=None, block_size=4096)  # type: ignore[arg-type]
    chmodded = msgspec.structs.replace(local, mode=0o600)  # same ETag (size and mtime): same inode
    newer = ManifestEntry(path="/d/new", mount=0, key="d/new", size=1, etag="n", mtime=5.0)
    second = Namespace.build([entry("/same"), entry("/changed", "v2"), chmodded, newer], allocator)
    folder = first.lookup(ROOT_INODE, "d")
    kept = first.lookup(folder.inode if folder else 0, "local")
    assert folder is not None and kept is not None

    gone, changed, relisted = fs.replace_namespace(second)

    assert sorted(gone) == sorted([(ROOT_INODE, "changed"), (folder.inode, "gone")])
    # the folders' mtimes (the root's too) follow their newest file; the local file's mode changed under the same
    # inode
    assert sorted(changed) == sorted([ROOT_INODE, folder.inode, kept.inode])
    # "changed" got a new inode in the root; "gone" left and "new" came in the folder
    assert relisted == sorted([ROOT_INODE, folder.inode])
    assert fs.namespace is second
    assert fs.replace_namespace(second) == ([], [], [])


def test_a_reload_finds_the_objects_gone_from_what_changed_not_from_every_entry() -> None:
    # ``mountd._drop_stale`` deletes the cached blocks of these: the files removed or at another ETag, a mount's
    # objects now at another position (mount 0 removed: mount 1's files are mount 0's now, whose blocks must not be
    # lent to them), and an entry left out of the tree that went away; nothing kept whose (mount, key, ETag) stays.
    from services.agent.fs import tree_changes
    from services.agent.mountd import gone_objects

    def at(mount: int, path: str, etag: str = "e") -> ManifestEntry:
        return ManifestEntry(path=f"/m{mount}{path}", mount=mount, key=path[1:], size=1, etag=etag, mtime=1.0)

    allocator = InodeAllocator()
    left_out = ManifestEntry(path="/m0/bad//name", mount=0, key="bad//name", size=1, etag="b", mtime=1.0)
    first = Namespace.build([at(0, "/x.bin", "a"), at(0, "/same"), at(0, "/gone"), at(0, "/changed", "v1"),
                             at(1, "/y.bin", "y"), left_out], allocator)
    assert list(first.entries_apart()) == [left_out]
    second = Namespace.build([at(0, "/x.bin", "a"), at(0, "/same"), at(0, "/changed", "v2"),
                              msgspec.structs.replace(at(1, "/y.bin", "y"), mount=2)], allocator)

    assert gone_objects(tree_changes(first, second), second) == {
        (0, "gone", "e"), (0, "changed", "v1"), (1, "y.bin", "y"), (0, "bad//name", "b")}
    third = Namespace.build([at(0, "/x.bin", "a"), at(0, "/same"), at(0, "/changed", "v2"),
                             msgspec.structs.replace(at(1, "/y.bin", "y"), mount=2)], allocator)
    assert gone_objects(tree_changes(second, third), third) == set()


def test_a_start_keeps_the_cached_blocks_its_tree_serves_at_their_length_and_deletes_the_others() -> None:
    from services.agent.cache import BlockCache, MemoryTier
    from services.agent.mountd import MountedDataset
    from tests.helpers import make_settings

    size = 100
    same, changed = (ManifestEntry(path=f"/{name}", mount=0, key=name, size=size, etag="e1", mtime=1.0)
                     for name in ("same", "changed"))
    tree = Namespace.build([same, msgspec.structs.replace(changed, etag="e2")], InodeAllocator())
    cache = BlockCache([MemoryTier(1 << 20)])
    kept = BlockId(0, "same", "e1", 0)
    stale = [BlockId(0, "changed", "e1", 0), BlockId(0, "gone", "e1", 0), BlockId(1, "same", "e1", 0)]
    misfit = BlockId(0, "changed", "e2", 0)
    for block, length in [(kept, size), *((block, size) for block in stale), (misfit, size - 1)]:
        assert cache.put(block, b"x" * length)
    mounted = MountedDataset(make_settings("nats://127.0.0.1:1"), None, "default", "d", "/nonexistent")  # type: ignore[arg-type]
    try:
        mounted._prune_cache(cache, tree, block_size=4096)
    finally:
        mounted.metrics.close()
    assert cache.blocks() == [(kept, size)]


def test_a_tree_keeps_the_listings_nanoseconds_and_its_folders_the_latest_of_them() -> None:
    # 1796613619.813174285 as a float is 1796613619.8131742 (…272 ns): the exact time travels beside it.
    exact = ManifestEntry(path="/d/local", mount=0, key="d/local", size=1, etag="l", mtime=1796613619.813174285,
                          mtime_ns=1_796_613_619_813_174_285)
    later = ManifestEntry(path="/d/later", mount=0, key="d/later", size=1, etag="m", mtime=1796613619.813174286,
                          mtime_ns=1_796_613_619_813_174_290)
    tree = Namespace.build([exact, later, entry("/s3")], InodeAllocator())
    folder = tree.lookup(ROOT_INODE, "d")
    assert folder is not None
    assert tree.lookup(folder.inode, "local").mtime_ns == 1_796_613_619_813_174_285  # type: ignore[union-attr]
    root = tree.get(ROOT_INODE)
    assert root is not None and folder.mtime_ns == root.mtime_ns == 1_796_613_619_813_174_290
    assert tree.lookup(ROOT_INODE, "s3").mtime_ns == 1_000_000_000  # type: ignore[union-attr]  # seconds only


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
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"), part_bytes=1000)
    counters = CacheCounters(cached_bytes=1)
    parts = log.snapshot([(block(i), 1) for i in range(200)], counters)
    assert len(parts) > 1
    assert [(p.seq, p.part, p.parts) for p in parts] == [(i, i, len(parts)) for i in range(1, len(parts) + 1)]
    assert sorted(b.block.index for p in parts for b in p.cached_blocks()) == list(range(200))
    assert log.delta(counters) == []
    log.cached(block(99), 5)
    log.evicted(block(1), 1)
    [delta] = log.delta(CacheCounters(cached_bytes=5))
    assert delta.seq == len(parts) + 1
    assert [b.block for f in delta.cached for b in f.cached_blocks()] == [block(99)]
    assert [b.block for f in delta.evicted for b in f.cached_blocks()] == [block(1)]
    log.cached(block(1), 1)
    log.evicted(block(1), 1)  # back and gone again within one batch: still gone for whoever held it before
    [delta] = log.delta(CacheCounters(cached_bytes=5))
    assert not delta.cached
    assert [b.block for f in delta.evicted for b in f.cached_blocks()] == [block(1)]
    assert log.delta(CacheCounters(cached_bytes=5)) == []


def long_key(i: int) -> str:
    return f"{i:05d}/" + "k" * 794  # 800 characters, like the keys that broke the 1 MiB limit


def test_snapshot_parts_stay_under_the_payload_limit_with_thousands_of_long_keys() -> None:
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"))
    blocks = [(BlockId(0, long_key(i), "e" * 32, 0), 65536) for i in range(3000)]
    parts = log.snapshot(blocks, CacheCounters())
    sizes = [len(msgspec.json.encode(p)) for p in parts]
    assert len(parts) > 1 and max(sizes) <= MESSAGE_LIMIT - 32 * 1024, sizes
    assert {b.block for p in parts for b in p.cached_blocks()} == {b for b, _ in blocks}
    assert [p.seq for p in parts] == list(range(1, len(parts) + 1))


def test_a_key_is_written_once_per_object_not_once_per_block() -> None:
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"))
    blocks = [(BlockId(0, long_key(1), "e" * 32, i), 65536) for i in range(20_000)]
    [part] = log.snapshot(blocks, CacheCounters())
    assert len(msgspec.json.encode(part)) < 20_000 * 20
    assert part.cached_blocks() == [CachedBlock(block=b, size=s) for b, s in blocks]


def test_one_object_with_more_blocks_than_a_part_holds_is_split_across_parts() -> None:
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"), part_bytes=2000)
    blocks = [(BlockId(0, long_key(1), "e", i), 1) for i in range(1000)]
    parts = log.snapshot(blocks, CacheCounters())
    assert len(parts) > 1 and all(len(msgspec.json.encode(p.files)) <= 2000 for p in parts)
    assert [b.block for p in parts for b in p.cached_blocks()] == [b for b, _ in blocks]


def test_a_large_delta_is_cut_into_consecutive_events() -> None:
    log = InventoryLog(node="n", dataset=ObjectRef(name="d"))
    log.snapshot([], CacheCounters())
    for i in range(3000):
        log.cached(BlockId(0, long_key(i), "e" * 32, 0), 1)
    for i in range(3000, 4000):
        log.evicted(BlockId(0, long_key(i), "e" * 32, 0), 1)
    deltas = log.delta(CacheCounters())
    assert len(deltas) > 1 and [d.seq for d in deltas] == list(range(2, len(deltas) + 2))
    assert max(len(msgspec.json.encode(d)) for d in deltas) <= MESSAGE_LIMIT - 32 * 1024
    assert sum(len(d.cached) for d in deltas) == 3000 and sum(len(d.evicted) for d in deltas) == 1000


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


def test_mount_reports_say_serving_starting_or_failing() -> None:
    ref = ObjectRef(name="d")
    assert agent_domain.mount_report(ref, alive=True, mounted=True, exit_code=None, failures=0).state == "Serving"
    assert agent_domain.mount_report(ref, alive=True, mounted=False, exit_code=None, failures=0).state == "Starting"
    failing = agent_domain.mount_report(ref, alive=False, mounted=False, exit_code=1, failures=3)
    assert failing.state == "Failing" and "exited with code 1 (3 times in a row)" in failing.message
    restarted = agent_domain.mount_report(ref, alive=True, mounted=False, exit_code=-9, failures=1)
    assert restarted.state == "Starting" and "-9" in restarted.message


def test_a_start_abandoned_at_its_deadline_is_failing_until_a_new_start_is_under_way() -> None:
    ref = ObjectRef(name="d")
    stalled = agent_domain.stalled_start(120.0, "loading the cache")
    assert stalled == "did not start within 120 s (it was loading the cache)"
    assert agent_domain.stalled_start(2.5, "") == "did not start within 2.5 s"
    # Being stopped (not alive any more to the report), then waiting for its restart: Failing, saying why.
    for exit_code in (None, 0, -9):
        failing = agent_domain.mount_report(ref, alive=False, mounted=False, exit_code=exit_code, failures=1,
                                            stalled=stalled)
        assert failing.state == "Failing"
        assert failing.message == f"mount process {stalled}; stopped, restarting with backoff"
    restarted = agent_domain.mount_report(ref, alive=True, mounted=False, exit_code=0, failures=1, stalled=stalled)
    assert restarted.state == "Starting" and restarted.message == f"mount process restarted after it {stalled}; loading"
    serving = agent_domain.mount_report(ref, alive=True, mounted=True, exit_code=0, failures=1, stalled=stalled)
    assert serving.state == "Serving"


# --- inventory wire versions ---


def test_v1_inventory_events_upgrade_to_v2_with_the_same_blocks() -> None:
    blocks = [CachedBlock(block=BlockId(0, "a", "e", i), size=4) for i in (1, 0)] + [
        CachedBlock(block=BlockId(1, "b", "f", 0), size=2)]
    old = InventorySnapshotV1(id="x", node="n", dataset=ObjectRef(name="d"), incarnation="i", seq=3, part=1,
                              parts=2, blocks=blocks, counters=CacheCounters(cached_bytes=10))
    new = upgrade(old)
    assert isinstance(new, InventorySnapshot)
    assert (new.id, new.seq, new.part, new.parts, new.counters) == ("x", 3, 1, 2, old.counters)
    assert sorted(new.cached_blocks(), key=str) == sorted(blocks, key=str)
    assert [(f.key, f.blocks) for f in new.files] == [("a", [(0, 4), (1, 4)]), ("b", [(0, 2)])]
    delta = upgrade(InventoryDeltaV1(node="n", dataset=ObjectRef(name="d"), incarnation="i", seq=4,
                                     cached=blocks[:1], evicted=blocks[2:]))
    assert isinstance(delta, InventoryDelta)
    assert [(f.key, f.blocks) for f in delta.cached] == [("a", [(1, 4)])]
    assert [(f.key, f.blocks) for f in delta.evicted] == [("b", [(0, 2)])]
    assert upgrade(new) is new


def test_a_serving_mount_reports_its_peer_url_and_blocks_live_below_the_cache_subdir() -> None:
    ref = ObjectRef(name="d")
    assert peer_url("127.0.0.1", 4100) == "http://127.0.0.1:4100"
    assert peer_url("::1", 4100) == "http://[::1]:4100"
    assert peer_url("127.0.0.1", 0) == ""
    serving = agent_domain.mount_report(ref, alive=True, mounted=True, exit_code=None, failures=0,
                                        peer_url="http://127.0.0.1:4100")
    assert serving.peer_url == "http://127.0.0.1:4100"
    starting = agent_domain.mount_report(ref, alive=True, mounted=False, exit_code=None, failures=0,
                                         peer_url="http://127.0.0.1:4100")
    assert starting.peer_url == ""  # its peer server is not answering yet
    assert agent_domain.cache_suffix("", "default", "d") == "default/d"
    assert agent_domain.cache_suffix("node-2", "default", "d") == "node-2/default/d"


@pytest.mark.parametrize(("subdir", "folder"), [("", ""), ("node-2", "node-2"), ("agents/node-2/", "agents/node-2"),
                                                ("./node-2", "node-2"), ("agents//node-2", "agents/node-2")])
def test_one_spelling_of_the_cache_folder_for_the_agent_and_its_mount_processes(subdir: str, folder: str) -> None:
    # The agent (freeing a deleted dataset's blocks) and the mount process (writing them) each built the folder
    # their own way, so they could disagree. Both use these: the mount process has no cache_suffix of its own.
    assert agent_domain.cache_folder(subdir) == folder
    assert agent_domain.cache_suffix(subdir, "ns", "x") == (f"{folder}/ns/x" if folder else "ns/x")
    from services.agent import mountd

    assert getattr(mountd, "cache_suffix", None) is agent_domain.cache_suffix


# --- heartbeat size ---

EVENT_LIMIT = 256 * 1024  # SHOAL_MAX_EVENT_BYTES' default: what the runtime service accepts


def test_a_heartbeat_for_5000_datasets_fits_the_event_limit_and_says_everything() -> None:
    beat, reports = agent_shaped_heartbeat(5000)
    # One report per mount and every runtime listed (what agents sent before) would be refused.
    old = msgspec.structs.replace(beat, mounts=reports, mount_groups=[])
    assert len(msgspec.json.encode(old)) > EVENT_LIMIT
    sent, left_out = agent_domain.fit_heartbeat(beat, EVENT_LIMIT)
    encoded = msgspec.json.encode(sent)
    assert left_out == 0 and len(encoded) <= EVENT_LIMIT
    received = msgspec.json.decode(encoded, type=AgentHeartbeat)
    assert received.all_runtimes and received.serves("vision", "anything") and received.mount_count() == 5000
    for report in reports:
        assert received.mount_of(report.dataset.namespace, report.dataset.name) == report
    assert sorted(received.mount_reports(), key=lambda r: r.dataset.name) == sorted(reports,
                                                                                    key=lambda r: r.dataset.name)
    assert len(received.problems) == agent_domain.MAX_PROBLEMS and received.problems[-1] == "and 81 more problems"


@pytest.mark.parametrize(("count", "name_length"), [(1, 20), (1000, 20), (5000, 20), (5000, 63), (20000, 20),
                                                    (5000, 253)])
def test_a_heartbeat_never_exceeds_the_event_limit_and_grows_by_a_name_and_a_port_per_mount(
        count: int, name_length: int) -> None:
    beat, reports = agent_shaped_heartbeat(count, name_length)
    sent, left_out = agent_domain.fit_heartbeat(beat, EVENT_LIMIT)
    assert len(msgspec.json.encode(sent)) <= EVENT_LIMIT
    assert sent.mount_count() + left_out == count
    # Per mount: its name, its port and a few bytes of JSON; the rest does not grow with the node's mounts.
    fixed = len(msgspec.json.encode(msgspec.structs.replace(beat, runtimes=[], mount_groups=[])))
    per_mount = name_length + len(str(40000 + count)) + 4
    groups = len(sent.mount_groups) * 120
    assert len(msgspec.json.encode(msgspec.structs.replace(sent, runtimes=[]))) <= fixed + groups + count * per_mount
    if left_out:  # serving mounts go first: those not serving are what status must show
        kept = {(r.dataset.namespace, r.dataset.name) for r in sent.mount_reports()}
        assert all((r.dataset.namespace, r.dataset.name) in kept for r in reports if r.state == "Failing")
        assert not sent.runtimes and sent.all_runtimes
    # An unhealthy mount is never left out while a healthy one is in: its runtime would take the node as healthy.
    for report in reports:
        if report.unhealthy:
            found = sent.mount_of(report.dataset.namespace, report.dataset.name)
            assert found is not None and found.unhealthy
            assert not sent.healthy_for(report.dataset.namespace, report.dataset.name)


def test_a_starting_mount_left_out_before_an_unhealthy_serving_one() -> None:
    ref = ObjectRef(name="sick", namespace="default")
    sick = agent_domain.mount_report(ref, alive=True, mounted=True, exit_code=None, failures=0, unhealthy=True,
                                     peer_url="http://10.0.0.1:1")
    starting = agent_domain.mount_report(ObjectRef(name="s" * 200, namespace="default"), alive=True, mounted=False,
                                         exit_code=None, failures=0)
    beat = AgentHeartbeat(node="n", healthy=False, mount_health=True, problems=["mount default/sick: x"],
                          peer_host="10.0.0.1",
                          mount_groups=group_mounts([(sick, 1), (starting, 0)]))
    limit = len(msgspec.json.encode(beat)) - 10
    sent, left_out = agent_domain.fit_heartbeat(beat, limit)
    assert left_out == 1 and sent.mount_of("default", "sick") == sick
    assert not sent.healthy_for("default", "sick") and sent.healthy_for("default", "other")


def test_failed_reads_of_10_mounts_fit_and_go_first_when_a_beat_is_too_large() -> None:
    # The mounts' status files cap what each lists (services.agent.readfailures); the beat lists the latest mounts.
    files = [ReadFailure(path="p/" * 149 + f"{i}.bin", errno="EIO", reason="r" * 300, count=10**9, since=1.0,
                         at=2.0 + i) for i in range(3)]
    mounts = [MountReadFailures(dataset=ObjectRef(name=f"d{i:03}", namespace="n" * 63), files=files[:i % 3 + 1])
              for i in range(100)]
    latest = agent_domain.latest_read_failures(mounts)
    assert len(latest) == agent_domain.MAX_READ_FAILURE_MOUNTS
    assert all(len(mount.files) == 3 for mount in latest)  # the mounts whose last failure is the latest
    beat, _ = agent_shaped_heartbeat(10)
    added = len(msgspec.json.encode(msgspec.structs.replace(beat, read_failures=latest))) - len(
        msgspec.json.encode(beat))
    assert added < 24 * 1024
    big, _ = agent_shaped_heartbeat(20000)
    sent, _ = agent_domain.fit_heartbeat(msgspec.structs.replace(big, read_failures=latest), EVENT_LIMIT)
    assert not sent.read_failures and len(msgspec.json.encode(sent)) <= EVENT_LIMIT
    decoded = msgspec.json.decode(msgspec.json.encode(msgspec.structs.replace(beat, read_failures=latest)),
                                  type=AgentHeartbeat)
    assert decoded.read_failures_of("n" * 63, latest[0].dataset.name) == latest[0].files
    assert decoded.read_failures_of("n" * 63, "absent") == []


def test_problems_are_capped_with_a_count_of_the_rest() -> None:
    assert agent_domain.capped_problems(["a", "b"]) == ["a", "b"]
    assert agent_domain.capped_problems([str(i) for i in range(25)], 3) == ["0", "1", "and 23 more problems"]


def test_a_mount_starts_again_only_when_its_runtimes_tiers_changed() -> None:
    ssd = Level(mediumtype="SSD", quota="256Mi", path="/cache", high="0.95", low="0.8")
    assert not agent_domain.tiers_changed([ssd], [Level(mediumtype="SSD", quota="256Mi", path="/cache", high="0.95",
                                                  low="0.8")])
    assert agent_domain.tiers_changed([ssd], [msgspec.structs.replace(ssd, quota="512Mi")])
    assert agent_domain.tiers_changed([ssd], [msgspec.structs.replace(ssd, path="/other")])
    assert agent_domain.tiers_changed([ssd], [Level(mediumtype="MEM", quota="1Gi"), ssd])
    assert not agent_domain.tiers_changed([], [ssd]), "started before its runtime was known: nothing to compare with"


def test_a_heartbeat_reports_each_tier_directorys_device_and_whether_it_lists_them_all(tmp_path: Path) -> None:
    # Two tiers on one file system were weighed alone: the runtime service now sums the quotas of directories on
    # one device. A directory the cache has not made yet has its nearest folder's device.
    (tmp_path / "made").mkdir()
    disks = tier_disks([str(tmp_path / "made"), str(tmp_path / "not" / "made" / "yet")])
    device = os.stat(tmp_path).st_dev
    assert [(disk.path, disk.device) for disk in disks] == [(str(tmp_path / "made"), device),
                                                           (str(tmp_path / "not" / "made" / "yet"), device)]
    assert all(disk.size_bytes > 0 for disk in disks)
    # Whether the beat lists every directory: the runtime service waits for a runtime's directories only then.
    levels = [[Level(mediumtype="SSD", quota="1Gi", path=f"/cache/{index:03d}")] for index in range(65)]
    shown, complete = agent_domain.tier_disk_directories(levels[:64])
    assert len(shown) == 64 and complete
    shown, complete = agent_domain.tier_disk_directories(levels)
    assert shown == [f"/cache/{index:03d}" for index in range(64)] and not complete


def test_the_directories_a_change_of_tiers_retired_are_those_the_new_tiers_do_not_name() -> None:
    ssd = Level(mediumtype="SSD", quota="256Mi", path="/cache/a, /cache/b", high="0.95", low="0.8")
    mem = Level(mediumtype="MEM", quota="1Gi", path="/dev/shm")
    assert agent_domain.disk_directories([ssd, mem]) == ["/cache/a", "/cache/b"], "a MEM tier's path is not used"
    assert agent_domain.retired_directories([ssd], [msgspec.structs.replace(ssd, path="/cache/b,/cache/c")]) == [
        "/cache/a"]
    # A quota or watermark changed: every directory is still named, nothing is retired.
    assert agent_domain.retired_directories([ssd], [msgspec.structs.replace(ssd, quota="1Gi")]) == []
    # Named again under another spelling or medium (an SSD tier moved to HDD): its blocks are the new process's.
    moved = Level(mediumtype="HDD", quota="1Gi", path="/cache/a/,/cache//b")
    assert agent_domain.retired_directories([ssd], [mem, moved]) == []
    # A path that came back: retired by the first change, named again by the second before the mount was freed.
    back = agent_domain.retired_directories([ssd, msgspec.structs.replace(ssd, path="/other")], [ssd])
    assert back == ["/other"]
    assert agent_domain.retired_directories([ssd], [mem]) == ["/cache/a", "/cache/b"]


class Connected(Exception):
    """Raised by the stand-in for ``connect``: the test needs only the name the mount process connects with."""


async def test_mount_processes_of_different_datasets_or_nodes_connect_to_nats_under_different_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.agent import mountd

    names: list[str] = []

    async def connect(settings: object, name: str, **_: object) -> None:
        names.append(name)
        raise Connected

    monkeypatch.setattr(mountd, "connect", connect)
    mounts = [("node-a", "a-b", "c"), ("node-a", "a", "b-c"), ("node-b", "a", "b-c")]
    for node, namespace, name in mounts:
        with pytest.raises(Connected):
            await mountd.serve(Settings(agent=AgentSettings(node_name=node)), namespace, name, "/nonexistent",
                               asyncio.Event())
    assert len(set(names)) == len(mounts), names
    assert names[1] == "shoal-mount/a/b-c/node-a"


def test_a_failing_mount_says_why_its_process_exited() -> None:
    ref = ObjectRef(name="broken", namespace="default")
    reason = "dataset default/broken: cannot mount: FUSE is not available: /dev/fuse does not exist"
    failing = agent_domain.mount_report(ref, alive=False, mounted=False, exit_code=1, failures=3, exit_reason=reason)
    assert failing.message == (f"mount process exited with code 1 (3 times in a row): {reason}; "
                               "restarting with backoff")


def test_a_fatal_status_is_one_line_of_bounded_length() -> None:
    status = fatal_status(7, "invalid settings:\n  SHOAL_CACHE_POLICY='bogus': use lfu-admission or lru")
    assert status.pid == 7 and status.failed == "invalid settings: SHOAL_CACHE_POLICY='bogus': use lfu-admission or lru"
    hidden = fatal_status(7, "cannot read s3://AKIA:topsecret@bucket/a").failed
    assert "topsecret" not in hidden and "s3://***@bucket/a" in hidden
    long = fatal_status(7, "x" * 10_000).failed
    assert len(long) == FAILED_MAX_CHARS and long.endswith("…")


def test_fuse_unavailable_names_the_missing_device_or_tool(tmp_path: Path) -> None:
    missing = fuse_unavailable(device=str(tmp_path / "fuse"), privileged=True)
    assert missing is not None and f"{tmp_path / 'fuse'} does not exist" in missing and "--device" in missing
    device = tmp_path / "device"
    device.write_bytes(b"")
    no_tool = fuse_unavailable(device=str(device), which=lambda _: None, privileged=False)
    assert no_tool is not None and "fusermount3 is not on PATH" in no_tool and "install fuse3" in no_tool
    assert fuse_unavailable(device=str(device), which=lambda _: None, privileged=True) is None
    assert fuse_unavailable(device=str(device), which=lambda _: "/usr/bin/fusermount3", privileged=False) is None


def test_a_tree_gives_back_each_entry_as_the_manifest_had_it() -> None:
    # The tree keeps entries as columns and builds one when asked: every field must come back equal, the odd
    # entries (a local file's mode and exact time, a key not at the end of its path, a huge size) kept whole.
    synced = [ManifestEntry(path="/pre/a/b.txt", mount=0, key="a/b.txt", size=3, etag='"9b2cf535f27731c9"',
                            mtime=1700000000.123),
              ManifestEntry(path="/other/c", mount=1, key="c", size=0, etag="d41d-2", mtime=2.5),
              ManifestEntry(path="/pre/é", mount=0, key="é", size=2**40, etag="ü", mtime=-1.0)]
    odd = [ManifestEntry(path="/local", mount=2, key="local", size=1, etag="l", mtime=1.5, mtime_ns=1_500_000_001,
                         mode=0o640, uid=7, gid=8),
           ManifestEntry(path="/renamed", mount=3, key="source/key", size=2**70, etag="x", mtime=3.0),
           ManifestEntry(path="/pre/far", mount=70_000, key="far", size=1, etag="\ud800", mtime=4.0)]
    tree = Namespace.build(synced + odd, InodeAllocator())
    assert sorted(tree.files(), key=lambda e: e.path) == sorted(synced + odd, key=lambda e: e.path)
    for expected in synced + odd:
        assert tree.find(expected.path) == expected
        assert tree.by_key[expected.mount, expected.key] == expected
    assert tree.entry_of(1, "a/b.txt") is None  # another mount's key
    assert tree.total_bytes == sum(e.size for e in synced + odd)
    b = tree.find("/pre/a")
    assert b is None  # a folder
    local = tree.lookup(ROOT_INODE, "local")
    assert local is not None and local.local == odd[0] and local.mtime_ns == 1_500_000_001
