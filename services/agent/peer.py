"""The peer protocol v2: mount processes of one dataset on different nodes lend each other whole cached blocks.

Owns the HTTP I/O between peers (aiohttp, server and client) and the signing rules; the wire format
is documented in ``services/agent/README.md`` ("Peer protocol"). In short:

- ``GET /shoal-peer/v2/<namespace>/<name>/block?mount=M&key=K&etag=E&index=I&blockSize=B`` asks for block ``I``
  of object ``K`` at ETag ``E`` (the manifest's) cut in blocks of ``B`` bytes.
- The request is signed: ``Shoal-Peer-Expires`` (unix seconds) and ``Shoal-Peer-Signature`` (hex
  HMAC-SHA256 under the runtime's key of method, path, sorted query and expiry). The runtime key is
  HMAC-SHA256(cluster secret, ``shoal-peer/v2/<namespace>/<name>``): the secret never travels, and a key
  learnt from one runtime (or protocol version) opens no other.
- A request the server refuses gets a status and a JSON ``{"reason": ...}``: 400 bad parameters, 401 missing or
  expired signature, 403 bad signature, 404 another dataset or an object not in this mount's manifest, 409 another
  ETag or block size, 503 too many requests waiting (or, before any request, too many connections open). A 401
  carries the server's clock (``Shoal-Peer-Time``): a client whose clock is off signs for it and asks once more.
- An accepted request gets ``200`` at once (so a live peer answers within the client's read timeout even while it
  fetches the block from a slow store), then a body: keep-alive newlines while the block is being fetched, then
  ``OK <length> <chunk bytes> <xxh3-64 hex of the chunk table> <response signature hex>\n``, the chunk table (one
  little-endian xxh3-64 per ``chunk bytes`` of the block) and exactly ``length`` bytes; or ``ERR <reason>\n``.
  The response signature is HMAC-SHA256 under the runtime key of the request's signature, the table's checksum,
  the length and the chunk size, so a response cannot be replayed for another request.
- v1 sent one xxh3-64 of the whole block instead of the table. The table is what a disk tier keeps in each block
  file right before the data, so a block on disk goes out with ``sendfile`` from its file as it is: the owner
  neither reads nor checksums it (the header's digest vouches for the table), and the reader checks every chunk.

The server answers from this mount's block cache; a block it does not have it fetches from the store through the
mount's ``BlockReader`` (coalesced with the mount's own reads of that block, and cached), never from another peer,
so requests cannot loop. The client (``PeerClient.get_block``) verifies signature, length, table and every chunk;
every failure is a ``PeerError`` with a reason and the reader moves on to the next source: a peer never yields
wrong bytes. A killed peer costs nothing to notice (its port refuses, its connections reset); only a peer that is
alive but silent, or a host that vanished, is waited for (1.5 s to connect, 3 s without a byte: generous, so a peer
that is merely busy on a loaded node is not abandoned for the store), and either is then skipped for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import trace

from libs import subjects
from libs.blocks import BlockId, checksum, checksum_stream
from libs.events.dataset import ManifestEntry
from libs.listener import CappedListener, app_runner
from libs.metrics import ERROR, NOT_CACHED, OK
from libs.telemetry import extract_context, get_logger, inject_context, tracer
from services.agent.cache import BlockFile
from services.agent.cache.tiers import CHUNK_BYTES as TIER_CHUNK_BYTES
from services.agent.metrics import PeerMetrics

log = get_logger(__name__)

__all__ = [
    "PeerClient",
    "PeerConfigError",
    "PeerError",
    "PeerServer",
    "block_path",
    "block_query",
    "load_secret",
    "runtime_key",
    "sign_request",
    "sign_response",
    "verify_request",
]

VERSION = "v2"
PATH_PREFIX = f"/shoal-peer/{VERSION}"
HEADER_EXPIRES = "Shoal-Peer-Expires"
HEADER_SIGNATURE = "Shoal-Peer-Signature"
# On a 401: the server's clock (unix seconds), so a client whose clock is off signs its next request for the
# server's time (agents' clocks may be hours off: tests/integration/test_clock_skew.py).
HEADER_TIME = "Shoal-Peer-Time"
CONTENT_TYPE = f"application/vnd.shoal.peer-block.{VERSION}"
QUERY_FIELDS = ("mount", "key", "etag", "index", "blockSize")

# A signed request is good for this long: enough for clock skew between nodes on NTP and a queued request,
# short enough that a captured request is soon useless.
REQUEST_TTL_SECONDS = 30
# A server refuses expiries further ahead than this (a client whose clock runs ahead, or a forever-valid request).
MAX_EXPIRY_AHEAD_SECONDS = 120
# Blocks a server holds in memory while sending: 16 x 4 MiB = 64 MiB per mount process at most.
MAX_SERVING = 16
# Requests waiting for a serving slot beyond this are answered 503 at once (the client tries its next source)
# rather than piling up; cheap while they wait (no block in memory), so generous.
MAX_WAITING = 256
# Connections a peer server keeps open at once (an idle kept-alive one counts); beyond, a new one gets 503 and is
# closed, and its reader goes on to its next source. Each costs a file descriptor, which the mount process's cache
# files also need. A reader's mount process keeps at most MAX_CLIENT_REQUESTS (32) connections across all its
# peers, and MAX_SERVING + MAX_WAITING (272) requests are all a server takes at once anyway.
MAX_CONNECTIONS = 512
# While a request waits for a slot or its block is fetched from the store, a newline every so often keeps the
# client's read timeout a liveness check; six of them fit in READ_TIMEOUT, so a loop stalled for a while (a loaded
# node) still gets one out in time.
KEEPALIVE_SECONDS = 0.5
# Client. A killed peer (kill -9, a crashed mount process) is seen at once: its port refuses and its connections are
# reset, whatever these are. They bound only a peer that is alive but silent or a host that is gone, and were too
# tight under load (8 agents on 2 cores: 0.5 s connects and 1 s reads timed out on busy, live peers, whose blocks
# then came from the store). Connect: one attempt of 1.5 s, longer than Linux's first SYN retransmission (1 s, when
# a stalled peer's accept queue is full or a SYN is lost), which two attempts of 0.5 s could never outlast.
CONNECT_TIMEOUT = 1.5
# Read: at most this long without a byte (response headers, keep-alives or the block): a peer whose event loop is
# starved for seconds is still waited for; a hung one costs this once, then is skipped (PEER_COOLDOWN_SECONDS).
READ_TIMEOUT = 3.0
# Whole-request bound: a peer that keeps sending keep-alives forever is given up on.
TOTAL_TIMEOUT = 60.0
# Server: an answer (preamble, table and block) not taken by the reader within this long goes to one that stopped
# reading (its process frozen, its host gone: TCP alone retries for ~15 min, a frozen process's kernel takes nothing
# for ever): the connection is dropped and the serving slot and the block given back. Before, 16 such readers held
# every slot and the server answered nobody else. The reader's own bound, so a reader that still waits is never cut.
SEND_SECONDS = TOTAL_TIMEOUT
# Peer requests in flight per mount process (each holds at most one block in memory).
MAX_CLIENT_REQUESTS = 32
# After a peer failed to answer (or lied), requests to it fail at once for this long (like StoreGate).
PEER_COOLDOWN_SECONDS = 1.0
# ...doubling while it keeps failing, up to this: a hung peer (alive to the agent's heartbeats, deaf to us) costs a
# read timeout every 8 s at most, and a restarted one is back within seconds.
MAX_PEER_COOLDOWN_SECONDS = 8.0
# A request's path and query, percent-encoded, are at most this long; the server takes request lines up to it. The
# longest key a manifest holds is a local file's path (PATH_MAX, 4096 bytes: docs/semantics.md), 12 KiB once each
# byte is encoded, and an ETag is short: room to spare. With aiohttp's default (8190 bytes), a key of ~2,700
# non-ASCII bytes was answered 400, which skips the peer for every block (not one request's refusal).
MAX_TARGET_BYTES = 32 * 1024
# Error bodies and preamble lines are tiny; never read more of them than this.
MAX_REASON_BYTES = 4096
# Chunks of a block checksummed one by one in an answer (the table before the block): the disk tier's chunk, so a
# block file's own table goes out as it is. The client accepts any size in [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES]: a
# tiny chunk would make a huge table, a block is never larger than 64 MiB.
CHUNK_BYTES = TIER_CHUNK_BYTES
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 * 1024 * 1024
CHUNK_SUM = struct.Struct("<Q")
# Client: a kept-alive connection idle longer than this is closed rather than reused (the connector's keep-alive).
# Well under the server's keep-alive (``libs.listener.IDLE_SECONDS``, 120 s), so the peer rarely closes one we are
# about to use (aiohttp asks again once on a new connection when a kept-alive one turns out closed before the answer).
IDLE_SECONDS = 15.0
# Client: aiohttp's read buffer per response (its StreamReader stops reading the socket above twice this). Its
# default, 64 KiB, pauses and resumes the socket several times per 4 MiB block; 1 MiB lets a block stream in
# with a few (measured: see the agent README), bounded per request in flight (32 x 2 MiB).
READ_BUFSIZE = 1024 * 1024
# Client: the most one socket read takes while a block streams in. asyncio's selector transport reads at most
# 256 KiB per ``recv`` (``max_size``): ~16 reads per 4 MiB block, each a parser call, a piece for the join, a
# wake-up of the reading coroutine and a reschedule of the read timeout. Taking whatever the kernel holds, up to a
# default block, cut the reader's CPU per GiB by ~12% (agent README, "Where the time goes"). The read buffer
# is allocated for each read and trimmed to what came (from the heap in a mount process: services.agent.malloc).
RECV_BYTES = 4 * 1024 * 1024


# Refusals that say something of this request only: another dataset or an object outside the peer's manifest (404),
# another ETag or block size (409), a busy peer (503, and 429 from whatever stands in front of one). Any other
# status says the peer refuses every request (bad signature or key, a redirect, parameters it does not take, a
# failing server, not a Shoal peer at all), so asking it first for each block would cost every read a round trip:
# it is skipped for a moment, as one that does not answer.
ONE_REQUEST_REFUSALS = frozenset({404, 409, 429, 503})


class PeerError(Exception):
    """A peer did not give a block we can believe; the message says why. The reader tries its next source.

    ``cooldown``: whether the peer should be skipped for a moment (it is unreachable, lies, or refuses every
    request), or only this request failed (another manifest, busy, the store failed behind it).
    """

    def __init__(self, reason: str, cooldown: bool = True) -> None:
        super().__init__(reason)
        self.cooldown = cooldown


class PeerConfigError(Exception):
    """The peer secret cannot be used (unreadable or empty file): a message a person can act on, no secret in it."""


# --- keys and signatures (pure) ---


def load_secret(path: str) -> bytes:
    """The cluster's peer secret from ``path`` (surrounding whitespace dropped)."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as err:
        raise PeerConfigError(f"cannot read the peer secret file {path}: {err.strerror or err}") from None
    if not secret:
        raise PeerConfigError(f"the peer secret file {path} is empty")
    return secret


