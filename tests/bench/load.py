"""The control-plane load bench (``SHOAL_BENCH=load make bench``; ``--quick`` for a small size): another system
applies thousands of datasets at once (a burst), and separately at a steady rate, while simulated agents heartbeat
and publish inventory. Every dataset must reach its synced status fact (and Bound where its runtime is ready), none
lost or applied twice; the time from apply to that fact is reported as p50/p99, with the services' memory.

On a real nats-server (embedded, its own process) with the dataset service (``SHOAL_BENCH_LOAD_REPLICAS``
processes sharing its durable consumers and splitting the listings by replica name, ``libs.members``; default 2, one
per core of the machine the numbers in ``docs/benchmarks.md`` come from) and the runtime service as subprocesses,
the bench:

1. writes ``SHOAL_BENCH_LOAD_FOLDERS`` small local folders (default 1,000 of ``SHOAL_BENCH_LOAD_FILES`` = 4 files,
   kept under ``.shoal/bench/load-src`` for later runs); dataset *i* mounts ``local://<folder i mod folders>``.
   With ``SHOAL_BENCH_LOAD_SOURCE=s3`` the folders are prefixes of one bucket in an embedded SeaweedFS (uploaded at
   each run) and dataset *i* mounts ``s3://load/<folder>``;
2. starts ``SHOAL_BENCH_LOAD_AGENTS`` simulated agents (default 100): each heartbeats every 5 s (each at its own
   phase of the period, as agents started at different times do) naming the
   runtimes it serves (runtime *j* on agent *j mod agents*, its mount ``Serving``) and publishes an inventory
   snapshot of each such dataset with every beat (real agents' interval; inventory changes come about as often);
3. applies ``SHOAL_BENCH_LOAD_RUNTIMES`` runtimes (default 50 per phase, one per agent: the first datasets of the
   burst and of the steady phase) and waits until they are Ready, so those datasets must end Bound;
4. **burst**: publishes ``SHOAL_BENCH_LOAD_BURST`` ``dataset.apply`` commands (default 10,000) at once, up to
   ``PUBLISH_WINDOW`` in flight; rate = datasets / (last synced fact - first apply);
5. **steady**: publishes ``SHOAL_BENCH_LOAD_RATE`` applies per second (default 500) for
   ``SHOAL_BENCH_LOAD_SECONDS`` (default 20), each at its scheduled time. Each phase waits at most
   ``SHOAL_BENCH_LOAD_TIMEOUT`` seconds (600) for its last dataset; any left is a problem;
6. checks that every command got exactly one ``accepted`` fact in the facts stream (what a JetStream consumer sees;
   the same fact sent again with the same id, seen by a core subscription, is counted apart) and no ``rejected``
   one, that every record is at generation 1 and synced, and that the services listed each dataset exactly once
   (the sum over replicas of ``shoal_dataset_sync_duration_seconds_count``).

A dataset's latency is from just before its apply is published to the first status fact that says it is synced
(``MetadataSynced`` True for its generation) and, for one with a runtime, Bound; facts are read by a core NATS
subscription in this process. RSS of each service is sampled every 0.5 s (peak and at the end). CPU per dataset
is each process's CPU time over a phase; NATS messages per dataset, what each connection sent the server over it
(nats-server's ``/connz``, by connection name: the part of the server's work a service decides). The bench client
shares the machine's cores with the services: on 2 cores its own publishing and decoding is part of the cost.

``SHOAL_BENCH_LOAD_PROFILE=1`` records each service with py-spy (``<state-dir>/load-logs/<service>.spy``, raw
collapsed stacks of the thread holding the GIL, so a thread waiting for it does not count; the summary is printed).
``SHOAL_BENCH_LOAD_DOCS`` (default ``docs/benchmarks.md``; empty: none)
gets the "Load" section; results go to ``<state-dir>/load-results.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from libs import subjects
from libs.bus import Bus, connect, kv_keys, kv_load
from libs.config import NatsSettings
from libs.embedded import NatsConfig, SeaweedConfig, free_port, start_nats, start_seaweedfs
from libs.events.agent import AgentHeartbeat, CacheCounters, InventorySnapshot, MountReport
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from tests.bench.processes import PROJECT_ROOT, Child, cleanup, cpu_seconds, exclusive_run, run_then_stop
from tests.bench.report import console, print_targets, say, summarize_profile, targets_table, write_docs_section

NAMESPACE = "load"
S3_BUCKET = "load"  # with SHOAL_BENCH_LOAD_SOURCE=s3: the folders are its prefixes
PUBLISH_WINDOW = 1000  # applies in flight during the burst: enough to keep the server busy, bounded memory
# Real agents beat every 5 s (AgentHeartbeat.interval_seconds): 100 agents are 20 beats and, here, 20 inventory
# snapshots a second. Beating every second was tried: 100 beats and 100 snapshots a second outran the runtime
# service and the dataset service's inventory consumer on this 2-core machine before any dataset was applied.
BEAT_SECONDS = 5.0
ANNOUNCED_INTERVAL = BEAT_SECONDS
DOCS_BEGIN = "<!-- load-bench:begin (generated by `SHOAL_BENCH=load make bench`; edits here are overwritten) -->"
DOCS_END = "<!-- load-bench:end -->"
SYNCED = "MetadataSynced"


@dataclass
class LoadConfig:
    burst: int
    rate: int
    seconds: float
    agents: int
    runtimes: int
    folders: int
    files: int
    replicas: int
    docs: str
    profile: bool = False
    timeout: float = 600.0
    source: str = "local"  # or "s3"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], quick: bool = False) -> LoadConfig:
        def number(name: str, default: int) -> int:
            text = environ.get(f"SHOAL_BENCH_LOAD_{name}", "").strip()
            try:
                value = int(text) if text else default
            except ValueError:
                raise SystemExit(f"SHOAL_BENCH_LOAD_{name}={text!r}: expected a whole number") from None
            if value < 0:
                raise SystemExit(f"SHOAL_BENCH_LOAD_{name} must not be negative")
            return value

        config = cls(burst=number("BURST", 1000 if quick else 10_000), rate=number("RATE", 100 if quick else 500),
                     seconds=number("SECONDS", 5 if quick else 20), agents=number("AGENTS", 100),
                     runtimes=number("RUNTIMES", 20 if quick else 50), folders=number("FOLDERS", 1000),
                     files=number("FILES", 4), replicas=number("REPLICAS", 2),
                     docs=environ.get("SHOAL_BENCH_LOAD_DOCS", "docs/benchmarks.md").strip(),
                     profile=environ.get("SHOAL_BENCH_LOAD_PROFILE", "") not in ("", "0"),
                     timeout=float(number("TIMEOUT", 600)),
                     source=environ.get("SHOAL_BENCH_LOAD_SOURCE", "local").strip() or "local")
        if config.source not in ("local", "s3"):
            raise SystemExit(f"SHOAL_BENCH_LOAD_SOURCE={config.source!r}: expected local or s3")
        if config.folders < 1 or config.replicas < 1 or config.agents < 1:
            raise SystemExit("SHOAL_BENCH_LOAD_FOLDERS, _REPLICAS and _AGENTS must be at least 1")
        return config


# --- What the bench reads of the facts (a few fields: decoding every fact in full would cost the client more) ---


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""


class _Status(msgspec.Struct, rename="camel"):
    phase: str = ""
    synced_generation: int = 0
    conditions: list[_Condition] = []


class _Fact(msgspec.Struct):
    type: str = ""
    name: str = ""
    namespace: str = ""
    generation: int = 0
    causation_id: str = msgspec.field(default="", name="causationId")
    reason: str = ""
    status: _Status | None = None


_FACT = msgspec.json.Decoder(_Fact)


def synced(status: _Status, generation: int) -> bool:
    return status.synced_generation >= generation and any(
        c.type == SYNCED and c.status == "True" for c in status.conditions)


class _Binding(msgspec.Struct):
    phase: str = ""


class Tracker:
    """Every dataset fact, as a core NATS subscriber: accepted per command, rejections, and for each dataset the
    time of the first status fact that says it is done (synced, and Bound when it has a runtime)."""

    def __init__(self, bound: set[str]) -> None:
        self.bound = bound
        self.applied: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.accepted: Counter[str] = Counter()
        self.rejected: list[str] = []
        self.statuses = 0
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []

    async def on_fact(self, message: Any) -> None:
        now = time.perf_counter()
        fact = _FACT.decode(message.data)
        if fact.type.startswith("dataset.accepted"):
            self.accepted[fact.causation_id] += 1
        elif fact.type.startswith("dataset.rejected"):
            self.rejected.append(f"{fact.name}: {fact.reason}")
        elif fact.type.startswith("dataset.status") and fact.status is not None:
            self.statuses += 1
            if fact.name in self.done or fact.namespace != NAMESPACE:
                return
            if synced(fact.status, max(fact.generation, 1)) and (
                    fact.name not in self.bound or fact.status.phase == "Bound"):
                self.done[fact.name] = now
                self._wake(fact.name)

    def _wake(self, name: str) -> None:
        # Each waiter keeps the names it still waits for: a done dataset costs a set removal per waiter, not a
        # look at all of a 10,000-name wait (that made the bench client's own CPU grow with the square of a burst).
        for remaining, future in self._waiters:
            remaining.discard(name)
            if not remaining and not future.done():
                future.set_result(None)

    async def wait_all(self, names: list[str], timeout: float, what: str) -> None:
        missing = await self.wait_for(names, timeout)
        if missing:
            raise AssertionError(f"{what}: {len(missing)} of {len(names)} datasets not synced within {timeout:.0f} s "
                                 f"(e.g. {missing[:5]}); rejected: {self.rejected[:5]}")

    async def wait_for(self, names: list[str], timeout: float) -> list[str]:
        """Wait until every one of ``names`` is done; those that are not within ``timeout``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        remaining = set(names) - self.done.keys()
        if not remaining:
            return []
        waiter = (remaining, future)
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
        finally:
            self._waiters = [other for other in self._waiters if other is not waiter]
        return sorted(set(names) - self.done.keys())

    def latencies(self, names: list[str]) -> list[float]:
        return [self.done[name] - self.applied[name] for name in names]


