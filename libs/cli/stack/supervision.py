"""The services ``shoal up`` runs and keeps running: their table, their environment, and their supervision.

Pure: ``SERVICES`` (name → module), ``service_env`` (what every service gets: where NATS and S3 are, where to
mount; each also gets its own side-server port, ``SHOAL_HTTP_PORT``), and with ``--agents N`` (N > 1) the
agents' table (``stack_services``: ``agent-1`` .. ``agent-N``) and each agent's own node name, labels, mount root,
cache subdir and the cluster's peer secret file (``agent_plans``, ``agent_env``). I/O: ``Stack``, the processes one
``shoal up`` owns; a service that exits is restarted through ``libs.supervisor`` (the one supervisor the
agent's mount processes use too), with its backoff reset after a minute of stable running. Shutdown order is
services, then SeaweedFS, then NATS, so no service sees its dependencies vanish.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from libs import natsauth
from libs.cli.stack import S3Access, UpError
from libs.cli.stack.layout import StateLayout
from libs.cli.stack.pids import SERVICE_GRACE_SECONDS, child_pids, stop_children, write_pids
from libs.embedded import ServerProcess, spawn
from libs.supervisor import Supervisor

# --- What runs: one line per service. ---

SERVICES: dict[str, str] = {
    "dataset": "services.dataset",
    "runtime": "services.runtime",
    "loader": "services.loader",
    "scheduler": "services.scheduler",
    "agent": "services.agent",
}

AGENT = "agent"
DATASET = "dataset"
# The labels every agent of ``shoal up --agents N`` carries (node affinity can select on them): its index, and a
# zone alternating between two, so a Dataset can pin its cache to half of the agents.
AGENT_INDEX_LABEL = "shoal.io/agent-index"
ZONE_LABEL = "topology.kubernetes.io/zone"
ZONES = ("zone-a", "zone-b")
# Node names are DNS-1123 labels.
MAX_NODE_NAME = 63


@dataclass(frozen=True)
class AgentPlan:
    """One agent of ``shoal up --agents N``: its service name, node name, labels, mount root and cache subdir."""

    service: str
    node: str
    labels: dict[str, str]
    mount_root: Path
    cache_subdir: str


def stack_services(agents: int, dataset_replicas: int = 1) -> dict[str, str]:
    """The services to run: today's table for one agent and one dataset service; ``agent-1`` .. ``agent-N`` in
    place of ``agent``, ``dataset-1`` .. ``dataset-N`` in place of ``dataset``."""
    services: dict[str, str] = {}
    for name, module in SERVICES.items():
        copies = {AGENT: agents, DATASET: dataset_replicas}.get(name, 1)
        if copies <= 1:
            services[name] = module
        else:
            services.update({f"{name}-{index}": module for index in range(1, copies + 1)})
    return services


def replica_envs(services: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Each dataset-service replica's own name among the replicas (``libs.members``): its service name."""
    return {name: {"SHOAL_REPLICA_NAME": name} for name, module in services.items()
            if module == SERVICES[DATASET] and name != DATASET}


def agent_plans(agents: int, base_node: str, base_labels: Mapping[str, str], mounts: Path) -> list[AgentPlan]:
    """N > 1 agents: nodes ``<base>-1`` .. ``<base>-N``, each mounting at ``<mounts>/<node>`` and caching in its own
    subdir (the node name) of the runtime's tier paths. One agent (N = 1) keeps today's name and paths."""
    if agents <= 1:
        return []
    plans = []
    for index in range(1, agents + 1):
        suffix = f"-{index}"
        node = base_node[:MAX_NODE_NAME - len(suffix)].rstrip("-") + suffix
        labels = {**base_labels, AGENT_INDEX_LABEL: str(index), ZONE_LABEL: ZONES[(index - 1) % len(ZONES)]}
        plans.append(AgentPlan(f"{AGENT}{suffix}", node, labels, mounts / node, node))
    return plans


def agent_env(plan: AgentPlan, peer_secret_file: Path) -> dict[str, str]:
    """The variables that make one agent of several its own node."""
    return {
        "SHOAL_NODE_NAME": plan.node,
        "SHOAL_NODE_LABELS": ",".join(f"{key}={value}" for key, value in sorted(plan.labels.items())),
        "SHOAL_MOUNT_ROOT": str(plan.mount_root),
        "SHOAL_CACHE_SUBDIR": plan.cache_subdir,
        "SHOAL_PEER_SECRET_FILE": str(peer_secret_file),
    }


def service_users(services: Mapping[str, str], agents: list[AgentPlan], node_name: str) -> dict[str, str]:
    """``--secure``: the NATS user of each service (``libs.natsauth``): its kind, and each agent limited to its
    node (``agent-<node>``; the mount processes inherit the agent's)."""
    nodes = {agent.service: agent.node for agent in agents}
    return {name: natsauth.user_name(natsauth.AGENT, nodes.get(name, node_name)) if module == SERVICES[AGENT]
            else natsauth.user_name(module.rsplit(".", 1)[-1]) for name, module in services.items()}


# Polling children is cheap; a fifth of a second makes a crash visible at once without busy-looping.
SUPERVISE_INTERVAL_SECONDS = 0.2
# A cluster member that exits again this soon after its restart is broken, not unlucky: shoal up stops.
SERVER_STABLE_SECONDS = 60.0


