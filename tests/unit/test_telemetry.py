"""Which exporter the OTEL_* variables ask for, the service name they give, trace ids in log lines, and the
traceparent kept in records. Pure: no global provider is installed (spans come from a local provider)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import subjects
from libs.config import load_settings
from libs.telemetry import (
    TracingConfigError,
    add_trace_ids,
    context_of,
    current_traceparent,
    get_logger,
    producer_span,
    server_attributes,
    tracing_exporter,
    tracing_resource,
)
from tests.helpers import json_lines, json_logs

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
LIFE = "4f9c2a7e1b3d5c6a"  # a dataset's incarnation


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "none"),  # off when unset: no collector is assumed
    (ENDPOINT, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),  # the SDK's default endpoint, localhost:4318
    ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, "none"),
    ({**ENDPOINT, "OTEL_TRACES_EXPORTER": " OTLP "}, "otlp"),
    ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, "none"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "otlp"),
])
def test_the_exporter_the_environment_asks_for(environ: dict[str, str], expected: str) -> None:
    assert tracing_exporter(environ) == expected


@pytest.mark.parametrize(("environ", "message"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: zipkin is not available here (use otlp or none)"),
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER: console is not available here"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL: grpc is not available here (use http/protobuf)"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
])
def test_an_exporter_not_shipped_is_a_clear_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError, match=re.escape(message)):
        tracing_exporter(environ)


def test_service_name_is_the_process_own_unless_the_environment_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    resource = tracing_resource("shoal-dataset")
    assert resource.attributes["service.name"] == "shoal-dataset"
    assert resource.attributes["deployment.environment"] == "staging"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "dataset-eu")
    assert tracing_resource("shoal-dataset").attributes["service.name"] == "dataset-eu"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert tracing_resource("shoal-dataset").attributes["service.name"] == "from-attributes"


def test_log_lines_get_the_ids_of_the_current_span_only() -> None:
    event: dict[str, Any] = {"event": "outside"}
    assert add_trace_ids(None, "info", event) == {"event": "outside"}
    with TracerProvider().get_tracer("test").start_as_current_span("work") as span:
        context = span.get_span_context()
        inside = add_trace_ids(None, "info", {"event": "inside"})
    assert inside == {"event": "inside", "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def test_a_stored_traceparent_continues_its_trace() -> None:
    assert current_traceparent() == ""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("command") as command:
        stored = current_traceparent()
    sync = tracer.start_span("sync", context=context_of(stored))
    assert isinstance(sync, ReadableSpan) and sync.parent is not None
    assert sync.parent.span_id == command.get_span_context().span_id
    assert sync.get_span_context().trace_id == command.get_span_context().trace_id
    fresh = tracer.start_span("fresh", context=context_of(""))
    assert isinstance(fresh, ReadableSpan) and fresh.parent is None


def test_a_publish_span_is_named_by_the_subjects_family_not_its_node_or_dataset() -> None:
    """``publish shoal.task.node.<node>.<ns>.<name>`` and ``publish shoal.task.progress.<node>`` were one operation
    name per node and dataset in a tracing backend; the subject itself belongs in ``messaging.destination.name``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    published = [subjects.node_task("ip-10-0-1-23.ec2.internal", "default", "demo", LIFE),
                 subjects.node_task("node-b", "ml", "images", LIFE), subjects.task_progress("node-b"),
                 subjects.agent_inventory("node-b"), subjects.agent_heartbeat("node-b"),
                 subjects.dead_letter(subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS),
                 subjects.DATASET_STATUS]
    with tracer.start_as_current_span("work"):
        for subject in published:
            with producer_span(tracer, subject):
                pass
    spans = [span for span in exporter.get_finished_spans() if span.kind == trace.SpanKind.PRODUCER]
    assert [(span.name, dict(span.attributes or {})) for span in spans] == [
        (f"publish {name}", {"messaging.system": "nats", "messaging.destination.name": subject})
        for name, subject in zip(["shoal.task.node", "shoal.task.node", "shoal.task.progress", "shoal.agent.inventory",
                                  "shoal.agent.heartbeat", "shoal.dlq", subjects.DATASET_STATUS], published,
                                 strict=True)]


