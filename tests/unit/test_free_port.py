"""free_port never hands out a port twice in one process, even when the kernel offers a just-closed one again; the
test servers of this process (proxies, web sources) hold their port from the start (``tests.helpers.ReservedPort``),
so another worker's server cannot take it before they listen, nor while a proxy is cut."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from libs import embedded
from libs.embedded import LOOPBACK, free_port
from tests.faults import CuttableProxy, HttpProxy, TamperingPeerProxy
from tests.helpers import eventually
from tests.web_source import WebSource


def test_a_port_the_kernel_offers_again_is_not_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    first = free_port()
    offered = iter([first, first, first + 1 if first < 65535 else first - 1])

    class Replaying(socket.socket):
        def getsockname(self) -> tuple[str, int]:
            return (LOOPBACK, next(offered))

    monkeypatch.setattr(embedded.socket, "socket", Replaying)
    assert free_port() != first


def test_many_ports_are_all_different() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_port_free_port_let_go_of_can_be_taken_by_another_process_before_it_is_used() -> None:
    """Why the tests that need a port where nothing listens use ``refused_port``: another worker's server, binding
    the port ``free_port`` found free, answers there."""
    port = free_port()
    with socket.socket() as server, socket.socket() as client:
        server.bind((LOOPBACK, port))  # another process's server, a moment later
        server.listen()
        client.connect((LOOPBACK, port))  # not refused


def test_refused_port_refuses_connections_and_cannot_be_taken(refused_port: int) -> None:
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind((LOOPBACK, refused_port))
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect((LOOPBACK, refused_port))


def untakeable(port: int) -> None:
    """No other server can bind ``port`` (with address reuse or without, as Go's and asyncio's servers bind), and
    a connection there is refused."""
    for reuse in (0, 1):
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
            other.bind((LOOPBACK, port))
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect((LOOPBACK, port))


async def answers(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def test_a_cuttable_proxy_keeps_its_port_before_it_starts_and_while_it_is_cut() -> None:
    with socket.socket() as target:
        target.bind((LOOPBACK, 0))
        target.listen()
        proxy = CuttableProxy(target.getsockname()[1])
        untakeable(proxy.port)  # not listening yet: its clients are refused, by no one else's server
        await proxy.start()
        with socket.create_connection((LOOPBACK, proxy.port)) as open_across_the_cut:
            open_across_the_cut.sendall(b"x")
            await eventually(lambda: _true(len(proxy._writers) == 2), what="the connection piped to the target")
            await proxy.cut()
            with socket.socket() as other, pytest.raises(OSError, match="in use"):
                other.bind((LOOPBACK, proxy.port))
            assert proxy._reserved is not None  # held by a socket of its own, not only by that connection
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect((LOOPBACK, proxy.port))
        await proxy.restore()
        with socket.create_connection((LOOPBACK, proxy.port)):
            pass
        await proxy.cut()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("make", [HttpProxy, TamperingPeerProxy], ids=["http", "tampering-peer"])
async def test_a_loopback_proxys_port_cannot_be_taken_before_it_starts(
        make: Callable[[str], Any], refused_port: int) -> None:
    proxy = make(f"http://{LOOPBACK}:{refused_port}")
    untakeable(proxy.port)
    await proxy.start()
    try:
        with socket.create_connection((LOOPBACK, proxy.port)):  # it listens there once started
            pass
    finally:
        await proxy.stop()


async def test_a_web_sources_port_cannot_be_taken_before_it_starts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    source = WebSource(tmp_path)
    untakeable(source.port)
    async with source:
        assert await answers(source.url + "a.txt") == 200
