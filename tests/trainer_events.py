"""Trajectory / Reward / TaskAssigned fixtures for the trainer's tests (a learnable world)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from stormline.schemas.models import (
    AssignedTask,
    PolicyKind,
    Reward,
    RewardSource,
    Step,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
    stable_event_id,
)

WORDS = {
    "math": ["integral", "equation", "solve", "algebra", "sum"],
    "code": ["python", "function", "bug", "compile", "refactor"],
    "prose": ["essay", "poem", "story", "paragraph", "tone"],
}
BEST = {"math": "agent-a", "code": "agent-b", "prose": "agent-c"}
AGENTS = sorted(BEST.values())


def prompt(rng: random.Random, task_type: str) -> str:
    return "please " + " ".join(rng.choice(WORDS[task_type]) for _ in range(4))


def trajectory(i: int, agent: str, task_type: str, text: str, **kw: object) -> Trajectory:
    return Trajectory(
        task_id=f"task-{i}",
        trajectory_id=f"traj-{i}",
        attempt=1,
        agent_id=agent,
        task_type=task_type,
        steps=[Step(role="user", content=text), Step(role="assistant", content="ok")],
        output="ok",
        status=TrajectoryStatus.OK,
        **kw,  # type: ignore[arg-type]
    )


def reward(
    i: int,
    agent: str,
    value: float,
    task_type: str = "",
    source: RewardSource = RewardSource.VERIFIER,
) -> Reward:
    if source == RewardSource.HUMAN:  # the contract's id of a human reward
        return Reward(
            event_id=stable_event_id("reward", f"traj-{i}", source.value),
            task_id=f"task-{i}",
            trajectory_id=f"traj-{i}",
            attempt=1,
            agent_id=agent,
            task_type=task_type,
            value=value,
            source=source,
        )
    return Reward(
        task_id=f"task-{i}",
        trajectory_id=f"traj-{i}",
        attempt=1,
        agent_id=agent,
        task_type=task_type,
        value=value,
        source=RewardSource.VERIFIER,
    )


def assignment(i: int, agent: str, task_type: str, text: str, policy: PolicyKind) -> TaskAssigned:
    now = datetime.now(UTC)
    return TaskAssigned(
        task_id=f"task-{i}",
        attempt=1,
        agent_id=agent,
        policy=policy,
        score=0.5,
        epsilon=0.2,
        assigned_at=now,
        expires_at=now + timedelta(minutes=5),
        task=AssignedTask(
            task_id=f"task-{i}",
            task_type=task_type,
            prompt=text,
            required_capabilities=["text"],
            occurred_at=now,
        ),
    )


def world(n: int, seed: int = 0, start: int = 0) -> list[tuple[TaskAssigned, Trajectory, Reward]]:
    """``n`` episodes: uniform agent choice; reward 1 when the agent is the type's best."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        ty = rng.choice(sorted(WORDS))
        agent = rng.choice(AGENTS)
        text = prompt(rng, ty)
        policy = PolicyKind.EXPLORE if rng.random() < 0.2 else PolicyKind.QTABLE
        value = 1.0 if BEST[ty] == agent else 0.0
        out.append(
            (
                assignment(i, agent, ty, text, policy),
                trajectory(i, agent, ty, text),
                reward(i, agent, value, ty),
            )
        )
    return out
