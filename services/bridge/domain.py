"""Bridge decisions, pure: a custom resource → the command Shoal understands (with a deterministic id), the status
to write back in Shoal's or Fluid's shape, the merge patch that gets there, and the PersistentVolume, claim and
Kubernetes Events the bridge creates.

No I/O and no clock: objects come in as the API server's JSON (dicts), ``now`` is a parameter. Handlers read the
API and the KV mirrors, call these, and write.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from libs import kube, references
from libs.crds import fluid_unheld_status, shoal_status
from libs.deletion import deleted_at
from libs.documents import (
    Command,
    documents_to_commands,
    read_only_message,
    read_only_note,
    too_large,
)
from libs.events.common import DECODE_ERRORS, DNS1123_SUBDOMAIN, rfc3339, to_builtins
from libs.events.dataset import REASON_WRITES_NOT_SERVED, Condition, DatasetApply, DatasetStatus, write_access_modes
from libs.events.operation import OperationRecord, OperationStatus
from libs.mounts import MISSING_SECRET_KEY, exposed_secret_errors, flat_secret_key

# The annotation kubectl keeps a whole copy of the object in: not the user's metadata, and it can be large.
DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
# Condition the bridge adds when Shoal (or the bridge itself) refused the object's current spec.
CONDITION_ACCEPTED = "Accepted"
REASON_INVALID = "Invalid"  # the bridge could not translate it (schema, missing secret)
REASON_REJECTED = "Rejected"  # a service refused it (validation); the message is its reason
REASON_IGNORED = "FieldsIgnored"  # a Normal Event listing the fields Shoal does not use (libs.documents' notes)
# A Warning Event for a Dataset whose accessModes promise writes (accepted, mounted read-only): the reason of the
# dataset's ReadOnly condition, not FieldsIgnored, since the field is used (the volume and claim carry it).
REASON_READ_ONLY = REASON_WRITES_NOT_SERVED
# Condition (False while it holds) and Warning Event of a Bound Dataset whose PersistentVolume or claim name is held
# by an object that is not its own: Fluid's volume name ``<namespace>-<name>`` is the same for a-b/c and a/b-c.
CONDITION_VOLUME = "VolumeCreated"
REASON_VOLUME_TAKEN = "VolumeNameTaken"
# Fluid's Dataset condition (type and reason are Fluid's): True once the dataset is Bound, False otherwise. Fluid's
# controllers always write it, and `kubectl wait --for=condition=Ready dataset/<name>` (as Fluid's docs wait for a
# dataset) waits on it.
CONDITION_READY = "Ready"
REASON_DATASET_READY = "DatasetReady"
# As Fluid's PersistentVolumes: the size of a FUSE mount is not enforced, and a claim must fit its volume.
VOLUME_CAPACITY = "100Pi"
# Static binding only: no provisioner exists for it, the claim names its volume.
STORAGE_CLASS = "shoal"
COMPONENT = kube.MANAGED_BY
# Kubernetes object names (Events) are DNS-1123 subdomains of at most 253 characters.
MAX_NAME = 253
# A Secret's data keys (Kubernetes' IsConfigMapKey): these characters, at most 253 of them.
SECRET_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
MAX_SECRET_DATA_KEY = 253
# libs.documents names the document in a YAML stream ("document 1 (Dataset demo): "); here there is only one.
_DOCUMENT_LABEL = re.compile(r"^document 1 \([^)]*\): ")


@dataclass(frozen=True)
class ObjectKey:
    resource: kube.Resource
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.resource.kind}.{self.resource.group} {self.namespace}/{self.name}"


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def key_of(resource: kube.Resource, obj: dict[str, Any]) -> ObjectKey:
    meta = _metadata(obj)
    return ObjectKey(resource, str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


# An object uid as the API server makes them (a UUID); anything else stands in command ids, message ids and KV keys
# as its digest (``uid_of``).
_UID_TOKEN = re.compile(r"[A-Za-z0-9-]{1,128}")


def generation_of(obj: dict[str, Any]) -> int:
    """The object's ``metadata.generation`` (0 when it has none, or something else than a number)."""
    generation = _metadata(obj).get("generation", 0)
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else 0


