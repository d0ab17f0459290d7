"""Picking a runtime's cache workers, pure: replicas, nodeAffinity, Exclusive/Shared placement, stickiness, no
worker without a Dataset, an unhealthy worker replaced after the grace period."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from libs import affinity
from libs.bus import AGENTS_TTL_SECONDS
from libs.cli.render import describe_runtime
from libs.events.agent import AgentHeartbeat, AgentRecord, MountReport
from libs.events.common import ObjectMeta, ObjectRef
from libs.events.dataset import DatasetSpec
from libs.events.runtime import (
    CacheWorker,
    Level,
    NotPicked,
    Runtime,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    TieredStore,
    WorkerReplaced,
)
from services.runtime.domain import (
    CONDITION_DATASET,
    INSTANCE_CONFLICT_SECONDS,
    INSTANCES_REMEMBERED,
    MISSED_BEATS,
    UNHEALTHY_WORKER_GRACE_SECONDS,
    OtherRuntime,
    Placement,
    agent_record,
    in_ring,
    ineligible_reason,
    node_conflict,
    pick_workers,
    placement_of,
    runtime_status,
)

NOW = 1_714_564_800.0
INTERVAL = 2.0
ZONE_A: dict[str, object] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
    {"key": "zone", "operator": "In", "values": ["a"]}]}]}}


def runtime(replicas: int, name: str = "demo") -> Runtime:
    return Runtime(metadata=ObjectMeta(name=name), spec=RuntimeSpec(
        replicas=replicas, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="1Gi")])))


def agent(node: str, labels: dict[str, str] | None = None, *, age: float = 0.0, healthy: bool = True,
          serves: tuple[str, ...] = ("demo",), peer_url: str = "", problems: tuple[str, ...] = ()) -> AgentRecord:
    mounts = [MountReport(dataset=ObjectRef(name="demo"), state="Serving", peer_url=peer_url)] if peer_url else []
    beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name=n) for n in serves], healthy=healthy,
                          problems=list(problems), interval_seconds=INTERVAL, labels=labels or {}, mounts=mounts)
    return AgentRecord(heartbeat=beat, received_at=NOW - age)


def by_node(*agents: AgentRecord) -> dict[str, AgentRecord]:
    return {a.heartbeat.node: a for a in agents}


def workers(*nodes: str) -> list[CacheWorker]:
    return [CacheWorker(node=n) for n in nodes]


def test_fills_replicas_in_name_order_and_says_why_the_rest_are_not_picked() -> None:
    agents = by_node(agent("n3"), agent("n1"), agent("n2"), agent("n4", healthy=False))
    picked, not_picked = pick_workers(runtime(2), [], agents, NOW)
    assert picked == ["n1", "n2"]
    assert not_picked == [NotPicked(node="n3", reason="2 of 2 replicas already picked"),
                          NotPicked(node="n4", reason="unhealthy (no reason given)")]


def test_node_affinity_against_labels() -> None:
    agents = by_node(agent("n1", {"zone": "b"}), agent("n2", {"zone": "a"}), agent("n3"))
    picked, not_picked = pick_workers(runtime(3), [], agents, NOW, Placement(affinity=ZONE_A))
    assert picked == ["n2"]
    assert not_picked == [NotPicked(node="n1", reason="does not match nodeAffinity: zone In [a]"),
                          NotPicked(node="n3", reason="does not match nodeAffinity: zone In [a]")]


def test_exclusive_and_shared_placement() -> None:
    agents = by_node(agent("n1"), agent("n2"))
    other_exclusive = OtherRuntime("default/other", exclusive=True, workers=("n1",))
    other_shared = OtherRuntime("default/other", exclusive=False, workers=("n1",))
    # An Exclusive runtime's worker serves nobody else, whatever the other's placement.
    assert pick_workers(runtime(2), [], agents, NOW, Placement(exclusive=False), [other_exclusive]) == (
        ["n2"], [NotPicked(node="n1", reason="worker of default/other (Exclusive)")])
    assert pick_workers(runtime(2), [], agents, NOW, Placement(exclusive=True), [other_shared]) == (
        ["n2"], [NotPicked(node="n1", reason="worker of default/other, and this dataset is Exclusive")])
    # Two Shared ones share.
    assert pick_workers(runtime(2), [], agents, NOW, Placement(exclusive=False), [other_shared])[0] == ["n1", "n2"]


def test_a_runtime_turned_exclusive_keeps_its_workers_and_a_shared_one_lets_them_go() -> None:
    # demo was Shared with n1 a worker of both; its Dataset is re-applied Exclusive. Whichever looks first, n1 ends
    # up demo's alone: demo keeps it, the Shared one lets it go (a worker of an Exclusive runtime).
    agents = by_node(agent("n1"), agent("n2"))
    shared_other = OtherRuntime("default/other", exclusive=False, workers=("n1", "n2"))
    assert pick_workers(runtime(1), workers("n1"), agents, NOW, Placement(exclusive=True), [shared_other]) == (
        ["n1"], [NotPicked(node="n2", reason="worker of default/other, and this dataset is Exclusive")])
    mine = OtherRuntime("default/demo", exclusive=True, workers=("n1",))
    other = runtime(2, name="other")
    assert pick_workers(other, workers("n1", "n2"), by_node(agent("n1", serves=("other",)),
                                                            agent("n2", serves=("other",))),
                        NOW, Placement(exclusive=False), [mine])[0] == ["n2"]


def test_placement_follows_the_dataset() -> None:
    assert placement_of(None) == Placement(affinity=None, exclusive=True, found=False)
    assert placement_of(DatasetSpec()).found
    assert placement_of(DatasetSpec(placement="Shared", node_affinity=ZONE_A)) == Placement(ZONE_A, False)
    assert placement_of(DatasetSpec(placement="")).exclusive  # Fluid: empty means Exclusive


def test_a_silent_worker_stays_picked_not_ready_until_its_record_is_gone() -> None:
    rt = runtime(2)
    silent = agent("n1", age=MISSED_BEATS * INTERVAL + 1)
    agents = by_node(silent, agent("n2"), agent("n3"))
    record = RuntimeRecord(runtime=rt, generation=1)
    record = RuntimeRecord(runtime=rt, generation=1, status=runtime_status(record, list(agents.values()), NOW - 60))
    assert [w.node for w in record.status.workers] == ["n1", "n2"]
    status = runtime_status(record, list(agents.values()), NOW)
    assert [(w.node, w.ready) for w in status.workers] == [("n1", False), ("n2", True)]
    assert status.worker_number_ready == 1
    # The record expires (the agents bucket's TTL): n3 takes its place.
    del agents["n1"]
    status = runtime_status(record, list(agents.values()), NOW)
    assert [(w.node, w.ready) for w in status.workers] == [("n2", True), ("n3", True)]


def test_scaling_up_keeps_the_workers_and_down_drops_the_latest() -> None:
    agents = by_node(*(agent(f"n{i}") for i in range(5)))
    current = workers("n3", "n0", "n4")  # picked earlier, in this order
    assert pick_workers(runtime(4), current, agents, NOW)[0] == ["n3", "n0", "n4", "n1"]
    assert pick_workers(runtime(2), current, agents, NOW)[0] == ["n3", "n0"]


def test_scaling_down_drops_the_workers_out_of_the_ring_first() -> None:
    # n1 is silent, n2 unhealthy, n5's mount is not serving yet: none of them owns a block the ring reads, so
    # dropping them moves nothing; dropping n3 or n4 (the most recently picked) would move their blocks.
    silent = MISSED_BEATS * INTERVAL + 1
    agents = by_node(agent("n1", age=silent, peer_url="http://n1:1"),
                     agent("n2", healthy=False, peer_url="http://n2:1"),
                     agent("n3", peer_url="http://n3:1"), agent("n4", peer_url="http://n4:1"), agent("n5"))
    current = workers("n1", "n2", "n3", "n4", "n5")
    assert pick_workers(runtime(2), current, agents, NOW)[0] == ["n3", "n4"]
    assert pick_workers(runtime(3), current, agents, NOW)[0] == ["n1", "n3", "n4"]  # then in pick order
    assert pick_workers(runtime(0), current, agents, NOW)[0] == []


def test_a_worker_without_a_record_keeps_its_seat_while_the_agents_view_settles() -> None:
    # Just restarted after the records expired: n1 beat first; n2 and n4, the workers, have not yet.
    agents = by_node(agent("n1"))
    current = [CacheWorker(node="n2", ready=True, peer_url="http://n2:1"), CacheWorker(node="n4", ready=True)]
    assert pick_workers(runtime(2), current, agents, NOW, keep_absent=True) == (
        ["n2", "n4"], [NotPicked(node="n1", reason="2 of 2 replicas already picked")])
    status = runtime_status(RuntimeRecord(runtime=runtime(2), generation=1, status=RuntimeStatus(workers=current)),
                            list(agents.values()), NOW, keep_absent=True)
    assert status.workers == [CacheWorker(node="n2", ready=False), CacheWorker(node="n4", ready=False)]
    assert status.worker_number_ready == 0 and status.phase == "PartialReady"
    # Settled (or no Dataset): the seat of an agent without a record goes to another, as ever.
    assert pick_workers(runtime(2), current, agents, NOW)[0] == ["n1"]
    assert pick_workers(runtime(2), current, agents, NOW, placement_of(None), keep_absent=True)[0] == []


def test_a_worker_no_longer_eligible_is_replaced() -> None:
    agents = by_node(agent("n1", {"zone": "b"}), agent("n2", {"zone": "a"}))
    assert pick_workers(runtime(1), workers("n1"), agents, NOW, Placement(affinity=ZONE_A))[0] == ["n2"]


def beats_of(node: str, *instances: tuple[str, float]) -> AgentRecord | None:
    """The node's record after a beat of each (instance, time) in turn, as the runtime service folds them."""
    record = None
    for instance, at in instances:
        beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name="demo")], interval_seconds=INTERVAL,
                              instance=instance)
        record = agent_record(record, beat, at)
    return record


