"""Traces: one connected trace from an outside publish of a command through the dataset service's handling, the
sync its KV watch starts, and the status fact; log lines carry the ids of the span they were written in.
Real nats-server and SeaweedFS; the real dataset service in-process, its spans in an in-memory exporter (the
global provider is restored afterwards). The mount process's read-miss trace (a subprocess, exported over OTLP) is
in ``test_tracing_mount.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from libs import subjects, telemetry
from libs.bus import Bus, Consumer, Delivery
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from services.dataset import app as dataset_app
from tests.conftest import SeaweedServer
from tests.helpers import eventually, json_lines, json_logs, running, spans_in_memory


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def ids_of(header: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = header.split("-")
    return int(trace_id, 16), int(span_id, 16)


class Facts:
    """Status facts of the dataset service as they are published: decoded payload and headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def start(self, bus: Bus) -> None:
        async def collect(msg: Msg) -> None:
            self.seen.append((msgspec.json.decode(msg.data), dict(msg.headers or {})))

        await bus.nc.subscribe(subjects.DATASET_STATUS, cb=collect)

    def synced(self, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        return next(((fact, headers) for fact, headers in self.seen
                     if fact["name"] == name and fact["status"]["syncedGeneration"] > 0), None)


def apply_payload(name: str, bucket: str) -> bytes:
    """A dataset.apply.v1 command as another system would write it (plain JSON)."""
    command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name),
                                           spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")])))
    return json.dumps(json.loads(msgspec.json.encode(command))).encode()


def assert_connected(spans: Sequence[ReadableSpan], root_parent: int | None) -> None:
    """Every span's parent is another span of the trace, or ``root_parent`` (the outside publisher's span)."""
    ids = {span.context.span_id for span in spans}
    for span in spans:
        parent = span.parent.span_id if span.parent else None
        assert parent in ids or parent == root_parent, f"{span.name} hangs off {parent} outside the trace"
    assert len({span.context.trace_id for span in spans}) == 1


