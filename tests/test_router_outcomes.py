"""Pure tests of the router's outcome accounting and task lifecycle (issue 14, findings 1, 4, 7).

RouterCore on dicts with time passed in: what an agent's errors, a worker's timeout, the
router's expiry and a human reward do to the Q-table, and that an attempt always means the
same agent.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime

import pytest

from stormline.schemas.lifecycle import TaskState
from stormline.schemas.models import (
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
    stable_event_id,
)
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.qtable import cell_key
from stormline.streams.router import ROUTER_AGENT, RouterConfig, RouterCore
from stormline.streams.strategies import StrategyConfig

T0 = 1_800_000_000.0
HC = HealthConfig(cooldown_s=10, probe_tasks=1, probe_successes=1)


def core(strategy: str = "thompson", seed: int = 0, **kw: object) -> RouterCore:
    cfg = RouterConfig(
        strategy=StrategyConfig(name=strategy),
        health=HC,
        assignment_ttl_s=5,
        max_attempts=3,
        retry_s=1,
        seed=seed,
        **kw,  # type: ignore[arg-type]
    )
    return RouterCore(cfg, tasks={}, ledger={}, directory=Directory(health=HC))


def task(tid: str, caps: list[str] | None = None) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=tid,
        task_type="qa",
        prompt="p",
        required_capabilities=caps or ["a"],
        occurred_at=datetime.fromtimestamp(T0, UTC),
    )


def traj(a: TaskAssigned, status: TrajectoryStatus = TrajectoryStatus.OK) -> Trajectory:
    return Trajectory(
        task_id=a.task_id,
        trajectory_id=f"{a.task_id}-{a.attempt}",
        attempt=a.attempt,
        agent_id=a.agent_id,
        task_type="qa",
        status=status,
        error=None if status == TrajectoryStatus.OK else status.value,
    )


def reward(a: TaskAssigned, value: float, source: RewardSource = RewardSource.VERIFIER) -> Reward:
    return Reward(
        task_id=a.task_id,
        trajectory_id=f"{a.task_id}-{a.attempt}",
        attempt=a.attempt,
        agent_id=a.agent_id,
        task_type="qa",
        value=value,
        source=source,
    )


def assign(c: RouterCore, t: TaskSubmitted, now: float = T0) -> TaskAssigned:
    (a,) = c.on_task(t, now)
    assert isinstance(a, TaskAssigned)
    return a


# ------------------------------------------------------------------ finding 1 --
def test_a_flaky_agent_looks_as_bad_as_it_is() -> None:
    """The issue's run: errors on 50% of calls (perfect otherwise) vs a steady 80% agent.

    Before: FAILURE rewards were ignored, the flaky agent's Q stayed 1.0 and it got 1,997 of
    2,000 tasks. Its true success rate is 0.5, so the steady agent must win.
    """
    c = core()
    c.directory.heartbeat({"flaky": ["a"], "steady": ["a"]}, [])
    rng = random.Random(11)
    got: list[str] = []
    for i in range(2000):
        a = assign(c, task(f"t{i}"))
        got.append(a.agent_id)
        if a.agent_id == "flaky" and rng.random() < 0.5:
            c.on_trajectory(traj(a, TrajectoryStatus.ERROR), T0)
            c.on_reward(reward(a, 0.0, RewardSource.FAILURE), T0)  # what the evaluator sends
        else:
            ok = a.agent_id == "flaky" or rng.random() < 0.8
            c.on_trajectory(traj(a), T0)
            c.on_reward(reward(a, float(ok)), T0)
    assert got[-1000:].count("steady") >= 900, got[-1000:].count("steady")
    flaky = c.book.cell(cell_key("qa", "flaky"))
    assert flaky.failures > 0 and flaky.mean < 0.7


def test_an_error_counts_the_failure_value_setting() -> None:
    c = core(failure_value=-0.5)
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    assert c.on_reward(reward(a, 0.0, RewardSource.FAILURE), T0)
    cell = c.book.cell(cell_key("qa", "x"))
    assert cell.count == 1 and cell.total == -0.5


def test_an_expired_attempt_counts_against_its_agent_once() -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    out, outcomes = c.on_tick("t", T0 + 5)
    assert [o.ok for o in outcomes] == [False]
    (a2,) = out
    assert isinstance(a2, TaskAssigned) and a2.attempt == 2
    cell = c.book.cell(cell_key("qa", "x"))
    assert (cell.count, cell.failures) == (1, 1)
    # The late real result of attempt 1 replaces the router's guess (count stays 1).
    assert c.on_reward(reward(a, 1.0), T0 + 6)
    cell = c.book.cell(cell_key("qa", "x"))
    assert (cell.count, cell.successes, cell.failures) == (1, 1, 0)
    assert not c.on_reward(reward(a, 1.0), T0 + 7)


# ------------------------------------------------------ expiry is the router's --
def test_a_worker_timeout_does_not_end_the_task_nor_blame_the_agent() -> None:
    """The kill-schedule failure: a worker answers TIMEOUT ("assignment expired before it
    started") for an attempt the router has not expired. Before, the task ended failed after
    one attempt; now the router's clock decides, and reassigns."""
    c = core()
    c.directory.heartbeat({"x": ["a"], "y": ["a"]}, [])
    a = assign(c, task("t"))
    assert c.on_trajectory(traj(a, TrajectoryStatus.TIMEOUT), T0 + 1) == ([], [])
    assert not c.on_reward(reward(a, 0.0, RewardSource.TIMEOUT), T0 + 1)
    assert c.tasks["t"]["state"] == TaskState.ASSIGNED
    assert c.book.cell(cell_key("qa", a.agent_id)).count == 0
    seen = [a]
    for k in range(1, 3):  # every expiry is reassigned until the attempts run out
        (nxt,), _ = c.on_tick("t", T0 + 5 * k)
        assert isinstance(nxt, TaskAssigned) and nxt.attempt == k + 1
        seen.append(nxt)
    out, _ = c.on_tick("t", T0 + 15)
    tr, rw = out
    assert isinstance(tr, Trajectory) and tr.final and tr.agent_id == ROUTER_AGENT
    assert isinstance(rw, Reward) and rw.agent_id == ROUTER_AGENT
    assert rw.event_id == stable_event_id("reward", tr.trajectory_id, "failure")
    assert c.tasks["t"]["state"] == TaskState.FAILED
    counted = sum(cell.count for cell in c.book.pairs().values())
    assert counted == 3  # one expiry per attempt; the router's own reward counts for nobody
    assert not c.on_reward(rw, T0 + 16)


def test_illegal_transitions_are_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    c.on_trajectory(traj(a), T0 + 1)
    assert c.tasks["t"]["state"] == TaskState.SUCCEEDED
    rec = dict(c.tasks["t"])
    with caplog.at_level(logging.WARNING, "stormline.router"):
        assert not c._move("t", rec, TaskState.FAILED)
    assert rec["state"] == TaskState.SUCCEEDED and c.counters["illegal_transitions"] == 1
    assert "succeeded -> failed is not allowed" in caplog.text


def test_moves_follow_the_lifecycle() -> None:
    c = core()
    c.keep_moves = True
    c.directory.heartbeat({"x": ["a"]}, [])
    assert c.on_task(task("w", ["b"]), T0) == []
    assert c.tasks["w"]["state"] == TaskState.WAITING
    a = assign(c, task("t"))
    c.on_trajectory(traj(a), T0 + 1)
    assert c.tasks["t"]["state"] == TaskState.SUCCEEDED
    assert c.moves == [
        ("w", TaskState.WAITING, 1),
        ("t", TaskState.ASSIGNED, 1),
        ("t", TaskState.SUCCEEDED, 1),
    ]
    assert a.event_id == stable_event_id("assignment", "t", 1)


def test_an_error_is_reassigned_until_the_attempts_run_out() -> None:
    """An agent's error is its outcome, not the task's: another agent gets the next attempt,
    and only after ``max_attempts`` does the router fail the task, naming the last error."""
    c = core()
    c.keep_moves = True
    c.directory.heartbeat({"x": ["a"], "y": ["a"], "z": ["a"]}, [])
    a = assign(c, task("t"))
    tried = [a.agent_id]
    for n in (2, 3):
        (nxt,), outcomes = c.on_trajectory(traj(a, TrajectoryStatus.ERROR), T0 + n)
        assert [o.ok for o in outcomes] == [False]
        assert isinstance(nxt, TaskAssigned) and nxt.attempt == n
        assert nxt.agent_id not in tried  # an agent not tried yet first
        tried.append(nxt.agent_id)
        a = nxt
    (tr, rw), _ = c.on_trajectory(traj(a, TrajectoryStatus.ERROR), T0 + 4)
    assert isinstance(tr, Trajectory) and tr.final and tr.agent_id == ROUTER_AGENT
    assert tr.error == "attempt 3 failed: error; no result after 3 attempts"
    assert isinstance(rw, Reward) and rw.source == RewardSource.FAILURE
    assert c.tasks["t"]["state"] == TaskState.FAILED
    assert [m[1:] for m in c.moves if m[0] == "t"] == [
        (TaskState.ASSIGNED, 1),
        (TaskState.ASSIGNED, 2),
        (TaskState.ASSIGNED, 3),
        (TaskState.FAILED, 3),
    ]


# ------------------------------------------------------------------ finding 4 --
def test_a_human_reward_replaces_the_automatic_one_exactly_once() -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    assert c.on_reward(reward(a, 1.0), T0)
    human = reward(a, 0.0, RewardSource.HUMAN).model_copy(update={"attempt": 0})
    assert c.on_reward(human, T0 + 1)  # found by its trajectory id, attempt unknown
    cell = c.book.cell(cell_key("qa", "x"))
    assert (cell.count, cell.successes, cell.failures, cell.total) == (1, 0, 1, 0.0)
    assert not c.on_reward(human, T0 + 2)
    assert not c.on_reward(reward(a, 1.0), T0 + 3)  # a redelivered automatic one
    # Human first, automatic later: the automatic one never counts.
    b = assign(c, task("u"))
    assert c.on_reward(reward(b, 0.5, RewardSource.HUMAN), T0)
    assert not c.on_reward(reward(b, 1.0), T0 + 1)
    cell = c.book.cell(cell_key("qa", "x"))
    assert (cell.count, cell.total) == (2, 0.5)


# ------------------------------------------------------------------ finding 7 --
def test_an_attempt_means_the_same_agent_whatever_was_decided_before() -> None:
    """A router that redoes an attempt after kill -9 (its record lost) picks the same agent.

    Before, one RNG shared by all decisions made the redo depend on every decision since the
    process started; now each decision's RNG is a function of (seed, task id, attempt).
    """
    agents = {f"ag{i}": ["a"] for i in range(5)}
    first = core("random")
    first.directory.heartbeat(agents, [])
    before = {f"t{i}": assign(first, task(f"t{i}")).agent_id for i in range(50)}
    restarted = core("random")  # a fresh process: another history of decisions
    restarted.directory.heartbeat(agents, [])
    for i in range(7):
        assign(restarted, task(f"other{i}"))
    redone = {tid: assign(restarted, task(tid)).agent_id for tid in reversed(list(before))}
    assert redone == before
    assert len(set(before.values())) > 1  # still a random choice across tasks


# ------------------------------------------------------------------ finding 2 --
def test_a_reward_redelivered_after_the_done_retention_counts_once() -> None:
    """Before, the record (and with it the dedup) was deleted ``done_retention_s`` after the
    task ended, and a reward redelivered later (a worker re-sending its recorded trajectory,
    a replayed topic) counted again. Now the task's ledger stays for the rewards topic's
    retention, apart from the record (which goes after the done retention)."""
    c = core(done_retention_s=10, ledger_retention_s=1000)
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    c.on_trajectory(traj(a), T0 + 1)
    assert c.on_reward(reward(a, 1.0), T0 + 1)
    assert c.on_tick("t", T0 + 12) == ([], [])  # past the done retention
    assert "t" not in c.tasks and "t" in c.ledger
    assert not c.on_reward(reward(a, 1.0), T0 + 500)  # redelivered: still a duplicate
    assert c.on_task(task("t"), T0 + 500) == []  # a replayed task is not routed again
    human = reward(a, 0.0, RewardSource.HUMAN)
    assert c.on_reward(human, T0 + 600)  # a human correction still replaces it, once
    assert c.book.cell(cell_key("qa", "x")).count == 1
    # Past the rewards topic's retention after its last change: the sweep forgets it.
    assert c.outcomes.expired(c.ledger.items(), T0 + 1500) == []
    assert c.outcomes.expired(c.ledger.items(), T0 + 1601) == [(0, "t")]


def test_a_task_finished_without_an_outcome_is_remembered_too() -> None:
    """A task that failed for want of an agent has no counted outcome; its ledger entry is
    written when the record goes, so a replay of the topic does not route it again."""
    c = core(done_retention_s=10)
    c.on_task(task("t", ["nobody"]).model_copy(update={"deadline_ms": 1000}), T0)
    c.on_tick("t", T0 + 2)
    assert c.tasks["t"]["state"] == TaskState.FAILED
    c.on_tick("t", T0 + 13)
    assert "t" not in c.tasks and c.ledger["t"]["a"] == {}
    assert c.on_task(task("t", ["nobody"]), T0 + 14) == []


# ------------------------------------------------------- counted exactly once --
def test_a_kill_between_the_shard_and_the_ledger_write_counts_once() -> None:
    """The shard is written before the ledger entry that records its outcome. A kill between
    the two loses the entry; the reward comes again (its offset was not committed), finds no
    entry, and must not be counted again: the shard remembers it."""
    c = core()
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, task("t"))
    assert c.on_reward(reward(a, 1.0), T0)
    stored = {k: v for k, v in c.ledger.items() if k != "t"}  # what reached the changelog
    restarted = core()
    restarted.ledger.update(stored)
    restarted.tasks.update(c.tasks)
    restarted.book.own(0, restarted.outcomes.load_partition(0))
    assert restarted.book.cell(cell_key("qa", "x")).count == 1
    assert restarted.on_reward(reward(a, 1.0), T0 + 1)  # the entry is written now ...
    assert restarted.book.cell(cell_key("qa", "x")).count == 1  # ... but not counted again
    assert restarted.counters["rewards_recovered"] == 1
    assert not restarted.on_reward(reward(a, 1.0), T0 + 2)


