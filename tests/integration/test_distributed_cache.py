"""The distributed cache end to end (issue 8), with nothing stood in for: a real nats-server, SeaweedFS behind a
counting HTTP proxy (``tests.faults.HttpProxy``: every store GET is counted), the dataset and runtime services
in-process, several real node agents in-process (``agent_stack.cluster_stack``: distinct node names, mount
roots, cache folders and labels, one peer secret), each running its mount process as a real subprocess with a
real FUSE mount read with ordinary file reads. The runtime service picks the cache workers from the agents'
heartbeats; the mount processes read over the ring of block owners it publishes.

Shown: three workers are listed ready with their peer URLs, every file read through every mount has the
source's md5 while each block comes from the store once for the whole cluster, and the dataset's status shows
the remote reads; scaling 3 -> 4 (``shoal scale runtime``) fetches from the store exactly the blocks whose first
owner changed; ``kill -9`` of an owner's mount process in the middle of another node's read costs no EIO, and the
restarted process (same peer port) is taken back into the ring with its disk cache (nothing fetched again); a
Dataset's nodeAffinity keeps an unlabelled agent out of the workers (named in ``notPicked``) while it still
mounts and reads; a worker whose agent stops leaves the ring and reads go on from the second owners; a worker
dropped by a scale-down keeps its blocks, counted on its row of the dataset's status, and reads them from its disk.

The mounts learn the ring from the same runtime record the test waits on (a KV watch); the reads that depend
on a new ring come after the test saw it there and dropped the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from libs import subjects
from libs.blocks import BlockId, block_count, block_span
from libs.bus import Bus
from libs.cli.main import cli
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeRecord, RuntimeSpec, TieredStore
from libs.manifest import ManifestStore
from libs.ring import owners
from tests.conftest import SeaweedServer, put_objects
from tests.faults import HttpProxy
from tests.helpers import dataset_record, eventually, runtime_record
from tests.integration.agent_stack import Cluster, cluster_stack, drop_page_cache, md5, mount_pids, read_file

pytestmark = pytest.mark.needs("fuse")

MiB = 1024 * 1024
BLOCK = MiB
NAME = "shared"
THREE = ("node-a", "node-b", "node-c")
DISK = "shoal.io/disk"
# Three agents without labels (cluster_stack copies each node's labels, so sharing this is safe).
UNLABELLED: dict[str, dict[str, str]] = {node: {} for node in THREE}

# A block as the store proxy sees its GET: (object key, Range header).
Get = tuple[str, str]


def objects_of(count: int, blocks: int, seed: int = 5) -> dict[str, bytes]:
    """``count`` files of a few blocks each, the last block short (sizes differ so block ranges differ).

    Seeded: block names hash the object's ETag (its md5 here), so the same bytes give every run the same owners,
    and the assertions on them (node-a owns some warm blocks, about a quarter moves) cannot fail by chance."""
    rng = random.Random(seed)
    return {f"shard-{i}.bin": rng.randbytes(blocks * BLOCK + 1000 * (i + 1)) for i in range(count)}


async def apply(bus: Bus, cluster: Cluster, store: HttpProxy, bucket: str, replicas: int,
                affinity: dict[str, Any] | None = None) -> None:
    runtime = Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
        replicas=replicas, block_size="1Mi",
        tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="256Mi", path=str(cluster.cache_dir))])))
    dataset = Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(
        mounts=[Mount(mount_point=f"s3://{bucket}/", options={"endpoint": store.endpoint})], node_affinity=affinity))
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))


async def ring_is(bus: Bus, expected: list[str], timeout: float = 60.0) -> RuntimeRecord:
    """The runtime once its workers are ``expected`` (in any order: picks follow the heartbeats' arrival), every
    one ready with a peer URL."""
    async def probe() -> RuntimeRecord | None:
        record = await runtime_record(bus, NAME)
        if record is None:
            return None
        workers = record.status.workers
        done = sorted(w.node for w in workers) == sorted(expected) and all(w.ready and w.peer_url for w in workers)
        return record if done else None

    try:
        return await eventually(probe, timeout, f"workers {expected} ready with peer URLs")
    except AssertionError as err:
        record = await runtime_record(bus, NAME)
        raise AssertionError(f"{err}; runtime status: {record and record.status}") from None


def peer_urls(record: RuntimeRecord) -> dict[str, str]:
    return {worker.node: worker.peer_url for worker in record.status.workers}


async def blocks_of(bus: Bus) -> dict[Get, BlockId]:
    """Every block of the dataset, by the GET that fetches it from the store."""
    record = await dataset_record(bus, NAME)
    assert record is not None and record.status.manifest
    entries = await (await ManifestStore.of(bus)).load(record.status.manifest)
    blocks = {}
    for entry in entries:
        for index in range(block_count(entry.size, BLOCK)):
            start, length = block_span(entry.size, BLOCK, index)
            blocks[(entry.key, f"bytes={start}-{start + length - 1}")] = BlockId(entry.mount, entry.key, entry.etag,
                                                                                 index)
    return blocks


def length_of(get: Get) -> int:
    """The bytes of a block's GET, from its Range header (``bytes=<first>-<last>``)."""
    first, last = get[1].removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1


def store_gets(store: HttpProxy, since: int = 0) -> list[Get]:
    return [(call.path.rsplit("/", 1)[1], call.range or "") for call in store.ranged_gets()[since:]]


async def read_everything(cluster: Cluster, objects: dict[str, bytes], nodes: tuple[str, ...] | list[str]) -> None:
    """Every file through every node's mount, one node after the other; each file's md5 must be the source's.

    One node at a time: a peer that does not answer within its read timeout (3 s) sends the read to the next
    source, the store, by design; reading on every node at once on a loaded 2-core machine could starve one that
    long and fetch a block twice. Concurrent misses meeting at an owner are test_peer_reads' job."""
    for node in nodes:
        mount = cluster.agents[node].mountpoint(NAME)
        for key, body in objects.items():
            assert md5(await read_file(mount / key)) == md5(body), f"wrong bytes of {key} through {node}'s mount"


async def status_nodes(bus: Bus, check: Any, what: str) -> DatasetRecord:
    async def probe() -> DatasetRecord | None:
        record = await dataset_record(bus, NAME)
        return record if record is not None and check(record) else None

    return await eventually(probe, 15, what)


@contextlib.asynccontextmanager
async def counted_cluster(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
                          objects: dict[str, bytes], labels: dict[str, dict[str, str]],
                          ) -> AsyncIterator[tuple[Cluster, HttpProxy]]:
    """``objects`` in the bucket, the store behind a counting proxy, and the agents of ``labels`` running."""
    await put_objects(seaweedfs, bucket, objects)
    store = HttpProxy(seaweedfs.endpoint)
    await store.start()
    try:
        async with cluster_stack(bus, settings, seaweedfs, tmp_path, labels) as cluster:
            yield cluster, store
    finally:
        await store.stop()



async def scale_with_cli(settings: Settings, replicas: int) -> None:
    """``shoal scale runtime NAME --replicas N``, as a user types it."""
    url = ",".join(settings.nats.urls)
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", url, "scale", "runtime", NAME,
                                                               "--replicas", str(replicas)])
    assert result.exit_code == 0, result.output

