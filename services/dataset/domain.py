"""Dataset decisions, pure: validation, applying a spec, the phase, and the status after a sync.

No I/O and no clock here: ``now`` is a parameter. Handlers load state, call these, save and publish.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from libs.events.common import DNS1123_LABEL, DNS1123_SUBDOMAIN, dns_label_errors, format_bytes
from libs.events.dataset import (
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
)
from libs.hostpaths import local_root_error
from libs.inventory import DatasetInventory
from libs.mounts import canonical_options, exposed_secret_errors, mount_path
from libs.paths import relative_problem
from libs.redact import is_secret_name, strip_userinfo

SUPPORTED_SCHEMES = ("s3", "local")
CONDITION_SYNCED = "MetadataSynced"
# Reasons of a False MetadataSynced: the store could not be reached (the sync is tried again after a delay, see
# sync_due_in), or any other failure (it waits for a new spec or a resync).
REASON_UNREACHABLE = "StoreUnreachable"
REASON_FAILED = "SyncFailed"
# Present while the last sync left objects out of the tree (libs.paths has the rules), with a count and examples.
CONDITION_SKIPPED = "ObjectsSkipped"
# Copied from the runtime of the same name: whether the dataset's mounts are serving on the nodes.
CONDITION_MOUNTED = "Mounted"

# Options each scheme understands; Fluid/Alluxio spellings are aliases (libs.mounts).
S3_OPTIONS = {"endpoint", "region", "pathStyle", "aws.accessKeyId"}
S3_ENCRYPT_OPTIONS = {"aws.accessKeyId", "aws.secretKey"}
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MOUNT_NAME = re.compile(r"^[A-Za-z0-9]([-._A-Za-z0-9]*[A-Za-z0-9])?$")
# uid_t and gid_t are 32 bits and (uid_t)-1 means "no owner" to the kernel; a larger value wedged every stat.
MAX_OWNER_ID = 2**32 - 2


def validate_ref(name: str, namespace: str) -> list[str]:
    """Why a command's name and namespace cannot name a dataset or runtime (delete, resync), or nothing."""
    return dns_label_errors(name, "name") + dns_label_errors(namespace, "namespace", DNS1123_LABEL)


def validate_dataset(dataset: Dataset, local_roots: Sequence[str] | None = None) -> list[str]:
    """Every reason the dataset cannot be accepted, as sentences a person can act on; empty if valid.

    ``local_roots``: the folders below which ``local://`` mounts are allowed (SHOAL_LOCAL_ROOTS); the service
    always passes them, None leaves that check out (for tests of the other rules).
    """
    errors = dns_label_errors(dataset.metadata.name, "metadata.name")
    errors += dns_label_errors(dataset.metadata.namespace, "metadata.namespace", DNS1123_LABEL)
    spec = dataset.spec
    if not spec.mounts:
        errors.append("spec.mounts must list at least one mount")
    errors += exposed_secret_errors(dataset)
    seen_paths: dict[str, int] = {}
    for index, mount in enumerate(spec.mounts):
        where = f"spec.mounts[{index}]"
        errors += _mount_errors(mount, where, spec.shared_options, spec.shared_encrypt_options)
        if local_roots is not None and urlsplit(mount.mount_point).scheme == "local":
            refused = local_root_error(urlsplit(mount.mount_point).path, local_roots)
            if refused:
                errors.append(f"{where}.mountPoint: {refused}")
        if mount.name and not MOUNT_NAME.fullmatch(mount.name):
            errors.append(f"{where}.name {mount.name!r} may use only letters, digits, '.', '_' and '-'")
        path = mount_path(mount, len(spec.mounts))
        if not path:
            errors.append(f"{where} needs a name or a path when a dataset has several mounts")
        elif ".." in mount.path.split("/"):
            errors.append(f"{where}.path {mount.path!r} must not contain '..'")
        elif path != "/" and (problem := relative_problem(path[1:])) is not None:
            errors.append(f"{where} would appear at {path!r}, which {problem}")
        elif path in seen_paths:
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
    if spec.owner is not None:
        for field in ("uid", "gid"):
            value = getattr(spec.owner, field)
            if value is not None and not 0 <= value <= MAX_OWNER_ID:
                errors.append(f"spec.owner.{field} must be between 0 and {MAX_OWNER_ID}, got {value}")
    return errors


