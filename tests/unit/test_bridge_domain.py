"""The bridge's pure decisions: translation and ids, Secret names, status shapes, merge patches, volumes, Events."""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from libs import kube
from libs.documents import COMMAND_HEADROOM
from libs.events.common import DNS1123_SUBDOMAIN, ObjectMeta
from libs.events.dataset import CacheStates, DatasetStatus, RuntimeRef
from libs.events.operation import OperationRecord, OperationStatus, Progress
from libs.events.runtime import RuntimeStatus
from services.bridge import domain

SHOAL_DATASET = kube.SHOAL_RESOURCES[0]
FLUID_DATASET = next(r for r in kube.FLUID_RESOURCES if r.kind == "Dataset")
ALLUXIO = next(r for r in kube.FLUID_RESOURCES if r.kind == "AlluxioRuntime")
DATALOAD = kube.SHOAL_RESOURCES[2]


def cr(resource: kube.Resource, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": resource.api_version, "kind": resource.kind,
            "metadata": {"name": "demo", "namespace": "team", "uid": "u-1", "generation": 1,
                         "resourceVersion": "7", **meta}, "spec": spec}


S3 = {"mounts": [{"mountPoint": "s3://bucket/prefix", "encryptOptions": [
    {"name": "aws.secretKey", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}}]}]}


def test_the_same_object_gives_the_same_id_and_a_change_a_new_one() -> None:
    obj = cr(SHOAL_DATASET, S3)
    first = domain.translate(SHOAL_DATASET, obj)
    again = domain.translate(SHOAL_DATASET, copy.deepcopy(obj))
    assert first.command is not None and again.command is not None
    assert first.command.event.id == again.command.event.id
    assert first.command.event.id.startswith("k8s.dataset.u-1.1.")
    relabelled = cr(SHOAL_DATASET, S3, labels={"team": "vision"})  # same generation, different command
    other = domain.translate(SHOAL_DATASET, relabelled).command
    assert other is not None and other.event.id != first.command.event.id
    # kubectl's copy of the whole object is not the user's metadata: it never reaches the command.
    annotated = cr(SHOAL_DATASET, S3, annotations={domain.DROPPED_ANNOTATIONS[0]: "{...}"})
    assert domain.translate(SHOAL_DATASET, annotated).command.event.id == first.command.event.id  # type: ignore


def test_a_uid_or_generation_no_api_server_makes_cannot_split_an_id_or_crash_its_encoding() -> None:
    """The fuzzer's find: a uid holding a lone surrogate (valid in a JSON escape, refused by every UTF-8 encoder)
    crashed the translation as its command was encoded. A uid with dots or a line break would have split the
    command id (``k8s.<kind>.<uid>...``, parsed by ``command_uid``) or the message id header. Such a uid stands
    in as its digest; a generation that is not a number as 0."""
    for uid in ("\ud800default", "a.b.c", "line\nbreak", "x" * 200):
        obj = cr(SHOAL_DATASET, S3, uid=uid, generation="2.5")
        translated = domain.translate(SHOAL_DATASET, obj)
        assert translated.command is not None, (uid, translated.errors)
        command_id = translated.command.event.id
        msgspec.json.encode(translated.command.event)  # encodes
        assert domain.command_uid(command_id) == domain.uid_of(obj) != uid
        assert command_id.startswith(f"k8s.dataset.{domain.uid_of(obj)}.0.")
        assert domain.uid_of(copy.deepcopy(obj)) == domain.uid_of(obj)  # the same object, the same stand-in
        assert domain.delete_id(SHOAL_DATASET, obj) == f"k8s.dataset.{domain.uid_of(obj)}.delete"
    # An API server's uid is kept as it is.
    assert domain.uid_of(cr(SHOAL_DATASET, S3, uid="6f1c2a34-8b1d-4c2e-9f00-1a2b3c4d5e6f")) == (
        "6f1c2a34-8b1d-4c2e-9f00-1a2b3c4d5e6f")


def test_a_command_larger_than_a_message_is_refused_with_its_size() -> None:
    obj = cr(SHOAL_DATASET, S3)
    command = domain.translate(SHOAL_DATASET, obj).command
    assert command is not None
    size = len(msgspec.json.encode(command.event))
    assert domain.translate(SHOAL_DATASET, obj, size + COMMAND_HEADROOM).command is not None
    refused = domain.translate(SHOAL_DATASET, obj, size + COMMAND_HEADROOM - 1)
    assert refused.command is None and refused.errors and f"would be {size} bytes" in refused.errors[0]


