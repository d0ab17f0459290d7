"""Node affinity against node labels: Kubernetes' operators, OR of terms, AND of expressions, readable reasons."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.affinity import affinity_errors, mismatch, surely_excludes


def required(*terms: dict[str, Any], key: str = "requiredDuringSchedulingIgnoredDuringExecution") -> dict[str, Any]:
    return {key: {"nodeSelectorTerms": list(terms)}}


def expr(key: str, operator: str, *values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        out["values"] = list(values)
    return out


ZONE_A = {"zone": "a", "gpus": "4"}


@pytest.mark.parametrize(("expression", "matches"), [
    (expr("zone", "In", "a", "b"), True),
    (expr("zone", "In", "b"), False),
    (expr("zone", "NotIn", "b"), True),
    (expr("zone", "NotIn", "a"), False),
    (expr("region", "NotIn", "x"), True),  # absent key: NotIn holds, as in Kubernetes
    (expr("zone", "Exists"), True),
    (expr("region", "Exists"), False),
    (expr("region", "DoesNotExist"), True),
    (expr("zone", "DoesNotExist"), False),
    (expr("gpus", "Gt", "2"), True),
    (expr("gpus", "Gt", "4"), False),
    (expr("gpus", "Lt", "8"), True),
    (expr("zone", "Gt", "1"), False),  # not a number: no match
    (expr("kubernetes.io/hostname", "In", "node-1"), True),  # implicit hostname label
])
def test_operators(expression: dict[str, Any], matches: bool) -> None:
    assert (mismatch(required({"matchExpressions": [expression]}), "node-1", ZONE_A) is None) == matches


def test_terms_are_ored_and_expressions_anded() -> None:
    both = {"matchExpressions": [expr("zone", "In", "a"), expr("gpus", "Gt", "8")]}
    assert mismatch(required(both), "n", ZONE_A) == "gpus Gt [8]"
    assert mismatch(required(both, {"matchExpressions": [expr("zone", "In", "a")]}), "n", ZONE_A) is None
    assert mismatch(required({"matchExpressions": [expr("zone", "In", "b")]},
                             {"matchExpressions": [expr("zone", "In", "c")]}), "n", ZONE_A) == (
        "zone In [b] or zone In [c]")


def test_fluids_required_key_and_match_fields_on_the_node_name() -> None:
    term = {"matchFields": [expr("metadata.name", "In", "node-2")]}
    assert mismatch(required(term, key="required"), "node-2", {}) is None
    assert mismatch(required(term, key="required"), "node-1", {}) == "metadata.name In [node-2]"


def test_no_affinity_or_only_preferred_terms_allow_every_node() -> None:
    assert mismatch(None, "n", {}) is None
    assert mismatch({}, "n", {}) is None
    assert mismatch({"preferredDuringSchedulingIgnoredDuringExecution": []}, "n", {}) is None


@pytest.mark.parametrize(("affinity", "reason"), [
    (required({"matchExpressions": [expr("zone", "Near", "a")]}), "unknown operator 'Near'"),
    (required({"matchExpressions": [expr("gpus", "Gt", "x")]}), "gpus Gt needs one integer value"),
    (required({"matchExpressions": [expr("zone", "In")]}), "zone In needs at least one value"),
    # Shapes Kubernetes refuses: read as allowing, they would make a node a worker Kubernetes never schedules on.
    (required({"matchExpressions": [expr("zone", "Exists", "a")]}), "zone Exists takes no values"),
    (required({"matchExpressions": [expr("zone", "DoesNotExist", "b")]}), "zone DoesNotExist takes no values"),
    (required({"matchFields": [expr("metadata.name", "Exists")]}), "matchFields metadata.name takes In or NotIn"),
    (required({"matchFields": [expr("metadata.name", "In", "n", "m")]}),
     "matchFields metadata.name takes In or NotIn with one value"),
    (required({}), "an empty node selector term matches no node"),
    (required(), "nodeSelectorTerms is empty: no node matches"),
    ({"required": "zone=a"}, "a node selector term must be a mapping"),
])
def test_an_unreadable_affinity_allows_no_node_and_says_why(affinity: dict[str, Any], reason: str) -> None:
    found = mismatch(affinity, "n", ZONE_A)
    assert found is not None and found.startswith(reason), found


# --- Gt and Lt read integers as Kubernetes does ---

INT64 = (-(2**63), 2**63 - 1)


def kube_integer(text: str) -> int | None:
    """Go's ``strconv.ParseInt(text, 10, 64)``, which Kubernetes uses for both sides of Gt and Lt: an optional
    sign and ASCII digits, within 64 bits; no blanks, no ``_`` separators, no other digits."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or not all("0" <= c <= "9" for c in body):
        return None
    value = int(text)
    return value if INT64[0] <= value <= INT64[1] else None


