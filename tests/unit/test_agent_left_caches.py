"""The caches stopped mounts leave on disk for datasets that still exist (``NodeAgent.left_caches``), on real files:
freed when the dataset turns out to be another incarnation of its name, deleted and applied again unseen."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from libs import subjects
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Level, RuntimeRecord
from services.agent import domain
from services.agent.app import UNBOUND_GRACE_SECONDS, MountWorker, NodeAgent
from services.agent.cache import BlockCache
from services.agent.ledger import FILE_NAME, TierLedger
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
