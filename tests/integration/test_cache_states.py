"""Status where the bytes are: the dataset service folds inventory counters from two nodes (real nats-server)
into ``cacheStates`` hit ratios (local, remote, store) and ``status.nodes``; the CLI's describe lists them. The
figures come back from the folded inventory when the dataset binds again, and follow a resync's new size, with no
new inventory event (an agent whose cache did not change sends none). A node whose agent is gone leaves them.
With the scheduler running too, a block two nodes hold counts once in ``cachedPercentage`` and twice in ``cached``;
with its figure a moment behind the nodes', the two columns still agree; an agent claiming more of a file than its
size does not push ``cachedPercentage`` over the truth.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import Bus, kv_load
from libs.cli.main import cli
from libs.config import Settings
from libs.events.agent import (
    AgentHeartbeat,
    AgentRecord,
    CacheCounters,
    CachedFile,
    InventoryDelta,
    InventoryRequest,
    InventorySnapshot,
)
from libs.events.common import ObjectMeta, ObjectRef, format_bytes
from libs.events.dataset import (
    Condition,
    Dataset,
    DatasetApply,
    DatasetRecord,
    DatasetResync,
    DatasetSpec,
    Mount,
    NodeCache,
)
from libs.events.runtime import CacheWorker, RuntimePhase, RuntimeStatus, RuntimeStatusChanged
from libs.events.schedule import DatasetCacheObserved
from libs.inventory import DatasetInventory
from libs.manifest import ManifestStore
from services.dataset import app as dataset_app
from services.dataset.handlers import DatasetHandlers
from services.scheduler import app as scheduler_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import counting_connect, dataset_record, eventually, running

DATASET = ObjectRef(name="model")


async def status_where(bus: Bus, check: Any) -> DatasetRecord:
    async def probe() -> DatasetRecord | None:
        record = await dataset_record(bus, "model")
        return record if record is not None and check(record) else None

    return await eventually(probe, what="the dataset's status")


async def apply_model(bus: Bus, bucket: str) -> None:
    """The dataset ``model`` of the whole bucket, applied and synced (its one object of 1,000 bytes)."""
    dataset = Dataset(metadata=ObjectMeta(name="model"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
    await status_where(bus, lambda r: r.status.ufs_total_bytes == 1000)


async def test_cache_states_and_nodes_follow_two_nodes_counters(bus: Bus, settings: Settings,
                                                               seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    async with running(lambda stop: dataset_app.run(settings, stop)):
        await apply_model(bus, bucket)

        # node-a: an owner reading from its own cache and the store; node-b: a client reading through peers.
        await bus.publish(subjects.agent_inventory("node-b"), InventorySnapshot(
            node="node-b", dataset=DATASET, incarnation="b1", seq=1,
            counters=CacheCounters(cached_bytes=0, remote_bytes=900, miss_bytes=100)))
        await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
            node="node-a", dataset=DATASET, incarnation="a1", seq=1,
            counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000, hit_bytes=600, miss_bytes=400,
                                   served_bytes=900)))
        record = await status_where(bus, lambda r: len(r.status.nodes) == 2)
        assert record.status.nodes == [
            NodeCache(node="node-a", cached_bytes=1000, local_read_bytes=600, store_read_bytes=400),
            NodeCache(node="node-b", remote_read_bytes=900, store_read_bytes=100),
        ]
        states = record.status.cache_states
        # 2000 bytes read: 600 local, 900 remote, 500 from the store.
        assert (states.cache_hit_ratio, states.local_hit_ratio, states.remote_hit_ratio) == ("75.0%", "30.0%",
                                                                                              "45.0%")
        assert states.cached_percentage == "100.0%"

        # A later delta from node-b moves its row and the ratios.
        await bus.publish(subjects.agent_inventory("node-b"), InventoryDelta(
            node="node-b", dataset=DATASET, incarnation="b1", seq=2,
            counters=CacheCounters(remote_bytes=2900, miss_bytes=100)))
        record = await status_where(bus, lambda r: r.status.nodes[-1].remote_read_bytes == 2900)
        assert record.status.cache_states.remote_hit_ratio == "72.5%"  # 2900 of 4000

        # shoal describe lists where the bytes are, node by node.
        url = ",".join(settings.nats.urls)
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", url, "describe", "dataset", "model"])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        start = lines.index("Cache by node:")
        assert [line.split() for line in lines[start + 1:start + 4]] == [
            ["NODE", "CACHED", "LOCAL", "READS", "REMOTE", "READS", "STORE", "READS", "LOADED"],
            ["node-a", "1000B", "600B", "0B", "400B", "0B"],
            ["node-b", "0B", "0B", "2.83KiB", "100B", "0B"],
        ]


def runtime_phase(phase: RuntimePhase, revision: int) -> RuntimeStatusChanged:
    """The runtime service's fact for the runtime of the same name as the dataset ("model")."""
    return RuntimeStatusChanged(id=f"runtime.default.model.status.{revision}", name="model", namespace="default",
                                generation=1, status=RuntimeStatus(phase=phase, cache_capacity="4.00KiB"))