# Label values and requirement values as a cluster may hold them: label values may contain ``_`` ("1_0" is a valid
# label value), and a typed value may carry blanks or non-ASCII digits.
NUMBERS = st.one_of(
    st.integers(-(2**65), 2**65).map(str),
    st.sampled_from(["+3", "-2", "007", "1_0", " 5", "5 ", "\u0663", "1e3", "0x10", "", "-", "+", "9" * 25]),
    st.text(alphabet="0123456789+-_ ", max_size=6),
)


@given(label=NUMBERS, wanted=NUMBERS, operator=st.sampled_from(["Gt", "Lt"]))
def test_gt_and_lt_read_integers_as_kubernetes_does(label: str, wanted: str, operator: str) -> None:
    found = mismatch(required({"matchExpressions": [expr("gpus", operator, wanted)]}), "n", {"gpus": label})
    have, want = kube_integer(label), kube_integer(wanted)
    if want is None:  # Kubernetes refuses such a requirement: it allows no node, and says why
        assert found == f"gpus {operator} needs one integer value"
        return
    matches = have is not None and (have > want if operator == "Gt" else have < want)
    assert (found is None) == matches, (label, wanted, found)


def _required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}


# (nodeSelector, nodeAffinity, whether node "n1" with labels {zone: a} is excluded for certain)
EXCLUSIONS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, bool]] = {
    "nothing asked": ({}, None, False),
    "selector on a known label, other value": ({"zone": "b"}, None, True),
    "selector on a known label, same value": ({"zone": "a"}, None, False),
    "selector on a label not reported": ({"gpu": "a100"}, None, False),
    "selector on the host name": ({"kubernetes.io/hostname": "n2"}, None, True),
    "In, other value": ({}, _required({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}),
                        True),
    "NotIn on a label not reported": ({}, _required({"matchExpressions": [
        {"key": "gpu", "operator": "NotIn", "values": ["x"]}]}), False),
    "DoesNotExist on a known label": ({}, _required({"matchExpressions": [
        {"key": "zone", "operator": "DoesNotExist"}]}), True),
    "one term of two may match": ({}, _required(
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
        {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}), False),
    "metadata.name of another node": ({}, _required({"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": ["n2"]}]}), True),
    "an empty term matches no node": ({}, _required({}), True),
    "an unreadable operator excludes nothing": ({}, _required({"matchExpressions": [
        {"key": "zone", "operator": "Near", "values": ["b"]}]}), False),
}


@pytest.mark.parametrize("case", EXCLUSIONS)
def test_only_a_certain_exclusion_counts(case: str) -> None:
    selector, affinity, excluded = EXCLUSIONS[case]
    assert surely_excludes(selector, affinity, "n1", {"zone": "a"}) is excluded



