"""The runtime service picks cache workers on a real nats-server: agents (heartbeats published as an agent would,
with labels and peer URLs) against Datasets' nodeAffinity and placement (applied through the dataset service),
re-picked when a Dataset or the replicas change, sticky when a worker falls silent, none for a runtime without
its Dataset, and a worker that stays unhealthy replaced by a healthy spare."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
import structlog

from libs import subjects
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, AgentRecord, CacheCounters, InventorySnapshot, MountReport
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import (
    Level,
    Runtime,
    RuntimeApply,
    RuntimeDelete,
    RuntimeRecord,
    RuntimeSpec,
    TieredStore,
)
from services.dataset import app as dataset_app
from services.runtime import app as runtime_app
from services.runtime import domain
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import cancel_and_wait, dataset_record, eventually, running, runtime_record

ZONES = {"n1": "a", "n2": "b", "n3": "a", "n4": "b"}


def zone_in(*zones: str) -> dict[str, Any]:
    return {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": list(zones)}]}]}}


async def apply(bus: Bus, bucket: str, name: str, replicas: int, placement: str = "Exclusive",
                affinity: dict[str, Any] | None = None) -> None:
    spec = DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")], placement=placement,  # type: ignore[arg-type]
                       node_affinity=affinity)
    await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name), spec=spec)))
    await apply_runtime(bus, name, replicas)


async def apply_runtime(bus: Bus, name: str, replicas: int) -> None:
    await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
        metadata=ObjectMeta(name=name),
        spec=RuntimeSpec(replicas=replicas, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))))


async def beat(bus: Bus, node: str, *serves: str, problems: tuple[str, ...] = (), instance: str = "") -> None:
    mounts = [MountReport(dataset=ObjectRef(name=name), state="Serving", peer_url=f"http://127.0.0.1:70{node[1:]}{i}")
              for i, name in enumerate(serves)]
    await bus.publish(subjects.agent_heartbeat(node), AgentHeartbeat(
        node=node, runtimes=[ObjectRef(name=name) for name in serves], sent_at=time.time(), interval_seconds=1.0,
        labels={"topology.kubernetes.io/zone": ZONES[node]}, mounts=mounts, healthy=not problems,
        problems=list(problems), instance=instance or f"{node}-agent"))


class Beating:
    """Heartbeats of the nodes in ``serves`` (node → runtimes it serves) every 0.3 s while the block runs: one beat
    alone goes stale after three of its 1 s intervals, which a loaded machine may spend before the runtime service
    looks. A node taken out of ``serves`` falls silent; a node in ``problems`` says unhealthy; a node in
    ``instances`` beats once per agent process named there (one, ``<node>-agent``, by default)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.serves: dict[str, tuple[str, ...]] = {}
        self.problems: dict[str, tuple[str, ...]] = {}
        self.instances: dict[str, tuple[str, ...]] = {}
        # One beat at a time: a beat of the loop read before ``set`` and sent after it would tell the runtime
        # service the node's old runtimes (CI saw a kept worker dropped and picked again behind another).
        self._sending = asyncio.Lock()

    async def __aenter__(self) -> Beating:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            for node in list(self.serves):
                async with self._sending:
                    names = self.serves.get(node)
                    if names is not None:
                        for instance in self.instances.get(node, ("",)):
                            await beat(self.bus, node, *names, problems=self.problems.get(node, ()),
                                       instance=instance)
            await asyncio.sleep(0.3)  # a heartbeat period, not a wait for something

    async def set(self, nodes: Iterable[str], *names: str) -> None:
        """Serve ``names`` on ``nodes`` from now on, with a beat of each at once."""
        for node in nodes:
            async with self._sending:
                self.serves[node] = names
                await beat(self.bus, node, *names, problems=self.problems.get(node, ()))

    async def sicken(self, node: str, *problems: str) -> None:
        """``node`` says unhealthy with ``problems`` from now on (healthy again with none), with a beat at once."""
        async with self._sending:
            self.problems[node] = problems
            await beat(self.bus, node, *self.serves[node], problems=problems)


async def workers_of(bus: Bus, name: str, expected: list[str], serving: int = 4) -> RuntimeRecord:
    """The runtime once its workers are ``expected`` and ``serving`` agents are accounted for."""
    async def probe() -> RuntimeRecord | None:
        record = await runtime_record(bus, name)
        if record is None or [w.node for w in record.status.workers] != expected:
            return None
        return record if len(record.status.workers) + len(record.status.not_picked) >= serving else None

    try:
        return await eventually(probe, 15, f"{name}'s workers {expected}")
    except AssertionError:
        record = await runtime_record(bus, name)
        raise AssertionError(f"{name}: {record and record.status}") from None



