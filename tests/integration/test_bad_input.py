"""Bad input on the bus: malformed JSON, unknown type tags, schema violations, oversized payloads, and a
handler that keeps failing. Each must give a rejection and/or a dead-letter record with the reason, and never
crash a service or redeliver forever. Real nats-server (JetStream); services in-process.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
import structlog
from nats.js import api as js_api

from libs import subjects
from libs.bus import ACK_WAIT_SECONDS, Bus, Conflict, Consumer, Delivery, Permanent, RetryLater
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from services.dataset import app as dataset_app
from services.loader import app as loader_app
from services.runtime import app as runtime_app
from services.scheduler import app as scheduler_app
from tests.helpers import FactCollector, dataset_record, eventually, make_settings, running
from tests.integration.test_scheduler_api import scheduler
from tests.metric_values import Snapshot, value

HANDLED = "shoal_messages_handled_total"


async def dead_letters(bus: Bus) -> list[dict]:
    """Every dead-letter record so far, read with an ephemeral ordered consumer."""
    info = await bus.js.stream_info(subjects.STREAM_DEAD_LETTERS)
    records = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        message = await bus.js.get_msg(subjects.STREAM_DEAD_LETTERS, seq)
        records.append(msgspec.json.decode(message.data or b"null"))
    return records


async def dead_letter_for(bus: Bus, subject: str) -> dict:
    async def probe():
        found = [r for r in await dead_letters(bus) if r["subject"] == subject]
        return found[-1] if found else None

    return await eventually(probe, what=f"a dead letter for {subject}")


@pytest.fixture
def bus_settings(nats_server) -> Settings:
    return make_settings(nats_server.url, max_event_bytes=4096)


@pytest.mark.parametrize(
    ("payload", "reason_part"),
    [
        (b"{not json", "invalid event"),
        (b'{"type": "dataset.explode.v1", "id": "x1"}', "dataset.explode.v1"),
        (b'{"type": "dataset.apply.v1", "id": "x2", "dataset": {"metadata": {"name": 7}}}', "$.dataset.metadata.name"),
        (b'{"type": "dataset.apply.v1", "id": "x3"}', "dataset"),
        (b"\xff\xfe binary", "invalid event"),
    ],
    ids=["malformed-json", "unknown-type", "schema-violation", "missing-field", "not-utf8"],
)
async def test_undecodable_command_is_rejected_and_dead_lettered(bus: Bus, bus_settings: Settings, payload: bytes,
                                                                 reason_part: str) -> None:
    facts = FactCollector()
    await facts.start(bus)
    metrics = Snapshot()
    async with running(lambda stop: dataset_app.run(bus_settings, stop)):
        ack = await bus.js.publish(subjects.DATASET_APPLY, payload, headers={"Nats-Msg-Id": "bad-1"})
        rejected = await facts.wait_for("dataset.rejected.v1", causationId="bad-1")
        assert reason_part in rejected["reason"]
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
        assert letter["streamSequence"] == ack.seq
        assert base64.b64decode(letter["payload"]) == payload  # nothing lost, byte for byte
        assert reason_part in letter["reason"]
        # The service is still alive and serves the next, valid command.
        good = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="after"),
                                            spec=DatasetSpec(mounts=[Mount(mount_point="local:///nonexistent")])))
        await bus.publish(subjects.DATASET_APPLY, good)
        await facts.wait_for("dataset.accepted.v1", causationId=good.id)
    # Terminated, not pending: the poison message is never redelivered.
    consumer = await bus.js.consumer_info(subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS)
    assert consumer.num_ack_pending == 0 and consumer.num_pending == 0
    # Counted once each, by outcome: the poison message rejected (not also dead-lettered), the valid one ok.
    durable = subjects.DURABLE_DATASET_COMMANDS
    assert metrics.moved(HANDLED, consumer=durable, outcome="rejected") == 1
    assert metrics.moved(HANDLED, consumer=durable, outcome="dead_lettered") == 0
    assert metrics.moved(HANDLED, consumer=durable, outcome="ok") == 1
    assert metrics.moved("shoal_handler_duration_seconds_count", consumer=durable) == 1  # only the decoded one


@pytest.mark.parametrize(("service", "subject", "payload", "rejected_type"), [
    (dataset_app, subjects.DATASET_APPLY,
     b'{"type": "dataset.apply.v1", "id": "mine-1", "dataset": {"metadata": {"name": 7}}}', "dataset.rejected.v1"),
    (runtime_app, subjects.RUNTIME_SCALE,
     b'{"type": "runtime.scale.v1", "id": "mine-1", "name": "demo", "replicas": "lots"}', "runtime.rejected.v1"),
    (loader_app, subjects.DATALOAD_APPLY, b'{"type": "dataload.apply.v1", "id": "mine-1"}', "operation.rejected.v1"),
], ids=["dataset", "runtime", "loader"])
async def test_a_command_without_a_message_id_is_rejected_under_its_own_id(
        bus: Bus, bus_settings: Settings, service: Any, subject: str, payload: bytes, rejected_type: str) -> None:
    # As README's and `shoal up`'s examples publish: no Nats-Msg-Id header. Its rejection said seq-<n>, which the
    # publisher, waiting for "mine-1", never matched.
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: service.run(bus_settings, stop)):
        await bus.js.publish(subject, payload)
        rejected = await facts.wait_for(rejected_type, causationId="mine-1")
        assert rejected["id"] == "mine-1.rejected" and rejected["reason"].startswith("invalid event")
        # Where no id can be read (not JSON, or one that could not be a header value), the stream sequence.
        for unread in (b"{not json", b'{"type": "x", "id": "a\\nb"}', b'{"id": 5}'):
            ack = await bus.js.publish(subject, unread)
            await facts.wait_for(rejected_type, causationId=f"seq-{ack.seq}")


async def test_oversized_payload_is_rejected(bus: Bus, bus_settings: Settings) -> None:
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: runtime_app.run(bus_settings, stop)):
        payload = b'{"type": "runtime.apply.v1", "id": "big", "pad": "' + b"x" * 10_000 + b'"}'
        await bus.js.publish(subjects.RUNTIME_APPLY, payload, headers={"Nats-Msg-Id": "big-1"})
        rejected = await facts.wait_for("runtime.rejected.v1", causationId="big-1")
        # What to change is said, not only the sizes: the publisher (``shoal apply``) prints this reason.
        assert rejected["reason"] == (
            f"payload of {len(payload)} bytes exceeds the limit of 4096 bytes (SHOAL_MAX_EVENT_BYTES of the service "
            "that handles it): make it smaller (for an object: fewer mounts, mount options, labels or targets, or "
            "several objects instead of one), or raise SHOAL_MAX_EVENT_BYTES for that service")
        letter = await dead_letter_for(bus, subjects.RUNTIME_APPLY)
        assert len(base64.b64decode(letter["payload"])) == len(payload)


async def test_payload_beyond_jetstream_limit_is_refused_to_the_publisher(bus: Bus) -> None:
    with pytest.raises(Exception, match=r"(?i)maximum|payload"):
        await bus.js.publish(subjects.DATASET_APPLY, b"x" * (2 * 1024 * 1024))


async def test_garbage_on_a_fact_subject_is_dead_lettered_without_crashing(bus: Bus, bus_settings: Settings) -> None:
    async with running(lambda stop: dataset_app.run(bus_settings, stop)):
        await bus.js.publish(subjects.RUNTIME_STATUS, b"[1, 2, 3]")
        letter = await dead_letter_for(bus, subjects.RUNTIME_STATUS)
        assert letter["consumer"] == subjects.DURABLE_DATASET_RUNTIME_STATUS
        assert "invalid event" in letter["reason"]


async def test_failing_handler_is_retried_then_dead_lettered(bus: Bus) -> None:
    """The consumer loop itself: retries with delay, then gives up after max_deliver with the reason."""
    attempts: list[int] = []

    async def flaky(event: DatasetApply, delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise ValueError("store exploded")

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "flaky", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), flaky, max_event_bytes=4096, max_deliver=3)
    metrics = Snapshot()
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    assert attempts == [1, 2, 3]
    assert "gave up after 3 deliveries" in letter["reason"] and "store exploded" in letter["reason"]
    info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "flaky")
    assert info.num_ack_pending == 0
    assert metrics.moved(HANDLED, consumer="flaky", outcome="retried") == 2
    assert metrics.moved(HANDLED, consumer="flaky", outcome="dead_lettered") == 1
    assert metrics.moved("shoal_handler_duration_seconds_count", consumer="flaky") == 3


async def test_outcomes_handler_time_and_lag_are_counted_per_consumer(bus: Bus) -> None:
    """RetryLater → retried, Conflict → conflict, success → ok, each handler call timed, and the consumer's lag
    at a fetch is what the stream still holds for it."""
    seen: list[tuple[str, int, float]] = []

    async def moody(event: DatasetApply, delivery: Delivery) -> None:
        lag = value("shoal_consumer_lag_messages", consumer="moody")
        seen.append((event.dataset.metadata.name, delivery.deliveries, lag))
        if event.dataset.metadata.name == "first" and delivery.deliveries == 1:
            raise RetryLater("not yet", delay=0.0)
        if event.dataset.metadata.name == "first" and delivery.deliveries == 2:
            raise Conflict("another writer won")

    for name in ("first", "second", "third"):  # in the stream before the consumer's first fetch
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name))))
    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "moody", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), moody, max_event_bytes=4096, batch=1)
    metrics = Snapshot()
    async with running(lambda stop: _run_until(consumer, stop)):
        await eventually(lambda: _async(len({name for name, _, _ in seen}) == 3 and ("first", 3) in
                                        {(name, n) for name, n, _ in seen}), what="every message handled")
        await eventually(lambda: _async(value("shoal_consumer_lag_messages", consumer="moody") == 0),
                         what="no lag once everything is handled")
    assert seen[0] == ("first", 1, 2.0)  # fetched one of three: two behind it
    assert metrics.moved(HANDLED, consumer="moody", outcome="retried") == 1
    assert metrics.moved(HANDLED, consumer="moody", outcome="conflict") == 1
    assert metrics.moved(HANDLED, consumer="moody", outcome="ok") == 3
    assert metrics.moved(HANDLED, consumer="moody", outcome="rejected") == 0
    assert metrics.moved("shoal_handler_duration_seconds_count", consumer="moody") == 5


async def _async(result: bool) -> bool:
    return result


async def test_a_conflict_on_the_last_delivery_is_dead_lettered(bus: Bus) -> None:
    """A handler that always loses its compare-and-set: retried at once, and its last delivery dead-lettered with
    the reason (naked, the server would deliver it no more and it would vanish unhandled)."""
    attempts: list[int] = []

    async def contended(event: DatasetApply, delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise Conflict("tests.hot changed concurrently")

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "contended", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), contended, max_event_bytes=4096, max_deliver=3)
    metrics = Snapshot()
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    assert attempts == [1, 2, 3]
    assert [r["consumer"] for r in await dead_letters(bus)] == ["contended"]  # exactly one
    assert letter["deliveries"] == 3
    assert "gave up after 3 deliveries" in letter["reason"] and "tests.hot changed concurrently" in letter["reason"]
    info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "contended")
    assert info.num_ack_pending == 0
    assert metrics.moved(HANDLED, consumer="contended", outcome="conflict") == 2
    assert metrics.moved(HANDLED, consumer="contended", outcome="dead_lettered") == 1


async def test_an_existing_durable_takes_the_consumers_settings(bus: Bus) -> None:
    """SHOAL_MAX_DELIVER raised from 2 to 4 (and ack_wait changed) across a restart: the durable kept by the server
    is updated, so the message is delivered 4 times and then dead-lettered. Kept at 2, the server would stop after
    the second delivery while the consumer still retried: no dead letter, the message silently gone."""
    await bus.js.add_consumer(subjects.STREAM_COMMANDS, js_api.ConsumerConfig(
        name="raised", durable_name="raised", ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=30.0, max_deliver=2,
        filter_subject=subjects.DATASET_APPLY, deliver_policy=js_api.DeliverPolicy.ALL))
    attempts: list[int] = []

    async def not_yet(event: DatasetApply, delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise RetryLater("not yet", delay=0.0)

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "raised", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), not_yet, max_event_bytes=4096, max_deliver=4,
                        ack_wait=20.0)
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    assert attempts == [1, 2, 3, 4]
    assert letter["deliveries"] == 4 and "gave up after 4 deliveries" in letter["reason"]
    info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "raised")
    assert (info.config.max_deliver, info.config.ack_wait) == (4, 20.0)
    assert info.num_ack_pending == 0


async def test_an_existing_durable_takes_the_consumers_filter(bus: Bus) -> None:
    """A durable kept from when the consumer read another subject: its filter follows the consumer's."""
    await bus.js.add_consumer(subjects.STREAM_COMMANDS, js_api.ConsumerConfig(
        name="refiltered", durable_name="refiltered", ack_policy=js_api.AckPolicy.EXPLICIT,
        filter_subject=subjects.DATASET_RESYNC, deliver_policy=js_api.DeliverPolicy.ALL))
    handled: list[str] = []

    async def handle(event: DatasetApply, delivery: Delivery) -> None:
        handled.append(event.dataset.metadata.name)

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "refiltered", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), handle, max_event_bytes=4096)
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        await eventually(lambda: _async(handled == ["x"]), what="the command on the new filter handled")
    info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, "refiltered")
    assert info.config.filter_subject == subjects.DATASET_APPLY


