"""Fuzzing every HTTP surface: the peer block server (signatures, ranges, paths), the scheduler's admission webhook and
extender, and the side server (``/healthz``, ``/readyz``, ``/metrics``).

Each server runs for real on loopback and gets generated requests: method, path, query, headers and body, built
from a valid request and mutated (``tests.fuzz.strategies``), plus raw bytes that are not HTTP at all. Every answer
is below 500, and a 4xx carries a reason in its body. After the fuzz the server still answers a valid request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from libs.embedded import LOOPBACK
from libs.events.dataset import ManifestEntry
from libs.events.schedule import NodeScore, ScoreReply, ScoreRequest
from libs.side_server import Readiness, SideServer
from services.agent.peer import HEADER_EXPIRES, HEADER_SIGNATURE, PeerServer, block_path, runtime_key, sign_request
from services.scheduler.http import SchedulerHttp
from tests.fuzz.strategies import FUZZ, JSON_VALUES, MARKS, ODD_TEXT, STRINGS, examples, mutated

pytestmark = MARKS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scheduler"
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FOO"])
HEADER_NAMES = st.sampled_from(["Content-Type", "Content-Length", "Transfer-Encoding", "Accept", "X-Any",
                                "traceparent", "Connection", HEADER_EXPIRES, HEADER_SIGNATURE])
# Header values a client library lets through (no line breaks: aiohttp refuses to send those itself).
HEADER_VALUES = st.one_of(STRINGS, st.sampled_from(["", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "-1", "1e9",
                                                     "chunked", "application/json", "9" * 40]))
HEADERS = st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3).map(
    lambda headers: {name: value for name, value in headers.items()
                     if value.isprintable() and value.isascii() and name != "Content-Length"
                     and name != "Transfer-Encoding"})
RAW_REQUESTS = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b"GET / HTTP/1.1\r\n\r\n", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
        b"POST /mutate HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"POST /filter HTTP/1.1\r\nTransfer-Encoding: "
        b"chunked\r\n\r\nzz\r\n", b"GET /metrics HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    ]),
)


def _reason(status: int, body: bytes, method: str = "GET") -> None:
    """Below 500; a refusal says why (HEAD answers carry no body, by definition)."""
    assert status < 500, f"HTTP {status}: {body[:300]!r}"
    if status >= 400 and method != "HEAD":
        assert body.strip(), f"HTTP {status} without a reason"


async def _raw(port: int, data: bytes) -> bytes:
    """Send bytes that may not be HTTP; the answer (maybe none: a closed connection) within a few seconds."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(65536), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _raw_status(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


# --- peer block server ---

KEY = runtime_key(b"cluster secret", "default", "demo")
BLOCK = 1024
BODY = bytes(range(256)) * 12  # 3 blocks and a bit
ENTRY = ManifestEntry(path="/a b/ü.bin", mount=0, key="a b/ü.bin", size=len(BODY), etag="e1", mtime=0.0)
PATH = block_path("default", "demo")
VALID_QUERY = {"mount": "0", "key": ENTRY.key, "etag": "e1", "index": "1", "blockSize": str(BLOCK)}


@pytest.fixture
async def peer() -> AsyncIterator[str]:
    async def source(entry: ManifestEntry, index: int) -> bytes:
        return BODY[index * BLOCK:(index + 1) * BLOCK]

    server = PeerServer(KEY, "default", "demo", BLOCK, lambda mount, key: ENTRY if (mount, key) == (0, ENTRY.key)
                        else None, source, keepalive=0.1)
    await server.start(LOOPBACK, 0)
    try:
        yield f"http://{LOOPBACK}:{server.port}"
    finally:
        await server.stop()


QUERY_VALUES = st.one_of(st.sampled_from(["0", "1", "2", "3", "4", "-1", str(BLOCK), "1024 ", "٣", "0x1", "1e3",
                                          "9" * 5000, "e1", ENTRY.key]), STRINGS)


