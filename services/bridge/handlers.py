"""Bridge handlers: a custom resource seen on a watch → finalizer, Secrets, apply/delete command; Shoal's state (KV
mirrors, rejection facts) → status patch, PersistentVolume and claim, Kubernetes Events.

Level-triggered like a controller: ``on_object`` acts on an object's latest version, and ``tick`` (every fraction
of a second) writes what each object should show and finishes what failed before, so a write lost to an
unreachable API server is made again once it answers. Decisions are ``domain``'s; here is the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.errors
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from libs import kube, subjects
from libs.backoff import Backoff
from libs.bus import MESSAGE_LIMIT, Bus, KvMirror, initial_entries, kv_delete
from libs.config import Settings
from libs.events.dataset import DatasetDelete, DatasetRecord, DatasetResync
from libs.events.operation import DataCleanDelete, DataLoadDelete, OperationRecord, OperationStatus
from libs.events.runtime import RuntimeDelete, RuntimeRecord
from libs.members import BEAT_SECONDS, event_limits
from libs.telemetry import get_logger
from services.bridge import domain
from services.bridge.domain import ObjectKey, Refusal

log = get_logger(__name__)

# API calls the bridge makes per write: well under a watch's lifetime, long enough for a slow apiserver. A pass
# (``tick``) waits it out once at most: the first call that does ends the pass (``_NotAnswering``), since every
# other call would wait as long, one after another, while nothing else is bridged.
REQUEST_TIMEOUT_SECONDS = 10.0
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# A finalizer patch refused because the object changed since it was read (409) is built again from a fresh read this
# many times in a row; each retry follows a change someone else made, so more means a writer as busy as the
# bridge, and the next pass (``tick``) tries again.
FINALIZER_TRIES = 5
# Status writes and retries after a failed pass: soon, but at most every 5 s, so status catches up within seconds
# of the API server's return without a request per object at every tick while it is down.
TICK_RETRY = Backoff(first=0.5, cap=5.0)
# An object whose handling failed (its finalizer patch, its delete, its Secret keys' removal) is tried again after
# this, per object: longer than a pass's back-off, so an object whose calls hang (each waits out
# REQUEST_TIMEOUT_SECONDS, and is tried at the end of a pass) leaves most passes to the other objects.
OBJECT_RETRY = Backoff(first=0.5, cap=10.0)
# Module-level so tests can shorten it (the kubelet's refresh is what it waits for).
MIRROR_RESYNC_SECONDS = domain.MIRROR_RESYNC_SECONDS
# How long the services' event limits read from their beats (``_event_limit``) are used before they are read again:
# a beat is written this often, and a pass (a re-list after a restart) translates thousands of objects, each of
# which would otherwise read every beat in the members bucket.
EVENT_LIMITS_SECONDS = BEAT_SECONDS
# Events remembered per object (``recorded_events``): the few its current state can still record.
EVENTS_KEPT = 8


# Status write answers that say the write is wrong, not that the API server is unavailable: the object is gone (404;
# its DELETED event follows), made again under its name (422: the patch's uid test failed), the server's validation
# refuses this status (400, 422) or it is too large (413: the request body's limit, or the object's in etcd, which a
# status of thousands of nodes on a large spec can pass). The same status would get the
# same answer at every pass, and keep every other object's status waiting behind the failed pass (``TICK_RETRY``):
# it is dropped, with the reason, until Shoal's status or the object's changes.
STATUS_REFUSALS = (400, 404, 413, 422)
REASON_STATUS_REFUSED = "StatusRefused"
# Event create answers that refuse this Event (its fields or size), not an unavailable API server: the same Event
# would be refused at every pass, and an Event only informs, so it is logged with the server's reason and given up.
EVENT_REFUSALS = (400, 413, 422)


@dataclass(frozen=True)
class Written:
    """A status the bridge wrote (``desired``) and the object's status the server showed after it (``stored``:
    None when unknown). Written again only when Shoal's status changes or the object's is not what the server showed
    then (someone else wrote it), never because the server stores less than was sent (a schema that prunes a
    field), which another write would not change."""

    desired: dict[str, Any] | None
    stored: dict[str, Any] | None


class _Unavailable(Exception):
    """An object could not be handled: the rest of this tick waits for the next."""


class _NotAnswering(_Unavailable):
    """A call of this pass waited out its timeout (or found no connection): the pass ends there."""


@dataclass
class Gone:
    """An object deleted from Kubernetes whose end in Shoal is not done yet: its delete command (unless
    ``delete_sent``), its Secret keys in the mirror (those its published spec referred to: ``held``), its entry in
    the bridge's bucket. Kept until all of it is done: retried, never dropped."""

    key: ObjectKey
    obj: dict[str, Any]
    held: frozenset[str] = frozenset()
    delete_sent: bool = False


@dataclass(frozen=True)
class Failure:
    """How often an object's handling failed in a row, why (the last time it was logged), and when to try again."""

    count: int
    reason: str
    retry_at: float


class RejectionFact(msgspec.Struct, frozen=True, rename="camel"):
    """What the bridge reads of any ``*.rejected`` fact (dataset, runtime, operation): the command and why."""

    causation_id: str = ""
    reason: str = ""


@dataclass
class Mirrors:
    """Shoal's current state, kept by KV watches (``libs.bus.KvMirror``)."""

    datasets: KvMirror[DatasetRecord]
    runtimes: KvMirror[RuntimeRecord]
    operations: KvMirror[OperationRecord]

    def ready(self) -> bool:
        return all(m.ready.is_set() for m in (self.datasets, self.runtimes, self.operations))

    def status_of(self, key: ObjectKey) -> msgspec.Struct | None:
        family = domain.family(key.resource)
        if family == "dataset":
            dataset = self.datasets.values.get(subjects.resource_key(key.namespace, key.name))
            return dataset.status if dataset is not None else None
        if family == "runtime":
            runtime = self.runtimes.values.get(subjects.resource_key(key.namespace, key.name))
            return runtime.status if runtime is not None else None
        operation = self.operation(key)
        return operation.status if operation is not None else None

    def command_sequence(self, key: ObjectKey) -> int | None:
        """The commands-stream sequence of the last apply Shoal's record under ``key``'s name took in (None: none)."""
        family = domain.family(key.resource)
        record: DatasetRecord | RuntimeRecord | OperationRecord | None
        if family == "dataset":
            record = self.datasets.values.get(subjects.resource_key(key.namespace, key.name))
        elif family == "runtime":
            record = self.runtimes.values.get(subjects.resource_key(key.namespace, key.name))
        else:
            record = self.operation(key)
        return record.command_sequence if record is not None else None

    def operation(self, key: ObjectKey) -> OperationRecord | None:
        return self.operations.values.get(subjects.operation_key(key.resource.kind, key.namespace, key.name))

    def exists(self, key: ObjectKey) -> bool:
        family = domain.family(key.resource)
        if family in ("dataset", "runtime"):
            mirror: KvMirror[Any] = self.datasets if family == "dataset" else self.runtimes
            return subjects.resource_key(key.namespace, key.name) in mirror.values
        return subjects.operation_key(key.resource.kind, key.namespace, key.name) in self.operations.values