def _mount_errors(mount: Mount, where: str, shared: dict[str, str], shared_encrypt: list[EncryptOption]) -> list[str]:
    errors: list[str] = []
    # Shown back in rejections and logs: never with the credentials a URL may carry (reported on their own,
    # by exposed_secret_errors), and judged without them.
    shown_point = strip_userinfo(mount.mount_point, strict=True)
    parts = urlsplit(strip_userinfo(mount.mount_point))
    scheme = parts.scheme
    if scheme not in SUPPORTED_SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        return [
            f"{where}.mountPoint {shown_point!r} has {shown}; supported: "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        ]
    options = canonical_options(mount, shared)
    encrypt = [*shared_encrypt, *mount.encrypt_options]
    if scheme == "s3":
        if not S3_BUCKET.fullmatch(parts.netloc.rpartition("@")[2]):
            errors.append(f"{where}.mountPoint {shown_point!r} does not name a valid S3 bucket")
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
        if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
            shown_endpoint = strip_userinfo(endpoint, strict=True)
            errors.append(f"{where}.options.endpoint {shown_endpoint!r} must be an http:// or https:// URL")
        for option in encrypt:
            if option.name not in S3_ENCRYPT_OPTIONS:
                errors.append(
                    f"{where}.encryptOptions {option.name!r} is not supported for s3 "
                    f"(supported: {', '.join(sorted(S3_ENCRYPT_OPTIONS))})"
                )
    else:
        if parts.netloc or not parts.path.startswith("/"):
            errors.append(f"{where}.mountPoint {shown_point!r} must be an absolute path like local:///data")
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


# --- Applying and status ---


def apply_dataset(record: DatasetRecord | None, dataset: Dataset, sequence: int = 0) -> tuple[DatasetRecord, bool]:
    """The record after applying ``dataset`` (an apply at stream ``sequence``, 0: unknown), and whether its spec
    changed (so it must be synced again). An apply older than the one the record holds is stale (delivered again
    after a crash, behind newer commands): not applied."""
    if record is None:
        return DatasetRecord(dataset=dataset, generation=1, command_sequence=sequence), True
    if record.dataset == dataset or (sequence and sequence < record.command_sequence):
        return record, False
    return msgspec.structs.replace(record, dataset=dataset, generation=record.generation + 1,
                                   command_sequence=sequence), True


def sync_due_in(record: DatasetRecord, now: float, retry_seconds: float) -> float | None:
    """Seconds until the dataset should be synced: 0.0 at once (a new spec, a resync, or a retry of an unreachable
    store whose delay has passed), more while that retry waits, None when nothing is due until its next change
    (synced, or failed for a reason retrying cannot fix).

    The wait counts from ``lastSyncTime`` (whole seconds, so a retry may come up to a second early), so any
    other write of the record (cache states, the runtime's phase) finds the same remaining wait, not a due sync.
    """
    status = record.status
    if status.synced_generation < record.generation or status.synced_requests < record.sync_requests:
        return 0.0
    synced = next((c for c in status.conditions if c.type == CONDITION_SYNCED), None)
    if synced is None or synced.status != "False" or synced.reason != REASON_UNREACHABLE:
        return None
    last = parse_iso_time(status.last_sync_time)
    if last is None:
        return 0.0  # no time to count from: retry rather than stay failed
    return max(0.0, last + retry_seconds - now)


def needs_sync(record: DatasetRecord, now: float, retry_seconds: float) -> bool:
    return sync_due_in(record, now, retry_seconds) == 0.0


@dataclass(frozen=True)
class SyncResult:
    """What a metadata sync found, or why it failed."""

    generation: int
    # The record's resync counter when the sync started.
    requests: int = 0
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


ISO_TIME = "%Y-%m-%dT%H:%M:%SZ"


def iso_time(now: float) -> str:
    return time.strftime(ISO_TIME, time.gmtime(now))


def parse_iso_time(text: str) -> float | None:
    """The seconds since the epoch of an ``iso_time`` string; None when empty or not in that form."""
    try:
        return float(calendar.timegm(time.strptime(text, ISO_TIME)))
    except ValueError:
        return None


def _set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    kept = [c for c in conditions if c.type != new.type]
    old = next((c for c in conditions if c.type == new.type), None)
    if old is not None and old.status == new.status:
        new = msgspec.structs.replace(new, last_transition_time=old.last_transition_time)
    return [*kept, new]


def status_after_sync(record: DatasetRecord, result: SyncResult, runtime_phase: str, now: float) -> DatasetStatus:
    """The status once a sync of ``result.generation`` finished (successfully or not)."""
    status = record.status
    if result.error:
        reason = REASON_UNREACHABLE if result.retryable else REASON_FAILED
        condition = Condition(type=CONDITION_SYNCED, status="False", reason=reason, message=result.error,
                              last_transition_time=iso_time(now))
        status = msgspec.structs.replace(
            status,
            synced_generation=result.generation,
            synced_requests=result.requests,
            message=result.error,
            conditions=_set_condition(status.conditions, condition),
            last_sync_time=iso_time(now),
        )
    else:
        condition = Condition(type=CONDITION_SYNCED, status="True", reason="Synced",
                              message=f"listed {result.file_num} files", last_transition_time=iso_time(now))
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
            manifest=result.manifest,
            conditions=conditions,
            last_sync_time=iso_time(now),
        )
    return with_binding(record.dataset, status, runtime_phase, None)


