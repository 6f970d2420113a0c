"""Canned analytics over the sink's tables: SQL texts, result shaping, plots.

The SQL is plain ClickHouse SQL over the table names of :mod:`.tables`; it runs
unchanged on chDB (views over the Parquet parts) and on a ClickHouse server (the tables of
``deploy/clickhouse/schema.sql``). ``{since}`` and ``{bucket}`` are filled in here from
parsed, typed values, never from raw user text.

Definitions (so the figures can be checked by hand):

* per_agent: ``tasks`` distinct task ids attempted (``uniq`` of a 64-bit hash: exact up to
  65536 per agent, within ~1% beyond; an exact count doubles the query's cost at 10M
  events), ``attempts`` trajectories,
  ``success_rate`` share of trajectories with status ok, ``mean_reward`` mean of the agent's
  Reward events with a 95% normal interval (mean +- 1.96 s/sqrt(n), s the sample standard
  deviation), ``p50/p95_latency_ms`` exact linearly interpolated quantiles of trajectory
  latency, ``tokens`` prompt + completion tokens, ``cost_usd`` summed.
* reward_over_time: mean reward per time bucket and arm, the arm being the reward's policy
  version (else the assignment's checkpoint version, else its policy kind) and the
  assignment's strategy: an A/B view of checkpoints and strategies.
* regret: per task type, the best agent in hindsight is the one with the highest mean
  reward (ties: smallest agent id); regret = n * best_mean - sum of rewards obtained.
* tasks_by_status: each task's status is its latest attempt's trajectory status, else
  ``assigned`` (an assignment but no trajectory yet), else ``pending``; attempts is the
  highest attempt number seen.
* dead_letters: dead letters by reason (error kind) and source topic.
* throughput: events per topic per time bucket, by Kafka record time.

Every query takes ``tenant`` (for the HTTP API): given, each table in it reads only that
tenant's rows (:func:`table_source`), so every figure is the one of that tenant's tasks.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from stormline.consumers.sink.store import Result, Store
from stormline.consumers.sink.tables import BY_NAME, TABLES

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Canned:
    name: str
    doc: str
    sql: str
    # For plots: x column, series columns, y column (None: not a time series).
    x: str | None = None
    series: tuple[str, ...] = ()
    y: str | None = None


PER_AGENT = """
WITH
t AS (
    SELECT agent_id,
           uniq(cityHash64(task_id)) AS tasks,
           count() AS attempts,
           countIf(status = 'ok') / count() AS success_rate,
           quantilesExactInclusive(0.5, 0.95)(latency_ms) AS latency_q,
           sum(total_tokens) AS tokens,
           sum(cost_usd) AS cost_usd
    FROM {trajectories}
    WHERE occurred_at >= {since}
    GROUP BY agent_id
),
r AS (
    SELECT agent_id,
           count() AS n_rewards,
           avg(value) AS mean_reward,
           if(count() > 1, 1.96 * stddevSamp(value) / sqrt(count()), nan) AS half_width
    FROM {rewards}
    WHERE occurred_at >= {since}
    GROUP BY agent_id
)
SELECT agent_id,
       t.tasks AS tasks,
       t.attempts AS attempts,
       t.success_rate AS success_rate,
       r.n_rewards AS rewards,
       r.mean_reward AS mean_reward,
       r.mean_reward - r.half_width AS reward_ci95_low,
       r.mean_reward + r.half_width AS reward_ci95_high,
       t.latency_q[1] AS p50_latency_ms,
       t.latency_q[2] AS p95_latency_ms,
       t.tokens AS tokens,
       t.cost_usd AS cost_usd
FROM t
FULL OUTER JOIN r USING (agent_id)
ORDER BY agent_id
"""

REWARD_OVER_TIME = """
SELECT toDateTime64(toStartOfInterval(rw.occurred_at, INTERVAL {bucket} SECOND), 3, 'UTC')
           AS bucket,
       multiIf(rw.policy_version != '', rw.policy_version,
               a.a_version != '', a.a_version,
               a.a_policy != '', a.a_policy, 'none') AS policy,
       if(a.a_strategy = '', 'none', a.a_strategy) AS strategy,
       count() AS n,
       avg(rw.value) AS mean_reward
