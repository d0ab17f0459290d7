"""Runtime decisions, pure: validation of the spec, the cache workers, and the runtime status computed from agent
heartbeats.

A node serves a runtime when its last heartbeat lists the runtime and is younger than three heartbeat
intervals, and counts as ready when that heartbeat also says healthy. The runtime is Ready when the desired
number of replicas are ready; PartialReady with fewer, as long as some node serves it (an unhealthy node, whose
mount keeps failing or whose cache directory is down, is named in the message with its problems, and keeps a
Bound dataset Bound: its mounts may still serve reads); NotReady when no node serves it. The ``Mounted``
condition says whether every serving node that reports a mount of the runtime's dataset (same name) is serving
it, and names those that are not.

Cache workers (Fluid's workers; every other serving node is a client that mounts the dataset and reads through
them): ``replicas`` agents picked among those serving the runtime, honouring the Dataset's required
``nodeAffinity`` (``libs.affinity``) and ``placement`` (an Exclusive dataset's workers hold no other dataset's
cache, and an Exclusive dataset takes no worker of another). Picks are sticky: a worker that misses heartbeats
stays picked with ``ready: false`` (it leaves the ring of block owners and comes back with its disk cache) and is
replaced only when its agent's record is gone or it is no longer eligible; new picks go in node-name order;
scaling down drops the most recently picked. ``notPicked`` says why every other serving agent is not a worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from libs import affinity
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import DNS1123_LABEL, dns_label_errors, format_bytes, parse_quantity
from libs.events.dataset import Condition, DatasetSpec
from libs.events.runtime import CacheWorker, NotPicked, Runtime, RuntimePhase, RuntimeRecord, RuntimeStatus
from libs.hostpaths import cache_path_error

MEDIUM_TYPES = ("MEM", "SSD", "HDD")
# Smaller blocks waste request overhead, larger ones waste cache and bandwidth on random reads.
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024
# Missing this many heartbeats in a row makes a node not ready.
MISSED_BEATS = 3
CONDITION_MOUNTED = "Mounted"
# A cluster of thousands of nodes is the most a single runtime is expected to span.
MAX_REPLICAS = 10_000
# One tier on one node: more than any node's memory or disks today, so a larger quota is a typo (Pi for Gi),
# and it keeps byte totals summed over tiers and nodes far from overflowing 64-bit counters.
MAX_TIER_QUOTA = 2**50
MAX_TIER_QUOTA_TEXT = "1Pi"


def validate_ref(name: str, namespace: str) -> list[str]:
    """Why a command's name and namespace cannot name a runtime (delete), or nothing."""
    return dns_label_errors(name, "name") + dns_label_errors(namespace, "namespace", DNS1123_LABEL)


def _fraction(value: str | float) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def validate_runtime(runtime: Runtime) -> list[str]:
    errors = dns_label_errors(runtime.metadata.name, "metadata.name")
    errors += dns_label_errors(runtime.metadata.namespace, "metadata.namespace", DNS1123_LABEL)
    spec = runtime.spec
    if not 0 <= spec.replicas <= MAX_REPLICAS:
        errors.append(f"spec.replicas must be between 0 and {MAX_REPLICAS}, got {spec.replicas}")
    if not spec.tieredstore.levels:
        errors.append("spec.tieredstore.levels must list at least one cache tier (MEM, SSD or HDD)")
    seen_media: set[str] = set()
    for index, level in enumerate(spec.tieredstore.levels):
        where = f"spec.tieredstore.levels[{index}]"
        if level.mediumtype not in MEDIUM_TYPES:
            errors.append(f"{where}.mediumtype {level.mediumtype!r} is unknown (use MEM, SSD or HDD)")
        elif level.mediumtype in seen_media:
            errors.append(f"{where}.mediumtype {level.mediumtype} appears twice")
        seen_media.add(level.mediumtype)
        try:
            quota = parse_quantity(level.quota)
            if quota <= 0:
                errors.append(f"{where}.quota must be greater than 0")
            elif quota > MAX_TIER_QUOTA:
                errors.append(f"{where}.quota {level.quota!r} is more than {MAX_TIER_QUOTA_TEXT}, the most one tier "
                              "of one node may hold (a unit typo?)")
        except ValueError as err:
            errors.append(f"{where}.quota: {err}")
        high, low = _fraction(level.high), _fraction(level.low)
        if high is None or low is None:
            errors.append(f"{where}: high and low must be numbers, got high={level.high!r} low={level.low!r}")
        elif not 0 < low < high <= 1:
            errors.append(f"{where}: watermarks must satisfy 0 < low < high <= 1, got low={low} high={high}")
        if level.mediumtype in ("SSD", "HDD"):
            paths = [p for p in level.path.split(",") if p]
            if not paths:
                errors.append(f"{where}.path is required for {level.mediumtype} tiers")
            for path in paths:
                if not path.startswith("/") or ".." in path.split("/"):
                    errors.append(f"{where}.path {path!r} must be an absolute path without '..'")
                elif refused := cache_path_error(path):
                    errors.append(f"{where}.path {refused}")
    try:
        block_size = parse_quantity(spec.block_size)
    except ValueError as err:
        errors.append(f"spec.blockSize: {err}")
    else:
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 4096:
            errors.append(
                f"spec.blockSize must be a multiple of 4Ki between 64Ki and 64Mi, got {spec.block_size!r}"
            )
    return errors


