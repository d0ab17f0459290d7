"""Loader decisions, pure (no I/O, no clock: ``now`` is a parameter).

- Validation of DataLoad / DataClean specs (rejections a person can act on) and of a run against the current
  dataset and runtime (``Failed`` with a message saying what to change).
- The plan: manifest entries + target paths + the ring of block owners (or the ready nodes) + replicas + block
  size → parts per node (``NodeTask``), each at most ``MAX_PART_BLOCKS`` blocks and about ``MAX_PART_BYTES``
  encoded. Deterministic: the same inputs give the same parts, so a restarted loader republishes the same ids.
- Progress folding: the parts' cumulative ``TaskProgress`` → ``Progress`` (rate, ETA, per node, files done).
- When a run is due: Once (never ran, or its spec changed since its run), Cron (``croniter``, read and validated
  as a Kubernetes CronJob reads it, robfig/cron's standard parser, ``@every`` too; decided from lastScheduleTime,
  so a missed run runs once and a restart does not run it again), OnEvent (the manifest
  changed: only new or changed entries), runAfter (wait / go / fail naming the other operation, or the cycle the
  operation is in), TTL expiry (not while a Pending runAfter waits for it).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import math
import re
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, NamedTuple

import msgspec
from croniter import CroniterBadDateError, croniter

from libs import deletion, ring, subjects
from libs.blocks import block_count, block_span
from libs.events.agent import BlockId, CachedFile
from libs.events.common import (
    DECODE_ERRORS,
    DNS1123_LABEL,
    ObjectMeta,
    ObjectRef,
    dns_label_errors,
    format_bytes,
    parse_rfc3339,
    rfc3339,
)
from libs.events.dataset import CONDITION_SYNCED, Condition, DatasetRecord, ManifestEntry, find_condition
from libs.events.operation import (
    MAX_TARGET_REPLICAS,
    MAX_TTL_SECONDS,
    UNFINISHED,
    CleanTarget,
    DataClean,
    DataCleanSpec,
    DataLoad,
    DataLoadSpec,
    DatasetRef,
    MovedParts,
    NodeProgress,
    NodeTask,
    OperationKind,
    OperationPhase,
    OperationRecord,
    OperationRef,
    OperationStatus,
    Progress,
    TargetPath,
    TaskAction,
    TaskProgress,
)
from libs.events.runtime import RuntimeRecord
from libs.paths import is_folder, selected_spans, target_path_problem
from libs.redact import MAX_ERROR_CHARS, cut_error
from libs.references import reference_of

# The brief's part size: a NodeTask stays far below NATS's 1 MiB payload limit and a part is minutes of work at
# most, so a restarted mount process redoes (skips) little.
MAX_PART_BLOCKS = 2000
MAX_PART_BYTES = 256 * 1024
# The run state (every part's counts, files done and message) is one KV value, so one NATS message of at most
# 1 MiB (libs.bus.MESSAGE_LIMIT; a domain does not import the bus). A plan whose state could outgrow this budget is
# refused before it starts (``state_problem``); the rest of the 1 MiB covers the run's own fields and headers.
RUN_STATE_BYTES = 896 * 1024
OPERATION_KINDS: tuple[OperationKind, ...] = ("DataLoad", "DataClean")
# A run none of whose parts reported progress for this long is stalled: its rate is 0 and its ETA unknown, not the
# numbers of the last report. A working part reports at least once a second (a block fetched, skipped or failed); a
# block of 4 MiB from a slow store, or a part waiting for the mount's new manifest, can keep one quiet for seconds.
STALLED_SECONDS = 10.0
# Where validation looks for a schedule's first firing: a fixed time, not the clock, so validation stays pure. Any
# schedule that matches a date matches one within croniter's search window (50 years) of any start (the rarest,
# 29 February, recurs within 8), so the answer does not depend on the start. 2000-01-01T00:00:00Z.
SCHEDULE_PROBE_TIME = 946_684_800.0


# --- Times ---


def format_duration(seconds: float) -> str:
    """Fluid's (Go's) duration style, whole seconds: "0s", "32s", "1m32s", "2h0m5s"."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --- Validation of commands ---


def validate_ref(name: str, namespace: str) -> list[str]:
    """Why a command's name and namespace cannot name an operation (delete, run), or nothing."""
    return dns_label_errors(name, "name", DNS1123_LABEL) + dns_label_errors(namespace, "namespace", DNS1123_LABEL)


# The macros a Kubernetes CronJob's schedule takes (Fluid runs a Cron DataLoad as one), as their five fields. Lower
# case only, as Kubernetes (robfig/cron). Its ``@every <duration>`` has no cron equivalent: see ``every_seconds``.
CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
               "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
# robfig/cron's interval schedule, which a Kubernetes CronJob takes too (so a Fluid Cron DataLoad may say
# ``@every 5m``): the prefix with its one space, then a Go duration (``time.ParseDuration``).
EVERY_PREFIX = "@every "
_GO_DURATION_UNITS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6, "s": 10**9,
                      "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_DURATION_PIECE = r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_GO_DURATION = re.compile(rf"[-+]?(?:{_GO_DURATION_PIECE})+")
# A Go duration is an int64 of nanoseconds (about 292 years); Go refuses a longer one as invalid.
_GO_MAX_NANOSECONDS = 2**63 - 1


def _go_duration_nanoseconds(text: str) -> int | None:
    """A Go duration ("5m", "1h30m", "1.5h", "300ms", "0") in nanoseconds, or None where Go's ``time.ParseDuration``
    refuses it (no unit, a unit Go does not have, a space, too long)."""
    if text in ("0", "+0", "-0"):
        return 0
    if not _GO_DURATION.fullmatch(text):
        return None
    total = Fraction(0)
    for number, unit in re.findall(_GO_DURATION_PIECE, text):
        if number in ("", "."):
            return None
        total += Fraction(number) * _GO_DURATION_UNITS[unit]
    nanoseconds = int(total)
    if nanoseconds > _GO_MAX_NANOSECONDS:
        return None
    return -nanoseconds if text.startswith("-") else nanoseconds


def _every_error(schedule: str) -> str:
    """Why an ``@every`` schedule is not one to run, or ""."""
    duration = schedule[len(EVERY_PREFIX):]
    nanoseconds = _go_duration_nanoseconds(duration)
    if nanoseconds is None:
        return (f"spec.schedule {schedule!r}: {duration!r} is not a duration: a number and a unit (h, m, s, ms, us, "
                f"ns), as many as needed, e.g. '@every 5m', '@every 1h30m', '@every 90s'")
    if nanoseconds <= 0:
        # robfig/cron would fire it every second; a load every second is no one's intent.
        return f"spec.schedule {schedule!r}: the interval must be longer than zero, e.g. '@every 5m'"
    return ""


