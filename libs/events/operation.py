"""Data operations: DataLoad (Fluid's warm-up, same fields) and DataClean (Shoal's own: the opposite of a load),
their commands and facts, and the tasks the loader hands to the agents and the progress agents report back.

A DataLoad or DataClean is an *operation*. Its facts are one family for both kinds (``kind`` says which), because
their status is the same shape: Fluid's ``OperationStatus`` (phase, duration, conditions, lastScheduleTime,
lastSuccessfulTime) plus Shoal's ``progress`` in files and bytes.

Each execution of an operation is a *run* (a Once load has one; Cron and OnEvent loads have one per firing). The
loader cuts a run into *parts*, each the work of one node on one dataset, and publishes them as ``NodeTask`` to
the node's mount process of that dataset, which owns the block cache. The mount process reports ``TaskProgress``
(cumulative for the part, at most once a second, and a last one with ``done``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from libs.events.agent import CachedFile
from libs.events.common import ApplyResult, Event, ObjectMeta, ObjectRef, int_range
from libs.events.dataset import Condition

OperationKind = Literal["DataLoad", "DataClean"]
Policy = Literal["Once", "Cron", "OnEvent"]
OperationPhase = Literal["Pending", "Executing", "Complete", "Failed"]
# The duration of an operation whose run has not ended (Fluid's word, which its controllers write from Pending on).
UNFINISHED = "Unfinished"

# Far above any runtime's cache workers; only bounds nonsense before a run checks the real number.
MAX_TARGET_REPLICAS = 64
# Fluid's ttlSecondsAfterFinished is an *int32 (about 68 years): a manifest with more is not a Fluid manifest, and a
# Go client of the same object could not hold it.
MAX_TTL_SECONDS = 2**31 - 1
TtlSeconds = Annotated[int, int_range(0, MAX_TTL_SECONDS)]


class TargetPath(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """A file or folder of the dataset (as seen through the mount: ``/<mountPoint name>/<path in the object>``)."""

    path: str
    # How many owners of each block hold it (Fluid: "replicas"); at most the runtime's cache workers.
    replicas: Annotated[int, int_range(1, MAX_TARGET_REPLICAS)] = 1


class CleanTarget(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """A file or folder a DataClean evicts: every copy of its blocks on every node, so it has no ``replicas``."""

    # A ``replicas`` still sent (the field DataClean's targets once shared with DataLoad's) is an unknown field,
    # ignored as every command's are: ``shoal apply`` says so, and a Kubernetes apiserver prunes it.
    path: str


class OperationRef(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Fluid's ``runAfter``: the operation that must be Complete before this one starts."""

    kind: str
    name: str
    namespace: str = ""  # empty: the namespace of the operation that names it


class DatasetRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An operation's ``spec.dataset``. Without a namespace (or an empty one) it names a dataset of the operation's
    own namespace, Fluid's rule: a command published straight to NATS (``dataload.apply.v1`` for ``ml/warm`` naming
    ``{name: x}``) means ``ml/x``, as the same YAML through ``shoal apply`` or Kubernetes does, not ``default/x``.
    A namespace other than the operation's own is refused, as Fluid refuses it: an operation works on a dataset of
    its own namespace."""

    name: str
    namespace: str = ""


class DataLoadSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    dataset: DatasetRef
    # Re-sync the dataset's listing before loading (Fluid: loadMetadata).
    load_metadata: bool = False
    # Empty: the whole dataset, one replica.
    target: list[TargetPath] = []
    policy: Policy = "Once"
    # A cron expression (five fields, a macro such as @hourly, or @every <Go duration>, as Kubernetes CronJobs);
    # required for policy Cron, refused otherwise.
    schedule: str = ""
    run_after: OperationRef | None = None
    ttl_seconds_after_finished: TtlSeconds | None = None


class DataCleanSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    dataset: DatasetRef
    # Empty: every block of the dataset on every node.
    target: list[CleanTarget] = []
    run_after: OperationRef | None = None
    ttl_seconds_after_finished: TtlSeconds | None = None


class DataLoad(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    metadata: ObjectMeta
    spec: DataLoadSpec


class DataClean(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    metadata: ObjectMeta
    spec: DataCleanSpec


class NodeProgress(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    node: str
    bytes_done: int = 0
    bytes_total: int = 0
    # Every part of the run on this node is finished. A clean has no total to compare its freed bytes with, so
    # without it nothing told which node an Executing clean still waits for.
    done: bool = False
    # Its parts are done because the loader moved what was left of them to the ring (the node left it under the
    # load), not because the node did them: ``done`` alone showed it as finished.
    moved: bool = False


class Progress(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Shoal's progress of the current (or last) run. A clean counts freed bytes as done."""

    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    # Blocks found already cached (a load) or not cached anywhere (a clean): done without work.
    bytes_skipped: int = 0
    rate_bytes_per_second: float = 0.0
    # None while unknown (no bytes done yet, or done).
    eta_seconds: float | None = None
    nodes: list[NodeProgress] = []


class OperationStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Fluid's OperationStatus (phase, duration, conditions, lastScheduleTime, lastSuccessfulTime) + progress."""

    phase: OperationPhase = "Pending"
    message: str = ""
    # Fluid writes a duration like "1m32s"; ``UNFINISHED`` while running.
    duration: str = ""
    conditions: list[Condition] = []
    last_schedule_time: str = ""
    last_successful_time: str = ""
    # RFC 3339 times of the current (or last) run.
    start_time: str = ""
    completion_time: str = ""
    # Runs started so far (Cron, OnEvent); the current run's id is ``<kind>.<namespace>.<name>.<runs>``.
    runs: int = 0
    progress: Progress = Progress()
    # What the operation waits for while Pending (e.g. "DataLoad default/warm to be Complete").
    waiting_for: str = ""
    # Whether that wait is for the operation named in ``spec.runAfter`` (not for the dataset): Fluid's
    # ``waitingFor.operationComplete`` says exactly this, and nothing while the wait is for the dataset.
    waiting_for_operation: bool = False
    # The generation of the spec the current (or last) run started from, as Kubernetes' observedGeneration: a run's
    # end is the end of the apply of that generation, and a newer spec (a Failed load's target fixed) runs again.
    # A Cron or OnEvent load's moves at the apply: the new spec is in effect from then on (its next run reads it).
    observed_generation: int = 0


# --- Commands (other systems publish these). ---


class DataLoadApply(Event, frozen=True, kw_only=True, tag="dataload.apply.v1", rename="camel"):
    data_load: DataLoad


class DataLoadDelete(Event, frozen=True, kw_only=True, tag="dataload.delete.v1", rename="camel"):
    """Deletes the DataLoad and cancels its work (blocks already cached stay)."""

    name: str
    namespace: str = "default"


class DataLoadRun(Event, frozen=True, kw_only=True, tag="dataload.run.v1", rename="camel"):
    """Run a DataLoad now (any policy but Once; refused while it is Executing)."""

    name: str
    namespace: str = "default"


class DataCleanApply(Event, frozen=True, kw_only=True, tag="dataclean.apply.v1", rename="camel"):
    data_clean: DataClean


class DataCleanDelete(Event, frozen=True, kw_only=True, tag="dataclean.delete.v1", rename="camel"):
    name: str
    namespace: str = "default"


OperationCommand = DataLoadApply | DataLoadDelete | DataLoadRun | DataCleanApply | DataCleanDelete


# --- Facts (the loader publishes these). ---


class OperationAccepted(Event, frozen=True, kw_only=True, tag="operation.accepted.v1", rename="camel"):
    causation_id: str
    kind: OperationKind
    name: str
    namespace: str
    generation: int
    result: ApplyResult = ""  # what the command did to the object (libs.events.common.ApplyResult)
    # A run request (dataload.run.v1) that joined the run already pending rather than queueing another: why ("" when
    # it queued a run of its own, and on every other fact).
    merged: str = ""


class OperationRejected(Event, frozen=True, kw_only=True, tag="operation.rejected.v1", rename="camel"):
    causation_id: str
    reason: str
    kind: str = ""
    name: str = ""
    namespace: str = ""
    subject: str = ""
    # The command named an object that does not exist (any more): a delete, resync, scale or run of it. ``shoal
    # delete KIND --all`` passes over such an answer for an object deleted since it listed them, as kubectl does.
    not_found: bool = False


class OperationStatusChanged(Event, frozen=True, kw_only=True, tag="operation.status.v1", rename="camel"):
    kind: OperationKind
    name: str
    namespace: str
    generation: int
    status: OperationStatus


class OperationDeleted(Event, frozen=True, kw_only=True, tag="operation.deleted.v1", rename="camel"):
    """Deleted by a command (``causation_id`` = its id) or by ``ttlSecondsAfterFinished`` (empty)."""

    kind: OperationKind
    name: str
    namespace: str
    causation_id: str = ""


