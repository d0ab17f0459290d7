"""The webhook's pure translations: which datasets a pod uses, which reviews are malformed or left alone, and
JSON patches that, applied to the pod with the ``jsonpatch`` package, add exactly the wanted node affinity."""

from __future__ import annotations

import base64
import copy
import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import jsonpatch
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.events.schedule import DatasetUse, NodeScore, ScoreReply
from services.scheduler.admission import (
    MAX_PREFERRED_NODES,
    PREFERRED_KEY,
    REQUIRED_KEY,
    BadReview,
    Placement,
    Uses,
    affinity_patch,
    datasets_of,
    parse_review,
    placement,
    review_response,
)

FIXTURE = Path(__file__).parent.parent / "fixtures" / "scheduler" / "admission-review-pod-with-dataset.json"
HOST = "kubernetes.io/hostname"


def recorded() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}], **spec}}


def review(obj: Any, **request: Any) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "ns",
                        "operation": "CREATE", "object": obj, **request}}


def pvc(name: str) -> dict[str, Any]:
    return {"name": f"v-{name}", "persistentVolumeClaim": {"claimName": name}}


def reply(*scores: tuple[str, int], filtered: dict[str, str] | None = None, error: str = "") -> ScoreReply:
    return ScoreReply(scores=[NodeScore(node=node, score=score, cached_bytes=score) for node, score in scores],
                      filtered=filtered or {}, error=error)


