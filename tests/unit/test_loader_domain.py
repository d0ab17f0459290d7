"""The loader's pure decisions: validation, the plan (with Hypothesis properties), progress, Cron, OnEvent,
runAfter, TTL."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import ring
from libs.events.agent import BlockId
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import CONDITION_SYNCED, Condition, Dataset, DatasetRecord, DatasetStatus, ManifestEntry
from libs.events.operation import (
    CleanTarget,
    DataClean,
    DataCleanSpec,
    DataLoad,
    DataLoadSpec,
    DatasetRef,
    MovedParts,
    NodeProgress,
    NodeTask,
    OperationRecord,
    OperationRef,
    OperationStatus,
    Progress,
    TargetPath,
    TaskProgress,
)
from libs.events.runtime import CacheWorker, Runtime, RuntimeRecord, RuntimeStatus
from libs.paths import selects
from services.loader import domain

REF = DatasetRef(name="data")
DATASET = ObjectRef(name="data")  # as the loader resolves REF in namespace default


def t(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def load(**spec: object) -> DataLoad:
    return DataLoad(metadata=ObjectMeta(name="warm"), spec=DataLoadSpec(dataset=REF, **spec))  # type: ignore[arg-type]


def entry(path: str, size: int, etag: str = "e1", mount: int = 0) -> ManifestEntry:
    return ManifestEntry(path=path, mount=mount, key=path.lstrip("/"), size=size, etag=etag, mtime=0.0)


def record(spec: DataLoadSpec | None = None, **status: object) -> OperationRecord:
    return OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"), load=spec or DataLoadSpec(dataset=REF),
                           created_at="2026-01-01T00:00:00Z", status=OperationStatus(**status))  # type: ignore[arg-type]


# --- validation ---


def test_a_valid_load_has_no_errors() -> None:
    assert domain.validate_load(load(target=[TargetPath(path="/train", replicas=2)])) == []
    assert domain.validate_load(load(policy="Cron", schedule="*/5 * * * *")) == []


def test_every_bad_field_is_named() -> None:
    errors = domain.validate_load(DataLoad(
        metadata=ObjectMeta(name="Warm_Up"),
        spec=DataLoadSpec(dataset=DatasetRef(name="x.y"), target=[TargetPath(path="train", replicas=0)],
                          policy="Once", schedule="* * * * *", ttl_seconds_after_finished=-1,
                          run_after=OperationRef(kind="Job", name="a"))))
    text = "\n".join(errors)
    for needle in ("metadata.name", "spec.dataset.name", "must start with '/'", "replicas must be between",
                   "only for policy Cron", "ttlSecondsAfterFinished", "runAfter.kind"):
        assert needle in text, needle


def test_cron_needs_a_valid_five_field_schedule() -> None:
    assert "required for policy Cron" in domain.validate_load(load(policy="Cron"))[0]
    for bad in ("every minute", "* * * * * *"):
        assert "not a valid cron expression" in domain.validate_load(load(policy="Cron", schedule=bad))[0]
    assert domain.validate_load(load(policy="Cron", schedule="61 * * * *")) == [
        "spec.schedule '61 * * * *': the minute field '61' is out of range: 61 is not within 0-59"]


@pytest.mark.parametrize(("macro", "same"), [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"),
])
def test_kubernetes_cron_macros_are_schedules(macro: str, same: str) -> None:
    """Fluid runs a Cron DataLoad as a Kubernetes CronJob with its schedule, which takes these macros; before,
    Shoal refused them ("five fields")."""
    assert domain.validate_load(load(policy="Cron", schedule=macro)) == []
    start = t("2026-03-04T05:06:07Z")
    assert domain.next_cron(macro, start) == domain.next_cron(same, start)


def test_a_macro_kubernetes_refuses_is_refused_too() -> None:
    for bad in ("@Hourly", "@often", "@every", "@every5m", "@Every 5m"):
        assert "not a valid cron expression" in domain.validate_load(load(policy="Cron", schedule=bad))[0]


@pytest.mark.parametrize(("schedule", "seconds"), [
    ("@every 5m", 300), ("@every 1h30m", 5400), ("@every 1.5h", 5400), ("@every 90s", 90), ("@every .5m", 30),
    ("@every 1m30.9s", 90), ("@every 300ms", 1), ("@every 2\u00b5s", 1), ("@every 1h0m0s", 3600),
])
def test_every_a_go_duration_is_a_schedule_as_in_a_kubernetes_cronjob(schedule: str, seconds: int) -> None:
    """Fluid runs a Cron DataLoad as a Kubernetes CronJob, whose schedule (robfig/cron's standard parser) takes
    ``@every <Go duration>``: whole seconds, at least one. Shoal refused it ("not a valid cron expression")."""
    assert domain.validate_load(load(policy="Cron", schedule=schedule)) == []
    assert domain.every_seconds(schedule) == seconds
    assert domain.next_cron(schedule, t("2026-03-04T05:06:07Z") + 0.25) == t("2026-03-04T05:06:07Z") + seconds


@pytest.mark.parametrize(("schedule", "reason"), [
    ("@every 5", "'5' is not a duration: a number and a unit"), ("@every 5 minutes", "is not a duration"),
    ("@every  5m", "' 5m' is not a duration"), ("@every 5d", "is not a duration"), ("@every .s", "not a duration"),
    ("@every 0", "longer than zero"), ("@every 0s", "longer than zero"), ("@every -5m", "longer than zero"),
    ("@every 3000000h", "is not a duration"),
])
def test_every_without_a_positive_go_duration_is_refused_saying_why(schedule: str, reason: str) -> None:
    errors = domain.validate_load(load(policy="Cron", schedule=schedule))
    assert len(errors) == 1 and reason in errors[0] and repr(schedule) in errors[0], errors


def test_every_fires_at_the_creation_plus_whole_intervals_one_run_for_missed_ones() -> None:
    """As a CronJob's ``@every``: each firing counts from the firing before, not from when its run started (the
    loader's latency, a manual run), and firings missed while the loader was down are one run."""
    created = "2026-01-01T00:00:00Z"
    base = t("2026-01-01T00:00:00Z")
    assert not domain.cron_due("@every 5m", "", created, base + 299.9)
    assert domain.cron_due("@every 5m", "", created, base + 300)
    # The run of the first firing started 4 s late: the next is still at 10 minutes, not 10 minutes and 4 s.
    late = "2026-01-01T00:05:04Z"
    assert not domain.cron_due("@every 5m", late, created, base + 599)
    assert domain.cron_due("@every 5m", late, created, base + 600)
    # A manual run at 7:30 is no firing of the series: the next is at 10:00.
    assert domain.cron_due("@every 5m", "2026-01-01T00:07:30Z", created, base + 600)
    # Down for an hour: one run at its return, then the next firing of the series.
    back = "2026-01-01T01:02:03Z"
    assert not domain.cron_due("@every 5m", back, created, base + 3899)
    assert domain.cron_due("@every 5m", back, created, base + 3900)


def test_a_schedule_that_never_fires_is_refused() -> None:
    """Valid syntax no date matches: accepted, every due check of the operation would raise."""
    for never in ("0 0 30 2 *", "0 0 31 4,6 *"):
        assert domain.valid_schedule(never)
        errors = domain.validate_load(load(policy="Cron", schedule=never))
        assert len(errors) == 1 and "never fires" in errors[0] and repr(never) in errors[0], errors
    # Rare firings are still firings: 29 February (every 4 years).
    rare = "0 0 29 2 *"
    assert domain.validate_load(load(policy="Cron", schedule=rare)) == []
    assert domain.cron_due(rare, "", "2026-01-01T00:00:00Z", t("2100-01-01T00:00:00Z"))


def _firings(schedule: str, start: str, count: int) -> list[str]:
    found, at = [], t(start)
    for _ in range(count):
        at = domain.next_cron(schedule, at)
        found.append(time.strftime("%Y-%m-%d %a", time.gmtime(at)))
    return found


def test_both_day_fields_restricted_fire_on_a_day_matching_either_as_kubernetes() -> None:
    """robfig/cron (a Kubernetes CronJob): with day-of-month and day-of-week both restricted, a day matching either
    fires; with either one '*' (or '?', or '*/1'), a day matching both. "0 0 30 2 1" was refused as never firing
    (30 February never comes), yet Kubernetes runs it every Monday of February."""
    assert domain.validate_load(load(policy="Cron", schedule="0 0 30 2 1")) == []
    assert _firings("0 0 30 2 1", "2026-01-01T00:00:00Z", 5) == [
        "2026-02-02 Mon", "2026-02-09 Mon", "2026-02-16 Mon", "2026-02-23 Mon", "2027-02-01 Mon"]
    assert _firings("0 0 13 * 5", "2026-02-01T00:00:00Z", 4) == [
        "2026-02-06 Fri", "2026-02-13 Fri", "2026-02-20 Fri", "2026-02-27 Fri"]
    assert _firings("0 0 13 * 5", "2026-03-01T00:00:00Z", 3) == ["2026-03-06 Fri", "2026-03-13 Fri", "2026-03-20 Fri"]
    assert _firings("0 0 */10 * 1", "2026-03-01T00:00:00Z", 3) == ["2026-03-02 Mon", "2026-03-09 Mon", "2026-03-11 Wed"]
    for either_any in ("0 0 1 * */1", "0 0 1 * ?", "0 0 1 * *"):  # the 1st only
        assert _firings(either_any, "2026-01-01T00:00:00Z", 2) == ["2026-02-01 Sun", "2026-03-01 Sun"], either_any
    assert _firings("0 0 ? * mon", "2026-01-01T00:00:00Z", 2) == ["2026-01-05 Mon", "2026-01-12 Mon"]


@pytest.mark.parametrize(("schedule", "reason"), [
    ("5-1 * * * *", "the minute field '5-1' is a reversed range (5 after 1): write the smaller end first, or list a "
                    "range that wraps around as two ('5-59,0-1')"),
    ("0 0 * * fri-mon", "the day-of-week field 'fri-mon' is a reversed range (5 after 1)"),
    ("0 0 L * *", "the day-of-month field 'L' uses L, W or # (last day, nearest weekday, nth weekday), which "
                  "Kubernetes CronJobs do not take: use values, ranges a-b, lists a,b and steps */n only"),
    ("0 0 1,L * *", "the day-of-month field 'L' uses L, W or #"),
    ("0 0 15W * *", "the day-of-month field '15W' uses L, W or #"),
    ("0 0 * 2 1#5", "the day-of-week field '1#5' uses L, W or #"),
    ("0 0 * * 5L", "the day-of-week field '5L' uses L, W or #"),
    ("0 0 * * 7", "the day-of-week field '7' is out of range: 7 is not within 0-6 or sun-sat; Sunday is 0"),
    ("0 24 * * *", "the hour field '24' is out of range: 24 is not within 0-23"),
    ("*/0 * * * *", "the minute field '*/0' has step '0': a step is a whole number of at least 1, e.g. '*/5'"),
    ("0 0 * foo *", "the month field 'foo' is not '*', a value or a range a-b of 1-12 or jan-dec"),
])
def test_schedules_kubernetes_refuses_are_refused_naming_the_field(schedule: str, reason: str) -> None:
    """croniter took these (a reversed range as wrapping around, L and # as last and nth), Kubernetes' CronJob
    (robfig/cron) refuses them: a Fluid DataLoad applied to both must mean the same, or be refused by both."""
    errors = domain.validate_load(load(policy="Cron", schedule=schedule))
    assert len(errors) == 1 and errors[0].startswith(f"spec.schedule {schedule!r}: {reason}"), errors


def test_schedules_kubernetes_takes_are_taken() -> None:
    for schedule in ("*/5 * * * *", "5/15 * * * *", "0 0 * * MON-FRI", "0 0 * jan,Jul sun", "0 9-17/2 * * 1-5",
                     "0 0 ? * 0", "@weekly", "59 23 31 12 6"):
        assert domain.validate_load(load(policy="Cron", schedule=schedule)) == [], schedule


def test_run_after_itself_is_refused() -> None:
    errors = domain.validate_load(load(run_after=OperationRef(kind="DataLoad", name="warm")))
    assert any("itself" in e for e in errors)


def test_dot_segments_in_a_target_path_are_refused_at_apply() -> None:
    """Manifest paths have none: the run would fail only once planned, saying the path is not in the dataset."""
    for bad in ("/train/../val", "/..", "/./train", "/train/."):
        errors = domain.validate_load(load(target=[TargetPath(path=bad)]))
        assert len(errors) == 1 and "'..' segments" in errors[0] and repr(bad) in errors[0], errors
        clean = DataClean(metadata=ObjectMeta(name="c"),
                          spec=DataCleanSpec(dataset=REF, target=[CleanTarget(path=bad)]))
        assert any("'..' segments" in e for e in domain.validate_clean(clean))
    assert domain.validate_load(load(target=[TargetPath(path="/train/..hidden/a.b")])) == []


def test_empty_segments_in_a_target_path_are_refused_at_apply_as_dot_segments_are() -> None:
    """``//t`` named nothing: the run failed once planned, "target path '//t' is not in the manifest"."""
    for bad in ("//t", "/train//a", "//", "/train//"):
        errors = domain.validate_load(load(target=[TargetPath(path=bad)]))
        assert errors == [f"spec.target[0].path {bad!r} must not hold an empty segment ('//'); write the path "
                          "itself (e.g. /train/a, not /train//a)"], errors
        clean = DataClean(metadata=ObjectMeta(name="c"),
                          spec=DataCleanSpec(dataset=REF, target=[CleanTarget(path=bad)]))
        assert any("empty segment" in e for e in domain.validate_clean(clean))
    for good in ("/", "/train", "/train/", "/train/a.jpg"):  # a trailing '/' names the folder, as before
        assert domain.validate_load(load(target=[TargetPath(path=good)])) == [], good


def test_a_target_path_with_a_name_no_manifest_holds_is_refused_at_apply() -> None:
    """A NUL, a name over 255 bytes, or one that is not UTF-8 (a shell's $'\\xff'): the sync leaves such objects out,
    so the path named nothing and the run failed once planned, "not in the manifest" (the CLI crashed on the last)."""
    for bad, why in (("/a\0b", "contains a NUL byte"), ("/train/" + "n" * 256, "has a name of 256 bytes"),
                     ("/bad\udcff", "is not valid UTF-8")):
        errors = domain.validate_load(load(target=[TargetPath(path=bad)]))
        assert len(errors) == 1 and errors[0].startswith(f"spec.target[0].path {bad!r} {why}"), errors
        assert errors[0].endswith("no file or folder of a dataset has such a path (objects named so are left out)")
        clean = DataClean(metadata=ObjectMeta(name="c"),
                          spec=DataCleanSpec(dataset=REF, target=[CleanTarget(path=bad)]))
        assert any(why in e for e in domain.validate_clean(clean))
    for good in ("/train/" + "n" * 255, "/caf\u00e9/\U0001f600 a+b%20?#", "/new\nline/"):
        assert domain.validate_load(load(target=[TargetPath(path=good)])) == [], good


def test_clean_validation() -> None:
    clean = DataClean(metadata=ObjectMeta(name="c"), spec=DataCleanSpec(dataset=REF, target=[CleanTarget(path="x")]))
    assert any("must start with '/'" in e for e in domain.validate_clean(clean))


def test_apply_bumps_generation_only_on_spec_change() -> None:
    meta = ObjectMeta(name="warm")
    spec = DataLoadSpec(dataset=REF)
    first, changed = domain.apply_operation(None, "DataLoad", meta, spec, None, 0.0)
    assert changed and first.generation == 1
    same, changed = domain.apply_operation(first, "DataLoad", meta, spec, None, 5.0)
    assert not changed and same is first
    other, changed = domain.apply_operation(first, "DataLoad", meta, DataLoadSpec(dataset=REF, load_metadata=True),
                                            None, 5.0)
    assert changed and other.generation == 2


def test_a_cron_or_on_event_load_observes_its_new_spec_at_the_apply_and_a_once_load_at_its_run() -> None:
    """A Cron or OnEvent load's new spec is in effect from its apply (no run starts for it): observedGeneration moves
    then, or clients comparing it with the generation would wait for the next firing. A Once load's stays the last
    run's generation, so the changed spec runs once (``due`` says "spec")."""
    meta, now = ObjectMeta(name="warm"), t("2026-01-01T00:30:00Z")
    daily = DataLoadSpec(dataset=REF, policy="Cron", schedule="0 0 * * *")
    created, _ = domain.apply_operation(None, "DataLoad", meta, daily, None, now)
    assert created.status.observed_generation == 1
    ran = msgspec.structs.replace(created, status=OperationStatus(phase="Complete", runs=1, start_time="x",
                                                                  last_schedule_time="2026-01-01T00:00:00Z",
                                                                  observed_generation=1))
    hourly = DataLoadSpec(dataset=REF, policy="Cron", schedule="0 * * * *")
    edited, changed = domain.apply_operation(ran, "DataLoad", meta, hourly, None, now)
    assert changed and edited.generation == 2 and edited.status.observed_generation == 2
    assert edited.status == msgspec.structs.replace(ran.status, observed_generation=2)  # nothing else moves
    # No run for the apply; the new schedule counts from lastScheduleTime (the old one's next firing was midnight).
    assert domain.due(edited, domain.RunState(), None, now) is None
    assert domain.due(edited, domain.RunState(), None, t("2026-01-01T01:00:00Z")) == "cron"
    on_event, _ = domain.apply_operation(ran, "DataLoad", meta, DataLoadSpec(dataset=REF, policy="OnEvent"), None,
                                         now)
    assert on_event.status.observed_generation == 2 and domain.due(on_event, domain.RunState(), None, now) is None
    once, _ = domain.apply_operation(ran, "DataLoad", meta, DataLoadSpec(dataset=REF), None, now)
    assert once.generation == 2 and once.status.observed_generation == 1
    assert domain.due(once, domain.RunState(), None, now) == "spec"
    fresh_once, _ = domain.apply_operation(None, "DataLoad", meta, DataLoadSpec(dataset=REF), None, now)
    assert fresh_once.status.observed_generation == 0  # set by its run
    clean, _ = domain.apply_operation(None, "DataClean", meta, None, DataCleanSpec(dataset=REF), now)
    assert clean.status.observed_generation == 0


# --- run checks ---


def cluster(phase: str = "Bound", workers: int = 2, ring_workers: bool = True) -> domain.Cluster:
    dataset = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="data")), generation=1,
                            status=DatasetStatus(phase=phase))  # type: ignore[arg-type]
    nodes = [f"n{i}" for i in range(workers)]
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="data")), generation=1, status=RuntimeStatus(
        ready_nodes=nodes,
        workers=[CacheWorker(node=n, peer_url="http://x" if ring_workers else "") for n in nodes]))
    return domain.Cluster(dataset, runtime)


