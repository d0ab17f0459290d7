"""Logging and tracing set-up shared by every process, and trace-context propagation through NATS headers.

Logs: structlog, JSON lines when stderr is not a terminal (collectors parse them), readable console output on
one. Traces: an OpenTelemetry TracerProvider; ``traceparent`` travels in message headers (``inject_context`` on
publish, ``extract_context`` on receive) so one trace follows a command from publisher to every service.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

_configured_logging = False


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    global _configured_logging
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=not _configured_logging,
    )
    _route_stdlib_logging(level, renderer)
    _configured_logging = True


class _StructlogHandler(logging.StreamHandler):
    """Marks the handler ``setup_logging`` installs, so a second call replaces it instead of adding one."""


def _route_stdlib_logging(level: str, renderer: Any) -> None:
    """Send what libraries log through ``logging`` (pyfuse3's notify thread, asyncio, nats-py) out in the same
    format as our own lines: without this, Python's last-resort handler prints them as plain text with bare
    tracebacks, and a JSON log gets lines no collector can parse."""
    handler = _StructlogHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
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


def setup_tracing(service_name: str) -> None:
    """Install a TracerProvider once per process; exporters are added by the observability work."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service_name})))


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
