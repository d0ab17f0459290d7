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

from pathlib import Path

import pytest
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectNotFoundError

from libs import subjects
from libs.bus import Bus, Delivery, kv_load, kv_load_deleted
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
from libs.ufs.base import LocalLocation
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.faults import ListingHold
from tests.helpers import FactCollector, eventually, make_settings

KEY = subjects.resource_key("default", "ds")


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
    hold = ListingHold(held=lambda location: isinstance(location, LocalLocation) and location.root == old)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url), opener=hold.opener)
    kv = await bus.kv(subjects.KV_DATASETS)
    await handlers.apply(DatasetApply(id="apply-old", dataset=local_dataset(old)),
                         delivery(subjects.DATASET_APPLY, 1))
    first, _ = await kv_load(kv, KEY, DatasetRecord)
    assert first is not None and first.incarnation
    async with hold.around(handlers.sync(KEY)):  # the old dataset's sync is listing
        await handlers.delete(DatasetDelete(id="delete-old", name="ds", namespace="default"),
                              delivery(subjects.DATASET_DELETE, 2))
        await handlers.apply(DatasetApply(id="apply-new", dataset=local_dataset(new)),
                             delivery(subjects.DATASET_APPLY, 3))
        if new_synced_first:
            await handlers.sync(KEY)
    if not new_synced_first:
        untouched, _ = await kv_load(kv, KEY, DatasetRecord)
        assert untouched is not None
        assert untouched.status.synced_generation == 0, untouched.status
        assert untouched.status.file_num == 0 and not untouched.status.manifest, untouched.status
        await handlers.sync(KEY)  # the new dataset's own sync, which its apply asked for
    record, _ = await kv_load(kv, KEY, DatasetRecord)
    assert record is not None and record.incarnation not in ("", first.incarnation)
    assert (record.status.synced_generation, record.status.file_num) == (1, 2), record.status
    assert await manifest_keys(bus, record.status.manifest) == {"new-1.txt", "new-2.txt"}
    old_manifest = subjects.manifest_name("default", "ds", first.incarnation, first.generation, first.sync_requests)
    assert old_manifest != record.status.manifest
    assert not await manifest_exists(bus, old_manifest), "the stale sync's upload is removed"


async def test_a_delete_that_overtakes_the_apply_it_follows_stands(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """The user applied (sequence 5) then deleted (7); the delete is handled first, the apply redelivered later."""
    _, new = folders(tmp_path)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    kv = await bus.kv(subjects.KV_DATASETS)
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_REJECTED)
    await handlers.delete(DatasetDelete(id="delete-7", name="ds", namespace="default"),
                          delivery(subjects.DATASET_DELETE, 7))
    missing = await facts.wait_for("dataset.rejected.v1", causationId="delete-7")
    assert "default/ds does not exist" in missing["reason"], missing
    await handlers.apply(DatasetApply(id="apply-5", dataset=local_dataset(new)),
                         delivery(subjects.DATASET_APPLY, 5, deliveries=2))
    stale = await facts.wait_for("dataset.rejected.v1", causationId="apply-5")
    assert "deleted by a later command (stream sequence 7)" in stale["reason"], stale
    assert (await kv_load(kv, KEY, DatasetRecord))[0] is None, "the apply the user deleted is not created"
    # Applied again after the delete: created; the delete, delivered once more, does not remove it.
    await handlers.apply(DatasetApply(id="apply-9", dataset=local_dataset(new)), delivery(subjects.DATASET_APPLY, 9))
    created, _ = await kv_load(kv, KEY, DatasetRecord)
    assert created is not None and created.command_sequence == 9
    await handlers.delete(DatasetDelete(id="delete-7", name="ds", namespace="default"),
                          delivery(subjects.DATASET_DELETE, 7, deliveries=2))
    assert (await kv_load(kv, KEY, DatasetRecord))[0] == created
    async def second_answer() -> list[dict[str, str]]:
        return facts.of_type("dataset.rejected.v1", causationId="delete-7")[1:]

    rejections = await eventually(second_answer, 10, "the redelivered delete's answer")
    assert "applied by a later command (stream sequence 9)" in rejections[0]["reason"], rejections


