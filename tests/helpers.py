"""Test helpers: waiting on conditions (never sleeping), running services in-process, reading state."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import io
import json
import logging
import os
import socket
import time
import urllib.request
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import structlog
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import subjects, telemetry
from libs.bus import OBJECT_META_PREFIX, Bus, KvMirror, kv_load, kv_save
from libs.cli.stack.prometheus import PrometheusConfig, start_prometheus
from libs.config import NatsSettings, S3Settings, Secret, ServiceSettings, Settings
from libs.embedded import LOOPBACK, PortTaken, ServerProcess, free_port
from libs.events.agent import AgentHeartbeat, MountReport, group_mounts, peer_url
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import RuntimeRecord
from services.agent import domain as agent_domain

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 15.0,
                     what: str = "condition", tolerate: tuple[type[Exception], ...] = ()) -> T:
    """Poll ``probe`` until it returns a truthy value; fail with the last value after ``timeout``. An exception of
    a ``tolerate`` type counts as "not yet" (e.g. a NATS request of the probe itself while a cluster elects)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except tolerate as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s; last value: {last!r}")


class ReservedPort:
    """A loopback port held by a bound socket that does not listen, until the server of this process that is to
    serve it takes the socket (``take``): connections meanwhile are refused, and no other process can bind it.
    A port ``free_port`` found free and let go of could be taken meanwhile by another worker's server (the suite
    runs in 4 processes), which would then answer in the place of this one.

    ``again``: the port a server of this process just stopped listening on, held again. When connections it
    closed linger in TIME_WAIT there, only a socket that allows address reuse can bind it; a process binding the port
    with address reuse too (Go servers do) could then still take it."""

    def __init__(self, again: int = 0) -> None:
        try:
            sock = _bound(again, reuse=False)
        except OSError as err:
            if not again or err.errno != errno.EADDRINUSE:
                raise
            sock = _bound(again, reuse=True)
        self.port = int(sock.getsockname()[1])
        self._socket: socket.socket | None = sock
        # Closed when the holder is gone without a server having taken it (an unclosed socket warns: an error).
        self._release = weakref.finalize(self, sock.close)

    def take(self) -> socket.socket:
        """The bound socket, for a server to listen on (it closes it when it stops); once. It allows address reuse
        from now on, as asyncio's servers' sockets do: the connections it accepts inherit that, so once it stops,
        the port can be held again while they close."""
        if self._socket is None:
            raise RuntimeError(f"port {self.port} was taken already")
        sock, self._socket = self._socket, None
        self._release.detach()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock


def _bound(port: int, reuse: bool) -> socket.socket:
    sock = socket.socket()
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


def start_prometheus_on_a_free_port(binary: str, config_on: Callable[[int], PrometheusConfig],
                                    services: Mapping[str, int], log_path: Path,
                                    attempts: int = 3) -> tuple[PrometheusConfig, ServerProcess]:
    """``start_prometheus`` with ``config_on(port)`` for a port chosen now, chosen again (``attempts`` in all) when
    another process took it before Prometheus bound it (Prometheus cannot listen on port 0 and say which it got).
    The Prometheus answering must be this one (its ``config.file``): another worker's, on the port this one could
    not bind, answers ``/-/ready`` too before this one has exited."""
    for attempt in range(1, attempts + 1):
        config = config_on(free_port())
        try:
            server = start_prometheus(binary, config, services, log_path)
        except PortTaken:
            if attempt == attempts:
                raise
            continue
        if _prometheus_config_file(config.port) == str(config.config_path):
            return config, server
        server.stop()
        if attempt == attempts:
            raise PortTaken("prometheus", server.process.returncode or 0, log_path,
                            f"another Prometheus answers on port {config.port}")
    raise AssertionError("attempts must be at least 1")


def _prometheus_config_file(port: int) -> str | None:
    """The configuration file of the Prometheus answering on ``port``."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/v1/status/flags", timeout=5) as response:
            return str(json.load(response)["data"].get("config.file"))
    except (OSError, ValueError, KeyError):
        return None


def object_meta_subject(name: str, bucket: str = subjects.OBJ_MANIFESTS) -> str:
    """The subject of object ``name``'s meta message in an Object Store, as nats-py writes it."""
    return OBJECT_META_PREFIX.format(bucket=bucket) + base64.urlsafe_b64encode(name.encode()).decode()


