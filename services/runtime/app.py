"""Runtime service wiring.

| stream | subject | handler |
|---|---|---|
| SHOAL_COMMANDS | shoal.cmd.runtime.* (apply, delete) | RuntimeHandlers.on_command |
| SHOAL_AGENT | shoal.agent.heartbeat.* | RuntimeHandlers.on_heartbeat |
| KV shoal_agents | every key (watch) | the in-memory view of agents' last heartbeats (``KvMirror``) |
| (timer) | every 2 s | RuntimeHandlers.refresh_all |

Ready (``/readyz``) when connected to NATS, the consumers, the agents watch and the timer run, and the agents
watch has caught up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from libs import subjects
from libs.bus import Consumer, KvMirror, connect
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.runtime import RuntimeCommand
from libs.service import Periodic, nats_check, run_loops
from libs.side_server import Readiness
from services.runtime.handlers import TICK_SECONDS, RuntimeHandlers

SERVICE_NAME = "shoal-runtime"


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time,
              readiness: Readiness | None = None) -> None:
    readiness = readiness or Readiness()
    bus = await connect(settings.nats, SERVICE_NAME)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        agents = KvMirror(await bus.kv(subjects.KV_AGENTS), AgentRecord, bus.reconnects)
        readiness.add("agents watch", lambda: None if agents.ready.is_set() else "agents watch catching up")
        handlers = RuntimeHandlers(bus, agents, clock)
        max_bytes, max_deliver = settings.service.max_event_bytes, settings.service.max_deliver
        commands = Consumer(
            bus, subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS, subjects.RUNTIME_COMMANDS,
            msgspec.json.Decoder(RuntimeCommand), handlers.on_command, on_invalid=handlers.on_invalid_command,
            max_event_bytes=max_bytes, max_deliver=max_deliver,
        )
        heartbeats = Consumer(
            bus, subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS, subjects.AGENT_HEARTBEATS,
            msgspec.json.Decoder(AgentHeartbeat), handlers.on_heartbeat, max_event_bytes=max_bytes,
            max_deliver=max_deliver,
        )
        ticker = Periodic("status ticker", handlers.refresh_all, TICK_SECONDS)
        await run_loops([agents, commands, heartbeats, ticker], stop, readiness)
    finally:
        await bus.close()
