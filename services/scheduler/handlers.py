"""Scheduler handlers: inventory in (fold), datasets and manifests in (catalogs), heartbeats in (labels, liveness),
score requests answered from the same in-memory state.

I/O it owns: the inventory consumer's handler, the ``shoal_datasets`` watch (and loading a dataset's manifest when
it was synced again, tried again by ``retry_catalogs`` when loading failed), snapshot requests (``InventoryRequest``
on a gap, and to everyone at start: the fold lives in memory, so a restarted scheduler rebuilds it from fresh
snapshots), the ``sched.score.v1`` request/reply, and the sweep that forgets nodes whose agent went away.
``answer`` is synchronous and only reads memory: the NATS API, the webhook and the extender all call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from libs import metrics, subjects
from libs.bus import AGENTS_TTL_SECONDS, Bus, Delivery, KvMirror, Replay, kv_watch, retry_delay
from libs.events.agent import AgentRecord, AnyInventory, Inventory, InventoryRequest, upgrade
from libs.events.common import DECODE_ERRORS, ObjectRef
from libs.events.dataset import DatasetRecord
from libs.events.schedule import DatasetCacheObserved, ScoreReply, ScoreRequest
from libs.inventory import NodeNotes, other_instance, other_instance_over
from libs.manifest import ManifestStore
from libs.references import Reference, reference_of
from libs.telemetry import get_logger
from services.scheduler import domain
from services.scheduler.fold import CacheFold, Catalog, DatasetKey, LiveView

log = get_logger(__name__)

# Decision outcomes over NATS: answered, error (an error answer: unknown dataset, too large...), malformed (not a
# ScoreRequest). Ignored inventory: unknown_dataset (deleted, or not yet applied).
# Inventory events by what the fold made of them (libs.metrics.FOLD_EVENTS): folded (the fold moved), stale (old or
# redelivered: nothing changed), unknown_dataset. Bound once: this is the scheduler's busiest path.
_FOLDED = metrics.adder(metrics.FOLD_EVENTS.labels("folded"))
_STALE = metrics.adder(metrics.FOLD_EVENTS.labels("stale"))
_UNKNOWN_DATASET = metrics.adder(metrics.FOLD_EVENTS.labels("unknown_dataset"))
_OTHER_INSTANCE = metrics.adder(metrics.FOLD_EVENTS.labels("other_instance"))
_NODE_GONE = metrics.adder(metrics.FOLD_EVENTS.labels("node_gone"))
_FOLD_LAG = metrics.setter(metrics.FOLD_LAG_SECONDS)
# The scheduler's series without labels are served by the scheduler only (see libs.metrics).
metrics.register(metrics.FOLD_LAG_SECONDS, metrics.SNAPSHOT_REQUESTS)

_REQUEST_DECODER = msgspec.json.Decoder(ScoreRequest)
_REPLY_ENCODER = msgspec.json.Encoder()
# Distinct questions whose answers are kept; past this, or past ``ANSWERS_KEPT_NODES``, the memory starts over.
ANSWERS_KEPT = 1024
# Nodes the kept answers list in all (a score is ~200 bytes: ~20 MB). A count of questions alone does not bound
# them: the webhook and the extender ask for every node (``limit: 0``), and the extender names a different sample of
# feasible nodes for most pods, so 1,024 kept questions over thousands of nodes were gigabytes.
ANSWERS_KEPT_NODES = 100_000
_CANDIDATES_ENCODER = msgspec.json.Encoder()
_RECORD_DECODER = msgspec.json.Decoder(DatasetRecord)
# A manifest that could not be loaded (a NATS request timed out, a cluster electing a leader) is tried again on the
# redelivery schedule (0.5 s doubling, at most 30 s: ``retry_delay``), this many times in all (~2.5 min: a failover
# is over in seconds); after that, at the next change of the dataset's record, whatever it changes. Until then the
# dataset has no catalog, and every cached block counts.
CATALOG_ATTEMPTS = 10
# Cache facts (``publish_cache``) published at once: after a start, or a burst over thousands of datasets, a tick
# is a few dozen round trips to JetStream rather than one per dataset.
CACHE_FACTS_AT_ONCE = 64
# The answer to every question asked before the datasets' records are read (just after a start).
NOT_READY = "the scheduler is starting (datasets not read yet); ask again shortly"
# The answer to every question asked after a start while mounts that the agents' heartbeats report serving have not
# sent the snapshot asked for at start: the fold starts empty, and a ranking made from part of the snapshots names a
# few of the holders (a webhook's required host list would freeze a pod to them for good).
NOT_WARM = "the scheduler is starting (inventory snapshots not all read yet); ask again shortly"
# How long after the start's snapshot request it waits for those snapshots at most: a mount whose publisher is
# failing must not keep the scheduler from answering.
WARMUP_SECONDS = 15.0
# Nodes remembered as gone (``SchedulerHandlers.gone``), the latest ones: a name each (~100 bytes), so node churn
# grows it by at most ~1 MB; a node forgotten longer ago than that many others is judged as a node never seen.
GONE_KEPT = 10_000


def _request_key(request: ScoreRequest) -> Any:
    """The question without its id: equal for two requests that must get the same answer. The candidates are kept
    as a digest of their encoding (the extender sends every feasible node with all its labels: kept as they are,
    they took more memory than the answer); the same nodes and labels in another order only miss."""
    candidates = (hashlib.blake2b(_CANDIDATES_ENCODER.encode(request.candidates), digest_size=16).digest()
                  if request.candidates else b"")
    return (tuple((use.namespace, use.name, tuple(use.paths), use.required) for use in request.datasets),
            candidates, request.limit)


def _listed(reply: ScoreReply) -> int:
    """What a kept reply counts against ``ANSWERS_KEPT_NODES``: its nodes, and one for the question."""
    return len(reply.scores) + len(reply.filtered) + 1


class _Identified(msgspec.Struct):
    id: str = ""


_ID_DECODER = msgspec.json.Decoder(_Identified)


def _request_id(data: bytes) -> str:
    """The id of a request that is otherwise malformed, so the caller can match the error to its request."""
    try:
        return _ID_DECODER.decode(data).id
    except DECODE_ERRORS:
        return ""


def dataset_key(kv_key: str) -> DatasetKey | None:
    """``<namespace>.<name>`` (both DNS labels, no dots) as (namespace, name); None for anything else."""
    namespace, dot, name = kv_key.partition(".")
    return (namespace, name) if dot and namespace and name and "." not in name else None


@dataclass(frozen=True)
class DatasetInfo:
    total: int
    # Changes whenever the dataset service writes a new manifest (a sync or a resync).
    manifest_version: tuple[str, int, int, str]
    # The Dataset's nodeAffinity as given: a filtered node outside it is told so.
    node_affinity: Mapping[str, Any] | None = None
    # Which life of the name it is (``DatasetRecord.incarnation``): inventory of a mount of another is not its.
    incarnation: str = ""


def info_of(record: DatasetRecord) -> DatasetInfo:
    status = record.status
    return DatasetInfo(total=status.ufs_total_bytes, manifest_version=(
        status.manifest, status.synced_generation, status.synced_requests, status.last_sync_time),
        node_affinity=record.dataset.spec.node_affinity, incarnation=record.incarnation)


@dataclass
class _Unloaded:
    """A dataset's manifest that failed to load: which one, how often, and when it is tried again."""

    manifest: str
    version: tuple[str, int, int, str]
    attempts: int
    due: float


