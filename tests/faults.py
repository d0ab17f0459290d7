"""Fault injection and probes for tests, in front of real servers and real object stores.

- ``CuttableProxy``: a TCP proxy on loopback that can be cut and restored. Cutting closes the listener and every
  open connection, so clients see "connection refused" exactly as if the object store went away; restoring
  listens again on the same port.
- ``CountingStore``: an ``ObjectStore`` wrapper that records every ranged GET that reaches the real store, can
  hold GETs until released (to make concurrent misses meet) and can act unreachable.
- ``HttpProxy``: an HTTP proxy in front of an S3 endpoint that records request headers (and method, path,
  Range in ``calls``) and can strip ``If-Match``, i.e. behave like a store that ignores conditional GETs.
- ``TamperingPeerProxy``: in front of a real peer server (services.agent.peer), answers with a flipped block byte,
  a bad response signature, a short body or a wrong length, like a corrupt or lying peer.
- ``FaultyStoreProxy``: an ``HttpProxy`` that answers the next ranged GETs with the HTTP errors queued in
  ``faults`` (500, 503: S3 XML error bodies), every one with ``always`` while it is set, and holds each ranged GET
  ``delay`` seconds before forwarding it (a slow store), counting what it spoiled in ``injected``; with ``quote``
  the errors' text quotes the request (its URL, a pre-signed one's signature included, and its headers) and then
  ``quote`` (e.g. a megabyte of it), like a chatty proxy.
- ``ServiceProcess``: ``python -m services.<name>`` as a real process, so ``kill -9`` is real: started, killed
  with SIGKILL, started again, stopped with SIGTERM; its output kept in a log file for the failure message.
- ``ListedStore`` and ``ExtraKeys``: stores that list keys a real S3 server will not store as given (a leading
  '/', '//', long names, NUL), below the real sync.
- ``StalledCacheFile``: a FIFO named like a block file in a disk tier, so a real mount process scanning its cache
  at start hangs in ``open`` (as on a disk or NFS server that stopped answering) until the test lets it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from aiohttp import ClientSession, web

from libs.embedded import LOOPBACK
from libs.ufs import open_store
from libs.ufs.base import EndpointUnreachable, Location, NoSuchKey, ObjectChanged, ObjectInfo, ObjectStore
from services.agent.cache.tiers import INDEX_FILE, MARKER, MARKER_TEXT, SHARD_LENGTH
from tests.helpers import ReservedPort


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        # Held from here on, also while cut: its clients are refused, never answered by another process's server.
        self._reserved: ReservedPort | None = ReservedPort()
        self.port = self._reserved.port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        reserved, self._reserved = self._reserved, None
        if reserved is None:  # not held since the cut (see ``cut``)
            self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)
        else:
            self._server = await asyncio.start_server(self._serve, sock=reserved.take())

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
            try:
                self._reserved = ReservedPort(again=self.port)
            except OSError:  # a connection not closed yet holds it without address reuse: held by none, as before
                self._reserved = None

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


@dataclass(frozen=True)
class Get:
    key: str
    start: int
    length: int


class HoldsGets:
    """``hold()`` makes the ranged GETs that reach ``_pass_gate`` wait, counted in ``waiting`` (the most at once in
    ``most_waiting``), until ``release()``."""

    waiting = 0
    most_waiting = 0
    _gate: asyncio.Event | None = None

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    async def _pass_gate(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await gate.wait()
        finally:
            self.waiting -= 1


class CountingStore(HoldsGets):
    """An ``ObjectStore`` that passes everything to ``inner`` and records each ranged GET (``gets``).

    ``hold()`` makes GETs wait (counted in ``waiting``) until ``release()``; ``unreachable = True`` makes them
    fail with ``EndpointUnreachable`` before reaching the store, as a dead endpoint would.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets: list[Get] = []
        self.unreachable = False

    @property
    def bytes_read(self) -> int:
        return sum(get.length for get in self.gets)

    def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(page_size)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    async def names_object(self) -> bool:
        return await self.inner.names_object()

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        self.gets.append(Get(key, start, length))
        if self.unreachable:
            raise EndpointUnreachable("cannot reach the test's store: cut by the test")
        await self._pass_gate()
        return await self.inner.get_range(key, start, length, etag=etag)

    async def close(self) -> None:
        await self.inner.close()


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    range: str | None


