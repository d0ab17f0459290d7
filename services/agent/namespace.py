"""The file tree of one mounted dataset, built from its manifest: inodes, names, attributes. Pure.

Which paths make the tree (folder markers, a folder shadowing a file of the same name, unusable names) is decided
by ``libs.paths``, the same rules the sync applied when it wrote the manifest.

``ls``, ``stat`` and ``find`` are answered from here and never reach the object store. Inode numbers are stable
for a (path, ETag) across manifest reloads, so open files keep reading the version they opened, while a file
whose object changed gets a new inode (and the kernel drops its cached pages for it).

Memory: a dataset may have millions of files (ImageNet 1.28M), so the tree is columns, not an object per file:
every inode has a slot, and a folder's children are consecutive slots in name order (a lookup is a binary search
in that range; a listing is the range). Per file it keeps its name, inode and parent slot, and its manifest entry
as columns too (mount, size, time, ETag: ~150 bytes a file in all, an entry object alone took ~400); a ``Node`` is a
view made when asked for, and a ``ManifestEntry`` is built only when one is asked for (opening a file, a look-up by
key). The (mount, key) index the peer server and the loader's parts use is the same tree, found by path: the sync
writes a key's path as its mount's prefix and the key, so a key is its path after that prefix.
"""

from __future__ import annotations

import bisect
import math
import stat
from array import array
from collections.abc import Iterable, Iterator, Mapping

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


