"""Pure tests of the router's decisions (RouterCore on dicts, time passed in)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from stormline.schemas.models import (
    HealthStatus,
    PolicyKind,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.qtable import QCell, cell_key
from stormline.streams.router import NO_AGENT, RouterConfig, RouterCore
from stormline.streams.shards import Shard
from stormline.streams.strategies import StrategyConfig

T0 = 1_800_000_000.0
HC = HealthConfig(cooldown_s=10, probe_tasks=1, probe_successes=1)


def core(strategy: str = "thompson", **kw: object) -> RouterCore:
    d = Directory(health=HC)
    cfg = RouterConfig(
        strategy=StrategyConfig(name=strategy),
        health=HC,
        assignment_ttl_s=5,
        max_attempts=2,
        retry_s=1,
        **kw,  # type: ignore[arg-type]
    )
    return RouterCore(cfg, tasks={}, ledger={}, directory=d, rng=random.Random(3))


def task(tid: str, caps: list[str], **kw: object) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=tid,
        task_type="qa",
        prompt="p",
        required_capabilities=caps,
        occurred_at=datetime.fromtimestamp(T0, UTC),
        **kw,  # type: ignore[arg-type]
    )


def traj(a: TaskAssigned, status: TrajectoryStatus = TrajectoryStatus.OK) -> Trajectory:
    return Trajectory(
        task_id=a.task_id,
        trajectory_id=f"{a.task_id}-{a.attempt}",
        attempt=a.attempt,
        agent_id=a.agent_id,
        task_type="qa",
        status=status,
    )


def test_capabilities_must_cover_the_task() -> None:
    c = core()
    c.directory.heartbeat({"ab": ["a", "b"], "a": ["a"]}, [])
    for i in range(20):
        (out,) = c.on_task(task(f"t{i}", ["a", "b"]), T0)
        assert isinstance(out, TaskAssigned) and out.agent_id == "ab"
        assert out.task.task_id == f"t{i}" and out.attempt == 1 and out.strategy == "thompson"
    assert {c.on_task(task(f"u{i}", ["a"]), T0)[0].agent_id for i in range(30)} == {"a", "ab"}  # type: ignore[union-attr]


def test_down_agents_are_skipped_and_a_recovered_one_gets_one_probe() -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"], "y": ["a"]}, [])
    c.directory.health_changed("x", HealthStatus.DOWN, HealthStatus.HEALTHY, T0)
    assert {c.on_task(task(f"t{i}", ["a"]), T0)[0].agent_id for i in range(10)} == {"y"}  # type: ignore[union-attr]
    c.directory.health_changed("x", HealthStatus.DEGRADED, HealthStatus.DOWN, T0 + 1)
    got = [c.on_task(task(f"p{i}", ["a"]), T0 + 2)[0].agent_id for i in range(30)]  # type: ignore[union-attr]
    assert got.count("x") == 1 and c.counters["probes"] == 1


def test_expiry_reassigns_to_another_agent_then_fails_after_max_attempts() -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"], "y": ["a"]}, [])
    (a1,) = c.on_task(task("t", ["a"]), T0)
    assert c.on_tick("t", T0 + 4.9) == ([], [])  # not due yet
    out, outcomes = c.on_tick("t", T0 + 5)
    (a2,) = out
    assert isinstance(a2, TaskAssigned) and a2.attempt == 2 and a2.agent_id != a1.agent_id  # type: ignore[union-attr]
    assert outcomes[0].agent_id == a1.agent_id and not outcomes[0].ok  # type: ignore[union-attr]
    out, _ = c.on_tick("t", T0 + 10)
    tr, rw = out
    assert isinstance(tr, Trajectory) and tr.final and tr.status == TrajectoryStatus.ERROR
    assert tr.error == "attempt 2 expired; no result after 2 attempts"
    assert isinstance(rw, Reward) and rw.source == RewardSource.FAILURE and rw.value == 0
    assert c.on_tick("t", T0 + 11) == ([], [])  # done: nothing more until forgotten


def test_a_trajectory_for_the_current_attempt_stops_the_clock() -> None:
    c = core()
    c.directory.heartbeat({"x": ["a"]}, [])
    (a1,) = c.on_task(task("t", ["a"]), T0)
    assert c.on_trajectory(traj(a1), T0 + 1).outcomes[0].ok  # type: ignore[arg-type]
    assert c.on_tick("t", T0 + 100) == ([], [])
    assert c.tasks["t"]["state"] == "succeeded"


def test_no_capable_agent_waits_then_fails_with_the_reason() -> None:
    c = core()
    assert c.on_task(task("t", ["nobody"], deadline_ms=3000), T0) == []
    assert c.tasks["t"]["state"] == "waiting"
    assert c.on_tick("t", T0 + 1)[0] == []
    c.directory.heartbeat({"late": ["nobody"]}, [])
    (a,) = c.on_tick("t", T0 + 2)[0]
    assert a.agent_id == "late"  # type: ignore[union-attr]
    (tr, rw), _ = core().on_task(task("u", ["nobody"], deadline_ms=1000), T0 + 5), None
    assert tr.error == NO_AGENT and tr.final and rw.reason == NO_AGENT  # type: ignore[union-attr]


def test_duplicate_and_late_rewards_are_counted_once() -> None:
    c = core(strategy="epsilon_greedy")
    c.directory.heartbeat({"x": ["a"]}, [])
    (_a,) = c.on_task(task("t", ["a"]), T0)
    r = Reward(
        task_id="t",
        trajectory_id="tr",
        attempt=1,
        agent_id="x",
        task_type="qa",
        value=1,
        source=RewardSource.VERIFIER,
    )
    assert c.on_reward(r, T0 + 1)
    assert not c.on_reward(r.model_copy(update={"event_id": r.event_id}), T0 + 2)
    assert c.book.cell(cell_key("qa", "x")).count == 1
    # A FAILURE reward of the same attempt is that attempt's outcome too: counted already.
    failure = r.model_copy(update={"source": RewardSource.FAILURE, "trajectory_id": "z"})
    assert not c.on_reward(failure, T0)
    # A reward for a task the router never saw is applied once as well.
    r2 = r.model_copy(update={"task_id": "other"})
    assert c.on_reward(r2, T0) and not c.on_reward(r2, T0)
    assert c.counters["rewards_duplicate"] == 3


def test_policy_prior_stamps_checkpoint_kind_and_version() -> None:
    class Prefers:
        def score(self, task: TaskSubmitted, agents: object, caps: object) -> dict[str, float]:
            return {"y": 1.0}

    c = core(strategy="ucb1", policy_weight=1.0)
    c.directory.heartbeat({"x": ["a"], "y": ["a"]}, [])
    for agent in ("x", "y"):
        c.book.put(0, cell_key("qa", agent), Shard(QCell(value=0.5, count=5, pulls=5)))
    c.scorer, c.policy_version = Prefers(), "router@3"
    (a,) = c.on_task(task("t", ["a"]), T0)
    assert a.agent_id == "y" and a.policy == PolicyKind.CHECKPOINT  # type: ignore[union-attr]
    assert a.policy_version == "router@3"  # type: ignore[union-attr]


def test_priority_orders_a_batch_and_keeps_fifo_within_a_priority() -> None:
    from stormline.streams.router import by_priority

    batch = [(task(f"t{i}", [], priority=p), i) for i, p in enumerate([1, 9, 5, 9, 1, 5])]
    assert [i for _, i in by_priority(batch)] == [1, 3, 2, 5, 0, 4]


def test_a_checkpoint_that_cannot_be_loaded_leaves_the_qtable_in_charge(tmp_path: object) -> None:
    from stormline.schemas.models import CheckpointPublished
    from stormline.streams.policy import load_policy

    ev = CheckpointPublished(policy="router", version=1, uri=f"{tmp_path}/missing", sha256="0" * 64)
    assert load_policy(ev) is None
    assert load_policy(ev.model_copy(update={"promoted": False})) is None
