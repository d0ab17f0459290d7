"""The scheduler bench (``SHOAL_BENCH=scheduler make bench``; ``--quick`` for a small size): how fast the scheduler
folds inventory, next to the ceiling of the same stream, and how long one decision takes.

On a real nats-server (embedded, its own process) with ``--agents`` simulated agents (default 1,000) and
``--datasets`` datasets (default 10,000; each on 3 agents, and 3 "hot" datasets on every agent), the bench:

1. writes the datasets' records and the agents' records (zone and region labels) to their KV buckets;
2. publishes every agent's inventory to SHOAL_AGENT as real agents would: per (agent, dataset) a snapshot of 16
   blocks in 4 files, then 3 deltas that cache 8 blocks and evict 4 (the stream holds them all before timing);
3. **raw ceiling**: one bare nats-py ordered consumer (the kind the service follows the inventory with) decodes
   every message with the inventory decoder, upgrades it and folds it into a ``CacheFold``: block events per second
   (measured before and after the service; the mean is the reference);
4. **service**: the scheduler service (``services.scheduler.app.run``, in this process) consumes the same messages
   with its own ordered consumer from the stream's first message (``inventory_start``: a replica in service starts
   at the stream's end and asks the agents for snapshots); timed from the moment its dataset watch is ready (its
   consumer waits for it) until its fold has taken the last message: block events per second, and the ratio to the
   ceiling (target >= 0.8). Both folds must end with the same blocks;
5. **decision latency** of a pod using the 3 hot datasets over every node (1,000 candidates): ``handlers.answer``
   in process (target p99 < 1 ms), wall time (``perf_counter_ns``) and this process's CPU time (``process_time_ns``,
   the honest number on a shared machine): **first after a change** (the headline: before each decision, not
   timed, one delta is folded — a node caches or evicts a block of one hot dataset — so the decision is worked out
   from the fold as it now is), first with nothing changed (the decision cache emptied before each), and repeated
   (the pods of one job asking the same question while the fold does not move: the kept decision); and
   ``sched.score.v1`` over NATS from another connection, repeated and first after a change (target p99 < 5 ms;
   the client shares this process's event loop with the service, so it pays for both ends). The request leaves
   ``limit`` at its default, so the reply lists the best 100 nodes; two more rows say where the time over NATS
   goes: the NATS handler's own work without NATS (``answer_raw``: decode, the kept decision, encode) and the kept
   decision over NATS with every node listed (``limit: 0``, the old reply's size).

A "block event" is one block cached or evicted, in a snapshot or a delta. Results go to
``<state-dir>/scheduler-results.json`` and are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import api as js_api

from libs import subjects
from libs.bus import Bus, connect
from libs.config import NatsSettings, SchedulerSettings, ServiceSettings, Settings
from libs.embedded import NatsConfig, free_port, start_nats
from libs.events.agent import (
    AgentHeartbeat,
    AgentRecord,
    AnyInventory,
    BlockId,
    CacheCounters,
    InventoryDelta,
    InventorySnapshot,
    group_blocks,
    upgrade,
)
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount
from libs.events.schedule import DatasetUse, ScoreReply, ScoreRequest
from libs.telemetry import setup_logging
from services.scheduler import app
from services.scheduler.fold import CacheFold
from services.scheduler.handlers import SchedulerHandlers

ZONE, REGION = "topology.kubernetes.io/zone", "topology.kubernetes.io/region"
BLOCK = 4 << 20
HOT = 3  # datasets every agent holds: the pod of the decision bench uses these
SNAPSHOT_BLOCKS, FILES_PER_SNAPSHOT = 16, 4
DELTAS, DELTA_CACHED, DELTA_EVICTED = 3, 8, 4
COPIES = 3  # agents holding each ordinary dataset
PUBLISH_WINDOW = 2000  # publishes in flight while filling the stream


@dataclasses.dataclass
class Sizes:
    agents: int
    datasets: int
    decisions: int


def dataset_ref(index: int) -> ObjectRef:
    return ObjectRef(name=f"ds-{index:05d}", namespace="bench")


def node_name(index: int) -> str:
    return f"node-{index:04d}"


def inventory(sizes: Sizes, seed: int = 7) -> tuple[list[tuple[str, bytes]], int]:
    """Every agent's events, in publishing order (agent by agent, each pair's events in sequence), and their
    block events."""
    rng = random.Random(seed)
    holders: dict[int, list[int]] = {agent: list(range(HOT)) for agent in range(sizes.agents)}
    for dataset in range(HOT, sizes.datasets):
        for agent in rng.sample(range(sizes.agents), min(COPIES, sizes.agents)):
            holders[agent].append(dataset)
    messages: list[tuple[str, bytes]] = []
    block_events = 0
    for agent, datasets in holders.items():
        node = node_name(agent)
        subject = subjects.agent_inventory(node)
        for dataset in datasets:
            ref = dataset_ref(dataset)
            held = [BlockId(0, f"part-{i % FILES_PER_SNAPSHOT}.bin", "e1", i // FILES_PER_SNAPSHOT)
                    for i in range(SNAPSHOT_BLOCKS)]
            seq = 1
            messages.append((subject, msgspec.json.encode(InventorySnapshot(
                node=node, dataset=ref, incarnation="i1", seq=seq, files=group_blocks((b, BLOCK) for b in held),
                counters=CacheCounters(cached_bytes=len(held) * BLOCK)))))
            block_events += len(held)
            next_index = SNAPSHOT_BLOCKS
            for _ in range(DELTAS):
                seq += 1
                cached = [BlockId(0, f"more-{(next_index + i) % 2}.bin", "e1", next_index + i)
                          for i in range(DELTA_CACHED)]
                next_index += DELTA_CACHED
                evicted, held = held[:DELTA_EVICTED], held[DELTA_EVICTED:] + cached
                messages.append((subject, msgspec.json.encode(InventoryDelta(
                    node=node, dataset=ref, incarnation="i1", seq=seq,
                    cached=group_blocks((b, BLOCK) for b in cached), evicted=group_blocks((b, BLOCK) for b in evicted),
                    counters=CacheCounters(cached_bytes=len(held) * BLOCK)))))
                block_events += len(cached) + len(evicted)
    return messages, block_events


async def seed_state(bus: Bus, sizes: Sizes, messages: list[tuple[str, bytes]]) -> None:
    datasets = await bus.kv(subjects.KV_DATASETS)
    agents = await bus.kv(subjects.KV_AGENTS)
    semaphore = asyncio.Semaphore(PUBLISH_WINDOW)

    async def bounded(coroutine: Any) -> None:
        async with semaphore:
            await coroutine

    records = []
    for index in range(sizes.datasets):
        ref = dataset_ref(index)
        record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name=ref.name, namespace=ref.namespace),
                                               spec=DatasetSpec(mounts=[Mount(mount_point="s3://bench/")])),
                               generation=1, status=DatasetStatus(phase="Bound", ufs_total_bytes=64 * BLOCK))
        records.append(datasets.put(f"{ref.namespace}.{ref.name}", msgspec.json.encode(record)))
    now = time.time()
    for index in range(sizes.agents):
        labels = {ZONE: f"zone-{index % 12}", REGION: f"region-{index % 3}"}
        beat = AgentHeartbeat(node=node_name(index), labels=labels, sent_at=now)
        records.append(agents.put(node_name(index), msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=now))))
    await asyncio.gather(*(bounded(r) for r in records))
    headers = {"Content-Type": "application/json"}
    await asyncio.gather(*(bounded(bus.js.publish(subject, data, headers=headers)) for subject, data in messages))


async def raw_ceiling(bus: Bus, total: int) -> tuple[float, CacheFold]:
    """One bare ordered consumer (the kind the service follows the inventory with: no acks) decoding, upgrading
    and folding every message from the stream's first."""
    decoder = msgspec.json.Decoder(AnyInventory)
    fold = CacheFold()
    done = 0
    finished = asyncio.Event()

    async def take(message: Msg) -> None:
        nonlocal done
        fold.apply(upgrade(decoder.decode(message.data)))
        done += 1
        if done >= total:
            finished.set()

    config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    started = time.perf_counter()
    subscription = await bus.js.subscribe(subjects.AGENT_INVENTORY, stream=subjects.STREAM_AGENT, cb=take,
                                          ordered_consumer=True, config=config)
    await finished.wait()
    elapsed = time.perf_counter() - started
    await subscription.unsubscribe()
    return elapsed, fold


