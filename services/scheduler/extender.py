"""The kube-scheduler extender's translations, pure: ``ExtenderArgs`` → the pod's datasets and the candidate
nodes, and the scheduler's ``ScoreReply`` → an ``ExtenderFilterResult`` or a ``HostPriorityList``. ``http.py``
asks the scheduler and serves the routes.

The wire format is k8s.io/kube-scheduler/extender/v1, whose Go structs have no JSON tags: kube-scheduler
sends ``Pod``, ``Nodes`` (a NodeList, when the extender is configured with ``nodeCacheCapable: false``) or
``NodeNames`` (when ``true``). Go decodes keys case-insensitively, so these keys are read the same way and
answered in Go's spelling.

- Filter: only a pod with a required dataset (Fluid's ``fluid.io/dataset.<name>.sched: required``) is
  filtered; it keeps the nodes the scheduler kept (those that hold the cache) and lists the others with the
  scheduler's reason (``domain.filtered_reason``: why the node holds none, in words that do not name it, so
  kube-scheduler's event adds equal ones up) in ``FailedNodes`` and ``FailedAndUnresolvableNodes`` (preempting
  pods does not bring a cache, and schedulers older than that field read ``FailedNodes``). The answer repeats the
  candidates in the form they came in: ``Nodes`` with the full node objects when they were sent (kube-scheduler
  reads only ``Nodes`` then), ``NodeNames`` always. A required dataset that does not exist (never applied, a
  typo, deleted; or the source of a required ``dataset://`` reference) leaves every node out with one reason
  naming it (``domain.missing_reason``), not an ``Error``: kube-scheduler ignores the ``Error`` of an
  ``ignorable`` extender and would start the pod anywhere, away from data it requires, and without a word; this
  way the pod stays Pending, its FailedScheduling event says why, and it is scheduled as any required pod once the
  dataset exists and is cached. When the scheduler cannot answer otherwise (starting, too slow, bad input),
  ``Error`` says why (the configuration's ``ignorable: true`` then lets the pod be scheduled without the extender).
- Prioritize: every candidate gets ``Score`` 0..``MAX_EXTENDER_PRIORITY``, the scheduler's 0..100 score
  divided by ten and rounded up (a node that holds any of the data never ties with one that holds none).
  A pod that uses no dataset is scored too: the scheduler ranks nodes without cache first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from libs.events.schedule import Candidate, ScoreReply

from . import domain, kube
from .admission import BadReview, Uses, datasets_of

# k8s.io/kube-scheduler/extender/v1 MaxExtenderPriority; kube-scheduler multiplies by the extender's weight and by
# MaxNodeScore / MaxExtenderPriority (100 / 10).
MAX_EXTENDER_PRIORITY = 10
# The scheduler's scores are 0..100 (libs/events/schedule.py).
MAX_SCORE = 100


class BadArgs(ValueError):
    """The request is not an ExtenderArgs of the documented shape; the message says which field."""


@dataclass(frozen=True)
class Args:
    """One ExtenderArgs: the pod's namespace and datasets, and the candidate nodes (with their objects, when
    kube-scheduler sent them)."""

    namespace: str
    uses: Uses
    candidates: list[Candidate]
    # The node objects as sent, when they were (the filter answers the kept ones back unchanged).
    node_objects: list[msgspec.Raw] | None


def parse_args(body: Any) -> Args:
    """Read one ExtenderArgs, as sent (JSON bytes) or already decoded; raise ``BadArgs`` when it is not one (and a
    ``libs.events.common.DECODE_ERRORS`` when the bytes are not JSON). Only what is read of it is decoded
    (``kube``): the pod's metadata and volumes, each node's name and labels; the node objects are kept as sent
    (``msgspec.Raw`` views of the body) for the filter's answer."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        body = msgspec.json.encode(body)  # one way in: the checks below see what a request's bytes decode to
    top = kube.EXTENDER_ARGS.decode(body)
    if not isinstance(top, dict):
        raise BadArgs(f"the body must be an ExtenderArgs object, not {type(top).__name__}")
    fields: dict[str, msgspec.Raw] = {}
    for key, value in top.items():
        fields.setdefault(key.lower(), value)  # a Go struct without JSON tags: any case, the first match
    raw_pod = fields.get("pod")
    pod = kube.POD.decode(raw_pod) if raw_pod is not None else None
    if not isinstance(pod, Mapping):
        raise BadArgs("Pod must be an object (the pod being scheduled)")
    metadata = pod.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("namespace") or "", str):
        raise BadArgs("Pod.metadata must be an object with a string namespace")
    namespace = metadata.get("namespace") or "default"
    try:
        uses = datasets_of(pod, namespace)
    except BadReview as err:
        raise BadArgs(f"Pod: {err}") from err
    raw_nodes, raw_names = fields.get("nodes"), fields.get("nodenames")
    nodes = kube.NODE_LIST.decode(raw_nodes) if raw_nodes is not None else None
    if nodes is not None:
        items = nodes.get("items") if isinstance(nodes, dict) else None
        if isinstance(nodes, dict) and "items" in nodes and items is None:
            items = []  # Go writes a NodeList without items (a nil slice, no omitempty) as "items": null
        if not isinstance(items, list):
            raise BadArgs("Nodes must be a NodeList with an items list")
        candidates = [_candidate(kube.NODE.decode(node), f"Nodes.items[{i}]")
                      for i, node in enumerate(items)]
        return Args(namespace, uses, candidates, items)
    names = kube.NODE_NAMES.decode(raw_names) if raw_names is not None else None
    if isinstance(names, list) and all(isinstance(name, str) and name for name in names):
        return Args(namespace, uses, [Candidate(name=name) for name in names], None)
    if names is not None:
        raise BadArgs("NodeNames must be a list of node names")
    raise BadArgs("neither Nodes nor NodeNames is set: no candidate nodes")