async def test_a_durable_the_server_will_not_update_is_used_as_it_is(bus: Bus) -> None:
    """A kept durable whose deliver policy differs (not editable): the update is refused and logged, the durable
    runs as it is, and its own max_deliver (2, not the consumer's 4) decides which delivery is the last."""
    await bus.js.add_consumer(subjects.STREAM_COMMANDS, js_api.ConsumerConfig(
        name="kept", durable_name="kept", ack_policy=js_api.AckPolicy.EXPLICIT, max_deliver=2,
        ack_wait=ACK_WAIT_SECONDS, filter_subject=subjects.DATASET_APPLY, deliver_policy=js_api.DeliverPolicy.NEW))
    attempts: list[int] = []

    async def not_yet(event: DatasetApply, delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise RetryLater("not yet", delay=0.0)

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "kept", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), not_yet, max_event_bytes=4096, max_deliver=4)

    async def refusal() -> Any:
        return next((line for line in logs if line["event"].startswith("consumer settings not updated")), None)

    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: _run_until(consumer, stop)):
            refused = await eventually(refusal, what="the refused update logged")
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
            letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    assert refused["consumer"] == "kept" and refused["log_level"] == "error"
    assert set(refused["changes"]) == {"deliver_policy", "max_deliver"}
    assert "deliver policy" in refused["error"]
    assert attempts == [1, 2]
    assert "gave up after 2 deliveries" in letter["reason"]


