"""DataLoad and DataClean end to end (issue 9, "How it is shown"), with nothing stood in for: the loader's
``app.run`` in-process, real node agents (``agent_stack.node_stack`` / ``cluster_stack``) whose mount processes are
real subprocesses with real FUSE mounts and execute the parts (``services/agent/tasks.py``), a real nats-server,
and SeaweedFS behind a counting HTTP proxy (``tests.faults.HttpProxy``: every store GET is seen).

Shown: a DataLoad of a folder caches exactly that folder's blocks (an inventory snapshot asked for after the load),
a read of those files through the mount then makes no store GET, and files outside the folder are not cached; with
three agents and ``replicas: 2`` each block is on exactly its two owners (``libs.ring.owners`` over the runtime's
ring) and the store saw each block twice, once per holder (a load never reads through a peer: each holder fetches
its copy from the store); a DataClean of a path frees those blocks on every agent (``cachedBytes`` drops by exactly
their bytes, in the inventory and the dataset's status); the loader killed mid-load (its task cancelled while the
store holds the agents' GETs) resumes in a new process and completes, each block fetched once; a mount process
killed mid-load is restarted and the load completes (only the blocks whose GETs the kill cut are fetched twice); an
OnEvent DataLoad runs again after a resync that found new objects and fetches only those, then after one that found
an overwritten object while the mount process was paused (it learns of the new manifest when the part arrives, and
waits for it) and fetches only that; a Cron load runs at its firings (the loader's clock moved) and its second run
skips every cached block; a load whose runtime is scaled in from three workers to one fails naming the nodes scaled
out, its parts cancelled, and a load run again fills the worker; a DataClean run twice (its spec changed) while a
load's ring grows twice leaves both runs' files evicted on every node; deleting a DataLoad cancels the agent's
part, and a DataClean right after it frees the blocks the cancelled part still had in flight; the
``shoal`` CLI loads with ``--wait``, lists the DataLoad Complete with its progress, exits non-zero with the loader's
message for a path the manifest does not have, applies Fluid's DataLoad YAML (``loadMetadata``: an object put after
the mount is loaded too) and cleans a folder. Awkward timings: a DataLoad deleted with parts still queued on the
node (the agent fetches none of them, the loader keeps nothing of it, the name applied again runs afresh), deleted
and applied again at once while its GETs are held, applied again and again (same and changed specs) while it runs
(no block fetched twice, the last spec's run ends it), and its dataset deleted under it (Failed naming the dataset,
the mount gone, no further GET, no plan left).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from libs import subjects
from libs.blocks import BlockId, block_count, block_span
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.events.agent import InventoryRequest
from libs.events.common import ObjectMeta, ObjectRef, format_bytes
from libs.events.dataset import DatasetDelete, ManifestEntry, NodeCache
from libs.events.operation import (
    CleanTarget,
    DataClean,
    DataCleanApply,
    DataCleanSpec,
    DataLoadDelete,
    DatasetRef,
    OperationRecord,
    TargetPath,
    TaskProgress,
)
from libs.events.runtime import RuntimeDelete, RuntimeRecord, RuntimeScale
from libs.manifest import ManifestStore
from libs.ring import owners
from services.dataset.domain import percentage
from services.loader import app as loader_app
from services.loader import domain
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.faults import HttpProxy
from tests.helpers import dataset_record, eventually, json_lines, running, runtime_record
from tests.integration.agent_stack import (
    NODE,
    Cluster,
    Node,
    cluster_stack,
    md5,
    mount_pids,
    mounted_paths,
    node_stack,
    read_file,
)
from tests.integration.test_cli import shoal
from tests.integration.test_distributed_cache import THREE, UNLABELLED, ring_is
from tests.integration.test_distributed_cache import apply as apply_cluster
from tests.integration.test_loader import dataload, in_ring, operation, phase_of

pytestmark = pytest.mark.needs("fuse")

MiB = 1024 * 1024
BLOCK = MiB  # the stacks' runtimes use block_size "1Mi"
# The dataset's name in the cluster tests is test_distributed_cache's (its ``apply`` and ``ring_is`` use it).
CLUSTER_NAME = "shared"
NAME = "warm"

FLUID_DATALOAD = """\
apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata:
  name: fluid-style
spec:
  dataset:
    name: {name}
    namespace: default
  loadMetadata: true
  target:
    - path: /train
      replicas: 1
"""

# A store GET as the proxy sees it: (object key, Range header).
Get = tuple[str, str]


def objects() -> dict[str, bytes]:
    """Two files (five blocks) under train/, one in val/, one at the top. Seeded: block names hash the ETag, so
    every run places the blocks on the same owners."""
    rng = random.Random(9)
    return {
        "train/a.bin": rng.randbytes(2 * MiB + 100),
        "train/sub/b.bin": rng.randbytes(MiB + 5),
        "val/c.bin": rng.randbytes(MiB),
        "top.bin": rng.randbytes(1000),
    }


# --- what the store, the manifest and the agents say ---


def get_of(entry: ManifestEntry, index: int) -> Get:
    start, length = block_span(entry.size, BLOCK, index)
    return entry.key, f"bytes={start}-{start + length - 1}"


def blocks_under(entries: dict[str, ManifestEntry], prefix: str) -> dict[Get, BlockId]:
    """Every block of the files whose key starts with ``prefix``, by the store GET that fetches it."""
    return {get_of(entry, i): BlockId(entry.mount, entry.key, entry.etag, i)
            for key, entry in entries.items() if key.startswith(prefix)
            for i in range(block_count(entry.size, BLOCK))}


def size_of(entry: ManifestEntry, index: int) -> int:
    return block_span(entry.size, BLOCK, index)[1]


def store_gets(store: HttpProxy, since: int = 0) -> list[Get]:
    return [(call.path.split("/", 2)[2], call.range or "") for call in store.ranged_gets()[since:]]


async def manifest(bus: Bus, name: str) -> dict[str, ManifestEntry]:
    record = await dataset_record(bus, name)
    assert record is not None and record.status.manifest
    return {e.key: e for e in await (await ManifestStore.of(bus)).load(record.status.manifest)}


async def snapshot(bus: Bus, node: str, name: str) -> dict[str, Any]:
    """A fresh inventory snapshot of ``node``'s mount of ``name`` (asked for now: it holds every block cached)."""
    events: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        event = msgspec.json.decode(msg.data)
        if event["type"] == "agent.inventory.snapshot.v2" and event["dataset"]["name"] == name:
            events.append(event)

    subscription = await bus.nc.subscribe(subjects.agent_inventory(node), cb=collect)
    try:
        await bus.nc.flush()
        await bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=node, dataset=ObjectRef(name=name)))

        async def fresh() -> dict[str, Any] | None:
            return events[-1] if events else None

        return await eventually(fresh, what=f"an inventory snapshot of {node}")
    finally:
        await subscription.unsubscribe()


