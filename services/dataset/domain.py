"""Dataset decisions, pure: validation, applying a spec, the phase, and the status after a sync.

No I/O and no clock here: ``now`` is a parameter. Handlers load state, call these, save and publish.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit

import msgspec

from libs import deletion, subjects
from libs.affinity import affinity_errors
from libs.events.agent import AgentRecord, Inventory
from libs.events.common import (
    DECODE_ERRORS,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    dns_label_errors,
    format_bytes,
    parse_rfc3339,
    rfc3339,
)
from libs.events.dataset import (
    CONDITION_SYNCED,
    MAX_OWNER_ID,
    REASON_WRITES_NOT_SERVED,
    CacheStates,
    Condition,
    Dataset,
    DatasetPhase,
    DatasetRecord,
    DatasetStatus,
    EncryptOption,
    Mount,
    NodeCache,
    RuntimeRef,
    find_condition,
    write_access_modes,
)
from libs.events.runtime import CONDITION_DATASET, RuntimeSpec, RuntimeStatus, held_capacity, ring_nodes
from libs.events.schedule import DatasetCacheObserved
from libs.hostpaths import local_root_error
from libs.inventory import DatasetInventory, UniqueCached
from libs.mounts import canonical_options, exposed_secret_errors, mount_path, url_dropped_error
from libs.paths import relative_problem
from libs.redact import hide_secret_query, is_secret_name, strip_userinfo
from libs.references import PREFIX as REFERENCE_PREFIX
from libs.references import is_reference, is_reference_mount, reference_of
from libs.references import parse as parse_reference

SUPPORTED_SCHEMES = ("s3", "local", "http", "https", "pvc")
# Reasons of a False MetadataSynced: the store could not be reached (the sync is tried again after a delay, see
# sync_due_in), or any other failure (it waits for a new spec or a resync).
REASON_UNREACHABLE = "StoreUnreachable"
REASON_FAILED = "SyncFailed"
# Present while the last sync left objects out of the tree (libs.paths has the rules), with a count and examples.
CONDITION_SKIPPED = "ObjectsSkipped"
# Copied from the runtime of the same name: whether the dataset's mounts are serving on the nodes.
CONDITION_MOUNTED = "Mounted"
# Copied from the runtime too, present while reads through a node's mount fail (ESTALE or EIO).
CONDITION_READS = "ReadsFailing"
# Present while spec.accessModes promise writes (ReadWriteMany...): the mounts are read-only all the same, and a
# Fluid user who expects writes learns it here as well as from the apply's warning, not from an EROFS in a job.
CONDITION_READ_ONLY = "ReadOnly"

# Options each scheme understands; Fluid/Alluxio spellings are aliases (libs.mounts).
S3_OPTIONS = {"endpoint", "region", "pathStyle", "aws.accessKeyId"}
S3_ENCRYPT_OPTIONS = {"aws.accessKeyId", "aws.secretKey"}
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
# http(s):// mounts (Fluid's WebUFS): listing limits, positive whole numbers (libs.ufs.mounts.HTTP_LIMIT_OPTIONS).
HTTP_OPTIONS = {"maxDepth", "maxPages", "maxFiles"}
MOUNT_NAME = re.compile(r"^[A-Za-z0-9]([-._A-Za-z0-9]*[A-Za-z0-9])?$")


def validate_ref(name: str, namespace: str) -> list[str]:
    """Why a command's name and namespace cannot name a dataset or runtime (delete, resync), or nothing."""
    return dns_label_errors(name, "name") + dns_label_errors(namespace, "namespace", DNS1123_LABEL)


def validate_dataset(dataset: Dataset, local_roots: Sequence[str] | None = None,
                     pvc_root: str | None = None) -> list[str]:
    """Every reason the dataset cannot be accepted, as sentences a person can act on; empty if valid.

    ``local_roots``: the folders below which ``local://`` mounts are allowed (SHOAL_LOCAL_ROOTS); ``pvc_root``:
    where volume claims are mounted (SHOAL_PVC_ROOT, empty: pvc:// refused). The service always passes them, None
    leaves that check out (for tests of the other rules).
    """
    errors = dns_label_errors(dataset.metadata.name, "metadata.name")
    errors += dns_label_errors(dataset.metadata.namespace, "metadata.namespace", DNS1123_LABEL)
    spec = dataset.spec
    if not spec.mounts:
        # Fluid's Vineyard samples give a Dataset no spec at all: the data is what pipeline steps write into
        # Vineyard, where Shoal only caches a store's data, read-only. Said so, rather than a bare "list a mount".
        errors.append("spec.mounts must list at least one mount, the store whose data Shoal caches ("
                      + ", ".join(f"{scheme}://" for scheme in SUPPORTED_SCHEMES) + f" or {REFERENCE_PREFIX}); a "
                      "dataset without a store, such as Fluid's Vineyard datasets (data written by one step for "
                      "the next), is not supported: Shoal's mounts are read-only")
    errors += exposed_secret_errors(dataset)
    if is_reference(dataset):
        return errors + reference_errors(dataset)
    seen_paths: dict[str, int] = {}
    # A name tells a mount from the others (and is its folder when it has no path): one name for two mounts is
    # most likely a copy left unedited, so it is refused even when paths keep the two folders apart.
    seen_names: dict[str, int] = {}
    for index, mount in enumerate(spec.mounts):
        where = f"spec.mounts[{index}]"
        unparsable = (_url_error(mount.mount_point) or url_dropped_error(mount.mount_point)
                      or _nul_error(mount.mount_point))
        if unparsable:
            errors.append(f"{where}.mountPoint {strip_userinfo(mount.mount_point, strict=True)!r} {unparsable}")
            continue
        errors += _mount_errors(mount, where, spec.shared_options, spec.shared_encrypt_options)
        if local_roots is not None and urlsplit(mount.mount_point).scheme == "local":
            refused = local_root_error(urlsplit(mount.mount_point).path, local_roots)
            if refused:
                errors.append(f"{where}.mountPoint: {refused}")
        if pvc_root is not None and not pvc_root and urlsplit(mount.mount_point).scheme == "pvc":
            errors.append(f"{where}.mountPoint: pvc:// mounts are disabled on this installation: the operator sets "
                          "SHOAL_PVC_ROOT to the folder where volume claims are mounted (<root>/<namespace>/<claim>)")
        if mount.name and not MOUNT_NAME.fullmatch(mount.name):
            errors.append(f"{where}.name {mount.name!r} may use only letters, digits, '.', '_' and '-'")
        named_twice = bool(mount.name) and mount.name in seen_names
        if named_twice:
            errors.append(f"{where}.name {mount.name!r} is also the name of spec.mounts[{seen_names[mount.name]}]: "
                          "give each mount a name of its own")
        elif mount.name:
            seen_names[mount.name] = index
        path = mount_path(mount, len(spec.mounts))
        if not path:
            errors.append(f"{where} needs a name or a path when a dataset has several mounts")
        elif ".." in mount.path.split("/"):
            errors.append(f"{where}.path {mount.path!r} must not contain '..'")
        elif path != "/" and (problem := relative_problem(path[1:])) is not None:
            errors.append(f"{where} would appear at {path!r}, which {problem}")
        elif path in seen_paths:
            if not (named_twice and spec.mounts[seen_paths[path]].name == mount.name):  # said once, by name
                errors.append(f"{where} and spec.mounts[{seen_paths[path]}] both appear at {path!r}")
        else:
            # One mount inside another's folder would hide it, or be hidden by it: refused, never guessed.
            outer = next((other for other in seen_paths
                          if path.startswith(other + "/") or other.startswith(path + "/")), None)
            if outer is not None:
                errors.append(f"{where} at {path!r} and spec.mounts[{seen_paths[outer]}] at {outer!r} are nested: "
                              "give each mount a folder of its own")
            seen_paths[path] = index
    if len(seen_paths) > 1 and "/" in seen_paths:
        errors.append("a mount at '/' cannot be combined with other mounts; give each a name or a path")
    errors += affinity_errors(spec.node_affinity)
    if spec.owner is not None:
        for field in ("uid", "gid"):
            value = getattr(spec.owner, field)
            if value is not None and not 0 <= value <= MAX_OWNER_ID:
                errors.append(f"spec.owner.{field} must be between 0 and {MAX_OWNER_ID}, got {value}")
    return errors


