"""The peer client (``PeerClient``: aiohttp's client, the block taken piece by piece and checked chunk by chunk).

Good answers come from an aiohttp server scripted by the test (``AiohttpPeer``: the pieces of a v2 answer written
as they are, each one HTTP chunk, or the whole with a Content-Length), signed with the runtime key like a real
peer's: keep-alives, the preamble and the block cut at odd places, the block read whole every time. Lying or
malformed answers come from a bare asyncio server (``ScriptedPeer``: any bytes the test writes, so a peer that does
not speak aiohttp's HTTP, or none at all): every one of them is a ``PeerError``, never bytes, and a wrong first
chunk is refused before the rest of the block arrives. Then connection reuse: kept alive between requests, and a
kept-alive connection the peer closed meanwhile is replaced without failing the read. Last, the real
``PeerServer``: a block in a disk tier goes out from its file (``sendfile``, not read by the owner), a file corrupt
on the owner is refused by the reader, and a garbled one is dropped and the block sent from its source.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from libs.blocks import BlockId, checksum
from libs.embedded import LOOPBACK
from libs.events.dataset import ManifestEntry
from libs.events.runtime import CacheWorker
from libs.ufs import LocalLocation, LocalObjectStore
from services.agent.cache import BlockCache, DiskTier
from services.agent.peer import (
    RECV_BYTES,
    PeerClient,
    PeerError,
    PeerServer,
    _large_reads,
    chunk_table,
    runtime_key,
    sign_response,
)
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, BlockRouter, StoreGate

KEY = runtime_key(b"cluster secret", "default", "demo")
LENGTH = 300_000  # several 64 KiB chunks, the last one short; several socket reads
BODY = os.urandom(LENGTH)
BLOCK = BlockId(0, "k", "e", 0)

Script = Callable[[str], bytes]  # the request's signature -> the whole HTTP answer


CHUNK = 64 * 1024


def preamble(signature: str, data: bytes = BODY, chunk: int = CHUNK, proof: str | None = None,
             table: bytes | None = None) -> bytes:
    """The v2 preamble and the chunk table: what comes before the block's bytes."""
    table = chunk_table(data, chunk) if table is None else table
    proof = sign_response(KEY, signature, checksum(table), len(data), chunk) if proof is None else proof
    return f"OK {len(data)} {chunk} {checksum(table):016x} {proof}\n".encode() + table


def spoiled_table(signature: str) -> bytes:
    table = bytearray(chunk_table(BODY, CHUNK))
    table[3] ^= 1
    told = checksum(chunk_table(BODY, CHUNK))  # the digest and signature of the right table
    proof = sign_response(KEY, signature, told, LENGTH, CHUNK)
    return chunked(f"OK {LENGTH} {CHUNK} {told:016x} {proof}\n".encode() + bytes(table), BODY)


def chunked(*pieces: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.shoal.peer-block.v2\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def with_length(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class ScriptedPeer:
    """A bare asyncio server answering each request with the bytes ``script(signature)`` gives, HTTP or not;
    closes after each answer if ``close_after``."""

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                signature = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                                 if line.lower().startswith(b"shoal-peer-signature:"))
                writer.write(self.script(signature))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Make = Callable[..., Awaitable[tuple[ScriptedPeer, str]]]
MakeAiohttp = Callable[..., Awaitable[tuple["AiohttpPeer", str]]]


@pytest.fixture
async def scripted() -> AsyncIterator[Make]:
    peers: list[ScriptedPeer] = []

    async def make(script: Script, close_after: bool = False) -> tuple[ScriptedPeer, str]:
        peer = ScriptedPeer(script, close_after)
        peers.append(peer)
        return peer, await peer.start()

    try:
        yield make
    finally:
        for peer in peers:
            await peer.stop()


async def fetch(url: str, times: int = 1) -> list[bytes]:
    client = PeerClient(KEY, "default", "demo", read_timeout=2.0)
    try:
        return [await client.get_block(url, BLOCK, LENGTH, LENGTH) for _ in range(times)]
    finally:
        await client.close()


class LoopbackServer:
    """An aiohttp server on loopback answering every GET with ``_handle``."""

    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, 0).start()
        return f"http://{LOOPBACK}:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class AiohttpPeer(LoopbackServer):
    """An aiohttp server answering each request with ``script(signature)``: each piece one HTTP chunk (written as it
    is by ``StreamResponse.write``), or all of them as one body with a Content-Length if ``content_length``."""

    def __init__(self, script: Pieces, content_length: bool = False) -> None:
        self.script = script
        self.content_length = content_length
        self.requests = 0
        self.clients: set[object] = set()  # the client's address of every request: one per connection

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        assert request.transport is not None
        self.clients.add(request.transport.get_extra_info("peername"))
        pieces = self.script(request.headers["Shoal-Peer-Signature"])
        if self.content_length:
            return web.Response(body=b"".join(pieces), content_type="application/vnd.shoal.peer-block.v2")
        response = web.StreamResponse()
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response


