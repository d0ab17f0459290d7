"""Agent data-path bench: Shoal's FUSE mount against its peers, on one SeaweedFS and the same objects.

Systems, side by side:
- Shoal: the dataset, runtime and node agent services as their own processes (as in production); each dataset is
  mounted by the agent's mount process. States: cold (fresh cache dir and fresh mount), warm (read again), and
  warm with the kernel page cache dropped (only the agent's disk cache left);
- rclone mount ``--vfs-cache-mode full`` and s3fs ``-o use_cache`` (Debian packages), same three states (cold =
  fresh cache dir and fresh mount);
- direct parallel GETs with aiobotocore (no cache, one state);
- local disk, cold (page cache dropped) and warm.

Workloads: large files read sequentially (MB/s, 1 and 8 readers), 100 KiB files with 16 readers (files/s), a
metadata walk of 20k files with find(1) (stats/s), fio random 4 KiB reads (IOPS), and Shoal's hit ratio over
shuffled epochs with a cache half the dataset's size (default policy, then LRU).

Readers run in a worker process (this module with ``--worker``) so the bench's own CPU use stays out of the way.
The objects and their local copy are kept under .shoal/bench/ so later runs skip seeding. Results: one table,
the issue's targets with PASS/MISS, and .shoal/bench/agent-results.json. Every child process is stopped by its
PID and every FUSE mount removed, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import fcntl
import functools
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libs.embedded import SeaweedConfig, ServerProcess

KiB = 1024
MiB = 1024 * KiB
PROJECT_ROOT = Path(__file__).resolve().parents[2]
NODE = "bench-node"
DATA = "data"
EPOCH = "epoch"
NAMESPACE = "default"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIO_JOBS = 8


# --- sizes and object layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    large_files: int = 8
    large_bytes: int = 128 * MiB
    small_files: int = 2000
    small_bytes: int = 100 * KiB
    meta_files: int = 20_000
    meta_bytes: int = 16
    epoch_files: int = 128
    epoch_bytes: int = 4 * MiB
    fio_seconds: int = 10
    deadline: float = 45.0  # per measurement; a slower system reports its rate over what it did
    suffix: str = ""

    @property
    def bucket(self) -> str:
        return f"bench-agent{self.suffix}"

    @property
    def epoch_bucket(self) -> str:
        return f"bench-epoch{self.suffix}"

    def large(self) -> list[tuple[str, int]]:
        return [(f"large/large-{i:02d}.bin", self.large_bytes) for i in range(self.large_files)]

    def small(self) -> list[tuple[str, int]]:
        return [(f"small/small-{i:05d}.bin", self.small_bytes) for i in range(self.small_files)]

    def meta(self) -> list[tuple[str, int]]:
        return [(f"meta/d{i // 200:03d}/m{i:05d}.bin", self.meta_bytes) for i in range(self.meta_files)]

    def epoch(self) -> list[tuple[str, int]]:
        return [(f"shard-{i:04d}.bin", self.epoch_bytes) for i in range(self.epoch_files)]

    def objects(self) -> dict[str, list[tuple[str, int]]]:
        return {self.bucket: self.large() + self.small() + self.meta(), self.epoch_bucket: self.epoch()}

    @property
    def epoch_total(self) -> int:
        return self.epoch_files * self.epoch_bytes


QUICK = Sizes(large_files=4, large_bytes=32 * MiB, small_files=300, meta_files=2000, epoch_files=32,
              fio_seconds=3, deadline=20.0, suffix="-quick")


def content(key: str, size: int) -> bytes:
    """Deterministic incompressible bytes of an object, so the local copy and the bucket hold the same data."""
    return random.Random(key).randbytes(size)


# --- processes, mounts and cleanup ---------------------------------------------------------------------------


class Child:
    """A process we started, in its own session (its descendants share its process group); logs to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 grace: float = 15.0) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.grace = grace
        self.log_path = log_path
        self._log: IO[bytes] | None = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, cwd=PROJECT_ROOT)
        _children.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period, then SIGKILL to whatever is left of its process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The group is this child's own (start_new_session): only its descendants can be in it, e.g. a mount
        # process the agent could not stop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(ValueError):
            _children.remove(self)


_children: list[Child] = []
_servers: list[ServerProcess] = []
_mount_roots: list[Path] = []
_cleanup_lock = threading.Lock()


def cleanup() -> None:
    """Stop every child (newest first), unmount anything left under our mount folders, stop the servers."""
    with _cleanup_lock:
        while _children:
            child = _children[-1]
            try:
                child.stop()
            except Exception as err:
                print(f"could not stop {child.name} (pid {child.pid}): {err}", file=sys.stderr)
                with contextlib.suppress(ValueError):
                    _children.remove(child)
        for root in list(_mount_roots):
            for path in mounts_under(root):
                unmount(path)
        while _servers:
            server = _servers.pop()
            try:
                server.stop()
            except Exception as err:
                print(f"could not stop {server.name}: {err}", file=sys.stderr)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mounts:
        return [_unescape(line.split()[4]) for line in mounts if len(line.split()) > 4]


def mounted(path: Path | str) -> bool:
    return str(path) in mount_points()


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    # Deepest first, so nested mounts go before their parents.
    return sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True)


def unmount(path: Path | str) -> None:
    """fusermount3 -u, then a lazy -u -z, then umount -l (s3fs mounts with libfuse 2)."""
    for argv in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*argv, str(path)], capture_output=True, timeout=30, check=False)
    if mounted(path):
        print(f"WARNING: {path} is still mounted", file=sys.stderr)


def wait_mounted(path: Path, timeout: float, owner: Child | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if owner is not None and not owner.alive():
            raise RuntimeError(f"{what or owner.name} exited with {owner.proc.returncode} before mounting "
                               f"{path}:\n{owner.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or path} not mounted within {timeout:.0f} s")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- page cache ----------------------------------------------------------------------------------------------


class PageCache:
    """Dropping the kernel page cache: ``echo 3 > /proc/sys/vm/drop_caches`` as root, else fadvise per file."""

    def __init__(self) -> None:
        self.methods: set[str] = set()

    def drop(self, fallback_paths: Sequence[Path]) -> str:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            method = "drop_caches"
        except OSError as err:
            for path in fallback_paths:
                evict(path)
            method = f"posix_fadvise(DONTNEED) per file (drop_caches refused: {err.strerror})"
        self.methods.add(method)
        return method


def evict(path: Path) -> None:
    files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    for file in files:
        with contextlib.suppress(OSError):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_tree(root: Path) -> int:
    """Read every regular file under root (brings it into the page cache); returns bytes read."""
    total = 0
    buffer = bytearray(4 * MiB)
    view = memoryview(buffer)
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    if not os.path.isfile(path):
                        continue
                    while (n := os.readv(fd, [view])) > 0:
                        total += n
                finally:
                    os.close(fd)
    return total


# --- the worker process: reads, walks and direct GETs, reporting JSON -------------------------------------------


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "tests.bench.agent", "--worker"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def worker_main() -> None:
    spec = json.load(sys.stdin)
    kinds: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "read": _work_read, "walk": _work_walk, "direct": _work_direct,
    }
    json.dump(kinds[spec["kind"]](spec), sys.stdout)