# --- Simulated agents ---


def node_name(index: int) -> str:
    return f"load-node-{index:03d}"


class Agents:
    """``count`` agents: a heartbeat every ``BEAT_SECONDS`` naming the runtimes each serves, and a snapshot of each
    served dataset's inventory (counters growing, so the dataset service folds a change each time)."""

    def __init__(self, bus: Bus, count: int) -> None:
        self.bus, self.count = bus, count
        self.serves: dict[int, list[str]] = {i: [] for i in range(count)}
        self.beats = self.inventories = 0

    def serve(self, runtime_names: list[str]) -> None:
        for index, name in enumerate(runtime_names):
            self.serves[index % self.count].append(name)

    async def run(self, stop: asyncio.Event) -> None:
        # Each agent at its own phase of the beat period, as agents started at different times are: a hundred beats
        # and snapshots landing in the same instant every 5 s (all agents restarted at once) is another load.
        await asyncio.gather(*(self._agent(i, stop) for i in range(self.count)))

    async def _agent(self, index: int, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), BEAT_SECONDS * index / self.count)
        beat = 0
        while not stop.is_set():
            started = time.monotonic()
            beat += 1
            await self._beat(index, beat)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, BEAT_SECONDS - (time.monotonic() - started)))

    async def _beat(self, index: int, seq: int) -> None:
        node = node_name(index)
        refs = [ObjectRef(name=name, namespace=NAMESPACE) for name in self.serves[index]]
        mounts = [MountReport(dataset=ref, state="Serving") for ref in refs]
        beat = AgentHeartbeat(node=node, runtimes=refs, sent_at=time.time(), interval_seconds=ANNOUNCED_INTERVAL,
                              capacity_bytes=1 << 30, mounts=mounts,
                              labels={"topology.kubernetes.io/zone": f"zone-{index % 3}"})
        await self.bus.publish(subjects.agent_heartbeat(node), beat)
        self.beats += 1
        for ref in refs:
            snapshot = InventorySnapshot(node=node, dataset=ref, incarnation="bench", seq=seq,
                                         counters=CacheCounters(cached_bytes=seq << 20, capacity_bytes=1 << 30,
                                                                hit_bytes=seq << 16))
            await self.bus.publish(subjects.agent_inventory(node), snapshot)
            self.inventories += 1