def apply_runtime(record: RuntimeRecord | None, runtime: Runtime, sequence: int = 0) -> tuple[RuntimeRecord, bool]:
    """The record once ``runtime`` (an apply at stream ``sequence``, 0: unknown) is applied, and whether it
    changed. An apply older than the one the record holds is stale (redelivered after a crash): not applied."""
    if record is None:
        return RuntimeRecord(runtime=runtime, generation=1, command_sequence=sequence), True
    if record.runtime == runtime or (sequence and sequence < record.command_sequence):
        return record, False
    return msgspec.structs.replace(record, runtime=runtime, generation=record.generation + 1,
                                   command_sequence=sequence), True


def node_capacity(runtime: Runtime) -> int:
    """Bytes of cache one node gives the runtime: the sum of its tier quotas."""
    return sum(parse_quantity(level.quota) for level in runtime.spec.tieredstore.levels)


def serves(beat: AgentHeartbeat, runtime: Runtime) -> bool:
    meta = runtime.metadata
    return any(ref.name == meta.name and ref.namespace == meta.namespace for ref in beat.runtimes)


def is_fresh(agent: AgentRecord, now: float) -> bool:
    return now - agent.received_at <= MISSED_BEATS * agent.heartbeat.interval_seconds


def serving_agents(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[AgentHeartbeat]:
    """The last heartbeats of nodes that serve the runtime and beat recently, healthy or not, by node name."""
    serving = [agent.heartbeat for agent in agents if is_fresh(agent, now) and serves(agent.heartbeat, runtime)]
    return sorted(serving, key=lambda beat: beat.node)


def ready_nodes(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[str]:
    return [beat.node for beat in serving_agents(runtime, agents, now) if beat.healthy]


@dataclass(frozen=True)
class Placement:
    """What the runtime's Dataset (same name and namespace) says about where its cache workers may run."""

    # The Dataset's nodeAffinity as given (``libs.affinity`` reads its required terms).
    affinity: Mapping[str, Any] | None = None
    # Fluid's default: a worker holds the cache of one dataset only.
    exclusive: bool = True


@dataclass(frozen=True)
class OtherRuntime:
    """Another runtime's cache workers, for placement: an Exclusive one shares its workers with nobody."""

    key: str
    exclusive: bool
    workers: tuple[str, ...]


def placement_of(dataset: DatasetSpec | None) -> Placement:
    if dataset is None:
        return Placement()
    return Placement(affinity=dataset.node_affinity, exclusive=dataset.placement != "Shared")


def ineligible_reason(node: str, labels: Mapping[str, str], placement: Placement,
                      others: Iterable[OtherRuntime]) -> str | None:
    """Why an agent may not be one of the runtime's cache workers, or None when it may."""
    if (reason := affinity.mismatch(placement.affinity, node, labels)) is not None:
        return f"does not match nodeAffinity: {reason}"
    for other in sorted(others, key=lambda o: o.key):
        if node in other.workers:
            if other.exclusive:
                return f"worker of {other.key} (Exclusive)"
            if placement.exclusive:
                return f"worker of {other.key}, and this dataset is Exclusive"
    return None


def pick_workers(runtime: Runtime, current: Sequence[CacheWorker], agents: Mapping[str, AgentRecord], now: float,
                 placement: Placement = Placement(),
                 others: Iterable[OtherRuntime] = ()) -> tuple[list[str], list[NotPicked]]:
    """The runtime's cache workers in pick order, and the serving agents not picked with the reason.

    Sticky: a current worker stays while its agent's record exists (silent or not: it comes back with its disk
    cache), still serves the runtime, and is still eligible; scaling down drops the most recently picked. The
    rest are filled from fresh, healthy, eligible agents in name order, up to ``spec.replicas``.
    """
    others = list(others)
    replicas = max(runtime.spec.replicas, 0)
    reasons: dict[str, str | None] = {}

    def reason_for(node: str) -> str | None:
        if node not in reasons:
            beat = agents[node].heartbeat
            reasons[node] = ineligible_reason(node, beat.labels, placement, others)
        return reasons[node]

    kept = [worker.node for worker in current
            if worker.node in agents and serves(agents[worker.node].heartbeat, runtime)
            and reason_for(worker.node) is None]
    picked = list(dict.fromkeys(kept))[:replicas]
    not_picked: list[NotPicked] = []
    for node in sorted(agents):
        record = agents[node]
        beat = record.heartbeat
        if node in picked or not is_fresh(record, now) or not serves(beat, runtime):
            continue
        reason = reason_for(node)
        if reason is None and not beat.healthy:
            reason = f"unhealthy ({'; '.join(beat.problems) or 'no reason given'})"
        if reason is None and len(picked) >= replicas:
            reason = f"{len(picked)} of {replicas} replicas already picked"
        if reason is None:
            picked.append(node)
        else:
            not_picked.append(NotPicked(node=node, reason=reason))
    return picked, not_picked


def worker_status(runtime: Runtime, nodes: Iterable[str], agents: Mapping[str, AgentRecord],
                  now: float) -> list[CacheWorker]:
    """Each worker's readiness (a fresh, healthy heartbeat) and the peer URL of its mount of the dataset."""
    meta = runtime.metadata
    workers = []
    for node in nodes:
        record = agents[node]
        beat = record.heartbeat
        peer_url = next((report.peer_url for report in beat.mounts
                         if report.dataset.name == meta.name and report.dataset.namespace == meta.namespace
                         and report.state == "Serving"), "")
        workers.append(CacheWorker(node=node, ready=is_fresh(record, now) and beat.healthy, peer_url=peer_url))
    return workers


def runtime_status(record: RuntimeRecord, agents: Iterable[AgentRecord], now: float,
                   placement: Placement = Placement(), others: Iterable[OtherRuntime] = ()) -> RuntimeStatus:
    """The runtime's status: cache workers (sticky, see ``pick_workers``) and the phase.

    The phase counts the nodes that can serve the dataset against ``replicas`` (an agent that is no cache
    worker still mounts the dataset and reads through the workers, or from the store when there are none), so a
    dataset on a node whose only agent holds another Exclusive dataset's cache still binds and mounts; a
    shortfall of cache workers is named in the message.
    """
    runtime = record.runtime
    by_node = {agent.heartbeat.node: agent for agent in agents}
    serving = serving_agents(runtime, by_node.values(), now)
    nodes = [beat.node for beat in serving if beat.healthy]
    picked, not_picked = pick_workers(runtime, record.status.workers, by_node, now, placement, others)
    workers = worker_status(runtime, picked, by_node, now)
    ready_workers = [worker for worker in workers if worker.ready]
    unhealthy = [f"{beat.node} unhealthy ({'; '.join(beat.problems) or 'no reason given'})"
                 for beat in serving if not beat.healthy]
    desired = runtime.spec.replicas
    phase: RuntimePhase
    if nodes and len(nodes) >= desired:
        phase, message = "Ready", ""
        if len(ready_workers) < desired:
            message = f"{len(ready_workers)} of {desired} cache workers ready (see notPicked)"
    elif serving:
        phase, message = "PartialReady", "; ".join([f"{len(nodes)} of {desired} agents ready", *unhealthy])
    else:
        phase, message = "NotReady", f"0 of {desired} agents ready: waiting for agent heartbeats"
    # Blocks are cached by the ring's members when there is a ring, else by every node reading for itself.
    ring = [worker for worker in ready_workers if worker.peer_url]
    capacity = node_capacity(runtime) * (len(ring) if ring else len(nodes))
    mounted = mount_condition(runtime, serving, now)
    conditions = with_condition(record.status.conditions, CONDITION_MOUNTED, mounted)
    if mounted is not None and mounted.status == "False":
        message = f"{message}; {mounted.message}" if message else mounted.message
    return RuntimeStatus(
        phase=phase,
        message=message,
        desired_worker_number_scheduled=desired,
        current_worker_number_scheduled=len(workers),
        worker_number_ready=len(ready_workers),
        ready_nodes=nodes,
        cache_capacity=format_bytes(capacity),
        cache_capacity_bytes=capacity,
        block_size_bytes=parse_quantity(runtime.spec.block_size),
        conditions=conditions,
        workers=workers,
        not_picked=not_picked,
    )


def mount_condition(runtime: Runtime, serving: Iterable[AgentHeartbeat], now: float) -> Condition | None:
    """``Mounted``: True when every node reporting the dataset's mount serves it; None when none reports it."""
    meta = runtime.metadata
    reports = sorted(
        (beat.node, report) for beat in serving for report in beat.mounts
        if report.dataset.name == meta.name and report.dataset.namespace == meta.namespace
    )
    if not reports:
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    failing = [(node, report) for node, report in reports if report.state != "Serving"]
    if not failing:
        return Condition(type=CONDITION_MOUNTED, status="True", reason="Serving",
                         message=f"mounted on {len(reports)} node(s)", last_transition_time=stamp)
    reason = "MountFailing" if any(report.state == "Failing" for _, report in failing) else "MountStarting"
    message = "not serving on " + "; ".join(f"{node}: {report.message or report.state}" for node, report in failing)
    return Condition(type=CONDITION_MOUNTED, status="False", reason=reason, message=message,
                     last_transition_time=stamp)


def with_condition(conditions: list[Condition], kind: str, new: Condition | None) -> list[Condition]:
    """``conditions`` with the one of type ``kind`` replaced by ``new`` (removed if None); the transition time is
    kept while the status stays the same, so a repeated report does not count as a change."""
    old = next((c for c in conditions if c.type == kind), None)
    kept = [c for c in conditions if c.type != kind]
    if new is None:
        return kept
    if old is not None and old.status == new.status:
        new = msgspec.structs.replace(new, last_transition_time=old.last_transition_time)
    return [*kept, new]
