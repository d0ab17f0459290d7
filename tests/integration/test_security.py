"""Attacks and careless input against real services, nats-server, SeaweedFS and FUSE mounts (issue 7).

- local:// serves each file's own mode and owner, only below SHOAL_LOCAL_ROOTS, and `nobody` reads through a
  mount only what it could read on the host;
- a cache tier never deletes files Shoal did not write, and never sits on a system path;
- an owner id beyond 32 bits is refused at apply and cannot wedge a mount's stat;
- delete and resync with names that are no valid key are answered with a rejection;
- secrets never land in a stream, a KV bucket or a log: refused by the CLI before publishing, masked in dead
  letters, URL credentials stripped wherever a mountPoint or endpoint is shown.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing

from libs import subjects
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import ObjectMeta
from libs.events.dataset import (
    Dataset,
    DatasetApply,
    DatasetDelete,
    DatasetRecord,
    DatasetResync,
    DatasetSpec,
    Mount,
    User,
)
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeDelete, RuntimeSpec, TieredStore
from services.agent.cache.tiers import MARKER
from services.dataset import app as dataset_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually, make_settings, running
from tests.integration.agent_stack import NODE, agent_env, mounted_paths, node_stack, run_tool
from tests.integration.test_cli import shoal

NOBODY = 65534
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can pass through (pytest's own tmp folders are 0700): mounts, data and cache live
    here, so what `nobody` is refused is refused by the mount, not by the path to it."""
    path = Path(tempfile.mkdtemp(prefix="shoal-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mounted in [p for p in mounted_paths() if p.startswith(str(path))]:
            subprocess.run(["fusermount3", "-u", "-z", mounted], check=False)
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=20, check=False)


def ssd_runtime(name: str, cache_dir: Path | str, quota: str = "64Mi") -> RuntimeApply:
    level = Level(mediumtype="SSD", quota=quota, path=str(cache_dir), high="0.95", low="0.8")
    return RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name=name),
                                        spec=RuntimeSpec(tieredstore=TieredStore(levels=[level]), block_size="1Mi")))


def local_dataset(name: str, folder: Path | str, owner: User | None = None) -> DatasetApply:
    return DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name),
                                        spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")], owner=owner)))


async def stream_bytes(bus: Bus, stream: str) -> bytes:
    """Every message a stream holds, payload and headers, as one blob to search."""
    info = await bus.js.stream_info(stream)
    blob = b""
    if info.state.messages == 0:
        return blob
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            message = await bus.js.get_msg(stream, seq)
        except Exception:  # a purged sequence
            continue
        blob += (message.data or b"") + json.dumps(dict(message.headers or {})).encode()
        if message.data:
            try:  # dead letters carry the original payload in base64
                payload = msgspec.json.decode(message.data).get("payload")
                if isinstance(payload, str):
                    blob += base64.b64decode(payload)
            except (msgspec.DecodeError, ValueError, AttributeError):
                pass
    return blob


async def kv_bytes(bus: Bus, bucket: str) -> bytes:
    """Every value (with history) of a KV bucket: its backing stream."""
    return await stream_bytes(bus, f"KV_{bucket}")


# --- 1. local:// ---


