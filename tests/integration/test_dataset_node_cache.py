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

import pytest

from libs import subjects
from libs.bus import AGENTS_TTL_SECONDS, Bus, Conflict, Delivery, kv_load
from libs.events.agent import AgentHeartbeat, AgentRecord, CacheCounters, InventorySnapshot
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.inventory import DatasetInventory
from services.dataset import handlers as dataset_handlers
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import FactCollector, json_lines, json_logs, make_settings, unwatched_mirror

KEY = subjects.resource_key("default", "ds")


def delivery(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)


def local_dataset(name: str, folder: Path) -> Dataset:
    return Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))


def first_inventory(node: str = "node-a", dataset: str = "ds") -> InventorySnapshot:
    """A mount's first inventory event of the dataset ``ds``."""
    return InventorySnapshot(node=node, dataset=ObjectRef(name=dataset), incarnation=f"{node}-1", seq=1,
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
