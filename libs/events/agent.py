"""Agent events: heartbeats (which runtimes a node serves) and block inventory (which blocks a node caches).

Inventory per (node, dataset) is a numbered stream: a snapshot (possibly in several parts) starts it, deltas
follow with consecutive ``seq``; a consumer that sees a gap, or a new ``incarnation`` (the mount process
restarted), asks for a snapshot with ``InventoryRequest``.

Version 2 of the inventory events (``.v2``) groups blocks by object: the key and ETag are written once per object
(``CachedFile``), not once per block, because keys reach 1 KiB and a snapshot must stay under NATS's payload limit.
Version 1 payloads (one ``[mount, key, etag, index]`` per block) still decode; ``upgrade`` turns them into v2.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

import msgspec
import xxhash

from libs.events.common import Event, ObjectRef, int_range

# A count, an index or a size in inventory events: never negative. Checked at decode (the event is refused with the
# field and the bound in its reason): a block taken with a negative size took bytes off the node's other blocks and
# the dataset's unique bytes. The folds keep no blocks of the events they persist, so no stored record holds these.
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
# A part's number and a snapshot's number of parts: from 1.
Ordinal = Annotated[int, msgspec.Meta(ge=1)]
# A cache counter: never negative either, but stated in the JSON Schema only (``int_range``), not checked at decode:
# the dataset service stores each node's counters with its position (``libs.inventory.NodeInventory``), and a
# record stored with a negative one must still decode. The folds count a negative ``cachedBytes`` as 0.
CounterValue = Annotated[int, int_range(0)]


class BlockId(msgspec.Struct, frozen=True, array_like=True):
    """A block of a file: mount index, object key, ETag and block index. Encoded as a 4-element array."""

    mount: NonNegative
    key: str
    etag: str
    index: NonNegative

    @property
    def name(self) -> str:
        """32 hex characters, stable across processes and versions (xxh3-128 of the id)."""
        return xxhash.xxh3_128_hexdigest(f"{self.mount}\0{self.key}\0{self.etag}\0{self.index}".encode())

    def describe(self) -> str:
        return f"{self.mount}:{self.key}@{self.etag}#{self.index}"


class CachedBlock(msgspec.Struct, frozen=True, array_like=True):
    block: BlockId
    size: NonNegative


class CachedFile(msgspec.Struct, frozen=True, array_like=True):
    """Cached blocks of one object version: ``[mount, key, etag, [[index, size], ...]]``."""

    mount: NonNegative
    key: str
    etag: str
    blocks: list[tuple[NonNegative, NonNegative]]

    def cached_blocks(self) -> Iterator[CachedBlock]:
        for index, size in self.blocks:
            yield CachedBlock(block=BlockId(self.mount, self.key, self.etag, index), size=size)


def group_blocks(blocks: Iterable[tuple[BlockId, int]]) -> list[CachedFile]:
    """Blocks grouped per object version, in (mount, key, etag) order and block order within an object."""
    grouped: dict[tuple[int, str, str], list[tuple[int, int]]] = {}
    for block, size in blocks:
        grouped.setdefault((block.mount, block.key, block.etag), []).append((block.index, size))
    return [CachedFile(mount, key, etag, sorted(entries)) for (mount, key, etag), entries in sorted(grouped.items())]


def ungroup(files: Iterable[CachedFile]) -> list[CachedBlock]:
    return [block for file in files for block in file.cached_blocks()]


class CacheCounters(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Totals of one (node, dataset) cache at the time of the event."""

    cached_bytes: CounterValue = 0
    capacity_bytes: CounterValue = 0
    # Bytes read since the mount process started: from this node's own cache tiers (``hitBytes``), from the
    # object store (``missBytes``: for this node's readers and for peers), and from other nodes' caches over the
    # peer protocol (``remoteBytes``).
    hit_bytes: CounterValue = 0
    miss_bytes: CounterValue = 0
    remote_bytes: CounterValue = 0
    # Bytes fetched from the object store for DataLoads since the mount process started: no reader asked for them,
    # so they are no miss (the autoscaler's hit ratio is the readers'). Agents before it counted them as misses.
    loaded_bytes: CounterValue = 0
    # Bytes this node's peer server sent to other nodes.
    served_bytes: CounterValue = 0
    # The mount process is still counting the blocks on disk after its start (``BlockCache.scan_rest``): after a
    # crash no index says which are there, and ``cachedBytes`` grows as the count goes (~12 s for 50,000 blocks),
    # so it is partial until an event says false. Absent (false) from agents before it.
    counting: bool = False