def test_a_command_larger_than_the_services_take_is_refused_with_the_setting_that_raises_it() -> None:
    """A command under the NATS limit but over the services' SHOAL_MAX_EVENT_BYTES would be published and then refused
    by the service: refused on the object instead, as ``shoal apply -f`` refuses it."""
    obj = cr(SHOAL_DATASET, S3)
    command = domain.translate(SHOAL_DATASET, obj).command
    assert command is not None
    size = len(msgspec.json.encode(command.event))
    assert domain.translate(SHOAL_DATASET, obj, 1024 * 1024, size).command is not None
    refused = domain.translate(SHOAL_DATASET, obj, 1024 * 1024, size - 1)
    assert refused.command is None and refused.errors and "SHOAL_MAX_EVENT_BYTES" in refused.errors[0]


def test_secret_references_are_namespaced_and_carry_no_value() -> None:
    obj = cr(FLUID_DATASET, S3)
    assert domain.secret_refs(obj) == [("creds", "secret")]
    command = domain.translate(FLUID_DATASET, obj).command
    assert command is not None
    ref = command.event.dataset.spec.mounts[0].encrypt_options[0].value_from.secret_key_ref  # type: ignore
    assert (ref.name, ref.key) == ("team.creds", "secret")
    assert domain.secret_ref_errors([("x" * 250, "k")], "team")


def test_a_secret_in_clear_text_gives_no_command_and_a_reason_without_its_value() -> None:
    for resource in (SHOAL_DATASET, FLUID_DATASET):
        leaky = cr(resource, {"sharedOptions": {"aws.secretKey": "s3cr3t-value"},
                              "mounts": [{"mountPoint": "https://host/f/?X-Amz-Signature=sig-value", "name": "a"}]})
        translation = domain.translate(resource, leaky)
        assert translation.command is None
        assert "spec.sharedOptions.aws.secretKey holds a secret in clear text" in translation.errors[0]
        assert "X-Amz-Signature" in translation.errors[1]
        assert not [e for e in translation.errors if "s3cr3t-value" in e or "sig-value" in e]


def test_a_record_that_took_in_none_of_an_objects_applies_is_an_earlier_objects() -> None:
    assert domain.of_earlier_object(record_sequence=7, first_apply=9)  # the deleted one's, the new apply not in yet
    assert domain.of_earlier_object(record_sequence=0, first_apply=9)  # a record from before the field
    assert not domain.of_earlier_object(record_sequence=9, first_apply=9)  # the object's first apply taken in
    assert not domain.of_earlier_object(record_sequence=11, first_apply=9)  # a later apply of its taken in
    assert not domain.of_earlier_object(record_sequence=None, first_apply=9)  # the record is gone
    assert not domain.of_earlier_object(record_sequence=7, first_apply=0)  # unknown: an entry from before the field


def test_mirror_keys_are_flat_checked_and_patched_only_when_changed() -> None:
    assert domain.mirror_key("team", "s3-creds", "secret") == "team.s3-creds.secret"
    assert domain.mirror_key_errors([("creds", "secret"), ("creds", "a_B-1.x")], "team") == []
    (too_long,) = domain.mirror_key_errors([("c" * 200, "k" * 60)], "team")
    assert "longer than 253" in too_long
    assert domain.mirror_key_errors([("creds", "bad key")], "team")
    current = {"team.creds.id": "QUtJRA==", "team.creds.secret": "b2xk"}  # AKID, old
    assert domain.mirror_changes(current, {"team.creds.id": b"AKID"}) == {}
    assert domain.mirror_changes(current, {"team.creds.id": b"AKID", "team.creds.secret": b"new"}) == {
        "team.creds.secret": "bmV3"}


