"""Dead-letter records: a message a consumer gave up on, with the reason and the exact original bytes."""

from __future__ import annotations

from libs.events.common import Event


class DeadLetter(Event, frozen=True, kw_only=True, tag="deadletter.v1", rename="camel"):
    stream: str
    consumer: str
    subject: str
    stream_sequence: int
    deliveries: int
    reason: str
    # The original payload, base64 in JSON, so nothing is lost even when it was not valid UTF-8.
    payload: bytes
    headers: dict[str, str] = {}
