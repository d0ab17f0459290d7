"""Memory that must stay bounded under churn, on a real nats-server, the services' handlers driven directly.

- the agents' heartbeats bucket has a TTL: a node that goes away leaves no delete marker for a watch to see, so
  each service mirroring it forgets a silent node itself, its record and the revision kept for it both (the dataset
  service kept every node that ever beat; the runtime service and the scheduler dropped the record but kept its
  revision). 500 nodes beat once and go silent; one keeps beating.
- a ``KvMirror`` of a bucket whose names come and go (a CronJob's DataLoad a minute, for months) kept the revision
  of every key ever deleted until its watch replayed; it now keeps one while the key's delete marker is (a week,
  ``libs.markers``), by the marker's time, and still refuses an older entry of the key meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import AGENTS_TTL_SECONDS, COMMANDS_MAX_AGE, Bus, KvMirror, kv_delete, kv_save, kv_watch
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


# --- a mirror under create/delete churn ---


class Count(msgspec.Struct, frozen=True):
    n: int


class Clock:
    """A wall clock the test moves on."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


ROUNDS = 5
CYCLES = 100  # names made and deleted per round
KEPT = COMMANDS_MAX_AGE  # how long the mirror keeps a deleted key's revision (the markers' retention)


async def test_a_mirror_forgets_deleted_keys_once_their_markers_are_past_keeping(bus: Bus) -> None:
    """Each round makes and deletes CYCLES names, a retention after the round before: the mirror keeps the revisions
    of the round's deletes (their markers are in the bucket) and forgets the earlier rounds' (it kept every one),
    and the live key all along."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    clock = Clock()
    mirror = KvMirror(kv, Count, bus.reconnects, clock=clock)
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.wait_for(mirror.ready.wait(), 10)
        live = await kv_save(kv, "churn.live", Count(0), None)
        for round_ in range(ROUNDS):
            # The markers are stamped by the server: those written before this round's start are a retention old.
            clock.now = time.time() + (KEPT if round_ else 0)
            last = 0
            for cycle in range(CYCLES):
                key = f"churn.{round_}-{cycle}"
                last = await kv_delete(kv, key, await kv_save(kv, key, Count(cycle), None))
            live = await kv_save(kv, "churn.live", Count(round_ + 1), live)

            async def caught_up(key: str = f"churn.{round_}-{CYCLES - 1}", marker: int = last,
                                at: int = live) -> bool:
                return mirror.revision(key) == marker and mirror.revision("churn.live") == at

            await eventually(caught_up, what="the round's deletes in the mirror")
            kept = [k for k in (f"churn.{r}-{c}" for r in range(round_ + 1) for c in range(CYCLES))
                    if mirror.revision(k)]
            assert kept == [f"churn.{round_}-{c}" for c in range(CYCLES)], f"round {round_}: {len(kept)} kept"
            assert len(mirror._revisions) == len(kept) + 1
            assert len(mirror._gone_at) == len(kept)
            assert mirror.values == {"churn.live": Count(round_ + 1)}
    finally:
        mirror.stop()
        await cancel_and_wait(task)


async def test_a_mirror_refuses_an_older_entry_of_a_deleted_key_as_long_as_one_can_come(bus: Bus) -> None:
    """The entries of a real watch, handed to a mirror that does not watch when the test chooses: a late put of a
    key deleted here is refused until the marker itself comes round, however long that takes (the retention is
    counted from the marker the watch delivers); and while the marker is kept, an older entry brought again (a
    replay's, a redelivery's) is refused too."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    clock = Clock()
    mirror = KvMirror(kv, Count, clock=clock)
    stopping = asyncio.Event()
    async with contextlib.aclosing(kv_watch(kv, stopping)) as entries:
        async def next_entry() -> KeyValue.Entry:
            entry = await asyncio.wait_for(anext(entries), 10)
            assert isinstance(entry, KeyValue.Entry), entry
            return entry

        assert await asyncio.wait_for(anext(entries), 10) is None  # the empty bucket's initial values
        mirror.watched(None)
        put = await kv_save(kv, "churn.key", Count(1), None)
        old_put = await next_entry()
        deleted = await kv_delete(kv, "churn.key", put)
        mirror.deleted("churn.key", deleted)
        # Others' churn, a retention later: the local delete is kept, its marker not delivered yet.
        clock.now += 2 * KEPT
        for cycle in range(20):
            await kv_delete(kv, f"churn.other-{cycle}", await kv_save(kv, f"churn.other-{cycle}", Count(cycle), None))
        mirror.watched(old_put)  # delivered late, after the delete
        assert mirror.values == {}
        marker = await next_entry()
        assert marker.operation == "DEL" and marker.revision == deleted
        for _ in range(40):
            mirror.watched(await next_entry())
        assert mirror.revision("churn.key") == deleted
        clock.now = time.time()
        mirror.watched(marker)  # the delete, come round
        assert mirror.revision("churn.key") == deleted
        clock.now += KEPT / 2  # within the retention
        mirror.watched(old_put)
        assert mirror.values == {} and mirror.revision("churn.key") == deleted, "an older put brought back"
        clock.now = time.time() + KEPT + 60  # the marker past the retention (swept from the bucket by now)
        await kv_save(kv, "churn.live", Count(0), None)
        mirror.watched(await next_entry())
        assert mirror.revision("churn.key") == 0
        assert mirror._revisions == {"churn.live": mirror.revision("churn.live")} and not mirror._gone_at
        stopping.set()