@pytest.mark.parametrize(("url", "expected"), [
    ("http://10.0.1.23:40001", {"server.address": "10.0.1.23", "server.port": 40001}),
    ("http://[fd00::17]:40001/", {"server.address": "fd00::17", "server.port": 40001}),
    ("https://user:pl4nted@peer.example/block?sig=pl4nted", {"server.address": "peer.example", "server.port": 443}),
    ("http://node-b", {"server.address": "node-b", "server.port": 80}),
])
def test_a_client_span_names_the_host_and_port_apart_and_nothing_else_of_the_url(
        url: str, expected: dict[str, object]) -> None:
    assert server_attributes(url) == expected


def test_a_process_refuses_to_start_on_an_exporter_it_does_not_ship(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from libs import service

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    monkeypatch.setattr(service, "setup_logging", lambda *args: None)  # leave this process's logging alone

    async def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("started despite the bad variable")

    with pytest.raises(SystemExit) as exited:
        service.main("shoal-test", never)
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "shoal-test: OTEL_TRACES_EXPORTER: jaeger is not available here (use otlp or none)\n")


def test_no_log_line_carries_a_urls_password_whoever_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # NATS_URL may be nats://user:password@host (nats-py takes it); a library may quote it in an error.
    with json_logs(monkeypatch) as buffer:
        get_logger("tests.telemetry").info("starting", nats=["nats://shoal:pl4nted-s3cret@127.0.0.1:4222"])
        logging.getLogger("nats.aio.client").error("cannot connect to nats://shoal:pl4nted-s3cret@127.0.0.1:4222")
    lines = json_lines(buffer.getvalue())
    assert len(lines) == 2
    assert "pl4nted-s3cret" not in buffer.getvalue()
    assert lines[0]["nats"] == ["nats://***@127.0.0.1:4222"]
    assert "nats://***@127.0.0.1:4222" in lines[1]["event"]