def every_seconds(schedule: str) -> int | None:
    """The whole seconds between firings of a valid ``@every`` schedule, as robfig/cron counts them (a fraction of a
    second dropped, under a second fires every second), or None for a schedule of another form."""
    if not schedule.startswith(EVERY_PREFIX):
        return None
    nanoseconds = _go_duration_nanoseconds(schedule[len(EVERY_PREFIX):])
    if nanoseconds is None or nanoseconds <= 0:
        return None
    return max(1, nanoseconds // 10**9)


class CronField(NamedTuple):
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names for low, low + 1, ... (any case, as robfig/cron)


# The five fields and their bounds as Kubernetes reads them (robfig/cron's standard parser): day-of-week is 0-6,
# Sunday 0 (croniter would also take 7).
CRON_FIELDS = (
    CronField("minute", 0, 59), CronField("hour", 0, 23), CronField("day-of-month", 1, 31),
    CronField("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    CronField("day-of-week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_NUMBER = re.compile(r"[0-9]+")


def _cron_value(text: str, field: CronField) -> int | None:
    if _CRON_NUMBER.fullmatch(text):
        return int(text)
    lowered = text.lower()
    return field.low + field.names.index(lowered) if lowered in field.names else None


def _cron_piece_error(piece: str, field: CronField) -> str:
    """Why one comma-separated piece of a field is not one Kubernetes takes (robfig/cron's standard parser: ``*``,
    ``?``, a value or a range ``a-b``, each with an optional ``/step``), or ""."""
    span, slash, step = piece.partition("/")
    if slash and not (_CRON_NUMBER.fullmatch(step) and int(step) > 0):
        return f"{piece!r} has step {step!r}: a step is a whole number of at least 1, e.g. '*/5'"
    if span in ("*", "?"):
        return ""
    low_text, dash, high_text = span.partition("-")
    low, high = _cron_value(low_text, field), _cron_value(high_text, field) if dash else None
    allowed = f"{field.low}-{field.high}" + (f" or {field.names[0]}-{field.names[-1]}" if field.names else "")
    if low is None or (dash and high is None):
        if "#" in span or {"L", "W"} & set(span.upper()):  # not in a name: those were read above
            return (f"{piece!r} uses L, W or # (last day, nearest weekday, nth weekday), which Kubernetes CronJobs "
                    "do not take: use values, ranges a-b, lists a,b and steps */n only")
        return f"{piece!r} is not '*', a value or a range a-b of {allowed}"
    for value in (low, high):
        if value is not None and not field.low <= value <= field.high:
            sunday = "; Sunday is 0" if value == 7 and field.name == "day-of-week" else ""
            return f"{piece!r} is out of range: {value} is not within {allowed}{sunday}"
    if high is not None and low > high:
        return (f"{piece!r} is a reversed range ({low} after {high}): write the smaller end first, or list a range "
                f"that wraps around as two ('{low_text}-{field.high},{field.low}-{high_text}')")
    return ""


def schedule_errors(schedule: str) -> list[str]:
    """Why ``spec.schedule`` is not a schedule a Kubernetes CronJob takes (robfig/cron's standard parser), each
    naming the field and what to write instead, or nothing. croniter alone also took ``L``, ``#``, reversed ranges
    (read as wrapping) and day-of-week 7, which Kubernetes refuses: a Fluid DataLoad must mean the same in both."""
    if schedule.startswith(EVERY_PREFIX):
        return [problem] if (problem := _every_error(schedule)) else []
    fields = CRON_MACROS.get(schedule, schedule).split()
    if len(fields) != len(CRON_FIELDS):
        return [f"spec.schedule {schedule!r} is not a valid cron expression: five fields (minute hour day-of-month "
                f"month day-of-week), e.g. '0 * * * *', one of {', '.join(CRON_MACROS)}, or '@every <duration>' "
                f"such as '@every 5m'"]
    errors = []
    for text, field in zip(fields, CRON_FIELDS, strict=True):
        for piece in text.split(","):
            problem = _cron_piece_error(piece, field)
            if problem:
                errors.append(f"spec.schedule {schedule!r}: the {field.name} field {problem}")
                break
    return errors


def valid_schedule(schedule: str) -> bool:
    return not schedule_errors(schedule)


def _any_day(field: str) -> bool:
    """Whether a day field counts as unrestricted for robfig/cron: a piece of it is ``*`` or ``?`` with no step
    (or step 1). ``*/2`` is restricted."""
    for piece in field.split(","):
        span, _, step = piece.partition("/")
        if span in ("*", "?") and step in ("", "1"):
            return True
    return False


def schedule_fires(schedule: str) -> bool:
    """Whether a valid schedule has a next firing. "0 0 30 2 *" (30 February) is valid syntax that no date matches:
    accepted, it would fail every due check of the operation."""
    try:
        next_cron(schedule, SCHEDULE_PROBE_TIME)
    except CroniterBadDateError:
        return False
    return True


def _target_errors(targets: Sequence[TargetPath | CleanTarget]) -> list[str]:
    errors = []
    for index, target in enumerate(targets):
        where = f"spec.target[{index}]"
        if (problem := target_path_problem(target.path)) is not None:
            errors.append(f"{where}.path {target.path!r} {problem}")
        if isinstance(target, TargetPath) and not 1 <= target.replicas <= MAX_TARGET_REPLICAS:
            errors.append(f"{where}.replicas must be between 1 and {MAX_TARGET_REPLICAS}, got {target.replicas}")
    return errors


def _common_errors(kind: OperationKind, meta: ObjectMeta, dataset: DatasetRef, run_after: OperationRef | None,
                   ttl: int | None) -> list[str]:
    errors = dns_label_errors(meta.name, "metadata.name", DNS1123_LABEL)
    errors += dns_label_errors(meta.namespace, "metadata.namespace", DNS1123_LABEL)
    errors += dns_label_errors(dataset.name, "spec.dataset.name", DNS1123_LABEL)
    if dataset.namespace:
        errors += dns_label_errors(dataset.namespace, "spec.dataset.namespace", DNS1123_LABEL)
    if problem := other_namespace(kind, meta.namespace, dataset.namespace or meta.namespace):
        errors.append(problem)
    if run_after is not None:
        if run_after.kind not in OPERATION_KINDS:
            errors.append(f"spec.runAfter.kind must be DataLoad or DataClean, got {run_after.kind!r}")
        errors += dns_label_errors(run_after.name, "spec.runAfter.name", DNS1123_LABEL)
        if run_after.namespace:
            errors += dns_label_errors(run_after.namespace, "spec.runAfter.namespace", DNS1123_LABEL)
    if ttl is not None and not 0 <= ttl <= MAX_TTL_SECONDS:
        errors.append(f"spec.ttlSecondsAfterFinished must be between 0 and {MAX_TTL_SECONDS} (an int32, as Fluid's "
                      f"field), got {ttl}")
    return errors


def other_namespace(kind: str, namespace: str, dataset_namespace: str) -> str | None:
    """Why an operation of ``namespace`` may not work on a dataset of ``dataset_namespace``, or None when they are
    one. Fluid refuses it too (TargetDatasetNamespaceNotSame): Kubernetes grants DataLoads and DataCleans per
    namespace, and one of another namespace would fill or evict that namespace's cache (and list its store again)
    for whoever may create operations anywhere."""
    if dataset_namespace == namespace:
        return None
    return (f"spec.dataset.namespace {dataset_namespace!r} is not the {kind}'s own namespace {namespace!r}: a {kind} "
            f"works on a dataset of its own namespace, as in Fluid; create it in namespace {dataset_namespace}, or "
            f"leave spec.dataset.namespace out")


def validate_load(load: DataLoad) -> list[str]:
    spec = load.spec
    errors = _common_errors("DataLoad", load.metadata, spec.dataset, spec.run_after, spec.ttl_seconds_after_finished)
    errors += _target_errors(spec.target)
    if spec.policy == "Cron":
        if not spec.schedule:
            errors.append("spec.schedule is required for policy Cron (a cron expression such as '*/5 * * * *')")
        elif schedule_problems := schedule_errors(spec.schedule):
            errors += schedule_problems
        elif not schedule_fires(spec.schedule):
            errors.append(f"spec.schedule {spec.schedule!r} never fires: no date matches it (a day the month does "
                          "not have, such as 30 February?); name days that exist, e.g. '0 0 28 2 *'")
    elif spec.schedule:
        errors.append(f"spec.schedule is only for policy Cron; remove it or set policy: Cron (policy is "
                      f"{spec.policy})")
    if spec.run_after is not None and _same(spec.run_after, "DataLoad", load.metadata):
        errors.append("spec.runAfter names this DataLoad itself; name another operation")
    return errors


def validate_clean(clean: DataClean) -> list[str]:
    spec = clean.spec
    errors = _common_errors("DataClean", clean.metadata, spec.dataset, spec.run_after,
                            spec.ttl_seconds_after_finished)
    errors += _target_errors(spec.target)
    if spec.run_after is not None and _same(spec.run_after, "DataClean", clean.metadata):
        errors.append("spec.runAfter names this DataClean itself; name another operation")
    return errors


def _same(ref: OperationRef, kind: str, meta: ObjectMeta) -> bool:
    return ref.kind == kind and ref.name == meta.name and (ref.namespace or meta.namespace) == meta.namespace


# --- Records ---


def dataset_ref(record: OperationRecord) -> ObjectRef:
    spec = record.load or record.clean
    assert spec is not None
    ref = spec.dataset
    return ObjectRef(name=ref.name, namespace=ref.namespace or record.metadata.namespace)


def apply_operation(record: OperationRecord | None, kind: OperationKind, meta: ObjectMeta,
                    load: DataLoadSpec | None, clean: DataCleanSpec | None,
                    now: float, sequence: int = 0) -> tuple[OperationRecord, bool]:
    """The record after an apply (at commands stream ``sequence``, 0: unknown), and whether it changed (a new
    operation, a new spec: generation + 1, or only a newer sequence). An apply older than the one the record holds
    is stale (delivered again behind newer commands): not applied. One that changes nothing still moves the
    sequence on: it is the user's last word, and an older command delivered again behind it is stale. A
    ``spec.dataset`` without a namespace is kept as the operation's namespace (``DatasetRef``), so the record says
    which dataset it is."""
    if load is not None and not load.dataset.namespace:
        load = msgspec.structs.replace(load, dataset=DatasetRef(name=load.dataset.name, namespace=meta.namespace))
    if clean is not None and not clean.dataset.namespace:
        clean = msgspec.structs.replace(clean, dataset=DatasetRef(name=clean.dataset.name, namespace=meta.namespace))
    if record is None:
        return taken_in(OperationRecord(kind=kind, metadata=meta, load=load, clean=clean, generation=1,
                                        created_at=rfc3339(now), command_sequence=sequence)), True
    if sequence and sequence < record.command_sequence:
        return record, False
    newer = max(record.command_sequence, sequence)
    if record.metadata == meta and record.load == load and record.clean == clean:
        if newer != record.command_sequence:
            return msgspec.structs.replace(record, command_sequence=newer), True
        return record, False
    spec_changed = record.load != load or record.clean != clean
    return taken_in(msgspec.structs.replace(record, metadata=meta, load=load, clean=clean, command_sequence=newer,
                                            generation=record.generation + (1 if spec_changed else 0))), True


def taken_in(record: OperationRecord) -> OperationRecord:
    """The record with its spec marked seen (``status.observedGeneration``) when the apply alone puts it in effect: a
    Cron or OnEvent load's next firing or sync runs the new spec (its schedule counts from ``lastScheduleTime`` at
    once), and no run starts for the apply, so waiting for its next run to show the new generation left clients that
    compare the two (``kubectl wait``, kstatus) thinking the edit unseen until then, hours maybe. A Once load's (and
    a clean's) moves only when a run of the spec starts: an older value is how ``due`` knows the new spec must run.
    """
    if record.load is None or record.load.policy == "Once" or record.status.observed_generation == record.generation:
        return record
    return msgspec.structs.replace(record, status=msgspec.structs.replace(record.status,
                                                                          observed_generation=record.generation))


def stale_command(record: OperationRecord | None, sequence: int, deleted: int, action: str) -> str | None:
    """Why a command (``action``: apply or delete) at commands stream ``sequence`` (0: unknown) is not applied,
    as it came before the last word on its operation: an apply of an operation a later delete (at ``deleted``)
    removed, or a delete of an operation a later command applied. None: it is not stale."""
    if not sequence:
        return None
    if record is None and sequence < deleted:
        return (f"it was deleted by a later command (stream sequence {deleted}); this {action} (sequence "
                f"{sequence}) came before it: apply it again to recreate")
    if record is not None and action == "delete" and sequence < record.command_sequence:
        return (f"it was applied by a later command (stream sequence {record.command_sequence}); this delete "
                f"(sequence {sequence}) came before it: delete it again to remove it")
    return None


# --- Checks of a run against the current state ---


@dataclass(frozen=True)
class Cluster:
    """What a run needs to know of its dataset and runtime (None: they do not exist)."""

    dataset: DatasetRecord | None
    runtime: RuntimeRecord | None


def ring_of(runtime: RuntimeRecord) -> list[str]:
    """The brief's ring: ready cache workers that serve peers."""
    return [w.node for w in runtime.status.workers if w.ready and w.peer_url]


def clean_nodes(runtime: RuntimeRecord) -> list[str]:
    """Every node that may hold cache of the dataset: ready nodes and every picked worker."""
    return sorted(set(runtime.status.ready_nodes) | {w.node for w in runtime.status.workers})


def dataset_wait(record: OperationRecord, cluster: Cluster) -> str | None:
    """What a due run of ``record`` waits for (Pending, ``waitingFor``) before it starts, or None to start it.

    Its dataset to exist, to be Bound (its runtime applied and ready) and listed once, as Fluid's controllers
    requeue an operation whose dataset is missing or not bound: a DataLoad applied with its Dataset and runtime (one
    file, or a folder where dataload.yaml sorts before dataset.yaml) is decided before the first listing ends, and
    failing it then left a Once load Failed for good. What waiting does not cure is ``run_problem``'s to fail: a
    dataset of another namespace, a Failed dataset, a reference, replicas above the workers."""
    ref = dataset_ref(record)
    name = f"{ref.namespace}/{ref.name}"
    dataset = cluster.dataset
    if other_namespace(record.kind, record.metadata.namespace, ref.namespace):
        return None  # no wait cures it
    if dataset is None:
        return f"dataset {name} to exist and be Bound"
    if dataset.status.phase == "Failed" or reference_of(dataset.dataset) is not None:
        return None
    if dataset.status.phase == "Bound":
        # Bound follows the runtime's readiness, not the listing: a plan needs the manifest of a first listing.
        if not dataset.status.last_sync_time:
            return f"dataset {name} to be listed (its first metadata sync)"
        return workers_wait(record, cluster.runtime, name)
    if cluster.runtime is None:
        return f"dataset {name} to be Bound: apply a runtime named {ref.name} in namespace {ref.namespace}"
    runtime = cluster.runtime.status
    why = f": {runtime.message}" if runtime.message else ""
    return f"dataset {name} to be Bound (runtime {name} is {runtime.phase}{why})"


def workers_wait(record: OperationRecord, runtime: RuntimeRecord | None, name: str) -> str | None:
    """What a DataLoad of a Bound dataset waits for while its runtime's cache workers are not all back after a
    restart, or None. So stands a runtime just after the whole stack restarted (an upgrade in place, ``shoal down``
    and ``up``): the dataset stays Bound and the workers stay picked while their agents start again, and a run due
    then (a Cron load's missed firing, which the loader starts at once) would plan on what is there that moment.

    - Workers picked, none ready (none heard from yet): the run failed with "no ready cache workers" seconds before
      they were back. A runtime with no worker picked at all is no such wait: it fails.
    - A ready worker that serves peers (``CacheWorker.serves_peers``) with no peer URL yet: its agent beats before
      its mount process serves. Planned then, an empty ring put every block on every ready node (twice the cache
      and store traffic of ``replicas: 1`` with two workers), and a ring short of it put its blocks on owners the
      whole ring does not give them to (or failed ``replicas`` above the ring). A runtime none of whose workers
      serves peers (one agent without a peer secret) has no ring to wait for: it plans on the ready nodes."""
    if record.kind != "DataLoad" or runtime is None:
        return None
    starting = peers_starting(runtime)
    if starting:
        return (f"the peer server of cache worker(s) {', '.join(starting)} of runtime {name} to start (ready, "
                f"no peer URL yet)")
    if runtime.status.ready_nodes or ring_of(runtime):
        return None
    picked = [worker.node for worker in runtime.status.workers]
    if not picked:
        return None
    return f"a cache worker of runtime {name} to be ready ({', '.join(picked)} picked, none heard from yet)"


def peers_starting(runtime: RuntimeRecord) -> list[str]:
    """The ready cache workers whose agents serve peers but whose mounts have no peer URL yet (starting): the ring
    is short of them."""
    return sorted(w.node for w in runtime.status.workers if w.ready and w.serves_peers and not w.peer_url)


def waited_too_long(since: float, now: float, timeout: float) -> bool:
    """Whether a run waiting for its dataset since ``since`` has waited ``timeout`` seconds (it then fails)."""
    return now - since >= timeout


def dataset_wait_failure(record: OperationRecord, cluster: Cluster, why: str, timeout: float) -> str:
    """The message of a run that waited ``timeout`` seconds for its dataset (``why``, from ``dataset_wait``): what
    it waited for, and what to change (``run_problem``'s words where it has them)."""
    problem = run_problem(record, cluster)
    waited = f"waited {timeout:g} s for {why}"
    return f"{problem} ({waited})" if problem else f"{waited}; check the dataset's status and its runtime"


def run_problem(record: OperationRecord, cluster: Cluster) -> str | None:
    """Why a run of ``record`` cannot start now (the run fails with this message), or None."""
    ref = dataset_ref(record)
    name = f"{ref.namespace}/{ref.name}"
    # A record applied before other namespaces were refused at apply: refused at its next run instead.
    if problem := other_namespace(record.kind, record.metadata.namespace, ref.namespace):
        return problem
    if cluster.dataset is None:
        return f"dataset {name} does not exist; create it or fix spec.dataset"
    if (source := reference_of(cluster.dataset.dataset)) is not None:
        return (f"dataset {name} is a reference to {source.namespace}/{source.name}, whose cache it reads; run a "
                f"{record.kind} of namespace {source.namespace} on {source.name} (spec.dataset) instead")
    status = cluster.dataset.status
    if status.phase == "Failed":
        # Its own message says what to fix (a missing secret, a bucket that does not exist): a runtime is no cure.
        return (f"dataset {name} is Failed, not Bound: {status.message or 'its last sync failed'}; fix that, then "
                f"resync or apply the dataset again")
    if status.phase != "Bound":
        if cluster.runtime is not None:
            runtime = cluster.runtime.status
            why = f": {runtime.message}" if runtime.message else ""
            return (f"dataset {name} is {status.phase}, not Bound: runtime {name} is {runtime.phase}{why}; wait "
                    f"for the dataset to be Bound")
        return (f"dataset {name} is {status.phase}, not Bound; apply a runtime named {ref.name} "
                f"in namespace {ref.namespace} and wait for the dataset to be Bound")
    if cluster.runtime is None:
        return f"runtime {name} does not exist; apply a runtime named {ref.name} in namespace {ref.namespace}"
    if record.kind == "DataClean":
        if not clean_nodes(cluster.runtime):
            return f"runtime {name} has no ready nodes; nothing can be cleaned until an agent serves it"
        return None
    load = record.load
    assert load is not None
    ring = ring_of(cluster.runtime)
    nodes = ring or list(cluster.runtime.status.ready_nodes)
    if not nodes:
        return f"runtime {name} has no ready cache workers; start an agent for it or wait until one is ready"
    most = max((t.replicas for t in load.target), default=1)
    if most > len(nodes):
        # Said as the plan counts them: the ring's members, or every ready node without a ring. A worker picked but
        # out of the ring (silent, restarting) is named, or "add cache workers" sends the user to scale a runtime
        # whose workers are all there. Without a ring a ready worker is not waited for: it serves no peers (one agent
        # alone runs no peer server, as `make run`'s), so only more nodes give a block more holders.
        workers = cluster.runtime.status.workers
        if ring:
            counted = f"ready cache worker(s) of runtime {name} ({', '.join(sorted(nodes))})"
            waiting = sorted(w.node for w in workers if w.node not in ring)
            more = "add cache workers"
        else:
            counted = (f"ready node(s) of runtime {name} ({', '.join(sorted(nodes))}), none of whose cache workers "
                       f"serves peers (each node loads for itself)")
            waiting = sorted(w.node for w in workers if not w.ready)
            more = "add nodes"
        also = f"; picked but not ready: {', '.join(waiting)}" if waiting else ""
        return (f"replicas {most} is more than the {len(nodes)} {counted}{also}; lower spec.target[].replicas to at "
                f"most {len(nodes)}, {'wait for those not ready, ' if waiting else ''}or {more}")
    return None


# --- Targets and the OnEvent diff ---


def files_of(entries: Iterable[ManifestEntry]) -> list[ManifestEntry]:
    return [e for e in entries if not is_folder(e.path)]


def select(entries: Sequence[ManifestEntry],
           targets: Sequence[TargetPath | CleanTarget]) -> tuple[dict[int, int], list[str]]:
    """Which entries (index → replicas) the targets name, and the target paths that name nothing.

    No targets: every file, one replica. An entry named by several targets gets the largest replicas (a clean's
    targets have none: one).
    """
    if not targets:
        return {i: 1 for i, e in enumerate(entries) if not is_folder(e.path)}, []
    # Each target is two binary searches in the sorted paths, not a scan of the manifest: a load naming 1,000 files
    # of a 100k-file dataset scanned 10^8 entries (~50 s, in the loader's event loop).
    by_index = [entry.path for entry in entries]
    order = sorted(range(len(by_index)), key=by_index.__getitem__)
    paths = [by_index[i] for i in order]
    chosen: dict[int, int] = {}
    missing = []
    for target in targets:
        hit = False
        for position in itertools.chain(*selected_spans(paths, target.path)):
            hit = True  # a folder marker proves the folder exists, even if empty
            if not is_folder(paths[position]):
                index = order[position]
                replicas = target.replicas if isinstance(target, TargetPath) else 1
                chosen[index] = max(chosen.get(index, 0), replicas)
        if not hit:
            missing.append(target.path)
    return chosen, missing


def missing_message(missing: Sequence[str], dataset: ObjectRef) -> str:
    paths = ", ".join(repr(p) for p in missing)
    return (f"target path {paths} is not in the manifest of dataset {dataset.namespace}/{dataset.name}; fix "
            f"spec.target (paths are '/<mountPoint name>/<path>', as the mount shows them) or resync the dataset")


def changed_entries(old: Iterable[ManifestEntry], new: Sequence[ManifestEntry]) -> list[ManifestEntry]:
    """OnEvent: entries of ``new`` whose (mount, key, etag) was not in ``old`` (new or overwritten objects)."""
    seen = {(e.mount, e.key, e.etag) for e in old}
    return [e for e in new if (e.mount, e.key, e.etag) not in seen]


# --- The plan ---


class PlannedFile(msgspec.Struct, frozen=True, array_like=True):
    mount: int
    key: str
    etag: str
    size: int
    # A load's copies of each block (its target's ``replicas``), so blocks are planned again on a ring that grew
    # (``replan_load``); 0 in a plan saved before it was kept.
    replicas: int = 0


class PlannedPart(msgspec.Struct, frozen=True, kw_only=True):
    task: NodeTask
    # For each entry of task.blocks (or task.files): the index of its file in Plan.files.
    file_ids: list[int] = []
    blocks: int = 0
    bytes_total: int = 0


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """A run's parts; saved next to the run state so a restarted loader republishes the same tasks."""

    run: str
    files: list[PlannedFile] = []
    parts: list[PlannedPart] = []


def _encoded(file: CachedFile) -> int:
    return len(msgspec.json.encode(file)) + 1


def _chunks(items: list[tuple[int, CachedFile]]) -> list[list[tuple[int, CachedFile]]]:
    """Cut one node's (file id, blocks) list into parts of at most MAX_PART_BLOCKS blocks / ~MAX_PART_BYTES."""
    parts: list[list[tuple[int, CachedFile]]] = []
    current: list[tuple[int, CachedFile]] = []
    blocks = size = 0
    for file_id, file in items:
        pending = list(file.blocks)
        while pending:
            room_blocks = MAX_PART_BLOCKS - blocks
            piece = CachedFile(file.mount, file.key, file.etag, pending[:max(1, room_blocks)])
            # Shrink the piece until it fits the byte budget (a key is at most ~1 KiB, so this ends fast).
            while len(piece.blocks) > 1 and size + _encoded(piece) > MAX_PART_BYTES:
                piece = CachedFile(file.mount, file.key, file.etag, piece.blocks[:len(piece.blocks) // 2])
            if current and (blocks + len(piece.blocks) > MAX_PART_BLOCKS or size + _encoded(piece) > MAX_PART_BYTES):
                parts.append(current)
                current, blocks, size = [], 0, 0
                continue
            current.append((file_id, piece))
            blocks += len(piece.blocks)
            size += _encoded(piece)
            pending = pending[len(piece.blocks):]
    if current:
        parts.append(current)
    return parts


def plan_load(run: str, dataset: ObjectRef, entries: Sequence[ManifestEntry], chosen: dict[int, int],
              ring_nodes: Sequence[str], ready_nodes: Sequence[str], block_size: int) -> Plan:
    """Every block of the chosen entries to ``replicas`` owners on the ring (or to every ready node without a
    ring), grouped per node into parts. Empty files have no blocks and are not in the plan."""
    ring_set = sorted(set(ring_nodes))
    everyone = sorted(set(ready_nodes))
    files: list[PlannedFile] = []
    per_node: dict[str, list[tuple[int, CachedFile]]] = {}
    for index in sorted(chosen, key=lambda i: (entries[i].mount, entries[i].key, entries[i].etag, i)):
        entry = entries[index]
        count = block_count(entry.size, block_size)
        if count == 0:
            continue
        file_id = len(files)
        files.append(PlannedFile(entry.mount, entry.key, entry.etag, entry.size, chosen[index]))
        node_blocks: dict[str, list[tuple[int, int]]] = {}
        for block in range(count):
            size = block_span(entry.size, block_size, block)[1]
            name = BlockId(entry.mount, entry.key, entry.etag, block).name
            holders = ring.owners(name, ring_set, chosen[index]) if ring_set else everyone
            for node in holders:
                node_blocks.setdefault(node, []).append((block, size))
        for node, blocks in node_blocks.items():
            per_node.setdefault(node, []).append((file_id, CachedFile(entry.mount, entry.key, entry.etag, blocks)))
    pieces = [(node, chunk) for node in sorted(per_node) for chunk in _chunks(per_node[node])]
    parts = []
    for number, (node, chunk) in enumerate(pieces):
        task = NodeTask(id=f"{run}.{number}", run=run, part=number, parts=len(pieces), node=node, dataset=dataset,
                        action="load", blocks=[file for _, file in chunk])
        parts.append(PlannedPart(task=task, file_ids=[file_id for file_id, _ in chunk],
                                 blocks=sum(len(f.blocks) for _, f in chunk),
                                 bytes_total=sum(size for _, f in chunk for _, size in f.blocks)))
    return Plan(run=run, files=files, parts=parts)


def replan_load(plan: Plan, ring_nodes: Sequence[str], cleaned: Container[tuple[int, str]] = frozenset()) -> Plan:
    """The plan with parts added for the blocks whose owners on ``ring_nodes`` (a ring that grew while the load
    runs: a cache worker added) have no part of them yet, numbered after its parts; the same plan when there are
    none. Readers ask a block's current owners, so without them those blocks were never loaded where they are
    looked for. The old owners' parts stay as they are: a block they load that is no longer theirs is one more
    copy, evicted like any other. Deterministic, as ``plan_load``: the same plan and ring give the same parts.

    No part is added for the files ``cleaned`` names (``(mount, key)``, ``cleaned_files``): a DataClean that started
    after the load evicts them, and parts added now would reach their nodes after the clean's, loading them back
    behind it."""
    holders: dict[tuple[int, int], set[str]] = {}
    sizes: dict[tuple[int, int], int] = {}
    for planned in plan.parts:
        for file_id, file in zip(planned.file_ids, planned.task.blocks, strict=True):
            for block, size in file.blocks:
                holders.setdefault((file_id, block), set()).add(planned.task.node)
                sizes[(file_id, block)] = size
    ring_set = sorted(set(ring_nodes))
    per_node: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for (file_id, block), nodes in sorted(holders.items()):
        planned_file = plan.files[file_id]
        if (planned_file.mount, planned_file.key) in cleaned:
            continue
        name = BlockId(planned_file.mount, planned_file.key, planned_file.etag, block).name
        # A plan saved before ``replicas`` was kept gave each block that many holders (none was added since).
        for node in ring.owners(name, ring_set, planned_file.replicas or len(nodes)):
            if node not in nodes:
                per_node.setdefault(node, {}).setdefault(file_id, []).append((block, sizes[(file_id, block)]))
    if not per_node:
        return plan
    pieces = [(node, chunk) for node in sorted(per_node)
              for chunk in _chunks([(file_id, CachedFile(plan.files[file_id].mount, plan.files[file_id].key,
                                                         plan.files[file_id].etag, blocks))
                                    for file_id, blocks in sorted(per_node[node].items())])]
    total = len(plan.parts) + len(pieces)
    added = []
    for number, (node, chunk) in enumerate(pieces, start=len(plan.parts)):
        first = plan.parts[0].task
        task = NodeTask(id=f"{plan.run}.{number}", run=plan.run, part=number, parts=total, node=node,
                        dataset=first.dataset, action="load", blocks=[file for _, file in chunk])
        added.append(PlannedPart(task=task, file_ids=[file_id for file_id, _ in chunk],
                                 blocks=sum(len(f.blocks) for _, f in chunk),
                                 bytes_total=sum(size for _, f in chunk for _, size in f.blocks)))
    return msgspec.structs.replace(plan, parts=[*plan.parts, *added])


def plan_clean(run: str, dataset: ObjectRef, entries: Sequence[ManifestEntry] | None,
               nodes: Sequence[str]) -> Plan:
    """A part per node (more when the files do not fit one): the target files' (mount, key), or everything."""
    action: TaskAction = "clean"
    files: list[PlannedFile] = []
    if entries is not None:
        seen: set[tuple[int, str]] = set()
        for entry in sorted(files_of(entries), key=lambda e: (e.mount, e.key)):
            if (entry.mount, entry.key) not in seen:
                seen.add((entry.mount, entry.key))
                files.append(PlannedFile(entry.mount, entry.key, "", entry.size))
    chunks: list[list[int]] = []
    size = 0
    current: list[int] = []
    for file_id, file in enumerate(files):
        cost = len(msgspec.json.encode([file.mount, file.key])) + 1
        if current and (len(current) >= MAX_PART_BLOCKS or size + cost > MAX_PART_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(file_id)
        size += cost
    if current:
        chunks.append(current)
    pieces: list[tuple[str, list[int] | None]] = []
    for node in sorted(set(nodes)):
        if entries is None:
            pieces.append((node, None))
        else:
            pieces += [(node, chunk) for chunk in chunks]
    parts = []
    for number, (node, chunk) in enumerate(pieces):
        task = NodeTask(id=f"{run}.{number}", run=run, part=number, parts=len(pieces), node=node, dataset=dataset,
                        action=action, everything=chunk is None,
                        files=[(files[i].mount, files[i].key) for i in chunk or []])
        parts.append(PlannedPart(task=task, file_ids=list(chunk or [])))
    return Plan(run=run, files=files, parts=parts)


# --- Run state and progress ---


class PartState(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    node: str
    blocks: int = 0
    bytes_total: int = 0
    blocks_done: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    # Which of the part's files are done, as ``files_bits`` spells them: 336 characters for a part of 2,000 files,
    # where a list of their numbers took 11 KB and a run of ~230k small files outgrew its one KV value.
    files_done_bits: str = ""
    # A state saved by an older loader lists them here; read (``part_files_done``), then written as bits.
    files_done: list[int] = []
    failed: int = 0
    message: str = ""
    done: bool = False
    # Ended by the loader, not its node: the node left the ring with the part not done, and its blocks were planned
    # again on the ring as it is now (``move_parts``). Its node was told to stop it (``TaskPartsCancel``).
    moved: bool = False


def files_bits(indexes: Iterable[int]) -> str:
    """File indexes as a bitmap (bit i is byte i // 8, least significant bit first), base64, trailing zero bytes
    left out. Indexes outside a part (negative, or past ``MAX_PART_BLOCKS``: every file in a part has a block
    there) are not kept: a report naming one cannot make the value grow."""
    value = 0
    for index in indexes:
        if 0 <= index < MAX_PART_BLOCKS:
            value |= 1 << index
    return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "little")).decode() if value else ""


def part_files_done(part: PartState) -> set[int]:
    """The indexes of the part's files done (``files_done_bits``, and the list of a state saved before it)."""
    value = int.from_bytes(base64.b64decode(part.files_done_bits), "little") if part.files_done_bits else 0
    return {i for i in range(value.bit_length()) if value >> i & 1} | set(part.files_done)


RunStage = Literal["planning", "metadata", "executing", "finished"]
_STATE_ENCODER = msgspec.json.Encoder()


class RunState(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The loader's state of an operation (KV ``shoal_operation_runs``, key ``operation_key``): the current run,
    its parts' progress, and what decides the next run."""

    run: str = ""
    stage: RunStage = "finished"
    started_at: float = 0.0
    # loadMetadata: the dataset's resync counter to wait for, and until when.
    resync_requests: int = 0
    deadline: float = 0.0
    ring: list[str] = []
    # OnEvent runs fired by a sync load only the entries new or changed since the last Complete run's manifest.
    changes_only: bool = False
    files_total: int = 0
    parts: list[PartState] = []
    # Runs asked for with dataload.run.v1 and not started yet, and the commands stream's sequence of the last such
    # command counted (one delivered again after it was counted, its fact unpublished, is not counted twice).
    requested: int = 0
    run_command_sequence: int = 0
    # OnEvent: the dataset's (syncedGeneration, syncedRequests, lastSyncTime) the last run looked at.
    sync_stamp: str = ""
    # A finished run's end, saved with the finished stage before the record is written: a record left Executing
    # (that write failed, or the loader was killed between the two) is brought to this end later (``unclosed``).
    outcome: OperationPhase | None = None
    outcome_message: str = ""
    finished_at: float = 0.0
    # When (the loader's clock) a part's progress last changed: a run quiet since is stalled (``fold_progress``).
    moved_at: float = 0.0
    # The incarnation of the dataset the run started on (``DatasetRecord.incarnation``; "" for a state saved before
    # it was kept): a dataset deleted, or deleted and applied again, while the run works ends it (``dataset_lost``).
    dataset_incarnation: str = ""
    # The dataset (``ns/name``) the run started on ("" for a state saved before it was kept): the operation applied
    # again naming another one ends the run (``dataset_lost``).
    dataset: str = ""
    # OnEvent: the incarnation of the dataset whose manifest is the baseline (``subjects.loader_manifest``, saved by
    # the last Complete run). A sync of another incarnation loads the whole target (``changes_only``).
    baseline_incarnation: str = ""
    # A load's block size as planned (the runtime's ``blockSize`` then; 0 for a clean, or a state saved before it
    # was kept): the runtime applied again with another one ends the run (``block_size_changed``).
    block_size: int = 0


def files_planned(plan: Plan, entries: Sequence[ManifestEntry]) -> int:
    """The run's ``files_total``: the files its plan names, and for a clean of everything the dataset's files (the
    manifest's ``entries``), which its parts do not name. A clean's was 0, and its progress said nothing of them."""
    if any(planned.task.everything for planned in plan.parts):
        return len(files_of(entries))
    return len(plan.files)


def parts_state(plan: Plan) -> list[PartState]:
    return [PartState(node=p.task.node, blocks=p.blocks, bytes_total=p.bytes_total) for p in plan.parts]


def state_problem(plan: Plan) -> str | None:
    """Why the run of ``plan`` cannot start: the progress of its parts, every count at its largest, every file done
    and the run's one message, could outgrow the one KV value that keeps it (``RUN_STATE_BYTES``). None when it fits.
    Checked before the run starts: a state that no longer fits mid-run could not be saved, and the run would stall."""
    # One message at most (``fold_into``), every character of it escaped in JSON at worst.
    worst = 6 * MAX_ERROR_CHARS
    for planned in plan.parts:
        count = max(planned.blocks, len(planned.file_ids), 1)
        worst += len(_STATE_ENCODER.encode(PartState(
            node=planned.task.node, blocks=count, bytes_total=planned.bytes_total, blocks_done=count,
            bytes_done=planned.bytes_total, bytes_skipped=planned.bytes_total,
            files_done_bits=files_bits(range(len(planned.file_ids))), failed=count, done=True))) + 1
        if worst > RUN_STATE_BYTES:
            break
    if worst <= RUN_STATE_BYTES:
        return None
    blocks = sum(p.blocks for p in plan.parts)
    what = f"{blocks:,} blocks of {len(plan.files):,} files" if blocks else f"{len(plan.files):,} files"
    return (f"the run is too large for one operation: {len(plan.parts):,} parts ({what}), whose progress would "
            f"outgrow the {RUN_STATE_BYTES // 1024} KiB the loader keeps per run (one NATS KV value, at most 1 MiB); "
            "split it into several operations, each naming some of the dataset's folders in spec.target")


def fold_part(part: PartState, progress: TaskProgress) -> PartState:
    """Cumulative progress: never goes back (a late, older report changes nothing), and done sticks. A final report
    counting less than an earlier one (a later delivery of the part cancelled before it got as far, or given up by
    an agent that could not tell what the earlier ones did) ends the part with the counts kept: those blocks were
    done, and the run's progress must not drop."""
    if part.done:
        return part
    if progress.bytes_done + progress.bytes_skipped < part.bytes_done + part.bytes_skipped:
        if not progress.done:
            return part
        return msgspec.structs.replace(
            part, files_done_bits=files_bits(part_files_done(part) | set(progress.files_done)), files_done=[],
            failed=progress.failed, message=cut_error(progress.message), done=True)
    return msgspec.structs.replace(
        part, blocks_done=progress.blocks_done, bytes_done=progress.bytes_done, bytes_skipped=progress.bytes_skipped,
        files_done_bits=files_bits(progress.files_done), files_done=[], failed=progress.failed,
        message=cut_error(progress.message), done=progress.done,
        # A clean's total is the mount process's to say (what it found cached to free): the plan has none.
        bytes_total=max(part.bytes_total, progress.bytes_total))


def fold_into(parts: Sequence[PartState], index: int, progress: TaskProgress) -> list[PartState] | None:
    """The parts with ``progress`` folded into part ``index`` (``fold_part``); None when that changes nothing.

    One part at most keeps a message, the first failed part to report one (``outcome`` makes it the run's message):
    the state holds every part in one KV value, and a store failing every part would otherwise put a message of up
    to ``MAX_ERROR_CHARS`` on each. The agents log every part's own reason."""
    part = fold_part(parts[index], progress)
    if part.message and (not part.failed or any(p.message for i, p in enumerate(parts) if i != index)):
        part = msgspec.structs.replace(part, message="")
    if part == parts[index]:
        return None
    folded = list(parts)
    folded[index] = part
    return folded


def files_done(plan: Plan, parts: Sequence[PartState], files_total: int = 0) -> int:
    """Files all of whose parts report them done. A clean's: files all of whose parts are done with no block
    failed (its mount processes count a clean's freed blocks, not its files); a clean of everything names no file,
    and its ``files_total`` files are done once every part is."""
    if any(planned.task.action == "clean" for planned in plan.parts):
        if any(planned.task.everything for planned in plan.parts):
            return files_total if all(part.done and not part.failed for part in parts) else 0
        parts = [msgspec.structs.replace(state, files_done=[], files_done_bits=(
                     files_bits(range(len(planned.file_ids))) if state.done and not state.failed else ""))
                 for planned, state in zip(plan.parts, parts, strict=True)]
    wanted: dict[int, int] = {}
    got: dict[int, int] = {}
    for planned, state in zip(plan.parts, parts, strict=True):
        done = part_files_done(state)
        for index, file_id in enumerate(planned.file_ids):
            wanted[file_id] = wanted.get(file_id, 0) + 1
            if index in done:
                got[file_id] = got.get(file_id, 0) + 1
    return sum(1 for file_id, count in wanted.items() if got.get(file_id, 0) == count)


def stalled(state: RunState, now: float) -> bool:
    """No part of the run has reported progress for ``STALLED_SECONDS`` (since it started, or the last report)."""
    return now - max(state.moved_at, state.started_at) >= STALLED_SECONDS


def fold_progress(state: RunState, files_finished: int, now: float, ended: bool = False) -> Progress:
    """The run's Progress: bytes done (including skipped ones) over the run, per node, the rate and the ETA.

    The rate is the average over the run (bytes fetched / seconds since it started; at its end, over its duration).
    A run that ``ended`` (Complete or Failed, every part done or not) has no ETA. A stalled run (``stalled``) shows
    rate 0 and no ETA: the last report's numbers would promise an end that is not coming."""
    done = sum(p.bytes_done for p in state.parts)
    skipped = sum(p.bytes_skipped for p in state.parts)
    total = sum(p.bytes_total for p in state.parts)
    elapsed = max(now - state.started_at, 1e-3)
    ended = ended or all(p.done for p in state.parts)
    rate = 0.0 if not ended and stalled(state, now) else done / elapsed
    remaining = max(0, total - done - skipped)
    eta = remaining / rate if rate > 0 and remaining > 0 and not ended else None
    nodes: dict[str, tuple[int, int, bool, bool]] = {}
    for part in state.parts:
        node_done, node_total, finished, moved = nodes.get(part.node, (0, 0, True, False))
        nodes[part.node] = (node_done + part.bytes_done + part.bytes_skipped, node_total + part.bytes_total,
                            finished and part.done, moved or part.moved)
    return Progress(files_done=files_finished, files_total=state.files_total, bytes_done=done + skipped,
                    bytes_total=total, bytes_skipped=skipped, rate_bytes_per_second=round(rate, 1),
                    eta_seconds=None if eta is None else round(eta, 1),
                    # Moved: its parts all ended, some by the loader's move, not by the node.
                    nodes=[NodeProgress(node=n, bytes_done=d, bytes_total=t, done=f, moved=f and m)
                           for n, (d, t, f, m) in sorted(nodes.items())])


def nodes_gone(state: RunState, runtime: RuntimeRecord | None) -> list[str]:
    """Nodes with parts not done that the runtime no longer lists as ready (neither a ready node nor a ready cache
    worker): their parts cannot end until they come back."""
    if runtime is None:
        here: set[str] = set()
    else:
        here = set(runtime.status.ready_nodes) | {w.node for w in runtime.status.workers if w.ready}
    return sorted({part.node for part in state.parts if not part.done} - here)


def idle_task_streams(streams: Iterable[str], runtimes: Iterable[RuntimeRecord], runs: Iterable[RunState],
                      absent_since: Mapping[str, float], now: float, grace: float
                      ) -> tuple[list[str], dict[str, float]]:
    """Which of the nodes with a task stream (``streams``) to delete the stream of now, and since when each of the
    others has been gone (the next ``absent_since``; ``now`` and ``grace`` in the same clock).

    A node is gone while no runtime may hold cache on it (``clean_nodes``: neither a ready node nor a picked worker,
    ready or not; a worker stays picked until its agent's record expires, a minute after its last heartbeat), timed
    from the first look that saw it so. Its stream goes once it has been gone for ``grace`` and no run that has not
    finished has a part of it not done: such a part waits for the node (a load's fails it after the node-gone
    timeout, a clean's after the node-silent one). A node back in a runtime is timed afresh if it goes again; its
    stream, once deleted, is made again before its next part (``Bus.provision_node_tasks``). The nodes to delete
    stay in the times returned: the caller forgets each once its stream is deleted (one not deleted yet is not timed
    again)."""
    nodes = set(streams)
    present: set[str] = set()
    for runtime in runtimes:
        present |= nodes.intersection(runtime.status.ready_nodes)
        present |= nodes.intersection(worker.node for worker in runtime.status.workers)
    busy = {part.node for state in runs if state.stage != "finished" for part in state.parts if not part.done}
    since = {node: absent_since.get(node, now) for node in sorted(nodes - present)}
    return [node for node, at in since.items() if now - at >= grace and node not in busy], since


def absent_message(record: OperationRecord, absent: Mapping[str, float]) -> str:
    """What an Executing run says while nodes with parts not done are absent (``nodes_gone``), each with the time it
    was first seen so (``absent``: node → seconds since the epoch); empty while none is. A clean's parts on a node
    whose agent is gone wait without a word until the node-silent timeout fails the run, and a load's until the
    node-gone one: the status says which nodes it waits for, and since when, as soon as that is known."""
    if not absent:
        return ""
    ref = dataset_ref(record)
    nodes = ", ".join(f"{node} (since {rfc3339(since)})" for node, since in sorted(absent.items()))
    if len(absent) == 1:
        return (f"waiting for node {nodes}: not a ready node of runtime {ref.namespace}/{ref.name} (its agent gone "
                f"or not ready), with its part of the run not done")
    return (f"waiting for nodes {nodes}: not ready nodes of runtime {ref.namespace}/{ref.name} (their agents gone "
            f"or not ready), with their parts of the run not done")


def unwaited_mounts(mounts: Iterable[tuple[str, str]], operations: Mapping[str, OperationRecord],
                    runs: Mapping[str, RunState]) -> set[tuple[str, str]]:
    """Which of ``mounts`` (dataset ``ns/name``, node) no executing run's parts not done wait on: the mounts whose
    silence no longer matters. It stops as soon as every mount is found waited on: with hundreds of runs of one
    dataset executing, it looks at a few of them, not all of them at each run's end."""
    left = set(mounts)
    for key, state in runs.items():
        if not left:
            break
        record = operations.get(key)
        if record is None or state.stage != "executing":
            continue
        ref = dataset_ref(record)
        dataset = f"{ref.namespace}/{ref.name}"
        if not any(mount[0] == dataset for mount in left):
            continue
        left -= {(dataset, part.node) for part in state.parts if not part.done}
    return left


def dataset_lost(record: OperationRecord, state: RunState, dataset: DatasetRecord | None) -> str | None:
    """Why a run that started (loadMetadata, planning, executing) cannot go on: its dataset was deleted, or deleted and
    applied again (a new incarnation, with its own manifest and mounts). Its parts would wait for mounts that are
    gone, or describe a dataset that is no more. None while the dataset the run started on is there.

    Also when the operation was applied again naming another dataset (``spec.dataset``): the run's parts are the
    old dataset's, and every check of the run (this one, its runtime's nodes, its mounts' silence) would look at the
    new one, failing it for a deletion nobody made."""
    if state.stage == "finished":
        return None
    ref = dataset_ref(record)
    if state.dataset and state.dataset != f"{ref.namespace}/{ref.name}":
        return (f"spec.dataset changed from {state.dataset} to {ref.namespace}/{ref.name} while this run was working "
                f"on {state.dataset}; its parts were cancelled; the next run works on {ref.namespace}/{ref.name}")
    if dataset is not None and (not state.dataset_incarnation or dataset.incarnation == state.dataset_incarnation):
        return None
    again = " (and applied again)" if dataset is not None else ""
    return (f"dataset {ref.namespace}/{ref.name} was deleted{again} while this run was working; its parts were "
            f"cancelled; run the {record.kind} again on the dataset as it is now")


def scaled_in(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> list[str]:
    """The nodes of the ring an executing load was planned on, with a part not done, that are no longer among the
    runtime's cache workers (the runtime was scaled in, or another node picked in its place, as the scheduler does
    once a worker's agent is gone). Their blocks are owned by others now (``ring_shrank`` plans them again there): their
    parts not done are moved to the ring as it is now (``moved_parts``, ``replan_load``). One that still serves (a
    ready node) would go on fetching into a cache no reader's route looks in; one that does not (its agent gone) was
    waited for until ``NODE_GONE_SECONDS`` and failed the load, though its blocks were planned on the ring already.
    Without a ring to move them to, a ready one fails the run (``ring_left``) and one not ready is moved all the same
    (``stranded``), its blocks planned once a ring is back (``ring_awaited``)."""
    if record.load is None or state.stage != "executing" or not state.ring:
        return []
    workers = {worker.node for worker in runtime.status.workers}
    pending = {part.node for part in state.parts if not part.done and part.node in state.ring}
    return sorted(pending - workers)


def stranded(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> list[str]:
    """The nodes scaled in (``scaled_in``) that are not ready, while the runtime has no ring (its workers not ready,
    or their peer servers starting): their parts are moved at once (``moved_parts``), as with a ring left. Such a
    node is no worker any more, so its part was never to end there: it was waited for until ``NODE_GONE_SECONDS``
    failed the load, though a ring back a moment later (a worker's agent restarted) would have taken its blocks.
    Their blocks are planned when a ring is back (``ring_shrank``); until then the run waits (``ring_awaited``)."""
    if ring_of(runtime):
        return []
    ready = set(runtime.status.ready_nodes)
    return [node for node in scaled_in(record, state, runtime) if node not in ready]


def ring_awaited(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> list[str]:
    """The nodes whose parts were moved (``stranded``) while the runtime has no ring, their blocks not planned again
    yet (``replan_load`` leaves the ring it plans on in ``RunState.ring``, without them): the run is not Complete
    until a ring takes those blocks, and fails if none comes (``ring_missing``). Empty while the runtime has a ring
    (``ring_shrank`` plans them at the next look)."""
    if record.load is None or state.stage != "executing" or not state.ring or ring_of(runtime):
        return []
    workers = {worker.node for worker in runtime.status.workers}
    return sorted({part.node for part in state.parts if part.moved and part.node in state.ring} - workers)


def ring_awaited_message(record: OperationRecord, nodes: Sequence[str], since: float) -> str:
    """What an Executing load says while the blocks of the parts moved off ``nodes`` wait for a ring
    (``ring_awaited``), since ``since`` (seconds since the epoch)."""
    ref = dataset_ref(record)
    which = "node " if len(nodes) == 1 else "nodes "
    return (f"waiting for a ready cache worker of runtime {ref.namespace}/{ref.name} with a peer URL (since "
            f"{rfc3339(since)}) to take the blocks of {which}{', '.join(nodes)}: no longer a cache worker, its "
            f"parts moved to the ring")


def ring_missing(record: OperationRecord, nodes: Sequence[str], waited: float) -> str:
    """Why a load fails once the blocks of the parts moved off ``nodes`` waited ``waited`` seconds for a ring."""
    ref = dataset_ref(record)
    which = f"node {nodes[0]} is" if len(nodes) == 1 else f"nodes {', '.join(nodes)} are"
    return (f"{which} no longer a cache worker of runtime {ref.namespace}/{ref.name} (scaled in, or another node "
            f"picked) with its part of the load not done, and no ready cache worker was there to take it for "
            f"{waited:.0f} s; run the load again once the runtime has a ready cache worker")


def ring_left(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> str | None:
    """Why an executing load cannot place its blocks: ready nodes were scaled in with parts not done (``scaled_in``)
    and the runtime has no ring left to move them to (no ready cache worker with a peer URL): they would go on
    fetching off the ring. None otherwise: with a ring, their parts are moved to it and the run goes on, as it does
    when those parts finished before a tick saw the smaller ring (``ring_shrank``); a user expects the same outcome
    whichever came first. A node scaled in that is not ready fetches nothing: its parts are moved (``stranded``)."""
    ready = set(runtime.status.ready_nodes)
    left = [node for node in scaled_in(record, state, runtime) if node in ready]
    if not left or ring_of(runtime):
        return None
    ref = dataset_ref(record)
    nodes = ", ".join(left)
    which = f"node {nodes} is" if len(left) == 1 else f"nodes {nodes} are"
    return (f"{which} no longer a cache worker of runtime {ref.namespace}/{ref.name} (scaled in, or another node "
            f"picked) with its part of the load not done, and no ready cache worker is left to take it: its blocks "
            f"would be cached off the workers that readers ask; its parts were cancelled; run the load again once "
            f"the runtime has a ready cache worker")


def moved_parts(state: RunState, nodes: Container[str]) -> list[int]:
    """The indexes of the parts not done on ``nodes`` (``scaled_in``): the parts to move."""
    return [index for index, part in enumerate(state.parts) if not part.done and part.node in nodes]


def move_parts(plan: Plan, parts: Sequence[PartState], moved: Iterable[int]) -> list[PartState]:
    """The parts with those ``moved`` ended as moved (``PartState.moved``): done, keeping what their node did (its
    bytes count as done and as planned, so the run's progress reaches its total), every file of theirs left to the
    other parts that name it (``files_done``), no block failed (their blocks are planned again on the ring as it is
    now, ``replan_load``, which fetches a failed one again). A report of theirs arriving later changes nothing
    (``fold_part``: done sticks)."""
    result = list(parts)
    for index in moved:
        part = result[index]
        result[index] = msgspec.structs.replace(
            part, blocks=part.blocks_done, bytes_total=part.bytes_done + part.bytes_skipped, failed=0, message="",
            files_done_bits=files_bits(range(len(plan.parts[index].file_ids))), files_done=[], done=True, moved=True)
    return result


def moved_by_node(state: RunState) -> list[MovedParts]:
    """The run's parts moved (``PartState.moved``), per node, as the record keeps them for the mount processes
    (``OperationRecord.moved_parts``): a node that missed their ``TaskPartsCancel`` stops them at its next look."""
    by_node: dict[str, list[int]] = {}
    for index, part in enumerate(state.parts):
        if part.moved:
            by_node.setdefault(part.node, []).append(index)
    return [MovedParts(run=state.run, node=node, parts=parts) for node, parts in sorted(by_node.items())]


def ring_grew(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> list[str]:
    """The nodes of the runtime's ring (``ring_of``) that are not in the ring an executing load was planned on (a
    cache worker added, ``shoal scale runtime`` up, or autoscaled): some blocks are theirs now, and their parts are
    to be planned (``replan_load``). Empty otherwise, and for a load planned without a ring (every ready node loads
    every block)."""
    if record.load is None or state.stage != "executing" or not state.ring:
        return []
    return sorted(set(ring_of(runtime)) - set(state.ring))


def later_cleans(record: OperationRecord, state: RunState, operations: Mapping[str, OperationRecord],
                 runs: Mapping[str, RunState]) -> list[OperationRecord]:
    """The DataCleans of an executing load's dataset whose run started after the load's run did and sent its parts
    (executing, or finished having run). The loader sends a node its parts in the order the runs start, so each
    node does the load's parts before the clean's and ends empty where the clean names; parts added to the load
    later (its ring changed: ``replan_load``) would reach their nodes after the clean's and load those files back,
    the load finishing last though the user applied the clean after it."""
    if record.load is None or state.stage != "executing":
        return []
    ref = dataset_ref(record)
    found = []
    for key, other in sorted(operations.items()):
        other_state = runs.get(key)
        if (other.clean is None or other_state is None or not other_state.run or dataset_ref(other) != ref
                or other_state.started_at <= state.started_at):
            continue
        if other_state.stage == "executing" or (other_state.stage == "finished" and other.status.progress.nodes):
            found.append(other)
    return found


class CleanGiven(msgspec.Struct, frozen=True, kw_only=True):
    """What a DataClean's run was given to evict, as it planned it (``subjects.loader_cleaned``): every file, or the
    ``(mount, key)`` of the files its target paths named in the manifest of that moment. A load replanned later
    (``cleaned_files``) leaves exactly those files to the clean, whatever the manifest says by then."""

    run: str
    everything: bool = False
    files: list[tuple[int, str]] = []
    # When the run started (``RunState.started_at``; 0 in what an older loader saved).
    started_at: float = 0.0
    # The clean's earlier runs (without their own ``earlier``) that a load executing when this one planned had not
    # started before: a replan of that load leaves their files to them too (``cleaned_files``). Only the last run's
    # were kept, and a clean run twice during a load (its spec changed) had the first run's files loaded back.
    earlier: list[CleanGiven] = []


def clean_given(plan: Plan, started_at: float, previous: CleanGiven | None, since: float | None) -> CleanGiven:
    """What a clean's ``plan`` (``plan_clean``), its run started at ``started_at``, evicts; with the runs of the
    ``previous`` given (its own and its ``earlier``, not this run's) that started after ``since``, the earliest start
    of the loads of the dataset executing now (None: none, and none is kept). A load that starts later is not
    replanned around any of them (``later_cleans``), so what is kept is bounded by the clean's runs during the
    loads executing, and goes at its next run after they end."""
    earlier: list[CleanGiven] = []
    if previous is not None and since is not None:
        runs = [msgspec.structs.replace(previous, earlier=[]), *previous.earlier]
        earlier = [run for run in runs if run.run != plan.run and run.started_at > since]
    return CleanGiven(run=plan.run, everything=any(part.task.everything for part in plan.parts),
                      files=[(file.mount, file.key) for file in plan.files], started_at=started_at, earlier=earlier)


def executing_loads_since(dataset: ObjectRef, operations: Mapping[str, OperationRecord],
                          runs: Mapping[str, RunState]) -> float | None:
    """The earliest start of the runs of DataLoads of ``dataset`` executing now (None when there is none): the
    clean runs after it are the ones a replan of those loads must leave their files to (``clean_given``)."""
    starts = [state.started_at for key, record in operations.items()
              if record.load is not None and dataset_ref(record) == dataset
              and (state := runs.get(key)) is not None and state.stage == "executing"]
    return min(starts) if starts else None


def cleaned_files(plan: Plan, cleans: Sequence[OperationRecord], given: Mapping[str, CleanGiven],
                  entries: Sequence[ManifestEntry], since: float = 0.0) -> set[tuple[int, str]]:
    """The ``(mount, key)`` of the load plan's files that ``cleans`` (``later_cleans``) evict: those each clean's run
    was given (``given``, by operation key: every file for a clean of everything, else the files its target paths
    named when it planned). Matching its target paths against the manifest of now (``entries``) instead mis-applied
    a clean once a sync changed the dataset between the two: a file it evicted that is no longer under its paths (a
    mount renamed, the file deleted, or its paths naming nothing now) was loaded back behind it, and a file under its
    paths added since, which it never touched, was left out of the load. A clean with no ``given`` (planned by a
    loader before it was kept) is read against ``entries`` as before. The clean's earlier runs that started after the
    load's run did (``since``; ``CleanGiven.earlier``) evict theirs too: each reached the load's nodes after it."""
    keys: set[tuple[int, str]] = set()
    everything = {(file.mount, file.key) for file in plan.files}
    for clean in cleans:
        key = subjects.operation_key(clean.kind, clean.metadata.namespace, clean.metadata.name)
        found = given.get(key)
        if found is not None:
            for run in [found, *(earlier for earlier in found.earlier if earlier.started_at > since)]:
                if run.everything:
                    return everything
                keys |= {(mount, name) for mount, name in run.files}
        elif clean.clean is not None:
            if not clean.clean.target:
                return everything
            chosen, _ = select(entries, clean.clean.target)
            keys |= {(entries[index].mount, entries[index].key) for index in chosen}
    return keys & everything


def ring_shrank(record: OperationRecord, state: RunState, runtime: RuntimeRecord) -> list[str]:
    """The nodes of the ring an executing load was planned on that are no longer cache workers of the runtime at all
    (scaled in, or another node picked in their place), when the runtime still has a ring: the blocks they held or
    were to hold are owned by others now, and readers ask those. Their parts are to be planned (``replan_load``),
    as for a ring that grew. Checked before the run ends Complete: the parts of the nodes scaled in may all be done
    before a tick sees the smaller ring, and the load ended Complete with those blocks only on nodes no reader asks;
    parts of theirs not done yet are moved first (``scaled_in``, ``move_parts``). A worker
    picked but not ready is still a worker (it may come back): not counted. Empty for a load planned without a
    ring, and while the runtime has no ring (nowhere to plan those blocks)."""
    if record.load is None or state.stage != "executing" or not state.ring or not ring_of(runtime):
        return []
    return sorted(set(state.ring) - {worker.node for worker in runtime.status.workers})


def block_size_changed(record: OperationRecord, state: RunState, block_size: int) -> str | None:
    """Why an executing load cannot end Complete: its runtime now cuts blocks at ``block_size``, not at the size the
    load planned its blocks at (the runtime deleted and applied again with another ``blockSize``, the only way to
    change it). Its parts name blocks of the old size, which a mount process started on the new one fetches at the
    new one's offsets (a file loaded in part, yet counted done), and a cache cut at the old size is emptied when its
    mount process starts on the new one. None otherwise, and for a run planned before the size was kept."""
    if record.load is None or state.stage != "executing" or not state.block_size or block_size == state.block_size:
        return None
    ref = dataset_ref(record)
    return (f"runtime {ref.namespace}/{ref.name} now has blockSize {format_bytes(block_size)} (applied again) while "
            f"this load was executing with blocks planned at {format_bytes(state.block_size)}: its parts were "
            f"cancelled; run the load again: its blocks are planned at the new size then")


def runtime_lost(record: OperationRecord) -> str:
    """Why an executing run fails at once when its runtime is deleted: the runtime's mounts go with it, so its parts
    would never report again (each node would otherwise be waited for until it counts as gone)."""
    ref = dataset_ref(record)
    return (f"runtime {ref.namespace}/{ref.name} was deleted while this run was executing; its parts cannot finish: "
            f"apply the runtime again and run the {record.kind} again")


# The end of a run its operation's delete cut short, should the record outlive the delete for a moment.
DELETED_MESSAGE = "the operation was deleted while this run was executing; its parts were cancelled"


def deleted_state(state: RunState, now: float) -> RunState:
    """What a delete keeps of an operation's run state: the last run's id (a re-created operation numbers its runs
    after it), finished, with its end (a run cut short by the delete is Failed, saying so)."""
    if state.stage == "finished":
        return RunState(run=state.run, outcome=state.outcome, outcome_message=state.outcome_message,
                        finished_at=state.finished_at)
    return RunState(run=state.run, outcome="Failed", outcome_message=DELETED_MESSAGE, finished_at=now)


def settled(state: RunState) -> RunState:
    """What a finished run's state keeps once its end is in the record: what decides the next runs (requests, the
    sync stamp, the OnEvent baseline's incarnation) and the end itself, not its parts. The parts' progress (up to
    ``RUN_STATE_BYTES``) stayed in the bucket with every finished run, as the plan stayed in the Object Store; the
    record's ``status.progress`` keeps the run's totals."""
    return msgspec.structs.replace(state, parts=[], ring=[], files_total=0, resync_requests=0, deadline=0.0,
                                   changes_only=False)


def run_number(run: str) -> int:
    """The number of run ``<operation_key>.<n>``; 0 for no run (or a run id that is not one)."""
    number = run.rpartition(".")[2]
    return int(number) if run and number.isdigit() else 0


class DeletionNote(deletion.DeletionNote, rename="camel"):
    """``libs.deletion``'s note in an operation's delete marker, with the number of its last run: the same name
    applied again numbers its runs after it (run and part ids are message ids, and the agents remember cancelled
    runs). A run state kept for that after the delete stayed in its bucket for every operation ever deleted."""

    runs: int = 0


def deletion_note(sequence: int, runs: int) -> bytes:
    """The note of a delete at commands stream ``sequence`` (0: the TTL's) of an operation whose last run is
    ``runs``; none (b"") when both are 0. A TTL removal's note keeps ``commandSequence`` 0, which is how the bridge
    tells it from a command's (``libs.deletion.deleted_at``)."""
    return msgspec.json.encode(DeletionNote(command_sequence=sequence, runs=runs)) if sequence or runs else b""


def runs_of_note(note: bytes) -> int:
    """The last run number a delete kept in its note (``deletion_note``); 0 without one."""
    if not note:
        return 0
    try:
        return msgspec.json.decode(note, type=DeletionNote).runs
    except DECODE_ERRORS:
        return 0


def orphan_objects(names: Iterable[str], operations: Mapping[str, OperationRecord],
                   runs: Mapping[str, RunState]) -> list[str]:
    """Which of the loader's objects (``subjects.loader_object``) to remove: every one of an operation that no
    longer exists, and the plan of an operation whose run is not executing (its run finished, or a loader killed
    between the run's end and the plan's removal; a run planning writes its own). The other names (datasets'
    manifests) are not the loader's."""
    orphans = []
    for name in names:
        found = subjects.loader_object(name)
        if found is None:
            continue
        key, kind = found
        state = runs.get(key)
        if key not in operations or (kind == "plan" and (state is None or state.stage != "executing")):
            orphans.append(name)
    return sorted(orphans)


def unclosed(record: OperationRecord, state: RunState) -> bool:
    """The run state says the record's run finished, the record still shows it Executing: the record's write at the
    run's end failed, or the loader was killed between the two writes."""
    if state.stage != "finished" or not state.run or record.status.phase != "Executing":
        return False
    number = state.run.rsplit(".", 1)[1]
    return number.isdigit() and int(number) == record.status.runs


def closing(state: RunState) -> tuple[OperationPhase, str]:
    """The end to write of an ``unclosed`` run: the one saved with it, or (a state saved without one) what its parts
    say."""
    if state.outcome is not None:
        return state.outcome, state.outcome_message
    return outcome(state) or ("Failed", "the loader stopped while this run ended and its end was not kept; run it "
                                        "again")


def outcome(state: RunState) -> tuple[OperationPhase, str] | None:
    """Complete / Failed once every part is done; None while some part works."""
    if not all(p.done for p in state.parts):
        return None
    failing = [part for part in state.parts if part.failed]
    if failing:
        # The part that kept a message (``fold_into``), else the first that failed.
        part = next((p for p in failing if p.message), failing[0])
        return "Failed", f"node {part.node} failed {part.failed} block(s): {part.message or 'blocks could not be done'}"
    return "Complete", ""


# --- Status transitions ---


def status_started(status: OperationStatus, runs: int, generation: int, now: float) -> OperationStatus:
    """A new run of the spec's ``generation``: nothing of the previous run's end (message, condition, duration,
    completion, progress) stays; the history (``lastScheduleTime``, now; ``lastSuccessfulTime``) and the run count
    carry on."""
    return msgspec.structs.replace(status, phase="Executing", message="", duration=UNFINISHED, conditions=[],
                                   runs=runs, start_time=rfc3339(now), completion_time="",
                                   last_schedule_time=rfc3339(now), progress=Progress(), waiting_for="",
                                   waiting_for_operation=False, observed_generation=generation)


def status_waiting(status: OperationStatus, why: str, on_operation: bool = False) -> OperationStatus:
    """A run that is due waits (``runAfter``'s operation, ``on_operation``, or its dataset): Pending, saying for
    what; the previous run's end (message, condition, duration, completion, progress) goes as when it starts, the
    history stays."""
    return msgspec.structs.replace(status, phase="Pending", message="", duration="", conditions=[],
                                   completion_time="", progress=Progress(), waiting_for=why,
                                   waiting_for_operation=on_operation)


def status_finished(status: OperationStatus, phase: OperationPhase, message: str, started_at: float,
                    now: float) -> OperationStatus:
    # Fluid's operations carry one condition of the final phase's type ("Complete" or "Failed"), status True.
    condition = Condition(type=phase, status="True", reason="RunComplete" if phase == "Complete" else "RunFailed",
                          message=message, last_transition_time=rfc3339(now))
    return msgspec.structs.replace(
        status, phase=phase, message=message, duration=format_duration(now - started_at),
        completion_time=rfc3339(now), waiting_for="", waiting_for_operation=False, conditions=[condition],
        last_successful_time=rfc3339(now) if phase == "Complete" else status.last_successful_time)


def status_failed_to_start(status: OperationStatus, runs: int, generation: int, message: str,
                           now: float) -> OperationStatus:
    """A run that could not start (bad input against the current state) is a Failed run."""
    started = status_started(status, runs, generation, now)
    return status_finished(started, "Failed", message, now, now)


# --- When the next run is due ---


@functools.lru_cache(maxsize=256)
def _never(schedule: str) -> bool:
    """Whether no date matches ``schedule`` (its days ANDed): croniter searches 50 years to say so, 2 ms, which a
    Cron load's due check on every tick would pay again for a half (``0 0 30 2 1``'s 30 February) that never fires."""
    try:
        croniter(schedule, SCHEDULE_PROBE_TIME, day_or=False).get_next(float)
    except CroniterBadDateError:
        return True
    return False


def next_cron(schedule: str, after: float) -> float:
    """The first firing after ``after``, as a Kubernetes CronJob (robfig/cron) fires: when both day fields are
    restricted, a day matching either one (``0 0 30 2 1``: every Monday of February, though 30 February never
    comes); when either is ``*``, a day matching both. croniter's own either-day search gave up on the first (no 30
    February), so each day field is asked alone and the earlier firing wins. Raises ``CroniterBadDateError`` when
    no date matches. ``@every``: ``after`` (its whole second) and the interval, robfig/cron's next firing."""
    if (interval := every_seconds(schedule)) is not None:
        return float(math.floor(after) + interval)
    fields = CRON_MACROS.get(schedule, schedule).replace("?", "*").split()
    if len(fields) != len(CRON_FIELDS):
        return float(croniter(schedule, after).get_next(float))  # croniter's error for what it cannot read
    minute, hour, day, month, weekday = fields
    if _any_day(day) or _any_day(weekday):
        return float(croniter(" ".join(fields), after, day_or=False).get_next(float))
    firings = []
    for alone in (f"{minute} {hour} {day} {month} *", f"{minute} {hour} * {month} {weekday}"):
        if _never(alone):
            continue
        with contextlib.suppress(CroniterBadDateError):
            firings.append(float(croniter(alone, after, day_or=False).get_next(float)))
    if not firings:
        raise CroniterBadDateError(f"no date matches {schedule!r}")
    return min(firings)


def cron_due(schedule: str, last_schedule: str, created_at: str, now: float) -> bool:
    """Due when the first firing after the last run's start (or the creation) has passed: however many firings were
    missed (the loader was down), this is one run, and lastScheduleTime (saved as the run starts) makes it so after
    a restart too. ``@every``: the firings are the creation plus whole intervals, as a CronJob's (each counted from
    the firing before, not from the moment the run it started began: counted from ``lastScheduleTime``, every run
    would move the series by the loader's latency, and a manual run would move it to its own moment)."""
    since = parse_rfc3339(last_schedule) or parse_rfc3339(created_at)
    if since is None:
        return False
    created = parse_rfc3339(created_at)
    if (interval := every_seconds(schedule)) is not None and created is not None:
        anchor = math.floor(created)
        fired = max(1, math.floor((since - anchor) / interval) + 1)
        return anchor + fired * interval <= now
    return next_cron(schedule, since) <= now


def dataset_stamp(dataset: DatasetRecord) -> str:
    status = dataset.status
    return f"{status.synced_generation}.{status.synced_requests}.{status.last_sync_time}"


Trigger = Literal["once", "cron", "requested", "event", "spec"]


def due(record: OperationRecord, state: RunState, dataset: DatasetRecord | None, now: float) -> Trigger | None:
    """Why a run of ``record`` should start now, or None (never while one is running)."""
    if record.status.phase == "Executing" or state.stage != "finished":
        return None
    if state.requested:
        return "requested"
    policy = record.load.policy if record.load is not None else "Once"
    # Once (and every clean): a spec newer than the last run's (its Failed target fixed, a path added) is the run the
    # apply asked for. observedGeneration 0 with a start: a run of a loader that did not record it, left as it is.
    if policy == "Once" and 0 < record.status.observed_generation < record.generation:
        return "spec"
    # "Never started" is an empty startTime, not runs == 0: a re-created operation continues the run numbers of
    # the deleted one of the same name (run ids are message ids, and JetStream drops a repeated one).
    if policy == "Once":
        return "once" if not record.status.start_time else None
    if policy == "Cron":
        assert record.load is not None
        if cron_due(record.load.schedule, record.status.last_schedule_time, record.created_at, now):
            return "cron"
        return None
    # OnEvent: a first run loads the target, later ones what the dataset's syncs changed.
    if not record.status.start_time:
        return "event"
    if (dataset is not None and dataset.status.phase == "Bound" and state.sync_stamp != dataset_stamp(dataset)
            and not listing_failed(dataset)):
        return "event"
    return None


def pending_run(record: OperationRecord, state: RunState) -> str:
    """Why a run asked for now (``dataload.run.v1``) is the run already pending, or "" when none is: one asked for
    before and not started (``requested``), or a due run waiting for its runAfter or its dataset (Pending with
    ``waitingFor``). Counting each request as a run of its own ran a load several times back to back once what it
    waited for came; a user asking again while it waits means "run it", not "run it N times". While a run is under
    way and the record does not show it Executing yet (a loader killed between the run state's write and the
    record's; the handler refuses a request once it does), the first request queues the next run and later ones join
    that one."""
    name = f"DataLoad {record.metadata.namespace}/{record.metadata.name}"
    if state.stage == "finished" and record.status.phase == "Pending" and record.status.waiting_for:
        return f"{name} already has a run pending, waiting for {record.status.waiting_for}; this request joins it"
    if state.requested:
        return f"{name} already has a run requested that has not started; this request joins it"
    return ""


def listing_failed(dataset: DatasetRecord) -> bool:
    """Whether the dataset's last listing failed (its MetadataSynced condition False). A failed listing of a synced
    dataset keeps its tree, so it changed nothing to load; yet it moves the sync stamp (``lastSyncTime``), and the
    dataset service tries an unreachable store again every 15 s: each try was an OnEvent run loading nothing. The
    next good listing moves the stamp again, and that is the run."""
    synced = find_condition(dataset.status.conditions, CONDITION_SYNCED)
    return synced is not None and synced.status == "False"


def changes_only(trigger: Trigger, record: OperationRecord, state: RunState, dataset: DatasetRecord | None) -> bool:
    """Whether a run loads only what changed since the OnEvent baseline: a run fired by a sync, after a first run,
    of the dataset incarnation the baseline was listed from. A dataset deleted and applied again is another
    incarnation whose cache went with the old one (its mounts delete their blocks), so a diff against the old
    manifest, which may list the very same objects, would load nothing into a cold cache."""
    return (trigger == "event" and bool(record.status.start_time) and dataset is not None
            and dataset.incarnation == state.baseline_incarnation)


RunAfter = Literal["go", "wait", "fail"]


def run_after(ref: OperationRef | None, record: OperationRecord,
              other: OperationRecord | None) -> tuple[RunAfter, str]:
    """runAfter: go when ``record``'s named operation is Complete, fail when it Failed (saying what to do),
    otherwise wait (with what for)."""
    if ref is None:
        return "go", ""
    namespace = record.metadata.namespace
    name = f"{ref.kind} {ref.namespace or namespace}/{ref.name}"
    if other is None:
        return "wait", f"{name} to exist and be Complete"
    if other.status.phase == "Complete":
        return "go", ""
    if other.status.phase == "Failed":
        return "fail", (f"{name} (spec.runAfter) Failed: {other.status.message or 'no reason given'}; "
                        f"{_after_failed(name, record)}")
    return "wait", f"{name} to be Complete"


def run_after_missing(ref: OperationRef, record: OperationRecord, timeout: float) -> str:
    """The message of a run that waited ``timeout`` seconds for the operation its runAfter names to exist: deleted
    (the first of a chain: each after it then fails on the one before, ``run_after``) or misspelt, it would have
    waited for ever. Worded as ``_after_failed``: a Once operation runs once per spec."""
    name = f"{ref.kind} {ref.namespace or record.metadata.namespace}/{ref.name}"
    this = f"{record.kind} {record.metadata.namespace}/{record.metadata.name}"
    if record.load is not None and record.load.policy != "Once":
        todo = f"apply {name} ({this} runs again at its next firing or sync), or change spec.runAfter"
    else:
        todo = (f"apply {name}, then delete and apply again {this} (a Once operation applied unchanged does not "
                f"run again), or change its spec.runAfter")
    return f"{name} (spec.runAfter) does not exist (waited {timeout:g} s for it to exist and be Complete); {todo}"


def _after_failed(name: str, record: OperationRecord) -> str:
    """What to do when the operation ``record`` runs after (``name``) Failed. Fixing that one alone left a Once
    operation (a DataClean, a Once DataLoad) Failed for good: Once runs once per spec, as in Fluid, so one applied
    unchanged runs nothing (worded as ``_cycle_message``). A Cron or OnEvent load runs again at its next firing or
    sync, and waits then for that one to be Complete."""
    this = f"{record.kind} {record.metadata.namespace}/{record.metadata.name}"
    if record.load is not None and record.load.policy != "Once":
        return f"fix {name} ({this} runs again at its next firing or sync)"
    return (f"fix {name}, then delete and apply again {this}: a Once operation applied unchanged does not run "
            "again")


def run_after_key(ref: OperationRef, namespace: str) -> tuple[str, str, str]:
    return ref.kind, ref.namespace or namespace, ref.name


def run_after_cycle(record: OperationRecord,
                    lookup: Callable[[tuple[str, str, str]], OperationRecord | None]) -> str | None:
    """The runAfter cycle ``record`` is in (A → B → A), as the message its run fails with; None when it is in none.

    ``lookup`` finds an operation by ``run_after_key``. Every operation of a cycle waits for the next to be Complete,
    so none would ever start: each fails naming the cycle from itself. One that only leads into a cycle is not in
    it: it waits, and fails once the one it names has Failed (``run_after``)."""
    start: tuple[str, str, str] = (record.kind, record.metadata.namespace, record.metadata.name)
    path = [start]
    members = [record]
    current: OperationRecord | None = record
    while current is not None:
        spec = current.load or current.clean
        if spec is None or spec.run_after is None:
            return None
        following = run_after_key(spec.run_after, current.metadata.namespace)
        if following == start:
            return _cycle_message(members)
        if following in path:
            return None
        path.append(following)
        current = lookup(following)
        if current is not None:
            members.append(current)
    return None


def _cycle_message(members: Sequence[OperationRecord]) -> str:
    """What a member of a runAfter cycle fails with: the cycle from it, and what to do. Every member fails, and an
    apply that changes one's runAfter runs that one again; but a Once operation (a DataClean, a Once DataLoad)
    applied unchanged runs nothing (Once runs once per spec, as in Fluid), so the others stayed Failed for good
    until deleted and applied again. A Cron or OnEvent load runs again at its next firing or sync."""
    names = [f"{member.kind} {member.metadata.namespace}/{member.metadata.name}" for member in members]
    message = (f"runAfter cycle: {' → '.join([*names, names[0]])}; none of them can start: change spec.runAfter of "
               "one of them")
    once = [name for name, member in zip(names, members, strict=True)
            if member.load is None or member.load.policy == "Once"]
    if not once:
        return message + " (each runs again at its next firing or sync)"
    return (f"{message}, then delete and apply again each of {', '.join(once)} whose spec you did not change: a Once "
            f"operation applied unchanged does not run again")


def awaited(record: OperationRecord, others: Iterable[OperationRecord]) -> bool:
    """Whether an operation's runAfter names ``record`` and that one is Pending or will run again (a Cron or OnEvent
    load, whose next run waits for it again): removed, it would leave that one waiting for it to exist for ever."""
    meta = record.metadata
    wanted = (record.kind, meta.namespace, meta.name)
    for other in others:
        spec = other.load or other.clean
        runs_again = other.load is not None and other.load.policy != "Once"
        if ((other.status.phase == "Pending" or runs_again) and spec is not None and spec.run_after is not None
                and run_after_key(spec.run_after, other.metadata.namespace) == wanted):
            return True
    return False


def expired(record: OperationRecord, now: float) -> bool:
    """ttlSecondsAfterFinished: a finished Once load or a clean is removed that long after it finished (and once
    no Pending operation waits for it: ``awaited``). Cron and OnEvent loads are never finished for good, so they
    stay."""
    spec = record.load or record.clean
    ttl = spec.ttl_seconds_after_finished if spec is not None else None
    if ttl is None or record.status.phase not in ("Complete", "Failed"):
        return False
    if record.load is not None and record.load.policy != "Once":
        return False
    finished = parse_rfc3339(record.status.completion_time)
    return finished is not None and finished + ttl <= now