async def test_cache_states_come_back_from_the_fold_on_binding_again_and_follow_a_resync(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    # Seen after a NATS server's kill (the agents' heartbeats missed, the runtime NotReady for two seconds): the
    # dataset came back Bound at 0 % beside a full cache, the agent having nothing new to report.
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    async with running(lambda stop: dataset_app.run(settings, stop)):
        await apply_model(bus, bucket)
        await bus.publish(subjects.RUNTIME_STATUS, runtime_phase("Ready", 1))
        await status_where(bus, lambda r: r.status.phase == "Bound")
        await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
            node="node-a", dataset=DATASET, incarnation="a1", seq=1,
            counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000, miss_bytes=1000)))
        await status_where(bus, lambda r: r.status.cache_states.cached_percentage == "100.0%")

        await bus.publish(subjects.RUNTIME_STATUS, runtime_phase("NotReady", 2))
        record = await status_where(bus, lambda r: r.status.phase == "NotBound")
        assert not record.status.cache_states.cached  # no figures while no runtime serves it (as before)
        await bus.publish(subjects.RUNTIME_STATUS, runtime_phase("Ready", 3))
        record = await status_where(bus, lambda r: r.status.phase == "Bound")
        assert (record.status.cache_states.cached, record.status.cache_states.cached_percentage) == (
            "1000B", "100.0%")
        assert [node.cached_bytes for node in record.status.nodes] == [1000]

        # The store grows to twice the size: the same cached bytes are half of it.
        await put_objects(seaweedfs, bucket, {"more.bin": b"n" * 1000})
        await bus.publish(subjects.DATASET_RESYNC, DatasetResync(name="model"))
        record = await status_where(bus, lambda r: r.status.ufs_total_bytes == 2000)
        assert record.status.cache_states.cached_percentage == "50.0%"