def cached(snapshot: dict[str, Any]) -> set[tuple[str, int]]:
    return {(key, index) for _, key, _, blocks in snapshot["files"] for index, _ in blocks}


def pairs(blocks: dict[Get, BlockId]) -> set[tuple[str, int]]:
    return {(block.key, block.index) for block in blocks.values()}


# --- stacks ---


@contextlib.asynccontextmanager
async def loader(settings: Settings) -> AsyncIterator[None]:
    async with running(lambda stop: loader_app.run(settings, stop)):
        yield


@dataclass
class Single:
    node: Node
    store: HttpProxy
    entries: dict[str, ManifestEntry]

    @property
    def mount(self) -> Path:
        return self.node.mountpoint(NAME)


@contextlib.asynccontextmanager
async def single(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
                 **agent_options: Any) -> AsyncIterator[Single]:
    """One agent (no peer secret, so no ring: the node caches every block it is given) with dataset ``NAME``
    mounted from ``objects()`` behind the counting proxy."""
    await put_objects(seaweedfs, bucket, objects())
    store = HttpProxy(seaweedfs.endpoint)
    await store.start()
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path, **agent_options) as node:
            await node.apply(NAME, bucket, endpoint=store.endpoint)
            await node.wait_mounted(NAME, expect="train/sub/b.bin")
            yield Single(node, store, await manifest(bus, NAME))
    finally:
        store.release()
        await store.stop()


@contextlib.asynccontextmanager
async def three(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
                replicas: int = 3) -> AsyncIterator[tuple[Cluster, HttpProxy, list[str]]]:
    """Three agents mounting ``CLUSTER_NAME``, ``replicas`` of them cache workers with peer URLs (the ring: the
    agents whose heartbeats came first)."""
    await put_objects(seaweedfs, bucket, objects())
    store = HttpProxy(seaweedfs.endpoint)
    await store.start()
    try:
        async with cluster_stack(bus, settings, seaweedfs, tmp_path, UNLABELLED) as cluster:
            await apply_cluster(bus, cluster, store, bucket, replicas=replicas)
            record = await ring_is(bus, list(THREE)) if replicas == len(THREE) else await ring_of_size(bus, replicas)
            await cluster.wait_mounted(CLUSTER_NAME, "train/sub/b.bin", timeout=60)  # three mount processes start
            yield cluster, store, [w.node for w in record.status.workers if w.ready and w.peer_url]
    finally:
        store.release()
        await store.stop()


async def ring_of_size(bus: Bus, size: int) -> RuntimeRecord:
    """``CLUSTER_NAME``'s runtime once ``size`` workers, whichever, are ready with peer URLs (``ring_is``)."""
    async def probe() -> RuntimeRecord | None:
        record = await runtime_record(bus, CLUSTER_NAME)
        workers = record.status.workers if record else []
        return record if len(workers) == size and all(w.ready and w.peer_url for w in workers) else None

    return await eventually(probe, 60, f"{size} worker(s) ready with peer URLs")


async def finished(bus: Bus, name: str, runs: int = 1, kind: str = "DataLoad",
                   timeout: float = 30.0, tolerate: tuple[type[Exception], ...] = ()) -> OperationRecord:
    """The operation once run ``runs`` is over, which must be Complete: a Failed run fails the test at once, with
    the loader's message (rather than a timeout). ``tolerate``: as ``eventually``'s."""
    async def over() -> OperationRecord | None:
        record = await operation(bus, name, kind)
        if record is None or record.status.runs < runs or record.status.phase not in ("Complete", "Failed"):
            return None
        return record

    record = await eventually(over, timeout, f"{kind} {name} run {runs} finished", tolerate)
    assert (record.status.phase, record.status.runs) == ("Complete", runs), record.status
    return record


# --- tests ---


