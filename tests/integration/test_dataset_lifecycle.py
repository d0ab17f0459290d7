"""Dataset and runtime lifecycle on a real nats-server (JetStream) and a real SeaweedFS S3 server.

The services run in-process; agents do not exist yet, so tests publish heartbeats as an agent would.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing
from nats.js.errors import ObjectNotFoundError

from libs import subjects
from libs.bus import Bus, Delivery
from libs.config import Secret, Settings
from libs.events.agent import AgentHeartbeat
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeDelete, RuntimeSpec, TieredStore
from libs.ufs import s3
from services.dataset import app as dataset_app
from services.dataset.handlers import DatasetHandlers
from services.runtime import app as runtime_app
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.helpers import FactCollector, dataset_record, eventually, make_settings, running, runtime_record
from tests.metric_values import Snapshot, exists, value
from tests.secrets import credentials_from, secret_files


def services(settings: Settings):
    return running(lambda stop: dataset_app.run(settings, stop), lambda stop: runtime_app.run(settings, stop))


def s3_dataset(name: str, *mount_points: str) -> Dataset:
    mounts = [Mount(mount_point=m, name=f"m{i}") if len(mount_points) > 1 else Mount(mount_point=m)
              for i, m in enumerate(mount_points)]
    return Dataset(metadata=ObjectMeta(name=name), spec=DatasetSpec(mounts=mounts))


def mem_runtime(name: str, replicas: int = 1) -> Runtime:
    return Runtime(metadata=ObjectMeta(name=name),
                   spec=RuntimeSpec(replicas=replicas,
                                    tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))


async def synced(bus: Bus, name: str, generation: int = 1):
    async def probe():
        record = await dataset_record(bus, name)
        return record if record and record.status.synced_generation >= generation else None

    return await eventually(probe, what=f"{name} synced at generation {generation}")


async def test_apply_syncs_size_and_file_count(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                               bucket: str) -> None:
    objects = {f"train/img_{i:03d}.jpg": bytes([i]) * (1000 + i) for i in range(40)}
    objects["labels.csv"] = b"a,b\n" * 10
    await put_objects(seaweedfs, bucket, objects)
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        command = DatasetApply(dataset=s3_dataset("imagenet", f"s3://{bucket}/"))
        await bus.publish(subjects.DATASET_APPLY, command)
        accepted = await facts.wait_for("dataset.accepted.v1", causationId=command.id)
        assert accepted["generation"] == 1
        record = await synced(bus, "imagenet")
        assert record.status.file_num == 41
        assert record.status.ufs_total_bytes == sum(len(v) for v in objects.values())
        assert record.status.ufs_total.endswith("KiB")
        assert record.status.phase == "NotBound"
        # The status fact follows the record's write: the apply's own fact (fileNum 0) may be the newest for a moment.
        async def synced_fact() -> dict[str, Any] | None:
            found = [fact for fact in facts.of_type("dataset.status.v1", name="imagenet")
                     if fact["status"].get("fileNum") == 41]
            return found[-1] if found else None

        status = await eventually(synced_fact, what="the status fact of the synced dataset")
        assert status["status"]["ufsTotal"] == record.status.ufs_total
        # The manifest lists every file with its size and ETag, below the dataset root.
        manifest = await (await bus.manifests()).get(record.status.manifest)
        lines = [msgspec.json.decode(line) for line in (manifest.data or b"").splitlines()]
        assert sorted(e["path"] for e in lines) == sorted("/" + k for k in objects)
        assert all(e["etag"] and e["size"] > 0 for e in lines)



async def test_syncs_of_s3_datasets_on_one_endpoint_share_one_client(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client costs ~50 ms of CPU to make and a small listing ~3 ms with it: the dataset service keeps its
    # location's client between syncs rather than make one per sync.
    await put_objects(seaweedfs, bucket, {f"d{i}/file": b"x" * (i + 1) for i in range(4)})
    session = s3.shared_session()
    create_client = session.create_client
    made: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs.get("endpoint_url", ""))
        return create_client(*args, **kwargs)

    monkeypatch.setattr(session, "create_client", counting)
    async with services(settings):
        for i in range(4):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset(f"d{i}", f"s3://{bucket}/d{i}")))
        for i in range(4):
            assert (await synced(bus, f"d{i}")).status.ufs_total_bytes == i + 1
        # A resync lists again with the same client.
        await bus.publish(subjects.DATASET_APPLY,
                          DatasetApply(dataset=s3_dataset("d0", f"s3://{bucket}/d0", f"s3://{bucket}/d1")))
        assert (await synced(bus, "d0", 2)).status.ufs_total_bytes == 3
    assert made == [seaweedfs.endpoint]

async def test_adding_a_mount_resyncs(bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str) -> None:
    objects = {f"a/{i}": b"x" * 10 for i in range(5)} | {f"b/{i}": b"y" * 7 for i in range(3)}
    await put_objects(seaweedfs, bucket, objects)
    async with services(settings):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset("two", f"s3://{bucket}/a")))
        first = await synced(bus, "two", 1)
        assert (first.status.file_num, first.status.ufs_total_bytes) == (5, 50)
        await bus.publish(subjects.DATASET_APPLY,
                          DatasetApply(dataset=s3_dataset("two", f"s3://{bucket}/a", f"s3://{bucket}/b")))
        second = await synced(bus, "two", 2)
        assert second.generation == 2
        assert (second.status.file_num, second.status.ufs_total_bytes) == (8, 71)


async def test_a_label_change_is_kept_without_listing_the_store_again(bus: Bus, settings: Settings,
                                                                      seaweedfs: SeaweedServer, bucket: str) -> None:
    """``kubectl label`` of a Dataset reaches the service as an apply (the bridge's command carries labels and
    annotations): before, it was a new generation, and the whole store was listed again for it."""
    await put_objects(seaweedfs, bucket, {f"f{i}": b"x" * 10 for i in range(3)})
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        plain = s3_dataset("labelled", f"s3://{bucket}")
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=plain))
        first = await synced(bus, "labelled", 1)
        labelled = msgspec.structs.replace(plain, metadata=msgspec.structs.replace(
            plain.metadata, labels={"team": "ml"}, annotations={"argocd.argoproj.io/tracking-id": "app:x"}))
        command = DatasetApply(dataset=labelled)
        await bus.publish(subjects.DATASET_APPLY, command)
        accepted = await facts.wait_for("dataset.accepted.v1", causationId=command.id)
        assert (accepted["generation"], accepted["result"]) == (1, "configured")
        record = await dataset_record(bus, "labelled")
        assert record is not None and record.dataset.metadata.labels == {"team": "ml"}
        assert (record.generation, record.status.synced_generation, record.status.manifest) == (
            1, 1, first.status.manifest)


async def test_dataset_binds_when_runtime_ready_and_delete_cleans_up(bus: Bus, settings: Settings,
                                                                     seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    facts = FactCollector()
    await facts.start(bus)
    metrics = Snapshot()
    async with services(settings):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset("demo", f"s3://{bucket}")))
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=mem_runtime("demo", replicas=2)))
        await synced(bus, "demo")
        runtime = await eventually(lambda: runtime_record(bus, "demo"))
        assert runtime.status.phase == "NotReady"
        # The gauges follow the bucket: one dataset, NotBound, with what its sync found; the sync timed as ok.
        await gauges(bus, {"shoal_datasets": ({"phase": "NotBound"}, 1), "shoal_dataset_objects": (DEMO, 1),
                           "shoal_dataset_ufs_bytes": (DEMO, 4), "shoal_runtimes": ({"phase": "NotReady"}, 1)})
        assert value("shoal_datasets", phase="Bound") == value("shoal_datasets", phase="Failed") == 0
        assert metrics.moved("shoal_dataset_sync_duration_seconds_count", outcome="ok") == 1
        assert metrics.moved("shoal_dataset_sync_duration_seconds_count", outcome="failed") == 0

        async def beat(node: str) -> None:
            await bus.publish(subjects.agent_heartbeat(node),
                              AgentHeartbeat(node=node, runtimes=[ObjectRef(name="demo")], sent_at=time.time()))

        await beat("node-a")

        async def runtime_phase(phase: str):
            record = await runtime_record(bus, "demo")
            return record if record and record.status.phase == phase else None

        partial = await eventually(lambda: runtime_phase("PartialReady"))
        assert partial.status.ready_nodes == ["node-a"]
        assert (await dataset_record(bus, "demo")).status.phase == "NotBound"  # type: ignore[union-attr]
        await beat("node-b")
        ready = await eventually(lambda: runtime_phase("Ready"))
        assert ready.status.worker_number_ready == 2
        assert ready.status.cache_capacity_bytes == 2 * 2**30

        async def bound():
            record = await dataset_record(bus, "demo")
            return record if record and record.status.phase == "Bound" else None

        record = await eventually(bound)
        assert record.status.runtimes[0].name == "demo"
        assert record.status.cache_states.cache_capacity == "2.00GiB"
        await gauges(bus, {"shoal_datasets": ({"phase": "Bound"}, 1), "shoal_runtimes": ({"phase": "Ready"}, 1),
                           "shoal_runtime_workers": ({"runtime": "default/demo"}, 2)})
        assert value("shoal_datasets", phase="NotBound") == 0

        delete = DatasetDelete(name="demo")
        await bus.publish(subjects.DATASET_DELETE, delete)
        await facts.wait_for("dataset.deleted.v1", causationId=delete.id)
        assert await dataset_record(bus, "demo") is None
        with pytest.raises(ObjectNotFoundError):
            await (await bus.manifests()).get(record.status.manifest)
        # Deleted: counted nowhere, and its own series are gone.
        await gauges(bus, {"shoal_datasets": ({"phase": "Bound"}, 0)})
        assert not exists("shoal_dataset_objects", **DEMO) and not exists("shoal_dataset_ufs_bytes", **DEMO)


DEMO = {"dataset": "default/demo"}


async def test_log_lines_name_datasets_and_runtimes_namespace_slash_name(bus: Bus, settings: Settings,
                                                                        seaweedfs: SeaweedServer, bucket: str) -> None:
    """The same dataset was ``default.logged`` in some lines (the KV key: applied, synced, deleted) and
    ``default/logged`` in others (rejected, the agent's): a search for one missed the other. Every line names an
    object as kubectl does, ``namespace/name`` (``subjects.object_name``); the KV keys stay dotted."""
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    facts = FactCollector()
    await facts.start(bus)
    with structlog.testing.capture_logs() as logs:
        async with services(settings):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset("logged", f"s3://{bucket}")))
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=mem_runtime("logged")))
            await synced(bus, "logged")
            await eventually(lambda: runtime_record(bus, "logged"), what="the runtime applied")
            dataset_delete, runtime_delete = DatasetDelete(name="logged"), RuntimeDelete(name="logged")
            await bus.publish(subjects.DATASET_DELETE, dataset_delete)
            await facts.wait_for("dataset.deleted.v1", causationId=dataset_delete.id)
            await bus.publish(subjects.RUNTIME_DELETE, runtime_delete)
            await facts.wait_for("runtime.deleted.v1", causationId=runtime_delete.id)
    named = {(line["event"], line.get("dataset") or line.get("runtime")) for line in logs
             if "dataset" in line or "runtime" in line}
    assert {("applied", "default/logged"), ("synced", "default/logged"), ("deleted", "default/logged")} <= named, named
    assert {who for _, who in named} == {"default/logged"}, named



async def gauges(bus: Bus, expected: dict[str, tuple[dict[str, str], float]]) -> None:
    """Wait until each gauge has its value (the services set them as the KV changes, or every second)."""

    async def probe() -> dict[str, float] | None:
        now = {name: value(name, **labels) for name, (labels, _) in expected.items()}
        return None if any(now[name] != want for name, (_, want) in expected.items()) else now

    await eventually(probe, what=f"gauges at {expected}")


async def test_same_named_secrets_of_two_namespaces_are_each_their_own(bus: Bus, nats_server: NatsServer,
                                                                       seaweedfs: SeaweedServer, bucket: str,
                                                                       tmp_path: Path) -> None:
    """The folder of secrets was not keyed by namespace: a Dataset of any namespace naming Secret ``s3-creds`` read
    ``<dir>/s3-creds/<key>``, so team-b's Dataset listed the bucket with the credentials put there for the default
    namespace, and two namespaces could not each have an ``s3-creds``. Now a namespace's are in
    ``<dir>/<namespace>/<secret>/<key>`` (the default namespace's may stay where they were); team-b's wrong key is
    used, and fails, though the default namespace's right one lies in the folder too, and so does the bridge's copy of
    team-a's (``team-a.s3-creds``), which team-b cannot name either."""
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    right = {"id": seaweedfs.config.access_key_id, "secret": seaweedfs.config.secret_access_key}
    secrets_dir = secret_files(tmp_path / "secrets", {
        "s3-creds": right, "team-a/s3-creds": right, "team-a.s3-creds": right,  # default's, team-a's, the bridge's
        "team-b/s3-creds": {"id": seaweedfs.config.access_key_id, "secret": "not-the-key"}})
    # No default credentials: a mount gets into the bucket with its secret's or not at all.
    settings = make_settings(nats_server.url, seaweedfs.endpoint, secrets_dir=secrets_dir)

    def dataset(namespace: str, secret: str = "s3-creds") -> Dataset:
        mount = Mount(mount_point=f"s3://{bucket}/", encrypt_options=credentials_from(secret))
        return Dataset(metadata=ObjectMeta(name="data", namespace=namespace), spec=DatasetSpec(mounts=[mount]))

    async def listed(namespace: str) -> DatasetRecord | None:
        record = await dataset_record(bus, "data", namespace)
        return record if record is not None and record.status.synced_generation == 1 else None

    async with services(settings):
        for applied in (dataset("default"), dataset("team-a"), dataset("team-b"), dataset("team-c", "team-a.s3-creds")):
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=applied))
        default, team_a, team_b, team_c = [await eventually(partial(listed, namespace),
                                                            what=f"{namespace}'s dataset synced")
                                           for namespace in ("default", "team-a", "team-b", "team-c")]
    assert (default.status.phase, default.status.file_num) == ("NotBound", 1), default.status
    assert (team_a.status.phase, team_a.status.file_num) == ("NotBound", 1), team_a.status
    assert team_b.status.phase == "Failed" and "not-the-key" not in team_b.status.message, team_b.status
    assert team_c.status.phase == "Failed", team_c.status
    # Where team-c's would be is said; nothing of team-a's copy, which team-c cannot name.
    assert team_c.status.message == (f"mount s3://{bucket}/: secret 'team-a.s3-creds' has no key 'id' (needed for "
                                     f"aws.accessKeyId); looked for {secrets_dir}/team-c/team-a.s3-creds/id: write "
                                     f"the key to {secrets_dir}/team-c/team-a.s3-creds/id "
                                     "(SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)"), team_c.status.message


