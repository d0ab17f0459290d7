"""The file tree of one mounted dataset, built from its manifest: inodes, names, attributes. Pure.

Which paths make the tree (folder markers, a folder shadowing a file of the same name, unusable names) is decided
by ``libs.paths``, the same rules the sync applied when it wrote the manifest.

``ls``, ``stat`` and ``find`` are answered from here and never reach the object store. Inode numbers are stable
for a (path, ETag) across manifest reloads, so open files keep reading the version they opened, while a file
whose object changed gets a new inode (and the kernel drops its cached pages for it).
"""

from __future__ import annotations

import math
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


@dataclass
class Node:
    inode: int
    name: str
    parent: int
    entry: ManifestEntry | None = None  # None for directories
    children: dict[str, int] = field(default_factory=dict)
    mtime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        return self.entry is None

    @property
    def size(self) -> int:
        return self.entry.size if self.entry else 0


class InodeAllocator:
    """Hands out inode numbers, reusing the number a (path, etag) had in the previous tree; a number is never given
    to another identity. Only the identities of the last tree are kept (``tree``): a dataset re-synced every few
    minutes whose files keep changing would otherwise keep every version it ever served."""

    def __init__(self) -> None:
        self._by_identity: dict[tuple[str, str], int] = {("/", ""): ROOT_INODE}
        self._next = ROOT_INODE + 1
        self._building: dict[tuple[str, str], int] | None = None

    @contextmanager
    def tree(self) -> Iterator[None]:
        """While a tree is built: afterwards the identities it did not ask for are forgotten."""
        self._building = {("/", ""): ROOT_INODE}
        try:
            yield
            self._by_identity = self._building
        finally:
            self._building = None

    def inode_for(self, path: str, etag: str) -> int:
        identity = (path, etag)
        inode = self._by_identity.get(identity)
        if inode is None:
            inode = self._next
            self._next += 1
            self._by_identity[identity] = inode
        if self._building is not None:
            self._building[identity] = inode
        return inode


class Namespace:
    def __init__(self, nodes: dict[int, Node], skipped: paths.Skipped | None = None) -> None:
        self.nodes = nodes
        self.skipped = skipped or paths.Skipped()
        self.total_bytes = sum(node.size for node in nodes.values())
        # Sorted once per folder: readdir is called again for every ~30 entries of a large folder.
        self._sorted_children: dict[int, list[Node]] = {}

    @classmethod
    def build(cls, entries: Iterable[ManifestEntry], allocator: InodeAllocator, mtime: float = 0.0) -> Namespace:
        """The tree of ``entries`` by the rules of ``libs.paths``; what those rules leave out is in ``skipped``.

        The sync writes only paths the rules allow, so nothing is skipped for its manifests; the rules are applied
        again here so that any other manifest gives the same tree the sync would have, never a wrong one.
        """
        skipped = paths.Skipped()
        folders = paths.Folders()
        usable = []
        for entry in entries:
            problem = paths.relative_problem(entry.path[1:]) if entry.path.startswith("/") else "is not '/'-rooted"
            if problem is not None:
                skipped.add(entry.path, problem, entry.mount)
                continue
            folders.note(entry.path)
            usable.append(entry)
        root = Node(inode=ROOT_INODE, name="", parent=ROOT_INODE, mtime_ns=time_ns(mtime))
        nodes = {ROOT_INODE: root}
        with allocator.tree():
            cls._add(nodes, usable, folders, skipped, allocator)
        return cls(nodes, skipped)

    @staticmethod
    def _add(nodes: dict[int, Node], usable: list[ManifestEntry], folders: paths.Folders, skipped: paths.Skipped,
             allocator: InodeAllocator) -> None:
        root = nodes[ROOT_INODE]
        base = root.mtime_ns  # a new folder's time before what is below it raises it
        for entry in usable:
            if folders.shadows(entry.path):
                skipped.add(entry.path, paths.SHADOWED, entry.mount)
                continue
            # The root is a folder too: its time is the latest below it (left at the base, `tar` and `ls -l` of
            # its parent showed the mount folder at the epoch).
            mtime_ns = entry_time_ns(entry)
            root.mtime_ns = max(root.mtime_ns, mtime_ns)
            parts = entry.path.strip("/").split("/")
            marker = paths.is_folder(entry.path)
            parent = root
            path = ""
            for part in parts if marker else parts[:-1]:
                path += "/" + part
                child_inode = parent.children.get(part)
                if child_inode is None:
                    child_inode = allocator.inode_for(path + "/", "")
                    nodes[child_inode] = Node(inode=child_inode, name=part, parent=parent.inode, mtime_ns=base)
                    parent.children[part] = child_inode
                child = nodes[child_inode]  # a folder: files at folder paths were shadowed above
                child.mtime_ns = max(child.mtime_ns, mtime_ns)
                parent = child
            if marker:
                continue
            name = parts[-1]
            if name in parent.children:
                skipped.add(entry.path, paths.DUPLICATE, entry.mount)
                continue
            inode = allocator.inode_for(entry.path, entry.etag)
            nodes[inode] = Node(inode=inode, name=name, parent=parent.inode, entry=entry, mtime_ns=mtime_ns)
            parent.children[name] = inode

    def lookup(self, parent: int, name: str) -> Node | None:
        directory = self.nodes.get(parent)
        if directory is None or not directory.is_dir:
            return None
        if name == ".":
            return directory
        if name == "..":
            return self.nodes[directory.parent]
        inode = directory.children.get(name)
        return self.nodes.get(inode) if inode is not None else None

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def children(self, inode: int) -> list[Node]:
        """Children in name order, so readdir offsets stay stable."""
        cached = self._sorted_children.get(inode)
        if cached is not None:
            return cached
        directory = self.nodes.get(inode)
        if directory is None or not directory.is_dir:
            return []
        children = [self.nodes[i] for _, i in sorted(directory.children.items())]
        self._sorted_children[inode] = children
        return children

    def files(self) -> Iterable[ManifestEntry]:
        return (node.entry for node in self.nodes.values() if node.entry is not None)

    def mode(self, node: Node) -> int:
        return DIR_MODE if node.is_dir else FILE_MODE
