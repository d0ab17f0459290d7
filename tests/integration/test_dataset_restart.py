"""What a restart of the dataset service lists (real nats-server, local folders, the service on a test clock):
only the datasets whose next listing is due. The watch replays every record at start, and the due time comes from
the record (``lastSyncTime``) and from when the dataset was last listed; an autoSync listing that finds nothing
new writes nothing to the record, so that listing time must outlive the process (or the replica that owned the
dataset), or every dataset unchanged for longer than a period is listed again at every restart or hand-over.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from libs import subjects
from libs.bus import Bus, Delivery
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from libs.ufs import open_store
from libs.ufs.base import Location, ObjectStore
from services.dataset import app as dataset_app
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, make_settings, running

PERIOD = 60.0
DATASETS = 20


class Listings:
    """Every store the service opens to list a mount (one per sync of a one-mount dataset), counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, location: Location) -> ObjectStore:
        self.count += 1
        return open_store(location)


async def test_a_restart_lists_only_the_datasets_that_are_due(nats_server: NatsServer, bus: Bus, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(nats_server.url)
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service, autosync_seconds=PERIOD))
    now = [1_700_000_000.0]
    listings = Listings()
    names = [f"d{i}" for i in range(DATASETS)]
    keys = {subjects.resource_key("default", name) for name in names}
    looked_at: set[str] = set()  # the keys whose sync ran to its end since the service (re)started
    real_sync = DatasetHandlers.sync

    async def sync(self: DatasetHandlers, key: str) -> float | None:
        try:
            return await real_sync(self, key)
        finally:
            looked_at.add(key)

    monkeypatch.setattr(DatasetHandlers, "sync", sync)

    def service(settings: Settings) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        return lambda stop: dataset_app.run(settings, stop, clock=lambda: now[0], opener=listings)

    async def last_sync_times() -> dict[str, str]:
        records = {name: await dataset_record(bus, name) for name in names}
        return {name: record.status.last_sync_time if record else "" for name, record in records.items()}

    async def every_key_looked_at() -> bool:
        return keys <= looked_at

    await bus.provision()
    async with running(service(settings)):
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            (folder / "a.txt").write_bytes(name.encode())
            dataset = Dataset(metadata=ObjectMeta(name=name),
                              spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))

        async def all_synced() -> bool:
            records = [await dataset_record(bus, name) for name in names]
            return all(r is not None and r.status.synced_generation == 1 for r in records)

        await eventually(all_synced, 30, "the datasets synced")
        await eventually(every_key_looked_at, 30, "each dataset's first sync done")
    assert listings.count == DATASETS
    synced_at = await last_sync_times()

    # Restarted 10 s later: nothing is due (lastSyncTime is 10 s old), nothing is listed.
    now[0] += 10
    looked_at.clear()
    async with running(service(settings)):
        await eventually(every_key_looked_at, 30, "each dataset looked at after the restart")
    assert listings.count == DATASETS

    # Restarted a period later: every dataset is due and listed once; each listing finds nothing new, so the
    # records (their lastSyncTime) stay as they were.
    now[0] += PERIOD
    looked_at.clear()
    async with running(service(settings)):
        await eventually(every_key_looked_at, 30, "each due dataset listed")
    assert listings.count == 2 * DATASETS
    assert await last_sync_times() == synced_at

    # Restarted 10 s after those listings: none is due, though each record's lastSyncTime is a period old.
    now[0] += 10
    looked_at.clear()
    async with running(service(settings)):
        await eventually(every_key_looked_at, 30, "each dataset looked at after the second restart")
    assert listings.count == 2 * DATASETS, "datasets listed 10 s ago were listed again after a restart"


async def test_a_dataset_handed_over_is_listed_when_due_by_its_last_listing_whoever_listed_it(
        nats_server: NatsServer, bus: Bus, tmp_path: Path) -> None:
    """Replicas a and b (their handlers, one clock) take a dataset in turns: each listing that finds nothing new is
    counted by the next owner, also by a replica that owned it before and remembers an older listing."""
    await bus.provision()
    settings = make_settings(nats_server.url)
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service, autosync_seconds=PERIOD))
    now = [1_700_000_000.0]
    listings = Listings()
    a, b = (DatasetHandlers(bus, settings, clock=lambda: now[0], opener=listings) for _ in range(2))
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"a")
    dataset = Dataset(metadata=ObjectMeta(name="ds"), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))
    await a.apply(DatasetApply(dataset=dataset), Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1,
                                                          stream_sequence=1))
    key = subjects.resource_key("default", "ds")
    assert await a.sync(key) == PERIOD and listings.count == 1  # the first listing, by a

    now[0] += PERIOD
    assert await a.sync(key) == PERIOD and listings.count == 2  # due: listed by a, nothing new, nothing written
    now[0] += 10
    assert await b.sync(key) == PERIOD - 10 and listings.count == 2  # handed to b: not due for 50 s

    now[0] += PERIOD - 10
    assert await b.sync(key) == PERIOD and listings.count == 3  # due: listed by b
    now[0] += 10
    assert await a.sync(key) == PERIOD - 10 and listings.count == 3  # back to a, which remembers its own older one
