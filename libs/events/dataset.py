"""Dataset events: the Dataset object (Fluid's ``data.fluid.io/v1alpha1`` field names), its commands and facts.

JSON field names are camelCase like Fluid's API; Python attributes are snake_case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from libs.events.common import ApplyResult, Event, ObjectMeta, int_range


class SecretKeySelector(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    key: str


class EncryptOptionSource(msgspec.Struct, frozen=True, rename="camel"):
    secret_key_ref: SecretKeySelector


class EncryptOption(msgspec.Struct, frozen=True, rename="camel"):
    """A mount option whose value is read from a secret, so it never travels in the event itself."""

    name: str
    value_from: EncryptOptionSource


class Mount(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    mount_point: str
    name: str = ""
    path: str = ""
    options: dict[str, str] = {}
    encrypt_options: list[EncryptOption] = []
    read_only: bool = False
    shared: bool = False


# uid_t and gid_t are 32 bits and (uid_t)-1 means "no owner" to the kernel; a larger value wedged every stat.
MAX_OWNER_ID = 2**32 - 2
OwnerId = Annotated[int, int_range(0, MAX_OWNER_ID)]


class User(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Owner of the files in the mount (Fluid's ``spec.owner``)."""

    uid: OwnerId | None = None
    gid: OwnerId | None = None
    user: str = ""
    group: str = ""


AccessMode = Literal["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadOnlyOnce", "ReadWriteOncePod"]
# Access modes that promise writes: Shoal's mounts are read-only whatever the spec says (a write gets EROFS), so
# these are accepted, for the PersistentVolume and claims a Fluid manifest expects, and warned about.
WRITE_ACCESS_MODES: tuple[AccessMode, ...] = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")


def write_access_modes(modes: Sequence[str]) -> list[str]:
    """The modes of ``modes`` that promise writes Shoal's read-only mounts do not serve, in the spec's order."""
    return [mode for mode in modes if mode in WRITE_ACCESS_MODES]


# The reason of the dataset's ``ReadOnly`` condition while its accessModes promise writes, and of the Kubernetes
# bridge's Warning Event saying so at apply: one word for one fact, whichever a user filters on.
REASON_WRITES_NOT_SERVED = "WritesNotServed"

Placement = Literal["Exclusive", "Shared", ""]


class DatasetSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    mounts: list[Mount] = []
    owner: User | None = None
    # Kubernetes NodeAffinity and Tolerations are kept as given; the scheduler interprets them.
    node_affinity: dict[str, object] | None = None
    tolerations: list[dict[str, object]] = []
    access_modes: list[AccessMode] = msgspec.field(default_factory=lambda: ["ReadOnlyMany"])
    placement: Placement = "Exclusive"
    shared_options: dict[str, str] = {}
    shared_encrypt_options: list[EncryptOption] = []