def test_run_problems_say_what_to_change() -> None:
    spec = DataLoadSpec(dataset=REF, target=[TargetPath(path="/a", replicas=3)])
    assert "does not exist" in (domain.run_problem(record(), domain.Cluster(None, None)) or "")
    assert "not Bound" in (domain.run_problem(record(), cluster(phase="NotBound")) or "")
    message = domain.run_problem(record(spec), cluster(workers=2)) or ""
    assert "replicas 3 is more than the 2 ready cache worker(s)" in message and "lower" in message
    assert domain.run_problem(record(spec), cluster(workers=3)) is None
    # Without a ring, the ready nodes count.
    assert domain.run_problem(record(spec), cluster(workers=3, ring_workers=False)) is None


def test_replicas_above_the_nodes_of_a_ready_worker_without_peers_do_not_call_it_not_ready() -> None:
    """`make run`'s one agent runs no peer server: its worker is ready, with no peer URL, so there is no ring and each
    node loads for itself. `shoal load dataset demo --replicas 2` (the README's example) said "no cache worker is
    ready" and "picked but not ready: vm" of the worker `shoal get runtimes` shows ready."""
    spec = DataLoadSpec(dataset=REF, target=[TargetPath(path="/a", replicas=2)])
    message = domain.run_problem(record(spec), cluster(workers=1, ring_workers=False)) or ""
    assert message == (
        "replicas 2 is more than the 1 ready node(s) of runtime default/data (n0), none of whose cache workers serves "
        "peers (each node loads for itself); lower spec.target[].replicas to at most 1, or add nodes"), message
    # A worker without a heartbeat is still named as not ready.
    silent = cluster(workers=1, ring_workers=False)
    assert silent.runtime is not None
    silent = domain.Cluster(silent.dataset, msgspec.structs.replace(silent.runtime, status=msgspec.structs.replace(
        silent.runtime.status, workers=[*silent.runtime.status.workers, CacheWorker(node="n1", ready=False)])))
    message = domain.run_problem(record(spec), silent) or ""
    assert "picked but not ready: n1;" in message and "n0;" not in message, message


def test_a_failed_dataset_says_why_not_to_apply_a_runtime() -> None:
    """A dataset Failed by its sync (a missing secret) has its runtime: the run says the dataset's own reason."""
    failed = cluster(phase="Failed")
    assert failed.dataset is not None
    failed = domain.Cluster(msgspec.structs.replace(failed.dataset, status=DatasetStatus(
        phase="Failed", message="secret 's3-creds' has no key 'id'")), failed.runtime)
    message = domain.run_problem(record(), failed) or ""
    assert "is Failed, not Bound: secret 's3-creds' has no key 'id'" in message, message
    assert "apply a runtime" not in message, message
    # NotBound with its runtime there: the runtime's state, not "apply a runtime".
    waiting = cluster(phase="NotBound")
    assert waiting.runtime is not None
    waiting = domain.Cluster(waiting.dataset, msgspec.structs.replace(waiting.runtime, status=RuntimeStatus(
        phase="NotReady", message="0 of 1 agents ready: waiting for agent heartbeats")))
    message = domain.run_problem(record(), waiting) or ""
    assert "runtime default/data is NotReady: 0 of 1 agents ready" in message, message
    assert "apply a runtime" not in message, message


def test_a_run_waits_for_its_dataset_to_exist_and_be_bound() -> None:
    """Fluid requeues an operation whose dataset is missing or not bound; only what waiting does not cure fails."""
    assert domain.dataset_wait(record(), domain.Cluster(None, None)) == "dataset default/data to exist and be Bound"
    unbound = cluster(phase="NotBound")
    assert domain.dataset_wait(record(), domain.Cluster(unbound.dataset, None)) == (
        "dataset default/data to be Bound: apply a runtime named data in namespace default")
    assert unbound.runtime is not None
    syncing = domain.Cluster(unbound.dataset, msgspec.structs.replace(unbound.runtime, status=RuntimeStatus(
        phase="NotReady", message="0 of 1 agents ready")))
    assert domain.dataset_wait(record(), syncing) == (
        "dataset default/data to be Bound (runtime default/data is NotReady: 0 of 1 agents ready)")
    # Bound (the runtime ready) before its first listing ended: the plan needs that listing's manifest.
    bound = cluster()
    assert bound.dataset is not None
    assert domain.dataset_wait(record(), bound) == "dataset default/data to be listed (its first metadata sync)"
    listed = domain.Cluster(msgspec.structs.replace(bound.dataset, status=DatasetStatus(
        phase="Bound", last_sync_time="2026-01-01T00:00:00Z")), bound.runtime)
    # Bound and listed, or Failed (its own reason, which ``run_problem`` gives): no wait.
    assert domain.dataset_wait(record(), listed) is None
    assert domain.dataset_wait(record(), cluster(phase="Failed")) is None
    assert domain.run_problem(record(), cluster(phase="Failed"))


def test_a_load_waits_for_picked_cache_workers_heard_from_again() -> None:
    """After the whole stack restarted (an upgrade in place), the dataset is still Bound and its runtime's workers
    still picked, none heard from yet: a load due then (a Cron load's missed firing, started by the loader at once)
    waits for one of them, as it waits for its dataset, rather than failing "no ready cache workers" seconds before
    the agents are back. A runtime with no worker picked at all still fails at once; a clean needs no ready worker."""
    bound = cluster()
    assert bound.dataset is not None and bound.runtime is not None
    listed = msgspec.structs.replace(bound.dataset, status=DatasetStatus(phase="Bound",
                                                                         last_sync_time="2026-01-01T00:00:00Z"))
    restarted = domain.Cluster(listed, msgspec.structs.replace(bound.runtime, status=RuntimeStatus(
        workers=[CacheWorker(node="n0", ready=False), CacheWorker(node="n1", ready=False)])))
    why = domain.dataset_wait(record(), restarted)
    assert why == "a cache worker of runtime default/data to be ready (n0, n1 picked, none heard from yet)", why
    assert domain.dataset_wait_failure(record(), restarted, why, 600.0) == (
        "runtime default/data has no ready cache workers; start an agent for it or wait until one is ready (waited "
        "600 s for a cache worker of runtime default/data to be ready (n0, n1 picked, none heard from yet))")
    # One heard from again: the run starts.
    back = domain.Cluster(listed, msgspec.structs.replace(bound.runtime, status=RuntimeStatus(
        ready_nodes=["n1"], workers=[CacheWorker(node="n0", ready=False), CacheWorker(node="n1", peer_url="http://x")])))
    assert domain.dataset_wait(record(), back) is None
    # No worker picked at all: nothing to wait for, the run fails saying so.
    none_picked = domain.Cluster(listed, msgspec.structs.replace(bound.runtime, status=RuntimeStatus()))
    assert domain.dataset_wait(record(), none_picked) is None
    assert "no ready cache workers" in (domain.run_problem(record(), none_picked) or "")
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="c"), clean=DataCleanSpec(dataset=REF))
    assert domain.dataset_wait(clean, restarted) is None


