"""The embedded servers when a port they were given is taken before they bind it (real nats-server and SeaweedFS
processes): the start says so (``PortTaken``), and SeaweedFS on free ports chooses again."""

from __future__ import annotations

import socket
import subprocess
import sys
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


def test_a_port_taken_is_told_apart_when_the_log_says_so_far_above_its_tail(tmp_path: Path) -> None:
    # SeaweedFS's fatal line comes before a goroutine dump longer than the tail a failure shows.
    log = tmp_path / "server.log"
    script = ("import sys; print('F1207 volume.go:629] listen tcp 127.0.0.1:1: bind: address already in use'); "
              "print('goroutine 94 [running]:\\n' * 500); sys.exit(255)")
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
        with pytest.raises(PortTaken) as raised:
            embedded.wait_until(lambda: False, 30, "server", process, log)
    assert raised.value.code == 255
    assert str(raised.value).splitlines()[1].endswith("bind: address already in use")
    assert len(raised.value.tail) <= embedded.LOG_TAIL_CHARS + 200


def test_a_server_that_exits_for_another_reason_is_not_taken_for_a_port_conflict(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"],
                                   stdout=out, stderr=subprocess.STDOUT)
        with pytest.raises(embedded.ServerExited) as raised:
            embedded.wait_until(lambda: False, 30, "server", process, log)
    assert type(raised.value) is embedded.ServerExited and "bad flag" in raised.value.tail
