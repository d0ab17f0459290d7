"""The peer protocol and the reader's routing, without FUSE or NATS.

Pure parts: request signatures (expiry, tampering, another runtime's key), the runtime key, the secret file, the
ring from ``status.workers`` and the route of a block per owner rank. Then a real ``PeerServer`` and
``PeerClient`` on loopback (and a tampering proxy between them): only a signed, checksummed block of the right
length is believed. Then ``BlockReader`` with a recording peer source over a local store: which source each node
reads, what it caches, and that the peer server's fetches never go to a peer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest

from libs.blocks import BlockId, checksum
from libs.embedded import LOOPBACK
from libs.events.dataset import ManifestEntry
from libs.events.runtime import CacheWorker
from libs.ring import owners
from libs.ufs import LocalLocation, LocalObjectStore
from services.agent.cache import BlockCache, DiskTier
from services.agent.peer import (
    CHUNK_BYTES,
    CONNECT_TIMEOUT,
    HEADER_EXPIRES,
    HEADER_SIGNATURE,
    KEEPALIVE_SECONDS,
    MAX_EXPIRY_AHEAD_SECONDS,
    MAX_SERVING,
    READ_TIMEOUT,
    PeerClient,
    PeerConfigError,
    PeerError,
    PeerServer,
    block_path,
    block_query,
    chunk_table,
    load_secret,
    runtime_key,
    sign_request,
    sign_response,
    verify_request,
)
from services.agent.readahead import MemoryBudget
from services.agent.reader import LOCAL, BlockReader, BlockRouter, Route, StoreGate, plan_route, ring_of
from tests.faults import CountingStore, TamperingPeerProxy
from tests.helpers import eventually

KEY = runtime_key(b"cluster secret", "default", "demo")
NOW = 1_800_000_000.0
PATH = block_path("default", "demo")
QUERY = {"mount": "0", "key": "a b/ü.bin", "etag": "e1", "index": "3", "blockSize": "1024"}


# --- signatures ---


def signed(query: dict[str, str] = QUERY, expires: int = int(NOW) + 30, key: bytes = KEY) -> tuple[str, str]:
    return str(expires), sign_request(key, "GET", PATH, query, expires)


def test_a_signed_request_is_accepted_whatever_the_order_of_its_parameters() -> None:
    expires, signature = signed()
    shuffled = dict(reversed(list(QUERY.items())))
    assert verify_request(KEY, "GET", PATH, shuffled, expires, signature, NOW) is None
    assert verify_request(KEY, "get", PATH, QUERY, expires, signature.upper(), NOW) is None


@pytest.mark.parametrize(("change", "status"), [
    ("no signature", 401), ("no expiry", 401), ("expired", 401), ("too far ahead", 401), ("not a number", 401),
    ("other query", 403), ("other path", 403), ("other method", 403), ("other runtime", 403), ("other secret", 403),
])
def test_a_request_not_signed_right_is_refused_with_a_reason(change: str, status: int) -> None:
    expires, signature = signed()
    query, path, method, now = dict(QUERY), PATH, "GET", NOW
    if change == "no signature":
        signature = ""
    elif change == "no expiry":
        expires = ""
    elif change == "expired":
        now = NOW + 31
    elif change == "too far ahead":
        expires, signature = signed(expires=int(NOW) + MAX_EXPIRY_AHEAD_SECONDS + 5)
    elif change == "not a number":
        expires = "soon"
    elif change == "other query":
        query["index"] = "4"
    elif change == "other path":
        path = block_path("default", "other")
    elif change == "other method":
        method = "POST"
    elif change == "other runtime":
        expires, signature = signed(key=runtime_key(b"cluster secret", "default", "other"))
    elif change == "other secret":
        expires, signature = signed(key=runtime_key(b"another secret", "default", "demo"))
    refused = verify_request(KEY, method, path, query, expires, signature, now)
    assert refused is not None and refused[0] == status and refused[1]


def test_runtime_keys_differ_per_runtime_and_secret() -> None:
    keys = {runtime_key(secret, ns, name) for secret in (b"s1", b"s2") for ns, name in (("a", "b"), ("a", "c"))}
    assert len(keys) == 4
    assert runtime_key(b"s1", "a", "b") == runtime_key(b"s1", "a", "b")


def test_the_secret_file_is_read_and_a_bad_one_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_text("  s3cr3t-value\n")
    assert load_secret(str(good)) == b"s3cr3t-value"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PeerConfigError, match="empty"):
        load_secret(str(empty))
    with pytest.raises(PeerConfigError, match="cannot read") as missing:
        load_secret(str(tmp_path / "missing"))
    assert "s3cr3t" not in str(missing.value)


# --- routing (pure) ---


def test_the_ring_is_the_ready_workers_with_a_peer_endpoint() -> None:
    workers = [CacheWorker(node="a", peer_url="http://a"), CacheWorker(node="b", ready=False, peer_url="http://b"),
               CacheWorker(node="c"), CacheWorker(node="d", peer_url="http://d")]
    assert ring_of(workers) == {"a": "http://a", "d": "http://d"}


def test_each_owner_rank_gets_its_route() -> None:
    ring = {node: f"http://{node}" for node in ("a", "b", "c", "d")}
    for index in range(50):
        name = BlockId(0, "k", "e", index).name
        first, second, *others = owners(name, ring)
        assert plan_route(name, ring, first) == LOCAL
        assert plan_route(name, ring, second) == Route(peers=(ring[first],), cache=True)
        for other in [*others, "not-a-worker"]:
            assert plan_route(name, ring, other) == Route(peers=(ring[first], ring[second]), cache=False)
    assert plan_route("x", {}, "a") == LOCAL
    assert plan_route("x", {"a": "http://a"}, "b") == Route(peers=("http://a",), cache=False)


def test_without_a_peer_client_the_router_keeps_no_ring() -> None:
    router = BlockRouter("me", None)
    assert not router.update([CacheWorker(node="a", peer_url="http://a")])
    assert router.route(BlockId(0, "k", "e", 0)) == LOCAL


# --- server and client on loopback ---


@dataclass
class Served:
    blocks: dict[tuple[str, int], bytes]
    entries: dict[tuple[int, str], ManifestEntry]
    calls: list[tuple[str, int]] = field(default_factory=list)
    delay: float = 0.0
    fail: bool = False

    def lookup(self, mount: int, key: str) -> ManifestEntry | None:
        return self.entries.get((mount, key))

    async def source(self, entry: ManifestEntry, index: int) -> bytes:
        self.calls.append((entry.key, index))
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow store behind the peer, not a synchronisation
        if self.fail:
            raise OSError("store unreachable")
        return self.blocks[(entry.key, index)]


BLOCK = 1024


@pytest.fixture
async def peer() -> AsyncIterator[tuple[PeerServer, Served, str]]:
    body = os.urandom(3 * BLOCK + 100)
    entry = ManifestEntry(path="/a b/ü.bin", mount=0, key="a b/ü.bin", size=len(body), etag="e1", mtime=0.0)
    served = Served({(entry.key, i): body[i * BLOCK:(i + 1) * BLOCK] for i in range(4)}, {(0, entry.key): entry})
    # Keep-alives well inside the short read timeouts some tests give their clients.
    server = PeerServer(KEY, "default", "demo", BLOCK, served.lookup, served.source, keepalive=0.1)
    await server.start(LOOPBACK, 0)
    try:
        yield server, served, f"http://{LOOPBACK}:{server.port}"
    finally:
        await server.stop()


def block(index: int, etag: str = "e1", key: str = "a b/ü.bin") -> BlockId:
    return BlockId(0, key, etag, index)


async def client_call(call: Callable[[PeerClient], Awaitable[bytes]], **options: float) -> bytes:
    client = PeerClient(KEY, "default", "demo", **options)  # type: ignore[arg-type]
    try:
        return await call(client)
    finally:
        await client.close()


async def test_a_block_comes_back_whole_and_is_counted(peer: tuple[PeerServer, Served, str]) -> None:
    server, served, url = peer
    data = await client_call(lambda c: c.get_block(url, block(3), 100, BLOCK))
    assert data == served.blocks[("a b/ü.bin", 3)]
    assert server.served_bytes == 100


async def test_connections_beyond_the_cap_get_a_503_and_the_reader_moves_on(
        peer: tuple[PeerServer, Served, str]) -> None:
    # Nothing bounded the connections a peer server kept open: anyone reaching the port could use up the mount
    # process's descriptors (its cache files need them too) with idle ones. 512 at once now; one more is answered
    # 503 with the reason and closed, and a reader takes that as any refusal: a PeerError, on to its next source.
    server, served, url = peer
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(512):
            _, writer = await asyncio.open_connection(LOOPBACK, server.port)
            idle.append(writer)
        await eventually(lambda: _async(server.connections == 512), what="512 connections open")
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        idle.append(writer)
        refused = await asyncio.wait_for(reader.read(), 10)  # all of it: the server closes the connection
        assert refused.startswith(b"HTTP/1.1 503 ") and b"too many connections open (512)" in refused
        with pytest.raises(PeerError, match="too many connections open"):
            await client_call(lambda c: c.get_block(url, block(1), BLOCK, BLOCK))
        assert served.calls == []
        for writer in idle[:2]:
            writer.close()
        await eventually(lambda: _async(server.connections <= 510), what="two connections closed")
        assert await client_call(lambda c: c.get_block(url, block(1), BLOCK, BLOCK)) == served.blocks[("a b/ü.bin", 1)]
    finally:
        for writer in idle:
            writer.close()


async def _async(value: object) -> object:
    return value


async def test_a_slow_store_behind_the_peer_is_waited_for(peer: tuple[PeerServer, Served, str]) -> None:
    _, served, url = peer
    served.delay = 1.0  # longer than the read timeout: keep-alives hold the connection
    data = await client_call(lambda c: c.get_block(url, block(1), BLOCK, BLOCK), read_timeout=0.4)
    assert data == served.blocks[("a b/ü.bin", 1)]


async def test_a_store_failure_behind_the_peer_is_a_peer_error_without_cooldown(
        peer: tuple[PeerServer, Served, str]) -> None:
    _, served, url = peer
    served.fail = True
    client = PeerClient(KEY, "default", "demo")
    try:
        with pytest.raises(PeerError, match="store unreachable"):
            await client.get_block(url, block(0), BLOCK, BLOCK)
        assert client.down(url) is None
    finally:
        await client.close()


@pytest.mark.parametrize(("ask", "match"), [
    (lambda c, url: c.get_block(url, block(0, etag="e2"), BLOCK, BLOCK), "409.*ETag"),
    (lambda c, url: c.get_block(url, block(0, key="nope"), BLOCK, BLOCK), "404.*manifest"),
    (lambda c, url: c.get_block(url, block(0), BLOCK, 2 * BLOCK), "409.*blocks of"),
    (lambda c, url: c.get_block(url, block(9), BLOCK, BLOCK), "400.*past the end"),
    (lambda c, url: c.get_block(url, block(0), BLOCK - 1, BLOCK), "answered 1024 bytes, the block has 1023"),
])
async def test_wrong_questions_get_reasons(peer: tuple[PeerServer, Served, str], ask: Callable[..., Awaitable[bytes]],
                                           match: str) -> None:
    _, _, url = peer
    with pytest.raises(PeerError, match=match):
        await client_call(lambda c: ask(c, url))


async def test_a_block_of_an_object_with_a_long_key_comes_from_the_peer() -> None:
    # A local file's key may be 4096 bytes long (PATH_MAX). Percent-encoded, a key of ~2,700 non-ASCII bytes made a
    # request line longer than aiohttp's default limit (8190): the owner answered 400, the reader skipped it for
    # every block, and the server logged a traceback per request.
    long_key = "/".join(["目" * 80] * 12)  # 2,891 bytes, each name under 255 of them
    body = os.urandom(BLOCK)
    entry = ManifestEntry(path="/" + long_key, mount=0, key=long_key, size=BLOCK, etag="e1", mtime=0.0)
    served = Served({(long_key, 0): body}, {(0, long_key): entry})
    server = PeerServer(KEY, "default", "demo", BLOCK, served.lookup, served.source)
    await server.start(LOOPBACK, 0)
    url = f"http://{LOOPBACK}:{server.port}"
    client = PeerClient(KEY, "default", "demo")
    try:
        assert await client.get_block(url, block(0, key=long_key), BLOCK, BLOCK) == body
        assert client.down(url) is None and server.refused == 0
        # A request no peer would take is not sent, and costs this block only its peer read, not the peer.
        with pytest.raises(PeerError, match="over the 32768 peers take"):
            await client.get_block(url, block(0, key="目" * 4000), BLOCK, BLOCK)
        assert client.down(url) is None and server.refused == 0 and served.calls == [(long_key, 0)]
    finally:
        await client.close()
        await server.stop()


async def test_a_client_with_another_key_is_refused_and_the_peer_skipped_a_moment(
        peer: tuple[PeerServer, Served, str]) -> None:
    server, served, url = peer
    client = PeerClient(runtime_key(b"wrong", "default", "demo"), "default", "demo")
    try:
        with pytest.raises(PeerError, match=r"403.*bad signature"):
            await client.get_block(url, block(0), BLOCK, BLOCK)
        assert client.down(url)
        with pytest.raises(PeerError, match="skipped"):
            await client.get_block(url, block(0), BLOCK, BLOCK)
    finally:
        await client.close()
    assert served.calls == [] and server.served_bytes == 0 and server.refused == 1


@pytest.mark.parametrize("headers", [
    {}, {HEADER_EXPIRES: "9999999999"}, {HEADER_SIGNATURE: "00" * 32},
    {HEADER_EXPIRES: "1", HEADER_SIGNATURE: sign_request(KEY, "GET", PATH, block_query(block(0), BLOCK), 1)},
])
async def test_unsigned_bad_or_expired_requests_get_no_bytes(peer: tuple[PeerServer, Served, str],
                                                            headers: dict[str, str]) -> None:
    _, served, url = peer
    async with aiohttp.ClientSession() as session, session.get(
            url + PATH, params=block_query(block(0), BLOCK), headers=headers) as response:
        assert response.status in (401, 403)
        assert (await response.json())["reason"]
    assert served.calls == []


async def test_a_signature_that_is_not_ascii_is_refused_not_a_server_error(
        peer: tuple[PeerServer, Served, str]) -> None:
    # Anyone can send any bytes in a header; the comparison must refuse them like any wrong signature (403), not
    # fail on them (a 500 and a traceback per request).
    server, served, url = peer
    expires = int(time.time()) + 30
    async with aiohttp.ClientSession() as session:
        for signature in ("é" * 64, "\u0660" * 64):
            async with session.get(url + PATH, params=block_query(block(0), BLOCK),
                                   headers={HEADER_EXPIRES: str(expires), HEADER_SIGNATURE: signature}) as response:
                assert response.status == 403
                assert (await response.json())["reason"] == "bad signature"
    assert served.calls == [] and server.refused == 2


@pytest.mark.parametrize("mode", ["flip", "resign", "short", "length"])
async def test_a_lying_peer_is_not_believed(peer: tuple[PeerServer, Served, str], mode: str) -> None:
    _, _, url = peer
    proxy = TamperingPeerProxy(url, mode)
    await proxy.start()
    try:
        with pytest.raises(PeerError):
            await client_call(lambda c: c.get_block(proxy.url, block(0), BLOCK, BLOCK))
        assert proxy.answers == 1
    finally:
        await proxy.stop()


async def test_the_tampering_proxy_passes_good_answers_through(peer: tuple[PeerServer, Served, str]) -> None:
    _, served, url = peer
    proxy = TamperingPeerProxy(url, "none")
    await proxy.start()
    try:
        assert await client_call(lambda c: c.get_block(proxy.url, block(2), BLOCK, BLOCK)) == \
            served.blocks[("a b/ü.bin", 2)]
    finally:
        await proxy.stop()


async def test_a_dead_peer_fails_fast_and_is_skipped_a_moment(refused_port: int) -> None:
    url = f"http://{LOOPBACK}:{refused_port}"  # nothing listens there
    client = PeerClient(KEY, "default", "demo")
    try:
        with pytest.raises(PeerError, match=url):
            await client.get_block(url, block(0), BLOCK, BLOCK)
        with pytest.raises(PeerError, match="skipped for a moment"):
            await client.get_block(url, block(1), BLOCK, BLOCK)
    finally:
        await client.close()


async def test_blocks_go_out_as_well_formed_chunks_on_a_kept_alive_connection(
        peer: tuple[PeerServer, Served, str]) -> None:
    # The server frames the block's HTTP chunk itself (_write_chunk): read it with a strict parser of our own, two
    # answers on one connection, so a framing slip shows up as a bad size line or a broken second answer.
    server, served, _ = peer
    reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
    try:
        for index in (0, 3):  # a whole block, then the short last one
            query = block_query(block(index), BLOCK)
            expires = int(time.time()) + 30
            writer.write(f"GET {PATH}?{urlencode(query)} HTTP/1.1\r\nHost: peer\r\n{HEADER_EXPIRES}: {expires}\r\n"
                         f"{HEADER_SIGNATURE}: {sign_request(KEY, 'GET', PATH, query, expires)}\r\n\r\n".encode())
            assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
            headers = []
            while (line := await reader.readline()) != b"\r\n":
                headers.append(line.decode().lower().strip())
            assert "transfer-encoding: chunked" in headers
            body = b""
            while size := int(await reader.readline(), 16):
                body += await reader.readexactly(size)
                assert await reader.readexactly(2) == b"\r\n"
            assert await reader.readexactly(2) == b"\r\n"  # no trailers after the last chunk
            preamble, _, table_and_data = body.lstrip(b"\n").partition(b"\n")
            expected = served.blocks[("a b/ü.bin", index)]
            table = chunk_table(expected, CHUNK_BYTES)
            assert preamble.split()[:4] == [b"OK", str(len(expected)).encode(), str(CHUNK_BYTES).encode(),
                                            f"{checksum(table):016x}".encode()]
            assert table_and_data == table + expected
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_peer_silent_longer_than_a_second_is_waited_for_not_skipped(
        peer: tuple[PeerServer, Served, str]) -> None:
    _, served, url = peer
    proxy = TamperingPeerProxy(url, "none")
    proxy.stall = 1.5  # a busy peer's event loop starved for 1.5 s: not a byte, not even the status line
    await proxy.start()
    client = PeerClient(KEY, "default", "demo")  # the timeouts the mounts use
    try:
        assert await client.get_block(proxy.url, block(2), BLOCK, BLOCK) == served.blocks[("a b/ü.bin", 2)]
        assert client.down(proxy.url) is None
    finally:
        await client.close()
        await proxy.stop()


async def test_a_hung_peer_costs_the_read_timeout_then_is_skipped_a_moment(
        peer: tuple[PeerServer, Served, str]) -> None:
    _, _, url = peer
    proxy = TamperingPeerProxy(url, "none")
    proxy.stall = 60.0  # alive to TCP, deaf to requests (its mount process stopped, say)
    await proxy.start()
    client = PeerClient(KEY, "default", "demo", read_timeout=0.3)
    try:
        with pytest.raises(PeerError, match="Timeout"):
            await client.get_block(proxy.url, block(0), BLOCK, BLOCK)
        assert client.down(proxy.url)
        with pytest.raises(PeerError, match="skipped for a moment"):
            await client.get_block(proxy.url, block(1), BLOCK, BLOCK)
    finally:
        await client.close()
        await proxy.stop()


def test_timeouts_wait_out_a_syn_retransmission_and_several_missed_keepalives() -> None:
    # Linux resends an unanswered SYN after 1 s (a stalled peer's full accept queue drops it): a connect timeout
    # shorter than that fails live peers. A read timeout of a few keep-alive intervals fails busy ones.
    assert CONNECT_TIMEOUT > 1.0
    assert READ_TIMEOUT >= 4 * KEEPALIVE_SECONDS


def test_the_response_signature_binds_request_checksum_length_and_chunk_size() -> None:
    base = sign_response(KEY, "sig", 42, 10, 4096)
    assert len({base, sign_response(KEY, "sig2", 42, 10, 4096), sign_response(KEY, "sig", 43, 10, 4096),
                sign_response(KEY, "sig", 42, 11, 4096), sign_response(KEY, "sig", 42, 10, 8192),
                sign_response(b"k", "sig", 42, 10, 4096)}) == 6


# --- the reader's routing ---


class RecordingPeers:
    """A peer source over the same source bytes; records asks, can fail, can hold answers until released."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asks: list[tuple[str, int]] = []
        self.failing: set[str] = set()
        self.gate: asyncio.Event | None = None

    async def get_block(self, url: str, block: BlockId, length: int, block_size: int) -> bytes:
        self.asks.append((url, block.index))
        if self.gate is not None:
            await self.gate.wait()
        if url in self.failing:
            raise PeerError(f"peer {url}: connection refused")
        return self.body[block.index * block_size:][:length]


