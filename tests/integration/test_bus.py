"""The bus on a real nats-server: KV compare-and-set between two writers, services that outlive a restart of the
nats-server (same port, same JetStream store directory), a bucket's mirror that never goes back to an older
revision than it holds, and a consumer that keeps the messages it works on past the ack wait."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from nats.js import api as js_api
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import (
    Bus,
    Conflict,
    Consumer,
    Delivery,
    KvMirror,
    Replay,
    connect,
    kv_delete,
    kv_keys,
    kv_load,
    kv_load_deleted,
    kv_save,
    kv_watch,
)
from libs.config import NatsSettings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetCommand, DatasetResync, DatasetSpec, Mount
from services.dataset import app as dataset_app
from services.dataset.lanes import dataset_lane
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, make_settings, running
from tests.metric_values import Snapshot, value


class Count(msgspec.Struct, frozen=True):
    n: int
    writer: str = ""


KEY = "tests.cas"


async def test_stale_revision_is_a_conflict(bus: Bus) -> None:
    kv = await bus.kv(subjects.KV_BINDINGS)
    metrics = Snapshot()
    first = await kv_save(kv, KEY, Count(0), None)
    with pytest.raises(Conflict, match=f"{KEY} changed concurrently"):
        await kv_save(kv, KEY, Count(0, "second creator"), None)  # create only when absent
    # Two writers read the same revision; the first write wins, the second is told.
    (a, rev_a), (b, rev_b) = await kv_load(kv, KEY, Count), await kv_load(kv, KEY, Count)
    assert a == b == Count(0) and rev_a == rev_b == first
    await kv_save(kv, KEY, Count(1, "a"), rev_a)
    with pytest.raises(Conflict, match=f"{KEY} changed concurrently"):
        await kv_save(kv, KEY, Count(1, "b"), rev_b)
    value, revision = await kv_load(kv, KEY, Count)
    assert value == Count(1, "a") and revision is not None and revision > first
    with pytest.raises(Conflict, match=f"{KEY} changed concurrently"):
        await kv_delete(kv, KEY, first)  # a delete at a stale revision is refused too
    await kv_delete(kv, KEY, revision)
    assert (await kv_load(kv, KEY, Count))[0] is None
    # Each lost compare-and-set is counted once, by bucket: the second create, the stale update, the stale delete.
    assert metrics.moved("shoal_kv_conflicts_total", bucket=subjects.KV_BINDINGS) == 3


async def test_concurrent_read_modify_write_loses_no_update(bus: Bus, nats_server: NatsServer) -> None:
    """Two writers on two connections increment one counter; a lost update would show in the total."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    await kv_save(kv, KEY, Count(0), None)
    other = await connect(NatsSettings(urls=[nats_server.url]), "tests-other-writer")
    conflicts = 0
    both_read = asyncio.Barrier(2)

    async def increment(writer: Bus, name: str, times: int) -> None:
        nonlocal conflicts
        bucket = await writer.kv(subjects.KV_BINDINGS)
        waited = False
        for _ in range(times):
            while True:
                value, revision = await kv_load(bucket, KEY, Count)
                assert value is not None
                if not waited:  # the first time, both writers hold the same revision before either writes
                    waited = True
                    await asyncio.wait_for(both_read.wait(), 5)
                try:
                    await kv_save(bucket, KEY, Count(value.n + 1, name), revision)
                    break
                except Conflict:
                    conflicts += 1

    try:
        await asyncio.gather(increment(bus, "a", 20), increment(other, "b", 20))
    finally:
        await other.close()
    value, _ = await kv_load(kv, KEY, Count)
    assert value is not None and value.n == 40
    assert conflicts >= 1


async def test_services_keep_working_across_a_nats_server_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.mkdir()
    (source / "a.txt").write_bytes(b"hello")
    settings = make_settings(nats_server.url)
    bus = await connect(settings.nats, "tests-restart")
    await bus.provision()
    try:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            await bus.publish(subjects.DATASET_APPLY, apply_local("before", source))
            await eventually(lambda: _synced(bus, "before"), what="a dataset synced before the restart")

            nats_server.restart()
            (source / "b.txt").write_bytes(b"world!")
            # A new client proves the server is back; the service must find it again on its own connection.
            fresh = await connect(settings.nats, "tests-after-restart")
            try:
                await fresh.publish(subjects.DATASET_APPLY, apply_local("after", source))
                record = await eventually(lambda: _synced(fresh, "after"), timeout=10,
                                          what="a dataset applied after the restart synced by the same service")
                assert record.status.file_num == 2
            finally:
                await fresh.close()
            assert bus.nc.is_connected  # and this client reconnected too
            assert (await dataset_record(bus, "before")) is not None
    finally:
        await bus.close()


