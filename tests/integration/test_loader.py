"""The loader service on a real nats-server: DataLoad and DataClean runs, progress, Cron, OnEvent, runAfter, TTL,
bad input, delete, and a loader restarted mid-run.

The loader's ``app.run`` runs in-process. Datasets, runtimes and manifests are written straight into their KV
buckets and the Object Store (what the dataset and runtime services would write), so each test sets exactly the
state it needs. ``ScriptedAgent`` stands in for the mount process's task executor (``services/agent/tasks.py``,
written on another branch): it consumes each node's task subject through the durable a mount process uses, and
publishes ``TaskProgress`` as the protocol says (cumulative, then a final ``done``), acking after the final one.
End-to-end tests with real agents, FUSE mounts and a store come after the merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import pytest
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from libs import ring, subjects
from libs.bus import DAY, NODE_TASK_MESSAGES, Bus, Delivery, kv_load, object_names
from libs.documents import Command, documents_to_commands, parse_documents
from libs.events.agent import AgentHeartbeat, BlockId, MountGroup, MountState
from libs.events.common import ObjectMeta, ObjectRef, parse_rfc3339
from libs.events.dataset import (
    CONDITION_SYNCED,
    Condition,
    Dataset,
    DatasetApply,
    DatasetRecord,
    DatasetResync,
    DatasetSpec,
    DatasetStatus,
    ManifestEntry,
    Mount,
)
from libs.events.operation import (
    CleanTarget,
    DataClean,
    DataCleanApply,
    DataCleanSpec,
    DataLoad,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataLoadSpec,
    DatasetRef,
    NodeTask,
    OperationRecord,
    OperationRef,
    TargetPath,
    TaskCancel,
    TaskPartsCancel,
    TaskProgress,
)
from libs.events.runtime import (
    CacheWorker,
    Level,
    Runtime,
    RuntimeApply,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    TieredStore,
)
from libs.manifest import ManifestStore, ManifestWriter
from services.dataset import app as dataset_app
from services.loader import app as loader_app
from services.loader import domain
from services.loader.handlers import LoaderHandlers
from services.runtime import app as runtime_app
from tests.conftest import NatsServer
from tests.helpers import (
    FactCollector,
    cancel_and_wait,
    eventually,
    json_lines,
    json_logs,
    make_settings,
    object_meta_subject,
    pending_reads_zero,
    running,
    unwatched_mirror,
)
from tests.integration.test_cli import shoal
from tests.metric_values import Snapshot, exists, value

BLOCK = 4096
NODES = ["node-a", "node-b", "node-c"]


# --- state the dataset and runtime services would write ---


async def put_dataset(bus: Bus, entries: list[ManifestEntry], name: str = "data", phase: str = "Bound",
                      requests: int = 0, manifest: str = "", incarnation: str = "", listed: bool = True,
                      conditions: tuple[Condition, ...] = (), synced_at: str = "") -> None:
    store = await ManifestStore.of(bus)
    manifest = manifest or store.name("default", name)
    with ManifestWriter() as writer:
        for entry in entries:
            writer.add(entry)
        await store.save(manifest, writer)
    record = DatasetRecord(
        dataset=Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=[Mount(mount_point="local:///x")])),
        generation=1, sync_requests=requests, incarnation=incarnation,
        status=DatasetStatus(phase=phase, synced_generation=1, synced_requests=requests,  # type: ignore[arg-type]
                             manifest=manifest if listed else "", conditions=list(conditions),
                             last_sync_time=(synced_at or f"sync-{requests}") if listed else ""))
    await (await bus.kv(subjects.KV_DATASETS)).put(subjects.resource_key("default", name), msgspec.json.encode(record))


async def put_runtime(bus: Bus, nodes: list[str], name: str = "data", not_ready: tuple[str, ...] = (),
                      block_size: int = BLOCK, workers: list[str] | None = None, starting: bool = False) -> None:
    """A Ready runtime whose ready nodes are ``nodes`` and whose workers are ``workers`` (all of ``nodes`` if None:
    in the ring), and ``not_ready`` picked but out of it. ``starting``: the ready workers serve peers but have no
    peer URL yet (their peer servers starting, just after their agents restarted): no ring."""
    record = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name=name)), generation=1, status=RuntimeStatus(
        phase="Ready", ready_nodes=nodes, block_size_bytes=block_size,
        workers=[*(CacheWorker(node=n, serves_peers=starting, peer_url="" if starting else f"http://{n}:1")
                   for n in (nodes if workers is None else workers)),
                 *(CacheWorker(node=n, ready=False, peer_url=f"http://{n}:1") for n in not_ready)]))
    await (await bus.kv(subjects.KV_RUNTIMES)).put(subjects.resource_key("default", name), msgspec.json.encode(record))


def files(*specs: tuple[str, int], etag: str = "e1") -> list[ManifestEntry]:
    return [ManifestEntry(path=f"/x/{key}", mount=0, key=key, size=size, etag=etag, mtime=0.0) for key, size in specs]


def dataload(name: str = "warm", **spec: Any) -> DataLoadApply:
    return DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name=name),
                                            spec=DataLoadSpec(dataset=DatasetRef(name=spec.pop("dataset", "data")),
                                                              **spec)))


async def operation(bus: Bus, name: str = "warm", kind: str = "DataLoad") -> OperationRecord | None:
    found, _ = await kv_load(await bus.kv(subjects.KV_OPERATIONS), subjects.operation_key(kind, "default", name),
                             OperationRecord)
    return found


async def phase_of(bus: Bus, phase: str, name: str = "warm", kind: str = "DataLoad",
                   runs: int | None = None) -> OperationRecord:
    async def probe() -> OperationRecord | None:
        found = await operation(bus, name, kind)
        if found and found.status.phase == phase and (runs is None or found.status.runs == runs):
            return found
        return None

    return await eventually(probe, what=f"{kind} {name} {phase} (runs {runs})")


# --- the stand-in for the mount processes' task executor ---


@dataclass
class ScriptedAgent:
    """Consumes every node's parts of one dataset like a mount process (durable ``task_durable``, explicit ack),
    reports cumulative progress and a final ``done``, and records what it saw. While ``hold`` is set it reports
    half of a part and waits (a long part); ``fail`` makes it report failed blocks; on the nodes in ``lose`` the
    final report of a part is lost (kept in ``lost``) and the part acknowledged, as a mount process that gave up on
    a part and failed to publish its final report leaves it (the server delivers it no more). Like a mount
    process, it skips (acks without work) a part whose run the operation's record does not show as current and
    Executing, or whose run a ``TaskCancel`` named (or the part a ``TaskPartsCancel`` named on its node); a held part
    of a cancelled run ends at once with a final "cancelled"."""

    bus: Bus
    nodes: list[str]
    dataset: str = "data"
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    fail: str = ""
    lose: set[str] = field(default_factory=set)
    lost: list[TaskProgress] = field(default_factory=list)
    seen: list[tuple[str, int]] = field(default_factory=list)  # (task id, stream sequence)
    tasks: dict[str, NodeTask] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # parts of a run that is not current
    cancelled: set[str] = field(default_factory=set)  # runs a TaskCancel named
    cancelled_parts: set[tuple[str, str, int]] = field(default_factory=set)  # (run, node, part) a TaskPartsCancel named
    _workers: list[asyncio.Task[None]] = field(default_factory=list)
    _cancels: Any = None

    async def start(self) -> None:
        async def on_cancel(msg: Any) -> None:
            cancel = msgspec.json.decode(msg.data, type=TaskCancel | TaskPartsCancel)
            if isinstance(cancel, TaskCancel):
                self.cancelled.add(cancel.run)
            else:
                self.cancelled_parts |= {(cancel.run, cancel.node, part) for part in cancel.parts}

        self._cancels = await self.bus.nc.subscribe(subjects.TASK_CANCEL, cb=on_cancel)
        for node in self.nodes:
            self._workers.append(asyncio.create_task(self._work(node)))

    async def stop(self) -> None:
        await cancel_and_wait(*self._workers)
        if self._cancels is not None:
            await self._cancels.unsubscribe()

    async def _subscribe(self, node: str) -> Any:
        """The node's durable, on the node's task stream once the loader has made it (as a mount process waits).
        Unlike a mount process's, of every life of the dataset (``subjects.node_task``): a test may delete and apply
        it again under one stand-in."""
        subject = subjects.node_task(node, "default", self.dataset, "")
        config = js_api.ConsumerConfig(durable_name=subjects.task_durable(node, "default", self.dataset, ""),
                                       ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=120.0,
                                       filter_subjects=[subject, f"{subject}.>"], max_ack_pending=1)
        while True:
            try:
                return await self.bus.js.pull_subscribe(subject, durable=config.durable_name,
                                                        stream=subjects.task_stream(node), config=config)
            except NotFoundError:
                await asyncio.sleep(0.1)  # no stream yet: the loader makes it before the node's first part

    async def _work(self, node: str) -> None:
        sub = await self._subscribe(node)
        while True:
            try:
                messages = await sub.fetch(1, timeout=0.5)
            except TimeoutError:
                continue  # nothing for this node in half a second
            except Exception:
                if self.bus.nc.is_closed:
                    return  # the test's connection is gone: a fetch would fail at once, for ever
                await asyncio.sleep(0.1)  # a fetch failing at once must not spin the loop (nor block cancellation)
                continue
            for message in messages:
                task = msgspec.json.decode(message.data, type=NodeTask)
                self.seen.append((task.id, message.metadata.sequence.stream))
                if not self._cancelled(task) and await self._current(task.run):
                    self.tasks[task.id] = task
                    await self._do(task)
                else:
                    self.skipped.append(task.id)
                await message.ack()

    async def _current(self, run: str) -> bool:
        """The protocol's check before a part: the operation's record shows this run, Executing."""
        key, number = run.rsplit(".", 1)
        found, _ = await kv_load(await self.bus.kv(subjects.KV_OPERATIONS), key, OperationRecord)
        return found is not None and found.status.runs == int(number) and found.status.phase == "Executing"

    async def _do(self, task: NodeTask) -> None:
        sizes = [size for file in task.blocks for _, size in file.blocks]
        total, count = sum(sizes), len(sizes)
        if task.action == "clean":
            total, count = 1000, 0  # freed bytes
        progress = TaskProgress(id=f"{task.id}.0", run=task.run, part=task.part, node=task.node,
                                blocks_done=count // 2, bytes_done=total // 2)
        await self.bus.publish(subjects.task_progress(task.node), progress)
        if self.hold.is_set():
            await eventually(lambda: self._released(task), timeout=60, what="agent released")
        if self._cancelled(task):
            final = msgspec.structs.replace(progress, id=f"{task.id}.1", done=True, message="cancelled")
            await self.bus.publish(subjects.task_progress(task.node), final)
            return
        failed = 1 if self.fail else 0
        final = msgspec.structs.replace(progress, id=f"{task.id}.1", blocks_done=count - failed,
                                        bytes_done=total, files_done=list(range(len(task.blocks))), done=True,
                                        failed=failed, message=self.fail)
        if task.node in self.lose:
            self.lost.append(final)
            return
        await self.bus.publish(subjects.task_progress(task.node), final)

    def _cancelled(self, task: NodeTask) -> bool:
        return task.run in self.cancelled or (task.run, task.node, task.part) in self.cancelled_parts

    async def _released(self, task: NodeTask) -> bool:
        return not self.hold.is_set() or self._cancelled(task)

    def keys(self, run: str) -> set[str]:
        return {file.key for task in self.tasks.values() if task.run == run for file in task.blocks}


@contextlib.asynccontextmanager
async def agent(bus: Bus, nodes: list[str], **options: Any) -> AsyncIterator[ScriptedAgent]:
    scripted = ScriptedAgent(bus, nodes, **options)
    await scripted.start()
    try:
        yield scripted
    finally:
        await scripted.stop()


def recorded_handlers(monkeypatch: pytest.MonkeyPatch) -> list[LoaderHandlers]:
    """The handlers of every loader the test starts from now on, in the order they were made."""
    created: list[LoaderHandlers] = []

    class Recorded(LoaderHandlers):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(loader_app, "LoaderHandlers", Recorded)
    return created


def loader(nats_server: NatsServer, clock: Callable[[], float] | None = None, **options: Any) -> Any:
    settings = make_settings(nats_server.url)
    if clock is not None:
        options["clock"] = clock
    return running(lambda stop: loader_app.run(settings, stop, **options))


async def publish(bus: Bus, subject: str, event: msgspec.Struct) -> None:
    await bus.publish(subject, event)


async def gauges(expected: dict[tuple[str, tuple[str, str]], float]) -> None:
    """Wait until each gauge (name, (kind, phase or operation)) has its value: the loader recounts them 4 times a
    second."""

    def labels(name: str, values: tuple[str, str]) -> dict[str, str]:
        return {"kind": values[0], ("phase" if name == "shoal_operations" else "operation"): values[1]}

    async def probe() -> bool:
        return all(value(name, **labels(name, values)) == want for (name, values), want in expected.items())

    await eventually(probe, what=f"gauges at {expected}")


async def _true(result: bool) -> bool:
    return result


# --- tests ---


async def test_a_load_completes_with_progress(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("train/a", 3 * BLOCK), ("train/b", BLOCK + 1), ("other", BLOCK)))
    await put_runtime(bus, NODES)
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    metrics = Snapshot()
    async with loader(nats_server), agent(bus, NODES) as scripted:
        command = dataload(target=[TargetPath(path="/x/train", replicas=2)])
        await publish(bus, subjects.DATALOAD_APPLY, command)
        await facts.wait_for("operation.accepted.v1", causationId=command.id)
        done = await phase_of(bus, "Complete")
        # The gauges follow: one DataLoad, Complete, its run's bytes all done.
        await gauges({("shoal_operations", ("DataLoad", "Complete")): 1,
                      ("shoal_operations", ("DataLoad", "Pending")): 0,
                      ("shoal_operation_bytes_done", ("DataLoad", "default/warm")): 2 * (4 * BLOCK + 1),
                      ("shoal_operation_bytes_planned", ("DataLoad", "default/warm")): 2 * (4 * BLOCK + 1)})
    assert metrics.moved("shoal_operation_runs_total", kind="DataLoad", phase="Complete") == 1
    assert metrics.moved("shoal_operation_runs_total", kind="DataLoad", phase="Failed") == 0
    progress = done.status.progress
    assert progress.files_total == 2 and progress.files_done == 2
    assert progress.bytes_total == progress.bytes_done == 2 * (4 * BLOCK + 1)  # two replicas of each block
    assert sum(n.bytes_done for n in progress.nodes) == progress.bytes_done
    assert done.status.duration.endswith("s") and done.status.last_successful_time
    assert done.status.runs == 1 and done.status.start_time and done.status.completion_time
    assert scripted.keys("dataload.default.warm.1") == {"train/a", "train/b"}
    holders: dict[tuple[str, int], set[str]] = {}
    for task in scripted.tasks.values():
        for file in task.blocks:
            for index, _ in file.blocks:
                holders.setdefault((file.key, index), set()).add(task.node)
    assert len(holders) == 5 and all(len(nodes) == 2 for nodes in holders.values())
    phases = [e["status"].get("phase", "Pending") for e in facts.of_type("operation.status.v1")]
    assert phases[0] == "Pending" and "Executing" in phases and phases[-1] == "Complete"
    # Each node's parts went into a stream of that node's, which the loader made; the progress stream holds no part.
    for node in NODES:
        config = (await bus.js.stream_info(subjects.task_stream(node))).config
        assert config.subjects == [subjects.node_tasks(node)]
        assert config.max_age == DAY and config.max_msgs == NODE_TASK_MESSAGES and config.num_replicas == 1
    assert (await bus.js.stream_info(subjects.STREAM_TASKS)).config.subjects == [subjects.TASK_PROGRESS]


async def test_the_accepted_fact_says_created_unchanged_or_configured_labels_too(bus: Bus,
                                                                                 nats_server: NatsServer) -> None:
    """``shoal apply`` prints what the loader's answer says the apply did: a new DataLoad is created, the same one
    again unchanged, and one whose labels alone changed configured, though its generation stays (only the spec
    moves it)."""
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    first = dataload(policy="Cron", schedule="0 0 1 1 *")
    again = msgspec.structs.replace(first, id="again")
    labelled = DataLoadApply(id="labelled", data_load=msgspec.structs.replace(
        first.data_load, metadata=ObjectMeta(name="warm", labels={"team": "ml"})))
    async with loader(nats_server):
        said = []
        for command in (first, again, labelled):
            await publish(bus, subjects.DATALOAD_APPLY, command)
            fact = await facts.wait_for("operation.accepted.v1", causationId=command.id)
            said.append((fact["result"], fact["generation"]))
    assert said == [("created", 1), ("unchanged", 1), ("configured", 1)]


@pytest.mark.parametrize(("setup", "spec", "message"), [
    # A dataset missing or not Bound is waited for (the next test), for the wait's time (0.5 s here, 600 s unless
    # told): then the run fails, saying what to change and what it waited for.
    ("none", {}, "dataset default/data does not exist; create it or fix spec.dataset (waited 0.5 s for dataset "
                 "default/data to exist and be Bound)"),
    ("unbound", {}, "is NotBound, not Bound"),
    ("no runtime", {}, "apply a runtime named data in namespace default"),
    ("ok", {"target": [TargetPath(path="/x/nope")]}, "target path '/x/nope' is not in the manifest"),
    ("ok", {"target": [TargetPath(path="/x/a", replicas=4)]}, "replicas 4 is more than the 3 ready cache worker(s)"),
    ("no manifest", {}, "has no manifest yet"),
])
async def test_bad_input_fails_the_run_with_what_to_change(bus: Bus, nats_server: NatsServer, setup: str,
                                                           spec: dict[str, Any], message: str) -> None:
    if setup != "none":
        await put_dataset(bus, files(("a", BLOCK)), phase="NotBound" if setup in ("unbound", "no runtime") else "Bound")
    if setup != "no runtime":
        await put_runtime(bus, NODES)
    if setup == "no manifest":
        await (await ManifestStore.of(bus)).delete(ManifestStore.name("default", "data"))
    metrics = Snapshot()
    async with loader(nats_server, dataset_wait_timeout=0.5):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(**spec))
        failed = await phase_of(bus, "Failed")
    assert message in failed.status.message
    assert metrics.moved("shoal_operation_runs_total", kind="DataLoad", phase="Failed") == 1  # failed to start or not


async def test_a_load_waits_for_its_dataset_to_exist_and_be_bound_then_runs(bus: Bus,
                                                                              nats_server: NatsServer) -> None:
    """As Fluid requeues it: a DataLoad applied before its Dataset (a folder where dataload.yaml sorts first), or
    with it and its runtime in one file, is Pending saying what it waits for, and runs once the dataset is Bound
    and listed.
    Failing it there left a Once load Failed for good, though nothing was wrong with it."""
    async with loader(nats_server), agent(bus, NODES):
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def waiting_for(what: str) -> OperationRecord | None:
            found = await operation(bus)
            return found if found and found.status.waiting_for == what else None

        missing = await eventually(lambda: waiting_for("dataset default/data to exist and be Bound"))
        assert (missing.status.phase, missing.status.runs, missing.status.message) == ("Pending", 0, "")
        assert not missing.status.waiting_for_operation  # a wait for the dataset is no runAfter's
        await put_dataset(bus, files(("a", BLOCK)), phase="NotBound")
        await eventually(lambda: waiting_for("dataset default/data to be Bound: apply a runtime named data in "
                                             "namespace default"))
        await put_runtime(bus, NODES)
        await eventually(lambda: waiting_for("dataset default/data to be Bound (runtime default/data is Ready)"))
        # Bound as its runtime is Ready, before its first listing ended: no manifest to plan against yet.
        await put_dataset(bus, files(("a", BLOCK)), listed=False)
        await eventually(lambda: waiting_for("dataset default/data to be listed (its first metadata sync)"))
        await put_dataset(bus, files(("a", BLOCK)))
        done = await phase_of(bus, "Complete")
    assert done.status.runs == 1 and not done.status.waiting_for
    assert done.status.progress.files_done == 1, done.status


async def test_a_load_of_a_failed_dataset_fails_at_once_with_its_reason(bus: Bus, nats_server: NatsServer) -> None:
    """Waiting does not cure a dataset its sync failed: the run fails, saying why."""
    await put_dataset(bus, files(("a", BLOCK)), phase="Failed")
    await put_runtime(bus, NODES)
    async with loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        failed = await phase_of(bus, "Failed")
    assert "dataset default/data is Failed, not Bound" in failed.status.message, failed.status


async def test_replicas_above_the_ring_names_the_worker_picked_but_not_ready(bus: Bus, nats_server: NatsServer) -> None:
    """Two workers, one silent (out of the ring): "more than the 1 cache worker(s) ... add cache workers" sent the
    user to scale a runtime that has its two; the message names the one not ready."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, ["node-a"], not_ready=("node-b",))
    async with loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x/a", replicas=2)]))
        failed = await phase_of(bus, "Failed")
    assert failed.status.message == (
        "replicas 2 is more than the 1 ready cache worker(s) of runtime default/data (node-a); picked but not ready: "
        "node-b; lower spec.target[].replicas to at most 1, wait for those not ready, or add cache workers")