Pieces = Callable[[str], list[bytes]]  # the request's signature -> the pieces of the body


@pytest.fixture
async def aiohttp_peer() -> AsyncIterator[Callable[..., Awaitable[tuple[AiohttpPeer, str]]]]:
    peers: list[AiohttpPeer] = []

    async def make(script: Pieces, content_length: bool = False) -> tuple[AiohttpPeer, str]:
        peer = AiohttpPeer(script, content_length)
        peers.append(peer)
        return peer, await peer.start()

    try:
        yield make
    finally:
        for peer in peers:
            await peer.stop()


GOOD: dict[str, Pieces] = {
    "one chunk each": lambda s: [b"\n", b"\n", preamble(s), BODY],
    "odd chunk boundaries": lambda s: [b"\n" + preamble(s)[:5], preamble(s)[5:] + BODY[:7], BODY[7:100_001],
                                       BODY[100_001:]],
    "chunk boundaries inside the table": lambda s: [preamble(s)[:-20], preamble(s)[-20:-3], preamble(s)[-3:] + BODY],
    "a chunk per 1000 bytes": lambda s: [preamble(s)] + [BODY[i:i + 1000] for i in range(0, LENGTH, 1000)],
    "preamble and block in one chunk": lambda s: [preamble(s) + BODY],
    "content-length": lambda s: [b"\n", preamble(s), BODY],
}


@pytest.mark.parametrize("framing", GOOD)
async def test_a_block_is_read_whole_however_the_answer_is_cut(aiohttp_peer: MakeAiohttp, framing: str) -> None:
    _, url = await aiohttp_peer(GOOD[framing], content_length=framing == "content-length")
    blocks = await fetch(url, times=2)
    assert blocks == [BODY, BODY]
    assert all(type(b) is bytes for b in blocks) and blocks[0] is not blocks[1], "immutable, one object per block"


async def test_a_block_is_read_from_a_peer_that_answers_until_it_closes(scripted: Make) -> None:
    # HTTP/1.0, no length: the body ends when the connection does (aiohttp's server never does this; a peer may).
    _, url = await scripted(lambda s: b"HTTP/1.0 200 OK\r\n\r\n" + preamble(s) + BODY, close_after=True)
    assert await fetch(url, times=2) == [BODY, BODY]


def flipped(s: str) -> bytes:
    spoiled = bytearray(BODY)
    spoiled[1234] ^= 1
    return chunked(preamble(s), bytes(spoiled))