class Publisher(Protocol):
    """Which datasets' cache facts this replica publishes (``libs.members.Members``): one live replica each."""

    ready: asyncio.Event

    @property
    def live(self) -> tuple[str, ...]: ...

    def owns(self, key: str) -> bool: ...


@dataclass
class SchedulerHandlers:
    bus: Bus
    agents: KvMirror[AgentRecord]
    weights: domain.Weights = field(default_factory=domain.Weights)
    node_timeout: float = 60.0
    clock: Callable[[], float] = time.time
    fold: CacheFold = field(default_factory=CacheFold)
    datasets: dict[DatasetKey, DatasetInfo] = field(default_factory=dict)
    # Reference datasets (dataset://): their key → the source whose cache they read (``domain.through_references``).
    references: dict[DatasetKey, Reference] = field(default_factory=dict)
    # Nodes whose agent was seen beating: when such a node's record is gone or stale, its cache is forgotten. Past
    # ``node_timeout`` after the start (``_settled_in``) every node is judged so, beaten or not.
    beating: set[str] = field(default_factory=set)
    datasets_ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Counts of this process's outcomes, for tests and the README's "errors are counted" (also in /metrics).
    counts: dict[str, int] = field(default_factory=dict)
    # Where manifests are loaded from (tests hand in one that fails).
    manifests: Callable[[Bus], Awaitable[ManifestStore]] = ManifestStore.of
    warmup_seconds: float = WARMUP_SECONDS
    # The replicas' split of the datasets whose cache facts they publish; None: this process publishes them all.
    publisher: Publisher | None = None
    # When inventory of another agent process of each node was last logged (``on_inventory``).
    other_instances: NodeNotes = field(default_factory=NodeNotes)
    # The nodes with a series of INVENTORY_OTHER_INSTANCE, removed once it no longer applies (``other_instance_over``).
    other_instance_nodes: set[str] = field(default_factory=set)
    # Nodes whose cache the sweep forgot because their agent went away (record deleted, or no heartbeat for
    # ``node_timeout``), oldest first, at most ``GONE_KEPT``: their inventory is ignored until their agent beats
    # again (``on_inventory``), then they are asked for a snapshot (``sweep``). Taken as it came, a late event (or
    # one of a mount process outliving its agent's heartbeats) brought the node back as a node that never beat,
    # which no sweep forgot again. The list lives in memory only: after a restart, a node that has no agent record
    # at all is judged by ``_settled_in`` instead.
    gone: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.totals = _Totals(self.datasets)
        self.info_version = 0
        self.labels_version = 0
        # The view keeps the nodes' places (sorted names, zones, regions) until the node set or the labels move.
        self.view = LiveView(self.fold, self.totals, self._labels, self._alive, lambda: self.labels_version,
                             agents=self._agent, affinities=self._affinity)
        # Decisions already made, by request, with the stamps of what they read (see ``answer``).
        self._answers: dict[Any, tuple[Any, ScoreReply]] = {}
        # Nodes the kept answers list (``ANSWERS_KEPT_NODES``).
        self._answers_nodes = 0
        self._labels_seen: Any = ()
        # Per node: the record its labels and mount states were last read from, and what they were. Heartbeats
        # replace a node's record every beat; only a replaced record is read again (1,000 nodes read whole every
        # second held the event loop ~10 ms each time: a decision asked then waited for it).
        self._label_records: dict[str, AgentRecord] = {}
        self._label_prints: dict[str, tuple[object, ...]] = {}
        # Datasets whose current manifest failed to load (``retry_catalogs``).
        self._unloaded: dict[DatasetKey, _Unloaded] = {}
        # When the start's snapshot request went out (``watch_datasets``; None: not yet, or handlers fed by hand),
        # and whether the snapshots of the serving mounts are in since (``warming``).
        self._asked_at: float | None = None
        self._warm = False
        # Each dataset's unique and nodes' cached bytes as this process last published them (``publish_cache``).
        self._published: dict[DatasetKey, tuple[int, int]] = {}
        # Whether this replica publishes a dataset's facts, per dataset, for the live replicas ``_owned_among``:
        # asked once per dataset and membership, not for every dataset at every tick (a rendezvous hash each).
        self._owned: dict[DatasetKey, bool] = {}
        self._owned_among: tuple[str, ...] = ()
        # When this process started, and whether ``node_timeout`` has passed since: ``_settled_in``.
        self._started_at = self.clock()
        self._settled = False

    def _settled_in(self) -> bool:
        """Whether ``node_timeout`` has passed since the start (and the agents' records are read): from then on a
        node whose agent is alive has a fresh record, so a node with none is not taken in from its inventory alone
        (``on_inventory``) and the sweep forgets one without a fresh record whether or not it was seen beating.
        Before then a node without a record may be an agent whose first beat is on its way (or records not read
        yet), and is taken in. Without this, the nodes the sweep forgot (``gone``, in memory) came back after a
        restart: a node whose agent went away but whose mount processes still publish was taken in from their
        snapshots as a node that never beat, which no sweep forgot again."""
        if not self._settled:  # for good once it is
            self._settled = self.clock() - self._started_at >= self.node_timeout and self.agents.ready.is_set()
        return self._settled

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # --- answers ---

    def answer(self, request: ScoreRequest) -> ScoreReply:
        """The decision for one request, from memory (the webhook, the extender and the NATS API all call this).
        Not counted here: each way counts its own requests, once each (``answer_raw`` for NATS, ``http`` per route;
        the HTTP front may ask several questions for one request).

        A decision is kept and given again while nothing it read has changed: the requested datasets' caches and
        catalogs, the set of nodes, the datasets' totals, and the nodes' labels and liveness (re-read every second
        by ``refresh_labels``). Many pods of one job ask the same question in a burst; only the first pays for it.
        """
        if not self.datasets_ready.is_set():
            # Every dataset would look unknown and every node cache-free: an error lets the caller fall back (the
            # webhook writes nothing, kube-scheduler ignores the extender) instead of placing pods on a wrong answer.
            return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=NOT_READY)
        if waiting := self.warming():
            return ScoreReply(id=f"{request.id}.reply", causation_id=request.id, error=waiting)
        request = domain.through_references(request, self.references)
        key = _request_key(request)
        stamp = self._stamp(request)
        known = self._answers.get(key)
        if known is not None and known[0] == stamp:
            reply = msgspec.structs.replace(known[1], id=f"{request.id}.reply", causation_id=request.id)
        else:
            reply = domain.score(request, self.view, self.weights)
            self._keep(key, stamp, reply)
        return reply

    def warming(self) -> str:
        """Why the fold is not yet what the agents hold after a start (empty once it is, for good): the snapshots
        asked for at start of the mounts that fresh heartbeats report serving, of datasets that exist, are not all
        in, and ``warmup_seconds`` have not passed since they were asked for. Also ``/readyz``'s inventory check."""
        if self._warm or self._asked_at is None:  # before the records are read, ``answer`` says NOT_READY
            return ""
        missing = self._unsnapshotted() if self.agents.ready.is_set() else -1
        if missing == 0 or self.clock() - self._asked_at >= self.warmup_seconds:
            if missing != 0:
                log.warning("answering without every mount's snapshot", missing=missing,
                            waited=self.warmup_seconds)
            self._warm = True
            return ""
        return NOT_WARM

    def _unsnapshotted(self) -> int:
        """Serving mounts (fresh heartbeats, datasets that exist) whose complete snapshot the fold has not folded."""
        now, missing = self.clock(), 0
        for node, record in self.agents.values.items():
            if now - record.received_at > self.node_timeout:
                continue
            beat = record.heartbeat
            serving = {(group.namespace, name) for group in beat.mount_groups if group.state == "Serving"
                       for name in group.datasets}
            serving |= {(report.dataset.namespace, report.dataset.name) for report in beat.mounts
                        if report.state == "Serving"}
            for key in serving:
                cache = self.fold.datasets.get(key, {}).get(node)
                if key in self.datasets and (cache is None or not cache.position.exact):
                    missing += 1
        return missing

    def _keep(self, key: Any, stamp: Any, reply: ScoreReply) -> None:
        """Keep a decision, within ``ANSWERS_KEPT`` questions and ``ANSWERS_KEPT_NODES`` nodes listed."""
        if known := self._answers.pop(key, None):
            self._answers_nodes -= _listed(known[1])
        nodes = _listed(reply)
        if len(self._answers) >= ANSWERS_KEPT or self._answers_nodes + nodes > ANSWERS_KEPT_NODES:
            self._answers.clear()
            self._answers_nodes = 0
        if nodes <= ANSWERS_KEPT_NODES:
            self._answers[key] = (stamp, reply)
            self._answers_nodes += nodes

    def _stamp(self, request: ScoreRequest) -> Any:
        fold = self.fold
        if not request.datasets:
            return fold.generation, self.info_version, self.labels_version
        return (tuple(fold.versions.get((use.namespace or "default", use.name), 0) for use in request.datasets),
                fold.nodes_version, self.info_version, self.labels_version)

    def answer_raw(self, data: bytes) -> bytes:
        """``sched.score.v1`` over NATS: a malformed request gets a ``ScoreReply`` with the reason, never silence."""
        try:
            request = _REQUEST_DECODER.decode(data)
        except DECODE_ERRORS as err:
            metrics.DECISIONS.labels(metrics.WAY_NATS, "malformed").inc()
            self._count("malformed")
            return _REPLY_ENCODER.encode(ScoreReply(causation_id=_request_id(data),
                                                    error=f"invalid sched.score.v1 request: {err}"))
        reply = self.answer(request)
        outcome = "error" if reply.error else "answered"
        metrics.DECISIONS.labels(metrics.WAY_NATS, outcome).inc()
        self._count(outcome)
        return _REPLY_ENCODER.encode(reply)

    # --- inventory ---

    async def on_inventory(self, received: AnyInventory, delivery: Delivery) -> None:
        await self.datasets_ready.wait()
        event = upgrade(received)
        key = (event.dataset.namespace, event.dataset.name)
        info = self.datasets.get(key)
        if info is None or (event.dataset_incarnation != info.incarnation and event.dataset_incarnation
                            and info.incarnation):
            # A deleted dataset's last events (its cache freed) must not bring it back, nor count for a dataset
            # applied again under its name (another incarnation); a dataset not applied yet (or whose new
            # incarnation the watch has not shown yet) has no mounts to report. Either way, a later delta of a
            # dataset that exists asks for a snapshot.
            _UNKNOWN_DATASET(1)
            self._count("inventory_unknown_dataset")
            return
        if event.instance and other_instance(event, self.agents.values.get(event.node)):
            self._other_instance(event)
            return
        if self.gone and event.node in self.gone:
            if not self._beats(event.node):
                _NODE_GONE(1)
                self._count("inventory_node_gone")
                return
            del self.gone[event.node]  # back: its events count again (a delta finds no position and asks)
        elif self._settled_in() and event.node not in self.agents.values:
            # No agent on record, well after the start: gone (or not beating yet). Noted, so that its first beat
            # asks it for its inventory (``sweep``).
            self._note_gone(event.node)
            _NODE_GONE(1)
            self._count("inventory_node_gone")
            return
        generation = self.fold.generation
        ask = self.fold.apply(event)
        if self.fold.generation == generation:
            _STALE(1)
        else:
            _FOLDED(1)
            if delivery.published_at:  # JetStream's time of the event: how far behind the fold is
                _FOLD_LAG(max(0.0, self.clock() - delivery.published_at))
        if ask:
            log.info("inventory gap, asking for a snapshot", dataset=subjects.object_name(*key), node=event.node,
                     seq=event.seq)
            await self.ask_snapshot(event.node, event.dataset)

    def _other_instance(self, event: Inventory) -> None:
        """Count and (at most once a minute per node) log an event of another agent process than the one the node's
        record holds: two agents share the node's name, and only one of them is the node here."""
        _OTHER_INSTANCE(1)
        metrics.INVENTORY_OTHER_INSTANCE.labels(event.node).inc()
        self.other_instance_nodes.add(event.node)
        self._count("inventory_other_instance")
        if self.other_instances.due(event.node, self.clock()):
            record = self.agents.values.get(event.node)
            log.warning("inventory of another agent of the node ignored: two agents share the node name",
                        node=event.node, instance=event.instance,
                        held=record.heartbeat.instance if record is not None else None)

    async def ask_snapshot(self, node: str = "", dataset: ObjectRef | None = None) -> None:
        metrics.SNAPSHOT_REQUESTS.inc()
        self._count("snapshot_requests")
        await self.bus.publish_core(subjects.INVENTORY_REQUEST, InventoryRequest(node=node, dataset=dataset))

    async def publish_cache(self) -> None:
        """Publish ``scheduler.dataset.cache.v1`` for each dataset whose bytes in the cache, each block once
        (``CacheFold.published_unique``: a file's blocks count up to its size), or whose nodes' own ``cachedBytes``
        summed (``CacheFold.reported``), changed since this process last published them: the dataset service's
        ``cachedPercentage`` (it sums the nodes' own figures otherwise, counting twice a block two nodes hold), which
        counts what its sum gained since the fact as new blocks, so a sum that moved alone (a second copy of blocks,
        an old file version's evicted) is said too.
        Called every second (``app.CACHE_FACTS_SECONDS``), so at most one fact per dataset and second however many
        events moved it. Not while the fold is starting: a fold rebuilding from the agents' snapshots would say
        less than is cached. After a start each dataset with inventory is published once again (harmless). A fact
        whose publish failed is published at the next tick (the figure then current).

        With several replicas, each dataset's facts come from one of them (``publisher``): replicas fold the same
        events, but each at its own pace, and two publishing one dataset a moment apart would send its figure back
        and forth. A replica that gains a dataset (another one left) publishes its figure once again."""
        publisher = self.publisher
        if not self.datasets_ready.is_set() or self.warming() or (publisher and not publisher.ready.is_set()):
            return
        if publisher is not None and publisher.live != self._owned_among:
            self._owned_among = publisher.live
            self._owned.clear()
            for key in [key for key in self._published if not self._publishes(key)]:
                del self._published[key]
        due: list[tuple[DatasetKey, tuple[int, int], DatasetCacheObserved]] = []
        for key, nodes in self.fold.datasets.items():
            info = self.datasets.get(key)
            if info is None or (publisher is not None and not self._publishes(key)):
                continue  # before the figures: another replica's datasets cost this one no count of their files
            figures = (self.fold.published_unique(key), self.fold.reported.get(key, 0))
            if self._published.get(key) == figures:
                continue
            positions = [(node, cache.position.incarnation, cache.position.seq) for node, cache in nodes.items()]
            due.append((key, figures, domain.cache_fact(key, *figures, len(self.fold.held.get(key, {})), positions,
                                                        info.manifest_version, self.clock())))
        failed: BaseException | None = None
        for start in range(0, len(due), CACHE_FACTS_AT_ONCE):
            chunk = due[start:start + CACHE_FACTS_AT_ONCE]
            results = await asyncio.gather(*(self.bus.publish(subjects.SCHEDULER_DATASET_CACHE, fact)
                                             for _, _, fact in chunk), return_exceptions=True)
            for (key, figures, _), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    failed = result
                elif key in self.datasets:  # not forgotten while publishing (an applied-again one starts anew)
                    self._published[key] = figures
                    self._count("cache_facts")
        if failed is not None:
            log.warning("cache facts not all published, again at the next tick", error=repr(failed))

    def _publishes(self, key: DatasetKey) -> bool:
        """Whether this replica publishes ``key``'s cache facts among the live replicas ``_owned_among``."""
        owned = self._owned.get(key)
        if owned is None:
            assert self.publisher is not None
            owned = self._owned[key] = self.publisher.owns(subjects.resource_key(*key))
        return owned

    # --- datasets and their manifests ---

    async def watch_datasets(self, stopping: asyncio.Event) -> None:
        """Follow ``shoal_datasets``: totals and catalogs of the datasets that exist; forget deleted ones. Once the
        initial values are in, ask every agent for a snapshot (the fold is rebuilt from them after a restart)."""
        replaying: set[DatasetKey] | None = set()
        asked = False
        async with contextlib.aclosing(kv_watch(await self.bus.kv(subjects.KV_DATASETS), stopping,
                                                self.bus.reconnects)) as entries:
            async for entry in entries:
                if isinstance(entry, Replay):
                    replaying = set()
                elif entry is None:
                    if replaying is not None:
                        for gone in (set(self.datasets) | set(self.references)) - replaying:
                            self.forget_dataset(gone)
                    replaying = None
                    if not asked:
                        self._asked_at = self.clock()  # answers wait for the snapshots from the moment they can
                    self.datasets_ready.set()
                    if not asked:
                        asked = True
                        await self.ask_snapshot()
                else:
                    key = dataset_key(entry.key)
                    if key is None:
                        continue
                    if entry.operation in ("DEL", "PURGE") or entry.value is None:
                        self.forget_dataset(key)
                        continue
                    try:
                        record = _RECORD_DECODER.decode(entry.value)
                    except (msgspec.ValidationError, msgspec.DecodeError):
                        log.warning("undecodable dataset record ignored", key=entry.key)
                        continue
                    if replaying is not None:
                        replaying.add(key)
                    await self.dataset_changed(key, record)

    async def dataset_changed(self, key: DatasetKey, record: DatasetRecord) -> None:
        source = reference_of(record.dataset)
        if source is not None:  # no cache of its own: its uses are its source's (answer)
            if key in self.datasets:
                self.forget_dataset(key)
            self.references[key] = source
            return
        self.references.pop(key, None)
        info = info_of(record)
        before = self.datasets.get(key)
        if before is not None and before.incarnation != info.incarnation:
            # Deleted and applied again, the delete unseen (a replay after a reconnect shows only the newest
            # record): the deleted one's caches are not the new one's.
            self.forget_dataset(key)
            before = None
        self.datasets[key] = info
        if before != info:
            self.info_version += 1
        if before is not None and before.manifest_version == info.manifest_version:
            unloaded = self._unloaded.get(key)
            if unloaded is not None and unloaded.attempts >= CATALOG_ATTEMPTS:
                # Given up on: this change has it tried again (by ``retry_catalogs``, not holding up the watch).
                unloaded.attempts, unloaded.due = 0, self.clock()
            return
        self._unloaded.pop(key, None)
        if not record.status.manifest:
            self.fold.set_catalog(key, None)
            return
        await self._load_catalog(key, record.status.manifest, info.manifest_version, attempts=0)

    async def _load_catalog(self, key: DatasetKey, manifest: str, version: tuple[str, int, int, str],
                            attempts: int) -> None:
        """Load the manifest behind ``version`` into the fold's catalog; on failure, note it for ``retry_catalogs``.
        Nothing is kept when the dataset moved on meanwhile (deleted, or a newer manifest)."""
        try:
            entries = await (await self.manifests(self.bus)).load(manifest)
        except Exception as err:
            current = self.datasets.get(key)
            if current is None or current.manifest_version != version:
                return
            if key in self.fold.catalogs:  # the previous manifest's: no catalog until this one loads
                self.fold.set_catalog(key, None)
            attempts += 1
            given_up = attempts >= CATALOG_ATTEMPTS
            delay = retry_delay(attempts)
            self._unloaded[key] = _Unloaded(manifest, version, attempts,
                                            float("inf") if given_up else self.clock() + delay)
            log.warning("manifest not loaded", dataset=subjects.object_name(*key), manifest=manifest, error=str(err),
                        attempts=attempts, retry="at the dataset's next change" if given_up else f"in {delay:g} s")
            return
        current = self.datasets.get(key)
        if current is None or current.manifest_version != version:
            return
        if self._unloaded.pop(key, None) is not None:
            log.info("manifest loaded after all", dataset=subjects.object_name(*key), manifest=manifest)
        self.fold.set_catalog(key, Catalog(entries))

    async def retry_catalogs(self) -> None:
        """Load again the manifests whose load failed and whose retry is due."""
        now = self.clock()
        for key, unloaded in list(self._unloaded.items()):
            if unloaded.due <= now and self._unloaded.get(key) is unloaded:
                await self._load_catalog(key, unloaded.manifest, unloaded.version, unloaded.attempts)

    def forget_dataset(self, key: DatasetKey) -> None:
        self.references.pop(key, None)
        self._published.pop(key, None)  # one applied again starts from nothing
        self._owned.pop(key, None)
        self._unloaded.pop(key, None)
        self.datasets.pop(key, None)
        self.info_version += 1
        self.fold.forget_dataset(key)

    # --- nodes ---

    def _labels(self, node: str) -> Mapping[str, str]:
        record = self.agents.values.get(node)
        return record.heartbeat.labels if record is not None else {}

    def _agent(self, node: str) -> domain.NodeAgent:
        record = self.agents.values.get(node)
        if record is None:
            return domain.NodeAgent(None)
        return domain.NodeAgent(record.heartbeat, fresh=self.clock() - record.received_at <= self.node_timeout)

    def _affinity(self, dataset: DatasetKey) -> Mapping[str, Any] | None:
        info = self.datasets.get(dataset)
        return info.node_affinity if info is not None else None

    def _beats(self, node: str) -> bool:
        """Whether the node's agent has a fresh heartbeat on record."""
        record = self.agents.values.get(node)
        return record is not None and self.clock() - record.received_at <= self.node_timeout

    def _alive(self) -> Iterator[str]:
        now = self.clock()
        return (node for node, record in self.agents.values.items() if now - record.received_at <= self.node_timeout)

    async def refresh_labels(self) -> None:
        """Notice changed labels, nodes coming or going, and mounts changing state (heartbeats rewrite every record
        every beat, so only what decisions read is compared: the reasons of filtered nodes read the mounts' states
        and which nodes have a record at all)."""
        changed = False
        records = self.agents.values
        for node, record in records.items():
            if self._label_records.get(node) is record:
                continue
            self._label_records[node] = record
            printed = (tuple(sorted(record.heartbeat.labels.items())), _mount_states(node, self.agents))
            if self._label_prints.get(node) != printed:
                self._label_prints[node] = printed
                changed = True
        for node in [node for node in self._label_records if node not in records]:
            del self._label_records[node]
            del self._label_prints[node]
        seen = (frozenset(self._alive()), frozenset(records))
        if changed or seen != self._labels_seen:
            self._labels_seen = seen
            self.labels_version += 1

    async def sweep(self) -> None:
        """Forget the cache of nodes whose agent went away (record deleted, or no heartbeat for ``node_timeout``),
        and the records and names of agents gone for good: with nodes coming and going, neither grows. A forgotten
        node whose agent beats again is asked for a snapshot (an idle mount sends no event whose gap would ask)."""
        if not self.agents.ready.is_set():
            return
        now = self.clock()
        forget_after = max(AGENTS_TTL_SECONDS, self.node_timeout)
        for node, last in list(self.agents.values.items()):
            if now - last.received_at > forget_after:
                self.agents.forget(node)  # expired in the bucket, without a delete the watch could see
        for node in other_instance_over(self.other_instance_nodes, self.agents.values):
            metrics.INVENTORY_OTHER_INSTANCE.remove(node)
            self.other_instance_nodes.discard(node)
        self.beating |= set(self.agents.values)
        judged = self.fold.nodes() if self._settled_in() else self.fold.nodes() & self.beating
        for node in sorted(judged):
            record = self.agents.values.get(node)
            if record is None or now - record.received_at > self.node_timeout:
                log.info("node gone, its cache forgotten", node=node)
                self.fold.forget_node(node)
                self.beating.discard(node)
                self._note_gone(node)
        for node in [node for node in self.gone if self._beats(node)]:
            # Its agent beats again: what its mounts hold now, rather than waiting for their next change.
            log.info("node back, asking for its inventory", node=node)
            del self.gone[node]
            await self.ask_snapshot(node)
        # A node that beat once and now has neither a record nor a cache here has nothing left to forget.
        self.beating &= set(self.agents.values) | self.fold.nodes()

    def _note_gone(self, node: str) -> None:
        """Remember ``node`` as gone, the latest (at most ``GONE_KEPT``)."""
        self.gone.pop(node, None)
        self.gone[node] = None
        if len(self.gone) > GONE_KEPT:
            del self.gone[next(iter(self.gone))]


def _mount_states(node: str, agents: KvMirror[AgentRecord]) -> tuple[object, ...]:
    """The states of the node's mounts as its last heartbeat reports them."""
    record = agents.values.get(node)
    if record is None:
        return ()
    beat = record.heartbeat
    return (*((group.namespace, group.state, tuple(group.datasets)) for group in beat.mount_groups),
            *((report.dataset.namespace, report.dataset.name, report.state) for report in beat.mounts))


class _Totals(Mapping[DatasetKey, int]):
    """Datasets that exist → their bytes, read through to the handlers' dataset infos (no copy per decision)."""

    def __init__(self, datasets: dict[DatasetKey, DatasetInfo]) -> None:
        self.datasets = datasets

    def __getitem__(self, key: DatasetKey) -> int:
        return self.datasets[key].total

    def __contains__(self, key: object) -> bool:
        return key in self.datasets

    def __iter__(self) -> Iterator[DatasetKey]:
        return iter(self.datasets)

    def __len__(self) -> int:
        return len(self.datasets)