@dataclass
class Node:
    reader: BlockReader
    store: CountingStore
    cache: BlockCache
    peers: RecordingPeers
    entry: ManifestEntry
    body: bytes
    ring: dict[str, str]


RBLOCK = 64 * 1024


async def node(tmp_path: Path, me: str = "me", ring_nodes: tuple[str, ...] = ("a", "b", "c"),
               body: bytes | None = None) -> Node:
    source = tmp_path / "source"
    source.mkdir(parents=True)
    body = body if body is not None else os.urandom(8 * RBLOCK)
    (source / "data.bin").write_bytes(body)
    os.utime(source / "data.bin", (1e9, 1e9))  # one ETag for the same bytes on every "node" of a test
    local = LocalObjectStore(LocalLocation(root=source))
    info = await local.head("data.bin")
    store = CountingStore(local)
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * RBLOCK)])
    cache.load()
    peers = RecordingPeers(body)
    router = BlockRouter(me, peers)
    router.update([CacheWorker(node=n, peer_url=f"http://{n}") for n in ring_nodes])
    reader = BlockReader(cache, [StoreGate(store)], RBLOCK, MemoryBudget(64 * RBLOCK), write_block=cache.put_async,
                         router=router)
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag, mtime=info.mtime)
    return Node(reader, store, cache, peers, entry, body, router.ring)


