"""The scheduler service over a real nats-server, fed by hand: a dataset record and manifest in their stores, agent
records with labels, and two simulated agents that publish inventory and answer snapshot requests as real ones do.

Shown: ``sched.score.v1`` ranks the node holding most bytes first and honours path hints, required mode and zones;
a malformed request and an unknown dataset get error answers (counted); a delta with a gap makes the scheduler ask
that node for a snapshot; a restarted scheduler rebuilds its fold from the snapshots it asks for at start and gives
the same answers; deleting the dataset forgets its cache. (Real agents and mounts: ``test_scheduler_agents``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import msgspec
import nats.errors
import pytest
from nats.aio.subscription import Subscription

from libs import subjects
from libs.bus import Bus, KvMirror, kv_load
from libs.config import SchedulerSettings, Settings
from libs.events.agent import (
    AgentHeartbeat,
    AgentRecord,
    BlockId,
    CacheCounters,
    InventoryDelta,
    InventoryRequest,
    InventorySnapshot,
    MountGroup,
    group_blocks,
)
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, ManifestEntry, Mount
from libs.events.schedule import DatasetUse, ScoreReply, ScoreRequest
from libs.manifest import ManifestStore, ManifestWriter
from libs.side_server import Readiness
from services.scheduler import app
from services.scheduler.handlers import CATALOG_ATTEMPTS, NOT_READY, NOT_WARM, SchedulerHandlers
from services.scheduler.http import HttpLoop, http_loop
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings
from tests.metric_values import Snapshot

MiB = 1 << 20
DATASET = ObjectRef(name="imagenet", namespace="ml")
ZONE = "topology.kubernetes.io/zone"
T = TypeVar("T")
FILES = {"/train/a.bin": 2 * MiB, "/train/b.bin": 2 * MiB, "/val/c.bin": MiB}


class FakeAgent:
    """One node's mount of the dataset: its blocks, its numbered events, and answers to snapshot requests."""

    def __init__(self, bus: Bus, node: str, incarnation: str = "inc-1") -> None:
        self.bus, self.node, self.incarnation = bus, node, incarnation
        self.seq = 0
        self.blocks: dict[BlockId, int] = {}

    async def snapshot(self) -> None:
        self.seq += 1
        await self.bus.publish(subjects.agent_inventory(self.node), InventorySnapshot(
            node=self.node, dataset=DATASET, incarnation=self.incarnation, seq=self.seq,
            files=group_blocks(self.blocks.items()), counters=CacheCounters(cached_bytes=sum(self.blocks.values()))))

    async def cache(self, path: str, gap: int = 0) -> None:
        added = {BlockId(0, path.lstrip("/"), "e1", i): MiB for i in range(FILES[path] // MiB)}
        self.blocks.update(added)
        self.seq += 1 + gap
        await self.bus.publish(subjects.agent_inventory(self.node), InventoryDelta(
            node=self.node, dataset=DATASET, incarnation=self.incarnation, seq=self.seq,
            cached=group_blocks(added.items()), counters=CacheCounters(cached_bytes=sum(self.blocks.values()))))

    async def on_request(self, request: InventoryRequest) -> None:
        if request.node in ("", self.node) and request.dataset in (None, DATASET):
            await self.snapshot()


async def seed(bus: Bus, nodes: dict[str, dict[str, str]]) -> None:
    """The dataset's record and manifest, and fresh agent records with the nodes' labels."""
    with ManifestWriter() as writer:
        for path, size in FILES.items():
            writer.add(ManifestEntry(path=path, mount=0, key=path.lstrip("/"), size=size, etag="e1", mtime=0.0))
        await (await ManifestStore.of(bus)).save("ml.imagenet", writer)
    record = DatasetRecord(
        dataset=Dataset(metadata=ObjectMeta(name="imagenet", namespace="ml"),
                        spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
        generation=1, status=DatasetStatus(phase="Bound", ufs_total_bytes=5 * MiB, file_num=3, synced_generation=1,
                                           manifest="ml.imagenet"))
    await (await bus.kv(subjects.KV_DATASETS)).put("ml.imagenet", msgspec.json.encode(record))
    agents = await bus.kv(subjects.KV_AGENTS)
    for node, labels in nodes.items():
        beat = AgentHeartbeat(node=node, labels=labels, sent_at=time.time())
        await agents.put(node, msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=time.time())))


@asynccontextmanager
async def scheduler(settings: Settings) -> AsyncIterator[Callable[[], SchedulerHandlers]]:
    """The scheduler service in-process; yields a getter for its handlers (its fold and counts)."""
    found: list[SchedulerHandlers] = []
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(settings, stop, started=found.append))
    try:
        await eventually(lambda: _true(bool(found)), what="the scheduler wired")
        await asyncio.wait_for(found[0].datasets_ready.wait(), 15)
        yield lambda: found[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _true(value: T) -> T:
    return value


async def ask(bus: Bus, request: ScoreRequest | bytes) -> ScoreReply:
    data = request if isinstance(request, bytes) else msgspec.json.encode(request)
    reply = await bus.nc.request(subjects.SCHED_SCORE, data, timeout=5)
    return msgspec.json.decode(reply.data, type=ScoreReply)


def ranking(reply: ScoreReply) -> list[tuple[str, int]]:
    return [(score.node, score.score) for score in reply.scores]


WHOLE = ScoreRequest(datasets=[DatasetUse(name="imagenet", namespace="ml")])


@pytest.fixture
def scheduler_settings(nats_server: NatsServer) -> Settings:
    return make_settings(nats_server.url)


async def test_score_api_gap_restart_and_deletion(bus: Bus, scheduler_settings: Settings) -> None:
    await seed(bus, {"node-a": {ZONE: "z1"}, "node-b": {ZONE: "z1"}, "node-c": {ZONE: "z2"}})
    agent_a, agent_c = FakeAgent(bus, "node-a"), FakeAgent(bus, "node-c")
    requests: list[InventoryRequest] = []

    async def on_request(request: InventoryRequest) -> None:
        requests.append(request)
        await agent_a.on_request(request)
        await agent_c.on_request(request)

    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest), on_request)
    metrics = Snapshot()
    try:
        async with scheduler(scheduler_settings) as handlers:
            await agent_a.cache("/train/a.bin")
            await agent_c.cache("/val/c.bin")
            await agent_a.cache("/train/b.bin")

            async def settled(expected: list[tuple[str, int]], request: ScoreRequest = WHOLE) -> ScoreReply | None:
                reply = await ask(bus, request)
                return reply if ranking(reply) == expected else None

            first = await eventually(lambda: settled([("node-a", 80), ("node-b", 40), ("node-c", 20)]),
                                     what="node-a (80 %) first, node-b in its zone next")
            assert first.scores[0].cached_bytes == 4 * MiB and "(2 whole files)" in first.scores[0].reason
            val = await ask(bus, ScoreRequest(datasets=[DatasetUse(name="imagenet", namespace="ml",
                                                                   paths=["/val"], required=True)]))
            assert ranking(val) == [("node-c", 100)] and set(val.filtered) == {"node-a", "node-b"}

            # Bad input: an error answer each, counted, and the service keeps answering.
            malformed = await ask(bus, b'{"type": "sched.score.v1", "id": "q7", "datasets": 7}')
            assert malformed.error.startswith("invalid sched.score.v1 request") and malformed.scores == []
            assert malformed.causation_id == "q7"
            assert (await ask(bus, b"\xff not json")).error.startswith("invalid sched.score.v1 request")
            unknown = await ask(bus, ScoreRequest(datasets=[DatasetUse(name="nope")]))
            assert unknown.error == "unknown dataset default/nope"
            assert handlers().counts["malformed"] == 2 and handlers().counts["error"] == 1
            # Every question over NATS is timed once, whatever its outcome; the events so far were folded.
            decided = sum(metrics.moved("shoal_scheduler_decisions_total", way="nats", outcome=outcome)
                          for outcome in ("answered", "error", "malformed"))
            assert metrics.moved("shoal_scheduler_decision_duration_seconds_count", way="nats") == decided >= 5
            assert metrics.moved("shoal_scheduler_fold_events_total", outcome="folded") >= 3

            # A gap in node-c's sequence: the scheduler asks node-c (and only it) for a snapshot.
            before = len(requests)
            await agent_c.cache("/train/a.bin", gap=3)
            gap = await eventually(lambda: _true([r for r in requests[before:] if r.node == "node-c"]),
                                   what="a snapshot request after the gap")
            assert gap[0].dataset == DATASET
            await eventually(lambda: settled([("node-a", 80), ("node-c", 60), ("node-b", 40)]),
                             what="node-c's snapshot folded")
            answer = await ask(bus, WHOLE)

        # A restarted scheduler asks everyone for a snapshot and answers the same.
        before = len(requests)
        async with scheduler(scheduler_settings) as handlers:
            await eventually(lambda: _true(any(r.node == "" and r.dataset is None for r in requests[before:])),
                             what="a snapshot request to every agent at start")
            again = await eventually(lambda: settled([("node-a", 80), ("node-c", 60), ("node-b", 40)]),
                                     what="the same ranking after a restart")
            assert again.scores == answer.scores

            # Deleting the dataset forgets its cache; the last events of its mounts do not bring it back.
            await (await bus.kv(subjects.KV_DATASETS)).delete("ml.imagenet")
            gone = await eventually(lambda: _error(bus), what="the deleted dataset unknown")
            assert gone.error == "unknown dataset ml/imagenet"
            await agent_a.cache("/val/c.bin")
            await eventually(lambda: _true(handlers().counts.get("inventory_unknown_dataset", 0) >= 1),
                             what="the late event ignored")
            assert metrics.moved("shoal_scheduler_fold_events_total", outcome="unknown_dataset") >= 1
            assert ("ml", "imagenet") not in handlers().fold.datasets
    finally:
        await listener.unsubscribe()


