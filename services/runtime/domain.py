"""Runtime decisions, pure: validation of the spec, and the runtime status computed from agent heartbeats.

A node serves a runtime when its last heartbeat lists the runtime and is younger than three heartbeat
intervals, and counts as ready when that heartbeat also says healthy. The runtime is Ready when the desired
number of replicas are ready; PartialReady with fewer, as long as some node serves it (an unhealthy node, whose
mount keeps failing or whose cache directory is down, is named in the message with its problems, and keeps a
Bound dataset Bound: its mounts may still serve reads); NotReady when no node serves it. The ``Mounted``
condition says whether every serving node that reports a mount of the runtime's dataset (same name) is serving
it, and names those that are not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec

from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import DNS1123_LABEL, dns_label_errors, format_bytes, parse_quantity
from libs.events.dataset import Condition
from libs.events.runtime import Runtime, RuntimePhase, RuntimeRecord, RuntimeStatus
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


def apply_runtime(record: RuntimeRecord | None, runtime: Runtime) -> tuple[RuntimeRecord, bool]:
    if record is None:
        return RuntimeRecord(runtime=runtime, generation=1), True
    if record.runtime == runtime:
        return record, False
    return msgspec.structs.replace(record, runtime=runtime, generation=record.generation + 1), True


def node_capacity(runtime: Runtime) -> int:
    """Bytes of cache one node gives the runtime: the sum of its tier quotas."""
    return sum(parse_quantity(level.quota) for level in runtime.spec.tieredstore.levels)


def serving_agents(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[AgentHeartbeat]:
    """The last heartbeats of nodes that serve the runtime and beat recently, healthy or not, by node name."""
    meta = runtime.metadata
    serving = []
    for agent in agents:
        beat = agent.heartbeat
        fresh = now - agent.received_at <= MISSED_BEATS * beat.interval_seconds
        serves = any(ref.name == meta.name and ref.namespace == meta.namespace for ref in beat.runtimes)
        if fresh and serves:
            serving.append(beat)
    return sorted(serving, key=lambda beat: beat.node)


def ready_nodes(runtime: Runtime, agents: Iterable[AgentRecord], now: float) -> list[str]:
    return [beat.node for beat in serving_agents(runtime, agents, now) if beat.healthy]


def runtime_status(record: RuntimeRecord, agents: Iterable[AgentRecord], now: float) -> RuntimeStatus:
    runtime = record.runtime
    serving = serving_agents(runtime, agents, now)
    nodes = [beat.node for beat in serving if beat.healthy]
    unhealthy = [f"{beat.node} unhealthy ({'; '.join(beat.problems) or 'no reason given'})"
                 for beat in serving if not beat.healthy]
    desired = runtime.spec.replicas
    phase: RuntimePhase
    if nodes and len(nodes) >= desired:
        phase, message = "Ready", ""
    elif serving:
        phase, message = "PartialReady", "; ".join([f"{len(nodes)} of {desired} agents ready", *unhealthy])
    else:
        phase, message = "NotReady", f"0 of {desired} agents ready: waiting for agent heartbeats"
    capacity = node_capacity(runtime) * len(nodes)
    mounted = mount_condition(runtime, serving, now)
    conditions = with_condition(record.status.conditions, CONDITION_MOUNTED, mounted)
    if mounted is not None and mounted.status == "False":
        message = f"{message}; {mounted.message}" if message else mounted.message
    return RuntimeStatus(
        phase=phase,
        message=message,
        desired_worker_number_scheduled=desired,
        worker_number_ready=len(nodes),
        ready_nodes=nodes,
        cache_capacity=format_bytes(capacity),
        cache_capacity_bytes=capacity,
        block_size_bytes=parse_quantity(runtime.spec.block_size),
        conditions=conditions,
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
