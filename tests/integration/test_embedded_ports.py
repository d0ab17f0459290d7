"""The embedded servers when a port they were given is taken before they bind it (real nats-server and SeaweedFS
processes): the start says so (``PortTaken``), and SeaweedFS on free ports chooses again."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from libs import embedded
from libs.embedded import LOOPBACK, NatsConfig, PortTaken, SeaweedConfig, free_port, start_nats


def taken_port() -> socket.socket:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    return holder


def test_a_nats_server_whose_port_is_taken_fails_with_port_taken(tmp_path: Path) -> None:
    with taken_port() as holder:
        config = NatsConfig(port=holder.getsockname()[1], monitor_port=free_port(), store_dir=tmp_path / "js")
        with pytest.raises(PortTaken, match="address already in use"):
            start_nats(config, tmp_path / "nats.log")


def test_seaweedfs_on_free_ports_chooses_again_when_a_port_was_taken(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[SeaweedConfig] = []
    holders: list[socket.socket] = []
    on_free_ports = SeaweedConfig.on_free_ports

    def choose(data_dir: Path) -> SeaweedConfig:
        config = on_free_ports(data_dir)  # ports SeaweedFS can take (their gRPC twins too)
        if not chosen:  # the first choice loses its volume port to another process before SeaweedFS binds it
            holder = socket.socket()
            holder.bind((LOOPBACK, config.volume_port))
            holder.listen()
            holders.append(holder)
        chosen.append(config)
        return config

    monkeypatch.setattr(SeaweedConfig, "on_free_ports", staticmethod(choose))
    try:
        config, server = embedded.start_seaweedfs_on_free_ports(tmp_path / "data", tmp_path / "seaweedfs.log")
        try:
            assert len(chosen) == 2 and config == chosen[1]
            assert embedded.port_open(config.s3_port)
        finally:
            server.stop()
    finally:
        for holder in holders:
            holder.close()
