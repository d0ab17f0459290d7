"""The file tree of one mounted dataset, built from its manifest: inodes, names, attributes. Pure.

``ls``, ``stat`` and ``find`` are answered from here and never reach the object store. Inode numbers are stable
for a (path, ETag) across manifest reloads, so open files keep reading the version they opened, while a file
whose object changed gets a new inode (and the kernel drops its cached pages for it).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from libs.events.dataset import ManifestEntry

ROOT_INODE = 1
# Read-only tree: files r--r--r--, directories r-xr-xr-x, so every user of the node can read the dataset.
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
MAX_NAME = 255


@dataclass
class Node:
    inode: int
    name: str
    parent: int
    entry: ManifestEntry | None = None  # None for directories
    children: dict[str, int] = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def is_dir(self) -> bool:
        return self.entry is None

    @property
    def size(self) -> int:
        return self.entry.size if self.entry else 0


class InodeAllocator:
    """Hands out inode numbers, reusing the number of a (path, etag) seen before."""

    def __init__(self) -> None:
        self._by_identity: dict[tuple[str, str], int] = {("/", ""): ROOT_INODE}
        self._next = ROOT_INODE + 1

    def inode_for(self, path: str, etag: str) -> int:
        identity = (path, etag)
        inode = self._by_identity.get(identity)
        if inode is None:
            inode = self._next
            self._next += 1
            self._by_identity[identity] = inode
        return inode


class Namespace:
    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes
        self.total_bytes = sum(node.size for node in nodes.values())
        # Sorted once per folder: readdir is called again for every ~30 entries of a large folder.
        self._sorted_children: dict[int, list[Node]] = {}

    @classmethod
    def build(cls, entries: Iterable[ManifestEntry], allocator: InodeAllocator, mtime: float = 0.0) -> Namespace:
        """The tree of ``entries``; entries with unusable paths ('..', empty parts, over-long names) are left out."""
        root = Node(inode=ROOT_INODE, name="", parent=ROOT_INODE, mtime=mtime)
        nodes = {ROOT_INODE: root}
        for entry in entries:
            parts = entry.path.strip("/").split("/")
            if any(part in ("", ".", "..") or len(part.encode()) > MAX_NAME or "\0" in part for part in parts):
                continue
            parent = root
            path = ""
            usable = True
            for part in parts[:-1]:
                path += "/" + part
                child_inode = parent.children.get(part)
                if child_inode is None:
                    child_inode = allocator.inode_for(path + "/", "")
                    nodes[child_inode] = Node(inode=child_inode, name=part, parent=parent.inode, mtime=mtime)
                    parent.children[part] = child_inode
                child = nodes[child_inode]
                if not child.is_dir:
                    usable = False  # a file and a folder share a name: S3 allows it, POSIX does not
                    break
                child.mtime = max(child.mtime, entry.mtime)
                parent = child
            name = parts[-1]
            if not usable or name in parent.children:
                continue
            inode = allocator.inode_for(entry.path, entry.etag)
            nodes[inode] = Node(inode=inode, name=name, parent=parent.inode, entry=entry, mtime=entry.mtime)
            parent.children[name] = inode
        return cls(nodes)

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
