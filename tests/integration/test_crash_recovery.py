"""Processes killed with SIGKILL and started again, on real nats-server and SeaweedFS:

- the dataset service (`python -m services.dataset`) in the middle of a metadata sync: the sync completes, and a
  command published while it was down is applied;
- the node agent (`python -m services.agent`) while its dataset is mounted: the new agent replaces the mount
  process, there is exactly one mount again, and the blocks cached on disk are reused, not fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import AgentSettings, Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from services.dataset import app as dataset_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually, running
from tests.integration.agent_stack import (
    NODE,
    InventoryWatch,
    Node,
    agent_env,
    drop_page_cache,
    mount_pids,
    mounted_paths,
    read_file,
)
from tests.reliability import record_fault, stopwatch

OBJECTS = 400
MiB = 1024 * 1024


def start_service(nats_server: NatsServer, seaweedfs: SeaweedServer, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NATS_URL": nats_server.url,
        "SHOAL_S3_ENDPOINT": seaweedfs.endpoint,
        "SHOAL_S3_ACCESS_KEY_ID": seaweedfs.config.access_key_id,
        "SHOAL_S3_SECRET_ACCESS_KEY": seaweedfs.config.secret_access_key,
        # One object per listing page stretches the sync over hundreds of requests, so the kill lands inside it.
        "SHOAL_LIST_PAGE_SIZE": "1",
        "SHOAL_LOG_FORMAT": "json",
    }
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.dataset"], env=env, stdout=out, stderr=out)


async def test_killed_mid_sync_loses_nothing(bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer,
                                            bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {f"part-{i:04d}": b"z" * (i + 1) for i in range(OBJECTS)})
    facts = FactCollector()
    await facts.start(bus)
    log = tmp_path / "dataset.log"
    first = start_service(nats_server, seaweedfs, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="crashy"),
                                               spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}")])))
        await bus.publish(subjects.DATASET_APPLY, command)
        await facts.wait_for("dataset.accepted.v1", timeout=60, causationId=command.id)  # a cold start under load
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        record = await dataset_record(bus, "crashy")
        assert record is not None and record.status.synced_generation == 0, "the kill must land mid-sync"

        # While the service is down, another command arrives; JetStream keeps it.
        other = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="while-down"),
                                             spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}")])))
        await bus.publish(subjects.DATASET_APPLY, other)

        async def both_synced():
            records = [await dataset_record(bus, name) for name in ("crashy", "while-down")]
            done = all(r is not None and r.status.synced_generation == 1 for r in records)
            return records if done else None

        with stopwatch() as recovery:
            second = start_service(nats_server, seaweedfs, log)
            records = await eventually(both_synced, timeout=90, what="both datasets synced after restart")
        for synced in records:
            assert synced.status.file_num == OBJECTS
            assert synced.status.ufs_total_bytes == OBJECTS * (OBJECTS + 1) // 2
            assert synced.generation == 1
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
    assert second is not None and second.returncode == 0, log.read_text()[-3000:]
    record_fault(f"kill -9 of the dataset service mid-sync ({OBJECTS} objects, one per listing page), a command "
                 "published while it is down", "the restarted service syncs both datasets", recovery[0],
                 lost="nothing (each applied once: generation 1, every object listed)", area="services")


# --- the node agent, SIGKILLed with its mount in use ---


def mount_count(path: Path) -> int:
    with open("/proc/self/mountinfo") as mounts:
        return sum(1 for line in mounts if len(line.split()) > 4 and line.split()[4] == str(path))


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.agent"], env=env, stdout=out, stderr=out)


@pytest.mark.needs("fuse", "page-cache")
async def test_agent_killed_with_sigkill_recovers_its_mount_and_reuses_the_cache(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"k{i}.bin": os.urandom(2 * MiB + i) for i in range(3)}
    total = sum(len(body) for body in objects.values())
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    agent = AgentSettings(node_name=NODE, mount_root=str(tmp_path / "mnt"))
    node_settings = dataclasses.replace(settings, agent=agent)
    env = {**agent_env(node_settings, seaweedfs, agent), "SHOAL_HEARTBEAT_SECONDS": "0.5"}
    node = Node(bus, node_settings, seaweedfs, tmp_path / "mnt", tmp_path / "cache")
    log = tmp_path / "agent.log"
    first = start_agent(env, log)
    second: subprocess.Popen[bytes] | None = None
    old_mounts: list[int] = []
    try:
        async with running(lambda stop: dataset_app.run(node_settings, stop),
                           lambda stop: runtime_app.run(node_settings, stop)):
            await node.apply("survivor", bucket)
            root = await node.wait_mounted("survivor", expect="k2.bin", timeout=60)
            for key, body in objects.items():
                assert await read_file(root / key) == body

            async def all_cached() -> dict[str, Any] | None:
                event = inventory.latest()
                return event if event and event["counters"]["cachedBytes"] == total else None

            before = await eventually(all_cached, what="every block cached")
            old_mounts = mount_pids(root)
            assert len(old_mounts) == 1

            first.send_signal(signal.SIGKILL)  # kill -9 of the agent; its mount process is left behind
            first.wait(10)
            killed = time.monotonic()
            second = start_agent(env, log)

            async def recovered() -> dict[str, Any] | None:
                event = inventory.latest()
                if event is None or event["incarnation"] == before["incarnation"]:
                    return None
                pids = mount_pids(root)
                return event if pids and not set(pids) & set(old_mounts) else None

            snapshot = await eventually(recovered, timeout=60, what="a new mount process after the agent restart")
            remounted = time.monotonic() - killed

            async def found_again() -> dict[str, Any] | None:
                # The new mount serves at once; blocks no index of a clean stop listed it finds on disk in the
                # background, so its first reports may not count them yet.
                event = inventory.latest(snapshot["incarnation"])
                return event if event and event["counters"]["cachedBytes"] == total else None

            await eventually(found_again, timeout=60, what="the blocks on disk found again")
            await node.wait_mounted("survivor", expect="k2.bin", timeout=60)
            assert mount_count(root) == 1
            assert len(mount_pids(root)) == 1
            await asyncio.to_thread(drop_page_cache)
            for key, body in objects.items():
                assert await read_file(root / key) == body

            async def read_back_from_cache() -> dict[str, Any] | None:
                event = inventory.latest(snapshot["incarnation"])
                return event if event and event["counters"]["hitBytes"] >= total else None

            after = await eventually(read_back_from_cache, what="reads served by the cache after the restart")
            assert after["counters"]["missBytes"] == 0  # not one block fetched again

            # The old mount process does not linger once its mount was replaced.
            await eventually(lambda: _gone(old_mounts), timeout=30, what="the old mount process gone")
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log.read_text()[-3000:]
            assert mount_count(root) == 0
            record_fault("kill -9 of the node agent with its dataset mounted and fully cached",
                         "the restarted agent replaces the orphaned mount process (one mount again) and finds the "
                         "blocks on disk", remounted, lost="nothing (no block fetched again)", area="agents")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        # Mount processes outlive a killed agent; these are ours (started by the test's agents) to clean up.
        for pid in {*old_mounts, *mount_pids(tmp_path / "mnt" / "default" / "survivor")}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in [p for p in mounted_paths() if p.startswith(str(tmp_path))]:
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


async def _gone(pids: list[int]) -> bool:
    return all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
