"""The FUSE edge of the agent: a read-only pyfuse3 filesystem over a dataset's namespace and block reader.

This is the only place that speaks errno (docs/semantics.md lists them): unknown names → ENOENT, names over 255
bytes → ENAMETOOLONG, any write → EROFS, an object that changed or was deleted under us → ESTALE (the tree is
older than the store: ``shoal resync``), the object store failing → EIO (may pass), no descriptor left for a GET
(the process's ``RLIMIT_NOFILE``, or the system's) → EMFILE or ENFILE (passes as descriptors close). Files are immutable
(ETag-pinned), so they are opened with ``keep_cache`` and warm re-reads are served by the kernel page cache
without reaching this process. With the project's patched pyfuse3 (``deploy/pyfuse3``) the mount goes further and
answers ``open`` and ``opendir`` with ENOSYS: the kernel then sends no OPEN, RELEASE, OPENDIR or RELEASEDIR again
for the life of the mount, keeps files' pages and caches folder listings itself, and reads name their file by
inode (``no_open``). A warm small file then costs this process nothing at all. ``time_operations`` times every
handler for /metrics, in one wrapper per handler. A failed read is remembered (``read_failures``: the mount's
status, hence the runtime's and dataset's conditions) and logged at most once per file and errno every 30 s, with
the count of those not logged (``log_limiter``).
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NamedTuple, TypeVar

import pyfuse3

from libs.events.dataset import ManifestEntry
from libs.redact import cut_error, hide_signing, strip_userinfo
from libs.telemetry import get_logger
from libs.ufs.base import NoSuchKey, ObjectChanged, OutOfFiles, UfsError
from services.agent.namespace import MAX_NAME, Namespace, Node
from services.agent.reader import BlockReader, OpenFile
from services.agent.readfailures import LOG_INTERVAL_SECONDS, LogLimiter, ReadFailures
from services.agent.streams import FileStreams, Stream

log = get_logger(__name__)

# Names and attributes may be cached by the kernel for a year, i.e. until told otherwise, so a warm `find` or
# `stat` never reaches this process, however long a training run lasts (it used to be 300 s: every name looked up
# again five minutes later). Safe because the tree only changes when a new manifest is loaded, and then
# ``replace_namespace`` names every entry that went away or changed (a new ETag is a new inode) and every inode
# whose attributes changed (a folder's mtime, a local file's mode or owner), which the mount invalidates in the
# kernel; unknown names are not cached (ENOENT, not a negative entry).
ENTRY_TIMEOUT = 365 * 86400.0
ATTR_TIMEOUT = 365 * 86400.0
# An open that would write: for writing, or truncating. Not O_APPEND, which only changes where writes go: a
# read-only filesystem opens O_RDONLY | O_APPEND for reading. (O_CREAT never arrives: the kernel strips it from an
# open, and a new name comes as ``create``.)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
# uid_t/gid_t are 32 bits and -1 means "none"; pyfuse3 raises on a larger value, and a request whose handler
# raises is never answered (the caller hangs). Out-of-range owners are served as nobody (the kernel's overflow id).
MAX_ID = 2**32 - 2
NOBODY = 65534
# st_size is signed 64-bit in the kernel.
MAX_INT64 = 2**63 - 1
# The patched pyfuse3 passes the inode as the handle of a read or readdir the kernel sends without one (fh 0), so
# the mount can answer open and opendir with ENOSYS; stock pyfuse3 cannot, and the mount opens files as before.
NO_OPEN = bool(getattr(pyfuse3, "NO_OPEN_HANDLE_IS_INODE", False))
# Without opens there are no releases: a read stream's state (its read-ahead, the blocks fetched ahead and the node
# budget they hold) is dropped once nothing has read on it for this long (``close_idle``, every second).
IDLE_HANDLE_SECONDS = 5.0
# ...and a file a reload removed stays readable by the descriptors opened before (as an open handle kept it): the
# entries of the files removed last, this many, are kept for their inodes (a few hundred bytes each).
REMOVED_FILES_KEPT = 65_536
# With stock pyfuse3 (every `ls` comes back to the mount), a walk (`find`, `ls -lR`) of the whole mount would
# otherwise keep attributes for every file, more bytes than the tree itself: the cache keeps about this many of the
# ones used last. 64k covers the largest folders (ImageNet's validation set is 50k files in one); a larger walk
# rebuilds them from the tree's columns as it goes.
ATTRIBUTES_KEPT = 65_536


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A cache of about ``size`` of the values used last, in two generations: values go into the young one; when it
    is full it becomes the old one (the previous old one is dropped), and a value found in the old one moves back to
    the young. O(1) a call, at most ~2x ``size`` kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        value = self._young.get(key)
        if value is None:
            value = self._old.pop(key, None)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        if key in self._young:
            return
        self._young[key] = value
        if len(self._young) >= self.size:
            self._old, self._young = self._young, {}

    def clear(self) -> None:
        self._young, self._old = {}, {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


def _owner_id(value: int | None, fallback: int) -> int:
    if value is None:
        return fallback
    return value if 0 <= value <= MAX_ID else NOBODY


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


# The FUSE request handlers of pyfuse3 (its Operations' coroutines), by name: the ``operation`` label of their
# latency. Bounded: the names pyfuse3 defines.
FUSE_OPERATIONS = tuple(name for name, value in vars(pyfuse3.Operations).items()
                        if inspect.iscoroutinefunction(value))


def time_operations(fs: pyfuse3.Operations, observer: Callable[[str], Callable[[float], None]]) -> list[str]:
    """Time every FUSE handler ``fs`` implements, in one wrapper per handler: ``observer(name)`` gives the
    function told each request's seconds (raised errors included). It is asked at the first request of ``name``,
    not here: an operation's series (a histogram: 19 of them) are made when it is first served, so a read-only
    mount shows none for the write operations it only refuses, nor for those nobody asked for. Handlers ``fs``
    leaves to pyfuse3 (ENOSYS: the kernel stops asking) are left alone. Returns the names wrapped."""
    wrapped = []
    for name in FUSE_OPERATIONS:
        if getattr(type(fs), name) is getattr(pyfuse3.Operations, name):
            continue
        # pyfuse3 looks each handler up on the instance per request, so an instance attribute takes its place.
        setattr(fs, name, _timed(getattr(fs, name), functools.partial(observer, name)))
        wrapped.append(name)
    return wrapped


def _timed(handler: Callable[..., Awaitable[Any]],
           resolve: Callable[[], Callable[[float], None]]) -> Callable[..., Awaitable[Any]]:
    clock = time.perf_counter
    observe: Callable[[float], None] | None = None

    async def timed(*args: Any, **kwargs: Any) -> Any:
        nonlocal observe
        started = clock()
        try:
            return await handler(*args, **kwargs)
        finally:
            if observe is None:
                observe = resolve()
            observe(clock() - started)

    return timed


class TreeChanges(NamedTuple):
    """How a new tree differs from the one served (``old``), as ``DatasetFS.replace_namespace`` needs it."""

    old: Namespace
    gone: list[tuple[int, str]]  # (parent inode, name) of the entries that went away or are another inode now
    changed: list[int]  # inodes kept whose attributes changed
    relisted: set[int]  # folders whose listing changed (some may be gone)
    removed: dict[int, ManifestEntry]  # the files no longer in the tree, by inode
    entry_changed: list[int]  # files kept whose manifest entry changed


def tree_changes(old: Namespace, new: Namespace) -> TreeChanges:
    """What changed from ``old`` to ``new``. Pure, and only reads both trees: a mount works it out in a thread, as
    it takes seconds for a tree of a million files (two walks and a lookup per inode), which the event loop serving
    every FUSE request spent stalled."""
    gone = []
    changed = []
    relisted: set[int] = set()
    removed: dict[int, ManifestEntry] = {}
    entry_changed = []
    for node in old.nodes():
        current = new.get(node.inode)
        if node.inode != node.parent:
            found = new.lookup(node.parent, node.name)
            if found is None or found.inode != node.inode:
                gone.append((node.parent, node.name))
                relisted.add(node.parent)
                if current is None and (entry := node.entry) is not None:
                    removed[node.inode] = entry
                continue
        # Compared by their columns: building two entries per file of a million-file tree is what the columns save.
        if current is not None:
            same = current.same_file(node)
            if not same or current.mtime_ns != node.mtime_ns:
                changed.append(node.inode)
                if not same:
                    entry_changed.append(node.inode)
    for node in new.nodes():
        if node.inode != node.parent and node.parent not in relisted:
            found = old.lookup(node.parent, node.name)
            if found is None or found.inode != node.inode:
                relisted.add(node.parent)
    return TreeChanges(old, gone, changed, relisted, removed, entry_changed)


class DatasetFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, namespace: Namespace, reader: BlockReader, uid: int | None, gid: int | None,
                 block_size: int, clock: Callable[[], float] = time.time,
                 log_interval: float = LOG_INTERVAL_SECONDS, no_open: bool = NO_OPEN) -> None:
        super().__init__()
        self.no_open = no_open
        self.namespace = namespace
        self.reader = reader
        # The Dataset's owner, which overrides a local file's own; None: the file's own owner (root for objects).
        self.uid = uid
        self.gid = gid
        self.block_size = block_size
        # Failed reads: remembered for the status file, logged through the limiter (``services.agent.readfailures``).
        self.clock = clock
        self.read_failures = ReadFailures()
        self.log_limiter: LogLimiter[tuple[str, str]] = LogLimiter(log_interval)  # (path, errno)
        self._handles: dict[int, OpenFile] = {}  # open file handle → its read state
        # With ``no_open``: inode → the read streams of a file read lately (``services.agent.streams``).
        self._streams: dict[int, FileStreams] = {}
        # With ``no_open``: inode → the entry of a file a reload removed, newest last (``REMOVED_FILES_KEPT``).
        self._removed: dict[int, ManifestEntry] = {}
        self._next_fh = 1
        # Attributes never change for an inode, so each is built once (readdirplus of a large folder is the hot
        # path of `find` and `ls -l`; without opens the kernel keeps them instead, see ``readdir``); the cache is
        # dropped with the namespace it describes.
        self._attribute_cache: Recent[int, pyfuse3.EntryAttributes] = Recent(ATTRIBUTES_KEPT)
        # Open folder handle (with ``no_open``, folder inode) → (its inode, None while its readdir offsets index
        # the listing of the tree served, else the names of the listing they index: a reload changed it since), see
        # ``readdir``. Listings are never built whole: the first page of a folder of 300,000 files took 5 s.
        self._folders: dict[int, tuple[int, list[str] | None]] = {}

    def replace_namespace(self, namespace: Namespace, changes: TreeChanges | None = None,
                          ) -> tuple[list[tuple[int, str]], list[int], list[int]]:
        """Swap in a new tree; returns, for invalidation in the kernel, (parent inode, name) of the entries that
        went away, the inodes kept whose attributes changed, and the folders kept whose listing changed (the
        kernel may hold their listing: ``no_open``). ``changes``: ``tree_changes`` from the tree served to this
        one, worked out beforehand off the event loop (the mount's reload); made here if not given."""
        old = self.namespace
        if changes is None or changes.old is not old:
            changes = tree_changes(old, namespace)
        self.namespace = namespace
        self._attribute_cache.clear()
        gone, changed, relisted = changes.gone, changes.changed, changes.relisted
        if self.no_open:
            self._removed.update(changes.removed)
            for inode in changes.entry_changed:
                self._forget_read_state(inode)
        # A file's read state stays until it is idle (an open descriptor may still read a file the tree no longer
        # has, as with an open handle). A file kept whose entry changed (the same path and object, e.g. under
        # another mount index once a mount before it was removed) lost its state above: a state outlives opens, so
        # the next read, from an old descriptor or a new one, must build it from the new entry (the old one may
        # name a store that is gone: ESTALE for good).
        # A folder whose listing changed keeps the names of the one its readers' offsets index (``readdir`` finds
        # their place in the new one). Without opendir there is no releasedir to drop them: only those folders are
        # kept; the others would list the same names at the same offsets, and a folder that went away has no
        # readers left.
        folders: dict[int, tuple[int, list[str] | None]] = {}
        for key, (folder, names) in self._folders.items():
            if folder in relisted:
                if folder in namespace or not self.no_open:
                    folders[key] = (folder, names if names is not None else old.child_names(folder))
            elif not self.no_open:
                folders[key] = (folder, names)
        self._folders = folders
        if self.no_open:
            for inode in list(self._removed)[:max(0, len(self._removed) - REMOVED_FILES_KEPT)]:
                del self._removed[inode]
        return gone, changed, sorted(inode for inode in relisted if inode in namespace)

    # --- metadata ---

    def _attributes(self, node: Node, keep: bool = True) -> pyfuse3.EntryAttributes:
        """``node``'s attributes, built once and kept when ``keep`` (see ``readdir`` for when not)."""
        cached = self._attribute_cache.get(node.inode)
        if cached is not None:
            return cached
        try:
            attrs = self._build_attributes(node)
        except Exception as err:
            # Never let an exception out of a handler: pyfuse3 would leave the request unanswered and the
            # caller (stat, ls) blocked for good. One EIO, and a log line saying which entry.
            log.exception("cannot build attributes", path=node.local.path if node.local else node.name)
            raise pyfuse3.FUSEError(errno.EIO) from err
        if keep:
            self._attribute_cache.put(node.inode, attrs)
        return attrs

    def _build_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        # Every value is brought into the range its kernel field holds: see MAX_ID.
        entry = node.local  # a local file's mode and owner (the columns keep none)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = self.namespace.mode(node)
        if entry is not None and entry.mode is not None:
            # A local file's own bits (already narrowed by its folders), read-only like the whole mount.
            attrs.st_mode = stat.S_IFREG | (entry.mode & 0o555)
        attrs.st_nlink = 2 if node.is_dir else 1
        size = _clamp(node.size, 0, MAX_INT64)
        attrs.st_size = size
        attrs.st_uid = _owner_id(self.uid, _owner_id(entry.uid, 0) if entry is not None else 0)
        attrs.st_gid = _owner_id(self.gid, _owner_id(entry.gid, 0) if entry is not None else 0)
        attrs.st_mtime_ns = attrs.st_ctime_ns = attrs.st_atime_ns = node.mtime_ns
        attrs.st_blksize = self.block_size
        attrs.st_blocks = (size + 511) // 512
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.generation = 0
        return attrs

    def _node(self, inode: int) -> Node:
        node = self.namespace.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if len(name) > MAX_NAME:
            # The kernel passes FUSE names up to 1 KiB; no name in the tree is that long, but ENOENT would
            # tell the caller the name could exist.
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        node = self.namespace.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(node)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens folders itself from now on, caching listings
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._folders[fh] = (inode, None)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # An offset is a position in the folder's listing, made a page at a time from the tree (never whole: the
        # kernel asks for ~30 entries at a time, and the first of a huge folder must come at once). When a reload
        # changed the listing meanwhile, a large folder read a page at a time goes on in the new listing after the
        # last name it was given (names are sorted), so no entry comes twice or is skipped; an entry added before
        # it is not shown. Positions in the new listing would shift by every name added or removed before them.
        opened = self._folders.get(fh)
        if opened is None:
            if not self.no_open:
                raise pyfuse3.FUSEError(errno.EBADF)
            if not self._node(fh).is_dir:  # ``fh`` is the folder's inode
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            opened = self._folders[fh] = (fh, None)
        inode, names = opened
        if names is not None:
            if 0 < start_id <= len(names):
                start_id = self.namespace.position_after(inode, names[start_id - 1])
            self._folders[fh] = (inode, None)
        # Without opens the kernel keeps the listing and every entry's attributes, so a folder is listed here about
        # once: its attributes are not kept (they were: `find` of 300,000 files left the mount 80 MiB larger, half
        # again what its tree holds). With opens every `ls` lists it here again, from the attributes kept.
        keep = not self.no_open
        reply = pyfuse3.readdir_reply
        for position, node in enumerate(self.namespace.listed(inode, start_id), start_id):
            if not reply(token, os.fsencode(node.name), self._attributes(node, keep), position + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._folders.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        total = self.namespace.total_bytes
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = (total + 4095) // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.namespace)
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = MAX_NAME
        return stats

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ENOSYS, not ENODATA: the kernel then answers every later getxattr of the mount itself (EOPNOTSUPP), and
        # `ls -l` stops asking after the first file. With ENODATA each file cost two requests here (`ls` asks for
        # its ACL and its security label) that the kernel never caches: `ls -l` of a 20k-file folder took 7 s.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    # --- data ---

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.no_open:
            # The kernel takes ENOSYS as success and opens every file itself from now on, with keep_cache; a
            # write never gets here (the mount is read-only: the kernel refuses it first).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            raise _erofs()
        entry = node.entry
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = self.reader.open(entry)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies from any buffer (PyObject_GetBuffer), so a view into a cached block is not copied.
        stream: Stream | None = None
        if self.no_open:
            stream = self._stream(fh, off, size)  # ``fh`` is the file's inode
            handle = stream.state
            stream.reading += 1  # not idle meanwhile; ``finally`` dates its end
        elif (found := self._handles.get(fh)) is not None:
            handle = found
        else:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            data = await self.reader.read(handle, off, size)
        except (ObjectChanged, NoSuchKey) as err:
            # The object was overwritten or deleted since the sync: the tree is stale, not the store down.
            self._report(handle, err, errno.ESTALE)
            raise pyfuse3.FUSEError(errno.ESTALE) from err
        except OutOfFiles as err:
            # No descriptor for the GET (or the local file): the process's limit, not the store. The reader is told
            # so (EMFILE or ENFILE, "Too many open files"), and the next read works once descriptors close.
            self._report(handle, err, err.errno)
            raise pyfuse3.FUSEError(err.errno) from err
        except UfsError as err:
            self._report(handle, err, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from err
        except Exception as err:
            # pyfuse3 ends the whole session on any other exception, taking every reader down with ENOTCONN;
            # one failed read must stay one EIO.
            log.exception("unexpected read failure", path=handle.entry.path)
            self._report(handle, err, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from err
        finally:
            if stream is not None:
                stream.reading -= 1
                stream.last_read = self.clock()  # idle from when its last read ended, not began
        if self.read_failures.files:  # a file that failed reads again: it is fine now
            self.read_failures.succeeded(handle.entry.path)
        return data

    def _stream(self, inode: int, offset: int, length: int) -> Stream:
        """The read stream of ``inode`` a read of ``length`` bytes at ``offset`` belongs to (``FileStreams.pick``)."""
        streams = self._streams.get(inode)
        if streams is None:
            first = self._read_state(inode)
            streams = self._streams[inode] = FileStreams()
            stream, _ = streams.pick(offset, length, self.clock(), lambda: first)
            return stream
        entry = streams.entry_state().entry
        stream, displaced = streams.pick(offset, length, self.clock(), lambda: self.reader.open(entry))
        for state in displaced:
            self.reader.close(state)
        return stream

    def _read_state(self, inode: int) -> OpenFile:
        node = self.namespace.get(inode)
        if node is None:
            # A descriptor opened before a reload that removed the file: its blocks still read (ETag-pinned: a
            # block no longer in the cache and changed in the store is ESTALE), as through an open handle.
            removed = self._removed.get(inode)
            if removed is None:  # removed too long ago to be remembered
                raise pyfuse3.FUSEError(errno.ESTALE)
            return self.reader.open(removed)
        entry = node.entry
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return self.reader.open(entry)

    def every_second(self, now: float) -> None:
        """The mount's once-a-second upkeep (its status reporter's tick)."""
        self.flush_read_failures(now)
        self.close_idle(now)

    def _forget_read_state(self, inode: int) -> None:
        streams = self._streams.pop(inode, None)
        for state in streams.states() if streams is not None else ():
            self.reader.close(state)

    def close_idle(self, now: float) -> None:
        """With ``no_open``: drop the read streams nothing read for ``IDLE_HANDLE_SECONDS`` (there is no release to
        do it), giving back the read-ahead budget their blocks fetched ahead held. A stream with a read in flight is
        not idle, however long that read takes (a slow store): dropping its state would reset its read-ahead, and
        make a descriptor of a file a reload removed ESTALE while it was reading."""
        emptied = []
        for inode, streams in self._streams.items():
            for state in streams.idle(now, IDLE_HANDLE_SECONDS):
                self.reader.close(state)
            if streams.empty():
                emptied.append(inode)
        for inode in emptied:
            del self._streams[inode]

    def _report(self, handle: OpenFile, err: Exception, code: int) -> None:
        path, name, now = handle.entry.path, errno.errorcode[code], self.clock()
        error = cut_error(str(err))
        if code == errno.ESTALE:
            reason = f"the object changed or was deleted since the dataset was synced (resync it): {error}"
        elif isinstance(err, OutOfFiles):
            reason = f"the mount process could not open a file or socket: {error}"
        else:
            reason = f"the object store failed: {error}"
        # Status messages leave the node: no request signature or credentials in URLs, whatever the store quoted.
        self.read_failures.failed(path, name, hide_signing(strip_userinfo(reason)), now)
        suppressed = self.log_limiter.admit((path, name), now, error)
        if suppressed is None:
            return
        log.warning("read failed", path=path, errno=name, error=error, **({"not_logged": suppressed}
                                                                          if suppressed else {}))

    def flush_read_failures(self, now: float) -> None:
        """The summary line of each file whose failures were not all logged, once its log interval is over (the
        mount's status reporter calls this every second)."""
        for (path, name), suppressed, error in self.log_limiter.due(now):
            log.warning("read failures not logged", path=path, errno=name, count=suppressed, last_error=error,
                        interval_seconds=self.log_limiter.interval)
        others = self.log_limiter.others_due(now)
        if others is not None:
            path, name = others.key
            log.warning("read failures of more files not logged", count=others.count, last_path=path, errno=name,
                        last_error=others.detail, files_followed=self.log_limiter.most)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            self.reader.close(handle)

    # No flush(): pyfuse3 answers ENOSYS, after which the kernel stops sending FLUSH on every close().

    # --- everything that would write: read-only filesystem ---

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()