def _url_error(url: str) -> str:
    """Why ``url`` cannot be taken apart (urlsplit raises on an unbalanced '[', an IPv6 host never closed), or ""."""
    try:
        urlsplit(url)
    except ValueError as err:
        return f"is not a valid URL: {err}"
    return ""


def _nul_error(mount_point: str) -> str:
    """Why a mount point holding a NUL byte is refused, or "": the listing could not open such a path (a bare
    "embedded null byte" at every sync, never in the status), nor a store list such a key."""
    return "holds a NUL byte, which no file name, object key or URL may hold" if "\0" in mount_point else ""


def _endpoint_error(url: str) -> str:
    """Why ``url`` is no store endpoint (http or https, a host, a port that exists), or "". Caught here rather
    than at the first sync, where it would only say "Invalid endpoint"."""
    if problem := _url_error(url):
        return problem
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    return "" if parts.hostname else "names no host"


def _mount_errors(mount: Mount, where: str, shared: dict[str, str], shared_encrypt: list[EncryptOption]) -> list[str]:
    errors: list[str] = []
    # Shown back in rejections and logs: never with the credentials a URL may carry (reported on their own,
    # by exposed_secret_errors), and judged without them.
    # Nor with the credential a pre-signed or token URL holds in its query (reported by exposed_secret_errors).
    shown_point = hide_secret_query(strip_userinfo(mount.mount_point, strict=True))
    point = strip_userinfo(mount.mount_point)
    parts = urlsplit(point)
    scheme = parts.scheme
    if scheme not in SUPPORTED_SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        return [
            f"{where}.mountPoint {shown_point!r} has {shown}; supported: "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
            + f", and {REFERENCE_PREFIX}<namespace>/<name> alone (a reference)"
        ]
    options = canonical_options(mount, shared)
    encrypt = [*shared_encrypt, *mount.encrypt_options]
    # s3:// and local:// mount points are read as URLs: a '?' or '#' would start a query or fragment, which
    # neither uses, and the rest would be dropped: another prefix or folder listed, without a word. Their paths
    # are not percent-decoded, so a name holding one cannot be mounted at all: refused rather than guessed.
    dropped = "?" in point or "#" in point
    if scheme == "s3":
        if not S3_BUCKET.fullmatch(parts.netloc.rpartition("@")[2]):
            errors.append(f"{where}.mountPoint {shown_point!r} does not name a valid S3 bucket")
        if dropped:
            errors.append(f"{where}.mountPoint {shown_point!r} must be a bucket and prefix without '?' or '#': what "
                          "follows either would be dropped and another prefix listed")
        if ".." in parts.path.split("/"):
            errors.append(f"{where}.mountPoint {shown_point!r} must not contain '..'")
        for key in options:
            if is_secret_name(key):
                continue  # reported by exposed_secret_errors, under the field where it was given
            if key not in S3_OPTIONS:
                supported = ", ".join(sorted(S3_OPTIONS))
                errors.append(f"{where}.options.{key} is not supported for s3 (supported: {supported})")
        if options.get("pathStyle", "true").lower() not in ("true", "false"):
            errors.append(f"{where}.options.pathStyle must be true or false")
        endpoint = options.get("endpoint", "")
        shown_endpoint = strip_userinfo(endpoint, strict=True)
        if endpoint and (problem := _endpoint_error(strip_userinfo(endpoint))):
            errors.append(f"{where}.options.endpoint {shown_endpoint!r} {problem}")
        for option in encrypt:
            if option.name not in S3_ENCRYPT_OPTIONS:
                errors.append(
                    f"{where}.encryptOptions {option.name!r} is not supported for s3 "
                    f"(supported: {', '.join(sorted(S3_ENCRYPT_OPTIONS))})"
                )
    elif scheme in ("http", "https"):
        # Only the mount's own: shared encryptOptions are for the dataset's other (s3) mounts.
        errors += _web_errors(parts, shown_point, where, options, mount.encrypt_options)
    elif scheme == "pvc":
        claim = parts.netloc
        if not DNS1123_SUBDOMAIN.fullmatch(claim) or len(claim) > 253:
            errors.append(f"{where}.mountPoint {shown_point!r} must name a volume claim (a DNS-1123 name) like "
                          "pvc://my-claim/sub/folder")
        if ".." in parts.path.split("/") or parts.query or parts.fragment:
            errors.append(f"{where}.mountPoint {shown_point!r} must be a plain path without '..', '?' or '#'")
        if options:
            errors.append(f"{where}.options are not supported for pvc mounts: {', '.join(sorted(options))}")
        if mount.encrypt_options:
            errors.append(f"{where}.encryptOptions are not supported for pvc mounts")
    else:
        if parts.netloc or not parts.path.startswith("/"):
            errors.append(f"{where}.mountPoint {shown_point!r} must be an absolute path like local:///data")
        if dropped:
            errors.append(f"{where}.mountPoint {shown_point!r} must be a plain path without '?' or '#': what "
                          "follows either would be dropped and another folder mounted")
        if ".." in parts.path.split("/"):
            errors.append(f"{where}.mountPoint {shown_point!r} must not contain '..'")
        if options:
            errors.append(f"{where}.options are not supported for local mounts: {', '.join(sorted(options))}")
        if encrypt:
            errors.append(f"{where}.encryptOptions are not supported for local mounts")
    for option in encrypt:
        ref = option.value_from.secret_key_ref
        if not DNS1123_SUBDOMAIN.fullmatch(ref.name) or len(ref.name) > 253:
            errors.append(
                f"{where}.encryptOptions {option.name!r}: secret name {ref.name!r} is not a DNS-1123 subdomain"
            )
        if not SECRET_KEY.fullmatch(ref.key) or ref.key in (".", ".."):
            errors.append(f"{where}.encryptOptions {option.name!r}: secret key {ref.key!r} is not a valid key")
    return errors


def _web_errors(parts: SplitResult, shown_point: str, where: str, options: dict[str, str],
                encrypt: list[EncryptOption]) -> list[str]:
    """Why an http(s):// mount (a web server folder with autoindex pages) cannot be listed as given."""
    errors = []
    if not parts.hostname:
        errors.append(f"{where}.mountPoint {shown_point!r} must name a web server, like "
                      "https://mirrors.example.org/data/")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        errors.append(f"{where}.mountPoint {shown_point!r} has an invalid port")
    if ".." in parts.path.split("/"):
        errors.append(f"{where}.mountPoint {shown_point!r} must not contain '..'")
    if parts.query or parts.fragment:
        errors.append(f"{where}.mountPoint {shown_point!r} must be a folder URL without '?' or '#'")
    for key, value in options.items():
        if is_secret_name(key):
            continue  # reported by exposed_secret_errors
        if key not in HTTP_OPTIONS:
            errors.append(f"{where}.options.{key} is not supported for web mounts "
                          f"(supported: {', '.join(sorted(HTTP_OPTIONS))})")
        elif not (value.isdigit() and 0 < int(value) <= 10**9):
            errors.append(f"{where}.options.{key} must be a positive whole number, got {value!r}")
    if encrypt:
        errors.append(f"{where}.encryptOptions are not supported for web mounts (Shoal reads public folders)")
    return errors