class Node:
    """One inode of a tree, as a view made when asked for (``Namespace`` keeps columns, not these). Its manifest
    entry is built only when asked for (``entry``: opening the file, a reload's removed files)."""

    __slots__ = ("_slot", "_tree", "inode", "local", "mtime_ns", "name", "parent", "size")

    def __init__(self, inode: int, name: str, parent: int, mtime_ns: int, size: int, local: ManifestEntry | None,
                 tree: Namespace | None, slot: int) -> None:
        self.inode = inode
        self.name = name
        self.parent = parent  # a folder's inode; the root's is its own
        self.mtime_ns = mtime_ns
        self.size = size
        # The entry of a file the columns do not hold (a local file's mode and owner, a path not the sync's), which
        # attributes are built from; None for the others and for folders.
        self.local = local
        self._tree = tree  # None: a folder
        self._slot = slot

    @property
    def is_dir(self) -> bool:
        return self._tree is None

    @property
    def entry(self) -> ManifestEntry | None:
        """The file's manifest entry (None for folders), built from the tree's columns."""
        return None if self._tree is None else self._tree._entry(self._slot)

    def same_file(self, other: Node) -> bool:
        """Whether ``other`` (of another tree) has the same entry: both folders, or files equal in every field."""
        if self._tree is None or other._tree is None:
            return self._tree is other._tree
        return self._tree._facts(self._slot) == other._tree._facts(other._slot)

    def __repr__(self) -> str:
        return f"Node(inode={self.inode}, name={self.name!r}, parent={self.parent}, dir={self.is_dir})"


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
    def __init__(self, columns: _Columns, times: dict[int, int], ranges: dict[int, tuple[int, int]],
                 prefixes: dict[int, str], others: dict[tuple[int, str], ManifestEntry],
                 skipped: paths.Skipped | None = None) -> None:
        # Slot → name, parent slot, inode, and a file's manifest entry as columns (``_Columns``); slot 0 is the
        # root. A folder's time in ns (the latest below it) by slot; a file's is its entry's (``entry_time_ns``).
        self._names = columns.names
        self._parents = columns.parents
        self._inodes = columns.inodes
        self._mounts = columns.mounts
        self._sizes = columns.sizes
        self._mtimes = columns.mtimes
        self._etags = bytes(columns.etags)
        self._etag_ends = columns.etag_ends
        # File slot → its entry, for the files the columns cannot give back as they were (``_Columns.fits``).
        self._whole = columns.whole
        self._times = times
        # Folder slot → the slots of its children, [start, end), in name order (every folder has one).
        self._ranges = ranges
        # Mount → what the paths of its objects start with (the key follows); entries found otherwise (a manifest
        # not written by the sync, skipped entries) by (mount, key).
        self._prefixes = prefixes
        self._others = others
        self.skipped = skipped or paths.Skipped()
        self.total_bytes = sum(self._sizes) + sum(entry.size for entry in self._whole.values())
        self.by_key = KeyIndex(self)
        inodes = self._inodes
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
        columns = _Columns()
        slot_times = {0: times[""]}
        ranges: dict[int, tuple[int, int]] = {}
        prefixes: dict[int, str] = {}
        # (slot, path, the same folder's slot in the last tree or -1) of each folder, in the order laid out.
        queue = [(0, "", 0 if last is not None else -1)]
        for slot, path, old in queue:
            kids = children.pop(path)
            start = len(columns.names)
            for name in sorted(kids):
                entry = kids[name]
                found = last._child(old, name) if old >= 0 and last is not None else -1
                child = len(columns.names)
                if entry is None:
                    columns.add_folder(name, slot)
                    kept = found >= 0 and last is not None and found in last._ranges
                    child_path = f"{path}/{name}"
                    slot_times[child] = times.pop(child_path)
                    queue.append((child, child_path, found if kept else -1))
                else:
                    columns.add_file(name, slot, entry, cls._index_key(entry, prefixes, others))
                    kept = found >= 0 and last is not None and found not in last._ranges \
                        and last._etag(found) == entry.etag
                columns.inodes.append(last._inodes[found] if kept and last is not None else allocator.take())
            ranges[slot] = (start, len(columns.names))
        return cls(columns, slot_times, ranges, prefixes, others, skipped)

    @staticmethod
    def _index_key(entry: ManifestEntry, prefixes: dict[int, str], others: dict[tuple[int, str], ManifestEntry]
                   ) -> bool:
        """Note how ``entry`` is found by (mount, key): by its mount's prefix (True: its key is its path after the
        prefix), else in ``others``."""
        key = entry.key
        prefix = entry.path[:len(entry.path) - len(key)] if key and entry.path.endswith(key) else None
        if prefix is not None and prefixes.setdefault(entry.mount, prefix) == prefix:
            return True
        others[entry.mount, key] = entry
        return False

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
        inode, name, parent = self._inodes[slot], self._names[slot], self._inodes[self._parents[slot]]
        if slot in self._ranges:
            return Node(inode, name, parent, self._times[slot], 0, None, None, slot)
        whole = self._whole.get(slot)
        if whole is not None:
            return Node(inode, name, parent, entry_time_ns(whole), whole.size, whole, self, slot)
        return Node(inode, name, parent, time_ns(self._mtimes[slot]), self._sizes[slot], None, self, slot)

    def _etag(self, slot: int) -> str:
        whole = self._whole.get(slot)
        if whole is not None:
            return whole.etag
        return self._etags[self._etag_ends[slot - 1] if slot else 0:self._etag_ends[slot]].decode()

    def _path(self, slot: int) -> str:
        names = []
        while slot:
            names.append(self._names[slot])
            slot = self._parents[slot]
        return "/" + "/".join(reversed(names))

    def _entry(self, slot: int, path: str | None = None) -> ManifestEntry | None:
        """The manifest entry of the file at ``slot`` (None: a folder), as the manifest had it."""
        if slot in self._ranges:
            return None
        whole = self._whole.get(slot)
        if whole is not None:
            return whole
        mount = self._mounts[slot]
        path = self._path(slot) if path is None else path
        return ManifestEntry(path=path, mount=mount, key=path[len(self._prefixes[mount]):], size=self._sizes[slot],
                             etag=self._etag(slot), mtime=self._mtimes[slot])

    def _facts(self, slot: int) -> tuple[object, ...]:
        """What tells the file at ``slot`` from another of the same path without building its entry."""
        whole = self._whole.get(slot)
        if whole is not None:
            return (whole,)
        mount = self._mounts[slot]
        return (mount, self._prefixes[mount], self._sizes[slot], self._mtimes[slot], self._etag(slot))

    def __len__(self) -> int:
        """Inodes in the tree (files and folders, the root included)."""
        return len(self._inodes)

    def __contains__(self, inode: object) -> bool:
        return isinstance(inode, int) and self._slot(inode) >= 0

    def lookup(self, parent: int, name: str) -> Node | None:
        slot = self._slot(parent)
        if slot < 0 or slot not in self._ranges:
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

    def files(self) -> Iterator[ManifestEntry]:
        """Every file's entry, each built when reached."""
        for slot in range(len(self._inodes)):
            entry = self._entry(slot)
            if entry is not None:
                yield entry

    def _find(self, path: str) -> int:
        slot = 0
        for name in path.strip("/").split("/"):
            slot = self._child(slot, name)
            if slot < 0:
                return -1
        return slot

    def find(self, path: str) -> ManifestEntry | None:
        """The entry of the file at ``path`` ('/a/b'), or None (no such file, or a folder)."""
        slot = self._find(path)
        return self._entry(slot) if slot >= 0 else None

    def entry_of(self, mount: int, key: str) -> ManifestEntry | None:
        """The manifest's entry for ``key`` of mount ``mount`` (the tree's, else one the tree left out)."""
        prefix = self._prefixes.get(mount)
        if prefix is not None and key:
            path = prefix + key
            slot = self._find(path)
            if slot >= 0 and slot not in self._ranges:
                whole = self._whole.get(slot)
                if whole is None and self._mounts[slot] == mount:
                    return self._entry(slot, path)
                if whole is not None and whole.mount == mount and whole.key == key:
                    return whole
        return self._others.get((mount, key))

    def entries_apart(self) -> Iterable[ManifestEntry]:
        """The entries found by (mount, key) apart from the tree's paths: those the rules left out (``skipped``), and
        files whose key is not their path after their mount's prefix. Few: only a manifest not written by the sync
        has any."""
        return self._others.values()

    def mode(self, node: Node) -> int:
        return DIR_MODE if node.is_dir else FILE_MODE


