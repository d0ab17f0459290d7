"""Loader handlers: operation commands, agents' task progress, and the tick that starts and finishes runs.

Which I/O it owns: KV ``shoal_operations`` (OperationRecord: spec and status; the loader is its only writer) and
``shoal_operation_runs`` (``domain.RunState``: the current run's stage and parts' progress), the run's plan and the
OnEvent manifests in the Object Store (``subjects.loader_plan``; ``loader_manifest``, the last Complete run's, and
``loader_planned_manifest``, the current run's: see ``_plan``), parts published on
``subjects.node_task`` (JetStream, ``Nats-Msg-Id`` = the part's id, so a republished part is deduplicated),
``TaskCancel`` on core NATS, ``DatasetResync`` for loadMetadata, and the operation facts.

Every change of an operation goes through one lock (commands, progress, the tick): the loader is one process and
this keeps each read-decide-write of a record and its run state whole. State is written before anything is
published, so a loader killed at any point resumes from KV: a run in ``planning`` is planned again, one in
``executing`` republishes its parts that are not done (same ids) and keeps folding progress from its durable
consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NotFoundError, ObjectNotFoundError, ServiceUnavailableError
from opentelemetry import trace

from libs import metrics, subjects
from libs.bus import (
    Bus,
    Delivery,
    KvMirror,
    PermissionDenied,
    invalid_command_id,
    kv_delete,
    kv_load,
    kv_load_deleted,
    kv_save,
    object_names,
)
from libs.deletion import deleted_at
from libs.events.common import ObjectMeta, answered_result, apply_result, parse_quantity
from libs.events.dataset import DatasetRecord, DatasetResync, ManifestEntry
from libs.events.operation import (
    DataCleanApply,
    DataCleanDelete,
    DataCleanSpec,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataLoadSpec,
    NodeTask,
    OperationAccepted,
    OperationCommand,
    OperationDeleted,
    OperationKind,
    OperationPhase,
    OperationRecord,
    OperationRejected,
    OperationStatus,
    OperationStatusChanged,
    TaskCancel,
    TaskPartsCancel,
    TaskProgress,
)
from libs.events.runtime import RuntimeRecord
from libs.gauges import GaugeFamily
from libs.manifest import ManifestStore, ManifestWriter
from libs.telemetry import context_of, current_traceparent, get_logger, tracer
from services.loader import domain

log = get_logger(__name__)

# How often runs are started, waited for and finished without an event (Cron firings, runAfter, TTL, OnEvent).
TICK_SECONDS = 0.25
# The brief: progress facts at most once a second per operation (phase changes are written at once).
STATUS_INTERVAL_SECONDS = 1.0
# loadMetadata: how long a run waits for the dataset service to list the dataset again before it fails. A listing
# of a million objects takes about a minute on a local store.
METADATA_TIMEOUT_SECONDS = 300.0
# A load whose parts wait on a node the runtime no longer lists as ready fails after this long (its parts would
# wait for it for ever, and a Cron or OnEvent load would never run again). An agent or mount process restarting is
# back within seconds; a node drained or lost is not.
NODE_GONE_SECONDS = 120.0
# A due run waits for its dataset to exist, be Bound and be listed (``domain.dataset_wait``: a DataLoad applied with
# its Dataset and runtime), as Fluid requeues it, but not for ever: after this long it fails saying what to change
# (a misspelt spec.dataset, a runtime never applied), as any bad spec does. Long enough for a runtime's agents to
# start; a loader restart starts the wait again.
DATASET_WAIT_SECONDS = 600.0
# A due run waits for the operation its spec.runAfter names to exist (applied in the same file after it, as Fluid
# requeues), but not for ever: one deleted (the first of a chain), or misspelt, left it and every operation after it
# Pending for good. As long as the dataset's wait, for the same reasons.
RUN_AFTER_WAIT_SECONDS = 600.0
# A run whose parts on a node got no progress from that node (for any run of the dataset: its parts are executed one
# at a time, another operation's may come first) for this long fails naming the node. A working part reports every
# second or so; a part its mount process gave up on whose final report was lost (the server delivers it no more)
# would otherwise leave the run Executing for ever on a node that stays ready.
NODE_SILENT_SECONDS = 120.0
DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
# How often the gauges are recounted from the in-memory views: as often as the tick passes over the same views
# (setting only what changed), so they follow a change within a fraction of a scrape interval.
GAUGE_SECONDS = TICK_SECONDS
# How often the nodes with a task stream are looked at for ones gone with no part waiting (``prune_task_streams``):
# a stream lives on this much past the node-gone timeout at most, and a look costs a pass over the runtimes' nodes.
TASK_STREAMS_SECONDS = 5.0
# How often ``sweep`` looks whether it can run (the watches caught up) until it has run once, and tries again after
# a failure: soon after the start, without logging a failing sweep four times a second.
SWEEP_SECONDS = 1.0
# An operation the tick keeps failing to advance is logged (with its traceback) at most this often, not 4 times a
# second.
TICK_FAILURE_LOG_SECONDS = 60.0
OPERATION_PHASES: tuple[OperationPhase, ...] = typing.get_args(OperationPhase)

FACTS: dict[str, tuple[str, str, str, str]] = {
    # kind → accepted, rejected, status, deleted
    "DataLoad": (subjects.DATALOAD_ACCEPTED, subjects.DATALOAD_REJECTED, subjects.DATALOAD_STATUS,
                 subjects.DATALOAD_DELETED),
    "DataClean": (subjects.DATACLEAN_ACCEPTED, subjects.DATACLEAN_REJECTED, subjects.DATACLEAN_STATUS,
                  subjects.DATACLEAN_DELETED),
}


def kind_of_subject(subject: str) -> OperationKind:
    return "DataClean" if subject.startswith(subjects.DATACLEAN_APPLY.rsplit(".", 1)[0]) else "DataLoad"


@dataclass
class LoaderHandlers:
    bus: Bus
    operations: KvMirror[OperationRecord]
    datasets: KvMirror[DatasetRecord]
    # The run states, so a tick reads KV only for operations with something to do.
    runs: KvMirror[domain.RunState]
    # The runtimes, so a tick decides in memory whether an executing run's runtime or nodes went (``_run_due``).
    runtimes: KvMirror[RuntimeRecord]
    clock: Callable[[], float] = time.time
    metadata_timeout: float = METADATA_TIMEOUT_SECONDS
    node_gone_timeout: float = NODE_GONE_SECONDS
    node_silent_timeout: float = NODE_SILENT_SECONDS
    dataset_wait_timeout: float = DATASET_WAIT_SECONDS
    run_after_wait_timeout: float = RUN_AFTER_WAIT_SECONDS
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The in-memory views of runs below hold at most an entry per operation (or operation and node), never one per
    # run: ``_forget_run`` drops an operation's when its run finishes and when the operation is removed.
    # The current run's plan (also in the Object Store), for counting files done.
    plans: dict[str, domain.Plan] = field(default_factory=dict)
    # The run whose parts this process published or republished (a restarted loader republishes the others once).
    published: dict[str, str] = field(default_factory=dict)
    # The nodes whose task stream (``subjects.task_stream``) this process made or found: one entry per node, until
    # the node is gone with no part waiting and its stream is deleted (``prune_task_streams``).
    task_streams: set[str] = field(default_factory=set)
    # The nodes whose task stream was on the server when this process first looked (made by an earlier loader) and
    # that it has not made since: deleted like the others once their node is gone. None until that look succeeded.
    found_streams: set[str] | None = None
    # Node → when (monotonic) ``prune_task_streams`` first saw it gone, for the nodes with a stream only.
    streams_gone_since: dict[str, float] = field(default_factory=dict)
    # The run whose loadMetadata DatasetResync this process published (a restarted loader, or one whose publish
    # failed, publishes it again: nothing else asks the dataset service for that listing).
    resynced: dict[str, str] = field(default_factory=dict)
    # Operations with progress not yet in their status, and when their status was last written (monotonic).
    dirty: set[str] = field(default_factory=set)
    written_at: dict[str, float] = field(default_factory=dict)
    # (operation, node) → when this process first saw the node gone with parts of the run not done: monotonic (for
    # the timeout) and the clock's time (what the status says).
    gone_since: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    # Operation → when this process first saw the blocks of its run's moved parts wait for a ring
    # (``domain.ring_awaited``), as ``gone_since``.
    ring_since: dict[str, tuple[float, float]] = field(default_factory=dict)
    # (operation, node) → when (monotonic) this process first waited on the node's parts of the run; and (dataset
    # ``ns/name``, node) → when progress of any run last came from that node's mount of the dataset, kept only while
    # an executing run waits on that mount (``_prune_heard``).
    silent_since: dict[tuple[str, str], float] = field(default_factory=dict)
    heard: dict[tuple[str, str], float] = field(default_factory=dict)
    # Operation → (generation, when (monotonic) this process first saw its due run wait for its dataset); a new
    # generation (the spec fixed) waits afresh.
    dataset_waits: dict[str, tuple[int, float]] = field(default_factory=dict)
    # The same for a due run waiting for its runAfter operation to exist; forgotten once it does.
    run_after_waits: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Whether the run states and objects of operations gone were looked for since this process started (``sweep``).
    swept: bool = False
    # Operations the tick failed to advance, and when (the tick's clock) that was last logged.
    tick_failures: dict[str, float] = field(default_factory=dict)
    # The gauges' series as last set (a removed operation's are removed).
    phase_gauge: GaugeFamily = field(default_factory=lambda: GaugeFamily(metrics.OPERATIONS))
    done_gauge: GaugeFamily = field(default_factory=lambda: GaugeFamily(metrics.OPERATION_BYTES_DONE))
    planned_gauge: GaugeFamily = field(default_factory=lambda: GaugeFamily(metrics.OPERATION_BYTES_PLANNED))
    # Looked up once: the tick may advance many operations (it delegates to whatever provider is installed later).
    _tracer: trace.Tracer = field(default_factory=lambda: tracer(__name__), init=False)

    # --- commands ---

    async def on_command(self, command: OperationCommand, delivery: Delivery) -> None:
        async with self.lock:
            if isinstance(command, DataLoadApply):
                load = command.data_load
                await self._apply(command.id, "DataLoad", load.metadata, domain.validate_load(load), delivery,
                                  load=load.spec)
            elif isinstance(command, DataCleanApply):
                clean = command.data_clean
                await self._apply(command.id, "DataClean", clean.metadata, domain.validate_clean(clean), delivery,
                                  clean=clean.spec)
            elif isinstance(command, DataLoadRun):
                await self._run(command, delivery)
            else:
                kind: OperationKind = "DataLoad" if isinstance(command, DataLoadDelete) else "DataClean"
                await self._delete(command, kind, delivery)

    async def on_invalid_command(self, delivery: Delivery, reason: str, payload: bytes) -> None:
        causation = invalid_command_id(delivery, payload)
        kind = kind_of_subject(delivery.subject)
        await self.bus.publish(FACTS[kind][1], OperationRejected(id=f"{causation}.rejected", causation_id=causation,
                                                                 reason=reason, kind=kind, subject=delivery.subject))

    async def _reject(self, command_id: str, kind: OperationKind, name: str, namespace: str, reason: str,
                      delivery: Delivery, not_found: bool = False) -> None:
        log.info("rejected", kind=kind, operation=subjects.object_name(namespace, name), reason=reason)
        await self.bus.publish(FACTS[kind][1], OperationRejected(
            id=f"{command_id}.rejected", causation_id=command_id, reason=reason, kind=kind, name=name,
            namespace=namespace, subject=delivery.subject, not_found=not_found))

    async def _apply(self, command_id: str, kind: OperationKind, meta: ObjectMeta, errors: list[str],
                     delivery: Delivery, load: DataLoadSpec | None = None, clean: DataCleanSpec | None = None) -> None:
        if errors:
            await self._reject(command_id, kind, meta.name, meta.namespace, "; ".join(errors), delivery)
            return
        key = subjects.operation_key(kind, meta.namespace, meta.name)
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, revision, note = await kv_load_deleted(kv, key, OperationRecord)
        sequence = delivery.stream_sequence
        stale = domain.stale_command(record, sequence, deleted_at(note), "apply")
        if stale:  # delivered again behind a delete that came after it: applying it would bring the operation back
            await self._reject(command_id, kind, meta.name, meta.namespace, f"{kind} {meta.namespace}/{meta.name}: "
                               f"{stale}", delivery)
            return
        updated, changed = domain.apply_operation(record, kind, meta, load, clean, self.clock(), sequence)
        if record is None:
            # Run numbers continue those of a deleted operation of the same name: run and part ids are message ids.
            # The delete keeps the last one in its marker's note; a run state left by a loader stopped in a delete
            # (or by one before the note kept it) may say it too.
            previous, _ = await self._state(key)
            runs = max(domain.runs_of_note(note), domain.run_number(previous.run))
            if runs:
                updated = msgspec.structs.replace(updated, status=msgspec.structs.replace(updated.status, runs=runs))
        # Labels and annotations too: the loader keeps the generation when only they change, yet they changed.
        result = answered_result(apply_result(None if record is None else (record.metadata, record.load, record.clean),
                                              (updated.metadata, updated.load, updated.clean)),
                                 sequence, 0 if record is None else record.command_sequence,
                                 "" if record is None else record.command_result)
        if changed:  # a redelivery of this command answers the same
            updated = msgspec.structs.replace(updated, command_result=result, traceparent=current_traceparent())
            revision = await kv_save(kv, key, updated, revision)
            self.operations.saved(key, updated, revision)
            log.info("applied", operation=subjects.key_name(key), generation=updated.generation)
        await self.bus.publish(FACTS[kind][0], OperationAccepted(
            id=f"{command_id}.accepted", causation_id=command_id, kind=kind, name=meta.name,
            namespace=meta.namespace, generation=updated.generation, result=result))
        if record is None:
            await self._publish_status(updated, revision)
        await self._advance_now(key)

    async def _run(self, command: DataLoadRun, delivery: Delivery) -> None:
        errors = domain.validate_ref(command.name, command.namespace)
        if errors:
            await self._reject(command.id, "DataLoad", command.name, command.namespace, "; ".join(errors), delivery)
            return
        key = subjects.operation_key("DataLoad", command.namespace, command.name)
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, record_revision = await kv_load(kv, key, OperationRecord)
        state, state_revision = await self._state(key)
        counted = bool(delivery.stream_sequence) and delivery.stream_sequence <= state.run_command_sequence
        if record is not None and counted:  # delivered again after it was counted: only its fact may be missing
            await self._accept_run(command, record)
            return
        name = f"DataLoad {command.namespace}/{command.name}"
        reason = ""
        if record is None or record.load is None:
            reason = f"{name} does not exist; apply it first"
        elif record.load.policy == "Once":
            reason = f"{name} has policy Once and runs once; use policy Cron or OnEvent to run it again"
        elif record.status.phase == "Executing":
            reason = f"{name} is Executing; run it again once this run is Complete or Failed"
        if reason or record is None:
            await self._reject(command.id, "DataLoad", command.name, command.namespace, reason, delivery,
                               not_found=record is None or record.load is None)
            return
        # A request while a run is pending joins it; its sequence is still counted, so delivered again after that
        # run started it is not taken for a new request.
        merged = domain.pending_run(record, state)
        state = msgspec.structs.replace(state, requested=state.requested + (0 if merged else 1),
                                        run_command_sequence=max(state.run_command_sequence,
                                                                 delivery.stream_sequence))
        state_revision = await kv_save(await self.bus.kv(subjects.KV_OPERATION_RUNS), key, state, state_revision)
        self.runs.saved(key, state, state_revision)
        traceparent = current_traceparent()
        if traceparent and traceparent != record.traceparent:
            # The run this asks for may wait (runAfter, its dataset) and be started by the tick, which continues the
            # record's trace: this command's, not the last apply's, as an apply taken in does.
            record = msgspec.structs.replace(record, traceparent=traceparent)
            record_revision = await kv_save(kv, key, record, record_revision)
            self.operations.saved(key, record, record_revision)
        if merged:
            log.info("run request joins the pending run", operation=subjects.key_name(key), reason=merged)
        await self._accept_run(command, record, merged)
        await self._advance_now(key)

    async def _accept_run(self, command: DataLoadRun, record: OperationRecord, merged: str = "") -> None:
        # The same id when sent again: the facts stream keeps one (Nats-Msg-Id).
        await self.bus.publish(FACTS["DataLoad"][0], OperationAccepted(
            id=f"{command.id}.accepted", causation_id=command.id, kind="DataLoad", name=command.name,
            namespace=command.namespace, generation=record.generation, merged=merged))

    async def _delete(self, command: DataLoadDelete | DataCleanDelete, kind: OperationKind,
                      delivery: Delivery) -> None:
        errors = domain.validate_ref(command.name, command.namespace)
        if errors:
            await self._reject(command.id, kind, command.name, command.namespace, "; ".join(errors), delivery)
            return
        key = subjects.operation_key(kind, command.namespace, command.name)
        record, revision = await kv_load(await self.bus.kv(subjects.KV_OPERATIONS), key, OperationRecord)
        if record is None:
            await self._reject(command.id, kind, command.name, command.namespace,
                               f"{kind} {command.namespace}/{command.name} does not exist", delivery, not_found=True)
            return
        stale = domain.stale_command(record, delivery.stream_sequence, 0, "delete")
        if stale:  # delivered again behind an apply that came after it: the operation stays
            await self._reject(command.id, kind, command.name, command.namespace,
                               f"{kind} {command.namespace}/{command.name}: {stale}", delivery)
            return
        await self._remove(key, record, revision, command.id, delivery.stream_sequence)

    async def _remove(self, key: str, record: OperationRecord, revision: int | None, causation: str,
                      sequence: int = 0) -> None:
        """Cancel the running run (blocks already cached stay), forget the operation, publish the fact. A delete
        command's ``sequence`` stays in the delete marker: an older apply delivered again later is refused."""
        state, state_revision = await self._state(key)
        if state.stage != "finished" and state.run:
            await self.bus.publish_core(subjects.TASK_CANCEL, TaskCancel(id=f"{state.run}.cancel", run=state.run))
            log.info("cancelled", run=state.run)
        if state.stage != "finished":
            # Finished before the record goes: a run state left executing a deleted run (this write failed, or the
            # loader was killed before it) would be resumed by the same name applied again, and the agents skip
            # that run's parts as cancelled, so it would stay Executing for ever. A record left behind (the delete
            # below failed) is closed Failed by the tick until the command, delivered again, removes it.
            await self._save_state(key, domain.deleted_state(state, self.clock()))
        # The last run's number goes into the delete marker (an operation re-created under this name numbers its
        # runs after it), and the run state, the plan and the manifests go: kept, they grew with every operation
        # ever deleted. A loader stopped before they went removes them when it starts again (``sweep``).
        runs = max(record.status.runs, domain.run_number(state.run))
        deleted = await kv_delete(await self.bus.kv(subjects.KV_OPERATIONS), key, revision,
                                  note=domain.deletion_note(sequence, runs))
        if state_revision is not None:
            self.runs.deleted(key, await kv_delete(await self.bus.kv(subjects.KV_OPERATION_RUNS), key, None))
        store = await ManifestStore.of(self.bus)
        for name in (subjects.loader_plan(key), subjects.loader_manifest(key), subjects.loader_planned_manifest(key),
                     subjects.loader_cleaned(key)):
            await store.delete(name)
        # An older entry of the operation the watch delivers late does not bring it back.
        self.operations.deleted(key, deleted)
        self._forget_run(key)
        meta = record.metadata
        await self.bus.publish(FACTS[record.kind][3], OperationDeleted(
            id=f"{key}.deleted.{revision}", kind=record.kind, name=meta.name,
            namespace=meta.namespace, causation_id=causation))
        log.info("deleted", operation=subjects.key_name(key), by=causation or "ttlSecondsAfterFinished")

    # --- progress from the mount processes ---

    async def on_progress(self, progress: TaskProgress, delivery: Delivery) -> None:
        key = progress.run.rsplit(".", 1)[0]
        async with self.lock:
            record = self.operations.values.get(key)
            if record is not None:  # the node's mount of that dataset works, whichever run this is
                ref = domain.dataset_ref(record)
                self.heard[(f"{ref.namespace}/{ref.name}", progress.node)] = time.monotonic()
            state, revision = await self._state(key)
            if state.run != progress.run or state.stage != "executing":
                self._prune_heard()  # a late report must not bring back a mount no run waits on
                return  # a run that was superseded, deleted or already finished
            if not 0 <= progress.part < len(state.parts) or state.parts[progress.part].node != progress.node:
                log.warning("progress for an unknown part ignored", run=progress.run, part=progress.part,
                            node=progress.node)
                return
            parts = domain.fold_into(state.parts, progress.part, progress)
            if parts is None:
                return
            state = msgspec.structs.replace(state, parts=parts, moved_at=self.clock())
            revision = await kv_save(await self.bus.kv(subjects.KV_OPERATION_RUNS), key, state, revision)
            self.runs.saved(key, state, revision)
            self.dirty.add(key)
            if domain.outcome(state) is not None:
                await self._advance(key)
            else:
                await self._write_progress(key, force=False)

    # --- the tick ---

    async def tick(self) -> None:
        if not all(mirror.ready.is_set() for mirror in (self.operations, self.datasets, self.runs, self.runtimes)):
            return
        async with self.lock:
            now = self.clock()
            for key, record in sorted(self.operations.values.items()):
                # One operation's failure (its due check included) is logged and retried next tick; it must not
                # stop the operations sorted after it from advancing.
                try:
                    if self._may_advance(key, record, now):
                        # In the trace of the apply (kept in the record: the tick has no message to take it from),
                        # so the parts it publishes, and the agents' work on them, stay in the caller's trace.
                        with self._tracer.start_as_current_span("advance operation",
                                                                context=context_of(record.traceparent),
                                                                attributes={"shoal.operation": key}):
                            await self._advance(key)
                except Exception:
                    if now - self.tick_failures.get(key, -math.inf) >= TICK_FAILURE_LOG_SECONDS:
                        self.tick_failures[key] = now
                        log.exception("advancing an operation failed; tried again at every tick",
                                      operation=subjects.key_name(key),
                                      logged_again_in_seconds=TICK_FAILURE_LOG_SECONDS)
                else:
                    self.tick_failures.pop(key, None)
            for gone in self.tick_failures.keys() - self.operations.values.keys():
                del self.tick_failures[gone]

    async def export_gauges(self) -> None:
        """Operations by kind and phase (every pair, 0 included) and each operation's current run bytes (done,
        including skipped ones, as in its progress; and planned), from the in-memory views."""
        if not (self.operations.ready.is_set() and self.runs.ready.is_set()):
            return
        records = list(self.operations.values.items())
        phases = Counter((record.kind, record.status.phase) for _, record in records)
        self.phase_gauge.update({(kind, phase): phases[(kind, phase)]
                                 for kind in domain.OPERATION_KINDS for phase in OPERATION_PHASES})
        done: dict[tuple[str, ...], float] = {}
        planned: dict[tuple[str, ...], float] = {}
        for key, record in records:  # a deleted operation (a command, its TTL) is not here: its series go
            state = self.runs.values.get(key)
            labels = (record.kind, f"{record.metadata.namespace}/{record.metadata.name}")
            if state is not None and state.parts:
                done[labels] = sum(part.bytes_done + part.bytes_skipped for part in state.parts)
                planned[labels] = sum(part.bytes_total for part in state.parts)
            elif (state is None or state.stage == "finished") and record.status.progress.nodes:
                # A finished run's parts leave its run state (``_settle``); its record keeps the same totals.
                done[labels] = record.status.progress.bytes_done
                planned[labels] = record.status.progress.bytes_total
        self.done_gauge.update(done)
        self.planned_gauge.update(planned)

    async def _advance_now(self, key: str) -> None:
        """After a command: start what is due at once. The command is done either way; a failure here is the
        tick's to retry, not a reason to deliver the command again."""
        try:
            await self._advance(key)
        except Exception:
            log.exception("advancing an operation failed; the tick retries", operation=subjects.key_name(key))

    def _may_advance(self, key: str, record: OperationRecord, now: float) -> bool:
        """From the mirrors, in memory: whether ``_advance`` could do anything for this operation now."""
        state = self.runs.values.get(key, domain.RunState())
        if domain.unclosed(record, state) or self._expired(record, now):
            return True
        if state.stage == "finished" and state.parts:
            return True  # its end is in the record, its parts still in the run state (``_settle`` failed)
        ref = domain.dataset_ref(record)
        dataset = self.datasets.values.get(subjects.resource_key(ref.namespace, ref.name))
        if state.stage != "finished":
            return self._run_due(key, record, state, dataset, now)
        if domain.due(record, state, dataset, now) is None:
            return False
        # A due run that shows it waits for its dataset has nothing to do until the dataset or runtime changes, or
        # it has waited too long.
        why = domain.dataset_wait(record, self._mirrored_cluster(record))
        return why is None or record.status.waiting_for != why or self._waited_too_long(key, record)

    def _waited_too_long(self, key: str, record: OperationRecord,
                         waits: dict[str, tuple[int, float]] | None = None, timeout: float | None = None) -> bool:
        waits = self.dataset_waits if waits is None else waits
        generation, since = waits.setdefault(key, (record.generation, time.monotonic()))
        if generation != record.generation:
            waits[key] = (record.generation, time.monotonic())
            return False
        return domain.waited_too_long(since, time.monotonic(),
                                      self.dataset_wait_timeout if timeout is None else timeout)

    def _mirrored_cluster(self, record: OperationRecord) -> domain.Cluster:
        ref = domain.dataset_ref(record)
        key = subjects.resource_key(ref.namespace, ref.name)
        return domain.Cluster(self.datasets.values.get(key), self.runtimes.values.get(key))

    def _run_due(self, key: str, record: OperationRecord, state: domain.RunState, dataset: DatasetRecord | None,
                 now: float) -> bool:
        """From the mirrors: whether a run that started has something for ``_advance`` to do now. A run waiting
        on its parts costs no NATS round trip per tick this way (hundreds of them made each tick take seconds);
        ``_advance`` reads KV before it acts, so a mirror a moment behind (a dataset or runtime it does not show
        yet) only makes it look, never fail a run on its own."""
        number = state.run.rpartition(".")[2]
        if record.status.phase != "Executing" or not number.isdigit() or int(number) != record.status.runs:
            return True  # the record to bring to Executing (``_ensure_started``)
        if domain.dataset_lost(record, state, dataset) is not None:
            return True
        if state.stage == "metadata":
            return (now > state.deadline or self.resynced.get(key) != state.run
                    or (dataset is not None and dataset.status.synced_requests >= state.resync_requests))
        if state.stage != "executing":
            return True  # planning
        if self.published.get(key) != state.run or domain.outcome(state) is not None:
            return True
        ref = domain.dataset_ref(record)
        runtime = self.runtimes.values.get(subjects.resource_key(ref.namespace, ref.name))
        if runtime is None:
            return True
        if (domain.ring_left(record, state, runtime) is not None or domain.ring_grew(record, state, runtime)
                or domain.ring_shrank(record, state, runtime) or domain.stranded(record, state, runtime)
                or self._ring_missing(key, record, state, runtime) is not None
                or domain.block_size_changed(record, state, block_size(runtime)) is not None):
            return True
        if record.load is not None and self._node_gone(key, record, state, runtime) is not None:
            return True
        if self._absent_message(key, record, state, runtime) != record.status.message:
            return True
        return self._node_silent(key, record, state) is not None or self._progress_due(key)

    async def _advance(self, key: str) -> None:
        """Whatever is due for one operation now: resume, progress, finish, start, wait, expire."""
        now = self.clock()
        record, revision = await kv_load(await self.bus.kv(subjects.KV_OPERATIONS), key, OperationRecord)
        if record is None:
            return
        state, _ = await self._state(key)
        if domain.unclosed(record, state):
            await self._close(key, record, revision, state)
            return
        if state.stage == "finished" and state.parts:
            await self._settle(key, state)
            state, _ = await self._state(key)
        if state.stage != "finished":
            record = await self._ensure_started(key, record, revision, state, now)
            lost = await self._dataset_lost(record, state)
            if lost:
                await self.bus.publish_core(subjects.TASK_CANCEL, TaskCancel(id=f"{state.run}.cancel", run=state.run))
                await self._finish(key, "Failed", lost)
                return
        if state.stage == "planning":
            await self._plan(key, record, state, now)
        elif state.stage == "metadata":
            dataset = await self._dataset(record)
            if dataset is not None and dataset.status.synced_requests >= state.resync_requests:
                await self._plan(key, record, state, now)
            elif now > state.deadline:
                ref = domain.dataset_ref(record)
                await self._finish(key, "Failed", f"dataset {ref.namespace}/{ref.name} was not listed again within "
                                   f"{self.metadata_timeout:.0f} s (loadMetadata); check the dataset's status and "
                                   f"the dataset service, or set loadMetadata: false")
            elif self.resynced.get(key) != state.run:
                await self._request_metadata(key, record, state.run)
        elif state.stage == "executing":
            if self.published.get(key) != state.run:
                await self._publish_parts(key, state, resume=True)
                state, _ = await self._state(key)  # the parts of a plan grown before a restart may have joined it
            result = domain.outcome(state)
            message = record.status.message
            if result is None or result[0] == "Complete":
                runtime = await self._runtime(record)
                resized = None if runtime is None else domain.block_size_changed(record, state, block_size(runtime))
                if resized is not None:
                    # Before a Complete too: its parts may all have reported before a tick saw the new runtime.
                    await self.bus.publish_core(subjects.TASK_CANCEL,
                                                TaskCancel(id=f"{state.run}.cancel", run=state.run))
                    result = "Failed", resized
                elif (runtime is not None and domain.ring_left(record, state, runtime) is None
                        and ((grown := domain.ring_grew(record, state, runtime))
                             + (shrank := domain.ring_shrank(record, state, runtime)))):
                    # Before a Complete too: the last part may report before a tick saw the new worker, and the parts
                    # of the nodes scaled in may all be done before a tick saw them go.
                    replanned = await self._replan(key, record, state, runtime, grown, shrank)
                    state, _ = await self._state(key)
                    result = replanned or domain.outcome(state)
                elif (runtime is not None and domain.ring_left(record, state, runtime) is None
                        and (stranded := domain.stranded(record, state, runtime))):
                    # No ring to plan their blocks on yet: moved now all the same (a ring back plans them).
                    result = await self._move_stranded(key, state, stranded)
                    state, _ = await self._state(key)
                    result = result or domain.outcome(state)
                if (result is not None and result[0] == "Complete" and runtime is not None
                        and domain.ring_awaited(record, state, runtime)):
                    result = None  # the blocks of the parts moved have no owner yet
            if result is None:
                if runtime is None:  # its mounts are gone with it: no part would report again
                    result = "Failed", domain.runtime_lost(record)
                elif (left := domain.ring_left(record, state, runtime)) is not None:
                    # Its nodes are up and would go on fetching: they stop now, not at their next look at the run.
                    await self.bus.publish_core(subjects.TASK_CANCEL,
                                                TaskCancel(id=f"{state.run}.cancel", run=state.run))
                    result = "Failed", left
                else:
                    if record.load is not None:
                        result = (self._node_gone(key, record, state, runtime)
                                  or self._ring_missing(key, record, state, runtime))
                    message = self._absent_message(key, record, state, runtime)
            if result is None:
                result = self._node_silent(key, record, state)
            if result is not None:
                await self._finish(key, *result)
            else:  # a node absent or back is said at once, not after the progress throttle
                await self._write_progress(key, force=message != record.status.message, message=message)
        elif self._expired(record, now):
            await self._remove(key, record, revision, "")
        else:
            await self._maybe_start(key, record, revision, state, now)

    async def _dataset_lost(self, record: OperationRecord, state: domain.RunState) -> str | None:
        """``domain.dataset_lost``, from the mirror while it shows the run's dataset (every tick passes here), and
        confirmed in KV before a run fails on it (the mirror may not show yet a dataset created a moment ago)."""
        ref = domain.dataset_ref(record)
        mirrored = self.datasets.values.get(subjects.resource_key(ref.namespace, ref.name))
        if domain.dataset_lost(record, state, mirrored) is None:
            return None
        return domain.dataset_lost(record, state, await self._dataset(record))

    def _expired(self, record: OperationRecord, now: float) -> bool:
        """Past its ttlSecondsAfterFinished, and no Pending operation's runAfter waits for it (the tick passes the
        operations in key order: one removed before the one after it looked would leave that one waiting for ever)."""
        return domain.expired(record, now) and not domain.awaited(record, self.operations.values.values())

    def _node_gone(self, key: str, record: OperationRecord, state: domain.RunState,
                   runtime: RuntimeRecord) -> tuple[OperationPhase, str] | None:
        """Failed, naming the node, once a node with parts not done has not been ready for ``node_gone_timeout``."""
        now = time.monotonic()
        for node, (since, _) in sorted(self._absent(key, state, runtime).items()):
            if now - since >= self.node_gone_timeout:
                ref = domain.dataset_ref(record)
                return "Failed", (f"node {node} is no longer a ready node of runtime {ref.namespace}/{ref.name} "
                                  f"(for {self.node_gone_timeout:.0f} s) and its part of the load is not done; run "
                                  f"the load again: its blocks go to the nodes ready then")
        return None

    def _ring_missing(self, key: str, record: OperationRecord, state: domain.RunState,
                      runtime: RuntimeRecord) -> tuple[OperationPhase, str] | None:
        """Failed once the blocks of parts moved while the runtime had no ring (``domain.ring_awaited``) have waited
        ``node_gone_timeout`` for one, as a node gone is waited for."""
        nodes = domain.ring_awaited(record, state, runtime)
        if not nodes:
            self.ring_since.pop(key, None)
            return None
        since, _ = self.ring_since.setdefault(key, (time.monotonic(), self.clock()))
        if time.monotonic() - since < self.node_gone_timeout:
            return None
        return "Failed", domain.ring_missing(record, nodes, self.node_gone_timeout)

    def _absent(self, key: str, state: domain.RunState,
                runtime: RuntimeRecord) -> dict[str, tuple[float, float]]:
        """The nodes with parts not done that are not ready (``domain.nodes_gone``), each with when this process
        first saw it so (``gone_since``)."""
        gone = domain.nodes_gone(state, runtime)
        # Only this run's nodes can be timed for it (``_forget_run`` drops them at its end): not a scan of every
        # operation's entries, which made each tick's pass over hundreds of runs quadratic.
        for node in {part.node for part in state.parts} - set(gone):
            self.gone_since.pop((key, node), None)
        return {node: self.gone_since.setdefault((key, node), (time.monotonic(), self.clock())) for node in gone}

    def _absent_message(self, key: str, record: OperationRecord, state: domain.RunState,
                        runtime: RuntimeRecord) -> str:
        absent = self._absent(key, state, runtime)
        message = domain.absent_message(record, {node: at for node, (_, at) in absent.items()})
        awaited = domain.ring_awaited(record, state, runtime)
        if not awaited:
            return message
        _, at = self.ring_since.setdefault(key, (time.monotonic(), self.clock()))
        return "; ".join(filter(None, [message, domain.ring_awaited_message(record, awaited, at)]))

    def _node_silent(self, key: str, record: OperationRecord,
                     state: domain.RunState) -> tuple[OperationPhase, str] | None:
        """Failed, naming the node, once a node with parts not done has sent no progress for ``node_silent_timeout``
        (counted from this process's first look, so a restarted loader waits that long again)."""
        waiting = {part.node for part in state.parts if not part.done}
        now = time.monotonic()
        for node in {part.node for part in state.parts} - waiting:  # only this run's nodes, as in ``_node_gone``
            self.silent_since.pop((key, node), None)
        ref = domain.dataset_ref(record)
        for node in sorted(waiting):
            since = max(self.silent_since.setdefault((key, node), now),
                        self.heard.get((f"{ref.namespace}/{ref.name}", node), -math.inf))
            if now - since >= self.node_silent_timeout:
                return "Failed", (f"node {node} sent no progress for {self.node_silent_timeout:.0f} s and its part of "
                                  f"the run is not done: its mount process of dataset {ref.namespace}/{ref.name} "
                                  f"gave up on the part and its last report was lost, or it is stuck; run the "
                                  f"{record.kind} again")
        return None

    async def _ensure_started(self, key: str, record: OperationRecord, revision: int | None, state: domain.RunState,
                              now: float) -> OperationRecord:
        """The record shows the run of the run state as Executing (a loader killed between saving the run state and
        the record left it behind): mount processes skip parts of a run the record does not show."""
        number = int(state.run.rsplit(".", 1)[1])
        if record.status.phase == "Executing" and record.status.runs == number:
            return record
        log.info("run state ahead of the record, catching up", run=state.run)
        started = domain.status_started(record.status, number, record.generation, now)
        return await self._save_status(key, record, revision, started)

    async def _maybe_start(self, key: str, record: OperationRecord, revision: int | None, state: domain.RunState,
                           now: float) -> None:
        ref = domain.dataset_ref(record)
        mirrored = self.datasets.values.get(subjects.resource_key(ref.namespace, ref.name))
        trigger = domain.due(record, state, mirrored, now)
        if trigger is None:
            return
        spec = record.load or record.clean
        assert spec is not None
        other = None
        if spec.run_after is not None:
            kind, namespace, name = domain.run_after_key(spec.run_after, record.metadata.namespace)
            other = self.operations.values.get(subjects.operation_key(kind, namespace, name))
        decision, why = domain.run_after(spec.run_after, record, other)
        on_operation = decision == "wait"  # a wait decided below is for the dataset
        if spec.run_after is not None and other is None:
            if self._waited_too_long(key, record, self.run_after_waits, self.run_after_wait_timeout):
                decision, why = "fail", domain.run_after_missing(spec.run_after, record, self.run_after_wait_timeout)
        else:
            self.run_after_waits.pop(key, None)
        if decision != "go":  # waiting for ever in a cycle, or failing on its neighbour: fail naming the cycle
            cycle = domain.run_after_cycle(
                record, lambda ref: self.operations.values.get(subjects.operation_key(*ref)))
            if cycle:
                decision, why = "fail", cycle
        if decision == "go":
            # From the mirrors: one a moment behind only waits a tick longer; ``_start`` decides from KV.
            cluster = self._mirrored_cluster(record)
            why = domain.dataset_wait(record, cluster) or ""
            if why and self._waited_too_long(key, record):
                decision, why = "fail", domain.dataset_wait_failure(record, cluster, why, self.dataset_wait_timeout)
            else:
                decision = "wait" if why else "go"
        if decision == "wait":
            if record.status.waiting_for != why or record.status.waiting_for_operation != on_operation:
                await self._save_status(key, record, revision,
                                        domain.status_waiting(record.status, why, on_operation))
            return
        await self._start(key, record, revision, state, trigger, now, failure=why if decision == "fail" else "")

    async def _start(self, key: str, record: OperationRecord, revision: int | None, state: domain.RunState,
                     trigger: domain.Trigger, now: float, failure: str) -> None:
        self.dataset_waits.pop(key, None)
        self.run_after_waits.pop(key, None)
        number = record.status.runs + 1
        run = f"{key}.{number}"
        ref = domain.dataset_ref(record)
        dataset = await self._dataset(record)
        runtime = await self._runtime(record)
        problem = failure or domain.run_problem(record, domain.Cluster(dataset, runtime))
        # Only what decides the next runs (requested, sync_stamp) carries over; the last run's progress and end go.
        state = domain.RunState(
            run=run, started_at=now, moved_at=now,
            requested=state.requested - 1 if trigger == "requested" else state.requested,
            run_command_sequence=state.run_command_sequence,
            sync_stamp=domain.dataset_stamp(dataset) if dataset is not None else state.sync_stamp,
            dataset=subjects.object_name(ref.namespace, ref.name),
            dataset_incarnation=dataset.incarnation if dataset is not None else "",
            baseline_incarnation=state.baseline_incarnation)
        load_metadata = record.load is not None and record.load.load_metadata
        if problem:
            state = msgspec.structs.replace(state, stage="finished")
        elif load_metadata and dataset is not None:
            state = msgspec.structs.replace(state, stage="metadata", resync_requests=dataset.sync_requests + 1,
                                            deadline=now + self.metadata_timeout)
        else:
            state = msgspec.structs.replace(state, stage="planning")
        # An OnEvent run fired by a sync loads what changed since the last run; the others load the whole target.
        state = msgspec.structs.replace(state, changes_only=domain.changes_only(trigger, record, state, dataset))
        await self._save_state(key, state)
        log.info("run started", run=run, trigger=trigger, problem=problem or None)
        if problem:
            failed = domain.status_failed_to_start(record.status, number, record.generation, problem, now)
            await self._save_status(key, record, revision, failed)
            metrics.OPERATION_RUNS.labels(record.kind, "Failed").inc()  # a run that could not start ends here
            return
        started = domain.status_started(record.status, number, record.generation, now)
        record = await self._save_status(key, record, revision, started)
        if state.stage == "metadata":
            await self._request_metadata(key, record, run)
            return
        await self._plan(key, record, state, now)

    async def _request_metadata(self, key: str, record: OperationRecord, run: str) -> None:
        """loadMetadata: ask the dataset service to list the dataset again. The same id each time: sent again within
        JetStream's duplicate window (2 min) it is dropped, later it is one more listing."""
        ref = domain.dataset_ref(record)
        await self.bus.publish(subjects.DATASET_RESYNC,
                               DatasetResync(id=f"{run}.resync", name=ref.name, namespace=ref.namespace))
        self.resynced[key] = run

    async def _plan(self, key: str, record: OperationRecord, state: domain.RunState, now: float) -> None:
        """Plan the run against the dataset's manifest and the runtime's ring, save it, publish its parts.

        OnEvent: a run fired by a sync loads the entries new or changed since the baseline, the manifest the last
        *Complete* run planned against (``loader_manifest``). This run's manifest is saved aside
        (``loader_planned_manifest``) before the run is saved as executing, and becomes the baseline only when the
        run completes (``_finish``). So a loader killed (or NATS failing) while planning plans again against the same
        baseline and loses no change; and after a Failed run the next one loads that run's changes again along with
        the new ones (a user expects a failed file to be retried by the next sync, not skipped for ever; the blocks
        that run did cache are skipped by the agents).
        """
        ref = domain.dataset_ref(record)
        dataset = await self._dataset(record)
        runtime = await self._runtime(record)
        problem = domain.run_problem(record, domain.Cluster(dataset, runtime))
        if problem:
            await self._finish(key, "Failed", problem)
            return
        assert dataset is not None and runtime is not None
        store = await ManifestStore.of(self.bus)
        dataset, entries = await self._current_entries(store, record, dataset)
        if dataset is None or entries is None:
            await self._finish(key, "Failed", f"dataset {ref.namespace}/{ref.name} has no manifest yet; wait until "
                               f"it is synced (status.lastSyncTime) and run again")
            return
        spec = record.load or record.clean
        assert spec is not None
        targets = spec.target
        # Threads, like the plan below: a manifest of 100k entries takes a while to sort and cut into parts.
        chosen, missing = await asyncio.to_thread(domain.select, entries, targets)
        if missing:
            await self._finish(key, "Failed", domain.missing_message(missing, ref))
            return
        ring: list[str] = []
        on_event = record.load is not None and record.load.policy == "OnEvent"
        if record.load is not None:
            if on_event and state.changes_only:
                previous = await self._load_entries(store, subjects.loader_manifest(key))
                changed = {(e.mount, e.key, e.etag) for e in domain.changed_entries(previous, entries)}
                chosen = {i: r for i, r in chosen.items()
                          if (entries[i].mount, entries[i].key, entries[i].etag) in changed}
            ring = domain.ring_of(runtime)
            # A thread: planning 100k files takes seconds; the event loop (NATS pings, /readyz) keeps running meanwhile.
            plan = await asyncio.to_thread(domain.plan_load, state.run, ref, entries, chosen, ring,
                                           runtime.status.ready_nodes, block_size(runtime))
        else:
            picked = [entries[i] for i in sorted(chosen)] if targets else None
            plan = await asyncio.to_thread(domain.plan_clean, state.run, ref, picked, domain.clean_nodes(runtime))
        too_large = domain.state_problem(plan)
        if too_large:
            await self._finish(key, "Failed", too_large)
            return
        await store.objects.put(subjects.loader_plan(key), msgspec.json.encode(plan))
        if record.clean is not None:
            # Kept after the plan goes: a load that started before this clean and is replanned later leaves these
            # files to it (``domain.cleaned_files``), however the manifest changes meanwhile.
            # With the files of its earlier runs a load still executing had not started before (as bounded there).
            since = domain.executing_loads_since(ref, self.operations.values, self.runs.values)
            last = await self._clean_given(store, key, current=False) if since is not None else None
            await store.objects.put(subjects.loader_cleaned(key), msgspec.json.encode(
                domain.clean_given(plan, state.started_at, last, since)))
        if on_event:
            # Before the executing state: a run saved as executing always finds its own manifest here at the end.
            await self._save_entries(store, subjects.loader_planned_manifest(key), entries)
        self.plans[key] = plan
        state = msgspec.structs.replace(state, stage="executing", ring=ring, parts=domain.parts_state(plan),
                                        block_size=block_size(runtime) if record.load is not None else 0,
                                        files_total=domain.files_planned(plan, entries),
                                        sync_stamp=domain.dataset_stamp(dataset))
        await self._save_state(key, state)
        log.info("planned", run=state.run, parts=len(plan.parts), files=len(plan.files),
                 bytes=sum(p.bytes_total for p in plan.parts))
        if not await self._publish_parts(key, state, resume=False):
            return
        if not plan.parts:
            await self._finish(key, "Complete", "nothing to load: every targeted file is empty or unchanged"
                               if record.load is not None else "")
            return
        await self._write_progress(key, force=True)

    async def _publish_parts(self, key: str, state: domain.RunState, resume: bool) -> bool:
        """Publish the run's parts not done, each into its node's task stream (made first if need be); False when
        the run ended instead (Failed: its plan is gone, or a node's stream cannot be made)."""
        plan = await self._plan_of(key, state.run)
        if plan is None:
            await self._finish(key, "Failed", "the run's plan is gone (loader storage lost); run it again")
            return False
        if len(plan.parts) > len(state.parts):
            # A loader stopped between saving a plan grown for a new worker and its run state (``_replan``).
            state = msgspec.structs.replace(state, parts=[*state.parts, *domain.parts_state(plan)[len(state.parts):]])
            await self._save_state(key, state)
        republished = 0
        if resume:  # the nodes its parts were moved off may not have been told before a restart
            moved = [index for index, part in enumerate(state.parts) if part.moved]
            if moved:
                await self._record_moved(key, state)
            await self._cancel_moved(state, moved)
        for planned, part in zip(plan.parts, state.parts, strict=True):
            if part.done:
                continue
            problem = await self._publish_part(planned.task, state.dataset_incarnation)
            if problem:
                await self._finish(key, "Failed", problem)
                return False
            republished += 1
        self.published[key] = state.run
        if resume:
            log.info("run resumed", run=state.run, parts_republished=republished)
        return True

    async def _publish_part(self, task: NodeTask, incarnation: str) -> str:
        """Publish one part into its node's task stream (made first if need be), on the subject of the dataset's
        life the run started on (``incarnation``); why it cannot be, or ""."""
        problem = await self._task_stream(task.node)
        if problem:
            return problem
        try:
            await self.bus.publish(subjects.node_task(task.node, task.dataset.namespace, task.dataset.name,
                                                      incarnation), task)
        except NoRespondersError:
            # No stream took the part: the node's was deleted since this process made it. The next tick makes it
            # again and publishes the run's parts again (the ones already in are deduplicated by their ids).
            self.task_streams.discard(task.node)
            raise
        return ""

    async def _replan(self, key: str, record: OperationRecord, state: domain.RunState, runtime: RuntimeRecord,
                      grown: list[str], shrank: list[str]) -> tuple[OperationPhase, str] | None:
        """The ring changed under an executing load (``grown``: its new workers; ``shrank``: the workers it was
        planned on that are workers no more): the blocks whose current owners have no part of them get parts
        (``domain.replan_load``), saved (plan, then run state) before they are published, so the run ends with every
        block on its current owners. Readers ask those owners: without this the blocks a worker added mid-load owns
        were never loaded, nor those of a worker scaled in once its part was done, and the load ended Complete with
        them off the cache. The end of the run instead (Failed) when its plan is gone, it grew too large, or a new
        node's stream cannot be made. The files a DataClean started after the load evicts get no part
        (``domain.later_cleans``): added now, they would reach their nodes after the clean's parts and load them
        back, the load's result overriding the clean the user applied after it."""
        plan = await self._plan_of(key, state.run)
        if plan is None:
            return "Failed", "the run's plan is gone (loader storage lost); run it again"
        ring = domain.ring_of(runtime)
        # The parts not done of the nodes scaled in end here as moved, and their blocks are planned below for their
        # owners on the ring as it is now, as those of a node scaled in whose parts were done already.
        moved = domain.moved_parts(state, domain.scaled_in(record, state, runtime))
        if moved:
            state = msgspec.structs.replace(state, parts=domain.move_parts(plan, state.parts, moved))
        cleans = domain.later_cleans(record, state, self.operations.values, self.runs.values)
        cleaned: set[tuple[int, str]] = set()
        if cleans:
            store = await ManifestStore.of(self.bus)
            given: dict[str, domain.CleanGiven] = {}
            unknown = False  # a clean of target paths whose run's files are not kept: read against the manifest
            for clean in cleans:
                clean_key = subjects.operation_key(clean.kind, clean.metadata.namespace, clean.metadata.name)
                found_given = await self._clean_given(store, clean_key)
                if found_given is not None:
                    given[clean_key] = found_given
                elif clean.clean is not None and clean.clean.target:
                    unknown = True
            entries: list[ManifestEntry] = []
            if unknown:
                _, found = await self._current_entries(store, record, None)
                entries = found or []
            cleaned = await asyncio.to_thread(domain.cleaned_files, plan, cleans, given, entries, state.started_at)
        extended = await asyncio.to_thread(domain.replan_load, plan, ring, cleaned)
        added = extended.parts[len(plan.parts):]
        if added:
            too_large = domain.state_problem(extended)
            if too_large:
                return "Failed", too_large
            await (await ManifestStore.of(self.bus)).objects.put(subjects.loader_plan(key),
                                                                  msgspec.json.encode(extended))
            self.plans[key] = extended
        state = msgspec.structs.replace(state, ring=sorted(ring),
                                        parts=[*state.parts, *domain.parts_state(extended)[len(state.parts):]])
        await self._save_state(key, state)
        # After the state: a loader stopped before this tells those nodes again as it resumes (``_publish_parts``).
        if moved:
            await self._record_moved(key, state)
        await self._cancel_moved(state, moved)
        for planned in added:
            problem = await self._publish_part(planned.task, state.dataset_incarnation)
            if problem:
                return "Failed", problem
        log.info("ring changed under the load: blocks planned again for their new owners", run=state.run,
                 new_workers=grown, workers_gone=shrank, parts_moved=len(moved) or None, parts_added=len(added),
                 blocks_added=sum(p.blocks for p in added),
                 files_left_to_later_cleans=len(cleaned) or None,
                 later_cleans=[subjects.object_name(c.metadata.namespace, c.metadata.name) for c in cleans] or None)
        return None

    async def _move_stranded(self, key: str, state: domain.RunState,
                             nodes: list[str]) -> tuple[OperationPhase, str] | None:
        """End as moved the parts not done of the nodes scaled in while the runtime has no ring
        (``domain.stranded``), as ``_replan`` does with a ring: saved, kept in the record, cancelled on their nodes.
        Their blocks are planned when a ring is back (``ring_shrank``: the run's ring still names those nodes)."""
        plan = await self._plan_of(key, state.run)
        if plan is None:
            return "Failed", "the run's plan is gone (loader storage lost); run it again"
        moved = domain.moved_parts(state, nodes)
        state = msgspec.structs.replace(state, parts=domain.move_parts(plan, state.parts, moved))
        await self._save_state(key, state)
        await self._record_moved(key, state)
        await self._cancel_moved(state, moved)
        log.info("parts of nodes scaled in moved while no ring is left: their blocks wait for one", run=state.run,
                 nodes=nodes, parts_moved=len(moved))
        return None

    async def _clean_given(self, store: ManifestStore, key: str, current: bool = True) -> domain.CleanGiven | None:
        """What the current (or last) run of DataClean ``key`` was given to evict, as it planned it; None when that
        run's is not kept (planned by an older loader, or its write failed). ``current`` False: whatever run's is
        kept (a clean's next run keeps it with its own)."""
        state = self.runs.values.get(key)
        try:
            result = await store.objects.get(subjects.loader_cleaned(key))
        except (ObjectNotFoundError, NotFoundError):
            return None
        try:
            given = msgspec.json.decode(result.data or b"", type=domain.CleanGiven)
        except msgspec.DecodeError:
            return None
        return given if not current or (state is not None and given.run == state.run) else None

    async def _record_moved(self, key: str, state: domain.RunState) -> None:
        """Keep the run's moved parts in the operation's record (``domain.moved_by_node``), before their nodes are
        told: a mount process that misses the ``TaskPartsCancel`` (core NATS) stops its part at its next look at the
        record (``CURRENT_CHECK_SECONDS``) instead of fetching it to the end into a cache off the ring."""
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, revision = await kv_load(kv, key, OperationRecord)
        moved = domain.moved_by_node(state)
        if record is None or record.moved_parts == moved:
            return
        updated = msgspec.structs.replace(record, moved_parts=moved)
        revision = await kv_save(kv, key, updated, revision)
        self.operations.saved(key, updated, revision)

    async def _cancel_moved(self, state: domain.RunState, moved: list[int]) -> None:
        """Tell each node whose parts ``moved`` (indexes) to stop them, the rest of the run going on: their blocks
        are planned on the workers now. A node that misses it (core NATS) fetches its part into its own cache, one
        more copy; its report changes nothing (the part is done)."""
        by_node: dict[str, list[int]] = {}
        for index in moved:
            by_node.setdefault(state.parts[index].node, []).append(index)
        for node, parts in sorted(by_node.items()):
            await self.bus.publish_core(subjects.TASK_CANCEL, TaskPartsCancel(
                id=f"{state.run}.cancel.{subjects.node_token(node)}", run=state.run, node=node, parts=parts))
            log.info("parts moved off a node scaled in, cancelled there", run=state.run, node=node, parts=parts)

    async def _task_stream(self, node: str) -> str:
        """Make ``node``'s task stream unless this process already did; why it cannot be made, or "" when it is
        there. A refusal (permissions, storage, subjects another stream holds) fails the run saying so; a stream
        without a leader (a cluster electing one) raises, and the tick tries again."""
        if node in self.task_streams:
            return ""
        try:
            await self.bus.provision_node_tasks(node)
        except ServiceUnavailableError:
            raise
        except (PermissionDenied, APIError) as err:
            log.error("task stream not made", node=node, stream=subjects.task_stream(node), error=str(err))
            return (f"the task stream of node {node} ({subjects.task_stream(node)}) could not be made, so its parts "
                    f"cannot be sent: {err}")
        self.task_streams.add(node)
        if self.found_streams is not None:
            self.found_streams.discard(node)
        return ""

    async def prune_task_streams(self) -> None:
        """Delete the task streams of nodes gone for ``node_gone_timeout`` with no part of a run not finished waiting
        on them (``domain.idle_task_streams``), and forget those nodes: with nodes replaced and autoscaled over a
        long life, a stream and an entry per node ever seen stayed for ever. A node that comes back gets its stream
        again before its next part (``_task_stream``)."""
        if not (self.runs.ready.is_set() and self.runtimes.ready.is_set()):
            return  # the mirrors do not know every run and runtime yet: a node could look gone, or idle, wrongly
        if self.found_streams is None:
            found = set(await self.bus.node_task_streams())
            async with self.lock:
                self.found_streams = found - self.task_streams
        async with self.lock:  # no part is published between the decision and the delete
            assert self.found_streams is not None
            idle, self.streams_gone_since = domain.idle_task_streams(
                self.task_streams | self.found_streams, self.runtimes.values.values(), self.runs.values.values(),
                self.streams_gone_since, time.monotonic(), self.node_gone_timeout)
            for node in idle:
                try:
                    await self.bus.delete_node_tasks(node)
                except (PermissionDenied, APIError) as err:  # another user's stream, or refused: left as it is
                    log.warning("task stream of a gone node not deleted", node=node,
                                stream=subjects.task_stream(node), error=str(err))
                else:
                    log.info("task stream of a gone node deleted", node=node, stream=subjects.task_stream(node))
                self.task_streams.discard(node)
                self.found_streams.discard(node)
                del self.streams_gone_since[node]

    async def sweep(self) -> None:
        """Once, when the watches have caught up: remove the run states and the loader's objects (plans, OnEvent
        manifests) of operations that no longer exist, and the plans of runs not under way
        (``domain.orphan_objects``). A loader stopped in a delete or at a run's end, or one from before they were
        removed there, left them, and nothing else would ever remove them."""
        if self.swept or not (self.operations.ready.is_set() and self.runs.ready.is_set()):
            return
        async with self.lock:  # no run starts, ends or is deleted meanwhile
            store = await ManifestStore.of(self.bus)
            for key in sorted(self.runs.values.keys() - self.operations.values.keys()):
                await self._drop_state(key)
            # Not nats-py's ``list()``: it can answer with part of the objects (``object_names``).
            names = await object_names(store.objects)
            orphans = domain.orphan_objects(names, self.operations.values, self.runs.values)
            for name in orphans:
                await store.delete(name)
            self.swept = True
        log.info("left-over run states and plans looked for", objects_removed=len(orphans))

    async def _drop_state(self, key: str) -> None:
        """Remove the run state of an operation that no longer exists, its last run's number kept in the
        operation's delete marker (``_apply`` numbers a re-created operation's runs after it)."""
        state = self.runs.values[key]
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, revision, note = await kv_load_deleted(kv, key, OperationRecord)
        if record is not None:
            return  # applied a moment ago: the watch has not brought it yet
        number = domain.run_number(state.run)
        if number > domain.runs_of_note(note):
            await kv_delete(kv, key, revision or 0, note=domain.deletion_note(deleted_at(note), number))
        if state.stage != "finished" and state.run:
            await self.bus.publish_core(subjects.TASK_CANCEL, TaskCancel(id=f"{state.run}.cancel", run=state.run))
        self.runs.deleted(key, await kv_delete(await self.bus.kv(subjects.KV_OPERATION_RUNS), key, None))
        log.info("run state of an operation gone removed", operation=subjects.key_name(key), run=state.run or None)

    async def _finish(self, key: str, phase: OperationPhase, message: str) -> None:
        now = self.clock()
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, revision = await kv_load(kv, key, OperationRecord)
        state, _ = await self._state(key)
        if record is None:
            self._forget_run(key)
            return
        if record.load is not None:
            # Before the finished state: a loader killed in between finishes the run again, and this is idempotent.
            await self._settle_baseline(key, phase)
        # The end goes into the run state first: if the record's write below fails (or the loader is killed before
        # it), the tick finds the record Executing a finished run and writes this end (``_close``).
        state = msgspec.structs.replace(state, stage="finished", outcome=phase, outcome_message=message,
                                        finished_at=now)
        if phase == "Complete" and record.load is not None and record.load.policy == "OnEvent":
            state = msgspec.structs.replace(state, baseline_incarnation=state.dataset_incarnation)
        await self._save_state(key, state)
        await self._close(key, record, revision, state)

    async def _close(self, key: str, record: OperationRecord, revision: int | None, state: domain.RunState) -> None:
        """Write a finished run's end (phase, message, final progress) into its record."""
        phase, message = domain.closing(state)
        now = state.finished_at or self.clock()
        status = record.status
        if state.parts:
            plan = await self._plan_of(key, state.run)
            done = domain.files_done(plan, state.parts, state.files_total) if plan is not None else 0
            status = msgspec.structs.replace(status, progress=domain.fold_progress(state, done, now, ended=True))
        status = domain.status_finished(status, phase, message, state.started_at or now, now)
        # The moved parts are the run's only: its parts are all done, or cancelled, once it ends.
        await self._save_status(key, msgspec.structs.replace(record, moved_parts=[]), revision, status)
        self._forget_run(key)
        metrics.OPERATION_RUNS.labels(record.kind, phase).inc()
        log.info("run finished", run=state.run, phase=phase, message=message or None)
        await self._settle(key, state)

    async def _settle(self, key: str, state: domain.RunState) -> None:
        """The run's end is in its record: its plan and its parts' progress go (``domain.settled``), or they stayed
        in the Object Store and the run state after every run. A write here that fails is done by a later tick."""
        if state.parts or state.ring or state.files_total:
            await self._save_state(key, domain.settled(state))
        await (await ManifestStore.of(self.bus)).delete(subjects.loader_plan(key))

    def _forget_run(self, key: str) -> None:
        """Drop what this process keeps in memory for the operation's run: it finished, or the operation is gone."""
        self.plans.pop(key, None)
        self.published.pop(key, None)
        self.dataset_waits.pop(key, None)
        self.run_after_waits.pop(key, None)
        self.resynced.pop(key, None)
        self.dirty.discard(key)
        self.written_at.pop(key, None)
        for stale in [k for k in self.gone_since if k[0] == key]:
            del self.gone_since[stale]
        self.ring_since.pop(key, None)
        for stale in [k for k in self.silent_since if k[0] == key]:
            del self.silent_since[stale]
        self._prune_heard()

    def _prune_heard(self) -> None:
        """Forget when mounts last reported unless an executing run waits on them (another operation's run of the
        same dataset may): without this, an entry per dataset and node ever seen would stay for ever."""
        if not (self.operations.ready.is_set() and self.runs.ready.is_set()):
            return  # the mirrors do not know every run yet: what they lack could be waiting
        for stale in domain.unwaited_mounts(self.heard, self.operations.values, self.runs.values):
            del self.heard[stale]

    async def _settle_baseline(self, key: str, phase: OperationPhase) -> None:
        """OnEvent: a Complete run's manifest becomes the baseline of the next run's diff; a Failed run's is dropped,
        so the next run diffs against the older baseline and loads the failed run's changes again (see ``_plan``)."""
        store = await ManifestStore.of(self.bus)
        planned = subjects.loader_planned_manifest(key)
        if phase == "Complete":
            try:
                entries = await store.load(planned)
            except (ObjectNotFoundError, NotFoundError):
                return  # not an OnEvent run, or finished already
            await self._save_entries(store, subjects.loader_manifest(key), entries)
        await store.delete(planned)

    async def _write_progress(self, key: str, force: bool, message: str | None = None) -> None:
        """Fold the parts' progress into the status: at most once a second, unless ``force``; and once when the run
        stalls, so its status does not keep the last report's rate and ETA. ``message``: the run's message now
        (``domain.absent_message``); None keeps the one written."""
        if not force and not self._progress_due(key):
            return
        kv = await self.bus.kv(subjects.KV_OPERATIONS)
        record, revision = await kv_load(kv, key, OperationRecord)
        state, _ = await self._state(key)
        if record is None or state.stage != "executing":
            return
        plan = await self._plan_of(key, state.run)
        done = domain.files_done(plan, state.parts, state.files_total) if plan is not None else 0
        progress = domain.fold_progress(state, done, self.clock())
        self.dirty.discard(key)
        status = msgspec.structs.replace(record.status, progress=progress,
                                         message=record.status.message if message is None else message)
        if status != record.status:
            await self._save_status(key, record, revision, status)

    def _progress_due(self, key: str) -> bool:
        """Progress not yet in the status, and its last write a second ago or more; or the run stalled."""
        return self._stalled_live(key) or (
            key in self.dirty and time.monotonic() - self.written_at.get(key, 0.0) >= STATUS_INTERVAL_SECONDS)

    def _stalled_live(self, key: str) -> bool:
        """From the mirrors: the run is stalled and its status still shows a rate or an ETA."""
        state, record = self.runs.values.get(key), self.operations.values.get(key)
        if state is None or record is None or state.stage != "executing":
            return False
        progress = record.status.progress
        live = progress.rate_bytes_per_second > 0 or progress.eta_seconds is not None
        return live and domain.stalled(state, self.clock())

    # --- state ---

    async def _state(self, key: str) -> tuple[domain.RunState, int | None]:
        state, revision = await kv_load(await self.bus.kv(subjects.KV_OPERATION_RUNS), key, domain.RunState)
        return state or domain.RunState(), revision

    async def _save_state(self, key: str, state: domain.RunState) -> None:
        # Only this process writes run state, under the lock, so the last revision is the one just read.
        kv = await self.bus.kv(subjects.KV_OPERATION_RUNS)
        _, revision = await kv_load(kv, key, domain.RunState)
        revision = await kv_save(kv, key, state, revision)
        self.runs.saved(key, state, revision)

    async def _save_status(self, key: str, record: OperationRecord, revision: int | None,
                           status: OperationStatus) -> OperationRecord:
        updated = msgspec.structs.replace(record, status=status)
        revision = await kv_save(await self.bus.kv(subjects.KV_OPERATIONS), key, updated, revision)
        self.operations.saved(key, updated, revision)
        self.written_at[key] = time.monotonic()
        await self._publish_status(updated, revision)
        return updated

    async def _publish_status(self, record: OperationRecord, revision: int | None) -> None:
        meta = record.metadata
        key = subjects.operation_key(record.kind, meta.namespace, meta.name)
        await self.bus.publish(FACTS[record.kind][2], OperationStatusChanged(
            id=f"{key}.status.{revision}", kind=record.kind, name=meta.name, namespace=meta.namespace,
            generation=record.generation, status=record.status))

    async def _current_entries(self, store: ManifestStore, record: OperationRecord,
                               dataset: DatasetRecord | None
                               ) -> tuple[DatasetRecord | None, list[ManifestEntry] | None]:
        """The dataset's record and the entries of the manifest it names (None: it has none), read again if a
        sync replaced that manifest meanwhile."""
        ref = domain.dataset_ref(record)
        return await store.load_current(lambda: self._dataset(record),
                                        lambda found: found.status.manifest or store.name(ref.namespace, ref.name),
                                        dataset)

    async def _dataset(self, record: OperationRecord) -> DatasetRecord | None:
        ref = domain.dataset_ref(record)
        found, _ = await kv_load(await self.bus.kv(subjects.KV_DATASETS),
                                 subjects.resource_key(ref.namespace, ref.name), DatasetRecord)
        return found

    async def _runtime(self, record: OperationRecord) -> RuntimeRecord | None:
        ref = domain.dataset_ref(record)
        found, _ = await kv_load(await self.bus.kv(subjects.KV_RUNTIMES),
                                 subjects.resource_key(ref.namespace, ref.name), RuntimeRecord)
        return found

    async def _plan_of(self, key: str, run: str) -> domain.Plan | None:
        plan = self.plans.get(key)
        if plan is not None and plan.run == run:
            return plan
        store = await ManifestStore.of(self.bus)
        try:
            result = await store.objects.get(subjects.loader_plan(key))
        except (ObjectNotFoundError, NotFoundError):
            return None
        plan = msgspec.json.decode(result.data or b"{}", type=domain.Plan)
        if plan.run != run:
            return None
        self.plans[key] = plan
        return plan

    @staticmethod
    async def _load_entries(store: ManifestStore, name: str) -> list[ManifestEntry]:
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            return await store.load(name)
        return []

    @staticmethod
    async def _save_entries(store: ManifestStore, name: str, entries: list[ManifestEntry]) -> None:
        with ManifestWriter() as writer:
            for entry in entries:
                writer.add(entry)
            await store.save(name, writer)


def block_size(runtime: RuntimeRecord) -> int:
    if runtime.status.block_size_bytes:
        return runtime.status.block_size_bytes
    try:
        return parse_quantity(runtime.runtime.spec.block_size)
    except ValueError:
        return DEFAULT_BLOCK_SIZE

