"""The bus on a real nats-server: KV compare-and-set between two writers, and services that outlive a restart
of the nats-server (same port, same JetStream store directory)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus, Conflict, connect, kv_delete, kv_keys, kv_load, kv_save
from libs.config import NatsSettings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from services.dataset import app as dataset_app
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, make_settings, running
from tests.metric_values import Snapshot


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
