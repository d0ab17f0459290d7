"""Event schemas of Shoal, one module per event family (dataset, runtime, agent, dead letters).

``PUBLIC_EVENTS`` lists every type other systems may publish or consume; ``shoal schemas`` exports their JSON
Schema into docs/schemas/.
"""

from __future__ import annotations

from typing import Any

import msgspec

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

PUBLIC_EVENTS: tuple[type[Any], ...] = (
    DatasetApply,
    DatasetDelete,
    DatasetResync,
    DatasetAccepted,
    DatasetRejected,
    DatasetStatusChanged,
    DatasetDeleted,
    RuntimeApply,
    RuntimeDelete,
    RuntimeScale,
    RuntimeAccepted,
    RuntimeRejected,
    RuntimeStatusChanged,
    RuntimeDeleted,
    RuntimeAutoscaled,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataCleanApply,
    DataCleanDelete,
    OperationAccepted,
    OperationRejected,
    OperationStatusChanged,
    OperationDeleted,
    ScoreRequest,
    ScoreReply,
    DatasetCacheObserved,
    AgentHeartbeat,
    InventorySnapshot,
    InventoryDelta,
    InventorySnapshotV1,
    InventoryDeltaV1,
    InventoryRequest,
    DeadLetter,
)


def type_tag(event_type: type[Any]) -> str:
    tag = msgspec.inspect.type_info(event_type).tag  # type: ignore[attr-defined]
    return str(tag)


def encode(event: msgspec.Struct) -> bytes:
    return msgspec.json.encode(event)