async def _true(value: object) -> bool:
    return bool(value)


def rank_of(n: Node, index: int) -> list[str]:
    return owners(BlockId(0, "data.bin", n.entry.etag, index).name, n.ring)


async def read_block(n: Node, index: int) -> bytes:
    handle = n.reader.open(n.entry)
    try:
        return bytes(await n.reader.read(handle, index * RBLOCK, RBLOCK))
    finally:
        n.reader.close(handle)


async def test_a_non_owner_reads_from_the_first_owner_and_caches_nothing(tmp_path: Path) -> None:
    n = await node(tmp_path)
    for index in (5, 2):
        assert await read_block(n, index) == n.body[index * RBLOCK:][:RBLOCK]
    await n.reader.drain()
    assert n.peers.asks == [(f"http://{rank_of(n, 5)[0]}", 5), (f"http://{rank_of(n, 2)[0]}", 2)]
    assert n.store.gets == [] and n.cache.blocks() == []
    assert n.reader.stats.remote_bytes == 2 * RBLOCK and n.reader.stats.miss_bytes == 0


async def test_a_non_owner_tries_the_second_owner_then_the_store(tmp_path: Path) -> None:
    n = await node(tmp_path)
    first, second, _ = rank_of(n, 4)
    n.peers.failing = {f"http://{first}"}
    assert await read_block(n, 4) == n.body[4 * RBLOCK:][:RBLOCK]
    assert n.peers.asks == [(f"http://{first}", 4), (f"http://{second}", 4)] and n.store.gets == []
    n.peers.failing = {f"http://{first}", f"http://{second}"}
    n.peers.asks.clear()
    assert await read_block(n, 4) == n.body[4 * RBLOCK:][:RBLOCK]
    await n.reader.drain()
    assert len(n.peers.asks) == 2 and len(n.store.gets) == 1
    assert n.cache.blocks() == [], "a non-owner keeps no copy even of what it read from the store"
    assert n.reader.stats.peer_failures == 3


