"""``shoal up`` and ``shoal down``: the whole Shoal stack on one machine, for a demo or for development.

This module is the command and its order of work; each concern lives in ``libs.cli.stack``: the state directory
(``layout``), ports (``ports``), pid files (``pids``), the demo bucket and the manifest's commands (``demo``),
starting and restarting the services (``supervision``) and what is printed (``banner``). ``run_up``: plan
(parse the manifest, check every port) before anything starts, start the embedded servers (one nats-server, or
``--nats-cluster N`` of them as one JetStream cluster), provision, seed and
apply, start the services, print the banner, then supervise until Ctrl-C, and stop everything in order.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import click
import msgspec

from libs import natsauth, natssecure
from libs.cli.errors import CliError
from libs.cli.stack import S3Access, UpError
from libs.cli.stack.banner import banner, provisioning_line
from libs.cli.stack.demo import DEMO_MANIFEST, Applied, applied_by, demo_commands, demo_objects, prepare
from libs.cli.stack.layout import DEFAULT_STATE_DIR, StateLayout, remove_empty
from libs.cli.stack.pids import claim_pidfile, is_shoal_up, pid_alive, read_pidfile, release_pidfile, stop_leftovers
from libs.cli.stack.ports import (
    Ports,
    PortUse,
    check_ports,
    http_ports_needed,
    nats_cluster_ports,
    ports_needed,
    service_http_ports,
)
from libs.cli.stack.prometheus import DEFAULT_PORT as PROMETHEUS_PORT
from libs.cli.stack.prometheus import (
    HOW_TO_GET,
    TARGETS_DIR_VARIABLE,
    URL_VARIABLE,
    PrometheusConfig,
    find_tool,
    start_prometheus,
)
from libs.cli.stack.supervision import (
    AGENT_INDEX_LABEL,
    SERVICES,
    SUPERVISE_INTERVAL_SECONDS,
    ZONE_LABEL,
    AgentPlan,
    Stack,
    agent_env,
    agent_plans,
    ensure_peer_secret,
    ensure_secrets_dir,
    replica_envs,
    service_env,
    service_users,
    stack_services,
)
from libs.config import Secret, Settings, SettingsError, load_settings, nats_login_variables, nats_server_url
from libs.documents import ManifestError, no_objects, parse_documents
from libs.embedded import (
    LOOPBACK,
    NatsConfig,
    SeaweedConfig,
    ServerExited,
    find_binary,
    free_port,
    nats_cluster,
    nats_urls,
    start_nats,
    start_nats_cluster,
    start_seaweedfs,
)
from libs.natssecure import SecureNats


def _timestamped(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, whatever the parent set (a background job ignores SIGINT)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    """Once shutting down, finish it: a second Ctrl-C must not leave servers running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass(frozen=True)
class UpOptions:
    layout: StateLayout
    ports: Ports
    manifest: Path
    # How many agents (nodes) to run on this machine.
    agents: int = 1
    # Prometheus's port on loopback (0: a free one), when a binary is found and PROMETHEUS_URL is not set.
    prometheus_port: int = PROMETHEUS_PORT
    # NATS with TLS and a user per process (libs.natsauth), certificates and passwords under the state directory.
    secure: bool = False
    # Embedded nats-servers: 1, or a JetStream cluster of 3 (or 5) whose streams and buckets get as many replicas.
    nats_servers: int = 1
    # Dataset-service processes sharing the commands and splitting the syncs (libs.members).
    dataset_replicas: int = 1


@dataclass(frozen=True)
class Plan:
    """What this run will start and publish, worked out before any process starts."""

    nats: list[NatsConfig]  # empty: NATS_URL names an existing server (or cluster); several: a cluster
    seaweed: SeaweedConfig | None  # None: SHOAL_S3_ENDPOINT names an existing store
    nats_url: str
    s3: S3Access
    env: dict[str, str]
    settings: Settings
    commands: list[tuple[str, msgspec.Struct]]
    applied: list[Applied]
    http_ports: dict[str, int]
    services: dict[str, str]
    # With several agents: each one's node, labels and paths (empty for one agent, which keeps today's).
    agents: list[AgentPlan]
    # Prometheus to start (binary, config); None: PROMETHEUS_URL names one, or there is no binary.
    prometheus: tuple[str, PrometheusConfig] | None = None
    # What the banner says about metrics: the address of Prometheus, or how to get one.
    metrics_line: str = HOW_TO_GET
    # --secure: the certificates and users' passwords, and each service's NATS user.
    secure: SecureNats | None = None
    users: dict[str, str] = field(default_factory=dict)