async def test_republished_command_is_deduplicated(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                   bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"f": b"data"})
    command = DatasetApply(dataset=s3_dataset("dedup", f"s3://{bucket}"))
    first = await bus.publish(subjects.DATASET_APPLY, command)
    again = await bus.publish(subjects.DATASET_APPLY, command)
    assert first == again  # JetStream answered the retry with the original sequence
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        record = await synced(bus, "dedup")
        assert record.generation == 1
        # The same spec under a new id (beyond the dedup window) is accepted without a new generation.
        repeat = DatasetApply(dataset=command.dataset)
        await bus.publish(subjects.DATASET_APPLY, repeat)
        accepted = await facts.wait_for("dataset.accepted.v1", causationId=repeat.id)
        assert accepted["generation"] == 1
    info = await bus.js.stream_info(subjects.STREAM_COMMANDS)
    assert info.state.messages == 2


async def test_missing_bucket_and_bad_credentials_fail_with_message(bus: Bus, settings: Settings,
                                                                    seaweedfs: SeaweedServer) -> None:
    async with services(settings):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset("nobucket", "s3://no-such-bucket-x")))
        record = await synced(bus, "nobucket")
        assert record.status.phase == "Failed"
        assert "no-such-bucket-x" in record.status.message
        assert "does not exist" in record.status.message

    wrong = dataclasses.replace(
        settings, s3=dataclasses.replace(settings.s3, secret_access_key=Secret("wrong-secret-value"))
    )
    async with running(lambda stop: dataset_app.run(wrong, stop)):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=s3_dataset("badcreds", "s3://whatever")))
        record = await synced(bus, "badcreds")
        assert record.status.phase == "Failed"
        assert "access denied" in record.status.message.lower()
        assert "wrong-secret-value" not in record.status.message


