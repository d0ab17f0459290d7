"""Runtime events: the cache runtime of a dataset (replicas, tiered store, block size), commands and facts.

Tier fields keep Fluid's names (``tieredstore.levels[].mediumtype/path/quota/high/low``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Annotated, Literal

import msgspec

from libs.events.common import ApplyResult, Event, ObjectMeta, int_range, parse_quantity
from libs.events.dataset import Condition

MediumType = Literal["MEM", "SSD", "HDD"]

# A cluster of thousands of nodes is the most a single runtime is expected to span.
MAX_REPLICAS = 10_000
# The autoscaler's targets, in percent.
Percent = Annotated[int, int_range(1, 100)]


# The block sizes a runtime may have: smaller blocks waste request overhead, larger ones waste cache and bandwidth on
# random reads; a multiple of the page size (4 KiB), so a block file is whole pages.
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024
BLOCK_ALIGNMENT = 4096


# A runtime status's condition, False while the runtime has no Dataset of its name (absent otherwise): the dataset
# service reads it to tell a runtime scaled to zero from one that picks no worker for want of its Dataset.
CONDITION_DATASET = "DatasetFound"


# A tier's watermarks when its spec gives none: Fluid's defaults.
DEFAULT_HIGH_WATERMARK = "0.95"
DEFAULT_LOW_WATERMARK = "0.7"


class Level(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    mediumtype: str
    quota: str | int
    path: str = ""
    # Watermarks as fractions of the quota, strings in Fluid ("0.95"); numbers are accepted too.
    high: str | float = DEFAULT_HIGH_WATERMARK
    low: str | float = DEFAULT_LOW_WATERMARK
    # Fluid's ``quotaList``: one quota per directory of a disk tier's ``path``, comma-separated, in its order
    # ("100Gi,50Gi"); ``quota`` is then their sum. Empty: ``quota`` split equally (``directory_quotas``).
    quota_list: str = ""

    @property
    def directories(self) -> list[str]:
        """The directories of ``path``, comma-separated, each stripped, in order (empty entries left out), as the
        agent's cache uses them."""
        return [path.strip() for path in self.path.split(",") if path.strip()]


def directory_quotas(level: Level) -> list[tuple[str, int]]:
    """Each directory of a disk tier's ``path`` (stripped, in order) with the bytes it may hold: its entry of
    ``quotaList``, or an equal share of ``quota``. ValueError for a quota that is no quantity, or a ``quotaList``
    whose length is not the number of directories."""
    directories = level.directories
    if not level.quota_list:
        share = parse_quantity(level.quota) // max(1, len(directories))
        return [(directory, share) for directory in directories]
    quotas = [parse_quantity(entry.strip()) for entry in level.quota_list.split(",")]
    if len(quotas) != len(directories):
        raise ValueError(f"quotaList {level.quota_list!r} has {len(quotas)} quota{'' if len(quotas) == 1 else 's'} "
                         f"for the {len(directories)} path{'' if len(directories) == 1 else 's'} in path: give one "
                         "quota per path, in the same order")
    return list(zip(directories, quotas, strict=True))