async def node_a_answering(bus: Bus) -> tuple[FakeAgent, list[InventoryRequest], Subscription]:
    """Agents node-a and node-b seeded (zone z1); node-a's fake agent answers the snapshot requests, each kept in
    the list. The subscription is the caller's to stop."""
    await seed(bus, {"node-a": {ZONE: "z1"}, "node-b": {ZONE: "z1"}})
    agent_a = FakeAgent(bus, "node-a")
    requests: list[InventoryRequest] = []

    async def on_request(request: InventoryRequest) -> None:
        requests.append(request)
        await agent_a.on_request(request)

    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest), on_request)
    return agent_a, requests, listener


async def node_a_asked_and_back(bus: Bus, requests: list[InventoryRequest], before: int) -> None:
    """node-a, whose agent beats again, is asked for its inventory (in ``requests`` past ``before``, a list that
    grows), and once its snapshot is folded it ranks first (a.bin and b.bin, 4 of 5 MiB)."""
    await eventually(lambda: _true([r for r in requests[before:] if r.node == "node-a"]),
                     what="node-a asked for its inventory once its agent beats again")

    async def back() -> ScoreReply | None:
        reply = await ask(bus, WHOLE)
        return reply if ranking(reply)[:1] == [("node-a", 80)] else None

    await eventually(back, what="node-a's snapshot folded: a.bin and b.bin, 4 of 5 MiB")


