"""The ``shoal`` CLI against a real nats-server: get/describe over KV records, apply/delete against the real
dataset and runtime services, events, unreachable NATS, and the schema export.

CliRunner is synchronous and each command runs its own event loop, so commands run in a worker thread
(``asyncio.to_thread``) while the test's loop serves the services and the KV writes.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing
import yaml
from click.testing import CliRunner, Result
from nats.aio.msg import Msg

from libs import subjects
from libs.bus import Bus, connect, kv_load
from libs.cli import main as cli_main
from libs.cli import render
from libs.cli.main import cli
from libs.config import NatsSettings, ServiceSettings, Settings
from libs.crds import shoal_status
from libs.documents import without_nulls
from libs.events import PUBLIC_EVENTS, type_tag
from libs.events.common import ObjectMeta
from libs.events.dataset import (
    CacheStates,
    Condition,
    Dataset,
    DatasetAccepted,
    DatasetApply,
    DatasetDelete,
    DatasetRecord,
    DatasetRejected,
    DatasetSpec,
    DatasetStatus,
    Mount,
)
from libs.events.runtime import (
    CacheWorker,
    Level,
    NotPicked,
    Runtime,
    RuntimeApply,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    TieredStore,
)
from libs.events.schema import INDEX_FILE, schema_files
from libs.kube import SHOAL_RESOURCES
from libs.members import event_limits
from services.dataset import app as dataset_app
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, running
from tests.unit.test_documents import QUOTA_LIST

REPO = Path(__file__).resolve().parents[2]


async def shoal(server: NatsServer, *args: str, stdin: str | None = None, wait_seconds: float = 10.0) -> Result:
    """Run ``shoal --nats URL --timeout wait_seconds ARGS`` in a worker thread (it runs its own event loop)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, cli, ["--nats", server.url, "--timeout", str(wait_seconds), *args], input=stdin
    )


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    bus = await connect(NatsSettings(urls=[nats_server.url]), "test-cli")
    await bus.provision()
    try:
        yield bus
    finally:
        await bus.close()


IMAGENET = DatasetRecord(
    dataset=Dataset(
        metadata=ObjectMeta(name="imagenet", labels={"team": "ml"}),
        spec=DatasetSpec(mounts=[Mount(mount_point="s3://imagenet/train/", name="train",
                                       options={"endpoint": "http://minio:9000"})]),
    ),
    generation=2,
    status=DatasetStatus(
        phase="Bound", message="metadata synced", ufs_total="13.33GiB", ufs_total_bytes=14_312_668_938,
        file_num=1200,
        cache_states=CacheStates(cache_capacity="2.00GiB", cached="1.00GiB", cached_percentage="7.5%",
                                 cache_hit_ratio="80.0%", local_hit_ratio="30.0%", remote_hit_ratio="50.0%"),
        conditions=[Condition(type="MetadataSynced", status="True", reason="Synced", message="1200 files",
                              last_transition_time="2026-01-01T00:00:00Z")],
    ),
)
MNIST = DatasetRecord(
    dataset=Dataset(metadata=ObjectMeta(name="mnist", namespace="other"),
                    spec=DatasetSpec(mounts=[Mount(mount_point="local:///data/mnist")])),
    generation=1,
)
IMAGENET_RUNTIME = RuntimeRecord(
    runtime=Runtime(metadata=ObjectMeta(name="imagenet"),
                    spec=RuntimeSpec(replicas=3, tieredstore=TieredStore(levels=[Level(mediumtype="MEM",
                                                                                       quota="2Gi")]))),
    generation=1,
    status=RuntimeStatus(phase="PartialReady", message="2 of 3 nodes ready", desired_worker_number_scheduled=3,
                         worker_number_ready=2, ready_nodes=["node-a", "node-b"], cache_capacity="6.00GiB",
                         cache_capacity_bytes=6 * 2**30, block_size_bytes=4 * 2**20,
                         current_worker_number_scheduled=3,
                         workers=[CacheWorker(node="node-b", peer_url="http://127.0.0.1:41000"),
                                  CacheWorker(node="node-a", peer_url="http://127.0.0.1:41001"),
                                  CacheWorker(node="node-c", ready=False)],
                         not_picked=[NotPicked(node="node-d", reason="does not match nodeAffinity: zone In [a]")]),
)


async def put_records(bus: Bus) -> None:
    datasets = await bus.kv(subjects.KV_DATASETS)
    for record in (IMAGENET, MNIST):
        meta = record.dataset.metadata
        await datasets.put(subjects.resource_key(meta.namespace, meta.name), msgspec.json.encode(record))
    runtimes = await bus.kv(subjects.KV_RUNTIMES)
    await runtimes.put(subjects.resource_key("default", "imagenet"), msgspec.json.encode(IMAGENET_RUNTIME))


# --- get and describe ---


async def test_get_datasets_prints_fluid_like_columns(nats_server: NatsServer, bus: Bus) -> None:
    await put_records(bus)

    result = await shoal(nats_server, "get", "datasets")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "NAME       UFS TOTAL SIZE   CACHED    CACHE CAPACITY   CACHED PERCENTAGE   PHASE\n"
        "imagenet   13.33GiB         1.00GiB   2.00GiB          7.5%                Bound\n"
    )

    wide = await shoal(nats_server, "get", "ds", "-A", "-o", "wide")
    assert wide.exit_code == 0, wide.output
    lines = wide.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "UFS", "TOTAL", "SIZE", "CACHED", "CACHE", "CAPACITY",
                                "CACHED", "PERCENTAGE", "PHASE", "FILE", "NUM", "CACHE", "HIT", "RATIO", "LOCAL",
                                "HIT", "RATIO", "REMOTE", "HIT", "RATIO", "MESSAGE"]
    assert lines[1].split() == ["default", "imagenet", "13.33GiB", "1.00GiB", "2.00GiB", "7.5%", "Bound", "1200",
                                "80.0%", "30.0%", "50.0%", "metadata", "synced"]
    assert lines[2].split() == ["other", "mnist", "NotBound", "0"]


async def test_get_o_record_prints_full_records(nats_server: NatsServer, bus: Bus) -> None:
    await put_records(bus)

    listed = await shoal(nats_server, "get", "dataset", "-A", "-o", "record")
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.stdout)["items"]
    assert [msgspec.convert(item, DatasetRecord) for item in items] == [IMAGENET, MNIST]
    # Defaults are shown too, so a reader sees every field.
    assert items[1]["dataset"]["spec"]["placement"] == "Exclusive"

    single = await shoal(nats_server, "get", "runtime", "imagenet", "-o", "record")
    assert single.exit_code == 0, single.output
    assert msgspec.convert(json.loads(single.stdout), RuntimeRecord) == IMAGENET_RUNTIME


async def test_get_json_and_yaml_print_kubernetes_objects(nats_server: NatsServer, bus: Bus) -> None:
    """Each record as the shoal.io object it stands for: the user's metadata with the generation, the spec, and the
    status shoal-bridge writes to the custom resource (``libs.crds.shoal_status``, one source for both)."""
    await put_records(bus)

    listed = await shoal(nats_server, "get", "dataset", "-A", "-o", "json")
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    assert (document["apiVersion"], document["kind"]) == ("v1", "List")
    imagenet, mnist = document["items"]
    assert imagenet == {
        "apiVersion": "shoal.io/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "imagenet", "namespace": "default", "generation": 2, "labels": {"team": "ml"}},
        "spec": {"mounts": [{"mountPoint": "s3://imagenet/train/", "name": "train",
                             "options": {"endpoint": "http://minio:9000"}}],
                 "accessModes": ["ReadOnlyMany"], "placement": "Exclusive"},
        "status": without_nulls(shoal_status(SHOAL_RESOURCES[0], IMAGENET.status)),
    }
    assert mnist["metadata"] == {"name": "mnist", "namespace": "other", "generation": 1}

    single = await shoal(nats_server, "get", "runtime", "imagenet", "-o", "yaml")
    assert single.exit_code == 0, single.output
    runtime = yaml.safe_load(single.stdout)
    assert (runtime["apiVersion"], runtime["kind"], runtime["metadata"]["name"]) == ("shoal.io/v1alpha1", "Runtime",
                                                                                     "imagenet")
    assert runtime["spec"]["tieredstore"] == {"levels": [{"mediumtype": "MEM", "quota": "2Gi", "high": "0.95",
                                                          "low": "0.7"}]}
    assert runtime["status"]["workerNumberReady"] == 2 and runtime["status"]["phase"] == "PartialReady"


async def test_get_o_name_prints_kind_group_and_name_as_kubectl_does(nats_server: NatsServer, bus: Bus) -> None:
    """What scripts pipe on (``shoal get dl -o name | xargs ...``): it was a usage error, exit code 2."""
    await put_records(bus)

    every = await shoal(nats_server, "get", "datasets", "-A", "-o", "name")
    assert (every.exit_code, every.stdout, every.stderr) == (
        0, "dataset.shoal.io/imagenet\ndataset.shoal.io/mnist\n", "")
    one = await shoal(nats_server, "get", "rt", "imagenet", "-o", "name")
    assert (one.exit_code, one.stdout) == (0, "runtime.shoal.io/imagenet\n")
    none = await shoal(nats_server, "get", "dataloads", "-o", "name")
    assert (none.exit_code, none.stdout, none.stderr) == (0, "", "No resources found in default namespace.\n")


async def test_get_runtimes_table(nats_server: NatsServer, bus: Bus) -> None:
    await put_records(bus)

    result = await shoal(nats_server, "get", "runtimes")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "NAME       READY   CACHE CAPACITY   BLOCK SIZE   PHASE\n"
        "imagenet   2/3     6.00GiB          4.00MiB      PartialReady\n"
    )
    # No NAMESPACE column without -A, wide or not, as kubectl.
    wide = await shoal(nats_server, "get", "runtime", "-o", "wide")
    header, row = wide.stdout.splitlines()
    assert header.split() == ["NAME", "READY", "CACHE", "CAPACITY", "BLOCK", "SIZE", "PHASE", "NODES", "WORKERS",
                              "MESSAGE"]
    assert row.split() == ["imagenet", "2/3", "6.00GiB", "4.00MiB", "PartialReady", "node-a,node-b",
                           "node-b,node-a,node-c(not", "ready)", "2", "of", "3", "nodes", "ready"]