async def test_owners_cache_and_only_the_second_asks_the_first(tmp_path: Path) -> None:
    probe = await node(tmp_path / "probe")
    first, second, _ = rank_of(probe, 3)
    as_first = await node(tmp_path / "first", me=first, body=probe.body)
    assert await read_block(as_first, 3) == as_first.body[3 * RBLOCK:][:RBLOCK]
    as_second = await node(tmp_path / "second", me=second, body=probe.body)
    assert await read_block(as_second, 3) == as_second.body[3 * RBLOCK:][:RBLOCK]
    for owner in (as_first, as_second):
        await owner.reader.drain()
        assert [b.index for b, _ in owner.cache.blocks()] == [3]
    assert as_first.peers.asks == [] and len(as_first.store.gets) == 1
    assert as_second.peers.asks == [(f"http://{first}", 3)] and as_second.store.gets == []


async def test_concurrent_misses_of_a_non_owner_make_one_peer_request(tmp_path: Path) -> None:
    n = await node(tmp_path)
    n.peers.gate = asyncio.Event()
    reads = [asyncio.ensure_future(read_block(n, 6)) for _ in range(5)]
    await eventually(lambda: _true(n.peers.asks), what="a peer asked")
    n.peers.gate.set()
    assert {await r for r in reads} == {n.body[6 * RBLOCK:][:RBLOCK]}
    assert len(n.peers.asks) == 1


