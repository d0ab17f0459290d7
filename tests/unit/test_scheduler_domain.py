"""The scheduler's scoring (``services.scheduler.domain.score``), pure: shares, tiered locality, required mode, work
without datasets, bad input; and, with Hypothesis, that more cached bytes never lower a node's score and that the
order of the request's lists never changes the answer; a reply limited to the best nodes lists exactly the top of
the reference's full ranking."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.events.agent import AgentHeartbeat, MountGroup, MountState
from libs.events.schedule import Candidate, DatasetUse, ScoreReply, ScoreRequest
from services.scheduler.domain import (
    MAX_DATASETS,
    MAX_REASON_CHARS,
    NodeAgent,
    Places,
    StaticView,
    Sums,
    Use,
    Weights,
    _derive,
    cache_fact,
    filtered_reason,
    missing_reason,
    score,
    unknown_in,
)
from tests.unit.scheduler_reference import reference_score

ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
IMAGENET = ("ml", "imagenet")
LABELS = ("ml", "labels")


def view() -> StaticView:
    return StaticView(
        totals={IMAGENET: 1000, LABELS: 100},
        cache={IMAGENET: {"node-a": 900, "node-c": 100}, LABELS: {"node-b": 100}},
        node_labels={
            "node-a": {ZONE: "z1", REGION: "r1"},
            "node-b": {ZONE: "z1", REGION: "r1"},
            "node-c": {ZONE: "z2", REGION: "r1"},
            "node-d": {ZONE: "z3", REGION: "r2"},
        },
    )


def request(*uses: DatasetUse, candidates: list[Candidate] | None = None, limit: int = 100) -> ScoreRequest:
    return ScoreRequest(id="r1", datasets=list(uses), candidates=candidates or [], limit=limit)


def test_the_node_holding_most_of_the_bytes_comes_first_then_its_zone_then_its_region() -> None:
    reply = score(request(DatasetUse(name="imagenet", namespace="ml")), view(), Weights())
    assert reply.error == "" and reply.causation_id == "r1"
    assert [(s.node, s.score) for s in reply.scores] == [("node-a", 90), ("node-b", 45), ("node-c", 18),
                                                         ("node-d", 0)]
    first = reply.scores[0]
    assert first.cached_bytes == 900 and first.share == 0.9 and "holds 90.0% of ml/imagenet" in first.reason
    assert "same zone (z1) as node-a" in reply.scores[1].reason
    # node-c holds 10% itself (10 points) but is in node-a's region (0.9 x 20 = 18).
    assert "same region (r1) as node-a" in reply.scores[2].reason


def test_share_is_of_all_requested_bytes_and_weights_are_data() -> None:
    both = request(DatasetUse(name="imagenet", namespace="ml"), DatasetUse(name="labels", namespace="ml"))
    reply = score(both, view(), Weights(zone=0, region=0))
    assert {s.node: s.cached_bytes for s in reply.scores} == {"node-a": 900, "node-b": 100, "node-c": 100,
                                                              "node-d": 0}
    assert [(s.node, s.score) for s in reply.scores][:2] == [("node-a", 82), ("node-b", 9)]


def test_required_keeps_only_nodes_holding_the_dataset() -> None:
    reply = score(request(DatasetUse(name="imagenet", namespace="ml", required=True)), view(), Weights())
    assert [s.node for s in reply.scores] == ["node-a", "node-c"]
    assert reply.filtered == {"node-b": "holds none of ml/imagenet (required)",
                              "node-d": "holds none of ml/imagenet (required)"}


def beat(node: str, *mounts: tuple[str, MountState], labels: dict[str, str] | None = None) -> AgentHeartbeat:
    """A heartbeat reporting a mount of each (dataset name in namespace ml, state), with a message that must never
    show in a reason."""
    return AgentHeartbeat(node=node, labels=labels or {}, all_runtimes=True, peer_host="10.0.0.1",
                          mount_groups=[MountGroup(namespace="ml", state=state, message="s3://key:secret@b failed",
                                                   datasets={name: 7000 if state == "Serving" else 0})
                                        for name, state in mounts])


def test_a_filtered_node_says_why_it_holds_none_of_the_required_dataset() -> None:
    """Each node left out says the cause the view knows, upstream first, in words that do not name the node (so
    kube-scheduler's event adds equal ones up): the dataset's nodeAffinity, no agent, an agent that missed its
    heartbeats, no mount of the dataset, a mount not serving, or none of its bytes yet; never a mount's message."""
    spread = StaticView(
        totals={IMAGENET: 1000, LABELS: 100},
        cache={IMAGENET: {"node-a": 900}, LABELS: {"node-a": 100}},
        agents={"node-a": NodeAgent(beat("node-a", ("imagenet", "Serving"), ("labels", "Serving"))),
                "node-b": NodeAgent(beat("node-b", ("imagenet", "Serving"))),
                "node-c": NodeAgent(beat("node-c", ("imagenet", "Serving")), fresh=False),
                "node-d": NodeAgent(beat("node-d", labels={"disk": "hdd"})),
                "node-e": NodeAgent(beat("node-e", ("imagenet", "Starting"))),
                "node-f": NodeAgent(beat("node-f", ("imagenet", "Failing"))),
                "node-g": NodeAgent(beat("node-g"))},
        affinities={IMAGENET: {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}})
    names = ["node-a", "node-b", "node-c", "node-d", "node-e", "node-f", "node-g", "node-h", "node-i"]
    candidates = [Candidate(name=name, labels={"disk": "hdd"} if name == "node-i" else {}) for name in names]
    reply = score(request(DatasetUse(name="imagenet", namespace="ml", required=True), candidates=candidates),
                  spread, Weights())
    assert [s.node for s in reply.scores] == ["node-a"]
    assert reply.filtered == {
        "node-b": "holds none of ml/imagenet (required)",
        "node-c": "the node's Shoal agent missed its heartbeats: its cache of dataset ml/imagenet is not counted "
                  "(required)",
        "node-d": "outside the nodeAffinity of dataset ml/imagenet (required)",  # by its agent's labels
        "node-e": "the node's mount of dataset ml/imagenet is Starting, not serving yet (required)",
        "node-f": "the node's mount of dataset ml/imagenet is Failing, not serving yet (required)",
        "node-g": "not a cache worker of dataset ml/imagenet: the node has no mount of it (required)",
        "node-h": "no Shoal agent on the node to cache dataset ml/imagenet (required)",
        "node-i": "outside the nodeAffinity of dataset ml/imagenet (required)",  # by the request's labels
    }
    # Several required datasets: the first missing one is named, the others counted; under paths, said so.
    both = score(request(DatasetUse(name="imagenet", namespace="ml", required=True, paths=["/train"]),
                         DatasetUse(name="labels", namespace="ml", required=True), candidates=candidates[:2]),
                 spread, Weights())
    assert both.filtered == {"node-b": "holds none of ml/imagenet under the requested paths (required, nor 1 more "
                                       "required dataset(s))"}


def test_a_filtered_nodes_reason_is_bounded_whatever_the_pod_requires() -> None:
    uses = [Use((f"ns-{i:02d}" + "n" * 57, "d" * 63), (), True) for i in range(MAX_DATASETS)]
    reason = filtered_reason(uses, "node-x", {}, NodeAgent(None), lambda dataset: None)
    assert len(reason) <= MAX_REASON_CHARS and "63 more" in reason and "node-x" not in reason
    long = [Use(("n" * 200, "d" * 200), (), True)]
    assert len(filtered_reason(long, "node-x", {}, None, lambda dataset: None)) == MAX_REASON_CHARS


def test_the_unknown_dataset_error_is_read_back_and_no_other_error_is() -> None:
    """The extender's filter tells a required dataset that does not exist from any other error by the answer's
    error alone: ``unknown_in`` reads back the dataset ``score`` named, and nothing else."""
    unknown = score(request(DatasetUse(name="nope", namespace="ml", required=True)), view(), Weights())
    assert unknown_in(unknown.error) == ("ml", "nope")
    for other in ("too many datasets: 65 (at most 64)", "a candidate without a name", "paths of ml/x must start "
                  "with '/'", "the scheduler is starting (inventory snapshots not all read yet); ask again shortly",
                  "unknown dataset ", "unknown dataset ml", ""):
        assert unknown_in(other) is None, other


@given(st.text(min_size=1), st.text(min_size=1))
def test_a_missing_datasets_reason_names_it_within_the_bound(namespace: str, name: str) -> None:
    for source in (False, True):
        reason = missing_reason((namespace, name), source=source)
        assert len(reason) <= MAX_REASON_CHARS
        if len(namespace) + len(name) < 64:
            assert f"dataset {namespace}/{name}" in reason and reason.endswith("does not exist (required)")
    assert missing_reason(("ml", "imagenett")) == "dataset ml/imagenett does not exist (required)"


def test_work_without_datasets_prefers_nodes_without_cache() -> None:
    reply = score(request(), view(), Weights())
    assert [(s.node, s.score) for s in reply.scores] == [("node-d", 100), ("node-a", 0), ("node-b", 0),
                                                         ("node-c", 0)]


def test_candidates_limit_the_answer_and_unknown_nodes_get_no_preference() -> None:
    candidates = [Candidate(name="node-x", labels={ZONE: "z1"}), Candidate(name="node-c"), Candidate(name="node-y")]
    reply = score(request(DatasetUse(name="imagenet", namespace="ml"), candidates=candidates), view(), Weights())
    # node-x is unknown but says it is in zone z1, next to node-a's 90 %.
    assert [(s.node, s.score) for s in reply.scores] == [("node-x", 45), ("node-c", 18), ("node-y", 0)]


def test_the_candidates_labels_say_where_the_holders_are_too() -> None:
    """The extender sends Node objects, zone labels and all, while agents report no labels unless told
    (``SHOAL_NODE_LABELS``): a holder among the candidates is in the zone its Node object says, so its zone-mates
    gain from it (the labels of the candidates were read for themselves only, and no node got a zone bonus)."""
    bare = StaticView(totals={IMAGENET: 1000}, cache={IMAGENET: {"node-a": 1000, "node-d": 400}},
                      node_labels={"node-a": {}, "node-b": {}, "node-c": {}, "node-d": {REGION: "r9"}})
    candidates = [Candidate(name="node-a", labels={ZONE: "z1", REGION: "r1"}),
                  Candidate(name="node-b", labels={ZONE: "z1", REGION: "r1"}),
                  Candidate(name="node-c", labels={ZONE: "z2", REGION: "r1"}), Candidate(name="node-e")]
    question = request(DatasetUse(name="imagenet", namespace="ml"), candidates=candidates)
    reply = score(question, bare, Weights())
    assert [(s.node, s.score) for s in reply.scores] == [("node-a", 100), ("node-b", 50), ("node-c", 20),
                                                         ("node-e", 0)]
    assert "same zone (z1) as node-a" in reply.scores[1].reason
    assert msgspec.json.encode(reply) == msgspec.json.encode(reference_score(question, bare, Weights()))
    # A holder that is not a candidate (kube-scheduler found it infeasible) is where its agent says.
    elsewhere = [Candidate(name="node-b", labels={REGION: "r9"}), Candidate(name="node-c", labels={ZONE: "z1"})]
    reply = score(request(DatasetUse(name="imagenet", namespace="ml"), candidates=elsewhere), bare, Weights())
    assert [(s.node, s.score) for s in reply.scores] == [("node-b", 8), ("node-c", 0)]


def test_bad_input_is_an_error_answer() -> None:
    unknown = score(request(DatasetUse(name="nope")), view(), Weights())
    assert unknown.error == "unknown dataset default/nope" and unknown.scores == []
    too_many = score(request(*[DatasetUse(name=f"d{i}") for i in range(MAX_DATASETS + 1)]), view(), Weights())
    assert "too many datasets" in too_many.error
    relative = score(request(DatasetUse(name="imagenet", namespace="ml", paths=["train"])), view(), Weights())
    assert "must start with '/'" in relative.error
    nameless = score(request(candidates=[Candidate(name="")]), view(), Weights())
    assert nameless.error == "a candidate without a name"


def test_an_empty_dataset_gives_no_preference() -> None:
    empty = StaticView(totals={IMAGENET: 0}, node_labels={"node-a": {}, "node-b": {}})
    reply = score(request(DatasetUse(name="imagenet", namespace="ml")), empty, Weights())
    assert [(s.node, s.score) for s in reply.scores] == [("node-a", 0), ("node-b", 0)]


# --- properties ---

NODES = [f"node-{i}" for i in range(6)]
DATASETS = [("ml", f"d{i}") for i in range(3)]

cache_strategy = st.dictionaries(
    st.sampled_from(DATASETS), st.dictionaries(st.sampled_from(NODES), st.integers(0, 1000), max_size=6),
    min_size=len(DATASETS), max_size=len(DATASETS))
labels_strategy = st.dictionaries(
    st.sampled_from(NODES),
    st.fixed_dictionaries({}, optional={ZONE: st.sampled_from(["z1", "z2"]), REGION: st.sampled_from(["r1", "r2"])}),
    max_size=6)
weights_strategy = st.builds(Weights, node=st.integers(0, 200), zone=st.integers(0, 200),
                             region=st.integers(0, 200)).filter(lambda w: max(w.node, w.zone, w.region) > 0)
uses_strategy = st.lists(st.builds(DatasetUse, name=st.sampled_from([d[1] for d in DATASETS]),
                                   namespace=st.just("ml"), required=st.booleans(),
                                   paths=st.lists(st.sampled_from(["/a", "/b/c"]), max_size=2)),
                         max_size=4)


def static(cache: dict[tuple[str, str], dict[str, int]], labels: dict[str, dict[str, str]]) -> StaticView:
    return StaticView(totals={d: 1000 for d in DATASETS}, cache=cache,
                      node_labels={node: labels.get(node, {}) for node in NODES})


@settings(max_examples=150, deadline=None)
@given(cache=cache_strategy, labels=labels_strategy, weights=weights_strategy, uses=uses_strategy,
       node=st.sampled_from(NODES), dataset=st.sampled_from(DATASETS), more=st.integers(1, 1000))
def test_more_cached_bytes_never_lower_a_nodes_score(cache: dict[tuple[str, str], dict[str, int]],
                                                    labels: dict[str, dict[str, str]], weights: Weights,
                                                    uses: list[DatasetUse], node: str, dataset: tuple[str, str],
                                                    more: int) -> None:
    before = score(request(*uses), static(cache, labels), weights)
    grown = {d: dict(nodes) for d, nodes in cache.items()}
    grown[dataset][node] = min(grown[dataset].get(node, 0) + more, 1000)
    after = score(request(*uses), static(grown, labels), weights)
    old = {s.node: s.score for s in before.scores}
    new = {s.node: s.score for s in after.scores}
    if uses and node in old:
        assert node in new, "a node holding more of a required dataset was filtered"
        assert new[node] >= old[node]


@settings(max_examples=150, deadline=None)
@given(cache=cache_strategy, labels=labels_strategy, weights=weights_strategy, uses=uses_strategy,
       candidates=st.lists(st.builds(Candidate, name=st.sampled_from([*NODES, "node-x"]),
                                     labels=st.sampled_from([{}, {ZONE: "z1"}, {REGION: "r2"}])), max_size=8),
       seed=st.randoms(use_true_random=False))
def test_the_order_of_the_request_never_changes_the_answer(cache: dict[tuple[str, str], dict[str, int]],
                                                          labels: dict[str, dict[str, str]], weights: Weights,
                                                          uses: list[DatasetUse], candidates: list[Candidate],
                                                          seed: object) -> None:
    shuffled_uses, shuffled_candidates = list(uses), list(candidates)
    seed.shuffle(shuffled_uses)  # type: ignore[attr-defined]
    seed.shuffle(shuffled_candidates)  # type: ignore[attr-defined]
    shuffled_uses = [msgspec.structs.replace(use, paths=list(reversed(use.paths))) for use in shuffled_uses]
    one = score(request(*uses, candidates=candidates), static(cache, labels), weights)
    two = score(request(*shuffled_uses, candidates=shuffled_candidates), static(cache, labels), weights)
    assert msgspec.json.encode(one) == msgspec.json.encode(two)
    assert [s.node for s in one.scores] == [s.node for s in sorted(one.scores, key=lambda s: (-s.score, s.node))]


@settings(max_examples=300, deadline=None)
@given(cache=cache_strategy, labels=labels_strategy, weights=weights_strategy, uses=uses_strategy,
       candidates=st.lists(st.builds(Candidate, name=st.sampled_from([*NODES, "node-x"]),
                                     labels=st.sampled_from([{}, {ZONE: "z1"}, {REGION: "r2"},
                                                             {ZONE: "z2", REGION: "r1"}])), max_size=8),
       totals=st.lists(st.integers(0, 1500), min_size=len(DATASETS), max_size=len(DATASETS)))
def test_the_fast_scoring_answers_as_the_reference_does(cache: dict[tuple[str, str], dict[str, int]],
                                                       labels: dict[str, dict[str, str]], weights: Weights,
                                                       uses: list[DatasetUse], candidates: list[Candidate],
                                                       totals: list[int]) -> None:
    """Every answer of ``score`` equals the straightforward first version's (``scheduler_reference``), byte for
    byte: scores, reasons, order, filtered nodes. Totals below a node's bytes and empty datasets included."""
    static_view = StaticView(totals=dict(zip(DATASETS, totals, strict=True)), cache=cache,
                             node_labels={node: labels.get(node, {}) for node in NODES})
    fast = score(request(*uses, candidates=candidates), static_view, weights)
    slow = reference_score(request(*uses, candidates=candidates), static_view, weights)
    assert msgspec.json.encode(fast) == msgspec.json.encode(slow)


def test_places_number_each_nodes_zone_and_region() -> None:
    table = {"a": {ZONE: "z1", REGION: "r1"}, "b": {ZONE: "z1"}}
    places = Places.of(["b", "a", "c", "a"], lambda node: table.get(node, {}), ZONE, REGION)
    assert places.nodes == ("a", "b", "c")
    assert [places.kinds[k] for k in places.kind] == [("z1", "r1"), ("z1", ""), ("", "")]
    assert places.zones == {"z1": (0, 1)} and places.regions == {"r1": (0,)}
    assert places.where("b") == ("z1", "") and places.where("x") is None


def test_a_tie_between_zone_and_region_goes_to_the_zone_as_in_the_reference() -> None:
    tied = StaticView(totals={IMAGENET: 1000}, cache={IMAGENET: {"node-a": 1000}},
                      node_labels={"node-a": {ZONE: "z1", REGION: "r1"}, "node-b": {ZONE: "z1", REGION: "r1"}})
    weights = Weights(node=100, zone=50, region=50)
    fast = score(request(DatasetUse(name="imagenet", namespace="ml")), tied, weights)
    assert fast.scores[1].reason.startswith("same zone (z1) as node-a")
    slow = reference_score(request(DatasetUse(name="imagenet", namespace="ml")), tied, weights)
    assert msgspec.json.encode(fast) == msgspec.json.encode(slow)


# --- the compact reply: the best ``limit`` nodes, and how many more and their best score ---

def truncated(full: ScoreReply, limit: int) -> ScoreReply:
    """What a reply limited to ``limit`` nodes must be: the full ranking's first ``limit`` nodes, the count of the
    others and the best score among them."""
    if not limit or len(full.scores) <= limit:
        return full
    return msgspec.structs.replace(full, scores=full.scores[:limit], unlisted=len(full.scores) - limit,
                                   unlisted_score=full.scores[limit].score)


def test_a_limited_reply_lists_the_best_nodes_and_says_what_the_others_score_at_most() -> None:
    top_two = score(request(DatasetUse(name="imagenet", namespace="ml"), limit=2), view(), Weights())
    assert [(s.node, s.score) for s in top_two.scores] == [("node-a", 90), ("node-b", 45)]
    assert (top_two.unlisted, top_two.unlisted_score) == (2, 18)
    every = score(request(DatasetUse(name="imagenet", namespace="ml"), limit=0), view(), Weights())
    assert len(every.scores) == 4 and every.unlisted == 0
    without_data = score(request(limit=1), view(), Weights())
    assert [(s.node, s.score) for s in without_data.scores] == [("node-d", 100)]
    assert (without_data.unlisted, without_data.unlisted_score) == (3, 0)
    assert score(request(limit=-1), view(), Weights()).error == "limit must be 0 (every node) or more, not -1"


@settings(max_examples=150, deadline=None)
@given(cache=cache_strategy, labels=labels_strategy, weights=weights_strategy, uses=uses_strategy,
       candidates=st.lists(st.builds(Candidate, name=st.sampled_from([*NODES, "node-x"]),
                                     labels=st.sampled_from([{}, {ZONE: "z1"}, {REGION: "r2"}])), max_size=8),
       totals=st.lists(st.integers(0, 1500), min_size=len(DATASETS), max_size=len(DATASETS)),
       limit=st.integers(0, 8))
def test_the_best_nodes_listed_are_the_top_of_the_references_full_ranking(
        cache: dict[tuple[str, str], dict[str, int]], labels: dict[str, dict[str, str]], weights: Weights,
        uses: list[DatasetUse], candidates: list[Candidate], totals: list[int], limit: int) -> None:
    """A reply limited to ``limit`` nodes equals the reference's full answer cut after ``limit`` nodes, with the
    count and best score of the rest."""
    static_view = StaticView(totals=dict(zip(DATASETS, totals, strict=True)), cache=cache,
                             node_labels={node: labels.get(node, {}) for node in NODES})
    fast = score(request(*uses, candidates=candidates, limit=limit), static_view, weights)
    full = reference_score(request(*uses, candidates=candidates, limit=0), static_view, weights)
    assert msgspec.json.encode(fast) == msgspec.json.encode(truncated(full, limit))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12),
       st.lists(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 3)), max_size=4), max_size=12))
