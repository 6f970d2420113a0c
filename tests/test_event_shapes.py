"""One source of truth for event shapes: model, Avro, Arrow and ClickHouse DDL agree.

The Avro schemas (``schemas/avro``) are the source; the sink's Arrow schemas, rows and DDL
are derived from them (``consumers/sink/tables.py`` declares only where a table differs).
This proves, for every event type, that the pydantic model and the Avro schema have the same
fields with compatible types and nullability, that Arrow schema and DDL have the same
columns and types, that the checked-in DDL is the generator's output, and that an event's
values survive event -> Avro -> row -> Parquet -> chDB, and Avro -> Kafka-engine tables ->
materialized views, giving the same rows both ways. No broker needed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
import typing
import uuid
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import fastavro
import pyarrow.parquet as pq
import pydantic
import pytest

from stormline.consumers.sink import ddl
from stormline.consumers.sink.avro_types import kind, optional, stored
from stormline.consumers.sink.columns import Keep
from stormline.consumers.sink.store import _SESSION_LOCK, _session
from stormline.consumers.sink.tables import (
    DECLARED,
    SCHEMAS,
    TABLE_OF_TOPIC,
    Origin,
    arrow_table,
    rows_of,
)
from stormline.schemas import models as m
from stormline.schemas.catalog import CATALOG, spec_for
from stormline.schemas.serde import FingerprintRegistry, Serde, parsed_schema
from tests import sink_data

ROOT = Path(__file__).resolve().parent.parent
SQL = ROOT / "deploy" / "clickhouse"

# The Avro kinds a model annotation may be written as (independent of the derivation).
_AVRO_OF: dict[Any, set[str]] = {
    str: {"string"},
    int: {"int", "long"},
    float: {"double", "float"},
    bool: {"boolean"},
    bytes: {"bytes"},
    datetime: {"timestamp-millis"},
    uuid.UUID: {"uuid"},
}


def _sample_events() -> list[m.Event]:
    """Every event type, with optional fields both set and unset."""
    ds = sink_data.make(n_tasks=12)
    extra: list[m.Event] = [
        m.TaskSubmitted(
            task_id="t-x",
            task_type="math",
            prompt="2+2?",
            expected="4",
            evaluator="exact",
            deadline_ms=5000,
            metadata={"a": "b"},
            required_capabilities=["math"],
        ),
        m.Trajectory(
            task_id="t-x",
            trajectory_id="t-x-1",
            attempt=1,
            agent_id="a",
            status="timeout",
            error="slow",
            steps=[m.Step(role="assistant", content="4", token_ids=[1, 2], logprobs=[-0.1, -2])],
        ),
        m.CheckpointPublished(
            policy="router",
            version=3,
            uri="file:///c/3",
            sha256="b" * 64,
            metrics={"loss": 0.5},
            trained_on=[m.OffsetRange(topic="t", partition=1, start_offset=2, end_offset=9)],
        ),
        m.DeadLetter(
            source_topic="x", partition=2, offset=7, raw_key=b"k\xff", error_kind="avro", error="e"
        ),
    ]
    a = ds.assignments[0]
    extra.append(a.model_copy(update={"epsilon": 0.25, "event_id": uuid.uuid4()}))
    return [*ds.events(), *extra]


def _avro_fields(event_type: type[m.Event]) -> dict[str, Any]:
    table = next(t for t in DECLARED if t.topic.event is event_type)
    return {f["name"]: f["type"] for f in table.avro["fields"]}


def _check_annotation(where: str, ann: Any, avro: Any) -> None:
    """The model's annotation ``ann`` and the Avro type agree, nullability included."""
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        assert type(None) in args and optional(avro) is not None, f"{where}: nullability"
        (inner,) = [a for a in args if a is not type(None)]
        return _check_annotation(where, inner, optional(avro))
    assert optional(avro) is None, f"{where}: Avro is optional, the model is not"
    if origin is typing.Annotated:
        return _check_annotation(where, args[0], avro)
    k = kind(avro)
    if origin is list:
        assert k == "array", where
        return _check_annotation(where + "[]", args[0], avro["items"])
    if origin is dict:
        assert k == "map" and args[0] is str, where
        return _check_annotation(where + "{}", args[1], avro["values"])
    if isinstance(ann, type) and issubclass(ann, Enum):
        assert k == "enum" and avro["symbols"] == [e.value for e in ann], where
        return None
    if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
        assert k == "record", where
        return _check_fields(where, ann, {f["name"]: f["type"] for f in avro["fields"]})
    assert k in _AVRO_OF[ann], f"{where}: model {ann} vs Avro {k}"
    return None


