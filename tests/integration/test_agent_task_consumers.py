"""Each mount process of a node pulls its own parts, on a real nats-server: two datasets whose namespace and name
read the same once joined with '-' (``ml``/``prod-x`` and ``ml-prod``/``x``) are two durables on the node's task
stream, each filtering its own dataset's subject. They were one durable, ``tasks-<node>-ml-prod-x``: the second
mount process bound to the first one's (nats-py's ``pull_subscribe`` uses a durable it finds as it is), pulled the
other dataset's parts and dropped them as addressed to another mount, and its own were never delivered, so both
loads failed on the loader's silent-node timeout.

The runners are the mount process's own class, in-process, over local-folder stores.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from libs import subjects
from libs.bus import Bus
from libs.events.agent import CachedFile
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import ManifestEntry
from libs.events.operation import DataLoadSpec, DatasetRef, NodeTask, OperationRecord, OperationStatus, TaskProgress
from libs.ufs import LocalLocation, LocalObjectStore
from services.agent.cache import BlockCache, DiskTier
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, StoreGate
from services.agent.tasks import TaskRunner
from tests.helpers import eventually

NODE = "consumers-node"
BLOCK = 1024
# Joined with '-', both read "ml-prod-x".
DATASETS = (ObjectRef(name="prod-x", namespace="ml"), ObjectRef(name="x", namespace="ml-prod"))


async def _runner(bus: Bus, dataset: ObjectRef, folder: Path) -> tuple[TaskRunner, NodeTask]:
    """A mount process's task runner for ``dataset`` over a one-file store, and a part loading that file."""
    (folder / "store").mkdir(parents=True)
    (folder / "store" / "a").write_bytes(b"a" * 2 * BLOCK)
    store = LocalObjectStore(LocalLocation(root=folder / "store"))
    cache = BlockCache([DiskTier(folder / "cache", 64 * BLOCK)])
    cache.load()
    reader = BlockReader(cache, [StoreGate(store)], BLOCK, MemoryBudget(16 * BLOCK), write_block=cache.put_async)
    entry = ManifestEntry(path="/a", mount=0, key="a", size=2 * BLOCK, etag=(await store.head("a")).etag, mtime=0.0)
    key = subjects.operation_key("DataLoad", dataset.namespace, "warm")
    await (await bus.kv(subjects.KV_OPERATIONS)).put(key, msgspec.json.encode(OperationRecord(
        kind="DataLoad", metadata=ObjectMeta(name="warm", namespace=dataset.namespace),
        load=DataLoadSpec(dataset=DatasetRef(name=dataset.name, namespace=dataset.namespace)),
        status=OperationStatus(phase="Executing", runs=1))))
    run = f"{key}.1"
    part = NodeTask(id=f"{run}.0", run=run, part=0, parts=1, node=NODE, dataset=dataset, action="load",
                    blocks=[CachedFile(0, "a", entry.etag, [(0, BLOCK), (1, BLOCK)])])
    return TaskRunner(bus, NODE, dataset, cache, reader, lambda: {(0, "a"): entry}, concurrency=2), part


async def test_two_mounts_whose_namespace_and_name_join_alike_each_get_their_own_parts(bus: Bus,
                                                                                      tmp_path: Path) -> None:
    await bus.provision_node_tasks(NODE)
    reports: list[TaskProgress] = []

    async def on_progress(message: Msg) -> None:
        reports.append(msgspec.json.decode(message.data, type=TaskProgress))

    subscription = await bus.nc.subscribe(subjects.task_progress(NODE), cb=on_progress)
    made = [await _runner(bus, dataset, tmp_path / dataset.namespace) for dataset in DATASETS]
    runners = [runner for runner, _ in made]
    running = [asyncio.ensure_future(runner.run()) for runner in runners]
    try:
        for runner, part in made:
            await bus.publish(runner.subject, part)

        async def finals() -> dict[str, TaskProgress] | None:
            ended = {report.run: report for report in reports if report.done}
            return ended if len(ended) == len(made) else None

        ended = await eventually(finals, 20, "both parts' final progress")
        for _, part in made:
            final = ended[part.run]
            assert (final.failed, final.message, final.bytes_done) == (0, "", 2 * BLOCK), final
        # Each durable filters its own dataset's subject.
        for runner in runners:
            info = await bus.js.consumer_info(runner.stream, runner.durable)
            assert info.config.filter_subject == runner.subject
    finally:
        for runner in runners:
            runner.stop()
        await asyncio.wait_for(asyncio.gather(*running), 20)
        await subscription.unsubscribe()