DUPLICATE = "two agents beat as node n1: give each its own SHOAL_NODE_NAME"


def test_two_agents_beating_as_one_node_are_flagged_from_the_first_return_of_the_earlier_one() -> None:
    record = beats_of("n1", ("a", NOW - 2), ("b", NOW - 1))
    assert record is not None and node_conflict(record, NOW) is None  # so far, as a restart would look
    record = beats_of("n1", ("a", NOW - 2), ("b", NOW - 1), ("a", NOW))
    assert record is not None and node_conflict(record, NOW) == DUPLICATE and record.conflict_at == NOW
    # Three by turns: each returns after another, never right after the one before it.
    record = beats_of("n1", ("a", NOW - 3), ("b", NOW - 2), ("c", NOW - 1), ("a", NOW))
    assert record is not None and node_conflict(record, NOW) == DUPLICATE


def test_while_two_agents_beat_as_one_node_its_record_keeps_one_until_that_one_stops() -> None:
    # "b" showed after "a" (a restart, as far as one can tell), then "a" beat again: the record keeps "b", which it
    # held then, and every later beat of "a" only keeps the conflict on. Before, it took each one's beat by turns.
    turns = [("a", NOW - 6), ("b", NOW - 5), ("a", NOW - 4), ("b", NOW - 3), ("a", NOW - 2), ("b", NOW - 1),
             ("a", NOW)]
    shown = [record.heartbeat.instance for record in (beats_of("n1", *turns[:n]) for n in range(1, len(turns) + 1))
             if record is not None]
    assert shown == ["a", "b", "b", "b", "b", "b", "b"]
    record = beats_of("n1", *turns)
    assert record is not None and record.received_at == NOW - 1 and record.instances == {"a": NOW}
    assert node_conflict(record, NOW) == DUPLICATE and record.conflict_at == NOW
    # "b" stops: once its last beat is no longer fresh, "a" is taken (and the node stays flagged for the window).
    stale = NOW - 1 + MISSED_BEATS * INTERVAL + 1
    record = beats_of("n1", *turns, ("a", stale - 2), ("a", stale))
    assert record is not None and record.heartbeat.instance == "a" and record.received_at == stale
    assert node_conflict(record, stale) == DUPLICATE


