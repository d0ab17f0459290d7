"""The agent data path end to end: a real FUSE mount of a SeaweedFS bucket, read with ordinary tools.

Services and the node agent run in-process on a real nats-server; each mount is a real process.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import msgspec
import pytest

from libs.bus import Bus
from libs.config import Settings
from libs.events.dataset import User
from services.agent.fs import NO_OPEN
from services.agent.metrics import target_path
from services.agent.mountinfo import device_of
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import (
    NODE,
    evict_from_page_cache,
    md5,
    node_stack,
    read_file,
    run_tool,
    scrape,
    series,
    target_port,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.needs("fuse")


def dataset_objects(seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    objects = {
        "train/big-0.bin": rng.randbytes(5 * MiB + 123),
        "train/big-1.bin": rng.randbytes(3 * MiB),
        "labels.csv": b"id,label\n" + b"".join(f"{i},{i % 10}\n".encode() for i in range(500)),
        "empty.txt": b"",
        "deep/a/b/c/leaf.txt": b"leaf",
    }
    for i in range(30):
        objects[f"small/f{i:03d}.jpg"] = rng.randbytes(rng.randint(1, 200_000))
    return objects


@pytest.mark.needs("fuse", "sysfs")
async def test_every_file_reads_back_identical(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                              bucket: str, tmp_path: Path) -> None:
    objects = dataset_objects()
    await put_objects(seaweedfs, bucket, objects)
    targets = tmp_path / "targets"
    async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
        await node.apply("imgs", bucket)
        root = await node.wait_mounted("imgs", expect="labels.csv")
        found = await run_tool("find", str(root), "-type", "f")
        assert sorted(os.path.relpath(p, root) for p in found.stdout.split()) == sorted(objects)
        sums = await run_tool("md5sum", *[str(root / key) for key in sorted(objects)])
        got = {os.path.relpath(line.split(maxsplit=1)[1], root): line.split()[0] for line in sums.stdout.splitlines()}
        assert got == {key: md5(body) for key, body in objects.items()}
        stat = await asyncio.to_thread(os.stat, root / "train/big-0.bin")
        assert stat.st_size == len(objects["train/big-0.bin"])
        assert stat.st_mode & 0o777 == 0o444
        cat = await run_tool("cat", str(root / "deep/a/b/c/leaf.txt"))
        assert cat.stdout == "leaf"
        # The kernel sends 1 MiB read requests: the mount's bdi read-ahead was raised from 128 KiB.
        device = device_of(str(root))
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"

        # The mount process's /metrics, found through its Prometheus target: every file came from the store once.
        port = target_port(targets, "imgs")
        assert port is not None
        mine = {"node": NODE, "dataset": "default/imgs"}
        total = sum(len(body) for body in objects.values())

        async def all_cached() -> dict | None:
            samples = await scrape(port)
            return samples if (series(samples, "shoal_cache_bytes", **mine, tier="disk") or 0) >= total else None

        first = await eventually(all_cached, what="every block in the disk tier, on /metrics")
        assert series(first, "shoal_read_bytes_total", **mine, source="store") == total
        assert series(first, "shoal_cache_capacity_bytes", **mine, tier="disk") == 256 * MiB
        assert (series(first, "shoal_fuse_request_duration_seconds_count", **mine, operation="read") or 0) > 0
        assert (series(first, "shoal_fuse_request_duration_seconds_count", **mine, operation="lookup") or 0) > 0
        assert (series(first, "shoal_store_request_duration_seconds_count", **mine, operation="get") or 0) > 0
        # Read twice more past the kernel's page cache: disk hits, not one more byte from the store.
        big = root / "train/big-1.bin"
        for _ in range(2):
            await asyncio.to_thread(evict_from_page_cache, big)
            assert md5(await read_file(big)) == md5(objects["train/big-1.bin"])
        second = await scrape(port)
        assert series(second, "shoal_read_bytes_total", **mine, source="store") == total
        hits = (series(second, "shoal_read_bytes_total", **mine, source="disk") or 0) - (
            series(first, "shoal_read_bytes_total", **mine, source="disk") or 0)
        assert hits == 2 * len(objects["train/big-1.bin"])
        assert (series(second, "shoal_block_reads_total", **mine, source="disk") or 0) >= 6  # 3 blocks, twice
    assert not target_path(str(targets), NODE, "default", "imgs").exists(), "the target outlived its mount"


async def test_owner_and_mtimes_come_from_the_dataset_and_manifest(bus: Bus, settings: Settings,
                                                                    seaweedfs: SeaweedServer, bucket: str,
                                                                    tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"owned/file.txt": b"mine"})
    targets = tmp_path / "targets"
    # SHOAL_METRICS=off rides along: the per-read series of this mount never move, its cache gauges still do.
    async with node_stack(bus, settings, seaweedfs, tmp_path, mount_env={"SHOAL_METRICS": "off"},
                          prometheus_targets_dir=str(targets)) as node:
        await node.apply("owned", bucket, owner=User(uid=1234, gid=5678))
        root = await node.wait_mounted("owned", expect="owned/file.txt")
        record = await node.record("owned")
        manifest = await (await bus.manifests()).get(record.status.manifest)
        (entry,) = [msgspec.json.decode(line) for line in (manifest.data or b"").splitlines()]
        stat = await asyncio.to_thread(os.stat, root / "owned/file.txt")
        assert (stat.st_uid, stat.st_gid) == (1234, 5678)
        assert abs(stat.st_mtime - entry["mtime"]) < 1e-3
        assert stat.st_size == 4

        assert (await run_tool("cat", str(root / "owned/file.txt"))).stdout == "mine"
        port = target_port(targets, "owned")
        assert port is not None
        mine = {"node": NODE, "dataset": "default/owned"}

        async def cached() -> dict | None:
            samples = await scrape(port)
            return samples if series(samples, "shoal_cache_bytes", **mine, tier="disk") == 4 else None

        samples = await eventually(cached, what="the file in the disk tier, on /metrics")
        for name in ("shoal_block_reads_total", "shoal_read_bytes_total", "shoal_fuse_request_duration_seconds_count",
                     "shoal_store_request_duration_seconds_count"):
            assert series(samples, name) is None, f"{name} moved with SHOAL_METRICS=off"


async def test_writes_fail_with_erofs_and_unknown_names_with_enoent(bus: Bus, settings: Settings,
                                                                   seaweedfs: SeaweedServer, bucket: str,
                                                                   tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.txt": b"a"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("ro", bucket)
        root = await node.wait_mounted("ro", expect="a.txt")
        for action in (lambda: open(root / "new.txt", "w"), lambda: open(root / "a.txt", "a"),
                       lambda: os.mkdir(root / "dir"), lambda: os.unlink(root / "a.txt")):
            with pytest.raises(OSError) as raised:
                await asyncio.to_thread(action)
            assert raised.value.errno == errno.EROFS
        for missing in ("nope.txt", "a.txt/inside", "sub/../../a.txt"):
            with pytest.raises(OSError) as raised:
                await asyncio.to_thread(os.stat, str(root) + "/" + missing)
            assert raised.value.errno in (errno.ENOENT, errno.ENOTDIR)


async def test_random_ranges_match_the_source(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                             bucket: str, tmp_path: Path) -> None:
    objects = dataset_objects(seed=11)
    await put_objects(seaweedfs, bucket, objects)
    rng = random.Random(3)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("ranges", bucket)
        root = await node.wait_mounted("ranges", expect="labels.csv")

        def read_range(key: str, offset: int, length: int) -> bytes:
            fd = os.open(root / key, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        keys = [k for k, v in objects.items() if v]
        for _ in range(200):
            key = rng.choice(keys)
            body = objects[key]
            offset = rng.randrange(0, len(body) + 10)
            length = rng.choice([1, 17, 4096, 65536, MiB, 3 * MiB])
            got = await asyncio.to_thread(read_range, key, offset, length)
            assert got == body[offset:offset + length], (key, offset, length)


async def test_sixteen_concurrent_readers(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str,
                                         tmp_path: Path) -> None:
    objects = {f"shard-{i:02d}.bin": os.urandom(2 * MiB + i) for i in range(16)}
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("par", bucket)
        root = await node.wait_mounted("par", expect="shard-15.bin")
        # Every reader reads every shard, in a different order, so misses for one block coincide.
        async def reader(i: int) -> dict[str, str]:
            order = sorted(objects, key=lambda k: (hash(k) + i) % 97)
            return {key: md5(await read_file(root / key)) for key in order}

        results = await asyncio.gather(*(reader(i) for i in range(16)))
        expected = {key: md5(body) for key, body in objects.items()}
        assert all(result == expected for result in results)


async def test_two_readers_of_one_file_in_different_places_each_keep_their_read_ahead(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # Without opens (the patched pyfuse3) the kernel's reads name the file, not the reader: the mount tells two
    # readers apart by where each read continues (services/agent/streams.py).
    assert NO_OPEN, "pyfuse3 is not the patched build: run `make venv`"
    body = random.Random(11).randbytes(32 * MiB)
    await put_objects(seaweedfs, bucket, {"model.bin": body})
    targets = tmp_path / "targets"
    async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
        await node.apply("halves", bucket, block_size="4Mi")
        root = await node.wait_mounted("halves", expect="model.bin")
        port = target_port(targets, "halves")
        assert port is not None

        def read_both_halves_in_turn() -> bytes:
            # Two descriptors, as two processes or a loader's two threads would have, each reading its half from
            # its start, one MiB from each in turn: the mount sees their reads interleaved.
            half = len(body) // 2
            first, second = bytearray(), bytearray()
            with open(root / "model.bin", "rb", buffering=0) as a, open(root / "model.bin", "rb", buffering=0) as b:
                for at in range(0, half, MiB):
                    first += os.pread(a.fileno(), MiB, at)
                    second += os.pread(b.fileno(), MiB, half + at)
            return bytes(first + second)

        assert md5(await asyncio.to_thread(read_both_halves_in_turn)) == md5(body)
        samples = await scrape(port)
        gets = series(samples, "shoal_store_request_duration_seconds_count", node=NODE, dataset="default/halves",
                      operation="get")
        # Each of the 8 blocks fetched whole, once, and at most one ranged GET more: the second reader's first
        # read, which continues nothing (a read taken for a random one is answered with a GET of just its bytes).
        # With one read state for the file, every read after the first few was taken for a random one.
        assert gets is not None and 8 <= gets <= 9, gets
        store_bytes = series(samples, "shoal_read_bytes_total", node=NODE, dataset="default/halves", source="store")
        assert store_bytes is not None and store_bytes <= len(body) + MiB


async def test_warm_files_and_walks_never_reach_the_mount_process_and_a_resync_relists(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The pyfuse3 `make venv` builds (deploy/pyfuse3) lets the mount answer open and opendir with ENOSYS.
    assert NO_OPEN, "pyfuse3 is not the patched build: run `make venv`"
    objects = dataset_objects()
    await put_objects(seaweedfs, bucket, objects)
    targets = tmp_path / "targets"
    async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
        await node.apply("warm", bucket)
        root = await node.wait_mounted("warm", expect="labels.csv")
        port = target_port(targets, "warm")
        assert port is not None
        mine = {"node": NODE, "dataset": "default/warm"}

        async def read_and_walk() -> dict:
            for key, body in objects.items():
                assert md5(await read_file(root / key)) == md5(body)
            found = await run_tool("find", str(root), "-type", "f", "-printf", "%s %P\n")
            assert sorted(found.stdout.splitlines()) == sorted(f"{len(b)} {k}" for k, b in objects.items())
            return await scrape(port)

        def requests(samples: dict, operation: str) -> float:
            return series(samples, "shoal_fuse_request_duration_seconds_count", **mine, operation=operation) or 0

        cold = await read_and_walk()
        assert requests(cold, "read") > 0 and requests(cold, "readdir") > 0
        # One OPEN and one OPENDIR, answered ENOSYS: the kernel sends neither again, nor any RELEASE.
        assert requests(cold, "open") == 1 and requests(cold, "opendir") == 1
        assert requests(cold, "release") == 0 and requests(cold, "releasedir") == 0
        warm = await read_and_walk()
        # Every page, name, attribute and listing was in the kernel: not one request of any kind but the statfs
        # find(1) makes once per run.
        operations = {dict(labels)["operation"] for (name, labels) in warm
                      if name == "shoal_fuse_request_duration_seconds_count"} - {"statfs"}
        assert {op: requests(warm, op) - requests(cold, op) for op in operations} == dict.fromkeys(operations, 0)

        # A resync that adds a file, then one that removes one: the kernel's copy of each changed listing goes.
        await put_objects(seaweedfs, bucket, {"small/zz-new.jpg": b"new"})
        await node.resync("warm")
        await eventually(lambda: asyncio.to_thread(os.path.exists, root / "small/zz-new.jpg"), what="the reload")
        assert "zz-new.jpg" in await asyncio.to_thread(os.listdir, root / "small")
        assert await read_file(root / "small/zz-new.jpg") == b"new"
        async with seaweedfs.client() as client:
            await client.delete_object(Bucket=bucket, Key="small/f000.jpg")
        await node.resync("warm")
        await eventually(lambda: asyncio.to_thread(lambda: not os.path.exists(root / "small/f000.jpg")),
                         what="the second reload")
        assert "f000.jpg" not in await asyncio.to_thread(os.listdir, root / "small")
        found = await run_tool("find", str(root / "small"), "-type", "f")
        assert len(found.stdout.split()) == 30  # 30 + 1 - 1


async def test_a_resync_shows_a_file_older_than_its_folder_in_the_listing_the_kernel_cached(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # A folder's mtime is its newest file's, so a file added with an older mtime leaves the folder's attributes as
    # they were: only the mount's invalidation of the folder's listing (which a no-open mount lets the kernel
    # cache) can make `ls` show it.
    assert NO_OPEN, "pyfuse3 is not the patched build: run `make venv`"
    source = tmp_path / "source"
    (source / "d").mkdir(parents=True)
    (source / "d/new.txt").write_bytes(b"new")
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("older", bucket, mount_point=f"local://{source}")
        root = await node.wait_mounted("older", expect="d/new.txt")
        folder = root / "d"
        assert await asyncio.to_thread(os.listdir, folder) == ["new.txt"]  # the kernel keeps this listing
        mtime = (await asyncio.to_thread(os.stat, folder)).st_mtime_ns
        (source / "d/old.txt").write_bytes(b"old")
        os.utime(source / "d/old.txt", (1_000_000_000, 1_000_000_000))
        await node.resync("older")
        # A lookup always asks the mount (unknown names are not cached), so this sees the new tree; the mount
        # invalidated the kernel's listing before serving it.
        await eventually(lambda: asyncio.to_thread(os.path.exists, folder / "old.txt"), what="the reload")
        assert (await asyncio.to_thread(os.stat, folder)).st_mtime_ns == mtime
        assert sorted(await asyncio.to_thread(os.listdir, folder)) == ["new.txt", "old.txt"]
        found = await run_tool("find", str(root), "-type", "f", "-printf", "%P\n")
        assert sorted(found.stdout.split()) == ["d/new.txt", "d/old.txt"]
