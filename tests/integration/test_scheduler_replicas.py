"""Two replicas of the scheduler service over one real nats-server, fed by simulated agents (as
``test_scheduler_api``): each folds every inventory event, so both give the same answer and hold the same fold,
for events published before and after the second one started; one of them publishes a dataset's cache facts.
"""

from __future__ import annotations

import contextlib

import msgspec
import nats.js.errors

from libs import subjects
from libs.bus import Bus
from libs.events.agent import InventoryRequest
from libs.events.schedule import DatasetCacheObserved
from libs.members import Members
from services.scheduler.handlers import SchedulerHandlers
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings
from tests.integration.test_scheduler_api import WHOLE, ZONE, FakeAgent, MiB, _true, ranking, scheduler, seed

EXPECTED = [("node-a", 80), ("node-c", 60), ("node-b", 40)]
KEY = ("ml", "imagenet")


def _view(handlers: SchedulerHandlers) -> tuple[list[tuple[str, int]], int, dict[str, int]] | None:
    """A replica's answer to the whole dataset, its unique cached bytes and each node's bytes of current files."""
    reply = handlers.answer(WHOLE)
    if reply.error:
        return None
    nodes = handlers.fold.datasets.get(KEY, {})
    return ranking(reply), handlers.fold.unique.get(KEY, 0), {node: cache.current for node, cache in nodes.items()}


def _members(handlers: SchedulerHandlers) -> Members:
    assert isinstance(handlers.publisher, Members)
    return handlers.publisher


async def _last_fact(bus: Bus) -> DatasetCacheObserved | None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        message = await bus.js.get_last_msg(subjects.STREAM_FACTS, subjects.SCHEDULER_DATASET_CACHE)
        return msgspec.json.decode(message.data or b"", type=DatasetCacheObserved)
    return None


async def test_every_replica_folds_every_inventory_event_and_answers_the_same(bus: Bus,
                                                                              nats_server: NatsServer) -> None:
    await seed(bus, {"node-a": {ZONE: "z1"}, "node-b": {ZONE: "z1"}, "node-c": {ZONE: "z2"}})
    agent_a, agent_c = FakeAgent(bus, "node-a"), FakeAgent(bus, "node-c")

    async def on_request(request: InventoryRequest) -> None:
        await agent_a.on_request(request)
        await agent_c.on_request(request)

    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest), on_request)
    try:
        async with scheduler(make_settings(nats_server.url, replica_name="sched-1")) as first:
            await agent_a.cache("/train/a.bin")
            await agent_c.cache("/val/c.bin")
            async with scheduler(make_settings(nats_server.url, replica_name="sched-2")) as second:
                replicas = (first(), second())
                # Many events, each one delta: replicas sharing a durable would each fold part of them.
                await agent_a.cache("/train/b.bin")
                await agent_c.cache("/train/a.bin")
                for _ in range(20):
                    await agent_a.cache("/train/a.bin")
                    await agent_c.cache("/val/c.bin")
                want = (EXPECTED, 5 * MiB, {"node-a": 4 * MiB, "node-c": 3 * MiB})
                for index, handlers in enumerate(replicas):
                    view = await eventually(lambda h=handlers: _true(_view(h) == want),  # type: ignore[misc]
                                            what=f"replica {index + 1} holding the whole fold")
                    assert view
                    assert handlers.counts.get("inventory_unknown_dataset", 0) == 0

                # Both replicas see each other; each dataset's facts have one publisher, and say the whole figure.
                members = [_members(handlers) for handlers in replicas]
                for member in members:
                    await eventually(lambda m=member: _true(len(m.live) == 2),  # type: ignore[misc]
                                     what="both replicas live")
                assert sum(member.owns(subjects.resource_key(*KEY)) for member in members) == 1
                fact = await eventually(lambda: _fact_of(bus, 5 * MiB), what="the whole figure published")
                assert fact.nodes == 2
    finally:
        await listener.unsubscribe()


async def _fact_of(bus: Bus, unique: int) -> DatasetCacheObserved | None:
    fact = await _last_fact(bus)
    return fact if fact is not None and fact.unique_cached_bytes == unique else None
