"""The loader's work on this node's cache of one dataset: the mount process executes the ``NodeTask`` parts of
DataLoads and DataCleans addressed to it (the protocol: ``libs.events.operation`` and the agent README).

What it decides:
- which parts run: one at a time, from this mount's durable consumer (``subjects.task_durable``) on its node's
  task stream (``subjects.task_stream``: the loader makes it before the node's first part; until then the mount
  looks for it again when the server announces it, ``subjects.task_stream_made``, and every
  ``STREAM_WAIT_SECONDS``), and only while
  their run is current — the operation's record in KV ``shoal_operations`` is Executing at that run's number;
  a part of an older, deleted or finished run is acknowledged and skipped (``not_current``);
- per block of a load: failed when its object version is not in the current manifest ("object changed since the
  load was planned"; "object left the dataset ..." when its key is not in it at all), checked once the mount
  serves the manifest the dataset record names (the loader planned against it; the mount's own KV watch may load
  it a moment later, e.g. right after a resync that fired an OnEvent or loadMetadata run), waited for up to
  ``MANIFEST_WAIT_SECONDS``; skipped when cached; otherwise
  fetched from the store into the cache (``BlockReader.warm``: the reader's coalesced store path, never FUSE,
  never a peer), at most ``SHOAL_LOAD_CONCURRENCY`` at once, and done once written. A store error fails that
  block with its reason (an unreachable store is tried again twice first), never the part or the process;
- a clean: the blocks named (skipped when not cached), every cached block of ``files`` (any version), or
  everything, evicted through the cache's own eviction path, so inventory deltas report it; freed bytes are done.
  Right after a restart that found no index (a crash), the cache's background scan may not have reached every
  block yet: a clean of ``files``/everything has the scan delete the blocks it selects as it finds them
  (``BlockCache.sweep``), and the clean itself scans the shard folders the scan has not taken yet
  (``BlockCache.sweep_rest``), so it is done, counting them, once its own part is, not when the whole scan ends;
  named blocks are looked for on disk.
  It first waits for the blocks being fetched or written when it starts (``BlockReader.settle``): the last fetches
  of a load cancelled just before it would otherwise be cached after it finished;
- progress (``PartLedger``, pure): cumulative ``TaskProgress`` at most once a second while there is news, then a
  final one with ``done`` (``failed`` and the first reason if blocks failed), published again with backoff
  (``REPORT_RETRY``, the same event: deduplicated) until JetStream takes it or the process stops, then the
  acknowledgement;
- ``TaskCancel`` (core NATS) stops the run's part between blocks: the blocks in flight are not waited for (their
  fetches finish in the reader and are cached), a final progress says "cancelled", the part is acknowledged;
  ``TaskPartsCancel`` does the same for the parts it numbers on this node only (the loader moved them to other
  cache workers), the run's other parts going on. A cancel missed (core NATS) is caught every
  ``CURRENT_CHECK_SECONDS``: the run no longer current, or the part among the record's ``movedParts`` for this node;
- a mount process that stops leaves its part unacknowledged (a clean stop gives it back at once): its successor
  gets it again, skips what is cached, so no block is fetched twice. A killed one's part comes back after
  ``ACK_WAIT_SECONDS``; ``in_progress`` every second keeps a live one's part from being redelivered. On its last
  delivery (``MAX_DELIVER``) a part is not executed: a final progress counts the blocks the earlier deliveries did
  (found in the cache) and fails the others saying so (``given_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from opentelemetry import trace

from libs import subjects
from libs.backoff import Backoff
from libs.blocks import BlockId, block_count
from libs.bus import DAY, Bus, kv_load
from libs.events.common import DECODE_ERRORS, ObjectRef
from libs.events.dataset import DatasetRecord, ManifestEntry
from libs.events.operation import NodeTask, OperationRecord, TaskCancel, TaskPartsCancel, TaskProgress
from libs.paths import quoted_key
from libs.redact import cut_error
from libs.telemetry import extract_context, get_logger, messaging_attributes, tracer
from libs.ufs.base import EndpointUnreachable, UfsError
from services.agent.cache import BlockCache
from services.agent.reader import BlockReader

log = get_logger(__name__)

# A part whose mount process was killed goes to its successor after this long without an ``in_progress``; a live
# process sends one every HEARTBEAT_SECONDS, so only a loop stalled for 5 s lets a part be delivered twice (which
# costs nothing: cached blocks are skipped).
ACK_WAIT_SECONDS = 5.0
# The protocol's "at most once a second" for progress, and the in_progress cadence with it.
HEARTBEAT_SECONDS = 1.0
# How often a part being executed checks that its run is still current (its operation's record, one KV read). The
# loader's cancel is a plain NATS message: one this process missed (its connection down at that moment) would let a
# part of a deleted or failed run go on fetching, up to its last block.
CURRENT_CHECK_SECONDS = 5.0
# A part delivered this often without being finished (a process that crashes on it every time) is given up;
# a restart or a clean stop each count one. The last delivery is not executed but reported (``given_up``): the
# server delivers the part no more, and a part the loader never hears of again leaves its run Executing for ever.
MAX_DELIVER = 20
# A durable nobody pulled from for a day (its dataset unmounted from this node, its mount process down) is dropped by
# the server; the stream keeps tasks for a day too, so nothing it could still deliver is lost. A durable is one life's
# of the dataset (``subjects.task_durable``): its mount process deletes it when the dataset is deleted
# (``TaskRunner.forget``), or the agent when it frees a dead mount process's cache (``forget_durable``); this
# threshold drops those neither could (NATS away then).
INACTIVE_SECONDS = DAY
# How long one pull waits for a part before looking at ``stop`` again.
FETCH_SECONDS = 1.0
# Blocks evicted per turn of the loop: one unlink each, so FUSE reads are served between slices.
CLEAN_SLICE = 256
# An unreachable store is tried this often per block, waiting past the reader's 1 s fail-fast window between.
STORE_ATTEMPTS = 3
STORE_RETRY_SECONDS = 1.5
# Cancelled runs remembered, for parts of them delivered after the broadcast (the KV check covers the rest), for as
# long as a node's task stream keeps a part (``libs.bus.node_task_stream``). No longer: once an operation's delete
# marker is purged (``libs.markers``), the same name applied again numbers its runs from 1 again, and a run id
# remembered for ever would skip that run's parts as cancelled.
CANCELLED_RUNS = 64
CANCELLED_SECONDS = DAY
# After NATS errors in the consumer loop, wait this long before pulling again.
RETRY_SECONDS = 1.0
# A part's final progress not taken by JetStream (NATS away, no acknowledgement, the stream full) is published again
# after these delays until it is, or the mount process stops: the work is done and only the loader must hear of it.
# Giving the part back instead ran it again at every failure and, past MAX_DELIVER deliveries, gave it up as failed,
# its report lost too if NATS was still away: the run then failed on the loader's silent-node timeout.
REPORT_RETRY = Backoff(first=0.5, cap=10.0)
# While the node has no task stream yet (no load or clean was ever planned for it), a mount looks for it at once when
# the server announces it, and this often in case the announcement was missed (a reconnect): one JetStream request
# per mount each time.
STREAM_WAIT_SECONDS = 30.0
# The server's error code for "stream not found".
_NO_STREAM = 10059
# How long a load part waits for this mount to load the manifest its dataset's record names before checking its
# blocks (the loader planned the part against that manifest). Loading one takes well under a second; a mount still
# behind after this long checks against what it has, and blocks it does not know fail as changed.
MANIFEST_WAIT_SECONDS = 30.0
# While waiting, the dataset record is read again this often (a reload is also signalled at once).
MANIFEST_CHECK_SECONDS = 1.0

CHANGED = "object changed since the load was planned"
# Not "changed": the object is in the dataset no more (deleted, or the dataset's mount or prefix changed, which
# lists other keys), so running the same load again is what loads the dataset as it is now.
LEFT = ("object left the dataset since the load was planned (it is no longer in the dataset's listing: deleted, or "
        "the dataset's mounts or prefix changed); apply the load again to load the dataset as it is now (a Once "
        "DataLoad: delete it, then apply it)")
NOT_KEPT = "fetched but not kept: the cache is full of blocks read more often, or its tiers are down"
CANCELLED = "cancelled"
MOVED = "moved to other cache workers (this node left the runtime's ring)"

# The CONSUMER span of a part (``TaskRunner._process``).
_SPAN = f"process {subjects.TASK_PREFIX}"
_TASK = msgspec.json.Decoder(NodeTask)
_CANCEL = msgspec.json.Decoder(TaskCancel | TaskPartsCancel)


# --- pure ---


def parse_run(run: str) -> tuple[str, int] | None:
    """``<operation key>.<n>`` → (operation key, n); None when it is not of that shape."""
    key, _, number = run.rpartition(".")
    if not key or not number.isdigit():
        return None
    return key, int(number)


def not_current(run: str, record: OperationRecord | None) -> str | None:
    """Why a part of ``run`` must not run, given its operation's record; None when the run is current."""
    parsed = parse_run(run)
    if parsed is None:
        return f"run id {run!r} is not <operation>.<number>"
    if record is None:
        return "its operation no longer exists"
    if record.status.runs != parsed[1]:
        return f"the operation is at run {record.status.runs}"
    if record.status.phase != "Executing":
        return f"the operation is {record.status.phase}"
    return None