def test_console_lines_show_control_characters_of_values_escaped_never_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the console format is used, and it wrote string values as they were: an object key holding an
    escape sequence recoloured or retitled the terminal, and one holding a line break forged a log line. Values
    with such characters are shown as their Python literal, the message escaped; a traceback keeps its line breaks
    (an exception's message too: the known limit), not the rest."""
    key = "evil\x1b]0;pwned\x07\n2026-12-07T00:00:00Z [error    ] forged\x0bline\u202e.bin"
    with json_logs(monkeypatch, fmt="console") as buffer:
        log = get_logger("tests.telemetry")
        log.warning("read failed", key=key, keys=[key], plain="data/a.bin", count=3)
        log.info(f"object {key}")
        logging.getLogger("nats.aio.client").error("cannot read %s", key)  # a library's line, through logging
        try:
            raise ValueError(f"no object\n{key.replace(chr(10), ' ')}")
        except ValueError:
            log.exception("load failed")
    # The renderer's own colours are the only escape sequences left.
    out = re.sub("\x1b\\[[0-9;]*m", "", buffer.getvalue())
    for raw in ("\x1b", "\x07", "\x0b", "\u202e"):
        assert raw not in out
    lines = out.splitlines()
    # One line per call, and the traceback's own lines: nothing a key added.
    assert not [line for line in lines if line.startswith("2026-12-07T00:00:00Z")]
    assert f"key={key!r}" in out and f"keys={[key]!r}" in out and "plain=data/a.bin" in out and "count=3" in out
    escaped = key.encode("unicode_escape").decode()
    assert f"object {escaped}" in out and f"cannot read {escaped}" in out
    assert "Traceback (most recent call last):" in lines
    assert "ValueError: no object" in lines  # its own line break kept, its escape sequence not


def test_a_services_starting_line_hides_the_password_of_a_nats_url_without_a_scheme(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # nats-py reads user:password@host:4222 as nats://...: libs.service logged the URL whole, password and all.
    settings = load_settings({"NATS_URL": "shoal:pl4nted-s3cret@127.0.0.1:4222"})
    with json_logs(monkeypatch) as buffer:
        get_logger("tests.telemetry").info("starting", nats=settings.nats.urls)  # as libs.service writes it
    assert "pl4nted-s3cret" not in buffer.getvalue()
    assert json_lines(buffer.getvalue())[0]["nats"] == ["nats://***@127.0.0.1:4222"]


async def test_requests_that_are_not_http_are_one_warning_per_interval_without_traceback_or_quote(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real aiohttp server sent header lines over 8 KiB: aiohttp logged each at error level with a traceback and
    a quote of the client's bytes (anyone reaching a port could flood the log, and the quote may hold a header).
    Now: one warning per interval, counting the rest, neither traceback nor quote; each client still gets its 400."""
    import asyncio

    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    answers = []
    try:
        with json_logs(monkeypatch) as buffer:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Planted: " + b"q" * 10_000 + b"\r\n\r\n")
                await writer.drain()
                answers.append(await reader.read(64))
                writer.close()
    finally:
        await runner.cleanup()
    assert all(answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400") for answer in answers)
    lines = [line for line in json_lines(buffer.getvalue()) if line.get("logger") == "aiohttp.server"]
    assert len(lines) == 1, lines
    assert lines[0]["level"] == "warning" and "LineTooLong" in lines[0]["event"] and "exception" not in lines[0]
    assert "qqqq" not in buffer.getvalue() and "Traceback" not in buffer.getvalue()


def test_the_client_error_filter_counts_what_it_leaves_out() -> None:
    from libs.telemetry import ClientHttpErrors

    class LineTooLong(Exception):
        code = 400

    LineTooLong.__module__ = "aiohttp.http_exceptions"
    now = [0.0]
    kept = ClientHttpErrors(interval=10.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request", (),
                                 (LineTooLong, LineTooLong(), None))

    assert kept.filter(record()) and not kept.filter(record()) and not kept.filter(record())
    now[0] = 10.0
    line = record()
    assert kept.filter(line) and line.getMessage().endswith("2 more since the last such line)")
    other = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "a handler's bug", (), None)
    assert kept.filter(other) and other.levelno == logging.ERROR  # not a client's bad request: left alone


def test_failed_nats_connections_are_one_line_per_interval_without_a_traceback() -> None:
    """A service waiting for NATS: nats-py logs each failed try (twice a second) with its traceback. One warning per
    interval says what failed and how many were left out; nats-py's other errors are left alone."""
    from libs.telemetry import NatsConnectErrors

    now = [0.0]
    kept = NatsConnectErrors(interval=30.0, clock=lambda: now[0])

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("nats.aio.client", logging.ERROR, "", 0, "nats: encountered error", (),
                                 (type(error), error, None))

    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)")
    first = record(refused)
    assert kept.filter(first) and first.levelno == logging.WARNING and first.exc_info is None
    assert "ConnectionRefusedError" in first.getMessage() and "127.0.0.1" in first.getMessage()
    assert not kept.filter(record(refused)) and not kept.filter(record(TimeoutError()))
    now[0] = 30.0
    later = record(refused)
    assert kept.filter(later) and later.getMessage().endswith("2 more since the last such line)")
    other = record(ValueError("a protocol error"))
    assert kept.filter(other) and other.levelno == logging.ERROR and other.exc_info is not None


def test_a_server_offering_no_tls_is_summarised_with_that_reason() -> None:
    from libs.natserrors import TlsNotOffered
    from libs.telemetry import NatsConnectErrors

    kept = NatsConnectErrors(interval=30.0, clock=lambda: 0.0)
    error = TlsNotOffered("127.0.0.1:4222 offers no TLS, and a CA was given: nothing was sent to it")
    first = logging.LogRecord("nats.aio.client", logging.ERROR, "", 0, "nats: encountered error", (),
                              (TlsNotOffered, error, None))
    assert kept.filter(first) and first.levelno == logging.WARNING and first.exc_info is None
    assert "does not offer TLS" in first.getMessage() and "127.0.0.1:4222" in first.getMessage()
