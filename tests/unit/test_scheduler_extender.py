"""The extender's pure translations: ExtenderArgs in Go's spelling (or any case), filter results in the form the
candidates came in, priorities on the 0..10 scale, and clear errors for what is not an ExtenderArgs."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.events.schedule import Candidate, DatasetUse, NodeScore, ScoreReply
from services.scheduler.extender import (
    MAX_EXTENDER_PRIORITY,
    BadArgs,
    extender_score,
    filter_result,
    parse_args,
    priorities,
)

FIXTURE = Path(__file__).parent.parent / "fixtures" / "scheduler" / "extender-args-nodes.json"


def recorded() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def by_names(*names: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Pod": {"metadata": {"name": "p", "namespace": "ns", "labels": labels or {}},
                    "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}},
            "NodeNames": list(names)}


REQUIRED = {"fluid.io/dataset.data.sched": "required"}


def test_the_recorded_args_give_the_pods_datasets_and_labelled_candidates() -> None:
    args = parse_args(recorded())
    assert args.namespace == "ml-team"
    assert args.uses.datasets == [DatasetUse(name="imagenet", namespace="ml-team", required=True)]
    assert [c.name for c in args.candidates] == ["node-a", "node-b", "node-c"]
    assert args.candidates[1].labels["topology.kubernetes.io/zone"] == "eu-1b"
    assert args.node_objects is not None and len(args.node_objects) == 3


def test_keys_are_read_case_insensitively_as_go_does() -> None:
    lower = {"pod": {"metadata": {"namespace": "ns"}}, "nodenames": ["node-a"]}
    args = parse_args(lower)
    assert args.candidates == [Candidate(name="node-a")] and args.node_objects is None


def test_an_empty_node_list_as_go_encodes_it_is_no_candidates_not_malformed() -> None:
    # Go's encoding/json writes a NodeList with no items (a nil slice, no omitempty) as "items": null: that is
    # an empty candidate list (answered with empty results), not a malformed request answered 400.
    for required in ({}, REQUIRED):
        body = {**by_names(labels=required), "Nodes": {"metadata": {}, "items": None}, "NodeNames": None}
        args = parse_args(body)
        assert (args.candidates, args.node_objects) == ([], [])
        assert filter_result(args, ScoreReply())["Nodes"]["items"] == []
        assert priorities(args, ScoreReply()) == []


@pytest.mark.parametrize(("body", "reason"), [
    ([], "the body must be an ExtenderArgs object"),
    ({"NodeNames": ["a"]}, "Pod must be an object"),
    ({"Pod": {}, "Nodes": None, "NodeNames": None}, "neither Nodes nor NodeNames"),
    ({"Pod": {}, "Nodes": {"items": {"a": 1}}}, "Nodes must be a NodeList"),
    ({"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}, r"Nodes.items\[0\].metadata.name"),
    ({"Pod": {}, "Nodes": {"items": [{"metadata": {"name": "a", "labels": {"x": 1}}}]}}, "labels must map"),
    ({"Pod": {}, "NodeNames": ["a", 3]}, "NodeNames must be a list of node names"),
    ({"Pod": {"metadata": {"namespace": 5}}, "NodeNames": ["a"]}, "Pod.metadata"),
    ({"Pod": {"spec": {"volumes": "x"}}, "NodeNames": ["a"]}, "Pod: spec.volumes must be a list"),
])
def test_malformed_args_name_the_field(body: Any, reason: str) -> None:
    with pytest.raises(BadArgs, match=reason):
        parse_args(body)


def test_filter_keeps_every_node_when_nothing_is_required() -> None:
    args = parse_args(by_names("node-a", "node-b"))
    result = filter_result(args, None)
    assert result["NodeNames"] == ["node-a", "node-b"] and result["FailedNodes"] == {} and result["Error"] == ""
    assert "Nodes" not in result


def test_filter_in_required_mode_keeps_the_nodes_that_hold_the_cache() -> None:
    args = parse_args(by_names("node-a", "node-b", "node-c", labels=REQUIRED))
    reply = ScoreReply(scores=[NodeScore(node="node-b", score=80)], filtered={"node-a": "holds none of ns/data"})
    result = filter_result(args, reply)
    assert result["NodeNames"] == ["node-b"] and result["Error"] == ""
    assert result["FailedNodes"]["node-a"] == "holds none of ns/data"
    assert "ns/data" in result["FailedNodes"]["node-c"]  # not in the reply at all: the default reason
    assert result["FailedAndUnresolvableNodes"] == result["FailedNodes"]


def test_filter_answers_node_objects_when_it_was_sent_node_objects() -> None:
    args = parse_args(recorded())
    reply = ScoreReply(scores=[NodeScore(node="node-c", score=30), NodeScore(node="node-a", score=90)])
    result = msgspec.json.decode(msgspec.json.encode(filter_result(args, reply)))  # as answered: the JSON
    assert [node["metadata"]["name"] for node in result["Nodes"]["items"]] == ["node-a", "node-c"]
    assert result["Nodes"]["items"][0] == recorded()["Nodes"]["items"][0]  # the object as sent, not a summary
    assert set(result["FailedNodes"]) == {"node-b"}


STARTING = "the scheduler is starting (inventory snapshots not all read yet); ask again shortly"


@pytest.mark.parametrize(("reply", "failure", "says"), [
    (None, "no answer within 0.5 s", "no answer within 0.5 s"),
    (ScoreReply(error=STARTING), "", STARTING),
    (ScoreReply(error="too many candidates: 5001 (at most 5000)"), "", "too many candidates"),
])
def test_filter_errors_when_the_scheduler_cannot_answer_a_required_pod(reply: ScoreReply | None, failure: str,
                                                                       says: str) -> None:
    result = filter_result(parse_args(by_names("node-a", labels=REQUIRED)), reply, failure)
    assert says in result["Error"] and result["NodeNames"] is None


def test_a_required_dataset_that_does_not_exist_leaves_every_node_out_saying_so() -> None:
    """A typo in the required label, a dataset never applied or deleted: every node is left out with one reason
    naming the dataset (kube-scheduler adds them up in the pod's FailedScheduling event), unresolvable, and no
    ``Error``: the extender is ``ignorable``, so an error let the pod start on any node, away from its data."""
    unknown = ScoreReply(error="unknown dataset ns/data")
    reason = "dataset ns/data does not exist (required)"
    result = filter_result(parse_args(by_names("node-a", "node-b", labels=REQUIRED)), unknown)
    assert result == {"NodeNames": [], "FailedNodes": {"node-a": reason, "node-b": reason},
                      "FailedAndUnresolvableNodes": {"node-a": reason, "node-b": reason}, "Error": ""}
    # Sent node objects: none is answered back.
    body = recorded()
    result = msgspec.json.decode(msgspec.json.encode(filter_result(parse_args(body), ScoreReply(
        error="unknown dataset ml-team/imagenet"))))
    assert result["Nodes"]["items"] == [] and result["NodeNames"] == [] and result["Error"] == ""
    assert set(result["FailedAndUnresolvableNodes"]) == {"node-a", "node-b", "node-c"}
    assert result["FailedNodes"]["node-b"] == "dataset ml-team/imagenet does not exist (required)"


def test_an_unknown_dataset_the_pod_only_prefers_stays_an_error() -> None:
    """Only what the pod requires is enforced: an unknown dataset it only prefers is an error, never read as "no
    node holds it" (the HTTP front drops such datasets from the question before it gets here), and a pod that
    requires nothing is not filtered at all."""
    both = {**REQUIRED, "fluid.io/dataset.other.sched": "true"}
    result = filter_result(parse_args(by_names("node-a", labels=both)), ScoreReply(error="unknown dataset ns/other"))
    assert "unknown dataset ns/other" in result["Error"] and result["FailedNodes"] == {}
    result = filter_result(parse_args(by_names("node-a")), ScoreReply(error="unknown dataset ns/data"))
    assert result["NodeNames"] == ["node-a"] and result["FailedNodes"] == {} and result["Error"] == ""


def test_a_required_reference_whose_source_does_not_exist_leaves_every_node_out() -> None:
    """The scheduler asks about a ``dataset://`` reference's source; when that does not exist, its error names the
    source, which is none of the pod's own datasets: the reason says whose source it is."""
    result = filter_result(parse_args(by_names("node-a", labels=REQUIRED)), ScoreReply(error="unknown dataset "
                                                                                            "team-a/src"))
    reason = "dataset team-a/src, the source of a dataset:// reference the pod requires, does not exist (required)"
    assert result["FailedNodes"] == result["FailedAndUnresolvableNodes"] == {"node-a": reason}
    assert result["NodeNames"] == [] and result["Error"] == ""


def test_priorities_scale_scores_to_the_extender_range() -> None:
    args = parse_args(by_names("node-a", "node-b", "node-c", "node-d"))
    reply = ScoreReply(scores=[NodeScore(node="node-b", score=100), NodeScore(node="node-a", score=3),
                               NodeScore(node="node-c", score=0)])
    assert priorities(args, reply) == [{"Host": "node-a", "Score": 1}, {"Host": "node-b", "Score": 10},
                                       {"Host": "node-c", "Score": 0}, {"Host": "node-d", "Score": 0}]
    assert priorities(args, None) == [{"Host": n, "Score": 0} for n in ("node-a", "node-b", "node-c", "node-d")]
    assert all(p["Score"] == 0 for p in priorities(args, ScoreReply(scores=reply.scores, error="x")))


@given(st.integers(0, 100), st.integers(0, 100))
def test_extender_score_keeps_order_and_range(a: int, b: int) -> None:
    assert 0 <= extender_score(a) <= MAX_EXTENDER_PRIORITY
    if a <= b:
        assert extender_score(a) <= extender_score(b)
    assert (extender_score(a) == 0) == (a == 0)


# --- memory: what a large body costs to read ---

def node_object(index: int) -> dict[str, Any]:
    """A Node object as kube-scheduler sends it with ``nodeCacheCapable: false`` (~7 KiB of JSON): most of it is
    status, images and managed fields, which the extender never reads."""
    name = f"ip-10-0-{index // 250}-{index % 250}.ec2.internal"
    return {
        "metadata": {
            "name": name, "uid": f"6f1c{index:08x}-2d4b-4e8f-b6a1-7f0c5d3e2b19", "resourceVersion": str(index),
            "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": f"us-east-1{'abc'[index % 3]}",
                       "topology.kubernetes.io/region": "us-east-1", "node.kubernetes.io/instance-type": "m5.2xlarge",
                       "kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            "managedFields": [{"manager": f"kubelet-{k}", "operation": "Update", "apiVersion": "v1",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {f"f:condition-{c}": {"f:lastHeartbeatTime": {}, "f:reason": {},
                                                                              "f:status": {}} for c in range(6)}}}
                              for k in range(3)],
        },
        "spec": {"podCIDR": f"10.244.{index % 250}.0/24", "providerID": f"aws:///us-east-1a/i-{index:017x}"},
        "status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "58"},
            "allocatable": {"cpu": "7910m", "memory": "31Gi", "pods": "58"},
            "conditions": [{"type": t, "status": "False", "reason": f"Kubelet{t}", "message": f"kubelet has no {t}",
                            "lastHeartbeatTime": "2026-01-01T00:00:00Z"} for t in ("Memory", "Disk", "PID", "Ready")],
            "addresses": [{"type": "InternalIP", "address": f"10.0.{index // 250}.{index % 250}"},
                          {"type": "Hostname", "address": name}],
            "images": [{"names": [f"registry.example/team/image-{i}@sha256:{i:064x}",
                                  f"registry.example/team/image-{i}:v{i}"], "sizeBytes": 100_000_000 + i}
                       for i in range(20)],
        },
    }


