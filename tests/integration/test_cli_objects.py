"""``shoal get -o yaml`` / ``-o json`` print Kubernetes objects that ``shoal apply -f`` takes back, against a real
nats-server and the real dataset, runtime and loader services.

A kubectl user edits what ``get -o yaml`` printed and applies it again: for that, each kind's output must be an
object (apiVersion, kind, metadata, spec, status), several a ``kind: List``, and applying it unedited must change
nothing (the services answer ``unchanged`` and keep the generation). ``-o record`` keeps the services' records.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing
import yaml

from libs import subjects
from libs.bus import Bus, kv_load
from libs.events.dataset import DatasetRecord
from libs.events.operation import OperationRecord
from libs.events.runtime import RuntimeRecord
from services.dataset import app as dataset_app
from services.loader import app as loader_app
from services.runtime import app as runtime_app
from tests.conftest import NatsServer
from tests.helpers import make_settings, running
from tests.integration.test_cli import shoal

# One object of each kind, two of them in Fluid's spelling (mapped onto Shoal's kinds), with labels, annotations,
# a tier with a quota per path, targets and a schedule: what the printed spec must give back unchanged.
MANIFEST = """
apiVersion: shoal.io/v1alpha1
kind: Dataset
metadata:
  name: demo
  labels: {{team: ml, "yes": "true"}}
  annotations: {{note: "spaces, colons: and 0.95"}}
spec:
  mounts: [{{mountPoint: "local://{data}", name: train}}]
  nodeAffinity:
    required:
      nodeSelectorTerms: [{{matchExpressions: [{{key: zone, operator: In, values: [a]}}]}}]
---
apiVersion: data.fluid.io/v1alpha1
kind: AlluxioRuntime
metadata: {{name: demo}}
spec:
  replicas: 2
  properties: {{alluxio.user.block.size.bytes.default: 8MB}}
  tieredstore:
    levels:
      - {{mediumtype: MEM, quota: 1Gi, high: "0.9", low: "0.5"}}
      - {{mediumtype: SSD, path: "{cache}/a,{cache}/b", quotaList: "2Gi,1Gi"}}
---
apiVersion: data.fluid.io/v1alpha1
kind: DataLoad
metadata: {{name: warm, labels: {{team: ml}}}}
spec:
  dataset: {{name: demo}}
  loadMetadata: true
  target: [{{path: /train/a, replicas: 2}}]
---
apiVersion: shoal.io/v1alpha1
kind: DataLoad
metadata: {{name: nightly}}
spec:
  dataset: {{name: demo}}
  policy: Cron
  schedule: "0 3 * * *"
  ttlSecondsAfterFinished: 600
---
apiVersion: shoal.io/v1alpha1
kind: DataClean
metadata: {{name: cool}}
spec:
  dataset: {{name: demo}}
  target: [{{path: /train/a}}]
