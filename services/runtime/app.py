"""Runtime service wiring.

| stream | subject | handler |
|---|---|---|
| SHOAL_COMMANDS | shoal.cmd.runtime.* (apply, scale, delete) | RuntimeHandlers.on_command |
| SHOAL_AGENT | shoal.agent.heartbeat.* | RuntimeHandlers.on_heartbeat |
| KV shoal_agents | every key (watch) | the in-memory view of agents' last heartbeats (``KvMirror``) |
| KV shoal_datasets | every key (watch) | whether each runtime's Dataset exists, its nodeAffinity and placement |
| KV shoal_runtimes | every key (watch) | the other runtimes' cache workers (Exclusive placement) |
| (timer) | every 2 s | RuntimeHandlers.refresh_all |
| (timer) | every 0.25 s | RuntimeHandlers.check_placements (a Dataset's placement changed, workers moved) |
| (timer) | every 0.25 s | RuntimeHandlers.export_gauges (runtimes by phase, workers per runtime) |
| (timer) | every 1 s | RuntimeHandlers.autoscale_all (the elastic cache: spec.autoscaling) |
| (timer) | every 10 min | MarkerSweeper (libs.markers): delete markers older than a week in shoal_runtimes |

Ready (``/readyz``) when connected to NATS, the consumers, the watches and the timers run, and the watches have
caught up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from libs import metrics, subjects
from libs.bus import Consumer, KvMirror, connect
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.dataset import DatasetRecord
from libs.events.runtime import RuntimeCommand, RuntimeRecord
from libs.markers import MARKER_SWEEP_SECONDS, RUNTIME_SWEEP, MarkerSweeper
from libs.members import Members
from libs.service import Periodic, StartsWhen, nats_check, run_loops
from libs.side_server import Readiness
from services.runtime.handlers import (
    AUTOSCALE_SECONDS,
    GAUGE_SECONDS,
    PLACEMENT_CHECK_SECONDS,
    TICK_SECONDS,
    RuntimeHandlers,
)

SERVICE_NAME = "shoal-runtime"


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time,
              readiness: Readiness | None = None) -> None:
    readiness = readiness or Readiness()
    bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        agents = KvMirror(await bus.kv(subjects.KV_AGENTS), AgentRecord, bus.reconnects)
        datasets = KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord, bus.reconnects)
        runtimes = KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord, bus.reconnects)
        watches: dict[str, KvMirror[Any]] = {"agents": agents, "datasets": datasets, "runtimes": runtimes}
        readiness.add("watches", lambda: ", ".join(f"{name} watch catching up" for name, mirror in watches.items()
                                                   if not mirror.ready.is_set()) or None)
        handlers = RuntimeHandlers(bus, agents, datasets, runtimes, clock)
        # Both directions from the start, at 0, so a rate over them is 0 rather than absent (the dashboards).
        for direction in (metrics.SCALE_UP, metrics.SCALE_DOWN):
            metrics.RUNTIME_AUTOSCALES.labels(direction)
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
        placements = Periodic("placement check", handlers.check_placements, PLACEMENT_CHECK_SECONDS)
        gauges = Periodic("gauges", handlers.export_gauges, GAUGE_SECONDS)
        autoscaler = Periodic("autoscaler", handlers.autoscale_all, AUTOSCALE_SECONDS)
        markers = Periodic("old delete markers", MarkerSweeper(bus, RUNTIME_SWEEP).tick, MARKER_SWEEP_SECONDS)
        # Its beat says the largest command it takes, which the CLI sizes commands by (nothing else reads it here).
        members = Members(await bus.kv(subjects.KV_MEMBERS), subjects.MEMBERS_RUNTIME, settings.service.replica_name,
                          reconnects=bus.reconnects, max_event_bytes=max_bytes)
        # What reads the mirrors starts once they hold their initial values (it would otherwise wait for them
        # inside a handler or tick, where a stop cannot reach it).
        mirrored = (agents.ready, datasets.ready, runtimes.ready)
        await run_loops([agents, datasets, runtimes, *(StartsWhen(loop, *mirrored) for loop in
                                                      (commands, heartbeats, ticker, placements, autoscaler)), gauges,
                         markers, members],
                        stop, readiness)
    finally:
        await bus.close()