def test_a_load_waits_for_the_peer_servers_of_ready_workers_that_serve_peers() -> None:
    """Right after a restart the workers' agents beat (ready) before their mount processes serve a peer URL: the
    ring is empty (or short) for a few seconds. A load planned then put every block on every ready node (31 MB for
    15.7 MB of ``replicas: 1`` in the upgrade test): it waits for those peer servers instead, naming the workers. A
    runtime whose workers serve no peers (one agent without a peer secret) plans on the ready nodes at once."""
    bound = cluster()
    assert bound.dataset is not None and bound.runtime is not None
    listed = msgspec.structs.replace(bound.dataset, status=DatasetStatus(phase="Bound",
                                                                         last_sync_time="2026-01-01T00:00:00Z"))

    def with_workers(*workers: CacheWorker) -> domain.Cluster:
        assert bound.runtime is not None
        return domain.Cluster(listed, msgspec.structs.replace(bound.runtime, status=RuntimeStatus(
            ready_nodes=[w.node for w in workers if w.ready], workers=list(workers))))

    starting = with_workers(CacheWorker(node="n0", serves_peers=True), CacheWorker(node="n1", serves_peers=True))
    why = domain.dataset_wait(record(), starting)
    assert why == ("the peer server of cache worker(s) n0, n1 of runtime default/data to start (ready, no peer URL "
                   "yet)"), why
    assert domain.dataset_wait_failure(record(), starting, why, 600.0) == (
        f"waited 600 s for {why}; check the dataset's status and its runtime")
    # One back: the ring has it, the other is still awaited (a plan on the ring of one misplaces the other's share).
    half = with_workers(CacheWorker(node="n0", serves_peers=True, peer_url="http://n0:1"),
                        CacheWorker(node="n1", serves_peers=True))
    assert domain.dataset_wait(record(), half) == (
        "the peer server of cache worker(s) n1 of runtime default/data to start (ready, no peer URL yet)")
    # Both back: the run starts on the ring.
    both = with_workers(CacheWorker(node="n0", serves_peers=True, peer_url="http://n0:1"),
                        CacheWorker(node="n1", serves_peers=True, peer_url="http://n1:1"))
    assert domain.dataset_wait(record(), both) is None
    # A worker not ready (silent) is not waited for here: it is out of the ring, as before.
    silent = with_workers(CacheWorker(node="n0", serves_peers=True, peer_url="http://n0:1"),
                          CacheWorker(node="n1", ready=False, serves_peers=True))
    assert domain.dataset_wait(record(), silent) is None
    # No peer server anywhere (a single agent without a peer secret): the ready nodes, at once.
    no_peers = with_workers(CacheWorker(node="n0"))
    assert domain.dataset_wait(record(), no_peers) is None and domain.run_problem(record(), no_peers) is None
    # A clean does not use the ring.
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="c"), clean=DataCleanSpec(dataset=REF))
    assert domain.dataset_wait(clean, starting) is None


def test_an_old_runtime_record_decodes_its_workers_as_serving_no_peers() -> None:
    """Records written before ``servesPeers`` decode (False: the loader plans as it did)."""
    worker = msgspec.json.decode(b'{"node":"n0","ready":true,"peerUrl":"http://n0:1"}', type=CacheWorker)
    assert worker == CacheWorker(node="n0", peer_url="http://n0:1") and not worker.serves_peers
    assert msgspec.json.encode(CacheWorker(node="n0", serves_peers=True)) == b'{"node":"n0","servesPeers":true}'


def test_a_run_that_waited_too_long_for_its_dataset_fails_saying_what_to_change() -> None:
    assert not domain.waited_too_long(100.0, 699.9, 600.0) and domain.waited_too_long(100.0, 700.0, 600.0)
    missing = domain.dataset_wait(record(), domain.Cluster(None, None))
    assert missing is not None
    assert domain.dataset_wait_failure(record(), domain.Cluster(None, None), missing, 600.0) == (
        "dataset default/data does not exist; create it or fix spec.dataset (waited 600 s for dataset default/data "
        "to exist and be Bound)")
    # Bound but never listed: ``run_problem`` has nothing to say, the wait does.
    bound = cluster()
    unlisted = domain.dataset_wait(record(), bound)
    assert unlisted is not None and domain.run_problem(record(), bound) is None
    assert domain.dataset_wait_failure(record(), bound, unlisted, 0.5) == (
        "waited 0.5 s for dataset default/data to be listed (its first metadata sync); check the dataset's status "
        "and its runtime")


# --- targets, OnEvent diff ---


def test_select_matches_files_and_folders_not_prefixes() -> None:
    entries = [entry("/m/train/a", 1), entry("/m/train/b", 1), entry("/m/trainer", 1), entry("/m/empty/", 0)]
    chosen, missing = domain.select(entries, [TargetPath(path="/m/train", replicas=2),
                                              TargetPath(path="/m/train/a", replicas=3),
                                              TargetPath(path="/m/empty"), TargetPath(path="/m/nope")])
    assert chosen == {0: 3, 1: 2}
    assert missing == ["/m/nope"]
    everything, _ = domain.select(entries, [])
    assert sorted(everything) == [0, 1, 2]
    slash, _ = domain.select(entries, [TargetPath(path="/")])
    assert sorted(slash) == [0, 1, 2]


def _select_by_scanning(entries: list[ManifestEntry], targets: list[TargetPath]) -> tuple[dict[int, int], list[str]]:
    """The definition select must keep: every target against every entry."""
    if not targets:
        return {i: 1 for i, e in enumerate(entries) if not e.path.endswith("/")}, []
    chosen: dict[int, int] = {}
    missing = []
    for target in targets:
        hits = [i for i, e in enumerate(entries) if selects(target.path, e.path)]
        for i in hits:
            if not entries[i].path.endswith("/"):
                chosen[i] = max(chosen.get(i, 0), target.replicas)
        if not hits:
            missing.append(target.path)
    return chosen, missing


# Paths with the characters that sort next to '/' ('-', '.', '0') and duplicates, so prefixes like "/a" and "/a-b"
# or "/a.txt" sit between "/a" and "/a/...".
SELECT_PATHS = st.text("ab/-.0é", min_size=1, max_size=8).map(lambda p: "/" + p)


@settings(max_examples=300, deadline=None)
@given(st.lists(SELECT_PATHS, max_size=30), st.lists(st.tuples(SELECT_PATHS, st.integers(1, 3)), max_size=6))
def test_select_is_the_scan_of_every_target_over_every_entry(paths: list[str],
                                                             targets: list[tuple[str, int]]) -> None:
    entries = [entry(path, 1) for path in paths]
    wanted = [TargetPath(path=path, replicas=replicas) for path, replicas in targets]
    assert domain.select(entries, wanted) == _select_by_scanning(entries, wanted)


class _CountingEntries(list[ManifestEntry]):
    """A manifest that counts how often its entries are read."""

    reads = 0

    def __getitem__(self, index: Any) -> Any:
        self.reads += 1
        return super().__getitem__(index)

    def __iter__(self) -> Iterator[ManifestEntry]:
        for item in super().__iter__():
            self.reads += 1
            yield item


def test_select_reads_each_entry_a_bounded_number_of_times_however_many_targets() -> None:
    """A DataLoad naming 1,000 files of a 100k-file dataset took ~50 s with every target scanning every entry,
    blocking the loader (and its liveness probe, and every other operation)."""
    entries = _CountingEntries(entry(f"/m/d{i % 20}/f{i}", 1) for i in range(2000))
    targets = [TargetPath(path=f"/m/d{i % 20}/f{i}") for i in range(0, 2000, 10)]  # 200 files
    chosen, missing = domain.select(entries, targets)
    assert sorted(chosen) == list(range(0, 2000, 10)) and missing == []
    assert entries.reads <= 3 * len(entries) + 3 * len(chosen), entries.reads


def test_changed_entries_are_new_or_overwritten() -> None:
    old = [entry("/a", 1), entry("/b", 1)]
    new = [entry("/a", 1), entry("/b", 2, etag="e2"), entry("/c", 1)]
    assert [e.path for e in domain.changed_entries(old, new)] == ["/b", "/c"]


# --- the plan ---

MANIFESTS = st.lists(
    st.tuples(st.text("abcdef/", min_size=1, max_size=12), st.integers(0, 50_000), st.sampled_from(["e1", "e2"])),
    max_size=25, unique_by=lambda x: x[0])