async def test_a_load_of_a_folder_caches_exactly_its_blocks_and_its_reads_make_no_store_get(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, loader(settings):
        await bus.publish(subjects.DATALOAD_APPLY, dataload("train", dataset=NAME,
                                                            target=[TargetPath(path="/train")]))
        done = await finished(bus, "train")

        train = blocks_under(stack.entries, "train/")
        assert len(train) == 5
        assert sorted(store_gets(stack.store)) == sorted(train), "each block of the folder fetched once, no other"
        loaded = await snapshot(bus, NODE, NAME)
        assert cached(loaded) == pairs(train), "exactly the folder's blocks cached"
        progress = done.status.progress
        folder_bytes = stack.entries["train/a.bin"].size + stack.entries["train/sub/b.bin"].size
        # The load's fetches are loaded bytes, no store reads: a warmed dataset's hit ratio (and the autoscaler's)
        # is its readers', not 0 %.
        counters = loaded["counters"]
        assert (counters["loadedBytes"], counters["missBytes"], counters["hitBytes"]) == (folder_bytes, 0, 0)
        assert (progress.files_done, progress.files_total) == (2, 2)
        assert (progress.bytes_done, progress.bytes_total, progress.bytes_skipped) == (folder_bytes,) * 2 + (0,)
        assert [(n.node, n.bytes_done) for n in progress.nodes] == [(NODE, folder_bytes)]

        # Reads of the folder's files through the mount: every block is in the cache, the store is not asked.
        source = objects()
        for key in ("train/a.bin", "train/sub/b.bin"):
            assert md5(await read_file(stack.mount / key)) == md5(source[key])
        assert len(store_gets(stack.store)) == len(train)
        # A file outside the folder was not loaded: reading it goes to the store.
        assert md5(await read_file(stack.mount / "val/c.bin")) == md5(source["val/c.bin"])
        assert store_gets(stack.store, len(train)) == [get_of(stack.entries["val/c.bin"], 0)]
        val = stack.entries["val/c.bin"].size

        async def node_row() -> NodeCache | None:
            record = await dataset_record(bus, NAME)
            rows = record.status.nodes if record is not None else []
            return rows[0] if rows and rows[0].store_read_bytes == val else None

        row = await eventually(node_row, what="the dataset's row of the node with the read of val/c.bin")
        assert (row.loaded_bytes, row.store_read_bytes, row.local_read_bytes) == (folder_bytes, val, folder_bytes)
        record = await dataset_record(bus, NAME)
        assert record is not None and record.status.cache_states.cache_hit_ratio == percentage(folder_bytes,
                                                                                             folder_bytes + val)


async def test_three_agents_replicas_2_put_each_block_on_its_two_owners_and_a_clean_frees_a_path(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with three(bus, settings, seaweedfs, bucket, tmp_path) as (cluster, store, ring), loader(settings):
        entries = await manifest(bus, CLUSTER_NAME)
        await bus.publish(subjects.DATALOAD_APPLY, dataload("twice", dataset=CLUSTER_NAME,
                                                            target=[TargetPath(path="/train", replicas=2)]))
        done = await finished(bus, "twice")

        train = blocks_under(entries, "train/")
        holders = {get: owners(block.name, ring, 2) for get, block in train.items()}
        assert len(holders) == 5 and all(len(nodes) == 2 for nodes in holders.values())
        # A load never reads through a peer: each of a block's two holders fetches its copy from the store.
        assert Counter(store_gets(store)) == dict.fromkeys(train, 2)
        before: dict[str, int] = {}
        for node in THREE:
            inventory = await snapshot(bus, node, CLUSTER_NAME)
            mine = {get for get, nodes in holders.items() if node in nodes}
            assert cached(inventory) == {(train[get].key, train[get].index) for get in mine}, \
                f"{node} holds exactly the blocks it owns (first or second)"
            before[node] = inventory["counters"]["cachedBytes"]
            assert before[node] == sum(size_of(entries[train[get].key], train[get].index) for get in mine)
        folder_bytes = sum(size_of(entries[b.key], b.index) for b in train.values())
        assert done.status.progress.bytes_done == 2 * folder_bytes
        assert sum(n.bytes_done for n in done.status.progress.nodes) == 2 * folder_bytes

        # A DataClean of one path: its blocks leave every agent that held them, nothing else does.
        clean = DataCleanApply(data_clean=DataClean(metadata=ObjectMeta(name="drop-a"), spec=DataCleanSpec(
            dataset=DatasetRef(name=CLUSTER_NAME), target=[CleanTarget(path="/train/a.bin")])))
        await bus.publish(subjects.DATACLEAN_APPLY, clean)
        cleaned = await finished(bus, "drop-a", kind="DataClean")
        gone = {get for get, block in train.items() if block.key == "train/a.bin"}
        freed = 0
        for node in THREE:
            inventory = await snapshot(bus, node, CLUSTER_NAME)
            kept = {get for get, nodes in holders.items() if node in nodes and get not in gone}
            assert cached(inventory) == {(train[get].key, train[get].index) for get in kept}
            dropped = sum(size_of(entries["train/a.bin"], train[get].index) for get in gone if node in holders[get])
            assert inventory["counters"]["cachedBytes"] == before[node] - dropped, f"{node} freed a.bin's bytes"
            freed += dropped
        assert freed == 2 * entries["train/a.bin"].size
        assert cleaned.status.progress.bytes_done == freed
        # Its totals, as a load's: the bytes its nodes found cached to free (they were 0: no total, no file count).
        assert cleaned.status.progress.bytes_total == freed
        assert (cleaned.status.progress.files_done, cleaned.status.progress.files_total) == (1, 1)
        assert all(n.bytes_done == n.bytes_total and n.done for n in cleaned.status.progress.nodes)
        assert Counter(store_gets(store)) == dict.fromkeys(train, 2), "a clean fetches nothing"
        after = {node: before[node] - sum(size_of(entries["train/a.bin"], train[get].index)
                                          for get in gone if node in holders[get]) for node in THREE}

        # The dataset's status (what `shoal get datasets` shows) follows the agents' inventory: the freed bytes.
        async def status_freed() -> bool:
            record = await dataset_record(bus, CLUSTER_NAME)
            cached_bytes = {n.node: n.cached_bytes for n in record.status.nodes} if record else {}
            return {node: cached_bytes.get(node) for node in THREE} == after

        await eventually(status_freed, what=f"the dataset's per-node cachedBytes {after}")

        # What is still loaded reads through every node's mount (from the holders, over the peers) with no GET.
        for node in THREE:
            body = await read_file(cluster.agents[node].mountpoint(CLUSTER_NAME) / "train/sub/b.bin")
            assert md5(body) == md5(objects()["train/sub/b.bin"]), node
        assert Counter(store_gets(store)) == dict.fromkeys(train, 2), "the loaded blocks are read from the cache"

        # More replicas than the ring has workers: the run fails saying what to change, and fetches nothing.
        await bus.publish(subjects.DATALOAD_APPLY, dataload("too-many", dataset=CLUSTER_NAME,
                                                            target=[TargetPath(path="/val", replicas=4)]))
        failed = await phase_of(bus, "Failed", "too-many")
        assert "replicas 4 is more than the 3 ready cache worker(s)" in failed.status.message, failed.status
        assert Counter(store_gets(store)) == dict.fromkeys(train, 2)


async def test_a_load_whose_runtime_is_scaled_in_while_it_runs_moves_the_nodes_parts_to_the_worker_and_completes(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """``shoal scale runtime --replicas 1`` while a ``replicas: 2`` load of three workers runs (the store holds every
    GET, so no part can be done): the two nodes scaled out still serve the dataset, and went on fetching their
    parts into caches no reader's route asks, the load ending Complete with blocks off the one worker; then it
    failed, asking to run it again, where the same scale-in seen after their parts finished completed. Now their
    parts are cancelled on those nodes only, their blocks are planned again for the worker, and the load completes
    with every block on it."""
    async with three(bus, settings, seaweedfs, bucket, tmp_path) as (_cluster, store, ring), loader(settings):
        entries = await manifest(bus, CLUSTER_NAME)
        train = blocks_under(entries, "train/")
        with_parts = {node for block in train.values() for node in owners(block.name, ring, 2)}
        finals: dict[str, dict[str, Any]] = {}

        async def collect(msg: Any) -> None:
            progress = msgspec.json.decode(msg.data)
            if progress["done"] and progress["run"] == "dataload.default.scaled.1":
                finals.setdefault(progress["node"], progress)

        subscriptions = [await bus.nc.subscribe(subjects.task_progress(node), cb=collect) for node in THREE]
        store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("scaled", dataset=CLUSTER_NAME,
                                                            target=[TargetPath(path="/train", replicas=2)]))

        async def fetching() -> bool:
            return store.waiting > 0

        await eventually(fetching, what="a block GET of the load held")
        await phase_of(bus, "Executing", "scaled")
        await bus.publish(subjects.RUNTIME_SCALE, RuntimeScale(name=CLUSTER_NAME, replicas=1))

        async def one_worker() -> list[str] | None:
            record = await runtime_record(bus, CLUSTER_NAME)
            workers = [w.node for w in record.status.workers] if record else []
            return workers if len(workers) == 1 else None

        (worker,) = await eventually(one_worker, 30, "the runtime scaled in to one worker")
        left = with_parts - {worker}

        async def left_cancelled() -> dict[str, dict[str, Any]] | None:
            return finals if left <= set(finals) else None

        # 30 s: a part that missed the cancel (core NATS, under load) would go on, held by the store.
        await eventually(left_cancelled, 30, f"the final progress of the parts of {sorted(left)}")
        assert {node: finals[node]["message"] for node in left} == dict.fromkeys(left, "cancelled")
        assert worker not in finals, "the worker's part goes on"
        store.release()
        done = await finished(bus, "scaled")
        for subscription in subscriptions:
            await subscription.unsubscribe()
        assert cached(await snapshot(bus, worker, CLUSTER_NAME)) == pairs(train), "every block on the one worker"
        assert done.status.progress.bytes_done == done.status.progress.bytes_total


async def test_a_clean_run_twice_during_a_load_whose_ring_grows_twice_leaves_both_runs_files_evicted(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A load of the whole dataset on one worker, a DataClean of /train/a.bin applied behind it, the ring grown to a
    second worker (the load's blocks it owns now, but a.bin's, planned there), the clean's first run over, its spec
    changed to /val (a second run), then the ring grown to the third while the second's part of the load still works:
    each replan must leave both runs' files to the clean, which each node did after the load's parts it had then.
    No node ends with a block of a.bin or of val/c.bin; the rest of the load stays where it was loaded."""
    async with three(bus, settings, seaweedfs, bucket, tmp_path, replicas=1) as (cluster, store, ring), \
            loader(settings):
        # The first worker is whichever agent beat first; the others are picked in name order.
        first, second, third = ring[0], *sorted(set(THREE) - set(ring))
        load_key = subjects.operation_key("DataLoad", "default", "warm")
        entries = await manifest(bus, CLUSTER_NAME)
        every = blocks_under(entries, "")
        assert any(owners(block.name, list(THREE), 1) == [third] for block in every.values()
                   if block.key == "train/a.bin"), "a block of a.bin is the third's: the last replan would add it"
        store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("warm", dataset=CLUSTER_NAME))

        async def fetching() -> bool:
            return store.waiting > 0

        await eventually(fetching, what="the first worker's block GETs of the load held")

        async def clean(target: str) -> None:
            await bus.publish(subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
                metadata=ObjectMeta(name="wipe"), spec=DataCleanSpec(dataset=DatasetRef(name=CLUSTER_NAME),
                                                                     target=[CleanTarget(path=target)]))))

        async def clean_done_on(run: int, nodes: set[str]) -> bool:
            record = await operation(bus, "wipe", "DataClean")
            return (record is not None and record.status.runs == run
                    and nodes <= {n.node for n in record.status.progress.nodes if n.done})

        await clean("/train/a.bin")
        await eventually(lambda: clean_done_on(1, {second, third}), 30, "the clean's first run done off the worker")
        await bus.publish(subjects.RUNTIME_SCALE, RuntimeScale(name=CLUSTER_NAME, replicas=2))
        await eventually(lambda: in_ring(bus, load_key, second), 60, "the load replanned on the ring grown")
        (paused,) = mount_pids(cluster.agents[second].mountpoint(CLUSTER_NAME))
        os.kill(paused, signal.SIGSTOP)  # its part of the load works on, past the clean's first run
        try:
            store.release()
            await finished(bus, "wipe", kind="DataClean")
            assert (await operation(bus, "warm")).status.phase == "Executing"  # type: ignore[union-attr]
            await clean("/val")  # a new spec: the clean's second run, while the load still works
            await eventually(lambda: clean_done_on(2, {first, third}), 30, "the clean's second run done")
            await bus.publish(subjects.RUNTIME_SCALE, RuntimeScale(name=CLUSTER_NAME, replicas=3))
            await eventually(lambda: in_ring(bus, load_key, third), 60, "the load replanned on the full ring")
        finally:
            os.kill(paused, signal.SIGCONT)
        await finished(bus, "warm")
        await finished(bus, "wipe", runs=2, kind="DataClean")
        left = {node: sorted(key for key, _ in cached(await snapshot(bus, node, CLUSTER_NAME))
                             if key in ("train/a.bin", "val/c.bin")) for node in THREE}
        assert left == {node: [] for node in THREE}, f"blocks of the clean's two runs cached again: {left}"
        assert cached(await snapshot(bus, first, CLUSTER_NAME)) == pairs(
            {get: block for get, block in every.items() if block.key in ("top.bin", "train/sub/b.bin")})


@pytest.mark.parametrize("finished_while_down", [True, False], ids=["agent-done-while-down", "agent-done-after"])
async def test_a_loader_killed_mid_load_resumes_and_each_block_is_fetched_once(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        finished_while_down: bool) -> None:
    """The agent's part ends while no loader runs (its progress waits in the loader's durable consumer), or after
    the new loader republished it (same id: the stream drops the duplicate) and folds its progress live."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack:
        progress: list[dict[str, Any]] = []

        async def collect(msg: Any) -> None:
            progress.append(msgspec.json.decode(msg.data))

        subscription = await bus.nc.subscribe(subjects.task_progress(NODE), cb=collect)
        first = asyncio.create_task(loader_app.run(settings, asyncio.Event()))
        try:
            stack.store.hold()
            await bus.publish(subjects.DATALOAD_APPLY, dataload("resumed", dataset=NAME))

            async def two_held() -> bool:
                return stack.store.waiting == 2

            await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
            executing = await phase_of(bus, "Executing", "resumed")
            assert executing.status.runs == 1
        finally:
            first.cancel()  # the loader dies mid-load: no clean stop, whatever it was doing is cut
            with contextlib.suppress(asyncio.CancelledError):
                await first

        async def final() -> bool:
            return any(p["done"] for p in progress)

        if finished_while_down:
            stack.store.release()
            await eventually(final, what="the agent's final progress")
        else:
            assert not await final()
        async with loader(settings):
            stack.store.release()
            done = await finished(bus, "resumed")
        await subscription.unsubscribe()
        assert [p["done"] for p in progress].count(True) == 1, "the part ran once"
        everything = blocks_under(stack.entries, "")
        assert done.status.runs == 1, "the run was resumed, not started again"
        assert sorted(store_gets(stack.store)) == sorted(everything), "each block fetched once"
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(everything)
        total = sum(entry.size for entry in stack.entries.values())
        assert (done.status.progress.bytes_done, done.status.progress.files_done) == (total, len(stack.entries))


async def test_an_on_event_load_runs_after_a_resync_and_loads_only_the_new_or_changed_objects(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, loader(settings):
        await bus.publish(subjects.DATALOAD_APPLY, dataload("follow", dataset=NAME, policy="OnEvent",
                                                            target=[TargetPath(path="/train")]))
        await finished(bus, "follow", runs=1)
        first = blocks_under(stack.entries, "train/")
        assert sorted(store_gets(stack.store)) == sorted(first)

        rng = random.Random(10)
        added = {"train/new/d.bin": rng.randbytes(2 * MiB + 7), "train/e.bin": rng.randbytes(300),
                 "val/f.bin": rng.randbytes(MiB)}  # val/ is outside the target
        await put_objects(seaweedfs, bucket, added)
        await stack.node.resync(NAME)
        second = await finished(bus, "follow", runs=2)

        entries = await manifest(bus, NAME)
        new = {get: block for get, block in blocks_under(entries, "train/").items() if get[0] in added}
        assert len(new) == 4
        assert sorted(store_gets(stack.store, len(first))) == sorted(new), "only the new objects' blocks fetched"
        assert (second.status.progress.files_done, second.status.progress.files_total) == (2, 2)
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(first) | pairs(new)
        # The new files read through the mount from the cache.
        gets = len(store_gets(stack.store))
        assert md5(await read_file(stack.mount / "train/new/d.bin")) == md5(added["train/new/d.bin"])
        assert len(store_gets(stack.store)) == gets

        # An object overwritten, with the mount process paused (SIGSTOP) across the resync: it gets the new manifest
        # and the run's part at the same moment. The part waits until the mount serves the manifest it was planned
        # on; it does not fail the new version's blocks as "object changed since the load was planned".
        changed = {"train/e.bin": rng.randbytes(MiB + 1)}
        await put_objects(seaweedfs, bucket, changed)
        (pid,) = mount_pids(stack.mount)
        os.kill(pid, signal.SIGSTOP)
        try:
            await stack.node.resync(NAME)

            async def published() -> bool:  # the progress with the run's totals is written once its parts are out
                record = await operation(bus, "follow")
                return record is not None and record.status.runs == 3 and record.status.progress.bytes_total > 0

            await eventually(published, what="run 3 planned and its part published")
        finally:
            os.kill(pid, signal.SIGCONT)
        third = await finished(bus, "follow", runs=3)
        assert (third.status.progress.files_done, third.status.progress.files_total) == (1, 1)
        rewritten = blocks_under({"train/e.bin": (await manifest(bus, NAME))["train/e.bin"]}, "")
        assert len(rewritten) == 2
        assert sorted(store_gets(stack.store, gets)) == sorted(rewritten), "only the overwritten object fetched"


async def test_the_cli_loads_lists_fails_on_a_missing_path_applies_fluid_yaml_and_cleans(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        nats_server: NatsServer) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, loader(settings):
        result = await shoal(nats_server, "load", "dataset", NAME, "--path", "/train/sub", "--name", "sub",
                             "--wait", wait_seconds=30)
        assert result.exit_code == 0, result.output
        assert "Complete" in result.stdout, result.output
        sub = blocks_under(stack.entries, "train/sub/")
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(sub)
        assert sorted(store_gets(stack.store)) == sorted(sub)

        listed = await shoal(nats_server, "get", "dataloads")
        assert listed.exit_code == 0, listed.output
        header, row = listed.stdout.splitlines()
        assert header.split() == ["NAME", "DATASET", "PHASE", "AGE", "DURATION", "PROGRESS"], listed.stdout
        assert row.split()[:3] == ["sub", NAME, "Complete"], listed.stdout
        assert "1/1" in row, f"the files done of the load in its PROGRESS column: {row!r}"

        missing = await shoal(nats_server, "load", "dataset", NAME, "--path", "/nope", "--name", "nope", "--wait",
                              wait_seconds=30)
        assert missing.exit_code != 0, missing.output
        assert "target path '/nope' is not in the manifest of dataset default/warm" in missing.output
        record = await operation(bus, "nope")
        assert record is not None and record.status.phase == "Failed"
        assert len(store_gets(stack.store)) == len(sub)

        # Fluid's DataLoad YAML, unchanged, with loadMetadata: the loader lists the store again first, so an object
        # put after the mount is loaded too.
        await put_objects(seaweedfs, bucket, {"train/fresh.bin": b"fresh" * 1000})
        fluid = FLUID_DATALOAD.format(name=NAME)
        applied = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=fluid, wait_seconds=30)
        assert applied.exit_code == 0, applied.output
        entries = await manifest(bus, NAME)
        train = blocks_under(entries, "train/")
        assert "train/fresh.bin" in entries and cached(await snapshot(bus, NODE, NAME)) == pairs(train)

        # `shoal clean` of a folder evicts it.
        cleaned = await shoal(nats_server, "clean", "dataset", NAME, "--path", "/train/sub", "--wait",
                              wait_seconds=30)
        assert cleaned.exit_code == 0, cleaned.output
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(train) - pairs(sub)
        # What it freed, of its files and of the bytes its nodes found to free, is said at its end and in the
        # PROGRESS column: both showed nothing ("Complete in 0s", "-") for every clean, then the freed bytes alone.
        size = format_bytes(stack.entries["train/sub/b.bin"].size)
        freed = f"1/1 files, {size}/{size} freed"
        assert re.search(rf"dataclean\.shoal\.io/\S+ Complete: {freed}", cleaned.stdout), cleaned.output
        cleans = await shoal(nats_server, "get", "datacleans")
        assert cleans.exit_code == 0, cleans.output
        assert re.split(r"\s{3,}", cleans.stdout.splitlines()[1])[5] == freed, cleans.stdout


async def delete_a_load_mid_fetch(bus: Bus, store: HttpProxy) -> dict[str, Any]:
    """A DataLoad "doomed" of the whole dataset, deleted while ``store`` holds two of its GETs
    (SHOAL_LOAD_CONCURRENCY=2): its part's final progress. The store is left holding them."""
    progress: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        progress.append(msgspec.json.decode(msg.data))

    subscription = await bus.nc.subscribe(subjects.task_progress(NODE), cb=collect)
    try:
        store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("doomed", dataset=NAME))

        async def two_held() -> bool:
            return store.waiting == 2

        await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
        await bus.publish(subjects.DATALOAD_DELETE, DataLoadDelete(name="doomed"))

        async def cancelled() -> dict[str, Any] | None:
            return next((p for p in progress if p["done"]), None)

        return await eventually(cancelled, what="the part's final progress")
    finally:
        await subscription.unsubscribe()


async def test_deleting_a_dataload_cancels_the_agents_work(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        final = await delete_a_load_mid_fetch(bus, stack.store)
        assert (final["message"], final["blocksDone"]) == ("cancelled", 0), final
        assert await operation(bus, "doomed") is None
        stack.store.release()

        # Once a later load is done, the cancelled part has certainly stopped: only its first two blocks (in plan
        # order: top.bin, then train/a.bin's first) reached the store, besides the later load's own.
        await bus.publish(subjects.DATALOAD_APPLY, dataload("later", dataset=NAME, target=[TargetPath(path="/val")]))
        await finished(bus, "later")
        entries = stack.entries
        expected = [get_of(entries["top.bin"], 0), get_of(entries["train/a.bin"], 0), get_of(entries["val/c.bin"], 0)]
        assert sorted(store_gets(stack.store)) == sorted(expected)


async def test_a_clean_right_after_a_cancelled_load_frees_the_blocks_the_load_still_had_in_flight(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A DataLoad deleted while the store holds two of its GETs (its part ends "cancelled" at once, the fetches go
    on in the reader), then a DataClean of everything: the clean ended Complete before the held blocks landed, and
    they stayed cached after it. Now the clean waits for them and frees them: a load of top.bin afterwards
    fetches it again, where it found it cached before."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        assert (await delete_a_load_mid_fetch(bus, stack.store))["message"] == "cancelled"
        await bus.publish(subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="all"), spec=DataCleanSpec(dataset=DatasetRef(name=NAME)))))
        record = await dataset_record(bus, NAME)
        assert record is not None
        life = record.incarnation
        stream, durable = subjects.task_stream(NODE), subjects.task_durable(NODE, "default", NAME, life)

        async def clean_taken() -> bool:
            record = await operation(bus, "all", "DataClean")
            if record is not None and record.status.phase == "Complete":
                return True  # before the held blocks landed
            last = (await bus.js.stream_info(stream)).state.last_seq
            consumer = await bus.js.consumer_info(stream, durable)
            return (record is not None and record.status.phase == "Executing"
                    and consumer.delivered.stream_seq == last and consumer.num_ack_pending == 1)

        await eventually(clean_taken, what="the clean's part taken by the mount, or the clean Complete")
        stack.store.release()
        await finished(bus, "all", kind="DataClean")
        assert cached(await snapshot(bus, NODE, NAME)) == set(), "the cancelled load's blocks freed with the rest"
        top = get_of(stack.entries["top.bin"], 0)
        assert store_gets(stack.store).count(top) == 1
        await bus.publish(subjects.DATALOAD_APPLY, dataload("top", dataset=NAME, target=[TargetPath(path="/top.bin")]))
        done = await finished(bus, "top")
        assert done.status.progress.bytes_skipped == 0
        assert store_gets(stack.store).count(top) == 2, "top.bin was not cached after the clean: fetched again"