BAD: dict[str, tuple[Script, str]] = {
    "flipped byte": (flipped, "checksum"),
    "bytes after the block (length)": (lambda s: with_length(preamble(s) + BODY + b"x"), "bytes after the block"),
    "bytes after the block (chunk)": (lambda s: chunked(preamble(s), BODY, b"x"), "bytes after the block"),
    "short block, then the end": (lambda s: chunked(preamble(s), BODY[:-1]), "cut short"),
    "bad chunk size": (lambda s: chunked(preamble(s))[:-5] + b"zz\r\n" + BODY, "chunk size"),
    "chunk longer than sent": (lambda s: chunked(preamble(s))[:-5] + b"%x\r\n" % (LENGTH + 10) + BODY,
                               "ClientPayloadError|cut short"),
    "length longer than sent": (lambda s: with_length(preamble(s) + BODY)[:-1000], "ClientPayloadError|cut short"),
    "table cut short": (lambda s: with_length(preamble(s)[:-5]), "cut short"),
    "bad signature": (lambda s: chunked(preamble(s, proof="0" * 64), BODY), "bad response signature"),
    "signature not ASCII": (lambda s: chunked(f"OK {LENGTH} {CHUNK} {0:016x} {'é' * 64}\n".encode()),
                            "bad response signature"),
    "spoiled chunk table": (spoiled_table, "chunk table checksum"),
    "tiny chunks": (lambda s: chunked(preamble(s, chunk=16), BODY), "chunks of 16 bytes"),
    "signed for another request": (lambda s: chunked(preamble("0" * 64), BODY), "bad response signature"),
    "other length": (lambda s: chunked(preamble(s, BODY + b"x"), BODY + b"x"), "answered"),
    "not HTTP": (lambda s: b"SSH-2.0-OpenSSH\r\n\r\n", "ClientResponseError"),
    "headers never end": (lambda s: b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 50_000, "ClientResponseError"),
    "preamble line never ends": (lambda s: chunked(b"OK " + b"1" * 100_000), "LineTooLong|malformed"),
    "store failed behind the peer": (lambda s: chunked(b"\n", b"ERR the store said 503\n"),
                                     "could not get the block: the store said 503"),
    "refused": (lambda s: with_length(b'{"reason": "bad signature"}', "403 Forbidden"), "403.*bad signature"),
    "refused, the reason nested too deep": (lambda s: with_length(b"[" * 4000, "503 Busy"), "503.*no reason given"),
    # A 401's clock is learnt from the header: a number past any float raised OverflowError, no PeerError.
    "refused, its clock past any float": (lambda s: with_length(b"{}", "401 Unauthorized\r\nShoal-Peer-Time: "
                                                                + "9" * 400), "401"),
}


@pytest.mark.parametrize("case", BAD)
async def test_a_malformed_or_lying_answer_is_a_peer_error_never_bytes(scripted: Make, case: str) -> None:
    script, match = BAD[case]
    _, url = await scripted(script, close_after=True)
    with pytest.raises(PeerError, match=match):
        await fetch(url)


async def test_a_peer_answering_a_clock_past_any_float_sends_the_read_to_the_store(scripted: Make,
                                                                                    tmp_path: Path) -> None:
    # A 401's Shoal-Peer-Time is taken as the peer's clock: a 400-digit one made the client's arithmetic raise
    # OverflowError, which is no PeerError, so the read failed (EIO at the mount) instead of going on to the store.
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "data.bin").write_bytes(BODY)
    store = LocalObjectStore(LocalLocation(root=tmp_path / "source"))
    info = await store.head("data.bin")
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag, mtime=0.0)
    _, url = await scripted(lambda s: with_length(b"{}", "401 Unauthorized\r\nShoal-Peer-Time: " + "9" * 400))
    client = PeerClient(KEY, "default", "demo", read_timeout=2.0)
    router = BlockRouter("me", client)
    router.update([CacheWorker(node="owner", peer_url=url)])  # the only owner: every block is asked of it first
    cache = BlockCache([DiskTier(tmp_path / "cache", 16 * LENGTH)])
    cache.load()
    reader = BlockReader(cache, [StoreGate(store)], LENGTH, MemoryBudget(4 * LENGTH), write_block=cache.put_async,
                         router=router)
    handle = reader.open(entry)
    try:
        assert bytes(await reader.read(handle, 0, LENGTH)) == BODY
    finally:
        reader.close(handle)
        await reader.drain()
        await client.close()
    assert reader.stats.peer_failures == 1 and reader.stats.miss_bytes == LENGTH
    assert client.down(url) is not None, "a peer that refuses every request is skipped a moment"


async def test_a_redirect_is_a_refusal_never_followed(scripted: Make, aiohttp_peer: MakeAiohttp) -> None:
    # aiohttp follows redirects by default: a peer (or whatever took its port) answering 302 sent the reader, with
    # its signed request, to any host and path it named, up to ten hops. A peer is asked for a block, not for where
    # to go: a redirect is a refusal like any other status, and the place it names is never asked.
    elsewhere, target = await aiohttp_peer(GOOD["one chunk each"])
    _, url = await scripted(lambda s: f"HTTP/1.1 302 Found\r\nLocation: {target}/\r\nContent-Length: 0\r\n\r\n"
                            .encode(), close_after=True)
    with pytest.raises(PeerError, match="refused \\(302\\)"):
        await fetch(url)
    assert elsewhere.requests == 0