async def test_get_and_describe_take_each_kinds_short_names(nats_server: NatsServer, bus: Bus) -> None:
    """`shoal get rt` was a usage error: only `runtime` and `runtimes` named the kind."""
    await put_records(bus)

    for names in (("runtimes", "rt"), ("datasets", "ds", "dataset"), ("dataloads", "dl", "load"),
                  ("datacleans", "dc", "clean")):
        full = await shoal(nats_server, "get", names[0])
        for short in names[1:]:
            result = await shoal(nats_server, "get", short)
            assert (result.exit_code, result.stdout, result.stderr) == (full.exit_code, full.stdout, full.stderr), short
    described = await shoal(nats_server, "describe", "rt", "imagenet")
    assert described.exit_code == 0 and described.stdout == (await shoal(nats_server, "describe", "runtime",
                                                                        "imagenet")).stdout


async def test_a_runtime_on_thousands_of_nodes_names_a_few_in_tables_and_describe(nats_server: NatsServer,
                                                                                  bus: Bus) -> None:
    # The record keeps every ready node (the loader plans on them); a human output names three and counts the rest.
    nodes = [f"node-{index:05d}" for index in range(5000)]
    big = msgspec.structs.replace(IMAGENET_RUNTIME, status=msgspec.structs.replace(
        IMAGENET_RUNTIME.status, ready_nodes=nodes, ready_node_count=len(nodes), worker_number_ready=3,
        desired_worker_number_scheduled=3, workers=[CacheWorker(node=node) for node in nodes[:3]],
        not_picked=[NotPicked(node="node-00003", reason="3 of 3 replicas already picked")],
        not_picked_count=4997))
    runtimes = await bus.kv(subjects.KV_RUNTIMES)
    await runtimes.put(subjects.resource_key("default", "imagenet"), msgspec.json.encode(big))

    wide = await shoal(nats_server, "get", "runtimes", "-o", "wide")
    assert wide.exit_code == 0, wide.output
    row = wide.stdout.splitlines()[1]
    assert row.split()[5:9] == ["node-00000,node-00001,node-00002", "and", "4997", "more"]
    assert len(row) < 300

    described = await shoal(nats_server, "describe", "runtime", "imagenet")
    assert described.exit_code == 0, described.output
    lines = described.stdout.splitlines()
    assert "  readyNodes: node-00000,node-00001,node-00002 and 4997 more" in lines
    assert "  readyNodeCount: 5000" in lines
    assert not any("node-00004" in line for line in lines)
    assert len(described.stdout) < 3000

    # Machine-readable output stays complete.
    listed = await shoal(nats_server, "get", "runtime", "imagenet", "-o", "json")
    assert json.loads(listed.stdout)["status"]["readyNodes"] == nodes
    as_yaml = await shoal(nats_server, "get", "runtime", "imagenet", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout)["status"]["readyNodes"] == nodes
    as_record = await shoal(nats_server, "get", "runtime", "imagenet", "-o", "record")
    assert msgspec.convert(json.loads(as_record.stdout), RuntimeRecord) == big


def test_ready_nodes_text_counts_what_it_does_not_name() -> None:
    assert render.ready_nodes_text(RuntimeStatus()) == ""
    assert render.ready_nodes_text(RuntimeStatus(ready_nodes=["a", "b"], ready_node_count=2)) == "a,b"
    # A record written before readyNodeCount existed has the list alone.
    assert render.ready_nodes_text(RuntimeStatus(ready_nodes=["a", "b", "c", "d", "e"])) == "a,b,c and 2 more"
    # A fact keeps the first hundred names of many more.
    assert render.ready_nodes_text(RuntimeStatus(ready_nodes=["a", "b", "c", "d"], ready_node_count=4000)) == (
        "a,b,c and 3997 more")


async def test_get_nothing_and_not_found(nats_server: NatsServer, bus: Bus) -> None:
    await put_records(bus)

    empty = await shoal(nats_server, "get", "datasets", "-n", "nobody")
    assert (empty.exit_code, empty.stdout, empty.stderr) == (0, "", "No resources found in nobody namespace.\n")

    empty_json = await shoal(nats_server, "get", "runtimes", "-n", "nobody", "-o", "json")
    assert (empty_json.exit_code, json.loads(empty_json.stdout), empty_json.stderr) == (
        0, {"apiVersion": "v1", "kind": "List", "items": []}, "")
    empty_record = await shoal(nats_server, "get", "runtimes", "-n", "nobody", "-o", "record")
    assert (empty_record.exit_code, json.loads(empty_record.stdout)) == (0, {"items": []})

    missing = await shoal(nats_server, "get", "dataset", "ghost")
    assert missing.exit_code == 1
    assert missing.stderr == 'error: dataset.shoal.io "ghost" not found in namespace "default"\n'


async def test_a_name_that_cannot_be_a_key_is_not_found_without_a_traceback(nats_server: NatsServer, bus: Bus) -> None:
    # A space or a wildcard cannot be part of a KV key: no object has such a name.
    await put_records(bus)

    for args, shown in [(("get", "dataset", "image net"), '"image net" not found in namespace "default"'),
                        (("get", "ds", "imagenet*"), '"imagenet*" not found in namespace "default"'),
                        (("describe", "runtime", "x y"), '"x y" not found in namespace "default"'),
                        (("scale", "runtime", "image net", "--replicas", "2"),
                         '"image net" not found in namespace "default"')]:
        result = await shoal(nats_server, *args)
        kind = "dataload" if "dataload" in args else "runtime" if "runtime" in args else "dataset"
        assert (result.exit_code, result.stderr) == (1, f"error: {kind}.shoal.io {shown}\n"), args
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


async def test_a_record_that_cannot_be_read_is_one_error_line_and_the_others_are_listed(nats_server: NatsServer,
                                                                                        bus: Bus) -> None:
    """A record no Shoal wrote (a hand-made ``nats kv put``, a newer version's) was a msgspec traceback for every
    ``get`` and ``describe`` of its kind: nothing else was listed."""
    await put_records(bus)
    datasets = await bus.kv(subjects.KV_DATASETS)
    await datasets.put(subjects.resource_key("default", "junk"), b'{"dataset": 5}')
    await datasets.put(subjects.resource_key("other", "junk"), b"not json")
    operations = await bus.kv(subjects.KV_OPERATIONS)
    await operations.put(subjects.operation_key("dataclean", "default", "bad"), b"{}")
    unreadable = ('error: cannot read dataset.shoal.io "junk" in namespace "default" (key default.junk of KV '
                  "shoal_datasets): Expected `object`, got `int` - at `$.dataset`\n")

    listed = await shoal(nats_server, "get", "datasets")
    assert (listed.exit_code, listed.stderr) == (1, unreadable), listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "imagenet"]
    assert listed.exception is None or isinstance(listed.exception, SystemExit), listed.exception

    as_json = await shoal(nats_server, "get", "datasets", "-o", "json")
    assert (as_json.exit_code, as_json.stderr) == (1, unreadable)
    assert [item["metadata"]["name"] for item in json.loads(as_json.stdout)["items"]] == ["imagenet"]

    named = await shoal(nats_server, "get", "dataset", "junk")
    assert (named.exit_code, named.stdout, named.stderr) == (1, "", unreadable)
    described = await shoal(nats_server, "describe", "dataset")
    assert (described.exit_code, described.stderr) == (1, unreadable)
    assert described.stdout.startswith("Name:         imagenet\n")

    everywhere = await shoal(nats_server, "get", "datasets", "-A")
    assert everywhere.exit_code == 1
    assert [line.split()[:2] for line in everywhere.stdout.splitlines()[1:]] == [["default", "imagenet"],
                                                                                 ["other", "mnist"]]
    assert len(everywhere.stderr.splitlines()) == 2
    assert everywhere.stderr.splitlines()[1].startswith('error: cannot read dataset.shoal.io "junk" in namespace '
                                                       '"other" (key other.junk of KV shoal_datasets): ')

    # Another namespace's or kind's unreadable record is not this listing's.
    other = await shoal(nats_server, "get", "datasets", "-n", "other")
    assert other.exit_code == 1 and other.stderr.startswith('error: cannot read dataset.shoal.io "junk" in namespace '
                                                            '"other"')
    loads = await shoal(nats_server, "get", "dataloads")
    assert (loads.exit_code, loads.stderr) == (0, "No resources found in default namespace.\n")
    cleans = await shoal(nats_server, "get", "datacleans")
    assert cleans.exit_code == 1
    assert cleans.stderr.startswith('error: cannot read dataclean.shoal.io "bad" in namespace "default" (key '
                                    "dataclean.default.bad of KV shoal_operations): Object missing required field")

    # Commands that act on one object read it too: the same line, exit 1, and nothing sent.
    runtimes = await bus.kv(subjects.KV_RUNTIMES)
    await runtimes.put(subjects.resource_key("default", "junk"), b"[]")
    scaled = await shoal(nats_server, "scale", "runtime", "junk", "--replicas", "2")
    assert scaled.exit_code == 1 and (scaled.exception is None or isinstance(scaled.exception, SystemExit))
    assert scaled.stderr.startswith('error: cannot read runtime.shoal.io "junk" in namespace "default" (key '
                                    "default.junk of KV shoal_runtimes): Expected `object`, got `array`"), scaled.output
    loaded = await shoal(nats_server, "load", "dataset", "junk")
    assert loaded.exit_code == 1 and loaded.stderr == unreadable, loaded.output


async def test_describe_shows_spec_status_and_conditions(nats_server: NatsServer, bus: Bus) -> None:
    await put_records(bus)

    result = await shoal(nats_server, "describe", "dataset", "imagenet")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("Name:         imagenet", "Namespace:    default", "Labels:       team=ml",
                     "Generation:   2", "Spec:", "  - mountPoint: s3://imagenet/train/", "      endpoint: http://minio:9000",
                     "  placement: Exclusive", "Status:", "  phase: Bound", "  ufsTotal: 13.33GiB",
                     "    cachedPercentage: 7.5%", "  fileNum: 1200", "Conditions:"):
        assert expected in text.splitlines(), expected
    condition = text.splitlines()[-1].split()
    assert condition == ["MetadataSynced", "True", "Synced", "1200", "files", "2026-01-01T00:00:00Z"]

    runtime = await shoal(nats_server, "describe", "runtime", "imagenet")
    assert runtime.exit_code == 0, runtime.output
    assert "    - mediumtype: MEM" in runtime.stdout.splitlines()
    lines = runtime.stdout.splitlines()
    assert "  readyNodes: node-a,node-b" in lines
    # Workers in pick order with readiness and peer endpoint, then the agents not picked and why.
    workers = lines.index("Workers:")
    assert [line.split() for line in lines[workers + 1:workers + 5]] == [
        ["NODE", "READY", "PEER"], ["node-b", "True", "http://127.0.0.1:41000"],
        ["node-a", "True", "http://127.0.0.1:41001"], ["node-c", "False", "<none>"]]
    assert lines[workers + 5:workers + 8] == ["Not picked:", "  NODE     REASON",
                                              "  node-d   does not match nodeAffinity: zone In [a]"]
    assert "  workers:" not in lines and "  notPicked:" not in lines
    assert runtime.stdout.rstrip().endswith("Conditions:\n  <none>")


