"""``libs.service.run_loops``: every loop is stopped and waited for; one that is slow to stop is named in the log
while it is awaited, and a loop's failure ends the others and is raised."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytest
import structlog.testing

from libs import service
from libs.service import Periodic, StartsWhen, run_loops
from tests.helpers import eventually


async def found(logs: Sequence[Mapping[str, Any]], event: str) -> bool:
    return any(entry["event"] == event for entry in logs)


class Stubborn:
    """A loop that, once told to stop, ends only when ``release`` is set."""

    name = "stubborn"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = False
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await self._stopping.wait()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def stop(self) -> None:
        self._stopping.set()


class Prompt(Stubborn):
    name = "prompt"

    async def run(self) -> None:
        await self._stopping.wait()


class Failing(Stubborn):
    name = "failing"

    async def run(self) -> None:
        raise RuntimeError("broken")


async def test_a_loop_slow_to_stop_is_named_until_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STOP_WARN_SECONDS", 0.05)
    stubborn, prompt = Stubborn(), Prompt()
    stop = asyncio.Event()
    stop.set()
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(run_loops([stubborn, prompt], stop))
        await eventually(lambda: found(logs, "loops still stopping"), what="the warning", timeout=5)
        assert not running.done()
        stubborn.release.set()
        await asyncio.wait_for(running, 5)
    warnings = [entry for entry in logs if entry["event"] == "loops still stopping"]
    assert warnings and all(entry["loops"] == ["stubborn"] for entry in warnings)


async def test_a_failing_loop_stops_the_others_and_is_raised() -> None:
    prompt = Prompt()
    with pytest.raises(RuntimeError, match="broken"):
        await asyncio.wait_for(run_loops([Failing(), prompt], asyncio.Event()), 5)


async def test_cancelling_the_wait_cancels_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STOP_WARN_SECONDS", 0.05)
    stubborn = Stubborn()
    stop = asyncio.Event()
    stop.set()
    running = asyncio.create_task(run_loops([stubborn], stop))
    with structlog.testing.capture_logs() as logs:
        # the loops were told to stop and are being waited for
        await eventually(lambda: found(logs, "loops still stopping"), what="the warning", timeout=5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert stubborn.cancelled


class Counting(Prompt):
    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        await super().run()


class Awaited(asyncio.Event):
    """An event whose ``awaited`` is set once something waits on it: the test then knows the loop waits there (a
    yield of the test's own, ``asyncio.sleep(0)``, only made that likely)."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.awaited.set()
        return await super().wait()


async def test_a_loop_that_starts_when_ready_never_runs_if_stopped_first() -> None:
    inner, never = Counting(), Awaited()
    stop = asyncio.Event()
    running = asyncio.create_task(run_loops([StartsWhen(inner, never)], stop))
    await asyncio.wait_for(never.awaited.wait(), 5)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert inner.runs == 0


async def test_a_loop_that_starts_when_ready_runs_once_every_event_is_set() -> None:
    inner, first, second = Counting(), asyncio.Event(), Awaited()
    stop = asyncio.Event()
    gated = StartsWhen(inner, first, second)
    running = asyncio.create_task(run_loops([gated], stop))
    first.set()
    await asyncio.wait_for(second.awaited.wait(), 5)  # past the first event, waiting on the second
    assert inner.runs == 0 and gated.name == "counting"
    second.set()
    await eventually(lambda: found_run(inner), what="the loop started", timeout=5)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert inner.runs == 1


async def found_run(loop: Counting) -> bool:
    return loop.runs > 0


async def test_a_periodic_loop_that_cancels_on_stop_ends_a_tick_that_never_would() -> None:
    """``cancel_on_stop``: a tick waiting on what never comes (an API server that does not answer) is cancelled by a
    stop; a tick that fails is logged and the loop goes on, as without it."""
    ticks: list[str] = []
    never = asyncio.Event()

    async def tick() -> None:
        ticks.append("start")
        if len(ticks) == 1:
            raise RuntimeError("broken")
        try:
            await never.wait()
        except asyncio.CancelledError:
            ticks.append("cancelled")
            raise

    loop = Periodic("hanging", tick, 0.01, cancel_on_stop=True)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(loop.run())
        await eventually(lambda: _async(len(ticks) >= 2), what="a second tick, waiting", timeout=5)
        loop.stop()
        await asyncio.wait_for(task, 5)
    assert ticks == ["start", "start", "cancelled"]
    assert await found(logs, "periodic work failed")


async def _async(value: Any) -> Any:
    return value
