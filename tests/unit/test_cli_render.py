"""What ``shoal describe dataset`` prints about where the bytes are, and the DataLoad/DataClean columns, durations
and progress text, and the line a command's answer prints (pure rendering)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from msgspec.structs import replace

from libs import subjects
from libs.cli import render
from libs.cli.main import Outcome, report_outcomes
from libs.crds import shoal_status
from libs.documents import Command
from libs.events.common import ObjectMeta
from libs.events.dataset import Condition, Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount, NodeCache
from libs.events.operation import (
    CleanTarget,
    DataCleanSpec,
    DataLoadRun,
    DataLoadSpec,
    DatasetRef,
    NodeProgress,
    OperationAccepted,
    OperationRecord,
    OperationStatus,
    Progress,
    TargetPath,
)
from libs.events.runtime import Runtime, RuntimeRecord, RuntimeSpec
from libs.kube import FLUID_RESOURCES

MiB = 1024 * 1024


def record(nodes: list[NodeCache]) -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="model"),
                                         spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
                         generation=1, status=DatasetStatus(phase="Bound", nodes=nodes))


def test_describe_lists_cached_bytes_and_read_split_per_node() -> None:
    text = render.describe_dataset(record([
        NodeCache(node="node-a", cached_bytes=512 * MiB, local_read_bytes=3 * MiB, store_read_bytes=MiB),
        NodeCache(node="node-b", remote_read_bytes=2 * MiB, loaded_bytes=5 * MiB),
    ]))
    lines = text.splitlines()
    start = lines.index("Cache by node:")
    assert lines[start + 1:start + 4] == [
        "  NODE     CACHED      LOCAL READS   REMOTE READS   STORE READS   LOADED",
        "  node-a   512.00MiB   3.00MiB       0B             1.00MiB       0B",
        "  node-b   0B          0B            2.00MiB        0B            5.00MiB",
    ]
    assert lines[start + 4] == "Conditions:"
    assert "  nodes:" not in lines  # not repeated in the status document


def test_describe_says_which_nodes_are_still_counting_their_blocks_after_a_restart() -> None:
    lines = render.describe_dataset(record([
        NodeCache(node="node-a", cached_bytes=512 * MiB),
        NodeCache(node="node-b", cached_bytes=3 * MiB, counting=True),
    ])).splitlines()
    start = lines.index("Cache by node:")
    assert lines[start + 2:start + 5] == [
        "  node-a   512.00MiB            0B            0B             0B            0B",
        "  node-b   3.00MiB (counting)   0B            0B             0B            0B",
        "  Counting blocks on node node-b after a restart: CACHED there, and the dataset's cached and "
        "cachedPercentage, are partial until the count ends.",
    ]


def test_get_marks_cached_while_a_node_is_still_counting_its_blocks() -> None:
    # Only describe said it: the CACHED of ``shoal get datasets`` grew for seconds after a restart with nothing
    # telling a partial count from a lost cache.
    def cached_cell(nodes: list[NodeCache], wide: bool) -> str:
        shown = record(nodes)
        shown = replace(shown, status=replace(shown.status, cache_states=replace(shown.status.cache_states,
                                                                                 cached="515.00MiB")))
        [header, row] = render.dataset_table([shown], wide=wide, show_namespace=False).splitlines()
        at, until = header.index("CACHED"), header.index("CACHE CAPACITY")
        return row[at:until].strip()

    for wide in (False, True):
        assert cached_cell([NodeCache(node="node-a", cached_bytes=512 * MiB),
                            NodeCache(node="node-b", cached_bytes=3 * MiB, counting=True)], wide) == (
            "515.00MiB (counting)")
        assert cached_cell([NodeCache(node="node-a", cached_bytes=515 * MiB)], wide) == "515.00MiB"


def test_describe_says_none_before_any_node_reported() -> None:
    lines = render.describe_dataset(record([])).splitlines()
    assert lines[lines.index("Cache by node:") + 1] == "  <none>"


# --- DataLoad and DataClean ---

GiB = 1024 * MiB
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (45, "45s"), (119, "119s"), (120, "2m"), (330, "5m30s"), (600, "10m"), (2 * 3600 + 59 * 60, "179m"),
    (3 * 3600 + 20 * 60, "3h20m"), (5 * 3600, "5h"), (30 * 3600, "30h"), (4 * 86400 + 5 * 3600, "4d5h"),
    (20 * 86400 + 3600, "20d"), (-5, "0s"),
])
def test_durations_read_like_kubectl(seconds: float, text: str) -> None:
    assert render.duration_text(seconds) == text


def test_age_of_a_record() -> None:
    assert render.age_text("2026-01-01T11:58:30Z", NOW) == "90s"
    assert render.age_text("2026-01-01T11:00:00+00:00", NOW) == "60m"
    assert render.age_text("", NOW) == "<unknown>"
    assert render.age_text("yesterday", NOW) == "<unknown>"
    assert render.age_text("2026-01-01T11:00:00", NOW) == "<unknown>"  # no zone: not guessed


def test_progress_text_has_files_and_bytes_once_planned() -> None:
    assert render.progress_text(Progress()) == "-"
    assert render.progress_text(Progress(files_done=812, files_total=1000, bytes_done=8 * GiB,
                                         bytes_total=10 * GiB)) == "812/1000 files, 8.00GiB/10.00GiB"
    assert render.progress_text(Progress(bytes_done=GiB, bytes_total=2 * GiB)) == "1.00GiB/2.00GiB"


def test_a_cleans_progress_is_the_bytes_it_freed() -> None:
    # The loader writes a clean's progress without totals (what each node holds is not known beforehand): the
    # PROGRESS column and `--wait` showed "-" for every clean, even one that freed gigabytes.
    assert render.progress_text(Progress(), clean=True) == "-"  # not planned yet
    planned = Progress(nodes=[NodeProgress(node="node-a"), NodeProgress(node="node-b")])
    assert render.progress_text(planned, clean=True) == "0B freed"
    freed = Progress(bytes_done=3 * MiB + 5 * MiB, bytes_skipped=5 * MiB,
                     nodes=[NodeProgress(node="node-a", bytes_done=8 * MiB, done=True)])
    assert render.progress_text(freed, clean=True) == "3.00MiB freed"  # named blocks not cached freed nothing
    table = render.operation_table([operation("cool", clean=True, status=OperationStatus(
        phase="Complete", duration="0s", progress=freed))], now=NOW, wide=False, show_namespace=False)
    assert table.splitlines()[1].split()[-2:] == ["3.00MiB", "freed"]


def operation(name: str, *, clean: bool = False, namespace: str = "default", status: OperationStatus | None = None,
              dataset: DatasetRef | None = None) -> OperationRecord:
    ref = dataset or DatasetRef(name="imagenet", namespace=namespace)
    return OperationRecord(
        kind="DataClean" if clean else "DataLoad", metadata=ObjectMeta(name=name, namespace=namespace),
        load=None if clean else DataLoadSpec(dataset=ref, policy="Cron", schedule="0 * * * *"),
        clean=DataCleanSpec(dataset=ref) if clean else None,
        created_at="2026-01-01T11:55:00Z", status=status or OperationStatus(),
    )


def test_operation_table_has_fluids_columns_and_progress() -> None:
    running = operation("warm", status=OperationStatus(
        phase="Executing", duration="Unfinished", runs=3,
        progress=Progress(files_done=812, files_total=1000, bytes_done=8 * GiB, bytes_total=10 * GiB,
                          rate_bytes_per_second=100 * MiB, eta_seconds=20.4)))
    elsewhere = operation("pending", dataset=DatasetRef(name="shared", namespace="data"),
                          status=OperationStatus(waiting_for="DataLoad default/warm to be Complete"))

    assert render.operation_table([running, elsewhere], now=NOW, wide=False, show_namespace=False) == (
        "NAME      DATASET       PHASE       AGE   DURATION     PROGRESS\n"
        "warm      imagenet      Executing   5m    Unfinished   812/1000 files, 8.00GiB/10.00GiB\n"
        "pending   data/shared   Pending     5m    Unfinished   -\n"
    )
    wide = render.operation_table([running, elsewhere], now=NOW, wide=True, show_namespace=False).splitlines()
    assert wide[0].split() == ["NAME", "DATASET", "PHASE", "AGE", "DURATION", "PROGRESS", "POLICY", "RUNS", "RATE",
                               "ETA", "MESSAGE"]
    assert "Cron (0 * * * *)   3      100.00MiB/s   20s" in wide[1]
    assert wide[2].endswith("DataLoad default/warm to be Complete")


def test_wide_tables_have_a_namespace_column_only_across_namespaces_as_kubectl() -> None:
    """``-o wide`` put NAMESPACE first even without ``-A``, where every row is of the one namespace ``-n`` gave;
    kubectl shows it only with ``-A``, wide or not."""
    runtime = RuntimeRecord(runtime=Runtime(metadata=ObjectMeta(name="model"), spec=RuntimeSpec()), generation=1)
    tables = {
        "dataset": lambda wide, across: render.dataset_table([record([])], wide=wide, show_namespace=across),
        "runtime": lambda wide, across: render.runtime_table([runtime], wide=wide, show_namespace=across),
        "dataload": lambda wide, across: render.operation_table([operation("warm")], now=NOW, wide=wide,
                                                                show_namespace=across),
    }
    for kind, table in tables.items():
        for wide in (False, True):
            assert table(wide, False).split()[0] == "NAME", (kind, wide)
            header, row = table(wide, True).splitlines()
            assert (header.split()[:2], row.split()[0]) == (["NAMESPACE", "NAME"], "default"), (kind, wide)


def test_the_duration_column_says_what_the_fluid_status_says() -> None:
    """A load that has not ended shows Fluid's ``Unfinished`` in DURATION, as its Fluid status (what ``kubectl get
    dataload`` shows) does: the CLI showed '-' for a Pending load (waiting for its dataset, its ``runAfter``
    operation or its first run), and for an Executing one in a record written without a duration."""
    (fluid_load,) = [resource for resource in FLUID_RESOURCES if resource.kind == "DataLoad"]
    ended = [Condition(type="Complete", status="True", reason="RunComplete",
                       last_transition_time="2026-01-01T12:00:00Z")]
    statuses = {
        "first": OperationStatus(),
        "waiting": OperationStatus(phase="Pending", waiting_for="dataset default/imagenet to be Bound"),
        "executing": OperationStatus(phase="Executing", duration="Unfinished", runs=1),
        "unwritten": OperationStatus(phase="Executing", runs=1),
        "complete": OperationStatus(phase="Complete", duration="1m32s", runs=1, conditions=ended),
    }
    table = render.operation_table([operation(name, status=status) for name, status in statuses.items()], now=NOW,
                                   wide=False, show_namespace=False)
    durations = {line.split()[0]: line.split()[4] for line in table.splitlines()[1:]}
    assert durations == {name: shoal_status(fluid_load, status)["duration"] for name, status in statuses.items()}
    assert durations == {"first": "Unfinished", "waiting": "Unfinished", "executing": "Unfinished",
                         "unwritten": "Unfinished", "complete": "1m32s"}


def test_describe_dataclean_shows_no_replicas_under_its_targets() -> None:
    # A DataClean target has no replicas (DataCleanSpec ignores them): describe showed "replicas: 1" under it.
    clean = replace(operation("cool", clean=True), clean=DataCleanSpec(
        dataset=DatasetRef(name="imagenet"), target=[CleanTarget(path="/train/a"), CleanTarget(path="/train/b")]))
    load = replace(operation("warm"), load=DataLoadSpec(
        dataset=DatasetRef(name="imagenet"), target=[TargetPath(path="/train/a", replicas=2)]))

    cleaned = render.describe_operation(clean)
    assert "  target:\n  - path: /train/a\n  - path: /train/b\n" in cleaned and "replicas" not in cleaned
    assert "  target:\n  - path: /train/a\n    replicas: 2\n" in render.describe_operation(load)


def test_describe_operation_shows_progress_per_node() -> None:
    record = operation("cool", clean=True, status=OperationStatus(
        phase="Complete", duration="3s",
        progress=Progress(bytes_done=3 * GiB, bytes_total=3 * GiB,
                          nodes=[NodeProgress(node="node-a", bytes_done=GiB, bytes_total=2 * GiB),
                                 NodeProgress(node="node-b")])))

    lines = render.describe_operation(record).splitlines()

    assert lines[:3] == ["Name:         cool", "Namespace:    default", "Kind:         DataClean (dataclean.shoal.io)"]
    assert "Created:      2026-01-01T11:55:00Z" in lines
    assert "    name: imagenet" in lines  # spec.dataset
    assert "  phase: Complete" in lines
    assert "    nodes:" not in lines  # shown as a table instead
    table = lines.index("Progress by node:")
    assert [line.split() for line in lines[table + 1:table + 4]] == [
        ["NODE", "DONE", "TOTAL", "PERCENT", "STATE"], ["node-a", "1.00GiB", "2.00GiB", "50.0%", "Stopped"],
        ["node-b", "0B", "0B", "-", "Stopped"]]  # the run ended: no node of it still works
    assert lines[-2:] == ["Conditions:", "  <none>"]


def test_a_node_whose_parts_moved_to_the_ring_shows_so_not_done() -> None:
    """node-b left the ring under the load and the loader moved its parts: they are done, but not by node-b, which
    showed as Done as if it held its share."""
    record = operation("warm", status=OperationStatus(phase="Executing", progress=Progress(
        bytes_done=3 * GiB, bytes_total=4 * GiB,
        nodes=[NodeProgress(node="node-a", bytes_done=2 * GiB, bytes_total=3 * GiB),
               NodeProgress(node="node-b", bytes_done=GiB, bytes_total=GiB, done=True, moved=True),
               NodeProgress(node="node-c", done=True)])))
    lines = render.describe_operation(record).splitlines()
    table = lines.index("Progress by node:")
    assert [line.split(None, 4) for line in lines[table + 2:table + 5]] == [
        ["node-a", "2.00GiB", "3.00GiB", "66.7%", "Working"], ["node-b", "1.00GiB", "1.00GiB", "100.0%",
                                                               render.MOVED_STATE],
        ["node-c", "0B", "0B", "-", "Done"]]


def test_a_run_request_that_joined_a_pending_run_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    run = DataLoadRun(name="warm")
    command = Command(document=1, source_kind="DataLoad", kind="dataload", name="warm", namespace="default",
                      subject=subjects.DATALOAD_RUN, event=run)

    def fact(merged: str) -> OperationAccepted:
        return OperationAccepted(causation_id=run.id, kind="DataLoad", name="warm", namespace="default", generation=1,
                                 merged=merged)

    assert report_outcomes([Outcome(command, fact("")), Outcome(command, fact("it waits"))], 1.0)
    assert capsys.readouterr().out == ("dataload.shoal.io/warm run requested\n"
                                       "dataload.shoal.io/warm run request joined the pending run (it waits)\n")


def test_a_record_created_in_the_future_has_an_invalid_age_as_kubectl_says() -> None:
    # Another host's clock ahead of this one's: "0s" said it was just created, whenever it was. kubectl allows a
    # second of skew ("0s") and says "<invalid>" beyond it.
    assert render.age_text("2026-01-01T12:00:01Z", NOW) == "0s"
    assert render.age_text("2026-01-01T12:05:00Z", NOW) == "<invalid>"
    table = render.operation_table([replace(operation("warm"), created_at="2026-01-01T12:05:00Z")], now=NOW,
                                   wide=False, show_namespace=False)
    assert table.splitlines()[1].split()[3] == "<invalid>"


def test_a_table_cell_is_one_line_and_sends_no_control_sequence_to_the_terminal() -> None:
    """A message quoting a store's error or an object's key (which may hold anything) took several lines, so a
    script reading rows read its second line as an object, and an escape sequence in it reached the terminal (a
    title, a colour, a cleared screen). As kubectl: cut at the first line break with "...", ESC shown as ^[."""
    failed = operation("warm", status=OperationStatus(
        phase="Failed", message="cannot read s3://b/\x1b]0;owned\x07evil\x1b[2J: timed out\nretry 2\r\nretry 3"))
    other = operation("cool", status=OperationStatus(phase="Failed", message="one\rline\x0bthree"))
    lines = render.operation_table([failed, other], now=NOW, wide=True, show_namespace=False).splitlines()
    assert len(lines) == 3
    assert lines[1].endswith("cannot read s3://b/^[]0;owned\\x07evil^[[2J: timed out...")
    assert lines[2].endswith("   one...")
    assert not any(ord(char) < 32 for line in lines for char in line)


def test_describe_shows_control_characters_of_labels_and_annotations_escaped() -> None:
    annotated = DatasetRecord(dataset=Dataset(
        metadata=ObjectMeta(name="model", annotations={"note": "two\nlines \x1b[31mred", "plain": "ok"}),
        spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])), generation=1)
    text = render.describe_dataset(annotated)
    assert "Annotations:  note=two\\nlines ^[[31mred\n              plain=ok\n" in text
    assert "\x1b" not in text


def test_a_table_and_describe_show_unicode_format_characters_escaped_as_logs_do() -> None:
    """The CLI escaped only C0/C1 controls, its own way, while log lines escaped every character that is not
    printable: a key or message holding a right-to-left override (U+202E) printed reversed in ``shoal get`` (the
    "Trojan Source" trick: ``gpj.exe`` shows as ``exe.jpg``), and a zero-width space hid in a name. One escaper
    now (``libs.redact.shown_text``), kubectl's ``^[`` for ESC kept."""
    failed = operation("warm", status=OperationStatus(phase="Failed", message="cannot read a\u202egpj.exe\u200b\tok"))
    line = render.operation_table([failed], now=NOW, wide=True, show_namespace=False).splitlines()[1]
    # The tab is a space in a cell: rich dropped the rest of the cell from it ("ok" was never shown).
    assert line.endswith("cannot read a\\u202egpj.exe\\u200b ok"), line
    annotated = DatasetRecord(dataset=Dataset(
        metadata=ObjectMeta(name="model", annotations={"note": "\u202eevil\x1b[2J"}),
        spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])), generation=1)
    assert "Annotations:  note=\\u202eevil^[[2J\n" in render.describe_dataset(annotated)


