"""Dataset service handlers: decode → load → domain decision → save (compare-and-set) → publish.

Commands (apply, delete) and runtime facts arrive through the bus consumer loop; metadata syncs are started by
the reconciler whenever a record's generation is ahead of its synced generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from opentelemetry import trace

from libs import metrics, subjects
from libs.bus import Bus, Conflict, Delivery, Permanent, RetryLater, kv_delete, kv_load, kv_save
from libs.config import Settings
from libs.events.agent import AnyInventory, InventoryRequest, upgrade
from libs.events.dataset import (
    DatasetAccepted,
    DatasetApply,
    DatasetCommand,
    DatasetDelete,
    DatasetDeleted,
    DatasetRecord,
    DatasetRejected,
    DatasetResync,
    DatasetStatus,
    DatasetStatusChanged,
)
from libs.events.runtime import RuntimeDeleted, RuntimeFact, RuntimeStatusChanged
from libs.inventory import DatasetInventory
from libs.inventory import fold as fold_inventory
from libs.manifest import ManifestStore
from libs.telemetry import context_of, current_traceparent, get_logger, tracer
from libs.ufs import open_store
from services.dataset import domain
from services.dataset.sync import StoreOpener, sync_metadata

log = get_logger(__name__)

# Compare-and-set retries inside one handler before handing the message back to the consumer loop.
CAS_ATTEMPTS = 5


@dataclass
class DatasetHandlers:
    bus: Bus
    settings: Settings
    clock: Callable[[], float] = time.time
    opener: StoreOpener = open_store
    _tracer: trace.Tracer = field(default_factory=lambda: tracer(__name__), init=False)

    # --- commands ---

    async def on_command(self, command: DatasetCommand, delivery: Delivery) -> None:
        if isinstance(command, DatasetApply):
            await self.apply(command, delivery)
        elif isinstance(command, DatasetResync):
            await self.resync(command, delivery)
        else:
            await self.delete(command, delivery)

    async def on_invalid_command(self, delivery: Delivery, reason: str, payload: bytes) -> None:
        causation = delivery.message_id or f"seq-{delivery.stream_sequence}"
        await self.bus.publish(
            subjects.DATASET_REJECTED,
            DatasetRejected(id=f"{causation}.rejected", causation_id=causation, reason=reason,
                            subject=delivery.subject),
        )

    async def apply(self, command: DatasetApply, delivery: Delivery) -> None:
        dataset = command.dataset
        name, namespace = dataset.metadata.name, dataset.metadata.namespace
        errors = domain.validate_dataset(dataset, self.settings.service.local_roots)
        if errors:
            log.info("rejected", dataset=f"{namespace}/{name}", reasons=errors)
            await self.bus.publish(
                subjects.DATASET_REJECTED,
                DatasetRejected(id=f"{command.id}.rejected", causation_id=command.id, reason="; ".join(errors),
                                name=name, namespace=namespace, subject=delivery.subject),
            )
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(namespace, name)
        record, revision = await kv_load(kv, key, DatasetRecord)
        updated, changed = domain.apply_dataset(record, dataset)
        saved_revision = revision
        if changed:
            binding = await self._binding(namespace, name)
            updated = msgspec.structs.replace(updated, status=domain.status_on_apply(updated, binding),
                                              traceparent=current_traceparent())
            saved_revision = await kv_save(kv, key, updated, revision)  # Conflict → the loop redelivers at once
            log.info("applied", dataset=key, generation=updated.generation)
        await self.bus.publish(
            subjects.DATASET_ACCEPTED,
            DatasetAccepted(id=f"{command.id}.accepted", causation_id=command.id, name=name, namespace=namespace,
                            generation=updated.generation),
        )
        if saved_revision is not None and changed and (record is None or record.status != updated.status):
            await self._publish_status(updated, saved_revision)

    async def resync(self, command: DatasetResync, delivery: Delivery) -> None:
        if await self._reject_invalid_ref(command, delivery):
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(command.namespace, command.name)
        record, revision = await kv_load(kv, key, DatasetRecord)
        if record is None:
            await self._reject_missing(command, delivery)
            return
        updated = msgspec.structs.replace(record, sync_requests=record.sync_requests + 1,
                                          traceparent=current_traceparent())
        await kv_save(kv, key, updated, revision)  # the reconciler sees the change and lists again
        await self.bus.publish(
            subjects.DATASET_ACCEPTED,
            DatasetAccepted(id=f"{command.id}.accepted", causation_id=command.id, name=command.name,
                            namespace=command.namespace, generation=record.generation),
        )

    async def _reject_missing(self, command: DatasetDelete | DatasetResync, delivery: Delivery) -> None:
        await self.bus.publish(
            subjects.DATASET_REJECTED,
            DatasetRejected(id=f"{command.id}.rejected", causation_id=command.id,
                            reason=f"dataset {command.namespace}/{command.name} does not exist",
                            name=command.name, namespace=command.namespace, subject=delivery.subject),
        )

    async def _reject_invalid_ref(self, command: DatasetDelete | DatasetResync, delivery: Delivery) -> bool:
        """Reject a command whose name or namespace cannot name a dataset (it is no valid KV key either)."""
        errors = domain.validate_ref(command.name, command.namespace)
        if not errors:
            return False
        log.info("rejected", command=command.id, reasons=errors)
        await self.bus.publish(
            subjects.DATASET_REJECTED,
            DatasetRejected(id=f"{command.id}.rejected", causation_id=command.id, reason="; ".join(errors),
                            name=command.name, namespace=command.namespace, subject=delivery.subject),
        )
        return True

    async def delete(self, command: DatasetDelete, delivery: Delivery) -> None:
        if await self._reject_invalid_ref(command, delivery):
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(command.namespace, command.name)
        record, revision = await kv_load(kv, key, DatasetRecord)
        if record is None:
            await self._reject_missing(command, delivery)
            return
        await kv_delete(kv, key, revision)
        await (await self.bus.kv(subjects.KV_NODE_CACHE)).purge(key)
        await self._delete_manifest(command.namespace, command.name)
        log.info("deleted", dataset=key)
        await self.bus.publish(
            subjects.DATASET_DELETED,
            DatasetDeleted(id=f"{command.id}.deleted", causation_id=command.id, name=command.name,
                           namespace=command.namespace),
        )

    # --- runtime facts ---

    async def on_runtime_fact(self, fact: RuntimeFact, delivery: Delivery) -> None:
        mounted = None
        if isinstance(fact, RuntimeStatusChanged):
            binding = domain.RuntimeBinding(phase=fact.status.phase, cache_capacity=fact.status.cache_capacity)
            mounted = next((c for c in fact.status.conditions if c.type == domain.CONDITION_MOUNTED), None)
        elif isinstance(fact, RuntimeDeleted):
            binding = domain.RuntimeBinding()
        else:
            return
        errors = domain.validate_ref(fact.name, fact.namespace)
        if errors:  # names no dataset (and no KV key): not from the runtime service, which validates (found by fuzzing)
            raise Permanent(f"runtime fact for no dataset: {'; '.join(errors)}")
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        key = subjects.resource_key(fact.namespace, fact.name)
        await bindings.put(key, msgspec.json.encode(binding))
        await self._update_status(
            key, lambda record: domain.with_binding(
                record.dataset, domain.with_mount_condition(record.status, mounted), binding.phase,
                binding.cache_capacity)
        )

    # --- agent inventory ---

    async def on_inventory(self, received: AnyInventory, delivery: Delivery) -> None:
        """Fold a node's inventory into the dataset's cacheStates (within a second of the agent's batch)."""
        event = upgrade(received)
        ref = event.dataset
        key = subjects.resource_key(ref.namespace, ref.name)
        kv = await self.bus.kv(subjects.KV_NODE_CACHE)
        current, revision = await kv_load(kv, key, DatasetInventory)
        if current is None and await dataset_record_missing(self.bus, key):
            return  # the last events of a deleted dataset's mount (its cache freed) must not bring its entry back
        # Totals only: the block sets of every node would outgrow a KV value; the scheduler keeps those.
        folded, gap = fold_inventory(current, event, track_blocks=False)
        if folded is not current:
            await kv_save(kv, key, folded, revision)
        if gap:
            log.info("inventory gap, asking for a snapshot", dataset=key, node=event.node, seq=event.seq)
            request = InventoryRequest(node=event.node, dataset=ref)
            await self.bus.publish_core(subjects.INVENTORY_REQUEST, request)
        await self._update_status(key, lambda record: domain.with_cache_states(record.status, folded))

    # --- metadata sync (called by the reconciler) ---

    async def sync(self, key: str) -> None:
        """Sync one dataset if it needs it; ``RetryLater`` while the retry of an unreachable store is not due yet,
        or once a sync found it unreachable (after putting that in the status).

        The retry's due time is in the record (``domain.sync_due_in``), not in the reconciler's wait: the status
        write of a failed sync, or any other write, wakes the reconciler, which then waits out what is left.
        """
        kv = await self.bus.kv(subjects.KV_DATASETS)
        record, _ = await kv_load(kv, key, DatasetRecord)
        if record is None:
            return
        due_in = domain.sync_due_in(record, self.clock(), self.settings.service.sync_retry_seconds)
        if due_in is None:
            return
        if due_in > 0:
            raise RetryLater(f"{key}: store unreachable, next sync in {due_in:.1f} s", due_in)
        # In the trace of the command that asked for it (kept in the record: the watch carries no headers).
        with self._tracer.start_as_current_span("sync dataset", context=context_of(record.traceparent),
                                                attributes={"shoal.dataset": key,
                                                            "shoal.generation": record.generation}):
            await self._sync(key, record)

    async def _sync(self, key: str, record: DatasetRecord) -> None:
        try:
            result = await self._list(record)
        except RetryLater as err:
            await self._record_sync(key, record, domain.SyncResult(generation=record.generation,
                                                                   requests=record.sync_requests, error=err.reason,
                                                                   retryable=True))
            raise RetryLater(err.reason, self.settings.service.sync_retry_seconds) from err
        await self._record_sync(key, record, result)

    async def _list(self, record: DatasetRecord) -> domain.SyncResult:
        """The sync itself (list, write the manifest), timed by outcome: ok, or failed (an error or a raise)."""
        started = time.perf_counter()
        outcome = metrics.SYNC_FAILED
        try:
            result = await sync_metadata(record, await ManifestStore.of(self.bus), self.settings.s3,
                                         self.settings.service.list_page_size, self.opener,
                                         local_roots=self.settings.service.local_roots)
            outcome = metrics.SYNC_FAILED if result.error else metrics.OK
            return result
        finally:
            metrics.DATASET_SYNC_SECONDS.labels(outcome).observe(time.perf_counter() - started)

    async def _record_sync(self, key: str, record: DatasetRecord, result: domain.SyncResult) -> None:
        namespace, name = record.dataset.metadata.namespace, record.dataset.metadata.name
        binding = await self._binding(namespace, name)

        def after_sync(current: DatasetRecord) -> DatasetStatus:
            if current.generation != result.generation:
                return current.status  # a newer spec arrived meanwhile; its own sync follows
            return domain.status_after_sync(current, result, binding.phase, self.clock())

        still_there = await self._update_status(key, after_sync)
        if not still_there:
            await self._delete_manifest(namespace, name)

    # --- helpers ---

    async def _binding(self, namespace: str, name: str) -> domain.RuntimeBinding:
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        binding, _ = await kv_load(bindings, subjects.resource_key(namespace, name), domain.RuntimeBinding)
        return binding or domain.RuntimeBinding()

    async def _update_status(self, key: str, compute: Callable[[DatasetRecord], DatasetStatus]) -> bool:
        """Apply ``compute`` to the stored record with compare-and-set; publish if the status changed.

        Returns False when the dataset does not exist (any more).
        """
        kv = await self.bus.kv(subjects.KV_DATASETS)
        for _ in range(CAS_ATTEMPTS):
            record, revision = await kv_load(kv, key, DatasetRecord)
            if record is None:
                return False
            status = compute(record)
            if status == record.status:
                return True
            updated = msgspec.structs.replace(record, status=status)
            try:
                new_revision = await kv_save(kv, key, updated, revision)
            except Conflict:
                continue
            await self._publish_status(updated, new_revision)
            return True
        raise Conflict(f"{key}: status update lost {CAS_ATTEMPTS} times in a row")

    async def _publish_status(self, record: DatasetRecord, revision: int) -> None:
        meta = record.dataset.metadata
        await self.bus.publish(
            subjects.DATASET_STATUS,
            DatasetStatusChanged(id=f"dataset.{meta.namespace}.{meta.name}.status.{revision}", name=meta.name,
                                 namespace=meta.namespace, generation=record.generation, status=record.status),
        )

    async def _delete_manifest(self, namespace: str, name: str) -> None:
        await (await ManifestStore.of(self.bus)).delete(ManifestStore.name(namespace, name))


async def dataset_record_missing(bus: Bus, key: str) -> bool:
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), key, DatasetRecord)
    return record is None
