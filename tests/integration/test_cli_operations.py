"""The ``shoal`` CLI's DataLoad and DataClean commands against a real nats-server: apply (Fluid and Shoal
documents), ``load``/``clean``/``run``/``delete``, ``get``/``describe`` over KV records, and ``--wait`` following an
operation to Complete or Failed.

The loader service is built on another branch at the same time, so ``StandInLoader`` stands in for it: it answers
commands with the facts of the contract (libs/events/operation.py) and writes ``OperationRecord`` values into
``shoal_operations`` as the loader would. End-to-end tests with the real loader and agents come after the merge.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import yaml
from nats.aio.msg import Msg
from rich.console import Console

from libs import subjects
from libs.bus import Bus, kv_load
from libs.cli import operations
from libs.events.common import ObjectMeta, apply_result
from libs.events.dataset import Condition, Dataset, DatasetRecord, DatasetSpec, Mount
from libs.events.operation import (
    CleanTarget,
    DataCleanApply,
    DataCleanSpec,
    DataLoad,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataLoadSpec,
    DatasetRef,
    NodeProgress,
    OperationAccepted,
    OperationCommand,
    OperationDeleted,
    OperationKind,
    OperationRecord,
    OperationRejected,
    OperationStatus,
    Progress,
    TargetPath,
)
from tests.conftest import NatsServer
from tests.helpers import eventually
from tests.integration.test_cli import shoal

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30
MiB = 2**20
_COMMANDS: msgspec.json.Decoder[OperationCommand] = msgspec.json.Decoder(OperationCommand)


def record_of(command: DataLoadApply | DataCleanApply, generation: int, status: OperationStatus) -> OperationRecord:
    """The loader's record of ``command`` at ``generation``; a run in ``status`` (one that started) is of that
    generation, as the loader's runs are (``observedGeneration``), unless ``status`` names an older one."""
    if status.phase != "Pending" and not status.observed_generation:
        status = msgspec.structs.replace(status, observed_generation=generation)
    if isinstance(command, DataLoadApply):
        return OperationRecord(kind="DataLoad", metadata=command.data_load.metadata, load=command.data_load.spec,
                               generation=generation, created_at="2026-01-01T00:00:00Z", status=status)
    return OperationRecord(kind="DataClean", metadata=command.data_clean.metadata, clean=command.data_clean.spec,
                           generation=generation, created_at="2026-01-01T00:00:00Z", status=status)


@dataclass
class StandInLoader:
    """Stands in for the loader service (on another branch until the merge).

    Applies are accepted with ``generation`` and followed by a record per status in ``statuses`` (written to KV
    in order, as the loader's phase changes and progress would be); ``reject`` rejects every command with that
    reason; runs and deletes get their facts.
    """

    bus: Bus
    generation: int = 1
    statuses: Sequence[OperationStatus] = (OperationStatus(),)
    reject: str = ""
    delete_record: bool = False  # delete the record after writing the statuses (a TTL or a concurrent delete)
    received: list[tuple[str, OperationCommand]] = field(default_factory=list)

    async def on_command(self, message: Msg) -> None:
        command = _COMMANDS.decode(message.data)
        self.received.append((message.subject, command))
        family = "dataclean" if message.subject.startswith("shoal.cmd.dataclean") else "dataload"
        kind: OperationKind = "DataClean" if family == "dataclean" else "DataLoad"
        if self.reject:
            await self.bus.publish(subjects.DATALOAD_REJECTED if family == "dataload" else subjects.DATACLEAN_REJECTED,
                                   OperationRejected(causation_id=command.id, reason=self.reject, kind=kind))
            return
        if isinstance(command, DataLoadApply | DataCleanApply):
            meta = command.data_load.metadata if isinstance(command, DataLoadApply) else command.data_clean.metadata
            kv = await self.bus.kv(subjects.KV_OPERATIONS)
            key = subjects.operation_key(kind, meta.namespace, meta.name)
            held, _ = await kv_load(kv, key, OperationRecord)  # what the loader's answer says it found
            applied = record_of(command, self.generation, OperationStatus())
            result = apply_result(None if held is None else (held.metadata, held.load, held.clean),
                                  (applied.metadata, applied.load, applied.clean))
            await self.bus.publish(
                subjects.DATALOAD_ACCEPTED if family == "dataload" else subjects.DATACLEAN_ACCEPTED,
                OperationAccepted(causation_id=command.id, kind=kind, name=meta.name, namespace=meta.namespace,
                                  generation=self.generation, result=result))
            for status in self.statuses:
                await kv.put(key, msgspec.json.encode(record_of(command, self.generation, status)))
            if self.delete_record:
                await kv.delete(key)
        elif isinstance(command, DataLoadRun):
            await self.bus.publish(subjects.DATALOAD_ACCEPTED, OperationAccepted(
                causation_id=command.id, kind="DataLoad", name=command.name, namespace=command.namespace,
                generation=self.generation))
        else:
            await self.bus.publish(subjects.DATALOAD_DELETED if family == "dataload" else subjects.DATACLEAN_DELETED,
                                   OperationDeleted(causation_id=command.id, kind=kind, name=command.name,
                                                    namespace=command.namespace))