async def test_a_small_random_read_on_a_non_owner_fetches_the_whole_block_from_the_owner(tmp_path: Path) -> None:
    n = await node(tmp_path)
    handle = n.reader.open(n.entry)
    offset = 5 * RBLOCK + 100
    assert bytes(await n.reader.read(handle, offset, 512)) == n.body[offset:offset + 512]
    n.reader.close(handle)
    assert n.peers.asks == [(f"http://{rank_of(n, 5)[0]}", 5)] and n.store.gets == []


async def test_the_peer_server_path_reads_the_store_once_and_never_a_peer(tmp_path: Path) -> None:
    n = await node(tmp_path)  # not an owner of anything: its own reads would go to peers
    n.store.hold()
    served = [asyncio.ensure_future(n.reader.serve_block(n.entry, 1)) for _ in range(3)]
    await eventually(lambda: _true(n.store.waiting), what="a store GET waiting")
    n.store.release()
    assert {await s for s in served} == {n.body[RBLOCK:2 * RBLOCK]}
    await n.reader.drain()
    assert n.peers.asks == [] and len(n.store.gets) == 1
    assert [b.index for b, _ in n.cache.blocks()] == [1], "a block fetched for a peer is cached"
    assert await n.reader.serve_block(n.entry, 1) == n.body[RBLOCK:2 * RBLOCK] and len(n.store.gets) == 1


