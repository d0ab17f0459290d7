"""What the dataset service keeps of two buckets, fed by watches and by its own writes, so a burst of applies
does not read them again and again:

- ``WatchedBindings``: the runtimes' bindings (phase, capacity) an apply, a sync and an inventory event read;
- ``WatchedPolicies``: each runtime's ``spec`` (its metadataSyncPolicy), which every look of the reconciler at a
  dataset needs (one KV read per status write before, the largest share of a burst's reads);
- ``WatchedRecords``: the newest ``shoal_datasets`` record of each dataset as the reconciler's watch showed it (or
  as this process wrote it), so a sync starts without reading the record again (a KV round trip per dataset at the
  start of its sync, and another when its own status write comes back through the watch).

Every record is kept whole (a synced one too: its autoSync listing, its references and its ``datasetRef`` are
worked out from it); memory grows with the number of datasets, not with the commands. An entry older than what is
known (a revision not above it: the watch catching up with a write of this process, or a replay after a reconnect)
changes nothing, so a sync never starts from a record older than one this process has seen. A record newer than
the one kept may exist in the bucket; its entry is on its way and schedules the sync again (level-triggered), and
the sync's status write is a compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
from nats.js.kv import KeyValue

from libs.bus import Replay, kv_watch
from libs.events.dataset import DatasetRecord
from libs.events.runtime import RuntimeSpec
from services.dataset import domain

_DECODER = msgspec.json.Decoder(DatasetRecord)
_BINDING = msgspec.json.Decoder(domain.RuntimeBinding)


# Deletes remembered so a write of this process noted late cannot bring a deleted key back (see ``note``): the
# window is one KV round trip, so the latest few thousand deletes cover any burst while memory stays bounded.
DELETES_KEPT = 4096


class WatchedRecords:
    def __init__(self) -> None:
        # key → (the newest record seen, its revision)
        self._seen: dict[str, tuple[DatasetRecord, int]] = {}
        # key → the revision of its delete, for the latest DELETES_KEPT deletes (oldest first)
        self._deleted: dict[str, int] = {}
        # Trusted once a watch has delivered the initial values: the reconciler then schedules a sync for every
        # newer entry. Without a watch (a caller driving ``sync`` itself), the sync reads the bucket.
        self._fed = False

    def observe(self, entry: KeyValue.Entry | Replay | None) -> None:
        if entry is None:
            self._fed = True
            return
        if isinstance(entry, Replay):
            return
        if entry.operation in ("DEL", "PURGE") or entry.value is None or entry.revision is None:
            self._seen.pop(entry.key, None)
            if entry.revision is not None:
                self._deleted.pop(entry.key, None)  # moved to the end: the newest delete
                self._deleted[entry.key] = entry.revision
                while len(self._deleted) > DELETES_KEPT:
                    del self._deleted[next(iter(self._deleted))]
            return
        try:
            record = _DECODER.decode(entry.value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self._seen.pop(entry.key, None)  # the sync reads it and says what is wrong with it
            return
        self.note(entry.key, record, entry.revision)

    def note(self, key: str, record: DatasetRecord, revision: int) -> None:
        """``record`` is stored at ``revision`` (seen in the watch, or written by this process). A write of this
        process noted after the watch showed the key's delete (which came behind it) changes nothing: the sync
        would otherwise start from a record that no longer exists."""
        known = self._seen.get(key)
        if known is not None and revision <= known[1]:
            return
        deleted = self._deleted.get(key)
        if deleted is not None:
            if revision < deleted:
                return
            del self._deleted[key]  # created again after it
        self._seen[key] = (record, revision)

    def get(self, key: str) -> tuple[DatasetRecord, int] | None:
        """(the record, its revision), or None when unknown here (read it)."""
        return self._seen.get(key) if self._fed else None


class _KeyWatch:
    """A watch of one bucket: ``_put`` for each value, ``_gone`` for each delete, ``ready`` once the initial values
    are in. A replay after a reconnect brings every entry again; what the subclass keeps already holds them."""

    def __init__(self, kv: KeyValue, reconnects: Callable[[], int] | None = None) -> None:
        self.kv = kv
        self.reconnects = reconnects
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        async with contextlib.aclosing(kv_watch(self.kv, self._stopping, self.reconnects)) as entries:
            async for entry in entries:
                if entry is None:
                    self.ready.set()
                elif isinstance(entry, Replay):
                    continue
                elif entry.operation in ("DEL", "PURGE") or entry.value is None or entry.revision is None:
                    self._gone(entry.key, entry.revision or 0)
                else:
                    self._put(entry.key, entry.value, entry.revision)

    def stop(self) -> None:
        self._stopping.set()

    def _put(self, key: str, value: bytes, revision: int) -> None:
        raise NotImplementedError

    def _gone(self, key: str, revision: int) -> None:
        raise NotImplementedError


class WatchedBindings(_KeyWatch):
    """The ``shoal_dataset_bindings`` bucket in memory (a watch), so an apply and a sync learn the runtime's phase
    without a KV round trip. This service is the bucket's only writer and notes each of its writes here at once with
    its revision; an older entry the watch delivers afterwards changes nothing, so a read here never goes back
    behind a write of this process. Until the initial values are in (``ready``), callers read the bucket.

    A deleted runtime's binding is deleted (``gone``): its revision is kept only until the watch delivers the
    marker, after which no older entry of the key can come (a watch delivers in order), so a runtime name deleted
    leaves nothing here."""

    def __init__(self, kv: KeyValue, reconnects: Callable[[], int] | None = None) -> None:
        super().__init__(kv, reconnects)
        # None: deleted here, its marker not delivered by the watch yet.
        self._values: dict[str, tuple[domain.RuntimeBinding | None, int]] = {}

    def _put(self, key: str, value: bytes, revision: int) -> None:
        try:
            binding = _BINDING.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.note(key, binding, revision)

    def _gone(self, key: str, revision: int) -> None:
        known = self._values.get(key)
        if known is None or revision >= known[1]:
            self._values.pop(key, None)

    def note(self, key: str, binding: domain.RuntimeBinding, revision: int) -> None:
        known = self._values.get(key)
        if known is None or revision > known[1]:
            self._values[key] = (binding, revision)

    def gone(self, key: str, revision: int) -> None:
        """This process deleted ``key`` by a marker at ``revision``: read as no binding, and the watch's older
        entries of it change nothing until the marker itself comes round."""
        known = self._values.get(key)
        if known is None or revision > known[1]:
            self._values[key] = (None, revision)

    def get(self, key: str) -> domain.RuntimeBinding:
        known = self._values.get(key)
        return known[0] if known is not None and known[0] is not None else domain.RuntimeBinding()

    def empty(self) -> list[tuple[str, domain.RuntimeBinding, int]]:
        """The bindings that say nothing but their fact's sequence (``domain.says_nothing``), with their revisions:
        those a runtime's delete left as values before it left a marker."""
        return [(key, binding, revision) for key, (binding, revision) in sorted(self._values.items())
                if binding is not None and domain.says_nothing(binding)]