# --- Applying and status ---


def apply_dataset(record: DatasetRecord | None, dataset: Dataset, sequence: int = 0,
                  incarnation: str = "") -> tuple[DatasetRecord, bool]:
    """The record after applying ``dataset`` (an apply at stream ``sequence``, 0: unknown), and whether its spec
    changed (so it must be synced again). An apply older than the one the record holds is stale (delivered again
    after a crash, behind newer commands): not applied. One that changes nothing still moves the record's sequence
    on (the record is then new but its spec unchanged), so that the applies before it are stale; so does one that
    changes only labels or annotations, which are kept without a new generation (as an operation's are). A new
    record is this ``incarnation`` of the name (a fresh id from the handler) for as long as it lives; an existing one
    keeps its own.

    A dataset that becomes a reference, or stops being one, starts from an empty status: what it showed (its own
    listing, or its source's) is not its own any more, and must not be mounted meanwhile."""
    if record is None:
        return DatasetRecord(dataset=dataset, generation=1, command_sequence=sequence, incarnation=incarnation), True
    if sequence and sequence < record.command_sequence:
        return record, False
    if record.dataset == dataset:
        # Nothing to apply, but the user's latest word is this one: an older apply delivered again behind it (a
        # crash before its ack) must find itself stale, not undo it.
        if sequence > record.command_sequence:
            return msgspec.structs.replace(record, command_sequence=sequence), False
        return record, False
    if record.dataset.spec == dataset.spec:
        # Only labels or annotations changed (``kubectl label``, a GitOps tool's tracking annotation): kept, but no
        # new spec, so no new generation and nothing to list again (a whole store's listing per label, before).
        return msgspec.structs.replace(record, dataset=dataset,
                                       command_sequence=max(sequence, record.command_sequence)), False
    updated = msgspec.structs.replace(record, dataset=dataset, generation=record.generation + 1,
                                      command_sequence=sequence)
    if is_reference(record.dataset) != is_reference(dataset):
        updated = msgspec.structs.replace(updated, status=DatasetStatus())
        # Kept in the record until removed (``manifests_removed``): removed only after this write, which must come
        # first (a mount reading the old manifest meanwhile reads the record again), a removal that fails would
        # leave nothing naming them.
        left = manifests_left_by_apply(record, updated)
        if left:
            updated = msgspec.structs.replace(updated, manifests_left=list(dict.fromkeys(
                [*record.manifests_left, *left])))
    return updated, True


class DeletionNote(deletion.DeletionNote, rename="camel"):
    """``libs.deletion``'s note (the delete command's stream sequence: an apply older than it must not bring the
    dataset back). A delete of a name that has no record leaves one too: the apply it overtook (handled later, by a
    redelivery or another replica) is refused."""

    # What is left to remove once the record is gone (its manifests): a delete that stopped there (the node-cache
    # purge or a manifest delete failed) finishes from this when it is delivered again, the record being gone.
    manifests: list[str] = []


def manifest_name(record: DatasetRecord) -> str:
    """Where a sync of ``record`` stores its manifest: named with its incarnation, generation and resync count
    (``libs.subjects``)."""
    meta = record.dataset.metadata
    return subjects.manifest_name(meta.namespace, meta.name, record.incarnation, record.generation,
                                  record.sync_requests)


def own_manifests(record: DatasetRecord) -> list[str]:
    """The manifests a delete of ``record`` removes: the one its next sync would write and the one its status names,
    except a reference's status, which mirrors its source's and so names the source's manifest, never one of its own
    (removing it left the source Bound with no manifest: its loads failed, a restarted mount had no tree)."""
    if is_reference(record.dataset):
        return [manifest_name(record), *record.manifests_left]
    return [manifest_name(record), record.status.manifest, *record.manifests_left]


def manifests_removed(record: DatasetRecord, removed: Sequence[str]) -> DatasetRecord:
    """``record`` once the manifests ``removed`` are gone: its ``manifests_left`` without them (the record itself
    when it named none of them)."""
    kept = [name for name in record.manifests_left if name not in removed]
    if len(kept) == len(record.manifests_left):
        return record
    return msgspec.structs.replace(record, manifests_left=kept)


def manifests_left_by_apply(record: DatasetRecord | None, updated: DatasetRecord) -> list[str]:
    """The manifests no one names once ``updated`` replaces ``record``: a listed dataset re-applied as a reference
    starts from an empty status (``apply_dataset``), and no later sync of its would replace, nor a delete remove,
    the manifests of its own listing. The one its status names now is its source's, never removed. A changed
    spec of a listed dataset leaves none: its sync removes the manifest it replaces."""
    if record is None or is_reference(record.dataset) or not is_reference(updated.dataset):
        return []
    return [name for name in own_manifests(record) if name and name != updated.status.manifest]


def inventory_fits(entry: DatasetInventory | None, event: Inventory) -> bool:
    """Whether ``event`` folds into the node-cache ``entry`` with no look at the dataset's record: the entry is of
    the incarnation of the dataset the event's mount serves, or the event does not say which (an agent before
    ``dataset_incarnation``). Otherwise ``inventory_entry`` decides, from the record."""
    return entry is not None and (not event.dataset_incarnation or entry.incarnation == event.dataset_incarnation)


def inventory_entry(entry: DatasetInventory | None, record: DatasetRecord | None,
                    event: Inventory) -> DatasetInventory | None:
    """The node-cache entry ``event`` folds into, given the dataset's ``record``; None: the event counts for no
    dataset. A dataset that has no record (deleted) takes none: its mount's last events (its cache freed) would
    bring its entry back. Nor does a dataset applied again under the same name (another incarnation) take the last
    events of the deleted one's mounts: the new dataset showed the old mount's node, cached bytes and reads as its
    own. An entry of another incarnation (left by a delete that has not purged it yet) is started anew."""
    if record is None or (event.dataset_incarnation and record.incarnation
                          and event.dataset_incarnation != record.incarnation):
        return None
    base = entry if entry is not None and entry.incarnation in ("", record.incarnation) else DatasetInventory()
    return base if base.incarnation == record.incarnation else msgspec.structs.replace(
        base, incarnation=record.incarnation)


def sync_is_stale(current: DatasetRecord, result: SyncResult) -> bool:
    """True when the record is no longer the one the sync listed for: a newer spec (its own sync follows),
    another dataset of the same name (the listed one was deleted and the name applied again), or a status that
    already holds a later resync of this spec (two replicas both listing while the keys change hands: the one
    that started first must not finish last and put the older listing back)."""
    status = current.status
    return (current.incarnation != result.incarnation or current.generation != result.generation
            or (status.synced_generation == result.generation and result.requests < status.synced_requests))


def deletion_note(sequence: int, manifests: Sequence[str] = ()) -> bytes:
    return msgspec.json.encode(DeletionNote(command_sequence=sequence, manifests=[m for m in manifests if m]))


def read_deletion_note(note: bytes) -> DeletionNote | None:
    """The note a delete left in a delete marker; None without one (never deleted, or deleted before notes)."""
    if not note:
        return None
    try:
        return msgspec.json.decode(note, type=DeletionNote)
    except DECODE_ERRORS:
        return None