def moved_off(run: str, part: int, node: str, record: OperationRecord | None) -> bool:
    """The loader moved part ``part`` of ``run`` off ``node`` (``OperationRecord.moved_parts``): it stops here, the
    run's other parts going on. Told by ``TaskPartsCancel`` too, a plain NATS message a node may miss."""
    return record is not None and any(moved.run == run and moved.node == node and part in moved.parts
                                      for moved in record.moved_parts)


# What tells one manifest of a dataset from the next: (syncedGeneration, syncedRequests, lastSyncTime, manifest).
# lastSyncTime has whole seconds; a resync finishing within the second of the listing before still differs.
ManifestVersion = tuple[int, int, str, str]
NO_MANIFEST: ManifestVersion = (0, 0, "", "")


def manifest_version(record: DatasetRecord) -> ManifestVersion:
    """The version of the manifest a dataset record names, as the mount process tracks it."""
    status = record.status
    return status.synced_generation, status.synced_requests, status.last_sync_time, status.manifest


def manifest_behind(record: DatasetRecord | None, serving: ManifestVersion) -> bool:
    """True when the dataset's record names a manifest newer than the one the mount serves (``serving``)."""
    return record is not None and bool(record.status.manifest) and manifest_version(record) != serving


def block_problem(entry: ManifestEntry | None, etag: str, index: int, block_size: int) -> str | None:
    """Why a block of a load cannot be fetched against the current manifest; None when it can."""
    if entry is None:
        return LEFT
    if entry.etag != etag:
        return CHANGED
    if not 0 <= index < block_count(entry.size, block_size):
        return f"block {index} is past the end of the object ({entry.size} bytes)"
    return None