def chain(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[str]:
    """Names from ``span`` up to the trace's first span."""
    by_id = {s.context.span_id: s for s in spans}
    names = [span.name]
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_one_trace_from_an_outside_publish_through_the_sync_to_the_status_fact(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    # An empty bucket: the sync lists nothing, and still ends in a status fact (syncedGeneration).
    facts = Facts()
    await facts.start(bus)
    outside_trace, outside_span = int.from_bytes(os.urandom(16)), int.from_bytes(os.urandom(8))
    with spans_in_memory() as exporter:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            # Straight on the connection, as a non-Shoal publisher would: one with a traceparent, one without.
            await bus.js.publish(subjects.DATASET_APPLY, apply_payload("traced", bucket),
                                 headers={"traceparent": traceparent(outside_trace, outside_span)})
            await bus.js.publish(subjects.DATASET_APPLY, apply_payload("untraced", bucket))
            traced = await eventually(lambda: _async(facts.synced("traced")), what="traced dataset synced")
            untraced = await eventually(lambda: _async(facts.synced("untraced")), what="untraced dataset synced")
        spans = exporter.get_finished_spans()

    # The status fact carries the outside publisher's trace, and its publish span is a child of the sync.
    fact_trace, fact_span = ids_of(traced[1]["traceparent"])
    assert fact_trace == outside_trace
    in_trace = [span for span in spans if span.context.trace_id == outside_trace]
    assert_connected(in_trace, root_parent=outside_span)
    publish = next(span for span in in_trace if span.context.span_id == fact_span)
    assert publish.kind == trace.SpanKind.PRODUCER
    assert publish.attributes == {"messaging.system": "nats", "messaging.destination.name": subjects.DATASET_STATUS}
    consumer = next(span for span in in_trace if span.kind == trace.SpanKind.CONSUMER)
    assert consumer.parent is not None and consumer.parent.span_id == outside_span
    assert consumer.attributes == {"messaging.system": "nats", "messaging.destination.name": subjects.DATASET_APPLY}
    assert chain(publish, in_trace) == [f"publish {subjects.DATASET_STATUS}", "sync dataset", consumer.name]
    # The dataset as the metrics' dataset label spells it, not as a KV key.
    [sync] = [span for span in in_trace if span.name == "sync dataset"]
    assert sync.attributes is not None and sync.attributes[telemetry.DATASET_ATTRIBUTE] == "default/traced"

    # A command without traceparent: the trace starts in the consumer and still reaches the status fact.
    untraced_trace, _ = ids_of(untraced[1]["traceparent"])
    assert untraced_trace != outside_trace
    others = [span for span in spans if span.context.trace_id == untraced_trace]
    assert_connected(others, root_parent=None)
    roots = [span for span in others if span.parent is None]
    assert [(root.name, root.kind) for root in roots] == [(consumer.name, trace.SpanKind.CONSUMER)]
    assert "sync dataset" in {span.name for span in others}


async def test_log_lines_carry_the_trace_of_the_handling_span(bus: Bus, settings: Settings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    handled: list[trace.SpanContext] = []

    async def handler(event: DatasetApply, delivery: Delivery) -> None:
        handled.append(trace.get_current_span().get_span_context())
        telemetry.get_logger("test").info("handled", dataset=event.dataset.metadata.name)

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "logged", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), handler, max_event_bytes=4096)
    outside_trace = int.from_bytes(os.urandom(16))
    with spans_in_memory(), json_logs(monkeypatch) as buffer:
        async with _consuming(consumer):
            await bus.js.publish(subjects.DATASET_APPLY, apply_payload("logged", "b"),
                                 headers={"traceparent": traceparent(outside_trace, 1)})
            await eventually(lambda: _async(handled), what="command handled")
        outside = telemetry.get_logger("test")
        outside.info("outside any span")
    [span] = handled
    lines = {line["event"]: line for line in json_lines(buffer.getvalue())}
    assert lines["handled"]["trace_id"] == f"{outside_trace:032x}" == format(span.trace_id, "032x")
    assert lines["handled"]["span_id"] == format(span.span_id, "016x")
    assert "trace_id" not in lines["outside any span"]


@asynccontextmanager
async def _consuming(consumer: Consumer[Any]) -> AsyncIterator[None]:
    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(consumer.run())
        await stop.wait()
        consumer.stop()
        await task

    async with running(run):
        yield


async def test_consumer_span_continues_the_publisher_trace(bus: Bus) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def handler(event: DatasetApply, delivery: Delivery) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((format(context.trace_id, "032x"), delivery.headers))

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "traced", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), handler, max_event_bytes=4096)
    with spans_in_memory() as exporter:
        tracer = trace.get_tracer("test")
        async with _consuming(consumer):
            with tracer.start_as_current_span("publish apply") as span:
                publisher_trace = format(span.get_span_context().trace_id, "032x")
                await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="t"))))
            await eventually(lambda: _async(seen))
        spans = exporter.get_finished_spans()
    consumer_trace, headers = seen[0]
    assert headers["traceparent"].split("-")[1] == publisher_trace
    assert consumer_trace == publisher_trace
    by_name = {s.name: s for s in spans}
    producer = by_name[f"publish {subjects.DATASET_APPLY}"]
    assert producer.kind == trace.SpanKind.PRODUCER
    assert headers["traceparent"].split("-")[2] == format(producer.context.span_id, "016x")
    assert by_name["process traced"].parent.span_id == producer.context.span_id  # type: ignore[union-attr]


async def test_publishing_outside_a_trace_makes_no_span_and_no_traceparent(bus: Bus) -> None:
    seen: list[dict[str, str]] = []

    async def collect(msg: Msg) -> None:
        seen.append(dict(msg.headers or {}))

    await bus.nc.subscribe(subjects.DATASET_APPLY, cb=collect)
    with spans_in_memory() as exporter:
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="t"))))
        await eventually(lambda: _async(seen))
    assert "traceparent" not in seen[0]
    assert exporter.get_finished_spans() == ()


async def _async(value: Any) -> Any:
    return value
