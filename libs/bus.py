"""The NATS JetStream side of every process: connect, provision, publish, consume, and KV compare-and-set.

What it decides:
- the shape of Shoal's streams, KV buckets and the manifest Object Store (``provision`` is idempotent);
- how a handler's outcome becomes an acknowledgement: success → ack; ``RetryLater`` or an unexpected error →
  nak with a growing delay; ``Conflict`` → nak at once (another writer won, the handler re-reads);
  ``Permanent``, an undecodable or oversized payload, or a last failed delivery → a ``DeadLetter`` record on the
  dead-letter stream, then ``term`` so the message is never redelivered.
- that every published event carries ``Nats-Msg-Id`` (its id, for deduplication) and, inside a trace, a PRODUCER
  span whose ``traceparent`` the headers carry; every consumed message gets a CONSUMER span continuing it
  (``messaging.system=nats``, ``messaging.destination.name`` = the subject).
- what every service's bus metrics count (``libs.metrics``): each message a consumer handles once, by outcome
  (ok, rejected, retried, dead_lettered, conflict), its handler's time, the consumer's lag at each fetch, and
  each compare-and-set that loses (``kv_save``, ``kv_delete``).

``RetryLater``, ``Permanent`` and ``Conflict`` are the one retry vocabulary: handlers raise them, and both the
consumer loop here and ``libs.reconcile`` honour them. Core NATS (not stored) goes through ``publish_core`` and
``subscribe`` too, so services never touch the connection itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    BucketNotFoundError,
    InvalidKeyError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore as NatsObjectStore
from opentelemetry import trace

from libs import metrics, subjects
from libs.backoff import REDELIVERY
from libs.config import NatsSettings
from libs.events.deadletter import DeadLetter
from libs.redact import redact_payload, strip_userinfo
from libs.telemetry import extract_context, get_logger, inject_context, messaging_attributes, producer_span, tracer

log = get_logger(__name__)

DAY = 24 * 3600.0
MESSAGE_LIMIT = 1024 * 1024  # JetStream's default max_payload; larger publishes are refused by the server.
# What decoding a payload raises when it is not the event: msgspec's two errors, RecursionError for JSON nested past
# Python's recursion limit (``[[[[...``), and UnicodeDecodeError for a string that is not UTF-8 (both found by
# fuzzing: they escaped the consumer loop and ended it).
DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError)


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


# --- Connection and provisioning ---


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float
    storage: js_api.StorageType = js_api.StorageType.FILE
    max_msgs_per_subject: int = -1
    max_bytes: int = -1


STREAMS: tuple[StreamSpec, ...] = (
    # Commands are kept a week so a service that was down catches up, and for audit.
    StreamSpec(subjects.STREAM_COMMANDS, [subjects.ALL_COMMANDS], max_age=7 * DAY, max_bytes=1 << 30),
    StreamSpec(subjects.STREAM_FACTS, [subjects.ALL_FACTS], max_age=7 * DAY, max_bytes=1 << 30),
    # Heartbeats and inventory only matter while fresh: an hour, and bounded per node.
    StreamSpec(subjects.STREAM_AGENT, [subjects.ALL_AGENT], max_age=3600.0, max_msgs_per_subject=10_000),
    # Tasks wait for their mount process (which may be restarting) as long as a load may reasonably take. Parts are
    # at most ~256 KiB, so 256 MiB holds a thousand in flight; 1 GiB here took the reservations of the four bounded
    # streams past the embedded server's max_file_store (4 GB) and every provision failed.
    StreamSpec(subjects.STREAM_TASKS, [subjects.ALL_TASKS], max_age=DAY, max_bytes=256 << 20),
    StreamSpec(subjects.STREAM_DEAD_LETTERS, [subjects.ALL_DEAD_LETTERS], max_age=30 * DAY, max_bytes=1 << 30),
)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int = 1
    ttl: float | None = None


KV_BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(subjects.KV_DATASETS, history=5),
    BucketSpec(subjects.KV_RUNTIMES, history=5),
    BucketSpec(subjects.KV_BINDINGS),
    BucketSpec(subjects.KV_NODE_CACHE),
    # An agent that stops beating disappears after a minute even if nobody ticks.
    BucketSpec(subjects.KV_AGENTS, ttl=60.0),
    BucketSpec(subjects.KV_OPERATIONS, history=5),
    BucketSpec(subjects.KV_OPERATION_RUNS),
)


class Bus:
    """One NATS connection with its JetStream context, and the helpers every service uses."""

    def __init__(self, nc: NatsClient, replicas: int = 1) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.replicas = replicas
        self._kv: dict[str, KeyValue] = {}
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
        """Create or update every stream, KV bucket and the manifest store; safe to call from every process."""
        for spec in STREAMS:
            config = js_api.StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                retention=js_api.RetentionPolicy.LIMITS,
                max_age=spec.max_age,
                max_bytes=spec.max_bytes,
                max_msgs_per_subject=spec.max_msgs_per_subject,
                max_msg_size=MESSAGE_LIMIT,
                storage=spec.storage,
                num_replicas=self.replicas,
                duplicate_window=120.0,
            )
            try:
                await self.js.stream_info(spec.name)
            except NotFoundError:
                await self.js.add_stream(config)
            else:
                await self.js.update_stream(config)
        for bucket in KV_BUCKETS:
            try:
                await self.js.key_value(bucket.name)
            except BucketNotFoundError:
                await self.js.create_key_value(
                    js_api.KeyValueConfig(bucket=bucket.name, history=bucket.history, ttl=bucket.ttl,
                                          replicas=self.replicas)
                )
        try:
            await self.js.object_store(subjects.OBJ_MANIFESTS)
        except (BucketNotFoundError, NotFoundError):
            await self.js.create_object_store(
                subjects.OBJ_MANIFESTS, js_api.ObjectStoreConfig(replicas=self.replicas)
            )

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    async def manifests(self) -> NatsObjectStore:
        return await self.js.object_store(subjects.OBJ_MANIFESTS)

    async def publish(self, subject: str, event: msgspec.Struct, headers: dict[str, str] | None = None) -> int:
        """Publish an event to JetStream; returns its stream sequence. Deduplicated by the event's id."""
        with producer_span(self._tracer, subject):
            all_headers = inject_context(dict(headers or {}))
            all_headers["Nats-Msg-Id"] = str(getattr(event, "id", ""))
            all_headers["Content-Type"] = "application/json"
            ack = await self.js.publish(subject, msgspec.json.encode(event), headers=all_headers)
        return int(ack.seq)

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


