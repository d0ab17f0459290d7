"""The agent bench's reader: a separate process (``python -m tests.bench.worker``, a JSON spec on stdin, a JSON
result on stdout) that reads files, walks trees and makes direct GETs, so the bench's own CPU use stays out of
the way; plus dropping the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.bench.processes import PROJECT_ROOT
from tests.bench.workloads import MiB

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
    proc = subprocess.run([sys.executable, "-m", "tests.bench.worker"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def worker_main() -> None:
    # The spec is one line, so a worker with ``"barrier": true`` can then say "ready" and wait for "go" on the
    # same stdin: the seed bench starts N consumers together that way.
    spec = json.loads(sys.stdin.readline())
    kinds: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "read": _work_read, "walk": _work_walk, "direct": _work_direct, "consume": _work_consume,
        "fullget": _work_fullget,
    }
    work = kinds[spec["kind"]]
    prepared = _prepare(spec)
    if spec.get("barrier"):
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit("no go: the bench went away")
    result = work({**spec, "prepared": prepared})
    print(json.dumps(result), flush=True)


def _prepare(spec: dict[str, Any]) -> Any:
    """Work done before the barrier (imports, an S3 client's signer) so it stays out of the timed part."""
    if spec["kind"] in ("consume", "fullget"):
        import xxhash

        if spec["kind"] == "fullget":
            import aiobotocore.session  # noqa: F401  (seconds of imports, outside the timed part)

        return xxhash
    return None


def _work_consume(spec: dict[str, Any]) -> dict[str, Any]:
    """One consumer of the seed bench: read one file to its end with ``chunk``-sized reads, hashing it (xxh3-128,
    cheap next to the read), as a model server loading its weights would."""
    hasher = spec["prepared"].xxh3_128()
    view = memoryview(bytearray(int(spec.get("chunk", MiB))))
    started_at = time.time()
    started = time.perf_counter()
    total = 0
    error = ""
    try:
        fd = os.open(spec["path"], os.O_RDONLY)
        try:
            while (n := os.readv(fd, [view])) > 0:
                hasher.update(view[:n])
                total += n
        finally:
            os.close(fd)
    except OSError as err:
        error = f"{spec['path']}: {err}"
    return {"bytes": total, "seconds": time.perf_counter() - started, "started_at": started_at,
            "ended_at": time.time(), "digest": hasher.hexdigest(), "error": error}


def _work_fullget(spec: dict[str, Any]) -> dict[str, Any]:
    """One direct reader of the seed bench: a single full GET of the object (streamed, hashed), no cache."""
    return asyncio.run(_fullget(spec))


async def _fullget(spec: dict[str, Any]) -> dict[str, Any]:
    from aiobotocore.session import get_session

    hasher = spec["prepared"].xxh3_128()
    total = 0
    error = ""
    async with get_session().create_client("s3", endpoint_url=spec["endpoint"], region_name="us-east-1",
                                           aws_access_key_id=spec["access_key"],
                                           aws_secret_access_key=spec["secret_key"]) as s3:
        started_at = time.time()
        started = time.perf_counter()
        try:
            response = await s3.get_object(Bucket=spec["bucket"], Key=spec["key"])
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(MiB):
                    hasher.update(chunk)
                    total += len(chunk)
        except Exception as err:
            error = f"{spec['key']}: {err}"
        seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "started_at": started_at, "ended_at": time.time(),
            "digest": hasher.hexdigest(), "error": error}


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


if __name__ == "__main__":
    worker_main()
