"""http(s):// (Fluid's WebUFS) and pvc:// mounts end to end (issue 13): real web servers on loopback (aiohttp with
nginx-style autoindex pages; Python's http.server, which knows no Range), a folder per volume claim below
SHOAL_PVC_ROOT, SeaweedFS, nats-server, the services and a real FUSE mount read with ordinary tools.

- one dataset mixes local://, pvc://, two http:// folders and s3://; every file's md5 through the mount is the
  source's, the one behind the server without Range too;
- a file changed on the web server, or removed from it, after the sync fails its read with an errno (the mount
  keeps serving the rest);
- bad input: an unreachable web server, a listing that loops, a missing folder, a claim that does not exist, pvc://
  with no SHOAL_PVC_ROOT, and unknown options fail or are rejected with a message saying what to change.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import os
from pathlib import Path

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.embedded import LOOPBACK
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from services.dataset import app as dataset_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually, make_settings, running
from tests.integration.agent_stack import md5, node_stack, read_file, run_tool
from tests.web_source import PythonSource, WebSource, rewrite


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def apply(name: str, mounts: list[Mount], cache_dir: Path) -> tuple[RuntimeApply, DatasetApply]:
    level = Level(mediumtype="SSD", quota="64Mi", path=str(cache_dir), high="0.95", low="0.8")
    runtime = Runtime(metadata=ObjectMeta(name=name),
                      spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]), block_size="1Mi"))
    dataset = Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=mounts))
    return RuntimeApply(runtime=runtime), DatasetApply(dataset=dataset)


async def test_dataset_mixing_local_pvc_http_and_s3_reads_every_file(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    pvc_root = tmp_path / "claims"
    sources = {
        "local": (tmp_path / "local", {"l.txt": b"local\n"}),
        "pvc": (pvc_root / "default" / "train-data" / "set1", {"p/q.txt": b"claimed\n"}),
        "web": (tmp_path / "site" / "pub", {
            "a.txt": b"alpha\n", "sub dir/b.bin": os.urandom(1_500_000), "sub dir/deeper/c.txt": b"c" * 3000,
            "\u00fc name.txt": b"umlaut\n",
            # Read only after the server changes them (the md5 pass leaves late/ alone).
            "late/changed.txt": b"old" * 1000, "late/gone.txt": b"gone\n"}),
        "plain": (tmp_path / "plain", {"big.bin": os.urandom(2_500_000), "s.txt": b"small\n"}),
    }
    for root, files in sources.values():
        write_tree(root, files)
    s3_files = {"x/y.txt": b"from s3\n"}
    await put_objects(seaweedfs, bucket, s3_files)
    settings = make_settings(nats_server.url, seaweedfs.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key, pvc_root=str(pvc_root))
    async with WebSource(tmp_path / "site") as web:
        with PythonSource(tmp_path / "plain") as plain:
            mounts = [Mount(mount_point=f"local://{tmp_path / 'local'}", name="local"),
                      Mount(mount_point="pvc://train-data/set1", name="pvc"),
                      Mount(mount_point=web.url + "pub/", name="web"),
                      Mount(mount_point=plain.url, name="plain", options={"maxDepth": "4"}),
                      Mount(mount_point=f"s3://{bucket}/", name="s3")]
            async with node_stack(bus, settings, seaweedfs, tmp_path,
                                  mount_env={"SHOAL_PVC_ROOT": str(pvc_root)}) as node:
                for command, subject in zip(apply("mixed", mounts, tmp_path / "cache"),
                                            (subjects.RUNTIME_APPLY, subjects.DATASET_APPLY), strict=True):
                    await bus.publish(subject, command)
                mnt = await node.wait_mounted("mixed", expect="s3/x/y.txt")
                expected = {f"{name}/{key}": md5(data) for name, (_, files) in sources.items()
                            for key, data in files.items() if not key.startswith("late/")}
                expected.update({f"s3/{key}": md5(data) for key, data in s3_files.items()})
                found = await run_tool("sh", "-c", f"cd '{mnt}' && find . -path ./web/late -prune -o -type f "
                                       "-print0 | xargs -0 md5sum")
                seen = {line[34:].removeprefix("./"): line[:32] for line in found.stdout.splitlines()}
                assert seen == expected
                record = await node.record("mixed")
                assert record.status.file_num == len(expected) + 2

                # Changed and removed on the server after the sync: the read fails, never mixes versions.
                rewrite(tmp_path / "site" / "pub" / "late" / "changed.txt", b"new" * 1000)
                (tmp_path / "site" / "pub" / "late" / "gone.txt").unlink()
                for late in ("changed.txt", "gone.txt"):
                    with pytest.raises(OSError) as err:
                        await read_file(mnt / "web" / "late" / late)
                    assert err.value.errno == errno.ESTALE
                assert (await run_tool("cat", str(mnt / "web" / "a.txt"))).stdout == "alpha\n"


async def test_files_a_server_sends_with_a_content_encoding_read_as_sent(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, tmp_path: Path) -> None:
    # Pre-compressed files that the server labels "Content-Encoding: gzip" even to a client asking for identity (an
    # S3 website or a CDN serving objects stored with that header): their bytes are the gzip stream, the size the
    # listing took from the HEAD; decoded on the way, every read of them failed (EIO).
    files = {"logs.txt.gz": gzip.compress(b"a log line\n" * 100_000), "noise.gz": gzip.compress(os.urandom(1_500_000))}
    write_tree(tmp_path / "site", files)
    async with WebSource(tmp_path / "site", encoded=tuple(files)) as web, \
            node_stack(bus, settings, seaweedfs, tmp_path) as node:
        for command, subject in zip(apply("encoded", [Mount(mount_point=web.url)], tmp_path / "cache"),
                                    (subjects.RUNTIME_APPLY, subjects.DATASET_APPLY), strict=True):
            await bus.publish(subject, command)
        mnt = await node.wait_mounted("encoded", expect="noise.gz")

        def small_read() -> bytes:  # inside a block not cached yet: a GET of just these bytes
            fd = os.open(mnt / "noise.gz", os.O_RDONLY)
            try:
                return os.pread(fd, 100, 1_200_000)
            finally:
                os.close(fd)

        assert await asyncio.to_thread(small_read) == files["noise.gz"][1_200_000:1_200_100]
        sums = await run_tool("md5sum", *(str(mnt / name) for name in files))
        assert sorted(line.split()[0] for line in sums.stdout.splitlines()) == sorted(map(md5, files.values()))


async def test_bad_web_and_claim_sources_fail_or_are_rejected_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, refused_port: int) -> None:
    pvc_root = tmp_path / "claims"
    (pvc_root / "default" / "present").mkdir(parents=True)
    site = tmp_path / "site"
    write_tree(site, {"loop/a/f.txt": b"f", "ok/f.txt": b"f"})
    (site / "loop" / "a" / "again").symlink_to("..")
    settings = make_settings(nats_server.url, pvc_root=str(pvc_root))
    facts = FactCollector()
    await facts.start(bus)
    async with WebSource(site) as web, running(lambda stop: dataset_app.run(settings, stop)):
        failing = {
            "offline": (f"http://{LOOPBACK}:{refused_port}/data/", "unreachable"),
            "loops": (web.url + "loop/", "loops"),
            "missing": (web.url + "nope/", "does not exist"),
            "no-claim": ("pvc://absent/sub", "volume claim 'absent' of namespace 'default' is not mounted"),
            "no-folder": ("pvc://present/sub", "folder 'sub' does not exist in volume claim 'present'"),
        }
        for name, (point, _) in failing.items():
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=point)]))))
        refused = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="refused"), spec=DatasetSpec(mounts=[
            Mount(mount_point=web.url + "ok/", name="web", options={"maxDepth": "-1", "headers": "x"})])))
        await bus.publish(subjects.DATASET_APPLY, refused)
        for name, (_, reason) in failing.items():
            async def failed(name: str = name) -> DatasetRecord | None:
                record = await dataset_record(bus, name)
                return record if record and record.status.phase == "Failed" else None

            record = await eventually(failed, timeout=20, what=f"{name} failed")
            assert reason in record.status.message, (name, record.status.message)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=refused.id)
        assert "options.maxDepth must be a positive whole number" in rejected["reason"]
        assert "options.headers is not supported for web mounts" in rejected["reason"]

    # Without SHOAL_PVC_ROOT, pvc:// is refused at apply, saying which setting enables it.
    async with running(lambda stop: dataset_app.run(make_settings(nats_server.url), stop)):
        command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="no-root"),
                                               spec=DatasetSpec(mounts=[Mount(mount_point="pvc://present")])))
        await bus.publish(subjects.DATASET_APPLY, command)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=command.id)
        assert "pvc:// mounts are disabled" in rejected["reason"] and "SHOAL_PVC_ROOT" in rejected["reason"]
