"""Dataset service wiring: which subject goes to which handler, plus the metadata-sync reconciler.

| stream / bucket | subject or key | handler |
|---|---|---|
| SHOAL_COMMANDS | shoal.cmd.dataset.* (apply, delete) | DatasetHandlers.on_command |
| SHOAL_FACTS | shoal.evt.runtime.> (status, deleted; accepted: sync policy) | DatasetHandlers.on_runtime_fact |
| SHOAL_AGENT | shoal.agent.inventory.* (snapshots, deltas) | DatasetHandlers.on_inventory |
| SHOAL_FACTS | shoal.evt.scheduler.dataset.cache (bytes cached, each block once) | DatasetHandlers.on_scheduler_cache |
| KV shoal_datasets | every key (watch) | DatasetHandlers.sync via Reconciler (autoSync: again after its period); |
| | | the gauges (DatasetCensus); WatchedRecords |
| KV shoal_datasets | a key that changed or went (same watch) | its references reconciled (ReferenceIndex) |
| KV shoal_dataset_bindings | every key (watch) | WatchedBindings: what applies, syncs, inventory read |
| KV shoal_runtimes | every key (watch) | WatchedPolicies: the runtimes' metadataSyncPolicy (a change wakes) |
| KV shoal_members | dataset.* (watch; this replica's beat) | Members: which replicas split the syncs |
| KV shoal_agents | every key (watch) | the agents' last beats: DatasetHandlers.forget_departed_nodes |
| (timer) | every 10 s | DatasetHandlers.forget_departed_nodes (cache figures of nodes gone, datasets it owns) |
| (timer) | every 10 min | MarkerSweeper (libs.markers), one replica: week-old markers of its buckets, manifests |
| (timer) | every 10 min | DatasetHandlers.retire_deleted_bindings: deleted runtimes' old bindings made markers |

Replicas (each with its own SHOAL_REPLICA_NAME) share the four consumers and split the reconciler's keys
(``libs.members``): each dataset is listed by one replica, and a replica that goes away hands its datasets over.

Ready (``/readyz``) when connected to NATS and the consumers and the reconciler's watch run.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import msgspec
from nats.js.kv import KeyValue

from libs import metrics, subjects
from libs.bus import MESSAGE_LIMIT, Consumer, KvMirror, Replay, connect
from libs.config import Settings
from libs.events.agent import AgentRecord, AnyInventory
from libs.events.dataset import DatasetCommand
from libs.events.runtime import RuntimeFact
from libs.events.schedule import DatasetCacheObserved
from libs.markers import DATASET_SWEEP, MARKER_SWEEP_SECONDS, MarkerSweeper
from libs.members import Members
from libs.reconcile import Reconciler
from libs.service import Periodic, StartsWhen, nats_check, run_loops
from libs.side_server import Readiness
from libs.ufs import S3Clients, open_store
from services.dataset.census import DatasetCensus
from services.dataset.handlers import DatasetHandlers
from services.dataset.lanes import dataset_lane
from services.dataset.references import ReferenceIndex
from services.dataset.sync import StoreOpener
from services.dataset.watched import WatchedBindings, WatchedPolicies

SERVICE_NAME = "shoal-dataset"
REPLICAS_OF = subjects.MEMBERS_DATASET  # this service's replicas' keys in shoal_members
# Messages fetched, and handled at once in per-dataset lanes (services.dataset.lanes): a burst of thousands of
# applies moves 256 datasets at a time; well within max_ack_pending (1000). A fetch's messages stay this replica's
# while they wait their turn (``libs.bus.Consumer``'s working-acks), however long it takes past the ack wait.
LANE_BATCH = 256
# How often the datasets' statuses are searched for nodes whose agent is gone (a node is gone a minute after its
# last beat, ``AGENTS_TTL_SECONDS``; this only bounds how much later its figures leave).
DEPARTED_NODES_SECONDS = 10.0


async def run(settings: Settings, stop: asyncio.Event, clock: Callable[[], float] = time.time,
              opener: StoreOpener | None = None, readiness: Readiness | None = None) -> None:
    readiness = readiness or Readiness()
    # Every sync of an S3 dataset opens a store; they share their location's client rather than make one each.
    s3_clients = S3Clients()
    if opener is None:
        opener = functools.partial(open_store, s3_clients=s3_clients)
    bus = await connect(settings.nats, SERVICE_NAME, stop=stop)
    readiness.add("nats", nats_check(bus))
    try:
        await bus.provision()
        references = ReferenceIndex()
        bindings = WatchedBindings(await bus.kv(subjects.KV_BINDINGS), bus.reconnects)
        policies = WatchedPolicies(await bus.kv(subjects.KV_RUNTIMES), bus.reconnects)
        agents = KvMirror(await bus.kv(subjects.KV_AGENTS), AgentRecord, bus.reconnects)
        handlers = DatasetHandlers(bus, settings, clock, opener, references=references, bindings=bindings,
                                   policies=policies, agents=agents)
        max_bytes, max_deliver = settings.service.max_event_bytes, settings.service.max_deliver
        commands = Consumer(
            bus, subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS, subjects.DATASET_COMMANDS,
            msgspec.json.Decoder(DatasetCommand), handlers.on_command, on_invalid=handlers.on_invalid_command,
            max_event_bytes=max_bytes, max_deliver=max_deliver, batch=LANE_BATCH, lane_of=dataset_lane,
        )
        runtime_facts = Consumer(
            bus, subjects.STREAM_FACTS, subjects.DURABLE_DATASET_RUNTIME_STATUS, subjects.RUNTIME_FACTS,
            msgspec.json.Decoder(RuntimeFact), handlers.on_runtime_fact, max_event_bytes=max_bytes,
            max_deliver=max_deliver, batch=LANE_BATCH, lane_of=dataset_lane,
        )
        inventory = Consumer(
            bus, subjects.STREAM_AGENT, subjects.DURABLE_DATASET_INVENTORY, subjects.AGENT_INVENTORY,
            msgspec.json.Decoder(AnyInventory), handlers.on_inventory, max_event_bytes=MESSAGE_LIMIT,
            max_deliver=max_deliver, batch=LANE_BATCH, lane_of=dataset_lane,
        )
        scheduler_cache = Consumer(
            bus, subjects.STREAM_FACTS, subjects.DURABLE_DATASET_SCHEDULER_CACHE, subjects.SCHEDULER_DATASET_CACHE,
            msgspec.json.Decoder(DatasetCacheObserved), handlers.on_scheduler_cache, max_event_bytes=max_bytes,
            max_deliver=max_deliver, batch=LANE_BATCH, lane_of=dataset_lane,
        )
        census = DatasetCensus()
        # Every outcome from the start, at 0, so a rate over it is 0 rather than absent (the dashboards).
        for outcome in (metrics.AUTOSYNC_CHANGED, metrics.AUTOSYNC_UNCHANGED, metrics.SYNC_FAILED):
            metrics.DATASET_AUTOSYNCS.labels(outcome)

        def observe(entry: KeyValue.Entry | Replay | None) -> None:
            census.observe(entry)
            references.observe(entry)
            handlers.observe(entry)

        members = Members(await bus.kv(subjects.KV_MEMBERS), REPLICAS_OF, settings.service.replica_name,
                          reconnects=bus.reconnects, max_event_bytes=max_bytes)
        reconciler = Reconciler(await bus.kv(subjects.KV_DATASETS), handlers.sync, bus.reconnects, observe=observe,
                                owner=members)
        handlers.wake = policies.wake = reconciler.schedule
        references.schedule = reconciler.schedule  # a source's change reconciles the references to it
        departed = Periodic("departed nodes", lambda: handlers.forget_departed_nodes(census.nodes_named(),
                                                                                     members.owns),
                            DEPARTED_NODES_SECONDS)
        # One replica sweeps (the owner of the markers' key); the first pass once the live replicas are known.
        markers = StartsWhen(Periodic("old delete markers", MarkerSweeper(bus, DATASET_SWEEP, owner=members).tick,
                                      MARKER_SWEEP_SECONDS), members.ready)
        retired = Periodic("deleted runtimes' bindings", handlers.retire_deleted_bindings, MARKER_SWEEP_SECONDS)
        await run_loops([members, bindings, policies, agents, commands, runtime_facts, inventory, scheduler_cache,
                         reconciler, departed, markers, retired], stop, readiness)
    finally:
        await bus.close()
        await s3_clients.close()
