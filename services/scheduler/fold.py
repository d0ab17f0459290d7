"""The scheduler's memory, pure: every node's cached blocks per dataset, each dataset's file catalog, node labels.

Decides what the scheduler knows and forgets; no I/O (the handlers feed it events, manifests and heartbeats):
- ``CacheFold`` folds inventory events. *When* an event counts, when a snapshot replaces the blocks and when to ask
  a node for a snapshot (a gap, a new incarnation, an unknown node) is ``libs.inventory``'s decision, the same as
  the dataset service's, taken on positions only (``track_blocks=False``); the blocks themselves live here in
  mutable per-file maps, because the shared fold copies a node's whole block map on every delta (fine for the
  few-blocks case, quadratic for a node holding a large dataset). A snapshot's parts are gathered apart and
  replace the node's blocks once complete, exactly when the shared fold says the position is exact again.
- ``Catalog`` indexes a dataset's manifest (files by (mount, key, ETag), sizes, paths in sorted order with running
  totals): which cached blocks belong to the current version of a file, whether a file is whole (its cached blocks
  add up to its size: every block has a distinct index and blocks partition the file, so no block size is needed),
  and the bytes under any path hint in O(log files).
- Memory follows what is cached: an evicted block leaves its file's map, a file without blocks leaves the node, a
  deleted dataset or a node that went away is dropped whole. What stays per (dataset, node) after everything is
  evicted is its position (a few fields), needed to detect the next gap. A catalog is one tuple per file of the
  datasets that exist.
- ``CacheFold.held`` is kept as events arrive: per dataset, node → bytes of the current version that node caches
  (nodes holding none left out), i.e. ``NodeCache.current`` gathered, so a decision reads one map per dataset
  instead of a pass over the dataset's node caches. It is as the events report; ``CacheFold.settle`` says what of it
  a node claims beyond the files' sizes (blocks partition a file: more is a stale block size or a lie), counted when
  a decision reads the dataset, for the nodes that moved since, so ``apply`` does no more per event for it.
- ``CacheFold.unique`` is kept the same way: per dataset, the bytes of the current version held by *any* node, each
  block once however many nodes hold it (``holders`` counts them per block). Summing the nodes' bytes counts a block
  that a DataLoad with ``replicas: 2`` put on two nodes twice, and so overstates the share of the dataset that is
  cached. It too is as the events report; ``CacheFold.published_unique`` takes off what the blocks of a file claim
  beyond its size (counted when a figure is published, for the nodes that moved since), and that is the figure the
  dataset service's ``cachedPercentage`` takes (``handlers.publish_cache``).
- ``CacheFold.reported`` is kept beside it: per dataset, the nodes' own ``cachedBytes`` (their events' counters)
  summed, the figure the dataset service's ``cached`` is, published with ``unique`` so that service can tell what
  its nodes gained since the fact and keep its two columns together.

``LiveView`` answers ``services.scheduler.domain.View`` from these, without copying: the event loop is single
threaded and ``score`` synchronous, so during one decision the fold *is* a consistent snapshot.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, cast

from libs.events.agent import CachedFile, Inventory, InventorySnapshot
from libs.events.dataset import ManifestEntry
from libs.inventory import NodeInventory, fold_node
from libs.paths import is_folder, selected_spans, selects
from services.scheduler.domain import NodeAgent, Part, Places, Sums, add_columns

# Moves of one dataset's ``held`` remembered for readers (``CacheFold.moves``): a decision after a few changes
# patches a few entries; a reader more than this many behind reads every node again, which costs about as much.
# Past this many the older half is dropped (readers that are up to date keep patching).
MOVES_KEPT = 256

# (namespace, name) of a dataset.
DatasetKey = tuple[str, str]
# One version of one file: (mount index, object key, ETag), as inventory events group blocks.
FileKey = tuple[int, str, str]


def path_matches(path: str, hints: Iterable[str]) -> bool:
    """Whether any hint selects ``path``, by the loader's rule (``libs.paths.selects``)."""
    return any(selects(hint, path) for hint in hints)


