"""Reading part of an HTTP answer's body, for the ranged GETs of the web and S3 stores: the server may send more
than the range (one that ignores Range answers 200 with the whole file; a broken or hostile one never stops), and
a read must cost the bytes it asked for, not the whole body held in memory. The body is any ``read(n)`` that gives
at most ``n`` bytes and ``b""`` at its end: aiohttp's ``StreamReader.read`` (the pre-signed and web reads) or
aiobotocore's ``StreamingBody.read`` (the S3 client's answers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

# Pieces taken from the body at a time.
PIECE_BYTES = 1024 * 1024

Read = Callable[[int], Awaitable[bytes]]


async def read_part(read: Read, start: int, length: int) -> tuple[bytes, bool]:
    """Bytes ``start`` to ``start + length`` of the body read by ``read`` (fewer if it ends first), and whether the
    body goes on after them. What comes before ``start`` is read and dropped; after the part, at most one byte more
    is read."""
    skipped = 0
    parts: list[bytes] = []
    wanted = length
    while chunk := await read(PIECE_BYTES):
        if skipped + len(chunk) <= start:
            skipped += len(chunk)
            continue
        piece = chunk[max(0, start - skipped):]
        skipped = start
        parts.append(piece[:wanted])
        wanted -= len(parts[-1])
        if wanted <= 0:
            return b"".join(parts), len(piece) > len(parts[-1]) or bool(await read(1))
    return b"".join(parts), False
