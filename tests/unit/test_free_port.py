"""free_port never hands out a port twice in one process, even when the kernel offers a just-closed one again."""

from __future__ import annotations

import socket

import pytest

from libs import embedded
from libs.embedded import LOOPBACK, free_port


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
