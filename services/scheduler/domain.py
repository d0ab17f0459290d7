"""Scoring, pure: which nodes a pod (or job) using some datasets should run on, from a view of where the bytes are.

``score(request, view, weights) -> ScoreReply`` decides, over a ``View`` (the fold's answers, see
``services.scheduler.fold.LiveView``; ``StaticView`` for tests and benches):

- **share**: a node's cached bytes of the requested datasets (only under the path hints, when given) over those
  datasets' bytes. Only blocks of the current version of a file count (the fold checks ETags against the manifest).
- **tiered locality** (Fluid's affinity plugin: node 100, zone 50, region 20): a node scores the best of its own
  share times the node weight, the best share of another node in its zone times the zone weight, and the best
  share of another node in its region times the region weight, scaled to 0..100. A node's own bytes only enter the
  first term and the others' only the last two, so more cached bytes on a node never lower its score. Zones and
  regions are the view's labels, except for a candidate the request gives labels for: those place it, also as a
  holder its neighbours gain from (``_regrouped``).
- **required** (a ``DatasetUse`` with ``required``, Fluid's ``fluid.io/dataset.<name>.sched: required``): a node
  holding none of that dataset's bytes (under its paths) is left out, with the reason in ``filtered``: why it holds
  none, as far as the view knows (``filtered_reason``: outside the dataset's nodeAffinity, no agent, an agent that
  missed its heartbeats, no mount of the dataset, a mount not serving yet, or none of the bytes yet).
- **no datasets**: nodes holding no cache at all score 100, nodes holding some score 0 (Fluid's "prefer nodes
  without cache"), so work that reads no dataset leaves the cache nodes' disks and network to the work that does.
- **bad input**: a dataset that does not exist is an ``error`` answer (no scores, ``unknown_dataset``): a typo in a
  dataset name must not look like "no node holds it" (the extender's filter reads the error back, ``unknown_in``, and
  rejects every node with ``missing_reason`` when the pod requires that dataset). Too many datasets or candidates
  is an error too. A candidate node the fold has never heard of is scored like a node without cache (no
  preference), its labels from the request if given.
- **determinism**: the request is normalised (datasets merged by name, paths and candidates deduplicated and
  sorted), so input order never changes the answer; nodes come best first, ties by name.
- **reference datasets** (``dataset://``, ``libs.references``): a use of a reference is a use of its source (and
  of the source's folder the reference shows), whose cache it reads: ``through_references`` rewrites the request.
- **the best ``limit`` nodes**: the reply lists the first ``limit`` nodes of that ranking (0: all), and how many
  others were scored (``unlisted``) with the best score among them (``unlisted_score``).

The view is read, never written (maps and columns it hands out may be its own); what it may keep between decisions
(``Places``, per-dataset columns and their sums, patched where the cache moved) is a pure function of what it
stands for. A decision over 1,000 nodes is a few C-level passes (``map``, ``max``) and one sort of ints, and makes
``NodeScore``s only for the nodes it lists; the first straightforward version is kept in the tests as the oracle
the answers (and the top of its full ranking) must equal.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import msgspec

from libs.affinity import mismatch as affinity_mismatch
from libs.events.agent import AgentHeartbeat
from libs.events.common import rfc3339
from libs.events.schedule import DatasetCacheObserved, DatasetUse, NodeScore, ScoreReply, ScoreRequest
from libs.references import Reference

DatasetKey = tuple[str, str]
K = TypeVar("K")
V = TypeVar("V")

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

    def agent(self, node: str) -> NodeAgent | None:
        """The node's agent as last heard of, for the reason a node is filtered out; None when the view does not
        follow agents (the reason then says only that the node holds none of the dataset)."""

    def affinity(self, dataset: DatasetKey) -> Mapping[str, Any] | None:
        """The dataset's nodeAffinity as given (None: it has none, or the dataset is unknown)."""

    def nodes(self) -> set[str]:
        """Every node known: reported inventory or a fresh heartbeat (so every node that caches)."""

    def caching_nodes(self) -> set[str]:
        """Nodes that hold any block of any dataset."""

    def places(self, zone_label: str, region_label: str) -> Places:
        """``Places.of`` the known nodes and their labels (a view may keep one while neither changes)."""

    def column(self, dataset: DatasetKey, paths: tuple[str, ...], places: Places) -> tuple[Sequence[int], int]:
        """``cached`` in the order of ``places.nodes`` (0 for a node holding none; every holder is a known node),
        and its largest value. A view may keep one while the dataset's cache does not change (and patch it when
        it does)."""

    def known(self, parts: tuple[Part, ...], places: Places) -> Sums:
        """The parts' columns added up (``add_columns``): every known node's bytes of those datasets. A view may
        keep one while the datasets' caches do not change (and patch it when they do, saying where in
        ``Sums.moved``)."""