class LoopbackProxy:
    """An HTTP server on a free loopback port whose every request goes to ``_forward`` (a subclass's), with a
    client session to the ``target`` it forwards to."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self._reserved = ReservedPort()  # held until it listens: see ReservedPort
        self.port = self._reserved.port
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._reserved.take()).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpProxy(HoldsGets, LoopbackProxy):
    """Forwards HTTP requests to ``target`` (an S3 endpoint), keeping the Host header so signatures still match.

    Records the headers of every request in ``requests``; with ``strip_if_match`` it drops ``If-Match``, like a
    store that ignores conditional requests.
    """

    def __init__(self, target: str, strip_if_match: bool = False) -> None:
        super().__init__(target)
        self.strip_if_match = strip_if_match
        self.requests: list[dict[str, str]] = []
        self.calls: list[Call] = []

    def ranged_gets(self, key: str | None = None) -> list[Call]:
        """The ranged GETs (block reads) that went through, optionally of one object key."""
        return [call for call in self.calls if call.method == "GET" and call.range
                and (key is None or call.path.endswith("/" + key))]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        self.requests.append(dict(request.headers))
        self.calls.append(Call(request.method, request.path, request.headers.get("Range")))
        if request.method == "GET" and "Range" in request.headers:
            await self._pass_gate()
        if self.strip_if_match:
            headers = {k: v for k, v in headers.items() if k.lower() != "if-match"}
        body = await request.read()
        async with self._session.request(request.method, self.target + request.rel_url.raw_path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as upstream:
            payload = await upstream.read()
            skip = ("content-length", "transfer-encoding", "connection")
            return web.Response(status=upstream.status, body=payload,
                                headers={k: v for k, v in upstream.headers.items() if k.lower() not in skip})


class ServiceProcess:
    """One service as a subprocess (``python -m services.<module>``) with ``env``; ``kill()`` is SIGKILL, no clean
    stop; ``start()`` again after it is a restart. ``close()`` kills whatever still runs (tests call it in a
    ``finally``); ``tail()`` is the end of its log, for assertion messages."""

    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.module = module
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.module} already runs"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", f"services.{self.module}"], env=self.env,
                                            stdout=out, stderr=out)
        self.starts += 1

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.module} is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM and the exit code (0: a clean stop)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def service_env(nats_urls: list[str], **extra: str) -> dict[str, str]:
    """The environment of a service process: this one's, plus NATS, JSON logs and ``extra`` (SHOAL_... = value)."""
    return {**os.environ, "NATS_URL": ",".join(nats_urls), "SHOAL_LOG_FORMAT": "json", **extra}


_S3_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
              503: ("SlowDown", "Please reduce your request rate.")}


class FaultyStoreProxy(HttpProxy):
    """An S3 endpoint that fails or lags on ranged GETs (block reads) as the test says; everything else (listing,
    HEAD, presigning) passes. ``faults``: statuses for the next ranged GETs, one each, in order; ``always``: a
    status for every ranged GET while set (0: none); ``delay``: seconds each ranged GET waits before it is
    forwarded; ``cuts``: how many of the next ranged GETs get their headers and half their body, then a closed
    connection; ``quote``: the errors' <Message> is the request (URL and headers) and this text; ``injected``: the
    faults so far."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.faults: list[int] = []
        self.always = 0
        self.delay = 0.0
        self.cuts = 0
        self.quote = ""
        self.injected = 0

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and "Range" in request.headers and self.cuts:
            self.cuts -= 1
            self.injected += 1
            answer = await super()._forward(request)
            assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
            cut = web.StreamResponse(status=answer.status, headers=answer.headers)
            cut.content_length = len(answer.body)
            await cut.prepare(request)
            await cut.write(answer.body[:len(answer.body) // 2])
            assert request.transport is not None
            request.transport.close()
            return cut
        if request.method == "GET" and "Range" in request.headers:
            status = self.faults.pop(0) if self.faults else self.always
            if status:
                self.injected += 1
                self.calls.append(Call(request.method, request.path, request.headers.get("Range")))
                code, message = _S3_ERRORS.get(status, ("InternalError", "injected"))
                if self.quote:
                    message = f"{request.method} {request.rel_url} {dict(request.headers)} {self.quote}"
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{xml_escape(message)}</Message></Error>")
                return web.Response(status=status, body=body.encode(), content_type="application/xml")
            if self.delay:
                await asyncio.sleep(self.delay)  # the fault itself: a store that answers late
        return await super()._forward(request)


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

    async def names_object(self) -> bool:
        return False  # a folder of ``objects``

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        info = await self.head(key)
        if etag is not None and etag != info.etag:
            raise ObjectChanged(f"{key!r} changed")
        return self.objects[key][start:start + length]

    async def close(self) -> None:
        return None


class StoreWrapper:
    """A real store, every call of which goes to it; a subclass changes one (``list``, say)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        return self.store.list(page_size)

    async def head(self, key: str) -> ObjectInfo:
        return await self.store.head(key)

    async def names_object(self) -> bool:
        return await self.store.names_object()

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        return await self.store.get_range(key, start, length, etag)

    async def close(self) -> None:
        await self.store.close()


class HeldListing(StoreWrapper):
    """A real store whose listing waits until ``release`` is set (``started`` says it began): a sync held at a
    chosen moment while the test changes the world under it."""

    def __init__(self, store: ObjectStore, started: asyncio.Event, release: asyncio.Event) -> None:
        super().__init__(store)
        self.started, self.release = started, release

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        self.started.set()
        await self.release.wait()
        async for info in self.store.list(page_size):
            yield info


