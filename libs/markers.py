"""Delete markers no reader needs any more: which ones they are, and purging them from Shoal's buckets.

Every delete leaves a marker behind: a KV ``DEL`` (with its note, ``libs.deletion``) or ``PURGE`` message on the
key's subject, the revisions before it where the bucket keeps history, and in the Object Store a meta message saying
``deleted``. JetStream keeps them for ever, so a cluster whose CronJob made and deleted a DataLoad every minute grew
its buckets without bound. Each service purges the markers of the buckets it owns (``SWEEPS``) once they are older
than ``RETENTION_SECONDS``, the commands stream's max_age, because what reads a marker needs it no longer than that:

- an apply delivered again behind the delete that overtook it (``libs.deletion``) was published before that delete,
  so once the marker is older than the commands stream keeps a message, that apply is gone and never comes again;
- the loader's run numbering (``DeletionNote.runs``): an operation applied again under a deleted one's name numbers
  its runs after it, as run and part ids are message ids. Past the retention no stream holds a message of those runs
  (the task and progress streams keep a day, the facts a week, dedup two minutes), and the agents forget cancelled
  runs after a day, so a name applied again numbers from 1 without meeting any of them;
- the dataset service's delete note (the manifests a stopped delete still has to remove): a delete is finished, or
  delivered again, within its redeliveries, far inside the retention; incarnations are fresh ids, not markers;
- the bridge telling a TTL removal from a delete command (the operations bucket's history): it looks when the
  operation goes; a bridge down for longer than the retention leaves the custom resource in place (its status is
  final) instead of deleting it;
- a watch catching up after a restart: a key it no longer finds is gone from its view, as a deleted one is; and a
  running ``KvMirror`` forgets a deleted key's revision once its marker is that old, so it keeps what a mirror
  started after the purge would.

One replica of a service sweeps (``MarkerSweeper``'s ``owner``, the dataset service's ``Members``): the one that owns
``SWEEP_KEY`` among the live replicas, by the same rendezvous hashing that splits the datasets; the others would
only read every key of the buckets again to find the markers it purged. While the replicas change, two may sweep
once; that is harmless, as below.

The purge names the marker's subject and stops at its sequence (JetStream's purge with ``filter`` and ``seq``): a
key written again after the marker was read keeps its new value, so replicas sweeping together, or a sweep racing
an apply, remove nothing live; a marker purged twice is purged once. A pass reads the last message of every key
(headers only, for KV) and purges at most ``SWEEP_LIMIT`` markers per bucket, so a backlog drains over passes.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nats.js.kv import KeyValue

from libs import natsauth, subjects
from libs.bus import COMMANDS_MAX_AGE, Bus, initial_entries, object_deleted, object_metas, object_name
from libs.telemetry import get_logger

log = get_logger(__name__)

# How long a marker stays: the commands stream's max_age (see the module docstring for why that is enough).
RETENTION_SECONDS = COMMANDS_MAX_AGE
# How often a service sweeps its buckets: markers that wait ten minutes past a week cost nothing, and a pass reads
# every key of the bucket once.
MARKER_SWEEP_SECONDS = 600.0
# Markers purged per bucket per pass, one API request each: a CronJob deleting an operation a minute leaves ten per
# pass, and a backlog of a cluster that never swept drains at this pace without a pass taking long.
SWEEP_LIMIT = 1000
# How long a pass waits for the next key of its watch: the initial values come back to back.
READ_SECONDS = 5.0

# The key whose owner among a service's live replicas sweeps (``libs.members.Members.owns``): any fixed name will do.
SWEEP_KEY = "delete-markers"

DELETE_OPERATIONS = ("DEL", "PURGE")


@dataclass(frozen=True)
class Marker:
    """One marker to purge: its subject and stream sequence, and the key or object name it stands for."""

    subject: str
    sequence: int
    name: str


@dataclass(frozen=True)
class Sweep:
    """What one service purges: its KV buckets, and the Object Store names it owns (``objects``; None: none)."""

    buckets: tuple[str, ...]
    objects: Callable[[str], bool] | None = None


def is_loader_object(name: str) -> bool:
    return subjects.loader_object(name) is not None


def is_dataset_manifest(name: str) -> bool:
    return subjects.loader_object(name) is None


# The Object Store is shared: the dataset service sweeps the manifests, the loader its own objects.
DATASET_SWEEP = Sweep(subjects.SWEPT_BY_DATASET, is_dataset_manifest)
RUNTIME_SWEEP = Sweep(subjects.SWEPT_BY_RUNTIME)
LOADER_SWEEP = Sweep(subjects.SWEPT_BY_LOADER, is_loader_object)
BRIDGE_SWEEP = Sweep(subjects.SWEPT_BY_BRIDGE)


def expired(created: object, cutoff: datetime.datetime) -> bool:
    """A marker written before ``cutoff`` (one without a time is kept: nothing says it is old). nats-py types an
    entry's ``created`` as an int and sets it to the message's time, a datetime."""
    return isinstance(created, datetime.datetime) and created < cutoff


async def _old_markers(kv: KeyValue, cutoff: datetime.datetime, limit: int,
                       is_marker: Callable[[KeyValue.Entry], bool], headers_only: bool) -> list[Marker]:
    """The markers among the last entries of ``kv``'s keys written before ``cutoff``, at most ``limit``."""
    found: list[Marker] = []
    watcher = await kv.watchall(meta_only=headers_only)
    try:
        async for entry in initial_entries(watcher, READ_SECONDS):
            if entry.revision and is_marker(entry) and expired(entry.created, cutoff):
                found.append(Marker(f"{kv._pre}{entry.key}", entry.revision, entry.key))
                if len(found) == limit:
                    break
    finally:
        await watcher.stop()
    return found