def test_a_restart_is_no_conflict_nor_are_agents_without_an_instance() -> None:
    # Restarts, one after another: each new instance goes on alone, none comes back.
    record = beats_of("n1", ("a", NOW - 9), ("a", NOW - 8), ("b", NOW - 6), ("b", NOW - 4), ("c", NOW - 2), ("c", NOW))
    assert record is not None and record.conflict_at == 0.0 and node_conflict(record, NOW) is None
    assert record.instances == {"b": NOW - 4, "a": NOW - 8}
    # Agents before ``instance`` cannot be told apart: never flagged.
    record = beats_of("n1", ("", NOW - 2), ("", NOW - 1), ("", NOW))
    assert record is not None and node_conflict(record, NOW) is None and record.instances == {}


def test_the_conflict_ends_once_only_one_agent_beat_for_the_window() -> None:
    last = NOW - INSTANCE_CONFLICT_SECONDS
    record = beats_of("n1", ("a", last - 2), ("b", last - 1), ("a", last))
    assert record is not None
    assert node_conflict(record, NOW) == DUPLICATE  # the window's last moment
    assert node_conflict(record, NOW + 0.5) is None
    # "b" stopped: only "a" beat since, and "b" is forgotten once as old as the window.
    record = agent_record(record, record.heartbeat, NOW + 0.5)
    assert record.instances == {} and node_conflict(record, NOW + 0.5) is None
    assert record.conflict_at == 0.0  # the record says so itself: readers without the window go by it
    # An instance older than the window that beats again is no conflict: its record would have expired too.
    record = beats_of("n1", ("a", NOW - INSTANCE_CONFLICT_SECONDS - 1), ("b", NOW - 1), ("a", NOW))
    assert record is not None and node_conflict(record, NOW) is None


