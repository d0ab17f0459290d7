"""The embedded servers when a port they were given is taken before they bind it (real nats-server and SeaweedFS
processes): the start says so (``PortTaken``), and SeaweedFS on free ports chooses again. The test suite's
nats-servers choose their client and monitoring ports themselves, and a cluster its route ports again, so a port
another process took between ``free_port`` and the bind costs them nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from libs import embedded
from libs.embedded import (
    LOOPBACK,
    NatsConfig,
    PortTaken,
    SeaweedConfig,
    free_port,
    start_nats,
    start_nats_on_any_ports,
)
from tests.conftest import NatsServer
from tests.nats_cluster import NatsCluster


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


def test_a_nats_server_whose_monitoring_port_another_nats_server_holds_fails_with_port_taken(tmp_path: Path) -> None:
    """The other server (another worker's, which bound the port ``free_port`` chose first) answers /healthz there
    until this one has exited: the start took that for this server ready, and returned one that had exited."""
    other_config, other = start_nats_on_any_ports(NatsConfig(0, 0, tmp_path / "other"), tmp_path / "other.log")
    try:
        config = NatsConfig(port=free_port(), monitor_port=other_config.monitor_port, store_dir=tmp_path / "js")
        with pytest.raises(PortTaken, match="address already in use"):
            # Stopped if it returns: it binds the port once the other has stopped, and would outlive the test.
            start_nats(config, tmp_path / "nats.log").stop()
    finally:
        other.stop()


@pytest.fixture
def taken_free_ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """``free_port`` hands out ports other processes' servers bound right after it chose them: every one (until
    ``taken_free_ports(n)`` says only the first n)."""
    holders: list[socket.socket] = []
    left = [-1]

    def free_port_taken_meanwhile() -> int:
        if left[0] == 0:
            return free_port()
        left[0] -= 1
        holder = taken_port()
        holders.append(holder)
        return int(holder.getsockname()[1])

    for module in ("libs.embedded", "tests.conftest", "tests.nats_cluster"):
        monkeypatch.setattr(f"{module}.free_port", free_port_taken_meanwhile, raising=False)

    def only(count: int) -> None:
        left[0] = count

    try:
        yield only
    finally:
        for holder in holders:
            holder.close()


def test_the_nats_server_fixture_starts_whichever_ports_free_port_hands_out(taken_free_ports: Callable[[int], None],
                                                                             nats_server: NatsServer) -> None:
    assert embedded.port_open(nats_server.config.port) and nats_server.process is not None
    assert embedded.reported_ports(nats_server.config.store_dir.parent, nats_server.process.pid) == (
        nats_server.config.port, nats_server.config.monitor_port)


def test_a_cluster_whose_route_port_was_taken_starts_again_on_others(tmp_path: Path,
                                                                     taken_free_ports: Callable[[int], None]) -> None:
    taken_free_ports(1)  # the first member's route port
    cluster = NatsCluster.start(tmp_path)
    try:
        assert all(server is not None and server.alive() for server in cluster.servers)
        assert all(embedded.meta_leader(config.monitor_port) for config in cluster.configs)
        assert (tmp_path / "stores-2").is_dir()  # started again, on fresh stores
    finally:
        cluster.stop()


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
