"""The NATS JetStream side of every process: connect, provision, publish, consume, and KV compare-and-set.

What it decides:
- the shape of Shoal's streams, KV buckets and the manifest Object Store (``provision`` is idempotent);
- how a handler's outcome becomes an acknowledgement: success → ack; ``RetryLater`` or an unexpected error →
  nak with a growing delay; ``Conflict`` → nak at once (another writer won, the handler re-reads);
  ``Permanent``, an undecodable or oversized payload, or a last failed delivery (a ``Conflict`` too) → a
  ``DeadLetter`` record on the dead-letter stream, then ``term`` so the message is never redelivered.
- that every published event carries ``Nats-Msg-Id`` (its id, for deduplication) and, inside a trace, a PRODUCER
  span whose ``traceparent`` the headers carry; every consumed message gets a CONSUMER span continuing it
  (``messaging.system=nats``, ``messaging.destination.name`` = the subject).
- that a publish or stream operation the server refuses this user (its permissions: ``libs.natsauth``) raises
  ``PermissionDenied`` at once, naming the subject, rather than timing out; any other refusal is logged as
  "permission denied" with its subject. ``provision`` updates only a stream whose settings differ, and leaves what
  this user may not provision to those who may.
- that a consumer or a KV watch outlives its server: when the server goes (a restart, a cluster electing new
  leaders) it attaches again (``ATTACH``'s pace) instead of ending its service; provisioning raises an existing
  stream's or bucket's replicas to ``SHOAL_STREAM_REPLICAS``, and never lowers them.
- that a durable consumer has the settings its process asks for: one kept from before a change (SHOAL_MAX_DELIVER,
  its ack wait, its filters) is updated when the consumer attaches; one the server refuses to update (a setting
  JetStream cannot change) is logged as an error and used as it is, its own ``max_deliver`` deciding the last
  delivery.
- what every service's bus metrics count (``libs.metrics``): each message a consumer handles once, by outcome
  (ok, rejected, retried, dead_lettered, conflict), its handler's time, the consumer's lag at each fetch, the time
  since its last fetch (read when scraped: a stuck handler shows there, not in the lag), and each compare-and-set
  that loses (``kv_save``, ``kv_delete``).

``RetryLater``, ``Permanent`` and ``Conflict`` are the one retry vocabulary: handlers raise them, and both the
consumer loop here and ``libs.reconcile`` honour them. Core NATS (not stored) goes through ``publish_core`` and
``subscribe`` too, so services never touch the connection itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.client import _default_error_callback as _nats_default_error_callback
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import VALID_KEY_RE, KeyValue
from nats.js.object_store import ObjectStore as NatsObjectStore
from opentelemetry import trace

from libs import metrics, natsauth, subjects
from libs.backoff import REDELIVERY, Backoff
from libs.config import MAX_EVENT_BYTES_VARIABLE, NatsSettings
from libs.events.common import DECODE_ERRORS
from libs.events.deadletter import DeadLetter
from libs.natserrors import TlsNotOffered
from libs.redact import cut_error, redact_payload, strip_userinfo
from libs.telemetry import extract_context, get_logger, inject_context, messaging_attributes, producer_span, tracer

log = get_logger(__name__)

DAY = 24 * 3600.0
R = TypeVar("R")
MESSAGE_LIMIT = 1024 * 1024  # JetStream's default max_payload; larger publishes are refused by the server.


# --- Outcomes a handler can signal ---


class RetryLater(Exception):
    """Try this message again after ``delay`` seconds (a dependency is down, state is not there yet)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Permanent(Exception):
    """Retrying cannot help: the message goes to the dead-letter stream with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Conflict(Exception):
    """A compare-and-set lost against another writer; re-read and try again."""


class PermissionDenied(Exception):
    """The server refused this user a publish or a subscription (``libs.natsauth``): nothing was stored or sent."""

    def __init__(self, subject: str, action: str = "publish") -> None:
        super().__init__(f"permission denied: NATS refused this user to {action} to {subject!r}")
        self.subject = subject
        self.action = action


class StoppedConnecting(Exception):
    """The process was told to stop (SIGTERM, Ctrl-C) before NATS answered: nothing started, so nothing is left to
    stop. ``connect`` tries for ever otherwise, and a stop it did not watch went unheard until SIGKILL."""


# nats-server's asynchronous error for a refused publish or subscription: -ERR 'Permissions Violation for Publish
# to "shoal.cmd.dataset.apply"' (the subject in quotes). nats-py hands it to the error callback and keeps the
# connection; a JetStream publish would only time out, so ``Bus`` matches it to the waiting call instead.
_VIOLATION = re.compile(r"permissions violation for (publish|subscription) to \"([^\"]*)\"", re.IGNORECASE)


class Denials:
    """The permission violations the server reports on one connection, matched to the calls waiting on them.

    nats-py lower-cases the server's error text, so a refusal is matched to its call without regard to case, and
    said with the subject as this client spelled it (``said``): ``$JS.API.CONSUMER.CREATE.shoal_facts``, not
    ``$js.api.consumer.create.shoal_facts``.

    ``log_unmatched``: a refusal no call waits for is logged (a service's JSON line). The CLI turns it off: it ends
    every refused command with its own one-line error, which a log line before it would only repeat.
    """

    def __init__(self, log_unmatched: bool = True) -> None:
        self.log_unmatched = log_unmatched
        self._waiting: dict[str, list[tuple[str, asyncio.Future[str]]]] = {}
        # Every refusal seen (action, subject), newest last, bounded: what tests and a debugging operator look at.
        self.seen: list[tuple[str, str]] = []
        # The subjects this client published or subscribed to lately, by their lower-cased form: a refusal comes back
        # within a round trip, so the last few hundred are the ones it can name.
        self._spellings: OrderedDict[str, str] = OrderedDict()

    def said(self, subject: str) -> None:
        """This client published or subscribed to ``subject`` (the client calls it for every one)."""
        key = subject.lower()
        self._spellings[key] = subject
        self._spellings.move_to_end(key)
        if len(self._spellings) > SPELLINGS_KEPT:
            self._spellings.popitem(last=False)

    def watch(self, subject: str) -> asyncio.Future[str]:
        """A future that completes (with the action) when the server refuses ``subject``."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(subject.lower(), []).append((subject, future))
        return future

    def forget(self, subject: str, future: asyncio.Future[str]) -> None:
        key = subject.lower()
        waiting = [entry for entry in self._waiting.get(key, []) if entry[1] is not future]
        if waiting:
            self._waiting[key] = waiting
        else:
            self._waiting.pop(key, None)
        if not future.done():
            future.cancel()

    async def on_error(self, error: Exception) -> None:
        """nats-py's error callback: a refusal is logged as one clear line and wakes its caller; any other error
        goes to nats-py's own handler (its log, which the CLI watches while connecting)."""
        found = _VIOLATION.search(str(error))
        if found is None:
            await _nats_default_error_callback(error)
            return
        action = "publish" if found.group(1).lower() == "publish" else "subscribe"
        waiting = self._waiting.pop(found.group(2).lower(), [])
        subject = waiting[0][0] if waiting else self._spellings.get(found.group(2).lower(), found.group(2))
        del self.seen[:-DENIALS_KEPT]
        self.seen.append((action, subject))
        # A waiting call raises PermissionDenied instead, and its caller says what it was doing.
        if not waiting and self.log_unmatched:
            log.error("permission denied", action=action, subject=subject)
        for _, future in waiting:
            if not future.done():
                future.set_result(action)


# A service that keeps trying a refused subject must not grow this list; the last few say enough.
DENIALS_KEPT = 100
# Spellings ``Denials`` keeps: far more subjects than a client sends in the round trip a refusal takes to come back.
SPELLINGS_KEPT = 256


# --- Connection and provisioning ---


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float
    storage: js_api.StorageType = js_api.StorageType.FILE
    max_msgs_per_subject: int = -1
    max_bytes: int = -1
    max_msgs: int = -1


# Commands are kept a week so a service that was down catches up, and for audit. No command older than this is ever
# delivered again, which bounds how long a delete marker must stay (``libs.markers``).
COMMANDS_MAX_AGE = 7 * DAY

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(subjects.STREAM_COMMANDS, [subjects.ALL_COMMANDS], max_age=COMMANDS_MAX_AGE, max_bytes=1 << 30),
    StreamSpec(subjects.STREAM_FACTS, [subjects.ALL_FACTS], max_age=7 * DAY, max_bytes=1 << 30),
    # Heartbeats and inventory only matter while fresh: an hour, and bounded per node.
    StreamSpec(subjects.STREAM_AGENT, [subjects.ALL_AGENT], max_age=3600.0, max_msgs_per_subject=10_000),
    # The mount processes' progress, kept as long as their parts (``node_task_stream``); each node's parts are in a
    # stream of their own, which this one must not overlap. 1 GiB here took the reservations of the four bounded
    # streams past the embedded server's max_file_store (4 GB) and every provision failed.
    StreamSpec(subjects.STREAM_TASKS, [subjects.TASK_PROGRESS], max_age=DAY, max_bytes=256 << 20),
    StreamSpec(subjects.STREAM_DEAD_LETTERS, [subjects.ALL_DEAD_LETTERS], max_age=30 * DAY, max_bytes=1 << 30),
)


# Parts a node's task stream keeps at most. Bounded by count, not bytes: JetStream reserves a stream's max_bytes
# up front, so 256 MiB per node (the shared stream's bound) would use up the embedded server's file store at a few
# dozen nodes. Parts are at most ~256 KiB (``services.loader.domain.MAX_PART_BYTES``), so this is at most 1 GiB
# written, and a thousand times more parts than one node gets from a run.
NODE_TASK_MESSAGES = 4096