def _candidate(node: Any, where: str) -> Candidate:
    metadata = node.get("metadata") if isinstance(node, Mapping) else None
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(metadata, Mapping) or not isinstance(name, str) or not name:
        raise BadArgs(f"{where}.metadata.name must be a node name")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise BadArgs(f"{where}.metadata.labels must map strings to strings")
    return Candidate(name=name, labels=dict(labels))


def _names(uses: Sequence[Any]) -> str:
    return ", ".join(f"{use.namespace}/{use.name}" for use in uses)


def missing_required(uses: Uses, error: str) -> str:
    """Why every node is left out when the scheduler's ``error`` says a dataset the pod requires does not exist
    (``domain.missing_reason``); empty for any other error, and for a dataset the pod only prefers (that stays an
    error: a typo must not look like "no node holds it").

    ``error`` answers the question ``http.ask_known`` asks: the pod's required datasets and only those of its
    preferred ones the scheduler knows, so an unknown dataset it names that is none of the pod's is the source of a
    ``dataset://`` reference the pod requires (the scheduler asks about a reference's source)."""
    key = domain.unknown_in(error)
    if key is None:
        return ""
    if key in {(use.namespace, use.name) for use in uses.required}:
        return domain.missing_reason(key)
    if key in {(use.namespace, use.name) for use in uses.datasets}:
        return ""
    return domain.missing_reason(key, source=True)


def filter_result(args: Args, reply: ScoreReply | None, failure: str = "") -> dict[str, Any]:
    """The ExtenderFilterResult for ``args``. A pod that requires no dataset keeps every node (the scheduler
    need not be asked: ``reply`` is then ignored); otherwise ``reply`` is the scheduler's answer, or None with
    ``failure`` saying why there is none. A required dataset that does not exist (``missing_required``) leaves
    every node out, with the same reason; any other error is the result's ``Error``."""
    required = args.uses.required
    names = [c.name for c in args.candidates]
    failed: dict[str, str] = {}
    if required:
        problem = failure or (reply.error if reply is not None else "no answer")
        missing = missing_required(args.uses, reply.error) if reply is not None and not failure else ""
        if missing:
            failed = dict.fromkeys(names, missing)
        elif problem or reply is None:
            return {"Nodes": None, "NodeNames": None, "FailedNodes": {}, "FailedAndUnresolvableNodes": {},
                    "Error": f"shoal scheduler: {problem}"}
        else:
            kept = {score.node for score in reply.scores}
            more = f" and {len(required) - 1} more" if len(required) > 1 else ""
            default = (f"holds no cache of {_names(required[:1])}{more}, which the pod requires "
                       "(fluid.io/dataset.*.sched)")
            failed = {name: reply.filtered.get(name) or default for name in names if name not in kept}
    passed = [name for name in names if name not in failed]
    result: dict[str, Any] = {"NodeNames": passed, "FailedNodes": failed, "FailedAndUnresolvableNodes": failed,
                              "Error": ""}
    if args.node_objects is not None:
        result["Nodes"] = {"apiVersion": "v1", "kind": "NodeList", "metadata": {},
                           "items": [node for node, name in zip(args.node_objects, names, strict=True)
                                     if name not in failed]}
    return result


def extender_score(score: int) -> int:
    """0..100 → 0..10, rounded up so any cached share counts, clamped to the extender's range."""
    return max(0, min(MAX_EXTENDER_PRIORITY, math.ceil(score * MAX_EXTENDER_PRIORITY / MAX_SCORE)))


def priorities(args: Args, reply: ScoreReply | None) -> list[dict[str, Any]]:
    """The HostPriorityList: every candidate, in the order sent; 0 where the scheduler gave no score (no
    answer, an error, a node it does not know)."""
    scores = {s.node: s.score for s in reply.scores} if reply is not None and not reply.error else {}
    return [{"Host": c.name, "Score": extender_score(scores.get(c.name, 0))} for c in args.candidates]


def error_body(reason: str) -> dict[str, Any]:
    """The body of a 400 answer: the filter result's ``Error`` field, which is also what a person reads."""
    return {"Error": reason}
