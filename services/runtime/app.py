"""Runtime service wiring.

| stream | subject | handler |
|---|---|---|
| SHOAL_COMMANDS | shoal.cmd.runtime.* (apply, delete) | RuntimeHandlers.on_command |
| SHOAL_AGENT | shoal.agent.heartbeat.* | RuntimeHandlers.on_heartbeat |
| (timer) | every 2 s | RuntimeHandlers.refresh_all |
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from libs import subjects
from libs.bus import Consumer, connect
from libs.config import Settings
from libs.events.agent import AgentHeartbeat
from libs.events.runtime import RuntimeCommand
from libs.service import run_loops
from services.runtime.handlers import RuntimeHandlers, Ticker

SERVICE_NAME = "shoal-runtime"


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time) -> None:
    bus = await connect(settings.nats, SERVICE_NAME)
    try:
        await bus.provision()
        handlers = RuntimeHandlers(bus, clock)
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
        await run_loops([commands, heartbeats, Ticker(handlers)], stop)
    finally:
        await bus.close()