def test_the_window_is_the_agents_records_lifetime_and_the_instances_remembered_are_bounded() -> None:
    assert INSTANCE_CONFLICT_SECONDS == AGENTS_TTL_SECONDS
    # An agent restarting in a loop: its record remembers the latest few instances, not every one.
    record = beats_of("n1", *((f"i{n}", NOW - 50 + n) for n in range(50)))
    assert record is not None and len(record.instances) == INSTANCES_REMEMBERED
    assert min(record.instances.values()) == NOW - 50 + 49 - INSTANCES_REMEMBERED


def test_a_node_two_agents_beat_as_is_no_worker_and_a_worker_flagged_gives_up_its_seat() -> None:
    flagged = beats_of("n1", ("a", NOW - 2), ("b", NOW - 1), ("a", NOW))
    assert flagged is not None
    agents = by_node(flagged, agent("n2"), agent("n3"))
    picked, not_picked = pick_workers(runtime(2), workers("n1", "n2"), agents, NOW)
    assert picked == ["n2", "n3"] and not_picked == [NotPicked(node="n1", reason=DUPLICATE)]
    # Once the window has passed with one agent beating, n1 is a candidate like any other.
    later = NOW + INSTANCE_CONFLICT_SECONDS + 1
    alone = agent_record(agent_record(flagged, flagged.heartbeat, later - 1), flagged.heartbeat, later)
    agents = by_node(alone, *(msgspec.structs.replace(agent(n), received_at=later) for n in ("n2", "n3")))
    assert pick_workers(runtime(3), workers("n2", "n3"), agents, later)[0] == ["n2", "n3", "n1"]


def test_worker_peer_urls_come_from_their_mount_reports_and_make_the_ring() -> None:
    rt = runtime(2)
    agents = [agent("n1", peer_url="http://127.0.0.1:4001"), agent("n2"), agent("n3", peer_url="http://x:1")]
    status = runtime_status(RuntimeRecord(runtime=rt, generation=1), agents, NOW)
    # A peer URL says the agent serves peers (one before ``peerHost`` names none); n2's agent serves none.
    assert status.workers == [CacheWorker(node="n1", ready=True, peer_url="http://127.0.0.1:4001", serves_peers=True),
                              CacheWorker(node="n2", ready=True, peer_url="")]
    assert status.current_worker_number_scheduled == 2 and status.worker_number_ready == 2
    assert status.cache_capacity_bytes == 2**30  # the ring (workers with a peer endpoint) holds the cache


def test_an_exclusive_shortfall_keeps_the_runtime_ready_so_its_dataset_still_mounts() -> None:
    status = runtime_status(RuntimeRecord(runtime=runtime(1), generation=1), [agent("n1")], NOW,
                            Placement(), [OtherRuntime("default/other", True, ("n1",))])
    assert status.phase == "Ready" and status.workers == []
    assert status.message == ("0 of 1 cache workers ready (n1: worker of default/other (Exclusive); see notPicked); "
                              "Exclusive placement keeps 1 ready agent(s) from this runtime: run more agents, or set "
                              "placement: Shared on Dataset default/demo, default/other")