async def test_a_node_whose_agent_went_away_comes_back_only_when_its_agent_beats_again(
        bus: Bus, scheduler_settings: Settings) -> None:
    """node-a's agent record is deleted (the node left): the sweep forgets its cache. Its mount's late events (a
    delta, a snapshot) brought it back as a node that never beat, holding bytes for ever (no sweep forgot it
    again); now they are ignored and counted (``node_gone``). When its agent beats again the scheduler asks it for
    its inventory and it counts from its snapshot."""
    agent_a, requests, listener = await node_a_answering(bus)
    metrics = Snapshot()
    agents = await bus.kv(subjects.KV_AGENTS)
    try:
        async with scheduler(scheduler_settings) as handlers:
            await agent_a.cache("/train/a.bin")
            await eventually(lambda: _true("node-a" in handlers().fold.nodes() and "node-a" in handlers().beating),
                             what="node-a's cache folded and its agent seen beating")
            await agents.delete("node-a")
            await eventually(lambda: _true("node-a" not in handlers().fold.nodes()), what="node-a forgotten")

            await agent_a.cache("/train/b.bin")
            await agent_a.snapshot()
            await eventually(lambda: _true(handlers().counts.get("inventory_node_gone", 0) >= 2),
                             what="node-a's late events ignored")
            assert "node-a" not in handlers().fold.nodes()
            assert metrics.moved("shoal_scheduler_fold_events_total", outcome="node_gone") >= 2
            assert [score.node for score in (await ask(bus, WHOLE)).scores] == ["node-b"]

            before = len(requests)
            beat = AgentHeartbeat(node="node-a", labels={ZONE: "z1"}, sent_at=time.time())
            await agents.put("node-a", msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=time.time())))
            await node_a_asked_and_back(bus, requests, before)
    finally:
        await listener.unsubscribe()


