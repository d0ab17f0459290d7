"""Scoring, pure: which nodes a pod (or job) using some datasets should run on, from a view of where the bytes are.

``score(request, view, weights) -> ScoreReply`` decides, over a ``View`` (the fold's answers, see
``services.scheduler.fold.LiveView``; ``StaticView`` for tests and benches):

- **share**: a node's cached bytes of the requested datasets (only under the path hints, when given) over those
  datasets' bytes. Only blocks of the current version of a file count (the fold checks ETags against the manifest).
- **tiered locality** (Fluid's affinity plugin: node 100, zone 50, region 20): a node scores the best of its own
  share times the node weight, the best share of another node in its zone times the zone weight, and the best
  share of another node in its region times the region weight, scaled to 0..100. A node's own bytes only enter the
  first term and the others' only the last two, so more cached bytes on a node never lower its score.
- **required** (a ``DatasetUse`` with ``required``, Fluid's ``fluid.io/dataset.<name>.sched: required``): a node
  holding none of that dataset's bytes (under its paths) is left out, with the reason in ``filtered``.
- **no datasets**: nodes holding no cache at all score 100, nodes holding some score 0 (Fluid's "prefer nodes
  without cache"), so work that reads no dataset leaves the cache nodes' disks and network to the work that does.
- **bad input**: a dataset that does not exist is an ``error`` answer (no scores): a typo in a dataset name must
  not look like "no node holds it". Too many datasets or candidates is an error too. A candidate node the fold has
  never heard of is scored like a node without cache (no preference), its labels from the request if given.
- **determinism**: the request is normalised (datasets merged by name, paths and candidates deduplicated and
  sorted), so input order never changes the answer; nodes come best first, ties by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from libs.events.schedule import NodeScore, ScoreReply, ScoreRequest

DatasetKey = tuple[str, str]

# Bounds on one request: a pod rarely mounts more than a handful of datasets, and a Kubernetes cluster tops out at
# 5,000 nodes (its documented limit); beyond these a request is abuse or a bug, answered with an error.
MAX_DATASETS = 64
MAX_CANDIDATES = 5000
MAX_PATHS = 256

# Scores are 0..100, as ``libs.events.schedule`` promises.
TOP_SCORE = 100


@dataclass(frozen=True)
class Weights:
    """How much holding the bytes (node), being in their zone, or in their region is worth; Fluid's defaults."""

    node: int = 100
    zone: int = 50
    region: int = 20
    zone_label: str = "topology.kubernetes.io/zone"
    region_label: str = "topology.kubernetes.io/region"


class View(Protocol):
    """What scoring reads: a snapshot of the fold and the nodes' labels."""

    def dataset_total(self, dataset: DatasetKey, paths: tuple[str, ...]) -> int | None:
        """Bytes of the dataset (under ``paths`` when given); None when the dataset does not exist."""

    def cached(self, dataset: DatasetKey, paths: tuple[str, ...]) -> Mapping[str, int]:
        """Node → bytes of the dataset (under ``paths``) it caches, nodes holding none left out."""

    def whole_files(self, dataset: DatasetKey, node: str) -> int:
        """Files of the dataset the node holds every block of."""

    def labels(self, node: str) -> Mapping[str, str]: ...

    def nodes(self) -> set[str]:
        """Every node known: reported inventory or a fresh heartbeat."""

    def caching_nodes(self) -> set[str]:
        """Nodes that hold any block of any dataset."""


@dataclass(frozen=True)
class Use:
    """One requested dataset after normalisation."""

    key: DatasetKey
    paths: tuple[str, ...]
    required: bool