# --- Services, memory ---


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Service:
    child: Child
    http_port: int
    peak_rss: int = 0

    def sample(self) -> int:
        rss = rss_bytes(self.child.pid)
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def metric(self, name: str) -> float:
        """The sum of every series of ``name`` on its /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (line[len(name)] in " {"))


def write_folders(root: Path, folders: int, files: int) -> None:
    """``folders`` folders of ``files`` small files each, unless they are there already."""
    marker = root / f".complete-{folders}x{files}"
    if marker.exists():
        return
    for index in range(folders):
        folder = root / f"f-{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(files):
            (folder / f"part-{number}.bin").write_bytes(b"x" * (1024 + number))
    marker.touch()


async def upload_folders(seaweed: SeaweedConfig, folders: int, files: int) -> None:
    """The folders as prefixes ``f-<i>/`` of bucket ``S3_BUCKET``, objects as ``write_folders`` makes them."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
            "s3", endpoint_url=seaweed.endpoint, region_name="us-east-1", aws_access_key_id=seaweed.access_key_id,
            aws_secret_access_key=seaweed.secret_access_key) as client:
        await client.create_bucket(Bucket=S3_BUCKET)
        keys = iter([(f"f-{index:05d}/part-{number}.bin", number)
                     for index in range(folders) for number in range(files)])

        async def put() -> None:
            for key, number in keys:
                await client.put_object(Bucket=S3_BUCKET, Key=key, Body=b"x" * (1024 + number))

        await asyncio.gather(*(put() for _ in range(16)))


def dataset_apply(name: str, mount_point: str) -> DatasetApply:
    return DatasetApply(id=f"load-apply-{name}", dataset=Dataset(
        metadata=ObjectMeta(name=name, namespace=NAMESPACE),
        spec=DatasetSpec(mounts=[Mount(mount_point=mount_point)])))


