"""An agent whose wall clock is hours off (issue 15, point 2), on a real nats-server: the real node agent runs
in-process with its clock skewed (``services.agent.app.run(clock=...)``, stamped on its heartbeats as ``sentAt``)
next to the real runtime service.

Freshness is judged by the time JetStream stored each beat, never by the agent's stamp, so: with the agent's clock
three hours ahead, then a day behind, the runtime stays Ready the whole time (not one NotReady
status in between); and once the agent stops beating the runtime goes NotReady (its last beats stamped three hours
ahead) after three missed intervals and the service's sweep, not three hours late.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgspec

from libs import subjects
from libs.bus import Bus
from libs.config import AgentSettings, Settings
from libs.events.common import ObjectMeta
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from services.agent import app as agent_app
from services.runtime import app as runtime_app
from tests.helpers import FactCollector, eventually, running, runtime_record
from tests.reliability import record_fault

NODE = "skewed-node"
HOUR = 3600.0
INTERVAL = 0.3  # the agent's heartbeat; the runtime counts a node out after three missed ones


class SkewedClock:
    """The wall clock plus ``offset`` seconds, settable while the agent runs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_an_agent_clock_hours_off_neither_flaps_its_runtime_nor_moves_its_expiry(
        bus: Bus, settings: Settings) -> None:
    clock = SkewedClock()
    clock.offset = 3 * HOUR
    agent = AgentSettings(node_name=NODE, heartbeat_seconds=INTERVAL)
    node_settings = dataclasses.replace(settings, agent=agent)
    beats: list[float] = []

    async def collect(msg: Any) -> None:
        beats.append(msgspec.json.decode(msg.data)["sentAt"])

    await bus.nc.subscribe(subjects.agent_heartbeat(NODE), cb=collect)
    facts = FactCollector()
    await facts.start(bus)
    runtime = Runtime(metadata=ObjectMeta(name="skew"),
                      spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="64Mi")])))

    async def phase() -> str:
        record = await runtime_record(bus, "skew")
        return record.status.phase if record else ""

    agent_stop = asyncio.Event()
    async with running(lambda stop: runtime_app.run(node_settings, stop)):
        agent_task = asyncio.create_task(agent_app.run(node_settings, agent_stop, clock=clock))
        try:
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))

            async def ready() -> bool:
                return await phase() == "Ready"

            await eventually(ready, what="the runtime Ready with the agent three hours ahead")
            for offset in (3 * HOUR, -24 * HOUR):
                clock.offset = offset
                seen = len(beats)

                async def beats_at_offset(seen: int = seen, offset: float = offset) -> bool:
                    stamped = [stamp - time.time() for stamp in beats[seen:]]
                    return sum(1 for skew in stamped if abs(skew - offset) < 60) >= 4

                # Four beats at this skew: more than the three intervals after which a stale node would be dropped.
                await eventually(beats_at_offset, what=f"four heartbeats stamped {offset / HOUR:+.0f} h off")
                assert await phase() == "Ready"
            phases = [fact["status"]["phase"] for fact in facts.of_type("runtime.status.v1", name="skew")]
            first_ready = phases.index("Ready")
            assert set(phases[first_ready:]) == {"Ready"}, f"the runtime flapped: {phases}"

            # Its last beats three hours ahead: judged by their stamps, the node would stay fresh three hours more.
            clock.offset = 3 * HOUR
            seen = len(beats)

            async def ahead() -> bool:
                return len(beats) > seen + 1

            await eventually(ahead, what="beats three hours ahead")
        finally:
            agent_stop.set()
            await asyncio.wait_for(agent_task, 30)
        stopped = time.monotonic()

        async def not_ready() -> bool:
            return await phase() == "NotReady"

        # Three missed 0.3 s beats, then the service's 2 s sweep: a few seconds, far from three hours.
        await eventually(not_ready, timeout=10, what="NotReady once the skewed agent stopped beating")
        expired = time.monotonic() - stopped
    record_fault("an agent's clock 3 h ahead, then 24 h behind, then 3 h ahead again (its heartbeats stamped so)",
                 "the runtime stays Ready throughout (no NotReady status); after the agent stops it goes NotReady "
                 "on the receipt times, as for any node", expired, area="agents")
