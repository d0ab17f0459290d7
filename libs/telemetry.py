"""Logging and tracing set-up shared by every process, and trace-context propagation through NATS headers.

Logs: structlog, JSON lines when stderr is not a terminal (collectors parse them), readable console output on
one, with the control characters of values escaped (``_terminal_safe``); a line written inside a span carries its
``trace_id`` and ``span_id`` (hex, as trace backends show them).
Traces: an OpenTelemetry TracerProvider in every process, so trace ids exist (and travel, and reach the logs) even
when nothing exports them; spans are exported over OTLP/HTTP only when the standard ``OTEL_*`` variables ask for it
(``tracing_exporter`` decides: off when unset), in batches, flushed by ``shutdown_tracing`` when the process ends.
``traceparent`` travels in message headers (``inject_context`` on publish, ``extract_context`` on receive) and in
records that start work later (``current_traceparent`` / ``context_of``), so one trace follows a command from
its publisher through every service.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from libs import subjects
from libs.natserrors import TlsNotOffered
from libs.redact import shown_text, strip_userinfo

if TYPE_CHECKING:
    # The SDK is imported by the functions that install or stop a provider (a service's shell calls them): the
    # CLI and libraries only propagate context, which the API does alone.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

# structlog imports rich (and pygments) whenever it is installed, only to pretty-print exceptions on a terminal:
# ~0.1 s of CPU at the start of every process, which writes JSON lines anyway. rich is installed for the CLI's
# tables, so it is hidden while structlog loads (unless something imported it already); structlog's console
# output then shows plain tracebacks, and ``import rich`` works as usual afterwards.
_hide_rich = "rich" not in sys.modules
if _hide_rich:
    sys.modules["rich"] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail
try:
    import structlog
finally:
    if _hide_rich:
        del sys.modules["rich"]

_configured_logging = False


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ``trace_id`` and ``span_id`` (hex), when a span is current."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def setup_logging(level: str = "info", fmt: str = "auto", file: TextIO | None = None) -> None:
    """``file``: where lines go (stderr by default; tests pass a buffer)."""
    global _configured_logging
    file = file or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and file.isatty())
    renderer: Any = _without_userinfo(_terminal_safe(structlog.dev.ConsoleRenderer()) if use_console
                                      else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=file),
        cache_logger_on_first_use=not _configured_logging,
    )
    _route_stdlib_logging(level, renderer, file)
    _configured_logging = True


def _without_userinfo(renderer: Any) -> Any:
    """``renderer`` whose lines never carry a URL's user name and password (``nats://user:pw@host`` as given in
    ``NATS_URL``, an S3 endpoint with keys in it, a library's error quoting either): hidden on the finished line, so
    no field, nesting or library message can slip past."""

    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        line = renderer(logger, method, event)
        return strip_userinfo(line) if isinstance(line, str) and "@" in line else line

    return render


# The console renderer's fields written apart from the ``key=value`` pairs: the message, and the traceback and stack
# (whose line breaks are theirs: they are shown as lines).
_MESSAGE, _MULTILINE = "event", ("exception", "stack")


def _terminal_safe(renderer: Any) -> Any:
    """``renderer`` (the console one) whose lines hold no character a terminal acts on, nor a line break of a
    value's: the console renderer writes a string value as it is (quoted only when it holds a space, quote or line
    break), so a value naming an object key with an escape sequence recoloured or retitled the terminal, and one with
    a line break (or a vertical tab, form feed, NEL) forged a line. A value holding a character that is not
    printable is shown as its Python literal, as ``repr`` escapes it (the form the renderer gives other values and
    ``libs.paths.quoted_key`` gives keys); the message gets the same escapes without quotes; a traceback keeps its
    line breaks and has the rest escaped. JSON lines need none of this: JSON escapes control characters."""

    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in event.items():
            if key == _MESSAGE and isinstance(value, str):
                event[key] = shown_text(value)
            elif key in _MULTILINE and isinstance(value, str):
                event[key] = shown_text(value, keep="\n")
            else:
                event[key] = _shown(value)
        return renderer(logger, method, event)

    return render


class _Literal:
    """A value the console renderer shows as ``text`` (it writes a value's ``repr``, or ``str`` in a column)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def _shown(value: Any) -> Any:
    """``value``, or a ``_Literal`` of its escaped form when the renderer would write a character that is not
    printable: a string as its ``repr`` (quoted and escaped), another value's ``repr`` with such characters escaped
    (a list's strings are already; an object's own ``__repr__`` may not escape them)."""
    if isinstance(value, str):
        return value if value.isprintable() else _Literal(repr(value))
    if isinstance(value, int | float | bool) or value is None:
        return value
    shown = repr(value)
    return value if shown.isprintable() else _Literal(shown_text(shown))


class _StructlogHandler(logging.StreamHandler):
    """Marks the handler ``setup_logging`` installs, so a second call replaces it instead of adding one."""


class _Summarised(logging.Filter):
    """Records of one kind, each a traceback repeated as often as its cause recurs, become one warning per
    ``interval`` (its words from ``summary``) saying how many were left out since the last; other records pass as
    they are."""

    def __init__(self, interval: float, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.left_out = 0
        self._next_at = float("-inf")

    def summary(self, record: logging.LogRecord, error: BaseException | None) -> tuple[str, tuple[Any, ...]] | None:
        """The warning's format and arguments (its last one: the count left out), or None: not a record of the
        kind, passed as it is."""
        raise NotImplementedError

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        said = self.summary(record, error)
        if said is None:
            return True
        now = self.clock()
        if now < self._next_at:
            self.left_out += 1
            return False
        record.msg, args = said
        record.args = (*args, self.left_out)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        self.left_out = 0
        self._next_at = now + self.interval
        return True


# At most one line per this many seconds about requests aiohttp's servers could not parse (``ClientHttpErrors``).
CLIENT_ERROR_LOG_SECONDS = 60.0


class ClientHttpErrors(_Summarised):
    """aiohttp logs every request its servers cannot parse (a header line over 8 KiB, a malformed request line) at
    error level, with a traceback and a quote of the client's bytes: anyone reaching a port (peer server, webhook,
    side server) could flood the log, and the quote may hold a client's header. Such records become one warning
    per ``interval`` naming the kind of error and how many were left out since the last; no traceback, no quote.
    The client gets its 400 either way."""

    def __init__(self, interval: float = CLIENT_ERROR_LOG_SECONDS, clock: Any = time.monotonic) -> None:
        super().__init__(interval, clock)

    def summary(self, record: logging.LogRecord, error: BaseException | None) -> tuple[str, tuple[Any, ...]] | None:
        if record.name != "aiohttp.server" or type(error).__module__ != "aiohttp.http_exceptions":
            return None
        return ("requests that are not valid HTTP refused (%s %s; %d more since the last such line)",
                (getattr(error, "code", 400), type(error).__name__))


# At most one line per this many seconds about failed connections to NATS (``NatsConnectErrors``).
NATS_ERROR_LOG_SECONDS = 30.0


class NatsConnectErrors(_Summarised):
    """nats-py logs each failed connection (refused, reset, timed out; a server that offers no TLS to a client
    given a CA) as "nats: encountered error" at error level with its traceback, and tries again twice a second: a
    service waiting for NATS, or riding out an outage, wrote a traceback every 0.5 s. Such records become one
    warning per ``interval`` saying what failed, and how many were left out since the last; other nats-py errors
    are left alone. (The CLI reads these records on nats-py's own logger, before this handler, to say why it could
    not connect.)"""

    def __init__(self, interval: float = NATS_ERROR_LOG_SECONDS, clock: Any = time.monotonic) -> None:
        super().__init__(interval, clock)

    def summary(self, record: logging.LogRecord, error: BaseException | None) -> tuple[str, tuple[Any, ...]] | None:
        if record.name != "nats.aio.client":
            return None
        if isinstance(error, TlsNotOffered):
            # Reachable, so not "cannot reach": a server without TLS (or whatever took its port), or NATS_TLS_CA
            # given for a server that has none. Nothing was sent to it.
            return ("nats: encountered error: the NATS server does not offer TLS, and a CA was given (NATS_TLS_CA): "
                    "not logging in (%s; %d more since the last such line)", (error,))
        if not isinstance(error, OSError | TimeoutError):
            return None
        return ("nats: encountered error: cannot reach a NATS server (%s: %s; %d more since the last such line)",
                (type(error).__name__, error))


def _route_stdlib_logging(level: str, renderer: Any, file: TextIO) -> None:
    """Send what libraries log through ``logging`` (pyfuse3's notify thread, asyncio, nats-py) out in the same
    format as our own lines: without this, Python's last-resort handler prints them as plain text with bare
    tracebacks, and a JSON log gets lines no collector can parse."""
    handler = _StructlogHandler(file)
    handler.addFilter(ClientHttpErrors())
    handler.addFilter(NatsConnectErrors())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            add_trace_ids,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' own info lines (botocore finding credentials, ...) are noise next to ours: warnings and up.
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


class TracingConfigError(ValueError):
    """An ``OTEL_*`` variable asks for something this process cannot do; the message names it."""


# The exporters Shoal ships (OTEL_TRACES_EXPORTER): OTLP over HTTP/protobuf, or none.
EXPORTER_OTLP = "otlp"
EXPORTER_NONE = "none"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
HTTP_PROTOBUF = "http/protobuf"
# Spans left in the queue at exit get this long to reach the collector (SIGTERM's grace in a pod is 30 s, and a
# mount process must unmount within the agent's stop grace).
SHUTDOWN_FLUSH_MILLIS = 3000


def tracing_exporter(environ: Mapping[str, str]) -> str:
    """Which exporter the environment asks for: ``otlp`` or ``none``.

    Off unless asked: ``OTEL_TRACES_EXPORTER=otlp``, or an OTLP endpoint variable with ``OTEL_TRACES_EXPORTER``
    unset (the SDK's own default, ``otlp`` towards localhost, would send every process's spans to a collector
    that is not there). ``OTEL_SDK_DISABLED=true`` turns it off too. Anything else is a ``TracingConfigError``.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return EXPORTER_NONE
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    unknown = sorted(set(names) - {EXPORTER_OTLP, EXPORTER_NONE})
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not available here "
                                 f"(use {EXPORTER_OTLP} or {EXPORTER_NONE})")
    if names:
        wanted = EXPORTER_OTLP in names
    else:
        wanted = any(environ.get(variable, "").strip() for variable in ENDPOINT_VARIABLES)
    if not wanted:
        return EXPORTER_NONE
    for variable in PROTOCOL_VARIABLES:
        protocol = environ.get(variable, "").strip().lower()
        if protocol and protocol != HTTP_PROTOBUF:
            raise TracingConfigError(f"{variable}: {protocol} is not available here (use {HTTP_PROTOBUF})")
    return EXPORTER_OTLP


def tracing_resource(service_name: str) -> Resource:
    """``service.name`` is the process's own unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one; the
    rest of OTEL_RESOURCE_ATTRIBUTES is added (the SDK reads both variables from the environment)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    named = "service.name" in OTELResourceDetector().detect().attributes  # the detector reads both
    return Resource.create({} if named else {"service.name": service_name})


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """Install this process's TracerProvider (once) and, when the ``OTEL_*`` variables of ``environ`` (the
    process's by default) ask for it, a batching OTLP/HTTP exporter. Raises ``TracingConfigError`` on a variable
    it cannot honour; the service shell turns that into an exit with the message."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    environ = os.environ if environ is None else environ
    exporter = tracing_exporter(environ)
    provider = TracerProvider(resource=tracing_resource(service_name))
    if exporter == EXPORTER_OTLP:
        # Imported only when used: it pulls in requests and protobuf, which a process without traces never needs.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Batching (OTEL_BSP_* tune it) keeps the export off the hot path: a span costs a queue append.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing() -> None:
    """Export the spans still queued and stop the exporter: the last thing a process does (``libs.service``)."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(SHUTDOWN_FLUSH_MILLIS)
        provider.shutdown()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_context(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (``traceparent``) to outgoing message headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str:
    """The current span as a ``traceparent`` value ("" outside a trace): kept in a record whose change starts
    work later (a KV watch carries no headers), so that work joins the trace that asked for it."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(traceparent: str) -> otel_context.Context:
    """The context to start a span in from a stored ``traceparent`` (a new trace when it is empty)."""
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def in_trace() -> bool:
    """Whether a span is current: child spans of I/O are made only inside a trace."""
    return trace.get_current_span().get_span_context().is_valid


@contextmanager
def producer_span(span_tracer: trace.Tracer, subject: str) -> Iterator[None]:
    """A PRODUCER span for one publish to ``subject`` when a trace is current (its headers then carry this span);
    nothing outside a trace: heartbeats and inventory start no trace of their own, and a consumer of a message
    without ``traceparent`` starts the trace itself. Named by the subject's family (``publish shoal.task.node``
    for every node's and dataset's parts: ``subjects.family``), the subject itself in
    ``messaging.destination.name``."""
    if not in_trace():
        yield
        return
    with span_tracer.start_as_current_span(f"publish {subjects.family(subject)}", kind=trace.SpanKind.PRODUCER,
                                           attributes=messaging_attributes(subject)):
        yield


def child_span(span_tracer: trace.Tracer, name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
               attributes: Mapping[str, Any] | None = None) -> Any:
    """A span under the current one, or no span at all outside a trace (cheap on hot paths)."""
    if not in_trace():
        return nullcontext()
    return span_tracer.start_as_current_span(name, kind=kind, attributes=attributes)


@functools.lru_cache(maxsize=256)  # a node's peers are a few URLs, asked on every read miss
def server_attributes(url: str) -> Mapping[str, str | int]:
    """A CLIENT span's ``server.address`` (the host alone, as OpenTelemetry's conventions want it: a name or an IP
    address, no scheme, port or brackets) and ``server.port`` (the scheme's when the URL names none) for a request to
    ``url``. Nothing else of the URL: no user name or password, and no path or query (a peer request's query holds
    its signature)."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # not a number: no port to speak of
        port = None
    attributes: dict[str, str | int] = {"server.address": parts.hostname or ""}
    if port is not None:
        attributes["server.port"] = port
    return attributes


_DEFAULT_PORTS = {"http": 80, "https": 443}


# The dataset a span is about, as ``<namespace>/<name>``: the value of the metrics' ``dataset`` label
# (``libs.metrics.dataset_label``), so a trace and a dashboard name a dataset alike.
DATASET_ATTRIBUTE = "shoal.dataset"


def messaging_attributes(subject: str) -> dict[str, str]:
    return {"messaging.system": "nats", "messaging.destination.name": subject}