def run_up(options: UpOptions, environ: Mapping[str, str]) -> None:
    """Everything ``shoal up`` does, until interrupted; returns normally after a clean stop."""
    layout = options.layout
    # Made to hold the pid file: a start refused before anything runs (a busy port, a bad manifest, the state
    # directory taken) removes them again, so a mistyped --state-dir leaves no stray folder.
    made = layout.missing_folders()
    launched = False
    with _signals_interrupt():
        try:
            claim_pidfile(layout)
        except BaseException:
            remove_empty(made)
            raise
        # Created before anything starts, so whatever was started is stopped however far the start got.
        stack = Stack(layout)
        try:
            plan = _plan(options, environ)
            launched = True  # from here on the logs say what happened: they stay
            _launch(stack, plan)
            click.echo(banner(pid=os.getpid(), nats_url=plan.nats_url, nats_embedded=bool(plan.nats),
                              nats_monitor_port=options.ports.nats_monitor, s3=plan.s3,
                              seeded_objects=len(demo_objects()), services=stack.service_pids(),
                              http_ports=plan.http_ports, logs=layout.logs, manifest=options.manifest,
                              applied=plan.applied, mounts=Path(plan.env["SHOAL_MOUNT_ROOT"]),
                              secrets=Path(plan.env["SHOAL_SECRETS_DIR"]),
                              agents=[(agent.node, agent.mount_root) for agent in plan.agents],
                              metrics=plan.metrics_line, nats_servers=len(plan.nats),
                              cli_env=plan.secure.env_file(natsauth.CLI) if plan.secure is not None else None,
                              down=layout.down_command))
            while True:
                stack.supervise_once(time.monotonic(), _timestamped)
                time.sleep(SUPERVISE_INTERVAL_SECONDS)
        except KeyboardInterrupt:
            click.echo("\nStopping Shoal...", err=True)
        finally:
            _ignore_signals()
            stack.stop()
            release_pidfile(layout)
            if not launched:
                remove_empty(made)
    click.echo("Shoal stopped.", err=True)