def node_task_stream(node: str) -> StreamSpec:
    """The stream of one node's task parts (``subjects.task_stream``): kept, like the progress, as long as a load
    may reasonably take, for a mount process that may be restarting."""
    return StreamSpec(subjects.task_stream(node), [subjects.node_tasks(node)], max_age=DAY,
                      max_msgs=NODE_TASK_MESSAGES)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int = 1
    ttl: float | None = None


# A replica of a service not heard from for this long is gone (libs.members); its key leaves the bucket then too.
REPLICA_TTL_SECONDS = 6.0

# The agents bucket's TTL. Its entries expire without a delete a watch could see, so a process that mirrors the
# bucket forgets an agent silent for this long itself.
AGENTS_TTL_SECONDS = 60.0

KV_BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(subjects.KV_DATASETS, history=5),
    BucketSpec(subjects.KV_RUNTIMES, history=5),
    BucketSpec(subjects.KV_BINDINGS),
    BucketSpec(subjects.KV_NODE_CACHE),
    BucketSpec(subjects.KV_LISTINGS),
    # An agent that stops beating disappears after a minute even if nobody ticks.
    BucketSpec(subjects.KV_AGENTS, ttl=AGENTS_TTL_SECONDS),
    BucketSpec(subjects.KV_OPERATIONS, history=5),
    BucketSpec(subjects.KV_OPERATION_RUNS),
    BucketSpec(subjects.KV_MEMBERS, ttl=REPLICA_TTL_SECONDS),
    BucketSpec(subjects.KV_BRIDGE_APPLIED),
)


# How long JetStream remembers a message id to drop a repeat of it (``Nats-Msg-Id``): longer than any publish's
# retries (PUBLISH_SECONDS) and a redelivered handler's republish. Module-level so a test can shorten it.
DUPLICATE_WINDOW_SECONDS = 120.0


# What ``provision`` sets on a stream; one that already has these is left alone (no update: a user without the
# right to update, an agent, then provisions nothing and is refused nothing).
_PROVISIONED_FIELDS = ("subjects", "retention", "max_age", "max_bytes", "max_msgs", "max_msgs_per_subject",
                       "max_msg_size", "storage", "num_replicas", "duplicate_window")


def _differs(existing: js_api.StreamConfig, wanted: js_api.StreamConfig) -> bool:
    for name in _PROVISIONED_FIELDS:
        have, want = getattr(existing, name), getattr(wanted, name)
        if isinstance(want, float) and isinstance(have, int | float):
            if abs(have - want) > 1e-3:  # durations travel as nanoseconds
                return True
        elif name == "subjects":
            if sorted(have or []) != sorted(want or []):
                return True
        elif have != want:
            return True
    return False


# A JetStream publish is given up after PUBLISH_SECONDS (the handler's message is then delivered again later),
# asked in attempts of PUBLISH_ATTEMPT_SECONDS: an answer takes milliseconds, so a missing one means no leader yet.
PUBLISH_SECONDS = 5.0
PUBLISH_ATTEMPT_SECONDS = 1.0
# Every other JetStream API request (KV reads and writes, stream and consumer look-ups) gives up after API_SECONDS:
# for the same reason, a request to a group that lost its leader gets no answer, and its caller (a handler's
# redelivery, the reconciler) tries again sooner than after nats-py's default 5 s, once the group has a new leader.
API_SECONDS = 2.5