async def test_after_a_restart_a_node_without_an_agent_record_is_not_taken_in_from_its_inventory(
        bus: Bus, scheduler_settings: Settings) -> None:
    """node-a's agent went away (its record deleted) while its mount process still publishes and answers snapshot
    requests. The forgotten nodes live in the scheduler's memory: a restarted scheduler took node-a in from the
    snapshot it asks everyone for at start, as a node that never beat, and no sweep forgot it again. Now, once
    ``node_timeout`` has passed since the start, a node with no agent record is forgotten and its inventory ignored
    (``node_gone``); when its agent beats again it is asked for its snapshot and counts."""
    agent_a, requests, listener = await node_a_answering(bus)
    agents = await bus.kv(subjects.KV_AGENTS)
    settings = dataclasses.replace(scheduler_settings, scheduler=SchedulerSettings(node_timeout=4.0))
    beating = asyncio.Event()

    async def beat_a() -> None:  # node-a's agent back, beating as an agent does (well within the node timeout)
        while True:
            beat = AgentHeartbeat(node="node-a", labels={ZONE: "z1"}, sent_at=time.time())
            await agents.put("node-a", msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=time.time())))
            beating.set()
            await asyncio.sleep(0.5)  # a heartbeat's period, not a wait for a condition

    async def stop_beating() -> None:
        if beats is not None:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    beats: asyncio.Task[None] | None = asyncio.create_task(beat_a())
    try:
        async with scheduler(settings) as handlers:
            await agent_a.cache("/train/a.bin")
            await eventually(lambda: _true("node-a" in handlers().fold.nodes() and "node-a" in handlers().beating),
                             what="node-a's cache folded and its agent seen beating")
            await stop_beating()
            await agents.delete("node-a")
            await eventually(lambda: _true("node-a" not in handlers().fold.nodes()), what="node-a forgotten")

        before = len(requests)
        async with scheduler(settings) as handlers:
            await eventually(lambda: _true(any(r.node == "" for r in requests[before:])),
                             what="a snapshot request to every agent at start (node-a's mount answers it)")
            await eventually(lambda: _true("node-a" not in handlers().fold.nodes() and "node-a" in handlers().gone),
                             what="node-a, without an agent record, not held once the node timeout has passed")
            ignored = handlers().counts.get("inventory_node_gone", 0)
            await agent_a.cache("/train/b.bin")
            await eventually(lambda: _true(handlers().counts.get("inventory_node_gone", 0) > ignored),
                             what="node-a's next event ignored")
            assert "node-a" not in handlers().fold.nodes()
            assert "node-a" not in [score.node for score in (await ask(bus, WHOLE)).scores]

            before = len(requests)
            beating.clear()
            beats = asyncio.create_task(beat_a())
            await asyncio.wait_for(beating.wait(), 5)
            await node_a_asked_and_back(bus, requests, before)
    finally:
        await stop_beating()
        await listener.unsubscribe()


async def _error(bus: Bus) -> ScoreReply | None:
    reply = await ask(bus, WHOLE)
    return reply if reply.error else None


