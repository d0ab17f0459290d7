"""The local-directory object store: the ``ObjectStore`` protocol over files below one root folder.

This module owns the file-system I/O behind a local mount and decides what counts as an object: regular files
below the root, reached without leaving it. Symbolic links to files inside the root are followed; links to
folders are not (they could loop) and links out of the root are never followed. A link that loops or is not
followed, a file that cannot be stat'ed, or a folder nested beyond PATH_MAX, is listed as ``unusable`` with the
reason, so the sync reports it. Containment is checked on what was opened (its real path from ``/proc/self/fd``),
not on a path looked up again, so a folder replaced by a link while a listing runs or after a mount started cannot
lead a listing or a read out of the root; and the root's own real path must stay below the location's boundary (its
SHOAL_LOCAL_ROOTS root, or its claim). Keys are '/'-separated paths relative to the root; one with an empty, '.' or
'..' part, or an absolute one, names no object.

What a mount of the folder exposes: each file is served with its own owner and permission bits, minus the
read and execute bits of every class (owner, group, others) that could not pass through the folders above it
(from the root down), so a user who cannot read a file on the host cannot read it through the mount either.
Folder names themselves stay visible.

Blocking calls run in worker threads. A listing scans one page at a time and holds only the pending entries
of the folders on the current path, so memory does not grow with the size of the tree. Within each folder
entries are visited in an order that makes the whole listing sorted by key, like an S3 listing.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncGenerator
from types import TracebackType

from libs.paths import quoted_key
from libs.ufs.base import (
    OUT_OF_FILES,
    AccessDenied,
    LocalLocation,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    OutOfFiles,
    UfsError,
    files_exhausted,
    source_tag,
)


def _etag(st: os.stat_result, source: str = "") -> str:
    """Size and modification time: what changes when a file is rewritten, with no need to read it. Nothing
    node-specific (an inode, a ctime): nodes holding copies of one folder (``rsync -a``) see the same ETags, so a
    manifest listed on one node is read on every other. A file replaced by another of the same size and time
    (``cp -p``, ``touch -d``) is not seen.

    Then ``source``, a digest of the mount point as the spec names it (``source_tag``): a cached block is named by
    its mount's position, the key and the ETag, and a position moves when a mount before it is removed. Files of
    two mounts with one key, size and time (archives unpacked with a fixed time, as reproducible builds make
    them) would otherwise share their blocks after such a move, and the mount serve the other's bytes."""
    tag = f"{st.st_size:x}-{st.st_mtime_ns:x}"
    return f"{tag}-{source}" if source else tag


# Linux's PATH_MAX: a longer path is refused (ENAMETOOLONG) by every call that takes one, as it is by the reads.
PATH_MAX = 4096

# (mode, uid, gid) of a folder on the way from the root to a file.
Folder = tuple[int, int, int]


def served_mode(st: os.stat_result, folders: list[Folder]) -> int:
    """The file's permission bits, without those of a class that cannot search every folder above it.

    Conservative: a class keeps its bits through a folder only when that folder lets others search it, or the
    folder's owner (group) is the file's owner (group) and may search it. Set-id and sticky bits are dropped.
    """
    mode = st.st_mode & 0o777
    for folder_mode, folder_uid, folder_gid in folders:
        if folder_mode & 0o001:
            continue
        mode &= ~0o007
        if not (folder_gid == st.st_gid and folder_mode & 0o010):
            mode &= ~0o070
        if not (folder_uid == st.st_uid and folder_mode & 0o100):
            mode &= ~0o700
    return mode


def _info(key: str, st: os.stat_result, folders: list[Folder] | None = None, source: str = "") -> ObjectInfo:
    """The object; with ``folders`` (a listing, which knows them) also the mode and owner a mount serves."""
    etag = _etag(st, source)
    if folders is None:
        return ObjectInfo(key=key, size=st.st_size, etag=etag, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns)
    return ObjectInfo(key=key, size=st.st_size, etag=etag, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns,
                      mode=served_mode(st, folders), uid=st.st_uid, gid=st.st_gid)


