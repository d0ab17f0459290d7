"""Kubernetes/Fluid documents → commands: what ``shoal apply -f`` and ``shoal delete -f`` publish per YAML document.

Pure functions, no I/O, in libs so the CLI and the Kubernetes bridge translate documents the same way.
Decides:
- which kinds are understood: Shoal's own ``shoal.io/v1alpha1`` Dataset, Runtime, DataLoad and DataClean,
  Fluid's ``data.fluid.io/v1alpha1`` Dataset and DataLoad, and Fluid's cache runtimes (AlluxioRuntime,
  JuiceFSRuntime, ...) mapped onto the one Shoal Runtime;
- how a Fluid DataLoad maps: its fields as they are (Shoal's DataLoadSpec has Fluid's names); what only a
  Kubernetes Job would use (options, affinity, nodeSelector, tolerations, schedulerName, podMetadata,
  imagePullSecrets, resources, runAfter.affinityStrategy) is noted as ignored; ``spec.dataset.namespace`` left
  out means the operation's own namespace, as in Fluid;
- how a Fluid runtime maps: ``spec.replicas``, ``spec.tieredstore.levels[]`` (a tier's ``quotaList`` read as
  its sum, the tier's ``quota``, and kept for a disk tier) and
  ``spec.management.metadataSyncPolicy`` as they are, Shoal's ``spec.autoscaling`` too (the CRDs of Fluid's
  kinds take it), the block size from the engine's own setting (Alluxio/GooseFS property, JuiceFS
  ``block-size`` option; one past Shoal's largest block is the largest, noted), nothing else;
- that a Shoal Runtime's tier with ``quotaList`` gives ``quota`` too, their sum, as its CRD requires (a Fluid
  runtime's is derived): the refusal says so and names the sum;
- that every field Shoal does not use is reported back as an "ignored: ..." note, never dropped silently, and a
  Dataset's ``accessModes`` that promise writes as a "warning: ..." note (the mounts are read-only);
- that schema errors name the document and the JSON path (``$.spec.mounts[0].mountPoint``), and an unknown kind or
  apiVersion the one likely meant (``kind: dataset``: "did you mean Dataset?"), as a misspelt field gets;
- that a key given twice in one mapping is an error, not "the last one wins" (YAML's loaders keep the last without a
  word; kubectl refuses it): a second ``metadata`` would apply the object under another name or namespace;
- that a document naming another namespace than the one ``-n`` gives is an error (``enforce_namespace``), as in
  kubectl;
- that a null field is a field not given (``without_nulls``), and so is an empty ``metadata.namespace`` or
  ``spec.dataset.namespace``, as kubectl and the API server take them;
- that a Kubernetes ``List`` (``apiVersion: v1``, what ``kubectl get -o yaml`` prints for several objects) stands
  for its ``items``, each read as a document of its own; a List inside a List is refused;
- that a text beginning with ``{`` is read as JSON first, as kubectl's YAML-or-JSON decoder reads it: one object or
  several one after another (``jq '.items[]'``), so JSON that is not YAML 1.1 (tab indentation, an emoji's
  ``\\ud83d\\ude00`` escape pair) applies; what JSON cannot read is read as YAML, whose errors name the line;
- that a command larger than a NATS message can carry, or than the services take (``too_large``), is refused
  naming its size and what to change, before anything is published, and so is a document whose aliases expand it
  past ``MAX_EXPANDED_VALUES`` or make it contain itself.

Semantic validation (bucket names, supported options, DNS labels) is the services' job: they reject with a
reason the CLI prints. Here only the shape is checked, so a manifest is judged by one authority.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, get_args

import msgspec
import yaml

from libs import subjects
from libs.config import MAX_EVENT_BYTES_VARIABLE
from libs.events.common import ObjectMeta, parse_quantity
from libs.events.dataset import (
    Dataset,
    DatasetApply,
    DatasetDelete,
    DatasetResync,
    DatasetSpec,
    write_access_modes,
)
from libs.events.operation import (
    DataClean,
    DataCleanApply,
    DataCleanDelete,
    DataCleanSpec,
    DataLoad,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataLoadSpec,
    Policy,
)
from libs.events.runtime import (
    BLOCK_ALIGNMENT,
    DEFAULT_HIGH_WATERMARK,
    DEFAULT_LOW_WATERMARK,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    Runtime,
    RuntimeApply,
    RuntimeDelete,
    RuntimeManagement,
    RuntimeScale,
    RuntimeSpec,
)
from libs.mounts import OPTION_ALIASES
from libs.redact import is_secret_name

SHOAL_GROUP = "shoal.io"
SHOAL_API = f"{SHOAL_GROUP}/v1alpha1"
FLUID_API = "data.fluid.io/v1alpha1"
FLUID_RUNTIME_KINDS = (
    "AlluxioRuntime",
    "JuiceFSRuntime",
    "JindoRuntime",
    "GooseFSRuntime",
    "EFCRuntime",
    "ThinRuntime",
    "VineyardRuntime",
)
THIN_RUNTIME = "ThinRuntime"

# The kinds each apiVersion has, for "did you mean" (``_kind_hints``); ``_document_to_command`` maps each.
API_KINDS: dict[str, tuple[str, ...]] = {
    SHOAL_API: ("Dataset", "Runtime", "DataLoad", "DataClean"),
    FLUID_API: ("Dataset", "DataLoad", *FLUID_RUNTIME_KINDS),
}

# Fluid/Alluxio spellings of S3 mount options and Shoal's names for them.
ALLUXIO_OPTION_NAMES = {
    "alluxio.underfs.s3.endpoint": "endpoint",
    "alluxio.underfs.s3.endpoint.region": "region",
    "alluxio.underfs.s3.disable.dns.buckets": "pathStyle",
}

# Alluxio's own settings, given as mount options in Fluid's samples; those Shoal reads are the names above.
ALLUXIO_PREFIX = "alluxio."

# Engines that keep their block size in ``spec.properties``; Alluxio and its fork GooseFS spell sizes alike.
BLOCK_SIZE_PROPERTIES = {
    "AlluxioRuntime": "alluxio.user.block.size.bytes.default",
    "GooseFSRuntime": "goosefs.user.block.size.bytes.default",
}
JUICEFS_BLOCK_SIZE = "block-size"

# kubectl's List: any objects under ``items``. Its own metadata (a resourceVersion) only means something to the
# API server it came from.
LIST_API_VERSION = "v1"
LIST_KIND = "List"
LIST_FIELDS = ("apiVersion", "kind", "metadata", "items")

METADATA_FIELDS = ("name", "namespace", "labels", "annotations")
LEVEL_FIELDS = ("mediumtype", "path", "quota", "high", "low")
# Fluid's per-path quotas of a tier; read into the tier's quota, and kept for a disk tier (``_quota_from_list``).
QUOTA_LIST = "quotaList"

Kind = Literal["dataset", "runtime", "dataload", "dataclean"]
OPERATION_KINDS: tuple[Kind, ...] = ("dataload", "dataclean")
Action = Literal["apply", "delete"]
CommandEvent = (
    DatasetApply | DatasetDelete | RuntimeApply | RuntimeDelete | RuntimeScale | DatasetResync
    | DataLoadApply | DataLoadDelete | DataLoadRun | DataCleanApply | DataCleanDelete
)


class ManifestError(ValueError):
    """The manifest text is not YAML; the message names the document and the line."""


@dataclass(frozen=True)
class Command:
    """One event to publish for one document, and where it came from (for messages)."""

    document: int  # 1-based position in the YAML stream
    source_kind: str  # the kind as written, e.g. "AlluxioRuntime"
    kind: Kind
    name: str
    namespace: str
    subject: str
    event: CommandEvent

    @property
    def resource(self) -> str:
        """kubectl-style resource name printed in results: ``dataset.shoal.io/demo``."""
        return f"{resource_type(self.kind)}/{self.name}"


# Room left in a NATS message for the headers of a command (its Nats-Msg-Id, content type and trace context, a few
# hundred bytes): a command body larger than the limit less this would be refused by the server.
COMMAND_HEADROOM = 4096


def too_large(event: CommandEvent, kind: str, max_bytes: int, event_limit: int | None = None) -> str:
    """Why ``event`` cannot be published in a NATS message of at most ``max_bytes`` ("" when it can): a manifest may
    give any number of mounts, labels or targets, and aliases (``*anchor``) repeat a list without making the file
    longer, while the server refuses a message over its limit, which no retry changes.

    ``event_limit``: the most a service takes (``SHOAL_MAX_EVENT_BYTES``, as the publisher knows it): a command
    between it and the NATS limit is published and then refused by the service, so it is said here too."""
    size = len(msgspec.json.encode(event))
    split = f"split it into several {kind}s (fewer mounts or targets each)"
    if size > max_bytes - COMMAND_HEADROOM:
        return (f"too large for Shoal: its command would be {size} bytes, more than the "
                f"{max_bytes - COMMAND_HEADROOM} a NATS message can carry here; {split}")
    if event_limit is not None and size > event_limit:
        return (f"too large for Shoal: its command would be {size} bytes, more than the {event_limit} the services "
                f"take ({MAX_EVENT_BYTES_VARIABLE}); {split}, or raise {MAX_EVENT_BYTES_VARIABLE} for the services "
                f"and here alike")
    return ""


def resource_type(kind: Kind) -> str:
    """kubectl's name of a kind's resource, as ``-o name`` and its errors say it: ``dataset.shoal.io``."""
    return f"{kind}.{SHOAL_GROUP}"


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that one mapping gives twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked before the base class merges ``<<: *anchor`` in: a key of the mapping itself may override a merged
        # one (that is what merge keys are for), two of its own may not.
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_documents(text: str) -> list[Any]:
    """Every YAML document of ``text`` in order; empty documents stay as None so positions keep their numbers.

    A text that is a stream of JSON values is read as JSON (``_json_documents``), each value a document."""
    if (documents := _json_documents(text)) is not None:
        return documents
    documents = []
    try:
        for document in yaml.load_all(text, Loader=_ManifestLoader):  # a SafeLoader: no Python objects
            documents.append(document)
    except RecursionError as err:  # PyYAML composes recursively: ``[[[[...`` (found by fuzzing)
        raise ManifestError(f"invalid YAML in document {len(documents) + 1}: nested too deeply") from err
    except yaml.YAMLError as err:
        where = f"document {len(documents) + 1}"
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where += f", line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ManifestError(f"invalid YAML in {where}: {detail}") from err
    return documents


# JSON's whitespace, between the values of a stream.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _NotJson(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is left to the YAML reading, whose refusal names its line."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotJson("duplicate key")
    return obj


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")  # Python's reader takes NaN and Infinity, JSON (and kubectl) does not


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _json_documents(text: str) -> list[Any] | None:
    """The values of ``text`` read as a stream of JSON objects (one, or several one after another, as kubectl's
    decoder reads a text that begins with ``{``); None when it does not begin with one or is not such a stream.

    YAML 1.1 reads most JSON alike, but not all of it: a tab that indents (Go's ``MarshalIndent`` with "\\t", ``jq
    --tab``) is a YAML error, an escaped pair of surrogates (``json.dumps`` of an emoji: ``\\ud83d\\ude00``) was
    read as two lone halves and refused, and a second object after the first needed a ``---``."""
    index = _after_space(text, len("\ufeff") if text.startswith("\ufeff") else 0)  # kubectl skips a BOM too
    if not text.startswith("{", index):
        return None
    documents = []
    try:
        while index < len(text):
            value, index = _JSON_DECODER.raw_decode(text, index)
            documents.append(value)
            index = _after_space(text, index)
    except (ValueError, RecursionError):  # json.JSONDecodeError and _NotJson are ValueErrors
        return None
    return documents


def _after_space(text: str, index: int) -> int:
    match = _JSON_SPACE.match(text, index)
    return match.end() if match else index


def documents_to_commands(
    documents: list[Any], *, default_namespace: str = "default", action: Action = "apply",
    enforce_namespace: bool = False,
) -> tuple[list[Command], list[str], list[str]]:
    """Commands for every valid document, notes on ignored fields, and errors of the invalid documents.

    ``enforce_namespace`` (``-n`` given on the command line): a document naming another namespace is an error, as
    kubectl says "the namespace from the provided object does not match": ``shoal delete -f FILE -n staging`` must
    not delete the objects of the namespace the file names.

    Invalid documents do not stop the others, like ``kubectl apply``: the caller publishes what is valid and
    reports the rest. A List's items are documents like the others (an invalid item does not stop its siblings);
    their commands keep the List's position and their messages say "document N, item M".
    """
    commands: list[Command] = []
    notes: list[str] = []
    errors: list[str] = []
    for position, document in enumerate(documents, start=1):
        if document is None:
            continue
        if is_list(document):
            items = document.get("items")
            if not isinstance(items, list):
                errors.append(f"document {position} ({LIST_KIND}): items must be a list of objects, got "
                              f"{type(items).__name__}")
                continue
            notes += [_ignored(LIST_KIND, key, "not used by Shoal") for key in document if key not in LIST_FIELDS]
            located = [(f"document {position}, item {index}", item) for index, item in enumerate(items, start=1)]
        else:
            located = [(f"document {position}", document)]
        for where, item in located:
            try:
                if is_list(item):
                    raise _DocumentError(f"{where} ({LIST_KIND}): a List inside a List is not supported; put its "
                                         "items in the outer List")
                command, document_notes = _document_to_command(position, where, item, default_namespace, action,
                                                               enforce_namespace)
            except _DocumentError as err:
                errors.append(str(err))
                continue
            commands.append(command)
            notes.extend(document_notes)
    return commands, notes, errors


def is_list(document: Any) -> bool:
    """Whether ``document`` is a Kubernetes List (``apiVersion: v1``, ``kind: List``)."""
    return (isinstance(document, dict) and document.get("apiVersion") == LIST_API_VERSION
            and document.get("kind") == LIST_KIND)


def holds_objects(documents: list[Any]) -> bool:
    """Whether the documents hold anything to apply: a document that is not empty, and not a List without items
    (kubectl: "no objects passed to apply")."""
    return any(document is not None and not (is_list(document) and document.get("items") in (None, []))
               for document in documents)


def no_objects(documents: list[Any], action: str) -> str:
    """Why ``documents`` give nothing to ``action`` ("" when they hold an object). As kubectl, a file without an
    object is a mistake (the wrong file, a failed render), not a quiet no-op."""
    if all(document is None for document in documents):
        return f"no objects to {action}: the file holds no document"
    if not holds_objects(documents):
        return f"no objects to {action}: the file holds only an empty List"
    return ""


# --- one document ---


class _DocumentError(Exception):
    pass


# The spec type of each kind a document becomes (its unknown fields, when msgspec refuses the document).
_SPEC_TYPES: dict[type[Any], type[Any]] = {Dataset: DatasetSpec, Runtime: RuntimeSpec, DataLoad: DataLoadSpec,
                                           DataClean: DataCleanSpec}


def _not_unicode(document: Any) -> bool:
    """Whether a string (key or value) in ``document`` cannot be encoded as UTF-8. A walk with a stack, each
    container once: YAML nests as deep as it likes, and its aliases can make a list contain itself."""
    pending, seen = [document], set()
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict | list | tuple) and id(value) not in seen:
            seen.add(id(value))
            pending.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
    return False


# The most values (mappings, lists, keys and scalars) a document may hold with its aliases expanded: its command
# travels in one NATS message of 1 MiB, and every value takes at least a byte of it.
MAX_EXPANDED_VALUES = 1024 * 1024


def _expansion_problem(document: Any) -> str:
    """Why ``document`` cannot become a command however it is read ("" when it can): it contains itself (an alias
    inside the mapping or list its anchor names), or its aliases expand it past ``MAX_EXPANDED_VALUES``.

    PyYAML gives an alias the very object its anchor names, so a document is a graph, small in memory; its event is
    encoded expanded, as a tree. Ten lines of aliases each repeating the one before ten times ("billion laughs") made
    an event of gigabytes, eaten into memory until the CLI was killed, and a cycle a RecursionError traceback. kubectl
    refuses both ("excessive aliasing"). Sizes are counted once per object (a walk with a stack: YAML nests as deep as
    it likes)."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()  # the containers around the one being walked
    pending: list[tuple[Any, bool]] = [(document, False)]
    while pending:
        value, leaving = pending.pop()
        if not isinstance(value, dict | list):
            continue
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        if leaving:
            entered.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[id(value)] > MAX_EXPANDED_VALUES:
                return (f"its aliases (*name) repeat so much that it would hold more than {MAX_EXPANDED_VALUES:,} "
                        "values, more than a command can carry: write the repeated parts out, or split it")
            continue
        if id(value) in sizes:
            continue
        if id(value) in entered:
            return "it contains itself: an alias (*name) inside the mapping or list its anchor (&name) names"
        entered.add(id(value))
        pending.append((value, True))
        pending.extend((child, False) for child in children if isinstance(child, dict | list))
    return ""


def without_nulls(document: Any) -> Any:
    """``document`` with every mapping entry whose value is null left out, at every depth (a copy; items of a list
    are kept, null or not). The API server prunes a custom resource's null fields before defaulting, and kubectl
    takes a null as a field not given: a Helm value left unset (``namespace: {{ .Values.ns }}``) or a key left empty
    (``labels:``) means the default, not "Expected `object`, got `null`". A walk with a stack, each container copied
    once: YAML nests as deep as it likes, and its aliases can make a list contain itself."""
    copies: dict[int, Any] = {}
    pending: list[tuple[Any, Any]] = []

    def copied(value: Any) -> Any:
        if not isinstance(value, dict | list):
            return value
        if id(value) not in copies:
            copies[id(value)] = {} if isinstance(value, dict) else []
            pending.append((value, copies[id(value)]))
        return copies[id(value)]

    top = copied(document)
    while pending:
        original, copy = pending.pop()
        if isinstance(original, dict):
            copy.update((key, copied(value)) for key, value in original.items() if value is not None)
        else:
            copy.extend(copied(value) for value in original)
    return top


def _document_to_command(
    position: int, where: str, document: Any, default_namespace: str, action: Action, enforce_namespace: bool = False
) -> tuple[Command, list[str]]:
    """``where`` names the document in messages: "document 2", or "document 2, item 3" in a List."""
    if not isinstance(document, dict):
        raise _DocumentError(
            f"{where}: expected a mapping with apiVersion, kind, metadata and spec, "
            f"got {type(document).__name__}"
        )
    if problem := _expansion_problem(document):
        raise _DocumentError(f"{where}: {problem}")
    document = without_nulls(document)
    if _not_unicode(document):
        # A YAML "\ud800" escape gives one; no event can carry it (JSON on the wire is UTF-8). Found by fuzzing.
        # The text is not quoted: it may be a secret's value.
        raise _DocumentError(f"{where}: holds text that is not valid Unicode (a lone surrogate)")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    missing = [field for field, value in (("apiVersion", api_version), ("kind", kind)) if value in (None, "")]
    if missing:  # else the messages below would name a kind "None" (a file that is not a manifest at all)
        raise _DocumentError(f"{where}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                             "(not a Kubernetes or Fluid manifest?)")
    label = f"{where} ({kind}"
    metadata = document.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        label += f" {metadata['name']}"
    label += ")"

    notes = [_ignored(str(kind), key, "not used by Shoal") for key in document
             if key not in ("apiVersion", "kind", "metadata", "spec", "status")]
    if "status" in document:
        notes.append(_ignored(str(kind), "status", "status is computed by Shoal"))
    meta, meta_notes = _metadata(str(kind), metadata, default_namespace, label)
    notes += meta_notes
    if enforce_namespace and meta["namespace"] != default_namespace:
        raise _DocumentError(f"{label}: its namespace {meta['namespace']!r} does not match -n {default_namespace}: "
                             f"give -n {meta['namespace']}, or leave -n out")
    spec = document.get("spec") or {}
    if not isinstance(spec, dict):
        raise _DocumentError(f"{label}: spec must be a mapping, got {type(spec).__name__}")

    target: type[Dataset] | type[Runtime] | type[DataLoad] | type[DataClean]
    if api_version == SHOAL_API and kind == "Dataset":
        target, mapped_spec = Dataset, spec
        notes += unknown_field_notes(kind, DatasetSpec, spec, "spec")
    elif api_version == SHOAL_API and kind == "Runtime":
        target, mapped_spec = Runtime, spec
        notes += unknown_field_notes(kind, RuntimeSpec, spec, "spec")
        if problems := _quota_list_without_quota(spec):
            raise _DocumentError(f"{label}: " + "; ".join(problems))
    elif api_version == FLUID_API and kind == "Dataset":
        target = Dataset
        notes += [_ignored(kind, path, "not used by Shoal") for path in unknown_fields(DatasetSpec, spec, "spec")]
        mapped_spec, option_notes = fluid_dataset_spec(spec)
        notes += option_notes
    elif api_version == FLUID_API and kind in FLUID_RUNTIME_KINDS:
        target = Runtime
        mapped_spec, runtime_notes, problems = fluid_runtime_spec(kind, spec)
        notes += runtime_notes
        if problems:
            raise _DocumentError(f"{label}: " + "; ".join(problems))
    elif kind == "DataLoad" and api_version in (SHOAL_API, FLUID_API):
        target = DataLoad
        notes += (unknown_field_notes(kind, DataLoadSpec, spec, "spec") if api_version == SHOAL_API else
                  [_ignored(kind, path, "not used by Shoal") for path in unknown_fields(DataLoadSpec, spec, "spec")])
        mapped_spec = _dataset_in_namespace(spec, meta["namespace"])
        policy = spec.get("policy", "Once")
        if policy not in get_args(Policy):  # msgspec would say "Invalid enum value" without the choices
            raise _DocumentError(f"{label}: spec.policy {policy!r} is not one of {', '.join(get_args(Policy))}")
    elif kind == "DataClean" and api_version == SHOAL_API:
        target = DataClean
        notes += unknown_field_notes(kind, DataCleanSpec, spec, "spec")
        mapped_spec = _dataset_in_namespace(spec, meta["namespace"])
    else:
        raise _DocumentError(
            f"{label}: unknown kind {kind!r} of apiVersion {api_version!r}; supported: Dataset, Runtime, "
            f"DataLoad and DataClean of {SHOAL_API}, Dataset, DataLoad and {', '.join(FLUID_RUNTIME_KINDS)} "
            f"of {FLUID_API}{''.join(f'; {hint}' for hint in _kind_hints(str(api_version), str(kind)))}"
        )

    if target is Runtime:
        mapped_spec, problems = _decimal_quantities(mapped_spec)
        if problems:
            raise _DocumentError(f"{label}: " + "; ".join(problems))
    converted = {"metadata": meta, "spec": mapped_spec}
    try:
        obj = msgspec.convert(converted, target)
    except msgspec.ValidationError as err:
        # A field misspelt is only noted as ignored, and notes of a refused document are not shown: the refusal
        # ("missing required field `mountPoint`") says which spelling it was likely meant to replace.
        hints = [f"; {found} is not a field of {kind}: did you mean {meant}?"
                 for found, meant in _unknown(msgspec.inspect.type_info(_SPEC_TYPES[target]), mapped_spec, "spec")
                 if meant]
        raise _DocumentError(f"{label}: {_with_keys(str(err), converted)}{''.join(hints)}") from err
    if isinstance(obj, Dataset) and action == "apply" and (writes := write_access_modes(obj.spec.access_modes)):
        notes.append(read_only_note(str(kind), writes))
    return _command(position, str(kind), obj, action), _named_notes(notes, str(kind), obj.metadata)


def _kind_hints(api_version: str, kind: str) -> list[str]:
    """What an unknown kind and apiVersion were likely meant to be, as a misspelt field's "did you mean": a kind
    in another case (``dataset``, ``DATALOAD``) or spelling, an apiVersion a letter off (``data.fluid.io/v1alpha``),
    a kind of the other API (Fluid has no DataClean). Nothing when nothing is close (a ConfigMap)."""
    meant_api = api_version if api_version in API_KINDS else _meant(api_version, list(API_KINDS))
    if meant_api is None:
        return []
    hints = []
    if meant_api != api_version:
        hints.append(f"{api_version!r} is not an apiVersion Shoal reads: did you mean {meant_api}?")
    if kind in API_KINDS[meant_api]:
        return hints
    # The other API's kind first: Fluid's "Runtime" is a letter or four from ThinRuntime, but meant Shoal's.
    if other := [api for api, kinds in API_KINDS.items() if api != meant_api and kind in kinds]:
        hints.append(f"{kind} is a kind of {other[0]}, not of {meant_api}")
    elif meant_kind := _meant(kind, API_KINDS[meant_api]):
        hints.append(f"{kind!r} is not a kind of {meant_api}: did you mean {meant_kind}?")
    return hints


def _named_notes(notes: list[str], kind: str, meta: ObjectMeta) -> list[str]:
    """The object's "ignored: ..." notes naming it (``ignored: Runtime default/demo: spec.colour (...)``): the kind
    alone was ambiguous in a file of several objects of a kind. Named here, where the object is known, rather than
    by each of the many spec readers below, which know the kind only."""
    unnamed = f"{IGNORED} {kind}/"  # as ``_ignored`` begins
    named = f"{IGNORED} {kind} {subjects.object_name(meta.namespace, meta.name)}: "
    return [named + note.removeprefix(unnamed) if note.startswith(unnamed) else note for note in notes]


# msgspec's message ends with where: "Expected `str`, got `bool` - at `$.spec.mounts[0].options[...]`", where
# ``[...]`` is some value of a mapping (options, labels), and which key is left out.
_ERROR_AT = re.compile(r"^Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)` - at `\$(?P<path>[^`]*)`$")
_PATH_STEP = re.compile(r"\.(?P<field>[^.\[]+)|\[(?P<index>[0-9]+)\]|(?P<value>\[\.\.\.\])")
# msgspec's names of the types it got (``msgspec.json`` names).
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "array", dict: "object"}


def _with_keys(message: str, converted: dict[str, Any]) -> str:
    """msgspec's ``message`` with each ``[...]`` of its path made the key whose value it refused, found in
    ``converted`` (what was given to ``msgspec.convert``), as kubectl names it:
    ``$.spec.mounts[0].options["alluxio.underfs.s3.disable.dns.buckets"]`` for an unquoted ``true``, which
    "options[...]" left the reader to hunt for among the options. A text expected and a boolean or number given
    says to quote it (YAML reads ``true``, ``9000`` and ``0.5`` unquoted as such). Unchanged when the path does not
    lead to a value of the type it says it got."""
    match = _ERROR_AT.match(message)
    if match is None or "[...]" not in match["path"]:
        return message
    steps = list(_PATH_STEP.finditer(match["path"]))
    if "".join(step[0] for step in steps) != match["path"]:
        return message

    def found(value: Any, rest: list[re.Match[str]]) -> str | None:
        if not rest:
            return "" if _TYPE_NAMES.get(type(value)) == match["got"] else None
        step, rest = rest[0], rest[1:]
        children: list[tuple[str, Any]] = []
        if step["value"] is not None and isinstance(value, dict):
            children = [(f"[{msgspec.json.encode(str(key)).decode()}]", item) for key, item in value.items()]
        elif step["index"] is not None and isinstance(value, list) and int(step["index"]) < len(value):
            children = [(step[0], value[int(step["index"])])]
        elif step["field"] is not None and isinstance(value, dict) and step["field"] in value:
            children = [(step[0], value[step["field"]])]
        for shown, child in children:
            if (tail := found(child, rest)) is not None:
                return shown + tail
        return None

    path = found(converted, steps)
    if path is None:
        return message
    hint = ""
    if match["expected"] == "str" and match["got"] in ("bool", "int", "float"):
        hint = " (put the value in quotes: unquoted, YAML reads true, 9000 or 0.5 as a boolean or a number)"
    return f"Expected `{match['expected']}`, got `{match['got']}` - at `${path}`{hint}"


def read_only_note(kind: str, writes: list[str]) -> str:
    """The warning for a Dataset whose ``accessModes`` promise writes: accepted (its PersistentVolume and claims
    keep the modes a Fluid manifest asks for), but the mounts stay read-only."""
    return f"warning: {read_only_message(kind, writes)}"


def read_only_message(kind: str, writes: list[str]) -> str:
    """``read_only_note`` without its "warning: ": the message of the Kubernetes bridge's Warning Event."""
    return (f"{kind}/spec.accessModes: {', '.join(writes)} is accepted, but Shoal mounts datasets read-only: a write "
            "gets EROFS (read-only file system)")


def _command(position: int, source_kind: str, obj: Dataset | Runtime | DataLoad | DataClean,
             action: Action) -> Command:
    name, namespace = obj.metadata.name, obj.metadata.namespace
    apply = action == "apply"
    event: CommandEvent
    kind: Kind
    if isinstance(obj, Dataset):
        kind, subject = "dataset", subjects.DATASET_APPLY if apply else subjects.DATASET_DELETE
        event = DatasetApply(dataset=obj) if apply else DatasetDelete(name=name, namespace=namespace)
    elif isinstance(obj, Runtime):
        kind, subject = "runtime", subjects.RUNTIME_APPLY if apply else subjects.RUNTIME_DELETE
        event = RuntimeApply(runtime=obj) if apply else RuntimeDelete(name=name, namespace=namespace)
    elif isinstance(obj, DataLoad):
        kind, subject = "dataload", subjects.DATALOAD_APPLY if apply else subjects.DATALOAD_DELETE
        event = DataLoadApply(data_load=obj) if apply else DataLoadDelete(name=name, namespace=namespace)
    else:
        kind, subject = "dataclean", subjects.DATACLEAN_APPLY if apply else subjects.DATACLEAN_DELETE
        event = DataCleanApply(data_clean=obj) if apply else DataCleanDelete(name=name, namespace=namespace)
    return Command(position, source_kind, kind, name, namespace, subject, event)


def _dataset_in_namespace(spec: dict[str, Any], namespace: str) -> dict[str, Any]:
    """An operation's ``spec.dataset`` without a namespace names a dataset of the operation's namespace (Fluid's
    rule), not of "default"."""
    dataset = spec.get("dataset")
    if isinstance(dataset, dict) and dataset.get("namespace") in (None, ""):  # "" too, as in Fluid
        return {**spec, "dataset": {**dataset, "namespace": namespace}}
    return spec


def _metadata(kind: str, metadata: Any, default_namespace: str, label: str) -> tuple[dict[str, Any], list[str]]:
    """name, namespace (the default when absent), labels and annotations; server-set fields are noted."""
    if not isinstance(metadata, dict):
        raise _DocumentError(f"{label}: metadata with a name is required")
    meta = {key: value for key, value in metadata.items() if key in METADATA_FIELDS}
    if meta.get("namespace") in (None, ""):  # "" too: kubectl puts an object without a namespace in the default one
        meta["namespace"] = default_namespace
    notes = [_ignored(kind, f"metadata.{key}", "not used by Shoal") for key in metadata if key not in meta]
    return meta, notes


# How a note on a field Shoal does not use begins.
IGNORED = "ignored:"


def _ignored(kind: str, path: str, why: str) -> str:
    """A note on a field Shoal does not use, of ``kind`` (``_named_notes`` adds the object's name)."""
    return f"{IGNORED} {kind}/{path} ({why})"


# --- Fluid Dataset ---


def fluid_dataset_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Fluid's Dataset spec in Shoal's shape: the same fields, Alluxio's S3 option names made Shoal's, and notes on
    the options left out: Alluxio's own settings (``alluxio.underfs.s3.inherit.acl`` in Fluid's MinIO sample), which
    tune how Alluxio's engine talks to the store and mean nothing to Shoal's, as its runtime ``properties`` do not.

    Other unknown options pass through: the dataset service knows which ones each scheme supports and says why. So
    does an Alluxio-named secret: the clear-text check refuses it rather than a note dropping it.
    """
    mapped = dict(spec)
    notes: list[str] = []
    if isinstance(spec.get("mounts"), list):
        mapped["mounts"] = []
        for index, mount in enumerate(spec["mounts"]):
            if isinstance(mount, dict) and isinstance(mount.get("options"), dict):
                options, option_notes = _fluid_options(mount["options"], f"spec.mounts[{index}].options")
                mount = {**mount, "options": options}
                notes += option_notes
            mapped["mounts"].append(mount)
    if isinstance(spec.get("sharedOptions"), dict):
        mapped["sharedOptions"], option_notes = _fluid_options(spec["sharedOptions"], "spec.sharedOptions")
        notes += option_notes
    return mapped, notes


def _fluid_options(options: dict[Any, Any], where: str) -> tuple[dict[Any, Any], list[str]]:
    kept: dict[Any, Any] = {}
    notes: list[str] = []
    for key, value in options.items():
        if (isinstance(key, str) and key.startswith(ALLUXIO_PREFIX) and key not in ALLUXIO_OPTION_NAMES
                and key not in OPTION_ALIASES and not is_secret_name(key)):
            notes.append(_ignored("Dataset", f'{where}["{key}"]', "an Alluxio setting, not used by Shoal"))
        else:
            # Renamed only as a text: an error about any other value then names the key the manifest gives.
            kept[ALLUXIO_OPTION_NAMES.get(key, key) if isinstance(value, str) else key] = value
    return kept, notes


# --- Fluid runtimes ---


def fluid_runtime_spec(kind: str, spec: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """A Fluid runtime spec as Shoal's RuntimeSpec dict, notes on every field left out, and value problems."""
    mapped: dict[str, Any] = {}
    notes: list[str] = []
    problems: list[str] = []
    handled = {"replicas", "tieredstore"}
    if "replicas" in spec:
        mapped["replicas"] = spec["replicas"]
    elif kind == THIN_RUNTIME and not _has_levels(spec.get("tieredstore")):
        # Fluid's ThinRuntime caches nothing (a FUSE over a storage profile, or a reference dataset's, whose source's
        # runtime caches it): no tier, so no cache worker, where Shoal's Runtime defaults to one.
        mapped["replicas"] = 0
    if "tieredstore" in spec:
        mapped["tieredstore"], tier_notes, tier_problems = _tieredstore(kind, spec["tieredstore"])
        notes += tier_notes
        problems += tier_problems
    if "autoscaling" in spec:  # Shoal's elastic cache: Fluid has none, the CRDs of its kinds take Shoal's
        handled.add("autoscaling")
        mapped["autoscaling"] = spec["autoscaling"]
        notes += [_ignored(kind, path, "not used by Shoal") for path in unknown_fields(RuntimeSpec, {
            "autoscaling": spec["autoscaling"]}, "spec")]
    if "management" in spec:
        handled.add("management")
        mapped["management"], management_notes = _management(kind, spec["management"])
        notes += management_notes

    block_size: str | int | None = None
    if kind in BLOCK_SIZE_PROPERTIES:
        handled.add("properties")
        properties = spec.get("properties")
        if isinstance(properties, dict):
            key = BLOCK_SIZE_PROPERTIES[kind]
            for name in properties:
                if name != key:
                    notes.append(_ignored(kind, f'spec.properties["{name}"]', "not used by Shoal"))
            if key in properties:
                where = f'spec.properties["{key}"]'
                try:
                    size = alluxio_size(properties[key])
                except ValueError as err:
                    problems.append(f"{where}: {err}")
                else:
                    block_size, size_notes, size_problems = _engine_block_size(kind, where, properties[key], size)
                    notes += size_notes
                    problems += size_problems
        elif properties is not None:
            problems.append("spec.properties must be a mapping")
    elif kind == "JuiceFSRuntime":
        block_size, juicefs_notes, juicefs_problems = _juicefs_block_size(spec)
        notes += juicefs_notes
        problems += juicefs_problems
        handled |= {"fuse", "configs"}
    if block_size is not None:
        mapped["blockSize"] = block_size

    notes += [_ignored(kind, f"spec.{key}", "not used by Shoal") for key in spec if key not in handled]
    return mapped, notes, problems


