"""A mount process (``MountedDataset``) starting with, or reloading, the tree of a large dataset, on a real
nats-server: the start builds its first tree, and a reload builds the new tree and works out what changed, in a
thread, so the event loop (which serves every FUSE request, NATS and the side server's /healthz) keeps serving
meanwhile. No FUSE mount: which thread does the work, and what the loop answers while it runs, is what is checked
(how long the loop stalls is a speed, which a test on a loaded machine does not assert)."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.agent import BlockId
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, ManifestEntry, Mount
from libs.events.runtime import Level, Runtime, RuntimeRecord, RuntimeSpec, TieredStore
from libs.manifest import ManifestStore, ManifestWriter
from libs.side_server import Readiness, SideServer
from services.agent import mountd as mountd_module
from services.agent.cache import BlockCache, MemoryTier
from services.agent.fs import DatasetFS
from services.agent.mountd import MountedDataset
from services.agent.namespace import Namespace

FILES = 5_000
BLOCK = 64 * 1024


def entries(count: int) -> list[ManifestEntry]:
    return [ManifestEntry(path=f"/d{i // 1000:03d}/f{i:06d}", mount=0, key=f"d{i // 1000:03d}/f{i:06d}", size=1,
                          etag="e1", mtime=0.0) for i in range(count)]


async def test_a_reload_of_a_large_tree_leaves_the_mounts_event_loop_serving(
        bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tree was built and compared with the served one on the event loop: a resync of 300,000 files stalled
    # every read and `ls` of the mount for ~10 s (~45 s at 1.28M files).
    listed = entries(FILES)
    store = await ManifestStore.of(bus)
    with ManifestWriter() as writer:
        for entry in listed:
            writer.add(entry)
        await store.save("default.big", writer, first=True)
    record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="big"),
                                           spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{tmp_path}")])),
                           generation=1, status=DatasetStatus(manifest="default.big"))
    mounted = MountedDataset(settings, bus, "default", "big", str(tmp_path / "mnt"))
    served = Namespace.build(listed[:-1000], mounted.allocator)
    fs = DatasetFS(served, None, uid=None, gid=None, block_size=BLOCK, no_open=True)  # type: ignore[arg-type]
    # Where the two long steps run: the build of the new tree and its comparison with the served one.
    threads: dict[str, set[int]] = {"build": set(), "compare": set()}
    build, compare = Namespace.build.__func__, mountd_module.tree_changes  # type: ignore[attr-defined]

    def built(cls: type[Namespace], *args: Any, **kwargs: Any) -> Namespace:
        threads["build"].add(threading.get_ident())
        return build(cls, *args, **kwargs)

    def compared(*args: Any) -> Any:
        threads["compare"].add(threading.get_ident())
        return compare(*args)

    monkeypatch.setattr(Namespace, "build", classmethod(built))
    monkeypatch.setattr(mountd_module, "tree_changes", compared)
    await mounted._reload(fs, BlockCache([MemoryTier(4 * BLOCK)]), record)

    assert fs.namespace is not served and len(list(fs.namespace.files())) == FILES
    assert fs.namespace.find(listed[-1].path) == listed[-1]
    loop_thread = threading.get_ident()  # the test's, the event loop's
    assert threads["build"] and loop_thread not in threads["build"], "the new tree was built on the event loop"
    assert threads["compare"] and loop_thread not in threads["compare"], "the trees were compared on the event loop"


class _Sentinel(Exception):
    """Ends a start once its tree is built: what comes after (a FUSE mount) is not what these tests look at."""


class Watched(list[ManifestEntry]):
    """A manifest's entries, noting the threads that walk them."""

    walkers: set[int]

    def __iter__(self) -> Iterator[ManifestEntry]:
        self.walkers.add(threading.get_ident())
        return super().__iter__()


async def save_manifest(bus: Bus, name: str, listed: list[ManifestEntry], first: bool = True) -> None:
    store = await ManifestStore.of(bus)
    with ManifestWriter() as writer:
        for entry in listed:
            writer.add(entry)
        await store.save(name, writer, first=first)


