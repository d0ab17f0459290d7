"""The agent's Prometheus series on real parts (a local-directory store, memory and disk tiers, the reader, a FUSE
filesystem object without a kernel mount): block reads by source, store latency and errors by reason, cache bytes
read when scraped, evictions per tier, FUSE handlers timed by one wrapper, nothing moved with the data path off,
and the Prometheus file_sd target written and removed. Each test uses its own node name, so series never mix.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pyfuse3
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from libs import metrics as m
from libs.blocks import BlockId
from libs.embedded import LOOPBACK
from libs.events.dataset import ManifestEntry
from libs.metrics import FAST_SECONDS_BUCKETS, adder, dataset_label, observer, setter
from libs.ufs import LocalLocation, LocalObjectStore
from libs.ufs.base import AccessDenied, EndpointUnreachable, NoSuchKey, ObjectChanged, UfsError
from services.agent.cache import BlockCache, DiskTier, MemoryTier
from services.agent.fs import DatasetFS, time_operations
from services.agent.metrics import (
    MountMetrics,
    NodeMetrics,
    dir_health,
    remove_target,
    store_error_reason,
    target_path,
    write_target,
)
from services.agent.namespace import InodeAllocator, Namespace
from services.agent.peer import PeerClient, PeerError, PeerServer, runtime_key
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate
from tests.faults import CountingStore
from tests.helpers import eventually

BLOCK = 64 * 1024
DATASET = dataset_label("default", "demo")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def node() -> str:
    return f"n-{uuid.uuid4().hex[:8]}"


async def reader_over(tmp_path: Path, metrics: MountMetrics, cache: BlockCache) -> tuple[BlockReader, ManifestEntry,
                                                                                          CountingStore, bytes]:
    source = tmp_path / "source"
    source.mkdir()
    body = os.urandom(4 * BLOCK)
    (source / "data.bin").write_bytes(body)
    store = CountingStore(LocalObjectStore(LocalLocation(root=source)))
    info = await store.head("data.bin")
    reader = BlockReader(cache, [StoreGate(store, metrics=metrics.store)], BLOCK, MemoryBudget(64 * BLOCK),
                         write_block=cache.put_async, max_ahead_blocks=0,
                         metrics=metrics.reads(lambda: cache.last_medium))
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag, mtime=info.mtime)
    return reader, entry, store, body


async def test_reads_count_store_then_memory_and_disk_hits_and_cache_bytes_are_read_when_scraped(
        tmp_path: Path) -> None:
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    # Two blocks fit the memory tier; the default policy sends the others to disk (none hotter than those).
    cache = BlockCache([MemoryTier(2 * BLOCK, high=1.0, low=0.5), DiskTier(tmp_path / "cache", 64 * BLOCK)])
    cache.load()
    cache.on_tier_evicted = metrics.tier_evicted
    metrics.watch_cache(cache.stats)
    reader, entry, store, body = await reader_over(tmp_path, metrics, cache)
    labels = {"node": name, "dataset": DATASET}
    for _ in range(2):
        handle = reader.open(entry)
        for index in range(4):
            assert bytes(await reader.read(handle, index * BLOCK, BLOCK)) == body[index * BLOCK:][:BLOCK]
        reader.close(handle)
        await reader.drain()
    assert len(store.gets) == 4
    assert sample("shoal_block_reads_total", **labels, source="store") == 4
    assert sample("shoal_read_bytes_total", **labels, source="store") == 4 * BLOCK
    assert sample("shoal_block_reads_total", **labels, source="memory") == 2
    assert sample("shoal_block_reads_total", **labels, source="disk") == 2
    assert sample("shoal_read_bytes_total", **labels, source="disk") == 2 * BLOCK
    assert sample("shoal_store_request_duration_seconds_count", **labels, operation="get") == 4
    assert sample("shoal_cache_bytes", **labels, tier="memory") == 2 * BLOCK
    assert sample("shoal_cache_bytes", **labels, tier="disk") == 2 * BLOCK
    assert sample("shoal_cache_capacity_bytes", **labels, tier="disk") == 64 * BLOCK
    assert sample("shoal_cache_evictions_total", **labels, tier="memory") == 0
    cache.evict([reader.block_id(entry, 0), reader.block_id(entry, 3)])  # what a DataClean does
    assert sample("shoal_cache_evictions_total", **labels, tier="memory") == 1
    assert sample("shoal_cache_evictions_total", **labels, tier="disk") == 1
    assert sample("shoal_cache_bytes", **labels, tier="memory") == BLOCK  # read now, not when it changed
    metrics.close()
    assert REGISTRY.get_sample_value("shoal_cache_bytes", {**labels, "tier": "memory"}) is None
    await store.close()


async def test_store_fetches_for_a_peer_or_a_load_are_no_reads_of_this_node(tmp_path: Path) -> None:
    """A block this node fetches from the store for another node's reader (its peer server asking) is that node's
    peer read, not this node's store read: counted here too, the cluster's "bytes read through the mounts" and hit
    ratios counted it twice. A DataLoad's fetch is no read either. Every fetch counts once in
    ``shoal_store_fetched_bytes`` by whom it was for; a reader of this node joining a peer's fetch makes it a read."""
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    cache = BlockCache([MemoryTier(8 * BLOCK, high=1.0, low=0.5)])
    cache.load()
    reader, entry, store, body = await reader_over(tmp_path, metrics, cache)
    labels = {"node": name, "dataset": DATASET}
    assert await reader.serve_block(entry, 0) == body[:BLOCK]  # for a peer
    assert await reader.warm(entry, 1)  # for a DataLoad
    # A reader of this node joins the peer's fetch of block 2 while it is in flight (held at the store).
    store.hold()
    for_peer = asyncio.ensure_future(reader.serve_block(entry, 2))

    async def fetching() -> bool:
        return store.waiting == 1

    async def joined() -> bool:
        return reader.block_id(entry, 2) not in reader._for_peer

    await eventually(fetching)
    handle = reader.open(entry)
    read = asyncio.ensure_future(reader.read(handle, 2 * BLOCK, BLOCK))
    await eventually(joined)
    store.release()
    assert bytes(await read) == body[2 * BLOCK:3 * BLOCK]
    assert await for_peer == body[2 * BLOCK:3 * BLOCK]
    assert bytes(await reader.read(handle, 3 * BLOCK, BLOCK)) == body[3 * BLOCK:4 * BLOCK]  # a read of its own
    reader.close(handle)
    await reader.drain()
    assert len(store.gets) == 4
    assert sample("shoal_store_fetched_bytes_total", **labels, purpose="peer") == BLOCK
    assert sample("shoal_store_fetched_bytes_total", **labels, purpose="load") == BLOCK
    assert sample("shoal_store_fetched_bytes_total", **labels, purpose="read") == 2 * BLOCK
    assert sample("shoal_read_bytes_total", **labels, source="store") == 2 * BLOCK
    assert sample("shoal_block_reads_total", **labels, source="store") == 2
    metrics.close()
    await store.close()


