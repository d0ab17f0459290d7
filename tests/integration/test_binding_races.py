"""The dataset's phase follows its runtime even when the runtime's fact is handled while a sync of the same
dataset is in flight (real nats-server, real SeaweedFS). An apply or a sync reads the binding, then writes the
record; a binding read before a conflict must not stay in the status: the sync reads it again after the record.

Two replicas of the dataset service's handlers share the buckets here: one handles the runtime's fact while the
other syncs, its bindings' watch not yet showing the fact (a lagging watch: a project-owned subclass that never
receives entries). In one process the same interleaving happens when the fact lands between the sync's read of the
binding and its retried write (seen once in CI: a dataset left NotBound beside a Ready runtime). Replicas may also
take two facts of one runtime in either order: the older one changes nothing.

A deleted runtime's binding is a delete marker keeping its fact's sequence (it was a value kept for ever, one per
runtime name ever deleted, in the bucket and in each replica's memory); bindings deleted runtimes left as values
before are made markers by ``retire_deleted_bindings``, by any number of replicas at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import Bus, Delivery, kv_keys, kv_load, kv_load_deleted, kv_save
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Condition, Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Runtime, RuntimeDeleted, RuntimeRecord, RuntimeStatus, RuntimeStatusChanged
from services.dataset.domain import RuntimeBinding, binding_sequence
from services.dataset.handlers import DatasetHandlers
from services.dataset.watched import WatchedBindings
from tests.conftest import SeaweedServer, put_objects
from tests.faults import ListingHold
from tests.helpers import cancel_and_wait, eventually


class LaggingBindings(WatchedBindings):
    """A bindings' watch that has delivered its initial (empty) values and nothing since."""

    def __init__(self, kv: KeyValue) -> None:
        super().__init__(kv)
        self.ready.set()


async def test_a_runtime_ready_during_a_sync_leaves_the_dataset_bound(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"races/a.bin": b"a"})
    hold = ListingHold()
    lagging = LaggingBindings(await bus.kv(subjects.KV_BINDINGS))
    syncing = DatasetHandlers(bus, settings, opener=hold.opener, bindings=lagging)
    other = DatasetHandlers(bus, settings)
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", "races")
    dataset = Dataset(metadata=ObjectMeta(name="races"),
                      spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/races/")]))
    await kv_save(kv, key, DatasetRecord(dataset=dataset, generation=1), None)
    async with hold.around(syncing.sync(key)):  # the sync read the binding (NotReady) and lists
        ready = RuntimeStatusChanged(id="races.ready", name="races", namespace="default", generation=1,
                                     status=RuntimeStatus(phase="Ready", cache_capacity="1.00GiB"))
        await other.on_runtime_fact(ready, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                       stream_sequence=1))

        async def phase() -> str:
            record, _ = await kv_load(kv, key, DatasetRecord)
            return record.status.phase if record is not None else ""

        assert await phase() == "Bound"
    record, _ = await kv_load(kv, key, DatasetRecord)
    assert record is not None and record.status.file_num == 1, record
    assert (record.status.phase, record.status.cache_states.cache_capacity) == ("Bound", "1.00GiB"), record.status


async def test_a_runtime_ready_before_the_datasets_record_exists_binds_it_at_its_first_sync(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    """The fact's update finds no record yet; the apply read an older binding (its watch lags): the first sync,
    which follows every changed spec, reads the binding after the record and binds it."""
    await put_objects(seaweedfs, bucket, {"early/a.bin": b"a"})
    applying = DatasetHandlers(bus, settings, bindings=LaggingBindings(await bus.kv(subjects.KV_BINDINGS)))
    other = DatasetHandlers(bus, settings)
    ready = RuntimeStatusChanged(id="early.ready", name="early", namespace="default", generation=1,
                                 status=RuntimeStatus(phase="Ready"))
    await other.on_runtime_fact(ready, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                stream_sequence=1))
    dataset = Dataset(metadata=ObjectMeta(name="early"),
                      spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/early/")]))
    await applying.apply(DatasetApply(id="early.apply", dataset=dataset),
                         Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1, stream_sequence=1))
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", "early")
    applied, _ = await kv_load(kv, key, DatasetRecord)
    assert applied is not None and applied.status.phase == "NotBound"  # what the lagging watch said
    await applying.sync(key)
    synced, _ = await kv_load(kv, key, DatasetRecord)
    assert synced is not None
    assert (synced.status.file_num, synced.status.phase) == (1, "Bound"), synced.status


async def test_a_runtimes_older_fact_handled_after_a_newer_one_changes_nothing(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    """Replicas share the runtime facts' consumer, so two facts of one runtime may be handled in either order: the
    Ready fact (stream sequence 8) by one replica, then the Pending fact before it (sequence 7) by the other. The
    binding keeps the newer fact, and so does the dataset's status (phase and the Mounted condition)."""
    first, second = DatasetHandlers(bus, settings), DatasetHandlers(bus, settings)
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", "order")
    dataset = Dataset(metadata=ObjectMeta(name="order"),
                      spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/order/")]))
    await kv_save(kv, key, DatasetRecord(dataset=dataset, generation=1), None)
    mounted = Condition(type="Mounted", status="True", reason="Serving", message="1 of 1 agents serve it")
    ready = RuntimeStatusChanged(id="order.ready", name="order", namespace="default", generation=1,
                                 status=RuntimeStatus(phase="Ready", cache_capacity="1.00GiB", conditions=[mounted]))
    pending = RuntimeStatusChanged(id="order.pending", name="order", namespace="default", generation=1,
                                   status=RuntimeStatus(phase="NotReady"))
    await first.on_runtime_fact(ready, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                stream_sequence=8))
    await second.on_runtime_fact(pending, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                   stream_sequence=7))
    binding, _ = await kv_load(await bus.kv(subjects.KV_BINDINGS), key, RuntimeBinding)
    assert binding is not None and (binding.phase, binding.fact_sequence) == ("Ready", 8), binding
    record, _ = await kv_load(kv, key, DatasetRecord)
    assert record is not None
    assert record.status.phase == "Bound", record.status
    assert [c.type for c in record.status.conditions if c.status == "True"] == ["Mounted"], record.status


