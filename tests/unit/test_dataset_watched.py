"""What the dataset service keeps of its records from the reconciler's watch (``services.dataset.watched``): a
record that may need a sync, whole; a synced one as its revision alone; never an entry older than one it knows
(its own write included); nothing at all until the watch has delivered the initial values."""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetStatus
from services.dataset.watched import WatchedRecords

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