def delete_is_stale(record: DatasetRecord, sequence: int) -> bool:
    """True when the record was applied by a command later than the delete at stream ``sequence`` (0: unknown):
    that delete came first (a redelivery, or another replica's apply won), and deleting now would undo the apply."""
    return 0 < sequence < record.command_sequence


@dataclass(frozen=True)
class SyncPolicy:
    """When a synced dataset is listed again by itself: its runtime's ``management.metadataSyncPolicy``."""

    auto: bool = True
    # Seconds between listings while ``auto``; 0 never lists by itself.
    period_seconds: float = 0.0


def sync_policy(runtime: RuntimeSpec | None, default_seconds: float) -> SyncPolicy:
    """The runtime's metadataSyncPolicy (Fluid's: autoSync unset means on), its period or ``default_seconds``
    (SHOAL_AUTOSYNC_SECONDS); a dataset without a runtime (yet) follows the defaults."""
    if runtime is None:
        return SyncPolicy(auto=True, period_seconds=default_seconds)
    policy = runtime.management.metadata_sync_policy
    return SyncPolicy(auto=policy.auto_sync is not False,
                      period_seconds=float(policy.period_seconds) if policy.period_seconds > 0 else default_seconds)


# Why a sync is due: a new spec, a resync, the retry of an unreachable store, or the autoSync period.
SyncKind = Literal["spec", "resync", "retry", "auto"]


@dataclass(frozen=True)
class SyncDue:
    kind: SyncKind
    in_seconds: float


def next_sync(record: DatasetRecord, now: float, retry_seconds: float, policy: SyncPolicy = SyncPolicy(),
              listed_at: float | None = None) -> SyncDue | None:
    """Why and in how many seconds the dataset should be listed next; None when nothing is due until its next
    change (a failure retrying cannot fix, or synced with autoSync off or without a period).

    At once for a new spec or a resync. After a store was unreachable, ``retry_seconds`` after ``lastSyncTime``
    (whole seconds, so a retry may come up to a second early). A synced dataset whose ``policy`` is on is listed
    ``period_seconds`` after its last listing: ``listed_at`` (the service remembers it, as an unchanged listing
    writes nothing) or else ``lastSyncTime`` (after a restart). Counting from stored times means any other
    write of the record (cache states, the runtime's phase) finds the same remaining wait, not a due sync.
    """
    status = record.status
    if status.synced_generation < record.generation:
        return SyncDue("spec", 0.0)
    if status.synced_requests < record.sync_requests:
        return SyncDue("resync", 0.0)
    synced = find_condition(status.conditions, CONDITION_SYNCED)
    if synced is None:
        return None
    last = parse_rfc3339(status.last_sync_time)
    if synced.status == "False" and synced.reason == REASON_UNREACHABLE:
        if last is None:
            return SyncDue("retry", 0.0)  # no time to count from: retry rather than stay failed
        return SyncDue("retry", _wait(last, retry_seconds, now))
    # Another failure: retrying cannot fix it, but with a tree in hand autoSync still looks again at its period
    # (credentials rotated meanwhile, a bucket policy fixed).
    if (synced.status == "False" and not status.manifest) or not policy.auto or policy.period_seconds <= 0:
        return None
    since = max((t for t in (last, listed_at) if t is not None), default=None)
    if since is None:
        return SyncDue("auto", 0.0)
    return SyncDue("auto", _wait(since, policy.period_seconds, now))


def _wait(since: float, delay: float, now: float) -> float:
    """What is left of ``delay`` counted from ``since``: never more than ``delay`` itself. ``since`` may be ahead of
    ``now`` (a time written by another replica whose clock is ahead, or this host's clock stepped back), and the
    skew must not be waited out on top."""
    return min(delay, max(0.0, since + delay - now))


def sync_due_in(record: DatasetRecord, now: float, retry_seconds: float, policy: SyncPolicy = SyncPolicy(),
                listed_at: float | None = None) -> float | None:
    """Seconds until the dataset should be synced (``next_sync``): 0.0 at once, more while a retry or the
    autoSync period waits, None when nothing is due until its next change."""
    due = next_sync(record, now, retry_seconds, policy, listed_at)
    return None if due is None else due.in_seconds


def needs_sync(record: DatasetRecord, now: float, retry_seconds: float) -> bool:
    return sync_due_in(record, now, retry_seconds) == 0.0


def spec_listed(record: DatasetRecord) -> bool:
    """Whether a listing of the record's spec (this generation) succeeded already. That listing asked each mount
    with nothing below it whether it names one object (``ObjectStore.names_object``); asking again on every later
    listing of the same spec (autoSync, resyncs) cost a HEAD each time for an empty prefix, to refuse a mount that
    was found to be a folder. A spec changed, or a last listing that failed, is asked again."""
    status = record.status
    synced = find_condition(status.conditions, CONDITION_SYNCED)
    return (status.synced_generation == record.generation and synced is not None and synced.status == "True"
            and bool(status.manifest))


def sync_changes_nothing(record: DatasetRecord, result: SyncResult) -> bool:
    """True when a listing found exactly what the status already says (same manifest bytes, files, bytes, objects
    left out), so an autoSync pass writes nothing: no new manifest, no status write, nothing for the mounts."""
    status = record.status
    if result.error or result.manifest_changed:
        return False
    synced = find_condition(status.conditions, CONDITION_SYNCED)
    skipped = find_condition(status.conditions, CONDITION_SKIPPED)
    expected = skipped_condition(result, 0.0)
    same_skipped = (skipped.message if skipped else None) == (expected.message if expected else None)
    return (synced is not None and synced.status == "True" and same_skipped
            and status.synced_generation == result.generation and status.synced_requests == result.requests
            and status.manifest == result.manifest and status.file_num == result.file_num
            and status.ufs_total_bytes == result.total_bytes and status.skipped_objects == result.skipped)


@dataclass(frozen=True)
class SyncResult:
    """What a metadata sync found, or why it failed."""

    generation: int
    # The record's resync counter when the sync started.
    requests: int = 0
    # The record's incarnation when the sync started: a dataset deleted and applied again meanwhile is not this one.
    incarnation: str = ""
    file_num: int = 0
    total_bytes: int = 0
    manifest: str = ""
    error: str = ""
    # Objects the stores listed, and those left out of the tree (with a few examples: key and reason).
    listed: int = 0
    skipped: int = 0
    skipped_examples: tuple[str, ...] = ()
    # The error may go away by itself (an unreachable store): the sync is tried again after a delay.
    retryable: bool = False
    # False when the manifest written has the same bytes as the one stored before (nothing was uploaded).
    manifest_changed: bool = True


def _set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    kept = [c for c in conditions if c.type != new.type]
    old = find_condition(conditions, new.type)
    if old is not None and old.status == new.status:
        new = msgspec.structs.replace(new, last_transition_time=old.last_transition_time)
    return [*kept, new]