async def test_local_mount_serves_source_modes_so_nobody_cannot_read_root_only_files(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, open_dir: Path) -> None:
    data = open_dir / "data"
    (data / "private").mkdir(parents=True)
    (data / "public.txt").write_text("for everyone\n")
    (data / "public.txt").chmod(0o644)
    (data / "private" / "secret.txt").write_text("root only\n")
    (data / "private" / "secret.txt").chmod(0o600)
    # World-readable, but in a folder only root may enter: not readable by others on the host either.
    (data / "private" / "shielded.txt").write_text("behind a 0700 folder\n")
    (data / "private" / "shielded.txt").chmod(0o644)
    (data / "private").chmod(0o700)
    settings = make_settings(nats_server.url, seaweedfs.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key, local_roots=[str(data)])
    async with node_stack(bus, settings, seaweedfs, open_dir) as node:
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("hostdata", open_dir / "cache"))
        await bus.publish(subjects.DATASET_APPLY, local_dataset("hostdata", data))
        mnt = await node.wait_mounted("hostdata", "private/secret.txt")

        # allow_other is on and the path is open: nobody reads what the host lets it read...
        public = await asyncio.to_thread(as_nobody, "cat", str(mnt / "public.txt"))
        assert public.returncode == 0 and public.stdout == "for everyone\n", public.stderr
        # ...and nothing else.
        for name in ("secret.txt", "shielded.txt"):
            denied = await asyncio.to_thread(as_nobody, "cat", str(mnt / "private" / name))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (name, denied)
        served = await asyncio.to_thread(os.stat, mnt / "private" / "secret.txt")
        assert (served.st_mode & 0o777, served.st_uid, served.st_gid) == (0o400, 0, 0)
        shielded = await asyncio.to_thread(os.stat, mnt / "private" / "shielded.txt")
        assert shielded.st_mode & 0o077 == 0
        # root (the owner) still reads it.
        assert (await run_tool("cat", str(mnt / "private" / "secret.txt"))).stdout == "root only\n"

        # The Dataset's owner, where set, overrides the files' own: handed to nobody, nobody reads it.
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("handed", open_dir / "cache"))
        await bus.publish(subjects.DATASET_APPLY, local_dataset("handed", data, User(uid=NOBODY, gid=NOBODY)))
        handed = await node.wait_mounted("handed", "private/secret.txt")
        read = await asyncio.to_thread(as_nobody, "cat", str(handed / "private" / "secret.txt"))
        assert read.returncode == 0 and read.stdout == "root only\n", read.stderr


async def test_without_allow_other_only_root_reads_a_mount(bus: Bus, nats_server: NatsServer,
                                                          seaweedfs: SeaweedServer, open_dir: Path) -> None:
    data = open_dir / "data"
    data.mkdir()
    (data / "public.txt").write_text("for everyone on the host\n")
    (data / "public.txt").chmod(0o644)
    settings = make_settings(nats_server.url, seaweedfs.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key, local_roots=[str(data)])
    async with node_stack(bus, settings, seaweedfs, open_dir, allow_other=False) as node:
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("private", open_dir / "cache"))
        await bus.publish(subjects.DATASET_APPLY, local_dataset("private", data))
        mnt = await node.wait_mounted("private", "public.txt")
        mounts = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
        line = next(line for line in mounts.splitlines() if f" {mnt} " in line)
        assert "allow_other" not in line and "default_permissions" in line
        denied = await asyncio.to_thread(as_nobody, "cat", str(mnt / "public.txt"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        assert (await run_tool("cat", str(mnt / "public.txt"))).stdout == "for everyone on the host\n"

        # A chmod keeps the file's ETag (size and mtime), so its inode and the kernel's cached attributes stay;
        # the reload must invalidate them, or the old mode would be served for as long as the kernel keeps them.
        (data / "public.txt").chmod(0o600)
        await node.resync("private")

        async def new_mode_served() -> bool:
            return (await asyncio.to_thread(os.stat, mnt / "public.txt")).st_mode & 0o777 == 0o400

        await eventually(new_mode_served, what="the new mode through the mount after a resync")


async def test_local_paths_outside_the_configured_roots_are_refused(bus: Bus, nats_server: NatsServer,
                                                                    tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "etc").symlink_to("/etc")  # below a root by name, but leads out of it
    settings = make_settings(nats_server.url, local_roots=[str(allowed)])
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: dataset_app.run(settings, stop)):
        outside = local_dataset("outside", "/etc")
        await bus.publish(subjects.DATASET_APPLY, outside)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=outside.id)
        assert "'/etc' is not below an allowed local root" in rejected["reason"], rejected
        assert str(allowed) in rejected["reason"]

        linked = local_dataset("linked", allowed / "etc")
        await bus.publish(subjects.DATASET_APPLY, linked)
        await facts.wait_for("dataset.accepted.v1", causationId=linked.id)

        async def failed() -> DatasetRecord | None:
            record = await dataset_record(bus, "linked")
            return record if record and record.status.phase == "Failed" else None

        record = await eventually(failed, what="linked dataset Failed")
        assert "leads to '/etc'" in record.status.message and "not below an allowed local root" in \
            record.status.message
        assert not record.status.manifest

    no_roots = make_settings(nats_server.url, local_roots=[])
    async with running(lambda stop: dataset_app.run(no_roots, stop)):
        anywhere = local_dataset("anywhere", allowed)
        await bus.publish(subjects.DATASET_APPLY, anywhere)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=anywhere.id)
        assert "local:// mounts are disabled" in rejected["reason"] and "SHOAL_LOCAL_ROOTS" in rejected["reason"]


