"""A watch's initial entries are all read even when nats-py says "caught up" before them (``libs.bus.WatchStart``),
on a real nats-server.

nats-py puts its None first when the consumer's info says nothing is pending and the subscription has counted no
message yet; under load the info's reply was read before the messages the server had delivered ahead of it (a CI
run's marker sweep found no marker). ``late_count`` makes that timing certain: each watch's consumer info is asked
for once the server has delivered everything, and the subscription's count reads 0 at that moment.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from typing import Any

import pytest
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import Bus, Replay, initial_entries, kv_delete, kv_watch
from libs.markers import purge_kv_markers
from tests.helpers import eventually

BUCKET = subjects.KV_OPERATIONS
KEYS = ("dataload.default.a", "dataload.default.b", "dataload.default.c")


@pytest.fixture
def late_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """nats-py's watches start as under load: the consumer info answers after the server delivered every initial
    message, and the subscription has counted none of them yet."""
    subscription = JetStreamContext.PushSubscription
    original = subscription.consumer_info

    async def delivered_first(self: Any) -> Any:
        async def drained() -> Any:
            info = await original(self)
            return info if info.num_pending == 0 else None
        return await eventually(drained, what="the server delivered every initial message")

    monkeypatch.setattr(subscription, "consumer_info", delivered_first)
    monkeypatch.setattr(subscription, "delivered", property(lambda self: 0))
    yield


async def filled(bus: Bus) -> KeyValue:
    kv = await bus.kv(BUCKET)
    for key in KEYS:
        await kv.put(key, b"{}")
    return kv


async def test_nats_py_alone_says_caught_up_before_the_entries_under_that_timing(bus: Bus, late_count: None) -> None:
    """The timing ``late_count`` sets up is the failure: nats-py's first item is its None, the entries after it."""
    watcher = await (await filled(bus)).watchall()
    try:
        assert await watcher.updates(timeout=5) is None
        assert (await watcher.updates(timeout=5)).key == KEYS[0]
    finally:
        await watcher.stop()


async def test_initial_entries_reads_every_entry_the_keys_held(bus: Bus, late_count: None) -> None:
    watcher = await (await filled(bus)).watchall()
    try:
        assert [entry.key async for entry in initial_entries(watcher, 5)] == list(KEYS)
    finally:
        await watcher.stop()


async def test_initial_entries_of_an_empty_bucket_end_at_once(bus: Bus, late_count: None) -> None:
    watcher = await (await bus.kv(BUCKET)).watchall()
    try:
        assert [entry async for entry in initial_entries(watcher, 5)] == []
    finally:
        await watcher.stop()


async def test_a_kv_watch_says_caught_up_after_the_initial_entries_then_follows_changes(
        bus: Bus, late_count: None) -> None:
    kv = await filled(bus)
    stopping = asyncio.Event()
    items: list[KeyValue.Entry | Replay | None] = []
    watch = kv_watch(kv, stopping)
    try:
        async for item in watch:
            items.append(item)
            if item is None:
                break
        assert [getattr(item, "key", item) for item in items] == [*KEYS, None]
        await kv.put("dataload.default.d", b"{}")
        change = await asyncio.wait_for(anext(watch), 5)
        assert isinstance(change, KeyValue.Entry) and change.key == "dataload.default.d"
    finally:
        stopping.set()
        await watch.aclose()


async def test_a_marker_sweep_finds_the_markers(bus: Bus, late_count: None) -> None:
    """The CI failure: the sweep read nats-py's None first and purged nothing."""
    kv = await filled(bus)
    await kv_delete(kv, KEYS[1], None)
    a_week_on = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=8)
    assert await purge_kv_markers(bus, BUCKET, a_week_on) == [KEYS[1]]