@dataclass(frozen=True)
class Use:
    """One requested dataset after normalisation."""

    key: DatasetKey
    paths: tuple[str, ...]
    required: bool


def normalise(request: ScoreRequest) -> tuple[list[Use], list[tuple[str, Mapping[str, str]]]] | str:
    """The request's datasets (merged by name, sorted) and candidates (sorted; a node named twice keeps the labels
    that sort last, so the order of the list never matters), or an error."""
    if request.limit < 0:
        return f"limit must be 0 (every node) or more, not {request.limit}"
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


@dataclass(frozen=True)
class NodeAgent:
    """What a node's agent last said, as far as the reason a node is filtered out reads it."""

    # None: no heartbeat of the node on record (no agent runs there, or it has been gone for a while).
    heartbeat: AgentHeartbeat | None
    # The last heartbeat is within the node timeout (a node whose agent stopped beating has its cache forgotten).
    fresh: bool = True


# kube-scheduler adds equal reasons of its nodes up into the pod's FailedScheduling event ("0/900 nodes are
# available: 600 <reason>, 300 <reason>.", cut at 1,024 bytes), so a reason never names the node and says why in
# a few words; it names one missing dataset (existing datasets' names are two DNS labels) and counts the others, and
# is cut at this length whatever it holds.
MAX_REASON_CHARS = 256


def filtered_reason(missing: Sequence[Use], node: str, labels: Mapping[str, str], agent: NodeAgent | None,
                    affinity_of: Callable[[DatasetKey], Mapping[str, Any] | None]) -> str:
    """Why ``node`` is left out of a decision that requires the ``missing`` datasets, which it holds none of: from
    the first of them, the cause furthest upstream that the view knows. ``labels``: the node's (the request's for a
    candidate it labels, else its agent's; empty: unknown); ``agent``: None when the view does not follow agents.
    Unresolvable all (preempting pods brings no cache). Never a mount's message or an agent's problems: they may
    quote a store's error."""
    use = missing[0]
    dataset = f"{use.key[0]}/{use.key[1]}"
    beat = agent.heartbeat if agent is not None and agent.fresh else None
    mount = beat.mount_of(*use.key) if beat is not None else None
    if mount is None and agent is not None and labels and affinity_mismatch(affinity_of(use.key), node, labels):
        why = f"outside the nodeAffinity of dataset {dataset}"
    elif agent is not None and agent.heartbeat is None:
        why = f"no Shoal agent on the node to cache dataset {dataset}"
    elif agent is not None and not agent.fresh:
        why = f"the node's Shoal agent missed its heartbeats: its cache of dataset {dataset} is not counted"
    elif agent is not None and mount is None:
        why = f"not a cache worker of dataset {dataset}: the node has no mount of it"
    elif mount is not None and mount.state != "Serving":
        why = f"the node's mount of dataset {dataset} is {mount.state}, not serving yet"
    else:
        why = f"holds none of {dataset}" + (" under the requested paths" if use.paths else "")
    more = f", nor {len(missing) - 1} more required dataset(s)" if len(missing) > 1 else ""
    return _bounded(f"{why} (required{more})")


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


# The start of the error answer for a dataset that does not exist (``unknown_dataset``; ``unknown_in`` reads it).
UNKNOWN_DATASET = "unknown dataset "


def unknown_dataset(key: DatasetKey) -> str:
    """The error answer for a request using ``key``, which does not exist (never applied, a typo, deleted)."""
    return f"{UNKNOWN_DATASET}{key[0]}/{key[1]}"


def unknown_in(error: str) -> DatasetKey | None:
    """The dataset an error answer says does not exist (``unknown_dataset``); None for any other error (the
    scheduler starting, bad input...)."""
    if not error.startswith(UNKNOWN_DATASET):
        return None
    namespace, _, name = error[len(UNKNOWN_DATASET):].partition("/")
    return (namespace, name) if namespace and name else None


def missing_reason(key: DatasetKey, *, source: bool = False) -> str:
    """Why every node is left out of a decision that requires ``key``, which does not exist: the same on every
    node (kube-scheduler adds them up into one phrase of the pod's event), bounded as ``filtered_reason``'s.
    ``source``: ``key`` is not the pod's own dataset but the source of a ``dataset://`` reference it requires."""
    dataset = f"{key[0]}/{key[1]}"
    if source:
        return _bounded(f"dataset {dataset}, the source of a dataset:// reference the pod requires, does not exist "
                        "(required)")
    return _bounded(f"dataset {dataset} does not exist (required)")