async def test_a_run_plans_against_the_new_manifest_when_a_resync_replaced_the_one_it_read(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync finishing between the loader's read of the dataset and its load of the manifest deletes the manifest
    the loader read of (each spec and resync has its own): the loader reads the record again, not Failed."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES)
    load = ManifestStore.load
    resynced = asyncio.Event()

    async def load_after_a_resync(self: ManifestStore, name: str) -> list[ManifestEntry]:
        if name == ManifestStore.name("default", "data") and not resynced.is_set():
            resynced.set()  # what the dataset service does at the end of a resync, just before this load
            await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)), requests=1, manifest="default.data.x-1-1")
            await self.delete(name)
        return await load(self, name)

    monkeypatch.setattr(ManifestStore, "load", load_after_a_resync)
    async with loader(nats_server), agent(bus, NODES):
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        done = await phase_of(bus, "Complete")
    assert resynced.is_set()
    assert done.status.progress.files_done == 2, done.status


async def test_invalid_commands_are_rejected(bus: Bus, nats_server: NatsServer) -> None:
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    async with loader(nats_server):
        bad_cron = dataload(policy="Cron", schedule="61 * * * *")
        await publish(bus, subjects.DATALOAD_APPLY, bad_cron)
        rejected = await facts.wait_for("operation.rejected.v1", causationId=bad_cron.id)
        assert "the minute field '61' is out of range" in rejected["reason"], rejected
        await bus.js.publish(subjects.DATALOAD_APPLY, b'{"type": "dataload.apply.v1", "dataLoad": 3}',
                             headers={"Nats-Msg-Id": "garbage-1"})
        garbage = await facts.wait_for("operation.rejected.v1", causationId="garbage-1")
        assert "invalid event" in garbage["reason"] and garbage["kind"] == "DataLoad"
        missing = DataLoadRun(name="nothing")
        await publish(bus, subjects.DATALOAD_RUN, missing)
        assert "does not exist" in (await facts.wait_for("operation.rejected.v1", causationId=missing.id))["reason"]
    assert await operation(bus) is None


CROSS_NAMESPACE = """\
apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {name: theirs, namespace: team-a}
spec:
  dataset: {name: data, namespace: default}
"""


async def test_an_operation_naming_a_dataset_of_another_namespace_is_refused(bus: Bus,
                                                                             nats_server: NatsServer) -> None:
    """Kubernetes grants DataLoads and DataCleans per namespace: whoever may create them in team-a must not evict
    (or fill) default's cache. Fluid refuses such an operation (TargetDatasetNamespaceNotSame); the loader accepted
    it and cleaned default/data."""
    facts = FactCollector()
    await facts.start(bus)
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        clean = DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="wipe", namespace="team-a"),
            spec=DataCleanSpec(dataset=DatasetRef(name="data", namespace="default"))))
        await publish(bus, subjects.DATACLEAN_APPLY, clean)
        rejected = await facts.wait_for("operation.rejected.v1", causationId=clean.id)
        assert rejected["reason"] == (
            "spec.dataset.namespace 'default' is not the DataClean's own namespace 'team-a': a DataClean works on a "
            "dataset of its own namespace, as in Fluid; create it in namespace default, or leave "
            "spec.dataset.namespace out"), rejected
        result = await shoal(nats_server, "apply", "-f", "-", stdin=CROSS_NAMESPACE)
        assert result.exit_code == 1
        assert "spec.dataset.namespace 'default' is not the DataLoad's own namespace 'team-a'" in result.output
        # The same operation in the dataset's own namespace runs: nothing else refuses it.
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        await phase_of(bus, "Complete", runs=1)
    for kind, name in (("DataClean", "wipe"), ("DataLoad", "theirs")):
        found, _ = await kv_load(await bus.kv(subjects.KV_OPERATIONS), subjects.operation_key(kind, "team-a", name),
                                 OperationRecord)
        assert found is None, found
    assert [task.action for task in scripted.tasks.values()] == ["load"], "no part of a clean reached the node"


async def test_a_command_on_another_commands_subject_is_refused_not_run(bus: Bus, nats_server: NatsServer) -> None:
    """NATS permissions are per subject: a system allowed only ``shoal.cmd.dataload.run`` (to trigger OnEvent loads)
    must not delete a DataLoad or apply a DataClean by sending those commands there. Before, the loader handled a
    command by its type whatever the subject: a delete sent on the run subject deleted the load."""
    facts = FactCollector()
    await facts.start(bus)
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:2])
    async with agent(bus, NODES[:2]), loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        smuggled = DataLoadDelete(name="warm")
        await publish(bus, subjects.DATALOAD_RUN, smuggled)
        rejected = await facts.wait_for("operation.rejected.v1", causationId=smuggled.id)
        assert rejected["reason"] == ("a dataload.delete.v1 command is sent on shoal.cmd.dataload.delete, not on "
                                      "shoal.cmd.dataload.run"), rejected
        assert rejected["kind"] == "DataLoad"
        # Across families too: a DataClean apply on the run subject cleans nothing.
        clean = DataCleanApply(data_clean=DataClean(metadata=ObjectMeta(name="wipe"),
                                                    spec=DataCleanSpec(dataset=DatasetRef(name="data"))))
        await publish(bus, subjects.DATALOAD_RUN, clean)
        assert "not on shoal.cmd.dataload.run" in (
            await facts.wait_for("operation.rejected.v1", causationId=clean.id))["reason"]
    assert await operation(bus) is not None
    assert await operation(bus, "wipe", "DataClean") is None


async def test_a_load_fails_naming_a_node_that_left_with_its_part_not_done(bus: Bus, nats_server: NatsServer) -> None:
    """Its parts would wait for it for ever (and a Cron or OnEvent load would never run again). node-c stays a
    picked worker whose agent is gone: no ring changed, so nothing moves its part (one dropped from the workers
    too has its part moved to the ring: the next test but one)."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    async with agent(bus, NODES) as scripted, loader(nats_server, node_gone_timeout=1.0):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def part_on_node_c() -> bool:
            return any(task.node == "node-c" for task in scripted.tasks.values())

        # Not just Executing: the loader saves Executing, then reads the runtime again to plan. node-c leaving in
        # between gives a plan without it (correct: it is not ready), and this run would never fail. Its part,
        # received by its agent, proves the plan counted on it.
        await eventually(part_on_node_c, what="node-c's part received")
        await put_runtime(bus, NODES[:2], not_ready=("node-c",))
        failed = await phase_of(bus, "Failed")
        scripted.hold.clear()
    assert failed.status.message.startswith("node node-c is no longer a ready node of runtime default/data"), \
        failed.status.message
    assert "run the load again" in failed.status.message


async def test_a_stalled_or_ended_run_shows_no_stale_rate_or_eta(bus: Bus, nats_server: NatsServer) -> None:
    """Parts report half and hold: a rate and an ETA. Nothing moves for STALLED_SECONDS (the loader's clock moved):
    the status says rate 0 and no ETA. The run then ends Failed (a node left): no ETA, the rate over the run."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    now = [time.time()]
    async with agent(bus, NODES) as scripted, loader(nats_server, clock=lambda: now[0], node_gone_timeout=1.0):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def with_eta() -> OperationRecord | None:  # every node's held part has reported its half
            found = await operation(bus)
            progress = found.status.progress if found else None
            return found if progress and progress.eta_seconds is not None and len(progress.nodes) == 3 \
                and all(node.bytes_done for node in progress.nodes) else None

        moving = await eventually(with_eta, what="a rate and an ETA once every node reported")
        now[0] += domain.STALLED_SECONDS + 1

        async def stalled() -> OperationRecord | None:
            found = await operation(bus)
            progress = found.status.progress if found else None
            return found if progress and progress.rate_bytes_per_second == 0 and progress.eta_seconds is None \
                else None

        quiet = await eventually(stalled, what="rate 0 and no ETA once nothing moves")
        await put_runtime(bus, NODES[:2], not_ready=("node-c",))
        failed = await phase_of(bus, "Failed")
        scripted.hold.clear()
    assert moving.status.progress.rate_bytes_per_second > 0
    assert quiet.status.phase == "Executing" and quiet.status.progress.bytes_done == moving.status.progress.bytes_done
    progress = failed.status.progress
    assert progress.eta_seconds is None and 0 < progress.bytes_done < progress.bytes_total, progress
    state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS),
                             subjects.operation_key("DataLoad", "default", "warm"), domain.RunState)
    assert state is not None
    average = progress.bytes_done / (state.finished_at - state.started_at)
    assert progress.rate_bytes_per_second == round(average, 1)


