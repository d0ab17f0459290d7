"""Dataset service handlers: decode → load → domain decision → save (compare-and-set) → publish.

Commands (apply, delete) and runtime facts arrive through the bus consumer loop; metadata syncs are started by
the reconciler whenever a record's generation is ahead of its synced generation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.js.kv import KeyValue
from opentelemetry import trace

from libs import metrics, subjects
from libs.bus import (
    AGENTS_TTL_SECONDS,
    Bus,
    Conflict,
    Delivery,
    KvMirror,
    Permanent,
    Replay,
    RetryLater,
    invalid_command_id,
    kv_delete,
    kv_load,
    kv_load_deleted,
    kv_save,
)
from libs.config import Settings
from libs.deletion import deleted_at
from libs.events.agent import AgentRecord, AnyInventory, InventoryRequest, upgrade
from libs.events.common import answered_result, apply_result
from libs.events.dataset import (
    Dataset,
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
from libs.events.runtime import RuntimeAccepted, RuntimeDeleted, RuntimeFact, RuntimeRecord, RuntimeStatusChanged
from libs.events.schedule import DatasetCacheObserved
from libs.inventory import DatasetInventory, NodeNotes, other_instance, other_instance_over
from libs.inventory import fold as fold_inventory
from libs.manifest import ManifestStore
from libs.mounts import exposed_secret_errors
from libs.redact import cut_error, strip_userinfo
from libs.references import is_reference, reference_of
from libs.telemetry import DATASET_ATTRIBUTE, context_of, current_traceparent, get_logger, tracer
from libs.ufs import open_store
from services.dataset import domain
from services.dataset.references import ReferenceIndex
from services.dataset.sync import StoreOpener, sync_metadata
from services.dataset.watched import WatchedBindings, WatchedPolicies, WatchedRecords

log = get_logger(__name__)

# Compare-and-set retries inside one handler before handing the message back to the consumer loop.
CAS_ATTEMPTS = 5
# Metadata syncs listing at once: a burst of thousands of applies starts a reconcile per dataset, and each sync
# holds a listing page and its manifest (up to libs.manifest.SPOOL_BYTES in memory) until it is written. Enough to
# keep NATS and the stores busy; memory stays bounded whatever the burst.
SYNC_CONCURRENCY = 64
# Nodes remembered as dropped by ``forget_departed_nodes`` until their agent beats again: more than a cluster's
# nodes, so memory stays bounded while nodes removed for good (new names at every scale-up) are never back.
DEPARTED_KEPT = 4096
# Bindings of deleted runtimes turned into markers per pass (two KV requests each): a backlog of months of a CronJob's
# runtimes drains over a few passes without one taking long.
BINDINGS_RETIRED_PER_PASS = 1000


@dataclass
class DatasetHandlers:
    bus: Bus
    settings: Settings
    clock: Callable[[], float] = time.time
    opener: StoreOpener = open_store
    # The incarnation of a dataset record being created (``DatasetRecord.incarnation``): unique per life of a name.
    new_incarnation: Callable[[], str] = field(default=lambda: uuid.uuid4().hex[:16])
    # Asks the reconciler to look at a dataset again (app wires Reconciler.schedule): a runtime re-applied with
    # another metadataSyncPolicy changes when its dataset is listed next, though the dataset's record did not change.
    wake: Callable[[str], None] | None = None
    # Which datasets reference which (fed by the reconciler's watch): a source's ``datasetRef``.
    references: ReferenceIndex | None = None
    # The runtimes' phases in memory (app.py runs its watch); None: read the bucket each time.
    bindings: WatchedBindings | None = None
    # The runtimes' specs (metadataSyncPolicy) in memory, the same way.
    policies: WatchedPolicies | None = None
    # The agents' last heartbeats (app.py runs its watch): which nodes are gone (``forget_departed_nodes``).
    agents: KvMirror[AgentRecord] | None = None
    # When each dataset was last listed, by this process's clock: an unchanged autoSync listing writes nothing, so
    # the record cannot say it (after a restart the period counts from lastSyncTime).
    _listed_at: dict[str, float] = field(default_factory=dict, init=False)
    # When this process first saw the agents' heartbeats, or last saw them again after a reconnect (its count then):
    # ``forget_departed_nodes`` waits one TTL from then.
    _agents_since: float | None = field(default=None, init=False)
    _agents_reconnects: int = field(default=0, init=False)
    # Nodes whose figures this process dropped (oldest first, at most DEPARTED_KEPT): asked for a snapshot when
    # their agent beats again.
    _dropped_nodes: dict[str, None] = field(default_factory=dict, init=False)
    # When inventory of another agent process of each node was last logged (``on_inventory``).
    other_instances: NodeNotes = field(default_factory=NodeNotes, init=False)
    # The nodes with a series of INVENTORY_OTHER_INSTANCE, removed once it no longer applies (``other_instance_over``).
    other_instance_nodes: set[str] = field(default_factory=set, init=False)
    _tracer: trace.Tracer = field(default_factory=lambda: tracer(__name__), init=False)
    _syncing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SYNC_CONCURRENCY), init=False)
    # Fed by the reconciler's watch (app.py) and by this process's own status writes.
    watched: WatchedRecords = field(default_factory=WatchedRecords, init=False)

    # --- commands ---

    async def on_command(self, command: DatasetCommand, delivery: Delivery) -> None:
        if isinstance(command, DatasetApply):
            await self.apply(command, delivery)
        elif isinstance(command, DatasetResync):
            await self.resync(command, delivery)
        else:
            await self.delete(command, delivery)

    async def on_invalid_command(self, delivery: Delivery, reason: str, payload: bytes) -> None:
        await self._reject(invalid_command_id(delivery, payload), delivery, reason)

    async def apply(self, command: DatasetApply, delivery: Delivery) -> None:
        dataset = command.dataset
        name, namespace = dataset.metadata.name, dataset.metadata.namespace
        errors = domain.validate_dataset(dataset, self.settings.service.local_roots,
                                         pvc_root=self.settings.service.pvc_root)
        if errors:
            log.info("rejected", dataset=subjects.object_name(namespace, name), reasons=errors)
            if exposed_secret_errors(dataset):
                await self._erase_command(delivery)
            await self._reject(command.id, delivery, "; ".join(errors), name, namespace)
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        source = await self._source_of(dataset)
        errors = domain.reference_apply_errors(dataset, source)
        if errors:
            log.info("rejected", dataset=subjects.object_name(namespace, name), reasons=errors)
            await self._reject(command.id, delivery, "; ".join(errors), name, namespace)
            return
        key = subjects.resource_key(namespace, name)
        record, revision, deleted_note = await kv_load_deleted(kv, key, DatasetRecord)
        if (deleted_by := deleted_at(deleted_note)) > delivery.stream_sequence:
            # Delivered again after a delete that came behind it: applying it would bring the dataset back.
            reason = (f"dataset {namespace}/{name} was deleted by a later command (stream sequence {deleted_by}); "
                      f"this apply (sequence {delivery.stream_sequence}) came before it: apply it again to recreate")
            log.info("rejected", dataset=subjects.object_name(namespace, name), reasons=[reason])
            await self._reject(command.id, delivery, reason, name, namespace)
            return
        if record is None and (earlier := domain.read_deletion_note(deleted_note)) is not None:
            # The name's last delete may have stopped after removing the record; its redelivery, older than this
            # apply, will be refused, and this record replaces the marker naming what it left: finish it first,
            # before a new dataset of the name can take the old one's node cache (idempotent).
            await self._clean_after_delete(key, earlier.manifests)
        updated, changed = domain.apply_dataset(record, dataset, delivery.stream_sequence, self.new_incarnation())
        result = answered_result(apply_result(None if record is None else record.dataset, updated.dataset),
                                 delivery.stream_sequence, 0 if record is None else record.command_sequence,
                                 "" if record is None else record.command_result)
        if updated is not record:  # saved below: a redelivery of this command answers the same
            updated = msgspec.structs.replace(updated, command_result=result)
        saved_revision = revision
        if changed:
            if is_reference(dataset):
                status = domain.reference_status(updated, source, self.clock())
            else:
                # A runtime's fact handled meanwhile may find no record yet, and this binding may be older than it:
                # the sync that follows every changed spec reads the binding again after the record.
                status = domain.status_on_apply(updated, await self._binding(namespace, name), self.clock())
            updated = msgspec.structs.replace(updated, status=status, traceparent=current_traceparent())
            saved_revision = await kv_save(kv, key, updated, revision)  # Conflict → the loop redelivers at once
            log.info("applied", dataset=subjects.key_name(key), generation=updated.generation)
        elif updated is not record:  # the same spec, a newer command: only its sequence is kept
            saved_revision = await kv_save(kv, key, updated, revision)
        if updated.manifests_left and saved_revision is not None:
            # After the write: a mount reading the old manifest meanwhile reads the record again (now a reference's).
            # A redelivery of this apply (the removal failed) finds the names still in the record and does it again.
            await self._remove_manifests_left(key, updated, saved_revision)
        await self.bus.publish(
            subjects.DATASET_ACCEPTED,
            DatasetAccepted(id=f"{command.id}.accepted", causation_id=command.id, name=name, namespace=namespace,
                            generation=updated.generation, result=result),
        )
        if saved_revision is not None and changed and (record is None or record.status != updated.status):
            await self._publish_status(updated, saved_revision)

    async def _remove_manifests_left(self, key: str, record: DatasetRecord,
                                     revision: int) -> tuple[DatasetRecord | None, int | None]:
        """Remove the manifests ``record`` (at ``revision``) names as left (``DatasetRecord.manifests_left``), then
        their names from the record, compare-and-set (a record changed meanwhile is read again). A failure leaves
        the names in the record, for the apply's redelivery or the reconciler's next look. Idempotent. Returns the
        record as it is stored then (None: deleted meanwhile) and its revision."""
        removed = list(record.manifests_left)
        await self._delete_manifests(*removed)
        kv = await self.bus.kv(subjects.KV_DATASETS)
        for _ in range(CAS_ATTEMPTS):
            updated = domain.manifests_removed(record, removed)
            if updated is record:
                return record, revision
            try:
                saved = await kv_save(kv, key, updated, revision)
            except Conflict:
                loaded, loaded_revision = await kv_load(kv, key, DatasetRecord)
                if loaded is None or loaded_revision is None:
                    return None, None  # deleted: its delete removes what its record named
                record, revision = loaded, loaded_revision
                continue
            self.watched.note(key, updated, saved)
            log.info("manifests no one names removed", dataset=subjects.key_name(key), manifests=removed)
            return updated, saved
        raise Conflict(f"{subjects.key_name(key)}: removing the manifests left lost {CAS_ATTEMPTS} times in a row")

    async def resync(self, command: DatasetResync, delivery: Delivery) -> None:
        if await self._reject_invalid_ref(command, delivery):
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(command.namespace, command.name)
        record, revision = await kv_load(kv, key, DatasetRecord)
        if record is None:
            await self._reject_missing(command, delivery)
            return
        if (source := reference_of(record.dataset)) is not None:
            await self._reject(command.id, delivery,
                               f"dataset {command.namespace}/{command.name} is a reference to "
                               f"{source.namespace}/{source.name}, which lists nothing itself: resync "
                               f"{source.namespace}/{source.name}", command.name, command.namespace)
            return
        counted = domain.request_resync(record, command.id)
        if counted is not None:  # None: a redelivery of a resync already counted; only its fact is published again
            updated = msgspec.structs.replace(counted, traceparent=current_traceparent())
            await kv_save(kv, key, updated, revision)  # the reconciler sees the change and lists again
        await self.bus.publish(
            subjects.DATASET_ACCEPTED,
            DatasetAccepted(id=f"{command.id}.accepted", causation_id=command.id, name=command.name,
                            namespace=command.namespace, generation=record.generation),
        )

    async def _erase_command(self, delivery: Delivery) -> None:
        """A secret given in clear must not stay in the command stream for its week: the message is erased
        (overwritten) before the rejection is told. Failing to erase is logged and does not stop the rejection."""
        try:
            await self.bus.erase(subjects.STREAM_COMMANDS, delivery.stream_sequence)
        except Exception as err:
            log.warning("could not erase a command holding a secret", seq=delivery.stream_sequence,
                        error=type(err).__name__)

    async def _reject(self, causation: str, delivery: Delivery, reason: str, name: str = "",
                      namespace: str = "", not_found: bool = False) -> None:
        """The rejection fact of the command ``causation``: every command gets an answer, with a reason."""
        await self.bus.publish(
            subjects.DATASET_REJECTED,
            DatasetRejected(id=f"{causation}.rejected", causation_id=causation, reason=reason, name=name,
                            namespace=namespace, subject=delivery.subject, not_found=not_found),
        )

    async def _reject_missing(self, command: DatasetDelete | DatasetResync, delivery: Delivery) -> None:
        await self._reject(command.id, delivery, f"dataset {command.namespace}/{command.name} does not exist",
                           command.name, command.namespace, not_found=True)

    async def _reject_invalid_ref(self, command: DatasetDelete | DatasetResync, delivery: Delivery) -> bool:
        """Reject a command whose name or namespace cannot name a dataset (it is no valid KV key either)."""
        errors = domain.validate_ref(command.name, command.namespace)
        if not errors:
            return False
        log.info("rejected", command=command.id, reasons=errors)
        await self._reject(command.id, delivery, "; ".join(errors), command.name, command.namespace)
        return True

    async def delete(self, command: DatasetDelete, delivery: Delivery) -> None:
        if await self._reject_invalid_ref(command, delivery):
            return
        kv = await self.bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key(command.namespace, command.name)
        sequence = delivery.stream_sequence
        record, revision, note = await kv_load_deleted(kv, key, DatasetRecord)
        if record is None:
            await self._delete_missing(command, delivery, key, revision, domain.read_deletion_note(note))
            return
        if domain.delete_is_stale(record, sequence):
            reason = (f"dataset {command.namespace}/{command.name} was applied by a later command (stream sequence "
                      f"{record.command_sequence}); this delete (sequence {sequence}) came before it: delete it "
                      "again to remove it")
            log.info("rejected", dataset=subjects.key_name(key), reasons=[reason])
            await self._reject(command.id, delivery, reason, command.name, command.namespace)
            return
        manifests = domain.own_manifests(record)
        await kv_delete(kv, key, revision, note=domain.deletion_note(sequence, manifests))
        await self._finish_delete(command, key, manifests)

    async def _delete_missing(self, command: DatasetDelete, delivery: Delivery, key: str, revision: int | None,
                              earlier: domain.DeletionNote | None) -> None:
        """A delete that finds no record: this same delete delivered again after it removed the record (it
        finishes), or a name with no dataset (told so, and a delete marker is left, so an apply it overtook is
        refused when it comes)."""
        sequence = delivery.stream_sequence
        if earlier is not None and sequence and earlier.command_sequence == sequence:
            # It stopped after removing the record (a purge or a manifest delete failed): finish, idempotently.
            await self._finish_delete(command, key, earlier.manifests)
            return
        if sequence and (earlier is None or earlier.command_sequence < sequence):
            # Compare-and-set on the marker there is (0: nothing there): an apply landing meanwhile is never
            # deleted by this marker (Conflict → redelivered; it then finds that apply newer than itself).
            note = domain.deletion_note(sequence, earlier.manifests if earlier is not None else ())
            await kv_delete(await self.bus.kv(subjects.KV_DATASETS), key, revision or 0, note=note)
        if earlier is not None:
            # What an earlier delete of this name left behind, if it stopped halfway and is not delivered again.
            await self._clean_after_delete(key, earlier.manifests)
        await self._reject_missing(command, delivery)

    async def _clean_after_delete(self, key: str, manifests: list[str]) -> None:
        """Remove what a deleted dataset leaves outside its record: its node-cache entry (a later dataset of the
        same name would otherwise take its per-node figures), its last listing time, and its manifests. Idempotent."""
        await (await self.bus.kv(subjects.KV_NODE_CACHE)).purge(key)
        await (await self.bus.kv(subjects.KV_LISTINGS)).purge(key)
        await self._delete_manifests(*manifests)

    async def _finish_delete(self, command: DatasetDelete, key: str, manifests: list[str]) -> None:
        await self._clean_after_delete(key, manifests)
        log.info("deleted", dataset=subjects.key_name(key))
        await self.bus.publish(
            subjects.DATASET_DELETED,
            DatasetDeleted(id=f"{command.id}.deleted", causation_id=command.id, name=command.name,
                           namespace=command.namespace),
        )

    # --- runtime facts ---

    async def on_runtime_fact(self, fact: RuntimeFact, delivery: Delivery) -> None:
        sequence = delivery.stream_sequence
        if isinstance(fact, RuntimeAccepted):
            if self.wake is not None:  # its metadataSyncPolicy may have changed: when is the next listing?
                self.wake(subjects.resource_key(fact.namespace, fact.name))
            return
        if isinstance(fact, RuntimeStatusChanged):
            binding = domain.runtime_binding(fact.status, sequence)
        elif isinstance(fact, RuntimeDeleted):
            binding = domain.RuntimeBinding(fact_sequence=sequence)
        else:
            return
        errors = domain.validate_ref(fact.name, fact.namespace)
        if errors:  # names no dataset (and no KV key): not from the runtime service, which validates (found by fuzzing)
            raise Permanent(f"runtime fact for no dataset: {'; '.join(errors)}")
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        key = subjects.resource_key(fact.namespace, fact.name)
        stored, revision, note = await kv_load_deleted(bindings, key, domain.RuntimeBinding)
        if domain.binding_sequence(stored, note) > sequence:
            return  # a newer fact of this runtime was handled first (by another replica): this one is history
        # Compare-and-set at what was read, a delete marker included (0: the key never held anything); Conflict →
        # the loop redelivers at once.
        if isinstance(fact, RuntimeDeleted):
            # The runtime gone, its binding goes too, its fact's sequence kept in the marker: an older fact handled
            # after it (another replica's, a redelivery) is history still, and the marker sweep purges the marker
            # a week on, when no older fact is left in the facts stream. A put kept every runtime name ever
            # deleted in the bucket, and in each replica's memory.
            revision = await kv_delete(bindings, key, revision or 0, note=domain.deleted_binding_note(sequence))
            if self.bindings is not None:
                self.bindings.gone(key, revision)
        else:
            revision = await kv_save(bindings, key, binding, revision or 0)
            if self.bindings is not None:
                self.bindings.note(key, binding, revision)
        # From the binding in the bucket, read after the record: another replica's newer fact may land meanwhile.
        await self._update_bound_status(key, lambda record, current: domain.bound_status(record, current))

    async def retire_deleted_bindings(self, limit: int = BINDINGS_RETIRED_PER_PASS) -> None:
        """Turn the bindings deleted runtimes left as values (before a delete left a marker) into delete markers,
        which the marker sweep purges a week on. Only a binding that says nothing beyond its
        fact's sequence (read as no binding, so removing it changes no dataset's status, whether the dataset
        exists or not) and whose runtime has no record. Compare-and-set at the binding's revision, with its
        sequence in the marker: a runtime applied again meanwhile, whose fact writes a binding, or another replica
        retiring the same key, wins or loses whole; an older fact handled after finds the sequence in the
        marker."""
        if self.bindings is None or not self.bindings.ready.is_set():
            return
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        runtimes = await self.bus.kv(subjects.KV_RUNTIMES)
        retired: list[str] = []
        for key, binding, revision in self.bindings.empty()[:limit]:
            if (await kv_load(runtimes, key, RuntimeRecord))[0] is not None:
                continue  # a runtime that exists, NotReady: its binding stays
            try:
                marker = await kv_delete(bindings, key, revision,
                                         note=domain.deleted_binding_note(binding.fact_sequence))
            except Conflict:
                continue  # written meanwhile (a fact of a runtime applied again), or retired by another replica
            self.bindings.gone(key, marker)
            retired.append(key)
        if retired:
            log.info("deleted runtimes' bindings removed", count=len(retired))

    # --- agent inventory ---

    async def on_inventory(self, received: AnyInventory, delivery: Delivery) -> None:
        """Fold a node's inventory into the dataset's cacheStates (within a second of the agent's batch)."""
        event = upgrade(received)
        ref = event.dataset
        key = subjects.resource_key(ref.namespace, ref.name)
        if self.agents is not None and other_instance(event, self.agents.values.get(event.node)):
            # Two agents share the node's name: the node is the one its record holds, not both by turns.
            metrics.INVENTORY_OTHER_INSTANCE.labels(event.node).inc()
            self.other_instance_nodes.add(event.node)
            if self.other_instances.due(event.node, self.clock()):
                log.warning("inventory of another agent of the node ignored: two agents share the node name",
                            node=event.node, dataset=subjects.key_name(key), instance=event.instance)
            return
        kv = await self.bus.kv(subjects.KV_NODE_CACHE)
        # The entry first, then the record: a delete removes the record before it purges this entry, so when the
        # record is there the purge (if one comes) is after this read, and the write below, at this read's
        # revision, loses to it.
        current, revision, _ = await kv_load_deleted(kv, key, DatasetInventory)
        base = current
        if not domain.inventory_fits(current, event):
            # No entry yet, or one of another incarnation of the name: the record says whose the event is (read
            # once per entry: the entry written below is of the record's incarnation).
            base = domain.inventory_entry(current, await dataset_record(self.bus, key), event)
            if base is None:
                return  # a deleted dataset's mount, or that of the deleted one of a name applied again
        # Totals only: the block sets of every node would outgrow a KV value; the scheduler keeps those.
        folded, gap = fold_inventory(base, event, track_blocks=False)
        if folded is not current:
            # A first entry is written at the purge marker's revision, or 0 where the key never held anything: a
            # plain create writes over a purge marker, and brought back the entry of a dataset deleted since the
            # read above (Conflict: the redelivery then finds no record).
            await kv_save(kv, key, folded, revision if revision is not None else 0)
        if gap:
            log.info("inventory gap, asking for a snapshot", dataset=subjects.key_name(key), node=event.node,
                     seq=event.seq)
            request = InventoryRequest(node=event.node, dataset=ref)
            await self.bus.publish_core(subjects.INVENTORY_REQUEST, request)
        # With the binding: the capacity counts the nodes outside the runtime's ring that hold blocks.
        await self._update(key, lambda record, binding: domain.with_cache_states(record.status, folded, binding),
                           None, references=False, read_binding=True, mirrored_binding=True)

    async def on_scheduler_cache(self, fact: DatasetCacheObserved, delivery: Delivery) -> None:
        """Keep the scheduler's count of the dataset's bytes cached, each block once, with its node-cache fold: the
        fold here has the nodes' totals only (no block sets), so ``cachedPercentage`` takes this figure."""
        errors = domain.cache_fact_errors(fact)
        if errors:  # not the scheduler's (it publishes only datasets that exist, with what it counted)
            raise Permanent(f"scheduler cache fact refused: {'; '.join(errors)}")
        key = subjects.resource_key(fact.namespace, fact.name)
        kv = await self.bus.kv(subjects.KV_NODE_CACHE)
        # As for inventory: the entry, then the record, and a first entry written at the revision read, so a fact
        # of a dataset deleted meanwhile does not bring its entry back.
        current, revision, _ = await kv_load_deleted(kv, key, DatasetInventory)
        if current is None and await dataset_record_missing(self.bus, key):
            return
        updated = domain.with_unique_cached(current, fact, delivery.stream_sequence)
        if updated is None:
            return  # this figure or a later one is kept already
        await kv_save(kv, key, updated, revision if revision is not None else 0)  # Conflict → redelivered at once
        # The status from the fold as it is when written (an inventory event's write may land in between).
        await self._update(key, lambda record, _: record.status, None, references=False, read_binding=True,
                           read_cache=True, mirrored_binding=True)

    async def forget_departed_nodes(self, named: Mapping[str, set[str]], owns: Callable[[str], bool]) -> None:
        """Drop from each dataset (of those ``named`` → the nodes its status names, that this replica owns) the
        cache figures of nodes whose agent is gone: a node removed from the cluster sends no last inventory, and
        its bytes would count in ``cached`` and ``cachedPercentage`` for ever. A node that comes back (cut off
        for a while, its cache still there) is asked for snapshots when its agent beats again: an idle mount sends
        no inventory event, whose gap would ask."""
        if self.agents is None or not self.agents.ready.is_set():
            return
        # Records a TTL older than the newest beat expired in the bucket, without a delete the watch could see:
        # kept, every node that ever beat stayed in memory. Judged gone alike with or without its record.
        for node in domain.departed_nodes(list(self.agents.values), self.agents.values, AGENTS_TTL_SECONDS):
            self.agents.forget(node)
        for node in other_instance_over(self.other_instance_nodes, self.agents.values):
            metrics.INVENTORY_OTHER_INSTANCE.remove(node)
            self.other_instance_nodes.discard(node)
        now = self.clock()
        if not self._judges_agents(now):
            return
        still_gone = domain.departed_nodes(self._dropped_nodes, self.agents.values, AGENTS_TTL_SECONDS)
        for node in [node for node in self._dropped_nodes if node not in still_gone]:
            log.info("node back, asking for its inventory", node=node)
            await self.bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=node))
            del self._dropped_nodes[node]
        for key, nodes in sorted(named.items()):
            gone = domain.departed_nodes(nodes, self.agents.values, AGENTS_TTL_SECONDS)
            if gone and owns(key):
                if not self._judges_agents(now):
                    return  # the connection was lost during this sweep
                await self._forget_nodes(key, gone)

    def _judges_agents(self, now: float) -> bool:
        """Whether the agents' last beats say which nodes are gone: connected, and one TTL after this process first
        saw them and after the connection last came back. An outage longer than the TTL (of NATS, or of this
        process's connection) leaves every last beat old, the agents beat again within seconds after it, and an
        idle node's agent sends no inventory that would bring its figures back. Looked at again before each
        dataset: a sweep outlives a connection lost meanwhile."""
        reconnects = self.bus.reconnects()
        if self._agents_since is None or reconnects != self._agents_reconnects:
            # The clock as it is now, not the sweep's ``now``: a sweep that started before the connection was lost
            # would otherwise date the reconnect to its own start, a TTL too early after a long outage.
            self._agents_since, self._agents_reconnects = max(now, self.clock()), reconnects
        return self.bus.nc.is_connected and now - self._agents_since >= AGENTS_TTL_SECONDS

    async def _forget_nodes(self, key: str, nodes: set[str]) -> None:
        kv = await self.bus.kv(subjects.KV_NODE_CACHE)
        dropped = False
        for _ in range(CAS_ATTEMPTS):
            current, revision = await kv_load(kv, key, DatasetInventory)
            kept = domain.without_nodes(current or DatasetInventory(), nodes)
            if current is None or kept is current:
                break
            try:
                await kv_save(kv, key, kept, revision)
            except Conflict:
                continue
            dropped = True
            break
        else:
            raise Conflict(f"{subjects.key_name(key)}: node cache update lost {CAS_ATTEMPTS} times in a row")
        if current is None:
            record, _ = await kv_load(await self.bus.kv(subjects.KV_DATASETS), key, DatasetRecord)
            if record is None or is_reference(record.dataset):
                # A reference has no figures of its own: its status names its source's nodes, and follows the
                # source's own sweep. Nothing to drop, say or write (each sweep logged it, every 10 s).
                return
        if dropped:
            log.info("nodes gone, their cache figures dropped", dataset=subjects.key_name(key), nodes=sorted(nodes))
        for node in nodes:
            self._dropped_nodes.pop(node, None)  # moved to the end: the newest
            self._dropped_nodes[node] = None
        while len(self._dropped_nodes) > DEPARTED_KEPT:
            del self._dropped_nodes[next(iter(self._dropped_nodes))]
        # The figures of the fold as it is when the status is written: an inventory event handled since the fold
        # above was saved has its own status write, which this one must not put back to older figures.
        await self._update(key, lambda record, _: record.status, None, references=False, read_binding=True,
                           read_cache=True, mirrored_binding=True)

    # --- metadata sync (called by the reconciler) ---

    def observe(self, entry: KeyValue.Entry | Replay | None) -> None:
        """An entry of the reconciler's watch of ``shoal_datasets``: the records kept in memory follow it, and a
        deleted dataset's listing time goes with it (the reconciler schedules no sync of a deleted key, so nothing
        else would drop it, and it would grow with every dataset ever made)."""
        self.watched.observe(entry)
        if isinstance(entry, KeyValue.Entry) and entry.operation in ("DEL", "PURGE"):
            self._listed_at.pop(entry.key, None)

    async def sync(self, key: str) -> float | None:
        """Sync one dataset if it needs it; ``RetryLater`` while the retry of an unreachable store is not due yet,
        or once a sync found it unreachable (after putting that in the status). Returns the seconds until its
        next autoSync listing (the reconciler looks again then), or None when none is planned.

        The due time comes from the record (``domain.next_sync``), not from the reconciler's wait: the status
        write of a failed sync, or any other write, wakes the reconciler, which then waits out what is left.
        """
        watched = self.watched.get(key)
        record: DatasetRecord | None
        revision: int | None
        if watched is not None:
            record, revision = watched  # as the watch last showed it, or as this process wrote it
        else:
            record, revision = await kv_load(await self.bus.kv(subjects.KV_DATASETS), key, DatasetRecord)
        if record is None or revision is None:
            self._listed_at.pop(key, None)
            return None
        if record.manifests_left:  # the apply that left them did not remove them (NATS away, its retries spent)
            record, revision = await self._remove_manifests_left(key, record, revision)
            if record is None or revision is None:
                return None
        if is_reference(record.dataset):
            await self._follow(key, record)
            return None
        if self.references is not None:
            mounted_by = [f"{namespace}/{name}" for namespace, _, name in
                          (ref.partition(".") for ref in self.references.referencing(key))]
            if record.status.dataset_ref != sorted(mounted_by):
                await self._update_status(key, lambda current: domain.with_dataset_ref(current.status, mounted_by))
        meta = record.dataset.metadata
        policy = await self._sync_policy(meta.namespace, meta.name)
        now, retry_seconds, listed_at = self.clock(), self.settings.service.sync_retry_seconds, self._listed_at.get(key)
        due = domain.next_sync(record, now, retry_seconds, policy, listed_at)
        if due is not None and due.kind == "auto" and due.in_seconds <= 0:
            # Due by what this process knows; an unchanged listing by another process (before a restart) or replica
            # (before a hand-over, or since this one last owned it) left its time only in shoal_dataset_listings.
            kept, _ = await kv_load(await self.bus.kv(subjects.KV_LISTINGS), key, domain.Listing)
            if kept is not None and (listed_at is None or kept.listed_at > listed_at):
                self._listed_at[key] = kept.listed_at
                due = domain.next_sync(record, now, retry_seconds, policy, kept.listed_at)
        if due is None:
            return None
        if due.in_seconds > 0:
            if due.kind == "retry":
                raise RetryLater(f"{subjects.key_name(key)}: store unreachable, next sync in {due.in_seconds:.1f} s",
                                 due.in_seconds)
            return due.in_seconds
        # In the trace of the command that asked for it (kept in the record: the watch carries no headers).
        attributes: dict[str, str | int] = {DATASET_ATTRIBUTE: metrics.dataset_label(meta.namespace, meta.name),
                                             "shoal.generation": record.generation, "shoal.sync": due.kind}
        with self._tracer.start_as_current_span("sync dataset", context=context_of(record.traceparent),
                                                attributes=attributes):
            async with self._syncing:
                await self._sync(key, record, revision, due.kind)
        return policy.period_seconds if policy.auto and policy.period_seconds > 0 else None

    async def _sync_policy(self, namespace: str, name: str) -> domain.SyncPolicy:
        """The metadataSyncPolicy of the runtime of the same name (the runtime service's record holds its spec)."""
        key = subjects.resource_key(namespace, name)
        if self.policies is not None and self.policies.ready.is_set():
            spec = self.policies.get(key)
        else:
            runtime, _ = await kv_load(await self.bus.kv(subjects.KV_RUNTIMES), key, RuntimeRecord)
            spec = runtime.runtime.spec if runtime is not None else None
        return domain.sync_policy(spec, self.settings.service.autosync_seconds)

    async def _sync(self, key: str, record: DatasetRecord, revision: int, kind: domain.SyncKind = "spec") -> None:
        try:
            result = await self._list(record)
        except RetryLater as err:
            if kind == "auto":
                metrics.DATASET_AUTOSYNCS.labels(metrics.SYNC_FAILED).inc()
            await self._record_sync(key, record, revision, domain.SyncResult(
                generation=record.generation, requests=record.sync_requests, incarnation=record.incarnation,
                error=err.reason, retryable=True))
            raise RetryLater(err.reason, self.settings.service.sync_retry_seconds) from err
        self._listed_at[key] = self.clock()
        if kind == "auto":
            unchanged = domain.sync_changes_nothing(record, result)
            metrics.DATASET_AUTOSYNCS.labels(
                metrics.AUTOSYNC_UNCHANGED if unchanged else metrics.SYNC_FAILED if result.error
                else metrics.AUTOSYNC_CHANGED).inc()
            if unchanged:
                log.debug("autoSync: listing unchanged", dataset=subjects.key_name(key))
                await self._keep_listing_time(key, self._listed_at[key])
                return  # nothing new: no status write, so the mounts keep their manifest
            log.info("autoSync: listing changed", dataset=subjects.key_name(key), files=result.file_num,
                     error=result.error)
        await self._record_sync(key, record, revision, result)

    async def _keep_listing_time(self, key: str, listed_at: float) -> None:
        """Keep when an unchanged listing ran where a restarted process or the next owner finds it (the record says
        nothing of it). Not kept (NATS away): at worst one more listing after a restart, so no reason to fail."""
        try:
            listings = await self.bus.kv(subjects.KV_LISTINGS)
            await listings.put(key, msgspec.json.encode(domain.Listing(listed_at=listed_at)))
            if await dataset_record_missing(self.bus, key):
                # Deleted while it was listed (another replica's delete purged the time before this put): the
                # record was removed before that purge, so it is seen gone here and the time goes too.
                await listings.purge(key)
        except nats.errors.Error as err:
            log.warning("listing time not kept", dataset=subjects.key_name(key), error=repr(err))

    async def _list(self, record: DatasetRecord) -> domain.SyncResult:
        """The sync itself (list, write the manifest), timed by outcome: ok, or failed (an error or a raise).

        Any error but a retry's (``RetryLater``: a store unreachable; NATS away: the reconciler's schedule) is the
        sync's result, so it reaches the status with its reason: raised, the reconciler logged it and ran the sync
        again every few seconds, for ever, the dataset NotBound with no word of why."""
        started = time.perf_counter()
        outcome = metrics.SYNC_FAILED
        try:
            result = await sync_metadata(record, await ManifestStore.of(self.bus), self.settings.s3,
                                         self.settings.service.list_page_size, self.opener,
                                         local_roots=self.settings.service.local_roots,
                                         pvc_root=self.settings.service.pvc_root,
                                         page_seconds=self.settings.service.sync_page_seconds)
            outcome = metrics.SYNC_FAILED if result.error else metrics.OK
            return result
        except (RetryLater, nats.errors.Error):
            raise
        except Exception as err:
            error = cut_error(strip_userinfo(f"metadata sync failed: {type(err).__name__}: {err}", strict=True))
            # No traceback: it would repeat the exception's text unredacted.
            meta = record.dataset.metadata
            log.warning("sync failed unexpectedly", dataset=subjects.object_name(meta.namespace, meta.name),
                        error=error)
            return domain.SyncResult(generation=record.generation, requests=record.sync_requests,
                                     incarnation=record.incarnation, error=error)
        finally:
            metrics.DATASET_SYNC_SECONDS.labels(outcome).observe(time.perf_counter() - started)

    async def _record_sync(self, key: str, record: DatasetRecord, revision: int, result: domain.SyncResult) -> None:
        replaced = False
        # The manifest the record named before this status write, and the one it names after.
        before = after = ""

        def after_sync(current: DatasetRecord, binding: domain.RuntimeBinding) -> DatasetStatus:
            nonlocal replaced, before, after
            replaced = current.incarnation != result.incarnation
            if domain.sync_is_stale(current, result):
                # A newer spec or resync arrived meanwhile (its own sync follows), or the listed dataset was
                # deleted and the name applied again: this listing describes none of them.
                status = current.status
            else:
                status = domain.status_after_sync(current, result, binding.phase, self.clock(), binding.message,
                                                  binding=binding)
            before, after = current.status.manifest, status.manifest
            return status

        if not await self._update_bound_status(key, after_sync, known=(record, revision)) or replaced:
            # The dataset listed is gone: the manifest uploaded for it (named with its incarnation, so never the
            # new dataset's) would stay behind, and so would its listing time.
            self._listed_at.pop(key, None)
            await self._delete_manifests(domain.manifest_name(record))
            return
        # Every manifest is named by the spec and resync it lists, so the one the record no longer names is no
        # one's: a stale listing's upload, or the manifest this one replaced (no sync can name it again: a
        # status never goes back to an older spec or resync). Readers of the old one follow the record.
        await self._delete_manifests(*{name for name in (before, domain.manifest_name(record))
                                       if name and name != after})

    # --- reference datasets (dataset://, libs.references) ---

    async def _follow(self, key: str, record: DatasetRecord) -> None:
        """Mirror the source's status into a reference's (the reconciler calls this for the reference's own
        changes, and ``ReferenceIndex`` for each change or deletion of its source)."""
        source = await self._source_of(record.dataset)
        await self._update_status(key, lambda current: domain.reference_status(current, source, self.clock()),
                                  references=True)

    async def _source_of(self, dataset: Dataset) -> DatasetRecord | None:
        """The record of the dataset a reference mounts; None when it does not exist or this is no reference."""
        ref = reference_of(dataset)
        if ref is None:
            return None
        source, _ = await kv_load(await self.bus.kv(subjects.KV_DATASETS), ref.key, DatasetRecord)
        return source

    # --- helpers ---

    async def _binding(self, namespace: str, name: str) -> domain.RuntimeBinding:
        if self.bindings is not None and self.bindings.ready.is_set():
            return self.bindings.get(subjects.resource_key(namespace, name))
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        binding, _ = await kv_load(bindings, subjects.resource_key(namespace, name), domain.RuntimeBinding)
        return binding or domain.RuntimeBinding()

    def _mirrored_binding(self, key: str, record: DatasetRecord) -> domain.RuntimeBinding | None:
        """The binding the watch keeps, when it gives the capacity ``record`` was written with; None: read the
        bucket. Another replica's runtime fact may have written a newer binding and this record's status from it
        before the watch brought the binding here: the capacity from the older one would be written back over it.
        Such a record disagrees with the binding kept here (the bucket is read then, as before); one that agrees
        was written from it, or from one with the same capacity, which is all a cache figures' update takes."""
        if self.bindings is None or not self.bindings.ready.is_set():
            return None
        binding = self.bindings.get(key)
        if domain.dataset_capacity(binding, record.status.nodes) != record.status.cache_states.cache_capacity:
            return None
        return binding

    async def _update_status(self, key: str, compute: Callable[[DatasetRecord], DatasetStatus],
                             known: tuple[DatasetRecord, int] | None = None, references: bool = False) -> bool:
        """Apply ``compute`` to the stored record with compare-and-set; publish if the status changed.

        ``known``: the record and revision the caller read, tried first (a sync read it before listing): usually
        still current, which saves a read; compare-and-set catches it when it is not, and it is read again.
        A reference's status is its source's (``_follow``, which passes ``references``): any other update leaves it
        alone (a runtime of the same name, say). Returns False when the dataset does not exist (any more).
        """
        return await self._update(key, lambda record, _: compute(record), known, references, read_binding=False)

    async def _update_bound_status(self, key: str,
                                   compute: Callable[[DatasetRecord, domain.RuntimeBinding], DatasetStatus],
                                   known: tuple[DatasetRecord, int] | None = None) -> bool:
        """``_update_status`` for a status that follows the runtime's binding: each attempt reads the binding from
        the bucket after the record. A binding read before a conflict may be older than the status the conflicting
        write put in (a runtime's fact handled meanwhile): written back, the dataset would stay NotBound beside a
        Ready runtime. Read after the record, it is either current, or its fact's own update comes after this
        write and sees it."""
        return await self._update(key, compute, known, references=False, read_binding=True)

    async def _update(self, key: str, compute: Callable[[DatasetRecord, domain.RuntimeBinding], DatasetStatus],
                      known: tuple[DatasetRecord, int] | None, references: bool, read_binding: bool,
                      read_cache: bool = False, mirrored_binding: bool = False) -> bool:
        """``read_cache``: the cache figures always come from the node-cache fold read after the record (see
        ``takes_cache_states`` below for why after), not from a fold the caller read before.
        ``mirrored_binding``: ``compute`` takes only the capacity from the binding (the cache figures' updates), so
        the binding in memory serves (``_mirrored_binding``): a KV read per inventory event was one NATS request
        each."""
        kv = await self.bus.kv(subjects.KV_DATASETS)
        bindings = await self.bus.kv(subjects.KV_BINDINGS)
        for _ in range(CAS_ATTEMPTS + (known is not None)):
            fresh = known is None
            revision: int | None
            if known is not None:
                (record, revision), known = known, None
            else:
                loaded, revision = await kv_load(kv, key, DatasetRecord)
                if loaded is None:
                    return False
                record = loaded
            if is_reference(record.dataset) and not references:
                return True
            binding = domain.RuntimeBinding()
            mirrored = self._mirrored_binding(key, record) if read_binding and mirrored_binding else None
            if mirrored is not None:
                binding = mirrored
            elif read_binding:
                binding = (await kv_load(bindings, key, domain.RuntimeBinding))[0] or binding
            status = compute(record, binding)
            if not is_reference(record.dataset) and (read_cache or domain.takes_cache_states(record.status, status)):
                # Read after the record, like the binding: an inventory event's status write that this one does
                # not see yet comes after its fold was saved, so this read sees that fold or the write conflicts.
                cache, _ = await kv_load(await self.bus.kv(subjects.KV_NODE_CACHE), key, DatasetInventory)
                if cache is not None or read_cache:
                    status = domain.with_cache_states(status, cache or DatasetInventory(), binding)
            if status == record.status:
                if not fresh:
                    continue  # nothing to change in what the caller read; the stored record may differ
                return True
            updated = msgspec.structs.replace(record, status=status)
            try:
                new_revision = await kv_save(kv, key, updated, revision)
            except Conflict:
                continue
            self.watched.note(key, updated, new_revision)
            await self._publish_status(updated, new_revision)
            return True
        raise Conflict(f"{subjects.key_name(key)}: status update lost {CAS_ATTEMPTS} times in a row")

    async def _publish_status(self, record: DatasetRecord, revision: int) -> None:
        meta = record.dataset.metadata
        await self.bus.publish(
            subjects.DATASET_STATUS,
            DatasetStatusChanged(id=f"dataset.{meta.namespace}.{meta.name}.status.{revision}", name=meta.name,
                                 namespace=meta.namespace, generation=record.generation, status=record.status),
        )

    async def _delete_manifests(self, *names: str) -> None:
        """Remove these manifests (each once; one already gone is fine)."""
        manifests = await ManifestStore.of(self.bus)
        for name in dict.fromkeys(n for n in names if n):
            await manifests.delete(name)


async def dataset_record(bus: Bus, key: str) -> DatasetRecord | None:
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), key, DatasetRecord)
    return record


async def dataset_record_missing(bus: Bus, key: str) -> bool:
    return await dataset_record(bus, key) is None
