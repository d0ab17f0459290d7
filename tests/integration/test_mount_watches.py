"""The watches of a mount process (``MountedDataset``) on a real nats-server: a watch that cannot start (its KV
bucket not there yet: the server was reset, or NATS refuses it for a while) is started again with backoff, as the
mount's other loops retry, and follows its record once the bucket is there. Before, the runtime watch died at its
first failure and the mount never learnt a change of its ring of block owners again."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import msgspec
import pytest

from libs import subjects
from libs.blocks import BlockId
from libs.bus import Bus, connect
from libs.config import NatsSettings
from libs.events.common import ObjectMeta
from libs.events.runtime import CacheWorker, Level, Runtime, RuntimeRecord, RuntimeSpec, RuntimeStatus, TieredStore
from services.agent import mountd
from services.agent.mountd import MountedDataset
from services.agent.reader import BlockRouter
from tests.conftest import NatsServer
from tests.helpers import cancel_and_wait, eventually, json_lines, json_logs, make_settings, unsynced_dataset

NAME = "watched"
KEY = subjects.resource_key("default", NAME)


class NoPeers:
    """A peer client the ring is kept for; no read asks it here."""

    async def get_block(self, url: str, block: BlockId, length: int, block_size: int) -> bytes:
        raise AssertionError("no read in these tests")


async def failed_once(watch: str, logs: io.StringIO, task: asyncio.Task[None]) -> None:
    """Until the watch's first attempt ran into the missing bucket (said in the log), or the task ended."""
    async def probe() -> bool:
        return task.done() or any(line.get("event", "").startswith("watch failed") and line.get("watch") == watch
                                  for line in json_lines(logs.getvalue()))

    await eventually(probe, 15, f"the {watch}'s first attempt")
    assert not task.done(), f"the {watch} ended: {task.exception() if not task.cancelled() else 'cancelled'}"


def runtime_with(workers: list[CacheWorker]) -> RuntimeRecord:
    return RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
        tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Mi")]))), generation=1,
        status=RuntimeStatus(workers=workers))


@pytest.fixture
async def bare_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A connection to a server nothing was provisioned on yet: no KV bucket."""
    bus = await connect(NatsSettings(urls=[nats_server.url]), "shoal-tests-bare")
    try:
        yield bus
    finally:
        await bus.close()


async def test_the_runtime_watch_outlives_a_bucket_missing_at_first_and_follows_the_ring_once_it_is_there(
        bare_bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountd, "WATCH_RETRY", mountd.Backoff(first=0.05, cap=0.2), raising=False)
    mount = MountedDataset(make_settings(nats_server.url), bare_bus, "default", NAME, "/nonexistent")
    router = BlockRouter("node-x", NoPeers())
    stop = asyncio.Event()
    with json_logs(monkeypatch) as logs:
        watching = asyncio.create_task(mount._watch_runtime(router, stop))
        await failed_once("runtime watch", logs, watching)
    try:
        await bare_bus.provision()
        runtimes = await bare_bus.kv(subjects.KV_RUNTIMES)
        await runtimes.put(KEY, msgspec.json.encode(runtime_with([
            CacheWorker(node="node-a", peer_url="http://127.0.0.1:41000")])))

        async def ring_of_a() -> bool:
            return router.ring == {"node-a": "http://127.0.0.1:41000"}

        await eventually(ring_of_a, 15, "the ring from the runtime record written once the bucket was there")
        await runtimes.put(KEY, msgspec.json.encode(runtime_with([
            CacheWorker(node="node-a", peer_url="http://127.0.0.1:41000"),
            CacheWorker(node="node-b", peer_url="http://127.0.0.1:41001")])))

        async def ring_of_two() -> bool:
            return router.ring.keys() == {"node-a", "node-b"}

        await eventually(ring_of_two, 15, "a later change of the ring")
    finally:
        stop.set()
        await asyncio.wait_for(watching, 15)


async def test_the_manifest_watch_outlives_a_bucket_missing_at_first_and_sees_the_dataset_deleted(
        bare_bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountd, "WATCH_RETRY", mountd.Backoff(first=0.05, cap=0.2), raising=False)
    mount = MountedDataset(make_settings(nats_server.url), bare_bus, "default", NAME, "/nonexistent")
    stop = asyncio.Event()
    # No tree or cache: an unsynced record has no manifest to load, and a delete needs neither.
    with json_logs(monkeypatch) as logs:
        watching = asyncio.create_task(mount._watch(None, None, stop))  # type: ignore[arg-type]
        await failed_once("manifest watch", logs, watching)
    try:
        await bare_bus.provision()
        datasets = await bare_bus.kv(subjects.KV_DATASETS)
        await datasets.put(KEY, msgspec.json.encode(unsynced_dataset(NAME)))
        await datasets.delete(KEY)

        async def stopped() -> bool:
            return stop.is_set()

        await eventually(stopped, 15, "the mount told to stop by the delete")
        assert mount.deleted
        await asyncio.wait_for(watching, 15)
    finally:
        stop.set()
        await cancel_and_wait(watching)