def test_a_sync_that_misses_a_mounted_key_is_asked_again() -> None:
    missing = DatasetStatus(phase="Failed", message="mount s3://b: secret 'team.creds' has no key 'id' (needed for "
                                                    "aws.accessKeyId)")
    assert domain.waits_for_mounted_secret(missing)
    assert not domain.waits_for_mounted_secret(DatasetStatus(phase="Failed", message="cannot list s3://b: denied"))
    assert not domain.waits_for_mounted_secret(DatasetStatus(phase="NotBound"))
    assert not domain.waits_for_mounted_secret(None)
    obj = cr(SHOAL_DATASET, S3)
    assert domain.resync_id(obj, 1) == domain.resync_id(copy.deepcopy(obj), 1) != domain.resync_id(obj, 2)
    assert domain.resync_id(obj, 1) != domain.resync_id(cr(SHOAL_DATASET, S3, generation=2), 1)


def test_a_deleted_datasets_mirror_keys_go_unless_another_uses_them() -> None:
    shared = cr(SHOAL_DATASET, S3, name="other")
    two_keys = cr(SHOAL_DATASET, {"mounts": [{"mountPoint": "s3://b", "encryptOptions": [
        {"name": "aws.accessKeyId", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "id"}}},
        {"name": "aws.secretKey", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}}]}]})
    assert domain.unused_mirror_keys(two_keys, [shared]) == ["team.creds.id"]
    assert domain.unused_mirror_keys(two_keys, []) == ["team.creds.id", "team.creds.secret"]
    elsewhere = cr(SHOAL_DATASET, S3, name="other", namespace="ml")  # the same Secret name in another namespace
    assert domain.unused_mirror_keys(two_keys, [elsewhere]) == ["team.creds.id", "team.creds.secret"]


def test_a_mirror_keys_files_are_those_the_files_mode_may_have_written_and_never_outside_the_folder() -> None:
    """Without the mirror the bridge writes ``<dir>/<ns>.<secret>/<key>``; a mirror key's dots do not say where the
    Secret's name ends, so every such split is a candidate, and none that leaves the folder."""
    assert domain.secret_files(domain.mirror_key("team", "creds", "secret")) == [("team.creds", "secret")]
    assert domain.secret_files("team.a.b.c") == [("team.a", "b.c"), ("team.a.b", "c")]
    assert domain.secret_files("team.creds...") == []  # a key '..' (or '.') names no file of the folder
    assert domain.secret_files("team.creds./x") == []
    assert domain.secret_files("team") == [] and domain.secret_files("team.creds") == []  # no folder of the bridge's


def test_invalid_objects_say_why() -> None:
    load = cr(DATALOAD, {"dataset": {"name": "demo"}, "policy": "Sometimes"})
    translation = domain.translate(DATALOAD, load)
    assert translation.command is None
    assert translation.errors == ["spec.policy 'Sometimes' is not one of Once, Cron, OnEvent"]


def test_a_fluid_datasets_runtimes_name_the_kind_of_its_fluid_runtime() -> None:
    """Fluid writes ``runtimes[].type`` as its runtime's kind (``alluxio`` for an AlluxioRuntime), and its tools
    read that to know which runtime kind to fetch: always ``shoal`` was a kind they have not. A Shoal Dataset, or a
    Fluid one with no Fluid runtime of its name, keeps Shoal's type."""
    status = DatasetStatus(phase="Bound", runtimes=[RuntimeRef(name="demo", namespace="team")])
    fluid = domain.desired_status(FLUID_DATASET, cr(FLUID_DATASET, {}), status, None, now=0,
                                  runtime_kind="AlluxioRuntime")
    assert fluid is not None and fluid["runtimes"] == [
        {"name": "demo", "namespace": "team", "category": "Accelerate", "type": "alluxio"}]
    alone = domain.desired_status(FLUID_DATASET, cr(FLUID_DATASET, {}), status, None, now=0)
    assert alone is not None and alone["runtimes"][0]["type"] == "shoal"
    shoal = domain.desired_status(SHOAL_DATASET, cr(SHOAL_DATASET, {}), status, None, now=0,
                                  runtime_kind="AlluxioRuntime")
    assert shoal is not None and shoal["runtimes"][0]["type"] == "shoal"