class Catalog:
    """A dataset's manifest, indexed for the scheduler (folder markers are not files).

    Columns, not an object per file (a dataset may have millions): paths in sorted order, running totals (a file's
    size is the difference of two), mounts, and the ETags in one byte string. A file version (mount, key, ETag) is
    found by its path, which the sync writes as its mount's prefix and the key; a manifest written otherwise keeps
    those files in a small table of their own."""

    def __init__(self, entries: Iterable[ManifestEntry]) -> None:
        files = sorted((e for e in entries if not is_folder(e.path)), key=attrgetter("path"))
        self.paths = [e.path for e in files]
        self.running = array("q", [0, *itertools.accumulate(e.size for e in files)])
        self.total = self.running[-1]
        self._mounts = array("q", [e.mount for e in files])
        etags = [e.etag.encode("utf-8", "surrogatepass") for e in files]
        self._etags = b"".join(etags)
        self._etag_ends = array("q", [0, *itertools.accumulate(len(etag) for etag in etags)])
        del etags
        # Path → position of a file found by its mount's prefix and its key, (mount, key) → position of the others.
        self._positions: dict[str, int] = {}
        self._prefixes: dict[int, str] = {}
        self._others: dict[tuple[int, str], int] = {}
        for position, e in enumerate(files):
            key = e.key
            prefix = e.path[:len(e.path) - len(key)] if key and e.path.endswith(key) else None
            if (prefix is not None and self._prefixes.setdefault(e.mount, prefix) == prefix
                    and e.path not in self._positions):
                self._positions[e.path] = position
            else:
                self._others[e.mount, key] = position

    def _position(self, file: FileKey) -> int | None:
        mount, key, etag = file
        prefix = self._prefixes.get(mount)
        if prefix is not None:
            position = self._positions.get(prefix + key)
            if position is not None and self._mounts[position] == mount and self._etag_is(position, etag):
                return position
        position = self._others.get((mount, key))
        return position if position is not None and self._etag_is(position, etag) else None

    def _etag_is(self, position: int, etag: str) -> bool:
        start, end = self._etag_ends[position], self._etag_ends[position + 1]
        return self._etags[start:end] == etag.encode("utf-8", "surrogatepass")

    def __contains__(self, file: object) -> bool:
        """Whether ``file`` (a ``FileKey``) is a file version of this manifest."""
        return isinstance(file, tuple) and self._position(cast(FileKey, file)) is not None

    def size(self, key: FileKey) -> int | None:
        position = self._position(key)
        return None if position is None else self.running[position + 1] - self.running[position]

    def total_under(self, hints: Iterable[str]) -> int:
        """Bytes of the files the hints select (overlapping hints count a file once)."""
        spans = [(span.start, span.stop) for hint in hints for span in selected_spans(self.paths, hint)]
        total, reached = 0, 0
        for start, end in sorted(spans):
            start = max(start, reached)
            if end > start:
                total += self.running[end] - self.running[start]
                reached = end
        return total

    def selects(self, key: FileKey, hints: Iterable[str]) -> bool:
        position = self._position(key)
        return position is not None and path_matches(self.paths[position], hints)


@dataclass
class NodeCache:
    """One node's cache of one dataset: its position in the node's event stream and its blocks by file."""

    position: NodeInventory
    # File version → block index → block size.
    files: dict[FileKey, dict[int, int]] = field(default_factory=dict)
    # Bytes of all cached blocks, and of the blocks of file versions in the dataset's current catalog.
    total: int = 0
    current: int = 0
    # The snapshot being gathered: (incarnation, seq of part 1, parts) and the files of the parts so far.
    pending: tuple[str, int, int] | None = None
    pending_files: dict[FileKey, dict[int, int]] = field(default_factory=dict)
    # ``CacheFold.whole_files`` as last counted; None once the blocks or the catalog moved (counted again on demand,
    # with ``excess``: ``CacheFold.settle``).
    whole: int | None = None
    # Bytes of ``current`` over the sizes of the files they claim (a file counts up to its size), as last counted.
    excess: int = 0

    def file_bytes(self, key: FileKey) -> int:
        return sum(self.files.get(key, {}).values())


# A block no node holds: (holders, size).
_NO_HOLDER = (0, 0)


def _release(shared: dict[int, tuple[int, int]], index: int) -> int:
    """One node fewer holds block ``index`` of a file (``CacheFold.holders``); its bytes when it was the last."""
    holding, size = shared.get(index, (0, 0))
    if holding > 1:
        shared[index] = (holding - 1, size)
        return 0
    shared.pop(index, None)
    return size


def _add(files: dict[FileKey, dict[int, int]], cached: Iterable[CachedFile]) -> None:
    """Take a snapshot part's blocks on. A block reported with a negative size (an agent's bug, or one that lies)
    holds nothing: taken as reported, it took bytes off the node's other blocks and off the dataset's ``unique``, which
    the scheduler then published below zero, a fact the dataset service refuses (one node's bad report froze the
    dataset's cachedPercentage). The same for a node's own ``cachedBytes`` (``_cached_bytes``)."""
    for item in cached:
        blocks = files.setdefault((item.mount, item.key, item.etag), {})
        for index, size in item.blocks:
            blocks[index] = max(size, 0)