def runtime_apply(name: str) -> RuntimeApply:
    return RuntimeApply(id=f"load-runtime-{name}", runtime=Runtime(
        metadata=ObjectMeta(name=name, namespace=NAMESPACE),
        spec=RuntimeSpec(replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")]))))


class Load:
    """Drives one run against a NATS server whose dataset and runtime services run already (a bench or a test)."""

    def __init__(self, bus: Bus, facts: Bus, source: str, folders: int, agents: int) -> None:
        self.bus, self.facts, self.source, self.folders = bus, facts, source, folders
        self.tracker = Tracker(set())
        self.agents = Agents(bus, agents)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.not_ready = 0
        self.resent_accepted = 0

    def folder(self, index: int) -> str:
        """The mount point of dataset ``index``: ``source`` is ``local://<folder>`` or ``s3://<bucket>``."""
        return f"{self.source}/f-{index % self.folders:05d}"

    async def start(self) -> None:
        await self.facts.nc.subscribe(subjects.DATASET_FACTS, cb=self.tracker.on_fact)
        await self.facts.nc.flush()
        self._tasks.append(asyncio.create_task(self.agents.run(self._stop), name="agents"))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def runtimes(self, names: list[str], timeout: float) -> None:
        """Apply a runtime for each of ``names``, have the agents serve them, wait until each is Ready."""
        if not names:
            return
        ready: set[str] = set()
        all_ready = asyncio.Event()
        wanted = set(names)

        async def on_status(message: Any) -> None:
            fact = msgspec.json.decode(message.data)
            if fact.get("namespace") == NAMESPACE and fact.get("status", {}).get("phase") == "Ready":
                ready.add(fact["name"])
                if wanted <= ready:
                    all_ready.set()

        subscription = await self.facts.nc.subscribe(subjects.RUNTIME_STATUS, cb=on_status)
        try:
            self.tracker.bound.update(names)
            self.agents.serve(names)
            await asyncio.gather(*(self.bus.publish(subjects.RUNTIME_APPLY, runtime_apply(n)) for n in names))
            try:
                await asyncio.wait_for(all_ready.wait(), timeout)
            except TimeoutError:
                raise AssertionError(f"{len(wanted - ready)} of {len(names)} runtimes not Ready within "
                                     f"{timeout:.0f} s") from None
        finally:
            await subscription.unsubscribe()
        # Ready as the dataset service knows it (its binding), so the applies that follow find it.
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                binding, _ = await kv_load(bindings, subjects.resource_key(NAMESPACE, name), _Binding)
                if binding is not None and binding.phase == "Ready":
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the dataset service did not see runtime {name} Ready")
                await asyncio.sleep(0.1)  # polling the bucket, as tests.helpers.eventually does

    async def _apply(self, name: str, index: int) -> None:
        command = dataset_apply(name, self.folder(index))
        self.tracker.applied[name] = time.perf_counter()
        await self.bus.publish(subjects.DATASET_APPLY, command)

    async def burst(self, names: list[str], offset: int = 0) -> None:
        """Every apply at once, ``PUBLISH_WINDOW`` in flight."""
        window = asyncio.Semaphore(PUBLISH_WINDOW)

        async def one(index: int, name: str) -> None:
            async with window:
                await self._apply(name, offset + index)

        await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))

    async def steady(self, names: list[str], rate: float, offset: int = 0) -> float:
        """``rate`` applies per second, each at its scheduled time (not waiting for the previous one's ack);
        returns how late, at most, an apply was sent (the client's own lag)."""
        started = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        late = 0.0
        for index, name in enumerate(names):
            due = started + index / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)  # pacing the load, not synchronising with anything
            late = max(late, time.perf_counter() - due)
            task = asyncio.create_task(self._apply(name, offset + index))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        return late

    async def stored_accepted(self) -> Counter[str]:
        """The accepted facts in the facts stream, by the command they answer."""
        counts: Counter[str] = Counter()
        info = await self.bus.js.stream_info(subjects.STREAM_FACTS)
        last = info.state.last_seq
        subscription = await self.bus.js.subscribe(subjects.DATASET_ACCEPTED, ordered_consumer=True)
        try:
            while True:
                try:
                    message = await subscription.next_msg(timeout=5)
                except TimeoutError:
                    return counts  # nothing more of that subject up to the end of the stream
                counts[_FACT.decode(message.data).causation_id] += 1
                if message.metadata.sequence.stream >= last:
                    return counts
        finally:
            await subscription.unsubscribe()

    async def verify(self, names: list[str], settle: float = 30.0) -> list[str]:
        """What went wrong: a command accepted other than once, a rejection, a record not at generation 1 or not
        synced, a record the bench did not apply, a dataset with a runtime whose phase does not follow the
        runtime's as the dataset service knows it (Bound when Ready, NotBound when NotReady; given ``settle``
        seconds, as runtime facts may still be on their way). Whether it was Bound when it synced is in the
        tracker's facts; a runtime may go NotReady afterwards when its agents' beats come late on a busy machine
        (counted in ``self.not_ready``)."""
        problems = [f"rejected: {r}" for r in self.tracker.rejected[:10]]
        # Counted as a JetStream consumer of the facts sees them: an accepted fact sent again with the same id
        # (a publish whose ack came late on a busy machine, or a command delivered again and found applied) is
        # stored once. The core subscription's count of such resends is reported beside the problems.
        stored = await self.stored_accepted()
        counts = Counter(stored[f"load-apply-{n}"] for n in names)
        problems += [f"{count} datasets accepted {times} times" for times, count in counts.items() if times != 1]
        self.resent_accepted = sum(self.tracker.accepted[f"load-apply-{n}"] - 1 for n in names
                                   if self.tracker.accepted[f"load-apply-{n}"] > 1)
        kv = await self.bus.kv(subjects.KV_DATASETS)
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        prefix = f"{NAMESPACE}."
        keys = {k for k in await kv_keys(kv) if k.startswith(prefix)}
        expected = {f"{prefix}{n}" for n in names}
        if keys != expected:
            problems.append(f"records: {len(expected - keys)} missing, {len(keys - expected)} unexpected")
        semaphore = asyncio.Semaphore(256)
        deadline = time.monotonic() + settle
        self.not_ready = 0

        async def check(key: str) -> str | None:
            while True:
                async with semaphore:
                    record, _ = await kv_load(kv, key, DatasetRecord)
                if record is None:
                    return f"{key}: no record"
                status = record.status
                if record.generation != 1 or status.synced_generation != 1:
                    return f"{key}: generation {record.generation}, synced {status.synced_generation}"
                if not any(c.type == SYNCED and c.status == "True" for c in status.conditions):
                    return f"{key}: not synced ({status.message})"
                if record.dataset.metadata.name not in self.tracker.bound:
                    return None
                binding, _ = await kv_load(bindings, key, _Binding)
                phase = binding.phase if binding is not None else "NotReady"
                if (phase == "Ready") == (status.phase == "Bound") or phase == "PartialReady":
                    self.not_ready += phase != "Ready"
                    return None
                if time.monotonic() > deadline:
                    return f"{key}: {status.phase} while its runtime is {phase}"
                await asyncio.sleep(0.5)  # runtime facts on their way: polling, as tests.helpers.eventually does

        found = [p for p in await asyncio.gather(*(check(k) for k in sorted(expected & keys))) if p]
        return problems + found[:10] + ([f"... {len(found) - 10} more"] if len(found) > 10 else [])