@dataclass(frozen=True)
class Places:
    """Where the known nodes are, as scoring reads it: every known node (sorted by name), the kind of place it is in
    (its (zone, region), numbered), and each zone's and region's nodes (positions in ``nodes``). A pure function of
    the node set and their labels (``Places.of``): a view keeps one until either changes, so a decision does not
    read every node's labels again."""

    nodes: tuple[str, ...] = ()
    # Number of the (zone, region) of each node of ``nodes`` ('' when the node has no such label): ``kinds[n]``.
    kind: tuple[int, ...] = ()
    kinds: tuple[tuple[str, str], ...] = ()
    index: Mapping[str, int] = field(default_factory=dict)
    zones: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    regions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, nodes: Iterable[str], labels: Callable[[str], Mapping[str, str]], zone_label: str,
           region_label: str) -> Places:
        ordered = tuple(sorted(set(nodes)))
        numbers: dict[tuple[str, str], int] = {}
        kind = []
        zones: dict[str, list[int]] = {}
        regions: dict[str, list[int]] = {}
        for position, node in enumerate(ordered):
            node_labels = labels(node)
            zone, region = node_labels.get(zone_label, ""), node_labels.get(region_label, "")
            kind.append(numbers.setdefault((zone, region), len(numbers)))
            if zone:
                zones.setdefault(zone, []).append(position)
            if region:
                regions.setdefault(region, []).append(position)
        return cls(nodes=ordered, kind=tuple(kind), kinds=tuple(numbers),
                   index={node: position for position, node in enumerate(ordered)},
                   zones={zone: tuple(members) for zone, members in zones.items()},
                   regions={region: tuple(members) for region, members in regions.items()})

    def where(self, node: str) -> tuple[str, str] | None:
        position = self.index.get(node)
        return None if position is None else self.kinds[self.kind[position]]


# Group (zone or region) → its (at most) two best holders as (share, node), best first; ties go to the node whose
# name sorts first, whatever order the holders came in.
Best = dict[str, list[tuple[float, str]]]


def _owns(uses: list[Use], totals: Mapping[DatasetKey, int], held: Mapping[DatasetKey, Mapping[str, int]],
          nodes: Sequence[str]) -> list[int]:
    """Each node's cached bytes of the requested datasets (each dataset counted up to its total), in the order of
    ``nodes``; read with ``map`` (no Python frame per node)."""
    owns: list[int] | None = None
    for use in uses:
        total, sizes = totals[use.key], held[use.key]
        if max(sizes.values(), default=0) > total:
            sizes = {node: min(size, total) for node, size in sizes.items()}
        column = cast(Iterator[int], map(sizes.get, nodes, itertools.repeat(0)))
        owns = list(column if owns is None else map(operator.add, owns, column))
    return owns if owns is not None else [0] * len(nodes)


# A requested dataset as the view's ``known`` reads it: its key, path hints, and its bytes (a node's bytes of it are
# counted up to these).
Part = tuple[DatasetKey, tuple[str, ...], int]


def add_columns(columns: Iterable[tuple[Sequence[int], int, int]], count: int) -> list[int]:
    """The sum of columns given as (column, its largest value, cap), each value counted up to its cap; a new list
    (``count`` zeros when there is no column)."""
    owns: Iterator[int] | None = None
    for column, peak, cap in columns:
        capped: Iterable[int] = [min(size, cap) for size in column] if peak > cap else column
        owns = iter(capped) if owns is None else map(operator.add, owns, capped)
    return list(owns) if owns is not None else [0] * count


@dataclass(eq=False)
class Sums:
    """``View.known``'s answer: every known node's bytes of some datasets (``column``, in ``places.nodes`` order),
    and what scoring derives from it, which a view that keeps the column keeps with it: ``derived`` (filled and
    patched by ``_derive`` only) and ``moved``, the positions the view patched since scoring last derived (None:
    derive everything again)."""

    column: Sequence[int]
    moved: set[int] | None = None
    derived: dict[str, Any] = field(default_factory=dict)


def _known(uses: list[Use], totals: Mapping[DatasetKey, int], view: View, places: Places) -> Sums:
    """``_owns`` of every known node, from the view (which may keep it while the datasets do not change)."""
    return view.known(tuple((use.key, use.paths, totals[use.key]) for use in uses), places)