async def test_with_the_data_path_off_reads_move_nothing(tmp_path: Path) -> None:
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=False)
    cache = BlockCache([MemoryTier(64 * BLOCK)])
    reader, entry, store, body = await reader_over(tmp_path, metrics, cache)
    assert reader.metrics is None and metrics.fuse_observer() is None and metrics.peer.served is None
    handle = reader.open(entry)
    assert bytes(await reader.read(handle, 0, BLOCK)) == body[:BLOCK]
    assert bytes(await reader.read(handle, 0, 10)) == body[:10]
    await reader.drain()
    for source in ("memory", "disk", "store"):
        assert REGISTRY.get_sample_value("shoal_block_reads_total",
                                         {"node": name, "dataset": DATASET, "source": source}) is None
    assert REGISTRY.get_sample_value("shoal_store_request_duration_seconds_count",
                                     {"node": name, "dataset": DATASET, "operation": "get"}) is None
    await store.close()


async def test_store_errors_count_by_bounded_reason(tmp_path: Path) -> None:
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    cache = BlockCache([MemoryTier(64 * BLOCK)])
    reader, entry, store, _ = await reader_over(tmp_path, metrics, cache)
    store.unreachable = True
    handle = reader.open(entry)
    with pytest.raises(EndpointUnreachable):
        await reader.read(handle, 0, BLOCK)
    stale = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=entry.size, etag='"other"',
                          mtime=entry.mtime)
    store.unreachable = False
    reader.gates[0]._last_error = None  # past the cooldown
    with pytest.raises(UfsError):
        await reader.read(reader.open(stale), BLOCK, BLOCK)
    await reader.drain()
    labels = {"node": name, "dataset": DATASET, "operation": "get"}
    assert sample("shoal_store_errors_total", **labels, reason="timeout") == 1
    assert sample("shoal_store_errors_total", **labels, reason="changed") == 1
    assert store_error_reason(NoSuchKey("x")) == "not_found"
    assert store_error_reason(AccessDenied("x")) == "denied"
    assert store_error_reason(ObjectChanged("x")) == "changed"
    assert store_error_reason(ValueError("x")) == "other"
    await store.close()