def uid_of(obj: dict[str, Any]) -> str:
    """The object's uid: a name deleted and made again is another object, with another uid. One that is not a plain
    token (never from an API server, but a client may send anything: dots, a line break, a lone surrogate that no
    encoder takes) is its digest, so it cannot split an id, a header or a KV key, or crash an encoder."""
    uid = str(_metadata(obj).get("uid") or "")
    if not uid or _UID_TOKEN.fullmatch(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def is_fluid(resource: kube.Resource) -> bool:
    return resource.group == kube.FLUID_GROUP


def family(resource: kube.Resource) -> str:
    """dataset, runtime, dataload or dataclean: which Shoal object (and KV bucket) a kind maps to."""
    if resource.kind in ("Dataset", "DataLoad", "DataClean"):
        return resource.kind.lower()
    return "runtime"


def record_key(key: ObjectKey) -> tuple[str, str, str]:
    """The Shoal record an object stands for: one per family (a dataset, a runtime, a DataLoad, a DataClean),
    namespace and name, whatever the API group or kind. A shoal.io and a data.fluid.io Dataset of one name, or an
    AlluxioRuntime and a JuiceFSRuntime, would share one."""
    return family(key.resource), key.namespace, key.name


def claimant(candidates: dict[ObjectKey, dict[str, Any]]) -> ObjectKey:
    """Of the objects standing for one Shoal record, the one Shoal serves: the one holding Shoal's finalizer
    (accepted before), else the oldest, else by API group and kind. The order does not depend on which the bridge
    saw first, so a restart (whose lists come in any order) picks the same one."""
    def rank(item: tuple[ObjectKey, dict[str, Any]]) -> tuple[bool, str, str, str]:
        key, obj = item
        return (kube.FINALIZER not in finalizers(obj), str(_metadata(obj).get("creationTimestamp") or ""),
                key.resource.group, key.resource.kind)

    return min(candidates.items(), key=rank)[0]


def rival_message(key: ObjectKey, holder: ObjectKey) -> str:
    """Why ``key`` is refused: ``holder`` stands for the same Shoal record and is the one Shoal serves."""
    what = family(key.resource)
    return (f"{holder.resource.kind}.{holder.resource.group} {holder.namespace}/{holder.name} is already Shoal's "
            f"{what} {key.namespace}/{key.name} (Shoal keeps one {what} per namespace and name, whatever the API "
            f"group or kind): rename this {key.resource.kind} or delete one of them")


# --- Secrets ---


def stored_secret_name(namespace: str, name: str) -> str:
    """The name a referenced Secret is handed to the services under: namespaced, so a Dataset of one namespace can
    never use a same-named Secret of another (a namespace holds no '.', so the split is unambiguous)."""
    return f"{namespace}.{name}"


def _list(value: Any) -> list[Any]:
    # Fields of an object as the API server hands them out have their schema's types; one that does not (found by
    # fuzzing) counts as absent here, and the document's translation says what is wrong with it.
    return value if isinstance(value, list) else []


def _secret_key_ref(option: Any) -> Any:
    """An ``encryptOptions`` entry's ``valueFrom.secretKeyRef``, or None."""
    value_from = option.get("valueFrom") if isinstance(option, dict) else None
    return value_from.get("secretKeyRef") if isinstance(value_from, dict) else None


def secret_refs(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(Secret name, key) of every ``encryptOptions`` entry of a Dataset object, in order, without repeats."""
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        return []
    options: list[Any] = list(_list(spec.get("sharedEncryptOptions")))
    for mount in _list(spec.get("mounts")):
        if isinstance(mount, dict):
            options += _list(mount.get("encryptOptions"))
    refs: list[tuple[str, str]] = []
    for option in options:
        ref = _secret_key_ref(option)
        if (isinstance(ref, dict) and isinstance(ref.get("name"), str) and isinstance(ref.get("key"), str)
                and (ref["name"], ref["key"]) not in refs):
            refs.append((ref["name"], ref["key"]))
    return refs


def _rename_refs(options: Any, namespace: str) -> Any:
    if not isinstance(options, list):
        return options
    renamed = []
    for option in options:
        ref = _secret_key_ref(option)
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            option = {**option, "valueFrom": {**option["valueFrom"],
                                              "secretKeyRef": {**ref, "name": stored_secret_name(namespace,
                                                                                                 ref["name"])}}}
        renamed.append(option)
    return renamed


def with_stored_secret_names(spec: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The spec with every secretKeyRef naming the stored copy (``stored_secret_name``) instead of the Secret."""
    mapped = dict(spec)
    if "sharedEncryptOptions" in spec:
        mapped["sharedEncryptOptions"] = _rename_refs(spec["sharedEncryptOptions"], namespace)
    if isinstance(spec.get("mounts"), list):
        mapped["mounts"] = [{**m, "encryptOptions": _rename_refs(m["encryptOptions"], namespace)}
                            if isinstance(m, dict) and "encryptOptions" in m else m for m in spec["mounts"]]
    return mapped


def secret_ref_errors(refs: list[tuple[str, str]], namespace: str) -> list[str]:
    """Secret names that cannot be stored namespaced (too long for a DNS-1123 subdomain)."""
    return [f"secret {name!r}: {stored_secret_name(namespace, name)!r} would be longer than {MAX_NAME} characters "
            "or not a DNS-1123 subdomain" for name, _ in refs
            if len(stored_secret_name(namespace, name)) > MAX_NAME
            or not DNS1123_SUBDOMAIN.fullmatch(stored_secret_name(namespace, name))]


def mirror_key(namespace: str, name: str, key: str) -> str:
    """The data key of Secret ``namespace/name``'s ``key`` in the bridge's mirror Secret (``SHOAL_KUBE_SECRET_MIRROR``):
    the stored name and the key, spelled as the services read them (``libs.mounts.flat_secret_key``)."""
    return flat_secret_key(stored_secret_name(namespace, name), key)


def mirror_key_errors(refs: list[tuple[str, str]], namespace: str) -> list[str]:
    """References whose mirror data key Kubernetes would refuse (too long, or a character a key cannot hold)."""
    errors = []
    for name, key in refs:
        flat = mirror_key(namespace, name, key)
        if len(flat) > MAX_SECRET_DATA_KEY or not SECRET_DATA_KEY.fullmatch(flat):
            errors.append(f"secret {name!r} key {key!r}: the mirror's key {flat!r} would be longer than "
                          f"{MAX_SECRET_DATA_KEY} characters or hold characters other than letters, digits, "
                          "'-', '_' and '.'")
    return errors


def secret_files(flat: str) -> list[tuple[str, str]]:
    """Where the files mode (no mirror) may have written mirror key ``flat``'s value: (folder, file) under
    ``SHOAL_SECRETS_DIR``, ``<namespace>.<secret>/<key>``. The key's dots do not say where the Secret's name ends
    (Secret ``a.b`` key ``c``, Secret ``a`` key ``b.c``), so every split is given whose folder holds the namespace's
    dot and is a stored name (``secret_ref_errors``) and whose file is a Secret data key: never a path out of the
    folder, whatever a spec names."""
    splits = []
    for at, char in enumerate(flat):
        folder, file = flat[:at], flat[at + 1:]
        if (char == "." and "." in folder and len(folder) <= MAX_NAME and DNS1123_SUBDOMAIN.fullmatch(folder)
                and len(file) <= MAX_SECRET_DATA_KEY and SECRET_DATA_KEY.fullmatch(file) and file not in (".", "..")):
            splits.append((folder, file))
    return splits


def mirror_changes(current: dict[str, str], wanted: dict[str, bytes]) -> dict[str, str]:
    """The mirror Secret's ``data`` entries (base64) that differ from ``wanted``: what a merge patch must set."""
    encoded = {key: base64.b64encode(value).decode() for key, value in wanted.items()}
    return {key: value for key, value in encoded.items() if current.get(key) != value}


def mirror_keys(obj: dict[str, Any]) -> frozenset[str]:
    """The mirror keys a Dataset object refers to."""
    namespace = _namespace_of(obj)
    return frozenset(mirror_key(namespace, name, key) for name, key in secret_refs(obj))


def unreferenced(keys: frozenset[str], remaining: list[dict[str, Any]],
                 kept: frozenset[str] = frozenset()) -> list[str]:
    """Of ``keys``, those no ``remaining`` Dataset object refers to and not in ``kept`` (the keys other Datasets'
    published specs hold, some not listed yet after a start)."""
    keep = set(kept).union(*(mirror_keys(obj) for obj in remaining))
    return sorted(keys - keep)


def unused_mirror_keys(gone: dict[str, Any], remaining: list[dict[str, Any]]) -> list[str]:
    """Mirror keys of a deleted Dataset object that no remaining Dataset object refers to."""
    return unreferenced(mirror_keys(gone), remaining)


def _namespace_of(obj: dict[str, Any]) -> str:
    return str(_metadata(obj).get("namespace") or "default")


# The kubelet refreshes a mounted Secret within about a minute (its sync period plus its cache's lifetime), so a
# key just mirrored is usually not in the services' folder at a new Dataset's first sync. The bridge asks for a
# resync this often while the sync says a key is missing, at most this many times (three minutes), after which the
# failure stays (a mirror the services do not mount, say) until the user resyncs or changes the Dataset.
MIRROR_RESYNC_SECONDS = 20.0
MIRROR_RESYNC_TRIES = 9


def waits_for_mounted_secret(status: Any) -> bool:
    """The Dataset's last sync failed because a secret key was not in the services' folder (yet)."""
    return (isinstance(status, DatasetStatus) and status.phase == "Failed"
            and MISSING_SECRET_KEY in status.message)


def resync_id(obj: dict[str, Any], tries: int) -> str:
    """The id of the bridge's ``tries``-th resync of this version of a Dataset: the same after a restart."""
    return f"k8s.resync.{uid_of(obj)}.{generation_of(obj)}.{tries}"


# --- Translation ---


@dataclass(frozen=True)
class Translation:
    """The command for an object's current spec, or why there is none; what Shoal ignores of it (``notes``, the
    "ignored: ..." notes of libs.documents) and, for a Dataset whose accessModes promise writes, the warning that its
    mounts are read-only all the same (``read_only``, "" when they do not)."""

    command: Command | None
    errors: list[str]
    notes: list[str]
    read_only: str = ""


def document_of(resource: kube.Resource, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as ``shoal apply -f`` would read it: apiVersion, kind, user metadata, spec; Secrets renamed."""
    meta = _metadata(obj)
    user_meta: dict[str, Any] = {"name": meta.get("name"), "namespace": meta.get("namespace") or "default"}
    if meta.get("labels"):
        user_meta["labels"] = meta["labels"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in DROPPED_ANNOTATIONS}
    if annotations:
        user_meta["annotations"] = annotations
    spec = obj.get("spec") or {}
    if resource.kind == "Dataset" and isinstance(spec, dict):
        spec = with_stored_secret_names(spec, user_meta["namespace"])
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": user_meta, "spec": spec}


def translate(resource: kube.Resource, obj: dict[str, Any], max_bytes: int | None = None,
              event_limit: int | None = None) -> Translation:
    """The apply command of the object (``libs.documents``, as ``shoal apply -f``), with a deterministic id; none,
    with the reason, when a Dataset gives a secret in clear text (``libs.mounts.exposed_secret_errors``: the reasons
    name the fields, never the values), or when its message would be longer than ``max_bytes`` (NATS refuses it: a
    Kubernetes object may reach about 1.5 MB, a NATS message 1 MiB by default), or than ``event_limit`` (the
    ``SHOAL_MAX_EVENT_BYTES`` of the service that takes it: it would refuse it); no retry would change either."""
    document = document_of(resource, obj)
    namespace = document["metadata"]["namespace"]
    commands, notes, errors = documents_to_commands([document], default_namespace=namespace)
    if errors or not commands:
        return Translation(None, [_DOCUMENT_LABEL.sub("", e) for e in errors] or ["not understood"], notes)
    command = commands[0]
    if isinstance(command.event, DatasetApply) and (exposed := exposed_secret_errors(command.event.dataset)):
        # Refused here, as ``shoal apply`` refuses it: published, the secret would stay in the commands stream and
        # reach every subscriber (and a rejected apply is sent again at every start of the bridge).
        return Translation(None, exposed, notes)
    event = msgspec.structs.replace(command.event, id=apply_id(resource, obj, command))
    if max_bytes is not None and (problem := too_large(event, resource.kind, max_bytes, event_limit)):
        return Translation(None, [problem], notes)
    read_only = ""
    if isinstance(event, DatasetApply) and (writes := write_access_modes(event.dataset.spec.access_modes)):
        # Told apart from the ignored fields: its own Event, with the reason the dataset's condition carries.
        notes = [note for note in notes if note != read_only_note(command.source_kind, writes)]
        read_only = read_only_message(command.source_kind, writes)
    return Translation(Command(command.document, command.source_kind, command.kind, command.name,
                               command.namespace, command.subject, event), [], notes, read_only)


def apply_id(resource: kube.Resource, obj: dict[str, Any], command: Command) -> str:
    """``k8s.<kind>.<uid>.<generation>.<digest of the command>``: the same object at the same generation always
    gives the same id (JetStream drops the repeat within its duplicate window, and the services keep the generation
    of a same-spec apply after it), while a label change, which keeps the generation, still gives a new one."""
    # Sorted keys: the same labels or options in another order are the same command.
    body = msgspec.json.encode(msgspec.structs.replace(command.event, id=""), order="sorted")
    digest = hashlib.sha256(body).hexdigest()[:12]
    return f"k8s.{resource.kind.lower()}.{uid_of(obj)}.{generation_of(obj)}.{digest}"


def delete_id(resource: kube.Resource, obj: dict[str, Any]) -> str:
    return f"k8s.{resource.kind.lower()}.{uid_of(obj)}.delete"


# --- What was published (the bridge's KV bucket, ``subjects.KV_BRIDGE_APPLIED``) ---


class Applied(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The apply command the bridge last published for one custom resource, kept under the object's uid: a restarted
    bridge publishes an object only if its command id differs (its spec, labels or generation changed meanwhile),
    and publishes the delete of an object it finds here and in no list (deleted while it was down)."""

    command_id: str
    group: str
    kind: str
    namespace: str
    name: str
    # A Dataset's mirror keys (``mirror_key``) its published spec referred to: removed when it is found deleted, or
    # its spec changed, while the bridge was down. None: unknown (an entry written before they were kept).
    held: tuple[str, ...] | None = None
    # A Dataset's (Secret, key) references of its published spec: after a start, the Secrets still handed over
    # while its current spec is invalid (``running_refs``). None: unknown (an entry written before they were kept).
    secrets: tuple[tuple[str, str], ...] | None = None
    # The commands stream's sequence of the publish: a resend answered with the same one was dropped as a repeat.
    sequence: int = 0
    # The facts stream's sequence of the latest rejection of ``command_id`` the bridge took in, and whether it is in
    # force (the services rejected or gave up on the command) or was answered by a resend (``sent_before``).
    rejection: int = 0
    rejected: bool = False
    # The commands stream's sequence of the first apply published for this object (this uid): a Shoal record that
    # took in none since is another object's (``of_earlier_object``). 0: unknown (an entry written before it was kept).
    first: int = 0


def applied(key: ObjectKey, command_id: str, held: frozenset[str] | None = None, sequence: int = 0,
            rejection: int = 0, first: int = 0, secrets: list[tuple[str, str]] | None = None) -> Applied:
    return Applied(command_id=command_id, group=key.resource.group, kind=key.resource.kind,
                   namespace=key.namespace, name=key.name, held=None if held is None else tuple(sorted(held)),
                   sequence=sequence, rejection=rejection, first=first,
                   secrets=None if secrets is None else tuple(secrets))


def held_keys(entry: Applied | None) -> frozenset[str]:
    """The mirror keys an entry says its published spec referred to (none when unknown)."""
    return frozenset(entry.held or ()) if entry is not None else frozenset()


def running_refs(published: list[tuple[str, str]] | None, entry: Applied | None) -> list[tuple[str, str]]:
    """The (Secret, key) references of the spec Shoal runs for a Dataset: those of this process's last publish
    (``published``), else, after a start, those its bucket entry kept (none when unknown)."""
    if published is not None:
        return published
    return [(name, key) for name, key in entry.secrets or ()] if entry is not None else []


def command_uid(command_id: str) -> str:
    """The object uid in one of the bridge's command ids (``k8s.<kind>.<uid>....``), or "" for another's."""
    parts = command_id.split(".")
    return parts[2] if len(parts) >= 4 and parts[0] == "k8s" else ""


def rejection_holds(entry: Applied | None, command_id: str, sequence: int) -> bool:
    """Whether the rejection of ``command_id`` at facts-stream ``sequence`` still stands: not when a restart sent
    the command again after it (the facts are read from the start, so an old one comes back at every start)."""
    return (entry is None or entry.command_id != command_id or entry.rejected or sequence > entry.rejection)


def sent_before(entry: Applied | None, command_id: str, rejection: int) -> bool:
    """Whether the services have this apply from an earlier process, so a restart need not publish it: the entry
    holds its id, and no rejection of it stands (``rejection``: the facts-stream sequence of the latest one this
    process read, 0 for none). A rejected or given-up apply is sent again: the cause may be fixed meanwhile."""
    return (entry is not None and entry.command_id == command_id and not entry.rejected
            and rejection <= entry.rejection)


def rejected(entry: Applied, sequence: int) -> Applied:
    return msgspec.structs.replace(entry, rejected=True, rejection=sequence)


# The operations of a kind in ``kube.EXPIRING_KINDS``.
def of_earlier_object(record_sequence: int | None, first_apply: int) -> bool:
    """Whether Shoal's record under an object's name (``record_sequence``: the commands-stream sequence of the last
    apply it took in; None: no record) is another, earlier object's: it has taken in none of this object's applies,
    the first of which is at ``first_apply`` (0: unknown). A Dataset deleted without Shoal's finalizer and made again
    under its name has its delete and the new object's apply published at once; until the service takes them in,
    the record, its phase and its files are the deleted object's, not the new one's. Derived from the object's entry
    in the bridge's bucket, so a restarted bridge tells it as well as the one that published the delete."""
    return record_sequence is not None and record_sequence < first_apply


_EXPIRING_FAMILIES = frozenset(kind.lower() for kind in kube.EXPIRING_KINDS)


def expires(resource: kube.Resource) -> bool:
    """Whether Shoal removes this kind's operations after their ``ttlSecondsAfterFinished`` (DataLoad, DataClean,
    either group): the bridge then deletes the custom resource."""
    return family(resource) in _EXPIRING_FAMILIES


def expired_record(history: list[tuple[str | None, bytes]], entry: Applied | None) -> OperationRecord | None:
    """The last record of an operation Shoal removed by its ``ttlSecondsAfterFinished`` after taking in this
    object's apply, from the KV history of its key (oldest first: (operation, value), operation ``DEL``/``PURGE``
    for a marker, else None); None when the removal is not that.

    The loader removes an expired operation with a delete marker that carries no note, where a delete command's
    carries its stream sequence (``libs.deletion``); the record before the marker is the final one (finished, with a
    TTL), and its ``command_sequence`` (the last apply it took in) is at least the one of this object's apply
    (``entry.sequence``) only if that apply reached the removed record: an object made again under the name, whose
    apply the loader did not take in yet, is not the one that expired.
    """
    if entry is None or len(history) < 2:
        return None
    (marker, note), (operation, value) = history[-1], history[-2]
    if marker != "DEL" or deleted_at(note) or operation is not None:
        return None
    try:
        record = msgspec.json.decode(value, type=OperationRecord)
    except DECODE_ERRORS:
        return None
    spec = record.load or record.clean
    if (spec is None or spec.ttl_seconds_after_finished is None or record.status.phase not in ("Complete", "Failed")
            or (record.load is not None and record.load.policy != "Once")):
        return None
    return record if record.command_sequence >= entry.sequence else None


def applied_key(entry: Applied) -> ObjectKey | None:
    """The object an entry stands for; None for a kind this bridge does not serve (any more)."""
    resource = next((r for r in kube.RESOURCES if r.group == entry.group and r.kind == entry.kind), None)
    return ObjectKey(resource, entry.namespace, entry.name) if resource is not None else None


def gone_while_away(entries: dict[str, Applied], resource: kube.Resource, namespace: str | None,
                    listed_uids: set[str]) -> dict[str, ObjectKey]:
    """Of the entries (by uid), those of ``resource`` in ``namespace`` (None: any) that a full list of it does not
    show: their objects were deleted while the bridge was not watching (or deleted and made again: a new uid)."""
    gone = {}
    for uid, entry in entries.items():
        key = applied_key(entry)
        if (key is not None and key.resource == resource and (namespace is None or key.namespace == namespace)
                and uid not in listed_uids):
            gone[uid] = key
    return gone


def stand_in(key: ObjectKey, uid: str) -> dict[str, Any]:
    """An object known only by its entry (deleted while the bridge was down): what a delete command needs."""
    return {"metadata": {"uid": uid, "namespace": key.namespace, "name": key.name}}


# --- Finalizer ---


def is_deleting(obj: dict[str, Any]) -> bool:
    return bool(_metadata(obj).get("deletionTimestamp"))


def finalizers(obj: dict[str, Any]) -> list[str]:
    # The API server only hands out a list of strings; anything else (found by fuzzing) counts as none.
    listed = _metadata(obj).get("finalizers")
    return [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else []


def finalizer_patch(obj: dict[str, Any], held: bool) -> dict[str, Any] | None:
    """The merge patch that adds (``held``) or removes Shoal's finalizer, or None when nothing changes. None too
    for an add to an object being deleted: the API server refuses any new finalizer then (422), at every try.

    A merge patch replaces the whole list: other controllers' finalizers are written back as they were read, so
    one added or removed since would be lost or brought back. The patch therefore carries the object's
    ``resourceVersion``: the API server applies it to that version only, and answers 409 Conflict once the
    object has changed (the caller reads it again and builds a new patch)."""
    current = finalizers(obj)
    if held == (kube.FINALIZER in current) or (held and is_deleting(obj)):
        return None
    wanted = [*current, kube.FINALIZER] if held else [f for f in current if f != kube.FINALIZER]
    meta: dict[str, Any] = {"finalizers": wanted}
    version = _metadata(obj).get("resourceVersion")
    if isinstance(version, str) and version:
        meta["resourceVersion"] = version
    return {"metadata": meta}


# --- Status ---


@dataclass(frozen=True)
class Refusal:
    """Why the object's current spec is not in effect: the bridge's own (``REASON_INVALID``) or a service's."""

    reason: str
    message: str


def kube_observed_generation(obj: dict[str, Any], command_id: str | None, sequence: int,
                             record: OperationRecord | None) -> int:
    """``status.observedGeneration`` in Kubernetes' terms: the ``metadata.generation`` of the apply (``command_id``,
    published at commands-stream ``sequence``) once the operation's record took it in and its current (or last) run
    started from that spec; until then, what the object shows already.

    Shoal counts generations of its own (a spec Shoal reads as unchanged keeps it: a default spelled out, a field
    Shoal ignores), while tools (kstatus, ``kubectl wait``, Argo CD, Flux) compare the status's with the object's:
    Shoal's count would show an edited object in progress for ever.
    """
    shown = (obj.get("status") or {}).get("observedGeneration")
    kept = shown if isinstance(shown, int) and not isinstance(shown, bool) else 0
    parts = (command_id or "").split(".")
    if (record is None or not sequence or record.command_sequence < sequence or len(parts) != 5
            or parts[0] != "k8s" or not parts[3].isdigit()):
        return kept  # the apply is not in the record yet (or not the bridge's): the status is of an older spec
    if record.status.observed_generation != record.generation:
        return kept  # the record's spec has not run yet (a Once load's run of the previous spec is under way)
    return int(parts[3])


def desired_status(resource: kube.Resource, obj: dict[str, Any], status: msgspec.Struct | None,
                   refusal: Refusal | None, now: float, volume_conflict: str | None = None,
                   tried: dict[str, Any] | None = None, runtime_kind: str | None = None) -> dict[str, Any] | None:
    """The status the CR should show, or None when there is nothing to show yet (Shoal has not answered).

    A refusal adds the ``Accepted=False`` condition (its time kept while it holds, so an unchanged status is not
    written again) and makes a Dataset or an operation ``Failed``. A ``volume_conflict`` (why the Dataset has no
    PersistentVolume and claim) adds ``VolumeCreated=False``; the phase stays Shoal's, whose dataset works.
    ``tried``: the status last sent for this object, whose condition times hold where the object shows none (the
    write was refused or dropped): a time taken afresh at every pass would make every pass's status new.
    ``runtime_kind``: for a Fluid Dataset, the kind of the Fluid runtime object of its name (``AlluxioRuntime``),
    which its ``runtimes[].type`` says as Fluid does (``alluxio``): Fluid's tools pick the runtime kind to read
    from it. Shoal's own type (``shoal``) stays where there is none.
    """
    desired = without_nulls(shoal_status(resource, status))
    if not desired and refusal is not None and is_fluid(resource):
        # Refused before Shoal held it: Fluid's CRDs refuse a status without their required fields.
        desired = without_nulls(fluid_unheld_status(resource))
    if runtime_kind and is_fluid(resource) and resource.kind == "Dataset" and desired.get("runtimes"):
        kind_type = runtime_kind.removesuffix("Runtime").lower()
        desired["runtimes"] = [{**entry, "type": kind_type} for entry in desired["runtimes"]]
    if volume_conflict is not None:
        desired["conditions"] = _with_condition(desired, _false_condition(
            obj, CONDITION_VOLUME, REASON_VOLUME_TAKEN, volume_conflict, now, tried))
    if refusal is None:
        why = status.message if isinstance(status, DatasetStatus) else ""
        return _with_fluid_ready(resource, obj, desired, now, tried, why) or None
    desired["conditions"] = _with_condition(desired, _false_condition(
        obj, CONDITION_ACCEPTED, refusal.reason, refusal.message, now, tried))
    if family(resource) != "runtime":
        desired["phase"] = "Failed"
    if not is_fluid(resource):
        desired["message"] = refusal.message
    return _with_fluid_ready(resource, obj, desired, now, tried)


def _with_fluid_ready(resource: kube.Resource, obj: dict[str, Any], desired: dict[str, Any], now: float,
                      tried: dict[str, Any] | None, why: str = "") -> dict[str, Any]:
    """A Fluid Dataset's status with Fluid's ``Ready`` condition following its final phase; other kinds' as given."""
    if not (is_fluid(resource) and resource.kind == "Dataset" and desired.get("phase")):
        return desired
    bound = desired["phase"] == "Bound"
    message = "the dataset is Bound: its runtime serves it" if bound else f"the dataset is {desired['phase']}"
    if not bound and why:  # Fluid's Dataset status has no message: the condition is where kubectl users see why
        message = f"{message}: {why}"
    desired["conditions"] = _with_condition(desired, _kept_condition(
        obj, CONDITION_READY, "True" if bound else "False", REASON_DATASET_READY, message, now, tried))
    return desired


def _false_condition(obj: dict[str, Any], kind: str, reason: str, message: str, now: float,
                     tried: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``kind=False`` condition whose transition time is kept from the object's while it was False already, else
    from the status last sent (``tried``) if it said False."""
    return _kept_condition(obj, kind, "False", reason, message, now, tried)


def _kept_condition(obj: dict[str, Any], kind: str, value: Literal["True", "False"], reason: str, message: str,
                    now: float, tried: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``kind=value`` condition whose transition time is kept from the object's while it had that value already,
    else from the status last sent (``tried``) if it said so: a time taken afresh would make every pass's status
    new."""
    since = _since(obj.get("status"), kind, value) or _since(tried, kind, value)
    built: dict[str, Any] = to_builtins(Condition(type=kind, status=value, reason=reason, message=message,
                                                  last_transition_time=since or rfc3339(now)))
    return built


def _since(status: Any, kind: str, value: str) -> str | None:
    """The transition time of ``status``'s ``kind`` condition if its status is ``value``."""
    conditions = (status.get("conditions") if isinstance(status, dict) else None) or []
    old = next((c for c in conditions if isinstance(c, dict) and c.get("type") == kind), None)
    return old.get("lastTransitionTime") if old and old.get("status") == value else None


def _with_condition(desired: dict[str, Any], condition: dict[str, Any]) -> list[dict[str, Any]]:
    return [*[c for c in desired.get("conditions", []) if c.get("type") != condition["type"]], condition]


def without_nulls(value: Any) -> Any:
    """``value`` without null members: a merge patch reads null as "remove", so a status holding one would never
    match what the server stores and would be written again at every tick."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def merge_patch(current: Any, desired: Any) -> Any:
    """The RFC 7386 merge patch that turns ``current`` into ``desired`` (None when they are equal): mappings key by
    key with null for a key to remove, anything else replaced whole."""
    if current == desired:
        return None
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return desired
    patch: dict[str, Any] = {}
    for key in current.keys() - desired.keys():
        patch[key] = None
    for key, value in desired.items():
        if key not in current:
            patch[key] = value
        elif current[key] != value:
            patch[key] = merge_patch(current[key], value) if isinstance(value, dict) else value
    return patch


def status_patch(obj: dict[str, Any], desired: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The JSON patch (RFC 6902) that makes the CR show ``desired``, or None when it already does.

    A status belongs to one object, and the API server finds the object by name: one deleted and made again under
    the name (a new uid) before the bridge saw it would get the old one's status. The patch therefore tests
    ``metadata.uid`` first, and the server applies none of it to another object (it answers 422). A merge patch
    cannot say so: the status subresource copies the stored object's metadata over the patch's, so a
    ``metadata.uid`` in it is ignored. The status is then written whole (``add`` replaces it), which is what a merge
    patch of the changes made of it too (the keys ``desired`` lacks removed), without depending on the bridge's copy
    being the server's."""
    if desired is None or merge_patch(obj.get("status") or {}, desired) is None:
        return None
    uid = uid_of(obj)
    test = [{"op": "test", "path": "/metadata/uid", "value": uid}] if uid else []
    return [*test, {"op": "add", "path": "/status", "value": desired}]


# --- PersistentVolume and claim of a Bound Dataset ---


def dataset_label(namespace: str, name: str) -> str:
    """``<namespace>.<name>``, or a digest of it when longer than a label value may be (63)."""
    value = f"{namespace}.{name}"
    return value if len(value) <= 63 else hashlib.sha256(value.encode()).hexdigest()[:63]


def mount_path(mount_root: str, namespace: str, name: str) -> str:
    """Where every agent mounts the dataset on its node (SHOAL_MOUNT_ROOT/<namespace>/<name>)."""
    return f"{mount_root.rstrip('/')}/{namespace}/{name}"


def _labels(namespace: str, name: str) -> dict[str, str]:
    return {kube.MANAGED_BY_LABEL: kube.MANAGED_BY, kube.DATASET_LABEL: dataset_label(namespace, name)}


def access_modes(obj: dict[str, Any]) -> list[str]:
    modes = (obj.get("spec") or {}).get("accessModes")
    return [str(m) for m in modes] if isinstance(modes, list) and modes else ["ReadOnlyMany"]


def volume_path(obj: dict[str, Any], mount_root: str) -> str:
    """The node path a dataset's volume shows: its own mount, or for a reference (``dataset://``) its source's mount
    (or the folder in it), as Fluid copies the source's volume, so the pod reads through the source's mount."""
    meta = obj["metadata"]
    mounts = (obj.get("spec") or {}).get("mounts")
    for mount in mounts if isinstance(mounts, list) else []:
        point = mount.get("mountPoint") if isinstance(mount, dict) else None
        if isinstance(point, str) and point.startswith(references.PREFIX):
            source = references.parse(point)[0]
            if source is not None:
                path = mount_path(mount_root, source.namespace, source.name)
                return f"{path}/{source.folder}" if source.folder else path
    return mount_path(mount_root, meta.get("namespace") or "default", meta["name"])


def persistent_volume(obj: dict[str, Any], mount_root: str) -> dict[str, Any]:
    """The dataset's PersistentVolume: a hostPath to the agent's mount on the node (``volume_path``). The pod's
    volumeMount takes ``mountPropagation: HostToContainer`` so a mount made (or made again) after the pod started
    reaches it."""
    meta = obj["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": kube.volume_name(namespace, name), "labels": _labels(namespace, name)},
        "spec": {
            "capacity": {"storage": VOLUME_CAPACITY},
            "accessModes": access_modes(obj),
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": volume_path(obj, mount_root), "type": "Directory"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace,
                         "name": kube.claim_name(name)},
        },
    }


def persistent_volume_claim(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": kube.claim_name(name), "namespace": namespace, "labels": _labels(namespace, name)},
        "spec": {
            "accessModes": access_modes(obj),
            "resources": {"requests": {"storage": VOLUME_CAPACITY}},
            "storageClassName": STORAGE_CLASS,
            "volumeName": kube.volume_name(namespace, name),
        },
    }


def is_own_volume(found: dict[str, Any], namespace: str, name: str) -> bool:
    """Whether a PersistentVolume or claim found under dataset ``namespace/name``'s name is that dataset's: Shoal's
    labels name the dataset, and a volume's ``claimRef`` names the dataset's claim. The name alone says nothing:
    Fluid's ``<namespace>-<name>`` is the same for Datasets a-b/c and a/b-c, and a user may have taken it."""
    labels = _metadata(found).get("labels")
    labels = labels if isinstance(labels, dict) else {}
    if labels.get(kube.MANAGED_BY_LABEL) != kube.MANAGED_BY or labels.get(kube.DATASET_LABEL) != dataset_label(
            namespace, name):
        return False
    spec = found.get("spec")
    ref = spec.get("claimRef") if isinstance(spec, dict) else None
    return ref is None or (isinstance(ref, dict)
                           and (ref.get("namespace"), ref.get("name")) == (namespace, kube.claim_name(name)))


def volume_conflict(kind: str, found: dict[str, Any], namespace: str, name: str) -> str:
    """What the user reads when ``kind`` (PersistentVolume or PersistentVolumeClaim) ``found`` under the dataset's
    name is not its own: whose it is, and what to do."""
    meta = _metadata(found)
    where = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))
    spec = found.get("spec")
    ref = spec.get("claimRef") if isinstance(spec, dict) else None
    labels = meta.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    if isinstance(ref, dict) and ref.get("name"):
        holder = f"it is reserved for claim {ref.get('namespace')}/{ref.get('name')}"
    elif labels.get(kube.MANAGED_BY_LABEL) == kube.MANAGED_BY:
        holder = f"it belongs to dataset {labels.get(kube.DATASET_LABEL)}"
    else:
        holder = "Shoal did not create it"
    return (f"{kind} {where} already exists and is not this Dataset's ({holder}), so the Dataset gets no "
            f"PersistentVolume and claim: rename the Dataset (a volume is named <namespace>-<name>, as in Fluid) or "
            f"remove that {kind}")


# --- Kubernetes Events ---


def event_name(obj: dict[str, Any], *parts: object) -> str:
    """A deterministic Event name: the same occurrence gives the same name, so recording it twice is a 409. A DNS-1123
    subdomain, as the API server requires: an object's name cut where a '.' or '-' ends it would end a label so."""
    name = str(_metadata(obj).get("name", ""))
    uid = str(_metadata(obj).get("uid", ""))
    digest = hashlib.sha256("\0".join([uid, *map(str, parts)]).encode()).hexdigest()[:16]
    return f"{name[:MAX_NAME - 17].rstrip('.-')}.{digest}".lstrip(".")


def kube_event(resource: kube.Resource, obj: dict[str, Any], *, name: str, event_type: str, reason: str,
               message: str, now: float) -> dict[str, Any]:
    """A core v1 Event about the object (``kubectl describe`` shows it)."""
    meta = _metadata(obj)
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": resource.api_version, "kind": resource.kind, "name": meta.get("name"),
                           "namespace": meta.get("namespace") or "default", "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": reason, "message": message[:1024], "type": event_type,
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": COMPONENT,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def finished_load(resource: kube.Resource, status: msgspec.Struct | None) -> tuple[str, str, str] | None:
    """(Event type, reason, message) when an operation's current run is finished, else None."""
    if family(resource) not in ("dataload", "dataclean") or not isinstance(status, OperationStatus):
        return None
    if status.phase == "Complete":
        done = status.progress
        return "Normal", f"{resource.kind}Complete", (f"{resource.kind} complete in {status.duration or '?'}: "
                                                      f"{done.files_done} files, {done.bytes_done} bytes")
    if status.phase == "Failed":
        return "Warning", f"{resource.kind}Failed", status.message or f"{resource.kind} failed"
    return None
