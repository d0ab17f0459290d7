"""Three nats-servers on loopback as one JetStream cluster, for fault tests (the ``nats_cluster`` fixture).

The servers are ``libs.embedded``'s, configured exactly as ``shoal up --nats-cluster 3`` configures them; each is
started and stopped by the PID we started, and one can be killed with SIGKILL and started again (same name, ports
and store), as a crashed server restarted by its supervisor would be.
"""

from __future__ import annotations

import http.client
import secrets
from collections.abc import Callable
from pathlib import Path

from libs.bus import Bus
from libs.config import NatsSettings
from libs.embedded import (
    LOOPBACK,
    NatsConfig,
    PortTaken,
    ServerProcess,
    free_port,
    meta_leader,
    nats_cluster,
    start_nats,
    start_nats_cluster_on_any_ports,
    wait_until,
)

SIZE = 3


class NatsCluster:
    def __init__(self, configs: list[NatsConfig], servers: list[ServerProcess], logs: Path) -> None:
        self.configs = configs
        self.servers: list[ServerProcess | None] = list(servers)
        self.logs = logs
        self.starts = [1] * len(configs)

    @classmethod
    def start(cls, root: Path, size: int = SIZE) -> NatsCluster:
        # A name of its own: route ports are chosen before the servers bind them, and a member reaching another
        # test's cluster of the same name would join it.
        name = f"test-{secrets.token_hex(4)}"
        configs, servers = start_on_free_route_ports(
            lambda routes, stores: nats_cluster(size, [0] * size, [0] * size, routes, stores, name), size, root)
        return cls(configs, servers, root)

    @property
    def urls(self) -> list[str]:
        return [config.url for config in self.configs]

    def settings(self) -> NatsSettings:
        """What a client of the cluster uses: every URL, and 3 replicas for what it provisions."""
        return NatsSettings(urls=self.urls, replicas=len(self.configs))

    def index(self, server_name: str) -> int:
        names = [config.cluster.server_name if config.cluster else "" for config in self.configs]
        return names.index(server_name)

    async def stream_leader(self, bus: Bus, stream: str) -> int:
        """The index of the server leading ``stream``'s RAFT group."""
        info = await bus.js.stream_info(stream)
        assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader: {info.cluster}"
        return self.index(info.cluster.leader)

    def kill(self, index: int) -> None:
        """SIGKILL: no lame-duck, no flush; the store is left as the crash left it."""
        server = self.servers[index]
        assert server is not None, f"server {index} is not running"
        server.kill()
        server.stop()  # closes its log file
        self.servers[index] = None

    def restart(self, index: int) -> None:
        assert self.servers[index] is None, "kill or stop the server first"
        self.starts[index] += 1
        config = self.configs[index]
        self.servers[index] = start_nats(config, self.logs / f"nats-{index + 1}-{self.starts[index]}.log")

    def wait_rejoined(self, index: int, timeout: float = 30.0) -> None:
        """Until the server sees a meta leader and its JetStream is current (its healthz answers 200: every stream
        and consumer it holds a replica of has caught up)."""
        port = self.configs[index].monitor_port
        server = self.servers[index]
        wait_until(lambda: meta_leader(port) is not None and _healthy(port), timeout, f"nats-{index + 1} rejoining",
                   server.process if server else None)

    def stop(self) -> None:
        for index, server in enumerate(self.servers):
            if server is not None:
                server.stop()
                self.servers[index] = None


def start_on_free_route_ports(make: Callable[[list[int], Path], list[NatsConfig]], size: int, root: Path,
                              attempts: int = 3) -> tuple[list[NatsConfig], list[ServerProcess]]:
    """The cluster ``make(route ports, store root)`` configures, on ``size`` route ports chosen now, and client and
    monitoring ports its servers choose themselves (``make``'s are 0); logs in ``root``. Every member names the
    others' route ports, so those are chosen before any starts: when another process bound one first (its server
    exits with "address already in use"), the whole cluster starts again on other route ports, with fresh stores
    (``attempts`` in all). Returns the configs naming the ports the servers got."""
    for attempt in range(1, attempts + 1):
        stores = root / ("stores" if attempt == 1 else f"stores-{attempt}")
        try:
            return start_nats_cluster_on_any_ports(make([free_port() for _ in range(size)], stores), root)
        except PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("attempts must be at least 1")


def _healthy(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        finally:
            connection.close()
    except OSError:
        return False
