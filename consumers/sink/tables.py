"""The sink's tables: their columns, and how each event becomes rows (pure, no I/O).

One table per event type, named after its topic (``agent-health`` -> ``agent_health``), plus
``steps``: every Trajectory step flattened into its own row, because latency and token
queries per step need it. Every row carries where it came from (``topic``, ``partition``,
``offset``) and the Kafka record time ``ts``; ``(topic, partition, offset)`` identifies an
event, and the sink's idempotency rests on it.

Optional strings are stored as ``''`` and optional ints as ``0`` so that columns are not
Nullable: the same SQL then means the same thing on chDB (Parquet) and on a server
(MergeTree). ``deploy/clickhouse/schema.sql`` declares the same columns for a server; a test
keeps the two in step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from stormline.schemas.catalog import (
    AGENT_HEALTH,
    ASSIGNMENTS,
    CHECKPOINTS,
    DEAD_LETTERS,
    HEARTBEATS,
    REWARDS,
    TASKS,
    TRAJECTORIES,
    TopicSpec,
)
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    CheckpointPublished,
    DeadLetter,
    Event,
    Reward,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
)

TS = pa.timestamp("ms", tz="UTC")


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


STR_LIST = pa.list_(_f("item", pa.string()))
STR_MAP = pa.map_(pa.string(), _f("value", pa.string()))
FLOAT_MAP = pa.map_(pa.string(), _f("value", pa.float64()))

# Where each row came from; first in every table.
ORIGIN = [
    _f("topic", pa.string()),
    _f("partition", pa.int32()),
    _f("offset", pa.int64()),
    _f("ts", TS),
    _f("key", pa.string()),
    _f("event_id", pa.string()),
    _f("occurred_at", TS),
    _f("schema_version", pa.int32()),
]

SCHEMAS: dict[str, pa.Schema] = {
    "tasks": pa.schema(
        [
            *ORIGIN,
            _f("task_id", pa.string()),
            _f("tenant", pa.string()),
            _f("task_type", pa.string()),
            _f("prompt", pa.string()),
            _f("priority", pa.int32()),
            _f("required_capabilities", STR_LIST),
            _f("expected", pa.string()),
            _f("evaluator", pa.string()),
            _f("deadline_ms", pa.int64()),
            _f("metadata", STR_MAP),
        ]
    ),
    "assignments": pa.schema(
        [
            *ORIGIN,
            _f("task_id", pa.string()),
            _f("attempt", pa.int32()),
            _f("agent_id", pa.string()),
            _f("policy", pa.string()),
            _f("strategy", pa.string()),
            _f("policy_version", pa.string()),
            _f("score", pa.float64()),
            _f("epsilon", pa.float64(), nullable=True),
            _f("assigned_at", TS),
            _f("expires_at", TS),
            _f("tenant", pa.string()),
            _f("task_type", pa.string()),
            _f("priority", pa.int32()),
        ]
    ),
    "trajectories": pa.schema(
        [
            *ORIGIN,
            _f("task_id", pa.string()),
            _f("trajectory_id", pa.string()),
            _f("attempt", pa.int32()),
            _f("agent_id", pa.string()),
            _f("task_type", pa.string()),
            _f("provider", pa.string()),
            _f("model", pa.string()),
            _f("policy_version", pa.string()),
            _f("status", pa.string()),
            _f("error", pa.string()),
            _f("output", pa.string()),
            _f("n_steps", pa.int32()),
            _f("prompt_tokens", pa.int64()),
            _f("completion_tokens", pa.int64()),
            _f("total_tokens", pa.int64()),
            _f("cost_usd", pa.float64()),
            _f("latency_ms", pa.float64()),
            _f("evaluator", pa.string()),
            _f("final", pa.bool_()),
        ]
    ),
    "steps": pa.schema(
        [
            *ORIGIN,
            _f("task_id", pa.string()),
            _f("trajectory_id", pa.string()),
            _f("agent_id", pa.string()),
            _f("step_index", pa.int32()),
            _f("role", pa.string()),
            _f("content", pa.string()),
            _f("tool_names", STR_LIST),
            _f("prompt_tokens", pa.int64()),
            _f("completion_tokens", pa.int64()),
            _f("latency_ms", pa.float64()),
            _f("n_token_ids", pa.int32()),
        ]
    ),
    "rewards": pa.schema(
        [
            *ORIGIN,
            _f("task_id", pa.string()),
            _f("trajectory_id", pa.string()),
            _f("attempt", pa.int32()),
            _f("agent_id", pa.string()),
            _f("task_type", pa.string()),
            _f("policy_version", pa.string()),
            _f("value", pa.float64()),
            _f("components", FLOAT_MAP),
            _f("source", pa.string()),
            _f("reason", pa.string()),
        ]
    ),
    "heartbeats": pa.schema(
        [
            *ORIGIN,
            _f("worker_id", pa.string()),
            _f("agent_ids", STR_LIST),
            _f("in_flight", pa.int32()),
            _f("processed", pa.int64()),
            _f("errors", pa.int64()),
            _f("status", pa.string()),
            _f("detail", pa.string()),
        ]
    ),
    "agent_health": pa.schema(
        [
            *ORIGIN,
            _f("agent_id", pa.string()),
            _f("status", pa.string()),
            _f("previous", pa.string()),
            _f("reason", pa.string()),
        ]
    ),
    "checkpoints": pa.schema(
        [
            *ORIGIN,
            _f("policy", pa.string()),
            _f("version", pa.int32()),
            _f("policy_version", pa.string()),
            _f("uri", pa.string()),
            _f("sha256", pa.string()),
            _f("metrics", FLOAT_MAP),
            _f("promoted", pa.bool_()),
            _f("decision", pa.string()),
            _f("trained_on", pa.string()),
        ]
    ),
    "dead_letters": pa.schema(
        [
            *ORIGIN,
            _f("source_topic", pa.string()),
            _f("source_partition", pa.int32()),
            _f("source_offset", pa.int64()),
            _f("error_kind", pa.string()),
            _f("error", pa.string()),
            _f("consumer_group", pa.string()),
            _f("raw_key", pa.string()),
            _f("raw_value_bytes", pa.int64()),
        ]
    ),
}

TABLES: tuple[str, ...] = tuple(SCHEMAS)

TABLE_OF_TOPIC: dict[str, str] = {
    TASKS.logical: "tasks",
    ASSIGNMENTS.logical: "assignments",
    TRAJECTORIES.logical: "trajectories",
    REWARDS.logical: "rewards",
    HEARTBEATS.logical: "heartbeats",
    AGENT_HEALTH.logical: "agent_health",
    CHECKPOINTS.logical: "checkpoints",
    DEAD_LETTERS.logical: "dead_letters",
}
SINK_SPECS: tuple[TopicSpec, ...] = (
    TASKS,
    ASSIGNMENTS,
    TRAJECTORIES,
    REWARDS,
    HEARTBEATS,
    AGENT_HEALTH,
    CHECKPOINTS,
    DEAD_LETTERS,
)


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None


def _origin(o: Origin, ev: Event) -> dict[str, Any]:
    return {
        "topic": o.topic,
        "partition": o.partition,
        "offset": o.offset,
        "ts": datetime.fromtimestamp(max(o.timestamp_ms, 0) / 1000, UTC),
        "key": o.key or "",
        "event_id": str(ev.event_id),
        "occurred_at": ev.occurred_at,
        "schema_version": ev.schema_version,
    }


def rows_of(o: Origin, ev: Event) -> Iterable[tuple[str, dict[str, Any]]]:
    """The (table, row) pairs that one event becomes."""
    base = _origin(o, ev)
    if isinstance(ev, TaskSubmitted):
        yield (
            "tasks",
            {
                **base,
                "task_id": ev.task_id,
                "tenant": ev.tenant,
                "task_type": ev.task_type,
                "prompt": ev.prompt,
                "priority": ev.priority,
                "required_capabilities": list(ev.required_capabilities),
                "expected": ev.expected or "",
                "evaluator": ev.evaluator or "",
                "deadline_ms": ev.deadline_ms or 0,
                "metadata": list(ev.metadata.items()),
            },
        )
    elif isinstance(ev, TaskAssigned):
        yield (
            "assignments",
            {
                **base,
                "task_id": ev.task_id,
                "attempt": ev.attempt,
                "agent_id": ev.agent_id,
                "policy": str(ev.policy.value),
                "strategy": ev.strategy,
                "policy_version": ev.policy_version or "",
                "score": ev.score,
                "epsilon": ev.epsilon,
                "assigned_at": ev.assigned_at,
                "expires_at": ev.expires_at,
                "tenant": ev.task.tenant,
                "task_type": ev.task.task_type,
                "priority": ev.task.priority,
            },
        )
    elif isinstance(ev, Trajectory):
        u = ev.usage
        yield (
            "trajectories",
            {
                **base,
                "task_id": ev.task_id,
                "trajectory_id": ev.trajectory_id,
                "attempt": ev.attempt,
                "agent_id": ev.agent_id,
                "task_type": ev.task_type,
                "provider": ev.provider,
                "model": ev.model,
                "policy_version": ev.policy_version or "",
                "status": str(ev.status.value),
                "error": ev.error or "",
                "output": ev.output or "",
                "n_steps": len(ev.steps),
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "cost_usd": u.cost_usd,
                "latency_ms": ev.latency_ms,
                "evaluator": ev.evaluator or "",
                "final": ev.final,
            },
        )
        for i, st in enumerate(ev.steps):
            yield (
                "steps",
                {
                    **base,
                    "task_id": ev.task_id,
                    "trajectory_id": ev.trajectory_id,
                    "agent_id": ev.agent_id,
                    "step_index": i,
                    "role": st.role,
                    "content": st.content,
                    "tool_names": [t.name for t in st.tool_calls],
                    "prompt_tokens": st.prompt_tokens,
                    "completion_tokens": st.completion_tokens,
                    "latency_ms": st.latency_ms,
                    "n_token_ids": len(st.token_ids or []),
                },
            )
    elif isinstance(ev, Reward):
        yield (
            "rewards",
            {
                **base,
                "task_id": ev.task_id,
                "trajectory_id": ev.trajectory_id,
                "attempt": ev.attempt,
                "agent_id": ev.agent_id,
                "task_type": ev.task_type,
                "policy_version": ev.policy_version or "",
                "value": ev.value,
                "components": list(ev.components.items()),
                "source": str(ev.source.value),
                "reason": ev.reason or "",
            },
        )
    elif isinstance(ev, AgentHeartbeat):
        yield (
            "heartbeats",
            {
                **base,
                "worker_id": ev.worker_id,
                "agent_ids": list(ev.agent_ids),
                "in_flight": ev.in_flight,
                "processed": ev.processed,
                "errors": ev.errors,
                "status": str(ev.status.value),
                "detail": ev.detail or "",
            },
        )
    elif isinstance(ev, AgentHealthChanged):
        yield (
            "agent_health",
            {
                **base,
                "agent_id": ev.agent_id,
                "status": str(ev.status.value),
                "previous": str(ev.previous.value),
                "reason": ev.reason,
            },
        )
    elif isinstance(ev, CheckpointPublished):
        yield (
            "checkpoints",
            {
                **base,
                "policy": ev.policy,
                "version": ev.version,
                "policy_version": ev.policy_version,
                "uri": ev.uri,
                "sha256": ev.sha256,
                "metrics": list(ev.metrics.items()),
                "promoted": ev.promoted,
                "decision": ev.decision,
                "trained_on": json.dumps([r.model_dump() for r in ev.trained_on]),
            },
        )
    elif isinstance(ev, DeadLetter):
        yield (
            "dead_letters",
            {
                **base,
                "source_topic": ev.source_topic,
                "source_partition": ev.partition,
                "source_offset": ev.offset,
                "error_kind": ev.error_kind,
                "error": ev.error,
                "consumer_group": ev.consumer_group,
                "raw_key": (ev.raw_key or b"").decode("utf-8", "replace"),
                "raw_value_bytes": len(ev.raw_value or b""),
            },
        )
    else:  # a new event type must be given a table here before the sink can keep it
        raise TypeError(f"the sink has no table for {type(ev).__name__}")


def arrow_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMAS[table])


def clickhouse_type(t: pa.DataType, nullable: bool = False) -> str:
    """The ClickHouse type that chDB infers for an Arrow column (and the server DDL declares)."""
    if pa.types.is_string(t):
        base = "String"
    elif pa.types.is_int32(t):
        base = "Int32"
    elif pa.types.is_int64(t):
        base = "Int64"
    elif pa.types.is_float64(t):
        base = "Float64"
    elif pa.types.is_boolean(t):
        base = "Bool"
    elif pa.types.is_timestamp(t):
        base = "DateTime64(3, 'UTC')"
    elif pa.types.is_map(t):
        base = f"Map({clickhouse_type(t.key_type)}, {clickhouse_type(t.item_type)})"
    elif pa.types.is_list(t):
        base = f"Array({clickhouse_type(t.value_type)})"
    else:
        raise TypeError(f"no ClickHouse type for {t}")
    return f"Nullable({base})" if nullable else base