def test_fluid_shapes_and_shoal_shape() -> None:
    status = DatasetStatus(phase="Bound", ufs_total="1.00KiB", file_num=2, manifest="team.demo",
                           cache_states=CacheStates(cache_capacity="1.00GiB", cached="0.00B"))
    fluid = domain.desired_status(FLUID_DATASET, cr(FLUID_DATASET, {}), status, None, now=0)
    assert fluid is not None and fluid["phase"] == "Bound" and fluid["fileNum"] == "2"  # a string, as Fluid
    assert "manifest" not in fluid and "syncedGeneration" not in fluid
    shoal = domain.desired_status(SHOAL_DATASET, cr(SHOAL_DATASET, {}), status, None, now=0)
    assert shoal is not None and shoal["manifest"] == "team.demo"
    runtime = domain.desired_status(ALLUXIO, cr(ALLUXIO, {}), RuntimeStatus(phase="Ready", worker_number_ready=1,
                                                                             cache_capacity="1.00GiB"), None, now=0)
    assert runtime == {"valueFile": "N/A", "masterPhase": "Ready", "desiredMasterNumberScheduled": 0,
                       "currentMasterNumberScheduled": 0, "masterNumberReady": 0,
                       "workerPhase": "Ready", "cacheStates": {"cacheCapacity": "1.00GiB"},
                       "desiredWorkerNumberScheduled": 0, "currentWorkerNumberScheduled": 0, "workerNumberReady": 1,
                       "fusePhase": "NotReady", "desiredFuseNumberScheduled": 0, "currentFuseNumberScheduled": 0,
                       "fuseNumberReady": 0}
    load = domain.desired_status(kube.FLUID_RESOURCES[1], cr(kube.FLUID_RESOURCES[1], {}),
                                 OperationStatus(phase="Pending", waiting_for="DataLoad team/a to be Complete",
                                                 waiting_for_operation=True),
                                 None, now=0)
    # Fluid's "still waiting", with what Fluid's DataLoad CRD requires: a duration (Unfinished) and conditions.
    assert load == {"phase": "Pending", "duration": "Unfinished", "conditions": [],
                    "waitingFor": {"operationComplete": True}}
    assert domain.desired_status(SHOAL_DATASET, cr(SHOAL_DATASET, {}), None, None, now=0) is None


def ready_of(status: dict[str, Any] | None) -> dict[str, Any]:
    assert status is not None
    (ready,) = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
    return dict(ready)


def test_a_fluid_dataset_has_fluids_ready_condition_following_its_phase() -> None:
    """Fluid always writes a Ready condition on a Dataset (True once Bound, reason DatasetReady), and its docs wait
    for a dataset with `kubectl wait --for=condition=Ready`: without it the wait never ends."""
    obj = cr(FLUID_DATASET, {})
    not_bound = domain.desired_status(FLUID_DATASET, obj, DatasetStatus(phase="NotBound"), None, now=1000)
    assert ready_of(not_bound) == {"type": "Ready", "status": "False", "reason": "DatasetReady",
                                   "message": "the dataset is NotBound", "lastTransitionTime": "1970-01-01T00:16:40Z"}
    # Why it is not Bound, where `kubectl wait` and `kubectl describe` show the condition.
    waiting = domain.desired_status(FLUID_DATASET, obj, DatasetStatus(phase="NotBound", message="no Runtime a/b: x"),
                                    None, now=1000)
    assert ready_of(waiting)["message"] == "the dataset is NotBound: no Runtime a/b: x"
    obj["status"] = not_bound
    bound = domain.desired_status(FLUID_DATASET, obj, DatasetStatus(phase="Bound"), None, now=2000)
    assert (ready_of(bound)["status"], ready_of(bound)["lastTransitionTime"]) == ("True", "1970-01-01T00:33:20Z")
    obj["status"] = bound
    # Unchanged: the time stays, so nothing is written again.
    again = domain.desired_status(FLUID_DATASET, obj, DatasetStatus(phase="Bound"), None, now=3000)
    assert again == bound and domain.status_patch(obj, again) is None
    # A refusal fails the dataset: not Ready.
    refusal = domain.Refusal(domain.REASON_REJECTED, "no mounts")
    failed = domain.desired_status(FLUID_DATASET, obj, DatasetStatus(phase="Bound"), refusal, now=4000)
    assert failed is not None and failed["phase"] == "Failed" and ready_of(failed)["status"] == "False"
    # Shoal's own Dataset keeps Shoal's conditions only.
    shoal = domain.desired_status(SHOAL_DATASET, cr(SHOAL_DATASET, {}), DatasetStatus(phase="Bound"), None, now=0)
    assert shoal is not None and shoal["conditions"] == []