class TieredStore(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    levels: list[Level] = []


class MetadataSyncPolicy(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Fluid's ``management.metadataSyncPolicy``: whether the dataset's listing is kept up to date by itself.

    ``autoSync`` unset means on, as in Fluid. Shoal lists the dataset again every ``periodSeconds`` (a Shoal
    field; 0 takes the dataset service's SHOAL_AUTOSYNC_SECONDS) while it is on; the first listing and
    ``shoal resync`` happen either way (the mount needs a manifest).
    """

    auto_sync: bool | None = None
    period_seconds: Annotated[int, int_range(0)] = 0


class RuntimeManagement(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Fluid's ``spec.management`` (its ``cleanCachePolicy`` is not used by Shoal)."""

    metadata_sync_policy: MetadataSyncPolicy = MetadataSyncPolicy()


class AutoscalingPolicy(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Shoal's elastic cache: the runtime service moves ``replicas`` between the bounds by itself.

    It grows while the dataset is read and the workers' cache is fuller than ``targetCacheUsedPercent`` or
    fewer reads than ``targetHitRatioPercent`` are served from a cache; it shrinks by one worker once no such
    pressure was seen for ``coolDownSeconds`` (and never sooner than that after its last change).
    """

    min_replicas: Annotated[int, int_range(0, MAX_REPLICAS)] = 1
    max_replicas: Annotated[int, int_range(1, MAX_REPLICAS)] = 1
    target_cache_used_percent: Percent | None = None
    target_hit_ratio_percent: Percent | None = None
    # At least 1: it keeps the autoscaler from flapping.
    cool_down_seconds: Annotated[int, int_range(1)] = 300


class RuntimeSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    replicas: Annotated[int, int_range(0, MAX_REPLICAS)] = 1
    tieredstore: TieredStore = TieredStore()
    # 4 MiB like JuiceFS: large enough for sequential throughput, small enough for random reads.
    block_size: str | int = "4Mi"
    management: RuntimeManagement = RuntimeManagement()
    autoscaling: AutoscalingPolicy | None = None


class Runtime(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    metadata: ObjectMeta
    spec: RuntimeSpec = RuntimeSpec()


RuntimePhase = Literal["NotReady", "PartialReady", "Ready"]


class CacheWorker(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """An agent picked to hold the runtime's cache. The ring of block owners is the ready workers."""

    node: str
    # False while the agent misses heartbeats: it stays picked (its disk cache is kept) but leaves the ring.
    ready: bool = True
    # The peer endpoint of the node's mount of the dataset (``MountReport.peer_url``).
    peer_url: str = ""
    # The node's agent serves peers (its heartbeat names a ``peerHost``): its mount gets a ``peer_url`` once it
    # serves. A ready worker that serves peers without one is starting (just after a restart), not one of a runtime
    # without a peer server (a single agent without a peer secret), where no worker ever has one. False: records
    # written before this field, and agents before ``peerHost``.
    serves_peers: bool = False
    # Epoch seconds since which the node's heartbeats say unhealthy (0: healthy). Kept from status to status, so a
    # worker unhealthy for longer than the grace period is replaced by a healthy spare, a blip is not.
    unhealthy_since: float = 0.0


def ring_nodes(workers: list[CacheWorker]) -> list[str]:
    """The ring of block owners: the ready workers that serve peers (a ``peer_url``), whose tiers the runtime's
    ``cacheCapacity`` counts; [] without one (no peer server), where each ready node caches what it reads and the
    capacity counts every ready node."""
    return [worker.node for worker in workers if worker.ready and worker.peer_url]


def held_capacity(node_bytes: int, ring: Collection[str], holders: Iterable[str]) -> int:
    """``cacheCapacity`` with a ring, the same figure for the Runtime and its Dataset: one node's tiers
    (``node_bytes``) for each member of the ``ring`` and for each node out of it that still holds blocks of the
    dataset (``holders``: the nodes whose ``cachedBytes`` is above 0; a worker after a scale-down keeps its blocks
    and reads them locally, and ``cached`` counts them). Without it ``cached`` could exceed the capacity."""
    return node_bytes * (len(ring) + len(set(holders).difference(ring)))


class WorkerReplaced(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """A cache worker that was replaced by a spare agent, and why (it stayed unhealthy past the grace period)."""

    node: str
    by: str
    reason: str
    time: str = ""


class NotPicked(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An agent serving the runtime that is not one of its cache workers, and why."""

    node: str
    reason: str


class FailingNode(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A node the ``ReadsFailing`` message names: its latest failed read's errno and reason."""

    node: str
    errno: str
    reason: str = ""


class ReadsFailingShown(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """What the ``ReadsFailing`` message was last written from: the nodes it names (three at most), how many nodes
    failed in all, and when (epoch seconds, the runtime service's clock). The message is written again at once when
    these or the condition's reason change, else at most once a minute: its counts and times move at every
    heartbeat, and each write is a status write, a fact and a dataset record write."""

    nodes: list[FailingNode] = []
    failing: int = 0
    written_at: float = 0.0


class ScaleDecision(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """One change of replicas the autoscaler made, and why."""

    from_replicas: int
    to_replicas: int
    reason: str
    time: str = ""


AutoscaleAction = Literal["grow", "shrink", "hold"]


class AutoscalerDecision(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The autoscaler's latest decision, a change or a hold, and why; written when it changes, not at every look."""

    # Written again only for another action or reason, or another change of replicas: ``time`` is when it was first
    # so, and ``message`` says it as of then (the measures as they are now, within 15 s: ``cacheUsedPercent``,
    # ``hitRatioPercent``).
    action: AutoscaleAction
    # One word that stays while the cause does, as a condition's reason: Pressure, NoPressure, BelowMinReplicas,
    # AboveMaxReplicas (changes); AtMaxReplicas, NoSpareAgent, CoolingDown, CorrectionLanding, AtMinReplicas,
    # Settling (holds).
    reason: str
    message: str = ""
    time: str = ""


class AutoscalingStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """What the autoscaler last saw and did (kept in the record, so the cool-down survives a restart); a new
    decision is written at once, the measures and lastPressureTime alone at most every 15 s."""

    # The workers' cached bytes over their capacity, and the share of reads served by a cache between two looks
    # (None while nothing was read), as of the last write (``AUTOSCALE_WRITE_SECONDS`` in the runtime service).
    cache_used_percent: float = 0.0
    hit_ratio_percent: float | None = None
    # Epoch seconds of the last change of replicas and of the last pressure seen (growth wanted).
    last_scale_time: float = 0.0
    last_pressure_time: float = 0.0
    # The most recent decisions, newest last (at most AUTOSCALE_HISTORY).
    decisions: list[ScaleDecision] = []
    # The latest decision, a hold included (why it does not grow or shrink); None before the first look.
    last_decision: AutoscalerDecision | None = None
    # ``spec.replicas`` at the last look (None: not looked since this field). Replicas that differ at the next look,
    # other than by the autoscaler's own last decision landing, were changed by ``shoal scale`` or an apply: a change
    # of replicas, so the cool-down counts from it (the workers just picked were dropped again a second later).
    replicas: int | None = None


class RuntimeStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    phase: RuntimePhase = "NotReady"
    message: str = ""
    # The cache workers the runtime means to have: ``spec.replicas``, or 0 while it picks none by design (no
    # Dataset of its name, or its Dataset is a reference). ``shoal get runtimes`` shows READY as ready/desired.
    desired_worker_number_scheduled: int = 0
    worker_number_ready: int = 0
    ready_nodes: list[str] = []
    # The tiers of the ring's members (every serving node without a ring) and of the nodes out of the ring that
    # still hold blocks of the dataset (``held_capacity``): the Dataset's ``cacheCapacity`` is the same figure.
    cache_capacity: str = ""
    cache_capacity_bytes: int = 0
    block_size_bytes: int = 0
    conditions: list[Condition] = []
    current_worker_number_scheduled: int = 0
    # The cache workers in the order they were picked (kept while they exist: a worker is replaced only when
    # its agent is gone, no longer eligible, or unhealthy past the grace period while a healthy spare exists), and
    # the agents not picked with the reason.
    workers: list[CacheWorker] = []
    not_picked: list[NotPicked] = []
    # The workers replaced for staying unhealthy, newest last (the most recent few).
    replaced: list[WorkerReplaced] = []
    # Present when the spec has an autoscaling policy.
    autoscaling: AutoscalingStatus | None = None
    # Present while the ReadsFailing condition is: what its message was last written from.
    reads_failing: ReadsFailingShown | None = None
    # How many nodes are ready and how many serving agents are not workers. ``notPicked`` lists a few of the latter
    # (some of each reason), and a ``runtime.status.v1`` fact the first ``readyNodes``: one entry per agent made a
    # status larger than the event limit at a few thousand agents. The record in ``shoal_runtimes`` lists every
    # ready node (the loader plans and cleans on them).
    ready_node_count: int = 0
    not_picked_count: int = 0
    # One node's tiers (the sum of the tiers' quotas), which ``cacheCapacity`` counts per node: the dataset service
    # counts the holders out of the ring it sees before this service's next status (0: a status before the field).
    node_capacity_bytes: int = 0


class RuntimeApply(Event, frozen=True, kw_only=True, tag="runtime.apply.v1", rename="camel"):
    runtime: Runtime


class RuntimeDelete(Event, frozen=True, kw_only=True, tag="runtime.delete.v1", rename="camel"):
    name: str
    namespace: str = "default"


class RuntimeScale(Event, frozen=True, kw_only=True, tag="runtime.scale.v1", rename="camel"):
    """Set only ``spec.replicas`` of an existing runtime (``shoal scale``, the autoscaler).

    Not an apply of a whole spec read earlier: the service changes the runtime as it stands when it handles the
    command, so a spec applied after the sender looked (a new tier quota, say) is kept.
    """

    name: str
    namespace: str = "default"
    replicas: int


RuntimeCommand = RuntimeApply | RuntimeDelete | RuntimeScale


class RuntimeAccepted(Event, frozen=True, kw_only=True, tag="runtime.accepted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str
    generation: int
    result: ApplyResult = ""  # what the command did to the object (libs.events.common.ApplyResult)


class RuntimeRejected(Event, frozen=True, kw_only=True, tag="runtime.rejected.v1", rename="camel"):
    causation_id: str
    reason: str
    name: str = ""
    namespace: str = ""
    subject: str = ""
    # The command named an object that does not exist (any more): a delete, resync, scale or run of it. ``shoal
    # delete KIND --all`` passes over such an answer for an object deleted since it listed them, as kubectl does.
    not_found: bool = False


class RuntimeStatusChanged(Event, frozen=True, kw_only=True, tag="runtime.status.v1", rename="camel"):
    name: str
    namespace: str
    generation: int
    status: RuntimeStatus


class RuntimeDeleted(Event, frozen=True, kw_only=True, tag="runtime.deleted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str


class RuntimeAutoscaled(Event, frozen=True, kw_only=True, tag="runtime.autoscaled.v1", rename="camel"):
    """The autoscaler changed the runtime's replicas (through a ``runtime.scale.v1``, as ``shoal scale`` does)."""

    name: str
    namespace: str
    from_replicas: int
    to_replicas: int
    # Why, in words: the measure, the target and the bounds ("cache 91% used >= target 60% ...").
    reason: str
    cache_used_percent: float = 0.0
    hit_ratio_percent: float | None = None


RuntimeFact = RuntimeAccepted | RuntimeRejected | RuntimeStatusChanged | RuntimeDeleted | RuntimeAutoscaled


class RuntimeRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    runtime: Runtime
    generation: int
    status: RuntimeStatus = RuntimeStatus()
    # The commands stream's sequence of the last apply or scale that changed the spec (0: not known). An older one
    # delivered again later (the service was killed before acking it, and JetStream redelivers it after its ack
    # wait, behind newer commands) is stale: applying it would put an old spec back under a new generation.
    command_sequence: int = 0
    # What the apply at ``command_sequence`` answered (``libs.events.common.answered_result``): a redelivery of it
    # answers the same. "" in a record written before the field.
    command_result: ApplyResult = ""