def test_a_runtime_without_its_dataset_picks_no_worker_until_the_dataset_is_applied() -> None:
    # Its workers from before the Dataset was deleted are let go: held (Exclusive) they would keep other
    # datasets off those agents for a cache nobody reads.
    agents = [agent("n1"), agent("n2")]
    before = RuntimeRecord(runtime=runtime(1), generation=1,
                           status=runtime_status(RuntimeRecord(runtime=runtime(1), generation=1), agents, NOW))
    assert [w.node for w in before.status.workers] == ["n1"]
    status = runtime_status(before, agents, NOW, placement_of(None))
    assert status.workers == [] and status.current_worker_number_scheduled == 0
    assert status.phase == "Ready"  # the agents' readiness: a Dataset applied now binds at once
    assert status.message == "no Dataset default/demo: no cache workers until it is applied"
    assert status.not_picked == [NotPicked(node="n1", reason="no Dataset default/demo"),
                                 NotPicked(node="n2", reason="no Dataset default/demo")]
    [condition] = [c for c in status.conditions if c.type == CONDITION_DATASET]
    assert (condition.status, condition.reason, condition.message) == ("False", "DatasetNotFound",
                                                                       "no Dataset default/demo")
    # The Dataset applied: picked as usual, and the condition gone.
    applied = runtime_status(RuntimeRecord(runtime=runtime(1), generation=1, status=status), agents, NOW,
                             placement_of(DatasetSpec()))
    assert [w.node for w in applied.workers] == ["n1"] and applied.phase == "Ready"
    assert not [c for c in applied.conditions if c.type == CONDITION_DATASET]


SICK = ("cache dir /mnt/ssd: Input/output error",)


def beats(at: float, *nodes: str, sick: tuple[str, ...] = (), silent: tuple[str, ...] = ()) -> list[AgentRecord]:
    """The agents' last heartbeats as seen at ``at``: the ``sick`` ones say unhealthy, the ``silent`` ones stopped
    beating long before."""
    return [agent(node, healthy=node not in sick, problems=SICK if node in sick else (),
                  age=NOW - at + (MISSED_BEATS * INTERVAL + 1 if node in silent else 0)) for node in nodes]


def step(status: RuntimeStatus, agents: list[AgentRecord], at: float, replicas: int = 2,
         placement: Placement | None = None) -> RuntimeStatus:
    return runtime_status(RuntimeRecord(runtime=runtime(replicas), generation=1, status=status), agents, at,
                          placement or Placement())


def test_a_worker_unhealthy_past_the_grace_period_is_replaced_by_a_healthy_spare() -> None:
    start = NOW - 100
    status = step(RuntimeStatus(), beats(start, "n1", "n2", "n3"), start)
    assert [w.node for w in status.workers] == ["n1", "n2"]
    # n1 keeps beating but says unhealthy: it stays through the grace period (a blip must not move its blocks).
    sick_at = start + 10
    status = step(status, beats(sick_at, "n1", "n2", "n3", sick=("n1",)), sick_at)
    assert [(w.node, w.ready, w.unhealthy_since) for w in status.workers] == [("n1", False, sick_at),
                                                                              ("n2", True, 0.0)]
    almost = sick_at + UNHEALTHY_WORKER_GRACE_SECONDS - 1
    status = step(status, beats(almost, "n1", "n2", "n3", sick=("n1",)), almost)
    assert [w.node for w in status.workers] == ["n1", "n2"] and status.replaced == []
    assert status.workers[0].unhealthy_since == sick_at  # kept, not restarted at every look
    # Past it: n3, the healthy spare, takes n1's seat; n2 stays (the ring moves n1's blocks only).
    due = sick_at + UNHEALTHY_WORKER_GRACE_SECONDS
    status = step(status, beats(due, "n1", "n2", "n3", sick=("n1",)), due)
    assert [(w.node, w.ready) for w in status.workers] == [("n2", True), ("n3", True)]
    why = f"unhealthy for 30 s ({SICK[0]})"
    assert status.replaced == [WorkerReplaced(node="n1", by="n3", reason=why, time="2024-05-01T11:59:00Z")]
    assert status.not_picked == [NotPicked(node="n1", reason=f"{why}: replaced by n3")]
    assert status.phase == "Ready" and status.worker_number_ready == 2
    # Next look: nothing moves again, the replacement is recorded once.
    later = due + 5
    status = step(status, beats(later, "n1", "n2", "n3", sick=("n1",)), later)
    assert [w.node for w in status.workers] == ["n2", "n3"] and len(status.replaced) == 1
    assert status.not_picked == [NotPicked(node="n1", reason=f"unhealthy ({SICK[0]})")]
    # Healthy again, n1 is an ordinary candidate: the full, healthy set is kept (no flapping back).
    healed = later + 5
    status = step(status, beats(healed, "n1", "n2", "n3"), healed)
    assert [w.node for w in status.workers] == ["n2", "n3"]
    assert status.not_picked == [NotPicked(node="n1", reason="2 of 2 replicas already picked")]
    # ``shoal describe runtime`` lists the replacement.
    shown = describe_runtime(RuntimeRecord(runtime=runtime(2), generation=1, status=status)).splitlines()
    assert shown[shown.index("Replaced:") + 2].split() == ["2024-05-01T11:59:00Z", "n1", "n3", *why.split()]