async def service_fold(settings: Settings, total: int) -> tuple[float, SchedulerHandlers, asyncio.Event,
                                                             asyncio.Task[None]]:
    """The service, in this process: timed from its dataset watch being ready (its consumer waits for that) until
    its fold has taken the last message (counted by wrapping the fold, no polling)."""
    found: list[SchedulerHandlers] = []
    wired, folded = asyncio.Event(), asyncio.Event()
    count = 0

    def on_started(handlers: SchedulerHandlers) -> None:
        apply = handlers.fold.apply

        def counting(event: Any) -> bool:
            nonlocal count
            count += 1
            if count >= total:
                folded.set()
            return apply(event)

        handlers.fold.apply = counting  # type: ignore[method-assign]
        found.append(handlers)
        wired.set()

    stop = asyncio.Event()
    task = asyncio.create_task(app.run(settings, stop, started=on_started, inventory_start=1))
    await wired.wait()
    handlers = found[0]
    await handlers.datasets_ready.wait()
    started = time.perf_counter()
    await folded.wait()
    return time.perf_counter() - started, handlers, stop, task


async def first_facts_out(handlers: SchedulerHandlers, timeout: float = 300.0) -> float:
    """Seconds until the service has published its first cache fact of every dataset it folded (thousands at once
    once the fold is warm, on the connection score requests use too): decisions are timed after that burst, at the
    steady state a scheduler spends its life in. Polled: the bench, not the service, waits."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        due = sum(1 for key in handlers.fold.unique if key in handlers.datasets)
        if len(handlers._published) >= due:
            return time.perf_counter() - started
        await asyncio.sleep(0.1)
    raise TimeoutError("the service's first cache facts were not all out")


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Changes:
    """Inventory changes folded between decisions: one hot dataset on one node (round robin) caches a block, then
    evicts it, as a real agent's delta would; the next decision has to be worked out from the fold again."""

    def __init__(self, handlers: SchedulerHandlers, agents: int) -> None:
        self.handlers, self.agents, self.count = handlers, agents, 0

    def fold_one(self) -> None:
        node = node_name(self.count % self.agents)
        ref = dataset_ref(self.count // self.agents % HOT)
        cache = self.handlers.fold.datasets[(ref.namespace, ref.name)][node]
        block = [(BlockId(0, "extra.bin", "e1", 0), BLOCK)]
        caching = (self.count // (self.agents * HOT)) % 2 == 0
        self.handlers.fold.apply(InventoryDelta(
            node=node, dataset=ref, incarnation="i1", seq=cache.position.seq + 1,
            cached=group_blocks(block) if caching else [], evicted=[] if caching else group_blocks(block),
            counters=CacheCounters(cached_bytes=cache.total)))
        self.count += 1


def timed(samples: tuple[list[int], list[int]], call: Any) -> Any:
    """``call()``, its wall time (perf_counter_ns) and this process's CPU time (process_time_ns) appended."""
    cpu, wall = time.process_time_ns(), time.perf_counter_ns()
    result = call()
    samples[0].append(time.perf_counter_ns() - wall)
    samples[1].append(time.process_time_ns() - cpu)
    return result


async def decisions(bus: Bus, handlers: SchedulerHandlers, count: int, agents: int) -> dict[str, float]:
    request = ScoreRequest(datasets=[DatasetUse(name=dataset_ref(i).name, namespace="bench") for i in range(HOT)])
    reply = handlers.answer(request)
    assert not reply.error and reply.scores, reply.error
    changes = Changes(handlers, agents)
    changed: tuple[list[int], list[int]] = ([], [])
    for _ in range(count):
        changes.fold_one()  # not timed: the fold moved, so the decision is worked out from it
        answer = timed(changed, lambda: handlers.answer(request))
        assert answer.scores is not reply.scores
    cold: tuple[list[int], list[int]] = ([], [])
    for _ in range(count):
        handlers._answers.clear()  # the first question, nothing changed since the last: scored from the fold
        timed(cold, lambda: handlers.answer(request))
    local: tuple[list[int], list[int]] = ([], [])
    for _ in range(count):
        timed(local, lambda: handlers.answer(request))
    data = msgspec.json.encode(request)
    every = msgspec.json.encode(msgspec.structs.replace(request, limit=0))
    # The NATS handler's own work (decode the request, the kept decision, encode the reply), without NATS: what a
    # request over NATS costs beyond this is nats-py and the server.
    raw: tuple[list[int], list[int]] = ([], [])
    for _ in range(count):
        timed(raw, lambda: handlers.answer_raw(data))
    client = await connect(bus_settings(bus), "bench-client")
    remote: list[int] = []
    remote_changed: list[int] = []
    remote_every: list[int] = []
    try:
        for samples, change, body in ((remote, False, data), (remote_changed, True, data),
                                      (remote_every, False, every)):
            for _ in range(count):
                if change:
                    changes.fold_one()
                started = time.perf_counter_ns()
                answer = await client.nc.request(subjects.SCHED_SCORE, body, timeout=5)
                samples.append(time.perf_counter_ns() - started)
            decoded = msgspec.json.decode(answer.data, type=ScoreReply)
            assert decoded.scores and not decoded.error, decoded.error
            sizes = (len(answer.data), len(decoded.scores))
            if body is data:
                assert len(decoded.scores) == len(reply.scores)
                reply_bytes, listed = sizes
            else:
                assert len(decoded.scores) == len(reply.scores) + reply.unlisted
                every_bytes = sizes[0]
    finally:
        await client.close()
    results: dict[str, float] = {"nodes": len(reply.scores) + reply.unlisted, "listed": listed,
                                 "reply_bytes": reply_bytes, "every_reply_bytes": every_bytes}
    for name, samples in (("changed", changed[0]), ("changed_cpu", changed[1]), ("cold", cold[0]),
                          ("cold_cpu", cold[1]), ("local", local[0]), ("local_cpu", local[1]), ("raw", raw[0]),
                          ("raw_cpu", raw[1]), ("nats", remote), ("nats_changed", remote_changed),
                          ("nats_every", remote_every)):
        p50, p99 = percentiles([sample / 1e6 for sample in samples])
        results[f"{name}_p50_ms"], results[f"{name}_p99_ms"] = p50, p99
    return results


_URLS: dict[int, list[str]] = {}


def bus_settings(bus: Bus) -> NatsSettings:
    return NatsSettings(urls=_URLS[id(bus)])


def same_blocks(one: CacheFold, two: CacheFold) -> bool:
    def blocks(fold: CacheFold) -> dict[Any, int]:
        return {(key, node): cache.total for key, nodes in fold.datasets.items() for node, cache in nodes.items()}

    return blocks(one) == blocks(two) and one.blocks() == two.blocks()


async def bench(sizes: Sizes, state: Path) -> dict[str, Any]:
    nats_config = NatsConfig(port=free_port(), monitor_port=free_port(), store_dir=state / f"nats-{os.getpid()}")
    server = start_nats(nats_config, state / "scheduler-nats.log")
    try:
        bus = await connect(NatsSettings(urls=[nats_config.url]), "bench")
        _URLS[id(bus)] = [nats_config.url]
        try:
            await bus.provision()
            started = time.perf_counter()
            messages, block_events = inventory(sizes)
            await seed_state(bus, sizes, messages)
            print(f"  {len(messages):,} inventory messages ({block_events:,} block events) and "
                  f"{sizes.datasets:,} datasets published in {time.perf_counter() - started:.1f} s", flush=True)
            # The ceiling is measured before and after the service (its mean is the reference), so a machine
            # getting busier or quieter during the run does not favour either side.
            raw_seconds, raw_fold = await raw_ceiling(bus, len(messages))
            print(f"  raw ceiling: {block_events / raw_seconds:,.0f} block events/s ({raw_seconds:.1f} s)", flush=True)
            settings = Settings(nats=NatsSettings(urls=[nats_config.url]),
                                service=ServiceSettings(log_level="warning", log_format="json"),
                                scheduler=SchedulerSettings(node_timeout=24 * 3600.0))
            service_seconds, handlers, stop, task = await service_fold(settings, len(messages))
            try:
                print(f"  service: {block_events / service_seconds:,.0f} block events/s ({service_seconds:.1f} s)",
                      flush=True)
                assert same_blocks(raw_fold, handlers.fold), "the service's fold differs from the ceiling's"
                facts_seconds = await first_facts_out(handlers)
                print(f"  first cache facts out {facts_seconds:.1f} s after the fold", flush=True)
                latency = await decisions(bus, handlers, sizes.decisions, sizes.agents)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            after_seconds, _ = await raw_ceiling(bus, len(messages))
            print(f"  raw ceiling again: {block_events / after_seconds:,.0f} block events/s ({after_seconds:.1f} s)",
                  flush=True)
        finally:
            await bus.close()
    finally:
        server.stop()
        shutil.rmtree(nats_config.store_dir, ignore_errors=True)
    raw_rates = [block_events / raw_seconds, block_events / after_seconds]
    raw_rate, service_rate = statistics.mean(raw_rates), block_events / service_seconds
    return {"agents": sizes.agents, "datasets": sizes.datasets, "messages": len(messages),
            "block_events": block_events, "raw_events_per_s": raw_rate, "raw_runs_events_per_s": raw_rates,
            "service_events_per_s": service_rate,
            "ratio": service_rate / raw_rate, **latency}


def report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scheduler: {results['agents']:,} agents, {results['datasets']:,} datasets, "
                        f"{results['block_events']:,} block events")
    for column in ("measure", "value", "target", ""):
        table.add_column(column)

    def row(measure: str, value: str, target: str, passed: bool) -> None:
        table.add_row(measure, value, target, "PASS" if passed else "MISS")

    row("fold, raw JetStream ceiling", f"{results['raw_events_per_s']:,.0f} events/s", "-", True)
    row("fold, scheduler service", f"{results['service_events_per_s']:,.0f} events/s", ">= 0.8x ceiling",
        results["ratio"] >= 0.8)
    row("service / ceiling", f"{results['ratio']:.2f}x", ">= 0.8x", results["ratio"] >= 0.8)
    nodes = results["nodes"]

    def latency(name: str, what: str, target: float) -> None:
        cpu = (f" (CPU p50 {results[f'{name}_cpu_p50_ms']:.2f}, p99 {results[f'{name}_cpu_p99_ms']:.2f})"
               if f"{name}_cpu_p50_ms" in results else "")
        row(f"decision, {what} ({nodes} nodes)",
            f"p50 {results[f'{name}_p50_ms']:.2f} ms, p99 {results[f'{name}_p99_ms']:.2f} ms{cpu}",
            f"p99 < {target:g} ms", results[f"{name}_p99_ms"] < target)

    latency("changed", "in process, first after a change", 1.0)
    latency("cold", "in process, first, nothing changed", 1.0)
    latency("local", "in process, repeated (kept)", 1.0)
    latency("raw", "NATS handler without NATS, kept", 5.0)
    latency("nats_changed", "over NATS, first after a change", 5.0)
    latency("nats", "over NATS, repeated (kept)", 5.0)
    latency("nats_every", "over NATS, kept, every node listed", 5.0)
    if "reply_bytes" in results:
        table.add_row("reply over NATS", f"{results['listed']:.0f} nodes listed, {results['reply_bytes']:,.0f} bytes; "
                      f"every node: {results['every_reply_bytes']:,.0f} bytes", "-", "")
    Console(width=120).print(table)


def main(state_dir: Path, quick: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="the scheduler bench")
    parser.add_argument("--agents", type=int, default=100 if quick else 1000)
    parser.add_argument("--datasets", type=int, default=1000 if quick else 10_000)
    parser.add_argument("--decisions", type=int, default=300 if quick else 2000)
    args = parser.parse_args(argv or [])
    state = state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    setup_logging("warning", "json")
    sizes = Sizes(args.agents, args.datasets, args.decisions)
    print(f"scheduler bench: {sizes.agents:,} agents, {sizes.datasets:,} datasets", flush=True)
    results = asyncio.run(bench(sizes, state))
    (state / "scheduler-results.json").write_text(json.dumps(results, indent=2))
    report(results)
    return results


if __name__ == "__main__":
    import sys

    main(Path(".shoal/bench"), quick="--quick" in sys.argv, argv=[a for a in sys.argv[1:] if a != "--quick"])