async def test_describe_takes_all_namespaces_as_get_does(nats_server: NatsServer, bus: Bus) -> None:
    """`kubectl describe datasets -A` describes every namespace's; `shoal describe` said "No such option: -A"."""
    await put_records(bus)

    every = await shoal(nats_server, "describe", "datasets", "-A")
    assert every.exit_code == 0, every.output
    names = [line.split()[1] for line in every.stdout.splitlines() if line.startswith(("Name:", "Namespace:"))]
    assert names == ["imagenet", "default", "mnist", "other"]
    long = await shoal(nats_server, "describe", "ds", "--all-namespaces", "-n", "other")
    assert long.stdout == every.stdout
    none = await shoal(nats_server, "describe", "dataloads", "-A")
    assert (none.exit_code, none.stdout, none.stderr) == (0, "", "No resources found.\n")
    named = await shoal(nats_server, "describe", "dataset", "mnist", "-A")
    assert named.exit_code == 2
    assert "a resource cannot be retrieved by name across all namespaces" in named.stderr


# --- apply and delete against the real services ---


@pytest.fixture
async def services(nats_server: NatsServer, bus: Bus) -> AsyncIterator[None]:
    from services.dataset import app as dataset_app
    from services.runtime import app as runtime_app

    # The apply test mounts a tmp folder through local://.
    settings = Settings(nats=NatsSettings(urls=[nats_server.url]), service=ServiceSettings(local_roots=["/"]))
    stop = asyncio.Event()
    # The services' log lines would otherwise print into the CLI's captured stdout.
    with structlog.testing.capture_logs():
        tasks = [asyncio.create_task(dataset_app.run(settings, stop)),
                 asyncio.create_task(runtime_app.run(settings, stop))]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def test_apply_get_and_delete_through_the_services(nats_server: NatsServer, services: None,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 10)
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: demo}}
spec:
  mounts: [{{mountPoint: "local://{data}"}}]
---
apiVersion: data.fluid.io/v1alpha1
kind: AlluxioRuntime
metadata: {{name: demo}}
spec:
  replicas: 1
  master: {{replicas: 1}}
  properties: {{alluxio.user.block.size.bytes.default: 4MB}}
  tieredstore:
    levels: [{{mediumtype: MEM, path: /dev/shm, quota: 1Gi, high: "0.95", low: "0.7"}}]
""")

    applied = await shoal(nats_server, "apply", "-f", str(manifest))
    assert applied.exit_code == 0, applied.output
    assert applied.stdout == "dataset.shoal.io/demo created\nruntime.shoal.io/demo created\n"
    assert "ignored: AlluxioRuntime default/demo: spec.master (not used by Shoal)" in applied.stderr.splitlines()

    listed = await shoal(nats_server, "get", "runtime", "demo", "-o", "json")
    assert json.loads(listed.stdout)["spec"]["blockSize"] == "4Mi"
    datasets = await shoal(nats_server, "get", "datasets")
    assert datasets.stdout.splitlines()[1].split()[0] == "demo"

    deleted = await shoal(nats_server, "delete", "-f", str(manifest))
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout == "dataset.shoal.io/demo deleted\nruntime.shoal.io/demo deleted\n"
    assert deleted.stderr == ""  # ignored-field notes are for apply only

    again = await shoal(nats_server, "delete", "dataset", "demo")
    assert again.exit_code == 1
    assert again.stderr == "error: demo rejected: dataset default/demo does not exist\n"


async def test_delete_all_deletes_every_object_of_a_kind_in_the_namespace_or_every_namespace(
        nats_server: NatsServer, services: None, tmp_path: Path) -> None:
    """kubectl deletes every object of a kind with ``delete KIND --all [-n NS]`` and across namespaces with
    ``--all -A``; ``shoal delete`` had neither. One line per deleted object, the other kinds and namespaces left."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = "---\n".join(f"""
apiVersion: shoal.io/v1alpha1
kind: {kind}
metadata: {{name: {name}, namespace: {namespace}}}
spec: {spec}
""" for kind, name, namespace, spec in (
        ("Dataset", "b", "default", f'{{mounts: [{{mountPoint: "local://{data}"}}]}}'),
        ("Dataset", "a", "default", f'{{mounts: [{{mountPoint: "local://{data}"}}]}}'),
        ("Dataset", "a", "team", f'{{mounts: [{{mountPoint: "local://{data}"}}]}}'),
        ("Runtime", "a", "default", "{replicas: 1, tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}")))
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert applied.exit_code == 0, applied.output

    deleted = await shoal(nats_server, "delete", "datasets", "--all")
    assert (deleted.exit_code, deleted.stdout, deleted.stderr) == (
        0, "dataset.shoal.io/a deleted\ndataset.shoal.io/b deleted\n", ""), deleted.output
    left = await shoal(nats_server, "get", "datasets", "-A", "-o", "name")
    assert left.stdout == "dataset.shoal.io/a\n"  # team's
    assert (await shoal(nats_server, "get", "runtime", "a")).exit_code == 0  # another kind stays

    nothing = await shoal(nats_server, "delete", "ds", "--all")
    assert (nothing.exit_code, nothing.stdout, nothing.stderr) == (0, "", "No resources found in default namespace.\n")

    everywhere = await shoal(nats_server, "delete", "ds", "--all", "-A")
    assert (everywhere.exit_code, everywhere.stdout) == (0, "dataset.shoal.io/a deleted from team namespace\n"), \
        everywhere.output
    assert (await shoal(nats_server, "get", "ds", "-A")).stderr == "No resources found.\n"


async def test_delete_all_passes_over_an_object_deleted_after_the_listing_and_a_names_each_namespace(
        nats_server: NatsServer, services: None, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object deleted by someone else between ``--all``'s listing and its delete was reported "does not exist",
    exit code 1; kubectl's ``--all`` ignores not-found. With ``-A`` each line names its namespace, as kubectl's
    delete does ("deleted from team namespace"): two namespaces' "a" were two identical lines."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = "---\n".join(f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{mounts: [{{mountPoint: "local://{data}"}}]}}
""" for name, namespace in (("a", "default"), ("b", "default"), ("a", "team")))
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert applied.exit_code == 0, applied.output
    loop = asyncio.get_running_loop()

    async def delete_default_a() -> None:  # someone else's delete, handled by the dataset service
        await bus.publish(subjects.DATASET_DELETE, DatasetDelete(name="a"))

        async def gone() -> bool:
            return await dataset_record(bus, "a") is None

        await eventually(gone, 10, "default/a deleted")

    listed_keys = cli_main.kv_keys

    async def listed_then_one_deleted(kv: Any) -> list[str]:
        keys = await listed_keys(kv)
        # The CLI runs its own loop in a worker thread: the delete runs on the test's, and the listing waits for it.
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(delete_default_a(), loop))
        return keys

    monkeypatch.setattr(cli_main, "kv_keys", listed_then_one_deleted)
    deleted = await shoal(nats_server, "delete", "datasets", "--all", "-A")
    assert (deleted.exit_code, deleted.stdout, deleted.stderr) == (
        0, "dataset.shoal.io/b deleted from default namespace\ndataset.shoal.io/a deleted from team namespace\n",
        ""), deleted.output
    assert (await shoal(nats_server, "get", "ds", "-A")).stderr == "No resources found.\n"


@pytest.mark.parametrize(("args", "why"), [
    (("dataset", "demo", "--all"), "--all deletes every object of RESOURCE: give either NAME, -f FILE or --all"),
    (("--all", "-f", "demo.yaml"), "--all deletes every object of RESOURCE: give either NAME, -f FILE or --all"),
    (("dataset", "demo", "-A"), "-A/--all-namespaces goes with --all: shoal delete RESOURCE --all -A"),
    (("datasets", "-A"), "-A/--all-namespaces goes with --all: shoal delete RESOURCE --all -A"),
    (("--all",), "name the kind to delete every object of: RESOURCE --all (e.g. datasets --all)"),
])
async def test_delete_all_refuses_names_and_a_without_all(nats_server: NatsServer, bus: Bus, args: tuple[str, ...],
                                                          why: str) -> None:
    """As kubectl: --all is not given with names, and -A widens only --all; refused before anything is sent."""
    sent: list[bytes] = []

    async def on_command(message: Msg) -> None:
        sent.append(message.data)

    watcher = await bus.nc.subscribe("shoal.cmd.>", cb=on_command)
    try:
        result = await shoal(nats_server, "delete", *args, wait_seconds=0.3)
        await bus.nc.flush()
    finally:
        await watcher.unsubscribe()
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert f"Error: {why}" in result.stderr, result.stderr
    assert sent == []


async def test_apply_says_created_configured_or_unchanged_as_kubectl_does(nats_server: NatsServer, services: None,
                                                                         tmp_path: Path) -> None:
    """A user found every apply said "configured", a new object and the same manifest applied again too."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: said}}
spec:
  mounts: [{{mountPoint: "local://{data}"}}]
---
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {{name: said}}
spec:
  replicas: 1
  tieredstore: {{levels: [{{mediumtype: MEM, quota: 1Gi}}]}}
"""
    created = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert (created.exit_code, created.stdout) == (0, "dataset.shoal.io/said created\nruntime.shoal.io/said "
                                                      "created\n"), created.output
    again = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert (again.exit_code, again.stdout) == (0, "dataset.shoal.io/said unchanged\nruntime.shoal.io/said "
                                                  "unchanged\n"), again.output
    changed = await shoal(nats_server, "apply", "-f", "-", stdin=manifest.replace("quota: 1Gi", "quota: 2Gi"))
    assert (changed.exit_code, changed.stdout) == (0, "dataset.shoal.io/said unchanged\nruntime.shoal.io/said "
                                                      "configured\n"), changed.output
    # The same object twice in one manifest: the second is compared with the first.
    twice = await shoal(nats_server, "apply", "-f", "-",
                        stdin=manifest.replace("{name: said}", "{name: twice}") + "---\n"
                        + manifest.replace("{name: said}", "{name: twice}").replace("quota: 1Gi", "quota: 2Gi"))
    assert twice.stdout.splitlines() == ["dataset.shoal.io/twice created", "runtime.shoal.io/twice created",
                                         "dataset.shoal.io/twice unchanged", "runtime.shoal.io/twice configured"]


