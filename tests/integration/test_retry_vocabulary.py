"""One retry vocabulary, on a real nats-server: the reconciler honours ``RetryLater``, ``Conflict`` and
``Permanent``; the dataset sync raises ``RetryLater`` for an unreachable endpoint once the status says so; core
NATS goes through ``Bus.publish_core`` and ``Bus.subscribe`` (handlers never touch ``bus.nc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
import nats.errors
import pytest
from nats.js import api as js_api
from nats.js.kv import KeyValue

from libs import reconcile, subjects
from libs.bus import WATCH_HEARTBEAT_SECONDS, Bus, Conflict, Permanent, RetryLater, kv_load, kv_save, kv_watch
from libs.events.agent import InventoryRequest
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.reconcile import Reconciler
from libs.ufs.base import EndpointUnreachable, Location, ObjectInfo, ObjectStore
from services.dataset.handlers import DatasetHandlers
from tests.helpers import dataset_record, eventually, make_settings

# How long a wait for the reconciler may take: it includes starting its KV watch, which under `make test` (4 workers
# on 2 cores) took seconds. What a test asserts of the timing (a retry's delay, a call at once, a 60 s delay not
# waited out) is checked on the calls' own times, or is far beyond this bound.
WAIT = 15.0


class Scripted:
    """A reconcile whose outcome per key and call is scripted (None: return); records when each call came."""

    def __init__(self, script: dict[str, list[Exception | None]]) -> None:
        self.script = script
        self.calls: dict[str, list[float]] = {}

    async def __call__(self, key: str) -> None:
        calls = self.calls.setdefault(key, [])
        calls.append(time.monotonic())
        outcomes = self.script.get(key, [])
        outcome = outcomes[len(calls) - 1] if len(calls) <= len(outcomes) else None
        if outcome is not None:
            raise outcome

    def count(self, key: str) -> int:
        return len(self.calls.get(key, []))

    def reached(self, key: str, calls: int) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return self.count(key) == calls

        return probe

    def gaps(self, key: str) -> list[float]:
        times = self.calls.get(key, [])
        return [later - earlier for earlier, later in itertools.pairwise(times)]


@asynccontextmanager
async def reconciling(bus: Bus, reconcile_key: Callable[[str], Awaitable[float | None]]) -> AsyncIterator[KeyValue]:
    kv = await bus.js.create_key_value(js_api.KeyValueConfig(bucket="test_reconcile"))
    reconciler = Reconciler(kv, reconcile_key)
    task = asyncio.create_task(reconciler.run())
    try:
        yield kv
    finally:
        reconciler.stop()
        await asyncio.wait_for(task, 10)


async def test_retry_later_runs_the_key_again_after_its_delay(bus: Bus) -> None:
    script = Scripted({"a": [RetryLater("not yet", 0.2), RetryLater("still not", 0.2)]})
    async with reconciling(bus, script) as kv:
        await kv.put("a", b"1")
        await eventually(script.reached("a", 3), timeout=WAIT, what="three calls")
    # After the delay asked, and well before the 5 s that an unexpected error waits.
    assert all(0.2 <= gap < reconcile.ERROR_RETRY_SECONDS for gap in script.gaps("a")), script.gaps("a")


async def test_a_returned_number_runs_the_key_again_after_it_without_a_change(bus: Bus) -> None:
    # A schedule (a dataset's autoSync period), not a failure: the key runs again after the seconds returned.
    returned = iter([0.2, 0.2])
    calls: list[float] = []

    async def scheduled(key: str) -> float | None:
        calls.append(time.monotonic())
        return next(returned, None)

    async with reconciling(bus, scheduled) as kv:
        await kv.put("s", b"1")

        async def thrice() -> bool:
            return len(calls) == 3

        await eventually(thrice, timeout=WAIT, what="three calls from one change")
    assert all(later - earlier >= 0.2 for earlier, later in itertools.pairwise(calls)), calls


async def test_a_change_cuts_short_the_wait_of_a_key_retried_later(bus: Bus) -> None:
    # An unreachable endpoint waits 15 s; a resync (a change of the key) must not wait that out.
    script = Scripted({"a": [RetryLater("endpoint unreachable", 60.0)]})
    async with reconciling(bus, script) as kv:
        await kv.put("a", b"1")
        await eventually(script.reached("a", 1), timeout=WAIT, what="the first call")
        await kv.put("a", b"2")
        await eventually(script.reached("a", 2), timeout=WAIT, what="a second call long before the 60 s delay")


async def test_conflict_runs_the_key_again_at_once(bus: Bus) -> None:
    script = Scripted({"c": [Conflict("lost a compare-and-set"), Conflict("again")]})
    async with reconciling(bus, script) as kv:
        await kv.put("c", b"1")
        await eventually(script.reached("c", 3), timeout=WAIT, what="three calls")
    assert max(script.gaps("c")) < 1.0


async def test_a_key_that_keeps_conflicting_backs_off_and_a_run_that_works_resets_the_count(bus: Bus) -> None:
    # Three conflicts in a row run again at once; the fourth waits the redelivery schedule's 0.5 s. Then it works
    # (returning 0.05: run again soon) and the next conflicts start from "at once" again.
    outcomes: list[Exception | float | None] = [Conflict("1"), Conflict("2"), Conflict("3"), Conflict("4"), 0.05,
                                                Conflict("5"), None]
    calls: list[float] = []

    async def contended(key: str) -> float | None:
        calls.append(time.monotonic())
        outcome = outcomes[len(calls) - 1] if len(calls) <= len(outcomes) else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async with reconciling(bus, contended) as kv:
        await kv.put("hot", b"1")

        async def all_ran() -> bool:
            return len(calls) == len(outcomes)

        await eventually(all_ran, timeout=WAIT, what="every scripted call")
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert max(gaps[:3]) < 0.4 and gaps[3] >= 0.45, gaps  # the 4th conflict waited
    assert gaps[5] < 0.9, gaps  # after a run that worked, at once (not counting on: that would be 1 s)


async def test_a_nats_error_runs_the_key_again_from_half_a_second(bus: Bus) -> None:
    # A request that got no answer (a cluster electing a leader): retried on the redelivery schedule (0.5 s, 1 s),
    # not after the 5 s of an unexpected error.
    script = Scripted({"n": [nats.errors.TimeoutError(), nats.errors.NoRespondersError()]})
    async with reconciling(bus, script) as kv:
        await kv.put("n", b"1")
        await eventually(script.reached("n", 3), timeout=WAIT, what="three calls")
    assert all(0.4 <= gap < reconcile.ERROR_RETRY_SECONDS for gap in script.gaps("n")), script.gaps("n")


async def test_a_watch_asks_for_a_heartbeat_every_second(bus: Bus) -> None:
    # nats-py restarts a lost ordered consumer after two missed heartbeats: 1 s each here (its default is 5 s).
    kv = await bus.js.create_key_value(js_api.KeyValueConfig(bucket="test_watch_heartbeat"))
    await kv.put("k", b"1")
    stopping = asyncio.Event()
    async with contextlib.aclosing(kv_watch(kv, stopping)) as entries:
        first = await anext(entries)
        assert isinstance(first, KeyValue.Entry) and first.key == "k"
        consumers = await bus.js.consumers_info("KV_test_watch_heartbeat")
        assert WATCH_HEARTBEAT_SECONDS == 1.0
        assert [c.config.idle_heartbeat for c in consumers] == [1.0]
        stopping.set()


async def test_permanent_stops_until_the_key_changes_again(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    # Were Permanent treated as an unexpected error, it would come back within 0.05 s.
    monkeypatch.setattr(reconcile, "ERROR_RETRY_SECONDS", 0.05)
    ticks = 10
    script = Scripted({"p": [Permanent("the spec can never work")],
                       "tick": [RetryLater("tick", 0.05) for _ in range(ticks)]})
    async with reconciling(bus, script) as kv:
        await kv.put("p", b"1")
        await eventually(script.reached("p", 1), timeout=WAIT, what="the first call")
        await kv.put("tick", b"1")
        # A clock made of another key: ten retries of 0.05 s each after the permanent failure.
        await eventually(script.reached("tick", ticks + 1), timeout=WAIT, what="ticks")
        assert script.count("p") == 1
        await kv.put("p", b"2")  # level-triggered: a change runs it again, and now it succeeds
        await eventually(script.reached("p", 2), timeout=WAIT, what="the second call")


async def test_unreachable_endpoint_is_in_the_status_and_the_sync_retries_later(bus: Bus, nats_server,
                                                                                 refused_port: int) -> None:
    closed = f"http://127.0.0.1:{refused_port}"
    settings = make_settings(nats_server.url, closed, "k", "s")
    handlers = DatasetHandlers(bus, settings)
    record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="offline"),
                                           spec=DatasetSpec(mounts=[Mount(mount_point="s3://some-bucket")])),
                           generation=1)
    key = subjects.resource_key("default", "offline")
    await kv_save(await bus.kv(subjects.KV_DATASETS), key, record, None)
    with pytest.raises(RetryLater) as caught:
        await handlers.sync(key)
    assert caught.value.delay == settings.service.sync_retry_seconds
    assert "cannot reach" in caught.value.reason
    stored = await dataset_record(bus, "offline")
    assert stored is not None and stored.status.phase == "Failed"
    assert stored.status.message == caught.value.reason and closed in stored.status.message


class Unreachable:
    """A store that is never reachable; counts how often the sync opened it (each opening lists it once)."""

    def __init__(self) -> None:
        self.opened = 0

    def __call__(self, location: Location) -> ObjectStore:
        self.opened += 1
        return self  # type: ignore[return-value]

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        raise EndpointUnreachable("cannot reach S3 endpoint http://127.0.0.1:1: connection refused")
        yield  # an async generator, like a real store's listing

    async def close(self) -> None:
        pass


async def test_a_pending_retry_waits_without_listing_and_a_resync_does_not_wait(bus: Bus, nats_server) -> None:
    settings = make_settings(nats_server.url, "http://127.0.0.1:1", "k", "s", sync_retry_seconds=15.0)
    clock = [1_700_000_000.0]
    store = Unreachable()
    handlers = DatasetHandlers(bus, settings, clock=lambda: clock[0], opener=store)
    kv = await bus.kv(subjects.KV_DATASETS)
    key = subjects.resource_key("default", "blip")
    await kv_save(kv, key, DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="blip"), spec=DatasetSpec(
        mounts=[Mount(mount_point="s3://some-bucket")])), generation=1), None)
    with pytest.raises(RetryLater) as caught:
        await handlers.sync(key)
    assert (store.opened, caught.value.delay) == (1, 15.0)
    # Run again at once (the reconciler does, woken by the status write or any other write): it waits out
    # what is left of the delay and does not list the store again.
    clock[0] += 5
    with pytest.raises(RetryLater) as caught:
        await handlers.sync(key)
    assert (store.opened, caught.value.delay) == (1, 10.0)
    clock[0] += 10  # due: listed again (still unreachable, so another full delay)
    with pytest.raises(RetryLater) as caught:
        await handlers.sync(key)
    assert (store.opened, caught.value.delay) == (2, 15.0)
    # A resync does not wait for the retry.
    record, revision = await kv_load(kv, key, DatasetRecord)
    assert record is not None
    await kv_save(kv, key, msgspec.structs.replace(record, sync_requests=record.sync_requests + 1), revision)
    with pytest.raises(RetryLater):
        await handlers.sync(key)
    assert store.opened == 3


async def test_core_nats_events_go_through_the_bus_decoded(bus: Bus) -> None:
    received: list[InventoryRequest] = []

    async def on_request(request: InventoryRequest) -> None:
        received.append(request)

    async def arrived() -> list[InventoryRequest]:
        return received

    subscription = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                       on_request)
    try:
        await bus.nc.publish(subjects.INVENTORY_REQUEST, b"{not json")  # skipped, the subscription lives on
        request = InventoryRequest(node="n1", dataset=ObjectRef(name="d"))
        await bus.publish_core(subjects.INVENTORY_REQUEST, request)
        await eventually(arrived, timeout=WAIT, what="the request")
        assert received == [request]
    finally:
        await subscription.unsubscribe()


async def test_a_key_deleted_while_it_waits_for_its_next_run_is_let_go_at_once(bus: Bus) -> None:
    """A dataset's autoSync period may be hours: a key deleted meanwhile must not keep its waiting reconcile (a
    task, its events) for that long, or memory grows with every dataset created and deleted within a period."""
    calls: list[str] = []

    async def scheduled(key: str) -> float | None:
        calls.append(key)
        return 3600.0

    def waiting() -> set[str]:
        return {task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith("reconcile ")}

    async with reconciling(bus, scheduled) as kv:
        for key in ("gone", "kept"):
            await kv.put(key, b"1")

        async def both_waiting() -> bool:
            return waiting() == {"reconcile gone", "reconcile kept"}

        await eventually(both_waiting, timeout=WAIT, what="both keys waiting for their next run")
        await kv.delete("gone")

        async def let_go() -> bool:
            return waiting() == {"reconcile kept"}

        await eventually(let_go, timeout=WAIT, what="the deleted key's reconcile ended")
