"""Keeping a labelled Prometheus gauge equal to a mapping that a service recounts from its in-memory view.

A service that holds a view of a bucket (``KvMirror``) recounts, every fraction of a second, the gauges it owns
(runtimes by phase, workers per runtime, operations, their bytes). ``GaugeFamily.update`` sets only the series
whose value changed and removes those no longer in the mapping (a deleted runtime or operation), so a recount of
an unchanged view costs dictionary lookups, not a lock per series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import Gauge


class GaugeFamily:
    """The series of ``gauge`` this process set, by label values."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.values: dict[tuple[str, ...], float] = {}

    def update(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Make the gauge's series exactly ``values`` (label values → value)."""
        for labels, value in values.items():
            if self.values.get(labels) != value:
                self.gauge.labels(*labels).set(value)
        for gone in self.values.keys() - values.keys():
            with contextlib.suppress(KeyError):  # removed meanwhile by someone else: gone either way
                self.gauge.remove(*gone)
        self.values = dict(values)