class Dataset(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    metadata: ObjectMeta
    spec: DatasetSpec = DatasetSpec()


class CacheStates(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    cache_capacity: str = ""
    cached: str = ""
    cached_percentage: str = ""
    cache_hit_ratio: str = ""
    # Fluid's split of reads: from the reading node's own cache, from another node's cache (a peer).
    local_hit_ratio: str = ""
    remote_hit_ratio: str = ""


# The condition a listing sets (True: the tree is this listing's; False: it failed, the tree kept is the last good
# one's). The dataset service writes it; the loader reads it (an OnEvent load runs on good listings only).
CONDITION_SYNCED = "MetadataSynced"


class Condition(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""


def find_condition(conditions: Sequence[Condition], kind: str) -> Condition | None:
    """The condition of type ``kind`` (Kubernetes keeps one per type), or None."""
    return next((c for c in conditions if c.type == kind), None)


class RuntimeRef(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    name: str
    namespace: str
    category: str = "Accelerate"
    type: str = "shoal"


DatasetPhase = Literal["NotBound", "Bound", "Failed"]


class NodeCache(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """What one node caches of the dataset and how its reads were served (bytes since its mount started)."""

    node: str
    cached_bytes: int = 0
    local_read_bytes: int = 0
    remote_read_bytes: int = 0
    # From the store for this node's readers and for peers (an owner's fetch of a block a peer asked for).
    store_read_bytes: int = 0
    # From the store for DataLoads: no read (not in the hit ratios, nor the autoscaler's sample).
    loaded_bytes: int = 0
    # The node's mount is still counting the blocks on its disk after a restart (``CacheCounters.counting``): its
    # ``cachedBytes``, and the dataset's ``cached`` and ``cachedPercentage`` with it, are partial until it is done.
    counting: bool = False


class DatasetStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    phase: DatasetPhase = "NotBound"
    message: str = ""
    ufs_total: str = ""
    ufs_total_bytes: int = 0
    file_num: int = 0
    # Objects the last listing left out of the tree (not in fileNum; the ``ObjectsSkipped`` condition says which):
    # a number, so the dataset service's gauge reads it from the record as it reads fileNum.
    skipped_objects: int = 0
    cache_states: CacheStates = CacheStates()
    # Per node, by name: where the cached bytes are (``shoal describe dataset``).
    nodes: list[NodeCache] = []
    runtimes: list[RuntimeRef] = []
    conditions: list[Condition] = []
    # Generation of the spec the metadata (ufsTotal, fileNum, manifest) was computed from.
    synced_generation: int = 0
    # How many resync requests the current metadata reflects (see DatasetResync).
    synced_requests: int = 0
    manifest: str = ""
    last_sync_time: str = ""
    # Fluid's ``datasetRef``: the reference datasets (``dataset://``) that mount this one, as ``<namespace>/<name>``.
    dataset_ref: list[str] = []


# --- Commands in ---


class DatasetApply(Event, frozen=True, kw_only=True, tag="dataset.apply.v1", rename="camel"):
    dataset: Dataset


class DatasetDelete(Event, frozen=True, kw_only=True, tag="dataset.delete.v1", rename="camel"):
    name: str
    namespace: str = "default"


class DatasetResync(Event, frozen=True, kw_only=True, tag="dataset.resync.v1", rename="camel"):
    """List the mounts again without a spec change (new objects landed, objects were overwritten)."""

    name: str
    namespace: str = "default"


DatasetCommand = DatasetApply | DatasetDelete | DatasetResync


# --- Facts out ---


class DatasetAccepted(Event, frozen=True, kw_only=True, tag="dataset.accepted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str
    generation: int
    result: ApplyResult = ""  # what the command did to the object (libs.events.common.ApplyResult)


class DatasetRejected(Event, frozen=True, kw_only=True, tag="dataset.rejected.v1", rename="camel"):
    """A command that was not carried out, with a reason a person can act on."""

    causation_id: str
    reason: str
    name: str = ""
    namespace: str = ""
    subject: str = ""
    # The command named an object that does not exist (any more): a delete, resync, scale or run of it. ``shoal
    # delete KIND --all`` passes over such an answer for an object deleted since it listed them, as kubectl does.
    not_found: bool = False


class DatasetStatusChanged(Event, frozen=True, kw_only=True, tag="dataset.status.v1", rename="camel"):
    name: str
    namespace: str
    generation: int
    status: DatasetStatus


class DatasetDeleted(Event, frozen=True, kw_only=True, tag="dataset.deleted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str


DatasetFact = DatasetAccepted | DatasetRejected | DatasetStatusChanged | DatasetDeleted


class DatasetRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the dataset service keeps in KV per dataset: desired state, its generation, and status."""

    dataset: Dataset
    generation: int
    status: DatasetStatus = DatasetStatus()
    # Resync requests received; a sync is due while status.syncedRequests is behind.
    sync_requests: int = 0
    # The trace of the command that last asked for a sync (W3C traceparent, "" if none): the sync starts from a KV
    # watch, which carries no message headers, and joins that trace through this.
    traceparent: str = ""
    # Ids of the latest resync commands counted in sync_requests (newest last, at most RESYNC_IDS_KEPT): a resync
    # redelivered after its write landed (its fact's publish failed, or the write's ack was lost in a NATS
    # failover) is not counted twice.
    resync_ids: list[str] = []
    # The commands stream's sequence of the last apply that changed the spec (0: not known). An older apply
    # delivered again later (the service was killed before acking it, and JetStream redelivers it after its ack
    # wait, behind newer commands) is stale: applying it would put an old spec back under a new generation.
    command_sequence: int = 0
    # What the apply at ``command_sequence`` answered (``libs.events.common.answered_result``): a redelivery of it
    # answers the same. "" in a record written before the field.
    command_result: ApplyResult = ""
    # Which life of this name the record is (a random id made when the record is created; "" for a record made
    # before incarnations): a dataset deleted and applied again starts at generation 1 again, so a sync of the
    # deleted one still running compares this, not the generation, before it writes, and names its manifest with
    # it (``libs.subjects.manifest_name``), so its upload never replaces the new dataset's.
    incarnation: str = ""
    # Manifests no one names any more that are still to be removed (a listed dataset re-applied as a reference: the
    # manifests of its own listing). Written with the record that leaves them, emptied once they are removed: a
    # removal that failed (NATS away) is done by the apply's redelivery or the reconciler's next look.
    manifests_left: list[str] = []


# gc=False: only strings and numbers, never in a cycle; a mount or the scheduler holds one per file of a dataset
# (millions), which the collector would otherwise track (16 bytes each) and walk at every full collection.
class ManifestEntry(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True, gc=False):
    """One file of a synced dataset: a line of its manifest (``libs.manifest`` reads and writes them)."""

    path: str  # '/'-rooted path inside the dataset; a folder marker's ends in '/' (libs.paths)
    mount: int  # index into spec.mounts
    key: str  # object key relative to the mount's prefix
    size: int
    etag: str
    mtime: float
    # The same time exactly, in nanoseconds, where the listing has it (local files); None: ``mtime`` is all there is.
    mtime_ns: int | None = None
    # Local files: permission bits and owner to serve (None for objects, served read-only to everyone).
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