# --- -o yaml / -o json: objects ---


def test_a_spec_leaves_out_only_the_empty_fields_at_their_default() -> None:
    """An empty value that is not the field's default (``placement: ""``, Shared by name) is shown: left out, it
    would read back as the default (Exclusive) and the round trip would change the spec."""
    spec = DatasetSpec(mounts=[Mount(mount_point="s3://b/", options={"region": ""})], placement="")
    shown = render.spec_builtins(spec)
    assert shown == {"mounts": [{"mountPoint": "s3://b/", "options": {"region": ""}}],
                     "accessModes": ["ReadOnlyMany"], "placement": ""}
    assert msgspec.convert(shown, DatasetSpec) == spec
    load = DataLoadSpec(dataset=DatasetRef(name="d", namespace="ml"), target=[TargetPath(path="/a")])
    assert render.spec_builtins(load) == {"dataset": {"name": "d", "namespace": "ml"},
                                          "target": [{"path": "/a", "replicas": 1}], "policy": "Once"}
    assert msgspec.convert(render.spec_builtins(load), DataLoadSpec) == load


def test_an_operations_object_names_its_kind_and_creation_time() -> None:
    clean = OperationRecord(kind="DataClean", metadata=ObjectMeta(name="c", annotations={"a": "b"}),
                            clean=DataCleanSpec(dataset=DatasetRef(name="d", namespace="default"),
                                                target=[CleanTarget(path="/x")]),
                            generation=3, created_at="2026-01-01T00:00:00Z")
    assert render.record_object(clean) == {
        "apiVersion": "shoal.io/v1alpha1", "kind": "DataClean",
        "metadata": {"name": "c", "namespace": "default", "generation": 3,
                     "creationTimestamp": "2026-01-01T00:00:00Z", "annotations": {"a": "b"}},
        "spec": {"dataset": {"name": "d", "namespace": "default"}, "target": [{"path": "/x"}]},
        "status": {"phase": "Pending"},
    }
    assert render.objects_document([clean], single=False)["kind"] == "List"