def status_after_sync(record: DatasetRecord, result: SyncResult, runtime_phase: str, now: float,
                      runtime_message: str | None = None, *, binding: RuntimeBinding | None = None) -> DatasetStatus:
    """The status once a sync of ``result.generation`` finished (successfully or not).

    A failed sync of a spec already listed (an autoSync or a resync while the store is down) keeps the manifest it
    has: the mounts go on serving that tree (cached blocks read, uncached ones fail until the store is back),
    the condition and message say what failed. A failed sync of a new spec (or the first) leaves no manifest: the
    one in hand lists another spec's sources. ``binding``: see ``with_binding``."""
    status = record.status
    if result.error:
        reason = REASON_UNREACHABLE if result.retryable else REASON_FAILED
        condition = Condition(type=CONDITION_SYNCED, status="False", reason=reason, message=result.error,
                              last_transition_time=rfc3339(now))
        kept = status.manifest if status.synced_generation == result.generation else ""
        status = msgspec.structs.replace(
            status,
            synced_generation=result.generation,
            synced_requests=result.requests,
            message=result.error,
            manifest=kept,
            conditions=_set_condition(status.conditions, condition),
            last_sync_time=rfc3339(now),
        )
    else:
        condition = Condition(type=CONDITION_SYNCED, status="True", reason="Synced",
                              message=synced_message(record.dataset, result), last_transition_time=rfc3339(now))
        conditions = _set_condition(status.conditions, condition)
        skipped = skipped_condition(result, now)
        conditions = (_set_condition(conditions, skipped) if skipped is not None
                      else [c for c in conditions if c.type != CONDITION_SKIPPED])
        status = msgspec.structs.replace(
            status,
            synced_generation=result.generation,
            synced_requests=result.requests,
            message="",
            ufs_total=format_bytes(result.total_bytes),
            ufs_total_bytes=result.total_bytes,
            file_num=result.file_num,
            skipped_objects=result.skipped,
            manifest=result.manifest,
            conditions=conditions,
            last_sync_time=rfc3339(now),
        )
    return with_binding(record.dataset, status, runtime_phase, None, runtime_message, binding=binding)


def synced_message(dataset: Dataset, result: SyncResult) -> str:
    """``MetadataSynced``'s message: how many files the listing found. None found and none left out is no error (a
    prefix nothing was written to yet), but most often a misspelt bucket path or prefix: the message says where
    it looked and what to check, since "listed 0 files" alone left the reader with an empty mount and no clue."""
    if result.file_num or result.skipped:
        return f"listed {result.file_num} files"
    where = ", ".join(hide_secret_query(strip_userinfo(mount.mount_point, strict=True))
                      for mount in dataset.spec.mounts)
    return (f"listed 0 files: nothing under {where}; check the path and prefix (objects written there later "
            "appear at the next sync: shoal resync dataset, or the runtime's autoSync)")


def skipped_condition(result: SyncResult, now: float) -> Condition | None:
    """While a sync leaves objects out of the tree: how many of those listed, and a few examples; else None."""
    if not result.skipped:
        return None
    message = (f"{result.skipped} of {result.listed} listed objects are not in the tree: "
               + "; ".join(result.skipped_examples)
               + ("; …" if result.skipped > len(result.skipped_examples) else ""))
    return Condition(type=CONDITION_SKIPPED, status="True", reason="UnusableKeys", message=message,
                     last_transition_time=rfc3339(now))


def with_binding(dataset: Dataset, status: DatasetStatus, runtime_phase: str,
                 runtime_capacity: str | None, runtime_message: str | None = None, *,
                 binding: RuntimeBinding | None = None) -> DatasetStatus:
    """Status with phase and runtimes following the runtime of the same name (Fluid's binding rule). With
    ``runtime_message`` (the runtime's status message, "" when it says none), a dataset left NotBound by its runtime
    says why in its message (``not_bound_message``), unless a condition has more to say. With ``binding`` (the
    runtime's, whose phase and message these are), a Bound dataset whose runtime has no cache worker says so
    (``no_workers_message``), unless a condition has more to say: the runtime said it, the dataset read as cached."""
    phase = dataset_phase(status, runtime_phase)
    runtimes = (
        [RuntimeRef(name=dataset.metadata.name, namespace=dataset.metadata.namespace)] if phase == "Bound" else []
    )
    cache_states = status.cache_states
    if runtime_capacity is not None:
        cache_states = msgspec.structs.replace(cache_states, cache_capacity=runtime_capacity)
    if phase == "Bound" and not cache_states.cached:
        cache_states = msgspec.structs.replace(cache_states, cached="0.00B", cached_percentage="0.0%")
    if phase != "Bound":
        cache_states = CacheStates(cache_capacity=cache_states.cache_capacity)
    message = status_message(status.conditions)
    if phase == "NotBound" and not message and runtime_message is not None:
        message = not_bound_message(dataset.metadata.namespace, dataset.metadata.name, runtime_phase, runtime_message)
    if phase == "Bound" and not message and binding is not None and binding.cache_workers == 0:
        message = no_workers_message(dataset.metadata.namespace, dataset.metadata.name, binding)
    return msgspec.structs.replace(status, phase=phase, runtimes=runtimes, cache_states=cache_states,
                                   message=message)


def not_bound_message(namespace: str, name: str, runtime_phase: str, runtime_message: str) -> str:
    """Why a dataset listed without error is NotBound, and what to change: it binds to the Runtime of its own name
    and namespace once that is Ready. A phase of NotReady with no message is what no runtime at all reads as
    (``RuntimeBinding()``; a runtime always says why it is not Ready)."""
    shown = subjects.object_name(namespace, name)
    if runtime_phase == "NotReady" and not runtime_message:
        return (f"no Runtime {shown}: a dataset binds to the Runtime of its own name and namespace; apply one to "
                "cache and mount it")
    why = f": {runtime_message}" if runtime_message else ""
    return f"waiting for Runtime {shown} to be Ready (it is {runtime_phase}{why})"


def no_workers_message(namespace: str, name: str, binding: RuntimeBinding) -> str:
    """Why a Bound dataset's reads all go to the store, and what to change: its runtime has no cache worker, scaled
    to zero (``spec.replicas`` 0) or with none picked (the runtime's message says why, quoted)."""
    shown = subjects.object_name(namespace, name)
    head = f"bound to Runtime {shown}, which has no cache workers"
    if binding.scaled_to_zero:
        scope = "" if namespace == "default" else f" -n {namespace}"
        return (f"{head} (spec.replicas is 0): every node reads from the store itself; scale it with "
                f"`shoal scale runtime {name}{scope} --replicas N` to cache")
    why = f" (Runtime: {binding.message})" if binding.message else ""
    return f"{head}: every node reads from the store itself{why}"


def status_message(conditions: list[Condition]) -> str:
    """The one-line message: a failed sync first, else a mount that is not serving, else failing reads, else
    nothing."""
    for kind, bad in ((CONDITION_SYNCED, "False"), (CONDITION_MOUNTED, "False"), (CONDITION_READS, "True")):
        condition = find_condition(conditions, kind)
        if condition is not None and condition.status == bad:
            return condition.message
    return ""


def _copied(conditions: list[Condition], kind: str, copy: Condition | None) -> list[Condition]:
    old = find_condition(conditions, kind)
    if copy is None:
        return [c for c in conditions if c.type != kind]
    if old is not None and old.status == copy.status and old.message == copy.message:
        return conditions
    return _set_condition(conditions, copy)


def with_mount_condition(status: DatasetStatus, mounted: Condition | None,
                         reads: Condition | None = None) -> DatasetStatus:
    """Status with the runtime's ``Mounted`` and ``ReadsFailing`` conditions copied in (each removed when the
    runtime has none)."""
    conditions = _copied(_copied(status.conditions, CONDITION_MOUNTED, mounted), CONDITION_READS, reads)
    return msgspec.structs.replace(status, conditions=conditions, message=status_message(conditions))


def dataset_phase(status: DatasetStatus, runtime_phase: str) -> DatasetPhase:
    """Failed when the last sync failed and left no tree to serve (``status_after_sync``); Bound once the runtime
    is Ready, kept while it is PartialReady."""
    synced = find_condition(status.conditions, CONDITION_SYNCED)
    if synced is not None and synced.status == "False" and not status.manifest:
        return "Failed"
    if runtime_phase == "Ready":
        return "Bound"
    if runtime_phase == "PartialReady" and status.phase == "Bound":
        return "Bound"
    return "NotBound"


