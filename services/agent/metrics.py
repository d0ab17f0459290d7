"""The agent's Prometheus series: which ``libs.metrics`` instruments a mount process and the agent move, with
their label children resolved once (per mount, or per node), and the Prometheus file_sd target of a mount process.

Every series of a mount process carries ``node`` (SHOAL_NODE_NAME) and ``dataset`` (``<namespace>/<name>``,
``libs.metrics.dataset_label``). Who moves what:

- a mount process (``MountMetrics``): cache bytes and capacity per tier (gauges read from the cache when
  scraped: nothing on the read path), block reads and bytes by source, store request latency and errors,
  evictions per tier, blocks not cached because the cache's writes were behind, FUSE request latency per
  operation, peer requests and bytes served, bytes warmed by loads;
- the agent (``NodeMetrics``): the node's read-ahead bytes and budget (read from the budget file when scraped)
  and the health of each configured cache directory (from its mount processes' status files, per heartbeat).

Hot-path cost: the per-read instruments (``libs.metrics.DATA_PATH``) are counters and histograms whose children
are resolved here once, and moved through ``adder``/``observer``: the library's own ``inc``/``observe`` take a lock
and check their arguments on every call (a histogram observation measured 4x the cost of the timing wrapper around
a FUSE handler), while a mount process moves them from one thread, its event loop, which also serves /metrics, so
plain additions to the same values do. With ``SHOAL_METRICS=off`` (``data_path_enabled()`` false) they are not
created at all and the read path only tests ``is None``.

Discovery: with SHOAL_PROMETHEUS_TARGETS_DIR set, each mount process writes ``<dir>/<node>_<ns>_<name>.json``, a
Prometheus file_sd list naming its side server, while it runs (``write_target``; the agent removes the file of a
process that died without doing so).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import Gauge

from libs import metrics as m
from libs.hostpaths import normal_path
from libs.metrics import adder, observer
from libs.ufs.base import AccessDenied, EndpointUnreachable, NoSuchBucket, NoSuchKey, ObjectChanged
from services.agent.cache.store import CacheStats

SOURCES = (m.MEMORY, m.DISK, m.PEER, m.STORE)


def tier_label(medium: str) -> str:
    """A cache tier's ``tier`` label: its medium MEM is memory, SSD and HDD are disk."""
    return m.MEMORY if medium == "MEM" else m.DISK


def store_error_reason(err: BaseException) -> str:
    """The bounded ``reason`` of a failed store request."""
    if isinstance(err, (NoSuchKey, NoSuchBucket)):
        return m.NOT_FOUND
    if isinstance(err, ObjectChanged):
        return m.CHANGED
    if isinstance(err, AccessDenied):
        return m.DENIED
    if isinstance(err, (EndpointUnreachable, TimeoutError)):
        return m.TIMEOUT
    return m.OTHER


class ReadMetrics:
    """Block reads and bytes of this node's readers by source (``BLOCK_READS``, ``READ_BYTES``), for the reader:
    one call per block fetched from a source, not per FUSE read of a block already in hand; and the store fetches
    by whom they were for (``STORE_FETCHED_BYTES``), once per fetch."""

    __slots__ = ("_by_medium", "_bytes", "_fetched", "_last_medium", "_reads")

    def __init__(self, node: str, dataset: str, last_medium: Callable[[], str | None]) -> None:
        self._reads = {source: adder(m.BLOCK_READS.labels(node, dataset, source)) for source in SOURCES}
        self._bytes = {source: adder(m.READ_BYTES.labels(node, dataset, source)) for source in SOURCES}
        self._fetched = {purpose: adder(m.STORE_FETCHED_BYTES.labels(node, dataset, purpose))
                         for purpose in m.FETCH_PURPOSES}
        self._last_medium = last_medium
        # The medium of the cache's last hit → source; None: not from a tier but from a block still being
        # written to the cache (held in memory).
        self._by_medium = {None: m.MEMORY, "MEM": m.MEMORY, "SSD": m.DISK, "HDD": m.DISK}

    def hit(self, size: int) -> None:
        """Bytes of a block served by this node's cache, told right after the cache lookup that found them."""
        self.read(self._by_medium.get(self._last_medium(), m.DISK), size)

    def read(self, source: str, size: int) -> None:
        self._reads[source](1)
        self._bytes[source](size)

    def fetched(self, purpose: str, size: int) -> None:
        """Bytes fetched from the store for ``purpose`` (``libs.metrics.FOR_*``), once per fetch."""
        self._fetched[purpose](size)


