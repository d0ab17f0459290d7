"""The dataset service's gauges, kept equal to the ``shoal_datasets`` bucket: datasets by phase (every phase, 0
included), and for each dataset synced at least once the objects and bytes its last sync found and the objects it
left out of the tree. It also keeps the nodes each dataset's status names (``nodes_named``): where the sweep of
departed nodes looks.

Fed by the reconciler's watch of the bucket (``Reconciler.observe``): no listing and no second watch. Each change
moves only its dataset's series (a burst of thousands of applies stays linear); the initial values, and a replay
after a reconnect, set every series at once when they are complete, removing those of datasets no longer there.
A deleted dataset's series are removed. Only the few fields read here are decoded.
"""

from __future__ import annotations

import contextlib
import typing
from collections import Counter

import msgspec
from nats.js.kv import KeyValue

from libs import metrics
from libs.bus import Replay
from libs.events.dataset import DatasetPhase

PHASES: tuple[DatasetPhase, ...] = typing.get_args(DatasetPhase)


class _Meta(msgspec.Struct, frozen=True):
    name: str = ""
    namespace: str = "default"


class _Dataset(msgspec.Struct, frozen=True):
    metadata: _Meta = _Meta()


class _Node(msgspec.Struct, frozen=True):
    node: str = ""


class _Status(msgspec.Struct, frozen=True, rename="camel"):
    phase: DatasetPhase = "NotBound"
    file_num: int = 0
    ufs_total_bytes: int = 0
    skipped_objects: int = 0
    last_sync_time: str = ""
    nodes: tuple[_Node, ...] = ()


class _Seen(msgspec.Struct, frozen=True):
    """What the gauges need of a ``DatasetRecord``."""

    dataset: _Dataset = _Dataset()
    status: _Status = _Status()

    @property
    def label(self) -> str:
        return metrics.dataset_label(self.dataset.metadata.namespace, self.dataset.metadata.name)


_DECODER = msgspec.json.Decoder(_Seen)
# The gauges with a series per synced dataset: set together, removed together.
_PER_DATASET = (metrics.DATASET_OBJECTS, metrics.DATASET_UFS_BYTES, metrics.DATASET_SKIPPED_OBJECTS)


class DatasetCensus:
    def __init__(self) -> None:
        self.seen: dict[str, _Seen] = {}
        self.phases: Counter[str] = Counter()
        # Entries of the initial values or of a replay, until they are complete (None from the watch).
        self._gathering: dict[str, _Seen] | None = {}

    def observe(self, entry: KeyValue.Entry | Replay | None) -> None:
        if isinstance(entry, Replay):
            self._gathering = {}
        elif entry is None:
            if self._gathering is not None:
                self._reset(self._gathering)
                self._gathering = None
        elif entry.operation in ("DEL", "PURGE") or entry.value is None:
            if self._gathering is not None:
                self._gathering.pop(entry.key, None)
            else:
                self._drop(entry.key)
        else:
            try:
                seen = _DECODER.decode(entry.value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                return  # the reconciler's load says what is wrong with it
            if self._gathering is not None:
                self._gathering[entry.key] = seen
            else:
                self._put(entry.key, seen)

    def nodes_named(self) -> dict[str, set[str]]:
        """Each dataset whose status names nodes (cache figures) → those nodes."""
        return {key: {node.node for node in record.status.nodes}
                for key, record in self.seen.items() if record.status.nodes}

    def _reset(self, seen: dict[str, _Seen]) -> None:
        self.seen = seen
        self.phases = Counter(record.status.phase for record in seen.values())
        for phase in PHASES:
            metrics.DATASETS.labels(phase).set(self.phases[phase])
        # One dataset service per process: these gauges are this bucket's, whatever an earlier view left.
        for gauge in _PER_DATASET:
            gauge.clear()
        for record in seen.values():
            self._export(record)

    def _put(self, key: str, record: _Seen) -> None:
        before = self.seen.get(key)
        self.seen[key] = record
        if before is None or before.status.phase != record.status.phase:
            if before is not None:
                self._count(before.status.phase, -1)
            self._count(record.status.phase, 1)
        self._export(record)

    def _drop(self, key: str) -> None:
        before = self.seen.pop(key, None)
        if before is None:
            return
        self._count(before.status.phase, -1)
        for gauge in _PER_DATASET:
            with contextlib.suppress(KeyError):  # never synced: no series
                gauge.remove(before.label)

    def _count(self, phase: str, by: int) -> None:
        self.phases[phase] += by
        metrics.DATASETS.labels(phase).set(self.phases[phase])

    @staticmethod
    def _export(record: _Seen) -> None:
        if not record.status.last_sync_time:
            return  # not listed yet: no objects to speak of
        metrics.DATASET_OBJECTS.labels(record.label).set(record.status.file_num)
        metrics.DATASET_UFS_BYTES.labels(record.label).set(record.status.ufs_total_bytes)
        metrics.DATASET_SKIPPED_OBJECTS.labels(record.label).set(record.status.skipped_objects)
