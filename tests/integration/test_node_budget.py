"""One node, many datasets: the read-ahead and MEM tier budgets hold for the node, not per mount.

Three datasets mounted by one agent are read at once (large sequential files, so read-ahead engages) while the
node's read-ahead budget file is sampled: its total never exceeds SHOAL_READAHEAD_BUDGET, and every byte read is
right. The MEM tiers together get SHOAL_MEMORY_TIER_BUDGET, each at most its runtime's quota; a mount process
killed while holding read-ahead gives it back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
from pathlib import Path

import pytest

from libs.bus import Bus
from libs.config import Settings
from services.agent.mountstatus import read_status
from services.agent.nodebudget import SlotFile
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import md5, mount_pids, node_stack, run_tool

MiB = 1024 * 1024
READAHEAD_BUDGET = 6 * MiB  # six 1 MiB blocks for three readers that would each like sixteen
MEM_QUOTA = 8 * MiB  # per runtime
MEM_BUDGET = 12 * MiB  # the node: one and a half runtimes' worth
SSD_QUOTA = 256 * MiB
DATASETS = ["alpha", "beta", "gamma"]

pytestmark = pytest.mark.needs("fuse")


def mount_args(pid: int) -> dict[str, str]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}


class Sampler:
    """Reads the node's slots over and over in a thread, keeping the largest total seen."""

    def __init__(self, path: str) -> None:
        self.file = SlotFile(path)
        self.peak = 0
        self.totals: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(self.file.slots())
            self.totals.append(total)
            self.peak = max(self.peak, total)
            self._stop.wait(0.001)  # a sampling interval, not a wait for anything

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.file.close()


async def test_many_mounts_share_the_node_budgets(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                  bucket: str, tmp_path: Path) -> None:
    bodies = {name: os.urandom(16 * MiB + 1000 * index) for index, name in enumerate(DATASETS)}
    await put_objects(seaweedfs, bucket, {f"{name}/model.bin": body for name, body in bodies.items()})
    async with node_stack(bus, settings, seaweedfs, tmp_path, readahead_budget=str(READAHEAD_BUDGET),
                          memory_tier_budget=str(MEM_BUDGET)) as node:
        for name in DATASETS:
            await node.apply(name, bucket, prefix=f"{name}/", mem=f"{MEM_QUOTA // MiB}Mi", ssd=f"{SSD_QUOTA // MiB}Mi")
        roots = {name: await node.wait_mounted(name, expect="model.bin") for name in DATASETS}
        args = {name: mount_args(pid) for name in DATASETS for pid in mount_pids(roots[name])}
        assert sorted(args) == DATASETS
        (budget_file,) = {a["--budget-file"] for a in args.values()}
        assert sorted(int(a["--budget-slot"]) for a in args.values()) == [0, 1, 2]

        # MEM tiers: the node's budget is shared out, each mount at most its runtime's quota.
        grants = {name: int(a["--memory-quota"]) for name, a in args.items()}
        assert sum(grants.values()) == MEM_BUDGET and max(grants.values()) == MEM_QUOTA, grants

        async def capacities() -> dict[str, int] | None:
            statuses = {name: read_status(a["--status-file"]) for name, a in args.items()}
            if any(status is None for status in statuses.values()):
                return None
            return {name: status.capacity_bytes - SSD_QUOTA for name, status in statuses.items() if status}

        memory = await eventually(capacities, what="every mount's status")
        # The tiers the mounts built are the grants (a mount granted nothing has no MEM tier).
        assert memory == grants

        # Read-ahead: all three read at once; the node's total stays within its budget.
        with Sampler(budget_file) as sampler:
            sums = await asyncio.gather(*(run_tool("md5sum", str(roots[name] / "model.bin")) for name in DATASETS))
        assert [line.stdout.split()[0] for line in sums] == [md5(bodies[name]) for name in DATASETS]
        assert sampler.totals and max(sampler.totals) <= READAHEAD_BUDGET, sampler.peak
        assert sampler.peak >= 2 * MiB, "read-ahead never engaged"  # the test would not show anything otherwise

        # A mount process killed while holding read-ahead frees it: the agent zeroes its slot.
        victim = "beta"
        slot = int(args[victim]["--budget-slot"])
        holder = SlotFile(budget_file)
        try:
            assert holder.try_take(slot, READAHEAD_BUDGET)  # as if it held the whole budget
            (pid,) = mount_pids(roots[victim])
            os.kill(pid, signal.SIGKILL)

            async def released() -> bool:
                return holder.slots()[slot] == 0

            await eventually(released, timeout=20, what="the killed mount's read-ahead released")

            async def restarted() -> dict[str, str] | None:
                pids = [p for p in mount_pids(roots[victim]) if p != pid]
                return mount_args(pids[0]) if pids else None

            again = await eventually(restarted, timeout=30, what="the mount process restarted")
            assert again["--budget-slot"] == str(slot) and again["--memory-quota"] == str(grants[victim])
        finally:
            holder.close()

