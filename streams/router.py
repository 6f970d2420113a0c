"""The router's decisions, free of Faust: tasks in, assignments and final failures out.

:class:`RouterCore` works on plain mutable mappings (the Faust tables in production, dicts in
unit tests) and a clock passed in, so every rule below is testable without Kafka:

* **Matching**: candidates are agents whose capabilities cover the task's required ones and
  whose health admits them (:class:`Directory`, fed by heartbeats and AgentHealthChanged).
* **Choice**: :func:`streams.strategies.choose` over the Q-cells of (task type, candidate),
  optionally blended with a checkpoint scorer.
* **Task lifecycle** (one record per task id): ``waiting`` (no candidate; retried until the
  deadline) -> ``assigned`` (attempt n, expires at t) -> ``done`` (a trajectory for the current
  attempt arrived, or the task failed for good). An expired attempt is reassigned as attempt
  n+1, preferring an agent not tried yet; after ``max_attempts`` the task gets a final failed
  Trajectory and a Reward with source ``failure``. Nothing is dropped silently.
* **Rewards** update the Q-cell once per (trajectory id, attempt): the keys already applied
  live in the task record, kept ``done_retention_s`` after the task finished.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from stormline.schemas.models import (
    AssignedTask,
    Event,
    HealthStatus,
    PolicyKind,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.streams.health import HealthConfig, ProbeBudget
from stormline.streams.policy import Scorer
from stormline.streams.qtable import QCell, RewardLedger, cell_key, reward_key
from stormline.streams.strategies import Choice, StrategyConfig, choose

ROUTER_AGENT = "stormline-router"  # agent_id/provider on what the router itself emits
NO_AGENT = "no capable healthy agent"
ABSOLUTE_MS = 10**12
T = TypeVar("T")  # a deadline_ms above this is an epoch time, below it a duration


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


# ---------------------------------------------------------------------- directory --
@dataclass
class Directory:
    """One router worker's view of the agents: capabilities and health, all in memory."""

    health: HealthConfig = field(default_factory=HealthConfig)
    capabilities: dict[str, frozenset[str]] = field(default_factory=dict)
    budgets: dict[str, ProbeBudget] = field(default_factory=dict)

    def heartbeat(self, capabilities: dict[str, list[str]], agent_ids: list[str]) -> None:
        for agent in {*agent_ids, *capabilities}:
            self.capabilities[agent] = frozenset(capabilities.get(agent, []))

    def health_changed(
        self, agent_id: str, status: HealthStatus, previous: HealthStatus, when: float
    ) -> None:
        self.budgets.setdefault(agent_id, ProbeBudget()).changed(status, previous, when)

    def status(self, agent_id: str) -> HealthStatus:
        b = self.budgets.get(agent_id)
        return b.status if b else HealthStatus.UNKNOWN

    def candidates(self, required: list[str], now: float) -> dict[str, bool]:
        """Agents that may take a task needing ``required`` -> whether it would be a probe."""
        need = set(required)
        out: dict[str, bool] = {}
        for agent, caps in self.capabilities.items():
            if not need <= caps:
                continue
            budget = self.budgets.get(agent)
            if budget is None:
                out[agent] = False
                continue
            ok, probe = budget.admits(now, self.health)
            if ok:
                out[agent] = probe
        return out

    def probe_sent(self, agent_id: str) -> None:
        b = self.budgets.get(agent_id)
        if b is not None:
            b.probes_sent += 1


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
        task = task or TaskSubmitted.model_validate(rec["task"])
        candidates = self.directory.candidates(task.required_capabilities, now)
        if not candidates:
            if now >= rec["deadline_at"]:
                self.counters["failed_no_agent"] += 1
                return self._fail(rec, now, NO_AGENT, RewardSource.FAILURE, task)
            if rec["state"] != "waiting":
                self.counters["waiting"] += 1
            rec["state"] = "waiting"
            rec["due_at"] = min(now + self.cfg.retry_s, rec["deadline_at"])
            return []
        # Prefer agents not tried yet (a reassignment); fall back to all candidates.
        fresh = {a: p for a, p in candidates.items() if a not in avoid} or candidates
        cells = {a: QCell.from_dict(self.qtable.get(cell_key(task.task_type, a))) for a in fresh}
        # A half-open agent with probe budget left gets the next task it can do, whatever the
        # strategy thinks of it: its Q-cell predates the outage, and a circuit that waits for
        # the strategy to pick a poor agent again might never close.
        probing = sorted(a for a, is_probe in fresh.items() if is_probe)
        tstats = dict(self.types.get(task.task_type) or {"routed": 0})
        prior = None
        weight = 0.0
        if self.scorer is not None and self.cfg.policy_weight > 0:
            try:
                caps = {a: sorted(self.directory.capabilities.get(a, ())) for a in fresh}
                prior = dict(self.scorer.score(task, sorted(fresh), caps))
                weight = self.cfg.policy_weight
            except Exception:
                prior = None  # a broken scorer must never stop routing
        if probing:
            a = probing[0]
            choice = Choice(a, cells[a].value, PolicyKind.EXPLORE.value)
            prior = None
        else:
            choice = choose(
                self.cfg.strategy,
                cells,
                self.rng,
                step=int(tstats["routed"]),
                prior=prior,
                prior_weight=weight,
            )
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
        rec["attempt"] = int(rec["attempt"]) + 1
        rec["agent"] = agent
        rec["state"] = "assigned"
        rec["tried"] = [*rec["tried"], agent]
        rec["expires_at"] = now + self.cfg.assignment_ttl_s
        rec["due_at"] = rec["expires_at"]
        self.counters["assigned"] += 1
        return [
            TaskAssigned(
                task_id=task.task_id,
                attempt=rec["attempt"],
                agent_id=agent,
                policy=PolicyKind(kind),
                strategy=self.cfg.strategy.name,
                policy_version=self.policy_version,
                score=float(choice.score),
                epsilon=choice.epsilon,
                assigned_at=at(now),
                expires_at=at(rec["expires_at"]),
                task=AssignedTask.of(task),
            )
        ]

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


def new_id() -> str:
    return uuid.uuid4().hex


Clock = Callable[[], float]