@settings(max_examples=40, deadline=None)
@given(MANIFESTS, st.integers(1, 6), st.integers(1, 4), st.sampled_from([1024, 4096, 10_000]))
def test_plan_assigns_each_block_to_exactly_replicas_distinct_owners(files, workers, replicas, block_size) -> None:
    replicas = min(replicas, workers)
    entries = [ManifestEntry(path="/" + p, mount=0, key=p, size=s, etag=e, mtime=0.0) for p, s, e in files]
    chosen = {i: replicas for i in range(len(entries))}
    nodes = [f"node-{i}" for i in range(workers)]
    plan = domain.plan_load("dataload.default.warm.1", DATASET, entries, chosen, nodes, nodes, block_size)
    assert plan == domain.plan_load("dataload.default.warm.1", DATASET, entries, chosen, list(reversed(nodes)), nodes,
                                    block_size)  # deterministic, whatever the order of the ring
    holders: dict[BlockId, list[str]] = {}
    for number, part in enumerate(plan.parts):
        task = part.task
        assert task.id == f"dataload.default.warm.1.{number}" and task.part == number
        assert task.parts == len(plan.parts)
        assert sum(len(f.blocks) for f in task.blocks) == part.blocks <= domain.MAX_PART_BLOCKS
        assert len(msgspec.json.encode(task.blocks)) <= domain.MAX_PART_BYTES
        for file in task.blocks:
            for index, size in file.blocks:
                block = BlockId(file.mount, file.key, file.etag, index)
                holders.setdefault(block, []).append(task.node)
                assert size > 0
    expected = {BlockId(0, e.key, e.etag, i) for e in entries for i in range((e.size + block_size - 1) // block_size)}
    assert set(holders) == expected
    for block, owners in holders.items():
        assert sorted(owners) == sorted(ring.owners(block.name, nodes, replicas))
        assert len(set(owners)) == len(owners) == replicas


def test_plan_without_a_ring_gives_every_ready_node_every_block() -> None:
    plan = domain.plan_load("r.1", DATASET, [entry("/a", 10_000)], {0: 1}, [], ["n1", "n2"], 4096)
    assert [p.task.node for p in plan.parts] == ["n1", "n2"]
    assert all(p.blocks == 3 and p.bytes_total == 10_000 for p in plan.parts)


def test_large_files_are_cut_into_parts_within_limits() -> None:
    # 5,000 blocks of one file and many files with long keys: several parts, each within both limits.
    entries = [entry("/big", 5000 * 1024)] + [entry("/k" + "x" * 900 + str(i), 10) for i in range(400)]
    plan = domain.plan_load("r.1", DATASET, entries, dict.fromkeys(range(len(entries)), 1), ["n1"], ["n1"], 1024)
    assert len(plan.parts) > 3
    assert sum(p.blocks for p in plan.parts) == 5400
    for part in plan.parts:
        assert part.blocks <= domain.MAX_PART_BLOCKS
        assert len(msgspec.json.encode(part.task)) <= domain.MAX_PART_BYTES + 1024


def test_clean_plan_targets_files_or_everything() -> None:
    everything = domain.plan_clean("c.1", DATASET, None, ["n2", "n1"])
    assert [(p.task.node, p.task.everything, p.task.action) for p in everything.parts] == [
        ("n1", True, "clean"), ("n2", True, "clean")]
    some = domain.plan_clean("c.1", DATASET, [entry("/a", 5), entry("/b", 5)], ["n1"])
    assert some.parts[0].task.files == [(0, "a"), (0, "b")] and not some.parts[0].task.everything


# --- progress ---


def test_progress_folds_parts_files_rate_and_eta() -> None:
    entries = [entry("/a", 8192), entry("/b", 4096)]
    plan = domain.plan_load("r.1", DATASET, entries, {0: 2, 1: 2}, ["n1", "n2"], ["n1", "n2"], 4096)
    state = domain.RunState(run="r.1", stage="executing", started_at=100.0, files_total=2,
                            parts=domain.parts_state(plan))
    first = plan.parts[0].task
    progress = TaskProgress(run="r.1", part=0, node=first.node, blocks_done=3, bytes_done=8192, bytes_skipped=4096,
                            files_done=[0, 1], done=True)
    parts = list(state.parts)
    parts[0] = domain.fold_part(parts[0], progress)
    state = msgspec.structs.replace(state, parts=parts)
    # Both files are also in the other node's part: not done yet.
    assert domain.files_done(plan, state.parts) == 0
    folded = domain.fold_progress(state, 0, now=104.0)
    assert folded.bytes_done == 12288 and folded.bytes_total == 24576 and folded.bytes_skipped == 4096
    assert folded.rate_bytes_per_second == 2048.0 and folded.eta_seconds == 6.0
    assert [n.bytes_done for n in folded.nodes] == [12288, 0]
    # An older report never moves a part back, and done sticks.
    assert domain.fold_part(parts[0], msgspec.structs.replace(progress, bytes_done=0, done=False)) == parts[0]
    assert domain.outcome(state) is None
    parts[1] = domain.fold_part(parts[1], msgspec.structs.replace(progress, part=1, node=plan.parts[1].task.node,
                                                                  failed=1, message="object changed"))
    state = msgspec.structs.replace(state, parts=parts)
    assert domain.files_done(plan, state.parts) == 2
    phase, message = domain.outcome(state) or ("", "")
    assert phase == "Failed" and plan.parts[1].task.node in message and "object changed" in message


def test_files_done_are_kept_as_a_bitmap_of_the_parts_files_and_nothing_outside_it() -> None:
    assert domain.files_bits([]) == ""
    done = [0, 3, 7, 8, 1999]
    part = domain.PartState(node="n1", files_done_bits=domain.files_bits(done))
    assert domain.part_files_done(part) == set(done)
    # Every file of a full part: a few hundred characters, where the list of numbers took 11 KB.
    assert len(domain.files_bits(range(domain.MAX_PART_BLOCKS))) < 400
    # A report naming no file of a part (negative, or past the most a part holds) cannot make the value grow.
    assert domain.files_bits([-1, domain.MAX_PART_BLOCKS, 10**9]) == ""


def test_a_run_state_saved_by_an_older_loader_keeps_its_files_done() -> None:
    old = msgspec.json.decode(b'{"node":"n1","blocks":4,"bytesDone":8192,"filesDone":[0,2]}', type=domain.PartState)
    assert domain.part_files_done(old) == {0, 2}
    # A final report counting less keeps what the part had done, and writes it as bits.
    ended = domain.fold_part(old, TaskProgress(run="r.1", part=0, node="n1", files_done=[1], failed=1, done=True))
    assert domain.part_files_done(ended) == {0, 1, 2} and ended.files_done == [] and ended.files_done_bits
    moved = domain.fold_part(old, TaskProgress(run="r.1", part=0, node="n1", bytes_done=12288, files_done=[0, 1, 2]))
    assert domain.part_files_done(moved) == {0, 1, 2} and moved.files_done == []


def test_a_run_state_of_parts_of_small_files_fits_one_kv_value() -> None:
    """150 full parts of 2,000 one-block files (a DataLoad of 300k small files), every part failing one block with
    the longest message: the state is tens of KiB (it was 1.6 MB, past NATS's 1 MiB, and the run never ended)."""
    reason = "x" * 5000
    parts = [domain.PartState(node="n1", blocks=2000, bytes_total=2000 * 4096) for _ in range(150)]
    for index in range(len(parts)):
        folded = domain.fold_into(parts, index, TaskProgress(
            run="r.1", part=index, node="n1", blocks_done=1999, bytes_done=2000 * 4096, failed=1, message=reason,
            files_done=list(range(1999)), done=True))
        assert folded is not None
        parts = folded
    state = domain.RunState(run="r.1", stage="executing", files_total=300_000, parts=parts)
    assert len(msgspec.json.encode(state)) < 100 * 1024
    assert all(domain.part_files_done(p) == set(range(1999)) for p in parts)
    # One part keeps the reason, cut, and the run's message is that part's.
    assert [bool(p.message) for p in parts].count(True) == 1
    phase, message = domain.outcome(state) or ("", "")
    assert phase == "Failed" and message.startswith("node n1 failed 1 block(s): xxx") and len(message) < 1100


def test_a_part_that_failed_nothing_keeps_no_message_so_a_failed_one_can() -> None:
    parts = [domain.PartState(node="n1", blocks=1), domain.PartState(node="n2", blocks=1)]
    cancelled = domain.fold_into(parts, 0, TaskProgress(run="r.1", part=0, node="n1", message="cancelled", done=True))
    assert cancelled is not None and cancelled[0].message == ""
    failed = domain.fold_into(cancelled, 1, TaskProgress(run="r.1", part=1, node="n2", failed=1, message="gone",
                                                         done=True))
    assert failed is not None
    assert domain.outcome(domain.RunState(run="r.1", parts=failed)) == ("Failed", "node n2 failed 1 block(s): gone")
    assert domain.fold_into(failed, 1, TaskProgress(run="r.1", part=1, node="n2", done=True)) is None  # done sticks


def test_a_plan_whose_progress_could_outgrow_one_kv_value_is_refused_saying_how_to_split_it() -> None:
    def plan(parts: int, files_per_part: int) -> domain.Plan:
        task = NodeTask(id="r.1.0", run="r.1", part=0, parts=parts, node="n1", dataset=DATASET, action="load")
        part = domain.PlannedPart(task=task, file_ids=list(range(files_per_part)), blocks=2000,
                                  bytes_total=2000 * 4 * 1024 * 1024)
        return domain.Plan(run="r.1", files=[domain.PlannedFile(0, "k", "e", 1)] * files_per_part, parts=[part] * parts)

    # About 3.6M small files, or 10M blocks of large files (40 TiB of 4 MiB blocks), fit one run.
    assert domain.state_problem(plan(1800, 2000)) is None
    assert domain.state_problem(plan(5000, 1)) is None
    problem = domain.state_problem(plan(2000, 2000)) or ""
    assert "too large for one operation: 2,000 parts (4,000,000 blocks of 2,000 files)" in problem
    assert "spec.target" in problem


def test_a_final_report_counting_less_ends_the_part_with_the_counts_kept() -> None:
    """A part whose first delivery cached half of it, its last one given up (or cancelled early) reporting less: the
    part ends, Failed with the final report's reason, and the run's progress keeps the half done."""
    entries = [entry("/a", 8192), entry("/b", 4096)]
    plan = domain.plan_load("r.1", DATASET, entries, {0: 1, 1: 1}, ["n1"], ["n1"], 4096)
    half = domain.fold_part(domain.parts_state(plan)[0], TaskProgress(
        run="r.1", part=0, node="n1", blocks_done=2, bytes_done=8192, files_done=[0]))
    given_up = TaskProgress(run="r.1", part=0, node="n1", failed=3, message="given up", done=True)
    ended = domain.fold_part(half, given_up)
    assert (ended.done, ended.failed, ended.message) == (True, 3, "given up")
    assert (ended.blocks_done, ended.bytes_done, ended.bytes_skipped) == (2, 8192, 0)
    assert domain.part_files_done(ended) == {0}
    state = domain.RunState(run="r.1", stage="executing", started_at=100.0, files_total=2, parts=[ended])
    assert domain.fold_progress(state, 1, now=104.0, ended=True).bytes_done == 8192
    assert (domain.outcome(state) or ("",))[0] == "Failed"


def test_no_eta_once_the_run_ended_or_while_nothing_moves() -> None:
    """Half of a run done in 4 s: a rate (the run's average) and an ETA while parts report. Ended with parts not
    done (a node gone, a metadata timeout): the average over the run and no ETA. Quiet for STALLED_SECONDS: rate
    0 and no ETA, not the last report's numbers."""
    entries = [entry("/a", 8192)]
    plan = domain.plan_load("r.1", DATASET, entries, {0: 1}, ["n1"], ["n1"], 4096)
    half = domain.fold_part(domain.parts_state(plan)[0], TaskProgress(run="r.1", part=0, node="n1", bytes_done=4096))
    state = domain.RunState(run="r.1", stage="executing", started_at=100.0, moved_at=104.0, files_total=1,
                            parts=[half])
    moving = domain.fold_progress(state, 0, now=104.0)
    assert (moving.rate_bytes_per_second, moving.eta_seconds) == (1024.0, 4.0)
    ended = domain.fold_progress(state, 0, now=108.0, ended=True)
    assert (ended.rate_bytes_per_second, ended.eta_seconds, ended.bytes_done) == (512.0, None, 4096)
    assert not domain.stalled(state, 104.0 + domain.STALLED_SECONDS - 1)
    stalled = domain.fold_progress(state, 0, now=104.0 + domain.STALLED_SECONDS)
    assert (stalled.rate_bytes_per_second, stalled.eta_seconds, stalled.bytes_done) == (0.0, None, 4096)
    # A run that never reported is stalled from its start.
    assert domain.stalled(msgspec.structs.replace(state, moved_at=0.0), 100.0 + domain.STALLED_SECONDS)


def test_duration_is_fluid_style() -> None:
    assert [domain.format_duration(s) for s in (0, 32, 92, 7205)] == ["0s", "32s", "1m32s", "2h0m5s"]


def test_a_finished_run_has_fluids_status() -> None:
    started = domain.status_started(OperationStatus(), 3, 1, t("2026-01-01T00:00:00Z"))
    assert (started.phase, started.duration, started.runs) == ("Executing", "Unfinished", 3)
    done = domain.status_finished(started, "Complete", "", t("2026-01-01T00:00:00Z"), t("2026-01-01T00:01:32Z"))
    assert (done.duration, done.last_successful_time, done.completion_time) == (
        "1m32s", "2026-01-01T00:01:32Z", "2026-01-01T00:01:32Z")
    assert [(c.type, c.status) for c in done.conditions] == [("Complete", "True")]
    failed = domain.status_finished(done, "Failed", "boom", 0.0, t("2026-01-02T00:00:00Z"))
    assert failed.last_successful_time == "2026-01-01T00:01:32Z"
    assert [(c.type, c.message) for c in failed.conditions] == [("Failed", "boom")]


def test_a_new_run_starts_from_a_clean_status_and_keeps_the_history() -> None:
    """A Cron or OnEvent load's next run (or a run again) must not show the last run's end while it executes."""
    started = domain.status_started(OperationStatus(), 1, 1, t("2026-01-01T00:00:00Z"))
    done = domain.status_finished(started, "Complete", "", t("2026-01-01T00:00:00Z"), t("2026-01-01T00:01:00Z"))
    failed = domain.status_finished(
        msgspec.structs.replace(domain.status_started(done, 2, 1, t("2026-01-01T01:00:00Z")),
                                progress=Progress(bytes_done=5, bytes_total=9, rate_bytes_per_second=3.0,
                                                  eta_seconds=2.0, nodes=[NodeProgress(node="a", bytes_done=5)])),
        "Failed", "node a failed 1 block(s): boom", t("2026-01-01T01:00:00Z"), t("2026-01-01T01:00:07Z"))
    again = domain.status_started(failed, 3, 1, t("2026-01-01T02:00:00Z"))
    assert again == OperationStatus(phase="Executing", duration=domain.UNFINISHED, runs=3,
                                    start_time="2026-01-01T02:00:00Z", last_schedule_time="2026-01-01T02:00:00Z",
                                    last_successful_time="2026-01-01T00:01:00Z", observed_generation=1)


def test_a_run_waiting_for_its_run_after_shows_none_of_the_last_runs_end() -> None:
    started = domain.status_started(OperationStatus(), 1, 1, t("2026-01-01T00:00:00Z"))
    failed = domain.status_finished(
        msgspec.structs.replace(started, progress=Progress(bytes_done=5, bytes_total=9, rate_bytes_per_second=3.0)),
        "Failed", "node a failed 1 block(s): boom", t("2026-01-01T00:00:00Z"), t("2026-01-01T00:00:07Z"))
    waiting = domain.status_waiting(failed, "DataLoad default/first is Executing", on_operation=True)
    assert waiting == OperationStatus(phase="Pending", waiting_for="DataLoad default/first is Executing", runs=1,
                                      start_time="2026-01-01T00:00:00Z", last_schedule_time="2026-01-01T00:00:00Z",
                                      observed_generation=1, waiting_for_operation=True)
    # The wait ends with the run: neither what for nor that it was an operation stays.
    started = domain.status_started(waiting, 2, 1, t("2026-01-01T00:01:00Z"))
    assert (started.waiting_for, started.waiting_for_operation) == ("", False)
    assert not domain.status_waiting(failed, "dataset default/data to be Bound").waiting_for_operation


def test_a_record_left_executing_a_finished_run_is_closed_with_its_saved_end() -> None:
    executing = record(phase="Executing", runs=2)
    ended = domain.RunState(run="dataload.default.warm.2", stage="finished", outcome="Failed",
                            outcome_message="node a failed 1 block(s): boom", finished_at=5.0)
    assert domain.unclosed(executing, ended)
    assert domain.closing(ended) == ("Failed", "node a failed 1 block(s): boom")
    # Not while the run works, not for another run, not once the record shows the end.
    assert not domain.unclosed(executing, msgspec.structs.replace(ended, stage="executing"))
    assert not domain.unclosed(executing, msgspec.structs.replace(ended, run="dataload.default.warm.1"))
    assert not domain.unclosed(record(phase="Failed", runs=2), ended)
    # A state saved without its end (by a loader before it was kept): what the parts say, or Failed saying so.
    done = domain.RunState(run="dataload.default.warm.2", stage="finished",
                           parts=[domain.PartState(node="a", done=True)])
    assert domain.closing(done) == ("Complete", "")
    assert domain.closing(domain.RunState(run="dataload.default.warm.2", stage="finished",
                                          parts=[domain.PartState(node="a")]))[0] == "Failed"


def test_a_run_ends_when_its_dataset_goes_or_its_spec_names_another() -> None:
    here = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="data")), generation=1, incarnation="one")
    started = domain.RunState(run="dataload.default.warm.1", stage="executing", dataset="default/data",
                              dataset_incarnation="one")
    assert domain.dataset_lost(record(), started, here) is None
    assert "was deleted while" in (domain.dataset_lost(record(), started, None) or "")
    again = msgspec.structs.replace(here, incarnation="two")
    assert "was deleted (and applied again)" in (domain.dataset_lost(record(), started, again) or "")
    moved = record(DataLoadSpec(dataset=DatasetRef(name="other")))
    message = domain.dataset_lost(moved, started, here) or ""
    assert "spec.dataset changed from default/data to default/other" in message and "deleted" not in message
    # A state saved before the run's dataset was kept: only the incarnation is checked.
    assert domain.dataset_lost(moved, msgspec.structs.replace(started, dataset=""), here) is None
    assert domain.dataset_lost(moved, msgspec.structs.replace(started, stage="finished"), None) is None


