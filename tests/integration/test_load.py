"""A burst of dataset applies at small scale (the load bench's driver, ``tests/bench/load.py``, against the dataset
and runtime services in this process and a real nats-server), while simulated agents heartbeat and publish
inventory: every dataset reaches its synced status fact (Bound where its runtime is Ready), every command is
accepted exactly once, every record ends at generation 1, and each dataset is listed exactly once. The lanes of the
consumer loop keep each dataset's messages in order while handling different datasets at once. No timing asserts:
speed is the bench's (``SHOAL_BENCH=load make bench``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from libs import subjects
from libs.bus import Bus, Consumer, Delivery, connect
from libs.config import NatsSettings, Settings
from libs.events.agent import InventoryDelta
from libs.events.common import ObjectRef
from libs.events.dataset import DatasetDelete, DatasetResync
from libs.events.runtime import RuntimeDeleted
from services.dataset import app as dataset_app
from services.dataset.lanes import UNNAMED, dataset_lane
from services.runtime import app as runtime_app
from tests.bench.load import Load, dataset_apply, write_folders
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings, running
from tests.metric_values import Snapshot

BURST = 100
RUNTIMES = 10
AGENTS = 10


@pytest.mark.timeout(120)
async def test_a_burst_of_applies_syncs_every_dataset_once(nats_server: NatsServer, bus: Bus,
                                                           tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_folders(source, 20, 2)
    settings: Settings = make_settings(nats_server.url, local_roots=[str(source)], log_level="warning")
    metrics = Snapshot()
    facts = await connect(NatsSettings(urls=[nats_server.url]), "load-facts")
    load = Load(bus, facts, f"local://{source}", folders=20, agents=AGENTS)
    names = [f"burst-{i:05d}" for i in range(BURST)]
    try:
        async with running(lambda stop: dataset_app.run(settings, stop),
                           lambda stop: runtime_app.run(settings, stop)):
            await load.start()
            await load.runtimes(names[:RUNTIMES], 60)
            await load.burst(names)
            await load.tracker.wait_all(names, 90, "burst")
            # Inventory of the bound datasets keeps flowing; the records must still be right once it has.
            await eventually(lambda: _inventory_folded(bus, names[:RUNTIMES]), 30, "inventory folded")
            assert await load.verify(names) == []
            listings = metrics.moved("shoal_dataset_sync_duration_seconds_count", outcome="ok")
            assert listings == BURST, f"{listings} listings for {BURST} datasets"
    finally:
        await load.stop()
        await facts.close()
    assert load.agents.beats > 0 and load.agents.inventories > 0


async def _inventory_folded(bus: Bus, names: list[str]) -> bool:
    kv = await bus.kv(subjects.KV_NODE_CACHE)
    for name in names:
        try:
            await kv.get(subjects.resource_key("load", name))
        except Exception:
            return False
    return True


def _msg(event: msgspec.Struct) -> Msg:
    return Msg(_client=None, subject="x", data=msgspec.json.encode(event))  # type: ignore[arg-type]


def test_every_consumed_message_names_its_dataset_lane(tmp_path: Path) -> None:
    apply = dataset_apply("one", f"local://{tmp_path}")
    assert dataset_lane(_msg(apply)) == "load.one"
    assert dataset_lane(_msg(DatasetDelete(name="two", namespace="ns"))) == "ns.two"
    assert dataset_lane(_msg(DatasetResync(name="three"))) == "default.three"
    assert dataset_lane(_msg(RuntimeDeleted(causation_id="c", name="four", namespace="ns"))) == "ns.four"
    delta = InventoryDelta(node="n", dataset=ObjectRef(name="five", namespace="ns"), incarnation="i", seq=1)
    assert dataset_lane(_msg(delta)) == "ns.five"
    assert dataset_lane(Msg(_client=None, subject="x", data=b"not json")) == UNNAMED  # type: ignore[arg-type]
    assert dataset_lane(Msg(_client=None, subject="x", data=b"{}")) == UNNAMED  # type: ignore[arg-type]
    # A name that is not UTF-8 (found by the fuzzer at 10,000 examples: it stopped the dataset service's consumer).
    not_utf8 = b'{"dataset": {"metadata": {"name": "\x8e"}}}'
    assert dataset_lane(Msg(_client=None, subject="x", data=not_utf8)) == UNNAMED  # type: ignore[arg-type]


@pytest.mark.timeout(60)
async def test_lanes_keep_each_datasets_order_and_run_datasets_at_once(bus: Bus) -> None:
    keys, per_key = 6, 8
    seen: dict[str, list[int]] = defaultdict(list)
    in_flight = most = 0
    done, overlapped = asyncio.Event(), asyncio.Event()
    first = True

    async def handle(event: DatasetResync, delivery: Delivery) -> None:
        nonlocal in_flight, most, first
        in_flight += 1
        most = max(most, in_flight)
        if in_flight > 1:
            overlapped.set()
        if first:
            # The first handler waits for another dataset's to come in while it runs (as while it awaits NATS), rather
            # than yielding a fixed number of times: that the other lane is scheduled by then is the consumer's
            # detail. Lanes one after another never come: then "most" says so below.
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(overlapped.wait(), 10)
        await asyncio.sleep(0)  # a handler awaits NATS: the other lanes run meanwhile
        seen[event.name].append(int(event.id.rsplit("-", 1)[1]))
        in_flight -= 1
        if sum(len(v) for v in seen.values()) == keys * per_key:
            done.set()

    for number in range(per_key):
        for key in range(keys):
            await bus.publish(subjects.DATASET_RESYNC, DatasetResync(id=f"k{key}-{number}", name=f"k{key}"))
    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "lanes-test", subjects.DATASET_COMMANDS,
                        msgspec.json.Decoder(DatasetResync), handle, max_event_bytes=1 << 20, batch=64,
                        lane_of=dataset_lane)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        consumer.stop()
        await task
    assert all(order == list(range(per_key)) for order in seen.values()), dict(seen)
    assert most > 1, "different datasets were handled one after another"