def _derive(sums: Sums, places: Places, requested: int) -> tuple[Best, Best, list[int]]:
    """The zones' and regions' best holders (``_tops``) and every known node's key (``bytes * len(kinds) +
    kind``) of a sum: kept in ``sums.derived`` and, when the view patched the column, worked out again only at the
    moved positions (the same values as a full pass: a group's best holders are a function of its members' bytes).
    A group's two best holders are kept as (bytes, position) too: a moved member that rises, or one that is not
    among them, is compared with them; only a best holder that falls makes the group be read again."""
    derived, moved, column = sums.derived, sums.moved, sums.column
    width = len(places.kinds) or 1
    if moved is None or not derived:
        for name, members in (("zones", places.zones), ("regions", places.regions)):
            tops = _tops(members, column) if requested > 0 else {}
            derived[f"{name}_tops"] = tops
            derived[name] = {group: _shares(top, places.nodes, requested) for group, top in tops.items()}
        derived["keys"] = list(map(operator.add, map(operator.mul, column, itertools.repeat(width)), places.kind))
        derived["terms"] = None  # scoring's kept terms (``_Terms``) start over
        derived["stale"] = set()
    elif moved:
        keys: list[int] = derived["keys"]
        zones: dict[str, list[int]] = {}
        regions: dict[str, list[int]] = {}
        for spot in moved:
            keys[spot] = column[spot] * width + places.kind[spot]
            zone, region = places.kinds[places.kind[spot]]
            if zone:
                zones.setdefault(zone, []).append(spot)
            if region:
                regions.setdefault(region, []).append(spot)
        if requested > 0:
            stale: set[tuple[str, str]] = derived["stale"]
            for name, groups, members in (("zones", zones, places.zones), ("regions", regions, places.regions)):
                best: Best = derived[name]
                all_tops: dict[str, list[tuple[int, int]]] = derived[f"{name}_tops"]
                for group, spots in groups.items():
                    top = _patch_top(all_tops.get(group, []), spots, column)
                    if top is None:
                        top = _tops({group: members[group]}, column).get(group, [])
                    entries = _shares(top, places.nodes, requested)
                    if top:
                        all_tops[group] = top
                    else:
                        all_tops.pop(group, None)
                    if best.get(group) != (entries or None):
                        stale.add((name, group))  # the terms of its nodes' (zone, region) are worked out again
                    if entries:
                        best[group] = entries
                    else:
                        best.pop(group, None)
    sums.moved = set()
    return derived["zones"], derived["regions"], derived["keys"]