def test_a_delete_keeps_the_last_run_finished_and_a_run_it_cut_short_failed() -> None:
    executing = domain.RunState(run="dataload.default.warm.2", stage="executing", started_at=1.0,
                                parts=[domain.PartState(node="a")])
    kept = domain.deleted_state(executing, 9.0)
    assert kept == domain.RunState(run="dataload.default.warm.2", outcome="Failed",
                                   outcome_message=domain.DELETED_MESSAGE, finished_at=9.0)
    # A record the delete left behind is closed Failed, saying why, rather than resumed.
    assert domain.unclosed(record(phase="Executing", runs=2), kept)
    assert domain.closing(kept) == ("Failed", domain.DELETED_MESSAGE)
    ended = domain.RunState(run="dataload.default.warm.2", stage="finished", outcome="Complete", finished_at=5.0,
                            parts=[domain.PartState(node="a", done=True)])
    assert domain.deleted_state(ended, 9.0) == domain.RunState(run="dataload.default.warm.2", outcome="Complete",
                                                               finished_at=5.0)


# --- when runs are due ---


def test_once_runs_once() -> None:
    assert domain.due(record(), domain.RunState(), None, 0.0) == "once"
    assert domain.due(record(runs=1, phase="Complete", start_time="x"), domain.RunState(), None, 0.0) is None
    # A re-created operation starts at the deleted one's run number, and still runs once.
    assert domain.due(record(runs=4), domain.RunState(), None, 0.0) == "once"
    assert domain.due(record(phase="Executing"), domain.RunState(), None, 0.0) is None


def test_a_once_load_runs_again_when_its_spec_changed_since_its_run() -> None:
    """A new generation (a Failed target fixed) is a run the apply asked for; a metadata-only apply keeps the
    generation, and a run recorded without observedGeneration (an older loader's) is left as it is."""
    failed = msgspec.structs.replace(record(runs=1, phase="Failed", start_time="x", observed_generation=1),
                                     generation=2)
    assert domain.due(failed, domain.RunState(), None, 0.0) == "spec"
    assert domain.due(msgspec.structs.replace(failed, generation=1), domain.RunState(), None, 0.0) is None
    assert domain.due(msgspec.structs.replace(failed, status=msgspec.structs.replace(
        failed.status, observed_generation=0)), domain.RunState(), None, 0.0) is None
    assert domain.due(msgspec.structs.replace(failed, status=msgspec.structs.replace(
        failed.status, phase="Executing")), domain.RunState(), None, 0.0) is None  # after the run it is in
    # Cron keeps its schedule: a new spec runs at the next firing.
    cron = msgspec.structs.replace(failed, load=DataLoadSpec(dataset=REF, policy="Cron", schedule="0 0 1 1 *"))
    assert domain.due(cron, domain.RunState(), None, t("2026-01-01T00:00:00Z")) is None


def test_cron_missed_runs_run_once() -> None:
    spec = DataLoadSpec(dataset=REF, policy="Cron", schedule="*/10 * * * *")
    fresh = record(spec)
    assert domain.due(fresh, domain.RunState(), None, t("2026-01-01T00:09:59Z")) is None
    assert domain.due(fresh, domain.RunState(), None, t("2026-01-01T00:10:00Z")) == "cron"
    # Down for an hour: one run now, and after it started (lastScheduleTime saved), nothing until the next firing.
    started = record(spec, runs=1, phase="Complete", last_schedule_time="2026-01-01T01:03:00Z")
    assert domain.due(started, domain.RunState(), None, t("2026-01-01T01:05:00Z")) is None
    assert domain.due(started, domain.RunState(), None, t("2026-01-01T01:10:00Z")) == "cron"


def test_on_event_runs_when_the_dataset_synced_again() -> None:
    spec = DataLoadSpec(dataset=REF, policy="OnEvent")
    dataset = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="data")), generation=1,
                            status=DatasetStatus(phase="Bound", synced_generation=1, last_sync_time="x"))
    stamp = domain.dataset_stamp(dataset)
    assert domain.due(record(spec), domain.RunState(), dataset, 0.0) == "event"
    ran = record(spec, runs=1, phase="Complete", start_time="x")
    assert domain.due(ran, domain.RunState(sync_stamp=stamp), dataset, 0.0) is None
    resynced = msgspec.structs.replace(dataset, status=msgspec.structs.replace(dataset.status, synced_requests=1))
    assert domain.due(ran, domain.RunState(sync_stamp=stamp), resynced, 0.0) == "event"
    assert domain.due(ran, domain.RunState(sync_stamp=stamp, requested=1), dataset, 0.0) == "requested"
    # A listing that failed moved the stamp (lastSyncTime) yet kept the tree: nothing to run until a good one.
    failed = msgspec.structs.replace(resynced, status=msgspec.structs.replace(resynced.status, conditions=[
        Condition(type=CONDITION_SYNCED, status="False", reason="StoreUnreachable")]))
    assert domain.due(ran, domain.RunState(sync_stamp=stamp), failed, 0.0) is None
    good = msgspec.structs.replace(resynced, status=msgspec.structs.replace(resynced.status, conditions=[
        Condition(type=CONDITION_SYNCED, status="True", reason="Synced")]))
    assert domain.due(ran, domain.RunState(sync_stamp=stamp), good, 0.0) == "event"


def test_on_event_loads_only_changes_of_the_incarnation_its_baseline_was_listed_from() -> None:
    """A dataset deleted and applied again is a cold cache: its first sync's run loads the whole target."""
    spec = DataLoadSpec(dataset=REF, policy="OnEvent")
    dataset = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="data")), generation=1, incarnation="again",
                            status=DatasetStatus(phase="Bound", synced_generation=1, last_sync_time="x"))
    ran = record(spec, runs=1, phase="Complete", start_time="x")
    assert domain.changes_only("event", ran, domain.RunState(baseline_incarnation="again"), dataset)
    assert not domain.changes_only("event", ran, domain.RunState(baseline_incarnation="first"), dataset)
    assert not domain.changes_only("event", record(spec), domain.RunState(baseline_incarnation="again"), dataset)
    assert not domain.changes_only("requested", ran, domain.RunState(baseline_incarnation="again"), dataset)


def test_run_after_waits_goes_or_fails_naming_the_other() -> None:
    ref = OperationRef(kind="DataLoad", name="first")
    waiting = record()
    assert domain.run_after(None, waiting, None) == ("go", "")
    assert domain.run_after(ref, waiting, None)[0] == "wait"
    assert domain.run_after(ref, waiting, record(phase="Executing")) == (
        "wait", "DataLoad default/first to be Complete")
    assert domain.run_after(ref, waiting, record(phase="Complete"))[0] == "go"
    decision, message = domain.run_after(ref, waiting, record(phase="Failed", message="boom"))
    assert decision == "fail" and "DataLoad default/first" in message and "boom" in message


def test_run_after_failed_says_what_to_do() -> None:
    """Fixing the one it runs after left a Once operation Failed for good (Once runs once per spec): the message
    says to delete and apply it again, worded as the runAfter cycle's; a Cron or OnEvent load runs again."""
    ref = OperationRef(kind="DataLoad", name="first")
    failed = record(phase="Failed", message="boom")
    assert domain.run_after(ref, record(), failed) == ("fail", (
        "DataLoad default/first (spec.runAfter) Failed: boom; fix DataLoad default/first, then delete and apply "
        "again DataLoad default/warm: a Once operation applied unchanged does not run again"))
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="tidy", namespace="ns"),
                            clean=DataCleanSpec(dataset=REF, run_after=OperationRef(kind="DataLoad", name="first")),
                            created_at="2026-01-01T00:00:00Z")
    assert domain.run_after(ref, clean, failed)[1].endswith(
        "fix DataLoad ns/first, then delete and apply again DataClean ns/tidy: a Once operation applied unchanged "
        "does not run again")
    cron = record(DataLoadSpec(dataset=REF, policy="Cron", schedule="0 * * * *"))
    assert domain.run_after(ref, cron, failed)[1] == (
        "DataLoad default/first (spec.runAfter) Failed: boom; fix DataLoad default/first (DataLoad default/warm runs "
        "again at its next firing or sync)")


def test_a_run_after_cycle_is_named_from_each_operation_in_it() -> None:
    def op(name: str, after: OperationRef | None, kind: str = "DataLoad", namespace: str = "ns") -> OperationRecord:
        meta = ObjectMeta(name=name, namespace=namespace)
        if kind == "DataClean":
            return OperationRecord(kind="DataClean", metadata=meta, clean=DataCleanSpec(dataset=REF, run_after=after))
        return OperationRecord(kind="DataLoad", metadata=meta, load=DataLoadSpec(dataset=REF, run_after=after))

    ops = [op("a", OperationRef(kind="DataLoad", name="b")), op("b", OperationRef(kind="DataLoad", name="a")),
           op("c", OperationRef(kind="DataLoad", name="a")),  # leads into the cycle, is not in it
           op("self", OperationRef(kind="DataLoad", name="self")),
           op("x", OperationRef(kind="DataClean", name="y", namespace="other")),
           op("y", OperationRef(kind="DataLoad", name="x", namespace="ns"), kind="DataClean", namespace="other"),
           op("d", OperationRef(kind="DataLoad", name="missing")), op("e", None)]
    by_key: dict[tuple[str, str, str], OperationRecord] = {(o.kind, o.metadata.namespace, o.metadata.name): o
                                                            for o in ops}
    cycle = {o.metadata.name: domain.run_after_cycle(o, by_key.get) for o in ops}
    assert (cycle["a"] or "").startswith("runAfter cycle: DataLoad ns/a → DataLoad ns/b → DataLoad ns/a; ")
    assert (cycle["b"] or "").startswith("runAfter cycle: DataLoad ns/b → DataLoad ns/a → DataLoad ns/b; ")
    assert (cycle["self"] or "").startswith("runAfter cycle: DataLoad ns/self → DataLoad ns/self; ")
    assert (cycle["x"] or "").startswith("runAfter cycle: DataLoad ns/x → DataClean other/y → DataLoad ns/x; ")
    assert cycle["c"] is None and cycle["d"] is None and cycle["e"] is None
    # What to do: a Once operation applied unchanged runs nothing, so the members whose runAfter is left as it is
    # are deleted and applied again (said from every member alike: the user picks which one to change).
    assert cycle["a"] == ("runAfter cycle: DataLoad ns/a → DataLoad ns/b → DataLoad ns/a; none of them can start: "
                          "change spec.runAfter of one of them, then delete and apply again each of DataLoad ns/a, "
                          "DataLoad ns/b whose spec you did not change: a Once operation applied unchanged does not "
                          "run again")
    assert (cycle["x"] or "").endswith("each of DataLoad ns/x, DataClean other/y whose spec you did not change: a "
                                       "Once operation applied unchanged does not run again")
    cron = msgspec.structs.replace(op("a", None), load=DataLoadSpec(
        dataset=REF, run_after=OperationRef(kind="DataLoad", name="b"), policy="Cron", schedule="0 * * * *"))
    by_key[("DataLoad", "ns", "a")] = cron
    assert (domain.run_after_cycle(cron, by_key.get) or "").endswith(
        "then delete and apply again each of DataLoad ns/b whose spec you did not change: a Once operation applied "
        "unchanged does not run again"), "a Cron load runs again at its next firing"
    on_event = msgspec.structs.replace(by_key[("DataLoad", "ns", "b")], load=DataLoadSpec(
        dataset=REF, run_after=OperationRef(kind="DataLoad", name="a"), policy="OnEvent"))
    by_key[("DataLoad", "ns", "b")] = on_event
    assert (domain.run_after_cycle(cron, by_key.get) or "").endswith(
        "change spec.runAfter of one of them (each runs again at its next firing or sync)")


