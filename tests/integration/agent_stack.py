"""A whole node for agent tests: dataset and runtime services and the node agent, in-process, over a real
nats-server and SeaweedFS; the agent's mount processes are real processes with real FUSE mounts.
``cluster_stack``: the same with several agents (nodes) on one machine, each with its own node name, mount root,
cache folder and labels, and one shared peer secret, so their mount processes read from each other.

Reads of a mount in tests always run in a thread or a subprocess: the test's own event loop serves the services
(and any fault proxy), so a blocking read on it would wait for itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from libs import subjects
from libs.bus import Bus
from libs.config import AgentSettings, Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetResync, DatasetSpec, Mount, User
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.side_server import Readiness
from libs.ufs import open_store
from services.agent import app as agent_app
from services.agent.metrics import target_path
from services.dataset import app as dataset_app
from services.dataset.sync import StoreOpener
from services.runtime import app as runtime_app
from tests.conftest import SeaweedServer
from tests.helpers import dataset_record, eventually, running, runtime_record
from tests.requirements import require

NODE = "node-a"


def mounted_paths() -> set[str]:
    with open("/proc/self/mountinfo") as mounts:
        return {line.split()[4] for line in mounts if len(line.split()) > 4}


def agent_env(settings: Settings, seaweedfs: SeaweedServer, agent: AgentSettings) -> dict[str, str]:
    return {
        **os.environ,
        "NATS_URL": ",".join(settings.nats.urls),
        "SHOAL_S3_ENDPOINT": seaweedfs.endpoint,
        "SHOAL_S3_ACCESS_KEY_ID": seaweedfs.config.access_key_id,
        "SHOAL_S3_SECRET_ACCESS_KEY": seaweedfs.config.secret_access_key,
        "SHOAL_NODE_NAME": agent.node_name,
        "SHOAL_MOUNT_ROOT": agent.mount_root,
        "SHOAL_CACHE_POLICY": agent.cache_policy,
        "SHOAL_LOCAL_ROOTS": ",".join(settings.service.local_roots),
        "SHOAL_MOUNT_ALLOW_OTHER": str(agent.allow_other).lower(),
        "SHOAL_LOG_FORMAT": "json",
    }


def _live(path: Path) -> bool:
    """Whether a live process serves the mount at ``path``. A killed one's mount still answers ``stat`` from the
    kernel's cached entries and attributes (a file looks present until its open fails with ENOTCONN); ``statfs``
    always asks the process."""
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


async def wait_visible(bus: Bus, name: str, path: Path, expect: str | None, timeout: float) -> None:
    """Wait until ``path`` is a mount (with ``expect``, a relative path, visible in it); on timeout the error
    carries the dataset's and runtime's status, which say why."""
    async def visible() -> bool:
        if str(path) not in mounted_paths() or not await asyncio.to_thread(_live, path):
            return False
        return expect is None or await asyncio.to_thread(os.path.exists, path / expect)

    try:
        await eventually(visible, timeout=timeout, what=f"{path} mounted")
    except AssertionError as err:
        record = await dataset_record(bus, name)
        runtime = await runtime_record(bus, name)
        raise AssertionError(f"{err}; dataset status: {record and record.status}; "
                             f"runtime status: {runtime and runtime.status}") from None


@dataclass
class Node:
    bus: Bus
    settings: Settings
    seaweedfs: SeaweedServer
    mount_root: Path
    cache_dir: Path
    opener: StoreOpener = open_store

    def mountpoint(self, name: str, namespace: str = "default") -> Path:
        return self.mount_root / namespace / name

    async def apply(self, name: str, bucket: str, *, mem: str | None = None, ssd: str | None = "256Mi",
                    block_size: str = "1Mi", endpoint: str = "", prefix: str = "", owner: User | None = None,
                    mount_point: str = "") -> None:
        """Apply a runtime and a dataset of ``bucket`` (S3 under ``prefix``), or of ``mount_point`` if given."""
        levels = []
        if mem:
            levels.append(Level(mediumtype="MEM", quota=mem))
        if ssd:
            levels.append(Level(mediumtype="SSD", quota=ssd, path=str(self.cache_dir), high="0.95", low="0.8"))
        runtime = Runtime(metadata=ObjectMeta(name=name),
                          spec=RuntimeSpec(tieredstore=TieredStore(levels=levels), block_size=block_size))
        options = {"endpoint": endpoint} if endpoint else {}
        dataset = Dataset(metadata=ObjectMeta(name=name),
                          spec=DatasetSpec(mounts=[Mount(mount_point=mount_point or f"s3://{bucket}/{prefix}",
                                                         options=options)],
                                           owner=owner))
        await self.bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
        await self.bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))

    async def resync(self, name: str) -> None:
        before = await dataset_record(self.bus, name)
        assert before is not None
        await self.bus.publish(subjects.DATASET_RESYNC, DatasetResync(name=name))

        async def resynced() -> DatasetRecord | None:
            record = await dataset_record(self.bus, name)
            return record if record and record.status.synced_requests > before.status.synced_requests else None

        await eventually(resynced, what=f"{name} resynced")

    async def wait_mounted(self, name: str, expect: str | None = None, timeout: float = 30.0) -> Path:
        """Wait until the dataset is mounted (and ``expect``, a relative path, is visible in it)."""
        path = self.mountpoint(name)
        await wait_visible(self.bus, name, path, expect, timeout)
        return path

    async def dataset_service_run(self, stop: asyncio.Event) -> None:
        await dataset_app.run(self.settings, stop, opener=self.opener)

    def dataset_service(self) -> AbstractAsyncContextManager[None]:
        """The dataset service, running until the block is left (for stacks made with ``dataset_service=False``)."""
        return running(self.dataset_service_run)

    async def record(self, name: str) -> DatasetRecord:
        record = await dataset_record(self.bus, name)
        assert record is not None
        return record


async def read_file(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def run_tool(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """An ordinary tool (cat, md5sum, find, fio) run against the mount, off the event loop."""
    return await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, text=True, check=check,
                                   timeout=120)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@asynccontextmanager
async def node_stack(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, tmp_path: Path,
                     dataset_service: bool = True, opener: StoreOpener = open_store,
                     mount_env: dict[str, str] | None = None, readiness: Readiness | None = None,
                     **agent_options: Any) -> AsyncIterator[Node]:
    """The node; with ``dataset_service=False`` the test runs the dataset service itself (``node.dataset_service``).
    ``opener`` gives the dataset service's stores for listing (the agent always reads the real ones);
    ``mount_env``: variables added to the mount processes' environment; ``readiness``: the agent's checks."""
    require("fuse")
    agent = AgentSettings(node_name=NODE, mount_root=str(tmp_path / "mnt"), heartbeat_seconds=0.5, **agent_options)
    node_settings = dataclasses.replace(settings, agent=agent)
    env = {**agent_env(node_settings, seaweedfs, agent), **(mount_env or {})}
    node = Node(bus, node_settings, seaweedfs, tmp_path / "mnt", tmp_path / "cache", opener)
    try:
        services = [
            lambda stop: runtime_app.run(node_settings, stop),
            lambda stop: agent_app.run(node_settings, stop, child_env=env, readiness=readiness),
        ]
        if dataset_service:
            services.insert(0, node.dataset_service_run)
        async with running(*services):
            yield node
        leftovers = [p for p in mounted_paths() if p.startswith(str(node.mount_root))]
        assert not leftovers, f"the agent left mounts behind: {leftovers}"
    finally:
        for path in [p for p in mounted_paths() if p.startswith(str(node.mount_root))]:
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


@dataclass
class ClusterAgent:
    """One node of a ``cluster_stack``: an in-process agent, stopped on its own with ``Cluster.stop_agent``."""

    name: str
    settings: Settings
    mount_root: Path
    stop: asyncio.Event
    task: asyncio.Task[None]

    def mountpoint(self, name: str, namespace: str = "default") -> Path:
        return self.mount_root / namespace / name


@dataclass
class Cluster:
    bus: Bus
    settings: Settings
    seaweedfs: SeaweedServer
    tmp_path: Path
    # The runtime's tier path; each agent keeps its blocks in <cache_dir>/<node name>/ (SHOAL_CACHE_SUBDIR).
    cache_dir: Path
    secret_file: Path
    agents: dict[str, ClusterAgent] = dataclasses.field(default_factory=dict)

    def start_agent(self, name: str, labels: Mapping[str, str] | None = None) -> ClusterAgent:
        require("fuse")
        agent = AgentSettings(node_name=name, mount_root=str(self.tmp_path / name / "mnt"), heartbeat_seconds=0.5,
                              labels=dict(labels or {}), cache_subdir=name, peer_secret_file=str(self.secret_file))
        node_settings = dataclasses.replace(self.settings, agent=agent)
        env = agent_env(node_settings, self.seaweedfs, agent)
        stop = asyncio.Event()
        task = asyncio.create_task(agent_app.run(node_settings, stop, child_env=env))
        started = self.agents[name] = ClusterAgent(name, node_settings, Path(agent.mount_root), stop, task)
        return started

    async def stop_agent(self, name: str) -> None:
        """Stop one agent as its node going away would: its mount processes stop, its heartbeats end."""
        agent = self.agents[name]
        agent.stop.set()
        await asyncio.wait_for(agent.task, 30)

    async def wait_mounted(self, name: str, expect: str, nodes: list[str] | None = None,
                           timeout: float = 30.0) -> None:
        """Wait until every running agent (or ``nodes``) mounts dataset ``name`` with ``expect`` visible in it."""
        for node in nodes or [n for n, a in self.agents.items() if not a.task.done()]:
            await wait_visible(self.bus, name, self.agents[node].mountpoint(name), expect, timeout)


@asynccontextmanager
async def cluster_stack(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, tmp_path: Path,
                        nodes: Mapping[str, Mapping[str, str]]) -> AsyncIterator[Cluster]:
    """The dataset and runtime services in-process and one agent per entry of ``nodes`` (node name: labels),
    sharing a peer secret file; more can be started (``Cluster.start_agent``) and stopped (``stop_agent``).
    Every agent is stopped and every mount under ``tmp_path`` removed on exit, also on failure."""
    require("fuse")
    secret = tmp_path / "peer.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    cluster = Cluster(bus, settings, seaweedfs, tmp_path, tmp_path / "cache", secret)
    try:
        async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)):
            try:
                for name, labels in nodes.items():
                    cluster.start_agent(name, labels)
                yield cluster
            finally:
                for agent in cluster.agents.values():
                    agent.stop.set()
                results = await asyncio.wait_for(
                    asyncio.gather(*(a.task for a in cluster.agents.values()), return_exceptions=True), 30)
            errors = [result for result in results if isinstance(result, BaseException)]
            if errors:
                raise errors[0]
        mounts = [a.mount_root for a in cluster.agents.values()]
        leftovers = [p for p in mounted_paths() if any(p.startswith(str(root)) for root in mounts)]
        assert not leftovers, f"the agents left mounts behind: {leftovers}"
    finally:
        for path in [p for p in mounted_paths() if p.startswith(str(tmp_path))]:
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


def drop_page_cache() -> None:
    """Make the next read of a mount reach the agent (and its cache) instead of the kernel page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_range(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


class InventoryWatch:
    """Every inventory event of the test node, in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def start(self, bus: Bus) -> None:
        async def collect(msg: Any) -> None:
            self.events.append(msgspec.json.decode(msg.data))

        await bus.nc.subscribe(subjects.agent_inventory(NODE), cb=collect)

    def latest(self, incarnation: str | None = None) -> dict[str, Any] | None:
        matching = [e for e in self.events if incarnation is None or e["incarnation"] == incarnation]
        return matching[-1] if matching else None


def mount_pids(mountpoint: Path) -> list[int]:
    """PIDs of the mount processes serving ``mountpoint`` (children the test's agent started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"services.agent.mountd" in argv and os.fsencode(mountpoint) in argv:
                pids.append(int(entry.name))
    return pids


def decode(data: bytes) -> Any:
    return msgspec.json.decode(data)


def evict_from_page_cache(path: Path) -> None:
    """Drop one file's pages from the kernel page cache, so its next read reaches the mount process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def target_port(targets_dir: Path, name: str, node: str = NODE, namespace: str = "default") -> int | None:
    """The side-server port a mount process names in its Prometheus file_sd target, or None while there is none."""
    try:
        (group,) = json.loads(target_path(str(targets_dir), node, namespace, name).read_text())
    except FileNotFoundError:
        return None
    assert group["labels"] == {"job": "shoal-mount", "node": node, "dataset": f"{namespace}/{name}"}, group
    (address,) = group["targets"]
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1", address
    return int(port)


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A process's /metrics over HTTP: (sample name, labels) → value."""
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.get(f"http://127.0.0.1:{port}/metrics") as response):
        assert response.status == 200
        text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels``; None when there is none."""
    found = [value for (sample, have), value in samples.items()
             if sample == name and set(labels.items()) <= have]
    return sum(found) if found else None
