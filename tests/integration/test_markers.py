"""Old delete markers purged (``libs.markers``) on a real nats-server: those older than the cutoff go, newer ones and
live values stay, a key written again after its marker was read keeps its value, one of two replicas sweeps (the
other reads nothing), and an operation applied again after its marker went numbers its runs afresh and runs.
"""

from __future__ import annotations

import base64
import datetime
import io
import time
from typing import cast

import pytest
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from libs import bus as bus_module
from libs import markers as markers_module
from libs import natsauth, subjects
from libs.bus import Bus, initial_entries, kv_delete, kv_load_deleted
from libs.deletion import deleted_at, deletion_note
from libs.markers import (
    DATASET_SWEEP,
    LOADER_SWEEP,
    RETENTION_SECONDS,
    Marker,
    MarkerSweeper,
    _purge,
    is_dataset_manifest,
    is_loader_object,
    purge_deleted_objects,
    purge_kv_markers,
)
from libs.members import Members
from tests.conftest import NatsServer
from tests.helpers import eventually
from tests.integration.test_dataset_replicas import member, sees
from tests.integration.test_loader import (
    BLOCK,
    NODES,
    agent,
    complete_then_delete,
    dataload,
    files,
    loader,
    phase_of,
    publish,
    put_dataset,
    put_runtime,
)

BUCKET = subjects.KV_OPERATIONS