def applied(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod after the patch, as the API server would apply it (it fails on a missing parent)."""
    return jsonpatch.apply_patch(obj, ops)


def hostname_terms(obj: dict[str, Any]) -> list[tuple[int, list[str]]]:
    terms = obj["spec"]["affinity"]["nodeAffinity"][PREFERRED_KEY]
    return [(t["weight"], t["preference"]["matchExpressions"][0]["values"]) for t in terms
            if t["preference"]["matchExpressions"][0]["key"] == HOST]


# --- which datasets ---

def test_the_recorded_pod_uses_its_pvc_in_the_request_namespace() -> None:
    r = parse_review(recorded())
    assert (r.uid, r.namespace, r.skip) == ("0d2b6a4e-5f1c-4c39-9d8e-7b1f3f0c2a11", "ml-team", "")
    assert datasets_of(r.pod, r.namespace).datasets == [DatasetUse(name="imagenet", namespace="ml-team")]


def test_fluid_sched_labels_name_datasets_and_required_mode() -> None:
    p = pod(volumes=[pvc("imagenet"), pvc("Not.A.Dataset"), {"name": "tmp", "emptyDir": {}}])
    p["metadata"]["labels"] = {
        "fluid.io/dataset.imagenet.sched": "required",  # Fluid's form: the pod's namespace
        "fluid.io/dataset.shared.labels.sched": "preferred",  # <namespace>.<name>
        "fluid.io/dataset.a.b.c.sched": "required",  # not a dataset: warned about
        "app": "x",
    }
    uses = datasets_of(p, "ns")
    assert uses.datasets == [DatasetUse(name="imagenet", namespace="ns", required=True),
                             DatasetUse(name="labels", namespace="shared")]
    assert [use.name for use in uses.required] == ["imagenet"]
    assert len(uses.warnings) == 1 and "fluid.io/dataset.a.b.c.sched" in uses.warnings[0]


def test_a_pod_without_datasets_uses_none() -> None:
    assert datasets_of(pod(), "ns") == Uses()


# --- malformed and left alone ---

@pytest.mark.parametrize(("body", "reason"), [
    ([], "the body must be an object"),
    ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}, "expected apiVersion"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request must be an object"),
    (review(pod(), uid=7), "request.uid must be a string"),
    (review(pod(), uid=""), "request.uid must not be empty"),
    (review("pod"), "request.object must be an object"),
    (review(pod(volumes={"a": 1})), "request.object.spec.volumes must be a list"),
    (review(pod(volumes=[{"persistentVolumeClaim": {"claimName": 3}}])),
     r"request.object.spec.volumes\[0\].persistentVolumeClaim.claimName must be a string"),
    (review(pod(affinity={"nodeAffinity": {PREFERRED_KEY: {"weight": 1}}})), f"nodeAffinity.{PREFERRED_KEY} must be"),
    (review(pod(affinity={"nodeAffinity": {REQUIRED_KEY: {"nodeSelectorTerms": ["x"]}}})),
     r"nodeSelectorTerms\[0\] must be an object"),
    (review({"metadata": {"labels": {"a": 1}}, "spec": {}}), r"labels\['a'\] must be a string"),
])
def test_malformed_reviews_name_the_field(body: Any, reason: str) -> None:
    with pytest.raises(BadReview, match=reason):
        parse_review(body)


def test_malformed_reasons_never_quote_a_value() -> None:
    secret = {"metadata": {}, "spec": {"nodeSelector": {"k": {"password": "hunter2"}}}}
    with pytest.raises(BadReview) as err:
        parse_review(review(secret))
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("body", "skip"), [
    (review(pod(), operation="UPDATE"), "operation UPDATE"),
    (review(pod(), kind={"group": "apps", "version": "v1", "kind": "Deployment"}), "not a pod"),
    (review(pod(), subResource="status"), "subresource"),
    (review(pod(nodeName="node-a")), "already bound"),
    (review({**pod(), "metadata": {"labels": {"fluid.io/enable-injection": "false"}}}), "enable-injection"),
    (review(pod(nodeSelector={HOST: "node-a"})), "places"),
    (review(pod(affinity={"nodeAffinity": {PREFERRED_KEY: [
        {"weight": 5, "preference": {"matchExpressions": [{"key": HOST, "operator": "In", "values": ["x"]}]}}]}})),
     "places"),
    (review(pod(affinity={"nodeAffinity": {REQUIRED_KEY: {"nodeSelectorTerms": [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["x"]}]}]}}})), "places"),
])
def test_pods_left_alone(body: dict[str, Any], skip: str) -> None:
    assert skip in parse_review(body).skip


def test_affinity_on_other_keys_is_not_a_reason_to_skip() -> None:
    zone = {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}
    zoned = pod(affinity={"nodeAffinity": {REQUIRED_KEY: {"nodeSelectorTerms": [zone]}}})
    assert parse_review(review(zoned)).skip == ""


# --- reply → terms ---

def test_placement_prefers_nodes_by_score_and_drops_zero() -> None:
    scores = reply(("node-b", 90), ("node-a", 40), ("node-d", 40), ("node-c", 0))
    wanted = placement(scores, Uses([DatasetUse(name="d")]))
    assert wanted.preferred == [(90, ["node-b"]), (40, ["node-a", "node-d"])]
    assert wanted.required_hosts == [] and wanted.warnings == []


def test_placement_names_at_most_the_best_nodes() -> None:
    many = [(f"n{i:03}", 100 - i) for i in range(MAX_PREFERRED_NODES + 10)]
    wanted = placement(reply(*many), Uses([DatasetUse(name="d")]))
    assert sum(len(nodes) for _, nodes in wanted.preferred) == MAX_PREFERRED_NODES
    assert wanted.preferred[0] == (100, ["n000"])


def test_placement_in_required_mode_allows_every_kept_node() -> None:
    uses = Uses([DatasetUse(name="d", required=True)])
    wanted = placement(reply(("node-b", 90), ("node-a", 10), filtered={"node-c": "holds none"}), uses)
    assert wanted.required_hosts == ["node-a", "node-b"]
    empty = placement(reply(filtered={"node-c": "holds none"}), uses)
    assert empty.empty and "no node caches default/d" in empty.warnings[0]


def test_required_datasets_each_cached_on_other_nodes_are_told_apart_from_uncached_ones() -> None:
    uses = Uses([DatasetUse(name="a", required=True), DatasetUse(name="b", required=True)])
    nowhere = reply(filtered={"node-a": "holds none of default/b", "node-b": "holds none of default/a"})
    apart = placement(nowhere, uses, apart={"default/a": ["node-a"], "default/b": ["node-b", "node-c"]})
    (warning,) = apart.warnings
    assert apart.empty and warning.startswith(
        "shoal: no one node caches all of default/a, default/b (default/a on node-a; default/b on node-b, node-c)")
    half = placement(nowhere, uses, apart={"default/a": ["node-a"], "default/b": []})
    assert half.warnings[0].startswith("shoal: no node caches default/b yet")
    # Not asked one by one (an answer failed): every required dataset is named, as before.
    assert placement(nowhere, uses).warnings[0].startswith("shoal: no node caches default/a, default/b yet")


def test_an_error_reply_places_nothing() -> None:
    assert placement(reply(("node-a", 90), error="unknown dataset"), Uses([DatasetUse(name="d")])).empty


# --- the patch, applied as the API server would ---

PREFER = Placement(preferred=[(90, ["node-b"]), (40, ["node-a"])])
REQUIRE = Placement(preferred=[(90, ["node-b"])], required_hosts=["node-a", "node-b"])
OTHER_PREFERRED = {"weight": 7, "preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}
OTHER_REQUIRED = {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}


@pytest.mark.parametrize("spec", [
    {},
    {"affinity": None},
    {"affinity": {}},
    {"affinity": {"podAntiAffinity": {"x": 1}}},
    {"affinity": {"nodeAffinity": {}}},
    {"affinity": {"nodeAffinity": {PREFERRED_KEY: [OTHER_PREFERRED]}}},
    {"affinity": {"nodeAffinity": {PREFERRED_KEY: None}}},
])
def test_preferred_terms_are_added_whatever_the_pod_has(spec: dict[str, Any]) -> None:
    before = pod(**spec)
    after = applied(before, affinity_patch(before, PREFER))
    assert hostname_terms(after) == [(90, ["node-b"]), (40, ["node-a"])]
    node_affinity = after["spec"]["affinity"]["nodeAffinity"]
    kept = (spec.get("affinity") or {}).get("nodeAffinity", {}).get(PREFERRED_KEY) or []
    assert node_affinity[PREFERRED_KEY][: len(kept)] == kept
    assert REQUIRED_KEY not in node_affinity
    if (spec.get("affinity") or {}).get("podAntiAffinity"):
        assert after["spec"]["affinity"]["podAntiAffinity"] == {"x": 1}
    assert after["spec"]["containers"] == before["spec"]["containers"]


def test_a_required_term_is_created_when_the_pod_has_none() -> None:
    before = pod()
    after = applied(before, affinity_patch(before, REQUIRE))
    terms = after["spec"]["affinity"]["nodeAffinity"][REQUIRED_KEY]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": HOST, "operator": "In", "values": ["node-a", "node-b"]}]}]


def test_a_required_expression_is_anded_into_each_existing_term() -> None:
    fields_only = {"matchFields": [{"key": "metadata.labels", "operator": "Exists"}]}
    empty: dict[str, Any] = {}
    before = pod(affinity={"nodeAffinity": {REQUIRED_KEY: {"nodeSelectorTerms": [
        copy.deepcopy(OTHER_REQUIRED), copy.deepcopy(fields_only), empty]}, PREFERRED_KEY: [OTHER_PREFERRED]}})
    after = applied(before, affinity_patch(before, REQUIRE))
    ours = {"key": HOST, "operator": "In", "values": ["node-a", "node-b"]}
    terms = after["spec"]["affinity"]["nodeAffinity"][REQUIRED_KEY]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [*OTHER_REQUIRED["matchExpressions"], ours]
    assert terms[1] == {**fields_only, "matchExpressions": [ours]}
    assert terms[2] == {}  # matches no node either way
    assert after["spec"]["affinity"]["nodeAffinity"][PREFERRED_KEY][0] == OTHER_PREFERRED


def test_a_selector_without_terms_gets_ours() -> None:
    before = pod(affinity={"nodeAffinity": {REQUIRED_KEY: {}}})
    after = applied(before, affinity_patch(before, REQUIRE))
    assert after["spec"]["affinity"]["nodeAffinity"][REQUIRED_KEY]["nodeSelectorTerms"][0]["matchExpressions"][0][
        "values"] == ["node-a", "node-b"]


def test_nothing_wanted_is_no_patch() -> None:
    assert affinity_patch(pod(), Placement()) == []


def test_the_response_echoes_the_uid_and_carries_the_patch_in_base64() -> None:
    ops = affinity_patch(pod(), PREFER)
    answer = review_response("u-1", ops, ["w"])
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "u-1" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == ops
    assert response["warnings"] == ["w"]
    assert review_response("u-2")["response"] == {"uid": "u-2", "allowed": True}


# --- any shape the API server accepts: the patch applies and keeps what was there ---

_ABSENT = object()
_EXPR = {"key": "gpu", "operator": "Exists"}
_FIELD = {"key": "metadata.labels", "operator": "Exists"}


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(_ABSENT), st.none(), value)


def _drop_absent(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not _ABSENT}


_terms_st = st.lists(st.builds(lambda e, f: _drop_absent({"matchExpressions": e, "matchFields": f}),
                               _maybe(st.lists(st.just(_EXPR), max_size=2)), _maybe(st.lists(st.just(_FIELD),
                                                                                             max_size=1))),
                     max_size=3)
_node_affinity_st = st.builds(
    lambda p, r: _drop_absent({PREFERRED_KEY: p, REQUIRED_KEY: r}),
    _maybe(st.lists(st.just(OTHER_PREFERRED), max_size=2)),
    _maybe(st.builds(lambda t: _drop_absent({"nodeSelectorTerms": t}), _maybe(_terms_st))))
_spec_st = st.builds(lambda a: _drop_absent({"affinity": a}),
                     _maybe(st.builds(lambda n: _drop_absent({"nodeAffinity": n, "podAffinity": {"x": 1}}),
                                      _maybe(_node_affinity_st))))


@given(_spec_st, st.booleans())
def test_the_patch_applies_to_any_affinity_and_keeps_it(spec: dict[str, Any], require: bool) -> None:
    before = {"metadata": {"name": "p"}, "spec": {"containers": [], **copy.deepcopy(spec)}}
    wanted = REQUIRE if require else PREFER
    after = applied(copy.deepcopy(before), affinity_patch(before, wanted))
    old = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    new = after["spec"]["affinity"]["nodeAffinity"]
    ours = [{"weight": w, "preference": {"matchExpressions": [{"key": HOST, "operator": "In", "values": hosts}]}}
            for w, hosts in wanted.preferred]
    assert new[PREFERRED_KEY] == (old.get(PREFERRED_KEY) or []) + ours
    old_terms = (old.get(REQUIRED_KEY) or {}).get("nodeSelectorTerms") or []
    if not require:
        assert new.get(REQUIRED_KEY) == old.get(REQUIRED_KEY)
        return
    expression = {"key": HOST, "operator": "In", "values": wanted.required_hosts}
    new_terms = new[REQUIRED_KEY]["nodeSelectorTerms"]
    if not old_terms:
        assert new_terms == [{"matchExpressions": [expression]}]
        return
    assert len(new_terms) == len(old_terms)
    for was, now in zip(old_terms, new_terms, strict=True):
        if not was.get("matchExpressions") and not was.get("matchFields"):
            assert now == was
        else:
            assert now["matchExpressions"] == (was.get("matchExpressions") or []) + [expression]
            assert now.get("matchFields") == was.get("matchFields")
    if isinstance(spec.get("affinity"), dict):
        assert after["spec"]["affinity"]["podAffinity"] == {"x": 1}


# --- memory: what a large review costs to read ---

def test_a_large_review_costs_what_is_read_not_its_size() -> None:
    """A review carries the whole pod (containers, env, managed fields...; the body cap is 8 MiB) and the webhook
    reads its metadata, volumes and placement only: read into those, a large review costs a fraction of what it
    decoded to generically, and the answer is the same."""
    big = pod(volumes=[pvc("imagenet")], affinity={"nodeAffinity": {PREFERRED_KEY: [OTHER_PREFERRED]}})
    big["metadata"]["managedFields"] = [{"manager": f"m{i}", "fieldsV1": {f"f:k{j}": {} for j in range(50)}}
                                        for i in range(200)]
    big["spec"]["containers"] = [{"name": f"c{i}", "image": "registry.example/team/image:v1",
                                  "env": [{"name": f"VAR_{j}", "value": f"value-{i}-{j}"} for j in range(200)]}
                                 for i in range(100)]
    body = msgspec.json.encode(review(big))
    gc.collect()
    tracemalloc.start()
    try:
        generic = msgspec.json.decode(body)
        generic_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del generic
    gc.collect()
    tracemalloc.start()
    try:
        read = parse_review(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak * 8 < generic_peak, f"{peak >> 10} KiB read typed, {generic_peak >> 10} KiB generically"
    assert peak < len(body) // 8, f"{peak >> 10} KiB to read a body of {len(body) >> 10} KiB"
    assert datasets_of(read.pod, read.namespace).datasets == [DatasetUse(name="imagenet", namespace="ns")]
    assert affinity_patch(read.pod, PREFER) == affinity_patch(big, PREFER)
