"""What a mount process tells its agent about its health: a small JSON file it rewrites whenever that changes.

The agent names the file (``--status-file``, in a folder of its own) and reads it on every heartbeat; the mount
process writes it atomically (a temporary file, then ``os.replace``) at each step of its start (``starting``: what
it is doing, which the agent names when a start outlasts its deadline), once mounted, and whenever its cache
tiers' health or its latest failed reads (``services.agent.readfailures``, which the agent forwards in its
heartbeat) change. A file, not a NATS subject: the health never leaves the node, and a reader sees the mount's
last word even while the mount restarts (the agent removes the file before each start, so a stale "down" from
an earlier process is never reported). Crash loops are seen by the agent's own supervisor; the process's last word
before it exits on an error (``failed``: why, such as no FUSE device or a settings error) is written here, so the
agent's heartbeat, and the runtime's and dataset's status, say why the mount keeps failing, not only its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from libs.events.agent import ReadFailure, mount_problem
from libs.hostpaths import normal_path
from libs.redact import hide_signing, strip_userinfo
from libs.telemetry import get_logger
from services.agent.cache.locks import Holder
from services.agent.cache.store import CacheStats
from services.agent.cache.tiers import DEFAULT_COOLDOWN_SECONDS

log = get_logger(__name__)


class MountStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pid: int
    # What the process is doing while it starts (``STARTING_*``); empty once it is mounted.
    starting: str = ""
    # While it waits for its cache folders (``STARTING_CACHE_WAIT``): the pids of the processes that hold them
    # shared, serving them (an earlier mount process of the dataset at the old block size), which the agent stops
    # if they are its own mount processes of the dataset; not those deleting the folder's blocks (a purge).
    waiting_for: list[int] = []
    # Cache directories (disk tiers) that went down after repeated I/O errors; reads bypass them to the store.
    down: list[str] = []
    # The system's word for the last I/O error of each down directory ("Permission denied"), when known.
    down_errors: dict[str, str] = {}
    # Cache directories not used at all, and why with what to do (they hold files Shoal did not write): not "down",
    # whose advice (recreate the folder, free space) would be wrong for them.
    refused: dict[str, str] = {}
    # Bytes of cache the mount can use: the quotas of its tiers that are not down.
    capacity_bytes: int = 0
    # Files whose reads failed lately, the latest first (a few).
    read_failures: list[ReadFailure] = []
    # Why the process is exiting on an error (``fatal_status``); empty while it runs.
    failed: str = ""


# The steps of a start that can take long, as the agent quotes them ("did not start within 120 s (it was loading the
# cache)").
STARTING_RECORDS = "reading the dataset, its runtime and its manifest"
STARTING_CACHE = "loading the cache"
STARTING_CACHE_WAIT = ("waiting for an earlier mount process of this dataset to finish deleting its cache (or to "
                       "stop serving blocks of the old block size)")
STARTING_MOUNT = "mounting"


def waiting_step(holders: list[Holder]) -> str:
    """``STARTING_CACHE_WAIT`` with whom it waits for, as /proc/locks says (``locks.holders``): an operator can
    look at that process (a mount process that outlived its agent and never exits)."""
    if not holders:  # /proc/locks not readable, or the holder outside this PID namespace
        return STARTING_CACHE_WAIT
    names = ", ".join(str(holder) for holder in holders)
    return f"{STARTING_CACHE_WAIT}: its cache folder is held by {names}"


def status_of(stats: CacheStats, pid: int, read_failures: list[ReadFailure] | None = None) -> MountStatus:
    down = [tier.location for tier in stats.tiers if tier.health == "down" and not tier.refused]
    errors = {tier.location: tier.error for tier in stats.tiers
              if tier.health == "down" and not tier.refused and tier.error}
    refused = {tier.location: tier.refused for tier in stats.tiers if tier.refused}
    capacity = sum(tier.quota_bytes for tier in stats.tiers if tier.health != "down")
    return MountStatus(pid=pid, down=down, down_errors=errors, refused=refused, capacity_bytes=capacity,
                       read_failures=read_failures or [])


# What to change for a down directory, by the system's word for its last error (``os.strerror``: the same libc
# wrote it). Other errors (EIO, a removed folder: ENOENT) get the general advice.
_FIX_FOR_ERROR = {
    os.strerror(errno.ENOSPC): "free space there (or lower the tier's quota below what the disk holds)",
    os.strerror(errno.EDQUOT): "raise the disk quota of the agent's user there, or free space",
    os.strerror(errno.EACCES): "make it writable by the agent's user (or change the runtime's tier path)",
    os.strerror(errno.EPERM): "make it writable by the agent's user (or change the runtime's tier path)",
    os.strerror(errno.EROFS): "its filesystem is read-only: remount it read-write, or change the runtime's tier path",
    os.strerror(errno.ENOTDIR): ("a part of its path is a file, not a folder: change the runtime's tier path, or "
                                 "make that part a folder"),
}


def down_text(location: str, cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS, error: str = "") -> str:
    """What a down cache directory (disk tier) says in heartbeats and ``/readyz``: its last error (``error``: the
    system's word for it, when known) and what brings it back.

    A running mount never recreates its tier's folder (it may be the mountpoint of a disk that went away, whose
    filesystem underneath it must not fill up); a write probe after each cool-down brings the tier back as soon as
    the folder is there again and takes a block (``services.agent.cache.tiers``), and a mount process's start
    (the agent's restart restarts its mounts) creates it. The path is written one way, as the metric label is.
    An error with a fix of its own (a full disk, no permission, a read-only filesystem, a file in the path) says
    that fix: "recreate it (mkdir -p)" was no help for them."""
    where = normal_path(location)
    fix = _FIX_FOR_ERROR.get(error)
    if fix is not None:
        return (f"cache directory {where} is down (its I/O failed: {error}; reads go to the store): {fix}; the "
                f"first block cached after the {cooldown_seconds:g} s cool-down brings it back")
    why = f"{error}: " if error else ""
    return (f"cache directory {where} is down (its I/O failed: {why}removed, full or a failing disk; reads go to the "
            f"store): Shoal does not recreate it under a running mount; recreate it (mkdir -p {where}) or free space "
            f"there, and the first block cached after the {cooldown_seconds:g} s cool-down brings it back; restarting "
            "the agent also does (its mounts start again and create it)")


def tier_problems(stats: CacheStats) -> list[str]:
    """What each unusable tier says (``/readyz``): why it is refused, or that it is down."""
    return [tier.refused or down_text(tier.location, error=tier.error) for tier in stats.tiers if tier.health == "down"]


def problems_of(namespace: str, name: str, status: MountStatus) -> list[str]:
    texts = ([down_text(location, error=status.down_errors.get(location, "")) for location in status.down]
             + list(status.refused.values()))
    return [mount_problem(namespace, name, f": {text}") for text in texts]


def unusable(status: MountStatus) -> list[str]:
    """The cache directories of the mount that hold no cache now: down or refused (the cache-directory gauge)."""
    return [*status.down, *status.refused]


def write_status(path: str, status: MountStatus) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    Path(temporary).write_bytes(msgspec.json.encode(status))
    os.replace(temporary, path)


# A fatal reason is quoted in every heartbeat while the mount keeps failing: a few lines, never a whole traceback.
FAILED_MAX_CHARS = 400


def fatal_status(pid: int, reason: str) -> MountStatus:
    """The status a process leaves as it exits on an error: ``reason`` on one line, cut to ``FAILED_MAX_CHARS``,
    with any URL's user and password and any request signature hidden (it travels in heartbeats and status)."""
    line = " ".join(hide_signing(strip_userinfo(reason)).split())
    if len(line) > FAILED_MAX_CHARS:
        line = line[:FAILED_MAX_CHARS - 1] + "…"
    return MountStatus(pid=pid, failed=line)


def read_status(path: str) -> MountStatus | None:
    """The mount's last status, or None when it wrote none (yet) or the file cannot be read."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=MountStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def exit_reason(path: str, code: int | None) -> str:
    """Why a mount process that exited with ``code`` failed, as it wrote in its status file; "" for a clean exit or
    one that said nothing (killed, or it died before it could)."""
    if not code:
        return ""
    status = read_status(path)
    return status.failed if status is not None else ""


class StatusReporter:
    """A mount process's loop: writes its status at start and whenever it changes (looked at every second).
    ``read_failures``: the mount's latest failed reads, given the time; ``tick``: also called every second."""

    # A tier goes down after three failed operations, which readers cause within moments; a second is soon
    # enough for a heartbeat every two.
    INTERVAL_SECONDS = 1.0

    def __init__(self, path: str, stats: Callable[[], CacheStats],
                 read_failures: Callable[[float], list[ReadFailure]] = lambda now: [],
                 tick: Callable[[float], None] = lambda now: None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.stats = stats
        self.read_failures = read_failures
        self.tick = tick
        self.clock = clock
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        last: MountStatus | None = None
        failing = ""  # why the last write failed, logged once until it changes or a write succeeds
        while not self._stopping.is_set():
            now = self.clock()
            self.tick(now)
            status = status_of(self.stats(), os.getpid(), self.read_failures(now))
            if status != last and self.path:
                try:
                    await asyncio.to_thread(write_status, self.path, status)
                except OSError as err:
                    # A write that fails (no descriptor left, the folder's disk full) is tried again at the next
                    # tick. Raised, it ended this loop for the process's life: no status again, and no ``tick``,
                    # whose idle streams then kept their blocks and read-ahead budget for ever.
                    if str(err) != failing:
                        failing = str(err)
                        log.warning("mount status not written, trying again", path=self.path, error=failing)
                else:
                    last, failing = status, ""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.INTERVAL_SECONDS)

    def stop(self) -> None:
        self._stopping.set()


def remove_status(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
