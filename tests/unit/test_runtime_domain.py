"""Runtime decisions, pure: validation of the spec, and the status computed from the agents' last heartbeats."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.cli.render import describe_runtime
from libs.config import Settings
from libs.events.agent import (
    AgentHeartbeat,
    AgentRecord,
    MountGroup,
    MountReadFailures,
    MountReport,
    MountState,
    ReadFailure,
    TierDisk,
)
from libs.events.common import ObjectMeta, ObjectRef, rfc3339
from libs.events.dataset import Condition, find_condition
from libs.events.runtime import (
    AutoscalingPolicy,
    CacheWorker,
    Level,
    NotPicked,
    Runtime,
    RuntimeRecord,
    RuntimeSpec,
    RuntimeStatus,
    RuntimeStatusChanged,
    TieredStore,
)
from services.agent.cache.eviction import LruPolicy
from services.runtime.domain import (
    MAX_REPLICAS,
    MISSED_BEATS,
    NOT_PICKED_SHOWN,
    READS_REFRESH_SECONDS,
    READY_NODES_IN_FACT,
    OtherRuntime,
    Placement,
    apply_runtime,
    change_errors,
    disk_quotas,
    fact_status,
    node_capacity,
    node_errors,
    ready_nodes,
    replicas_errors,
    runtime_status,
    scale_errors,
    smallest_tier_quota,
    validate_runtime,
)

GiB = 1024**3
NOW = 1_714_564_800.0
INTERVAL = 5.0


def make_runtime(*levels: Level, name: str = "imagenet", namespace: str = "default", **spec: Any) -> Runtime:
    if not levels and "tieredstore" not in spec:
        levels = (Level(mediumtype="MEM", quota="2Gi"),)
    tiers = spec.pop("tieredstore", TieredStore(levels=list(levels)))
    return Runtime(metadata=ObjectMeta(name=name, namespace=namespace), spec=RuntimeSpec(tieredstore=tiers, **spec))


def valid_runtime(replicas: int = 3) -> Runtime:
    return make_runtime(
        Level(mediumtype="MEM", quota="2Gi", high="0.95", low="0.7"),
        Level(mediumtype="SSD", quota="8Gi", path="/mnt/nvme0/cache,/mnt/nvme1/cache", high="0.9", low="0.6"),
        replicas=replicas,
        block_size="4Mi",
    )


def one_error(runtime: Runtime) -> str:
    errors = validate_runtime(runtime)
    assert len(errors) == 1, errors
    return errors[0]


def agent(node: str, *runtimes: tuple[str, str], healthy: bool = True, age: float = 0.0,
          interval: float = INTERVAL) -> AgentRecord:
    refs = [ObjectRef(name=n, namespace=ns) for n, ns in (runtimes or (("imagenet", "default"),))]
    beat = AgentHeartbeat(node=node, runtimes=refs, healthy=healthy, interval_seconds=interval, sent_at=NOW - age)
    return AgentRecord(heartbeat=beat, received_at=NOW - age)


def status_of(runtime: Runtime, agents: list[AgentRecord], conditions: list[Condition] | None = None) -> RuntimeStatus:
    record = RuntimeRecord(runtime=runtime, generation=1, status=RuntimeStatus(conditions=conditions or []))
    return runtime_status(record, agents, NOW)


# --- validate_runtime ---


def test_valid_runtime() -> None:
    assert validate_runtime(valid_runtime()) == []


@pytest.mark.parametrize(
    "level",
    [
        Level(mediumtype="MEM", quota="1Gi"),
        Level(mediumtype="MEM", quota=GiB),
        Level(mediumtype="MEM", quota="500M", high=0.9, low=0.1),
        Level(mediumtype="HDD", quota="1Ti", path="/data/cache"),
        Level(mediumtype="SSD", quota="1Gi", path="/mnt/a,/mnt/b,"),
        Level(mediumtype="MEM", quota="1Gi", high="1", low="0.99"),
        Level(mediumtype="MEM", quota="1Gi", high="1.0", low="0.5"),
    ],
)
def test_valid_levels(level: Level) -> None:
    assert validate_runtime(make_runtime(level)) == []


@pytest.mark.parametrize("block_size", ["64Ki", "4Mi", "64Mi", "1Mi", 4 * 1024 * 1024, "68Ki", "1048576"])
def test_valid_block_sizes(block_size: str | int) -> None:
    assert validate_runtime(make_runtime(block_size=block_size)) == []


@pytest.mark.parametrize("replicas", [0, 1, MAX_REPLICAS])
def test_valid_replicas(replicas: int) -> None:
    assert validate_runtime(make_runtime(replicas=replicas)) == []
    assert replicas_errors(replicas) == []  # a scale's check


def test_bad_name_and_namespace() -> None:
    errors = validate_runtime(make_runtime(name="Image_Net", namespace="-ns"))
    assert [e.split(" ")[0] for e in errors] == ["metadata.name", "metadata.namespace"]


def test_no_levels() -> None:
    assert "at least one cache tier" in one_error(make_runtime(tieredstore=TieredStore()))


def test_no_levels_is_a_runtime_without_workers_only() -> None:
    """A reference dataset's ThinRuntime caches nothing: zero replicas need no tier; a worker, an autoscaler that
    could add one, or a scale above 0 would hold nothing, and are refused."""
    tierless = make_runtime(tieredstore=TieredStore(), replicas=0)
    assert validate_runtime(tierless) == []
    policy = AutoscalingPolicy(min_replicas=0, max_replicas=2, target_cache_used_percent=60, cool_down_seconds=30)
    assert "at least one cache tier" in one_error(make_runtime(tieredstore=TieredStore(), replicas=0,
                                                               autoscaling=policy))
    assert scale_errors(tierless, 0) == []
    assert scale_errors(tierless, 1) == ["runtime default/imagenet has no cache tier (spec.tieredstore.levels), so no "
                                         "cache worker: apply it with a tier to scale it above 0"]
    assert scale_errors(valid_runtime(), 5) == []


@pytest.mark.parametrize("medium", ["NVME", "mem", "", "GPU"])
def test_unknown_medium(medium: str) -> None:
    error = one_error(make_runtime(Level(mediumtype=medium, quota="1Gi")))
    assert error == f"spec.tieredstore.levels[0].mediumtype {medium!r} is unknown (use MEM, SSD or HDD)"


def test_duplicate_medium() -> None:
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path="/a"),
                                   Level(mediumtype="SSD", quota="2Gi", path="/b")))
    assert error == "spec.tieredstore.levels[1].mediumtype SSD appears twice"


@pytest.mark.parametrize("quota", ["0", 0, "0Gi", "0.0Mi"])
def test_zero_quota(quota: str | int) -> None:
    assert one_error(make_runtime(Level(mediumtype="MEM", quota=quota))) == (
        "spec.tieredstore.levels[0].quota must be greater than 0"
    )


def test_a_quota_list_gives_each_directory_its_own_quota() -> None:
    assert validate_runtime(make_runtime(Level(mediumtype="SSD", quota="150Gi", quota_list="100Gi,50Gi",
                                               path="/mnt/a,/mnt/b"))) == []


@pytest.mark.parametrize(("level", "error"), [
    (Level(mediumtype="SSD", quota="100Gi", quota_list="100Gi", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quotaList '100Gi' has 1 quota for the 2 paths in path: give one quota per path, "
     "in the same order"),
    (Level(mediumtype="SSD", quota="150Gi", quota_list="100Gi,lots", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quotaList: 'lots' is not a quantity"),
    (Level(mediumtype="SSD", quota="100Gi", quota_list="100Gi,0", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quotaList '100Gi,0': every quota must be greater than 0"),
    (Level(mediumtype="SSD", quota="0", quota_list="0,0", path="/mnt/a,/mnt/b"),  # a Fluid tier's: quota its sum
     "spec.tieredstore.levels[0].quotaList '0,0': every quota must be greater than 0"),
    (Level(mediumtype="SSD", quota="100Gi", quota_list="100Gi,50Gi", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quota '100Gi' must be the sum of quotaList '100Gi,50Gi' (161061273600 bytes)"),
    (Level(mediumtype="MEM", quota="1Gi", quota_list="1Gi"),
     "spec.tieredstore.levels[0].quotaList is for disk tiers (SSD, HDD), one quota per path; a MEM tier has one "
     "quota"),
    (Level(mediumtype="SSD", quota="10Mi", quota_list="10Mi,1", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quota '10Mi' must be the sum of quotaList '10Mi,1' (10485761 bytes)"),
    (Level(mediumtype="SSD", quota=10485761, quota_list="10Mi,1", path="/mnt/a,/mnt/b"),
     "spec.tieredstore.levels[0].quotaList[1] '1' is too small to hold one block of spec.blockSize '4Mi'"),
])
def test_a_wrong_quota_list_is_refused_saying_why(level: Level, error: str) -> None:
    assert one_error(make_runtime(level)).startswith(error)


@pytest.mark.parametrize("quota", ["lots", "", "-1Gi", -5, "2 GB please", "1K", "1 Gi", "40GB", "Gi"])
def test_quota_not_a_quantity(quota: str | int) -> None:
    error = one_error(make_runtime(Level(mediumtype="MEM", quota=quota)))
    assert error.startswith("spec.tieredstore.levels[0].quota: ")


@pytest.mark.parametrize(("quota", "block_size"), [("1e9", "4Mi"), ("1E9", "4.194304e6"), (".5Gi", "64Ki"),
                                                   ("+2Gi", "1Mi"), ("1G", "4194304")])
def test_quota_and_block_size_in_any_kubernetes_form(quota: str, block_size: str) -> None:
    # Kubernetes' quantity grammar, as Fluid takes it: an exponent, a leading '.', a '+' sign.
    assert validate_runtime(make_runtime(Level(mediumtype="MEM", quota=quota), block_size=block_size)) == []


def test_a_high_watermark_below_the_default_low_says_what_low_is_when_not_given() -> None:
    # Fluid users often give only high: a refusal quoting a low they never wrote must say where it came from.
    error = one_error(make_runtime(Level(mediumtype="MEM", quota="1Gi", high="0.6")))
    assert error.endswith("got low=0.7 high=0.6 (when not given, low is 0.7 and high 0.95)"), error


@pytest.mark.parametrize(
    ("high", "low"),
    [("0.7", "0.7"), ("0.5", "0.7"), ("1.1", "0.7"), ("0.9", "0"), ("0.9", "-0.1"), (2, 1), ("nan", "0.5"),
     ("inf", "0.5")],
)
def test_bad_watermarks(high: str | float, low: str | float) -> None:
    error = one_error(make_runtime(Level(mediumtype="MEM", quota="1Gi", high=high, low=low)))
    assert "watermarks must satisfy 0 < low < high <= 1" in error


@pytest.mark.parametrize(("high", "low"), [("high", "0.7"), ("0.95", "low"), ("", "0.7"), ("95%", "70%")])
def test_non_numeric_watermarks(high: str, low: str) -> None:
    error = one_error(make_runtime(Level(mediumtype="MEM", quota="1Gi", high=high, low=low)))
    assert "high and low must be numbers" in error


@pytest.mark.parametrize("medium", ["SSD", "HDD"])
def test_disk_tier_without_path(medium: str) -> None:
    assert one_error(make_runtime(Level(mediumtype=medium, quota="1Gi"))) == (
        f"spec.tieredstore.levels[0].path is required for {medium} tiers"
    )
    assert "path is required" in one_error(make_runtime(Level(mediumtype=medium, quota="1Gi", path=",")))


@pytest.mark.parametrize("path", ["cache/ssd", "./cache", "/mnt/../etc", "/mnt/a,relative"])
def test_disk_tier_path_must_be_absolute_without_dotdot(path: str) -> None:
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=path)))
    assert "must be an absolute path without '..'" in error


@pytest.mark.parametrize(("path", "used"), [("/etc ", "/etc"), ("/ ", "/"), ("/mnt/x/.. ", "/mnt/x/.."),
                                             ("/data/cache,/usr\t", "/usr")])
def test_disk_tier_paths_are_judged_as_the_agent_uses_them(path: str, used: str) -> None:
    # The agent's cache strips each path: "/etc " is /etc there, so it is refused here, at apply, not on every node.
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=path)))
    assert error.startswith(f"spec.tieredstore.levels[0].path {used!r} ")


@pytest.mark.parametrize("path", ["/mnt/a\x00b", "/mnt/cache\nssd", "/mnt/a\tb,/mnt/c", "/mnt/\x7f"])
def test_disk_tier_paths_with_control_characters_are_refused(path: str) -> None:
    # A NUL byte was accepted, and every mount process of the runtime then died scanning its cache ("embedded null
    # byte"), on every node; a newline inside a path named a folder nobody could type.
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=path)))
    assert error.startswith("spec.tieredstore.levels[0].path ") and "contains the control character" in error


def test_disk_tier_paths_with_blanks_around_them_are_the_paths_the_agent_uses() -> None:
    assert validate_runtime(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=" /mnt/a , /mnt/b,"))) == []


@pytest.mark.parametrize(("ssd", "hdd", "where"), [
    ("/mnt/a,/mnt/a", "/mnt/h", "levels[0]"),
    ("/mnt/a", "/mnt/a", "levels[1]"),
    ("/mnt/a/", "/mnt//a/.", "levels[1]"),
    ("/mnt/b,/mnt/a", "/mnt/c, /mnt/a", "levels[1]"),
])
def test_two_tiers_in_one_directory_are_refused(ssd: str, hdd: str, where: str) -> None:
    # Two tiers in one directory scan it both: every restart deletes the cache (one's blocks are the other's
    # over-quota or copies of a faster tier).
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=ssd),
                                   Level(mediumtype="HDD", quota="2Gi", path=hdd)))
    assert error.startswith(f"spec.tieredstore.{where}.path ")
    assert "two tiers in one directory" in error


@pytest.mark.parametrize(("ssd", "hdd", "where", "how"), [
    ("/mnt/a", "/mnt/a/hdd", "levels[1]", "lies inside /mnt/a, a directory of spec.tieredstore.levels[0].path"),
    ("/mnt/a/ssd/", "/mnt/b, /mnt//a", "levels[1]",
     "holds /mnt/a/ssd, a directory of spec.tieredstore.levels[0].path"),
    ("/mnt/a,/mnt/a/b", "/mnt/h", "levels[0]", "lies inside /mnt/a, a directory of spec.tieredstore.levels[0].path"),
])
def test_nested_tier_directories_are_refused(ssd: str, hdd: str, where: str, how: str) -> None:
    # A tier directory inside another (of another tier, or of the same one) puts one cache folder in the other's
    # tree: what one scans and frees is the other's. Accepted before; refused now, with where the other one is.
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="1Gi", path=ssd),
                                   Level(mediumtype="HDD", quota="2Gi", path=hdd)))
    assert error.startswith(f"spec.tieredstore.{where}.path ")
    assert how in error and "give each a directory apart" in error


def test_sibling_tier_directories_with_a_common_prefix_are_accepted() -> None:
    assert validate_runtime(make_runtime(Level(mediumtype="SSD", quota="1Gi", path="/mnt/a"),
                                         Level(mediumtype="HDD", quota="2Gi", path="/mnt/ab,/mnt/a-b"))) == []


@pytest.mark.parametrize("block_size", ["32Ki", "60Ki", "128Mi", "0", "1Gi", 1024])
def test_block_size_out_of_range(block_size: str | int) -> None:
    error = one_error(make_runtime(block_size=block_size))
    assert error.startswith("spec.blockSize must be a multiple of 4Ki between 64Ki and 64Mi")


@pytest.mark.parametrize("block_size", ["66Ki", "65537", "4194305", "1000000"])
def test_block_size_not_a_multiple_of_4ki(block_size: str) -> None:
    assert "multiple of 4Ki" in one_error(make_runtime(block_size=block_size))


def test_block_size_not_a_quantity() -> None:
    assert one_error(make_runtime(block_size="big")).startswith("spec.blockSize: ")


@pytest.mark.parametrize(("level", "block_size", "smallest"), [
    (Level(mediumtype="MEM", quota="1Mi"), "4Mi", "5Mi (4415057 bytes)"),
    # Fluid's English JuiceFS sample: 40960 is bytes, not MiB.
    (Level(mediumtype="SSD", quota=40960, path="/var/jfsCache"), "4Mi", "5Mi (4415057 bytes)"),
    # As large as a block, but a tier keeps blocks below its high watermark.
    (Level(mediumtype="MEM", quota="4Mi"), "4Mi", "5Mi (4415057 bytes)"),
    (Level(mediumtype="HDD", quota="1Mi", path="/mnt/h", high="0.5", low="0.2"), "1Mi", "2Mi (2097152 bytes)"),
])
def test_a_tier_too_small_for_one_block_is_refused_with_the_quota_to_give(level: Level, block_size: str,
                                                                           smallest: str) -> None:
    # Before, it was accepted: the tier cached no whole block, every read went to the store, nobody was told.
    error = one_error(make_runtime(level, block_size=block_size))
    assert error.startswith(f"spec.tieredstore.levels[0].quota {level.quota!r} is too small to hold one block of "
                            f"spec.blockSize {block_size!r}: a tier keeps blocks below its high watermark "), error
    assert error.endswith(f"give a quota of at least {smallest}, or a smaller blockSize"), error


def test_each_directory_of_a_disk_tier_must_hold_one_block() -> None:
    # The agent gives each directory an equal share: 6Mi over two is 3Mi each, less than a 4Mi block.
    error = one_error(make_runtime(Level(mediumtype="SSD", quota="6Mi", path="/mnt/a,/mnt/b"), block_size="4Mi"))
    assert "(0.95 of the quota, split equally between its 2 directories)" in error
    assert error.endswith("at least 9Mi (8830114 bytes), or a smaller blockSize")
    assert validate_runtime(make_runtime(Level(mediumtype="SSD", quota=8830114, path="/mnt/a,/mnt/b"),
                                         block_size="4Mi")) == []
    assert "too small" in one_error(make_runtime(Level(mediumtype="SSD", quota=8830113, path="/mnt/a,/mnt/b"),
                                                 block_size="4Mi"))


@pytest.mark.parametrize(("level", "block_size"), [
    (Level(mediumtype="MEM", quota="5Mi"), "4Mi"),
    (Level(mediumtype="MEM", quota=4415057), "4Mi"),
    (Level(mediumtype="MEM", quota="64Ki", high="1", low="0.5"), "64Ki"),
    (Level(mediumtype="SSD", quota="2Mi", path="/mnt/a,/mnt/b", high="1", low="0.5"), "1Mi"),
])
def test_a_tier_that_holds_one_block_is_accepted(level: Level, block_size: str) -> None:
    assert validate_runtime(make_runtime(level, block_size=block_size)) == []


@given(block_size=st.integers(16, 16384).map(lambda pages: pages * 4096),
       high=st.floats(0.01, 1.0), directories=st.integers(1, 8))
def test_the_smallest_quota_is_the_smallest_the_agents_cache_admits_a_block_into(block_size: int, high: float,
                                                                                 directories: int) -> None:
    # Judged by the agent's own admission rule: each directory gets quota // directories, a block enters below
    # int(high * share).
    smallest = smallest_tier_quota(block_size, high, directories)

    def admits(quota: int) -> bool:
        share = quota // directories
        return LruPolicy(int(high * share), 0).plan("block", block_size) is not None

    assert admits(smallest)
    assert not admits(smallest - 1)


def test_a_bad_block_size_or_quota_is_said_once_not_as_a_tier_too_small() -> None:
    assert one_error(make_runtime(Level(mediumtype="MEM", quota="1Ki"), block_size="1Gi")).startswith(
        "spec.blockSize must be")
    assert one_error(make_runtime(Level(mediumtype="MEM", quota="1Ki", high="x"))).endswith(
        "high and low must be numbers, got high='x' low='0.7'")


@pytest.mark.parametrize("replicas", [-1, -100, MAX_REPLICAS + 1])
def test_replicas_out_of_range(replicas: int) -> None:
    error = one_error(make_runtime(replicas=replicas))
    assert error.startswith("spec.replicas must be between 0 and")
    assert replicas_errors(replicas) == [error]  # a scale is refused in an apply's words


def test_every_problem_is_reported_at_once() -> None:
    runtime = make_runtime(
        Level(mediumtype="NVME", quota="0", high="x"),
        Level(mediumtype="SSD", quota="1Gi", path="rel", high="0.5", low="0.6"),
        replicas=-1,
        block_size="3Ki",
    )
    errors = validate_runtime(runtime)
    for expected in ("spec.replicas", "'NVME' is unknown", "quota must be greater than 0", "must be numbers",
                     "absolute path", "0 < low < high", "spec.blockSize"):
        assert any(expected in e for e in errors), (expected, errors)


# --- apply_runtime ---


def test_apply_runtime_generations() -> None:
    record, changed = apply_runtime(None, valid_runtime())
    assert (record.generation, changed) == (1, True)
    same, changed = apply_runtime(record, valid_runtime())
    assert (same, changed) == (record, False)
    bigger, changed = apply_runtime(record, valid_runtime(replicas=5))
    assert (bigger.generation, changed) == (2, True)


def test_a_change_of_labels_or_annotations_only_is_kept_without_a_new_generation() -> None:
    """``kubectl label`` on a runtime (or a GitOps tool's tracking annotation) reaches the service as an apply: the
    record keeps the metadata, and its sequence moves on, but the spec is the same, so the generation too (as a
    Dataset's and an operation's)."""
    record, _ = apply_runtime(None, valid_runtime(), sequence=10)
    runtime = valid_runtime()
    labelled = msgspec.structs.replace(runtime, metadata=msgspec.structs.replace(
        runtime.metadata, labels={"team": "ml"}, annotations={"argocd.argoproj.io/tracking-id": "x"}))
    kept, changed = apply_runtime(record, labelled, sequence=11)
    assert (kept.generation, kept.command_sequence, kept.runtime, changed) == (1, 11, labelled, True)
    stale, changed = apply_runtime(kept, valid_runtime(), sequence=10)  # redelivered behind #11
    assert (stale, changed) == (kept, False)


def test_an_older_apply_delivered_again_after_a_newer_one_is_stale() -> None:
    # The service was killed before acking apply #10; JetStream redelivers it after apply #12 was applied.
    first, _ = apply_runtime(None, valid_runtime(), sequence=10)
    newer, changed = apply_runtime(first, valid_runtime(replicas=5), sequence=12)
    assert (newer.generation, newer.command_sequence, changed) == (2, 12, True)
    again, changed = apply_runtime(newer, valid_runtime(), sequence=10)
    assert (again, changed) == (newer, False)
    later, changed = apply_runtime(newer, valid_runtime(), sequence=13)
    assert (later.generation, later.runtime, changed) == (3, valid_runtime(), True)


def test_a_newer_apply_that_changes_nothing_still_makes_older_ones_stale() -> None:
    first, _ = apply_runtime(None, valid_runtime(), sequence=10)
    same, changed = apply_runtime(first, valid_runtime(), sequence=12)
    assert (same.generation, same.command_sequence, changed) == (1, 12, True)
    stale, changed = apply_runtime(same, valid_runtime(replicas=5), sequence=11)  # redelivered behind #12
    assert (stale, changed) == (same, False)


def test_the_block_size_is_fixed_for_the_runtimes_life_whatever_its_spelling() -> None:
    record, _ = apply_runtime(None, valid_runtime(), sequence=10)
    assert change_errors(None, make_runtime(Level(mediumtype="MEM", quota="1Gi"), block_size="1Mi")) == []
    spelled = valid_runtime(replicas=5)
    spelled = msgspec.structs.replace(spelled, spec=msgspec.structs.replace(spelled.spec, block_size="4194304"))
    assert change_errors(record, spelled, sequence=11) == []
    other = msgspec.structs.replace(spelled, spec=msgspec.structs.replace(spelled.spec, block_size="1Mi"))
    [error] = change_errors(record, other, sequence=11)
    assert "spec.blockSize cannot change (4Mi -> 1Mi)" in error
    assert change_errors(record, other, sequence=9) == []  # stale: apply_runtime ignores it anyway


# --- runtime_status ---


def test_ready_when_every_replica_beats() -> None:
    status = status_of(valid_runtime(replicas=2), [agent("node-b"), agent("node-a")])
    assert status.phase == "Ready"
    assert status.message == ""
    assert status.worker_number_ready == 2
    assert status.desired_worker_number_scheduled == 2
    assert status.ready_nodes == ["node-a", "node-b"]


def test_ready_with_more_agents_than_replicas() -> None:
    status = status_of(valid_runtime(replicas=1), [agent("node-a"), agent("node-b")])
    assert status.phase == "Ready"
    # Both serve (node-b as a client); one cache worker, as asked.
    assert status.ready_nodes == ["node-a", "node-b"]
    assert status.worker_number_ready == 1
    assert [w.node for w in status.workers] == ["node-a"]
    assert status.not_picked == [NotPicked(node="node-b", reason="1 of 1 replicas already picked")]


def test_partial_ready() -> None:
    status = status_of(valid_runtime(replicas=3), [agent("node-a"), agent("node-b")])
    assert status.phase == "PartialReady"
    # Fewer agents serve it than it asks for: no agent makes up the rest, so the message says what to change.
    assert status.message == ("2 of 3 agents ready: only 2 agents serve this runtime; lower spec.replicas to 2, or "
                              "run more agents")


def test_not_ready_without_agents() -> None:
    status = status_of(valid_runtime(replicas=3), [])
    assert status.phase == "NotReady"
    assert status.worker_number_ready == 0
    assert status.ready_nodes == []
    assert status.message.startswith("0 of 3 agents ready")
    assert (status.cache_capacity, status.cache_capacity_bytes) == ("0B", 0)


def test_a_runtime_without_its_dataset_desires_no_worker_so_ready_reads_0_of_0() -> None:
    # Its phase follows the agents (a Dataset applied now binds at once), and it picks no worker: READY
    # (workerNumberReady/desiredWorkerNumberScheduled) read 0/1 beside Ready.
    record = RuntimeRecord(runtime=valid_runtime(replicas=1), generation=1)
    status = runtime_status(record, [agent("node-a")], NOW, Placement(found=False))
    assert status.phase == "Ready"
    assert (status.worker_number_ready, status.desired_worker_number_scheduled) == (0, 0)
    assert status.message == "no Dataset default/imagenet: no cache workers until it is applied"


def test_a_reference_dataset_s_runtime_desires_no_worker() -> None:
    record = RuntimeRecord(runtime=valid_runtime(replicas=1), generation=1)
    status = runtime_status(record, [agent("node-a")], NOW, Placement(reference=True))
    assert status.phase == "Ready" and status.desired_worker_number_scheduled == 0 and status.message == ""


def test_a_partial_ready_message_names_why_the_ready_agents_are_no_workers() -> None:
    # One agent for two replicas, and it is another dataset's Exclusive worker: no worker at all, and the message
    # said only "1 of 2 agents ready".
    record = RuntimeRecord(runtime=valid_runtime(replicas=2), generation=1)
    status = runtime_status(record, [agent("node-a")], NOW, Placement(),
                            [OtherRuntime("default/demo", True, ("node-a",))])
    assert status.phase == "PartialReady" and status.workers == []
    assert status.desired_worker_number_scheduled == 2
    assert status.message == ("1 of 2 agents ready: only 1 agent serves this runtime; lower spec.replicas to 1, or "
                              "run more agents; 0 of 2 cache workers ready "
                              "(node-a: worker of default/demo (Exclusive); see notPicked); Exclusive placement "
                              "keeps 1 ready agent(s) from this runtime: run more agents, or set placement: Shared on "
                              "Dataset default/demo, default/imagenet")
    assert [entry.reason for entry in status.not_picked] == ["worker of default/demo (Exclusive)"]


def test_an_exclusive_shortfall_says_what_to_change() -> None:
    """The message named the cause (another dataset's Exclusive worker) but not the fix: more agents, or
    placement: Shared on each Dataset whose Exclusive placement stands in the way, and only those."""
    record = RuntimeRecord(runtime=valid_runtime(replicas=2), generation=1)
    agents = [agent("node-a"), agent("node-b")]
    # This dataset Shared, the other Exclusive: only the other is to change.
    status = runtime_status(record, agents, NOW, Placement(exclusive=False),
                            [OtherRuntime("default/demo", True, ("node-b",))])
    assert status.message.endswith("1 of 2 cache workers ready (node-b: worker of default/demo (Exclusive); see "
                                   "notPicked); Exclusive placement keeps 1 ready agent(s) from this runtime: run "
                                   "more agents, or set placement: Shared on Dataset default/demo"), status.message
    # This dataset Exclusive, the other Shared: only this one is to change.
    status = runtime_status(record, agents, NOW, Placement(),
                            [OtherRuntime("default/demo", False, ("node-a", "node-b"))])
    assert status.message == ("0 of 2 cache workers ready (node-a: worker of default/demo, and this dataset is "
                              "Exclusive; see notPicked); Exclusive placement keeps 2 ready agent(s) from this "
                              "runtime: run more agents, or set placement: Shared on Dataset default/imagenet")
    # Not Exclusive placement (nodeAffinity): no word about it.
    no_node: dict[str, object] = {"required": {"nodeSelectorTerms": []}}
    status = runtime_status(record, agents, NOW, Placement(affinity=no_node),
                            [OtherRuntime("default/demo", True, ("node-b",))])
    assert "Exclusive placement" not in status.message, status.message


def test_a_partial_ready_message_adds_no_worker_shortfall_the_agents_explain() -> None:
    # Every ready agent is a worker: the agents' count says it all.
    status = status_of(valid_runtime(replicas=3), [agent("node-a"), agent("node-b"), agent("node-c", healthy=False)])
    assert status.phase == "PartialReady" and status.worker_number_ready == 2
    assert status.message == "2 of 3 agents ready; node-c unhealthy (no reason given)"


def test_stale_heartbeats_are_ignored() -> None:
    agents = [
        agent("fresh"),
        agent("just-in-time", age=MISSED_BEATS * INTERVAL),
        agent("stale", age=MISSED_BEATS * INTERVAL + 0.001),
        agent("long-gone", age=3600),
        agent("slow-beater", age=50, interval=20.0),
    ]
    status = status_of(valid_runtime(replicas=5), agents)
    assert status.ready_nodes == ["fresh", "just-in-time", "slow-beater"]
    assert status.phase == "PartialReady"


def test_unhealthy_agents_are_ignored() -> None:
    status = status_of(valid_runtime(replicas=2), [agent("node-a"), agent("node-b", healthy=False)])
    assert status.ready_nodes == ["node-a"]
    assert status.phase == "PartialReady"


def test_an_unhealthy_only_node_is_named_with_its_problems_and_keeps_the_runtime_partly_ready() -> None:
    sick = AgentRecord(heartbeat=AgentHeartbeat(
        node="node-a", runtimes=[ObjectRef(name="imagenet", namespace="default")], healthy=False,
        problems=["mount default/imagenet: cache directory /c/default/imagenet is down"], interval_seconds=2.0,
        sent_at=NOW), received_at=NOW)
    status = status_of(valid_runtime(replicas=1), [sick])
    assert status.phase == "PartialReady" and status.ready_nodes == [] and status.cache_capacity_bytes == 0
    assert status.message == ("0 of 1 agents ready; node-a unhealthy (mount default/imagenet: cache directory "
                              "/c/default/imagenet is down)")


def one_sick_mount(mount_health: bool = True) -> AgentRecord:
    """A node serving every runtime, mounting default/imagenet (healthy) and default/other (cache directory down)."""
    return AgentRecord(heartbeat=AgentHeartbeat(
        node="node-a", all_runtimes=True, healthy=False, mount_health=mount_health,
        problems=["mount default/other: cache directory /c/default/other is down"], interval_seconds=INTERVAL,
        mount_groups=[MountGroup(namespace="default", state="Serving", datasets={"imagenet": 0}),
                      MountGroup(namespace="default", state="Serving", datasets={"other": 0}, unhealthy=True)],
        sent_at=NOW), received_at=NOW)


def test_another_datasets_cache_directory_down_leaves_the_node_ready_for_this_runtime() -> None:
    status = status_of(valid_runtime(replicas=1), [one_sick_mount()])
    assert status.phase == "Ready" and status.ready_nodes == ["node-a"] and status.message == ""
    assert status.cache_capacity_bytes > 0
    other = status_of(make_runtime(Level(mediumtype="SSD", path="/c", quota="1Gi"), name="other"), [one_sick_mount()])
    assert other.phase == "PartialReady" and other.ready_nodes == []
    assert other.message == "0 of 1 agents ready; node-a unhealthy (mount default/other: cache directory " \
                            "/c/default/other is down)"


def test_an_agent_that_does_not_mark_its_mounts_is_unhealthy_for_every_runtime() -> None:
    status = status_of(valid_runtime(replicas=1), [one_sick_mount(mount_health=False)])
    assert status.phase == "PartialReady" and status.ready_nodes == []


def outage_agents(count: int, problems: int, healthy: bool = False) -> list[AgentRecord]:
    """Agents of EKS-like names whose mounts all fail (a store outage), each with ``problems`` lines."""
    lines = [f"mount default/dataset-{i:04d}: mount process exited with code 1 3 times in a row: the object store "
             "answered 503 Service Unavailable" for i in range(problems)]
    return [AgentRecord(heartbeat=AgentHeartbeat(
        node=f"ip-10-0-{i // 250}-{i % 250}.ec2.internal", runtimes=[ObjectRef(name="imagenet")], healthy=healthy,
        problems=lines, interval_seconds=INTERVAL, sent_at=NOW), received_at=NOW) for i in range(count)]


def test_the_message_names_three_unhealthy_nodes_with_three_problems_each_and_counts_the_rest() -> None:
    status = status_of(valid_runtime(replicas=3), outage_agents(10, 20))
    first, *rest = status.message.split("; ")
    assert first == "0 of 3 agents ready"
    assert [part.split(" unhealthy (")[0] for part in rest if " unhealthy (" in part] == [
        "ip-10-0-0-0.ec2.internal", "ip-10-0-0-1.ec2.internal", "ip-10-0-0-2.ec2.internal"]
    assert rest[-1] == "and 7 more unhealthy node(s)"
    assert status.message.count("and 17 more problem(s)") == 3
    assert all(reason.count("mount default/") == 3 and reason.endswith("and 17 more problem(s))")
               for reason in (agent.reason for agent in status.not_picked))
    few = status_of(valid_runtime(replicas=1), outage_agents(1, 3))
    assert few.message.endswith("answered 503 Service Unavailable)") and "more" not in few.message


def test_a_store_outage_on_a_hundred_nodes_keeps_the_status_under_the_event_limit() -> None:
    # Every node's mounts fail, each node sending the most problems an agent sends (20): the status event must
    # still be one the dataset service takes (SHOAL_MAX_EVENT_BYTES, 256 KiB by default).
    status = status_of(valid_runtime(replicas=3), outage_agents(200, 20))
    event = RuntimeStatusChanged(name="imagenet", namespace="default", generation=1, status=status)
    assert status.phase == "PartialReady" and status.not_picked_count == 200
    assert len(msgspec.json.encode(event)) < Settings().service.max_event_bytes


def test_a_mount_failing_on_a_thousand_nodes_keeps_the_status_under_the_event_limit() -> None:
    # Every node's mount of the dataset fails (credentials refused): the Mounted message, also added to the
    # runtime's message, names three nodes (those Failing first) and counts the rest.
    ref = ObjectRef(name="imagenet")
    failing = MountReport(dataset=ref, state="Failing", message="mount process exited with code 1 (2 times in a "
                          "row): the object store refused the credentials (403 Forbidden)")
    starting = MountReport(dataset=ref, state="Starting", message="mounting")
    agents = [with_mounts(record, starting if i == 0 else failing)
              for i, record in enumerate(outage_agents(1000, 0, healthy=True))]
    status = status_of(valid_runtime(replicas=3), agents)
    [mounted] = [c for c in status.conditions if c.type == "Mounted"]
    assert mounted.reason == "MountFailing"
    assert mounted.message.startswith("not serving on ip-10-0-0-1.ec2.internal: mount process exited with code 1")
    assert mounted.message.endswith("; and 997 more node(s)") and mounted.message.count("ip-10-0-") == 3
    event = RuntimeStatusChanged(name="imagenet", namespace="default", generation=1, status=status)
    assert len(msgspec.json.encode(event)) < Settings().service.max_event_bytes


def test_heartbeats_for_other_runtimes_or_namespaces_are_ignored() -> None:
    agents = [
        agent("mine", ("coco", "default"), ("imagenet", "default")),
        agent("other-runtime", ("coco", "default")),
        agent("other-namespace", ("imagenet", "ml-team")),
        agent("serves-nothing", ("", "")),
    ]
    status = status_of(valid_runtime(replicas=1), agents)
    assert status.ready_nodes == ["mine"]
    assert status.phase == "Ready"


def test_agent_without_runtimes_is_not_ready() -> None:
    beat = AgentHeartbeat(node="empty", runtimes=[], interval_seconds=INTERVAL)
    assert status_of(valid_runtime(), [AgentRecord(heartbeat=beat, received_at=NOW)]).worker_number_ready == 0


def test_capacity_is_the_sum_of_quotas_times_ready_nodes() -> None:
    runtime = valid_runtime(replicas=3)
    assert node_capacity(runtime) == 10 * GiB
    status = status_of(runtime, [agent("node-a"), agent("node-b"), agent("node-c", healthy=False)])
    assert status.cache_capacity_bytes == 20 * GiB
    assert status.cache_capacity == "20.00GiB"


def test_with_a_ring_the_capacity_counts_the_nodes_out_of_it_that_still_hold_blocks() -> None:
    # Scaled down from two workers to one: node-b keeps its blocks, which the Dataset's cached counts and its
    # cacheCapacity counts the tiers of (held_capacity); the Runtime's counted the ring alone, half of it.
    def serving(node: str) -> AgentRecord:
        mount = MountReport(dataset=ObjectRef(name="imagenet"), state="Serving", peer_url=f"http://{node}:9100")
        beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name="imagenet")], interval_seconds=INTERVAL,
                              sent_at=NOW, mounts=[mount])
        return AgentRecord(heartbeat=beat, received_at=NOW)

    record = RuntimeRecord(runtime=valid_runtime(replicas=1), generation=1)
    agents = [serving("node-a"), serving("node-b")]
    assert runtime_status(record, agents, NOW).cache_capacity_bytes == 10 * GiB
    status = runtime_status(record, agents, NOW, holders={"node-a", "node-b"})
    assert [w.node for w in status.workers] == ["node-a"]
    assert (status.cache_capacity, status.node_capacity_bytes) == ("20.00GiB", 10 * GiB)
    # A holder in the ring is counted once.
    assert runtime_status(record, agents, NOW, holders={"node-a"}).cache_capacity_bytes == 10 * GiB


def test_block_size_and_conditions_in_status() -> None:
    condition = Condition(type="Ready", status="True")
    status = status_of(valid_runtime(), [agent("node-a")], conditions=[condition])
    assert status.block_size_bytes == 4 * 1024 * 1024
    assert status.conditions == [condition]


def test_zero_replicas_with_no_agents_is_not_ready() -> None:
    assert status_of(make_runtime(replicas=0), []).phase == "NotReady"


def test_zero_replicas_is_ready_and_says_every_node_reads_the_store() -> None:
    """Ready with its nodes mounting, as in Fluid, and the dataset Bound with Mounted=True: it read as a cache at
    work, while no worker caches for the others. The message says so; the phase stays Fluid's."""
    status = status_of(make_runtime(replicas=0), [agent("node-a"), agent("node-b")])
    assert (status.phase, status.worker_number_ready, status.desired_worker_number_scheduled) == ("Ready", 0, 0)
    assert status.message == "spec.replicas is 0: no cache workers, so every node reads from the store itself"
    # By design, not for want of replicas: a reference dataset's runtime, or one whose Dataset is missing (its
    # own note), says nothing of the kind.
    record = RuntimeRecord(runtime=make_runtime(replicas=0), generation=1)
    assert runtime_status(record, [agent("node-a")], NOW, Placement(reference=True)).message == ""
    assert "spec.replicas is 0" not in runtime_status(record, [agent("node-a")], NOW, Placement(found=False)).message


# --- Properties over heartbeats ---


RUNTIME_REFS = st.sampled_from([("imagenet", "default"), ("imagenet", "ml-team"), ("coco", "default")])
AGENTS = st.dictionaries(
    keys=st.sampled_from([f"node-{i}" for i in range(8)]),
    values=st.builds(
        lambda refs, healthy, age, interval: (refs, healthy, age, interval),
        st.lists(RUNTIME_REFS, max_size=3),
        st.booleans(),
        st.floats(min_value=0, max_value=100, allow_nan=False),
        st.sampled_from([1.0, 5.0, 10.0, 30.0]),
    ),
    max_size=8,
)


def build_agents(spec: dict[str, tuple[list[tuple[str, str]], bool, float, float]]) -> dict[str, AgentRecord]:
    out = {}
    for node, (refs, healthy, age, interval) in spec.items():
        beat = AgentHeartbeat(node=node, runtimes=[ObjectRef(name=n, namespace=ns) for n, ns in refs],
                              healthy=healthy, interval_seconds=interval)
        out[node] = AgentRecord(heartbeat=beat, received_at=NOW - age)
    return out


@given(AGENTS, st.sampled_from([f"node-{i}" for i in range(10)]), st.integers(min_value=0, max_value=10))
def test_a_fresh_healthy_heartbeat_never_lowers_readiness(spec: Any, node: str, replicas: int) -> None:
    runtime = valid_runtime(replicas=replicas)
    agents = build_agents(spec)
    before = status_of(runtime, list(agents.values()))
    # The agents KV keeps one record per node: a new beat replaces that node's previous one.
    agents[node] = agent(node, ("imagenet", "default"))
    after = status_of(runtime, list(agents.values()))
    assert after.worker_number_ready >= before.worker_number_ready
    assert node in after.ready_nodes
    assert set(before.ready_nodes) <= set(after.ready_nodes)
    rank = {"NotReady": 0, "PartialReady": 1, "Ready": 2}
    assert rank[after.phase] >= rank[before.phase]


@given(AGENTS, st.integers(min_value=0, max_value=10))
def test_status_is_consistent_with_its_ready_nodes(spec: Any, replicas: int) -> None:
    runtime = valid_runtime(replicas=replicas)
    agents = list(build_agents(spec).values())
    status = status_of(runtime, agents)
    assert status.ready_nodes == sorted(set(status.ready_nodes))
    assert status.ready_nodes == ready_nodes(runtime, agents, NOW)
    assert len(status.ready_nodes) <= len(agents)
    # From scratch every healthy serving node is eligible: workers are the first ``replicas`` of them.
    assert [w.node for w in status.workers] == status.ready_nodes[:replicas]
    assert status.worker_number_ready == min(replicas, len(status.ready_nodes))
    assert status.cache_capacity_bytes == node_capacity(runtime) * len(status.ready_nodes)
    serving_unhealthy = [r for r in agents if not r.heartbeat.healthy
                         and NOW - r.received_at <= MISSED_BEATS * r.heartbeat.interval_seconds
                         and ObjectRef(name="imagenet", namespace="default") in r.heartbeat.runtimes]
    if not status.ready_nodes:
        # An unhealthy node that still serves keeps the runtime PartialReady (its mounts may still serve).
        assert status.phase == ("PartialReady" if serving_unhealthy else "NotReady")
    elif len(status.ready_nodes) >= replicas:
        assert status.phase == "Ready"
    else:
        assert status.phase == "PartialReady"
    for record in agents:
        beat = record.heartbeat
        expected = (beat.healthy and NOW - record.received_at <= MISSED_BEATS * beat.interval_seconds
                    and ObjectRef(name="imagenet", namespace="default") in beat.runtimes)
        assert (beat.node in status.ready_nodes) == expected


# --- whether the dataset's mounts serve ---


def with_mounts(record: AgentRecord, *reports: MountReport) -> AgentRecord:
    beat = msgspec.structs.replace(record.heartbeat, mounts=list(reports))
    return msgspec.structs.replace(record, heartbeat=beat)


def test_mounted_condition_names_the_nodes_whose_mount_is_not_serving() -> None:
    runtime = valid_runtime(replicas=2)
    ref = ObjectRef(name="imagenet")
    serving = MountReport(dataset=ref, state="Serving")
    failing = MountReport(dataset=ref, state="Failing", message="mount process exited with code 1 (2 times in a row)")
    other = MountReport(dataset=ObjectRef(name="coco"), state="Failing", message="not this runtime's")
    status = status_of(runtime, [with_mounts(agent("node-a"), serving), with_mounts(agent("node-b"), failing, other)])
    [mounted] = [c for c in status.conditions if c.type == "Mounted"]
    assert (mounted.status, mounted.reason) == ("False", "MountFailing")
    assert "node-b: mount process exited with code 1" in mounted.message and "node-a" not in mounted.message
    assert "not this runtime's" not in mounted.message
    assert status.phase == "Ready" and mounted.message in status.message
    status = status_of(runtime, [with_mounts(agent("node-a"), serving), with_mounts(agent("node-b"), serving)],
                       conditions=status.conditions)
    [mounted] = [c for c in status.conditions if c.type == "Mounted"]
    assert mounted.status == "True" and status.message == ""
    # No node reports the mount (the dataset is not bound): no condition at all.
    assert [c.type for c in status_of(runtime, [agent("node-a")], conditions=status.conditions).conditions] == []


def with_read_failures(record: AgentRecord, name: str, *files: ReadFailure) -> AgentRecord:
    failures = [MountReadFailures(dataset=ObjectRef(name=name), files=list(files))]
    return msgspec.structs.replace(record, heartbeat=msgspec.structs.replace(record.heartbeat,
                                                                             read_failures=failures))


def test_failed_reads_on_a_node_show_as_a_condition_naming_the_file_until_they_stop() -> None:
    runtime = valid_runtime(replicas=2)
    changed = ReadFailure(path="train/shard-7.tar", errno="ESTALE", count=41, since=NOW - 20, at=NOW - 3,
                          reason="the object changed or was deleted since the dataset was synced (resync it): ...")
    other = ReadFailure(path="train/shard-8.tar", errno="ESTALE", count=1, since=NOW - 9, at=NOW - 9, reason="...")
    elsewhere = ReadFailure(path="x", errno="EIO", reason="not this runtime's", at=NOW)
    agents = [agent("node-a"), with_read_failures(with_read_failures(agent("node-b"), "coco", elsewhere),
                                                  "imagenet", changed, other)]
    status = status_of(runtime, agents)
    [reads] = [c for c in status.conditions if c.type == "ReadsFailing"]
    assert (reads.status, reads.reason) == ("True", "ObjectChanged")
    assert reads.message == ("node-b: 42 failed read(s) since 2024-05-01T11:59:40Z, the last at 2024-05-01T11:59:57Z "
                             "of 'train/shard-7.tar' (and 1 other file(s)): ESTALE: the object changed or was "
                             "deleted since the dataset was synced (resync it): ..."), reads.message
    assert status.phase == "Ready"  # reads failing do not unbind anything: the mount serves the other files
    store = ReadFailure(path="a", errno="EIO", reason="the object store failed: 503", at=NOW)
    again = status_of(runtime, [with_read_failures(agent("node-a"), "imagenet", store), agents[1]], status.conditions)
    [reads_again] = [c for c in again.conditions if c.type == "ReadsFailing"]
    assert reads_again.message.startswith("node-a: 1 failed read(s)") and "; node-b: 42" in reads_again.message
    assert reads_again.last_transition_time == reads.last_transition_time
    only_store = status_of(runtime, [with_read_failures(agent("node-a"), "imagenet", store)])
    assert [c.reason for c in only_store.conditions if c.type == "ReadsFailing"] == ["StoreError"]
    # The nodes stop reporting them (read again fine, or a minute without failures): the condition goes.
    assert [c.type for c in status_of(runtime, [agent("node-a"), agent("node-b")], again.conditions).conditions
            if c.type == "ReadsFailing"] == []


def test_failed_reads_climbing_keep_the_condition_as_written_until_what_matters_changes_or_a_minute_passes() -> None:
    # Its count and times moved at every heartbeat: a status write, a fact and a dataset write each, every few
    # seconds for as long as reads failed.
    runtime = valid_runtime(replicas=2)

    def failing(node: str, count: int, errno: str = "ESTALE", reason: str = "changed") -> AgentRecord:
        # A heartbeat at NOW + count (a read failing every second), the last failure a second before it.
        return with_read_failures(agent(node, age=-count), "imagenet", ReadFailure(
            path="/model.bin", errno=errno, reason=reason, count=count, since=NOW, at=NOW + count - 1))

    def at(now: float, previous: RuntimeStatus, *agents: AgentRecord) -> RuntimeStatus:
        record = RuntimeRecord(runtime=runtime, generation=1, status=previous)
        return runtime_status(record, list(agents), now)

    def reads(status: RuntimeStatus) -> Condition:
        [condition] = [c for c in status.conditions if c.type == "ReadsFailing"]
        return condition

    first = at(NOW, RuntimeStatus(), failing("node-a", 1))
    assert first.reads_failing is not None and first.reads_failing.written_at == NOW
    status = first
    for count in range(2, 40):  # a beat every second, for most of a minute: nothing changes
        status = at(NOW + count, status, failing("node-a", count))
        assert status == first
    refreshed = at(NOW + READS_REFRESH_SECONDS, status, failing("node-a", 60))
    assert reads(refreshed).message.startswith("node-a: 60 failed read(s)")
    assert reads(refreshed).last_transition_time == reads(first).last_transition_time
    # A second node, a new reason, a node's errno, the condition's reason: at once.
    later = NOW + READS_REFRESH_SECONDS + 1
    two = reads(at(later, refreshed, failing("node-a", 61), failing("node-b", 61)))
    assert "; node-b: 61 failed read(s)" in two.message
    assert reads(at(later, refreshed, failing("node-a", 61, reason="changed again"))).message.endswith(
        "ESTALE: changed again")
    store = reads(at(later, refreshed, failing("node-a", 61, errno="EIO")))
    assert store.reason == "StoreError" and "61 failed read(s)" in store.message
    # A clock set back does not hold the message until it catches up.
    assert "65 failed" in reads(at(NOW - 10, refreshed, failing("node-a", 65))).message
    # Failures gone: the condition and what it was written from go.
    gone = at(later, refreshed, agent("node-a", age=NOW - later))
    assert not [c for c in gone.conditions if c.type == "ReadsFailing"] and gone.reads_failing is None


def test_a_status_and_its_fact_stay_under_the_event_limit_with_3000_agents_of_long_names() -> None:
    # One readyNodes and one notPicked entry per agent: 3,000 agents of 60-character names made a status of about
    # 400 KB, which the dataset service refused (SHOAL_MAX_EVENT_BYTES, 256 KiB) and kept it from the runtime's phase.
    runtime = valid_runtime(replicas=3)
    nodes = [f"ip-10-{i // 250}-{i % 250}.node-pool-with-a-long-name.eu-west-1.compute.internal" for i in range(3000)]
    status = status_of(runtime, [agent(node) for node in nodes])
    assert status.phase == "Ready" and len(status.workers) == 3
    # The record keeps every ready node (the loader plans and cleans on them), and counts.
    assert status.ready_nodes == sorted(nodes) and status.ready_node_count == 3000
    assert status.not_picked_count == 2997 and 0 < len(status.not_picked) <= NOT_PICKED_SHOWN
    assert status.not_picked[0] == NotPicked(node=sorted(nodes)[3], reason="3 of 3 replicas already picked")
    fact = RuntimeStatusChanged(name="imagenet", namespace="default", generation=1, status=fact_status(status))
    assert len(msgspec.json.encode(fact)) <= Settings().service.max_event_bytes
    assert fact.status.ready_nodes == sorted(nodes)[:READY_NODES_IN_FACT] and fact.status.ready_node_count == 3000


def test_a_node_whose_disk_is_smaller_than_a_tier_quota_is_no_cache_worker() -> None:
    # A 10Ti quota on nodes with a 50Gi disk was accepted and the nodes picked: the tier filled the disk long before
    # its watermarks evicted. Agents report the file system under each tier directory; such a node is not picked
    # (a worker loses its seat), said per node in notPicked and in the message.
    runtime = make_runtime(Level(mediumtype="SSD", quota="10Ti", path="/mnt/ssd/"), replicas=2)

    def with_disk(node: str, size: int, free: int) -> AgentRecord:
        record = agent(node)
        disks = [TierDisk(path="/mnt/ssd", size_bytes=size, free_bytes=free), TierDisk(path="/other", size_bytes=1)]
        return msgspec.structs.replace(record, heartbeat=msgspec.structs.replace(record.heartbeat, tier_disks=disks))

    agents = [with_disk("node-a", 50 * GiB, 20 * GiB), with_disk("node-b", 20 * 1024 * GiB, 10 * GiB),
              agent("node-c")]  # node-c: an agent from before tierDisks, not weighed
    record = RuntimeRecord(runtime=runtime, generation=1,
                           status=RuntimeStatus(workers=[CacheWorker(node="node-a")]))
    status = runtime_status(record, agents, NOW, Placement(found=True))
    assert [worker.node for worker in status.workers] == ["node-b", "node-c"]
    reason = ("spec.tieredstore.levels[0] gives /mnt/ssd/ a quota of 10.00TiB, more than its file system on this "
              "node (50.00GiB): lower the quota, or give a larger disk")
    assert status.not_picked == [NotPicked(node="node-a", reason=reason)]
    # quotaList: each directory weighed against its own entry; a quota within the disk is picked as before.
    fits = make_runtime(Level(mediumtype="SSD", quota="60Gi", quota_list="10Gi,50Gi", path="/mnt/ssd,/mnt/big"),
                        replicas=1)
    assert [w.node for w in runtime_status(RuntimeRecord(runtime=fits, generation=1), agents[:1], NOW,
                                           Placement(found=True)).workers] == ["node-a"]
    # A heartbeat from an agent before the field still decodes, without disks.
    old = msgspec.json.encode({"type": "agent.heartbeat.v1", "id": "x", "node": "node-a"})
    assert msgspec.json.decode(old, type=AgentHeartbeat).tier_disks == []


def with_disks(record: AgentRecord, *disks: TierDisk, complete: bool = True, all_runtimes: bool = False) -> AgentRecord:
    """``record`` whose beat reports ``disks`` (``complete``: as an agent that reports every tier directory)."""
    beat = msgspec.structs.replace(record.heartbeat, tier_disks=list(disks), tier_disks_complete=complete,
                                   all_runtimes=all_runtimes or record.heartbeat.all_runtimes)
    return msgspec.structs.replace(record, heartbeat=beat)


def test_the_free_bytes_of_a_refused_nodes_disk_do_not_change_the_status() -> None:
    # The reason named the free bytes, which move at every heartbeat: each beat of a node refused for its disk was a
    # runtime status write, a status fact and a Kubernetes status write.
    runtime = make_runtime(Level(mediumtype="SSD", quota="10Ti", path="/mnt/ssd"), replicas=1)
    statuses = [runtime_status(RuntimeRecord(runtime=runtime, generation=1), [with_disks(
        agent("node-a"), TierDisk(path="/mnt/ssd", size_bytes=50 * GiB, free_bytes=free, device=7))], NOW)
        for free in (20 * GiB, 19 * GiB)]
    assert statuses[0] == statuses[1] and statuses[0].not_picked[0].reason.endswith(
        "more than its file system on this node (50.00GiB): lower the quota, or give a larger disk")


def test_tier_quotas_on_one_file_system_add_up() -> None:
    # Two tiers of 30Gi on one 50Gi disk were each weighed alone and the node picked: together they fill it. Agents
    # now report each directory's device; the quotas that share one are summed (two runtimes' too, on a node that is
    # a worker of both).
    runtime = make_runtime(Level(mediumtype="SSD", quota="30Gi", path="/mnt/ssd/a"),
                           Level(mediumtype="HDD", quota="30Gi", path="/mnt/hdd"), replicas=2)
    shared = with_disks(agent("node-a"), TierDisk(path="/mnt/hdd", size_bytes=50 * GiB, device=7),
                        TierDisk(path="/mnt/ssd/a", size_bytes=50 * GiB, device=7))
    apart = with_disks(agent("node-b"), TierDisk(path="/mnt/hdd", size_bytes=50 * GiB, device=8),
                       TierDisk(path="/mnt/ssd/a", size_bytes=50 * GiB, device=9))
    status = runtime_status(RuntimeRecord(runtime=runtime, generation=1), [shared, apart], NOW)
    assert [worker.node for worker in status.workers] == ["node-b"]
    assert status.not_picked == [NotPicked(node="node-a", reason=(
        "spec.tieredstore.levels[0] gives /mnt/ssd/a a quota of 30.00GiB, on one file system with /mnt/hdd "
        "(spec.tieredstore.levels[1], 30.00GiB): 60.00GiB in all, more than that file system on this node "
        "(50.00GiB): lower the quotas, or give them a larger disk or disks apart"))]
    # Another runtime whose worker node-b is puts 30Gi on the device of /mnt/hdd: node-b holds no more.
    other = make_runtime(Level(mediumtype="SSD", quota="30Gi", path="/mnt/other"), name="other")
    beat = with_disks(apart, *apart.heartbeat.tier_disks, TierDisk(path="/mnt/other", size_bytes=50 * GiB, device=8))
    others = [OtherRuntime("default/other", False, ("node-b",), disk_quotas(other))]
    status = runtime_status(RuntimeRecord(runtime=runtime, generation=1), [shared, beat], NOW,
                            Placement(exclusive=False), others)
    assert status.workers == [] and status.not_picked[1] == NotPicked(node="node-b", reason=(
        "spec.tieredstore.levels[1] gives /mnt/hdd a quota of 30.00GiB, on one file system with /mnt/other (runtime "
        "default/other, whose worker this node is, 30.00GiB): 60.00GiB in all, more than that file system on this "
        "node (50.00GiB): lower the quotas, or give them a larger disk or disks apart"))
    # Not its worker: the other runtime's quota is not on node-b's disk.
    status = runtime_status(RuntimeRecord(runtime=runtime, generation=1), [shared, beat], NOW,
                            Placement(exclusive=False), [OtherRuntime("default/other", False, (), disk_quotas(other))])
    assert [worker.node for worker in status.workers] == ["node-b"]
    # Agents before the device (0): each directory weighed alone, as before.
    old = with_disks(agent("node-c"), TierDisk(path="/mnt/hdd", size_bytes=50 * GiB),
                     TierDisk(path="/mnt/ssd/a", size_bytes=50 * GiB), complete=False)
    assert [w.node for w in runtime_status(RuntimeRecord(runtime=runtime, generation=1), [old], NOW).workers] == [
        "node-c"]


def test_a_node_is_not_picked_before_its_agent_reports_the_new_runtimes_tier_disks() -> None:
    # An agent serving every runtime serves a new one at once, but its last beat predates it and lacks its tier
    # directories: the node was picked unweighed, then dropped at the next beat (a mount started, then stopped).
    runtime = make_runtime(Level(mediumtype="SSD", quota="10Ti", path="/mnt/ssd"), replicas=1)
    record = RuntimeRecord(runtime=runtime, generation=1)
    before = with_disks(agent("node-a", ("older", "default")), TierDisk(path="/mnt/older", size_bytes=50 * GiB),
                        all_runtimes=True)
    status = runtime_status(record, [before], NOW)
    assert status.workers == [] and status.not_picked == [NotPicked(node="node-a", reason=(
        "waiting for its agent to report the file system under /mnt/ssd (the runtime is newer than its last "
        "heartbeat)"))]
    # Its next beat reports the disk: too small, so never picked at all.
    after = with_disks(before, TierDisk(path="/mnt/ssd", size_bytes=50 * GiB), all_runtimes=True)
    assert runtime_status(record, [after], NOW).workers == []
    # A worker already is kept while the report of a changed tier path is on its way (no flap either way).
    worker = RuntimeRecord(runtime=runtime, generation=1, status=RuntimeStatus(workers=[CacheWorker(node="node-a")]))
    assert [w.node for w in runtime_status(worker, [before], NOW).workers] == ["node-a"]
    # An agent before tierDisksComplete (or past TIER_DISKS_SHOWN directories): not weighed, as before.
    unknown = with_disks(before, TierDisk(path="/mnt/older", size_bytes=50 * GiB), complete=False)
    assert [w.node for w in runtime_status(record, [unknown], NOW).workers] == ["node-a"]
    # A MEM-only runtime has no directory to wait for.
    memory = RuntimeRecord(runtime=make_runtime(replicas=1), generation=1)
    assert [w.node for w in runtime_status(memory, [before], NOW).workers] == ["node-a"]


def test_a_runtime_whose_tiers_fit_no_nodes_disk_says_so() -> None:
    # A quota larger than every node's disk left the runtime Ready with no worker, and only notPicked said why.
    # Now the TiersFit condition is False and the message names the largest disk seen, which describe shows.
    runtime = make_runtime(Level(mediumtype="SSD", quota="10Ti", path="/mnt/ssd"), replicas=2)
    agents = [with_disks(agent(node), TierDisk(path="/mnt/ssd", size_bytes=size * GiB, free_bytes=GiB, device=3))
              for node, size in (("node-a", 50), ("node-b", 900), ("node-c", 200))]
    record = RuntimeRecord(runtime=runtime, generation=1)
    status = runtime_status(record, agents, NOW)
    assert status.workers == [] and status.phase == "Ready"  # the nodes still mount the dataset
    said = ("the tier quotas fit no node's disk, so no cache worker: node-a: spec.tieredstore.levels[0] gives "
            "/mnt/ssd a quota of 10.00TiB, more than its file system on this node (50.00GiB): lower the quota, or "
            "give a larger disk; the largest file system seen under this runtime's tier directories is 900.00GiB "
            "(node-b, /mnt/ssd)")
    assert status.message == said
    assert status.conditions == [Condition(type="TiersFit", status="False", reason="QuotaOverDisk", message=said,
                                           last_transition_time=rfc3339(NOW))]
    described = describe_runtime(msgspec.structs.replace(record, status=status))
    [row] = [line.split(None, 3) for line in described.splitlines() if line.strip().startswith("TiersFit")]
    assert row[:3] == ["TiersFit", "False", "QuotaOverDisk"] and "900.00GiB (node-b, /mnt/ssd)" in row[3]
    # One node that holds them: no condition, and it goes once the quota is lowered.
    fits = [*agents[:2], with_disks(agent("node-c"), TierDisk(path="/mnt/ssd", size_bytes=20 * 1024 * GiB))]
    assert find_condition(runtime_status(record, fits, NOW).conditions, "TiersFit") is None
    lowered = RuntimeRecord(runtime=make_runtime(Level(mediumtype="SSD", quota="40Gi", path="/mnt/ssd"), replicas=2),
                            generation=2, status=status)
    assert runtime_status(lowered, agents, NOW).conditions == []


def test_not_picked_lists_a_few_of_each_reason() -> None:
    # Thousands of "replicas already picked" would hide the agent held by an Exclusive dataset.
    runtime = valid_runtime(replicas=1)
    agents = [agent(f"node-{i:04d}") for i in range(500)]
    placement = Placement(found=True)
    others = [OtherRuntime("default/other", True, ("node-0400",))]
    status = runtime_status(RuntimeRecord(runtime=runtime, generation=1), agents, NOW, placement, others)
    assert [(entry.node, entry.reason) for entry in status.not_picked] == [
        ("node-0001", "1 of 1 replicas already picked"), ("node-0002", "1 of 1 replicas already picked"),
        ("node-0003", "1 of 1 replicas already picked"), ("node-0400", "worker of default/other (Exclusive)")]
    assert status.not_picked_count == 499


def test_grouped_mounts_of_an_agent_serving_every_runtime_read_as_reports_did() -> None:
    # What an agent sends (services.agent: allRuntimes, mountGroups), read as the runtimes and reports it replaced.
    runtime = valid_runtime(replicas=2)

    def grouped(node: str, state: MountState, port: int, message: str = "") -> AgentRecord:
        others = {f"other-{i}": 7000 + i for i in range(50)}
        beat = AgentHeartbeat(node=node, all_runtimes=True, interval_seconds=INTERVAL, sent_at=NOW,
                              peer_host="10.0.0.7", mount_groups=[
                                  MountGroup(namespace="default", state=state, message=message,
                                             datasets={"imagenet": port, **({} if state != "Serving" else others)}),
                                  MountGroup(namespace="team", state="Serving", datasets={"imagenet": 9999})])
        return AgentRecord(heartbeat=beat, received_at=NOW)

    status = status_of(runtime, [grouped("node-a", "Serving", 4100), grouped("node-b", "Serving", 4200)])
    assert status.phase == "Ready" and status.ready_nodes == ["node-a", "node-b"]
    assert [(w.node, w.peer_url) for w in status.workers] == [("node-a", "http://10.0.0.7:4100"),
                                                              ("node-b", "http://10.0.0.7:4200")]
    [mounted] = [c for c in status.conditions if c.type == "Mounted"]
    assert (mounted.status, mounted.message) == ("True", "mounted on 2 node(s)")
    status = status_of(runtime, [grouped("node-a", "Serving", 4100),
                                 grouped("node-b", "Failing", 0, "mount process did not start within 120 s")])
    [mounted] = [c for c in status.conditions if c.type == "Mounted"]
    assert mounted.reason == "MountFailing" and "node-b: mount process did not start within 120 s" in mounted.message
    assert [w.peer_url for w in status.workers] == ["http://10.0.0.7:4100", ""]


def test_a_worker_serves_peers_when_its_agent_names_a_peer_host_before_its_mount_has_a_peer_url() -> None:
    """Right after a restart an agent beats before its mount process serves: the worker is ready with no peer URL,
    and ``servesPeers`` tells the loader a ring is coming (its ``peerHost``), unlike an agent without a peer server,
    whose workers never get one."""
    runtime = valid_runtime(replicas=2)

    def beat(node: str, peer_host: str, state: MountState, port: int = 0) -> AgentRecord:
        return AgentRecord(heartbeat=AgentHeartbeat(
            node=node, all_runtimes=True, interval_seconds=INTERVAL, sent_at=NOW, peer_host=peer_host,
            mount_groups=[MountGroup(namespace="default", state=state, datasets={"imagenet": port})]),
            received_at=NOW)

    status = status_of(runtime, [beat("node-a", "10.0.0.7", "Starting"), beat("node-b", "", "Serving")])
    assert [(w.node, w.ready, w.peer_url, w.serves_peers) for w in status.workers] == [
        ("node-a", True, "", True), ("node-b", True, "", False)]
    status = status_of(runtime, [beat("node-a", "10.0.0.7", "Serving", 4100)])
    assert [(w.peer_url, w.serves_peers) for w in status.workers] == [("http://10.0.0.7:4100", True)]
    # An agent that reports a peer URL per mount (before ``peerHost``) serves peers too.
    old = AgentHeartbeat(node="node-c", runtimes=[ObjectRef(name="imagenet")], interval_seconds=INTERVAL, sent_at=NOW,
                         mounts=[MountReport(dataset=ObjectRef(name="imagenet"), state="Serving",
                                             peer_url="http://10.0.0.9:4300")])
    status = status_of(runtime, [AgentRecord(heartbeat=old, received_at=NOW)])
    assert [(w.peer_url, w.serves_peers) for w in status.workers] == [("http://10.0.0.9:4300", True)]


@pytest.mark.parametrize("node", ["node-a", "ip-10-0-1-23.ec2.internal", "a" * 63 + ".b"])
def test_kubernetes_node_names_are_agents(node: str) -> None:
    assert node_errors(node) == []


@pytest.mark.parametrize("node", ["", "Node-A", "node_a", "node.", "a" * 254])
def test_a_heartbeat_from_no_node_name_is_refused(node: str) -> None:
    assert node_errors(node)
