"""JSON Schema of every public event type, exported to files for other systems (``shoal schemas``).

Decides the layout of docs/schemas/: one ``<type tag>.json`` per type in ``PUBLIC_EVENTS`` (for example
``dataset.apply.v1.json``) and an ``index.json`` listing tag, title, file and the subject each type travels on.
Output is deterministic (sorted keys, two-space indent, trailing newline) so a regenerated folder diffs cleanly
and a test can tell when the committed schemas fell behind the code. ``export_schemas`` is the only I/O here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from libs import subjects
from libs.events import PUBLIC_EVENTS, type_tag
from libs.events.agent import (
    AgentHeartbeat,
    InventoryDelta,
    InventoryDeltaV1,
    InventoryRequest,
    InventorySnapshot,
    InventorySnapshotV1,
)
from libs.events.dataset import (
    DatasetAccepted,
    DatasetApply,
    DatasetDelete,
    DatasetDeleted,
    DatasetRejected,
    DatasetResync,
    DatasetStatusChanged,
)
from libs.events.deadletter import DeadLetter
from libs.events.operation import (
    DataCleanApply,
    DataCleanDelete,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    OperationAccepted,
    OperationDeleted,
    OperationRejected,
    OperationStatusChanged,
)
from libs.events.runtime import (
    RuntimeAccepted,
    RuntimeApply,
    RuntimeAutoscaled,
    RuntimeDelete,
    RuntimeDeleted,
    RuntimeRejected,
    RuntimeScale,
    RuntimeStatusChanged,
)
from libs.events.schedule import DatasetCacheObserved, ScoreReply, ScoreRequest

INDEX_FILE = "index.json"

# The subject (or subject pattern) each public type is published on, for readers of the index.
SUBJECTS: dict[type[Any], str] = {
    DatasetApply: subjects.DATASET_APPLY,
    DatasetDelete: subjects.DATASET_DELETE,
    DatasetResync: subjects.DATASET_RESYNC,
    DatasetAccepted: subjects.DATASET_ACCEPTED,
    DatasetRejected: subjects.DATASET_REJECTED,
    DatasetStatusChanged: subjects.DATASET_STATUS,
    DatasetDeleted: subjects.DATASET_DELETED,
    RuntimeApply: subjects.RUNTIME_APPLY,
    RuntimeDelete: subjects.RUNTIME_DELETE,
    RuntimeScale: subjects.RUNTIME_SCALE,
    RuntimeAccepted: subjects.RUNTIME_ACCEPTED,
    RuntimeRejected: subjects.RUNTIME_REJECTED,
    RuntimeStatusChanged: subjects.RUNTIME_STATUS,
    RuntimeDeleted: subjects.RUNTIME_DELETED,
    RuntimeAutoscaled: subjects.RUNTIME_AUTOSCALED,
    AgentHeartbeat: subjects.AGENT_HEARTBEATS,
    InventorySnapshot: subjects.AGENT_INVENTORY,
    InventoryDelta: subjects.AGENT_INVENTORY,
    InventorySnapshotV1: subjects.AGENT_INVENTORY,
    InventoryDeltaV1: subjects.AGENT_INVENTORY,
    InventoryRequest: subjects.INVENTORY_REQUEST,
    DeadLetter: subjects.ALL_DEAD_LETTERS,
    DataLoadApply: subjects.DATALOAD_APPLY,
    DataLoadDelete: subjects.DATALOAD_DELETE,
    DataLoadRun: subjects.DATALOAD_RUN,
    DataCleanApply: subjects.DATACLEAN_APPLY,
    DataCleanDelete: subjects.DATACLEAN_DELETE,
    # One family of facts for both operation kinds: published on the subject of the operation's kind.
    OperationAccepted: f"{subjects.DATALOAD_ACCEPTED}, {subjects.DATACLEAN_ACCEPTED}",
    OperationRejected: f"{subjects.DATALOAD_REJECTED}, {subjects.DATACLEAN_REJECTED}",
    OperationStatusChanged: f"{subjects.DATALOAD_STATUS}, {subjects.DATACLEAN_STATUS}",
    OperationDeleted: f"{subjects.DATALOAD_DELETED}, {subjects.DATACLEAN_DELETED}",
    ScoreRequest: subjects.SCHED_SCORE,
    ScoreReply: f"the reply subject of a {subjects.SCHED_SCORE} request",
    DatasetCacheObserved: subjects.SCHEDULER_DATASET_CACHE,
}


def _schema_hook(type_: Any) -> dict[str, Any]:
    # Kubernetes nodeAffinity and tolerations are kept as free-form ``object`` values: any JSON is valid there.
    # msgspec refuses an empty schema from a hook, so "any" is spelled as a schema with only a description.
    if type_ is object:
        return {"description": "Any JSON value, kept as given."}
    raise NotImplementedError


def schema_of(event_type: type[Any]) -> dict[str, Any]:
    return msgspec.json.schema(event_type, schema_hook=_schema_hook)


def schema_files() -> dict[str, str]:
    """File name → file content for every public type and the index; pure, so tests can compare."""
    files: dict[str, str] = {}
    index = []
    for event_type in PUBLIC_EVENTS:
        tag = type_tag(event_type)
        file_name = f"{tag}.json"
        files[file_name] = _dump(schema_of(event_type))
        index.append({"type": tag, "title": event_type.__name__, "file": file_name,
                      "subject": SUBJECTS.get(event_type, "")})
    files[INDEX_FILE] = _dump({"types": sorted(index, key=lambda entry: entry["type"])})
    return files


def export_schemas(directory: Path) -> list[Path]:
    """Write every schema and the index into ``directory`` (created if missing); returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, content in sorted(schema_files().items()):
        path = directory / file_name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def _dump(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
