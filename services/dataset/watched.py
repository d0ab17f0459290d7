"""The newest ``shoal_datasets`` record of each dataset as the reconciler's watch showed it (or as this process
wrote it), so a sync starts without reading the record again: a burst of applies saves a KV round trip per dataset
at the start of its sync, and another when its own status write comes back through the watch.

Only records that may need a sync are kept whole; a synced one (``domain.sync_due_in`` is None, whatever the clock)
is kept as its revision alone, so memory stays small with many datasets. An entry older than what is known (a
revision not above it: the watch catching up with a write of this process, or a replay after a reconnect) changes
nothing, so a sync never starts from a record older than one this process has seen. A record newer than the one
kept may exist in the bucket; its entry is on its way and schedules the sync again (level-triggered), and the sync's
status write is a compare-and-set.
"""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from libs.bus import Replay
from libs.events.dataset import DatasetRecord
from services.dataset import domain

_DECODER = msgspec.json.Decoder(DatasetRecord)


class WatchedRecords:
    def __init__(self) -> None:
        # key → (the record while it may need a sync, else None; its revision)
        self._seen: dict[str, tuple[DatasetRecord | None, int]] = {}

    def observe(self, entry: KeyValue.Entry | Replay | None) -> None:
        if entry is None or isinstance(entry, Replay):
            return
        if entry.operation in ("DEL", "PURGE") or entry.value is None or entry.revision is None:
            self._seen.pop(entry.key, None)
            return
        try:
            record = _DECODER.decode(entry.value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self._seen.pop(entry.key, None)  # the sync reads it and says what is wrong with it
            return
        self.note(entry.key, record, entry.revision)

    def note(self, key: str, record: DatasetRecord, revision: int) -> None:
        """``record`` is stored at ``revision`` (seen in the watch, or written by this process)."""
        known = self._seen.get(key)
        if known is not None and revision <= known[1]:
            return
        settled = domain.sync_due_in(record, 0.0, 0.0) is None
        self._seen[key] = (None if settled else record, revision)

    def get(self, key: str) -> tuple[DatasetRecord | None, int] | None:
        """(the record, its revision) when it may need a sync; (None, revision) when it is synced; None when
        unknown here (read it)."""
        return self._seen.get(key)
