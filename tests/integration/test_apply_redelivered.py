"""An apply delivered again after its record was saved answers what its first delivery decided, on a real
nats-server: the first delivery's ``accepted`` fact is lost (its publish times out, as in a NATS failover, so
JetStream delivers the command again), and the second delivery finds its own change in the record. Recomputed, the
answer would be ``unchanged`` and ``shoal apply`` would print that for an object the command created.

Each test drives a service's handlers directly, with the stream sequence of the test's choosing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest

from libs import subjects
from libs.bus import Bus, Delivery
from libs.events.agent import AgentRecord
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.operation import DataLoad, DataLoadApply, DataLoadSpec, DatasetRef, OperationRecord
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeRecord, RuntimeScale, RuntimeSpec, TieredStore
from services.dataset.handlers import DatasetHandlers
from services.loader import domain as loader_domain
from services.loader.handlers import LoaderHandlers
from services.runtime.handlers import RuntimeHandlers
from tests.conftest import NatsServer
from tests.helpers import FactCollector, make_settings, unwatched_mirror


def at(subject: str, sequence: int) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=1, stream_sequence=sequence)


def lose_accepted_once(monkeypatch: pytest.MonkeyPatch, subject: str, command_id: str) -> list[str]:
    """Make the first publish of ``command_id``'s accepted fact on ``subject`` time out; returns what was lost."""
    real_publish = Bus.publish
    lost: list[str] = []

    async def publish(self: Bus, to: str, event: msgspec.Struct, **kwargs: Any) -> Any:
        if to == subject and getattr(event, "causation_id", "") == command_id and not lost:
            lost.append(to)
            raise nats.errors.TimeoutError
        return await real_publish(self, to, event, **kwargs)

    monkeypatch.setattr(Bus, "publish", publish)
    return lost


async def test_a_dataset_apply_delivered_again_after_its_save_still_says_created(
        nats_server: NatsServer, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await bus.provision()
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    folder = tmp_path / "ds"
    folder.mkdir()
    command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="ds"),
                                           spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")])))
    facts = FactCollector()
    await facts.start(bus)
    lost = lose_accepted_once(monkeypatch, subjects.DATASET_ACCEPTED, command.id)
    with pytest.raises(nats.errors.TimeoutError):
        await handlers.apply(command, at(subjects.DATASET_APPLY, 7))
    assert lost  # the record is saved, its fact is not out
    await handlers.apply(command, at(subjects.DATASET_APPLY, 7))  # JetStream delivers it again
    accepted = await facts.wait_for("dataset.accepted.v1", causationId=command.id)
    assert accepted["result"] == "created", accepted
    # A later apply of the same spec is a command of its own: unchanged.
    again = DatasetApply(dataset=command.dataset)
    await handlers.apply(again, at(subjects.DATASET_APPLY, 9))
    accepted = await facts.wait_for("dataset.accepted.v1", causationId=again.id)
    assert accepted["result"] == "unchanged", accepted


async def test_a_runtime_apply_and_a_scale_delivered_again_say_what_they_did(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    await bus.provision()
    handlers = RuntimeHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_AGENTS), AgentRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                               unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))
    apply = RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name="rt"), spec=RuntimeSpec(
        replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="64Mi")]))))
    scale = RuntimeScale(name="rt", replicas=2)
    facts = FactCollector()
    await facts.start(bus)
    for command, subject, sequence, said in ((apply, subjects.RUNTIME_APPLY, 3, "created"),
                                             (scale, subjects.RUNTIME_SCALE, 4, "configured")):
        lost = lose_accepted_once(monkeypatch, subjects.RUNTIME_ACCEPTED, command.id)
        with pytest.raises(nats.errors.TimeoutError):
            await handlers.on_command(command, at(subject, sequence))
        assert lost
        await handlers.on_command(command, at(subject, sequence))
        accepted = await facts.wait_for("runtime.accepted.v1", causationId=command.id)
        assert accepted["result"] == said, (command, accepted)


async def test_a_dataload_apply_delivered_again_after_its_save_still_says_created(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    await bus.provision()
    handlers = LoaderHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_OPERATION_RUNS), loader_domain.RunState),
                              unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))
    command = DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name="warm"),
                                               spec=DataLoadSpec(dataset=DatasetRef(name="data"))))
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    lost = lose_accepted_once(monkeypatch, subjects.DATALOAD_ACCEPTED, command.id)
    with pytest.raises(nats.errors.TimeoutError):
        await handlers.on_command(command, at(subjects.DATALOAD_APPLY, 5))
    assert lost
    await handlers.on_command(command, at(subjects.DATALOAD_APPLY, 5))
    accepted = await facts.wait_for("operation.accepted.v1", causationId=command.id)
    assert accepted["result"] == "created", accepted