async def test_apply_says_what_the_service_did_when_another_applier_came_first(nats_server: NatsServer, bus: Bus,
                                                                             tmp_path: Path) -> None:
    """Two people apply the same new datasets at once, and the other's commands reach the dataset service first.
    This apply said "created" for both, from its own read of the records before publishing (none yet), though the
    service configured the one the other had created with another spec and left the other one, the same spec,
    unchanged. The word is the service's, from its answer."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "mine").mkdir()

    def dataset(name: str, folder: str) -> Dataset:
        return Dataset(metadata=ObjectMeta(name=name),
                       spec=DatasetSpec(mounts=[Mount(mount_point=f"local://{tmp_path / folder}")]))

    sent: list[bytes] = []

    async def add(message: Any) -> None:
        sent.append(message.data)

    async def published(count: int) -> bool:
        return len(sent) >= count

    subscription = await bus.nc.subscribe(subjects.DATASET_APPLY, cb=add)
    # The other applier's commands, in the stream before this apply's (no service runs yet).
    for name, folder in (("raced", "theirs"), ("same", "mine")):
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset(name, folder)))
    manifest = "---\n".join(f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: {name}}}
spec:
  mounts: [{{mountPoint: "local://{tmp_path / 'mine'}"}}]
""" for name in ("raced", "same"))
    applying = asyncio.create_task(shoal(nats_server, "apply", "-f", "-", stdin=manifest, wait_seconds=60))
    await eventually(lambda: published(4), 30, "this apply's commands behind the other's")
    await subscription.unsubscribe()
    settings = Settings(nats=NatsSettings(urls=[nats_server.url]), service=ServiceSettings(local_roots=["/"]))
    with structlog.testing.capture_logs():  # the service's log lines would print into the CLI's stdout
        async with running(lambda halt: dataset_app.run(settings, halt)):
            applied = await applying
    assert (applied.exit_code, applied.stdout) == (0, "dataset.shoal.io/raced configured\n"
                                                      "dataset.shoal.io/same unchanged\n"), applied.output


async def test_a_dataset_whose_access_modes_promise_writes_is_applied_with_a_warning_and_a_condition(
        nats_server: NatsServer, services: None, tmp_path: Path) -> None:
    """A user applied a Fluid Dataset with ``accessModes: [ReadWriteMany]``: accepted without a word, although the
    mounts are read-only. The apply warns, the status says so in a ``ReadOnly`` condition, and a read-only spec
    drops it."""
    manifest = f"""
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: writable}}
spec:
  mounts: [{{mountPoint: "local://{tmp_path}"}}]
  accessModes: [ReadWriteMany]
"""
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert (applied.exit_code, applied.stdout) == (0, "dataset.shoal.io/writable created\n"), applied.output
    assert applied.stderr.splitlines() == [
        "warning: Dataset/spec.accessModes: ReadWriteMany is accepted, but Shoal mounts datasets read-only: a write "
        "gets EROFS (read-only file system)"]
    shown = json.loads((await shoal(nats_server, "get", "dataset", "writable", "-o", "json")).stdout)
    [read_only] = [c for c in shown["status"]["conditions"] if c["type"] == "ReadOnly"]
    assert (read_only["status"], read_only["reason"]) == ("True", "WritesNotServed"), read_only
    assert "ReadWriteMany" in read_only["message"] and "EROFS" in read_only["message"], read_only

    fixed = await shoal(nats_server, "apply", "-f", "-", stdin=manifest.replace("ReadWriteMany", "ReadOnlyMany"))
    assert (fixed.exit_code, fixed.stderr) == (0, ""), fixed.output
    shown = json.loads((await shoal(nats_server, "get", "dataset", "writable", "-o", "json")).stdout)
    assert [c for c in shown["status"]["conditions"] if c["type"] == "ReadOnly"] == []


async def test_a_rejection_of_an_object_without_a_name_names_its_kind_and_document(nats_server: NatsServer,
                                                                                    services: None) -> None:
    """A user saw "error:  rejected: metadata.name must not be empty" (a blank where the name goes)."""
    manifest = """
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {name: named}
spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}
---
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {name: ""}
spec: {mounts: [{mountPoint: "local:///data"}]}
"""
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert applied.exit_code == 1, applied.output
    assert applied.stderr.splitlines() == [
        "error: Dataset (document 2) rejected: metadata.name must not be empty"], applied.stderr


@pytest.mark.parametrize("spec", ["spec: {}\n", ""], ids=["empty-spec", "no-spec"])
async def test_a_thin_runtime_of_a_reference_dataset_is_accepted_and_picks_no_cache_worker(
        nats_server: NatsServer, services: None, tmp_path: Path, spec: str) -> None:
    """A user applied Fluid's reference sample (a ThinRuntime with ``spec: {}`` beside a ``dataset://`` Dataset)
    and it was refused ("spec.tieredstore.levels must list at least one cache tier"), though the migration guide
    says it is accepted and picks no cache worker. A ThinRuntime caches nothing: no tier, zero workers."""
    manifest = f"""
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: phy}}
spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
---
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: refdemo, namespace: ref}}
spec: {{mounts: [{{mountPoint: "dataset://default/phy", name: fusedemo, path: /}}]}}
---
apiVersion: data.fluid.io/v1alpha1
kind: ThinRuntime
metadata: {{name: refdemo, namespace: ref}}
{spec}"""
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert (applied.exit_code, applied.stderr) == (0, ""), applied.output
    assert applied.stdout.splitlines()[-1] == "runtime.shoal.io/refdemo created"
    shown = json.loads((await shoal(nats_server, "get", "runtime", "refdemo", "-n", "ref", "-o", "json")).stdout)
    assert (shown["spec"]["replicas"], shown["spec"].get("tieredstore")) == (0, None)
    assert shown["status"]["workers"] == []

    # A worker of it would hold nothing: scaling it up, or a tierless runtime with workers, is still refused.
    scaled = await shoal(nats_server, "scale", "runtime", "refdemo", "-n", "ref", "--replicas", "2")
    assert scaled.exit_code == 1 and "has no cache tier (spec.tieredstore.levels)" in scaled.stderr, scaled.output
    tierless = await shoal(nats_server, "apply", "-f", "-", stdin=manifest.replace("ThinRuntime", "AlluxioRuntime"))
    assert tierless.exit_code == 1
    assert "spec.tieredstore.levels must list at least one cache tier" in tierless.stderr, tierless.output


async def test_scale_changes_the_runtimes_replicas(nats_server: NatsServer, services: None, bus: Bus) -> None:
    manifest = """
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {name: scaled}
spec:
  replicas: 1
  blockSize: 1Mi
  tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}
"""
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)
    assert applied.exit_code == 0, applied.output

    scaled = await shoal(nats_server, "scale", "runtime", "scaled", "--replicas", "3")
    assert scaled.exit_code == 0, scaled.output
    assert scaled.stdout == "runtime.shoal.io/scaled scaled to 3 replicas\n"
    record = msgspec.convert(json.loads((await shoal(nats_server, "get", "runtime", "scaled", "-o", "record")).stdout),
                             RuntimeRecord)
    assert (record.runtime.spec.replicas, record.generation) == (3, 2)
    assert record.runtime.spec.block_size == "1Mi"  # the rest of the spec is kept
    one = await shoal(nats_server, "scale", "runtime", "scaled", "--replicas", "1")
    assert (one.exit_code, one.stdout) == (0, "runtime.shoal.io/scaled scaled to 1 replica\n"), one.output

    missing = await shoal(nats_server, "scale", "runtime", "ghost", "--replicas", "2")
    assert (missing.exit_code, missing.stderr) == (1, 'error: runtime.shoal.io "ghost" not found in namespace '
                                                      '"default"\n')
    negative = await shoal(nats_server, "scale", "runtime", "scaled", "--replicas", "-1")
    assert (negative.exit_code, negative.stderr) == (1, "error: --replicas must be 0 or more, got -1\n")
    too_many = await shoal(nats_server, "scale", "runtime", "scaled", "--replicas", "20000")
    assert too_many.exit_code == 1
    assert "rejected: spec.replicas must be between 0 and 10000, got 20000" in too_many.stderr
    # A runtime with an autoscaler: scaled all the same, with a note that the autoscaler goes on.
    elastic = manifest.replace("{name: scaled}", "{name: elastic}") + (
        "  autoscaling: {maxReplicas: 3, targetCacheUsedPercent: 80}\n")
    assert (await shoal(nats_server, "apply", "-f", "-", stdin=elastic)).exit_code == 0
    noted = await shoal(nats_server, "scale", "runtime", "elastic", "--replicas", "2")
    assert (noted.exit_code, noted.stdout) == (0, "runtime.shoal.io/elastic scaled to 2 replicas\n"), noted.output
    assert noted.stderr == ("note: runtime.shoal.io/elastic has autoscaling (1..3 workers): its autoscaler goes on "
                            "changing replicas from here, the first step no sooner than 300 s (coolDownSeconds) "
                            "from now\n")
    # Outside its bounds the autoscaler takes the replicas back at once: the note said it "goes on" from 5.
    above = await shoal(nats_server, "scale", "runtime", "elastic", "--replicas", "5")
    assert (above.exit_code, above.stdout) == (0, "runtime.shoal.io/elastic scaled to 5 replicas\n"), above.output
    assert above.stderr == ("note: runtime.shoal.io/elastic has autoscaling (1..3 workers): 5 is above maxReplicas 3, "
                            "so its autoscaler sets it back to 3 at once (change spec.autoscaling to go beyond)\n")
    below = await shoal(nats_server, "scale", "runtime", "elastic", "--replicas", "0")
    assert below.stderr == ("note: runtime.shoal.io/elastic has autoscaling (1..3 workers): 0 is below minReplicas 1, "
                            "so its autoscaler sets it back to 1 at once (change spec.autoscaling to go beyond)\n")