class Bus:
    """One NATS connection with its JetStream context, and the helpers every service uses."""

    def __init__(self, nc: NatsClient, replicas: int = 1, denials: Denials | None = None,
                 authenticated: bool = False) -> None:
        self.nc = nc
        self.denials = denials or Denials()
        # Only a server that knows who we are can refuse us a subject: without a user or token, ``refusable`` costs
        # nothing on the hot path (a task and a wait per publish).
        self.authenticated = authenticated
        self.js: JetStreamContext = nc.jetstream(timeout=API_SECONDS)
        # For requests that are only worth a short wait (attaching a consumer): a cluster electing a leader does not
        # answer, and a retry a second later finds the new leader sooner than API_SECONDS runs out.
        self.js_attach: JetStreamContext = nc.jetstream(timeout=ATTACH_API_SECONDS)
        self.replicas = replicas
        self._kv: dict[str, KeyValue] = {}
        self._manifests: NatsObjectStore | None = None
        self._tracer = tracer(__name__)

    def reconnects(self) -> int:
        """How often the connection was re-established: a watch starts again when this changes."""
        return int(self.nc.stats["reconnects"])

    async def close(self) -> None:
        """Close the connection; never raises, and lets only a cancellation of the caller itself through.

        nats-py's close cancels its reconnect and reader tasks and can raise their CancelledError into the caller
        when the server is gone (seen in CI at a test's teardown right after a server restart). Closing happens in
        shutdown paths and ``finally`` blocks, where an exception would hide the real outcome.
        """
        if self.nc.is_closed:
            return
        try:
            await self.nc.close()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.warning("NATS connection closed with a stray cancellation from the client library")
        except Exception as err:
            log.warning("NATS connection did not close cleanly", error=str(err))

    async def provision(self) -> None:
        """Create or update every stream, KV bucket and the manifest store; safe to call from every process.

        What this user may not provision (an agent: ``libs.natsauth``) is left to the users that may, and named in
        one log line; a missing stream then shows where it is used.
        """
        refused: list[str] = []
        for spec in STREAMS:
            try:
                await self._stream(spec)
            except PermissionDenied:
                refused.append(spec.name)
        for bucket in KV_BUCKETS:
            stream = natsauth.kv_stream(bucket.name)
            try:
                try:
                    await self.refusable(natsauth.stream_api("INFO", stream), self.js.key_value(bucket.name))
                except BucketNotFoundError:
                    await self.refusable(natsauth.stream_api("CREATE", stream), self.js.create_key_value(
                        js_api.KeyValueConfig(bucket=bucket.name, history=bucket.history, ttl=bucket.ttl,
                                              replicas=self.replicas)
                    ))
                else:
                    await self._replicate(stream)
            except PermissionDenied:
                refused.append(stream)
        stream = natsauth.object_stream(subjects.OBJ_MANIFESTS)
        try:
            try:
                await self.refusable(natsauth.stream_api("INFO", stream), self.js.object_store(subjects.OBJ_MANIFESTS))
            except (BucketNotFoundError, NotFoundError):
                await self.refusable(natsauth.stream_api("CREATE", stream), self.js.create_object_store(
                    subjects.OBJ_MANIFESTS, js_api.ObjectStoreConfig(replicas=self.replicas)
                ))
            else:
                await self._replicate(stream)
        except PermissionDenied:
            refused.append(stream)
        if refused:
            log.info("provisioning left to users allowed to", streams=refused)

    async def provision_node_tasks(self, node: str) -> None:
        """Create or update the stream of ``node``'s task parts (``node_task_stream``): the loader, before it
        publishes the node's first part (no stream, and the part would be refused: "no responders")."""
        await self._stream(node_task_stream(node))

    async def delete_node_tasks(self, node: str) -> None:
        """Delete the stream of ``node``'s task parts (the loader, once the node is gone and none of its parts waits:
        ``services.loader.domain.idle_task_streams``); one already gone is no error."""
        stream = subjects.task_stream(node)
        with contextlib.suppress(NotFoundError):
            await self.refusable(natsauth.stream_api("DELETE", stream), self.js.delete_stream(stream))

    async def node_task_streams(self) -> list[str]:
        """The nodes whose task stream (``subjects.task_stream``) is on the server, by the streams' names."""
        nodes: list[str] = []
        offset = 0
        while True:
            request = json.dumps({"subject": f"{subjects.TASK_PREFIX}.>", "offset": offset}).encode()
            reply = await self.refusable(f"{natsauth.API}.STREAM.NAMES", self.nc.request(
                f"{natsauth.API}.STREAM.NAMES", request, timeout=API_SECONDS))
            page = json.loads(reply.data)
            if "error" in page:
                raise APIError.from_error(page["error"])
            names = page.get("streams") or []
            nodes += [subjects.task_stream_node(name) for name in names
                      if name.startswith(subjects.TASK_STREAM_PREFIX)]
            offset += len(names)
            if not names or offset >= page.get("total", 0):
                return nodes

    async def _stream(self, spec: StreamSpec) -> None:
        config = js_api.StreamConfig(
            name=spec.name,
            subjects=spec.subjects,
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=spec.max_age,
            max_bytes=spec.max_bytes,
            max_msgs=spec.max_msgs,
            max_msgs_per_subject=spec.max_msgs_per_subject,
            max_msg_size=MESSAGE_LIMIT,
            storage=spec.storage,
            num_replicas=self.replicas,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            info = await self.refusable(natsauth.stream_api("INFO", spec.name), self.js.stream_info(spec.name))
        except NotFoundError:
            await self.refusable(natsauth.stream_api("CREATE", spec.name), self.js.add_stream(config))
        else:
            # Never fewer replicas than it has: one process with the default of 1 must not strip a cluster.
            config = replace(config, num_replicas=max(self.replicas, info.config.num_replicas or 1))
            if _differs(info.config, config):
                await self.refusable(natsauth.stream_api("UPDATE", spec.name), self.js.update_stream(config))

    async def _replicate(self, stream: str) -> None:
        """Bring an existing bucket's stream up to ``replicas`` (SHOAL_STREAM_REPLICAS raised after it was created,
        e.g. when a single server grew into a cluster); JetStream copies its messages to the new peers. Never
        down: lowering is an operator's decision, not a side effect of one process's default."""
        info = await self.refusable(natsauth.stream_api("INFO", stream), self.js.stream_info(stream))
        if (info.config.num_replicas or 1) < self.replicas:
            await self.refusable(natsauth.stream_api("UPDATE", stream),
                                 self.js.update_stream(replace(info.config, num_replicas=self.replicas)))

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            # Refusable: a user who may not read the bucket (the observer) got no answer until the JetStream
            # timeout, and the refusal was said twice, in a log line and in the caller's error, lower-cased.
            info = natsauth.stream_api("INFO", natsauth.kv_stream(bucket))
            self._kv[bucket] = await self.refusable(info, self.js.key_value(bucket))
        return self._kv[bucket]

    async def manifests(self) -> NatsObjectStore:
        # Kept like the KV handles: looking it up is a stream-info round trip, once per sync in a burst otherwise.
        if self._manifests is None:
            self._manifests = await self.js.object_store(subjects.OBJ_MANIFESTS)
        return self._manifests

    async def publish(self, subject: str, event: msgspec.Struct, headers: dict[str, str] | None = None) -> int:
        """Publish an event to JetStream; returns its stream sequence. Deduplicated by the event's id."""
        with producer_span(self._tracer, subject):
            all_headers = inject_context(dict(headers or {}))
            all_headers["Nats-Msg-Id"] = message_id(str(getattr(event, "id", "")))
            all_headers["Content-Type"] = "application/json"
            payload = msgspec.json.encode(event)
            deadline = time.monotonic() + PUBLISH_SECONDS
            while True:
                try:
                    ack = await self.refusable(subject, self.js.publish(subject, payload, headers=all_headers,
                                                                        timeout=PUBLISH_ATTEMPT_SECONDS))
                    break
                except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                    # A stream without a leader (a cluster electing one) does not answer: asked again with the
                    # same Nats-Msg-Id (deduplicated), the message lands as soon as a leader is elected, rather
                    # than after one long wait.
                    if time.monotonic() >= deadline:
                        raise
        return int(ack.seq)

    async def refusable(self, subject: str, call: Awaitable[R]) -> R:
        """``call``, or ``PermissionDenied`` as soon as the server refuses ``subject`` to this user: a refused
        JetStream publish or API request gets no answer, and would otherwise end in a timeout saying nothing."""
        if not self.authenticated:
            return await call
        denied = self.denials.watch(subject)
        task: asyncio.Future[R] = asyncio.ensure_future(call)
        try:
            waiting: list[asyncio.Future[Any]] = [task, denied]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if denied.done() and not denied.cancelled():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise PermissionDenied(subject, denied.result())
            return task.result()
        finally:
            self.denials.forget(subject, denied)
            if not task.done():
                task.cancel()

    async def erase(self, stream: str, sequence: int) -> None:
        """Remove one message from a stream, its bytes overwritten on disk (a command that carried a secret)."""
        await self.refusable(natsauth.stream_api("MSG.DELETE", stream), self.js.delete_msg(stream, sequence))

    # --- Core NATS: not stored, not acknowledged; for requests only worth something while someone listens. ---

    async def publish_core(self, subject: str, event: msgspec.Struct) -> None:
        """Send an event to whoever subscribes right now (a snapshot request, for instance)."""
        await self.nc.publish(subject, msgspec.json.encode(event))

    async def subscribe(self, subject: str, decoder: msgspec.json.Decoder[E],
                        handler: Callable[[E], Awaitable[None]]) -> Subscription:
        """Hand every event on ``subject`` to ``handler``, decoded; undecodable payloads are skipped.

        Stop with ``unsubscribe()`` on the result.
        """

        async def on_message(message: Msg) -> None:
            try:
                event = decoder.decode(message.data)
            except DECODE_ERRORS:
                log.warning("undecodable message ignored", subject=message.subject)
                return
            await handler(event)

        return await self.nc.subscribe(subject, cb=on_message)

    async def serve(self, subject: str, answer: Callable[[bytes], bytes], queue: str = "") -> Subscription:
        """Answer requests on ``subject`` (core NATS request/reply): ``answer`` turns the raw request into the raw
        reply, so it decides itself what a malformed request gets. Processes sharing ``queue`` share the requests.
        Requests without a reply subject are dropped. Stop with ``unsubscribe()`` on the result."""

        async def on_request(message: Msg) -> None:
            if not message.reply:
                return
            try:
                await self.nc.publish(message.reply, answer(message.data))
            except Exception:  # one bad request or a closed connection must not end the subscription
                log.exception("request not answered", subject=message.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_request)


class _Client(NatsClient):
    """nats-py's client, telling ``denials`` each subject it publishes or subscribes to, as spelled: the server's
    refusal names it too, but nats-py lower-cases it. nats-py's requests (every JetStream API call) publish too."""

    denials: Denials | None = None

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> None:
        if self.denials is not None:
            self.denials.said(subject)
        await super().publish(subject, *args, **kwargs)

    async def _send_subscribe(self, sub: Subscription) -> None:
        if self.denials is not None:
            self.denials.said(sub.subject)
        await super()._send_subscribe(sub)


class _TlsOnlyClient(_Client):
    """nats-py upgrades a connection to TLS only when the server's INFO asks for it; otherwise it sends CONNECT, with
    the user's password or token, in clear, whatever ``tls`` it was given. So a server that lost its TLS, or whatever
    took its port while it was down (a service reconnects twice a second), would be handed every service's password.
    Given a CA, a client sends its CONNECT over TLS or not at all (as the Go client's ``Secure`` option does)."""

    def _connect_command(self) -> bytes:
        if not self._server_info.get("tls_required"):
            # The address without a user or password the URL may carry.
            where = self._current_server.uri.netloc.rpartition("@")[2] if self._current_server else "the server"
            raise TlsNotOffered(f"{where} offers no TLS, and a CA was given: nothing was sent to it")
        return super()._connect_command()


class _QuietTlsClose(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time a TLS connection
    of nats-py closes: nothing is wrong, and a CLI user should not read it after every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


_QUIET_TLS_CLOSE = _QuietTlsClose()


def login_user(settings: NatsSettings) -> str:
    """The user this client logs in as: ``NATS_USER``, else the user of the first URL that names a user and a
    password (nats-py logs in with those when no user is given; a URL user without a password is a token); "" for
    none."""
    if settings.user:
        return settings.user
    for url in settings.urls:
        parts = urlsplit(url)
        if parts.username and parts.password is not None:
            return parts.username
    return ""


# Seconds nats-py gives one server to answer a connection (TCP, TLS, INFO, PONG) before it tries the next: its own
# default, generous for a server that is busy or far away; a process that must move on sooner says so.
CONNECT_TIMEOUT = 5.0


# How long a cancelled connection attempt is given to end, cancelled again each tenth of a second meanwhile.
STOP_CONNECTING_SECONDS = 5.0


async def _stop_connecting(nc: NatsClient, attempt: asyncio.Future[None]) -> None:
    for _ in range(int(STOP_CONNECTING_SECONDS * 10)):
        attempt.cancel()
        done, _ = await asyncio.wait({attempt}, timeout=0.1)
        if done:
            break
    if attempt.done() and not attempt.cancelled():
        attempt.exception()  # retrieved: the caller asked to stop, not for this error
    with contextlib.suppress(Exception):
        await nc.close()


async def connect(settings: NatsSettings, name: str, *, log_denials: bool = True,
                  connect_timeout: float = CONNECT_TIMEOUT, stop: asyncio.Event | None = None) -> Bus:
    """A connected Bus; ``log_denials`` False leaves a refusal no call waits for to the caller (``Denials``);
    ``connect_timeout``: seconds per server (``CONNECT_TIMEOUT``). A process's ``stop`` set before any server
    answered (it tries them for ever) ends the attempt with ``StoppedConnecting``."""
    denials = Denials(log_unmatched=log_denials)
    options: dict[str, Any] = {
        "servers": settings.urls,
        "name": name,
        # Reconnect forever: a service outlives a NATS restart or a cluster leader change.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": connect_timeout,
        "error_cb": denials.on_error,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password.reveal()
    if user := login_user(settings):
        # Replies to this user arrive below its own inbox, the only one its permissions let it read: a user given in
        # the URL too, or its first KV read or JetStream publish is refused.
        options["inbox_prefix"] = natsauth.inbox_prefix(user)
    if settings.token:
        options["token"] = settings.token.reveal()
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
        options["tls"] = context
        logging.getLogger("asyncio").addFilter(_QUIET_TLS_CLOSE)  # once: filters are a set
    nc = _TlsOnlyClient() if "tls" in options else _Client()
    nc.denials = denials
    await _connect_unless_stopped(nc, options, stop)
    return Bus(nc, replicas=settings.replicas, denials=denials,
               authenticated=bool(settings.user or settings.token.reveal() or any("@" in url for url in settings.urls)))


async def _connect_unless_stopped(nc: NatsClient, options: dict[str, Any], stop: asyncio.Event | None) -> None:
    """nats-py's attempt, run as a task of its own so that a caller giving up (cancelled, or its ``stop`` set) is
    sure to: it retries for ever, and a cancel landing in one of its ``wait_for`` as the call inside ends is lost on
    Python 3.11, after which the attempt went on and whoever waited for it hung (``_stop_connecting``)."""
    attempt = asyncio.ensure_future(nc.connect(**options))
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait([attempt, *([stopping] if stopping else [])], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _stop_connecting(nc, attempt)
        raise
    finally:
        if stopping is not None:
            stopping.cancel()
    if not attempt.done():
        await _stop_connecting(nc, attempt)
        raise StoppedConnecting(f"stopped before NATS answered at {', '.join(map(strip_userinfo, options['servers']))}")
    attempt.result()


# --- KV with compare-and-set ---

T = TypeVar("T")


def invalid_key(key: str) -> Permanent:
    """A key built from an event's fields (a name, a run id) that NATS cannot store: no retry can help, so the
    message is dead-lettered with this reason (found by fuzzing: it used to be retried as a handler failure)."""
    return Permanent(f"{key!r} is not a valid KV key: use letters, digits and -/_=. (not at either end)")


async def kv_load(kv: KeyValue, key: str, type_: type[T]) -> tuple[T | None, int | None]:
    """The decoded value and its revision; (None, None) when absent or deleted (nats-py's ``get`` reports a delete
    marker as not found: ``kv_load_deleted`` reads it); ``Permanent`` for a key NATS cannot hold."""
    try:
        entry = await kv.get(key)
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyNotFoundError:
        return None, None
    if entry.value is None:
        return None, entry.revision
    return msgspec.json.decode(entry.value, type=type_), entry.revision


async def kv_load_deleted(kv: KeyValue, key: str, type_: type[T]) -> tuple[T | None, int | None, bytes]:
    """``kv_load``, and for a deleted key the note its delete left (``kv_delete``'s ``note``; empty without)."""
    try:
        entry = await kv.get(key)
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyNotFoundError as err:
        # nats-py's ``get`` reports a deleted key as not found, with the delete marker as the error's entry and its
        # operation as the error's ``op``.
        marker = err.entry
        if marker is None or err.op not in ("DEL", "PURGE"):
            return None, None, b""
        return None, marker.revision, marker.value or b""
    if entry.value is None:
        return None, entry.revision, b""
    return msgspec.json.decode(entry.value, type=type_), entry.revision, b""


async def kv_save(kv: KeyValue, key: str, value: msgspec.Struct, revision: int | None) -> int:
    """Write only if the key is still at ``revision`` (None: only if it does not exist, a deleted key included);
    else ``Conflict``. 0: only if the key never held anything, so a delete or purge marker written since the caller
    read the key is not written over (nats-py's ``create`` writes over one)."""
    payload = msgspec.json.encode(value)
    try:
        if revision is None:
            return int(await kv.create(key, payload))
        return int(await kv.update(key, payload, last=revision))
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyWrongLastSequenceError as err:
        _lost(kv)
        raise Conflict(f"{key} changed concurrently") from err
    except nats.js.errors.BadRequestError as err:
        # create() on an existing key answers "wrong last sequence" as a bad request on some servers.
        _lost(kv)
        raise Conflict(f"{key} changed concurrently: {err}") from err


async def kv_delete(kv: KeyValue, key: str, revision: int | None, note: bytes = b"") -> int:
    """Delete ``key`` if it is still at ``revision`` (0: only where the key holds nothing yet; None: whatever it
    holds); else ``Conflict``. Returns the delete marker's revision, for a mirror to record (``KvMirror.deleted``).
    ``note`` stays in the delete marker, where ``kv_load_deleted`` finds it (watchers see a plain delete). The marker
    is published as nats-py's ``delete`` writes it (a ``KV-Operation: DEL`` message on the key's subject), which
    returns neither the revision nor a payload."""
    try:
        if not VALID_KEY_RE.match(key) or key.startswith(".") or key.endswith("."):  # as nats-py checks
            raise InvalidKeyError(key)
        headers = {"KV-Operation": "DEL"}
        if revision is not None:
            headers[js_api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(revision)
        ack = await kv._js.publish(f"{kv._pre}{key}", note, headers=headers)
        return int(ack.seq)
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyWrongLastSequenceError as err:
        _lost(kv)
        raise Conflict(f"{key} changed concurrently") from err
    except nats.js.errors.BadRequestError as err:
        # A stale revision is answered as a bad request ("wrong last sequence"), not as the error above.
        _lost(kv)
        raise Conflict(f"{key} changed concurrently: {err}") from err


def _lost(kv: KeyValue) -> None:
    """Count one compare-and-set that lost, by bucket (the only place ``KV_CONFLICTS`` moves)."""
    # nats-py keeps the bucket's name only in a private attribute; the bucket names are few and fixed (KV_BUCKETS).
    metrics.KV_CONFLICTS.labels(getattr(kv, "_name", "") or "unknown").inc()


async def kv_values(kv: KeyValue, type_: type[T]) -> list[T]:
    """Every live value in a bucket (small buckets: datasets, runtimes, agents)."""
    values = []
    for key in await kv_keys(kv):
        value, _ = await kv_load(kv, key, type_)
        if value is not None:
            values.append(value)
    return values


# How long ``kv_keys`` waits for the next key of its listing before giving up (nats-py's TimeoutError).
KEYS_READ_SECONDS = 5.0


async def kv_keys(kv: KeyValue) -> list[str]:
    """The keys of the bucket's live values, each once, in the order the bucket last wrote them.

    Read from a watch's initial entries (``initial_entries``), not nats-py's ``keys()``: that stops at nats-py's
    "caught up" None, which under load comes before some keys (an empty answer, or part of the keys; see
    ``WatchStart``). A key written while the listing reads comes again with its new value, one deleted meanwhile
    leaves it."""
    watcher = await kv.watchall(meta_only=True)
    live: dict[str, None] = {}
    try:
        async for entry in initial_entries(watcher, KEYS_READ_SECONDS):
            if entry.operation in ("DEL", "PURGE"):
                live.pop(entry.key, None)
            else:
                live[entry.key] = None
    finally:
        await watcher.stop()
    return list(live)


# The subjects of an Object Store's meta messages: this prefix, then the object's name in URL-safe base64.
OBJECT_META_PREFIX = "$O.{bucket}.M."


def object_metas(js: JetStreamContext, bucket: str) -> KeyValue:
    """The meta messages of Object Store ``bucket`` read as a KV bucket. They are shaped as one (a prefix, then one
    token per object, the last message of each current), so a KV watch reads them: an ordered consumer, last per
    subject, whose initial entries ``initial_entries`` reads in full."""
    return KeyValue(name=bucket, stream=natsauth.object_stream(bucket), pre=OBJECT_META_PREFIX.format(bucket=bucket),
                    js=js, direct=False)


def object_deleted(meta: bytes | None) -> bool:
    """An Object Store meta message that says its object was deleted (nats-py's ``ObjectInfo.deleted``)."""
    try:
        return bool(json.loads(meta or b"{}").get("deleted"))
    except (ValueError, AttributeError):
        return False


def object_name(key: str) -> str | None:
    """The object a meta subject's last token names (URL-safe base64 of the name); None if it does not decode."""
    try:
        return base64.urlsafe_b64decode(key.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


async def object_names(store: NatsObjectStore) -> list[str]:
    """The names of the store's objects, deleted ones left out, in the order the store last wrote them.

    Read from a watch of the meta messages (``object_metas``, ``initial_entries``), not nats-py's
    ``ObjectStore.list()``: that stops at the same early "caught up" None as a KV listing (``WatchStart``), and
    its object infos carry no pending count to read past it, so it can answer with part of the objects or none
    (an orphan sweep then removed fewer). An object deleted while the listing reads leaves it."""
    # nats-py keeps the store's JetStream context and bucket name only in private attributes.
    watcher = await object_metas(store._js, store._name).watchall()
    live: dict[str, None] = {}
    try:
        async for entry in initial_entries(watcher, KEYS_READ_SECONDS):
            name = object_name(entry.key)
            if name is None:
                continue  # not a meta subject nats-py writes: no object of that name can be read
            if object_deleted(entry.value):
                live.pop(name, None)
            else:
                live[name] = None
    finally:
        await watcher.stop()
    return list(live)


# --- The consumer loop ---


# Longest event id used as it is for ``Nats-Msg-Id``. A command's id is its publisher's choice, and the facts
# answering it derive theirs from it: a header line of 64 KiB or more is refused by the server (found by fuzzing).
MESSAGE_ID_LIMIT = 256
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def message_id(event_id: str) -> str:
    """The ``Nats-Msg-Id`` of an event: its id, or a digest of it when it is too long for a header line or holds a
    control character (CR or LF would end the header). The same id always gives the same value: deduplicated."""
    if len(event_id) <= MESSAGE_ID_LIMIT and not _HEADER_UNSAFE.search(event_id):
        return event_id
    return "sha256-" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its decoded event."""

    subject: str
    headers: dict[str, str]
    deliveries: int
    stream_sequence: int
    # When JetStream stored the message (server clock): the age of a replayed heartbeat, for instance.
    published_at: float = 0.0

    @property
    def message_id(self) -> str:
        return self.headers.get("Nats-Msg-Id", "")


class _CommandId(msgspec.Struct):
    """The one field of a command read when the rest of it does not decode."""

    id: str = ""


_COMMAND_ID_DECODER = msgspec.json.Decoder(_CommandId)


def invalid_command_id(delivery: Delivery, payload: bytes) -> str:
    """The id a rejection of an undecodable command answers (its ``causationId``): the ``Nats-Msg-Id``, else the
    ``id`` the payload names when that much of it decodes (a schema violation from a publisher that sent no
    header), else ``seq-<stream sequence>``. Before, without the header the publisher got a ``seq-`` id it could
    not match to its command, though its id was right there. An id that could not be a header value (too long, a
    control character) is not taken."""
    if delivery.message_id:
        return delivery.message_id
    try:
        named = _COMMAND_ID_DECODER.decode(payload).id
    except DECODE_ERRORS:
        named = ""
    if named and len(named) <= MESSAGE_ID_LIMIT and not _HEADER_UNSAFE.search(named):
        return named
    return f"seq-{delivery.stream_sequence}"


# Where the delivery count, stream sequence and store time sit in a JetStream reply subject, by its token count:
# ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>`` (9 tokens) or, since servers with
# domains, ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>.<token>``.
_REPLY_TOKENS = {9: (4, 5, 7), 11: (6, 7, 9), 12: (6, 7, 9)}


def delivery_of(message: Msg) -> Delivery:
    """The message's delivery facts, read straight from its reply subject. nats-py's ``metadata`` says the same
    but builds a datetime and several objects per message, which at inventory rates costs a tenth of the fold;
    it stays the fallback for a reply of another shape."""
    tokens = (message.reply or "").split(".")
    positions = _REPLY_TOKENS.get(len(tokens))
    headers = dict(message.headers or {})
    if positions is not None and tokens[1] == "ACK":
        delivered, sequence, stored = positions
        try:
            return Delivery(subject=message.subject, headers=headers, deliveries=int(tokens[delivered]) or 1,
                            stream_sequence=int(tokens[sequence]), published_at=int(tokens[stored]) / 1e9)
        except ValueError:
            pass
    metadata = message.metadata
    return Delivery(
        subject=message.subject,
        headers=headers,
        deliveries=metadata.num_delivered or 1,
        stream_sequence=metadata.sequence.stream if metadata.sequence else 0,
        published_at=metadata.timestamp.timestamp() if metadata.timestamp else 0.0,
    )


E = TypeVar("E")
Handler = Callable[[E, Delivery], Awaitable[None]]
InvalidHandler = Callable[[Delivery, str, bytes], Awaitable[None]]


# Attaching a consumer again after its server went away: a cluster elects new leaders within seconds (~6 s
# measured for a killed stream leader), so retry quickly, then every second (a fetch or one API request each).
ATTACH = Backoff(first=0.25, cap=1.0)
# The API timeout of a look-up of a durable once it was attached (``Bus.js_attach``): a healthy cluster answers in
# milliseconds, a leaderless consumer not at all.
ATTACH_API_SECONDS = 1.5
# Failed attaches between two look-ups of the durable (~2 s at first): a look-up during an election waits out its
# API timeout (``ATTACH_API_SECONDS``), so not at every attempt.
LOOKUP_EVERY = 4
# A durable the server refuses this user (``PermissionDenied``) is asked for again this often: only a reload of the
# server's permissions changes the answer.
REFUSED_RETRY_SECONDS = 10.0
# JetStream's ack wait on every ``Consumer``'s durable: a message handed to a process that died (``kill -9``, an OOM
# kill, a lost node) goes to another replica, or to the restarted process, after this long. It was 30 s, which was
# then the time a replica took over a command its peer had fetched. A process that is alive says so for each message
# it holds every WORKING_SECONDS (``in_progress``, from the fetch until the message is settled), so a long handler,
# or a message queued behind others in its lane, is never handed to another replica meanwhile; only a loop stalled
# for the whole ack wait, or a NATS leader election longer than it, lets a message be handled twice, which handlers
# tolerate (their KV writes compare-and-set, their publishes are deduplicated by id).
ACK_WAIT_SECONDS = 5.0
# How often a process tells JetStream it is still working on the messages it fetched (the first time this long after
# the fetch: a fetch settled sooner sends none): twice within the ack wait, so one working-ack lost or late (a busy
# loop, a reconnect) still leaves the message with its process. Every second cost the load bench's steady phase,
# with the services seconds behind and each fetch of up to 256 commands held that long, 4-11 % more CPU per
# dataset in the dataset services (two rounds, against the same code without working-acks).
WORKING_SECONDS = 2.0


# What ``Consumer`` sets on its durable, compared with an existing durable's settings (``_consumer_changes``).
_CONSUMER_FIELDS = ("ack_policy", "deliver_policy", "ack_wait", "max_deliver", "max_ack_pending")


def _filters(config: js_api.ConsumerConfig) -> list[str]:
    return sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def _consumer_changes(existing: js_api.ConsumerConfig, wanted: js_api.ConsumerConfig) -> dict[str, list[Any]]:
    """Each setting of ``wanted`` an existing durable has otherwise, as [what it has, what is wanted]."""
    changes: dict[str, list[Any]] = {}
    for name in _CONSUMER_FIELDS:
        have, want = getattr(existing, name), getattr(wanted, name)
        if isinstance(want, float) and isinstance(have, int | float):
            if abs(have - want) > 1e-3:  # durations travel as nanoseconds
                changes[name] = [have, want]
        elif have != want:
            changes[name] = [have, want]
    if _filters(existing) != _filters(wanted):
        changes["filter_subjects"] = [_filters(existing), _filters(wanted)]
    return changes


def retry_delay(deliveries: int) -> float:
    """0.5 s doubling per delivery, capped at 30 s (``libs.backoff.REDELIVERY``)."""
    return REDELIVERY.delay(deliveries)


def misplaced_command(event: object, subject: str) -> str | None:
    """Why a command arrived on a subject not its own (``subjects.command_subject``), or None. Decoding goes by the
    payload's type, and NATS permissions by the subject: a user allowed only ``shoal.cmd.dataload.run`` (or the
    autoscaler's ``shoal.cmd.runtime.scale``) could otherwise delete or apply anything of that consumer's families
    by sending that command there."""
    if not subject.startswith(subjects.COMMAND_PREFIX):
        return None
    tag = getattr(getattr(type(event), "__struct_config__", None), "tag", None)
    if not isinstance(tag, str) or subjects.command_subject(tag) == subject:
        return None
    return f"a {tag} command is sent on {subjects.command_subject(tag)}, not on {subject}"


def oversize_reason(size: int, limit: int) -> str:
    """Why a message of ``size`` bytes is not handled, with what changes that: for a command it goes back to its
    publisher (``shoal apply`` prints it), where the bare sizes left a person with nothing to do."""
    return (f"payload of {size} bytes exceeds the limit of {limit} bytes ({MAX_EVENT_BYTES_VARIABLE} of the service "
            f"that handles it): make it smaller (for an object: fewer mounts, mount options, labels or targets, or "
            f"several objects instead of one), or raise {MAX_EVENT_BYTES_VARIABLE} for that service")


@dataclass
class Consumer(Generic[E]):
    """A durable pull consumer that decodes at the edge and maps handler outcomes to acks.

    ``on_invalid`` is told about payloads that cannot be decoded, and about messages given up on (a ``Permanent``
    error, or the last delivery failing), so a command's publisher gets a rejection with the reason rather than
    silence; they are dead-lettered either way.
    """

    bus: Bus
    stream: str
    durable: str
    # One subject filter, or several (JetStream's filter_subjects: one durable over e.g. two command families).
    filter_subject: str | list[str]
    decoder: msgspec.json.Decoder[E]
    handler: Handler[E]
    max_event_bytes: int
    max_deliver: int = 5
    on_invalid: InvalidHandler | None = None
    # How soon a message fetched by a process that died goes to another (``ACK_WAIT_SECONDS``); a live process keeps
    # what it fetched every ``working_every`` seconds.
    ack_wait: float = ACK_WAIT_SECONDS
    working_every: float = WORKING_SECONDS
    batch: int = 16
    # A span per message (trace context from the headers). Off for high-volume internal traffic (inventory), where
    # the span would cost more than the handler: ~30 us without an SDK, ~100 us with one, per message.
    traced: bool = True
    # With ``lane_of``, the messages of one fetch are handled at once, one lane per key it returns for a message
    # (in stream order within a lane): a handler waiting on NATS round trips no longer holds up messages of other
    # keys, and their publishes share the connection's writes. None: one message after another.
    lane_of: Callable[[Msg], str] | None = None
    # The clock of the time since the last fetch (``CONSUMER_FETCH_AGE``); a test's own to move.
    clock: Callable[[], float] = time.monotonic
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    # When the last fetch came back (or the consumer started), on ``clock``; None while not running.
    _fetched_at: float | None = field(default=None, init=False)
    # One tracer per consumer: looking it up per message costs as much as the span (it delegates to whatever
    # provider is installed, also one installed later).
    _tracer: trace.Tracer = field(default_factory=lambda: tracer(__name__), init=False)

    def __post_init__(self) -> None:
        # The label sets are bound once (a lookup per message would cost as much as the increment) and every
        # outcome is there from the start, at 0, so a rate over it is 0 rather than absent.
        # Moved by plain additions (``libs.metrics.adder``): at inventory rates the library's locked methods cost
        # a fifth of what the handler does.
        self._outcomes = {outcome: metrics.adder(metrics.COMMANDS.labels(self.durable, outcome))
                          for outcome in (metrics.OK, metrics.REJECTED, metrics.RETRIED, metrics.DEAD_LETTERED,
                                          metrics.CONFLICT)}
        self._handler_seconds = metrics.observer(metrics.HANDLER_SECONDS.labels(self.durable))
        self._lag = metrics.setter(metrics.CONSUMER_LAG.labels(self.durable))
        self._fetch_age = metrics.CONSUMER_FETCH_AGE.labels(self.durable)
        # The deliveries after which the server gives a message up: the durable's own ``max_deliver`` (``_durable``),
        # which is this consumer's unless the server refused to update an older durable.
        self._max_deliver = self.max_deliver

    async def run(self) -> None:
        filters = [self.filter_subject] if isinstance(self.filter_subject, str) else list(self.filter_subject)
        config = js_api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=1000,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        # Read when scraped, so it grows while nothing is fetched; one clock read per fetch, none per message. The
        # consumer last started in this process owns its durable's series (tests run several).
        self._fetched_at = self.clock()
        self._fetch_age.set_function(self._since_fetch)
        try:
            await self._attached(config)
        finally:
            self._fetched_at = None

    def _since_fetch(self) -> float:
        fetched_at = self._fetched_at
        return 0.0 if fetched_at is None else max(0.0, self.clock() - fetched_at)

    async def _attached(self, config: js_api.ConsumerConfig) -> None:
        """Attach to the durable and fetch from it until stopped, attaching again whenever its server goes."""
        failures = 0
        # Whether the durable may be missing (at the start, the server said so, or every LOOKUP_EVERY failures): only
        # then is it looked up and created. Otherwise attaching again makes no API request, which during a cluster's
        # election would wait out an API timeout; the fetches find the consumer's new leader once elected.
        lookup = True
        # Until the first attach, look-ups get the default API timeout (a busy start-up is slow, not leaderless);
        # after it, a look-up during an election gives up after ATTACH_API_SECONDS and is tried again.
        attached = False
        while not self._stopping.is_set():
            try:
                if lookup:
                    await self._durable(self.bus.js_attach if attached else self.bus.js, config)
                    lookup = False
                    attached = True
                subscription = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
                try:
                    async for _ in self._pull(subscription):
                        failures = 0
                finally:
                    with contextlib.suppress(Exception):  # its server may be the one that went away
                        await subscription.unsubscribe()
            except PermissionDenied as err:
                # This user may not use the durable (its permissions, ``libs.natsauth``): said loudly, and tried
                # again now and then, since the server's permissions may be reloaded. Nothing was created or changed.
                failures += 1
                lookup = True
                log.error("consumer refused by NATS permissions", consumer=self.durable, stream=self.stream,
                          subject=err.subject, error=str(err), retry_in=REFUSED_RETRY_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), REFUSED_RETRY_SECONDS)
            except nats.errors.Error as err:
                # The consumer's server went away (a cluster electing a new leader answers 503, no responders, or
                # times out) or the connection is down: attach again, as often as ATTACH allows, until stopped.
                if self.bus.nc.is_closed:
                    raise
                failures += 1
                # A deleted durable answers fetches like a leaderless one (503, no responders): every few failures
                # it is looked up (and created if gone) after all.
                lookup = isinstance(err, NotFoundError) or not attached or failures % LOOKUP_EVERY == 0
                delay = ATTACH.delay(failures)
                log.warning("consumer detached, attaching again", consumer=self.durable, error=repr(err),
                            delay=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _durable(self, js: JetStreamContext, config: js_api.ConsumerConfig) -> None:
        """Create the durable, or bring an existing one to ``config``: nats-py's ``pull_subscribe`` only creates a
        missing one, and a durable kept from before a change of settings (SHOAL_MAX_DELIVER raised, say) would go on
        giving messages up after its old count, unseen by ``_outcome``. JetStream updates ``max_deliver``,
        ``ack_wait``, ``max_ack_pending`` and the filters of a durable added again under its name; it refuses other
        changes (the deliver or ack policy), and then the durable is used as it is, its refusal logged."""
        # Refused at once, naming the subject, when this user may not use the durable (``libs.natsauth``).
        create = natsauth.consumer_create_subject(self.stream, self.durable, config.filter_subject)
        try:
            info = await self.bus.refusable(natsauth.consumer_api("INFO", self.stream, self.durable),
                                            js.consumer_info(self.stream, self.durable))
        except NotFoundError:
            info = await self.bus.refusable(create, js.add_consumer(self.stream, config=config))
        else:
            changed = _consumer_changes(info.config, config)
            if changed:
                try:
                    info = await self.bus.refusable(create, js.add_consumer(self.stream, config=config))
                except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as err:
                    log.error("consumer settings not updated: the server refused, the durable keeps its own",
                              consumer=self.durable, stream=self.stream, changes=changed,
                              error=getattr(err, "description", None) or repr(err))
                else:
                    log.info("consumer settings updated", consumer=self.durable, stream=self.stream, changes=changed)
        self._max_deliver = info.config.max_deliver or 0

    async def _pull(self, subscription: JetStreamContext.PullSubscription) -> AsyncGenerator[None, None]:
        """Fetch and process until stopped; yields after each fetch that reached the consumer."""
        while not self._stopping.is_set():
            try:
                messages = await subscription.fetch(self.batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                # Nothing arrived within the wait: no message of the stream is waiting for this consumer.
                self._fetched_at = self.clock()
                self._lag(0)
                continue
            self._fetched_at = self.clock()
            yield
            # Messages still in the stream behind the last one fetched (JetStream's count for this consumer).
            if messages:
                self._lag(messages[-1].metadata.num_pending or 0)
            await self._work_on(messages)

    async def _work_on(self, messages: list[Msg]) -> None:
        """Process a fetch's messages, telling JetStream every ``working_every`` seconds that each one not settled
        yet (being handled, or waiting its turn) is still this process's: with a short ack wait, a fetch that takes
        longer would otherwise be handed to another replica while this one works on it."""
        # By identity (nats-py's messages are unhashable dataclasses); a message leaves it once processed.
        unsettled = {id(message): message for message in messages}
        done = asyncio.Event()
        working = asyncio.ensure_future(self._keep_working(unsettled, done))

        async def settle(message: Msg) -> None:
            try:
                await self.process(message)
            finally:
                unsettled.pop(id(message), None)

        try:
            if self.lane_of is None:
                for message in messages:
                    await settle(message)
            else:
                await self._process_in_lanes(messages, settle)
        finally:
            done.set()
            working.cancel()
            await asyncio.gather(working, return_exceptions=True)

    async def _keep_working(self, unsettled: dict[int, Msg], done: asyncio.Event) -> None:
        """Every ``working_every`` seconds until ``done``: a working-ack (``in_progress``) for each message in
        ``unsettled``. It ends on ``done``, not only on its cancellation: nats-py may swallow a cancellation that
        lands inside one of its calls (as ``services.agent.tasks`` found)."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.working_every)
            for message in list(unsettled.values()):
                if done.is_set():
                    return
                # A lost working-ack costs at most a second delivery, which handlers tolerate; NATS away says so in
                # the consumer's own loop.
                with contextlib.suppress(Exception):
                    await message.in_progress()

    async def _process_in_lanes(self, messages: list[Msg], process: Callable[[Msg], Awaitable[None]]) -> None:
        assert self.lane_of is not None
        lanes: dict[str, list[Msg]] = {}
        for message in messages:
            lanes.setdefault(self.lane_of(message), []).append(message)

        async def lane(queued: list[Msg]) -> None:
            for message in queued:
                await process(message)

        # Every lane finishes before an error goes up (as one message after another would have stopped there).
        results = await asyncio.gather(*(lane(queued) for queued in lanes.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def stop(self) -> None:
        self._stopping.set()

    async def process(self, message: Msg) -> None:
        delivery = delivery_of(message)
        if not self.traced:
            await self._handle(message, delivery)
            return
        with self._tracer.start_as_current_span(
            f"process {self.durable}",
            context=extract_context(delivery.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes=messaging_attributes(delivery.subject),
        ):
            await self._handle(message, delivery)

    def _bound(self, delivery: Delivery) -> Any:
        # Bound only when there is something to log: binding costs more than folding a small event.
        return log.bind(subject=delivery.subject, seq=delivery.stream_sequence, consumer=self.durable,
                        msg_id=delivery.message_id, delivery=delivery.deliveries)

    async def _handle(self, message: Msg, delivery: Delivery) -> None:
        # The one place a handled message is counted: ``_outcome`` says what became of it.
        self._outcomes[await self._outcome(message, delivery)](1)

    async def _outcome(self, message: Msg, delivery: Delivery) -> str:
        if len(message.data) > self.max_event_bytes:
            reason = oversize_reason(len(message.data), self.max_event_bytes)
            await self._reject(message, delivery, reason, self._bound(delivery))
            return metrics.REJECTED
        try:
            event = self.decoder.decode(message.data)
        except DECODE_ERRORS as err:
            await self._reject(message, delivery, f"invalid event: {err}", self._bound(delivery))
            return metrics.REJECTED
        if (misplaced := misplaced_command(event, delivery.subject)) is not None:
            await self._reject(message, delivery, misplaced, self._bound(delivery))
            return metrics.REJECTED
        try:
            await self._call(event, delivery)
        except Conflict as err:
            bound = self._bound(delivery)
            if self._last(delivery):
                # The server delivers this message no more: naked, it would be neither handled nor dead-lettered.
                await self._give_up(message, delivery, f"gave up after {delivery.deliveries} deliveries: "
                                    f"conflict: {err}", bound)
                return metrics.DEAD_LETTERED
            # At once, deliberately (as ``libs.reconcile``): the writer that won is done, and a re-read sees its
            # write. A hot key cannot spin: each redelivery spends one of the durable's ``max_deliver``.
            bound.info("conflict, retrying", reason=str(err))
            await message.nak(delay=0)
            return metrics.CONFLICT
        except Permanent as err:
            await self._give_up(message, delivery, err.reason, self._bound(delivery))
            return metrics.DEAD_LETTERED
        except RetryLater as err:
            return await self._retry(message, delivery, err.reason, err.delay, self._bound(delivery))
        except Exception as err:  # a bug or an unexpected outage: retry, then dead-letter
            bound = self._bound(delivery)
            bound.exception("handler failed")
            return await self._retry(message, delivery, f"{type(err).__name__}: {err}", None, bound)
        await message.ack()
        return metrics.OK

    async def _call(self, event: E, delivery: Delivery) -> None:
        """The handler, timed whatever its outcome."""
        started = time.perf_counter()
        try:
            await self.handler(event, delivery)
        finally:
            self._handler_seconds(time.perf_counter() - started)

    def _last(self, delivery: Delivery) -> bool:
        """Whether the server will not deliver this message again: its durable's ``max_deliver`` is reached."""
        return 0 < self._max_deliver <= delivery.deliveries

    async def _retry(self, message: Msg, delivery: Delivery, reason: str, delay: float | None, bound: Any) -> str:
        if self._last(delivery):
            await self._give_up(message, delivery, f"gave up after {delivery.deliveries} deliveries: {reason}", bound)
            return metrics.DEAD_LETTERED
        delay = retry_delay(delivery.deliveries) if delay is None else delay
        bound.warning("retrying later", reason=reason, delay=delay)
        await message.nak(delay=delay)
        return metrics.RETRIED

    async def _reject(self, message: Msg, delivery: Delivery, reason: str, bound: Any) -> None:
        if self.on_invalid is not None:
            try:
                await self.on_invalid(delivery, reason, message.data)
            except Exception:
                bound.exception("could not publish the rejection")
        await self._dead_letter(message, delivery, reason, bound)

    async def _give_up(self, message: Msg, delivery: Delivery, reason: str, bound: Any) -> None:
        """A message that decoded but will not be handled: rejected to its publisher (a command's ``--wait`` would
        otherwise wait for an answer that never comes), with the reason cut and stripped of URL credentials (an
        error's text), then dead-lettered. What its handler changed before failing, if anything, stays."""
        await self._reject(message, delivery, cut_error(strip_userinfo(reason)), bound)

    async def _dead_letter(self, message: Msg, delivery: Delivery, reason: str, bound: Any) -> None:
        reason = strip_userinfo(reason)
        record = DeadLetter(
            stream=self.stream,
            consumer=self.durable,
            subject=delivery.subject,
            stream_sequence=delivery.stream_sequence,
            deliveries=delivery.deliveries,
            reason=reason,
            # Kept 30 days: secret-looking fields and URL credentials are masked (libs.redact); nothing else changes.
            payload=redact_payload(bytes(message.data)),
            headers={k: v for k, v in delivery.headers.items() if k != "Nats-Msg-Id"},
        )
        # Derived id: a redelivered poison message yields one dead letter, not one per attempt.
        record = msgspec.structs.replace(record, id=f"dlq-{self.stream}-{self.durable}-{delivery.stream_sequence}")
        await self.bus.publish(subjects.dead_letter(self.stream, self.durable), record)
        bound.warning("dead-lettered", reason=reason)
        await message.term()


@dataclass
class Follower(Generic[E]):
    """Every message of a stream's subject from ``start`` on, to this process alone: an ordered (ephemeral, push)
    consumer that decodes at the edge and hands each event to ``handler`` in stream order.

    For state that every replica of a service holds whole (the scheduler's fold of the inventory): replicas sharing
    one durable would each get part of the messages. The server names the consumer, keeps it in memory and removes
    it once this process is gone; nats-py starts it again after the last message delivered when it misses two
    heartbeats or a message (a restarted server, a slow handler). Nothing is acked, retried or dead-lettered (the
    consumer has no acks): a message too large, one that does not decode and one whose handler fails are logged,
    counted (``libs.metrics.COMMANDS`` under ``name``) and passed over, so the follower never stalls on one.
    ``start``: the stream sequence to begin at (e.g. the stream's end at the process's start: ``stream_end``)."""

    bus: Bus
    stream: str
    filter_subject: str
    decoder: msgspec.json.Decoder[E]
    handler: Handler[E]
    max_event_bytes: int
    start: int
    # The label of its metrics (``shoal_messages_handled{consumer=}``), as a durable's name is for a ``Consumer``.
    name: str
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._outcomes = {outcome: metrics.adder(metrics.COMMANDS.labels(self.name, outcome))
                          for outcome in (metrics.OK, metrics.REJECTED)}
        self._handler_seconds = metrics.observer(metrics.HANDLER_SECONDS.labels(self.name))

    async def run(self) -> None:
        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                                       opt_start_seq=max(1, self.start))
        subscription = await self.bus.js.subscribe(
            self.filter_subject, stream=self.stream, cb=self._on_message, ordered_consumer=True, config=config,
            idle_heartbeat=WATCH_HEARTBEAT_SECONDS)
        try:
            await self._stopping.wait()
        finally:
            with contextlib.suppress(Exception):  # its server may be the one that went away
                await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def _on_message(self, message: Msg) -> None:
        self._outcomes[await self._outcome(message)](1)

    async def _outcome(self, message: Msg) -> str:
        delivery = delivery_of(message)
        if len(message.data) > self.max_event_bytes:
            self._passed_over(delivery, oversize_reason(len(message.data), self.max_event_bytes))
            return metrics.REJECTED
        try:
            event = self.decoder.decode(message.data)
        except DECODE_ERRORS as err:
            self._passed_over(delivery, f"invalid event: {err}")
            return metrics.REJECTED
        started = time.perf_counter()
        try:
            await self.handler(event, delivery)
        except Exception:
            # Bound here, not per message: at inventory rates a bind per message costs a tenth of the fold.
            log.exception("handler failed, message passed over", subject=delivery.subject,
                          seq=delivery.stream_sequence, consumer=self.name)
            return metrics.REJECTED
        finally:
            self._handler_seconds(time.perf_counter() - started)
        return metrics.OK

    def _passed_over(self, delivery: Delivery, reason: str) -> None:
        log.warning("message passed over", reason=reason, subject=delivery.subject, seq=delivery.stream_sequence,
                    consumer=self.name)


async def stream_end(bus: Bus, stream: str) -> int:
    """The sequence the next message of ``stream`` will get: where a ``Follower`` starts to see only what comes
    after this call."""
    info = await bus.js.stream_info(stream)
    return info.state.last_seq + 1


class WatchStart:
    """Tells when a watch has delivered what its keys held when it started (``ended``).

    nats-py signals that with one None, which comes early two ways. It puts it first when the consumer's info says
    nothing is pending and the subscription has counted no message yet, but under load the info's reply can be read
    before messages the server delivered ahead of it are counted (a marker sweep in CI found no markers that way,
    and a watched bucket looked empty). And it puts it after the first message whose pending count reads 0, but a
    message's count can read 0 and grow again while keys are written (nats-io/nats.py#995: ``keys()`` then listed
    part of a bucket). So at the None the consumer is asked how far the server has gone: every message it has
    delivered or still has pending then is read before the start ends, at an entry with nothing pending after it.
    That mark is fixed when the None comes, so keys written without pause afterwards do not hold the start open for
    ever. If the consumer cannot be asked (its server gone), nats-py's None is taken as it is."""

    def __init__(self, watcher: KeyValue.KeyWatcher) -> None:
        self.watcher = watcher
        self.read = 0
        # How many entries the start holds at least, once nats-py's None came (the consumer's delivered and
        # pending messages then); None before.
        self.mark: int | None = None
        self.caught_up = True  # the last entry read had nothing pending after it (or none was read)

    async def ended(self, item: KeyValue.Entry | None) -> bool:
        """Whether, with ``item`` (an entry, or nats-py's None), the initial entries are all read. Call it for each
        item until it says True."""
        if item is not None:
            self.read += 1
            self.caught_up = item.delta == 0
        elif self.mark is None:
            subscription = self.watcher._sub
            if subscription is None:
                return True
            try:
                info = await subscription.consumer_info()
            except nats.errors.Error:
                return True
            self.mark = (info.delivered.consumer_seq or 0) + (info.num_pending or 0)
        return self.mark is not None and self.read >= self.mark and self.caught_up

    async def idle(self) -> bool:
        """Whether, no entry having come for a while after nats-py's None, the initial entries are all read: the
        consumer has nothing pending and every message it delivered was read. A message counted in the mark can be
        removed before it is delivered (a key expired by the bucket's TTL, or replaced under its history limit),
        and the mark is then never reached."""
        subscription = self.watcher._sub
        if self.mark is None or subscription is None:
            return False
        try:
            info = await subscription.consumer_info()
        except nats.errors.Error:
            return False
        return not info.num_pending and self.read >= (info.delivered.consumer_seq or 0)


async def initial_entries(watcher: KeyValue.KeyWatcher, each_within: float) -> AsyncGenerator[KeyValue.Entry, None]:
    """The entries a watch delivers until it has delivered what its keys held when it started (``WatchStart``);
    nats-py's TimeoutError if the next one takes longer than ``each_within`` seconds."""
    start = WatchStart(watcher)
    while True:
        waited = 0.0
        while True:
            try:
                item = await watcher.updates(timeout=min(WATCH_TICK_SECONDS, each_within))
                break
            except TimeoutError:
                if await start.idle():
                    return
                waited += WATCH_TICK_SECONDS
                if waited >= each_within:
                    raise
        if item is not None:
            yield item
        if await start.ended(item):
            return


class Replay:
    """Yielded by ``kv_watch`` when it starts again after a reconnect: every entry follows again, then None."""


# How often a watch looks at ``stopping`` and at the connection's reconnect count.
WATCH_TICK_SECONDS = 1.0
# The idle heartbeat a watch's ordered consumer asks the server for. nats-py starts an ordered consumer again after
# two missed heartbeats: a watch lost with the server that led its stream (a watch has one replica) resumes within
# ~2-3 s rather than the ~10 s of nats-py's default 5 s heartbeat, for a heartbeat message a second while idle.
WATCH_HEARTBEAT_SECONDS = 1.0


async def kv_watch(kv: KeyValue, stopping: asyncio.Event, reconnects: Callable[[], int] | None = None,
                   keys: str = ">") -> AsyncGenerator[KeyValue.Entry | Replay | None, None]:
    """Every entry of a bucket (or of ``keys``, a key or a wildcard), then None once the initial values are in, then
    every change, until ``stopping``.

    With ``reconnects`` (``Bus.reconnects``), a reconnect starts the watch again (``Replay``, every entry, None):
    nats-py's ordered consumer notices a restarted server only after missed heartbeats (~20 s measured), and
    changes made meanwhile would wait that long. A watch lost with its server while the connection stayed up (the
    leader of its bucket's stream killed) is started again by nats-py after two missed heartbeats, which watches
    ask for every WATCH_HEARTBEAT_SECONDS.
    """
    seen = reconnects() if reconnects else 0
    watcher = await _start_watch(kv, keys, stopping)
    if watcher is None:
        return
    start: WatchStart | None = WatchStart(watcher)
    try:
        while not stopping.is_set():
            if reconnects is not None and reconnects() != seen:
                seen = reconnects()
                with contextlib.suppress(Exception):  # the old consumer may be gone with the old server
                    await watcher.stop()
                restarted = await _start_watch(kv, keys, stopping)
                if restarted is None:
                    return
                watcher, start = restarted, WatchStart(restarted)
                yield Replay()
            try:
                entry = await watcher.updates(timeout=WATCH_TICK_SECONDS)
            except TimeoutError:
                if start is not None and await start.idle():
                    start = None
                    yield None
                continue  # look at ``stopping`` and the reconnect count again
            if start is None:
                yield entry  # past the initial values, nats-py puts no None
                continue
            ended = await start.ended(entry)
            if entry is not None:
                yield entry
            if ended:
                start = None
                yield None
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


class _WatchContext(JetStreamContext):
    """The JetStream context of watches: API requests that give up after ATTACH_API_SECONDS (a watch started while
    its stream has no leader would wait out nats-py's default 5 s), and ordered consumers with an idle heartbeat of
    WATCH_HEARTBEAT_SECONDS. nats-py's ``KeyValue.watch`` takes neither a timeout nor a heartbeat."""

    async def subscribe(self, subject: str, *args: Any, **kwargs: Any) -> JetStreamContext.PushSubscription:
        kwargs.setdefault("idle_heartbeat", WATCH_HEARTBEAT_SECONDS)
        return await super().subscribe(subject, *args, **kwargs)


def _for_watching(kv: KeyValue) -> KeyValue:
    """``kv``'s bucket through a ``_WatchContext`` (nats-py keeps a bucket's stream and prefix private)."""
    js = _WatchContext(kv._js._nc, timeout=ATTACH_API_SECONDS)
    return KeyValue(name=kv._name, stream=kv._stream, pre=kv._pre, js=js, direct=kv._direct)


async def _start_watch(kv: KeyValue, keys: str, stopping: asyncio.Event) -> KeyValue.KeyWatcher | None:
    """A new watch, tried again (ATTACH's pace) while NATS cannot start one: right after a reconnect the server,
    or a cluster electing new leaders, may not answer yet. None once ``stopping``."""
    failures = 0
    watchable = _for_watching(kv)
    while not stopping.is_set():
        try:
            return await watchable.watch(keys)
        except nats.errors.Error as err:
            failures += 1
            delay = ATTACH.delay(failures)
            log.warning("watch not started, trying again", bucket=getattr(kv, "_name", ""), error=repr(err),
                        delay=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
    return None


class KvMirror(Generic[T]):
    """An in-memory copy of a KV bucket, kept current by a watch (no listing, which nats-py can miss).

    Keys leave the mirror on an explicit delete or purge, or when a replay after a reconnect no longer holds them;
    ``ready`` is set once the initial values are in. During a replay readers keep the previous view.

    A handler that has just written a key puts the value here at once (``saved``) so its next decisions see it; the
    watch may still bring an older entry of that key afterwards (written before, delivered late). So the mirror keeps
    the revision of what it holds for each key, a deleted key's included, and takes nothing older: no older value, no
    older delete. A replay starts the revisions afresh from what it shows (a bucket made again numbers from 1).

    A deleted key's revision is kept while its delete marker is in the bucket, then forgotten (``deletes_kept``),
    so a bucket whose names come and go (a CronJob's DataLoad a minute, for months) does not grow the mirror for
    ever. What that revision protects against is an older entry of the key arriving after the delete: from this
    watch, only until the watch delivers the marker itself (it delivers in stream order, and a revision is the
    stream's sequence), and a local ``deleted`` is not forgotten before its marker has come round; a replay after a
    reconnect builds its revisions afresh from the bucket, where the marker is. Past that, ``revision`` of a deleted
    key is read by the bridge (an operation removed by its TTL), which needs it as long as a fresh watch would show
    it: until the marker sweep purges the marker (``libs.markers``, a week). So the mirror keeps it exactly that
    long, by the marker's own time (the server's stamp), and what it keeps is what a mirror started now would
    build.
    """

    def __init__(self, kv: KeyValue, type_: type[T], reconnects: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time, deletes_kept: float = COMMANDS_MAX_AGE) -> None:
        self.kv = kv
        self.decoder = msgspec.json.Decoder(type_)
        self.reconnects = reconnects
        # The wall clock, read against the server's stamps on the markers.
        self.clock = clock
        self.deletes_kept = deletes_kept
        self.values: dict[str, T] = {}
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        # The revision behind each key of ``values``, and of each key deleted whose marker is younger than
        # ``deletes_kept`` (or whose marker the watch has not delivered yet).
        self._revisions: dict[str, int] = {}
        # The deleted keys whose marker the watch delivered, with the marker's time, oldest first.
        self._gone_at: OrderedDict[str, float] = OrderedDict()
        # While a replay runs: the view, revisions and markers' times it builds, put in place of the current ones
        # at its end.
        self._replay: _View[T] | None = None

    async def run(self) -> None:
        async with contextlib.aclosing(kv_watch(self.kv, self._stopping, self.reconnects)) as entries:
            async for entry in entries:
                self.watched(entry)

    def watched(self, entry: KeyValue.Entry | Replay | None) -> None:
        """Take one item of the watch (``kv_watch``'s: an entry, ``Replay``, or None once caught up)."""
        if isinstance(entry, Replay):
            self._replay = {}, {}, OrderedDict()
        elif entry is None:
            if self._replay is not None:
                self.values, self._revisions, self._gone_at = self._replay
                self._replay = None
            self.ready.set()
        else:
            view = self._replay if self._replay is not None else (self.values, self._revisions, self._gone_at)
            values, revisions, gone_at = view
            # nats-py types an entry's revision optional; a watched entry always carries its stream sequence.
            revision = entry.revision or 0
            if entry.operation in ("DEL", "PURGE"):
                if _take(values, revisions, entry.key, None, revision):
                    gone_at.pop(entry.key, None)
                    gone_at[entry.key] = _stamp(entry.created, self.clock)
            elif entry.value is not None:
                try:
                    value = self.decoder.decode(entry.value)
                except DECODE_ERRORS:
                    log.warning("undecodable KV entry ignored", key=entry.key)
                    return
                if _take(values, revisions, entry.key, value, revision):
                    gone_at.pop(entry.key, None)
            _expire(view, self.clock() - self.deletes_kept)

    def revision(self, key: str) -> int:
        """The revision of what the mirror shows for ``key``, a delete marker's for a key deleted (since the watch
        started, or before it: its marker is an entry like any other) while the marker is kept; 0 for a key it
        never saw, or whose marker is older than ``deletes_kept``."""
        return self._revisions.get(key, 0)

    def saved(self, key: str, value: T, revision: int) -> None:
        """``value`` was just written to ``key`` at ``revision`` (what ``kv_save`` or ``kv.put`` returned): readers
        see it now, and the watch's older entries of ``key`` no longer replace it. A replay under way takes it too,
        as its entries may predate the write."""
        self._record(key, value, revision)

    def deleted(self, key: str, revision: int) -> None:
        """``key`` was just deleted by a marker at ``revision`` (what ``kv_delete`` returned): readers no longer see
        it, and the watch's older entries of ``key`` (a put delivered late) do not bring it back; a newer put does."""
        self._record(key, None, revision)

    def forget(self, key: str) -> None:
        """Drop ``key`` from the view, its revision included: for a bucket with a TTL (the agents'), whose expired
        keys leave no delete marker a watch could see, the owner judges them expired itself and forgets them here.
        Only the revisions of keys still in the bucket are kept then; a later entry of ``key`` is newer anyway (a
        watch delivers in order)."""
        for values, revisions, gone_at in self._views():
            values.pop(key, None)
            revisions.pop(key, None)
            gone_at.pop(key, None)

    def _record(self, key: str, value: T | None, revision: int) -> None:
        for values, revisions, gone_at in self._views():
            if _take(values, revisions, key, value, revision):
                gone_at.pop(key, None)  # a local delete is kept until its marker comes round in the watch

    def _views(self) -> list[_View[T]]:
        views: list[_View[T]] = [(self.values, self._revisions, self._gone_at)]
        return views if self._replay is None else [*views, self._replay]

    def stop(self) -> None:
        self._stopping.set()


# A mirror's view: its values, the revision behind each key (deleted keys' too), and the deleted keys' markers'
# times, oldest first.
_View = tuple[dict[str, T], dict[str, int], OrderedDict[str, float]]


def _stamp(created: object, clock: Callable[[], float]) -> float:
    """A watched marker's time: the server's stamp (nats-py types it an int and sets a datetime), else now."""
    return created.timestamp() if isinstance(created, datetime.datetime) else clock()


def _expire(view: _View[T], cutoff: float) -> None:
    """Forget the revisions of deleted keys whose marker was written before ``cutoff``: the marker sweep purges
    them from the bucket then, and no entry older than a marker the watch has delivered can come after it."""
    values, revisions, gone_at = view
    while gone_at:
        key, at = next(iter(gone_at.items()))
        if at >= cutoff:
            return
        del gone_at[key]
        if key not in values:
            revisions.pop(key, None)


def _take(values: dict[str, T], revisions: dict[str, int], key: str, value: T | None, revision: int) -> bool:
    """Put ``value`` (None: the key deleted) at ``revision`` into a mirror's view, unless it holds a newer one; True
    when taken."""
    if revision < revisions.get(key, 0):
        return False
    revisions[key] = revision
    if value is None:
        values.pop(key, None)
    else:
        values[key] = value
    return True