async def test_the_agent_refuses_a_local_mount_outside_its_own_roots(bus: Bus, nats_server: NatsServer,
                                                                     seaweedfs: SeaweedServer, tmp_path: Path) -> None:
    """The dataset service accepted the folder (its roots allow it); the agent's roots do not: no mount."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a")
    settings = make_settings(nats_server.url, local_roots=[str(tmp_path)])
    async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)):
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("elsewhere", tmp_path / "cache"))
        await bus.publish(subjects.DATASET_APPLY, local_dataset("elsewhere", data))

        async def synced() -> DatasetRecord | None:
            record = await dataset_record(bus, "elsewhere")
            return record if record and record.status.manifest else None

        await eventually(synced, what="elsewhere synced")
        env = {**agent_env(settings, seaweedfs, dataclasses.replace(settings.agent, node_name=NODE)),
               "SHOAL_LOCAL_ROOTS": str(tmp_path / "other")}
        mountpoint = tmp_path / "mnt"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.agent.mountd", "--namespace", "default", "--name", "elsewhere",
            "--mountpoint", str(mountpoint), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if str(mountpoint) in mounted_paths():
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        assert process.returncode != 0
        assert b"refusing to mount" in stderr and b"not below an allowed local root" in stderr, stderr[-2000:]
        assert str(mountpoint) not in mounted_paths()


async def test_a_local_folder_swapped_for_a_link_after_mounting_serves_nothing_from_outside_the_roots(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, open_dir: Path) -> None:
    """The owner of a folder below a root replaces it by a link to a folder outside the roots once it is mounted,
    having given its file the size and time of the outside file it wants: the agent (root) must not serve it."""
    allowed, outside = open_dir / "allowed", open_dir / "outside"
    team = allowed / "team" / "x"
    team.mkdir(parents=True)
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(b"root:secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    bait = team / "shadow"
    bait.write_bytes(b"x" * secret.stat().st_size)
    bait.chmod(0o644)
    os.utime(bait, ns=(secret.stat().st_atime_ns, secret.stat().st_mtime_ns))  # the same ETag as the secret's
    settings = make_settings(nats_server.url, seaweedfs.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key, local_roots=[str(allowed)])
    async with node_stack(bus, settings, seaweedfs, open_dir) as node:
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("swapped", open_dir / "cache"))
        await bus.publish(subjects.DATASET_APPLY, local_dataset("swapped", team))
        mnt = await node.wait_mounted("swapped", "shadow")

        shutil.rmtree(team)
        team.symlink_to(outside, target_is_directory=True)
        read = await run_tool("cat", str(mnt / "shadow"), check=False)
        assert b"secret-hash" not in read.stdout.encode(), read.stdout
        assert read.returncode != 0, read


# --- 3. cache tier paths ---


async def test_foreign_files_in_a_tier_directory_survive(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                         bucket: str, tmp_path: Path) -> None:
    """A tier pointed at a folder that already holds a git objects/ layout: nothing of it is deleted, and the agent's
    heartbeat says why the tier is not used and what to do (not "down ... recreate it", which would be wrong)."""
    await put_objects(seaweedfs, bucket, {"x.bin": b"x" * 3000})
    tier_dir = tmp_path / "cache" / "default" / "repo"
    objects = {tier_dir / "ab" / ("cd" * 19): b"blob 4\0git\n", tier_dir / "0f" / ("12" * 19): b"tree",
               tier_dir / "ab" / ".tmp_obj_x.tmp": b"half written", tier_dir / "pack" / "pack-1.idx": b"idx"}
    for path, body in objects.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("repo", bucket)
        mnt = await node.wait_mounted("repo", "x.bin")
        assert (await run_tool("cat", str(mnt / "x.bin"))).stdout == "x" * 3000  # served from the store

        async def beat_naming_the_tier() -> AgentHeartbeat | None:
            record, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), NODE, AgentRecord)
            beat = record.heartbeat if record is not None else None
            return beat if beat is not None and any(str(tier_dir) in p for p in beat.problems) else None

        beat = await eventually(beat_naming_the_tier, 30, "a heartbeat naming the refused tier")
    problem = next(p for p in beat.problems if str(tier_dir) in p)
    assert problem.startswith(f"mount default/repo: cache directory {tier_dir} holds files Shoal did not write ("), \
        problem
    assert "empty the folder, or change the runtime's tieredstore level path" in problem, problem
    assert "is down" not in problem and "mkdir" not in problem, problem
    assert not beat.healthy and beat.mount_health
    for path, body in objects.items():
        assert path.read_bytes() == body, path
    assert not (tier_dir / MARKER).exists()
    assert sorted(p.name for p in tier_dir.rglob("*") if p.is_file()) == sorted(p.name for p in objects)


async def test_system_tier_paths_and_absurd_quotas_are_rejected(bus: Bus, nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    facts = FactCollector()
    await facts.start(bus)
    cases = {"/": "'/' is a system folder", "/etc/shoal": "inside the system folder /etc",
             "/var": "'/var' is a system folder", "/proc/1": "inside the system folder /proc"}
    async with running(lambda stop: runtime_app.run(settings, stop)):
        for path, reason in cases.items():
            command = ssd_runtime("rt", path)
            await bus.publish(subjects.RUNTIME_APPLY, command)
            rejected = await facts.wait_for("runtime.rejected.v1", causationId=command.id)
            assert reason in rejected["reason"], rejected
        huge = ssd_runtime("rt", "/srv/cache/shoal", quota="1000000000000000000000000000000")
        await bus.publish(subjects.RUNTIME_APPLY, huge)
        rejected = await facts.wait_for("runtime.rejected.v1", causationId=huge.id)
        assert "is more than 9223372036854775807 bytes" in rejected["reason"], rejected
        fine = ssd_runtime("rt", "/var/cache/shoal", quota="1Pi")
        await bus.publish(subjects.RUNTIME_APPLY, fine)
        await facts.wait_for("runtime.accepted.v1", causationId=fine.id)


# --- 4. owner ids ---


async def test_owner_ids_beyond_32_bits_are_refused_and_cannot_wedge_a_mount(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"f.txt": b"hello"})
    facts = FactCollector()
    await facts.start(bus)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        bad = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="huge"), spec=DatasetSpec(
            mounts=[Mount(mount_point=f"s3://{bucket}/")], owner=User(uid=2**32, gid=2**40))))
        await bus.publish(subjects.DATASET_APPLY, bad)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=bad.id)
        assert "spec.owner.uid must be between 0 and 4294967294, got 4294967296" in rejected["reason"]
        assert "spec.owner.gid must be between 0 and 4294967294" in rejected["reason"]

        # A record stored before this validation existed (or written past the service): the mount must still
        # answer stat, never leave it hanging.
        await node.apply("huge", bucket)
        await facts.wait_for("dataset.accepted.v1", name="huge")
        mnt = await node.wait_mounted("huge", "f.txt")
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="huge"))
        await eventually(lambda: asyncio.to_thread(lambda: str(mnt) not in mounted_paths()), what="unmounted")
        record = DatasetRecord(dataset=bad.dataset, generation=1)
        kv = await bus.kv(subjects.KV_DATASETS)
        await kv.put(subjects.resource_key("default", "huge"), msgspec.json.encode(record))
        await node.wait_mounted("huge")
        stat = await asyncio.to_thread(subprocess.run, ["stat", "-c", "%u %g %s", str(mnt / "f.txt")],
                                       capture_output=True, text=True, timeout=15)
        assert stat.returncode == 0 and stat.stdout.split() == ["65534", "65534", "5"], stat
        assert (await run_tool("cat", str(mnt / "f.txt"))).stdout == "hello"


# --- 8. commands naming no valid key ---


@pytest.mark.parametrize("name", ["a b", "*", ">", "", "."])
async def test_delete_and_resync_with_invalid_names_are_rejected(bus: Bus, nats_server: NatsServer,
                                                                 name: str) -> None:
    settings = make_settings(nats_server.url)
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)):
        commands = [(subjects.DATASET_DELETE, DatasetDelete(name=name), "dataset.rejected.v1"),
                    (subjects.DATASET_RESYNC, DatasetResync(name=name), "dataset.rejected.v1"),
                    (subjects.DATASET_DELETE, DatasetDelete(name="ok", namespace=name), "dataset.rejected.v1"),
                    (subjects.RUNTIME_DELETE, RuntimeDelete(name=name), "runtime.rejected.v1")]
        for subject, command, _ in commands:
            await bus.publish(subject, command)
        for _, command, tag in commands:
            rejected = await facts.wait_for(tag, causationId=command.id, timeout=10)
            assert "is not a DNS-1035 label" in rejected["reason"] or "must not be empty" in rejected["reason"] \
                or "is not a DNS-1123 label" in rejected["reason"], rejected
        if name:  # the CLI itself asks for a name
            cli = await shoal(nats_server, "delete", "dataset", name)
            assert cli.exit_code == 1 and "rejected" in cli.stderr and "no answer" not in cli.stderr, cli.output
            resync = await shoal(nats_server, "resync", "dataset", name)
            assert resync.exit_code == 1 and "rejected" in resync.stderr, resync.output
    info = await bus.js.stream_info(subjects.STREAM_DEAD_LETTERS)
    assert info.state.messages == 0  # answered, not retried into the dead-letter stream
    consumer = await bus.js.consumer_info(subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS)
    assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0


async def test_resync_prints_what_it_did(bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    settings = make_settings(nats_server.url)
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: dataset_app.run(settings, stop)):
        command = local_dataset("demo", tmp_path / "d")
        await bus.publish(subjects.DATASET_APPLY, command)
        await facts.wait_for("dataset.accepted.v1", causationId=command.id)
        result = await shoal(nats_server, "resync", "dataset", "demo")
        # The service runs in this process, so its log lines (the sync it does meanwhile) share the captured stdout.
        printed = [line for line in result.stdout.splitlines() if "[info" not in line and not line.startswith("{")]
        assert result.exit_code == 0 and printed == ["dataset.shoal.io/demo resync requested"], result.output


# --- 9. secrets ---


async def test_cli_refuses_clear_text_secrets_before_publishing(bus: Bus, nats_server: NatsServer,
                                                                tmp_path: Path) -> None:
    manifest = tmp_path / "leaky.yaml"
    manifest.write_text(f"""
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: leaky}}
spec:
  mounts:
    - mountPoint: s3://bucket/
      options: {{aws.accessKeyId: AKIAEXAMPLE, aws.secretKey: "{SECRET}"}}