async def test_scale_keeps_a_spec_applied_after_it_read_the_runtime(nats_server: NatsServer, bus: Bus) -> None:
    # The runtime service is held back, so a new tier quota is still waiting in the command stream when `shoal scale`
    # reads the runtime (1Gi) and sends its command behind it: the scale must not put 1Gi back.
    from services.runtime import app as runtime_app

    settings = Settings(nats=NatsSettings(urls=[nats_server.url]))
    manifest = """
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {name: racy}
spec:
  blockSize: 1Mi
  tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}
"""
    sent: asyncio.Queue[Any] = asyncio.Queue()
    # The service's log lines would otherwise print into the CLI's captured stdout.
    with structlog.testing.capture_logs():
        async with running(lambda stop: runtime_app.run(settings, stop)):
            assert (await shoal(nats_server, "apply", "-f", "-", stdin=manifest)).exit_code == 0
        bigger = TieredStore(levels=[Level(mediumtype="MEM", quota="2Gi")])
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=Runtime(
            metadata=ObjectMeta(name="racy"), spec=RuntimeSpec(block_size="1Mi", tieredstore=bigger))))
        subscription = await bus.nc.subscribe(subjects.RUNTIME_COMMANDS, cb=sent.put)
        scaling = asyncio.create_task(shoal(nats_server, "scale", "runtime", "racy", "--replicas", "3"))
        await asyncio.wait_for(sent.get(), 10)  # the scale's command, behind the apply
        await subscription.unsubscribe()
        async with running(lambda stop: runtime_app.run(settings, stop)):
            scaled = await scaling
    assert (scaled.exit_code, scaled.stdout) == (0, "runtime.shoal.io/racy scaled to 3 replicas\n"), scaled.output
    record = msgspec.convert(json.loads((await shoal(nats_server, "get", "runtime", "racy", "-o", "record")).stdout),
                             RuntimeRecord)
    assert record.runtime.spec.replicas == 3
    assert record.runtime.spec.tieredstore.levels[0].quota == "2Gi"
    assert record.generation == 3


async def test_apply_prints_the_services_rejection(nats_server: NatsServer, services: None) -> None:
    manifest = """
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {name: bad}
spec:
  mounts: [{mountPoint: "ftp://example.com/data"}]
---
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {name: bad}
spec:
  tieredstore: {levels: [{mediumtype: TAPE, quota: 1Gi}]}
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: bad rejected: spec.mounts[0].mountPoint 'ftp://example.com/data' has scheme 'ftp'; "
        "supported: s3://, local://, http://, https://, pvc://, and dataset://<namespace>/<name> alone (a reference)",
        "error: bad rejected: spec.tieredstore.levels[0].mediumtype 'TAPE' is unknown (use MEM, SSD or HDD)",
    ]


async def test_apply_of_a_tier_smaller_than_one_block_is_rejected_with_the_quota_to_give(
        nats_server: NatsServer, services: None, bus: Bus) -> None:
    """Fluid's English JuiceFS sample says ``quota: 40960`` meaning MiB; it is bytes, a tier that holds no 4 MiB
    block. Before, it was accepted and the node cached nothing, silently."""
    manifest = """
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata: {name: tiny}
spec:
  tieredstore: {levels: [{mediumtype: SSD, path: /var/lib/shoal/cache, quota: 40960}]}
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "error: tiny rejected: spec.tieredstore.levels[0].quota 40960 is too small to hold one block of "
        "spec.blockSize '4Mi': a tier keeps blocks below its high watermark (0.95 of the quota); give a quota of at "
        "least 5Mi (4415057 bytes), or a smaller blockSize\n")
    assert await kv_load(await bus.kv(subjects.KV_RUNTIMES), subjects.resource_key("default", "tiny"),
                         RuntimeRecord) == (None, None)


async def test_apply_of_fluids_quota_list_sample_gives_each_path_its_quota(nats_server: NatsServer, services: None,
                                                                         bus: Bus) -> None:
    """Fluid's tiered store sample (docs/en/samples/tieredstore_config.md) sizes each path of a tier with
    ``quotaList`` and gives no ``quota``; before, it was refused with "Object missing required field `quota`"."""
    sample = textwrap.dedent(QUOTA_LIST)
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=sample % "2Gi,2Gi")

    assert (applied.exit_code, applied.stdout, applied.stderr) == (0, "runtime.shoal.io/dataset created\n", "")
    record, _ = await kv_load(await bus.kv(subjects.KV_RUNTIMES), subjects.resource_key("default", "dataset"),
                              RuntimeRecord)
    assert record is not None
    assert [(level.mediumtype, level.quota) for level in record.runtime.spec.tieredstore.levels] == [
        ("MEM", "2Gi"), ("SSD", "4Gi")]

    uneven = await shoal(nats_server, "apply", "-f", "-", stdin=sample % "3Gi,2Gi")
    assert uneven.exit_code == 0, uneven.output
    record, _ = await kv_load(await bus.kv(subjects.KV_RUNTIMES), subjects.resource_key("default", "dataset"),
                              RuntimeRecord)
    assert record is not None
    assert [(level.quota, level.quota_list) for level in record.runtime.spec.tieredstore.levels] == [
        ("2Gi", ""), ("5Gi", "3Gi,2Gi")]

    short = await shoal(nats_server, "apply", "-f", "-", stdin=sample % "3Gi")
    assert short.exit_code == 1, short.output
    assert short.stderr == (
        "error: <stdin>: document 1 (AlluxioRuntime dataset): spec.tieredstore.levels[1].quotaList '3Gi' has 1 "
        "quota for the 2 paths in path: give one quota per path, in the same order\n")


async def test_apply_of_fluids_juicefs_sample_keeps_shoals_watermarks(nats_server: NatsServer, services: None,
                                                                     bus: Bus) -> None:
    """Fluid's JuiceFS samples write ``low: "0.1"``: JuiceFS's free-space-ratio, not a low watermark. Before, Shoal
    stored it as the tier's low watermark (evict down to a tenth of the quota) without a word."""
    sample = (REPO / "deploy" / "examples" / "fluid-juicefsruntime.yaml").read_text()
    assert 'low: "0.1"' in sample

    applied = await shoal(nats_server, "apply", "-f", "-", stdin=sample)

    assert (applied.exit_code, applied.stdout) == (0, "runtime.shoal.io/jfs created\n"), applied.output
    assert ("ignored: JuiceFSRuntime default/jfs: spec.tieredstore.levels[0].low (JuiceFS's free-space-ratio, the "
            "share of the disk kept free, not a watermark: Shoal evicts from 0.95 down to 0.7 of the quota)"
            in applied.stderr.splitlines())
    record, _ = await kv_load(await bus.kv(subjects.KV_RUNTIMES), subjects.resource_key("default", "jfs"),
                              RuntimeRecord)
    assert record is not None
    (level,) = record.runtime.spec.tieredstore.levels
    assert (level.high, level.low) == ("0.95", "0.7")


async def test_apply_of_fluids_juicefs_cache_dirs_sample_gives_two_cache_paths(nats_server: NatsServer,
                                                                             services: None, bus: Bus) -> None:
    """docs/zh/samples/juicefs/juicefs_cache_dir.md separates JuiceFS's cache directories with ':'; before, Shoal
    kept ``/mnt/cache1:/mnt/cache2`` as one directory."""
    sample = """
apiVersion: data.fluid.io/v1alpha1
kind: JuiceFSRuntime
metadata:
  name: jfsdemo
spec:
  replicas: 1
  tieredstore:
    levels:
      - mediumtype: SSD
        path: /mnt/cache1:/mnt/cache2
        quota: 40Gi
        low: "0.1"
"""
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=sample)

    assert (applied.exit_code, applied.stdout) == (0, "runtime.shoal.io/jfsdemo created\n"), applied.output
    record, _ = await kv_load(await bus.kv(subjects.KV_RUNTIMES), subjects.resource_key("default", "jfsdemo"),
                              RuntimeRecord)
    assert record is not None
    assert record.runtime.spec.tieredstore.levels[0].path == "/mnt/cache1,/mnt/cache2"



# The credentials of Fluid's S3 samples, as they write them: Secret references, never values.
FLUID_S3_SECRETS = """      encryptOptions:
        - name: aws.accessKeyId
          valueFrom:
            secretKeyRef:
              name: mysecret
              key: aws.accessKeyId
        - name: aws.secretKey
          valueFrom:
            secretKeyRef:
              name: mysecret
              key: aws.secretKey
"""

async def test_apply_of_fluids_s3_sample_takes_its_region_option(nats_server: NatsServer, services: None,
                                                                  bus: Bus) -> None:
    """Fluid's S3 sample (docs/en/samples/s3_configuration.md, its placeholders filled) names the bucket's region
    ``alluxio.underfs.s3.region``; before, the apply was refused ("not supported for s3")."""
    sample = """
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata:
  name: my-s3
spec:
  mounts:
    - mountPoint: s3://my-bucket/path-to-data/
      name: s3
      options:
        alluxio.underfs.s3.region: us-west-2
        alluxio.underfs.s3.endpoint: http://127.0.0.1:9
""" + FLUID_S3_SECRETS
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=sample)

    assert (applied.exit_code, applied.stdout, applied.stderr) == (0, "dataset.shoal.io/my-s3 created\n", "")
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", "my-s3"),
                              DatasetRecord)
    assert record is not None
    assert record.dataset.spec.mounts[0].options["alluxio.underfs.s3.region"] == "us-west-2"


async def test_apply_of_fluids_minio_sample_notes_its_alluxio_setting(nats_server: NatsServer, services: None,
                                                                      bus: Bus) -> None:
    """Fluid's MinIO sample (docs/en/samples/accelerate_s3_minio.md) sets Alluxio's
    ``alluxio.underfs.s3.inherit.acl``; before, the whole dataset was refused ("not supported for s3")."""
    sample = """
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata:
  name: demo
spec:
  mounts:
    - mountPoint: s3://spark/fluid-data
      name: spark
      options:
        alluxio.underfs.s3.endpoint: http://127.0.0.1:9
        alluxio.underfs.s3.disable.dns.buckets: "true"
        alluxio.underfs.s3.inherit.acl: "false"
""" + FLUID_S3_SECRETS
    applied = await shoal(nats_server, "apply", "-f", "-", stdin=sample)

    assert (applied.exit_code, applied.stdout) == (0, "dataset.shoal.io/demo created\n"), applied.output
    assert applied.stderr == ('ignored: Dataset default/demo: spec.mounts[0].options["alluxio.underfs.s3.inherit.acl"] '
                              "(an Alluxio setting, not used by Shoal)\n")
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", "demo"),
                              DatasetRecord)
    assert record is not None
    assert record.dataset.spec.mounts[0].options == {"endpoint": "http://127.0.0.1:9", "pathStyle": "true"}