def record_of(tmp_path: Path, manifest: str, generation: int = 1) -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="big"),
                                         spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{tmp_path}")])),
                         generation=generation, status=DatasetStatus(manifest=manifest))


async def test_the_first_tree_of_a_large_dataset_is_built_while_the_process_answers_its_health_check(
        bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reload built its tree in a thread, but the start built the first one on the event loop: for a million files
    # the process's /healthz, its NATS connection and its status went unanswered for seconds before the mount was up.
    listed = entries(FILES)
    await save_manifest(bus, "default.big", listed)
    key = subjects.resource_key("default", "big")
    await (await bus.kv(subjects.KV_DATASETS)).put(key, msgspec.json.encode(record_of(tmp_path, "default.big")))
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="big"), spec=RuntimeSpec(
        tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Mi")]), block_size=BLOCK)), generation=1)
    await (await bus.kv(subjects.KV_RUNTIMES)).put(key, msgspec.json.encode(runtime))
    side = SideServer(Readiness(), "127.0.0.1", 0)
    port = await side.start()
    mounted = MountedDataset(settings, bus, "default", "big", str(tmp_path / "mnt"))
    seen: dict[str, Any] = {}
    build = Namespace.build.__func__  # type: ignore[attr-defined]

    def built(cls: type[Namespace], *args: Any, **kwargs: Any) -> Namespace:
        seen["thread"] = threading.get_ident()
        # The health check asked while the tree is being built: answered only if the loop is free to answer it.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
                seen["healthz"] = answer.status
        except OSError as err:
            seen["healthz"] = f"not answered: {err}"
        seen["tree"] = build(cls, *args, **kwargs)
        raise _Sentinel

    monkeypatch.setattr(Namespace, "build", classmethod(built))
    try:
        with pytest.raises(_Sentinel):
            await mounted.run(asyncio.Event())
    finally:
        mounted.metrics.close()
        for task in list(mounted.preparing):
            task.cancel()
        await asyncio.gather(*mounted.preparing, return_exceptions=True)
        for gate in mounted.gates:
            await gate.store.close()
        await side.stop()
    assert len(seen["tree"]) > FILES
    assert seen["thread"] != threading.get_ident(), "the first tree was built on the event loop"
    assert seen["healthz"] == 200, seen["healthz"]


async def test_a_reload_drops_the_blocks_of_what_changed_without_walking_the_manifest_on_the_event_loop(
        bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every reload made a set of every entry's (mount, key, ETag) on the event loop, to find the cached blocks of
    # objects gone from the manifest: ~0.4 s of a stalled loop and ~100 MB for a million files, at every resync,
    # while the reload's tree and comparison (which know what changed) ran in a thread.
    listed = entries(FILES)
    changed = msgspec.structs.replace(listed[1], etag="e2")
    new = [listed[0], changed, *listed[3:]]  # listed[2] gone, listed[1] at another ETag
    await save_manifest(bus, "default.big-2", new)
    mounted = MountedDataset(settings, bus, "default", "big", str(tmp_path / "mnt"))
    served = Namespace.build(listed, mounted.allocator)
    fs = DatasetFS(served, None, uid=None, gid=None, block_size=BLOCK, no_open=True)  # type: ignore[arg-type]
    cache = BlockCache([MemoryTier(16 * BLOCK)])
    kept = [BlockId(entry.mount, entry.key, entry.etag, 0) for entry in (listed[0], listed[-1], changed)]
    dropped = [BlockId(entry.mount, entry.key, entry.etag, 0) for entry in (listed[1], listed[2])]
    for block in kept + dropped:
        assert cache.put(block, b"x")
    walkers: set[int] = set()
    load = ManifestStore.load

    async def loaded(self: ManifestStore, name: str) -> list[ManifestEntry]:
        watched = Watched(await load(self, name))
        watched.walkers = walkers
        return watched

    monkeypatch.setattr(ManifestStore, "load", loaded)
    await mounted._reload(fs, cache, record_of(tmp_path, "default.big-2", generation=2))

    assert {block for block, _ in cache.blocks()} == set(kept)
    assert walkers and threading.get_ident() not in walkers, "the manifest was walked on the event loop"