def _tops(members: Mapping[str, tuple[int, ...]], owns: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """Each group's (at most) two best holders as (bytes, position), best first; members are positions in name
    order, so the first of equal sizes is the name that sorts first. Groups holding nothing are left out."""
    found: dict[str, list[tuple[int, int]]] = {}
    size_at = owns.__getitem__
    for group, positions in members.items():
        sizes = list(map(size_at, positions))
        top = max(sizes, default=0)
        if top <= 0:
            continue
        first = sizes.index(top)
        entries = [(top, positions[first])]
        sizes[first] = 0
        second = max(sizes)
        if second > 0:
            entries.append((second, positions[sizes.index(second)]))
        found[group] = entries
    return found


def _regrouped(candidates: Sequence[tuple[str, Mapping[str, str]]], known: Sequence[int], places: Places,
               weights: Weights, requested: int) -> tuple[Best, Best] | None:
    """The zones' and regions' best holders when the request's labels put some holders elsewhere than their agents
    do (None when they do not): a candidate with labels is where its labels say, as for its own (zone, region).
    kube-scheduler's extender sends Node objects with their zone labels, which agents report only when told
    (``SHOAL_NODE_LABELS``); a holder that is not a candidate stays where its agent says."""
    moved: dict[int, tuple[str, str]] = {}
    for node, labels in candidates:
        spot = places.index.get(node) if labels else None
        if spot is not None and known[spot] > 0:
            where = _group(labels, weights)
            if where != places.kinds[places.kind[spot]]:
                moved[spot] = where
    if not moved:
        return None
    zones: dict[str, list[int]] = {}
    regions: dict[str, list[int]] = {}
    for spot in itertools.compress(range(len(known)), known):  # holders, in name order
        zone, region = moved.get(spot) or places.kinds[places.kind[spot]]
        if zone:
            zones.setdefault(zone, []).append(spot)
        if region:
            regions.setdefault(region, []).append(spot)

    def best(members: dict[str, list[int]]) -> Best:
        tops = _tops({group: tuple(spots) for group, spots in members.items()}, known)
        return {group: _shares(top, places.nodes, requested) for group, top in tops.items()}

    return best(zones), best(regions)


def _patch_top(top: list[tuple[int, int]], spots: Iterable[int], owns: Sequence[int]) -> list[tuple[int, int]] | None:
    """A group's ``_tops`` entry after its members at ``spots`` moved, or None when it cannot be told without
    reading the group again (a best holder fell: the third best is not known)."""
    entries = {position: size for size, position in top}
    for spot in spots:
        size = owns[spot]
        held = entries.get(spot)
        if held is not None and size < held:
            return None
        if size > 0:
            entries[spot] = size
    # Best first: more bytes, then the first position (name order).
    ranked = sorted(((size, position) for position, size in entries.items()), key=lambda e: (-e[0], e[1]))
    return ranked[:2]


def _shares(top: list[tuple[int, int]], nodes: Sequence[str], requested: int) -> list[tuple[float, str]]:
    return [(min(size / requested, 1.0), nodes[position]) for size, position in top]


def _neighbour(best: Best, group: str, node: str) -> tuple[float, str]:
    """The best share held in ``group`` by a node other than ``node``."""
    for share, holder in best.get(group, ()):
        if holder != node:
            return share, holder
    return 0.0, ""


# Whole files are counted (for the reason) on the best nodes only: counting them costs a pass over a node's files.
WHOLE_FILES_NOTED = 10


def score(request: ScoreRequest, view: View, weights: Weights) -> ScoreReply:
    """Every candidate node scored 0..100, best first (ties by name); see the module docstring for the rules.

    Linear in nodes with little Python per node: sizes are read with ``map``; a node's score depends only on its
    own bytes and its (zone, region) unless it is one of its zone's or region's two best holders, so the score and
    reason are worked out once per distinct (bytes, zone, region) and once per such holder; nodes are ranked by
    one sort of ints (score and name order in one number) and only the listed ones become ``NodeScore``s."""
    normalised = normalise(request)
    if isinstance(normalised, str):
        return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=normalised)
    uses, candidates = normalised
    places = view.places(weights.zone_label, weights.region_label)
    nodes: Sequence[str] = [node for node, _ in candidates] if candidates else places.nodes
    if not uses:
        return _without_data(request, view, nodes)

    totals: dict[DatasetKey, int] = {}
    held: dict[DatasetKey, Mapping[str, int]] = {}
    for use in uses:
        total = view.dataset_total(use.key, use.paths)
        if total is None:
            return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=unknown_dataset(use.key))
        totals[use.key] = total
        held[use.key] = view.cached(use.key, use.paths)
    requested = sum(totals.values())
    # Bytes of every known node (holders are known nodes), for the zones' and regions' best holders.
    sums = _known(uses, totals, view, places)
    known = sums.column
    # Zones and regions of the nodes holding bytes (every known node, not only candidates: a candidate close to a
    # cache node gains even if that node itself may not take the work), and every known node's key.
    zones, regions, known_keys = _derive(sums, places, requested)

    kinds: Sequence[tuple[str, str]] = places.kinds
    kind: Sequence[int]
    owns: Sequence[int]
    if candidates:
        if requested > 0:
            zones, regions = _regrouped(candidates, known, places, weights, requested) or (zones, regions)
        owns = _owns(uses, totals, held, nodes)
        numbers = {where: number for number, where in enumerate(places.kinds)}
        kind = [numbers.setdefault(_group(labels, weights) if labels
                                   else places.where(node) or _group(view.labels(node), weights), len(numbers))
                for node, labels in candidates]
        kinds = tuple(numbers)
    else:
        owns, kind = known, places.kind

    filtered: dict[str, str] = {}
    required = [use for use in uses if use.required]
    if required:
        kept = []
        given = dict(candidates)
        for at, node in enumerate(nodes):
            missing = [use for use in required if held[use.key].get(node, 0) <= 0]
            if missing:
                agent = view.agent(node)
                labels = given.get(node) or (agent.heartbeat.labels if agent is not None and agent.heartbeat else {})
                filtered[node] = filtered_reason(missing, node, labels, agent, view.affinity)
            else:
                kept.append(at)
        nodes, owns, kind = [nodes[k] for k in kept], [owns[k] for k in kept], [kind[k] for k in kept]

    top = max(weights.node, weights.zone, weights.region) or 1
    names = _names(uses)
    reasons: dict[tuple[str, str, str, float], str] = {}

    def share_of(size: int) -> float:
        return min(size / requested, 1.0) if requested > 0 else 0.0

    def reason_of(why: tuple[str, str, str, float]) -> str:
        reason = reasons.get(why)
        if reason is None:
            reason = reasons[why] = _reason(why, names)
        return reason

    def place(node: str, size: int, zone: str, region: str) -> tuple[int, float, str]:
        """The node's score, share and reason: the best of its own bytes, its zone's and its region's (ties go to
        its own, then the zone)."""
        own = share_of(size)
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
        return round(TOP_SCORE * value / top), round(own, 6), reason_of(why)

    # ``place`` in two halves for the nodes that are not among their zone's or region's two best holders: what
    # their own bytes are worth depends on the bytes only, what their neighbours' are worth on (zone, region) only
    # (the same best holders for all of them), so each half is worked out once per distinct value (and kept across
    # decisions: ``_own_term`` and ``_near_term`` are pure) and the two compared once per distinct (bytes, zone,
    # region), numbered ``bytes * len(kinds) + kind`` (an int: cheap to hash). The comparison keeps ``place``'s order
    # of preference.
    def own_term(size: int) -> tuple[float, int, float, str]:
        return _own_term(size, requested, weights.node, top, names)

    def near_term(number: int) -> tuple[float, int, str]:
        zone, region = kinds[number]
        return _near_term(zone, region, _neighbour(zones, zone, ""), _neighbour(regions, region, ""), weights.zone,
                          weights.region, top, names)

    width = len(kinds) or 1

    def placed(key: int) -> tuple[int, float, str]:
        size, number = divmod(key, width)
        own, near = terms.own[size], terms.near[number]
        return (near[1], own[2], near[2]) if near[0] > own[0] else (own[1], own[2], own[3])

    # Ranked as ints, ``score * stride + (count - position)``: sorted descending, best score first and, among equal
    # scores, the node that comes first in name order (``nodes`` is by name) first, with no Python frame per node.
    count = len(nodes)
    stride = count + 1
    keys = (known_keys if owns is known else
            list(map(operator.add, map(operator.mul, owns, itertools.repeat(width)), kind)))
    # Every known node scored: the terms are kept with the sums (``_Terms``), dropped only for the (zone, region)s
    # whose best holders moved, so a decision after a change works out the few keys that change, not every one.
    terms = _Terms.of(sums.derived if owns is known else {}, (requested, names, weights, count, width), places.kinds)
    terms.own.make, terms.near.make, terms.answers.make = own_term, near_term, placed
    terms.ranked.make = lambda key: terms.answers[key][0] * stride
    answers, ranked = terms.answers, terms.ranked
    ranks = list(map(operator.add, map(ranked.__getitem__, keys), range(count, 0, -1)))
    # The best holder of a zone or region: its neighbour there is the second best, not itself. (The second best's
    # neighbour is the best, as for every other node there.)
    apart: dict[int, tuple[int, float, str]] = {}
    holders = {entries[0][1] for best in (zones, regions) for entries in best.values()}
    if holders:
        index = places.index if nodes is places.nodes else {node: at for at, node in enumerate(nodes)}
        for holder in holders:
            spot = index.get(holder)
            if spot is not None:
                apart[spot] = place(holder, owns[spot], *kinds[kind[spot]])
                ranks[spot] = apart[spot][0] * stride + count - spot
    ranks.sort(reverse=True)
    limit = request.limit or count
    scores = []
    for rank in ranks[:limit]:  # only the listed nodes become ``NodeScore``s
        spot = count - rank % stride
        score, share, reason = apart.get(spot) or answers[keys[spot]]
        scores.append(NodeScore(node=nodes[spot], score=score, cached_bytes=owns[spot], share=share, reason=reason))
    for rank, item in enumerate(scores[:WHOLE_FILES_NOTED]):
        whole = sum(view.whole_files(use.key, item.node) for use in uses) if item.cached_bytes else 0
        if whole:
            files = "1 whole file" if whole == 1 else f"{whole} whole files"
            scores[rank] = msgspec.structs.replace(item, reason=f"{item.reason} ({files})")
    return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, scores=scores, filtered=filtered,
                      unlisted=max(count - limit, 0), unlisted_score=ranks[limit] // stride if count > limit else 0)