def apply_local(name: str, folder: Path) -> DatasetApply:
    return DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name),
                                        spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")])))


async def _synced(bus: Bus, name: str):
    record = await dataset_record(bus, name)
    return record if record and record.status.synced_generation >= 1 else None


async def test_kv_keys_lists_each_key_once_while_keys_are_being_written(bus: Bus) -> None:
    """nats-py's ``keys()`` reads a watch to its end: a key written while it reads comes again (its new value), and
    ``shoal get datasets`` showed a dataset twice right after an apply. ``kv_keys`` lists each once."""
    kv = await bus.kv(subjects.KV_DATASETS)
    names = [f"default.d{i:03}" for i in range(300)]
    for name in names:
        await kv.put(name, b"{}")
    writing = True

    async def rewrite() -> None:
        while writing:
            for name in names[::7]:
                await kv.put(name, b"{}")

    writer = asyncio.create_task(rewrite())
    try:
        for _ in range(20):
            listed = await kv_keys(kv)
            assert sorted(listed) == names, f"{len(listed)} keys listed, {len(set(listed))} of them distinct"
    finally:
        writing = False
        await writer


# --- KvMirror: a handler's own write against the watch's late entries ---
# A handler puts what it saved into its mirror at once (``saved``); the mirror's watch may bring an older entry of
# that key afterwards. The tests below are that watch: they read each entry from a real watch of the bucket as it is
# written, and hand it to a mirror that does not watch (``KvMirror.watched``) only after the later save, which is
# exactly the late delivery, every run.


async def _next(entries: AsyncGenerator[KeyValue.Entry | Replay | None, None]) -> KeyValue.Entry | Replay | None:
    """The watch's next item, or a failure rather than a hang."""
    return await asyncio.wait_for(anext(entries), 10)


Entries = AsyncGenerator[KeyValue.Entry | Replay | None, None]


@asynccontextmanager
async def _unwatched_mirror(bus: Bus) -> AsyncIterator[tuple[KeyValue, KvMirror[Count], Entries]]:
    """A mirror of an empty bucket that does not watch, its initial values in, and a real watch of the bucket whose
    entries the test hands to the mirror when it chooses."""
    kv = await bus.kv(subjects.KV_BINDINGS)
    mirror = KvMirror(kv, Count)
    stopping = asyncio.Event()
    async with contextlib.aclosing(kv_watch(kv, stopping)) as entries:
        mirror.watched(await _next(entries))  # None: the empty bucket's initial values are in
        try:
            yield kv, mirror, entries
        finally:
            stopping.set()


async def test_a_mirror_keeps_its_own_save_over_the_watchs_older_entry(bus: Bus) -> None:
    async with _unwatched_mirror(bus) as (kv, mirror, entries):
        old = await kv_save(kv, KEY, Count(1, "old"), None)
        old_entry = await _next(entries)
        new = await kv_save(kv, KEY, Count(2, "new"), old)
        mirror.saved(KEY, Count(2, "new"), new)
        mirror.watched(old_entry)  # delivered late: older than the save
        assert mirror.values == {KEY: Count(2, "new")}
        mirror.watched(await _next(entries))  # the save itself, come round
        assert mirror.values == {KEY: Count(2, "new")}

        # A save made before what the watch has already brought is older too: the watch's value stays.
        await kv_save(kv, KEY, Count(3, "another writer"), new)
        mirror.watched(await _next(entries))
        mirror.saved(KEY, Count(2, "new"), new)
        assert mirror.values == {KEY: Count(3, "another writer")}


async def test_a_mirror_keeps_its_own_save_over_the_watchs_older_delete(bus: Bus) -> None:
    async with _unwatched_mirror(bus) as (kv, mirror, entries):
        old = await kv_save(kv, KEY, Count(1, "old"), None)
        mirror.watched(await _next(entries))
        # The key deleted, then written again by the handler: the delete reaches the mirror after that save.
        await kv_delete(kv, KEY, old)
        delete_entry = await _next(entries)
        again = await kv_save(kv, KEY, Count(3, "again"), None)
        mirror.saved(KEY, Count(3, "again"), again)
        mirror.watched(delete_entry)
        assert mirror.values == {KEY: Count(3, "again")}
        mirror.watched(await _next(entries))
        assert mirror.values == {KEY: Count(3, "again")}
        # A newer delete removes the key.
        await kv_delete(kv, KEY, None)
        mirror.watched(await _next(entries))
        assert mirror.values == {}


