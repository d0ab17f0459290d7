"""A dataset listed without error but NotBound says why, and what to change, in its status message: no Runtime of
its name, or its Runtime not Ready with the runtime's own reason (fewer agents than replicas, say). It said nothing:
`shoal describe dataset` showed `message: ''` beside NotBound, and the mount never came. Real nats-server and
SeaweedFS, the dataset service's handlers.
"""

from __future__ import annotations

from libs import subjects
from libs.bus import Bus, Delivery, kv_load
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import CacheWorker, RuntimeStatus, RuntimeStatusChanged
from services.dataset.handlers import DatasetHandlers
from tests.conftest import SeaweedServer, put_objects


async def test_a_not_bound_dataset_says_which_runtime_it_waits_for_and_why(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"wait/a.bin": b"a"})
    handlers = DatasetHandlers(bus, settings)
    dataset = Dataset(metadata=ObjectMeta(name="wait", namespace="team-a"),
                      spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/wait/")]))
    await handlers.apply(DatasetApply(id="wait.apply", dataset=dataset),
                         Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1, stream_sequence=1))
    key = subjects.resource_key("team-a", "wait")
    await handlers.sync(key)
    kv = await bus.kv(subjects.KV_DATASETS)

    async def status() -> tuple[str, str]:
        record, _ = await kv_load(kv, key, DatasetRecord)
        assert record is not None and record.status.file_num == 1, record
        return record.status.phase, record.status.message

    assert await status() == ("NotBound", "no Runtime team-a/wait: a dataset binds to the Runtime of its own name "
                                          "and namespace; apply one to cache and mount it")

    # Its runtime, with more replicas than agents: the dataset quotes the runtime's reason.
    why = ("1 of 3 agents ready: only 1 agent serves this runtime; lower spec.replicas to 1, or run more agents")
    partial = RuntimeStatusChanged(id="wait.partial", name="wait", namespace="team-a", generation=1,
                                   status=RuntimeStatus(phase="PartialReady", message=why))
    await handlers.on_runtime_fact(partial, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                     stream_sequence=1))
    assert await status() == ("NotBound", f"waiting for Runtime team-a/wait to be Ready (it is PartialReady: {why})")
    ready = RuntimeStatusChanged(id="wait.ready", name="wait", namespace="team-a", generation=1,
                                 status=RuntimeStatus(phase="Ready", cache_capacity="1.00GiB",
                                                      desired_worker_number_scheduled=1,
                                                      workers=[CacheWorker(node="n1", ready=True)]))
    await handlers.on_runtime_fact(ready, Delivery(subject=subjects.RUNTIME_STATUS, headers={}, deliveries=1,
                                                   stream_sequence=2))
    assert await status() == ("Bound", "")
