"""The console's queries over the sink's tables, and the shaping of their rows. No I/O here:
each function takes a ``Store`` (the API's, ``routes_analytics._store``) and returns plain
JSON-able rows. SQL goes through ``analytics.render_sql``, so ``{table}`` and ``{since}``
mean what they mean in the canned queries (and a tenant reads only its own rows).

Definitions:

* outcomes: trajectories per time bucket by status (ok / not ok) and rewards per bucket
  (count, mean).
* share: assignments per bucket, task type and agent; an agent's share is its part of that
  bucket's assignments of the task type.
* regret: per reward, the best agent in hindsight of its task type is the one with the
  highest mean reward over the window (the canned ``regret`` query's definition); the
  random baseline picks uniformly among the agents rewarded for that task type, so its
  expected reward is the mean of their means. Cumulative regret is the running sum of
  (best mean - reward obtained), and of (best mean - random baseline's expected reward).
  The router's own final failures are rewards obtained but never an arm.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime
from typing import Any

from stormline.consumers.sink import analytics as an
from stormline.consumers.sink.store import Store
from stormline.schemas.models import ROUTER_AGENT

_BUCKET = "toDateTime64(toStartOfInterval(occurred_at, INTERVAL {bucket} SECOND), 3, 'UTC')"

OUTCOMES = f"""
SELECT {_BUCKET} AS bucket, count() AS trajectories,
       countIf(status = 'ok') AS ok, countIf(status != 'ok') AS errors,
       avg(latency_ms) AS mean_latency_ms
FROM {{trajectories}} WHERE occurred_at >= {{since}}
GROUP BY bucket ORDER BY bucket
"""

REWARDS = f"""
SELECT {_BUCKET} AS bucket, count() AS rewards, avg(value) AS mean_reward
FROM {{rewards}} WHERE occurred_at >= {{since}}
GROUP BY bucket ORDER BY bucket
"""

SHARE = f"""
SELECT {_BUCKET} AS bucket, task_type, agent_id, count() AS n
FROM {{assignments}} WHERE occurred_at >= {{since}}
GROUP BY bucket, task_type, agent_id ORDER BY bucket, task_type, agent_id
"""

REGRET = f"""
WITH arms AS (
    SELECT task_type, agent_id, avg(value) AS m
    FROM {{rewards}} WHERE occurred_at >= {{since}} AND agent_id != '{ROUTER_AGENT}'
    GROUP BY task_type, agent_id
),
base AS (SELECT task_type, max(m) AS best, avg(m) AS rnd FROM arms GROUP BY task_type)
SELECT {_BUCKET} AS bucket, count() AS n, sum(value) AS got,
       sum(base.best) AS best, sum(base.rnd) AS rnd
FROM {{rewards}} AS rw INNER JOIN base ON rw.task_type = base.task_type
WHERE occurred_at >= {{since}}
GROUP BY bucket ORDER BY bucket
"""

AB = """
SELECT multiIf(rw.policy_version != '', rw.policy_version,
               a.a_version != '', a.a_version,
               a.a_policy != '', a.a_policy, 'none') AS policy,
       if(a.a_strategy = '', 'none', a.a_strategy) AS strategy,
       count() AS n, avg(rw.value) AS mean_reward,
       if(count() > 1, 1.96 * stddevSamp(rw.value) / sqrt(count()), nan) AS half_width,
       min(rw.occurred_at) AS first_seen, max(rw.occurred_at) AS last_seen