def _unusable(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "is a symbolic link that loops"
    if err.errno == errno.ENAMETOOLONG:
        return f"has a path longer than the system's limit ({PATH_MAX} bytes): it cannot be opened"
    return f"cannot be read: {os.strerror(err.errno) if err.errno else type(err).__name__}"


# Links the listing does not follow, each reported by name (never by where it leads) so that a file missing from
# the mount has a reason in the dataset's status.
LINK_OUT = "leads out of the mounted folder (a symbolic link, not followed)"
LINK_TO_FOLDER = "is a symbolic link to a folder (not followed: it could loop)"
LINK_DANGLING = "is a symbolic link to nothing"
NOT_A_FILE = "is not a regular file (a FIFO, socket or device: only files' bytes are served)"
# The folder fsck keeps at the root of an ext2/3/4 file system, readable by root only: the root of most volumes
# (a pvc:// dataset of a block-storage claim) has one, and the services do not run as root.
LOST_FOUND = "lost+found/"
LOST_FOUND_UNREADABLE = "is the file system's lost+found folder, which this process may not read"


def _left_out(key: str, reason: str) -> ObjectInfo:
    return ObjectInfo(key=key, size=0, etag="", mtime=0.0, unusable=reason)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _real_of(fd: int) -> str:
    """Where the file open as ``fd`` really is, as the kernel knows it. A path looked up again after a check can
    lead elsewhere (a folder on it replaced by a link meanwhile); the open file cannot."""
    return os.readlink(f"/proc/self/fd/{fd}")


def _open_inside(path: str, real_root: str, flags: int) -> int | None:
    """``path`` opened with ``flags``, or None when the file opened lies outside ``real_root`` (through a link, or
    a folder of the path swapped for one). OSError as ``os.open`` raises it."""
    fd = os.open(path, flags)
    try:
        if _inside(_real_of(fd), real_root):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class _Walk:
    """A depth-first scan of the tree that hands out up to ``n`` objects per call to ``page``.

    Plain state instead of a generator: a page runs in a worker thread, and a cancelled listing may leave that
    thread finishing its page after the caller is gone, which a suspended generator would not survive cleanly.
    No directory handle stays open between pages.
    """

    def __init__(self, root: str, real_root: str, source: str = "") -> None:
        self._root = root
        self._real_root = real_root
        self._source = source
        # One frame per folder on the current path: its key prefix and its unvisited entries, last one next.
        self._frames: list[tuple[str, list[tuple[str, str, bool]]]] = []
        # Mode and owner of each folder on the current path (one per frame), for ``served_mode``.
        self._folders: list[Folder] = []
        self._started = False

    def _scan(self, prefix: str) -> str | None:
        """Push the folder ``prefix`` (its entries, its mode and owner); the reason when it cannot be listed and
        is left out (the sync reports it) rather than failing the whole listing."""
        folder = os.path.join(self._root, prefix[:-1]) if prefix else self._root
        # A folder below the root is opened without following a link (it was a folder when its parent was read,
        # and may have been replaced by a link to anywhere since) and read through its descriptor, after checking
        # where the opened folder really is: the listing never leaves the root, whatever changes under it.
        flags = os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if prefix else 0)
        try:
            fd = _open_inside(folder, self._real_root, flags)
            if fd is None:
                if not prefix:
                    raise UfsError(f"local directory '{folder}' was replaced while listed: list it again")
                return None  # replaced by a link out of the root while we listed: left out like any such link
            try:
                st = os.fstat(fd)
                with os.scandir(fd) as entries:
                    # A folder sorts as "name/": then every key below it falls where S3 would put it among its
                    # siblings ("a-b" < "a/c" because '-' < '/').
                    children = []
                    for entry in entries:
                        is_dir = entry.is_dir(follow_symlinks=False)
                        children.append((entry.name + "/" if is_dir else entry.name, entry.name, is_dir))
            finally:
                os.close(fd)
        except (FileNotFoundError, NotADirectoryError) as err:
            if not prefix:
                if isinstance(err, NotADirectoryError):
                    raise UfsError(f"'{folder}' is a file, not a folder: mount the folder it is in") from err
                raise
            return None  # removed (or replaced by a file) while we listed: the next listing shows what is there now
        except PermissionError as err:
            if prefix == LOST_FOUND:
                return LOST_FOUND_UNREADABLE  # never the dataset's files: left out with the reason
            # Skipping it would look like its files were deleted.
            # The folder's path below the root is a key prefix: quoted as keys are.
            raise AccessDenied(f"permission denied listing local directory {quoted_key(folder)}") from err
        except OSError as err:
            if prefix and err.errno == errno.ELOOP:
                return None  # replaced by a link while we listed (O_NOFOLLOW): links to folders are not followed
            if prefix and err.errno == errno.ENAMETOOLONG:
                # A folder nested deeper than PATH_MAX: nothing below it can be opened by its path, here or by a
                # read, so it is left out with the reason; one such folder used to fail the whole dataset.
                return _unusable(err)
            raise
        children.sort(reverse=True)
        self._frames.append((prefix, children))
        self._folders.append((st.st_mode, st.st_uid, st.st_gid))
        return None

    def page(self, n: int) -> list[ObjectInfo]:
        if not self._started:
            self._started = True
            self._scan("")
        found: list[ObjectInfo] = []
        while self._frames and len(found) < n:
            prefix, children = self._frames[-1]
            if not children:
                self._frames.pop()
                self._folders.pop()
                continue
            _, name, is_dir = children.pop()
            key = prefix + name
            if is_dir:
                unusable = self._scan(key + "/")
                if unusable is not None:
                    found.append(_left_out(key + "/", unusable))
                continue
            path = os.path.join(self._root, key)
            try:
                # O_PATH opens nothing (a FIFO or a device does not block) and follows a link, and the check is
                # on the file opened: a link out of the root, or a folder above swapped for one, is left out.
                fd = _open_inside(path, self._real_root, os.O_PATH)
                if fd is None:
                    found.append(_left_out(key, LINK_OUT))
                    continue
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            except (FileNotFoundError, NotADirectoryError):
                if os.path.islink(path):
                    found.append(_left_out(key, LINK_DANGLING))
                continue  # else removed while we listed
            except PermissionError as err:
                raise AccessDenied(f"permission denied reading '{path}'") from err
            except OSError as err:
                # A link that loops (ELOOP), or one file the system cannot stat: the rest of the tree is fine.
                found.append(_left_out(key, _unusable(err)))
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(_info(key, st, self._folders, self._source))
            elif stat.S_ISDIR(st.st_mode):  # only through a link: the folders themselves were entered above
                found.append(_left_out(key, LINK_TO_FOLDER))
            else:  # reported like the links left out, not missing in silence
                found.append(_left_out(key, NOT_A_FILE))
        return found


