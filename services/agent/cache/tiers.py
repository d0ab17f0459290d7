"""Storage of one cache tier: block bytes in memory or in checksummed files under one directory.

A tier stores and returns bytes by block name and knows its quota and watermarks; which blocks it holds is
decided elsewhere (``eviction`` decides, ``store`` applies). This module owns all the file I/O of the cache.

Disk layout: ``<directory>/<first two hex characters of the name>/<name>``, 256 shard directories so no
directory grows past a few thousand entries. A block file is::

    header (32 bytes, little-endian): magic "SHBK", format version, flags, data length, xxh3-64 of the data,
                                      length of the encoded block id, reserved
    data
    block id (msgspec msgpack of ``BlockId``)

The id sits after the data so a read fetches header and data with two ``pread`` calls straight into the
returned ``bytes`` (one combined read plus a slice costs an extra 4 MiB copy: 7 ms instead of 0.2 ms per block
when measured), and a restart scan rebuilds the index from headers and ids without reading any data. A clean stop
writes the tier's index (``INDEX_FILE``) so the next start reads one file instead (``take_index``); the scan then
runs in the background a shard folder at a time (``scan_shard``) for the files it does not list. Every read
(and every open for sending) also reads the id, one small ``pread``, and checks that it names the block asked for:
a block file copied or renamed over another block's is self-consistent (its chunks match its table), so only its
id tells it holds other bytes; such a file is treated as corrupt.

Writes are atomic: a temporary file in the same shard directory, then ``os.replace``, so a reader or a restart
never sees a partial block; a crash leaves only a temporary file, which the next scan deletes (another process's:
this one's may be a write in flight beside a background scan). There is no
fsync by default: the cache is a copy of the object store, and a block torn by a power loss (renamed but not
yet on disk) fails its checksum on the next read and is fetched again, while an fsync per block would cost
milliseconds (much more on HDDs) on every write. Every read verifies the checksum (xxh3 runs at ~10 GB/s:
0.2 ms per 4 MiB block); a mismatch, short or garbled file is deleted, counted in ``corrupt_blocks``, and
reported as a miss, never served.

Ownership: Shoal only ever deletes inside a directory it created. The first scan of an empty (or new) directory
writes a marker file (``MARKER``) into it; a non-empty directory without the marker belongs to someone else
and the tier refuses it for good (no read, write or delete there), with an error in the log. Every file a scan
deletes is logged.

Health, like JuiceFS's cache directory states: consecutive I/O errors (``OSError`` other than a missing block file,
or EMFILE/ENFILE, the process out of descriptors: ENOSPC, EIO, the directory removed...) move a disk tier from
normal to unstable (after 1) and down (after 3 in a row). A down tier refuses reads and writes without touching the
disk, so callers bypass it to the object store; after ``cooldown_seconds`` (clock injected) the next operation goes
through as a probe and one success brings the tier back to normal. A read succeeding does not end a run of failed
writes: a full disk (ENOSPC) still serves the blocks it holds, and if reads in between reset the count it would stay
unstable for ever, failing every write unreported; three failed writes in a row take it down (reported) whatever the
reads between them. ENOSPC takes the tier down at once: a full disk does not empty itself in the next second, and
small writes that still fit would otherwise keep it flapping between normal and unstable, never reported
(tests/integration/test_store_faults.py fills a tmpfs). Down, reads bypass it to the store until the cool-down's
write probe fits. Reads and writes never raise for I/O errors.

Threads: file I/O is synchronous. Reading a 4 MiB block from the page cache takes ~0.2 ms, ~0.6 ms with its
checksum, so reads run inline on the event loop (an ``os.pread`` inline beat a thread pool in every FUSE
workload measured). Writing one takes ~1 ms into the page cache when the kernel keeps up and 10-17 ms on this
project's test VMs (measured, plain files too), so the store runs writes, which also create and rename files,
through ``asyncio.to_thread``. ``DiskTier`` is thread-safe for that use: files are written under unique
temporary names and the health state is guarded by a lock.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import io
import itertools
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import msgspec

from libs.blocks import DEFAULT_BLOCK_SIZE, BlockId, block_name, checksum
from libs.hostpaths import normal_path
from libs.telemetry import get_logger
from services.agent.cache.locks import token_lock

log = get_logger(__name__)

MAGIC = b"SHBK"
FORMAT_VERSION = 2
# magic, version, flags, data length, xxh3-64 of the chunk table, id length, reserved: 32 bytes, room to grow.
# Layout: header | chunk table (one xxh3-64 per chunk of data) | data | block id (msgpack).
HEADER = struct.Struct("<4sHHQQII")
# Data is checksummed per 64 KiB chunk, so a small random read verifies (and reads) 64 KiB, not the whole block.
CHUNK_BYTES = 64 * 1024
CHUNK_SUM = struct.Struct("<Q")
# One I/O error makes a tier unstable (still used, worth a log line); three in a row mean the disk or the
# directory is really broken, not a one-off, so it is bypassed (JuiceFS's thresholds are of the same order).
UNSTABLE_AFTER_ERRORS = 1
DOWN_AFTER_ERRORS = 3
# Long enough not to hammer a failing disk on every read, short enough that a remounted disk is used again soon.
DEFAULT_COOLDOWN_SECONDS = 30.0
# Fluid's default watermarks: evict when 95 % full, down to 70 %, so deletes come in batches.
DEFAULT_HIGH = 0.95
DEFAULT_LOW = 0.7
# Block names are 32 hex characters (xxh3-128); the shard directory is the first two.
NAME_LENGTH = 32
SHARD_LENGTH = 2
TEMP_SUFFIX = ".tmp"
# Written by the first scan of an empty directory: the proof that the directory is Shoal's to delete in.
MARKER = ".shoal-cache-tier"
# The block size the tier's blocks were cut at, in bytes (decimal text). A block is named by its object, ETag and
# index, not its size: after a runtime's blockSize changed, block 3 of a file is other bytes under the same name.
BLOCK_SIZE_FILE = ".shoal-block-size"
# The index a clean stop writes (every block of the tier, least recently used first), read and deleted by the next
# start so that start serves at once instead of opening every block file first (see ``DiskTier.take_index``).
INDEX_FILE = ".shoal-index"
# Locked (flock) by every process that uses the folder: shared by a mount process from before its cache starts until
# it exits; exclusive, without waiting, by whoever deletes every block of the folder (a purge, the agent freeing a
# deleted dataset's or a retired tier's folder), which deletes it last but one, before the marker. A mount process
# can outlive its agent: the next agent may start the dataset's next mount while the old one still purges, and that
# purge would delete the new mount's blocks, then its marker and folder (``DiskTier.hold``).
# It also says which process serves the folder's cache now: each start holding it writes a random token of its own
# into it (``DiskTier.own``), so the last started is the owner, and only the owner writes the index at its stop
# (``write_index``). A restart can overlap, the old mount process still serving beside the new one (both hold the
# lock shared), and the old one's index, of its own blocks, would be stale for the new one. The token's write and the
# index's compare-and-rename exclude each other (``locks.token_lock``).
LOCK_FILE = ".shoal-lock"
OWNER_TOKEN_BYTES = 16
INDEX_MAGIC = b"SHIX"
INDEX_VERSION = 1
# magic, version, reserved, the block size the blocks were cut at, xxh3-64 of the body (msgpack of [[id, size]...])
INDEX_HEADER = struct.Struct("<4sHHQQ")
MARKER_TEXT = b"A Shoal cache tier: Shoal deletes files in this directory. Remove the whole directory to reset it.\n"
# The runtime refuses block sizes above 64 MiB; a header claiming more is garbage, and reading it would try to
# allocate whatever the garbage says.
MAX_DATA_BYTES = 64 * 1024 * 1024
# Likewise for the block id: a key is at most a local path of 4096 bytes (S3's are 1024), its ETag far less.
MAX_ID_BYTES = 64 * 1024
# A read's first pread takes the header and the chunk table of a block of the default size (512 bytes for 4 MiB):
# with the id's pread that every read makes, a read costs as many system calls as before the id was checked.
LAYOUT_READ_BYTES = HEADER.size + -(-DEFAULT_BLOCK_SIZE // CHUNK_BYTES) * CHUNK_SUM.size
_HEX = frozenset("0123456789abcdef")
# The process's (EMFILE) or the system's (ENFILE) descriptors ran out: not a fault of the tier's disk.
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})

_ID_ENCODER = msgspec.msgpack.Encoder()
_ID_DECODER = msgspec.msgpack.Decoder(BlockId)
_INDEX_ENCODER = msgspec.msgpack.Encoder()
_INDEX_DECODER = msgspec.msgpack.Decoder(list[tuple[BlockId, int]])


class Health(enum.StrEnum):
    NORMAL = "normal"
    UNSTABLE = "unstable"
    DOWN = "down"


class ScanCancelled(Exception):
    """A scan stopped because its caller was told to stop (``scan(cancelled=...)``); nothing is indexed."""


class ScannedBlock(NamedTuple):
    """A block file found by a restart scan; its data checksum is verified on first read."""

    block: BlockId
    name: str
    size: int


class ShardScan(NamedTuple):
    """What ``DiskTier.scan_shard`` found in one shard folder: the block files it did not know of, sound ones with
    their modification times (``found``) and the paths of unsound ones (``garbage``, for the caller to delete: it
    knows whether a block of that name was written since), and the known names it found no file of (``missing``)."""

    found: list[tuple[float, ScannedBlock]]
    garbage: list[str]
    missing: set[str]


class BlockFile(NamedTuple):
    """A cached block's file, open, to be sent as it is (the peer server's ``sendfile``): from ``offset`` on,
    ``file`` holds the chunk table (``table_bytes``: one xxh3-64 per ``chunk_bytes`` of data, little-endian) and
    then the block's ``length`` bytes. ``table_digest`` (xxh3-64 of the table) was checked against the header; the
    data was not: whoever receives it checks each chunk against the table. The caller closes ``file``."""

    file: io.FileIO
    offset: int
    length: int
    chunk_bytes: int
    table_bytes: int
    table_digest: int


class Tier(Protocol):
    """One storage level of the cache. Reads and writes never raise for I/O errors."""

    medium: str  # "MEM", "SSD" or "HDD"
    location: str  # the directory, or "memory"
    quota_bytes: int
    high: float  # watermarks as fractions of the quota
    low: float
    offload_writes: bool  # whether writes do file I/O the caller should run in a worker thread
    # Whether the last ``read_range`` or ``open_block`` found None because it failed (an I/O error, no descriptor
    # left), not because the block is absent or was corrupt: its block must not be forgotten. Reads run on one
    # thread; writes in others change ``health`` meanwhile, so the health alone cannot tell.
    read_failed: bool

    @property
    def health(self) -> Health: ...

    @property
    def corrupt_blocks(self) -> int: ...

    @property
    def refused(self) -> str:
        """Why the tier is not used at all (its folder holds files Shoal did not write: what to do), or empty."""

    @property
    def last_error(self) -> str:
        """The system's word for the last I/O error of the tier's run of failures ("No space left on device",
        "Permission denied"), or empty: a down tier says it, and what to change for it."""

    def available(self) -> bool:
        """False while the tier is down and its cool-down has not passed (a probe is allowed after it)."""

    def read(self, name: str) -> bytes | None:
        """The block's bytes, or None if absent, corrupt (then deleted) or the tier is failing."""

    def read_range(self, name: str, start: int, end: int | None) -> bytes | None:
        """Like ``read``, for bytes [start, end) only; a disk tier reads and verifies just those chunks."""

    def prefetch(self, name: str) -> None:
        """A hint that the block will be read soon (a disk tier starts the read in the kernel)."""

    def open_block(self, name: str) -> BlockFile | None:
        """The block's file open for sending as it is (disk tiers), or None (absent, garbled, a memory tier)."""

    def write(self, block: BlockId, data: bytes) -> bool:
        """Stores the block under ``block.name``; False if the tier is down or the write failed."""

    def remove(self, name: str) -> bool:
        """Deletes the block if present; False only if the tier could not be asked (down or failing)."""

    def scan(self, block_size: int = 0, cancelled: Callable[[], bool] | None = None) -> list[ScannedBlock]:
        """Blocks that survived a restart, oldest first (by modification time). ``block_size`` (0: not known) is
        the size the blocks are cut at now: blocks kept from a run at another size are deleted, not returned.
        ``cancelled``, asked before each file, ends a long scan with ``ScanCancelled``."""

    def remove_empty_directories(self) -> None:
        """Removes the tier's folders if no file is left in them (after its dataset was deleted)."""


