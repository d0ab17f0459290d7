"""The scheduler with three real agents (``agent_stack.cluster_stack``: in-process agents, real mount processes, real
FUSE mounts read with ordinary reads), SeaweedFS, and the dataset and runtime services.

The runtime has no cache workers (``replicas: 0``): every node reads the store and caches what it reads itself, so
"read through node-c" puts the bytes on node-c. Shown: after reading two of three files through node-c, the NATS API
ranks node-c first (its share, whole files), node-b next (same zone), node-a last (same region); path hints and
required mode follow the files read; a restarted scheduler gives the very same answer; deleting the dataset frees
its caches and the scheduler forgets it; the dataset applied again and read through node-a moves the answer there;
a delta published by hand with a gap in node-a's sequence makes the scheduler ask node-a, whose agent answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
from nats.aio.msg import Msg

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.agent import InventoryDelta, InventoryRequest
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.events.schedule import DatasetUse, ScoreReply, ScoreRequest
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import dataset_record, eventually
from tests.integration.agent_stack import Cluster, cluster_stack, md5, read_file
from tests.integration.test_scheduler_api import ask, ranking, scheduler

pytestmark = pytest.mark.needs("fuse")

T = TypeVar("T")
MiB = 1 << 20
NAME = "scored"
ZONE, REGION = "topology.kubernetes.io/zone", "topology.kubernetes.io/region"
NODES = {"node-a": {ZONE: "z1", REGION: "r1"}, "node-b": {ZONE: "z2", REGION: "r1"},
         "node-c": {ZONE: "z2", REGION: "r1"}}
# Two blocks each (1 MiB blocks), the last one short.
OBJECTS = {f"f{i}.bin": bytes([i]) * (MiB + 1000 * (i + 1)) for i in range(3)}
TOTAL = sum(len(body) for body in OBJECTS.values())
WHOLE = ScoreRequest(datasets=[DatasetUse(name=NAME)])


async def apply(bus: Bus, cluster: Cluster, bucket: str, endpoint: str) -> None:
    runtime = Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
        replicas=0, block_size="1Mi",
        tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="64Mi", path=str(cluster.cache_dir))])))
    dataset = Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(
        mounts=[Mount(mount_point=f"s3://{bucket}/", options={"endpoint": endpoint})]))
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))


async def read_through(cluster: Cluster, node: str, *keys: str) -> None:
    mount = cluster.agents[node].mountpoint(NAME)
    for key in keys:
        assert md5(await read_file(mount / key)) == md5(OBJECTS[key]), f"wrong bytes of {key} through {node}"


async def ranked(bus: Bus, first: str, share: float, request: ScoreRequest = WHOLE) -> ScoreReply | None:
    reply = await ask(bus, request)
    top = reply.scores[0] if reply.scores else None
    return reply if top is not None and top.node == first and abs(top.share - share) < 1e-6 else None


async def test_the_scheduler_follows_the_bytes_of_real_agents(bus: Bus, settings: Settings,
                                                             seaweedfs: SeaweedServer, bucket: str,
                                                             tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, OBJECTS)
    async with cluster_stack(bus, settings, seaweedfs, tmp_path, NODES) as cluster:
        await apply(bus, cluster, bucket, seaweedfs.endpoint)
        await cluster.wait_mounted(NAME, expect="f2.bin")
        async with scheduler(settings):
            await read_through(cluster, "node-c", "f0.bin", "f1.bin")
            share = (len(OBJECTS["f0.bin"]) + len(OBJECTS["f1.bin"])) / TOTAL
            reply = await eventually(lambda: ranked(bus, "node-c", round(share, 6)),
                                     what="node-c first with the two files read through it")
            assert [node for node, _ in ranking(reply)] == ["node-c", "node-b", "node-a"]
            assert ranking(reply)[1][1] == round(50 * share) and ranking(reply)[2][1] == round(20 * share)
            assert "(2 whole files)" in reply.scores[0].reason
            f2 = await ask(bus, ScoreRequest(datasets=[DatasetUse(name=NAME, paths=["/f2.bin"],
                                                                  required=True)]))
            assert f2.scores == [] and set(f2.filtered) == set(NODES)
            f0 = await ask(bus, ScoreRequest(datasets=[DatasetUse(name=NAME, paths=["/f0.bin"],
                                                                  required=True)]))
            assert ranking(f0) == [("node-c", 100)] and set(f0.filtered) == {"node-a", "node-b"}

        async with scheduler(settings) as handlers:
            again = await eventually(lambda: ranked(bus, "node-c", round(share, 6)),
                                     what="the same answer after a restart")
            assert again.scores == reply.scores

            # Eviction: deleting the dataset frees every node's cache; the scheduler forgets the dataset.
            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name=NAME))

            async def forgotten() -> ScoreReply | None:
                answer = await ask(bus, WHOLE)
                return answer if answer.error == f"unknown dataset default/{NAME}" else None

            await eventually(forgotten, timeout=30, what="the deleted dataset forgotten")
            await eventually(lambda: _gone(bus), timeout=30, what="the dataset record gone")
            await apply(bus, cluster, bucket, seaweedfs.endpoint)
            await cluster.wait_mounted(NAME, expect="f2.bin")
            await read_through(cluster, "node-a", "f2.bin")
            moved = await eventually(lambda: ranked(bus, "node-a", round(len(OBJECTS["f2.bin"]) / TOTAL, 6)),
                                     timeout=20, what="node-a first once it holds the only cached file")
            # node-c's blocks went with the deleted dataset: it holds nothing now.
            assert {s.node: s.cached_bytes for s in moved.scores} == {
                "node-a": len(OBJECTS["f2.bin"]), "node-b": 0, "node-c": 0}

            # A gap in node-a's sequence (a delta published by hand two numbers ahead): the scheduler asks node-a
            # for a snapshot of this dataset, and the real agent answers with one.
            requests: list[InventoryRequest] = []
            snapshots: list[bytes] = []

            async def on_request(request: InventoryRequest) -> None:
                requests.append(request)

            async def on_inventory(message: Msg) -> None:
                if b"agent.inventory.snapshot" in message.data:
                    snapshots.append(message.data)

            listeners = [
                await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest), on_request),
                await bus.nc.subscribe(subjects.agent_inventory("node-a"), cb=on_inventory)]
            try:
                position = handlers().fold.datasets[("default", NAME)]["node-a"].position
                await bus.publish(subjects.agent_inventory("node-a"), InventoryDelta(
                    node="node-a", dataset=ObjectRef(name=NAME), incarnation=position.incarnation,
                    seq=position.seq + 2, counters=position.counters))
                asked = await eventually(lambda: _found([r for r in requests if r.node == "node-a"]),
                                         what="a snapshot request to node-a after the gap")
                assert asked[0].dataset == ObjectRef(name=NAME)
                await eventually(lambda: _found(snapshots), what="node-a's agent answering with a snapshot")
            finally:
                for listener in listeners:
                    await listener.unsubscribe()


async def _found(items: list[T]) -> list[T]:
    return items


async def _gone(bus: Bus) -> bool:
    return await dataset_record(bus, NAME) is None
