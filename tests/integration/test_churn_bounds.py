"""Memory that must stay bounded under churn, on a real nats-server, the services' handlers driven directly.

- the agents' heartbeats bucket has a TTL: a node that goes away leaves no delete marker for a watch to see, so
  each service mirroring it forgets a silent node itself, its record and the revision kept for it both (the dataset
  service kept every node that ever beat; the runtime service and the scheduler dropped the record but kept its
  revision). 500 nodes beat once and go silent; one keeps beating.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from libs import subjects
from libs.bus import AGENTS_TTL_SECONDS, Bus, KvMirror
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.dataset import DatasetRecord
from libs.events.runtime import RuntimeRecord
from services.dataset.handlers import DatasetHandlers
from services.runtime.handlers import RuntimeHandlers
from services.scheduler.handlers import SchedulerHandlers
from tests.conftest import NatsServer
from tests.helpers import cancel_and_wait, eventually, make_settings, unwatched_mirror

NODES = 500


@asynccontextmanager
async def beaten_mirror(bus: Bus, at: float) -> AsyncIterator[KvMirror[AgentRecord]]:
    """A watched mirror of the agents' bucket after ``NODES`` nodes beat once at ``at`` - 2 TTLs (gone since) and
    node ``alive`` beat at ``at``; stopped on the way out."""
    kv = await bus.kv(subjects.KV_AGENTS)
    for index in range(NODES):
        node = f"gone-{index}"
        record = AgentRecord(heartbeat=AgentHeartbeat(node=node), received_at=at - 2 * AGENTS_TTL_SECONDS)
        await kv.put(node, msgspec.json.encode(record))
    await kv.put("alive", msgspec.json.encode(AgentRecord(heartbeat=AgentHeartbeat(node="alive"), received_at=at)))
    mirror = KvMirror(kv, AgentRecord, bus.reconnects)
    task = asyncio.create_task(mirror.run())

    async def all_in() -> bool:
        return mirror.ready.is_set() and len(mirror.values) == NODES + 1

    try:
        await eventually(all_in, what="every beat in the mirror")
        yield mirror
    finally:
        mirror.stop()
        await cancel_and_wait(task)


def assert_forgotten(mirror: KvMirror[AgentRecord]) -> None:
    assert set(mirror.values) == {"alive"}, f"{len(mirror.values)} records kept"
    assert [f"gone-{index}" for index in range(NODES) if mirror.revision(f"gone-{index}")] == [], \
        "the revisions of nodes gone were kept"


async def test_the_dataset_service_forgets_nodes_gone_from_the_agents_bucket(bus: Bus,
                                                                            nats_server: NatsServer) -> None:
    now = time.time()
    async with beaten_mirror(bus, now) as agents:
        handlers = DatasetHandlers(bus, make_settings(nats_server.url), clock=lambda: now, agents=agents)
        await handlers.forget_departed_nodes({}, lambda key: True)
        assert_forgotten(agents)


async def test_the_runtime_service_forgets_nodes_gone_from_the_agents_bucket(bus: Bus) -> None:
    now = time.time()
    async with beaten_mirror(bus, now) as agents:
        handlers = RuntimeHandlers(bus, agents, unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                                   unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord),
                                   clock=lambda: now)
        await handlers.refresh_all()
        assert_forgotten(agents)


async def test_the_scheduler_forgets_nodes_gone_from_the_agents_bucket(bus: Bus) -> None:
    now = time.time()
    async with beaten_mirror(bus, now) as agents:
        handlers = SchedulerHandlers(bus, agents, clock=lambda: now)
        await handlers.sweep()
        assert_forgotten(agents)