class RuntimeBinding(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The dataset service's copy of the runtime of the same name: its phase, cache capacity, ``Mounted`` and
    ``ReadsFailing`` conditions, from the runtime fact at stream sequence ``fact_sequence`` (0: none). Replicas of
    the service take facts of one runtime in any order; the sequence keeps an older fact from overwriting a newer
    one. The sequences are the facts stream's: a stream deleted and created again counts from 1, so its bindings
    bucket goes with it (purged), or every stored binding would look newer than the facts to come."""

    phase: str = "NotReady"
    cache_capacity: str = ""
    mounted: Condition | None = None
    fact_sequence: int = 0
    reads_failing: Condition | None = None
    # What ``cache_capacity`` counts (``dataset_capacity``): its bytes, the ring of block owners whose tiers it sums
    # ([] without a ring: every ready node) and one node's tiers. 0 and []: a binding stored before these fields,
    # whose capacity is taken as it is until the runtime's next fact.
    cache_capacity_bytes: int = 0
    ring: list[str] = []
    node_capacity_bytes: int = 0
    # The runtime's status message: why it is not Ready, which a dataset left NotBound by it quotes
    # (``not_bound_message``). "": a binding stored before this field, or a runtime with nothing to say.
    message: str = ""
    # How many cache workers the runtime picked, and whether it picks none because ``spec.replicas`` is 0 (rather
    # than for want of eligible agents, or of its Dataset): a Bound dataset without any says so
    # (``no_workers_message``). None: a binding stored before this field, or no runtime, which says nothing.
    cache_workers: int | None = None
    scaled_to_zero: bool = False


def runtime_binding(status: RuntimeStatus, sequence: int) -> RuntimeBinding:
    """The binding a runtime's status at fact stream ``sequence`` gives its dataset of the same name."""
    ring = ring_nodes(status.workers)
    # A runtime service before ``nodeCapacityBytes`` counted the ring's tiers alone.
    per_node = status.node_capacity_bytes or (status.cache_capacity_bytes // len(ring) if ring else 0)
    # 0 wanted while its Dataset exists: the replicas, not the Dataset's absence (a fact from before it was applied).
    dataset_missing = find_condition(status.conditions, CONDITION_DATASET) is not None
    return RuntimeBinding(phase=status.phase, cache_capacity=status.cache_capacity, fact_sequence=sequence,
                          message=status.message, cache_workers=len(status.workers),
                          scaled_to_zero=status.desired_worker_number_scheduled == 0 and not dataset_missing,
                          mounted=find_condition(status.conditions, CONDITION_MOUNTED),
                          reads_failing=find_condition(status.conditions, CONDITION_READS),
                          cache_capacity_bytes=status.cache_capacity_bytes, ring=ring,
                          node_capacity_bytes=per_node if ring else 0)


def dataset_capacity(binding: RuntimeBinding, nodes: Sequence[NodeCache]) -> str:
    """``cacheCapacity``: the runtime's total cache capacity, as in Fluid (its ring's tiers), and the tiers of every
    other node that holds blocks of the dataset (``nodes``: ``status.nodes``). A worker out of the ring (scaled
    down, or missing heartbeats) keeps its blocks, and ``cached`` counts them: the capacity counts what holds them,
    so ``cached`` never exceeds it. The runtime service counts the same (``held_capacity``, from this status's
    nodes), so the Runtime's figure agrees once it has seen them; this one follows the nodes at once."""
    if not binding.ring or not binding.node_capacity_bytes:
        return binding.cache_capacity
    holders = [node.node for node in nodes if node.cached_bytes > 0]
    capacity = held_capacity(binding.node_capacity_bytes, binding.ring, holders)
    return binding.cache_capacity if capacity == binding.cache_capacity_bytes else format_bytes(capacity)


def deleted_binding_note(sequence: int) -> bytes:
    """The note of a deleted runtime's binding marker: the sequence of the fact that deleted it."""
    return msgspec.json.encode(RuntimeBinding(fact_sequence=sequence))


def says_nothing(binding: RuntimeBinding) -> bool:
    """A binding read as no binding at all (the default's phase, no capacity, no conditions): one a deleted
    runtime left, or a runtime's that never got further than NotReady."""
    return msgspec.structs.replace(binding, fact_sequence=0) == RuntimeBinding()


def binding_sequence(stored: RuntimeBinding | None, note: bytes) -> int:
    """The fact sequence a binding was last written at: its value's, else its delete marker's note (0: none)."""
    if stored is not None:
        return stored.fact_sequence
    try:
        return msgspec.json.decode(note, type=RuntimeBinding).fact_sequence if note else 0
    except DECODE_ERRORS:
        return 0


class Listing(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """When an autoSync listing of a dataset last found nothing new (``shoal_dataset_listings``, this service's
    clock): such a listing writes nothing to the record, so after a restart or a hand-over the next one is counted
    from this (``next_sync``'s ``listed_at``), not from a ``lastSyncTime`` that may be many periods old."""

    listed_at: float


def bound_status(record: DatasetRecord, binding: RuntimeBinding) -> DatasetStatus:
    """The record's status following its runtime's binding: phase, runtimes, capacity and ``Mounted``."""
    return with_binding(record.dataset, with_mount_condition(record.status, binding.mounted, binding.reads_failing),
                        binding.phase,
                        dataset_capacity(binding, record.status.nodes), binding.message, binding=binding)


def status_on_apply(record: DatasetRecord, binding: RuntimeBinding | None, now: float) -> DatasetStatus:
    status = bound_status(record, binding or RuntimeBinding())
    return msgspec.structs.replace(status, conditions=with_read_only(record.dataset, status.conditions, now))


def with_read_only(dataset: Dataset, conditions: list[Condition], now: float) -> list[Condition]:
    """``conditions`` with ``ReadOnly`` while the spec's accessModes promise writes (its time kept while it stays),
    without it otherwise. Only an apply changes the spec, so the other status writes keep what this decided."""
    writes = write_access_modes(dataset.spec.access_modes)
    if not writes:
        return [c for c in conditions if c.type != CONDITION_READ_ONLY]
    message = (f"spec.accessModes lists {', '.join(writes)}, but Shoal mounts datasets read-only: a write gets "
               "EROFS (read-only file system)")
    return _set_condition(conditions, Condition(type=CONDITION_READ_ONLY, status="True",
                                                reason=REASON_WRITES_NOT_SERVED, message=message,
                                                last_transition_time=rfc3339(now)))


# --- Cache states from agent inventory (folded by libs.inventory) ---


def percentage(part: int, whole: int) -> str:
    return f"{min(100.0, 100.0 * part / whole):.1f}%" if whole > 0 else "0.0%"


def cache_states(cache: DatasetInventory, ufs_total_bytes: int) -> CacheStates:
    """The dataset's cache over every node. ``cached`` is what every node holds, summed (what the cache costs: a block
    two nodes hold counts twice); ``cachedPercentage`` is the share of the dataset that is in the cache, as Fluid
    means it: the scheduler's count of the bytes cached with each block once, moved by what the same sum gained
    since it, at the count's share of unique bytes (``unique_cached_bytes``), else, before the scheduler said it,
    the sum (capped at 100 %). Both come from the one sum of this fold, so they move together. Reads split as
    Fluid's: ``localHitRatio`` from the reading node's own tiers, ``remoteHitRatio`` from another node's cache (a
    peer), the rest from the store; ``cacheHitRatio`` is local and remote together. Bytes since each node's mount
    process started. A DataLoad's store fetches (``loadedBytes``) are no read: warming a dataset leaves its hit
    ratios as its readers made them."""
    counters = [node.counters for node in cache.nodes.values()]
    cached = sum(c.cached_bytes for c in counters)
    capacity = sum(c.capacity_bytes for c in counters)
    local = sum(c.hit_bytes for c in counters)
    remote = sum(c.remote_bytes for c in counters)
    store = sum(c.miss_bytes for c in counters)
    reads = local + remote + store
    return CacheStates(
        cache_capacity=format_bytes(capacity),
        cached=format_bytes(cached),
        cached_percentage=percentage(unique_cached_bytes(cache, cached), ufs_total_bytes),
        cache_hit_ratio=percentage(local + remote, reads),
        local_hit_ratio=percentage(local, reads),
        remote_hit_ratio=percentage(remote, reads),
    )


def unique_cached_bytes(cache: DatasetInventory, cached: int) -> int:
    """The dataset's bytes in the cache, each block once, agreeing with the nodes' sum ``cached`` at every moment.

    The scheduler's figure comes by another path, up to a second or two behind the sum (it publishes at most once a
    second, and only when a figure moved): taken alone, a load just finished showed ``cached`` at the dataset's size
    beside a percentage of the figure from the middle of the load. So the bytes the nodes gained since the
    scheduler's figure (the sum now less the sum in the fold that counted it) are counted as new blocks: with no
    block on two nodes the percentage is ``cached`` over the size, whatever the scheduler's lag. Never more than
    ``cached`` (a node that evicted everything is seen here a moment before the scheduler's next figure, or its
    figures dropped with its agent gone a moment before the scheduler's sweep); ``cached`` itself while the scheduler
    has not said it. A figure without the scheduler's sum (from before the field) is taken as it is.

    The bytes gained count at the share of unique bytes in the scheduler's figure (its count over the nodes' sum
    then): with blocks on two nodes (a DataLoad with ``replicas: 2``) half of what the nodes gain is new blocks, the
    rest their copies. Counted whole, the percentage ran ahead of the dataset's share in the cache until the
    scheduler's next figure (a replicated load shown at 100 % when 60 % of it was cached). With no block on two nodes
    the share is 1, as before; a figure of nothing cached (no share known yet) counts the gain whole."""
    if cache.unique is None:
        return cached
    known, nodes_bytes = cache.unique.bytes, cache.unique.nodes_bytes
    if nodes_bytes is None:
        return min(known, cached)
    gained = max(0, cached - nodes_bytes)
    # Integer arithmetic (no float rounding); never more than 1, even if the figure counted more than the sum.
    new_blocks = gained * min(known, nodes_bytes) // nodes_bytes if nodes_bytes > 0 else gained
    return min(known + new_blocks, cached)


def cache_fact_errors(fact: DatasetCacheObserved) -> list[str]:
    """Why a ``scheduler.dataset.cache.v1`` cannot be kept: a name that is no dataset's (nor a KV key), or a count
    of bytes below zero."""
    errors = validate_ref(fact.name, fact.namespace)
    if fact.unique_cached_bytes < 0:
        errors.append(f"uniqueCachedBytes must not be negative, got {fact.unique_cached_bytes}")
    if fact.nodes_cached_bytes is not None and fact.nodes_cached_bytes < 0:
        errors.append(f"nodesCachedBytes must not be negative, got {fact.nodes_cached_bytes}")
    return errors


def with_unique_cached(cache: DatasetInventory | None, fact: DatasetCacheObserved,
                       sequence: int) -> DatasetInventory | None:
    """The node-cache fold with the scheduler's figure of ``fact``, published at stream ``sequence``; None when the
    fold already has it or a later one (redelivered, or handled after a later fact by another replica)."""
    cache = cache or DatasetInventory()
    if cache.unique is not None and cache.unique.sequence >= sequence:
        return None
    return msgspec.structs.replace(cache, unique=UniqueCached(bytes=fact.unique_cached_bytes, sequence=sequence,
                                                              observed_at=fact.observed_at,
                                                              nodes_bytes=fact.nodes_cached_bytes))


def node_caches(cache: DatasetInventory) -> list[NodeCache]:
    """Where the cached bytes are and how each node's reads were served, by node name."""
    return [NodeCache(node=name, cached_bytes=node.counters.cached_bytes, local_read_bytes=node.counters.hit_bytes,
                      remote_read_bytes=node.counters.remote_bytes, store_read_bytes=node.counters.miss_bytes,
                      loaded_bytes=node.counters.loaded_bytes, counting=node.counters.counting)
            for name, node in sorted(cache.nodes.items())]


def takes_cache_states(before: DatasetStatus, after: DatasetStatus) -> bool:
    """Whether a status write that is no inventory event's must take the cache figures from the folded inventory:
    the dataset binds again (``with_binding`` cleared them while it was not Bound), or a sync changed the store's
    size (the percentage's whole). Otherwise only the next inventory event would set them, and an agent whose cache
    did not change sends none: a runtime NotReady for a moment (heartbeats missed while a NATS server died) left
    the dataset Bound at 0 % beside a full cache."""
    return after.phase == "Bound" and (before.phase != "Bound" or before.ufs_total_bytes != after.ufs_total_bytes)


def with_cache_states(status: DatasetStatus, cache: DatasetInventory,
                      binding: RuntimeBinding | None = None) -> DatasetStatus:
    """The status with the cache figures of ``cache``; unchanged while no node ever reported, zero once the last
    node that had is gone. The capacity stays the binding's once there is one (``dataset_capacity``: the runtime's,
    and the tiers of the nodes outside it that hold blocks), as ``bound_status`` sets it: every node that mounts the
    dataset reports its tiers, also those that only read through the workers and keep no block, so their sum flipped
    ``cacheCapacity`` to twice the runtime's at each inventory event and back at each runtime fact. Without
    ``binding`` (or one stored before its capacity's bytes), the capacity the status has is kept."""
    if not cache.nodes and not status.nodes:
        return status
    states = cache_states(cache, status.ufs_total_bytes)
    nodes = node_caches(cache)
    if binding is not None and binding.cache_capacity_bytes:
        states = msgspec.structs.replace(states, cache_capacity=dataset_capacity(binding, nodes))
    elif status.cache_states.cache_capacity:
        states = msgspec.structs.replace(states, cache_capacity=status.cache_states.cache_capacity)
    return msgspec.structs.replace(status, cache_states=states, nodes=nodes)


def departed_nodes(named: Iterable[str], agents: Mapping[str, AgentRecord], ttl: float) -> set[str]:
    """The nodes of ``named`` whose agent is gone: no record, or a last heartbeat more than ``ttl`` seconds older
    than the newest of any agent (a node removed from the cluster stops beating, the others go on). Judged against
    the newest beat, not this process's clock: the beats' times are the NATS server's, and while nothing records
    beats (the runtime service down) no node looks gone. None without any beat. Their cache left with them."""
    newest = max((agent.received_at for agent in agents.values()), default=None)
    if newest is None:
        return set()
    return {node for node in named if (agent := agents.get(node)) is None or newest - agent.received_at > ttl}


def without_nodes(cache: DatasetInventory, nodes: Collection[str]) -> DatasetInventory:
    """``cache`` without the figures of ``nodes``; the same object when it has none of them."""
    if not any(node in cache.nodes for node in nodes):
        return cache
    return msgspec.structs.replace(cache, nodes={name: node for name, node in cache.nodes.items()
                                                 if name not in nodes})


# --- Reference datasets (dataset://<namespace>/<name>, libs.references) ---


def with_dataset_ref(status: DatasetStatus, references: Sequence[str]) -> DatasetStatus:
    """A source's status naming the references that mount it (Fluid's ``datasetRef``, ``<namespace>/<name>``)."""
    wanted = sorted(references)
    return status if status.dataset_ref == wanted else msgspec.structs.replace(status, dataset_ref=wanted)

# A reference's own condition: whether its source exists and can be followed (it mirrors the source's status).
CONDITION_SOURCE = "SourceAvailable"
REASON_FOLLOWING = "Following"
REASON_SOURCE_MISSING = "SourceMissing"
REASON_SOURCE_IS_REFERENCE = "SourceIsReference"


def reference_errors(dataset: Dataset) -> list[str]:
    """Why a spec with a ``dataset://`` mount cannot be a reference, as Fluid refuses it: exactly one mount, no
    other kind beside it, a well-formed source that is not the dataset itself, no options of its own (the source's
    apply). Whether the source exists, and is not a reference itself, is the status's business (it may come later)."""
    mounts = dataset.spec.mounts
    meta = dataset.metadata
    references = [index for index, mount in enumerate(mounts) if is_reference_mount(mount)]
    if len(references) > 1:
        return [f"spec.mounts has {len(references)} {REFERENCE_PREFIX} mounts: a reference dataset mounts exactly "
                "one dataset; make one reference dataset per source"]
    (index,) = references
    where = f"spec.mounts[{index}]"
    if len(mounts) > 1:
        others = ", ".join(f"spec.mounts[{i}]" for i in range(len(mounts)) if i != index)
        return [f"{where} is a {REFERENCE_PREFIX} mount, which cannot be combined with other mounts ({others}), "
                "as in Fluid: put those in the source dataset, or in a dataset of their own"]
    mount = mounts[index]
    source, problem = parse_reference(mount.mount_point)
    if source is None:
        return [f"{where}.mountPoint {problem}"]
    errors = []
    if (source.namespace, source.name) == (meta.namespace, meta.name):
        shown = strip_userinfo(mount.mount_point, strict=True)
        errors.append(f"{where}.mountPoint {shown!r} names this dataset itself: a reference mounts "
                      "another dataset; name that one")
    if mount.options or mount.encrypt_options or dataset.spec.shared_options or dataset.spec.shared_encrypt_options:
        errors.append(f"{where}: options and encryptOptions are not used by a {REFERENCE_PREFIX} mount (the source's "
                      "own apply); remove them")
    return errors


def reference_apply_errors(dataset: Dataset, source: DatasetRecord | None) -> list[str]:
    """Why a reference cannot be applied given its source as it is now: a source that is itself a reference (a
    chain, or with this one a cycle such as a→b→a). A missing source is accepted (applied in any order, it fails
    until the source comes); a chain made later, by a race or by re-applying the source, fails in the status."""
    ref = reference_of(dataset)
    if ref is None or source is None or not is_reference(source.dataset):
        return []
    further = reference_of(source.dataset)
    meta = dataset.metadata
    loop = further is not None and (further.namespace, further.name) == (meta.namespace, meta.name)
    what = "a cycle" if loop else "a chain"
    return [f"spec.mounts[0].mountPoint {REFERENCE_PREFIX}{ref} names a dataset that is itself a reference (to "
            f"{further}), which would make {what}: references do not chain; mount a dataset of stores"
            + ("" if loop or further is None else f", such as {REFERENCE_PREFIX}{further}")]


def _source_condition(previous: DatasetStatus, status: Literal["True", "False"], reason: str, message: str,
                      now: float) -> Condition:
    old = next((c for c in previous.conditions if c.type == CONDITION_SOURCE), None)
    since = old.last_transition_time if old is not None and old.status == status else rfc3339(now)
    return Condition(type=CONDITION_SOURCE, status=status, reason=reason, message=message,
                     last_transition_time=since)


def _kept_read_only(previous: DatasetStatus, conditions: list[Condition]) -> list[Condition]:
    """A reference's own ``ReadOnly`` condition carried over (it is its spec's, not the source's), for its time."""
    own = find_condition(previous.conditions, CONDITION_READ_ONLY)
    return [*conditions, own] if own is not None else conditions


def reference_status(record: DatasetRecord, source: DatasetRecord | None, now: float) -> DatasetStatus:
    """The status of a reference dataset, given its source's record (None when it does not exist).

    It mirrors the source (phase, ufsTotal, fileNum, cacheStates, nodes, runtimes: the source's runtime serves it)
    with a ``SourceAvailable`` condition. A source that does not exist, or is itself a reference (chains and cycles
    are never followed, so a→b→a can never be Bound), makes it Failed with a message saying what to change; it
    follows again as soon as the source is there. Its own generation counts as synced: it lists nothing."""
    ref = reference_of(record.dataset)
    previous = record.status
    generation, requests = record.generation, record.sync_requests
    if ref is None:  # refused at apply; kept total for a record written before this rule
        return previous
    mount_point = f"{REFERENCE_PREFIX}{ref}"
    if source is None or is_reference(source.dataset):
        if source is None:
            reason = REASON_SOURCE_MISSING
            message = (f"source dataset {ref.namespace}/{ref.name} does not exist: create it, or point "
                       f"spec.mounts[0].mountPoint ({mount_point}) at an existing dataset")
        else:
            reason = REASON_SOURCE_IS_REFERENCE
            further = reference_of(source.dataset)
            message = (f"source dataset {ref.namespace}/{ref.name} is itself a reference (to {further}): references "
                       f"do not chain; mount {REFERENCE_PREFIX}{further} instead")
        condition = _source_condition(previous, "False", reason, message, now)
        conditions = with_read_only(record.dataset, _kept_read_only(previous, [condition]), now)
        return DatasetStatus(phase="Failed", message=message, conditions=conditions,
                             last_sync_time=previous.last_sync_time, synced_generation=generation,
                             synced_requests=requests)
    mirrored = source.status
    condition = _source_condition(previous, "True", REASON_FOLLOWING,
                                  f"mirrors {ref.namespace}/{ref.name}, whose cache serves this dataset", now)
    conditions = [*[c for c in mirrored.conditions if c.type not in (CONDITION_SOURCE, CONDITION_READ_ONLY)],
                  condition]
    conditions = with_read_only(record.dataset, _kept_read_only(previous, conditions), now)
    if mirrored.message:
        message = f"source dataset {ref.namespace}/{ref.name}: {mirrored.message}"
    elif mirrored.phase != "Bound":
        message = f"waiting for source dataset {ref.namespace}/{ref.name} to be Bound (it is {mirrored.phase})"
    else:
        message = ""
    return msgspec.structs.replace(mirrored, conditions=conditions, message=message, synced_generation=generation,
                                   synced_requests=requests, dataset_ref=[])


# Resync ids a record remembers: a redelivery arrives within a few fetch batches (16 messages each) of the first
# delivery, so 32 covers it while keeping the record small (~1 KiB of ids).
RESYNC_IDS_KEPT = 32


def request_resync(record: DatasetRecord, command_id: str) -> DatasetRecord | None:
    """The record counting one more resync request, or None when this command was already counted (redelivered)."""
    if command_id and command_id in record.resync_ids:
        return None
    return msgspec.structs.replace(record, sync_requests=record.sync_requests + 1,
                                   resync_ids=[*record.resync_ids, command_id][-RESYNC_IDS_KEPT:])