OperationFact = OperationAccepted | OperationRejected | OperationStatusChanged | OperationDeleted


# --- Loader ↔ agents (internal; JSON like the rest). ---

TaskAction = Literal["load", "clean"]


class NodeTask(Event, frozen=True, kw_only=True, tag="agent.task.v1", rename="camel"):
    """One part of a run, for the mount process of ``dataset`` on ``node``. ``id`` = ``<run>.<part>``.

    load: cache ``blocks`` (fetched from the store into this node's tiers, never through FUSE; blocks already
    cached are skipped). clean: evict ``blocks`` and every cached block of ``files`` (any version); both empty
    and ``everything`` set: the whole dataset's cache on the node.
    """

    run: str
    part: int
    parts: int
    node: str
    dataset: ObjectRef
    action: TaskAction
    blocks: list[CachedFile] = []
    # (mount, key) of whole files to evict, for a clean of paths.
    files: list[tuple[int, str]] = []
    everything: bool = False


class TaskCancel(Event, frozen=True, kw_only=True, tag="agent.task.cancel.v1", rename="camel"):
    """Stop the parts of ``run`` (core NATS broadcast; a part delivered later is checked against the KV too)."""

    run: str


class TaskPartsCancel(Event, frozen=True, kw_only=True, tag="agent.task.cancel.parts.v1", rename="camel"):
    """Stop the parts numbered ``parts`` of ``run`` on ``node`` only, the rest of the run going on (core NATS, on the
    subject of ``TaskCancel``): the loader moved them to other cache workers (the runtime scaled in under a load).
    A type of its own, not fields of ``TaskCancel``: an agent that predates it ignores it as undecodable (its part
    goes on, one more copy of its blocks) rather than stop the whole run on every node."""

    run: str
    node: str
    parts: list[int] = []


class TaskProgress(Event, frozen=True, kw_only=True, tag="agent.task.progress.v1", rename="camel"):
    """Cumulative progress of one part. ``files_done``: indexes (in the part's ``blocks``) of the files whose
    blocks in this part are all done. ``failed``: blocks that could not be done, with ``message`` saying why.
    ``bytes_total``: the bytes the part has to do as the mount process found them (a load's blocks; a clean's blocks
    to free, those cached when it started), which only it knows of a clean; 0 from an agent before the field."""

    run: str
    part: int
    node: str
    blocks_done: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    files_done: list[int] = []
    failed: int = 0
    message: str = ""
    done: bool = False
    bytes_total: int = 0


class MovedParts(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Parts of ``run`` on ``node`` the loader moved to other cache workers (the node left the ring under a load),
    as ``TaskPartsCancel`` names them: kept in the record, which a running part reads at every check of its run."""

    run: str
    node: str
    parts: list[int] = []


class OperationRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the loader keeps in KV ``shoal_operations`` (key ``subjects.operation_key``): spec and status. The
    state of the current run (parts, their progress) is the loader's own, in ``shoal_operation_runs``."""

    kind: OperationKind
    metadata: ObjectMeta
    load: DataLoadSpec | None = None
    clean: DataCleanSpec | None = None
    generation: int = 1
    created_at: str = ""
    status: OperationStatus = OperationStatus()
    # The commands stream's sequence of the last apply of this record (0: not known). An older apply or delete
    # delivered again behind it (its first handling failed, and JetStream redelivers it behind newer commands) is
    # stale: it must not put an old spec back, nor remove the operation applied after it.
    command_sequence: int = 0
    # What the apply at ``command_sequence`` answered (``libs.events.common.answered_result``): a redelivery of it
    # answers the same. "" in a record written before the field.
    command_result: ApplyResult = ""
    # The trace of the last apply taken in (W3C traceparent, "" if none): a run the apply could
    # not start at once (its dataset not Bound yet, its loadMetadata listing, a Cron firing) is started by the
    # loader's tick, which no message carries a trace to; it continues this one, as a dataset's sync does.
    traceparent: str = ""
    # The current run's parts moved off nodes that left the ring, per node: the mount processes stop them at their
    # next look at the record (``services.agent.tasks``), a node that missed the ``TaskPartsCancel`` (core NATS)
    # too. Here rather than in the run state, which the agents may not read and which holds every part's progress.
    moved_parts: list[MovedParts] = []