async def test_the_capacity_counts_a_former_worker_that_still_holds_blocks_whichever_event_comes_last(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    # After a scale-down node-b keeps its blocks and ``cached`` counts them, but the capacity was the ring's alone:
    # ``shoal get datasets`` showed CACHED above CACHE CAPACITY.
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})

    def scaled_down(revision: int, conditions: list[Condition]) -> RuntimeStatusChanged:
        ring = [CacheWorker(node="node-a", peer_url="http://127.0.0.1:9100")]
        return RuntimeStatusChanged(id=f"runtime.default.model.status.{revision}", name="model", namespace="default",
                                    generation=1, status=RuntimeStatus(phase="Ready", cache_capacity=format_bytes(4000),
                                                                       cache_capacity_bytes=4000, workers=ring,
                                                                       conditions=conditions))

    async with running(lambda stop: dataset_app.run(settings, stop)):
        await apply_model(bus, bucket)
        await bus.publish(subjects.RUNTIME_STATUS, scaled_down(1, []))
        await status_where(bus, lambda r: r.status.phase == "Bound")
        for node, cached in (("node-a", 3000), ("node-b", 2500)):
            await bus.publish(subjects.agent_inventory(node), InventorySnapshot(
                node=node, dataset=DATASET, incarnation="i1", seq=1,
                counters=CacheCounters(cached_bytes=cached, capacity_bytes=4000)))
        record = await status_where(bus, lambda r: len(r.status.nodes) == 2)
        assert (record.status.cache_states.cached, record.status.cache_states.cache_capacity) == (
            format_bytes(5500), format_bytes(8000))
        # The runtime's next fact (told apart by its condition) gives the same capacity: no flip back.
        mounted = Condition(type="Mounted", status="True", reason="Serving", message="1 of 1 agents serve it")
        await bus.publish(subjects.RUNTIME_STATUS, scaled_down(2, [mounted]))
        record = await status_where(bus, lambda r: any(c.type == "Mounted" for c in r.status.conditions))
        assert record.status.cache_states.cache_capacity == format_bytes(8000)


async def test_an_inventory_event_reads_no_binding_from_the_bucket(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each inventory event read the runtime's binding from KV for the capacity (a NATS request per event), while
    # the service keeps every binding in memory from a watch of the bucket.
    reads: Counter[str] = Counter()
    monkeypatch.setattr(dataset_app, "connect", counting_connect(dataset_app, reads))
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    ring = [CacheWorker(node="node-a", peer_url="http://127.0.0.1:9100")]
    fact = RuntimeStatusChanged(id="runtime.default.model.status.1", name="model", namespace="default",
                                generation=1, status=RuntimeStatus(phase="Ready", cache_capacity=format_bytes(4000),
                                                                   cache_capacity_bytes=4000, workers=ring))
    async with running(lambda stop: dataset_app.run(settings, stop)):
        await apply_model(bus, bucket)
        await bus.publish(subjects.RUNTIME_STATUS, fact)
        await status_where(bus, lambda r: r.status.phase == "Bound")
        before = reads[subjects.KV_BINDINGS]
        events = 10
        for seq in range(1, events + 1):
            await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
                node="node-a", dataset=DATASET, incarnation="a1", seq=seq,
                counters=CacheCounters(cached_bytes=100 * seq, capacity_bytes=4000)))
        record = await status_where(bus, lambda r: r.status.cache_states.cached == format_bytes(100 * events))
        assert record.status.cache_states.cache_capacity == format_bytes(4000)
        # A former worker's blocks change the capacity, from the binding in memory too.
        await bus.publish(subjects.agent_inventory("node-b"), InventorySnapshot(
            node="node-b", dataset=DATASET, incarnation="b1", seq=1,
            counters=CacheCounters(cached_bytes=500, capacity_bytes=4000)))
        record = await status_where(bus, lambda r: len(r.status.nodes) == 2)
        assert record.status.cache_states.cache_capacity == format_bytes(8000)
    assert reads[subjects.KV_BINDINGS] - before == 0


async def unique_kept(bus: Bus, unique: int) -> DatasetInventory | None:
    """The node-cache entry of ``model`` once it keeps the scheduler's figure ``unique``."""
    cache, _ = await kv_load(await bus.kv(subjects.KV_NODE_CACHE), subjects.resource_key("default", "model"),
                             DatasetInventory)
    return cache if cache is not None and cache.unique is not None and cache.unique.bytes == unique else None