def runtime_key(secret: bytes, namespace: str, name: str) -> bytes:
    """The signing key of one runtime: HMAC-SHA256(secret, "shoal-peer/v2/<ns>/<name>")."""
    return hmac.new(secret, f"shoal-peer/{VERSION}/{namespace}/{name}".encode(), hashlib.sha256).digest()


def block_path(namespace: str, name: str) -> str:
    return f"{PATH_PREFIX}/{namespace}/{name}/block"


def block_query(block: BlockId, block_size: int) -> dict[str, str]:
    return {"mount": str(block.mount), "key": block.key, "etag": block.etag, "index": str(block.index),
            "blockSize": str(block_size)}


def _canonical(method: str, path: str, query: Mapping[str, str], expires: int) -> bytes:
    # Sorted and re-encoded, so the signature does not depend on how either side percent-encodes.
    return "\n".join([method.upper(), path, urlencode(sorted(query.items())), str(expires)]).encode()


def sign_request(key: bytes, method: str, path: str, query: Mapping[str, str], expires: int) -> str:
    return hmac.new(key, _canonical(method, path, query, expires), hashlib.sha256).hexdigest()


def verify_request(key: bytes, method: str, path: str, query: Mapping[str, str], expires: str | None,
                   signature: str | None, now: float) -> tuple[int, str] | None:
    """None if the request is signed under ``key`` and not expired; else (HTTP status, reason)."""
    if not signature or not expires:
        return 401, f"missing {HEADER_SIGNATURE} or {HEADER_EXPIRES}"
    try:
        deadline = int(expires)
    except ValueError:
        return 401, f"{HEADER_EXPIRES} is not a number of seconds"
    if deadline < now:
        return 401, "signature expired"
    if deadline > now + MAX_EXPIRY_AHEAD_SECONDS:
        return 401, "expiry too far ahead (clock skew?)"
    if not _same_signature(sign_request(key, method, path, query, deadline), signature.strip().lower()):
        return 403, "bad signature"
    return None


