"""The loader at scale (``PYTHONPATH=. .venv/bin/python -m tests.bench.loader_scale``; not part of ``make test``):
how the loader copes with many operations at once.

On a real nats-server (embedded, its own process, a fresh one per scenario) with the loader in this process (as
``tests/integration/test_loader.py`` runs it) and that test's ``ScriptedAgent`` standing in for the mount
processes of three nodes, the bench runs two scenarios:

1. **burst**: ``--loads`` DataLoads (default 1,000) of one dataset (``--files`` files of one block each, on a
   ring of three cache workers) applied at once: the time until every one is accepted (its ``accepted`` fact) and
   until every one is Complete (its status fact);
2. **held**: ``--held`` DataLoads (default 200) applied at once; once every one is Executing, the scripted agent
   starts with its hold set (each node holds the part it took half done, the rest wait in the node's stream), and
   the loader ticks over them for ``--hold-seconds`` (default 10); then the hold is released and every one must
   be Complete.

Throughout, the bench measures the loader's tick (each ``LoaderHandlers.tick``: its duration and the NATS round
trips it made, counted by wrapping nats-py's ``Client.request``, which every KV read and write and every JetStream
publish goes through, and attributing a call to the tick when it runs in the tick's task), and the latency of an
unrelated command: every ``--probe-every`` seconds (default 1) a DataLoad of another dataset is applied and timed
from publish to its ``accepted`` fact. RSS is this process's (loader, scripted agents and the bench client
together; nats-server apart), sampled every 0.25 s, with the baseline before the loader starts.

Results are printed as JSON (``--out`` writes them to a file too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from libs import subjects
from libs.bus import Bus, connect
from libs.config import NatsSettings
from libs.embedded import NatsConfig, free_port, start_nats
from libs.telemetry import setup_logging
from services.loader import app as loader_app
from services.loader.handlers import LoaderHandlers
from tests.helpers import make_settings, running
from tests.integration.test_loader import BLOCK, NODES, agent, dataload, files, put_dataset, put_runtime

PROBE_DATASET = "other"
# Commands in flight while the bench publishes a burst: JetStream acks each publish, one at a time would make the
# burst as slow as the round trip.
PUBLISH_WINDOW = 64

# The tick under way in this task (its round trips are counted into it), and every request of the loader.
_TICK: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("loader_tick", default=None)


@dataclass
class Meter:
    """What the wrapped ``Client.request`` and ``LoaderHandlers.tick`` saw."""

    requests: int = 0
    ticks: list[tuple[float, float, int]] = field(default_factory=list)  # (start, seconds, round trips)

    def window(self, start: float, end: float) -> dict[str, Any]:
        chosen = [(seconds, trips) for at, seconds, trips in self.ticks if start <= at < end]
        if not chosen:
            return {"ticks": 0}
        durations = sorted(seconds for seconds, _ in chosen)
        trips = sorted(count for _, count in chosen)
        return {"ticks": len(chosen), "tick_seconds_p50": round(statistics.median(durations), 4),
                "tick_seconds_max": round(durations[-1], 4), "round_trips_per_tick_p50": statistics.median(trips),
                "round_trips_per_tick_max": trips[-1]}


METER = Meter()


def instrument() -> None:
    """Count the loader connection's requests, and time each tick with the requests made inside it."""
    request = Client.request

    async def counted(self: Client, *args: Any, **kwargs: Any) -> Any:
        if self.options.get("name") == loader_app.SERVICE_NAME:
            METER.requests += 1
            inside = _TICK.get()
            if inside is not None:
                inside[0] += 1
        return await request(self, *args, **kwargs)

    tick = LoaderHandlers.tick

    async def timed(self: LoaderHandlers) -> None:
        counter = [0]
        token = _TICK.set(counter)
        start = time.monotonic()
        try:
            await tick(self)
        finally:
            _TICK.reset(token)
            METER.ticks.append((start, time.monotonic() - start, counter[0]))

    Client.request = counted  # type: ignore[method-assign]
    LoaderHandlers.tick = timed  # type: ignore[method-assign]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Facts:
    """The DataLoads' facts as the facts stream holds them: when each was accepted, each one's last phase and
    when it became Complete."""

    accepted: dict[str, float] = field(default_factory=dict)  # causation id → when
    phases: dict[str, str] = field(default_factory=dict)
    complete: dict[str, float] = field(default_factory=dict)

    async def start(self, bus: Bus) -> None:
        async def on_fact(msg: Any) -> None:
            fact = msgspec.json.decode(msg.data)
            now = time.monotonic()
            if fact["type"] == "operation.accepted.v1":
                self.accepted.setdefault(fact["causationId"], now)
            elif fact["type"] == "operation.status.v1":
                phase = fact["status"].get("phase", "Pending")
                self.phases[fact["name"]] = phase
                if phase == "Complete":
                    self.complete.setdefault(fact["name"], now)

        # An ordered JetStream consumer of the facts stream, not a core subscription: a core subscriber that falls
        # behind under the burst has facts dropped, and the bench would wait for ever for a Complete it missed.
        await bus.js.subscribe(subjects.DATALOAD_FACTS, stream=subjects.STREAM_FACTS, cb=on_fact,
                               ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)

    def count(self, names: list[str], phase: str) -> int:
        return sum(1 for name in names if self.phases.get(name) == phase)


