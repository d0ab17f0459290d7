"""Runtime decisions, pure: validation of the spec, the cache workers, and the runtime status computed from agent
heartbeats.

A node serves a runtime when its last heartbeat lists the runtime and is younger than three heartbeat
intervals, and counts as ready when that heartbeat also says healthy for it (a node unhealthy only because of other
datasets' mounts, say one whose cache directory is full, is healthy for this one: ``healthy``). The runtime is
Ready when the desired number of replicas are ready; PartialReady with fewer, as long as some node serves it (an
unhealthy node, whose mount keeps failing or whose cache directory is down, is named in the message with its first
problems, and keeps a Bound dataset Bound: its mounts may still serve reads); NotReady when no node serves it. The
``Mounted`` condition says whether every serving node that reports a mount of the runtime's dataset (same name) is
serving it, and names those that are not. The ``ReadsFailing`` condition is there while a serving node's mount reports
failed reads (ESTALE: the object changed since the sync; EIO: the store failed) within the last minute, naming
per node how many, the latest file, its reason and when; it goes once they stop or succeed again. Its counts and
times are written at most once a minute, its nodes and reasons at once (``reads_condition``). The ``TiersFit``
condition is False while the tier quotas fit no serving node's disk, so there is no cache worker
(``tiers_fit_condition``).

Cache workers (Fluid's workers; every other serving node is a client that mounts the dataset and reads through
them): ``replicas`` agents picked among those serving the runtime, honouring the Dataset's required
``nodeAffinity`` (``libs.affinity``) and ``placement`` (an Exclusive dataset's workers hold no other dataset's
cache, and an Exclusive dataset takes no worker of another). A runtime with no Dataset of its name picks none (it
would hold agents, Exclusive by default, for a dataset nobody can read), desires none, and says so. A shortfall
of workers the ready agents do not explain is named in the message with the first ready agent not picked and why.
Picks are sticky: a worker that misses heartbeats stays picked with ``ready: false`` (it leaves the ring of block
owners and comes back with its disk cache) and is replaced only when its agent's record is gone or it is no
longer eligible; a worker that beats but says unhealthy for ``UNHEALTHY_WORKER_GRACE_SECONDS`` is replaced by a
healthy spare if there is one (``status.replaced`` says so); new picks go in node-name order; scaling down drops
the workers out of the ring of block owners first, then the most recently picked. ``notPicked`` says why every
other serving agent is not a worker. A node that two agent processes beat as (one ``SHOAL_NODE_NAME`` given to
two agents) is no worker while they do, and for ``INSTANCE_CONFLICT_SECONDS`` after (``agent_record``,
``node_conflict``); meanwhile its record keeps one of them (the one it held when the second showed) while that one
beats, so what every service reads of the node does not switch between two hosts at every beat.

The elastic cache (``autoscale``): with ``spec.autoscaling``, replicas move between ``minReplicas`` and
``maxReplicas`` by themselves, judged from what the dataset service folded from the agents' inventory into the
Dataset's status (the workers' cached bytes, each node's read counters). One step at a time, at most one per
``coolDownSeconds``; growth while the dataset is read and the cache is too full or misses too much, shrinking after
a whole cool-down without such pressure. Its state is written when a decision changes, its measures alone at most
every ``AUTOSCALE_WRITE_SECONDS`` (``autoscaling_write_due``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from libs import affinity
from libs.events.agent import AgentHeartbeat, AgentRecord, TierDisk
from libs.events.common import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    dns_label_errors,
    format_bytes,
    parse_quantity,
    parse_rfc3339,
    rfc3339,
)
from libs.events.dataset import Condition, DatasetSpec, NodeCache, find_condition
from libs.events.runtime import (
    BLOCK_ALIGNMENT,
    CONDITION_DATASET,
    DEFAULT_HIGH_WATERMARK,
    DEFAULT_LOW_WATERMARK,
    MAX_BLOCK_SIZE,
    MAX_REPLICAS,
    MIN_BLOCK_SIZE,
    AutoscaleAction,
    AutoscalerDecision,
    AutoscalingPolicy,
    AutoscalingStatus,
    CacheWorker,
    FailingNode,
    Level,
    NotPicked,
    ReadsFailingShown,
    Runtime,
    RuntimePhase,
    RuntimeRecord,
    RuntimeStatus,
    ScaleDecision,
    WorkerReplaced,
    directory_quotas,
    held_capacity,
    ring_nodes,
)
from libs.hostpaths import cache_path_error, normal_path
from libs.references import is_reference_mount

MEDIUM_TYPES = ("MEM", "SSD", "HDD")
# Missing this many heartbeats in a row makes a node not ready.
MISSED_BEATS = 3
CONDITION_MOUNTED = "Mounted"
# True while a node's mount of the dataset reports failed reads (absent otherwise).
CONDITION_READS = "ReadsFailing"
# False while the tier quotas fit no serving node's disks, so there is no cache worker (absent otherwise).
CONDITION_TIERS_FIT = "TiersFit"
# Nodes a ReadsFailing or Mounted message names (the rest are counted): a status line, however many nodes fail.
READS_NODES_SHOWN = 3
# Agents not picked that ``status.notPicked`` lists, at most so many of one reason (node-name order), and how many
# in all (``notPickedCount`` counts them all): with thousands of agents, one entry each made the status larger than
# the event limit (SHOAL_MAX_EVENT_BYTES, 256 KiB), and thousands of "replicas already picked" hid the one reason
# that matters. Enough to say why, small in every fact.
NOT_PICKED_PER_REASON = 3
NOT_PICKED_SHOWN = 30
# Ready nodes a ``runtime.status.v1`` fact lists (``readyNodeCount`` counts them all): its consumers want the
# phase, capacity and conditions, and a name each for thousands of agents would pass the event limit. The record
# keeps them all: the loader plans a load without a ring, and a clean, on every ready node.
READY_NODES_IN_FACT = 100
# The ReadsFailing message's counts and times are brought up to date at most this often (its nodes and reasons at
# once): they move at every heartbeat of a failing node, and each change is a runtime status write, a fact and a
# dataset record write, every few seconds per failing runtime for as long as reads fail. A minute is also how long
# a file stays reported after its last failure (the agent's window).
READS_REFRESH_SECONDS = 60.0
# Unhealthy nodes the runtime's message names, and problems shown per node (the rest are counted): an agent sends up
# to 20 problems of a line each, so a store outage felt by a hundred nodes, each named with all of them in the
# message and in notPicked, made a status larger than the dataset service takes (SHOAL_MAX_EVENT_BYTES, 256 KiB).
UNHEALTHY_NODES_SHOWN = 3
PROBLEMS_SHOWN = 3
# A cache worker whose heartbeats say unhealthy this long is replaced by a healthy spare, if there is one. Long
# enough that a blip (a mount process restarted by its supervisor, a cache directory back after a moment) does not
# move the worker's blocks to another node and back; short next to a runtime left PartialReady for good.
UNHEALTHY_WORKER_GRACE_SECONDS = 30.0
# After a start, for this long a worker whose agent has no record keeps its seat (not ready): the records are
# written by this service only, so after an outage longer than their TTL (``libs.bus.AGENTS_TTL_SECONDS``) none is
# left, and the first beats read back would otherwise hand every seat to whichever agents beat first, moving the
# whole ring. One TTL is as long as a worker silent while the service runs keeps its seat.
AGENT_VIEW_SETTLING_SECONDS = 60.0
# How long another agent process that beat as a node is remembered, and how long the node stays flagged after
# the last beat that showed two (``node_conflict``): the agents' records' own lifetime (``libs.bus.
# AGENTS_TTL_SECONDS``), as long as a silent agent's record lasts. The flag ends on its own once only one process
# beat for that long (the other stopped, or was given its own name).
INSTANCE_CONFLICT_SECONDS = 60.0
# Other processes remembered per node (the most recent): far more than two agents sharing a name, and it bounds the
# record of a node whose agent restarts in a loop (a new instance at each start).
INSTANCES_REMEMBERED = 16
# A flagged node's ``conflict`` warning is logged at most this often (the runtime service, per node).
CONFLICT_LOG_SECONDS = 60.0
# Replacements kept in status.replaced (``shoal describe runtime`` shows them).
REPLACED_HISTORY = 10
# One tier on one node: more than any node's memory or disks today, so a larger quota is a typo (Pi for Gi),
# and it keeps byte totals summed over tiers and nodes far from overflowing 64-bit counters.
MAX_TIER_QUOTA = 2**50
MAX_TIER_QUOTA_TEXT = "1Pi"
# Kubernetes' longest node name (a DNS subdomain).
MAX_NODE_NAME = 253


def validate_ref(name: str, namespace: str) -> list[str]:
    """Why a command's name and namespace cannot name a runtime (delete, scale), or nothing."""
    return dns_label_errors(name, "name") + dns_label_errors(namespace, "namespace", DNS1123_LABEL)


def node_errors(node: str) -> list[str]:
    """Why a heartbeat's ``node`` cannot name an agent (a key of the agents bucket), or nothing. Kubernetes node
    names are DNS subdomains, dotted on EKS (``ip-10-0-1-23.ec2.internal``)."""
    if not node:
        return ["node is empty"]
    if len(node) > MAX_NODE_NAME or not DNS1123_SUBDOMAIN.fullmatch(node):
        return [f"node {node!r} is not a Kubernetes node name (a DNS-1123 subdomain of at most {MAX_NODE_NAME} "
                "characters: lower-case letters, digits, '-' and '.')"]
    return []