def _same_signature(expected: str, given: str) -> bool:
    """Whether a signature we were sent is the one we computed, in constant time. As bytes: ``compare_digest``
    raises TypeError on a str with non-ASCII characters, which anyone can put in a header or an answer."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def sign_response(key: bytes, request_signature: str, table_digest: int, length: int, chunk_bytes: int) -> str:
    message = f"response\n{request_signature}\n{table_digest:016x}\n{length}\n{chunk_bytes}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


# --- server ---

Lookup = Callable[[int, str], ManifestEntry | None]
BlockSource = Callable[[ManifestEntry, int], Awaitable[bytes]]
FileSource = Callable[[ManifestEntry, int], BlockFile | None]
Cached = Callable[[ManifestEntry, int], bool]


class PeerServer:
    """Serves this mount's blocks to the other nodes of its dataset.

    ``lookup(mount, key)`` gives the manifest entry this mount serves (its current manifest), ``source(entry,
    index)`` the block's bytes: from the cache, else from the store and cached (``BlockReader.serve_block``).
    """

    def __init__(self, key: bytes, namespace: str, name: str, block_size: int, lookup: Lookup,
                 source: BlockSource, clock: Callable[[], float] = time.time, max_serving: int = MAX_SERVING,
                 max_waiting: int = MAX_WAITING, keepalive: float = KEEPALIVE_SECONDS,
                 open_file: FileSource | None = None, metrics: PeerMetrics | None = None,
                 cached: Cached | None = None, max_connections: int = MAX_CONNECTIONS,
                 send_timeout: float = SEND_SECONDS) -> None:
        self.key = key
        # Requests by outcome and bytes served, for /metrics; ``cached`` tells ok (from the cache) from
        # not_cached (fetched from the store to answer).
        self.metrics = metrics
        self.cached = cached
        self.open_file = open_file
        self.namespace = namespace
        self.name = name
        self.block_size = block_size
        self.lookup = lookup
        self.source = source
        self.clock = clock
        self.keepalive = keepalive
        self.send_timeout = send_timeout
        self.served_bytes = 0
        self.refused = 0
        self._slots = asyncio.Semaphore(max_serving)
        self._max_waiting = max_waiting
        self._waiting = 0
        self.max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self.listener: CappedListener | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        # GET only: aiohttp also routes HEAD to a GET handler, and the block goes out past aiohttp's writer (framed
        # here, or ``sendfile``), so a HEAD answer carried a body and broke the connection's framing.
        app.router.add_get(f"{PATH_PREFIX}/{{namespace}}/{{name}}/block", self.handle, allow_head=False)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = app_runner(self.app(), max_line_size=MAX_TARGET_BYTES)
        await self._runner.setup()
        self.listener = CappedListener(self._runner, self.max_connections,
                                       f"peer server of {self.namespace}/{self.name}")
        self.port = await self.listener.start(host, port, reuse_address=True)
        log.info("peer server listening", dataset=subjects.object_name(self.namespace, self.name), host=host,
                 port=self.port, max_connections=self.max_connections)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.listener.open if self.listener is not None else 0

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refuse(self, status: int, reason: str, now: float | None = None) -> web.Response:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.refused(status)
        headers = {HEADER_TIME: str(int(now))} if now is not None else None
        return web.json_response({"reason": reason}, status=status, headers=headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query: dict[str, str] = {}
        for field, value in request.query.items():
            if field in query:
                return self._refuse(400, f"parameter {field} given twice")
            query[field] = value
        now = self.clock()
        refused = verify_request(self.key, request.method, request.path, query,
                                 request.headers.get(HEADER_EXPIRES), request.headers.get(HEADER_SIGNATURE), now)
        if refused is not None:
            return self._refuse(*refused, now=now if refused[0] == 401 else None)
        if (request.match_info["namespace"], request.match_info["name"]) != (self.namespace, self.name):
            return self._refuse(404, f"this peer serves {self.namespace}/{self.name}")
        unknown = sorted(set(query) - set(QUERY_FIELDS))
        missing = [field for field in QUERY_FIELDS if field not in query]
        if unknown or missing:
            return self._refuse(400, f"unknown parameters {unknown}, missing {missing}")
        try:
            mount, index, block_size = int(query["mount"]), int(query["index"]), int(query["blockSize"])
        except ValueError:
            return self._refuse(400, "mount, index and blockSize must be integers")
        if mount < 0 or index < 0 or block_size <= 0:
            return self._refuse(400, "mount, index and blockSize must not be negative")
        if block_size != self.block_size:
            return self._refuse(409, f"this peer cuts blocks of {self.block_size} bytes")
        entry = self.lookup(mount, query["key"])
        if entry is None:
            return self._refuse(404, "object not in this peer's manifest")
        if entry.etag != query["etag"]:
            return self._refuse(409, "this peer's manifest has another ETag for the object")
        if index * block_size >= entry.size:
            return self._refuse(400, "block index past the end of the object")
        if self._waiting >= self._max_waiting:
            return self._refuse(503, "too many requests waiting")
        signature = request.headers[HEADER_SIGNATURE].strip().lower()
        if "traceparent" not in request.headers:
            return await self._send(request, entry, index, signature)
        # The asking node's read miss continues here (a store GET made for it is a child of this span).
        with tracer(__name__).start_as_current_span("serve block", context=extract_context(request.headers),
                                                    kind=trace.SpanKind.SERVER,
                                                    attributes={"shoal.object.key": entry.key,
                                                                "shoal.block.index": index}):
            return await self._send(request, entry, index, signature)

    async def _send(self, request: web.Request, entry: ManifestEntry, index: int,
                    signature: str) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": CONTENT_TYPE,
                                                            "Cache-Control": "no-store"})
        outcome = ERROR
        try:
            await response.prepare(request)
            outcome = await self._answer(request, response, entry, index, signature)
        except ConnectionError:  # the client went away (gave up, or died): nothing to tell anyone
            pass
        finally:
            if self.metrics is not None:
                self.metrics.answered(outcome)
        return response

    async def _answer(self, request: web.Request, response: web.StreamResponse, entry: ManifestEntry, index: int,
                      signature: str) -> str:
        """Sends the block (or ``ERR``); returns the outcome for /metrics: ok, not_cached or error."""
        self._waiting += 1
        acquire = asyncio.ensure_future(self._slots.acquire())
        try:
            await _keepalive(response, acquire, self.keepalive)
        except BaseException:
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                self._slots.release()
            raise
        finally:
            self._waiting -= 1
        try:
            opened = self.open_file(entry, index) if self.open_file is not None else None
            if opened is not None:
                with opened.file:
                    async with self._sending(request):
                        await self._send_file(request, response, opened, signature)
                return OK
            outcome = OK if self.cached is None or self.cached(entry, index) else NOT_CACHED
            load = asyncio.ensure_future(self.source(entry, index))
            load.add_done_callback(_retrieve)
            # Shielded: a client that goes away must not cancel a fetch other readers may share.
            await _keepalive(response, asyncio.shield(load), self.keepalive)
            try:
                data = load.result()
            except Exception as err:  # the store failed: say so; the client tries its next source
                reason = " ".join(str(err).split())[:200] or type(err).__name__
                await response.write(f"ERR {reason}\n".encode())
                await response.write_eof()
                return ERROR
            table = chunk_table(data, CHUNK_BYTES)
            async with self._sending(request):
                await response.write(self._preamble(signature, len(data), CHUNK_BYTES, checksum(table)))
                _write_chunk(request, table, data)
                await response.write_eof()  # the last chunk, and waits until the block is (nearly) all sent
            self.served_bytes += len(data)
            if self.metrics is not None and self.metrics.served is not None:
                self.metrics.served(len(data))
            return outcome
        finally:
            self._slots.release()


    @contextlib.asynccontextmanager
    async def _sending(self, request: web.Request) -> AsyncIterator[None]:
        """Bounds sending an answer by ``send_timeout``: past it, the connection is dropped (ConnectionResetError,
        as for a reader that hung up) with what is still buffered for it."""
        try:
            async with asyncio.timeout(self.send_timeout):
                yield
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            log.warning("a peer reader took no answer in time, connection dropped", seconds=self.send_timeout,
                        dataset=subjects.object_name(self.namespace, self.name))
            raise ConnectionResetError(f"the answer was not taken within {self.send_timeout:g} s") from None

    def _preamble(self, signature: str, length: int, chunk_bytes: int, table_digest: int) -> bytes:
        proof = sign_response(self.key, signature, table_digest, length, chunk_bytes)
        return f"OK {length} {chunk_bytes} {table_digest:016x} {proof}\n".encode()

    async def _send_file(self, request: web.Request, response: web.StreamResponse, opened: BlockFile,
                         signature: str) -> None:
        """Table and block straight from the cache file to the socket (``sendfile``: no copy, no checksum here;
        the client checks every chunk against the table, whose digest the header vouched for and we sign)."""
        await response.write(self._preamble(signature, opened.length, opened.chunk_bytes, opened.table_digest))
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        count = opened.table_bytes + opened.length
        transport.write(f"{count:x}\r\n".encode("ascii"))
        try:
            sent = await asyncio.get_running_loop().sendfile(transport, opened.file, opened.offset, count)
        except RuntimeError:  # "transport is closing": the client went away between two checks
            if transport.is_closing():
                raise ConnectionResetError("the client went away") from None
            raise
        if sent != count:  # the file shrank under us: the answer cannot be framed any more; the client sees it cut
            transport.close()
            raise ConnectionResetError(f"block file ended after {sent} of {count} bytes")
        transport.write(b"\r\n")
        await response.write_eof()
        self.served_bytes += opened.length
        if self.metrics is not None and self.metrics.served is not None:
            self.metrics.served(opened.length)


async def _keepalive(response: web.StreamResponse, future: asyncio.Future[Any], interval: float) -> None:
    """Wait for the future, writing a newline to the client every ``interval`` seconds until it is done."""
    try:
        while not (await asyncio.wait([future], timeout=interval))[0]:
            await response.write(b"\n")
    except BaseException:
        future.cancel()
        raise


def _write_chunk(request: web.Request, *parts: bytes) -> None:
    """``parts`` as one HTTP/1.1 chunk, framed here rather than by ``response.write``: on Python < 3.12.9 aiohttp
    joins the chunk header and the data into a new bytes first (a copy of the whole block), and asyncio copies
    what the socket does not take at once twice (a bytes slice, then its buffer; once with a memoryview). Framing
    it here cut the server's CPU per block by ~40% (4 MiB blocks from memory, loopback). The same bytes on the
    wire. The response headers are out already (they left with the preamble)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    size = sum(len(part) for part in parts)
    if size:  # an empty chunk would end the body
        transport.write(f"{size:x}\r\n".encode("ascii"))
        for part in parts:
            transport.write(memoryview(part))
        transport.write(b"\r\n")


