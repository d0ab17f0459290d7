"""``runtime.scale.v1`` (``shoal scale``, the autoscaler) on a real nats-server: the runtime service changes only
``spec.replicas``, of the runtime as it stands when it handles the command, so a spec applied after the scaler
looked is kept; a scale delivered again behind a newer apply is not applied; an unknown runtime and replicas out of
range are refused in the words a delete and an apply use. Why the autoscaler holds (at maxReplicas, no agent to
become a worker, ...) is in ``status.autoscaling.lastDecision``, written once per reason, logged and described;
under steady reads its measures are written at most every ``AUTOSCALE_WRITE_SECONDS``, not at every look, and the
settling window still holds across a restart.

The first ones drive ``RuntimeHandlers`` directly (stream sequences of the test's choosing, the autoscaler's view as
stale as wanted); the refusals go through the running service, its consumer and its decoder.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.msg import Msg

from libs import subjects
from libs.bus import Bus, Delivery, kv_load
from libs.cli.render import describe_runtime
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import ObjectMeta, ObjectRef, rfc3339
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount, NodeCache
from libs.events.runtime import (
    AutoscalingPolicy,
    Level,
    Runtime,
    RuntimeApply,
    RuntimeCommand,
    RuntimeDelete,
    RuntimeRecord,
    RuntimeScale,
    RuntimeSpec,
    TieredStore,
)
from services.runtime import app as runtime_app
from services.runtime import domain
from services.runtime import handlers as handlers_module
from services.runtime.handlers import RuntimeHandlers
from tests.conftest import NatsServer
from tests.helpers import (
    FactCollector,
    json_lines,
    json_logs,
    make_settings,
    running,
    runtime_record,
    unsynced_dataset,
    unwatched_mirror,
)

NAME = "scaled"
MiB = 1024 * 1024
# Below its minReplicas: the autoscaler's first look brings it up to 2 at once, without any reads to fake.
POLICY = AutoscalingPolicy(min_replicas=2, max_replicas=3, target_cache_used_percent=80)


def mem_runtime(quota: str, replicas: int = 1, autoscaling: AutoscalingPolicy | None = None) -> Runtime:
    return Runtime(metadata=ObjectMeta(name=NAME), spec=RuntimeSpec(
        replicas=replicas, autoscaling=autoscaling, tieredstore=TieredStore(levels=[Level(mediumtype="MEM",
                                                                                          quota=quota)])))


def delivered(subject: str, sequence: int) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=1, stream_sequence=sequence)


async def handlers_of(bus: Bus) -> RuntimeHandlers:
    return RuntimeHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord),
                           unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                           unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))


async def stored(bus: Bus) -> RuntimeRecord:
    record = await runtime_record(bus, NAME)
    assert record is not None
    return record


async def test_the_autoscalers_change_keeps_a_spec_applied_after_it_looked(bus: Bus) -> None:
    handlers = await handlers_of(bus)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi", autoscaling=POLICY)),
                         delivered(subjects.RUNTIME_APPLY, 1))
    looked = await stored(bus)  # the autoscaler's view: its mirror has not caught up with what follows
    await handlers.apply(RuntimeApply(runtime=mem_runtime("2Gi", autoscaling=POLICY)),
                         delivered(subjects.RUNTIME_APPLY, 2))

    sent: asyncio.Queue[Msg] = asyncio.Queue()
    subscription = await bus.nc.subscribe(subjects.RUNTIME_COMMANDS, cb=sent.put)
    try:
        await handlers.autoscale(subjects.resource_key("default", NAME), looked)
        command = await asyncio.wait_for(sent.get(), 10)
    finally:
        await subscription.unsubscribe()
    # Handled as the consumer would, behind the user's apply: decoded from the bytes sent.
    await handlers.on_command(msgspec.json.Decoder(RuntimeCommand).decode(command.data),
                              delivered(command.subject, 3))
    record = await stored(bus)
    assert record.runtime.spec.replicas == 2
    assert record.runtime.spec.tieredstore.levels[0].quota == "2Gi"  # the user's apply, not the view's 1Gi
    assert (record.generation, record.command_sequence) == (3, 3)


async def test_the_autoscaler_grows_no_further_than_the_agents_that_can_be_workers(bus: Bus) -> None:
    # One agent, a worker already, its cache full while read: another replica would find no agent, leaving the
    # runtime PartialReady ("1 of 2 agents ready") and replicas climbing to maxReplicas for nothing.
    now = [1_700_000_000.0]
    key = subjects.resource_key("default", NAME)
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_cache_used_percent=50, cool_down_seconds=1)
    handlers = await autoscaled_handlers(bus, policy, now)
    assert [worker.node for worker in (await stored(bus)).status.workers] == ["n1"]

    # No callback: what arrives stays pending in the subscription, counted, until read.
    subscription = await bus.nc.subscribe(subjects.RUNTIME_COMMANDS)
    try:
        for look, read in enumerate((10 * MiB, 20 * MiB, 30 * MiB)):
            now[0] += 10 * look  # past the cool-down at every look
            handlers.datasets.values[key] = DatasetRecord(
                dataset=Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
                generation=1, status=DatasetStatus(nodes=[NodeCache(node="n1", cached_bytes=8 * MiB,
                                                                     store_read_bytes=read)]))
            await handlers.autoscale(key, await stored(bus))
        # The autoscaler publishes on this connection: once the server has answered a PING sent after its
        # publishes, anything it sent us is in (the server writes to a connection in order).
        await bus.nc.flush()
        assert subscription.pending_msgs == 0, msgspec.json.decode((await subscription.next_msg()).data)
    finally:
        await subscription.unsubscribe()
    record = await stored(bus)
    assert record.runtime.spec.replicas == 1 and record.status.phase == "Ready"
    assert record.status.autoscaling is not None and record.status.autoscaling.cache_used_percent == 100.0
    held = record.status.autoscaling.last_decision
    assert held is not None and (held.action, held.reason) == ("hold", "NoSpareAgent")
    assert held.message.endswith("but no agent can become another worker (see notPicked)"), held.message


async def test_why_the_autoscaler_holds_is_in_the_status_written_once_per_reason_logged_and_described(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its reasons ("already at maxReplicas", "cooling down", ...) were worked out at every look and dropped: neither
    # the status, the log nor shoal describe runtime said why the runtime did not grow.
    now = [1_700_000_000.0]
    key = subjects.resource_key("default", NAME)
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=1, target_cache_used_percent=50, cool_down_seconds=30)
    handlers = await autoscaled_handlers(bus, policy, now)
    kv = await bus.kv(subjects.KV_RUNTIMES)

    def full_cache(read: int) -> DatasetRecord:
        return DatasetRecord(
            dataset=Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
            generation=1, status=DatasetStatus(nodes=[NodeCache(node="n1", cached_bytes=8 * MiB,
                                                                 store_read_bytes=read)]))

    with json_logs(monkeypatch) as logs:
        # Nobody reads: held at minReplicas, saved at the first look; the next looks see the same and write nothing.
        handlers.datasets.values[key] = full_cache(0)
        await handlers.autoscale(key, await stored(bus))
        first, revision = await kv_load(kv, key, RuntimeRecord)
        assert first is not None and first.status.autoscaling is not None
        held = first.status.autoscaling.last_decision
        assert held is not None and (held.action, held.reason, held.time) == ("hold", "AtMinReplicas", rfc3339(now[0]))
        for _ in range(3):
            now[0] += 1
            await handlers.autoscale(key, await stored(bus))
        assert (await kv_load(kv, key, RuntimeRecord))[1] == revision

        # Read while full, at maxReplicas: another reason, with its time; kept as it is while it holds for it.
        now[0] += 1
        pressed_at = now[0]
        for read in (10 * MiB, 20 * MiB):
            handlers.datasets.values[key] = full_cache(read)
            await handlers.autoscale(key, await stored(bus))
            now[0] += 1
        record = await stored(bus)
    assert record.status.autoscaling is not None
    held = record.status.autoscaling.last_decision
    assert held is not None and (held.action, held.reason, held.time) == ("hold", "AtMaxReplicas",
                                                                          rfc3339(pressed_at))
    assert held.message == "cache 100.0% used >= target 50% while reading, but already at maxReplicas 1"
    holds = [line for line in json_lines(logs.getvalue()) if line["event"] == "autoscaler holds"]
    assert [(line["reason"], line["message"]) for line in holds] == [
        ("AtMinReplicas", "hold: cache 100.0% used, no reads; at minReplicas 1"), ("AtMaxReplicas", held.message)]
    assert f"  last decision: hold (AtMaxReplicas) since {rfc3339(pressed_at)}: {held.message}" in \
        describe_runtime(record).splitlines()


async def test_a_scale_delivered_again_behind_a_newer_apply_is_not_applied(bus: Bus) -> None:
    handlers = await handlers_of(bus)
    facts = FactCollector()
    await facts.start(bus, subjects.RUNTIME_FACTS)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi")), delivered(subjects.RUNTIME_APPLY, 1))
    scale = RuntimeScale(name=NAME, replicas=3)
    await handlers.scale(scale, delivered(subjects.RUNTIME_SCALE, 2))
    assert (await stored(bus)).generation == 2
    await handlers.apply(RuntimeApply(runtime=mem_runtime("2Gi")), delivered(subjects.RUNTIME_APPLY, 5))

    # The scale again (the service was killed before its ack; redelivered behind the apply): nothing changes.
    await handlers.scale(scale, delivered(subjects.RUNTIME_SCALE, 2))
    record = await stored(bus)
    assert record.runtime == mem_runtime("2Gi")
    assert (record.generation, record.command_sequence) == (3, 5)
    # The replicas it already has: accepted without a new generation.
    same = RuntimeScale(name=NAME, replicas=1)
    await handlers.scale(same, delivered(subjects.RUNTIME_SCALE, 6))
    assert (await facts.wait_for("runtime.accepted.v1", causationId=same.id))["generation"] == 3
    assert (await stored(bus)).generation == 3


async def test_an_older_scale_delivered_again_after_a_newer_one_that_changed_nothing_is_not_applied(
        bus: Bus) -> None:
    # `shoal scale --replicas 3` (#2), then `--replicas 1` (#3) to take it back. The service was killed while
    # handling #2, so #3 is handled first, and finds the replicas it asks for: nothing to change. JetStream then
    # redelivers #2 after its ack wait. The user's last word is 1 replica: #2 is stale, as behind any newer command.
    handlers = await handlers_of(bus)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi")), delivered(subjects.RUNTIME_APPLY, 1))
    await handlers.scale(RuntimeScale(name=NAME, replicas=1), delivered(subjects.RUNTIME_SCALE, 3))
    await handlers.scale(RuntimeScale(name=NAME, replicas=3), delivered(subjects.RUNTIME_SCALE, 2))
    record = await stored(bus)
    assert (record.runtime.spec.replicas, record.generation, record.command_sequence) == (1, 1, 3)
    # The same spec re-applied later (the bridge after its restart) is as much a newer command.
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi")), delivered(subjects.RUNTIME_APPLY, 5))
    await handlers.scale(RuntimeScale(name=NAME, replicas=4), delivered(subjects.RUNTIME_SCALE, 4))
    assert (await stored(bus)).runtime.spec.replicas == 1


async def test_a_scale_of_an_unknown_runtime_or_out_of_range_is_refused_as_a_delete_and_an_apply_are(
        bus: Bus, nats_server: NatsServer) -> None:
    facts = FactCollector()
    await facts.start(bus, subjects.RUNTIME_FACTS)

    async def reason(subject: str, command: RuntimeApply | RuntimeDelete | RuntimeScale) -> str:
        await bus.publish(subject, command)
        rejected = await facts.wait_for("runtime.rejected.v1", causationId=command.id)
        assert rejected["subject"] == subject
        return str(rejected["reason"])

    async with running(lambda stop: runtime_app.run(make_settings(nats_server.url), stop)):
        ghost = await reason(subjects.RUNTIME_SCALE, RuntimeScale(name="ghost", replicas=2))
        assert ghost == "runtime default/ghost does not exist"
        assert await reason(subjects.RUNTIME_DELETE, RuntimeDelete(name="ghost")) == ghost

        applied = RuntimeApply(runtime=mem_runtime("1Gi"))
        await bus.publish(subjects.RUNTIME_APPLY, applied)
        await facts.wait_for("runtime.accepted.v1", causationId=applied.id)
        for replicas in (20_000, -1):
            refused = await reason(subjects.RUNTIME_SCALE, RuntimeScale(name=NAME, replicas=replicas))
            assert refused == f"spec.replicas must be between 0 and 10000, got {replicas}"
            assert await reason(subjects.RUNTIME_APPLY, RuntimeApply(runtime=mem_runtime("1Gi", replicas))) == refused
        assert "DNS-1035" in await reason(subjects.RUNTIME_SCALE, RuntimeScale(name="Bad_Name", replicas=2))

        scaled = RuntimeScale(name=NAME, replicas=2)
        await bus.publish(subjects.RUNTIME_SCALE, scaled)
        assert (await facts.wait_for("runtime.accepted.v1", causationId=scaled.id))["generation"] == 2
    record = await stored(bus)
    assert record.runtime.spec.replicas == 2 and record.runtime == msgspec.structs.replace(
        applied.runtime, spec=msgspec.structs.replace(applied.runtime.spec, replicas=2))


async def test_a_deleted_runtime_stays_deleted_when_the_watch_brings_its_put_late(bus: Bus) -> None:
    """The service deletes a runtime and takes it out of its mirror at once; the watch then delivers the runtime's
    last put (written before the delete, delivered after it). The runtime must not come back: its workers would be
    kept from the other runtimes until the next replay."""
    handlers = await handlers_of(bus)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi")), delivered(subjects.RUNTIME_APPLY, 1))
    key = subjects.resource_key("default", NAME)
    last_put = await (await bus.kv(subjects.KV_RUNTIMES)).get(key)
    await handlers.delete(RuntimeDelete(name=NAME), delivered(subjects.RUNTIME_DELETE, 2))
    assert key not in handlers.runtimes.values
    handlers.runtimes.watched(last_put)
    assert key not in handlers.runtimes.values
    # Applied again: the new put is newer than the delete, and the mirror takes it.
    await handlers.apply(RuntimeApply(runtime=mem_runtime("2Gi")), delivered(subjects.RUNTIME_APPLY, 3))
    handlers.runtimes.watched(await (await bus.kv(subjects.KV_RUNTIMES)).get(key))
    assert handlers.runtimes.values[key].runtime == mem_runtime("2Gi")


async def test_a_delete_and_an_apply_delivered_again_behind_each_other_leave_the_last_word(bus: Bus) -> None:
    """Delete then apply, and apply then delete, each first command handled again behind the second (its handling
    lost a compare-and-set to a status write and was redelivered, or the service was killed before its ack): the
    command stream's last word stands. An older delete must not remove the runtime applied after it, nor an older
    apply bring back the runtime deleted after it; each is refused saying why."""
    handlers = await handlers_of(bus)
    facts = FactCollector()
    await facts.start(bus, subjects.RUNTIME_FACTS)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("1Gi")), delivered(subjects.RUNTIME_APPLY, 1))
    delete = RuntimeDelete(name=NAME)
    await handlers.delete(delete, delivered(subjects.RUNTIME_DELETE, 2))
    await handlers.apply(RuntimeApply(runtime=mem_runtime("2Gi")), delivered(subjects.RUNTIME_APPLY, 3))
    await handlers.delete(delete, delivered(subjects.RUNTIME_DELETE, 2))  # the delete again, behind the apply
    rejected = await facts.wait_for("runtime.rejected.v1", causationId=delete.id)
    assert "applied by a later command (stream sequence 3)" in rejected["reason"], rejected
    assert (await stored(bus)).runtime == mem_runtime("2Gi")

    apply = RuntimeApply(runtime=mem_runtime("2Gi"))
    await handlers.apply(apply, delivered(subjects.RUNTIME_APPLY, 4))
    await handlers.delete(RuntimeDelete(name=NAME), delivered(subjects.RUNTIME_DELETE, 5))
    await handlers.apply(apply, delivered(subjects.RUNTIME_APPLY, 4))  # the apply again, behind the delete
    rejected = await facts.wait_for("runtime.rejected.v1", causationId=apply.id)
    assert "deleted by a later command (stream sequence 5)" in rejected["reason"], rejected
    assert await runtime_record(bus, NAME) is None
    # A newer apply creates it again.
    await handlers.apply(RuntimeApply(runtime=mem_runtime("2Gi")), delivered(subjects.RUNTIME_APPLY, 6))
    assert (await stored(bus)).command_sequence == 6


def read_dataset(hits: int, misses: int) -> DatasetRecord:
    """The runtime's Dataset as the dataset service folds it: one node, its cache full, with these read counters."""
    return DatasetRecord(
        dataset=Dataset(metadata=ObjectMeta(name=NAME), spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
        generation=1, status=DatasetStatus(nodes=[NodeCache(node="n1", cached_bytes=8 * MiB, local_read_bytes=hits,
                                                             store_read_bytes=misses)]))


async def autoscaled_handlers(bus: Bus, policy: AutoscalingPolicy, now: list[float],
                              replicas: int = 1) -> RuntimeHandlers:
    """Handlers on a clock the test moves, with the runtime applied under ``policy`` and one agent, its worker."""
    handlers = await handlers_of(bus)
    handlers.clock = lambda: now[0]
    key = subjects.resource_key("default", NAME)
    await handlers.apply(RuntimeApply(runtime=mem_runtime("8Mi", replicas, autoscaling=policy)),
                         delivered(subjects.RUNTIME_APPLY, 1))
    beat = AgentHeartbeat(node="n1", runtimes=[ObjectRef(name=NAME)], interval_seconds=3600.0)
    handlers.agents.values["n1"] = AgentRecord(heartbeat=beat, received_at=now[0])
    handlers.datasets.values[key] = unsynced_dataset(NAME)
    await handlers.refresh(key, handlers._agents())
    return handlers


async def bucket_writes(bus: Bus) -> int:
    """Every write there has been to the runtimes' bucket (its stream's last sequence)."""
    return int((await (await bus.kv(subjects.KV_RUNTIMES)).status()).stream_info.state.last_seq)


async def test_the_autoscaler_under_steady_pressure_writes_its_measures_at_most_every_interval_not_every_look(
        bus: Bus) -> None:
    # Read without a pause while full, at maxReplicas: the decision holds (AtMaxReplicas), but lastPressureTime
    # and the hit ratio moved at every look, and each look was a record write and a runtime.status.v1 fact: one a
    # second per autoscaled runtime, for the bridge's writes to Kubernetes, the dataset service and every watcher.
    now = [1_700_000_000.0]
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=1, target_cache_used_percent=50, cool_down_seconds=30)
    handlers = await autoscaled_handlers(bus, policy, now)
    key = subjects.resource_key("default", NAME)
    statuses = await bus.nc.subscribe(subjects.RUNTIME_STATUS)  # no callback: counted while pending
    try:
        hits = misses = 0
        handlers.datasets.values[key] = read_dataset(hits, misses)
        await handlers.autoscale(key, await stored(bus))  # the first look: AtMinReplicas, no reads yet
        for _ in range(2):  # reads: AtMaxReplicas from the first look with a window, written at once
            now[0] += 1
            hits, misses = hits + MiB, misses + 3 * MiB
            handlers.datasets.values[key] = read_dataset(hits, misses)
            await handlers.autoscale(key, await stored(bus))
        held = (await stored(bus)).status.autoscaling
        assert held is not None and held.last_decision is not None
        assert held.last_decision.reason == "AtMaxReplicas"
        await bus.nc.flush()
        writes, facts = await bucket_writes(bus), statuses.pending_msgs

        looks = 60
        for look in range(looks):  # a minute of reads, a different mix of hits and misses at every look
            now[0] += handlers_module.AUTOSCALE_SECONDS
            hits, misses = hits + (look % 5) * MiB, misses + 2 * MiB
            handlers.datasets.values[key] = read_dataset(hits, misses)
            await handlers.autoscale(key, await stored(bus))
        await bus.nc.flush()
        written, published = await bucket_writes(bus) - writes, statuses.pending_msgs - facts
    finally:
        await statuses.unsubscribe()
    most = looks / domain.AUTOSCALE_WRITE_SECONDS + 1
    assert 1 <= written <= most and published == written, (written, published, most)
    # What was written is no older than the interval.
    record = await stored(bus)
    assert record.status.autoscaling is not None
    assert now[0] - record.status.autoscaling.last_pressure_time < domain.AUTOSCALE_WRITE_SECONDS
    assert record.status.autoscaling.last_decision == held.last_decision  # the same hold, since the same time


