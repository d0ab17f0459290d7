"""The dataset manifest: one line per file (path in the dataset, source mount and key, size, ETag, mtime).

Stored in the JetStream Object Store as newline-delimited JSON, so it is written while the listing streams
(bounded memory) and read back the same way by every agent instead of listing the bucket again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import msgspec


class ManifestEntry(msgspec.Struct, frozen=True, rename="camel"):
    path: str  # '/'-rooted path inside the dataset; a folder marker's ends in '/' (libs.paths)
    mount: int  # index into spec.mounts
    key: str  # object key relative to the mount's prefix
    size: int
    etag: str
    mtime: float


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ManifestEntry)


def write_entry(out: IO[bytes], entry: ManifestEntry) -> None:
    out.write(_encoder.encode(entry))
    out.write(b"\n")


def read_entries(lines: IO[bytes]) -> Iterator[ManifestEntry]:
    for line in lines:
        if line.strip():
            yield _decoder.decode(line)