---
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: leaky-url}}
spec:
  mounts: [{{mountPoint: "s3://AKIAEXAMPLE:{SECRET}@bucket/"}}]
---
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: leaky-shared}}
spec:
  sharedOptions: {{endpoint: "http://user:{SECRET}@127.0.0.1:9000"}}
  mounts: [{{mountPoint: "s3://bucket/"}}]
""")
    result = await shoal(nats_server, "apply", "-f", str(manifest), wait_seconds=3)
    assert result.exit_code == 1
    assert SECRET not in result.output
    assert "spec.mounts[0].options.aws.secretKey holds a secret in clear text" in result.stderr
    assert "spec.mounts[0].mountPoint 's3://***@bucket/' has credentials in its URL" in result.stderr
    assert "spec.sharedOptions.endpoint 'http://***@127.0.0.1:9000' has credentials in its URL" in result.stderr
    info = await bus.js.stream_info(subjects.STREAM_COMMANDS)
    assert info.state.messages == 0  # nothing was published
    assert SECRET.encode() not in await stream_bytes(bus, subjects.STREAM_COMMANDS)


async def test_a_signed_or_token_mount_url_is_refused_without_showing_its_credential(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """A pre-signed web folder's signature (or a token) in the mount point's query: the rejection, the service's
    log line and the command stream quoted it whole ("must be a folder URL without '?' or '#'")."""
    point = f"http://127.0.0.1:9/files/?X-Amz-Signature={SECRET}&token={SECRET}"
    manifest = tmp_path / "signed.yaml"
    manifest.write_text(f"""
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: signed}}
spec:
  mounts: [{{mountPoint: "{point}"}}]
