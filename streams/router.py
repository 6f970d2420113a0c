"""The router's decisions, free of Faust: tasks in, assignments and final failures out.

:class:`RouterCore` works on plain mutable mappings (the Faust tables in production, dicts in
unit tests) and a clock passed in, so every rule below is testable without Kafka:

* **Matching**: candidates are agents whose capabilities cover the task's required ones and
  whose health admits them (:class:`streams.health.Directory`, fed by heartbeats and
  AgentHealthChanged).
* **Choice**: :func:`streams.strategies.choose_agent` over the Q-cells of (task type, candidate),
  optionally blended with a checkpoint scorer.
* **Task lifecycle** (one record per task id): ``waiting`` (no candidate; retried until the
  deadline) -> ``assigned`` (attempt n, expires at t) -> ``done`` (a trajectory for the current
  attempt arrived, or the task failed for good). An expired attempt is reassigned as attempt
  n+1, preferring an agent not tried yet; after ``max_attempts`` the task gets a final failed
  Trajectory and a Reward with source ``failure``. Nothing is dropped silently.
* **Rewards** update the Q-cell once per (trajectory id, attempt): the keys already applied
  live in the task record, kept ``done_retention_s`` after the task finished.

Slightly over ~400 lines because :class:`RouterCore` is one state machine over the task record
(assign, wait, expire, fail, reward); its steps are small methods that all read and write that
record, and splitting the class would put the record's rules in two places.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from stormline.schemas.models import (
    AssignedTask,
    Event,
    PolicyKind,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.policy import Scorer
from stormline.streams.qtable import QCell, RewardLedger, cell_key, reward_key
from stormline.streams.strategies import Choice, StrategyConfig, choose_agent

ROUTER_AGENT = "stormline-router"  # agent_id/provider on what the router itself emits
NO_AGENT = "no capable healthy agent"
ABSOLUTE_MS = 10**12  # a deadline_ms above this is an epoch time, below it a duration
T = TypeVar("T")


@dataclass(frozen=True)
class RouterConfig:
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    step_size: float | None = None
    assignment_ttl_s: float = 60.0
    max_attempts: int = 3
    retry_s: float = 1.0
    default_deadline_s: float = 300.0
    done_retention_s: float = 3600.0
    policy_weight: float = 0.5


@dataclass(frozen=True)
class Outcome:
    """An attempt's result for the health keeper."""

    agent_id: str
    ok: bool
    detail: str


def epoch(dt: datetime) -> float:
    return dt.timestamp()