def missing_runtime(name: str, namespace: str) -> str:
    """The refusal of a command (delete, scale) naming a runtime that does not exist."""
    return f"runtime {namespace}/{name} does not exist"


def stale_apply(name: str, namespace: str, sequence: int, deleted: int) -> str | None:
    """Why an apply at stream ``sequence`` (0: unknown) of a runtime deleted by the command at ``deleted`` is not
    applied: the delete came after it, and is the last word."""
    if not 0 < sequence < deleted:
        return None
    return (f"runtime {namespace}/{name} was deleted by a later command (stream sequence {deleted}); this apply "
            f"(sequence {sequence}) came before it: apply it again to recreate")


def stale_delete(record: RuntimeRecord, sequence: int) -> str | None:
    """Why a delete at stream ``sequence`` (0: unknown) does not remove ``record``: the runtime was applied (or
    scaled) by a later command, which deleting now would undo."""
    if not 0 < sequence < record.command_sequence:
        return None
    meta = record.runtime.metadata
    return (f"runtime {meta.namespace}/{meta.name} was applied by a later command (stream sequence "
            f"{record.command_sequence}); this delete (sequence {sequence}) came before it: delete it again to "
            "remove it")


def replicas_errors(replicas: int) -> list[str]:
    """Why ``replicas`` cannot be a runtime's ``spec.replicas`` (an apply's or a scale's), or nothing."""
    if 0 <= replicas <= MAX_REPLICAS:
        return []
    return [f"spec.replicas must be between 0 and {MAX_REPLICAS}, got {replicas}"]


def scale_errors(runtime: Runtime, replicas: int) -> list[str]:
    """Why ``runtime`` cannot be scaled to ``replicas``: a worker of a runtime without a cache tier would hold
    nothing."""
    if replicas > 0 and not runtime.spec.tieredstore.levels:
        name = f"{runtime.metadata.namespace}/{runtime.metadata.name}"
        return [f"runtime {name} has no cache tier (spec.tieredstore.levels), so no cache worker: apply it with a "
                "tier to scale it above 0"]
    return []


def _fraction(value: str | float) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def validate_runtime(runtime: Runtime) -> list[str]:
    errors = dns_label_errors(runtime.metadata.name, "metadata.name")
    errors += dns_label_errors(runtime.metadata.namespace, "metadata.namespace", DNS1123_LABEL)
    spec = runtime.spec
    errors += replicas_errors(spec.replicas)
    if not spec.tieredstore.levels and (spec.replicas > 0 or spec.autoscaling is not None):
        errors.append("spec.tieredstore.levels must list at least one cache tier (MEM, SSD or HDD), unless "
                      "spec.replicas is 0 without autoscaling (a runtime that caches nothing, such as a reference "
                      "dataset's ThinRuntime)")
    block_size_errors: list[str] = []
    block_size: int | None = None
    try:
        block_size = parse_quantity(spec.block_size)
    except ValueError as err:
        block_size_errors.append(f"spec.blockSize: {err}")
    else:
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % BLOCK_ALIGNMENT:
            block_size_errors.append(
                f"spec.blockSize must be a multiple of 4Ki between 64Ki and 64Mi, got {spec.block_size!r}"
            )
            block_size = None
    seen_media: set[str] = set()
    # Each disk directory and where it was first given: two tiers in one directory scan and evict each other's
    # blocks (every restart deletes the cache: one tier's scan drops the other's as over its quota or as copies).
    directories: dict[str, str] = {}
    for index, level in enumerate(spec.tieredstore.levels):
        where = f"spec.tieredstore.levels[{index}]"
        if level.mediumtype not in MEDIUM_TYPES:
            errors.append(f"{where}.mediumtype {level.mediumtype!r} is unknown (use MEM, SSD or HDD)")
        elif level.mediumtype in seen_media:
            errors.append(f"{where}.mediumtype {level.mediumtype} appears twice")
        seen_media.add(level.mediumtype)
        quota: int | None = None
        try:
            quota = parse_quantity(level.quota)
            if quota <= 0 and level.quota_list and level.mediumtype in ("SSD", "HDD"):
                pass  # the sum of a quotaList of zeros (a Fluid tier's): ``_quota_list_shares`` names the list
            elif quota <= 0:
                errors.append(f"{where}.quota must be greater than 0")
                quota = None
            elif quota > MAX_TIER_QUOTA:
                errors.append(f"{where}.quota {level.quota!r} is more than {MAX_TIER_QUOTA_TEXT}, the most one tier "
                              "of one node may hold (a unit typo?)")
                quota = None
        except ValueError as err:
            errors.append(f"{where}.quota: {err}")
        high, low = _fraction(level.high), _fraction(level.low)
        if high is None or low is None:
            errors.append(f"{where}: high and low must be numbers, got high={level.high!r} low={level.low!r}")
            high = None
        elif not 0 < low < high <= 1:
            errors.append(f"{where}: watermarks must satisfy 0 < low < high <= 1, got low={low} high={high} "
                          f"(when not given, low is {DEFAULT_LOW_WATERMARK} and high {DEFAULT_HIGH_WATERMARK})")
            high = None
        # Stripped as the agent's cache strips them: the paths judged are the ones it will use.
        paths = level.directories
        folders = 1 if level.mediumtype == "MEM" else len(paths)
        shares = _quota_list_shares(where, level, quota, errors) if quota is not None and level.quota_list else None
        if shares is not None and high is not None and block_size is not None:
            for index_, share in enumerate(shares):
                if small := tier_quota_error(f"{where}.quotaList[{index_}]", level, share, high, spec.block_size,
                                             block_size, 1, quantity=level.quota_list.split(",")[index_].strip()):
                    errors.append(small)
        elif (quota is not None and high is not None and block_size is not None and folders and not level.quota_list
                and (small := tier_quota_error(where, level, quota, high, spec.block_size, block_size, folders))):
            errors.append(small)
        if level.mediumtype in ("SSD", "HDD"):
            if not paths:
                errors.append(f"{where}.path is required for {level.mediumtype} tiers")
            for path in paths:
                if not path.startswith("/") or ".." in path.split("/"):
                    errors.append(f"{where}.path {path!r} must be an absolute path without '..'")
                elif refused := cache_path_error(path):
                    errors.append(f"{where}.path {refused}")
                elif (first := directories.get(normal_path(path))) is not None:
                    errors.append(f"{where}.path {path!r} is already a directory of {first}: two tiers in one "
                                  "directory delete each other's blocks; give each its own")
                elif nested := _nested_directory(normal_path(path), directories):
                    errors.append(f"{where}.path {path!r} {nested}: a tier's cache folder would lie in another's, "
                                  "whose scans and frees take its blocks for their own; give each a directory apart")
                else:
                    directories[normal_path(path)] = f"{where}.path"
    errors += autoscaling_errors(spec.autoscaling, spec.management.metadata_sync_policy.period_seconds)
    return errors + block_size_errors


def _nested_directory(path: str, directories: dict[str, str]) -> str:
    """How ``path`` (normal) nests with a disk directory already given (``directories``: each with where it was
    given), or "" when it does not: a directory inside another, or holding one."""
    for other, where in directories.items():
        if path.startswith(other.rstrip("/") + "/"):
            return f"lies inside {other}, a directory of {where}"
        if other.startswith(path.rstrip("/") + "/"):
            return f"holds {other}, a directory of {where}"
    return ""


def _quota_list_shares(where: str, level: Level, quota: int, errors: list[str]) -> list[int] | None:
    """The per-directory quotas of a disk tier's ``quotaList`` (``directory_quotas``), or None with the reasons
    added to ``errors``: one positive quota per path, adding up to ``quota`` (which the agent reports as the tier's
    capacity; ``libs.documents`` writes both from a Fluid runtime's list)."""
    if level.mediumtype not in ("SSD", "HDD"):
        errors.append(f"{where}.quotaList is for disk tiers (SSD, HDD), one quota per path; a MEM tier has one quota")
        return None
    try:
        shares = [share for _, share in directory_quotas(level)]
    except ValueError as err:
        errors.append(f"{where}.{err}" if str(err).startswith("quotaList") else f"{where}.quotaList: {err}")
        return None
    if any(share <= 0 for share in shares):
        errors.append(f"{where}.quotaList {level.quota_list!r}: every quota must be greater than 0")
        return None
    if sum(shares) != quota:
        errors.append(f"{where}.quota {level.quota!r} must be the sum of quotaList {level.quota_list!r} "
                      f"({sum(shares)} bytes)")
        return None
    return shares


def smallest_tier_quota(block_size: int, high: float, directories: int = 1) -> int:
    """The smallest quota with which a tier of ``directories`` folders (each an equal share of the quota, as the
    agent's cache splits it) keeps one block of ``block_size`` bytes in each: a tier admits a block only below its
    high watermark, ``int(high * share)`` bytes (``services.agent.cache``)."""
    share = math.ceil(block_size / high)
    while int(high * share) < block_size:  # float rounding: never suggest a quota one byte short
        share += 1
    while share > 1 and int(high * (share - 1)) >= block_size:
        share -= 1
    return share * directories


