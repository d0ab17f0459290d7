"""Runtime service handlers: runtime commands, agent heartbeats, and the periodic status recomputation.

Status is a pure function of the runtime record, the agents' last heartbeats and the time, so every path
(apply, scale, heartbeat, tick) ends in ``refresh``: compute, compare-and-set if changed, publish the fact.

A scale (``runtime.scale.v1``: ``shoal scale``, the autoscaler) is an apply of the runtime as the record holds it
when the command is handled, with only ``spec.replicas`` replaced: a scaler that sent the whole spec it had read
would put back a spec applied after it looked.

The agents' last heartbeats are read from an in-memory view of the ``shoal_agents`` bucket fed by a KV watch
(``KvMirror``), never listed: a heartbeat costs one KV write plus the refresh of the existing runtimes it names
(or named before), whatever the number of agents.

Cache workers depend on more than the runtime and the agents: the Dataset of the same name (whether there is one,
its ``nodeAffinity`` and ``placement``, from a view of ``shoal_datasets``) and the other runtimes' workers (an
Exclusive dataset's workers hold no other cache; from a view of ``shoal_runtimes`` that this service updates as it
saves, so two refreshes never hand one agent to two Exclusive runtimes). Refreshes run one at a time for the same
reason.
``check_placements`` refreshes a runtime whose Dataset's placement changed (or which appeared or went away), and
every runtime after some runtime's workers changed (an agent freed or taken).

``autoscale_all`` is the elastic cache: for each runtime with ``spec.autoscaling`` it samples the Dataset's
folded cache (``domain.cache_sample``), asks ``domain.autoscale``, keeps its state in ``status.autoscaling`` (with
``lastDecision``: why it holds, logged once when that changes), and on a change sends a ``runtime.scale.v1`` with
the new replicas on ``shoal.cmd.runtime.scale`` (the path of ``shoal scale``) and publishes
``runtime.autoscaled.v1`` with the reason. Its state goes on from look to look in memory (``AutoscalerLook``): a
new decision is written at once, the measures and ``lastPressureTime`` alone at most every
``domain.AUTOSCALE_WRITE_SECONDS``, or every look of a read dataset would be a record write and a status fact.
"""

from __future__ import annotations

import asyncio
import math
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from libs import metrics, subjects
from libs.bus import (
    AGENTS_TTL_SECONDS,
    Bus,
    Conflict,
    Delivery,
    KvMirror,
    invalid_command_id,
    kv_delete,
    kv_keys,
    kv_load,
    kv_load_deleted,
    kv_save,
)
from libs.deletion import deleted_at, deletion_note
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import answered_result, apply_result
from libs.events.dataset import DatasetRecord
from libs.events.runtime import (
    AutoscalingStatus,
    Runtime,
    RuntimeAccepted,
    RuntimeApply,
    RuntimeAutoscaled,
    RuntimeCommand,
    RuntimeDelete,
    RuntimeDeleted,
    RuntimePhase,
    RuntimeRecord,
    RuntimeRejected,
    RuntimeScale,
    RuntimeStatus,
    RuntimeStatusChanged,
    TieredStore,
)
from libs.gauges import GaugeFamily
from libs.telemetry import get_logger
from services.runtime import domain

log = get_logger(__name__)

CAS_ATTEMPTS = 5
# How often readiness is recomputed without any event, so a silent agent is noticed.
TICK_SECONDS = 2.0
# How often a changed Dataset placement or moved workers are looked for: in-memory, so cheap; fast enough that a
# re-applied nodeAffinity shows in status within a second.
PLACEMENT_CHECK_SECONDS = 0.25
# How often the gauges are recounted from the in-memory view: as often as placements are checked (a pass over the
# same view, setting only what changed), so they follow a change within a fraction of a scrape interval.
GAUGE_SECONDS = PLACEMENT_CHECK_SECONDS
# How often the autoscaler looks: agents batch inventory at most every second and the dataset service folds it
# within one, so looking faster would mostly see the same numbers.
AUTOSCALE_SECONDS = 1.0
RUNTIME_PHASES: tuple[RuntimePhase, ...] = typing.get_args(RuntimePhase)


@dataclass(frozen=True)
class AutoscalerLook:
    """The autoscaler's last look at a runtime: ``state`` as it decided it, and ``written``, the state the record
    holds, as this process wrote it at ``written_at`` (None: as it read it). The next look goes on from ``state``
    while the record still holds ``written``; otherwise (a policy removed and given again) from the record."""

    state: AutoscalingStatus
    written: AutoscalingStatus | None
    written_at: float | None