def service_env(base: Mapping[str, str], nats_url: str, s3: S3Access, mount_root: Path,
                secrets_dir: Path) -> dict[str, str]:
    """The environment of every service: the caller's, plus where NATS and S3 are, where to mount and where the
    secrets of ``encryptOptions`` are (unless the caller said)."""
    env = dict(base)
    env.setdefault("SHOAL_MOUNT_ROOT", str(mount_root))
    env.setdefault("SHOAL_SECRETS_DIR", str(secrets_dir))
    env.update({
        "NATS_URL": nats_url,
        "SHOAL_S3_ENDPOINT": s3.endpoint,
        "SHOAL_S3_ACCESS_KEY_ID": s3.access_key_id,
        "SHOAL_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        # Output goes to log files that tools parse; JSON lines whatever the terminal.
        "SHOAL_LOG_FORMAT": "json",
        # A crash's last lines must reach the log file, not die in a buffer.
        "PYTHONUNBUFFERED": "1",
    })
    return env


# 256 bits: HMAC-SHA256 keys are derived from it, so anything shorter would be the weak link.
PEER_SECRET_BYTES = 32


def ensure_secrets_dir(path: Path) -> None:
    """The folder of secrets, private to this user (0700), made if missing; what is in it is the user's."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def ensure_peer_secret(path: Path) -> None:
    """Create the peer secret file once (random, 0600, never printed); an existing one is kept, so agents that
    restart, and caches signed for, stay valid across runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        if path.stat().st_size == 0:
            raise UpError(f"{path} is empty: delete it and shoal up makes a new peer secret") from None
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(PEER_SECRET_BYTES) + "\n")


def service_argv(module: str, python: str) -> list[str]:
    return [python, "-m", module]


@dataclass
class Stack:
    """The processes one ``shoal up`` owns; ``stop`` ends all of them, however far the start got."""

    layout: StateLayout
    servers: list[ServerProcess] = field(default_factory=list)
    server_markers: dict[str, str] = field(default_factory=dict)
    # The services, by name, with their restart bookkeeping.
    supervisor: Supervisor[ServerProcess] = field(
        default_factory=lambda: Supervisor(lambda server: server.process.poll()))
    # The services' environment, set once the plan is known; restarts reuse it. Each service gets its own
    # side-server port on top (``http_ports``).
    env: dict[str, str] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)
    # What runs (name → module; ``stack_services``) and the variables each service gets on top of ``env``.
    services: dict[str, str] = field(default_factory=lambda: dict(SERVICES))
    service_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    # Children that existed before this stack started anything (none from the CLI; some when run in-process).
    earlier_children: set[int] = field(default_factory=lambda: set(child_pids(os.getpid())))
    # Servers started again when they exit, by name: a member of a NATS cluster (the others keep serving meanwhile,
    # and it catches up from them). Any other server that exits ends ``shoal up``.
    restarts: dict[str, Callable[[], ServerProcess]] = field(default_factory=dict)
    _restarted_at: dict[str, float] = field(default_factory=dict)

    def record(self) -> None:
        processes = {server.name: (server.pid, self.server_markers[server.name]) for server in self.servers}
        for name, child in self.supervisor.children.items():
            if child.process is not None:
                processes[name] = (child.process.pid, self.services[name])
        write_pids(self.layout, processes)

    def add_server(self, server: ServerProcess, marker: str) -> None:
        self.servers.append(server)
        self.server_markers[server.name] = marker
        self.record()

    def service_pids(self) -> dict[str, int]:
        return {name: child.process.pid for name, child in self.supervisor.children.items()
                if child.process is not None}

    def start_services(self, now: float) -> None:
        for name in self.services:
            self.supervisor.add(name, now)
        self.supervise_once(now, lambda message: None)

    def _start(self, name: str, now: float) -> ServerProcess:
        env = {**self.env, **self.service_envs.get(name, {})}
        if name in self.http_ports:
            env["SHOAL_HTTP_PORT"] = str(self.http_ports[name])
        process = spawn(name, service_argv(self.services[name], sys.executable), self.layout.log(name), env=env,
                        grace=SERVICE_GRACE_SECONDS)
        self.supervisor.started(self.supervisor.children[name], process, now)
        self.record()
        return process

    def supervise_once(self, now: float, echo: Callable[[str], None]) -> None:
        """Restart a dead cluster member (fail if it dies again within SERVER_STABLE_SECONDS), fail on any other
        dead server; schedule or perform the restart of a dead service."""
        for index, server in enumerate(self.servers):
            if server.alive():
                continue
            restart = self.restarts.get(server.name)
            if restart is None or now - self._restarted_at.get(server.name, -SERVER_STABLE_SECONDS) \
                    < SERVER_STABLE_SECONDS:
                raise UpError(f"{server.name} exited with code {server.process.returncode}; "
                              f"see {server.log_path}")
            server.stop()  # closes its log file
            echo(f"{server.name} exited with code {server.process.returncode}; restarting it (the rest of the "
                 "cluster serves meanwhile)")
            self.servers[index] = restart()
            self._restarted_at[server.name] = now
            self.record()
            echo(f"{server.name} restarted (PID {self.servers[index].pid})")
        exits, due = self.supervisor.step(now)
        for exited in exits:
            exited.process.stop()  # closes its log file
            echo(f"service {exited.child.name} exited with code {exited.code}; restarting in {exited.delay:g} s "
                 f"(log: {exited.process.log_path})")
        for child in due:
            process = self._start(child.name, now)
            if child.last_exit is not None:
                echo(f"service {child.name} restarted (PID {process.pid})")

    def stop(self) -> None:
        """Services first (all signalled at once, then waited for), then servers in reverse start order."""
        running = [child.process for child in self.supervisor.children.values() if child.process is not None]
        for process in running:
            if process.alive():
                process.process.send_signal(signal.SIGTERM)
        for process in running:
            process.stop()
        for server in reversed(self.servers):
            server.stop()
        stop_children(os.getpid(), spare=self.earlier_children)