async def test_three_workers_fetch_each_block_once_for_the_cluster(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = objects_of(3, 3)
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, objects, UNLABELLED) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=3)
        record = await ring_is(bus, list(THREE))
        assert record.status.not_picked == []
        assert len({w.peer_url for w in record.status.workers}) == 3
        await cluster.wait_mounted(NAME, "shard-2.bin")

        await read_everything(cluster, objects, THREE)
        blocks = await blocks_of(bus)
        gets = store_gets(store)
        assert sorted(gets) == sorted(blocks), "each block fetched from the store exactly once for the cluster"

        total = sum(len(body) for body in objects.values())

        def every_node_counted(record: DatasetRecord) -> bool:
            nodes = record.status.nodes
            return (len(nodes) == 3 and sum(n.store_read_bytes for n in nodes) == total
                    and all(n.remote_read_bytes > 0 for n in nodes))

        done = await status_nodes(bus, every_node_counted, "every node's reads in the dataset's status")
        assert [n.node for n in done.status.nodes] == list(THREE)
        assert sum(n.cached_bytes for n in done.status.nodes) >= total  # owners (and second owners) keep it
        assert done.status.cache_states.remote_hit_ratio != "0.0%"


async def test_scaling_3_to_4_fetches_only_the_blocks_whose_first_owner_changed(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = objects_of(4, 4)
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, objects, UNLABELLED) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=3)
        await ring_is(bus, list(THREE))
        cluster.start_agent("node-d")  # started once the three are picked: a client of the dataset

        async def d_is_a_client() -> bool:
            record = await runtime_record(bus, NAME)
            return record is not None and [p.node for p in record.status.not_picked] == ["node-d"]

        await eventually(d_is_a_client, 20, "node-d serving the runtime as a client")
        four = [*THREE, "node-d"]
        await cluster.wait_mounted(NAME, "shard-3.bin")
        await read_everything(cluster, objects, four)
        blocks = await blocks_of(bus)
        assert sorted(store_gets(store)) == sorted(blocks)

        await scale_with_cli(settings, 4)
        await ring_is(bus, four)
        before = len(store.ranged_gets())
        await asyncio.to_thread(drop_page_cache)
        await read_everything(cluster, objects, four)

        moved = {get for get, block in blocks.items() if owners(block.name, four)[0] == "node-d"}
        assert 0 < len(moved) < len(blocks) / 2, f"about a quarter of {len(blocks)} blocks moves, not {moved}"
        assert len(moved) == 5, "5 of these 20 blocks (seeded bytes) score highest on node-d"
        assert sorted(store_gets(store, before)) == sorted(moved), \
            "only the blocks node-d now owns first came from the store, once each"