""")
    refused = await shoal(nats_server, "apply", "-f", str(manifest), wait_seconds=3)
    assert refused.exit_code == 1 and SECRET not in refused.output
    assert ("spec.mounts[0].mountPoint 'http://127.0.0.1:9/files/?X-Amz-Signature=***&token=***' has a credential "
            "in its query (X-Amz-Signature, token)") in refused.stderr
    assert (await bus.js.stream_info(subjects.STREAM_COMMANDS)).state.messages == 0  # nothing was published

    # Published by another system: rejected, the command erased from the stream.
    facts = FactCollector()
    await facts.start(bus)
    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: dataset_app.run(make_settings(nats_server.url), stop)):
            command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="signed"),
                                                   spec=DatasetSpec(mounts=[Mount(mount_point=point)])))
            await bus.publish(subjects.DATASET_APPLY, command)
            rejected = await facts.wait_for("dataset.rejected.v1", causationId=command.id)
    assert "has a credential in its query (X-Amz-Signature, token)" in rejected["reason"]
    assert "'http://127.0.0.1:9/files/?X-Amz-Signature=***&token=***' must be a folder URL" in rejected["reason"]
    for blob in (await stream_bytes(bus, subjects.STREAM_FACTS), await stream_bytes(bus, subjects.STREAM_COMMANDS),
                 repr(logs).encode()):
        assert SECRET.encode() not in blob


async def test_a_signed_or_token_endpoint_option_is_refused_without_showing_its_credential(
        bus: Bus, nats_server: NatsServer) -> None:
    """An S3 endpoint option whose query carries a signature or token was accepted (only a mount point's query was
    looked at): the secret travelled in the accepted dataset, its status facts and the record."""
    endpoint = f"http://127.0.0.1:9/?X-Amz-Signature={SECRET}"
    facts = FactCollector()
    await facts.start(bus)
    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: dataset_app.run(make_settings(nats_server.url), stop)):
            command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="signed"), spec=DatasetSpec(
                mounts=[Mount(mount_point="s3://bucket/", options={"endpoint": endpoint})],
                shared_options={"endpoint": f"http://127.0.0.1:9/#token={SECRET}"})))
            await bus.publish(subjects.DATASET_APPLY, command)
            rejected = await facts.wait_for("dataset.rejected.v1", causationId=command.id)
    assert ("spec.mounts[0].options.endpoint 'http://127.0.0.1:9/?X-Amz-Signature=***' has a credential in its "
            "query (X-Amz-Signature)") in rejected["reason"], rejected["reason"]
    assert "spec.sharedOptions.endpoint 'http://127.0.0.1:9/#token=***' has a credential" in rejected["reason"]
    for blob in (await stream_bytes(bus, subjects.STREAM_FACTS), await stream_bytes(bus, subjects.STREAM_COMMANDS),
                 repr(logs).encode()):
        assert SECRET.encode() not in blob


async def test_dead_letters_mask_secret_fields(bus: Bus, nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    facts = FactCollector()
    await facts.start(bus)
    schema_invalid = json.dumps({
        "type": "dataset.apply.v1", "id": "bad-secret",
        "dataset": {"metadata": {"name": "x"}, "spec": {"mounts": [{
            "mountPoint": f"s3://AKIA:{SECRET}@bucket/", "options": {"aws.secretKey": SECRET}}], "owner": "root"}},
    }).encode()
    malformed = (b'{"type": "dataset.apply.v1", "id": "broken", "dataset": {"spec": {"sharedOptions": '
                 b'{"aws.secretAccessKey": "' + SECRET.encode() + b'"}}')
    async with running(lambda stop: dataset_app.run(settings, stop)):
        for msg_id, payload in (("bad-secret", schema_invalid), ("broken", malformed)):
            await bus.js.publish(subjects.DATASET_APPLY, payload, headers={"Nats-Msg-Id": msg_id})
            await facts.wait_for("dataset.rejected.v1", causationId=msg_id)

        async def two_letters() -> int | None:
            count = (await bus.js.stream_info(subjects.STREAM_DEAD_LETTERS)).state.messages
            return count if count == 2 else None

        await eventually(two_letters, what="two dead letters")
    letters = await stream_bytes(bus, subjects.STREAM_DEAD_LETTERS)
    assert SECRET.encode() not in letters
    assert b'"aws.secretKey":"***"' in letters and b'"aws.secretAccessKey": "***"' in letters
    assert b"s3://***@bucket/" in letters  # the rest of the payload is kept for diagnosis
    assert SECRET.encode() not in await stream_bytes(bus, subjects.STREAM_FACTS)


async def test_url_credentials_are_never_shown(bus: Bus, nats_server: NatsServer) -> None:
    """In rejections, status messages, KV, status events and the service's log."""
    closed_port = 9  # discard: nothing listens, the listing fails with a message naming the endpoint
    settings = make_settings(nats_server.url, s3_endpoint=f"http://admin:{SECRET}@127.0.0.1:{closed_port}")
    facts = FactCollector()
    await facts.start(bus)
    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            in_point = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="a"), spec=DatasetSpec(
                mounts=[Mount(mount_point=f"s3://AKIA:{SECRET}@bucket/x")])))
            in_endpoint = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="b"), spec=DatasetSpec(
                mounts=[Mount(mount_point="s3://bucket/", options={"endpoint": f"ftp://u:{SECRET}@h/"})])))
            in_shared = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="c"), spec=DatasetSpec(
                mounts=[Mount(mount_point="s3://bucket/")], shared_options={"aws.secretKey": SECRET})))
            for command in (in_point, in_endpoint, in_shared):
                await bus.publish(subjects.DATASET_APPLY, command)
            point = await facts.wait_for("dataset.rejected.v1", causationId=in_point.id)
            assert "spec.mounts[0].mountPoint 's3://***@bucket/x' has credentials in its URL" in point["reason"]
            endpoint = await facts.wait_for("dataset.rejected.v1", causationId=in_endpoint.id)
            assert "'ftp://***@h/'" in endpoint["reason"]
            shared = await facts.wait_for("dataset.rejected.v1", causationId=in_shared.id)
            # The field where the secret was given, not the mount it was merged into.
            assert shared["reason"].startswith("spec.sharedOptions.aws.secretKey holds a secret in clear text")
            assert "spec.mounts[0].options" not in shared["reason"]

            # Credentials in the service's default endpoint: the sync fails, and says where, without them.
            plain = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="plain"),
                                                 spec=DatasetSpec(mounts=[Mount(mount_point="s3://bucket/")])))
            await bus.publish(subjects.DATASET_APPLY, plain)

            async def failed() -> DatasetRecord | None:
                record = await dataset_record(bus, "plain")
                return record if record and record.status.phase == "Failed" else None

            record = await eventually(failed, timeout=30, what="plain Failed")
            assert f"http://***@127.0.0.1:{closed_port}" in record.status.message, record.status.message
            await facts.wait_for("dataset.status.v1", name="plain")
    for blob in (await stream_bytes(bus, subjects.STREAM_FACTS), await stream_bytes(bus, subjects.STREAM_DEAD_LETTERS),
                 await kv_bytes(bus, subjects.KV_DATASETS), repr(logs).encode()):
        assert SECRET.encode() not in blob


