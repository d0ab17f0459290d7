"""A bandwidth-limited link to the object store for the seed bench: a TCP proxy on loopback in front of SeaweedFS
whose responses share one token bucket, so the limit holds for the whole store link (every connection of every
reader together), like an object store behind a 10 Gbit/s pipe. It counts the bytes the store sent through it and
the requests (by method) clients sent, which is how the bench reports "store bytes" without trusting the system
under test's own counters.

A TCP proxy rather than ``tc`` in a network namespace: it needs no privileges or kernel modules, works on
loopback, and is the only place every byte passes, so counting is exact. It is transparent to S3 signatures (the
Host header is the proxy's address on both sides). It runs its own event loop in a thread, so the bench's
blocking calls (spawning processes, waiting for them) never stall the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from libs.embedded import LOOPBACK, free_port

# Reads of up to 256 KiB: at 50 MB/s that is ~5 ms of tokens, fine-grained enough that 8 connections share the
# link evenly, and coarse enough that the proxy's own CPU stays far below the link's rate.
CHUNK = 256 * 1024
# A burst of 1 MiB: a new connection may not race ahead of the limit by more than a fraction of a second's worth.
BURST = 1024 * 1024
_REQUEST_LINE = re.compile(rb"^([A-Z]+) ")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class TokenBucket:
    """``rate`` bytes a second for all callers together; FIFO (asyncio.Lock is fair), so no connection starves."""

    def __init__(self, rate: float, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= amount
            if self.tokens < 0:
                # Wait until the debt is paid; the next caller queues behind us on the lock.
                await asyncio.sleep(-self.tokens / self.rate)


@dataclass
class LinkStats:
    """What went through the link since the last reset."""

    store_bytes: int = 0  # bytes the store sent (responses: headers and bodies)
    client_bytes: int = 0  # bytes clients sent (requests)
    requests: dict[str, int] = field(default_factory=dict)  # by method: GET, HEAD, ...
    connections: int = 0

    @property
    def gets(self) -> int:
        return self.requests.get("GET", 0)


class RequestCounter:
    """Counts HTTP/1.1 requests on one client→store byte stream (pipelined or kept alive), skipping bodies by their
    Content-Length. A chunked request body (S3 clients of this bench send none) stops the count on that
    connection rather than miscounting."""

    def __init__(self, record: Callable[[str], None]) -> None:
        self.record = record
        self.buffer = b""
        self.skip = 0
        self.lost = False

    def feed(self, data: bytes) -> None:
        if self.lost:
            return
        if self.skip:
            used = min(self.skip, len(data))
            self.skip -= used
            data = data[used:]
        self.buffer += data
        while not self.skip and (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
            match = _REQUEST_LINE.match(head)
            self.record(match.group(1).decode() if match else "?")
            if b"transfer-encoding: chunked" in head.lower():
                self.lost = True
                return
            length = _CONTENT_LENGTH.search(head)
            body = int(length.group(1)) if length else 0
            used = min(body, len(self.buffer))
            self.buffer = self.buffer[used:]
            self.skip = body - used
        if len(self.buffer) > 1 << 20:  # not HTTP as we know it
            self.lost = True


class ThrottledProxy:
    """``start()`` listens on a free loopback port and forwards to ``target_port``; ``stats()``/``reset()`` read and
    zero the counters; ``stop()`` closes everything. ``rate`` is bytes a second (store → clients)."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = free_port()
        self._stats = LinkStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._bucket: TokenBucket | None = None
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as err:  # reported to the caller below
                self._error = err
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="store-link", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the throttled store link did not start: {self._error}")

    async def _listen(self) -> None:
        self._bucket = TokenBucket(self.rate)
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        thread.join(10)

    def stats(self) -> LinkStats:
        with self._lock:
            s = self._stats
            return LinkStats(s.store_bytes, s.client_bytes, dict(s.requests), s.connections)

    def reset(self) -> LinkStats:
        """Zero the counters; returns what they held."""
        with self._lock:
            old, self._stats = self._stats, LinkStats()
            return old

    def _count(self, attribute: str, amount: int) -> None:
        with self._lock:
            setattr(self._stats, attribute, getattr(self._stats, attribute) + amount)

    def _request(self, method: str) -> None:
        with self._lock:
            self._stats.requests[method] = self._stats.requests.get(method, 0) + 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        self._count("connections", 1)
        self._writers.update((writer, upstream_writer))
        counter = RequestCounter(self._request)
        bucket = self._bucket
        assert bucket is not None

        async def upstream() -> None:  # requests: counted, not limited (they are a few hundred bytes)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(CHUNK):
                    counter.feed(data)
                    self._count("client_bytes", len(data))
                    upstream_writer.write(data)
                    await upstream_writer.drain()
            upstream_writer.close()

        async def downstream() -> None:  # responses: through the shared bucket, then counted
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await upstream_reader.read(CHUNK):
                    await bucket.take(len(data))
                    self._count("store_bytes", len(data))
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(upstream(), downstream())
        finally:
            self._writers.discard(writer)
            self._writers.discard(upstream_writer)
