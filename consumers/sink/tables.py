"""The sink's tables, derived from the Avro schemas; only their differences are declared here.

One table per event type, named after its topic (``agent-health`` -> ``agent_health``): every
field of the event's Avro schema (``schemas/avro``) is a column of the same name, in schema
order, typed by :mod:`.columns` (Avro -> Arrow -> ClickHouse). Below, and nowhere else, is
what a table keeps differently, each with its reason:

* every row first carries where it came from (:data:`ORIGIN`: ``topic``, ``partition``,
  ``offset``, the Kafka record time ``ts`` and ``key``); ``(topic, partition, offset)``
  identifies a record and ``event_id`` an event (a re-sent one comes back at a new offset
  with the same id): the sink keeps one row per event id (:mod:`.dedup`), and the server
  tables' sort keys end with it (:attr:`.columns.Table.key`);
* ``steps``: every Trajectory step flattened into its own row, because latency and token
  queries per step need it;
* optional strings and ints are stored as ``''`` and ``0`` (not NULL), optional floats stay
  Nullable (the rule lives in :func:`.columns.stored`).

From the same declaration come the Arrow schemas (:data:`SCHEMAS`), the event -> rows mapping
(:func:`rows_of`) and the ClickHouse DDL (:mod:`.ddl`); ``deploy/clickhouse/*.sql`` are that
output (``python -m stormline.consumers.sink.tables --ddl [--kafka-engine]``), and
``tests/test_event_shapes.py`` fails when they differ or when model, Avro, Arrow and DDL
disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from stormline.consumers.sink.columns import (
    Column,
    Drop,
    Extra,
    Flatten,
    Json,
    Keep,
    Length,
    Pluck,
    Table,
    Text,
)
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
from stormline.schemas.models import Event


@dataclass(frozen=True)
class Origin:
    """Where a record came from in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None


def _ts(o: Origin) -> datetime:
    return datetime.fromtimestamp(max(o.timestamp_ms, 0) / 1000, UTC)


TS_AVRO = {"type": "long", "logicalType": "timestamp-millis"}
_TS_SQL = "ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC'))"
# Kafka record metadata, first in every table. SQL: the Kafka engine's virtual columns.
ORIGIN: tuple[Column, ...] = (
    Column("topic", "string", lambda o: o.topic, "_topic", "origin"),
    Column("partition", "int", lambda o: o.partition, "toInt32(_partition)", "origin"),
    Column("offset", "long", lambda o: o.offset, "toInt64(_offset)", "origin"),
    Column("ts", TS_AVRO, _ts, _TS_SQL, "origin"),
    Column("key", "string", lambda o: o.key or "", "_key", "origin"),
)

# Token counts are summed over millions of rows: stored as Int64 where the event has int.
_TOKENS = {"prompt_tokens": Keep(widen=True), "completion_tokens": Keep(widen=True)}


def _table(name: str, topic: TopicSpec, order_by: tuple[str, ...], **kw: Any) -> Table:
    return Table(name, topic, ORIGIN, order_by, **kw)


