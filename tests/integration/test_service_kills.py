"""kill -9 of each service and of the node agent in the middle of their work (issue 15, point 2), each a real
process (``python -m services.<name>``, ``tests.faults.ServiceProcess``) on a real nats-server; SeaweedFS, FUSE
mounts and the Kubernetes API (kmock, ``tests/kube.py``) where the service needs them. After the restart the work
resumes, and what must not happen twice does not:

- runtime service, killed in a burst of 30 applies, one of them applied again (a new spec) while it is down: every
  runtime is applied once and Ready again on the agent's heartbeats, and the command the killed service had fetched
  but not acked, delivered again after its ack wait behind the newer one, does not bring the old spec back;
- loader, killed mid-load while the store holds the agents' GETs: the run resumes (runs 1) and completes, each
  block fetched from the store exactly once;
- scheduler, killed after it folded a node's cached bytes: the restarted one asks the agents for snapshots and
  answers the same share (not zero, not counted twice); one of two replicas killed: the other answers at once and
  takes over the dataset's cache facts;
- node agent, killed mid-DataLoad: its restart replaces the mount process, the agent's part is delivered again and
  the load completes; no block is fetched more than twice, and at most the two GETs the replacement cut twice;
- Kubernetes bridge, killed while it publishes the commands of 20 Dataset objects: every one is held (finalizer)
  with its status written back, each dataset applied once (the commands' ids are deterministic).

The dataset service killed mid-sync and the agent killed with its mount in use are in ``test_crash_recovery``.
The runtime service's, the loader's and the first scheduler's kills run in ``make test`` (the runtime's waits out
the ack wait, ``libs.bus.ACK_WAIT_SECONDS``: ~30 s when it was 30 s, ~8 s in all since it is 5 s); the others, which
start mount processes or wait for what a killed process held, in ``make soak`` (``SHOAL_SOAK=1``) only, to keep
``make test`` within its time budget. ``make soak`` runs every test of this file once, those of ``make test`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from libs import kube, subjects
from libs.bus import Bus
from libs.config import AgentSettings, Settings
from libs.events.common import ObjectMeta
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from libs.events.schedule import DatasetUse, ScoreRequest
from libs.ring import primary_owner
from services.agent import app as agent_app
from services.dataset import app as dataset_app
from services.loader import app as loader_app
from services.runtime import app as runtime_app
from tests.conftest import SeaweedServer, put_objects
from tests.faults import HttpProxy, ServiceProcess, service_env
from tests.helpers import FactCollector, dataset_record, eventually, running, runtime_record
from tests.integration.agent_stack import (
    NODE,
    Node,
    agent_env,
    mount_pids,
    mounted_paths,
    node_stack,
    read_file,
)
from tests.integration.test_dataload_agents import (
    NAME,
    blocks_under,
    cached,
    finished,
    manifest,
    objects,
    pairs,
    single,
    snapshot,
    store_gets,
)
from tests.integration.test_kube_bridge import MEM_TIER, SHOAL, SHOAL_RUNTIME, cluster, files  # noqa: F401
from tests.integration.test_loader import dataload, phase_of
from tests.integration.test_scheduler_api import ask
from tests.reliability import record_fault, stopwatch

# The kills whose recovery starts mount processes or waits for what the killed process held run in `make soak` only;
# the runtime service's (its ack wait is 5 s now), the loader's and the first scheduler's run in `make test` too.
soak_only = pytest.mark.soak("a kill whose recovery waits out the ack wait or starts mount processes")

MEM = TieredStore(levels=[Level(mediumtype="MEM", quota="64Mi")])


def s3_env(seaweedfs: SeaweedServer) -> dict[str, str]:
    return {"SHOAL_S3_ENDPOINT": seaweedfs.endpoint,
            "SHOAL_S3_ACCESS_KEY_ID": seaweedfs.config.access_key_id,
            "SHOAL_S3_SECRET_ACCESS_KEY": seaweedfs.config.secret_access_key}


@contextlib.asynccontextmanager
async def in_process_agent(settings: Settings, node: str = "node-k") -> AsyncIterator[None]:
    """A node agent with no dataset to mount (so no FUSE): it beats for every runtime."""
    node_settings = dataclasses.replace(settings, agent=AgentSettings(node_name=node, heartbeat_seconds=1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(agent_app.run(node_settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def commands_acked(bus: Bus, durable: str) -> None:
    """Until the durable consumer of the commands stream has nothing delivered and unacked, nothing pending."""
    async def settled() -> bool:
        info = await bus.js.consumer_info(subjects.STREAM_COMMANDS, durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, timeout=60, what=f"every command of {durable} acked")


# --- runtime service ---

RUNTIMES = 30


async def test_the_runtime_service_killed_mid_burst_applies_each_runtime_once(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    facts = FactCollector()
    await facts.start(bus)
    service = ServiceProcess("runtime", service_env(settings.nats.urls), tmp_path / "runtime.log")
    try:
        service.start()
        async with in_process_agent(settings):
            commands = [RuntimeApply(runtime=Runtime(metadata=ObjectMeta(name=f"rt-{i:02d}"),
                                                     spec=RuntimeSpec(tieredstore=MEM)))
                        for i in range(RUNTIMES)]
            for command in commands:
                await bus.publish(subjects.RUNTIME_APPLY, command)
            await facts.wait_for("runtime.accepted.v1", timeout=30, causationId=commands[0].id)
            service.kill()
            with stopwatch() as recovery:
                done = {fact["causationId"] for fact in facts.of_type("runtime.accepted.v1")}
                assert len(done) < RUNTIMES, "the kill must land mid-burst"
                # Re-applied while the service is down: the first runtime not done yet, most likely fetched by the
                # killed service and unacked, so JetStream delivers it again after its ack wait, behind this one.
                again = next(i for i, c in enumerate(commands) if c.id not in done)
                changed = RuntimeApply(runtime=Runtime(
                    metadata=ObjectMeta(name=f"rt-{again:02d}"),
                    spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="128Mi")]))))
                await bus.publish(subjects.RUNTIME_APPLY, changed)  # while the service is down
                service.start()

                async def all_ready() -> list[Any] | None:
                    records = [await runtime_record(bus, f"rt-{i:02d}") for i in range(RUNTIMES)]
                    ok = all(r is not None and r.status.phase == "Ready" for r in records)
                    record = records[again]
                    latest = record is not None and record.runtime == changed.runtime
                    return records if ok and latest else None

                try:
                    records = await eventually(all_ready, timeout=60, what="every runtime applied and Ready")
                except AssertionError as err:
                    records = [await runtime_record(bus, f"rt-{i:02d}") for i in range(RUNTIMES)]
                    states = Counter((r.generation, r.status.phase) if r else None for r in records)
                    raise AssertionError(f"{err}: (generation, phase) counts {dict(states)}") from None
            # The commands in flight at the kill come back after their ack wait, behind the newer ones: wait until
            # every delivered command is acked, then no runtime may have moved on (nor back to an older spec).
            await commands_acked(bus, subjects.DURABLE_RUNTIME_COMMANDS)
            records = [await runtime_record(bus, f"rt-{i:02d}") for i in range(RUNTIMES)]
            # The re-applied one: generation 2 if the killed service had applied its first command, else 1 (the
            # newer command came first, and the first one, delivered again after it, is stale).
            generations = [r.generation for r in records if r]
            assert generations[:again] + generations[again + 1:] == [1] * (RUNTIMES - 1), "a runtime applied twice"
            assert generations[again] <= 2, "the re-applied runtime applied more than twice"
            assert records[again] is not None and records[again].runtime == changed.runtime, "an older spec is back"
            assert {c.id for c in commands} <= {f["causationId"] for f in facts.of_type("runtime.accepted.v1")}
        assert service.stop() == 0, service.tail()
    finally:
        service.close()
    record_fault(f"kill -9 of the runtime service in a burst of {RUNTIMES} runtime applies ({len(done)} done)",
                 "the restarted service applies the rest and the one re-applied while it was down; all Ready on "
                 "the agent's heartbeats", recovery[0],
                 lost="nothing (each applied once; the stale redelivery of the re-applied one ignored)",
                 area="services")


# --- loader ---


async def test_the_loader_killed_mid_load_resumes_and_fetches_each_block_once(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    service = ServiceProcess("loader", service_env(settings.nats.urls), tmp_path / "loader.log")
    async with single(bus, settings, seaweedfs, bucket, tmp_path, load_concurrency=2) as stack:
        try:
            stack.store.hold()
            service.start()
            await bus.publish(subjects.DATALOAD_APPLY, dataload("resumed", dataset=NAME))

            async def two_held() -> bool:
                return stack.store.waiting == 2

            await eventually(two_held, timeout=30, what="two block GETs held (SHOAL_LOAD_CONCURRENCY=2)")
            await phase_of(bus, "Executing", "resumed")
            service.kill()
            with stopwatch() as recovery:
                service.start()
                stack.store.release()
                done = await finished(bus, "resumed", timeout=60)
            everything = blocks_under(stack.entries, "")
            assert done.status.runs == 1, "the run was resumed, not started again"
            assert sorted(store_gets(stack.store)) == sorted(everything), "each block fetched once"
            assert cached(await snapshot(bus, NODE, NAME)) == pairs(everything)
            assert service.stop() == 0, service.tail()
        finally:
            stack.store.release()
            service.close()
    record_fault("kill -9 of the loader mid-load (the store holding the agent's GETs)",
                 "the restarted loader resumes the run (runs 1) and it completes", recovery[0],
                 lost="nothing (each block fetched from the store once)", area="services")


# --- scheduler ---


async def shares(bus: Bus) -> dict[str, float]:
    reply = await ask(bus, ScoreRequest(datasets=[DatasetUse(name="sched")], limit=0))
    return {score.node: score.share for score in reply.scores}


async def test_the_scheduler_killed_rebuilds_what_it_knows_from_snapshots(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    body = os.urandom(3 * 1024 * 1024)
    await put_objects(seaweedfs, bucket, {"a.bin": body, "b.bin": body})
    service = ServiceProcess("scheduler", service_env(settings.nats.urls), tmp_path / "scheduler.log")
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("sched", bucket)
            root = await node.wait_mounted("sched", expect="b.bin", timeout=60)
            assert await read_file(root / "a.bin") == body  # half the dataset cached on the node
            service.start()

            async def half() -> dict[str, float] | None:
                with contextlib.suppress(Exception):
                    found = await shares(bus)
                    return found if found.get(NODE) == 0.5 else None
                return None

            before = await eventually(half, timeout=30, what="the scheduler sees half the dataset on the node")
            service.kill()
            with stopwatch() as recovery:
                service.start()
                after = await eventually(half, timeout=30, what="the same share after the restart")
            assert after == before
            assert service.stop() == 0, service.tail()
    finally:
        service.close()
    record_fault("kill -9 of the scheduler after it folded a node's inventory",
                 "the restarted scheduler asks the agents for snapshots and answers the same share", recovery[0],
                 lost="nothing (the share neither lost nor counted twice)", area="services")


@soak_only
async def test_one_of_two_scheduler_replicas_killed_the_other_answers_and_publishes_its_cache_facts(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """Two replicas each fold the whole inventory and share the score requests; the one that publishes the dataset's
    cache facts (its owner among the live replicas) is killed. The survivor answers the same share at once and,
    once the killed one's beat has aged out, publishes the dataset's figure when it moves."""
    body = os.urandom(3 * 1024 * 1024)
    await put_objects(seaweedfs, bucket, {"a.bin": body, "b.bin": body})
    names = ("sched-a", "sched-b")
    owner = primary_owner(subjects.resource_key("default", "sched"), names)
    assert owner is not None
    replicas = {name: ServiceProcess("scheduler", {**service_env(settings.nats.urls), "SHOAL_REPLICA_NAME": name},
                                     tmp_path / f"{name}.log") for name in names}
    facts = FactCollector()
    await facts.start(bus, subjects.SCHEDULER_FACTS)
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("sched", bucket)
            root = await node.wait_mounted("sched", expect="b.bin", timeout=60)
            assert await read_file(root / "a.bin") == body  # half the dataset cached on the node
            for replica in replicas.values():
                replica.start()

            async def half() -> dict[str, float] | None:
                with contextlib.suppress(Exception):
                    found = await shares(bus)
                    return found if found.get(NODE) == 0.5 else None
                return None

            before = await eventually(half, timeout=30, what="both replicas see half the dataset on the node")
            await facts.wait_for("scheduler.dataset.cache.v1", timeout=30, name="sched", uniqueCachedBytes=len(body))
            replicas[owner].kill()
            with stopwatch() as recovery:
                for _ in range(5):  # whichever replica NATS would have picked, the survivor answers
                    assert await eventually(half, timeout=10, what="the survivor's answer") == before
                assert await read_file(root / "b.bin") == body  # the whole dataset cached now
                await facts.wait_for("scheduler.dataset.cache.v1", timeout=60, name="sched",
                                     uniqueCachedBytes=2 * len(body))
            survivor = next(name for name in names if name != owner)
            assert replicas[survivor].stop() == 0, replicas[survivor].tail()
    finally:
        for replica in replicas.values():
            replica.close()
    record_fault("kill -9 of one of two scheduler replicas, the one publishing the dataset's cache facts",
                 "the survivor answered every score request with the same share at once, and published the "
                 "dataset's new figure once the killed one's beat had aged out", recovery[0],
                 lost="nothing (no score request unanswered)", area="services")


# --- node agent, mid-DataLoad ---


@soak_only
async def test_the_agent_killed_mid_load_comes_back_and_the_load_completes(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, objects())
    store = HttpProxy(seaweedfs.endpoint)
    await store.start()
    agent = AgentSettings(node_name=NODE, mount_root=str(tmp_path / "mnt"), heartbeat_seconds=0.5,
                          load_concurrency=2)
    node_settings = dataclasses.replace(settings, agent=agent)
    env = {**agent_env(node_settings, seaweedfs, agent), "SHOAL_HEARTBEAT_SECONDS": "0.5",
           "SHOAL_LOAD_CONCURRENCY": "2"}
    process = ServiceProcess("agent", env, tmp_path / "agent.log")
    node = Node(bus, node_settings, seaweedfs, tmp_path / "mnt", tmp_path / "cache")
    old: list[int] = []
    try:
        async with running(lambda stop: dataset_app.run(node_settings, stop),
                           lambda stop: runtime_app.run(node_settings, stop),
                           lambda stop: loader_app.run(node_settings, stop)):
            process.start()
            await node.apply(NAME, bucket, endpoint=store.endpoint)
            mount = await node.wait_mounted(NAME, expect="train/sub/b.bin", timeout=60)
            entries = await manifest(bus, NAME)
            old = mount_pids(mount)
            store.hold()
            await bus.publish(subjects.DATALOAD_APPLY, dataload("through", dataset=NAME))

            async def two_held() -> bool:
                return store.waiting == 2

            await eventually(two_held, timeout=30, what="two block GETs held")
            process.kill()  # the agent goes; its mount process (and its GETs) stay until the new agent replaces it
            with stopwatch() as recovery:
                process.start()
                store.release()  # the orphan finishes or is cut mid-GET when the new agent replaces it

                async def replaced() -> bool:
                    pids = mount_pids(mount)
                    return bool(pids) and not set(pids) & set(old)

                try:
                    await eventually(replaced, timeout=60, what="the restarted agent's own mount process")
                except AssertionError as err:
                    raise AssertionError(f"{err}; mount processes {mount_pids(mount)} (old {old}); "
                                         f"{process.tail(4000)}") from None
                done = await finished(bus, "through", timeout=60)
            everything = blocks_under(entries, "")
            fetched = Counter(store_gets(store))
            assert set(fetched) == set(everything)
            twice = {get for get, count in fetched.items() if count > 1}
            # Only GETs the replacement cut (SHOAL_LOAD_CONCURRENCY=2 at a time) are made again.
            assert max(fetched.values()) <= 2 and len(twice) <= 2, fetched
            assert done.status.runs == 1
            assert cached(await snapshot(bus, NODE, NAME)) == pairs(everything)
            assert process.stop() == 0, process.tail()
    finally:
        store.release()
        process.close()
        for pid in {*old, *mount_pids(tmp_path / "mnt" / "default" / NAME)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in [p for p in mounted_paths() if p.startswith(str(tmp_path))]:
            await asyncio.to_thread(subprocess.run, ["fusermount3", "-u", "-z", path], check=False)
        await store.stop()
    record_fault("kill -9 of the node agent mid-DataLoad (the store holding its GETs)",
                 "the restarted agent replaces its mount process, the part is delivered again and the load "
                 "completes", recovery[0], lost=f"nothing; {len(twice)} block(s) in flight fetched twice",
                 area="agents")


# --- Kubernetes bridge ---

OBJECTS = 20


@soak_only
async def test_the_bridge_killed_mid_publish_applies_every_object_once(
        bus: Bus, tmp_path: Path, cluster: Any) -> None:  # noqa: F811 (the fixture of test_kube_bridge)
    facts = FactCollector()
    await facts.start(bus)
    kubeconfig = cluster.settings.kube.kubeconfig
    env = service_env(cluster.settings.nats.urls, SHOAL_KUBECONFIG=kubeconfig, SHOAL_KUBE_WATCH_SECONDS="30",
                      SHOAL_SECRETS_DIR=str(tmp_path / "secrets"))
    service = ServiceProcess("bridge", env, tmp_path / "bridge.log")
    source = files(tmp_path)
    try:
        async with running(lambda stop: dataset_app.run(cluster.settings, stop),
                           lambda stop: runtime_app.run(cluster.settings, stop)):
            for i in range(OBJECTS):
                await cluster.create(SHOAL, f"ds-{i:02d}", {"mounts": [{"mountPoint": source}]})
                await cluster.create(SHOAL_RUNTIME, f"ds-{i:02d}", {"tieredstore": MEM_TIER})
            service.start()

            async def some_applied() -> bool:
                return bool(facts.of_type("dataset.accepted.v1"))

            await eventually(some_applied, timeout=30, what="the bridge's first dataset applied")
            service.kill()
            with stopwatch() as recovery:
                applied = len({f["name"] for f in facts.of_type("dataset.accepted.v1")})
                service.start()

                async def all_applied() -> list[Any] | None:
                    records = [await dataset_record(bus, f"ds-{i:02d}") for i in range(OBJECTS)]
                    return records if all(r is not None for r in records) else None

                records = await eventually(all_applied, timeout=60, what="every Dataset object applied")

                async def all_reported() -> bool:
                    return all(_reported(cluster.get(SHOAL, f"ds-{i:02d}")) for i in range(OBJECTS))

                await eventually(all_reported, timeout=60, what="every Dataset object held and its status written")
            assert [r.generation for r in records] == [1] * OBJECTS, "a dataset applied twice"
            assert service.stop() == 0, service.tail()
    finally:
        service.close()
    record_fault(f"kill -9 of the Kubernetes bridge while it publishes {OBJECTS} Dataset objects "
                 f"({applied} applied)", "the restarted bridge re-lists and publishes the rest; every object "
                 "held (finalizer) with its status written back", recovery[0],
                 lost="nothing (each dataset applied once)", area="services")


def _reported(obj: dict[str, Any] | None) -> bool:
    """The bridge holds the object (its finalizer) and wrote Shoal's status back (a phase, not Failed)."""
    phase = ((obj or {}).get("status") or {}).get("phase")
    return bool(phase) and phase != "Failed" and kube.FINALIZER in (obj or {}).get("metadata", {}).get("finalizers", [])