def test_ttl_removes_finished_once_operations() -> None:
    spec = DataLoadSpec(dataset=REF, ttl_seconds_after_finished=30)
    done = record(spec, phase="Complete", completion_time="2026-01-01T00:00:00Z")
    assert not domain.expired(done, t("2026-01-01T00:00:29Z"))
    assert domain.expired(done, t("2026-01-01T00:00:30Z"))
    assert not domain.expired(record(spec, phase="Executing"), t("2027-01-01T00:00:00Z"))
    cron = record(DataLoadSpec(dataset=REF, policy="Cron", schedule="* * * * *", ttl_seconds_after_finished=0),
                  phase="Complete", completion_time="2026-01-01T00:00:00Z")
    assert not domain.expired(cron, t("2027-01-01T00:00:00Z"))


def test_an_operation_is_awaited_while_a_pending_one_runs_after_it() -> None:
    first = record(phase="Complete")  # "warm"
    after = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="second"), load=DataLoadSpec(
        dataset=REF, run_after=OperationRef(kind="DataLoad", name="warm")))
    assert domain.awaited(first, [first, after])
    assert not domain.awaited(first, [msgspec.structs.replace(after, status=OperationStatus(phase="Executing"))])
    elsewhere = msgspec.structs.replace(after, metadata=ObjectMeta(name="second", namespace="other"))
    assert not domain.awaited(first, [elsewhere])  # its runAfter names other/warm
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="wipe"), clean=DataCleanSpec(
        dataset=REF, run_after=OperationRef(kind="DataClean", name="warm")))
    assert not domain.awaited(first, [clean])  # a DataClean named warm, not this DataLoad


def test_an_operation_a_cron_or_on_event_load_runs_after_is_awaited_whatever_that_ones_phase() -> None:
    # Its next run waits for "warm" again: removed by its TTL, that run would wait for it to exist for ever.
    first = record(phase="Complete")  # "warm"
    after = OperationRef(kind="DataLoad", name="warm")
    for spec in (DataLoadSpec(dataset=REF, policy="Cron", schedule="*/5 * * * *", run_after=after),
                 DataLoadSpec(dataset=REF, policy="OnEvent", run_after=after)):
        recurring = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="nightly"), load=spec,
                                    status=OperationStatus(phase="Complete"))
        assert domain.awaited(first, [recurring]), spec.policy
    once = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="once"), load=DataLoadSpec(
        dataset=REF, run_after=OperationRef(kind="DataLoad", name="warm")), status=OperationStatus(phase="Complete"))
    assert not domain.awaited(first, [once])  # done for good: nothing will wait for "warm" again


@settings(max_examples=40, deadline=None)
@given(MANIFESTS, st.integers(1, 4), st.integers(3, 9), st.integers(150, 600))
def test_parts_stay_within_small_limits_and_cover_every_block_once(files, workers, max_blocks, max_bytes) -> None:
    """The same cutting with tiny limits, so files span parts and parts fill up."""
    entries = [ManifestEntry(path="/" + p, mount=0, key=p, size=s, etag=e, mtime=0.0) for p, s, e in files]
    nodes = [f"node-{i}" for i in range(workers)]
    with patch.object(domain, "MAX_PART_BLOCKS", max_blocks), patch.object(domain, "MAX_PART_BYTES", max_bytes):
        plan = domain.plan_load("r.1", DATASET, entries, dict.fromkeys(range(len(entries)), 1), nodes, nodes, 1024)
    seen: list[tuple[str, BlockId]] = []
    for part in plan.parts:
        assert 0 < part.blocks <= max_blocks
        assert sum(len(msgspec.json.encode(f)) + 1 for f in part.task.blocks) <= max_bytes
        assert len(part.file_ids) == len(part.task.blocks)
        for file_id, file in zip(part.file_ids, part.task.blocks, strict=True):
            assert (plan.files[file_id].key, plan.files[file_id].etag) == (file.key, file.etag)
            seen += [(part.task.node, BlockId(file.mount, file.key, file.etag, i)) for i, _ in file.blocks]
    assert len(seen) == len(set(seen)) == sum((e.size + 1023) // 1024 for e in entries)


def test_unwaited_mounts_are_those_no_executing_runs_part_not_done_is_on() -> None:
    other = record(DataLoadSpec(dataset=DatasetRef(name="other", namespace="ns")))
    operations = {"a": record(), "b": other, "c": record(), "gone": record()}
    runs = {
        "a": domain.RunState(run="a.1", stage="executing", parts=[
            domain.PartState(node="n1"), domain.PartState(node="n2", done=True)]),
        "b": domain.RunState(run="b.1", stage="executing", parts=[domain.PartState(node="n2")]),
        "c": domain.RunState(run="c.1", stage="finished", parts=[domain.PartState(node="n3")]),
        "orphan": domain.RunState(run="orphan.1", stage="executing", parts=[domain.PartState(node="n4")]),
    }
    mounts = {(dataset, node) for dataset in ("default/data", "ns/other", "ns/none") for node in ("n1", "n2", "n3",
                                                                                                "n4")}
    assert mounts - domain.unwaited_mounts(mounts, operations, runs) == {("default/data", "n1"), ("ns/other", "n2")}
    assert domain.unwaited_mounts(set(), operations, runs) == set()


def test_nodes_gone_are_those_with_parts_not_done_that_are_not_ready() -> None:
    state = domain.RunState(run="r.1", stage="executing", parts=[
        domain.PartState(node="a"), domain.PartState(node="b"), domain.PartState(node="c", done=True),
        domain.PartState(node="d")])
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="data")), generation=1, status=RuntimeStatus(
        ready_nodes=["a"], workers=[CacheWorker(node="b", ready=True), CacheWorker(node="d", ready=False)]))
    assert domain.nodes_gone(state, runtime) == ["d"], "c is done; a is a ready node, b a ready worker"
    assert domain.nodes_gone(state, None) == ["a", "b", "d"]


def test_a_load_whose_ring_node_with_work_left_stays_a_ready_node_but_no_worker_has_left_its_ring() -> None:
    """Scaled in from a, b, c to a: b and c still serve (ready nodes) and would fetch their parts into caches no
    reader's route asks. With a ring left their parts move to it (``scaled_in``); without one the run fails
    (``ring_left``). A node that is no ready node at all (d) moves with them when a ring is left, and without one
    moves all the same (``stranded``), not failed at once."""
    state = domain.RunState(run="r.1", stage="executing", ring=["a", "b", "c", "d"], parts=[
        domain.PartState(node="a"), domain.PartState(node="b"), domain.PartState(node="c"),
        domain.PartState(node="d")])

    def runtime(workers: list[str], ready: list[str], peers: bool = False) -> RuntimeRecord:
        return RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="data")), generation=1, status=RuntimeStatus(
            ready_nodes=ready, workers=[CacheWorker(node=node, ready=True, peer_url=f"http://{node}" if peers else "")
                                        for node in workers]))

    with_ring = runtime(["a"], ["a", "b", "c"], peers=True)
    assert domain.scaled_in(record(), state, with_ring) == ["b", "c", "d"]
    assert domain.ring_left(record(), state, with_ring) is None, "a ring is left: the parts move to it"
    assert domain.moved_parts(state, domain.scaled_in(record(), state, with_ring)) == [1, 2, 3]
    scaled_in = runtime(["a"], ["a", "b", "c"])  # a worker, but not serving peers yet: no ring to move them to
    assert domain.scaled_in(record(), state, scaled_in) == ["b", "c", "d"]
    left = domain.ring_left(record(), state, scaled_in)
    assert left is not None and left.startswith("nodes b, c are no longer a cache worker of runtime default/data")
    assert "no ready cache worker is left" in left
    one = domain.ring_left(record(), state, runtime(["a", "c", "d"], ["a", "b", "c"]))
    assert one is not None and one.startswith("node b is no longer"), one
    assert domain.ring_left(record(), state, runtime(["a", "b", "c", "d"], ["a", "b", "c", "d"])) is None
    assert domain.ring_left(record(), state, runtime(["a", "b", "c"], ["a", "b", "c"])) is None, "d: not ready"
    finished = msgspec.structs.replace(state, parts=[domain.PartState(node=n, done=n != "a") for n in "abcd"])
    assert domain.ring_left(record(), finished, scaled_in) is None, "b and c are done: their blocks are placed"
    assert domain.ring_left(record(), msgspec.structs.replace(state, ring=[]), scaled_in) is None, "no ring"
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="drop"),
                            clean=DataCleanSpec(dataset=DatasetRef(name="data")))
    assert domain.ring_left(clean, state, scaled_in) is None, "a clean frees every node, worker or not"


def test_a_node_scaled_in_whose_agent_is_gone_has_its_parts_moved_to_the_ring_not_waited_for() -> None:
    """Scaled in from a, b to a while b's agent is gone too (not ready: the scheduler replaces a worker whose agent
    left): ``ring_shrank`` plans b's blocks on a, yet b's part was waited for (``nodes_gone``) until the node-gone
    timeout failed the load. Now it is moved like the part of a ready node scaled in. Without a ring it was still
    waited for until that timeout, a ring back a moment later notwithstanding: now it is moved at once too
    (``stranded``, nothing fetches on b: ``ring_left`` fails only a ready one), and the run waits for a ring to take
    its blocks (``ring_awaited``) rather than for b."""
    state = domain.RunState(run="r.1", stage="executing", ring=["a", "b"], parts=[
        domain.PartState(node="a"), domain.PartState(node="b")])

    def runtime(peers: bool) -> RuntimeRecord:
        return RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="data")), generation=1, status=RuntimeStatus(
            ready_nodes=["a"], workers=[CacheWorker(node="a", ready=True, peer_url="http://a" if peers else "")]))

    assert domain.ring_shrank(record(), state, runtime(True)) == ["b"]
    assert domain.moved_parts(state, domain.scaled_in(record(), state, runtime(True))) == [1]
    assert domain.ring_left(record(), state, runtime(True)) is None
    assert domain.ring_left(record(), state, runtime(False)) is None, "not fetching: not failed"
    assert domain.stranded(record(), state, runtime(True)) == [], "a ring is left: ring_shrank moves it"
    assert domain.stranded(record(), state, runtime(False)) == ["b"]
    assert domain.ring_awaited(record(), state, runtime(False)) == [], "not moved yet"
    plan = domain.Plan(run="r.1", files=[], parts=[domain.PlannedPart(task=NodeTask(
        id=f"r.1.{i}", run="r.1", part=i, parts=2, node=node, dataset=ObjectRef(namespace="default", name="data"),
        action="load"))
        for i, node in enumerate("ab")])
    moved = msgspec.structs.replace(state, parts=domain.move_parts(plan, state.parts, [1]))
    assert domain.nodes_gone(moved, runtime(False)) == [], "b's part is moved: b is not waited for"
    assert domain.ring_awaited(record(), moved, runtime(False)) == ["b"], "its blocks wait for a ring"
    assert domain.outcome(msgspec.structs.replace(moved, parts=[
        msgspec.structs.replace(moved.parts[0], done=True), moved.parts[1]])) == ("Complete", "")
    assert domain.ring_awaited(record(), moved, runtime(True)) == [], "a ring: ring_shrank plans them there"
    assert domain.ring_shrank(record(), moved, runtime(True)) == ["b"]


def test_a_node_whose_parts_were_moved_shows_moved_once_all_its_parts_are_done() -> None:
    """Not Done: the node did not do what is left of them (the ring does). Its bytes count once, as it did them."""
    state = domain.RunState(run="r.1", stage="executing", started_at=100.0, moved_at=100.0, parts=[
        domain.PartState(node="a", bytes_total=300, bytes_done=100),
        domain.PartState(node="b", bytes_total=50, bytes_done=50, done=True, moved=True),
        domain.PartState(node="b", bytes_total=200, bytes_done=200, done=True),
        domain.PartState(node="c", bytes_total=100, bytes_done=100, done=True)])
    nodes = {n.node: n for n in domain.fold_progress(state, 0, now=104.0).nodes}
    assert (nodes["b"].done, nodes["b"].moved, nodes["b"].bytes_done, nodes["b"].bytes_total) == (True, True, 250, 250)
    assert (nodes["a"].moved, nodes["c"].moved, nodes["c"].done) == (False, False, True)
    back = msgspec.structs.replace(state, parts=[*state.parts, domain.PartState(node="b", bytes_total=10)])
    again = {n.node: n for n in domain.fold_progress(back, 0, now=104.0).nodes}["b"]
    assert (again.done, again.moved) == (False, False), "a worker again, with a part of the run to do"