FROM {rewards} AS rw
LEFT JOIN (
    SELECT task_id, attempt,
           any(strategy) AS a_strategy, any(policy) AS a_policy, any(policy_version) AS a_version
    FROM {assignments} GROUP BY task_id, attempt
) AS a ON rw.task_id = a.task_id AND rw.attempt = a.attempt
WHERE rw.occurred_at >= {since}
GROUP BY policy, strategy ORDER BY first_seen
"""

CHECKPOINTS = """
SELECT occurred_at, policy, version, policy_version, uri, promoted, decision, metrics
FROM {checkpoints} ORDER BY occurred_at DESC, version DESC LIMIT 50
"""

RECENT_TASKS = """
SELECT task_id, task_type, occurred_at FROM {tasks}
ORDER BY occurred_at DESC LIMIT {limit}
"""

# One task's events, one SELECT per table (the tables' columns differ).
TIMELINE = {
    "submitted": "SELECT occurred_at, ts, task_type, prompt, priority, tenant, "
    "required_capabilities, expected, deadline_ms FROM {tasks} WHERE task_id = {id}",
    "assigned": "SELECT occurred_at, ts, attempt, agent_id, policy, strategy, policy_version, "
    "score, epsilon, assigned_at, expires_at FROM {assignments} WHERE task_id = {id}",
    "trajectory": "SELECT occurred_at, ts, attempt, agent_id, trajectory_id, provider, model, "
    "status, error, output, n_steps, latency_ms, prompt_tokens, completion_tokens, cost_usd, "
    "final FROM {trajectories} WHERE task_id = {id}",
    "reward": "SELECT occurred_at, ts, attempt, agent_id, trajectory_id, value, source, "
    "reason, components FROM {rewards} WHERE task_id = {id}",
}


def rows(
    store: Store,
    sql: str,
    since: datetime = an.EPOCH,
    bucket: int = 10,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    res = store.query(an.render_sql(sql, since, bucket, tenant))
    out: list[dict[str, Any]] = json.loads(an.to_json(res))
    return out


def share_series(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task type, agent): [[bucket, share], ...] over every bucket of that task type; a
    bucket in which the agent got none of the type's assignments is a share of 0 (not a gap
    that a chart would draw across)."""
    totals: dict[tuple[str, str], int] = {}
    for r in rows_:
        k = (r["bucket"], r["task_type"])
        totals[k] = totals.get(k, 0) + int(r["n"])
    n = {(r["task_type"], r["agent_id"], r["bucket"]): int(r["n"]) for r in rows_}
    buckets: dict[str, list[str]] = {}
    for b, t in sorted(totals):
        buckets.setdefault(t, []).append(b)
    pairs = sorted({(r["task_type"], r["agent_id"]) for r in rows_})
    return [
        {
            "task_type": t,
            "agent_id": a,
            "points": [[b, n.get((t, a, b), 0) / totals[(b, t)]] for b in buckets[t]],
        }
        for t, a in pairs
    ]


def cumulative_regret(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Running totals of REGRET's buckets: rewards, mean reward, regret vs. best and random."""
    out: list[dict[str, Any]] = []
    n = got = regret = regret_rnd = 0.0
    for r in rows_:
        n += r["n"]
        got += r["got"]
        regret += r["best"] - r["got"]
        regret_rnd += r["best"] - r["rnd"]
        out.append(
            {
                "bucket": r["bucket"],
                "n": int(r["n"]),
                "mean_reward": r["got"] / r["n"] if r["n"] else None,
                "cum_rewards": int(n),
                "cum_regret": regret,
                "cum_regret_random": regret_rnd,
                "random_expected": r["rnd"] / r["n"] if r["n"] else None,
            }
        )
    return out


def pairs_to_dict(v: Any) -> Any:
    """A ClickHouse Map as the JSON of a result ([[k, v], ...]) as an object."""
    if isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        return {str(k): x for k, x in v}
    return v


def checkpoint_rows(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "metrics": pairs_to_dict(r.get("metrics"))} for r in rows_]


def ab_rows(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows_:
        hw = r.pop("half_width")
        ok = isinstance(hw, float) and math.isfinite(hw)
        r["low"] = r["mean_reward"] - hw if ok else None
        r["high"] = r["mean_reward"] + hw if ok else None
    return rows_


def timeline(store: Store, task_id: str, tenant: str | None) -> list[dict[str, Any]]:
    """Every stored event of one task, oldest first, each with ``kind`` and ``at``."""
    events: list[dict[str, Any]] = []
    # The id goes in last, after render_sql, so that no text of it is read as a placeholder.
    nonce = f"__task_{uuid.uuid4().hex}__"
    for kind, sql in TIMELINE.items():
        text = an.render_sql(sql.replace("{id}", nonce), tenant=tenant)
        res = store.query(text.replace(nonce, an.quote(task_id)))
        for r in json.loads(an.to_json(res)):
            if "components" in r:
                r["components"] = pairs_to_dict(r["components"])
            events.append({"kind": kind, "at": r.pop("occurred_at"), **r})
    order = {k: i for i, k in enumerate(TIMELINE)}
    events.sort(key=lambda e: (e["at"] or "", e.get("attempt") or 0, order[e["kind"]]))
    return events


def recent_tasks(store: Store, tenant: str, limit: int) -> list[dict[str, Any]]:
    return rows(store, RECENT_TASKS.replace("{limit}", str(int(limit))), tenant=tenant)
