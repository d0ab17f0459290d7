"""CPU seconds per GiB of the mount process's hot byte paths, measured without FUSE, NATS or other agents.

Wall-clock throughput on a shared 2-core machine is noise; the CPU a process spends per GiB moved is not (or much
less). This harness drives exactly the code the mount process runs, in processes of its own, and reads their
user+sys time:

- ``load``: a DataLoad's fetch path (``BlockReader.warm``: presigned ranged GETs through ``StoreGate`` and
  ``S3ObjectStore``, the chunk table, the ``O_DIRECT`` block-file write of the disk tier) of one object from
  SeaweedFS, ``--concurrency`` blocks at once (the agent's default load concurrency);
- ``disk``: the same node reading those blocks back from its own disk tier (``BlockCache.get``: pread and a
  checksum per 64 KiB chunk), the reference of the peer rows;
- ``read``: a cold sequential reader of that object through ``BlockReader.read`` (1 MiB reads, read-ahead,
  blocks cached as fetched): the mount process's share of a cold FUSE read, without the kernel's;
- ``peer``: a warm owner (a separate process: ``PeerServer`` over its disk tier, ``sendfile``) and a cold reader
  (this process: ``PeerClient.get_block``, every chunk checked), ``--concurrency`` requests at once; both
  processes' CPU is reported.

Run: ``python -m tests.bench.cpu_per_gib [--paths load,disk,read,peer] [--mib 512] [--rounds 3] [--loop uvloop]``
(a SeaweedFS is started and stopped by PID; its own CPU is not counted). ``--loop`` picks the event loop of every
measured process. Numbers and the command go to ``docs/benchmarks.md`` ("CPU per GiB of the byte paths") by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from libs.blocks import BlockId
from libs.config import Secret
from libs.embedded import SeaweedConfig, free_port, start_seaweedfs
from libs.events.dataset import ManifestEntry
from libs.ufs.base import S3Location
from libs.ufs.s3 import S3ObjectStore
from services.agent.cache import BlockCache
from services.agent.cache.tiers import DiskTier
from services.agent.malloc import reuse_block_buffers
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 4 * MiB  # the runtime's default block size
KEY = "model.bin"
NAMESPACE, NAME = "bench", "cpu"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def use_loop(name: str) -> None:
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def self_cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def faults() -> int:
    """Minor page faults of this process so far (fresh memory for each block shows here, and in system time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def since(before: tuple[float, float], now: tuple[float, float] | None = None) -> tuple[float, float]:
    after = self_cpu() if now is None else now
    return after[0] - before[0], after[1] - before[1]


def location(endpoint: str, bucket: str, key_id: str, secret: str) -> S3Location:
    return S3Location(bucket=bucket, prefix="", endpoint_url=endpoint, access_key_id=Secret(key_id),
                      secret_access_key=Secret(secret), path_style=True)


def node(store: S3ObjectStore, cache_dir: Path, size: int) -> tuple[BlockReader, BlockCache]:
    """A mount process's reader and disk-tier cache, wired as ``mountd`` wires them (metrics off)."""
    cache = BlockCache([DiskTier(cache_dir, 4 * size + GiB)])
    cache.load()
    reader = BlockReader(cache, [StoreGate(store)], BLOCK, MemoryBudget(512 * MiB), write_block=cache.put_async)
    return reader, cache


async def bounded(count: int, concurrency: int, work: Callable[[int], Awaitable[object]]) -> None:
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await work(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def entry_of(size: int, etag: str) -> ManifestEntry:
    return ManifestEntry(path=f"/{KEY}", mount=0, key=KEY, size=size, etag=etag, mtime=0.0)


async def warm_all(reader: BlockReader, entry: ManifestEntry, concurrency: int) -> None:
    blocks = -(-entry.size // BLOCK)
    await bounded(blocks, concurrency, lambda index: reader.warm(entry, index))
    await reader.drain()


# --- the owner process (``--serve``) ---


async def serve(args: argparse.Namespace) -> None:
    from services.agent.peer import PeerServer

    store = S3ObjectStore(location(args.endpoint, args.bucket, args.key_id, args.secret))
    entry = entry_of(args.size, args.etag)
    reader, cache = node(store, Path(args.cache), args.size)
    await warm_all(reader, entry, args.concurrency)
    server = PeerServer(bytes.fromhex(args.peer_key), NAMESPACE, NAME, BLOCK,
                        lambda mount, key: entry if (mount, key) == (0, KEY) else None, reader.serve_block,
                        open_file=lambda e, index: cache.open_block(reader.block_id(e, index)))
    await server.start("127.0.0.1", args.port)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the harness closes stdin
    await server.stop()
    await store.close()


# --- the measurements ---


Cpu = tuple[float, float]  # user, system seconds


async def measure_load(store: S3ObjectStore, entry: ManifestEntry, cache_dir: Path,
                       concurrency: int) -> tuple[Cpu, float]:
    shutil.rmtree(cache_dir, ignore_errors=True)
    reader, cache = node(store, cache_dir, entry.size)
    started, cpu, faulted = time.perf_counter(), self_cpu(), faults()
    await warm_all(reader, entry, concurrency)
    cpu, wall = since(cpu), time.perf_counter() - started
    print(f"load: {(faults() - faulted) * GiB // entry.size} page faults per GiB", file=sys.stderr)
    blocks = -(-entry.size // BLOCK)
    assert all(cache.contains(reader.block_id(entry, index)) for index in range(blocks)), "a block was not cached"
    return cpu, wall


async def measure_read(store: S3ObjectStore, entry: ManifestEntry, cache_dir: Path) -> tuple[Cpu, float]:
    """A cold sequential reader of the whole object, 1 MiB reads, as FUSE asks the mount (without FUSE)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    reader, _ = node(store, cache_dir, entry.size)
    handle = reader.open(entry)
    started, cpu, faulted = time.perf_counter(), self_cpu(), faults()
    for offset in range(0, entry.size, MiB):
        data = await reader.read(handle, offset, MiB)
        assert len(data) == min(MiB, entry.size - offset)
    reader.close(handle)
    await reader.drain()
    cpu, wall = since(cpu), time.perf_counter() - started
    print(f"read: {(faults() - faulted) * GiB // entry.size} page faults per GiB", file=sys.stderr)
    return cpu, wall


async def measure_disk(store: S3ObjectStore, entry: ManifestEntry, cache_dir: Path) -> tuple[Cpu, float]:
    reader, _ = node(store, cache_dir, entry.size)
    blocks = -(-entry.size // BLOCK)
    started, cpu = time.perf_counter(), self_cpu()
    for index in range(blocks):
        data = reader.cache.get(reader.block_id(entry, index))
        assert data is not None and len(data) == min(BLOCK, entry.size - index * BLOCK)
    return since(cpu), time.perf_counter() - started


async def measure_peer(entry: ManifestEntry, url: str, key: bytes, server_pid: int,
                       concurrency: int) -> tuple[Cpu, Cpu, float]:
    from services.agent.peer import PeerClient

    client = PeerClient(key, NAMESPACE, NAME)
    blocks = -(-entry.size // BLOCK)
    got = [0]

    async def one(index: int) -> None:
        block = BlockId(mount=0, key=KEY, etag=entry.etag, index=index)
        data = await client.get_block(url, block, min(BLOCK, entry.size - index * BLOCK), BLOCK)
        got[0] += len(data)

    server_cpu = proc_cpu(server_pid)
    started, cpu, faulted = time.perf_counter(), self_cpu(), faults()
    await bounded(blocks, concurrency, one)
    cpu, wall = since(cpu), time.perf_counter() - started
    print(f"peer: {(faults() - faulted) * GiB // entry.size} page faults per GiB", file=sys.stderr)
    server_cpu = since(server_cpu, proc_cpu(server_pid))
    await client.close()
    assert got[0] == entry.size
    return cpu, server_cpu, wall


def per_gib(cpu: Cpu, size: int) -> tuple[float, float]:
    """(user + system, system) CPU seconds per GiB."""
    return sum(cpu) * GiB / size, cpu[1] * GiB / size


async def run(args: argparse.Namespace, endpoint: str, key_id: str, secret: str, bucket: str, etag: str,
              work: Path) -> None:
    store = S3ObjectStore(location(endpoint, bucket, key_id, secret))
    entry = entry_of(args.mib * MiB, etag)
    paths = args.paths.split(",")
    results: dict[str, list[tuple[tuple[float, float], float, tuple[float, float]]]] = {}
    gib = entry.size / GiB
    if "load" in paths or "disk" in paths:
        for _ in range(args.rounds):
            cpu, wall = await measure_load(store, entry, work / "load-cache", args.concurrency)
            results.setdefault("load", []).append((per_gib(cpu, entry.size), gib / wall, (0.0, 0.0)))
        if "disk" in paths:
            for _ in range(args.rounds):
                cpu, wall = await measure_disk(store, entry, work / "load-cache")
                results.setdefault("disk", []).append((per_gib(cpu, entry.size), gib / wall, (0.0, 0.0)))
    if "read" in paths:
        for _ in range(args.rounds):
            cpu, wall = await measure_read(store, entry, work / "read-cache")
            results.setdefault("read", []).append((per_gib(cpu, entry.size), gib / wall, (0.0, 0.0)))
    if "peer" in paths:
        peer_key = secrets.token_bytes(32)
        port = free_port()
        argv = [sys.executable, "-m", "tests.bench.cpu_per_gib", "--serve", "--endpoint", endpoint, "--bucket",
                bucket, "--key-id", key_id, "--secret", secret, "--size", str(entry.size), "--etag", etag,
                "--cache", str(work / "owner-cache"), "--port", str(port), "--peer-key", peer_key.hex(),
                *(["--plain-malloc"] if args.plain_malloc else []),
                "--loop", args.owner_loop or args.loop, "--concurrency", str(args.concurrency)]
        # Started (and waited for) before anything is timed; blocking the loop meanwhile costs nothing measured.
        owner = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
        try:
            assert owner.stdout is not None
            for line in owner.stdout:  # its log lines may come first
                if line.strip() == "ready":
                    break
            else:
                raise SystemExit("the owner did not start")
            for _ in range(args.rounds):
                cpu, server_cpu, wall = await measure_peer(entry, f"http://127.0.0.1:{port}", peer_key, owner.pid,
                                                           args.concurrency)
                results.setdefault("peer", []).append((per_gib(cpu, entry.size), gib / wall,
                                                       per_gib(server_cpu, entry.size)))
        finally:
            assert owner.stdin is not None
            owner.stdin.close()
            try:
                owner.wait(timeout=20)
            except subprocess.TimeoutExpired:
                owner.kill()
                owner.wait()
    await store.close()
    print(f"malloc={'plain' if args.plain_malloc else 'reuse'} loop={args.loop} "
          f"owner loop={args.owner_loop or args.loop} object={args.mib} MiB "
          f"blocks={BLOCK // MiB} MiB concurrency={args.concurrency} "
          f"rounds={args.rounds} (median, then each round)")
    for path, rows in results.items():
        line = f"{path:5} CPU s/GiB {describe([row[0] for row in rows])}"
        if path == "peer":
            line += f"  owner {describe([row[2] for row in rows])}"
        line += f"  (wall GiB/s, noise: {statistics.median(row[1] for row in rows):.2f})"
        print(line, flush=True)


def describe(values: list[tuple[float, float]]) -> str:
    """Median CPU s/GiB, its system part, and every round's."""
    total = statistics.median(value[0] for value in values)
    system = statistics.median(value[1] for value in values)
    return f"{total:.2f} (sys {system:.2f}) [" + ", ".join(f"{value[0]:.2f}" for value in values) + "]"


async def upload(endpoint: str, key_id: str, secret: str, bucket: str, size: int) -> str:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                           aws_access_key_id=key_id, aws_secret_access_key=secret) as client:
        await client.create_bucket(Bucket=bucket)
        await client.put_object(Bucket=bucket, Key=KEY, Body=os.urandom(size))
        head = await client.head_object(Bucket=bucket, Key=KEY)
        etag: str = head["ETag"].strip('"')
    # Once through, so SeaweedFS serves it from the page cache in every round.
    store = S3ObjectStore(location(endpoint, bucket, key_id, secret))
    for start in range(0, size, BLOCK):
        await store.get_range(KEY, start, BLOCK, etag)
    await store.close()
    return etag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cpu_per_gib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="load,disk,read,peer")
    parser.add_argument("--mib", type=int, default=512, help="object size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--owner-loop", choices=("asyncio", "uvloop"), help="the owner's loop (default: --loop)")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="without the mount process's malloc settings (services.agent.malloc)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--endpoint", "--bucket", "--key-id", "--secret", "--etag", "--cache", "--peer-key"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_loop(args.loop)
    if not args.plain_malloc:
        reuse_block_buffers()  # as the mount process does
    if args.serve:
        asyncio.run(serve(args))
        return
    work = Path(tempfile.mkdtemp(prefix="shoal-cpu-per-gib-"))
    config = SeaweedConfig.on_free_ports(work / "seaweedfs")
    weed = start_seaweedfs(config, work / "seaweedfs.log")
    try:
        bucket = "cpu-per-gib"
        etag = asyncio.run(upload(config.endpoint, config.access_key_id, config.secret_access_key, bucket,
                                  args.mib * MiB))
        asyncio.run(run(args, config.endpoint, config.access_key_id, config.secret_access_key, bucket, etag, work))
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