async def test_a_new_decision_of_the_autoscaler_is_written_at_once_between_two_writes_of_its_measures(
        bus: Bus) -> None:
    now = [1_700_000_000.0]
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=1, target_cache_used_percent=50, cool_down_seconds=30)
    handlers = await autoscaled_handlers(bus, policy, now)
    key = subjects.resource_key("default", NAME)
    hits = misses = 0
    # Reads: held at maxReplicas, longer than the interval (a hold that turns calm sooner waits for it: a reader
    # pausing at every other look must not be a write a second, see test_autoscale.py).
    for _ in range(int(domain.AUTOSCALE_WRITE_SECONDS) + 5):
        handlers.datasets.values[key] = read_dataset(hits, misses)
        await handlers.autoscale(key, await stored(bus))
        now[0] += 1
        hits, misses = hits + MiB, misses + 3 * MiB
    last_read = now[0] - 1
    before = await bucket_writes(bus)
    # The reads stop: no pressure, at minReplicas. Another reason, written at the very look that sees it.
    await handlers.autoscale(key, await stored(bus))
    assert await bucket_writes(bus) == before + 1
    autoscaling = (await stored(bus)).status.autoscaling
    assert autoscaling is not None and autoscaling.last_decision is not None
    assert (autoscaling.last_decision.reason, autoscaling.last_decision.time) == ("AtMinReplicas", rfc3339(now[0]))
    assert (autoscaling.hit_ratio_percent, autoscaling.last_pressure_time) == (None, last_read)