async def test_a_part_whose_cancel_was_missed_stops_once_it_sees_its_run_is_gone(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The loader's cancel is a plain NATS message, which a mount process disconnected at that moment never gets:
    the part sees its run is no longer current at its next check (services.agent.tasks.CURRENT_CHECK_SECONDS)
    and ends as cancelled, instead of fetching up to its last block for a run that is gone."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack:
        progress: list[dict[str, Any]] = []

        async def collect(msg: Any) -> None:
            progress.append(msgspec.json.decode(msg.data))

        subscription = await bus.nc.subscribe(subjects.task_progress(NODE), cb=collect)
        stack.store.hold()
        async with loader(settings):
            await bus.publish(subjects.DATALOAD_APPLY, dataload("orphan", dataset=NAME))

            async def two_held() -> bool:
                return stack.store.waiting == 2

            await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
        # The loader is gone; its record of the operation goes without any cancel reaching the agent.
        kv = await bus.kv(subjects.KV_OPERATIONS)
        await kv.delete(subjects.operation_key("DataLoad", "default", "orphan"))

        async def cancelled() -> dict[str, Any] | None:
            return next((p for p in progress if p["done"]), None)

        final = await eventually(cancelled, 30, "the part's final progress, with no cancel sent")
        assert final["message"] == "cancelled", final
        stack.store.release()
        await subscription.unsubscribe()


async def test_a_cron_load_runs_on_schedule_and_its_next_run_skips_what_is_cached(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The loader's clock is moved past each firing (cron's finest schedule is a minute); the agents' is not."""
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, running(
            lambda stop: loader_app.run(settings, stop, clock=clock)):
        await bus.publish(subjects.DATALOAD_APPLY, dataload("nightly", dataset=NAME, policy="Cron",
                                                            schedule="* * * * *", target=[TargetPath(path="/train")]))
        pending = await phase_of(bus, "Pending", "nightly")
        assert pending.status.runs == 0 and store_gets(stack.store) == []
        offset[0] += 60  # past the next firing
        first = await finished(bus, "nightly", runs=1)
        train = blocks_under(stack.entries, "train/")
        assert sorted(store_gets(stack.store)) == sorted(train)
        folder_bytes = stack.entries["train/a.bin"].size + stack.entries["train/sub/b.bin"].size
        assert first.status.progress.bytes_skipped == 0

        offset[0] += 60
        second = await finished(bus, "nightly", runs=2)
        assert second.status.progress.bytes_skipped == second.status.progress.bytes_done == folder_bytes
        assert sorted(store_gets(stack.store)) == sorted(train), "the second run fetched nothing: all was cached"


async def test_a_mount_process_killed_mid_load_is_restarted_and_the_load_completes(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """SIGKILL cuts the two GETs in flight: those two blocks are fetched again by the restarted process (it gets the
    part back after the ack wait), every other block once; the loader folds the second delivery's progress."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        stack.store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("survivor", dataset=NAME))

        async def two_held() -> bool:
            return stack.store.waiting == 2

        await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
        cut = store_gets(stack.store)
        (pid,) = mount_pids(stack.mount)
        os.kill(pid, signal.SIGKILL)
        stack.store.release()
        done = await finished(bus, "survivor", timeout=45)  # the restart and the 5 s ack wait come first
        assert mount_pids(stack.mount) != [pid]
        everything = blocks_under(stack.entries, "")
        assert Counter(store_gets(stack.store)) == {get: 2 if get in cut else 1 for get in everything}
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(everything)
        total = sum(entry.size for entry in stack.entries.values())
        assert (done.status.progress.bytes_done, done.status.progress.files_done) == (total, len(stack.entries))


async def test_a_runtime_applied_again_with_another_block_size_restarts_the_mount_and_loads_use_the_new_size(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A runtime's blockSize changes only by deleting it and applying it again (the runtime service refuses the
    change otherwise). Done back to back, the agent's looks saw no gap: its mount process went on cutting blocks at
    1 MiB while the runtime said 512 KiB, and every load planned at 512 KiB failed ("block 3 is past the end of the
    object"). The mount process now starts again at the new size, and a load fetches every block at it."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, loader(settings):
        (pid,) = mount_pids(stack.mount)
        await bus.publish(subjects.RUNTIME_DELETE, RuntimeDelete(name=NAME))
        await stack.node.apply(NAME, bucket, endpoint=stack.store.endpoint, block_size="512Ki")
        half = BLOCK // 2

        async def resized() -> bool:
            record = await runtime_record(bus, NAME)
            return record is not None and record.status.block_size_bytes == half

        await eventually(resized, what="the runtime applied again at 512Ki")

        async def restarted() -> list[int] | None:
            pids = mount_pids(stack.mount)
            return pids if pids and pids != [pid] else None

        await eventually(restarted, 30, "the mount process started again")
        await stack.node.wait_mounted(NAME, expect="train/sub/b.bin")
        await bus.publish(subjects.DATALOAD_APPLY, dataload("resized", dataset=NAME))
        await finished(bus, "resized")
        expected = []
        for entry in stack.entries.values():
            for index in range(block_count(entry.size, half)):
                start, length = block_span(entry.size, half, index)
                expected.append((entry.key, f"bytes={start}-{start + length - 1}"))
        assert sorted(store_gets(stack.store)) == sorted(expected), "every block fetched once, cut at 512 KiB"


async def test_a_load_whose_final_report_the_stream_refuses_for_a_while_completes_counting_its_part_once(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The progress stream refuses every report (full, discarding new messages) until the mount process has failed
    to publish its part's final report three times: it publishes the same report again until the stream takes it,
    and the load completes with the folder's blocks counted once, as fetched (not run again and counted skipped)."""
    async with single(bus, settings, seaweedfs, bucket, tmp_path) as stack, loader(settings):
        async def loader_consumes() -> bool:  # the loader made its streams and consumer: none is changed after
            return (await bus.js.stream_info(subjects.STREAM_TASKS)).state.consumer_count > 0

        await eventually(loader_consumes, what="the loader's progress consumer")
        # Full at what it holds: one report of another run at least (a limit of 0 would mean none).
        await bus.publish(subjects.task_progress(NODE), TaskProgress(id="before", run="other.1", part=0, node=NODE))
        info = await bus.js.stream_info(subjects.STREAM_TASKS)
        await bus.js.update_stream(dataclasses.replace(info.config, max_msgs=info.state.messages,
                                                       discard=js_api.DiscardPolicy.NEW))
        output: list[str] = []
        try:
            await bus.publish(subjects.DATALOAD_APPLY, dataload("refused", dataset=NAME,
                                                                target=[TargetPath(path="/train")]))

            async def refused() -> bool:
                output.append(capfd.readouterr().err)
                events = [line.get("event") for line in json_lines("".join(output))]
                return events.count("final progress not published, part given back") + \
                    events.count("final progress not published, trying again") >= 3

            await eventually(refused, timeout=60, what="the final report refused three times")
        finally:
            await bus.js.update_stream(info.config)
        done = await finished(bus, "refused", timeout=60)
        train = blocks_under(stack.entries, "train/")
        folder_bytes = stack.entries["train/a.bin"].size + stack.entries["train/sub/b.bin"].size
        progress = done.status.progress
        assert (progress.bytes_done, progress.bytes_skipped, progress.files_done) == (folder_bytes, 0, 2)
        assert sorted(store_gets(stack.store)) == sorted(train), "each block fetched once"


async def leftovers(bus: Bus, name: str) -> list[str]:
    """What the loader still keeps of operation ``name``: its run state, its record, its objects (plan, manifests)."""
    key = subjects.operation_key("DataLoad", "default", name)
    found = []
    for bucket in (subjects.KV_OPERATIONS, subjects.KV_OPERATION_RUNS):
        value, _ = await kv_load(await bus.kv(bucket), key, msgspec.Raw)
        if value is not None:
            found.append(f"{bucket} {key}")
    store = await ManifestStore.of(bus)
    try:
        names = [info.name for info in await store.objects.list(ignore_deletes=True)]
    except NotFoundError:
        names = []
    ours = {subjects.loader_plan(key), subjects.loader_manifest(key), subjects.loader_planned_manifest(key),
            subjects.loader_cleaned(key)}
    return found + sorted(n for n in names if n in ours)


async def queue_drained(bus: Bus, durable: str) -> bool:
    consumer = await bus.js.consumer_info(subjects.task_stream(NODE), durable)
    return consumer.num_pending == 0 and consumer.num_ack_pending == 0


async def test_a_dataload_deleted_with_parts_queued_stops_leaves_nothing_and_applied_again_runs_fresh(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Five parts of one block each (the node works on one at a time): deleted while the store holds the first
    part's GET, the four others still in the node's task stream. The agent takes them and fetches none, the
    loader keeps nothing of the operation, and the same name applied again is a new run that fetches each block
    the first did not, once."""
    monkeypatch.setattr(domain, "MAX_PART_BLOCKS", 1)
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        record = await dataset_record(bus, NAME)
        assert record is not None
        durable = subjects.task_durable(NODE, "default", NAME, record.incarnation)
        stack.store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("doomed", dataset=NAME))

        async def first_held() -> bool:
            return stack.store.waiting == 1

        await eventually(first_held, what="the first part's GET held")
        started = await operation(bus, "doomed")
        assert started is not None and started.status.phase == "Executing" and started.status.runs == 1
        await bus.publish(subjects.DATALOAD_DELETE, DataLoadDelete(name="doomed"))

        async def nothing_left() -> list[str] | None:
            found = await leftovers(bus, "doomed")
            return None if found else ["nothing"]

        await eventually(nothing_left, what="no record, run state or object of the deleted DataLoad")
        stack.store.release()
        await eventually(lambda: queue_drained(bus, durable), what="the deleted run's parts taken off the queue")
        fetched = store_gets(stack.store)
        assert len(fetched) == 1, fetched  # the held one, nothing of the four queued parts

        await bus.publish(subjects.DATALOAD_APPLY, dataload("doomed", dataset=NAME))
        again = await finished(bus, "doomed", runs=2)
        assert again.status.progress.bytes_total == sum(e.size for e in stack.entries.values()), again.status
        gets = store_gets(stack.store)
        assert sorted(gets) == sorted(set(gets)), Counter(gets)  # no block fetched twice
        assert set(gets) == set(blocks_under(stack.entries, "")), gets
        assert not [n for n in await leftovers(bus, "doomed") if n.startswith("loader.")], "the plan goes at the end"


async def test_the_dataset_deleted_mid_load_fails_the_load_naming_it_stops_the_agent_and_leaves_nothing(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domain, "MAX_PART_BLOCKS", 1)
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        stack.store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("doomed", dataset=NAME))

        async def first_held() -> bool:
            return stack.store.waiting == 1

        await eventually(first_held, what="the first part's GET held")
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name=NAME))
        failed = await phase_of(bus, "Failed", name="doomed", runs=1)
        assert f"dataset default/{NAME} was deleted while this run was working" in failed.status.message, failed
        stack.store.release()

        async def unmounted() -> bool:
            return str(stack.mount) not in mounted_paths() and await dataset_record(bus, NAME) is None

        await eventually(unmounted, 30, "the dataset gone and its mount with it")
        assert len(store_gets(stack.store)) == 1, store_gets(stack.store)
        key = subjects.operation_key("DataLoad", "default", "doomed")
        assert [n for n in await leftovers(bus, "doomed") if n.startswith("loader.")] == [], "its plan removed"
        state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS), key, msgspec.Raw)
        assert state is None or b'"parts":[]' in bytes(state) or b'"parts"' not in bytes(state), bytes(state or b"")


async def test_a_dataload_applied_again_and_again_while_it_runs_fetches_no_block_twice_and_ends_on_the_last_spec(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        stack.store.hold()
        train = dataload("again", dataset=NAME, target=[TargetPath(path="/train")])
        await bus.publish(subjects.DATALOAD_APPLY, train)

        async def two_held() -> bool:
            return stack.store.waiting == 2

        await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
        for _ in range(3):  # the same spec: nothing changes
            await bus.publish(subjects.DATALOAD_APPLY, dataload("again", dataset=NAME,
                                                                target=[TargetPath(path="/train")]))
        for targets in (["/train", "/val"], ["/val", "/top.bin", "/train/sub"], ["/train", "/val", "/top.bin"]):
            await bus.publish(subjects.DATALOAD_APPLY, dataload("again", dataset=NAME,
                                                                target=[TargetPath(path=p) for p in targets]))

        async def last_taken_in() -> OperationRecord | None:
            record = await operation(bus, "again")
            return record if record is not None and record.generation == 4 else None

        await eventually(last_taken_in, what="the last spec taken in (generation 4)")
        stack.store.release()

        async def settled() -> OperationRecord | None:
            record = await operation(bus, "again")
            if record is None or record.status.phase not in ("Complete", "Failed"):
                return None
            return record if record.status.observed_generation == record.generation else None

        done = await eventually(settled, 60, "a run of the last spec over")
        assert done.status.phase == "Complete", done.status
        assert [t.path for t in done.load.target] == ["/train", "/val", "/top.bin"] if done.load else False
        last = blocks_under(stack.entries, "train/") | blocks_under(stack.entries, "val/") \
            | blocks_under(stack.entries, "top.bin")
        assert done.status.progress.bytes_total == sum(size_of(stack.entries[b.key], b.index) for b in last.values())
        gets = store_gets(stack.store)
        assert sorted(gets) == sorted(set(gets)), Counter(gets)  # no block fetched twice
        assert set(gets) == set(last), gets
        assert cached(await snapshot(bus, NODE, NAME)) == pairs(last)


async def test_a_dataload_deleted_and_applied_again_at_once_while_its_gets_are_held_fetches_no_block_twice(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack, loader(settings):
        stack.store.hold()
        await bus.publish(subjects.DATALOAD_APPLY, dataload("twice", dataset=NAME))

        async def two_held() -> bool:
            return stack.store.waiting == 2

        await eventually(two_held, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
        await bus.publish(subjects.DATALOAD_DELETE, DataLoadDelete(name="twice"))
        await bus.publish(subjects.DATALOAD_APPLY, dataload("twice", dataset=NAME))

        async def second_run() -> OperationRecord | None:
            record = await operation(bus, "twice")
            return record if record is not None and record.status.runs == 2 else None

        await eventually(second_run, what="the operation applied again, its run 2 started")
        stack.store.release()
        done = await finished(bus, "twice", runs=2)
        gets = store_gets(stack.store)
        assert sorted(gets) == sorted(set(gets)), Counter(gets)  # no block fetched twice
        assert set(gets) == set(blocks_under(stack.entries, "")), gets
        assert done.status.progress.bytes_total == sum(e.size for e in stack.entries.values())