class _Memo(dict[K, V]):
    """A dict that works a missing value out (``make``) and keeps it: looked up with ``map``, no Python frame per
    hit."""

    def __init__(self, make: Callable[[K], V] | None = None) -> None:
        super().__init__()
        self.make = cast(Callable[[K], V], make)

    def __missing__(self, key: K) -> V:
        value = self[key] = self.make(key)
        return value


@dataclass
class _Terms:
    """What ``score`` works out per distinct value, kept with a kept sum (``Sums.derived``) across decisions: a
    node's own term per byte count (``own``), its neighbours' per (zone, region) number (``near``), and the score,
    share and reason (``answers``) and rank (``ranked``) per node key. All are functions of the sum's best holders
    and ``context`` (requested bytes, names, weights, node count, key width): kept while the context stays; the
    entries of a (zone, region) whose zone's or region's best holders moved (``_derive`` notes them in
    ``derived["stale"]``) are dropped and worked out again. Past ``TERMS_KEPT`` byte counts and keys they start
    over (the cache moves, so old byte counts are left behind)."""

    context: tuple[Any, ...]
    own: _Memo[int, tuple[float, int, float, str]] = field(default_factory=_Memo)
    near: _Memo[int, tuple[float, int, str]] = field(default_factory=_Memo)
    answers: _Memo[int, tuple[int, float, str]] = field(default_factory=_Memo)
    ranked: _Memo[int, int] = field(default_factory=_Memo)

    @classmethod
    def of(cls, derived: dict[str, Any], context: tuple[Any, ...], kinds: Sequence[tuple[str, str]]) -> _Terms:
        """The kept terms of ``derived`` (fresh ones when it keeps none or for another context), brought up to
        date."""
        kept: _Terms | None = derived.get("terms")
        stale: set[tuple[str, str]] = derived.get("stale", set())
        if kept is None or kept.context != context or len(kept.answers) + len(kept.own) > TERMS_KEPT:
            kept = cls(context)
            if "keys" in derived:
                derived["terms"] = kept
        elif stale:
            width = context[-1]
            numbers = {number for number, (zone, region) in enumerate(kinds)
                       if ("zones", zone) in stale or ("regions", region) in stale}
            for number in numbers:
                kept.near.pop(number, None)
            for memo in (kept.answers, kept.ranked):
                for key in [key for key in memo if key % width in numbers]:
                    del memo[key]
        stale.clear()
        return kept


