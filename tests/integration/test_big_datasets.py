"""Datasets of many files against the loader's limits, on a real nats-server: the run state (every part's progress,
one KV value, so one NATS message of at most 1 MiB) of a DataLoad of many small files.

The loader runs in-process with ``tests/integration/test_loader.py``'s ``ScriptedAgent`` standing in for the mount
processes. The 300,000-file run (10-15 s on 2 cores, most of it planning) runs in ``make soak`` only and records its
numbers for docs/reliability.md; ``make test`` runs the same path on 4,000 files and checks what each part costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import MESSAGE_LIMIT, Bus, Replay, kv_watch
from libs.events.dataset import ManifestEntry
from libs.events.operation import OperationRecord
from services.loader import domain
from tests.conftest import NatsServer
from tests.helpers import eventually
from tests.integration.test_loader import (
    BLOCK,
    agent,
    dataload,
    loader,
    operation,
    phase_of,
    put_dataset,
    put_runtime,
)
from tests.reliability import record_fault

NODE = ["node-a"]


def small_files(count: int) -> list[ManifestEntry]:
    """``count`` files of one block each, in folders of 1,000."""
    return [ManifestEntry(path=f"/x/d{i // 1000:04d}/f{i:06d}", mount=0, key=f"d{i // 1000:04d}/f{i:06d}",
                          size=BLOCK // 2, etag="e1", mtime=0.0) for i in range(count)]


async def complete(bus: Bus) -> OperationRecord | None:
    found = await operation(bus)
    return found if found is not None and found.status.phase == "Complete" else None


class RunStateSizes:
    """Every run state the loader writes for the DataLoad ``name``, from a KV watch: the largest one's size. Once a
    run ends its state drops the parts' progress, so the state read afterwards says nothing of what a run costs
    while it executes; the largest written says it."""

    def __init__(self, bus: Bus, name: str = "warm") -> None:
        self.bus = bus
        self.key = subjects.operation_key("DataLoad", "default", name)
        self.largest = 0
        self.revision = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunStateSizes:
        kv = await self.bus.kv(subjects.KV_OPERATION_RUNS)
        self._task = asyncio.create_task(self._follow(kv))
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, kv: KeyValue) -> None:
        async with contextlib.aclosing(kv_watch(kv, self._stop, keys=self.key)) as watched:
            async for entry in watched:
                if entry is not None and not isinstance(entry, Replay):
                    self.largest = max(self.largest, len(entry.value or b""))
                    self.revision = entry.revision or 0

    async def seen_all(self) -> int:
        """The largest size, once the watch has seen every write up to the value stored now."""
        kv = await self.bus.kv(subjects.KV_OPERATION_RUNS)

        async def caught_up() -> bool:
            return self.revision >= ((await kv.get(self.key)).revision or 0)

        await eventually(caught_up, what="the run states' watch caught up")
        return self.largest


async def test_a_part_of_small_files_costs_the_run_state_hundreds_of_bytes_not_a_number_per_file(
        bus: Bus, nats_server: NatsServer) -> None:
    """Two full parts (2,000 files each) done: each keeps which files are done as a bitmap, not a list of numbers
    (11 KB a part, so a run of ~230k small files outgrew its 1 MiB and its progress was dead-lettered)."""
    await put_dataset(bus, small_files(4000))
    await put_runtime(bus, NODE)
    async with loader(nats_server), agent(bus, NODE), RunStateSizes(bus) as sizes:
        await bus.publish(subjects.DATALOAD_APPLY, dataload())
        done = await phase_of(bus, "Complete")
        largest = await sizes.seen_all()
    assert (done.status.progress.files_done, done.status.progress.files_total) == (4000, 4000)
    assert 0 < largest < 2 * 1024, largest


async def test_a_run_whose_progress_could_outgrow_its_state_fails_at_planning_saying_how_to_split_it(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any part goes out: a state that stops fitting mid-run can no longer be saved, and the run
    would stay Executing for ever. The budget is made small here; the real one holds ~1,300 full parts."""
    monkeypatch.setattr(domain, "RUN_STATE_BYTES", 1024)
    await put_dataset(bus, small_files(4000))
    await put_runtime(bus, NODE)
    async with loader(nats_server), agent(bus, NODE) as scripted:
        await bus.publish(subjects.DATALOAD_APPLY, dataload())
        failed = await phase_of(bus, "Failed")
    message = failed.status.message
    assert "too large for one operation: 2 parts (4,000 blocks of 4,000 files)" in message, failed.status
    assert "spec.target" in message
    assert not scripted.seen  # no part was handed out


@pytest.mark.soak("a DataLoad of 300,000 files: 10-15 s of planning and progress on 2 cores")
@pytest.mark.timeout(600)
async def test_a_dataload_of_300k_small_files_completes_within_one_kv_value(bus: Bus, nats_server: NatsServer) -> None:
    count = 300_000
    await put_dataset(bus, small_files(count))
    await put_runtime(bus, NODE)
    started = time.monotonic()
    async with loader(nats_server), agent(bus, NODE), RunStateSizes(bus) as sizes:
        await bus.publish(subjects.DATALOAD_APPLY, dataload())
        done = await eventually(lambda: complete(bus), timeout=300, what="the DataLoad Complete")
        seconds = time.monotonic() - started
        size = await sizes.seen_all()
    assert (done.status.progress.files_done, done.status.progress.files_total) == (count, count)
    assert 0 < size < MESSAGE_LIMIT // 8, size
    record_fault(f"a DataLoad of {count:,} one-block files (150 parts) on one node", f"Complete in {seconds:.0f} s; "
                 f"the run state stays one KV value of {size // 1024} KiB (1 MiB at most)", None, area="load")