class InventorySnapshot(Event, frozen=True, kw_only=True, tag="agent.inventory.snapshot.v2", rename="camel"):
    """One part of a full snapshot; parts are cut by encoded size and carry consecutive ``seq``."""

    node: str
    dataset: ObjectRef
    incarnation: str
    seq: NonNegative
    part: Ordinal = 1
    parts: Ordinal = 1
    files: list[CachedFile] = []
    counters: CacheCounters = CacheCounters()
    # The agent process whose mount sent it (``AgentHeartbeat.instance``): while two agents beat as one node, the
    # services count the inventory of the one the node's record holds only. Empty: an agent before it.
    instance: str = ""
    # The incarnation of the dataset the sending mount serves (``DatasetRecord.incarnation``): the events are named
    # by the dataset's name, and the last ones of a mount of a dataset deleted and applied again under that name
    # must not count for the new one. Empty: an agent before it.
    dataset_incarnation: str = ""

    def cached_blocks(self) -> list[CachedBlock]:
        return ungroup(self.files)


class InventoryDelta(Event, frozen=True, kw_only=True, tag="agent.inventory.delta.v2", rename="camel"):
    node: str
    dataset: ObjectRef
    incarnation: str
    seq: NonNegative
    cached: list[CachedFile] = []
    evicted: list[CachedFile] = []
    counters: CacheCounters = CacheCounters()
    # The agent process whose mount sent it (``AgentHeartbeat.instance``): while two agents beat as one node, the
    # services count the inventory of the one the node's record holds only. Empty: an agent before it.
    instance: str = ""
    # The incarnation of the dataset the sending mount serves (``DatasetRecord.incarnation``): the events are named
    # by the dataset's name, and the last ones of a mount of a dataset deleted and applied again under that name
    # must not count for the new one. Empty: an agent before it.
    dataset_incarnation: str = ""


class InventorySnapshotV1(Event, frozen=True, kw_only=True, tag="agent.inventory.snapshot.v1", rename="camel"):
    """Superseded by ``InventorySnapshot`` (v2); still decoded, see ``upgrade``."""

    node: str
    dataset: ObjectRef
    incarnation: str
    seq: NonNegative
    part: Ordinal = 1
    parts: Ordinal = 1
    blocks: list[CachedBlock] = []
    counters: CacheCounters = CacheCounters()


class InventoryDeltaV1(Event, frozen=True, kw_only=True, tag="agent.inventory.delta.v1", rename="camel"):
    """Superseded by ``InventoryDelta`` (v2); still decoded, see ``upgrade``."""

    node: str
    dataset: ObjectRef
    incarnation: str
    seq: NonNegative
    cached: list[CachedBlock] = []
    evicted: list[CachedBlock] = []
    counters: CacheCounters = CacheCounters()


# What consumers fold (the current version), and what they decode (every version still accepted).
Inventory = InventorySnapshot | InventoryDelta
AnyInventory = InventorySnapshot | InventoryDelta | InventorySnapshotV1 | InventoryDeltaV1


def upgrade(event: AnyInventory) -> Inventory:
    """A v1 inventory event as its v2 equivalent (same id, position and counters); v2 events unchanged."""
    if isinstance(event, InventorySnapshotV1):
        return InventorySnapshot(
            id=event.id, node=event.node, dataset=event.dataset, incarnation=event.incarnation, seq=event.seq,
            part=event.part, parts=event.parts, counters=event.counters,
            files=group_blocks((b.block, b.size) for b in event.blocks),
        )
    if isinstance(event, InventoryDeltaV1):
        return InventoryDelta(
            id=event.id, node=event.node, dataset=event.dataset, incarnation=event.incarnation, seq=event.seq,
            counters=event.counters, cached=group_blocks((b.block, b.size) for b in event.cached),
            evicted=group_blocks((b.block, b.size) for b in event.evicted),
        )
    return event


class InventoryRequest(Event, frozen=True, kw_only=True, tag="agent.inventory.request.v1", rename="camel"):
    """Ask agents for a fresh snapshot; empty node or dataset means all."""

    node: str = ""
    dataset: ObjectRef | None = None


MountState = Literal["Starting", "Serving", "Failing"]


class MountReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """How the mount of one dataset is doing on the node: Serving, Starting, or Failing (exited, restarting)."""

    dataset: ObjectRef
    state: MountState
    message: str = ""
    # Where other nodes read this mount's cached blocks (``http://host:port``; the protocol is in the agent's
    # README); empty when the mount serves no peers.
    peer_url: str = ""
    # Its process keeps failing or a cache directory of it is down (the beat's ``problems`` say which).
    unhealthy: bool = False