async def put_dataset(bus: Bus, name: str = "demo", namespace: str = "default") -> None:
    """The dataset service's record of a dataset, as ``shoal load`` looks for it."""
    kv = await bus.kv(subjects.KV_DATASETS)
    record = DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name=name, namespace=namespace),
                                           spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{name}/")])), generation=1)
    await kv.put(subjects.resource_key(namespace, name), msgspec.json.encode(record))


@pytest.fixture
async def loader(bus: Bus) -> AsyncIterator[StandInLoader]:
    stand_in = StandInLoader(bus)
    subscriptions = [await bus.nc.subscribe(pattern, cb=stand_in.on_command)
                     for pattern in subjects.OPERATION_COMMANDS]
    await bus.nc.flush()
    try:
        yield stand_in
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


def executing(files_done: int, bytes_done: int) -> OperationStatus:
    return OperationStatus(phase="Executing", duration="Unfinished", runs=1, progress=Progress(
        files_done=files_done, files_total=10, bytes_done=bytes_done, bytes_total=40 * MiB,
        rate_bytes_per_second=20 * MiB, eta_seconds=1.0))


COMPLETE = OperationStatus(phase="Complete", duration="2s", runs=1, progress=Progress(
    files_done=10, files_total=10, bytes_done=40 * MiB, bytes_total=40 * MiB, bytes_skipped=8 * MiB))

FLUID_DATALOAD = """\
apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata:
  name: spark-dataload
spec:
  dataset:
    name: spark
    namespace: default
  loadMetadata: true
  target:
    - path: /spark/spark-2.4.7
      replicas: 1
    - path: /spark/spark-3.0.1/pyspark-3.0.1.tar.gz
      replicas: 2
  nodeSelector: {disk: ssd}
"""


# --- apply ---


async def test_apply_of_a_fluid_dataload_publishes_the_dataload_command(nats_server: NatsServer,
                                                                        loader: StandInLoader) -> None:
    result = await shoal(nats_server, "apply", "-f", "-", stdin=FLUID_DATALOAD)

    assert result.exit_code == 0, result.output
    assert result.stdout == "dataload.shoal.io/spark-dataload created\n"
    assert result.stderr == "ignored: DataLoad default/spark-dataload: spec.nodeSelector (not used by Shoal)\n"
    [(subject, command)] = loader.received
    assert subject == subjects.DATALOAD_APPLY
    assert isinstance(command, DataLoadApply)
    assert command.data_load.metadata == ObjectMeta(name="spark-dataload")
    assert command.data_load.spec == DataLoadSpec(
        dataset=DatasetRef(name="spark", namespace="default"), load_metadata=True,
        target=[TargetPath(path="/spark/spark-2.4.7"),
                TargetPath(path="/spark/spark-3.0.1/pyspark-3.0.1.tar.gz", replicas=2)])


async def test_apply_wait_follows_the_load_to_complete(nats_server: NatsServer, loader: StandInLoader) -> None:
    """The stand-in writes Pending, two Executing steps and Complete while the CLI waits on its KV watch."""
    loader.statuses = [OperationStatus(waiting_for="DataLoad default/spark-meta to be Complete"),
                       executing(3, 12 * MiB), executing(7, 28 * MiB), COMPLETE]

    result = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=FLUID_DATALOAD)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "dataload.shoal.io/spark-dataload created",
        "dataload.shoal.io/spark-dataload Complete: 10/10 files, 40.00MiB/40.00MiB in 2s (8.00MiB already cached)",
    ]
    # Off a terminal there is no live bar: each phase is said once.
    _ignored_note, *phases = result.stderr.splitlines()
    assert phases == ["dataload.shoal.io/spark-dataload Pending (waiting for DataLoad default/spark-meta to be "
                      "Complete)",
                      "dataload.shoal.io/spark-dataload Executing 3/10 files, 12.00MiB/40.00MiB",
                      "dataload.shoal.io/spark-dataload Complete 10/10 files, 40.00MiB/40.00MiB"]