@dataclass
class PartLedger:
    """What one part has done so far, as ``TaskProgress`` says it: cumulative counts, files whose blocks in the
    part are all done (failed ones never are), and the first failure's reason."""

    remaining: list[int]  # per file of the part's ``blocks``: blocks not done yet
    failed_files: set[int] = field(default_factory=set)
    blocks_done: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    failed: int = 0
    message: str = ""
    version: int = 0  # bumped on every change, so the heartbeat publishes only news
    # The bytes the part has to do: its blocks, and a clean's victims once found (``found``).
    bytes_total: int = 0

    @classmethod
    def of(cls, task: NodeTask) -> PartLedger:
        return cls(remaining=[len(file.blocks) for file in task.blocks],
                   bytes_total=sum(size for file in task.blocks for _, size in file.blocks))

    def found(self, size: int) -> None:
        """A clean's ``files``/everything found ``size`` bytes cached to free: the loader has no other way to know a
        clean's total."""
        self.bytes_total += size
        self.version += 1

    def done(self, file: int | None, size: int, *, skipped: bool = False) -> None:
        """A block done (``file``: its index in the part's ``blocks``, None for blocks of ``files``/everything)."""
        self.blocks_done += 1
        if skipped:
            self.bytes_skipped += size
        else:
            self.bytes_done += size
        if file is not None:
            self.remaining[file] -= 1
        self.version += 1

    def fail(self, file: int | None, reason: str) -> None:
        self.failed += 1
        self.message = self.message or cut_error(reason)  # a store's error text can be megabytes
        if file is not None:
            self.failed_files.add(file)
        self.version += 1

    def files_done(self) -> list[int]:
        return [i for i, left in enumerate(self.remaining) if left <= 0 and i not in self.failed_files]

    def progress(self, task: NodeTask, event_id: str, *, done: bool = False, message: str = "") -> TaskProgress:
        return TaskProgress(id=event_id, run=task.run, part=task.part, node=task.node, blocks_done=self.blocks_done,
                            bytes_done=self.bytes_done, bytes_skipped=self.bytes_skipped,
                            files_done=self.files_done(), failed=self.failed, message=message or self.message,
                            done=done, bytes_total=self.bytes_total)