async def model_bound(bus: Bus, bucket: str) -> DatasetRecord:
    """Dataset ``model`` of ``bucket`` (a.bin and b.bin, 2,000 bytes) applied, listed and Bound (a ready runtime of
    one worker); its record as listed."""
    dataset = Dataset(metadata=ObjectMeta(name="model"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
    record = await status_where(bus, lambda r: r.status.ufs_total_bytes == 2000)
    await bus.publish(subjects.RUNTIME_STATUS, runtime_phase("Ready", 1))
    await status_where(bus, lambda r: r.status.phase == "Bound")
    return record


async def test_a_block_two_nodes_hold_counts_once_in_the_cached_percentage(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    """Half of the dataset (a.bin of a.bin and b.bin) cached on two nodes, as a DataLoad with ``replicas: 2`` leaves
    it: ``cachedPercentage`` is the share of the dataset in the cache (50 %, each block once: the scheduler's count),
    ``cached`` what the nodes hold (2000 bytes, what the cache costs). Summing the nodes said 100 %."""
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    async with running(lambda stop: dataset_app.run(settings, stop)):
        record = await model_bound(bus, bucket)
        etags = {entry.key: entry.etag for entry in await (await ManifestStore.of(bus)).load(record.status.manifest)}

        def held(*keys: str) -> list[CachedFile]:
            return [CachedFile(0, key, etags[key], [(0, 1000)]) for key in keys]

        # The scheduler starts once the dataset is there, as it would be running all along (it reads the records
        # before it folds inventory; a simulated agent answers no snapshot request, so the snapshots go out once it
        # is wired: its fold starts at the stream's end as it starts).
        wired = asyncio.Event()
        async with running(lambda stop: scheduler_app.run(settings, stop, started=lambda _: wired.set())):
            await asyncio.wait_for(wired.wait(), 30)
            # node-b first, until the scheduler's figure of it is in: 1000 bytes held, 1000 of the dataset.
            await bus.publish(subjects.agent_inventory("node-b"), InventorySnapshot(
                node="node-b", dataset=DATASET, incarnation="node-b", seq=1, files=held("a.bin"),
                counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000)))
            await eventually(lambda: unique_kept(bus, 1000), what="the scheduler's figure of node-b's copy")
            # node-a's copy moves the nodes' sum, not the bytes held once: the scheduler says that too (the
            # dataset service counts what the sum gained since its last figure as new blocks until it does).
            await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
                node="node-a", dataset=DATASET, incarnation="node-a", seq=1, files=held("a.bin"),
                counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000)))
            record = await status_where(bus, lambda r: len(r.status.nodes) == 2
                                        and r.status.cache_states.cached_percentage == "50.0%")
            assert record.status.cache_states.cached == "1.95KiB"  # 2000 bytes: both copies
            assert [node.cached_bytes for node in record.status.nodes] == [1000, 1000]

            # node-a evicts its copy: still half of the dataset cached, held once.
            await bus.publish(subjects.agent_inventory("node-a"), InventoryDelta(
                node="node-a", dataset=DATASET, incarnation="node-a", seq=2, evicted=held("a.bin"),
                counters=CacheCounters(cached_bytes=0, capacity_bytes=4000)))
            record = await status_where(bus, lambda r: r.status.cache_states.cached == "1000B")
            assert record.status.cache_states.cached_percentage == "50.0%"
            # node-b caches b.bin as well: all of it.
            await bus.publish(subjects.agent_inventory("node-b"), InventoryDelta(
                node="node-b", dataset=DATASET, incarnation="node-b", seq=2, cached=held("b.bin"),
                counters=CacheCounters(cached_bytes=2000, capacity_bytes=4000)))
            await status_where(bus, lambda r: r.status.cache_states.cached_percentage == "100.0%"
                               and r.status.cache_states.cached == "1.95KiB")