def test_best_holders_patched_where_the_bytes_moved_equal_a_full_pass(start: list[int],
                                                                      steps: list[list[tuple[int, int]]]) -> None:
    """``_derive`` keeps each zone's and region's two best holders and patches them at the moved positions (a
    best holder that falls makes its group be read again); after any moves, with ties, they equal a full pass."""
    nodes = [f"n{i:02d}" for i in range(len(start))]
    table = {node: {"z": f"z{i % 3}", "r": f"r{i % 2}"} for i, node in enumerate(nodes)}
    places = Places.of(nodes, lambda node: table[node], "z", "r")
    column = list(start)
    kept = Sums(column)
    requested = 3 * len(column)
    _derive(kept, places, requested)
    for step in steps:
        moved = set()
        for spot, size in step:
            if spot < len(column):
                column[spot] = size
                moved.add(spot)
        kept.moved = moved
        assert _derive(kept, places, requested) == _derive(Sums(list(column)), places, requested)


def test_the_cache_facts_id_says_what_the_figure_was_worked_out_from() -> None:
    """Replicas that folded the same events publish one id (JetStream keeps one fact); a figure worked out from other
    positions, another manifest or another count is a new id, also when it comes back to an earlier value."""
    positions = [("n1", "i1", 4), ("n2", "i7", 9)]
    manifest = ("ml.d.x-1-0", 1, 0, "2026-12-05T10:00:00Z")
    fact = cache_fact(("ml", "d"), 500, 700, 2, positions, manifest, now=1_800_000_000.0)
    assert (fact.name, fact.namespace, fact.unique_cached_bytes, fact.nodes_cached_bytes, fact.nodes) == (
        "d", "ml", 500, 700, 2)
    assert fact.observed_at == "2027-01-15T08:00:00Z"
    again = cache_fact(("ml", "d"), 500, 700, 2, list(reversed(positions)), manifest, now=1_800_000_009.0)
    assert again.id == fact.id and fact.id.startswith("scheduler.ml.d.cache.")
    assert len({fact.id, cache_fact(("ml", "d"), 400, 700, 2, positions, manifest, 0).id,
                cache_fact(("ml", "d"), 500, 900, 2, positions, manifest, 0).id,
                cache_fact(("ml", "d"), 500, 700, 2, [("n1", "i1", 5), ("n2", "i7", 9)], manifest, 0).id,
                cache_fact(("ml", "d"), 500, 700, 2, positions, (*manifest[:3], "later"), 0).id,
                cache_fact(("ml", "e"), 500, 700, 2, positions, manifest, 0).id}) == 6