class _Runtime(msgspec.Struct):
    spec: RuntimeSpec = RuntimeSpec()


class _RuntimeRecord(msgspec.Struct):
    """The part of a ``shoal_runtimes`` record read here (its status, written on every change, is skipped)."""

    runtime: _Runtime


_RUNTIME = msgspec.json.Decoder(_RuntimeRecord)


class WatchedPolicies(_KeyWatch):
    """The ``shoal_runtimes`` bucket's specs in memory (a watch). A change of a runtime's ``spec.management`` wakes
    its dataset (``wake``): its next autoSync listing moves, though the dataset's record did not change. Until the
    initial values are in (``ready``), callers read the bucket."""

    def __init__(self, kv: KeyValue, reconnects: Callable[[], int] | None = None) -> None:
        super().__init__(kv, reconnects)
        self.wake: Callable[[str], None] | None = None
        self._specs: dict[str, RuntimeSpec] = {}

    def _put(self, key: str, value: bytes, revision: int) -> None:
        try:
            spec = _RUNTIME.decode(value).runtime.spec
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self._changed(key, self._specs.get(key), spec)
        self._specs[key] = spec

    def _gone(self, key: str, revision: int) -> None:
        self._changed(key, self._specs.pop(key, None), None)

    def _changed(self, key: str, old: RuntimeSpec | None, new: RuntimeSpec | None) -> None:
        before = old.management if old is not None else None
        after = new.management if new is not None else None
        if before != after and self.wake is not None and self.ready.is_set():
            self.wake(key)

    def get(self, key: str) -> RuntimeSpec | None:
        """The runtime's spec; None when there is no runtime of that key."""
        return self._specs.get(key)
