"""Two processes on one cache folder: a mount process can outlive its agent, so the next agent may start the dataset's
next mount while the old process still deletes the folder's blocks (the dataset was deleted). Each side here is a
real process on real files; the old one's purge pauses, its lock taken, until the test lets it go on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.cache import BlockCache, DiskTier, LruPolicy
from services.agent.cache.locks import Holder
from services.agent.cache.tiers import INDEX_FILE, LOCK_FILE, MARKER
from services.agent.mountstatus import waiting_step
from tests.unit.test_block_cache import SIZE, block, payload

# The old mount process: serves the folder's cache, then purges it when told (a line on stdin), pausing with the
# folder's lock held (after "purging") until told again.
OLD_MOUNT = f"""
import sys
from services.agent.cache import BlockCache, DiskTier, LruPolicy

class Paused(DiskTier):
    def remove_block_files(self):
        print("purging", flush=True)
        sys.stdin.readline()
        return super().remove_block_files()

cache = BlockCache([Paused(sys.argv[1], 100 * {SIZE}, high=1.0, low=0.5)], LruPolicy)
assert cache.hold_folders()
cache.load()
print("serving", len(cache.blocks()), flush=True)
sys.stdin.readline()
print("purged", cache.purge(), flush=True)
"""


@pytest.fixture
def old_mount(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    folder = tmp_path / "ssd"
    serving(folder, 5).release_folders()  # a mount of the dataset that stopped, its blocks left
    process = subprocess.Popen([sys.executable, "-c", OLD_MOUNT, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert said(process) == "serving 5"
    with process:  # its pipes closed, and waited for
        yield process
        if process.poll() is None:
            process.kill()


def said(process: subprocess.Popen[str]) -> str:
    """The old process's next step (its log lines, on the same stdout, skipped)."""
    assert process.stdout is not None
    while (line := process.stdout.readline()) and (line.split() or [""])[0] not in ("serving", "purging", "purged"):
        pass
    return line.strip()


def tell(process: subprocess.Popen[str]) -> str:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()
    return said(process)


def new_cache(folder: Path) -> BlockCache:
    return BlockCache([DiskTier(folder, 100 * SIZE, high=1.0, low=0.5)], LruPolicy)


def serving(folder: Path, blocks: int, block_size: int = 0) -> BlockCache:
    """A mount process's cache holding its folder (saying the size its blocks are cut at, when given) and serving
    ``blocks`` blocks: the first of the two caches on one folder in these tests."""
    cache = new_cache(folder)
    assert cache.hold_folders(block_size)
    cache.load(block_size)
    for index in range(blocks):
        assert cache.put(block(index), payload(index))
    return cache


async def test_a_mount_started_while_an_old_process_purges_the_folder_waits_for_the_purge(
        tmp_path: Path, old_mount: subprocess.Popen[str]) -> None:
    folder = tmp_path / "ssd"
    assert tell(old_mount) == "purging"  # the dataset was deleted: the old process deletes its blocks
    cache = new_cache(folder)  # the next incarnation's mount, started by the next agent
    assert not cache.hold_folders()  # mountd waits (STARTING_CACHE_WAIT) and asks again
    assert tell(old_mount) == "purged 5"
    assert old_mount.wait(timeout=30) == 0
    assert cache.hold_folders()
    cache.start(SIZE)
    assert await cache.scan_rest() == 0  # the old blocks are gone
    assert cache.put(block(10), payload(10))
    assert cache.get(block(10)) == payload(10)
    assert (folder / MARKER).is_file() and (folder / LOCK_FILE).is_file()


async def test_a_purge_leaves_the_folder_to_a_mount_that_uses_it_meanwhile(
        tmp_path: Path, old_mount: subprocess.Popen[str]) -> None:
    folder = tmp_path / "ssd"
    cache = new_cache(folder)  # started while the old process still served (it purges once it has unmounted)
    assert cache.hold_folders()
    cache.start(SIZE)
    assert await cache.scan_rest() == 5  # the old blocks, kept as the new mount's manifest says (here: all)
    assert cache.put(block(10), payload(10))
    assert tell(old_mount) == "purged 0"  # its lock was not its alone: nothing deleted, no pause either
    assert old_mount.wait(timeout=30) == 0
    assert [cache.get(block(index)) for index in (0, 4, 10)] == [payload(0), payload(4), payload(10)]
    assert (folder / MARKER).is_file()


def test_a_purge_of_a_folder_nobody_else_uses_deletes_it_lock_and_all(tmp_path: Path) -> None:
    folder = tmp_path / "ssd"
    cache = serving(folder, 1)
    assert cache.purge() == 1
    assert not folder.exists()
    again = new_cache(folder)  # the folder's next user makes it anew
    assert again.hold_folders()
    assert (folder / LOCK_FILE).is_file()