FROM {rewards} AS rw
LEFT JOIN (
    SELECT task_id, attempt,
           any(strategy) AS a_strategy, any(policy) AS a_policy, any(policy_version) AS a_version
    FROM {assignments}
    GROUP BY task_id, attempt
) AS a ON rw.task_id = a.task_id AND rw.attempt = a.attempt
WHERE rw.occurred_at >= {since}
GROUP BY bucket, policy, strategy
ORDER BY bucket, policy, strategy
"""

REGRET = """
SELECT task_type,
       sum(n) AS n_rewards,
       sum(total) / sum(n) AS mean_reward,
       argMin(agent_id, (-agent_mean, agent_id)) AS best_agent,
       max(agent_mean) AS best_mean,
       max(agent_mean) * sum(n) - sum(total) AS regret,
       (max(agent_mean) * sum(n) - sum(total)) / sum(n) AS regret_per_reward
FROM (
    SELECT task_type, agent_id, count() AS n, sum(value) AS total, avg(value) AS agent_mean
    FROM {rewards}
    WHERE occurred_at >= {since}
    GROUP BY task_type, agent_id
)
GROUP BY task_type
ORDER BY task_type
"""

TASKS_BY_STATUS = """
SELECT status, attempts, count() AS tasks
FROM (
    SELECT t.task_id AS task_id,
           greatest(a.max_assigned, tr.max_tried) AS attempts,
           multiIf(tr.last_status != '', tr.last_status,
                   a.max_assigned > 0, 'assigned', 'pending') AS status
    FROM (SELECT DISTINCT task_id FROM {tasks} WHERE occurred_at >= {since}) AS t
    LEFT JOIN (
        SELECT task_id, max(attempt) AS max_assigned FROM {assignments} GROUP BY task_id
    ) AS a ON t.task_id = a.task_id
    LEFT JOIN (
        SELECT task_id,
               argMax(status, (attempt, occurred_at, offset)) AS last_status,
               max(attempt) AS max_tried
        FROM {trajectories}
        GROUP BY task_id
    ) AS tr ON t.task_id = tr.task_id
)
GROUP BY status, attempts
ORDER BY status, attempts
"""

DEAD_LETTERS = """
SELECT error_kind AS reason,
       source_topic,
       count() AS letters,
       min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen,
       argMin(error, (occurred_at, offset)) AS first_error
FROM {dead_letters}
WHERE occurred_at >= {since}
GROUP BY reason, source_topic
ORDER BY letters DESC, reason, source_topic
"""

_EVENT_TABLES = (
    "tasks",
    "assignments",
    "trajectories",
    "rewards",
    "heartbeats",
    "agent_health",
    "checkpoints",
    "dead_letters",
)
THROUGHPUT = (
    """
SELECT toDateTime64(toStartOfInterval(ts, INTERVAL {bucket} SECOND), 3, 'UTC') AS bucket,
       topic,
       count() AS events,
       count() / {bucket} AS events_per_s
FROM (
"""
    + "\n    UNION ALL\n".join(f"    SELECT topic, ts FROM {{{t}}}" for t in _EVENT_TABLES)
    + """
)
WHERE ts >= {since}
GROUP BY bucket, topic
ORDER BY bucket, topic
"""
)

CANNED: dict[str, Canned] = {
    c.name: c
    for c in (
        Canned(
            "per_agent",
            "tasks, success rate, mean reward (95% CI), p50/p95 latency, tokens, cost",
            PER_AGENT,
        ),
        Canned(
            "reward_over_time",
            "mean reward per time bucket by policy version and strategy (A/B)",
            REWARD_OVER_TIME,
            x="bucket",
            series=("policy", "strategy"),
            y="mean_reward",
        ),
        Canned(
            "regret",
            "regret against the best agent in hindsight per task type",
            REGRET,
        ),
        Canned("tasks_by_status", "tasks by latest status and attempts", TASKS_BY_STATUS),
        Canned("dead_letters", "dead letters by reason and source topic", DEAD_LETTERS),
        Canned(
            "throughput",
            "events per topic per time bucket",
            THROUGHPUT,
            x="bucket",
            series=("topic",),
            y="events_per_s",
        ),
    )
}


# A table in a canned query is written {name}: render_sql decides what it reads.
_TABLE_REF = re.compile(r"\{(" + "|".join(TABLES) + r")\}")


class AnalyticsError(ValueError):
    """Bad analytics input; the message says what to do."""


# --------------------------------------------------------------------- parameters --
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str | None, now: datetime | None = None) -> datetime:
    """``30m``, ``6h``, ``7d``, ``2w`` ago, or an ISO date/time (UTC if no zone); None: all."""
    if not value:
        return EPOCH
    now = now or datetime.now(UTC)
    m = _DURATION.match(value.strip())
    if m:
        return now - timedelta(seconds=float(m[1]) * _UNITS[m[2]])
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise AnalyticsError(
            f"--since {value!r}: use a duration like 30m, 6h, 7d or an ISO time "
            "like 2026-01-31T12:00"
        ) from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def quote(text: str) -> str:
    """``text`` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table_source(table: str, tenant: str | None = None) -> str:
    """What ``{table}`` in a canned query reads: the table, or only ``tenant``'s rows of it.

    Tasks and assignments carry the tenant; trajectories, steps and rewards reach it through
    their task_id, dead letters through their record's key (the task id of task-keyed
    topics). Heartbeats, health changes and checkpoints belong to no tenant: none of them.
    """
    if tenant is None:
        return table
    lit = quote(tenant)
    if table in ("tasks", "assignments"):
        where = f"tenant = {lit}"
    else:
        column = "raw_key" if table == "dead_letters" else "task_id"
        has = any(c.name == column for c in BY_NAME[table].columns)
        where = f"{column} IN (SELECT task_id FROM tasks WHERE tenant = {lit})" if has else "0"
    return f"(SELECT * FROM {table} WHERE {where})"