def _plan(options: UpOptions, environ: Mapping[str, str]) -> Plan:
    layout, ports = options.layout, options.ports
    external_nats = environ.get("NATS_URL", "").strip()
    external_s3 = environ.get("SHOAL_S3_ENDPOINT", "").strip()
    if not external_nats:
        # A login in the caller's environment is for a NATS it names (NATS_URL), not for the one started here, which
        # wants none or (--secure) the users made here: a shell that sourced a secured stack's cli.env would make a
        # plain stack's services ask its server for TLS, and never connect.
        environ = {name: value for name, value in environ.items() if name not in nats_login_variables()}
    services = stack_services(options.agents, options.dataset_replicas)
    servers = ports_needed(ports, run_nats=not external_nats, run_s3=not external_s3,
                           nats_servers=options.nats_servers)
    http_ports = service_http_ports(ports.service_http, list(services), taken={use.port for use in servers})
    prometheus, metrics_line = _plan_prometheus(layout, options.prometheus_port, environ,
                                                taken={use.port for use in servers} | set(http_ports.values()))
    prometheus_ports = ([PortUse(prometheus[1].port, "Prometheus", "--prometheus-port / SHOAL_PROMETHEUS_PORT")]
                        if prometheus else [])
    check_ports(servers + http_ports_needed(http_ports) + prometheus_ports)
    _check_binaries(run_nats=not external_nats, run_s3=not external_s3)
    # Parse the manifest before starting anything: a broken one should cost no server start.
    try:
        docs = parse_documents(options.manifest.read_text(encoding="utf-8"))
    except ManifestError as err:
        raise UpError(f"{options.manifest}: {err}") from err
    except UnicodeDecodeError as err:  # a binary file given by mistake: as `shoal apply -f` says it
        raise UpError(f"{options.manifest}: not UTF-8 text: {err.reason} at byte {err.start}") from err
    except OSError as err:
        raise UpError(f"{options.manifest}: cannot read it: {err.strerror or err}") from err
    # An empty manifest (the wrong file, a failed render) would bring up a stack with nothing on it, silently.
    if empty := no_objects(docs, "apply"):
        raise UpError(f"{options.manifest}: {empty}")
    commands, notes = demo_commands(docs, layout.root, options.manifest)
    for note in notes:
        _timestamped(f"{options.manifest.name}: {note}")

    nats = [] if external_nats else _plan_nats(layout, ports, options.nats_servers)
    seaweed = None
    if external_s3:
        s3 = S3Access(external_s3, environ.get("SHOAL_S3_ACCESS_KEY_ID", ""),
                      environ.get("SHOAL_S3_SECRET_ACCESS_KEY", ""), embedded=False)
    else:
        seaweed = SeaweedConfig(layout.seaweedfs, s3_port=ports.s3, master_port=ports.seaweed_master,
                                volume_port=ports.seaweed_volume, filer_port=ports.seaweed_filer)
        s3 = S3Access(seaweed.endpoint, seaweed.access_key_id, seaweed.secret_access_key, embedded=True)
    # With a scheme on each (``nats_server_url``): the banner hides a user and password only in a URL it knows as one.
    nats_url = nats_urls(nats) if nats else ",".join(
        nats_server_url(url.strip()) for url in external_nats.split(",") if url.strip())
    env = service_env(environ, nats_url, s3, layout.mounts, layout.secrets)
    if len(nats) > 1:
        # Every message on every server: losing one loses nothing and blocks nothing.
        env["SHOAL_STREAM_REPLICAS"] = str(len(nats))
    if prometheus is not None:
        # The agents write one scrape target per mount process there (their side servers' ports are their own).
        env[TARGETS_DIR_VARIABLE] = str(prometheus[1].targets_dir)
    try:
        settings = load_settings(env)
    except SettingsError as err:
        raise UpError(str(err)) from err
    agents = agent_plans(options.agents, settings.agent.node_name, settings.agent.labels, layout.mounts)
    secure, users = None, {}
    if options.secure:
        if not nats:
            raise UpError("--secure secures the embedded NATS; with NATS_URL set, give NATS_USER, NATS_PASSWORD and "
                          "NATS_TLS_CA for your server instead (docs/security.md)")
        users = service_users(services, agents, settings.agent.node_name)
        try:
            # Every agent has its own user (``agent-<node>``), and the shared ``agent`` user is not made: with it
            # one node's agent could use another's tasks, and the loader could make any stream (natsauth).
            shared = [kind for kind in natsauth.KINDS if kind != natsauth.AGENT]
            secure = natssecure.prepare(layout.nats_secure, [*shared, *users.values()])
        except natssecure.SecureSetupError as err:
            raise UpError(str(err)) from err
        nats = [secure.secured(server) for server in nats]
        env["NATS_TLS_CA"] = str(secure.tls.ca)
        # shoal up itself provisions, seeds and applies as the CLI user; each service gets its own user (_launch).
        cli = secure.client_env(natsauth.CLI)
        settings = replace(settings, nats=replace(settings.nats, user=cli["NATS_USER"],
                                                  password=Secret(cli["NATS_PASSWORD"]), tls_ca=cli["NATS_TLS_CA"]))
    return Plan(nats, seaweed, nats_url, s3, env, settings, commands, applied_by(commands), http_ports, services,
                agents, prometheus, metrics_line, secure, users)


def _check_binaries(run_nats: bool, run_s3: bool) -> None:
    """A server binary that is missing is said before anything starts, not once NATS already runs."""
    for name, needed in (("nats-server", run_nats), ("weed", run_s3)):
        if needed:
            try:
                find_binary(name)
            except FileNotFoundError as err:
                raise UpError(str(err)) from err