async def connect(settings: NatsSettings, name: str) -> Bus:
    options: dict[str, Any] = {
        "servers": settings.urls,
        "name": name,
        # Reconnect forever: a service outlives a NATS restart or a cluster leader change.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password.reveal()
    if settings.token:
        options["token"] = settings.token.reveal()
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
        options["tls"] = context
    nc = await nats.connect(**options)
    return Bus(nc, replicas=settings.replicas)


# --- KV with compare-and-set ---

T = TypeVar("T")


def invalid_key(key: str) -> Permanent:
    """A key built from an event's fields (a name, a run id) that NATS cannot store: no retry can help, so the
    message is dead-lettered with this reason (found by fuzzing: it used to be retried as a handler failure)."""
    return Permanent(f"{key!r} is not a valid KV key: use letters, digits and -/_=. (not at either end)")


async def kv_load(kv: KeyValue, key: str, type_: type[T]) -> tuple[T | None, int | None]:
    """The decoded value and its revision; (None, None) when absent, (None, rev) when deleted; ``Permanent`` for a
    key NATS cannot hold."""
    try:
        entry = await kv.get(key)
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyDeletedError as err:
        return None, err.entry.revision if err.entry else None
    except KeyNotFoundError:
        return None, None
    if entry.value is None:
        return None, entry.revision
    return msgspec.json.decode(entry.value, type=type_), entry.revision


async def kv_save(kv: KeyValue, key: str, value: msgspec.Struct, revision: int | None) -> int:
    """Write only if the key is still at ``revision`` (None: only if it does not exist); else ``Conflict``."""
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


async def kv_delete(kv: KeyValue, key: str, revision: int | None) -> None:
    try:
        await kv.delete(key, last=revision)
    except InvalidKeyError as err:
        raise invalid_key(key) from err
    except KeyWrongLastSequenceError as err:
        _lost(kv)
        raise Conflict(f"{key} changed concurrently") from err
    except nats.js.errors.BadRequestError as err:
        # nats-py reports a stale revision on delete as a bad request ("wrong last sequence"), not as the error above.
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


# nats-py's keys() can answer "no keys" before the server's reply arrives; a bucket that holds messages is asked
# again a few times before its emptiness is believed.
KEYS_ATTEMPTS = 5


async def kv_keys(kv: KeyValue) -> list[str]:
    for _ in range(KEYS_ATTEMPTS):
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        if keys or (await kv.status()).values == 0:
            return list(keys)
    return []


# --- The consumer loop ---


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


E = TypeVar("E")
Handler = Callable[[E, Delivery], Awaitable[None]]
InvalidHandler = Callable[[Delivery, str, bytes], Awaitable[None]]


def retry_delay(deliveries: int) -> float:
    """0.5 s doubling per delivery, capped at 30 s (``libs.backoff.REDELIVERY``)."""
    return REDELIVERY.delay(deliveries)


@dataclass
class Consumer(Generic[E]):
    """A durable pull consumer that decodes at the edge and maps handler outcomes to acks.

    ``on_invalid`` is told about payloads that cannot be decoded (so a command publisher gets a rejection
    event); they are dead-lettered either way.
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
    # Handlers here only touch KV and publish; 30 s covers a slow NATS cluster failover.
    ack_wait: float = 30.0
    batch: int = 16
    # A span per message (trace context from the headers). Off for high-volume internal traffic (inventory), where
    # the span would cost more than the handler: ~30 us without an SDK, ~100 us with one, per message.
    traced: bool = True
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    # One tracer per consumer: looking it up per message costs as much as the span (it delegates to whatever
    # provider is installed, also one installed later).
    _tracer: trace.Tracer = field(default_factory=lambda: tracer(__name__), init=False)

    def __post_init__(self) -> None:
        # The label sets are bound once (a lookup per message would cost as much as the increment) and every
        # outcome is there from the start, at 0, so a rate over it is 0 rather than absent.
        self._outcomes = {outcome: metrics.COMMANDS.labels(self.durable, outcome)
                          for outcome in (metrics.OK, metrics.REJECTED, metrics.RETRIED, metrics.DEAD_LETTERED,
                                          metrics.CONFLICT)}
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(self.durable)
        self._lag = metrics.CONSUMER_LAG.labels(self.durable)

    async def run(self) -> None:
        filters = [self.filter_subject] if isinstance(self.filter_subject, str) else list(self.filter_subject)
        config = js_api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=1000,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        subscription = await self.bus.js.pull_subscribe(
            filters[0], durable=self.durable, stream=self.stream, config=config
        )
        try:
            while not self._stopping.is_set():
                try:
                    messages = await subscription.fetch(self.batch, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    # Nothing arrived within the wait: no message of the stream is waiting for this consumer.
                    self._lag.set(0)
                    continue
                # Messages still in the stream behind the last one fetched (JetStream's count for this consumer).
                if messages:
                    self._lag.set(messages[-1].metadata.num_pending or 0)
                for message in messages:
                    await self.process(message)
        finally:
            await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def process(self, message: Msg) -> None:
        metadata = message.metadata
        delivery = Delivery(
            subject=message.subject,
            headers=dict(message.headers or {}),
            deliveries=metadata.num_delivered or 1,
            stream_sequence=metadata.sequence.stream if metadata.sequence else 0,
            published_at=metadata.timestamp.timestamp() if metadata.timestamp else 0.0,
        )
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
        self._outcomes[await self._outcome(message, delivery)].inc()

    async def _outcome(self, message: Msg, delivery: Delivery) -> str:
        if len(message.data) > self.max_event_bytes:
            reason = f"payload of {len(message.data)} bytes exceeds the limit of {self.max_event_bytes} bytes"
            await self._reject(message, delivery, reason, self._bound(delivery))
            return metrics.REJECTED
        try:
            event = self.decoder.decode(message.data)
        except DECODE_ERRORS as err:
            await self._reject(message, delivery, f"invalid event: {err}", self._bound(delivery))
            return metrics.REJECTED
        try:
            await self._call(event, delivery)
        except Conflict as err:
            self._bound(delivery).info("conflict, retrying", reason=str(err))
            await message.nak(delay=0)
            return metrics.CONFLICT
        except Permanent as err:
            await self._dead_letter(message, delivery, err.reason, self._bound(delivery))
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
            self._handler_seconds.observe(time.perf_counter() - started)

    async def _retry(self, message: Msg, delivery: Delivery, reason: str, delay: float | None, bound: Any) -> str:
        if delivery.deliveries >= self.max_deliver:
            await self._dead_letter(message, delivery, f"gave up after {delivery.deliveries} deliveries: {reason}",
                                    bound)
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


class Replay:
    """Yielded by ``kv_watch`` when it starts again after a reconnect: every entry follows again, then None."""


# How often a watch looks at ``stopping`` and at the connection's reconnect count.
WATCH_TICK_SECONDS = 1.0


async def kv_watch(kv: KeyValue, stopping: asyncio.Event, reconnects: Callable[[], int] | None = None,
                   keys: str = ">") -> AsyncGenerator[KeyValue.Entry | Replay | None, None]:
    """Every entry of a bucket (or of ``keys``, a key or a wildcard), then None once the initial values are in, then
    every change, until ``stopping``.

    With ``reconnects`` (``Bus.reconnects``), a reconnect starts the watch again (``Replay``, every entry, None):
    nats-py's ordered consumer notices a restarted server only after missed heartbeats (~20 s measured), and
    changes made meanwhile would wait that long.
    """
    seen = reconnects() if reconnects else 0
    watcher = await kv.watch(keys)
    try:
        while not stopping.is_set():
            if reconnects is not None and reconnects() != seen:
                seen = reconnects()
                with contextlib.suppress(Exception):  # the old consumer may be gone with the old server
                    await watcher.stop()
                watcher = await kv.watch(keys)
                yield Replay()
            try:
                entry = await watcher.updates(timeout=WATCH_TICK_SECONDS)
            except TimeoutError:
                continue  # look at ``stopping`` and the reconnect count again
            yield entry
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


class KvMirror(Generic[T]):
    """An in-memory copy of a KV bucket, kept current by a watch (no listing, which nats-py can miss).

    Keys leave the mirror on an explicit delete or purge, or when a replay after a reconnect no longer holds them;
    ``ready`` is set once the initial values are in. During a replay readers keep the previous view.
    """

    def __init__(self, kv: KeyValue, type_: type[T], reconnects: Callable[[], int] | None = None) -> None:
        self.kv = kv
        self.decoder = msgspec.json.Decoder(type_)
        self.reconnects = reconnects
        self.values: dict[str, T] = {}
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        target = self.values
        async with contextlib.aclosing(kv_watch(self.kv, self._stopping, self.reconnects)) as entries:
            async for entry in entries:
                if isinstance(entry, Replay):
                    target = {}
                elif entry is None:
                    if target is not self.values:
                        self.values = target
                    self.ready.set()
                elif entry.operation in ("DEL", "PURGE"):
                    target.pop(entry.key, None)
                elif entry.value is not None:
                    try:
                        target[entry.key] = self.decoder.decode(entry.value)
                    except DECODE_ERRORS:
                        log.warning("undecodable KV entry ignored", key=entry.key)

    def stop(self) -> None:
        self._stopping.set()
