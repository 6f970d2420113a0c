"""A known, seeded data set of Stormline events for the sink and analytics tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    AssignedTask,
    CheckpointPublished,
    DeadLetter,
    Event,
    Reward,
    Step,
    TaskAssigned,
    TaskSubmitted,
    ToolCall,
    Trajectory,
    Usage,
    WorkerStatus,
)

BASE = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGENTS = ("alpha", "beta", "gamma")
TYPES = ("math", "code")
STRATEGIES = ("ucb", "thompson")
TENANTS = ("default", "acme")  # every third task is acme's


@dataclass
class DataSet:
    tasks: list[TaskSubmitted] = field(default_factory=list)
    assignments: list[TaskAssigned] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    others: list[Event] = field(default_factory=list)

    def events(self) -> list[Event]:
        return [
            *self.tasks,
            *self.assignments,
            *self.trajectories,
            *self.rewards,
            *self.others,
        ]


def make(n_tasks: int = 40, seed: int = 7, base: datetime = BASE) -> DataSet:
    """Tasks with 1-2 attempts over 3 agents; some tasks never assigned or never tried."""
    rnd = random.Random(seed)
    ds = DataSet()
    for i in range(n_tasks):
        at = base + timedelta(seconds=30 * i)
        ttype = TYPES[i % 2]
        task = TaskSubmitted(
            task_id=f"task-{i}",
            tenant=TENANTS[i % 3 == 0],
            task_type=ttype,
            prompt=f"question {i}",
            occurred_at=at,
        )
        ds.tasks.append(task)
        if i % 10 == 9:
            continue  # pending: never assigned
        attempts = 2 if i % 4 == 0 else 1
        for attempt in range(1, attempts + 1):
            agent = AGENTS[(i + attempt) % 3]
            strategy = STRATEGIES[i % 2]
            version = "router@1" if i < n_tasks // 2 else "router@2"
            t_at = at + timedelta(seconds=attempt)
            ds.assignments.append(
                TaskAssigned(
                    task_id=task.task_id,
                    attempt=attempt,
                    agent_id=agent,
                    policy="checkpoint",
                    strategy=strategy,
                    policy_version=version,
                    assigned_at=t_at,
                    expires_at=t_at + timedelta(minutes=5),
                    task=AssignedTask.of(task),
                    occurred_at=t_at,
                )
            )
            if i % 10 == 8 and attempt == attempts:
                continue  # assigned, no trajectory yet
            status = "ok" if (attempt == attempts and i % 5 != 3) else "error"
            pt, ct = rnd.randint(10, 200), rnd.randint(5, 100)
            traj = Trajectory(
                task_id=task.task_id,
                trajectory_id=f"{task.task_id}-{attempt}",
                attempt=attempt,
                agent_id=agent,
                task_type=ttype,
                provider="simulated",
                model="sim-1",
                policy_version=version,
                steps=[
                    Step(role="user", content=task.prompt, prompt_tokens=pt),
                    Step(
                        role="assistant",
                        content="answer",
                        completion_tokens=ct,
                        latency_ms=rnd.uniform(5, 500),
                        tool_calls=[ToolCall(id="c1", name="calc", arguments="{}")]
                        if i % 3 == 0
                        else [],
                    ),
                ],
                output="answer",
                status=status,
                usage=Usage(
                    prompt_tokens=pt, completion_tokens=ct, cost_usd=round(rnd.uniform(0, 0.01), 6)
                ),
                latency_ms=round(rnd.uniform(10, 1000), 3),
                occurred_at=t_at + timedelta(seconds=2),
            )
            ds.trajectories.append(traj)
            value = round(rnd.uniform(0, 1) if status == "ok" else rnd.uniform(-1, 0), 4)
            ds.rewards.append(
                Reward(
                    task_id=task.task_id,
                    trajectory_id=traj.trajectory_id,
                    attempt=attempt,
                    agent_id=agent,
                    task_type=ttype,
                    policy_version=version,
                    value=value,
                    source="verifier",
                    occurred_at=t_at + timedelta(seconds=3),
                )
            )
    ds.others += [
        AgentHeartbeat(worker_id="w1", agent_ids=list(AGENTS), status=WorkerStatus.RUNNING),
        AgentHealthChanged(agent_id="gamma", status="down", previous="healthy", reason="errors"),
        CheckpointPublished(policy="router", version=2, uri="file:///ckpt/2", sha256="a" * 64),
    ]
    for j, kind in enumerate(("decode", "decode", "validation")):
        ds.others.append(
            DeadLetter(
                source_topic="x.tasks",
                partition=0,
                offset=j,
                raw_key=b"task-0" if j == 0 else None,  # acme's task: its letter is acme's
                raw_value=b"\x00junk",
                error_kind=kind,
                error=f"bad record {j}",
                occurred_at=base + timedelta(seconds=j),
            )
        )
    return ds