def chunk_table(data: bytes | memoryview, chunk_bytes: int) -> bytes:
    """One xxh3-64 (little-endian) per ``chunk_bytes`` of ``data``: what a v2 answer sends before the block."""
    view = memoryview(data)
    return b"".join(CHUNK_SUM.pack(checksum(view[i:i + chunk_bytes])) for i in range(0, len(view), chunk_bytes))


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# --- client ---


class PeerClient:
    """Fetches whole blocks from peers, believing only signed, checksummed answers of the right length.

    aiohttp's client, as every HTTP surface of Shoal (a well-kept library rather than an HTTP/1.1 of our own). One
    session per mount process, its connector keeping connections to each peer alive between requests (as many per
    peer as requests may be in flight, so a request never waits for the pool: the connect timeout stays a bound on
    one connect). The block is taken as aiohttp's parser hands it over, piece by piece (``readchunk``: its pieces
    as they are, never joined), each 64 KiB chunk checked against the table the moment its last byte is in, and the
    pieces joined once into the ``bytes`` the reader gets: no zero-filled buffer, no copy after the checks. While
    an answer is read, its socket reads take up to ``RECV_BYTES`` (``_large_reads``), so the pieces are few.
    """

    def __init__(self, key: bytes, namespace: str, name: str, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, max_requests: int = MAX_CLIENT_REQUESTS,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 total_timeout: float = TOTAL_TIMEOUT, cooldown: float = PEER_COOLDOWN_SECONDS,
                 max_cooldown: float = MAX_PEER_COOLDOWN_SECONDS, read_bufsize: int = READ_BUFSIZE) -> None:
        self.key = key
        self.namespace = namespace
        self.name = name
        self.clock = clock
        self.monotonic = monotonic
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.timeout = aiohttp.ClientTimeout(total=total_timeout, connect=connect_timeout,
                                             sock_connect=connect_timeout, sock_read=read_timeout)
        self.max_requests = max_requests
        self.read_bufsize = read_bufsize
        self._slots = asyncio.Semaphore(max_requests)
        self._down: dict[str, tuple[float, str]] = {}
        self._strikes: dict[str, int] = {}  # failed skips in a row per peer
        # Per peer: its clock minus ours (seconds), learnt from a 401's HEADER_TIME; requests are signed for its time.
        self._offsets: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_requests, limit_per_host=self.max_requests,
                                             keepalive_timeout=IDLE_SECONDS)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False,
                                                  read_bufsize=self.read_bufsize)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def down(self, url: str) -> str | None:
        """Why ``url`` is being skipped for the moment, or None."""
        until, reason = self._down.get(url, (0.0, ""))
        return reason if self.monotonic() < until else None

    async def get_block(self, url: str, block: BlockId, length: int, block_size: int) -> bytes:
        """Block ``block`` (``length`` bytes, cut in ``block_size`` blocks) from the peer at ``url``."""
        skipped = self.down(url)
        if skipped is not None:
            raise PeerError(f"peer {url} skipped for a moment: {skipped}")
        try:
            async with self._slots:
                data = await self._get(url, block, length, block_size)
        except PeerError as err:
            if err.cooldown:
                self._mark_down(url, str(err))
            raise
        except (aiohttp.ClientError, HttpProcessingError, OSError, asyncio.IncompleteReadError, TimeoutError,
                ValueError) as err:
            reason = f"peer {url}: {type(err).__name__}: {err}".rstrip(": ")
            self._mark_down(url, reason)
            raise PeerError(reason) from None
        self._strikes.pop(url, None)
        return data

    def _mark_down(self, url: str, reason: str) -> None:
        """Skip ``url`` for a while: 1 s, doubling while it keeps failing (a hung peer is not waited on every
        second), at most ``max_cooldown``; concurrent failures during one skip count once."""
        now = self.monotonic()
        until, _ = self._down.get(url, (0.0, ""))
        if now < until:
            return
        self._forget_quiet_peers(now)
        strikes = self._strikes[url] = self._strikes.get(url, 0) + 1
        self._down[url] = (now + min(self.cooldown * 2 ** (strikes - 1), self.max_cooldown), reason)

    def _forget_quiet_peers(self, now: float) -> None:
        """Drop what is kept of the peers whose last skip ended more than ``max_cooldown`` ago: not asked since (a
        peer asked and failing again is marked again), so most likely a node gone for good; a mount process lives
        as long as its dataset, and a cluster whose nodes come and go would grow these for ever. One asked again
        starts from its first skip, and from no clock offset (a 401 teaches it again)."""
        for url in [url for url, (until, _) in self._down.items() if now - until > self.max_cooldown]:
            del self._down[url]
            self._strikes.pop(url, None)
            self._offsets.pop(url, None)

    async def _get(self, url: str, block: BlockId, length: int, block_size: int) -> bytes:
        """Asks once, and once more when the peer's clock, told with a 401, is not the one the request was signed
        for (a clock off by more than the expiry window on either side)."""
        path = block_path(self.namespace, self.name)
        query = block_query(block, block_size)
        # urlencode encodes at least what aiohttp does (it keeps '/' in a query): the request line is no longer.
        target = len(path) + 1 + len(urlencode(query))
        if target > MAX_TARGET_BYTES:  # no peer takes it: this block only goes to the next source
            raise PeerError(f"peer {url}: a request for this object would be {target} bytes long, over the "
                            f"{MAX_TARGET_BYTES} peers take (its key is that long)", cooldown=False)
        for attempt in range(2):
            offset = self._offsets.get(url, 0.0)
            expires = int(self.clock() + offset) + REQUEST_TTL_SECONDS
            signature = sign_request(self.key, "GET", path, query, expires)
            # traceparent (inside a trace) lets the owner's span join the reader's trace; not signed, it only labels.
            headers = inject_context({HEADER_EXPIRES: str(expires), HEADER_SIGNATURE: signature})
            # Never redirected: a peer is asked for a block, not where to go (a 3xx is a refusal like any other).
            async with self._client().get(url.rstrip("/") + path, params=query, headers=headers,
                                          allow_redirects=False) as response:
                try:
                    if response.status != 200:
                        body = await response.content.read(MAX_REASON_BYTES)
                        if response.status == 401 and attempt == 0 and self._learn_clock(url, response.headers):
                            continue
                        raise _refused(url, response.status, body)
                    with _large_reads(response):
                        return await _block(self.key, url, response.content, signature, length)
                except BaseException:
                    response.close()  # part of an answer unread: the connection never goes back to the pool
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _learn_clock(self, url: str, headers: Mapping[str, str]) -> bool:
        """Keep the offset of ``url``'s clock from a 401's HEADER_TIME; whether it moved by a second or more (only
        then can a request signed again fare better)."""
        try:
            offset = int(headers.get(HEADER_TIME, "")) - self.clock()
        except (ValueError, OverflowError):  # not a number; a number past any float (anyone can answer a 401)
            return False
        if abs(offset - self._offsets.get(url, 0.0)) < 1.0:
            return False
        self._offsets[url] = offset
        log.info("signing peer requests for the peer's clock", peer=url, offset_seconds=round(offset))
        return True


