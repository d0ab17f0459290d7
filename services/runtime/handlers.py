"""Runtime service handlers: runtime commands, agent heartbeats, and the periodic status recomputation.

Status is a pure function of the runtime record, the agents' last heartbeats and the time, so every path
(apply, heartbeat, tick) ends in ``refresh``: compute, compare-and-set if changed, publish the fact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from libs import subjects
from libs.bus import Bus, Conflict, Delivery, kv_delete, kv_keys, kv_load, kv_save, kv_values
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import dns_label_errors
from libs.events.runtime import (
    RuntimeAccepted,
    RuntimeApply,
    RuntimeCommand,
    RuntimeDelete,
    RuntimeDeleted,
    RuntimeRecord,
    RuntimeRejected,
    RuntimeStatusChanged,
)
from libs.telemetry import get_logger
from services.runtime import domain

log = get_logger(__name__)

CAS_ATTEMPTS = 5
# How often readiness is recomputed without any event, so a silent agent is noticed.
TICK_SECONDS = 2.0


@dataclass
class RuntimeHandlers:
    bus: Bus
    clock: Callable[[], float] = time.time

    async def on_command(self, command: RuntimeCommand, delivery: Delivery) -> None:
        if isinstance(command, RuntimeApply):
            await self.apply(command, delivery)
        else:
            await self.delete(command, delivery)

    async def on_invalid_command(self, delivery: Delivery, reason: str, payload: bytes) -> None:
        causation = delivery.message_id or f"seq-{delivery.stream_sequence}"
        await self.bus.publish(
            subjects.RUNTIME_REJECTED,
            RuntimeRejected(id=f"{causation}.rejected", causation_id=causation, reason=reason,
                            subject=delivery.subject),
        )

    async def apply(self, command: RuntimeApply, delivery: Delivery) -> None:
        runtime = command.runtime
        name, namespace = runtime.metadata.name, runtime.metadata.namespace
        errors = domain.validate_runtime(runtime)
        if errors:
            log.info("rejected", runtime=f"{namespace}/{name}", reasons=errors)
            await self.bus.publish(
                subjects.RUNTIME_REJECTED,
                RuntimeRejected(id=f"{command.id}.rejected", causation_id=command.id, reason="; ".join(errors),
                                name=name, namespace=namespace, subject=delivery.subject),
            )
            return
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        key = subjects.resource_key(namespace, name)
        record, revision = await kv_load(kv, key, RuntimeRecord)
        updated, changed = domain.apply_runtime(record, runtime)
        if changed:
            await kv_save(kv, key, updated, revision)
            log.info("applied", runtime=key, generation=updated.generation)
        await self.bus.publish(
            subjects.RUNTIME_ACCEPTED,
            RuntimeAccepted(id=f"{command.id}.accepted", causation_id=command.id, name=name, namespace=namespace,
                            generation=updated.generation),
        )
        await self.refresh(key, await self._agents(), force_publish=record is None)

    async def delete(self, command: RuntimeDelete, delivery: Delivery) -> None:
        errors = domain.validate_ref(command.name, command.namespace)
        if errors:  # not a valid KV key either
            log.info("rejected", command=command.id, reasons=errors)
            await self.bus.publish(
                subjects.RUNTIME_REJECTED,
                RuntimeRejected(id=f"{command.id}.rejected", causation_id=command.id, reason="; ".join(errors),
                                name=command.name, namespace=command.namespace, subject=delivery.subject),
            )
            return
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        key = subjects.resource_key(command.namespace, command.name)
        record, revision = await kv_load(kv, key, RuntimeRecord)
        if record is None:
            await self.bus.publish(
                subjects.RUNTIME_REJECTED,
                RuntimeRejected(id=f"{command.id}.rejected", causation_id=command.id,
                                reason=f"runtime {command.namespace}/{command.name} does not exist",
                                name=command.name, namespace=command.namespace, subject=delivery.subject),
            )
            return
        await kv_delete(kv, key, revision)
        log.info("deleted", runtime=key)
        await self.bus.publish(
            subjects.RUNTIME_DELETED,
            RuntimeDeleted(id=f"{command.id}.deleted", causation_id=command.id, name=command.name,
                           namespace=command.namespace),
        )

    async def on_heartbeat(self, beat: AgentHeartbeat, delivery: Delivery) -> None:
        errors = dns_label_errors(beat.node, "node", domain.DNS1123_LABEL) if beat.node else ["node is empty"]
        if errors or beat.interval_seconds <= 0:
            log.warning("ignored heartbeat", node=beat.node, reasons=errors or ["intervalSeconds must be > 0"])
            return
        agents = await self.bus.kv(subjects.KV_AGENTS)
        received_at = delivery.published_at or self.clock()
        current, _ = await kv_load(agents, beat.node, AgentRecord)
        if current is not None and current.received_at > received_at:
            return  # an older beat replayed after a newer one
        await agents.put(beat.node, msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=received_at)))
        await self.refresh_all()

    async def refresh_all(self) -> None:
        keys = await kv_keys(await self.bus.kv(subjects.KV_RUNTIMES))
        agents = await self._agents()
        for key in keys:
            await self.refresh(key, agents)

    async def refresh(self, key: str, agents: list[AgentRecord], force_publish: bool = False) -> None:
        kv = await self.bus.kv(subjects.KV_RUNTIMES)
        for _ in range(CAS_ATTEMPTS):
            record, revision = await kv_load(kv, key, RuntimeRecord)
            if record is None:
                return
            status = domain.runtime_status(record, agents, self.clock())
            if status == record.status and not force_publish:
                return
            updated = msgspec.structs.replace(record, status=status)
            try:
                if status != record.status:
                    revision = await kv_save(kv, key, updated, revision)
            except Conflict:
                continue
            meta = record.runtime.metadata
            await self.bus.publish(
                subjects.RUNTIME_STATUS,
                RuntimeStatusChanged(id=f"runtime.{key}.status.{revision}", name=meta.name, namespace=meta.namespace,
                                     generation=record.generation, status=status),
            )
            return
        raise Conflict(f"{key}: status update lost {CAS_ATTEMPTS} times in a row")

    async def _agents(self) -> list[AgentRecord]:
        return await kv_values(await self.bus.kv(subjects.KV_AGENTS), AgentRecord)


@dataclass
class Ticker:
    """Calls ``refresh_all`` every few seconds so readiness follows agents that went silent."""

    handlers: RuntimeHandlers
    interval: float = TICK_SECONDS
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.handlers.refresh_all()
            except Exception:
                log.exception("refresh failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
            except TimeoutError:
                continue

    def stop(self) -> None:
        self._stopping.set()
