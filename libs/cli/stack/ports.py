"""Which loopback ports ``shoal up`` needs (embedded servers, the services' side servers), and their checks.

Pure: ``ports_needed`` and the problems of the options as given. I/O: whether a port is free, at the bottom.
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from libs.cli.stack import UpError
from libs.embedded import LOOPBACK, free_port


@dataclass(frozen=True)
class Ports:
    # SeaweedFS's own default for S3 and NATS's defaults, so clients configured for those just work.
    nats: int = 4222
    nats_monitor: int = 8222
    s3: int = 8333
    # SeaweedFS's master default is 9333; volume and filer sit right beside it rather than on their defaults
    # (8080 and 8888), which web servers and Jupyter usually hold on a developer's machine.
    seaweed_master: int = 9333
    seaweed_volume: int = 9334
    seaweed_filer: int = 9335
    # The services' side servers (/healthz, /readyz, /metrics), one port each from this one up, in the order of
    # ``supervision.SERVICES``; 0 picks free ones. Next to Prometheus exporters' usual range, clear of the above.
    service_http: int = 9470
    # With ``--nats-cluster N``: server i (from 0) listens on nats + i, nats_monitor + i and, for its routes to the
    # others, nats_cluster + i; NATS's own default route port.
    nats_cluster: int = 6222


DEFAULT_NATS_URL = f"nats://{LOOPBACK}:{Ports.nats}"


@dataclass(frozen=True)
class PortUse:
    port: int
    what: str
    option: str
    # How far ``port`` lies above the value of ``option`` (a gRPC port's 10000, the i-th side server's or cluster
    # server's i): how low the option must go for ``port`` to exist.
    offset: int = 0


MAX_PORT = 65535
# SeaweedFS derives each gRPC port as its HTTP port + 10000 (see libs.embedded.start_seaweedfs).
SEAWEED_GRPC_OFFSET = 10000


def ports_needed(ports: Ports, run_nats: bool, run_s3: bool, nats_servers: int = 1) -> list[PortUse]:
    """Every loopback port the embedded servers will bind, with the option that moves it; ``nats_servers`` > 1:
    a cluster, each server on the next ports (``nats_cluster_ports``)."""
    needed: list[PortUse] = []
    if run_nats and nats_servers > 1:
        clients, monitors, routes = nats_cluster_ports(ports, nats_servers)
        for index in range(nats_servers):
            name = f"NATS server {index + 1} of {nats_servers}"
            needed += [
                PortUse(clients[index], name, "--nats-port / SHOAL_NATS_PORT", index),
                PortUse(monitors[index], f"{name} monitoring", "--nats-monitor-port / SHOAL_NATS_MONITOR_PORT",
                        index),
                PortUse(routes[index], f"{name} cluster routes", "--nats-cluster-port / SHOAL_NATS_CLUSTER_PORT",
                        index),
            ]
    elif run_nats:
        needed += [
            PortUse(ports.nats, "NATS", "--nats-port / SHOAL_NATS_PORT"),
            PortUse(ports.nats_monitor, "NATS monitoring", "--nats-monitor-port / SHOAL_NATS_MONITOR_PORT"),
        ]
    if run_s3:
        for port, what, option in (
            (ports.s3, "SeaweedFS S3", "--s3-port / SHOAL_S3_PORT"),
            (ports.seaweed_master, "SeaweedFS master", "--seaweed-master-port / SHOAL_SEAWEED_MASTER_PORT"),
            (ports.seaweed_volume, "SeaweedFS volume", "--seaweed-volume-port / SHOAL_SEAWEED_VOLUME_PORT"),
            (ports.seaweed_filer, "SeaweedFS filer", "--seaweed-filer-port / SHOAL_SEAWEED_FILER_PORT"),
        ):
            needed.append(PortUse(port, what, option))
            needed.append(PortUse(port + SEAWEED_GRPC_OFFSET, f"{what} gRPC, its port + 10000", option,
                                  SEAWEED_GRPC_OFFSET))
    return needed


def nats_cluster_ports(ports: Ports, servers: int) -> tuple[list[int], list[int], list[int]]:
    """Client, monitoring and route ports of each server of ``--nats-cluster N``: consecutive from the options."""
    return ([ports.nats + i for i in range(servers)], [ports.nats_monitor + i for i in range(servers)],
            [ports.nats_cluster + i for i in range(servers)])


def port_conflicts_message(busy: Sequence[PortUse]) -> str:
    lines = [f"port {use.port} ({use.what}) on {LOOPBACK} is in use: change it with {use.option}" for use in busy]
    return "cannot start the embedded servers:\n  " + "\n  ".join(lines)


def port_option_problems(needed: Sequence[PortUse]) -> list[str]:
    """Ports given twice, and derived ports past 65535 (a gRPC port, the last of consecutive ones), before any
    socket is tried."""
    seen: dict[int, PortUse] = {}
    problems = []
    # The bound of each option is set by its farthest port: not "below 55536" for every port, as it said (that is
    # the gRPC ports' bound only), nor a bound that fits one port and not the next.
    farthest: dict[str, int] = {}
    for use in needed:
        farthest[use.option] = max(farthest.get(use.option, 0), use.offset)
    for use in needed:
        if use.port > MAX_PORT:
            problems.append(f"port {use.port} ({use.what}) does not exist: lower {use.option} to "
                            f"{MAX_PORT - farthest[use.option]} or less")
        elif use.port in seen:
            problems.append(f"port {use.port} is given to both {seen[use.port].what} and {use.what}")
        seen.setdefault(use.port, use)
    return problems


def service_http_ports(first: int, services: Sequence[str], taken: Collection[int] = ()) -> dict[str, int]:
    """The side-server port of each service: consecutive from ``first``, or free ones when ``first`` is 0 —
    never one of ``taken`` (the servers' ports: free now because nothing binds them yet, so the OS may hand one
    out here too)."""
    if first == 0:
        ports = {}
        for name in services:
            port = free_port()
            while port in taken:
                port = free_port()
            ports[name] = port
        return ports
    return {name: first + offset for offset, name in enumerate(services)}


def http_ports_needed(ports: Mapping[str, int]) -> list[PortUse]:
    """The side servers' ports; consecutive ones (``service_http_ports``) each ``offset`` above the first."""
    first = min(ports.values(), default=0)
    return [PortUse(port, f"{name} side server", "--http-port / SHOAL_UP_HTTP_PORT", max(port - first, 0))
            for name, port in ports.items()]


# --- I/O ---


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR like the servers themselves: only a listener counts, not connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
        return False


def check_ports(needed: Sequence[PortUse]) -> None:
    problems = port_option_problems(needed)
    if problems:
        raise UpError("conflicting port options:\n  " + "\n  ".join(problems))
    busy = [use for use in needed if port_in_use(use.port)]
    if busy:
        raise UpError(port_conflicts_message(busy))