@dataclass
class RuntimeHandlers:
    bus: Bus
    agents: KvMirror[AgentRecord]
    datasets: KvMirror[DatasetRecord]
    runtimes: KvMirror[RuntimeRecord]
    clock: Callable[[], float] = time.time
    # One refresh at a time: each reads the other runtimes' workers that the previous one may have changed.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The placement each runtime's workers were last picked with, and whether some runtime's workers changed.
    placements: dict[str, domain.Placement] = field(default_factory=dict)
    workers_changed: bool = False
    # The nodes holding blocks of each runtime's Dataset when its capacity was last worked out (``holders``).
    holders_seen: dict[str, frozenset[str]] = field(default_factory=dict)
    # The gauges' series as last set (a deleted runtime's are removed).
    phase_gauge: GaugeFamily = field(default_factory=lambda: GaugeFamily(metrics.RUNTIMES))
    workers_gauge: GaugeFamily = field(default_factory=lambda: GaugeFamily(metrics.RUNTIME_WORKERS))
    # The autoscaler's previous look at each runtime's read counters (its window starts there).
    read_counters: dict[str, domain.ReadCounters] = field(default_factory=dict)
    # Its previous look at each runtime's state (what it saw and decided, and what of it is written).
    autoscaler_looks: dict[str, AutoscalerLook] = field(default_factory=dict)
    # When each node's two-agents warning was last logged (``_warn_conflict``).
    conflicts_logged: dict[str, float] = field(default_factory=dict)
    # Each runtime's disk tier quotas with the tiers they were read from (``disk_quotas``).
    disk_quotas_seen: dict[str, tuple[TieredStore, tuple[domain.DiskQuota, ...]]] = field(default_factory=dict)
    # When this service started (``clock``): its agents' view settles for a while (``keep_absent``).
    started_at: float | None = None

    def __post_init__(self) -> None:
        if self.started_at is None:
            self.started_at = self.clock()

    def _settling(self, now: float) -> bool:
        """Whether the agents' view may still lack agents that beat while this service was down (their records
        expired): a worker without a record keeps its seat meanwhile (``domain.choose_workers``)."""
        assert self.started_at is not None
        return now - self.started_at < domain.AGENT_VIEW_SETTLING_SECONDS

    async def on_command(self, command: RuntimeCommand, delivery: Delivery) -> None:
        if isinstance(command, RuntimeApply):
            await self.apply(command, delivery)
        elif isinstance(command, RuntimeScale):
            await self.scale(command, delivery)
        else:
            await self.delete(command, delivery)

    async def on_invalid_command(self, delivery: Delivery, reason: str, payload: bytes) -> None:
        causation = invalid_command_id(delivery, payload)
        await self.bus.publish(
            subjects.RUNTIME_REJECTED,
            RuntimeRejected(id=f"{causation}.rejected", causation_id=causation, reason=reason,
                            subject=delivery.subject),
        )

    async def apply(self, command: RuntimeApply, delivery: Delivery) -> None:
        runtime = command.runtime
        name, namespace = runtime.metadata.name, runtime.metadata.namespace
        errors = domain.validate_runtime(runtime)
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        key = subjects.resource_key(namespace, name)
        record, revision, note = (None, None, b"") if errors else await kv_load_deleted(kv, key, RuntimeRecord)
        if not errors and record is None:
            # Delivered again behind a delete that came after it: applying it would bring the runtime back.
            stale = domain.stale_apply(name, namespace, delivery.stream_sequence, deleted_at(note))
            errors = [stale] if stale else []
        if not errors:
            errors = domain.change_errors(record, runtime, delivery.stream_sequence)
        if errors:
            await self._reject(command.id, errors, name, namespace, delivery)
            return
        await self._accept(command.id, runtime, record, revision, delivery)

    async def scale(self, command: RuntimeScale, delivery: Delivery) -> None:
        name, namespace = command.name, command.namespace
        errors = domain.validate_ref(name, namespace) + domain.replicas_errors(command.replicas)
        if errors:
            await self._reject(command.id, errors, name, namespace, delivery)
            return
        key = subjects.resource_key(namespace, name)
        record, revision = await kv_load(await self.bus.kv(subjects.KV_RUNTIMES), key, RuntimeRecord)
        if record is None:
            await self._reject(command.id, [domain.missing_runtime(name, namespace)], name, namespace, delivery,
                               not_found=True)
            return
        if errors := domain.scale_errors(record.runtime, command.replicas):
            await self._reject(command.id, errors, name, namespace, delivery)
            return
        # The record just read, not the sender's copy: only replicas change, whatever was applied since it looked.
        spec = msgspec.structs.replace(record.runtime.spec, replicas=command.replicas)
        await self._accept(command.id, msgspec.structs.replace(record.runtime, spec=spec), record, revision, delivery)

    async def _accept(self, command_id: str, runtime: Runtime, record: RuntimeRecord | None, revision: int | None,
                      delivery: Delivery) -> None:
        """Save ``runtime`` (valid) over ``record``, read at ``revision`` (compare-and-set: a write in between is a
        ``Conflict``, and the command is handled again), say so, and refresh the status."""
        name, namespace = runtime.metadata.name, runtime.metadata.namespace
        key = subjects.resource_key(namespace, name)
        updated, changed = domain.apply_runtime(record, runtime, delivery.stream_sequence)
        result = answered_result(apply_result(None if record is None else record.runtime, updated.runtime),
                                 delivery.stream_sequence, 0 if record is None else record.command_sequence,
                                 "" if record is None else record.command_result)
        if changed:  # saved: a redelivery of this command answers the same
            updated = msgspec.structs.replace(updated, command_result=result)
            await kv_save(await self.bus.kv(subjects.KV_RUNTIMES), key, updated, revision)
            log.info("applied", runtime=subjects.key_name(key), generation=updated.generation)
        await self.bus.publish(
            subjects.RUNTIME_ACCEPTED,
            RuntimeAccepted(id=f"{command_id}.accepted", causation_id=command_id, name=name, namespace=namespace,
                            generation=updated.generation, result=result),
        )
        await self.refresh(key, self._agents(), force_publish=record is None)

    async def _reject(self, command_id: str, errors: list[str], name: str, namespace: str,
                      delivery: Delivery, not_found: bool = False) -> None:
        log.info("rejected", command=command_id, runtime=subjects.object_name(namespace, name), reasons=errors)
        await self.bus.publish(
            subjects.RUNTIME_REJECTED,
            RuntimeRejected(id=f"{command_id}.rejected", causation_id=command_id, reason="; ".join(errors),
                            name=name, namespace=namespace, subject=delivery.subject, not_found=not_found),
        )

    async def delete(self, command: RuntimeDelete, delivery: Delivery) -> None:
        errors = domain.validate_ref(command.name, command.namespace)
        if errors:  # not a valid KV key either
            await self._reject(command.id, errors, command.name, command.namespace, delivery)
            return
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        key = subjects.resource_key(command.namespace, command.name)
        record, revision = await kv_load(kv, key, RuntimeRecord)
        if record is None:
            await self._reject(command.id, [domain.missing_runtime(command.name, command.namespace)], command.name,
                               command.namespace, delivery, not_found=True)
            return
        stale = domain.stale_delete(record, delivery.stream_sequence)
        if stale:  # delivered again behind an apply or scale that came after it: the runtime stays
            await self._reject(command.id, [stale], command.name, command.namespace, delivery)
            return
        # Its workers are free now: the other runtimes may pick them at once, not at the next tick; and an older
        # entry of the runtime the watch delivers late does not bring it back (its revision is below the marker's).
        # The marker keeps the delete's sequence: an older apply delivered again later is refused.
        self.runtimes.deleted(key, await kv_delete(kv, key, revision,
                                                   note=deletion_note(delivery.stream_sequence)))
        self.workers_changed = True
        log.info("deleted", runtime=subjects.key_name(key))
        await self.bus.publish(
            subjects.RUNTIME_DELETED,
            RuntimeDeleted(id=f"{command.id}.deleted", causation_id=command.id, name=command.name,
                           namespace=command.namespace),
        )

    async def on_heartbeat(self, beat: AgentHeartbeat, delivery: Delivery) -> None:
        errors = domain.node_errors(beat.node)
        if errors or beat.interval_seconds <= 0:
            log.warning("ignored heartbeat", node=beat.node, reasons=errors or ["intervalSeconds must be > 0"])
            return
        await self.agents.ready.wait()
        received_at = delivery.published_at or self.clock()
        current = self.agents.values.get(beat.node)
        if current is not None and current.received_at > received_at:
            return  # an older beat replayed after a newer one
        record = domain.agent_record(current, beat, received_at)
        if (reason := domain.node_conflict(record, received_at)) is not None:
            self._warn_conflict(beat.node, reason, record, received_at)
        revision = await (await self.bus.kv(subjects.KV_AGENTS)).put(beat.node, msgspec.json.encode(record))
        # The watch brings the same value back shortly; the view is updated now so this refresh already sees it.
        self.agents.saved(beat.node, record, revision)
        affected: set[str] = set()
        for served in [beat] if current is None else [beat, current.heartbeat]:
            if served.all_runtimes:  # every runtime there is (the list, if any, may be cut short)
                affected |= set(await self._runtime_keys())
            else:
                affected |= {subjects.resource_key(ref.namespace, ref.name) for ref in served.runtimes}
        if self.runtimes.ready.is_set():
            # A runtime the view lacks does not exist (or was applied a moment ago, and its apply refreshes it):
            # an agent naming runtimes not applied yet would otherwise cost a bucket read each, at every beat.
            affected &= set(self.runtimes.values)
        agents = self._agents()
        for key in sorted(affected):
            await self.refresh(key, agents, mirror_first=True)

    def _warn_conflict(self, node: str, reason: str, record: AgentRecord, now: float) -> None:
        """Log that two agents beat as ``node``, at most every ``domain.CONFLICT_LOG_SECONDS`` per node: every
        beat of the two would say it again."""
        if now - self.conflicts_logged.get(node, -math.inf) < domain.CONFLICT_LOG_SECONDS:
            return
        self.conflicts_logged[node] = now
        for gone in [n for n, at in self.conflicts_logged.items() if now - at >= domain.CONFLICT_LOG_SECONDS]:
            if gone != node:
                del self.conflicts_logged[gone]
        log.warning("agents share a node name", node=node, reason=reason,
                    instances=sorted([record.heartbeat.instance, *record.instances]))

    async def _runtime_keys(self) -> list[str]:
        if self.runtimes.ready.is_set():
            return sorted(self.runtimes.values)
        return await kv_keys(await self.bus.kv(subjects.KV_RUNTIMES))

    async def refresh_all(self) -> None:
        keys = await self._runtime_keys()
        now = self.clock()
        for node, record in list(self.agents.values.items()):
            if now - record.received_at > AGENTS_TTL_SECONDS:
                self.agents.forget(node)  # expired in the bucket, without a delete the watch could see
        agents = self._agents()
        for key in keys:
            await self.refresh(key, agents, mirror_first=True)

    async def refresh(self, key: str, agents: list[AgentRecord], force_publish: bool = False,
                      autoscaling: AutoscalingStatus | None = None, mirror_first: bool = False) -> None:
        """Write the runtime's status if it changed. ``mirror_first`` (the ticker, heartbeats, placement checks:
        nothing in the record changed, only the world around it): the status is first worked out from the record
        in the watch's mirror, and the bucket read and written only when that differs. A hundred runtimes cost no
        KV read per tick then. The mirror may lag this service's own command write by a moment; that write's own
        refresh read the bucket."""
        async with self.lock:
            if mirror_first and not force_publish and autoscaling is None and self._settled(key, agents):
                return
            await self._refresh(key, agents, force_publish, autoscaling)

    def _settled(self, key: str, agents: list[AgentRecord]) -> bool:
        mirrored = self.runtimes.values.get(key)
        if mirrored is None or not (self.datasets.ready.is_set() and self.runtimes.ready.is_set()):
            return False
        return self._status(key, mirrored, agents) == mirrored.status

    def _status(self, key: str, record: RuntimeRecord, agents: list[AgentRecord]) -> RuntimeStatus:
        """The runtime's status as things stand; its placement is noted for ``check_placements``."""
        placement = self.placements[key] = self.placement(key)
        holders = self.holders_seen[key] = self.holders(key)
        now = self.clock()
        return domain.runtime_status(record, agents, now, placement, self.others(key), self._settling(now), holders)

    async def autoscale_all(self) -> None:
        """One look of the autoscaler at every runtime with ``spec.autoscaling``."""
        if not (self.datasets.ready.is_set() and self.runtimes.ready.is_set()):
            return
        for key in set(self.read_counters) - set(self.runtimes.values):
            self.read_counters.pop(key, None)  # a deleted runtime
        for key in set(self.autoscaler_looks) - {key for key, record in self.runtimes.values.items()
                                                 if record.runtime.spec.autoscaling is not None}:
            self.autoscaler_looks.pop(key, None)  # deleted, or without a policy now
        for key, record in sorted(self.runtimes.values.items()):
            if record.runtime.spec.autoscaling is not None:
                await self.autoscale(key, record)

    async def autoscale(self, key: str, record: RuntimeRecord) -> None:
        policy = record.runtime.spec.autoscaling
        assert policy is not None
        dataset = self.datasets.values.get(key)
        now = self.clock()
        agents = {agent.heartbeat.node: agent for agent in self._agents()}
        spare = domain.can_add_worker(record.runtime, record.status.workers, agents, now, self.placement(key),
                                      self.others(key), self._settling(now))
        sample = domain.cache_sample(record.runtime, record.status, dataset.status.nodes if dataset else [], spare)
        written, looked = record.status.autoscaling, self.autoscaler_looks.get(key)
        state: AutoscalingStatus | None
        if looked is not None and looked.written == written:
            state, written_at = looked.state, looked.written_at
        else:  # this service just started (or the policy was given again): the record may lag the last pressure
            state, written_at = domain.autoscaling_resumed(written, now), None
        choice = domain.autoscale(policy, record.runtime.spec.replicas, sample, self.read_counters.get(key), state,
                                  now)
        self.read_counters[key] = sample.reads
        held_before = written.last_decision if written else None
        if domain.autoscaling_write_due(written, choice.state, written_at, now):
            # Saved before the apply: the cool-down holds from now even if the apply takes a while to land.
            await self.refresh(key, self._agents(), autoscaling=choice.state)
            written, written_at = choice.state, now
        self.autoscaler_looks[key] = AutoscalerLook(choice.state, written, written_at)
        if choice.decision is None:
            held = written.last_decision if written else None
            # Once when the record starts saying it holds for a reason: not every look, nor every turn of a hold
            # that the record does not show yet.
            if held is not None and (held_before is None or held.reason != held_before.reason
                                     or held.action != held_before.action):
                log.info("autoscaler holds", runtime=subjects.key_name(key), replicas=choice.replicas,
                         reason=held.reason, message=held.message)
            return
        meta = record.runtime.metadata
        decided = len(choice.state.decisions)
        command_id = f"runtime.{key}.autoscale.{record.generation}.{choice.state.last_scale_time:.0f}"
        log.info("autoscaled", runtime=subjects.key_name(key), replicas=choice.replicas, reason=choice.reason,
                 decisions=decided)
        # A scale, not an apply of this view's spec: the view may predate a spec the user applied since.
        await self.bus.publish(subjects.RUNTIME_SCALE, RuntimeScale(id=command_id, name=meta.name,
                                                                    namespace=meta.namespace, replicas=choice.replicas))
        metrics.RUNTIME_AUTOSCALES.labels(
            metrics.SCALE_UP if choice.replicas > record.runtime.spec.replicas else metrics.SCALE_DOWN).inc()
        await self.bus.publish(
            subjects.RUNTIME_AUTOSCALED,
            RuntimeAutoscaled(id=f"{command_id}.autoscaled", name=meta.name, namespace=meta.namespace,
                              from_replicas=choice.decision.from_replicas, to_replicas=choice.decision.to_replicas,
                              reason=choice.reason, cache_used_percent=choice.state.cache_used_percent,
                              hit_ratio_percent=choice.state.hit_ratio_percent),
        )

    def placement(self, key: str) -> domain.Placement:
        dataset = self.datasets.values.get(key)
        return domain.placement_of(dataset.dataset.spec if dataset is not None else None)

    def holders(self, key: str) -> frozenset[str]:
        """The nodes that hold blocks of the runtime's Dataset, as its status (the dataset service's) says."""
        dataset = self.datasets.values.get(key)
        if dataset is None:
            return frozenset()
        return frozenset(node.node for node in dataset.status.nodes if node.cached_bytes > 0)

    def others(self, key: str) -> list[domain.OtherRuntime]:
        return [domain.OtherRuntime(f"{record.runtime.metadata.namespace}/{record.runtime.metadata.name}",
                                    self.placement(other).exclusive,
                                    tuple(worker.node for worker in record.status.workers),
                                    self.disk_quotas(other, record))
                for other, record in self.runtimes.values.items() if other != key and record.status.workers]

    def disk_quotas(self, key: str, record: RuntimeRecord) -> tuple[domain.DiskQuota, ...]:
        """The runtime's disk tier quotas (``domain.disk_quotas``), worked out again only when its tiers change
        (not by generation: a runtime deleted and applied again starts again at 1): every refresh reads those of
        every other runtime, and a heartbeat of an agent serving them all refreshes each."""
        tiers = record.runtime.spec.tieredstore
        seen = self.disk_quotas_seen.get(key)
        if seen is None or seen[0] != tiers:
            seen = self.disk_quotas_seen[key] = (tiers, domain.disk_quotas(record.runtime))
        return seen[1]

    async def check_placements(self) -> None:
        """Refresh the runtimes whose Dataset's nodeAffinity or placement changed, or all after workers moved or
        a runtime turned Exclusive or Shared."""
        if not (self.datasets.ready.is_set() and self.runtimes.ready.is_set()):
            return
        keys = sorted(self.runtimes.values)
        for gone in self.placements.keys() - set(keys):  # deleted runtimes
            del self.placements[gone]
        for gone in self.holders_seen.keys() - set(keys):
            del self.holders_seen[gone]
        for gone in self.disk_quotas_seen.keys() - set(keys):
            del self.disk_quotas_seen[gone]
        # A node that starts or stops holding blocks changes the capacity, which the Dataset's shows at once: the
        # runtime's follows within this check, not the 2 s ticker.
        changed = [key for key in keys if self.placements.get(key) != self.placement(key)
                   or self.holders_seen.get(key, frozenset()) != self.holders(key)]
        # Whether a runtime is Exclusive decides which agents the others may take (or must let go): all look again.
        shared_or_not = any(key in self.placements and self.placements[key].exclusive != self.placement(key).exclusive
                            for key in changed)
        if self.workers_changed or shared_or_not:
            self.workers_changed, changed = False, keys
        agents = self._agents()
        for key in changed:
            await self.refresh(key, agents, mirror_first=True)

    async def _refresh(self, key: str, agents: list[AgentRecord], force_publish: bool,
                       autoscaling: AutoscalingStatus | None = None) -> None:
        await self.datasets.ready.wait()
        await self.runtimes.ready.wait()
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        for _ in range(CAS_ATTEMPTS):
            record, revision = await kv_load(kv, key, RuntimeRecord)
            if record is None:
                return
            assert revision is not None  # a value read has the revision it was read at
            status = self._status(key, record, agents)
            if autoscaling is not None and record.runtime.spec.autoscaling is not None:
                status = msgspec.structs.replace(status, autoscaling=autoscaling)
            if status == record.status and not force_publish:
                return
            updated = msgspec.structs.replace(record, status=status)
            try:
                if status != record.status:
                    revision = await kv_save(kv, key, updated, revision)
            except Conflict:
                continue
            # The watch brings it back shortly; the next refresh must already see these workers.
            self.runtimes.saved(key, updated, revision)
            if [w.node for w in status.workers] != [w.node for w in record.status.workers]:
                self.workers_changed = True
                log.info("cache workers", runtime=subjects.key_name(key), workers=[w.node for w in status.workers])
            for replaced in status.replaced:
                if replaced not in record.status.replaced:
                    log.warning("cache worker replaced", runtime=subjects.key_name(key), node=replaced.node,
                                by=replaced.by, reason=replaced.reason)
            meta = record.runtime.metadata
            await self.bus.publish(
                subjects.RUNTIME_STATUS,
                RuntimeStatusChanged(id=f"runtime.{key}.status.{revision}", name=meta.name, namespace=meta.namespace,
                                     generation=record.generation, status=domain.fact_status(status)),
            )
            return
        raise Conflict(f"{subjects.key_name(key)}: status update lost {CAS_ATTEMPTS} times in a row")

    async def export_gauges(self) -> None:
        """Runtimes by phase (every phase, 0 included) and each runtime's cache workers, from the runtimes' view."""
        if not self.runtimes.ready.is_set():
            return
        records = list(self.runtimes.values.values())
        phases = Counter(record.status.phase for record in records)
        self.phase_gauge.update({(phase,): phases[phase] for phase in RUNTIME_PHASES})
        self.workers_gauge.update({(subjects.object_name(record.runtime.metadata.namespace,
                                                         record.runtime.metadata.name),): len(record.status.workers)
                                   for record in records})

    def _agents(self) -> list[AgentRecord]:
        return list(self.agents.values.values())
