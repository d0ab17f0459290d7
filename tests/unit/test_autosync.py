"""When the dataset service lists a dataset by itself (autoSync), pure: ``sync_policy``, ``next_sync`` and
``sync_changes_nothing`` of ``services.dataset.domain``; and the Fluid runtime's ``management`` in documents."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.documents import documents_to_commands, parse_documents
from libs.events.common import ObjectMeta, rfc3339
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import MetadataSyncPolicy, RuntimeApply, RuntimeManagement, RuntimeSpec
from services.dataset.domain import (
    REASON_FAILED,
    REASON_UNREACHABLE,
    SyncDue,
    SyncPolicy,
    SyncResult,
    next_sync,
    status_after_sync,
    sync_changes_nothing,
    sync_due_in,
    sync_policy,
)

NOW = 1_700_000_000.0
RETRY = 15.0
ON = SyncPolicy(auto=True, period_seconds=60.0)


def synced(at: float = NOW, files: int = 2, error: str = "", retryable: bool = False) -> DatasetRecord:
    record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="d"), spec=DatasetSpec(
        mounts=[Mount(mount_point="s3://bucket")])), generation=1)
    result = SyncResult(generation=1, file_num=files, total_bytes=10 * files, manifest="default.d", error=error,
                        retryable=retryable)
    return msgspec.structs.replace(record, status=status_after_sync(record, result, "Ready", at))


def runtime_spec(**policy: object) -> RuntimeSpec:
    return RuntimeSpec(management=RuntimeManagement(metadata_sync_policy=msgspec.convert(policy,
                                                                                          MetadataSyncPolicy)))


def test_policy_follows_fluid_autosync_unset_means_on() -> None:
    assert sync_policy(None, 300) == SyncPolicy(auto=True, period_seconds=300)
    assert sync_policy(RuntimeSpec(), 300) == SyncPolicy(auto=True, period_seconds=300)
    assert sync_policy(runtime_spec(autoSync=True, periodSeconds=5), 300) == SyncPolicy(auto=True, period_seconds=5)
    assert sync_policy(runtime_spec(autoSync=False), 300).auto is False


def test_a_synced_dataset_is_listed_again_one_period_after_its_last_listing() -> None:
    record = synced()
    assert next_sync(record, NOW + 10, RETRY, ON) == SyncDue("auto", 50.0)
    assert next_sync(record, NOW + 61, RETRY, ON) == SyncDue("auto", 0.0)
    # An unchanged listing wrote nothing: the service's own memory of it counts, not the older lastSyncTime.
    assert next_sync(record, NOW + 70, RETRY, ON, listed_at=NOW + 61) == SyncDue("auto", 51.0)


def test_autosync_off_or_without_a_period_plans_nothing() -> None:
    record = synced()
    assert next_sync(record, NOW + 1000, RETRY, SyncPolicy(auto=False, period_seconds=60)) is None
    assert next_sync(record, NOW + 1000, RETRY, SyncPolicy(auto=True, period_seconds=0)) is None
    assert sync_due_in(record, NOW + 1000, RETRY) is None  # the defaults: as before autoSync


def test_spec_resync_and_retry_come_first_and_a_failure_retrying_cannot_fix_waits() -> None:
    record = synced()
    newer = msgspec.structs.replace(record, generation=2)
    assert next_sync(newer, NOW, RETRY, ON) == SyncDue("spec", 0.0)
    asked = msgspec.structs.replace(record, sync_requests=1)
    assert next_sync(asked, NOW, RETRY, SyncPolicy(auto=False)) == SyncDue("resync", 0.0)
    unreachable = synced(error="cannot reach", retryable=True)
    assert unreachable.status.conditions[0].reason == REASON_UNREACHABLE
    assert next_sync(unreachable, NOW + 5, RETRY, ON) == SyncDue("retry", 10.0)
    failed = synced(error="no such bucket")
    assert failed.status.conditions[0].reason == REASON_FAILED
    assert next_sync(failed, NOW + 1000, RETRY, ON) is None


def test_a_last_sync_time_ahead_of_this_clock_delays_nothing_by_more_than_its_wait() -> None:
    """lastSyncTime written by another replica whose clock is ten minutes ahead (or before this host's clock was
    stepped back): the retry of an unreachable store waits at most its delay, an autoSync at most its period, not
    the skew on top of it."""
    unreachable = synced(at=NOW + 600, error="cannot reach", retryable=True)
    assert next_sync(unreachable, NOW, RETRY, ON) == SyncDue("retry", RETRY)
    assert next_sync(synced(at=NOW + 600), NOW, RETRY, ON) == SyncDue("auto", ON.period_seconds)


@settings(max_examples=60, deadline=None)  # pure arithmetic: a few dozen cases cover the branches
@given(elapsed=st.floats(0, 10_000), period=st.floats(1, 3600), listed=st.none() | st.floats(0, 10_000))
def test_never_due_before_a_period_after_the_last_listing(elapsed: float, period: float,
                                                          listed: float | None) -> None:
    record = synced()
    listed_at = None if listed is None else NOW + listed
    due = next_sync(record, NOW + elapsed, RETRY, SyncPolicy(auto=True, period_seconds=period), listed_at)
    assert due is not None and due.kind == "auto"
    last = max(NOW, listed_at or NOW)
    # A listing ahead of this clock (another clock, or this one stepped back) waits one period from now.
    assert due.in_seconds == pytest.approx(min(period, max(0.0, last + period - (NOW + elapsed))))


def test_an_unchanged_listing_changes_nothing() -> None:
    record = synced()
    same = SyncResult(generation=1, file_num=2, total_bytes=20, manifest="default.d", manifest_changed=False)
    assert sync_changes_nothing(record, same)
    assert not sync_changes_nothing(record, dataclasses.replace(same, manifest_changed=True))
    assert not sync_changes_nothing(record, dataclasses.replace(same, error="boom"))
    assert not sync_changes_nothing(record, dataclasses.replace(same, skipped=1, listed=3,
                                                                    skipped_examples=("k: why",)))
    assert not sync_changes_nothing(record, dataclasses.replace(same, requests=1))  # a resync counted
    assert not sync_changes_nothing(synced(error="cannot reach", retryable=True), same)

    # A record written before its status counted the objects left out (the condition the same, skippedObjects 0):
    # the listing writes the count rather than leaving it at 0 for good.
    skipping = dataclasses.replace(same, skipped=1, listed=3, skipped_examples=("k: why",))
    counted = msgspec.structs.replace(record, status=status_after_sync(record, skipping, "Ready", NOW))
    assert sync_changes_nothing(counted, skipping)
    uncounted = msgspec.structs.replace(counted, status=msgspec.structs.replace(counted.status, skipped_objects=0))
    assert not sync_changes_nothing(uncounted, skipping)


def test_the_sync_time_moves_only_with_a_written_status() -> None:
    record = synced()
    later = status_after_sync(record, SyncResult(generation=1, file_num=3, total_bytes=30, manifest="default.d"),
                              "Ready", NOW + 60)
    assert later.last_sync_time == rfc3339(NOW + 60) != record.status.last_sync_time


def test_a_clock_beyond_the_calendar_is_written_as_its_number_not_raised() -> None:
    """Nanoseconds taken for seconds: formatting them as a date would raise and fail every sync of the dataset."""
    result = SyncResult(generation=1, file_num=3, total_bytes=30, manifest="default.d")
    assert status_after_sync(synced(), result, "Ready", 1.7e18).last_sync_time == "1700000000000000000"


def test_a_fluid_runtime_keeps_its_metadata_sync_policy_and_notes_the_rest() -> None:
    commands, notes, errors = documents_to_commands(parse_documents("""
apiVersion: data.fluid.io/v1alpha1
kind: AlluxioRuntime
metadata: {name: demo}
spec:
  replicas: 2
  tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}
  management:
    cleanCachePolicy: {gracePeriodSeconds: 60}
    metadataSyncPolicy: {autoSync: false}
"""))
    assert errors == []
    [command] = commands
    assert isinstance(command.event, RuntimeApply)
    assert command.event.runtime.spec.management.metadata_sync_policy == MetadataSyncPolicy(auto_sync=False)
    assert notes == ["ignored: AlluxioRuntime default/demo: spec.management.cleanCachePolicy (not used by Shoal)"]
