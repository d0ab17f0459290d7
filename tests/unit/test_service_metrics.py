"""The services' gauges and the scheduler's fold metrics, without I/O: the dataset census fed KV entries as the
reconciler's watch yields them, ``GaugeFamily`` on a registry of its own, and the scheduler's inventory handler
fed events with their JetStream time. (The consumer loop's counts are shown on a real nats-server in
``tests/integration/test_bad_input.py``.)"""

from __future__ import annotations

from typing import cast

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Gauge

from libs.bus import Bus, Delivery, KvMirror, Replay, delivery_of
from libs.events.agent import AgentRecord, CacheCounters, InventorySnapshot
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetStatus
from libs.gauges import GaugeFamily
from services.dataset.census import DatasetCensus
from services.scheduler.handlers import DatasetInfo, SchedulerHandlers
from tests.metric_values import Snapshot, exists, value


def test_a_gauge_family_sets_what_changed_and_removes_what_left() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("t_things", "Things.", ["thing"], registry=registry)
    family = GaugeFamily(gauge)
    family.update({("a",): 1, ("b",): 2})
    assert registry.get_sample_value("t_things", {"thing": "a"}) == 1
    family.update({("b",): 3})
    assert registry.get_sample_value("t_things", {"thing": "a"}) is None
    assert registry.get_sample_value("t_things", {"thing": "b"}) == 3


def entry(name: str, phase: str = "NotBound", files: int = 0, synced: bool = False,
          operation: str | None = None, skipped: int = 0) -> KeyValue.Entry:
    record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name=name, namespace="t")), generation=1,
                           status=DatasetStatus(phase=phase, file_num=files, ufs_total_bytes=10 * files,  # type: ignore[arg-type]
                                                skipped_objects=skipped,
                                                last_sync_time="2026-12-05T00:00:00Z" if synced else ""))
    value_ = None if operation else msgspec.json.encode(record)
    return KeyValue.Entry(bucket="shoal_datasets", key=f"t.{name}", value=value_, revision=1, delta=None,
                          created=None, operation=operation)


def phases() -> dict[str, float]:
    return {phase: value("shoal_datasets", phase=phase) for phase in ("NotBound", "Bound", "Failed")}


PER_DATASET = ("shoal_dataset_objects", "shoal_dataset_ufs_bytes", "shoal_dataset_skipped_objects")


def test_the_dataset_census_follows_the_bucket() -> None:
    census = DatasetCensus()
    census.observe(entry("a", files=3, synced=True, skipped=2))
    census.observe(entry("b"))
    census.observe(None)  # the initial values are in
    assert phases() == {"NotBound": 2, "Bound": 0, "Failed": 0}
    assert value("shoal_dataset_objects", dataset="t/a") == 3 and value("shoal_dataset_ufs_bytes", dataset="t/a") == 30
    assert value("shoal_dataset_skipped_objects", dataset="t/a") == 2
    assert not any(exists(name, dataset="t/b") for name in PER_DATASET)  # not listed yet
    census.observe(entry("a", phase="Bound", files=4, synced=True))
    assert phases() == {"NotBound": 1, "Bound": 1, "Failed": 0}
    assert value("shoal_dataset_objects", dataset="t/a") == 4
    # A sync that leaves nothing out says 0 (a series an alert can compare), not nothing.
    assert exists("shoal_dataset_skipped_objects", dataset="t/a")
    assert value("shoal_dataset_skipped_objects", dataset="t/a") == 0
    census.observe(entry("a", operation="DEL"))
    assert phases() == {"NotBound": 1, "Bound": 0, "Failed": 0}
    assert not any(exists(name, dataset="t/a") for name in PER_DATASET)
    # A replay after a reconnect: the view changes only once it is complete, then to exactly what it holds.
    census.observe(Replay())
    census.observe(entry("c", phase="Failed", files=1, synced=True, skipped=5))
    assert phases() == {"NotBound": 1, "Bound": 0, "Failed": 0}
    census.observe(None)
    assert phases() == {"NotBound": 0, "Bound": 0, "Failed": 1}
    assert value("shoal_dataset_objects", dataset="t/c") == 1
    assert value("shoal_dataset_skipped_objects", dataset="t/c") == 5
    # A replay without the dataset removes its series, this one too.
    census.observe(Replay())
    census.observe(None)
    assert not any(exists(name, dataset="t/c") for name in PER_DATASET)


async def test_inventory_events_are_counted_by_what_the_fold_made_of_them_with_their_lag() -> None:
    handlers = SchedulerHandlers(cast(Bus, None), cast(KvMirror[AgentRecord], None), clock=lambda: 1000.0)
    handlers.datasets[("ml", "known")] = DatasetInfo(total=0, manifest_version=("", 0, 0, ""))
    handlers.datasets_ready.set()
    metrics = Snapshot()

    def snapshot(dataset: str) -> InventorySnapshot:
        return InventorySnapshot(node="n1", dataset=ObjectRef(name=dataset, namespace="ml"), incarnation="i1", seq=1,
                                 counters=CacheCounters())

    stored_at = Delivery(subject="s", headers={}, deliveries=1, stream_sequence=1, published_at=958.0)
    await handlers.on_inventory(snapshot("known"), stored_at)
    assert metrics.moved("shoal_scheduler_fold_events_total", outcome="folded") == 1
    assert value("shoal_scheduler_fold_lag_seconds") == 42.0  # stored at 958, folded at 1000
    await handlers.on_inventory(snapshot("known"), stored_at)  # redelivered: nothing changes
    assert metrics.moved("shoal_scheduler_fold_events_total", outcome="stale") == 1
    await handlers.on_inventory(snapshot("gone"), stored_at)
    assert metrics.moved("shoal_scheduler_fold_events_total", outcome="unknown_dataset") == 1
    assert metrics.moved("shoal_scheduler_fold_events_total", outcome="folded") == 1


@pytest.mark.parametrize("reply", [
    "$JS.ACK.SHOAL_AGENT.scheduler-inventory.3.1042.977.1764921600123456789.12",
    "$JS.ACK.hub.ACCHASH.SHOAL_AGENT.scheduler-inventory.1.7.7.1764921600987654321.0.Xy9",
    "$JS.ACK._.ACCHASH.SHOAL_AGENT.scheduler-inventory.2.8.8.1764921600000000001.4",
])
def test_delivery_facts_read_from_the_reply_match_the_libraries_metadata(reply: str) -> None:
    # The consumer reads them straight from the reply subject (nats-py's parse is a tenth of a fold); both shapes
    # of reply, with and without a domain, must say what the library says.
    message = Msg(_client=None, subject="shoal.agent.inventory.n1", reply=reply,  # type: ignore[arg-type]
                  headers={"Nats-Msg-Id": "m-1"})
    fast, metadata = delivery_of(message), message.metadata
    assert fast.deliveries == metadata.num_delivered
    assert fast.stream_sequence == metadata.sequence.stream
    assert fast.published_at == pytest.approx(metadata.timestamp.timestamp(), abs=1e-6)
    assert fast.message_id == "m-1" and fast.subject == "shoal.agent.inventory.n1"


def test_a_reply_of_another_shape_falls_back_to_the_library() -> None:
    with pytest.raises(NotJSMessageError):  # the library's parse, and its own error for a reply not JetStream's
        delivery_of(Msg(_client=None, subject="s", reply="_INBOX.abc"))  # type: ignore[arg-type]