class StoreMetrics:
    """Object store requests of one mount: latency (data path: None when off) and failures by reason."""

    def __init__(self, node: str, dataset: str, data_path: bool) -> None:
        self.node = node
        self.dataset = dataset
        self.observe_get = observer(m.STORE_REQUEST_SECONDS.labels(node, dataset, m.GET)) if data_path else None

    def failed(self, operation: str, err: BaseException) -> None:
        # Rare: resolved when it happens (reasons are a handful).
        m.STORE_ERRORS.labels(self.node, self.dataset, operation, store_error_reason(err)).inc()


class PeerMetrics:
    """Requests answered by the mount's peer server by outcome, and bytes served (data path: None when off)."""

    def __init__(self, node: str, dataset: str, data_path: bool) -> None:
        outcomes = (m.OK, m.NOT_CACHED, m.UNAUTHORIZED, m.BAD_REQUEST, m.ERROR)
        self._answered = {outcome: m.PEER_REQUESTS.labels(node, dataset, outcome).inc for outcome in outcomes}
        self.served = adder(m.PEER_SERVED_BYTES.labels(node, dataset)) if data_path else None

    def answered(self, outcome: str) -> None:
        self._answered[outcome]()

    def refused(self, status: int) -> None:
        """A request refused with this HTTP status (see the peer protocol in the README)."""
        self.answered(m.UNAUTHORIZED if status in (401, 403) else m.ERROR if status >= 500 else m.BAD_REQUEST)