# ------------------------------------------------------------- cost-aware routing --
def test_with_a_cost_weight_the_cheaper_of_two_equal_agents_wins() -> None:
    """Both agents are right 80% of the time; one costs ten times the other. Without a cost
    weight the choice between them is a coin (Thompson settles on either, seed by seed);
    with lambda = 5 an outcome counts reward - 5 * cost, and the cheap agent wins every time."""

    def cheap_share(weight: float, seed: int) -> float:
        c = core(cost_weight=weight, seed=seed)
        c.directory.heartbeat({"cheap": ["a"], "dear": ["a"]}, [])
        rng = random.Random(seed)
        got = []
        for i in range(1500):
            a = assign(c, task(f"t{i}"))
            got.append(a.agent_id)
            cost = 0.01 if a.agent_id == "cheap" else 0.1
            r = reward(a, float(rng.random() < 0.8))
            c.on_reward(r.model_copy(update={"components": {"cost_usd": cost}}), T0)
        return got[-500:].count("cheap") / 500

    seeds = range(1, 6)
    assert min(cheap_share(0.0, s) for s in seeds) < 0.7
    assert min(cheap_share(5.0, s) for s in seeds) >= 0.9


def test_batched_ledger_writes_put_shards_first_and_survive_a_kill_between() -> None:
    """The app writes the ledger once per batch: shards (one per changed pair) before the
    task entries. Killed after the shards and half the entries reached the changelog, the
    batch is processed again: each reward counts once."""
    c = core()
    c.outcomes.buffered = True
    c.directory.heartbeat({"x": ["a"]}, [])
    firsts = [assign(c, task(f"t{i}")) for i in range(6)]
    for a in firsts:
        assert c.on_reward(reward(a, 1.0), T0)
    writes = c.outcomes.take_writes()
    keys = [k for k, _ in writes]
    shards = [i for i, k in enumerate(keys) if k.startswith("\x00")]
    entries = [i for i, k in enumerate(keys) if not k.startswith("\x00")]
    assert max(shards) < min(entries) and len(entries) == 6
    assert sum(1 for k in keys if k.startswith("\x000\x1f")) == 1  # one write for the pair
    durable = dict(writes[: max(shards) + 1 + 3])  # a kill after three of six entries
    again = core()
    again.outcomes.buffered = True
    again.ledger.update(durable)
    again.tasks.update(c.tasks)
    again.book.own(0, again.outcomes.load_partition(0))
    for a in firsts:
        again.on_reward(reward(a, 1.0), T0 + 1)
    assert again.book.cell(cell_key("qa", "x")).count == 6
    assert again.counters["rewards_recovered"] == 3 and again.counters["rewards_duplicate"] == 3
    again.ledger.update(dict(again.outcomes.take_writes()))
    assert all(f"t{i}" in again.ledger for i in range(6))
