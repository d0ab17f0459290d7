"""The mutating admission webhook's translations, pure: an AdmissionReview v1 of a Pod → the datasets the pod
uses (a ``ScoreRequest``), and the scheduler's ``ScoreReply`` → node-affinity terms as an RFC 6902 JSON patch
in the AdmissionReview response. No I/O and no clock: ``http.py`` asks the scheduler and serves HTTPS.

What a pod uses: the PVC of each ``persistentVolumeClaim`` volume (a dataset's PVC is named after the dataset,
in the pod's namespace; a claim name that cannot be a dataset name is not one), and every dataset named by
Fluid's pod label ``fluid.io/dataset.<name>.sched`` (the dataset in the pod's namespace) or
``fluid.io/dataset.<namespace>.<name>.sched``; the value ``required`` makes the dataset required.

What the patch says: preferred terms on ``kubernetes.io/hostname``, one per distinct score among the best
``MAX_PREFERRED_NODES`` nodes, weight = the node's score (1..100, Kubernetes' range for preferred weights); in
required mode also a required expression ``kubernetes.io/hostname In [every node the reply kept]``, ANDed into
each existing required term. Parents that the pod lacks (``/spec/affinity``, ``/nodeAffinity``, the term
lists) are created by the patch; existing terms are kept and ours appended.

Left alone (allowed, no patch): operations other than CREATE (a pod's affinity cannot change after creation),
objects other than pods, pods already bound to a node, pods with ``fluid.io/enable-injection: "false"``, pods
that already place themselves by host name (a node affinity expression or node selector on
``kubernetes.io/hostname``, or a ``metadata.name`` field selector), and pods that use no dataset: steering
non-data pods away from cache nodes is the extender's job at scheduling time, where it sees the cache as it
is, rather than a term frozen into every pod of the cluster at creation.

What the warnings say (``response.warnings``, shown by kubectl; the pod is always admitted): a label that names
no dataset; a required dataset the scheduler does not know (``http.py``); a required dataset no node caches yet,
or required datasets each cached on other nodes than the rest (no one node caches them all);
and a required dataset whose every holder the pod's own ``nodeSelector`` or required node affinity excludes
(judged by the labels the holders' agents report, so it is never said wrongly, but may go unsaid when the agents
report too few labels), also for a pod that places itself by host name (nothing is added to it).

A review that is not a v1 AdmissionReview of the documented shape raises ``BadReview`` with a reason naming
the field (never its value: a pod spec may carry secrets in env values).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from libs.affinity import HOSTNAME_LABEL, NODE_NAME_FIELD, surely_excludes
from libs.events.common import DNS1035_LABEL, DNS1123_LABEL
from libs.events.schedule import DatasetUse, ScoreReply

from . import kube

ADMISSION_API = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"
# Fluid's pod label (pkg/common/label.go, LabelAnnotationPodSchedRegex): the middle part names the dataset; we
# also accept "<namespace>.<name>" there (namespaces and dataset names never contain a dot, so it is unambiguous).
SCHED_LABEL = re.compile(r"^fluid\.io/dataset\.([A-Za-z0-9.-]*)\.sched$")
SCHED_REQUIRED = "required"
# Fluid's opt-out label for its webhook; Shoal's webhook honours it too.
INJECTION_LABEL = "fluid.io/enable-injection"
PREFERRED_KEY = "preferredDuringSchedulingIgnoredDuringExecution"
REQUIRED_KEY = "requiredDuringSchedulingIgnoredDuringExecution"
# The best nodes are named in preferred terms; more names make every pod object heavier and add little, since
# nodes far down the list hold little of the data (the extender, if configured, still ranks all of them).
MAX_PREFERRED_NODES = 16
# Holders a warning names (the API server may cut a warning over 256 characters): the rest are counted.
SHOWN_HOLDERS = 3
# Kubernetes' range for a preferred scheduling term's weight.
MIN_WEIGHT, MAX_WEIGHT = 1, 100


class BadReview(ValueError):
    """The request is not an AdmissionReview v1 of the documented shape; the message says which field."""


@dataclass(frozen=True)
class Review:
    """What the webhook needs of one AdmissionReview request."""

    uid: str
    namespace: str
    pod: Mapping[str, Any]
    # Set when the pod is to be left alone, saying why (for the log line).
    skip: str = ""
    # The pod places itself by host name: nothing is added, but a required dataset it keeps away from is said.
    placed: bool = False


@dataclass(frozen=True)
class Uses:
    """The datasets a pod uses, and warnings for labels that cannot name one."""

    datasets: list[DatasetUse] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def required(self) -> list[DatasetUse]:
        return [use for use in self.datasets if use.required]


def _object(value: Any, where: str, *, optional: bool = True) -> Mapping[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise BadReview(f"{where} must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadReview(f"{where} must be a list, not {type(value).__name__}")
    return value


def _string(value: Any, where: str, *, optional: bool = True) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadReview(f"{where} must be a string, not {type(value).__name__}")
    return value


def _labels(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    labels = _object(metadata.get("labels"), f"{where}.labels")
    for key, value in labels.items():
        _string(value, f"{where}.labels[{key!r}]", optional=False)
    return dict(labels)


def parse_review(body: Any) -> Review:
    """Read one AdmissionReview, as sent (JSON bytes) or already decoded; raise ``BadReview`` when it is not one
    (and a ``libs.events.common.DECODE_ERRORS`` when the bytes are not JSON). Only what is read of it is decoded
    (``kube``): ``Review.pod`` holds the pod's metadata, volumes, node selector and node affinity, nothing else."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        body = msgspec.json.encode(body)  # one way in: the checks below see what a request's bytes decode to
    review = _object(kube.REVIEW.decode(body), "the body", optional=False)
    if review.get("apiVersion") != ADMISSION_API or review.get("kind") != ADMISSION_KIND:
        raise BadReview(f"expected apiVersion {ADMISSION_API} and kind {ADMISSION_KIND}, got "
                        f"{str(review.get('apiVersion'))[:64]!r} and {str(review.get('kind'))[:64]!r}")
    request = _object(review.get("request"), "request", optional=False)
    uid = _string(request.get("uid"), "request.uid", optional=False)
    if not uid:
        raise BadReview("request.uid must not be empty")
    kind = _object(request.get("kind"), "request.kind", optional=False)
    _string(kind.get("kind"), "request.kind.kind", optional=False)
    operation = _string(request.get("operation"), "request.operation", optional=False)
    namespace = _string(request.get("namespace"), "request.namespace")
    if kind.get("group", "") != "" or kind.get("kind") != "Pod":
        return Review(uid, namespace, {}, skip=f"not a pod ({kind.get('group', '')}/{kind.get('kind')})")
    if operation != "CREATE":
        return Review(uid, namespace, {}, skip=f"operation {operation}: a pod's affinity is set at creation")
    if _string(request.get("subResource"), "request.subResource"):
        return Review(uid, namespace, {}, skip="a subresource, not the pod")
    pod = _object(request.get("object"), "request.object", optional=False)
    metadata = _object(pod.get("metadata"), "request.object.metadata")
    # Controller-made pods may lack metadata.namespace; the request's namespace is the one the pod is created in.
    namespace = namespace or _string(metadata.get("namespace"), "request.object.metadata.namespace") or "default"
    labels = _labels(metadata, "request.object.metadata")
    spec = _object(pod.get("spec"), "request.object.spec")
    _check_affinity_shape(spec)
    if _string(spec.get("nodeName"), "request.object.spec.nodeName"):
        return Review(uid, namespace, pod, skip="already bound to a node")
    if labels.get(INJECTION_LABEL) == "false":
        return Review(uid, namespace, pod, skip=f"{INJECTION_LABEL}=false")
    if places_itself(spec):
        return Review(uid, namespace, pod, skip=f"places itself by {HOSTNAME_LABEL}", placed=True)
    return Review(uid, namespace, pod)


