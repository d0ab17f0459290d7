"""Kubernetes node affinity against a node's labels, pure: which nodes a Dataset's ``nodeAffinity`` allows, and
why not.

The required terms are read from ``required`` (Fluid's Dataset field) or
``requiredDuringSchedulingIgnoredDuringExecution`` (Kubernetes' NodeAffinity; both given, a node must satisfy
both); preferred terms are not constraints and are ignored. Terms are ORed, the expressions of one term ANDed, as
in Kubernetes. Operators: In, NotIn, Exists, DoesNotExist, Gt, Lt (64-bit integers, read as Kubernetes reads
them), with the values Kubernetes requires of each (none for Exists and DoesNotExist), strings as in Kubernetes
(an unquoted YAML ``1.10`` is the number 1.1, never the label value ``1.10``). ``matchFields`` supports
``metadata.name`` (the node name) with In or NotIn and one value, as Kubernetes does.
A node always carries the implicit label ``kubernetes.io/hostname`` = its name. An affinity that cannot be read
(not the documented shape, an unknown operator) allows no node, and the reason says what is wrong, so a typo
never silently allows everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

HOSTNAME_LABEL = "kubernetes.io/hostname"
NODE_NAME_FIELD = "metadata.name"
REQUIRED_KEYS = ("required", "requiredDuringSchedulingIgnoredDuringExecution")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
# An integer for Gt and Lt, as Go's strconv.ParseInt reads it in base 10: a sign, ASCII digits, 64 bits.
INTEGER = re.compile(r"[+-]?[0-9]+")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Stands for a selector without ``nodeSelectorTerms`` (Kubernetes requires the field), so the reason says so.
NO_TERMS = object()


def node_labels(node: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The node's labels with the implicit hostname label (an explicit one wins)."""
    return {HOSTNAME_LABEL: node, **labels}


def required_selectors(affinity: Mapping[str, Any] | None) -> list[list[Any]]:
    """The terms of each required node selector given (``required``, ``requiredDuring...``), none when the affinity
    requires nothing. Both given (``affinity_errors`` refuses that at apply): a node must satisfy both, since
    reading one and skipping the other would drop a constraint without a word."""
    if not affinity:
        return []
    selectors = []
    for key in REQUIRED_KEYS:
        selector = affinity.get(key)
        if selector is None:
            continue
        if not isinstance(selector, Mapping):
            selectors.append([selector])  # not a selector: reported by ``mismatch``
            continue
        terms = selector.get("nodeSelectorTerms")
        selectors.append(terms if isinstance(terms, list) else [NO_TERMS if terms is None else terms])
    return selectors


def _expression_text(expression: Mapping[str, Any]) -> str:
    key, operator = expression.get("key", ""), expression.get("operator", "")
    values = expression.get("values") or []
    if operator in ("Exists", "DoesNotExist"):
        return f"{key} {operator}"
    shown = ",".join(str(v) for v in values) if isinstance(values, list) else str(values)
    return f"{key} {operator} [{shown}]"


def _expression_error(expression: Any) -> str | None:
    if not isinstance(expression, Mapping) or not isinstance(expression.get("key"), str):
        return f"a match expression must have a key and an operator, got {expression!r}"
    operator = expression.get("operator")
    if operator not in OPERATORS:
        return f"unknown operator {operator!r} (use {', '.join(OPERATORS)})"
    values = expression.get("values") or []
    if not isinstance(values, list):
        return f"values of {expression['key']} must be a list"
    if typed := [value for value in values if not isinstance(value, str)]:
        # Kubernetes takes strings only. Read as text, YAML's 1.10, yes and 010 became 1.1, True and 8: a node
        # labelled 1.10 never matched, with no word of why.
        return (f"values of {expression['key']} must be strings, got {typed[0]!r} ({type(typed[0]).__name__}): "
                "quote it, as YAML reads an unquoted 1.10 as 1.1, yes as true and 010 as 8")
    if operator in ("Gt", "Lt"):
        if len(values) != 1 or _integer(values[0]) is None:
            return f"{expression['key']} {operator} needs one integer value"
    elif operator in ("In", "NotIn") and not values:
        return f"{expression['key']} {operator} needs at least one value"
    elif operator in ("Exists", "DoesNotExist") and values:
        # Kubernetes refuses this shape: values here mean someone meant In or NotIn.
        return f"{expression['key']} {operator} takes no values (for given values use In or NotIn)"
    return None


