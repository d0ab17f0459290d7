"""The elastic cache and autoSync on real agents (``agent_stack.cluster_stack``: two in-process agents with real
FUSE mounts over SeaweedFS and nats-server, the dataset and runtime services in-process): reading more than half
of one worker's cache grows the runtime to two workers; once the reads stop, it shrinks back to one after the
cool-down. Each decision is a ``runtime.autoscaled.v1`` fact with its reason, kept in ``status.autoscaling`` and
shown by ``shoal describe runtime``. Then an object added to the bucket reaches the mount by autoSync alone, within
its (short) period. One stack for both: starting agents and mounts is most of such a test's time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus
from libs.cli.render import describe_runtime
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from libs.events.runtime import (
    AutoscalingPolicy,
    Level,
    Runtime,
    RuntimeApply,
    RuntimeAutoscaled,
    RuntimeRecord,
    RuntimeSpec,
    TieredStore,
)
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import dataset_record, eventually, runtime_record
from tests.integration.agent_stack import cluster_stack, md5, read_file
from tests.metric_values import Snapshot

pytestmark = pytest.mark.needs("fuse")

MiB = 1024 * 1024
NAME = "elastic"
# Short, so the test sees a growth and a shrink within seconds (the default is minutes).
COOL_DOWN_SECONDS = 2
# One worker's cache: six 1 MiB files read through it fill it past the target (the tier evicts at 95% to 70%).
QUOTA = "4Mi"
# autoSync's period here (SHOAL_AUTOSYNC_SECONDS; the default is minutes).
AUTOSYNC_SECONDS = 1.0
POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=2, target_cache_used_percent=50,
                           cool_down_seconds=COOL_DOWN_SECONDS)


def read_uncached(path: Path) -> bytes:
    """The file's bytes, its page cache dropped first: the reads reach the mount process and count as reads."""
    with path.open("rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return file.read()


async def workers_are(bus: Bus, count: int) -> RuntimeRecord:
    async def probe() -> RuntimeRecord | None:
        record = await runtime_record(bus, NAME)
        return record if record is not None and record.runtime.spec.replicas == count \
            and len(record.status.workers) == count else None

    return await eventually(probe, timeout=30, what=f"{count} cache workers")


async def test_the_cache_grows_under_reads_shrinks_after_the_cool_down_and_autosync_brings_a_new_object(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service,
                                                                         autosync_seconds=AUTOSYNC_SECONDS))
    rng = random.Random(13)
    files = {f"part-{i}.bin": rng.randbytes(MiB) for i in range(6)}
    await put_objects(seaweedfs, bucket, files)
    facts: list[RuntimeAutoscaled] = []

    async def collect(msg: Any) -> None:
        facts.append(msgspec.json.decode(msg.data, type=RuntimeAutoscaled))

    counted = Snapshot()
    subscription = await bus.nc.subscribe(subjects.RUNTIME_AUTOSCALED, cb=collect)
    try:
        async with cluster_stack(bus, settings, seaweedfs, tmp_path, {"node-a": {}, "node-b": {}}) as cluster:
            runtime = Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
                replicas=1, block_size="1Mi", autoscaling=POLICY,
                tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota=QUOTA, path=str(cluster.cache_dir))])))
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                metadata=ObjectMeta(name=NAME), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))))
            first = await workers_are(bus, 1)
            worker = first.status.workers[0].node  # the first agent heard from
            await cluster.wait_mounted(NAME, expect="part-0.bin", nodes=[worker])

            # The load: every file read through the one worker's mount (its own cache fills), pass after pass
            # while the runtime has not grown. A growth needs a look (once a second) that sees reads and a cache
            # past the target at once: one quick pass could fall before the cache figure came and be over by the
            # next look, on a busy machine. Each pass drops the files' pages first, so its reads reach the mount.
            root = cluster.agents[worker].mountpoint(NAME)

            async def grown_while_reading() -> RuntimeRecord | None:
                for name, data in files.items():
                    assert md5(await asyncio.to_thread(read_uncached, root / name)) == md5(data)
                record = await runtime_record(bus, NAME)
                return record if record is not None and record.runtime.spec.replicas == 2 \
                    and len(record.status.workers) == 2 else None

            grown = await eventually(grown_while_reading, timeout=30, what="2 cache workers while reading")
            await eventually(lambda: asyncio.sleep(0, facts[:1] or None), what="the growth's fact")
            up = facts[0]
            assert (up.from_replicas, up.to_replicas) == (1, 2)
            assert up.reason.startswith("grow: cache ") and ">= target 50% while reading" in up.reason, up.reason
            assert up.cache_used_percent >= 50

            # No reads: one cool-down after the growth (and the last pressure), back to one worker.
            await workers_are(bus, 1)
            await eventually(lambda: asyncio.sleep(0, facts[1:2] or None), what="the shrink's fact")
            down = facts[1]
            assert (down.from_replicas, down.to_replicas) == (2, 1), facts
            assert down.reason.startswith(f"shrink: no pressure for {COOL_DOWN_SECONDS} s"), down.reason
            record = await runtime_record(bus, NAME)
            assert record is not None and record.status.autoscaling is not None
            assert [d.reason for d in record.status.autoscaling.decisions] == [up.reason, down.reason]
            assert grown.status.autoscaling is not None
            assert record.status.autoscaling.last_scale_time > grown.status.autoscaling.last_scale_time
            assert [counted.moved("shoal_runtime_autoscales_total", direction=direction)
                    for direction in ("up", "down")] == [1, 1]
            shown = describe_runtime(record)
            assert "Autoscaling:" in shown and up.reason in shown and down.reason in shown

            # autoSync (the runtime leaves it unset: on, as in Fluid): an object added to the bucket is listed
            # within the period, and the mount shows it without a resync.
            late = rng.randbytes(1000)
            await put_objects(seaweedfs, bucket, {"late.bin": late})
            await eventually(lambda: asyncio.to_thread(os.path.exists, root / "late.bin"), timeout=20,
                             what="late.bin in the mount")
            assert md5(await read_file(root / "late.bin")) == md5(late)
            dataset = await dataset_record(bus, NAME)
            assert dataset is not None and dataset.status.file_num == 7
            assert (dataset.generation, dataset.sync_requests) == (1, 0)  # listed by itself: no new spec, no resync
    finally:
        await subscription.unsubscribe()
