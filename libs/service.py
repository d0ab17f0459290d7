"""The process shell shared by every service: settings, logging, tracing, signals, and clean shutdown.

A service module provides ``async def run(settings, stop)``; ``main`` parses settings once (printing every
bad variable and exiting 2), sets up telemetry, and turns SIGTERM/SIGINT into the ``stop`` event.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from libs.config import Settings, SettingsError, load_settings
from libs.telemetry import get_logger, setup_logging, setup_tracing

ServiceRun = Callable[[Settings, asyncio.Event], Awaitable[None]]


class Loop(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def run_loops(loops: Sequence[Loop], stop: asyncio.Event) -> None:
    """Run the loops until ``stop`` is set or one of them fails; then stop all and wait for them."""
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for loop in loops:
            loop.stop()
        stopper.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


def main(name: str, run: ServiceRun) -> None:
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.service.log_level, settings.service.log_format)
    setup_tracing(name)
    log = get_logger(name)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("starting", nats=settings.nats.urls)
        await run(settings, stop)
        log.info("stopped")

    asyncio.run(_main())