async def test_a_part_whose_final_report_is_lost_fails_the_run_naming_its_node(bus: Bus,
                                                                             nats_server: NatsServer) -> None:
    """node-b's mount process gives up on its part (its fetches failed beyond retries) and the report saying so is
    lost; the node stays ready. The run must not stay Executing for ever: it fails naming node-b once node-b sent
    nothing for the silence timeout. The report arriving late changes nothing: nothing is counted twice."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    async with agent(bus, NODES, lose={"node-b"}, fail="the store is unreachable") as scripted, \
            loader(nats_server, node_silent_timeout=3.0):
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        failed = await phase_of(bus, "Failed")
        assert [progress.node for progress in scripted.lost] == ["node-b"]
        await bus.publish(subjects.task_progress("node-b"), scripted.lost[0])  # the agent's late report

        async def consumed() -> bool:
            info = await bus.js.consumer_info(subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(consumed, what="the late report consumed by the loader")
        after = await operation(bus)
    assert failed.status.message.startswith("node node-b sent no progress for 3 s and its part of the run is not "
                                            "done"), failed.status.message
    assert "run the DataLoad again" in failed.status.message
    assert after == failed  # the late report of the finished run is ignored
    progress = failed.status.progress
    nodes = {node.node: node for node in progress.nodes}
    # node-a and node-c reported their parts whole, node-b the half it reported before the loss: once each.
    assert nodes["node-b"].bytes_done == nodes["node-b"].bytes_total // 2
    assert nodes["node-a"].bytes_done == nodes["node-a"].bytes_total
    assert progress.bytes_done == sum(node.bytes_done for node in progress.nodes) < progress.bytes_total
    assert progress.eta_seconds is None


async def test_a_restarted_loader_resumes_and_publishes_no_part_twice(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    async with agent(bus, NODES) as scripted:
        scripted.hold.set()
        async with loader(nats_server):
            await publish(bus, subjects.DATALOAD_APPLY, dataload())

            async def half_way() -> OperationRecord | None:
                found = await operation(bus)
                return found if found and found.status.progress.bytes_done > 0 else None

            await eventually(half_way, what="progress folded before the restart")
        # The loader is down; agents finish their parts meanwhile, their progress waits in the stream.
        scripted.hold.clear()
        async with loader(nats_server):
            done = await phase_of(bus, "Complete")
    ids = [task_id for task_id, _ in scripted.seen]
    assert ids and len(ids) == len(set(ids)), scripted.seen  # each part once: the republished ones deduplicated
    assert done.status.progress.bytes_done == done.status.progress.bytes_total == 12 * 2 * BLOCK


async def test_cron_runs_on_schedule_once_per_firing(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    now = [1_767_225_600.0 + 10]  # 2026-01-01T00:00:10Z
    async with agent(bus, NODES[:1]):
        async with loader(nats_server, clock=lambda: now[0]):
            await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="* * * * *"))
            pending = await phase_of(bus, "Pending")
            assert pending.status.runs == 0
            now[0] += 60  # past 00:01:00
            first = await phase_of(bus, "Complete", runs=1)
            assert first.status.last_schedule_time == "2026-01-01T00:01:10Z"
        # A restart in the same minute does not run it again.
        async with loader(nats_server, clock=lambda: now[0]):
            now[0] += 30  # 00:01:40: the next firing (00:02:00) has not come
            run = DataLoadRun(name="warm")
            await publish(bus, subjects.DATALOAD_RUN, run)  # a manual run still runs now
            await phase_of(bus, "Complete", runs=2)
            now[0] += 3600  # an hour of missed firings: one run
            await phase_of(bus, "Complete", runs=3)
            record = await operation(bus)
            assert record is not None and record.status.runs == 3


async def fluid_cron_dataload(bus: Bus, schedule: str) -> Command:
    """A Fluid Cron DataLoad of ``schedule`` read as ``shoal apply -f`` reads it, its dataset of one block and a
    runtime of one node in place."""
    (command,), _, errors = documents_to_commands(parse_documents(f"""
apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {{name: warm}}
spec:
  dataset: {{name: data}}
  policy: Cron
  schedule: "{schedule}"
"""))
    assert errors == [] and isinstance(command.event, DataLoadApply)
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    return command


async def test_a_fluid_cron_dataload_with_a_kubernetes_macro_runs_at_its_firing(bus: Bus,
                                                                                nats_server: NatsServer) -> None:
    """Fluid runs a Cron DataLoad as a Kubernetes CronJob, whose schedule may be ``@hourly``; before, Shoal's loader
    rejected it ("not a valid cron expression")."""
    command = await fluid_cron_dataload(bus, "@hourly")
    now = [1_767_225_600.0 + 10]  # 2026-01-01T00:00:10Z
    async with agent(bus, NODES[:1]), loader(nats_server, clock=lambda: now[0]):
        await publish(bus, command.subject, command.event)
        assert (await phase_of(bus, "Pending")).status.runs == 0
        now[0] += 3600  # past 01:00:00
        done = await phase_of(bus, "Complete", runs=1)
        assert done.status.last_schedule_time == "2026-01-01T01:00:10Z"


async def test_a_fluid_cron_dataload_every_five_minutes_runs_at_its_firings(bus: Bus, nats_server: NatsServer) -> None:
    """A Kubernetes CronJob (Fluid's Cron DataLoad) takes robfig/cron's ``@every 5m``; Shoal's loader rejected it
    ("not a valid cron expression"). Its firings are the creation plus whole intervals, however late a run began."""
    command = await fluid_cron_dataload(bus, "@every 5m")
    now = [1_767_225_600.0]  # 2026-01-01T00:00:00Z
    async with agent(bus, NODES[:1]), loader(nats_server, clock=lambda: now[0]):
        await publish(bus, command.subject, command.event)
        pending = await phase_of(bus, "Pending")
        assert pending.status.runs == 0 and pending.created_at == "2026-01-01T00:00:00Z"
        now[0] += 300 + 7  # the first firing, seen 7 s late
        first = await phase_of(bus, "Complete", runs=1)
        assert first.status.last_schedule_time == "2026-01-01T00:05:07Z"
        now[0] += 300 - 7  # 00:10:00, the next firing of the series (not 00:10:07)
        second = await phase_of(bus, "Complete", runs=2)
    assert second.status.last_schedule_time == "2026-01-01T00:10:00Z"


async def test_a_cron_loads_new_schedule_is_observed_at_its_apply_and_runs_at_its_first_firing(
        bus: Bus, nats_server: NatsServer) -> None:
    """Editing a Cron load's schedule moves ``observedGeneration`` to the new generation at once (``kubectl wait``
    and kstatus compare the two), starts no run, and the next run is the new schedule's first firing after
    ``lastScheduleTime``."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    now = [1_767_225_600.0 + 10]  # 2026-01-01T00:00:10Z
    async with agent(bus, NODES[:1]), loader(nats_server, clock=lambda: now[0]):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 0 * * *"))
        pending = await phase_of(bus, "Pending")
        assert pending.generation == 1 and pending.status.observed_generation == 1 and pending.status.runs == 0
        now[0] += 86_400  # 2026-01-02T00:00:10Z: the daily firing
        first = await phase_of(bus, "Complete", runs=1)
        assert first.status.last_schedule_time == "2026-01-02T00:00:10Z"
        now[0] += 30 * 60 - 10  # 00:30: the old schedule's next firing is a day away, the new one's at 01:00
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 * * * *"))

        async def edited() -> OperationRecord | None:
            found = await operation(bus)
            return found if found is not None and found.generation == 2 else None

        seen = await eventually(edited, what="the edited schedule taken in (generation 2)")
        assert seen.status == msgspec.structs.replace(first.status, observed_generation=2)  # and no run started
        now[0] += 30 * 60 + 10  # 01:00:10
        second = await phase_of(bus, "Complete", runs=2)
    assert second.status.start_time == second.status.last_schedule_time == "2026-01-02T01:00:10Z"
    assert second.status.observed_generation == 2


async def test_a_new_run_starts_from_clean_progress_not_the_last_runs_end(bus: Bus, nats_server: NatsServer) -> None:
    """Run 1 of a Cron load Fails; while run 2 executes, its status and run state show nothing of run 1's end
    (message, Failed condition, completion, duration, progress), and the history fields keep their meaning."""
    await put_dataset(bus, files(("a", 2 * BLOCK)))
    await put_runtime(bus, NODES[:1])
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with agent(bus, NODES[:1], fail="the store refused the read") as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 0 1 1 *"))
        await phase_of(bus, "Pending")
        await publish(bus, subjects.DATALOAD_RUN, DataLoadRun(name="warm"))
        failed = await phase_of(bus, "Failed", runs=1)
        scripted.fail = ""
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_RUN, DataLoadRun(name="warm"))

        async def second_run_moving() -> OperationRecord | None:
            found = await operation(bus)
            return found if found and found.status.runs == 2 and found.status.progress.bytes_done else None

        executing = await eventually(second_run_moving, what="run 2 executing with its first progress")
        state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS), key, domain.RunState)
        scripted.hold.clear()
        done = await phase_of(bus, "Complete", runs=2)
    assert failed.status.conditions and failed.status.progress.bytes_done == 2 * BLOCK
    status = executing.status
    assert status.phase == "Executing" and not status.message and not status.conditions, status
    assert (status.duration, status.completion_time) == (domain.UNFINISHED, "")
    assert status.progress.bytes_done == BLOCK and status.progress.bytes_total == 2 * BLOCK  # run 2's half only
    assert status.last_schedule_time == status.start_time and not status.last_successful_time
    assert state is not None and state.run == f"{key}.2" and state.outcome is None and not state.outcome_message
    assert not state.finished_at
    assert [c.type for c in done.status.conditions] == ["Complete"] and done.status.last_successful_time


@pytest.mark.parametrize("policy", ["Cron", "OnEvent"])
async def test_apply_wait_of_a_changed_load_that_runs_later_says_so_and_returns(bus: Bus, nats_server: NatsServer,
                                                                                 policy: str) -> None:
    """A Cron (or OnEvent) DataLoad ran once; ``shoal apply --wait`` of a changed spec starts no run: it must not
    report the previous run's end as this apply's (nor wait for a firing hours away), but say the runs come on
    schedule (on a sync) and return at once."""
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES[:1])
    schedule = '"0 0 1 1 *"' if policy == "Cron" else '""'
    document = f"""apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {{name: warm}}
spec:
  dataset: {{name: data}}
  target: [{{path: /x/b}}]
  policy: {policy}
  schedule: {schedule}
"""
    async with agent(bus, NODES[:1]), loader(nats_server):
        spec: dict[str, Any] = {"schedule": "0 0 1 1 *"} if policy == "Cron" else {}
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy=policy, target=[TargetPath(path="/x/a")], **spec))
        if policy == "Cron":
            await phase_of(bus, "Pending")
            await publish(bus, subjects.DATALOAD_RUN, DataLoadRun(name="warm"))
        before = await phase_of(bus, "Complete", runs=1)
        result = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=document)
        after = await operation(bus)
    why = ("runs on its schedule ('0 0 1 1 *', policy Cron)" if policy == "Cron" else
           "runs when a sync of its dataset finds new or changed objects (policy OnEvent)")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("dataload.")]  # not the loader's logs
    assert lines == [
        "dataload.shoal.io/warm configured",
        f"dataload.shoal.io/warm {why}: --wait does not wait for those runs; see them with `shoal get dataloads`, "
        "or run it now with `shoal run dataload warm`"]
    # The new spec is in effect at once (observedGeneration says so), and nothing else moved: no run started.
    assert after is not None and after.generation == before.generation + 1
    assert after.status == msgspec.structs.replace(before.status, observed_generation=after.generation)


async def test_a_failed_once_load_applied_again_with_its_target_fixed_runs_again_and_wait_reports_that_run(
        bus: Bus, nats_server: NatsServer) -> None:
    """The Failed message says "fix spec.target": the fixed spec (generation 2) must run, and ``apply --wait`` must
    report that run's end, not the Failed end of generation 1 it finds in KV. The same spec applied again runs
    nothing (an unchanged apply is not a new run) and ``--wait`` reports the end already there."""
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES[:1])
    document = """apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {name: warm}
spec:
  dataset: {name: data}
  target: [{path: /x/a}]
"""
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x/nope")]))
        failed = await phase_of(bus, "Failed", runs=1)
        fixed = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=document)
        done = await operation(bus)
        again = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=document)
        after = await operation(bus)
    assert "'/x/nope' is not in the manifest" in failed.status.message and failed.status.observed_generation == 1
    assert fixed.exit_code == 0, fixed.output
    lines = [line for line in fixed.stdout.splitlines() if line.startswith("dataload.")]  # not the loader's logs
    assert lines[0] == "dataload.shoal.io/warm configured" and len(lines) == 2, lines
    assert lines[1].startswith("dataload.shoal.io/warm Complete: 1/1 files"), lines
    assert done is not None and done.generation == 2 and done.status.observed_generation == 2
    assert done.status.phase == "Complete" and done.status.runs == 2 and not done.status.message
    assert scripted.keys("dataload.default.warm.2") == {"a"}
    assert again.exit_code == 0, again.output
    assert "dataload.shoal.io/warm unchanged" in again.stdout.splitlines()
    # Nothing ran and nothing changed but the sequence of the last word (an older command delivered again is stale).
    assert after is not None and after.command_sequence > done.command_sequence
    assert msgspec.structs.replace(after, command_sequence=done.command_sequence,
                                   command_result=done.command_result) == done
    assert after.command_result == "unchanged"  # what the re-apply answered


async def test_a_run_command_delivered_again_after_it_was_counted_runs_once_and_is_not_refused(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The run is counted, then publishing its accepted fact times out (a NATS failover): the command comes again.
    # It must neither count a second run nor be refused as "Executing" (the first may have started meanwhile).
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    run = DataLoadRun(name="warm")
    real_publish = Bus.publish
    failed: list[str] = []

    async def publish_failing_once(self: Bus, subject: str, event: msgspec.Struct, **kwargs: Any) -> Any:
        if subject == subjects.DATALOAD_ACCEPTED and getattr(event, "causation_id", "") == run.id and not failed:
            failed.append(subject)
            raise nats.errors.TimeoutError
        return await real_publish(self, subject, event, **kwargs)

    facts = FactCollector()
    await facts.start(bus)
    async with agent(bus, NODES[:1]), loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 0 1 1 *"))
        await phase_of(bus, "Pending")
        monkeypatch.setattr(Bus, "publish", publish_failing_once)
        await publish(bus, subjects.DATALOAD_RUN, run)
        await facts.wait_for("operation.accepted.v1", causationId=run.id)
        complete = await phase_of(bus, "Complete", runs=1)
        state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS),
                                 subjects.operation_key("DataLoad", "default", "warm"), domain.RunState)
    assert failed and complete.status.runs == 1
    assert state is not None and state.requested == 0  # no second run waiting
    assert facts.of_type("operation.rejected.v1", causationId=run.id) == []