def test_a_refusal_fails_the_object_and_keeps_its_time() -> None:
    refusal = domain.Refusal(domain.REASON_REJECTED, "spec.mounts must list at least one mount")
    obj = cr(SHOAL_DATASET, {})
    first = domain.desired_status(SHOAL_DATASET, obj, None, refusal, now=1000)
    assert first is not None and first["phase"] == "Failed" and first["message"] == refusal.message
    obj["status"] = first
    later = domain.desired_status(SHOAL_DATASET, obj, None, refusal, now=2000)
    assert later == first and domain.status_patch(obj, later) is None  # nothing to write again


def test_a_refusal_whose_write_did_not_land_keeps_the_time_last_sent() -> None:
    # The object shows no status (the write was refused or dropped): the time is the one sent, not a new one per
    # pass, which would make every pass's status new and send it again.
    refusal = domain.Refusal(domain.REASON_INVALID, "spec.policy 'Sometimes' is not one of Once, Cron, OnEvent")
    obj = cr(DATALOAD, {})
    sent = domain.desired_status(DATALOAD, obj, None, refusal, now=1000)
    assert sent is not None
    assert domain.desired_status(DATALOAD, obj, None, refusal, now=2000, tried=sent) == sent
    cleared = domain.desired_status(DATALOAD, obj, None, None, now=1500)
    again = domain.desired_status(DATALOAD, obj, None, refusal, now=2000, tried=cleared)
    assert again is not None and again["conditions"][0]["lastTransitionTime"] != sent["conditions"][0][
        "lastTransitionTime"]  # refused anew after a status that was not: the new refusal's own time


def test_merge_patch_removes_and_replaces() -> None:
    current = {"phase": "NotBound", "cacheStates": {"cached": "1B", "cacheCapacity": "2B"}, "old": 1,
               "conditions": [{"type": "A"}]}
    desired = {"phase": "Bound", "cacheStates": {"cached": "1B", "cacheCapacity": "3B"}, "conditions": []}
    assert domain.merge_patch(current, desired) == {"phase": "Bound", "cacheStates": {"cacheCapacity": "3B"},
                                                    "old": None, "conditions": []}
    assert domain.merge_patch(desired, desired) is None
    assert domain.without_nulls({"a": None, "b": [{"c": None, "d": 1}]}) == {"b": [{"d": 1}]}


def test_a_status_patch_tests_the_uid_and_writes_the_whole_status() -> None:
    """The status belongs to this object: the patch applies to no other one made again under its name."""
    obj = cr(SHOAL_DATASET, {})
    obj["metadata"]["uid"] = "u1"
    obj["status"] = {"phase": "NotBound", "old": 1}
    desired = {"phase": "Bound"}
    assert domain.status_patch(obj, desired) == [{"op": "test", "path": "/metadata/uid", "value": "u1"},
                                                 {"op": "add", "path": "/status", "value": desired}]
    assert domain.status_patch(obj, {"phase": "NotBound", "old": 1}) is None
    assert domain.status_patch(obj, None) is None


def test_finalizer_patch_keeps_other_finalizers_of_the_version_it_was_built_from() -> None:
    """The whole list, as read, with the version read: a newer object (a finalizer added since) refuses it."""
    obj = cr(SHOAL_DATASET, {}, finalizers=["other/one"])
    assert domain.finalizer_patch(obj, held=True) == {
        "metadata": {"finalizers": ["other/one", kube.FINALIZER], "resourceVersion": "7"}}
    obj["metadata"]["finalizers"] = ["other/one", kube.FINALIZER]
    assert domain.finalizer_patch(obj, held=True) is None
    assert domain.finalizer_patch(obj, held=False) == {
        "metadata": {"finalizers": ["other/one"], "resourceVersion": "7"}}


def test_no_finalizer_is_added_to_an_object_being_deleted_but_ours_is_removed() -> None:
    """The API server refuses a new finalizer on an object being deleted (422): no patch is built for it."""
    obj = cr(SHOAL_DATASET, {}, finalizers=["other/one"])
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert domain.finalizer_patch(obj, held=True) is None
    obj["metadata"]["finalizers"] = ["other/one", kube.FINALIZER]
    assert domain.finalizer_patch(obj, held=False) == {
        "metadata": {"finalizers": ["other/one"], "resourceVersion": "7"}}


