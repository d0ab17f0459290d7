"""Histogram buckets against what the dashboards compute from them: ``histogram_quantile`` of a latency that falls
past a histogram's last finite bucket is that bucket's bound, so a panel of p99 or p95 can show no more than it.
The slow ends of what each histogram measures must fit: a FUSE read waits for the store's or a peer's timeout, a
sync of a large dataset lists for minutes."""

from __future__ import annotations

import inspect
import math

from prometheus_client import Histogram

from libs import metrics
from libs.ufs.s3 import S3ObjectStore
from services.agent.peer import TOTAL_TIMEOUT

# docs/benchmarks.md: a full sync lists about 4,100 objects a second; ImageNet's training set is 1.28 million.
LISTED_PER_SECOND = 4_100
LARGE_DATASET_OBJECTS = 1_281_167


def histogram_quantile(q: float, child: Histogram) -> float:
    """Prometheus's ``histogram_quantile`` over one series' buckets, as a dashboard panel computes it."""
    bounds = list(child._upper_bounds)
    counts = [bucket.get() for bucket in child._buckets]
    cumulative = [sum(counts[:i + 1]) for i in range(len(counts))]
    rank = q * cumulative[-1]
    index = next(i for i, seen in enumerate(cumulative) if seen >= rank)
    if math.isinf(bounds[index]):
        return bounds[index - 1]  # past the last finite bucket: its bound, whatever the latency was
    lower = bounds[index - 1] if index else 0.0
    below = cumulative[index - 1] if index else 0.0
    return lower + (bounds[index] - lower) * (rank - below) / (cumulative[index] - below)


def test_a_read_stalled_on_the_store_or_a_peer_shows_its_time_in_the_fuse_latency() -> None:
    read_timeout = inspect.signature(S3ObjectStore).parameters["read_timeout"].default
    for stalled in (read_timeout, TOTAL_TIMEOUT):
        child = metrics.FUSE_SECONDS.labels("buckets-node", f"t/stalled-{stalled:g}", "read")
        for _ in range(100):
            child.observe(stalled)
        # Within the bucket that holds it: at least the bucket below's bound, never capped below the stall.
        assert histogram_quantile(0.99, child) >= stalled / 2, (stalled, child._upper_bounds)
        metrics.FUSE_SECONDS.remove("buckets-node", f"t/stalled-{stalled:g}", "read")


def test_the_sync_time_of_a_large_dataset_shows_in_its_quantile() -> None:
    seconds = LARGE_DATASET_OBJECTS / LISTED_PER_SECOND
    child = metrics.DATASET_SYNC_SECONDS.labels("buckets-test")
    for _ in range(20):
        child.observe(seconds)
    assert histogram_quantile(0.95, child) >= seconds / 2, (seconds, child._upper_bounds)
    metrics.DATASET_SYNC_SECONDS.remove("buckets-test")


def test_the_quantile_is_the_latency_when_the_buckets_hold_it() -> None:
    child = Histogram("t_seconds", "t", ["x"], buckets=(1.0, 2.0, 4.0), registry=None).labels("a")
    for value in (0.5, 1.5, 3.0, 3.5):
        child.observe(value)
    assert histogram_quantile(0.5, child) == 2.0
    child.observe(100.0)
    assert histogram_quantile(0.99, child) == 4.0  # past the last bound: the bound, as Prometheus answers