def _decimal_quantities(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The Runtime spec with its quantities written as YAML numbers with decimals (``quota: 1.5``,
    ``blockSize: 4194304.0``) turned into quantity text ("1.5"): Kubernetes' ``resource.Quantity`` takes a JSON
    number as the quantity it spells, and its byte count rounds a fraction of a byte up, as ``parse_quantity`` does
    with the text (1.5 is 2 bytes). The event's fields stay text or whole numbers. Problems: infinity and NaN, which
    Kubernetes refuses too."""
    problems: list[str] = []

    def text(value: Any, where: str) -> Any:
        if not isinstance(value, float):
            return value
        if not math.isfinite(value):
            problems.append(f"{where} {value} is not a size: write a quantity such as 100Gi")
            return value
        return repr(value)  # the shortest text that reads back as the same number: 1.5, 1e+16

    mapped = dict(spec)
    if "blockSize" in mapped:
        mapped["blockSize"] = text(mapped["blockSize"], "spec.blockSize")
    tieredstore = mapped.get("tieredstore")
    if isinstance(tieredstore, dict) and isinstance(tieredstore.get("levels"), list):
        mapped["tieredstore"] = {**tieredstore, "levels": [
            {**level, "quota": text(level["quota"], f"spec.tieredstore.levels[{index}].quota")}
            if isinstance(level, dict) and "quota" in level else level
            for index, level in enumerate(tieredstore["levels"])]}
    return mapped, problems


def _has_levels(tieredstore: Any) -> bool:
    return isinstance(tieredstore, dict) and bool(tieredstore.get("levels"))


def _tieredstore(kind: str, tieredstore: Any) -> tuple[Any, list[str], list[str]]:
    if not isinstance(tieredstore, dict):
        return tieredstore, [], []  # the schema check names the path and the expected type
    notes = [_ignored(kind, f"spec.tieredstore.{key}", "not used by Shoal") for key in tieredstore
             if key != "levels"]
    problems: list[str] = []
    levels = tieredstore.get("levels", [])
    if not isinstance(levels, list):
        return {"levels": levels}, notes, problems
    mapped_levels = []
    for index, level in enumerate(levels):
        if not isinstance(level, dict):
            mapped_levels.append(level)
            continue
        where = f"spec.tieredstore.levels[{index}]"
        mapped_level = {key: value for key, value in level.items() if key in LEVEL_FIELDS}
        if kind == "JuiceFSRuntime":
            notes += _juicefs_watermarks(kind, where, mapped_level)
            if isinstance(mapped_level.get("path"), str):
                # Fluid hands the path to JuiceFS as ``cache-dir``, whose directories are separated by ':'
                # (docs/zh/samples/juicefs/juicefs_cache_dir.md); Shoal's by ','.
                mapped_level["path"] = mapped_level["path"].replace(":", ",")
        notes += [_ignored(kind, f"{where}.{key}", "not used by Shoal")
                  for key in level if key not in (*LEVEL_FIELDS, QUOTA_LIST)]
        if level.get(QUOTA_LIST) not in (None, ""):
            quota, quota_list, problem = _quota_from_list(where, {**level, **mapped_level})
            if problem:
                problems.append(problem)
            elif quota is not None:
                if "quota" in level:
                    notes.append(_ignored(kind, f"{where}.quota", "quotaList is used, as in Fluid"))
                mapped_level["quota"] = quota
                if quota_list:
                    mapped_level[QUOTA_LIST] = quota_list
        elif "quota" not in level:
            problems.append(f"{where} needs quota (the tier's size, e.g. 100Gi) or quotaList (one quota per path)")
        mapped_levels.append(mapped_level)
    return {"levels": mapped_levels}, notes, problems


def _juicefs_watermarks(kind: str, where: str, level: dict[str, Any]) -> list[str]:
    """Take ``high`` and ``low`` out of a JuiceFSRuntime's tier: they are no watermarks there. Fluid's JuiceFS engine
    passes ``low`` to JuiceFS as ``free-space-ratio`` (the disk space kept free) and never reads ``high``
    (``pkg/ddc/juicefs/transform_fuse.go``, ``genMountOptions``); read as Shoal's low watermark, its samples'
    ``low: "0.1"`` would make every eviction drop the tier to a tenth of its quota."""
    defaults = f"Shoal evicts from {DEFAULT_HIGH_WATERMARK} down to {DEFAULT_LOW_WATERMARK} of the quota"
    notes = []
    if level.pop("high", None) is not None:
        notes.append(_ignored(kind, f"{where}.high", f"not used by Fluid's JuiceFS engine: {defaults}"))
    if level.pop("low", None) is not None:
        notes.append(_ignored(kind, f"{where}.low", "JuiceFS's free-space-ratio, the share of the disk kept free, "
                              f"not a watermark: {defaults}"))
    return notes


def _quota_from_list(where: str, level: dict[str, Any]) -> tuple[str | int | None, str, str]:
    """The tier quota Fluid's ``quotaList`` ("100Gi,50Gi": one quota per path of ``path``) stands for, the list a
    disk tier keeps (each directory holds at most its own quota: ``libs.events.runtime.directory_quotas``), or why
    neither. A memory tier is one quota however many paths it names: the sum, and no list. Fluid's rules
    otherwise: the list wins over ``quota``, and it has as many entries as ``path``
    (``pkg/ddc/base/runtime.go``, ``convertToTieredstoreInfo``).
    """
    text = level[QUOTA_LIST]
    if not isinstance(text, str | int | float) or isinstance(text, bool) or (isinstance(text, float)
                                                                             and not math.isfinite(text)):
        return None, "", f"{where}.quotaList must be a text of comma-separated quotas, like '100Gi,50Gi'"
    # A number with decimals (one path) is the quantity it spells, as ``_decimal_quantities`` reads a quota.
    entries = [entry.strip() for entry in (repr(text) if isinstance(text, float) else str(text)).split(",")]
    quotas = []
    for entry in entries:
        try:
            quotas.append(parse_quantity(entry))
        except ValueError as err:
            return None, "", f"{where}.quotaList {text!r}: {err}"
    path = level.get("path", "")
    # Counted as the agent's cache reads ``path`` (``directory_quotas``): an empty entry (a trailing comma) is none.
    paths = len([entry for entry in path.split(",") if entry.strip()]) if isinstance(path, str) else 1
    if len(quotas) != paths:
        return None, "", (f"{where}.quotaList {text!r} has {len(quotas)} quota{'' if len(quotas) == 1 else 's'} for "
                          f"the {paths} path{'' if paths == 1 else 's'} in path: give one quota per path, in the "
                          "same order")
    if level.get("mediumtype") in ("SSD", "HDD"):
        # Kept even when its quotas are equal (the agent's split is the same): the runtime service's refusals then
        # name the entry the user wrote, not a ``quota`` made here.
        return _bytes_quantity(sum(quotas)), ",".join(entries), ""
    return _bytes_quantity(sum(quotas)), "", ""


def _quota_list_without_quota(spec: dict[str, Any]) -> list[str]:
    """Why a Shoal Runtime's tiers that give ``quotaList`` and no ``quota`` are refused (msgspec would say only
    "missing required field `quota`"). Shoal's own kind states the tier's quota, as its CRD requires, and the
    runtime service refuses one that is not the list's sum rather than correct it: derived here, ``shoal apply``
    would accept what ``kubectl apply`` of the same document is refused. Fluid's kinds derive it (``_tieredstore``).
    """
    tieredstore = spec.get("tieredstore")
    levels = tieredstore.get("levels") if isinstance(tieredstore, dict) else None
    problems = []
    for index, level in enumerate(levels if isinstance(levels, list) else []):
        if not isinstance(level, dict) or "quota" in level or level.get(QUOTA_LIST) in (None, ""):
            continue
        text = level[QUOTA_LIST]
        try:
            size = sum(parse_quantity(entry.strip()) for entry in str(text).split(","))
        except ValueError:
            size = 0  # the runtime service says what is wrong with the list once a quota is given
        total = f" (quota: {_bytes_quantity(size)})" if size > 0 else ""
        problems.append(f"spec.tieredstore.levels[{index}].quota is required with quotaList {text!r}: give the "
                        f"tier's quota, the sum of quotaList{total}")
    return problems


def _management(kind: str, management: Any) -> tuple[Any, list[str]]:
    """Fluid's RuntimeManagement: its metadataSyncPolicy as it is (autoSync); cleanCachePolicy is not used."""
    if not isinstance(management, dict):
        return management, []  # the schema check names the path and the expected type
    notes = [_ignored(kind, f"spec.management.{key}", "not used by Shoal") for key in management
             if key != "metadataSyncPolicy"]
    mapped = {key: value for key, value in management.items() if key == "metadataSyncPolicy"}
    notes += [_ignored(kind, path, "not used by Shoal") for path in unknown_fields(RuntimeManagement, mapped,
                                                                                   "spec.management")]
    return mapped, notes