async def test_apply_of_two_mounts_of_one_name_is_rejected_naming_it(nats_server: NatsServer, services: None,
                                                                      bus: Bus) -> None:
    """Even at two paths: a name is a mount's identity, and a second one of the same name is a copy left unedited."""
    manifest = """
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {name: twins}
spec:
  mounts:
  - {mountPoint: "s3://bucket-one/train/", name: train, path: /a}
  - {mountPoint: "s3://bucket-two/train/", name: train, path: /b}
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1, result.output
    assert result.stderr == ("error: twins rejected: spec.mounts[1].name 'train' is also the name of spec.mounts[0]: "
                             "give each mount a name of its own\n")
    assert await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", "twins"),
                         DatasetRecord) == (None, None)


async def test_apply_of_a_misspelt_node_affinity_is_rejected_naming_the_field(nats_server: NatsServer,
                                                                              services: None, bus: Bus) -> None:
    """A misspelt field of nodeAffinity was kept and skipped: ``requried`` required nothing, so every node could be
    a cache worker, and a misspelt operator allowed none, said only in the runtime's status."""
    manifest = """
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {name: picky}
spec:
  mounts: [{mountPoint: "s3://bucket/"}]
  nodeAffinity:
    requried:
      nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [zone-a]}]}]
    required:
      nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: Equals, values: [zone-a]}]}]
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "error: picky rejected: spec.nodeAffinity.requried is not a field here (use required, "
        "requiredDuringSchedulingIgnoredDuringExecution, preferredDuringSchedulingIgnoredDuringExecution); "
        "spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0]: unknown operator 'Equals' (use In, "
        "NotIn, Exists, DoesNotExist, Gt, Lt)\n")
    assert await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", "picky"),
                         DatasetRecord) == (None, None)


async def test_apply_of_a_local_path_with_a_query_or_fragment_is_rejected(nats_server: NatsServer, services: None,
                                                                          bus: Bus, tmp_path: Path) -> None:
    """Read as a URL, local:///<tmp>/run#3 would mount <tmp>/run: refused, not a silent other folder."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run#3").mkdir()
    manifest = f"""
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata: {{name: hashed}}
spec:
  mounts: [{{mountPoint: "local://{tmp_path}/run#3"}}]
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1, result.output
    assert result.stderr == (f"error: hashed rejected: spec.mounts[0].mountPoint 'local://{tmp_path}/run#3' must be "
                             "a plain path without '?' or '#': what follows either would be dropped and another "
                             "folder mounted\n")
    assert await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key("default", "hashed"),
                         DatasetRecord) == (None, None)


async def test_apply_reports_invalid_documents_and_yaml_errors_without_publishing(nats_server: NatsServer,
                                                                                 bus: Bus) -> None:
    schema_error = await shoal(nats_server, "apply", "-f", "-",
                               stdin="apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {name: x}\n"
                                     "spec: {mounts: [{mountPoint: 1}]}\n")
    assert schema_error.exit_code == 1
    assert schema_error.stderr == ("error: <stdin>: document 1 (Dataset x): Expected `str`, got `int` - at "
                                   "`$.spec.mounts[0].mountPoint`\n")

    yaml_error = await shoal(nats_server, "apply", "-f", "-", stdin="a: 1\n---\nb: [\n")
    assert yaml_error.exit_code == 1
    assert yaml_error.stderr.startswith("error: <stdin>: invalid YAML in document 2, line 4")

    for nothing in ("", "---\n# a comment only\n---\n"):  # the wrong file, or a render that came out empty
        empty = await shoal(nats_server, "apply", "-f", "-", stdin=nothing)
        assert empty.exit_code == 1
        assert empty.stderr == "error: <stdin>: no objects to apply: the file holds no document\n"


# A List as `kubectl get datasets,alluxioruntimes -o yaml` prints it: server fields and statuses included.
KUBECTL_LIST = """
apiVersion: v1
kind: List
metadata: {{resourceVersion: ""}}
items:
  - apiVersion: data.fluid.io/v1alpha1
    kind: Dataset
    metadata: {{name: listed, namespace: default, uid: 6c1e, resourceVersion: "42"}}
    spec:
      mounts: [{{mountPoint: "local://{data}"}}]
    status: {{phase: Bound}}
  - apiVersion: data.fluid.io/v1alpha1
    kind: AlluxioRuntime
    metadata: {{name: listed, namespace: default}}
    spec:
      replicas: 1
      tieredstore: {{levels: [{{mediumtype: MEM, quota: 1Gi}}]}}
"""


async def test_a_kubectl_list_applies_and_deletes_each_item(nats_server: NatsServer, services: None,
                                                            tmp_path: Path) -> None:
    manifest = tmp_path / "list.yaml"
    manifest.write_text(KUBECTL_LIST.format(data=tmp_path))

    applied = await shoal(nats_server, "apply", "-f", str(manifest))
    assert applied.exit_code == 0, applied.output
    assert applied.stdout == "dataset.shoal.io/listed created\nruntime.shoal.io/listed created\n"
    # Each item's fields are judged as a document's would be; the List's own metadata is no object's.
    assert applied.stderr.splitlines() == ["ignored: Dataset default/listed: status (status is computed by Shoal)",
                                           "ignored: Dataset default/listed: metadata.uid (not used by Shoal)",
                                           "ignored: Dataset default/listed: metadata.resourceVersion (not used by "
                                           "Shoal)"]
    for kind in ("dataset", "runtime"):
        assert (await shoal(nats_server, "get", kind, "listed")).exit_code == 0, kind

    # As JSON too (kubectl get -o json), and from stdin.
    as_json = json.dumps(yaml.safe_load(KUBECTL_LIST.format(data=tmp_path)))
    deleted = await shoal(nats_server, "delete", "-f", "-", stdin=as_json)
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout == "dataset.shoal.io/listed deleted\nruntime.shoal.io/listed deleted\n"


async def test_a_lists_invalid_items_are_named_and_its_valid_ones_still_apply(nats_server: NatsServer,
                                                                              services: None, tmp_path: Path) -> None:
    """As documents of one file: each bad item is an error naming it, the good ones are applied, exit 1."""
    manifest = f"""
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ConfigMap
    metadata: {{name: settings}}
  - apiVersion: shoal.io/v1alpha1
    kind: Dataset
    metadata: {{name: good}}
    spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
  - apiVersion: v1
    kind: List
    items: []
  - apiVersion: shoal.io/v1alpha1
    kind: Runtime
    metadata: {{name: bad}}
    spec: {{replicas: many}}
---
apiVersion: v1
kind: List
items: {{name: not-a-list}}
"""
    result = await shoal(nats_server, "apply", "-f", "-", stdin=manifest)

    assert result.exit_code == 1
    assert result.stdout == "dataset.shoal.io/good created\n"
    assert result.stderr.splitlines() == [
        "error: <stdin>: document 1, item 1 (ConfigMap settings): unknown kind 'ConfigMap' of apiVersion 'v1'; "
        "supported: Dataset, Runtime, DataLoad and DataClean of shoal.io/v1alpha1, Dataset, DataLoad and "
        "AlluxioRuntime, JuiceFSRuntime, JindoRuntime, GooseFSRuntime, EFCRuntime, ThinRuntime, VineyardRuntime of "
        "data.fluid.io/v1alpha1",
        "error: <stdin>: document 1, item 3 (List): a List inside a List is not supported; put its items in the "
        "outer List",
        "error: <stdin>: document 1, item 4 (Runtime bad): Expected `int`, got `str` - at `$.spec.replicas`",
        "error: <stdin>: document 2 (List): items must be a list of objects, got dict",
    ]

    empty = await shoal(nats_server, "apply", "-f", "-", stdin="apiVersion: v1\nkind: List\nitems: []\n")
    assert (empty.exit_code, empty.stdout) == (1, "")
    assert empty.stderr == "error: <stdin>: no objects to apply: the file holds only an empty List\n"


async def test_a_folder_applies_its_manifests_in_name_order(nats_server: NatsServer, services: None,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    (folder / "sub").mkdir(parents=True)
    dataset = "apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {{name: {name}}}\n" \
              f"spec: {{{{mounts: [{{{{mountPoint: 'local://{tmp_path}'}}}}]}}}}\n"
    (folder / "b-runtime.yaml").write_text("apiVersion: shoal.io/v1alpha1\nkind: Runtime\nmetadata: {name: one}\n"
                                           "spec: {tieredstore: {levels: [{mediumtype: MEM, quota: 1Gi}]}}\n")
    (folder / "a-dataset.yml").write_text(dataset.format(name="one"))
    (folder / "c-dataset.json").write_text(json.dumps(yaml.safe_load(dataset.format(name="two"))))
    (folder / "README.md").write_text("not a manifest: [\n")  # only *.yaml, *.yml and *.json are read
    (folder / "sub" / "deeper.yaml").write_text(dataset.format(name="deeper"))

    applied = await shoal(nats_server, "apply", "-f", str(folder))
    assert applied.exit_code == 0, applied.output
    assert applied.stdout == ("dataset.shoal.io/one created\nruntime.shoal.io/one created\n"
                              "dataset.shoal.io/two created\n")
    for name, exit_code in (("one", 0), ("two", 0), ("deeper", 1)):  # deeper: in a subfolder, read with -R only
        assert (await shoal(nats_server, "get", "dataset", name)).exit_code == exit_code, name

    # -R: the subfolders too, each where its name sorts among the files; and stdin beside a folder still works.
    recursive = await shoal(nats_server, "apply", "-R", "-f", str(folder), "-f", "-", stdin=dataset.format(
        name="piped"))
    assert recursive.exit_code == 0, recursive.output
    assert recursive.stdout.splitlines() == ["dataset.shoal.io/one unchanged", "runtime.shoal.io/one unchanged",
                                             "dataset.shoal.io/two unchanged", "dataset.shoal.io/deeper created",
                                             "dataset.shoal.io/piped created"]
    # An error names the file in the folder.
    (folder / "d-bad.yaml").write_text("apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {name: x}\n"
                                       "spec: {mounts: [{mountPoint: 1}]}\n")
    bad = await shoal(nats_server, "apply", "-f", str(folder))
    assert bad.exit_code == 1
    assert bad.stderr == (f"error: {folder / 'd-bad.yaml'}: document 1 (Dataset x): Expected `str`, got `int` - at "
                          "`$.spec.mounts[0].mountPoint`\n")
    (folder / "d-bad.yaml").unlink()

    deleted = await shoal(nats_server, "delete", "--recursive", "-f", str(folder))
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout.splitlines() == ["dataset.shoal.io/one deleted", "runtime.shoal.io/one deleted",
                                           "dataset.shoal.io/two deleted", "dataset.shoal.io/deeper deleted"]


async def test_a_missing_path_or_an_empty_folder_applies_nothing(nats_server: NatsServer, services: None,
                                                                 tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f"apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {{name: good}}\n"
                    f"spec: {{mounts: [{{mountPoint: 'local://{tmp_path}'}}]}}\n")
    missing = tmp_path / "typo.yaml"
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "x.yaml").write_text(good.read_text())
    (empty / "notes.txt").write_text("hello\n")

    for args, error in [
        (("apply", "-f", str(good), "-f", str(missing)), f'the path "{missing}" does not exist'),
        (("delete", "-f", str(missing)), f'the path "{missing}" does not exist'),
        (("apply", "-f", str(good), "-f", str(empty / "nested" / "none")),
         f'the path "{empty / "nested" / "none"}" does not exist'),
        (("apply", "-f", str(empty), "-f", str(good)),
         f'no manifests (*.yaml, *.yml, *.json) directly in the folder "{empty}" (-R reads its subfolders too)'),
    ]:
        result = await shoal(nats_server, *args)
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {error}\n"), args
    # Nothing was applied, not even the good file named beside the bad path.
    assert (await shoal(nats_server, "get", "dataset", "good")).exit_code == 1

    # The control: with -R the folder has a manifest (a copy of the good one).
    control = await shoal(nats_server, "apply", "-R", "-f", str(empty))
    assert (control.exit_code, control.stdout) == (0, "dataset.shoal.io/good created\n"), control.output
    (empty / "nested" / "x.yaml").unlink()
    recursive = await shoal(nats_server, "apply", "-R", "-f", str(empty))
    assert (recursive.exit_code, recursive.stderr) == (
        1, f'error: no manifests (*.yaml, *.yml, *.json) in the folder or its subfolders "{empty}"\n')


async def test_a_manifest_without_end_is_refused_after_its_limit_not_read_for_ever(nats_server: NatsServer) -> None:
    """``apply -f /dev/zero`` read for ever (and into memory); a manifest is read up to its limit, then refused."""
    result = await asyncio.wait_for(shoal(nats_server, "apply", "-f", "/dev/zero"), timeout=60)
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr == ("error: /dev/zero: cannot read it: larger than the 16 MiB a manifest may have (a device "
                             "such as /dev/zero, or not a manifest?)\n")


async def test_a_document_too_large_for_a_nats_message_is_refused_and_the_others_apply(
        nats_server: NatsServer, services: None, tmp_path: Path) -> None:
    """A command over NATS's message limit was nats-py's MaxPayloadError as a traceback, after the documents before
    it had been applied and with those after it never sent."""
    manifest = tmp_path / "big.yaml"
    manifest.write_text(f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: before}}
spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
---
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata:
  name: huge
  annotations: {{notes: {"x" * 1_100_000}}}
spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
---
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: after}}
spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
""")

    applied = await shoal(nats_server, "apply", "-f", str(manifest))

    assert applied.exception is None or isinstance(applied.exception, SystemExit), applied.exception
    assert (applied.exit_code, applied.stdout) == (
        1, "dataset.shoal.io/before created\ndataset.shoal.io/after created\n")
    [error] = applied.stderr.splitlines()
    assert error.startswith(f"error: {manifest}: document 2 (Dataset huge): too large for Shoal: its command would be ")
    assert error.endswith(" bytes, more than the 1044480 a NATS message can carry here; split it into several "
                          "Datasets (fewer mounts or targets each)")
    assert (await shoal(nats_server, "get", "dataset", "huge")).exit_code == 1  # nothing of it was sent