def test_an_unhealthy_worker_stays_without_a_healthy_eligible_spare() -> None:
    start, later = NOW - 100, NOW - 100 + 1 + UNHEALTHY_WORKER_GRACE_SECONDS * 3
    status = step(RuntimeStatus(), beats(start, "n1", "n2"), start)
    # The only other agent is unhealthy too, or silent, or outside the nodeAffinity: better a degraded worker
    # than none.
    for others in (dict(sick=("n1", "n3")), dict(sick=("n1",), silent=("n3",))):
        first = step(status, beats(start + 1, "n1", "n2", "n3", **others), start + 1)
        kept = step(first, beats(later, "n1", "n2", "n3", **others), later)
        assert [(w.node, w.ready) for w in kept.workers] == [("n1", False), ("n2", True)] and kept.replaced == []
    zoned = Placement(affinity=ZONE_A)

    def zone_beats(at: float) -> list[AgentRecord]:
        return [agent("n1", {"zone": "a"}, healthy=False, age=NOW - at), agent("n2", {"zone": "a"}, age=NOW - at),
                agent("n3", {"zone": "b"}, age=NOW - at)]

    first = step(status, zone_beats(start + 1), start + 1, placement=zoned)
    kept = step(first, zone_beats(later), later, placement=zoned)
    assert [w.node for w in kept.workers] == ["n1", "n2"] and kept.replaced == []


def test_a_silent_unhealthy_worker_is_kept_for_its_disk_cache() -> None:
    start = NOW - 100
    status = step(RuntimeStatus(), beats(start, "n1", "n2", "n3"), start)
    status = step(status, beats(start + 1, "n1", "n2", "n3", sick=("n1",)), start + 1)
    later = start + 1 + UNHEALTHY_WORKER_GRACE_SECONDS * 2
    status = step(status, beats(later, "n1", "n2", "n3", sick=("n1",), silent=("n1",)), later)
    assert [(w.node, w.ready) for w in status.workers] == [("n1", False), ("n2", True)]


def test_a_blip_restarts_the_grace_period() -> None:
    start = NOW - 100
    status = step(RuntimeStatus(), beats(start, "n1", "n2", "n3"), start)
    half = UNHEALTHY_WORKER_GRACE_SECONDS / 2 + 1
    status = step(status, beats(start + 1, "n1", "n2", "n3", sick=("n1",)), start + 1)
    status = step(status, beats(start + half, "n1", "n2", "n3"), start + half)  # healthy again
    assert status.workers[0] == CacheWorker(node="n1", ready=True)
    status = step(status, beats(start + half + 1, "n1", "n2", "n3", sick=("n1",)), start + half + 1)
    # Unhealthy for more than the grace period in all, but not in one stretch.
    status = step(status, beats(start + 2 * half, "n1", "n2", "n3", sick=("n1",)), start + 2 * half)
    assert [w.node for w in status.workers] == ["n1", "n2"]


def test_spares_fill_empty_seats_before_replacing_an_unhealthy_worker() -> None:
    start = NOW - 100
    status = step(RuntimeStatus(), beats(start, "n1", "n2"), start, replicas=3)
    status = step(status, beats(start + 1, "n1", "n2", sick=("n1",)), start + 1, replicas=3)
    later = start + 1 + UNHEALTHY_WORKER_GRACE_SECONDS
    # n3 joins once n1 is overdue: it fills the empty seat, and n1 (degraded, but holding blocks) stays.
    status = step(status, beats(later, "n1", "n2", "n3", sick=("n1",)), later, replicas=3)
    assert [w.node for w in status.workers] == ["n1", "n2", "n3"] and status.replaced == []
    # A fourth agent is a spare for n1's seat.
    status = step(status, beats(later + 1, "n1", "n2", "n3", "n4", sick=("n1",)), later + 1, replicas=3)
    assert [w.node for w in status.workers] == ["n2", "n3", "n4"]
    assert [(r.node, r.by) for r in status.replaced] == [("n1", "n4")]


# --- Properties ---