def _plan_nats(layout: StateLayout, ports: Ports, servers: int) -> list[NatsConfig]:
    """One embedded nats-server, or ``servers`` on consecutive ports forming one JetStream cluster."""
    if servers <= 1:
        return [NatsConfig(ports.nats, ports.nats_monitor, layout.nats_store)]
    clients, monitors, routes = nats_cluster_ports(ports, servers)
    return nats_cluster(servers, clients, monitors, routes, layout.nats_cluster_stores)


def _plan_prometheus(layout: StateLayout, port: int, environ: Mapping[str, str],
                     taken: set[int]) -> tuple[tuple[str, PrometheusConfig] | None, str]:
    """The Prometheus to start (None when PROMETHEUS_URL names one or no binary is found) and the banner's line."""
    external = environ.get(URL_VARIABLE, "").strip()
    if external:
        return None, (f"{external} (from {URL_VARIABLE}; it scrapes the side servers below: see "
                      "deploy/grafana/README.md)")
    binary = find_tool("prometheus")
    if binary is None:
        return None, HOW_TO_GET
    if port == 0:
        port = free_port()
        while port in taken:
            port = free_port()
    config = PrometheusConfig(port, layout.prometheus, layout.prometheus_config, layout.prometheus_targets)
    return (binary, config), (f"{config.url} (Prometheus scraping every service and mount process; its API, "
                              "and Grafana's dashboards in deploy/grafana/)")


def _launch(stack: Stack, plan: Plan) -> None:
    layout = stack.layout
    layout.logs.mkdir(parents=True, exist_ok=True)
    if len(plan.nats) == 1:
        _timestamped(f"starting nats-server on {plan.nats_url}")
        stack.add_server(start_nats(plan.nats[0], layout.log("nats-server")), "nats-server")
    elif plan.nats:
        _timestamped(f"starting a JetStream cluster of {len(plan.nats)} nats-servers on {plan.nats_url}")
        for server, member in zip(start_nats_cluster(plan.nats, layout.logs), plan.nats, strict=True):
            stack.add_server(server, "nats-server")
            stack.restarts[server.name] = functools.partial(start_nats, member, server.log_path)
    if plan.seaweed is not None:
        _timestamped(f"starting SeaweedFS S3 on {plan.s3.endpoint} (takes a few seconds)")
        stack.add_server(start_seaweedfs(plan.seaweed, layout.log("seaweedfs")), "weed")
    _timestamped(provisioning_line(plan.s3.embedded, len(plan.commands)))
    asyncio.run(prepare(plan.settings.nats, plan.s3, plan.commands))
    if plan.prometheus is not None:
        binary, config = plan.prometheus
        _timestamped(f"starting Prometheus on {config.url}")
        # Targets of an earlier run name ports its mount processes no longer hold.
        for stale in config.targets_dir.glob("*.json"):
            stale.unlink()
        stack.add_server(start_prometheus(binary, config, plan.http_ports, layout.log("prometheus")), "prometheus")
    ensure_secrets_dir(Path(plan.env["SHOAL_SECRETS_DIR"]))
    stack.env = plan.env
    stack.http_ports = plan.http_ports
    stack.services = plan.services
    stack.service_envs = replica_envs(plan.services)
    if plan.agents:
        # Several agents read each other's caches; one alone has no peers, so it runs no peer server.
        ensure_peer_secret(layout.peer_secret)
        stack.service_envs.update({agent.service: agent_env(agent, layout.peer_secret) for agent in plan.agents})
    if plan.secure is not None:
        # Each service sees its own password only; the CLI's is in a file a shell can source.
        for name, user in plan.users.items():
            stack.service_envs[name] = {**stack.service_envs.get(name, {}), **plan.secure.client_env(user)}
        _timestamped(f"NATS requires TLS and a user per process; for the shoal CLI: . {plan.secure.env_file('cli')}")
    stack.start_services(time.monotonic())


# --- The commands ---

_state_dir_option = click.option(
    "--state-dir", envvar="SHOAL_STATE_DIR", default=DEFAULT_STATE_DIR, show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where logs, the JetStream store, SeaweedFS data and pid files live (env SHOAL_STATE_DIR).",
)


def _port_option(name: str, env: str, default: int, what: str) -> Callable[[Any], Any]:
    return click.option(name, envvar=env, default=default, show_default=True, type=click.IntRange(1, 65535),
                        help=f"{what} port on {LOOPBACK} (env {env}).")