def given_up(task: NodeTask, deliveries: int, event_id: str, cached: Callable[[BlockId], bool],
             victims_left: int = 0) -> TaskProgress:
    """The final progress of a part on its last delivery (the durable's ``max_deliver``): not executed, since
    whatever stopped the earlier ones would likely stop this one before it could report. What the earlier deliveries
    did is read from the cache (their ledgers died with their processes): a block a load names that is ``cached``
    (at the part's version), or one a clean names that is not, is done (skipped: this delivery did nothing); every
    other block fails, as do the ``victims_left`` blocks still cached that a clean of ``files``/everything was to
    free. At least one fails, so the loader ends the run Failed naming this node and why: a part that never
    finished on its own is no success even when its work is found done."""
    ledger = PartLedger.of(task)
    reason = (f"part {task.part} of run {task.run} was delivered {deliveries} times without finishing (the mount "
              f"process stopped or crashed during each); given up: run the operation again")
    for file_index, file in enumerate(task.blocks):
        for index, size in file.blocks:
            # A load is done once its block is cached, a clean once it is not.
            if cached(BlockId(file.mount, file.key, file.etag, index)) == (task.action == "load"):
                ledger.done(file_index, size, skipped=True)
            else:
                ledger.fail(file_index, reason)
    for _ in range(victims_left):
        ledger.fail(None, reason)
    if not ledger.failed:
        ledger.fail(None, reason)
    return ledger.progress(task, event_id, done=True)


def load_blocks(task: NodeTask) -> Iterator[tuple[int, int, int]]:
    """(file index in the part, block index, size) of every block of a part, in order."""
    for file_index, file in enumerate(task.blocks):
        for index, size in file.blocks:
            yield file_index, index, size


# --- I/O ---


Outcome = Literal["finished", "cancelled", "stopped"]