NODES = [f"node-{i}" for i in range(8)]
AGENTS = st.dictionaries(
    keys=st.sampled_from(NODES),
    values=st.tuples(st.sampled_from(["a", "b", ""]), st.booleans(), st.sampled_from([0.0, 1.0, 100.0]),
                     st.booleans()),
    max_size=8,
)


def build(spec: dict[str, Any]) -> dict[str, AgentRecord]:
    return by_node(*(agent(node, {"zone": zone} if zone else {}, healthy=healthy, age=age,
                           serves=("demo",) if serving else ("other",))
                     for node, (zone, healthy, age, serving) in spec.items()))


PLACEMENTS = st.sampled_from([Placement(), Placement(affinity=ZONE_A), Placement(exclusive=False),
                              Placement(found=False)])
OTHERS = st.lists(st.builds(lambda ex, ws: OtherRuntime("default/other", ex, tuple(ws)), st.booleans(),
                            st.lists(st.sampled_from(NODES), max_size=3)), max_size=1)


@given(AGENTS, st.integers(0, 6), st.lists(st.sampled_from(NODES), max_size=6, unique=True), PLACEMENTS, OTHERS)
def test_never_more_than_replicas_and_never_an_ineligible_agent(spec: Any, replicas: int, current: list[str],
                                                                placement: Placement,
                                                                others: list[OtherRuntime]) -> None:
    agents = build(spec)
    picked, not_picked = pick_workers(runtime(replicas), workers(*current), agents, NOW, placement, others)
    assert len(picked) == len(set(picked)) <= replicas
    assert not set(picked) & {n.node for n in not_picked}
    assert placement.found or picked == []
    for node in picked:
        labels = agents[node].heartbeat.labels
        if placement.affinity is not None:
            assert labels.get("zone") == "a"
        for other in others:
            if node in other.workers:  # shared with a Shared one: this one is Shared, or Exclusive and had it
                assert not other.exclusive and (not placement.exclusive or node in current)
        assert "demo" in [ref.name for ref in agents[node].heartbeat.runtimes]


@given(AGENTS, st.integers(0, 6), PLACEMENTS)
def test_picking_again_with_the_same_agents_changes_nothing(spec: Any, replicas: int, placement: Placement) -> None:
    agents = build(spec)
    first, _ = pick_workers(runtime(replicas), [], agents, NOW, placement)
    again, _ = pick_workers(runtime(replicas), workers(*first), agents, NOW, placement)
    assert again == first


@given(AGENTS, st.integers(0, 6), st.integers(0, 4), PLACEMENTS)
def test_scaling_up_keeps_every_worker_and_down_keeps_the_first(spec: Any, replicas: int, more: int,
                                                               placement: Placement) -> None:
    agents = build(spec)
    first, _ = pick_workers(runtime(replicas), [], agents, NOW, placement)
    grown, _ = pick_workers(runtime(replicas + more), workers(*first), agents, NOW, placement)
    assert grown[:len(first)] == first
    shrunk, _ = pick_workers(runtime(max(replicas - more, 0)), workers(*first), agents, NOW, placement)
    assert shrunk == first[:len(shrunk)]


def test_scaling_three_to_four_keeps_the_three() -> None:
    agents = by_node(*(agent(f"n{i}") for i in range(6)))
    three, _ = pick_workers(runtime(3), [], agents, NOW)
    four, _ = pick_workers(runtime(4), workers(*three), agents, NOW)
    assert four[:3] == three and len(four) == 4


# Affinities of one or two terms (ORed) of one or two expressions (ANDed), over every operator.
EXPRESSIONS = st.one_of(
    st.builds(lambda op, vs: {"key": "zone", "operator": op, "values": vs}, st.sampled_from(["In", "NotIn"]),
              st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)),
    st.builds(lambda key, op: {"key": key, "operator": op}, st.sampled_from(["zone", "gpus"]),
              st.sampled_from(["Exists", "DoesNotExist"])),
    st.builds(lambda op, v: {"key": "gpus", "operator": op, "values": [v]}, st.sampled_from(["Gt", "Lt"]),
              st.sampled_from(["0", "2", "4", "8"])),
)
AFFINITIES = st.lists(st.lists(EXPRESSIONS, min_size=1, max_size=2), min_size=1, max_size=2).map(
    lambda terms: {"required": {"nodeSelectorTerms": [{"matchExpressions": term} for term in terms]}})
LABELLED = st.dictionaries(
    keys=st.sampled_from(NODES),
    values=st.tuples(st.sampled_from(["a", "b", ""]), st.sampled_from(["1", "4", "8", ""]), st.booleans()),
    max_size=8,
)


