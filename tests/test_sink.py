"""The sink through the real broker: every event lands exactly once, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from stormline.consumers.sink.service import Sink
from stormline.consumers.sink.store import ParquetStore, ServerStore, StoreError, parts_dir
from stormline.consumers.sink.tables import TABLE_OF_TOPIC, TABLES
from stormline.runtime.connection import confluent_config
from stormline.schemas.catalog import CATALOG
from stormline.schemas.kafka import EventProducer, end_offsets
from stormline.settings import Settings
from tests import sink_data
from tests.conftest import settings_env

CLI = [sys.executable, "-m", "stormline.cli"]


def _expected(ds: sink_data.DataSet) -> dict[str, int]:
    want = Counter({t: 0 for t in TABLES})
    for ev in ds.events():
        from stormline.schemas.catalog import spec_for

        want[TABLE_OF_TOPIC[spec_for(ev).logical]] += 1
    want["steps"] = sum(len(t.steps) for t in ds.trajectories)
    return dict(want)


def _counts(store: ParquetStore) -> dict[str, tuple[int, int]]:
    """rows and distinct (topic, partition, offset[, step]) per table."""
    out = {}
    for t in TABLES:
        ident = "topic, partition, offset" + (", step_index" if t == "steps" else "")
        res = store.query(f"SELECT count(), uniqExact({ident}) FROM {t}")
        out[t] = (int(res.rows[0][0]), int(res.rows[0][1]))
    return out


def _publish(settings: Settings, serde: Any, ds: sink_data.DataSet) -> None:
    producer = EventProducer(settings, serde)
    producer.publish(ds.events())
    producer.close()


def _committed_all(settings: Settings, group: str) -> bool:
    c = Consumer({**confluent_config(settings), "group.id": group})
    try:
        for spec in CATALOG:
            name = spec.name(settings)
            n = spec.partitions(settings)
            ends = end_offsets(settings, name, n)
            got = c.committed([TopicPartition(name, p) for p in range(n)], timeout=10)
            for tp in got:
                if ends[tp.partition] > 0 and tp.offset != ends[tp.partition]:
                    return False
        return True
    finally:
        c.close()


def test_events_land_exactly_once_across_kill9_and_restart(topics: Settings, serde: Any) -> None:
    ds = sink_data.make(n_tasks=60)
    _publish(topics, serde, ds)
    want = _expected(ds)
    group = f"{topics.topic_prefix}sink"
    env = {
        **settings_env(topics),
        "STORMLINE_SINK_GROUP": group,
        "STORMLINE_SINK_BATCH_SIZE": "25",
        "STORMLINE_SINK_FLUSH_SECONDS": "0.3",
    }
    store = ParquetStore(parts_dir(topics))

    first = subprocess.Popen([*CLI, "sink"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not store.parts("tasks") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.parts("tasks"), "the sink wrote nothing in 60 s"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    assert first.returncode == -signal.SIGKILL

    second = subprocess.Popen([*CLI, "sink"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            counts = _counts(store)
            if all(counts[t][0] >= want[t] for t in TABLES) and _committed_all(topics, group):
                break
            time.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        _out, errs = second.communicate(timeout=30)
    assert second.returncode == 0, errs[-3000:]
    counts = _counts(store)
    assert {t: c[0] for t, c in counts.items()} == want
    assert all(rows == distinct for rows, distinct in counts.values())
    assert _committed_all(topics, group)


class _Crash(BaseException):
    """Stands for kill -9 between the write and the commit."""


def test_batch_redelivered_after_write_adds_nothing(topics: Settings, serde: Any) -> None:
    ds = sink_data.make(n_tasks=20)
    _publish(topics, serde, ds)
    want = _expected(ds)
    s = topics.model_copy(
        update={
            "sink_group": f"{topics.topic_prefix}sink",
            "sink_batch_size": 100_000,
            "sink_flush_seconds": 30.0,
        }
    )
    store = ParquetStore(parts_dir(s))

    crashing = Sink(s, store=store, serde=serde)

    def crash() -> None:
        raise _Crash

    crashing.consumer.commit = crash  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        crashing.run(until_idle=3.0)
    first = _counts(store)
    assert {t: c[0] for t, c in first.items()} == want  # written, never committed

    again = Sink(s, store=ParquetStore(parts_dir(s)), serde=serde)
    stats = again.run(until_idle=3.0)
    assert stats.events == len(ds.events())  # everything was redelivered...
    assert stats.rows == 0  # ...and none of it written twice
    assert stats.skipped == sum(want.values())
    assert _counts(store) == first
    assert _committed_all(s, s.sink_group)


class _FlakyStore:
    """The real store, failing its first ``fails`` inserts (a server that is down)."""

    def __init__(self, inner: ParquetStore, fails: int) -> None:
        self.inner, self.fails, self.calls = inner, fails, 0

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise StoreError("connection refused (simulated outage)")
        self.inner.insert(table, rows)

    def query(self, sql: str) -> Any:
        return self.inner.query(sql)

    def query_arrow(self, sql: str) -> Any:
        return self.inner.query_arrow(sql)

    def high_water(self, table: str) -> dict[tuple[str, int], int]:
        return self.inner.high_water(table)

    def close(self) -> None:
        pass


def test_failing_store_backs_off_commits_nothing_and_loses_nothing(
    topics: Settings, serde: Any
) -> None:
    ds = sink_data.make(n_tasks=20)
    _publish(topics, serde, ds)
    want = _expected(ds)
    s = topics.model_copy(
        update={
            "sink_group": f"{topics.topic_prefix}sink",
            "sink_batch_size": 50,
            "sink_flush_seconds": 0.2,
            "sink_retry_max_seconds": 0.5,
        }
    )
    inner = ParquetStore(parts_dir(s))
    flaky = _FlakyStore(inner, fails=4)
    sink = Sink(s, store=flaky, serde=serde)  # type: ignore[arg-type]
    stats = sink.run(until_idle=4.0)
    assert stats.failures == 4
    counts = _counts(inner)
    assert {t: c[0] for t, c in counts.items()} == want
    assert all(rows == distinct for rows, distinct in counts.values())
    assert _committed_all(s, s.sink_group)


def test_parts_are_immutable_and_named_by_offsets(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    assert store.query("SELECT count() FROM rewards").rows == [(0,)]
    names = sorted(os.listdir(tmp_path / "rewards"))
    assert names == ["_empty.parquet"]
    assert store.high_water("rewards") == {}


def test_server_backend_through_clickhouse_connect_is_idempotent(
    topics: Settings, serde: Any
) -> None:
    """The ServerStore path (clickhouse-connect, schema.sql's ReplacingMergeTree tables),
    against clickhouse-connect's in-process chDB client instead of a remote server."""
    ds = sink_data.make(n_tasks=15)
    _publish(topics, serde, ds)
    want = _expected(ds)
    db = "srv_" + topics.topic_prefix.strip(".")
    s = topics.model_copy(
        update={
            "clickhouse_url": f"chdb://memory/{db}",
            "sink_group": f"{topics.topic_prefix}sink-a",
            "sink_flush_seconds": 0.2,
        }
    )
    # clickhouse-connect's chdb://memory database lives as long as its client: keep one open.
    server = ServerStore(s)
    first = Sink(s, store=_KeepOpen(server), serde=serde)  # type: ignore[arg-type]
    stats = first.run(until_idle=3.0)
    assert stats.rows == sum(want.values())
    # A second group re-reads every event; the store's high-water marks absorb all of it.
    second = s.model_copy(update={"sink_group": f"{topics.topic_prefix}sink-b"})
    again = Sink(second, store=_KeepOpen(server), serde=serde)  # type: ignore[arg-type]
    stats = again.run(until_idle=3.0)
    assert stats.events == len(ds.events()) and stats.rows == 0
    assert stats.skipped == sum(want.values())
    for t in TABLES:
        assert int(server.query(f"SELECT count() FROM {t}").rows[0][0]) == want[t], t
    # Last line of defence: a row stored twice (say, by a second writer) is one row to
    # ReplacingMergeTree, since event_id ends its ORDER BY; the store's queries read FINAL.
    row = server.query("SELECT * FROM rewards LIMIT 1").dicts()[0]
    server.insert("rewards", [row])
    raw = server.query("SELECT count() FROM rewards SETTINGS final = 0").rows[0][0]
    assert int(raw) == want["rewards"] + 1
    assert int(server.query("SELECT count() FROM rewards").rows[0][0]) == want["rewards"]
    server.close()


class _KeepOpen:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> None:
        pass


def test_compaction_merges_small_parts_without_double_counting(tmp_path: Path) -> None:
    from stormline.consumers.sink.store import Part, live_parts
    from stormline.consumers.sink.tables import Origin, rows_of
    from stormline.schemas.models import Reward

    store = ParquetStore(tmp_path)
    offset = 0
    for _batch in range(12):
        rows = []
        for _ in range(5):
            ev = Reward(task_id="t", trajectory_id="r", agent_id="a", value=offset, source="human")
            rows += [r for _t, r in rows_of(Origin("rw", offset % 2, offset, 0, "t"), ev)]
            offset += 1
        store.insert("rewards", rows)
    assert len(store.parts("rewards")) == 24
    total = store.query("SELECT count(), sum(value) FROM rewards").rows
    hw = store.high_water("rewards")

    merged = store.compact("rewards", target_rows=1000, min_run=4, grace_s=3600, only={("rw", 0)})
    assert merged == 12  # partition 0 only
    # Sources stay on disk during the grace period but are no longer read.
    assert len(store.parts("rewards")) == 25
    assert len(live_parts(store.parts("rewards"))) == 13
    assert store.query("SELECT count(), sum(value) FROM rewards").rows == total
    assert store.high_water("rewards") == hw

    store.compact("rewards", target_rows=1000, min_run=4, grace_s=0)
    names = sorted(p.name for p in store.parts("rewards"))
    assert names == sorted([Part("rw", 0, 0, 58).name, Part("rw", 1, 1, 59).name]), names
    assert store.query("SELECT count(), sum(value) FROM rewards").rows == total
    assert store.query("SELECT groupArray(offset) FROM rewards WHERE partition = 1").rows == [
        (list(range(1, 60, 2)),)
    ]


def test_server_down_backs_off_commits_nothing_and_hides_the_password(
    topics: Settings, serde: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from tests.conftest import free_port

    ds = sink_data.make(n_tasks=5)
    _publish(topics, serde, ds)
    s = topics.model_copy(
        update={
            "clickhouse_url": f"http://stormline:pw-s3cret-value@127.0.0.1:{free_port()}/x",
            "sink_group": f"{topics.topic_prefix}sink-down",
            "sink_flush_seconds": 0.1,
            "sink_retry_max_seconds": 0.4,
        }
    )
    sink = Sink(s, serde=serde)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (sink.run(), done.set()), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while sink.stats.failures < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    sink.stop()
    assert done.wait(30), "the sink did not stop on request while the server was down"
    assert sink.stats.failures >= 3 and sink.stats.rows == 0
    c = Consumer({**confluent_config(s), "group.id": s.sink_group})
    name = CATALOG[0].name(s)
    got = c.committed([TopicPartition(name, p) for p in range(s.default_partitions)], timeout=10)
    c.close()
    assert all(tp.offset < 0 for tp in got)  # nothing committed: a later sink re-reads all
    assert "pw-s3cret-value" not in caplog.text
    assert "retrying" in caplog.text


def test_a_stale_empty_part_is_rewritten_with_the_derived_schema(tmp_path: Path) -> None:
    """The empty part gives the views their columns: after a schema change (a field added
    to an event) it follows the tables derived from the Avro schemas, and older parts still
    read, their missing column as its default."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stormline.consumers.sink.store import EMPTY_PART, Part
    from stormline.consumers.sink.tables import SCHEMAS

    old = pa.schema([f for f in SCHEMAS["rewards"] if f.name != "reason"])
    (tmp_path / "rewards").mkdir()
    pq.write_table(old.empty_table(), tmp_path / "rewards" / EMPTY_PART)
    row = {f.name: [] if f.name == "components" else None for f in old}
    row.update(topic="rw", partition=0, offset=0, ts=0, key="", event_id="e", occurred_at=0)
    row.update(schema_version=1, task_id="t", trajectory_id="r", attempt=1, agent_id="a")
    row.update(task_type="", policy_version="", value=0.5, source="human")
    part = tmp_path / "rewards" / Part("rw", 0, 0, 0).name
    pq.write_table(pa.Table.from_pylist([row], old), part)
    store = ParquetStore(tmp_path)
    assert pq.read_schema(tmp_path / "rewards" / EMPTY_PART).equals(SCHEMAS["rewards"])
    assert store.query("SELECT value, reason FROM rewards").rows == [(0.5, "")]