async def test_a_schedule_that_never_fires_is_refused_and_stalls_no_other_operation(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """30 February passes croniter's syntax check but has no next firing. Applied, it is refused with the reason.
    One that got in anyway (stored by a loader before this check) fails its own due check on every tick, and the
    operations sorted after it ("warm" after "aaa") still advance: the Cron load runs when the clock passes its
    firing. Its failure is logged, naming it, at most once a minute of the loader's clock."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    stored = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="aaa"), created_at="2026-01-01T00:00:00Z",
                             load=DataLoadSpec(dataset=DatasetRef(name="data"), policy="Cron", schedule="0 0 30 2 *"))
    await (await bus.kv(subjects.KV_OPERATIONS)).put(subjects.operation_key("DataLoad", "default", "aaa"),
                                                     msgspec.json.encode(stored))
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    now = [1_767_225_600.0 + 10]  # 2026-01-01T00:00:10Z
    with json_logs(monkeypatch) as logs:

        async def logged(count: int) -> None:
            async def probe() -> bool:
                return len(failures(logs.getvalue())) == count
            await eventually(probe, what=f"{count} logged failures of 'aaa'")

        async with agent(bus, NODES[:1]), loader(nats_server, clock=lambda: now[0]):
            never = dataload(name="aaa", policy="Cron", schedule="0 0 30 2 *")
            await publish(bus, subjects.DATALOAD_APPLY, never)
            rejected = await facts.wait_for("operation.rejected.v1", causationId=never.id)
            assert "spec.schedule '0 0 30 2 *' never fires" in rejected["reason"]
            await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="* * * * *"))
            await phase_of(bus, "Pending")
            await logged(1)  # a tick at 00:00:10 failed on "aaa", named
            # The first run may be started by the apply (it advances the operation once, perhaps after this
            # bump) or by a tick; whichever, the ticks at this clock stay silent about "aaa".
            now[0] += 50  # 00:01:00, the firing
            await phase_of(bus, "Complete", runs=1)
            assert len(failures(logs.getvalue())) == 1  # not again within a minute of the loader's clock
            now[0] += 10  # 00:01:10: a minute on, logged again
            await logged(2)
            # Only a tick starts this run, and each tick passes "aaa" first and fails on it.
            now[0] += 50  # 00:02:00
            await phase_of(bus, "Complete", runs=2)
            assert len(failures(logs.getvalue())) == 2
    assert await operation(bus, "aaa") == stored  # the refused apply changed nothing


def failures(logs: str) -> list[dict[str, Any]]:
    """The loader's log lines about failing to advance the operation "aaa"."""
    return [line for line in json_lines(logs) if line.get("operation", "") == "dataload default/aaa"
            and line["event"].startswith("advancing an operation failed")]


async def test_on_event_loads_only_new_or_changed_objects(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES[:2])
    async with agent(bus, NODES[:2]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        assert scripted.keys("dataload.default.warm.1") == {"a", "b"}
        # A resync found "b" overwritten and "c" new.
        await put_dataset(bus, [*files(("a", BLOCK)), *files(("b", BLOCK), ("c", 2 * BLOCK), etag="e2")],
                          requests=1)
        await phase_of(bus, "Complete", runs=2)
        assert scripted.keys("dataload.default.warm.2") == {"b", "c"}
        # A sync that changed nothing runs nothing (the stamp moves, the diff is empty: a run with no parts).
        await put_dataset(bus, [*files(("a", BLOCK)), *files(("b", BLOCK), ("c", 2 * BLOCK), etag="e2")],
                          requests=2)
        third = await phase_of(bus, "Complete", runs=3)
        assert "nothing to load" in third.status.message
        assert not scripted.keys("dataload.default.warm.3")


async def test_on_event_runs_not_on_a_failed_listing_but_on_the_next_good_one(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing that failed (the store unreachable: the dataset service tries again every 15 s, each try a new
    lastSyncTime) keeps the tree the dataset had: no new or changed object to load, so no run. Before, each failed
    try moved the sync stamp and fired a run ("nothing to load"), four a minute while the store was down."""
    created = recorded_handlers(monkeypatch)
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:2])
    async with agent(bus, NODES[:2]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        [handlers] = created
        failed = Condition(type=CONDITION_SYNCED, status="False", reason="StoreUnreachable",
                           message="store unreachable: connection refused")
        await put_dataset(bus, files(("a", BLOCK)), conditions=(failed,), synced_at="failed-try")
        key = subjects.resource_key("default", "data")

        async def mirrored() -> bool:
            return handlers.datasets.values[key].status.last_sync_time == "failed-try"

        await eventually(mirrored, what="the failed listing in the loader's view")
        await handlers.tick()  # a pass that sees the failed listing
        assert (await phase_of(bus, "Complete")).status.runs == 1
        # The store is back, and the listing finds "b" new: that is the next run.
        await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)), requests=1)
        await phase_of(bus, "Complete", runs=2)
        assert scripted.keys("dataload.default.warm.2") == {"b"}


async def test_on_event_planning_interrupted_loses_no_change(bus: Bus, nats_server: NatsServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning run 2 fails once (as a loader killed, or NATS failing, while planning would leave it): the next tick
    plans it again against the same baseline, so run 2 still loads the changed "b" and the new "c"; it does not end
    "nothing to load" against a manifest saved before the plan."""
    real_plan_load = domain.plan_load
    interrupted: list[str] = []

    def plan_load_failing_once(run: str, *args: Any) -> domain.Plan:
        if run.endswith(".2") and not interrupted:
            interrupted.append(run)
            raise ConnectionError("NATS connection lost while planning")
        return real_plan_load(run, *args)

    monkeypatch.setattr(domain, "plan_load", plan_load_failing_once)
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES[:2])
    async with agent(bus, NODES[:2]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        await put_dataset(bus, [*files(("a", BLOCK)), *files(("b", BLOCK), ("c", 2 * BLOCK), etag="e2")],
                          requests=1)
        second = await phase_of(bus, "Complete", runs=2)
    assert interrupted == ["dataload.default.warm.2"]
    assert scripted.keys("dataload.default.warm.2") == {"b", "c"}
    assert "nothing to load" not in second.status.message


async def test_on_event_after_a_failed_run_loads_its_changes_again(bus: Bus, nats_server: NatsServer) -> None:
    """Run 2 (changed "b", new "c") fails on the node. The next sync (new "d") loads "b" and "c" again with "d": the
    baseline is the last Complete run's manifest. Once that run completes, the baseline moves: a sync that changed
    nothing loads nothing."""
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES[:1])
    changed = [*files(("a", BLOCK)), *files(("b", BLOCK), ("c", BLOCK), etag="e2")]
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        scripted.fail = "the store refused the read"
        await put_dataset(bus, changed, requests=1)
        await phase_of(bus, "Failed", runs=2)
        assert scripted.keys("dataload.default.warm.2") == {"b", "c"}
        scripted.fail = ""
        await put_dataset(bus, [*changed, *files(("d", BLOCK), etag="e3")], requests=2)
        await phase_of(bus, "Complete", runs=3)
        assert scripted.keys("dataload.default.warm.3") == {"b", "c", "d"}
        await put_dataset(bus, [*changed, *files(("d", BLOCK), etag="e3")], requests=3)
        fourth = await phase_of(bus, "Complete", runs=4)
    assert "nothing to load" in fourth.status.message
    assert not scripted.keys("dataload.default.warm.4")


async def test_on_event_after_the_dataset_is_deleted_and_applied_again_loads_everything(
        bus: Bus, nats_server: NatsServer) -> None:
    """The dataset is deleted (its mounts delete its cached blocks) and applied again with the same objects: a new
    incarnation, cold. The sync of the new one fires an OnEvent run that must load the whole target, not diff the
    manifest against the old incarnation's baseline and load nothing. Later syncs of that incarnation load only
    what changed again."""
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)), incarnation="first")
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
        await phase_of(bus, "Complete", runs=1)
        assert scripted.keys("dataload.default.warm.1") == {"a", "b"}
        await (await bus.kv(subjects.KV_DATASETS)).delete(subjects.resource_key("default", "data"))
        await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)), incarnation="again", requests=1)
        second = await phase_of(bus, "Complete", runs=2)
        assert "nothing to load" not in second.status.message
        assert scripted.keys("dataload.default.warm.2") == {"a", "b"}
        await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK), ("c", BLOCK)), incarnation="again", requests=2)
        await phase_of(bus, "Complete", runs=3)
        assert scripted.keys("dataload.default.warm.3") == {"c"}


async def test_load_metadata_resyncs_first_and_fails_when_no_sync_comes(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    resyncs: list[DatasetResync] = []

    async def on_resync(msg: Any) -> None:
        resync = msgspec.json.decode(msg.data, type=DatasetResync)
        resyncs.append(resync)
        if resync.name == "data":  # the dataset service's part: list again (a new object appeared)
            await put_dataset(bus, files(("a", BLOCK), ("new", BLOCK)), requests=1)

    sub = await bus.nc.subscribe(subjects.DATASET_RESYNC, cb=on_resync)
    try:
        async with agent(bus, NODES[:1]) as scripted, loader(nats_server, metadata_timeout=1.0):
            await publish(bus, subjects.DATALOAD_APPLY, dataload(load_metadata=True))
            await phase_of(bus, "Complete")
            assert scripted.keys("dataload.default.warm.1") == {"a", "new"}
            await put_dataset(bus, files(("z", BLOCK)), name="quiet")
            await put_runtime(bus, NODES[:1], name="quiet")
            await publish(bus, subjects.DATALOAD_APPLY, dataload(name="late", dataset="quiet", load_metadata=True))
            failed = await phase_of(bus, "Failed", name="late")
            assert "was not listed again" in failed.status.message
    finally:
        await sub.unsubscribe()
    assert {r.name for r in resyncs} == {"data", "quiet"}


async def test_delete_cancels_the_run(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    cancels: list[TaskCancel] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append(msgspec.json.decode(msg.data, type=TaskCancel))

    sub = await bus.nc.subscribe(subjects.TASK_CANCEL, cb=on_cancel)
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    try:
        async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
            scripted.hold.set()
            await publish(bus, subjects.DATALOAD_APPLY, dataload())
            await phase_of(bus, "Executing")
            await gauges({("shoal_operations", ("DataLoad", "Executing")): 1,
                          ("shoal_operation_bytes_planned", ("DataLoad", "default/warm")): BLOCK})
            delete = DataLoadDelete(name="warm")
            await publish(bus, subjects.DATALOAD_DELETE, delete)
            await facts.wait_for("operation.deleted.v1", causationId=delete.id)
            await gauges({("shoal_operations", ("DataLoad", "Executing")): 0})
            await eventually(lambda: _true(not exists("shoal_operation_bytes_planned", kind="DataLoad",
                                                      operation="default/warm")), what="the deleted load's series gone")
            async def cancelled() -> list[TaskCancel]:
                return cancels

            await eventually(cancelled, what="TaskCancel")
            scripted.hold.clear()
    finally:
        await sub.unsubscribe()
    assert [c.run for c in cancels] == ["dataload.default.warm.1"]
    assert await operation(bus) is None


@pytest.mark.parametrize("recreated", [False, True], ids=["deleted", "deleted-and-applied-again"])
async def test_a_load_whose_dataset_is_deleted_while_it_executes_fails_saying_so_and_is_cancelled(
        bus: Bus, nats_server: NatsServer, recreated: bool) -> None:
    """The dataset of an Executing load is deleted (its mounts go, and with them the agents' parts, which report no
    more): the run fails at once, saying the dataset was deleted, and its parts are cancelled, rather than wait
    for the node-silent timeout (2 min) and blame the node. The same when the name is applied again meanwhile (a
    new incarnation with its own manifest: the old plan describes none of it)."""
    await put_dataset(bus, files(("a", BLOCK)), incarnation="first")
    await put_runtime(bus, NODES[:1])
    cancels: list[TaskCancel] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append(msgspec.json.decode(msg.data, type=TaskCancel))

    sub = await bus.nc.subscribe(subjects.TASK_CANCEL, cb=on_cancel)
    try:
        async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
            scripted.hold.set()
            await publish(bus, subjects.DATALOAD_APPLY, dataload())
            await phase_of(bus, "Executing", runs=1)
            await eventually(lambda: _true("dataload.default.warm.1.0" in scripted.tasks), what="part 0 held")
            datasets = await bus.kv(subjects.KV_DATASETS)
            key = subjects.resource_key("default", "data")
            if recreated:
                record, _ = await kv_load(datasets, key, DatasetRecord)
                assert record is not None
                await datasets.put(key, msgspec.json.encode(msgspec.structs.replace(record, incarnation="again")))
            else:
                await datasets.delete(key)
            failed = await phase_of(bus, "Failed", runs=1)

            async def cancelled() -> list[TaskCancel]:
                return cancels

            await eventually(cancelled, what="TaskCancel")
            described = await shoal(nats_server, "describe", "dataload", "warm")
    finally:
        await sub.unsubscribe()
    assert "dataset default/data was deleted" in failed.status.message, failed.status.message
    assert [c.run for c in cancels] == ["dataload.default.warm.1"]
    # A user saw each node "Working" under the Failed phase: the cancelled run's nodes work no more.
    lines = described.stdout.splitlines()
    nodes = lines.index("Progress by node:")
    assert [line.split()[0::4] for line in lines[nodes + 1:nodes + 3]] == [["NODE", "STATE"], [NODES[0], "Stopped"]]


async def test_a_load_whose_spec_names_another_dataset_while_it_executes_is_cancelled_saying_so(
        bus: Bus, nats_server: NatsServer) -> None:
    """A DataLoad applied again with another spec.dataset while its run executes: the run's parts are the old
    dataset's, so it is cancelled and fails saying the dataset changed (not that the new dataset, or its runtime,
    was deleted, which nobody did), and the new spec's run loads the new dataset."""
    await put_dataset(bus, files(("a", BLOCK)), incarnation="first")
    await put_dataset(bus, files(("b", BLOCK)), name="other", incarnation="second")
    await put_runtime(bus, NODES[:1])
    await put_runtime(bus, NODES[:1], name="other")
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    cancels: list[TaskCancel] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append(msgspec.json.decode(msg.data, type=TaskCancel))

    sub = await bus.nc.subscribe(subjects.TASK_CANCEL, cb=on_cancel)
    try:
        async with agent(bus, NODES[:1]) as scripted, agent(bus, NODES[:1], dataset="other") as other, \
                loader(nats_server):
            scripted.hold.set()
            await publish(bus, subjects.DATALOAD_APPLY, dataload())
            await phase_of(bus, "Executing", runs=1)
            await eventually(lambda: _true("dataload.default.warm.1.0" in scripted.tasks), what="part 0 held")
            await publish(bus, subjects.DATALOAD_APPLY, dataload(dataset="other"))
            await phase_of(bus, "Complete", runs=2)
    finally:
        await sub.unsubscribe()
    assert "dataload.default.warm.1" in {c.run for c in cancels}
    assert other.keys("dataload.default.warm.2") == {"b"}
    ends = [e["status"] for e in facts.of_type("operation.status.v1")
            if e["status"].get("runs") == 1 and e["status"].get("phase") == "Failed"]
    assert ends, "run 1 never failed"
    assert "spec.dataset" in ends[0]["message"] and "deleted" not in ends[0]["message"], ends[0]["message"]


async def test_applies_and_deletes_delivered_again_behind_newer_commands_leave_the_last_word(bus: Bus) -> None:
    """An apply or a delete whose first handling failed (a NATS error after its write, say) is delivered again
    behind the commands that came after it. The commands stream's order must win: an older delete does not remove
    the operation applied after it, an older apply neither puts its spec back nor brings back the operation deleted
    after it; each stale command is refused saying why, or (an apply behind a newer apply) changes nothing."""
    handlers = LoaderHandlers(bus, unwatched_mirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                              unwatched_mirror(await bus.kv(subjects.KV_OPERATION_RUNS), domain.RunState),
                              unwatched_mirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord))
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)

    def at(subject: str, sequence: int) -> Delivery:
        return Delivery(subject=subject, headers={}, deliveries=2, stream_sequence=sequence)

    def targets(record: OperationRecord | None) -> list[str]:
        assert record is not None and record.load is not None
        return [target.path for target in record.load.target]

    first = dataload(target=[TargetPath(path="/a")])
    await handlers.on_command(first, at(subjects.DATALOAD_APPLY, 1))
    delete = DataLoadDelete(name="warm")
    await handlers.on_command(delete, at(subjects.DATALOAD_DELETE, 2))
    await handlers.on_command(dataload(target=[TargetPath(path="/b")]), at(subjects.DATALOAD_APPLY, 3))
    await handlers.on_command(delete, at(subjects.DATALOAD_DELETE, 2))  # again, behind the apply
    rejected = await facts.wait_for("operation.rejected.v1", causationId=delete.id)
    assert "applied by a later command (stream sequence 3)" in rejected["reason"], rejected
    await handlers.on_command(first, at(subjects.DATALOAD_APPLY, 1))  # again, behind the newer apply
    assert targets(await operation(bus)) == ["/b"]

    second = dataload(target=[TargetPath(path="/c")])
    await handlers.on_command(second, at(subjects.DATALOAD_APPLY, 4))
    await handlers.on_command(DataLoadDelete(name="warm"), at(subjects.DATALOAD_DELETE, 5))
    await handlers.on_command(second, at(subjects.DATALOAD_APPLY, 4))  # again, behind the delete
    rejected = await facts.wait_for("operation.rejected.v1", causationId=second.id)
    assert "deleted by a later command (stream sequence 5)" in rejected["reason"], rejected
    assert await operation(bus) is None
    await handlers.on_command(dataload(target=[TargetPath(path="/d")]), at(subjects.DATALOAD_APPLY, 6))
    assert targets(await operation(bus)) == ["/d"]


