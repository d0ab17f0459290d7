"""The file tree of one mounted dataset, built from its manifest: inodes, names, attributes. Pure.

Which paths make the tree (folder markers, a folder shadowing a file of the same name, unusable names) is decided
by ``libs.paths``, the same rules the sync applied when it wrote the manifest.

``ls``, ``stat`` and ``find`` are answered from here and never reach the object store. Inode numbers are stable
for a (path, ETag) across manifest reloads, so open files keep reading the version they opened, while a file
whose object changed gets a new inode (and the kernel drops its cached pages for it).

Memory: a dataset may have millions of files (ImageNet 1.28M), so the tree is columns, not an object per file:
every inode has a slot, and a folder's children are consecutive slots in name order (a lookup is a binary search
in that range; a listing is the range). Per file it keeps its manifest entry, its name, and two 8-byte numbers
(inode, parent slot); a ``Node`` is a view made when asked for. The (mount, key) index the peer server and the
loader's parts use is the same tree, found by path: the sync writes a key's path as its mount's prefix and the key.
"""

from __future__ import annotations

import bisect
import math
import stat
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from libs import paths
from libs.events.dataset import ManifestEntry

ROOT_INODE = 1
# Read-only tree: files r--r--r--, directories r-xr-xr-x, so every user of the node can read the dataset.
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
MAX_NAME = paths.MAX_NAME_BYTES
# Times that still fit time_t (pyfuse3 splits nanoseconds into seconds and a remainder): 3 billion years.
MAX_SECONDS = 1e17
MAX_TIME_NS = int(MAX_SECONDS) * 1_000_000_000


def time_ns(seconds: float, exact_ns: int | None = None) -> int:
    """A time in nanoseconds: ``exact_ns`` where the listing gave it (a float of seconds is only exact to ~250 ns
    today: a local file's time would be served off by that), else from ``seconds``. Infinities land on the
    bounds; NaN (no order) is the epoch."""
    if exact_ns is not None:
        return max(-MAX_TIME_NS, min(MAX_TIME_NS, exact_ns))
    if math.isnan(seconds):
        return 0
    return int(max(-MAX_SECONDS, min(MAX_SECONDS, seconds)) * 1e9)


def entry_time_ns(entry: ManifestEntry) -> int:
    return time_ns(entry.mtime, entry.mtime_ns)


class Node(NamedTuple):
    """One inode of a tree, as a view made when asked for (``Namespace`` keeps columns, not these)."""

    inode: int
    name: str
    parent: int  # a folder's inode; the root's is its own
    entry: ManifestEntry | None  # None for folders
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return self.entry is None

    @property
    def size(self) -> int:
        return self.entry.size if self.entry else 0


class InodeAllocator:
    """Hands out inode numbers, reusing the number a (path, ETag) had in the previous tree (a folder's identity is
    its path); a number is never given to another identity. Only the last tree built is remembered (it is the one
    being served): a dataset re-synced every few minutes whose files keep changing would otherwise keep every version
    it ever served."""

    def __init__(self) -> None:
        self.last: Namespace | None = None
        self._next = ROOT_INODE + 1

    def take(self) -> int:
        inode = self._next
        self._next += 1
        return inode


# A folder's children while a tree is built: name → its entry, or None for a folder.
_Children = dict[str, "ManifestEntry | None"]


