"""Runtime events: the cache runtime of a dataset (replicas, tiered store, block size), commands and facts.

Tier fields keep Fluid's names (``tieredstore.levels[].mediumtype/path/quota/high/low``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from libs.events.common import Event, ObjectMeta
from libs.events.dataset import Condition

MediumType = Literal["MEM", "SSD", "HDD"]


class Level(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    mediumtype: str
    quota: str | int
    path: str = ""
    # Watermarks as fractions of the quota, strings in Fluid ("0.95"); numbers are accepted too.
    high: str | float = "0.95"
    low: str | float = "0.7"


class TieredStore(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    levels: list[Level] = []


class RuntimeSpec(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    replicas: int = 1
    tieredstore: TieredStore = TieredStore()
    # 4 MiB like JuiceFS: large enough for sequential throughput, small enough for random reads.
    block_size: str | int = "4Mi"


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


class NotPicked(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An agent serving the runtime that is not one of its cache workers, and why."""

    node: str
    reason: str


class RuntimeStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    phase: RuntimePhase = "NotReady"
    message: str = ""
    desired_worker_number_scheduled: int = 0
    worker_number_ready: int = 0
    ready_nodes: list[str] = []
    cache_capacity: str = ""
    cache_capacity_bytes: int = 0
    block_size_bytes: int = 0
    conditions: list[Condition] = []
    current_worker_number_scheduled: int = 0
    # The cache workers in the order they were picked (kept while they exist: a worker is replaced only when
    # its agent is gone or no longer eligible), and the agents not picked with the reason.
    workers: list[CacheWorker] = []
    not_picked: list[NotPicked] = []


class RuntimeApply(Event, frozen=True, kw_only=True, tag="runtime.apply.v1", rename="camel"):
    runtime: Runtime


class RuntimeDelete(Event, frozen=True, kw_only=True, tag="runtime.delete.v1", rename="camel"):
    name: str
    namespace: str = "default"


RuntimeCommand = RuntimeApply | RuntimeDelete


class RuntimeAccepted(Event, frozen=True, kw_only=True, tag="runtime.accepted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str
    generation: int


class RuntimeRejected(Event, frozen=True, kw_only=True, tag="runtime.rejected.v1", rename="camel"):
    causation_id: str
    reason: str
    name: str = ""
    namespace: str = ""
    subject: str = ""


class RuntimeStatusChanged(Event, frozen=True, kw_only=True, tag="runtime.status.v1", rename="camel"):
    name: str
    namespace: str
    generation: int
    status: RuntimeStatus


class RuntimeDeleted(Event, frozen=True, kw_only=True, tag="runtime.deleted.v1", rename="camel"):
    causation_id: str
    name: str
    namespace: str


RuntimeFact = RuntimeAccepted | RuntimeRejected | RuntimeStatusChanged | RuntimeDeleted


class RuntimeRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    runtime: Runtime
    generation: int
    status: RuntimeStatus = RuntimeStatus()
    # The commands stream's sequence of the last apply that changed the spec (0: not known). An older apply
    # delivered again later (the service was killed before acking it, and JetStream redelivers it after its ack
    # wait, behind newer commands) is stale: applying it would put an old spec back under a new generation.
    command_sequence: int = 0
