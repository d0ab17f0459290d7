"""Reference datasets (``dataset://<namespace>/<name>``), pure parts: what a mount point names, what is refused at
apply (several, mixed, malformed, itself, options; a source that is a reference: chain or cycle), the status a
reference mirrors from its source or fails with, the dataset service's index of references, the agent's links,
the bridge's volume path, a runtime named after a reference, a load of one, and the scheduler's view of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs.events.common import ObjectMeta
from libs.events.dataset import (
    CacheStates,
    Condition,
    Dataset,
    DatasetRecord,
    DatasetSpec,
    DatasetStatus,
    Mount,
    NodeCache,
    RuntimeRef,
)
from libs.events.operation import DataLoadSpec, DatasetRef, OperationRecord
from libs.events.schedule import DatasetUse, ScoreRequest
from libs.references import Reference, parse, reference_of
from services.agent import domain as agent_domain
from services.agent.links import existing_links, make_link, remove_link
from services.bridge.domain import volume_path
from services.dataset import domain
from services.dataset.references import ReferenceIndex
from services.loader import domain as loader_domain
from services.runtime.domain import ineligible_reason, placement_of
from services.scheduler.domain import through_references

NOW = 1_714_564_800.0


def dataset(*points: str, name: str = "ref", namespace: str = "team-b", **mount: Any) -> Dataset:
    return Dataset(metadata=ObjectMeta(name=name, namespace=namespace),
                   spec=DatasetSpec(mounts=[Mount(mount_point=point, **mount) for point in points]))


def record(data: Dataset, status: DatasetStatus | None = None, generation: int = 1) -> DatasetRecord:
    return DatasetRecord(dataset=data, generation=generation, status=status or DatasetStatus())


BOUND_SOURCE = record(dataset("s3://bucket/prefix", name="src", namespace="team-a"), DatasetStatus(
    phase="Bound", ufs_total="3.00MiB", ufs_total_bytes=3 * 2**20, file_num=3, manifest="team-a.src",
    cache_states=CacheStates(cache_capacity="256.00MiB", cached="3.00MiB", cached_percentage="100.0%",
                             cache_hit_ratio="50.0%", local_hit_ratio="50.0%", remote_hit_ratio="0.0%"),
    nodes=[NodeCache(node="node-a", cached_bytes=3 * 2**20)],
    runtimes=[RuntimeRef(name="src", namespace="team-a")],
    conditions=[Condition(type=domain.CONDITION_SYNCED, status="True", reason="Synced", message="listed 3 files")],
    synced_generation=4, synced_requests=2, last_sync_time="2024-05-01T11:00:00Z"))


# --- what a mount point names ---


@pytest.mark.parametrize(("point", "expected"), [
    ("dataset://team-a/src", Reference("team-a", "src")),
    ("dataset://team-a/src/", Reference("team-a", "src")),
    ("dataset://team-a/src/train/2024", Reference("team-a", "src", "train/2024")),
    ("dataset://team-a/src/a//b/", Reference("team-a", "src", "a/b")),
])
def test_parse_names_the_source_and_a_folder(point: str, expected: Reference) -> None:
    assert parse(point) == (expected, "")
    assert expected.key == "team-a.src"


@pytest.mark.parametrize(("point", "says"), [
    ("dataset://team-a", "names no dataset"),
    ("dataset:///src", "names no dataset"),
    ("dataset://Team_A/src", "namespace 'Team_A' is not a DNS-1123 label"),
    ("dataset://team-a/Src", "name 'Src' is not a DNS-1035 label"),
    ("dataset://team-a/src/../other", "must not contain '..'"),
    ("dataset://u:p@team-a/src", "must be plain"),
    ("dataset://team-a/src?x=1", "must be plain"),
    ("s3://bucket", "is not a dataset:// mount"),
])
def test_parse_says_what_is_wrong(point: str, says: str) -> None:
    source, problem = parse(point)
    assert source is None and says in problem, problem


# --- validation at apply ---


def test_a_reference_to_another_namespace_is_valid() -> None:
    data = dataset("dataset://team-a/src", name="fusedemo", path="/")  # Fluid's sample: a name and path "/"
    assert domain.validate_dataset(data, local_roots=[]) == []
    assert reference_of(data) == Reference("team-a", "src")


@pytest.mark.parametrize(("data", "says"), [
    (dataset("dataset://team-b/ref"), "names this dataset itself"),
    (dataset("dataset://team-a/src", "s3://bucket"), "cannot be combined with other mounts (spec.mounts[1])"),
    (dataset("s3://bucket", "dataset://team-a/src", name="mixed", path=""),
     "spec.mounts[1] is a dataset:// mount, which cannot be combined"),
    (dataset("dataset://team-a/src", "dataset://team-a/other"), "has 2 dataset:// mounts"),
    (dataset("dataset://team-a"), "names no dataset"),
    (dataset("dataset://team-a/src", options={"endpoint": "http://x"}), "options and encryptOptions are not used"),
])
def test_refused_at_apply_with_what_to_change(data: Dataset, says: str) -> None:
    errors = domain.validate_dataset(data, local_roots=[])
    assert len(errors) == 1 and says in errors[0], errors


def test_a_source_that_is_a_reference_is_refused_as_a_cycle_or_a_chain() -> None:
    a_to_b = dataset("dataset://team-a/b", name="a", namespace="team-a")
    b_to_a = dataset("dataset://team-a/a", name="b", namespace="team-a")
    (cycle,) = domain.reference_apply_errors(b_to_a, record(a_to_b))
    assert "is itself a reference (to team-a/b), which would make a cycle" in cycle
    c_to_a = dataset("dataset://team-a/a", name="c", namespace="team-c")
    (chain,) = domain.reference_apply_errors(c_to_a, record(a_to_b))
    assert "a chain" in chain and "such as dataset://team-a/b" in chain
    assert domain.reference_apply_errors(c_to_a, None) == []  # missing: accepted, Failed until it comes
    assert domain.reference_apply_errors(c_to_a, BOUND_SOURCE) == []


def test_becoming_a_reference_or_ceasing_to_be_one_starts_from_an_empty_status() -> None:
    physical = msgspec.structs.replace(BOUND_SOURCE, dataset=dataset("s3://bucket", name="ref"))
    updated, changed = domain.apply_dataset(physical, dataset("dataset://team-a/src"))
    assert changed and updated.status == DatasetStatus() and updated.generation == 2
    back, _ = domain.apply_dataset(msgspec.structs.replace(updated, status=BOUND_SOURCE.status), dataset("s3://b2"))
    assert back.status == DatasetStatus()
    kept, _ = domain.apply_dataset(physical, dataset("s3://other", name="ref"))
    assert kept.status == BOUND_SOURCE.status  # an ordinary change keeps the status until the sync


# --- the status a reference mirrors ---


def test_a_reference_mirrors_its_source_with_its_own_generation() -> None:
    ref = record(dataset("dataset://team-a/src"), generation=3)
    status = domain.reference_status(ref, BOUND_SOURCE, NOW)
    source = BOUND_SOURCE.status
    assert (status.phase, status.ufs_total, status.file_num, status.cache_states, status.nodes, status.manifest) == (
        "Bound", source.ufs_total, source.file_num, source.cache_states, source.nodes, "team-a.src")
    assert status.runtimes == [RuntimeRef(name="src", namespace="team-a")]  # the source's runtime serves it
    assert (status.synced_generation, status.synced_requests, status.message) == (3, 0, "")
    condition = next(c for c in status.conditions if c.type == domain.CONDITION_SOURCE)
    assert (condition.status, condition.reason) == ("True", domain.REASON_FOLLOWING)
    # Following again later keeps the condition's transition time: nothing to write.
    again = domain.reference_status(msgspec.structs.replace(ref, status=status), BOUND_SOURCE, NOW + 60)
    assert again == status


def test_a_reference_waits_for_and_fails_with_its_source() -> None:
    ref = record(dataset("dataset://team-a/src"))
    unbound = msgspec.structs.replace(BOUND_SOURCE, status=DatasetStatus())
    status = domain.reference_status(ref, unbound, NOW)
    assert status.phase == "NotBound" and "waiting for source dataset team-a/src to be Bound" in status.message
    failed = msgspec.structs.replace(BOUND_SOURCE, status=DatasetStatus(phase="Failed", message="cannot list s3://x"))
    status = domain.reference_status(ref, failed, NOW)
    assert status.phase == "Failed" and status.message == "source dataset team-a/src: cannot list s3://x"


def test_a_missing_source_or_a_chain_fails_the_reference_with_what_to_change() -> None:
    ref = record(dataset("dataset://team-a/src"))
    bound = msgspec.structs.replace(ref, status=domain.reference_status(ref, BOUND_SOURCE, NOW))
    gone = domain.reference_status(bound, None, NOW)
    assert gone.phase == "Failed" and gone.cache_states == CacheStates() and gone.file_num == 0
    assert "source dataset team-a/src does not exist: create it, or point spec.mounts[0].mountPoint" in gone.message
    (condition,) = gone.conditions
    assert (condition.type, condition.status, condition.reason) == (
        domain.CONDITION_SOURCE, "False", domain.REASON_SOURCE_MISSING)
    chained = domain.reference_status(ref, record(dataset("dataset://team-c/x", name="src", namespace="team-a")), NOW)
    assert chained.phase == "Failed"
    assert "is itself a reference (to team-c/x): references do not chain; mount dataset://team-c/x" in chained.message
    # The source back: followed again.
    assert domain.reference_status(msgspec.structs.replace(ref, status=gone), BOUND_SOURCE, NOW).phase == "Bound"


# --- the dataset service's index of references ---


class Entry:
    def __init__(self, key: str, value: bytes | None, operation: str | None = None) -> None:
        self.key, self.value, self.operation = key, value, operation


def test_the_index_reconciles_the_references_of_a_key_that_changed_or_went() -> None:
    index = ReferenceIndex()
    scheduled: list[str] = []
    index.schedule = scheduled.append
    encode = msgspec.json.encode
    index.observe(Entry("team-b.ref", encode(record(dataset("dataset://team-a/src")))))  # type: ignore[arg-type]
    index.observe(Entry("team-c.ref", encode(record(dataset("dataset://team-a/src")))))  # type: ignore[arg-type]
    assert index.referencing("team-a.src") == ["team-b.ref", "team-c.ref"]
    assert scheduled == ["team-a.src", "team-a.src"]  # the source names its references (datasetRef)
    index.observe(Entry("team-b.ref", encode(record(dataset("dataset://team-a/src", name="x")))))  # type: ignore[arg-type]
    index.observe(Entry("team-a.src", encode(BOUND_SOURCE)))  # type: ignore[arg-type]
    assert scheduled[2:] == ["team-b.ref", "team-c.ref"]  # the same source: only the references follow
    index.observe(Entry("team-b.ref", None, "DEL"))  # type: ignore[arg-type]
    index.observe(Entry("team-c.ref", encode(record(dataset("s3://bucket")))))  # type: ignore[arg-type]
    assert scheduled[4:] == ["team-a.src", "team-a.src"]
    index.observe(Entry("team-a.src", None, "PURGE"))  # type: ignore[arg-type]
    assert index.referencing("team-a.src") == [] and len(scheduled) == 6
    index.observe(Entry("team-x.bad", b"not json"))  # type: ignore[arg-type]


def test_a_source_names_its_references_and_a_reference_mirrors_none() -> None:
    status = domain.with_dataset_ref(BOUND_SOURCE.status, ["team-c/ref", "team-b/ref"])
    assert status.dataset_ref == ["team-b/ref", "team-c/ref"]
    assert domain.with_dataset_ref(status, ["team-b/ref", "team-c/ref"]) is status
    source = msgspec.structs.replace(BOUND_SOURCE, status=status)
    assert domain.reference_status(record(dataset("dataset://team-a/src")), source, NOW).dataset_ref == []


# --- the agent: links, not mounts ---


def test_the_agent_links_a_bound_reference_whose_source_it_mounts() -> None:
    ref = record(dataset("dataset://team-a/src/train"), DatasetStatus(phase="Bound", manifest="team-a.src"))
    pending = record(dataset("dataset://team-a/src", name="pending"), DatasetStatus(phase="NotBound"))
    other = record(dataset("dataset://team-z/elsewhere", name="other"), DatasetStatus(phase="Bound"))
    datasets = [BOUND_SOURCE, ref, pending, other]
    served = [("team-a", "src"), ("team-b", "ref")]  # even a runtime named after the reference mounts nothing
    assert agent_domain.wanted_mounts(datasets, served) == {("team-a", "src")}
    links = agent_domain.wanted_links(datasets, {("team-a", "src")}, linked=[("team-b", "pending")])
    assert links == {("team-b", "ref"): Reference("team-a", "src", "train"),
                     ("team-b", "pending"): Reference("team-a", "src")}  # kept while linked: a blip keeps readers
    assert agent_domain.wanted_links(datasets, set(), linked=[("team-b", "ref")]) == {}  # no source mount, no link
    assert agent_domain.link_target(Reference("team-a", "src", "train")) == "../team-a/src/train"


def test_links_are_made_repointed_and_removed_never_anything_else(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    (root / "team-a" / "src").mkdir(parents=True)
    (root / "team-a" / "src" / "file").write_text("x")
    link = root / "team-b" / "ref"
    assert make_link(str(link), "../team-a/src") is None
    assert (link / "file").read_text() == "x" and os.readlink(link) == "../team-a/src"
    assert make_link(str(link), "../team-a/other") is None and os.readlink(link) == "../team-a/other"
    assert existing_links(str(root)) == {("team-b", "ref"): "../team-a/other"}  # adopted by a restarted agent
    remove_link(str(link))
    assert not os.path.lexists(link) and existing_links(str(root)) == {}
    (link / "kept").mkdir(parents=True)  # a folder with something in it is not ours to remove
    assert "is in the way" in (make_link(str(link), "../team-a/src") or "")
    remove_link(str(link))
    assert (link / "kept").is_dir()


def test_the_bridge_gives_a_reference_its_sources_volume() -> None:
    obj = {"metadata": {"name": "ref", "namespace": "team-b"},
           "spec": {"mounts": [{"mountPoint": "dataset://team-a/src/train"}]}}
    assert volume_path(obj, "/var/lib/shoal/mnt") == "/var/lib/shoal/mnt/team-a/src/train"
    obj["spec"] = {"mounts": [{"mountPoint": "s3://bucket"}]}
    assert volume_path(obj, "/var/lib/shoal/mnt/") == "/var/lib/shoal/mnt/team-b/ref"


# --- the runtime service: a runtime named after a reference takes no agent ---


def test_a_runtime_named_after_a_reference_picks_no_worker() -> None:
    placement = placement_of(dataset("dataset://team-a/src").spec)
    assert placement.reference
    assert "is a reference" in (ineligible_reason("node-a", {}, placement, []) or "")
    assert ineligible_reason("node-a", {}, placement_of(dataset("s3://bucket").spec), []) is None


# --- the loader: a load of a reference goes to its source ---


def test_a_load_of_a_reference_says_to_load_the_source() -> None:
    operation = OperationRecord(kind="DataLoad", metadata=ObjectMeta(name="warm", namespace="team-b"),
                                load=DataLoadSpec(dataset=DatasetRef(name="ref", namespace="team-b")))
    ref = record(dataset("dataset://team-a/src"), DatasetStatus(phase="Bound"))
    problem = loader_domain.run_problem(operation, loader_domain.Cluster(ref, None)) or ""
    assert "is a reference to team-a/src" in problem and "run a DataLoad of namespace team-a on src" in problem


# --- the scheduler: a use of a reference is a use of its source ---


def test_the_scheduler_scores_a_reference_as_its_source_under_its_folder() -> None:
    sources = {("team-b", "ref"): Reference("team-a", "src", "train"), ("team-b", "all"): Reference("team-a", "src")}
    request = ScoreRequest(datasets=[DatasetUse(name="ref", namespace="team-b", paths=["/", "/x"], required=True),
                                     DatasetUse(name="ref", namespace="team-b"),
                                     DatasetUse(name="all", namespace="team-b", paths=["/y"]),
                                     DatasetUse(name="other")])
    assert through_references(request, sources).datasets == [
        DatasetUse(name="src", namespace="team-a", paths=["/train", "/train/x"], required=True),
        DatasetUse(name="src", namespace="team-a", paths=["/train"]),
        DatasetUse(name="src", namespace="team-a", paths=["/y"]),
        DatasetUse(name="other")]
    plain = ScoreRequest(datasets=[DatasetUse(name="other")])
    assert through_references(plain, sources) is plain


def test_a_reference_whose_access_modes_promise_writes_says_it_is_read_only_not_its_sources_word() -> None:
    """The ReadOnly condition is the reference's own spec's: kept while it mirrors (and fails), never copied from
    the source."""
    writable = dataset("dataset://team-a/src")
    writable = msgspec.structs.replace(writable, spec=msgspec.structs.replace(writable.spec,
                                                                              access_modes=["ReadWriteOnce"]))
    status = domain.reference_status(record(writable), BOUND_SOURCE, NOW)
    [read_only] = [c for c in status.conditions if c.type == domain.CONDITION_READ_ONLY]
    assert "ReadWriteOnce" in read_only.message and read_only.last_transition_time
    gone = domain.reference_status(record(writable, status), None, NOW + 60)
    assert [c for c in gone.conditions if c.type == domain.CONDITION_READ_ONLY] == [read_only]
    source = msgspec.structs.replace(BOUND_SOURCE, status=msgspec.structs.replace(
        BOUND_SOURCE.status, conditions=[read_only]))
    plain = domain.reference_status(record(dataset("dataset://team-a/src")), source, NOW)
    assert [c for c in plain.conditions if c.type == domain.CONDITION_READ_ONLY] == []