async def test_the_settling_window_holds_across_a_restart_of_the_runtime_service(bus: Bus) -> None:
    # Under steady pressure at maxReplicas lastPressureTime is written at most every AUTOSCALE_WRITE_SECONDS, so the
    # record may show a pressure older than the last one seen. A service restarted then must not shrink before a
    # whole cool-down has passed since the reads stopped.
    now = [1_700_000_000.0]
    cool = 30
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=2, target_cache_used_percent=50, cool_down_seconds=cool)
    handlers = await autoscaled_handlers(bus, policy, now, replicas=2)
    key = subjects.resource_key("default", NAME)
    hits = misses = 0
    for _ in range(int(domain.AUTOSCALE_WRITE_SECONDS) + 10):  # reads: held at maxReplicas
        hits, misses = hits + MiB, misses + 3 * MiB
        handlers.datasets.values[key] = read_dataset(hits, misses)
        await handlers.autoscale(key, await stored(bus))
        now[0] += 1
    last_read = now[0] - 1
    # The service restarts: its memory is gone, the reads stopped.
    handlers = await handlers_of(bus)
    handlers.clock = lambda: now[0]
    handlers.agents.values["n1"] = AgentRecord(heartbeat=AgentHeartbeat(
        node="n1", runtimes=[ObjectRef(name=NAME)], interval_seconds=3600.0), received_at=now[0])
    handlers.datasets.values[key] = read_dataset(hits, misses)
    while now[0] < last_read + cool:
        await handlers.autoscale(key, await stored(bus))
        record = await stored(bus)
        assert record.runtime.spec.replicas == 2
        assert record.status.autoscaling is not None and record.status.autoscaling.last_decision is not None
        assert record.status.autoscaling.last_decision.action == "hold", (now[0] - last_read,
                                                                          record.status.autoscaling)
        now[0] += 1