def _check_fields(where: str, model: type[pydantic.BaseModel], avro: dict[str, Any]) -> None:
    assert set(model.model_fields) == set(avro), f"{where}: {set(model.model_fields) ^ set(avro)}"
    hints = typing.get_type_hints(model, include_extras=True)
    for name in avro:
        _check_annotation(f"{where}.{name}", hints[name], avro[name])


@pytest.mark.parametrize("event_type", m.EVENT_TYPES, ids=lambda t: t.__name__)
def test_model_and_avro_have_the_same_fields_types_and_nullability(
    event_type: type[m.Event],
) -> None:
    _check_fields(event_type.__name__, event_type, _avro_fields(event_type))


def test_every_event_type_has_a_table_and_every_topic_is_sunk() -> None:
    assert {spec_for(t).logical for t in m.EVENT_TYPES} == set(TABLE_OF_TOPIC)
    assert {s.logical for s in CATALOG} == set(TABLE_OF_TOPIC)


@pytest.mark.parametrize("table", DECLARED, ids=lambda t: t.name)
def test_arrow_schema_follows_avro_for_every_kept_field(table: Any) -> None:
    """A column named like an Avro field of the event (or exploded item) has that field's
    stored type, unless declared otherwise; nullable exactly when its type is optional."""
    fields = {f["name"]: f["type"] for f in table.avro["fields"]}
    if table.explode:
        fields.update((f["name"], f["type"]) for f in fields[table.explode]["items"]["fields"])
    schema = SCHEMAS[table.name]
    for col in table.columns:
        f = schema.field(col.name)
        assert f.nullable == (optional(col.avro) is not None), col.name
        declared = table.fields.get(col.name)  # e.g. Json(): a declared difference
        if col.name in fields and col.scope != "origin" and declared in (None, Keep(widen=True)):
            want = stored(fields[col.name])
            widened = want == "int" and col.avro == "long"  # declared widening
            assert col.avro == want or widened, (table.name, col.name, col.avro, want)