async def _purge(bus: Bus, stream: str, markers: list[Marker]) -> None:
    """Purge each marker and what its subject holds before it, never what came after (``seq`` is exclusive)."""
    for marker in markers:
        await bus.refusable(natsauth.stream_api("PURGE", stream),
                            bus.js.purge_stream(stream, seq=marker.sequence + 1, subject=marker.subject))


async def purge_kv_markers(bus: Bus, bucket: str, cutoff: datetime.datetime, limit: int = SWEEP_LIMIT) -> list[str]:
    """Purge the delete and purge markers of ``bucket`` written before ``cutoff`` (at most ``limit``); their keys."""
    kv = await bus.kv(bucket)
    markers = await _old_markers(kv, cutoff, limit, lambda entry: entry.operation in DELETE_OPERATIONS, True)
    await _purge(bus, natsauth.kv_stream(bucket), markers)
    return [marker.name for marker in markers]


async def purge_deleted_objects(bus: Bus, cutoff: datetime.datetime, owns: Callable[[str], bool],
                                limit: int = SWEEP_LIMIT) -> list[str]:
    """Purge the meta messages of the objects deleted before ``cutoff`` whose names ``owns`` (at most ``limit``);
    their names. A deleted object's chunks went with its delete; its meta message is all that is left."""
    bucket = subjects.OBJ_MANIFESTS
    stream = natsauth.object_stream(bucket)
    metas = object_metas(bus.js, bucket)

    def deleted_and_owned(entry: KeyValue.Entry) -> bool:
        name = object_name(entry.key)
        return name is not None and owns(name) and object_deleted(entry.value)

    markers = await _old_markers(metas, cutoff, limit, deleted_and_owned, False)
    await _purge(bus, stream, markers)
    return [object_name(marker.name) or marker.name for marker in markers]


class SweepOwner(Protocol):
    """Which replica of a service sweeps (``libs.members.Members``)."""

    ready: asyncio.Event

    def owns(self, key: str) -> bool: ...


class MarkerSweeper:
    """A service's periodic purge of its buckets' old markers (``Periodic``'s tick).

    Its clock is the wall clock, not the service's: the markers' ages are the server's timestamps. With ``owner``
    (a service with replicas), only the replica that owns ``SWEEP_KEY`` sweeps, once the live replicas are known."""

    def __init__(self, bus: Bus, sweep: Sweep, clock: Callable[[], float] = time.time,
                 retention: float = RETENTION_SECONDS, limit: int = SWEEP_LIMIT,
                 owner: SweepOwner | None = None) -> None:
        self.bus = bus
        self.sweep = sweep
        self.clock = clock
        self.retention = retention
        self.limit = limit
        self.owner = owner

    async def tick(self) -> dict[str, int] | None:
        """One pass: the markers purged per bucket, or None when another replica sweeps."""
        if self.owner is not None and not (self.owner.ready.is_set() and self.owner.owns(SWEEP_KEY)):
            return None
        cutoff = datetime.datetime.fromtimestamp(self.clock() - self.retention, datetime.UTC)
        purged: dict[str, int] = {}
        for bucket in self.sweep.buckets:
            if keys := await purge_kv_markers(self.bus, bucket, cutoff, self.limit):
                purged[bucket] = len(keys)
        owns = self.sweep.objects
        if owns is not None and (names := await purge_deleted_objects(self.bus, cutoff, owns, self.limit)):
            purged[subjects.OBJ_MANIFESTS] = len(names)
        if purged:
            log.info("old delete markers purged", purged=purged, retention_seconds=self.retention)
        return purged