PVC_POD = {"metadata": {"name": "trainer", "namespace": "ml"},
           "spec": {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet"}}]}}


async def test_the_http_front_runs_when_its_port_is_set_and_answers_from_the_same_fold(
        bus: Bus, scheduler_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHOAL_SCHED_HTTP_PORT set (plain HTTP here; TLS is covered in test_scheduler_http): the extender's
    prioritize answer follows the fold like the NATS API's."""
    await seed(bus, {"node-a": {}})
    agent = FakeAgent(bus, "node-a")
    # Port 0, the one it got read back from its loop: a port found free and let go of could be taken by another
    # worker's server before the scheduler bound it.
    loops: list[HttpLoop] = []

    def kept(*args: Any, **kwargs: Any) -> HttpLoop:
        loops.append(http_loop(*args, **kwargs))
        return loops[-1]

    monkeypatch.setattr(app, "http_loop", kept)
    settings = dataclasses.replace(scheduler_settings, scheduler=SchedulerSettings(http_port=0))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(settings, stop))

    async def bound() -> int:
        return loops[0].bound_port if loops else 0

    base = f"http://127.0.0.1:{await eventually(bound, what='the extender listening')}"

    async def prioritized(session: aiohttp.ClientSession) -> list[dict[str, object]] | None:
        try:
            async with session.post(f"{base}/prioritize", json={"Pod": PVC_POD, "NodeNames": ["node-a"]}) as answer:
                scores: list[dict[str, object]] = await answer.json()
        except aiohttp.ClientConnectionError:
            return None
        # Until the scheduler has the dataset, the pod counts as one without data (node-a "holds no cache": 10);
        # until it has folded the delta, node-a holds none of it (0).
        return scores if scores == [{"Host": "node-a", "Score": 2}] else None

    # The delta may be published before the scheduler starts following the stream: the snapshot it asks for at
    # start brings it in, as from a real agent.
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent.on_request)
    try:
        await agent.cache("/val/c.bin")
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: prioritized(session), what="the extender ranks node-a by its 1 of 5 MiB",
                             timeout=20)
            async with session.get(f"{base}/healthz") as health:
                assert health.status == 200
        assert ranking(await ask(bus, WHOLE)) == [("node-a", 20)]
    finally:
        await listener.unsubscribe()
        stop.set()
        await asyncio.wait_for(task, 20)



