"""Canned analytics on a known data set, checked against figures computed here in Python.

The events go through the real broker and the real sink (a `stormline sink` process, while
`stormline analytics` processes query the same parts: the two work side by side). Longer
than ~400 lines because every canned query is checked against Python over one loaded data
set (a module fixture: the sink runs once), for everyone and per tenant.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stormline.consumers.sink import analytics as an
from stormline.consumers.sink.store import (
    _SESSION_LOCK,
    ParquetStore,
    Result,
    _session,
    parts_dir,
    schema_statements,
)
from stormline.consumers.sink.tables import BY_NAME, TABLES
from stormline.schemas.catalog import spec_for
from stormline.schemas.kafka import EventProducer, ensure_topics
from stormline.schemas.models import DeadLetter
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests import sink_data
from tests.conftest import settings_env

CLI = [sys.executable, "-m", "stormline.cli"]
KAFKA_ENGINE_SQL = Path(__file__).resolve().parent.parent / "deploy/clickhouse/kafka_engine.sql"


@pytest.fixture(scope="module")
def loaded(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, sink_data.DataSet]]:
    s = stack_settings.model_copy(
        update={
            "topic_prefix": f"a{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path_factory.mktemp("analytics"),
            "sink_group": f"analytics-{uuid.uuid4().hex[:8]}",
            "sink_flush_seconds": 0.3,
        }
    )
    ensure_topics(s)
    ds = sink_data.make(n_tasks=40)
    producer = EventProducer(s, Serde.from_settings(s))
    producer.publish(ds.events())
    producer.close()
    sink = subprocess.Popen([*CLI, "sink"], env=settings_env(s), stderr=subprocess.PIPE, text=True)
    try:
        store = ParquetStore(parts_dir(s))
        deadline = time.monotonic() + 90
        n_events = len(ds.events())
        while time.monotonic() < deadline:
            got = sum(
                int(store.query(f"SELECT count() FROM {t}").rows[0][0])
                for t in TABLES
                if t != "steps"
            )
            if got >= n_events:
                break
            time.sleep(0.3)
        # While the sink still runs, another process queries the same data.
        out = subprocess.run(
            [*CLI, "analytics", "per_agent", "--format", "json"],
            env=settings_env(s),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert {r["agent_id"] for r in json.loads(out.stdout)} == set(sink_data.AGENTS)
        assert sink.poll() is None, "the sink must still be running"
        yield s, ds
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.communicate(timeout=30)


def _store(s: Settings) -> ParquetStore:
    return ParquetStore(parts_dir(s))


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _close(a: Any, b: Any) -> bool:
    if isinstance(b, float) or isinstance(a, float):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            return a is None or math.isnan(a)
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def _assert_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            assert _close(g[k], v), (k, g, w)


# -------------------------------------------------------------- the expected figures --
def expect_per_agent(ds: sink_data.DataSet, since: datetime) -> list[dict[str, Any]]:
    out = []
    for agent in sorted(sink_data.AGENTS):
        trs = [t for t in ds.trajectories if t.agent_id == agent and t.occurred_at >= since]
        rws = [r.value for r in ds.rewards if r.agent_id == agent and r.occurred_at >= since]
        if not trs and not rws:
            continue
        mean = statistics.fmean(rws)
        half = 1.96 * statistics.stdev(rws) / math.sqrt(len(rws))
        out.append(
            {
                "agent_id": agent,
                "tasks": len({t.task_id for t in trs}),
                "attempts": len(trs),
                "success_rate": sum(t.status == "ok" for t in trs) / len(trs),
                "rewards": len(rws),
                "mean_reward": mean,
                "reward_ci95_low": mean - half,
                "reward_ci95_high": mean + half,
                "p50_latency_ms": _quantile([t.latency_ms for t in trs], 0.5),
                "p95_latency_ms": _quantile([t.latency_ms for t in trs], 0.95),
                "tokens": sum(t.usage.prompt_tokens + t.usage.completion_tokens for t in trs),
                "cost_usd": sum(t.usage.cost_usd for t in trs),
            }
        )
    return out


def expect_reward_over_time(ds: sink_data.DataSet, bucket: int) -> list[dict[str, Any]]:
    strategy = {(a.task_id, a.attempt): a.strategy for a in ds.assignments}
    groups: dict[tuple[datetime, str, str], list[float]] = defaultdict(list)
    for r in ds.rewards:
        ts = int(r.occurred_at.timestamp()) // bucket * bucket
        key = (
            datetime.fromtimestamp(ts, UTC),
            r.policy_version or "",
            strategy[(r.task_id, r.attempt)],
        )
        groups[key].append(r.value)
    return [
        {"bucket": b, "policy": p, "strategy": s, "n": len(v), "mean_reward": statistics.fmean(v)}
        for (b, p, s), v in sorted(groups.items())
    ]


def expect_regret(ds: sink_data.DataSet) -> list[dict[str, Any]]:
    out = []
    for tt in sorted({r.task_type for r in ds.rewards}):
        by_agent: dict[str, list[float]] = defaultdict(list)
        for r in ds.rewards:
            if r.task_type == tt:
                by_agent[r.agent_id].append(r.value)
        means = {a: statistics.fmean(v) for a, v in by_agent.items()}
        best = min(means, key=lambda a: (-means[a], a))
        n = sum(len(v) for v in by_agent.values())
        total = sum(sum(v) for v in by_agent.values())
        out.append(
            {
                "task_type": tt,
                "n_rewards": n,
                "mean_reward": total / n,
                "best_agent": best,
                "best_mean": means[best],
                "regret": means[best] * n - total,
                "regret_per_reward": (means[best] * n - total) / n,
            }
        )
    return out


def expect_tasks_by_status(ds: sink_data.DataSet) -> list[dict[str, Any]]:
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for t in ds.tasks:
        assigned = [a.attempt for a in ds.assignments if a.task_id == t.task_id]
        tried = [tr for tr in ds.trajectories if tr.task_id == t.task_id]
        attempts = max([*assigned, *(tr.attempt for tr in tried), 0])
        if tried:
            status = max(tried, key=lambda tr: tr.attempt).status.value
        else:
            status = "assigned" if assigned else "pending"
        counts[(status, attempts)] += 1
    return [{"status": s, "attempts": a, "tasks": n} for (s, a), n in sorted(counts.items())]


# ----------------------------------------------------------------------------- tests --
def test_per_agent_matches_python(loaded: tuple[Settings, sink_data.DataSet]) -> None:
    s, ds = loaded
    got = an.run_canned(_store(s), "per_agent").dicts()
    _assert_rows(got, expect_per_agent(ds, an.EPOCH))


def test_since_filters_by_event_time(loaded: tuple[Settings, sink_data.DataSet]) -> None:
    s, ds = loaded
    since = sink_data.BASE + timedelta(minutes=10)
    got = an.run_canned(_store(s), "per_agent", since=an.parse_since(since.isoformat())).dicts()
    want = expect_per_agent(ds, since)
    assert want and sum(r["attempts"] for r in want) < len(ds.trajectories)
    _assert_rows(got, want)


def test_reward_over_time_by_policy_and_strategy(
    loaded: tuple[Settings, sink_data.DataSet],
) -> None:
    s, ds = loaded
    got = an.run_canned(_store(s), "reward_over_time", bucket_seconds=120).dicts()
    want = expect_reward_over_time(ds, 120)
    assert {r["policy"] for r in want} == {"router@1", "router@2"}
    _assert_rows(got, want)


def test_regret_against_best_agent_in_hindsight(
    loaded: tuple[Settings, sink_data.DataSet],
) -> None:
    s, ds = loaded
    got = an.run_canned(_store(s), "regret").dicts()
    want = expect_regret(ds)
    assert all(r["regret"] > 0 for r in want)
    _assert_rows(got, want)


def test_tasks_by_status_and_attempts(loaded: tuple[Settings, sink_data.DataSet]) -> None:
    s, ds = loaded
    got = an.run_canned(_store(s), "tasks_by_status").dicts()
    want = expect_tasks_by_status(ds)
    assert {r["status"] for r in want} >= {"ok", "error", "assigned", "pending"}
    _assert_rows(got, want)


def test_dead_letters_by_reason(loaded: tuple[Settings, sink_data.DataSet]) -> None:
    s, _ds = loaded
    got = an.run_canned(_store(s), "dead_letters").dicts()
    assert [(r["reason"], r["source_topic"], r["letters"]) for r in got] == [
        ("decode", "x.tasks", 2),
        ("validation", "x.tasks", 1),
    ]
    assert got[0]["first_seen"] == sink_data.BASE
    assert got[0]["first_error"] == "bad record 0"


def test_throughput_per_topic(loaded: tuple[Settings, sink_data.DataSet]) -> None:
    s, ds = loaded
    got = an.run_canned(_store(s), "throughput", bucket_seconds=3600).dicts()
    per_topic: dict[str, int] = defaultdict(int)
    for r in got:
        per_topic[r["topic"]] += r["events"]
        assert _close(r["events_per_s"], r["events"] / 3600)
    want: dict[str, int] = defaultdict(int)
    for ev in ds.events():
        want[spec_for(ev).name(s)] += 1
    assert dict(per_topic) == dict(want)


def test_cli_formats_plot_and_sql(
    loaded: tuple[Settings, sink_data.DataSet], tmp_path: Path
) -> None:
    s, ds = loaded
    env = settings_env(s)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*CLI, "analytics", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out

    png = tmp_path / "reward.png"
    cli("reward_over_time", "--bucket", "120", "--plot", str(png), "--format", "csv")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    rows = list(csv.DictReader(io.StringIO(cli("regret", "--format", "csv").stdout)))
    assert [r["task_type"] for r in rows] == sorted(sink_data.TYPES)
    assert [r["best_agent"] for r in rows] == [r["best_agent"] for r in expect_regret(ds)]

    own = json.loads(cli("--sql", "SELECT count() AS n FROM rewards", "--format", "json").stdout)
    assert own == [{"n": len(ds.rewards)}]

    table = cli("tasks_by_status").stdout
    assert "pending" in table and "assigned" in table

    bad = subprocess.run(
        [*CLI, "analytics", "per_agent", "--since", "yesterday-ish"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--since" in bad.stderr
    notplot = subprocess.run(
        [*CLI, "analytics", "per_agent", "--plot", str(tmp_path / "x.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert notplot.returncode == 2 and "time series" in notplot.stderr


def _of_tenant(ds: sink_data.DataSet, tenant: str) -> sink_data.DataSet:
    """The events of ``tenant``'s tasks (dead letters: by their record's key)."""
    ids = {t.task_id for t in ds.tasks if t.tenant == tenant}
    return sink_data.DataSet(
        tasks=[t for t in ds.tasks if t.task_id in ids],
        assignments=[a for a in ds.assignments if a.task_id in ids],
        trajectories=[t for t in ds.trajectories if t.task_id in ids],
        rewards=[r for r in ds.rewards if r.task_id in ids],
        others=[e for e in ds.others if isinstance(e, DeadLetter) and e.key() in ids],
    )


@pytest.mark.parametrize("tenant", ["acme", "default", "nobody"])
def test_every_canned_query_takes_a_tenant(
    loaded: tuple[Settings, sink_data.DataSet], tenant: str
) -> None:
    s, ds = loaded
    store, mine = _store(s), _of_tenant(ds, tenant)
    assert (len(mine.tasks) > 5) == (tenant != "nobody")

    def run(name: str, **kw: Any) -> list[dict[str, Any]]:
        return an.run_canned(store, name, tenant=tenant, **kw).dicts()

    _assert_rows(run("per_agent"), expect_per_agent(mine, an.EPOCH))
    _assert_rows(run("reward_over_time", bucket_seconds=120), expect_reward_over_time(mine, 120))
    _assert_rows(run("regret"), expect_regret(mine))
    _assert_rows(run("tasks_by_status"), expect_tasks_by_status(mine))
    letters = [(r["reason"], r["letters"]) for r in run("dead_letters")]
    assert letters == ([("decode", 1)] if tenant == "acme" else [])
    per_topic: dict[str, int] = defaultdict(int)
    for r in run("throughput", bucket_seconds=3600):
        per_topic[r["topic"]] += r["events"]
    want: dict[str, int] = defaultdict(int)
    for ev in mine.events():
        want[spec_for(ev).name(s)] += 1
    assert dict(per_topic) == dict(want)


def test_tenant_names_are_quoted_not_spliced() -> None:
    sql = an.render_sql(an.CANNED["regret"].sql, tenant="x' OR 1=1 --")
    assert "tenant = 'x\\' OR 1=1 --'" in sql
    with pytest.raises(an.AnalyticsError, match="tenant"):
        an.render_sql(an.CANNED["regret"].sql, tenant="")


# -------------------------------------------------- the server DDL runs the same SQL --
class _TablesInChdb:
    """schema.sql's MergeTree tables, created in chDB: what a ClickHouse server would hold."""

    def __init__(self, db: str) -> None:
        self.db = db

    def query(self, sql: str) -> Result:
        with _SESSION_LOCK:
            s = _session()
            s.query(f"USE {self.db}")
            tbl = s.query(sql, "ArrowTable")
        cols = tbl.column_names
        data = [tbl.column(c).to_pylist() for c in cols]
        return Result(list(cols), list(zip(*data, strict=True)) if data else [])