def pending_reads_zero(monkeypatch: pytest.MonkeyPatch, *subjects: str) -> None:
    """The messages on ``subjects`` say nothing is pending after them, as a message's count can read while other
    messages are written (nats-io/nats.py#995); the others say what the server counted. nats-py takes such a message
    for the end of a watch's initial entries: its listings stop there."""
    metadata = Msg.metadata

    def early(self: Msg) -> Msg.Metadata:
        read = metadata.fget(self)  # type: ignore[attr-defined]
        return dataclasses.replace(read, num_pending=0) if self.subject in subjects else read

    monkeypatch.setattr(Msg, "metadata", property(early))


async def cancel_and_wait(*tasks: asyncio.Task[Any], timeout: float = 20.0) -> None:
    """Cancel ``tasks`` and wait until each has ended. nats-py swallows a cancellation that lands in its publish
    flush (``Client._flush_pending`` catches ``CancelledError``), so a task that loops over NATS calls may go on
    after one cancel, for ever: cancel again until it ends."""
    deadline = time.monotonic() + timeout
    while pending := [task for task in tasks if not task.done()]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} task(s) still running {timeout} s after their cancellation")
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.2)


def make_settings(nats_url: str, s3_endpoint: str = "", access_key: str = "", secret_key: str = "",
                  **service: Any) -> Settings:
    return Settings(
        nats=NatsSettings(urls=[nats_url]),
        s3=S3Settings(endpoint=s3_endpoint, access_key_id=Secret(access_key), secret_access_key=Secret(secret_key),
                      secrets_dir=service.pop("secrets_dir", "")),
        # Tests mount tmp folders through local://; the tests of SHOAL_LOCAL_ROOTS pass their own roots.
        service=ServiceSettings(log_format="json", **{"local_roots": ["/"], **service}),
    )


@asynccontextmanager
async def running(*runs: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run service ``run`` coroutines as tasks; stop them cleanly (and surface their errors) on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run(stop)) for run in runs]
    try:
        yield
    finally:
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def dataset_record(bus: Bus, name: str, namespace: str = "default") -> DatasetRecord | None:
    kv = await bus.kv(subjects.KV_DATASETS)
    record, _ = await kv_load(kv, subjects.resource_key(namespace, name), DatasetRecord)
    return record


def unsynced_dataset(name: str, namespace: str = "default") -> DatasetRecord:
    """A Dataset's record as the dataset service first writes it: never listed, so not Bound and mounted nowhere.
    Enough for its runtime, which picks cache workers only while a Dataset of its name exists."""
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name=name, namespace=namespace),
                                         spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{name}/")])), generation=1)


async def put_unsynced_dataset(bus: Bus, name: str, namespace: str = "default") -> None:
    """Write ``unsynced_dataset`` into the datasets bucket, as the dataset service would on an apply."""
    await kv_save(await bus.kv(subjects.KV_DATASETS), subjects.resource_key(namespace, name),
                  unsynced_dataset(name, namespace), None)


async def runtime_record(bus: Bus, name: str, namespace: str = "default") -> RuntimeRecord | None:
    kv = await bus.kv(subjects.KV_RUNTIMES)
    record, _ = await kv_load(kv, subjects.resource_key(namespace, name), RuntimeRecord)
    return record


def unwatched_mirror(kv: Any, type_: type[T]) -> KvMirror[T]:
    """A view for handlers a test drives directly: ready at once and never watching (the handlers keep it current
    as they write)."""
    mirror = KvMirror(kv, type_)
    mirror.ready.set()
    return mirror


class FactCollector:
    """Collects every fact published on a subject filter through a core subscription, decoded as JSON."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def start(self, bus: Bus, subject: str = subjects.ALL_FACTS) -> None:
        async def collect(msg: Any) -> None:
            self.events.append(msgspec.json.decode(msg.data))

        self._sub = await bus.nc.subscribe(subject, cb=collect)

    def of_type(self, tag: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == tag and all(e.get(k) == v for k, v in match.items())]

    async def wait_for(self, tag: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            found = self.of_type(tag, **match)
            return found[-1] if found else None

        return await eventually(probe, timeout, f"{tag} {match}")


@contextmanager
def json_logs(monkeypatch: pytest.MonkeyPatch, level: str = "info", fmt: str = "json") -> Iterator[io.StringIO]:
    """This process's log lines through the processes' own set-up (``setup_logging``), as JSON (or ``fmt``:
    ``console``, as on a terminal) into the returned buffer while the block runs; structlog's and logging's
    configuration are restored afterwards."""
    buffer = io.StringIO()
    root = logging.getLogger()
    root_level = root.level
    # As if configured before: loggers are not cached, so nothing keeps writing to the buffer after the block.
    monkeypatch.setattr(telemetry, "_configured_logging", True)
    telemetry.setup_logging(level, fmt, file=buffer)
    try:
        yield buffer
    finally:
        structlog.reset_defaults()
        for handler in [h for h in root.handlers if isinstance(h, telemetry._StructlogHandler)]:
            root.removeHandler(handler)
        root.setLevel(root_level)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``text`` (other output left out)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


@contextmanager
def spans_in_memory() -> Iterator[InMemorySpanExporter]:
    """Every span of this process goes to the returned exporter while the block runs."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Tracers resolve the global provider when first used (the bus's, the consumers', the handlers' are made when
    # their objects are): swapping it for the test only leaves other tests' providers alone.
    original = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        yield exporter
    finally:
        trace._TRACER_PROVIDER = original
        provider.shutdown()