class _Columns:
    """The columns of a tree being laid out. A file's entry is kept as its mount, size, time and ETag (its path is
    its place in the tree and its key that path after its mount's prefix); one the columns could not give back
    equal (a local file's mode, owner and exact time, a key not at the end of its path, a size or mount out of a
    column's range, an ETag that is not text) is kept whole, by slot."""

    def __init__(self) -> None:
        self.names = [""]
        self.parents = array("q", [0])
        self.inodes = array("q", [ROOT_INODE])
        self.mounts = array("H", [0])
        self.sizes = array("q", [0])
        self.mtimes = array("d", [0.0])
        # Every slot's ETag, one after another (a folder's is empty), each ending at its offset in ``etag_ends``.
        self.etags = bytearray()
        self.etag_ends = array("q", [0])
        self.whole: dict[int, ManifestEntry] = {}

    def add_folder(self, name: str, parent: int) -> None:
        self._add(name, parent, 0, 0, 0.0, b"")

    def add_file(self, name: str, parent: int, entry: ManifestEntry, keyed: bool) -> None:
        etag = self.fits(entry, keyed)
        if etag is None:
            self.whole[len(self.names)] = entry
            self._add(name, parent, 0, 0, 0.0, b"")
        else:
            self._add(name, parent, entry.mount, entry.size, entry.mtime, etag)

    @staticmethod
    def fits(entry: ManifestEntry, keyed: bool) -> bytes | None:
        """The entry's ETag as bytes where the columns give the entry back equal, else None."""
        if not keyed or entry.mtime_ns is not None or entry.mode is not None or entry.uid is not None \
                or entry.gid is not None or not 0 <= entry.mount <= 0xFFFF or not 0 <= entry.size < 2**63:
            return None
        try:
            return entry.etag.encode()
        except UnicodeEncodeError:  # a lone surrogate
            return None

    def _add(self, name: str, parent: int, mount: int, size: int, mtime: float, etag: bytes) -> None:
        self.names.append(name)
        self.parents.append(parent)
        self.mounts.append(mount)
        self.sizes.append(size)
        self.mtimes.append(mtime)
        self.etags += etag
        self.etag_ends.append(len(self.etags))


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
