"""The dataset's phase follows its runtime even when the runtime's fact is handled while a sync of the same
dataset is in flight (real nats-server, real SeaweedFS). An apply or a sync reads the binding, then writes the
record; a binding read before a conflict must not stay in the status: the sync reads it again after the record.

Two replicas of the dataset service's handlers share the buckets here: one handles the runtime's fact while the
other syncs, its bindings' watch not yet showing the fact (a lagging watch: a project-owned subclass that never
receives entries). In one process the same interleaving happens when the fact lands between the sync's read of the
binding and its retried write (seen once in CI: a dataset left NotBound beside a Ready runtime). Replicas may also
take two facts of one runtime in either order: the older one changes nothing.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import Bus, Delivery, kv_load, kv_save
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Condition, Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import RuntimeStatus, RuntimeStatusChanged
from services.dataset.domain import RuntimeBinding
from services.dataset.handlers import DatasetHandlers
from services.dataset.watched import WatchedBindings
from tests.conftest import SeaweedServer, put_objects
from tests.faults import ListingHold


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
