"""A mount process (``MountedDataset``) reloading the tree of a large dataset, on a real nats-server: the reload
builds the new tree and works out what changed in a thread, so the event loop that serves every FUSE request keeps
serving meanwhile. No FUSE mount: which thread does the work is what is checked (how long the loop stalls is a
speed, which a test on a loaded machine does not assert)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from libs.bus import Bus
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, ManifestEntry, Mount
from libs.manifest import ManifestStore, ManifestWriter
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