class Namespace:
    def __init__(self, names: list[str], parents: array[int], inodes: array[int], entries: list[ManifestEntry | None],
                 times: dict[int, int], ranges: dict[int, tuple[int, int]], prefixes: dict[int, str],
                 others: dict[tuple[int, str], ManifestEntry], skipped: paths.Skipped | None = None) -> None:
        # Slot → name, parent slot, inode, entry (None: a folder); slot 0 is the root. A folder's time in ns (the
        # latest below it) by slot; a file's is its entry's (``entry_time_ns``: it may not fit 64 bits).
        self._names = names
        self._parents = parents
        self._inodes = inodes
        self._entries = entries
        self._times = times
        # Folder slot → the slots of its children, [start, end), in name order.
        self._ranges = ranges
        # Mount → what the paths of its objects start with (the key follows); entries found otherwise (a manifest
        # not written by the sync, skipped entries) by (mount, key).
        self._prefixes = prefixes
        self._others = others
        self.skipped = skipped or paths.Skipped()
        self.total_bytes = sum(entry.size for entry in entries if entry is not None)
        self.by_key = KeyIndex(self)
        # Inode → slot: the first tree's inodes are its slots in order (one subtraction); a reloaded tree's keep
        # their old numbers and are found by binary search in (inode, slot) sorted by inode.
        self._base = inodes[0] if inodes else 0
        self._sorted: array[int] | None = None
        self._order: array[int] | None = None
        if any(inode != self._base + slot for slot, inode in enumerate(inodes)):
            order = sorted(range(len(inodes)), key=inodes.__getitem__)
            self._sorted = array("q", (inodes[slot] for slot in order))
            self._order = array("q", order)

    @classmethod
    def build(cls, entries: Iterable[ManifestEntry], allocator: InodeAllocator, mtime: float = 0.0) -> Namespace:
        """The tree of ``entries`` by the rules of ``libs.paths``; what those rules leave out is in ``skipped``.

        The sync writes only paths the rules allow, so nothing is skipped for its manifests; the rules are applied
        again here so that any other manifest gives the same tree the sync would have, never a wrong one.
        """
        skipped = paths.Skipped()
        folders = paths.Folders()
        usable = []
        others: dict[tuple[int, str], ManifestEntry] = {}
        for entry in entries:
            problem = paths.relative_problem(entry.path[1:]) if entry.path.startswith("/") else "is not '/'-rooted"
            if problem is not None:
                skipped.add(entry.path, problem, entry.mount)
                others[entry.mount, entry.key] = entry
                continue
            folders.note(entry.path)
            usable.append(entry)
        # Folder path ('' for the root, else '/a/b') → its children and its time (the latest below it).
        children: dict[str, _Children] = {"": {}}
        times = {"": time_ns(mtime)}
        cls._gather(usable, folders, skipped, others, children, times)
        del usable
        tree = cls._lay_out(children, times, allocator, others, skipped)
        allocator.last = tree
        return tree

    @staticmethod
    def _gather(usable: list[ManifestEntry], folders: paths.Folders, skipped: paths.Skipped,
                others: dict[tuple[int, str], ManifestEntry], children: dict[str, _Children],
                times: dict[str, int]) -> None:
        base = times[""]  # a new folder's time before what is below it raises it
        for entry in usable:
            if folders.shadows(entry.path):
                skipped.add(entry.path, paths.SHADOWED, entry.mount)
                others[entry.mount, entry.key] = entry
                continue
            marker = paths.is_folder(entry.path)
            # A marker ('/a/b/') makes its folder; a file ('/a/b/c') is a name in its folder ('' for the root).
            folder, _, name = (entry.path[:-1], "", "") if marker else entry.path.rpartition("/")
            if folder not in children:
                missing = []
                while folder not in children:  # its folders, up to the first one that exists
                    missing.append(folder)
                    folder = folder.rpartition("/")[0]
                for made in reversed(missing):
                    parent, _, made_name = made.rpartition("/")
                    children[parent][made_name] = None  # a folder (a file of its path was shadowed above)
                    children[made] = {}
                    times[made] = base
                folder = missing[0]
            # The root is a folder too: its time is the latest below it (left at the base, `tar` and `ls -l` of
            # its parent showed the mount folder at the epoch). Times only grow upwards: stop at one already later.
            mtime_ns = entry_time_ns(entry)
            up = folder
            while times[up] < mtime_ns:
                times[up] = mtime_ns
                if not up:
                    break
                up = up.rpartition("/")[0]
            if marker:
                continue
            siblings = children[folder]
            if name in siblings:
                skipped.add(entry.path, paths.DUPLICATE, entry.mount)
                others[entry.mount, entry.key] = entry
                continue
            siblings[name] = entry

    @classmethod
    def _lay_out(cls, children: dict[str, _Children], times: dict[str, int], allocator: InodeAllocator,
                 others: dict[tuple[int, str], ManifestEntry], skipped: paths.Skipped) -> Namespace:
        """The columns, folder by folder (each one's children in name order, in consecutive slots), with the inode
        each identity had in the allocator's last tree."""
        last = allocator.last
        names = [""]
        parents = array("q", [0])
        inodes = array("q", [ROOT_INODE])
        entries: list[ManifestEntry | None] = [None]
        slot_times = {0: times[""]}
        ranges: dict[int, tuple[int, int]] = {}
        prefixes: dict[int, str] = {}
        # (slot, path, the same folder's slot in the last tree or -1) of each folder, in the order laid out.
        queue = [(0, "", 0 if last is not None else -1)]
        for slot, path, old in queue:
            kids = children.pop(path)
            start = len(names)
            for name in sorted(kids):
                entry = kids[name]
                found = last._child(old, name) if old >= 0 and last is not None else -1
                child = len(names)
                names.append(name)
                parents.append(slot)
                entries.append(entry)
                if entry is None:
                    kept = found >= 0 and last is not None and last._entries[found] is None
                    child_path = f"{path}/{name}"
                    slot_times[child] = times.pop(child_path)
                    queue.append((child, child_path, found if kept else -1))
                else:
                    kept = found >= 0 and last is not None and (old_entry := last._entries[found]) is not None \
                        and old_entry.etag == entry.etag
                    cls._index_key(entry, prefixes, others)
                inodes.append(last._inodes[found] if kept and last is not None else allocator.take())
            ranges[slot] = (start, len(names))
        return cls(names, parents, inodes, entries, slot_times, ranges, prefixes, others, skipped)

    @staticmethod
    def _index_key(entry: ManifestEntry, prefixes: dict[int, str], others: dict[tuple[int, str], ManifestEntry]
                   ) -> None:
        """Note how ``entry`` is found by (mount, key): by its mount's prefix, else in ``others``."""
        key = entry.key
        prefix = entry.path[:len(entry.path) - len(key)] if key and entry.path.endswith(key) else None
        if prefix is not None and prefixes.setdefault(entry.mount, prefix) == prefix:
            return
        others[entry.mount, key] = entry

    def _child(self, folder: int, name: str) -> int:
        """The slot of ``name`` in the folder at slot ``folder``, or -1."""
        span = self._ranges.get(folder)
        if span is None:
            return -1
        start, end = span
        at = bisect.bisect_left(self._names, name, start, end)
        return at if at < end and self._names[at] == name else -1

    def _slot(self, inode: int) -> int:
        if self._order is None or self._sorted is None:
            slot = inode - self._base
            return slot if 0 <= slot < len(self._inodes) else -1
        at = bisect.bisect_left(self._sorted, inode)
        return self._order[at] if at < len(self._sorted) and self._sorted[at] == inode else -1

    def _node(self, slot: int) -> Node:
        entry = self._entries[slot]
        return Node(self._inodes[slot], self._names[slot], self._inodes[self._parents[slot]], entry,
                    self._times[slot] if entry is None else entry_time_ns(entry))

    def __len__(self) -> int:
        """Inodes in the tree (files and folders, the root included)."""
        return len(self._inodes)

    def __contains__(self, inode: object) -> bool:
        return isinstance(inode, int) and self._slot(inode) >= 0

    def lookup(self, parent: int, name: str) -> Node | None:
        slot = self._slot(parent)
        if slot < 0 or self._entries[slot] is not None:
            return None
        if name == ".":
            return self._node(slot)
        if name == "..":
            return self._node(self._parents[slot])
        child = self._child(slot, name)
        return self._node(child) if child >= 0 else None

    def get(self, inode: int) -> Node | None:
        slot = self._slot(inode)
        return self._node(slot) if slot >= 0 else None

    def _span(self, inode: int) -> tuple[int, int]:
        """The slots [start, end) of the children of the folder ``inode`` (empty for a file or an unknown inode)."""
        slot = self._slot(inode)
        span = self._ranges.get(slot) if slot >= 0 else None
        return span if span is not None else (0, 0)

    def children(self, inode: int) -> list[Node]:
        """Children in name order, so readdir offsets stay stable."""
        return list(self.listed(inode, 0))

    def listed(self, inode: int, position: int) -> Iterator[Node]:
        """The children of the folder ``inode`` from the ``position``-th on, in name order, each made when asked
        for: a readdir page of a folder of a million files costs the page, not the folder."""
        start, end = self._span(inode)
        return (self._node(child) for child in range(start + max(position, 0), end))

    def child_names(self, inode: int) -> list[str]:
        """The names of the folder's children, in name order (a listing's positions)."""
        start, end = self._span(inode)
        return self._names[start:end]

    def position_after(self, inode: int, name: str) -> int:
        """The position in the folder's listing of the first child named after ``name`` (names are sorted)."""
        start, end = self._span(inode)
        return bisect.bisect_right(self._names, name, start, end) - start

    def nodes(self) -> Iterator[Node]:
        """Every inode of the tree, the root first."""
        return (self._node(slot) for slot in range(len(self._inodes)))

    def files(self) -> Iterable[ManifestEntry]:
        return (entry for entry in self._entries if entry is not None)

    def find(self, path: str) -> ManifestEntry | None:
        """The entry of the file at ``path`` ('/a/b'), or None (no such file, or a folder)."""
        slot = 0
        for name in path.strip("/").split("/"):
            slot = self._child(slot, name)
            if slot < 0:
                return None
        return self._entries[slot]

    def entry_of(self, mount: int, key: str) -> ManifestEntry | None:
        """The manifest's entry for ``key`` of mount ``mount`` (the tree's, else one the tree left out)."""
        prefix = self._prefixes.get(mount)
        if prefix is not None and key:
            entry = self.find(prefix + key)
            if entry is not None and entry.mount == mount and entry.key == key:
                return entry
        return self._others.get((mount, key))

    def mode(self, node: Node) -> int:
        return DIR_MODE if node.is_dir else FILE_MODE


class KeyIndex(Mapping[tuple[int, str], ManifestEntry]):
    """A tree's entries by (mount, key), as the peer server and the loader's parts ask (``Namespace.entry_of``)."""

    def __init__(self, tree: Namespace) -> None:
        self._tree = tree

    def __getitem__(self, key: tuple[int, str]) -> ManifestEntry:
        entry = self._tree.entry_of(*key)
        if entry is None:
            raise KeyError(key)
        return entry

    def get(self, key: tuple[int, str], default: ManifestEntry | None = None) -> ManifestEntry | None:  # type: ignore[override]
        entry = self._tree.entry_of(*key)
        return default if entry is None else entry

    def _keys(self) -> dict[tuple[int, str], None]:
        keys = {(entry.mount, entry.key): None for entry in self._tree._others.values()}
        keys.update(((entry.mount, entry.key), None) for entry in self._tree.files())
        return keys

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())