async def test_a_client_hanging_up_does_not_cancel_a_shared_store_fetch(tmp_path: Path) -> None:
    n = await node(tmp_path)
    n.store.hold()
    first = asyncio.ensure_future(n.reader.serve_block(n.entry, 2))
    second = asyncio.ensure_future(n.reader.serve_block(n.entry, 2))
    await eventually(lambda: _true(n.store.waiting), what="a store GET waiting")
    first.cancel()
    n.store.release()
    assert await second == n.body[2 * RBLOCK:3 * RBLOCK]
    assert len(n.store.gets) == 1
    await n.reader.drain()


async def test_a_block_fetched_for_a_peer_is_found_while_its_cache_write_is_pending(tmp_path: Path) -> None:
    n = await node(tmp_path)
    written = asyncio.Event()
    write = n.reader.write_block

    async def held_write(block: BlockId, data: bytes) -> object:
        await written.wait()
        return await write(block, data)

    n.reader.write_block = held_write
    for _ in range(2):
        assert await n.reader.serve_block(n.entry, 1) == n.body[RBLOCK:2 * RBLOCK]
    assert await read_block(n, 1) == n.body[RBLOCK:2 * RBLOCK]
    assert len(n.store.gets) == 1 and n.cache.blocks() == []
    written.set()
    await n.reader.drain()
    assert [b.index for b, _ in n.cache.blocks()] == [1]