async def test_a_mirror_keeps_its_own_delete_over_the_watchs_older_put(bus: Bus) -> None:
    async with _unwatched_mirror(bus) as (kv, mirror, entries):
        old = await kv_save(kv, KEY, Count(1, "old"), None)
        old_entry = await _next(entries)
        mirror.saved(KEY, Count(1, "old"), old)
        # The handler deletes the key and records the delete marker's revision (what the server numbered it).
        deleted = await kv_delete(kv, KEY, old)
        assert deleted > old
        assert (await kv_load_deleted(kv, KEY, Count))[1] == deleted
        mirror.deleted(KEY, deleted)
        assert mirror.values == {}
        mirror.watched(old_entry)  # the put, delivered late: older than the delete
        assert mirror.values == {}
        mirror.watched(await _next(entries))  # the delete itself, come round
        assert mirror.values == {}
        # A put made after the delete is newer: it brings the key back.
        again = await kv_save(kv, KEY, Count(3, "again"), None)
        mirror.watched(await _next(entries))
        assert mirror.values == {KEY: Count(3, "again")}
        # A delete with a note returns its marker's revision too; a stale one is refused and records nothing.
        noted = await kv_delete(kv, KEY, again, note=b"why")
        assert (await kv_load_deleted(kv, KEY, Count))[1:] == (noted, b"why")
        with pytest.raises(Conflict):
            await kv_delete(kv, KEY, again)


async def test_a_save_made_during_a_replay_outlives_the_replays_older_entry(bus: Bus) -> None:
    async with _unwatched_mirror(bus) as (kv, mirror, entries):
        old = await kv_save(kv, KEY, Count(1, "old"), None)
        old_entry = await _next(entries)
        mirror.watched(old_entry)
        mirror.watched(Replay())  # a reconnect: the replay's entries may predate a save made meanwhile
        new = await kv_save(kv, KEY, Count(2, "new"), old)
        mirror.saved(KEY, Count(2, "new"), new)
        assert mirror.values == {KEY: Count(2, "new")}  # readers see it at once, replay or not
        mirror.watched(old_entry)
        mirror.watched(None)
        assert mirror.values == {KEY: Count(2, "new")}


async def test_a_mirror_rebuilt_after_a_reconnect_takes_a_remade_buckets_revisions_afresh(
        nats_server: NatsServer) -> None:
    """The server comes back with an empty store: the bucket is made again and numbers its revisions from 1. The
    replay after the reconnect is the mirror's whole view: a key it does not hold leaves, and a key written again
    at a revision lower than the mirror knew from before is taken."""
    bus = await connect(NatsSettings(urls=[nats_server.url]), "tests-mirror")
    await bus.provision()
    kv = await bus.kv(subjects.KV_BINDINGS)
    mirror = KvMirror(kv, Count, bus.reconnects)
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.wait_for(mirror.ready.wait(), 10)
        revision = None
        for n in range(5):
            revision = await kv_save(kv, KEY, Count(n, "before"), revision)
        await kv_save(kv, "tests.gone", Count(0), None)
        await eventually(lambda: _holds(mirror, {KEY: Count(4, "before"), "tests.gone": Count(0)}),
                         what="the mirror holding the values written before the restart")

        nats_server.stop()
        shutil.rmtree(nats_server.config.store_dir)
        nats_server.start()
        await eventually(lambda: _provisioned(bus), what="the buckets made again after the restart",
                         tolerate=(Exception,))
        assert await kv_save(kv, KEY, Count(9, "remade"), None) == 1
        await eventually(lambda: _holds(mirror, {KEY: Count(9, "remade")}),
                         what="the mirror rebuilt from the remade bucket")
    finally:
        mirror.stop()
        await asyncio.wait_for(task, 10)
        await bus.close()


async def _holds(mirror: KvMirror[Count], values: dict[str, Count]) -> bool:
    return mirror.values == values


async def _provisioned(bus: Bus) -> bool:
    await bus.provision()
    return True