def _check_limits(quota_bytes: int, high: float, low: float) -> None:
    if quota_bytes <= 0:
        raise ValueError(f"quota must be greater than 0, got {quota_bytes}")
    if not 0 < low < high <= 1:
        raise ValueError(f"watermarks must satisfy 0 < low < high <= 1, got low={low} high={high}")


class MemoryTier:
    """Blocks as ``bytes`` in a dict; nothing survives a restart, nothing can fail or rot."""

    offload_writes = False
    read_failed = False
    location = "memory"

    def __init__(self, quota_bytes: int, *, high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW) -> None:
        _check_limits(quota_bytes, high, low)
        self.medium = "MEM"
        self.quota_bytes = quota_bytes
        self.high = high
        self.low = low
        self._blocks: dict[str, bytes] = {}

    @property
    def health(self) -> Health:
        return Health.NORMAL

    @property
    def corrupt_blocks(self) -> int:
        return 0

    @property
    def refused(self) -> str:
        return ""

    @property
    def last_error(self) -> str:
        return ""

    def available(self) -> bool:
        return True

    def read(self, name: str) -> bytes | None:
        return self._blocks.get(name)

    def read_range(self, name: str, start: int, end: int | None) -> bytes | None:
        data = self._blocks.get(name)
        return None if data is None else data[start:end]

    def prefetch(self, name: str) -> None:
        return None  # already in memory

    def open_block(self, name: str) -> BlockFile | None:
        return None  # no file: the block's bytes are sent from memory

    def write(self, block: BlockId, data: bytes) -> bool:
        self._blocks[block.name] = data
        return True

    def remove(self, name: str) -> bool:
        self._blocks.pop(name, None)
        return True

    def scan(self, block_size: int = 0, cancelled: Callable[[], bool] | None = None) -> list[ScannedBlock]:
        return []

    def remove_empty_directories(self) -> None:
        return None


