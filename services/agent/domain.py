"""Node agent decisions, pure: which runtimes this node serves and which datasets it must mount.

A dataset is mounted when it is Bound, has a manifest, and its runtime (same name and namespace) is served by
this agent. Mount points are ``<mount root>/<namespace>/<name>``; blocks live in ``<tier path>/[<cache subdir>/]
<namespace>/<name>`` (a subdir per agent when several share a machine).

A reference dataset (``dataset://<namespace>/<name>``, ``libs.references``) gets no mount process and no cache:
its mount point is a link into its source's mount point (``../<namespace>/<name>[/<folder>]``), made while it is
Bound and this node mounts the source, so its readers go through the source's FUSE mount and block cache.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence

import msgspec

from libs.events.agent import AgentHeartbeat, MountReadFailures, MountReport
from libs.events.common import ObjectRef, parse_quantity
from libs.events.dataset import DatasetRecord
from libs.events.runtime import Level, RuntimeRecord
from libs.hostpaths import normal_path
from libs.references import Reference, is_reference, reference_of

# A mount process exits with this code (EX_TEMPFAIL) when another process took its peer port meanwhile: the agent
# then picks another port for it. Otherwise the port is kept across restarts, so peers find a restarted owner.
EXIT_PEER_PORT_TAKEN = 75
# The FUSE subtype of every dataset mount: /proc/self/mountinfo lists them as type fuse.shoal, so the agent tells
# its mounts (and those an earlier run of it left) from anything else mounted on the node.
FUSE_SUBTYPE = "shoal"
MOUNT_FSTYPE = f"fuse.{FUSE_SUBTYPE}"
# Problems a heartbeat lists (the rest are counted): enough to say what is wrong, and a node with thousands of
# failing mounts still beats under the event limit.
MAX_PROBLEMS = 20
# Mounts whose failed reads a heartbeat lists (the latest): each mount's status file names a few files already.
MAX_READ_FAILURE_MOUNTS = 10
# Which mounts a heartbeat too large for the event limit leaves out first: the serving ones (a runtime then shows
# fewer nodes mounted), the failing ones last (they are what status must show).
_LEFT_OUT_FIRST = {"Serving": 0, "Starting": 1, "Failing": 2}


def serves(runtime: RuntimeRecord, selection: list[str]) -> bool:
    """Whether the agent serves ``runtime``; an empty selection serves every runtime."""
    meta = runtime.runtime.metadata
    return not selection or f"{meta.namespace}/{meta.name}" in selection


def served_runtimes(runtimes: Iterable[RuntimeRecord], selection: list[str]) -> list[tuple[str, str]]:
    return sorted((r.runtime.metadata.namespace, r.runtime.metadata.name) for r in runtimes if serves(r, selection))


def wanted_mounts(datasets: Iterable[DatasetRecord], served: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    served_set = set(served)
    wanted = set()
    for record in datasets:
        meta = record.dataset.metadata
        ref = (meta.namespace, meta.name)
        if (ref in served_set and record.status.phase == "Bound" and record.status.manifest
                and not is_reference(record.dataset)):
            wanted.add(ref)
    return wanted


def recreated(known: DatasetRecord, current: DatasetRecord) -> bool:
    """Whether ``current`` is another life of the dataset than ``known`` (deleted and applied again under the same
    name: another ``incarnation``). A watch that restarts, or a look every so often, can miss the delete between
    them; a mount of the old one must then go as on a delete, its blocks with it."""
    return recreated_since(known.incarnation, current)


def recreated_since(incarnation: str, current: DatasetRecord) -> bool:
    """``recreated`` for one whose ``incarnation`` is all that was kept of it (the agent's mount of it)."""
    return current.incarnation != incarnation


def wanted_links(datasets: Iterable[DatasetRecord], mounted: Iterable[tuple[str, str]],
                 linked: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Reference]:
    """The references to show on this node, each with its source: those whose source this node mounts (``mounted``:
    its mount workers, a stopping one's grace included), made once the reference is Bound and kept while the
    source's mount is (``linked``: the links made), so a blip of the source's phase does not cut its readers off
    before the source's own mount goes."""
    mounted_set, linked_set = set(mounted), set(linked)
    links = {}
    for record in datasets:
        source = reference_of(record.dataset)
        if source is None or (source.namespace, source.name) not in mounted_set:
            continue
        meta = record.dataset.metadata
        ref = (meta.namespace, meta.name)
        if record.status.phase == "Bound" or ref in linked_set:
            links[ref] = source
    return links


def link_target(source: Reference) -> str:
    """What a reference's link at ``<mount root>/<namespace>/<name>`` points to: its source's mount point (or a
    folder in it), relative, so it holds wherever the mount root is seen from (a container mounting the root)."""
    return posixpath.join("..", source.namespace, source.name, *([source.folder] if source.folder else []))


def mountpoint(root: str, namespace: str, name: str) -> str:
    return posixpath.join(root, namespace, name)


def mount_connection_name(node: str, namespace: str, name: str) -> str:
    """The NATS connection name of a dataset's mount process (nats-server's ``/connz`` lists clients by it):
    ``shoal-mount/<namespace>/<name>/<node>``. Namespaces and names never hold '/', so no two mounts share one
    whatever the node's name; joined with '-', ``a-b/c`` and ``a/b-c`` were both ``shoal-mount-a-b-c``, and every
    node's mount of a dataset had the same name."""
    return f"shoal-mount/{namespace}/{name}/{node}"


def cache_folder(subdir: str) -> str:
    """This agent's folder below each tier path (``SHOAL_CACHE_SUBDIR``, relative and without '..': the settings
    refuse any other), normalised; empty for none. The one spelling of it, for the agent (which frees the caches
    of deleted datasets) and its mount processes (which write them)."""
    return posixpath.normpath(subdir) if subdir and posixpath.normpath(subdir) != "." else ""


def cache_suffix(subdir: str, namespace: str, name: str) -> str:
    """The folder of a dataset's blocks below each tier path: ``[<subdir>/]<namespace>/<name>``."""
    return posixpath.join(cache_folder(subdir), namespace, name)


def tiers_changed(started: Sequence[Level], current: Sequence[Level]) -> bool:
    """Whether a mount process started with the tiers ``started`` must start again to use the runtime's ``current``
    ones (its cache is built from them once, at start). A process started before its runtime was known has nothing
    to compare with."""
    return bool(started) and list(started) != list(current)


def block_size_of(runtime: RuntimeRecord) -> int:
    """The block size a mount process of ``runtime`` cuts its blocks at (as ``mountd`` reads it); 0 when it does not
    read (the runtime service refuses such a runtime)."""
    try:
        return parse_quantity(runtime.runtime.spec.block_size)
    except ValueError:
        return 0


def block_size_changed(started: int, runtime: RuntimeRecord) -> bool:
    """Whether a mount process started at block size ``started`` must start again at its runtime's: the runtime was
    deleted and applied again with another ``blockSize`` (a change the runtime service refuses otherwise) between
    two looks of the agent, which then saw no gap to stop the mount for. Left running, the process cut blocks at the
    old size while the loader planned and the peers asked at the new one (every load failed "past the end of the
    object"). Its new start empties the cache cut at the old size. 0: not known, nothing to compare."""
    current = block_size_of(runtime)
    return bool(started) and bool(current) and current != started


def disk_directories(levels: Iterable[Level]) -> list[str]:
    """The directories of the disk tiers of ``levels``, as the cache uses them (each comma-separated path stripped)
    and written one way (``libs.hostpaths.normal_path``), each once, in order."""
    found: dict[str, None] = {}
    for level in levels:
        if level.mediumtype != "MEM":
            found.update((normal_path(directory), None) for directory in level.directories)
    return list(found)


# Disk tier directories whose file systems a heartbeat reports (``AgentHeartbeat.tierDisks``): ~80 bytes each, so
# the beat stays far under the event limit however many runtimes the agent serves; the first by path.
TIER_DISKS_SHOWN = 64


def tier_disk_directories(levels: Iterable[Sequence[Level]]) -> tuple[list[str], bool]:
    """The disk tier directories of the served runtimes' ``levels`` whose file systems the heartbeat reports, by
    path, ``TIER_DISKS_SHOWN`` at most, and whether that is all of them (``AgentHeartbeat.tier_disks_complete``)."""
    directories = sorted({directory for tiers in levels for directory in disk_directories(tiers)})
    return directories[:TIER_DISKS_SHOWN], len(directories) <= TIER_DISKS_SHOWN


def retired_directories(retired: Iterable[Level], current: Sequence[Level]) -> list[str]:
    """The tier directories a mount's earlier tiers (``retired``: those of the processes stopped for a change of
    tiers since) named and its ``current`` ones do not: where it left blocks nobody will read or count. A directory
    named again, under any medium (a path that came back, an SSD tier moved to HDD), is not retired: the process
    started on ``current`` finds its blocks there and uses them."""
    kept = set(disk_directories(current))
    return [directory for directory in disk_directories(retired) if directory not in kept]


def stalled_start(deadline_seconds: float, step: str) -> str:
    """What the report and the log say of a start abandoned at its deadline; ``step``: what the mount process
    said it was doing (its status file), empty if it said nothing."""
    doing = f" (it was {step})" if step else ""
    return f"did not start within {deadline_seconds:g} s{doing}"


def mount_report(dataset: ObjectRef, *, alive: bool, mounted: bool, exit_code: int | None,
                 failures: int, peer_url: str = "", stalled: str = "", unhealthy: bool = False,
                 exit_reason: str = "", waiting: str = "") -> MountReport:
    """How a wanted mount is doing, for heartbeats: Serving once its process has put its own mount in place (with
    its peer URL, the only state in which its peer server answers). ``stalled`` (``stalled_start``): the last
    start was abandoned at its deadline; ``alive`` is then False while that process is being stopped.
    ``unhealthy``: it keeps failing or a cache directory of it is down (the node is unhealthy for its runtime).
    ``exit_reason``: why the last process exited, in its words (a Failing mount's message quotes it). ``waiting``:
    the start waits for its cache folders, and for whom (``mountstatus.waiting_step``), said while Starting."""
    report = _mount_state(dataset, alive=alive, mounted=mounted, exit_code=exit_code, failures=failures,
                          peer_url=peer_url, stalled=stalled, exit_reason=exit_reason)
    if waiting and report.state == "Starting":
        report = msgspec.structs.replace(report, message=f"{report.message}: {waiting}")
    return msgspec.structs.replace(report, unhealthy=True) if unhealthy else report


def _mount_state(dataset: ObjectRef, *, alive: bool, mounted: bool, exit_code: int | None,
                 failures: int, peer_url: str, stalled: str, exit_reason: str = "") -> MountReport:
    if alive and mounted:
        return MountReport(dataset=dataset, state="Serving", peer_url=peer_url)
    if alive:
        message = "mount process starting" if exit_code is None and not stalled else (
            f"mount process restarted after it {stalled or f'exited with code {exit_code}'}; loading")
        return MountReport(dataset=dataset, state="Starting", message=message)
    if stalled:
        return MountReport(dataset=dataset, state="Failing",
                           message=f"mount process {stalled}; stopped, restarting with backoff")
    if exit_code is None:
        return MountReport(dataset=dataset, state="Starting", message="mount process not started yet")
    # No countdown in the text: heartbeats repeat it, and status should change only when the state does.
    why = f": {exit_reason}" if exit_reason else ""
    return MountReport(dataset=dataset, state="Failing", message=(
        f"mount process exited with code {exit_code} ({failures} time{'s' if failures != 1 else ''} in a row)"
        f"{why}; restarting with backoff"))


def capped_problems(problems: list[str], limit: int = MAX_PROBLEMS) -> list[str]:
    """At most ``limit`` problems, the last one saying how many more there are."""
    if len(problems) <= limit:
        return problems
    return [*problems[:limit - 1], f"and {len(problems) - limit + 1} more problems"]


def latest_read_failures(mounts: list[MountReadFailures],
                         limit: int = MAX_READ_FAILURE_MOUNTS) -> list[MountReadFailures]:
    """The ``limit`` mounts whose last failed read is the latest, in that order."""
    def last(mount: MountReadFailures) -> float:
        return max((failure.at for failure in mount.files), default=0.0)

    return sorted(mounts, key=lambda mount: (-last(mount), mount.dataset.namespace, mount.dataset.name))[:limit]


def fit_heartbeat(beat: AgentHeartbeat, limit: int) -> tuple[AgentHeartbeat, int]:
    """``beat`` cut to at most ``limit`` bytes encoded (the consumers' SHOAL_MAX_EVENT_BYTES: they refuse a larger
    event, and a node whose beats are refused is not ready for any runtime), and how many mounts were left out.

    Only as far as needed, in this order: the list of runtimes of an agent that serves them all (``allRuntimes``
    says so without it), the failed reads (status then shows none for this node), then mounts, the serving ones
    first. A beat stays whole up to thousands of mounts (a name
    and a port each); past that, the mounts left out show nothing for this node, which beats the node's absence.
    """
    encoder = msgspec.json.Encoder()
    size = len(encoder.encode(beat))
    if size <= limit:
        return beat, 0
    if beat.all_runtimes and beat.runtimes:
        beat = msgspec.structs.replace(beat, runtimes=[])
        size = len(encoder.encode(beat))
    if size > limit and beat.read_failures:
        beat = msgspec.structs.replace(beat, read_failures=[])
        size = len(encoder.encode(beat))
    groups = beat.mount_groups
    kept = [dict(group.datasets) for group in groups]
    # Unhealthy mounts last of all: a runtime whose mount is not in the beat takes the node as healthy for it.
    order = sorted(range(len(groups)), key=lambda index: (groups[index].unhealthy,
                                                          _LEFT_OUT_FIRST.get(groups[index].state, 0), -index))
    left_out = 0
    while size > limit and any(kept):
        excess = size - limit
        for index in order:
            while kept[index] and excess > 0:
                name, port = kept[index].popitem()
                excess -= len(encoder.encode(name)) + len(str(port)) + 2  # "name":port,
                left_out += 1
            if excess <= 0:
                break
        beat = msgspec.structs.replace(beat, mount_groups=[
            msgspec.structs.replace(group, datasets=datasets) for group, datasets in zip(groups, kept, strict=True)
            if datasets])
        size = len(encoder.encode(beat))
    return beat, left_out