@contextlib.contextmanager
def _large_reads(response: aiohttp.ClientResponse) -> Iterator[None]:
    """While the answer is read, its connection's socket reads take up to ``RECV_BYTES``, then asyncio's default
    again (the connection goes back to the pool). ``max_size`` is an attribute of asyncio's selector transport, not
    an API: a transport without it (uvloop's, another Python's) is left as it is, and the client works the same."""
    transport = response.connection.transport if response.connection is not None else None
    default = getattr(transport, "max_size", None)
    if transport is None or not isinstance(default, int) or default >= RECV_BYTES:
        yield
        return
    transport.max_size = RECV_BYTES  # type: ignore[attr-defined]
    try:
        yield
    finally:
        transport.max_size = default  # type: ignore[attr-defined]


async def _block(key: bytes, url: str, content: aiohttp.StreamReader, signature: str, length: int) -> bytes:
    """The block of a v2 answer (the status was 200): keep-alives, preamble, table, block, then the end."""
    while True:
        line = await content.readline(max_line_length=MAX_REASON_BYTES)
        if not line:
            raise PeerError(f"peer {url}: answer ended before the block")
        if line != b"\n":
            break
    if not line.endswith(b"\n"):
        raise PeerError(f"peer {url}: malformed answer")
    words = line.decode("ascii", "replace").split()
    if words[:1] == ["ERR"]:
        raise PeerError(f"peer {url} could not get the block: {' '.join(words[1:])[:200]}", cooldown=False)
    if len(words) != 5 or words[0] != "OK":
        raise PeerError(f"peer {url}: malformed answer")
    told_length, chunk_bytes, told_digest, proof = int(words[1]), int(words[2]), int(words[3], 16), words[4]
    if not _same_signature(sign_response(key, signature, told_digest, told_length, chunk_bytes), proof):
        raise PeerError(f"peer {url}: bad response signature")
    # Before reading: a lying length or chunk size must not make us read or hold more than the block.
    if told_length != length:
        raise PeerError(f"peer {url}: answered {told_length} bytes, the block has {length}")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise PeerError(f"peer {url}: chunks of {chunk_bytes} bytes")
    table_bytes = -(-length // chunk_bytes) * CHUNK_SUM.size
    try:
        table = await content.readexactly(table_bytes)
    except asyncio.IncompleteReadError as err:
        raise PeerError(f"peer {url}: answer cut short ({len(err.partial)} of {table_bytes} bytes)") from None
    if checksum(table) != told_digest:
        raise PeerError(f"peer {url}: chunk table checksum mismatch")
    data = await _receive(url, content, length, chunk_bytes, [digest for (digest,) in CHUNK_SUM.iter_unpack(table)])
    if await content.read(1):
        raise PeerError(f"peer {url}: bytes after the block")
    return data


async def _receive(url: str, content: aiohttp.StreamReader, length: int, chunk_bytes: int,
                   digests: list[int]) -> bytes:
    """``length`` bytes of the body, each chunk checked against ``digests`` as soon as it is complete (a peer
    sending a wrong chunk is refused there, not after the whole block), joined once at the end.

    ``readchunk`` rather than ``readany`` or ``read(n)``: it hands over one piece of aiohttp's buffer at a time as
    it is, where those join what is buffered (a copy more). Chunks straddle pieces, so each is checksummed
    incrementally (``checksum_stream``: the same digest as ``checksum`` of the whole chunk)."""
    pieces: list[bytes] = []
    got = 0
    chunk_end = min(chunk_bytes, length)  # where the chunk being received ends
    stream = checksum_stream()
    while got < length:
        piece, end_of_http_chunk = await content.readchunk()
        if not piece:
            if end_of_http_chunk:  # the end of an HTTP chunk that was read to its end already: no bytes
                continue
            raise PeerError(f"peer {url}: answer cut short ({got} of {length} bytes)")
        if got + len(piece) > length:
            raise PeerError(f"peer {url}: bytes after the block")
        view = memoryview(piece)
        at = 0
        while at < len(view):
            take = min(len(view) - at, chunk_end - got)
            stream.update(view[at:at + take])
            at += take
            got += take
            if got == chunk_end:
                chunk = (chunk_end - 1) // chunk_bytes
                if stream.intdigest() != digests[chunk]:
                    raise PeerError(f"peer {url}: block checksum mismatch (chunk at {chunk * chunk_bytes})")
                stream.reset()
                chunk_end = min(chunk_end + chunk_bytes, length)
        view.release()
        pieces.append(piece)
    return b"".join(pieces)


def _refused(url: str, status: int, body: bytes) -> PeerError:
    try:
        reason = str(json.loads(body).get("reason", ""))
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, or nested past the stack
        reason = ""
    return PeerError(f"peer {url} refused ({status}): {reason or 'no reason given'}",
                     cooldown=status not in ONE_REQUEST_REFUSALS)