_defaults = Ports()
# Every agent is a Python process with its mounts' processes; more than this on one machine is a typo.
MAX_AGENTS = 64
# RAFT wants an odd number of servers; 5 tolerate two failures, more only cost a laptop memory.
MAX_NATS_SERVERS = 5


@click.command()
@_state_dir_option
@_port_option("--nats-port", "SHOAL_NATS_PORT", _defaults.nats, "NATS client")
@_port_option("--nats-monitor-port", "SHOAL_NATS_MONITOR_PORT", _defaults.nats_monitor, "NATS monitoring")
@_port_option("--s3-port", "SHOAL_S3_PORT", _defaults.s3, "SeaweedFS S3 (its gRPC uses +10000)")
@_port_option("--seaweed-master-port", "SHOAL_SEAWEED_MASTER_PORT", _defaults.seaweed_master,
              "SeaweedFS master (its gRPC uses +10000)")
@_port_option("--seaweed-volume-port", "SHOAL_SEAWEED_VOLUME_PORT", _defaults.seaweed_volume,
              "SeaweedFS volume (its gRPC uses +10000)")
@_port_option("--seaweed-filer-port", "SHOAL_SEAWEED_FILER_PORT", _defaults.seaweed_filer,
              "SeaweedFS filer (its gRPC uses +10000)")
@click.option("--http-port", envvar="SHOAL_UP_HTTP_PORT", default=_defaults.service_http, show_default=True,
              type=click.IntRange(0, 65533),
              help=f"First of {len(SERVICES)} consecutive side-server ports on {LOOPBACK}, one per service "
                   f"({', '.join(SERVICES)}; agent-1..N with --agents N, dataset-1..N with --dataset-replicas N): "
                   "/healthz, /readyz, /metrics; 0 picks free "
                   "ones (env SHOAL_UP_HTTP_PORT).")
@click.option("--prometheus-port", envvar="SHOAL_PROMETHEUS_PORT", default=PROMETHEUS_PORT, show_default=True,
              type=click.IntRange(0, 65535),
              help=f"Prometheus port on {LOOPBACK}, when a prometheus binary is found (.shoal/tools/prometheus/ from "
                   "`make system-deps`, or PATH) and PROMETHEUS_URL is not set; 0 picks a free one "
                   "(env SHOAL_PROMETHEUS_PORT).")
@click.option("--manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=DEMO_MANIFEST,
              show_default=True, help="Dataset and Runtime documents applied once everything runs.")
@_port_option("--nats-cluster-port", "SHOAL_NATS_CLUSTER_PORT", _defaults.nats_cluster,
              "With --nats-cluster: first NATS cluster-route")
@click.option("--nats-cluster", "nats_servers", envvar="SHOAL_NATS_CLUSTER", type=click.IntRange(1, MAX_NATS_SERVERS),
              default=1, show_default=True,
              help="Embedded nats-servers. 3 (or 5) run one JetStream cluster on loopback: server i (from 1) on "
                   "--nats-port + i - 1, --nats-monitor-port + i - 1 and --nats-cluster-port + i - 1, its store in "
                   "<state-dir>/nats-cluster/nats-<i>; streams and KV buckets get that many replicas and every "
                   "service every URL, so one server can die without losing or blocking anything (env "
                   "SHOAL_NATS_CLUSTER).")
@click.option("--agents", envvar="SHOAL_UP_AGENTS", type=click.IntRange(1, MAX_AGENTS), default=1,
              show_default=True,
              help="Agents (nodes) to run on this machine. With more than one, each is node <name>-<i> with labels "
                   f"{AGENT_INDEX_LABEL}=<i> and {ZONE_LABEL}=zone-a|zone-b (alternating), mounts under "
                   "<state-dir>/mnt/<node>, and they read each other's caches (env SHOAL_UP_AGENTS).")
@click.option("--dataset-replicas", envvar="SHOAL_UP_DATASET_REPLICAS", type=click.IntRange(1, 8), default=1,
              show_default=True,
              help="Dataset-service processes: they share the commands and split the metadata syncs between them "
                   "(dataset-1..N, each its own SHOAL_REPLICA_NAME; env SHOAL_UP_DATASET_REPLICAS).")