async def test_kill_9_of_an_owner_mid_read_then_it_comes_back_with_its_cache(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    warm = objects_of(3, 3)
    big = {"big.bin": random.Random(12).randbytes(12 * BLOCK + 77)}
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, {**warm, **big}, UNLABELLED) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=3)
        record = await ring_is(bus, list(THREE))
        victim_url = peer_urls(record)["node-a"]
        await cluster.wait_mounted(NAME, "big.bin")
        await read_everything(cluster, warm, ["node-c"])  # every owner caches the blocks it owns first
        blocks = await blocks_of(bus)
        warm_blocks = {get for get in blocks if get[0] in warm}
        assert sorted(store_gets(store)) == sorted(warm_blocks)
        assert any(owners(blocks[get].name, THREE)[0] == "node-a" for get in warm_blocks)

        victim = cluster.agents["node-a"].mountpoint(NAME)
        [pid] = mount_pids(victim)
        store.hold()  # the owners' store GETs for node-c's read wait: the read is in flight when node-a dies
        reading = asyncio.ensure_future(read_file(cluster.agents["node-c"].mountpoint(NAME) / "big.bin"))
        try:
            async def fetching() -> bool:
                return store.waiting > 0

            await eventually(fetching, what="a block of big.bin being fetched for node-c")
            os.kill(pid, signal.SIGKILL)
        finally:
            store.release()
        data = await asyncio.wait_for(reading, 60)
        assert md5(data) == md5(big["big.bin"]), "the read through node-c returns the source's bytes"

        async def out_of_the_ring() -> bool:  # its agent reports the mount down: no peer URL, no ring place
            record = await runtime_record(bus, NAME)
            return record is not None and any(w.node == "node-a" and not (w.ready and w.peer_url)
                                              for w in record.status.workers)

        await eventually(out_of_the_ring, 20, "node-a out of the ring while its mount process is down")

        async def restarted() -> int | None:
            pids = [p for p in mount_pids(victim) if p != pid]
            return pids[0] if pids else None

        new_pid = await eventually(restarted, 30, "node-a's mount process restarted by its agent")
        argv = Path(f"/proc/{new_pid}/cmdline").read_bytes().decode().split("\0")
        assert victim_url.endswith(":" + argv[argv.index("--peer-port") + 1]), "restarted on the same peer port"
        await cluster.wait_mounted(NAME, "big.bin", ["node-a"])
        assert peer_urls(await ring_is(bus, list(THREE)))["node-a"] == victim_url

        # Back in the ring with its disk cache: the warm blocks (a third of them node-a's) come from the
        # owners' disks through every mount, not one from the store.
        before = len(store.ranged_gets())
        await asyncio.to_thread(drop_page_cache)
        await read_everything(cluster, warm, THREE)
        assert store_gets(store, before) == [], "no warm block fetched from the store again"


async def test_node_affinity_keeps_an_unlabelled_agent_a_client(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = objects_of(2, 3)
    labels = {"node-a": {DISK: "ssd"}, "node-b": {DISK: "ssd"}, "node-c": {DISK: "hdd"}}
    affinity = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": DISK, "operator": "In", "values": ["ssd"]}]}]}}
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, objects, labels) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=3, affinity=affinity)
        await ring_is(bus, ["node-a", "node-b"])

        async def c_not_picked() -> RuntimeRecord | None:
            record = await runtime_record(bus, NAME)
            return record if record and [p.node for p in record.status.not_picked] == ["node-c"] else None

        record = await eventually(c_not_picked, 20, "node-c in notPicked")
        assert record.status.not_picked[0].reason.startswith("does not match nodeAffinity"), record.status
        await cluster.wait_mounted(NAME, "shard-1.bin")
        await read_everything(cluster, objects, THREE)
        assert sorted(store_gets(store)) == sorted(await blocks_of(bus))

        total = sum(len(body) for body in objects.values())
        done = await status_nodes(bus, lambda r: len(r.status.nodes) == 3 and r.status.nodes[2].remote_read_bytes
                                  == total, "node-c's reads counted")
        node_c = done.status.nodes[2]
        assert (node_c.node, node_c.cached_bytes, node_c.store_read_bytes) == ("node-c", 0, 0), \
            "a client reads everything from the workers and keeps nothing"