def one_file_fs() -> DatasetFS:
    """A mount's file system over one 3-byte file and an empty memory tier (no store: its handlers are timed, not
    read through)."""
    cache = BlockCache([MemoryTier(BLOCK)])
    entry = ManifestEntry(path="/a.bin", mount=0, key="a.bin", size=3, etag='"e"', mtime=0.0)
    return DatasetFS(Namespace.build([entry], InodeAllocator()),
                     BlockReader(cache, [], BLOCK, MemoryBudget(BLOCK), write_block=cache.put_async),
                     uid=None, gid=None, block_size=BLOCK)


async def test_every_fuse_handler_is_timed_by_one_wrapper_and_errors_are_timed_too() -> None:
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    fs = one_file_fs()
    observer = metrics.fuse_observer()
    assert observer is not None
    wrapped = time_operations(fs, observer)
    assert {"lookup", "getattr", "open", "read", "readdir", "release", "write"} <= set(wrapped)
    assert "flush" not in wrapped and "forget" not in wrapped  # left to pyfuse3 (ENOSYS), so not timed
    await fs.getattr(pyfuse3.ROOT_INODE)
    await fs.lookup(pyfuse3.ROOT_INODE, b"a.bin")
    with pytest.raises(pyfuse3.FUSEError):
        await fs.lookup(pyfuse3.ROOT_INODE, b"missing")
    labels = {"node": name, "dataset": DATASET}
    assert sample("shoal_fuse_request_duration_seconds_count", **labels, operation="getattr") == 1
    assert sample("shoal_fuse_request_duration_seconds_count", **labels, operation="lookup") == 2


def fuse_operations_shown(name: str) -> set[str]:
    """The ``operation`` labels of node ``name``'s FUSE latency series, as /metrics shows them."""
    return {sample.labels["operation"] for family in REGISTRY.collect()
            if family.name == "shoal_fuse_request_duration_seconds" for sample in family.samples
            if sample.labels.get("node") == name}


async def test_a_fuse_operation_has_series_only_once_it_was_served() -> None:
    """A read-only mount showed a latency histogram (19 series) for each of the 23 operations it implements from its
    start, write operations it only refuses included: over 400 idle series per mount process."""
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    fs = one_file_fs()
    observer = metrics.fuse_observer()
    assert observer is not None
    assert "write" in time_operations(fs, observer)
    assert fuse_operations_shown(name) == set()
    await fs.getattr(pyfuse3.ROOT_INODE)
    await fs.getattr(pyfuse3.ROOT_INODE)
    assert fuse_operations_shown(name) == {"getattr"}
    assert sample("shoal_fuse_request_duration_seconds_count", node=name, dataset=DATASET, operation="getattr") == 2