async def test_a_consumer_keeps_what_it_fetched_while_a_handler_outlasts_the_ack_wait(bus: Bus) -> None:
    """A handler that takes three ack waits, and the message queued behind it in its lane, stay with the process
    that fetched them (its working-acks, ``in_progress``): a second process on the same durable is handed neither,
    and each is handled once. Without them, JetStream handed both to the second process after one ack wait."""
    ack_wait = 1.0
    handled: list[tuple[str, str, int]] = []
    started = asyncio.Event()

    def handler(process: str) -> Callable[[DatasetCommand, Delivery], Awaitable[None]]:
        async def handle(command: DatasetCommand, delivery: Delivery) -> None:
            if command.id == "slow":
                started.set()
                await asyncio.sleep(3 * ack_wait)  # the work itself, longer than the ack wait
            handled.append((process, command.id, delivery.deliveries))
        return handle

    def consumer(process: str) -> Consumer[DatasetCommand]:
        return Consumer(bus, subjects.STREAM_COMMANDS, "kept-while-working", subjects.DATASET_COMMANDS,
                        msgspec.json.Decoder(DatasetCommand), handler(process), max_event_bytes=1 << 20,
                        ack_wait=ack_wait, working_every=ack_wait / 5, lane_of=dataset_lane)

    for command_id in ("slow", "queued"):  # one dataset, so one lane: "queued" waits for "slow" to end
        await bus.publish(subjects.DATASET_RESYNC, DatasetResync(id=command_id, name="k"))
    first, second = consumer("first"), consumer("second")
    tasks = [asyncio.create_task(first.run())]
    try:
        await asyncio.wait_for(started.wait(), 10)
        info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "kept-while-working")
        assert (info.num_ack_pending, info.num_pending) == (2, 0), "both fetched by the first process"
        tasks.append(asyncio.create_task(second.run()))
        began = time.monotonic()

        async def both_handled() -> bool:
            return len(handled) == 2

        await eventually(both_handled, 10, "both commands handled")
        assert time.monotonic() - began > ack_wait, "the handler outlasted the ack wait"

        async def acked() -> js_api.ConsumerInfo | None:
            info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "kept-while-working")
            return info if info.num_ack_pending == 0 else None

        assert (await eventually(acked, 10, "both acked")).num_redelivered == 0
    finally:
        first.stop()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert handled == [("first", "slow", 1), ("first", "queued", 1)], handled


async def test_a_consumer_stuck_in_a_handler_shows_the_time_since_its_last_fetch_which_its_lag_does_not(
        bus: Bus) -> None:
    """A handler that never returns holds its fetch's messages (its working-acks keep them), and nothing is fetched
    meanwhile: the lag, read at each fetch, stays at the 0 of the last one while commands pile up behind it.
    ``shoal_consumer_fetch_age_seconds``, read when scraped, shows the stall: the time since that fetch, on the
    consumer's clock (here the test's, moved by hand), back near 0 once it fetches again and 0 once it stops. The
    clock is read once per fetch, never per message (the messages of one fetch all see the same count of reads).
    Before, only the lag was there, and it said 0 all along."""
    durable, now, reads = "stuck-consumer", [1000.0], [0]
    entered, release = asyncio.Event(), asyncio.Event()
    reads_seen: list[int] = []

    def clock() -> float:
        reads[0] += 1
        return now[0]

    async def handle(command: DatasetCommand, delivery: Delivery) -> None:
        reads_seen.append(reads[0])
        if command.id == "stuck":
            entered.set()
            await release.wait()

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, durable, subjects.DATASET_COMMANDS,
                        msgspec.json.Decoder(DatasetCommand), handle, max_event_bytes=1 << 20, clock=clock)
    await bus.publish(subjects.DATASET_RESYNC, DatasetResync(id="stuck", name="s"))
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(entered.wait(), 10)
        for index in range(5):
            await bus.publish(subjects.DATASET_RESYNC, DatasetResync(id=f"behind-{index}", name="s"))

        async def waiting() -> bool:
            return (await bus.js.consumer_info(subjects.STREAM_COMMANDS, durable)).num_pending == 5

        await eventually(waiting, 10, "five commands waiting behind the stuck one")
        assert value("shoal_consumer_lag_messages", consumer=durable) == 0, "the lag cannot see them"
        now[0] += 42.0
        assert value("shoal_consumer_fetch_age_seconds", consumer=durable) == 42.0

        release.set()

        async def caught_up() -> bool:
            return len(reads_seen) == 6 and value("shoal_consumer_fetch_age_seconds", consumer=durable) == 0

        await eventually(caught_up, 10, "every command handled and a fetch since")
        assert len(set(reads_seen[1:])) == 1, f"the clock was read between messages of one fetch: {reads_seen}"
    finally:
        release.set()
        consumer.stop()
        await asyncio.wait_for(task, 10)
    now[0] += 60.0
    assert value("shoal_consumer_fetch_age_seconds", consumer=durable) == 0, "a stopped consumer is not stuck"