async def test_a_terminal_gets_a_live_progress_bar(bus: Bus) -> None:
    """``follow`` on a (forced) terminal draws the bar; the stand-in's writes are the loader's."""
    command = DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name="warm"),
                                               spec=DataLoadSpec(dataset=DatasetRef(name="demo", namespace="default"))))
    watch = await operations.open_watch(bus, "dataload", "default", "warm")
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    try:
        following = asyncio.create_task(operations.follow([(watch, 1)], console))
        kv = await bus.kv(subjects.KV_OPERATIONS)
        for status in (executing(3, 12 * MiB), COMPLETE):
            await kv.put(subjects.operation_key("DataLoad", "default", "warm"),
                         msgspec.json.encode(record_of(command, 1, status)))
        [result] = await asyncio.wait_for(following, timeout=10)
    finally:
        await watch.close()

    assert result.ok and result.record is not None
    assert result.record.status == msgspec.structs.replace(COMPLETE, observed_generation=1)
    assert "100% Complete, 10/10 files, 40.00MiB/40.00MiB" in screen.getvalue()


async def test_off_a_terminal_the_wait_says_what_a_pending_load_waits_for_once_it_does(bus: Bus) -> None:
    """The loader saves an applied load Pending, then what it waits for (its dataset, its runAfter): a log showed
    only the bare "Pending" for as long as the load waited."""
    command = DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name="warm"),
                                               spec=DataLoadSpec(dataset=DatasetRef(name="demo", namespace="default"))))
    watch = await operations.open_watch(bus, "dataload", "default", "warm")
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=False, width=200, color_system=None)
    kv = await bus.kv(subjects.KV_OPERATIONS)

    async def said(line: str) -> bool:
        return line in screen.getvalue().splitlines()

    try:
        following = asyncio.create_task(operations.follow([(watch, 1)], console))
        waiting = "dataset default/demo to exist and be Bound"
        for status, line in ((OperationStatus(), "dataload.shoal.io/warm Pending"),
                             (OperationStatus(waiting_for=waiting), f"dataload.shoal.io/warm Pending (waiting for "
                                                                    f"{waiting})"),
                             (COMPLETE, "dataload.shoal.io/warm Complete 10/10 files, 40.00MiB/40.00MiB")):
            await kv.put(subjects.operation_key("DataLoad", "default", "warm"),
                         msgspec.json.encode(record_of(command, 1, status)))
            await eventually(functools.partial(said, line), timeout=10, what=line)
        [result] = await asyncio.wait_for(following, timeout=10)
    finally:
        await watch.close()
    assert result.ok
    assert len(screen.getvalue().splitlines()) == 3, screen.getvalue()


async def test_a_bounded_follow_returns_the_ended_ones_and_says_where_the_others_stood(bus: Bus) -> None:
    """``within``: an operation that ended is reported as it ended, in order, beside one given up on (Pending, one
    the loader never wrote)."""
    kv = await bus.kv(subjects.KV_OPERATIONS)
    watches = []
    for name, status in (("done", COMPLETE), ("stuck", OperationStatus(waiting_for="dataset default/x to exist")),
                         ("unseen", None)):
        watches.append((await operations.open_watch(bus, "dataload", "default", name), 1))
        if status is not None:
            command = DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name=name), spec=DataLoadSpec(
                dataset=DatasetRef(name="x", namespace="default"))))
            await kv.put(subjects.operation_key("DataLoad", "default", name),
                         msgspec.json.encode(record_of(command, 1, status)))
    console = Console(file=io.StringIO(), force_terminal=False, width=200, color_system=None)
    try:
        done, stuck, unseen = await asyncio.wait_for(operations.follow(watches, console, within=0.5), timeout=10)
    finally:
        for watch, _ in watches:
            await watch.close()

    assert done.ok and stuck.record is None and unseen.record is None
    assert stuck.error == ("dataload.shoal.io/stuck Pending (waiting for dataset default/x to exist), after "
                           "--wait-timeout 0.5s; it goes on without this command (`shoal get dataloads` shows how it "
                           "ends)")
    assert unseen.error.startswith("dataload.shoal.io/unseen not started by the loader yet, after --wait-timeout")


def test_the_wait_ends_on_the_applied_generations_run_and_on_an_older_loaders_record() -> None:
    """A run started from an older spec (observedGeneration 1) is not the end of applying generation 2; a loader that
    does not record observedGeneration (0) is judged by the record's generation, or a newer CLI would wait for ever
    on an older loader's Complete record (seen: ``shoal clean --wait`` printed Complete and never returned)."""
    spec = DataLoadSpec(dataset=DatasetRef(name="demo", namespace="default"))
    older = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"), load=spec, generation=2,
                            status=OperationStatus(phase="Complete", runs=1))
    assert operations.finished(older, 2) and not operations.finished(older, 3)
    stale = msgspec.structs.replace(older, status=msgspec.structs.replace(older.status, observed_generation=1))
    assert not operations.finished(stale, 2)
    ran = msgspec.structs.replace(older, status=msgspec.structs.replace(older.status, observed_generation=2))
    assert operations.finished(ran, 2)
    running = msgspec.structs.replace(ran, status=msgspec.structs.replace(ran.status, phase="Executing"))
    assert not operations.finished(running, 2)


