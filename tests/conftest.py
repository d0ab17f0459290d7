"""Shared fixtures: a real nats-server with JetStream per test, one real SeaweedFS S3 server per session, and a
three-server JetStream cluster per module that asks for one (``nats_cluster``, tests/nats_cluster.py).

Both are started from the pinned wheels on free loopback ports and stopped by PID even when a test fails.
Tests that need more from the machine (FUSE, fio, sysfs) say so with ``@pytest.mark.needs`` (tests/requirements.py).
"""

from __future__ import annotations

import compileall
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from libs.bus import Bus, connect
from libs.config import NatsSettings, Secret, Settings
from libs.embedded import (
    LOOPBACK,
    NatsConfig,
    SeaweedConfig,
    ServerProcess,
    start_nats,
    start_nats_on_any_ports,
    start_seaweedfs_on_free_ports,
)
from libs.ufs.base import S3Location
from tests.helpers import make_settings
from tests.nats_cluster import NatsCluster
from tests.requirements import require


def pytest_configure(config: pytest.Config) -> None:
    """Compile Shoal's modules to bytecode once per run (in the controller, not in each xdist worker). With
    PYTHONDONTWRITEBYTECODE set, Python never writes them itself, and every process a test starts (mount
    processes, services, the CLI) would compile ~100 modules from source: ~0.15 s of CPU each. Up-to-date files
    are only stat'ed; a stale one is rewritten (Python ignores a stale one anyway)."""
    if hasattr(config, "workerinput"):
        return
    root = Path(__file__).resolve().parent.parent
    for package in ("libs", "services"):
        compileall.compile_dir(root / package, quiet=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.soak(why)``: a long fault test, run by ``make soak`` (``SHOAL_SOAK=1``) only. ``make test``
    deselects it (counted as deselected, not skipped: nothing it shows is missing, it runs elsewhere)."""
    if os.environ.get("SHOAL_SOAK"):
        return
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if item.get_closest_marker("soak") is None]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs("fuse", ...)``: fail with one clear message when the machine lacks a requirement."""
    for marker in item.iter_markers("needs"):
        require(*marker.args)


class NatsServer:
    def __init__(self, config: NatsConfig, process: ServerProcess, logs: Path) -> None:
        self.config = config
        self.process: ServerProcess | None = process
        self.url = config.url
        self.logs = logs
        self.starts = 1

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def start(self) -> None:
        """Start the server again, same port and JetStream store; the fixture stops it after the clients close."""
        assert self.process is None, "stop the server first"
        self.starts += 1
        self.process = start_nats(self.config, self.logs / f"nats-{self.starts}.log")

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port where nothing listens, for the whole test: bound and never listening, so a connection is
    refused and no other process can take it. A port ``free_port`` found free and let go of could be bound a moment
    later by another worker's server (the suite runs in 4 processes), which would then answer a test that expects
    "connection refused"."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server for one test. Tests that restart it use ``stop``/``start``/``restart``, never a process of
    their own: the clients (``bus``) are closed while it still runs, then the fixture stops it."""
    # Ports the server chooses itself: one free_port chose could be bound by another worker's server before this one
    # bound it, and that server's /healthz would answer for it. A restart takes the same ports again.
    config, process = start_nats_on_any_ports(NatsConfig(port=0, monitor_port=0, store_dir=tmp_path / "jetstream"),
                                              tmp_path / "nats.log")
    server = NatsServer(config, process, tmp_path)
    try:
        yield server
    finally:
        server.stop()


class SeaweedServer:
    def __init__(self, config: SeaweedConfig, process: ServerProcess) -> None:
        self.config = config
        self.process = process
        self.endpoint = config.endpoint

    def location(self, bucket: str, prefix: str = "") -> S3Location:
        return S3Location(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=self.endpoint,
            access_key_id=Secret(self.config.access_key_id),
            secret_access_key=Secret(self.config.secret_access_key),
        )

    def client(self):
        """An aiobotocore S3 client context manager for seeding and checking buckets."""
        return get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.config.access_key_id,
            aws_secret_access_key=self.config.secret_access_key,
        )


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    config, process = start_seaweedfs_on_free_ports(data_dir / "data", data_dir / "seaweedfs.log")
    try:
        yield SeaweedServer(config, process)
    finally:
        process.stop()


@pytest.fixture
async def bucket(seaweedfs: SeaweedServer) -> AsyncIterator[str]:
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    async with seaweedfs.client() as client:
        await client.create_bucket(Bucket=name)
    yield name


async def put_objects(seaweedfs: SeaweedServer, bucket: str, objects: dict[str, bytes], concurrency: int = 32) -> None:
    import asyncio

    semaphore = asyncio.Semaphore(concurrency)
    async with seaweedfs.client() as client:

        async def put(key: str, body: bytes) -> None:
            async with semaphore:
                await client.put_object(Bucket=bucket, Key=key, Body=body)

        # SeaweedFS keeps a file "x" beside "x/y" only when the two are not created at the same moment: a file
        # that shadows a folder goes in after everything else.
        folders = {key[:at] for key in objects for at, char in enumerate(key) if char == "/"}
        shadowing = folders & objects.keys()
        await asyncio.gather(*(put(key, body) for key, body in objects.items() if key not in shadowing))
        await asyncio.gather(*(put(key, objects[key]) for key in shadowing))


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A provisioned connection to the test's nats-server."""
    connection = await connect(NatsSettings(urls=[nats_server.url]), "shoal-tests")
    await connection.provision()
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def settings(nats_server: NatsServer, seaweedfs: SeaweedServer) -> Settings:
    return make_settings(nats_server.url, seaweedfs.endpoint, seaweedfs.config.access_key_id,
                         seaweedfs.config.secret_access_key)


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-servers forming one JetStream cluster, shared by a module's tests (starting them is the cost);
    each test names its resources apart. Every server is stopped by PID at the end, also after a failure, and a
    test may kill one (``kill``) and start it again (``restart``)."""
    cluster = NatsCluster.start(tmp_path_factory.mktemp("nats-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
