"""``shoal up`` and ``shoal down``: the whole Shoal stack on one machine, for a demo or for development.

What it decides (pure, at the top of this module):
- the state directory layout (``StateLayout``: logs, JetStream store, SeaweedFS data, pid files);
- which embedded servers run: nats-server unless ``NATS_URL`` is set, SeaweedFS S3 unless ``SHOAL_S3_ENDPOINT``
  is set, and which local ports they need (``ports_needed``);
- the table of services (``SERVICES``: name → module) and the environment every service gets (``service_env``);
- the restart backoff of a service that exits (``restart_delay``, ``failures_after_exit``);
- the demo bucket's objects (``demo_objects``) and how the demo manifest becomes commands (``demo_commands``).

Which I/O it owns (the ``--- I/O: ... ---`` sections): the pid files, starting and stopping child processes by the
PID it started, supervising the services, seeding the demo bucket, provisioning JetStream and publishing the demo
manifest. Shutdown order is services, then SeaweedFS, then NATS, so no service sees its dependencies vanish.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import click
import msgspec

from libs import subjects
from libs.config import NatsSettings, Settings, SettingsError, load_settings
from libs.documents import ManifestError, documents_to_commands, parse_documents
from libs.embedded import (
    LOOPBACK,
    NatsConfig,
    SeaweedConfig,
    ServerProcess,
    spawn,
    start_nats,
    start_seaweedfs,
)

# --- What runs: one line per service. The agent, loader and scheduler are added here when they exist. ---

SERVICES: dict[str, str] = {
    "dataset": "services.dataset",
    "runtime": "services.runtime",
    "agent": "services.agent",
}

DEMO_BUCKET = "demo"
DEMO_MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "demo.yaml"
# The demo manifest writes cache paths under the default state directory; they are moved under --state-dir.
DEFAULT_STATE_DIR = ".shoal"

# A service that ran this long before exiting was healthy: its next crash starts the backoff from the beginning.
STABLE_AFTER_SECONDS = 60.0
# Polling children is cheap; a fifth of a second makes a crash visible at once without busy-looping.
SUPERVISE_INTERVAL_SECONDS = 0.2
# Services get SIGTERM and this long to drain their consumers before SIGKILL.
SERVICE_GRACE_SECONDS = 10.0
# Reaching an external NATS: nats-py would retry forever; a person wants an answer.
CONNECT_TIMEOUT_SECONDS = 15.0


class UpError(Exception):
    """Something a person has to fix (a port in use, a second ``shoal up``); the message says what."""


# --- Pure parts ---


@dataclass(frozen=True)
class StateLayout:
    """Every path below the state directory, named once."""

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nats_store(self) -> Path:
        return self.root / "nats"

    @property
    def seaweedfs(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def pidfile(self) -> Path:
        return self.root / "up.pid"

    @property
    def mounts(self) -> Path:
        """Where the agent mounts datasets: <state>/mnt/<namespace>/<name>."""
        return self.root.resolve() / "mnt"

    @property
    def pids(self) -> Path:
        """PIDs of every child, so ``shoal down``, tests and a later ``shoal up`` can find them."""
        return self.root / "pids.json"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"


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


DEFAULT_NATS_URL = f"nats://{LOOPBACK}:{Ports.nats}"


@dataclass(frozen=True)
class PortUse:
    port: int
    what: str
    option: str


# SeaweedFS derives each gRPC port as its HTTP port + 10000 (see libs.embedded.start_seaweedfs).
SEAWEED_GRPC_OFFSET = 10000


def ports_needed(ports: Ports, run_nats: bool, run_s3: bool) -> list[PortUse]:
    """Every loopback port the embedded servers will bind, with the option that moves it."""
    needed: list[PortUse] = []
    if run_nats:
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
            needed.append(PortUse(port + SEAWEED_GRPC_OFFSET, f"{what} gRPC, its port + 10000", option))
    return needed


def port_conflicts_message(busy: Sequence[PortUse]) -> str:
    lines = [f"port {use.port} ({use.what}) on {LOOPBACK} is in use: change it with {use.option}" for use in busy]
    return "cannot start the embedded servers:\n  " + "\n  ".join(lines)


def port_option_problems(needed: Sequence[PortUse]) -> list[str]:
    """Ports given twice, and derived gRPC ports past 65535, before any socket is tried."""
    seen: dict[int, PortUse] = {}
    problems = []
    for use in needed:
        if use.port > 65535:
            problems.append(f"port {use.port} ({use.what}) does not exist: lower {use.option} below 55536")
        elif use.port in seen:
            problems.append(f"port {use.port} is given to both {seen[use.port].what} and {use.what}")
        seen.setdefault(use.port, use)
    return problems


@dataclass(frozen=True)
class S3Access:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    embedded: bool


def service_env(base: Mapping[str, str], nats_url: str, s3: S3Access, mount_root: Path) -> dict[str, str]:
    """The environment of every service: the caller's, plus where NATS and S3 are and where to mount."""
    env = dict(base)
    env.setdefault("SHOAL_MOUNT_ROOT", str(mount_root))
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


