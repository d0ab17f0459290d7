"""What the agent bench measures: object sizes and layout (``Sizes``), the workloads, and fio's random reads."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.events.common import parse_quantity

KiB = 1024
MiB = 1024 * KiB
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


def count_and_size(variable: str, text: str) -> tuple[int, int]:
    """A bench's ``COUNTxSIZE`` setting: ``"8x128Mi"`` → (8, 128 MiB); a bad one stops the bench naming it."""
    count, _, size = text.partition("x")
    try:
        parsed = int(count), parse_quantity(size)
    except ValueError as err:
        raise SystemExit(f"{variable}={text!r}: expected COUNTxSIZE like 8x128Mi ({err})") from None
    if parsed[0] < 1 or parsed[1] < 1:
        raise SystemExit(f"{variable}={text!r}: count and size must be positive")
    return parsed


def content(key: str, size: int) -> bytes:
    """Deterministic incompressible bytes of an object, so the local copy and the bucket hold the same data."""
    return random.Random(key).randbytes(size)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    label: str  # short, for the table


WORKLOADS = {
    "large1": Workload("large1", "large files sequential, 1 reader", "MB/s", "large seq, 1 reader"),
    "large8": Workload("large8", "large files sequential, 8 readers", "MB/s", "large seq, 8 readers"),
    "small": Workload("small", "100 KiB files, 16 readers", "files/s", "100 KiB files, 16 rd"),
    # A data loader with one worker per core: the per-file latency, not the concurrency, sets the rate.
    "small2": Workload("small2", "100 KiB files, 2 readers", "files/s", "100 KiB files, 2 rd"),
    "walk": Workload("walk", "metadata walk", "stats/s", "metadata walk"),
    "rand": Workload("rand", "fio random 4 KiB reads", "IOPS", "fio rand 4 KiB"),
    "epoch": Workload("epoch", "epoch hit ratio, cache = ½ dataset", "hit ratio", "epoch hit, ½ cache"),
}


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