class MountMetrics:
    """The series of one mount process, resolved once; ``close`` drops its gauges (they read the live cache)."""

    def __init__(self, node: str, dataset: str, data_path: bool | None = None) -> None:
        self.node = node
        self.dataset = dataset
        self.data_path = m.data_path_enabled() if data_path is None else data_path
        self.store = StoreMetrics(node, dataset, self.data_path)
        self.peer = PeerMetrics(node, dataset, self.data_path)
        self.warmup_bytes = m.WARMUP_BYTES.labels(node, dataset)
        self._evictions = {tier: m.EVICTIONS.labels(node, dataset, tier).inc for tier in m.TIERS}
        # Told by the reader for each block it did not cache because its writes were behind (``MAX_WRITING_BLOCKS``).
        self.write_dropped = m.CACHE_WRITES_DROPPED.labels(node, dataset).inc
        self._gauges: list[tuple[Gauge, tuple[str, ...]]] = []

    def reads(self, last_medium: Callable[[], str | None]) -> ReadMetrics | None:
        """The reader's counters; ``last_medium()``: the medium of the cache's last hit (``BlockCache.last_medium``)."""
        return ReadMetrics(self.node, self.dataset, last_medium) if self.data_path else None

    def fuse_observer(self) -> Callable[[str], Callable[[float], None]] | None:
        """For ``fs.time_operations``: operation → the ``observe`` of its FUSE_SECONDS child; None when off."""
        if not self.data_path:
            return None
        return lambda operation: observer(m.FUSE_SECONDS.labels(self.node, self.dataset, operation))

    def tier_evicted(self, medium: str) -> None:
        self._evictions[tier_label(medium)]()

    def watch_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Cache bytes and capacity per tier label, read from ``stats()`` when scraped. Capacity counts the tiers
        that are up (as the heartbeat's ``capacityBytes``); a tier label shows only if the mount has such tiers."""
        media = {tier_label(tier.medium) for tier in stats().tiers}
        for tier in sorted(media):
            def used(tier: str = tier) -> float:
                return sum(t.used_bytes for t in stats().tiers if tier_label(t.medium) == tier)

            def capacity(tier: str = tier) -> float:
                return sum(t.quota_bytes for t in stats().tiers if tier_label(t.medium) == tier and t.health != "down")

            for gauge, value in ((m.CACHE_BYTES, used), (m.CACHE_CAPACITY_BYTES, capacity)):
                labels = (self.node, self.dataset, tier)
                gauge.labels(*labels).set_function(value)
                self._gauges.append((gauge, labels))

    def close(self) -> None:
        for gauge, labels in self._gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self._gauges.clear()


class NodeMetrics:
    """The agent's own series: the node's read-ahead memory and budget, and its cache directories' health."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._dirs: set[str] = set()
        self._readahead = False

    def watch_readahead(self, held: Callable[[], int], budget: int) -> None:
        """``held()`` (the budget file's slots, summed) is read when scraped."""
        m.READAHEAD_BYTES.labels(self.node).set_function(held)
        m.READAHEAD_BUDGET_BYTES.labels(self.node).set(budget)
        self._readahead = True

    def cache_dirs(self, health: Mapping[str, bool]) -> None:
        """Set the health of every configured cache directory of the running mounts (others are dropped)."""
        for directory, healthy in health.items():
            m.CACHE_DIR_HEALTHY.labels(self.node, directory).set(1 if healthy else 0)
        for gone in self._dirs - set(health):
            with contextlib.suppress(KeyError):
                m.CACHE_DIR_HEALTHY.remove(self.node, gone)
        self._dirs = set(health)

    def close(self) -> None:
        self.cache_dirs({})
        if self._readahead:
            for gauge in (m.READAHEAD_BYTES, m.READAHEAD_BUDGET_BYTES):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.node)
            self._readahead = False


def dir_health(directories: Iterable[str], down: Iterable[str]) -> dict[str, bool]:
    """Health per configured cache directory: down when a mount's tier below it (``<dir>/...``) is down.

    Directories and tier locations are compared, and labelled, written one way (``libs.hostpaths.normal_path``, as
    the agent's cache directories are everywhere else): ``/var/cache/shoal/``, ``/var/cache/shoal`` and
    ``/var/cache/x/../shoal`` are one directory and one series, not three."""
    down = [normal_path(location) for location in down]
    return {directory: not any(location == directory or location.startswith(directory.rstrip("/") + "/")
                               for location in down)
            for directory in map(normal_path, directories)}


# --- Prometheus file_sd targets ---


def target_path(directory: str, node: str, namespace: str, name: str) -> Path:
    """A mount process's target file. Joined with '_', which no node, namespace or dataset name holds: joined with
    '-', ml/prod-x and ml-prod/x on one node were one file, and each mount overwrote or removed the other's."""
    return Path(directory) / f"{node}_{namespace}_{name}.json"


def _legacy_target_path(directory: str, node: str, namespace: str, name: str) -> Path:
    # The name before '_': a file an earlier version left, for a mount that writes the new one now.
    return Path(directory) / f"{node}-{namespace}-{name}.json"


def write_target(directory: str, node: str, namespace: str, name: str, host: str, port: int) -> Path:
    """Write (atomically: a temporary file, then a rename) the file_sd target of a mount process's side server."""
    path = target_path(directory, node, namespace, name)
    with contextlib.suppress(FileNotFoundError):
        _legacy_target_path(directory, node, namespace, name).unlink()
    if host in ("", "0.0.0.0", "::"):  # bound to every address: Prometheus on the node finds it on loopback
        host = "127.0.0.1"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    body = [{"targets": [address], "labels": {"job": m.MOUNT_JOB, "node": node,
                                              "dataset": m.dataset_label(namespace, name)}}]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(body) + "\n")
    os.replace(temporary, path)
    return path


def remove_target(directory: str, node: str, namespace: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        target_path(directory, node, namespace, name).unlink()