async def test_permanent_error_goes_straight_to_dead_letters(bus: Bus) -> None:
    attempts: list[int] = []

    async def refuse(event: DatasetApply, delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise Permanent("cannot ever work")

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "refuse", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), refuse, max_event_bytes=4096)
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    assert attempts == [1]
    assert letter["reason"] == "cannot ever work"


@pytest.mark.parametrize(("failure", "max_deliver", "expected"), [
    (ValueError("store exploded"), 2, "gave up after 2 deliveries: ValueError: store exploded"),
    (Conflict("tests.hot changed concurrently"), 2, "gave up after 2 deliveries: conflict: tests.hot changed"),
    (Permanent("cannot ever work"), 5, "cannot ever work"),
], ids=["exception", "conflict", "permanent"])
async def test_a_command_given_up_on_is_rejected_to_its_publisher_with_the_reason(
        bus: Bus, failure: Exception, max_deliver: int, expected: str) -> None:
    """A command that decoded but is given up on (its last delivery failed, or a Permanent error) was dead-lettered
    with no word to its publisher: ``shoal apply --wait`` waited for an accepted or rejected fact until its
    deadline. Now ``on_invalid`` (the services publish the rejection there) hears of it, with the reason."""
    told: list[tuple[int, str]] = []

    async def failing(event: DatasetApply, delivery: Delivery) -> None:
        raise failure

    async def on_invalid(delivery: Delivery, reason: str, payload: bytes) -> None:
        told.append((delivery.deliveries, reason))

    consumer = Consumer(bus, subjects.STREAM_COMMANDS, "given-up", subjects.DATASET_APPLY,
                        msgspec.json.Decoder(DatasetApply), failing, max_event_bytes=4096, max_deliver=max_deliver,
                        on_invalid=on_invalid)
    async with running(lambda stop: _run_until(consumer, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="x"))))
        letter = await dead_letter_for(bus, subjects.DATASET_APPLY)
    deliveries = 1 if isinstance(failure, Permanent) else max_deliver
    assert len(told) == 1 and told[0][0] == deliveries and told[0][1].startswith(expected), told
    assert letter["reason"] == told[0][1]