async def test_a_peer_that_keeps_failing_is_skipped_longer_until_it_answers(
        peer: tuple[PeerServer, Served, str]) -> None:
    _, served, url = peer
    proxy = TamperingPeerProxy(url, "resign")
    await proxy.start()
    clock = [0.0]
    client = PeerClient(KEY, "default", "demo", monotonic=lambda: clock[0])
    try:
        for skip in (1.0, 2.0, 4.0, 8.0, 8.0):
            with pytest.raises(PeerError, match="bad response signature"):
                await client.get_block(proxy.url, block(0), BLOCK, BLOCK)
            start = clock[0]
            clock[0] = start + skip - 0.01
            assert client.down(proxy.url)
            clock[0] = start + skip
            assert client.down(proxy.url) is None
        proxy.mode = "none"
        assert await client.get_block(proxy.url, block(0), BLOCK, BLOCK) == served.blocks[("a b/ü.bin", 0)]
        proxy.mode = "flip"
        with pytest.raises(PeerError, match="checksum"):
            await client.get_block(proxy.url, block(0), BLOCK, BLOCK)
        clock[0] += 1.0
        assert client.down(proxy.url) is None, "an answer in between starts the skips over at 1 s"
    finally:
        await client.close()
        await proxy.stop()


async def test_a_client_hanging_up_while_the_peer_fetches_frees_its_slot(peer: tuple[PeerServer, Served, str]) -> None:
    server, served, url = peer
    served.delay = 0.6  # keep-alives go out while the "store" answers
    expires = int(time.time()) + 30
    query = block_query(block(1), BLOCK)
    headers = {HEADER_EXPIRES: str(expires), HEADER_SIGNATURE: sign_request(KEY, "GET", PATH, query, expires)}
    async with aiohttp.ClientSession() as session:
        response = await session.get(url + PATH, params=query, headers=headers)
        assert response.status == 200
        response.close()  # hang up before the block

    async def idle() -> bool:
        return server._waiting == 0 and server._slots._value == MAX_SERVING and bool(served.calls)

    await eventually(idle, what="the slot given back")
    assert server.served_bytes == 0
    assert await client_call(lambda c: c.get_block(url, block(1), BLOCK, BLOCK)) == served.blocks[("a b/ü.bin", 1)]


@pytest.mark.parametrize("from_file", [False, True], ids=["from memory", "from its file"])
async def test_a_reader_that_stops_reading_loses_its_connection_and_gives_its_slot_back(
        tmp_path: Path, from_file: bool) -> None:
    # Sending an answer had no bound: a reader that stopped taking it (its process frozen, its host gone) held its
    # serving slot and the block for as long as its connection lived, and with every slot so held the server
    # answered nobody else. Past send_timeout the connection is dropped and the slot given back.
    size = 16 * 1024 * 1024  # far more than the socket buffers take from a reader that reads nothing
    body = os.urandom(2 * size)
    entry = ManifestEntry(path="/k", mount=0, key="k", size=len(body), etag="e", mtime=0.0)
    cache = BlockCache([DiskTier(tmp_path / "cache", 4 * size)])
    cache.load()
    if from_file:
        for index in range(2):
            assert await cache.put_async(BlockId(0, "k", "e", index), body[index * size:(index + 1) * size])

    async def source(_: ManifestEntry, index: int) -> bytes:
        return body[index * size:(index + 1) * size]

    server = PeerServer(KEY, "default", "demo", size, lambda mount, key: entry if key == "k" else None, source,
                        max_serving=1, send_timeout=1.0,
                        open_file=(lambda _, index: cache.open_block(BlockId(0, "k", "e", index))) if from_file
                        else None)
    await server.start(LOOPBACK, 0)
    stalled = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((LOOPBACK, server.port))
        expires = int(time.time()) + 30
        query = block_query(BlockId(0, "k", "e", 0), size)
        stalled.sendall(f"GET {PATH}?{urlencode(query)} HTTP/1.1\r\nHost: peer\r\n{HEADER_EXPIRES}: {expires}\r\n"
                        f"{HEADER_SIGNATURE}: {sign_request(KEY, 'GET', PATH, query, expires)}\r\n\r\n".encode())
        await eventually(lambda: _async(server._slots._value == 0), what="the stalled reader's answer under way")
        # The reader's whole-request bound is well past send_timeout: before, it waited for the slot until then.
        data = await client_call(lambda c: c.get_block(f"http://{LOOPBACK}:{server.port}", BlockId(0, "k", "e", 1),
                                                       size, size), total_timeout=30.0)
        assert data == body[size:]
        await eventually(lambda: _async(server.connections == 0), what="the stalled reader's connection dropped")
    finally:
        stalled.close()
        await server.stop()


