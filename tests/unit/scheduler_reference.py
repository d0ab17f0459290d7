"""The scheduler's scoring as first written, kept as the oracle of ``services.scheduler.domain.score``: the fast one
(sizes read with ``map``, scores worked out per distinct (bytes, zone, region), one sort) must give the same answer
for any view, request and weights (``test_scheduler_domain``)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from libs.events.schedule import NodeScore, ScoreReply, ScoreRequest
from services.scheduler.domain import (
    TOP_SCORE,
    WHOLE_FILES_NOTED,
    DatasetKey,
    View,
    Weights,
    _names,
    _rank,
    _reason,
    _without_data,
    filtered_reason,
    normalise,
)

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




def reference_score(request: ScoreRequest, view: View, weights: Weights) -> ScoreReply:
    """The scoring as first written (a dictionary pass per step and ``NodeScore`` per node), kept as the oracle."""
    normalised = normalise(request)
    if isinstance(normalised, str):
        return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=normalised)
    uses, candidates = normalised
    labelled: list[tuple[str, Mapping[str, str]]] = (
        [(node, labels or view.labels(node)) for node, labels in candidates] if candidates
        else [(node, view.labels(node)) for node in sorted(view.nodes())])
    if not uses:
        return _without_data(request, view, [node for node, _ in labelled])

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
            if missing:  # the reason is the domain's own (the oracle checks which nodes are left out)
                agent = view.agent(node)
                own_labels = dict(candidates).get(node) or (agent.heartbeat.labels if agent and agent.heartbeat else {})
                filtered[node] = filtered_reason(missing, node, own_labels, agent, view.affinity)
            else:
                kept.append((node, labels))

    # Zones and regions of the nodes holding bytes (every known node, not only candidates: a candidate close to a
    # cache node gains even if that node itself may not take the work); a candidate's labels, when the request gives
    # them, say where it is.
    zone_label, region_label = weights.zone_label, weights.region_label
    given = {node: labels for node, labels in candidates if labels}
    zones: Best = {}
    regions: Best = {}
    for node, share in shares.items():
        if share > 0:
            labels = given.get(node) or view.labels(node)
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
            files = "1 whole file" if whole == 1 else f"{whole} whole files"
            scores[index] = msgspec.structs.replace(item, reason=f"{item.reason} ({files})")
    return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, scores=scores, filtered=filtered)
