"""The runtime service's cost per heartbeat does not grow with the number of agents (nor with the runtimes it names
that do not exist), a node with thousands of mounts beats within the event limit, and a beat's absurd times do not
stop its runtimes' status.

The service runs in-process on a real nats-server; its Bus hands out KV buckets wrapped so every read (get,
keys, history) is counted. With 40 agents beating, a heartbeat must cost no read of the agents bucket at all
(the service keeps an in-memory view fed by a KV watch) and a bounded number of runtime reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

from libs import subjects
from libs.bus import Bus, KvMirror, kv_load, kv_save
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord, MountReadFailures, MountReport, ReadFailure, TierDisk
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.side_server import Readiness
from services.agent import domain as agent_domain
from services.runtime import app as runtime_app
from tests.helpers import (
    FactCollector,
    agent_shaped_heartbeat,
    counting_connect,
    eventually,
    put_unsynced_dataset,
    running,
    runtime_record,
    unsynced_dataset,
)

AGENTS = 40
@pytest.mark.timeout(120)
async def test_a_heartbeat_reads_no_agent_records_whatever_the_number_of_agents(
        bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: Counter[str] = Counter()
    monkeypatch.setattr(runtime_app, "connect", counting_connect(runtime_app, reads))
    runtime = Runtime(metadata=ObjectMeta(name="wide"), spec=RuntimeSpec(
        replicas=AGENTS, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))
    serves = [ObjectRef(name="wide")]
    async with running(lambda stop: runtime_app.run(settings, stop)):
        await put_unsynced_dataset(bus, "wide")  # a runtime picks cache workers for its Dataset only
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
        await eventually(lambda: runtime_record(bus, "wide"), what="the runtime applied")

        async def beat_all(round_: int) -> None:
            for i in range(AGENTS):
                beat = AgentHeartbeat(id=f"beat-{round_}-{i}", node=f"node-{i:03d}", runtimes=serves,
                                      interval_seconds=30.0)
                await bus.publish(subjects.agent_heartbeat(beat.node), beat)

        async def all_ready() -> bool:
            record = await runtime_record(bus, "wide")
            return record is not None and record.status.worker_number_ready == AGENTS

        await beat_all(1)  # every agent known once
        await eventually(all_ready, 60, f"{AGENTS} agents ready")
        before = reads.copy()
        await beat_all(2)
        await eventually(lambda: _consumed(bus, 2 * AGENTS), 60, "the second round of heartbeats handled")
        record = await runtime_record(bus, "wide")
        assert record is not None and record.status.phase == "Ready"

    per_beat = {bucket: (reads[bucket] - before[bucket]) / AGENTS for bucket in reads}
    assert per_beat.get(subjects.KV_AGENTS, 0) == 0, per_beat
    # One runtime named per beat: a read of its record, plus the 2 s status ticker's listing meanwhile.
    assert per_beat.get(subjects.KV_RUNTIMES, 0) <= 2, per_beat


@pytest.mark.timeout(120)
async def test_a_heartbeat_naming_runtimes_that_do_not_exist_reads_no_record_of_theirs(
        bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # An agent whose SHOAL_AGENT_RUNTIMES names 200 runtimes not applied (yet): each beat read the bucket for each
    # of them, under the lock every refresh takes. Only the runtimes that exist are refreshed.
    reads: Counter[str] = Counter()
    monkeypatch.setattr(runtime_app, "connect", counting_connect(runtime_app, reads))
    runtime = Runtime(metadata=ObjectMeta(name="real"), spec=RuntimeSpec(
        replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))
    serves = [ObjectRef(name="real"), *(ObjectRef(name=f"later-{i:03d}") for i in range(200))]
    async with running(lambda stop: runtime_app.run(settings, stop)):
        await put_unsynced_dataset(bus, "real")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
        await eventually(lambda: runtime_record(bus, "real"), what="the runtime applied")
        await eventually(lambda: _consumed_commands(bus), what="the apply handled")
        before = reads.copy()
        for round_ in range(5):
            await bus.publish(subjects.agent_heartbeat("node-wide"), AgentHeartbeat(
                id=f"wide-{round_}", node="node-wide", runtimes=serves, interval_seconds=30.0))
        await eventually(lambda: _consumed(bus, 5), 60, "the heartbeats handled")
        record = await runtime_record(bus, "real")
        assert record is not None and record.status.ready_nodes == ["node-wide"]
    runtime_reads = (reads[subjects.KV_RUNTIMES] - before[subjects.KV_RUNTIMES]) / 5
    # The existing runtime's record when its status changes, plus the 2 s ticker's listing meanwhile.
    assert runtime_reads <= 2, runtime_reads


async def _consumed_commands(bus: Bus) -> bool:
    info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def _consumed(bus: Bus, count: int) -> bool:
    info = await bus.js.consumer_info(subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS)
    return info.ack_floor.stream_seq >= count and info.num_ack_pending == 0 and info.num_pending == 0


async def test_an_agent_heartbeat_for_5000_datasets_is_taken_and_read_whole(bus: Bus, settings: Settings) -> None:
    # A node mounting 5,000 datasets (20-character names, peers on), as its agent sends it: the runtime service takes
    # it (under SHOAL_MAX_EVENT_BYTES), serves every runtime from it, and reads each mount's state and peer URL.
    beat, reports = agent_shaped_heartbeat(5000, failures=2, node="node-big", interval_seconds=3600.0)
    sent, left_out = agent_domain.fit_heartbeat(beat, settings.service.max_event_bytes)
    assert left_out == 0
    serving, starting, failing = reports[0], reports[3], reports[7]
    assert (serving.state, starting.state, failing.state) == ("Serving", "Starting", "Failing")
    async with running(lambda stop: runtime_app.run(settings, stop)):
        for report in (serving, starting, failing):
            # A runtime picks cache workers for its Dataset only.
            await put_unsynced_dataset(bus, report.dataset.name, report.dataset.namespace)
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
                metadata=ObjectMeta(name=report.dataset.name, namespace=report.dataset.namespace),
                spec=RuntimeSpec(replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))))

        async def applied() -> bool:
            records = [await runtime_record(bus, r.dataset.name, r.dataset.namespace)
                       for r in (serving, starting, failing)]
            return all(records)

        await eventually(applied, what="the runtimes applied")
        await bus.publish(subjects.agent_heartbeat(sent.node), sent)

        async def mounted(report: MountReport, status: str) -> Any:
            record = await runtime_record(bus, report.dataset.name, report.dataset.namespace)
            found = [c for c in record.status.conditions if c.type == "Mounted"] if record else []
            return record if record and record.status.ready_nodes == ["node-big"] and found \
                and found[0].status == status else None

        record = await eventually(lambda: mounted(serving, "True"), what="the serving mount's runtime Mounted")
        assert record.status.phase == "Ready" and record.status.workers[0].peer_url == serving.peer_url
        record = await eventually(lambda: mounted(starting, "False"), what="the starting mount's runtime")
        assert record.status.conditions[-1].reason == "MountStarting"
        record = await eventually(lambda: mounted(failing, "False"), what="the failing mount's runtime")
        assert "node-big: mount process exited with code 1" in record.status.conditions[-1].message
        # The record the dataset service and the scheduler read back holds every mount.
        stored, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), "node-big", AgentRecord)
        assert stored is not None and stored.heartbeat.mount_count() == 5000
        assert stored.heartbeat.mount_of(failing.dataset.namespace, failing.dataset.name) == failing


async def test_read_failures_at_times_no_calendar_shows_still_make_a_status(bus: Bus, settings: Settings) -> None:
    # A node whose read failures carry times out of any calendar's range (nanoseconds sent as seconds, a broken
    # clock): the status is still worked out and written, the times shown as numbers. Formatting them raised, and
    # every refresh of the runtime failed for as long as the node's record lived (its status stuck as it was).
    failures = [MountReadFailures(dataset=ObjectRef(name="odd"), files=[
        ReadFailure(path="/a.bin", errno="EIO", reason="the object store failed: 503", since=-1e20, at=1.7e18)])]
    async with running(lambda stop: runtime_app.run(settings, stop)):
        await put_unsynced_dataset(bus, "odd")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name="odd"), spec=(
            RuntimeSpec(replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")]))))))
        await eventually(lambda: runtime_record(bus, "odd"), what="the runtime applied")
        await bus.publish(subjects.agent_heartbeat("node-odd"), AgentHeartbeat(
            node="node-odd", runtimes=[ObjectRef(name="odd")], interval_seconds=3600.0, read_failures=failures))

        async def failing() -> Any:
            record = await runtime_record(bus, "odd")
            found = [c for c in record.status.conditions if c.type == "ReadsFailing"] if record else []
            return found[0] if found and record and record.status.phase == "Ready" else None

        condition = await eventually(failing, what="the runtime Ready with its ReadsFailing condition")
        assert condition.reason == "StoreError"
        assert condition.message.startswith("node-odd: 1 failed read(s) since -100000000000000000000, ")
        assert "the last at 1700000000000000000 " in condition.message


@pytest.mark.timeout(180)
async def test_the_status_fact_of_a_runtime_served_by_3000_agents_stays_under_the_event_limit(
        bus: Bus, settings: Settings) -> None:
    # 3,000 agents of 60-character names, one readyNodes and one notPicked entry each: the fact was about 400 KB,
    # which the dataset service refuses (SHOAL_MAX_EVENT_BYTES), so the dataset never followed its runtime.
    nodes = [f"ip-10-{i // 250}-{i % 250}.node-pool-with-a-long-name.eu-west-1.compute.internal" for i in range(3000)]
    agents = await bus.kv(subjects.KV_AGENTS)
    now = time.time()
    for node in nodes:
        await agents.put(node, msgspec.json.encode(AgentRecord(received_at=now, heartbeat=AgentHeartbeat(
            node=node, runtimes=[ObjectRef(name="many")], interval_seconds=3600.0, sent_at=now))))
    sizes: list[int] = []

    async def collect(msg: Any) -> None:
        sizes.append(len(msg.data))

    subscription = await bus.nc.subscribe(subjects.RUNTIME_STATUS, cb=collect)
    async with running(lambda stop: runtime_app.run(settings, stop)):
        await put_unsynced_dataset(bus, "many")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name="many"), spec=(
            RuntimeSpec(replicas=3, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")]))))))

        async def ready() -> Any:
            record = await runtime_record(bus, "many")
            return record if record and len(record.status.ready_nodes) == len(nodes) else None

        record = await eventually(ready, timeout=120, what="the runtime Ready on 3000 agents")
        await bus.nc.flush()
    await subscription.unsubscribe()
    assert sizes and max(sizes) <= settings.service.max_event_bytes, sizes
    # The record keeps every ready node (the loader plans and cleans on them) and counts those it does not list.
    assert record.status.phase == "Ready" and record.status.ready_nodes == sorted(nodes)
    assert record.status.ready_node_count == len(nodes) and record.status.not_picked_count == len(nodes) - 3


STALE = "the object changed or was deleted since the dataset was synced (resync it): ..."
CLIMBING_BEATS = 30


@pytest.mark.timeout(120)
async def test_reads_failing_on_and_on_write_the_runtime_status_only_when_what_matters_changes(
        bus: Bus, settings: Settings) -> None:
    """A node whose mount keeps failing reads: each heartbeat carries a higher count and a later time. The
    ``ReadsFailing`` message changed at every beat, and each cost a runtime status write and fact (and a dataset
    record write): 30 beats made 30 facts. Now the count and times are written at most once a minute, while a
    second failing node and a new reason show at once, the transition time stays, and the condition goes when the
    failures stop."""
    ref = ObjectRef(name="churn")
    start = time.time()
    facts = FactCollector()
    await facts.start(bus, subjects.RUNTIME_STATUS)
    published = 0

    async def beat(node: str, count: int, errno: str = "ESTALE", reason: str = STALE) -> None:
        nonlocal published
        files = [ReadFailure(path="/model.bin", errno=errno, reason=reason, count=count, since=start,
                             at=start + count)] if count else []
        await bus.publish(subjects.agent_heartbeat(node), AgentHeartbeat(
            id=f"{node}-{published}", node=node, runtimes=[ref], interval_seconds=3600.0,
            read_failures=[MountReadFailures(dataset=ref, files=files)] if files else []))
        published += 1

    async def reads_failing(*needles: str) -> Any:
        record = await runtime_record(bus, "churn")
        found = [c for c in record.status.conditions if c.type == "ReadsFailing"] if record else []
        return found[0] if found and all(needle in found[0].message for needle in needles) else None

    def status_facts() -> int:
        return len(facts.of_type("runtime.status.v1", name="churn"))

    async with running(lambda stop: runtime_app.run(settings, stop)):
        await put_unsynced_dataset(bus, "churn")
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name="churn"), spec=(
            RuntimeSpec(replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")]))))))
        await eventually(lambda: runtime_record(bus, "churn"), what="the runtime applied")
        await beat("node-a", 1)
        first = await eventually(lambda: reads_failing("node-a: 1 failed read(s)"), what="ReadsFailing shown")
        await eventually(lambda: _consumed(bus, published), what="the first heartbeat handled")
        await bus.nc.flush()
        before = status_facts()
        for count in range(2, 2 + CLIMBING_BEATS):
            await beat("node-a", count)
        await eventually(lambda: _consumed(bus, published), 60, "the climbing heartbeats handled")
        await bus.nc.flush()
        # None, or one if a minute went by meanwhile (a slow machine) and the counts were brought up to date.
        assert status_facts() - before <= 1, [f["status"]["conditions"] for f in facts.of_type("runtime.status.v1")]

        # A second node failing, and a new reason, show at once: not at the next minute's refresh.
        await beat("node-b", 1)
        both = await eventually(lambda: reads_failing("node-a: ", "; node-b: 1 failed read(s)"), timeout=30,
                                what="the second failing node shown")
        assert both.last_transition_time == first.last_transition_time
        await beat("node-a", 100, errno="EIO", reason="the object store failed: 503")
        await eventually(lambda: reads_failing("node-a: 100 failed read(s)", "EIO: the object store failed: 503"),
                         timeout=30, what="node-a's new reason shown")

        await beat("node-a", 0)
        await beat("node-b", 0)

        async def cleared() -> bool:
            record = await runtime_record(bus, "churn")
            return record is not None and not any(c.type == "ReadsFailing" for c in record.status.conditions)

        await eventually(cleared, timeout=30, what="ReadsFailing gone once no node reports failures")


async def test_a_stop_before_the_mirrors_are_filled_ends_promptly_and_keeps_the_heartbeat(
        bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat waiting in the stream while the service's KV mirrors have not delivered their initial values
    (held here): a stop ends the service at once (a handler waited for the mirrors, where a stop could not reach
    it), and the heartbeat is left for the next start, not taken and dropped."""
    await bus.publish(subjects.agent_heartbeat("node-held"), AgentHeartbeat(node="node-held", interval_seconds=3600.0))

    async def held(self: KvMirror[Any]) -> None:
        await self._stopping.wait()

    monkeypatch.setattr(KvMirror, "run", held)
    readiness = Readiness()
    stop = asyncio.Event()
    task = asyncio.create_task(runtime_app.run(settings, stop, readiness=readiness))
    try:
        await eventually(lambda: _checks(readiness, "loops"), what="the service's loops running", timeout=20)
        assert "catching up" in readiness.report()[1]["watches"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    monkeypatch.undo()
    async with running(lambda stop: runtime_app.run(settings, stop)):
        agents = await bus.kv(subjects.KV_AGENTS)

        async def taken() -> AgentRecord | None:
            return (await kv_load(agents, "node-held", AgentRecord))[0]

        record = await eventually(taken, what="the held heartbeat taken")
        assert record.heartbeat.node == "node-held"


async def _checks(readiness: Readiness, name: str) -> bool:
    return name in readiness.checks


async def test_two_runtimes_whose_tiers_share_a_nodes_disk_do_not_both_pick_it(bus: Bus, settings: Settings) -> None:
    """Two Shared runtimes of 30Gi each, on one 50Gi disk of the only node: each was weighed alone, and the node
    became the worker of both, whose tiers then fill its disk. The runtime service sums the quotas per device
    (``TierDisk.device``), those of the runtimes whose worker the node already is included: the first keeps it,
    the second says why it does not take it."""
    disks = [TierDisk(path=f"/mnt/{name}", size_bytes=50 * 2**30, device=5) for name in ("first", "second")]
    beat = AgentHeartbeat(node="node-a", all_runtimes=True, interval_seconds=3600.0, tier_disks=disks,
                          tier_disks_complete=True)
    async with running(lambda stop: runtime_app.run(settings, stop)):
        for name in ("first", "second"):
            dataset = unsynced_dataset(name)
            shared = msgspec.structs.replace(dataset, dataset=msgspec.structs.replace(
                dataset.dataset, spec=msgspec.structs.replace(dataset.dataset.spec, placement="Shared")))
            await kv_save(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", name), shared, None)
        await bus.publish(subjects.agent_heartbeat("node-a"), beat)
        agents = await bus.kv(subjects.KV_AGENTS)

        async def recorded() -> AgentRecord | None:
            return (await kv_load(agents, "node-a", AgentRecord))[0]

        await eventually(recorded, 15, "the agent's record")
        for name in ("first", "second"):
            tiers = TieredStore(levels=[Level(mediumtype="SSD", quota="30Gi", path=f"/mnt/{name}")])
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
                metadata=ObjectMeta(name=name), spec=RuntimeSpec(tieredstore=tiers))))

            async def decided(name: str = name) -> Any:
                record = await runtime_record(bus, name)
                return record if record is not None and (record.status.workers or record.status.not_picked) else None

            await eventually(decided, 15, f"runtime {name} deciding on node-a")
        first, second = await runtime_record(bus, "first"), await runtime_record(bus, "second")
        assert first is not None and second is not None
        assert [worker.node for worker in first.status.workers] == ["node-a"] and second.status.workers == []
        assert second.status.not_picked[0].reason == (
            "spec.tieredstore.levels[0] gives /mnt/second a quota of 30.00GiB, on one file system with /mnt/first "
            "(runtime default/first, whose worker this node is, 30.00GiB): 60.00GiB in all, more than that file "
            "system on this node (50.00GiB): lower the quotas, or give them a larger disk or disks apart")
