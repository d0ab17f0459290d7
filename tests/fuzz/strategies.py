"""Generated input for the fuzz tests: Hypothesis strategies built from Shoal's JSON Schemas, and mutations of the
payloads they produce.

Decides:
- how many examples every fuzz test runs (``SHOAL_FUZZ_EXAMPLES``, a few hundred by default so ``make test`` stays
  fast; ``make soak`` sets 10000) and the one settings profile they share: derandomized (the same examples on every
  run, so CI is repeatable), no example database, no deadline (a loaded machine must not make a test flaky);
- how a schema becomes a strategy (``from_schema``): only the keywords ``docs/schemas`` uses (``type``,
  ``properties``/``required``/``additionalProperties``, ``items``/``prefixItems``/``minItems``/``maxItems``,
  ``enum``, ``anyOf``, ``$ref`` into ``$defs``, ``contentEncoding``). hypothesis-jsonschema was tried first: its
  last release (0.23.1) fails on this Hypothesis (``'many' object has no attribute 'more'``) and reaches into
  jsonschema's private ``_RefResolver``, so it is not used;
- strings and integers lean towards values the services accept (DNS names, known schemes, small numbers) so a
  good share of the examples reach the handlers' logic rather than stopping at the first validation;
- what a mutation is (``mutated``): byte flips, truncation, a field of the wrong type, a huge string or number,
  odd unicode, deep nesting, a dropped or unknown key, another type tag.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"

# Per test; the default keeps every fuzz test together within ~20 s of `make test` (the YAML reader's tests run a
# quarter as many: PyYAML is pure Python here). `make soak` sets 10000.
EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "") or "50")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # The fixtures (a nats-server, a bus, a server) are shared by the examples on purpose: they are what must
    # survive the input. Generated payloads are large and slow by design.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=True,
    # No "explain" phase: it traces every line run, and a handler logging a traceback through rich under that
    # tracer took minutes per failing example.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

# pytest's per-test timeout for the fuzz tests: the suite's 120 s, or 0.2 s per example for big runs (an example
# takes a few ms; a NATS round trip or a large payload costs more on a loaded machine).
TIMEOUT = max(120, int(EXAMPLES * 0.2))
# Marks for every fuzz module: payloads are large on purpose (Hypothesis warns when it prints one), and the
# timeout above.
MARKS = [pytest.mark.filterwarnings("ignore:Generating overly large repr"), pytest.mark.timeout(TIMEOUT)]


def examples(share: float) -> settings:
    """The profile with ``share`` of the examples, for the surfaces where one example is expensive."""
    return settings(FUZZ, max_examples=max(10, int(EXAMPLES * share)))


# --- values that look like what the services accept, and values that do not ---

NAMES = st.sampled_from(["default", "demo", "team-a", "ds", "a", "warm", "n1", "node-1", "x" * 63])
ODD_TEXT = st.sampled_from([
    "", " ", ".", "..", "a.b", "a/b", "../../etc/passwd", "*", ">", "a b", "\x00", "\n", "é", "ü/ß", "\u202e",
    "\ud7ff", "\U0001f600", "A" * 64, "a" * 300, "%2e%2e", "$JS.API", "default.ds", "-a", "a-", "1.2.3.4",
])
URLS = st.sampled_from(["local:///tmp/shoal-fuzz", "local:///", "s3://bucket/prefix", "s3://", "http://127.0.0.1:1/x",
                        "https://example.invalid/a", "pvc://claim/sub", "dataset://default/ds", "file:///etc",
                        "local://../x", "s3://user:secret@host/b", "ftp://x"])
STRINGS = st.one_of(NAMES, NAMES, ODD_TEXT, URLS, st.text(max_size=24))
INTEGERS = st.one_of(st.integers(0, 8), st.integers(-2**31, 2**31), st.sampled_from([2**63 - 1, -2**63, 2**64]))
NUMBERS = st.one_of(st.floats(0, 100), st.floats(allow_nan=False, allow_infinity=False), INTEGERS)


def _base64() -> st.SearchStrategy[str]:
    return st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode())


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """A strategy for documents valid against ``schema`` (the subset of JSON Schema ``docs/schemas`` uses)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    built: dict[str, st.SearchStrategy[Any]] = {}

    def ref(name: str) -> st.SearchStrategy[Any]:
        if name not in built:
            built[name] = st.deferred(lambda: build(defs[name]))
        return built[name]

    def build(node: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "$ref" in node:
            return ref(node["$ref"].rsplit("/", 1)[-1])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        if "anyOf" in node:
            return st.one_of([build(option) for option in node["anyOf"]])
        kind = node.get("type")
        if isinstance(kind, list):
            return st.one_of([build({**node, "type": one}) for one in kind])
        if kind == "object" or "properties" in node:
            return _object(node, build)
        if kind == "array":
            return _array(node, build)
        if kind == "string":
            return _base64() if node.get("contentEncoding") == "base64" else STRINGS
        if kind == "integer":
            return INTEGERS
        if kind == "number":
            return NUMBERS
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return JSON_VALUES  # "any JSON value, kept as given"

    return build(schema)


def _object(node: dict[str, Any], build: Callable[[dict[str, Any]], st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    properties: dict[str, Any] = node.get("properties", {})
    required = [name for name in node.get("required", []) if name in properties]
    optional = [name for name in properties if name not in required]
    extra = node.get("additionalProperties")
    free = (st.dictionaries(STRINGS, build(extra) if isinstance(extra, dict) else JSON_VALUES, max_size=3)
            if extra is not None and not properties else st.just({}))

    @st.composite
    def document(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(draw(free))
        for name in required:
            out[name] = draw(build(properties[name]))
        for name in optional:
            if draw(st.booleans()):
                out[name] = draw(build(properties[name]))
        return out

    return document()


def _array(node: dict[str, Any], build: Callable[[dict[str, Any]], st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    if "prefixItems" in node:
        return st.tuples(*(build(item) for item in node["prefixItems"])).map(list)
    items = build(node["items"]) if isinstance(node.get("items"), dict) else JSON_VALUES
    low = node.get("minItems", 0)
    return st.lists(items, min_size=low, max_size=max(low, min(node.get("maxItems", 4), 4)))


JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | INTEGERS | st.floats(allow_nan=False) | STRINGS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(STRINGS, inner, max_size=3),
    max_leaves=8,
)


def schema_file(tag: str) -> dict[str, Any]:
    """The published schema of one event type (``docs/schemas/<tag>.json``)."""
    return dict(json.loads((SCHEMAS / f"{tag}.json").read_text()))


def events(*tags_or_types: str | type) -> st.SearchStrategy[dict[str, Any]]:
    """Valid documents of any of the given event types: a type tag names its published schema; a msgspec type
    (an internal event, not in docs/schemas) gives its schema from msgspec, in the same form."""
    options = []
    for one in tags_or_types:
        if isinstance(one, str):
            options.append(from_schema(schema_file(one)))
        else:
            (ref,), components = msgspec.json.schema_components([one], ref_template="#/$defs/{name}")
            options.append(from_schema(ref, components))
    return st.one_of(options)


# --- mutations of a valid payload ---

HUGE_STRING = "x" * 100_000  # past the services' 64 KiB event limit
HUGE_VALUES = [HUGE_STRING, 10**30, -(10**30), 1e308, -1e308, 2**64, -1, 0, ""]
WRONG_TYPES = [None, True, 0, -1, 1.5, "", "0", [], {}, [None], {"": None}]
UNICODE = ["\u0000", "\ud800", "\udfff", "\ufeff", "\u202e\u202d", "\U0010ffff", "ﷺ" * 50, "é" * 1000, "\\", '"']


# Mutations reach this deep into a document; deeper parts (a nest made by an earlier mutation) stay as they are.
PATH_DEPTH = 12


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if len(prefix) >= PATH_DEPTH:
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    copy: Any = dict(node) if isinstance(node, dict) else list(node)
    copy[head] = _replace(copy[head], tuple(rest), value)
    return copy


def _drop(node: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return node
    *parent, last = path
    holder: Any = node
    for step in parent:
        holder = holder[step]
    trimmed: Any = {k: v for k, v in holder.items() if k != last} if isinstance(holder, dict) else \
        [v for i, v in enumerate(holder) if i != last]
    return _replace(node, tuple(parent), trimmed)


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def _tree_mutation(draw: st.DrawFn, document: Any, huge: int) -> Any:
    path = draw(st.sampled_from(_paths(document)))
    how = draw(st.sampled_from(["wrong", "huge", "unicode", "nest", "drop", "extra", "tag"]))
    if how == "wrong":
        return _replace(document, path, draw(st.sampled_from(WRONG_TYPES)))
    if how == "huge":
        value = draw(st.sampled_from(HUGE_VALUES))
        return _replace(document, path, value[:huge] if isinstance(value, str) else value)
    if how == "unicode":
        return _replace(document, path, draw(st.sampled_from(UNICODE)) + draw(STRINGS))
    if how == "nest":
        return _replace(document, path, _nest({}, draw(st.sampled_from([2, 64, 1000, 5000]))))
    if how == "drop":
        return _drop(document, path)
    if how == "extra" and isinstance(document, dict):
        return {**document, draw(STRINGS): draw(JSON_VALUES)}
    if how == "tag" and isinstance(document, dict):
        return {**document, "type": draw(st.sampled_from(["dataset.apply.v1", "runtime.apply.v1", "x", "", "v1"]))}
    return document


def _dumps(document: Any) -> bytes:
    # Lone surrogates cannot be UTF-8: written escaped (as another system's encoder might), or raw bytes that are
    # not UTF-8 at all.
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return b"[" * 5000


@st.composite
def _byte_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "insert", "prefix"]))
    if not raw:
        return draw(st.binary(max_size=16))
    if how == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "insert":
        position = draw(st.integers(0, len(raw)))
        return raw[:position] + draw(st.binary(min_size=1, max_size=8)) + raw[position:]
    return draw(st.sampled_from([b"\xef\xbb\xbf", b" ", b"null", b"[", b"\x00"])) + raw


def mutated(valid: st.SearchStrategy[Any], huge: int = len(HUGE_STRING)) -> st.SearchStrategy[bytes]:
    """Bytes made from a valid document: one to three tree mutations (a huge string at most ``huge`` characters),
    then maybe a byte-level one."""

    @st.composite
    def payload(draw: st.DrawFn) -> bytes:
        document = draw(valid)
        for _ in range(draw(st.integers(1, 3))):
            document = draw(_tree_mutation(document, huge))
        raw = _dumps(document)
        if draw(st.integers(0, 3)) == 0:
            raw = draw(_byte_mutation(raw))
        return raw

    return payload()


def payloads(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Valid documents (as bytes), mutated ones, and raw garbage: what a consumer may find on its subject."""
    return st.one_of(
        valid.map(_dumps),
        mutated(valid),
        mutated(valid),
        st.binary(max_size=64),
        st.sampled_from([b"", b"null", b"[]", b"{}", b"1e999", b'"' + b"\\u" * 10, b"[" * 10_000, b'{"type":1}']),
    )