def normalise(request: ScoreRequest) -> tuple[list[Use], list[tuple[str, Mapping[str, str]]]] | str:
    """The request's datasets (merged by name, sorted) and candidates (sorted; a node named twice keeps the labels
    that sort last, so the order of the list never matters), or an error."""
    if len(request.datasets) > MAX_DATASETS:
        return f"too many datasets: {len(request.datasets)} (at most {MAX_DATASETS})"
    if len(request.candidates) > MAX_CANDIDATES:
        return f"too many candidates: {len(request.candidates)} (at most {MAX_CANDIDATES})"
    merged: dict[DatasetKey, tuple[set[str], bool, bool]] = {}
    for use in request.datasets:
        if not use.name:
            return "a dataset without a name"
        if len(use.paths) > MAX_PATHS:
            return f"too many paths for {use.namespace}/{use.name}: {len(use.paths)} (at most {MAX_PATHS})"
        if any(not path.startswith("/") for path in use.paths):
            return f"paths of {use.namespace}/{use.name} must start with '/'"
        key = (use.namespace or "default", use.name)
        paths, whole, required = merged.get(key, (set(), False, False))
        # A use without paths wants the whole dataset, which covers any other use's paths.
        merged[key] = (paths | set(use.paths), whole or not use.paths, required or use.required)
    uses = [Use(key, () if whole else tuple(sorted(paths)), required)
            for key, (paths, whole, required) in sorted(merged.items())]
    candidates: dict[str, Mapping[str, str]] = {}
    for candidate in request.candidates:
        if not candidate.name:
            return "a candidate without a name"
        known = candidates.get(candidate.name)
        if known is None or sorted(candidate.labels.items()) > sorted(known.items()):
            candidates[candidate.name] = candidate.labels
    return uses, sorted(candidates.items())


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%"


def _names(uses: list[Use]) -> str:
    return ", ".join(f"{namespace}/{name}" for namespace, name in (use.key for use in uses))


# Group (zone or region) → its two best holders as (-share, node), best first: sorting these tuples ranks by share,
# then by name, whatever order the holders came in.
Best = dict[str, list[tuple[float, str]]]


def _offer(best: Best, group: str, node: str, share: float) -> None:
    if not group:
        return
    item = (-share, node)
    entries = best.get(group)
    if entries is None:
        best[group] = [item]
    elif len(entries) < 2 or item < entries[1]:
        entries.append(item)
        entries.sort()
        del entries[2:]


def _neighbour(best: Best, group: str, node: str) -> tuple[float, str]:
    """The best share held in ``group`` by a node other than ``node``."""
    for share, holder in best.get(group, ()):
        if holder != node:
            return -share, holder
    return 0.0, ""


# Whole files are counted (for the reason) on the best nodes only: counting them costs a pass over a node's files.
WHOLE_FILES_NOTED = 10


def score(request: ScoreRequest, view: View, weights: Weights) -> ScoreReply:
    """Every candidate node scored 0..100, best first (ties by name); see the module docstring for the rules."""
    normalised = normalise(request)
    if isinstance(normalised, str):
        return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=normalised)
    uses, candidates = normalised
    labelled: list[tuple[str, Mapping[str, str]]] = (
        [(node, labels or view.labels(node)) for node, labels in candidates] if candidates
        else [(node, view.labels(node)) for node in sorted(view.nodes())])
    if not uses:
        return _without_data(request, view, labelled)

    totals: dict[DatasetKey, int] = {}
    held: dict[DatasetKey, Mapping[str, int]] = {}
    for use in uses:
        total = view.dataset_total(use.key, use.paths)
        if total is None:
            return ScoreReply(id=f"{request.id}.reply", causation_id=request.id,
                              error=f"unknown dataset {use.key[0]}/{use.key[1]}")
        totals[use.key] = total
        held[use.key] = view.cached(use.key, use.paths)
    requested = sum(totals.values())
    cached: dict[str, int] = {}
    for use in uses:
        total = totals[use.key]
        for node, size in held[use.key].items():
            cached[node] = cached.get(node, 0) + min(size, total)
    shares = {node: min(size / requested, 1.0) for node, size in cached.items()} if requested > 0 else {}

    filtered: dict[str, str] = {}
    kept = labelled
    required = [use for use in uses if use.required]
    if required:
        kept = []
        for node, labels in labelled:
            missing = [use for use in required if held[use.key].get(node, 0) <= 0]
            if missing:
                filtered[node] = f"holds none of {_names(missing)} (required)"
            else:
                kept.append((node, labels))

    # Zones and regions of the nodes holding bytes (every known node, not only candidates: a candidate close to a
    # cache node gains even if that node itself may not take the work).
    zone_label, region_label = weights.zone_label, weights.region_label
    zones: Best = {}
    regions: Best = {}
    for node, share in shares.items():
        if share > 0:
            labels = view.labels(node)
            _offer(zones, labels.get(zone_label, ""), node, share)
            _offer(regions, labels.get(region_label, ""), node, share)
    top = max(weights.node, weights.zone, weights.region) or 1
    names = _names(uses)
    reasons: dict[tuple[str, str, str, float], str] = {}

    def place(node: str, own: float, zone: str, region: str) -> tuple[int, str]:
        value = weights.node * own
        why: tuple[str, str, str, float] = ("own", "", "", own)
        if zone:
            share, holder = _neighbour(zones, zone, node)
            if weights.zone * share > value:
                value, why = weights.zone * share, ("zone", zone, holder, share)
        if region:
            share, holder = _neighbour(regions, region, node)
            if weights.region * share > value:
                value, why = weights.region * share, ("region", region, holder, share)
        reason = reasons.get(why)
        if reason is None:
            reason = reasons[why] = _reason(why, names)
        return round(TOP_SCORE * value / top), reason

    # A node that is not among its zone's or region's two best holders has the same neighbours as every other such
    # node there, so its score depends only on (zone, region, own share): computed once per distinct triple.
    tops = {node for best in (zones, regions) for entries in best.values() for _, node in entries}
    memo: dict[tuple[str, str, float], tuple[int, str]] = {}
    scores = []
    for node, labels in kept:
        own = shares.get(node, 0.0)
        zone = labels.get(zone_label, "") if zones else ""
        region = labels.get(region_label, "") if regions else ""
        if node in tops:
            placed = place(node, own, zone, region)
        else:
            key = (zone, region, own)
            known = memo.get(key)
            placed = known if known is not None else memo.setdefault(key, place(node, own, zone, region))
        scores.append(NodeScore(node=node, score=placed[0], cached_bytes=cached.get(node, 0), share=round(own, 6),
                                reason=placed[1]))
    scores.sort(key=_rank)
    for index, item in enumerate(scores[:WHOLE_FILES_NOTED]):
        whole = sum(view.whole_files(use.key, item.node) for use in uses) if item.cached_bytes else 0
        if whole:
            scores[index] = msgspec.structs.replace(item, reason=f"{item.reason} ({whole} whole files)")
    return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, scores=scores, filtered=filtered)


