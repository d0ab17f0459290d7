"""The caches stopped mounts leave on disk for datasets that still exist (``NodeAgent.left_caches``), on real files:
freed when the dataset turns out to be another incarnation of its name, deleted and applied again unseen; and the
cache of a deleted dataset whose folder another process holds, freed later (``NodeAgent.unfreed``), and so are
the blocks of a tier the runtime dropped whose folder another process holds."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from libs import subjects
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount
from libs.events.runtime import Level, Runtime, RuntimeRecord, RuntimeSpec, TieredStore
from services.agent import app, domain
from services.agent.app import UNBOUND_GRACE_SECONDS, MountWorker, NodeAgent
from services.agent.cache import BlockCache, DiskTier
from services.agent.ledger import FILE_NAME, TierLedger
from services.agent.mountinfo import canonical
from tests.helpers import make_settings, unwatched_mirror
from tests.unit.test_block_cache import block, payload

REF = ("default", "ds")


def dataset(incarnation: str) -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="ds", namespace="default"),
                                         spec=DatasetSpec(mounts=[Mount(mount_point="s3://ds/")])),
                         generation=1, incarnation=incarnation)


def agent_with_cache(tmp_path: Path, incarnation: str) -> tuple[NodeAgent, Path]:
    """An agent (never run: ``reconcile`` driven by hand) of a node whose runtime is gone and whose dataset exists,
    holding the mount of ``incarnation`` past its unbound grace, with a block of it on disk; and the cache folder."""
    settings = make_settings("nats://127.0.0.1:1")
    settings = dataclasses.replace(settings, agent=dataclasses.replace(settings.agent,
                                                                       mount_root=str(tmp_path / "mnt")))
    (tmp_path / "mnt").mkdir()
    levels = [Level(mediumtype="SSD", quota="1Mi", path=str(tmp_path / "ssd"))]
    suffix = domain.cache_suffix(settings.agent.cache_subdir, *REF)
    cache = BlockCache.from_levels(levels, suffix)
    cache.load()
    assert cache.put(block(0), payload(0))
    datasets = unwatched_mirror(None, DatasetRecord)
    datasets.values[subjects.resource_key(*REF)] = dataset(incarnation)
    agent = NodeAgent(settings, bus=None, runtimes=unwatched_mirror(None, RuntimeRecord),  # type: ignore[arg-type]
                      datasets=datasets, swept=True, ledger=TierLedger(tmp_path / "mnt" / FILE_NAME))
    worker = MountWorker(*REF, path=domain.mountpoint(settings.agent.mount_root, *REF), incarnation=incarnation,
                         levels=levels, unwanted_since=time.monotonic() - UNBOUND_GRACE_SECONDS - 1)
    agent.workers[REF] = worker
    agent.ledger.record(REF, levels)  # as the start of its mount process did
    return agent, tmp_path / "ssd" / suffix


async def test_the_cache_left_by_a_stopped_mount_is_freed_when_its_dataset_is_applied_again_unseen(
        tmp_path: Path) -> None:
    # The mount stopped after its grace, its blocks kept (the dataset still existed) with no incarnation: the dataset
    # deleted and applied again without the agent seeing the delete was taken for the same one, and the old
    # dataset's blocks for the new one's.
    agent, folder = agent_with_cache(tmp_path, "first")
    await agent.reconcile()
    assert REF not in agent.workers and REF in agent.left_caches
    assert folder.is_dir()  # the dataset may be bound again: its blocks are kept meanwhile
    await agent.reconcile()
    assert folder.is_dir()  # the same dataset: kept
    agent.datasets.values[subjects.resource_key(*REF)] = dataset("second")
    await agent.reconcile()
    assert not folder.exists() and REF not in agent.left_caches
    assert REF not in agent.ledger.caches


async def test_an_agent_restarted_after_its_dataset_was_applied_again_frees_the_old_blocks(tmp_path: Path) -> None:
    # The ledger keeps the incarnation the blocks are of: an agent that comes back to another one frees them before
    # a mount of the new dataset could take them for its own.
    agent, folder = agent_with_cache(tmp_path, "first")
    agent.ledger.record(REF, agent.workers.pop(REF).levels, [], "first")  # as ``_start_worker`` writes it
    restarted = NodeAgent(agent.settings, bus=None, runtimes=agent.runtimes,  # type: ignore[arg-type]
                          datasets=agent.datasets, ledger=TierLedger(tmp_path / "mnt" / FILE_NAME))
    restarted.ledger.load()
    assert restarted.ledger.incarnations == {REF: "first"}
    restarted.swept = False
    agent.datasets.values[subjects.resource_key(*REF)] = dataset("second")
    await restarted.reconcile()
    assert not folder.exists() and REF not in restarted.ledger.caches


async def test_a_deleted_datasets_cache_held_by_another_process_is_kept_in_the_ledger_and_freed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The dataset was deleted while the agent was down, and its mount process, which outlived the agent, still holds
    # the folder: the sweep leaves the blocks to it. It forgot the ledger's entry all the same, so if that process
    # then died without freeing them (or the runtime was gone), nothing ever looked for the blocks again.
    agent, folder = agent_with_cache(tmp_path, "first")
    agent.workers.clear()
    del agent.datasets.values[subjects.resource_key(*REF)]
    agent.swept = False
    old_mount = DiskTier(folder, 1 << 20)  # its own open file of the lock, as another process has
    assert old_mount.hold()
    blocks = sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file() and len(path.name) == 32)
    assert blocks
    writing = folder / blocks[0].parent / f".{blocks[0].name}.4194304.0.tmp"  # a write of it in flight
    writing.write_bytes(b"half a block")
    await agent.reconcile()
    assert all((folder / block).is_file() for block in blocks)  # its blocks: left to it
    assert writing.is_file()  # and not read either: a scan deletes other processes' unfinished writes
    assert REF in agent.ledger.caches and REF in agent.unfreed
    reloaded = TierLedger(tmp_path / "mnt" / FILE_NAME)
    reloaded.load()
    assert REF in reloaded.caches  # an agent restarted now still looks for them
    await agent.reconcile()
    assert folder.is_dir()  # not before the retry is due, and the folder is held anyway
    old_mount.release()  # it died without freeing them
    monkeypatch.setattr(app, "FREE_RETRY_SECONDS", 0.0)
    agent.unfreed_retry_at = 0.0
    await agent.reconcile()
    assert not folder.exists()
    assert REF not in agent.ledger.caches and not agent.unfreed


async def test_a_dropped_tiers_folder_held_by_another_process_stays_in_the_ledger(tmp_path: Path) -> None:
    # The runtime's tiers moved to another directory; the old one's folder is still held by a mount process that
    # outlived the agent. It is left to that process, and the ledger keeps the retired tiers for a later try.
    agent, folder = agent_with_cache(tmp_path, "first")
    worker = agent.workers[REF]
    old_levels = worker.levels
    worker.levels = [Level(mediumtype="SSD", quota="1Mi", path=str(tmp_path / "ssd2"))]
    worker.retired = list(old_levels)
    agent.ledger.record(REF, worker.levels, worker.retired, "first")
    old_mount = DiskTier(folder, 1 << 20)
    assert old_mount.hold()
    await agent._free_retired(worker)
    assert folder.is_dir()
    assert agent.ledger.retired.get(REF) == old_levels  # still to be freed: an agent restarted now finds it
    assert worker.retired == old_levels  # and the worker, to try again (``NodeAgent.reconcile``)
    old_mount.release()
    await agent._free_retired(worker)
    assert not folder.exists() and REF not in agent.ledger.retired


async def test_a_dropped_tiers_folder_held_by_another_process_is_tried_again_while_the_agent_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The held folder was left in the ledger, but not tried again before the agent's next start: if the process
    # holding it died without freeing it (a mount process that outlived an earlier agent), its blocks stayed on disk,
    # in no tier's quota, for as long as the agent ran.
    agent, folder = agent_with_cache(tmp_path, "first")
    worker = agent.workers[REF]
    new_levels = [Level(mediumtype="SSD", quota="1Mi", path=str(tmp_path / "ssd2"))]
    agent.runtimes.values[subjects.resource_key(*REF)] = RuntimeRecord(
        runtime=Runtime(metadata=ObjectMeta(name="ds", namespace="default"),
                        spec=RuntimeSpec(tieredstore=TieredStore(levels=new_levels))), generation=1)
    agent.datasets.values[subjects.resource_key(*REF)] = msgspec.structs.replace(
        dataset("first"), status=DatasetStatus(phase="Bound", manifest="manifest"))
    # Its mount process now runs mounted on the new tiers (a stand-in: nothing is asked of it but that it runs).
    worker.retired, worker.levels = list(worker.levels), new_levels
    worker.process = SimpleNamespace(pid=0, returncode=None)  # type: ignore[assignment]
    agent.ledger.record(REF, worker.levels, worker.retired, "first")
    monkeypatch.setattr(app, "devices", lambda: {canonical(worker.path): 1})
    old_mount = DiskTier(folder, 1 << 20)
    assert old_mount.hold()
    await agent.reconcile()
    assert folder.is_dir() and agent.ledger.retired.get(REF)  # left to that process
    old_mount.release()  # it died without freeing them
    await agent.reconcile()
    assert folder.is_dir()  # not before the retry is due
    monkeypatch.setattr(app, "FREE_RETRY_SECONDS", 0.0)
    worker.retired_retry_at = 0.0
    await agent.reconcile()
    assert not folder.exists() and REF not in agent.ledger.retired and not worker.retired


async def test_a_dropped_tiers_folder_held_when_its_mount_stops_for_good_is_freed_once_let_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime's tiers moved to another directory; the old one's folder is held by a mount process that outlived
    # an earlier agent, and the dataset's mount then stops for good (unbound past its grace, the dataset kept). The
    # worker that was to try again went with the mount, so the blocks stayed on disk, in no tier's quota, until the
    # agent's next start or the dataset's delete, however soon the holder let go.
    agent, folder = agent_with_cache(tmp_path, "first")
    worker = agent.workers[REF]
    worker.retired = list(worker.levels)
    worker.levels = [Level(mediumtype="SSD", quota="1Mi", path=str(tmp_path / "ssd2"))]
    agent.ledger.record(REF, worker.levels, worker.retired, "first")
    monkeypatch.setattr(app, "FREE_RETRY_SECONDS", 0.0)  # each look is a retry: what is asked is that one comes
    old_mount = DiskTier(folder, 1 << 20)
    assert old_mount.hold()
    await agent.reconcile()
    assert REF not in agent.workers and REF in agent.left_caches  # stopped for good, its dataset kept
    assert folder.is_dir() and agent.ledger.retired.get(REF)  # left to the holder, in the ledger
    await agent.reconcile()
    assert folder.is_dir()  # still held
    old_mount.release()  # the holder let go (it stopped without freeing them)
    await agent.reconcile()
    assert not folder.exists() and REF not in agent.ledger.retired
    assert agent.ledger.caches.get(REF) == worker.levels  # the cache kept for the dataset is untouched