class StatusPeer(LoopbackServer):
    """An aiohttp server answering every request with ``status`` (a 302 names another place to go), counting them."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        headers = {"Location": "http://example.invalid/"} if 300 <= self.status < 400 else None
        return web.json_response({"reason": "scripted"}, status=self.status, headers=headers)


# Every status a peer may answer instead of a block, and whether the peer is then skipped for a moment.
REFUSALS = {301: True, 302: True, 307: True, 308: True, 400: True, 401: True, 403: True, 405: True, 500: True,
            404: False, 409: False, 429: False, 503: False}


@pytest.mark.parametrize("status", REFUSALS)
async def test_a_peer_refusing_every_request_is_skipped_a_moment_one_refusing_this_one_is_not(status: int) -> None:
    # A 3xx was a refusal but not a reason to skip the peer (only 401 and 403 were): a peer that redirected every
    # request cost every block read a round trip to it before the next source. Now whatever says the peer refuses
    # every request skips it for a moment; another manifest (404, 409) or a busy peer (503, 429) fail one request.
    peer = StatusPeer(status)
    url = await peer.start()
    client = PeerClient(KEY, "default", "demo", read_timeout=2.0, cooldown=60.0)
    try:
        with pytest.raises(PeerError, match=f"refused \\({status}\\)"):
            await client.get_block(url, BLOCK, LENGTH, LENGTH)
        assert (client.down(url) is not None) is REFUSALS[status]
        with pytest.raises(PeerError, match="skipped for a moment" if REFUSALS[status] else f"refused \\({status}\\)"):
            await client.get_block(url, BLOCK, LENGTH, LENGTH)
        assert peer.requests == (1 if REFUSALS[status] else 2)
    finally:
        await client.close()
        await peer.stop()


async def test_peers_gone_for_good_are_forgotten_and_a_failing_one_is_not() -> None:
    """Nodes come and go for months: each peer that failed was kept (its skip, its strikes) for the mount process's
    life. Peers not asked for longer than the longest skip are forgotten when another one fails; one that keeps
    failing keeps its doubling skip."""
    now = [0.0]
    peer = StatusPeer(500)
    url = await peer.start()
    client = PeerClient(KEY, "default", "demo", read_timeout=2.0, cooldown=1.0, max_cooldown=8.0,
                        monotonic=lambda: now[0])
    gone = [f"{url}/gone-{index}" for index in range(40)]  # forty peers to the client, each refusing
    try:
        for dead in gone:
            with pytest.raises(PeerError):
                await client.get_block(dead, BLOCK, LENGTH, LENGTH)
        for skip in (1.0, 2.0, 4.0, 8.0, 8.0):  # the live peer keeps failing, asked again as each skip ends
            with pytest.raises(PeerError, match="refused"):
                await client.get_block(url, BLOCK, LENGTH, LENGTH)
            assert client.down(url) is not None
            now[0] += skip + 0.5
        # The peers gone were last skipped until 1 s, more than the longest skip before the last failure (17 s).
        assert all(client.down(dead) is None for dead in gone)
        assert set(client._down) == set(client._strikes) == {url}, f"{len(client._down)} peers kept"
        assert client._strikes[url] == 5
    finally:
        await client.close()
        await peer.stop()


async def test_a_connection_is_kept_alive_between_requests(aiohttp_peer: MakeAiohttp) -> None:
    peer, url = await aiohttp_peer(GOOD["one chunk each"])
    assert await fetch(url, times=3) == [BODY] * 3
    assert (len(peer.clients), peer.requests) == (1, 3)


async def test_a_wrong_chunk_is_refused_before_the_rest_of_the_block_arrives(scripted: Make) -> None:
    # The peer sends a spoiled first chunk, then nothing more while keeping the connection open: the reader must
    # refuse at that chunk rather than wait (it would give up after its read timeout with another reason).
    def spoiled_first_chunk(s: str) -> bytes:
        first = bytearray(BODY[:CHUNK])
        first[10] ^= 1
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(preamble(s)) + LENGTH)
        return head + preamble(s) + bytes(first)

    _, url = await scripted(spoiled_first_chunk)
    with pytest.raises(PeerError, match=r"block checksum mismatch \(chunk at 0\)"):
        await fetch(url)


async def test_a_kept_alive_connection_the_peer_closed_is_replaced(scripted: Make) -> None:
    # The peer closes each connection after its answer without saying so (an idle timeout, a restart): the next
    # request finds it closed before any byte of an answer and is asked again on a new connection.
    peer, url = await scripted(lambda s: with_length(b"\n" + preamble(s) + BODY), close_after=True)
    client = PeerClient(KEY, "default", "demo", read_timeout=2.0)
    try:
        for _ in range(3):
            assert await client.get_block(url, BLOCK, LENGTH, LENGTH) == BODY
        assert client.down(url) is None
    finally:
        await client.close()
    assert peer.connections == 3 and peer.requests == 3


async def test_an_answer_is_read_in_large_socket_reads_then_the_connection_reads_as_before(
        aiohttp_peer: MakeAiohttp) -> None:
    # asyncio reads a socket 256 KiB at a time: ~16 reads, parser calls and pieces per 4 MiB block. While an answer
    # is read its connection takes up to RECV_BYTES at a time; the pooled connection is then left as it was. (If
    # aiohttp or asyncio stop exposing the transport's read size, this fails rather than the reads silently
    # getting small again.)
    _, url = await aiohttp_peer(GOOD["one chunk each"])
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the second time on the kept-alive connection
            # A body larger than asyncio's read: the first read, with the headers, cannot end the answer (which
            # would give the connection back before it is looked at here).
            async with session.get(url, headers={"Shoal-Peer-Signature": "0" * 64}) as response:
                assert response.connection is not None
                transport = response.connection.transport
                default = transport.max_size  # type: ignore[union-attr]
                assert default < RECV_BYTES
                with _large_reads(response):
                    assert transport.max_size == RECV_BYTES  # type: ignore[union-attr]
                    await response.read()
                assert transport.max_size == default  # type: ignore[union-attr]


# --- the server's side: cached blocks go out from their files ---


@pytest.fixture
async def file_peer(tmp_path: Path) -> AsyncIterator[tuple[PeerServer, BlockCache, list[int], str]]:
    """A real peer server over a disk-tier cache holding block 0 of ``BODY``; ``source`` calls are recorded."""
    entry = ManifestEntry(path="/k", mount=0, key="k", size=LENGTH, etag="e", mtime=0.0)
    cache = BlockCache([DiskTier(tmp_path / "cache", 16 * LENGTH)])
    cache.load()
    assert await cache.put_async(BLOCK, BODY)
    calls: list[int] = []

    async def source(_: ManifestEntry, index: int) -> bytes:
        calls.append(index)
        return BODY

    server = PeerServer(KEY, "default", "demo", LENGTH, lambda mount, key: entry if key == "k" else None, source,
                        open_file=lambda _, index: cache.open_block(BlockId(0, "k", "e", index)))
    await server.start(LOOPBACK, 0)
    try:
        yield server, cache, calls, f"http://{LOOPBACK}:{server.port}"
    finally:
        await server.stop()


def block_file(cache: BlockCache) -> Path:
    tier = cache.tiers[0]
    assert isinstance(tier, DiskTier)
    return Path(tier.path_of(BLOCK.name))


async def test_a_cached_block_goes_out_from_its_file(
        file_peer: tuple[PeerServer, BlockCache, list[int], str]) -> None:
    server, _, calls, url = file_peer
    assert await fetch(url, times=2) == [BODY, BODY]
    assert calls == [] and server.served_bytes == 2 * LENGTH


async def test_a_block_file_corrupt_on_the_owner_is_never_believed(
        file_peer: tuple[PeerServer, BlockCache, list[int], str]) -> None:
    # The owner sends its file without reading it: the reader checks every chunk against the table.
    _, cache, _, url = file_peer
    path = block_file(cache)
    with path.open("r+b") as file:
        file.seek(-100_000, os.SEEK_END)  # in the data, before the block id at the end
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PeerError, match="block checksum mismatch"):
        await fetch(url)


async def test_a_garbled_block_file_is_dropped_and_the_block_sent_from_its_source(
        file_peer: tuple[PeerServer, BlockCache, list[int], str]) -> None:
    _, cache, calls, url = file_peer
    path = block_file(cache)
    with path.open("r+b") as file:
        file.seek(40)  # in the chunk table, whose digest is in the header
        file.write(b"\xff\xff")
    assert await fetch(url) == [BODY]
    assert calls == [0] and not path.exists() and not cache.contains(BLOCK)