async def test_an_old_mount_process_stopping_beside_a_new_one_leaves_the_index_to_the_new_one(
        tmp_path: Path) -> None:
    # A restart overlapping: the old process still serves when the new one starts on the folder (both hold it
    # shared), and stops after it. Its index listed its own blocks, stale for the new process, which owns the folder.
    folder = tmp_path / "ssd"
    old = serving(folder, 3)
    new = new_cache(folder)
    assert new.hold_folders()
    new.start(SIZE)
    assert await new.scan_rest() == 3
    assert new.put(block(10), payload(10))
    assert [evicted for evicted, _ in new.evict([block(0)])] == [block(0)]
    assert old.save_index(SIZE) == 0  # the old process's clean stop
    assert not (folder / INDEX_FILE).exists()
    assert new.save_index(SIZE) == 3  # the owner's stop
    old.release_folders()
    new.release_folders()
    after = new_cache(folder)
    assert after.hold_folders()
    assert after.start(SIZE) == 3  # served from the new process's index: its blocks, not the old one's
    assert sorted(b.index for b, _ in after.blocks()) == [1, 2, 10]


def waiting_for_lock(path: Path) -> bool:
    """Whether some open file waits for a lock on ``path`` (a "->" line of /proc/locks)."""
    stat = path.stat()
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    return any("->" in line and where in line.split() for line in Path("/proc/locks").read_text().splitlines())


def test_a_start_between_an_old_process_checking_it_owns_the_folder_and_writing_its_index_gets_that_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The old process compared its token, then wrote its index: a new start writing its token and taking the index
    # in between found none, and the old one's, written after, was left for the new one's next start (stale: the new
    # process's blocks unlisted, the ones it evicted listed).
    folder = tmp_path / "ssd"
    old = serving(folder, 3)
    new = DiskTier(folder, 100 * SIZE, high=1.0, low=0.5)
    assert new.hold()
    taken: list[int] = []

    def start() -> None:  # the new process's start: says it serves the folder, then takes its index
        new.own()
        taken.append(len(new.take_index(SIZE)))

    starting = threading.Thread(target=start)
    replace = os.replace

    def replace_with_a_start_meanwhile(source: str, target: str) -> None:
        if target.endswith(INDEX_FILE) and not starting.is_alive() and not taken:
            starting.start()
            deadline = time.monotonic() + 10
            # Until the start is over, or waits for the token's lock held around this rename.
            while starting.is_alive() and not waiting_for_lock(folder / LOCK_FILE) and time.monotonic() < deadline:
                starting.join(0.01)
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_with_a_start_meanwhile)
    saved = old.save_index(SIZE)
    starting.join(10)
    assert not starting.is_alive()
    assert not (folder / INDEX_FILE).exists()  # no index left behind for the new process's next start
    assert taken == [saved] == [3]  # written before the new token: the new start took it


def test_a_block_size_change_never_deletes_blocks_another_process_still_serves(tmp_path: Path) -> None:
    # The runtime's blockSize changed while an older mount process still serves the folder at the old size: the new
    # start deleted its blocks without the folder's lock exclusive, under the old process's reads and writes.
    folder = tmp_path / "ssd"
    old = serving(folder, 3, SIZE)
    new = new_cache(folder)
    assert new.hold_folders()  # shared, as a start that does not say its block size
    assert new.start(2 * SIZE) == 0
    assert [old.get(block(index)) for index in range(3)] == [payload(index) for index in range(3)]
    [tier] = new.stats().tiers
    assert "another process uses" in tier.refused  # not used at all: a block of the new size is other bytes to it
    assert not new.put(block(7), payload(7))


def test_a_start_at_a_new_block_size_waits_for_the_old_process_then_deletes_and_shares_the_folder(
        tmp_path: Path) -> None:
    folder = tmp_path / "ssd"
    old = serving(folder, 3, SIZE)
    new = new_cache(folder)
    assert not new.hold_folders(2 * SIZE)  # mountd waits (STARTING_CACHE_WAIT) and asks again
    assert old.get(block(0)) == payload(0)
    old.release_folders()  # the old process stopped
    assert new.hold_folders(2 * SIZE)
    assert new.start(2 * SIZE) == 0  # the blocks of the old size are deleted
    assert not [path for path in folder.rglob("*") if path.is_file() and len(path.name) == 32]  # no block file
    assert DiskTier(folder, SIZE).hold()  # held shared again: a later mount process of the folder can start beside


def test_a_start_that_waits_for_its_folder_says_which_process_holds_it(
        tmp_path: Path, old_mount: subprocess.Popen[str]) -> None:
    # The start only said it waited for "an earlier mount process": one that never exits kept it waiting, restarted
    # at each deadline, with nothing naming the process to look at.
    new = new_cache(tmp_path / "ssd")
    assert new.folder_holders() == [Holder(old_mount.pid, exclusive=False)]
    assert f"held by process {old_mount.pid} (shared)" in waiting_step(new.folder_holders())
    assert tell(old_mount) == "purging"  # its lock taken exclusive, paused
    assert not new.hold_folders()
    assert new.folder_holders() == [Holder(old_mount.pid, exclusive=True)]
    assert tell(old_mount) == "purged 5"
    assert new.folder_holders() == []
