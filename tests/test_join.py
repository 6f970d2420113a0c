"""Pure logic of the trainer: the join, its persistence, features, the gate, helpers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from stormline.schemas.models import (
    AgentHeartbeat,
    PolicyKind,
    RewardSource,
    Step,
    TaskSubmitted,
    WorkerStatus,
)
from stormline.trainer import state as state_io
from stormline.trainer.checkpoints import gate
from stormline.trainer.join import Experience, Joiner, SourceRef, propensity_of
from stormline.trainer.policy import PolicyConfig, RouterNet, Scorer, encode_experiences, task_keys
from stormline.trainer.replay import ReplayError, parse_offsets
from stormline.trainer.update import split_holdout, trained_on
from tests.trainer_events import assignment, reward, trajectory, world

T, R, A = "trajectories", "rewards", "assignments"


def ref(topic: str, offset: int, partition: int = 0) -> SourceRef:
    return SourceRef(topic=topic, partition=partition, offset=offset)


def test_trajectory_then_reward_joins_with_both_sources() -> None:
    j = Joiner()
    assert j.add_trajectory(trajectory(1, "a", "math", "solve x"), ref(T, 5), 1000) == []
    [e] = j.add_reward(reward(1, "a", 0.75), ref(R, 9, 2), 2000)
    assert (e.trajectory_id, e.agent_id, e.reward, e.task_type) == ("traj-1", "a", 0.75, "math")
    assert e.task_text == "solve x"  # no assignment: the first user step
    assert e.trajectory_ref == ref(T, 5) and e.reward_ref == ref(R, 9, 2)
    assert (e.trajectory_at_ms, e.reward_at_ms) == (1000, 2000)
    assert j.pending == 0 and j.stats.joined == 1


def test_reward_before_trajectory_joins() -> None:
    j = Joiner()
    assert j.add_reward(reward(1, "a", 1.0), ref(R, 0), 1000) == []
    [e] = j.add_trajectory(trajectory(1, "a", "code", "fix bug"), ref(T, 0), 1500)
    assert e.reward == 1.0 and e.task_type == "code"


def test_late_reward_within_the_wait_still_joins() -> None:
    j = Joiner(max_wait_ms=3_600_000)
    j.add_trajectory(trajectory(1, "a", "math", "x"), ref(T, 0), 0)
    for i in range(2, 200):  # lots of other traffic in between, 50 minutes of event time
        j.add_trajectory(trajectory(i, "b", "code", "y"), ref(T, i), i * 15_000)
        j.add_reward(reward(i, "b", 0.0), ref(R, i), i * 15_000)
        assert j.evict() == []
    [e] = j.add_reward(reward(1, "a", 0.5), ref(R, 999), 3_000_000)
    assert e.trajectory_id == "traj-1" and e.reward == 0.5


def test_duplicate_rewards_first_wins_before_and_after_the_join() -> None:
    j = Joiner()
    j.add_reward(reward(1, "a", 0.9), ref(R, 0), 0)
    assert j.add_reward(reward(1, "a", 0.1), ref(R, 1), 1) == []  # duplicate while pending
    [e] = j.add_trajectory(trajectory(1, "a", "math", "x"), ref(T, 0), 2)
    assert e.reward == 0.9 and e.reward_ref.offset == 0
    assert j.add_reward(reward(1, "a", 0.3), ref(R, 2), 3) == []  # duplicate after the join
    assert j.add_trajectory(trajectory(1, "a", "math", "x"), ref(T, 1), 4) == []
    assert j.stats.duplicate_rewards == 2 and j.stats.duplicate_trajectories == 1
    assert j.stats.joined == 1 and j.pending == 0


def test_expired_entries_are_evicted_and_reported() -> None:
    j = Joiner(max_wait_ms=1000)
    j.add_trajectory(trajectory(1, "a", "math", "x"), ref(T, 7), 0)
    j.add_reward(reward(2, "a", 1.0), ref(R, 8), 500)
    j.add_trajectory(trajectory(3, "a", "math", "x"), ref(T, 9), 1800)  # clock -> 1800
    ev = j.evict()
    assert [(e.trajectory_id, e.side, e.reason, e.ref.offset) for e in ev] == [
        ("traj-1", "trajectory", "expired", 7),
        ("traj-2", "reward", "expired", 8),
    ]
    assert j.pending == 1 and j.stats.evicted_expired == 2
    assert j.add_reward(reward(1, "a", 1.0), ref(R, 10), 1900) == []  # too late: pending again


def test_overflow_evicts_the_oldest_across_sides() -> None:
    j = Joiner(max_entries=3)
    j.add_reward(reward(1, "a", 1.0), ref(R, 0), 10)
    j.add_trajectory(trajectory(2, "a", "m", "x"), ref(T, 0), 20)
    j.add_trajectory(trajectory(3, "a", "m", "x"), ref(T, 1), 30)
    j.add_reward(reward(4, "a", 1.0), ref(R, 1), 40)
    ev = j.evict()
    assert [(e.trajectory_id, e.side, e.reason) for e in ev] == [("traj-1", "reward", "overflow")]
    assert j.pending == 3 and j.stats.evicted_overflow == 1


def test_assignment_and_heartbeat_give_context_and_propensity() -> None:
    j = Joiner()
    j.add_heartbeat(
        AgentHeartbeat(
            worker_id="w1",
            agent_ids=["a"],
            capabilities={"a": ["math", "text"]},
            status=WorkerStatus.RUNNING,
        )
    )
    j.add_assignment(assignment(1, "a", "math", "integral of x", PolicyKind.EXPLORE), ref(A, 3), 0)
    j.add_trajectory(trajectory(1, "a", "", "ignored: the assignment has the task"), ref(T, 0), 1)
    [e] = j.add_reward(reward(1, "a", 1.0), ref(R, 0), 2)
    assert e.task_text == "integral of x" and e.task_type == "math"
    assert e.required_capabilities == ["text"] and e.agent_capabilities == ["math", "text"]
    assert e.assignment_policy == "explore" and e.epsilon == 0.2 and e.assignment_score == 0.5
    assert e.propensity == pytest.approx(0.2) and e.assignment_ref == ref(A, 3)
    assert propensity_of("qtable", 0.1) == pytest.approx(0.9)
    assert propensity_of("baseline", 0.1) is None and propensity_of("qtable", None) is None


def test_a_joined_pair_waits_for_its_late_assignment() -> None:
    j = Joiner(assignment_wait_ms=1000)
    j.add_trajectory(trajectory(1, "a", "math", "x"), ref(T, 0), 0)
    assert j.add_reward(reward(1, "a", 1.0), ref(R, 0), 10) == []  # waits for the assignment
    assert j.add_reward(reward(1, "a", 0.0), ref(R, 1), 20) == []  # still a duplicate
    [e] = j.add_assignment(assignment(1, "a", "math", "solve", PolicyKind.QTABLE), ref(A, 0), 30)
    assert e.propensity == pytest.approx(0.8) and e.reward == 1.0 and e.task_text == "solve"
    j.add_trajectory(trajectory(2, "a", "math", "y"), ref(T, 1), 100)
    assert j.add_reward(reward(2, "a", 0.5), ref(R, 2), 100) == []
    assert j.release() == [] and j.pending == 1
    j.add_trajectory(trajectory(3, "b", "code", "z"), ref(T, 2), 1200)  # clock passes the wait
    [late] = j.release()
    assert late.trajectory_id == "traj-2" and late.propensity is None and late.task_text == "y"
    j.add_reward(reward(3, "b", 0.5), ref(R, 3), 1200)
    back = Joiner(assignment_wait_ms=1000)
    back.load_dict(j.to_dict())
    assert [e.trajectory_id for e in back.release(force=True)] == ["traj-3"]


def test_steps_with_token_ids_are_kept_for_a_token_level_learner() -> None:
    j = Joiner(keep_steps=True)
    t = trajectory(1, "a", "m", "x")
    t.steps.append(Step(role="assistant", content="y", token_ids=[1, 2], logprobs=[-0.1, -0.2]))
    j.add_trajectory(t, ref(T, 0), 0)
    [e] = j.add_reward(reward(1, "a", 1.0), ref(R, 0), 1)
    assert e.steps[-1].token_ids == [1, 2] and e.steps[-1].logprobs == [-0.1, -0.2]
    j2 = Joiner()  # default: steps dropped, the router learner needs no transcript
    j2.add_trajectory(t, ref(T, 0), 0)
    assert j2.add_reward(reward(1, "a", 1.0), ref(R, 0), 1)[0].steps == []


def test_state_file_round_trip_resumes_the_join(tmp_path: Path) -> None:
    j = Joiner()
    j.add_trajectory(trajectory(1, "a", "m", "x"), ref(T, 0), 5)
    j.add_reward(reward(2, "b", 0.5), ref(R, 0), 6)
    [done] = j.add_trajectory(trajectory(2, "b", "m", "x"), ref(T, 1), 7)
    st = state_io.TrainerState(j, buffer=[done])
    st.advance(T, 0, 1)
    st.advance(R, 0, 0)
    path = tmp_path / "s.json"
    state_io.save(path, st)
    back = state_io.load(path, Joiner())
    assert back.positions == {(T, 0): 2, (R, 0): 1}
    assert back.applied(T, 0, 1) and not back.applied(T, 0, 2)
    assert [e.trajectory_id for e in back.buffer] == ["traj-2"]
    assert back.joiner.clock_ms == 7 and back.joiner.stats.joined == 1
    [e] = back.joiner.add_reward(reward(1, "a", 1.0), ref(R, 1), 8)
    assert e.trajectory_ref == ref(T, 0)
    assert back.joiner.add_reward(reward(2, "b", 0.1), ref(R, 2), 9) == []  # still a duplicate
    path.write_text("{broken")
    with pytest.raises(RuntimeError, match="move it aside"):
        state_io.load(path, Joiner())


def test_gate_promotes_within_margin_and_records_why() -> None:
    assert gate(0.5, None, 0.01).promoted
    assert gate(0.105, 0.1, 0.01).promoted
    d = gate(0.2, 0.1, 0.01)
    assert not d.promoted and "rejected" in d.reason and "0.2000" in d.reason


def test_holdout_is_the_newest_and_trained_on_spans_offsets() -> None:
    j = Joiner()
    exps = []
    for i, (_, t, r) in enumerate(world(10)):
        j.add_trajectory(t, ref(T, 100 + i, i % 2), i)
        exps += j.add_reward(r, ref(R, 50 + i), 1000 + i)
    train, held = split_holdout(exps, 0.2)
    assert [e.trajectory_id for e in held] == ["traj-8", "traj-9"] and len(train) == 8
    spans = {(r.topic, r.partition): (r.start_offset, r.end_offset) for r in trained_on(train)}
    assert spans == {(T, 0): (100, 107), (T, 1): (101, 108), (R, 0): (50, 58)}


def test_features_are_stable_and_an_unseen_type_shares_words() -> None:
    cfg = PolicyConfig(buckets=1024)
    keys = task_keys("Solve the integral", "math-calculus", ["text"])
    assert "tpart:math" in keys and "w:integral" in keys and "b:the_integral" in keys
    exps = []
    j = Joiner()
    for i, (_, t, r) in enumerate(world(5)):
        j.add_trajectory(t, ref(T, i), i)
        exps += j.add_reward(r, ref(R, i), i)
    a, b = encode_experiences(cfg, exps), encode_experiences(cfg, exps)
    assert (a.task == b.task).all() and a.task.shape == (5, cfg.max_task_features)
    assert a.weight.mean() == pytest.approx(1.0)
    torch.manual_seed(0)
    scorer = Scorer(RouterNet(cfg))
    task = TaskSubmitted(task_id="t", task_type="never-seen", prompt="solve this integral")
    s = scorer.score(task, ["agent-a", "agent-b"], {"agent-a": ["math"]})
    assert set(s) == {"agent-a", "agent-b"} and all(isinstance(v, float) for v in s.values())
    assert scorer.score(task, [], {}) == {}


def test_offset_specs() -> None:
    assert parse_offsets("5", "rewards", 3) == {0: 5, 1: 5, 2: 5}
    assert parse_offsets("0=1,rewards:2=7,trajectories:1=9", "rewards", 3) == {0: 1, 2: 7}
    assert parse_offsets(None, "rewards", 3) == {}
    with pytest.raises(ReplayError, match="no partition 4"):
        parse_offsets("4=1", "rewards", 3)
    with pytest.raises(ReplayError, match="P=N"):
        parse_offsets("abc", "rewards", 3)


# ------------------------------------------------- human feedback over automatic rewards --
HUMAN_ORDERS = list(itertools.permutations(["trajectory", "auto", "human"]))


def _feed(j: Joiner, order: list[str], offset: int = 0) -> list[Experience]:
    t = trajectory(1, "a", "math", "x")
    events = {
        "trajectory": lambda at: j.add_trajectory(t, ref(T, offset), at),
        "auto": lambda at: j.add_reward(reward(1, "a", 0.0), ref(R, offset), at),
        "human": lambda at: j.add_reward(
            reward(1, "a", 1.0, source=RewardSource.HUMAN), ref(R, offset + 1), at
        ),
        "assignment": lambda at: j.add_assignment(
            assignment(1, "a", "math", "x", PolicyKind.QTABLE), ref(A, offset), at
        ),
    }
    out: list[Experience] = []
    for n, name in enumerate(order):
        out += events[name](10 * n + offset)
    return out


def _buffered(exps: list[Experience]) -> dict[str, Experience]:
    """What the service's buffer keeps: a human correction replaces its trajectory's entry."""
    buf: dict[str, Experience] = {}
    for e in exps:
        if e.reward_source == "human" or e.trajectory_id not in buf:
            buf[e.trajectory_id] = e
    return buf


@pytest.mark.parametrize("order", HUMAN_ORDERS, ids="-".join)
def test_a_human_reward_wins_over_the_automatic_one_in_any_order(order: tuple[str, ...]) -> None:
    j = Joiner()
    exps = _feed(j, list(order))
    humans = [e for e in exps if e.reward_source == "human"]
    assert len(humans) == 1 and humans[0].reward == 1.0 and humans[0].task_type == "math"
    assert humans[0].reward_ref == ref(R, 1)
    assert _buffered(exps)["traj-1"].reward == 1.0
    # A redelivered human reward, or the automatic one again, changes nothing after that.
    assert _feed(j, ["human", "auto", "trajectory"], offset=100) == []
    assert j.pending == 0 and j.stats.joined == 1
    # The state file keeps the decision across a restart.
    back = Joiner()
    back.load_dict(j.to_dict())
    assert back.add_reward(reward(1, "a", 1.0, source=RewardSource.HUMAN), ref(R, 9), 99) == []


@pytest.mark.parametrize("order", HUMAN_ORDERS, ids="-".join)
def test_a_human_reward_wins_while_the_pair_waits_for_its_assignment(
    order: tuple[str, ...],
) -> None:
    j = Joiner(assignment_wait_ms=1000)
    exps = _feed(j, [*order, "assignment"])
    assert [(e.reward, e.reward_source, e.propensity is not None) for e in exps] == [
        (1.0, "human", True)
    ]


def test_a_human_reward_for_a_trajectory_joined_long_ago_is_counted_not_applied() -> None:
    j = Joiner(recent_capacity=2)
    for i in range(1, 5):
        j.add_trajectory(trajectory(i, "a", "m", "x"), ref(T, i), i)
        j.add_reward(reward(i, "a", 0.0), ref(R, i), i)
    assert j.add_reward(reward(1, "a", 1.0, source=RewardSource.HUMAN), ref(R, 9), 9) == []
    assert j.stats.human_too_late == 1
    [e] = j.add_reward(reward(4, "a", 1.0, source=RewardSource.HUMAN), ref(R, 10), 10)
    assert (e.trajectory_id, e.reward) == ("traj-4", 1.0) and j.stats.human_corrections == 1


def test_replay_keeps_one_experience_per_trajectory_the_human_one() -> None:
    from stormline.schemas.kafka import Received
    from stormline.settings import Settings
    from stormline.trainer.replay import _join_in_order

    s = Settings()
    traj, rew = s.topic("trajectories"), s.topic("rewards")
    records = [
        Received(traj, 0, 0, "task-1", trajectory(1, "a", "math", "x"), 1),
        Received(rew, 0, 0, "task-1", reward(1, "a", 0.0), 2),
        Received(rew, 0, 1, "task-1", reward(1, "a", 1.0, source=RewardSource.HUMAN), 3),
        Received(traj, 0, 1, "task-2", trajectory(2, "a", "math", "y"), 4),
        Received(rew, 0, 2, "task-2", reward(2, "a", 0.5), 5),
    ]
    exps, _ = _join_in_order(s, Joiner(), records)
    assert [(e.trajectory_id, e.reward, e.reward_source) for e in exps] == [
        ("traj-1", 1.0, "human"),
        ("traj-2", 0.5, "verifier"),
    ]
