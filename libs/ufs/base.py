"""The object-store seam: what Shoal needs from an under file system (UFS), and the errors it raises.

Every implementation (S3 via aiobotocore, local directories, web folders through aiohttp) is idempotent and
read-only. Errors are ``UfsError`` subclasses whose message a person can act on, and whose ``retryable`` says
whether trying again later may help. Credentials live in ``Secret`` values and never appear in a message or a repr.
"""

from __future__ import annotations

import errno
import resource
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec
import xxhash

from libs.config import Secret


class ObjectInfo(msgspec.Struct, frozen=True):
    """One object (file) below a location. ``key`` is relative to the location's prefix, '/'-separated."""

    key: str
    size: int
    etag: str
    mtime: float
    # The same time in nanoseconds where the store has them (local files' st_mtime_ns), else None: a float of
    # seconds since 1970 is only exact to ~250 ns, so a local file's time would be served a little off.
    mtime_ns: int | None = None
    # Local files only: the permission bits and owner a mount serves (see libs.ufs.local); None for objects.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    # Why this listed entry cannot be read and is left out of the tree (a link that loops, a file that fails to
    # stat); "" for a usable object. The listing goes on, and the sync reports it with the other objects left out.
    unusable: str = ""


class UfsError(Exception):
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchBucket(UfsError):
    pass


class NoSuchKey(UfsError):
    pass


class AccessDenied(UfsError):
    pass


class EndpointUnreachable(UfsError):
    retryable = True


class ObjectChanged(UfsError):
    """The object no longer has the ETag we asked for: it was overwritten under us."""


class OutOfFiles(UfsError):
    """This process could open no file or socket for the request: EMFILE (its own ``RLIMIT_NOFILE``) or ENFILE (the
    system's table). Neither the store nor the disk is at fault, and it passes as descriptors close: retryable.
    ``errno`` is which one, for a FUSE read to fail with it rather than read as a store failure."""

    retryable = True

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors under it: ``__cause__``, else ``__context__`` (aiohttp keeps the OS one in
    ``os_error``)."""
    cause: BaseException | None = err
    for _ in range(10):  # chains are short; the bound only guards against a cycle
        if cause is None:
            return
        yield cause
        os_error = getattr(cause, "os_error", None)
        cause = os_error if isinstance(os_error, BaseException) else cause.__cause__ or cause.__context__


def out_of_files(errors: Iterator[BaseException], what: str) -> OutOfFiles | None:
    """``OutOfFiles`` for ``what`` (the request that failed) if one of ``errors`` is EMFILE or ENFILE, else None:
    said as the process's limit, not as an unreachable store."""
    for cause in errors:
        if isinstance(cause, OSError) and cause.errno in OUT_OF_FILES:
            return OutOfFiles(f"{what} failed: {files_exhausted(cause.errno)}", cause.errno)
    return None


def files_exhausted(code: int) -> str:
    """Why a file or socket could not be opened, when it is EMFILE or ENFILE, and what to do."""
    if code == errno.ENFILE:
        return ("the system's table of open files is full (ENFILE): raise fs.file-max, or close files elsewhere; "
                "reads work again as files close")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"this process has too many files open (EMFILE, its limit is {soft}): raise its RLIMIT_NOFILE "
            "(ulimit -n); reads work again as files close")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"
    path_style: bool = True
    access_key_id: Secret = field(default_factory=lambda: Secret(""))
    secret_access_key: Secret = field(default_factory=lambda: Secret(""))


def source_tag(mount_point: str) -> str:
    """What names a mount in the versions (ETags) its store gives files whose own validator comes from their size
    and time (``local://``, ``pvc://``, ``http://``): a digest of the mount point as the spec writes it, the same on
    every node. A cached block is named by its mount's position, the key and the version, and a position moves when
    a mount before it is removed: files of two mounts alike in key, size and time (archives unpacked with a fixed
    time, as reproducible builds make them) would otherwise share their blocks, and a mount serve the other's."""
    return xxhash.xxh3_64_hexdigest(mount_point.encode()) if mount_point else ""


@dataclass(frozen=True)
class LocalLocation:
    root: Path
    # pvc:// mounts: the folder where the volume claim is mounted (SHOAL_PVC_ROOT/<namespace>/<claim>). The
    # location must stay below it (checked on real paths, instead of SHOAL_LOCAL_ROOTS); if it is missing, the
    # claim does not exist (or is not mounted here). None for local:// mounts.
    claim_root: Path | None = None
    # local:// mounts: the SHOAL_LOCAL_ROOTS folder the mount lies below. The store checks at every listing and
    # read that the root's real path is still below it: a folder of the path replaced by a link after the mount
    # was checked (its owner may do that at any time) must not turn reads to files outside. None: not checked.
    local_root: Path | None = None
    # The mount point as the spec names it (local:///data/, pvc://claim/sub): part of every ETag (``source_tag``),
    # so a file's blocks are never taken for another mount's. Empty: none (a store opened on a bare folder).
    source: str = ""


# Listing limits of a web folder; why these numbers: libs.ufs.http.
DEFAULT_HTTP_MAX_DEPTH = 32
DEFAULT_HTTP_MAX_PAGES = 10_000
DEFAULT_HTTP_MAX_FILES = 1_000_000


@dataclass(frozen=True)
class HttpLocation:
    """A folder served by a web server with autoindex pages (Fluid's WebUFS): ``url`` is http(s)://host/path/."""

    url: str
    # Sub-folder levels followed below the mount: deeper means a loop (or a tree to mount lower down).
    max_depth: int = DEFAULT_HTTP_MAX_DEPTH
    # Listing pages fetched in one sync, the mount's own included.
    max_pages: int = DEFAULT_HTTP_MAX_PAGES
    # Files listed in one sync: each costs a HEAD and a manifest entry.
    max_files: int = DEFAULT_HTTP_MAX_FILES


Location = S3Location | LocalLocation | HttpLocation


class ObjectStore(Protocol):
    def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        """Every object below the location, page by page: memory stays bounded by one page. An entry that cannot
        be read is listed with ``unusable`` saying why, never dropped in silence."""
        ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def names_object(self) -> bool:
        """Whether the location itself is one object (a file), not a folder: an S3 prefix that is a key without its
        trailing '/', a local path that is a regular file. The sync asks when a listing finds nothing (or a local
        root is no folder), so that ``s3://bucket/dir/model.bin`` fails with what to mount instead of binding an
        empty dataset; False when it is not, or cannot be told."""
        ...

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end); with ``etag``, ObjectChanged on a mismatch."""
        ...

    async def close(self) -> None: ...