# Terms kept across decisions (a few hundred bytes each): distinct byte counts and neighbourhoods seen lately.
TERMS_KEPT = 4096


@functools.lru_cache(maxsize=TERMS_KEPT)
def _own_term(size: int, requested: int, weight: int, top: int, names: str) -> tuple[float, int, float, str]:
    """What a node's own bytes are worth: (value, score, share, reason)."""
    own = min(size / requested, 1.0) if requested > 0 else 0.0
    value = weight * own
    return value, round(TOP_SCORE * value / top), round(own, 6), _reason(("own", "", "", own), names)


@functools.lru_cache(maxsize=TERMS_KEPT)
def _near_term(zone: str, region: str, zone_best: tuple[float, str], region_best: tuple[float, str],
               zone_weight: int, region_weight: int, top: int, names: str) -> tuple[float, int, str]:
    """What the best holder of another node's zone or region is worth: (value, score, reason); the zone on a tie."""
    zone_value, region_value = zone_weight * zone_best[0], region_weight * region_best[0]
    if zone_value >= region_value:
        value, why = zone_value, ("zone", zone, zone_best[1], zone_best[0])
    else:
        value, why = region_value, ("region", region, region_best[1], region_best[0])
    return value, round(TOP_SCORE * value / top), _reason(why, names) if value > 0 else ""


def _group(labels: Mapping[str, str], weights: Weights) -> tuple[str, str]:
    return labels.get(weights.zone_label, ""), labels.get(weights.region_label, "")


def _rank(item: NodeScore) -> tuple[int, str]:
    return -item.score, item.node


def _reason(why: tuple[str, str, str, float], names: str) -> str:
    kind, group, holder, share = why
    if kind == "zone":
        return f"same zone ({group}) as {holder}, which holds {_percent(share)} of {names}"
    if kind == "region":
        return f"same region ({group}) as {holder}, which holds {_percent(share)} of {names}"
    return f"holds {_percent(share)} of {names}" if share > 0 else f"holds none of {names}"


