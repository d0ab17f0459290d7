"""The elastic cache's decision (``services.runtime.domain.autoscale``), pure: bounds, growth under pressure, the
cool-down, shrinking after a calm cool-down, and the read window; plus the policy's validation."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from libs.cli.render import describe_runtime
from libs.events.agent import AgentHeartbeat, AgentRecord
from libs.events.common import ObjectMeta, ObjectRef, rfc3339
from libs.events.dataset import NodeCache
from libs.events.runtime import (
    AutoscalingPolicy,
    AutoscalingStatus,
    CacheWorker,
    Level,
    MetadataSyncPolicy,
    Runtime,
    RuntimeManagement,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    TieredStore,
)
from services.runtime.domain import (
    AUTOSCALE_HISTORY,
    AUTOSCALE_WRITE_SECONDS,
    CORRECTION_LANDS_SECONDS,
    CacheSample,
    autoscale,
    autoscaling_resumed,
    autoscaling_write_due,
    cache_sample,
    can_add_worker,
    read_window,
    validate_runtime,
)

NOW = 1_700_000_000.0
MI = 2**20
POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_cache_used_percent=60, cool_down_seconds=30)


def sample(used: int, capacity: int = 100, reads: dict[str, tuple[int, int]] | None = None) -> CacheSample:
    return CacheSample(cached_bytes=used, capacity_bytes=capacity, reads=reads or {})


def state(last_scale: float = 0.0, last_pressure: float = NOW - 1000) -> AutoscalingStatus:
    return AutoscalingStatus(last_scale_time=last_scale, last_pressure_time=last_pressure)


def test_grows_by_one_while_reading_a_full_cache() -> None:
    choice = autoscale(POLICY, 1, sample(70, reads={"a": (10, 90)}), {"a": (0, 0)}, state(), NOW)
    assert choice.replicas == 2
    assert choice.decision is not None and (choice.decision.from_replicas, choice.decision.to_replicas) == (1, 2)
    assert "cache 70.0% used >= target 60% while reading" in choice.reason and "1 -> 2 workers" in choice.reason
    assert choice.state.last_scale_time == NOW and choice.state.last_pressure_time == NOW
    assert choice.state.decisions == [choice.decision]


def test_a_full_cache_nobody_reads_is_no_pressure() -> None:
    choice = autoscale(POLICY, 1, sample(95, reads={"a": (10, 90)}), {"a": (10, 90)}, state(), NOW)
    assert choice.replicas == 1 and choice.decision is None
    assert choice.reason.startswith("hold") and "no reads" in choice.reason


def test_a_low_hit_ratio_grows() -> None:
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_hit_ratio_percent=80, cool_down_seconds=30)
    choice = autoscale(policy, 2, sample(10, reads={"a": (50, 50)}), {"a": (0, 0)}, state(), NOW)
    assert choice.replicas == 3 and "hit ratio 50.0% < target 80%" in choice.reason
    assert choice.state.hit_ratio_percent == 50.0


def test_no_growth_within_the_cool_down_or_past_max() -> None:
    reading = sample(90, reads={"a": (0, 10)})
    cooling = autoscale(POLICY, 1, reading, {"a": (0, 0)}, state(last_scale=NOW - 10), NOW)
    assert cooling.replicas == 1 and "cooling down 20 s more" in cooling.reason
    assert cooling.state.last_pressure_time == NOW  # still pressure: it delays a shrink
    at_max = autoscale(POLICY, 3, reading, {"a": (0, 0)}, state(), NOW)
    assert at_max.replicas == 3 and "already at maxReplicas 3" in at_max.reason


def test_each_outcome_has_its_reason_and_a_hold_keeps_its_first_time_while_its_reason_holds() -> None:
    # The reasons were worked out at every look and dropped: nobody could see why the runtime did not grow.
    reading = sample(90, reads={"a": (0, 10)})
    cooling = autoscale(POLICY, 1, reading, {"a": (0, 0)}, state(last_scale=NOW - 10), NOW)
    last = cooling.state.last_decision
    assert last is not None and (last.action, last.reason, last.time) == ("hold", "CoolingDown", "2023-11-14T22:13:20Z")
    assert last.message.endswith("cooling down 20 s more, until 2023-11-14T22:13:40Z"), last.message
    later = autoscale(POLICY, 1, sample(95, reads={"a": (0, 20)}), reading.reads, cooling.state, NOW + 5)
    assert later.state.last_decision == last  # the same hold: not written again, its time says since when
    grown = autoscale(POLICY, 1, reading, {"a": (0, 0)}, later.state, NOW + 20)
    assert grown.replicas == 2 and grown.state.last_decision is not None
    assert (grown.state.last_decision.action, grown.state.last_decision.reason) == ("grow", "Pressure")
    assert grown.state.last_decision.message == grown.reason

    outcomes = {
        "AtMaxReplicas": autoscale(POLICY, 3, reading, {"a": (0, 0)}, state(), NOW),
        "NoSpareAgent": autoscale(POLICY, 1, CacheSample(cached_bytes=90, capacity_bytes=100, reads={"a": (0, 10)},
                                                         spare=False), {"a": (0, 0)}, state(), NOW),
        "AtMinReplicas": autoscale(POLICY, 1, sample(0), {}, state(), NOW),
        "Settling": autoscale(POLICY, 2, sample(0), {}, state(last_pressure=NOW - 10), NOW),
        "NoPressure": autoscale(POLICY, 2, sample(0), {}, state(), NOW),
        "BelowMinReplicas": autoscale(POLICY, 0, sample(0), {}, state(), NOW),
        "AboveMaxReplicas": autoscale(POLICY, 4, sample(0), {}, state(), NOW),
    }
    for reason, choice in outcomes.items():
        last = choice.state.last_decision
        assert last is not None and (last.reason, last.message, last.time) == (reason, choice.reason, rfc3339(NOW))
        assert last.action == ("hold" if choice.decision is None else
                               "grow" if choice.replicas > choice.decision.from_replicas else "shrink")
    settling = outcomes["Settling"].state.last_decision
    assert settling is not None and settling.message.endswith(
        "one worker fewer at 2023-11-14T22:13:40Z if no pressure comes by then (min 1)")
    landing = autoscale(POLICY, 0, sample(0), {}, outcomes["BelowMinReplicas"].state, NOW + 1).state.last_decision
    assert landing is not None and (landing.action, landing.reason) == ("hold", "CorrectionLanding")


def test_looks_that_see_the_same_change_nothing_to_save() -> None:
    # The status is written when the autoscaler's state changes: a calm hold must not change it at every look.
    first = autoscale(POLICY, 1, sample(40, reads={"a": (5, 5)}), None, None, NOW)
    again = autoscale(POLICY, 1, sample(40, reads={"a": (5, 5)}), {"a": (5, 5)}, first.state, NOW + 1)
    assert again.state == first.state


def test_a_correction_back_within_bounds_is_sent_once_while_it_lands() -> None:
    # The autoscaler looks every second; a scale command taking longer to land left the replicas out of bounds at
    # the next look, and the correction (and its autoscaled fact and metric) went out again.
    first = autoscale(POLICY, 0, sample(0), {}, None, NOW)
    assert first.replicas == 1 and first.decision is not None
    landing = autoscale(POLICY, 0, sample(0), {}, first.state, NOW + 1)
    assert (landing.replicas, landing.decision) == (0, None) and "has not landed yet" in landing.reason
    lost = autoscale(POLICY, 0, sample(0), {}, first.state, NOW + 11)
    assert lost.replicas == 1 and lost.decision is not None  # sent again: it may have been lost
    above = autoscale(POLICY, 7, sample(0), {}, first.state, NOW + 1)
    assert above.replicas == 3 and above.decision is not None  # another correction goes at once


def test_shrinks_after_a_calm_cool_down_and_not_before() -> None:
    idle = sample(90)
    assert autoscale(POLICY, 2, idle, {}, state(last_pressure=NOW - 29), NOW).replicas == 2
    assert autoscale(POLICY, 2, idle, {}, state(last_scale=NOW - 29), NOW).replicas == 2
    choice = autoscale(POLICY, 2, idle, {}, state(last_pressure=NOW - 30, last_scale=NOW - 40), NOW)
    assert choice.replicas == 1 and choice.reason.startswith("shrink: no pressure for 30 s")
    assert autoscale(POLICY, 1, idle, {}, state(), NOW).replicas == 1  # never below minReplicas


def test_a_first_look_does_not_shrink_at_once() -> None:
    choice = autoscale(POLICY, 3, sample(0), None, None, NOW)
    assert choice.replicas == 3 and choice.state.last_pressure_time == NOW
    assert autoscale(POLICY, 3, sample(0), {}, choice.state, NOW + 30).replicas == 2


def test_replicas_changed_by_hand_start_a_cool_down() -> None:
    # `shoal scale --replicas 3` on a runtime calm for long (POLICY: 1..3, 30 s): the next look shrank it at once,
    # dropping the worker just picked; scaled down by hand under pressure, it grew back a second later.
    calm = autoscale(POLICY, 1, sample(10), {}, state(), NOW).state
    assert calm.replicas == 1
    by_hand = autoscale(POLICY, 3, sample(10), {}, calm, NOW + 1)
    assert by_hand.replicas == 3 and by_hand.decision is None and by_hand.state.last_scale_time == NOW + 1
    last = by_hand.state.last_decision
    assert last is not None and last.reason == "Settling" and last.time == rfc3339(NOW + 1)
    assert last.message.startswith("replicas set to 3 (was 1) by a scale or an apply; hold:")
    assert rfc3339(NOW + 31) in last.message  # the shrink's time, from the change by hand
    held = autoscale(POLICY, 3, sample(10), {}, by_hand.state, NOW + 30)
    assert held.replicas == 3 and held.state.last_decision == last  # said once
    assert autoscale(POLICY, 3, sample(10), {}, held.state, NOW + 31).replicas == 2
    reading = sample(90, reads={"a": (0, 10)})
    pressed = autoscale(POLICY, 3, reading, {"a": (0, 0)}, state(), NOW).state
    down = autoscale(POLICY, 1, reading, {"a": (0, 0)}, pressed, NOW + 1)
    assert down.replicas == 1 and down.state.last_decision is not None
    assert down.state.last_decision.reason == "CoolingDown"
    assert autoscale(POLICY, 1, reading, {"a": (0, 0)}, down.state, NOW + 31).replicas == 2


def test_its_own_change_landing_is_no_change_by_hand() -> None:
    reading = sample(90, reads={"a": (0, 10)})
    grown = autoscale(POLICY, 1, reading, {"a": (0, 0)}, state(), NOW)
    assert grown.replicas == 2 and grown.state.replicas == 1
    landing = autoscale(POLICY, 1, sample(10), {}, grown.state, NOW + 1)  # the scale not applied yet
    landed = autoscale(POLICY, 2, sample(10), {}, landing.state, NOW + 2)
    assert landed.state.last_scale_time == NOW and landed.state.replicas == 2
    assert landed.state.last_decision is not None and not landed.state.last_decision.message.startswith("replicas")
    # A record from before the field says nothing of the replicas it saw: no change by hand is read into it.
    old = msgspec.structs.replace(grown.state, replicas=None)
    assert autoscale(POLICY, 3, sample(10), {}, old, NOW + 1).state.last_scale_time == NOW


def test_out_of_bounds_goes_to_the_bound_at_once() -> None:
    below = autoscale(POLICY, 0, sample(0), {}, state(last_scale=NOW), NOW)
    assert below.replicas == 1 and below.reason == "below minReplicas 1: 0 -> 1 workers"
    above = autoscale(POLICY, 7, sample(0), {}, state(last_scale=NOW), NOW)
    assert above.replicas == 3 and above.reason == "above maxReplicas 3: 7 -> 3 workers"


def test_history_is_bounded() -> None:
    current = AutoscalingStatus()
    replicas = 5
    for step in range(AUTOSCALE_HISTORY + 3):
        # Out of bounds at every look, each after the last correction had time to land: a decision each look.
        choice = autoscale(POLICY, replicas, sample(0), {}, current, NOW + step * CORRECTION_LANDS_SECONDS)
        current, replicas = choice.state, 5
    assert len(current.decisions) == AUTOSCALE_HISTORY
    assert current.decisions[-1].time == "2023-11-14T22:15:20Z"


def test_read_window_counts_a_restarted_mount_from_zero_and_a_node_first_seen_from_the_next_look() -> None:
    assert read_window(None, {"a": (5, 5)}) == (0, 0)
    assert read_window({"a": (10, 10)}, {"a": (15, 12), "b": (100, 200)}) == (5, 2)
    assert read_window({"a": (15, 12), "b": (100, 200)}, {"a": (15, 12), "b": (101, 202)}) == (1, 2)
    assert read_window({"a": (10, 10)}, {"a": (3, 1)}) == (3, 1)


def test_cache_sample_counts_the_workers_cache_only() -> None:
    runtime = Runtime(metadata=ObjectMeta(name="d"),
                      spec=RuntimeSpec(tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="4Mi")])))
    status = RuntimeStatus(workers=[CacheWorker(node="a"), CacheWorker(node="b", ready=False)])
    nodes = [NodeCache(node="a", cached_bytes=3 * MI, local_read_bytes=1, remote_read_bytes=2, store_read_bytes=3),
             NodeCache(node="c", cached_bytes=MI, store_read_bytes=7)]
    assert cache_sample(runtime, status, nodes) == CacheSample(cached_bytes=3 * MI, capacity_bytes=8 * MI,
                                                               reads={"a": (3, 3), "c": (0, 7)})


def test_a_dataloads_store_fetches_are_no_read_pressure() -> None:
    # Warming a dataset showed "hit ratio 0.0% < target 90%" and added a worker: the load's fetches were counted as
    # store reads. They are the nodes' loadedBytes now, outside the sample's read counters.
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_hit_ratio_percent=90, cool_down_seconds=30)
    runtime = make_runtime(replicas=1)
    status = RuntimeStatus(workers=[CacheWorker(node="a")])
    before = cache_sample(runtime, status, [NodeCache(node="a")])
    warmed = cache_sample(runtime, status, [NodeCache(node="a", cached_bytes=64 * MI, loaded_bytes=64 * MI)])
    assert warmed.reads == {"a": (0, 0)}
    choice = autoscale(policy, 1, warmed, before.reads, state(), NOW)
    assert (choice.replicas, choice.state.hit_ratio_percent) == (1, None) and "no reads" in choice.reason
    read = cache_sample(runtime, status, [NodeCache(node="a", cached_bytes=64 * MI, loaded_bytes=64 * MI,
                                                    local_read_bytes=9 * MI, store_read_bytes=MI)])
    assert autoscale(policy, 1, read, warmed.reads, state(), NOW).state.hit_ratio_percent == 90.0


@settings(max_examples=60, deadline=None)  # pure arithmetic: a few dozen cases cover the branches
@given(replicas=st.integers(0, 12), used=st.integers(0, 200), hits=st.integers(0, 100), misses=st.integers(0, 100),
       since_scale=st.floats(0, 100), since_pressure=st.floats(0, 100),
       low=st.integers(0, 4), span=st.integers(0, 4), cool=st.integers(1, 60))
def test_one_step_within_bounds_and_a_reason_for_each_change(replicas: int, used: int, hits: int, misses: int,
                                                             since_scale: float, since_pressure: float, low: int,
                                                             span: int, cool: int) -> None:
    policy = AutoscalingPolicy(min_replicas=low, max_replicas=max(1, low + span), target_cache_used_percent=60,
                               target_hit_ratio_percent=50, cool_down_seconds=cool)
    before = state(last_scale=NOW - since_scale, last_pressure=NOW - since_pressure)
    choice = autoscale(policy, replicas, sample(used, reads={"a": (hits, misses)}), {"a": (0, 0)}, before, NOW)
    in_bounds = policy.min_replicas <= replicas <= policy.max_replicas
    assert policy.min_replicas <= choice.replicas <= policy.max_replicas
    if in_bounds:
        assert abs(choice.replicas - replicas) <= 1
        if choice.replicas != replicas:
            assert since_scale >= cool  # never two changes within a cool-down
    assert (choice.decision is None) == (choice.replicas == replicas)
    assert choice.state.last_decision is not None and choice.state.last_decision.reason  # why, also when holding
    if choice.decision is not None:
        assert choice.decision.reason == choice.reason and choice.reason
        assert choice.state.decisions[-1] == choice.decision
    if choice.replicas < replicas and in_bounds:
        assert NOW - max(before.last_pressure_time, before.last_scale_time) >= cool


def make_runtime(**spec: object) -> Runtime:
    return Runtime(metadata=ObjectMeta(name="d"), spec=msgspec.convert(
        {"tieredstore": {"levels": [{"mediumtype": "MEM", "quota": "1Gi"}]}, **spec}, RuntimeSpec))


def test_a_valid_policy_passes() -> None:
    assert validate_runtime(make_runtime(autoscaling={"minReplicas": 1, "maxReplicas": 4,
                                                      "targetHitRatioPercent": 90, "coolDownSeconds": 60})) == []
    runtime = make_runtime(management={"metadataSyncPolicy": {"autoSync": False, "periodSeconds": 30}})
    assert runtime.spec.management == RuntimeManagement(metadata_sync_policy=MetadataSyncPolicy(
        auto_sync=False, period_seconds=30))
    assert validate_runtime(runtime) == []


@pytest.mark.parametrize(("autoscaling", "expected"), [
    ({"minReplicas": 3, "maxReplicas": 2, "targetCacheUsedPercent": 80}, "minReplicas <= maxReplicas"),
    ({"minReplicas": 0, "maxReplicas": 0, "targetCacheUsedPercent": 80}, "maxReplicas >= 1"),
    ({"maxReplicas": 2}, "needs targetCacheUsedPercent or targetHitRatioPercent"),
    ({"maxReplicas": 2, "targetCacheUsedPercent": 0}, "targetCacheUsedPercent must be between 1 and 100"),
    ({"maxReplicas": 2, "targetHitRatioPercent": 101}, "targetHitRatioPercent must be between 1 and 100"),
    ({"maxReplicas": 2, "targetCacheUsedPercent": 50, "coolDownSeconds": 0}, "coolDownSeconds must be at least 1"),
])
def test_a_bad_policy_is_refused_with_what_to_change(autoscaling: dict[str, int], expected: str) -> None:
    errors = validate_runtime(make_runtime(autoscaling=autoscaling))
    assert len(errors) == 1 and expected in errors[0], errors


def test_a_negative_sync_period_is_refused() -> None:
    errors = validate_runtime(make_runtime(management={"metadataSyncPolicy": {"periodSeconds": -1}}))
    assert errors == ["spec.management.metadataSyncPolicy.periodSeconds must be 0 (the service's default) or "
                      "more, got -1"]


def test_describe_runtime_shows_the_measures_and_the_decisions() -> None:
    runtime = make_runtime(autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetCacheUsedPercent": 60,
                                        "coolDownSeconds": 30})
    choice = autoscale(POLICY, 1, sample(70, reads={"a": (10, 90)}), {"a": (0, 0)}, state(), NOW)
    record = RuntimeRecord(runtime=runtime, generation=1, status=RuntimeStatus(autoscaling=choice.state))
    shown = describe_runtime(record)
    assert "Autoscaling:\n  cache used 70.0%, hit ratio 10.0% (workers 1..3, cool-down 30 s)\n" \
           "  last decision: grow (Pressure) since 2023-11-14T22:13:20Z: grow: cache 70.0% used >= target 60% " \
           "while reading (max 3): 1 -> 2 workers\n" in shown
    assert "2023-11-14T22:13:20Z   1      2    grow: cache 70.0% used >= target 60% while reading" in shown
    assert "Autoscaling" not in describe_runtime(RuntimeRecord(runtime=make_runtime(), generation=1))
    waiting = describe_runtime(RuntimeRecord(runtime=runtime, generation=1))
    assert "Autoscaling:\n  <not evaluated yet>" in waiting


def test_grows_back_from_no_workers_when_the_nodes_caches_fill() -> None:
    # minReplicas 0: with no worker every serving node caches for itself, and those caches are what fills up.
    runtime = Runtime(metadata=ObjectMeta(name="d"),
                      spec=RuntimeSpec(replicas=0,
                                       tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="4Mi")])))
    status = RuntimeStatus(ready_nodes=["a", "b"])
    nodes = [NodeCache(node="a", cached_bytes=4 * MI, local_read_bytes=5, store_read_bytes=50),
             NodeCache(node="b", cached_bytes=3 * MI, local_read_bytes=5, store_read_bytes=50)]
    taken = cache_sample(runtime, status, nodes)
    assert (taken.cached_bytes, taken.capacity_bytes) == (7 * MI, 8 * MI)
    policy = AutoscalingPolicy(min_replicas=0, max_replicas=3, target_cache_used_percent=60, cool_down_seconds=30)
    choice = autoscale(policy, 0, taken, {"a": (0, 0), "b": (0, 0)}, state(), NOW)
    assert choice.replicas == 1, choice.reason


def test_pressure_grows_only_when_an_agent_can_become_the_new_worker() -> None:
    choice = autoscale(POLICY, 1, CacheSample(cached_bytes=70, capacity_bytes=100, reads={"a": (10, 90)},
                                              spare=False), {"a": (0, 0)}, state(), NOW)
    assert choice.replicas == 1 and choice.decision is None
    assert choice.reason.endswith("but no agent can become another worker (see notPicked)"), choice.reason


def test_an_agent_can_become_a_worker_when_fresh_healthy_eligible_and_not_one_yet() -> None:
    runtime = Runtime(metadata=ObjectMeta(name="d"), spec=RuntimeSpec(
        replicas=1, tieredstore=TieredStore(levels=[Level(mediumtype="MEM", quota="4Mi")])))

    def agent(node: str, healthy: bool = True) -> AgentRecord:
        beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name="d")], healthy=healthy, interval_seconds=5.0)
        return AgentRecord(heartbeat=beat, received_at=NOW)

    workers = [CacheWorker(node="a")]
    assert not can_add_worker(runtime, workers, {"a": agent("a")}, NOW)
    assert not can_add_worker(runtime, workers, {"a": agent("a"), "b": agent("b", healthy=False)}, NOW)
    assert can_add_worker(runtime, workers, {"a": agent("a"), "b": agent("b")}, NOW)


def test_measures_alone_are_written_at_most_every_interval_a_new_decision_at_once() -> None:
    written = autoscale(POLICY, 3, sample(90, reads={"a": (10, 90)}), {"a": (0, 0)}, state(), NOW).state
    assert written.last_decision is not None and written.last_decision.reason == "AtMaxReplicas"
    later = autoscale(POLICY, 3, sample(91, reads={"a": (30, 170)}), {"a": (10, 90)}, written, NOW + 1).state
    assert later.last_decision == written.last_decision and later.last_pressure_time == NOW + 1
    assert not autoscaling_write_due(written, later, NOW, NOW + 1)
    assert not autoscaling_write_due(written, later, NOW, NOW + AUTOSCALE_WRITE_SECONDS - 1)
    assert autoscaling_write_due(written, later, NOW, NOW + AUTOSCALE_WRITE_SECONDS)
    assert autoscaling_write_due(written, later, None, NOW + 1)  # not written by this process: at once
    assert not autoscaling_write_due(written, written, None, NOW + 1)  # nothing new
    calm = autoscale(POLICY, 3, sample(91, reads={"a": (30, 170)}), {"a": (30, 170)}, later, NOW + 2).state
    assert calm.last_decision is not None and calm.last_decision.reason == "Settling"
    # The end of a pressure waits as the measures do (a restart counts the pressure as going on meanwhile)...
    assert not autoscaling_write_due(written, calm, NOW, NOW + 2)
    assert autoscaling_write_due(written, calm, NOW, NOW + AUTOSCALE_WRITE_SECONDS)
    # ... its start does not.
    again = autoscale(POLICY, 3, sample(92, reads={"a": (50, 250)}), {"a": (30, 170)}, calm, NOW + 3).state
    assert again.last_decision is not None and again.last_decision.reason == "AtMaxReplicas"
    assert autoscaling_write_due(calm, again, NOW + 2, NOW + 3)


def test_a_reader_that_pauses_every_other_look_is_not_a_write_a_second() -> None:
    """Reading a full cache at maxReplicas, with every other look's window empty (a reader pausing between
    batches): the hold turns from AtMaxReplicas to Settling and back at every look. The record is written at most
    twice per interval (the turn to calm with the measures, then the pressure again at once), not at every turn."""
    written, written_at, memory, counters, writes = None, None, None, (0, 0), 0
    looks = 120
    for look in range(looks):
        previous = counters
        if look % 2 == 0:
            counters = (counters[0] + 10, counters[1] + 90)
        choice = autoscale(POLICY, 3, sample(90, reads={"a": counters}), {"a": previous} if look else None, memory,
                           NOW + look)
        assert choice.decision is None
        if autoscaling_write_due(written, choice.state, written_at, NOW + look):
            written, written_at, writes = choice.state, NOW + look, writes + 1
        memory = choice.state
    assert writes <= 2 * looks / AUTOSCALE_WRITE_SECONDS + 2, writes


def test_a_pressure_the_record_shows_going_on_counts_until_the_first_look_after_a_restart() -> None:
    pressed = autoscale(POLICY, 3, sample(90, reads={"a": (10, 90)}), {"a": (0, 0)}, state(), NOW).state
    assert autoscaling_resumed(pressed, NOW + 20) == msgspec.structs.replace(pressed, last_pressure_time=NOW + 20)
    calm = autoscale(POLICY, 3, sample(90), {}, state(), NOW).state
    assert autoscaling_resumed(calm, NOW + 20) == calm
    assert autoscaling_resumed(None, NOW) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 60)), min_size=1, max_size=6), st.integers(0, 200))
# Read for 45 s, the record written at 31 s last, a restart at 45 s: the record's pressure is 13 s old.
@example([(1, 45), (0, 40)], 45)
def test_the_record_is_written_seldom_and_never_lets_a_restart_shrink_within_a_cool_down(
        runs: list[tuple[int, int]], restart: int) -> None:
    # One look a second; runs of looks that read nothing (0) or with 1..3 MiB of misses (a low hit ratio:
    # pressure). The state goes on in memory, the record gets it as ``autoscaling_write_due`` says; at ``restart``
    # the memory is lost and the record's state is taken up again. Whatever happens, no shrink within a cool-down
    # of the last pressure, and the record is written once per new decision plus at most once per interval.
    reads = [read for read, looks in runs for _ in range(looks)]
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_hit_ratio_percent=80, cool_down_seconds=30)
    replicas, memory, written, written_at = 2, None, None, None
    counters, last_pressure, writes, decisions = (0, 0), NOW, 0, 0
    for look, read in enumerate(reads):
        now = NOW + look
        if look == restart:
            memory, written_at = autoscaling_resumed(written, now), None
        previous = counters
        counters = (counters[0] + read, counters[1] + 3 * read * MI)
        choice = autoscale(policy, replicas, sample(10, reads={"a": counters}), {"a": previous}, memory, now)
        if read:
            last_pressure = now
        if choice.decision is not None and choice.replicas < replicas:
            assert now - last_pressure >= policy.cool_down_seconds, (look, choice.reason)
        before = memory.last_decision if memory else None
        decisions += choice.state.last_decision != before
        if autoscaling_write_due(written, choice.state, written_at, now):
            written, written_at, writes = choice.state, now, writes + 1
        memory, replicas = choice.state, choice.replicas
    assert writes <= decisions + len(reads) / AUTOSCALE_WRITE_SECONDS + 2, (writes, decisions)