# --- 10. library log lines are JSON too ---


@pytest.fixture
def agent_process(settings: Settings, seaweedfs: SeaweedServer, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The node agent as its own process (like `shoal up` runs it), logging to a file; (log, mount root)."""
    log_path = tmp_path / "agent.log"
    mount_root = tmp_path / "mnt"
    agent = dataclasses.replace(settings.agent, node_name=NODE, mount_root=str(mount_root), heartbeat_seconds=0.5)
    env = agent_env(dataclasses.replace(settings, agent=agent), seaweedfs, agent)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.agent"], env=env, stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
    try:
        yield log_path, mount_root
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
            for path in [p for p in mounted_paths() if p.startswith(str(mount_root))]:
                subprocess.run(["fusermount3", "-u", "-z", path], check=False)


async def test_every_agent_log_line_is_json_across_a_resync(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                            bucket: str, tmp_path: Path,
                                                            agent_process: tuple[Path, Path]) -> None:
    log_path, mount_root = agent_process
    objects = {f"dir{i}/f{j}.txt": b"x" for i in range(3) for j in range(20)}
    await put_objects(seaweedfs, bucket, objects)
    async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)):
        await bus.publish(subjects.RUNTIME_APPLY, ssd_runtime("logs", tmp_path / "cache"))
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
            metadata=ObjectMeta(name="logs"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))
        mnt = mount_root / "default" / "logs"

        async def visible() -> bool:
            return str(mnt) in mounted_paths() and await asyncio.to_thread(os.path.exists, mnt / "dir0" / "f0.txt")

        await eventually(visible, timeout=30, what="mounted")
        await run_tool("ls", str(mnt))  # the kernel now knows the folders, not the files in them
        async with seaweedfs.client() as client:
            for key in objects:
                if not key.startswith("dir0/"):
                    await client.delete_object(Bucket=bucket, Key=key)
        before = await dataset_record(bus, "logs")
        assert before is not None
        await bus.publish(subjects.DATASET_RESYNC, DatasetResync(name="logs"))

        async def reloaded() -> bool:
            return "manifest reloaded" in log_path.read_text(errors="replace")

        await eventually(reloaded, timeout=30, what="manifest reloaded in the agent log")
        listing = await run_tool("ls", str(mnt))
        assert listing.stdout.split() == ["dir0"]
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    assert lines
    not_json = []
    for line in lines:
        try:
            parsed: Any = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if not isinstance(parsed, dict) or "event" not in parsed:
            not_json.append(line)
    assert not not_json, "\n".join(not_json[:20])