@pytest.mark.parametrize("kind", ["DataLoad", "DataClean"])
async def test_a_run_whose_runtime_is_deleted_fails_at_once_naming_the_runtime(bus: Bus, nats_server: NatsServer,
                                                                                kind: str) -> None:
    """The runtime's mounts go with it, so no part reports again: the run failed only after the node-gone (load)
    or node-silent (clean) timeout, 120 s each, blaming a node. It fails at once, naming the runtime."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        command = dataload() if kind == "DataLoad" else DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="warm"), spec=DataCleanSpec(dataset=DatasetRef(name="data"))))
        await publish(bus, subjects.DATALOAD_APPLY if kind == "DataLoad" else subjects.DATACLEAN_APPLY, command)
        await phase_of(bus, "Executing", kind=kind)

        async def part_taken() -> bool | None:
            return bool(scripted.tasks) or None

        # The part on its node: the run is executing, its plan made (deleted while it was still being planned, the
        # runtime "does not exist": another message, a CI flake on a loaded machine).
        await eventually(part_taken, what="the run's part taken by its node")
        await (await bus.kv(subjects.KV_RUNTIMES)).delete(subjects.resource_key("default", "data"))
        failed = await phase_of(bus, "Failed", kind=kind)
        scripted.hold.clear()
    assert failed.status.message == domain.runtime_lost(failed)
    assert "runtime default/data was deleted while this run was executing" in failed.status.message


async def test_a_load_whose_runtime_comes_back_with_another_block_size_fails_and_is_cancelled(
        bus: Bus, nats_server: NatsServer) -> None:
    """The runtime deleted and applied again with another ``blockSize`` (the way its refusal of a change says to
    change it) while a load executes, quicker than the loader's look (its watch shows the new runtime, never the
    gap): the run went on and ended Complete, its parts naming blocks of the old size, which mount processes started
    on the new size fetch at the new offsets (a file loaded in part, counted done) and whose cache they empty. It
    fails at once naming both sizes, its parts cancelled."""
    await put_dataset(bus, files(("a", 3 * BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def part_taken() -> bool | None:
            return bool(scripted.tasks) or None

        await eventually(part_taken, what="the run's part taken by its node")
        await put_runtime(bus, NODES[:1], block_size=2 * BLOCK)
        failed = await phase_of(bus, "Failed")
        assert "dataload.default.warm.1" in scripted.cancelled
        scripted.hold.clear()
    assert failed.status.message == (
        "runtime default/data now has blockSize 8.00KiB (applied again) while this load was executing with blocks "
        "planned at 4.00KiB: its parts were cancelled; run the load again: its blocks are planned at the new size "
        "then"), failed.status.message


async def test_a_delete_whose_run_state_write_failed_does_not_leave_the_reapplied_operation_stuck(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete of an Executing load (two parts on one node: the agent holds the first) whose write of the finished
    run state fails once (a NATS error; or the loader killed right then). The record must not be gone while the run
    state still shows the deleted run executing: the same name applied again would resume that run, whose parts the
    agent skips as cancelled, and stay Executing for ever. Applied again, it runs a new run that completes."""
    await put_dataset(bus, files(("big", (domain.MAX_PART_BLOCKS + 1) * BLOCK)))
    await put_runtime(bus, NODES[:1])
    real_save_state = LoaderHandlers._save_state
    armed: list[bool] = []
    refused: list[domain.RunState] = []

    async def save_state_failing_once(self: LoaderHandlers, key: str, state: domain.RunState) -> None:
        if armed and not refused:
            refused.append(state)
            raise nats.errors.TimeoutError
        await real_save_state(self, key, state)

    monkeypatch.setattr(LoaderHandlers, "_save_state", save_state_failing_once)
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        await phase_of(bus, "Executing", runs=1)
        await eventually(lambda: _true("dataload.default.warm.1.0" in scripted.tasks), what="part 0 held")
        armed.append(True)  # the next run state the loader writes is the delete's
        await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="warm"))

        async def gone() -> bool:
            return await operation(bus) is None

        await eventually(gone, what="the record deleted")
        await eventually(lambda: _true("dataload.default.warm.1.1" in scripted.skipped), what="part 1 skipped")
        scripted.hold.clear()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        again = await phase_of(bus, "Complete", runs=2)
        await facts.wait_for("operation.deleted.v1", name="warm")
    assert refused and refused[0].stage == "finished"
    assert again.status.progress.bytes_done == again.status.progress.bytes_total == (domain.MAX_PART_BLOCKS + 1) * BLOCK


def remembered(handlers: LoaderHandlers, key: str) -> list[str]:
    """Which of the loader's in-memory views of runs hold something of the operation ``key``."""
    views = {"plans": key in handlers.plans, "published": key in handlers.published,
             "resynced": key in handlers.resynced,
             "written_at": key in handlers.written_at, "dirty": key in handlers.dirty,
             "gone_since": any(k[0] == key for k in handlers.gone_since),
             "silent_since": any(k[0] == key for k in handlers.silent_since)}
    return [name for name, held in views.items() if held]


async def test_the_loaders_memory_of_a_run_goes_when_it_finishes_or_is_deleted(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan, the published run, the status throttle and a gone node's timer are kept per operation while its run
    works, and dropped when the run finishes (here Failed: a node left) or the operation is deleted mid-run, so the
    loader's memory does not grow with every run. Checked under the loader's lock: a run's end is written whole."""
    created = recorded_handlers(monkeypatch)
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    warm, busy = (subjects.operation_key("DataLoad", "default", name) for name in ("warm", "busy"))
    async with agent(bus, NODES) as scripted, loader(nats_server, node_gone_timeout=3.0):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def part_on_node_c() -> bool:
            return any(task.node == "node-c" for task in scripted.tasks.values())

        await eventually(part_on_node_c, what="node-c's part received")
        [handlers] = created
        async with handlers.lock:
            assert {"plans", "published", "written_at"} <= set(remembered(handlers, warm))
        await put_runtime(bus, NODES[:2], not_ready=("node-c",))

        async def timing_node_c() -> bool:
            return (warm, "node-c") in handlers.gone_since

        await eventually(timing_node_c, what="node-c timed as gone")
        await phase_of(bus, "Failed")
        async with handlers.lock:
            assert remembered(handlers, warm) == []
        # Deleted while it works: forgotten too.
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="busy"))
        await phase_of(bus, "Executing", name="busy")
        async with handlers.lock:
            assert {"plans", "published", "written_at"} <= set(remembered(handlers, busy))
        await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="busy"))

        async def deleted() -> bool:
            return await operation(bus, "busy") is None

        await eventually(deleted, what="busy deleted")
        async with handlers.lock:
            assert remembered(handlers, busy) == []
        scripted.hold.clear()


async def test_the_loader_forgets_when_mounts_reported_once_no_run_waits_on_them(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``heard`` (when each node's mount of a dataset last reported, for the silence timeout) holds a mount only while
    an executing run waits on it: nothing of a run that completed, nor of one whose dataset and load were deleted
    mid-run, nor after a late report of a finished run, so it does not grow with every dataset and node ever seen."""
    created = recorded_handlers(monkeypatch)

    def heard_of(dataset: str) -> set[str]:
        return {node for handlers in created for (name, node) in handlers.heard if name == dataset}

    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(12)]))
    await put_runtime(bus, NODES)
    await put_dataset(bus, files(("a", BLOCK)), name="other")
    await put_runtime(bus, NODES[:1], name="other")
    async with agent(bus, NODES), agent(bus, NODES[:1], dataset="other") as held, \
            loader(nats_server):
        held.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="busy", dataset="other"))
        await eventually(lambda: _true(heard_of("default/other") == {"node-a"}), what="node-a's mount heard")
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        done = await phase_of(bus, "Complete")
        assert done.status.progress.bytes_done == done.status.progress.bytes_total
        [handlers] = created
        async with handlers.lock:
            assert heard_of("default/data") == set()
            assert heard_of("default/other") == {"node-a"}  # its run still waits on it
        # A late report of the finished run: consumed, and nothing kept of it.
        late = TaskProgress(id="late", run="dataload.default.warm.1", part=0, node="node-a", done=True)
        await bus.publish(subjects.task_progress("node-a"), late)

        async def consumed() -> bool:
            info = await bus.js.consumer_info(subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(consumed, what="the late report consumed by the loader")
        async with handlers.lock:
            assert heard_of("default/data") == set()
        # The other dataset deleted, then its load mid-run.
        await (await bus.kv(subjects.KV_DATASETS)).delete(subjects.resource_key("default", "other"))
        await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="busy"))
        await eventually(lambda: _true(not created[0].operations.values.get(
            subjects.operation_key("DataLoad", "default", "busy"))), what="busy deleted")
        async with handlers.lock:
            assert handlers.heard == {}
        held.hold.clear()


async def test_run_after_waits_for_complete_and_fails_after_failed(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="second",
                                                             run_after=OperationRef(kind="DataLoad", name="first")))

        async def waiting() -> OperationRecord | None:
            found = await operation(bus, "second")
            return found if found and found.status.waiting_for else None

        first_missing = (await eventually(waiting)).status
        assert first_missing.waiting_for == "DataLoad default/first to exist and be Complete"
        assert first_missing.waiting_for_operation  # Fluid's waitingFor.operationComplete: true
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="first"))
        await phase_of(bus, "Executing", name="first")
        second = await phase_of(bus, "Pending", name="second")
        assert second.status.runs == 0
        scripted.hold.clear()
        await phase_of(bus, "Complete", name="first")
        assert not (await phase_of(bus, "Complete", name="second")).status.waiting_for_operation
        # After a Failed one: Failed, naming it.
        scripted.fail = "object changed since the load was planned"
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="broken"))
        broken = await phase_of(bus, "Failed", name="broken")
        assert "node-a failed 1 block(s): object changed" in broken.status.message
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="after",
                                                             run_after=OperationRef(kind="DataLoad", name="broken")))
        after = await phase_of(bus, "Failed", name="after")
    assert after.status.message.startswith("DataLoad default/broken (spec.runAfter) Failed: ")
    assert after.status.message.endswith("; fix DataLoad default/broken, then delete and apply again DataLoad "
                                         "default/after: a Once operation applied unchanged does not run again")


async def test_run_requests_while_a_run_is_pending_join_it_not_queue_more(bus: Bus, nats_server: NatsServer) -> None:
    """A Cron load waits (runAfter) for one still Executing; three run requests sent meanwhile are one run, not three
    back to back once the other is Complete. The first queues the run, the others are told they joined it."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    facts = FactCollector()
    await facts.start(bus)
    key = subjects.operation_key("DataLoad", "default", "second")
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="first"))
        await phase_of(bus, "Executing", name="first")
        await publish(bus, subjects.DATALOAD_APPLY, dataload(
            name="second", policy="Cron", schedule="0 0 1 1 *", run_after=OperationRef(kind="DataLoad", name="first")))
        await phase_of(bus, "Pending", name="second")
        runs = [DataLoadRun(name="second") for _ in range(3)]
        accepted = []
        for run in runs:  # one at a time: each is handled against the state the one before left
            await publish(bus, subjects.DATALOAD_RUN, run)
            accepted.append(await facts.wait_for("operation.accepted.v1", causationId=run.id))
        waiting = await operation(bus, "second")
        scripted.hold.clear()
        done = await phase_of(bus, "Complete", name="second", runs=1)
        state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS), key, domain.RunState)
    assert waiting is not None and waiting.status.runs == 0
    assert waiting.status.waiting_for == "DataLoad default/first to be Complete", waiting.status
    assert done.status.runs == 1
    assert state is not None and state.requested == 0, state  # no more runs queued behind it
    assert accepted[0].get("merged", "") == ""
    for fact in accepted[1:]:
        assert fact["merged"] == ("DataLoad default/second already has a run pending, waiting for DataLoad "
                                  "default/first to be Complete; this request joins it"), fact


async def test_a_run_after_chain_whose_first_is_deleted_fails_each_after_it_rather_than_wait_for_ever(
        bus: Bus, nats_server: NatsServer) -> None:
    """"b" runs after "a", "c" after "b"; "a" is deleted while it executes. "b" waited for "a" to exist and "c" for
    "b" to be Complete, both for ever. Now "b" fails after the wait's limit saying what is missing and what to do,
    and "c" fails on "b"."""
    await put_dataset(bus, files(("f", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server, run_after_wait_timeout=2.0):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="a"))
        await phase_of(bus, "Executing", name="a")
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="b", run_after=OperationRef(kind="DataLoad",
                                                                                               name="a")))
        await publish(bus, subjects.DATALOAD_APPLY, dataload(
            name="c", policy="Cron", schedule="0 0 1 1 *", run_after=OperationRef(kind="DataLoad", name="b")))
        await phase_of(bus, "Pending", name="c")
        await publish(bus, subjects.DATALOAD_RUN, DataLoadRun(name="c"))
        await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="a"))

        async def missing() -> OperationRecord | None:
            found = await operation(bus, "b")
            return found if found and found.status.waiting_for.endswith("to exist and be Complete") else None

        assert (await eventually(missing)).status.phase == "Pending"
        b = await phase_of(bus, "Failed", name="b")
        c = await phase_of(bus, "Failed", name="c")
    assert b.status.message == ("DataLoad default/a (spec.runAfter) does not exist (waited 2 s for it to exist and be "
                                "Complete); apply DataLoad default/a, then delete and apply again DataLoad default/b "
                                "(a Once operation applied unchanged does not run again), or change its "
                                "spec.runAfter")
    assert c.status.message.startswith(f"DataLoad default/b (spec.runAfter) Failed: {b.status.message}; fix "), c
    assert c.status.message.endswith("(DataLoad default/c runs again at its next firing or sync)"), c
    assert (b.status.runs, c.status.runs, b.status.waiting_for, c.status.waiting_for) == (1, 1, "", "")


async def test_a_run_after_cycle_fails_its_operations_naming_it(bus: Bus, nats_server: NatsServer) -> None:
    """"a" runs after "b" and "b" after "a": neither could ever start. Both fail, naming the cycle, rather than stay
    Pending for ever each waiting for the other; "c", which runs after "a" without being in the cycle, fails on it."""
    await put_dataset(bus, files(("f", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="c", run_after=OperationRef(kind="DataLoad",
                                                                                               name="a")))
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="a", run_after=OperationRef(kind="DataLoad",
                                                                                               name="b")))
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="b", run_after=OperationRef(kind="DataLoad",
                                                                                               name="a")))
        a = await phase_of(bus, "Failed", name="a")
        b = await phase_of(bus, "Failed", name="b")
        c = await phase_of(bus, "Failed", name="c")
    assert a.status.message.startswith("runAfter cycle: DataLoad default/a → DataLoad default/b → DataLoad default/a")
    assert b.status.message.startswith("runAfter cycle: DataLoad default/b → DataLoad default/a → DataLoad default/b")
    assert c.status.message.startswith("DataLoad default/a (spec.runAfter) Failed: runAfter cycle: ")
    assert (a.status.runs, b.status.runs, a.status.waiting_for, b.status.waiting_for) == (1, 1, "", "")
    assert scripted.seen == []


async def test_a_run_after_cycle_says_what_to_do_and_doing_it_runs_every_member(bus: Bus,
                                                                                 nats_server: NatsServer) -> None:
    """The cycle's message said "change spec.runAfter of one of them"; doing that ran the one changed, and the
    other, Once and applied unchanged, stayed Failed for good (a Once operation runs once per spec). The message
    now says to delete and apply again the members left unchanged, and doing what it says runs them all."""
    await put_dataset(bus, files(("f", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]), loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="a", run_after=OperationRef(kind="DataLoad",
                                                                                               name="b")))
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="b", run_after=OperationRef(kind="DataLoad",
                                                                                               name="a")))
        b = await phase_of(bus, "Failed", name="b")
        await phase_of(bus, "Failed", name="a")
        assert b.status.message.endswith(
            "none of them can start: change spec.runAfter of one of them, then delete and apply again each of "
            "DataLoad default/b, DataLoad default/a whose spec you did not change: a Once operation applied "
            "unchanged does not run again"), b.status.message
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="a"))  # the cycle broken: a runs first
        await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="b"))
        await eventually(lambda: _none(operation(bus, "b")), what="b deleted")
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="b", run_after=OperationRef(kind="DataLoad",
                                                                                               name="a")))
        a = await phase_of(bus, "Complete", name="a", runs=2)
        b = await phase_of(bus, "Complete", name="b", runs=2)
    started, before = parse_rfc3339(b.status.start_time), parse_rfc3339(a.status.completion_time)
    assert started is not None and before is not None and started >= before, "b ran after a, its runAfter"


async def _none(found: Any) -> bool:
    return await found is None