async def test_apply_wait_does_not_say_the_previous_runs_end_as_this_applys(nats_server: NatsServer, bus: Bus,
                                                                          loader: StandInLoader) -> None:
    """The loader saves a changed spec (generation 2) with the previous run's Failed status, then runs it: --wait
    printed "Failed" first, as if the fixed spec had failed, then "Executing" and "Complete"."""
    earlier = DataLoadApply(data_load=DataLoad(
        metadata=ObjectMeta(name="spark-dataload"),
        spec=DataLoadSpec(dataset=DatasetRef(name="spark", namespace="default"))))
    failed = OperationStatus(phase="Failed", duration="0s", runs=1, message="target path '/a' is not in the manifest")
    kv = await bus.kv(subjects.KV_OPERATIONS)
    await kv.put(subjects.operation_key("DataLoad", "default", "spark-dataload"),
                 msgspec.json.encode(record_of(earlier, 1, failed)))
    loader.generation = 2
    loader.statuses = [msgspec.structs.replace(failed, observed_generation=1), executing(3, 12 * MiB), COMPLETE]

    result = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=FLUID_DATALOAD)

    assert result.exit_code == 0, result.output
    _ignored_note, *phases = result.stderr.splitlines()
    assert phases == ["dataload.shoal.io/spark-dataload Executing 3/10 files, 12.00MiB/40.00MiB",
                      "dataload.shoal.io/spark-dataload Complete 10/10 files, 40.00MiB/40.00MiB"]


async def test_apply_wait_exits_1_with_the_message_when_the_load_fails(nats_server: NatsServer, bus: Bus,
                                                                       loader: StandInLoader) -> None:
    """An earlier generation's Complete record is not this apply's end: the CLI waits for generation 2."""
    earlier = DataLoadApply(data_load=DataLoad(
        metadata=ObjectMeta(name="spark-dataload"),
        spec=DataLoadSpec(dataset=DatasetRef(name="spark", namespace="default"))))
    kv = await bus.kv(subjects.KV_OPERATIONS)
    await kv.put(subjects.operation_key("DataLoad", "default", "spark-dataload"),
                 msgspec.json.encode(record_of(earlier, 1, COMPLETE)))
    message = "node-b: 3 blocks failed: object changed since the load was planned (data/a.bin)"
    loader.generation = 2
    loader.statuses = [OperationStatus(), executing(3, 12 * MiB),
                       OperationStatus(phase="Failed", duration="1s", runs=1, message=message,
                                       progress=executing(3, 12 * MiB).progress)]

    result = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=FLUID_DATALOAD)

    assert result.exit_code == 1
    assert result.stdout == "dataload.shoal.io/spark-dataload configured\n"
    assert result.stderr.splitlines()[-1] == f"error: dataload.shoal.io/spark-dataload Failed: {message}"
    assert "dataload.shoal.io/spark-dataload Complete 10/10 files, 40.00MiB/40.00MiB" not in result.stderr


async def test_wait_shows_a_failed_message_quoting_an_odd_key_on_one_line_without_control_sequences(
        nats_server: NatsServer, loader: StandInLoader) -> None:
    """A part's failure names the object's key, which the store allows to hold an escape sequence (here one that
    retitles a terminal) and line breaks: the Failed line printed them as they were, so the terminal acted on them
    and a script reading stderr saw a second "error:" line the key had forged."""
    await put_dataset(loader.bus, "demo")
    key = "evil\x1b]0;pwned\x07\nerror: fake.txt"
    message = f"node node-a failed 1 block(s): {key}: object '{key}' does not exist in bucket 'b'"
    loader.statuses = [OperationStatus(), OperationStatus(phase="Failed", duration="0s", runs=1, message=message)]

    result = await shoal(nats_server, "load", "dataset", "demo", "--name", "odd", "--wait")

    assert result.exit_code == 1
    shown = "evil^[]0;pwned\\x07\\nerror: fake.txt"
    assert result.stderr.splitlines()[-1] == ("error: dataload.shoal.io/odd Failed: node node-a failed 1 block(s): "
                                              f"{shown}: object '{shown}' does not exist in bucket 'b'")
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        result.stderr.splitlines()[-1:]


async def test_wait_says_so_when_the_operation_is_deleted_before_it_finished(nats_server: NatsServer,
                                                                             loader: StandInLoader) -> None:
    loader.statuses = [OperationStatus(), executing(1, MiB)]
    loader.delete_record = True
    await put_dataset(loader.bus)

    result = await shoal(nats_server, "load", "dataset", "demo", "--name", "gone", "--wait")

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: dataload.shoal.io/gone was deleted before it finished"


