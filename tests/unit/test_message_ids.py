"""The ``Nats-Msg-Id`` an event is published with (``libs.bus.message_id``): its id where a header line can carry
it, else a digest that is the same for the same id, so JetStream still deduplicates it (fuzzing found facts with a
command's 64 KiB id refused by the server: "header size exceeds maximum allowed of 64k")."""

from __future__ import annotations

from libs.bus import MESSAGE_ID_LIMIT, message_id


def test_a_usual_id_is_the_message_id() -> None:
    assert message_id("dataset.default.imagenet.status.12") == "dataset.default.imagenet.status.12"
    assert message_id("x" * MESSAGE_ID_LIMIT) == "x" * MESSAGE_ID_LIMIT


def test_a_long_id_or_one_with_a_line_break_becomes_the_same_digest_each_time() -> None:
    long = "a" * 70_000 + ".rejected"
    assert message_id(long) == message_id(long)
    assert message_id(long).startswith("sha256-") and len(message_id(long)) == 7 + 64
    assert message_id(long) != message_id(long + "x")
    assert message_id("ok\r\nNats-Expected-Stream: other").startswith("sha256-")
    assert message_id("tab\there").startswith("sha256-")
