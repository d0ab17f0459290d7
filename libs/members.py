"""Which replicas of a service are alive, and which keys each one reconciles (``Members``).

Replicas of a service share their commands through one durable consumer, but a reconciler follows a bucket's
watch, which every replica sees whole: without a split, each replica would list every dataset. So each key goes to
one live replica, its first owner by rendezvous hashing over the replicas' names (``libs.ring``, the same as block
owners): a replica that joins or leaves moves only the keys it gains or loses.

A replica announces itself in the ``shoal_members`` bucket every ``BEAT_SECONDS`` (key ``<service>.<replica>``)
and watches the keys of its service. One not heard from for ``REPLICA_TTL_SECONDS`` (three beats) is gone; one that
stops cleanly deletes its key, and the others take its keys at once. The bucket drops a key that is not written
again within the same time, so a replica that starts later never counts a dead one.

A beat also says the largest event the replica decodes (its ``SHOAL_MAX_EVENT_BYTES``): a publisher in another
process, the CLI, reads the smallest among a service's live replicas (``event_limits``) and refuses a command
larger than that before sending it, rather than sizing it by its own environment's value.

A beat's age is counted on this process's monotonic clock from when the beat was seen to change: a beat the watch
delivers as it is written (after the watch's initial values) was heard when it arrived, and no two clocks are
compared. On a JetStream cluster the KV entries are stamped by whichever server leads the bucket, and a new leader's
clock may be seconds off the old one's; when ages came from the stamps, a leader change counted that drift into every
beat's age until this replica's next own beat measured the clocks again, and a live replica could be dropped (its
keys taken, listed twice) or a dead one kept.

Only a beat that was not seen arriving needs its stamp: the watch's initial values, and a replay after a reconnect.
A replayed beat this replica already holds (the same revision) keeps the time it was heard: a dead replica's last
beat, replayed, is as old as it was (counted as heard then, it kept the replica alive for up to another TTL, its
datasets waiting that long). Any other such beat is placed on this process's clock by the server's stamp, read
through this replica's own beats: the server's stamp on each one and when its write returned here give the gap
between the two clocks, measured again at every beat. So no replica's clock is trusted, nor this host's wall clock,
and a skewed clock cannot keep a replica alive; a beat placed before this replica's own first beat is measured
counts as live, not judged, until it is (the bucket's TTL bounds what it holds).

While replicas join or leave, two of them may reconcile a key for a moment: reconciles are level-triggered and their
writes compare-and-set, so that costs a second listing, never a wrong record. A replica restarted under the same
name (a pod's name, the host's by default) takes its own keys back at once rather than waiting for its old beat to
age out.

A replica that was itself stalled (its event loop blocked, the process or its VM paused) heard nothing meanwhile:
the others' beats wait unread in its socket, and when it wakes their last beats look older than the TTL. Silence it
did not listen to says nothing about the others, so the time its loop did not run is not counted against them: it
looks at its clock every ``TICK_BEATS`` of a beat, and a look more than ``STALL_BEATS`` beats after the previous
one moves every replica's last beat forward by that gap. A replica that is really gone still ages out, a TTL of
listening later; one that is alive is heard again within a beat, and this replica does not take every key for a
moment (a second listing of each, and the store traffic, for nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from libs.bus import REPLICA_TTL_SECONDS, Replay, kv_keys, kv_watch
from libs.events.common import DECODE_ERRORS
from libs.ring import primary_owner
from libs.telemetry import get_logger

log = get_logger(__name__)

BEAT_SECONDS = REPLICA_TTL_SECONDS / 3
LEAVE_SECONDS = 1.0
# How often a replica looks at its own clock, as a fraction of its beat: often enough that a gap of a whole beat
# between two looks (STALL_BEATS) can only be its own event loop not running, never a tick that came a bit late.
TICK_BEATS = 0.25
STALL_BEATS = 1.0


class Beat(msgspec.Struct, frozen=True):
    """What a replica writes under its key: enough to find the process behind it."""

    replica: str
    host: str
    pid: int
    # The replica's SHOAL_MAX_EVENT_BYTES (``event_limits``); 0: not said (a replica from before the field).
    max_event_bytes: int = 0


class Members:
    """This replica's membership of ``service``, and the live replicas' split of keys (``owns``).

    ``ready`` is set once the bucket's current members are known (the watch's initial values): owning before
    that would take every key for a moment. ``on_change`` is called whenever the live set changes."""

    def __init__(self, kv: KeyValue, service: str, replica: str, *, beat_seconds: float = BEAT_SECONDS,
                 ttl_seconds: float = REPLICA_TTL_SECONDS, monotonic: Callable[[], float] = time.monotonic,
                 reconnects: Callable[[], int] | None = None, max_event_bytes: int = 0) -> None:
        self.kv = kv
        self.max_event_bytes = max_event_bytes
        self.service = service
        self.replica = replica
        self.beat_seconds = beat_seconds
        self.ttl_seconds = ttl_seconds
        self.monotonic = monotonic
        self.reconnects = reconnects
        self.on_change: Callable[[], None] | None = None
        self.ready = asyncio.Event()
        # replica → when its last beat was heard (this process's monotonic clock, s), and that beat's revision.
        self._heard: dict[str, float] = {}
        self._revisions: dict[str, int] = {}
        # Beats not seen arriving (initial values, a replay) while the server's clock is not known here yet: replica →
        # the server's stamp, placed on this process's clock once ``_offset`` is measured, live until then.
        self._unplaced: dict[str, float] = {}
        # This replica's own beats by revision: the server's stamp (from the watch) and when the write returned here
        # (monotonic), whichever is known first; the two together measure ``_offset``.
        self._stamped: dict[int, float] = {}
        self._written: dict[int, float] = {}
        self._offset: float | None = None  # this process's monotonic clock minus the server's, at its last beat
        self._live: tuple[str, ...] = (replica,)
        self._stopping = asyncio.Event()
        self._looked = monotonic()  # when this replica last looked at its clock (``_now``)

    @property
    def key(self) -> str:
        return f"{self.service}.{self.replica}"

    @property
    def live(self) -> tuple[str, ...]:
        """The replicas alive now, this one included, by name."""
        return self._live

    def owns(self, key: str) -> bool:
        return len(self._live) == 1 or primary_owner(key, self._live) == self.replica

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._looked = self.monotonic()
        beating = asyncio.create_task(self._beat())
        ticking = asyncio.create_task(self._tick())
        try:
            watch = kv_watch(self.kv, self._stopping, self.reconnects, keys=f"{self.service}.*")
            # Whether the watch is delivering what the bucket holds (its initial values, a replay) rather than beats
            # as they are written.
            catching_up = True
            async with contextlib.aclosing(watch) as entries:
                async for entry in entries:
                    if entry is None:
                        catching_up = False
                        self._refresh()
                        self.ready.set()
                    elif isinstance(entry, Replay):
                        catching_up = True
                    else:
                        self._watched(entry, catching_up)
                        self._refresh()
        finally:
            beating.cancel()
            ticking.cancel()
            await asyncio.gather(beating, ticking, return_exceptions=True)
            # Leaving cleanly: the others take this replica's keys now, not after its beat ages out. Bounded: with
            # NATS away, the beat ages out anyway, and a stop must not wait for a request timeout.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.kv.delete(self.key), LEAVE_SECONDS)

    def _watched(self, entry: KeyValue.Entry, catching_up: bool) -> None:
        """Take one beat (or a replica's leaving) from the watch: heard now if it arrived as written, else placed by
        its stamp, unless it is the beat already held."""
        replica = entry.key.partition(".")[2]
        now = self._now()  # a stall is accounted for before this beat counts
        if entry.operation in ("DEL", "PURGE"):
            self._forget(replica)
            return
        stamp = _stamp(entry.created)
        revision = entry.revision or 0
        if replica == self.replica and stamp is not None and revision:
            self._stamped[revision] = stamp
            self._measure()
        if not catching_up or stamp is None:  # as written (or, never seen from nats-py, not stamped): heard now
            self._hear(replica, now, revision)
        elif replica in self._heard and self._revisions.get(replica) == revision:
            pass  # replayed as it was: heard when it was, not now
        elif self._offset is not None:
            self._hear(replica, min(now, stamp + self._offset), revision)
        else:
            self._forget(replica)
            self._unplaced[replica] = stamp
            self._revisions[replica] = revision

    def _hear(self, replica: str, when: float, revision: int) -> None:
        self._unplaced.pop(replica, None)
        self._heard[replica] = when
        self._revisions[replica] = revision

    def _forget(self, replica: str) -> None:
        for held in (self._heard, self._unplaced, self._revisions):
            held.pop(replica, None)

    async def _beat(self) -> None:
        beat = msgspec.json.encode(Beat(replica=self.replica, host=socket.gethostname(), pid=os.getpid(),
                                        max_event_bytes=self.max_event_bytes))
        while not self._stopping.is_set():
            try:
                revision = await self.kv.put(self.key, beat)
            except Exception as err:  # NATS away for a moment: the next beat tries again; the others may drop us
                log.warning("replica beat not written", replica=self.replica, error=repr(err))
            else:
                # When the write returned, not when it was sent: the stamp is between the two, and erring late
                # makes the others' beats look younger (kept a moment longer), never older.
                self._written[revision] = self.monotonic()
                self._measure()
            self._refresh()  # replicas whose beats stopped age out here
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.beat_seconds)

    async def _tick(self) -> None:
        """Look at the clock every ``TICK_BEATS`` of a beat, so that a gap between two looks is a stall (``_now``)."""
        while not self._stopping.is_set():
            self._now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.beat_seconds * TICK_BEATS)

    def _measure(self) -> None:
        """The gap between this process's clock and the server's, from the newest own beat both sides know."""
        both = self._stamped.keys() & self._written.keys()
        if not both:
            # Kept small: a beat whose stamp never comes (a write whose answer was lost) is dropped with older ones.
            for pending in (self._stamped, self._written):
                while len(pending) > 8:
                    del pending[min(pending)]
            return
        revision = max(both)
        self._offset = self._written[revision] - self._stamped[revision]
        self._stamped = {rev: stamp for rev, stamp in self._stamped.items() if rev > revision}
        self._written = {rev: when for rev, when in self._written.items() if rev > revision}
        now = self.monotonic()
        for replica, stamp in list(self._unplaced.items()):
            self._hear(replica, min(now, stamp + self._offset), self._revisions.get(replica, 0))

    def _now(self) -> float:
        """The monotonic time, after moving the others' last beats forward by the time this replica's own loop did
        not run, if it stalled since it last looked: it heard nothing meanwhile, so their silence is not theirs."""
        now = self.monotonic()
        gap = now - self._looked
        self._looked = now
        if gap > self.beat_seconds * STALL_BEATS:
            log.warning("replica stalled, others' beats not judged for that time", service=self.service,
                        replica=self.replica, stalled_seconds=round(gap, 1))
            self._heard = {name: heard + gap for name, heard in self._heard.items()}
        return now

    def _refresh(self) -> None:
        now = self._now()
        # Aged-out replicas are forgotten, not only left out: pods get new names at every rollout.
        for replica in [name for name, heard in self._heard.items() if now - heard >= self.ttl_seconds]:
            self._forget(replica)
        live = tuple(sorted({self.replica, *self._heard, *self._unplaced}))
        if live == self._live:
            return
        log.info("replicas changed", service=self.service, replica=self.replica, live=list(live))
        self._live = live
        if self.on_change is not None:
            self.on_change()


async def event_limits(kv: KeyValue) -> dict[str, int]:
    """Per service, the smallest ``SHOAL_MAX_EVENT_BYTES`` its live replicas' beats say (the bucket keeps a beat no
    longer than a replica's TTL, so every beat there is a live replica's); a service none of whose replicas says
    one is left out."""
    limits: dict[str, int] = {}
    for key in await kv_keys(kv):
        try:
            entry = await kv.get(key)
            beat = msgspec.json.decode(entry.value or b"", type=Beat)
        except (KeyNotFoundError, *DECODE_ERRORS):  # gone meanwhile, or not a beat this process reads
            continue
        service = key.partition(".")[0]
        if beat.max_event_bytes > 0:
            limits[service] = min(beat.max_event_bytes, limits.get(service, beat.max_event_bytes))
    return limits


def _stamp(created: object) -> float | None:
    """The server's stamp on a KV entry, in seconds (nats-py gives a datetime, though it declares an int)."""
    return created.timestamp() if isinstance(created, datetime) else None