async def test_a_lying_agent_does_not_push_the_cached_percentage_over_the_truth(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    """Half of the dataset (a.bin of a.bin and b.bin, 1,000 bytes each) is cached on node-b; node-a's agent lies,
    claiming four 1,000-byte blocks of a.bin. Blocks partition a file, so a.bin counts up to its size in the
    scheduler's figure and ``cachedPercentage`` stays at the truth, 50 %; the figure counted the claimed blocks
    (4,000 bytes) and the dataset showed 100 %."""
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    async with running(lambda stop: dataset_app.run(settings, stop)):
        record = await model_bound(bus, bucket)
        etag = {entry.key: entry.etag for entry in await (await ManifestStore.of(bus)).load(record.status.manifest)}
        wired = asyncio.Event()  # the scheduler as in the test above: started once the dataset is there
        async with running(lambda stop: scheduler_app.run(settings, stop, started=lambda _: wired.set())):
            await asyncio.wait_for(wired.wait(), 30)
            await bus.publish(subjects.agent_inventory("node-b"), InventorySnapshot(
                node="node-b", dataset=DATASET, incarnation="node-b", seq=1,
                files=[CachedFile(0, "a.bin", etag["a.bin"], [(0, 1000)])],
                counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000)))
            await eventually(lambda: unique_kept(bus, 1000), what="the scheduler's figure of node-b's a.bin")
            await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
                node="node-a", dataset=DATASET, incarnation="node-a", seq=1,
                files=[CachedFile(0, "a.bin", etag["a.bin"], [(index, 1000) for index in range(4)])],
                counters=CacheCounters(cached_bytes=4000, capacity_bytes=4000)))

            async def figure_of_both() -> DatasetInventory | None:
                cache, _ = await kv_load(await bus.kv(subjects.KV_NODE_CACHE),
                                         subjects.resource_key("default", "model"), DatasetInventory)
                return cache if cache is not None and cache.unique and cache.unique.nodes_bytes == 5000 else None

            cache = await eventually(figure_of_both, what="the scheduler's figure after node-a's claim")
            assert cache.unique is not None and cache.unique.bytes == 1000  # a.bin up to its size
            # The status is written after the node-cache entry: it comes to the figure a moment later.
            await status_where(bus, lambda r: r.status.cache_states.cached == format_bytes(5000)
                               and r.status.cache_states.cached_percentage == "50.0%")