def peak_bytes(read: Any, body: bytes) -> tuple[Any, int]:
    """What ``read(body)`` returns, and the most memory it held at once (the body itself not counted)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = read(body)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_node_list_costs_what_is_kept_not_its_size() -> None:
    """With the body cap at 32 MiB, a body of full Node objects decoded generically became a dict tree of many times
    its size (each of up to 8 requests at once); read into the kept fields, it costs a fraction of the body: a view
    of each node object (answered back by the filter) and each node's name and labels."""
    nodes = 1500
    body = msgspec.json.encode({"Pod": {"metadata": {"namespace": "ml", "labels": REQUIRED},
                                        "spec": {"volumes": [{"persistentVolumeClaim": {"claimName": "data"}}]}},
                                "Nodes": {"apiVersion": "v1", "kind": "NodeList",
                                          "items": [node_object(i) for i in range(nodes)]}})
    generic, generic_peak = peak_bytes(msgspec.json.decode, body)
    del generic
    args, peak = peak_bytes(parse_args, body)
    assert len(args.candidates) == nodes and args.candidates[1].labels["topology.kubernetes.io/zone"] == "us-east-1b"
    assert args.uses.required == [DatasetUse(name="data", namespace="ml", required=True)]
    assert peak * 8 < generic_peak, f"{peak >> 10} KiB read typed, {generic_peak >> 10} KiB generically"
    assert peak < len(body) // 2, f"{peak >> 10} KiB to read a body of {len(body) >> 10} KiB"
    # Answered back as sent.
    answered = msgspec.json.decode(msgspec.json.encode(filter_result(args, ScoreReply(
        scores=[NodeScore(node=c.name, score=1) for c in args.candidates]))))
    assert answered["Nodes"]["items"] == msgspec.json.decode(body)["Nodes"]["items"]
