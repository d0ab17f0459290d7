"""Reference datasets end to end (issue 13.3): a Dataset in another namespace mounting ``dataset://default/src``,
on a real nats-server, SeaweedFS behind a counting HTTP proxy (``tests.faults.HttpProxy``: every store GET is
counted), the dataset and runtime services and a node agent in-process, the source's mount process a real
subprocess with a real FUSE mount, read with ordinary file reads.

Shown: the reference is Bound once its source is and its mount point shows the source's files; after every file
was read once through the source (warm), every file read through the reference has the source's md5 with zero
store GETs (the reference reads the source's mount and block cache: the kernel's page cache is dropped for each
file first, so the reads reach the mount process); the reference's status mirrors the source's (ufsTotal,
fileNum, cacheStates, nodes) and the source names it (``datasetRef``, as Fluid); the scheduler scores a use of
the reference (or of the folder it shows) by the source's cached bytes; a reference to itself, one mixing
``dataset://`` with a store, and a cycle are refused with what to change, a missing source fails the reference
with a message; deleting a reference leaves the source Bound, mounted and cached (read again: still no GET);
deleting the source fails the references to it.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.events.schedule import DatasetUse, ScoreRequest
from tests.conftest import SeaweedServer, put_objects
from tests.faults import HttpProxy
from tests.helpers import FactCollector, dataset_record, eventually
from tests.integration.agent_stack import NODE, Node, evict_from_page_cache, md5, node_stack, read_file
from tests.integration.test_scheduler_api import ask, scheduler

pytestmark = pytest.mark.needs("fuse")

MiB = 1024 * 1024
SOURCE = "src"


def reference(name: str, namespace: str, *mount_points: str) -> DatasetApply:
    mounts = [Mount(mount_point=point, name=f"m{i}") for i, point in enumerate(mount_points)]
    return DatasetApply(id=f"apply-{namespace}-{name}", dataset=Dataset(
        metadata=ObjectMeta(name=name, namespace=namespace),
        spec=DatasetSpec(mounts=mounts if len(mounts) > 1 else [Mount(mount_point=mount_points[0])])))


async def read_all(mount: Path, objects: dict[str, bytes]) -> None:
    """Every file through ``mount``, each from the mount process (its pages dropped from the kernel's cache first)."""
    for key, body in objects.items():
        if os.path.exists(mount / key):
            evict_from_page_cache(mount / key)
        assert md5(await read_file(mount / key)) == md5(body), f"wrong bytes of {key} through {mount}"


async def status_of(bus: Bus, name: str, namespace: str, check: Callable[[DatasetRecord], bool],
                    what: str) -> DatasetRecord:
    async def probe() -> DatasetRecord | None:
        record = await dataset_record(bus, name, namespace)
        return record if record is not None and check(record) else None

    try:
        return await eventually(probe, 15, what)
    except AssertionError as err:
        record = await dataset_record(bus, name, namespace)
        raise AssertionError(f"{err}; status: {record and record.status}") from None


async def test_a_reference_in_another_namespace_reads_the_sources_cache(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    rng = random.Random(13)
    objects = {"a.bin": rng.randbytes(2 * MiB + 100), "dir/b.bin": rng.randbytes(MiB // 2), "c.txt": b"hello\n"}
    await put_objects(seaweedfs, bucket, objects)
    store = HttpProxy(seaweedfs.endpoint)
    await store.start()
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_REJECTED)
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply(SOURCE, bucket, endpoint=store.endpoint)
            await bus.publish(subjects.DATASET_APPLY, reference("ref", "team-b", "dataset://default/src"))
            source_mount = await node.wait_mounted(SOURCE, "a.bin")
            await read_all(source_mount, objects)  # warm: each block from the store once
            warm_gets = len(store.ranged_gets())
            assert warm_gets > 0

            ref_mount = node.mountpoint("ref", "team-b")
            await eventually(lambda: _exists(ref_mount / "dir" / "b.bin"), 15, "the reference's files visible")
            await read_all(ref_mount, objects)
            assert len(store.ranged_gets()) == warm_gets, "a read through the reference went to the store"

            source = await node.record(SOURCE)

            def mirrors(record: DatasetRecord) -> bool:
                status = record.status
                return (status.phase == "Bound" and status.file_num == source.status.file_num == len(objects)
                        and status.ufs_total == source.status.ufs_total and bool(status.nodes)
                        and status.cache_states.cached == source.status.cache_states.cached != "")

            await status_of(bus, "ref", "team-b", mirrors, "the reference mirrors the source")
            await status_of(bus, SOURCE, "default", lambda r: r.status.dataset_ref == ["team-b/ref"],
                            "the source's datasetRef names the reference")
            await _refusals(bus, facts, node)

            # The scheduler places work using the reference where the source's cache is (its folder's bytes).
            await bus.publish(subjects.DATASET_APPLY, reference("ref-c", "team-c", "dataset://default/src/dir"))
            async with scheduler(settings):
                for name, namespace, cached in (("ref", "team-b", sum(map(len, objects.values()))),
                                                ("ref-c", "team-c", len(objects["dir/b.bin"]))):
                    await eventually(functools.partial(_scored, bus, name, namespace, cached), 15,
                                     f"{namespace}/{name}'s use scored on node-a's {cached} cached bytes")

            # A second reference, then the first deleted: the source is left Bound, mounted and cached.
            await eventually(lambda: _exists(node.mountpoint("ref-c", "team-c") / "b.bin"), 15, "ref-c linked")
            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="ref", namespace="team-b"))
            await eventually(lambda: _gone(ref_mount), 15, "the reference's link removed")
            await status_of(bus, SOURCE, "default", lambda r: r.status.dataset_ref == ["team-c/ref-c"],
                            "the source's datasetRef names its one reference left")
            assert (await node.record(SOURCE)).status.phase == "Bound"
            await read_all(source_mount, objects)
            assert len(store.ranged_gets()) == warm_gets, "the source's cache was touched by deleting a reference"

            await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name=SOURCE))
            failed = await status_of(bus, "ref-c", "team-c", lambda r: r.status.phase == "Failed",
                                     "ref-c Failed once its source is deleted")
            assert "source dataset default/src does not exist: create it" in failed.status.message
            await eventually(lambda: _gone(node.mountpoint("ref-c", "team-c")), 15, "ref-c's link removed")
    finally:
        await store.stop()