def skipped_condition(result: SyncResult, now: float) -> Condition | None:
    """While a sync leaves objects out of the tree: how many of those listed, and a few examples; else None."""
    if not result.skipped:
        return None
    message = (f"{result.skipped} of {result.listed} listed objects are not in the tree: "
               + "; ".join(result.skipped_examples)
               + ("; …" if result.skipped > len(result.skipped_examples) else ""))
    return Condition(type=CONDITION_SKIPPED, status="True", reason="UnusableKeys", message=message,
                     last_transition_time=iso_time(now))


def with_binding(dataset: Dataset, status: DatasetStatus, runtime_phase: str,
                 runtime_capacity: str | None) -> DatasetStatus:
    """Status with phase and runtimes following the runtime of the same name (Fluid's binding rule)."""
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
    return msgspec.structs.replace(status, phase=phase, runtimes=runtimes, cache_states=cache_states,
                                   message=status_message(status.conditions))


def status_message(conditions: list[Condition]) -> str:
    """The one-line message: a failed sync first, else a mount that is not serving, else nothing."""
    for kind in (CONDITION_SYNCED, CONDITION_MOUNTED):
        condition = next((c for c in conditions if c.type == kind), None)
        if condition is not None and condition.status == "False":
            return condition.message
    return ""


def with_mount_condition(status: DatasetStatus, mounted: Condition | None) -> DatasetStatus:
    """Status with the runtime's ``Mounted`` condition copied in (removed when the runtime has none)."""
    old = next((c for c in status.conditions if c.type == CONDITION_MOUNTED), None)
    if mounted is None:
        conditions = [c for c in status.conditions if c.type != CONDITION_MOUNTED]
    elif old is not None and old.status == mounted.status and old.message == mounted.message:
        conditions = status.conditions
    else:
        conditions = _set_condition(status.conditions, mounted)
    return msgspec.structs.replace(status, conditions=conditions, message=status_message(conditions))


def dataset_phase(status: DatasetStatus, runtime_phase: str) -> DatasetPhase:
    """Failed when the last sync failed; Bound once the runtime is Ready, kept while it is PartialReady."""
    synced = next((c for c in status.conditions if c.type == CONDITION_SYNCED), None)
    if synced is not None and synced.status == "False":
        return "Failed"
    if runtime_phase == "Ready":
        return "Bound"
    if runtime_phase == "PartialReady" and status.phase == "Bound":
        return "Bound"
    return "NotBound"


class RuntimeBinding(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The dataset service's copy of the runtime of the same name: its phase and cache capacity."""

    phase: str = "NotReady"
    cache_capacity: str = ""


def status_on_apply(record: DatasetRecord, binding: RuntimeBinding | None) -> DatasetStatus:
    binding = binding or RuntimeBinding()
    return with_binding(record.dataset, record.status, binding.phase, binding.cache_capacity)


# --- Cache states from agent inventory (folded by libs.inventory) ---


def percentage(part: int, whole: int) -> str:
    return f"{min(100.0, 100.0 * part / whole):.1f}%" if whole > 0 else "0.0%"


def cache_states(cache: DatasetInventory, ufs_total_bytes: int) -> CacheStates:
    """The dataset's cache over every node. Reads split as Fluid's: ``localHitRatio`` from the reading node's own
    tiers, ``remoteHitRatio`` from another node's cache (a peer), the rest from the store; ``cacheHitRatio`` is
    local and remote together. Bytes since each node's mount process started."""
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
        cached_percentage=percentage(cached, ufs_total_bytes),
        cache_hit_ratio=percentage(local + remote, reads),
        local_hit_ratio=percentage(local, reads),
        remote_hit_ratio=percentage(remote, reads),
    )


def node_caches(cache: DatasetInventory) -> list[NodeCache]:
    """Where the cached bytes are and how each node's reads were served, by node name."""
    return [NodeCache(node=name, cached_bytes=node.counters.cached_bytes, local_read_bytes=node.counters.hit_bytes,
                      remote_read_bytes=node.counters.remote_bytes, store_read_bytes=node.counters.miss_bytes)
            for name, node in sorted(cache.nodes.items())]


def with_cache_states(status: DatasetStatus, cache: DatasetInventory) -> DatasetStatus:
    if not cache.nodes:
        return status
    return msgspec.structs.replace(status, cache_states=cache_states(cache, status.ufs_total_bytes),
                                   nodes=node_caches(cache))