def render_sql(
    sql: str, since: datetime = EPOCH, bucket_seconds: int = 60, tenant: str | None = None
) -> str:
    """``sql`` with ``{since}``, ``{bucket}`` and each ``{table}`` filled in (tenant: only
    that tenant's rows, see :func:`table_source`)."""
    if bucket_seconds < 1:
        raise AnalyticsError("--bucket must be at least 1 second")
    if tenant is not None and not tenant:
        raise AnalyticsError("tenant must be a non-empty name (or None: every tenant)")
    sql = _TABLE_REF.sub(lambda m: table_source(m[1], tenant), sql)
    if since <= EPOCH:
        # No --since: drop the filter instead of comparing every row with 1970.
        sql = re.sub(r"[\w.]+ >= \{since\}", "1", sql)
    lit = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return sql.replace("{since}", f"toDateTime64('{lit}', 3, 'UTC')").replace(
        "{bucket}", str(int(bucket_seconds))
    )


def run_canned(
    store: Store,
    name: str,
    *,
    since: datetime = EPOCH,
    bucket_seconds: int = 60,
    tenant: str | None = None,
) -> Result:
    """Canned query ``name``; ``tenant``: over that tenant's rows only (None: everyone's)."""
    if name not in CANNED:
        raise AnalyticsError(f"no canned query {name!r}; choose one of: {', '.join(CANNED)}")
    return store.query(render_sql(CANNED[name].sql, since, bucket_seconds, tenant))


# ------------------------------------------------------------------------ shaping --
def plain(v: Any) -> Any:
    """A JSON/CSV-friendly value: ISO times, floats for decimals, None for NaN."""
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return v


def to_json(res: Result) -> str:
    return json.dumps(
        [{c: plain(v) for c, v in zip(res.columns, r, strict=True)} for r in res.rows]
    )


def to_csv(res: Result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(res.columns)
    for r in res.rows:
        w.writerow(["" if (x := plain(v)) is None else x for v in r])
    return buf.getvalue()


def cell(v: Any) -> str:
    v = plain(v)
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------------- plots --
def plot(res: Result, canned: Canned, path: Path, title: str | None = None) -> Path:
    """Render a time-series result as PNG (one line per series)."""
    if canned.x is None or canned.y is None:
        time_series = [c.name for c in CANNED.values() if c.x]
        raise AnalyticsError(
            f"--plot draws time series; {canned.name} is not one (try {', '.join(time_series)})"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.dicts()
    series: dict[str, tuple[list[Any], list[float]]] = {}
    for r in rows:
        label = " / ".join(str(r[c]) for c in canned.series)
        xs, ys = series.setdefault(label, ([], []))
        xs.append(r[canned.x])
        ys.append(float(r[canned.y]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for label, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title or f"{canned.name}: {canned.y}")
    ax.set_xlabel(canned.x)
    ax.set_ylabel(canned.y)
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
