"""The dataset service as a real process (`python -m services.dataset`), killed with SIGKILL in the middle of a
metadata sync and started again: the sync completes, and a command published while it was down is applied.
Real nats-server and SeaweedFS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from libs import subjects
from libs.bus import Bus
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually

OBJECTS = 400


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
        await facts.wait_for("dataset.accepted.v1", causationId=command.id)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        record = await dataset_record(bus, "crashy")
        assert record is not None and record.status.synced_generation == 0, "the kill must land mid-sync"

        # While the service is down, another command arrives; JetStream keeps it.
        other = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="while-down"),
                                             spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}")])))
        await bus.publish(subjects.DATASET_APPLY, other)

        second = start_service(nats_server, seaweedfs, log)

        async def both_synced():
            records = [await dataset_record(bus, name) for name in ("crashy", "while-down")]
            done = all(r is not None and r.status.synced_generation == 1 for r in records)
            return records if done else None

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