def service_argv(module: str, python: str) -> list[str]:
    return [python, "-m", module]


def restart_delay(failures: int) -> float:
    """1 s after the first failure, doubling, at most 30 s: a crash loop costs little and recovers quickly."""
    return float(min(30.0, 2.0 ** max(0, failures - 1)))


def failures_after_exit(failures: int, ran_seconds: float) -> int:
    """Consecutive failures counting this exit; a run longer than STABLE_AFTER_SECONDS starts a new count."""
    return 1 if ran_seconds >= STABLE_AFTER_SECONDS else failures + 1


@dataclass(frozen=True)
class DemoObject:
    """One object of the demo bucket; binary bodies are generated from the key so every run seeds the same bytes."""

    key: str
    size: int
    text: str | None = None

    def body(self) -> bytes:
        if self.text is not None:
            return self.text.encode()
        return hashlib.shake_256(self.key.encode()).digest(self.size)


_SAMPLE_SIZES = (
    # Tiny files, page and block edges (4 KiB, 64 KiB, 128 KiB ± 1), and mid-sized ones up to 1 MiB.
    1, 17, 512, 1000, 4095, 4096, 4097, 10_000, 65_536, 100_000, 131_071, 131_073, 250_000, 500_000,
    777_777, 1 << 20,
)
# Larger than the 4 MiB default block: one crosses a block boundary by a little, one is exactly two blocks.
_SHARD_SIZES = (5 * (1 << 20) + 123, 8 << 20)
_LABELS = ("cat", "dog", "bird", "fish")


def demo_objects() -> list[DemoObject]:
    samples = [DemoObject(f"train/sample-{i:03d}.bin", size) for i, size in enumerate(_SAMPLE_SIZES)]
    shards = [DemoObject(f"train/shard-{i}.bin", size) for i, size in enumerate(_SHARD_SIZES)]
    labels = "key,label\n" + "".join(
        f"{obj.key},{_LABELS[i % len(_LABELS)]}\n" for i, obj in enumerate(samples + shards)
    )
    readme = (
        "Shoal demo dataset\n\n"
        "Seeded by `shoal up` into the embedded SeaweedFS. train/ holds generated binary files of varied sizes\n"
        "(bytes derived from each key, so every run seeds the same content); labels.csv maps them to labels.\n"
    )
    texts = [DemoObject("README.txt", len(readme.encode()), readme),
             DemoObject("labels.csv", len(labels.encode()), labels)]
    return texts + samples + shards


def rebase_tier_paths(docs: list[dict[str, Any]], state_dir: Path) -> list[dict[str, Any]]:
    """Copies of ``docs`` whose relative tier paths under ``.shoal/`` point into ``state_dir`` instead.

    The demo manifest is written for the default state directory; a run with ``--state-dir`` keeps its cache
    there too. Other relative paths become absolute against the working directory, which is what the services
    (started in it) would make of them, so every reader sees the same path.
    """
    rebased = []
    for doc in docs:
        levels = ((doc.get("spec") or {}).get("tieredstore") or {}).get("levels")
        if not isinstance(levels, list):
            rebased.append(doc)
            continue
        new_levels = []
        for level in levels:
            path = level.get("path") if isinstance(level, dict) else None
            if isinstance(path, str) and path and not Path(path).is_absolute():
                parts = Path(path).parts
                target = state_dir.joinpath(*parts[1:]) if parts[0] == DEFAULT_STATE_DIR else Path.cwd() / path
                level = {**level, "path": str(target)}
            new_levels.append(level)
        spec = {**doc["spec"], "tieredstore": {**doc["spec"]["tieredstore"], "levels": new_levels}}
        rebased.append({**doc, "spec": spec})
    return rebased


