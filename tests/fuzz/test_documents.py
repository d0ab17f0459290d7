"""Fuzzing the CLI's YAML reader (``libs.documents``, as ``shoal apply -f`` and ``shoal delete -f`` read files):
generated and mutated manifests, from the examples in deploy/examples, get commands or clear errors, never a
traceback.

Documents are mutated as trees (wrong types, huge values, odd unicode, deep nesting, dropped or unknown keys) and as
text (byte flips, truncation, YAML's own constructs: aliases, tags, anchors, merge keys, flow nesting), then read
the way the CLI reads a file (``manifest_sources``, then ``_read_manifests``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from libs import kube
from libs.cli.main import _read_manifests
from libs.cli.manifests import manifest_sources
from libs.documents import ManifestError, documents_to_commands, is_list, parse_documents
from services.bridge import domain
from tests.fuzz.strategies import JSON_VALUES, MARKS, STRINGS, examples, mutated

pytestmark = MARKS

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
VALID = [document for path in sorted(EXAMPLES.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text())
         if document is not None]

YAML_SNIPPETS = st.sampled_from([
    "a: &x [1]\nb: *x\n", "a: *nothing\n", "!!python/object:os.system {}\n", "? [a, b]\n: c\n", "<<: {a: 1}\n",
    "a: !!binary aGk=\n", "a: 2001-12-14t21:59:43.10-05:00\n", "a: !!set {x, y}\n", "%YAML 9.9\n---\na: 1\n",
    "---\n...\n---\n", "\t- a\n", "a: b: c\n", "'unterminated\n", "[" * 2000, "a:\n" + "  " * 500 + "b: 1\n",
    "a: .nan\nb: -.inf\n", "1: 2\n", "null: x\n", "? !!null\n: y\n", "kind: Dataset\nspec: !!str 5\n",
    "a: &a [*a]\n", "\ufeffkind: Dataset\n", "kind: Dataset\x00\n", "x: 0x" + "f" * 400 + "\n",
    "apiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {name: [1]}\n",
])


def _dump(documents: list[Any]) -> str:
    return yaml.safe_dump_all(documents, allow_unicode=True, sort_keys=False)


def _documents_text(raw: bytes) -> str:
    """A mutated JSON document is YAML too (flow style)."""
    return raw.decode("utf-8", "surrogateescape")


def _list(items: list[Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}


def _objects(document: Any) -> int:
    """How many objects a document stands for: a List's items (each a command or an error), or itself."""
    if document is None:
        return 0
    if is_list(document) and isinstance(document.get("items"), list):
        return len(document["items"])
    return 1


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """The bytes of a manifest file: valid examples, mutated ones, YAML oddities, or garbage."""
    how = draw(st.sampled_from(["valid", "mutated", "mutated", "list", "snippet", "flip", "garbage"]))
    if how == "valid":
        return _dump(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))).encode()
    if how == "list":  # kubectl get -o yaml: a List of objects, a List in it, or a mutated one
        items = draw(st.lists(st.one_of(st.sampled_from(VALID), st.just(_list(VALID[:1])), JSON_VALUES), max_size=3))
        if draw(st.booleans()):
            return draw(mutated(st.just(_list(items)), huge=5_000))
        return _dump([_list(items)]).encode()
    if how == "mutated":
        # 5 kB strings: PyYAML is pure Python here; 100 kB ones cost ~1 s each.
        return draw(mutated(st.sampled_from(VALID), huge=5_000))
    if how == "snippet":
        base = _dump([draw(st.sampled_from(VALID))])
        return (draw(YAML_SNIPPETS) + "---\n" + base if draw(st.booleans()) else base + draw(YAML_SNIPPETS)).encode()
    if how == "flip":
        data = bytearray(_dump([draw(st.sampled_from(VALID))]).encode())
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    return draw(st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                          STRINGS.map(str.encode)))


@examples(0.25)
# Regression: YAML nested past the recursion limit was a RecursionError, not a ManifestError.
@example(data=b"[" * 2000, action="apply")
@given(data=manifests(), action=st.sampled_from(["apply", "delete"]))
def test_documents_give_commands_or_errors(data: bytes, action: str) -> None:
    """The pure reader: a ManifestError naming where, or commands and errors (each a sentence)."""
    try:
        documents = parse_documents(_documents_text(data))
    except ManifestError as err:
        assert str(err).startswith("invalid YAML in document")
        return
    commands, notes, errors = documents_to_commands(documents, action=action)  # type: ignore[arg-type]
    assert all(isinstance(error, str) and error for error in errors)
    assert all(isinstance(note, str) and note for note in notes)
    assert len(commands) + len(errors) == sum(_objects(document) for document in documents)


@examples(0.25)
# Regression: a file that is not UTF-8 was a UnicodeDecodeError traceback from `shoal apply -f`.
@example(data=b"kind: \xed\xa0\x80\n", action="apply")
@example(data=b"[" * 2000, action="delete")
@given(data=manifests(), action=st.sampled_from(["apply", "delete"]))
def test_the_cli_reads_any_file_without_a_traceback(tmp_path: Path, data: bytes, action: str) -> None:
    """As ``shoal apply -f FILE`` reads it: ``manifest_sources`` finds the file, ``_read_manifests`` reads and
    translates it; an unreadable file is an error line (click's ``Exit``/``UsageError`` at worst), never another
    exception."""
    path = tmp_path / "manifest.yaml"  # one file, rewritten by every example
    path.write_bytes(data)
    try:
        _read_manifests(manifest_sources([str(path)], recursive=False), "default", action)
    except click.ClickException as err:
        assert err.format_message()


# --- the Kubernetes bridge's translation of a watched object (the same reader, from the API server's JSON) ---

RESOURCES = {(resource.api_version, resource.kind): resource for resource in kube.RESOURCES}


@st.composite
def watched_objects(draw: st.DrawFn) -> tuple[Any, Any]:
    """A custom resource as a watch delivers it: an example document with server metadata, maybe mutated."""
    document = draw(st.sampled_from(VALID))
    resource = RESOURCES[(document["apiVersion"], document["kind"])]
    obj = {**document, "metadata": {**document.get("metadata", {}), "uid": "u-1", "generation": 2,
                                    "finalizers": ["shoal.io/cleanup"]}}
    if draw(st.booleans()):
        raw = draw(mutated(st.just(obj), huge=5_000))
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            obj = {}
    return resource, obj


@examples(0.25)
@given(watched=watched_objects())
def test_the_bridge_translates_any_object(watched: tuple[Any, Any]) -> None:
    """An object the bridge cannot turn into a command gets errors (shown on the object), never an exception."""
    resource, obj = watched
    if not isinstance(obj, dict):
        return  # a watch event's object is always a JSON object
    translation = domain.translate(resource, obj)
    assert (translation.command is None) == bool(translation.errors)
    domain.key_of(resource, obj)
    domain.secret_refs(obj)
    domain.finalizer_patch(obj, held=True)
    domain.is_deleting(obj)