async def start_waiting_load(server: NatsServer, name: str, timeout: float) -> asyncio.subprocess.Process:
    """``shoal load dataset demo --name NAME --wait`` in its own process (one a test can kill if it hangs), returned
    once it follows the load (it said Pending)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "libs.cli.main", "--nats", server.url, "--timeout", str(timeout),
        "load", "dataset", "demo", "--name", name, "--wait",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        assert line.decode() == f"dataload.shoal.io/{name} Pending\n"
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process


async def test_wait_rides_out_a_nats_restart_and_says_when_nats_stays_away(nats_server: NatsServer, bus: Bus,
                                                                          loader: StandInLoader) -> None:
    await put_dataset(bus)
    # Back within the patience (--timeout): the watch starts again and sees the end.
    process = await start_waiting_load(nats_server, "restarted", timeout=60)
    try:
        nats_server.restart()
        [(_, command)] = loader.received
        assert isinstance(command, DataLoadApply)

        async def complete() -> bool:
            kv = await bus.kv(subjects.KV_OPERATIONS)
            await kv.put(subjects.operation_key("DataLoad", "default", "restarted"),
                         msgspec.json.encode(record_of(command, 1, COMPLETE)))
            return True

        await eventually(complete, what="the record written after the restart", tolerate=(Exception,))
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr
    assert stdout.decode().splitlines()[-1].startswith("dataload.shoal.io/restarted Complete")

    # Away for longer: it waited in silence forever; now it ends with exit code 2 and says what goes on.
    process = await start_waiting_load(nats_server, "stranded", timeout=1)
    try:
        nats_server.stop()
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        nats_server.start()  # the test's own connection closes while it runs
    assert (process.returncode, stdout.decode()) == (2, "dataload.shoal.io/stranded created\n")
    assert stderr.decode() == (
        f"error: lost the connection to NATS at {nats_server.url}: no reconnect within 1s while waiting for "
        "dataload.shoal.io/stranded; the work goes on without this command (`shoal get dataloads` or `datacleans` "
        "shows how it ends)\n")


async def test_wait_says_when_a_frozen_nats_does_not_answer_for_the_timeout(nats_server: NatsServer, bus: Bus,
                                                                            loader: StandInLoader) -> None:
    """A server that stops answering without closing the connection (SIGSTOP here; a network cut alike) left the
    connection "up": ``--wait --timeout 1`` stayed silent until nats-py's own pings, two minutes apart, gave up."""
    await put_dataset(bus)
    process = await start_waiting_load(nats_server, "frozen", timeout=1)
    assert nats_server.process is not None
    os.kill(nats_server.process.pid, signal.SIGSTOP)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        os.kill(nats_server.process.pid, signal.SIGCONT)
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (process.returncode, stdout.decode()) == (2, "dataload.shoal.io/frozen created\n")
    assert stderr.decode() == (
        f"error: lost the connection to NATS at {nats_server.url}: no answer from NATS within 1s while waiting for "
        "dataload.shoal.io/frozen; the work goes on without this command (`shoal get dataloads` or `datacleans` "
        "shows how it ends)\n")


async def test_rejected_apply_and_invalid_documents(nats_server: NatsServer, loader: StandInLoader) -> None:
    loader.reject = "dataset default/spark does not exist"
    rejected = await shoal(nats_server, "apply", "-f", "-", "--wait", stdin=FLUID_DATALOAD)
    assert rejected.exit_code == 1
    assert rejected.stderr.splitlines()[-1] == "error: spark-dataload rejected: dataset default/spark does not exist"

    received = len(loader.received)
    invalid = await shoal(nats_server, "apply", "-f", "-", stdin=(
        "apiVersion: data.fluid.io/v1alpha1\nkind: DataLoad\nmetadata: {name: x}\nspec: {policy: Weekly}\n"
        "---\napiVersion: data.fluid.io/v1alpha1\nkind: DataLoad\nmetadata: {name: y}\nspec: {loadMetadata: true}\n"))
    assert invalid.exit_code == 1
    assert invalid.stderr.splitlines() == [
        "error: <stdin>: document 1 (DataLoad x): spec.policy 'Weekly' is not one of Once, Cron, OnEvent",
        "error: <stdin>: document 2 (DataLoad y): Object missing required field `dataset` - at `$.spec`",
    ]
    assert len(loader.received) == received  # nothing published


async def test_no_loader_running_is_said(nats_server: NatsServer, bus: Bus) -> None:
    result = await shoal(nats_server, "run", "dataload", "warm", wait_seconds=0.3)

    assert result.exit_code == 1
    assert result.stderr == "error: warm: no answer from the loader service within 0.3s (is it running?)\n"


async def test_wait_without_shoals_streams_exits_2(nats_server: NatsServer) -> None:
    result = await shoal(nats_server, "load", "dataset", "demo", "--wait")

    assert result.exit_code == 2
    assert result.stderr == (f"error: Shoal's streams do not exist on NATS at {nats_server.url}: "
                             "is `make run` running?\n")


# --- load, clean, run, delete ---