async def test_invalid_dataset_is_rejected_with_reasons(bus: Bus, settings: Settings) -> None:
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        bad = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name="Bad_Name"),
                                           spec=DatasetSpec(mounts=[Mount(mount_point="ftp://x/y")])))
        await bus.publish(subjects.DATASET_APPLY, bad)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=bad.id)
        assert "DNS-1035" in rejected["reason"]
        assert "ftp" in rejected["reason"] and "s3://" in rejected["reason"]
        assert await dataset_record(bus, "Bad_Name") is None
        bad_runtime = RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name="rt"),
            spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="NVME", quota="0", high="0.5",
                                                                   low="0.9")]))))
        await bus.publish(subjects.RUNTIME_APPLY, bad_runtime)
        rejected = await facts.wait_for("runtime.rejected.v1", causationId=bad_runtime.id)
        assert "NVME" in rejected["reason"] and "quota" in rejected["reason"] and "low < high" in rejected["reason"]


async def test_a_runtimes_block_size_cannot_change_and_the_refusal_says_why(bus: Bus, settings: Settings) -> None:
    # Nodes cache blocks by index at the runtime's blockSize: another size would give old bytes under the same names.
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        first = RuntimeApply(runtime=mem_runtime("rt"))
        await bus.publish(subjects.RUNTIME_APPLY, first)
        await facts.wait_for("runtime.accepted.v1", causationId=first.id)
        same_bytes = RuntimeApply(runtime=msgspec.structs.replace(
            first.runtime, spec=msgspec.structs.replace(first.runtime.spec, block_size="4194304", replicas=2)))
        await bus.publish(subjects.RUNTIME_APPLY, same_bytes)  # 4Mi written out: the same size
        await facts.wait_for("runtime.accepted.v1", causationId=same_bytes.id)
        bigger = RuntimeApply(runtime=msgspec.structs.replace(
            first.runtime, spec=msgspec.structs.replace(first.runtime.spec, block_size="8Mi")))
        await bus.publish(subjects.RUNTIME_APPLY, bigger)
        rejected = await facts.wait_for("runtime.rejected.v1", causationId=bigger.id)
        assert "blockSize cannot change" in rejected["reason"] and "delete the runtime" in rejected["reason"]
        record = await runtime_record(bus, "rt")
        assert record is not None and record.generation == 2 and record.runtime.spec.block_size == "4194304"