async def history(kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    """Every entry the bucket keeps of ``key`` (none: [])."""
    watcher = await kv.watch(key, include_history=True)
    try:
        return [entry async for entry in initial_entries(watcher, 5)]
    finally:
        await watcher.stop()


async def deleted(kv: KeyValue, key: str, sequence: int) -> KeyValue.Entry:
    """Write ``key`` twice, delete it with a note; its marker."""
    await kv.put(key, b'{"v":1}')
    await kv.put(key, b'{"v":2}')
    await kv_delete(kv, key, None, note=deletion_note(sequence))
    return (await history(kv, key))[-1]


def between(older: KeyValue.Entry, newer: KeyValue.Entry) -> datetime.datetime:
    """An instant after ``older``'s message and before ``newer``'s (nats-py types their times as ints)."""
    first, last = cast(datetime.datetime, older.created), cast(datetime.datetime, newer.created)
    assert first < last
    return first + (last - first) / 2


async def test_markers_older_than_the_cutoff_go_with_their_history_newer_ones_and_values_stay(bus: Bus) -> None:
    kv = await bus.kv(BUCKET)
    old = await deleted(kv, "dataload.default.old", 11)
    await kv.put("dataload.default.live", b'{"v":1}')
    new = await deleted(kv, "dataload.default.new", 12)

    purged = await purge_kv_markers(bus, BUCKET, between(old, new))

    assert purged == ["dataload.default.old"]
    assert await history(kv, "dataload.default.old") == []  # the marker and the revisions before it
    # A purged key reads as one that never held anything: no note, no revision, and a plain create writes it.
    assert await kv_load_deleted(kv, "dataload.default.old", dict) == (None, None, b"")
    _, revision, note = await kv_load_deleted(kv, "dataload.default.new", dict)
    assert revision == new.revision and deleted_at(note) == 12  # the newer marker, note and all
    assert len(await history(kv, "dataload.default.new")) == 3
    assert [e.value for e in await history(kv, "dataload.default.live")] == [b'{"v":1}']
    await kv.create("dataload.default.old", b'{"v":3}')


async def test_one_of_two_replicas_sweeps_and_the_other_reads_nothing(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two dataset-service replicas' sweepers (their ``Members`` as owner): the one that owns ``SWEEP_KEY`` reads the
    buckets and purges the old marker, the other reads nothing (every replica read every key of the buckets, every
    10 minutes, before). Nor does a replica sweep before it knows the live replicas."""
    kv = await bus.kv(subjects.KV_DATASETS)
    await kv.put("default.gone", b"{}")
    await kv_delete(kv, "default.gone", None)
    reads: list[str] = []
    old_markers = markers_module._old_markers

    async def counted(kv: KeyValue, *args: object, **kwargs: object) -> list[Marker]:
        reads.append(kv._name)
        return await old_markers(kv, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(markers_module, "_old_markers", counted)
    week_later = time.time() + RETENTION_SECONDS + 60  # the marker is old by then

    unready = Members(await bus.kv(subjects.KV_MEMBERS), "dataset", "c")  # not run: its replicas unknown
    assert await MarkerSweeper(bus, DATASET_SWEEP, clock=lambda: week_later, owner=unready).tick() is None
    assert reads == []
    async with member(bus, "a") as a, member(bus, "b") as b:
        await sees(a, "a", "b")
        await sees(b, "a", "b")
        passes = {}
        for replica in (a, b):
            before = len(reads)
            passes[replica.replica] = (await MarkerSweeper(bus, DATASET_SWEEP, clock=lambda: week_later,
                                                           owner=replica).tick(), len(reads) - before)
        sweeper = "a" if a.owns(markers_module.SWEEP_KEY) else "b"
        assert b.owns(markers_module.SWEEP_KEY) == (sweeper == "b")
    other = "b" if sweeper == "a" else "a"
    assert passes[sweeper][0] == {subjects.KV_DATASETS: 1} and passes[sweeper][1] > 0, passes
    assert passes[other] == (None, 0), passes


async def test_a_key_written_again_after_its_marker_was_read_keeps_its_new_value(bus: Bus) -> None:
    """Another replica's sweep, or an apply, between reading a marker and purging it: the purge stops at the marker's
    sequence, so what came after it stays; a second purge of the same marker removes nothing more."""
    kv = await bus.kv(BUCKET)
    marker = await deleted(kv, "dataload.default.again", 7)
    revision = await kv.create("dataload.default.again", b'{"v":3}')
    stale = Marker(f"{kv._pre}dataload.default.again", marker.revision or 0, "dataload.default.again")

    for _ in range(2):  # two replicas sweeping the same marker
        await _purge(bus, natsauth.kv_stream(BUCKET), [stale])

    entries = await history(kv, "dataload.default.again")
    assert [(e.revision, e.value) for e in entries] == [(revision, b'{"v":3}')]
    # And a sweep now sees a live value, not a marker.
    assert await purge_kv_markers(bus, BUCKET, datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)) == []


async def test_a_pass_purges_at_most_its_limit_the_rest_at_the_next(bus: Bus) -> None:
    kv = await bus.kv(BUCKET)
    for i in range(5):
        await deleted(kv, f"dataload.default.n{i}", i + 1)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    first = await purge_kv_markers(bus, BUCKET, later, limit=3)
    second = await purge_kv_markers(bus, BUCKET, later, limit=3)
    assert len(first) == 3 and len(second) == 2 and set(first) | set(second) == {f"dataload.default.n{i}"
                                                                                 for i in range(5)}
    assert (await kv.status()).values == 0


async def test_deleted_objects_go_by_owner_and_age_live_ones_stay(bus: Bus) -> None:
    store = await bus.manifests()
    stream = natsauth.object_stream(subjects.OBJ_MANIFESTS)
    manifest, plan, kept, live = ("default.data.i1-1-0", subjects.loader_plan("dataload.default.warm"),
                                  "default.data.i1-2-0", "default.data.i1-3-0")
    for name in (manifest, plan, kept, live):
        await store.put(name, io.BytesIO(b"entries"))
    await store.delete(manifest)
    await store.delete(plan)
    cutoff = datetime.datetime.now(datetime.UTC)
    await store.delete(kept)  # deleted after the cutoff (message times are the server's, past this instant)

    def meta(name: str) -> str:
        return f"$O.{subjects.OBJ_MANIFESTS}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    assert await purge_deleted_objects(bus, cutoff, is_dataset_manifest) == [manifest]
    assert await purge_deleted_objects(bus, cutoff, is_loader_object) == [plan]
    for name in (manifest, plan):
        with pytest.raises(NotFoundError):
            await bus.js.get_last_msg(stream, meta(name))
    assert (await bus.js.get_last_msg(stream, meta(kept))).data  # deleted too recently: its marker stays
    info = await store.get_info(live)
    assert not info.deleted and (await store.get(live)).data == b"entries"


async def test_an_operation_applied_again_after_its_marker_went_numbers_its_runs_from_one_and_runs(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's own sweep removes the marker that carried the last run's number (as it does a week on); the
    name applied again starts at run 1 and completes. A week on nothing of the old runs is left: their message ids
    are long out of JetStream's duplicate window (two minutes; half a second here, waited out with a probe), their
    parts out of the task streams (a day), and out of the agents' memory of cancelled runs (a day)."""
    monkeypatch.setattr(bus_module, "DUPLICATE_WINDOW_SECONDS", 0.5)
    await bus.provision()  # the streams take the short window; the loader makes the node's with it

    async def window_passed() -> bool:
        # A probe sent after the first run's parts: once JetStream takes it again, their ids are forgotten too.
        ack = await bus.js.publish(f"{subjects.COMMAND_PREFIX}probe", b"", headers={"Nats-Msg-Id": "probe"})
        return not ack.duplicate

    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await complete_then_delete(bus)
        await bus.js.publish(f"{subjects.COMMAND_PREFIX}probe", b"", headers={"Nats-Msg-Id": "probe"})
        key = subjects.operation_key("DataLoad", "default", "warm")
        kv = await bus.kv(subjects.KV_OPERATIONS)
        assert (await history(kv, key))[-1].operation == "DEL"
        # A week on, as the service's sweeper sees it: every marker is older than its retention.
        await MarkerSweeper(bus, LOADER_SWEEP, clock=lambda: time.time() + RETENTION_SECONDS + 60).tick()
        assert await history(kv, key) == []
        scripted.tasks.clear()
        await eventually(window_passed, what="the duplicate window passed")
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        again = await phase_of(bus, "Complete", runs=1)
    assert {task.run for task in scripted.tasks.values()} == {"dataload.default.warm.1"}
    assert again.status.progress.bytes_done == BLOCK
