"""ClickHouse DDL generated from the sink's tables (pure): ``deploy/clickhouse/*.sql``.

:func:`schema_sql` is ``schema.sql``, the ReplacingMergeTree tables of a ClickHouse server;
:func:`kafka_engine_sql` is ``kafka_engine.sql``, Kafka-engine queue tables that mirror the
Avro schemas plus materialized views that fill the same tables with the same rows as the
sink. Print them with ``python -m stormline.consumers.sink.tables --ddl [--kafka-engine]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from stormline.consumers.sink.avro_types import queue_type
from stormline.consumers.sink.columns import Column, Table

SCHEMA_HEADER = """\
-- Stormline tables on a ClickHouse server (the sink creates them when it starts; this file
-- is also the reference for DBAs). Apply with:
--   clickhouse-client --query "CREATE DATABASE IF NOT EXISTS stormline"
--   clickhouse-client --database stormline --multiquery < deploy/clickhouse/schema.sql
--
-- GENERATED from schemas/avro by consumers/sink/tables.py; do not edit. Regenerate with
--   python -m stormline.consumers.sink.tables --ddl > deploy/clickhouse/schema.sql
-- (tests/test_event_shapes.py fails when this file and the generator differ). The same SQL
-- runs on chDB over the sink's Parquet parts and on these tables.
--
-- One row per event id: the sink never re-inserts an offset it already stored, nor an event
-- id the table holds at a lower offset (a re-sent trajectory, a re-scored reward), and each
-- insert carries an insert_deduplication_token. ReplacingMergeTree is the last line: its sort
-- key ends with event_id (steps: event_id, step_index) and holds only columns that are the
-- same in every copy of an event, so merges and FINAL collapse copies to one row (the sink
-- queries with final=1). No PARTITION BY: copies of one event may differ in occurred_at
-- (a re-scored reward), and ReplacingMergeTree only collapses within one partition.
"""

KAFKA_HEADER = """\
-- Let the ClickHouse server pull the Stormline topics itself (instead of `stormline sink`).
--
-- GENERATED from schemas/avro by consumers/sink/tables.py; do not edit. Regenerate with
--   python -m stormline.consumers.sink.tables --ddl --kafka-engine \\
--     > deploy/clickhouse/kafka_engine.sql
--
-- Apply AFTER schema.sql, in the same database:
--   clickhouse-client --database stormline --multiquery < deploy/clickhouse/kafka_engine.sql
-- Before applying, replace (e.g. with sed):
--   kafka:9092                                     your bootstrap servers
--   http://schema-registry:8081/apis/ccompat/v7    your Confluent-compatible registry
--   the topic names, if you use STORMLINE_TOPIC_PREFIX (e.g. 'prod.tasks')
-- Values are Confluent-framed Avro (magic byte, schema id, body): format AvroConfluent.
-- Each kafka_* queue table mirrors its Avro schema (records as named Tuples); materialized
-- views write the same tables, columns and rows as the sink, so the canned analytics run
-- unchanged. Origin columns come from the Kafka engine's virtual columns (_topic,
-- _partition, _offset, _timestamp_ms, _key). Source columns are qualified with the queue
-- table's name, so an origin alias (partition, offset) never shadows an event field.
-- Delivery is at least once; ReplacingMergeTree over (..., event_id) collapses redelivered
-- and re-sent events on merge (query with FINAL, or SETTINGS final = 1, for exact counts).
-- Do not run `stormline sink` against the same tables at the same time.
"""

KAFKA_SETTINGS = """\
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = '{topic}',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;"""


def create_table(table: Table) -> str:
    cols = ",\n".join(f"    `{c.name}` {c.clickhouse}" for c in table.columns)
    order = ", ".join(table.key)
    return (
        f"CREATE TABLE IF NOT EXISTS {table.name}\n(\n{cols}\n)\n"
        "ENGINE = ReplacingMergeTree\n"
        f"ORDER BY ({order})\n"
        "SETTINGS non_replicated_deduplication_window = 10000;"
    )


def schema_statements(tables: Sequence[Table]) -> list[str]:
    """The CREATE TABLE statements of :func:`schema_sql`, without the trailing ``;``."""
    return [create_table(t).rstrip(";") for t in tables]


def schema_sql(tables: Sequence[Table]) -> str:
    return SCHEMA_HEADER + "".join("\n" + create_table(t) + "\n" for t in tables)


def queue_name(table: Table) -> str:
    return "kafka_" + table.topic.logical.replace("-", "_").replace(".", "_")


def create_queue(table: Table, engine: str | None = None) -> str:
    """The queue table of ``table``'s topic: its Avro schema as ClickHouse columns.
    ``engine``: another engine clause instead of Kafka (tests)."""
    cols = ",\n".join(f"    `{f['name']}` {queue_type(f['type'])}" for f in table.avro["fields"])
    tail = engine or KAFKA_SETTINGS.format(topic=table.topic.logical)
    return f"CREATE TABLE IF NOT EXISTS {queue_name(table)}\n(\n{cols}\n)\n{tail}"


def _select_item(c: Column, src: str) -> str:
    expr = c.sql.replace("{src}", src)
    return c.name if expr == f"{src}.{c.name}" else f"{expr} AS {c.name}"


def create_view(table: Table) -> str:
    """The materialized view that fills ``table`` from its queue table."""
    src = queue_name(table)
    items = ",\n       ".join(_select_item(c, src) for c in table.columns)
    sql = f"CREATE MATERIALIZED VIEW IF NOT EXISTS mv_{table.name} TO {table.name} AS\n"
    sql += f"SELECT {items}\nFROM {src}"
    if table.explode:
        arr = f"{src}.{table.explode}"
        sql += f"\nARRAY JOIN {arr} AS item, arrayEnumerate({arr}) AS item_number"
    return sql + ";"


def kafka_engine_sql(tables: Sequence[Table]) -> str:
    out = [KAFKA_HEADER]
    for t in tables:
        if not t.explode:
            out.append("\n" + create_queue(t) + "\n")
        out.append("\n" + create_view(t) + "\n")
    return "".join(out)