def labelled(spec: dict[str, Any]) -> dict[str, AgentRecord]:
    """Fresh agents serving the runtime, with a zone and a number of GPUs (each may be missing), healthy or not."""
    return by_node(*(agent(node, {k: v for k, v in (("zone", zone), ("gpus", gpus)) if v}, healthy=healthy)
                     for node, (zone, gpus, healthy) in spec.items()))


def eligible(agents: dict[str, AgentRecord], placement: Placement, others: list[OtherRuntime]) -> set[str]:
    return {node for node, record in agents.items() if record.heartbeat.healthy
            and ineligible_reason(node, record.heartbeat.labels, placement, others) is None}


@given(LABELLED, st.integers(0, 8), AFFINITIES, st.booleans(), OTHERS)
def test_the_workers_satisfy_affinity_and_placement_and_are_as_many_as_can_be(
        spec: Any, replicas: int, node_affinity: dict[str, Any], exclusive: bool, others: list[OtherRuntime]) -> None:
    agents = labelled(spec)
    placement = Placement(affinity=node_affinity, exclusive=exclusive)
    picked, not_picked = pick_workers(runtime(replicas), [], agents, NOW, placement, others)
    allowed = eligible(agents, placement, others)
    assert set(picked) <= allowed and len(picked) == min(replicas, len(allowed))
    for node in picked:
        assert affinity.mismatch(node_affinity, node, agents[node].heartbeat.labels) is None
        assert all(not (other.exclusive or exclusive) for other in others if node in other.workers)
    assert {n.node for n in not_picked} == set(agents) - set(picked)  # every other agent is told why


@given(LABELLED, st.integers(0, 8), AFFINITIES, st.sampled_from(NODES),
       st.sampled_from(["gone", "relabelled", "sick", "silent", "new"]), st.data())
def test_a_change_of_one_agent_moves_at_most_one_worker(spec: Any, replicas: int, node_affinity: dict[str, Any],
                                                        changed: str, how: str, data: st.DataObject) -> None:
    agents = labelled(spec)
    placement = Placement(affinity=node_affinity)
    before, _ = pick_workers(runtime(replicas), [], agents, NOW, placement)
    after_agents = dict(agents)
    if how == "gone":
        after_agents.pop(changed, None)
    elif how == "relabelled":
        zone = data.draw(st.sampled_from(["a", "b", "c"]))
        after_agents[changed] = agent(changed, {"zone": zone, "gpus": data.draw(st.sampled_from(["1", "4", "8"]))})
    elif how == "sick":
        after_agents[changed] = agent(changed, healthy=False)
    elif how == "silent":
        after_agents[changed] = agent(changed, age=MISSED_BEATS * INTERVAL + 1)
    else:
        after_agents[changed] = agent(changed, {"zone": data.draw(st.sampled_from(["a", "b"]))})
    after, _ = pick_workers(runtime(replicas), workers(*before), after_agents, NOW, placement)
    assert set(before) - set(after) <= {changed}  # only the changed agent may lose its seat
    assert len(set(after) - set(before)) <= 1  # and one agent at most takes a seat
    assert after[:len(set(before) & set(after))] == [node for node in before if node in after]  # order kept


@given(AGENTS, st.integers(0, 6), st.lists(st.sampled_from(NODES), min_size=1, max_size=6, unique=True),
       st.sets(st.sampled_from(NODES)))
def test_scaling_down_keeps_the_ring_before_anyone_else(spec: Any, replicas: int, current: list[str],
                                                        serving: set[str]) -> None:
    agents = build(spec)
    for node in serving & set(agents):  # these have a serving mount with a peer URL
        record = agents[node]
        beat = msgspec.structs.replace(record.heartbeat, mounts=[
            MountReport(dataset=ObjectRef(name="demo"), state="Serving", peer_url=f"http://{node}:1")])
        agents[node] = msgspec.structs.replace(record, heartbeat=beat)
    full, _ = pick_workers(runtime(len(NODES)), workers(*current), agents, NOW)
    shrunk, _ = pick_workers(runtime(replicas), workers(*full), agents, NOW)
    assert shrunk == [node for node in full if node in shrunk] and len(shrunk) == min(replicas, len(full))
    ring = {node for node in full if in_ring(runtime(replicas), agents[node], NOW)}
    # A ring member (a block owner the ring reads) loses its seat only when no worker out of the ring is left.
    assert not (ring - set(shrunk) and set(shrunk) - ring)
