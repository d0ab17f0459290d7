"""The process shell shared by every service and mount process: settings, logging, tracing, signals, the side
server, and how a process runs its loops until stopped.

A process provides ``async def run(settings, stop, readiness)``; ``main`` parses settings once (printing every
bad variable and exiting 2), sets up telemetry (exporting spans when the ``OTEL_*`` variables say so, and flushing
them when the process ends, also after an error), starts the side server (``libs.side_server``: ``/healthz``,
``/readyz``, ``/metrics``) unless ``SHOAL_HTTP_PORT=off``, and turns SIGTERM/SIGINT into the ``stop`` event.
``run`` connects with ``libs.bus.connect(..., stop=stop)``, so a stop before NATS answers ends it too. ``run``
registers its readiness checks (``nats_check``, and ``run_loops`` adds one for its loops) and runs its
loops with ``run_loops``: every long-running part of a process is a ``Loop`` (``run`` until ``stop``), started
and stopped the same way; one that needs another's view first (a KV mirror's initial values) is wrapped in
``StartsWhen``, so nothing waits where a stop cannot reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from libs.bus import StoppedConnecting
from libs.config import Settings, SettingsError, load_settings
from libs.side_server import Readiness, SideServer
from libs.telemetry import TracingConfigError, get_logger, setup_logging, setup_tracing, shutdown_tracing

if TYPE_CHECKING:
    from libs.bus import Bus

log = get_logger(__name__)

# A loop still running this long after ``stop`` is named in the log (and again every as many seconds).
STOP_WARN_SECONDS = 10.0


class ServiceRun(Protocol):
    def __call__(self, settings: Settings, stop: asyncio.Event, *, readiness: Readiness) -> Awaitable[None]: ...


class Loop(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


def loop_name(loop: Loop) -> str:
    return str(getattr(loop, "name", "") or getattr(loop, "durable", "") or type(loop).__name__)


async def run_loops(loops: Sequence[Loop], stop: asyncio.Event, readiness: Readiness | None = None) -> None:
    """Run the loops until ``stop`` is set or one of them fails; then stop all and wait for them.

    With ``readiness``, a check named ``loops`` fails as soon as one of them is no longer running.
    """
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    if readiness is not None:
        def check() -> str | None:
            ended = [loop_name(loop) for loop, task in zip(loops, tasks, strict=True) if task.done()]
            return f"not running: {', '.join(ended)}" if ended else None

        readiness.add("loops", check)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for loop in loops:
            loop.stop()
        stopper.cancel()
        results = await _stopped(loops, tasks)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def _stopped(loops: Sequence[Loop], tasks: list[asyncio.Task[None]]) -> list[BaseException | None]:
    """Wait for every loop's task to end; while some take longer than STOP_WARN_SECONDS, say which (a process that
    does not stop is otherwise silent about why)."""
    waited = 0.0
    while True:
        try:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WARN_SECONDS)
        except asyncio.CancelledError:
            for task in tasks:  # as ``gather`` would: the loops end with whoever cancelled the wait
                task.cancel()
            raise
        if not pending:
            return [None if task.cancelled() else task.exception() for task in tasks]
        waited += STOP_WARN_SECONDS
        log.warning("loops still stopping", seconds=waited,
                    loops=[loop_name(loop) for loop, task in zip(loops, tasks, strict=True) if task in pending])


class StartsWhen:
    """Runs ``loop`` once every one of ``ready`` is set, or never if stopped first. For loops whose work needs a
    view that another loop builds (a KV mirror's initial values): waiting inside a handler instead could not be
    stopped, and a stop soon after a start would hang."""

    def __init__(self, loop: Loop, *ready: asyncio.Event) -> None:
        self.loop = loop
        self.name = loop_name(loop)
        self.ready = ready
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            for event in self.ready:
                waiting = asyncio.create_task(event.wait())
                await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
        finally:
            stopping.cancel()
        if not self._stopping.is_set():
            await self.loop.run()

    def stop(self) -> None:
        self._stopping.set()
        self.loop.stop()


class Periodic:
    """A loop that awaits ``tick()`` every ``interval`` seconds until stopped; a failing tick is logged, not fatal.

    ``cancel_on_stop``: a stop cancels the tick under way instead of waiting for it to end; for a tick that may wait
    on a peer that does not answer (the bridge's calls to an API server), and whose work is redone by the next run
    anyway (level-triggered), so that a stop is prompt."""

    def __init__(self, name: str, tick: Callable[[], Awaitable[object]], interval: float,
                 cancel_on_stop: bool = False) -> None:
        self.name = name
        self.tick = tick
        self.interval = interval
        self.cancel_on_stop = cancel_on_stop
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await (self._tick_until_stopped() if self.cancel_on_stop else self.tick())
            except Exception:
                log.exception("periodic work failed", loop=self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)

    def stop(self) -> None:
        self._stopping.set()

    async def _tick_until_stopped(self) -> None:
        work = asyncio.ensure_future(self.tick())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled() or not work.done():
            await asyncio.wait([work])  # let it unwind (its finally blocks); raises nothing
            return
        work.result()  # its exception, if it ended with one


def nats_check(bus: Bus) -> Callable[[], str | None]:
    """Readiness: the process's NATS connection is up (not closed, not reconnecting)."""
    return lambda: None if bus.nc.is_connected else "not connected to NATS"


def main(name: str, run: ServiceRun, on_listening: Callable[[int], None] | None = None,
         fast_loop: bool = False, on_fatal: Callable[[str], None] | None = None) -> None:
    """Run a process; ``on_listening(port)`` is told the side server's port before ``run`` starts (a mount process
    names it in its Prometheus target file). ``fast_loop``: on uvloop (less CPU per NATS round trip, for a process
    whose work is mostly many small round trips, like the dataset service in a burst of applies). ``on_fatal``
    is told why the process exits on an error (bad settings, a ``SystemExit`` with a message, an exception) before
    it exits: a mount process tells its agent, whose heartbeat otherwise said only the exit code."""
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"{name}: {err}", file=sys.stderr)
        _tell(on_fatal, str(err))
        sys.exit(2)
    setup_logging(settings.service.log_level, settings.service.log_format)
    try:
        setup_tracing(name)
    except TracingConfigError as err:
        print(f"{name}: {err}", file=sys.stderr)
        _tell(on_fatal, str(err))
        sys.exit(2)
    log = get_logger(name)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        readiness = Readiness()
        # Not ready before the process's loops run; ``run_loops`` replaces this check with its own.
        readiness.add("loops", lambda: "starting")
        side = None
        if settings.service.http_port is not None:
            side = SideServer(readiness, settings.service.http_host, settings.service.http_port)
            port = await side.start()
            log.info("side server listening", url=f"http://{settings.service.http_host}:{port}",
                     endpoints=["/healthz", "/readyz", "/metrics"])
            if on_listening is not None:
                on_listening(port)
        log.info("starting", nats=settings.nats.urls)
        try:
            await run(settings, stop, readiness=readiness)
        except StoppedConnecting as err:  # a stop before NATS answered: nothing ran, so nothing else to stop
            log.info("stopped before connecting", reason=str(err))
        finally:
            if side is not None:
                await side.stop()
        log.info("stopped")

    try:
        if fast_loop:
            import uvloop

            uvloop.run(_main())
        else:
            asyncio.run(_main())
    except SystemExit as err:
        if isinstance(err.code, str):  # a message (an int code says nothing more than the exit status)
            _tell(on_fatal, err.code)
        raise
    except Exception as err:
        _tell(on_fatal, f"{type(err).__name__}: {err}")
        raise
    finally:
        # Off the event loop: the OTLP exporter's flush is a blocking HTTP call.
        shutdown_tracing()


def _tell(on_fatal: Callable[[str], None] | None, reason: str) -> None:
    if on_fatal is not None:
        on_fatal(reason)