def _rank(item: NodeScore) -> tuple[int, str]:
    return -item.score, item.node


def _reason(why: tuple[str, str, str, float], names: str) -> str:
    kind, group, holder, share = why
    if kind == "zone":
        return f"same zone ({group}) as {holder}, which holds {_percent(share)} of {names}"
    if kind == "region":
        return f"same region ({group}) as {holder}, which holds {_percent(share)} of {names}"
    return f"holds {_percent(share)} of {names}" if share > 0 else f"holds none of {names}"


def _without_data(request: ScoreRequest, view: View, labelled: list[tuple[str, Mapping[str, str]]]) -> ScoreReply:
    caching = view.caching_nodes()
    scores = [
        NodeScore(node=node, score=0, reason="holds cache; work without datasets goes elsewhere") if node in caching
        else NodeScore(node=node, score=TOP_SCORE, reason="holds no cache")
        for node, _ in labelled
    ]
    scores.sort(key=_rank)
    return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, scores=scores)


@dataclass
class StaticView:
    """A ``View`` from plain data: tests, benches, and a person trying the scoring out.

    ``cache``: dataset → node → cached bytes; ``totals``: dataset → bytes (a dataset missing is unknown); path
    hints are ignored (the totals and bytes given are taken as already restricted).
    """

    totals: dict[DatasetKey, int] = field(default_factory=dict)
    cache: dict[DatasetKey, dict[str, int]] = field(default_factory=dict)
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    whole: dict[tuple[DatasetKey, str], int] = field(default_factory=dict)

    def dataset_total(self, dataset: DatasetKey, paths: tuple[str, ...]) -> int | None:
        return self.totals.get(dataset)

    def cached(self, dataset: DatasetKey, paths: tuple[str, ...]) -> Mapping[str, int]:
        return {node: size for node, size in self.cache.get(dataset, {}).items() if size > 0}

    def whole_files(self, dataset: DatasetKey, node: str) -> int:
        return self.whole.get((dataset, node), 0)

    def labels(self, node: str) -> Mapping[str, str]:
        return self.node_labels.get(node, {})

    def nodes(self) -> set[str]:
        return set(self.node_labels) | {node for nodes in self.cache.values() for node in nodes}

    def caching_nodes(self) -> set[str]:
        return {node for nodes in self.cache.values() for node, size in nodes.items() if size > 0}