def test_node_series_read_ahead_when_scraped_and_cache_directory_health() -> None:
    name = node()
    metrics = NodeMetrics(name)
    held = [0]
    metrics.watch_readahead(lambda: held[0], 512)
    held[0] = 128
    assert sample("shoal_readahead_bytes", node=name) == 128
    assert sample("shoal_readahead_budget_bytes", node=name) == 512
    health = dir_health(["/cache/ssd", "/cache/hdd"], ["/cache/ssd/default/demo", "/cache/ssd2/default/x"])
    assert health == {"/cache/ssd": False, "/cache/hdd": True}
    metrics.cache_dirs(health)
    assert sample("shoal_cache_dir_healthy", node=name, dir="/cache/hdd") == 1
    assert REGISTRY.get_sample_value("shoal_cache_dir_healthy", {"node": name, "dir": "/cache/ssd"}) == 0
    metrics.cache_dirs({"/cache/hdd": True})
    assert REGISTRY.get_sample_value("shoal_cache_dir_healthy", {"node": name, "dir": "/cache/ssd"}) is None
    metrics.close()
    assert REGISTRY.get_sample_value("shoal_readahead_bytes", {"node": name}) is None


def test_every_label_that_holds_a_path_is_the_exception_the_metrics_module_names() -> None:
    """``libs.metrics`` said no label holds a path while ``shoal_cache_dir_healthy{dir=}`` does: a label like a
    path must be named there, with why it stays bounded."""
    path_like = {"dir", "directory", "path", "file", "location", "key"}
    instruments = [value for value in vars(m).values() if isinstance(value, (Counter, Gauge, Histogram))]
    with_paths = {instrument._name: sorted(set(instrument._labelnames) & path_like) for instrument in instruments
                  if set(instrument._labelnames) & path_like}
    assert with_paths == {"shoal_cache_dir_healthy": ["dir"]}
    doc = " ".join((m.__doc__ or "").split())
    for name, labels in with_paths.items():
        assert all(f"``{name}``'s ``{label}``" in doc for label in labels), doc


def test_a_cache_directory_is_labelled_as_the_cache_uses_it_whatever_its_spelling(tmp_path: Path) -> None:
    """A user's runtimes named one cache directory ``/var/cache/shoal/`` and ``/var/cache/shoal`` (and another
    through ``..``): /metrics showed a series per spelling, none of them the path the cache and its "is down" reports
    use, and a tier down under a ``..`` spelling left the normalized one healthy."""
    name = node()
    metrics = NodeMetrics(name)
    ssd, hdd = tmp_path / "ssd", tmp_path / "hdd"
    # A tier's location is its directory joined with the dataset's folder, '..' kept (``BlockCache.from_levels``).
    down = DiskTier(f"{tmp_path}/x/../hdd/default/demo", 1024).location
    health = dir_health([f"{ssd}/", str(ssd), f"{tmp_path}//ssd/.", f"{tmp_path}/x/../hdd"], [down])
    assert health == {str(ssd): True, str(hdd): False}
    metrics.cache_dirs(health)
    exposed = [(s.labels["dir"], s.value) for family in REGISTRY.collect() if family.name == "shoal_cache_dir_healthy"
               for s in family.samples if s.labels["node"] == name]
    assert sorted(exposed) == [(str(hdd), 0), (str(ssd), 1)]
    metrics.close()


def test_the_prometheus_target_is_a_file_sd_list_written_whole_and_removed(tmp_path: Path) -> None:
    path = write_target(str(tmp_path / "targets"), "node-a", "default", "demo", "0.0.0.0", 9123)
    assert path == target_path(str(tmp_path / "targets"), "node-a", "default", "demo")
    assert path.name == "node-a_default_demo.json"
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:9123"], "labels": {
        "job": "shoal-mount", "node": "node-a", "dataset": "default/demo"}}]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    remove_target(str(tmp_path / "targets"), "node-a", "default", "demo")
    remove_target(str(tmp_path / "targets"), "node-a", "default", "demo")  # gone already: fine
    assert not path.exists()


def test_datasets_whose_names_join_alike_with_dashes_have_targets_of_their_own(tmp_path: Path) -> None:
    """ml/prod-x and ml-prod/x on one node: each mount's target file is its own, and removing one leaves the other.
    A file of the same mount under the name an earlier version gave it goes when the new one is written."""
    targets = str(tmp_path / "targets")
    legacy = tmp_path / "targets" / "node-a-ml-prod-x.json"
    legacy.parent.mkdir()
    legacy.write_text("[]\n")
    first = write_target(targets, "node-a", "ml", "prod-x", "127.0.0.1", 9001)
    second = write_target(targets, "node-a", "ml-prod", "x", "127.0.0.1", 9002)
    assert first != second and not legacy.exists()
    remove_target(targets, "node-a", "ml", "prod-x")
    assert not first.exists()
    assert json.loads(second.read_text())[0]["targets"] == ["127.0.0.1:9002"]


