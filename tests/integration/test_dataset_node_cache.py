"""The per-dataset node-cache entry (``shoal_dataset_node_cache``) on a real nats-server, the dataset service's
handlers driven directly:

- inventory of a dataset that has no record (deleted, or never made) leaves no entry, also when the delete lands
  between the handler's look at the record and its write (the first inventory event of a mount racing the delete:
  its create used to write over the delete's purge marker and bring the entry back for good).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from libs import subjects
from libs.bus import Bus, Conflict, Delivery, kv_load
from libs.events.agent import CacheCounters, InventorySnapshot
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.inventory import DatasetInventory
from services.dataset import handlers as dataset_handlers
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import make_settings

KEY = subjects.resource_key("default", "ds")


def delivery(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)


def local_dataset(name: str, folder: Path) -> Dataset:
    return Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))


def first_inventory(node: str = "node-a") -> InventorySnapshot:
    """A mount's first inventory event of the dataset ``ds``."""
    return InventorySnapshot(node=node, dataset=ObjectRef(name="ds"), incarnation=f"{node}-1", seq=1,
                             counters=CacheCounters(cached_bytes=100, capacity_bytes=1000, miss_bytes=100))


async def node_cache_entry(bus: Bus, key: str = KEY) -> DatasetInventory | None:
    return (await kv_load(await bus.kv(subjects.KV_NODE_CACHE), key, DatasetInventory))[0]


async def test_inventory_of_a_dataset_without_record_leaves_no_entry(bus: Bus, nats_server: NatsServer,
                                                                    tmp_path: Path) -> None:
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    inventory = delivery(subjects.agent_inventory("node-a"), 1)
    await handlers.on_inventory(first_inventory(), inventory)  # never made
    assert await node_cache_entry(bus) is None
    await handlers.apply(DatasetApply(dataset=local_dataset("ds", tmp_path)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.delete(DatasetDelete(name="ds"), delivery(subjects.DATASET_DELETE, 2))
    await handlers.on_inventory(first_inventory(), inventory)  # deleted before its mount's event came
    assert await node_cache_entry(bus) is None


async def test_a_delete_landing_during_the_first_inventory_event_leaves_no_entry(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    await handlers.apply(DatasetApply(dataset=local_dataset("ds", tmp_path)), delivery(subjects.DATASET_APPLY, 1))
    real_missing = dataset_handlers.dataset_record_missing
    deletes: list[str] = []

    async def deleted_right_after(bus: Bus, key: str) -> bool:
        """The record is still there when the handler looks; the delete (handled by another lane, or another
        replica) lands before the handler writes the entry."""
        missing = await real_missing(bus, key)
        if not deletes:
            deletes.append(key)
            await handlers.delete(DatasetDelete(name="ds"), delivery(subjects.DATASET_DELETE, 2))
        return missing

    monkeypatch.setattr(dataset_handlers, "dataset_record_missing", deleted_right_after)
    inventory = delivery(subjects.agent_inventory("node-a"), 1)
    with contextlib.suppress(Conflict):  # its write lost to the delete's purge: the consumer delivers it again
        await handlers.on_inventory(first_inventory(), inventory)
    assert deletes == [KEY]
    await handlers.on_inventory(first_inventory(), delivery(subjects.agent_inventory("node-a"), 1, deliveries=2))
    assert (await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord))[0] is None
    assert await node_cache_entry(bus) is None, "the deleted dataset's node-cache entry came back"

    # The name applied again: its mounts' inventory makes the entry over the delete's purge marker, as before.
    await handlers.apply(DatasetApply(dataset=local_dataset("ds", tmp_path)), delivery(subjects.DATASET_APPLY, 3))
    await handlers.on_inventory(first_inventory(), delivery(subjects.agent_inventory("node-a"), 4))
    entry = await node_cache_entry(bus)
    assert entry is not None and set(entry.nodes) == {"node-a"}
