"""Two syncs of one dataset finishing in the wrong order (real nats-server): while a dataset's keys change hands
between replicas, or a process stalls, the sync that started first can finish last. Its listing must neither
replace the manifest the record names nor take the status back to an older spec or resync.

Every manifest is named by the spec (generation) and resync it lists (``subjects.manifest_name``), so a late
upload lands beside the current one, never over it; a late status write is refused (``domain.sync_is_stale``),
the late upload is deleted, and so is the manifest a newer sync replaced.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from libs import subjects
from libs.bus import Bus, kv_load
from libs.events.dataset import DatasetApply, DatasetRecord, DatasetResync
from libs.ufs.base import LocalLocation
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.faults import ListingHold
from tests.helpers import make_settings
from tests.integration.test_dataset_recreate import KEY, delivery, local_dataset, manifest_exists, manifest_keys


def manifest_of(record: DatasetRecord) -> str:
    """The manifest a sync of ``record`` as it is now would write."""
    return subjects.manifest_name("default", "ds", record.incarnation, record.generation, record.sync_requests)


async def test_a_sync_of_an_older_spec_finishing_last_leaves_the_newer_specs_manifest(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "old.txt").write_bytes(b"old")
    (new / "new.txt").write_bytes(b"new")
    hold = ListingHold(held=lambda location: isinstance(location, LocalLocation) and location.root == old)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url), opener=hold.opener)
    kv = await bus.kv(subjects.KV_DATASETS)
    await handlers.apply(DatasetApply(id="apply-1", dataset=local_dataset(old)), delivery(subjects.DATASET_APPLY, 1))
    first, _ = await kv_load(kv, KEY, DatasetRecord)
    assert first is not None
    async with hold.around(handlers.sync(KEY)):  # lists generation 1, held
        await handlers.apply(DatasetApply(id="apply-2", dataset=local_dataset(new)),
                             delivery(subjects.DATASET_APPLY, 2))
        await handlers.sync(KEY)  # generation 2, done first
        current, _ = await kv_load(kv, KEY, DatasetRecord)
        assert current is not None and current.status.synced_generation == 2
    record, _ = await kv_load(kv, KEY, DatasetRecord)
    assert record is not None
    assert (record.status.synced_generation, record.status.file_num) == (2, 1), record.status
    assert await manifest_keys(bus, record.status.manifest) == {"new.txt"}, "the late listing wrote over it"
    assert record.status.manifest == manifest_of(record)
    assert not await manifest_exists(bus, manifest_of(first)), "the late listing's upload is removed"


async def test_a_sync_of_an_older_resync_finishing_last_keeps_the_later_one_and_the_replaced_manifest_goes(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"a")
    listings = itertools.count(1)
    hold = ListingHold(held=lambda _: next(listings) == 2)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url), opener=hold.opener)
    kv = await bus.kv(subjects.KV_DATASETS)
    await handlers.apply(DatasetApply(id="apply", dataset=local_dataset(folder)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(KEY)
    synced, _ = await kv_load(kv, KEY, DatasetRecord)
    assert synced is not None

    async def resync(sequence: int) -> DatasetRecord:
        await handlers.resync(DatasetResync(id=f"resync-{sequence}", name="ds"),
                              delivery(subjects.DATASET_RESYNC, sequence))
        record, _ = await kv_load(kv, KEY, DatasetRecord)
        assert record is not None
        return record

    asked = await resync(2)
    async with hold.around(handlers.sync(KEY)):  # lists resync 1, held
        (folder / "b.txt").write_bytes(b"b")
        await resync(3)
        await handlers.sync(KEY)  # resync 2, done first
    record, _ = await kv_load(kv, KEY, DatasetRecord)
    assert record is not None
    assert (record.status.synced_requests, record.status.file_num) == (2, 2), "the status went back to resync 1"
    assert await manifest_keys(bus, record.status.manifest) == {"a.txt", "b.txt"}
    assert record.status.manifest == manifest_of(record)
    assert not await manifest_exists(bus, manifest_of(asked)), "the late listing's upload is removed"
    assert not await manifest_exists(bus, synced.status.manifest), "the manifest a resync replaced is removed"