def test_volume_and_claim_bind_to_each_other() -> None:
    obj = cr(FLUID_DATASET, {"accessModes": ["ReadWriteMany"]})
    volume = domain.persistent_volume(obj, "/var/lib/shoal/mnt/")
    claim = domain.persistent_volume_claim(obj)
    assert volume["metadata"]["name"] == "team-demo" == claim["spec"]["volumeName"]
    assert volume["spec"]["claimRef"]["name"] == claim["metadata"]["name"] == "demo"
    assert volume["spec"]["hostPath"]["path"] == "/var/lib/shoal/mnt/team/demo"
    assert volume["spec"]["accessModes"] == claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["labels"] == {kube.MANAGED_BY_LABEL: kube.MANAGED_BY, kube.DATASET_LABEL: "team.demo"}
    assert len(domain.dataset_label("n" * 63, "d" * 63)) == 63


def test_a_volume_is_a_datasets_own_only_by_its_labels_and_claim() -> None:
    """a-b/c and a/b-c share the volume name a-b-c: only labels and claimRef tell whose a volume is."""
    mine = domain.persistent_volume(cr(SHOAL_DATASET, {}, name="c", namespace="a-b"), "/mnt")
    assert domain.is_own_volume(mine, "a-b", "c")
    assert domain.is_own_volume(domain.persistent_volume_claim(cr(SHOAL_DATASET, {}, name="c", namespace="a-b")),
                                "a-b", "c")
    assert not domain.is_own_volume(mine, "a", "b-c")
    reason = domain.volume_conflict("PersistentVolume", mine, "a", "b-c")
    assert "PersistentVolume a-b-c" in reason and "claim a-b/c" in reason and "rename" in reason
    users = {"metadata": {"name": "a-b-c"}, "spec": {"hostPath": {"path": "/srv"}}}
    assert not domain.is_own_volume(users, "a-b", "c")
    assert "Shoal did not create it" in domain.volume_conflict("PersistentVolume", users, "a-b", "c")
    labelled_elsewhere = copy.deepcopy(mine)
    labelled_elsewhere["spec"]["claimRef"] = {"namespace": "x", "name": "c"}  # our labels, another claim
    assert not domain.is_own_volume(labelled_elsewhere, "a-b", "c")


def test_a_volume_conflict_is_a_condition_that_keeps_its_time_and_the_phase() -> None:
    obj = cr(SHOAL_DATASET, {})
    status = DatasetStatus(phase="Bound")
    first = domain.desired_status(SHOAL_DATASET, obj, status, None, now=1000, volume_conflict="taken")
    assert first is not None and first["phase"] == "Bound"
    (condition,) = [c for c in first["conditions"] if c["type"] == domain.CONDITION_VOLUME]
    assert condition["status"] == "False" and condition["reason"] == domain.REASON_VOLUME_TAKEN
    obj["status"] = first
    assert domain.desired_status(SHOAL_DATASET, obj, status, None, now=2000, volume_conflict="taken") == first
    cleared = domain.desired_status(SHOAL_DATASET, obj, status, None, now=3000)
    assert cleared is not None and not [c for c in cleared.get("conditions", [])
                                        if c["type"] == domain.CONDITION_VOLUME]


def test_an_event_name_is_a_dns_subdomain_whatever_the_objects_name() -> None:
    """The Event name keeps 236 characters of the object's: a cut at a '.' or '-' made a label end with it."""
    for name in ("demo", "a" * 63, "a.b", "a" * 235 + ".b", "a" * 235 + "-b", "a" * 234 + "-.b", "a" * 253):
        event = domain.event_name(cr(FLUID_DATASET, {}, name=name), "Invalid", "why")
        assert len(event) <= domain.MAX_NAME and DNS1123_SUBDOMAIN.fullmatch(event), name