async def test_ttl_removes_a_finished_operation(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    async with agent(bus, NODES[:1]), loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(ttl_seconds_after_finished=0))
        deleted = await facts.wait_for("operation.deleted.v1", name="warm")
        await eventually(lambda: _true(not exists("shoal_operation_bytes_done", kind="DataLoad",
                                                  operation="default/warm")), what="the expired load's series gone")
    assert deleted.get("causationId", "") == ""  # removed by the TTL, not by a command
    assert [e["status"].get("phase", "Pending") for e in facts.of_type("operation.status.v1")][-1] == "Complete"
    assert await operation(bus) is None


async def loader_objects(bus: Bus) -> set[str]:
    """The names of the loader's objects (plans, OnEvent manifests) in the Object Store, deleted ones left out."""
    names = await object_names(await bus.manifests())
    return {name for name in names if subjects.loader_object(name) is not None}


async def run_state(bus: Bus, key: str) -> domain.RunState | None:
    found, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS), key, domain.RunState)
    return found


async def in_ring(bus: Bus, key: str, node: str) -> bool:
    """Whether the run of operation ``key`` has ``node`` in its ring."""
    state = await run_state(bus, key)
    return state is not None and node in state.ring


async def executing(bus: Bus, key: str) -> bool:
    """Whether the run of operation ``key`` is executing with its parts planned."""
    state = await run_state(bus, key)
    return state is not None and state.stage == "executing" and bool(state.parts)


async def test_a_runs_plan_and_progress_go_when_it_ends_and_its_state_when_the_operation_goes(
        bus: Bus, nats_server: NatsServer) -> None:
    """A run's plan (Object Store) and its parts' progress (run state) are kept while it executes and go when it
    ends; an operation deleted by a command or by its TTL leaves neither a run state nor an object behind. They
    stayed after every run and every operation, so the storage grew with each. A name applied again still numbers
    its runs after the deleted one's (the delete marker keeps the number)."""
    await put_dataset(bus, files(("a", BLOCK), ("b", 2 * BLOCK)))
    await put_runtime(bus, NODES)
    warm, brief = (subjects.operation_key("DataLoad", "default", name) for name in ("warm", "brief"))
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    async with agent(bus, NODES) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        await phase_of(bus, "Executing")

        async def with_parts() -> domain.RunState | None:
            # The record can say Executing a moment before the run state holding the parts is written.
            state = await run_state(bus, warm)
            return state if state is not None and state.parts else None

        await eventually(with_parts, what="the run state with its parts")
        assert await loader_objects(bus) == {subjects.loader_plan(warm)}
        scripted.hold.clear()
        done = await phase_of(bus, "Complete")

        async def settled() -> domain.RunState | None:
            state = await run_state(bus, warm)
            return state if state is not None and not state.parts and not await loader_objects(bus) else None

        state = await eventually(settled, what="the plan and the parts' progress gone")
        assert state.stage == "finished" and state.run == f"{warm}.1" and state.outcome == "Complete"
        assert done.status.progress.bytes_done == done.status.progress.bytes_total == 3 * BLOCK
        # The gauges keep the last run's bytes, from its record.
        await gauges({("shoal_operation_bytes_done", ("DataLoad", "default/warm")): 3 * BLOCK,
                      ("shoal_operation_bytes_planned", ("DataLoad", "default/warm")): 3 * BLOCK})
        delete = DataLoadDelete(name="warm")
        await publish(bus, subjects.DATALOAD_DELETE, delete)
        await facts.wait_for("operation.deleted.v1", causationId=delete.id)
        assert await run_state(bus, warm) is None
        # Removed by its TTL: the same.
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="brief", ttl_seconds_after_finished=0))
        await facts.wait_for("operation.deleted.v1", name="brief")
        assert await run_state(bus, brief) is None
        assert await loader_objects(bus) == set()
        # Applied again, the deleted name's runs continue from its last one.
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        again = await phase_of(bus, "Complete", runs=2)
    assert again.status.progress.bytes_done == 3 * BLOCK
    assert {task.run for task in scripted.tasks.values()} == {f"{warm}.1", f"{warm}.2", f"{brief}.1"}


async def test_a_restarted_loader_removes_the_run_states_and_plans_of_operations_gone(
        bus: Bus, nats_server: NatsServer) -> None:
    """What a loader stopped in a delete or at a run's end (or one from before they were removed there) left: the
    run state and plan of an operation that no longer exists, and the plan of a run that finished. A restarted
    loader removes them, keeps the run number of the one gone for its name, and leaves an executing run's plan
    alone: that run resumes and completes."""
    entries = files(("a", BLOCK), ("b", BLOCK))
    await put_dataset(bus, entries)
    await put_runtime(bus, NODES[:1])
    store = await ManifestStore.of(bus)
    gone, ended, working = (subjects.operation_key("DataLoad", "default", name) for name in ("gone", "ended", "warm"))
    runs = await bus.kv(subjects.KV_OPERATION_RUNS)
    operations = await bus.kv(subjects.KV_OPERATIONS)
    for key, number in ((gone, 3), (ended, 1), (working, 1)):
        plan = domain.plan_load(f"{key}.{number}", ObjectRef(name="data"), entries, {0: 1, 1: 1}, NODES[:1],
                                NODES[:1], BLOCK)
        await store.objects.put(subjects.loader_plan(key), msgspec.json.encode(plan))
        stage: domain.RunStage = "executing" if key == working else "finished"
        await runs.put(key, msgspec.json.encode(domain.RunState(
            run=f"{key}.{number}", stage=stage, started_at=1.0, ring=NODES[:1], files_total=2,
            parts=domain.parts_state(plan))))
    await put_dataset(bus, entries, name="other")  # a dataset's manifest is not the loader's to remove
    await store.objects.put(subjects.loader_manifest(gone), b"")
    base = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="x"))
    for key, phase in ((ended, "Complete"), (working, "Executing")):
        record = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name=key.rsplit(".", 1)[1]),
                                 load=DataLoadSpec(dataset=DatasetRef(name="data")),
                                 created_at="2026-01-01T00:00:00Z",
                                 status=msgspec.structs.replace(domain.status_started(base.status, 1, 1, 1.0),
                                                                phase=phase))
        await operations.put(key, msgspec.json.encode(record))
    async with agent(bus, NODES[:1]), loader(nats_server):
        await phase_of(bus, "Complete", name="warm")

        async def swept() -> bool:
            return (await run_state(bus, gone) is None and await loader_objects(bus) == set()
                    and not (await run_state(bus, ended) or domain.RunState()).parts)

        await eventually(swept, what="the left-overs removed")
        assert await store.objects.get_info(ManifestStore.name("default", "other"))
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="gone"))
        again = await phase_of(bus, "Complete", name="gone")
    assert again.status.runs == 4


async def test_a_restarted_loader_removes_every_plan_left_when_the_listing_says_caught_up_early(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep lists the Object Store past nats-py's early "caught up" (``libs.bus.object_names``): with
    nats-py's ``list()`` it ended at the first meta message whose pending count read 0, and removed only the plans
    before it, once (a sweep runs once per loader)."""
    store = await ManifestStore.of(bus)
    plans = [subjects.loader_plan(subjects.operation_key("DataLoad", "default", f"gone-{i}")) for i in range(3)]
    for plan in plans:
        await store.objects.put(plan, b"{}")
    pending_reads_zero(monkeypatch, object_meta_subject(plans[0]))
    async with loader(nats_server):
        async def swept() -> bool:
            return await loader_objects(bus) == set()

        await eventually(swept, what="every plan of an operation gone removed")


async def test_a_clean_reaches_every_node(bus: Bus, nats_server: NatsServer) -> None:
    await put_dataset(bus, files(("a", BLOCK), ("dir/b", BLOCK)))
    await put_runtime(bus, NODES)
    async with agent(bus, NODES) as scripted, loader(nats_server):
        await publish(bus, subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="wipe"), spec=DataCleanSpec(dataset=DatasetRef(name="data")))))
        wiped = await phase_of(bus, "Complete", name="wipe", kind="DataClean")
        await publish(bus, subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="some"), spec=DataCleanSpec(dataset=DatasetRef(name="data"),
                                                                 target=[CleanTarget(path="/x/dir")]))))
        await phase_of(bus, "Complete", name="some", kind="DataClean")
    everything = [t for t in scripted.tasks.values() if t.run == "dataclean.default.wipe.1"]
    assert sorted(t.node for t in everything) == NODES and all(t.everything for t in everything)
    assert wiped.status.progress.bytes_done == 3 * 1000
    some = [t for t in scripted.tasks.values() if t.run == "dataclean.default.some.1"]
    assert all(t.files == [(0, "dir/b")] and not t.everything for t in some) and len(some) == 3


async def test_a_clean_shows_which_nodes_are_done_and_which_it_waits_for(bus: Bus, nats_server: NatsServer) -> None:
    """A clean's freed bytes have no total: with node-c's part not done (its agent away), each node's progress says
    whether it is done, or nothing told which node the Executing clean waits for."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES)
    async with agent(bus, NODES[:2]), loader(nats_server):
        await publish(bus, subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="wipe"), spec=DataCleanSpec(dataset=DatasetRef(name="data")))))

        async def two_done() -> OperationRecord | None:
            found = await operation(bus, "wipe", "DataClean")
            nodes = found.status.progress.nodes if found else []
            return found if len(nodes) == 3 and sum(n.bytes_done for n in nodes) == 2 * 1000 else None

        record = await eventually(two_done, what="node-a and node-b cleaned")
    assert record.status.phase == "Executing"
    assert [(n.node, n.done) for n in record.status.progress.nodes] == [
        ("node-a", True), ("node-b", True), ("node-c", False)]


async def test_an_executing_clean_says_which_absent_node_it_waits_for_and_since_when(
        bus: Bus, nats_server: NatsServer) -> None:
    """node-c is a picked worker whose agent is gone (not ready): the clean sends it a part all the same (it may
    hold blocks), and that part waits. The status says so as soon as the loader sees it, naming the node and since
    when, not only at the node-silent failure ~120 s later; once the node is ready again the message goes."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:2], not_ready=("node-c",))
    now = [1_767_225_600.0 + 10]  # 2026-01-01T00:00:10Z
    async with agent(bus, NODES[:2]), loader(nats_server, clock=lambda: now[0]):
        await publish(bus, subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="wipe"), spec=DataCleanSpec(dataset=DatasetRef(name="data")))))

        async def says_so() -> OperationRecord | None:
            found = await operation(bus, "wipe", "DataClean")
            return found if found is not None and found.status.message else None

        record = await eventually(says_so, what="the clean's status naming the node it waits for")
        assert record.status.phase == "Executing"
        assert record.status.message == (
            "waiting for node node-c (since 2026-01-01T00:00:10Z): not a ready node of runtime default/data (its "
            "agent gone or not ready), with its part of the run not done")
        now[0] += 5
        await put_runtime(bus, NODES)  # node-c ready again (its part still waits: no agent here serves it)

        async def cleared() -> OperationRecord | None:
            found = await operation(bus, "wipe", "DataClean")
            return found if found is not None and not found.status.message else None

        record = await eventually(cleared, what="the message gone with node-c back")
    assert record.status.phase == "Executing"
    assert [(n.node, n.done) for n in record.status.progress.nodes] == [
        ("node-a", True), ("node-b", True), ("node-c", False)]


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_worker_added_while_a_load_runs_gets_the_blocks_it_now_owns(bus: Bus, nats_server: NatsServer,
                                                                            replicas: int) -> None:
    """A cache worker added to the ring while a load runs (``shoal scale runtime`` up, the autoscaler) owns some of
    its blocks from then on, and readers ask it for them. They were never loaded onto it: the load ended Complete
    with those blocks only on their old owners. Now they are planned again for the new owner, and the run completes
    with every block on each of its owners on the ring as it is at the end."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(24)]))
    await put_runtime(bus, NODES[:2])
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with agent(bus, NODES) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x", replicas=replicas)]))

        await eventually(lambda: executing(bus, key), what="the load planned on node-a and node-b")
        await put_runtime(bus, NODES)  # node-c joins the ring
        scripted.hold.clear()
        done = await phase_of(bus, "Complete")
    holders: dict[tuple[str, int], set[str]] = {}
    for task in scripted.tasks.values():
        for file in task.blocks:
            for index, _ in file.blocks:
                holders.setdefault((file.key, index), set()).add(task.node)
    assert len(holders) == 48
    owners = {block: set(ring.owners(BlockId(0, block[0], "e1", block[1]).name, NODES, replicas))
              for block in holders}
    assert any("node-c" in nodes for nodes in owners.values())
    missing = {block: sorted(owners[block] - nodes) for block, nodes in holders.items() if owners[block] - nodes}
    assert not missing, f"blocks not loaded on their owners: {missing}"
    assert done.status.progress.bytes_done == done.status.progress.bytes_total
    assert "node-c" in {node.node for node in done.status.progress.nodes}


async def test_a_load_whose_ring_is_scaled_in_after_the_parts_gone_finished_completes_with_blocks_on_the_worker(
        bus: Bus, nats_server: NatsServer) -> None:
    """The runtime scaled in from three workers to one (the two others still serve the dataset) once the parts of
    the two were done, the worker's not yet: no part of a node scaled in was left to fail the run on, and it ended
    Complete with two thirds of its blocks only on nodes no reader's route asks. Now their blocks are planned again
    for the worker, and the load completes with every block on it."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(24)]))
    await put_runtime(bus, NODES)
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with loader(nats_server):
        async with agent(bus, NODES[1:]) as early:
            await publish(bus, subjects.DATALOAD_APPLY, dataload())

            async def others_done() -> bool:
                state = await run_state(bus, key)
                return (state is not None and state.stage == "executing"
                        and all(part.done for part in state.parts if part.node != "node-a")
                        and any(part.node == "node-a" and not part.done for part in state.parts))

            await eventually(others_done, what="the parts of node-b and node-c done, node-a's not")
        await put_runtime(bus, NODES, workers=NODES[:1])  # scaled in: node-b and node-c serve, as workers no more
        async with agent(bus, NODES[:1]) as worker:
            done = await phase_of(bus, "Complete")
    on_others = {(file.key, index) for task in early.tasks.values() for file in task.blocks
                 for index, _ in file.blocks}
    on_worker = {(file.key, index) for task in worker.tasks.values() for file in task.blocks
                 for index, _ in file.blocks}
    assert on_others and {task.node for task in early.tasks.values()} == {"node-b", "node-c"}
    assert len(on_worker) == 48, f"{len(on_others - on_worker)} blocks of the nodes scaled in not on the worker"
    assert done.status.progress.bytes_done == done.status.progress.bytes_total


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_load_whose_ring_is_scaled_in_while_the_parts_gone_work_moves_them_to_the_worker_and_completes(
        bus: Bus, nats_server: NatsServer, replicas: int) -> None:
    """The runtime scaled in from three workers to one (the two others still serve the dataset) while the parts of
    the two still worked: the run failed ("run the load again"), where the same scale-in seen once those parts had
    finished replans them and completes. Now their parts are cancelled on those two nodes only and their blocks
    planned again for the worker, and the load completes with every block on it; the worker's own part goes on."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(24)]))
    await put_runtime(bus, NODES)
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with agent(bus, NODES) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x", replicas=replicas)]))

        async def all_working() -> bool:  # every node holds a part: none of them can be done
            return {task.node for task in scripted.tasks.values()} == set(NODES)

        await eventually(all_working, what="a part held on each of the three nodes")
        planned = await run_state(bus, key)
        assert planned is not None and len(planned.parts) == 3
        await put_runtime(bus, NODES, workers=NODES[:1])  # scaled in: node-b and node-c serve, as workers no more

        async def moved() -> set[tuple[str, str, int]] | None:
            return scripted.cancelled_parts or None

        cancelled = await eventually(moved, what="the parts of node-b and node-c cancelled there")
        during = await operation(bus)
        scripted.hold.clear()
        done = await phase_of(bus, "Complete")
    run = f"{key}.1"
    # Kept in the record before the cancels went out, for a node that missed its own; gone with the run.
    assert during is not None and {(m.run, m.node, part) for m in during.moved_parts for part in m.parts} == cancelled
    assert done.moved_parts == []
    assert [(n.node, n.done, n.moved) for n in done.status.progress.nodes] == [
        ("node-a", True, False), ("node-b", True, True), ("node-c", True, True)]
    assert cancelled == {(run, task.node, task.part) for task in scripted.tasks.values() if task.node != "node-a"}
    assert run not in scripted.cancelled, "the run goes on: only the parts of the nodes scaled in are cancelled"
    on_worker = {(file.key, index) for task in scripted.tasks.values() if task.node == "node-a"
                 for file in task.blocks for index, _ in file.blocks}
    assert len(on_worker) == 48, "every block of the load on the one worker"
    assert done.status.message == ""
    assert done.status.progress.bytes_done == done.status.progress.bytes_total
    assert done.status.progress.files_done == done.status.progress.files_total == 24


