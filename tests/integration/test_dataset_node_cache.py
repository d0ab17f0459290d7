"""The per-dataset node-cache entry (``shoal_dataset_node_cache``) on a real nats-server, the dataset service's
handlers driven directly:

- inventory of a dataset that has no record (deleted, or never made) leaves no entry, also when the delete lands
  between the handler's look at the record and its write (the first inventory event of a mount racing the delete:
  its create used to write over the delete's purge marker and bring the entry back for good);
- the sweep of departed nodes (``forget_departed_nodes``) leaves a reference dataset alone: its status mirrors its
  source's nodes and it has no entry of its own, so there is nothing to drop, log or write (each sweep, every
  10 s, logged "nodes gone" for it).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import msgspec
import pytest

from libs import subjects
from libs.bus import AGENTS_TTL_SECONDS, Bus, Conflict, Delivery, kv_load
from libs.events.agent import AgentHeartbeat, AgentRecord, CacheCounters, InventoryDelta, InventorySnapshot
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.inventory import DatasetInventory
from services.dataset import handlers as dataset_handlers
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import FactCollector, dataset_record, json_lines, json_logs, make_settings, unwatched_mirror

KEY = subjects.resource_key("default", "ds")


def delivery(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)


def local_dataset(name: str, folder: Path) -> Dataset:
    return Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))


def first_inventory(node: str = "node-a", dataset: str = "ds", dataset_incarnation: str = "") -> InventorySnapshot:
    """A mount's first inventory event of the dataset ``ds`` (of its incarnation ``dataset_incarnation``; "": an
    agent that does not say it)."""
    return InventorySnapshot(node=node, dataset=ObjectRef(name=dataset), incarnation=f"{node}-1", seq=1,
                             counters=CacheCounters(cached_bytes=100, capacity_bytes=1000, miss_bytes=100),
                             dataset_incarnation=dataset_incarnation)


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
    real_record = dataset_handlers.dataset_record
    deletes: list[str] = []

    async def deleted_right_after(bus: Bus, key: str) -> DatasetRecord | None:
        """The record is still there when the handler looks; the delete (handled by another lane, or another
        replica) lands before the handler writes the entry."""
        record = await real_record(bus, key)
        if not deletes:
            deletes.append(key)
            await handlers.delete(DatasetDelete(name="ds"), delivery(subjects.DATASET_DELETE, 2))
        return record

    monkeypatch.setattr(dataset_handlers, "dataset_record", deleted_right_after)
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


async def test_late_inventory_of_a_deleted_datasets_mount_does_not_count_for_the_name_applied_again(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """Deleted and applied again at once: an event of the first dataset's mount that is handled after the apply
    (queued behind others, or sent before that mount stopped) was folded into the new dataset's entry, which then
    showed node-a caching and reading what the deleted dataset's mount had, for as long as no snapshot of a mount
    of the new one came from node-a (never, when the new one is not mounted there). The events say which
    incarnation of the dataset their mount serves."""
    lives = iter(["life-1", "life-2"])
    handlers = DatasetHandlers(bus, make_settings(nats_server.url), new_incarnation=lambda: next(lives))
    await handlers.apply(DatasetApply(dataset=local_dataset("ds", tmp_path)), delivery(subjects.DATASET_APPLY, 1))
    await handlers.on_inventory(first_inventory(dataset_incarnation="life-1"),
                                delivery(subjects.agent_inventory("node-a"), 1))
    entry = await node_cache_entry(bus)
    assert entry is not None and set(entry.nodes) == {"node-a"} and entry.incarnation == "life-1", entry
    await handlers.delete(DatasetDelete(name="ds"), delivery(subjects.DATASET_DELETE, 2))
    await handlers.apply(DatasetApply(dataset=local_dataset("ds", tmp_path)), delivery(subjects.DATASET_APPLY, 3))

    late = InventoryDelta(node="node-a", dataset=ObjectRef(name="ds"), incarnation="node-a-1", seq=2,
                          counters=CacheCounters(cached_bytes=300, capacity_bytes=1000, miss_bytes=300),
                          dataset_incarnation="life-1")
    await handlers.on_inventory(late, delivery(subjects.agent_inventory("node-a"), 4))
    assert await node_cache_entry(bus) is None, "the deleted dataset's mount counted for the new one"
    record = await dataset_record(bus, "ds")
    assert record is not None
    assert record.incarnation == "life-2" and record.status.nodes == [], record.status

    # The new dataset's own mount counts; a late event of the old one still does not, now that there is an entry.
    await handlers.on_inventory(first_inventory("node-b", dataset_incarnation="life-2"),
                                delivery(subjects.agent_inventory("node-b"), 5))
    late = msgspec.structs.replace(late, seq=3)
    await handlers.on_inventory(late, delivery(subjects.agent_inventory("node-a"), 6))
    entry = await node_cache_entry(bus)
    assert entry is not None and set(entry.nodes) == {"node-b"} and entry.incarnation == "life-2", entry
    record = await dataset_record(bus, "ds")
    assert record is not None
    assert [node.node for node in record.status.nodes] == ["node-b"], record.status


async def test_the_departed_nodes_sweep_leaves_a_reference_dataset_alone(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time()]
    agents = unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url), clock=lambda: now[0], agents=agents)
    datasets = await bus.kv(subjects.KV_DATASETS)
    source, reference = subjects.resource_key("default", "src"), subjects.resource_key("default", "ref")
    await handlers.apply(DatasetApply(dataset=local_dataset("src", tmp_path)), delivery(subjects.DATASET_APPLY, 1))
    for sequence, node in enumerate(("node-a", "node-b"), start=1):
        await handlers.on_inventory(first_inventory(node, "src"), delivery(subjects.agent_inventory(node), sequence))
    linked = Dataset(metadata=ObjectMeta(name="ref"), spec=DatasetSpec(mounts=[Mount(mount_point="dataset://default/src")]))
    await handlers.apply(DatasetApply(dataset=linked), delivery(subjects.DATASET_APPLY, 2))
    mirrored, revision = await kv_load(datasets, reference, DatasetRecord)
    assert mirrored is not None and [node.node for node in mirrored.status.nodes] == ["node-a", "node-b"]
    assert await node_cache_entry(bus, reference) is None

    # node-b's agent is gone: its last beat is more than a TTL older than node-a's.
    agents.values = {"node-a": AgentRecord(heartbeat=AgentHeartbeat(node="node-a"), received_at=now[0]),
                     "node-b": AgentRecord(heartbeat=AgentHeartbeat(node="node-b"), received_at=now[0] - 90)}
    named = {key: {"node-a", "node-b"} for key in (source, reference)}
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_STATUS)
    with json_logs(monkeypatch) as logs:
        await handlers.forget_departed_nodes(named, lambda key: True)  # the service's first minute: not judged
        now[0] += AGENTS_TTL_SECONDS
        await handlers.forget_departed_nodes(named, lambda key: True)
    gone = [line for line in json_lines(logs.getvalue()) if line["event"].startswith("nodes gone")]
    assert [line["dataset"] for line in gone] == ["default/src"], gone  # as logs name objects
    cache = await node_cache_entry(bus, source)
    assert cache is not None and set(cache.nodes) == {"node-a"}  # the source's figures left
    await facts.wait_for("dataset.status.v1", name="src")
    assert await kv_load(datasets, reference, DatasetRecord) == (mirrored, revision), "the reference was written"
    assert await node_cache_entry(bus, reference) is None
    assert not facts.of_type("dataset.status.v1", name="ref")