def _cached_bytes(position: NodeInventory | None) -> int:
    """A node's own ``cachedBytes`` as ``CacheFold.reported`` sums it: never below zero (see ``_add``)."""
    return max(0, position.counters.cached_bytes) if position is not None else 0


class CacheFold:
    """Every dataset's node caches, from inventory events; ``catalogs`` say which file versions are current."""

    def __init__(self) -> None:
        self.datasets: dict[DatasetKey, dict[str, NodeCache]] = {}
        # Dataset → file version → block index → (nodes holding it, its size as last reported): each block once,
        # whatever the number of nodes holding it. Its size is one per (file version, index), as blocks partition a
        # file; were two nodes to report two sizes (block sizes changed in between), the last one reported counts,
        # and a block's bytes leave ``unique`` as they came in, so the figure never drifts.
        self.holders: dict[DatasetKey, dict[FileKey, dict[int, tuple[int, int]]]] = {}
        # Dataset → bytes of the blocks of current file versions (every version while there is no catalog) that at
        # least one node holds; kept with every change of ``holders``, datasets at 0 left out.
        self.unique: dict[DatasetKey, int] = {}
        # Dataset → the nodes' ``cachedBytes`` (their last event's counters) summed, datasets at 0 left out.
        self.reported: dict[DatasetKey, int] = {}
        # Dataset → node → ``current`` of its cache, only nodes where it is > 0: what a decision reads, kept up to
        # date with every change of ``current`` (``_held``), never rebuilt per decision.
        self.held: dict[DatasetKey, dict[str, int]] = {}
        self.catalogs: dict[DatasetKey, Catalog] = {}
        # Node → how many datasets it has a cache entry for: the known nodes, without a pass over every dataset.
        self.node_entries: dict[str, int] = {}
        # Change stamps from one counter that only grows (a forgotten dataset applied again never reuses a stamp):
        # per dataset, for the node set, and for anything at all. Decisions are cached until one they read moves.
        # A dataset's stamp leaves with the dataset: 0 (no entry) means the fold holds nothing of it, the same state
        # whether it was never seen or forgotten, so readers need no tombstone and deleted datasets cost nothing.
        self.generation = 0
        self.versions: dict[DatasetKey, int] = {}
        self.nodes_version = 0
        # Dataset → node → bytes its ``held`` entry claims over the files' sizes (only nodes claiming more), and how
        # far into the dataset's ``moves`` it is counted (``settle``): kept apart from the event loop, which adds
        # nothing per event for it.
        self.excess: dict[DatasetKey, dict[str, int]] = {}
        self._settled: dict[DatasetKey, tuple[list[str] | None, int]] = {}
        # Dataset → the nodes whose ``held`` entry moved, in order (a node once per move): a reader that saw the list
        # up to some length patches what it keeps from the rest instead of reading every node again. Past
        # ``MOVES_KEPT`` moves the older half is dropped and ``moves_base`` (how many were dropped from that list)
        # grows: a reader's place in the moves is absolute (``moves_base`` + index). A forgotten dataset or node starts
        # a new list (readers holding the old one start over).
        self.moves: dict[DatasetKey, list[str]] = {}
        self.moves_base: dict[DatasetKey, int] = {}
        # Dataset → file version → bytes its blocks (each once, ``holders``) claim over the file's size (only files
        # claiming more), and how far into the dataset's ``moves`` that was counted (``published_unique``): the cap
        # of the published figure, kept apart from the event loop like ``excess``.
        self.unique_excess: dict[DatasetKey, dict[FileKey, int]] = {}
        self._unique_settled: dict[DatasetKey, tuple[list[str] | None, int, Catalog, int]] = {}

    def _changed(self, key: DatasetKey, nodes: bool = False) -> None:
        self.generation += 1
        self.versions[key] = self.generation
        if nodes:
            self.nodes_version = self.generation

    def apply(self, event: Inventory) -> bool:
        """Fold one event; True when its node should be asked for a snapshot (``InventoryRequest``)."""
        key = (event.dataset.namespace, event.dataset.name)
        nodes = self.datasets.setdefault(key, {})
        cache = nodes.get(event.node)
        before = cache.position if cache is not None else None
        after, ask = fold_node(before, event, track_blocks=False)
        if after is before:
            return ask  # old or redelivered
        self._changed(key, nodes=cache is None)
        if cache is None:
            cache = nodes[event.node] = NodeCache(position=after)
            self.node_entries[event.node] = self.node_entries.get(event.node, 0) + 1
        cache.position = after
        # A node's own cachedBytes never below zero (``_cached_bytes``), inline: this runs for every event.
        now_cached, was_cached = after.counters.cached_bytes, before.counters.cached_bytes if before else 0
        self._add_reported(key, (now_cached if now_cached > 0 else 0) - (was_cached if was_cached > 0 else 0))
        catalog = self.catalogs.get(key)
        if isinstance(event, InventorySnapshot):
            self._snapshot_part(key, cache, event, after, catalog)
        else:
            cache.pending, cache.pending_files = None, {}  # the shared fold drops an incomplete snapshot too
            self._change(key, cache, event.cached, event.evicted, catalog)
        self._held(key, event.node, cache)
        return ask

    def _held(self, key: DatasetKey, node: str, cache: NodeCache) -> None:
        cache.whole = None
        moves = self.moves.get(key)
        if moves is None:
            self.moves[key], self.moves_base[key] = [node], 0
        elif len(moves) >= MOVES_KEPT:
            dropped = len(moves) // 2
            del moves[:dropped]
            self.moves_base[key] += dropped
            moves.append(node)
        else:
            moves.append(node)
        if cache.current > 0:
            self.held.setdefault(key, {})[node] = cache.current
        else:
            held = self.held.get(key)
            if held is not None:
                held.pop(node, None)

    def _snapshot_part(self, key: DatasetKey, cache: NodeCache, part: InventorySnapshot, after: NodeInventory,
                       catalog: Catalog | None) -> None:
        gathering = (part.incarnation, part.seq - part.part + 1, part.parts)
        if cache.pending != gathering:
            cache.pending, cache.pending_files = gathering, {}
        _add(cache.pending_files, part.files)
        if after.assembly is None:  # complete: the snapshot replaces what the node had
            self._release_all(key, cache.files, catalog)
            cache.files, cache.pending, cache.pending_files = cache.pending_files, None, {}
            self._hold_all(key, cache.files, catalog)
            self._recount(cache, catalog)

    def _change(self, key: DatasetKey, cache: NodeCache, cached: list[CachedFile], evicted: list[CachedFile],
                catalog: Catalog | None) -> None:
        holders = self.holders.setdefault(key, {})
        # What this event adds to (or takes from) the node's ``total`` and ``current`` and the dataset's ``unique``,
        # summed in locals and applied once: this is the scheduler's busiest loop.
        total = current = unique = 0
        for item in cached:
            file = (item.mount, item.key, item.etag)
            counts = catalog is None or file in catalog
            blocks = cache.files.setdefault(file, {})
            shared = holders.setdefault(file, {})
            grown = added = 0
            for index, size in item.blocks:
                if size < 0:
                    size = 0  # see ``_add``
                before = blocks.get(index)
                blocks[index] = size
                holding, last = shared.get(index, _NO_HOLDER)
                if before is None:
                    grown += size
                    shared[index] = (holding + 1, size)
                else:
                    grown += size - before
                    shared[index] = (holding, size)
                added += size - last
            total += grown
            if counts:
                current += grown
                unique += added
        for item in evicted:
            file = (item.mount, item.key, item.etag)
            held = cache.files.get(file)
            if held is None:
                continue
            shared = holders.get(file, {})
            freed = gone = 0
            for index, _ in item.blocks:
                if index in held:
                    freed += held.pop(index)
                    gone += _release(shared, index)
            total -= freed
            if catalog is None or file in catalog:
                current -= freed
                unique -= gone
            if not held:
                del cache.files[file]
            if not shared:
                holders.pop(file, None)
        cache.total += total
        cache.current += current
        if not holders:
            del self.holders[key]
        self._add_unique(key, unique)

    def _add_unique(self, key: DatasetKey, change: int) -> None:
        if change:
            left = self.unique.get(key, 0) + change
            if left:
                self.unique[key] = left
            else:
                del self.unique[key]

    def _add_reported(self, key: DatasetKey, change: int) -> None:
        if change:
            left = self.reported.get(key, 0) + change
            if left:
                self.reported[key] = left
            else:
                del self.reported[key]

    def _hold_all(self, key: DatasetKey, files: dict[FileKey, dict[int, int]], catalog: Catalog | None) -> None:
        """Count ``files`` (a node's blocks, just taken on) in ``holders`` and ``unique``."""
        if not files:
            return
        holders = self.holders.setdefault(key, {})
        unique = 0
        for file, blocks in files.items():
            counts = catalog is None or file in catalog
            shared = holders.setdefault(file, {})
            for index, size in blocks.items():
                holding, last = shared.get(index, (0, 0))
                shared[index] = (holding + 1, size)
                if counts:
                    unique += size - last
        self._add_unique(key, unique)

    def _release_all(self, key: DatasetKey, files: dict[FileKey, dict[int, int]], catalog: Catalog | None) -> None:
        """Take ``files`` (a node's blocks, being dropped) out of ``holders`` and ``unique``."""
        holders = self.holders.get(key)
        if holders is None or not files:
            return
        unique = 0
        for file, blocks in files.items():
            shared = holders.get(file)
            if shared is None:
                continue
            counts = catalog is None or file in catalog
            for index in blocks:
                gone = _release(shared, index)
                if counts:
                    unique -= gone
            if not shared:
                del holders[file]
        if not holders:
            del self.holders[key]
        self._add_unique(key, unique)

    @staticmethod
    def _recount(cache: NodeCache, catalog: Catalog | None) -> None:
        cache.total = cache.current = 0
        for file, blocks in cache.files.items():
            size = sum(blocks.values())
            cache.total += size
            if catalog is None or file in catalog:
                cache.current += size

    def set_catalog(self, key: DatasetKey, catalog: Catalog | None) -> None:
        """A new manifest of the dataset (None: not known): which cached file versions count changes."""
        self._changed(key)
        if catalog is None:
            self.catalogs.pop(key, None)
        else:
            self.catalogs[key] = catalog
        for node, cache in self.datasets.get(key, {}).items():
            self._recount(cache, catalog)
            self._held(key, node, cache)
        unique = sum(size for file, blocks in self.holders.get(key, {}).items()
                     if catalog is None or file in catalog for _, size in blocks.values())
        self._add_unique(key, unique - self.unique.get(key, 0))

    def forget_dataset(self, key: DatasetKey) -> None:
        self._changed(key, nodes=True)
        for node in self.datasets.pop(key, {}):
            self._entry_gone(node)
        self.catalogs.pop(key, None)
        self.held.pop(key, None)
        self.excess.pop(key, None)
        self._settled.pop(key, None)
        self.unique_excess.pop(key, None)
        self._unique_settled.pop(key, None)
        self.holders.pop(key, None)
        self.unique.pop(key, None)
        self.reported.pop(key, None)
        self.moves.pop(key, None)
        self.moves_base.pop(key, None)
        self.versions.pop(key, None)  # after ``_changed``: ``generation`` and ``nodes_version`` still moved

    def forget_node(self, node: str) -> None:
        for key, nodes in self.datasets.items():
            if (cache := nodes.pop(node, None)) is not None:
                self._release_all(key, cache.files, self.catalogs.get(key))
                self._add_reported(key, -_cached_bytes(cache.position))
                self._changed(key, nodes=True)
                self.held.get(key, {}).pop(node, None)
                self._set_excess(key, node, 0)
                self.moves.pop(key, None)
                self.moves_base.pop(key, None)
        self.node_entries.pop(node, None)

    def _entry_gone(self, node: str) -> None:
        left = self.node_entries.get(node, 0) - 1
        if left > 0:
            self.node_entries[node] = left
        else:
            self.node_entries.pop(node, None)

    def nodes(self) -> set[str]:
        return set(self.node_entries)

    def caching_nodes(self) -> set[str]:
        """Nodes holding any block of any dataset."""
        return {node for nodes in self.datasets.values() for node, cache in nodes.items() if cache.total > 0}

    def blocks(self) -> int:
        """Cached blocks known, all datasets and nodes (memory follows this)."""
        return sum(len(blocks) for nodes in self.datasets.values() for cache in nodes.values()
                   for blocks in cache.files.values())

    def whole_files(self, key: DatasetKey, node: str) -> int:
        """Files of the current catalog the node holds every byte of."""
        catalog = self.catalogs.get(key)
        cache = self.datasets.get(key, {}).get(node)
        if catalog is None or cache is None:
            return 0
        if cache.whole is None:
            self._count(key, node, cache, catalog)
        assert cache.whole is not None
        return cache.whole

    def _count(self, key: DatasetKey, node: str, cache: NodeCache, catalog: Catalog | None) -> None:
        """Count the node's whole files and its ``excess``, in one pass over its files."""
        whole = excess = 0
        if catalog is not None:
            for file, blocks in cache.files.items():
                size = catalog.size(file)
                if size is not None:
                    claimed = sum(blocks.values())
                    if claimed >= size:
                        whole += claimed == size
                        excess += claimed - size
        cache.whole, cache.excess = whole, excess
        self._set_excess(key, node, excess)

    def _set_excess(self, key: DatasetKey, node: str, excess: int) -> None:
        if excess > 0:
            self.excess.setdefault(key, {})[node] = excess
        elif (over := self.excess.get(key)) is not None and over.pop(node, None) is not None and not over:
            del self.excess[key]

    def settle(self, key: DatasetKey) -> Mapping[str, int]:
        """Node → bytes its ``held`` entry of the dataset claims beyond the files' sizes (nodes claiming more only):
        blocks partition a file, so a node's blocks of one file adding up to more than its size are a stale block
        size or a lie, and count up to the size. Counted here, when decisions read ``held``, not in ``apply``: a cap
        per event cost the fold's busiest loop ~15 %. Only the nodes whose cache moved since the last count (the
        dataset's ``moves`` since, or every node not counted since it moved when those were dropped) are counted
        again, one pass over each one's files, the pass ``whole_files`` makes anyway for the best nodes."""
        nodes = self.datasets.get(key)
        if nodes is None:
            return {}
        moves, base = self.moves.get(key), self.moves_base.get(key, 0)
        settled = self._settled.get(key)
        since: Iterable[str] = nodes  # a new list of moves (a node forgotten), or dropped ones: every node
        if settled is not None and settled[0] is moves:
            start = settled[1] - base
            if moves is None:
                since = ()
            elif 0 <= start <= len(moves):
                since = set(moves[start:])
        catalog = self.catalogs.get(key)
        for node in since:
            cache = nodes.get(node)
            if cache is not None and cache.whole is None:
                self._count(key, node, cache, catalog)
        self._settled[key] = (moves, base + len(moves) if moves is not None else 0)
        return self.excess.get(key, {})

    def published_unique(self, key: DatasetKey) -> int:
        """``unique`` with each file version counting up to its size: what the scheduler publishes (the dataset's
        ``cachedPercentage``). Blocks partition a file, so the blocks of one file that the nodes hold, each once,
        adding up to more than its size are a stale block size or a lie: one node claiming 4 MiB of a 1 MiB file,
        or two nodes each within the size claiming different blocks. Counted here, when a figure is published,
        not in ``apply`` (see ``settle``): the files counted again are those of the nodes whose cache moved since
        the last count, and the files over their size then (a file the nodes evicted is in neither when it was
        within its size, and its bytes only fell); every held file when those moves were dropped or a node
        forgotten, or the catalog changed. Without a catalog no size is known and ``unique`` is as reported."""
        unique = self.unique.get(key, 0)
        catalog, holders = self.catalogs.get(key), self.holders.get(key)
        if catalog is None or holders is None:
            self.unique_excess.pop(key, None)
            self._unique_settled.pop(key, None)
            return unique
        moves, base = self.moves.get(key), self.moves_base.get(key, 0)
        reached = base + len(moves) if moves is not None else 0
        over = self.unique_excess.get(key, {})
        settled = self._unique_settled.get(key)
        files: Iterable[FileKey] = holders  # every held file
        if settled is not None and settled[0] is moves and settled[2] is catalog:
            start = settled[1] - base
            if settled[1] == reached:
                return unique - settled[3]  # nothing moved since (every dataset is asked every second)
            if moves is None:
                files = over
            elif 0 <= start <= len(moves):
                nodes = self.datasets.get(key, {})
                files = {file for node in set(moves[start:]) if (cache := nodes.get(node)) is not None
                         for file in cache.files}
                files.update(over)
        if files is holders:
            over = {}
        for file in list(files):
            size = catalog.size(file)
            claimed = sum(block for _, block in holders.get(file, {}).values()) if size is not None else 0
            if size is not None and claimed > size:
                over[file] = claimed - size
            else:
                over.pop(file, None)
        if over:
            self.unique_excess[key] = over
        else:
            self.unique_excess.pop(key, None)
        excess = sum(over.values())
        self._unique_settled[key] = (moves, reached, catalog, excess)
        return unique - excess


