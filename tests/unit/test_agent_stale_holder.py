"""A mount start waiting for its cache folder while an earlier mount process of the same mount, one an earlier run
of the agent started and that never exits, serves it at the old block size: the agent stops that process (TERM, then
KILL a grace later), and leaves any other process alone. Real processes on real files."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from libs import subjects
from libs.events.common import ObjectMeta
from libs.events.dataset import DatasetStatus
from libs.events.runtime import Runtime, RuntimeRecord, RuntimeSpec, TieredStore
from services.agent import app
from services.agent.app import NodeAgent
from services.agent.cache.locks import Holder
from services.agent.mountstatus import MountStatus, waiting_step, write_status
from tests.unit.test_agent_left_caches import REF, agent_with_cache, dataset

# Holds the folder's lock shared, as a mount process serving it, and ignores SIGTERM: a mount process that never
# exits. Its command line is a mount process's of the mount point given (after the script).
NEVER_EXITS = """
import signal, sys
from services.agent.cache import DiskTier
signal.signal(signal.SIGTERM, signal.SIG_IGN)
tier = DiskTier(sys.argv[1], 1 << 20)
assert tier.hold()
print("serving", flush=True)
sys.stdin.readline()
"""


def holding(folder: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", NEVER_EXITS, str(folder), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "serving\n"
    with process:
        yield process
        if process.poll() is None:
            process.kill()


def starting_agent(tmp_path: Path) -> tuple[NodeAgent, Path]:
    """An agent whose mount of the dataset is starting (a stand-in process), and the mount's cache folder."""
    agent, folder = agent_with_cache(tmp_path, "first")
    worker = agent.workers[REF]
    agent.runtimes.values[subjects.resource_key(*REF)] = RuntimeRecord(
        runtime=Runtime(metadata=ObjectMeta(name="ds", namespace="default"),
                        spec=RuntimeSpec(tieredstore=TieredStore(levels=worker.levels))), generation=1)
    agent.datasets.values[subjects.resource_key(*REF)] = msgspec.structs.replace(
        dataset("first"), status=DatasetStatus(phase="Bound", manifest="manifest"))
    worker.unwanted_since = None
    worker.process = SimpleNamespace(pid=0, returncode=None)  # type: ignore[assignment]
    worker.status_file = str(tmp_path / "status.json")
    return agent, folder


def waits_for(agent: NodeAgent, pid: int) -> None:
    """The start's status as mountd writes it while the folder is held shared by ``pid``."""
    write_status(agent.workers[REF].status_file, MountStatus(
        pid=1, starting=waiting_step([Holder(pid, exclusive=False)]), waiting_for=[pid]))


async def test_the_agent_stops_an_earlier_mount_process_of_the_mount_that_holds_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, folder = starting_agent(tmp_path)
    worker = agent.workers[REF]
    for old in holding(folder, "-m", "services.agent.mountd", "--mountpoint", worker.path):
        waits_for(agent, old.pid)
        [report] = agent._mount_reports()
        assert report[0].state == "Starting" and f"held by process {old.pid} (shared)" in report[0].message
        await agent.reconcile()
        assert old.pid in worker.stale_holders  # told to stop (SIGTERM), which it ignores
        assert old.poll() is None
        monkeypatch.setattr(app, "STOP_GRACE_SECONDS", 0.0)
        await agent.reconcile()
        assert old.wait(10) == -9  # killed a grace later


async def test_the_agent_leaves_another_process_holding_the_folder_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, folder = starting_agent(tmp_path)
    worker = agent.workers[REF]
    monkeypatch.setattr(app, "STOP_GRACE_SECONDS", 0.0)
    for other in holding(folder, "-m", "services.agent.mountd", "--mountpoint", str(tmp_path / "elsewhere")):
        waits_for(agent, other.pid)
        await agent.reconcile()
        await agent.reconcile()
        assert not worker.stale_holders and other.poll() is None  # not a mount process of this mount
