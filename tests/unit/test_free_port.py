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