async def test_unknown_delete_is_rejected(bus: Bus, settings: Settings) -> None:
    facts = FactCollector()
    await facts.start(bus)
    async with services(settings):
        command = DatasetDelete(name="ghost")
        await bus.publish(subjects.DATASET_DELETE, command)
        rejected = await facts.wait_for("dataset.rejected.v1", causationId=command.id)
        assert "does not exist" in rejected["reason"]


async def test_an_apply_delivered_again_after_a_later_delete_does_not_bring_the_dataset_back(
        bus: Bus, settings: Settings, bucket: str) -> None:
    # An apply whose first handling failed is delivered again, by then behind the delete that followed it (or one
    # replica of the service handled the delete first). The delete's marker holds the delete's stream sequence.
    facts = FactCollector()
    await facts.start(bus)
    handlers = DatasetHandlers(bus, settings)

    def delivered(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
        return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)

    apply = DatasetApply(dataset=s3_dataset("phoenix", f"s3://{bucket}/"))
    await handlers.apply(apply, delivered(subjects.DATASET_APPLY, 5))
    assert (await dataset_record(bus, "phoenix")) is not None
    await handlers.delete(DatasetDelete(name="phoenix"), delivered(subjects.DATASET_DELETE, 7))
    await handlers.apply(apply, delivered(subjects.DATASET_APPLY, 5, deliveries=2))
    rejected = await facts.wait_for("dataset.rejected.v1", causationId=apply.id)
    assert "deleted by a later command (stream sequence 7)" in rejected["reason"], rejected
    assert await dataset_record(bus, "phoenix") is None
    # A newer apply recreates it.
    again = DatasetApply(dataset=s3_dataset("phoenix", f"s3://{bucket}/"))
    await handlers.apply(again, delivered(subjects.DATASET_APPLY, 9))
    record = await dataset_record(bus, "phoenix")
    assert record is not None and record.generation == 1 and record.command_sequence == 9


async def test_runtime_becomes_not_ready_when_agent_goes_silent(bus: Bus, settings: Settings) -> None:
    clock = [time.time()]
    async with running(lambda stop: runtime_app.run(settings, stop, clock=lambda: clock[0])):
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=mem_runtime("rt")))
        await bus.publish(subjects.agent_heartbeat("n1"),
                          AgentHeartbeat(node="n1", runtimes=[ObjectRef(name="rt")], interval_seconds=1.0))

        async def phase_is(phase: str):
            record = await runtime_record(bus, "rt")
            return record if record and record.status.phase == phase else None

        await eventually(lambda: phase_is("Ready"))
        clock[0] += 10  # three missed beats later, by the service's clock
        await eventually(lambda: phase_is("NotReady"))
