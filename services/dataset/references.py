"""Which datasets are references to which source, kept from the reconciler's watch of ``shoal_datasets``.

A reference's status mirrors its source's (``domain.reference_status``), so every change of a source (a sync,
its cache states, its phase, its deletion) must reach the references to it: their own keys did not change, so the
reconciler would not look at them. Fed by ``Reconciler.observe`` (no second watch), this index asks the
reconciler to reconcile each reference of a key that changed or was deleted, and a source whose references
changed (its ``datasetRef``). In memory only: the watch replays
every key at start and after a reconnect, which rebuilds it (and reconciles every reference anyway).
Only the few fields read here are decoded.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable

import msgspec
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import Replay
from libs.events.common import DECODE_ERRORS
from libs.references import PREFIX
from libs.references import parse as parse_reference


class _Mount(msgspec.Struct, frozen=True, rename="camel"):
    mount_point: str = ""


class _Spec(msgspec.Struct, frozen=True):
    mounts: list[_Mount] = []


class _Dataset(msgspec.Struct, frozen=True):
    spec: _Spec = _Spec()


class _Seen(msgspec.Struct, frozen=True):
    dataset: _Dataset = _Dataset()


_DECODER = msgspec.json.Decoder(_Seen)


def source_key(value: bytes) -> str | None:
    """The ``shoal_datasets`` key of the source a stored record references, or None (not a reference)."""
    try:
        seen = _DECODER.decode(value)
    except DECODE_ERRORS:
        return None
    for mount in seen.dataset.spec.mounts:
        if mount.mount_point.startswith(PREFIX):
            ref = parse_reference(mount.mount_point)[0]
            return subjects.resource_key(ref.namespace, ref.name) if ref is not None else None
    return None


class ReferenceIndex:
    def __init__(self) -> None:
        # Reference key → its source's key, and the reverse.
        self.source_of: dict[str, str] = {}
        self.references: defaultdict[str, set[str]] = defaultdict(set)
        # The reconciler's ``schedule``, given once it exists (it takes this index's ``observe``).
        self.schedule: Callable[[str], None] = lambda key: None

    def observe(self, entry: KeyValue.Entry | Replay | None) -> None:
        if entry is None or isinstance(entry, Replay):
            return  # a replay brings every key again, and the reconciler reconciles each
        key = entry.key
        before = self._forget(key)
        after = None
        if entry.operation not in ("DEL", "PURGE") and entry.value:
            after = source_key(entry.value)
            if after is not None:
                self.source_of[key] = after
                self.references[after].add(key)
        for reference in sorted(self.references.get(key, ())):
            self.schedule(reference)
        if before != after:  # a source whose references changed names them in its status (datasetRef)
            for source in (before, after):
                if source is not None:
                    self.schedule(source)

    def referencing(self, key: str) -> list[str]:
        """The references to the dataset at ``key`` (``<namespace>.<name>``), sorted."""
        return sorted(self.references.get(key, ()))

    def _forget(self, key: str) -> str | None:
        """Drop ``key`` as a reference; the source it referenced, if any."""
        source = self.source_of.pop(key, None)
        if source is not None:
            self.references[source].discard(key)
            if not self.references[source]:
                with contextlib.suppress(KeyError):
                    del self.references[source]
        return source
