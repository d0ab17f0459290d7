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
from services.agent.mountinfo import device_of
from tests.conftest import SeaweedServer, put_objects
from tests.integration.agent_stack import md5, node_stack, read_file, run_tool

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
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
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


async def test_owner_and_mtimes_come_from_the_dataset_and_manifest(bus: Bus, settings: Settings,
                                                                    seaweedfs: SeaweedServer, bucket: str,
                                                                    tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"owned/file.txt": b"mine"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("owned", bucket, owner=User(uid=1234, gid=5678))
        root = await node.wait_mounted("owned", expect="owned/file.txt")
        record = await node.record("owned")
        manifest = await (await bus.manifests()).get(record.status.manifest)
        (entry,) = [msgspec.json.decode(line) for line in (manifest.data or b"").splitlines()]
        stat = await asyncio.to_thread(os.stat, root / "owned/file.txt")
        assert (stat.st_uid, stat.st_gid) == (1234, 5678)
        assert abs(stat.st_mtime - entry["mtime"]) < 1e-3
        assert stat.st_size == 4


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
