"""Trace context travels in NATS message headers: a consumer's span continues the publisher's trace.
Real nats-server; an in-memory span exporter (global providers are restored afterwards).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import subjects
from libs.bus import Bus, Consumer, Delivery
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply
from tests.helpers import eventually, running


async def test_consumer_span_continues_the_publisher_trace(bus: Bus) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    seen: list[tuple[str, dict[str, str]]] = []

    async def handler(event: DatasetApply, delivery: Delivery) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((format(context.trace_id, "032x"), delivery.headers))

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "traced", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), handler, max_event_bytes=4096)

    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(consumer.run())
        await stop.wait()
        consumer.stop()
        await task

    # The bus module resolves its tracer through the global provider; use ours for the test only.
    original = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        async with running(run):
            with tracer.start_as_current_span("publish apply") as span:
                publisher_trace = format(span.get_span_context().trace_id, "032x")
                await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="t"))))
            await eventually(lambda: _ready(seen))
    finally:
        trace._TRACER_PROVIDER = original
    consumer_trace, headers = seen[0]
    assert headers["traceparent"].split("-")[1] == publisher_trace
    assert consumer_trace == publisher_trace
    names = [s.name for s in exporter.get_finished_spans()]
    assert "process traced" in names and "publish apply" in names


async def _ready(seen: Sequence[object]) -> bool:
    return bool(seen)
