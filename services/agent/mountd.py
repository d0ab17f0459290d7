"""One dataset mount: ``python -m services.agent.mountd --namespace NS --name NAME --mountpoint DIR``.

The node agent runs one of these per mounted dataset (pyfuse3 serves one mount per process, and separate
processes let several mounts use several cores). It owns: loading the manifest, the block cache of the
dataset's runtime tiers, the FUSE session, reloading the tree (and the object stores of its mounts) when the
dataset is re-synced, publishing the cache inventory, and the peer side of the distributed cache: the ring of
block owners (from the runtime record's ``status.workers``, watched) that routes its misses, and with
``--peer-port`` a peer server lending its blocks to the other nodes (``peer.py``; the README says why it lives
here); the loader's DataLoad and DataClean parts for this dataset on this node (``tasks.py``); and its
Prometheus series on its side server's /metrics, with a file_sd target for discovery (``metrics.py``). The mount is
put in place only once everything is loaded, beneath a previous (dead) mount at the mount point (``handover``).
SIGTERM unmounts and exits 0; when the dataset was deleted, its cached blocks are deleted too. A SIGTERM while it
still starts (reading the records and manifest, scanning a large cache) ends the start at once and exits 0 with
nothing mounted; each step of the start is written to the status file, so the agent can say where a start hangs.
The cache's start reads only the index its last clean stop wrote; the block files no index lists (after a crash:
all of them) are found by a scan in the background while the mount serves (``BlockCache.scan_rest``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import itertools
import os
import select
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pyfuse3

from libs import subjects
from libs.backoff import Backoff
from libs.blocks import block_span
from libs.bus import Bus, Replay, connect, kv_load, kv_watch
from libs.config import Settings
from libs.events.agent import BlockId, CacheCounters
from libs.events.common import ObjectRef, parse_quantity
from libs.events.dataset import DatasetRecord, ManifestEntry
from libs.events.runtime import CacheWorker, Level, RuntimeRecord
from libs.manifest import ManifestStore
from libs.metrics import dataset_label
from libs.service import main as service_main
from libs.service import nats_check
from libs.side_server import Readiness
from libs.telemetry import get_logger
from libs.ufs import open_store
from libs.ufs.base import HttpLocation, LocalLocation, ObjectStore, S3Location
from libs.ufs.http import HttpObjectStore
from libs.ufs.mounts import MissingSecret, local_location_error, mount_location, secret_refs
from libs.ufs.s3 import S3ObjectStore
from services.agent import budget
from services.agent.cache import BlockCache, FrequencyAdmissionPolicy, LruPolicy, ScanCancelled
from services.agent.cache.locks import Holder
from services.agent.domain import EXIT_PEER_PORT_TAKEN, FUSE_SUBTYPE, cache_suffix, mount_connection_name, recreated
from services.agent.fs import DatasetFS, TreeChanges, time_operations, tree_changes
from services.agent.handover import Staging, replace_in_place, unmount_own
from services.agent.inventory import InventoryLog, InventoryPublisher
from services.agent.malloc import reuse_block_buffers
from services.agent.metrics import MountMetrics, remove_target, write_target
from services.agent.mountinfo import device_of
from services.agent.mountstatus import (
    STARTING_CACHE,
    STARTING_CACHE_WAIT,
    STARTING_MOUNT,
    STARTING_RECORDS,
    MountStatus,
    StatusReporter,
    fatal_status,
    tier_problems,
    waiting_step,
    write_status,
)
from services.agent.namespace import InodeAllocator, Namespace
from services.agent.nodebudget import BudgetFileError, NodeReadAhead, SlotFile
from services.agent.peer import PeerClient, PeerConfigError, PeerServer, load_secret, runtime_key
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, BlockRouter, StoreGate
from services.agent.tasks import NO_MANIFEST, ManifestVersion, TaskRunner, manifest_version

log = get_logger("shoal-mount")
T = TypeVar("T")

# The bdi read-ahead of the mount, in KiB: 1 MiB makes the kernel send 1 MiB FUSE read requests (its cap),
# which measured ~1.6x the throughput of the default 128 KiB (see shared notes on FUSE).
READ_AHEAD_KB = 1024
# An agent must fail a read fast when the store is gone rather than retry; the reader's gate remembers it.
AGENT_CONNECT_TIMEOUT = 1.0
AGENT_MAX_ATTEMPTS = 1
# A manifest reload that failed is tried again after these delays, while the mount serves the tree it has.
RELOAD_RETRY = Backoff(first=1.0, cap=30.0)
# A watch of the mount's records that failed or ended is started again after these delays: soon after a blip, and
# a bucket missing or refused for long is asked at most every 30 s.
WATCH_RETRY = Backoff(first=0.5, cap=30.0)
# How often a start waiting for an earlier process's purge of the cache folders asks for their locks again: a purge
# of a large cache takes seconds, so a tenth of one is no delay worth a thread blocked in flock.
HOLD_RETRY_SECONDS = 0.1


def agent_store(location: object) -> ObjectStore:
    """Object stores for reads: short connect timeout and no client-side retries (the gate fails fast)."""
    if isinstance(location, S3Location):
        return S3ObjectStore(location, connect_timeout=AGENT_CONNECT_TIMEOUT, max_attempts=AGENT_MAX_ATTEMPTS)
    if isinstance(location, HttpLocation):
        return HttpObjectStore(location, connect_timeout=AGENT_CONNECT_TIMEOUT)
    return open_store(location)  # type: ignore[arg-type]


def raise_read_ahead(mountpoint: str) -> None:
    device = device_of(mountpoint)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
    except OSError as err:
        log.info("read-ahead left at the kernel default", reason=str(err))


def fuse_options(shown: str, allow_other: bool) -> set[str]:
    """The FUSE mount options of a dataset's mount (``shown``: ``subjects.object_name``, which ``df`` shows)."""
    options = set(pyfuse3.default_options)
    # default_permissions: the kernel checks every access against the mode and owner served (see fs.py).
    options |= {f"fsname=shoal:{shown}", f"subtype={FUSE_SUBTYPE}", "ro", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    return options


@dataclass(frozen=True)
class NodeGrants:
    """What the agent gave this mount process of the node's budgets (``services.agent.budget``): a slot of the
    read-ahead budget file, and the bytes its MEM tiers may hold. Empty: this process budgets alone (read-ahead
    from SHOAL_READAHEAD_BUDGET, MEM tiers at the runtime's quota), as when run by hand."""

    budget_file: str = ""
    budget_slot: int = 0
    memory_quota: int | None = None


class MountedDataset:
    """Everything one mount process runs, wired together; ``run`` serves until ``stop`` is set."""

    def __init__(self, settings: Settings, bus: Bus, namespace: str, name: str, mountpoint: str,
                 status_file: str = "", readiness: Readiness | None = None,
                 grants: NodeGrants | None = None, peer_port: int = 0, instance: str = "") -> None:
        self.status_file = status_file
        # The agent process that started this one (``AgentHeartbeat.instance``), in every inventory event.
        self.instance = instance
        self.grants = grants or NodeGrants()
        self.peer_port = peer_port
        self.readiness = readiness or Readiness()
        self.settings = settings
        self.bus = bus
        self.namespace = namespace
        self.name = name
        self.mountpoint = mountpoint
        self.key = subjects.resource_key(namespace, name)  # in the KV buckets
        self.shown = subjects.object_name(namespace, name)  # in log lines and errors
        self.allocator = InodeAllocator()
        self._building = threading.Lock()  # ``_next_tree``
        self.manifest_version: ManifestVersion = NO_MANIFEST
        # The record whose mounts the stores follow: its secret files are read again every
        # SHOAL_SECRET_REFRESH_SECONDS (``_refresh_secrets``).
        self.record: DatasetRecord | None = None
        # The object store of each mount, rebuilt for mounts added or changed by a later sync.
        self.gates: list[StoreGate] = []
        self.locations: list[object] = []
        self.retired: list[StoreGate] = []
        # Each new store readies its client in the background (``StoreGate.prepare``) while the mount starts.
        self.preparing: set[asyncio.Task[None]] = set()
        self.deleted = False
        # The dataset was deleted and applied again (another incarnation) while this mount's watch was not looking
        # (restarting after a reconnect, whose replay shows only the newest record): gone as if deleted.
        self.recreated = False
        # (mount, key) → entry of the current manifest: what the peer server may serve (the tree's index, so a
        # file costs no second table: ``Namespace.by_key``).
        self.entries: Mapping[tuple[int, str], ManifestEntry] = {}
        # The loader's parts on this mount (told when a new manifest is served: a load part may wait for it).
        self.tasks: TaskRunner | None = None
        # This mount's series on /metrics (services.agent.metrics), labelled node and "<namespace>/<name>".
        self.metrics = MountMetrics(settings.agent.node_name, dataset_label(namespace, name))

    async def run(self, stop: asyncio.Event) -> None:
        # Until it is mounted, a stop ends the start where it is (the steps that can take long watch ``stop``):
        # nothing is mounted yet, so there is nothing to undo but what each step made.
        await self._starting(STARTING_RECORDS)
        started = await until_stopped(self._load_start(), stop)
        if started is None:
            self._stopped_while_starting(STARTING_RECORDS)
            return
        record, runtime, entries = started
        del started
        self.manifest_version = manifest_version(record)
        levels = self._granted_levels(runtime.runtime.spec.tieredstore.levels)
        block_size = parse_quantity(runtime.runtime.spec.block_size)
        inventory = InventoryLog(node=self.settings.agent.node_name, dataset=ObjectRef(name=self.name,
                                                                                       namespace=self.namespace),
                                 instance=self.instance, dataset_incarnation=record.incarnation)
        policy = LruPolicy if self.settings.agent.cache_policy == "lru" else FrequencyAdmissionPolicy
        cache = BlockCache.from_levels(levels, cache_suffix(self.settings.agent.cache_subdir, self.namespace,
                                                            self.name),
                                       policy_factory=policy, on_cached=inventory.cached, on_evicted=inventory.evicted)
        cache.on_tier_evicted = self.metrics.tier_evicted
        if not await self._hold_cache(cache, block_size, stop):
            self._stopped_while_starting(STARTING_CACHE_WAIT)
            return
        await self._starting(STARTING_CACHE)
        if not await self._load_cache(cache, block_size, stop):
            self._stopped_while_starting(STARTING_CACHE)
            return
        await self._starting(STARTING_MOUNT)
        # Seconds for a million files: in a thread, so the loop goes on answering NATS and /healthz meanwhile.
        tree = await asyncio.to_thread(self._first_tree, entries, cache, block_size)
        self._update_gates(record)
        self.record = record
        slots = self._budget_file()
        if slots is not None:
            slots.zero(self.grants.budget_slot)  # holds nothing yet (the agent zeroed it too; a crash leaks none)
        readahead = (MemoryBudget(slots.limit, node=NodeReadAhead(slots, self.grants.budget_slot)) if slots
                     else MemoryBudget(parse_quantity(self.settings.agent.readahead_budget)))
        self.entries = tree.by_key
        key = self._peer_key()
        client = PeerClient(key, self.namespace, self.name) if key is not None else None
        router = BlockRouter(self.settings.agent.node_name, client)
        router.update(runtime.status.workers)
        reader = BlockReader(cache, self.gates, block_size, readahead, write_block=cache.put_async, router=router,
                             metrics=self.metrics.reads(lambda: cache.last_medium),
                             write_dropped=self.metrics.write_dropped)
        peer_server = None
        if key is not None and self.peer_port:
            peer_server = PeerServer(key, self.namespace, self.name, block_size,
                                     lambda mount, object_key: self.entries.get((mount, object_key)),
                                     reader.serve_block,
                                     open_file=lambda entry, index: cache.open_block(reader.block_id(entry, index)),
                                     metrics=self.metrics.peer,
                                     cached=lambda entry, index: cache.contains(reader.block_id(entry, index)))
            try:
                await peer_server.start(self.settings.agent.peer_host, self.peer_port)
            except OSError as err:
                where = f"{self.settings.agent.peer_host}:{self.peer_port}"
                if err.errno == errno.EADDRINUSE:  # the agent picks another port before the restart
                    log.error("peer port taken by another process", dataset=self.shown, address=where)
                    raise SystemExit(EXIT_PEER_PORT_TAKEN) from None
                raise SystemExit(f"dataset {self.shown}: cannot serve peers on {where}: "
                                 f"{err.strerror or err}") from None
        owner = record.dataset.spec.owner
        files = len(entries)
        del entries  # the tree keeps them as columns; the list and its entry objects were ~400 bytes a file
        fs = DatasetFS(tree, reader, uid=owner.uid if owner else None,
                       gid=owner.gid if owner else None, block_size=block_size,
                       log_interval=self.settings.agent.read_failure_log_seconds)
        observer = self.metrics.fuse_observer()
        if observer is not None:  # None with SHOAL_METRICS=off: the handlers stay as they are
            time_operations(fs, observer)
        self.metrics.watch_cache(cache.stats)

        def counters() -> CacheCounters:
            stats = cache.stats()
            reads = reader.stats
            return CacheCounters(cached_bytes=stats.cached_bytes, capacity_bytes=stats.capacity_bytes,
                                 hit_bytes=reads.hit_bytes, miss_bytes=reads.miss_bytes,
                                 remote_bytes=reads.remote_bytes, loaded_bytes=reads.loaded_bytes,
                                 served_bytes=peer_server.served_bytes if peer_server else 0,
                                 counting=cache.counting)

        publisher = InventoryPublisher(self.bus, inventory, cache.blocks, counters)
        options = fuse_options(self.shown, self.settings.agent.allow_other)
        # Mount at a private staging directory, then move the mount into place once FUSE INIT is answered:
        # readers of the mount point see the previous (dead: ENOTCONN) mount until then, never an empty folder.
        staging = Staging(self.mountpoint)
        staged = await asyncio.to_thread(staging.prepare)
        if not staged:
            await asyncio.to_thread(replace_in_place, self.mountpoint)
        mount_at = staging.path if staged else self.mountpoint
        if (missing := fuse_unavailable()) is not None:
            raise SystemExit(f"dataset {self.shown}: cannot mount: {missing}")
        try:
            pyfuse3.init(fs, mount_at, options)
        except RuntimeError as err:  # libfuse said why on stderr only; its exception is "fuse_session_mount failed"
            raise SystemExit(f"dataset {self.shown}: cannot mount FUSE at {mount_at}: {err} (the mount process's "
                             "log has libfuse's reason)") from None
        fuse_loop = asyncio.create_task(pyfuse3.main())
        inventory_task = asyncio.create_task(publisher.run())
        # Loads and cleans work on the cache and the reader's store path, not on FUSE: they start with them.
        runner = TaskRunner(self.bus, self.settings.agent.node_name, ObjectRef(name=self.name,
                                                                               namespace=self.namespace),
                            cache, reader, lambda: self.entries, self.settings.agent.load_concurrency,
                            serving=lambda: self.manifest_version, warmed=self.metrics.warmup_bytes.inc,
                            incarnation=record.incarnation)
        self.tasks = runner
        tasks_task = asyncio.create_task(runner.run())
        # Failed reads go to the status file (the agent's heartbeat, the runtime's ReadsFailing condition).
        reporter = StatusReporter(self.status_file, cache.stats, fs.read_failures.report, fs.every_second)
        reporter_task = asyncio.create_task(reporter.run())
        self.readiness.add("cache", lambda: "; ".join(tier_problems(cache.stats())) or None)
        self.readiness.add("fuse", lambda: "FUSE session ended" if fuse_loop.done() else None)
        watcher: asyncio.Task[None] | None = None
        ring_watch: asyncio.Task[None] | None = None
        secrets_watch: asyncio.Task[None] | None = None
        loops = {"inventory": inventory_task, "status": reporter_task, "tasks": tasks_task}
        self.readiness.add("loops", lambda: ", ".join(f"{n} not running" for n, t in loops.items() if t.done()) or None)
        stopper = asyncio.create_task(stop.wait())
        device = None
        # Ends the background scan at its next file however the mount ends (a stop, or the FUSE session's end).
        halt = threading.Event()
        scanning: asyncio.Task[None] | None = None
        try:
            # The kernel sets the read-ahead when it processes FUSE INIT; a statfs answered by our own loop proves
            # INIT is done, so the value written afterwards sticks.
            await asyncio.to_thread(os.statvfs, mount_at)
            raise_read_ahead(mount_at)
            device = device_of(mount_at)
            if staged:
                try:
                    await asyncio.to_thread(staging.attach)
                finally:
                    await asyncio.to_thread(staging.cleanup)
            log.info("mounted", dataset=self.shown, mountpoint=self.mountpoint, files=files)
            scanning = asyncio.create_task(self._scan_cache(cache, block_size, halt.is_set))
            watcher = loops["manifest watch"] = asyncio.create_task(self._watch(fs, cache, stop))
            ring_watch = loops["runtime watch"] = asyncio.create_task(self._watch_runtime(router, stop))
            secrets_watch = loops["secret refresh"] = asyncio.create_task(self._refresh_secrets(stop))
            # Inventory is not awaited here: publishing may fail for a while, the mount keeps serving.
            await asyncio.wait([fuse_loop, watcher, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()
            if scanning is not None:
                scanning.cancel()  # its thread, if inside a shard, ends at the next file; what it found is dropped
                await asyncio.gather(scanning, return_exceptions=True)
            if watcher is not None:
                watcher.cancel()
            if ring_watch is not None:
                ring_watch.cancel()
            if secrets_watch is not None:
                secrets_watch.cancel()
            reporter.stop()
            runner.stop()  # a part in progress stops between blocks and is given back for the next process
            stopper.cancel()
            pyfuse3.terminate()
            with contextlib.suppress(Exception):
                await fuse_loop
            await asyncio.to_thread(unmount_own, self.mountpoint, device)
            pyfuse3.close(unmount=False)
            if peer_server is not None:
                await peer_server.stop()
            await asyncio.gather(tasks_task, return_exceptions=True)  # before the reader drains and stores close
            await reader.drain()
            if client is not None:
                await client.close()
            if self.deleted or self.recreated or await self._dataset_gone():
                purged = await cache.purge_async()  # evictions reach the inventory's last delta
                log.info("dataset deleted, cache freed", dataset=self.shown, blocks=purged)
                # Its task durable goes too, rather than stay on the server until its inactive threshold (a day): it
                # is this life's (``subjects.task_durable``), and the dataset applied again is another life, with a
                # durable and a subject of its own.
                await runner.forget()
            else:  # nothing writes now: the next start reads this instead of opening every block file
                indexed = await asyncio.to_thread(cache.save_index, block_size)
                log.info("cache index written", dataset=self.shown, blocks=indexed)
            publisher.stop()
            await asyncio.gather(inventory_task, reporter_task, *([watcher] if watcher else []),
                                 *([ring_watch] if ring_watch else []),
                                 *([secrets_watch] if secrets_watch else []), return_exceptions=True)
            for task in list(self.preparing):
                task.cancel()
            await asyncio.gather(*self.preparing, return_exceptions=True)
            for gate in [*self.gates, *self.retired]:
                await gate.store.close()
            if slots is not None:
                slots.zero(self.grants.budget_slot)
                slots.close()
            self.metrics.close()
            log.info("unmounted", dataset=self.shown)
        if fuse_loop.done() and not fuse_loop.cancelled() and fuse_loop.exception() is not None:
            raise fuse_loop.exception()  # type: ignore[misc]

    async def _starting(self, step: str, waiting_for: list[int] | None = None) -> None:
        """Tell the agent what the start is doing now (it names the step if the start outlasts its deadline), and
        for whom it waits (``MountStatus.waiting_for``)."""
        if self.status_file:
            await asyncio.to_thread(write_status, self.status_file, MountStatus(pid=os.getpid(), starting=step,
                                                                                waiting_for=waiting_for or []))

    async def _hold_cache(self, cache: BlockCache, block_size: int, stop: asyncio.Event) -> bool:
        """Take the cache folders' locks (``BlockCache.hold_folders``), waiting while an earlier mount process of the
        dataset deletes its blocks there (it can outlive its agent: a deleted dataset's purge, with the next
        agent's mount of its new incarnation starting meanwhile), or still serves blocks cut at another block size
        than ``block_size`` (the start deletes those); False when ``stop`` was set meanwhile."""
        said: list[Holder] | None = None
        while not await asyncio.to_thread(cache.hold_folders, block_size):
            # Who holds them, said again when that changes: the agent stops its own stale mount process among them.
            holders = await asyncio.to_thread(cache.folder_holders)
            if holders != said:
                said = holders
                await self._starting(waiting_step(holders), waiting_for=[h.pid for h in holders if not h.exclusive])
                log.info(STARTING_CACHE_WAIT, dataset=self.shown, holders=[str(h) for h in holders] or None)
            # flock cannot wait on ``stop`` too: it is asked again every so often instead (a purge takes seconds).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HOLD_RETRY_SECONDS)
            if stop.is_set():
                return False
        return True

    async def _load_cache(self, cache: BlockCache, block_size: int, stop: asyncio.Event) -> bool:
        """Index the blocks the last clean stop wrote down (in a thread: one file per tier, ``BlockCache.start``);
        False when ``stop`` was set meanwhile. The rest of the blocks are found by ``_scan_cache`` once the mount
        serves. A start held up by its disk (a hung NFS server) ends only when the disk answers, or by SIGKILL."""
        # The thread only reads the event's flag, which the loop sets: no lock needed for one bool.
        scan = asyncio.ensure_future(asyncio.to_thread(cache.start, block_size, stop.is_set,
                                                       self._scan_keep(block_size)))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([scan, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not scan.done():
                log.info("stop requested while loading the cache: the scan ends at its next file", dataset=self.shown)
            await scan
        except ScanCancelled:
            return False
        finally:
            stopping.cancel()
        return not stop.is_set()

    async def _scan_cache(self, cache: BlockCache, block_size: int, halted: Callable[[], bool]) -> None:
        """Index the block files no index listed (after a crash: every one), a shard at a time in a thread, while
        the mount serves; a block asked for before the scan reached it is looked for on disk then. A stop ends the
        scan at its next file; the files not opened yet wait for the next start. Blocks of objects not in the
        manifest served then, or of the wrong length (``_scan_keep``, as ``_prune_cache`` does at start), are
        deleted as they are found."""
        started = time.monotonic()
        try:
            found = await cache.scan_rest(self._scan_keep(block_size), halted)
        except ScanCancelled:
            log.info("cache scan stopped: the blocks not scanned yet wait for the next start", dataset=self.shown)
            return
        log.info("cache scanned", dataset=self.shown, found=found, seconds=round(time.monotonic() - started, 1))

    def _scan_keep(self, block_size: int) -> Callable[[BlockId, int], bool]:
        """Which block files found on disk after a restart are kept: those of objects the manifest serves, of the
        right length (the others are deleted as found)."""
        def keep(block: BlockId, size: int) -> bool:
            entry = self.entries.get((block.mount, block.key))
            return (entry is not None and entry.etag == block.etag
                    and size == block_span(entry.size, block_size, block.index)[1])

        return keep

    def _stopped_while_starting(self, step: str) -> None:
        self.metrics.close()
        log.info("stopped while starting, nothing mounted", dataset=self.shown, step=step)

    def _budget_file(self) -> SlotFile | None:
        if not self.grants.budget_file:
            return None
        try:
            return SlotFile(self.grants.budget_file)
        except (OSError, BudgetFileError) as err:
            raise SystemExit(f"dataset {self.shown}: read-ahead budget file unusable: {err}") from None

    def _granted_levels(self, levels: list[Level]) -> list[Level]:
        """The runtime's levels with the MEM tiers cut to what the agent granted out of the node's budget."""
        granted = self.grants.memory_quota
        if granted is None:
            return levels
        wanted = budget.memory_quota(levels)
        if granted < wanted:
            log.warning("memory tier smaller than the runtime's quota: the node's SHOAL_MEMORY_TIER_BUDGET is "
                        "taken by other mounts", dataset=self.shown, quota_bytes=wanted, granted_bytes=granted)
        return budget.capped_levels(levels, granted)

    async def _load_start(self) -> tuple[DatasetRecord, RuntimeRecord, list[ManifestEntry]]:
        """The records and the manifest the mount starts with, read again if a sync replaced that manifest
        meanwhile (``ManifestStore.load_current``)."""
        manifests = await ManifestStore.of(self.bus)

        def named(records: tuple[DatasetRecord, RuntimeRecord] | None) -> str:
            return records[0].status.manifest if records is not None else ""

        # _load_records raises when there is no record, or it names no manifest.
        records, entries = await manifests.load_current(self._load_records, named)
        if records is None or entries is None:
            raise SystemExit(f"dataset {self.shown}: its manifest {named(records)} is missing from the manifest store")
        record, runtime = records
        return record, runtime, entries

    async def _load_records(self) -> tuple[DatasetRecord, RuntimeRecord]:
        record, _ = await kv_load(await self.bus.kv(subjects.KV_DATASETS), self.key, DatasetRecord)
        runtime, _ = await kv_load(await self.bus.kv(subjects.KV_RUNTIMES), self.key, RuntimeRecord)
        if record is None or not record.status.manifest:
            raise SystemExit(f"dataset {self.shown} does not exist or has no manifest yet")
        if runtime is None:
            raise SystemExit(f"runtime {self.shown} does not exist")
        return record, runtime

    def _peer_key(self) -> bytes | None:
        """This runtime's peer signing key, or None when no secret is set (peer reads and server off)."""
        path = self.settings.agent.peer_secret_file
        if not path:
            log.info("no peer secret (SHOAL_PEER_SECRET_FILE): no peer server, every block read from the store",
                     dataset=self.shown)
            return None
        try:
            return runtime_key(load_secret(path), self.namespace, self.name)
        except PeerConfigError as err:
            raise SystemExit(f"dataset {self.shown}: {err}") from None

    async def _watch_runtime(self, router: BlockRouter, stop: asyncio.Event) -> None:
        """Keep the ring of block owners current from the runtime record's ``status.workers``, until ``stop``."""
        await self._keep_watching("runtime watch", lambda caught_up: self._follow_ring(router, stop, caught_up), stop)

    async def _follow_ring(self, router: BlockRouter, stop: asyncio.Event, caught_up: Callable[[], None]) -> None:
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        async with contextlib.aclosing(kv_watch(kv, stop, self.bus.reconnects, keys=self.key)) as watched:
            async for entry in watched:
                if entry is None:
                    caught_up()
                    continue
                if isinstance(entry, Replay):
                    continue
                workers: list[CacheWorker] = []
                if entry.operation not in ("DEL", "PURGE") and entry.value is not None:
                    try:
                        workers = msgspec.json.decode(entry.value, type=RuntimeRecord).status.workers
                    except msgspec.DecodeError as err:  # garbled or of another shape
                        log.error("runtime record not understood, ring unchanged", dataset=self.shown, error=str(err))
                        continue
                if router.update(workers):
                    log.info("ring of block owners changed", dataset=self.shown, owners=sorted(router.ring))

    async def _keep_watching(self, what: str, watch: Callable[[Callable[[], None]], Awaitable[None]],
                             stop: asyncio.Event) -> None:
        """``watch`` until ``stop``, started again with backoff whenever it fails or ends (its bucket missing, NATS
        refusing it, an error under it), as the inventory and task loops retry: the mount keeps serving with what
        it has, and the new watch's first entries bring it current. ``watch`` calls its argument once it has the
        current values, which resets the backoff."""
        failures = 0

        def caught_up() -> None:
            nonlocal failures
            failures = 0

        while not stop.is_set():
            try:
                await watch(caught_up)
            except Exception as err:  # whatever it was, the watch must outlive it: the mount depends on it
                failures += 1
                delay = WATCH_RETRY.delay(failures)
                log.error("watch failed; the mount goes on with what it has and starts it again", dataset=self.shown,
                          watch=what, error=f"{type(err).__name__}: {err}", retry_seconds=delay, failures=failures)
            else:
                if stop.is_set():
                    return
                failures += 1
                delay = WATCH_RETRY.delay(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _refresh_secrets(self, stop: asyncio.Event) -> None:
        """Read the secret files of the served record again every SHOAL_SECRET_REFRESH_SECONDS: Kubernetes rewrites a
        mounted Secret in place when it is rotated, and the next read of the store must use the new credentials,
        not wait for a resync. ``_update_gates`` keeps every store whose location is unchanged (``Secret`` compares
        by value), so an unchanged file costs a few small reads; a dataset without secret references costs none.
        A failure (a secret file missing meanwhile) is logged once until it changes: the stores stay as they are."""
        failed = ""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.agent.secret_refresh_seconds)
            record = self.record
            if stop.is_set() or record is None or not self._has_secret_refs(record):
                continue
            before = list(self.gates)
            try:
                self._update_gates(record)
            except (Exception, SystemExit) as err:
                if str(err) != failed:
                    log.error("secrets not read again; the object stores keep the credentials they have",
                              dataset=self.shown, error=str(err))
                failed = str(err)
                continue
            failed = ""
            renewed = [index for index, gate in enumerate(self.gates) if gate not in before]
            if renewed:
                log.info("secret files changed; new object stores for the mounts", dataset=self.shown, mounts=renewed)

    @staticmethod
    def _has_secret_refs(record: DatasetRecord) -> bool:
        return any(secret_refs(record.dataset, mount) for mount in record.dataset.spec.mounts)

    def _update_gates(self, record: DatasetRecord) -> None:
        """One object store per mount of the spec: kept where a mount's location is unchanged, new where it was
        added or its options (endpoint, credentials...) changed. Edits ``self.gates`` in place, which the reader
        shares; replaced stores are closed at exit (a read may still be using one)."""
        dataset = record.dataset
        locations: list[object] = []
        for mount in dataset.spec.mounts:
            try:
                location = mount_location(dataset, mount, self.settings.s3, pvc_root=self.settings.service.pvc_root,
                                          local_roots=self.settings.service.local_roots)
            except MissingSecret as err:  # where it was looked for, as the dataset's status says the service's
                raise SystemExit(f"dataset {self.shown}: {err}") from None
            if isinstance(location, LocalLocation):
                # The agent serves as root: it checks the roots (or the claim) itself rather than trust whoever
                # published.
                refused = local_location_error(location, self.settings.service.local_roots)
                if refused:
                    raise SystemExit(f"dataset {self.shown}: refusing to mount {mount.mount_point}: {refused}")
            locations.append(location)
        gates = [
            self.gates[index] if index < len(self.locations) and self.locations[index] == location
            else StoreGate(agent_store(location), metrics=self.metrics.store)
            for index, location in enumerate(locations)
        ]
        self.retired += [gate for gate in self.gates if gate not in gates]
        for gate in gates:
            if gate not in self.gates:
                task = asyncio.create_task(self._prepare(gate))
                self.preparing.add(task)
                task.add_done_callback(self.preparing.discard)
        self.gates[:] = gates
        self.locations = locations

    async def _prepare(self, gate: StoreGate) -> None:
        """The store's client made before the first read needs it (botocore's import and model parsing take about
        half a second of CPU, which a load or a cold read would otherwise wait for)."""
        try:
            await gate.prepare()
        except Exception as err:  # the first read opens it again and reports what is wrong
            log.debug("object store not readied ahead", dataset=self.shown, error=str(err))

    async def _dataset_gone(self) -> bool:
        """Whether the dataset was deleted (the agent may stop us before our watch sees it); False if unsure."""
        try:
            record, _ = await kv_load(await self.bus.kv(subjects.KV_DATASETS), self.key, DatasetRecord)
        except Exception:
            return False
        return record is None

    def _tree(self, entries: list[ManifestEntry]) -> Namespace:
        tree = Namespace.build(entries, self.allocator)
        if tree.skipped.count:  # only a manifest not written by this version's sync holds such entries
            log.warning("manifest entries left out of the tree", dataset=self.shown, skipped=tree.skipped.count,
                        examples=tree.skipped.examples)
        return tree

    def _first_tree(self, entries: list[ManifestEntry], cache: BlockCache, block_size: int) -> Namespace:
        """In a thread, at start: the first tree, and the cache cut to it (``_prune_cache``). Seconds for a million
        files, which the event loop spent stalled: the process's /healthz and NATS connection went unanswered. The
        cache is not used by anything else yet (its index was loaded in a thread too: ``BlockCache.start``)."""
        with self._building:
            tree = self._tree(entries)
        self._prune_cache(cache, tree, block_size)
        return tree

    def _next_tree(self, entries: list[ManifestEntry], served: Namespace
                   ) -> tuple[Namespace, TreeChanges, set[tuple[int, str, str]]]:
        """In a thread: a reload's tree, how it differs from the one ``served``, and the objects whose cached blocks
        it no longer serves (``gone_objects``). Seconds for a million files (the event loop, which serves every FUSE
        request, was stalled for them: every read and `ls` of the mount waited out each resync). One at a time: a
        reload cancelled by a newer one may still be building in its thread, and the allocator must hand out each
        inode number once."""
        with self._building:
            tree = self._tree(entries)
            changes = tree_changes(served, tree)
            return tree, changes, gone_objects(changes, tree)

    def _prune_cache(self, cache: BlockCache, tree: Namespace, block_size: int) -> None:
        """At start, before the mount serves: deletes the blocks kept from a previous run that ``tree`` does not
        serve: of objects no longer in the manifest (or at another ETag), then those whose length is not their
        span's (cut at another block size by a Shoal that did not record it, or damaged). Each cached file is looked
        up in the tree once: no table of every entry is made (~100 MB for a million files)."""
        files: dict[tuple[int, str], ManifestEntry | None] = {}

        def served(block: BlockId) -> ManifestEntry | None:
            key = (block.mount, block.key)
            if key not in files:
                files[key] = tree.entry_of(*key)
            entry = files[key]
            return entry if entry is not None and entry.etag == block.etag else None

        stale = cache.drop_stale(lambda block: served(block) is not None)
        if stale:
            log.info("cache blocks of objects gone from the manifest or changed deleted", dataset=self.shown,
                     blocks=stale)
        misfits = [block for block, length in cache.blocks()
                   if (entry := served(block)) is None
                   or length != block_span(entry.size, block_size, block.index)[1]]
        if misfits:
            log.warning("cache blocks of the wrong length deleted", dataset=self.shown, blocks=len(misfits))
            cache.evict(misfits)

    def _drop_stale(self, cache: BlockCache, gone: set[tuple[int, str, str]]) -> None:
        """After a reload: deletes the blocks of the objects it no longer serves (``gone_objects``). Nothing to look
        at when nothing went: a resync that changed nothing costs no walk of the cache."""
        if not gone:
            return
        stale = cache.drop_stale(lambda block: (block.mount, block.key, block.etag) not in gone)
        if stale:
            log.info("cache blocks of objects gone from the manifest or changed deleted", dataset=self.shown,
                     blocks=stale)

    async def _watch(self, fs: DatasetFS, cache: BlockCache, stop: asyncio.Event) -> None:
        """Reload the tree when the dataset is re-synced; stop when it is deleted."""
        await self._keep_watching("manifest watch", lambda caught_up: self._follow_dataset(fs, cache, stop, caught_up),
                                  stop)

    async def _follow_dataset(self, fs: DatasetFS, cache: BlockCache, stop: asyncio.Event,
                              caught_up: Callable[[], None]) -> None:
        kv = await self.bus.kv(subjects.KV_DATASETS)
        reloading: asyncio.Task[None] | None = None  # the reload of the newest record, retried until it works
        try:
            # Started again after a reconnect (libs.bus.kv_watch), so a resync right after a NATS restart is seen.
            async with contextlib.aclosing(kv_watch(kv, stop, self.bus.reconnects, keys=self.key)) as watched:
                async for entry in watched:
                    if entry is None:
                        caught_up()
                        continue
                    if isinstance(entry, Replay):
                        continue
                    if entry.operation in ("DEL", "PURGE"):
                        log.info("dataset deleted, unmounting", dataset=self.shown)
                        self.deleted = True
                        stop.set()
                        return
                    if entry.value is None:
                        continue
                    try:
                        record = msgspec.json.decode(entry.value, type=DatasetRecord)
                    except msgspec.DecodeError as err:
                        log.error("dataset record not understood; the mount keeps the tree it has", dataset=self.shown,
                                  error=str(err))
                        continue
                    if self.record is not None and recreated(self.record, record):
                        # Its delete was not seen: the replay of a restarted watch shows only the newest record. The
                        # tree served is a dataset that no longer exists (another source, maybe), and the new one
                        # may have no manifest yet: serving on until it has would show the old files under its name.
                        log.info("dataset deleted and applied again, unmounting", dataset=self.shown)
                        self.recreated = True
                        stop.set()
                        return
                    if manifest_version(record) == self.manifest_version or not record.status.manifest:
                        continue
                    if reloading is not None:
                        reloading.cancel()  # a newer record: its manifest is the one to serve (cancelled in a load)
                    reloading = asyncio.create_task(self._reload_until_done(fs, cache, record, stop))
        finally:
            if reloading is not None:
                reloading.cancel()
                await asyncio.gather(reloading, return_exceptions=True)

    async def _reload_until_done(self, fs: DatasetFS, cache: BlockCache, record: DatasetRecord,
                                 stop: asyncio.Event) -> None:
        """``_reload`` until it works, the mount stops or a newer record cancels it. A failed reload (NATS away, the
        manifest missing or replaced while read) leaves the mount serving the tree it has: readers keep their
        files, and the next try comes soon."""
        for attempt in itertools.count(1):
            try:
                await self._reload(fs, cache, record)
                return
            except Exception as err:  # whatever it was, the mount must outlive it: its readers still read
                delay = RELOAD_RETRY.delay(attempt)
                log.error("manifest reload failed; the mount serves the tree it has and tries again",
                          dataset=self.shown, manifest=record.status.manifest, error=f"{type(err).__name__}: {err}",
                          retry_seconds=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return

    async def _reload(self, fs: DatasetFS, cache: BlockCache, record: DatasetRecord) -> None:
        """The tree, object stores and cache following the record's new manifest."""
        entries = await (await ManifestStore.of(self.bus)).load(record.status.manifest)
        self.record = record  # the refresh of secrets follows it (and retries a secret missing here)
        try:
            self._update_gates(record)  # before the tree: a new mount's files must find their store
        except (Exception, SystemExit) as err:  # e.g. a missing secret: its reads fail, the rest serve
            log.error("object stores not updated", dataset=self.shown, error=str(err))
        tree, changes, gone_now = await asyncio.to_thread(self._next_tree, entries, fs.namespace)
        gone, changed, relisted = fs.replace_namespace(tree, changes)
        self.manifest_version = manifest_version(record)
        for parent, name in gone:
            with contextlib.suppress(Exception):
                # ENOENT only means the kernel never looked the name up: nothing to drop.
                pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
        for inode in changed:
            # Attributes only: the content of an inode never changes (writeback caching is off, so this
            # does not block). ENOENT: the kernel holds nothing for it.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
        for inode in relisted:
            # A folder's listing the kernel may cache (no-open mounts): its pages go, so the next `ls` asks.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=False)
        self.entries = tree.by_key
        self._drop_stale(cache, gone_now)
        if self.tasks is not None:
            self.tasks.manifest_reloaded()
        log.info("manifest reloaded", dataset=self.shown, files=len(entries), removed=len(gone),
                 attributes_changed=len(changed), folders_relisted=len(relisted))


def gone_objects(changes: TreeChanges, new: Namespace) -> set[tuple[int, str, str]]:
    """The (mount, key, ETag) of the objects the served tree (``changes.old``) had and ``new`` has not, whose cached
    blocks are no longer of use. Found from what changed (the files removed or whose entry changed, and the entries
    kept apart from the tree's paths), each looked up in ``new``: a resync that changed a few files costs a few
    look-ups, where a set of every entry of the manifest cost ~0.4 s and ~100 MB for a million files. Blocks of a
    file read after the reload that removed it (a descriptor opened before) stay until they are evicted or the next
    start cuts the cache to its tree."""
    old = changes.old
    candidates = [*changes.removed.values(), *old.entries_apart()]
    for inode in changes.entry_changed:
        node = old.get(inode)
        if node is not None and (entry := node.entry) is not None:
            candidates.append(entry)
    gone = set()
    for entry in candidates:
        now = new.entry_of(entry.mount, entry.key)
        if now is None or now.etag != entry.etag:
            gone.add((entry.mount, entry.key, entry.etag))
    return gone


async def until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """What ``work`` returns, or None if ``stop`` was set first (``work`` is then cancelled)."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def serve(settings: Settings, namespace: str, name: str, mountpoint: str,
                stop: asyncio.Event, status_file: str = "", readiness: Readiness | None = None,
                grants: NodeGrants | None = None, peer_port: int = 0, side_port: int = 0, instance: str = "") -> None:
    """One mount until ``stop``; with SHOAL_PROMETHEUS_TARGETS_DIR and a side server (``side_port``), its
    Prometheus file_sd target is there for as long as this runs."""
    targets, node = settings.agent.prometheus_targets_dir, settings.agent.node_name
    if targets and side_port:
        try:
            path = await asyncio.to_thread(write_target, targets, node, namespace, name, settings.service.http_host,
                                           side_port)
            log.info("prometheus target written", dataset=subjects.object_name(namespace, name), path=str(path))
        except OSError as err:  # metrics are still served; only discovery is missing
            log.error("cannot write the prometheus target", dataset=subjects.object_name(namespace, name),
                      error=str(err))
    try:
        bus = await connect(settings.nats, mount_connection_name(node, namespace, name), stop=stop)
        if readiness is not None:
            readiness.add("nats", nats_check(bus))
        try:
            await MountedDataset(settings, bus, namespace, name, mountpoint, status_file, readiness, grants,
                                 peer_port, instance).run(stop)
        finally:
            await bus.close()
    finally:
        if targets and side_port:
            remove_target(targets, node, namespace, name)


FUSE_DEVICE = "/dev/fuse"


def fuse_unavailable(device: str = FUSE_DEVICE, which: Callable[[str], str | None] = shutil.which,
                     privileged: bool | None = None) -> str | None:
    """Why this node cannot make a FUSE mount, with what to change, or None. libfuse's own failure is only
    "fuse_session_mount failed" in the exception (its reason goes to stderr), so the usual causes are looked for
    first: no FUSE device (a container without it), one this user cannot open, and, unprivileged, no
    ``fusermount3`` (libfuse mounts through it)."""
    if not os.path.exists(device):
        return (f"FUSE is not available: {device} does not exist (load the fuse module, install fuse3; a "
                f"container needs --device {device} and CAP_SYS_ADMIN)")
    if not os.access(device, os.R_OK | os.W_OK):
        return f"FUSE is not available: {device} is not readable and writable by this user (uid {os.geteuid()})"
    if not (os.geteuid() == 0 if privileged is None else privileged) and which("fusermount3") is None:
        return ("FUSE is not available: fusermount3 is not on PATH, and a mount by a user other than root goes "
                "through it (install fuse3)")
    return None


def enable_asyncio_fuse() -> None:
    """Run pyfuse3 on asyncio, with a sturdier ``notify_closing`` and a cheaper ``wait_readable`` than pyfuse3
    3.5's.

    Its asyncio layer sets an exception on every pending wait for the FUSE fd when the session is terminated,
    and raises InvalidStateError if one of those waits already completed (seen under concurrent reads at
    shutdown); then the others are never told and the unmount is not clean. Ours skips completed waits.

    Its ``wait_readable`` registers the FUSE fd with the event loop, waits one loop iteration and unregisters it,
    before every request: on warm opens and releases that was a fifth of the mount's CPU. When a request is
    already waiting (a zero-timeout poll says so), ours returns at once, up to ``FUSE_REQUESTS_IN_A_ROW`` times
    in a row, then goes through the event loop once so NATS, timers and other tasks keep their turn.
    """
    import pyfuse3.asyncio as fuse_asyncio

    fuse_asyncio.enable()
    read_futures = fuse_asyncio._read_futures

    def notify_closing(fd: int) -> None:
        for future in list(read_futures.get(fd, ())):
            if not future.done():
                future.set_exception(fuse_asyncio.ClosedResourceError())

    fuse_asyncio.notify_closing = notify_closing
    fuse_asyncio.wait_readable = _ReadableWait(fuse_asyncio.wait_readable)


# Requests served back to back without an event-loop iteration (warm ones take ~0.1 ms each, so the loop's other
# tasks wait at most a few milliseconds).
FUSE_REQUESTS_IN_A_ROW = 32


class _ReadableWait:
    """``wait_readable`` for pyfuse3's session loop: a zero-timeout poll first, the event loop when it is empty."""

    def __init__(self, wait: Callable[[int], Awaitable[None]]) -> None:
        self._wait = wait
        # One poll object per fd: a poll object polls every fd registered with it, and a closed session's fd
        # (POLLNVAL) must not make another session's look readable.
        self._pollers: dict[int, select.poll] = {}
        self._in_a_row = 0

    async def __call__(self, fd: int) -> None:
        if self._in_a_row < FUSE_REQUESTS_IN_A_ROW:
            poller = self._pollers.get(fd)
            if poller is None:
                poller = self._pollers[fd] = select.poll()
                poller.register(fd, select.POLLIN)
            if poller.poll(0):
                self._in_a_row += 1
                return
        self._in_a_row = 0
        await self._wait(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.agent.mountd", description=__doc__)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--status-file", default="", help="where to report cache health to the agent")
    parser.add_argument("--budget-file", default="", help="the node's read-ahead budget file (from the agent)")
    parser.add_argument("--budget-slot", type=int, default=0, help="this mount's slot in --budget-file")
    parser.add_argument("--memory-quota", type=int, default=None,
                        help="bytes the MEM tiers may hold, granted by the agent out of the node's budget")
    parser.add_argument("--peer-port", type=int, default=0,
                        help="serve this mount's blocks to peers on SHOAL_PEER_HOST:PORT (0: no peer server)")
    parser.add_argument("--instance", default="", help="the agent process that starts this one (its heartbeats' "
                        "instance), sent with the inventory")
    args = parser.parse_args(argv)
    if not 0 <= args.peer_port <= 65535:
        parser.error("--peer-port must be between 0 and 65535")
    grants = NodeGrants(args.budget_file, args.budget_slot, args.memory_quota)
    reuse_block_buffers()  # block-sized buffers from the heap, not fresh pages (see services.agent.malloc)
    enable_asyncio_fuse()  # the FUSE session runs on the asyncio loop, beside NATS
    side: dict[str, int] = {}  # the side server's port, once it listens (before serve starts)

    def fatal(reason: str) -> None:  # the agent quotes it in its heartbeat: why the mount keeps failing
        if args.status_file:
            with contextlib.suppress(OSError):
                write_status(args.status_file, fatal_status(os.getpid(), reason))

    service_main("shoal-mount",
                 lambda settings, stop, readiness: serve(settings, args.namespace, args.name, args.mountpoint, stop,
                                                         args.status_file, readiness, grants, args.peer_port,
                                                         side.get("port", 0), args.instance),
                 on_listening=lambda port: side.__setitem__("port", port), on_fatal=fatal)


if __name__ == "__main__":
    main()
