"""Fuzzing every consumer's decoder and handler: generated events (from the JSON Schemas) and mutated ones, through
the services' own ``Consumer`` wiring on a real nats-server (``tests.fuzz.harness``).

For every payload: no crash (the handler raises only the retry vocabulary), a terminated message leaves a dead letter
with a reason, an undecodable command also gets a rejection fact, and a decoded command gets exactly one answer
(accepted, rejected with a reason, or deleted). After the fuzz, a valid message is still handled. The last test
publishes fuzzed payloads through JetStream to the running services and shows no consumer gets stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord, AnyInventory, CacheCounters, InventoryRequest
from libs.events.common import DECODE_ERRORS, ObjectMeta, ObjectRef
from libs.events.dataset import (
    Dataset,
    DatasetAccepted,
    DatasetApply,
    DatasetCommand,
    DatasetDeleted,
    DatasetRecord,
    DatasetRejected,
    DatasetSpec,
    Mount,
)
from libs.events.operation import (
    NodeTask,
    OperationAccepted,
    OperationCommand,
    OperationDeleted,
    OperationRecord,
    OperationRejected,
    OperationStatus,
    TaskProgress,
)
from libs.events.runtime import (
    RuntimeAccepted,
    RuntimeCommand,
    RuntimeDeleted,
    RuntimeFact,
    RuntimeRecord,
    RuntimeRejected,
)
from libs.events.schedule import DatasetCacheObserved, ScoreReply
from services.dataset.handlers import DatasetHandlers
from services.loader.domain import RunState
from services.loader.handlers import LoaderHandlers
from services.runtime.handlers import RuntimeHandlers
from services.scheduler.handlers import DatasetInfo, SchedulerHandlers
from tests.fuzz.harness import Drive, FakeMessage, consumer, spy
from tests.fuzz.strategies import EXAMPLES, FUZZ, MARKS, events, payloads
from tests.helpers import eventually, make_settings, unwatched_mirror

pytestmark = MARKS

# Datasets the generated inventory and tasks are steered to (besides random ones), so they reach the folds.
KNOWN = [ObjectRef(name="ds"), ObjectRef(name="demo", namespace="team-a")]


def _steer(document: Any, ref: ObjectRef | None) -> Any:
    """Point a generated event at a known dataset (when ``ref``), so it gets past the first lookup."""
    if ref is None or not isinstance(document, dict):
        return document
    return {**document, "dataset": {"name": ref.name, "namespace": ref.namespace}}


def steered(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(valid, st.sampled_from([None, *KNOWN])).map(lambda pair: _steer(*pair))


def _decodes(data: bytes, decoder: msgspec.json.Decoder[Any]) -> bool:
    """Whether the consumer decodes ``data`` into a command."""
    try:
        decoder.decode(data)
    except DECODE_ERRORS:
        return False
    return True


def _answered(outcome: Any, answers: tuple[type, ...], rejected: type) -> None:
    """A decoded command got one answer (a rejection with a reason); an undecodable one a rejection fact."""
    if outcome.ack != "ack":
        return  # retried (RetryLater) or dead-lettered with its reason (checked by the harness)
    facts: list[Any] = outcome.of(tuple(answers))
    if len(facts) > 1:
        # An operation re-applied after it finished, whose ttlSecondsAfterFinished has passed, is accepted and then
        # removed by that rule in the same handling: that deletion (caused by no command) is no second answer.
        facts = [fact for fact in facts if not (isinstance(fact, OperationDeleted) and not fact.causation_id)]
    assert len(facts) == 1, f"a command answered {facts}"
    if isinstance(facts[0], rejected):
        assert getattr(facts[0], "reason", "")


async def _command_answered(drive: Any, subject: str, data: bytes, limit: int, decoder: Any,
                            answers: tuple[type, ...], rejected: type) -> None:
    """Send a fuzzed command: one that decodes within ``limit`` bytes gets one answer, any other a rejection."""
    decoded = len(data) <= limit and _decodes(data, decoder)
    outcome = await drive.send(subject, data, message_id="fuzz")
    if decoded:
        _answered(outcome, answers, rejected)
    else:
        _rejected_with_reason(outcome, rejected)


def _rejected_with_reason(outcome: Any, rejected: type) -> None:
    facts = outcome.of(rejected)
    assert facts and all(fact.reason for fact in facts), "an undecodable command must get a rejection with a reason"


@pytest.fixture
def fuzz_settings(nats_server: Any, tmp_path: Path) -> Settings:
    return make_settings(nats_server.url, max_event_bytes=64 * 1024, local_roots=[str(tmp_path)])


# --- dataset service ---

DATASET_COMMANDS = events("dataset.apply.v1", "dataset.delete.v1", "dataset.resync.v1")
_DATASET_DECODER = msgspec.json.Decoder(DatasetCommand)


@pytest.fixture
async def dataset_handlers(bus: Bus, fuzz_settings: Settings) -> AsyncIterator[tuple[Bus, DatasetHandlers, Any]]:
    published = spy(bus)
    yield bus, DatasetHandlers(bus, fuzz_settings), published


# Regression: JSON nested past the recursion limit escaped the consumer loop (RecursionError) and ended it.
DEEP = b"[" * 5000 + b"]" * 5000


@FUZZ
@example(data=DEEP, subject=subjects.DATASET_APPLY)
@example(data=b'{"type": "dataset.apply.v1", "dataset": {"metadata": {"name": "\xed\xa0\x80"}}}',
         subject=subjects.DATASET_APPLY)
@given(data=payloads(DATASET_COMMANDS), subject=st.sampled_from([subjects.DATASET_APPLY, subjects.DATASET_DELETE,
                                                                 subjects.DATASET_RESYNC]))
async def test_dataset_commands(dataset_handlers: Any, data: bytes, subject: str) -> None:
    bus, handlers, published = dataset_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS,
                                           subjects.DATASET_COMMANDS, _DATASET_DECODER, handlers.on_command,
                                           handlers.on_invalid_command, max_event_bytes=64 * 1024))
    await _command_answered(drive, subject, data, 64 * 1024, _DATASET_DECODER,
                            (DatasetAccepted, DatasetRejected, DatasetDeleted), DatasetRejected)


@FUZZ
# Regression: a fact naming no valid dataset was a KV InvalidKeyError, retried as a handler failure.
@example(data=b'{"type": "runtime.deleted.v1", "name": ">", "namespace": "a b"}')
@given(data=payloads(events("runtime.status.v1", "runtime.deleted.v1", "runtime.accepted.v1",
                            "runtime.rejected.v1")))
async def test_dataset_runtime_facts(dataset_handlers: Any, data: bytes) -> None:
    bus, handlers, published = dataset_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_FACTS, subjects.DURABLE_DATASET_RUNTIME_STATUS,
                                           subjects.RUNTIME_FACTS, msgspec.json.Decoder(RuntimeFact),
                                           handlers.on_runtime_fact))
    await drive.send(subjects.RUNTIME_STATUS, data)


INVENTORY = steered(events("agent.inventory.snapshot.v2", "agent.inventory.delta.v2", "agent.inventory.snapshot.v1",
                           "agent.inventory.delta.v1"))


@FUZZ
@given(data=payloads(INVENTORY))
async def test_dataset_inventory(dataset_handlers: Any, data: bytes) -> None:
    bus, handlers, published = dataset_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_AGENT, subjects.DURABLE_DATASET_INVENTORY,
                                           subjects.AGENT_INVENTORY, msgspec.json.Decoder(AnyInventory),
                                           handlers.on_inventory))
    await drive.send(subjects.agent_inventory("n1"), data)


@FUZZ
@example(data=b'{"type": "scheduler.dataset.cache.v1", "name": ">", "namespace": "a b", "uniqueCachedBytes": 1}')
@given(data=payloads(events("scheduler.dataset.cache.v1")))
async def test_dataset_scheduler_cache(dataset_handlers: Any, data: bytes) -> None:
    bus, handlers, published = dataset_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_FACTS, subjects.DURABLE_DATASET_SCHEDULER_CACHE,
                                           subjects.SCHEDULER_DATASET_CACHE, msgspec.json.Decoder(DatasetCacheObserved),
                                           handlers.on_scheduler_cache))
    await drive.send(subjects.SCHEDULER_DATASET_CACHE, data)


# --- runtime service ---

_RUNTIME_DECODER = msgspec.json.Decoder(RuntimeCommand)


@pytest.fixture
async def runtime_handlers(bus: Bus) -> AsyncIterator[tuple[Bus, RuntimeHandlers, Any]]:
    published = spy(bus)
    handlers = RuntimeHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))
    yield bus, handlers, published


@FUZZ
@given(data=payloads(events("runtime.apply.v1", "runtime.delete.v1", "runtime.scale.v1")),
       subject=st.sampled_from([subjects.RUNTIME_APPLY, subjects.RUNTIME_DELETE, subjects.RUNTIME_SCALE]))
async def test_runtime_commands(runtime_handlers: Any, data: bytes, subject: str) -> None:
    bus, handlers, published = runtime_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS,
                                           subjects.RUNTIME_COMMANDS, _RUNTIME_DECODER, handlers.on_command,
                                           handlers.on_invalid_command))
    await _command_answered(drive, subject, data, 256 * 1024, _RUNTIME_DECODER,
                            (RuntimeAccepted, RuntimeRejected, RuntimeDeleted), RuntimeRejected)


@FUZZ
@given(data=payloads(events("agent.heartbeat.v1")))
async def test_runtime_heartbeats(runtime_handlers: Any, data: bytes) -> None:
    bus, handlers, published = runtime_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS,
                                           subjects.AGENT_HEARTBEATS, msgspec.json.Decoder(AgentHeartbeat),
                                           handlers.on_heartbeat))
    await drive.send(subjects.agent_heartbeat("n1"), data)


# --- loader ---

_OPERATION_DECODER = msgspec.json.Decoder(OperationCommand)
OPERATION_SUBJECTS = [subjects.DATALOAD_APPLY, subjects.DATALOAD_DELETE, subjects.DATALOAD_RUN,
                      subjects.DATACLEAN_APPLY, subjects.DATACLEAN_DELETE]


@pytest.fixture
async def loader_handlers(bus: Bus) -> AsyncIterator[tuple[Bus, LoaderHandlers, Any]]:
    published = spy(bus)
    handlers = LoaderHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_OPERATION_RUNS), RunState),
                              unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))
    yield bus, handlers, published


@FUZZ
@given(data=payloads(events("dataload.apply.v1", "dataload.delete.v1", "dataload.run.v1", "dataclean.apply.v1",
                            "dataclean.delete.v1")),
       subject=st.sampled_from(OPERATION_SUBJECTS))
async def test_loader_commands(loader_handlers: Any, data: bytes, subject: str) -> None:
    bus, handlers, published = loader_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS,
                                           list(subjects.OPERATION_COMMANDS), _OPERATION_DECODER, handlers.on_command,
                                           handlers.on_invalid_command))
    await _command_answered(drive, subject, data, 256 * 1024, _OPERATION_DECODER,
                            (OperationAccepted, OperationRejected, OperationDeleted), OperationRejected)


@FUZZ
# Regression: a run id that names no valid KV key was retried five times as a handler failure.
@example(data=b'{"type": "agent.task.progress.v1", "run": "a b.1", "part": 0, "node": "n1"}')
@given(data=payloads(events(TaskProgress)))
async def test_loader_progress(loader_handlers: Any, data: bytes) -> None:
    bus, handlers, published = loader_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS,
                                           subjects.TASK_PROGRESS, msgspec.json.Decoder(TaskProgress),
                                           handlers.on_progress))
    await drive.send(subjects.task_progress("n1"), data)


# --- scheduler ---


@pytest.fixture
async def scheduler_handlers(bus: Bus) -> AsyncIterator[tuple[Bus, SchedulerHandlers, Any]]:
    published = spy(bus)
    handlers = SchedulerHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord))
    for ref in KNOWN:
        handlers.datasets[(ref.namespace, ref.name)] = DatasetInfo(total=1 << 30, manifest_version=("", 1, 0, ""))
    handlers.datasets_ready.set()
    yield bus, handlers, published


@FUZZ
@given(data=payloads(INVENTORY))
async def test_scheduler_inventory(scheduler_handlers: Any, data: bytes) -> None:
    bus, handlers, published = scheduler_handlers
    drive = Drive(bus, published, consumer(bus, subjects.STREAM_AGENT, "scheduler-inventory",
                                           subjects.AGENT_INVENTORY, msgspec.json.Decoder(AnyInventory),
                                           handlers.on_inventory))
    await drive.send(subjects.agent_inventory("n1"), data)


@FUZZ
@example(data=DEEP)
# Regressions: a string that is not UTF-8 escaped msgspec as UnicodeDecodeError; a limit past sys.maxsize was a
# ValueError in the scoring.
@example(data=b'{"type": "sched.score.v1", "datasets": [{"name": "da\xc3aset"}]}')
@example(data=b'{"type": "sched.score.v1", "limit": 9223372036854775807}')
@given(data=payloads(events("sched.score.v1")))
async def test_scheduler_score_requests(scheduler_handlers: Any, data: bytes) -> None:
    """The NATS request API: every request, however malformed, gets a ScoreReply (an error with a reason)."""
    _, handlers, _ = scheduler_handlers
    reply = msgspec.json.decode(handlers.answer_raw(data), type=ScoreReply)
    assert reply.error or (reply.error == "" and reply.causation_id is not None)


# --- agent: task parts and inventory requests ---

NODE = "n1"
TASK_DATASET = KNOWN[0]
RUN = "dataload.default.warm.1"


def _steer_task(document: Any, steer: bool) -> Any:
    """Address a generated part to the mount under test and to a current run, so it gets executed."""
    if not steer or not isinstance(document, dict):
        return document
    return {**document, "node": NODE, "dataset": {"name": TASK_DATASET.name, "namespace": TASK_DATASET.namespace},
            "run": RUN}


TASKS = st.tuples(events(NodeTask), st.booleans()).map(lambda pair: _steer_task(*pair))


@pytest.fixture
async def task_runner(bus: Bus, tmp_path: Path) -> AsyncIterator[Any]:
    from libs.events.dataset import ManifestEntry
    from libs.ufs import LocalLocation, LocalObjectStore
    from services.agent.cache import BlockCache, DiskTier
    from services.agent.readahead import MemoryBudget
    from services.agent.reader import BlockReader, StoreGate
    from services.agent.tasks import TaskRunner

    block = 1024
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a").write_bytes(b"a" * 3 * block)
    store = LocalObjectStore(LocalLocation(root=tmp_path / "store"))
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * block)])
    reader = BlockReader(cache, [StoreGate(store)], block, MemoryBudget(16 * block), write_block=cache.put_async)
    entry = ManifestEntry(path="/a", mount=0, key="a", size=3 * block, etag=(await store.head("a")).etag, mtime=0.0)
    await (await bus.kv(subjects.KV_OPERATIONS)).put(
        "dataload.default.warm", msgspec.json.encode(OperationRecord(
            kind="DataLoad", metadata=ObjectMeta(name="warm"), status=OperationStatus(phase="Executing", runs=1))))
    runner = TaskRunner(bus, NODE, TASK_DATASET, cache, reader, lambda: {(0, "a"): entry}, concurrency=2)
    published = spy(bus)
    yield runner, published


@FUZZ
@example(data=DEEP)
@given(data=payloads(TASKS))
async def test_agent_task_parts(task_runner: Any, data: bytes) -> None:
    """A part of any shape is executed, skipped or dropped, and always acknowledged once; one executed ends with a
    final progress."""
    runner, published = task_runner
    mark = len(published.events)
    message = FakeMessage(runner.subject, data, "")
    await runner._process(message)
    assert len(message.acks) == 1, message.acks
    finals = [event for _, event in published.events[mark:] if isinstance(event, TaskProgress) and event.done]
    assert len(finals) <= 1
    if finals and finals[0].failed:
        assert finals[0].message, "a failed block must say why"


@FUZZ
@given(data=payloads(events("agent.inventory.request.v1")))
async def test_agent_inventory_requests(bus: Bus, data: bytes) -> None:
    """Core NATS: every request decoded or skipped by ``Bus.subscribe``; the publisher then still answers one."""
    from services.agent.inventory import InventoryLog, InventoryPublisher

    publisher = InventoryPublisher(bus, InventoryLog(NODE, TASK_DATASET, "inc"), lambda: [], _no_counters)
    crashes: list[BaseException] = []
    handled = asyncio.Event()

    async def on_request(request: InventoryRequest) -> None:
        try:
            await publisher._on_request(request)
        except Exception as err:
            crashes.append(err)
        handled.set()

    from services.agent.inventory import _REQUEST_DECODER

    subscription = await bus.subscribe(subjects.INVENTORY_REQUEST, _REQUEST_DECODER, on_request)
    try:
        await bus.nc.publish(subjects.INVENTORY_REQUEST, data)
        await bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=NODE))
        await asyncio.wait_for(_until_wanted(publisher), 5)
    finally:
        await subscription.unsubscribe()
    if crashes:
        raise crashes[0]


async def _until_wanted(publisher: Any) -> None:
    await publisher._snapshot_wanted.wait()


def _no_counters() -> CacheCounters:
    return CacheCounters()


# --- through JetStream: no consumer stuck ---


@settings(FUZZ, max_examples=max(3, EXAMPLES // 100))
@given(batch=st.lists(payloads(DATASET_COMMANDS), min_size=5, max_size=25))
async def test_a_service_keeps_consuming_after_fuzz(dataset_service: Any, batch: list[bytes]) -> None:
    """Fuzzed commands published through JetStream to the running dataset service, then a valid one: it is
    accepted, and the durable has nothing pending or unacknowledged (nothing stuck, nothing redelivered forever)."""
    bus, facts = dataset_service
    for index, data in enumerate(batch):
        await bus.js.publish(subjects.DATASET_APPLY, data, headers={"Nats-Msg-Id": f"fz-{len(facts)}-{index}"})
    good = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="after"),
                                        spec=DatasetSpec(mounts=[Mount(mount_point="local:///tmp")])))
    await bus.publish(subjects.DATASET_APPLY, good)
    await eventually(lambda: _async(facts.get(good.id)), timeout=20, what="the valid command accepted")

    async def drained() -> bool:
        # The accepted fact goes out before its command is acknowledged (the handler returns first): waited for.
        info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(drained, timeout=10, what="nothing pending or unacknowledged on the durable")


async def _async(value: Any) -> Any:
    return value


@pytest.fixture
async def dataset_service(bus: Bus, nats_server: Any) -> AsyncIterator[tuple[Bus, dict[str, Any]]]:
    from services.dataset import app as dataset_app

    facts: dict[str, Any] = {}

    async def on_fact(message: Any) -> None:
        fact = msgspec.json.decode(message.data)
        if isinstance(fact, dict) and fact.get("causationId"):
            facts[fact["causationId"]] = fact

    subscription = await bus.nc.subscribe(subjects.DATASET_ACCEPTED, cb=on_fact)
    stop = asyncio.Event()
    settings = make_settings(nats_server.url, max_event_bytes=64 * 1024)
    task = asyncio.create_task(dataset_app.run(settings, stop))
    try:
        yield bus, facts
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        await asyncio.wait_for(task, 20)