async def test_before_the_datasets_are_read_it_is_not_ready_and_answers_an_error(
        bus: Bus, scheduler_settings: Settings) -> None:
    """Just after a start every dataset would look unknown and every node cache-free: until the records are read,
    /readyz says so and every question gets an error (the webhook and extender fall back) rather than a ranking."""
    await seed(bus, {"node-a": {}})
    readiness = Readiness()
    at_start: list[tuple[ScoreReply, tuple[bool, dict[str, str]]]] = []
    stop = asyncio.Event()

    def started(handlers: SchedulerHandlers) -> None:  # wired, its loops not started yet
        at_start.append((handlers.answer(WHOLE), readiness.report()))

    task = asyncio.create_task(app.run(scheduler_settings, stop, readiness=readiness, started=started))
    try:
        # Ready only once wired (``at_start``): before, the only check is NATS (``libs.service.main`` adds one
        # that says "starting"; this test makes its own Readiness).
        await eventually(lambda: _true(bool(at_start) and readiness.report()[0]), what="the scheduler ready",
                         timeout=20)
        (reply, (ready, checks)), = at_start
        assert reply.error == NOT_READY and not reply.scores
        assert not ready and checks["datasets"] == NOT_READY
        assert ranking(await ask(bus, WHOLE)) == [("node-a", 0)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def _serving(node: str, dataset: ObjectRef = DATASET, state: str = "Serving") -> AgentRecord:
    """A fresh record of an agent whose heartbeat reports its mount of ``dataset`` in ``state``."""
    beat = AgentHeartbeat(node=node, sent_at=time.time(), mount_groups=[
        MountGroup(namespace=dataset.namespace, state=state, datasets={dataset.name: 0})])  # type: ignore[arg-type]
    return AgentRecord(heartbeat=beat, received_at=time.time())


async def test_after_a_start_it_answers_once_the_serving_mounts_snapshots_are_in(
        bus: Bus, scheduler_settings: Settings) -> None:
    """The fold starts empty and is rebuilt from the snapshots asked for at start. Until the mounts the heartbeats
    report serving have sent theirs, a ranking would say "nobody holds it" (or name the few holders heard from, which
    the webhook would freeze into a pod's required hosts): it answered at once, from an empty fold. Now every question
    gets an error, and /readyz says so, until they are in."""
    await seed(bus, {"node-b": {}})
    await (await bus.kv(subjects.KV_AGENTS)).put("node-a", msgspec.json.encode(_serving("node-a")))
    agent = FakeAgent(bus, "node-a")  # its cache, from before the scheduler's restart
    agent.blocks = {BlockId(0, name, "e1", i): MiB for name in ("train/a.bin", "train/b.bin") for i in range(2)}
    readiness = Readiness()
    found: list[SchedulerHandlers] = []

    def started(handlers: SchedulerHandlers) -> None:
        handlers.warmup_seconds = 3600.0  # the deadline is not what this test waits for
        found.append(handlers)

    stop = asyncio.Event()
    task = asyncio.create_task(app.run(scheduler_settings, stop, readiness=readiness, started=started))
    try:
        await eventually(lambda: _true(bool(found) and found[0].counts.get("snapshot_requests", 0) >= 1),
                         what="every agent asked for a snapshot at start", timeout=20)
        reply = await ask(bus, WHOLE)
        assert reply.error == NOT_WARM and not reply.scores
        ready, checks = readiness.report()
        assert not ready and checks["inventory"] == NOT_WARM
        await agent.snapshot()  # node-a's mount answers the request
        reply = await eventually(lambda: _scored(ask(bus, WHOLE)), what="node-a's snapshot folded", timeout=20)
        assert ranking(reply) == [("node-a", 80), ("node-b", 0)]
        assert readiness.report()[1]["inventory"] == "ok"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_warming_up_ends_at_its_deadline_and_waits_only_for_serving_mounts(bus: Bus) -> None:
    """A serving mount whose snapshot never comes holds the answers up for ``warmup_seconds`` at most; a mount that
    is not serving, or of a dataset that does not exist, is not waited for."""
    async def warming_after_start(records: dict[str, AgentRecord]) -> tuple[SchedulerHandlers, list[float]]:
        handlers, clock, record = await _flaky_handlers(bus, ManifestStore)
        await handlers.dataset_changed(("ml", "imagenet"), record)
        handlers.datasets_ready.set()
        handlers._asked_at = clock[0]  # as ``watch_datasets`` does once the records are read
        handlers.agents.values.update({node: msgspec.structs.replace(r, received_at=clock[0])
                                       for node, r in records.items()})
        handlers.agents.ready.set()
        return handlers, clock

    handlers, _ = await warming_after_start({"node-a": _serving("node-a", state="Failing"),
                                             "node-b": _serving("node-b", ObjectRef(name="gone", namespace="ml"))})
    assert handlers.warming() == "" and ranking(handlers.answer(WHOLE)) == [("node-a", 0), ("node-b", 0)]
    handlers, clock = await warming_after_start({"node-c": _serving("node-c")})
    assert handlers.answer(WHOLE).error == NOT_WARM
    clock[0] += handlers.warmup_seconds
    assert ranking(handlers.answer(WHOLE)) == [("node-c", 0)] and handlers.warming() == ""


async def test_a_stop_before_the_datasets_are_read_ends_promptly_and_keeps_the_inventory(
        bus: Bus, scheduler_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inventory waiting in the stream while the dataset watch has not delivered its records yet (held here): a
    stop ends the scheduler at once (it hung: a handler waited for the records, which never came), and the next
    scheduler has the node's cache (from the snapshot it asks for at start: each replica follows the stream from its
    own start)."""
    await seed(bus, {"node-a": {}})
    agent = FakeAgent(bus, "node-a")
    await agent.cache("/val/c.bin")

    async def held(self: SchedulerHandlers, stopping: asyncio.Event) -> None:
        await stopping.wait()

    monkeypatch.setattr(SchedulerHandlers, "watch_datasets", held)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(scheduler_settings, stop))
    try:
        reply = await eventually(lambda: ask(bus, WHOLE), what="the scheduler answering", timeout=20,
                                 tolerate=(nats.errors.NoRespondersError, nats.errors.TimeoutError))
        assert reply.error == NOT_READY
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    monkeypatch.undo()
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent.on_request)
    try:
        async with scheduler(scheduler_settings):
            reply = await eventually(lambda: _scored(ask(bus, WHOLE)), what="the node's cache folded", timeout=20)
            assert ranking(reply) == [("node-a", 20)]
    finally:
        await listener.unsubscribe()


async def _scored(asked: Awaitable[ScoreReply]) -> ScoreReply | None:
    reply = await asked
    return reply if reply.scores and reply.scores[0].score else None


def _flaky(failures: int) -> type[ManifestStore]:
    """A manifest store whose first ``failures`` loads time out, as a NATS request does while its stream has no
    leader; ``loads`` counts every load."""

    class Flaky(ManifestStore):
        loads = 0

        async def load(self, name: str) -> list[ManifestEntry]:
            Flaky.loads += 1
            if Flaky.loads <= failures:
                raise nats.errors.TimeoutError
            return await super().load(name)

    return Flaky


async def _flaky_handlers(bus: Bus, manifests: type[ManifestStore]) -> tuple[SchedulerHandlers, list[float],
                                                                              DatasetRecord]:
    """Scheduler handlers on the seeded dataset, loading manifests from ``manifests``, with a clock of their own;
    and the dataset's record, as the ``shoal_datasets`` watch hands it in."""
    await seed(bus, {})
    clock = [1000.0]
    handlers = SchedulerHandlers(bus, KvMirror(await bus.kv(subjects.KV_AGENTS), AgentRecord),
                                 clock=lambda: clock[0], manifests=manifests.of)
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), "ml.imagenet", DatasetRecord)
    assert record is not None
    return handlers, clock, record