async def test_wait_timeout_ends_a_wait_for_a_dataset_that_does_not_exist_saying_what_it_waited_for(
        nats_server: NatsServer, loader: StandInLoader) -> None:
    """A DataLoad whose dataset does not exist stays Pending (as in Fluid: the dataset may come later; the loader
    fails it after ten minutes), and ``apply --wait`` had no bound of its own: it waited for as long as that."""
    waiting = "dataset default/spark to exist and be Bound"  # the loader's words (services.loader.domain)
    loader.statuses = [OperationStatus(waiting_for=waiting)]

    result = await asyncio.wait_for(shoal(nats_server, "apply", "-f", "-", "--wait", "--wait-timeout", "1s",
                                          stdin=FLUID_DATALOAD), timeout=30)

    assert (result.exit_code, result.stdout) == (1, "dataload.shoal.io/spark-dataload created\n"), result.output
    _ignored_note, *said = result.stderr.splitlines()
    pending = f"dataload.shoal.io/spark-dataload Pending (waiting for {waiting})"
    assert said == [pending, f"error: {pending}, after --wait-timeout 1s; it goes on without this command (`shoal "
                             "get dataloads` shows how it ends)"]

    # One that ends within the bound ends as without it.
    loader.statuses = [executing(3, 12 * MiB), COMPLETE]
    done = await shoal(nats_server, "apply", "-f", "-", "--wait", "--wait-timeout", "1m", stdin=FLUID_DATALOAD)
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines()[-1].startswith("dataload.shoal.io/spark-dataload Complete: 10/10 files")


@pytest.mark.parametrize(("args", "why"), [
    (("--wait-timeout", "5m"), "--wait-timeout goes with --wait"),
    (("--wait", "--wait-timeout", "5 minutes"), "'5 minutes' is not a duration: give one such as 90s, 5m or 1h30m"),
    (("--wait", "--wait-timeout", "0s"), "'0s' is not a duration"),
    (("--wait", "--wait-timeout", "inf"), "'inf' is not a duration"),
])
async def test_a_wait_timeout_without_wait_or_that_is_no_duration_is_a_usage_error(
        nats_server: NatsServer, loader: StandInLoader, args: tuple[str, ...], why: str) -> None:
    for command in (("apply", "-f", "-"), ("load", "dataset", "spark"), ("clean", "dataset", "spark")):
        result = await shoal(nats_server, *command, *args, stdin=FLUID_DATALOAD)
        assert result.exit_code == 2 and why in result.stderr, (command, result.output)
    assert loader.received == []


async def test_load_dataset_creates_a_once_dataload_and_waits(nats_server: NatsServer,
                                                               loader: StandInLoader) -> None:
    loader.statuses = [executing(5, 20 * MiB), COMPLETE]
    await put_dataset(loader.bus, namespace="ml")
    await put_dataset(loader.bus)

    result = await shoal(nats_server, "load", "dataset", "demo", "--path", "/train/images", "--path",
                         "/train/labels.csv", "--replicas", "2", "-n", "ml", "--wait")

    assert result.exit_code == 0, result.output
    created, done = result.stdout.splitlines()
    match = re.fullmatch(r"dataload\.shoal\.io/(demo-load-[bcdfghjklmnpqrstvwxz2456789]{5}) created", created)
    assert match, created
    assert done.startswith(f"dataload.shoal.io/{match[1]} Complete: 10/10 files")
    [(subject, command)] = loader.received
    assert subject == subjects.DATALOAD_APPLY and isinstance(command, DataLoadApply)
    assert command.data_load.metadata == ObjectMeta(name=match[1], namespace="ml")
    assert command.data_load.spec == DataLoadSpec(
        dataset=DatasetRef(name="demo", namespace="ml"), policy="Once",
        target=[TargetPath(path="/train/images", replicas=2), TargetPath(path="/train/labels.csv", replicas=2)])

    whole = await shoal(nats_server, "load", "dataset", "demo", "--replicas", "3")
    assert whole.exit_code == 0, whole.output
    command = loader.received[-1][1]
    assert isinstance(command, DataLoadApply)
    assert command.data_load.spec.target == [TargetPath(path="/", replicas=3)]

    bad = await shoal(nats_server, "load", "dataset", "demo", "--replicas", "0")
    assert bad.exit_code == 2 and "--replicas" in bad.stderr