def test_the_moved_parts_are_kept_per_node_for_the_record() -> None:
    state = domain.RunState(run="r.1", stage="executing", parts=[
        domain.PartState(node="b", moved=True, done=True), domain.PartState(node="a"),
        domain.PartState(node="b", done=True), domain.PartState(node="c", moved=True, done=True),
        domain.PartState(node="b", moved=True, done=True)])
    assert domain.moved_by_node(state) == [MovedParts(run="r.1", node="b", parts=[0, 4]),
                                           MovedParts(run="r.1", node="c", parts=[3])]
    assert domain.moved_by_node(domain.RunState(run="r.1")) == []


def test_moved_parts_end_done_keeping_what_their_node_did_and_leave_their_files_to_the_other_parts() -> None:
    """A part moved off a node scaled in ends done with no block failed, its bytes as planned what its node did (so
    the run's progress reaches its total), and its files done as far as it is concerned: each is done once the
    parts planned again for the worker report it. A later report of the moved part changes nothing."""
    plan = domain.plan_load("op.1", ObjectRef(name="d"), [entry(f"/x/f{i}", 200) for i in range(6)],
                            dict.fromkeys(range(6), 1), ["a", "b"], ["a", "b"], 100)
    state = domain.RunState(run="op.1", stage="executing", ring=["a", "b"], parts=domain.parts_state(plan))
    moving = domain.moved_parts(state, ["b"])
    assert moving and all(state.parts[i].node == "b" for i in moving)
    worked = domain.fold_into(state.parts, moving[0], TaskProgress(
        run="op.1", part=moving[0], node="b", blocks_done=1, bytes_done=100, failed=1, message="store down"))
    assert worked is not None
    parts = domain.move_parts(plan, worked, moving)
    moved = parts[moving[0]]
    assert (moved.done, moved.moved, moved.failed, moved.message) == (True, True, 0, "")
    assert (moved.bytes_done, moved.bytes_total, moved.blocks) == (100, 100, 1)
    assert domain.fold_part(moved, TaskProgress(run="op.1", part=moving[0], node="b", blocks_done=4, bytes_done=400,
                                                done=True, message="cancelled")) == moved
    replanned = domain.replan_load(plan, ["a"])
    parts = [*parts, *domain.parts_state(replanned)[len(parts):]]
    assert domain.files_done(replanned, parts) < 6, "the files of b wait for the parts planned again on a"
    finished = [msgspec.structs.replace(part, done=True, files_done_bits=domain.files_bits(
        range(len(replanned.parts[i].file_ids)))) if not part.done else part for i, part in enumerate(parts)]
    assert domain.files_done(replanned, finished) == 6
    assert domain.outcome(msgspec.structs.replace(state, parts=finished)) == ("Complete", "")


def test_a_task_stream_goes_once_its_node_was_gone_long_enough_and_no_unfinished_part_waits_on_it() -> None:
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="data")), generation=1, status=RuntimeStatus(
        ready_nodes=["a"], workers=[CacheWorker(node="b", ready=False)]))
    runs = [domain.RunState(run="r.1", stage="executing", parts=[domain.PartState(node="c"),
                                                                 domain.PartState(node="d", done=True)]),
            domain.RunState(run="s.1", stage="finished", parts=[domain.PartState(node="e")])]
    streams = ["a", "b", "c", "d", "e"]
    # First look: c, d and e are gone from now on; a is ready, b a worker not ready (its agent's record not expired).
    idle, since = domain.idle_task_streams(streams, [runtime], runs, {}, 100.0, 10.0)
    assert idle == [] and since == {"c": 100.0, "d": 100.0, "e": 100.0}
    idle, since = domain.idle_task_streams(streams, [runtime], runs, since, 109.0, 10.0)
    assert idle == []
    # d's part is done and e's run finished: their streams go; c's part waits, and it stays timed.
    idle, since = domain.idle_task_streams(streams, [runtime], runs, since, 110.0, 10.0)
    assert idle == ["d", "e"] and since == {"c": 100.0, "d": 100.0, "e": 100.0}
    # A node back in a runtime is no longer timed; gone again, it is timed afresh.
    back = msgspec.structs.replace(runtime, status=msgspec.structs.replace(runtime.status, ready_nodes=["a", "c"]))
    assert domain.idle_task_streams(["a", "c"], [back], runs, since, 111.0, 10.0) == ([], {})
    assert domain.idle_task_streams(["a", "c"], [runtime], [], {}, 112.0, 10.0) == ([], {"c": 112.0})
    # No runtime at all: every node is gone.
    assert domain.idle_task_streams(["a"], [], [], {"a": 0.0}, 10.0, 10.0) == (["a"], {"a": 0.0})


def test_the_absent_message_names_every_absent_node_with_its_time_in_node_order() -> None:
    record = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="c"), clean=DataCleanSpec(dataset=REF))
    assert domain.absent_message(record, {}) == ""
    message = domain.absent_message(record, {"node-c": 1_767_225_610.0, "node-b": 1_767_225_600.0})
    assert message.startswith("waiting for nodes node-b (since 2026-01-01T00:00:00Z), node-c (since "
                              "2026-01-01T00:00:10Z): not ready nodes of runtime ")


def test_a_run_request_joins_a_pending_run_and_queues_one_otherwise() -> None:
    cron = DataLoadSpec(dataset=REF, policy="Cron", schedule="0 0 1 1 *")
    idle = domain.RunState()
    assert domain.pending_run(record(cron, phase="Complete"), idle) == ""
    assert domain.pending_run(record(cron, phase="Pending"), idle) == ""  # Pending, but no run is due
    queued = domain.pending_run(record(cron, phase="Complete"), domain.RunState(requested=1))
    assert queued == "DataLoad default/warm already has a run requested that has not started; this request joins it"
    waiting = domain.pending_run(record(cron, phase="Pending", waiting_for="DataLoad default/first to be Complete"),
                                 idle)
    assert waiting == ("DataLoad default/warm already has a run pending, waiting for DataLoad default/first to be "
                       "Complete; this request joins it")
    # A run under way (planning, before the record says Executing) is no pending run: the request is one more.
    assert domain.pending_run(record(cron, phase="Pending", waiting_for="x"), domain.RunState(stage="planning")) == ""
    # ...but once a request has queued the next run, more requests during this one join that one.
    assert domain.pending_run(record(cron, phase="Executing"),
                              domain.RunState(stage="executing", requested=1)).endswith("this request joins it")


def test_a_raw_command_naming_its_dataset_without_a_namespace_means_the_operations_own() -> None:
    """Another system publishes dataload.apply.v1 (and dataclean.apply.v1) for ml/warm naming {name: x}: the
    dataset is ml/x, as the same YAML through shoal apply or Kubernetes names it (Fluid's rule), not default/x.
    The record keeps the namespace it resolved to; one given stays as given."""
    from libs.events.operation import DataCleanApply, DataLoadApply

    load = msgspec.json.decode(b'{"id": "c1", "dataLoad": {"metadata": {"name": "warm", "namespace": "ml"}, '
                               b'"spec": {"dataset": {"name": "x"}}}}', type=DataLoadApply).data_load
    now = 1_767_225_600.0
    record, _ = domain.apply_operation(None, "DataLoad", load.metadata, load.spec, None, now)
    assert record.load is not None and record.load.dataset == DatasetRef(name="x", namespace="ml")
    assert domain.dataset_ref(record) == ObjectRef(name="x", namespace="ml")
    clean = msgspec.json.decode(b'{"id": "c2", "dataClean": {"metadata": {"name": "wipe", "namespace": "ml"}, '
                                b'"spec": {"dataset": {"name": "x", "namespace": ""}}}}',
                                type=DataCleanApply).data_clean
    record, _ = domain.apply_operation(None, "DataClean", clean.metadata, None, clean.spec, now)
    assert domain.dataset_ref(record) == ObjectRef(name="x", namespace="ml")
    other = DataLoadSpec(dataset=DatasetRef(name="x", namespace="data"))
    record, _ = domain.apply_operation(None, "DataLoad", ObjectMeta(name="warm", namespace="ml"), other, None, now)
    assert domain.dataset_ref(record) == ObjectRef(name="x", namespace="data")


def test_an_operation_of_another_namespace_than_its_dataset_is_refused_as_fluid_refuses_it() -> None:
    """A DataLoad or DataClean works on a dataset of its own namespace (Fluid's TargetDatasetNamespaceNotSame):
    RBAC grants operations per namespace, and one in team-a must not evict or fill default's cache."""
    mine = DataLoad(metadata=ObjectMeta(name="warm", namespace="team-a"),
                    spec=DataLoadSpec(dataset=DatasetRef(name="data", namespace="team-a")))
    assert domain.validate_load(mine) == []
    assert domain.validate_load(msgspec.structs.replace(mine, spec=DataLoadSpec(dataset=DatasetRef(name="data")))) == []
    theirs = msgspec.structs.replace(mine, spec=DataLoadSpec(dataset=DatasetRef(name="data", namespace="default")))
    assert domain.validate_load(theirs) == [
        "spec.dataset.namespace 'default' is not the DataLoad's own namespace 'team-a': a DataLoad works on a dataset "
        "of its own namespace, as in Fluid; create it in namespace default, or leave spec.dataset.namespace out"]
    clean = DataClean(metadata=ObjectMeta(name="wipe", namespace="team-a"),
                      spec=DataCleanSpec(dataset=DatasetRef(name="data", namespace="default")))
    assert [error.split(":")[0] for error in domain.validate_clean(clean)] == [
        "spec.dataset.namespace 'default' is not the DataClean's own namespace 'team-a'"]


def test_a_record_of_another_namespace_applied_before_the_rule_fails_its_next_run_at_once() -> None:
    """A record accepted by a loader of before the rule: its next run fails saying why, without a 10-minute wait
    for a dataset that may not exist."""
    old = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm", namespace="team-a"),
                          load=DataLoadSpec(dataset=DatasetRef(name="data", namespace="default")))
    assert domain.dataset_wait(old, domain.Cluster(None, None)) is None
    assert "is not the DataLoad's own namespace 'team-a'" in (domain.run_problem(old, domain.Cluster(None, None))
                                                                or "")


# --- A ring that grows under a load; what a run leaves when it ends ---


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=2), st.integers(0, 3))
def test_a_plan_replanned_on_a_grown_ring_puts_every_block_on_its_new_owners_and_keeps_its_parts(
        count: int, replicas: int, added: int) -> None:
    entries = [entry(f"/x/f{i}", (i % 3 + 1) * 100) for i in range(count)]
    before, after = ["a", "b"], ["a", "b", *[f"n{i}" for i in range(added)]]
    plan = domain.plan_load("op.1", ObjectRef(name="d"), entries, dict.fromkeys(range(count), replicas), before,
                            before, 100)
    grown = domain.replan_load(plan, after)
    assert grown.parts[:len(plan.parts)] == plan.parts
    assert [p.task.part for p in grown.parts] == list(range(len(grown.parts)))
    assert len({p.task.id for p in grown.parts}) == len(grown.parts)
    holders: dict[str, set[str]] = {}
    for part in grown.parts:
        for file in part.task.blocks:
            for index, _ in file.blocks:
                holders.setdefault(BlockId(file.mount, file.key, file.etag, index).name, set()).add(part.task.node)
    for name, nodes in holders.items():
        assert set(ring.owners(name, after, replicas)) <= nodes
    assert domain.replan_load(grown, after) == grown  # nothing more to add: the same plan
    if not added:
        assert grown == plan


def test_a_ring_that_grew_is_seen_only_for_an_executing_load_planned_on_a_ring() -> None:
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="d")), generation=1, status=RuntimeStatus(
        ready_nodes=["a", "b", "c"], workers=[CacheWorker(node=n, peer_url=f"http://{n}") for n in "abc"]))
    executing = domain.RunState(run="op.1", stage="executing", ring=["a", "b"])
    assert domain.ring_grew(record(), executing, runtime) == ["c"]
    assert domain.ring_grew(record(), msgspec.structs.replace(executing, ring=[]), runtime) == []
    assert domain.ring_grew(record(), msgspec.structs.replace(executing, stage="finished"), runtime) == []