def by_name_text(per: dict[str, float]) -> str:
    """``name value`` pairs (CPU ms or messages per dataset, by process or connection)."""
    return ", ".join(f"{name} {value:.2f}" for name, value in per.items())


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


@dataclass
class LoadBench:
    config: LoadConfig
    state: Path
    log_level: str = "warning"
    services: list[Service] = field(default_factory=list)
    runtime: Service | None = None
    results: dict[str, Any] = field(default_factory=dict)
    _nats: Any = None
    _nats_config: NatsConfig | None = None
    _spies: list[Child] = field(default_factory=list)
    _seaweed: Any = None

    def run(self) -> None:
        config = self.config
        source = self.state / "load-src"
        logs = self.state / "load-logs"
        logs.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        s3_env: dict[str, str] = {}
        if config.source == "s3":
            seaweed = SeaweedConfig.on_free_ports(self.state / f"load-seaweedfs-{os.getpid()}")
            self._seaweed = start_seaweedfs(seaweed, logs / "seaweedfs.log")
            asyncio.run(upload_folders(seaweed, config.folders, config.files))
            mounts = f"s3://{S3_BUCKET}"
            s3_env = {"SHOAL_S3_ENDPOINT": seaweed.endpoint, "SHOAL_S3_ACCESS_KEY_ID": seaweed.access_key_id,
                      "SHOAL_S3_SECRET_ACCESS_KEY": seaweed.secret_access_key}
        else:
            write_folders(source, config.folders, config.files)
            mounts = f"local://{source}"
        say(f"  {config.folders:,} {config.source} folders of {config.files} files in "
            f"{time.perf_counter() - started:.1f} s")
        nats_config = NatsConfig(port=free_port(), monitor_port=free_port(),
                                 store_dir=self.state / f"load-nats-{os.getpid()}")
        self._nats_config = nats_config
        self._nats = start_nats(nats_config, logs / "nats.log")
        env = {**os.environ, "NATS_URL": nats_config.url, "SHOAL_LOG_LEVEL": self.log_level,
               "SHOAL_LOG_FORMAT": "json", "SHOAL_LOCAL_ROOTS": str(source), "PYTHONPATH": str(PROJECT_ROOT),
               **s3_env}
        for index in range(config.replicas):
            port = free_port()
            child = Child(f"dataset-{index}", [sys.executable, "-m", "services.dataset"], logs / f"dataset-{index}.log",
                          env={**env, "SHOAL_HTTP_PORT": str(port), "SHOAL_REPLICA_NAME": f"dataset-{index}"})
            self.services.append(Service(child, port))
        port = free_port()
        self.runtime = Service(Child("runtime", [sys.executable, "-m", "services.runtime"], logs / "runtime.log",
                                     env={**env, "SHOAL_HTTP_PORT": str(port)}), port)
        if config.profile:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            for service in self._all():
                name = service.child.name
                argv = [spy, "record", "--format", "raw", "--rate", "50", "--nonblocking", "--gil", "--pid",
                        str(service.child.pid), "-o", str(logs / f"{name}.spy")]
                self._spies.append(Child(f"py-spy {name}", argv,
                      logs / f"py-spy-{name}.log", grace=30))
        self.results = asyncio.run(self._drive(nats_config.url, mounts))

    def stop(self) -> None:
        for spy in self._spies:  # py-spy writes its profile on SIGINT, while the service still runs
            with contextlib.suppress(ProcessLookupError):
                spy.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.proc.wait(30)
        self._spies.clear()
        cleanup()
        if self._nats is not None:
            self._nats.stop()
            self._nats = None
        if self._seaweed is not None:  # S3 folders are per run too
            self._seaweed.stop()
            shutil.rmtree(self.state / f"load-seaweedfs-{os.getpid()}", ignore_errors=True)
            self._seaweed = None
        if self._nats_config is not None:  # JetStream state is per run (the folders are kept)
            shutil.rmtree(self._nats_config.store_dir, ignore_errors=True)
            (self.state / f"nats-{self._nats_config.port}.conf").unlink(missing_ok=True)
            self._nats_config = None

    def _all(self) -> list[Service]:
        return [*self.services, *([self.runtime] if self.runtime else [])]

    def _cpu(self) -> dict[str, float]:
        """CPU seconds so far of each service, of nats-server and of this process (the client)."""
        found = {service.child.name: cpu_seconds([service.child.pid]) for service in self._all()}
        if self._nats is not None:
            found["nats-server"] = cpu_seconds([self._nats.process.pid])
        found["client"] = time.process_time()
        return found

    def _messages(self) -> dict[str, int]:
        """Messages each NATS client has sent the server so far, summed by connection name (``/connz``): what a
        dataset costs on the wire, the part of nats-server's CPU a service decides."""
        if self._nats_config is None:
            return {}
        url = f"http://127.0.0.1:{self._nats_config.monitor_port}/connz?limit=4096"
        with urllib.request.urlopen(url, timeout=10) as answer:
            connections = json.load(answer).get("connections") or []
        sent: Counter[str] = Counter()
        for connection in connections:
            sent[connection.get("name") or "unnamed"] += int(connection.get("in_msgs", 0))
        return dict(sent)

    def _messages_per(self, before: dict[str, int], datasets: int) -> dict[str, float]:
        """Messages sent per dataset since ``before``, by connection name (the services' names, the bench's)."""
        return {name: (sent - before.get(name, 0)) / max(1, datasets)
                for name, sent in sorted(self._messages().items()) if sent > before.get(name, 0)}

    def _cpu_per(self, before: dict[str, float], datasets: int) -> dict[str, float]:
        """CPU milliseconds per dataset since ``before``, by process: the number a busy machine does not move."""
        return {name: (seconds - before.get(name, 0.0)) * 1e3 / max(1, datasets)
                for name, seconds in self._cpu().items()}

    async def _sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for service in self._all():
                service.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _ready(self) -> None:
        deadline = time.monotonic() + 60
        for service in self._all():
            while True:
                if not service.child.alive():
                    raise RuntimeError(f"{service.child.name} exited:\n{service.child.log_tail()}")
                if await asyncio.to_thread(service.ready):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service.child.name} not ready within 60 s:\n{service.child.log_tail()}")
                await asyncio.sleep(0.1)

    async def _drive(self, url: str, source: str) -> dict[str, Any]:
        config = self.config
        bus = await connect(NatsSettings(urls=[url]), "load-bench")
        facts = await connect(NatsSettings(urls=[url]), "load-bench-facts")
        sampling = asyncio.Event()
        sampler = asyncio.create_task(self._sample(sampling))
        load = Load(bus, facts, source, config.folders, config.agents)
        try:
            await bus.provision()
            await self._ready()
            await load.start()
            burst = [f"burst-{i:05d}" for i in range(config.burst)]
            steady = [f"steady-{i:05d}" for i in range(int(config.rate * config.seconds))]
            await load.runtimes(burst[:config.runtimes] + steady[:config.runtimes], 300)
            say(f"  {min(config.runtimes, len(burst)) + min(config.runtimes, len(steady))} runtimes Ready on "
                f"{config.agents} agents")
            results: dict[str, Any] = {}
            if burst:
                cpu, sent = self._cpu(), await asyncio.to_thread(self._messages)
                began = time.perf_counter()
                await load.burst(burst)
                published = time.perf_counter() - began
                missing = await load.tracker.wait_for(burst, config.timeout)
                done = [n for n in burst if n in load.tracker.done]
                elapsed = max((load.tracker.done[n] for n in done), default=time.perf_counter()) - began
                latencies = load.tracker.latencies(done) or [float("nan")]
                results["burst"] = {"datasets": len(burst), "seconds": elapsed, "rate": len(done) / elapsed,
                                    "missing": missing,
                                    "publish_seconds": published, "p50": percentile(latencies, 0.5),
                                    "p99": percentile(latencies, 0.99), "max": max(latencies),
                                    "cpu_ms_per_dataset": self._cpu_per(cpu, len(burst)),
                                    "messages_per_dataset": await asyncio.to_thread(self._messages_per, sent,
                                                                                    len(burst))}
                say(f"  burst: {len(burst):,} synced in {elapsed:.1f} s ({len(burst) / elapsed:,.0f}/s; published in "
                    f"{published:.1f} s), p50 {results['burst']['p50']:.2f} s, p99 {results['burst']['p99']:.2f} s; "
                    f"CPU ms per dataset {by_name_text(results['burst']['cpu_ms_per_dataset'])}; "
                    f"NATS messages sent per dataset {by_name_text(results['burst']['messages_per_dataset'])}")
            if steady:
                cpu, sent = self._cpu(), await asyncio.to_thread(self._messages)
                late = await load.steady(steady, config.rate, offset=len(burst))
                missing = await load.tracker.wait_for(steady, config.timeout)
                latencies = load.tracker.latencies([n for n in steady if n in load.tracker.done]) or [float("nan")]
                results["steady"] = {"datasets": len(steady), "rate": config.rate, "seconds": config.seconds,
                                     "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                                     "max": max(latencies), "client_late_max": late, "missing": missing,
                                     "cpu_ms_per_dataset": self._cpu_per(cpu, len(steady)),
                                     "messages_per_dataset": await asyncio.to_thread(self._messages_per, sent,
                                                                                     len(steady))}
                say(f"  steady {config.rate}/s for {config.seconds:.0f} s: p50 {results['steady']['p50'] * 1e3:.0f} "
                    f"ms, p99 {results['steady']['p99'] * 1e3:.0f} ms (client at most {late * 1e3:.0f} ms late); "
                    f"CPU ms per dataset {by_name_text(results['steady']['cpu_ms_per_dataset'])}; "
                    f"NATS messages sent per dataset {by_name_text(results['steady']['messages_per_dataset'])}")
            problems = [f"{phase}: {len(results[phase]['missing'])} not synced within {config.timeout:.0f} s"
                        for phase in ("burst", "steady") if results.get(phase, {}).get("missing")]
            problems += await load.verify(burst + steady)
            listings = sum(service.metric("shoal_dataset_sync_duration_seconds_count") for service in self.services)
            if listings != len(burst) + len(steady):
                problems.append(f"{listings:.0f} listings for {len(burst) + len(steady)} datasets")
            for service in self._all():
                service.sample()
            results.update({
                "problems": problems, "listings": listings, "runtimes_not_ready_at_end": load.not_ready,
                "accepted_resent": load.resent_accepted,
                "agents": config.agents, "beats": load.agents.beats,
                "inventories": load.agents.inventories, "status_facts": load.tracker.statuses,
                "rss": {s.child.name: {"peak": s.peak_rss, "end": rss_bytes(s.child.pid)} for s in self._all()},
            })
            return results
        finally:
            sampling.set()
            await sampler
            await load.stop()
            await facts.close()
            await bus.close()