def _check_affinity_shape(spec: Mapping[str, Any]) -> None:
    """Every part of the pod's node affinity that the patch may extend has the documented shape."""
    where = "request.object.spec.affinity"
    affinity = _object(spec.get("affinity"), where)
    node_affinity = _object(affinity.get("nodeAffinity"), f"{where}.nodeAffinity")
    for i, term in enumerate(_list(node_affinity.get(PREFERRED_KEY), f"{where}.nodeAffinity.{PREFERRED_KEY}")):
        path = f"{where}.nodeAffinity.{PREFERRED_KEY}[{i}]"
        preference = _object(_object(term, path, optional=False).get("preference"), f"{path}.preference")
        _check_term(preference, f"{path}.preference")
    required = _object(node_affinity.get(REQUIRED_KEY), f"{where}.nodeAffinity.{REQUIRED_KEY}")
    terms_where = f"{where}.nodeAffinity.{REQUIRED_KEY}.nodeSelectorTerms"
    for i, term in enumerate(_list(required.get("nodeSelectorTerms"), terms_where)):
        _check_term(_object(term, f"{terms_where}[{i}]", optional=False), f"{terms_where}[{i}]")
    node_selector = _object(spec.get("nodeSelector"), "request.object.spec.nodeSelector")
    for key, value in node_selector.items():
        _string(value, f"request.object.spec.nodeSelector[{key!r}]", optional=False)
    for i, volume in enumerate(_list(spec.get("volumes"), "request.object.spec.volumes")):
        where_volume = f"request.object.spec.volumes[{i}]"
        claim = _object(_object(volume, where_volume, optional=False).get("persistentVolumeClaim"),
                        f"{where_volume}.persistentVolumeClaim")
        _string(claim.get("claimName"), f"{where_volume}.persistentVolumeClaim.claimName")


