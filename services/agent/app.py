"""Node agent: heartbeats for the runtimes it serves, and one supervised mount process per Bound dataset.

| source | what | effect |
|---|---|---|
| KV shoal_runtimes, shoal_datasets (watched) | Bound datasets of served runtimes | start / stop mount processes |
| timer | every SHOAL_HEARTBEAT_SECONDS | publish agent.heartbeat.v1 on shoal.agent.heartbeat.<node> |

Mount processes are supervised by ``libs.supervisor`` (the same supervisor ``shoal up`` uses): one that dies is
restarted with backoff (reset after a minute of stable running); one not mounted ``mount_start_seconds`` after it
started is reported Failing (naming the step it was at), stopped, unmounted and restarted the same way. Its stale
mount (ENOTCONN) stays until the new process has loaded everything and moves its mount in beneath it
(``services.agent.handover``), so readers get an error, never an empty folder. On stop every mount process gets
SIGTERM, any mount left behind is removed with ``fusermount3 -u -z``, and the bare mount point is removed; at start,
the dead mounts an earlier run left for datasets no longer mounted are removed too. A deleted dataset is unmounted
at once (its mount process deletes its cached blocks; the agent deletes those a dead one left, and at its start
those of datasets deleted while it was down, found in the tiers of the runtimes that exist and in those its mounts
were started with, which it writes down in its mount root: ``services.agent.ledger``, as a runtime deleted
meanwhile says nothing any more); one that merely stops being Bound (its runtime briefly NotReady, e.g. while this
agent restarts) keeps its mount for a grace period, so readers are not cut off by a blip. A dataset deleted and
applied again between two looks (or behind a watch's replay after a reconnect) is another ``incarnation`` of its
name: its mount goes, and its blocks, as on a delete, and the new one is mounted once Bound.

A runtime applied again with other tiers restarts its mounts on them; once a restarted mount is up, its blocks in
the tier directories the new tiers no longer name are deleted (``services.agent.retire``), never through a symbolic
link nor in a folder some mount uses; the ledger keeps those tiers until then, so an agent restarted before the
mount is up still frees them.

Reference datasets (``dataset://``): no mount process; the agent keeps a link at the reference's mount point into
its source's mount point while the reference is Bound and this node mounts the source (``domain.wanted_links``,
``services.agent.links``), and removes it when the reference goes, or the source's mount does.

Peers: with a peer secret file (``SHOAL_PEER_SECRET_FILE``) each mount process also serves its cached blocks to
other nodes on a port the agent picks once per mount (``--peer-port``, on ``SHOAL_PEER_HOST``) and keeps across
restarts of that process; heartbeats carry the node's labels and, for a Serving mount, its ``peerUrl``. Several
agents can share a machine with distinct ``SHOAL_NODE_NAME``, ``SHOAL_MOUNT_ROOT`` and ``SHOAL_CACHE_SUBDIR``.

Health, in every heartbeat: the agent is unhealthy while a mount process keeps failing (the supervisor counts its
exits) or a mount's cache directory is down (each mount process reports its tiers' health in a status file,
``services.agent.mountstatus``). ``/readyz`` is narrower: ready while the agent can serve its node (NATS, its
watches and loops, its mount root, some cache directory that works); a failing mount is a note there, not a
reason to be unready (one broken dataset would hold a rolling update of every node). ``capacityBytes`` is the
cache its mounts can use. Heartbeats also say how each mount is doing (Serving, Starting, Failing), which runtime
and dataset show as ``Mounted``.

Budgets of the node (``services.agent.budget``): the agent owns the read-ahead budget file its mount processes
share (one slot each, zeroed when a process exits, so a crash leaks nothing) and grants each mount process its MEM
tiers out of SHOAL_MEMORY_TIER_BUDGET when it starts it (``--memory-quota``), until the mount stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from libs import subjects
from libs.bus import Bus, KvMirror, connect
from libs.config import AgentSettings, Settings
from libs.embedded import free_port
from libs.events.agent import (
    AgentHeartbeat,
    MountReadFailures,
    MountReport,
    TierDisk,
    group_mounts,
    mount_problem,
    peer_url,
)
from libs.events.common import ObjectRef, parse_quantity
from libs.events.dataset import DatasetRecord
from libs.events.runtime import Level, RuntimeRecord
from libs.references import is_reference
from libs.service import Loop, Periodic, nats_check, run_loops
from libs.side_server import Readiness
from libs.supervisor import Supervisor
from libs.telemetry import get_logger
from services.agent import budget, domain, retire
from services.agent.cache import BlockCache
from services.agent.cache.tiers import MARKER
from services.agent.handover import remove_mountpoint
from services.agent.ledger import FILE_NAME as LEDGER_FILE_NAME
from services.agent.ledger import TierLedger
from services.agent.links import existing_links, make_link, remove_link
from services.agent.metrics import NodeMetrics, dir_health, remove_target
from services.agent.mountinfo import canonical, device_of, devices, is_mounted, mount_points
from services.agent.mountstatus import (
    STARTING_CACHE_WAIT,
    exit_reason,
    problems_of,
    read_status,
    remove_status,
    unusable,
)
from services.agent.nodebudget import FILE_NAME as BUDGET_FILE_NAME
from services.agent.nodebudget import SlotFile
from services.agent.tasks import forget_durable

SERVICE_NAME = "shoal-agent"
log = get_logger(SERVICE_NAME)

# How often the wanted mounts are recomputed from the watched buckets: well inside "mounted within a second".
POLL_SECONDS = 0.25
# A mount whose dataset is no longer Bound (but still exists) is kept this long before it is stopped.
UNBOUND_GRACE_SECONDS = 30.0
# A mount process gets this long to unmount cleanly after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 10.0
# How long the start-up sweep waits for a mount left by an earlier run to answer whether it is dead (ENOTCONN comes
# at once; a hung live mount process never answers).
DEAD_CHECK_SECONDS = 2.0
# How often the blocks of a deleted dataset whose folder another process held (a mount process that outlived its
# agent) are tried again: that process frees them itself as it stops, within seconds, so a retry mostly finds the
# folder gone; each try costs a lock attempt per folder, no scan.
FREE_RETRY_SECONDS = 10.0


def mount_process_at(pid: int, mountpoint: str) -> bool:
    """Whether process ``pid`` is a mount process (``services.agent.mountd``) of ``mountpoint``, by its command line
    (/proc): a mount point in this agent's mount root is this agent's (an earlier run of it started that process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0")]
    except OSError:
        return False
    return "services.agent.mountd" in args and any(
        flag == "--mountpoint" and value == mountpoint for flag, value in itertools.pairwise(args))


def is_dead(path: str) -> bool:
    """Whether ``path`` is a FUSE mount whose process is gone (the kernel answers ENOTCONN, or ECONNABORTED once
    the connection was aborted)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unwanted_mounts(mount_root: str, wanted: set[tuple[str, str]]) -> list[str]:
    """The dataset mounts at ``<mount root>/<namespace>/<name>`` of datasets not in ``wanted``, dead or alive
    (read from the mount table: none of them is touched)."""
    root = os.path.realpath(mount_root)
    keep = {canonical(domain.mountpoint(root, *ref)) for ref in wanted}
    # <root>/<namespace>/<name> only: another agent's root may lie below this one (shoal up --agents N).
    return [path for path in mount_points(domain.MOUNT_FSTYPE)
            if path not in keep and os.path.dirname(os.path.dirname(path)) == root]


async def force_unmount(path: str) -> None:
    """Remove a mount left by a dead process (readers would get ENOTCONN until it goes)."""
    if not is_mounted(path):
        return
    process = await asyncio.create_subprocess_exec("fusermount3", "-u", "-z", path,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    if process.returncode != 0:
        log.warning("could not unmount", path=path, error=stderr.decode(errors="replace").strip())


Process = asyncio.subprocess.Process


def node_budgets(settings: Settings) -> tuple[int, int]:
    """The node's read-ahead and MEM tier budgets in bytes (checked when the settings were loaded)."""
    return parse_quantity(settings.agent.readahead_budget), parse_quantity(settings.agent.memory_tier_budget)


class LeftCache(NamedTuple):
    """A cache a stopped mount left on disk for a dataset that still exists: its tiers, and which life of the
    dataset its blocks are of ("": not known, written by an agent from before it was kept)."""

    levels: list[Level]
    incarnation: str


@dataclass
class MountWorker:
    namespace: str
    name: str
    path: str
    # Which life of the dataset it serves (``DatasetRecord.incarnation``): a record of another one is a delete and
    # an apply this agent did not see between two looks (``reconcile``).
    incarnation: str = ""
    status_file: str = ""
    process: Process | None = None
    unwanted_since: float | None = None
    exit_code: int | None = None
    # Why the last process exited on an error, in its own words (its status file's ``failed``); "" if it said none.
    exit_reason: str = ""
    # The dead mount a crashed process left (kept until its replacement moves in beneath it).
    stale_device: str | None = None
    # Its share of the node's budgets (services.agent.budget): a slot of the read-ahead file, kept across
    # restarts, and the bytes its MEM tiers were granted at the last start.
    budget_slot: int = 0
    memory_grant: int = 0
    # Where this mount's peer server listens (0: none). Picked once and kept across restarts of the process, so a
    # restarted owner is found again at the URL the other nodes know.
    peer_port: int = 0
    # The runtime's tiers at the last start: where the mount's blocks are, even once the runtime is gone.
    levels: list[Level] = field(default_factory=list)
    # The runtime's block size at the last start (0: started before its runtime was known).
    block_size: int = 0
    # The tiers of the processes stopped for a change of tiers since the current one's start: the directories among
    # them that ``levels`` no longer names hold blocks nobody reads, freed once the current process is mounted.
    retired: list[Level] = field(default_factory=list)
    # When ``retired`` is tried again (the monotonic clock) after a folder among them was left because another
    # process held it (``retire.IN_USE``); 0: never left.
    retired_retry_at: float = 0.0
    # Whether the current process was seen mounted: its start is over, no deadline any more.
    serving: bool = False
    # Why the last start was abandoned at the deadline (``domain.stalled_start``), until a process serves or
    # exits by itself; and the stop of that process under way (no restart before it is done).
    stalled: str = ""
    stopping: asyncio.Task[None] | None = None
    # Earlier mount processes of this mount (an earlier run's) that held the cache folders its start waited for,
    # and when they were told to stop (the monotonic clock): killed if still in the way a grace later.
    stale_holders: dict[int, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return subjects.object_name(self.namespace, self.name)


@dataclass
class NodeAgent:
    settings: Settings
    bus: Bus
    runtimes: KvMirror[RuntimeRecord]
    datasets: KvMirror[DatasetRecord]
    # Environment of mount processes; None inherits the agent's (tests run the agent in-process).
    child_env: dict[str, str] | None = None
    workers: dict[tuple[str, str], MountWorker] = field(default_factory=dict)
    # The tiers of caches that stopped mounts left on disk for datasets that still exist (their runtime went
    # first): freed when the dataset is deleted, or applied again unseen (another incarnation), dropped when it is
    # mounted again. Found again at a start in ``ledger``.
    left_caches: dict[tuple[str, str], LeftCache] = field(default_factory=dict)
    # The caches of deleted datasets whose folders another process held when they were to be freed (an earlier
    # run's mount process still serving or purging): kept in the ledger and tried again every FREE_RETRY_SECONDS,
    # from ``unfreed_retry_at`` on (the monotonic clock).
    unfreed: dict[tuple[str, str], list[Level]] = field(default_factory=dict)
    unfreed_retry_at: float = 0.0
    # The tier directories of mounts stopped for good (their dataset kept) that their runtime's tiers dropped and
    # whose folders another process held at the stop: each with the tiers it was retired for and those of its last
    # start (what is kept). The worker that tried again went with the mount, so they are tried every
    # FREE_RETRY_SECONDS here, from ``retired_left_retry_at`` on (the monotonic clock), until freed, the dataset
    # mounted again (its new worker takes them from the ledger) or deleted (freed with its cache).
    retired_left: dict[tuple[str, str], tuple[list[Level], list[Level]]] = field(default_factory=dict)
    retired_left_retry_at: float = 0.0
    # The tiers every mount was started with, kept in the mount root across restarts (read in ``run``).
    ledger: TierLedger = field(default_factory=lambda: TierLedger(None))
    # Whether the tiers were searched, at the first look after the watches caught up, for the caches of datasets
    # deleted while this agent was down (no process of the node was there to free them then).
    swept: bool = False
    served: list[tuple[str, str]] = field(default_factory=list)
    supervisor: Supervisor[Process] = field(default_factory=lambda: Supervisor(lambda p: p.returncode))
    # Where mount processes write their status files; a folder of this agent's own, removed on stop.
    status_dir: str = ""
    # The node's read-ahead budget, shared by the mount processes (services.agent.nodebudget).
    slots: SlotFile | None = None
    memory_budget: int = 0
    # The node's series on the agent's /metrics: read-ahead held and budget, cache directories' health.
    metrics: NodeMetrics | None = None
    # Reference datasets shown on this node: (namespace, name) → the link's target (services.agent.links).
    links: dict[tuple[str, str], str] = field(default_factory=dict)
    # The wall clock stamped on heartbeats (``sentAt``, informative: receivers judge freshness by their own clock
    # of receipt). Tests skew it to show that a node whose clock is hours off is treated like any other.
    clock: Callable[[], float] = time.time
    # Mounts the last heartbeat had to leave out to stay under the event limit (``domain.fit_heartbeat``).
    mounts_left_out: int = 0
    # This process among the agents beating as the node (``AgentHeartbeat.instance``): made once, so another agent
    # given the same node name shows as a second instance; a restart makes a new one.
    instance: str = field(default_factory=lambda: secrets.token_hex(8))

    async def run(self, stop: asyncio.Event, readiness: Readiness | None = None) -> None:
        readiness = readiness or Readiness()
        readiness.add("watches", lambda: None if self.runtimes.ready.is_set() and self.datasets.ready.is_set()
                      else "runtime and dataset watches catching up")
        # Ready means this agent can serve its node (``readiness`` in the README): what one dataset's mount does
        # wrong is a note, never unready, or one broken dataset would hold every node's rolling update.
        readiness.add("mount root", self.mount_root_problem)
        readiness.add("cache", self.cache_problem)
        readiness.note("mounts", lambda: "; ".join(self.problems()) or None)
        await asyncio.to_thread(Path(self.settings.agent.mount_root).mkdir, parents=True, exist_ok=True)
        self.ledger = TierLedger(Path(self.settings.agent.mount_root) / LEDGER_FILE_NAME)
        await asyncio.to_thread(self.ledger.load)
        self.links = await asyncio.to_thread(existing_links, self.settings.agent.mount_root)
        readahead_budget, self.memory_budget = node_budgets(self.settings)
        self.status_dir = await asyncio.to_thread(tempfile.mkdtemp, prefix="shoal-agent-")
        self.slots = SlotFile.create(os.path.join(self.status_dir, BUDGET_FILE_NAME), readahead_budget)
        self.metrics = NodeMetrics(self.settings.agent.node_name)
        self.metrics.watch_readahead(self.slots.held, readahead_budget)
        # The instance in the runtime's warning when another agent beats as this node: this line says which is this.
        log.info("agent started", node=self.settings.agent.node_name, instance=self.instance)
        loops: list[Loop] = [self.runtimes, self.datasets,
                             Periodic("heartbeats", self.heartbeat, self.settings.agent.heartbeat_seconds),
                             Periodic("mounts", self.reconcile, POLL_SECONDS)]
        try:
            await run_loops(loops, stop, readiness)
        finally:
            await asyncio.gather(*(self._stop_worker(w) for w in list(self.workers.values())))
            self.workers.clear()
            for ref in list(self.links):
                await self._unlink(ref)
            if self.metrics is not None:
                self.metrics.close()  # before the budget file its gauge reads is closed
            if self.slots is not None:
                self.slots.close()
            await asyncio.to_thread(shutil.rmtree, self.status_dir, ignore_errors=True)

    async def reconcile(self) -> None:
        if not (self.runtimes.ready.is_set() and self.datasets.ready.is_set()):
            return
        self.served = domain.served_runtimes(self.runtimes.values.values(), self.settings.agent.runtimes)
        wanted = domain.wanted_mounts(self.datasets.values.values(), self.served)
        if not self.swept:
            self.swept = True
            deleted = await asyncio.to_thread(self._deleted_caches)
            for ref, levels in sorted(deleted.items()):
                await self._free_cache(*ref, levels=levels)
            for ref in [r for r in self.ledger.caches if r not in deleted
                        and subjects.resource_key(*r) not in self.datasets.values]:
                await asyncio.to_thread(self.ledger.forget, ref)  # freed before (no marker left): nothing to look for
            # Caches of datasets deleted and applied again while this agent was down: the old dataset's blocks.
            for ref, levels in list(self.ledger.caches.items()):
                record = self.datasets.values.get(subjects.resource_key(*ref))
                kept = self.ledger.incarnations.get(ref, "")
                if record is not None and kept and domain.recreated_since(kept, record):
                    await self._free_cache(*ref, levels=levels)
            # Caches an earlier run's mounts left for datasets that exist but are not mounted here now (their runtime
            # went meanwhile): freed if the dataset is deleted, as those of mounts stopped while the agent runs.
            for ref, levels in self.ledger.caches.items():
                if ref not in wanted and subjects.resource_key(*ref) in self.datasets.values:
                    self.left_caches.setdefault(ref, LeftCache(levels, self.ledger.incarnations.get(ref, "")))
            await self._remove_dead_mounts(wanted)
        now = time.monotonic()
        for ref, served in list(self.workers.items()):
            record = self.datasets.values.get(subjects.resource_key(*ref))
            if record is not None and domain.recreated_since(served.incarnation, record):
                # Deleted and applied again between two looks (or behind a watch's replay, which shows only the
                # newest record): the blocks are the old dataset's, so it goes as on a delete, at once, even with
                # its mount process down and nobody in it to free them; the new one is mounted below once Bound.
                log.info("dataset deleted and applied again: its old mount stopped, its blocks freed",
                         dataset=served.key)
                self.supervisor.remove(served.key)
                await self._stop_worker(self.workers.pop(ref))
                await self._free_retired(served)
                await self._free_cache(*ref, levels=served.levels or None)
        for ref in [r for r in self.workers if r not in wanted]:
            unwanted = self.workers[ref]
            # A dataset that became a reference has no cache of its own any more: its mount goes at once.
            record = self.datasets.values.get(subjects.resource_key(*ref))
            exists = record is not None and not is_reference(record.dataset)
            if unwanted.unwanted_since is None:
                unwanted.unwanted_since = now
            if not exists or now - unwanted.unwanted_since >= UNBOUND_GRACE_SECONDS:
                self.supervisor.remove(unwanted.key)
                await self._stop_worker(self.workers.pop(ref))
                await self._free_retired(unwanted)  # stopped before it mounted on its new tiers
                if exists and unwanted.levels:
                    self.left_caches[ref] = LeftCache(unwanted.levels, unwanted.incarnation)
                if exists and unwanted.retired:  # another process held a folder: tried again below, not forgotten
                    self._leave_retired(ref, unwanted.retired, unwanted.levels)
            if not exists:
                await self._free_cache(*ref, levels=unwanted.levels or None)
        for ref, left in list(self.left_caches.items()):
            record = self.datasets.values.get(subjects.resource_key(*ref))
            # Deleted, or deleted and applied again unseen: the blocks are the old dataset's either way.
            if record is None or (left.incarnation and domain.recreated_since(left.incarnation, record)):
                del self.left_caches[ref]
                await self._free_cache(*ref, levels=left.levels)
        if self.unfreed and now >= self.unfreed_retry_at:
            self.unfreed_retry_at = now + FREE_RETRY_SECONDS
            for ref, levels in list(self.unfreed.items()):
                del self.unfreed[ref]
                if ref not in wanted and ref not in self.workers:  # mounted again: the new mount's folder now
                    await self._free_cache(*ref, levels=levels)
        await self._free_retired_left(now)
        for namespace, name in sorted(wanted):
            worker = self.workers.get((namespace, name))
            if worker is None:
                self.retired_left.pop((namespace, name), None)  # the new worker takes them from the ledger (below)
                path = domain.mountpoint(self.settings.agent.mount_root, namespace, name)
                status_file = os.path.join(self.status_dir, f"{namespace}.{name}.json")
                slot = budget.free_slot(w.budget_slot for w in self.workers.values())
                record = self.datasets.values[subjects.resource_key(namespace, name)]
                worker = self.workers[(namespace, name)] = MountWorker(namespace, name, path, record.incarnation,
                                                                       status_file, budget_slot=slot,
                                                                       peer_port=self._peer_port())
                # The tiers its last mount on this node started with (this agent's earlier run, or before it
                # stopped), and those of mounts stopped for a change of tiers whose blocks that run did not free
                # (restarted before the new mount was up): the directories among them its runtime no longer names
                # are freed once it is mounted.
                before = [*self.ledger.caches.get((namespace, name), []),
                          *self.ledger.retired.get((namespace, name), [])]
                runtime = self.runtimes.values.get(subjects.resource_key(namespace, name))
                if runtime is not None and domain.retired_directories(before, runtime.runtime.spec.tieredstore.levels):
                    worker.retired = list(before)
                self.supervisor.add(worker.key, now)
                self.left_caches.pop((namespace, name), None)  # its mount process finds its blocks again
            worker.unwanted_since = None
            await self._restart_for_tiers(worker, now)
        await self._reconcile_links()
        exits, due = self.supervisor.step(now)
        for exited in exits:
            log.warning("mount process exited", dataset=exited.child.name, code=exited.code,
                        failures=exited.failures, restart_in=exited.delay)
            for worker in self.workers.values():
                if worker.key == exited.child.name:
                    worker.process, worker.serving = None, False
                    if worker.stopping is None:  # it exited by itself: any stall before is history
                        worker.stalled = ""
                    self._release_readahead(worker)  # a crashed process's read-ahead is free again at once
                    self._remove_target(worker)  # a killed process leaves its Prometheus target behind
                    # Its dead mount stays (ENOTCONN) until the replacement moves in beneath it.
                    worker.exit_code, worker.stale_device = exited.code, device_of(worker.path)
                    worker.exit_reason = exit_reason(worker.status_file, exited.code)
                    if exited.code == domain.EXIT_PEER_PORT_TAKEN:
                        worker.peer_port = self._peer_port()
                        log.warning("peer port taken, the mount gets another", dataset=worker.key,
                                    peer_port=worker.peer_port)
        for worker in self.workers.values():
            if worker.stopping is not None and worker.stopping.done():
                if not worker.stopping.cancelled() and (error := worker.stopping.exception()) is not None:
                    log.warning("stopping a stalled mount process failed", dataset=worker.key, error=str(error))
                worker.stopping = None
        by_key = {worker.key: worker for ref, worker in self.workers.items() if ref in wanted}
        for child in due:
            if child.name in by_key and by_key[child.name].stopping is None:
                started = by_key[child.name]
                await self._start_worker(started)
                if started.process is not None:
                    self.supervisor.started(child, started.process, time.monotonic())
        self._abandon_stalled_starts(now)
        self._stop_stale_holders(now)
        retiring = [w for w in self.workers.values() if w.retired and w.process is not None and w.stopping is None
                    and now >= w.retired_retry_at]
        mounted = await asyncio.to_thread(devices) if retiring else {}  # one read of the mount table
        for worker in retiring:
            device = mounted.get(canonical(worker.path))
            if device is not None and device != worker.stale_device:  # mounted on the current tiers
                await self._free_retired(worker)

    async def _restart_for_tiers(self, worker: MountWorker, now: float) -> None:
        """A runtime re-applied with other tiers (quota, medium, folders, watermarks), or deleted and applied again
        with another block size between two looks: the mount process built its cache from them at its start, so it
        is stopped and started again at once (as Fluid rolls its cache workers); it keeps its peer port and budget
        slot. Readers of the mount get ENOTCONN for the moment between."""
        runtime = self.runtimes.values.get(subjects.resource_key(worker.namespace, worker.name))
        process = worker.process
        if runtime is None or process is None or process.returncode is not None or worker.stopping is not None:
            return
        if domain.tiers_changed(worker.levels, runtime.runtime.spec.tieredstore.levels):
            what = "tiers"
        elif domain.block_size_changed(worker.block_size, runtime):
            what = "block size"
        else:
            return
        log.info("the runtime changed: restarting the mount process to use it", dataset=worker.key, changed=what,
                 pid=process.pid)
        self.supervisor.remove(worker.key)
        await self._stop_worker(worker)
        worker.process, worker.serving, worker.exit_code, worker.stale_device = None, False, None, None
        worker.exit_reason = ""
        worker.retired += worker.levels
        self.supervisor.add(worker.key, now)

    async def _free_retired(self, worker: MountWorker) -> None:
        """Delete the worker's blocks in the tier directories its runtime's tiers dropped (``worker.retired``, less
        what ``worker.levels`` names again; ``services.agent.retire``), and say how many bytes that freed. Awaited
        here, so no mount process starts on a folder while it is being freed; a folder refused (a symbolic link, in
        use) is said and left."""
        retired, worker.retired = worker.retired, []
        if await self._free_directories(worker.namespace, worker.name,
                                        domain.retired_directories(retired, worker.levels),
                                        said_in_use=bool(worker.retired_retry_at)):
            worker.retired_retry_at = 0.0
            await asyncio.to_thread(self.ledger.retired_freed, (worker.namespace, worker.name))
            return
        # Another process held a folder (a mount process that outlived an earlier agent): the ledger keeps the
        # tiers for the agent's next start, and the worker for a try every FREE_RETRY_SECONDS meanwhile, as a
        # deleted dataset's cache (``unfreed``): that process may die without freeing them.
        worker.retired = [*retired, *(level for level in worker.retired if level not in retired)]
        worker.retired_retry_at = time.monotonic() + FREE_RETRY_SECONDS

    def _leave_retired(self, ref: tuple[str, str], retired: list[Level], levels: list[Level]) -> None:
        """Keep the retired tiers of a mount stopped for good, whose folders another process held, for a try every
        FREE_RETRY_SECONDS (``_free_retired_left``)."""
        if not self.retired_left:
            self.retired_left_retry_at = time.monotonic() + FREE_RETRY_SECONDS
        self.retired_left[ref] = (list(retired), list(levels))

    async def _free_retired_left(self, now: float) -> None:
        """Try again to free the retired tiers of mounts stopped for good (``retired_left``): the process that held
        a folder (one that outlived an earlier agent) tells nobody when it lets go, so each is tried every
        FREE_RETRY_SECONDS, and freed that long at most after its holder let go. Those freed meanwhile with their
        dataset's cache (deleted: ``_free_cache`` frees what the ledger keeps as retired) are forgotten here."""
        if not self.retired_left or now < self.retired_left_retry_at:
            return
        self.retired_left_retry_at = now + FREE_RETRY_SECONDS
        for ref, (retired, levels) in list(self.retired_left.items()):
            if ref in self.workers or ref not in self.ledger.retired:
                del self.retired_left[ref]  # mounted again (its worker has them), or freed with the cache
                continue
            if await self._free_directories(*ref, domain.retired_directories(retired, levels), said_in_use=True):
                del self.retired_left[ref]
                await asyncio.to_thread(self.ledger.retired_freed, ref)

    async def _free_directories(self, namespace: str, name: str, directories: list[str],
                                said_in_use: bool = False) -> bool:
        """Delete the dataset's blocks in the tier ``directories`` its runtime's tiers dropped
        (``services.agent.retire``), and say how many bytes that freed; a folder refused (a symbolic link, in use)
        is said and left. False when a folder was left because another process held it (``retire.IN_USE``): its
        blocks are to be freed later (``said_in_use``: a retry, which does not say that again)."""
        if not directories:
            return True
        key = subjects.object_name(namespace, name)
        suffix = domain.cache_suffix(self.settings.agent.cache_subdir, namespace, name)
        in_use = self._cache_folders_in_use()
        done = True
        for directory in directories:
            try:
                freed = await asyncio.to_thread(retire.free_folder, directory, suffix, in_use)
            except OSError as err:
                log.warning("could not free the blocks of a tier the runtime no longer names", dataset=key,
                            folder=os.path.join(directory, suffix), error=str(err))
                continue
            done = done and freed.refused != retire.IN_USE
            if freed.refused == retire.IN_USE and said_in_use:
                continue
            if freed.refused:
                log.warning("blocks of a tier the runtime no longer names left on disk", dataset=key,
                            folder=freed.folder, reason=freed.refused)
            elif freed.blocks:
                log.info("blocks of a tier the runtime no longer names freed", dataset=key,
                         folder=freed.folder, blocks=freed.blocks, freed_bytes=freed.bytes)
        return done

    def _cache_folders_in_use(self) -> list[str]:
        """The cache folders of every mount this agent runs, in the tiers it started with and in its runtime's
        current ones, and of the caches left on disk for datasets that still exist (``left_caches``): none of them is
        ever freed as a retired tier's."""
        subdir = self.settings.agent.cache_subdir
        sources: list[tuple[tuple[str, str], list[Level]]] = [
            *(((w.namespace, w.name), w.levels) for w in self.workers.values()),
            *(((r.runtime.metadata.namespace, r.runtime.metadata.name), r.runtime.spec.tieredstore.levels)
              for r in self.runtimes.values.values()),
            *((ref, left.levels) for ref, left in self.left_caches.items()), *self.ledger.caches.items()]
        return sorted({os.path.join(directory, domain.cache_suffix(subdir, *ref))
                       for ref, levels in sources for directory in domain.disk_directories(levels)})

    def _abandon_stalled_starts(self, now: float) -> None:
        """Stop the mount processes that are not mounted ``mount_start_seconds`` after they started (a hung disk
        or store, a deadlock): reported Failing, saying what they were doing, stopped and unmounted in the
        background; the supervisor then sees the exit and restarts them with its backoff, as after a crash."""
        deadline = self.settings.agent.mount_start_seconds
        for worker in self.workers.values():
            process, child = worker.process, self.supervisor.children.get(worker.key)
            if (process is None or process.returncode is not None or worker.serving or worker.stopping is not None
                    or child is None or child.process is not process or now - child.started_at < deadline):
                continue
            device = device_of(worker.path)
            if device is not None and device != worker.stale_device:
                worker.serving = True
                worker.stalled = ""
                continue
            status = read_status(worker.status_file)
            worker.stalled = domain.stalled_start(deadline, status.starting if status else "")
            log.warning("mount process did not start in time; stopping it to start it again", dataset=worker.key,
                        pid=process.pid, deadline_seconds=deadline, step=status.starting if status else None)
            process.terminate()  # now, not in the task: the Failing report that follows is true at once
            worker.stopping = asyncio.create_task(self._end_stalled(worker, process))

    def _stop_stale_holders(self, now: float) -> None:
        """A start that waits for its cache folders while an earlier mount process of the same mount serves them
        (``MountStatus.waiting_for``: held shared, blocks of the old block size) would wait for ever if that process
        never exits, and be abandoned at each deadline. This agent stops its own before it starts the next one, so
        such a process is one an earlier run of it started, superseded now: told to stop (SIGTERM: it unmounts and
        exits), killed if it still holds them ``STOP_GRACE_SECONDS`` later. Not a process deleting the folder's
        blocks (a purge, waited for), nor any other (named in the start's report only)."""
        children = {w.process.pid for w in self.workers.values() if w.process is not None}
        for worker in self.workers.values():
            process = worker.process
            if process is None or process.returncode is not None or worker.serving or worker.stopping is not None:
                continue
            status = read_status(worker.status_file)
            for pid in status.waiting_for if status is not None else []:
                told = worker.stale_holders.get(pid)
                if pid in children or (told is not None and now - told < STOP_GRACE_SECONDS):
                    continue
                if not mount_process_at(pid, worker.path):  # checked again before a kill: pids are reused
                    continue
                if told is None:
                    log.warning("an earlier mount process of this dataset holds its cache folder: stopping it",
                                dataset=worker.key, pid=pid)
                    worker.stale_holders[pid] = now
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
                else:
                    log.warning("an earlier mount process of this dataset did not stop within the grace, killed",
                                dataset=worker.key, pid=pid, grace_seconds=STOP_GRACE_SECONDS)
                    worker.stale_holders[pid] = now  # once per grace: a process stuck in the kernel dies late
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

    async def _end_stalled(self, worker: MountWorker, process: Process) -> None:
        """The rest of a stalled start's stop: the grace, the kill, and whatever is left at its mount point."""
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning("stalled mount process did not stop within the grace, killed", dataset=worker.key,
                        pid=process.pid, grace_seconds=STOP_GRACE_SECONDS)
            process.kill()
            await process.wait()
        # A dead mount kept for the handover (ENOTCONN) would otherwise stay for as long as starts keep stalling.
        await force_unmount(worker.path)
        await asyncio.to_thread(remove_mountpoint, worker.path)
        worker.stale_device = None

    async def _remove_dead_mounts(self, wanted: set[tuple[str, str]]) -> None:
        """Unmount the dead mounts an earlier run of this agent left in its mount root (its mount processes killed
        with it) for datasets it does not mount now: nothing else ever would, and each answers ENOTCONN to whoever
        lists the root. A wanted one stays until its new mount process moves in beneath it (readers get an error,
        never an empty folder); a live one (a mount process that outlived its agent) may be in use: left alone."""
        for path in await asyncio.to_thread(unwanted_mounts, self.settings.agent.mount_root, wanted):
            try:
                # A live mount process that does not answer would hold the stat for ever: not dead, passed over.
                dead = await asyncio.wait_for(asyncio.to_thread(is_dead, path), DEAD_CHECK_SECONDS)
            except TimeoutError:
                continue
            if not dead:
                continue
            log.warning("dead mount of an earlier run removed", mountpoint=path)
            await force_unmount(path)
            await asyncio.to_thread(remove_mountpoint, path)

    async def _reconcile_links(self) -> None:
        """Make, repoint or remove the links of reference datasets (``domain.wanted_links``)."""
        links = domain.wanted_links(self.datasets.values.values(), self.workers, self.links)
        for ref in [r for r in self.links if r not in links]:
            await self._unlink(ref)
        for (namespace, name), source in sorted(links.items()):
            target = domain.link_target(source)
            if self.links.get((namespace, name)) == target:
                continue
            path = domain.mountpoint(self.settings.agent.mount_root, namespace, name)
            problem = await asyncio.to_thread(make_link, path, target)
            if problem is not None:
                log.warning("reference not linked yet", dataset=subjects.object_name(namespace, name), reason=problem)
                continue
            self.links[(namespace, name)] = target
            log.info("reference linked", dataset=subjects.object_name(namespace, name), source=str(source),
                     target=target)

    async def _unlink(self, ref: tuple[str, str]) -> None:
        await asyncio.to_thread(remove_link, domain.mountpoint(self.settings.agent.mount_root, *ref))
        self.links.pop(ref, None)
        log.info("reference unlinked", dataset=subjects.object_name(*ref))

    def problems(self) -> list[str]:
        """Why this agent is unhealthy: mount processes that keep failing, cache directories that are down."""
        return [problem for problems in self.mount_problems().values() for problem in problems]

    def mount_problems(self) -> dict[tuple[str, str], list[str]]:
        """``problems`` by the (namespace, name) of the mount they are about; only mounts that have some."""
        by_key = {worker.key: ref for ref, worker in self.workers.items()}
        found: dict[tuple[str, str], list[str]] = {}
        for child in self.supervisor.failing():
            namespace, _, name = child.name.partition("/")  # a worker's key
            ref = by_key.get(child.name, (namespace, name))
            worker = self.workers.get(ref)
            why = (worker.stalled if worker is not None else "") or f"exit code {child.last_exit}"
            if worker is not None and worker.exit_reason and not worker.stalled:
                why = f"{why}: {worker.exit_reason}"
            found.setdefault(ref, []).append(
                mount_problem(*ref, f" keeps failing ({why}, {child.failures} times in a row)"))
        for ref, worker in self.workers.items():
            status = read_status(worker.status_file) if worker.process is not None else None
            if status is not None and (down := problems_of(*ref, status)):
                found.setdefault(ref, []).extend(down)
        return found

    def mount_root_problem(self) -> str | None:
        """Readiness: every mount point is made in the mount root, so an agent that cannot write there serves no
        dataset at all."""
        root = self.settings.agent.mount_root
        if not os.path.isdir(root):
            return f"mount root {root} is not a directory"
        if not os.access(root, os.W_OK | os.X_OK):
            return f"mount root {root} is not writable by the agent"
        return None

    def cache_problem(self) -> str | None:
        """Readiness: the node caches nothing when every cache directory of its running mounts is down (or
        refused): its disk failed, or this agent cannot use it. One down among others that work is a mount's
        problem (``problems``), read through the store meanwhile."""
        health = self.cache_dir_health()
        if not health or any(health.values()):
            return None
        return f"every cache directory of this node's mounts is down or refused: {', '.join(sorted(health))}"

    def cache_dir_health(self) -> dict[str, bool]:
        """The health of each configured cache directory of the running mounts: down while a mount's tier below
        it is down or refused (its status file says so)."""
        directories: set[str] = set()
        down: list[str] = []
        for worker in self.workers.values():
            status = read_status(worker.status_file) if worker.process is not None else None
            runtime = self.runtimes.values.get(subjects.resource_key(worker.namespace, worker.name))
            if status is None or runtime is None:
                continue
            down += unusable(status)
            directories.update(domain.disk_directories(runtime.runtime.spec.tieredstore.levels))
        return dir_health(sorted(directories), down)

    def export_cache_dirs(self) -> None:
        """The health of each configured cache directory of the running mounts, for /metrics."""
        if self.metrics is not None:
            self.metrics.cache_dirs(self.cache_dir_health())

    def _remove_target(self, worker: MountWorker) -> None:
        if self.settings.agent.prometheus_targets_dir:
            remove_target(self.settings.agent.prometheus_targets_dir, self.settings.agent.node_name,
                          worker.namespace, worker.name)

    def read_failures(self) -> list[MountReadFailures]:
        """The running mounts' latest failed reads, from their status files (``domain.latest_read_failures``)."""
        found = []
        for worker in self.workers.values():
            status = read_status(worker.status_file) if worker.process is not None else None
            if status is not None and status.read_failures:
                found.append(MountReadFailures(dataset=ObjectRef(name=worker.name, namespace=worker.namespace),
                                               files=status.read_failures))
        return domain.latest_read_failures(found)

    def capacity_bytes(self) -> int:
        statuses = [read_status(w.status_file) for w in self.workers.values() if w.process is not None]
        return sum(status.capacity_bytes for status in statuses if status is not None)

    def mount_env(self) -> dict[str, str]:
        """Mount processes' environment: the agent's, with a side server on a free port each (several mounts
        cannot share one) unless the agent has none, and the agent's node name, cache subdir and peer settings."""
        env = dict(os.environ if self.child_env is None else self.child_env)
        env["SHOAL_HTTP_PORT"] = "off" if self.settings.service.http_port is None else "0"
        # What makes this agent's mounts its own when several agents share a machine comes from its settings
        # (which tests build in-process); a setting left at its default leaves the environment's value alone.
        agent = self.settings.agent
        env["SHOAL_NODE_NAME"] = agent.node_name
        for variable, value in (("SHOAL_CACHE_SUBDIR", agent.cache_subdir),
                                ("SHOAL_PEER_SECRET_FILE", agent.peer_secret_file)):
            if value:
                env[variable] = value
        defaults = AgentSettings()
        if agent.peer_host != defaults.peer_host:
            env["SHOAL_PEER_HOST"] = agent.peer_host
        if agent.load_concurrency != defaults.load_concurrency:  # the mount processes execute loads
            env["SHOAL_LOAD_CONCURRENCY"] = str(agent.load_concurrency)
        if agent.prometheus_targets_dir:  # each mount process writes its own target there
            env["SHOAL_PROMETHEUS_TARGETS_DIR"] = agent.prometheus_targets_dir
        return env

    def _release_readahead(self, worker: MountWorker) -> None:
        """Zero the slot of a worker whose process is gone (exited, crashed or stopped)."""
        if self.slots is not None:
            self.slots.zero(worker.budget_slot)

    def _budget_args(self, worker: MountWorker) -> list[str]:
        """The mount process's share of the node's budgets, as flags; grants its MEM tiers what is left."""
        runtime = self.runtimes.values.get(subjects.resource_key(worker.namespace, worker.name))
        try:
            wanted = budget.memory_quota(runtime.runtime.spec.tieredstore.levels) if runtime else 0
        except ValueError:
            wanted = 0  # refused at apply; the mount process reports the bad level itself
        others = sum(w.memory_grant for w in self.workers.values() if w is not worker)
        worker.memory_grant = budget.memory_grant(wanted, self.memory_budget, others)
        self._release_readahead(worker)
        args = ["--memory-quota", str(worker.memory_grant)]
        if self.slots is not None:
            args += ["--budget-file", self.slots.path, "--budget-slot", str(worker.budget_slot)]
        return args

    def _peer_port(self) -> int:
        """A free port on the peer host for a new mount's peer server; 0 (none) without a peer secret."""
        if not self.settings.agent.peer_secret_file:
            return 0
        return free_port(self.settings.agent.peer_host)

    def peer_url(self, worker: MountWorker) -> str:
        return peer_url(self.settings.agent.peer_host, worker.peer_port)

    async def _start_worker(self, worker: MountWorker) -> None:
        worker.serving = False
        remove_status(worker.status_file)  # a "down" reported by the process before must not outlive it
        runtime = self.runtimes.values.get(subjects.resource_key(worker.namespace, worker.name))
        if runtime is not None:
            levels = runtime.runtime.spec.tieredstore.levels
            if worker.levels != levels:  # also when the change came while no process ran (``_restart_for_tiers``)
                worker.retired += [level for level in worker.levels if level not in worker.retired]
            worker.levels = levels
            worker.block_size = domain.block_size_of(runtime)
            # Written down before the process can write a block: if the runtime goes while this agent is down,
            # its next start still knows where to look; and so are the tiers whose blocks wait to be freed, for
            # an agent restarted before this process is mounted.
            await asyncio.to_thread(self.ledger.record, (worker.namespace, worker.name), worker.levels,
                                    worker.retired, worker.incarnation)
        argv = ["--namespace", worker.namespace, "--name", worker.name, "--mountpoint", worker.path,
                "--status-file", worker.status_file, "--instance", self.instance]
        if worker.peer_port:
            argv += ["--peer-port", str(worker.peer_port)]
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.agent.mountd", *argv, *self._budget_args(worker),
            stdin=asyncio.subprocess.DEVNULL, env=self.mount_env(),
        )
        log.info("mount process started", dataset=worker.key, pid=worker.process.pid,
                 mountpoint=worker.path, peer_port=worker.peer_port or None)

    async def _stop_worker(self, worker: MountWorker) -> None:
        if worker.stopping is not None:
            await asyncio.gather(worker.stopping, return_exceptions=True)
        process = worker.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                # Said, not silent: a killed process neither unmounted cleanly nor flushed its queued spans.
                log.warning("mount process did not stop within the grace, killed",
                            dataset=worker.key, pid=process.pid,
                            grace_seconds=STOP_GRACE_SECONDS)
                process.kill()
                await process.wait()
        self._release_readahead(worker)
        self._remove_target(worker)
        await force_unmount(worker.path)
        await asyncio.to_thread(remove_mountpoint, worker.path)
        log.info("mount stopped", dataset=worker.key)

    async def _free_cache(self, namespace: str, name: str, levels: list[Level] | None = None) -> None:
        """Delete the blocks of a deleted dataset that its mount process (down, or never told) left on disk, in the
        runtime's tiers (or ``levels``, those of a runtime deleted before the dataset), and in the tiers the ledger
        keeps as waiting to be freed (``retired``: the agent stopped before its mount was up on new tiers)."""
        if levels is None:
            runtime = self.runtimes.values.get(subjects.resource_key(namespace, name))
            levels = runtime.runtime.spec.tieredstore.levels if runtime is not None else \
                self.ledger.caches.get((namespace, name))
            if levels is None:
                return
        # Before the ledger's entry goes with the cache: nothing else says where these blocks are.
        retired_done = await self._free_directories(
            namespace, name, domain.retired_directories(self.ledger.retired.get((namespace, name), []), levels),
            said_in_use=(namespace, name) in self.unfreed)
        suffix = domain.cache_suffix(self.settings.agent.cache_subdir, namespace, name)
        folders = [Path(directory) / suffix for level in levels for directory in level.directories]
        if retired_done and not await asyncio.to_thread(lambda: any(folder.is_dir() for folder in folders)):
            await asyncio.to_thread(self.ledger.forget, (namespace, name))
            return  # the mount process freed it (the usual case)

        def free() -> int | None:
            cache = BlockCache.from_levels(levels, suffix)
            try:
                if not cache.hold_folders_to_delete():
                    return None  # another process uses a folder: its blocks are not read, nor deleted, now
                cache.load()  # scans what is Shoal's (block files), so only that is deleted
                return cache.purge()
            finally:
                cache.release_folders()

        key = subjects.object_name(namespace, name)
        try:
            freed = await asyncio.to_thread(free)
        except (OSError, ValueError) as err:
            log.warning("could not free the cache of a deleted dataset", dataset=key, error=str(err))
            return
        if freed is None or not retired_done:
            # Kept in the ledger, and tried again: forgotten now, nothing would ever look for these blocks again.
            if (namespace, name) not in self.unfreed:
                log.info("deleted dataset's cache in use by another mount process: freed later", dataset=key,
                         retry_seconds=FREE_RETRY_SECONDS)
            if not self.unfreed:
                self.unfreed_retry_at = time.monotonic() + FREE_RETRY_SECONDS
            self.unfreed[(namespace, name)] = levels
            return
        log.info("deleted dataset's cache freed", dataset=key, blocks=freed)
        # Its dead mount process did not delete its task durable either (``TaskRunner.forget``): the life is the one
        # the ledger kept, before its entry goes.
        await forget_durable(self.bus, self.settings.agent.node_name, ObjectRef(name=name, namespace=namespace),
                             self.ledger.incarnations.get((namespace, name), ""))
        await asyncio.to_thread(self.ledger.forget, (namespace, name))

    def _deleted_caches(self) -> dict[tuple[str, str], list[Level]]:
        """The caches, in the disk tiers of the runtimes that exist and in those this node's mounts were started
        with (``ledger``: a runtime deleted while this agent was down), or were stopped on for a change of tiers and
        not freed yet (its ``retired``), of datasets that do not exist (deleted while it was down), each with its
        tiers: those its mounts were started with when known, else those it was found in. Only folders a cache made
        (holding its ``MARKER``) count, so another agent's subdir or a folder that is not Shoal's is never taken for
        one."""
        found: dict[tuple[str, str], list[Level]] = {}
        sources = [*(record.runtime.spec.tieredstore.levels for record in self.runtimes.values.values()),
                   *self.ledger.caches.values(), *self.ledger.retired.values()]
        for levels in sources:
            for path in domain.disk_directories(levels):
                for marker in (Path(path) / domain.cache_folder(self.settings.agent.cache_subdir)).glob(
                        f"*/*/{MARKER}"):
                    ref = (marker.parent.parent.name, marker.parent.name)
                    if subjects.resource_key(*ref) not in self.datasets.values:
                        found.setdefault(ref, self.ledger.caches.get(ref, levels))
        return found

    def _mount_reports(self, unhealthy: Container[tuple[str, str]] = ()) -> list[tuple[MountReport, int]]:
        """Each wanted mount's report, with its peer port; those in ``unhealthy`` marked so."""
        reports = []
        mounted_devices = devices()  # one read of the mount table, not one per mount
        for (namespace, name), worker in sorted(self.workers.items()):
            if worker.unwanted_since is not None:
                continue
            # A process being stopped because its start stalled is as good as gone.
            alive = worker.process is not None and worker.process.returncode is None and worker.stopping is None
            device = mounted_devices.get(canonical(worker.path)) if alive else None
            mounted = device is not None and device != worker.stale_device
            status = read_status(worker.status_file) if alive and not mounted else None
            reports.append((domain.mount_report(
                ObjectRef(name=name, namespace=namespace), alive=alive,
                mounted=mounted, exit_code=worker.exit_code, exit_reason=worker.exit_reason,
                failures=child.failures if (child := self.supervisor.children.get(worker.key)) else 0,
                peer_url=self.peer_url(worker), stalled=worker.stalled, unhealthy=(namespace, name) in unhealthy,
                waiting=status.starting if status is not None and status.starting.startswith(STARTING_CACHE_WAIT)
                else "",
            ), worker.peer_port))
        return reports

    async def heartbeat(self) -> None:
        # A first beat listing nothing would make this node's runtimes briefly not ready (and unbind them).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.runtimes.ready.wait(), timeout=self.settings.agent.heartbeat_seconds)
        if not self.runtimes.ready.is_set():
            return
        agent = self.settings.agent
        served = domain.served_runtimes(self.runtimes.values.values(), agent.runtimes)
        by_mount = self.mount_problems()
        problems = [problem for found in by_mount.values() for problem in found]
        self.export_cache_dirs()
        levels = [record.runtime.spec.tieredstore.levels for record in self.runtimes.values.values()
                  if domain.serves(record, agent.runtimes)]
        directories, complete = domain.tier_disk_directories(levels)
        disks = await asyncio.to_thread(tier_disks, directories)
        beat = AgentHeartbeat(
            node=agent.node_name, tier_disks=disks, tier_disks_complete=complete,
            runtimes=[ObjectRef(name=name, namespace=namespace) for namespace, name in served],
            all_runtimes=not agent.runtimes,
            healthy=not problems, mount_health=True, problems=domain.capped_problems(problems), sent_at=self.clock(),
            interval_seconds=agent.heartbeat_seconds, capacity_bytes=self.capacity_bytes(),
            mount_groups=group_mounts(self._mount_reports(by_mount)), labels=dict(agent.labels),
            peer_host=agent.peer_host if agent.peer_secret_file else "", read_failures=self.read_failures(),
            instance=self.instance,
        )
        beat, left_out = domain.fit_heartbeat(beat, self.settings.service.max_event_bytes)
        if left_out != self.mounts_left_out:  # said when it changes, not every beat
            self.mounts_left_out = left_out
            if left_out:
                log.warning("heartbeat over the event limit: mounts left out of it", mounts_left_out=left_out,
                            mounts=beat.mount_count(), limit_bytes=self.settings.service.max_event_bytes)
            else:
                log.info("heartbeat under the event limit again: every mount in it", mounts=beat.mount_count())
        await self.bus.publish(subjects.agent_heartbeat(agent.node_name), beat)


def tier_disks(directories: list[str]) -> list[TierDisk]:
    """The file system of each tier directory: ``statvfs`` and the device (``st_dev``) of the directory, or of its
    nearest folder that exists (a cache makes its directory at its first start, on the file system of that folder).
    One that cannot be read is listed without a size: the runtime service then weighs nothing for it, and knows the
    agent has seen it (``AgentHeartbeat.tier_disks_complete``)."""
    found = []
    for directory in directories:
        path = directory
        while not os.path.isdir(path) and path != os.path.dirname(path):
            path = os.path.dirname(path)
        try:
            fs, device = os.statvfs(path), os.stat(path).st_dev
        except OSError:
            found.append(TierDisk(path=directory))
            continue
        found.append(TierDisk(path=directory, size_bytes=fs.f_blocks * fs.f_frsize,
                              free_bytes=fs.f_bavail * fs.f_frsize, device=device))
    return found


async def run(settings: Settings, stop: asyncio.Event, child_env: dict[str, str] | None = None,
              readiness: Readiness | None = None, clock: Callable[[], float] = time.time) -> None:
    readiness = readiness or Readiness()
    bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        agent = NodeAgent(settings, bus, KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord, bus.reconnects),
                          KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord, bus.reconnects), child_env,
                          clock=clock)
        await agent.run(stop, readiness)
    finally:
        await bus.close()
