"""Placement changed on a live runtime, on a real nats-server: the other runtimes' picks follow at once (the
placement check), not at the next tick, and a runtime turned Exclusive keeps its workers while the Shared ones
let them go. Drives ``RuntimeHandlers`` directly, so every refresh is the test's."""

from __future__ import annotations

import msgspec

from libs import subjects
from libs.bus import Bus, Delivery
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import DatasetRecord
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeRecord, RuntimeSpec, TieredStore
from services.runtime.handlers import RuntimeHandlers
from tests.helpers import runtime_record, unsynced_dataset, unwatched_mirror

NOW = 1_700_000_000.0


def runtime(name: str, replicas: int) -> Runtime:
    return Runtime(metadata=ObjectMeta(name=name), spec=RuntimeSpec(
        replicas=replicas, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))


def dataset(name: str, placement: str) -> DatasetRecord:
    record = unsynced_dataset(name)
    spec = msgspec.structs.replace(record.dataset.spec, placement=placement)
    return msgspec.structs.replace(record, dataset=msgspec.structs.replace(record.dataset, spec=spec))


async def workers(bus: Bus, name: str) -> list[str]:
    record = await runtime_record(bus, name)
    assert record is not None
    return [worker.node for worker in record.status.workers]


async def test_a_placement_changed_live_moves_the_others_at_once_and_keeps_its_own_workers(bus: Bus) -> None:
    handlers = RuntimeHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord),
                               clock=lambda: NOW)
    for node in ("n1", "n2"):
        beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name="a"), ObjectRef(name="b")], interval_seconds=60.0)
        handlers.agents.values[node] = AgentRecord(heartbeat=beat, received_at=NOW)
    handlers.datasets.values["default.a"] = dataset("a", "Exclusive")
    handlers.datasets.values["default.b"] = dataset("b", "Shared")
    for sequence, (name, replicas) in enumerate((("a", 1), ("b", 2)), start=1):
        await handlers.apply(RuntimeApply(runtime=runtime(name, replicas)),
                             Delivery(subject=subjects.RUNTIME_APPLY, headers={}, deliveries=1,
                                      stream_sequence=sequence))
    await handlers.check_placements()
    assert (await workers(bus, "a"), await workers(bus, "b")) == (["n1"], ["n2"])  # n1 is a's alone

    # a's Dataset is re-applied Shared: its worker may now serve b as well. One placement check, no tick.
    handlers.datasets.values["default.a"] = dataset("a", "Shared")
    await handlers.check_placements()
    assert (await workers(bus, "a"), await workers(bus, "b")) == (["n1"], ["n2", "n1"])
    # And back to Exclusive: b lets n1 go (an Exclusive dataset's worker is nobody else's), a keeps it.
    handlers.datasets.values["default.a"] = dataset("a", "Exclusive")
    await handlers.check_placements()
    assert (await workers(bus, "a"), await workers(bus, "b")) == (["n1"], ["n2"])