def _work_read(spec: dict[str, Any]) -> dict[str, Any]:
    """``readers`` threads take files in the given order and read each to its end with ``chunk``-sized reads."""
    files: list[tuple[str, int]] = [(p, s) for p, s in spec["files"]]
    chunk = int(spec.get("chunk", MiB))
    lock = threading.Lock()
    position = [0]
    totals = {"bytes": 0, "files": 0}
    errors: list[str] = []
    started = time.perf_counter()
    deadline = time.monotonic() + float(spec["deadline"])

    def reader() -> None:
        view = memoryview(bytearray(chunk))
        got_bytes = got_files = 0
        while time.monotonic() < deadline:
            with lock:
                index = position[0]
                position[0] += 1
            if index >= len(files):
                break
            path, size = files[index]
            read = 0
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    while (n := os.readv(fd, [view])) > 0:
                        read += n
                        if time.monotonic() >= deadline:
                            break
                finally:
                    os.close(fd)
            except OSError as err:
                with lock:
                    errors.append(f"{path}: {err}")
            got_bytes += read
            if read == size:
                got_files += 1
            elif time.monotonic() < deadline:
                with lock:
                    errors.append(f"{path}: read {read} of {size} bytes")
        with lock:
            totals["bytes"] += got_bytes
            totals["files"] += got_files

    threads = [threading.Thread(target=reader) for _ in range(int(spec["readers"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"bytes": totals["bytes"], "files": totals["files"], "expected_files": len(files), "seconds": seconds,
            "complete": totals["files"] == len(files) and not errors, "errors": errors[:5],
            "error_count": len(errors)}


def _work_walk(spec: dict[str, Any]) -> dict[str, Any]:
    """find(1) stats every entry (``-printf %s``); counting its output lines counts the stats."""
    started = time.perf_counter()
    proc = subprocess.Popen(["find", spec["root"], "-printf", "%s\n"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    timer = threading.Timer(float(spec["deadline"]), proc.kill)
    timer.start()
    entries = 0
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while chunk := proc.stdout.read(65536):
            entries += chunk.count(b"\n")
        stderr = proc.stderr.read().decode(errors="replace")
        code = proc.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - started
    killed = code == -signal.SIGKILL
    errors = [line for line in stderr.splitlines() if line][:5]
    return {"entries": entries, "seconds": seconds, "complete": code == 0, "timed_out": killed, "errors": errors,
            "error_count": len(errors)}


def _work_direct(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_direct(spec))


async def _direct(spec: dict[str, Any]) -> dict[str, Any]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    concurrency = int(spec["concurrency"])
    config = AioConfig(max_pool_connections=max(concurrency, 10))
    session = get_session()
    async with session.create_client("s3", endpoint_url=spec["endpoint"], region_name="us-east-1",
                                     aws_access_key_id=spec["access_key"], aws_secret_access_key=spec["secret_key"],
                                     config=config) as s3:
        bucket = spec["bucket"]
        await s3.head_bucket(Bucket=bucket)  # connection and signer warmed up, like a mounted filesystem
        slots = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + float(spec["deadline"])
        totals = {"bytes": 0, "ops": 0, "objects": 0}
        errors: list[str] = []

        async def get(key: str, start: int | None = None, length: int | None = None) -> int:
            async with slots:
                if time.monotonic() >= deadline:
                    return 0
                kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
                if start is not None and length is not None:
                    kwargs["Range"] = f"bytes={start}-{start + length - 1}"
                try:
                    response = await s3.get_object(**kwargs)
                    async with response["Body"] as body:
                        data = await body.read()
                except Exception as err:
                    errors.append(f"{key}: {err}")
                    return 0
                totals["bytes"] += len(data)
                totals["ops"] += 1
                return len(data)

        mode = spec["mode"]
        started = time.perf_counter()
        if mode == "large":
            objects: list[tuple[str, int]] = [(k, s) for k, s in spec["objects"]]
            queue = list(reversed(objects))
            range_size = int(spec["range"])

            async def reader() -> None:
                while queue and time.monotonic() < deadline:
                    key, size = queue.pop()
                    got = await asyncio.gather(*(get(key, offset, min(range_size, size - offset))
                                                 for offset in range(0, size, range_size)))
                    if sum(got) == size:
                        totals["objects"] += 1

            await asyncio.gather(*(reader() for _ in range(int(spec["readers"]))))
            expected = len(objects)
        elif mode == "small":
            keys = list(reversed(spec["keys"]))
            expected = len(keys)

            async def fetcher() -> None:
                while keys and time.monotonic() < deadline:
                    if await get(keys.pop()):
                        totals["objects"] += 1

            await asyncio.gather(*(fetcher() for _ in range(concurrency)))
        elif mode == "list":
            expected = int(spec["expected"])
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=spec["prefix"],
                                                                 PaginationConfig={"PageSize": 1000})
            async for page in pages:
                totals["objects"] += len(page.get("Contents", []))
                if time.monotonic() >= deadline:
                    break
        elif mode == "rand":
            key, size, block = spec["object"], int(spec["size"]), int(spec["block"])
            stop_at = time.monotonic() + float(spec["seconds"])
            rng = random.Random()
            expected = 0

            async def random_reader() -> None:
                while time.monotonic() < stop_at:
                    await get(key, rng.randrange(size // block) * block, block)

            await asyncio.gather(*(random_reader() for _ in range(concurrency)))
        else:
            raise ValueError(f"unknown mode {mode}")
        seconds = time.perf_counter() - started
    return {**totals, "seconds": seconds, "expected": expected,
            "complete": totals["objects"] >= expected and not errors, "errors": errors[:5],
            "error_count": len(errors)}


# --- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    label: str  # short, for the table


@dataclass
class Row:
    workload: str
    system: str
    state: str  # cold, warm, dropped (warm, page cache dropped), "-" (no cache)
    value: float | None
    unit: str
    note: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


PEERS = ("rclone", "s3fs", "direct GETs")
SYSTEMS = ("local", "direct", "shoal", "rclone", "s3fs")
STATE_SHORT = {"cold": "cold", "warm": "warm", "dropped": "warm, -pagecache", "-": "no cache",
               "epochs": "3 epochs"}
STATE_LABEL = {"cold": "cold", "warm": "warm", "dropped": "warm, page cache dropped", "-": "no cache",
               "epochs": "shuffled epochs"}


# --- systems -------------------------------------------------------------------------------------------------


@dataclass
class Store:
    config: SeaweedConfig
    process: ServerProcess

    @property
    def creds(self) -> tuple[str, str, str]:
        return self.config.endpoint, self.config.access_key_id, self.config.secret_access_key

    def warm(self) -> None:
        """Keep SeaweedFS's files in the page cache, so every system's cold reads meet the same server state."""
        read_tree(self.config.data_dir)


class MountedSystem:
    """A FUSE mount of the bench bucket that can be made cold (fresh cache and mount)."""

    name = ""
    root: Path
    cache_dirs: list[Path]

    def fresh(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def daemon_pids(self) -> list[int]:
        raise NotImplementedError

    def serving_pids(self) -> list[int]:
        """The process(es) serving the mount: a change during a workload invalidates its rows."""
        return self.daemon_pids()


class ShoalNode(MountedSystem):
    name = "Shoal"

    def __init__(self, run_dir: Path, nats_url: str, store: Store, sizes: Sizes, logs: Path) -> None:
        self.run_dir = run_dir
        self.nats_url = nats_url
        self.store = store
        self.sizes = sizes
        self.logs = logs
        self.mount_root = run_dir / "mnt"
        self.cache_root = run_dir / "cache"
        _mount_roots.append(self.mount_root)
        endpoint, key, secret = store.creds
        self.env = {**os.environ, "NATS_URL": nats_url, "SHOAL_S3_ENDPOINT": endpoint,
                    "SHOAL_S3_ACCESS_KEY_ID": key, "SHOAL_S3_SECRET_ACCESS_KEY": secret,
                    "SHOAL_MOUNT_ROOT": str(self.mount_root), "SHOAL_NODE_NAME": NODE, "SHOAL_LOG_LEVEL": "warning"}
        self.services: list[Child] = []
        self.agent: Child | None = None
        self.policy = "lfu-admission"
        self.datasets: dict[str, str] = {}  # name -> a file that must be visible once mounted
        self.root = self.mountpoint(DATA)
        self.cache_dirs = [self.cache_root / NAMESPACE / DATA]

    def mountpoint(self, name: str) -> Path:
        return self.mount_root / NAMESPACE / name

    def start_services(self) -> None:
        for module in ("services.dataset", "services.runtime"):
            self.services.append(Child(module, [sys.executable, "-m", module], self.logs / f"{module}.log",
                                       env=self.env))

    def start_agent(self) -> None:
        env = {**self.env, "SHOAL_CACHE_POLICY": self.policy}
        self.agent = Child("services.agent", [sys.executable, "-m", "services.agent"],
                           self.logs / "services.agent.log", env=env, grace=30.0)

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        for path in mounts_under(self.mount_root):
            unmount(path)

    def stop(self) -> None:
        self.stop_agent()

    def daemon_pids(self) -> list[int]:
        return [] if self.agent is None else [self.agent.pid, *descendants(self.agent.pid)]

    def serving_pids(self) -> list[int]:
        return self.mount_pids(DATA)

    def mount_pids(self, name: str) -> list[int]:
        """The mount process of dataset ``name`` (a child of the agent)."""
        found = []
        for pid in self.daemon_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"services.agent.mountd" in argv and name.encode() in argv:
                found.append(pid)
        return found

    def apply(self, name: str, bucket: str, quota: int, probe: str) -> None:
        asyncio.run(self._apply(name, bucket, quota))
        self.datasets[name] = probe

    async def _apply(self, name: str, bucket: str, quota: int) -> None:
        from libs import subjects
        from libs.bus import connect
        from libs.config import NatsSettings
        from libs.events.common import ObjectMeta
        from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
        from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore

        bus = await connect(NatsSettings(urls=[self.nats_url]), "shoal-bench-agent")
        try:
            await bus.provision()
            levels = [Level(mediumtype="SSD", quota=quota, path=str(self.cache_root))]
            runtime = Runtime(metadata=ObjectMeta(name=name),
                              spec=RuntimeSpec(tieredstore=TieredStore(levels=levels)))
            dataset = Dataset(metadata=ObjectMeta(name=name),
                              spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
        finally:
            await bus.close()

    def wait_mounts(self, timeout: float = 180.0) -> None:
        for name, probe in self.datasets.items():
            path = self.mountpoint(name)
            wait_mounted(path, timeout, self.agent, f"Shoal mount of {name}")
            # Mounted (seen in mountinfo), so a stat reaches the mount process, not the bare directory.
            deadline = time.monotonic() + 30
            while not (path / probe).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path / probe} not visible in the Shoal mount")
                time.sleep(0.1)

    def fresh(self, clear: Sequence[str] = (DATA,)) -> None:
        """Cold: stop the agent (its mounts go), delete the datasets' cache folders, start it, wait for mounts."""
        self.stop_agent()
        for name in clear:
            shutil.rmtree(self.cache_root / NAMESPACE / name, ignore_errors=True)
        self.start_agent()
        self.wait_mounts()
        self.settle()

    def settle(self, stable: float = 2.0, timeout: float = 60.0) -> None:
        """Wait until the mount processes stayed the same for ``stable`` seconds.

        An agent restart can make the runtime NotReady for a moment (missed heartbeats), which makes the new
        agent unmount and mount again; measuring during that would measure the restart.
        """
        deadline = time.monotonic() + timeout
        last: list[list[int]] = []
        since = time.monotonic()
        while time.monotonic() < deadline:
            current = [self.mount_pids(name) if mounted(self.mountpoint(name)) else [] for name in self.datasets]
            if current != last:
                last, since = current, time.monotonic()
            elif all(current) and time.monotonic() - since >= stable:
                self.wait_mounts()
                return
            time.sleep(0.1)
        raise TimeoutError(f"Shoal mounts not stable within {timeout:.0f} s (mount processes {last})")

    def counters(self, name: str) -> dict[str, int]:
        return asyncio.run(self._counters(name))

    async def _counters(self, name: str) -> dict[str, int]:
        """The mount's cache counters, from an inventory snapshot asked for now."""
        import msgspec

        from libs import subjects
        from libs.bus import connect
        from libs.config import NatsSettings
        from libs.events.agent import InventoryRequest
        from libs.events.common import ObjectRef

        bus = await connect(NatsSettings(urls=[self.nats_url]), "shoal-bench-agent")
        try:
            answer: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()

            async def on_event(msg: Any) -> None:
                event = msgspec.json.decode(msg.data)
                if (event.get("type") == "agent.inventory.snapshot.v2" and event["dataset"]["name"] == name
                        and not answer.done()):
                    answer.set_result(event["counters"])

            subscription = await bus.nc.subscribe(subjects.agent_inventory(NODE), cb=on_event)
            request = InventoryRequest(node=NODE, dataset=ObjectRef(name=name, namespace=NAMESPACE))
            await bus.nc.publish(subjects.INVENTORY_REQUEST, msgspec.json.encode(request))
            try:
                return await asyncio.wait_for(answer, 15)
            finally:
                await subscription.unsubscribe()
        finally:
            await bus.close()


class RcloneMount(MountedSystem):
    name = "rclone"

    def __init__(self, run_dir: Path, store: Store, bucket: str, logs: Path) -> None:
        self.mnt = run_dir / "rclone-mnt"
        self.cache = run_dir / "rclone-cache"
        self.root = self.mnt
        self.cache_dirs = [self.cache]
        self.logs = logs
        self.bucket = bucket
        self.proc: Child | None = None
        _mount_roots.append(run_dir)
        endpoint, key, secret = store.creds
        self.config_file = run_dir / "rclone.conf"
        prefix = "RCLONE_CONFIG_SHOALBENCH_"
        # AWS_* variables of the caller's environment are not for this endpoint; AWS_CA_BUNDLE in particular makes
        # rclone 1.60 fail with "LoadCustomCABundleError ... unsupported transport" even for plain http.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        self.env = {**inherited, f"{prefix}TYPE": "s3", f"{prefix}PROVIDER": "Other", f"{prefix}ENDPOINT": endpoint,
                    f"{prefix}ACCESS_KEY_ID": key, f"{prefix}SECRET_ACCESS_KEY": secret,
                    f"{prefix}FORCE_PATH_STYLE": "true", f"{prefix}REGION": "us-east-1"}

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("")
        argv = ["rclone", "mount", f"shoalbench:{self.bucket}", str(self.mnt), "--vfs-cache-mode", "full",
                "--cache-dir", str(self.cache), "--read-only", "--config", str(self.config_file),
                "--log-level", "NOTICE"]
        self.proc = Child("rclone", argv, self.logs / "rclone.log", env=self.env)
        wait_mounted(self.mnt, 30, self.proc, "rclone mount")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        unmount(self.mnt)

    def daemon_pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid]


class S3fsMount(MountedSystem):
    name = "s3fs"

    def __init__(self, run_dir: Path, store: Store, bucket: str, logs: Path) -> None:
        self.mnt = run_dir / "s3fs-mnt"
        self.cache = run_dir / "s3fs-cache"
        self.root = self.mnt
        self.cache_dirs = [self.cache]
        self.logs = logs
        self.bucket = bucket
        self.endpoint = store.config.endpoint
        self.proc: Child | None = None
        _mount_roots.append(run_dir)
        self.passwd = run_dir / "s3fs.passwd"
        fd = os.open(self.passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{store.config.access_key_id}:{store.config.secret_access_key}\n")
        os.chmod(self.passwd, 0o600)

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        argv = ["s3fs", self.bucket, str(self.mnt), "-f", "-o", f"url={self.endpoint}", "-o",
                "use_path_request_style", "-o", f"passwd_file={self.passwd}", "-o", f"use_cache={self.cache}",
                "-o", "ro", "-o", "dbglevel=warn"]
        self.proc = Child("s3fs", argv, self.logs / "s3fs.log")
        wait_mounted(self.mnt, 30, self.proc, "s3fs mount")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        unmount(self.mnt)

    def daemon_pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid]


# --- the bench -----------------------------------------------------------------------------------------------


WORKLOADS = {
    "large1": Workload("large1", "large files sequential, 1 reader", "MB/s", "large seq, 1 reader"),
    "large8": Workload("large8", "large files sequential, 8 readers", "MB/s", "large seq, 8 readers"),
    "small": Workload("small", "100 KiB files, 16 readers", "files/s", "100 KiB files, 16 rd"),
    "walk": Workload("walk", "metadata walk", "stats/s", "metadata walk"),
    "rand": Workload("rand", "fio random 4 KiB reads", "IOPS", "fio rand 4 KiB"),
    "epoch": Workload("epoch", "epoch hit ratio, cache = ½ dataset", "hit ratio", "epoch hit, ½ cache"),
}


class Bench:
    def __init__(self, sizes: Sizes, state: Path) -> None:
        self.sizes = sizes
        self.state = state
        self.run_dir = state / "agent-run"
        self.logs = self.run_dir / "logs"
        self.local_root = state / "agent-local"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.page_cache = PageCache()
        self.store: Store | None = None
        self.shoal: ShoalNode | None = None
        self.phase_times: dict[str, float] = {}
        self.profile_dir: Path | None = None
        self.log_level = "warning"
        self.load: dict[str, list[float]] = {}

    # -- setup --

    def tidy(self) -> None:
        """After a run: delete the caches and the JetStream store (gigabytes); keep the logs."""
        if mounts_under(self.run_dir):
            return  # never delete under a live mount
        for name in ("cache", "rclone-cache", "s3fs-cache", "nats", "mnt", "rclone-mnt", "s3fs-mnt"):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)

    def prepare_run_dir(self) -> None:
        for path in mounts_under(self.run_dir):  # left by a run that was killed hard
            unmount(path)
        left = mounts_under(self.run_dir)
        if left:
            raise SystemExit(f"cannot clear {self.run_dir}: still mounted: {', '.join(left)}")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        _mount_roots.append(self.run_dir)

    def local_copy(self) -> float:
        """Write the objects as local files unless they are there (the source of the bucket's bytes too)."""
        started = time.perf_counter()
        wrote = 0
        for bucket, objects in self.sizes.objects().items():
            for key, size in objects:
                path = self.local_root / bucket / key
                try:
                    if path.stat().st_size == size:
                        continue
                except FileNotFoundError:
                    path.parent.mkdir(parents=True, exist_ok=True)
                temp = path.with_name(path.name + ".tmp")
                temp.write_bytes(content(key, size))
                temp.replace(path)
                wrote += 1
        if wrote:
            os.sync()
        return time.perf_counter() - started

    def start_store(self) -> tuple[str, Store]:
        from libs.embedded import NatsConfig, SeaweedConfig, free_port, start_nats, start_seaweedfs

        nats_config = NatsConfig(port=free_port(), monitor_port=free_port(), store_dir=self.run_dir / "nats")
        _servers.append(start_nats(nats_config, self.logs / "nats.log"))
        seaweed_config = SeaweedConfig.on_free_ports(self.state / "agent-seaweedfs")
        process = start_seaweedfs(seaweed_config, self.logs / "seaweedfs.log")
        _servers.append(process)
        return nats_config.url, Store(seaweed_config, process)

    async def seed(self, store: Store) -> int:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        endpoint, key, secret = store.creds
        uploaded = 0
        async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                               aws_access_key_id=key, aws_secret_access_key=secret,
                                               config=AioConfig(max_pool_connections=64)) as s3:
            existing = {b["Name"] for b in (await s3.list_buckets())["Buckets"]}
            for bucket, objects in self.sizes.objects().items():
                if bucket not in existing:
                    await s3.create_bucket(Bucket=bucket)
                present: dict[str, int] = {}
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    present.update((item["Key"], item["Size"]) for item in page.get("Contents", []))
                missing = [(k, s) for k, s in objects if present.get(k) != s]
                big = asyncio.Semaphore(2)
                small = asyncio.Semaphore(64)

                async def put(object_key: str, size: int, bucket: str = bucket, big: asyncio.Semaphore = big,
                              small: asyncio.Semaphore = small) -> None:
                    async with big if size >= 4 * MiB else small:
                        body = await asyncio.to_thread((self.local_root / bucket / object_key).read_bytes)
                        await s3.put_object(Bucket=bucket, Key=object_key, Body=body)

                if missing:
                    say(f"  uploading {len(missing)} objects to s3://{bucket} (kept for later runs)...")
                await asyncio.gather(*(put(k, s) for k, s in missing))
                uploaded += len(missing)
        return uploaded

    # -- measurements --

    def files(self, root: Path, objects: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(str(root / key), size) for key, size in objects]

    def measure(self, workload: str, root: Path, state: str) -> tuple[float | None, str, dict[str, Any]]:
        sizes = self.sizes
        if workload in ("large1", "large8", "small"):
            objects = sizes.small() if workload == "small" else sizes.large()
            readers = {"large1": 1, "large8": 8, "small": 16}[workload]
            result = run_worker({"kind": "read", "files": self.files(root, objects), "readers": readers,
                                 "chunk": MiB, "deadline": sizes.deadline}, sizes.deadline + 120)
            if result["error_count"]:
                return None, f"failed: {read_note(result)}", result
            value = (result["files"] / result["seconds"] if workload == "small"
                     else result["bytes"] / result["seconds"] / 1e6)
            return value, read_note(result), result
        if workload == "walk":
            result = run_worker({"kind": "walk", "root": str(root / "meta"), "deadline": sizes.deadline},
                                sizes.deadline + 60)
            note = "" if result["complete"] else (
                f"timed out: {result['entries']} entries in {result['seconds']:.0f} s" if result["timed_out"]
                else f"find failed: {'; '.join(result['errors'])}")
            if result["entries"] < sizes.meta_files and result["complete"]:
                note = f"only {result['entries']} entries seen"
            if result["error_count"] and not result["timed_out"]:
                return None, note, result
            return result["entries"] / result["seconds"], note, result
        if workload == "rand":
            key, size = sizes.large()[0]
            # A time-based run over one file is warm within a second (the file is small next to the reads a run
            # makes), so cold and dropped runs are the first reads only: an eighth of the file's pages.
            ios = None if state == "warm" else max(16, size // (4 * KiB) // 8 // FIO_JOBS)
            return fio_randread(root / key, sizes.fio_seconds, ios)
        raise ValueError(workload)

    def prime(self, workload: str, root: Path) -> None:
        """Before a warm random-read run: the file read once in full, like the sequential workloads leave it."""
        if workload == "rand":
            key, size = self.sizes.large()[0]
            run_worker({"kind": "read", "files": [(str(root / key), size)], "readers": 1, "chunk": MiB,
                        "deadline": self.sizes.deadline}, self.sizes.deadline + 120)

    def record(self, workload: str, system: str, state: str,
               run: Callable[[], tuple[float | None, str, dict[str, Any]]],
               daemon: Callable[[], list[int]] = list, repeat: int = 1) -> Row:
        """Run one measurement (the median of up to ``repeat`` runs while they are short), with the CPU seconds
        of the daemon, the store and the reader during the run."""
        store_pids = [self.store.process.pid] if self.store is not None else []
        runs: list[tuple[float, str, dict[str, Any], dict[str, float]]] = []
        failure = ""
        for attempt in range(repeat):
            pids = daemon()
            profiler = self.start_profiler(f"{workload}-{system}-{state}-{attempt}", system)
            before = (cpu_seconds(pids), cpu_seconds(store_pids), children_cpu(), time.perf_counter())
            try:
                value, note, detail = run()
            except Exception as err:  # one failed measurement is a row, not a crash
                value, note, detail = None, f"failed: {str(err).strip()[:300]}", {}
            finally:
                profile = self.stop_profiler(profiler)
            if profile:
                detail = {**detail, "profile": profile}
            wall = time.perf_counter() - before[3]
            cpu = {"daemon": cpu_seconds(pids) - before[0], "store": cpu_seconds(store_pids) - before[1],
                   "reader": children_cpu() - before[2], "wall": wall}
            if value is None:
                failure = note
                break
            runs.append((value, note, detail, cpu))
            if wall > 2.0:
                break  # long enough to be stable; short runs are repeated
        title, unit = WORKLOADS[workload].title, WORKLOADS[workload].unit
        if failure or not runs:
            row = Row(title, system, state, None, unit, failure)
        else:
            ordered = sorted(runs, key=lambda r: r[0])
            value, note, detail, cpu = ordered[(len(ordered) - 1) // 2]  # the (lower) median run
            if len(runs) > 1:
                detail = {**detail, "runs": [r[0] for r in runs]}
            row = Row(title, system, state, value, unit, note, cpu, detail)
        self.rows.append(row)
        shown = "-" if row.value is None else f"{row.value:,.1f}"
        say(f"  {title:38} {system:22} {STATE_LABEL[state]:26} {shown:>12} {unit:9} {row.note}")
        return row

    def start_profiler(self, label: str, system: str) -> tuple[Child, Path] | None:
        """py-spy on the Shoal data mount process for one measurement (``--profile``)."""
        if self.profile_dir is None or self.shoal is None or not system.startswith("Shoal"):
            return None
        name = EPOCH if system != "Shoal" else DATA
        pids = self.shoal.mount_pids(name)
        if not pids:
            return None
        out = self.profile_dir / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.txt"
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "200",
                "--output", str(out), "--pid", str(pids[0])]
        child = Child("py-spy", argv, self.logs / "py-spy.log")
        time.sleep(0.3)  # attached before the run starts
        return child, out

    def stop_profiler(self, profiler: tuple[Child, Path] | None) -> dict[str, Any] | None:
        if profiler is None:
            return None
        child, out = profiler
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(20)
        child.stop()
        return summarize_profile(out)

    def drop(self, extra: Sequence[Path]) -> None:
        self.page_cache.drop([self.local_root, *extra])

    def run_local(self, workloads: Sequence[str]) -> None:
        root = self.local_root / self.sizes.bucket
        for workload in workloads:

            def run(w: str = workload, state: str = "cold") -> tuple[float | None, str, dict[str, Any]]:
                return self.measure(w, root, state)

            self.drop([])
            self.record(workload, "local disk", "cold", run)
            self.prime(workload, root)
            self.record(workload, "local disk", "warm", functools.partial(run, state="warm"), repeat=3)

    def run_mounted(self, system: MountedSystem, workloads: Sequence[str], attempts: int = 3) -> None:
        """Per workload: a fresh mount, then cold, warm and dropped runs. A workload whose runs failed (read
        errors, or the mount process replaced under it) is run once more from a fresh mount; the rows say so."""
        for workload in workloads:
            failures: list[str] = []
            for attempt in range(1, attempts + 1):
                first = len(self.rows)
                self.run_workload(system, workload)
                failed = [r for r in self.rows[first:] if r.value is None]
                if not failed or attempt == attempts:
                    break
                failures.append(f"{STATE_LABEL[failed[0].state]}: {short(failed[0].note, 200)}")
                del self.rows[first:]
                say(f"  {system.name} {WORKLOADS[workload].title}: failed ({failures[-1]}); running it again")
            if failures:
                for row in self.rows[first:]:
                    row.note = "; ".join(filter(None, [row.note, f"attempt {len(failures) + 1}; earlier attempt "
                                                                 f"failed: {'; '.join(failures)}"]))
                    row.detail["earlier_failures"] = failures
        system.stop()

    def run_workload(self, system: MountedSystem, workload: str) -> None:
        assert self.store is not None
        title, unit = WORKLOADS[workload].title, WORKLOADS[workload].unit
        try:
            system.fresh()
        except Exception as err:
            reason = f"could not mount: {str(err).strip()[:300]}"
            for state in ("cold", "warm", "dropped"):
                self.rows.append(Row(title, system.name, state, None, unit, reason))
            say(f"  {system.name}: {reason}")
            return
        serving = system.serving_pids()
        self.store.warm()
        for state in ("cold", "warm", "dropped"):
            if state == "warm":
                self.prime(workload, system.root)
            if state == "dropped":
                self.drop([*system.cache_dirs, system.root / "large", system.root / "small"])
            run = functools.partial(self.measure, workload, system.root, state)
            row = self.record(workload, system.name, state, run, system.daemon_pids,
                              repeat=3 if state == "warm" else 1)
            now = system.serving_pids()
            if now != serving:
                row.value = None
                row.note = "; ".join(filter(None, [f"invalid: the mount process changed during the run "
                                                   f"({serving} → {now})", row.note]))
                say(f"  {row.note}")

    def run_direct(self, workloads: Sequence[str]) -> None:
        assert self.store is not None
        endpoint, key, secret = self.store.creds
        base = {"kind": "direct", "endpoint": endpoint, "access_key": key, "secret_key": secret,
                "bucket": self.sizes.bucket, "deadline": self.sizes.deadline}
        large = self.sizes.large()
        specs: dict[str, tuple[dict[str, Any], str]] = {
            "large1": ({"mode": "large", "objects": large, "readers": 1, "range": 8 * MiB, "concurrency": 16},
                       "8 MiB ranges, 16 in flight"),
            "large8": ({"mode": "large", "objects": large, "readers": 8, "range": 8 * MiB, "concurrency": 16},
                       "8 MiB ranges, 16 in flight"),
            "small": ({"mode": "small", "keys": [k for k, _ in self.sizes.small()], "concurrency": 16},
                      "16 GETs in flight"),
            "walk": ({"mode": "list", "prefix": "meta/", "expected": self.sizes.meta_files, "concurrency": 1},
                     "LIST, 1000 keys a page"),
            "rand": ({"mode": "rand", "object": large[0][0], "size": large[0][1], "block": 4 * KiB,
                      "seconds": self.sizes.fio_seconds, "concurrency": 8}, "4 KiB ranged GETs, 8 in flight"),
        }
        for workload in workloads:
            spec, how = specs[workload]
            self.store.warm()

            def run(spec: dict[str, Any] = spec, workload: str = workload,
                    how: str = how) -> tuple[float | None, str, dict[str, Any]]:
                result = run_worker({**base, **spec}, self.sizes.deadline + 120)
                seconds = result["seconds"]
                value = {"large1": result["bytes"] / seconds / 1e6, "large8": result["bytes"] / seconds / 1e6,
                         "small": result["objects"] / seconds, "walk": result["objects"] / seconds,
                         "rand": result["ops"] / seconds}[workload]
                problems = "" if result["complete"] else (
                    f"; incomplete: {result['objects']} of {result['expected']}, {result['error_count']} errors "
                    f"{'; '.join(result['errors'][:2])}")
                if workload == "rand" and result["error_count"]:
                    return None, f"{result['error_count']} errors: {'; '.join(result['errors'][:2])}", result
                return value, how + problems, result

            self.record(workload, "direct GETs", "-", run)

    def run_epochs(self, policy: str, epochs: int = 3, attempts: int = 2) -> None:
        for attempt in range(1, attempts + 1):
            first = len(self.rows)
            self.run_epochs_once(policy, epochs)
            if self.rows[-1].value is not None or attempt == attempts:
                return
            say(f"  running the epochs again ({self.rows[-1].note})")
            del self.rows[first:]

    def run_epochs_once(self, policy: str, epochs: int) -> None:
        """Shuffled epochs over a dataset twice the cache; hit ratio per epoch from the agent's counters."""
        shoal = self.shoal
        assert shoal is not None
        sizes = self.sizes
        title = WORKLOADS["epoch"]
        system = f"Shoal ({policy})"
        try:
            shoal.policy = policy
            shoal.fresh(clear=(DATA, EPOCH))
            root = shoal.mountpoint(EPOCH)
            serving = shoal.mount_pids(EPOCH)
            ratios: list[float] = []
            rates: list[float] = []
            before = shoal.counters(EPOCH)
            for epoch in range(1, epochs + 1):
                order = sizes.epoch()
                random.Random(epoch).shuffle(order)
                # The kernel keeps what it read through the mount (keep_cache): dropped, so every read reaches
                # the agent and its counters see the whole epoch.
                self.drop([shoal.cache_root, root])
                result = run_worker({"kind": "read", "files": self.files(root, order), "readers": 4, "chunk": MiB,
                                     "deadline": sizes.deadline * 2}, sizes.deadline * 2 + 120)
                after = shoal.counters(EPOCH)
                if shoal.mount_pids(EPOCH) != serving:
                    raise RuntimeError(f"the mount process changed during epoch {epoch} ({serving} → "
                                       f"{shoal.mount_pids(EPOCH)}): its counters started again")
                hit = after["hitBytes"] - before["hitBytes"]
                miss = after["missBytes"] - before["missBytes"]
                before = after
                ratios.append(hit / (hit + miss) if hit + miss else 0.0)
                rates.append(result["bytes"] / result["seconds"] / 1e6)
                if not result["complete"]:
                    raise RuntimeError(f"epoch {epoch} incomplete: {read_note(result)}")
            later = ratios[1:] or ratios
            note = (", ".join(f"epoch {i} {r:.3f} ({m:,.0f} MB/s)" for i, (r, m) in enumerate(zip(ratios, rates,
                                                                                                   strict=True), 1)))
            row = Row(title.title, system, "epochs", statistics.mean(later), title.unit,
                      f"epochs 2-{epochs}; {note}", detail={"ratios": ratios, "mb_s": rates})
        except Exception as err:
            row = Row(title.title, system, "epochs", None, title.unit, f"failed: {str(err).strip()[:300]}")
        self.rows.append(row)
        shown = "-" if row.value is None else f"{row.value:.3f}"
        say(f"  {row.workload:38} {system:22} {shown:>12}  {row.note}")

    # -- the whole run --

    def run(self, only: set[str], systems: set[str]) -> None:
        self.load["start"] = [round(x, 2) for x in os.getloadavg()]
        try:
            self._run(only, systems)
        finally:
            self.load["end"] = [round(x, 2) for x in os.getloadavg()]

    def _run(self, only: set[str], systems: set[str]) -> None:
        sizes = self.sizes
        self.prepare_run_dir()
        timed = self.timed
        with timed("local copy"):
            self.local_copy()
        nats_url, store = self.start_store()
        self.store = store
        with timed("seeding"):
            asyncio.run(self.seed(store))
        workloads = [w for w in ("large1", "large8", "small", "walk", "rand") if w in only]
        shoal = self.shoal = ShoalNode(self.run_dir, nats_url, store, sizes, self.logs)
        shoal.start_services()
        # Room for the whole dataset under the high watermark: nothing is evicted in these workloads.
        shoal.apply(DATA, sizes.bucket, 2 * sum(s for _, s in sizes.objects()[sizes.bucket]) + 64 * MiB,
                    sizes.large()[0][0])
        shoal.env["SHOAL_LOG_LEVEL"] = self.log_level
        if "local" in systems:
            with timed("local disk"):
                self.run_local(workloads)
        if "direct" in systems:
            with timed("direct GETs"):
                self.run_direct(workloads)
        if "shoal" in systems:
            with timed("Shoal"):
                self.run_mounted(shoal, workloads)
        for system_type in (RcloneMount, S3fsMount):
            name = system_type.name
            if name not in systems:
                continue
            if shutil.which(name) is None:
                for workload in workloads:
                    for state in ("cold", "warm", "dropped"):
                        self.rows.append(Row(WORKLOADS[workload].title, name, state, None, WORKLOADS[workload].unit,
                                             f"{name} is not installed (apt-get install {name})"))
                continue
            with timed(name):
                self.run_mounted(system_type(self.run_dir, store, sizes.bucket, self.logs), workloads)
        if "epoch" in only and "shoal" in systems:
            with timed("epochs"):
                shoal.apply(EPOCH, sizes.epoch_bucket, sizes.epoch_total // 2, sizes.epoch()[0][0])
                self.run_epochs("lfu-admission")
                self.run_epochs("lru")
        shoal.stop()

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        console().print(f"[bold]{phase}[/bold]")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_times[phase] = time.perf_counter() - started
            console().print(f"  ({phase}: {self.phase_times[phase]:.0f} s)")


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any] | None:
    """Self and inclusive sample shares of the hottest functions in a py-spy raw (collapsed stacks) file."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_FRAMES):
            idle += count  # waiting: epoll of the event loop, a thread-pool worker waiting for work
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return None

    def shares(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(c / total, 3)) for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"file": str(path), "busy_samples": total, "idle_samples": idle, "self": shares(own),
            "inclusive": shares(inclusive)}


IDLE_FRAMES = ("EpollSelector.select (selectors.py", "_worker (thread.py:81)", "Condition.wait (threading.py",
               "select (selectors.py")


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file.py:12)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def short(note: str, limit: int = 90) -> str:
    """A note's first line, cut for the table (the JSON has it whole)."""
    line = note.strip().splitlines()[0] if note.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_note(result: dict[str, Any]) -> str:
    if result["complete"]:
        return ""
    parts = [f"partial: {result['files']} of {result['expected_files']} files in {result['seconds']:.0f} s"]
    if result["error_count"]:
        parts.append(f"{result['error_count']} errors, e.g. {result['errors'][0]}")
    return "; ".join(parts)


def fio_randread(path: Path, seconds: int, ios: int | None, jobs: int = FIO_JOBS
                 ) -> tuple[float | None, str, dict[str, Any]]:
    """IOPS of fio random 4 KiB reads: ``ios`` reads per job (cut at ``seconds``), or ``seconds`` time-based."""
    if shutil.which("fio") is None:
        return None, "fio is not installed (apt-get install fio)", {}
    argv = ["fio", "--name=randread", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
            f"--numjobs={jobs}", "--thread", "--group_reporting", f"--runtime={seconds}",
            "--invalidate=0", "--readonly", "--randrepeat=0", "--output-format=json"]
    argv += ["--time_based"] if ios is None else [f"--number_ios={ios}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if proc.returncode != 0:
        return None, f"fio failed: {(proc.stderr or proc.stdout).strip()[-300:]}", {}
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    job = report["jobs"][0]
    read = job["read"]
    note = (f"{jobs} jobs, psync, {seconds} s" if ios is None
            else f"first {jobs * ios:,} reads, {jobs} jobs, psync")
    if job.get("error"):
        note += f"; fio error {job['error']}"
    return float(read["iops"]), note, {"iops": read["iops"], "bw_kib": read["bw"],
                                       "lat_mean_us": read.get("clat_ns", {}).get("mean", 0) / 1000}


# --- reporting -----------------------------------------------------------------------------------------------

_console: Any = None


def console() -> Any:
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(width=170)
    return _console


def say(text: str) -> None:
    """A progress line, printed as is (no markup: notes carry errors like "[Errno 5]")."""
    console().print(text, markup=False, highlight=False)


def best_peer(rows: list[Row], workload: str, state: str) -> Row | None:
    candidates = [r for r in rows if r.workload == workload and r.value is not None and r.system in PEERS
                  and (r.state == state or r.state == "-" or state == "-")]
    return max(candidates, key=lambda r: r.value or 0.0, default=None)


def find_row(rows: list[Row], workload: str, system: str, state: str) -> Row | None:
    return next((r for r in rows if r.workload == WORKLOADS[workload].title and r.system == system
                 and r.state == state), None)


@dataclass
class Target:
    text: str
    measured: float | None
    bound: float | None
    detail: str

    @property
    def verdict(self) -> str:
        if self.measured is None or self.bound is None:
            return "n/a"
        return "PASS" if self.measured >= self.bound else "MISS"


def targets(rows: list[Row]) -> list[Target]:
    def value(workload: str, system: str, state: str) -> float | None:
        row = find_row(rows, workload, system, state)
        return None if row is None else row.value

    def ratio_target(text: str, ours: tuple[str, str, str], theirs: tuple[str, str, str], factor: float) -> Target:
        a, b = value(*ours), value(*theirs)
        ratio = None if a is None or b is None or b == 0 else a / b
        shown_a = "n/a" if a is None else f"{a:,.0f}"
        shown_b = "n/a" if b is None else f"{b:,.0f}"
        unit = WORKLOADS[ours[0]].unit
        detail = (f"{ours[1]} {STATE_LABEL[ours[2]]} {shown_a} {unit} vs {theirs[1]} {STATE_LABEL[theirs[2]]} "
                  f"{shown_b}: {'n/a' if ratio is None else f'{ratio:.2f}x'}")
        return Target(text, ratio, factor, detail)

    out: list[Target] = []
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers"), ("rand", "fio 4 KiB random")):
        out.append(ratio_target(f"warm reads ≥ 0.8x local disk warm ({label})", (workload, "Shoal", "warm"),
                                (workload, "local disk", "warm"), 0.8))
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers")):
        out.append(ratio_target(f"agent-disk-warm large reads ≥ s3fs warm ({label})",
                                (workload, "Shoal", "dropped"), (workload, "s3fs", "warm"), 1.0))
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers")):
        out.append(ratio_target(f"cold large reads ≥ 0.9x direct parallel GETs ({label})",
                                (workload, "Shoal", "cold"), (workload, "direct GETs", "-"), 0.9))
    out.append(ratio_target("small files warm ≥ 0.8x local warm", ("small", "Shoal", "warm"),
                            ("small", "local disk", "warm"), 0.8))
    out.append(ratio_target("small files cold ≥ direct GETs", ("small", "Shoal", "cold"),
                            ("small", "direct GETs", "-"), 1.0))
    out.append(ratio_target("metadata walk ≥ 0.5x local warm", ("walk", "Shoal", "warm"),
                            ("walk", "local disk", "warm"), 0.5))
    hit = next((r for r in rows if r.workload == WORKLOADS["epoch"].title and r.system == "Shoal (lfu-admission)"),
               None)
    out.append(Target("hit ratio ≥ 0.45 with the half-size cache (default policy, epochs 2-3)",
                      None if hit is None else hit.value, 0.45,
                      "not measured" if hit is None else (hit.note if hit.value is None
                                                          else f"{hit.value:.3f}; {hit.note}")))
    return out


def report(bench: Bench, out_path: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = bench.rows
    sizes = bench.sizes
    order = list(WORKLOADS)
    system_order = ["Shoal", "Shoal (lfu-admission)", "Shoal (lru)", "local disk", "rclone", "s3fs", "direct GETs"]
    state_order = ["cold", "warm", "dropped", "-", "epochs"]
    rows.sort(key=lambda r: (order.index(next(k for k, w in WORKLOADS.items() if w.title == r.workload)),
                             system_order.index(r.system) if r.system in system_order else 99,
                             state_order.index(r.state)))
    table = Table(title=(f"Shoal agent data path vs peers on one SeaweedFS (127.0.0.1), {os.cpu_count()} cores: "
                         f"{sizes.large_files}x{sizes.large_bytes // MiB} MiB, {sizes.small_files}x"
                         f"{sizes.small_bytes // KiB} KiB, {sizes.meta_files:,} files walked, "
                         f"{sizes.epoch_files}x{sizes.epoch_bytes // MiB} MiB epochs"))
    table.add_column("workload", no_wrap=True, min_width=20)
    table.add_column("system", no_wrap=True, min_width=21)
    table.add_column("state", no_wrap=True, min_width=16)
    for column, width in (("value", 16), ("vs local warm", 13), ("vs best peer", 16), ("CPU s d/s/r", 14)):
        table.add_column(column, justify="right", no_wrap=True, min_width=width)
    table.add_column("note", overflow="ellipsis", no_wrap=True)
    json_rows = []
    previous = ""
    for row in rows:
        key = next(k for k, w in WORKLOADS.items() if w.title == row.workload)
        local = find_row(rows, key, "local disk", "warm")
        peer = best_peer(rows, row.workload, row.state)
        vs_local = (row.value / local.value if row.value is not None and local is not None and local.value
                    else None)
        vs_peer = (row.value / peer.value if row.value is not None and peer is not None and peer.value else None)
        if row.value is None:
            shown = "—"
        elif row.unit == "hit ratio":
            shown = f"{row.value:.3f}"
        else:
            shown = f"{row.value:,.0f} {row.unit}"
        cpu = (f"{row.cpu.get('daemon', 0):.1f}/{row.cpu.get('store', 0):.1f}/{row.cpu.get('reader', 0):.1f}"
               if row.cpu else "")
        if previous and previous != row.workload:
            table.add_section()
        previous = row.workload
        peer_text = "" if vs_peer is None or peer is None else f"{vs_peer:.2f}x {peer.system.split()[0]}"
        table.add_row(WORKLOADS[key].label, row.system, STATE_SHORT[row.state], shown,
                      "" if vs_local is None else f"{vs_local:.2f}x", peer_text, cpu, escape(short(row.note)))
        json_rows.append({**asdict(row), "vs_local_warm": vs_local, "vs_best_peer": vs_peer,
                          "best_peer": None if peer is None else peer.system})
    out = console()
    out.print(table)
    drop_methods = ", ".join(sorted(bench.page_cache.methods)) or "not used"
    notes = [
        "States: cold = fresh cache dir and fresh mount (local disk: page cache dropped); warm = read again; "
        "warm, -pagecache = the kernel page cache dropped after the warm run (Shoal: agent disk cache only). Page "
        f"cache dropped with: {drop_methods}. CPU s d/s/r = CPU seconds of the mount daemon(s) (Shoal: agent and "
        "mount processes) / SeaweedFS / reader process during the run (median run for repeated warm runs).",
        "Best peer = the fastest of rclone, s3fs and direct GETs in the same state (direct GETs have no cache and "
        "count in every state). SeaweedFS's own files are read into the page cache before every cold run, so "
        "every system's misses meet the same in-memory object store on 127.0.0.1.",
        "Readers run in a separate worker process (Python threads, 1 MiB reads); the walk is find -printf %s "
        "(one stat per entry); random reads are fio psync, 8 jobs on one large file (cold and -pagecache: the first "
        "reads, an eighth of its pages; warm: time-based). Direct GETs: aiobotocore in one process (large: 8 MiB "
        "ranges, 16 in flight; small: 16 in flight; walk: LIST; random: 4 KiB ranges, 8 in flight).",
        "Epoch hit ratio: hitBytes/(hitBytes+missBytes) per epoch from the mount's inventory counters (a snapshot "
        "asked for after each epoch); the page cache is dropped before each epoch so every read reaches the agent; "
        "4 readers, files in a new shuffled order each epoch. rclone and s3fs have no hit counters (not measured).",
        "A Shoal workload whose runs failed (read errors, or the mount process replaced under it) is run again "
        "from a fresh mount, up to 3 times; its rows then say so.",
        "Phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in bench.phase_times.items())
        + f". Load average (1/5/15 min) at start {bench.load.get('start')}, at end {bench.load.get('end')}: "
        "other processes on this machine share its cores.",
    ]
    for note in notes + bench.notes:
        out.print(f"[dim]• {escape(note)}[/dim]")
    found = targets(rows)
    out.print("\n[bold]Targets (issue 3)[/bold]")
    for target in found:
        style = {"PASS": "green", "MISS": "red"}.get(target.verdict, "yellow")
        out.print(f"  [{style}]{target.verdict:4}[/{style}]  {escape(target.text)}: {escape(target.detail)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "sizes": asdict(sizes), "rows": json_rows, "load_average": bench.load,
        "targets": [{**asdict(t), "verdict": t.verdict} for t in found],
        "notes": notes + bench.notes, "page_cache_drop": sorted(bench.page_cache.methods),
    }, indent=2))
    out.print(f"[dim]results written to {out_path}[/dim]")


# --- entry point ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.agent", description=__doc__.splitlines()[0]
                                     if __doc__ else None)
    parser.add_argument("--state-dir", type=Path, default=Path(".shoal/bench"))
    parser.add_argument("--quick", action="store_true", help="small sizes, for trying the bench out")
    parser.add_argument("--workloads", default="large1,large8,small,walk,rand,epoch",
                        help="comma-separated subset of large1,large8,small,walk,rand,epoch")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--fio-seconds", type=int, default=None)
    parser.add_argument("--log-level", default="warning", help="SHOAL_LOG_LEVEL of the Shoal services")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of the Shoal mount process per measurement (needs py-spy in "
                             "the venv) under <state-dir>/agent-profiles")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return
    only = {w.strip() for w in args.workloads.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if systems - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(systems - set(SYSTEMS)))}")
    sizes = QUICK if args.quick else Sizes()
    if args.fio_seconds is not None:
        sizes = Sizes(**{**asdict(sizes), "fio_seconds": args.fio_seconds})
    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "agent-bench.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another agent bench is running on {state}") from None
    atexit.register(cleanup)
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    bench = Bench(sizes, state)
    bench.log_level = args.log_level
    if args.profile:
        if not (Path(sys.executable).parent / "py-spy").exists():
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        bench.profile_dir = state / "agent-profiles"
        shutil.rmtree(bench.profile_dir, ignore_errors=True)
        bench.profile_dir.mkdir(parents=True)
    started = time.perf_counter()
    try:
        bench.run(only, systems)
    finally:
        cleanup()
        bench.tidy()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()
    bench.phase_times["total"] = time.perf_counter() - started
    report(bench, state / f"agent-results{sizes.suffix}.json")  # --quick writes agent-results-quick.json


if __name__ == "__main__":
    main()
