"""Driving a consumer's real decode and handler path with generated payloads, and judging what became of each.

``Drive`` wraps one ``libs.bus.Consumer`` (the service's own decoder, handler and ``on_invalid``) and hands it
messages through ``Consumer.process``, the same call its pull loop makes, on a real ``Bus`` to a real nats-server:
the handler reads and writes KV and publishes facts and dead letters for real. Only the JetStream message object
is a stand-in (``FakeMessage``), so that thousands of examples need no stream round trip each; a subset goes
through JetStream for real (test_consumers' ``test_a_service_keeps_consuming_after_fuzz``).

What counts as a crash: the handler raising anything but the retry vocabulary (``RetryLater``, ``Permanent``,
``Conflict``). The consumer loop would survive it (retry, then dead-letter), but it is a bug: bad input must get a
reason, not a traceback. ``Drive.send`` re-raises it so Hypothesis shows and shrinks the payload.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec

from libs.bus import Bus, Conflict, Consumer, Permanent, RetryLater
from libs.events.deadletter import DeadLetter

_SEQUENCE = itertools.count(1)


class FakeMessage:
    """What ``Consumer.process`` reads of a JetStream message, and the acknowledgement it chose."""

    def __init__(self, subject: str, data: bytes, message_id: str) -> None:
        self.subject = subject
        self.data = data
        self.reply = ""
        self.headers = {"Nats-Msg-Id": message_id} if message_id else {}
        self.metadata = SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=next(_SEQUENCE)),
                                        timestamp=None, num_pending=0)
        self.acks: list[str] = []

    async def ack(self) -> None:
        self.acks.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.acks.append("nak")

    async def term(self) -> None:
        self.acks.append("term")

    async def in_progress(self) -> None:
        pass


@dataclass
class Published:
    """Everything the bus published while one message was handled (the real publish still happens)."""

    events: list[tuple[str, msgspec.Struct]] = field(default_factory=list)

    def of(self, type_: type) -> list[Any]:
        return [event for _, event in self.events if isinstance(event, type_)]


def spy(bus: Bus) -> Published:
    """Record every event ``bus`` publishes from now on (the instance's ``publish``, wrapped)."""
    published = Published()
    original = bus.publish

    async def publish(subject: str, event: msgspec.Struct, headers: dict[str, str] | None = None) -> int:
        published.events.append((subject, event))
        return await original(subject, event, headers)

    bus.publish = publish  # type: ignore[method-assign]
    return published


@dataclass
class Outcome:
    message: FakeMessage
    published: list[tuple[str, msgspec.Struct]]

    @property
    def ack(self) -> str:
        assert len(self.message.acks) == 1, f"acknowledged {self.message.acks}, not exactly once"
        return self.message.acks[0]

    def of(self, type_: type) -> list[Any]:
        return [event for _, event in self.published if isinstance(event, type_)]


class Drive:
    """One consumer of a service, its handler guarded, fed one payload at a time."""

    def __init__(self, bus: Bus, published: Published, consumer: Consumer[Any]) -> None:
        self.bus = bus
        self.published = published
        self.crashes: list[BaseException] = []
        handler = consumer.handler

        async def guarded(event: Any, delivery: Any) -> None:
            try:
                await handler(event, delivery)
            except (RetryLater, Permanent, Conflict):
                raise
            except Exception as err:
                self.crashes.append(err)
                raise

        consumer.handler = guarded
        self.consumer = consumer

    async def send(self, subject: str, data: bytes, message_id: str = "") -> Outcome:
        mark = len(self.published.events)
        message = FakeMessage(subject, data, message_id)
        await self.consumer.process(message)  # type: ignore[arg-type]
        if self.crashes:
            raise self.crashes.pop()
        outcome = Outcome(message, self.published.events[mark:])
        if outcome.ack == "term":
            letters = outcome.of(DeadLetter)
            assert letters and letters[-1].reason, "a terminated message must leave a dead letter with a reason"
        return outcome


def consumer(bus: Bus, stream: str, durable: str, subject: str | list[str], decoder: msgspec.json.Decoder[Any],
             handler: Callable[[Any, Any], Awaitable[None]],
             on_invalid: Callable[[Any, str, bytes], Awaitable[None]] | None = None,
             max_event_bytes: int = 256 * 1024) -> Consumer[Any]:
    """A Consumer wired as the service's app wires it (never ``run``: the test calls ``process``)."""
    return Consumer(bus, stream, durable, subject, decoder, handler, on_invalid=on_invalid,
                    max_event_bytes=max_event_bytes)