def _check_term(term: Mapping[str, Any], where: str) -> None:
    for part in ("matchExpressions", "matchFields"):
        for i, expression in enumerate(_list(term.get(part), f"{where}.{part}")):
            _string(_object(expression, f"{where}.{part}[{i}]", optional=False).get("key"),
                    f"{where}.{part}[{i}].key")


def _terms(spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The pod's node affinity, its preferred terms' preferences and its required terms (shape checked)."""
    node_affinity = _object(_object(spec.get("affinity"), "").get("nodeAffinity"), "")
    preferred = [_object(term.get("preference"), "") for term in _list(node_affinity.get(PREFERRED_KEY), "")]
    required = list(_list(_object(node_affinity.get(REQUIRED_KEY), "").get("nodeSelectorTerms"), ""))
    return node_affinity, preferred, required


def places_itself(spec: Mapping[str, Any]) -> bool:
    """Whether the pod already chooses nodes by host name: then its author decided, and the webhook adds nothing."""
    if HOSTNAME_LABEL in _object(spec.get("nodeSelector"), ""):
        return True
    _, preferred, required = _terms(spec)
    for term in [*preferred, *required]:
        if any(expression.get("key") == HOSTNAME_LABEL for expression in _list(term.get("matchExpressions"), "")):
            return True
        if any(expression.get("key") == NODE_NAME_FIELD for expression in _list(term.get("matchFields"), "")):
            return True
    return False


def _dataset_name(value: str) -> bool:
    return bool(DNS1035_LABEL.fullmatch(value)) and len(value) <= 63


def datasets_of(pod: Mapping[str, Any], namespace: str) -> Uses:
    """The datasets ``pod`` (created in ``namespace``) uses, sorted by namespace and name, each once."""
    metadata = _object(pod.get("metadata"), "metadata")
    spec = _object(pod.get("spec"), "spec")
    uses: dict[tuple[str, str], bool] = {}
    warnings: list[str] = []
    for volume in _list(spec.get("volumes"), "spec.volumes"):
        claim = _string(_object(_object(volume, "volume").get("persistentVolumeClaim"), "claim").get("claimName"),
                        "claimName")
        # A claim whose name cannot be a dataset's (a dot, upper case...) is some other volume, not ours.
        if _dataset_name(claim):
            uses.setdefault((namespace, claim), False)
    for key, value in sorted(_labels(metadata, "metadata").items()):
        match = SCHED_LABEL.fullmatch(key)
        if match is None:
            continue
        parts = match.group(1).split(".")
        ns, name = (namespace, parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
        if len(parts) > 2 or not _dataset_name(name) or not DNS1123_LABEL.fullmatch(ns):
            warnings.append(f"shoal: label {key} names no dataset: use fluid.io/dataset.<name>.sched or "
                            f"fluid.io/dataset.<namespace>.<name>.sched")
            continue
        uses[(ns, name)] = uses.get((ns, name), False) or value == SCHED_REQUIRED
    datasets = [DatasetUse(namespace=ns, name=name, required=required)
                for (ns, name), required in sorted(uses.items())]
    return Uses(datasets, warnings)


@dataclass(frozen=True)
class Placement:
    """Node-affinity terms to add: preferred terms (weight, host names) and the hosts a required term allows."""

    preferred: list[tuple[int, list[str]]] = field(default_factory=list)
    required_hosts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.preferred and not self.required_hosts


def placement(reply: ScoreReply, uses: Uses, pod: Mapping[str, Any] | None = None,
              labels: Mapping[str, Mapping[str, str]] | None = None,
              apart: Mapping[str, Sequence[str]] | None = None) -> Placement:
    """The terms a reply asks for. Nodes with score 0 are not preferred; in required mode every node the reply
    kept is allowed. When no node holds a required dataset, nothing is required (a host list frozen into the pod
    would keep it pending even after the cache appears elsewhere) and a warning says so, and why the extender
    keeps it pending. When ``pod``'s own node selector or required node affinity excludes every node holding its
    required datasets (judged by ``labels``, what is known of each holder's labels: ``affinity.surely_excludes``),
    nothing is required either, for the same reason, and a warning says so and what to change. ``apart``, when
    several datasets are required and no node caches them all: the nodes caching each one (``namespace/name`` →
    nodes, asked one by one), so the warning names what is missing: a dataset no node caches, or only that no one
    node caches them all."""
    if reply.error:
        return Placement()
    best: dict[int, list[str]] = {}
    for score in [s for s in reply.scores if s.score > 0][:MAX_PREFERRED_NODES]:
        best.setdefault(max(MIN_WEIGHT, min(MAX_WEIGHT, score.score)), []).append(score.node)
    preferred = [(weight, sorted(nodes)) for weight, nodes in sorted(best.items(), reverse=True)]
    required_hosts: list[str] = []
    warnings: list[str] = []
    if uses.required:
        required_hosts = sorted({score.node for score in reply.scores})
        names = ", ".join(f"{use.namespace}/{use.name}" for use in uses.required)
        if not required_hosts:
            warnings.append(_nowhere(uses.required, names, apart or {}))
        elif pod is not None and _excludes_all(pod, required_hosts, labels or {}):
            shown = ", ".join(required_hosts[:SHOWN_HOLDERS])
            more = len(required_hosts) - SHOWN_HOLDERS
            # As with no cache anywhere: a host list the pod can never meet, frozen into it, would keep it Pending
            # even after a node it allows caches the data; the extender can still wait for that.
            required_hosts = []
            warnings.append(f"shoal: the pod requires {names} but its own node selector or affinity excludes every "
                            f"node caching it ({shown}{f' and {more} more' if more > 0 else ''}); the extender keeps "
                            "it Pending until a node it allows does: allow one, or load the data there")
    return Placement(preferred, required_hosts, warnings)


def _nowhere(required: Sequence[DatasetUse], names: str, apart: Mapping[str, Sequence[str]]) -> str:
    """The warning for required datasets no node caches together."""
    held = {f"{use.namespace}/{use.name}": list(apart.get(f"{use.namespace}/{use.name}", ())) for use in required}
    uncached = [name for name, nodes in held.items() if not nodes]
    if len(required) > 1 and apart and not uncached:
        where = "; ".join(f"{name} on {', '.join(nodes[:SHOWN_HOLDERS])}"
                          f"{f' and {len(nodes) - SHOWN_HOLDERS} more' if len(nodes) > SHOWN_HOLDERS else ''}"
                          for name, nodes in held.items())
        return (f"shoal: no one node caches all of {names} ({where}), so the pod is not restricted to cache nodes; "
                "with the scheduler extender it stays Pending until one does: load them onto the same nodes (a "
                "DataLoad each) or make some of them preferred, not required")
    missing = ", ".join(uncached) if apart and uncached else names
    return (f"shoal: no node caches {missing} yet, so the pod is not restricted to cache nodes; with the scheduler "
            "extender it stays Pending until one does: load the data (a DataLoad) or make the dataset preferred, "
            "not required")


def _excludes_all(pod: Mapping[str, Any], hosts: list[str], labels: Mapping[str, Mapping[str, str]]) -> bool:
    spec = _object(pod.get("spec"), "spec")
    node_selector = _object(spec.get("nodeSelector"), "nodeSelector")
    node_affinity, _, _ = _terms(spec)
    return all(surely_excludes(node_selector, node_affinity, host, labels.get(host, {})) for host in hosts)


def _hostname_expression(operator: str, hosts: list[str]) -> dict[str, Any]:
    return {"key": HOSTNAME_LABEL, "operator": operator, "values": hosts}


def affinity_patch(pod: Mapping[str, Any], wanted: Placement) -> list[dict[str, Any]]:
    """RFC 6902 operations that add ``wanted`` to the pod's node affinity, creating missing parents and keeping
    every existing term. A required expression is ANDed into every existing required term (Kubernetes ORs
    terms, so adding a separate term would widen the pod's choice instead of narrowing it); a term with no
    expressions and no fields matches no node and stays as it is."""
    if wanted.empty:
        return []
    preferred = [{"weight": weight, "preference": {"matchExpressions": [_hostname_expression("In", hosts)]}}
                 for weight, hosts in wanted.preferred]
    required = _hostname_expression("In", wanted.required_hosts) if wanted.required_hosts else None
    spec = _object(pod.get("spec"), "spec")
    whole: dict[str, Any] = {}
    if preferred:
        whole[PREFERRED_KEY] = preferred
    if required is not None:
        whole[REQUIRED_KEY] = {"nodeSelectorTerms": [{"matchExpressions": [required]}]}
    if not isinstance(pod.get("spec"), Mapping):
        return [{"op": "add", "path": "/spec", "value": {"affinity": {"nodeAffinity": whole}}}]
    affinity = spec.get("affinity")
    if not isinstance(affinity, Mapping):
        return [{"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": whole}}]
    if not isinstance(affinity.get("nodeAffinity"), Mapping):
        return [{"op": "add", "path": "/spec/affinity/nodeAffinity", "value": whole}]
    base = "/spec/affinity/nodeAffinity"
    node_affinity, _, terms = _terms(spec)
    ops: list[dict[str, Any]] = []
    if preferred:
        if isinstance(node_affinity.get(PREFERRED_KEY), list):
            ops += [{"op": "add", "path": f"{base}/{PREFERRED_KEY}/-", "value": term} for term in preferred]
        else:
            ops.append({"op": "add", "path": f"{base}/{PREFERRED_KEY}", "value": preferred})
    if required is not None:
        selector = node_affinity.get(REQUIRED_KEY)
        if not isinstance(selector, Mapping):
            ops.append({"op": "add", "path": f"{base}/{REQUIRED_KEY}", "value": whole[REQUIRED_KEY]})
        elif not terms:
            ops.append({"op": "add", "path": f"{base}/{REQUIRED_KEY}/nodeSelectorTerms",
                        "value": whole[REQUIRED_KEY]["nodeSelectorTerms"]})
        else:
            for i, term in enumerate(terms):
                if not term.get("matchExpressions") and not term.get("matchFields"):
                    continue
                path = f"{base}/{REQUIRED_KEY}/nodeSelectorTerms/{i}/matchExpressions"
                if isinstance(term.get("matchExpressions"), list):
                    ops.append({"op": "add", "path": f"{path}/-", "value": required})
                else:
                    ops.append({"op": "add", "path": path, "value": [required]})
    return ops


def review_response(uid: str, patch: list[dict[str, Any]] | None = None,
                    warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The AdmissionReview v1 answer: always allowed (the webhook only steers), the request's uid echoed, the
    patch base64-encoded when there is one (both patch fields omitted otherwise)."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warnings:
        response["warnings"] = list(warnings)
    return {"apiVersion": ADMISSION_API, "kind": ADMISSION_KIND, "response": response}