@dataclass
class _Running:
    run: str
    part: int
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class TaskRunner:
    """Pulls this mount's parts and executes them on its cache, until ``stop``."""

    def __init__(self, bus: Bus, node: str, dataset: ObjectRef, cache: BlockCache, reader: BlockReader,
                 entries: Callable[[], Mapping[tuple[int, str], ManifestEntry]], concurrency: int,
                 serving: Callable[[], ManifestVersion] | None = None,
                 warmed: Callable[[int], None] | None = None, incarnation: str = "") -> None:
        self.bus = bus
        # Told the bytes of each block a load fetched into the cache (the WARMUP_BYTES counter of /metrics).
        self.warmed = warmed
        self.node = node
        self.dataset = dataset
        self.cache = cache
        self.reader = reader
        self.entries = entries
        self.concurrency = max(1, concurrency)
        # The version of the manifest behind ``entries`` (``manifest_version``); None: never wait for a newer one.
        self.serving = serving
        self._reloaded = asyncio.Event()
        # The parts of the dataset's life this mount serves (``DatasetRecord.incarnation``), and none of another's.
        self._incarnation = incarnation
        self.subject = subjects.node_task(node, dataset.namespace, dataset.name, incarnation)
        self.durable = subjects.task_durable(node, dataset.namespace, dataset.name, incarnation)
        self.stream = subjects.task_stream(node)
        self._stopping = asyncio.Event()
        self._running: _Running | None = None
        # (run, its parts cancelled here or None for all of them, monotonic time)
        self._cancelled: deque[tuple[str, frozenset[int] | None, float]] = deque(maxlen=CANCELLED_RUNS)
        # The durable's own ``max_deliver``: one kept from before a change of MAX_DELIVER goes on with its old count.
        self._max_deliver = MAX_DELIVER
        self._tracer = tracer(__name__)

    def manifest_reloaded(self) -> None:
        """The mount serves a new manifest: a load part waiting for it looks again at once."""
        self._reloaded.set()

    def stop(self) -> None:
        """Stop pulling; a part being executed stops between blocks and is given back unacknowledged."""
        self._stopping.set()
        if self._running is not None:
            self._running.abort.set()

    async def run(self) -> None:
        """Pull and execute parts until ``stop``; NATS errors are logged and retried, never raised."""
        cancels = None
        subscription = None
        made: tuple[asyncio.Event, Subscription] | None = None  # while looking for the node's task stream
        said_waiting = False
        try:
            while not self._stopping.is_set():
                try:
                    if cancels is None:
                        cancels = await self.bus.subscribe(subjects.TASK_CANCEL, _CANCEL, self._on_cancel)
                    if subscription is None:
                        if made is None:  # before looking: an advisory between the look and the wait is not lost
                            made = await self._stream_made()
                        try:
                            subscription = await self.bus.js.pull_subscribe(
                                self.subject, durable=self.durable, stream=self.stream,
                                config=self._consumer_config())
                        except NotFoundError as err:
                            if err.err_code != _NO_STREAM:
                                raise
                            if not said_waiting:  # the usual state of a node no load was planned for yet
                                log.info("no task stream for this node yet, waiting for the loader to make it",
                                         dataset=self._key, stream=self.stream)
                                said_waiting = True
                            await self._wait(STREAM_WAIT_SECONDS, made[0])
                            made[0].clear()
                            continue
                        with contextlib.suppress(Exception):
                            await made[1].unsubscribe()
                        made, said_waiting = None, False
                        self._max_deliver = (await subscription.consumer_info()).config.max_deliver or 0
                    try:
                        messages = await subscription.fetch(1, timeout=FETCH_SECONDS)
                    except (TimeoutError, nats.errors.TimeoutError):
                        continue
                    for message in messages:
                        await self._process(message)
                except Exception as err:
                    log.warning("task consumer failed, subscribing again", dataset=self._key, error=repr(err))
                    if subscription is not None:  # e.g. its consumer is gone: pull_subscribe makes it again
                        with contextlib.suppress(Exception):
                            await subscription.unsubscribe()
                        subscription = None
                    await self._wait(RETRY_SECONDS)
        finally:
            for sub in (subscription, cancels, made[1] if made else None):
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    @property
    def _key(self) -> str:
        return subjects.object_name(self.dataset.namespace, self.dataset.name)

    def _consumer_config(self) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_SECONDS,
            max_deliver=MAX_DELIVER,
            max_ack_pending=1,  # one part at a time
            filter_subject=self.subject,
            # Parts published before this mount's first start are for it too: the loader may plan a run before the
            # mount started. Made once per life of the dataset on the node, on that life's subject, so this delivers
            # no part of an earlier life (a dataset deleted and applied again): only, after a day unused, parts of
            # this life that finished runs left in the stream (the KV check skips them).
            deliver_policy=js_api.DeliverPolicy.ALL,
            inactive_threshold=INACTIVE_SECONDS,
        )

    async def forget(self) -> None:
        """Delete this mount's durable: its dataset was deleted, and with it this life's parts."""
        await forget_durable(self.bus, self.node, self.dataset, self._incarnation)

    async def _wait(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """``seconds``, or less if stopped or ``wake`` is set."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self._stopping, wake) if event is not None]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _stream_made(self) -> tuple[asyncio.Event, Subscription]:
        """An event set when the server says the node's task stream was made (its advisory), and the subscription
        behind it: a part published into a new stream is pulled at once, not at the next poll."""
        made = asyncio.Event()

        async def on_advisory(_: Msg) -> None:
            made.set()

        return made, await self.bus.nc.subscribe(subjects.task_stream_made(self.node), cb=on_advisory)

    async def _on_cancel(self, cancel: TaskCancel | TaskPartsCancel) -> None:
        if isinstance(cancel, TaskCancel):
            self._cancel(cancel.run)
        elif cancel.node == self.node:  # another node's parts moved: this node's of the run go on
            self._cancel(cancel.run, frozenset(cancel.parts))

    def _cancel(self, run: str, parts: frozenset[int] | None = None) -> None:
        """Remember ``run`` (only its ``parts``, when given) as cancelled, so its parts delivered later are skipped,
        and stop its part if one runs."""
        self._cancelled.append((run, parts, time.monotonic()))
        running = self._running
        if running is not None and running.run == run and (parts is None or running.part in parts):
            running.cancelled = True
            running.abort.set()

    def _was_cancelled(self, run: str, now: float | None = None, part: int | None = None) -> bool:
        """``run`` (or its ``part``) was cancelled within ``CANCELLED_SECONDS`` (its parts may still be in the
        stream). A run only some of whose parts were cancelled (moved to other workers) is not: its other parts may
        come back to this node (it joins the ring again)."""
        now = time.monotonic() if now is None else now
        return any(cancelled == run and now - at < CANCELLED_SECONDS
                   and (parts is None or (part is not None and part in parts))
                   for cancelled, parts, at in self._cancelled)

    # --- one part ---

    async def _process(self, message: Msg) -> None:
        # The part goes on in the trace the loader's publish put in its headers, as every consumed command does
        # (``libs.bus.Consumer``): its store GETs and its progress publishes are made inside this span (the
        # heartbeat and the work are tasks started in it), so the loader's handling of the progress joins the trace.
        # Named by the subjects' common prefix, not this mount's durable: one span name for every node and dataset
        # (the subject itself is an attribute).
        with self._tracer.start_as_current_span(_SPAN, context=extract_context(message.headers),
                                                kind=trace.SpanKind.CONSUMER,
                                                attributes=messaging_attributes(message.subject)):
            await self._process_part(message)

    async def _process_part(self, message: Msg) -> None:
        deliveries = message.metadata.num_delivered or 1
        try:
            task = _TASK.decode(message.data)
        except DECODE_ERRORS as err:
            log.error("task not understood, dropped", dataset=self._key, error=str(err))
            await message.term()
            return
        bound = log.bind(dataset=self._key, run=task.run, part=task.part, action=task.action, delivery=deliveries)
        if task.node != self.node or task.dataset != self.dataset:
            bound.error("task addressed to another mount, dropped", node=task.node,
                        task_dataset=subjects.object_name(task.dataset.namespace, task.dataset.name))
            await message.ack()
            return
        skip = (CANCELLED if self._was_cancelled(task.run, part=task.part)
                else await self._not_current(task.run, task.part))
        if skip:
            bound.info("part skipped: its run is not current", reason=skip)
            await message.ack()
            return
        if 0 < self._max_deliver <= deliveries:
            victims = (len(self.cache.cached_blocks(self._selection(task)))
                       if task.action == "clean" and (task.everything or task.files) else 0)
            final = given_up(task, deliveries, progress_id(task, deliveries, "final"), self.cache.contains, victims)
            if not await self._report(message, final, bound):
                # Stopped: the server delivers it no more, only the loader's node checks remain.
                bound.error("part given up, its final progress not published: the mount process stops")
                return
            await message.ack()
            bound.error("part given up", message=final.message)
            return
        started = time.monotonic()
        ledger = PartLedger.of(task)
        outcome = await self._execute(message, task, ledger, deliveries)
        if outcome == "stopped":
            bound.info("part interrupted by a stop, given back", blocks_done=ledger.blocks_done)
            with contextlib.suppress(Exception):
                await message.nak(delay=0)  # the next mount process gets it at once
            return
        final = ledger.progress(task, progress_id(task, deliveries, "final"), done=True,
                                message=CANCELLED if outcome == "cancelled" else "")
        if not await self._report(message, final, bound):
            bound.info("part done but stopped before its final progress was published, given back")
            with contextlib.suppress(Exception):
                await message.nak(delay=0)  # the next mount process runs it again: cached blocks are skipped
            return
        await message.ack()
        bound.info("part done", outcome=outcome, blocks_done=final.blocks_done, bytes_done=final.bytes_done,
                   bytes_skipped=final.bytes_skipped, failed=final.failed, message=final.message,
                   seconds=round(time.monotonic() - started, 3))

    async def _report(self, message: Msg, final: TaskProgress, bound: Any) -> bool:
        """Publish a part's final progress until JetStream takes it (True) or the mount process stops (False),
        keeping the part ours meanwhile (``in_progress``). Every attempt is the same event, so one that was stored
        but whose acknowledgement was lost is deduplicated (``Nats-Msg-Id``), and the loader counts the part once."""
        failures = 0
        while True:
            try:
                await self.bus.publish(subjects.task_progress(self.node), final)
                return True
            except Exception as err:
                failures += 1
                delay = REPORT_RETRY.delay(failures)
                bound.warning("final progress not published, trying again", error=repr(err), failures=failures,
                              retry_in_seconds=delay)
            deadline = time.monotonic() + delay
            while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(Exception):
                    await message.in_progress()
                await self._wait(min(left, HEARTBEAT_SECONDS))
            if self._stopping.is_set():
                return False

    async def _not_current(self, run: str, part: int) -> str | None:
        """Why part ``part`` of ``run`` must not run here (``not_current``, or ``MOVED`` off this node), from its
        operation's record; None when it may."""
        parsed = parse_run(run)
        record = None
        if parsed is not None:
            try:
                record, _ = await kv_load(await self.bus.kv(subjects.KV_OPERATIONS), parsed[0], OperationRecord)
            except (msgspec.ValidationError, msgspec.DecodeError) as err:
                return f"its operation record is not understood: {err}"
        return not_current(run, record) or (MOVED if moved_off(run, part, self.node, record) else None)

    async def _execute(self, message: Msg, task: NodeTask, ledger: PartLedger, deliveries: int) -> Outcome:
        running = self._running = _Running(task.run, task.part)
        if self._stopping.is_set():
            running.abort.set()
        work = asyncio.ensure_future(self._load(task, ledger, running.abort) if task.action == "load"
                                     else self._clean(task, ledger, running.abort))
        aborted = asyncio.ensure_future(running.abort.wait())
        ended = asyncio.Event()
        heartbeat = asyncio.ensure_future(self._heartbeat(message, task, ledger, deliveries, ended))
        try:
            await asyncio.wait([work, aborted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.set()
            for future in (work, aborted, heartbeat):
                future.cancel()
            await asyncio.gather(work, aborted, heartbeat, return_exceptions=True)
            self._running = None
        if work.done() and not work.cancelled() and work.exception() is None and not running.abort.is_set():
            return "finished"
        if running.cancelled:
            return "cancelled"
        if self._stopping.is_set():
            return "stopped"
        exception = None if work.cancelled() else work.exception()
        if exception is not None:  # a bug: report it as the part's failure rather than loop on it
            log.error("part failed", dataset=self._key, run=task.run, part=task.part, error=repr(exception))
            ledger.fail(None, f"the agent failed: {exception!r}")
        return "finished"

    async def _heartbeat(self, message: Msg, task: NodeTask, ledger: PartLedger, deliveries: int,
                         ended: asyncio.Event) -> None:
        """Every second until ``ended``: keep the part ours (``in_progress``) and publish progress if there is news;
        every ``CURRENT_CHECK_SECONDS``, end the part as cancelled if its run is no longer current (a cancel missed).
        It ends on ``ended``, not only on its cancellation: nats-py may swallow a cancellation that lands inside
        one of its calls, and a heartbeat that went on would keep the part's end waiting for ever."""
        published = 0
        sent = 0
        checked = time.monotonic()
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), HEARTBEAT_SECONDS)
            if ended.is_set():
                return
            with contextlib.suppress(Exception):
                await message.in_progress()
            if time.monotonic() - checked >= CURRENT_CHECK_SECONDS:
                checked = time.monotonic()
                reason = None
                with contextlib.suppress(Exception):  # NATS away: the next check, or the cancel, decides
                    reason = await self._not_current(task.run, task.part)
                if reason:
                    log.info("part stopped: its run is not current or the part moved (its cancel was missed)",
                             dataset=self._key, run=task.run, part=task.part, reason=reason)
                    # A moved part stops alone: the run's other parts may still come to this node.
                    self._cancel(task.run, frozenset({task.part}) if reason == MOVED else None)
                    return
            if ledger.version == published:
                continue
            published = ledger.version
            sent += 1
            try:
                await self.bus.publish(subjects.task_progress(self.node),
                                       ledger.progress(task, progress_id(task, deliveries, str(sent))))
            except Exception as err:  # the next one carries the same counts, cumulative
                log.warning("progress not published", dataset=self._key, run=task.run, error=repr(err))

    async def _caught_up(self, task: NodeTask, abort: asyncio.Event) -> None:
        """Wait (at most ``MANIFEST_WAIT_SECONDS``, or until ``abort``) until this mount serves the manifest the
        dataset's record names, which the loader planned ``task`` against."""
        if self.serving is None:
            return
        deadline = time.monotonic() + MANIFEST_WAIT_SECONDS
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(self.dataset.namespace, self.dataset.name)
        while not abort.is_set():
            self._reloaded.clear()
            try:
                record, _ = await kv_load(kv, key, DatasetRecord)
            except (msgspec.ValidationError, msgspec.DecodeError):
                return
            if not manifest_behind(record, self.serving()):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("manifest still behind the dataset's, checking the part's blocks against it",
                            dataset=self._key, run=task.run, part=task.part)
                return
            log.info("waiting for the dataset's new manifest before the part", dataset=self._key, run=task.run,
                     part=task.part)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reloaded.wait(), min(left, MANIFEST_CHECK_SECONDS))

    async def _load(self, task: NodeTask, ledger: PartLedger, abort: asyncio.Event) -> None:
        await self._caught_up(task, abort)
        blocks = load_blocks(task)  # shared by the workers: each block is taken once

        async def worker() -> None:
            for file_index, index, size in blocks:
                if abort.is_set():
                    return
                await self._load_block(task, file_index, index, size, ledger, abort)

        total = sum(ledger.remaining)
        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, total))))

    async def _load_block(self, task: NodeTask, file_index: int, index: int, size: int, ledger: PartLedger,
                          abort: asyncio.Event) -> None:
        file = task.blocks[file_index]
        entry = self.entries().get((file.mount, file.key))
        problem = block_problem(entry, file.etag, index, self.reader.block_size)
        if problem is not None or entry is None:
            ledger.fail(file_index, f"{quoted_key(file.key)}: {problem}")
            return
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                fetched = await self.reader.warm(entry, index)
                break
            except EndpointUnreachable as err:
                if attempt == STORE_ATTEMPTS or abort.is_set():
                    ledger.fail(file_index, f"{quoted_key(file.key)}: {err}")
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(abort.wait(), STORE_RETRY_SECONDS)
            except UfsError as err:
                ledger.fail(file_index, f"{quoted_key(file.key)}: {err}")
                return
        if not self.cache.contains(self.reader.block_id(entry, index)):
            ledger.fail(file_index, f"{quoted_key(file.key)}: {NOT_KEPT}")
            return
        ledger.done(file_index, size, skipped=not fetched)
        if fetched and self.warmed is not None:
            self.warmed(size)

    @staticmethod
    def _selection(task: NodeTask) -> Callable[[BlockId], bool]:
        """The blocks a clean's ``files`` or ``everything`` names (any version)."""
        if task.everything:
            return lambda _: True
        files = {(mount, key) for mount, key in task.files}
        return lambda block: (block.mount, block.key) in files

    async def _clean(self, task: NodeTask, ledger: PartLedger, abort: asyncio.Event) -> None:
        await self.reader.settle()  # a cancelled load's blocks in flight land first, and are freed with the rest
        if task.everything or task.files:
            select = self._selection(task)
            # Right after a restart the background scan may not have found every block yet: those it finds later
            # are deleted as found (before ``cached_blocks``, so a shard indexed in between is in one or the other).
            sweep = self.cache.sweep(select)
            victims = self.cache.cached_blocks(select)
            ledger.found(self.cache.cached_bytes(victims))
            for start in range(0, len(victims), CLEAN_SLICE):
                if abort.is_set():
                    return
                for _, size in self.cache.evict(victims[start:start + CLEAN_SLICE]):
                    ledger.done(None, size)
                await asyncio.sleep(0)  # FUSE reads between slices
            if sweep is not None:
                if not await self.cache.sweep_rest(sweep, abort.is_set):
                    # The scan was stopped (this process is stopping): the files it did not reach are found by the
                    # next start, so the part is not done; it goes back unacknowledged when the stop aborts it.
                    await abort.wait()
                    return
                for _, size in sweep.freed:
                    ledger.found(size)
                    ledger.done(None, size)
        named = 0
        for file_index, file in enumerate(task.blocks):
            for index, size in file.blocks:
                if named % CLEAN_SLICE == 0:
                    if abort.is_set():
                        return
                    await asyncio.sleep(0)
                named += 1
                evicted = self.cache.evict([BlockId(file.mount, file.key, file.etag, index)])
                if evicted:
                    ledger.done(file_index, evicted[0][1])
                else:
                    ledger.done(file_index, size, skipped=True)


async def forget_durable(bus: Bus, node: str, dataset: ObjectRef, incarnation: str) -> None:
    """Delete the task durable of a deleted dataset's life (``incarnation``) on ``node``: by its mount process as it
    frees the cache, or by the agent when it frees what a dead mount process left. The server would keep it for
    ``INACTIVE_SECONDS``, the day one not deleted here (NATS away) still lasts."""
    durable = subjects.task_durable(node, dataset.namespace, dataset.name, incarnation)
    shown = subjects.object_name(dataset.namespace, dataset.name)
    try:
        await bus.js.delete_consumer(subjects.task_stream(node), durable)
    except NotFoundError:
        return  # never made (no task stream, or no mount started), or gone already
    except Exception as err:
        log.warning("task durable of a deleted dataset not deleted; the server drops it after a day unused",
                    dataset=shown, durable=durable, error=repr(err))
        return
    log.info("task durable of a deleted dataset deleted", dataset=shown, durable=durable)


def progress_id(task: NodeTask, deliveries: int, k: str) -> str:
    """``<run>.<part>.<k>``; k names the delivery too, so a part run again after a restart is not deduplicated
    against what the previous process published."""
    return f"{task.run}.{task.part}.{deliveries}-{k}"