def fact_delivery(sequence: int) -> Delivery:
    return Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1, stream_sequence=sequence)


def ready_fact(name: str) -> RuntimeStatusChanged:
    return RuntimeStatusChanged(id=f"{name}.ready", name=name, namespace="default", generation=1,
                                status=RuntimeStatus(phase="Ready", cache_capacity="1.00GiB"))


@contextlib.asynccontextmanager
async def watched_replica(bus: Bus, settings: Settings) -> AsyncIterator[tuple[DatasetHandlers, WatchedBindings]]:
    """A replica's handlers with their bindings' watch running and caught up."""
    bindings = WatchedBindings(await bus.kv(subjects.KV_BINDINGS), bus.reconnects)
    task = asyncio.create_task(bindings.run())
    try:
        await asyncio.wait_for(bindings.ready.wait(), 10)
        yield DatasetHandlers(bus, settings, bindings=bindings), bindings
    finally:
        bindings.stop()
        await cancel_and_wait(task)


RUNTIMES = 50


async def test_deleted_runtimes_leave_no_binding_and_their_older_facts_change_nothing(
        bus: Bus, settings: Settings) -> None:
    """Runtimes made Ready and deleted by the dozen (a CronJob's): no binding is left in the bucket nor in either
    replica's memory. The Ready fact handled again by the other replica after the delete (a redelivery) writes
    nothing: the marker keeps the delete's sequence. A runtime applied again under a name binds again."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    async with watched_replica(bus, settings) as (first, first_view), \
            watched_replica(bus, settings) as (second, second_view):
        names = [f"cron-{index}" for index in range(RUNTIMES)]
        for index, name in enumerate(names):
            await first.on_runtime_fact(ready_fact(name), fact_delivery(3 * index + 1))
            assert first_view.get(subjects.resource_key("default", name)).phase == "Ready"
            await first.on_runtime_fact(RuntimeDeleted(id=f"{name}.deleted", causation_id=f"{name}.delete", name=name,
                                                       namespace="default"),
                                        fact_delivery(3 * index + 2))
            assert first_view.get(subjects.resource_key("default", name)).phase == "NotReady"
            await second.on_runtime_fact(ready_fact(name), fact_delivery(3 * index + 1))  # older: history
        assert await kv_keys(kv) == [], "bindings of deleted runtimes kept"
        stored, _, note = await kv_load_deleted(kv, subjects.resource_key("default", "cron-0"), RuntimeBinding)
        assert stored is None and binding_sequence(stored, note) == 2

        async def forgotten() -> bool:
            return not first_view._values and not second_view._values

        await eventually(forgotten, what="both replicas' views emptied")
        again = subjects.resource_key("default", "cron-0")
        await second.on_runtime_fact(ready_fact("cron-0"), fact_delivery(1000))
        binding, _ = await kv_load(kv, again, RuntimeBinding)
        assert binding is not None and (binding.phase, binding.fact_sequence) == ("Ready", 1000)


async def test_bindings_deleted_runtimes_left_as_values_are_retired_by_replicas_at_once(
        bus: Bus, settings: Settings) -> None:
    """A bucket from before: deleted runtimes' bindings as values. Two replicas retire them at once: each becomes a
    marker keeping its sequence (an older fact then writes nothing); a NotReady runtime that exists keeps its
    binding, and so does a Ready one."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    legacy = [subjects.resource_key("default", f"old-{index}") for index in range(RUNTIMES)]
    for key in legacy:
        await kv_save(kv, key, RuntimeBinding(fact_sequence=50), None)
    live = subjects.resource_key("default", "pending")
    await kv_save(await bus.kv(subjects.KV_RUNTIMES), live,
                  RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="pending")), generation=1), None)
    await kv_save(kv, live, RuntimeBinding(fact_sequence=60), None)
    ready = subjects.resource_key("default", "ready")
    await kv_save(kv, ready, RuntimeBinding(phase="Ready", fact_sequence=61), None)
    async with watched_replica(bus, settings) as (first, first_view), \
            watched_replica(bus, settings) as (second, second_view):
        async def all_in() -> bool:
            return len(first_view._values) == len(second_view._values) == RUNTIMES + 2

        await eventually(all_in, what="the bindings in both views")
        await asyncio.gather(first.retire_deleted_bindings(), second.retire_deleted_bindings())
        assert sorted(await kv_keys(kv)) == sorted([live, ready])
        for key in legacy:
            stored, _, note = await kv_load_deleted(kv, key, RuntimeBinding)
            assert stored is None and binding_sequence(stored, note) == 50, key
        await first.on_runtime_fact(ready_fact("old-0"), fact_delivery(49))  # older than the delete: history
        assert (await kv_load(kv, legacy[0], RuntimeBinding))[0] is None

        async def forgotten() -> bool:
            return set(first_view._values) == set(second_view._values) == {live, ready}

        await eventually(forgotten, what="the retired bindings gone from both views")