class DiskTier:
    """Checksummed block files under one directory, with normal → unstable → down health."""

    offload_writes = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        quota_bytes: int,
        *,
        medium: str = "SSD",
        high: float = DEFAULT_HIGH,
        low: float = DEFAULT_LOW,
        cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS,
        now: Callable[[], float] = time.monotonic,
        fsync: bool = False,
        direct_io: bool = True,
    ) -> None:
        _check_limits(quota_bytes, high, low)
        self.medium = medium
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.quota_bytes = quota_bytes
        self.high = high
        self.low = low
        self.cooldown_seconds = cooldown_seconds
        self._now = now
        self._fsync = fsync
        self._root = str(self.directory)
        self._lock = threading.Lock()
        self._health = Health.NORMAL
        # Why the directory is not Shoal's to use (non-empty without the marker); set once, never cleared.
        self._refused = ""
        self._errors = 0  # consecutive I/O errors
        self._last_error = ""  # the system's word for the last of them (``last_error``)
        self.read_failed = False
        self._out_of_files = False  # an operation found no descriptor (EMFILE, ENFILE) since the last success
        self._writes_failing = False  # the last error was a write's: only a successful write clears the run
        self._retry_at = 0.0
        self._corrupt = 0
        self._temp_ids = itertools.count()  # next() on a count is atomic under the GIL
        # O_DIRECT until the filesystem refuses it (tmpfs, some overlays): then buffered writes.
        self._direct = direct_io and hasattr(os, "O_DIRECT")
        self._lock_fd: int | None = None  # the folder's LOCK_FILE, flocked (``hold``)
        self._lock_exclusive = False
        # Held exclusive only to delete blocks cut at another size (``hold``): shared once they are deleted.
        self._share_after_resize = False
        self._owner = b""  # the token this tier wrote into LOCK_FILE (``own``); empty if it never did

    # -- health -------------------------------------------------------------------------------------------

    @property
    def health(self) -> Health:
        return Health.DOWN if self._refused else self._health

    @property
    def corrupt_blocks(self) -> int:
        return self._corrupt

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def consecutive_errors(self) -> int:
        return self._errors

    def available(self) -> bool:
        if self._refused:
            return False
        return self._health is not Health.DOWN or self._now() >= self._retry_at

    @property
    def refused(self) -> str:
        """Why this directory is not used at all (it holds files Shoal did not write) and what to do, or empty."""
        return self._refused

    def _succeeded(self, operation: str = "read") -> None:
        if self._errors == 0 and not self._out_of_files:
            return  # the hot path: no lock while healthy
        if self._writes_failing and operation != "write":
            return  # a disk that reads but cannot write (full) is not healthy again
        with self._lock:
            previous, self._errors, self._health = self._health, 0, Health.NORMAL
            self._last_error = ""
            self._writes_failing = False
            self._out_of_files = False
        if previous is not Health.NORMAL:
            log.info("cache tier recovered", directory=self._root, previous=str(previous))

    def _failed(self, operation: str, error: OSError) -> None:
        if operation == "read":
            self.read_failed = True
        if error.errno in _OUT_OF_FILES:
            # The process's descriptors ran out, not the disk: the operation misses (reads go to the store) and the
            # tier is unstable, which keeps the cache from forgetting the block, until its next success; never
            # down. Counted as the disk's, three of them took a sound tier down for the cool-down and reported its
            # directory down (and a block whose read found no descriptor was forgotten while its file stayed).
            with self._lock:
                first, self._out_of_files = not self._out_of_files, True
                if self._health is Health.NORMAL:
                    self._health = Health.UNSTABLE
            if first:
                log.warning("cache tier operation failed: no file descriptor left (not the disk's fault)",
                            directory=self._root, operation=operation, error=str(error))
            return
        with self._lock:
            self._errors += 1
            self._last_error = error.strerror or type(error).__name__
            self._writes_failing = operation == "write"
            if error.errno == errno.ENOSPC:
                self._errors = max(self._errors, DOWN_AFTER_ERRORS)
            previous = self._health
            if self._errors >= DOWN_AFTER_ERRORS:
                self._health = Health.DOWN
                self._retry_at = self._now() + self.cooldown_seconds
            elif self._errors >= UNSTABLE_AFTER_ERRORS:
                self._health = Health.UNSTABLE
            health = self._health
        if health is not previous:
            log.warning(
                "cache tier health changed",
                directory=self._root,
                health=str(health),
                operation=operation,
                error=str(error),
                cooldown_seconds=self.cooldown_seconds if health is Health.DOWN else None,
            )

    # -- blocks -------------------------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return f"{self._root}/{name[:SHARD_LENGTH]}/{name}"

    def read(self, name: str) -> bytes | None:
        return self.read_range(name, 0, None)

    def read_range(self, name: str, start: int, end: int | None) -> bytes | None:
        """Bytes [start, end) of the block (end None: to its end), every chunk they touch verified first."""
        self.read_failed = False
        if not self.available():
            return None
        path = self.path_of(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # evicted meanwhile or never written: the block is gone, the disk is not at fault
        except OSError as err:
            self._failed("read", err)
            return None
        try:
            try:
                layout = _read_layout(fd, name)
                piece = None if layout is None else _read_chunks(fd, layout, start, end)
            finally:
                os.close(fd)
        except OSError as err:
            self._failed("read", err)
            return None
        if piece is None:
            self._discard_corrupt(path)
            return None
        self._succeeded()
        return piece

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading the block file now, so the read that follows finds it in memory."""
        if not self.available():
            return
        try:
            fd = os.open(self.path_of(name), os.O_RDONLY)
        except OSError:
            return  # a hint only: the read itself reports what is wrong
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def open_block(self, name: str) -> BlockFile | None:
        """The block file open for sending, its header, chunk table and block id verified (not its data: the
        receiver checks every chunk against the table, so the bytes never pass through this process)."""
        self.read_failed = False
        if not self.available():
            return None
        path = self.path_of(name)
        try:
            file = io.FileIO(path, "r")
        except FileNotFoundError:
            return None
        except OSError as err:
            self._failed("read", err)
            return None
        try:
            fd = file.fileno()
            length, digest, id_length = _parse_header(os.pread(fd, HEADER.size, 0))
            table_bytes = _chunk_count(length) * CHUNK_SUM.size
            # The id lies after the data: read whole, it also proves the file holds all the bytes sendfile sends.
            intact = (length >= 0 and checksum(os.pread(fd, table_bytes, HEADER.size)) == digest
                      and _holds(fd, name, HEADER.size + table_bytes + length, id_length))
        except OSError as err:
            file.close()
            self._failed("read", err)
            return None
        if not intact:
            file.close()
            self._discard_corrupt(path)
            return None
        self._succeeded()
        return BlockFile(file, HEADER.size, length, CHUNK_BYTES, table_bytes, digest)

    def write(self, block: BlockId, data: bytes) -> bool:
        ident = _ID_ENCODER.encode(block)
        table = _chunk_table(data)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(data), checksum(table), len(ident), 0)
        parts = (header, table, data, ident)
        return self._write_file(block.name, lambda fd, direct: (_write_direct if direct else _write_all)(fd, parts))

    def fill_buffer(self, block: BlockId, length: int) -> FillBuffer:
        """A buffer laid out as the block's file, whose ``data`` a fetch fills in place; ``write_filled`` then
        stores it as it is (no join of the fetched pieces, no copy into an aligned buffer). Give it back with
        ``FillBuffer.release`` after the write (or when the fetch failed)."""
        return FillBuffer(block, length)

    def write_filled(self, fill: FillBuffer) -> bool:
        """``write`` of a filled ``FillBuffer``: checksums its data where it lies, then one write of the buffer."""
        fill.seal()
        return self._write_file(fill.block.name, fill.write_to)

    def _write_file(self, name: str, write: Callable[[int, bool], None]) -> bool:
        """Create a temporary file, ``write(fd, direct)`` into it, rename it into place; False if the tier is
        down or the write failed."""
        if not self.available():
            return False
        shard = f"{self._root}/{name[:SHARD_LENGTH]}"
        final = f"{shard}/{name}"
        temp = f"{shard}/.{name}.{os.getpid()}.{next(self._temp_ids)}{TEMP_SUFFIX}"
        try:
            if self._direct:
                try:
                    fd = self._create(shard, temp, os.O_DIRECT)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._direct = False
                    log.info("cache directory refuses O_DIRECT, writing through the page cache", path=shard)
            if not self._direct:
                fd = self._create(shard, temp)
            try:
                write(fd, self._direct)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except OSError as err:
            _unlink_quietly(temp)
            self._failed("write", err)
            return False
        self._succeeded("write")
        return True

    def remove(self, name: str) -> bool:
        if not self.available():
            return False  # the file stays; the next restart scan adopts or deletes it
        try:
            os.unlink(self.path_of(name))
        except FileNotFoundError:
            pass
        except OSError as err:
            self._failed("remove", err)
            return False
        return True

    def scan(self, block_size: int = 0, cancelled: Callable[[], bool] | None = None) -> list[ScannedBlock]:
        """Finds the block files of a previous run; deletes temporary files and anything garbled in the shards,
        and every block if they were cut at another ``block_size`` than now (0: not known, nothing checked).
        ``cancelled`` is asked before each file: a mount process told to stop while it scans a large cache stops
        here (``ScanCancelled``), leaving every block file that was not looked at yet for the next scan. The index
        of a clean stop is not read (``take_index`` does that): every file is opened.
        """
        if not self.prepare(block_size):
            return []
        found: list[tuple[float, ScannedBlock]] = []
        for shard in self.shards():
            scanned = self.scan_shard(shard, frozenset(), cancelled)
            found.extend(scanned.found)
            for path in scanned.garbage:
                self.remove_garbage(path)
        found.sort(key=lambda item: item[0])
        return [block for _, block in found]

    def prepare(self, block_size: int = 0) -> bool:
        """Makes the directory if needed and claims it (``MARKER``) for this process (``own``, if it holds the
        folder's lock), and records ``block_size`` (deleting every block if they were cut at another size); False if
        the tier is not usable or holds no block now.

        The only place that creates the directory: a directory removed while running makes writes fail and the
        tier go down, rather than quietly filling whatever filesystem is now underneath.
        """
        try:
            os.makedirs(self._root, exist_ok=True)
            if not self._claim():
                return False
            self.own()  # before the index is taken: an older process serving beside this one writes none now
            return not block_size or self._keep_block_size(block_size)
        except OSError as err:
            self._failed("scan", err)
            return False

    def take_index(self, block_size: int = 0) -> list[ScannedBlock]:
        """The blocks the index of the last clean stop lists, least recently used first; the index is deleted
        as it is read, so a run that crashes later leaves none behind. [] when there is none, or it is garbled,
        of another format or block size (logged), or cannot be deleted (then it would outlive a crash).

        The blocks are not checked here: every read verifies its block's file (header, chunk checksums, id) as
        it does anyway, and the caller's scan of the shards (``scan_shard``, in the background) finds the files
        the index does not list and the listed files that are gone.
        """
        path = os.path.join(self._root, INDEX_FILE)
        try:
            with open(path, "rb") as index:
                raw = index.read()
            os.unlink(path)
        except FileNotFoundError:
            return []
        except OSError as err:
            log.warning("cache index not read: the blocks are found by the scan", path=path, error=str(err))
            _unlink_quietly(path)
            return []
        reason = ""
        blocks: list[tuple[BlockId, int]] = []
        if len(raw) < INDEX_HEADER.size:
            reason = "cut short"
        else:
            magic, version, _, size, digest = INDEX_HEADER.unpack_from(raw)
            body = memoryview(raw)[INDEX_HEADER.size:]
            if magic != INDEX_MAGIC or version != INDEX_VERSION:
                reason = "not an index of this format"
            elif block_size and size != block_size:
                reason = f"written for blocks of {size} bytes"
            elif checksum(body) != digest:
                reason = "checksum mismatch"
            else:
                try:
                    blocks = _INDEX_DECODER.decode(body)
                except msgspec.DecodeError:
                    reason = "undecodable"
        if reason:
            log.warning("cache index ignored: the blocks are found by the scan", path=path, reason=reason)
            return []
        return [ScannedBlock(block, block.name, size) for block, size in blocks]

    def write_index(self, blocks: list[tuple[BlockId, int]], block_size: int) -> bool:
        """Writes the index the next start reads (``take_index``): ``blocks``, least recently used first. Atomic
        (a temporary file, then a rename); False if it could not be written (the next start scans instead)."""
        if not self.available():
            return False
        path = os.path.join(self._root, INDEX_FILE)
        if not self.owns():
            log.info("cache index not written: a mount process started since serves the folder now", path=path)
            return False
        temp = f"{path}.{os.getpid()}{TEMP_SUFFIX}"
        body = _INDEX_ENCODER.encode(blocks)
        try:
            with open(temp, "wb") as out:
                out.write(INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, block_size, checksum(body)))
                out.write(body)
            # Compared again, and renamed, under the token's lock: a start writing its token between a compare and
            # the rename would take the index before it is there, and leave this one, stale, to its next start.
            with self._token_locked():
                owned = self.owns()
                if owned:
                    os.replace(temp, path)
        except OSError as err:
            _unlink_quietly(temp)
            log.warning("cache index not written: the next start scans the blocks", path=path, error=str(err))
            return False
        if not owned:
            _unlink_quietly(temp)
            log.info("cache index not written: a mount process started since serves the folder now", path=path)
        return owned

    def own(self) -> None:
        """Says, while holding the folder's lock (``hold``), that this process serves its cache from now on: a
        random token written into ``LOCK_FILE``, which every process using the folder holds. An older process still
        serving it then writes no index at its stop (``owns``). Nothing without the lock."""
        if self._lock_fd is None:
            return
        token = os.urandom(OWNER_TOKEN_BYTES).hex().encode()  # a pid repeats across containers
        with self._token_locked():  # not between another process's compare and its rename (``write_index``)
            os.pwrite(self._lock_fd, token, 0)  # every token is as long: one write replaces the last one whole
        self._owner = token

    def _token_locked(self) -> contextlib.AbstractContextManager[None]:
        """The lock on the owner token's bytes of ``LOCK_FILE`` (``locks.token_lock``); none without the file."""
        if self._lock_fd is None:
            return contextlib.nullcontext()
        return token_lock(self._lock_fd, 2 * OWNER_TOKEN_BYTES)

    def owns(self) -> bool:
        """Whether no process started on the folder since this one said it serves it (``own``); True if it never
        said so (the index is then written as before)."""
        if not self._owner or self._lock_fd is None:
            return True
        try:
            return os.pread(self._lock_fd, len(self._owner), 0) == self._owner
        except OSError:
            return True  # not knowing, the index is written: the next start verifies every block it lists anyway

    def discard_index(self) -> None:
        _unlink_quietly(os.path.join(self._root, INDEX_FILE))

    def shards(self) -> list[str]:
        """The paths of the tier's shard folders ([] if the directory cannot be listed: the tier is failing)."""
        if self._refused:
            return []
        try:
            with os.scandir(self._root) as entries:
                return [entry.path for entry in entries if _is_shard(entry)]
        except OSError as err:
            self._failed("scan", err)
            return []

    def scan_shard(self, shard: str, known: frozenset[str], cancelled: Callable[[], bool] | None = None) -> ShardScan:
        """Opens the block files of one shard folder (a path from ``shards``) whose names ``known`` does not
        hold (one open, an fstat and two small reads each), deleting the temporary files of other processes'
        writes (a crash's leftovers; this process's own may be in flight). Safe beside writes in flight: it
        deletes nothing else, the caller does (``ShardScan.garbage``). ``cancelled`` is asked before each file
        opened (``ScanCancelled``)."""
        found: list[tuple[float, ScannedBlock]] = []
        garbage: list[str] = []
        listed: set[str] = set()
        own = f".{os.getpid()}."
        try:
            with os.scandir(shard) as entries:
                files = [(entry.path, entry.name) for entry in entries if not entry.is_dir(follow_symlinks=False)]
        except OSError as err:
            if not isinstance(err, FileNotFoundError):
                self._failed("scan", err)
            return ShardScan(found, garbage, set())
        for path, name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                if own not in name:
                    log.info("cache scan removed a file", path=path, reason="unfinished write")
                    _unlink_quietly(path)  # a write interrupted by a crash
                continue
            listed.add(name)
            if name in known:
                continue
            if cancelled is not None and cancelled():
                raise ScanCancelled(self._root)
            try:
                scanned = self._scan_file(path, name, shard)
            except FileNotFoundError:
                listed.discard(name)
                continue
            except OSError as err:
                self._failed("scan", err)  # unreadable now; left in place, maybe readable next time
                continue
            if scanned is None:
                garbage.append(path)
            else:
                found.append(scanned)
        return ShardScan(found, garbage, set(known).difference(listed))

    def probe(self, name: str) -> ScannedBlock | None:
        """The block file of ``name`` if it is there and sound as a scan finds it (``scan_shard``), else None; an
        unsound file is left to the scan, which deletes it."""
        shard = f"{self._root}/{name[:SHARD_LENGTH]}"
        try:
            scanned = self._scan_file(f"{shard}/{name}", name, shard)
        except OSError:  # none there (the usual), or unreadable: a miss either way
            return None
        return scanned[1] if scanned is not None else None

    def remove_garbage(self, path: str) -> None:
        """Deletes a file ``scan_shard`` found unsound (``ShardScan.garbage``), and says so."""
        log.warning("cache scan removed a file", path=path, reason="not a sound block file")
        _unlink_quietly(path)

    def hold(self, exclusive: bool = False, block_size: int = 0) -> bool:
        """Takes the folder's lock (``LOCK_FILE``, made with the folder if need be) without waiting: shared, as a
        mount process that uses the folder holds it (False while another deletes the folder's blocks), or
        exclusive, as whoever deletes them all (False while another process holds it in any way: the blocks are
        its). Held until ``release`` or the process's end (a crash frees it); a shared hold can be made exclusive.
        A shared hold for blocks cut at ``block_size`` (0: not known) is taken exclusive when the folder's blocks
        were cut at another size: the start deletes them all (``prepare``), then shares it.

        Whoever held it exclusive deleted the file with the folder (``remove_empty_directories``): a lock taken on
        a file that is no longer the folder's is dropped and taken again on the folder's new one."""
        if not exclusive and block_size and self._lock_fd is None and self._recorded_block_size() not in (
                "", str(block_size)):
            if not self.hold(exclusive=True):
                return False
            self._share_after_resize = True
            return True
        if self._lock_fd is not None and self._lock_exclusive >= exclusive:
            return True
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        path = os.path.join(self._root, LOCK_FILE)
        for _ in range(3):  # each retry follows a whole purge of the folder meanwhile: rare
            fd = self._lock_fd
            if fd is None:
                if self._someone_elses():
                    return True  # no file of ours among another's: nothing here is ours to guard (start refuses it)
                os.makedirs(self._root, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                # A shared hold made exclusive is dropped when that fails (flock converts by unlocking first).
                self._close_lock(fd)
                return False
            except BaseException:
                self._close_lock(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd, self._lock_exclusive = fd, exclusive
                return True
            self._close_lock(fd)
        return False

    def release(self) -> None:
        """Drops the folder's lock (``hold``), if held."""
        if self._lock_fd is not None:
            self._close_lock(self._lock_fd)

    def _close_lock(self, fd: int) -> None:
        os.close(fd)
        if fd == self._lock_fd:
            self._lock_fd, self._lock_exclusive, self._share_after_resize = None, False, False

    def _share(self) -> None:
        """Makes an exclusive hold shared again (other mount processes of the folder may start beside this one)."""
        if self._lock_fd is not None and self._lock_exclusive:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # never waits: this process alone holds it
            self._lock_exclusive = False
        self._share_after_resize = False

    def _recorded_block_size(self) -> str:
        """The block size the folder's blocks were cut at (``BLOCK_SIZE_FILE``), "" if not recorded."""
        try:
            with open(os.path.join(self._root, BLOCK_SIZE_FILE), encoding="ascii") as recorded:
                return recorded.read(32).strip()
        except (FileNotFoundError, NotADirectoryError):
            return ""

    def remove_block_files(self) -> int:
        """Deletes every file in the shard folders but the temporary files of this process's writes in flight
        (whoever reserved them deletes what they write) and returns how many block files that was: a purge's
        sweep of the files no index lists (a restart's scan stopped before reaching them). A crash's unfinished
        writes go too, uncounted. Nothing while the directory is not Shoal's (``refused``: no shards) or the tier
        is down (like ``remove``: the files wait for the agent's own purge of a deleted dataset's folders)."""
        if not self.available():
            return 0
        own = f".{os.getpid()}."
        removed = 0
        for shard in self.shards():
            try:
                with os.scandir(shard) as entries:
                    names = [entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)]
            except OSError:
                continue  # gone meanwhile, or unreadable: nothing this sweep can delete
            for name in names:
                temp = name.startswith(".") and name.endswith(TEMP_SUFFIX)
                if temp and own in name:
                    continue
                try:
                    os.unlink(f"{shard}/{name}")
                except FileNotFoundError:
                    continue
                except OSError as err:
                    self._failed("remove", err)
                    return removed
                removed += not temp
        return removed

    def remove_empty_directories(self) -> None:
        """rmdir of the shard folders and the tier's folder, each only if empty (but for the tier's marker):
        nothing else is ever deleted."""
        shards: list[str] = []
        with contextlib.suppress(OSError), os.scandir(self._root) as entries:
            shards = [entry.path for entry in entries if _is_shard(entry)]
        for shard in shards:
            with contextlib.suppress(OSError):
                os.rmdir(shard)
        with contextlib.suppress(OSError):
            left = os.listdir(self._root)
            own = {MARKER, BLOCK_SIZE_FILE, INDEX_FILE} | ({LOCK_FILE} if self._lock_exclusive else set())
            if MARKER in left and set(left) <= own:  # Shoal's own files go last
                for name in sorted(left, key=lambda name: name == MARKER):  # the marker last of all
                    os.unlink(os.path.join(self._root, name))
            os.rmdir(self._root)

    # -- internals ----------------------------------------------------------------------------------------

    def _someone_elses(self) -> bool:
        """Whether the directory holds files Shoal did not write and no ``MARKER`` (``_claim`` refuses it)."""
        if os.path.exists(os.path.join(self._root, MARKER)):
            return False
        try:
            with os.scandir(self._root) as entries:
                others = any(entry.name != LOCK_FILE for entry in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return others and not _written_by_shoal(self._root)

    def _claim(self) -> bool:
        """True if the directory is Shoal's: it has the marker, or it was empty and now has it."""
        marker = os.path.join(self._root, MARKER)
        if os.path.exists(marker):
            return True
        with os.scandir(self._root) as entries:
            foreign = [entry.name for entry in itertools.islice((e for e in entries if e.name != LOCK_FILE), 3)]
        if foreign and _written_by_shoal(self._root):
            # A cache from before the marker existed: every file in it is one of our blocks, so it is ours.
            log.info("cache directory from an older Shoal claimed", directory=self._root)
            foreign = []
        if foreign:
            # Named apart from a down tier: its folder is there and works, so "recreate it" would be wrong advice;
            # Shoal never deletes what it did not write, so emptying the folder is the owner's call.
            self._refused = (f"cache directory {normal_path(self._root)} holds files Shoal did not write "
                             f"({', '.join(foreign)}{', ...' if len(foreign) == 3 else ''}) and has no {MARKER}, so "
                             "Shoal does not use it (reads go to the store): empty the folder, or change the runtime's "
                             "tieredstore level path so the tier gets a folder of its own; then restart the agent (its "
                             "mounts start again and use it)")
            log.error("cache directory refused", directory=self._root, reason=self._refused)
            return False
        with contextlib.suppress(FileExistsError), open(marker, "xb") as out:  # another process won: fine
            out.write(MARKER_TEXT)
        return True

    def _keep_block_size(self, block_size: int) -> bool:
        """Records ``block_size`` as the size this tier's blocks are cut at. If they were cut at another size,
        deletes them all first (and says so) and returns False. A tier without the record (new, or written before
        it existed) is taken to be cut at ``block_size``: the mount process checks each block's length anyway.

        The blocks are deleted only under the folder's lock held exclusive (``hold``, taken here if need be): another
        process may still serve them (an older mount process, at the old size), and a block of the new size under the
        same name would be other bytes to it. While one does, the tier is refused (``refused``): neither its blocks
        nor the folder are touched, and reads go to the store."""
        path = os.path.join(self._root, BLOCK_SIZE_FILE)
        before = self._recorded_block_size()
        if before == str(block_size):
            return True
        kept = before == ""
        if not kept:
            held = self._lock_fd is not None
            shared = held and (not self._lock_exclusive or self._share_after_resize)
            if not self.hold(exclusive=True):  # a shared hold is dropped when that fails
                self._refused = (f"cache directory {normal_path(self._root)} holds blocks cut at {before} bytes that "
                                 "another process uses, and the runtime's block size is now "
                                 f"{block_size}: Shoal does not use it (reads go to the store) until that process "
                                 "stops; then restart the mount (its process exits, or the agent restarts)")
                log.error("cache directory refused", directory=self._root, reason=self._refused)
                return False
            deleted = self._delete_every_block()
            log.warning("cache blocks deleted: the runtime's block size changed", directory=self._root,
                        block_size_before=before, block_size=block_size, files=deleted)
        temp = f"{path}.{os.getpid()}{TEMP_SUFFIX}"
        with open(temp, "w", encoding="ascii") as out:
            out.write(f"{block_size}\n")
        os.replace(temp, path)
        if not kept:
            if not held:  # taken for the deletion only: its file goes too (``hold`` follows a lock file replaced)
                _unlink_quietly(os.path.join(self._root, LOCK_FILE))
                self.release()
            elif shared:
                self._share()
        return kept

    def _delete_every_block(self) -> int:
        deleted = 0
        self.discard_index()
        with os.scandir(self._root) as entries:
            shards = [entry.path for entry in entries if _is_shard(entry)]
        for shard in shards:
            with os.scandir(shard) as entries:
                files = [entry.path for entry in entries if not entry.is_dir(follow_symlinks=False)]
            for path in files:
                _unlink_quietly(path)
                deleted += 1
        return deleted

    def _scan_file(self, path: str, name: str, shard: str) -> tuple[float, ScannedBlock] | None:
        """(mtime, block) if the file's header and id are sound and match its name, else None (garbage)."""
        if len(name) != NAME_LENGTH or not _HEX.issuperset(name) or not shard.endswith(name[:SHARD_LENGTH]):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            header = os.pread(fd, HEADER.size, 0)
            if len(header) != HEADER.size:
                return None
            length, _, id_length = _parse_header(header)
            data_offset = _data_offset(_chunk_count(length))
            if length < 0 or stat.st_size != data_offset + length + id_length:
                return None
            encoded = os.pread(fd, id_length, data_offset + length)
        finally:
            os.close(fd)
        try:
            block = _ID_DECODER.decode(encoded)
        except msgspec.DecodeError:
            return None
        if block_name(block) != name:
            return None
        return stat.st_mtime, ScannedBlock(block, name, length)

    def _create(self, shard: str, temp: str, extra_flags: int = 0) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | extra_flags
        try:
            return os.open(temp, flags, 0o644)
        except FileNotFoundError:
            # First block of this shard. mkdir (not makedirs): a missing root must fail, see scan().
            with contextlib.suppress(FileExistsError):
                os.mkdir(shard)
            return os.open(temp, flags, 0o644)

    def _discard_corrupt(self, path: str) -> None:
        with self._lock:
            self._corrupt += 1
        log.warning("corrupt cache block deleted", path=path)
        _unlink_quietly(path)


def _written_by_shoal(root: str) -> bool:
    """Whether every file below ``root`` starts with Shoal's block magic (a cache written before the marker).

    Reads four bytes per file, once, on the first start after an upgrade; any other file (a git object, a
    document) makes the directory someone else's.
    """
    for directory, _, files in os.walk(root):
        for name in files:
            if directory == root and name == LOCK_FILE:
                continue  # a process's lock, made before the first scan
            try:
                with open(os.path.join(directory, name), "rb") as block:
                    if block.read(len(MAGIC)) != MAGIC:
                        return False
            except OSError:
                return False
    return True


def _parse_header(header: bytes) -> tuple[int, int, int]:
    """(data length, checksum of the chunk table, length of the block id), or (-1, 0, 0) if this is not a block
    file of a format we read."""
    if len(header) != HEADER.size:
        return -1, 0, 0
    magic, version, _, length, digest, id_length, _ = HEADER.unpack(header)
    if magic != MAGIC or version != FORMAT_VERSION or length > MAX_DATA_BYTES or id_length > MAX_ID_BYTES:
        return -1, 0, 0
    return length, digest, id_length


def _holds(fd: int, name: str, offset: int, id_length: int) -> bool:
    """Whether the block id stored at ``offset`` (``id_length`` bytes, the end of the file) is the block named
    ``name``: one small ``pread``, a decode and a hash (microseconds)."""
    encoded = os.pread(fd, id_length, offset)
    if len(encoded) != id_length:
        return False
    try:
        return block_name(_ID_DECODER.decode(encoded)) == name
    except msgspec.DecodeError:
        return False


def _chunk_count(length: int) -> int:
    return -(-length // CHUNK_BYTES)


def _data_offset(chunks: int) -> int:
    return HEADER.size + chunks * CHUNK_SUM.size


def _chunk_table(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    return b"".join(CHUNK_SUM.pack(checksum(view[i:i + CHUNK_BYTES])) for i in range(0, len(data), CHUNK_BYTES))


def _read_layout(fd: int, name: str) -> tuple[int, list[int]] | None:
    """(data length, chunk checksums) from a block file's header and verified table; None if garbled, or if the
    file is another block's than ``name`` (its id says so)."""
    head = os.pread(fd, LAYOUT_READ_BYTES, 0)
    length, table_digest, id_length = _parse_header(head[:HEADER.size])
    if length < 0:
        return None
    table_bytes = _chunk_count(length) * CHUNK_SUM.size
    table = head[HEADER.size:HEADER.size + table_bytes]
    if len(table) < table_bytes:  # a block larger than the default: its table goes on past the first read
        table += os.pread(fd, table_bytes - len(table), HEADER.size + len(table))
    if len(table) != table_bytes or checksum(table) != table_digest:
        return None
    if not _holds(fd, name, HEADER.size + table_bytes + length, id_length):
        return None
    return length, [value for (value,) in CHUNK_SUM.iter_unpack(table)]


def _read_chunks(fd: int, layout: tuple[int, list[int]], start: int, end: int | None) -> bytes | None:
    """Bytes [start, end) read chunk-aligned and verified; None if a chunk does not match its checksum."""
    length, sums = layout
    stop = length if end is None else min(end, length)
    if stop <= start:
        return b""
    first, last = start // CHUNK_BYTES, (stop - 1) // CHUNK_BYTES
    span_start = first * CHUNK_BYTES
    wanted = min(length, (last + 1) * CHUNK_BYTES) - span_start
    data = os.pread(fd, wanted, _data_offset(len(sums)) + span_start)
    # A file cut short (at a chunk boundary its table cannot tell) is as corrupt as a wrong chunk.
    if len(data) != wanted or not _chunks_verified(data, sums, first):
        return None
    if start == span_start and len(data) == stop - start:
        return data
    return data[start - span_start:stop - span_start]


def _chunks_verified(data: bytes, sums: list[int], first: int) -> bool:
    view = memoryview(data)
    for number, offset in enumerate(range(0, len(data), CHUNK_BYTES), start=first):
        if number >= len(sums) or checksum(view[offset:offset + CHUNK_BYTES]) != sums[number]:
            return False
    return True


def _is_shard(entry: os.DirEntry[str]) -> bool:
    return len(entry.name) == SHARD_LENGTH and _HEX.issuperset(entry.name) and entry.is_dir(follow_symlinks=False)


def _write_all(fd: int, parts: tuple[bytes | memoryview, ...]) -> None:
    """One writev for header, data and id; finishes with plain writes if the kernel wrote less."""
    written = os.writev(fd, parts)
    for part in parts:
        if written >= len(part):
            written -= len(part)
            continue
        view = memoryview(part)[written:]
        written = 0
        while view:
            view = view[os.write(fd, view) :]


# O_DIRECT wants buffers, offsets and lengths aligned to the device's logical block; 4 KiB covers every disk.
DIRECT_ALIGNMENT = 4096
_direct_buffers = threading.local()


def _aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least ``size`` bytes, reused per thread (fresh pages cost page faults)."""
    buffer: mmap.mmap | None = getattr(_direct_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        if buffer is not None:
            buffer.close()
        buffer = mmap.mmap(-1, size)
        _direct_buffers.buffer = buffer
    return buffer


# Buffers of ``FillBuffer`` kept for reuse (fresh pages cost page faults): enough for the agent's loads in flight.
FILL_BUFFERS_KEPT = 16
_fill_pool: list[mmap.mmap] = []
_fill_lock = threading.Lock()


def _take_fill_buffer(size: int) -> mmap.mmap:
    with _fill_lock:
        for at, buffer in enumerate(_fill_pool):
            if len(buffer) >= size:
                return _fill_pool.pop(at)
    return mmap.mmap(-1, size)


def _give_fill_buffer(buffer: mmap.mmap) -> None:
    with _fill_lock:
        if len(_fill_pool) < FILL_BUFFERS_KEPT:
            _fill_pool.append(buffer)
            return
        smallest = min(range(len(_fill_pool)), key=lambda at: len(_fill_pool[at]))
        if len(_fill_pool[smallest]) < len(buffer):
            buffer, _fill_pool[smallest] = _fill_pool[smallest], buffer
    buffer.close()


class FillBuffer:
    """A page-aligned buffer laid out as one block file (header | chunk table | data | block id | padding), so a
    block fetched into ``data`` goes to disk with one ``O_DIRECT`` write of the buffer itself.

    ``data`` is a view of the data region: the fetch writes the block there (the only user-space copy of its bytes
    after the socket's); ``seal`` fills in the header, the table (checksummed over ``data`` where it lies) and the
    id. Not thread-safe: filled on the loop, sealed and written in one writer thread, released after."""

    __slots__ = ("_buffer", "_ident", "_offset", "_size", "block", "data", "length")

    def __init__(self, block: BlockId, length: int) -> None:
        if not 0 <= length <= MAX_DATA_BYTES:
            raise ValueError(f"a block of {length} bytes")
        self.block = block
        self.length = length
        self._ident = _ID_ENCODER.encode(block)
        self._offset = _data_offset(_chunk_count(length))
        self._size = self._offset + length + len(self._ident)
        self._buffer: mmap.mmap | None = _take_fill_buffer(-(-self._size // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT)
        self.data = memoryview(self._buffer)[self._offset:self._offset + length]

    def seal(self) -> None:
        assert self._buffer is not None, "released"
        buffer, offset, length = self._buffer, self._offset, self.length
        table = _chunk_table(self.data)
        buffer[:HEADER.size] = HEADER.pack(MAGIC, FORMAT_VERSION, 0, length, checksum(table), len(self._ident), 0)
        buffer[HEADER.size:offset] = table
        buffer[offset + length:self._size] = self._ident

    def write_to(self, fd: int, direct: bool) -> None:
        """The sealed file into ``fd``: padded to the alignment and truncated (direct), or as it is."""
        assert self._buffer is not None, "released"
        if not direct:
            with memoryview(self._buffer)[:self._size] as view:
                _write_all(fd, (view,))
            return
        padded = -(-self._size // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        self._buffer[self._size:padded] = bytes(padded - self._size)
        with memoryview(self._buffer)[:padded] as view:
            written = 0
            while written < padded:
                written += os.pwrite(fd, view[written:], written)
        os.ftruncate(fd, self._size)

    def release(self) -> None:
        """Give the buffer back for reuse; ``data`` must not be used afterwards."""
        if self._buffer is not None:
            self.data.release()
            _give_fill_buffer(self._buffer)
            self._buffer = None


def _write_direct(fd: int, parts: tuple[bytes | memoryview, ...]) -> None:
    """Write the parts with O_DIRECT: padded to the alignment, then truncated to the real length.

    Measured on this project's machines: buffered writes cost ~4.5 ms of kernel CPU per MiB (page-cache
    allocation), O_DIRECT ~0.3 ms, and the agent shares two cores with FUSE and the object store. Direct writes
    also keep blocks out of the page cache, where the FUSE mount's own pages already hold them.
    """
    length = sum(len(part) for part in parts)
    padded = -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    buffer = _aligned_buffer(padded)
    offset = 0
    for part in parts:
        buffer[offset:offset + len(part)] = part
        offset += len(part)
    buffer[length:padded] = bytes(padded - length)
    view = memoryview(buffer)[:padded]
    try:
        written = 0
        while written < padded:
            written += os.pwrite(fd, view[written:], written)
    finally:
        view.release()
    os.ftruncate(fd, length)


def _unlink_quietly(path: str) -> None:
    # Already gone, or the disk is failing and the next scan deletes it.
    with contextlib.suppress(OSError):
        os.unlink(path)
