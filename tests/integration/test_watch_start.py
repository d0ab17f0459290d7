"""A watch's initial entries are all read even when nats-py says "caught up" before them (``libs.bus.WatchStart``),
on a real nats-server; so is a listing of a bucket's keys (``kv_keys``), and of an Object Store's objects
(``object_names``: nats-py's ``ObjectStore.list()`` has the same early None).

nats-py puts its None first when the consumer's info says nothing is pending and the subscription has counted no
message yet; under load the info's reply was read before the messages the server had delivered ahead of it (a CI
run's marker sweep found no marker). ``late_count`` makes that timing certain: each watch's consumer info is asked
for once the server has delivered everything, and the subscription's count reads 0 at that moment.

nats-py also puts its None after the first message whose pending count reads 0, and a message's count can read 0
and grow again while keys are written (nats-io/nats.py#995: ``keys()`` listed part of a bucket). ``early_zeros``
makes that certain: the messages of the first two keys say nothing is pending after them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore as NatsObjectStore

from libs import subjects
from libs.bus import Bus, Replay, WatchStart, initial_entries, kv_delete, kv_keys, kv_watch, object_names
from libs.markers import purge_kv_markers
from tests.helpers import eventually, object_meta_subject, pending_reads_zero

BUCKET = subjects.KV_OPERATIONS
KEYS = ("dataload.default.a", "dataload.default.b", "dataload.default.c")
OBJECTS = ("default.a", "default.b", "default.c")


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


@pytest.fixture
def early_zeros(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The messages of KEYS[0] and KEYS[1] say nothing is pending after them, as a message's count can read while
    keys are written; KEYS[2]'s says what the server counted."""
    metadata = Msg.metadata

    def early(self: Msg) -> Msg.Metadata:
        read = metadata.fget(self)  # type: ignore[attr-defined]
        if self.subject.endswith((KEYS[0], KEYS[1])):
            return dataclasses.replace(read, num_pending=0)
        return read

    monkeypatch.setattr(Msg, "metadata", property(early))
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


async def test_nats_py_alone_lists_part_of_the_keys_under_early_zeros(bus: Bus, early_zeros: None) -> None:
    """The timing ``early_zeros`` sets up is the failure: nats-py's ``keys()`` stops at the first early zero."""
    assert await (await filled(bus)).keys() == [KEYS[0]]


async def test_initial_entries_read_past_early_zeros(bus: Bus, early_zeros: None) -> None:
    watcher = await (await filled(bus)).watchall()
    try:
        assert [entry.key async for entry in initial_entries(watcher, 5)] == list(KEYS)
    finally:
        await watcher.stop()


async def test_kv_keys_lists_every_key_under_early_zeros(bus: Bus, early_zeros: None) -> None:
    assert await kv_keys(await filled(bus)) == list(KEYS)


async def test_kv_keys_lists_every_key_when_the_count_comes_late(bus: Bus, late_count: None) -> None:
    """nats-py's ``keys()`` answers "no keys" every time under this timing; asking again did not help."""
    assert await kv_keys(await filled(bus)) == list(KEYS)


async def test_kv_keys_leaves_out_deleted_keys_and_of_an_empty_bucket_lists_none(bus: Bus) -> None:
    kv = await bus.kv(BUCKET)
    assert await kv_keys(kv) == []
    await filled(bus)
    await kv_delete(kv, KEYS[1], None)
    await kv.purge(KEYS[2])
    assert await kv_keys(kv) == [KEYS[0]]


async def watched_then_changed(kv: KeyValue) -> None:
    """A ``kv_watch`` of ``kv`` (filled) says caught up after every key, then follows a change."""
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


async def test_a_kv_watch_says_caught_up_after_the_initial_entries_then_follows_changes(
        bus: Bus, late_count: None) -> None:
    await watched_then_changed(await filled(bus))


async def test_a_kv_watch_says_caught_up_past_early_zeros_then_follows_changes(bus: Bus, early_zeros: None) -> None:
    await watched_then_changed(await filled(bus))


async def test_a_marker_sweep_finds_the_markers(bus: Bus, late_count: None) -> None:
    """The CI failure: the sweep read nats-py's None first and purged nothing."""
    kv = await filled(bus)
    await kv_delete(kv, KEYS[1], None)
    a_week_on = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=8)
    assert await purge_kv_markers(bus, BUCKET, a_week_on) == [KEYS[1]]


async def stored(bus: Bus) -> NatsObjectStore:
    store = await bus.manifests()
    for name in OBJECTS:
        await store.put(name, b"{}")
    return store


async def test_nats_py_alone_lists_part_of_the_objects_under_early_zeros(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py's ``ObjectStore.list()`` stops at the first meta message whose count reads 0, as ``keys()`` does."""
    pending_reads_zero(monkeypatch, object_meta_subject(OBJECTS[0]))
    assert [info.name for info in await (await stored(bus)).list()] == [OBJECTS[0]]


async def test_nats_py_alone_lists_no_object_when_the_early_zero_is_a_deleted_ones(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted objects left out (``ignore_deletes``), it answers that the store is empty: a wait for "no objects
    left" ended at once."""
    store = await bus.manifests()
    await store.put("default.gone", b"{}")
    await store.delete("default.gone")
    await stored(bus)
    pending_reads_zero(monkeypatch, object_meta_subject("default.gone"))
    with pytest.raises(NotFoundError):
        await store.list(ignore_deletes=True)
    assert await object_names(store) == list(OBJECTS)


async def test_object_names_lists_every_object_under_early_zeros(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    pending_reads_zero(monkeypatch, object_meta_subject(OBJECTS[0]), object_meta_subject(OBJECTS[1]))
    assert await object_names(await stored(bus)) == list(OBJECTS)


async def test_object_names_lists_every_object_when_the_count_comes_late(bus: Bus, late_count: None) -> None:
    assert await object_names(await stored(bus)) == list(OBJECTS)


async def test_object_names_leaves_out_deleted_objects_and_of_an_empty_store_lists_none(bus: Bus) -> None:
    store = await bus.manifests()
    assert await object_names(store) == []
    await stored(bus)
    await store.delete(OBJECTS[1])
    assert await object_names(store) == [OBJECTS[0], OBJECTS[2]]


async def test_a_start_whose_mark_counted_messages_removed_before_delivery_ends_once_the_consumer_is_idle(
        bus: Bus) -> None:
    """The mark taken at nats-py's None counts the consumer's pending messages; one removed before delivery (a
    member's beat expired by the bucket's TTL) is never read, so the start waited out the read timeout and raised.
    Here the mark counts two such messages: the start ends once the consumer has nothing pending and every delivered
    message was read."""
    kv = await filled(bus)
    watcher = await kv.watchall()
    try:
        start = WatchStart(watcher)
        read: list[str] = []
        while len(read) < len(KEYS):
            item = await watcher.updates(timeout=5)
            if item is not None:
                read.append(item.key)
                await start.ended(item)
        start.mark = len(KEYS) + 2
        assert not await start.ended(None)
        assert await start.idle()
    finally:
        await watcher.stop()