def tier_quota_error(where: str, level: Level, quota: int, high: float, block_size_text: str | int,
                     block_size: int, directories: int, quantity: str | int | None = None) -> str | None:
    """Why a tier of ``quota`` bytes over ``directories`` folders can hold no whole block, or None. Such a tier
    caches nothing but a file's last, short block: every read of the rest goes to the store, and nothing else
    says so. ``quantity``: the text of one directory's own quota (an entry of ``quotaList``, which ``where``
    names), in place of the tier's ``quota``."""
    smallest = smallest_tier_quota(block_size, high, directories)
    if quota >= smallest:
        return None
    split = f", split equally between its {directories} directories" if directories > 1 else ""
    where, given = (f"{where}.quota", level.quota) if quantity is None else (where, quantity)
    return (f"{where} {given!r} is too small to hold one block of spec.blockSize {block_size_text!r}: "
            f"a tier keeps blocks below its high watermark ({high:g} of the quota{split}); give a quota of at least "
            f"{_quantity_up(smallest)} ({smallest} bytes), or a smaller blockSize")


def _quantity_up(size: int) -> str:
    """``size`` rounded up to a whole Ki, Mi or Gi, whichever is the largest unit not above it: a quota to write."""
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= factor:
            return f"{-(-size // factor)}{unit}"
    return str(size)


def change_errors(record: RuntimeRecord | None, runtime: Runtime, sequence: int = 0) -> list[str]:
    """Why ``runtime`` (valid; an apply at stream ``sequence``, 0: unknown) cannot replace the runtime ``record``
    holds: ``blockSize`` is fixed for a runtime's life, because every node's cache and every peer name blocks by
    index at that size. A stale apply (see ``apply_runtime``) is not applied, so it is not refused either."""
    if record is None or (sequence and sequence < record.command_sequence):
        return []
    before, after = record.runtime.spec.block_size, runtime.spec.block_size
    if parse_quantity(before) == parse_quantity(after):
        return []
    return [f"spec.blockSize cannot change ({before} -> {after}): the nodes' caches hold blocks cut at {before}; "
            "delete the runtime and apply it again to change it"]


def autoscaling_errors(policy: AutoscalingPolicy | None, period_seconds: int) -> list[str]:
    """Why ``spec.autoscaling`` or ``spec.management.metadataSyncPolicy.periodSeconds`` cannot be used."""
    errors = []
    if period_seconds < 0:
        errors.append(f"spec.management.metadataSyncPolicy.periodSeconds must be 0 (the service's default) or "
                      f"more, got {period_seconds}")
    if policy is None:
        return errors
    where = "spec.autoscaling"
    if not 0 <= policy.min_replicas <= policy.max_replicas <= MAX_REPLICAS or policy.max_replicas < 1:
        errors.append(f"{where} needs 0 <= minReplicas <= maxReplicas <= {MAX_REPLICAS} and maxReplicas >= 1, got "
                      f"minReplicas={policy.min_replicas} maxReplicas={policy.max_replicas}")
    if policy.target_cache_used_percent is None and policy.target_hit_ratio_percent is None:
        errors.append(f"{where} needs targetCacheUsedPercent or targetHitRatioPercent (or both): what should make "
                      "it grow")
    for name, value in (("targetCacheUsedPercent", policy.target_cache_used_percent),
                        ("targetHitRatioPercent", policy.target_hit_ratio_percent)):
        if value is not None and not 1 <= value <= 100:
            errors.append(f"{where}.{name} must be between 1 and 100, got {value}")
    if policy.cool_down_seconds < 1:
        errors.append(f"{where}.coolDownSeconds must be at least 1 (it keeps the autoscaler from flapping), got "
                      f"{policy.cool_down_seconds}")
    return errors


def apply_runtime(record: RuntimeRecord | None, runtime: Runtime, sequence: int = 0) -> tuple[RuntimeRecord, bool]:
    """The record once ``runtime`` (an apply at stream ``sequence``, 0: unknown) is applied, and whether it
    changed (to be saved). An apply older than the one the record holds is stale (redelivered after a crash): not
    applied. A newer one that changes nothing still moves ``command_sequence`` on (same generation): it is the
    user's last word, and an older command redelivered behind it is as stale as behind any other."""
    if record is None:
        return RuntimeRecord(runtime=runtime, generation=1, command_sequence=sequence), True
    if sequence and sequence < record.command_sequence:
        return record, False
    if record.runtime == runtime:
        if sequence > record.command_sequence:
            return msgspec.structs.replace(record, command_sequence=sequence), True
        return record, False
    if record.runtime.spec == runtime.spec:
        # Only labels or annotations changed (``kubectl label``, a GitOps tool's tracking annotation): kept, with
        # no new generation, as the dataset service and the loader keep theirs.
        return msgspec.structs.replace(record, runtime=runtime,
                                       command_sequence=max(sequence, record.command_sequence)), True
    return msgspec.structs.replace(record, runtime=runtime, generation=record.generation + 1,
                                   command_sequence=sequence), True


def node_capacity(runtime: Runtime) -> int:
    """Bytes of cache one node gives the runtime: the sum of its tier quotas."""
    return sum(parse_quantity(level.quota) for level in runtime.spec.tieredstore.levels)


def serves(beat: AgentHeartbeat, runtime: Runtime) -> bool:
    return beat.serves(runtime.metadata.namespace, runtime.metadata.name)


def is_fresh(agent: AgentRecord, now: float) -> bool:
    return now - agent.received_at <= MISSED_BEATS * agent.heartbeat.interval_seconds


def agent_record(current: AgentRecord | None, beat: AgentHeartbeat, received_at: float) -> AgentRecord:
    """The node's record after ``beat``, received at ``received_at`` (not older than ``current``'s).

    A beat from an instance that beat as the node before the current one (within ``INSTANCE_CONFLICT_SECONDS``)
    means two agent processes beat as one node: the record said one, then the other, and now the first again. A
    restart does not: its old instance never beats again. Every earlier instance is remembered, not only the one
    before the current, so three agents beating by turns are caught too. Agents before ``instance`` (empty) are
    neither remembered nor flagged."""
    instances: dict[str, float] = {}
    conflict_at = 0.0
    if current is not None:
        # A conflict over is no conflict: readers of the record (``libs.inventory.other_instance``) go by it.
        conflict_at = current.conflict_at if received_at - current.conflict_at <= INSTANCE_CONFLICT_SECONDS else 0.0
        instances = dict(current.instances)
        if current.heartbeat.instance and current.heartbeat.instance != beat.instance:
            instances[current.heartbeat.instance] = current.received_at
    instances = {instance: at for instance, at in instances.items() if received_at - at <= INSTANCE_CONFLICT_SECONDS}
    if instances.pop(beat.instance, None) is not None:
        conflict_at = received_at
    if current is not None and held(current, beat, conflict_at, received_at):
        # The record keeps the instance it holds: the other's beat only keeps the conflict on.
        instances[beat.instance] = received_at
        instances.pop(current.heartbeat.instance, None)
        recent = sorted(((at, instance) for instance, at in instances.items()), reverse=True)[:INSTANCES_REMEMBERED]
        return msgspec.structs.replace(current, instances={instance: at for at, instance in recent},
                                       conflict_at=conflict_at)
    recent = sorted(((at, instance) for instance, at in instances.items()), reverse=True)[:INSTANCES_REMEMBERED]
    return AgentRecord(heartbeat=beat, received_at=received_at, instances={instance: at for at, instance in recent},
                       conflict_at=conflict_at)


def held(current: AgentRecord, beat: AgentHeartbeat, conflict_at: float, received_at: float) -> bool:
    """Whether the node's record keeps ``current``'s agent process rather than take ``beat`` of another one: while
    two beat as the node (a conflict within ``INSTANCE_CONFLICT_SECONDS``), the record holds the one it showed when
    the second was seen for as long as that one stays fresh (``is_fresh``), and takes the other once it is not (it
    stopped). Before, the record took either one's beat by turns, and every service reading it (the scheduler's
    labels and mount states, the dataset service's view of the node) switched between two hosts at every beat. A
    restart is no conflict (its old instance never beats again), so its new instance is taken at once."""
    return (bool(current.heartbeat.instance) and bool(beat.instance) and beat.instance != current.heartbeat.instance
            and conflict_at > 0 and received_at - conflict_at <= INSTANCE_CONFLICT_SECONDS
            and is_fresh(current, received_at))


def node_conflict(record: AgentRecord, now: float) -> str | None:
    """Why the node is no cache worker while two agent processes beat as it (see ``agent_record``), or None. Its
    record holds either one's last beat by turns: labels, peer URL and health would switch between two hosts."""
    if not record.conflict_at or now - record.conflict_at > INSTANCE_CONFLICT_SECONDS:
        return None
    return f"two agents beat as node {record.heartbeat.node}: give each its own SHOAL_NODE_NAME"


