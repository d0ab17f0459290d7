"""A dataset deleted and applied again under the same name (real nats-server): what the old one left running or
half done must not reach the new one, and a delete must not be lost to the order commands arrive in.

- a sync of the deleted dataset still listing when the name is applied again writes neither the new record's
  status nor its manifest (``DatasetRecord.incarnation``);
- a delete handled before the apply it follows (the apply redelivered later) leaves a delete marker, so the apply
  is refused as stale and the user's delete stands;
- a delete that stopped after removing the record finishes on its redelivery (node-cache entry and manifest
  removed, ``DatasetDeleted`` published).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectNotFoundError

from libs import subjects
from libs.bus import Bus, Delivery, kv_load, kv_save
from libs.events.common import ObjectMeta
from libs.events.dataset import (
    Dataset,
    DatasetApply,
    DatasetDelete,
    DatasetRecord,
    DatasetSpec,
    Mount,
)
from libs.manifest import ManifestStore
from libs.ufs import open_store
from libs.ufs.base import LocalLocation, Location, ObjectInfo, ObjectStore
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.faults import StoreWrapper
from tests.helpers import make_settings

KEY = subjects.resource_key("default", "ds")


class HeldListing(StoreWrapper):
    """A store whose listing waits until released."""

    def __init__(self, store: ObjectStore, started: asyncio.Event, release: asyncio.Event) -> None:
        super().__init__(store)
        self.started, self.release = started, release

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        self.started.set()
        await self.release.wait()
        async for info in self.store.list(page_size):
            yield info


def local_dataset(folder: Path) -> Dataset:
    return Dataset(metadata=ObjectMeta(name="ds"), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))


def delivery(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)


def folders(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "old.txt").write_bytes(b"old")
    (new / "new-1.txt").write_bytes(b"new")
    (new / "new-2.txt").write_bytes(b"new")
    return old, new


async def manifest_keys(bus: Bus, name: str) -> set[str]:
    return {entry.key for entry in await (await ManifestStore.of(bus)).load(name)}


async def manifest_exists(bus: Bus, name: str) -> bool:
    try:
        await (await ManifestStore.of(bus)).objects.get_info(name)
    except (ObjectNotFoundError, NotFoundError):
        return False
    return True


@pytest.mark.parametrize("new_synced_first", [True, False], ids=["new-synced-first", "old-finishes-first"])
async def test_a_sync_of_a_deleted_dataset_never_lands_on_the_dataset_applied_again(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, new_synced_first: bool) -> None:
    old, new = folders(tmp_path)
    started, release = asyncio.Event(), asyncio.Event()

    def opener(location: Location) -> ObjectStore:
        store = open_store(location)
        held = isinstance(location, LocalLocation) and location.root == old
        return HeldListing(store, started, release) if held else store

    handlers = DatasetHandlers(bus, make_settings(nats_server.url), opener=opener)
    kv = await bus.kv(subjects.KV_DATASETS)
    await handlers.apply(DatasetApply(id="apply-old", dataset=local_dataset(old)),
                         delivery(subjects.DATASET_APPLY, 1))
    first, _ = await kv_load(kv, KEY, DatasetRecord)
    assert first is not None and first.incarnation
    stale = asyncio.create_task(handlers.sync(KEY))
    try:
        await asyncio.wait_for(started.wait(), 10)  # the old dataset's sync is listing
        await handlers.delete(DatasetDelete(id="delete-old", name="ds", namespace="default"),
                              delivery(subjects.DATASET_DELETE, 2))
        await handlers.apply(DatasetApply(id="apply-new", dataset=local_dataset(new)),
                             delivery(subjects.DATASET_APPLY, 3))
        if new_synced_first:
            await handlers.sync(KEY)
        release.set()
        await asyncio.wait_for(stale, 10)
    finally:
        release.set()
        stale.cancel()
    if not new_synced_first:
        untouched, _ = await kv_load(kv, KEY, DatasetRecord)
        assert untouched is not None and untouched.status.synced_generation == 0, untouched.status
        assert untouched.status.file_num == 0 and not untouched.status.manifest, untouched.status
        await handlers.sync(KEY)  # the new dataset's own sync, which its apply asked for
    record, _ = await kv_load(kv, KEY, DatasetRecord)
    assert record is not None and record.incarnation not in ("", first.incarnation)
    assert (record.status.synced_generation, record.status.file_num) == (1, 2), record.status
    assert await manifest_keys(bus, record.status.manifest) == {"new-1.txt", "new-2.txt"}
    old_manifest = subjects.manifest_name("default", "ds", first.incarnation)
    assert old_manifest != record.status.manifest
    assert not await manifest_exists(bus, old_manifest), "the stale sync's upload is removed"