async def test_cached_and_the_cached_percentage_agree_while_the_schedulers_figure_is_behind(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    """Right after ``shoal load dataset --wait``, ``shoal get datasets`` showed CACHED at the dataset's size beside
    a CACHED PERCENTAGE from the middle of the load: ``cached`` is the nodes' sum as of the last inventory event,
    the percentage the scheduler's count, published at most once a second (here: not yet since the load's end).
    What the nodes gained since the scheduler's figure counts as new blocks, so the two agree."""
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    async with running(lambda stop: dataset_app.run(settings, stop)):
        await apply_model(bus, bucket)
        await bus.publish(subjects.agent_inventory("node-a"), InventorySnapshot(
            node="node-a", dataset=DATASET, incarnation="a1", seq=1,
            counters=CacheCounters(cached_bytes=400, capacity_bytes=4000, loaded_bytes=400)))
        await status_where(bus, lambda r: r.status.cache_states.cached_percentage == "40.0%")
        # The scheduler's figure of the load's middle, as it publishes it.
        await bus.publish(subjects.SCHEDULER_DATASET_CACHE, DatasetCacheObserved(
            id="scheduler.default.model.cache.midway", name="model", namespace="default", unique_cached_bytes=400,
            nodes_cached_bytes=400, nodes=1))

        await eventually(lambda: unique_kept(bus, 400), what="the scheduler's figure in the node-cache entry")
        # The load's last blocks: the agent's inventory is in, the scheduler's next figure is not.
        await bus.publish(subjects.agent_inventory("node-a"), InventoryDelta(
            node="node-a", dataset=DATASET, incarnation="a1", seq=2,
            counters=CacheCounters(cached_bytes=1000, capacity_bytes=4000, loaded_bytes=1000)))
        record = await status_where(bus, lambda r: r.status.cache_states.cached == "1000B")
        assert record.status.cache_states.cached_percentage == "100.0%"  # it read 40.0%

        url = ",".join(settings.nats.urls)
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", url, "get", "datasets"])
        assert result.exit_code == 0, result.output
        header, row = result.stdout.splitlines()
        columns = dict(zip(re.split(r"\s{3,}", header), re.split(r"\s{3,}", row), strict=True))
        assert (columns["UFS TOTAL SIZE"], columns["CACHED"], columns["CACHED PERCENTAGE"]) == (
            "1000B", "1000B", "100.0%")


class Beats:
    """The agents' records as the runtime service writes them (``shoal_agents``), at a clock the test moves; the
    dataset service runs on the same clock."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.now = time.time()

    def clock(self) -> float:
        return self.now

    async def beat(self, *nodes: str) -> None:
        for node in nodes:
            record = AgentRecord(heartbeat=AgentHeartbeat(node=node), received_at=self.now)
            await self.kv.put(node, msgspec.json.encode(record))

    async def advance(self, seconds: float, *nodes: str) -> None:
        """Move the clock ``seconds`` on, ``nodes`` beating every 30 s of it: one beat after another, no node's last
        beat is ever a TTL older than another's, whenever the service sweeps (one jump past the TTL left the node
        written second a minute behind the first until its beat was read: dropped, under load)."""
        target = self.now + seconds
        while self.now < target:
            self.now = min(self.now + 30, target)
            await self.beat(*nodes)


async def report_two_nodes(bus: Bus) -> None:
    """node-a holding 600 and node-b 400 of the 1,000 bytes: the dataset 100 % cached."""
    for node, cached in (("node-a", 600), ("node-b", 400)):
        await bus.publish(subjects.agent_inventory(node), InventorySnapshot(
            node=node, dataset=DATASET, incarnation=node, seq=1,
            counters=CacheCounters(cached_bytes=cached, capacity_bytes=4000, miss_bytes=cached)))
    await status_where(bus, lambda r: r.status.cache_states.cached_percentage == "100.0%")


async def test_a_node_whose_agent_is_gone_leaves_the_cache_figures(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node removed from the cluster sends no last inventory: once its agent's last heartbeat is a minute older
    than the newest (and a minute after the service first saw the heartbeats), its bytes leave ``cached`` and
    ``status.nodes``."""
    monkeypatch.setattr(dataset_app, "DEPARTED_NODES_SECONDS", 0.1)
    beats = Beats(await bus.kv(subjects.KV_AGENTS))
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    await beats.beat("node-a")
    await beats.beat("node-b")
    async with running(lambda stop: dataset_app.run(settings, stop, clock=beats.clock)):
        await apply_model(bus, bucket)
        await report_two_nodes(bus)

        beats.now += 90  # node-b's last beat is 90 s old; node-a beats again
        await beats.beat("node-a")
        record = await status_where(bus, lambda r: len(r.status.nodes) == 1)
        assert [node.node for node in record.status.nodes] == ["node-a"]
        assert (record.status.cache_states.cached, record.status.cache_states.cached_percentage) == ("600B", "60.0%")
        cache, _ = await kv_load(await bus.kv(subjects.KV_NODE_CACHE), subjects.resource_key("default", "model"),
                                 DatasetInventory)
        assert cache is not None and set(cache.nodes) == {"node-a"}

        beats.now += 90  # node-a gone too, while node-c (holding nothing of this dataset) beats
        await beats.beat("node-c")
        record = await status_where(bus, lambda r: not r.status.nodes)
        assert (record.status.cache_states.cached, record.status.cache_states.cached_percentage) == ("0B", "0.0%")