async def test_load_of_a_dataset_that_does_not_exist_creates_nothing(nats_server: NatsServer,
                                                                       loader: StandInLoader) -> None:
    """Said before a DataLoad is created (the loader would accept it and only its run would fail), with or without
    --wait; the same name in another namespace is another dataset."""
    await put_dataset(loader.bus, "foo", namespace="other")

    for args in (("load", "dataset", "foo", "-n", "ml"), ("load", "ds", "foo", "-n", "ml", "--wait", "--name", "x"),
                 ("load", "dataset", "Foo Bar", "-n", "ml")):
        result = await shoal(nats_server, *args)
        name = "Foo Bar" if "Foo Bar" in args else "foo"
        assert (result.exit_code, result.stdout) == (1, ""), args
        assert result.stderr == f"error: dataset ml/{name} not found; no DataLoad was created\n", args
    assert loader.received == []

    cleaned = await shoal(nats_server, "clean", "dataset", "foo", "-n", "ml")
    assert (cleaned.exit_code, cleaned.stderr) == (1, "error: dataset ml/foo not found; no DataClean was created\n")
    assert loader.received == []

    found = await shoal(nats_server, "load", "dataset", "foo", "-n", "other", "--name", "warm")
    assert (found.exit_code, found.stdout) == (0, "dataload.shoal.io/warm created\n"), found.output
    assert [subject for subject, _ in loader.received] == [subjects.DATALOAD_APPLY]


@pytest.mark.parametrize(("command", "path", "why"), [
    ("load", "//t", "must not hold an empty segment ('//')"),
    ("load", "/train//a.jpg", "must not hold an empty segment ('//')"),
    ("clean", "/train//", "must not hold an empty segment ('//')"),
    ("load", "/train/../val", "must not hold '.' or '..' segments"),
    ("clean", "/./train", "must not hold '.' or '..' segments"),
    ("load", "train", "must start with '/'"),
    # A name the shell gave as bytes that are not UTF-8 crashed the CLI (UnicodeEncodeError) as it sent the command.
    ("load", "/train/bad\udcff.jpg", "is not valid UTF-8: no file or folder of a dataset has such a path"),
    ("clean", "/bad\udcff/", "is not valid UTF-8"),
    ("load", "/train/" + "n" * 256, "has a name of 256 bytes (the limit is 255)"),
])
async def test_a_path_the_loader_would_refuse_is_refused_before_anything_is_sent(
        nats_server: NatsServer, loader: StandInLoader, command: str, path: str, why: str) -> None:
    """``--path //t`` was sent, and the load failed once run: "target path '//t' is not in the manifest". The CLI
    says what the loader would, before it creates anything."""
    await put_dataset(loader.bus, "demo")
    result = await shoal(nats_server, command, "dataset", "demo", "--path", "/train", "--path", path)
    assert (result.exit_code, result.stdout) == (1, ""), result.output
    assert result.stderr.startswith(f"error: --path {path!r} {why}") and result.stderr.count("\n") == 1, result.stderr
    assert loader.received == []


async def test_clean_run_and_delete(nats_server: NatsServer, loader: StandInLoader) -> None:
    await put_dataset(loader.bus, "demo")
    cleaned = await shoal(nats_server, "clean", "dataset", "demo", "--path", "/train", "--name", "cool")
    assert (cleaned.exit_code, cleaned.stdout) == (0, "dataclean.shoal.io/cool created\n")
    subject, command = loader.received[-1]
    assert subject == subjects.DATACLEAN_APPLY and isinstance(command, DataCleanApply)
    assert command.data_clean.spec == DataCleanSpec(dataset=DatasetRef(name="demo", namespace="default"),
                                                    target=[CleanTarget(path="/train")])

    ran = await shoal(nats_server, "run", "dataload", "warm")
    assert (ran.exit_code, ran.stdout) == (0, "dataload.shoal.io/warm run requested\n")
    assert loader.received[-1] == (subjects.DATALOAD_RUN, DataLoadRun(name="warm", id=loader.received[-1][1].id))

    deleted = await shoal(nats_server, "delete", "dataload", "warm")
    assert (deleted.exit_code, deleted.stdout) == (0, "dataload.shoal.io/warm deleted\n")
    assert loader.received[-1] == (subjects.DATALOAD_DELETE,
                                   DataLoadDelete(name="warm", id=loader.received[-1][1].id))
    deleted_clean = await shoal(nats_server, "delete", "dataclean", "cool")
    assert (deleted_clean.exit_code, deleted_clean.stdout) == (0, "dataclean.shoal.io/cool deleted\n")
    assert loader.received[-1][0] == subjects.DATACLEAN_DELETE

    loader.reject = "DataLoad default/once has policy Once: apply it again instead"
    refused = await shoal(nats_server, "run", "load", "once")
    assert (refused.exit_code, refused.stderr) == (1, f"error: once rejected: {loader.reject}\n")


# --- get and describe over KV records (written here as the loader would) ---