async def test_a_load_whose_ring_loses_a_worker_with_its_agent_moves_its_part_to_the_ring_and_completes(
        bus: Bus, nats_server: NatsServer) -> None:
    """node-c's agent goes while its part of the load is not done, and the runtime drops it from its workers (as the
    scheduler does once an agent is gone): the load replanned node-c's blocks on node-a and node-b (``ring_shrank``)
    yet waited for node-c's part, and failed at the node-gone timeout. Now that part is moved like the part of a
    node scaled in that still serves, and the load completes with every block on the workers left."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(24)]))
    await put_runtime(bus, NODES)
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with agent(bus, NODES[:2]) as scripted, agent(bus, NODES[2:]) as gone, loader(nats_server,
                                                                                        node_gone_timeout=2.0):
        gone.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def node_c_working() -> bool:
            return any(task.node == "node-c" for task in gone.tasks.values())

        await eventually(node_c_working, what="node-c's part received")
        await put_runtime(bus, NODES[:2])  # node-c's agent gone: neither a ready node nor a worker any more
        done = await phase_of(bus, "Complete")
        state = await run_state(bus, key)
    assert done.status.message == ""
    on_workers = {(file.key, index) for task in scripted.tasks.values() for file in task.blocks
                  for index, _ in file.blocks}
    assert len(on_workers) == 48, "every block of the load on the workers left"
    assert state is not None and state.stage == "finished"
    assert done.status.progress.bytes_done == done.status.progress.bytes_total
    assert done.status.progress.files_done == done.status.progress.files_total == 24


@pytest.mark.parametrize("ring_back", [True, False], ids=["ring-back", "no-ring"])
async def test_a_load_whose_ring_loses_a_worker_with_its_agent_while_no_ring_is_left_moves_its_part_at_once(
        bus: Bus, nats_server: NatsServer, ring_back: bool) -> None:
    """node-c's agent goes while its part of the load is not done, the runtime drops it from its workers, and the
    workers left have no ring for a while (their peer servers starting). node-c's part was waited for until the
    node-gone timeout (``scaled_in`` moved a node not ready only when a ring was left), a worker back in the ring
    notwithstanding. Now it is moved at once (cancelled on node-c, kept in the record) and its blocks go to the ring
    once there is one; with none back within the node-gone timeout the run fails saying what it waited for."""
    await put_dataset(bus, files(*[(f"f{i}", 2 * BLOCK) for i in range(24)]))
    await put_runtime(bus, NODES)
    key = subjects.operation_key("DataLoad", "default", "warm")
    async with agent(bus, NODES[:2]) as scripted, agent(bus, NODES[2:]) as gone, loader(
            nats_server, node_gone_timeout=120.0 if ring_back else 3.0):
        gone.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())

        async def node_c_working() -> bool:
            return any(task.node == "node-c" for task in gone.tasks.values())

        await eventually(node_c_working, what="node-c's part received")
        await put_runtime(bus, NODES[:2], starting=True)  # node-c gone; node-a and node-b not in a ring yet

        async def moved() -> OperationRecord | None:
            found = await operation(bus)
            return found if found is not None and found.moved_parts else None

        during = await eventually(moved, what="node-c's part moved while no ring is left")
        assert [m.node for m in during.moved_parts] == ["node-c"]
        assert during.status.phase == "Executing"
        if not ring_back:
            failed = await phase_of(bus, "Failed")
            assert "no ready cache worker" in failed.status.message and "node-c" in failed.status.message
            return
        await put_runtime(bus, NODES[:2])  # their peer servers serve: the ring is back
        done = await phase_of(bus, "Complete")
    assert {(run, node) for run, node, _ in gone.cancelled_parts} == {(f"{key}.1", "node-c")}
    on_workers = {(file.key, index) for task in scripted.tasks.values() for file in task.blocks
                  for index, _ in file.blocks}
    assert len(on_workers) == 48, "every block of the load on the workers back in the ring"
    assert done.status.message == ""
    assert done.status.progress.files_done == done.status.progress.files_total == 24


def two_folders() -> list[ManifestEntry]:
    """Twelve one-block files in each of folders /x/d and /x/e."""
    return files(*[(f"{folder}/f{i}", BLOCK) for folder in "de" for i in range(12)])


@contextlib.asynccontextmanager
async def a_clean_behind_a_held_load(bus: Bus, nats_server: NatsServer, target: str) -> AsyncIterator[ScriptedAgent]:
    """The loader and the scripted agent of every node, holding each part: DataLoad "warm" of the whole dataset
    executing, then DataClean "wipe" (of ``target``, or everything) with its parts sent behind the load's."""
    load_key = subjects.operation_key("DataLoad", "default", "warm")
    clean_key = subjects.operation_key("DataClean", "default", "wipe")
    async with agent(bus, NODES) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        await eventually(lambda: executing(bus, load_key), what="the load planned")
        await publish(bus, subjects.DATACLEAN_APPLY, DataCleanApply(data_clean=DataClean(
            metadata=ObjectMeta(name="wipe"), spec=DataCleanSpec(
                dataset=DatasetRef(name="data"), target=[CleanTarget(path=target)] if target else []))))
        await eventually(lambda: executing(bus, clean_key), what="the clean's parts sent")
        yield scripted


async def ring_grown_to_node_c_then_both_complete(bus: Bus, scripted: ScriptedAgent) -> None:
    """node-c joins the ring under the held load of ``a_clean_behind_a_held_load``; once the load's ring has it,
    the parts go on, and the load and the clean end Complete."""
    await put_runtime(bus, NODES)
    await eventually(lambda: in_ring(bus, subjects.operation_key("DataLoad", "default", "warm"), "node-c"),
                     what="the load's ring grown to node-c")
    scripted.hold.clear()
    await phase_of(bus, "Complete")
    await phase_of(bus, "Complete", name="wipe", kind="DataClean")


@pytest.mark.parametrize(("target", "serves_first"), [("", False), ("/x/d", True)], ids=["everything", "a-folder"])
async def test_a_clean_applied_after_a_load_whose_ring_grows_leaves_its_files_cleaned_on_every_node(
        bus: Bus, nats_server: NatsServer, target: str, serves_first: bool) -> None:
    """A load runs on node-a and node-b, a clean of the dataset (everything, or a folder) is applied after it, then
    node-c joins the ring. Each node does its parts in the order the runs started: the load's, then the clean's. The
    load's parts for node-c, planned when it joined, came after the clean's there (or alone, node-c having no part
    of the clean): the clean emptied node-a and node-b, and node-c ended holding the load's blocks, the load's
    result winning over the clean applied after it. Now the files the later clean evicts are not planned again;
    the others still go to their new owner."""
    await put_dataset(bus, two_folders())
    await put_runtime(bus, NODES if serves_first else NODES[:2], workers=NODES[:2])
    async with a_clean_behind_a_held_load(bus, nats_server, target) as scripted:
        await ring_grown_to_node_c_then_both_complete(bus, scripted)
    cached: dict[str, set[tuple[str, int]]] = {node: set() for node in NODES}
    for task_id, _ in scripted.seen:  # each node's parts in the order it took them
        task = scripted.tasks.get(task_id)
        if task is None:
            continue
        if task.action == "load":
            cached[task.node] |= {(file.key, index) for file in task.blocks for index, _ in file.blocks}
        elif task.everything:
            cached[task.node] = set()
        else:
            cached[task.node] = {block for block in cached[task.node] if (0, block[0]) not in task.files}
    left = {node: sorted(key for key, _ in blocks if not target or key.startswith("d/"))
            for node, blocks in cached.items()}
    assert left == {node: [] for node in NODES}, f"blocks the later clean evicts left cached: {left}"
    if target:  # the files the clean does not name still go to their owner on the grown ring
        kept = {(key, index) for blocks in cached.values() for key, index in blocks}
        on_c = {block for block in kept
                if ring.owners(BlockId(0, block[0], "e1", block[1]).name, NODES, 1) == ["node-c"]}
        assert on_c and on_c <= cached["node-c"]


async def test_a_load_replanned_after_a_sync_leaves_to_a_later_clean_the_files_it_was_given(
        bus: Bus, nats_server: NatsServer) -> None:
    """A load runs on node-a and node-b, a clean of folder /x/d is applied after it, then a sync moves the dataset's
    files under /y (its mount renamed: the same objects), then node-c joins the ring. The load's replan matched the
    clean's /x/d against the manifest of then, where it names nothing, and loaded the clean's files back onto node-c
    behind the clean. Now the files the clean was given when it ran stay its own; the others go to node-c."""
    await put_dataset(bus, two_folders())
    await put_runtime(bus, NODES, workers=NODES[:2])
    async with a_clean_behind_a_held_load(bus, nats_server, "/x/d") as scripted:
        renamed = [msgspec.structs.replace(e, path=f"/y/{e.key}") for e in two_folders()]
        await put_dataset(bus, renamed, requests=1)  # a sync: /x/d names nothing now
        await ring_grown_to_node_c_then_both_complete(bus, scripted)
    load_key = subjects.operation_key("DataLoad", "default", "warm")
    added = {file.key for task in scripted.tasks.values() if task.run == f"{load_key}.1" and task.node == "node-c"
             for file in task.blocks}
    assert added and all(key.startswith("e/") for key in added), f"the clean's files loaded back: {sorted(added)}"


async def test_a_loader_killed_between_run_state_and_record_catches_up(bus: Bus, nats_server: NatsServer) -> None:
    """The run state says run 1 is being planned, the record still says Pending with no run (the loader died
    between the two writes): the restarted loader plans run 1, shows it Executing, and runs no second one."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    key = subjects.operation_key("DataLoad", "default", "warm")
    record = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"),
                             load=DataLoadSpec(dataset=DatasetRef(name="data")), created_at="2026-01-01T00:00:00Z")
    await (await bus.kv(subjects.KV_OPERATIONS)).put(key, msgspec.json.encode(record))
    state = domain.RunState(run=f"{key}.1", stage="planning", started_at=1.0)
    await (await bus.kv(subjects.KV_OPERATION_RUNS)).put(key, msgspec.json.encode(state))
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        done = await phase_of(bus, "Complete")
    assert done.status.runs == 1
    assert {task.run for task in scripted.tasks.values()} == {f"{key}.1"}


async def test_a_restarted_loader_publishes_the_parts_it_had_not_published(bus: Bus, nats_server: NatsServer) -> None:
    """The loader died after saving an executing run (state and plan) and before publishing its parts: the restarted
    loader publishes every part not done, and the run completes. Part 0 was already reported done: not again."""
    entries = files(("a", 3 * BLOCK), ("b", 5 * BLOCK))
    await put_dataset(bus, entries)
    await put_runtime(bus, NODES)
    key = subjects.operation_key("DataLoad", "default", "warm")
    run = f"{key}.1"
    plan = domain.plan_load(run, ObjectRef(name="data"), entries, {0: 1, 1: 1}, NODES, NODES, BLOCK)
    assert len(plan.parts) > 1
    parts = domain.parts_state(plan)
    parts[0] = msgspec.structs.replace(parts[0], done=True, bytes_done=parts[0].bytes_total,
                                       files_done=list(range(len(plan.parts[0].task.blocks))))
    state = domain.RunState(run=run, stage="executing", started_at=1.0, ring=NODES, files_total=len(plan.files),
                            parts=parts)
    record = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"),
                             load=DataLoadSpec(dataset=DatasetRef(name="data")), created_at="2026-01-01T00:00:00Z",
                             status=domain.status_started(OperationRecord(kind="DataLoad", metadata=ObjectMeta(
                                 name="warm")).status, 1, 1, 1.0))
    await (await ManifestStore.of(bus)).objects.put(subjects.loader_plan(key), msgspec.json.encode(plan))
    await (await bus.kv(subjects.KV_OPERATION_RUNS)).put(key, msgspec.json.encode(state))
    await (await bus.kv(subjects.KV_OPERATIONS)).put(key, msgspec.json.encode(record))
    async with agent(bus, NODES) as scripted, loader(nats_server):
        done = await phase_of(bus, "Complete")
    assert sorted(task_id for task_id, _ in scripted.seen) == [p.task.id for p in plan.parts[1:]]
    assert done.status.progress.bytes_done == done.status.progress.bytes_total == 8 * BLOCK
    assert done.status.progress.files_done == 2


async def test_on_event_after_a_real_resync(bus: Bus, nats_server: NatsServer, tmp_path: Any) -> None:
    """With the real dataset and runtime services (a local:// folder, one node beating as an agent would): an
    OnEvent load runs when a DatasetResync found a new object and loads only that object."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 5000)
    (folder / "b.bin").write_bytes(b"b" * 100)
    settings = make_settings(nats_server.url)
    stop_beating = asyncio.Event()

    async def beat() -> None:
        while not stop_beating.is_set():
            await bus.publish(subjects.agent_heartbeat("node-a"), AgentHeartbeat(
                node="node-a", runtimes=[ObjectRef(name="data")], sent_at=time.time(), interval_seconds=1.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_beating.wait(), 0.5)

    beating = asyncio.create_task(beat())
    try:
        async with running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop),
                           lambda stop: loader_app.run(settings, stop)), agent(bus, ["node-a"]) as scripted:
            await publish(bus, subjects.DATASET_APPLY, DatasetApply(dataset=Dataset(
                metadata=ObjectMeta(name="data"), spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{folder}")]))))
            await publish(bus, subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
                metadata=ObjectMeta(name="data"),
                spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))))

            async def bound() -> DatasetRecord | None:
                found, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), "default.data", DatasetRecord)
                return found if found and found.status.phase == "Bound" else None

            await eventually(bound, what="dataset Bound")
            await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="OnEvent"))
            await phase_of(bus, "Complete", runs=1)
            assert scripted.keys("dataload.default.warm.1") == {"a.bin", "b.bin"}
            (folder / "c.bin").write_bytes(b"c" * 10)
            await publish(bus, subjects.DATASET_RESYNC, DatasetResync(name="data"))
            await phase_of(bus, "Complete", runs=2)
            assert scripted.keys("dataload.default.warm.2") == {"c.bin"}
    finally:
        stop_beating.set()
        await beating