def test_a_misspelt_field_or_operator_is_refused_naming_it() -> None:
    """Kept and skipped, ``requried`` required nothing (every node allowed) and ``matchExpresions`` made an empty
    term (no node): both are refused at apply, each naming the field."""
    assert affinity_errors(None) == [] and affinity_errors({}) == []
    assert affinity_errors(required({"matchExpressions": [expr("zone", "In", "a")]}, key="required")) == []
    assert affinity_errors({"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1}]}) == []
    assert affinity_errors(required()) == [] and affinity_errors(required({})) == []  # valid, match no node
    assert affinity_errors({"requried": {"nodeSelectorTerms": []}}) == [
        "spec.nodeAffinity.requried is not a field here (use required, requiredDuringSchedulingIgnoredDuringExecution, "
        "preferredDuringSchedulingIgnoredDuringExecution)"]
    where = "spec.nodeAffinity.required.nodeSelectorTerms[0]"
    assert affinity_errors(required({"matchExpresions": [expr("zone", "In", "a")]}, key="required")) == [
        f"{where}.matchExpresions is not a field here (use matchExpressions, matchFields)"]
    assert affinity_errors(required({"matchExpressions": [{"key": "zone", "operator": "In", "value": ["a"]}]},
                                    key="required")) == [
        f"{where}.matchExpressions[0].value is not a field here (use key, operator, values)",
        f"{where}.matchExpressions[0]: zone In needs at least one value"]
    assert affinity_errors(required({"matchFields": [expr("zone", "In", "a")]}, key="required")) == [
        f"{where}.matchFields[0]: matchFields supports only metadata.name, got 'zone'"]
    assert affinity_errors({"required": "zone-a"}) == [
        "spec.nodeAffinity.required must be a node selector (nodeSelectorTerms: [...]), got 'zone-a'"]


@pytest.mark.parametrize("value", [1.1, True, 8, 0, False, None])
def test_a_value_that_is_no_string_is_refused_and_matches_no_node(value: Any) -> None:
    """Unquoted in YAML, ``1.10``, ``yes`` and ``010`` are 1.1, True and 8: read as text they matched no node
    labelled ``1.10``, ``yes`` or ``010`` (and ``values: [1.10]`` matched a node labelled ``1.1``) with no word of
    why. Kubernetes takes strings only; so does the dataset service at apply, and the reason says to quote."""
    affinity = required({"matchExpressions": [expr("version", "In", "1.1", value)]}, key="required")
    found = mismatch(affinity, "n", {"version": "1.1"})
    assert found is not None and found.startswith(f"values of version must be strings, got {value!r}"), found
    assert affinity_errors(affinity) == [
        f"spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0]: {found}"]
    gt = required({"matchExpressions": [expr("gpus", "Gt", 2)]})
    assert (mismatch(gt, "n", {"gpus": "4"}) or "").startswith("values of gpus must be strings, got 2 (int)")


def test_both_spellings_of_the_required_selector_are_refused_and_both_required_of_a_node() -> None:
    """``required`` was read and ``requiredDuringScheduling...`` beside it skipped: a node of zone b became a
    worker of a dataset that also asked for zone a."""
    zone_b = {"nodeSelectorTerms": [{"matchExpressions": [expr("zone", "In", "b")]}]}
    zone_a = {"nodeSelectorTerms": [{"matchExpressions": [expr("zone", "In", "a")]}]}
    both = {"required": zone_b, "requiredDuringSchedulingIgnoredDuringExecution": zone_a}
    assert mismatch(both, "n", {"zone": "b"}) == "zone In [a]"
    assert mismatch(both, "n", {"zone": "a"}) == "zone In [b]"
    assert surely_excludes({}, both, "n", {"zone": "b"}) is True
    assert affinity_errors(both) == [
        "spec.nodeAffinity gives both required and requiredDuringSchedulingIgnoredDuringExecution: give one "
        "(required, as Fluid, or Kubernetes' name for it), with every term it needs"]


def test_a_selector_without_node_selector_terms_is_refused_and_says_so() -> None:
    """Kubernetes requires ``nodeSelectorTerms``; without it the reason was "a node selector term must be a mapping,
    got None", and the apply was taken."""
    assert mismatch({"required": {}}, "n", {}) == "a required node selector needs nodeSelectorTerms: no node matches"
    assert affinity_errors({"required": {}}) == [
        "spec.nodeAffinity.required.nodeSelectorTerms is required (a list of terms, as in Kubernetes)"]


@pytest.mark.parametrize(("label", "operator"), [("many", "Gt"), ("1.5", "Lt"), (str(2**63), "Gt")])
def test_a_label_that_is_not_a_number_is_named_as_the_reason(label: str, operator: str) -> None:
    affinity = required({"matchExpressions": [expr("gpus", operator, "2")]})
    assert mismatch(affinity, "n", {"gpus": label}) == (
        f"gpus {operator} [2] (the node's label gpus={label!r} is not a number: {operator} compares 64-bit integers)")
    # A number that fails, or no label at all, is the expression alone: nothing on the node to fix but its value.
    assert mismatch(affinity, "n", {"gpus": "1" if operator == "Gt" else "3"}) == f"gpus {operator} [2]"
    assert mismatch(affinity, "n", {}) == f"gpus {operator} [2]"
