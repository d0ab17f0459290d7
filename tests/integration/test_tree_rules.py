"""How object keys become the mounted tree (docs/semantics.md), on real components: the dataset service and its
sync over a real nats-server, real FUSE mounts of SeaweedFS buckets read with ordinary tools. Keys SeaweedFS will
not store as given (a leading '/', '//', long names, NUL) come from a small fake store below the sync
(tests/faults.py); the sync, manifest, status and the agent's tree above it are the real ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from libs import paths, subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import (
    Dataset,
    DatasetApply,
    DatasetDelete,
    DatasetRecord,
    DatasetResync,
    DatasetSpec,
    ManifestEntry,
    Mount,
)
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.manifest import ManifestStore
from libs.ufs import ObjectInfo, ObjectStore, open_store
from libs.ufs.base import Location, S3Location
from services.agent.namespace import ROOT_INODE, InodeAllocator, Namespace, Node
from services.dataset import app as dataset_app
from services.dataset.domain import CONDITION_SKIPPED
from services.dataset.sync import StoreOpener
from tests.conftest import SeaweedServer, put_objects
from tests.faults import ExtraKeys, ListedStore
from tests.helpers import FactCollector, dataset_record, eventually, nest_beyond_path_max, running
from tests.integration.agent_stack import node_stack, read_file, run_tool
from tests.metric_values import exists, value


async def synced(bus: Bus, name: str) -> DatasetRecord:
    async def probe() -> DatasetRecord | None:
        record = await dataset_record(bus, name)
        return record if record and record.status.synced_generation >= 1 else None

    return await eventually(probe, what=f"{name} synced")


async def manifest_of(bus: Bus, record: DatasetRecord) -> list[ManifestEntry]:
    return await (await ManifestStore.of(bus)).load(record.status.manifest)


def walk(tree: Namespace, path: str) -> Node | None:
    node = tree.get(ROOT_INODE)
    for name in path.strip("/").split("/"):
        node = tree.lookup(node.inode, name) if node is not None else None
    return node


async def sync_with(bus: Bus, settings: Settings, dataset: Dataset, opener: StoreOpener,
                    ) -> tuple[DatasetRecord, list[ManifestEntry], list[MutableMapping[str, Any]]]:
    """The real dataset service, listing through ``opener``: the synced record, its manifest and the log."""
    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: dataset_app.run(settings, stop, opener=opener)):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
            record = await synced(bus, dataset.metadata.name)
    return record, await manifest_of(bus, record), logs


# 29 objects listed: 21 files and one folder marker are visible, 7 keys are left out, each for its own reason.
VISIBLE = {f"ok/{i:02d}.bin": bytes(i + 1) for i in range(20)} | {"x/y": b"under x"}
LEFT_OUT = {
    "x": b"a file where a folder is",
    "a//b": b"empty name",
    "/etc/passwd": b"leading slash",
    "d/./e": b"dot",
    "d/../e": b"dot dot",
    "n" * 256: b"long name",
    "nul\0byte": b"nul",
}


async def test_status_counts_what_the_tree_shows_and_reports_what_it_leaves_out(bus: Bus,
                                                                                settings: Settings) -> None:
    objects = {**VISIBLE, **LEFT_OUT, "empty/": b""}
    dataset = Dataset(metadata=ObjectMeta(name="odd"), spec=DatasetSpec(mounts=[Mount(mount_point="s3://odd-keys")]))
    record, manifest, logs = await sync_with(bus, settings, dataset, lambda location: ListedStore(objects))

    status = record.status
    assert status.file_num == len(VISIBLE) == 21
    assert status.ufs_total_bytes == sum(len(body) for body in VISIBLE.values())
    (condition,) = [c for c in status.conditions if c.type == CONDITION_SKIPPED]
    assert condition.status == "True"
    assert condition.message.startswith("7 of 29 listed objects are not in the tree: "), condition.message
    assert "'a//b' (mount 0): has an empty name" in condition.message
    (line,) = [log for log in logs if log["event"] == "objects left out of the tree"]
    assert (line["listed"], line["skipped"], len(line["examples"])) == (29, 7, paths.EXAMPLES)
    # The manifest holds only what the mount shows, and the agent's tree built from it agrees with the sync.
    assert sorted(e.key for e in manifest) == sorted([*VISIBLE, "empty/"])
    tree = Namespace.build(manifest, InodeAllocator())
    assert tree.skipped.count == 0
    assert sorted(e.key for e in tree.files()) == sorted(VISIBLE)
    assert tree.total_bytes == status.ufs_total_bytes
    x, empty = walk(tree, "/x"), walk(tree, "/empty")
    assert x is not None and x.is_dir and [n.name for n in tree.children(x.inode)] == ["y"]
    assert empty is not None and empty.is_dir and tree.children(empty.inode) == []


async def test_the_objects_left_out_are_a_gauge_per_dataset_until_it_is_deleted(bus: Bus,
                                                                              settings: Settings) -> None:
    objects = {**VISIBLE, **LEFT_OUT}
    dataset = Dataset(metadata=ObjectMeta(name="counted"),
                      spec=DatasetSpec(mounts=[Mount(mount_point="s3://odd-keys")]))
    label = {"dataset": "default/counted"}

    async def gauge_at(want: float) -> bool:
        return exists("shoal_dataset_skipped_objects", **label) and value("shoal_dataset_skipped_objects",
                                                                          **label) == want

    async with running(lambda stop: dataset_app.run(settings, stop, opener=lambda location: ListedStore(objects))):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
        record = await synced(bus, "counted")
        assert record.status.skipped_objects == len(LEFT_OUT) == 7
        await eventually(lambda: gauge_at(7), what="7 objects left out, as a gauge")
        # The store cleaned up and listed again: the gauge says 0 (a series an alert compares), not nothing.
        for key in LEFT_OUT:
            del objects[key]
        await bus.publish(subjects.DATASET_RESYNC, DatasetResync(name="counted"))
        await eventually(lambda: gauge_at(0), what="no object left out, as a gauge")
        assert (await synced(bus, "counted")).status.skipped_objects == 0
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="counted"))

        async def gone() -> bool:
            return not exists("shoal_dataset_skipped_objects", **label)

        await eventually(gone, what="the deleted dataset's series removed")


async def test_keys_never_leave_their_mount(bus: Bus, settings: Settings) -> None:
    # "s3://bucket-a/prefix" lists "prefix//b/f" as the key "/b/f" and "/prefix/../b" is not a key of it either:
    # joined onto the mount's folder "/a" with posixpath, "/b/f" would become mount 1's file.
    stores = {"bucket-a": {"/b/f": b"bytes of bucket a", "b//f": b"also a", "ok": b"a"},
              "bucket-b": {"f": b"bytes of bucket b"}}

    def opener(location: Location) -> ObjectStore:
        assert isinstance(location, S3Location)
        return ListedStore(stores[location.bucket])

    dataset = Dataset(metadata=ObjectMeta(name="two"), spec=DatasetSpec(mounts=[
        Mount(mount_point="s3://bucket-a/prefix", path="/a"), Mount(mount_point="s3://bucket-b", path="/b")]))
    record, manifest, _ = await sync_with(bus, settings, dataset, opener)

    roots = {0: "/a/", 1: "/b/"}
    assert all(entry.path.startswith(roots[entry.mount]) for entry in manifest), manifest
    # Each mount's folder marker, then its files.
    assert sorted((e.path, e.mount, e.key) for e in manifest) == [("/a/", 0, ""), ("/a/ok", 0, "ok"), ("/b/", 1, ""),
                                                                  ("/b/f", 1, "f")]
    tree = Namespace.build(manifest, InodeAllocator())
    f = walk(tree, "/b/f")
    assert f is not None and f.entry is not None and (f.entry.mount, f.entry.key) == (1, "f")
    assert record.status.file_num == 2
    (condition,) = [c for c in record.status.conditions if c.type == CONDITION_SKIPPED]
    assert condition.message.startswith("2 of 4 listed objects")


# --- through a real FUSE mount ---


async def apply_node_dataset(bus: Bus, node_cache: Path, name: str, mounts: list[Mount]) -> None:
    runtime = Runtime(metadata=ObjectMeta(name=name), spec=RuntimeSpec(
        tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="64Mi", path=str(node_cache))]),
        block_size="1Mi"))
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
    await bus.publish(subjects.DATASET_APPLY,
                      DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=mounts))))


async def test_a_key_with_a_leading_slash_cannot_shadow_another_mounts_file(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    other = f"t-{uuid.uuid4().hex[:12]}"
    async with seaweedfs.client() as client:
        await client.create_bucket(Bucket=other)
    mine, theirs = b"bytes of the first bucket", b"bytes of the second bucket"
    await put_objects(seaweedfs, bucket, {"b/f": mine})
    await put_objects(seaweedfs, other, {"f": theirs})
    # AWS S3 would list a key "/b/f" in the first bucket; SeaweedFS stores it as "b/f", so the listing adds it.
    escaping = ObjectInfo(key="/b/f", size=len(mine), etag=hashlib.md5(mine).hexdigest(), mtime=1.0)

    def opener(location: Location) -> ObjectStore:
        store = open_store(location)
        return ExtraKeys(store, [escaping]) if isinstance(location, S3Location) and location.bucket == bucket else store

    async with node_stack(bus, settings, seaweedfs, tmp_path, opener=opener) as node:
        await apply_node_dataset(bus, tmp_path / "cache", "shadow", [
            Mount(mount_point=f"s3://{bucket}", path="/a"), Mount(mount_point=f"s3://{other}", path="/b")])
        root = await node.wait_mounted("shadow", expect="b/f")
        assert await read_file(root / "b/f") == theirs
        assert await read_file(root / "a/b/f") == mine
        record = await node.record("shadow")
        assert record.status.file_num == 2


async def test_folder_shadows_file_markers_are_folders_and_cache_reaches_100_percent(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # SeaweedFS does store "x" beside "x/y", and lists zero-byte "folder/" markers.
    await put_objects(seaweedfs, bucket, {"x": b"file x", "x/y": b"under x", "empty/": b"", "keep.txt": b"kept"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("tree", bucket)
        root = await node.wait_mounted("tree", expect="keep.txt")
        found = await run_tool("find", str(root), "-mindepth", "1", "-printf", "%y %P\n")
        assert sorted(found.stdout.splitlines()) == ["d empty", "d x", "f keep.txt", "f x/y"]
        assert await asyncio.to_thread(os.listdir, root / "empty") == []
        record = await node.record("tree")
        assert (record.status.file_num, record.status.ufs_total_bytes) == (2, len(b"under x") + len(b"kept"))
        (condition,) = [c for c in record.status.conditions if c.type == CONDITION_SKIPPED]
        assert condition.message == "1 of 4 listed objects are not in the tree: 'x' (mount 0): " + paths.SHADOWED
        # Everything the mount shows can be cached, so the dataset can reach 100 %.
        for path in ("x/y", "keep.txt"):
            await read_file(root / path)

        async def all_cached() -> DatasetRecord | None:
            record = await node.record("tree")
            return record if record.status.cache_states.cached_percentage == "100.0%" else None

        await eventually(all_cached, what="cachedPercentage 100.0%")


async def test_every_mount_has_its_folder_even_with_nothing_below_it(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # "b/" is what a console's "Create folder" leaves: the prefix of mount b holds its own marker and nothing else;
    # nothing at all is below "c/" (yet). Both folders were missing (ENOENT), not empty.
    await put_objects(seaweedfs, bucket, {"a/x": b"x", "b/": b""})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await apply_node_dataset(bus, node.cache_dir, "mounts", [
            Mount(mount_point=f"s3://{bucket}/a/", name="a"), Mount(mount_point=f"s3://{bucket}/b/", name="b"),
            Mount(mount_point=f"s3://{bucket}/c", path="/deep/c")])
        root = await node.wait_mounted("mounts", expect="a/x")
        found = await run_tool("find", str(root), "-mindepth", "1", "-printf", "%y %P\n")
        assert sorted(found.stdout.splitlines()) == ["d a", "d b", "d deep", "d deep/c", "f a/x"]
        assert await asyncio.to_thread(os.listdir, root / "b") == []
        # An empty mount's folder has the dataset's time, not 1970; one with files the time of its newest.
        times = {path: (await asyncio.to_thread(os.stat, root / path)).st_mtime for path in (".", "a", "a/x", "b")}
        assert times["a"] == times["a/x"] and times["b"] == times["."] > 0
        record = await node.record("mounts")
        assert (record.status.file_num, record.status.ufs_total_bytes) == (1, 1)
        assert not [c for c in record.status.conditions if c.type == CONDITION_SKIPPED]


async def test_a_local_folder_nested_beyond_path_max_is_left_out_and_the_rest_mounted(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "deep").mkdir(parents=True)
    (data / "top.txt").write_bytes(b"top")
    (data / "deep" / "shallow.txt").write_bytes(b"shallow")
    nest_beyond_path_max(str(data / "deep"), b"no call opens this path")
    settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service, local_roots=[str(data)]))
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await apply_node_dataset(bus, tmp_path / "cache", "deep", [Mount(mount_point=f"local://{data}")])
        # One folder no path-taking call accepts used to fail the whole dataset ("cannot list ...: File name too
        # long"), so nothing was mounted.
        root = await node.wait_mounted("deep", expect="deep/shallow.txt")
        found = await run_tool("find", str(root), "-type", "f", "-printf", "%P\n")
        assert sorted(found.stdout.splitlines()) == ["deep/shallow.txt", "top.txt"]
        assert await read_file(root / "deep/shallow.txt") == b"shallow"
        record = await node.record("deep")
        assert record.status.phase == "Bound" and record.status.file_num == 2
        (condition,) = [c for c in record.status.conditions if c.type == CONDITION_SKIPPED]
        assert condition.message.startswith("1 of 3 listed objects are not in the tree: 'deep/ddd"), condition.message
        assert condition.message.endswith(
            "(mount 0): has a path longer than the system's limit (4096 bytes): it cannot be opened")


async def test_deleted_object_is_estale_and_long_names_are_enametoolong(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"gone.txt": b"soon deleted", "here.txt": b"stays"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("del", bucket)
        root = await node.wait_mounted("del", expect="here.txt")
        async with seaweedfs.client() as client:
            await client.delete_object(Bucket=bucket, Key="gone.txt")
        with pytest.raises(OSError) as raised:
            await read_file(root / "gone.txt")
        assert raised.value.errno == errno.ESTALE, raised.value
        assert await read_file(root / "here.txt") == b"stays"
        for name in ("n" * 256, "é" * 128):
            with pytest.raises(OSError) as raised:
                await asyncio.to_thread(os.stat, root / name)
            assert raised.value.errno == errno.ENAMETOOLONG, raised.value
        with pytest.raises(OSError) as raised:
            await asyncio.to_thread(os.stat, root / ("n" * 255))
        assert raised.value.errno == errno.ENOENT


async def test_a_prefix_whose_name_a_url_would_change_is_refused_not_another_listed(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    # S3 keeps "new\nline/" apart from "newline/"; read as a URL, the mount point lost its line break and the
    # dataset was Bound with the files of the other prefix, the wrong bytes under the right names.
    await put_objects(seaweedfs, bucket, {"new\nline/a.txt": b"the prefix named", "newline/a.txt": b"another one"})
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_REJECTED)
    dataset = Dataset(metadata=ObjectMeta(name="nl"),
                      spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/new\nline/")]))
    async with running(lambda stop: dataset_app.run(settings, stop)):
        apply = DatasetApply(dataset=dataset)
        await bus.publish(subjects.DATASET_APPLY, apply)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=apply.id)
    assert "holds a line break, which reading it as a URL would drop" in rejected["reason"], rejected
    assert await dataset_record(bus, "nl") is None
