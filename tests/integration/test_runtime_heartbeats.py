"""The runtime service's cost per heartbeat does not grow with the number of agents.

The service runs in-process on a real nats-server; its Bus hands out KV buckets wrapped so every read (get,
keys, history) is counted. With 40 agents beating, a heartbeat must cost no read of the agents bucket at all
(the service keeps an in-memory view fed by a KV watch) and a bounded number of runtime reads.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.agent import AgentHeartbeat
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from services.runtime import app as runtime_app
from tests.helpers import eventually, running, runtime_record

AGENTS = 40
READS = ("get", "keys", "history")


class CountingKv:
    """A KeyValue that counts its reads, by bucket, into a shared Counter."""

    def __init__(self, kv: Any, bucket: str, reads: Counter[str]) -> None:
        self._kv = kv
        self._bucket = bucket
        self._reads = reads

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._kv, name)
        if name not in READS:
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._reads[self._bucket] += 1
            return await attribute(*args, **kwargs)

        return counted


def counting_connect(reads: Counter[str]) -> Any:
    real_connect = runtime_app.connect

    async def connect(settings: Any, name: str) -> Bus:
        bus = await real_connect(settings, name)
        real_kv = bus.kv

        async def kv(bucket: str) -> Any:
            return CountingKv(await real_kv(bucket), bucket, reads)

        bus.kv = kv  # type: ignore[method-assign]
        return bus

    return connect


@pytest.mark.timeout(120)
async def test_a_heartbeat_reads_no_agent_records_whatever_the_number_of_agents(
        bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: Counter[str] = Counter()
    monkeypatch.setattr(runtime_app, "connect", counting_connect(reads))
    runtime = Runtime(metadata=ObjectMeta(name="wide"), spec=RuntimeSpec(
        replicas=AGENTS, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))
    serves = [ObjectRef(name="wide")]
    async with running(lambda stop: runtime_app.run(settings, stop)):
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


async def _consumed(bus: Bus, count: int) -> bool:
    info = await bus.js.consumer_info(subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS)
    return info.ack_floor.stream_seq >= count and info.num_ack_pending == 0 and info.num_pending == 0
