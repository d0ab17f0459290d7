"""Agent data-path bench: Shoal's FUSE mount against its peers, on one SeaweedFS and the same objects.

Systems, side by side:
- Shoal: the dataset, runtime and node agent services as their own processes (as in production); each dataset is
  mounted by the agent's mount process. States: cold (fresh cache dir and fresh mount), warm (read again), warm
  with the mount's own pages evicted (large files: the agent's block files still in memory, as a warm s3fs's cache
  files are), and warm with the kernel page cache dropped (only the agent's disk cache left);
- rclone mount ``--vfs-cache-mode full`` and s3fs ``-o use_cache`` (Debian packages), same three states (cold =
  fresh cache dir and fresh mount);
- direct parallel GETs with aiobotocore (no cache, one state);
- local disk, cold (page cache dropped) and warm;
- a minimal pyfuse3 passthrough of the local copy (``tests.bench.passthrough``: ``keep_cache``, the same pyfuse3
  and kernel read-ahead as Shoal's mount), the reference of Shoal's warm large reads.

Workloads: large files read sequentially (MB/s, 1 and 8 readers), 100 KiB files with 16 and with 2 readers
(files/s), a metadata walk of 20k files with find(1) (stats/s), fio random 4 KiB reads (IOPS), and Shoal's hit
ratio over shuffled epochs with a cache half the dataset's size (default policy, then LRU). Every mounted system
reads the same way in each state (one cold run, then up to three warm runs, the median kept), so warm rows follow
the same number of prior reads.

Readers run in a worker process (``tests.bench.worker``) so the bench's own CPU use stays out of the way.
The objects and their local copy are kept under .shoal/bench/ so later runs skip seeding. Results: one table,
the issue's targets with PASS/MISS, and .shoal/bench/agent-results.json. Every child process is stopped by its
PID and every FUSE mount removed, also on errors and Ctrl-C.

The parts: ``workloads`` (sizes, workloads, fio), ``systems`` (the systems under test), ``processes`` (children
through ``libs.embedded``, mounts, cleanup), ``worker`` (the reader process) and ``report`` (table, targets,
JSON); this module runs them (``Bench``) and parses the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import fcntl
import functools
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench.processes import (
    PROJECT_ROOT,
    Child,
    _on_signal,
    _servers,
    children_cpu,
    cleanup,
    cpu_seconds,
    fresh_run_dir,
    mounts_under,
)
from tests.bench.report import STATE_LABEL, SYSTEMS, Row, report, say, short, summarize_profile, timed_phase
from tests.bench.systems import (
    DATA,
    EPOCH,
    MountedSystem,
    PassthroughMount,
    RcloneMount,
    S3fsMount,
    ShoalNode,
    Store,
)
from tests.bench.worker import PageCache, evict, run_worker, worker_main
from tests.bench.workloads import FIO_JOBS, QUICK, WORKLOADS, KiB, MiB, Sizes, content, fio_randread, read_note

# Readers of the read workloads, and which read 100 KiB files.
READERS = {"large1": 1, "large8": 8, "small": 16, "small2": 2}
SMALL = ("small", "small2")
# The passthrough is the reference of warm large reads; its small-file and walk rows cost seconds and tell how far
# Shoal's daemon is from a bare one there too. fio's random reads are left out (the same pages as large reads).
PASSTHROUGH_WORKLOADS = ("large1", "large8", "small", "walk")
# Workloads also read with the mount's own pages evicted and the daemon's cache files left in memory.
FUSEDROP_WORKLOADS = ("large1", "large8")
DOCS_PATH = PROJECT_ROOT / "docs" / "benchmarks.md"


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
        fresh_run_dir(self.run_dir, self.logs)

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
        if workload in READERS:
            objects = sizes.small() if workload in SMALL else sizes.large()
            readers = READERS[workload]
            result = run_worker({"kind": "read", "files": self.files(root, objects), "readers": readers,
                                 "chunk": MiB, "deadline": sizes.deadline}, sizes.deadline + 120)
            if result["error_count"]:
                return None, f"failed: {read_note(result)}", result
            value = (result["files"] / result["seconds"] if workload in SMALL
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
        states = ("cold", "warm", "fusedrop", "dropped") if workload in FUSEDROP_WORKLOADS else ("cold", "warm",
                                                                                                 "dropped")
        for state in states:
            if state == "warm":
                self.prime(workload, system.root)
            if state == "dropped":
                self.drop([*system.cache_dirs, system.root / "large", system.root / "small"])
            run = functools.partial(self.measure, workload, system.root, state)
            if state == "fusedrop":
                run = functools.partial(self.after_evicting, system.root / "large", run)
            row = self.record(workload, system.name, state, run, system.daemon_pids,
                              repeat=1 if state in ("cold", "dropped") else 3)
            now = system.serving_pids()
            if now != serving:
                row.value = None
                row.note = "; ".join(filter(None, [f"invalid: the mount process changed during the run "
                                                   f"({serving} → {now})", row.note]))
                say(f"  {row.note}")

    @staticmethod
    def after_evicting(folder: Path, run: Callable[[], tuple[float | None, str, dict[str, Any]]]
                       ) -> tuple[float | None, str, dict[str, Any]]:
        """``run`` after the mount's own pages of ``folder`` are evicted, and only those: every read reaches the
        daemon, whose cache files stay in the page cache (as a warm s3fs reads its cache files)."""
        evict(folder)
        return run()

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
            "small2": ({"mode": "small", "keys": [k for k, _ in self.sizes.small()], "concurrency": 2},
                       "2 GETs in flight"),
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
                         "small": result["objects"] / seconds, "small2": result["objects"] / seconds,
                         "walk": result["objects"] / seconds,
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
        workloads = [w for w in ("large1", "large8", "small", "small2", "walk", "rand") if w in only]
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
        if "passthrough" in systems:
            with timed("passthrough"):
                self.run_mounted(PassthroughMount(self.run_dir, self.local_root / sizes.bucket, self.logs),
                                 [w for w in workloads if w in PASSTHROUGH_WORKLOADS])
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

    def timed(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return timed_phase(self.phase_times, phase)


# --- entry point ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.agent", description=__doc__.splitlines()[0]
                                     if __doc__ else None)
    parser.add_argument("--state-dir", type=Path, default=Path(".shoal/bench"))
    parser.add_argument("--quick", action="store_true", help="small sizes, for trying the bench out")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--fio-seconds", type=int, default=None)
    parser.add_argument("--log-level", default="warning", help="SHOAL_LOG_LEVEL of the Shoal services")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of the Shoal mount process per measurement (needs py-spy in "
                             "the venv) under <state-dir>/agent-profiles")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    # SHOAL_BENCH_AGENT_DOCS: 1 rewrites the agent section of docs/benchmarks.md, 0 never; by default a run of every
    # workload and system at full size does.
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
    # The docs section only from a full run of everything (or when asked): a partial run would drop rows from it.
    everything = only == set(WORKLOADS) and systems == set(SYSTEMS) and not args.quick
    write_docs = {"1": True, "0": False}.get(os.environ.get("SHOAL_BENCH_AGENT_DOCS", "").strip(), everything)
    report(bench, state / f"agent-results{sizes.suffix}.json",  # --quick writes agent-results-quick.json
           DOCS_PATH if write_docs else None)


if __name__ == "__main__":
    main()