@contextlib.asynccontextmanager
async def services_and_agents(bus: Bus, settings: Settings) -> AsyncIterator[Beating]:
    """The dataset and runtime services, and the agents' heartbeats as ``Beating`` sends them."""
    async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop)), \
            Beating(bus) as beats:
        yield beats

@pytest.mark.timeout(90)
async def test_workers_follow_affinity_placement_and_replicas(bus: Bus, settings: Settings,
                                                              seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await apply(bus, bucket, "train", replicas=1, affinity=zone_in("a"))
        await beats.set(ZONES, "train")
        record = await workers_of(bus, "train", ["n1"])
        status = record.status
        assert status.workers[0].ready and status.workers[0].peer_url == "http://127.0.0.1:7010"
        assert {(p.node, p.reason) for p in status.not_picked} == {
            ("n2", "does not match nodeAffinity: topology.kubernetes.io/zone In [a]"),
            ("n3", "1 of 1 replicas already picked"),
            ("n4", "does not match nodeAffinity: topology.kubernetes.io/zone In [a]"),
        }
        assert (status.current_worker_number_scheduled, status.worker_number_ready) == (1, 1)

        # Scaling up keeps n1 and fills from the eligible ones in name order; widening the affinity adds zone b.
        await apply(bus, bucket, "train", replicas=3, affinity=zone_in("a"))
        await workers_of(bus, "train", ["n1", "n3"])
        await apply(bus, bucket, "train", replicas=3, affinity=zone_in("a", "b"))
        record = await workers_of(bus, "train", ["n1", "n3", "n2"])
        assert record.status.phase == "Ready"

        # An Exclusive dataset takes no worker of another: "eval" gets the only agent left, n4.
        await apply(bus, bucket, "eval", replicas=2)
        await beats.set(ZONES, "train", "eval")
        record = await workers_of(bus, "eval", ["n4"])
        assert {p.node: p.reason for p in record.status.not_picked}["n1"] == "worker of default/train (Exclusive)"

        # Scaling train down frees n2 (the latest picked) for eval.
        await apply(bus, bucket, "train", replicas=2, affinity=zone_in("a", "b"))
        await workers_of(bus, "train", ["n1", "n3"])
        await workers_of(bus, "eval", ["n4", "n2"])

        # A silent worker stays picked, not ready, and leaves the ring; the runtime reports it.
        del beats.serves["n1"]

        async def n1_silent() -> RuntimeRecord | None:
            record = await runtime_record(bus, "train")
            return record if record and not record.status.workers[0].ready else None

        silent = await eventually(n1_silent, 20, "n1 not ready after missed heartbeats")
        assert [w.node for w in silent.status.workers] == ["n1", "n3"]

        # Deleting train frees its workers for eval at once.
        await bus.publish(subjects.RUNTIME_DELETE, RuntimeDelete(name="train"))
        await beats.set(("n2", "n3", "n4"), "eval")
        await apply(bus, bucket, "eval", replicas=3)
        await workers_of(bus, "eval", ["n4", "n2", "n3"], serving=3)


@pytest.mark.timeout(90)
async def test_a_runtime_without_its_dataset_takes_no_worker_until_the_dataset_is_applied(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2"), "orphan", "train")
        # A runtime applied before (or without) its Dataset: Exclusive by default, it would hold both agents.
        await apply_runtime(bus, "orphan", replicas=2)
        record = await workers_of(bus, "orphan", [], serving=2)
        assert record.status.message == "no Dataset default/orphan: no cache workers until it is applied"
        assert {(p.node, p.reason) for p in record.status.not_picked} == {("n1", "no Dataset default/orphan"),
                                                                          ("n2", "no Dataset default/orphan")}
        # So another dataset gets them.
        await apply(bus, bucket, "train", replicas=2)
        await workers_of(bus, "train", ["n1", "n2"], serving=2)
        # Its Dataset applied, the orphan picks as any runtime does: n2 once train lets it go.
        await apply(bus, bucket, "train", replicas=1)
        await apply(bus, bucket, "orphan", replicas=2)
        await workers_of(bus, "train", ["n1"], serving=2)
        record = await workers_of(bus, "orphan", ["n2"], serving=2)
        assert not [c for c in record.status.conditions if c.type == domain.CONDITION_DATASET]
        assert {p.node: p.reason for p in record.status.not_picked} == {"n1": "worker of default/train (Exclusive)"}


@pytest.mark.timeout(90)
async def test_a_worker_that_stays_unhealthy_is_replaced_by_a_healthy_spare(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A grace period the test can wait out; how long it is does not change what happens after it.
    monkeypatch.setattr(domain, "UNHEALTHY_WORKER_GRACE_SECONDS", 1.0)
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2", "n3"), "train")
        await apply(bus, bucket, "train", replicas=2)
        await workers_of(bus, "train", ["n1", "n2"], serving=3)

        # n1 keeps beating but its cache directory fails: past the grace period n3, the healthy spare, takes its
        # seat; n2 keeps its own (the ring moves n1's blocks only).
        problem = "cache dir /mnt/ssd: Input/output error"
        await beats.sicken("n1", problem)
        record = await workers_of(bus, "train", ["n2", "n3"], serving=3)
        assert all(worker.ready for worker in record.status.workers) and record.status.phase == "Ready"
        [replaced] = record.status.replaced
        assert (replaced.node, replaced.by) == ("n1", "n3") and problem in replaced.reason
        assert replaced.reason.startswith("unhealthy for ")
        [n1] = record.status.not_picked
        assert n1.node == "n1" and problem in n1.reason

        # Healthy again, n1 is an ordinary candidate: the full, healthy set stays as it is.
        await beats.sicken("n1")

        async def n1_a_candidate() -> RuntimeRecord | None:
            record = await runtime_record(bus, "train")
            reasons = {p.node: p.reason for p in record.status.not_picked} if record else {}
            return record if reasons.get("n1") == "2 of 2 replicas already picked" else None

        record = await eventually(n1_a_candidate, 15, "n1 healthy again, not picked")
        assert [w.node for w in record.status.workers] == ["n2", "n3"] and len(record.status.replaced) == 1


@pytest.mark.timeout(90)
async def test_a_runtime_scaled_to_zero_says_so_for_each_agent_not_picked(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2"), "train")
        await apply(bus, bucket, "train", replicas=1)
        await workers_of(bus, "train", ["n1"], serving=2)
        # Scaled to zero: no seat to give, which "0 of 0 replicas already picked" did not say.
        await apply(bus, bucket, "train", replicas=0)
        record = await workers_of(bus, "train", [], serving=2)
        assert {(p.node, p.reason) for p in record.status.not_picked} == {
            ("n1", "replicas is 0: no cache workers"), ("n2", "replicas is 0: no cache workers")}
        # Ready (its nodes mount the dataset), and the message says no worker caches for the others.
        assert (record.status.phase, record.status.message) == (
            "Ready", "spec.replicas is 0: no cache workers, so every node reads from the store itself")
        # The Dataset, Bound all the same, says it too (it read as cached), with what to run; a worker clears it.
        scale = "`shoal scale runtime train --replicas N`"

        async def dataset_says(part: str) -> DatasetRecord | None:
            found = await dataset_record(bus, "train")
            return found if found and found.status.phase == "Bound" and part in found.status.message else None

        said = await eventually(lambda: dataset_says(scale), 15, "the dataset's no-worker message")
        assert said.status.message.startswith("bound to Runtime default/train, which has no cache workers")
        await apply_runtime(bus, "train", 1)
        await workers_of(bus, "train", ["n1"], serving=2)

        async def cleared() -> DatasetRecord | None:
            found = await dataset_record(bus, "train")
            return found if found and found.status.phase == "Bound" and not found.status.message else None

        await eventually(cleared, 15, "the dataset's message cleared by a worker")


@pytest.mark.timeout(90)
async def test_after_a_scale_down_the_runtime_and_its_dataset_give_one_capacity(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    # A former worker keeps its blocks: the Dataset's cacheCapacity counted its tiers (so cached never exceeds it),
    # the Runtime's only the ring's, and `shoal get runtimes` said 1GiB beside the Dataset's 2GiB.
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2"), "train")
        await apply(bus, bucket, "train", replicas=2)
        await workers_of(bus, "train", ["n1", "n2"], serving=2)
        for node in ("n1", "n2"):
            await bus.publish(subjects.agent_inventory(node), InventorySnapshot(
                node=node, dataset=ObjectRef(name="train"), incarnation="i1", seq=1, instance=f"{node}-agent",
                counters=CacheCounters(cached_bytes=3, capacity_bytes=2**30)))
        await apply(bus, bucket, "train", replicas=1)
        await workers_of(bus, "train", ["n1"], serving=2)

        async def both_capacities() -> tuple[str, str] | None:
            dataset, runtime = await dataset_record(bus, "train"), await runtime_record(bus, "train")
            if dataset is None or runtime is None or len(dataset.status.nodes) < 2:
                return None
            capacities = (dataset.status.cache_states.cache_capacity, runtime.status.cache_capacity)
            return capacities if capacities == ("2.00GiB", "2.00GiB") else None

        try:
            await eventually(both_capacities, 15, "the dataset's and the runtime's capacities agree")
        except AssertionError:
            dataset, runtime = await dataset_record(bus, "train"), await runtime_record(bus, "train")
            raise AssertionError(f"dataset {dataset and dataset.status.cache_states}, runtime "
                                 f"{runtime and runtime.status.cache_capacity}") from None


@pytest.mark.timeout(90)
async def test_a_worker_shortfall_names_the_silent_worker_holding_the_seat(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2", "n3"), "train")
        await apply(bus, bucket, "train", replicas=2, affinity=zone_in("a"))
        await workers_of(bus, "train", ["n1", "n3"], serving=3)
        # n1 falls silent: it keeps its seat (not ready) until its record expires. The message blamed n2, which
        # could never have been a worker, and did not name n1.
        del beats.serves["n1"]

        async def n1_silent() -> RuntimeRecord | None:
            record = await runtime_record(bus, "train")
            return record if record and "cache workers ready" in record.status.message else None

        record = await eventually(n1_silent, 20, "a shortfall once n1 is silent")
        assert record.status.message.startswith("1 of 2 cache workers ready (n1: a worker with no heartbeat since ")
        assert record.status.message.endswith(
            "; n2: does not match nodeAffinity: topology.kubernetes.io/zone In [a]; see notPicked)")


async def agent_record_of(bus: Bus, node: str) -> AgentRecord | None:
    record, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), node, AgentRecord)
    return record


@pytest.mark.timeout(90)
async def test_two_agents_beating_as_one_node_make_it_no_worker_until_one_stops(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A window the test can wait out (the agents' records' lifetime, a minute, otherwise); how long it is does not
    # change what happens after it.
    monkeypatch.setattr(domain, "INSTANCE_CONFLICT_SECONDS", 2.0)
    duplicate = "two agents beat as node n1: give each its own SHOAL_NODE_NAME"
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    async with services_and_agents(bus, settings) as beats:
        await beats.set(("n1", "n2"), "train")
        await apply(bus, bucket, "train", replicas=2)
        await workers_of(bus, "train", ["n1", "n2"], serving=2)

        # A second agent is given n1's name: their beats took turns in n1's record, its worker and peer URL
        # with them, and nothing said so. Now n1 gives up its seat (there is no spare to take it) and says why.
        with structlog.testing.capture_logs() as logs:
            beats.instances["n1"] = ("n1-agent", "n1-second")
            record = await workers_of(bus, "train", ["n2"], serving=2)
            assert [(p.node, p.reason) for p in record.status.not_picked] == [("n1", duplicate)]
            assert "n1: " + duplicate in record.status.message

            # The second one stops: once only one agent beat as n1 for the window, n1 is picked again.
            beats.instances["n1"] = ("n1-agent",)
            record = await workers_of(bus, "train", ["n2", "n1"], serving=2)
            assert not record.status.not_picked
        # Said once (at most once a minute), not at every beat of the two.
        [warning] = [log for log in logs if log["event"] == "agents share a node name"]
        assert (warning["log_level"], warning["node"], warning["instances"]) == (
            "warning", "n1", ["n1-agent", "n1-second"])
        # Over, the record says so at its next beat (no conflict time): readers without the window go by it.

        async def over() -> AgentRecord | None:
            agent = await agent_record_of(bus, "n1")
            return agent if agent is not None and agent.conflict_at == 0 else None

        await eventually(over, 15, "n1's record saying the conflict is over")

        # n1's agent restarts: a new instance, and the old one never beats again. That is no second agent.
        beats.instances["n1"] = ("n1-restarted",)

        async def restarted(after: float = 0.0) -> AgentRecord | None:
            agent = await agent_record_of(bus, "n1")
            return agent if agent and agent.heartbeat.instance == "n1-restarted" and agent.received_at > after else None

        first = await eventually(restarted, 15, "a beat of n1's restarted agent")
        assert "n1-agent" in first.instances  # remembered: it would be a conflict if it beat again
        # A later beat: the service has handled the first one and refreshed the runtime since.
        later = await eventually(lambda: restarted(first.received_at), 15, "a second beat of n1's restarted agent")
        assert later.conflict_at == 0
        after = await runtime_record(bus, "train")
        assert after is not None and [w.node for w in after.status.workers] == ["n2", "n1"]
        assert not after.status.not_picked