def agent_shaped_heartbeat(count: int, name_length: int = 20, *, peers: bool = True, failures: int = 3,
                           node: str = "ip-10-1-2-3.ec2.internal",
                           interval_seconds: float = 2.0) -> tuple[AgentHeartbeat, list[MountReport]]:
    """A heartbeat as the agent builds it (``NodeAgent.heartbeat``, before ``fit_heartbeat``) for ``count`` datasets
    ``d<i>xxx...`` (``name_length`` characters), each with its runtime, in the namespaces default, ml-team and vision
    (``i % 3``): serving with peer port 40000 + i, starting when ``i % 10 == 3``, failing when ``i % 50 == 7``
    (``failures`` times in a row: a problem of the node from 3 on); and the mounts' reports."""
    reports: list[tuple[MountReport, int]] = []
    for i in range(count):
        ref = ObjectRef(name=f"d{i:05d}".ljust(name_length, "x"), namespace=("default", "ml-team", "vision")[i % 3])
        alive, exit_code = (i % 50 != 7), (1 if i % 50 == 7 else None)
        reports.append((agent_domain.mount_report(
            ref, alive=alive, mounted=i % 10 != 3, exit_code=exit_code, failures=failures,
            peer_url=peer_url("10.1.2.3", 40000 + i) if peers else "", unhealthy=not alive and failures >= 3),
            40000 + i if peers else 0))
    runtimes = [report.dataset for report, _ in reports]
    problems = [f"mount {r.dataset.namespace}/{r.dataset.name} keeps failing (exit code 1, {failures} times in a row)"
                for r, _ in reports if r.state == "Failing" and failures >= 3]
    beat = AgentHeartbeat(node=node, runtimes=runtimes, all_runtimes=True, healthy=not problems, mount_health=True,
                          problems=agent_domain.capped_problems(problems), sent_at=time.time(),
                          interval_seconds=interval_seconds, capacity_bytes=1 << 40,
                          mount_groups=group_mounts(reports), labels={"zone": "a"},
                          peer_host="10.1.2.3" if peers else "")
    return beat, [report for report, _ in reports]


def nest_beyond_path_max(folder: str, leaf: bytes) -> None:
    """Folders of 250-byte names below ``folder``, one in another until the path passes Linux's PATH_MAX (4096
    bytes), with a file ``leaf.txt`` holding ``leaf`` at the bottom. Made through descriptors (``mkdirat``), since
    no call taking the whole path accepts it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(4096 // 251 + 1):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        file = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        try:
            os.write(file, leaf)
        finally:
            os.close(file)
    finally:
        os.close(fd)


KV_READS = ("get", "keys", "history")


class CountingKv:
    """A KeyValue that counts its reads (``KV_READS``: each a NATS request), by bucket, into a shared Counter."""

    def __init__(self, kv: Any, bucket: str, reads: Counter[str]) -> None:
        self._kv = kv
        self._bucket = bucket
        self._reads = reads

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._kv, name)
        if name not in KV_READS:
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._reads[self._bucket] += 1
            return await attribute(*args, **kwargs)

        return counted


def counting_connect(app: Any, reads: Counter[str]) -> Any:
    """A stand-in for ``app.connect`` (a service's app module, monkeypatched) whose Bus hands out ``CountingKv``."""
    real_connect = app.connect

    async def connect(settings: Any, name: str, **options: Any) -> Bus:
        bus = await real_connect(settings, name, **options)
        real_kv = bus.kv

        async def kv(bucket: str) -> Any:
            return CountingKv(await real_kv(bucket), bucket, reads)

        bus.kv = kv
        return bus

    return connect