def test_checked_in_ddl_is_the_generated_ddl() -> None:
    for args, path in (([], SQL / "schema.sql"), (["--kafka-engine"], SQL / "kafka_engine.sql")):
        out = subprocess.run(
            [sys.executable, "-m", "stormline.consumers.sink.tables", "--ddl", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert out == path.read_text(), (
            f"{path.name} drifted from the schemas: regenerate it with "
            f"python -m stormline.consumers.sink.tables --ddl {' '.join(args)} > {path}"
        )


# ------------------------------------------------------------------ through chDB --
def _q(sql: str) -> Any:
    return _session().query(sql, "ArrowTable")


def _rows(ev_list: list[m.Event], topic: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of each event after an Avro round trip through the serde (no registry)."""
    serde = Serde(FingerprintRegistry())
    out: dict[str, list[dict[str, Any]]] = {}
    for i, ev in enumerate(ev_list):
        back = serde.decode(serde.encode(topic, ev), type(ev))
        assert back == ev
        for table, row in rows_of(Origin(topic, 0, i, 1_700_000_000_000 + i, f"k{i}"), back):
            out.setdefault(table, []).append(row)
    return out


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["offset"], r.get("step_index", 0)))


def _plain(rows: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """Rows as Arrow (and so chDB) gives them back: maps as key/value pairs."""
    return arrow_table(table, rows).to_pylist()


def test_round_trip_event_avro_row_parquet_chdb_and_ddl_types(tmp_path: Path) -> None:
    events = _sample_events()
    db = f"shapes_{uuid.uuid4().hex[:8]}"
    with _SESSION_LOCK:
        _q(f"CREATE DATABASE {db}")
        for st in ddl.schema_statements(DECLARED):
            _q(st.replace("CREATE TABLE IF NOT EXISTS ", f"CREATE TABLE {db}."))
        for event_type in m.EVENT_TYPES:
            evs = [e for e in events if type(e) is event_type]
            assert evs, event_type
            for table, rows in _rows(evs, "topic").items():
                path = tmp_path / f"{table}.parquet"
                pq.write_table(arrow_table(table, rows), path)
                got = _q(f"SELECT * FROM file('{path}', Parquet)").to_pylist()
                assert _ordered(got) == _ordered(_plain(rows, table)), table
                inferred = _q(f"DESCRIBE file('{path}', Parquet)").to_pylist()
                declared = _q(
                    f"SELECT name, type FROM system.columns WHERE database = '{db}' "
                    f"AND table = '{table}' ORDER BY position"
                ).to_pylist()
                assert [(r["name"], r["type"]) for r in inferred] == [
                    (r["name"], r["type"]) for r in declared
                ]
                _q(f"INSERT INTO {db}.{table} SELECT * FROM file('{path}', Parquet)")
                back = _q(f"SELECT * FROM {db}.{table}").to_pylist()
                assert _ordered(back) == _ordered(got), table
        _q(f"DROP DATABASE {db}")


def test_spot_values_of_the_declared_differences() -> None:
    ev = next(e for e in _sample_events() if isinstance(e, m.Trajectory) and e.error == "slow")
    rows = dict(rows_of(Origin("t", 1, 5, 0, None), ev))
    assert rows["trajectories"]["n_steps"] == 1 and rows["trajectories"]["output"] == ""
    assert rows["steps"]["n_token_ids"] == 2 and rows["steps"]["step_index"] == 0
    assert "expected" not in rows["trajectories"] and "logprobs" not in rows["steps"]
    ck = next(e for e in _sample_events() if isinstance(e, m.CheckpointPublished) and e.trained_on)
    row = dict(rows_of(Origin("t", 0, 0, 0, None), ck))["checkpoints"]
    assert row["policy_version"] == "router@3"
    assert json.loads(row["trained_on"]) == [r.model_dump() for r in ck.trained_on]
    dl = next(e for e in _sample_events() if isinstance(e, m.DeadLetter) and e.partition == 2)
    row = dict(rows_of(Origin("t", 0, 0, 0, None), dl))["dead_letters"]
    assert (row["source_partition"], row["source_offset"], row["raw_key"]) == (2, 7, "k\ufffd")


# ---------------------------------------------- Kafka engine: the same rows as the sink --
VIRTUALS = (
    "`_topic` LowCardinality(String), `_partition` UInt64, `_offset` UInt64, "
    "`_timestamp_ms` Nullable(DateTime64(3)), `_key` String"
)


def _avro_file(path: Path, evs: list[m.Event]) -> None:
    buf = io.BytesIO()
    fastavro.writer(buf, parsed_schema(type(evs[0])), [e.model_dump() for e in evs])
    path.write_bytes(buf.getvalue())


def test_kafka_engine_views_give_the_sinks_rows(tmp_path: Path) -> None:
    """kafka_engine.sql's queue tables read the events' Avro (as AvroConfluent would) and its
    views fill the tables with exactly the rows the sink writes. The Kafka engine itself is
    stood in for by a Memory table with its virtual columns."""
    events = _sample_events()
    db = f"keng_{uuid.uuid4().hex[:8]}"
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with _SESSION_LOCK:
        _q(f"CREATE DATABASE {db}")
        _q(f"USE {db}")
        for st in ddl.schema_statements(DECLARED):
            _q(st)
        queues = {t.topic.logical: t for t in DECLARED if not t.explode}
        for t in queues.values():
            q = ddl.create_queue(t, engine="ENGINE = Memory")
            _q(q.replace("\n)\nENGINE", f",\n    {VIRTUALS}\n)\nENGINE"))
        for t in DECLARED:
            _q(ddl.create_view(t))
        want: dict[str, list[dict[str, Any]]] = {}
        for logical, t in queues.items():
            evs = [e for e in events if spec_for(e).logical == logical]
            path = tmp_path / f"{logical}.avro"
            _avro_file(path, evs)
            structure = ", ".join(
                f"`{f['name']}` {ddl.queue_type(f['type'])}" for f in t.avro["fields"]
            ).replace("'", "\\'")
            _q(
                f"INSERT INTO {ddl.queue_name(t)} SELECT *, '{logical}', 0, "
                f"rowNumberInAllBlocks(), toDateTime64('{base:%F %T}', 3, 'UTC') "
                f"+ toIntervalMillisecond(rowNumberInAllBlocks()), "
                f"concat('k', toString(rowNumberInAllBlocks())) "
                f"FROM file('{path}', Avro, '{structure}')"
            )
            for i, ev in enumerate(evs):
                ms = int((base + timedelta(milliseconds=i)).timestamp() * 1000)
                for table, row in rows_of(Origin(logical, 0, i, ms, f"k{i}"), ev):
                    want.setdefault(table, []).append(row)
        assert set(want) == {t.name for t in DECLARED}
        for table, rows in want.items():
            got = _q(f"SELECT * FROM {table}").to_pylist()
            wanted = _ordered(_plain(rows, table))
            if table == "checkpoints":  # JSON text: compare what it says
                for r in [*got, *wanted]:
                    r["trained_on"] = _json_ints(r["trained_on"])
            assert _ordered(got) == wanted, table
        _q(f"DROP DATABASE {db}")
        _q("USE default")


def _json_ints(text: str) -> Any:
    """toJSONString may quote 64-bit integers; the numbers are what matter."""
    return [{k: int(v) if k != "topic" else v for k, v in r.items()} for r in json.loads(text)]