def big_dataset(folder: Path) -> str:
    """A Dataset whose command is about 300 KB (its notes), of the local ``folder``; more documents may follow."""
    return f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata:
  name: big
  annotations: {{notes: {"x" * 300_000}}}
spec: {{mounts: [{{mountPoint: "local://{folder}"}}]}}
---
"""


async def test_a_document_larger_than_the_services_take_is_refused_before_it_is_sent(
        nats_server: NatsServer, services: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command between SHOAL_MAX_EVENT_BYTES (256 KiB, the services' default) and NATS's 1 MiB passed the CLI's
    check and was published, and the dataset service refused it with "payload of N bytes exceeds the limit of
    262144 bytes" and nothing said of what to change."""
    manifest = tmp_path / "big.yaml"
    manifest.write_text(big_dataset(tmp_path) + f"""
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata: {{name: small}}
spec: {{mounts: [{{mountPoint: "local://{tmp_path}"}}]}}
""")
    monkeypatch.delenv("SHOAL_MAX_EVENT_BYTES", raising=False)

    def big_refused(applied: Result) -> str:
        """The one error line of ``applied``, the refusal of the first document (Dataset big) as too large."""
        [error] = applied.stderr.splitlines()
        assert error.startswith(f"error: {manifest}: document 1 (Dataset big): too large for Shoal: its command "
                                "would be "), error
        return error

    applied = await shoal(nats_server, "apply", "-f", str(manifest))

    assert (applied.exit_code, applied.stdout) == (1, "dataset.shoal.io/small created\n"), applied.output
    error = big_refused(applied)
    assert error.endswith(" bytes, more than the 262144 the services take (SHOAL_MAX_EVENT_BYTES); split it into "
                          "several Datasets (fewer mounts or targets each), or raise SHOAL_MAX_EVENT_BYTES for the "
                          "services and here alike")
    assert (await shoal(nats_server, "get", "dataset", "big")).exit_code == 1  # nothing of it was sent

    # Raised here but not for the service: the service's own limit, in its beat, is what counts (before, it was
    # sent, and refused by the service after).
    monkeypatch.setenv("SHOAL_MAX_EVENT_BYTES", str(512 * 1024))
    applied = await shoal(nats_server, "apply", "-f", str(manifest))

    assert applied.exit_code == 1, applied.output
    assert " bytes, more than the 262144 the services take (SHOAL_MAX_EVENT_BYTES)" in big_refused(applied)
    assert (await shoal(nats_server, "get", "dataset", "big")).exit_code == 1  # nothing of it was sent