def verdicts(config: LoadConfig, results: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    if "burst" in results:
        burst = results["burst"]
        lines.append(("PASS" if burst["rate"] >= 1000 else "MISS", f"a burst of {burst['datasets']:,} synced at "
                      "≥ 1,000/s", f"{burst['rate']:,.0f}/s ({burst['seconds']:.1f} s)"))
    if "steady" in results:
        steady = results["steady"]
        lines.append(("PASS" if steady["p99"] < 0.1 else "MISS", f"p99 < 100 ms at a steady {config.rate}/s",
                      f"p99 {steady['p99'] * 1e3:.0f} ms"))
    problems = results.get("problems", [])
    lines.append(("PASS" if not problems else "MISS", "none lost or applied twice, each synced (and Bound)",
                  "; ".join(problems[:3]) or "all synced once"))
    return lines


def markdown(config: LoadConfig, results: dict[str, Any], lines: list[tuple[str, str, str]]) -> str:
    mib = 1 << 20
    rows = ["| measure | value |", "|---|---|"]
    if "burst" in results:
        b = results["burst"]
        rows += [f"| burst: {b['datasets']:,} applies at once, all synced | {b['seconds']:.1f} s, "
                 f"**{b['rate']:,.0f}/s** (published in {b['publish_seconds']:.1f} s) |",
                 f"| burst: apply → synced, p50 / p99 / max | {b['p50']:.2f} / {b['p99']:.2f} / {b['max']:.2f} s |"]
    if "steady" in results:
        s = results["steady"]
        rows += [f"| steady {s['rate']}/s for {s['seconds']:.0f} s ({s['datasets']:,}): apply → synced, p50 / p99 / "
                 f"max | {s['p50'] * 1e3:.0f} / **{s['p99'] * 1e3:.0f}** / {s['max'] * 1e3:.0f} ms |"]
    for phase in ("burst", "steady"):
        if phase in results:
            rows.append(f"| {phase}: CPU ms per dataset, by process | "
                        f"{by_name_text(results[phase]['cpu_ms_per_dataset'])} |")
            rows.append(f"| {phase}: NATS messages sent per dataset, by connection | "
                        f"{by_name_text(results[phase].get('messages_per_dataset', {}))} |")
    for name, rss in results["rss"].items():
        rows.append(f"| RSS {name} service, peak / end | {rss['peak'] / mib:.0f} / {rss['end'] / mib:.0f} MiB |")
    rows.append(f"| datasets whose runtime was no longer Ready at the end (their agents' beats late) | "
                f"{results['runtimes_not_ready_at_end']} |")
    rows.append(f"| accepted facts sent again with the same id (a late publish ack; the stream kept one) | "
                f"{results.get('accepted_resent', 0)} |")
    rows.append(f"| simulated agents: heartbeats / inventory snapshots published | {results['beats']:,} / "
                f"{results['inventories']:,} |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    return "\n".join([
        DOCS_BEGIN,
        "## Load: thousands of datasets applied at once and at a steady rate (issue 15)",
        "",
        f"Measured {when} on {os.cpu_count()} cores (kernel {platform.release()}), with `SHOAL_BENCH=load make "
        f"bench`: {config.replicas} dataset-service process(es) and the runtime service against one nats-server, "
        f"{config.agents} simulated agents beating and publishing inventory every {BEAT_SECONDS:.0f} s, "
        f"{config.runtimes} runtimes per phase (those datasets must end Bound), {config.source} folders of "
        f"{config.files} files. Latency is from just before an apply is published to the first status fact saying "
        "the dataset is synced (and Bound); the bench client runs on the same cores. CPU per dataset (each "
        "process's CPU time over the phase, simulated agents' traffic included) is the number a busy machine moves "
        "least. "
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other sessions share this "
        "machine, so the numbers are noisy).",
        "",
        *rows,
        *targets_table(lines),
        DOCS_END,
    ])