@st.composite
def peer_requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], dict[str, str]]:
    """A block request near a valid one: some fields changed, maybe repeated or unknown, signed or not."""
    query = dict(VALID_QUERY)
    for field in draw(st.lists(st.sampled_from(sorted(query)), max_size=3)):
        query[field] = draw(QUERY_VALUES)
    for field in draw(st.lists(st.sampled_from(sorted(query)), max_size=1)):
        del query[field]
    pairs = list(query.items())
    if draw(st.integers(0, 9)) == 0:
        pairs.append((draw(st.sampled_from([*sorted(query), "extra", ""])), draw(QUERY_VALUES)))
    path = draw(st.sampled_from([PATH, PATH, PATH, block_path("default", "other"), block_path("a b", "é"),
                                 PATH + "/..", "/shoal-peer/v0/default/demo/block", "/"]))
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "HEAD"]))
    expires = int(time.time()) + draw(st.sampled_from([30, 30, -5, 10_000, 0]))
    signature = sign_request(KEY, method, path, dict(pairs), expires)
    how = draw(st.sampled_from(["signed", "signed", "signed", "flipped", "missing", "garbage-expiry", "other-key"]))
    headers = {HEADER_EXPIRES: str(expires), HEADER_SIGNATURE: signature}
    if how == "flipped":
        headers[HEADER_SIGNATURE] = ("0" if signature[0] != "0" else "1") + signature[1:]
    elif how == "missing":
        del headers[draw(st.sampled_from(sorted(headers)))]
    elif how == "garbage-expiry":
        headers[HEADER_EXPIRES] = draw(st.sampled_from(["", "x", "1e99", "-1", "9" * 400, " 1"]))
    elif how == "other-key":
        headers[HEADER_SIGNATURE] = sign_request(b"other", method, path, dict(pairs), expires)
    headers.update(draw(HEADERS))
    return method, path, pairs, headers


@FUZZ
@given(request=peer_requests())
async def test_peer_block_requests(peer: str, session: aiohttp.ClientSession,
                                   request: tuple[str, str, list[tuple[str, str]], dict[str, str]]) -> None:
    method, path, pairs, headers = request
    async with session.request(method, peer + path, params=pairs, headers=headers) as response:
        body = await response.read()
    _reason(response.status, body, method)
    await _peer_answers(peer, session)


@examples(0.25)
@given(data=RAW_REQUESTS)
async def test_peer_raw_bytes(peer: str, session: aiohttp.ClientSession, data: bytes) -> None:
    status = _raw_status(await _raw(int(peer.rsplit(":", 1)[1]), data))
    assert status is None or status < 500
    await _peer_answers(peer, session)


async def _peer_answers(peer: str, session: aiohttp.ClientSession) -> None:
    """The server still serves a valid signed request, the block's bytes in its framing."""
    expires = int(time.time()) + 30
    headers = {HEADER_EXPIRES: str(expires), HEADER_SIGNATURE: sign_request(KEY, "GET", PATH, VALID_QUERY, expires)}
    async with session.get(peer + PATH, params=VALID_QUERY, headers=headers) as response:
        assert response.status == 200
        assert BODY[BLOCK:2 * BLOCK] in await response.read()


# --- scheduler webhook and extender ---

REVIEW = json.loads((FIXTURES / "admission-review-pod-with-dataset.json").read_text())
EXTENDER_ARGS = json.loads((FIXTURES / "extender-args-nodes.json").read_text())


def _answer(request: ScoreRequest) -> ScoreReply:
    """The scheduler's decision, stubbed: unknown datasets are an error, others score the candidates."""
    if any(use.name.startswith("x") for use in request.datasets):
        return ScoreReply(error="unknown dataset")
    return ScoreReply(scores=[NodeScore(node=c.name, score=50, cached_bytes=1) for c in request.candidates])


@pytest.fixture
async def scheduler_http() -> AsyncIterator[tuple[SchedulerHttp, str]]:
    http = SchedulerHttp(_answer, timeout=5.0)
    port = await http.start(LOOPBACK, 0)
    try:
        yield http, f"http://{LOOPBACK}:{port}"
    finally:
        await http.stop()