def test_a_block_being_written_counts_as_a_memory_hit() -> None:
    metrics = MountMetrics(name := node(), DATASET, data_path=True)
    reads = metrics.reads(lambda: None)  # the cache missed; the bytes came from a block being written
    assert reads is not None
    reads.hit(10)
    assert sample("shoal_read_bytes_total", node=name, dataset=DATASET, source="memory") == 10


async def test_the_peer_server_counts_requests_by_outcome_and_bytes_served() -> None:
    name = node()
    metrics = MountMetrics(name, DATASET, data_path=True)
    key = runtime_key(b"cluster secret", "default", "demo")
    body = os.urandom(3 * 1024)
    entry = ManifestEntry(path="/a.bin", mount=0, key="a.bin", size=len(body), etag="e1", mtime=0.0)
    cached = {0}
    failing = {2}

    async def source(_: ManifestEntry, index: int) -> bytes:
        if index in failing:
            raise OSError("store unreachable")
        return body[index * 1024:(index + 1) * 1024]

    server = PeerServer(key, "default", "demo", 1024, lambda mount, k: entry if (mount, k) == (0, "a.bin") else None,
                        source, metrics=metrics.peer, cached=lambda _, index: index in cached)
    await server.start(LOOPBACK, 0)
    url = f"http://{LOOPBACK}:{server.port}"
    client = PeerClient(key, "default", "demo")
    stranger = PeerClient(runtime_key(b"another secret", "default", "demo"), "default", "demo")
    try:
        assert await client.get_block(url, BlockId(0, "a.bin", "e1", 0), 1024, 1024) == body[:1024]
        assert await client.get_block(url, BlockId(0, "a.bin", "e1", 1), 1024, 1024) == body[1024:2048]
        for bad, who in ((BlockId(0, "a.bin", "e1", 2), client), (BlockId(0, "a.bin", "e2", 0), client),
                         (BlockId(0, "a.bin", "e1", 0), stranger)):
            with pytest.raises(PeerError):
                await who.get_block(url, bad, 1024, 1024)
    finally:
        await client.close()
        await stranger.close()
        await server.stop()
    labels = {"node": name, "dataset": DATASET}
    for outcome, count in (("ok", 1), ("not_cached", 1), ("error", 1), ("bad_request", 1), ("unauthorized", 1)):
        assert sample("shoal_peer_requests_served_total", **labels, outcome=outcome) == count, outcome
    assert sample("shoal_peer_served_bytes_total", **labels) == 2048


def test_the_hot_path_bindings_move_the_same_samples_as_the_library() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("t_seconds", "t", ["way"], buckets=FAST_SECONDS_BUCKETS, registry=registry)
    counter = Counter("t_bytes", "t", ["way"], registry=registry)
    gauge = Gauge("t_pending", "t", ["way"], registry=registry)
    fast_observe, fast_add = observer(histogram.labels("fast")), adder(counter.labels("fast"))
    fast_set = setter(gauge.labels("fast"))
    assert fast_observe != histogram.labels("fast").observe  # the fast path, not a fallback
    assert fast_set != gauge.labels("fast").set
    for amount in (0.0, 0.00005, 0.00007, 0.001, 0.3, 2.5, 3.0, 1e9):  # on a bound, between, past the last
        fast_observe(amount)
        histogram.labels("library").observe(amount)
        fast_add(amount)
        counter.labels("library").inc(amount)
        fast_set(amount)
        gauge.labels("library").set(amount)

    def samples(way: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, {k: v for k, v in s.labels.items() if k != "way"}, s.value)
                for family in registry.collect() for s in family.samples
                if s.labels.get("way") == way and not s.name.endswith("_created")]

    assert samples("fast") == samples("library") and samples("fast")