def _field_error(expression: Mapping[str, Any]) -> str | None:
    """What Kubernetes allows of a ``matchFields`` expression beyond ``_expression_error``: the node name, In or
    NotIn, one value."""
    if expression["key"] != NODE_NAME_FIELD:
        return f"matchFields supports only {NODE_NAME_FIELD}, got {expression['key']!r}"
    if expression["operator"] not in ("In", "NotIn") or len(expression.get("values") or []) != 1:
        return f"matchFields {NODE_NAME_FIELD} takes In or NotIn with one value (a node name)"
    return None


def _integer(value: Any) -> int | None:
    """The value as Kubernetes reads Gt and Lt (Go's ``strconv.ParseInt(s, 10, 64)``), or None. Python's ``int``
    is laxer: it takes ``1_0`` (a valid label value), blanks, non-ASCII digits and any size, so a node Kubernetes
    would not schedule on could become a worker."""
    text = str(value)
    if not INTEGER.fullmatch(text):
        return None
    number = int(text)
    return number if INT64_MIN <= number <= INT64_MAX else None


def _matches(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = [str(v) for v in expression.get("values") or []]
    present = key in labels
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator == "In":
        return present and labels[key] in values
    if operator == "NotIn":
        return not present or labels[key] not in values
    have, want = _integer(labels.get(key, "")), _integer(values[0])
    if have is None or want is None:
        return False
    return have > want if operator == "Gt" else have < want


def _not_a_number(expression: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Why a Gt or Lt expression the node fails could never hold: its label is not an integer. Without it the
    reason read as if the number were too small or too large, and the label was looked at last."""
    key = expression["key"]
    if expression["operator"] not in ("Gt", "Lt") or key not in labels or _integer(labels[key]) is not None:
        return ""
    return (f" (the node's label {key}={labels[key]!r} is not a number: {expression['operator']} compares 64-bit "
            "integers)")


def _term_mismatch(term: Any, node: str, labels: Mapping[str, str]) -> str | None:
    """Why the node fails this term (the first failing expression), or None when it matches."""
    if term is NO_TERMS:
        return "a required node selector needs nodeSelectorTerms: no node matches"
    if not isinstance(term, Mapping):
        return f"a node selector term must be a mapping, got {term!r}"
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not isinstance(expressions, list) or not isinstance(fields, list):
        return "matchExpressions and matchFields must be lists"
    if not expressions and not fields:
        return "an empty node selector term matches no node"
    for expression in expressions:
        if error := _expression_error(expression):
            return error
        if not _matches(expression, labels):
            return _expression_text(expression) + _not_a_number(expression, labels)
    for expression in fields:
        if error := _expression_error(expression) or _field_error(expression):
            return error
        if not _matches(expression, {NODE_NAME_FIELD: node}):
            return _expression_text(expression)
    return None


# The fields of each level of a node affinity (Fluid's ``required``, Kubernetes' NodeAffinity and NodeSelector):
# ``affinity_errors`` refuses any other name, since a misspelt one would be skipped (``requried`` requires nothing).
AFFINITY_FIELDS = (*REQUIRED_KEYS, "preferredDuringSchedulingIgnoredDuringExecution")
SELECTOR_FIELDS = ("nodeSelectorTerms",)
TERM_FIELDS = ("matchExpressions", "matchFields")
EXPRESSION_FIELDS = ("key", "operator", "values")


def _unknown(value: Mapping[str, Any], fields: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{name} is not a field here (use {', '.join(fields)})" for name in value if name not in fields]


def affinity_errors(affinity: Mapping[str, Any] | None, where: str = "spec.nodeAffinity") -> list[str]:
    """Why a Dataset's ``nodeAffinity`` cannot be read, each naming the field (empty: it can). Checked at apply: a
    misspelt field or operator would otherwise require nothing, or allow no node with the reason only in the
    runtime's status. Preferred terms are not constraints (ignored) and not checked below their name. An empty
    term or term list is valid, as in Kubernetes (it matches no node, which ``mismatch`` says)."""
    if not affinity:
        return []
    errors = _unknown(affinity, AFFINITY_FIELDS, where)
    if all(affinity.get(key) is not None for key in REQUIRED_KEYS):
        # Both would be required of a node (``mismatch``); one spelling says what is meant.
        errors.append(f"{where} gives both {' and '.join(REQUIRED_KEYS)}: give one (required, as Fluid, or "
                      "Kubernetes' name for it), with every term it needs")
    for key in REQUIRED_KEYS:
        selector = affinity.get(key)
        if selector is None:
            continue
        at = f"{where}.{key}"
        if not isinstance(selector, Mapping):
            errors.append(f"{at} must be a node selector (nodeSelectorTerms: [...]), got {selector!r}")
            continue
        errors += _unknown(selector, SELECTOR_FIELDS, at)
        terms = selector.get("nodeSelectorTerms")
        if terms is None:
            errors.append(f"{at}.nodeSelectorTerms is required (a list of terms, as in Kubernetes)")
            continue
        if not isinstance(terms, list):
            errors.append(f"{at}.nodeSelectorTerms must be a list of terms")
            continue
        for index, term in enumerate(terms):
            errors += _term_errors(term, f"{at}.nodeSelectorTerms[{index}]")
    return errors


def _term_errors(term: Any, where: str) -> list[str]:
    if not isinstance(term, Mapping):
        return [f"{where} must be a mapping of matchExpressions and matchFields, got {term!r}"]
    errors = _unknown(term, TERM_FIELDS, where)
    for field in TERM_FIELDS:
        expressions = term.get(field) or []
        if not isinstance(expressions, list):
            errors.append(f"{where}.{field} must be a list")
            continue
        for index, expression in enumerate(expressions):
            at = f"{where}.{field}[{index}]"
            if isinstance(expression, Mapping):  # a misspelt name first: it explains the error that follows
                errors += _unknown(expression, EXPRESSION_FIELDS, at)
            error = _expression_error(expression)
            if error is None and field == "matchFields":
                error = _field_error(expression)
            if error is not None:
                errors.append(f"{at}: {error}")
    return errors


def mismatch(affinity: Mapping[str, Any] | None, node: str, labels: Mapping[str, str]) -> str | None:
    """Why ``node`` with ``labels`` does not satisfy the required node affinity, or None when it does."""
    all_labels = node_labels(node, labels)
    for terms in required_selectors(affinity):
        if not terms:
            return "nodeSelectorTerms is empty: no node matches"
        reasons = []
        for term in terms:
            reason = _term_mismatch(term, node, all_labels)
            if reason is None:
                break
            reasons.append(reason)
        else:
            return " or ".join(dict.fromkeys(reasons))
    return None


def surely_excludes(node_selector: Mapping[str, Any], affinity: Mapping[str, Any] | None, node: str,
                    labels: Mapping[str, str]) -> bool:
    """Whether a pod's ``nodeSelector`` and required node affinity (``affinity``: its ``nodeAffinity``) exclude
    ``node`` for certain, judged by the labels known of it (``labels``, and the implicit host name label). A key
    ``labels`` lacks may still be on the node (an agent reports only the labels it is given), so an expression on
    one excludes nothing; neither does a selector that cannot be read (the API server refuses such a pod)."""
    known = node_labels(node, labels)
    if any(key in known and known[key] != value for key, value in node_selector.items()):
        return True
    return any(terms and all(_term_excludes(term, node, known) for term in terms)
               for terms in required_selectors(affinity))


def _term_excludes(term: Any, node: str, known: Mapping[str, str]) -> bool:
    """Whether the node fails this term for certain (terms are ORed: the pod excludes it when it fails them all)."""
    if not isinstance(term, Mapping):  # NO_TERMS too: a selector the API server refuses
        return False
    expressions, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not isinstance(expressions, list) or not isinstance(fields, list):
        return False
    if not expressions and not fields:
        return True  # an empty term matches no node
    if any(_expression_error(e) for e in expressions) or any(_expression_error(e) or _field_error(e) for e in fields):
        return False
    return (any(e["key"] in known and not _matches(e, known) for e in expressions)
            or any(not _matches(e, {NODE_NAME_FIELD: node}) for e in fields))
