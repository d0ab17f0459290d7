"""Loader service wiring.

| stream | subject | handler |
|---|---|---|
| SHOAL_COMMANDS | shoal.cmd.dataload.*, shoal.cmd.dataclean.* (apply, delete, run) | LoaderHandlers.on_command |
| SHOAL_TASKS | shoal.task.progress.* (TaskProgress from the mount processes) | LoaderHandlers.on_progress |
| KV shoal_operations | every key (watch) | the operations to tick, and runAfter's view of the others |
| KV shoal_datasets | every key (watch) | OnEvent: a dataset synced again |
| KV shoal_operation_runs | every key (watch) | the run states, so a tick reads KV only where there is work |
| KV shoal_runtimes | every key (watch) | whether an executing run's runtime or nodes went, decided in memory |
| (timer) | every 0.25 s | LoaderHandlers.tick (start due runs, resume, fold progress, finish, TTL) |
| (timer) | every 0.25 s | LoaderHandlers.export_gauges (operations by kind and phase, current runs' bytes) |
| (timer) | every 5 s | LoaderHandlers.prune_task_streams (the task streams of nodes gone, with no part waiting) |
| (timer) | once, at start | LoaderHandlers.sweep (run states and plans of operations gone, plans of runs ended) |
| (timer) | every 10 min | MarkerSweeper (libs.markers): delete markers older than a week in its buckets and objects |

Ready (``/readyz``) when connected to NATS, the consumers, the watches and the timer run, and the watches have
caught up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from libs import subjects
from libs.bus import Consumer, KvMirror, connect
from libs.config import Settings
from libs.events.dataset import DatasetRecord
from libs.events.operation import OperationCommand, OperationRecord, TaskProgress
from libs.events.runtime import RuntimeRecord
from libs.markers import LOADER_SWEEP, MARKER_SWEEP_SECONDS, MarkerSweeper
from libs.members import Members
from libs.service import Periodic, nats_check, run_loops
from libs.side_server import Readiness
from services.loader.domain import RunState
from services.loader.handlers import (
    DATASET_WAIT_SECONDS,
    GAUGE_SECONDS,
    METADATA_TIMEOUT_SECONDS,
    NODE_GONE_SECONDS,
    NODE_SILENT_SECONDS,
    RUN_AFTER_WAIT_SECONDS,
    SWEEP_SECONDS,
    TASK_STREAMS_SECONDS,
    TICK_SECONDS,
    LoaderHandlers,
)

SERVICE_NAME = "shoal-loader"


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time,
              readiness: Readiness | None = None, metadata_timeout: float = METADATA_TIMEOUT_SECONDS,
              node_gone_timeout: float = NODE_GONE_SECONDS, node_silent_timeout: float = NODE_SILENT_SECONDS,
              dataset_wait_timeout: float = DATASET_WAIT_SECONDS,
              run_after_wait_timeout: float = RUN_AFTER_WAIT_SECONDS) -> None:
    readiness = readiness or Readiness()
    bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        operations = KvMirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord, bus.reconnects)
        datasets = KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord, bus.reconnects)
        runs = KvMirror(await bus.kv(subjects.KV_OPERATION_RUNS), RunState, bus.reconnects)
        runtimes = KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord, bus.reconnects)
        watches: dict[str, KvMirror[Any]] = {"operations": operations, "datasets": datasets, "runs": runs,
                                             "runtimes": runtimes}
        readiness.add("watches", lambda: ", ".join(f"{name} watch catching up" for name, mirror in watches.items()
                                                   if not mirror.ready.is_set()) or None)
        handlers = LoaderHandlers(bus, operations, datasets, runs, runtimes, clock,
                                  metadata_timeout=metadata_timeout, node_gone_timeout=node_gone_timeout,
                                  node_silent_timeout=node_silent_timeout,
                                  dataset_wait_timeout=dataset_wait_timeout,
                                  run_after_wait_timeout=run_after_wait_timeout)
        max_bytes, max_deliver = settings.service.max_event_bytes, settings.service.max_deliver
        commands = Consumer(
            bus, subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS, list(subjects.OPERATION_COMMANDS),
            msgspec.json.Decoder(OperationCommand), handlers.on_command, on_invalid=handlers.on_invalid_command,
            max_event_bytes=max_bytes, max_deliver=max_deliver,
        )
        progress = Consumer(
            bus, subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS, subjects.TASK_PROGRESS,
            msgspec.json.Decoder(TaskProgress), handlers.on_progress, max_event_bytes=max_bytes,
            max_deliver=max_deliver,
        )
        ticker = Periodic("operation ticker", handlers.tick, TICK_SECONDS)
        gauges = Periodic("gauges", handlers.export_gauges, GAUGE_SECONDS)
        streams = Periodic("task streams", handlers.prune_task_streams, TASK_STREAMS_SECONDS)
        sweep = Periodic("left-over run states", handlers.sweep, SWEEP_SECONDS)
        markers = Periodic("old delete markers", MarkerSweeper(bus, LOADER_SWEEP).tick, MARKER_SWEEP_SECONDS)
        # Its beat says the largest command it takes, which the CLI sizes commands by (nothing else reads it here).
        members = Members(await bus.kv(subjects.KV_MEMBERS), subjects.MEMBERS_LOADER, settings.service.replica_name,
                          reconnects=bus.reconnects, max_event_bytes=settings.service.max_event_bytes)
        await run_loops([operations, datasets, runs, runtimes, commands, progress, ticker, gauges, streams, sweep,
                         markers, members], stop, readiness)
    finally:
        await bus.close()
