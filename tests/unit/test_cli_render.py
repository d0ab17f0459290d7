"""What ``shoal describe dataset`` prints about where the bytes are (pure rendering)."""

from __future__ import annotations

from libs.cli import render
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount, NodeCache

MiB = 1024 * 1024


def record(nodes: list[NodeCache]) -> DatasetRecord:
    return DatasetRecord(dataset=Dataset(metadata=ObjectMeta(name="model"),
                                         spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/")])),
                         generation=1, status=DatasetStatus(phase="Bound", nodes=nodes))


def test_describe_lists_cached_bytes_and_read_split_per_node() -> None:
    text = render.describe_dataset(record([
        NodeCache(node="node-a", cached_bytes=512 * MiB, local_read_bytes=3 * MiB, store_read_bytes=MiB),
        NodeCache(node="node-b", remote_read_bytes=2 * MiB),
    ]))
    lines = text.splitlines()
    start = lines.index("Cache by node:")
    assert lines[start + 1:start + 4] == [
        "  NODE     CACHED      LOCAL READS   REMOTE READS   STORE READS",
        "  node-a   512.00MiB   3.00MiB       0B             1.00MiB",
        "  node-b   0B          0B            2.00MiB        0B",
    ]
    assert lines[start + 4] == "Conditions:"
    assert "  nodes:" not in lines  # not repeated in the status document


def test_describe_says_none_before_any_node_reported() -> None:
    lines = render.describe_dataset(record([])).splitlines()
    assert lines[lines.index("Cache by node:") + 1] == "  <none>"