def test_finished_loads_and_events() -> None:
    done = OperationStatus(phase="Complete", duration="3s", runs=1, progress=Progress(files_done=2, bytes_done=10))
    assert domain.finished_load(DATALOAD, done) == ("Normal", "DataLoadComplete",
                                                    "DataLoad complete in 3s: 2 files, 10 bytes")
    assert domain.finished_load(DATALOAD, OperationStatus(phase="Executing")) is None
    obj = cr(DATALOAD, {})
    name = domain.event_name(obj, "DataLoadComplete", 1)
    assert name == domain.event_name(obj, "DataLoadComplete", 1) != domain.event_name(obj, "DataLoadComplete", 2)
    event = domain.kube_event(DATALOAD, obj, name=name, event_type="Normal", reason="DataLoadComplete",
                              message="done", now=0)
    assert event["involvedObject"]["uid"] == "u-1" and event["metadata"]["namespace"] == "team"
    assert event["firstTimestamp"] == "1970-01-01T00:00:00Z"



# --- what a restarted bridge sends again (``shoal_bridge_applied``) ---

KEY = domain.ObjectKey(SHOAL_DATASET, "team", "demo")
SENT = "k8s.dataset.u-1.1.abc"  # as domain.apply_id writes it


def test_an_apply_sent_before_and_not_rejected_is_not_sent_again() -> None:
    entry = domain.applied(KEY, SENT, frozenset({"team.creds.secret"}), sequence=12)
    assert domain.sent_before(entry, SENT, rejection=0)
    assert not domain.sent_before(entry, "k8s.dataset.u-1.2.def", rejection=0), "the spec changed meanwhile"
    assert not domain.sent_before(None, SENT, rejection=0), "never sent"


def test_a_rejected_apply_is_sent_again_and_its_old_rejection_stops_counting() -> None:
    entry = domain.applied(KEY, SENT, sequence=12)
    assert not domain.sent_before(entry, SENT, rejection=40), "a rejection newer than the entry stands"
    marked = domain.rejected(entry, 40)
    assert not domain.sent_before(marked, SENT, rejection=40), "marked rejected: sent again"
    resent = domain.applied(KEY, SENT, sequence=13, rejection=40)  # what the resend writes
    assert domain.sent_before(resent, SENT, rejection=40)
    # The facts are read from the start at every start: the old rejection comes back and no longer counts, a new one
    # does, and so does any rejection of another command or with no entry.
    assert not domain.rejection_holds(resent, SENT, 40)
    assert domain.rejection_holds(resent, SENT, 41)
    assert domain.rejection_holds(marked, SENT, 40)
    assert domain.rejection_holds(resent, "k8s.dataset.u-1.2.def", 40)
    assert domain.rejection_holds(None, SENT, 1)


def test_held_keys_and_command_uids() -> None:
    assert domain.held_keys(domain.applied(KEY, SENT, frozenset({"b", "a"}))) == {"a", "b"}
    assert domain.held_keys(domain.applied(KEY, SENT)) == frozenset(), "unknown (an older entry): nothing removed"
    assert domain.held_keys(None) == frozenset()
    assert domain.command_uid(SENT) == "u-1"
    for other in ("cli.apply.demo", "k8s.dataset", "", "k8s.dataset.u-1"):
        assert domain.command_uid(other) == ""


def test_the_running_specs_secrets_are_this_processs_last_publish_else_the_entrys() -> None:
    """While a Dataset's spec is invalid, the Secrets of the spec Shoal runs are still handed over; after a start
    they are the bucket entry's (kept through its JSON), and none when unknown (an entry from before they were)."""
    refs = [("creds", "secret"), ("a.b", "c")]
    entry = msgspec.json.decode(msgspec.json.encode(domain.applied(KEY, SENT, secrets=refs)), type=domain.Applied)
    assert domain.running_refs(None, entry) == refs
    assert domain.running_refs([("other", "k")], entry) == [("other", "k")]
    assert domain.running_refs(None, domain.applied(KEY, SENT)) == []
    assert domain.running_refs(None, None) == []


def test_an_entry_written_before_held_keys_were_kept_decodes_as_unknown() -> None:
    old = msgspec.json.encode({"commandId": SENT, "group": SHOAL_DATASET.group, "kind": "Dataset",
                               "namespace": "team", "name": "demo"})
    entry = msgspec.json.decode(old, type=domain.Applied)
    assert entry.held is None and entry.secrets is None and not entry.rejected and entry.sequence == 0
    assert domain.applied_key(entry) == KEY