# Datasets whose per-node columns the live view keeps (each one int per known node): the datasets asked about
# lately; past this it starts over.
COLUMNS_KEPT = 256


@dataclass
class _Column:
    """One dataset's bytes per node of ``places`` (``LiveView.column``), its largest value, and how far into the
    fold's ``moves`` of the dataset it has read."""

    version: int
    places: Places
    column: list[int]
    peak: int
    moves: list[str] | None
    seen: int


@dataclass
class _Sum:
    """``LiveView.known`` of some datasets as of their change stamps, and how far into each one's moves it has
    read."""

    stamp: tuple[int, ...]
    places: Places
    sums: Sums
    seen: tuple[tuple[list[str] | None, int], ...]


# Sums of requested datasets kept by the live view (one int per known node each): the questions asked lately.
SUMS_KEPT = 64


@dataclass
class LiveView:
    """``domain.View`` over the fold, the datasets that exist (with their total bytes) and the nodes' labels.

    ``totals``: bytes of each existing dataset (its status' ufsTotalBytes); a dataset missing there is unknown.
    ``labels``: a node's labels from its last heartbeat; ``alive``: nodes whose heartbeat is fresh.
    ``labels_version``: a stamp that moves whenever a node's labels or liveness change (the handlers compare them
    once a second); with it, ``places`` is kept until the fold's node set or that stamp moves. Without it (None),
    ``places`` is worked out for every decision.
    """

    fold: CacheFold
    totals: Mapping[DatasetKey, int]
    node_labels: Callable[[str], Mapping[str, str]]
    alive: Callable[[], Iterable[str]]
    labels_version: Callable[[], object] | None = None
    # A node's agent as last heard of (None: agents not followed), and a dataset's nodeAffinity: the reasons of
    # filtered nodes read them.
    agents: Callable[[str], NodeAgent] | None = None
    affinities: Callable[[DatasetKey], Mapping[str, Any] | None] = lambda dataset: None
    _places: tuple[object, Places] | None = field(default=None, init=False, repr=False)
    # Dataset → its column as of a change stamp, for the places: kept while the places stay, patched from the fold's
    # moves when the dataset's cache changes.
    _columns: dict[DatasetKey, _Column] = field(default_factory=dict, init=False, repr=False)
    # Requested datasets (their ``Part``s) → their column sum, kept and patched the same way.
    _sums: dict[tuple[Part, ...], _Sum] = field(default_factory=dict, init=False, repr=False)

    def dataset_total(self, dataset: DatasetKey, paths: tuple[str, ...]) -> int | None:
        if dataset not in self.totals:
            return None
        catalog = self.fold.catalogs.get(dataset)
        if catalog is not None:
            return catalog.total_under(paths) if paths else catalog.total
        return 0 if paths else self.totals[dataset]

    def cached(self, dataset: DatasetKey, paths: tuple[str, ...]) -> Mapping[str, int]:
        if not paths:
            held = self.fold.held.get(dataset, {})
            excess = self.fold.settle(dataset)
            if not excess:
                return held  # kept by the fold; read, never written, by scoring
            return {node: size - over for node, size in held.items() if size > (over := excess.get(node, 0))}
        nodes = self.fold.datasets.get(dataset, {})
        catalog = self.fold.catalogs.get(dataset)
        if catalog is None:
            return {}
        held = {}
        for node, cache in nodes.items():
            size = 0
            for file, blocks in cache.files.items():
                if catalog.selects(file, paths):
                    size += min(sum(blocks.values()), catalog.size(file) or 0)  # a file up to its size (``settle``)
            if size > 0:
                held[node] = size
        return held

    def whole_files(self, dataset: DatasetKey, node: str) -> int:
        return self.fold.whole_files(dataset, node)

    def labels(self, node: str) -> Mapping[str, str]:
        return self.node_labels(node)

    def agent(self, node: str) -> NodeAgent | None:
        return self.agents(node) if self.agents is not None else None

    def affinity(self, dataset: DatasetKey) -> Mapping[str, Any] | None:
        return self.affinities(dataset)

    def nodes(self) -> set[str]:
        return self.fold.nodes() | set(self.alive())

    def caching_nodes(self) -> set[str]:
        return self.fold.caching_nodes()

    def column(self, dataset: DatasetKey, paths: tuple[str, ...], places: Places) -> tuple[list[int], int]:
        if paths:
            column = cast(list[int], list(map(self.cached(dataset, paths).get, places.nodes, itertools.repeat(0))))
            return column, max(column, default=0)
        excess = self.fold.settle(dataset)
        version = self.fold.versions.get(dataset, 0)
        kept = self._columns.get(dataset)
        if kept is not None and kept.places is places:
            if kept.version != version:
                self._patch(dataset, kept, version)
            if kept.version == version:
                return kept.column, kept.peak  # read, never written, by scoring
        column = cast(list[int], list(map(self.fold.held.get(dataset, {}).get, places.nodes, itertools.repeat(0))))
        for node, over in excess.items():
            spot = places.index.get(node)
            if spot is not None:
                column[spot] = max(column[spot] - over, 0)
        moves = self.fold.moves.get(dataset)
        if len(self._columns) >= COLUMNS_KEPT:
            self._columns.clear()
        self._columns[dataset] = _Column(version, places, column, max(column, default=0), moves,
                                         self._reached(dataset, moves))
        return column, self._columns[dataset].peak

    def known(self, parts: tuple[Part, ...], places: Places) -> Sums:
        columns = [(*self.column(key, paths, places), cap) for key, paths, cap in parts]  # each up to date
        if any(paths for _, paths, _ in parts):
            return Sums(add_columns(columns, len(places.nodes)))
        stamp = tuple(self.fold.versions.get(key, 0) for key, _, _ in parts)
        kept = self._sums.get(parts)
        if kept is not None and kept.places is places and (kept.stamp == stamp or self._patch_sum(parts, kept,
                                                                                                  columns)):
            kept.stamp = stamp
            return kept.sums  # the column read, never written, by scoring
        sums = Sums(add_columns(columns, len(places.nodes)))
        if len(self._sums) >= SUMS_KEPT:
            self._sums.clear()
        self._sums[parts] = _Sum(stamp, places, sums, self._seen(parts))
        return sums

    def _seen(self, parts: tuple[Part, ...]) -> tuple[tuple[list[str] | None, int], ...]:
        return tuple((log, self._reached(key, log)) for key, _, _ in parts for log in (self.fold.moves.get(key),))

    def _reached(self, dataset: DatasetKey, moves: list[str] | None) -> int:
        """The absolute place just after the last of the dataset's moves."""
        return self.fold.moves_base.get(dataset, 0) + len(moves) if moves is not None else 0

    def _since(self, dataset: DatasetKey, moves: list[str] | None, seen: int) -> list[str] | None:
        """The dataset's moves after the absolute place ``seen`` (None when the older ones were dropped)."""
        if moves is None:
            return []
        start = seen - self.fold.moves_base.get(dataset, 0)
        return moves[start:] if 0 <= start <= len(moves) else None

    def _patch_sum(self, parts: tuple[Part, ...], kept: _Sum,
                   columns: list[tuple[list[int], int, int]]) -> bool:
        """Bring a kept sum up to date at the nodes the parts' datasets moved since, when their moves reach back."""
        spots = set()
        index = kept.places.index
        for (key, _, _), (log, seen) in zip(parts, kept.seen, strict=True):
            moves = self.fold.moves.get(key)
            since = self._since(key, moves, seen) if moves is log else None
            if since is None:
                return False
            for node in since:
                spot = index.get(node)
                if spot is None:
                    return False
                spots.add(spot)
        total = cast(list[int], kept.sums.column)
        for spot in spots:
            total[spot] = sum(min(column[spot], cap) for column, _, cap in columns)
        if kept.sums.moved is not None:
            kept.sums.moved |= spots
        kept.seen = self._seen(parts)
        return True

    def _patch(self, dataset: DatasetKey, kept: _Column, version: int) -> None:
        """Bring a kept column up to ``version`` from the fold's moves since it was read, when they reach back."""
        moves = self.fold.moves.get(dataset)
        since = self._since(dataset, moves, kept.seen) if moves is not None and moves is kept.moves else None
        if since is None:
            return
        held, index, column = self.fold.held.get(dataset, {}), kept.places.index, kept.column
        excess = self.fold.excess.get(dataset, {})  # settled by ``column``
        peak, lowered = kept.peak, False
        for node in since:
            spot = index.get(node)
            if spot is None:
                return  # a node the places do not know: read every node again
            size = max(held.get(node, 0) - excess.get(node, 0), 0)
            lowered = lowered or (column[spot] == peak and size < peak)
            column[spot] = size
            peak = max(peak, size)
        kept.peak = max(column, default=0) if lowered else peak
        kept.seen, kept.version = self._reached(dataset, moves), version

    def places(self, zone_label: str, region_label: str) -> Places:
        if self.labels_version is None:
            return Places.of(self.nodes(), self.labels, zone_label, region_label)
        stamp = (self.fold.nodes_version, self.labels_version(), zone_label, region_label)
        if self._places is None or self._places[0] != stamp:
            self._places = (stamp, Places.of(self.nodes(), self.labels, zone_label, region_label))
        return self._places[1]
