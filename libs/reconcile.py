"""Level-triggered reconciliation over a KV bucket: every key whose value changes gets ``reconcile(key)``.

The watch first replays every existing key, so work interrupted by a crash is picked up on restart without any
separate recovery path. At most one reconcile runs per key; a change that arrives meanwhile runs it once more
afterwards, also cutting short the wait of a key that asked to be retried later (a resync must not wait out the
retry delay of an unreachable endpoint). A key deleted while its reconcile runs or waits lets it end there, not at
its next run (an autoSync period may be hours, and every key deleted meanwhile would keep a task until then).

``reconcile`` speaks the handlers' retry vocabulary (``libs.bus``): returning means done until the next change,
or, when it returns a number, until the next change or that many seconds, whichever comes first (a schedule,
such as a dataset's periodic listing, not a failure: nothing is logged); ``RetryLater`` runs it again after its
delay (or a growing one; a run that works starts the count again); ``Conflict`` runs it again at once (another
writer won, re-read), after ``FREE_CONFLICTS`` in a row on the growing delay; ``Permanent`` is
logged and the key waits for its next change. A NATS error (a request timed out or refused while a cluster elects
a leader, the connection down) is retried on the redelivery schedule (``retry_delay``, from half a second, at most
``ERROR_RETRY_SECONDS``): a failover is over within seconds, and a flat wait would add to every reconcile it
interrupted. Any other error is logged and retried after ``ERROR_RETRY_SECONDS``, so a bug does not spin the CPU.

``observe``, when given, sees every item of the watch as it comes (entries, deletes, ``Replay``, the None after
the initial values): what a service counts about the bucket (its gauges) needs no watch of its own.

``owner``, when given (``libs.members.Members``), splits the keys between a service's replicas: this one
reconciles only the keys it owns, starts once the live replicas are known, and when they change takes up the keys
it gained (every key the watch showed is remembered, and which of them it owned at the last change; a key it
kept is not run again; a key a replay after a reconnect no longer shows is forgotten, as a deleted one is) and lets
go of those it lost (a reconcile waiting for its next
run ends there; one running finishes, and the new owner's runs too: level-triggered, so at worst twice).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

import nats.errors
from nats.js.kv import KeyValue

from libs.bus import Conflict, Permanent, Replay, RetryLater, kv_watch, retry_delay
from libs.telemetry import get_logger

log = get_logger(__name__)

# Returns None (done until the next change) or the seconds after which to run again anyway.
Reconcile = Callable[[str], Awaitable[float | None]]
Observe = Callable[[KeyValue.Entry | Replay | None], None]
# Back-off after an unexpected error in reconcile, so a bug does not spin the CPU.
ERROR_RETRY_SECONDS = 5.0
# Conflicts in a row run again at once; past these, on the redelivery schedule (a key fought over, or a reconcile
# that always loses its own write, must not spin the CPU).
FREE_CONFLICTS = 3


class Owner(Protocol):
    """Which keys this replica reconciles (``libs.members.Members``)."""

    ready: asyncio.Event
    on_change: Callable[[], None] | None

    def owns(self, key: str) -> bool: ...


class Reconciler:
    def __init__(self, kv: KeyValue, reconcile: Reconcile, reconnects: Callable[[], int] | None = None,
                 observe: Observe | None = None, owner: Owner | None = None) -> None:
        self.kv = kv
        self.reconcile = reconcile
        self.reconnects = reconnects
        self.observe = observe
        self.owner = owner
        self._known: set[str] = set()  # every key the watch showed (with an owner: to take up gained keys)
        self._owned: set[str] = set()  # of those, the keys this replica owned at the last look
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}
        # Keys deleted while their reconcile runs or waits: it ends there rather than at its next run, which may
        # be hours away (an autoSync period), so memory does not grow with the keys deleted within that time.
        self._gone: set[str] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        if self.owner is not None:
            self.owner.on_change = self._rebalance
            await self._until(self.owner.ready)
        # The keys a replay after a reconnect has shown so far (None: no replay under way).
        replayed: set[str] | None = None
        try:
            async with contextlib.aclosing(kv_watch(self.kv, self._stopping, self.reconnects)) as entries:
                async for entry in entries:
                    if self.observe is not None:
                        self.observe(entry)
                    if isinstance(entry, Replay):
                        replayed = set()
                        continue
                    if entry is None:
                        if replayed is not None:
                            self._forget_all_but(replayed)
                            replayed = None
                        continue
                    if entry.operation in ("DEL", "PURGE"):
                        self._forget(entry.key)
                        continue
                    if replayed is not None:
                        replayed.add(entry.key)
                    if self.owner is not None:
                        self._known.add(entry.key)
                    # A replay after a reconnect schedules every key again: level-triggered, so harmless.
                    self.schedule(entry.key)
        finally:
            for task in list(self._running.values()):
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for ``event``, or for a stop."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        ready = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([stopping, ready], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            ready.cancel()

    def _rebalance(self) -> None:
        """The live replicas changed: run the keys this one gained (not those it kept: each ran when it last
        changed, and a run of every key at every change of replicas would call ``reconcile`` thousands of times for
        nothing); wake those it lost, so they end."""
        assert self.owner is not None
        owned = {key for key in self._known if self.owner.owns(key)}
        for key in owned - self._owned:
            if key not in self._running:
                self.schedule(key)
        self._owned = owned
        for key, wake in list(self._wake.items()):
            if not self.owner.owns(key):
                wake.set()

    def _forget(self, key: str) -> None:
        """The key was deleted: no longer known, and its reconcile, if one runs or waits, ends."""
        self._known.discard(key)
        self._owned.discard(key)
        self._let_go(key)

    def _forget_all_but(self, replayed: set[str]) -> None:
        """A replay has shown every key the bucket holds: the keys it did not show were deleted while the watch was
        away, their delete markers purged since (``libs.markers``, after a week) or the bucket made again, so no
        delete came to say so. Forgotten as if deleted, or each stayed known (and ran again at every change of
        replicas) until the process restarted."""
        for key in (self._known | set(self._running)) - replayed:
            self._forget(key)

    def _let_go(self, key: str) -> None:
        """The key was deleted: its reconcile, if one runs or waits, ends (a later change schedules it again)."""
        if key in self._running:
            self._gone.add(key)
            if key in self._wake:
                self._wake[key].set()

    def schedule(self, key: str) -> None:
        self._gone.discard(key)  # changed again after a delete: there is work again
        if self.owner is not None:
            if not self.owner.owns(key):
                return  # another replica's: its own watch schedules it there
            self._owned.add(key)
        if key in self._running:
            self._again.add(key)
            if key in self._wake:
                self._wake[key].set()
            return
        self._running[key] = asyncio.create_task(self._work(key), name=f"reconcile {key}")

    async def _work(self, key: str) -> None:
        retries = conflicts = 0  # failures in a row: a run that works starts the count again
        try:
            while True:
                if self.owner is not None and not self.owner.owns(key):
                    return  # handed to another replica meanwhile
                if key in self._gone:
                    return
                self._again.discard(key)
                delay: float | None = None
                try:
                    delay = await self.reconcile(key)
                    retries = conflicts = 0
                except RetryLater as err:
                    retries += 1
                    delay = retry_delay(retries) if err.delay is None else err.delay
                    log.info("reconcile later", key=key, reason=err.reason, delay=delay)
                except Conflict as err:
                    conflicts += 1
                    # At once (the winner's write is there to re-read), unless it keeps losing: then it waits.
                    delay = 0.0 if conflicts <= FREE_CONFLICTS else retry_delay(conflicts - FREE_CONFLICTS)
                    log.info("reconcile conflict, again", key=key, reason=str(err), delay=delay)
                except Permanent as err:
                    log.warning("reconcile gave up", key=key, reason=err.reason)
                except nats.errors.Error as err:
                    retries += 1
                    delay = min(retry_delay(retries), ERROR_RETRY_SECONDS)
                    log.warning("reconcile interrupted by NATS, again", key=key, error=repr(err), delay=delay)
                except Exception:
                    log.exception("reconcile failed", key=key)
                    delay = ERROR_RETRY_SECONDS
                if key in self._again:
                    continue
                if delay is None or key in self._gone:
                    return
                wake = self._wake[key] = asyncio.Event()
                stopping = asyncio.ensure_future(self._stopping.wait())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait([stopping, woken], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    woken.cancel()
                    self._wake.pop(key, None)
                if self._stopping.is_set():
                    return
        finally:
            # A change noted meanwhile is another owner's, a stop's or a deleted key's now: nothing to run here.
            self._running.pop(key, None)
            self._again.discard(key)
            self._gone.discard(key)
