"""Agent events: per-node heartbeats (which runtimes a node serves and whether it is healthy)."""

from __future__ import annotations

import msgspec

from libs.events.common import Event, ObjectRef


class AgentHeartbeat(Event, frozen=True, kw_only=True, tag="agent.heartbeat.v1", rename="camel"):
    node: str
    runtimes: list[ObjectRef] = []
    healthy: bool = True
    # Unix seconds at the agent; the runtime service judges freshness by its own clock of receipt.
    sent_at: float = 0.0
    # How often the agent beats; a node missing three beats in a row is not ready.
    interval_seconds: float = 5.0
    capacity_bytes: int = 0


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    heartbeat: AgentHeartbeat
    received_at: float