def _without_data(request: ScoreRequest, view: View, nodes: Sequence[str]) -> ScoreReply:
    """Nodes without cache first (score 100), then the others (0), each part by name (``nodes`` is by name); only
    the listed ones become ``NodeScore``s."""
    caching = view.caching_nodes()
    # At most every node: islice refuses a stop past sys.maxsize (limit 2**63-1 was a ValueError, found by fuzzing).
    limit = min(request.limit or len(nodes), len(nodes))
    ranked = itertools.chain(itertools.filterfalse(caching.__contains__, nodes), filter(caching.__contains__, nodes))
    listed = list(itertools.islice(ranked, limit + 1))
    scores = [NodeScore(node=node, score=0, reason="holds cache; work without datasets goes elsewhere")
              if node in caching else NodeScore(node=node, score=TOP_SCORE, reason="holds no cache")
              for node in listed[:limit]]
    unlisted = max(len(nodes) - limit, 0)
    rest = (0 if listed[limit] in caching else TOP_SCORE) if unlisted else 0
    return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, scores=scores, unlisted=unlisted,
                      unlisted_score=rest)


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
    # The nodes' agents (a node missing: no agent); None: agents not followed.
    agents: dict[str, NodeAgent] | None = None
    affinities: dict[DatasetKey, dict[str, Any]] = field(default_factory=dict)

    def dataset_total(self, dataset: DatasetKey, paths: tuple[str, ...]) -> int | None:
        return self.totals.get(dataset)

    def cached(self, dataset: DatasetKey, paths: tuple[str, ...]) -> Mapping[str, int]:
        return {node: size for node, size in self.cache.get(dataset, {}).items() if size > 0}

    def whole_files(self, dataset: DatasetKey, node: str) -> int:
        return self.whole.get((dataset, node), 0)

    def labels(self, node: str) -> Mapping[str, str]:
        return self.node_labels.get(node, {})

    def agent(self, node: str) -> NodeAgent | None:
        return None if self.agents is None else self.agents.get(node, NodeAgent(None))

    def affinity(self, dataset: DatasetKey) -> Mapping[str, Any] | None:
        return self.affinities.get(dataset)

    def nodes(self) -> set[str]:
        return set(self.node_labels) | {node for nodes in self.cache.values() for node in nodes}

    def caching_nodes(self) -> set[str]:
        return {node for nodes in self.cache.values() for node, size in nodes.items() if size > 0}

    def places(self, zone_label: str, region_label: str) -> Places:
        return Places.of(self.nodes(), self.labels, zone_label, region_label)

    def column(self, dataset: DatasetKey, paths: tuple[str, ...], places: Places) -> tuple[Sequence[int], int]:
        column = cast(list[int], list(map(self.cached(dataset, paths).get, places.nodes, itertools.repeat(0))))
        return column, max(column, default=0)

    def known(self, parts: tuple[Part, ...], places: Places) -> Sums:
        columns = [(*self.column(key, paths, places), cap) for key, paths, cap in parts]
        return Sums(add_columns(columns, len(places.nodes)))


def through_references(request: ScoreRequest, sources: Mapping[tuple[str, str], Reference]) -> ScoreRequest:
    """The request with each use of a reference dataset made a use of its source (``sources``: reference key →
    source), its paths below the folder the reference shows (the whole folder when it named none)."""
    if not sources or not any((use.namespace or "default", use.name) in sources for use in request.datasets):
        return request
    uses = []
    for use in request.datasets:
        source = sources.get((use.namespace or "default", use.name))
        if source is None:
            uses.append(use)
            continue
        paths = list(use.paths)
        if source.folder:
            folder = "/" + source.folder
            paths = [folder + (path if path != "/" else "") for path in paths] or [folder]
        uses.append(DatasetUse(name=source.name, namespace=source.namespace, paths=paths, required=use.required))
    return msgspec.structs.replace(request, datasets=uses)


# --- The scheduler's fact: a dataset's bytes in the cache, each block once ---


def cache_fact(dataset: DatasetKey, unique_bytes: int, nodes_bytes: int, nodes: int,
               positions: Iterable[tuple[str, str, int]], manifest: object, now: float) -> DatasetCacheObserved:
    """``scheduler.dataset.cache.v1`` of a dataset whose fold holds ``unique_bytes`` of its current files (each
    block once) on ``nodes`` nodes, and ``nodes_bytes`` by the nodes' own counters summed. The id is a digest of
    what the figures were worked out from: every node's place in its inventory stream (node, incarnation, seq), the
    manifest whose files count, and the figures. Replicas that folded the same events publish the same id
    (JetStream keeps one), and a figure that comes back to an earlier value after other events gets a new id, so it
    is not dropped as a repeat."""
    digest = hashlib.blake2b(msgspec.json.encode([unique_bytes, nodes_bytes, sorted(positions), repr(manifest)]),
                             digest_size=8)
    namespace, name = dataset
    return DatasetCacheObserved(id=f"scheduler.{namespace}.{name}.cache.{digest.hexdigest()}", name=name,
                                namespace=namespace, unique_cached_bytes=unique_bytes, nodes=nodes,
                                observed_at=rfc3339(now), nodes_cached_bytes=nodes_bytes)