class Sweeps:
    """Counts the service's departed-node sweeps, so a test can let a few run (and find nothing to drop) before it
    goes on: what a dropped node would show needs a sweep to have run, not time to have passed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done = 0
        sweep = DatasetHandlers.forget_departed_nodes

        async def counted(handlers: DatasetHandlers, *args: Any) -> None:
            await sweep(handlers, *args)
            self.done += 1

        monkeypatch.setattr(DatasetHandlers, "forget_departed_nodes", counted)

    async def run(self, count: int) -> None:
        """Returns once ``count`` more sweeps have finished."""
        target = self.done + count

        async def swept() -> bool:
            return self.done >= target

        await eventually(swept, what=f"{count} departed-node sweeps")


async def test_nodes_are_not_dropped_while_their_agents_beat_again_after_an_outage(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, nats_server: NatsServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS away for longer than the agents' TTL: every agent's last beat is old when it comes back, and agents beat
    again within seconds. As in the service's first minute, nodes are judged only a TTL after the connection came
    back, or every node of every dataset lost its figures, which an idle node's agent never sends again."""
    monkeypatch.setattr(dataset_app, "DEPARTED_NODES_SECONDS", 0.1)
    sweeps = Sweeps(monkeypatch)
    beats = Beats(await bus.kv(subjects.KV_AGENTS))
    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    await beats.beat("node-a", "node-b")
    async with running(lambda stop: dataset_app.run(settings, stop, clock=beats.clock)):
        await apply_model(bus, bucket)
        await report_two_nodes(bus)
        await beats.advance(61, "node-a", "node-b")  # past the service's first minute; both agents beat
        await sweeps.run(2)  # they find both alive

        nats_server.restart()
        beats.now += 90  # the outage: the last beats are 90 s old when the service is back

        async def connected() -> bool:
            return bus.nc.is_connected

        await eventually(connected, what="the test's client reconnected")
        await sweeps.run(2)  # sweeps after the outage, before the agents' first beats
        await beats.beat("node-a", "node-b")
        # A node dropped meanwhile would not come back (nothing sends its figures again): this waits for the figures
        # of both, which a dropped node fails.
        record = await status_where(bus, lambda r: [node.node for node in r.status.nodes] == ["node-a", "node-b"])
        assert record.status.cache_states.cached_percentage == "100.0%"

        beats.now += 61  # a TTL after the connection came back, a node that did not beat again leaves
        await beats.beat("node-a")
        record = await status_where(bus, lambda r: len(r.status.nodes) == 1)
        assert record.status.cache_states.cached_percentage == "60.0%"


async def test_a_node_that_comes_back_is_asked_for_its_figures(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node cut off for more than the agents' TTL loses its figures; when its agent beats again its cache is still
    there, but an idle mount sends no inventory event (no gap to ask from): the service asks it for a snapshot."""
    monkeypatch.setattr(dataset_app, "DEPARTED_NODES_SECONDS", 0.1)
    beats = Beats(await bus.kv(subjects.KV_AGENTS))
    async def answer(request: InventoryRequest) -> None:  # node-b's mount, whose cache did not change
        if request.node in ("", "node-b") and request.dataset in (None, DATASET):
            await bus.publish(subjects.agent_inventory("node-b"), InventorySnapshot(
                node="node-b", dataset=DATASET, incarnation="node-b", seq=2,
                counters=CacheCounters(cached_bytes=400, capacity_bytes=4000, miss_bytes=400)))

    await put_objects(seaweedfs, bucket, {"model.bin": b"m" * 1000})
    await beats.beat("node-a", "node-b")
    async with running(lambda stop: dataset_app.run(settings, stop, clock=beats.clock)):
        await apply_model(bus, bucket)
        await report_two_nodes(bus)

        beats.now += 90  # node-b cut off for 90 s
        await beats.beat("node-a")
        await status_where(bus, lambda r: [node.node for node in r.status.nodes] == ["node-a"])

        subscription = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                           answer)
        try:
            await beats.beat("node-b")  # back, with the same cache
            record = await status_where(bus, lambda r: len(r.status.nodes) == 2)
        finally:
            await subscription.unsubscribe()
        assert record.status.cache_states.cached_percentage == "100.0%"