def at(ts: float) -> datetime:
    d = datetime.fromtimestamp(ts, UTC)
    return d.replace(microsecond=d.microsecond // 1000 * 1000)


def by_priority(batch: list[tuple[TaskSubmitted, T]]) -> list[tuple[TaskSubmitted, T]]:
    """A batch of tasks, highest priority first, FIFO within a priority (a stable sort).

    This is how priority works under backlog: the forwarder reads tasks in batches of up to
    ``router_batch_max`` and forwards each batch in this order, so a priority-9 task overtakes
    every lower-priority task of its batch. A batch holds what arrived within the batch
    window; with no backlog that is one task and nobody waits for priority.
    """
    return sorted(batch, key=lambda tv: -tv[0].priority)


# --------------------------------------------------------------------------- core --
class RouterCore:
    def __init__(
        self,
        cfg: RouterConfig,
        *,
        qtable: MutableMapping[str, Any],
        tasks: MutableMapping[str, Any],
        types: MutableMapping[str, Any],
        directory: Directory,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.qtable = qtable
        self.tasks = tasks
        self.types = types
        self.directory = directory
        self.rng = rng or random.Random()
        self.scorer: Scorer | None = None
        # Expiries wait until then (the app sets it to the end of its catch-up grace).
        self.hold_expiry_until = 0.0
        self.policy_version: str | None = None
        self.counters: dict[str, int] = {
            k: 0
            for k in (
                "tasks",
                "assigned",
                "probes",
                "waiting",
                "expired",
                "reassigned",
                "failed_no_agent",
                "failed_attempts",
                "trajectories",
                "trajectories_stale",
                "rewards_applied",
                "rewards_duplicate",
                "rewards_ignored",
            )
        }

    # -- tasks --
    def on_task(self, task: TaskSubmitted, now: float) -> list[Event]:
        self.counters["tasks"] += 1
        if task.task_id in self.tasks:
            return []  # a redelivered task: its record already drives it
        rec: dict[str, Any] = {
            "task": task.model_dump(mode="json"),
            "task_type": task.task_type,
            "state": "new",
            "attempt": 0,
            "agent": None,
            "tried": [],
            "rewarded": [],
            "deadline_at": self._deadline(task),
            "due_at": now,
        }
        out = self._assign(rec, now, avoid=(), task=task)
        self.tasks[task.task_id] = rec
        return out

    def _deadline(self, task: TaskSubmitted) -> float:
        if task.deadline_ms is None:
            return epoch(task.occurred_at) + self.cfg.default_deadline_s
        if task.deadline_ms > ABSOLUTE_MS:
            return task.deadline_ms / 1000.0
        return epoch(task.occurred_at) + task.deadline_ms / 1000.0

    def _assign(
        self,
        rec: dict[str, Any],
        now: float,
        avoid: tuple[str, ...],
        task: TaskSubmitted | None = None,
    ) -> list[Event]:
        """Assign the task of ``rec`` (attempt n+1), or leave it waiting, or fail it."""
        task = task or TaskSubmitted.model_validate(rec["task"])
        candidates = self.directory.candidates(task.required_capabilities, now)
        if not candidates:
            return self._wait_or_fail(rec, now, task)
        # Prefer agents not tried yet (a reassignment); fall back to all candidates.
        fresh = {a: p for a, p in candidates.items() if a not in avoid} or candidates
        cells = {a: QCell.from_dict(self.qtable.get(cell_key(task.task_type, a))) for a in fresh}
        tstats = dict(self.types.get(task.task_type) or {"routed": 0})
        choice, prior = self._pick(task, fresh, cells, int(tstats["routed"]))
        agent = choice.agent_id
        tstats["routed"] = int(tstats["routed"]) + 1
        self.types[task.task_type] = tstats
        self.qtable[cell_key(task.task_type, agent)] = cells[agent].pulled().to_dict()
        if fresh[agent]:
            self.directory.probe_sent(agent)
            self.counters["probes"] += 1
        kind = choice.kind
        if prior is not None and kind == PolicyKind.QTABLE.value:
            kind = PolicyKind.CHECKPOINT.value
        return [self._start_attempt(rec, now, task, choice, PolicyKind(kind))]

    def _wait_or_fail(self, rec: dict[str, Any], now: float, task: TaskSubmitted) -> list[Event]:
        """No capable healthy agent: fail the task past its deadline, else retry later."""
        if now >= rec["deadline_at"]:
            self.counters["failed_no_agent"] += 1
            return self._fail(rec, now, NO_AGENT, RewardSource.FAILURE, task)
        if rec["state"] != "waiting":
            self.counters["waiting"] += 1
        rec["state"] = "waiting"
        rec["due_at"] = min(now + self.cfg.retry_s, rec["deadline_at"])
        return []

    def _prior(
        self, task: TaskSubmitted, fresh: Mapping[str, bool]
    ) -> tuple[dict[str, float] | None, float]:
        """The checkpoint scorer's prior over ``fresh`` and its weight; (None, 0) without one."""
        if self.scorer is None or self.cfg.policy_weight <= 0:
            return None, 0.0
        try:
            caps = {a: sorted(self.directory.capabilities.get(a, ())) for a in fresh}
            return dict(self.scorer.score(task, sorted(fresh), caps)), self.cfg.policy_weight
        except Exception:
            return None, 0.0  # a broken scorer must never stop routing

    def _pick(
        self,
        task: TaskSubmitted,
        fresh: Mapping[str, bool],
        cells: Mapping[str, QCell],
        routed: int,
    ) -> tuple[Choice, dict[str, float] | None]:
        """The agent for this attempt, and the prior that weighed in (None if none did).

        A half-open agent with probe budget left gets the next task it can do, whatever the
        strategy thinks of it: its Q-cell predates the outage, and a circuit that waits for
        the strategy to pick a poor agent again might never close.
        """
        prior, weight = self._prior(task, fresh)
        probing = sorted(a for a, is_probe in fresh.items() if is_probe)
        if probing:
            a = probing[0]
            return Choice(a, cells[a].value, PolicyKind.EXPLORE.value), None
        choice = choose_agent(
            self.cfg.strategy, cells, self.rng, step=routed, prior=prior, prior_weight=weight
        )
        return choice, prior

    def _start_attempt(
        self,
        rec: dict[str, Any],
        now: float,
        task: TaskSubmitted,
        choice: Choice,
        kind: PolicyKind,
    ) -> TaskAssigned:
        """Record attempt n+1 with ``choice.agent_id`` in ``rec``; the event that announces it."""
        agent = choice.agent_id
        rec["attempt"] = int(rec["attempt"]) + 1
        rec["agent"] = agent
        rec["state"] = "assigned"
        rec["tried"] = [*rec["tried"], agent]
        rec["expires_at"] = now + self.cfg.assignment_ttl_s
        rec["due_at"] = rec["expires_at"]
        self.counters["assigned"] += 1
        return TaskAssigned(
            task_id=task.task_id,
            attempt=rec["attempt"],
            agent_id=agent,
            policy=kind,
            strategy=self.cfg.strategy.name,
            policy_version=self.policy_version,
            score=float(choice.score),
            epsilon=choice.epsilon,
            assigned_at=at(now),
            expires_at=at(rec["expires_at"]),
            task=AssignedTask.of(task),
        )

    def _fail(
        self,
        rec: dict[str, Any],
        now: float,
        reason: str,
        src: RewardSource,
        task: TaskSubmitted | None = None,
    ) -> list[Event]:
        task = task or TaskSubmitted.model_validate(rec["task"])
        agent = rec.get("agent") or ROUTER_AGENT
        attempt = max(int(rec["attempt"]), 1)
        tid = f"{task.task_id}:router-final"
        rec["state"] = "done"
        rec["done_at"] = now
        rec["due_at"] = now + self.cfg.done_retention_s
        return [
            Trajectory(
                task_id=task.task_id,
                trajectory_id=tid,
                attempt=attempt,
                agent_id=agent,
                task_type=task.task_type,
                provider=ROUTER_AGENT,
                policy_version=self.policy_version,
                status=TrajectoryStatus.ERROR,
                error=reason,
                expected=task.expected,
                evaluator=task.evaluator,
                final=True,
            ),
            Reward(
                task_id=task.task_id,
                trajectory_id=tid,
                attempt=attempt,
                agent_id=agent,
                task_type=task.task_type,
                policy_version=self.policy_version,
                value=0.0,
                source=src,
                reason=reason,
            ),
        ]

    # -- the clock --
    def on_tick(self, task_id: str, now: float) -> tuple[list[Event], list[Outcome]]:
        rec = self.tasks.get(task_id)
        if rec is None or now < float(rec.get("due_at", 0)):
            return [], []  # stale or duplicate tick: the record is the truth
        rec = dict(rec)
        state = rec["state"]
        out: list[Event] = []
        outcomes: list[Outcome] = []
        if state == "done":
            del self.tasks[task_id]
            return [], []
        if state == "assigned" and now < self.hold_expiry_until:
            return [], []
        if state == "waiting":
            out = self._assign(rec, now, avoid=tuple(rec["tried"]))
        elif state == "assigned":
            self.counters["expired"] += 1
            outcomes.append(Outcome(rec["agent"], False, f"attempt {rec['attempt']} expired"))
            if int(rec["attempt"]) >= self.cfg.max_attempts:
                self.counters["failed_attempts"] += 1
                out = self._fail(
                    rec,
                    now,
                    f"no trajectory after {rec['attempt']} attempts",
                    RewardSource.FAILURE,
                )
            else:
                self.counters["reassigned"] += 1
                out = self._assign(rec, now, avoid=tuple(rec["tried"]))
        self.tasks[task_id] = rec
        return out, outcomes

    def due(self, now: float) -> list[tuple[str, str]]:
        """(task type, task id) of the records whose next step is due."""
        return [
            (rec["task_type"], tid)
            for tid, rec in list(self.tasks.items())
            if now >= float(rec.get("due_at", 0))
        ]

    # -- results --
    def on_trajectory(self, traj: Trajectory, now: float) -> list[Outcome]:
        if traj.provider == ROUTER_AGENT:
            return []  # our own final failure, already accounted for
        self.counters["trajectories"] += 1
        outcome = Outcome(
            traj.agent_id,
            traj.status == TrajectoryStatus.OK,
            traj.error or traj.status.value,
        )
        rec = self.tasks.get(traj.task_id)
        if (
            rec is None
            or rec["state"] == "done"
            or int(traj.attempt) != int(rec["attempt"])
            or traj.agent_id != rec["agent"]
        ):
            self.counters["trajectories_stale"] += 1
            return [outcome]
        rec = dict(rec)
        rec["state"] = "done"
        rec["done_at"] = now
        rec["due_at"] = now + self.cfg.done_retention_s
        self.tasks[traj.task_id] = rec
        return [outcome]

    def on_reward(self, reward: Reward, now: float) -> bool:
        """Apply ``reward`` to its Q-cell; False if ignored or already counted."""
        if reward.source == RewardSource.FAILURE or reward.agent_id == ROUTER_AGENT:
            self.counters["rewards_ignored"] += 1
            return False  # bookkeeping of the router itself, not evidence about an agent
        rec = self.tasks.get(reward.task_id)
        task_type = reward.task_type or (rec or {}).get("task_type", "")
        if rec is None:
            # Unknown or forgotten task: keep a done record so a redelivery is still caught.
            rec = {
                "task_type": task_type,
                "state": "done",
                "attempt": reward.attempt,
                "agent": reward.agent_id,
                "tried": [],
                "rewarded": [],
                "done_at": now,
                "due_at": now + self.cfg.done_retention_s,
            }
        ledger = RewardLedger(rec.get("rewarded"))
        if not ledger.add(reward_key(reward.trajectory_id, reward.attempt)):
            self.counters["rewards_duplicate"] += 1
            return False
        rec = {**rec, "rewarded": ledger.keys()}
        self.tasks[reward.task_id] = rec
        key = cell_key(task_type, reward.agent_id)
        cell = QCell.from_dict(self.qtable.get(key)).update(reward.value, self.cfg.step_size)
        self.qtable[key] = cell.to_dict()
        self.counters["rewards_applied"] += 1
        return True