async def test_an_apply_the_dataset_service_gives_up_on_is_rejected_to_the_cli(
        bus: Bus, bus_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the real dataset service whose handling of one apply keeps failing publishes a rejection of that
    command naming why, so its publisher hears of it."""
    from services.dataset import handlers as dataset_handlers

    async def broken(self: Any, command: Any, delivery: Delivery) -> None:
        raise RuntimeError("the record cannot be written")

    monkeypatch.setattr(dataset_handlers.DatasetHandlers, "apply", broken)
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_FACTS)
    command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="stuck"),
                                           spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])))
    async with running(lambda stop: dataset_app.run(bus_settings, stop)):
        await bus.publish(subjects.DATASET_APPLY, command)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=command.id, timeout=60)
    assert "gave up after" in rejected["reason"] and "the record cannot be written" in rejected["reason"]


async def _run_until(consumer: Consumer, stop) -> None:
    import asyncio

    task = asyncio.create_task(consumer.run())
    await stop.wait()
    consumer.stop()
    await task


async def test_hand_written_json_from_another_system(nats_server, settings: Settings, seaweedfs, bucket: str) -> None:
    """Another system publishes plain JSON text with nats-py alone (no Shoal code) and reads the status event."""
    import nats

    from tests.conftest import put_objects

    await put_objects(seaweedfs, bucket, {"a.txt": b"hello", "dir/b.bin": b"\x00" * 2048})
    outside = await nats.connect(nats_server.url)
    statuses: list[dict] = []

    async def on_status(msg) -> None:
        statuses.append(msgspec.json.decode(msg.data))

    await outside.subscribe("shoal.evt.dataset.status", cb=on_status)
    text = (
        '{"type": "dataset.apply.v1", "id": "ext-0001", "dataset": {"metadata": {"name": "external", '
        '"namespace": "team-a"}, "spec": {"mounts": [{"mountPoint": "s3://' + bucket + '/"}]}}}'
    )
    try:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            js = outside.jetstream()
            await eventually(lambda: _stream_exists(js), what="streams provisioned")
            await js.publish("shoal.cmd.dataset.apply", text.encode(), headers={"Nats-Msg-Id": "ext-0001"})

            async def synced_status():
                return next((s for s in statuses if s["name"] == "external" and s["status"].get("fileNum") == 2),
                            None)

            status = await eventually(synced_status)
            assert status["namespace"] == "team-a"
            assert status["status"]["ufsTotalBytes"] == 5 + 2048
            assert status["status"]["phase"] == "NotBound"
    finally:
        await outside.close()


async def _stream_exists(js) -> bool:
    try:
        await js.stream_info(subjects.STREAM_COMMANDS)
        return True
    except Exception:
        return False


async def test_unreachable_store_fails_then_recovers_on_resync(bus: Bus, nats_server, seaweedfs, bucket: str) -> None:
    from libs.events.dataset import DatasetResync
    from tests.conftest import put_objects
    from tests.faults import CuttableProxy

    await put_objects(seaweedfs, bucket, {"a.txt": b"hello", "b/c.txt": b"there"})
    # The endpoint is a proxy to SeaweedFS that is not listening yet: connections are refused.
    proxy = CuttableProxy(seaweedfs.config.s3_port)
    settings = make_settings(nats_server.url, proxy.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key)
    metrics = Snapshot()
    try:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                metadata=ObjectMeta(name="offline"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}")]))))

            async def failed():
                record = await dataset_record(bus, "offline")
                return record if record and record.status.phase == "Failed" else None

            record = await eventually(failed, timeout=30)
            assert "cannot reach" in record.status.message and proxy.endpoint in record.status.message
            assert settings.s3.secret_access_key.reveal() not in record.status.message

            await proxy.start()  # the store is back
            await bus.publish(subjects.DATASET_RESYNC, DatasetResync(name="offline"))

            async def recovered():
                record = await dataset_record(bus, "offline")
                return record if record and record.status.phase != "Failed" and record.status.file_num == 2 else None

            # Well before the service's own retry of an unreachable endpoint (15 s): the resync did it.
            record = await eventually(recovered, timeout=10, what="the dataset synced after the resync")
            assert record.status.ufs_total_bytes == 10
            assert record.status.message == "" or "cannot reach" not in record.status.message
            # The syncs were timed by outcome: the unreachable one failed, the one after the resync ok.
            assert metrics.moved("shoal_dataset_sync_duration_seconds_count", outcome="failed") >= 1
            assert metrics.moved("shoal_dataset_sync_duration_seconds_count", outcome="ok") >= 1
    finally:
        await proxy.cut()


async def test_unreachable_store_is_retried_without_a_resync(bus: Bus, nats_server, seaweedfs, bucket: str) -> None:
    """The service lists an unreachable store again on its own once it is back: no resync, no new spec."""
    from tests.conftest import put_objects
    from tests.faults import CuttableProxy

    await put_objects(seaweedfs, bucket, {"a.txt": b"hello", "b/c.txt": b"there"})
    proxy = CuttableProxy(seaweedfs.config.s3_port)  # not listening yet: connections are refused
    settings = make_settings(nats_server.url, proxy.endpoint, seaweedfs.config.access_key_id,
                             seaweedfs.config.secret_access_key, sync_retry_seconds=1.0)
    try:
        async with running(lambda stop: dataset_app.run(settings, stop)):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                metadata=ObjectMeta(name="blip"), spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}")]))))

            async def failed():
                record = await dataset_record(bus, "blip")
                return record if record and record.status.phase == "Failed" else None

            before = await eventually(failed, timeout=30, what="the dataset failed on the unreachable store")
            assert "cannot reach" in before.status.message
            await proxy.start()  # the store is back; nothing else happens

            async def recovered():
                record = await dataset_record(bus, "blip")
                return record if record and record.status.phase != "Failed" and record.status.file_num == 2 else None

            record = await eventually(recovered, timeout=15, what="the dataset synced again on its own")
            assert "cannot reach" not in record.status.message and record.status.message.startswith("no Runtime ")
            assert (record.generation, record.sync_requests) == (before.generation, before.sync_requests)
    finally:
        await proxy.cut()


@pytest.mark.parametrize(("mount", "reason_part"), [
    (Mount(mount_point="s3://[bucket/data/"), "spec.mounts[0].mountPoint 's3://[bucket/data/' is not a valid URL"),
    (Mount(mount_point="local://[x/data"), "spec.mounts[0].mountPoint 'local://[x/data' is not a valid URL"),
    (Mount(mount_point="dataset://[ns/name"), "'dataset://[ns/name' is not a valid URL"),
    (Mount(mount_point="s3://bucket/data/", options={"endpoint": "http://[::1"}),
     "spec.mounts[0].options.endpoint 'http://[::1' is not a valid URL"),
])
async def test_a_mount_url_that_cannot_be_parsed_is_rejected_with_a_reason(
        bus: Bus, bus_settings: Settings, mount: Mount, reason_part: str) -> None:
    """An unbalanced '[' (an IPv6 host never closed) makes urlsplit raise: a rejection, not a handler failure."""
    facts = FactCollector()
    await facts.start(bus)
    async with running(lambda stop: dataset_app.run(bus_settings, stop)):
        apply = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="brackets"), spec=DatasetSpec(mounts=[mount])))
        await bus.publish(subjects.DATASET_APPLY, apply)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=apply.id)
        assert reason_part in rejected["reason"], rejected
    assert await dataset_record(bus, "brackets") is None


async def test_inventory_with_a_negative_size_or_index_is_refused_with_the_reason(bus: Bus, bus_settings: Settings,
                                                                                  ) -> None:
    """Block sizes, block indices, mounts and positions in inventory events are never negative, and the schema says
    so (``minimum: 0``, checked at decode): such an event is refused with the field and the bound, a dead letter
    from the dataset service's durable consumer and passed over, counted and logged, by the scheduler's follower.
    Taken as reported, a negative block size took bytes off the node's other blocks."""
    subject = subjects.agent_inventory("node-a")
    good = (b'{"type": "agent.inventory.delta.v2", "node": "node-a", "dataset": {"name": "d", "namespace": "ml"}, '
            b'"incarnation": "i1", "seq": 1, "cached": [[0, "k", "e1", [[0, 1048576]]]]}')
    bad = good.replace(b"1048576", b"-5").replace(b'"seq": 1', b'"seq": 2')
    metrics = Snapshot()
    with structlog.testing.capture_logs() as logs:
        async with running(lambda stop: dataset_app.run(bus_settings, stop)), scheduler(bus_settings) as handlers:

            async def folding() -> bool:  # the scheduler's follower starts at the stream's end: once it takes one
                await bus.js.publish(subject, good)
                return handlers().counts.get("inventory_unknown_dataset", 0) > 0  # no such dataset: read, ignored

            await eventually(folding, what="the scheduler following the inventory")
            ack = await bus.js.publish(subject, bad)
            letter = await dead_letter_for(bus, subject)
            assert letter["consumer"] == subjects.DURABLE_DATASET_INVENTORY and letter["streamSequence"] == ack.seq
            assert "Expected `int` >= 0 - at `$.cached[0][3][0][1]`" in letter["reason"]

            async def passed_over() -> Any:
                return next((line for line in logs if line["event"] == "message passed over"
                             and line.get("consumer") == scheduler_app.INVENTORY_CONSUMER), None)

            line = await eventually(passed_over, what="the scheduler passing the event over")
    assert line["seq"] == ack.seq and "Expected `int` >= 0 - at `$.cached[0][3][0][1]`" in line["reason"]
    assert metrics.moved(HANDLED, consumer=scheduler_app.INVENTORY_CONSUMER, outcome="rejected") == 1