async def test_a_block_file_copied_over_another_is_not_sent_but_the_block_fetched_for_the_reader(
        tmp_path: Path) -> None:
    # The sendfile path checked the file's header and chunk table only: a block file copied over another block's
    # (self-consistent, so every chunk passes the reader's check) went out as that block. Its id now says it is
    # another block's: the file is dropped and the block comes from the server's store path.
    body = os.urandom(2 * BLOCK)
    entry = ManifestEntry(path="/k", mount=0, key="k", size=len(body), etag="e", mtime=0.0)
    tier = DiskTier(tmp_path / "cache", 8 * BLOCK)
    cache = BlockCache([tier])
    cache.load()
    for index in range(2):
        assert await cache.put_async(BlockId(0, "k", "e", index), body[index * BLOCK:(index + 1) * BLOCK])
    Path(tier.path_of(BlockId(0, "k", "e", 1).name)).write_bytes(
        Path(tier.path_of(BlockId(0, "k", "e", 0).name)).read_bytes())
    fetched: list[int] = []

    async def source(_: ManifestEntry, index: int) -> bytes:
        fetched.append(index)
        return body[index * BLOCK:(index + 1) * BLOCK]

    server = PeerServer(KEY, "default", "demo", BLOCK, lambda mount, key: entry if key == "k" else None, source,
                        open_file=lambda _, index: cache.open_block(BlockId(0, "k", "e", index)))
    await server.start(LOOPBACK, 0)
    try:
        url = f"http://{LOOPBACK}:{server.port}"
        got = await client_call(lambda c: c.get_block(url, BlockId(0, "k", "e", 1), BLOCK, BLOCK))
        assert got == body[BLOCK:]
        assert fetched == [1]
        assert not cache.contains(BlockId(0, "k", "e", 1)) and tier.corrupt_blocks == 1
        assert await client_call(lambda c: c.get_block(url, BlockId(0, "k", "e", 0), BLOCK, BLOCK)) == body[:BLOCK]
        assert fetched == [1], "block 0's own file is still sent"
    finally:
        await server.stop()


@pytest.mark.parametrize("skew", [3 * 3600.0, 121.0, -121.0, -24 * 3600.0],
                         ids=["peer 3 h ahead", "peer 2 min ahead", "peer 2 min behind", "peer a day behind"])
async def test_a_peer_whose_clock_is_off_is_read_from_after_one_refusal(skew: float) -> None:
    # Requests were signed for the reader's clock only: with the two nodes' clocks more than the expiry window
    # apart (30 s behind, 90 s ahead), every request was refused 401 and every block came from the store. A 401
    # now tells the server's time; the reader signs for it, asks again once and keeps the offset for that peer.
    body = os.urandom(BLOCK)
    entry = ManifestEntry(path="/k", mount=0, key="k", size=BLOCK, etag="e", mtime=0.0)

    async def source(_: ManifestEntry, index: int) -> bytes:
        return body

    server = PeerServer(KEY, "default", "demo", BLOCK, lambda mount, key: entry if key == "k" else None, source,
                        clock=lambda: time.time() + skew)
    await server.start(LOOPBACK, 0)
    url = f"http://{LOOPBACK}:{server.port}"
    client = PeerClient(KEY, "default", "demo")
    try:
        for _ in range(3):
            assert await client.get_block(url, BlockId(0, "k", "e", 0), BLOCK, BLOCK) == body
        assert server.refused == 1 and client.down(url) is None
        # Another runtime's key is still refused, after learning the clock too.
        stranger = PeerClient(runtime_key(b"cluster secret", "default", "other"), "default", "demo")
        try:
            with pytest.raises(PeerError, match="refused \\(403\\): bad signature"):
                await stranger.get_block(url, BlockId(0, "k", "e", 0), BLOCK, BLOCK)
        finally:
            await stranger.close()
    finally:
        await client.close()
        await server.stop()


async def test_a_signed_head_request_is_a_405_without_the_block(peer: tuple[PeerServer, Served, str]) -> None:
    # aiohttp routes HEAD to a GET handler: a HEAD signed as such was answered with the block after its headers
    # (written past aiohttp's writer), which no HEAD answer may carry, and cost the server a store fetch.
    server, served, _ = peer
    expires = int(time.time()) + 30
    query = block_query(block(1), BLOCK)
    reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
    try:
        writer.write(f"HEAD {PATH}?{urlencode(query)} HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n"
                     f"{HEADER_EXPIRES}: {expires}\r\n"
                     f"{HEADER_SIGNATURE}: {sign_request(KEY, 'HEAD', PATH, query, expires)}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 405 ") and answer.endswith(b"\r\n\r\n"), answer[-200:]
    assert served.calls == [] and server.served_bytes == 0