def _juicefs_block_size(spec: dict[str, Any]) -> tuple[str | int | None, list[str], list[str]]:
    """JuiceFS's block size from ``spec.configs`` (format flags) or ``spec.fuse.options``; the latter wins.

    Fluid passes ``spec.configs`` entries to ``juicefs format`` as ``--<entry>`` and ``spec.fuse.options`` to the
    mount; ``block-size`` is a format setting, but both places are read so neither is lost.
    """
    kind = "JuiceFSRuntime"
    notes: list[str] = []
    problems: list[str] = []
    found: tuple[str, Any] | None = None
    configs = spec.get("configs")
    if isinstance(configs, list):
        for index, entry in enumerate(configs):
            key, _, value = str(entry).strip().lstrip("-").partition("=")
            if key == JUICEFS_BLOCK_SIZE:
                found = (f"spec.configs[{index}]", value)
            else:
                # The flag's name only: a value may be a credential (meta URLs, access keys), and notes become
                # Kubernetes Events.
                notes.append(_ignored(kind, f"spec.configs[{index}] (--{key})", "not used by Shoal"))
    elif configs is not None:
        problems.append("spec.configs must be a list")
    fuse = spec.get("fuse")
    if isinstance(fuse, dict):
        notes += [_ignored(kind, f"spec.fuse.{key}", "not used by Shoal") for key in fuse if key != "options"]
        options = fuse.get("options")
        if isinstance(options, dict):
            for key, value in options.items():
                if key == JUICEFS_BLOCK_SIZE:
                    found = (f'spec.fuse.options["{key}"]', value)
                else:
                    notes.append(_ignored(kind, f'spec.fuse.options["{key}"]', "not used by Shoal"))
        elif options is not None:
            problems.append("spec.fuse.options must be a mapping")
    elif fuse is not None:
        problems.append("spec.fuse must be a mapping")
    if found is None:
        return None, notes, problems
    where, value = found
    try:
        size = juicefs_size(value)
    except ValueError as err:
        problems.append(f"{where}: {err}")
        return None, notes, problems
    block_size, size_notes, size_problems = _engine_block_size(kind, where, value, size)
    return block_size, notes + size_notes, problems + size_problems


