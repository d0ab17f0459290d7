"""Kubernetes node names with dots (EKS's ``ip-10-0-1-23.ec2.internal``, any cluster whose nodes are named by
their FQDN), on a real nats-server: the deployed agent takes its name from ``spec.nodeName``, and that name must
reach the runtime as it is (the scheduler answers with it, ``kubernetes.io/hostname`` is matched against it),
while the subjects it beats and reports on still carry it as a single token."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import AgentSettings, Settings
from libs.events.common import ObjectMeta
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from services.agent import app as agent_app
from services.runtime import app as runtime_app
from tests.helpers import eventually, put_unsynced_dataset, running, runtime_record

NODE = "ip-10-0-1-23.ec2.internal"


@pytest.mark.timeout(60)
async def test_an_agent_on_a_node_named_with_dots_makes_its_runtime_ready(bus: Bus, settings: Settings) -> None:
    node_settings = dataclasses.replace(settings, agent=AgentSettings(node_name=NODE, heartbeat_seconds=0.3))
    runtime = Runtime(metadata=ObjectMeta(name="eks"),
                      spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="64Mi")])))
    agent_stop = asyncio.Event()
    async with running(lambda stop: runtime_app.run(settings, stop)):
        agent = asyncio.create_task(agent_app.run(node_settings, agent_stop))
        try:
            await put_unsynced_dataset(bus, "eks")  # a runtime picks cache workers for its Dataset only
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))

            async def ready() -> bool:
                record = await runtime_record(bus, "eks")
                return record is not None and record.status.phase == "Ready"

            await eventually(ready, what="the runtime Ready on the agent's heartbeats")
            record = await runtime_record(bus, "eks")
            assert record is not None
            assert record.status.ready_nodes == [NODE]
            assert [worker.node for worker in record.status.workers] == [NODE]
        finally:
            agent_stop.set()
            await asyncio.wait_for(agent, 30)