async def test_the_cli_sizes_a_command_by_the_services_limit_not_its_own(
        nats_server: NatsServer, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset service takes 512 KiB (its SHOAL_MAX_EVENT_BYTES), this shell says nothing (256 KiB, the default):
    a 300 KB Dataset is sent and made (before, the CLI refused it by its own environment's value); no live replica
    saying a limit (the runtime service not running), a runtime is sized by this shell's."""
    monkeypatch.delenv("SHOAL_MAX_EVENT_BYTES", raising=False)
    settings = Settings(nats=NatsSettings(urls=[nats_server.url]),
                        service=ServiceSettings(local_roots=["/"], max_event_bytes=512 * 1024))
    members = await bus.kv(subjects.KV_MEMBERS)
    with structlog.testing.capture_logs():
        async with running(lambda stop: dataset_app.run(settings, stop)):
            await eventually(lambda: event_limits(members), what="the dataset service's beat")
            assert await event_limits(members) == {subjects.MEMBERS_DATASET: 512 * 1024}
            manifest = tmp_path / "big.yaml"
            manifest.write_text(big_dataset(tmp_path) + f"""
apiVersion: shoal.io/v1alpha1
kind: Runtime
metadata:
  name: big
  annotations: {{notes: {"x" * 300_000}}}
spec: {{replicas: 1}}
""")
            applied = await shoal(nats_server, "apply", "-f", str(manifest))
            assert (applied.exit_code, applied.stdout) == (1, "dataset.shoal.io/big created\n"), applied.output
            [error] = applied.stderr.splitlines()
            assert "document 2 (Runtime big): too large for Shoal" in error and " the 262144 " in error


@pytest.mark.parametrize("command", [("get", "datasets"), ("describe", "dataset", "demo"),
                                     ("delete", "dataset", "demo"), ("load", "dataset", "demo")])
async def test_a_namespace_that_is_no_namespace_is_one_error_line(nats_server: NatsServer,
                                                                  command: tuple[str, ...]) -> None:
    """``-n ''`` was taken as a namespace: "No resources found in  namespace." A namespace is a DNS-1123 label."""
    for namespace, why in (("", "--namespace must not be empty"), ("Prod", "--namespace 'Prod' is not a DNS-1123"),
                           ("a>b", "--namespace 'a>b' is not a DNS-1123")):  # a>b: not a KV key either
        result = await shoal(nats_server, *command, "-n", namespace)
        assert result.exit_code == 1 and result.stdout == "", result.output
        assert result.stderr.startswith(f"error: {why}") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("action", ["apply", "delete"])
async def test_a_namespace_given_with_n_must_match_the_documents(nats_server: NatsServer, bus: Bus, tmp_path: Path,
                                                                action: str) -> None:
    """``shoal delete -f staging.yaml -n prod`` deleted staging's objects (apply applied them there) without a word;
    kubectl refuses a document whose namespace is not the one -n gives. Nothing of it is sent; without -n the
    document's namespace is used, as before."""
    manifest = tmp_path / "staging.yaml"
    manifest.write_text(textwrap.dedent("""
        apiVersion: shoal.io/v1alpha1
        kind: Dataset
        metadata: {name: demo, namespace: staging}
        spec: {mounts: [{mountPoint: "s3://demo/"}]}
        """))
    sent: list[bytes] = []

    async def on_command(message: Msg) -> None:
        sent.append(message.data)

    watcher = await bus.nc.subscribe("shoal.cmd.>", cb=on_command)
    try:
        result = await shoal(nats_server, action, "-f", str(manifest), "-n", "prod", wait_seconds=0.3)
        assert (result.exit_code, result.stdout) == (1, ""), result.output
        assert result.stderr == (f"error: {manifest}: document 1 (Dataset demo): its namespace 'staging' does not "
                                 "match -n prod: give -n staging, or leave -n out\n")
        # Without -n nothing is refused: the command is sent (no service answers here).
        result = await shoal(nats_server, action, "-f", str(manifest), wait_seconds=0.3)
        assert "no answer from the dataset service" in result.stderr, result.output
        await bus.nc.flush()
    finally:
        await watcher.unsubscribe()
    assert len(sent) == 1 and b'"staging"' in sent[0]


@pytest.mark.parametrize(("command", "why"), [
    (("resync", "dataset", ""), "a name must not be empty"),
    (("delete", "dataset", ""), "a name must not be empty"),
    (("delete", "dataload", ""), "a name must not be empty"),
    (("scale", "runtime", "", "--replicas", "1"), "a name must not be empty"),
    (("run", "dataload", ""), "a name must not be empty"),
    (("get", "dataset", ""), "a name must not be empty"),
    (("describe", "dataclean", ""), "a name must not be empty"),
    (("load", "dataset", ""), "a dataset name must not be empty"),
    (("clean", "dataset", ""), "a dataset name must not be empty"),
    (("load", "dataset", "demo", "--name", ""), "--name must not be empty"),
    (("clean", "dataset", "demo", "--name", ""), "--name must not be empty"),
])
async def test_an_empty_name_is_one_error_line_before_anything_is_sent(nats_server: NatsServer, bus: Bus,
                                                                      command: tuple[str, ...], why: str) -> None:
    """``shoal resync dataset ''`` sent the command and printed the service's answer with a blank name
    ("error:  rejected: name must not be empty"); ``get dataset ''`` listed every dataset. An empty name names
    nothing: the CLI says so before it sends or reads anything."""
    await bus.provision()
    result = await shoal(nats_server, *command, wait_seconds=0.3)
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {why}\n"), result.output


async def test_unanswered_command_times_out(nats_server: NatsServer, bus: Bus) -> None:
    """Streams exist but no service runs: the command waits for its answer, then says so."""
    result = await shoal(nats_server, "delete", "runtime", "demo", wait_seconds=0.3)

    assert result.exit_code == 1
    assert result.stderr == "error: demo: no answer from the runtime service within 0.3s (is it running?)\n"


async def test_missing_streams_and_unreachable_nats_exit_2_without_traceback(nats_server: NatsServer,
                                                                            refused_port: int) -> None:
    no_streams = await shoal(nats_server, "delete", "dataset", "demo")
    assert no_streams.exit_code == 2
    assert no_streams.stderr == (f"error: Shoal's streams do not exist on NATS at {nats_server.url}: "
                                 "is `make run` running?\n")

    port = refused_port
    runner = CliRunner()
    unreachable = await asyncio.to_thread(runner.invoke, cli, ["--nats", f"nats://127.0.0.1:{port}", "get", "ds"])
    assert unreachable.exit_code == 2
    assert unreachable.stderr == (f"error: cannot reach NATS at nats://127.0.0.1:{port} (connection refused): "
                                  "is `make run` running?\n")
    assert isinstance(unreachable.exception, SystemExit)


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e400"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_usage_error(timeout: str, refused_port: int) -> None:
    """click's range let them through: ``inf`` was an OverflowError traceback once a deadline was made whole seconds,
    ``nan`` "cannot reach NATS (no answer within nans)"."""
    result = CliRunner().invoke(cli, ["--nats", f"nats://127.0.0.1:{refused_port}", "--timeout", timeout, "apply",
                                      "-f", "-"], input="apiVersion: shoal.io/v1alpha1\nkind: Dataset\n"
                                                        "metadata: {name: a}\nspec: {mounts: [{mountPoint: s3://a/}]}\n")
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    shown = "inf" if timeout != "nan" else "nan"
    assert result.stderr.splitlines()[-1] == (f"Error: Invalid value for '--timeout': {shown} is not a number of "
                                              "seconds: give a finite one, such as 30")


async def test_an_unreachable_nats_url_without_a_scheme_is_named_without_its_password(refused_port: int) -> None:
    # nats-py logs in with cli:s3cret@host:port as with nats://cli:s3cret@host:port; the error showed it whole.
    port = refused_port
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", f"cli:s3cret@127.0.0.1:{port}", "get", "ds"])
    assert result.exit_code == 2
    assert result.stderr == (f"error: cannot reach NATS at nats://127.0.0.1:{port} (connection refused): "
                             "is `make run` running?\n")


@pytest.mark.parametrize(("url", "why"), [
    ("nats://[::1", "'nats://[::1' is not a server URL (Invalid IPv6 URL)"),
    ("nats://cli:s3cret@127.0.0.1:99999", "'nats://***@127.0.0.1:99999' is not a server URL (Port out of range"),
    # A '/' ends the host part: urlsplit reads "s3cret" as the port, and its reason quoted it.
    ("nats://cli:s3cret/x@127.0.0.1:4222",
     "'nats://***@127.0.0.1:4222' is not a server URL (Port could not be cast to integer value); a '/'"),
])
async def test_a_nats_url_that_names_no_server_exits_2_naming_it(url: str, why: str, refused_port: int) -> None:
    urls = f"nats://127.0.0.1:{refused_port},{url}"
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", urls, "get", "ds"])
    assert result.exit_code == 2 and result.stdout == "", result.output  # it was a ValueError's traceback
    assert result.stderr.startswith(f"error: --nats: {why}") and result.stderr.count("\n") == 1, result.stderr
    assert "s3cret" not in result.stderr and isinstance(result.exception, SystemExit)


async def test_a_frozen_first_server_is_passed_over_quickly_when_several_are_given(nats_server: NatsServer,
                                                                                   bus: Bus) -> None:
    """A server that accepts TCP and never answers (SIGSTOPped) as one of several: every command waited out nats-py's
    5 s connect timeout on it before trying the next, when nats-py happened to try it first (it shuffles them)."""
    tried: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tried.append(writer)
        await reader.read()  # until the client gives up on it

    listener = await asyncio.start_server(frozen, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    urls = f"nats://127.0.0.1:{port},{nats_server.url}"
    try:
        # nats-py tries the servers in a random order: until it has tried the frozen one first, which 20 runs
        # miss only once in a million.
        for _ in range(20):
            started = time.monotonic()
            result = await asyncio.to_thread(CliRunner().invoke, cli, ["--nats", urls, "get", "ds"])
            elapsed = time.monotonic() - started
            assert result.exit_code == 0, result.output
            if tried:
                break
        assert tried, "nats-py never tried the frozen server"
        assert elapsed < 3.5, f"{elapsed:.1f}s with a frozen server first"
    finally:
        for writer in tried:
            writer.close()
        listener.close()
        await listener.wait_closed()


# --- events ---


async def test_events_replays_facts_as_json_lines(nats_server: NatsServer, bus: Bus) -> None:
    accepted = DatasetAccepted(causation_id="c1", name="demo", namespace="default", generation=1)
    rejected = DatasetRejected(causation_id="c2", reason="nope")
    await bus.publish(subjects.DATASET_ACCEPTED, accepted)
    await bus.publish(subjects.DATASET_REJECTED, rejected)

    result = await shoal(nats_server, "events", "--all", "--limit", "2", "--subject", subjects.DATASET_FACTS)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [accepted.id, rejected.id]


async def test_events_prints_one_json_line_per_event_and_skips_what_is_not_json(nats_server: NatsServer,
                                                                                 bus: Bus) -> None:
    """Another system published on a fact subject: a pretty-printed payload took four lines and junk went out as it
    was, so a script reading JSON lines (``shoal events | jq``) failed on the first of them."""
    accepted = DatasetAccepted(causation_id="c1", name="demo", namespace="default", generation=1)
    subject = "shoal.evt.dataset.other"
    for payload in (b"not json at all", b'{\n  "type": "other.v1",\n  "n": 1\n}', b"\xff\xfe binary", b"",
                    b'{"type": "bad utf-8 \xff"}'):
        await bus.js.publish(subject, payload)
    await bus.publish(subjects.DATASET_ACCEPTED, accepted)

    result = await shoal(nats_server, "events", "--all", "--limit", "2", "--subject", subjects.DATASET_FACTS)

    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"type": "other.v1", "n": 1}, json.loads(msgspec.json.encode(accepted))]
    notes = result.stderr.splitlines()
    assert len(notes) == 4, notes
    assert all(note.startswith(f"note: skipped a message on {subject} that is not JSON (") for note in notes), notes
    assert "not json at all" not in result.stderr  # what it holds is not shown: it may be anything


@pytest.mark.parametrize("replay", [False, True], ids=["follow", "replay"])
@pytest.mark.parametrize(("subject", "problem"), [
    ("", "it is empty"),
    ("shoal.evt. dataset.>", "it holds whitespace"),
    ("shoal..evt", "it has an empty token (a '.' at either end, or two in a row)"),
    ("shoal.evt.", "it has an empty token (a '.' at either end, or two in a row)"),
    ("shoal.>.accepted", "'>' can only be its last token"),
    ("shoal.evt*", "'*' and '>' are wildcards only as a whole token"),
])
async def test_events_refuses_a_subject_nats_cannot_subscribe_to_in_one_line(
        nats_server: NatsServer, bus: Bus, subject: str, problem: str, replay: bool) -> None:
    """nats-py raised a bare BadSubjectError (a traceback) for these, and ``--all`` replayed any stream for ""."""
    await bus.publish(subjects.DATASET_ACCEPTED, DatasetAccepted(causation_id="c1", name="demo", namespace="default",
                                                                 generation=1))
    result = await shoal(nats_server, "events", *(["--all"] if replay else []), "--limit", "1", "--subject", subject)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"error: --subject {subject!r} is not a NATS subject: {problem}\n"


# --- schemas ---


def test_schemas_export_every_public_type(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["schemas", str(tmp_path / "schemas")])

    assert result.exit_code == 0, result.output
    written = {path.name for path in (tmp_path / "schemas").iterdir()}
    assert written == {f"{type_tag(t)}.json" for t in PUBLIC_EVENTS} | {INDEX_FILE}
    apply_schema = json.loads((tmp_path / "schemas" / "dataset.apply.v1.json").read_text())
    assert "mountPoint" in apply_schema["$defs"]["Mount"]["properties"]
    assert apply_schema["$defs"]["Mount"]["required"] == ["mountPoint"]
    index = json.loads((tmp_path / "schemas" / INDEX_FILE).read_text())
    assert {entry["type"] for entry in index["types"]} == {type_tag(t) for t in PUBLIC_EVENTS}
    assert all(entry["subject"] for entry in index["types"])

    again = CliRunner().invoke(cli, ["schemas", str(tmp_path / "again")])
    assert again.exit_code == 0
    for name in written:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "schemas" / name).read_bytes()


def test_schemas_into_a_folder_that_cannot_be_made_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")

    result = CliRunner().invoke(cli, ["schemas", str(tmp_path / "file" / "schemas")])

    assert result.exit_code == 1
    assert result.stderr == f"error: cannot write the schemas to {tmp_path / 'file' / 'schemas'}: Not a directory\n"


def test_committed_schemas_match_the_code() -> None:
    """docs/schemas/ is what other systems read; regenerate it with `shoal schemas` when an event changes."""
    committed = {path.name: path.read_text() for path in (REPO / "docs" / "schemas").glob("*.json")}
    assert committed == schema_files(), "docs/schemas is stale: run `.venv/bin/shoal schemas`"
