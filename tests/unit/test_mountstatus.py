"""What a mount's status says about a down cache directory (the path written one way, and what brings it back) and
about one refused for holding files Shoal did not write."""

from __future__ import annotations

import asyncio
from pathlib import Path

from libs.events.agent import BlockId
from services.agent.cache.store import BlockCache
from services.agent.cache.tiers import MARKER, DiskTier, MemoryTier
from services.agent.mountstatus import (
    MountStatus,
    StatusReporter,
    problems_of,
    read_status,
    status_of,
    tier_problems,
    unusable,
)
from tests.helpers import eventually


def test_a_down_cache_directory_says_what_brings_it_back_with_its_path_written_one_way() -> None:
    # "cache directory /var/cache//shoal/./default/x/ is down" told the operator nothing to do: a tier whose folder
    # was removed stays down under the running mount (it never recreates the folder), until it is made again.
    status = MountStatus(pid=1, down=["/var/cache//shoal/./default/x/"])
    assert problems_of("default", "x", status) == [
        "mount default/x: cache directory /var/cache/shoal/default/x is down (its I/O failed: removed, full or a "
        "failing disk; reads go to the store): Shoal does not recreate it under a running mount; recreate it "
        "(mkdir -p /var/cache/shoal/default/x) or free space there, and the first block cached after the 30 s "
        "cool-down brings it back; restarting the agent also does (its mounts start again and create it)"]


def test_a_down_cache_directory_says_its_error_and_the_fix_for_it(tmp_path: Path) -> None:
    # "recreate it (mkdir -p ...)" for every error: no help for a full disk, a folder the agent may not write, or a
    # file where the path needs a folder. The tier's last error (here a real one: its path runs through a file).
    (tmp_path / "file").write_bytes(b"")
    tier = DiskTier(tmp_path / "file" / "cache", 1 << 20, cooldown_seconds=30.0)
    cache = BlockCache([tier])
    for index in range(3):
        assert not tier.write(BlockId(mount=0, key="a.bin", etag="e", index=index), b"x")
    status = status_of(cache.stats(), pid=1)
    where = tmp_path / "file" / "cache"
    assert status.down == [str(where)] and status.down_errors == {str(where): "Not a directory"}, status
    assert problems_of("default", "x", status) == [
        f"mount default/x: cache directory {where} is down (its I/O failed: Not a directory; reads go to the store): "
        "a part of its path is a file, not a folder: change the runtime's tier path, or make that part a folder; the "
        "first block cached after the 30 s cool-down brings it back"]
    assert tier_problems(cache.stats()) == [problems_of("default", "x", status)[0].removeprefix("mount default/x: ")]
    full = MountStatus(pid=1, down=["/cache/x"], down_errors={"/cache/x": "No space left on device"})
    assert "(its I/O failed: No space left on device; reads go to the store): free space there" in \
        problems_of("default", "x", full)[0]


def test_no_problem_while_no_directory_is_down() -> None:
    assert problems_of("default", "x", MountStatus(pid=1)) == []


def test_a_tier_refused_for_files_shoal_did_not_write_says_so_and_what_to_do_not_down(tmp_path: Path) -> None:
    # A refused tier was reported as "down ... recreate it (mkdir -p ...)": its folder is there and works, it holds
    # someone else's files. The status names one of them and what to do.
    folder = tmp_path / "cache" / "default" / "x"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    tier = DiskTier(folder, 1 << 20)
    tier.scan()
    cache = BlockCache([tier])
    status = status_of(cache.stats(), pid=1)
    assert status.down == [] and list(status.refused) == [str(folder)] and status.capacity_bytes == 0
    wanted = (f"mount default/x: cache directory {folder} holds files Shoal did not write (notes.txt) and has no "
              f"{MARKER}, so Shoal does not use it (reads go to the store): empty the folder, or change the runtime's "
              "tieredstore level path so the tier gets a folder of its own; then restart the agent (its mounts start "
              "again and use it)")
    assert problems_of("default", "x", status) == [wanted]
    assert tier_problems(cache.stats()) == [wanted.removeprefix("mount default/x: ")]
    assert unusable(status) == [str(folder)]
    assert (folder / "notes.txt").read_text() == "mine"


async def test_a_status_write_that_fails_is_tried_again_and_the_ticks_go_on(tmp_path: Path) -> None:
    # A failed write (no descriptor left, a full disk) ended the reporter's loop for good: no status again, and no
    # tick, so the mount's idle read streams kept their blocks and read-ahead budget for the rest of its life.
    folder = tmp_path / "status"
    path = folder / "mount.json"
    ticks: list[float] = []
    three = asyncio.Event()

    def tick(now: float) -> None:
        ticks.append(now)
        if len(ticks) >= 3:
            three.set()

    reporter = StatusReporter(str(path), BlockCache([MemoryTier(1 << 20)]).stats, tick=tick)
    reporter.INTERVAL_SECONDS = 0.01
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.wait([task, asyncio.ensure_future(three.wait())], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        assert three.is_set() and not task.done(), "the loop ended at the failed write"
        folder.mkdir()

        async def written() -> MountStatus | None:
            assert not task.done()
            return read_status(str(path))

        await eventually(written, what="the status written once its folder is there")
    finally:
        reporter.stop()
        await asyncio.wait_for(task, timeout=10)
