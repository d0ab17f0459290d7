"""A DataLoad's trace goes on in the mount process that executes its part (``services.agent.tasks``), on a real
nats-server: the part's ``traceparent`` header (the loader's PRODUCER span) is continued by a CONSUMER span for the
part, under which the part's store GETs and its progress publishes are made, so the loader's handling of that
progress joins the same trace. Before, the part was executed outside any trace: the chain broke at the agent, and
each progress started a trace of its own in the loader.

And a DataLoad applied by another system with a ``traceparent`` before its dataset is Bound: the run the loader's
tick starts later (no message to take a trace from) publishes its parts in the apply's trace, kept in the record.
Before, the parts went out with no trace at all, and the chain from the caller broke at the loader. The same for
a ``dataload.run.v1`` whose run waits: its parts go out in the request's trace, not the last apply's.

The runner is the mount process's own class, in-process, over a local-folder store; spans go to memory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace

from libs import subjects
from libs.bus import Bus
from libs.events.agent import CachedFile
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import ManifestEntry
from libs.events.operation import (
    DataLoadApply,
    DataLoadRun,
    DataLoadSpec,
    DatasetRef,
    NodeTask,
    OperationRecord,
    OperationStatus,
    TaskProgress,
)
from libs.ufs import LocalLocation, LocalObjectStore
from services.agent.cache import BlockCache, DiskTier
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate
from services.agent.tasks import TaskRunner
from tests.conftest import NatsServer
from tests.helpers import eventually, spans_in_memory
from tests.integration.test_loader import (
    NODES,
    agent,
    dataload,
    files,
    loader,
    operation,
    phase_of,
    put_dataset,
    put_runtime,
)

NODE = "trace-node"
DATASET = ObjectRef(name="traced", namespace="default")
BLOCK = 1024


async def test_a_part_continues_the_loaders_trace_and_its_progress_stays_in_it(bus: Bus, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a").write_bytes(b"a" * 3 * BLOCK)
    store = LocalObjectStore(LocalLocation(root=tmp_path / "store"))
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * BLOCK)])
    cache.load()
    reader = BlockReader(cache, [StoreGate(store)], BLOCK, MemoryBudget(16 * BLOCK), write_block=cache.put_async)
    entry = ManifestEntry(path="/a", mount=0, key="a", size=3 * BLOCK, etag=(await store.head("a")).etag, mtime=0.0)
    key = subjects.operation_key("DataLoad", DATASET.namespace, "warm")
    await (await bus.kv(subjects.KV_OPERATIONS)).put(key, msgspec.json.encode(OperationRecord(
        kind="DataLoad", metadata=ObjectMeta(name="warm"), load=DataLoadSpec(dataset=DatasetRef(name=DATASET.name)),
        status=OperationStatus(phase="Executing", runs=1))))
    await bus.provision_node_tasks(NODE)
    run = f"{key}.1"
    part = NodeTask(id=f"{run}.0", run=run, part=0, parts=1, node=NODE, dataset=DATASET, action="load",
                    blocks=[CachedFile(0, "a", entry.etag, [(i, BLOCK) for i in range(3)])])
    progress_subject = subjects.task_progress(NODE)
    reports: list[TaskProgress] = []

    async def on_progress(message: Msg) -> None:
        reports.append(msgspec.json.decode(message.data, type=TaskProgress))

    subscription = await bus.nc.subscribe(progress_subject, cb=on_progress)
    with spans_in_memory() as exporter:
        runner = TaskRunner(bus, NODE, DATASET, cache, reader, lambda: {(0, "a"): entry}, concurrency=2)
        running = asyncio.ensure_future(runner.run())
        try:
            with trace.get_tracer(__name__).start_as_current_span("loader run") as root:
                await bus.publish(runner.subject, part)
            trace_id = root.get_span_context().trace_id

            async def done() -> bool:
                return any(report.done for report in reports)

            await eventually(done, 20, "the part's final progress")
        finally:
            runner.stop()
            await asyncio.wait_for(running, 20)
            await subscription.unsubscribe()
        spans = exporter.get_finished_spans()
    seen = [(span.name, span.context.trace_id == trace_id) for span in spans]
    # One span name for every node and dataset's parts and progress; the subject says which.
    produced = [span for span in spans if span.name == f"publish {subjects.TASK_PREFIX}"]
    assert len(produced) == 1, seen
    assert produced[0].attributes is not None
    assert produced[0].attributes["messaging.destination.name"] == runner.subject
    consumed = [span for span in spans if span.name == f"process {subjects.TASK_PREFIX}"]
    assert len(consumed) == 1, seen
    consumer = consumed[0]
    assert consumer.kind == trace.SpanKind.CONSUMER
    assert consumer.context.trace_id == trace_id and consumer.parent is not None, seen
    assert consumer.parent.span_id == produced[0].context.span_id
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.destination.name"] == runner.subject
    # What the part did happened inside it: its store GETs and every progress it published.
    inside = [span for span in spans if span.parent is not None and span.parent.span_id == consumer.context.span_id]
    assert {span.name for span in inside} >= {"store GET", f"publish {subjects.TASK_PROGRESS_PREFIX}"}, seen
    assert [report.failed for report in reports if report.done] == [0], reports
    progress = [span for span in spans if span.name == f"publish {subjects.TASK_PROGRESS_PREFIX}"]
    assert progress and all(span.context.trace_id == trace_id for span in progress), seen
    assert {span.attributes["messaging.destination.name"] for span in progress if span.attributes} == {
        progress_subject}


async def test_a_load_that_waits_for_its_dataset_runs_in_the_trace_of_its_outside_apply(
        bus: Bus, nats_server: NatsServer) -> None:
    trace_id, caller_span = 0x5EED0000000000000000000000000001, 0x42
    parts: list[dict[str, str]] = []

    async def on_part(message: Msg) -> None:
        parts.append(dict(message.headers or {}))

    subscription = await bus.nc.subscribe(f"{subjects.TASK_PREFIX}.>", cb=on_part)
    with spans_in_memory():
        async with loader(nats_server), agent(bus, NODES):
            command = dataload()
            # As another system publishes it: plain JSON, its own trace in the headers.
            await bus.nc.jetstream().publish(subjects.DATALOAD_APPLY, msgspec.json.encode(command), headers={
                "Nats-Msg-Id": command.id, "traceparent": f"00-{trace_id:032x}-{caller_span:016x}-01"})

            async def waiting() -> bool:
                found = await operation(bus)
                return found is not None and found.status.waiting_for.startswith("dataset default/data")

            await eventually(waiting, what="the load waiting for its dataset")
            await put_dataset(bus, files(("a", BLOCK)))
            await put_runtime(bus, NODES)
            await phase_of(bus, "Complete")
    await subscription.unsubscribe()
    assert parts, "no part published"
    assert [headers.get("traceparent", "").split("-")[1:2] for headers in parts] == [[f"{trace_id:032x}"]] * len(
        parts), parts


async def test_a_run_request_that_waits_for_its_dataset_runs_in_the_trace_of_the_request(
        bus: Bus, nats_server: NatsServer) -> None:
    """A Cron DataLoad applied in one trace, then asked to run now (``dataload.run.v1``) in another before its
    dataset is Bound: the run waits, and the tick that starts it later continued the record's trace, the apply's,
    so the parts went out in a trace the request was no part of. Now the request's trace is the record's."""
    apply_trace, run_trace = 0x5EED0000000000000000000000000002, 0x5EED0000000000000000000000000003
    parts: list[dict[str, str]] = []

    async def on_part(message: Msg) -> None:
        parts.append(dict(message.headers or {}))

    async def publish_in(subject: str, command: DataLoadApply | DataLoadRun, trace_id: int) -> None:
        await bus.nc.jetstream().publish(subject, msgspec.json.encode(command), headers={
            "Nats-Msg-Id": command.id, "traceparent": f"00-{trace_id:032x}-{0x42:016x}-01"})

    subscription = await bus.nc.subscribe(f"{subjects.TASK_PREFIX}.>", cb=on_part)
    with spans_in_memory():
        async with loader(nats_server), agent(bus, NODES):
            await publish_in(subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 0 1 1 *"), apply_trace)
            await phase_of(bus, "Pending")
            await publish_in(subjects.DATALOAD_RUN, DataLoadRun(name="warm"), run_trace)

            async def waiting() -> bool:
                found = await operation(bus)
                return found is not None and found.status.waiting_for.startswith("dataset default/data")

            await eventually(waiting, what="the requested run waiting for its dataset")
            await put_dataset(bus, files(("a", BLOCK)))
            await put_runtime(bus, NODES)
            await phase_of(bus, "Complete", runs=1)
    await subscription.unsubscribe()
    assert parts, "no part published"
    assert [headers.get("traceparent", "").split("-")[1:2] for headers in parts] == [[f"{run_trace:032x}"]] * len(
        parts), parts
