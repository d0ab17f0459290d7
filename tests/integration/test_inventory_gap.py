"""A gap in a real agent's inventory sequence: the dataset service asks the agent for a snapshot and converges.

The node agent and its mount run as usual; the dataset service is stopped while the mount reports two deltas, one
of which is deleted from the stream before the service comes back. On its return it sees the sequence jump.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.inventory import DatasetInventory
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import NODE, InventoryWatch, node_stack, read_file

MiB = 1024 * 1024

pytestmark = pytest.mark.needs("fuse")


async def test_sequence_gap_gets_a_snapshot_and_cache_states_converge(bus: Bus, settings: Settings,
                                                                     seaweedfs: SeaweedServer, bucket: str,
                                                                     tmp_path: Path) -> None:
    objects = {f"g{i}.bin": os.urandom(MiB) for i in range(3)}
    await put_objects(seaweedfs, bucket, objects)
    inventory = InventoryWatch()
    await inventory.start(bus)
    requests: list[dict[str, Any]] = []

    async def on_request(msg: Any) -> None:
        requests.append(msgspec.json.decode(msg.data))

    await bus.nc.subscribe(subjects.INVENTORY_REQUEST, cb=on_request)
    subject = subjects.agent_inventory(NODE)

    def cached_bytes(event: dict[str, Any]) -> int:
        return int(event["counters"]["cachedBytes"])

    async def node_cache() -> DatasetInventory | None:
        kv = await bus.kv(subjects.KV_NODE_CACHE)
        cache, _ = await kv_load(kv, subjects.resource_key("default", "gap"), DatasetInventory)
        return cache

    async with node_stack(bus, settings, seaweedfs, tmp_path, dataset_service=False) as node:
        async with node.dataset_service():
            await node.apply("gap", bucket)
            root = await node.wait_mounted("gap", expect="g2.bin")
            assert await read_file(root / "g0.bin") == objects["g0.bin"]

            async def one_third() -> Any:
                record = await node.record("gap")
                return record if record.status.cache_states.cached_percentage == "33.3%" else None

            await eventually(one_third, what="the first file counted as cached")
        # The dataset service is down; the agent goes on reporting.
        stream_before = (await bus.js.stream_info(subjects.STREAM_AGENT)).state.last_seq
        seen = len(inventory.events)
        assert await read_file(root / "g1.bin") == objects["g1.bin"]
        await eventually(lambda: _latest(inventory, seen, lambda e: cached_bytes(e) == 2 * MiB),
                         what="a delta with the second file cached")
        # Lose every delta that reported the second file's blocks.
        lost = []
        for seq in range((await bus.js.stream_info(subjects.STREAM_AGENT)).state.last_seq, stream_before, -1):
            message = await bus.js.get_msg(subjects.STREAM_AGENT, seq)
            if message.subject == subject:
                event = msgspec.json.decode(message.data or b"{}")
                lost.append(event["seq"])
                await bus.js.delete_msg(subjects.STREAM_AGENT, seq)
        assert lost
        seen = len(inventory.events)
        assert await read_file(root / "g2.bin") == objects["g2.bin"]
        last = await eventually(lambda: _latest(inventory, seen, lambda e: cached_bytes(e) == 3 * MiB),
                                what="a delta with the third file cached")
        assert last["type"] == "agent.inventory.delta.v2" and last["seq"] > max(lost)
        requests_before = len(requests)

        async with node.dataset_service():
            request = await eventually(lambda: _first(requests[requests_before:]),
                                       what="a snapshot request after the gap")
            assert request["node"] == NODE and request["dataset"]["name"] == "gap"
            snapshot = await eventually(
                lambda: _latest(inventory, seen, lambda e: e["type"] == "agent.inventory.snapshot.v2"),
                what="the agent's snapshot")
            assert sum(size for *_, indices in snapshot["files"] for _, size in indices) == 3 * MiB

            async def converged() -> DatasetInventory | None:
                cache = await node_cache()
                position = cache.nodes.get(NODE) if cache else None
                # Exact again: the snapshot replaced what the lost deltas left unknown.
                return cache if position is not None and position.seq >= snapshot["seq"] and position.exact else None

            await eventually(converged, what="the dataset's cache at the snapshot")
            record = await node.record("gap")
            assert record.status.cache_states.cached_percentage == "100.0%"


async def _latest(inventory: InventoryWatch, start: int, match: Any) -> dict[str, Any] | None:
    found = [e for e in inventory.events[start:] if match(e)]
    return found[-1] if found else None


async def _first(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    return items[0] if items else None