def test_a_ring_scaled_in_is_seen_even_once_the_parts_of_the_nodes_gone_are_done() -> None:
    """Scaled in from a, b, c to a while the parts of b and c finished first: ``ring_left`` (parts not done only)
    sees nothing, and the load ended Complete with their blocks on nodes no reader asks. The nodes that are no
    longer workers are named, so their blocks are planned again on the ring as it is now; a worker picked but not
    ready is still one."""
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="d")), generation=1, status=RuntimeStatus(
        ready_nodes=["a", "b", "c"], workers=[CacheWorker(node="a", peer_url="http://a")]))
    executing = domain.RunState(run="op.1", stage="executing", ring=["a", "b", "c"], parts=[
        domain.PartState(node="a"), domain.PartState(node="b", done=True), domain.PartState(node="c", done=True)])
    assert domain.ring_left(record(), executing, runtime) is None
    assert domain.ring_shrank(record(), executing, runtime) == ["b", "c"]
    restarting = msgspec.structs.replace(runtime, status=msgspec.structs.replace(runtime.status, workers=[
        *runtime.status.workers, CacheWorker(node="b", ready=False, peer_url="http://b")]))
    assert domain.ring_shrank(record(), executing, restarting) == ["c"]
    assert domain.ring_shrank(record(), msgspec.structs.replace(executing, ring=[]), runtime) == []
    assert domain.ring_shrank(record(), msgspec.structs.replace(executing, stage="finished"), runtime) == []
    no_ring = msgspec.structs.replace(runtime, status=msgspec.structs.replace(runtime.status, workers=[
        CacheWorker(node="a", ready=False, peer_url="http://a")]))
    assert domain.ring_shrank(record(), executing, no_ring) == [], "nowhere to plan the blocks"
    plan = domain.plan_load("op.1", ObjectRef(name="d"), [entry(f"/x/f{i}", 100) for i in range(12)],
                            dict.fromkeys(range(12), 1), ["a", "b", "c"], ["a", "b", "c"], 100)
    replanned = domain.replan_load(plan, ["a"])
    on_a = {(file.key, index) for part in replanned.parts if part.task.node == "a"
            for file in part.task.blocks for index, _ in file.blocks}
    assert len(on_a) == 12, "every block on the one worker left"


def test_a_load_replanned_after_a_later_clean_started_adds_no_part_for_the_files_it_evicts() -> None:
    """A clean that started after the load sends each node its parts behind the load's; parts added to the load
    later (its ring grew) would come behind the clean's and load its files back."""
    load_state = domain.RunState(run="dataload.ns.warm.1", stage="executing", started_at=10.0, ring=["a", "b"])
    load = record(DataLoadSpec(dataset=DatasetRef(name="data", namespace="ns")))

    def clean(name: str, targets: list[str], dataset: str = "data", **status: object) -> OperationRecord:
        return OperationRecord(kind="DataClean", metadata=ObjectMeta(name=name, namespace="ns"),
                               clean=DataCleanSpec(dataset=DatasetRef(name=dataset, namespace="ns"),
                                                   target=[CleanTarget(path=p) for p in targets]),
                               status=OperationStatus(**status))  # type: ignore[arg-type]

    ran = OperationStatus(progress=Progress(nodes=[NodeProgress(node="a")]))
    operations = {"dataclean.ns.later": clean("later", ["/x/d"]), "dataclean.ns.before": clean("before", []),
                  "dataclean.ns.other": clean("other", [], dataset="other"),
                  "dataclean.ns.never": clean("never", []),  # failed to start: sent no part
                  "dataclean.ns.done": clean("done", ["/x/e/f1"], progress=ran.progress),
                  "dataload.ns.warm": load}
    runs = {"dataclean.ns.later": domain.RunState(run="dataclean.ns.later.1", stage="executing", started_at=11.0),
            "dataclean.ns.before": domain.RunState(run="dataclean.ns.before.1", stage="executing", started_at=9.0),
            "dataclean.ns.other": domain.RunState(run="dataclean.ns.other.1", stage="executing", started_at=12.0),
            "dataclean.ns.never": domain.RunState(run="dataclean.ns.never.1", started_at=12.0),
            "dataclean.ns.done": domain.RunState(run="dataclean.ns.done.1", started_at=13.0),
            "dataload.ns.warm": load_state}
    later = domain.later_cleans(load, load_state, operations, runs)
    assert [c.metadata.name for c in later] == ["done", "later"]
    entries = [entry(f"/x/{folder}/f{i}", 100) for folder in "de" for i in range(4)]
    plan = domain.plan_load("dataload.ns.warm.1", ObjectRef(name="data", namespace="ns"), entries,
                            dict.fromkeys(range(len(entries)), 1), ["a", "b"], ["a", "b"], 100)
    cleaned = domain.cleaned_files(plan, later, {}, entries)
    assert cleaned == {(0, "x/d/f0"), (0, "x/d/f1"), (0, "x/d/f2"), (0, "x/d/f3"), (0, "x/e/f1")}
    assert domain.cleaned_files(plan, [*later, operations["dataclean.ns.before"]], {}, entries) == {
        (0, e.key) for e in entries}, "a clean of everything evicts every file"
    grown = domain.replan_load(plan, ["a", "b", "c"], cleaned)
    added = {file.key for part in grown.parts[len(plan.parts):] for file in part.task.blocks}
    every = {file.key for part in domain.replan_load(plan, ["a", "b", "c"]).parts[len(plan.parts):]
             for file in part.task.blocks}
    assert added == every - {key for _, key in cleaned} and added, (added, every)
    assert domain.later_cleans(load, msgspec.structs.replace(load_state, stage="finished"), operations, runs) == []


def test_a_finished_runs_state_keeps_what_decides_the_next_runs_not_its_parts() -> None:
    state = domain.RunState(run="op.3", stage="finished", ring=["a"], files_total=2, requested=1, sync_stamp="s",
                            outcome="Complete", parts=[domain.PartState(node="a", bytes_total=5, done=True)])
    settled = domain.settled(state)
    assert (settled.parts, settled.ring, settled.files_total) == ([], [], 0)
    assert (settled.run, settled.requested, settled.sync_stamp, settled.outcome) == ("op.3", 1, "s", "Complete")
    note = domain.deletion_note(7, 3)
    assert domain.runs_of_note(note) == 3 and domain.runs_of_note(b"") == 0 and domain.deletion_note(0, 0) == b""
    assert domain.run_number("dataload.ns.a.12") == 12 and domain.run_number("") == 0


def test_the_objects_to_remove_are_those_of_operations_gone_and_plans_of_runs_not_executing() -> None:
    ops = {"dataload.ns.a": record(), "dataload.ns.b": record()}
    runs = {"dataload.ns.a": domain.RunState(run="dataload.ns.a.1", stage="executing"),
            "dataload.ns.b": domain.RunState(run="dataload.ns.b.1")}
    names = ["ns.data", "ns.data.x-1-0", "loader.dataload.ns.a.plan", "loader.dataload.ns.b.plan",
             "loader.dataload.ns.b.manifest", "loader.dataload.ns.c.plan", "loader.dataload.ns.c.planned"]
    assert domain.orphan_objects(names, ops, runs) == [
        "loader.dataload.ns.b.plan", "loader.dataload.ns.c.plan", "loader.dataload.ns.c.planned"]


def test_a_cleans_files_are_done_once_every_part_naming_them_is_done_without_a_failure() -> None:
    entries = [entry("/x/a", 10), entry("/x/b", 10)]
    plan = domain.plan_clean("op.1", ObjectRef(name="d"), entries, ["n1", "n2"])
    parts = domain.parts_state(plan)
    assert domain.files_planned(plan, entries) == 2
    done = [msgspec.structs.replace(p, done=True) for p in parts]
    assert domain.files_done(plan, parts) == 0
    assert domain.files_done(plan, [done[0], parts[1]]) == 0
    assert domain.files_done(plan, done) == 2
    assert domain.files_done(plan, [done[0], msgspec.structs.replace(done[1], failed=1)]) == 0
    everything = domain.plan_clean("op.1", ObjectRef(name="d"), None, ["n1", "n2"])
    assert domain.files_planned(everything, entries) == 2
    whole = [msgspec.structs.replace(p, done=True) for p in domain.parts_state(everything)]
    assert domain.files_done(everything, whole, 2) == 2
    assert domain.files_done(everything, whole[:1] + domain.parts_state(everything)[1:], 2) == 0
    # The mount process says a clean's total (what it found cached to free); the plan has none.
    folded = domain.fold_part(parts[0], TaskProgress(run="op.1", part=0, node="n1", bytes_done=4, bytes_total=9))
    assert (folded.bytes_done, folded.bytes_total) == (4, 9)


def test_a_later_clean_leaves_to_itself_the_files_it_was_given_whatever_the_manifest_says_now() -> None:
    """The load's files a later clean evicts are those its run was given when it planned (``CleanGiven``), not what
    its target paths name in the manifest of the replan: a sync in between moved x/d under another path (a mount
    renamed: same keys), and matching /x/d then named nothing, so the clean's files were loaded back behind it;
    a file added under /x/d since, which the clean never touched, was left out of the load."""
    entries = [entry(f"/x/{folder}/f{i}", 100) for folder in "de" for i in range(3)]
    plan = domain.plan_load("dataload.ns.warm.1", ObjectRef(name="data", namespace="ns"), entries,
                            dict.fromkeys(range(len(entries)), 1), ["a", "b"], ["a", "b"], 100)
    wipe = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="wipe", namespace="ns"),
                           clean=DataCleanSpec(dataset=DatasetRef(name="data", namespace="ns"),
                                               target=[CleanTarget(path="/x/d")]))
    chosen, _ = domain.select(entries, [CleanTarget(path="/x/d")])
    given = domain.clean_given(domain.plan_clean("dataclean.ns.wipe.1", ObjectRef(name="data", namespace="ns"),
                                                 [entries[i] for i in sorted(chosen)], ["a", "b"]), 5.0, None, None)
    assert given == domain.CleanGiven(run="dataclean.ns.wipe.1", files=[(0, f"x/d/f{i}") for i in range(3)],
                                      started_at=5.0)
    moved = [msgspec.structs.replace(e, path="/y/" + e.key.removeprefix("x/")) for e in entries]
    moved.append(entry("/x/d/new", 100))
    evicted = {(0, f"x/d/f{i}") for i in range(3)}
    assert domain.cleaned_files(plan, [wipe], {"dataclean.ns.wipe": given}, moved) == evicted
    assert domain.cleaned_files(plan, [wipe], {}, moved) == set(), "read against the manifest of now: nothing"
    everything = domain.clean_given(domain.plan_clean("dataclean.ns.wipe.2", ObjectRef(name="data", namespace="ns"),
                                                      None, ["a"]), 6.0, None, None)
    assert everything.everything
    assert domain.cleaned_files(plan, [wipe], {"dataclean.ns.wipe": everything}, moved) == {
        (file.mount, file.key) for file in plan.files}


def test_a_clean_run_twice_during_a_load_leaves_to_itself_the_files_of_both_runs() -> None:
    """A load started at 10; the clean ran at 20 on x/d, then (its spec changed) at 30 on x/e. Only the last run's
    files were kept: a replan of the load loaded x/d back behind the first run. Now the runs a load executing at the
    clean's plan had not started before are kept with it (``earlier``), and a replan leaves the files of each run that
    started after the load's to it; a run before the load's start, or kept with no load executing, is not."""
    ref = ObjectRef(name="data", namespace="ns")
    entries = [entry(f"/x/{folder}/f{i}", 100) for folder in "de" for i in range(3)]
    plan = domain.plan_load("dataload.ns.warm.1", ref, entries, dict.fromkeys(range(len(entries)), 1), ["a"], ["a"],
                            100)
    wipe = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="wipe", namespace="ns"),
                           clean=DataCleanSpec(dataset=DatasetRef(name="data", namespace="ns"),
                                               target=[CleanTarget(path="/x/e")]))

    def clean_run(number: int, folder: str) -> domain.Plan:
        chosen, _ = domain.select(entries, [CleanTarget(path=f"/x/{folder}")])
        return domain.plan_clean(f"dataclean.ns.wipe.{number}", ref, [entries[i] for i in sorted(chosen)], ["a"])

    load = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm", namespace="ns"),
                           load=DataLoadSpec(dataset=DatasetRef(name="data", namespace="ns")))
    since = domain.executing_loads_since(ref, {"dataload.ns.warm": load}, {
        "dataload.ns.warm": domain.RunState(run="dataload.ns.warm.1", stage="executing", started_at=10.0)})
    assert since == 10.0
    assert domain.executing_loads_since(ref, {"dataload.ns.warm": load}, {}) is None
    first = domain.clean_given(clean_run(1, "d"), 20.0, None, since)
    second = domain.clean_given(clean_run(2, "e"), 30.0, first, since)
    assert [run.run for run in second.earlier] == ["dataclean.ns.wipe.1"]
    both = {(0, f"x/{folder}/f{i}") for folder in "de" for i in range(3)}
    assert domain.cleaned_files(plan, [wipe], {"dataclean.ns.wipe": second}, [], since=10.0) == both
    assert domain.cleaned_files(plan, [wipe], {"dataclean.ns.wipe": second}, [], since=25.0) == both - {
        (0, f"x/d/f{i}") for i in range(3)}, "the first run came before that load's start"
    third = domain.clean_given(clean_run(3, "e"), 40.0, second, since=35.0)
    assert [run.run for run in third.earlier] == [], "no load executing then had started before them"
    again = domain.clean_given(clean_run(2, "e"), 30.0, second, since)
    assert again == second, "its own run planned again (a restart) is not kept twice"