SCHEDULER_BODIES = st.one_of(
    mutated(st.just(REVIEW)), mutated(st.just(EXTENDER_ARGS)), st.just(REVIEW).map(json.dumps).map(str.encode),
    st.just(EXTENDER_ARGS).map(json.dumps).map(str.encode), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


@FUZZ
# Regression: a body nested past the recursion limit was an HTTP 500 (RecursionError) on each route.
@example(route="/mutate", method="POST", body=b"[" * 5000, headers={})
@example(route="/filter", method="POST", body=b"[" * 5000, headers={})
@example(route="/prioritize", method="POST", body=b"[" * 5000, headers={})
@given(route=st.sampled_from(["/mutate", "/filter", "/prioritize", "/mutate", "/filter", "/prioritize", "/healthz",
                              "/", "/mutate/x"]),
       method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]), body=SCHEDULER_BODIES, headers=HEADERS)
async def test_scheduler_webhook_and_extender(scheduler_http: tuple[SchedulerHttp, str],
                                              session: aiohttp.ClientSession, route: str, method: str, body: bytes,
                                              headers: dict[str, str]) -> None:
    _, url = scheduler_http
    async with session.request(method, url + route, data=body, headers=headers) as response:
        answer = await response.read()
    _reason(response.status, answer, method)
    await _scheduler_answers(url, session)


@examples(0.25)
@given(data=RAW_REQUESTS)
async def test_scheduler_raw_bytes(scheduler_http: tuple[SchedulerHttp, str], session: aiohttp.ClientSession,
                                   data: bytes) -> None:
    status = _raw_status(await _raw(int(scheduler_http[1].rsplit(":", 1)[1]), data))
    assert status is None or status < 500
    await _scheduler_answers(scheduler_http[1], session)


async def _scheduler_answers(url: str, session: aiohttp.ClientSession) -> None:
    """The webhook still admits a valid review."""
    async with session.post(url + "/mutate", json=REVIEW) as response:
        assert response.status == 200
        assert (await response.json())["response"]["allowed"] is True


# --- side server ---


@pytest.fixture
async def side_server() -> AsyncIterator[tuple[SideServer, str]]:
    registry = CollectorRegistry()
    Counter("shoal_fuzz_total", "Requests the fuzz test made", registry=registry).inc()
    readiness = Readiness()
    readiness.add("ok", lambda: None)
    readiness.add("broken", _broken_check)
    server = SideServer(readiness, LOOPBACK, 0, registry=registry)
    port = await server.start()
    try:
        yield server, f"http://{LOOPBACK}:{port}"
    finally:
        await server.stop()


def _broken_check() -> str | None:
    raise RuntimeError("a check that fails itself")


@FUZZ
@given(method=METHODS, path=st.one_of(st.sampled_from(["/healthz", "/readyz", "/metrics", "/", "/metrics/",
                                                       "/healthz?x=1", "/%00", "/..%2f..", "//readyz"]),
                                      ODD_TEXT.map(lambda s: "/" + s.lstrip("/"))),
       headers=HEADERS, body=st.binary(max_size=64))
async def test_side_server(side_server: tuple[SideServer, str], session: aiohttp.ClientSession, method: str,
                           path: str, headers: dict[str, str], body: bytes) -> None:
    _, url = side_server
    try:
        async with session.request(method, url + path, headers=headers, data=body or None) as response:
            answer = await response.read()
    except aiohttp.InvalidURL:
        return  # the client refuses to send it; the raw-bytes tests send such things
    # /readyz's 503 is its answer (a check fails, named in the body), not a crash.
    if response.status == 503 and path.startswith("/readyz"):
        assert method == "HEAD" or b"check failed: RuntimeError" in answer
    else:
        _reason(response.status, answer, method)
    await _side_server_answers(url, session)


@examples(0.25)
@given(data=RAW_REQUESTS)
async def test_side_server_raw_bytes(side_server: tuple[SideServer, str], session: aiohttp.ClientSession,
                                     data: bytes) -> None:
    status = _raw_status(await _raw(int(side_server[1].rsplit(":", 1)[1]), data))
    assert status is None or status < 500 or status == 503
    await _side_server_answers(side_server[1], session)


async def _side_server_answers(url: str, session: aiohttp.ClientSession) -> None:
    """/metrics still serves the registry."""
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert b"shoal_fuzz_total 1.0" in await response.read()