def test_observed_generation_is_the_objects_once_its_apply_ran() -> None:
    """The CR's observedGeneration is the generation of the apply the record took in and ran; until both, the one
    the object shows (Shoal's own count is never shown: it stays put across an edit Shoal reads as no change)."""
    obj = {"metadata": {"generation": 4}, "status": {"observedGeneration": 3}}
    command = "k8s.dataload.uid-1.4.abcdef012345"

    def record(command_sequence: int, generation: int, observed: int) -> OperationRecord:
        return OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm"), generation=generation,
                               command_sequence=command_sequence,
                               status=OperationStatus(observed_generation=observed))

    assert domain.kube_observed_generation(obj, command, 10, record(10, 2, 2)) == 4
    assert domain.kube_observed_generation(obj, command, 10, record(12, 1, 1)) == 4  # a later apply, same spec
    assert domain.kube_observed_generation(obj, command, 10, record(9, 2, 2)) == 3  # not taken in yet
    assert domain.kube_observed_generation(obj, command, 10, record(10, 2, 1)) == 3  # the old spec's run goes on
    assert domain.kube_observed_generation(obj, command, 0, record(10, 2, 2)) == 3  # sequence unknown
    assert domain.kube_observed_generation(obj, command, 10, None) == 3
    assert domain.kube_observed_generation({"metadata": {}}, command, 10, record(9, 1, 1)) == 0


def test_an_operation_expired_only_when_ttl_removed_the_record_this_objects_apply_reached() -> None:
    """The KV history of an operation's key says whether Shoal removed it by its ttlSecondsAfterFinished (a marker
    without a note, after a finished record with a TTL) and whether that record had taken in this object's apply
    (its command sequence at least the apply's): only then does the bridge delete the custom resource."""
    entry = domain.Applied(command_id="k8s.dataload.uid-1.1.abcdef012345", group="shoal.io", kind="DataLoad",
                           namespace="default", name="warm", sequence=10)

    def put(phase: str = "Complete", ttl: int | None = 0, sequence: int = 10, policy: str = "Once",
            clean: bool = False) -> tuple[str | None, bytes]:
        spec: dict[str, Any] = {"dataset": {"name": "demo"}}
        if ttl is not None:
            spec["ttlSecondsAfterFinished"] = ttl
        if not clean:
            spec["policy"] = policy
        record = {"kind": "DataClean" if clean else "DataLoad", "metadata": {"name": "warm"},
                  "clean" if clean else "load": spec, "commandSequence": sequence,
                  "status": {"phase": phase, "duration": "1s"}}
        return None, msgspec.json.encode(record)

    ttl_marker: tuple[str | None, bytes] = ("DEL", b"")
    expired = domain.expired_record([put("Executing"), put(), ttl_marker], entry)
    assert expired is not None and expired.status.phase == "Complete" and expired.status.duration == "1s"
    assert domain.expired_record([put("Failed", clean=True), ttl_marker], entry) is not None
    assert domain.expired_record([put(sequence=12), ttl_marker], entry) is not None  # a later apply of it
    assert domain.expired_record([put(sequence=9), ttl_marker], entry) is None  # an older object's (same name)
    assert domain.expired_record([put(), ("DEL", b'{"commandSequence":11}')], entry) is None  # a delete command
    assert domain.expired_record([put(), ("PURGE", b"")], entry) is None
    assert domain.expired_record([put(), ttl_marker, put()], entry) is None  # there again
    assert domain.expired_record([ttl_marker], entry) is None  # the record is not in the history
    assert domain.expired_record([put("Executing"), ttl_marker], entry) is None  # not finished
    assert domain.expired_record([put(ttl=None), ttl_marker], entry) is None  # no TTL
    assert domain.expired_record([put(policy="Cron"), ttl_marker], entry) is None  # never finished for good
    assert domain.expired_record([(None, b"not json"), ttl_marker], entry) is None
    assert domain.expired_record([put(), ttl_marker], None) is None  # not applied by the bridge
    assert domain.expired_record([], entry) is None  # never accepted
    assert domain.expires(DATALOAD) and not domain.expires(SHOAL_DATASET) and not domain.expires(ALLUXIO)
