"""The console's logic without a browser: the router's estimates and circuit states, the
rates and lag from sampled offsets (pure), and the console's SQL (regret against a random
baseline, traffic share, A/B, a task's timeline) on real chDB over the sink's tables, checked
against the same figures computed here in Python."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from stormline.api.console import live, queries
from stormline.api.console.estimates import circuit, estimates, posterior
from stormline.consumers.sink.store import ParquetStore
from stormline.consumers.sink.tables import Origin, rows_of
from stormline.streams.qtable import QCell
from tests import sink_data

# ------------------------------------------------------------------------ estimates --


def test_binary_posterior_is_the_beta_thompson_samples_from() -> None:
    cell = QCell(successes=3, failures=1, count=4, pulls=5)
    mean, sd = posterior(cell)
    a, b = 4.0, 2.0  # Beta(1 + successes, 1 + failures)
    assert mean == pytest.approx(a / (a + b))
    assert sd == pytest.approx(math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))))


def test_graded_posterior_is_a_normal_that_narrows_with_rewards() -> None:
    cells = [QCell(binary=False), QCell(binary=False)]
    for r in (0.2, 0.4, 0.6):
        cells[0].update(r)
    for r in (0.2, 0.4, 0.6) * 10:
        cells[1].update(r)
    (m0, sd0), (m1, sd1) = posterior(cells[0]), posterior(cells[1])
    assert m0 == pytest.approx(0.4) and m1 == pytest.approx(0.4)
    assert sd1 < sd0
    assert posterior(QCell(binary=False)) == (0.5, pytest.approx(math.sqrt(0.25)))


def test_estimates_give_share_interval_and_clip_to_unit_range() -> None:
    sure = QCell(value=1.0, successes=200, count=200, pulls=300).to_dict()
    new = QCell(pulls=100).to_dict()
    rows = {(e.task_type, e.agent_id): e for e in estimates({"math": {"a": sure, "b": new}})}
    a, b = rows[("math", "a")], rows[("math", "b")]
    assert (a.share, b.share) == (0.75, 0.25)
    assert a.high == 1.0 and a.low > 0.97  # clipped at 1, narrow after 200 successes
    assert b.posterior_mean == 0.5 and b.low == pytest.approx(max(0, 0.5 - 1.96 * b.sd))
    assert a.value == 1.0 and a.rewards == 200 and a.assignments == 300
    assert estimates({"math": {"a": new | {"pulls": 0}}})[0].share is None


@pytest.mark.parametrize(
    ("status", "previous", "age_s", "want"),
    [
        ("healthy", "degraded", 0, "closed"),
        ("degraded", "healthy", 5, "open"),  # within the 30 s cool-down
        ("degraded", "healthy", 31, "half-open (probing)"),
        ("degraded", "down", 0, "half-open (probing)"),  # back from down: probe at once
        ("down", "healthy", 0, "open (no heartbeat)"),
        ("unknown", "", 0, "unknown"),
        ("bogus", "healthy", 0, "unknown"),
    ],
)
def test_circuit_state_follows_the_routers_breaker(
    status: str, previous: str, age_s: float, want: str
) -> None:
    now = 1_000_000.0
    assert circuit(status, previous, now - age_s, 30.0, now) == want


# -------------------------------------------------------------------- rates and lag --


def _sample(t: float, tasks: list[int], lag: dict[str, int] | None = None) -> live.Sample:
    rows = [{"group": g, "lag": n} for g, n in (lag or {}).items()]
    return live.Sample(t, {"p.tasks": tasks, "p.rewards": [0]}, {"p.tasks": [0, 0]}, rows)


def test_rates_over_the_window_and_per_pair_of_samples() -> None:
    samples = [
        _sample(0, [0, 0]),
        _sample(5, [10, 10]),
        _sample(10, [30, 20]),
        _sample(20, [30, 60]),
    ]
    now, series = live.rates(samples, window_s=15.0)
    # The oldest sample within 15 s of the last (t=5: 20 messages) to the last (t=20: 90).
    assert now["p.tasks"] == pytest.approx(70 / 15)
    assert [round(r["p.tasks"], 3) for _, r in series] == [4.0, 6.0, 4.0]
    assert [t for t, _ in series] == [5, 10, 20]
    assert live.rates(samples[:1]) == ({}, [])
    # A topic deleted and re-created (offsets go down) is never a negative rate.
    assert live.rates([_sample(0, [50, 0]), _sample(1, [0, 0])])[0]["p.tasks"] == 0


def test_group_totals_sum_lag_over_partitions() -> None:
    rows = [{"group": "r", "lag": 3}, {"group": "w", "lag": 0}, {"group": "r", "lag": 4}]
    assert live.group_totals(rows) == {"r": 7, "w": 0}


def test_pairs_from_a_clickhouse_map_become_an_object() -> None:
    assert queries.pairs_to_dict([["loss", 0.1], ["n", 3]]) == {"loss": 0.1, "n": 3}
    assert queries.pairs_to_dict({"a": 1}) == {"a": 1}
    assert queries.pairs_to_dict([1, 2]) == [1, 2]


# ------------------------------------------------------------ the SQL, on real chDB --


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[ParquetStore, sink_data.DataSet]:
    """The seeded data set as the sink would store it (same row mapping, real Parquet parts
    read by chDB), without a broker: the SQL is what is under test here."""
    ds = sink_data.make(n_tasks=40)
    store = ParquetStore(Path(tmp_path_factory.mktemp("console")) / "parts")
    by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, ev in enumerate(ds.events()):
        origin = Origin(f"t.{type(ev).__name__}", 0, i, 1_767_268_800_000 + i, None)
        for table, row in rows_of(origin, ev):
            by_table[table].append(row)
    for table, rows in by_table.items():
        store.insert(table, rows)
    return store, ds


def test_cumulative_regret_against_best_in_hindsight_and_a_random_router(
    loaded: tuple[ParquetStore, sink_data.DataSet],
) -> None:
    store, ds = loaded
    got = queries.cumulative_regret(queries.rows(store, queries.REGRET, bucket=60))
    arms: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ds.rewards:
        arms[r.task_type][r.agent_id].append(r.value)
    best = {t: max(statistics.fmean(v) for v in a.values()) for t, a in arms.items()}
    rnd = {t: statistics.fmean(statistics.fmean(v) for v in a.values()) for t, a in arms.items()}
    want_regret = sum(best[r.task_type] - r.value for r in ds.rewards)
    want_random = sum(best[r.task_type] - rnd[r.task_type] for r in ds.rewards)
    last = got[-1]
    assert last["cum_rewards"] == len(ds.rewards)
    assert last["cum_regret"] == pytest.approx(want_regret)
    assert last["cum_regret_random"] == pytest.approx(want_random)
    assert sum(b["n"] for b in got) == len(ds.rewards)
    # Running totals: each bucket adds its own rewards' regret.
    buckets: dict[str, float] = defaultdict(float)
    for r in ds.rewards:
        at = r.occurred_at.replace(second=0, microsecond=0)
        buckets[at.isoformat()] += best[r.task_type] - r.value
    running = 0.0
    for b in got:
        running += buckets[datetime.fromisoformat(b["bucket"]).isoformat()]
        assert b["cum_regret"] == pytest.approx(running)


def test_traffic_share_per_task_type_sums_to_one_per_bucket(
    loaded: tuple[ParquetStore, sink_data.DataSet],
) -> None:
    store, ds = loaded
    series = queries.share_series(queries.rows(store, queries.SHARE, bucket=300))
    per_bucket: dict[tuple[str, str], float] = defaultdict(float)
    for s in series:
        for bucket, share in s["points"]:
            per_bucket[(s["task_type"], bucket)] += share
    assert per_bucket and all(v == pytest.approx(1.0) for v in per_bucket.values())
    agents = {(a.task.task_type, a.agent_id) for a in ds.assignments}
    assert {(s["task_type"], s["agent_id"]) for s in series} == agents


def test_ab_by_policy_version_counts_every_reward(
    loaded: tuple[ParquetStore, sink_data.DataSet],
) -> None:
    store, ds = loaded
    ab = {(r["policy"], r["strategy"]): r for r in queries.ab_rows(queries.rows(store, queries.AB))}
    strategy = {(a.task_id, a.attempt): a.strategy for a in ds.assignments}
    arms: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ds.rewards:
        arms[(str(r.policy_version), strategy[(r.task_id, r.attempt)])].append(r.value)
    assert set(ab) == set(arms) and len(arms) == 4  # two versions x two strategies
    for arm, values in arms.items():
        row = ab[arm]
        assert row["n"] == len(values)
        assert row["mean_reward"] == pytest.approx(statistics.fmean(values))
        hw = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
        assert (row["low"], row["high"]) == (
            pytest.approx(row["mean_reward"] - hw),
            pytest.approx(row["mean_reward"] + hw),
        )


def test_a_tasks_timeline_in_order_with_every_attempt(
    loaded: tuple[ParquetStore, sink_data.DataSet],
) -> None:
    store, _ = loaded
    events = queries.timeline(store, "task-0", tenant="acme")  # task 0 is acme's, 2 attempts
    kinds = [(e["kind"], e.get("attempt")) for e in events]
    assert kinds == [
        ("submitted", None),
        ("assigned", 1),  # at +1 s
        ("assigned", 2),  # at +2 s: attempt 1's result (+3 s) came after its expiry
        ("trajectory", 1),
        ("reward", 1),  # +4 s, before attempt 2's trajectory at the same time
        ("trajectory", 2),
        ("reward", 2),
    ]
    assert events[0]["prompt"] == "question 0" and events[3]["status"] == "error"
    assert isinstance(events[4]["components"], dict)
    assert queries.timeline(store, "task-0", tenant="default") == []  # not that tenant's
    assert queries.timeline(store, "x' OR 1=1 --", tenant="acme") == []


def test_share_is_zero_in_a_bucket_where_an_agent_got_none() -> None:
    rows = [
        {"bucket": "b1", "task_type": "math", "agent_id": "a", "n": 3},
        {"bucket": "b1", "task_type": "math", "agent_id": "b", "n": 1},
        {"bucket": "b2", "task_type": "math", "agent_id": "a", "n": 2},
        {"bucket": "b2", "task_type": "sort", "agent_id": "b", "n": 5},
    ]
    got = {(s["task_type"], s["agent_id"]): s["points"] for s in queries.share_series(rows)}
    assert got == {
        ("math", "a"): [["b1", 0.75], ["b2", 1.0]],
        ("math", "b"): [["b1", 0.25], ["b2", 0.0]],  # not a gap the chart draws across
        ("sort", "b"): [["b2", 1.0]],
    }