def _engine_block_size(kind: str, where: str, value: Any, size: int) -> tuple[str | int | None, list[str], list[str]]:
    """Shoal's ``blockSize`` for an engine's block size of ``size`` bytes (``value`` as written at ``where``).

    Larger than Shoal's largest block: the largest, with a note. The engine's size is a tuning of its own storage
    (Fluid's FAQ suggests Alluxio's ``256MB`` for large files), and Shoal's nearest block serves the same intent;
    refused, a manifest following Fluid's advice would not apply, and the runtime service's refusal named
    ``spec.blockSize``, a field the manifest does not have. Smaller than the smallest, or not whole pages: refused
    naming the engine's setting (no Fluid sample comes near).
    """
    if size > MAX_BLOCK_SIZE:
        largest = _bytes_quantity(MAX_BLOCK_SIZE)
        return largest, [_ignored(kind, where, f"{value!r} is more than Shoal's largest block: blocks of "
                                                f"{largest}")], []
    if size < MIN_BLOCK_SIZE or size % BLOCK_ALIGNMENT:
        return None, [], [f"{where} {value!r} is not a block size Shoal takes: a multiple of "
                          f"{_bytes_quantity(BLOCK_ALIGNMENT)} from {_bytes_quantity(MIN_BLOCK_SIZE)} to "
                          f"{_bytes_quantity(MAX_BLOCK_SIZE)} (e.g. 4MB)"]
    return _bytes_quantity(size), [], []


