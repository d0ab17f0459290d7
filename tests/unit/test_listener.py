"""Connections that carry no whole request, against each HTTP server of Shoal on loopback: the peer server, the
scheduler's webhook and extender, and the side server. One that stays idle, and one that trickles its headers a
byte at a time, are both closed ``libs.listener.IDLE_SECONDS`` after they opened (1 s here). The side server keeps
at most ``MAX_CONNECTIONS`` open at once (the peer server's and the scheduler's caps have their own tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from libs import listener
from libs.embedded import LOOPBACK
from libs.events.schedule import ScoreReply
from libs.side_server import MAX_CONNECTIONS, Readiness, SideServer
from services.agent.peer import PeerServer, runtime_key
from services.scheduler.http import SchedulerHttp
from tests.helpers import eventually

Start = Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[None]]]]]


async def peer_server() -> tuple[int, Callable[[], Awaitable[None]]]:
    async def source(*_: object) -> bytes:
        return b""

    server = PeerServer(runtime_key(b"secret", "default", "demo"), "default", "demo", 1024, lambda *_: None, source)
    await server.start(LOOPBACK, 0)
    return server.port, server.stop


async def scheduler_http() -> tuple[int, Callable[[], Awaitable[None]]]:
    http = SchedulerHttp(lambda request: ScoreReply(causation_id=request.id, error="none"), timeout=2.0)
    return await http.start(LOOPBACK, 0), http.stop


async def side_server() -> tuple[int, Callable[[], Awaitable[None]]]:
    side = SideServer(Readiness(), LOOPBACK, 0)
    return await side.start(), side.stop


SERVERS: dict[str, Start] = {"peer": peer_server, "scheduler": scheduler_http, "side": side_server}


@pytest.fixture(params=SERVERS)
async def port(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(listener, "IDLE_SECONDS", 1.0)
    port, stop = await SERVERS[request.param]()
    try:
        yield port
    finally:
        await stop()


async def trickle(writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
    """Headers that never end, a byte every 0.1 s (the client's pace, not a wait for the server) until closed."""
    head = b"GET /healthz HTTP/1.1\r\nHost: shoal\r\nX-Slow: "
    sent = 0
    while not reader.at_eof():
        writer.write(head[sent:sent + 1] if sent < len(head) else b"a")
        sent += 1
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.1)


async def test_idle_and_trickling_connections_are_closed(port: int) -> None:
    # aiohttp's AppRunner keeps a connection without a whole request for 3630 s (web.run_app's 75 s is not its
    # default): idle connections, or headers sent a byte at a time, held their places (of the 512 a peer server or
    # the 256 the scheduler's port keeps) for an hour, and the side server's descriptors without any cap.
    idle_reader, idle = await asyncio.open_connection(LOOPBACK, port)
    slow_reader, slow = await asyncio.open_connection(LOOPBACK, port)
    trickling = asyncio.create_task(trickle(slow, slow_reader))
    try:
        assert await asyncio.wait_for(idle_reader.read(), 30) == b"", "closed without an answer"
        await asyncio.wait_for(trickling, 30)
        assert slow_reader.at_eof() or slow.is_closing()
        # A whole request is still answered.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 ")
        writer.close()
    finally:
        trickling.cancel()
        idle.close()
        slow.close()


async def test_the_side_server_keeps_at_most_its_cap_of_connections() -> None:
    # The side server (every process has one; on every address in a pod) kept any number of connections open:
    # anyone reaching it could use up the process's file descriptors, which a mount process's cache files need.
    side = SideServer(Readiness(), LOOPBACK, 0)
    port = await side.start()
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            idle.append(writer)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        idle.append(writer)
        refused = await asyncio.wait_for(reader.read(), 30)  # all of it: the server closes the connection
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert f"side server: too many connections open ({MAX_CONNECTIONS})".encode() in refused
        for writer in idle[:2]:
            writer.close()
        await eventually(lambda: _async(side.listener is not None and side.listener.open <= MAX_CONNECTIONS - 2),
                         what="two connections closed")
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        idle.append(writer)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200 ")
    finally:
        for writer in idle:
            writer.close()
        await side.stop()


async def _async(value: object) -> object:
    return value