"""

# (get's resource name, object name, kind printed, KV bucket, key, record type)
OBJECTS = [
    ("dataset", "demo", "Dataset", subjects.KV_DATASETS, subjects.resource_key("default", "demo"), DatasetRecord),
    ("runtime", "demo", "Runtime", subjects.KV_RUNTIMES, subjects.resource_key("default", "demo"), RuntimeRecord),
    ("dataload", "warm", "DataLoad", subjects.KV_OPERATIONS, subjects.operation_key("dataload", "default", "warm"),
     OperationRecord),
    ("dataload", "nightly", "DataLoad", subjects.KV_OPERATIONS,
     subjects.operation_key("dataload", "default", "nightly"), OperationRecord),
    ("dataclean", "cool", "DataClean", subjects.KV_OPERATIONS,
     subjects.operation_key("dataclean", "default", "cool"), OperationRecord),
]
# What an unedited object's apply may note on stderr: the fields a get adds and Shoal computes itself.
SERVER_FIELDS = ("status", "metadata.generation", "metadata.creationTimestamp")


@pytest.fixture
async def services(nats_server: NatsServer) -> AsyncIterator[None]:
    settings = make_settings(nats_server.url)
    # The services' log lines would otherwise print into the CLI's captured stdout.
    with structlog.testing.capture_logs():
        async with running(lambda stop: dataset_app.run(settings, stop),
                           lambda stop: runtime_app.run(settings, stop), lambda stop: loader_app.run(settings, stop)):
            yield


@pytest.fixture
async def applied(nats_server: NatsServer, services: None, tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    cache.mkdir()
    (data / "a").write_bytes(b"x" * 10)
    result = await shoal(nats_server, "apply", "-f", "-", stdin=MANIFEST.format(data=data, cache=cache))
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" created\n") == len(OBJECTS), result.stdout


async def record_of(bus: Bus, bucket: str, key: str, record_type: type[Any]) -> Any:
    record, _ = await kv_load(await bus.kv(bucket), key, record_type)
    assert record is not None, key
    return record


def spec_of(record: Any) -> Any:
    """What an apply may change of a record: its object (metadata and spec), and its generation."""
    if isinstance(record, DatasetRecord):
        return record.dataset, record.generation
    if isinstance(record, RuntimeRecord):
        return record.runtime, record.generation
    return record.metadata, record.load, record.clean, record.generation


def assert_only_server_fields_noted(stderr: str) -> None:
    for line in stderr.splitlines():
        assert line.startswith("ignored: ") and line.split(": ", 2)[2].split(" ")[0] in SERVER_FIELDS, line


@pytest.mark.parametrize("output", ["yaml", "json"])
async def test_each_kinds_object_applies_back_as_a_no_op(nats_server: NatsServer, bus: Bus, applied: None,
                                                         output: str) -> None:
    """``shoal get KIND NAME -o yaml > x.yaml && shoal apply -f x.yaml``: it printed the raw record (no apiVersion
    or kind), which apply refused."""
    for resource, name, kind, bucket, key, record_type in OBJECTS:
        before = await record_of(bus, bucket, key, record_type)

        shown = await shoal(nats_server, "get", resource, name, "-o", output)
        assert shown.exit_code == 0, shown.output
        obj = yaml.safe_load(shown.stdout) if output == "yaml" else json.loads(shown.stdout)
        assert (obj["apiVersion"], obj["kind"]) == ("shoal.io/v1alpha1", kind)
        assert {key: obj["metadata"][key] for key in ("name", "namespace", "generation")} == {
            "name": name, "namespace": "default", "generation": before.generation}
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec", "status"}

        again = await shoal(nats_server, "apply", "-f", "-", stdin=shown.stdout)
        assert (again.exit_code, again.stdout) == (0, f"{resource}.shoal.io/{name} unchanged\n"), again.output
        assert_only_server_fields_noted(again.stderr)
        after = await record_of(bus, bucket, key, record_type)
        assert spec_of(after) == spec_of(before), kind


async def test_the_object_shows_the_users_metadata_and_the_status_kubectl_shows(nats_server: NatsServer,
                                                                                applied: None) -> None:
    dataset = yaml.safe_load((await shoal(nats_server, "get", "dataset", "demo", "-o", "yaml")).stdout)
    assert dataset["metadata"]["labels"] == {"team": "ml", "yes": "true"}
    assert dataset["metadata"]["annotations"] == {"note": "spaces, colons: and 0.95"}
    assert dataset["spec"]["mounts"][0]["name"] == "train"
    assert dataset["status"]["phase"]  # Shoal's status as the bridge writes it to the custom resource
    assert "incarnation" not in dataset and "commandSequence" not in dataset["metadata"]

    runtime = yaml.safe_load((await shoal(nats_server, "get", "runtime", "demo", "-o", "yaml")).stdout)
    assert runtime["spec"]["blockSize"] == "8Mi" and runtime["spec"]["replicas"] == 2
    assert "desiredWorkerNumberScheduled" in runtime["status"]

    load = yaml.safe_load((await shoal(nats_server, "get", "dataload", "warm", "-o", "yaml")).stdout)
    assert load["spec"]["dataset"] == {"name": "demo", "namespace": "default"}
    assert load["metadata"]["creationTimestamp"].endswith("Z")
    assert load["status"]["phase"]

    # The record itself, as before, under its own name.
    record = await shoal(nats_server, "get", "dataload", "warm", "-o", "record")
    assert record.exit_code == 0, record.output
    assert msgspec.convert(json.loads(record.stdout), OperationRecord).metadata.name == "warm"


async def test_a_list_prints_as_kubectl_and_applies_back_as_a_no_op(nats_server: NatsServer, bus: Bus,
                                                                    applied: None) -> None:
    before = [spec_of(await record_of(bus, bucket, key, record_type))
              for _, _, _, bucket, key, record_type in OBJECTS]
    for resource, names in (("dataloads", ["nightly", "warm"]), ("datasets", ["demo"])):
        listed = await shoal(nats_server, "get", resource, "-o", "yaml")
        assert listed.exit_code == 0, listed.output
        document = yaml.safe_load(listed.stdout)
        assert (document["apiVersion"], document["kind"]) == ("v1", "List")
        assert [item["metadata"]["name"] for item in document["items"]] == names

        again = await shoal(nats_server, "apply", "-f", "-", stdin=listed.stdout)
        kind = resource.removesuffix("s")
        assert (again.exit_code, again.stdout) == (
            0, "".join(f"{kind}.shoal.io/{name} unchanged\n" for name in names)), again.output
    after = [spec_of(await record_of(bus, bucket, key, record_type)) for _, _, _, bucket, key, record_type in OBJECTS]
    assert after == before

    every = json.loads((await shoal(nats_server, "get", "dataclean", "-A", "-o", "json")).stdout)
    assert (every["kind"], [item["kind"] for item in every["items"]]) == ("List", ["DataClean"])
    empty = await shoal(nats_server, "get", "datasets", "-n", "nobody", "-o", "yaml")
    assert (empty.exit_code, yaml.safe_load(empty.stdout)) == (0, {"apiVersion": "v1", "kind": "List", "items": []})


async def test_an_edited_object_applies_its_edit(nats_server: NatsServer, bus: Bus, applied: None) -> None:
    """What the round trip is for: a label edited keeps the generation, a spec edited makes a new one."""
    key = subjects.resource_key("default", "demo")
    before = await record_of(bus, subjects.KV_RUNTIMES, key, RuntimeRecord)
    obj = yaml.safe_load((await shoal(nats_server, "get", "runtime", "demo", "-o", "yaml")).stdout)

    obj["metadata"]["labels"] = {"tier": "gold"}
    labelled = await shoal(nats_server, "apply", "-f", "-", stdin=yaml.safe_dump(obj))
    assert (labelled.exit_code, labelled.stdout) == (0, "runtime.shoal.io/demo configured\n"), labelled.output
    after = await record_of(bus, subjects.KV_RUNTIMES, key, RuntimeRecord)
    assert (after.runtime.metadata.labels, after.generation) == ({"tier": "gold"}, before.generation)

    obj["spec"]["replicas"] = 3
    scaled = await shoal(nats_server, "apply", "-f", "-", stdin=yaml.safe_dump(obj))
    assert (scaled.exit_code, scaled.stdout) == (0, "runtime.shoal.io/demo configured\n"), scaled.output
    after = await record_of(bus, subjects.KV_RUNTIMES, key, RuntimeRecord)
    assert (after.runtime.spec.replicas, after.generation) == (3, before.generation + 1)