DECLARED: tuple[Table, ...] = (
    _table("tasks", TASKS, ("tenant", "task_type", "task_id")),
    _table(
        "assignments",
        ASSIGNMENTS,
        ("task_type", "task_id"),  # a re-decided attempt keeps its id, maybe not its agent
        # The task's routing keys only, for per-tenant/type queries without a join.
        fields={"task": Flatten(only=("tenant", "task_type", "priority"))},
    ),
    _table(
        "trajectories",
        TRAJECTORIES,
        ("task_type", "task_id"),
        fields={
            "steps": Length("n_steps"),  # the steps themselves: table steps
            "usage": Flatten(fields=_TOKENS),  # unprefixed: prompt_tokens, ..., cost_usd
            "expected": Drop("the task's reference answer is in tasks.expected"),
        },
        extras=(
            Extra(
                "total_tokens",
                "long",
                lambda e: e.usage.prompt_tokens + e.usage.completion_tokens,
                "toInt64(tupleElement({src}.usage, 'prompt_tokens') "
                "+ tupleElement({src}.usage, 'completion_tokens'))",
                after="completion_tokens",
            ),
        ),
    ),
    _table(
        "steps",
        TRAJECTORIES,
        ("task_id",),
        explode="steps",
        carry=("event_id", "occurred_at", "schema_version", "task_id", "trajectory_id", "agent_id"),
        fields={
            **_TOKENS,
            "tool_calls": Pluck("tool_names", "name"),  # arguments can be large; ids are noise
            "token_ids": Length("n_token_ids"),  # the ids are for the trainer, not for SQL
            "logprobs": Drop("for the trainer; read them from the trajectories topic"),
        },
        extras=(Extra("step_index", "int", int, "toInt32(item_number - 1)", "agent_id", "index"),),
    ),
    _table("rewards", REWARDS, ("task_type", "task_id")),
    _table(
        "heartbeats",
        HEARTBEATS,
        ("worker_id",),
        fields={"capabilities": Drop("static per agent; see agents.yaml")},
    ),
    _table("agent_health", AGENT_HEALTH, ("agent_id",)),
    _table(
        "checkpoints",
        CHECKPOINTS,
        ("policy", "version"),
        fields={"trained_on": Json()},  # offset ranges: read whole, never filtered on
        extras=(
            Extra(
                "policy_version",  # the name assignments and rewards use for it
                "string",
                lambda e: e.policy_version,
                "concat({src}.policy, '@', toString({src}.version))",
                after="version",
            ),
        ),
    ),
    _table(
        "dead_letters",
        DEAD_LETTERS,
        ("error_kind", "source_topic"),
        fields={
            # The event's own partition/offset would clash with the origin columns.
            "partition": Keep(rename="source_partition"),
            "offset": Keep(rename="source_offset"),
            "raw_key": Text(),
            "raw_value": Length("raw_value_bytes", "long"),  # the bytes stay in Kafka
        },
    ),
)

BY_NAME: dict[str, Table] = {t.name: t for t in DECLARED}
SCHEMAS: dict[str, pa.Schema] = {t.name: t.schema for t in DECLARED}
TABLES: tuple[str, ...] = tuple(SCHEMAS)
# The table that holds each topic's events (the exploded steps ride along with theirs).
TABLE_OF_TOPIC: dict[str, str] = {t.topic.logical: t.name for t in DECLARED if not t.explode}
SINK_SPECS: tuple[TopicSpec, ...] = tuple(t.topic for t in DECLARED if not t.explode)
_OF_EVENT: dict[type[Event], tuple[Table, ...]] = {
    s.event: tuple(t for t in DECLARED if t.topic is s) for s in SINK_SPECS
}


def tables_of(event_type: type[Event]) -> tuple[Table, ...]:
    """The tables an event of ``event_type`` lands in."""
    tables = _OF_EVENT.get(event_type)
    if tables is None:  # a new event type must be given a table above first
        raise TypeError(f"the sink has no table for {event_type.__name__}")
    return tables


def rows_of(o: Origin, ev: Event) -> Iterable[tuple[str, dict[str, Any]]]:
    """The (table, row) pairs that one event becomes (the sink builds the same rows column
    by column: :meth:`.columns.Table.arrow`)."""
    for table in tables_of(type(ev)):
        for row in table.rows(o, ev):
            yield table.name, row


def arrow_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMAS[table])


def main(argv: list[str] | None = None) -> None:
    """``python -m stormline.consumers.sink.tables --ddl [--kafka-engine]``: print the DDL."""
    from stormline.consumers.sink import ddl

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--ddl", action="store_true", required=True, help="print ClickHouse DDL")
    p.add_argument("--kafka-engine", action="store_true", help="the Kafka-engine tables")
    args = p.parse_args(argv)
    print(ddl.kafka_engine_sql(DECLARED) if args.kafka_engine else ddl.schema_sql(DECLARED), end="")


if __name__ == "__main__":
    main()