def demo_commands(docs: list[Any], state_dir: Path) -> tuple[list[tuple[str, msgspec.Struct]], list[str]]:
    """(subject, command) for each document of the demo manifest, and notes on ignored fields.

    Raises UpError when a document is invalid: ``shoal up`` starts nothing for a broken manifest.
    """
    dicts = [doc for doc in docs if isinstance(doc, dict)]
    commands, notes, errors = documents_to_commands(rebase_tier_paths(dicts, state_dir))
    if errors or len(dicts) != len([doc for doc in docs if doc is not None]):
        errors = errors or ["every document must be a mapping"]
        raise UpError("the demo manifest is invalid:\n  " + "\n  ".join(errors))
    return [(command.subject, command.event) for command in commands], notes


def publish_example(nats_url: str) -> str:
    """A copy-paste Python snippet that applies a Dataset with nothing but nats-py and JSON."""
    from libs.events.common import ObjectMeta
    from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount

    command = DatasetApply(
        id="hello-1",
        dataset=Dataset(metadata=ObjectMeta(name="hello"),
                        spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{DEMO_BUCKET}/train/")])),
    )
    return (
        ".venv/bin/python - <<'EOF'\n"
        "import asyncio, json, nats\n"
        "async def main():\n"
        f"    nc = await nats.connect({nats_url.split(',')[0]!r})\n"
        f"    command = {msgspec.to_builtins(command)!r}\n"
        f"    await nc.jetstream().publish({subjects.DATASET_APPLY!r}, json.dumps(command).encode())\n"
        "    await nc.close()\n"
        "asyncio.run(main())\n"
        "EOF"
    )


def banner(*, pid: int, nats_url: str, nats_embedded: bool, nats_monitor_port: int, s3: S3Access,
           seeded_objects: int, services: Mapping[str, int], logs: Path, manifest: Path,
           mounts: Path) -> str:
    nats_line = (f"{nats_url} (embedded; monitoring http://{LOOPBACK}:{nats_monitor_port})" if nats_embedded
                 else f"{nats_url} (from NATS_URL)")
    if s3.embedded:
        s3_line = (f"{s3.endpoint} (embedded SeaweedFS; access key {s3.access_key_id!r}, secret "
                   f"{s3.secret_access_key!r}; bucket {DEMO_BUCKET!r} with {seeded_objects} demo objects)")
    else:
        s3_line = (f"{s3.endpoint} (from SHOAL_S3_ENDPOINT; credentials from SHOAL_S3_ACCESS_KEY_ID/"
                   f"SHOAL_S3_SECRET_ACCESS_KEY; the demo Dataset expects a bucket {DEMO_BUCKET!r} there)")
    # The CLI's default server is NATS's default; anything else has to be named on its command line.
    shoal = ".venv/bin/shoal" if nats_url == DEFAULT_NATS_URL else f".venv/bin/shoal --nats {nats_url}"
    running = ", ".join(f"{name} (PID {service_pid})" for name, service_pid in services.items())
    return "\n".join([
        f"Shoal is up (PID {pid}).",
        f"  NATS      {nats_line}",
        f"  S3        {s3_line}",
        f"  services  {running}",
        f"  logs      {logs}/",
        f"  demo      Dataset 'demo' and Runtime 'demo' applied from {manifest}",
        f"  mount     {mounts}/default/demo (the agent mounts it once the dataset is Bound)",
        "",
        "Look around:",
        f"  {shoal} get datasets",
        f"  {shoal} describe dataset demo",
        f"  find {mounts}/default/demo && md5sum {mounts}/default/demo/train/*",
        "  Publish a command as JSON with plain Python (nats-py); paste this into a shell:",
        publish_example(nats_url),
        "",
        "Ctrl-C to stop (or `shoal down` from another terminal).",
    ])


# --- I/O: pid files ---


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes | None:
    """The process's command line; None where /proc is not there to ask (then callers trust the PID)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return b"" if Path("/proc/self").exists() else None
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether the process still runs: a zombie counts as gone once all its threads are gone.

    A multi-threaded process's main thread turns zombie first while the others still close their sockets, and
    an orphan stays a zombie as long as init does not collect it; so every thread's state is looked at.
    """
    if pid <= 0:  # 0 and negative numbers address process groups, never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def runs(pid: int, marker: str) -> bool:
    """PID is alive and its command line contains ``marker``: guards against a PID reused after a reboot."""
    if not pid_alive(pid):
        return False
    cmdline = _cmdline(pid)
    return cmdline is None or marker.encode() in cmdline


def _is_shoal_up(pid: int) -> bool:
    return runs(pid, "shoal") or runs(pid, "libs.cli")


def claim_pidfile(layout: StateLayout) -> None:
    """Write our PID to up.pid, refusing if another ``shoal up`` owns this state directory."""
    existing = read_pid(layout.pidfile)
    if existing is not None and existing != os.getpid() and _is_shoal_up(existing):
        raise UpError(f"shoal up is already running as PID {existing}; stop it with `shoal down`")
    if layout.pidfile.exists():
        click.echo(f"Removing a stale {layout.pidfile}: it names no running shoal up.", err=True)
        layout.pidfile.unlink()
        stop_leftovers(layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: of two ``shoal up`` started at the same moment, exactly one gets the file.
        fd = os.open(layout.pidfile, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError as err:
        other = read_pid(layout.pidfile)
        raise UpError(f"shoal up is already running as PID {other}; stop it with `shoal down`") from err
    with os.fdopen(fd, "w") as file:
        file.write(f"{os.getpid()}\n")


def release_pidfile(layout: StateLayout) -> None:
    if read_pid(layout.pidfile) == os.getpid():
        layout.pidfile.unlink(missing_ok=True)
    layout.pids.unlink(missing_ok=True)


def write_pids(layout: StateLayout, processes: Mapping[str, tuple[int, str]]) -> None:
    """pids.json: {name: {pid, marker}}, replaced atomically so a reader never sees half a file."""
    record = {"up": os.getpid(),
              "processes": {name: {"pid": pid, "marker": marker} for name, (pid, marker) in processes.items()}}
    temporary = layout.pids.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(layout.pids)


def stop_leftovers(layout: StateLayout, grace: float = 5.0) -> list[str]:
    """Stop children a killed ``shoal up`` left behind (by the PIDs it recorded, if they still run its programs)."""
    try:
        record = json.loads(layout.pids.read_text())
        owner = int(record.get("up", 0))
        recorded = {name: (int(entry["pid"]), str(entry["marker"])) for name, entry in record["processes"].items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return []  # nothing recorded, or not by us: nothing to stop
    if _is_shoal_up(owner):
        return []  # its owner still runs: nothing is left over
    left = {name: pid for name, (pid, marker) in recorded.items() if runs(pid, marker)}
    for name, pid in left.items():
        click.echo(f"Stopping {name} (PID {pid}), left running by an earlier shoal up.", err=True)
    terminate(list(left.values()), grace)
    layout.pids.unlink(missing_ok=True)
    return list(left)


def terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds, then wait until they are gone (a kill is not instant)."""

    def wait_gone(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
            time.sleep(0.05)

    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_gone(grace)
    for pid in pids:
        if pid_alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # SIGKILL cannot be ignored; this only covers the moment the kernel needs to tear the process down.
    wait_gone(5.0)


# --- I/O: ports, seeding, provisioning ---


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


async def seed_demo_bucket(s3: S3Access, objects: Sequence[DemoObject]) -> int:
    """Create the demo bucket and upload what is missing or of the wrong size; returns how many were uploaded."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    client_context = get_session().create_client(
        "s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key, config=AioConfig(s3={"addressing_style": "path"}),
    )
    async with client_context as client:
        try:
            await client.create_bucket(Bucket=DEMO_BUCKET)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        present: dict[str, int] = {}
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=DEMO_BUCKET):
            for item in page.get("Contents", []):
                present[item["Key"]] = int(item["Size"])
        missing = [obj for obj in objects if present.get(obj.key) != obj.size]
        for obj in missing:
            await client.put_object(Bucket=DEMO_BUCKET, Key=obj.key, Body=obj.body())
        return len(missing)


def _reachable(url: str) -> bool | None:
    """Whether a TCP connection to a nats:// or tls:// URL opens; None for schemes not checked here."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        return None
    try:
        with socket.create_connection((parts.hostname, parts.port or 4222), timeout=2.0):
            return True
    except OSError:
        return False


async def prepare(nats: NatsSettings, s3: S3Access, commands: Sequence[tuple[str, msgspec.Struct]]) -> None:
    """Provision JetStream, seed the demo bucket (embedded S3 only) and publish the demo commands."""
    from libs.bus import connect

    shown = ",".join(nats.urls)
    # nats-py retries a refused connection forever, logging a traceback each time: ask the sockets first.
    if all(_reachable(url) is False for url in nats.urls):
        raise UpError(f"cannot reach NATS at {shown} (connection refused or no route); check NATS_URL")
    nats_log = logging.getLogger("nats.aio.client")
    saved_propagate, nats_log.propagate = nats_log.propagate, False
    try:
        bus = await asyncio.wait_for(connect(nats, "shoal-up"), CONNECT_TIMEOUT_SECONDS)
    except (TimeoutError, OSError) as err:
        raise UpError(f"cannot reach NATS at {shown}: {err or f'no answer within {CONNECT_TIMEOUT_SECONDS:g} s'}"
                      ) from err
    finally:
        nats_log.propagate = saved_propagate
    try:
        await bus.provision()
        if s3.embedded:
            await seed_demo_bucket(s3, demo_objects())
        for subject, command in commands:
            await bus.publish(subject, command)
    finally:
        await bus.close()


# --- I/O: the processes ---


def child_pids(parent: int) -> list[int]:
    """Live (non-zombie) children of ``parent``, from /proc; empty where there is no /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def stop_children(parent: int, spare: set[int], grace: float = 3.0) -> None:
    """Stop children not stopped by name yet (one spawned just as Ctrl-C arrived was never registered).

    ``spare``: children the process had before ``shoal up`` started anything, which are not ours to stop.
    """
    strays = [pid for pid in child_pids(parent) if pid not in spare]
    terminate(strays, grace)
    for pid in strays:
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


@dataclass
class Supervised:
    """One service child and its restart bookkeeping."""

    name: str
    module: str
    process: ServerProcess | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


@dataclass
class Stack:
    """The processes one ``shoal up`` owns; ``stop`` ends all of them, however far the start got."""

    layout: StateLayout
    servers: list[ServerProcess] = field(default_factory=list)
    services: dict[str, Supervised] = field(default_factory=dict)
    server_markers: dict[str, str] = field(default_factory=dict)
    # The services' environment, set once the plan is known; restarts reuse it.
    env: dict[str, str] = field(default_factory=dict)
    # Children that existed before this stack started anything (none from the CLI; some when run in-process).
    earlier_children: set[int] = field(default_factory=lambda: set(child_pids(os.getpid())))

    def record(self) -> None:
        processes = {server.name: (server.pid, self.server_markers[server.name]) for server in self.servers}
        for service in self.services.values():
            if service.process is not None:
                processes[service.name] = (service.process.pid, service.module)
        write_pids(self.layout, processes)

    def add_server(self, server: ServerProcess, marker: str) -> None:
        self.servers.append(server)
        self.server_markers[server.name] = marker
        self.record()

    def start_service(self, service: Supervised) -> None:
        service.process = spawn(service.name, service_argv(service.module, sys.executable),
                                self.layout.log(service.name), env=self.env, grace=SERVICE_GRACE_SECONDS)
        service.started_at = time.monotonic()
        service.restart_at = None
        self.record()

    def supervise_once(self, now: float, echo: Callable[[str], None]) -> None:
        """Fail on a dead server; schedule or perform the restart of a dead service."""
        for server in self.servers:
            if not server.alive():
                raise UpError(f"{server.name} exited with code {server.process.returncode}; "
                              f"see {server.log_path}")
        for service in self.services.values():
            process = service.process
            if service.restart_at is None and process is not None and not process.alive():
                code = process.process.returncode
                process.stop()  # closes its log file
                service.failures = failures_after_exit(service.failures, now - service.started_at)
                delay = restart_delay(service.failures)
                service.restart_at = now + delay
                echo(f"service {service.name} exited with code {code}; restarting in {delay:g} s "
                     f"(log: {process.log_path})")
            elif service.restart_at is not None and now >= service.restart_at:
                self.start_service(service)
                pid = service.process.pid if service.process is not None else 0
                echo(f"service {service.name} restarted (PID {pid})")

    def stop(self) -> None:
        """Services first (all signalled at once, then waited for), then servers in reverse start order."""
        running = [s.process for s in self.services.values() if s.process is not None]
        for process in running:
            if process.alive():
                process.process.send_signal(signal.SIGTERM)
        for process in running:
            process.stop()
        for server in reversed(self.servers):
            server.stop()
        stop_children(os.getpid(), spare=self.earlier_children)


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


@dataclass(frozen=True)
class Plan:
    """What this run will start and publish, worked out before any process starts."""

    nats: NatsConfig | None  # None: NATS_URL names an existing server
    seaweed: SeaweedConfig | None  # None: SHOAL_S3_ENDPOINT names an existing store
    nats_url: str
    s3: S3Access
    env: dict[str, str]
    settings: Settings
    commands: list[tuple[str, msgspec.Struct]]


def run_up(options: UpOptions, environ: Mapping[str, str]) -> None:
    """Everything ``shoal up`` does, until interrupted; returns normally after a clean stop."""
    layout = options.layout
    with _signals_interrupt():
        claim_pidfile(layout)
        # Created before anything starts, so whatever was started is stopped however far the start got.
        stack = Stack(layout)
        try:
            plan = _plan(options, environ)
            _launch(stack, plan)
            pids = {name: s.process.pid for name, s in stack.services.items() if s.process is not None}
            click.echo(banner(pid=os.getpid(), nats_url=plan.nats_url, nats_embedded=plan.nats is not None,
                              nats_monitor_port=options.ports.nats_monitor, s3=plan.s3,
                              seeded_objects=len(demo_objects()), services=pids, logs=layout.logs,
                              manifest=options.manifest, mounts=Path(plan.env["SHOAL_MOUNT_ROOT"])))
            while True:
                stack.supervise_once(time.monotonic(), _timestamped)
                time.sleep(SUPERVISE_INTERVAL_SECONDS)
        except KeyboardInterrupt:
            click.echo("\nStopping Shoal...", err=True)
        finally:
            _ignore_signals()
            stack.stop()
            release_pidfile(layout)
    click.echo("Shoal stopped.", err=True)


def _plan(options: UpOptions, environ: Mapping[str, str]) -> Plan:
    layout, ports = options.layout, options.ports
    external_nats = environ.get("NATS_URL", "").strip()
    external_s3 = environ.get("SHOAL_S3_ENDPOINT", "").strip()
    check_ports(ports_needed(ports, run_nats=not external_nats, run_s3=not external_s3))
    # Parse the manifest before starting anything: a broken one should cost no server start.
    try:
        docs = parse_documents(options.manifest.read_text())
    except ManifestError as err:
        raise UpError(f"{options.manifest}: {err}") from err
    commands, notes = demo_commands(docs, layout.root)
    for note in notes:
        _timestamped(f"{options.manifest.name}: {note}")

    nats = None if external_nats else NatsConfig(ports.nats, ports.nats_monitor, layout.nats_store)
    seaweed = None
    if external_s3:
        s3 = S3Access(external_s3, environ.get("SHOAL_S3_ACCESS_KEY_ID", ""),
                      environ.get("SHOAL_S3_SECRET_ACCESS_KEY", ""), embedded=False)
    else:
        seaweed = SeaweedConfig(layout.seaweedfs, s3_port=ports.s3, master_port=ports.seaweed_master,
                                volume_port=ports.seaweed_volume, filer_port=ports.seaweed_filer)
        s3 = S3Access(seaweed.endpoint, seaweed.access_key_id, seaweed.secret_access_key, embedded=True)
    nats_url = nats.url if nats is not None else external_nats
    env = service_env(environ, nats_url, s3, layout.mounts)
    try:
        settings = load_settings(env)
    except SettingsError as err:
        raise UpError(str(err)) from err
    return Plan(nats, seaweed, nats_url, s3, env, settings, commands)


def _launch(stack: Stack, plan: Plan) -> None:
    layout = stack.layout
    layout.logs.mkdir(parents=True, exist_ok=True)
    if plan.nats is not None:
        _timestamped(f"starting nats-server on {plan.nats_url}")
        stack.add_server(start_nats(plan.nats, layout.log("nats-server")), "nats-server")
    if plan.seaweed is not None:
        _timestamped(f"starting SeaweedFS S3 on {plan.s3.endpoint} (takes a few seconds)")
        stack.add_server(start_seaweedfs(plan.seaweed, layout.log("seaweedfs")), "weed")
    _timestamped("provisioning JetStream" + (", seeding the demo bucket" if plan.s3.embedded else "")
                 + " and applying the demo manifest")
    asyncio.run(prepare(plan.settings.nats, plan.s3, plan.commands))
    stack.env = plan.env
    for name, module in SERVICES.items():
        stack.services[name] = Supervised(name, module)
        stack.start_service(stack.services[name])


# --- The commands ---

_state_dir_option = click.option(
    "--state-dir", envvar="SHOAL_STATE_DIR", default=DEFAULT_STATE_DIR, show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where logs, the JetStream store, SeaweedFS data and pid files live.",
)


def _port_option(name: str, env: str, default: int, what: str) -> Callable[[Any], Any]:
    return click.option(name, envvar=env, default=default, show_default=True, type=click.IntRange(1, 65535),
                        help=f"{what} port on {LOOPBACK} (env {env}).")


_defaults = Ports()


@click.command()
@_state_dir_option
@_port_option("--nats-port", "SHOAL_NATS_PORT", _defaults.nats, "NATS client")
@_port_option("--nats-monitor-port", "SHOAL_NATS_MONITOR_PORT", _defaults.nats_monitor, "NATS monitoring")
@_port_option("--s3-port", "SHOAL_S3_PORT", _defaults.s3, "SeaweedFS S3")
@_port_option("--seaweed-master-port", "SHOAL_SEAWEED_MASTER_PORT", _defaults.seaweed_master,
              "SeaweedFS master (its gRPC uses +10000)")
@_port_option("--seaweed-volume-port", "SHOAL_SEAWEED_VOLUME_PORT", _defaults.seaweed_volume,
              "SeaweedFS volume (its gRPC uses +10000)")
@_port_option("--seaweed-filer-port", "SHOAL_SEAWEED_FILER_PORT", _defaults.seaweed_filer,
              "SeaweedFS filer (its gRPC uses +10000)")
@click.option("--manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=DEMO_MANIFEST,
              show_default=True, help="Dataset and Runtime documents applied once everything runs.")
def up(state_dir: Path, nats_port: int, nats_monitor_port: int, s3_port: int, seaweed_master_port: int,
       seaweed_volume_port: int, seaweed_filer_port: int, manifest: Path) -> None:
    """Run NATS, SeaweedFS S3 and every Shoal service on this machine, with a demo dataset; Ctrl-C stops all.

    An existing NATS is used instead when NATS_URL is set, an existing S3 when SHOAL_S3_ENDPOINT is set
    (with SHOAL_S3_ACCESS_KEY_ID and SHOAL_S3_SECRET_ACCESS_KEY).
    """
    ports = Ports(nats=nats_port, nats_monitor=nats_monitor_port, s3=s3_port, seaweed_master=seaweed_master_port,
                  seaweed_volume=seaweed_volume_port, seaweed_filer=seaweed_filer_port)
    options = UpOptions(StateLayout(state_dir.resolve()), ports, manifest.resolve())
    try:
        run_up(options, os.environ)
    except UpError as err:
        raise click.ClickException(str(err)) from err


@click.command()
@_state_dir_option
@click.option("--timeout", default=60.0, show_default=True, type=float,
              help="Seconds to wait for shoal up to stop everything.")
def down(state_dir: Path, timeout: float) -> None:
    """Stop a running `shoal up` (SIGTERM to the PID in <state-dir>/up.pid) and wait until it has exited."""
    layout = StateLayout(state_dir.resolve())
    pid = read_pid(layout.pidfile)
    if pid is None or not _is_shoal_up(pid):
        if pid is not None:
            layout.pidfile.unlink(missing_ok=True)
        stop_leftovers(layout)
        click.echo(f"shoal up is not running (state directory {layout.root}).")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"shoal up (PID {pid}) did not stop within {timeout:g} s; "
                                       f"see {layout.logs} and try again")
        time.sleep(0.1)
    click.echo(f"Stopped shoal up (PID {pid}).")


if __name__ == "__main__":  # ``python -m libs.cli.up``: the same command without the CLI group
    up()