# --- sizes ---

_ALLUXIO_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)b?$", re.IGNORECASE)
_JUICEFS_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(?:i?b)?$", re.IGNORECASE)
_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}


def alluxio_size(value: Any) -> int:
    """Bytes of an Alluxio size ("64MB", "1GB", 67108864): Alluxio's KB/MB/GB are powers of 1024."""
    return _size(value, _ALLUXIO_SIZE, default_unit="")


def juicefs_size(value: Any) -> int:
    """Bytes of a JuiceFS block size: a plain number is KiB (JuiceFS's unit), "4M"/"4MiB" carry their own."""
    return _size(value, _JUICEFS_SIZE, default_unit="k")


def _size(value: Any, pattern: re.Pattern[str], default_unit: str) -> int:
    match = pattern.match(str(value).strip()) if not isinstance(value, bool) else None
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 4MB, 64MB, 1GB)")
    number, unit = match.groups()
    size = Decimal(number) * _BINARY[(unit or default_unit).lower()]
    if size != size.to_integral_value() or size <= 0:
        raise ValueError(f"{value!r} is not a positive whole number of bytes")
    return int(size)


def _bytes_quantity(size: int) -> str | int:
    """The Kubernetes quantity Shoal's RuntimeSpec uses ("4Mi"), or plain bytes when no unit divides evenly."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return size


# --- unknown fields ---


def unknown_fields(struct_type: type[Any], value: Any, path: str) -> list[str]:
    """Paths in ``value`` that ``struct_type`` has no field for (msgspec would drop them without a word)."""
    return [found for found, _ in _unknown(msgspec.inspect.type_info(struct_type), value, path)]


def unknown_field_notes(kind: str, struct_type: type[Any], value: Any, path: str) -> list[str]:
    """The notes on ``value``'s unknown fields, each with the field it was likely meant to be when one is close
    (``spec.mount``: "did you mean spec.mounts?"): a misspelt field is ignored, and what the dataset then lacks is
    refused with no word of the spelling ("spec.mounts must list at least one mount")."""
    notes = []
    for found, meant in _unknown(msgspec.inspect.type_info(struct_type), value, path):
        notes.append(_ignored(kind, found, f"unknown field; did you mean {meant}?" if meant else "unknown field"))
    return notes


def _meant(key: str, names: Sequence[str]) -> str | None:
    """The field ``key`` was likely meant to be: the same letters in another case, else the closest spelling."""
    same = [name for name in names if name.lower() == key.lower()]
    return same[0] if same else next(iter(difflib.get_close_matches(key, names, n=1, cutoff=0.75)), None)


def _unknown(info: msgspec.inspect.Type, value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, dict):
        fields = {field.encode_name: field for field in info.fields}
        found: list[tuple[str, str]] = []
        for key, item in value.items():
            field = fields.get(key)
            if field is None:
                meant = _meant(str(key), [name for name in fields if name not in value])
                found.append((f"{path}.{key}", f"{path}.{meant}" if meant else ""))
            else:
                found += _unknown(field.type, item, f"{path}.{key}")
        return found
    if isinstance(info, msgspec.inspect.ListType) and isinstance(value, list):
        return [found for index, item in enumerate(value)
                for found in _unknown(info.item_type, item, f"{path}[{index}]")]
    if isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            if isinstance(member, msgspec.inspect.StructType) and isinstance(value, dict):
                return _unknown(member, value, path)
    return []