def test_server_schema_matches_and_runs_the_same_sql(
    loaded: tuple[Settings, sink_data.DataSet],
) -> None:
    s, _ds = loaded
    parquet = _store(s)
    db = f"srv_{uuid.uuid4().hex[:8]}"
    with _SESSION_LOCK:
        sess = _session()
        sess.query(f"CREATE DATABASE {db}")
        sess.query(f"USE {db}")
        for st in schema_statements():
            sess.query(st)
        for t in TABLES:
            glob = parts_dir(s) / t / "*.parquet"
            sess.query(f"INSERT INTO {db}.{t} SELECT * FROM file('{glob}', Parquet)")
    server = _TablesInChdb(db)
    for t, table in BY_NAME.items():
        declared = server.query(
            f"SELECT name, type FROM system.columns WHERE database = '{db}' "
            f"AND table = '{t}' ORDER BY position"
        ).rows
        assert declared == [(c.name, c.clickhouse) for c in table.columns]
        inferred = parquet.query(f"DESCRIBE TABLE {t}").rows
        assert [(r[0], r[1]) for r in inferred] == declared
    for name in an.CANNED:
        a = an.run_canned(parquet, name, bucket_seconds=120)
        b = an.run_canned(server, name, bucket_seconds=120)  # type: ignore[arg-type]
        assert a.columns == b.columns
        _assert_rows(b.dicts(), a.dicts())


def test_kafka_engine_ddl_parses() -> None:
    text = KAFKA_ENGINE_SQL.read_text()
    statements = schema_statements(text)
    assert any("ENGINE = Kafka" in st for st in statements)
    assert any("AvroConfluent" in st for st in statements)
    with _SESSION_LOCK:
        sess = _session()
        for st in statements:
            quoted = st.replace("\\", "\\\\").replace("'", "\\'")
            sess.query(f"SELECT formatQuery('{quoted}')")


def test_since_parsing() -> None:
    now = datetime(2026, 5, 1, tzinfo=UTC)
    assert an.parse_since("90m", now) == now - timedelta(minutes=90)
    assert an.parse_since("2d", now) == now - timedelta(days=2)
    assert an.parse_since("2026-04-30T10:00", now) == datetime(2026, 4, 30, 10, tzinfo=UTC)
    assert an.parse_since(None, now) == an.EPOCH
    with pytest.raises(an.AnalyticsError, match="--since"):
        an.parse_since("last tuesday", now)
    with pytest.raises(an.AnalyticsError, match="canned"):
        an.run_canned(None, "nope")  # type: ignore[arg-type]
