"""Golden payloads: JSON written by hand the way an outside system writes it must keep decoding.

``tests/golden/<type tag>.json`` holds one payload per public event type. A new public type without a golden file
fails here, and so does a schema change that stops an old payload from decoding (STYLE lesson 2).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Union

import msgspec
import pytest

from libs.events import PUBLIC_EVENTS, type_tag
from libs.events.agent import AgentHeartbeat, InventoryDelta, InventorySnapshot, ungroup, upgrade
from libs.events.common import ObjectRef
from libs.events.dataset import DatasetApply, DatasetStatusChanged
from libs.events.deadletter import DeadLetter
from libs.events.operation import DataCleanApply, DataLoadApply
from libs.events.runtime import RuntimeApply, RuntimeStatusChanged
from services.dataset.domain import validate_dataset
from services.runtime.domain import validate_runtime

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
TYPES_BY_TAG: dict[str, type[Any]] = {type_tag(t): t for t in PUBLIC_EVENTS}
ANY_PUBLIC_EVENT: Any = Union[PUBLIC_EVENTS]  # noqa: UP007 - built from a tuple at runtime
TAGS = sorted(TYPES_BY_TAG)


def golden_bytes(tag: str) -> bytes:
    return (GOLDEN_DIR / f"{tag}.json").read_bytes()


def golden_dict(tag: str) -> dict[str, Any]:
    loaded = json.loads(golden_bytes(tag))
    assert isinstance(loaded, dict)
    return loaded


def decode(tag: str, data: bytes) -> Any:
    return msgspec.json.decode(data, type=TYPES_BY_TAG[tag])


# --- Coverage of the public types ---


def test_public_event_tags_are_unique() -> None:
    assert len(TYPES_BY_TAG) == len(PUBLIC_EVENTS)


@pytest.mark.parametrize("event_type", PUBLIC_EVENTS, ids=lambda t: t.__name__)
def test_every_public_event_has_a_golden_payload(event_type: type[Any]) -> None:
    path = GOLDEN_DIR / f"{type_tag(event_type)}.json"
    assert path.is_file(), f"add a hand-written golden payload for {event_type.__name__} at {path}"


def test_every_golden_file_names_a_public_event() -> None:
    stray = sorted(p.name for p in GOLDEN_DIR.glob("*.json") if p.name.removesuffix(".json") not in TYPES_BY_TAG)
    assert stray == []


# --- Decoding and round trips ---


@pytest.mark.parametrize("tag", TAGS)
def test_golden_payload_carries_its_own_tag(tag: str) -> None:
    assert golden_dict(tag)["type"] == tag


@pytest.mark.parametrize("tag", TAGS)
def test_golden_payload_decodes_into_its_type(tag: str) -> None:
    event = decode(tag, golden_bytes(tag))
    assert type(event) is TYPES_BY_TAG[tag]
    assert event.id == golden_dict(tag)["id"]


@pytest.mark.parametrize("tag", TAGS)
def test_golden_payload_decodes_through_the_union_of_public_events(tag: str) -> None:
    event = msgspec.json.decode(golden_bytes(tag), type=ANY_PUBLIC_EVENT)
    assert type(event) is TYPES_BY_TAG[tag]


@pytest.mark.parametrize("tag", TAGS)
def test_reencoding_a_golden_payload_decodes_to_an_equal_event(tag: str) -> None:
    event = decode(tag, golden_bytes(tag))
    encoded = msgspec.json.encode(event)
    assert decode(tag, encoded) == event
    # The encoded form keeps the tag and camelCase names an outside reader expects.
    assert json.loads(encoded)["type"] == tag


@pytest.mark.parametrize("tag", TAGS)
def test_reencoding_keeps_every_field_the_golden_payload_set(tag: str) -> None:
    # Fields written by hand survive a round trip (nothing is dropped except values equal to defaults).
    original = golden_dict(tag)
    reencoded = json.loads(msgspec.json.encode(decode(tag, golden_bytes(tag))))
    assert set(reencoded) >= set(original)


# --- What the hand-written payloads mean ---


def test_dataset_apply_golden_reads_fluid_field_names() -> None:
    event = decode("dataset.apply.v1", golden_bytes("dataset.apply.v1"))
    assert isinstance(event, DatasetApply)
    dataset = event.dataset
    assert dataset.metadata.name == "imagenet"
    assert dataset.metadata.namespace == "ml-team"
    train, labels = dataset.spec.mounts
    assert train.mount_point == "s3://imagenet-train/ilsvrc2012/train/"
    assert train.read_only is True
    assert train.options["alluxio.underfs.s3.endpoint"] == "https://s3.eu-west-1.example.com"
    assert [o.name for o in train.encrypt_options] == ["aws.accessKeyId", "aws.secretKey"]
    assert train.encrypt_options[1].value_from.secret_key_ref.name == "imagenet-s3"
    assert train.encrypt_options[1].value_from.secret_key_ref.key == "secret-access-key"
    assert labels.mount_point == "local:///mnt/nfs/imagenet/labels"
    assert labels.shared is True
    assert dataset.spec.owner is not None
    assert (dataset.spec.owner.uid, dataset.spec.owner.gid) == (1000, 1000)
    assert dataset.spec.node_affinity is not None
    assert "required" in dataset.spec.node_affinity
    assert dataset.spec.access_modes == ["ReadOnlyMany"]
    assert dataset.spec.placement == "Exclusive"
    assert validate_dataset(dataset) == []


def test_runtime_apply_golden_reads_tiers_with_string_watermarks() -> None:
    event = decode("runtime.apply.v1", golden_bytes("runtime.apply.v1"))
    assert isinstance(event, RuntimeApply)
    spec = event.runtime.spec
    assert spec.replicas == 3
    assert spec.block_size == "4Mi"
    mem, ssd = spec.tieredstore.levels
    assert (mem.mediumtype, mem.quota, mem.high, mem.low) == ("MEM", "2Gi", "0.95", "0.7")
    assert (ssd.mediumtype, ssd.path, ssd.quota) == ("SSD", "/mnt/nvme0/cache,/mnt/nvme1/cache", "8Gi")
    assert validate_runtime(event.runtime) == []


def test_runtime_levels_accept_numbers_where_fluid_writes_strings() -> None:
    payload = golden_dict("runtime.apply.v1")
    payload["runtime"]["spec"]["tieredstore"]["levels"][0].update(quota=2147483648, high=0.95, low=0.7)
    event = msgspec.json.decode(json.dumps(payload).encode(), type=RuntimeApply)
    level = event.runtime.spec.tieredstore.levels[0]
    assert (level.quota, level.high, level.low) == (2147483648, 0.95, 0.7)


def test_dataset_status_golden() -> None:
    event = decode("dataset.status.v1", golden_bytes("dataset.status.v1"))
    assert isinstance(event, DatasetStatusChanged)
    status = event.status
    assert status.phase == "Bound"
    assert (status.ufs_total, status.ufs_total_bytes, status.file_num) == ("13.33GiB", 14312928706, 1281167)
    assert status.cache_states.cached_percentage == "18.8%"
    assert status.cache_states.cache_hit_ratio == "42.0%"
    assert [(c.type, c.status) for c in status.conditions] == [("MetadataSynced", "True")]
    assert status.conditions[0].last_transition_time == "2024-05-01T12:00:00Z"
    assert status.synced_generation == 3


def test_runtime_status_golden() -> None:
    event = decode("runtime.status.v1", golden_bytes("runtime.status.v1"))
    assert isinstance(event, RuntimeStatusChanged)
    assert event.status.phase == "PartialReady"
    assert event.status.worker_number_ready == 2
    assert event.status.ready_nodes == ["node-a", "node-b"]
    assert event.status.block_size_bytes == 4 * 1024 * 1024


def test_heartbeat_golden() -> None:
    event = decode("agent.heartbeat.v1", golden_bytes("agent.heartbeat.v1"))
    assert isinstance(event, AgentHeartbeat)
    assert event.node == "node-a"
    assert event.runtimes == [ObjectRef(name="imagenet", namespace="ml-team"), ObjectRef(name="coco")]
    assert event.healthy is True
    assert event.sent_at == 1714564805.25
    assert event.interval_seconds == 5.0


def test_heartbeat_golden_reports_each_mount() -> None:
    event = decode("agent.heartbeat.v1", golden_bytes("agent.heartbeat.v1"))
    assert isinstance(event, AgentHeartbeat)
    assert [(m.dataset.name, m.state) for m in event.mounts] == [("imagenet", "Serving"), ("coco", "Failing")]
    assert "exited with code 1" in event.mounts[1].message


def test_inventory_v2_golden_writes_each_key_once_and_v1_upgrades_to_the_same_blocks() -> None:
    snapshot = decode("agent.inventory.snapshot.v2", golden_bytes("agent.inventory.snapshot.v2"))
    assert isinstance(snapshot, InventorySnapshot)
    assert [(f.mount, f.key, f.blocks) for f in snapshot.files] == [
        (0, "train/img_0001.jpg", [(0, 4194304), (1, 1048576)]), (1, "labels/train.csv", [(0, 81920)])]
    assert [b.block.index for b in snapshot.cached_blocks()] == [0, 1, 0]
    old = decode("agent.inventory.snapshot.v1", golden_bytes("agent.inventory.snapshot.v1"))
    upgraded = upgrade(old)
    assert isinstance(upgraded, InventorySnapshot) and upgraded.cached_blocks() == old.blocks
    old_delta = decode("agent.inventory.delta.v1", golden_bytes("agent.inventory.delta.v1"))
    delta = upgrade(old_delta)
    assert isinstance(delta, InventoryDelta)
    assert ungroup(delta.cached) == old_delta.cached and ungroup(delta.evicted) == old_delta.evicted
    new_delta = decode("agent.inventory.delta.v2", golden_bytes("agent.inventory.delta.v2"))
    assert ungroup(new_delta.evicted) == old_delta.evicted


def test_dead_letter_golden_payload_is_base64_of_the_exact_bytes() -> None:
    event = decode("deadletter.v1", golden_bytes("deadletter.v1"))
    assert isinstance(event, DeadLetter)
    # Not valid UTF-8 at the end: base64 keeps the original bytes exactly.
    assert event.payload == b'{"type":"dataset.apply.v1","dataset":{}}\n\xff'
    assert event.stream_sequence == 42
    assert event.deliveries == 5
    assert json.loads(msgspec.json.encode(event))["payload"] == golden_dict("deadletter.v1")["payload"]


# --- Schema evolution: forward compatibility and precise errors ---


@pytest.mark.parametrize("tag", TAGS)
def test_unknown_top_level_field_is_ignored(tag: str) -> None:
    payload = golden_dict(tag)
    payload["fieldFromTheFuture"] = {"nested": [1, 2, 3]}
    event = decode(tag, json.dumps(payload).encode())
    assert event == decode(tag, golden_bytes(tag))


def test_unknown_nested_fields_are_ignored() -> None:
    payload = golden_dict("dataset.apply.v1")
    payload["dataset"]["futureField"] = 1
    payload["dataset"]["metadata"]["uid"] = "0b0c6a0e-1d0f-4a43-a1c2-6b8e3a9f7f10"
    payload["dataset"]["spec"]["dataRestoreLocation"] = {"path": "s3://backup/"}
    payload["dataset"]["spec"]["mounts"][0]["futureOption"] = True
    payload["dataset"]["spec"]["mounts"][0]["encryptOptions"][0]["valueFrom"]["secretKeyRef"]["optional"] = False
    event = msgspec.json.decode(json.dumps(payload).encode(), type=DatasetApply)
    assert event == decode("dataset.apply.v1", golden_bytes("dataset.apply.v1"))


def test_a_dataclean_target_has_no_replicas_and_one_still_sent_is_ignored() -> None:
    # DataClean's targets shared DataLoad's type, so its schema offered ``replicas``, which a clean never uses. A
    # payload that still sends one decodes, the field dropped as any unknown field is.
    target = msgspec.json.schema(DataCleanApply)["$defs"]["CleanTarget"]
    assert set(target["properties"]) == {"path"}
    assert "replicas" in msgspec.json.schema(DataLoadApply)["$defs"]["TargetPath"]["properties"]
    payload = golden_dict("dataclean.apply.v1")
    payload["dataClean"]["spec"]["target"][0]["replicas"] = 2
    event = msgspec.json.decode(json.dumps(payload).encode(), type=DataCleanApply)
    assert event == decode("dataclean.apply.v1", golden_bytes("dataclean.apply.v1"))
    assert b"replicas" not in msgspec.json.encode(event)


def test_missing_optional_fields_take_their_defaults() -> None:
    payload = {"type": "dataset.apply.v1", "dataset": {"metadata": {"name": "minimal"},
                                                       "spec": {"mounts": [{"mountPoint": "s3://bucket"}]}}}
    event = msgspec.json.decode(json.dumps(payload).encode(), type=DatasetApply)
    assert event.id  # generated when the publisher did not send one
    assert event.dataset.metadata.namespace == "default"
    assert event.dataset.spec.access_modes == ["ReadOnlyMany"]
    assert event.dataset.spec.placement == "Exclusive"


@pytest.mark.parametrize(
    ("tag", "path", "bad_value", "expected_path"),
    [
        ("dataset.apply.v1", ["dataset", "spec", "mounts", 0, "mountPoint"], 42, "$.dataset.spec.mounts[0].mountPoint"),
        ("dataset.apply.v1", ["dataset", "spec", "owner", "uid"], "1000", "$.dataset.spec.owner.uid"),
        ("dataset.apply.v1", ["dataset", "spec", "placement"], "Everywhere", "$.dataset.spec.placement"),
        (
            "dataset.apply.v1",
            ["dataset", "spec", "mounts", 0, "encryptOptions", 1, "valueFrom", "secretKeyRef", "key"],
            ["not", "a", "string"],
            "$.dataset.spec.mounts[0].encryptOptions[1].valueFrom.secretKeyRef.key",
        ),
        (
            "runtime.apply.v1",
            ["runtime", "spec", "tieredstore", "levels", 1, "quota"],
            [8],
            "$.runtime.spec.tieredstore.levels[1].quota",
        ),
        ("dataset.status.v1", ["status", "fileNum"], "many", "$.status.fileNum"),
        ("agent.heartbeat.v1", ["healthy"], "yes", "$.healthy"),
        ("deadletter.v1", ["streamSequence"], "42", "$.streamSequence"),
    ],
)
def test_wrong_field_type_fails_naming_the_path(tag: str, path: list[str | int], bad_value: Any,
                                                expected_path: str) -> None:
    payload: Any = golden_dict(tag)
    target = payload
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = bad_value
    with pytest.raises(msgspec.ValidationError) as caught:
        decode(tag, json.dumps(payload).encode())
    assert expected_path in str(caught.value)


def test_missing_required_field_fails_naming_it() -> None:
    payload = golden_dict("dataset.apply.v1")
    del payload["dataset"]["spec"]["mounts"][1]["mountPoint"]
    with pytest.raises(msgspec.ValidationError, match=r"mountPoint.*\$\.dataset\.spec\.mounts\[1\]"):
        decode("dataset.apply.v1", json.dumps(payload).encode())


def test_payload_of_another_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape("runtime.apply.v1")):
        decode("dataset.apply.v1", golden_bytes("runtime.apply.v1"))


def test_a_score_request_and_reply_without_the_limit_fields_still_decode() -> None:
    """``limit``, ``unlisted`` and ``unlistedScore`` came later in sched.score v1: payloads written before them
    decode, a request to the default limit (the best 100 nodes) and a reply to nothing left out."""
    request = golden_dict("sched.score.v1")
    del request["limit"]
    assert decode("sched.score.v1", json.dumps(request).encode()).limit == 100
    reply = golden_dict("sched.score.reply.v1")
    del reply["unlisted"], reply["unlistedScore"]
    decoded = decode("sched.score.reply.v1", json.dumps(reply).encode())
    assert (decoded.unlisted, decoded.unlisted_score) == (0, 0)