async def test_a_scale_by_hand_is_not_undone_by_the_autoscaler_within_a_cool_down_nor_after_a_restart(
        bus: Bus) -> None:
    # `shoal scale --replicas 3` on a runtime long calm at minReplicas 1: the autoscaler's next look, a second
    # later, shrank it to 2, dropping the worker just picked, though its changes come one per cool-down.
    now = [1_700_000_000.0]
    key = subjects.resource_key("default", NAME)
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_cache_used_percent=50, cool_down_seconds=30)
    handlers = await autoscaled_handlers(bus, policy, now)
    handlers.datasets.values[key] = read_dataset(0, 0)
    for _ in range(40):  # calm for longer than a cool-down
        await handlers.autoscale(key, await stored(bus))
        now[0] += 1
    await handlers.scale(RuntimeScale(name=NAME, namespace="default", replicas=3),
                         delivered(subjects.RUNTIME_SCALE, 2))
    scaled_at = now[0]
    subscription = await bus.nc.subscribe(subjects.RUNTIME_COMMANDS)  # no callback: counted while pending
    try:
        for look in range(10):
            if look == 5:  # a restart of the service: its memory of the looks is gone, the record is read
                restarted = await handlers_of(bus)
                restarted.clock, restarted.agents.values = handlers.clock, handlers.agents.values
                restarted.datasets.values[key] = read_dataset(0, 0)
                handlers = restarted
            await handlers.autoscale(key, await stored(bus))
            now[0] += 1
        await bus.nc.flush()
        assert subscription.pending_msgs == 0, msgspec.json.decode((await subscription.next_msg()).data)
    finally:
        await subscription.unsubscribe()
    record = await stored(bus)
    assert record.runtime.spec.replicas == 3
    assert record.status.autoscaling is not None and record.status.autoscaling.last_scale_time == scaled_at
    held = record.status.autoscaling.last_decision
    assert held is not None and (held.action, held.reason) == ("hold", "Settling")
    assert held.message.startswith("replicas set to 3 (was 1) by a scale or an apply; hold:"), held.message
    assert rfc3339(scaled_at + 30) in held.message
