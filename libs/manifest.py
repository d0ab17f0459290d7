"""The dataset manifest: one ``ManifestEntry`` line per file (path in the dataset, mount, key, size, ETag, mtime).

Which I/O it owns: the manifests in the JetStream Object Store ``shoal_manifests``, one object per dataset, as
newline-delimited JSON. (``ManifestEntry`` itself is a schema in ``libs.events.dataset``, so pure modules use it
without importing NATS.) ``ManifestStore`` is the one way in: the dataset service spools entries into a
``ManifestWriter`` (in memory while small, then a temporary file) while the listing streams (bounded memory) and
saves it; every agent loads it back instead of listing the bucket again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import IO, TypeVar

import msgspec
from nats.js.errors import DigestMismatchError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore as NatsObjectStore

from libs import subjects
from libs.bus import Bus
from libs.events.dataset import ManifestEntry
from libs.paths import is_folder

R = TypeVar("R")
# How often a record is read again because the manifest it named was replaced meanwhile: a sync that finishes
# deletes the manifest it replaced, so a reader between the two reads finds it gone.
CURRENT_ATTEMPTS = 3

_encoder = msgspec.json.Encoder()
# How the NATS Object Store names an object's digest (ObjectInfo.digest): compared with ManifestWriter.digest.
OBJECT_DIGEST_PREFIX = "SHA-256="
# Read size when hashing a spooled manifest: large enough that hashing runs at memory speed.
DIGEST_CHUNK = 1024 * 1024
_decoder = msgspec.json.Decoder(ManifestEntry)


def write_entry(out: IO[bytes], entry: ManifestEntry) -> None:
    out.write(_encoder.encode(entry))
    out.write(b"\n")


def read_entries(lines: IO[bytes]) -> Iterator[ManifestEntry]:
    for line in lines:
        if line.strip():
            yield _decoder.decode(line)


# A manifest stays in memory up to this size, then moves to a temporary file. Most datasets' manifests are small
# (a few hundred bytes per file): a burst of thousands of syncs then opens no file and wakes no thread per sync (on a
# busy machine each cost a millisecond or more), while a listing of millions of objects still uses bounded memory.
SPOOL_BYTES = 256 * 1024
# A manifest replaced while it is read (a sync finishing meanwhile) leaves the reader waiting for chunks that were
# purged (nats-py's get has no timeout) or with bytes that match no digest: it is read again, from the new one.
# Each read may take LOAD_SECONDS plus a second per LOAD_BYTES_PER_SECOND of manifest, LOAD_ATTEMPTS reads at most.
LOAD_SECONDS = 10.0
LOAD_BYTES_PER_SECOND = 10 * 1024 * 1024
LOAD_ATTEMPTS = 3


class ManifestWriter:
    """A manifest being written: entries go to memory, then to a temporary file past ``SPOOL_BYTES``, so memory
    does not grow with the listing."""

    def __init__(self) -> None:
        self._memory: io.BytesIO | None = io.BytesIO()
        self._out: IO[bytes] = self._memory
        self.file_num = 0
        self.total_bytes = 0

    def add(self, entry: ManifestEntry) -> None:
        write_entry(self._out, entry)
        if self._memory is not None and self._memory.tell() > SPOOL_BYTES:
            spilled = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the writer, closed by close()
            spilled.write(self._memory.getvalue())
            self._out, self._memory = spilled, None
        if not is_folder(entry.path):  # a folder marker is not a file (libs.paths)
            self.file_num += 1
            self.total_bytes += entry.size

    def digest(self) -> str:
        """The SHA-256 of everything written so far, spelled as the Object Store spells an object's digest.

        One pass over the manifest at the end (hashlib in large chunks), not a hash update per entry."""
        small = self.in_memory()
        if small is not None:
            sha256 = hashlib.sha256(small)
        else:
            sha256 = hashlib.sha256()
            spool = self.rewound()
            while chunk := spool.read(DIGEST_CHUNK):
                sha256.update(chunk)
        return OBJECT_DIGEST_PREFIX + base64.urlsafe_b64encode(sha256.digest()).decode()

    def in_memory(self) -> bytes | None:
        """The whole manifest while it is still in memory, else None (read it from ``rewound``)."""
        return None if self._memory is None else self._memory.getvalue()

    def rewound(self) -> IO[bytes]:
        self._out.flush()
        self._out.seek(0)
        return self._out

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class ManifestStore:
    """Every dataset's manifest, named ``<namespace>.<name>`` in the Object Store."""

    def __init__(self, objects: NatsObjectStore) -> None:
        self.objects = objects

    @classmethod
    async def of(cls, bus: Bus) -> ManifestStore:
        return cls(await bus.manifests())

    @staticmethod
    def name(namespace: str, name: str) -> str:
        return subjects.manifest_name(namespace, name)

    async def save(self, name: str, writer: ManifestWriter, first: bool = False) -> bool:
        """Upload everything written so far under ``name``, replacing the previous manifest; False (nothing
        uploaded) when the stored manifest already has exactly these bytes, so an unchanged listing makes no
        new object. ``first``: the caller knows of no manifest under that name (a new dataset, spec or resync),
        so the stored one is not compared (a round trip per dataset in a burst of applies); one left over is
        replaced."""
        info = None
        if not first:
            with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                info = await self.objects.get_info(name)
        if info is not None and info.digest == writer.digest():
            return False
        # Bytes are read in place; a file is read in a worker thread (nats-py), chunk by chunk.
        small = writer.in_memory()
        await self.objects.put(name, small if small is not None else writer.rewound())  # type: ignore[arg-type]
        return True

    async def load(self, name: str) -> list[ManifestEntry]:
        """The entries of manifest ``name``; read again if it was replaced while being read (``LOAD_ATTEMPTS``)."""
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            info = await self.objects.get_info(name)
            try:
                with tempfile.TemporaryFile() as out:
                    await asyncio.wait_for(self.objects.get(name, writeinto=out),
                                           LOAD_SECONDS + (info.size or 0) / LOAD_BYTES_PER_SECOND)
                    out.seek(0)
                    if (info.size or 0) <= SPOOL_BYTES:
                        return list(read_entries(out))
                    # A large one in a thread: decoding a million entries takes seconds, which the caller's event
                    # loop (a mount's serves every FUSE request) would spend stalled.
                    return await asyncio.to_thread(lambda: list(read_entries(out)))
            except (TimeoutError, DigestMismatchError):
                if attempt == LOAD_ATTEMPTS:
                    raise
        raise AssertionError("LOAD_ATTEMPTS must be at least 1")

    async def load_current(self, read: Callable[[], Awaitable[R | None]], manifest_of: Callable[[R], str],
                           record: R | None = None) -> tuple[R | None, list[ManifestEntry] | None]:
        """A record (``record``, else ``read()``) and the entries of the manifest ``manifest_of`` it names. When
        that manifest is gone, a sync replaced it meanwhile: the record is read again and its manifest loaded
        (``CURRENT_ATTEMPTS`` in all). Entries are None when there is no record, it names no manifest, or it still
        names the one that is gone."""
        if record is None:
            record = await read()
        for _ in range(CURRENT_ATTEMPTS):
            if record is None or not manifest_of(record):
                break
            named = manifest_of(record)
            try:
                return record, await self.load(named)
            except (ObjectNotFoundError, NotFoundError):
                record = await read()
                if record is not None and manifest_of(record) == named:
                    break
        return record, None

    async def delete(self, name: str) -> None:
        """Remove a manifest; one that is already gone is fine."""
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await self.objects.delete(name)