@dataclass
class BridgeHandlers:
    bus: Bus
    api: client.ApiClient
    settings: Settings
    mirrors: Mirrors
    clock: Callable[[], float] = time.time
    # The latest version of every custom resource the watches delivered.
    objects: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    # The apply command id published for each object's current spec (deterministic: rebuilt by a re-list).
    published: dict[ObjectKey, str] = field(default_factory=dict)
    # Why the bridge itself could not turn an object into a command.
    invalid: dict[ObjectKey, str] = field(default_factory=dict)
    # Rejection facts by the id of the command they refused, the facts-stream sequence of the latest, and the ids
    # whose rejection is not in the bridge's bucket yet (``_record_rejections``: a restart then sends them again).
    rejections: dict[str, str] = field(default_factory=dict)
    rejection_sequences: dict[str, int] = field(default_factory=dict)
    unrecorded: set[str] = field(default_factory=set)
    # Objects whose last handling failed (an API or NATS error): ``tick`` handles them again.
    pending: set[ObjectKey] = field(default_factory=set)
    # The bridge's bucket (``subjects.KV_BRIDGE_APPLIED``) as a KV mirror: the apply last published per object uid,
    # across restarts. None: this process's memory only (``published``).
    applied: KvMirror[domain.Applied] | None = None
    # Objects gone from Kubernetes whose end in Shoal is not done (by uid), and the per-object retry state of what
    # failed (an ObjectKey for ``_handle``, a uid for a ``Gone``).
    gone: dict[str, Gone] = field(default_factory=dict)
    failures: dict[ObjectKey | str, Failure] = field(default_factory=dict)
    volumes: set[ObjectKey] = field(default_factory=set)
    # Bound Datasets whose volume or claim name is taken by an object not theirs, and why; looked at again at the
    # next list, or as soon as the dataset holding the name deletes its volume.
    volume_conflicts: dict[ObjectKey, str] = field(default_factory=dict)
    # The Events recorded for each object, by name, oldest first: the last ``EVENTS_KEPT`` of each live object.
    recorded_events: dict[ObjectKey, dict[str, None]] = field(default_factory=dict)
    deletes_sent: set[ObjectKey] = field(default_factory=set)
    # Which objects stand for each Shoal record (``domain.record_key``): more than one, and all but one are refused.
    claims: dict[tuple[str, str, str], set[ObjectKey]] = field(default_factory=dict)
    # (resource, namespace or None) listed at least once, and objects that wait for their family's first lists
    # (a rival holding their name may not be known yet).
    listed: set[tuple[kube.Resource, str | None]] = field(default_factory=set)
    waiting: set[ObjectKey] = field(default_factory=set)
    # Objects whose Secrets are read again on their next handling (set by a list).
    refresh: set[ObjectKey] = field(default_factory=set)
    # The status last written to each object, and what the server stored of it (or showed, when it refused it).
    written: dict[ObjectKey, Written] = field(default_factory=dict)
    # The mirror keys each Dataset's published spec refers to (the files mode names its files by them too): a spec
    # change removes the ones it dropped.
    mirrored: dict[ObjectKey, frozenset[str]] = field(default_factory=dict)
    # The (Secret, key) references of each Dataset's published spec, the one Shoal runs: while a later spec is
    # invalid, their values are still handed over, rotations included (``_hand_over_running``).
    handed: dict[ObjectKey, list[tuple[str, str]]] = field(default_factory=dict)
    # Which (namespace, Secret, key) each handed-over key (the mirror's data key, the files') holds
    # (``_key_collisions``).
    mirror_owners: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # Resyncs asked for a Dataset waiting for the kubelet to mount its keys: (command id of the spec, tries, when).
    resyncs: dict[ObjectKey, tuple[str, int, float]] = field(default_factory=dict)
    # DataLoads and DataCleans whose operation's removal from Shoal was looked at (``_expire``): the revision of the
    # delete marker, so that each removal costs one read of the key's KV history, not one per pass.
    expiry_checked: dict[ObjectKey, int] = field(default_factory=dict)
    # The commands-stream sequence of the first apply published for each object (kept in its bucket entry too, so
    # a restart knows it): a Shoal record that has taken in none of its applies is an earlier object's, a deleted
    # one's whose delete the service has not taken in yet, and is not shown on it (``domain.of_earlier_object``).
    first_applies: dict[ObjectKey, int] = field(default_factory=dict)
    # The services' event limits as their live replicas' beats say them (``_event_limit``), and when they were read
    # (monotonic; None: never).
    event_limits: dict[str, int] = field(default_factory=dict, init=False)
    event_limits_read: float | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _tick_failures: int = field(default=0, init=False)
    # Who did not answer a call and why, since the start of the current pass (``_unanswered``): until the next pass,
    # objects are left to it (``pending``) rather than each waiting out its own timeout.
    _not_answering: str | None = field(default=None, init=False)
    _quiet_until: float = field(default=0.0, init=False)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    # --- from the watches ---

    async def on_listing(self, resource: kube.Resource, namespace: str | None, items: list[dict[str, Any]],
                         served: bool = True) -> None:
        """A fresh list of one resource: objects gone from it were deleted while the bridge was not watching, and so
        were those the bridge's bucket holds and the list does not (deleted while the bridge was down).

        A resource not ``served`` (the list answered 404) counts as listed and deletes nothing: an API server still
        starting answers 404 while the objects exist, and a CRD really removed has had its objects deleted first,
        each through Shoal's finalizer."""
        if self.applied is not None:
            await self.applied.ready.wait()  # what was published before this process: read before anything is
        self.listed.add((resource, namespace))
        if not served:  # still listed: an object waiting for its family's lists may be the last it waited for
            await self._handle_waiting()
            return
        listed = {domain.key_of(resource, obj) for obj in items}
        gone = [key for key in self.objects if key.resource == resource
                and (namespace is None or key.namespace == namespace) and key not in listed]
        for key in gone:
            await self.on_deleted(key, self.objects[key])
        if self.applied is not None:
            known = {domain.uid_of(obj) for obj in self.objects.values()}
            away = domain.gone_while_away(self.applied.values, resource, namespace,
                                          {domain.uid_of(obj) for obj in items})
            for uid, key in sorted(away.items(), key=lambda item: str(item[1])):
                if uid not in self.gone and uid not in known:
                    log.info("deleted while the bridge was down: deleting in Shoal", object=str(key))
                    # Its mirror keys are known from its entry only (none when it predates them).
                    self.gone[uid] = Gone(key, domain.stand_in(key, uid), domain.held_keys(self._entry(uid)))
                    await self._end_now(uid)
        for obj in items:
            key = domain.key_of(resource, obj)
            self.refresh.add(key)
            self.volume_conflicts.pop(key, None)
            await self.on_object(resource, obj)
        await self._handle_waiting()

    async def _handle_waiting(self) -> None:
        """Handle the objects that waited for their family's first lists, now that all of them came."""
        for key in sorted(self.waiting, key=str):
            if self._family_listed(key):
                await self._handle(key)

    async def on_event(self, resource: kube.Resource, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "DELETED":
            await self.on_deleted(domain.key_of(resource, obj), obj)
        elif event_type in ("ADDED", "MODIFIED"):
            await self.on_object(resource, obj)

    async def on_object(self, resource: kube.Resource, obj: dict[str, Any]) -> None:
        key = domain.key_of(resource, obj)
        known = self.objects.get(key)
        if known is not None and domain.uid_of(known) != domain.uid_of(obj):
            # Deleted and made again while the bridge did not watch (a re-list shows only the new one): what the
            # bridge knows of the old object (a delete sent, a status written, a volume made) is not the new one's.
            await self.on_deleted(key, known, successor=obj)
        self.objects[key] = obj
        self.claims.setdefault(domain.record_key(key), set()).add(key)
        await self._handle(key)

    async def on_deleted(self, key: ObjectKey, obj: dict[str, Any], successor: dict[str, Any] | None = None) -> None:
        """Gone: what the bridge kept about it goes. Gone without Shoal's finalizer (never accepted, or the
        finalizer was removed by hand) after a command, Shoal is told. ``successor``: the object now under the same
        name, whose Secret keys stay."""
        self.objects.pop(key, None)
        self.pending.discard(key)
        self.failures.pop(key, None)
        self.waiting.discard(key)
        rivals = self.claims.get(domain.record_key(key), set())
        rivals.discard(key)
        if not rivals:
            self.claims.pop(domain.record_key(key), None)
        self.pending.update(rivals)  # one of them may be Shoal's now (tick handles them)
        self.invalid.pop(key, None)
        self.written.pop(key, None)
        self.resyncs.pop(key, None)
        self.expiry_checked.pop(key, None)
        self.recorded_events.pop(key, None)
        self.volumes.discard(key)
        self.volume_conflicts.pop(key, None)
        self.first_applies.pop(key, None)
        self.handed.pop(key, None)
        held = self.mirrored.pop(key, frozenset()) | domain.held_keys(self._entry(domain.uid_of(obj)))
        if self.published.pop(key, None) is not None:
            # Not through Shoal's finalizer, or not to its end: what is left is done now, or retried (``tick``)
            # until it is; an object made again under the name waits for it (``_handle``).
            uid = domain.uid_of(obj)
            self.gone[uid] = Gone(key, obj, held, delete_sent=key in self.deletes_sent)
            await self._end_now(uid)
        self.deletes_sent.discard(key)
        self._forget_rejections({domain.uid_of(obj)})

    def _forget_rejections(self, uids: set[str]) -> None:
        """Drop the rejections of the commands of objects ``uids``: they were read for those objects only."""
        for command_id in [c for c in self.rejections if domain.command_uid(c) in uids]:
            self.rejections.pop(command_id, None)
            self.rejection_sequences.pop(command_id, None)
            self.unrecorded.discard(command_id)

    async def _end_now(self, uid: str) -> None:
        """Try a gone object's end at once, unless a call of this pass went unanswered (then ``tick`` does)."""
        if self._not_answering is not None:
            return
        async with self._lock:
            await self._end_gone(uid)

    async def _end_gone(self, uid: str) -> bool:
        """The rest of a gone object's end: its delete command, its keys in the mirror Secret (unless another
        Dataset, or one made again under its name, refers to them), its entry in the bridge's bucket. A failure is
        logged once with its reason and retried with back-off (``OBJECT_RETRY``); True when done."""
        gone = self.gone.get(uid)
        if gone is None:
            return True
        try:
            if not gone.delete_sent:
                await self._publish_delete(gone.key, gone.obj)
                gone.delete_sent = True
            if gone.key.resource.kind == "Dataset":
                keys = domain.mirror_keys(gone.obj) | gone.held
                successor = [self.objects[gone.key]] if gone.key in self.objects else []
                await self._remove_handed_keys(
                    domain.unreferenced(keys, self._other_datasets(gone.key) + successor, self._held_elsewhere(uid)))
            await self._forget_applied(uid)
        except Exception as err:
            self._failed(uid, gone.key, "delete in Shoal", err)
            return False
        self.gone.pop(uid, None)
        self._succeeded(uid, gone.key, "delete in Shoal")
        return True

    def _failed(self, which: ObjectKey | str, key: ObjectKey, what: str, err: Exception) -> None:
        """Count a failure and set the next try; say it once per reason, not at every retry."""
        self._note_failure(err)
        before = self.failures.get(which)
        count = before.count + 1 if before is not None else 1
        reason = _short(err)
        delay = OBJECT_RETRY.delay(count)
        if before is None or before.reason != reason:
            log.warning(f"{what} failed, retrying with back-off until it succeeds", object=str(key), error=reason,
                        delay=delay)
        self.failures[which] = Failure(count, reason, time.monotonic() + delay)

    def _succeeded(self, which: ObjectKey | str, key: ObjectKey, what: str) -> None:
        before = self.failures.pop(which, None)
        if before is not None:
            log.info(f"{what} done after retries", object=str(key), tries=before.count + 1)

    def _due(self, which: ObjectKey | str) -> bool:
        failure = self.failures.get(which)
        return failure is None or time.monotonic() >= failure.retry_at

    async def _remember_applied(self, key: ObjectKey, obj: dict[str, Any], command_id: str, sequence: int) -> None:
        uid = domain.uid_of(obj)
        if self.applied is None or not uid:
            return
        before = self._entry(uid)
        # The rejections read so far are answered by this publish: their facts, read again at a start, are old.
        answered = max(self.rejection_sequences.get(command_id, 0),
                       before.rejection if before is not None and before.command_id == command_id else 0)
        dataset = key.resource.kind == "Dataset"
        await self._save_applied(uid, domain.applied(key, command_id, domain.mirror_keys(obj) if dataset else None,
                                                     sequence, answered, self.first_applies.get(key, 0),
                                                     domain.secret_refs(obj) if dataset else None))

    async def _save_applied(self, uid: str, entry: domain.Applied) -> None:
        assert self.applied is not None
        revision = await self.applied.kv.put(uid, msgspec.json.encode(entry))
        self.applied.saved(uid, entry, revision)

    def _entry(self, uid: str) -> domain.Applied | None:
        return self.applied.values.get(uid) if self.applied is not None and uid else None

    def _held_elsewhere(self, uid: str) -> frozenset[str]:
        """The mirror keys the published specs of every other object hold (by their entries): after a start, a
        Dataset not listed yet still refers to them."""
        if self.applied is None:
            return frozenset()
        return frozenset().union(*(domain.held_keys(entry) for other, entry in self.applied.values.items()
                                   if other != uid))

    async def _forget_applied(self, uid: str) -> None:
        if self.applied is None or uid not in self.applied.values:
            return
        self.applied.deleted(uid, await kv_delete(self.applied.kv, uid, None))

    def _applied_before(self, obj: dict[str, Any], command_id: str) -> bool:
        """This spec was published by this bridge before (an earlier process) and the services have it: no
        rejection of it stands."""
        return domain.sent_before(self._entry(domain.uid_of(obj)), command_id,
                                  self.rejection_sequences.get(command_id, 0))

    # --- one object ---

    async def _handle(self, key: ObjectKey) -> bool:
        """Act on the object's latest version; False (and ``pending``) when the API or NATS failed, or when a call
        did not answer since the current pass began (this one would wait as long: the next pass tries)."""
        if self._not_answering is not None:
            self.pending.add(key)
            return False
        try:
            async with self._lock:
                # An object gone under this Shoal record (this name deleted, or a rival kind's) ends in Shoal first:
                # its delete after this one's apply would delete this one.
                for uid, gone in list(self.gone.items()):
                    if domain.record_key(gone.key) == domain.record_key(key) and not await self._end_gone(uid):
                        raise _Unavailable(f"{gone.key} is not deleted in Shoal yet")
                obj = self.objects.get(key)
                if obj is None:
                    self.pending.discard(key)
                    return True
                if domain.is_deleting(obj):
                    await self._finish_delete(key, obj)
                else:
                    await self._apply(key, obj)
            self.pending.discard(key)
            self._succeeded(key, key, "handling")
            return True
        except Exception as err:  # an API server or NATS outage: tick() tries again
            self.pending.add(key)
            self._failed(key, key, "handling", err)
            return False

    async def _event_limit(self, resource: kube.Resource) -> int:
        """The largest command of ``resource``'s kind the service taking it decodes: the smallest
        SHOAL_MAX_EVENT_BYTES among its live replicas' beats (``libs.members.event_limits``, as the CLI reads it), or
        this process's own where none says one (not running, or from before the beats said it). Read again at most
        every ``EVENT_LIMITS_SECONDS``."""
        now = time.monotonic()
        if self.event_limits_read is None or now - self.event_limits_read >= EVENT_LIMITS_SECONDS:
            self.event_limits = await event_limits(await self.bus.kv(subjects.KV_MEMBERS))
            self.event_limits_read = now
        return self.event_limits.get(subjects.MEMBERS_OF_KIND[domain.family(resource)],
                                     self.settings.service.max_event_bytes)

    def _note_failure(self, err: Exception) -> None:
        who = _unanswered(err)
        if who is not None and self._not_answering is None:
            self._not_answering = f"{who} is not answering ({_short(err)})"

    def _holder(self, key: ObjectKey) -> ObjectKey | None:
        """Another object standing for ``key``'s Shoal record that Shoal serves instead (``domain.claimant``)."""
        claims = self.claims.get(domain.record_key(key), set())
        if len(claims) < 2:
            return None
        winner = domain.claimant({k: self.objects[k] for k in claims if k in self.objects})
        return None if winner == key else winner

    def _family_listed(self, key: ObjectKey) -> bool:
        """Every resource that could hold ``key``'s name in Shoal (both Dataset kinds, every runtime kind) listed."""
        return all((r, None) in self.listed or (r, key.namespace) in self.listed
                   for r in kube.RESOURCES if domain.family(r) == domain.family(key.resource))

    async def _apply(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        holder = self._holder(key)
        if holder is not None:  # its command would change (and its delete delete) the other object's record
            message = domain.rival_message(key, holder)
            if self.invalid.get(key) != message:
                log.info("custom resource refused: its name is another's in Shoal", object=str(key),
                         holder=str(holder))
            self.invalid[key] = message
            self.published.pop(key, None)
            self.first_applies.pop(key, None)
            self.handed.pop(key, None)
            await self._forget_applied(domain.uid_of(obj))  # its delete must never reach the other's record
            return
        if kube.FINALIZER not in domain.finalizers(obj) and not self._family_listed(key):
            # After a start, an object of another kind holding this name in Shoal may come in a later list; one
            # holding the finalizer was accepted before and wins anyway.
            self.waiting.add(key)
            return
        self.waiting.discard(key)
        translation = domain.translate(key.resource, obj, min(MESSAGE_LIMIT, self.bus.nc.max_payload),
                                       await self._event_limit(key.resource))
        command = translation.command
        errors = translation.errors
        if command is not None and self.published.get(key) == command.event.id and key not in self.refresh:
            return  # this spec is in Shoal already (a status write of ours came back, a duplicate event)
        if command is not None and key.resource.kind == "Dataset":
            # Read when the spec changes and at every list, so a changed Secret reaches the services.
            errors = await self._store_secrets(key, domain.secret_refs(obj))
        if errors or command is None:
            message = "; ".join(errors)
            if key.resource.kind == "Dataset" and (key in self.refresh or self.invalid.get(key) != message):
                await self._hand_over_running(key, obj)
            self.refresh.discard(key)
            if self.invalid.get(key) != message:
                log.info("invalid custom resource", object=str(key), reasons=errors)
            self.invalid[key] = message
            return
        self.refresh.discard(key)
        self.invalid.pop(key, None)
        if self.published.get(key) == command.event.id:
            return
        if key.resource.kind == "Dataset":
            await self._drop_unreferenced_keys(key, obj)
        # Held before Shoal knows the object, so a delete always waits for Shoal's clean-up.
        obj = await self._set_finalizer(key, obj, held=True)
        if domain.is_deleting(obj):  # deleted since the version this pass acted on: no apply, and no finalizer
            await self._finish_delete(key, obj)
            return
        entry = self._entry(domain.uid_of(obj))
        if entry is not None:  # a restart: this object's first apply is known from its entry only
            self.first_applies[key] = entry.first
        if key.resource.kind == "Dataset":
            self.handed[key] = domain.secret_refs(obj)
        if self._applied_before(obj, command.event.id):
            self.published[key] = command.event.id  # a restart: Shoal has this spec, publishing it again costs writes
            return
        sequence = await self.bus.publish(command.subject, command.event)
        if entry is not None and entry.command_id == command.event.id and sequence == entry.sequence:
            # A rejected apply sent again within JetStream's duplicate window of its first send: dropped as a
            # repeat, so the services did not see it again and its rejection stands (the next start tries again).
            self.published[key] = command.event.id
            log.info("rejected apply not sent again: within the duplicate window", object=str(key))
            return
        self.first_applies.setdefault(key, sequence)
        await self._remember_applied(key, obj, command.event.id, sequence)
        self.published[key] = command.event.id
        log.info("applied", object=str(key), command=command.event.id, notes=len(translation.notes))
        told = []  # what Shoal leaves out of a (Fluid) object is said, never dropped silently, and so are writes
        if translation.notes:
            told.append(("Normal", domain.REASON_IGNORED, "; ".join(translation.notes)))
        if translation.read_only:
            told.append(("Warning", domain.REASON_READ_ONLY, translation.read_only))
        for event_type, reason, message in told:
            try:
                await self._record_event(key, obj, domain.event_name(obj, reason, command.event.id), event_type,
                                         reason, message)
            except Exception as err:  # the command is out; the note is not worth a retry
                log.warning("event not recorded", object=str(key), error=_short(err))
                self._note_failure(err)  # an API server that did not answer: the next call would not either
                break

    async def _finish_delete(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """Delete in Shoal, wait until Shoal's record is gone, then the volume and claim, then the finalizer.

        An object being deleted without Shoal's finalizer (deleted before the bridge could add it, which the API
        server no longer allows; another controller's holds it) has its delete published all the same, and nothing
        more: the bridge holds nothing of it, and what it kept goes when the object does (``on_deleted``)."""
        ours = kube.FINALIZER in domain.finalizers(obj)
        if self._holder(key) is not None:  # Shoal's record is the other object's: let this one go, alone
            await self._set_finalizer(key, obj, held=False)
            return
        if not ours and not self._family_listed(key):
            # Another kind's object holding this name in Shoal may come in a later list: its record is not this one's.
            self.waiting.add(key)
            return
        self.waiting.discard(key)
        if key not in self.deletes_sent:
            await self._publish_delete(key, obj)
            self.deletes_sent.add(key)
            if not ours:
                log.info("deleted before Shoal's finalizer was added: delete published", object=str(key))
        if not ours:
            return
        if not self.mirrors.ready() or self.mirrors.exists(key):
            return  # tick() looks again
        if key.resource.kind == "Dataset":
            await self._delete_volume(key)
            await self._forget_secrets(key, obj)
        await self._forget_applied(domain.uid_of(obj))  # before the finalizer: a restart then finds the object
        await self._set_finalizer(key, obj, held=False)
        self.published.pop(key, None)
        log.info("deleted", object=str(key))

    async def _publish_delete(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        family = domain.family(key.resource)
        command_id = domain.delete_id(key.resource, obj)
        event: msgspec.Struct
        if family == "dataset":
            subject, event = subjects.DATASET_DELETE, DatasetDelete(id=command_id, name=key.name,
                                                                    namespace=key.namespace)
        elif family == "runtime":
            subject, event = subjects.RUNTIME_DELETE, RuntimeDelete(id=command_id, name=key.name,
                                                                    namespace=key.namespace)
        elif family == "dataload":
            subject, event = subjects.DATALOAD_DELETE, DataLoadDelete(id=command_id, name=key.name,
                                                                      namespace=key.namespace)
        else:
            subject, event = subjects.DATACLEAN_DELETE, DataCleanDelete(id=command_id, name=key.name,
                                                                        namespace=key.namespace)
        await self.bus.publish(subject, event)

    # --- Secrets ---

    async def _store_secrets(self, of: ObjectKey, refs: list[tuple[str, str]]) -> list[str]:
        """Hand every referenced Secret key to the services; the command carries only the reference. With
        ``SHOAL_KUBE_SECRET_MIRROR`` into that one Secret (``_mirror``), which the services mount; else as a file
        ``<SHOAL_SECRETS_DIR>/<ns>.<name>/<key>`` (one host). Both are layouts ``libs.ufs.mounts.read_secrets``
        reads. Nothing is handed over while a reference cannot be resolved. Returns why (never with a value)."""
        if not refs:
            return []
        namespace = of.namespace
        mirror = self.settings.kube.secret_mirror_ref
        errors = domain.secret_ref_errors(refs, namespace)
        if mirror is not None:
            errors += domain.mirror_key_errors(refs, namespace)
        elif not self.settings.s3.secrets_dir:
            errors.append("the bridge has neither SHOAL_KUBE_SECRET_MIRROR nor SHOAL_SECRETS_DIR to hand Secrets "
                          "to the services")
        # Either way: the files mode names (and removes) its files by the same key (``domain.secret_files``).
        errors += self._key_collisions(of, refs)
        if errors:
            return errors
        values: dict[tuple[str, str], bytes] = {}
        for name, key in refs:
            try:
                secret = await self.core.read_namespaced_secret(name, namespace,
                                                                _request_timeout=REQUEST_TIMEOUT_SECONDS)
            except ApiException as err:
                if err.status == 404:
                    errors.append(f"Secret {namespace}/{name} not found (needed by encryptOptions)")
                    continue
                if err.status == 403:  # read again at the next re-list, once the binding exists
                    errors.append(f"the bridge may not read Secret {namespace}/{name}: bind the ClusterRole "
                                  f"shoal-bridge-secrets to it in {namespace} (docs/kubernetes.md)")
                    continue
                raise
            data = secret.data or {}
            if key not in data:
                errors.append(f"Secret {namespace}/{name} has no key {key!r} (needed by encryptOptions)")
                continue
            values[(name, key)] = base64.b64decode(data[key])
        if errors:
            # The Dataset is invalid, so Shoal never gets it: no finalizer, no clean-up when it goes. A value handed
            # over now would stay after it for ever.
            return errors
        if mirror is not None:
            wanted = {domain.mirror_key(namespace, name, key): value for (name, key), value in values.items()}
            errors += await self._mirror(mirror, wanted)
        else:
            for (name, key), value in values.items():
                target = Path(self.settings.s3.secrets_dir) / domain.stored_secret_name(namespace, name) / key
                await asyncio.to_thread(_write_private, target, value)
        return errors

    async def _hand_over_running(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """While a Dataset's spec is invalid, Shoal runs its last valid one: that spec's Secrets are still handed
        over, read again as a valid spec's are (a rotation reaches the running dataset). What cannot be read is
        logged; the values handed over before stay."""
        refs = domain.running_refs(self.handed.get(key), self._entry(domain.uid_of(obj)))
        errors = await self._store_secrets(key, refs)
        if errors:
            log.warning("the running spec's Secrets not handed over again", object=str(key), reasons=errors)

    def _key_collisions(self, of: ObjectKey, refs: list[tuple[str, str]]) -> list[str]:
        """A handed-over key is ``<ns>.<secret>.<key>`` (``domain.mirror_key``: the mirror's data key, and what
        the files mode names and removes its files by), and names and keys may hold dots: Secret ``a.b`` key ``c``
        and Secret ``a`` key ``b.c`` would share one. The first reference the bridge saw keeps it while a Dataset
        other than ``of`` refers to it, until its keys are taken back (``_remove_handed_keys``) or a restart."""
        namespace = of.namespace
        errors = []
        for name, key in refs:
            flat = domain.mirror_key(namespace, name, key)
            owner = self.mirror_owners.setdefault(flat, (namespace, name, key))
            if owner != (namespace, name, key) and not self._referred(owner, of):
                self.mirror_owners[flat] = owner = (namespace, name, key)  # its Datasets are gone: free
            if owner != (namespace, name, key):
                errors.append(f"Secret {namespace}/{name} key {key!r} would be handed over under the key {flat!r} "
                              f"of Secret {owner[0]}/{owner[1]} key {owner[2]!r}: rename one")
        return errors

    def _referred(self, ref: tuple[str, str, str], but: ObjectKey) -> bool:
        """Whether a Dataset other than ``but`` refers to (namespace, Secret, key) ``ref``: in its spec, or in the
        spec Shoal runs for it (``handed``)."""
        namespace, name, key = ref
        return any(other.resource.kind == "Dataset" and other != but and other.namespace == namespace
                   and ((name, key) in domain.secret_refs(obj) or (name, key) in self.handed.get(other, []))
                   for other, obj in self.objects.items())

    async def _mirror(self, mirror: tuple[str, str], wanted: dict[str, bytes]) -> list[str]:
        """Make the mirror Secret hold ``wanted`` (data keys → values): read it, then one merge patch of the keys
        that differ, and nothing when none does; created if absent. Returns why it could not (403), never a
        value; other API errors raise (retried by ``tick``)."""
        if not wanted:
            return []
        namespace, name = mirror
        where = f"Secret {namespace}/{name} (SHOAL_KUBE_SECRET_MIRROR)"
        try:
            current = await self.core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status == 403:
                return [f"the bridge may not read {where}: grant it get and patch on that Secret (deploy/)"]
            if err.status != 404:
                raise
            return await self._create_mirror(mirror, wanted, where)
        changes = domain.mirror_changes(current.data or {}, wanted)
        if not changes:
            return []
        try:
            await self.core.patch_namespaced_secret(
                name, namespace, {"data": changes},
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # in **kwargs, not in the stubs
                _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status == 403:
                return [f"the bridge may not patch {where}: grant it get and patch on that Secret (deploy/)"]
            raise
        log.info("secret mirror updated", secret=f"{namespace}/{name}", keys=sorted(changes))  # names, no values
        return []

    async def _create_mirror(self, mirror: tuple[str, str], wanted: dict[str, bytes], where: str) -> list[str]:
        namespace, name = mirror
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {kube.MANAGED_BY_LABEL: kube.MANAGED_BY}},
                "data": domain.mirror_changes({}, wanted)}
        try:
            await self.core.create_namespaced_secret(namespace, body,  # type: ignore[arg-type]  # a dict is sent as is
                                                     _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status == 403:
                return [f"{where} does not exist and the bridge may not create it: apply deploy/ (it has an empty "
                        "one) or create it"]
            raise  # 409 included (created meanwhile): the next handling reads and patches it
        log.info("secret mirror created", secret=f"{namespace}/{name}", keys=sorted(wanted))
        return []

    async def _forget_secrets(self, key: ObjectKey, obj: dict[str, Any], keep: list[dict[str, Any]] | None = None,
                              held: frozenset[str] = frozenset()) -> None:
        """Remove a deleted Dataset's keys (those of ``obj`` and ``held``, what its published spec referred to) from
        the mirror Secret or the files, unless another Dataset (or ``keep``) still refers to them."""
        if key.resource.kind != "Dataset":
            return
        uid = domain.uid_of(obj)
        keys = domain.mirror_keys(obj) | held | self.mirrored.pop(key, frozenset()) | domain.held_keys(self._entry(uid))
        await self._remove_handed_keys(domain.unreferenced(keys, self._other_datasets(key) + (keep or []),
                                                           self._held_elsewhere(uid)))

    async def _drop_unreferenced_keys(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """Before a Dataset's new spec goes out: remove the mirror keys its previous spec referred to and this one
        does not, unless another Dataset refers to them. The previous spec is this process's last apply, or after a
        start the one the bridge's bucket holds (a spec changed while the bridge was down)."""
        now = domain.mirror_keys(obj)
        uid = domain.uid_of(obj)
        before = self.mirrored.get(key)
        dropped = (domain.held_keys(self._entry(uid)) if before is None else before) - now
        if dropped:
            await self._remove_handed_keys(domain.unreferenced(dropped, self._other_datasets(key),
                                                               self._held_elsewhere(uid)))
        self.mirrored[key] = now

    def _other_datasets(self, key: ObjectKey) -> list[dict[str, Any]]:
        return [other for other_key, other in self.objects.items()
                if other_key.resource.kind == "Dataset" and other_key != key]

    async def _remove_handed_keys(self, unused: list[str]) -> None:
        """Take ``unused`` keys (``domain.mirror_key``s) back from the services, wherever ``_store_secrets`` handed
        them: the mirror Secret, or the files in ``SHOAL_SECRETS_DIR`` (a value left there would outlive its Dataset,
        its Secret and its namespace)."""
        mirror = self.settings.kube.secret_mirror_ref
        if mirror is not None:
            await self._remove_mirror_keys(mirror, unused)
        elif self.settings.s3.secrets_dir and unused:
            removed = await asyncio.to_thread(_remove_secret_files, Path(self.settings.s3.secrets_dir), unused)
            if removed:
                log.info("secret files removed", folder=self.settings.s3.secrets_dir, files=removed)  # no values
        for flat in unused:  # taken back: the name is free for another reference (``_key_collisions``)
            self.mirror_owners.pop(flat, None)

    async def _remove_mirror_keys(self, mirror: tuple[str, str], unused: list[str]) -> None:
        """Remove ``unused`` keys from the mirror Secret (those it holds: one merge patch of nulls)."""
        if not unused:
            return
        namespace, name = mirror
        try:
            current = await self.core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status in (403, 404):
                return  # nothing of ours there, or not ours to change: said when the keys were written
            raise
        present = [flat for flat in unused if flat in (current.data or {})]
        if present:
            await self.core.patch_namespaced_secret(
                name, namespace, {"data": dict.fromkeys(present)},  # null removes a key (RFC 7386)
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # in **kwargs, not in the stubs
                _request_timeout=REQUEST_TIMEOUT_SECONDS)
            log.info("secret mirror keys removed", secret=f"{namespace}/{name}", keys=present)

    # --- periodic: status, volumes, Events, retries ---

    async def tick(self) -> None:
        """Retry what failed, finish deletes, reflect Shoal's state; after a failure, wait (``TICK_RETRY``) before
        the next try, so an API server that is down is not asked about every object at every tick."""
        if time.monotonic() < self._quiet_until:
            return
        self._not_answering = None  # asked again: this pass's calls tell
        try:
            await self._tick()
        except Exception as err:
            self._tick_failures += 1
            delay = TICK_RETRY.delay(self._tick_failures)
            self._quiet_until = time.monotonic() + delay
            if isinstance(err, _NotAnswering):
                log.warning("not answering: pass ended, the next one waits", reason=str(err), delay=delay)
            else:
                log.warning("next pass waits", reason=str(err) if isinstance(err, _Unavailable) else _short(err),
                            delay=delay)
        else:
            self._tick_failures = 0

    async def _tick(self) -> None:
        """One pass over every object; each failure is the object's own (one broken object does not hold back the
        others), and any failure makes the next pass wait."""
        failed: list[str] = []
        async with self._lock:
            await self._record_rejections()
            self._prune_rejections()
        # Objects that failed before are tried last, when due (``OBJECT_RETRY``): one whose calls hang then costs
        # the end of a pass, not every other object's turn.
        for key in [k for k in self.pending if k not in self.failures]:
            self._end_if_not_answering()
            if not await self._handle(key):
                failed.append(str(key))
        for key, obj in list(self.objects.items()):
            self._end_if_not_answering()
            if domain.is_deleting(obj):
                if key not in self.pending and not await self._handle(key):
                    failed.append(str(key))
                continue
            try:
                async with self._lock:
                    if not await self._expire(key, obj):
                        await self._reflect(key, obj)
            except Exception as err:
                log.warning("status not written, trying again", object=str(key), error=_short(err))
                failed.append(str(key))
                self._note_failure(err)
        retries = [k for k in self.failures if isinstance(k, ObjectKey) and k in self.pending]
        for key in sorted(retries, key=lambda k: self.failures[k].retry_at):
            self._end_if_not_answering()
            if self._due(key) and not await self._handle(key):
                failed.append(str(key))
        for uid in sorted(self.gone, key=lambda u: self.failures[u].retry_at if u in self.failures else 0.0):
            self._end_if_not_answering()
            if self._due(uid):
                async with self._lock:
                    if not await self._end_gone(uid):
                        failed.append(str(self.gone[uid].key))
        self._end_if_not_answering()
        if failed:
            raise _Unavailable(f"{len(failed)} objects not handled, e.g. {failed[0]}")

    def _end_if_not_answering(self) -> None:
        if self._not_answering is not None:
            raise _NotAnswering(f"{self._not_answering}: the rest of this pass waits for the next")

    def refusal(self, key: ObjectKey) -> Refusal | None:
        if key in self.invalid:
            return Refusal(domain.REASON_INVALID, self.invalid[key])
        command_id = self.published.get(key)
        if command_id is not None and command_id in self.rejections and domain.rejection_holds(
                self._entry(domain.command_uid(command_id)), command_id, self.rejection_sequences.get(command_id, 0)):
            return Refusal(domain.REASON_REJECTED, self.rejections[command_id])
        return None

    async def _expire(self, key: ObjectKey, obj: dict[str, Any]) -> bool:
        """A DataLoad or DataClean whose operation Shoal removed by its ``ttlSecondsAfterFinished`` (while this
        process watched, or while the bridge was down): its final status is written (the run may have ended and
        gone within one pass, with TTL 0, or while the bridge was down), then the object is deleted, as Fluid does.
        Only an object this bridge applied (its bucket entry holds its current apply) whose apply reached the
        removed record (``domain.expired_record``), deleted with its uid as a precondition; Shoal's finalizer then
        goes the usual way (``_finish_delete``), without a delete command: Shoal has nothing left of it. True when
        the object was deleted."""
        operations = self.mirrors.operations
        if not domain.expires(key.resource) or not operations.ready.is_set() or domain.is_deleting(obj):
            return False
        kv_key = subjects.operation_key(key.resource.kind, key.namespace, key.name)
        marker = operations.revision(kv_key)
        if kv_key in operations.values or not marker or self.expiry_checked.get(key) == marker:
            return False  # there, never there (not accepted yet), or this removal looked at already
        entry = self._entry(domain.uid_of(obj))
        command_id = self.published.get(key)
        if command_id is None or entry is None or entry.command_id != command_id or self._holder(key) is not None:
            return False  # not applied by this bridge (yet), or not Shoal's object
        record = domain.expired_record(await self._history(kv_key), entry)
        if record is None:
            self.expiry_checked[key] = marker
            log.info("operation gone from Shoal, not by this object's ttlSecondsAfterFinished: the resource stays",
                     object=str(key))
            return False
        await self._reflect(key, obj, record)
        r = key.resource
        try:
            await self.custom.delete_namespaced_custom_object(
                r.group, r.version, key.namespace, r.plural, key.name,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=domain.uid_of(obj))),
                _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or another object under the name (not ours to delete)
                raise
            log.info("expired resource not deleted: gone, or made again under its name", object=str(key),
                     error=_short(err))
        else:
            self.deletes_sent.add(key)  # Shoal removed it: its finalizer goes without a delete command
            log.info("deleted: its operation was removed by ttlSecondsAfterFinished", object=str(key),
                     phase=record.status.phase)
        self.expiry_checked[key] = marker
        return True

    async def _history(self, kv_key: str) -> list[tuple[str | None, bytes]]:
        """The entries the operations bucket keeps of ``kv_key`` (oldest first), as ``domain.expired_record`` reads
        them; none when it keeps none."""
        watcher = await self.mirrors.operations.kv.watch(kv_key, include_history=True)
        try:
            # A NATS TimeoutError past the limit.
            return [(entry.operation, entry.value or b"")
                    async for entry in initial_entries(watcher, REQUEST_TIMEOUT_SECONDS)]
        finally:
            with contextlib.suppress(Exception):  # a watcher whose server went: nothing to stop
                await watcher.stop()

    def _fluid_runtime_kind(self, key: ObjectKey) -> str | None:
        """For a Fluid Dataset: the kind of the Fluid runtime object of its name and namespace, if one is watched."""
        if not (domain.is_fluid(key.resource) and key.resource.kind == "Dataset"):
            return None
        return next((resource.kind for resource in kube.FLUID_RESOURCES if domain.family(resource) == "runtime"
                     and ObjectKey(resource, key.namespace, key.name) in self.objects), None)

    async def _reflect(self, key: ObjectKey, obj: dict[str, Any], record: OperationRecord | None = None) -> None:
        """Shoal's state onto the object: status (if changed), volume and claim when Bound, Events. ``record``: an
        operation's final record, in place of the mirror's (which no longer holds it)."""
        if self.objects.get(key) is not obj:
            return  # a newer version arrived meanwhile; the next tick handles it
        status = self.mirrors.status_of(key) if record is None else record.status
        if record is None and domain.of_earlier_object(self.mirrors.command_sequence(key),
                                                       self.first_applies.get(key, 0)):
            status = None  # the record is a deleted object's under this name (its delete not taken in yet)
        refusal = self.refusal(key)
        if (self.published.get(key) is None and refusal is None) or self._holder(key) is not None:
            status = None  # not Shoal's object (yet; a name taken before, or another object's): nothing to show
        if isinstance(status, OperationStatus) and not domain.is_fluid(key.resource):  # Fluid's has no such field
            entry = self._entry(domain.uid_of(obj))
            status = msgspec.structs.replace(status, observed_generation=domain.kube_observed_generation(
                obj, self.published.get(key), entry.sequence if entry is not None and entry.command_id ==
                self.published.get(key) else 0, self.mirrors.operation(key) if record is None else record))
        last = self.written.get(key)
        desired = domain.desired_status(key.resource, obj, status, refusal, self.clock(),
                                        self.volume_conflicts.get(key), None if last is None else last.desired,
                                        self._fluid_runtime_kind(key))
        patch = domain.status_patch(obj, desired)
        current = obj.get("status") or {}
        if patch is not None and (last is None or last.desired != desired
                                  or (last.stored is not None and last.stored != current)):
            try:
                updated = await self.custom.patch_namespaced_custom_object_status(
                    key.resource.group, key.resource.version, key.namespace, key.resource.plural, key.name, patch,
                    _content_type=JSON_PATCH,  # type: ignore[call-arg]  # in **kwargs, not in the stubs
                    _request_timeout=REQUEST_TIMEOUT_SECONDS)
            except ApiException as err:
                if err.status not in STATUS_REFUSALS:
                    raise
                replaced = err.status != 404 and await self._replaced(key, obj)
                # Dropped until Shoal's status or the object's changes; an object made again under the name is
                # another object (``on_object``), which forgets this.
                self.written[key] = Written(desired, current)
                if err.status == 404:  # deleted meanwhile: its DELETED event (or the next list) forgets it
                    log.info("status not written: the object is gone", object=str(key))
                    return
                if replaced:
                    return
                await self._status_refused(key, obj, err)
            else:
                stored = (updated.get("status") or {}) if isinstance(updated, dict) else None
                self.written[key] = Written(desired, stored)
                if isinstance(updated, dict) and self.objects.get(key) is obj:
                    self.objects[key] = updated
        if refusal is not None:
            await self._record_event(key, obj, domain.event_name(obj, refusal.reason, refusal.message),
                                     "Warning", refusal.reason, refusal.message)
        if key.resource.kind == "Dataset" and refusal is None and getattr(status, "phase", "") == "Bound":
            await self._create_volume(key, obj)
            conflict = self.volume_conflicts.get(key)
            if conflict is not None:
                await self._record_event(key, obj, domain.event_name(obj, domain.REASON_VOLUME_TAKEN, conflict),
                                         "Warning", domain.REASON_VOLUME_TAKEN, conflict)
        if key.resource.kind == "Dataset" and refusal is None:
            await self._resync_for_mounted_secret(key, obj, status)
        finished = domain.finished_load(key.resource, status)
        if finished is not None and refusal is None:
            event_type, reason, message = finished
            runs = getattr(status, "runs", 0)
            completed = getattr(status, "completion_time", "")
            await self._record_event(key, obj, domain.event_name(obj, reason, runs, completed), event_type, reason,
                                     message)

    async def _replaced(self, key: ObjectKey, obj: dict[str, Any]) -> bool:
        """Whether the object under ``key``'s name is no longer ``obj`` (gone, or made again: another uid), read
        after a status write refused with 422, which says the same for a failed uid test (``domain.status_patch``)
        as for a status the CRD's validation refuses. The watch brings the new object, which gets its own status;
        the old one's is dropped quietly: nothing is wrong with it. Only another uid says so: an object read back
        without one (an odd answer), or a write that tested none (``obj`` had none), leaves the 422 the CRD's."""
        r = key.resource
        try:
            fresh = await self.custom.get_namespaced_custom_object(
                r.group, r.version, key.namespace, r.plural, key.name, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status != 404:
                raise
        else:
            uid, fresh_uid = domain.uid_of(obj), domain.uid_of(fresh) if isinstance(fresh, dict) else ""
            if not (uid and fresh_uid and fresh_uid != uid):
                return False
        log.debug("status not written: the object was deleted or made again under its name", object=str(key),
                  uid=domain.uid_of(obj))
        return True

    async def _status_refused(self, key: ObjectKey, obj: dict[str, Any], err: ApiException) -> None:
        """Say why the API server refused a status (its validation's message names the field), in the log and in a
        Warning Event, once per status refused (the Event's name is deterministic)."""
        message = f"the API server refused the status Shoal reports ({_short(err)}): {_api_message(err)}"[:1024]
        log.warning("status refused by the API server, dropped until it changes", object=str(key),
                    error=_short(err), message=_api_message(err))
        try:
            await self._record_event(key, obj, domain.event_name(obj, REASON_STATUS_REFUSED, message), "Warning",
                                     REASON_STATUS_REFUSED, message)
        except Exception as event_err:  # the status is dropped either way; the log line says why
            log.warning("event not recorded", object=str(key), error=_short(event_err))

    async def _resync_for_mounted_secret(self, key: ObjectKey, obj: dict[str, Any], status: Any) -> None:
        """With the mirror, a Dataset's first sync usually runs before the kubelet has put the keys in the services'
        folder: ask the dataset service to sync again every ``MIRROR_RESYNC_SECONDS``, a bounded number of times
        per spec (``domain.MIRROR_RESYNC_TRIES``)."""
        command_id = self.published.get(key)
        if (self.settings.kube.secret_mirror_ref is None or command_id is None
                or not domain.waits_for_mounted_secret(status)):
            return
        spec, tries, last = self.resyncs.get(key, (command_id, 0, self.clock()))
        if spec != command_id:  # a new spec: its own tries
            tries, last = 0, self.clock()
        if tries >= domain.MIRROR_RESYNC_TRIES or self.clock() - last < MIRROR_RESYNC_SECONDS:
            self.resyncs[key] = (command_id, tries, last)
            return
        await self.bus.publish(subjects.DATASET_RESYNC, DatasetResync(
            id=domain.resync_id(obj, tries + 1), name=key.name, namespace=key.namespace))
        self.resyncs[key] = (command_id, tries + 1, self.clock())
        log.info("resync asked: a secret key is not mounted yet", object=str(key), tries=tries + 1)

    async def _record_event(self, key: ObjectKey, obj: dict[str, Any], name: str, event_type: str, reason: str,
                            message: str) -> None:
        recorded = self.recorded_events.get(key)
        if recorded is not None and name in recorded:
            return
        body = domain.kube_event(key.resource, obj, name=name, event_type=event_type, reason=reason,
                                 message=message, now=self.clock())
        try:
            await self.core.create_namespaced_event(key.namespace, body,  # type: ignore[arg-type]  # a dict is sent as is
                                                    _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status in EVENT_REFUSALS:  # no retry: the status and the rest of the pass go on
                log.warning("event refused by the API server, not recorded", object=str(key), reason=reason,
                            error=_short(err), message=_api_message(err))
            elif err.status != 409:  # 409: recorded before (a restart), the name is deterministic
                raise
        recorded = self.recorded_events.setdefault(key, {})
        recorded[name] = None
        # A Cron DataLoad records one per run, for as long as it lives: the older names are not recorded again
        # (their occurrence is over), and if one were, the deterministic name makes it a 409, not a second Event.
        while len(recorded) > EVENTS_KEPT:
            del recorded[next(iter(recorded))]

    async def _create_volume(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """The volume, then the claim that names it; a name already taken by an object that is not this dataset's
        (``domain.is_own_volume``) stops there, with the reason in ``volume_conflicts`` (status and Event) rather
        than a claim bound to someone else's volume, Pending for ever."""
        if key in self.volumes or key in self.volume_conflicts:
            return
        volume = domain.persistent_volume(obj, self.settings.agent.mount_root)
        claim = domain.persistent_volume_claim(obj)
        volume_name = volume["metadata"]["name"]
        core = self.core
        steps = (("PersistentVolume",
                  lambda: core.create_persistent_volume(volume,  # type: ignore[arg-type]  # a dict is sent as is
                                                        _request_timeout=REQUEST_TIMEOUT_SECONDS),
                  lambda: core.read_persistent_volume(volume_name, _request_timeout=REQUEST_TIMEOUT_SECONDS)),
                 ("PersistentVolumeClaim",
                  lambda: core.create_namespaced_persistent_volume_claim(
                      key.namespace, claim,  # type: ignore[arg-type]  # a dict is sent as is
                      _request_timeout=REQUEST_TIMEOUT_SECONDS),
                  lambda: core.read_namespaced_persistent_volume_claim(
                      claim["metadata"]["name"], key.namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS)))
        for kind, create, read in steps:
            try:
                await create()
                continue
            except ApiException as err:
                if err.status != 409:
                    raise
            found = self.api.sanitize_for_serialization(await read())  # 409: there already, ours or not
            if not domain.is_own_volume(found, key.namespace, key.name):
                self.volume_conflicts[key] = domain.volume_conflict(kind, found, key.namespace, key.name)
                log.warning("volume name taken", object=str(key), kind=kind, volume=volume_name)
                return
        self.volumes.add(key)
        log.info("volume and claim created", object=str(key), volume=volume_name)

    async def _delete_volume(self, key: ObjectKey) -> None:
        """The dataset's claim and volume, each only if it is this dataset's (read, then deleted with its uid as a
        precondition, so an object put there meanwhile is left alone too): a volume of another namespace's
        dataset or one the bridge never made may carry the same name."""
        core = self.core
        claim, volume = kube.claim_name(key.name), kube.volume_name(key.namespace, key.name)
        steps = ((lambda: core.read_namespaced_persistent_volume_claim(
                      claim, key.namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS),
                  lambda body: core.delete_namespaced_persistent_volume_claim(
                      claim, key.namespace, body=body, _request_timeout=REQUEST_TIMEOUT_SECONDS)),
                 (lambda: core.read_persistent_volume(volume, _request_timeout=REQUEST_TIMEOUT_SECONDS),
                  lambda body: core.delete_persistent_volume(volume, body=body,
                                                             _request_timeout=REQUEST_TIMEOUT_SECONDS)))
        for read, delete in steps:
            try:
                found = self.api.sanitize_for_serialization(await read())
                if not domain.is_own_volume(found, key.namespace, key.name):
                    log.info("volume or claim left alone: not this dataset's", object=str(key),
                             name=(found.get("metadata") or {}).get("name"))
                    continue
                uid = (found.get("metadata") or {}).get("uid")
                await delete(client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)))
            except ApiException as err:
                if err.status not in (404, 409):  # 409: the precondition failed, the object there is another
                    raise
        self.volumes.discard(key)
        # A dataset whose volume name this one held takes it at its next pass.
        for other in [k for k in self.volume_conflicts if kube.volume_name(k.namespace, k.name) == volume]:
            self.volume_conflicts.pop(other, None)

    async def _set_finalizer(self, key: ObjectKey, obj: dict[str, Any], held: bool) -> dict[str, Any]:
        """Add (``held``) or remove Shoal's finalizer without losing another controller's: the patch applies only to
        the version it was built from (``domain.finalizer_patch``); on 409 the object is read again and the patch
        built anew, up to ``FINALIZER_TRIES`` times. The object read must be the same one (uid): one made again
        under the name is not this one, and its watch event brings it. Returns the object as it now stands: one
        found being deleted keeps its finalizers as they are (no finalizer may be added then)."""
        r = key.resource
        for attempt in range(1, FINALIZER_TRIES + 1):
            patch = domain.finalizer_patch(obj, held)
            if patch is None:
                return obj
            try:
                updated = await self.custom.patch_namespaced_custom_object(
                    r.group, r.version, key.namespace, r.plural, key.name, patch,
                    _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # in **kwargs, not in the stubs
                    _request_timeout=REQUEST_TIMEOUT_SECONDS)
            except ApiException as err:
                if err.status != 409 or attempt == FINALIZER_TRIES:
                    raise
                fresh = await self.custom.get_namespaced_custom_object(
                    r.group, r.version, key.namespace, r.plural, key.name, _request_timeout=REQUEST_TIMEOUT_SECONDS)
                if not isinstance(fresh, dict) or domain.uid_of(fresh) != domain.uid_of(obj):
                    raise
                log.info("finalizer patch refused: the object changed, read again", object=str(key),
                         attempt=attempt)
                obj = fresh
                if key in self.objects:
                    self.objects[key] = fresh
                continue
            if isinstance(updated, dict):
                if key in self.objects:
                    self.objects[key] = updated
                return updated
            return obj
        return obj  # not reached: the last try returns or raises

    # --- facts ---

    async def on_rejection(self, fact: RejectionFact, sequence: int = 0) -> None:
        """A command refused or given up on (``sequence``: the fact's in its stream). Kept in the bridge's bucket at
        the next pass (``_record_rejections``), under the lock that orders the bucket's writes."""
        if fact.causation_id.startswith("k8s."):
            self.rejections[fact.causation_id] = fact.reason
            latest = max(sequence, self.rejection_sequences.get(fact.causation_id, 0))
            self.rejection_sequences[fact.causation_id] = latest
            self.unrecorded.add(fact.causation_id)

    async def _record_rejections(self) -> None:
        """Mark the bucket's entries whose apply a rejection refused since it was published: a restart sends them
        again (a user who fixed the cause, a missing runtime say, restarts the bridge). A rejection already
        answered by a resend (its fact read again from the start of the stream) changes nothing."""
        if self.applied is None or not self.applied.ready.is_set():
            return
        for command_id in sorted(self.unrecorded):
            uid = domain.command_uid(command_id)
            entry = self._entry(uid)
            sequence = self.rejection_sequences.get(command_id, 0)
            if (entry is not None and entry.command_id == command_id and not entry.rejected
                    and domain.rejection_holds(entry, command_id, sequence)):
                await self._save_applied(uid, domain.rejected(entry, sequence))
            self.unrecorded.discard(command_id)

    def _prune_rejections(self) -> None:
        """Forget the rejections of objects gone before their fact came, or before this process (the facts are read
        from the start of the stream): ``on_deleted`` never saw them, and they refuse nothing any more."""
        if self._everything_listed():
            live = {domain.uid_of(obj) for obj in self.objects.values()} | set(self.gone)
            self._forget_rejections({domain.command_uid(c) for c in self.rejections} - live)

    def _everything_listed(self) -> bool:
        """Every resource listed in every namespace watched: an object not in ``objects`` now is not there."""
        namespaces: list[str | None] = list(self.settings.kube.namespaces) or [None]
        return all((resource, namespace) in self.listed for resource in kube.RESOURCES for namespace in namespaces)


def _write_private(path: Path, value: bytes) -> None:
    """Write a secret file readable by the owner only, atomically; unchanged files are left alone."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.read_bytes() == value:
            return
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(value)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _remove_secret_files(root: Path, unused: list[str]) -> list[str]:
    """Remove the files ``_store_secrets`` wrote for ``unused`` keys (``domain.secret_files``), and a Secret's folder
    left empty; returns the files removed (relative paths: names, never values)."""
    removed = []
    for flat in unused:
        for folder, name in domain.secret_files(flat):
            path = root / folder / name
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(f"{folder}/{name}")
            with contextlib.suppress(OSError):  # another key of the Secret is still there
                path.parent.rmdir()
    return removed


def _api_message(err: ApiException) -> str:
    """The ``message`` of the API server's Status answer (for a refused status: which field, which value of the
    status the bridge sent; never an object's spec), or nothing."""
    try:
        status = msgspec.json.decode(err.body or b"{}")
    except (msgspec.DecodeError, TypeError):
        return ""
    return str(status.get("message") or "")[:512] if isinstance(status, dict) else ""


def _unanswered(err: Exception) -> str | None:
    """Who did not answer when ``err`` says a call waited out its timeout or found no connection (every call after
    it would do the same); None for an answer, even a refusal."""
    if isinstance(err, nats.errors.Error):
        return "NATS" if isinstance(err, TimeoutError) else None
    if isinstance(err, (TimeoutError, aiohttp.ClientConnectionError)):
        return "the API server"
    return None


def _short(err: Exception) -> str:
    """An API error without its response body (which may echo an object back)."""
    if isinstance(err, ApiException):
        return f"HTTP {err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"[:300]