async def _refusals(bus: Bus, facts: FactCollector, node: Node) -> None:
    """Itself, mixed mounts and a cycle are refused with what to change; a missing source fails the reference."""
    await bus.publish(subjects.DATASET_APPLY, reference("self", "team-b", "dataset://team-b/self"))
    rejected = await facts.wait_for("dataset.rejected.v1", name="self")
    assert "names this dataset itself" in rejected["reason"]
    await bus.publish(subjects.DATASET_APPLY, reference("mixed", "team-b", "dataset://default/src", "s3://x-bucket"))
    rejected = await facts.wait_for("dataset.rejected.v1", name="mixed")
    assert "cannot be combined with other mounts" in rejected["reason"]

    await bus.publish(subjects.DATASET_APPLY, reference("a", "team-b", "dataset://team-c/b"))
    missing = await status_of(bus, "a", "team-b", lambda r: r.status.phase == "Failed", "a fails: b is missing")
    assert "source dataset team-c/b does not exist" in missing.status.message
    await bus.publish(subjects.DATASET_APPLY, reference("b", "team-c", "dataset://team-b/a"))
    rejected = await facts.wait_for("dataset.rejected.v1", name="b")
    assert "would make a cycle" in rejected["reason"]
    assert await dataset_record(bus, "b", "team-c") is None
    assert not os.path.lexists(node.mountpoint("a", "team-b"))


async def _scored(bus: Bus, name: str, namespace: str, cached: int) -> bool:
    reply = await ask(bus, ScoreRequest(datasets=[DatasetUse(name=name, namespace=namespace)]))
    return not reply.error and [(s.node, s.cached_bytes) for s in reply.scores] == [(NODE, cached)]


async def _exists(path: Path) -> bool:
    return os.path.exists(path)


async def _gone(path: Path) -> bool:
    return not os.path.lexists(path)
