"""autoSync on nats-server and SeaweedFS, the dataset service's handlers on a test clock: a due listing that finds
nothing new writes no new manifest and no status; one that finds an added object does; autoSync off on the runtime
(Fluid's ``management.metadataSyncPolicy.autoSync: false``) lists nothing, while a resync still lists. (An added
object reaching a real mount by autoSync is in ``test_autoscale.py``, on the same stack as the autoscaler.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from pathlib import Path

import msgspec

from libs import subjects
from libs.bus import Bus, Delivery, kv_load, kv_save
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import (
    Level,
    MetadataSyncPolicy,
    Runtime,
    RuntimeAccepted,
    RuntimeApply,
    RuntimeManagement,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    TieredStore,
)
from libs.manifest import ManifestStore
from libs.ufs import open_store
from libs.ufs.base import Location, ObjectStore
from services.dataset.handlers import DatasetHandlers
from services.dataset.watched import WatchedPolicies
from tests.conftest import SeaweedServer
from tests.helpers import eventually
from tests.metric_values import Snapshot


class CountingOpener:
    """The dataset service's stores for listing, counted by prefix: each sync opens a mount's store once."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()

    def __call__(self, location: Location) -> ObjectStore:
        self.opened[getattr(location, "prefix", "").strip("/")] += 1
        return open_store(location)


def runtime(name: str, auto_sync: bool | None, cache_dir: Path) -> RuntimeApply:
    policy = MetadataSyncPolicy(auto_sync=auto_sync)
    return RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name=name), spec=RuntimeSpec(
        tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="64Mi", path=str(cache_dir))]),
        block_size="1Mi", management=RuntimeManagement(metadata_sync_policy=policy))))


def dataset(name: str, bucket: str) -> DatasetApply:
    return DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(
        mounts=[Mount(mount_point=f"s3://{bucket}/{name}/")])))


async def manifest_nuid(bus: Bus, name: str) -> str:
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", name),
                              DatasetRecord)
    assert record is not None and record.status.manifest, record
    info = await (await ManifestStore.of(bus)).objects.get_info(record.status.manifest)
    return str(info.nuid)


async def test_an_unchanged_listing_writes_nothing_and_autosync_off_lists_nothing(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await unchanged_and_off(bus, settings, seaweedfs, bucket, stack)


async def unchanged_and_off(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str,
                            stack: contextlib.AsyncExitStack) -> None:
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service, autosync_seconds=60.0))
    clock = [1_700_000_000.0]
    opener = CountingOpener()
    counted = Snapshot()
    handlers = DatasetHandlers(bus, settings, clock=lambda: clock[0], opener=opener)
    woken: list[str] = []
    handlers.wake = woken.append
    store = await stack.enter_async_context(seaweedfs.client())  # one client for the test's own puts

    async def put(key: str, body: bytes) -> None:
        await store.put_object(Bucket=bucket, Key=key, Body=body)

    await put("data/a.txt", b"first")
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", "data")
    await kv_save(kv, key, DatasetRecord(dataset=dataset("data", bucket).dataset, generation=1), None)
    assert await handlers.sync(key) == 60.0  # the first listing; the next one a period later
    record, revision = await kv_load(kv, key, DatasetRecord)
    assert record is not None and record.status.file_num == 1
    nuid = await manifest_nuid(bus, "data")
    clock[0] += 30
    assert await handlers.sync(key) == 30.0 and opener.opened["data"] == 1  # not due yet: nothing listed

    # Due and unchanged: listed, but no new manifest and no write of the record (no fact, nothing for mounts).
    clock[0] += 30
    assert await handlers.sync(key) == 60.0 and opener.opened["data"] == 2
    assert await kv_load(kv, key, DatasetRecord) == (record, revision)
    assert await manifest_nuid(bus, "data") == nuid

    # Due and changed: a new manifest and a new status.
    await put("data/b.txt", b"second")
    clock[0] += 60
    await handlers.sync(key)
    changed, _ = await kv_load(kv, key, DatasetRecord)
    assert changed is not None and changed.status.file_num == 2 and await manifest_nuid(bus, "data") != nuid
    assert [counted.moved("shoal_dataset_autosyncs_total", outcome=outcome)
            for outcome in ("unchanged", "changed", "failed")] == [1, 1, 0]

    # autoSync off on the runtime: a runtime.accepted fact wakes the dataset's sync, which then plans nothing.
    delivery = Delivery(subject=subjects.RUNTIME_ACCEPTED, headers={}, deliveries=1, stream_sequence=1)
    await kv_save(await bus.kv(subjects.KV_RUNTIMES), key,
                  RuntimeRecord(runtime=runtime("data", False, Path("/tmp")).runtime, generation=1), None)
    await handlers.on_runtime_fact(RuntimeAccepted(causation_id="c", name="data", namespace="default",
                                                   generation=1), delivery)
    assert woken == [key]
    await put("data/c.txt", b"third")
    clock[0] += 3600
    assert await handlers.sync(key) is None and opener.opened["data"] == 3
    # A resync still lists (the policy is about listing by itself).
    current, revision = await kv_load(kv, key, DatasetRecord)
    assert current is not None
    await kv_save(kv, key, msgspec.structs.replace(current, sync_requests=1), revision)
    assert await handlers.sync(key) is None and opener.opened["data"] == 4
    resynced, _ = await kv_load(kv, key, DatasetRecord)
    assert resynced is not None and resynced.status.file_num == 3


async def test_the_runtimes_watch_wakes_a_dataset_when_its_sync_policy_changes_and_only_then(
        bus: Bus, tmp_path: Path) -> None:
    """The dataset service reads each runtime's metadataSyncPolicy from a watch (no KV read per look of the
    reconciler); a new policy wakes the dataset, a status write of the same runtime does not."""
    runtimes = await bus.kv(subjects.KV_RUNTIMES)
    key = subjects.resource_key("default", "watched")
    policies = WatchedPolicies(runtimes)
    woken: list[str] = []
    policies.wake = woken.append
    watching = asyncio.create_task(policies.run())
    try:
        await asyncio.wait_for(policies.ready.wait(), 10)
        assert policies.get(key) is None
        on = RuntimeRecord(runtime=runtime("watched", True, tmp_path).runtime, generation=1)
        revision = await kv_save(runtimes, key, on, None)

        async def seen(auto: bool) -> bool:
            spec = policies.get(key)
            return spec is not None and spec.management.metadata_sync_policy.auto_sync is auto

        await eventually(lambda: seen(True), what="the runtime's policy in the watch")
        status_only = msgspec.structs.replace(on, status=RuntimeStatus(phase="Ready"))
        revision = await kv_save(runtimes, key, status_only, revision)
        off = msgspec.structs.replace(status_only, runtime=runtime("watched", False, tmp_path).runtime, generation=2)
        await kv_save(runtimes, key, off, revision)
        await eventually(lambda: seen(False), what="autoSync off in the watch")
        assert woken == [key, key], "woken by the new runtime and by its new policy, not by its status"
    finally:
        policies.stop()
        await asyncio.wait_for(watching, 10)
