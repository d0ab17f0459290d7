"""Two agents given one node name, on a real nats-server with the runtime, dataset and scheduler services in-process.

The runtime service flags the node (``services.runtime.domain.agent_record``); before, the node's record took each
agent's beat by turns, and the scheduler's labels of the node and both services' inventory of it (each agent's
mount sends its own, a new incarnation each time) switched between the two at every report. Now the record keeps
the agent it held when the second showed, and the inventory of the other is ignored, counted and logged.
Heartbeats and inventory are published here as the two agents would send them, as JSON, so the same test runs
against a Shoal whose events have no ``instance``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec

from libs import subjects
from libs.bus import Bus, kv_load
from libs.events.agent import AgentHeartbeat, AgentRecord, BlockId, CacheCounters, InventorySnapshot, group_blocks
from libs.events.common import rfc3339
from libs.inventory import DatasetInventory
from services.dataset import app as dataset_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings, running
from tests.integration.test_scheduler_api import DATASET, FILES, ZONE, MiB, scheduler, seed
from tests.metric_values import Snapshot, exists

NODE = "n1"
KEY = (DATASET.namespace, DATASET.name)


class SharedNameAgent:
    """One of two agent processes given the node name ``NODE``: its heartbeats and its mount's inventory."""

    def __init__(self, bus: Bus, instance: str, zone: str, path: str) -> None:
        self.bus, self.instance, self.zone, self.path = bus, instance, zone, path
        self.seq = 0

    async def beat(self) -> None:
        beat = AgentHeartbeat(node=NODE, labels={ZONE: self.zone}, sent_at=time.time(), instance=self.instance)
        await self.bus.js.publish(subjects.agent_heartbeat(NODE), msgspec.json.encode(beat))

    async def snapshot(self) -> None:
        self.seq += 1
        blocks = {BlockId(0, self.path.lstrip("/"), "e1", i): MiB for i in range(FILES[self.path] // MiB)}
        event = InventorySnapshot(node=NODE, dataset=DATASET, incarnation=f"{self.instance}-mount", seq=self.seq,
                                  files=group_blocks(blocks.items()),
                                  counters=CacheCounters(cached_bytes=sum(blocks.values())))
        payload: dict[str, Any] = msgspec.to_builtins(event)
        payload["instance"] = self.instance  # the field this change adds; a Shoal without it ignores it
        await self.bus.js.publish(subjects.agent_inventory(NODE), msgspec.json.encode(payload))


async def record_of(bus: Bus) -> AgentRecord | None:
    record, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), NODE, AgentRecord)
    return record


async def node_cache(bus: Bus) -> int | None:
    """The dataset service's figure of ``NODE``'s cache of the dataset (its fold in KV), None before any."""
    folded, _ = await kv_load(await bus.kv(subjects.KV_NODE_CACHE), subjects.resource_key(*KEY), DatasetInventory)
    node = folded.nodes.get(NODE) if folded is not None else None
    return node.counters.cached_bytes if node is not None else None


async def test_two_agents_sharing_a_node_name_do_not_make_the_views_of_the_node_switch_between_them(
        bus: Bus, nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    # Listed a moment ago: the dataset service does not list it again (the manifest the scheduler reads stays).
    await seed(bus, {})
    datasets = await bus.kv(subjects.KV_DATASETS)
    entry = await datasets.get("ml.imagenet")
    record = msgspec.json.decode(entry.value or b"", type=dict)
    record["status"]["lastSyncTime"] = rfc3339(time.time())
    await datasets.put("ml.imagenet", msgspec.json.encode(record))
    first = SharedNameAgent(bus, "agent-first", "zone-a", "/train/a.bin")   # 2 MiB cached
    second = SharedNameAgent(bus, "agent-second", "zone-b", "/val/c.bin")   # 1 MiB cached
    async with running(lambda stop: runtime_app.run(settings, stop), lambda stop: dataset_app.run(settings, stop)), \
            scheduler(settings) as handlers:

        async def shown(instance: str, after: float = 0.0) -> AgentRecord | None:
            found = await record_of(bus)
            return found if found and found.heartbeat.instance == instance and found.received_at > after else None

        await first.beat()
        await eventually(lambda: shown("agent-first"), what="the first agent's beat in the node's record")
        # The second one's first beat: as far as anyone can tell, the first agent restarted.
        await second.beat()
        held = await eventually(lambda: shown("agent-second"), what="the second agent's beat in the node's record")
        await second.snapshot()

        async def second_counted() -> bool:
            fold = handlers().fold.held.get(KEY, {})
            return fold.get(NODE) == MiB and await node_cache(bus) == MiB

        await eventually(second_counted, what="the second agent's inventory in both services' views")

        for turn in range(3):
            # The first agent beats and reports again: the record stays with the second (it says the conflict).
            before = (await record_of(bus)).conflict_at  # type: ignore[union-attr]
            metrics = Snapshot()
            await first.beat()

            async def beat_handled(before: float = before) -> AgentRecord | None:
                found = await record_of(bus)
                return found if found is not None and found.conflict_at > before else None

            now = await eventually(beat_handled, what=f"the first agent's beat {turn} handled")
            assert now.heartbeat.instance == "agent-second", f"turn {turn}: the node's record switched agents"
            assert now.heartbeat.labels == {ZONE: "zone-b"}

            async def scheduler_caught_up(now: AgentRecord = now) -> bool:
                mirrored = handlers().agents.values.get(NODE)
                return mirrored is not None and mirrored.conflict_at == now.conflict_at

            await eventually(scheduler_caught_up, what="the scheduler's view of the record")
            assert handlers().view.labels(NODE) == {ZONE: "zone-b"}

            await first.snapshot()

            async def snapshot_handled(metrics: Snapshot = metrics) -> bool:
                # Ignored by both services (counted once each), or taken by them (the views switched).
                ignored = metrics.moved("shoal_inventory_other_instance_events_total", node=NODE) >= 2
                taken = (handlers().fold.held.get(KEY, {}).get(NODE) == 2 * MiB
                         and await node_cache(bus) == 2 * MiB)
                return ignored or taken

            await eventually(snapshot_handled, what=f"the first agent's snapshot {turn} handled")
            assert handlers().fold.held.get(KEY, {}).get(NODE) == MiB, f"turn {turn}: the scheduler switched"
            assert await node_cache(bus) == MiB, f"turn {turn}: the dataset service switched"
            # The held agent beats on: it stays fresh, and the record keeps it.
            await second.beat()
            after = held.received_at
            held = await eventually(functools.partial(shown, "agent-second", after),
                                    what="the second agent's beat in the node's record")

        # The node leaves (its record gone, as the agents' TTL removes it): the count of its other agent's events
        # no longer applies, and its series goes. Kept, every node that ever had two agents stayed a series.
        assert exists("shoal_inventory_other_instance_events_total", node=NODE)
        await (await bus.kv(subjects.KV_AGENTS)).delete(NODE)

        async def series_gone() -> bool:
            return not exists("shoal_inventory_other_instance_events_total", node=NODE) and \
                not handlers().other_instance_nodes

        await eventually(series_gone, 20, "the node's series of other-instance events removed")