WARM = OperationRecord(
    kind="DataLoad", metadata=ObjectMeta(name="warm", labels={"team": "ml"}),
    load=DataLoadSpec(dataset=DatasetRef(name="imagenet", namespace="default"),
                      target=[TargetPath(path="/train", replicas=2)]),
    generation=1, created_at="2026-01-01T00:00:00Z",
    status=OperationStatus(
        phase="Executing", duration="Unfinished", runs=1, start_time="2026-01-01T00:00:01Z",
        progress=Progress(files_done=812, files_total=1000, bytes_done=8 * GiB, bytes_total=10 * GiB,
                          rate_bytes_per_second=200 * MiB, eta_seconds=10.0,
                          nodes=[NodeProgress(node="node-a", bytes_done=5 * GiB, bytes_total=5 * GiB, done=True),
                                 NodeProgress(node="node-b", bytes_done=3 * GiB, bytes_total=5 * GiB)]),
        conditions=[Condition(type="Executing", status="True", reason="Started", message="2 nodes",
                              last_transition_time="2026-01-01T00:00:01Z")]),
)
COOL = OperationRecord(
    kind="DataClean", metadata=ObjectMeta(name="cool", namespace="other"),
    clean=DataCleanSpec(dataset=DatasetRef(name="imagenet", namespace="other")), generation=1,
    created_at="2026-01-01T00:00:00Z",
    # As the loader writes a clean's: freed bytes with no total (it cannot know beforehand what each node holds).
    status=OperationStatus(phase="Complete", duration="1s", progress=Progress(
        bytes_done=GiB, nodes=[NodeProgress(node="node-a", bytes_done=GiB, done=True)])),
)


async def put_operations(bus: Bus) -> None:
    kv = await bus.kv(subjects.KV_OPERATIONS)
    for record in (WARM, COOL):
        key = subjects.operation_key(record.kind, record.metadata.namespace, record.metadata.name)
        await kv.put(key, msgspec.json.encode(record))


async def test_get_dataloads_has_fluids_columns_and_progress(nats_server: NatsServer, bus: Bus) -> None:
    await put_operations(bus)

    result = await shoal(nats_server, "get", "dataloads")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "DATASET", "PHASE", "AGE", "DURATION", "PROGRESS"]
    cells = re.split(r"\s{3,}", row)
    assert cells[:3] == ["warm", "imagenet", "Executing"]
    assert re.fullmatch(r"\d+d", cells[3]), cells[3]  # created on 2026-01-01
    assert cells[4:] == ["Unfinished", "812/1000 files, 8.00GiB/10.00GiB"]

    # One bucket holds both kinds: datacleans are listed apart, here across namespaces.
    cleans = await shoal(nats_server, "get", "datacleans", "-A", "-o", "wide")
    lines = cleans.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAMESPACE", "NAME", "DATASET"]
    cells = re.split(r"\s{3,}", lines[1])
    assert cells[:4] + cells[5:] == ["other", "cool", "imagenet", "Complete", "1s", "1.00GiB freed", "-", "0", "-",
                                      "-"]
    assert len(lines) == 2

    as_json = await shoal(nats_server, "get", "load", "warm", "-o", "json")
    warm = json.loads(as_json.stdout)
    assert (warm["kind"], warm["metadata"]["creationTimestamp"]) == ("DataLoad", "2026-01-01T00:00:00Z")
    assert warm["status"]["progress"]["filesDone"] == 812
    as_yaml = await shoal(nats_server, "get", "dataclean", "cool", "-n", "other", "-o", "yaml")
    cool = yaml.safe_load(as_yaml.stdout)
    assert (cool["kind"], cool["metadata"]["namespace"], cool["status"]["phase"]) == ("DataClean", "other",
                                                                                      "Complete")
    as_record = await shoal(nats_server, "get", "load", "warm", "-o", "record")
    assert msgspec.convert(json.loads(as_record.stdout), OperationRecord) == WARM

    missing = await shoal(nats_server, "get", "dataload", "cool")
    assert (missing.exit_code, missing.stderr) == (1, 'error: dataload.shoal.io "cool" not found in namespace '
                                                      '"default"\n')
    none = await shoal(nats_server, "get", "datacleans")
    assert (none.exit_code, none.stderr) == (0, "No resources found in default namespace.\n")


async def test_describe_dataload_shows_spec_status_nodes_and_conditions(nats_server: NatsServer, bus: Bus) -> None:
    await put_operations(bus)

    result = await shoal(nats_server, "describe", "dataload", "warm")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for expected in ("Name:         warm", "Kind:         DataLoad (dataload.shoal.io)", "Labels:       team=ml",
                     "Created:      2026-01-01T00:00:00Z", "  policy: Once", "  - path: /train",
                     "    replicas: 2", "  phase: Executing", "    filesDone: 812", "  runs: 1"):
        assert expected in lines, expected
    nodes = lines.index("Progress by node:")
    assert [line.split() for line in lines[nodes + 1:nodes + 4]] == [
        ["NODE", "DONE", "TOTAL", "PERCENT", "STATE"], ["node-a", "5.00GiB", "5.00GiB", "100.0%", "Done"],
        ["node-b", "3.00GiB", "5.00GiB", "60.0%", "Working"]]
    assert lines[-1].split() == ["Executing", "True", "Started", "2", "nodes", "2026-01-01T00:00:01Z"]