@contextlib.asynccontextmanager
async def answering(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """An aiohttp server on loopback answering every GET with ``handler`` (a store or web server that misbehaves
    as the test says); yields its base URL, ``http://127.0.0.1:<port>``."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    try:
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class ListingHold:
    """Syncs whose listings are held (``HeldListing``) where ``held`` says, through ``opener``; ``around`` runs one
    such sync until it is held, lets the test change the world, then releases it and waits for it to finish."""

    def __init__(self, held: Callable[[Location], bool] = lambda _: True) -> None:
        self.started, self.release = asyncio.Event(), asyncio.Event()
        self.held = held

    def opener(self, location: Location) -> ObjectStore:
        store = open_store(location)
        return HeldListing(store, self.started, self.release) if self.held(location) else store

    @contextlib.asynccontextmanager
    async def around(self, sync: Awaitable[object]) -> AsyncIterator[None]:
        task = asyncio.ensure_future(sync)
        try:
            await asyncio.wait_for(self.started.wait(), 10)
            yield
            self.release.set()
            await asyncio.wait_for(task, 10)
        finally:
            self.release.set()
            task.cancel()


class ExtraKeys(StoreWrapper):
    """A real store whose listing also names ``extra`` keys (as the store would list them), e.g. a key with a
    leading '/' that AWS S3 lists but SeaweedFS normalises away; every other call goes to the real store."""

    def __init__(self, store: ObjectStore, extra: list[ObjectInfo]) -> None:
        super().__init__(store)
        self.extra = extra

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        async for info in self.store.list(page_size):
            yield info
        for info in self.extra:
            yield info


class TamperingPeerProxy(LoopbackProxy):
    """Forwards peer-protocol requests to a real peer server and spoils the answer as ``mode`` says:

    ``flip``: one byte of the block flipped (checksum and signature left as sent); ``resign``: the response
    signature altered; ``short``: the body cut short (connection closed); ``length``: a block one byte longer and
    the length says so, with the signature as sent; ``none``: passed through unchanged. ``answers`` counts the
    blocks the peer answered (spoiled unless ``none``). ``stall``: seconds each request is held before it is
    forwarded, not a byte sent meanwhile (a peer whose event loop is starved, or hung); ``stop`` ends the stalls."""

    def __init__(self, target: str, mode: str = "flip") -> None:
        super().__init__(target)
        self.mode = mode
        self.answers = 0
        self.stall = 0.0
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        return self.endpoint

    async def stop(self) -> None:
        self._released.set()
        await super().stop()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.stall:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), self.stall)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.get(self.target + request.rel_url.raw_path_qs, headers=headers) as upstream:
            body = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "")
        preamble, _, block = body.lstrip(b"\n").partition(b"\n")
        words = preamble.split()
        if status != 200 or words[:1] != [b"OK"]:
            return web.Response(status=status, body=body, headers={"Content-Type": content_type})
        self.answers += 1
        if self.mode == "none":
            return web.Response(status=status, body=body, headers={"Content-Type": content_type})
        if self.mode == "flip":
            spoiled = bytearray(block)
            spoiled[len(spoiled) // 2] ^= 0xFF
            return web.Response(body=preamble + b"\n" + bytes(spoiled))
        if self.mode == "resign":
            proof = words[-1]
            words[-1] = (b"0" if proof[:1] != b"0" else b"1") + proof[1:]
            return web.Response(body=b" ".join(words) + b"\n" + block)
        if self.mode == "length":
            longer = block + b"\0"  # the chunk table and the block, one byte more
            words[1] = str(int(words[1]) + 1).encode()
            return web.Response(body=b" ".join(words) + b"\n" + longer)
        # short: headers and half the body, then the connection is dropped mid-answer.
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(preamble + b"\n" + block[: len(block) // 2])
        assert request.transport is not None
        request.transport.close()
        return response


class StalledCacheFile:
    """A FIFO in the disk tier folder ``tier`` (which gets the tier's marker), whose ``open`` blocks until a writer
    comes, as on a disk that stopped answering. ``index`` 0 puts it where the tier's index is (``INDEX_FILE``):
    a mount process blocks there while it starts (``BlockCache.start``). Other indexes name it like a block file:
    the scan that goes on in the background once the mount serves (``BlockCache.scan_rest``) blocks there.
    ``release()`` lets one open waiting there through (True if one was waiting; the start then finds the index
    empty, the scan fails to read the file, and each goes on); ``remove()`` takes it away for the next start."""

    def __init__(self, tier: Path, index: int = 0) -> None:
        name = f"{index:032x}"
        self.path = tier / INDEX_FILE if index == 0 else tier / name[:SHARD_LENGTH] / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (tier / MARKER).exists():
            (tier / MARKER).write_bytes(MARKER_TEXT)
        os.mkfifo(self.path)

    def release(self) -> bool:
        try:
            # Non-blocking: opens only if a reader waits (ENXIO otherwise), which the open then lets through.
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno in (errno.ENXIO, errno.ENOENT):
                return False
            raise
        os.close(fd)
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