async def until(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


async def publish_all(bus: Bus, names: list[str], dataset: str) -> list[str]:
    """Apply a DataLoad of ``dataset`` per name, PUBLISH_WINDOW in flight; the command ids."""
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    ids: list[str] = []

    async def one(name: str) -> None:
        command = dataload(name, dataset=dataset)
        ids.append(command.id)
        async with window:
            await bus.publish(subjects.DATALOAD_APPLY, command)

    await asyncio.gather(*(one(name) for name in names))
    return ids


@dataclass
class Prober:
    """Applies a DataLoad of another dataset every ``every`` seconds and records (when, seconds until accepted)."""

    bus: Bus
    facts: Facts
    every: float
    latencies: list[tuple[float, float]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            command = dataload(f"probe-{number}", dataset=PROBE_DATASET)
            sent = time.monotonic()
            await self.bus.publish(subjects.DATALOAD_APPLY, command)
            await until(functools.partial(self.facts.accepted.__contains__, command.id), 600, "probe accepted")
            self.latencies.append((sent, self.facts.accepted[command.id] - sent))
            with_timeout = asyncio.wait_for(self._stop.wait(), self.every)
            with suppress(TimeoutError):
                await with_timeout

    def stop(self) -> None:
        self._stop.set()

    def summary(self, start: float, end: float) -> dict[str, Any]:
        chosen = sorted(seconds for at, seconds in self.latencies if start <= at < end)
        if not chosen:
            return {"probes": 0}
        return {"probes": len(chosen), "accepted_seconds_p50": round(statistics.median(chosen), 3),
                "accepted_seconds_max": round(chosen[-1], 3)}


@asynccontextmanager
async def stack(workdir: Path) -> AsyncIterator[tuple[Bus, str]]:
    """A fresh nats-server and a provisioned client with the bench's datasets and runtimes written."""
    config = NatsConfig(port=free_port(), monitor_port=free_port(), store_dir=workdir / "jetstream")
    server = start_nats(config, workdir / "nats.log")
    try:
        bus = await connect(NatsSettings(urls=[config.url]), "shoal-bench")
        try:
            await bus.provision()
            yield bus, config.url
        finally:
            await bus.close()
    finally:
        server.stop()


async def seed(bus: Bus, count: int) -> None:
    await put_dataset(bus, files(*((f"f{i}", BLOCK) for i in range(count))))
    await put_runtime(bus, NODES)
    await put_dataset(bus, files(("p", BLOCK)), name=PROBE_DATASET)
    await put_runtime(bus, NODES, name=PROBE_DATASET)


@dataclass
class Rss:
    peak: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.25)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Scenario:
    """What a scenario starts from: the bench's client and the NATS URL, the facts it follows, the names of its
    ``loads`` DataLoads, and this process's RSS before the loader starts (``rss`` samples it from there)."""

    bus: Bus
    url: str
    facts: Facts
    names: list[str]
    baseline: int
    rss: Rss = field(default_factory=Rss)


@asynccontextmanager
async def scenario(workdir: Path, loads: int, file_count: int) -> AsyncIterator[Scenario]:
    """A fresh ``stack`` with the datasets seeded (``file_count`` files) and the DataLoads' facts followed."""
    async with stack(workdir) as (bus, url):
        await seed(bus, file_count)
        facts = Facts()
        await facts.start(bus)
        yield Scenario(bus, url, facts, names=[f"load-{i}" for i in range(loads)], baseline=rss_bytes())


@asynccontextmanager
async def background(*loops: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        yield
    finally:
        for loop in loops:
            loop.stop()
        await asyncio.gather(*tasks)


def mib(value: int) -> float:
    return round(value / 2**20, 1)


async def burst(workdir: Path, loads: int, file_count: int, probe_every: float, timeout: float) -> dict[str, Any]:
    async with scenario(workdir, loads, file_count) as scene:
        bus, facts, names, rss = scene.bus, scene.facts, scene.names, scene.rss
        async with running(lambda stop: loader_app.run(make_settings(scene.url), stop)), agent(bus, NODES), \
                agent(bus, NODES, dataset=PROBE_DATASET):
            await until(lambda: bool(METER.ticks), 30, "the loader ticking")
            prober = Prober(bus, facts, probe_every)
            requests_before = METER.requests
            start = time.monotonic()
            async with background(rss, prober):
                ids = await publish_all(bus, names, "data")
                published = time.monotonic()
                await until(lambda: all(i in facts.accepted for i in ids), timeout, "every load accepted")
                accepted = max(facts.accepted[i] for i in ids)
                await until(lambda: facts.count(names, "Complete") == loads, timeout, "every load Complete")
                complete = max(facts.complete[name] for name in names)
            requests = METER.requests - requests_before
        return {
            "loads": loads, "files_per_load": file_count,
            "publish_seconds": round(published - start, 2),
            "all_accepted_seconds": round(accepted - start, 2),
            "all_complete_seconds": round(complete - start, 2),
            "loader_round_trips": requests, "loader_round_trips_per_load": round(requests / loads, 1),
            "ticks_until_accepted": METER.window(start, accepted),
            "ticks_accepted_to_complete": METER.window(accepted, complete),
            "probe_until_accepted": prober.summary(start, accepted),
            "probe_accepted_to_complete": prober.summary(accepted, complete),
            "rss_baseline_mib": mib(scene.baseline), "rss_peak_mib": mib(rss.peak),
        }


async def held(workdir: Path, loads: int, file_count: int, hold_seconds: float, probe_every: float,
               timeout: float) -> dict[str, Any]:
    async with scenario(workdir, loads, file_count) as scene:
        bus, facts, names, rss = scene.bus, scene.facts, scene.names, scene.rss
        async with running(lambda stop: loader_app.run(make_settings(scene.url), stop)), \
                agent(bus, NODES, dataset=PROBE_DATASET):
            await until(lambda: bool(METER.ticks), 30, "the loader ticking")
            start = time.monotonic()
            async with background(rss):
                await publish_all(bus, names, "data")
                await until(lambda: facts.count(names, "Executing") == loads, timeout, "every load Executing")
                executing = time.monotonic()
                async with agent(bus, NODES) as scripted:
                    scripted.hold.set()
                    prober = Prober(bus, facts, probe_every)
                    async with background(prober):
                        await asyncio.sleep(hold_seconds)  # the bench's measuring window, not a synchronisation
                    held_until = time.monotonic()
                    scripted.hold.clear()
                    await until(lambda: facts.count(names, "Complete") == loads, timeout, "every load Complete")
                    complete = time.monotonic()
        return {
            "loads": loads, "files_per_load": file_count,
            "all_executing_seconds": round(executing - start, 2),
            "ticks_while_held": METER.window(executing, held_until),
            "probe_while_held": prober.summary(executing, held_until),
            "complete_after_release_seconds": round(complete - held_until, 2),
            "ticks_after_release": METER.window(held_until, complete),
            "rss_baseline_mib": mib(scene.baseline), "rss_peak_mib": mib(rss.peak),
        }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging("warning", "json")  # a line per run started and finished would be thousands
    instrument()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-loader-scale-") as tmp:
        if args.only in ("", "burst"):
            results["burst"] = await burst(Path(tmp) / "burst", args.loads, args.files, args.probe_every,
                                           args.timeout)
            print(json.dumps({"burst": results["burst"]}, indent=2), flush=True)
        if args.only in ("", "held"):
            METER.ticks.clear()
            results["held"] = await held(Path(tmp) / "held", args.held, args.files, args.hold_seconds,
                                         args.probe_every, args.timeout)
            print(json.dumps({"held": results["held"]}, indent=2), flush=True)
    return results


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=1000, help="DataLoads applied at once in the burst")
    parser.add_argument("--held", type=int, default=200, help="DataLoads Executing at once, held")
    parser.add_argument("--files", type=int, default=6, help="files (one block each) of the loads' dataset")
    parser.add_argument("--hold-seconds", type=float, default=10.0, help="how long the held loads are ticked")
    parser.add_argument("--probe-every", type=float, default=1.0, help="seconds between unrelated applies")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for each phase")
    parser.add_argument("--only", choices=["", "burst", "held"], default="")
    parser.add_argument("--out", default="", help="also write the results (JSON) here")
    return parser.parse_args()


def run_main() -> None:
    args = arguments()
    results = asyncio.run(main(args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_main()