class LocalObjectStore:
    """Read-only access to the regular files below ``location.root``."""

    def __init__(self, location: LocalLocation) -> None:
        # abspath does no I/O; links in the root itself are resolved when checking containment.
        self._root = os.path.abspath(location.root)
        self._source = source_tag(location.source)
        # The folder the root's real path must stay below (the claim, or the SHOAL_LOCAL_ROOTS root), checked at
        # each listing and read: a folder on the root's path may be replaced by a link after the mount started.
        boundary = location.claim_root or location.local_root
        self._boundary = os.path.abspath(boundary) if boundary is not None else None
        # Resolved once, at the first listing or read (off the event loop, as they are): the boundary is the
        # operator's setting (or the claim's folder), not the user's to move, and resolving it at every read would
        # add its path's lookups to each block read.
        self._real_boundary: str | None = None

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={self._root!r})"

    async def __aenter__(self) -> LocalObjectStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: no file stays open between calls."""

    async def list(self, page_size: int = 1000) -> AsyncGenerator[ObjectInfo, None]:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        walk: _Walk | None = None

        def next_page() -> list[ObjectInfo]:
            nonlocal walk
            if walk is None:  # the root's checks in the first page's thread hop (small folders need one)
                walk = _Walk(self._root, self._real_root(), self._source)
            return walk.page(page_size)

        while True:
            try:
                page = await asyncio.to_thread(next_page)
            except FileNotFoundError as err:
                raise self._no_root() from err
            for info in page:
                yield info
            if len(page) < page_size:
                return

    async def head(self, key: str) -> ObjectInfo:
        self._check_key(key)
        return await asyncio.to_thread(self._head, key)

    async def names_object(self) -> bool:
        """Whether the root is a regular file (its listing fails: it is not a directory)."""
        return await asyncio.to_thread(os.path.isfile, self._root)

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        self._check_key(key)
        if length == 0:
            return b""
        return await asyncio.to_thread(self._read, key, start, length, etag)

    def _real_root(self) -> str:
        if not os.path.exists(self._root):
            raise self._no_root()
        if not os.path.isdir(self._root):
            raise NoSuchBucket(f"local path '{self._root}' is not a directory")
        real = os.path.realpath(self._root)
        if self._boundary is not None and self._real_boundary is None:
            self._real_boundary = os.path.realpath(self._boundary)
        if self._real_boundary is not None and not _inside(real, self._real_boundary):
            raise AccessDenied(f"local directory '{self._root}' now leads to '{real}', outside '{self._boundary}': "
                               "refused")
        return real

    def _no_root(self) -> NoSuchBucket:
        """The root is not there to list: missing, or a link to nothing or that loops (which ``ls`` shows, so
        "does not exist" would send the reader looking in the wrong place)."""
        try:
            os.stat(self._root)
        except OSError as err:
            if err.errno == errno.ELOOP:
                where = "is a symbolic link" if os.path.islink(self._root) else "has a symbolic link on its path"
                return NoSuchBucket(f"local directory '{self._root}' {where} that loops")
        if os.path.islink(self._root):
            return NoSuchBucket(f"local directory '{self._root}' is a symbolic link to nothing")
        return NoSuchBucket(f"local directory '{self._root}' does not exist")

    def _is_version(self, st: os.stat_result, etag: str) -> bool:
        """Whether the file is at version ``etag``: as listed now, or as a listing from before versions named their
        mount gave it (read until the next sync lists it again, not refused as changed)."""
        return etag in (_etag(st, self._source), _etag(st))

    def _check_key(self, key: str) -> None:
        parts = key.split("/")
        if os.path.isabs(key) or "\0" in key or any(part in ("", ".", "..") for part in parts):
            raise NoSuchKey(f"key {quoted_key(key)} is not a relative path below local directory '{self._root}'")

    def _resolve(self, key: str) -> tuple[str, str]:
        """The real path of ``key`` and of the root; NoSuchKey if it lies outside the root through a link."""
        real_root = self._real_root()
        real = os.path.realpath(os.path.join(self._root, key))
        if not _inside(real, real_root):
            raise self._outside(key)
        return real, real_root

    def _outside(self, key: str) -> NoSuchKey:
        return NoSuchKey(f"key {quoted_key(key)} leads outside local directory '{self._root}'")

    def _no_key(self, key: str) -> NoSuchKey:
        return NoSuchKey(f"file {quoted_key(key)} does not exist in local directory '{self._root}'")

    def _changed(self, key: str, etag: str) -> ObjectChanged:
        return ObjectChanged(f"file {quoted_key(key)} in local directory '{self._root}' changed: its ETag is no longer "
                             f"{etag}")

    def _denied(self, key: str) -> AccessDenied:
        return AccessDenied(f"permission denied reading {quoted_key(key)} in local directory '{self._root}'")

    def _head(self, key: str) -> ObjectInfo:
        real, real_root = self._resolve(key)
        try:
            fd = _open_inside(real, real_root, os.O_PATH)
            if fd is None:
                raise self._outside(key)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise self._no_key(key) from err
        except PermissionError as err:
            raise self._denied(key) from err
        if not stat.S_ISREG(st.st_mode):
            raise self._no_key(key)
        return _info(key, st, source=self._source)

    def _read(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        # The file opened is checked, not only the path: a folder of the path replaced by a link after the check
        # would otherwise redirect the read.
        real, real_root = self._resolve(key)
        try:
            # Looked at before it is opened for reading (O_PATH opens nothing): opening a FIFO put where a file was
            # listed would block, and opening some devices acts on them (a tape rewinds). Then the same file is
            # opened again through its descriptor, non-blocking, so nothing swapped in meanwhile is read.
            found = _open_inside(real, real_root, os.O_PATH)
            if found is None:
                raise self._outside(key)
            try:
                if not stat.S_ISREG(os.fstat(found).st_mode):
                    raise self._no_key(key)
                fd = os.open(f"/proc/self/fd/{found}", os.O_RDONLY | os.O_NONBLOCK)
            finally:
                os.close(found)
            with open(fd, "rb") as file:
                st = os.fstat(file.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise self._no_key(key)
                # fstat of the open file: the ETag checked is the one of the bytes we are about to read.
                if etag is not None and not self._is_version(st, etag):
                    raise self._changed(key, etag)
                file.seek(start)
                data = file.read(length)
                # And again after: a file rewritten in place while it was read gave bytes of the new version (or
                # of both) that the reader would keep as the old one's, on every node, until the next sync.
                if etag is not None and not self._is_version(os.fstat(file.fileno()), etag):
                    raise self._changed(key, etag)
                return data
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise self._no_key(key) from err
        except PermissionError as err:
            raise self._denied(key) from err
        except OSError as err:
            if err.errno in OUT_OF_FILES:
                raise OutOfFiles(f"cannot read {quoted_key(key)} in local directory '{self._root}': "
                                 f"{files_exhausted(err.errno)}", err.errno) from err
            raise UfsError(f"cannot read {quoted_key(key)} in local directory '{self._root}': {err.strerror}") from err