def peer_url(host: str, port: int) -> str:
    """Where other nodes reach a mount's peer server (``http://host:port``); empty without one (port 0)."""
    if not port:
        return ""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ReadFailure(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Reads of one file of a mount that failed lately: ``count`` of them since ``since`` (unix seconds at the
    node), the last at ``at``, answered ``errno`` (``ESTALE``: the object changed or was deleted since the sync;
    ``EIO``: the store failed; ``EMFILE``/``ENFILE``: the mount process had no file descriptor left) for ``reason``
    (cut, no credentials). ``path``: the file in the mount, its start cut
    when very long."""

    path: str
    errno: str
    reason: str = ""
    count: int = 1
    since: float = 0.0
    at: float = 0.0


class MountReadFailures(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The latest failed reads of one dataset's mount on the node (``services.agent.readfailures``)."""

    dataset: ObjectRef
    files: list[ReadFailure] = []


class TierDisk(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The file system of one disk tier directory on the node (``statvfs`` of it, or of its nearest folder that
    exists while the cache has not made it yet): what the runtime service weighs the tier's quota against."""

    # The directory as the runtimes' tiers name it, written one way (``libs.hostpaths.normal_path``).
    path: str
    # Bytes of the file system, and those free for an unprivileged writer (``f_bavail``), when the beat was made.
    # 0: the agent could not read it (listed all the same: ``AgentHeartbeat.tier_disks_complete``).
    size_bytes: int = 0
    free_bytes: int = 0
    # The file system's device (``st_dev`` of the directory, or of that nearest folder): directories with the same
    # one share a disk, and the quotas given to them add up on it. 0: an agent before it (each weighed alone).
    device: int = 0


class MountGroup(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The mounts of one namespace in the same state with the same message, each dataset named once: what a
    heartbeat carries per dataset is its name and its peer port, so a node with thousands of mounts still beats
    in a few bytes per mount (``MountReport`` repeated namespace, state and message for each)."""

    namespace: str
    state: MountState
    message: str = ""
    # Dataset name → the port of its mount's peer server on the beat's ``peerHost`` (0: none, and always 0 unless
    # Serving: only a serving mount's peer server answers).
    datasets: dict[str, int] = {}
    # These mounts make the node unhealthy (``MountReport.unhealthy``).
    unhealthy: bool = False


class AgentHeartbeat(Event, frozen=True, kw_only=True, tag="agent.heartbeat.v1", rename="camel"):
    """A node's agent, every ``intervalSeconds``. Its size does not grow with the runtimes of the cluster (an agent
    serving them all says ``allRuntimes``) and grows by a name and a port per mount (``mountGroups``); an agent
    keeps it under the event limit (``services.agent.domain.fit_heartbeat``). Read the mounts and runtimes through
    ``mount_of`` and ``serves``, which also read what agents before ``mountGroups`` sent."""

    node: str
    # The runtimes the agent serves; with ``allRuntimes`` they are listed only while the beat is small (for
    # runtime services that predate ``allRuntimes``), and may be empty.
    runtimes: list[ObjectRef] = []
    # The agent serves every runtime (no SHOAL_AGENT_RUNTIMES), those created after this beat included.
    all_runtimes: bool = False
    # False while a mount process keeps failing or a cache directory is down; ``problems`` says which.
    healthy: bool = True
    # True: the mounts that make the node unhealthy are marked (``MountGroup.unhealthy``), and the node is unhealthy
    # only for the runtimes of those datasets (``healthy_for``): one dataset's full or removed cache directory does
    # not take the node from every other runtime. Agents before it: unhealthy for every runtime.
    mount_health: bool = False
    # Unix seconds at the agent; the runtime service judges freshness by its own clock of receipt.
    sent_at: float = 0.0
    # How often the agent beats; a node missing three beats in a row is not ready.
    interval_seconds: float = 5.0
    # Bytes of cache this node's mounts can use: the quotas of their tiers that are not down.
    capacity_bytes: int = 0
    problems: list[str] = []
    # The mounts this node should serve and how each is doing; a mount that is not serving shows in status.
    # Agents send ``mountGroups``; ``mounts`` (a report per mount) is what agents before them sent.
    mounts: list[MountReport] = []
    # The node's labels (zone, region, any key=value), matched against a Dataset's nodeAffinity.
    labels: dict[str, str] = {}
    mount_groups: list[MountGroup] = []
    # Where this node's mount processes serve their peers (``mountGroups`` give each one's port).
    peer_host: str = ""
    # Mounts whose reads failed lately (a file read ESTALE or EIO within the last minute), a few files each;
    # absent when none did. Left out first when a beat is too large.
    read_failures: list[MountReadFailures] = []
    # A random token the agent process makes once at start-up: the node's name says which node, this which process.
    # Two agents given the same SHOAL_NODE_NAME beat with two tokens by turns, which the runtime service flags
    # (``AgentRecord.conflict_at``); a restart makes a new one and never goes back to the old. Empty: an agent
    # before it (never flagged).
    instance: str = ""
    # The file system under each disk tier directory of the runtimes the agent serves (at most
    # ``services.agent.domain.TIER_DISKS_SHOWN``, by path). Absent from agents before it: quotas not weighed.
    tier_disks: list[TierDisk] = []
    # True: ``tierDisks`` lists every disk tier directory of the runtimes the agent served when it beat, so a tier
    # directory missing from it is one of a runtime newer than the beat (the runtime service waits for the next beat
    # before it picks the node). False: an agent before it, or more directories than ``TIER_DISKS_SHOWN``.
    tier_disks_complete: bool = False

    def serves(self, namespace: str, name: str) -> bool:
        """Whether the node serves the runtime ``namespace/name``."""
        return self.all_runtimes or any(ref.name == name and ref.namespace == namespace for ref in self.runtimes)

    def healthy_for(self, namespace: str, name: str) -> bool:
        """Whether the node is healthy for the runtime ``namespace/name``: healthy, or unhealthy only because of
        other datasets' mounts (``mountHealth``)."""
        if self.healthy:
            return True
        if not self.mount_health:
            return False
        report = self.mount_of(namespace, name)
        return report is None or not report.unhealthy

    def problems_for(self, namespace: str, name: str) -> list[str]:
        """The problems that make the node unhealthy for the runtime ``namespace/name``: those of its dataset's
        mount (``mount_problem``), or all of them from an agent that does not mark mounts (or when none match)."""
        if not self.mount_health:
            return self.problems
        prefix = mount_problem(namespace, name, "")
        return [problem for problem in self.problems
                if problem.startswith(prefix) and problem[len(prefix):len(prefix) + 1] in (":", " ")] or self.problems

    def mount_of(self, namespace: str, name: str) -> MountReport | None:
        """How the node's mount of dataset ``namespace/name`` is doing; None when it reports no such mount."""
        for group in self.mount_groups:
            if group.namespace == namespace and (port := group.datasets.get(name)) is not None:
                return MountReport(dataset=ObjectRef(name=name, namespace=namespace), state=group.state,
                                   message=group.message,
                                   peer_url=peer_url(self.peer_host, port) if group.state == "Serving" else "",
                                   unhealthy=group.unhealthy)
        return next((report for report in self.mounts
                     if report.dataset.name == name and report.dataset.namespace == namespace), None)

    def read_failures_of(self, namespace: str, name: str) -> list[ReadFailure]:
        """The latest failed reads of the node's mount of dataset ``namespace/name`` (none: empty)."""
        return next((mount.files for mount in self.read_failures
                     if mount.dataset.name == name and mount.dataset.namespace == namespace), [])

    def mount_reports(self) -> list[MountReport]:
        """Every mount the beat reports, a report each (``mount_of`` finds one without building them all)."""
        grouped = [self.mount_of(group.namespace, name) for group in self.mount_groups for name in group.datasets]
        return [*self.mounts, *(report for report in grouped if report is not None)]

    def mount_count(self) -> int:
        return len(self.mounts) + sum(len(group.datasets) for group in self.mount_groups)


def mount_problem(namespace: str, name: str, what: str) -> str:
    """A heartbeat's problem with the mount of dataset ``namespace/name``: ``what`` starts with ":" or " "."""
    return f"mount {namespace}/{name}{what}"


def group_mounts(reports: Iterable[tuple[MountReport, int]]) -> list[MountGroup]:
    """Mount reports, each with its peer port, as ``MountGroup``s (by namespace, state, message and health, in
    that order; names sorted)."""
    grouped: dict[tuple[str, MountState, str, bool], dict[str, int]] = {}
    for report, port in reports:
        ref = report.dataset
        grouped.setdefault((ref.namespace, report.state, report.message, report.unhealthy), {})[ref.name] = (
            port if report.state == "Serving" else 0)
    return [MountGroup(namespace=namespace, state=state, message=message, datasets=dict(sorted(names.items())),
                       unhealthy=unhealthy)
            for (namespace, state, message, unhealthy), names in sorted(grouped.items())]


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A node's last heartbeat in the agents bucket, as the runtime service received it (its clock)."""

    heartbeat: AgentHeartbeat
    received_at: float
    # Other agent processes (``AgentHeartbeat.instance``) that beat as this node lately, each with the time of its
    # last beat: a beat from one of them again means two agents share the node's name (a restart never returns to
    # an old instance). Kept for as long as the flag lasts (``services.runtime.domain.INSTANCE_CONFLICT_SECONDS``).
    instances: dict[str, float] = {}
    # When a beat last came from such an earlier instance (0: never, or not within the time the flag lasts): the node
    # is flagged from then for as long.
    conflict_at: float = 0.0
