"""A runtime service restarted after an outage longer than the agents' records live (their TTL; only this service
writes them) reaches the workers it had, on a real nats-server: the first beats read back do not hand every seat
to whichever agents beat first, which would move the whole ring of block owners."""

from __future__ import annotations

import time

import pytest

from libs import subjects
from libs.bus import Bus
from libs.events.agent import AgentHeartbeat, MountReport
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeRecord, RuntimeSpec, TieredStore
from services.runtime import app as runtime_app
from services.runtime import domain
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings, put_unsynced_dataset, running, runtime_record

NAME = "restarted"


async def beat(bus: Bus, node: str) -> None:
    # A long interval: one beat keeps the agent fresh for the whole test, without a beating loop.
    await bus.publish(subjects.agent_heartbeat(node), AgentHeartbeat(
        node=node, runtimes=[ObjectRef(name=NAME)], interval_seconds=3600.0,
        mounts=[MountReport(dataset=ObjectRef(name=NAME), state="Serving", peer_url=f"http://127.0.0.1:70{node[1:]}")]))


async def settled(bus: Bus, nodes: int, last: str = "") -> RuntimeRecord:
    """The runtime once ``nodes`` agents are ready workers or say why not, ``last`` among them."""
    async def probe() -> RuntimeRecord | None:
        record = await runtime_record(bus, NAME)
        if record is None:
            return None
        seen = {w.node for w in record.status.workers if w.ready} | {n.node for n in record.status.not_picked}
        return record if len(seen) >= nodes and (not last or last in seen) else None

    return await eventually(probe, 15, f"{nodes} agents accounted for")


@pytest.mark.timeout(60)
async def test_a_restart_after_the_agents_records_expired_keeps_the_workers(bus: Bus,
                                                                             nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    await put_unsynced_dataset(bus, NAME)
    async with running(lambda stop: runtime_app.run(settings, stop)):
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name=NAME),
            spec=RuntimeSpec(replicas=2, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))))
        # n2 and n4 come first and become the workers; n1 and n3 join a full set.
        for node in ("n2", "n4"):
            await beat(bus, node)
        await settled(bus, 2)
        for node in ("n1", "n3"):
            await beat(bus, node)
        before = await settled(bus, 4)
    assert [w.node for w in before.status.workers] == ["n2", "n4"]

    # The service is down longer than the records' TTL: the bucket no longer holds them.
    agents = await bus.kv(subjects.KV_AGENTS)
    for node in ("n1", "n2", "n3", "n4"):
        await agents.purge(node)

    # The restarted service's clock starts behind the beats' times, so the test can end its settling period.
    offset = [-domain.AGENT_VIEW_SETTLING_SECONDS / 2]
    async with running(lambda stop: runtime_app.run(settings, stop, clock=lambda: time.time() + offset[0])):
        # The agents beat again, in whatever order, but n4 (a worker) not yet; n5, a new agent, last (beats are
        # handled in stream order, so once n5 is accounted for this service has seen every one).
        for node in ("n1", "n2", "n3", "n5"):
            await beat(bus, node)
        after = await settled(bus, 4, last="n5")
        assert [(w.node, w.ready) for w in after.status.workers] == [("n2", True), ("n4", False)]
        assert after.status.replaced == []
        # n4 did not come back within the settling period: its seat goes to a spare, as a worker silent for the
        # records' TTL would.
        offset[0] = domain.AGENT_VIEW_SETTLING_SECONDS / 2

        async def moved() -> RuntimeRecord | None:
            record = await runtime_record(bus, NAME)
            return record if record is not None and [w.node for w in record.status.workers] == ["n2", "n1"] else None

        await eventually(moved, 15, "n4's seat given to n1")