@click.option("--secure", envvar="SHOAL_UP_SECURE", is_flag=True,
              help="NATS with TLS (a CA and certificate made in <state-dir>/nats-secure) and a user per process with "
                   "least-privilege permissions (docs/security.md); <state-dir>/nats-secure/cli.env holds the CLI's "
                   "credentials (env SHOAL_UP_SECURE).")
def up(state_dir: Path, nats_port: int, nats_monitor_port: int, s3_port: int, seaweed_master_port: int,
       seaweed_volume_port: int, seaweed_filer_port: int, http_port: int, prometheus_port: int, manifest: Path,
       agents: int, secure: bool, nats_cluster_port: int = _defaults.nats_cluster, nats_servers: int = 1,
       dataset_replicas: int = 1) -> None:
    """Run NATS, SeaweedFS S3 and every Shoal service on this machine, with a demo dataset; Ctrl-C stops all.

    An existing NATS is used instead when NATS_URL is set, an existing S3 when SHOAL_S3_ENDPOINT is set
    (with SHOAL_S3_ACCESS_KEY_ID and SHOAL_S3_SECRET_ACCESS_KEY). Prometheus is started too when a binary is found
    (`make system-deps` unpacks Debian's), scraping every service and mount process; PROMETHEUS_URL names an existing
    one instead.
    """
    if nats_servers % 2 == 0:
        raise CliError(f"--nats-cluster {nats_servers}: a cluster of {nats_servers} tolerates no more failures "
                       f"than one of {nats_servers - 1}: use 3 or 5")
    ports = Ports(nats=nats_port, nats_monitor=nats_monitor_port, s3=s3_port, seaweed_master=seaweed_master_port,
                  seaweed_volume=seaweed_volume_port, seaweed_filer=seaweed_filer_port, service_http=http_port,
                  nats_cluster=nats_cluster_port)
    options = UpOptions(StateLayout(state_dir.resolve()), ports, manifest.resolve(), agents, prometheus_port,
                        secure=secure, nats_servers=nats_servers, dataset_replicas=dataset_replicas)
    try:
        run_up(options, os.environ)
    except UpError as err:
        raise CliError(str(err)) from err
    except ServerExited as err:  # run_up stopped what had started; the log's tail says why
        raise CliError(_server_exited_text(err)) from err
    except OSError as err:  # the state directory cannot be written (under a file, read-only, full)
        raise CliError(_os_error_text(err)) from err


@click.command()
@_state_dir_option
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for shoal up to stop everything.")
def down(state_dir: Path, timeout: float) -> None:
    """Stop a running `shoal up` (SIGTERM to the PID in <state-dir>/up.pid) and wait until it has exited."""
    try:
        _down(StateLayout(state_dir.resolve()), timeout)
    except OSError as err:  # the state directory cannot be read (under a file) or the PID not signalled
        raise CliError(_os_error_text(err)) from err


def _server_exited_text(err: ServerExited) -> str:
    where = f"; see {err.log}" if err.log is not None else ""
    tail = err.tail.rstrip("\n")
    return f"{err.what} exited with code {err.code} before it was ready{where}" + (f"\n{tail}" if tail else "")


def _os_error_text(err: OSError) -> str:
    return f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)


def _down(layout: StateLayout, timeout: float) -> None:
    pid, started = read_pidfile(layout.pidfile)
    if pid is None or not is_shoal_up(pid, started):
        # Not an error: stopping is idempotent, as a script's cleanup step wants it (and leftovers are stopped).
        if pid is not None:
            layout.pidfile.unlink(missing_ok=True)
        stop_leftovers(layout)
        click.echo(f"shoal up is not running (state directory {layout.root}).")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise CliError(f"shoal up (PID {pid}) did not stop within {timeout:g} s; see {layout.logs} and try "
                           "again")
        time.sleep(0.1)
    click.echo(f"Stopped shoal up (PID {pid}).")


if __name__ == "__main__":  # ``python -m libs.cli.up``: the same command without the CLI group
    up()