async def test_a_worker_whose_agent_stops_leaves_the_ring_and_reads_go_on(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = objects_of(3, 3)
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, objects, UNLABELLED) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=3)
        await ring_is(bus, list(THREE))
        await cluster.wait_mounted(NAME, "shard-2.bin")
        # Read through node-a and node-c: each block's second owner among them asks the first and keeps a copy.
        await read_everything(cluster, objects, ["node-a", "node-c"])
        blocks = await blocks_of(bus)
        assert sorted(store_gets(store)) == sorted(blocks)
        assert any(owners(block.name, THREE)[0] == "node-b" for block in blocks.values())

        await cluster.stop_agent("node-b")

        async def b_not_ready() -> RuntimeRecord | None:
            record = await runtime_record(bus, NAME)
            workers = {w.node: w.ready for w in record.status.workers} if record else {}
            return record if workers == {"node-a": True, "node-b": False, "node-c": True} else None

        await eventually(b_not_ready, 20, "node-b picked but not ready")
        before = len(store.ranged_gets())
        await asyncio.to_thread(drop_page_cache)
        await read_everything(cluster, objects, ["node-a", "node-c"])
        # node-b's blocks are read from their second owners, who kept them: the store is not asked again.
        assert store_gets(store, before) == []


async def test_a_worker_scaled_down_keeps_its_blocks_counted_and_reads_them_as_a_client(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # A worker dropped by a scale-down stays a client of the dataset (its agent still serves the runtime): its mount
    # keeps the blocks it cached as an owner, in its tiers' quota and its inventory (the dataset's status counts
    # them on its row), and reads them from its own disk. They leave as any cached block does: a DataClean (every
    # ready node), a resync that changes their object, the dataset's deletion; and a scale-up finds them again.
    objects = objects_of(3, 3)
    two = ("node-a", "node-b")
    async with counted_cluster(bus, settings, seaweedfs, bucket, tmp_path, objects, {node: {} for node in two}) as (
            cluster, store):
        await apply(bus, cluster, store, bucket, replicas=2)
        await ring_is(bus, list(two))
        await cluster.wait_mounted(NAME, "shard-2.bin")
        await read_everything(cluster, objects, ["node-a"])  # node-a keeps every block: first or second owner
        blocks = await blocks_of(bus)
        assert sorted(store_gets(store)) == sorted(blocks)

        await scale_with_cli(settings, 1)

        async def one_worker() -> str | None:
            record = await runtime_record(bus, NAME)
            workers = record.status.workers if record else []
            return workers[0].node if len(workers) == 1 and workers[0].ready and workers[0].peer_url else None

        kept = await eventually(one_worker, 30, "one worker left, in the ring")
        [dropped] = [node for node in two if node != kept]
        # node-a held every block (first or second owner); node-b those it owned first.
        held = sum(length_of(get) for get, block in blocks.items()
                   if dropped == "node-a" or owners(block.name, two)[0] == dropped)
        total = sum(len(body) for body in objects.values())
        assert held > 0

        def row(record: DatasetRecord, node: str) -> Any:
            return next((n for n in record.status.nodes if n.node == node), None)

        before = row(await status_nodes(bus, lambda r: (n := row(r, dropped)) is not None and n.cached_bytes == held,
                                        f"{dropped}'s cached blocks counted on its row"), dropped)
        gets = len(store.ranged_gets())
        await asyncio.to_thread(drop_page_cache)
        await read_everything(cluster, objects, [dropped])
        assert store_gets(store, gets) == [], "nothing fetched from the store again"
        after = row(await status_nodes(
            bus, lambda r: (n := row(r, dropped)) is not None
            and n.local_read_bytes + n.remote_read_bytes - before.local_read_bytes - before.remote_read_bytes == total,
            f"{dropped}'s reads counted"), dropped)
        assert after.local_read_bytes - before.local_read_bytes == held, "its own blocks read from its own disk"
        assert after.cached_bytes == held, "a client keeps what it had, and caches nothing more"
