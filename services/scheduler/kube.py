"""The parts of the Kubernetes objects that the webhook and the extender read, as msgspec-decoded TypedDicts, and the
decoders that keep only those parts of a request body.

A request is decoded straight into these types: every other key (containers, env, status, images, managed fields,
annotations...) is skipped by the decoder without being built, so decoding a body costs memory in proportion to what
is kept, not to the body (decoded generically, a body of many Node objects became a dict tree of several times its
size). A Node object the filter answers back is kept as a ``msgspec.Raw`` view of the body, not decoded.

Shapes are not judged here: each kept field accepts any JSON type, and a value of the wrong type is kept one level
deep (a list or an object of ``msgspec.Raw`` views), so that ``admission.py`` and ``extender.py`` check the shapes as
they always did, with errors that name the field (never a value). TypedDicts decode to plain dicts: absent keys stay
absent and ``null`` stays ``None``, as in a generic decode restricted to the kept keys.
"""

from __future__ import annotations

from typing import TypedDict

import msgspec
from msgspec import Raw

# Any JSON value, one level deep: what a kept field of the wrong type holds (its type is all the checks read).
Value = list[Raw] | dict[str, Raw] | str | int | float | bool | None
# Any JSON value but an object / but an array: the other types, next to a TypedDict / a typed list (msgspec allows one
# object type and one array type in a union).
NotObject = list[Raw] | str | int | float | bool | None
NotList = dict[str, Raw] | str | int | float | bool | None


# A JSON value that is neither an array nor an object.
Scalar = str | int | float | bool | None


class Requirement(TypedDict, total=False):
    """A node selector requirement (an item of ``matchExpressions`` / ``matchFields``): its key (whether the pod
    places itself by host name), operator and values (whether it excludes the nodes holding a dataset)."""

    key: Value
    operator: Value
    values: list[Scalar | list[Raw] | dict[str, Raw]] | dict[str, Raw] | Scalar


class Term(TypedDict, total=False):
    """A node selector term: whether it has requirements, and their keys."""

    matchExpressions: list[Requirement | NotObject] | NotList
    matchFields: list[Requirement | NotObject] | NotList


class PreferredTerm(TypedDict, total=False):
    """A preferred scheduling term: its weight is not read."""

    preference: Term | NotObject


class NodeSelector(TypedDict, total=False):
    nodeSelectorTerms: list[Term | NotObject] | NotList


class NodeAffinity(TypedDict, total=False):
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredTerm | NotObject] | NotList
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelector | NotObject


class Affinity(TypedDict, total=False):
    """Pod affinity and anti-affinity are not read."""

    nodeAffinity: NodeAffinity | NotObject


class Claim(TypedDict, total=False):
    claimName: Value


class Volume(TypedDict, total=False):
    """A pod volume: only a PVC's claim name is read."""

    persistentVolumeClaim: Claim | NotObject


class PodSpec(TypedDict, total=False):
    nodeName: Value
    nodeSelector: dict[str, Value] | NotObject
    affinity: Affinity | NotObject
    volumes: list[Volume | NotObject] | NotList


class ObjectMeta(TypedDict, total=False):
    name: Value
    generateName: Value
    namespace: Value
    labels: dict[str, Value] | NotObject


class Pod(TypedDict, total=False):
    metadata: ObjectMeta | NotObject
    spec: PodSpec | NotObject


class Kind(TypedDict, total=False):
    group: Value
    kind: Value


class AdmissionRequest(TypedDict, total=False):
    """An AdmissionReview's request: ``oldObject``, ``userInfo`` and the rest are not read."""

    uid: Value
    kind: Kind | NotObject
    operation: Value
    namespace: Value
    subResource: Value
    object: Pod | NotObject


class AdmissionReview(TypedDict, total=False):
    apiVersion: Value
    kind: Value
    request: AdmissionRequest | NotObject


class NodeMeta(TypedDict, total=False):
    name: Value
    labels: dict[str, Value] | NotObject


class Node(TypedDict, total=False):
    metadata: NodeMeta | NotObject


class NodeList(TypedDict, total=False):
    # Each node as sent: the filter answers the kept ones back, and each is decoded as a ``Node`` on its own.
    items: Value


# Built once. ExtenderArgs has Go's field names, matched case-insensitively, so its top level is read as an object
# of raw values, and each one decoded by the type its key names.
REVIEW = msgspec.json.Decoder(AdmissionReview | NotObject)
EXTENDER_ARGS = msgspec.json.Decoder(Value)
POD = msgspec.json.Decoder(Pod | NotObject)
NODE_LIST = msgspec.json.Decoder(NodeList | NotObject)
NODE = msgspec.json.Decoder(Node | NotObject)
NODE_NAMES = msgspec.json.Decoder(list[Value] | NotList)
