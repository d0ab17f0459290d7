"""What the dataset service keeps of its records from the reconciler's watch (``services.dataset.watched``): a
record that may need a sync, whole; a synced one as its revision alone; never an entry older than one it knows
(its own write included); nothing at all until the watch has delivered the initial values."""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetStatus
from services.dataset.watched import DELETES_KEPT, WatchedRecords

KEY = "default.one"


def record(generation: int, synced: int) -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="one")), generation=generation,
                         status=DatasetStatus(synced_generation=synced))


def entry(value: DatasetRecord | None, revision: int, operation: str | None = None) -> KeyValue.Entry:
    data = None if value is None else msgspec.json.encode(value)
    return KeyValue.Entry("b", KEY, data, revision, None, None, operation)


def test_nothing_is_trusted_before_the_initial_values() -> None:
    watched = WatchedRecords()
    watched.observe(entry(record(1, 0), 3))
    assert watched.get(KEY) is None
    watched.observe(None)
    assert watched.get(KEY) == (record(1, 0), 3)


def test_the_newest_record_is_kept_and_older_entries_change_nothing() -> None:
    watched = WatchedRecords()
    watched.observe(None)
    watched.observe(entry(record(1, 0), 3))
    watched.note(KEY, record(1, 1), 5)  # this process's own status write after the sync
    # Kept whole though synced: its autoSync listing and its references are worked out from it.
    assert watched.get(KEY) == (record(1, 1), 5)
    watched.observe(entry(record(1, 0), 4))  # an older write the watch delivers late
    assert watched.get(KEY) == (record(1, 1), 5)
    watched.observe(entry(record(2, 1), 6))  # a new spec
    assert watched.get(KEY) == (record(2, 1), 6)
    watched.observe(entry(None, 7, "DEL"))
    assert watched.get(KEY) is None


def test_a_write_noted_after_the_watch_showed_its_delete_does_not_bring_the_key_back() -> None:
    watched = WatchedRecords()
    watched.observe(None)
    watched.observe(entry(record(1, 0), 3))
    watched.observe(entry(None, 5, "DEL"))  # the delete came behind this process's write at 4
    watched.note(KEY, record(1, 1), 4)  # ... whose note the handler makes once the write's ack is in
    assert watched.get(KEY) is None
    watched.note(KEY, record(1, 0), 6)  # created again after the delete
    assert watched.get(KEY) == (record(1, 0), 6)


def test_deletes_are_remembered_within_a_bound() -> None:
    watched = WatchedRecords()
    watched.observe(None)
    for index in range(DELETES_KEPT + 10):
        watched.observe(KeyValue.Entry("b", f"default.d{index}", None, index + 1, None, None, "DEL"))
    assert len(watched._deleted) == DELETES_KEPT
    watched.note("default.d0", record(1, 0), 0)  # forgotten: the oldest delete, long past any write's ack
    assert watched.get("default.d0") is not None
    watched.note(f"default.d{DELETES_KEPT + 9}", record(1, 0), 1)
    assert watched.get(f"default.d{DELETES_KEPT + 9}") is None
