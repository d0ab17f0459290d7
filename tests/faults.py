"""Fault injection for tests: a TCP proxy on loopback in front of a real server, which can be cut and restored;
and object stores that list keys a real S3 server will not store.

Cutting closes the listener and every open connection, so clients see "connection refused" exactly as if the
object store went away; restoring listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

from libs.embedded import LOOPBACK, free_port
from libs.ufs.base import NoSuchKey, ObjectChanged, ObjectInfo, ObjectStore


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(upstream_writer)


class ListedStore:
    """An in-memory object store for keys SeaweedFS will not store as given (it normalises '//' and a leading
    '/', and refuses long names): the real sync lists it like any ``ObjectStore``, in the order given."""

    def __init__(self, objects: dict[str, bytes], mtime: float = 1_700_000_000.0) -> None:
        self.objects = objects
        self.mtime = mtime

    def _info(self, key: str) -> ObjectInfo:
        body = self.objects[key]
        return ObjectInfo(key=key, size=len(body), etag=hashlib.md5(body).hexdigest(), mtime=self.mtime)

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        for key in list(self.objects):
            yield self._info(key)

    async def head(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise NoSuchKey(f"no object {key!r}")
        return self._info(key)

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        info = await self.head(key)
        if etag is not None and etag != info.etag:
            raise ObjectChanged(f"{key!r} changed")
        return self.objects[key][start:start + length]

    async def close(self) -> None:
        return None


class ExtraKeys:
    """A real store whose listing also names ``extra`` keys (as the store would list them), e.g. a key with a
    leading '/' that AWS S3 lists but SeaweedFS normalises away; every other call goes to the real store."""

    def __init__(self, store: ObjectStore, extra: list[ObjectInfo]) -> None:
        self.store = store
        self.extra = extra

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        async for info in self.store.list(page_size):
            yield info
        for info in self.extra:
            yield info

    async def head(self, key: str) -> ObjectInfo:
        return await self.store.head(key)

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        return await self.store.get_range(key, start, length, etag)

    async def close(self) -> None:
        await self.store.close()
