"""The page deadline of a metadata listing (``services.dataset.sync._paced``): entries in hand pass without a timer
each (an autoSync of 300,000 objects armed and cancelled 300,000 of them, a quarter of its CPU), a wait longer than
the deadline still ends the listing as an unreachable store, and a cancellation from outside stays one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest

from libs.ufs.base import EndpointUnreachable, ObjectInfo
from services.dataset.sync import _paced

PAGE = 1000


async def listing(count: int, stall_at: int | None = None, stall: asyncio.Event | None = None
                  ) -> AsyncIterator[ObjectInfo]:
    for i in range(count):
        if i % PAGE == 0:
            await asyncio.sleep(0)  # a page arrives
        if i == stall_at and stall is not None:
            await stall.wait()
        yield ObjectInfo(key=f"k{i}", size=i, etag="e", mtime=0.0)


async def test_entries_in_hand_arm_no_timer_each() -> None:
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, context=context)

    setattr(loop, "call_at", counting)  # noqa: B010 - an instance attribute over the method, removed below
    try:
        keys = [info.key async for info in _paced(listing(10 * PAGE), 60.0)]
    finally:
        delattr(loop, "call_at")  # the method again
    assert len(keys) == 10 * PAGE
    assert armed <= 2, f"{armed} timers for {len(keys)} entries"


async def test_a_page_later_than_the_deadline_ends_the_listing_as_unreachable() -> None:
    seen = []
    with pytest.raises(EndpointUnreachable, match=r"no listing page within 0\.2 s"):
        async with asyncio.timeout(10):  # the deadline is the pacing's, long before this one
            async for info in _paced(listing(3 * PAGE, stall_at=PAGE + 5, stall=asyncio.Event()), 0.2):
                seen.append(info.key)
    assert len(seen) == PAGE + 5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_consumer_slower_than_the_deadline_is_not_a_slow_store() -> None:
    count = 0
    async for _ in _paced(listing(5), 0.1):
        count += 1
        await asyncio.sleep(0.15)  # the consumer's own time is not the store's
    assert count == 5


class StallEvent(asyncio.Event):
    """An event never set whose ``entered`` is set once a listing waits on it: the test then knows the listing
    stalls (a sleep before the cancel only made that likely)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.entered.set()
        return await super().wait()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    stall = StallEvent()

    async def consume() -> None:
        async for _ in _paced(listing(10, stall_at=3, stall=stall), 60.0):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(stall.entered.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