async def test_a_manifest_that_failed_to_load_is_loaded_by_the_retry(bus: Bus) -> None:
    """Before: the dataset's info was kept although its manifest failed to load, and every later record with the
    same manifest returned early: no catalog, for good. Now the load is tried again when due."""
    flaky = _flaky(failures=1)
    handlers, clock, record = await _flaky_handlers(bus, flaky)
    key = ("ml", "imagenet")
    await handlers.dataset_changed(key, record)
    assert key not in handlers.fold.catalogs and flaky.loads == 1  # type: ignore[attr-defined]
    await handlers.dataset_changed(key, record)  # the record rewritten, same manifest: the watch is not held up
    await handlers.retry_catalogs()  # not due yet
    assert key not in handlers.fold.catalogs and flaky.loads == 1  # type: ignore[attr-defined]
    clock[0] += 0.5  # the first retry's delay (libs.bus.retry_delay(1))
    await handlers.retry_catalogs()
    assert handlers.fold.catalogs[key].total == sum(FILES.values())
    clock[0] += 3600
    await handlers.retry_catalogs()
    assert flaky.loads == 2  # type: ignore[attr-defined]  # loaded: nothing is left to retry


async def test_a_manifest_given_up_on_is_loaded_at_the_records_next_change(bus: Bus) -> None:
    """After CATALOG_ATTEMPTS failed loads the retries stop; the next change of the record, even one that keeps the
    manifest, has it tried again."""
    flaky = _flaky(failures=CATALOG_ATTEMPTS)
    handlers, clock, record = await _flaky_handlers(bus, flaky)
    key = ("ml", "imagenet")
    await handlers.dataset_changed(key, record)
    for _ in range(CATALOG_ATTEMPTS - 1):
        clock[0] += 60  # past any retry's delay
        await handlers.retry_catalogs()
    assert flaky.loads == CATALOG_ATTEMPTS and key not in handlers.fold.catalogs  # type: ignore[attr-defined]
    clock[0] += 3600
    await handlers.retry_catalogs()
    assert flaky.loads == CATALOG_ATTEMPTS  # type: ignore[attr-defined]  # given up on
    status = msgspec.structs.replace(record.status, phase="Ready")  # same manifest, another status
    await handlers.dataset_changed(key, msgspec.structs.replace(record, status=status))
    await handlers.retry_catalogs()
    assert flaky.loads == CATALOG_ATTEMPTS + 1  # type: ignore[attr-defined]
    assert handlers.fold.catalogs[key].total == sum(FILES.values())
