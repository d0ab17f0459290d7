"""The mount handover's staging directories: one left by a mount process killed mid-handover is removed.

Needs root (a bind mount stands in for the FUSE mount a killed process left at its staging directory).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.agent.handover import Staging
from services.agent.mountinfo import is_mounted


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.needs("fuse")
def test_a_staging_mount_of_a_dead_mount_process_is_removed_by_the_next_one(tmp_path: Path) -> None:
    mountpoint = tmp_path / "default" / "demo"
    mountpoint.parent.mkdir()
    stale = mountpoint.parent / f".demo.staging-{dead_pid()}"
    alive = mountpoint.parent / f".demo.staging-{os.getppid()}"  # a live process's: not ours to touch
    for path in (stale, alive):
        path.mkdir()
    subprocess.run(["mount", "--bind", str(stale), str(stale)], check=True)
    try:
        staging = Staging(str(mountpoint))
        staging.remove_stale()
        assert not is_mounted(str(stale)) and not stale.exists()
        assert alive.exists()
    finally:
        if is_mounted(str(stale)):
            subprocess.run(["umount", "-l", str(stale)], check=False)