def main(state_dir: Path, environ: Mapping[str, str] | None = None, quick: bool = False) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    config = LoadConfig.from_env(environ, quick)
    state = state_dir.resolve()
    say(f"load bench: burst {config.burst:,}, steady {config.rate}/s for {config.seconds:.0f} s, {config.agents} "
        f"agents, {config.replicas} dataset service(s)")
    with exclusive_run(state, "load"):
        bench = LoadBench(config, state, environ.get("SHOAL_BENCH_LOAD_LOG_LEVEL", "warning"))
        run_then_stop(bench)
    results = {"config": asdict(config), **bench.results}
    (state / "load-results.json").write_text(json.dumps(results, indent=2))
    if config.profile:
        for path in sorted((state / "load-logs").glob("*.spy")):
            summary = summarize_profile(path, top=25)
            if summary is not None:
                say(f"py-spy {path.stem}: {summary['busy_samples']} busy samples, {summary['idle_samples']} idle")
                for kind in ("self", "inclusive"):
                    say(f"  {kind}: " + "; ".join(f"{share:.0%} {frame}" for frame, share in summary[kind]))
    lines = verdicts(config, bench.results)
    print_targets(console(), "Targets (issue 15.5)", lines)
    if config.docs:
        path = Path(config.docs)
        write_docs_section(path if path.is_absolute() else PROJECT_ROOT / path, markdown(config, bench.results, lines),
                           DOCS_BEGIN, DOCS_END)
    if bench.results.get("problems"):
        raise SystemExit("load bench: " + "; ".join(bench.results["problems"][:5]))
    return results


if __name__ == "__main__":
    main(Path(".shoal/bench"), quick="--quick" in sys.argv)