async def test_a_load_after_a_restart_waits_for_the_workers_peer_servers_then_plans_on_the_ring(
        bus: Bus, nats_server: NatsServer) -> None:
    """With the real runtime service: right after a whole-stack restart two agents with a peer server beat (ready)
    while their mounts of the dataset are still starting (no peer URL: no ring yet). A ``replicas: 1`` load due then
    put every block on both nodes (twice the bytes: 31 MB for 15.7 MB in the upgrade test); it waits Pending,
    naming the workers, and once their mounts serve it plans each block on one owner of the ring."""
    await put_dataset(bus, files(("a", 3 * BLOCK), ("b", 2 * BLOCK + 1)))
    settings = make_settings(nats_server.url)
    mounts: dict[str, tuple[MountState, int]] = {"node-a": ("Starting", 0), "node-b": ("Starting", 0)}
    stop_beating = asyncio.Event()

    async def beat() -> None:
        while not stop_beating.is_set():
            for node, (state, port) in mounts.items():
                await bus.publish(subjects.agent_heartbeat(node), AgentHeartbeat(
                    node=node, all_runtimes=True, sent_at=time.time(), interval_seconds=1.0, peer_host="127.0.0.1",
                    mount_groups=[MountGroup(namespace="default", state=state, datasets={"data": port})]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_beating.wait(), 0.3)

    async def workers(want: Callable[[list[CacheWorker]], bool]) -> RuntimeRecord | None:
        found, _ = await kv_load(await bus.kv(subjects.KV_RUNTIMES), "default.data", RuntimeRecord)
        return found if found is not None and want(found.status.workers) else None

    beating = asyncio.create_task(beat())
    try:
        async with running(lambda stop: runtime_app.run(settings, stop), lambda stop: loader_app.run(settings, stop)), \
                agent(bus, list(mounts)) as scripted:
            await publish(bus, subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
                metadata=ObjectMeta(name="data"), spec=RuntimeSpec(
                    replicas=2, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))))
            await eventually(lambda: workers(lambda found: [(w.node, w.ready, w.serves_peers, w.peer_url)
                                                            for w in found] == [("node-a", True, True, ""),
                                                                                ("node-b", True, True, "")]),
                             what="both workers ready, serving peers, no peer URL yet")
            await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x", replicas=1)]))

            async def decided() -> OperationRecord | None:
                found = await operation(bus)
                return found if found is not None and (found.status.waiting_for or found.status.runs) else None

            pending = await eventually(decided, what="the load waiting or started")
            assert (pending.status.phase, pending.status.runs, pending.status.waiting_for) == (
                "Pending", 0, "the peer server of cache worker(s) node-a, node-b of runtime default/data to start "
                "(ready, no peer URL yet)"), pending.status
            assert not scripted.tasks
            mounts.update({"node-a": ("Serving", 4100), "node-b": ("Serving", 4200)})
            done = await phase_of(bus, "Complete")
    finally:
        stop_beating.set()
        await beating
    assert done.status.runs == 1 and not done.status.waiting_for
    assert done.status.progress.bytes_total == 3 * BLOCK + 2 * BLOCK + 1, done.status.progress  # once, not twice
    # "a" and "b" are a block each (the runtime's 4 MiB), each planned on one node.
    planned = sorted((file.key, task.node) for task in scripted.tasks.values() for file in task.blocks)
    assert [key for key, _ in planned] == ["a", "b"], planned
    assert {node for _, node in planned} <= {"node-a", "node-b"}


async def complete_then_delete(bus: Bus) -> None:
    """The DataLoad ``warm`` of the one-file dataset applied, run to Complete, then deleted (the record gone)."""
    await publish(bus, subjects.DATALOAD_APPLY, dataload())
    await phase_of(bus, "Complete", runs=1)
    await publish(bus, subjects.DATALOAD_DELETE, DataLoadDelete(name="warm"))

    async def gone() -> bool:
        return await operation(bus) is None

    await eventually(gone, what="deleted")


async def test_a_recreated_operation_continues_the_run_numbers(bus: Bus, nats_server: NatsServer) -> None:
    """Delete and apply again under the same name (within JetStream's duplicate window): the new run gets a new id,
    so its parts are not dropped as duplicates of the deleted operation's."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        await complete_then_delete(bus)
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        again = await phase_of(bus, "Complete", runs=2)
    assert {task.run for task in scripted.tasks.values()} == {"dataload.default.warm.1", "dataload.default.warm.2"}
    assert again.status.progress.bytes_done == BLOCK


@pytest.mark.parametrize("restart", [False, True])
async def test_a_run_whose_end_was_not_written_to_the_record_ends_there_later(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, restart: bool) -> None:
    """The run ends: its run state is saved finished, then writing the record fails (a NATS error; or the loader is
    killed between the two writes). The record must not stay Executing for ever (a Cron or OnEvent load would never
    run again, and dataload.run would be refused as Executing): the next tick, of this loader or of a restarted one,
    writes the run's end, with the phase and message it had."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    key = subjects.operation_key("DataLoad", "default", "warm")
    real_save_status = LoaderHandlers._save_status
    refused: list[str] = []

    async def save_status_failing_once(self: LoaderHandlers, key: str, record: OperationRecord, revision: int | None,
                                       status: Any) -> OperationRecord:
        if status.phase == "Failed" and not refused:
            refused.append(status.message)
            raise nats.errors.TimeoutError
        return await real_save_status(self, key, record, revision, status)

    monkeypatch.setattr(LoaderHandlers, "_save_status", save_status_failing_once)

    async def finished_state() -> bool:
        state, _ = await kv_load(await bus.kv(subjects.KV_OPERATION_RUNS), key, domain.RunState)
        return state is not None and state.stage == "finished" and bool(state.run)

    async with agent(bus, NODES[:1], fail="the store refused the read"):
        async with loader(nats_server):
            await publish(bus, subjects.DATALOAD_APPLY, dataload(policy="Cron", schedule="0 0 1 1 *"))
            await phase_of(bus, "Pending")
            await publish(bus, subjects.DATALOAD_RUN, DataLoadRun(name="warm"))
            await eventually(finished_state, what="the run state saved finished")
            if not restart:
                failed = await phase_of(bus, "Failed", runs=1)
        if restart:
            async with loader(nats_server):
                failed = await phase_of(bus, "Failed", runs=1)
    assert refused == [failed.status.message]
    assert failed.status.message.startswith("node node-a failed 1 block(s): the store refused the read")
    assert failed.status.completion_time and failed.status.duration != domain.UNFINISHED
    assert failed.status.progress.bytes_total == BLOCK


@pytest.mark.parametrize("ttl", ["2147483648", "99999999999999999999"])
async def test_apply_refuses_a_ttl_beyond_fluids_int32_naming_the_field(bus: Bus, nats_server: NatsServer,
                                                                        ttl: str) -> None:
    """A user applied ``ttlSecondsAfterFinished: 99999999999999999999`` and it was accepted: Fluid's field is an
    int32, so anything above 2147483647 is refused, for a DataLoad and a DataClean alike."""
    document = f"""apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {{name: warm}}
spec: {{dataset: {{name: data}}, ttlSecondsAfterFinished: {ttl}}}
---
apiVersion: shoal.io/v1alpha1
kind: DataClean
metadata: {{name: cool}}
spec: {{dataset: {{name: data}}, ttlSecondsAfterFinished: {ttl}}}
"""
    async with loader(nats_server):
        result = await shoal(nats_server, "apply", "-f", "-", stdin=document)
        kept = await shoal(nats_server, "apply", "-f", "-", stdin=document.replace(ttl, "2147483647"))
    assert result.exit_code == 1, result.output
    why = f"spec.ttlSecondsAfterFinished must be between 0 and 2147483647 (an int32, as Fluid's field), got {ttl}"
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: warm rejected: {why}", f"error: cool rejected: {why}"]
    assert kept.exit_code == 0, kept.output


async def test_an_operation_waited_for_is_kept_past_its_ttl_until_the_waiting_one_starts(
        bus: Bus, nats_server: NatsServer) -> None:
    """"first" has ttlSecondsAfterFinished: 0 and "second" runs after it. The tick that removes "first" (it passes
    "first" before "second") must not leave "second" waiting for "first to exist" for ever: "first" stays until
    "second" has started, then goes."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    facts = FactCollector()
    await facts.start(bus, subjects.DATALOAD_FACTS)
    async with agent(bus, NODES[:1]) as scripted, loader(nats_server):
        scripted.hold.set()
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="first", ttl_seconds_after_finished=0))
        await phase_of(bus, "Executing", name="first")
        await publish(bus, subjects.DATALOAD_APPLY, dataload(name="second",
                                                             run_after=OperationRef(kind="DataLoad", name="first")))

        async def waiting() -> OperationRecord | None:
            found = await operation(bus, "second")
            return found if found and found.status.waiting_for else None

        await eventually(waiting, what="second waiting for first")
        scripted.hold.clear()
        second = await phase_of(bus, "Complete", name="second")
        await facts.wait_for("operation.deleted.v1", name="first")  # its TTL still applies, once nothing waits
    assert second.status.runs == 1 and not second.status.waiting_for
    assert await operation(bus, "first") is None


@pytest.mark.parametrize("restart", [False, True])
async def test_a_load_metadata_resync_not_published_is_published_again(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, restart: bool) -> None:
    """The run is saved waiting for the dataset's listing (stage metadata, Executing), then publishing its
    DatasetResync fails (a NATS error; or the loader is killed right then). Nothing else asks for that listing: the
    loader publishes the resync again (same id) rather than wait for METADATA_TIMEOUT_SECONDS and fail saying the
    dataset was not listed again."""
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES[:1])
    real_publish = Bus.publish
    refused: list[str] = []

    async def publish_failing_once(self: Bus, subject: str, event: msgspec.Struct, **kwargs: Any) -> Any:
        if subject == subjects.DATASET_RESYNC and not refused:
            refused.append(str(getattr(event, "id", "")))
            raise nats.errors.TimeoutError
        return await real_publish(self, subject, event, **kwargs)

    resyncs: list[DatasetResync] = []

    async def on_resync(msg: Any) -> None:  # the dataset service's part: list again
        resyncs.append(msgspec.json.decode(msg.data, type=DatasetResync))
        await put_dataset(bus, files(("a", BLOCK), ("new", BLOCK)), requests=1)

    sub = await bus.nc.subscribe(subjects.DATASET_RESYNC, cb=on_resync)
    monkeypatch.setattr(Bus, "publish", publish_failing_once)
    try:
        async with agent(bus, NODES[:1]) as scripted:
            async with loader(nats_server, metadata_timeout=600.0):
                await publish(bus, subjects.DATALOAD_APPLY, dataload(load_metadata=True))
                await phase_of(bus, "Executing")
                if not restart:
                    done = await phase_of(bus, "Complete")
            if restart:
                async with loader(nats_server, metadata_timeout=600.0):
                    done = await phase_of(bus, "Complete")
    finally:
        await sub.unsubscribe()
    assert refused == ["dataload.default.warm.1.resync"]
    assert [r.id for r in resyncs] == refused
    assert scripted.keys("dataload.default.warm.1") == {"a", "new"}
    assert done.status.runs == 1


async def test_a_run_fails_naming_the_node_whose_task_stream_cannot_be_made(bus: Bus, nats_server: NatsServer) -> None:
    """A part is never published into nothing: a node whose stream cannot be made (here another stream already
    holds its task subjects) fails the run saying which node, which stream and why."""
    await bus.js.add_stream(js_api.StreamConfig(name="SQUATTER", subjects=[subjects.node_tasks("node-c")]))
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, ["node-c"])
    async with loader(nats_server):
        await publish(bus, subjects.DATALOAD_APPLY, dataload())
        failed = await phase_of(bus, "Failed")
    assert f"the task stream of node node-c ({subjects.task_stream('node-c')}) could not be made" in (
        failed.status.message)
    assert "overlap" in failed.status.message
    with pytest.raises(NotFoundError):
        await bus.js.stream_info(subjects.task_stream("node-c"))


async def test_a_gone_nodes_task_stream_is_deleted_once_no_part_waits_and_made_again_when_it_returns(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes replaced or autoscaled away left their task stream on the server, and their entry in the loader, for
    ever. A node gone from every runtime (node-b, node-c) for the node-gone timeout loses its stream once no part of
    a run not finished waits on it: node-c's part is done, so its stream goes; node-b's part is held, so its stream
    stays until the run ends. A stream an earlier loader made (node-z, gone before this one started) goes too. A node
    that comes back gets its stream again and its parts are done."""
    # Looked at often (every 5 s otherwise); ``raising=False``: a loader without the look has no such setting.
    monkeypatch.setattr(loader_app, "TASK_STREAMS_SECONDS", 0.1, raising=False)
    created = recorded_handlers(monkeypatch)
    await bus.provision_node_tasks("node-z")
    await put_dataset(bus, files(("a", BLOCK)))
    await put_runtime(bus, NODES)

    async def gone(*nodes: str) -> bool:
        for node in nodes:
            try:
                await bus.js.stream_info(subjects.task_stream(node))
            except NotFoundError:
                continue
            return False
        return True

    async with loader(nats_server, node_gone_timeout=1.0, node_silent_timeout=600.0):
        async with agent(bus, ["node-a", "node-c"]) as free, agent(bus, ["node-b"]) as held:
            held.hold.set()
            wipe = DataCleanApply(data_clean=DataClean(metadata=ObjectMeta(name="wipe"),
                                                       spec=DataCleanSpec(dataset=DatasetRef(name="data"))))
            await publish(bus, subjects.DATACLEAN_APPLY, wipe)

            async def parts_taken() -> bool:
                return bool(held.tasks) and {task.node for task in free.tasks.values()} == {"node-a", "node-c"}

            await eventually(parts_taken, what="each node's part taken, node-b's held")
            handlers = created[0]
            assert handlers.task_streams == set(NODES)
            await put_runtime(bus, ["node-a"])  # node-b's and node-c's agents are gone
            await eventually(lambda: gone("node-c", "node-z"), what="node-c's and node-z's streams deleted")
            # The same look judged node-b, gone as long: its part waits, so its stream and entry stay.
            assert (await bus.js.stream_info(subjects.task_stream("node-b"))).config.name
            assert handlers.task_streams == {"node-a", "node-b"} and handlers.found_streams == set()
            held.hold.clear()
            await phase_of(bus, "Complete", name="wipe", kind="DataClean")
            await eventually(lambda: gone("node-b"), what="node-b's stream deleted once its part was done")
        assert handlers.task_streams == {"node-a"} and set(handlers.streams_gone_since) <= {"node-a"}
        # node-c comes back (node-a goes): a load's part gets node-c a stream again, and is done.
        await put_runtime(bus, ["node-c"])
        async with agent(bus, ["node-c"]) as back:
            await publish(bus, subjects.DATALOAD_APPLY, dataload())
            await phase_of(bus, "Complete")
            assert {task.node for task in back.tasks.values()} == {"node-c"}
            assert (await bus.js.stream_info(subjects.task_stream("node-c"))).config.subjects == [
                subjects.node_tasks("node-c")]
            await eventually(lambda: gone("node-a"), what="node-a's stream deleted in turn")
        assert handlers.task_streams == {"node-c"}


async def test_an_upgrade_from_the_shared_task_stream_moves_the_parts_to_the_nodes_streams(
        bus: Bus, nats_server: NatsServer) -> None:
    """The shared stream of an older Shoal held every node's parts (``shoal.task.>``): provisioning narrows it to the
    progress, so each node's stream can be made, and loads work; a part left there is no mount's any more (it ages
    out with the stream's max_age; the loader publishes an unfinished run's parts again when it starts)."""
    await bus.js.delete_stream(subjects.STREAM_TASKS)
    await bus.js.add_stream(js_api.StreamConfig(name=subjects.STREAM_TASKS, subjects=["shoal.task.>"], max_age=DAY))
    await bus.js.publish(subjects.node_task("node-a", "default", "data", ""), b"{}")
    await put_dataset(bus, files(("a", BLOCK), ("b", BLOCK)))
    await put_runtime(bus, NODES)
    async with loader(nats_server), agent(bus, NODES):
        await publish(bus, subjects.DATALOAD_APPLY, dataload(target=[TargetPath(path="/x", replicas=3)]))
        await phase_of(bus, "Complete")
    shared = await bus.js.stream_info(subjects.STREAM_TASKS)
    assert shared.config.subjects == [subjects.TASK_PROGRESS] and shared.state.messages >= 1