async def test_a_delete_that_stopped_halfway_finishes_when_delivered_again(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, new = folders(tmp_path)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    kv = await bus.kv(subjects.KV_DATASETS)
    node_cache = await bus.kv(subjects.KV_NODE_CACHE)
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_DELETED)
    await handlers.apply(DatasetApply(id="apply-1", dataset=local_dataset(new)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(KEY)
    record, _ = await kv_load(kv, KEY, DatasetRecord)
    assert record is not None and record.status.manifest
    assert await manifest_exists(bus, record.status.manifest)
    await node_cache.put(KEY, b'{"nodes": {}}')  # what the agents' inventory left for this dataset

    real_delete = ManifestStore.delete

    async def unreachable(self: ManifestStore, name: str) -> None:
        raise ConnectionError("object store unreachable")

    monkeypatch.setattr(ManifestStore, "delete", unreachable)
    command = DatasetDelete(id="delete-2", name="ds", namespace="default")
    with pytest.raises(ConnectionError):
        await handlers.delete(command, delivery(subjects.DATASET_DELETE, 2))
    assert (await kv_load(kv, KEY, DatasetRecord))[0] is None, "the record went first"
    assert await manifest_exists(bus, record.status.manifest)
    monkeypatch.setattr(ManifestStore, "delete", real_delete)

    await handlers.delete(command, delivery(subjects.DATASET_DELETE, 2, deliveries=2))
    await facts.wait_for("dataset.deleted.v1", causationId="delete-2")
    assert not await manifest_exists(bus, record.status.manifest)
    assert (await kv_load(node_cache, KEY, dict))[0] is None, "the node-cache entry is purged"


async def test_a_deleted_datasets_listing_time_is_forgotten(bus: Bus, nats_server: NatsServer,
                                                            tmp_path: Path) -> None:
    """The reconciler schedules no sync of a deleted key: its watch's delete is what drops the listing time, or
    it would stay for every dataset ever made."""
    _, new = folders(tmp_path)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    kv = await bus.kv(subjects.KV_DATASETS)
    await handlers.apply(DatasetApply(id="apply-1", dataset=local_dataset(new)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(KEY)
    assert KEY in handlers._listed_at
    await handlers.delete(DatasetDelete(id="delete-2", name="ds", namespace="default"),
                          delivery(subjects.DATASET_DELETE, 2))
    _, revision, _ = await kv_load_deleted(kv, KEY, DatasetRecord)
    assert revision is not None
    handlers.observe(KeyValue.Entry(subjects.KV_DATASETS, KEY, None, revision, None, None, "DEL"))  # as the watch
    assert KEY not in handlers._listed_at


async def test_an_unchanged_autosync_listing_that_ends_after_the_delete_leaves_no_listing_time(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An autoSync listing that found nothing new keeps its time in shoal_dataset_listings; one that ended after
    the dataset's delete (another replica handled it while this one listed) put the time back after the delete had
    purged it: an entry of a dataset that no longer exists, kept for ever."""
    _, new = folders(tmp_path)
    now = [1_700_000_000.0]
    settings = make_settings(nats_server.url, autosync_seconds=60.0)
    handlers = DatasetHandlers(bus, settings, clock=lambda: now[0])
    await handlers.apply(DatasetApply(id="apply-1", dataset=local_dataset(new)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(KEY)
    real_list = DatasetHandlers._list

    async def list_then_deleted(self: DatasetHandlers, record: DatasetRecord) -> object:
        listed = await real_list(self, record)
        await handlers.delete(DatasetDelete(id="delete-2", name="ds", namespace="default"),
                              delivery(subjects.DATASET_DELETE, 2))
        return listed

    monkeypatch.setattr(DatasetHandlers, "_list", list_then_deleted)
    now[0] += 61  # the autoSync period is over: listed again, and it finds what the status says
    await handlers.sync(KEY)
    assert (await kv_load(await bus.kv(subjects.KV_LISTINGS), KEY, dict))[0] is None, "the listing time came back"


async def test_an_apply_after_a_delete_that_stopped_halfway_finishes_that_delete(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delete removed the record, then its clean-up failed (NATS away a moment); the user applied the name again
    before its redelivery, whose marker the new record replaced: the redelivered delete, older than the apply, is
    refused, and nothing removed the old dataset's manifest (kept for ever) nor its node-cache entry (the new dataset
    took its per-node figures)."""
    old, new = folders(tmp_path)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    node_cache = await bus.kv(subjects.KV_NODE_CACHE)
    await handlers.apply(DatasetApply(id="apply-1", dataset=local_dataset(old)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(KEY)
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord)
    assert record is not None and await manifest_exists(bus, record.status.manifest)
    await node_cache.put(KEY, b'{"nodes": {}}')  # what the agents' inventory left for this dataset

    async def unreachable(self: DatasetHandlers, key: str, manifests: list[str]) -> None:
        raise ConnectionError("NATS unreachable")

    with monkeypatch.context() as patched:
        patched.setattr(DatasetHandlers, "_clean_after_delete", unreachable)
        with pytest.raises(ConnectionError):
            await handlers.delete(DatasetDelete(id="delete-2", name="ds", namespace="default"),
                                  delivery(subjects.DATASET_DELETE, 2))
    await handlers.apply(DatasetApply(id="apply-3", dataset=local_dataset(new)), delivery(subjects.DATASET_APPLY, 3))
    await handlers.delete(DatasetDelete(id="delete-2", name="ds", namespace="default"),
                          delivery(subjects.DATASET_DELETE, 2, deliveries=2))  # refused: applied by a later command

    assert not await manifest_exists(bus, record.status.manifest), "the deleted dataset's manifest was kept"
    assert (await kv_load(node_cache, KEY, dict))[0] is None, "the new dataset took the deleted one's node cache"