def serving_agents(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[AgentHeartbeat]:
    """The last heartbeats of nodes that serve the runtime and beat recently, healthy or not, by node name."""
    serving = [agent.heartbeat for agent in agents if is_fresh(agent, now) and serves(agent.heartbeat, runtime)]
    return sorted(serving, key=lambda beat: beat.node)


def healthy(beat: AgentHeartbeat, runtime: Runtime) -> bool:
    """Whether the node is healthy for this runtime: an unhealthy node whose problems are all other datasets'
    mounts (a full or removed cache directory of theirs) still serves this one (``AgentHeartbeat.healthy_for``)."""
    return beat.healthy_for(runtime.metadata.namespace, runtime.metadata.name)


def ready_nodes(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[str]:
    return [beat.node for beat in serving_agents(runtime, agents, now) if healthy(beat, runtime)]


@dataclass(frozen=True)
class Placement:
    """What the runtime's Dataset (same name and namespace) says about where its cache workers may run."""

    # The Dataset's nodeAffinity as given (``libs.affinity`` reads its required terms).
    affinity: Mapping[str, Any] | None = None
    # Fluid's default: a worker holds the cache of one dataset only.
    exclusive: bool = True
    # The Dataset is a reference (``dataset://``, libs.references): its source's runtime caches it, so a runtime of
    # its name (a ThinRuntime from Fluid's older samples) picks no worker and takes no agent from anyone.
    reference: bool = False
    # False: there is no Dataset of the runtime's name (not applied yet, or deleted). The runtime picks no worker:
    # it would hold agents (Exclusive by default) for a cache nobody reads.
    found: bool = True


# One disk tier directory of a runtime with its quota: (index of its tier, directory as given, bytes).
DiskQuota = tuple[int, str, int]


@dataclass(frozen=True)
class OtherRuntime:
    """Another runtime's cache workers, for placement: an Exclusive one shares its workers with nobody."""

    key: str
    exclusive: bool
    workers: tuple[str, ...]
    # Its disk tier directories and their quotas (``disk_quotas``): they share its workers' disks with this one's.
    disk_quotas: tuple[DiskQuota, ...] = ()


def placement_of(dataset: DatasetSpec | None) -> Placement:
    if dataset is None:
        return Placement(found=False)
    return Placement(affinity=dataset.node_affinity, exclusive=dataset.placement != "Shared",
                     reference=any(is_reference_mount(mount) for mount in dataset.mounts))


def ineligible_reason(node: str, labels: Mapping[str, str], placement: Placement,
                      others: Iterable[OtherRuntime], worker: bool = False) -> str | None:
    """Why an agent may not be one of the runtime's cache workers, or None when it may. ``worker``: it is one
    already. An Exclusive runtime then keeps it though a Shared one uses it too (the runtime was Shared, its
    Dataset re-applied Exclusive): the Shared one lets it go (it is an Exclusive runtime's worker), whichever
    of the two looks first; letting the Exclusive one go instead would leave the dataset that asked for
    workers of its own with none."""
    if placement.reference:
        return "the dataset is a reference (dataset://): its source's runtime caches it"
    if (reason := affinity.mismatch(placement.affinity, node, labels)) is not None:
        return f"does not match nodeAffinity: {reason}"
    conflict = sharing_conflict(node, placement, others, worker)
    return conflict.reason if conflict is not None else None


def disk_quotas(runtime: Runtime) -> tuple[DiskQuota, ...]:
    """Each disk tier directory of the runtime with its quota (its share of the tier's, or its ``quotaList``
    entry), in tier order. A tier whose quotas cannot be read is left out (refused at apply)."""
    found: list[DiskQuota] = []
    for index, level in enumerate(runtime.spec.tieredstore.levels):
        if level.mediumtype == "MEM":
            continue
        try:
            found.extend((index, directory, quota) for directory, quota in directory_quotas(level))
        except ValueError:
            continue
    return tuple(found)


def _same_disk(disk: TierDisk | None, other: TierDisk) -> bool:
    """Whether ``disk`` is the file system of ``other``: the same directory, or the same device (0: unknown)."""
    return disk is not None and (disk.path == other.path or (disk.device != 0 and disk.device == other.device))


def disk_over(runtime: Runtime, beat: AgentHeartbeat, others: Iterable[OtherRuntime] = ()) -> str | None:
    """Why the node's disks cannot hold the runtime's tiers, or None: a disk tier directory whose quota, added to
    those of the other directories on the same file system (the runtime's own, and those of the other runtimes
    whose worker the node is: ``OtherRuntime.disk_quotas``), is more than the whole file system the node's agent
    reports under it (``AgentHeartbeat.tierDisks``; one device, ``TierDisk.device``). Not weighed for a directory
    the agent did not report or could not read."""
    disks = {disk.path: disk for disk in beat.tier_disks}
    mine = disk_quotas(runtime)
    theirs = [(other.key, quota) for other in sorted(others, key=lambda o: o.key) if beat.node in other.workers
              for quota in other.disk_quotas]
    for index, directory, quota in mine:
        disk = disks.get(normal_path(directory))
        if disk is None or disk.size_bytes <= 0:
            continue
        sharing = [(f"spec.tieredstore.levels[{i}]", path, bytes_) for i, path, bytes_ in mine
                   if (i, path) != (index, directory) and _same_disk(disks.get(normal_path(path)), disk)]
        sharing += [(f"runtime {key}, whose worker this node is", path, bytes_) for key, (_, path, bytes_) in theirs
                    if _same_disk(disks.get(normal_path(path)), disk)]
        total = quota + sum(bytes_ for _, _, bytes_ in sharing)
        if total <= disk.size_bytes:
            continue
        # The size alone: the free bytes move at every beat, and each change would be a status write and a fact.
        fs = f"({format_bytes(disk.size_bytes)})"
        given = f"spec.tieredstore.levels[{index}] gives {directory} a quota of {format_bytes(quota)}"
        if not sharing:
            return (f"{given}, more than its file system on this node {fs}: lower the quota, or give a larger "
                    "disk")
        shared = " and ".join(f"{path} ({who}, {format_bytes(bytes_)})" for who, path, bytes_ in sharing)
        return (f"{given}, on one file system with {shared}: {format_bytes(total)} in all, more than that file "
                f"system on this node {fs}: lower the quotas, or give them a larger disk or disks apart")
    return None


def disk_unseen(runtime: Runtime, beat: AgentHeartbeat) -> str | None:
    """Why the node is not picked yet: its agent reports every tier directory of the runtimes it serves
    (``AgentHeartbeat.tier_disks_complete``) but not one of this runtime's, so the runtime is newer than its last
    heartbeat (an agent serving every runtime serves it at once). Picked now, the node would be dropped at its next
    beat if its disk is too small: a mount started, then stopped. None when every one is reported, or the agent
    does not say it reports them all (an agent before it: not weighed)."""
    if not beat.tier_disks_complete:
        return None
    reported = {disk.path for disk in beat.tier_disks}
    unseen = [directory for _, directory, _ in disk_quotas(runtime) if normal_path(directory) not in reported]
    if not unseen:
        return None
    return (f"waiting for its agent to report the file system under {unseen[0]} (the runtime is newer than its last "
            "heartbeat)")


def tiers_fit_condition(runtime: Runtime, serving: Sequence[AgentHeartbeat], others: Iterable[OtherRuntime],
                        now: float) -> Condition | None:
    """``TiersFit`` False when the runtime's tier quotas fit no serving node's disks (``disk_over`` for every one),
    so it has no cache worker at all; its message names the first node's reason and the largest file system seen
    under the runtime's tier directories (the most a directory's quota can be). None otherwise, and with no serving
    node."""
    others = tuple(others)
    reasons = [(beat.node, disk_over(runtime, beat, others)) for beat in serving]
    if not reasons or any(reason is None for _, reason in reasons):
        return None
    directories = {normal_path(directory) for _, directory, _ in disk_quotas(runtime)}
    seen = sorted(((disk.size_bytes, beat.node, disk) for beat in serving for disk in beat.tier_disks
                   if disk.path in directories and disk.size_bytes > 0), key=lambda found: (-found[0], found[1]))
    node, reason = reasons[0]
    message = f"the tier quotas fit no node's disk, so no cache worker: {node}: {reason}"
    if seen:  # always, as a reason above weighed a reported disk
        size, where, disk = seen[0]
        message += (f"; the largest file system seen under this runtime's tier directories is {format_bytes(size)} "
                    f"({where}, {disk.path})")
    return Condition(type=CONDITION_TIERS_FIT, status="False", reason="QuotaOverDisk", message=message,
                     last_transition_time=rfc3339(now))


def quota_over_disk(runtime: Runtime, beat: AgentHeartbeat, others: Iterable[OtherRuntime] = (),
                    worker: bool = False) -> str | None:
    """Why the node's disks keep it from being the runtime's cache worker, or None: they cannot hold its tiers
    (``disk_over``); or, unless it is a worker already (``worker``: kept until the report comes), its agent has not
    reported them yet (``disk_unseen``). Such a tier fills the disk long before its watermarks evict: its writes
    then fail, and so do those of everything else on that disk."""
    return disk_over(runtime, beat, others) or (None if worker else disk_unseen(runtime, beat))


@dataclass(frozen=True)
class SharingConflict:
    """Exclusive placement keeps an agent from the runtime: it is ``other``'s worker, and ``other`` (when
    ``other_exclusive``) or this dataset (when ``this_exclusive``) shares its workers with nobody."""

    other: str
    other_exclusive: bool
    this_exclusive: bool

    @property
    def reason(self) -> str:
        # The notPicked entry stays short: the message says what to change (``exclusive_fix``).
        if self.other_exclusive:
            return f"worker of {self.other} (Exclusive)"
        return f"worker of {self.other}, and this dataset is Exclusive"


def sharing_conflict(node: str, placement: Placement, others: Iterable[OtherRuntime],
                     worker: bool = False) -> SharingConflict | None:
    """Whether Exclusive placement keeps the agent on ``node`` from the runtime (``worker``: see
    ``ineligible_reason``)."""
    for other in sorted(others, key=lambda o: o.key):
        if node in other.workers:
            if other.exclusive:
                return SharingConflict(other.key, True, placement.exclusive)
            if placement.exclusive and not worker:
                return SharingConflict(other.key, False, True)
    return None


def exclusive_fix(this: str, conflicts: Sequence[SharingConflict]) -> str:
    """What to change when Exclusive placement is why ready agents are no cache workers: more agents, or
    ``placement: Shared`` on each Dataset whose Exclusive placement stands in the way (both must be Shared for
    two datasets to share an agent)."""
    if not conflicts:
        return ""
    datasets = sorted({conflict.other for conflict in conflicts if conflict.other_exclusive}
                      | ({this} if any(conflict.this_exclusive for conflict in conflicts) else set()))
    return (f"Exclusive placement keeps {len(conflicts)} ready agent(s) from this runtime: run more agents, or set "
            f"placement: Shared on Dataset {', '.join(datasets)}")


# Why no agent is picked while ``spec.replicas`` is 0 (scaled to zero): every node reads from the store.
NO_REPLICAS = "replicas is 0: no cache workers"
# The status message of such a runtime, Ready all the same (its nodes mount the dataset).
NO_WORKERS = "spec.replicas is 0: no cache workers, so every node reads from the store itself"


def missing_dataset(runtime: Runtime) -> str:
    meta = runtime.metadata
    return f"no Dataset {meta.namespace}/{meta.name}"


def problems_text(beat: AgentHeartbeat, runtime: Runtime) -> str:
    """The first ``PROBLEMS_SHOWN`` problems of the node that concern the runtime, the rest counted."""
    problems = beat.problems_for(runtime.metadata.namespace, runtime.metadata.name)
    shown, more = problems[:PROBLEMS_SHOWN], len(problems) - PROBLEMS_SHOWN
    return "; ".join([*shown, f"and {more} more problem(s)"] if more > 0 else shown) or "no reason given"


@dataclass(frozen=True)
class Picks:
    """The runtime's cache workers in pick order, the serving agents not picked with the reason, and the workers
    replaced this time for staying unhealthy."""

    workers: list[str]
    not_picked: list[NotPicked]
    replaced: list[WorkerReplaced]


def choose_workers(runtime: Runtime, current: Sequence[CacheWorker], agents: Mapping[str, AgentRecord], now: float,
                   placement: Placement = Placement(), others: Iterable[OtherRuntime] = (),
                   keep_absent: bool = False) -> Picks:
    """The runtime's cache workers, pure.

    None while the runtime has no Dataset of its name. Sticky: a current worker stays while its agent's record
    exists (silent or not: it comes back with its disk cache), still serves the runtime, and is still eligible
    (and not flagged for two agents beating as its node, ``node_conflict``: its seat goes to a spare);
    with ``keep_absent`` (the agents' view is still settling after a restart, see ``AGENT_VIEW_SETTLING_SECONDS``)
    one without a record stays too. Scaling down drops the workers out of the ring first (silent, unhealthy, no
    record, or no serving mount: they hold no block the ring reads), then the most recently picked. One whose
    fresh heartbeats have said unhealthy for
    ``UNHEALTHY_WORKER_GRACE_SECONDS`` (``CacheWorker.unhealthy_since``) gives its seat to a spare (fresh, healthy,
    eligible) once the empty seats are filled, and stays when there is none: a degraded worker still holds blocks.
    The rest are filled from fresh, healthy, eligible agents in name order, up to ``spec.replicas``; a worker
    that is healthy again is an ordinary candidate then, and a full, healthy set is kept as it is.
    """
    others = list(others)
    replicas = max(runtime.spec.replicas, 0)
    missing = None if placement.found else missing_dataset(runtime)
    reasons: dict[str, str | None] = {}
    current_nodes = {worker.node for worker in current}

    def reason_for(node: str) -> str | None:
        if node not in reasons:
            beat = agents[node].heartbeat
            reasons[node] = (missing or node_conflict(agents[node], now)
                             or ineligible_reason(node, beat.labels, placement, others, node in current_nodes)
                             or quota_over_disk(runtime, beat, others, node in current_nodes))
        return reasons[node]

    # Whether a worker has no record to judge it by, and is kept all the same (see ``keep_absent``).
    absent_kept = keep_absent and missing is None and not placement.reference
    kept = [worker.node for worker in current
            if (worker.node not in agents and absent_kept)
            or (worker.node in agents and serves(agents[worker.node].heartbeat, runtime)
                and reason_for(worker.node) is None)]
    kept = list(dict.fromkeys(kept))
    if len(kept) > replicas:
        # Out of the ring first (stable sort: pick order within each kind), then the most recently picked.
        ring = [node for node in kept if node in agents and in_ring(runtime, agents[node], now)]
        out = [node for node in kept if node not in ring]
        kept = [node for node in kept if node in (ring + out)[:replicas]]
    picked = kept
    since = {worker.node: worker.unhealthy_since for worker in current}
    overdue = [node for node in picked
               if node in agents and is_fresh(agents[node], now) and not healthy(agents[node].heartbeat, runtime)
               and since.get(node) and now - since[node] >= UNHEALTHY_WORKER_GRACE_SECONDS]
    spares = [node for node in sorted(agents)
              if node not in picked and is_fresh(agents[node], now) and serves(agents[node].heartbeat, runtime)
              and healthy(agents[node].heartbeat, runtime) and reason_for(node) is None]
    # Spares fill empty seats first (an unhealthy worker kept beats no worker); the rest replace overdue workers
    # while they last, and are the ones the name-order fill below picks after the empty seats.
    stamp = rfc3339(now)
    replaced: list[WorkerReplaced] = []
    for node, spare in zip(overdue, spares[max(replicas - len(picked), 0):], strict=False):
        why = f"unhealthy for {now - since[node]:.0f} s ({problems_text(agents[node].heartbeat, runtime)})"
        replaced.append(WorkerReplaced(node=node, by=spare, reason=why, time=stamp))
    replaced_nodes = {replacement.node: replacement for replacement in replaced}
    picked = [node for node in picked if node not in replaced_nodes]
    not_picked: list[NotPicked] = []
    for node in sorted(agents):
        record = agents[node]
        beat = record.heartbeat
        if node in picked or not is_fresh(record, now) or not serves(beat, runtime):
            continue
        reason = reason_for(node)
        if reason is None and node in replaced_nodes:
            replacement = replaced_nodes[node]
            reason = f"{replacement.reason}: replaced by {replacement.by}"
        if reason is None and not healthy(beat, runtime):
            reason = f"unhealthy ({problems_text(beat, runtime)})"
        if reason is None and len(picked) >= replicas:
            # "0 of 0 replicas already picked" read as a fault; at 0 there is simply no seat to give.
            reason = f"{len(picked)} of {replicas} replicas already picked" if replicas else NO_REPLICAS
        if reason is None:
            picked.append(node)
        else:
            not_picked.append(NotPicked(node=node, reason=reason))
    return Picks(picked, not_picked, replaced)


def in_ring(runtime: Runtime, record: AgentRecord, now: float) -> bool:
    """Whether a worker with this last heartbeat is one of the ring's block owners: ready (fresh, healthy) and
    serving the dataset's mount with a peer URL."""
    meta = runtime.metadata
    report = record.heartbeat.mount_of(meta.namespace, meta.name)
    return (is_fresh(record, now) and healthy(record.heartbeat, runtime) and report is not None
            and report.state == "Serving" and bool(report.peer_url))


def pick_workers(runtime: Runtime, current: Sequence[CacheWorker], agents: Mapping[str, AgentRecord], now: float,
                 placement: Placement = Placement(), others: Iterable[OtherRuntime] = (),
                 keep_absent: bool = False) -> tuple[list[str], list[NotPicked]]:
    """The runtime's cache workers in pick order, and the serving agents not picked with the reason (see
    ``choose_workers``)."""
    picks = choose_workers(runtime, current, agents, now, placement, others, keep_absent)
    return picks.workers, picks.not_picked


def can_add_worker(runtime: Runtime, current: Sequence[CacheWorker], agents: Mapping[str, AgentRecord], now: float,
                   placement: Placement = Placement(), others: Iterable[OtherRuntime] = (),
                   keep_absent: bool = False) -> bool:
    """Whether one more replica would get a worker: a fresh, healthy, eligible agent not picked yet. Without one,
    growing leaves the replicas unfilled (the runtime PartialReady) and the cache as it was."""
    grown = msgspec.structs.replace(runtime.spec, replicas=max(runtime.spec.replicas, 0) + 1)
    picked, _ = pick_workers(msgspec.structs.replace(runtime, spec=grown), current, agents, now, placement, others,
                             keep_absent)
    return len(picked) == grown.replicas


def worker_status(runtime: Runtime, nodes: Iterable[str], agents: Mapping[str, AgentRecord],
                  now: float, current: Sequence[CacheWorker] = ()) -> list[CacheWorker]:
    """Each worker's readiness (a fresh, healthy heartbeat), the peer URL of its mount of the dataset, whether its
    agent serves peers (a ``peerHost`` in its heartbeat, or a peer URL from an agent that names none), and since
    when its heartbeats say unhealthy (kept from ``current``, the workers as last saved; from now when new)."""
    meta = runtime.metadata
    since = {worker.node: worker.unhealthy_since for worker in current}
    workers = []
    for node in nodes:
        record = agents.get(node)
        if record is None:  # kept while the agents' view settles (``keep_absent``): not ready, as when silent
            workers.append(CacheWorker(node=node, ready=False, unhealthy_since=since.get(node) or 0.0))
            continue
        beat = record.heartbeat
        report = beat.mount_of(meta.namespace, meta.name)
        peer_url = report.peer_url if report is not None and report.state == "Serving" else ""
        fine = healthy(beat, runtime)
        workers.append(CacheWorker(node=node, ready=is_fresh(record, now) and fine, peer_url=peer_url,
                                   serves_peers=bool(beat.peer_host or peer_url),
                                   unhealthy_since=0.0 if fine else since.get(node) or now))
    return workers


def runtime_status(record: RuntimeRecord, agents: Iterable[AgentRecord], now: float,
                   placement: Placement = Placement(), others: Iterable[OtherRuntime] = (),
                   keep_absent: bool = False, holders: Collection[str] = ()) -> RuntimeStatus:
    """The runtime's status: cache workers (sticky, see ``choose_workers``), those replaced, and the phase.

    The phase counts the nodes that can serve the dataset against ``replicas`` (an agent that is no cache
    worker still mounts the dataset and reads through the workers, or from the store when there are none), so a
    dataset on a node whose only agent holds another Exclusive dataset's cache still binds and mounts; a
    shortfall of cache workers is named in the message. With no Dataset of the runtime's name there are no cache
    workers, the message says so and the ``DatasetFound`` condition is False. ``keep_absent``: see
    ``choose_workers``. ``holders``: the nodes that hold blocks of the Dataset (its ``status.nodes``), whose tiers
    the capacity counts also out of the ring, as the Dataset's does (``held_capacity``).
    """
    runtime = record.runtime
    others = tuple(others)  # read twice: by the pick and by the shortfall's message
    by_node = {agent.heartbeat.node: agent for agent in agents}
    serving = serving_agents(runtime, by_node.values(), now)
    nodes = [beat.node for beat in serving if healthy(beat, runtime)]
    picks = choose_workers(runtime, record.status.workers, by_node, now, placement, others, keep_absent)
    workers = worker_status(runtime, picks.workers, by_node, now, record.status.workers)
    ready_workers = [worker for worker in workers if worker.ready]
    sick = [beat for beat in serving if not healthy(beat, runtime)]
    unhealthy = [f"{beat.node} unhealthy ({problems_text(beat, runtime)})" for beat in sick[:UNHEALTHY_NODES_SHOWN]]
    if len(sick) > UNHEALTHY_NODES_SHOWN:
        unhealthy.append(f"and {len(sick) - UNHEALTHY_NODES_SHOWN} more unhealthy node(s)")
    desired = runtime.spec.replicas
    # The workers it means to have: none when it picks none by design (no Dataset of its name, or a reference),
    # so READY reads 0/0 beside a phase that counts the agents, not 0/1.
    desired_workers = desired if placement.found and not placement.reference else 0
    phase: RuntimePhase
    if nodes and len(nodes) >= desired:
        phase, message = "Ready", ""
    elif serving:
        ready = f"{len(nodes)} of {desired} agents ready"
        if len(serving) < desired:  # no agent will ever make up the rest: say what to change
            few = "1 agent serves" if len(serving) == 1 else f"{len(serving)} agents serve"
            ready += f": only {few} this runtime; lower spec.replicas to {len(serving)}, or run more agents"
        phase, message = "PartialReady", "; ".join([ready, *unhealthy])
    else:
        phase, message = "NotReady", f"0 of {desired} agents ready: waiting for agent heartbeats"
    fits = tiers_fit_condition(runtime, serving, others, now) if desired_workers and not workers else None
    # Fewer ready workers than the ready agents could give: not for want of agents, so the message says why.
    if fits is not None:
        message = f"{message}; {fits.message}" if message else fits.message
    elif len(ready_workers) < min(len(nodes), desired_workers):
        shortfall = worker_shortfall(runtime, len(ready_workers), desired_workers, picks.not_picked, nodes,
                                     [w.node for w in workers if not w.ready], by_node, now)
        # The reason names the cause; what to change when it is Exclusive placement is said once, here.
        ready_nodes = set(nodes)
        conflicts = [conflict for entry in picks.not_picked if entry.node in ready_nodes
                     and (conflict := sharing_conflict(entry.node, placement, others)) is not None
                     and conflict.reason == entry.reason]
        fix = exclusive_fix(f"{runtime.metadata.namespace}/{runtime.metadata.name}", conflicts)
        shortfall = f"{shortfall}; {fix}" if fix else shortfall
        message = f"{message}; {shortfall}" if message else shortfall
    if desired_workers == 0 and placement.found and not placement.reference and nodes:
        # Ready and Mounted as in Fluid, which read as "cached": say that no worker caches for the others.
        message = f"{NO_WORKERS}; {message}" if message else NO_WORKERS
    missing = None
    if not placement.found:
        # The phase stays the agents' (as with an Exclusive shortfall): the dataset service binds a Dataset to a
        # Ready runtime, so one applied after its runtime binds at once. Only the workers wait for it.
        note = f"{missing_dataset(runtime)}: no cache workers until it is applied"
        message = f"{note}; {message}" if message else note
        missing = Condition(type=CONDITION_DATASET, status="False", reason="DatasetNotFound",
                            message=missing_dataset(runtime),
                            last_transition_time=rfc3339(now))
    # Blocks are cached by the ring's members when there is a ring, else by every node reading for itself.
    ring = ring_nodes(workers)
    per_node = node_capacity(runtime)
    capacity = held_capacity(per_node, ring, holders) if ring else per_node * len(nodes)
    mounted = mount_condition(runtime, serving, now)
    conditions = with_condition(record.status.conditions, CONDITION_MOUNTED, mounted)
    conditions = with_condition(conditions, CONDITION_DATASET, missing)
    conditions = with_condition(conditions, CONDITION_TIERS_FIT, fits)
    reads, reads_shown = reads_condition(runtime, serving, now,
                                         find_condition(record.status.conditions, CONDITION_READS),
                                         record.status.reads_failing)
    conditions = with_condition(conditions, CONDITION_READS, reads)
    if mounted is not None and mounted.status == "False":
        message = f"{message}; {mounted.message}" if message else mounted.message
    return RuntimeStatus(
        phase=phase,
        message=message,
        desired_worker_number_scheduled=desired_workers,
        current_worker_number_scheduled=len(workers),
        worker_number_ready=len(ready_workers),
        ready_nodes=nodes,
        ready_node_count=len(nodes),
        cache_capacity=format_bytes(capacity),
        cache_capacity_bytes=capacity,
        node_capacity_bytes=per_node,
        block_size_bytes=parse_quantity(runtime.spec.block_size),
        conditions=conditions,
        workers=workers,
        not_picked=shown_not_picked(picks.not_picked),
        not_picked_count=len(picks.not_picked),
        replaced=[*record.status.replaced, *picks.replaced][-REPLACED_HISTORY:],
        # The autoscaler's state is its own (``autoscale``), kept while the spec has a policy.
        autoscaling=record.status.autoscaling if runtime.spec.autoscaling is not None else None,
        reads_failing=reads_shown,
    )


def worker_shortfall(runtime: Runtime, ready: int, desired: int, not_picked: Sequence[NotPicked],
                     nodes: Sequence[str], not_ready: Sequence[str] = (),
                     agents: Mapping[str, AgentRecord] | None = None, now: float = 0.0) -> str:
    """``1 of 2 cache workers ready (node-b: a worker with no heartbeat since 2026-12-06T17:00:06Z; node-c: worker
    of default/demo (Exclusive); see notPicked)``: the first worker picked but not ready, and the first ready agent
    not picked, with why. Naming only the agent not picked, as before, blamed it for a seat a silent worker holds.
    The worker's part changes only when what it says does (no counting seconds): each change is a status write."""
    parts = []
    if not_ready:
        node = not_ready[0]
        record = (agents or {}).get(node)
        if record is None:
            state = "a worker without an agent record (it keeps its seat while the agents' view settles)"
        elif not is_fresh(record, now):
            state = f"a worker with no heartbeat since {rfc3339(record.received_at)}"
        else:
            state = f"a worker, unhealthy ({problems_text(record.heartbeat, runtime)})"
        more = f" (and {len(not_ready) - 1} more worker(s) not ready)" if len(not_ready) > 1 else ""
        parts.append(f"{node}: {state}{more}")
    ready_nodes = set(nodes)
    first = next((entry for entry in not_picked if entry.node in ready_nodes), None)
    if first is not None:
        parts.append(f"{first.node}: {first.reason}; see notPicked")
    why = "; ".join(parts) if parts else "see notPicked"
    return f"{ready} of {desired} cache workers ready ({why})"


def shown_not_picked(not_picked: Sequence[NotPicked]) -> list[NotPicked]:
    """The agents not picked that the status lists: up to ``NOT_PICKED_PER_REASON`` of each reason, in the order
    given (node names), ``NOT_PICKED_SHOWN`` at most."""
    per_reason: dict[str, int] = {}
    shown: list[NotPicked] = []
    for entry in not_picked:
        if len(shown) == NOT_PICKED_SHOWN:
            break
        if per_reason.get(entry.reason, 0) < NOT_PICKED_PER_REASON:
            per_reason[entry.reason] = per_reason.get(entry.reason, 0) + 1
            shown.append(entry)
    return shown


def fact_status(status: RuntimeStatus) -> RuntimeStatus:
    """The status as a ``runtime.status.v1`` fact carries it: the first ``READY_NODES_IN_FACT`` ready nodes
    (``readyNodeCount`` says how many), so the fact stays under the event limit whatever the number of agents."""
    if len(status.ready_nodes) <= READY_NODES_IN_FACT:
        return status
    return msgspec.structs.replace(status, ready_nodes=status.ready_nodes[:READY_NODES_IN_FACT])


def mount_condition(runtime: Runtime, serving: Iterable[AgentHeartbeat], now: float) -> Condition | None:
    """``Mounted``: True when every node reporting the dataset's mount serves it; None when none reports it."""
    meta = runtime.metadata
    reports = sorted((beat.node, report) for beat in serving
                     if (report := beat.mount_of(meta.namespace, meta.name)) is not None)
    if not reports:
        return None
    stamp = rfc3339(now)
    failing = [(node, report) for node, report in reports if report.state != "Serving"]
    if not failing:
        return Condition(type=CONDITION_MOUNTED, status="True", reason="Serving",
                         message=f"mounted on {len(reports)} node(s)", last_transition_time=stamp)
    reason = "MountFailing" if any(report.state == "Failing" for _, report in failing) else "MountStarting"
    # Failing nodes first, so those named show why the reason is MountFailing.
    failing.sort(key=lambda pair: (pair[1].state != "Failing", pair[0]))
    parts = [f"{node}: {report.message or report.state}" for node, report in failing[:READS_NODES_SHOWN]]
    if len(failing) > READS_NODES_SHOWN:
        parts.append(f"and {len(failing) - READS_NODES_SHOWN} more node(s)")
    message = "not serving on " + "; ".join(parts)
    return Condition(type=CONDITION_MOUNTED, status="False", reason=reason, message=message,
                     last_transition_time=stamp)


def reads_condition(runtime: Runtime, serving: Iterable[AgentHeartbeat], now: float, old: Condition | None = None,
                    shown: ReadsFailingShown | None = None) -> tuple[Condition | None, ReadsFailingShown | None]:
    """``ReadsFailing``: True while a serving node reports failed reads of the dataset's mount, with per node the
    failed reads of its listed files since the first, and the latest one's file, errno, reason and time (reason
    ``ObjectChanged`` when a file read ESTALE: resyncing the dataset is the cure; else ``StoreError``); None when
    no node reports any. With it, what its message was written from (``status.readsFailing``).

    The ``old`` condition, written from ``shown``, is kept as it is while the nodes named, how many nodes fail,
    each named node's latest errno and reason, and the condition's reason are the same, for
    ``READS_REFRESH_SECONDS`` after it was written: only its counts and times would change, at every heartbeat."""
    meta = runtime.metadata
    failing = sorted((beat.node, files) for beat in serving
                     if (files := beat.read_failures_of(meta.namespace, meta.name)))
    if not failing:
        return None, None
    named = [(node, files, max(files, key=lambda failure: failure.at)) for node, files in failing[:READS_NODES_SHOWN]]
    changed = any(failure.errno == "ESTALE" for _, files in failing for failure in files)
    reason = "ObjectChanged" if changed else "StoreError"
    now_shown = ReadsFailingShown(nodes=[FailingNode(node=node, errno=last.errno, reason=last.reason)
                                         for node, _, last in named],
                                  failing=len(failing), written_at=now)
    if old is not None and shown is not None and old.status == "True" and old.reason == reason \
            and (shown.nodes, shown.failing) == (now_shown.nodes, now_shown.failing) \
            and 0 <= now - shown.written_at < READS_REFRESH_SECONDS:  # a clock set back refreshes it too
        return old, shown
    parts = []
    for node, files, last in named:
        count = sum(failure.count for failure in files)
        others = f" (and {len(files) - 1} other file(s))" if len(files) > 1 else ""
        parts.append(f"{node}: {count} failed read(s) since {rfc3339(min(f.since for f in files))}, the last at "
                     f"{rfc3339(last.at)} of {last.path!r}{others}: {last.errno}: {last.reason}")
    if len(failing) > READS_NODES_SHOWN:
        parts.append(f"and {len(failing) - READS_NODES_SHOWN} more node(s)")
    return Condition(type=CONDITION_READS, status="True", reason=reason, message="; ".join(parts),
                     last_transition_time=rfc3339(now)), now_shown


def with_condition(conditions: list[Condition], kind: str, new: Condition | None) -> list[Condition]:
    """``conditions`` with the one of type ``kind`` replaced by ``new`` (removed if None); the transition time is
    kept while the status stays the same, so a repeated report does not count as a change."""
    old = find_condition(conditions, kind)
    kept = [c for c in conditions if c.type != kind]
    if new is None:
        return kept
    if old is not None and old.status == new.status:
        new = msgspec.structs.replace(new, last_transition_time=old.last_transition_time)
    return [*kept, new]


# --- The elastic cache ---

# Decisions kept in status.autoscaling.decisions (``shoal describe runtime`` shows them); each is also a fact.
AUTOSCALE_HISTORY = 10
# A correction back within [minReplicas, maxReplicas] is not sent again for this long while the replicas still
# show the old value (its scale command is on its way); after it, it is sent again in case it was lost.
CORRECTION_LANDS_SECONDS = 10.0
# Why the autoscaler decided as it did (``status.autoscaling.lastDecision.reason``): changes of replicas...
PRESSURE, NO_PRESSURE, BELOW_MIN, ABOVE_MAX = "Pressure", "NoPressure", "BelowMinReplicas", "AboveMaxReplicas"
# ... and holds, each saying what keeps it from changing them.
AT_MAX, NO_SPARE, COOLING_DOWN = "AtMaxReplicas", "NoSpareAgent", "CoolingDown"
CORRECTION_LANDING, AT_MIN, SETTLING = "CorrectionLanding", "AtMinReplicas", "Settling"
# The reasons of a look that saw no pressure, within the bounds: any other may be a pressure still going on.
CALM = frozenset({NO_PRESSURE, AT_MIN, SETTLING})
# While the dataset is read, the measures (cacheUsedPercent, hitRatioPercent) and lastPressureTime move at nearly
# every look: written each time, they were a record write and a runtime.status.v1 fact a second per autoscaled
# runtime, for the bridge's status writes to Kubernetes, the dataset service and every watcher. So they are written
# at most this often, a new decision at once: measures 15 s old still say how the cache does (a cool-down is 300 s
# by default), and the decisions are taken from the autoscaler's memory, not from the record (after a restart,
# ``autoscaling_resumed``).
AUTOSCALE_WRITE_SECONDS = 15.0
# Per node: bytes read from a cache (own tiers or a peer) and from the store, since its mount process started.
# A DataLoad's store fetches (``NodeCache.loaded_bytes``) are not among them: what readers did is the pressure,
# and warming a dataset is no read of it.
ReadCounters = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class CacheSample:
    """The runtime's cache at one look, from its Dataset's status (folded by the dataset service from inventory)."""

    cached_bytes: int
    capacity_bytes: int
    reads: ReadCounters
    # Whether an agent could become one more worker (``can_add_worker``): growing without one changes nothing.
    spare: bool = True


def cache_sample(runtime: Runtime, status: RuntimeStatus, nodes: Sequence[NodeCache],
                 spare: bool = True) -> CacheSample:
    """The bytes cached on the current workers over their tiers' quota, and every node's read counters. With no
    worker (scaled to 0) every ready node caches for itself, so their caches are the ones measured: otherwise a
    runtime at 0 would read as an empty cache and never grow back on ``targetCacheUsedPercent``."""
    holders = {worker.node for worker in status.workers} or set(status.ready_nodes)
    return CacheSample(
        cached_bytes=sum(node.cached_bytes for node in nodes if node.node in holders),
        capacity_bytes=node_capacity(runtime) * len(holders),
        reads={node.node: (node.local_read_bytes + node.remote_read_bytes, node.store_read_bytes) for node in nodes},
        spare=spare,
    )


def read_window(previous: ReadCounters | None, current: ReadCounters) -> tuple[int, int]:
    """Cache and store bytes read since the previous look; a node whose counters went back (its mount process
    restarted) counts from zero. Nothing for the first look (no window yet), nor for a node the previous look did
    not see: its counters are its mount's since it started, perhaps long ago (a node whose figures came back after
    it was gone a while), and counted whole they would look like a burst of reads in one window."""
    if previous is None:
        return 0, 0
    hits = misses = 0
    for node, (hit, miss) in current.items():
        if node not in previous:
            continue
        before_hit, before_miss = previous[node]
        restarted = hit < before_hit or miss < before_miss
        hits += hit if restarted else hit - before_hit
        misses += miss if restarted else miss - before_miss
    return hits, misses


@dataclass(frozen=True)
class ScaleChoice:
    """What the autoscaler decided at one look: the replicas to have (the current ones when holding), why, and its
    state to keep (``status.autoscaling``, whose ``lastDecision`` says it too, once it differs from the last
    look's). ``decision`` is set when the replicas change."""

    replicas: int
    reason: str
    state: AutoscalingStatus
    decision: ScaleDecision | None = None


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def _decided(state: AutoscalingStatus, action: AutoscaleAction, reason: str, message: str, now: float,
             changed: bool = False) -> AutoscalingStatus:
    """``state`` with ``lastDecision`` set, unless it says this already (the same action for the same reason, and
    no new change of replicas): a hold kept for minutes is written once, not at every look, and its time says
    since when."""
    last = state.last_decision
    if not changed and last is not None and (last.action, last.reason) == (action, reason):
        return state
    return msgspec.structs.replace(state, last_decision=AutoscalerDecision(action=action, reason=reason,
                                                                           message=message, time=rfc3339(now)))


def autoscale(policy: AutoscalingPolicy, replicas: int, sample: CacheSample, previous: ReadCounters | None,
              state: AutoscalingStatus | None, now: float) -> ScaleChoice:
    """The elastic cache's decision, pure.

    - Outside ``[minReplicas, maxReplicas]`` (a re-applied spec): back to the nearest bound at once.
    - Pressure, while the dataset is read (bytes read since the previous look): the workers' cache is at least
      ``targetCacheUsedPercent`` full, or fewer than ``targetHitRatioPercent`` of the bytes read came from a
      cache. Pressure grows the workers by one, unless at ``maxReplicas``, with no agent to become that worker,
      or within ``coolDownSeconds`` of the last change (the new worker needs that long to join the ring and fill).
    - No pressure for ``coolDownSeconds`` (and as long since the last change): shrink by one, down to
      ``minReplicas``. A first look counts as pressure-free from then on, so a runtime is not shrunk at once.

    Each outcome has a reason word (``PRESSURE``, ``AT_MAX``, ...) kept with its words in ``lastDecision``.
    """
    state = state or AutoscalingStatus(last_pressure_time=now)
    # Replicas changed since the last look by someone else (``shoal scale``, an apply): as much a change as one of
    # its own, so the next step waits a cool-down. Before, a calm runtime scaled up by hand lost a worker a second
    # later (the one just picked), and one scaled down under pressure grew back at once.
    moved = outside_change(state, replicas)
    if moved:
        state = msgspec.structs.replace(state, last_scale_time=now)
    low, high, cool = policy.min_replicas, policy.max_replicas, policy.cool_down_seconds
    used = _percent(sample.cached_bytes, sample.capacity_bytes)
    hits, misses = read_window(previous, sample.reads)
    ratio = _percent(hits, hits + misses) if hits + misses else None
    measures = f"cache {used:.1f}% used" + (f", hit ratio {ratio:.1f}%" if ratio is not None else ", no reads")
    pressure = []
    if hits + misses and policy.target_cache_used_percent is not None and used >= policy.target_cache_used_percent:
        pressure.append(f"cache {used:.1f}% used >= target {policy.target_cache_used_percent}% while reading")
    if ratio is not None and policy.target_hit_ratio_percent is not None and ratio < policy.target_hit_ratio_percent:
        pressure.append(f"hit ratio {ratio:.1f}% < target {policy.target_hit_ratio_percent}%")
    seen = msgspec.structs.replace(state, cache_used_percent=used, hit_ratio_percent=ratio,
                                   last_pressure_time=now if pressure else state.last_pressure_time,
                                   replicas=replicas)
    since_scale = now - state.last_scale_time

    def change(to: int, why: str, code: str) -> ScaleChoice:
        reason = f"{why}: {replicas} -> {to} workers"
        decision = ScaleDecision(from_replicas=replicas, to_replicas=to, reason=reason,
                                 time=rfc3339(now))
        kept = [*seen.decisions, decision][-AUTOSCALE_HISTORY:]
        changed = msgspec.structs.replace(seen, last_scale_time=now, decisions=kept)
        action: AutoscaleAction = "grow" if to > replicas else "shrink"
        return ScaleChoice(to, reason, _decided(changed, action, code, reason, now, changed=True), decision)

    def hold(code: str, reason: str) -> ScaleChoice:
        if moved:  # said once, and the hold's times (the next shrink, the cool-down's end) written anew
            reason = f"replicas set to {replicas} (was {state.replicas}) by a scale or an apply; {reason}"
        return ScaleChoice(replicas, reason, _decided(seen, "hold", code, reason, now, changed=moved))

    def back_within(to: int, why: str, code: str) -> ScaleChoice:
        # No cool-down for a correction, but the one just sent is not sent again while it lands: the next look,
        # a second later, still sees the replicas out of bounds.
        last = seen.decisions[-1] if seen.decisions else None
        if last is not None and (last.from_replicas, last.to_replicas) == (replicas, to) \
                and since_scale < CORRECTION_LANDS_SECONDS:
            return hold(CORRECTION_LANDING,
                        f"{why}: the scale to {to} sent {since_scale:.0f} s ago has not landed yet")
        return change(to, why, code)

    if replicas < low:
        return back_within(low, f"below minReplicas {low}", BELOW_MIN)
    if replicas > high:
        return back_within(high, f"above maxReplicas {high}", ABOVE_MAX)
    if pressure:
        why = "; ".join(pressure)
        if replicas >= high:
            return hold(AT_MAX, f"{why}, but already at maxReplicas {high}")
        if not sample.spare:
            return hold(NO_SPARE, f"{why}, but no agent can become another worker (see notPicked)")
        if since_scale < cool:
            # The end as a time too: the words are kept while the hold lasts, and "N s more" alone goes stale.
            return hold(COOLING_DOWN, f"{why}; cooling down {cool - since_scale:.0f} s more, until "
                                      f"{rfc3339(state.last_scale_time + cool)}")
        return change(replicas + 1, f"grow: {why} (max {high})", PRESSURE)
    calm_since = max(state.last_pressure_time, state.last_scale_time)
    if replicas > low and now - calm_since >= cool:
        return change(replicas - 1, f"shrink: no pressure for {cool} s ({measures}; min {low})", NO_PRESSURE)
    if replicas > low:
        return hold(SETTLING, f"hold: {measures}; one worker fewer at {rfc3339(calm_since + cool)} if no pressure "
                              f"comes by then (min {low})")
    return hold(AT_MIN, f"hold: {measures}; at minReplicas {low}")


def outside_change(state: AutoscalingStatus, replicas: int) -> bool:
    """Whether ``replicas`` were changed since the look that left ``state`` by someone other than the autoscaler:
    they differ from the replicas it saw then, and its last decision (from those, to these) is not what landed."""
    if state.replicas is None or replicas == state.replicas:
        return False
    last = state.decisions[-1] if state.decisions else None
    return last is None or (last.from_replicas, last.to_replicas) != (state.replicas, replicas)


def autoscaling_write_due(written: AutoscalingStatus | None, state: AutoscalingStatus, written_at: float | None,
                          now: float) -> bool:
    """Whether the autoscaler's ``state`` is to be written over ``written``, the one in the record, written at
    ``written_at`` (None: not by this process). A decision (``lastDecision``, a change of replicas) at once;
    measures and ``lastPressureTime`` alone once ``AUTOSCALE_WRITE_SECONDS`` have passed since the last write.
    A hold under pressure that turns into a calm one less than ``AUTOSCALE_WRITE_SECONDS`` after it began waits as
    the measures do: a reader that pauses between batches makes every other look read nothing, and each such turn
    (and back) written at once was a record write, a fact and a Kubernetes status write a second. The record showing
    the pressure a little longer is the safe side: a restart counts it as going on (``autoscaling_resumed``), so no
    shrink comes early."""
    if state == written:
        return False
    if written is None or written_at is None:
        return True
    if now - written_at >= AUTOSCALE_WRITE_SECONDS:
        return True
    if (state.decisions, state.last_scale_time) != (written.decisions, written.last_scale_time):
        return True
    before, after = written.last_decision, state.last_decision
    if before is None or after is None:
        return before is not after
    if (before.action, before.reason) == (after.action, after.reason):
        return False  # the same hold again (back from a calm look not written): its words and time wait too
    calmed = before.action == after.action == "hold" and before.reason not in CALM and after.reason in CALM
    return not calmed or now - (parse_rfc3339(before.time) or 0.0) >= AUTOSCALE_WRITE_SECONDS


def autoscaling_resumed(state: AutoscalingStatus | None, now: float) -> AutoscalingStatus | None:
    """The state to go on from when the autoscaler's memory of it is gone (this service restarted): the record's.
    Its ``lastPressureTime`` may lag the last pressure seen by up to ``AUTOSCALE_WRITE_SECONDS`` (or more) unless
    its last decision saw none (``CALM``: a pressure after a calm hold is a new decision, written at once, so a calm
    hold in the record saw none since). So a pressure the record shows going on (perhaps ended since: the turn to
    calm is written late) counts as lasting until ``now``, the first look after the restart: the calm period starts
    again there, as at a first look, and a shrink never comes before a whole cool-down without pressure."""
    if state is None or state.last_decision is None or state.last_decision.reason in CALM:
        return state
    return msgspec.structs.replace(state, last_pressure_time=max(state.last_pressure_time, now))
