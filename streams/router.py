"""The router's decisions, free of Faust: tasks in, assignments and final failures out.

:class:`RouterCore` works on plain mutable mappings (the Faust tables in production, dicts in
unit tests) and a clock passed in, so every rule below is testable without Kafka:

* **Matching**: candidates are agents whose capabilities cover the task's required ones and
  whose health admits them (:class:`streams.health.Directory`, fed by heartbeats and
  AgentHealthChanged).
* **Choice**: :func:`streams.strategies.choose_agent` over the Q-cells of (task type, candidate),
  optionally blended with a checkpoint scorer.
* **Task lifecycle** (one record per task id, states and moves of
  :mod:`stormline.schemas.lifecycle`; an illegal move is refused and logged): ``submitted`` ->
  ``waiting`` (no candidate; retried until the deadline) -> ``assigned`` (attempt n, expires
  at t) -> ``succeeded`` / ``failed``. Expiry is the router's decision alone, on its clock: a
  worker's TIMEOUT trajectory does not end the attempt. An expired attempt counts as a
  failure of its agent and is reassigned as attempt n+1, preferring an agent not tried yet;
  after ``max_attempts`` the task gets a final failed Trajectory and a Reward from
  :data:`ROUTER_AGENT`. Nothing is dropped silently.
* **Choice is a function of (task id, attempt)**: each decision draws from an RNG seeded
  with them, so an attempt redone after a crash (the assignment sent, the record lost) goes
  to the same agent given the same statistics.
* **Outcomes** (success, wrong answer, error, expiry) update the Q-cell of the attempt's
  agent once per attempt (:class:`streams.qtable.AttemptLedger` in the task record); a human
  reward replaces the automatic one; errors count ``failure_value``.

Slightly over ~400 lines because :class:`RouterCore` is one state machine over the task record
(assign, wait, expire, fail, reward); its steps are small methods that all read and write that
record, and splitting the class would put the record's rules in two places.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from stormline.schemas.lifecycle import FINAL, IllegalTransition, TaskState, check
from stormline.schemas.models import (
    ROUTER_AGENT,
    AssignedTask,
    Event,
    PolicyKind,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
    stable_event_id,
)
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.policy import Scorer
from stormline.streams.qtable import (
    AUTO,
    EXPIRY,
    HUMAN,
    AttemptLedger,
    Entry,
    QCell,
    cell_key,
)
from stormline.streams.strategies import Choice, StrategyConfig, choose_agent

log = logging.getLogger("stormline.router")

# ROUTER_AGENT (agent_id/provider on what the router itself emits) lives in schemas.models.
NO_AGENT = "no capable healthy agent"
RESENDS = 3  # tries to deliver a record's events again after a restart, then it goes on
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
    # How long a finished task's reward ledger is kept (compacted) after the full record is
    # dropped: the rewards topic's retention, so a reward redelivered while the topic still
    # holds it is recognised (issue 14, finding 2).
    ledger_retention_s: float = 30 * 24 * 3600.0
    policy_weight: float = 0.5
    failure_value: float = 0.0  # what an error or an expired attempt counts for its agent
    discount: float | None = None  # gamma of the discounted statistics (None: keep all)
    seed: int = 0  # with (task id, attempt): the RNG of each decision


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


# Records written before the lifecycle vocabulary used these words.
_LEGACY = {"new": TaskState.SUBMITTED.value, "done": TaskState.SUCCEEDED.value}


def state_of(rec: Mapping[str, Any]) -> TaskState:
    return TaskState(_LEGACY.get(str(rec.get("state")), str(rec.get("state"))))


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
        # A seeded ``rng`` (tests, benchmarks) picks the decisions' base seed; otherwise the
        # configured one, so that every router process decides an attempt the same way.
        self.seed = rng.getrandbits(64) if rng is not None else cfg.seed
        self.scorer: Scorer | None = None
        # Expiries wait until then (the app sets it to the end of its catch-up grace).
        self.hold_expiry_until = 0.0
        self.policy_version: str | None = None
        # (task id, state, attempt) of every applied move, for the Redis status writer; kept
        # only when someone drains them (the app), so a benchmark's core does not grow.
        self.keep_moves = False
        self.moves: list[tuple[str, TaskState, int]] = []
        # Whether the app confirms each event's delivery (:meth:`sent`); see _unsent.
        self.track_delivery = False
        # Whether a task's record must be kept (its status is not written yet): the app's.
        self.holding: Callable[[str], bool] = lambda task_id: False
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
                "trajectories_timeout_deferred",
                "rewards_applied",
                "rewards_replaced",
                "rewards_duplicate",
                "rewards_ignored",
                "expiries_counted",
                "illegal_transitions",
                "compacted",
                "resent",
            )
        }

    def rng_for(self, task_id: str, attempt: int) -> random.Random:
        """The RNG of the decision for ``attempt`` of ``task_id`` (a str seed is hashed)."""
        return random.Random(f"{self.seed}\x1f{task_id}\x1f{attempt}")

    def _move(self, task_id: str, rec: dict[str, Any], new: TaskState) -> bool:
        """Set ``rec``'s state to ``new`` if the lifecycle allows it; log and refuse if not."""
        try:
            check(task_id, state_of(rec) if rec.get("state") else None, new)
        except IllegalTransition as exc:
            self.counters["illegal_transitions"] += 1
            log.warning("refused: %s", exc)
            return False
        rec["state"] = new.value
        self._moved(task_id, new, int(rec.get("attempt", 0)))
        return True

    def _moved(self, task_id: str, state: TaskState, attempt: int) -> None:
        if self.keep_moves:
            self.moves.append((task_id, state, max(attempt, 1)))

    # -- tasks --
    def on_task(self, task: TaskSubmitted, now: float) -> list[Event]:
        self.counters["tasks"] += 1
        if task.task_id in self.tasks:
            return []  # a redelivered task: its record already drives it
        rec: dict[str, Any] = {
            "task": task.model_dump(mode="json"),
            "task_type": task.task_type,
            "state": TaskState.SUBMITTED.value,
            "attempt": 0,
            "agent": None,
            "tried": [],
            "rewarded": {},
            "deadline_at": self._deadline(task),
            "due_at": now,
        }
        out = self._assign(task.task_id, rec, now, avoid=(), task=task)
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
        task_id: str,
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
        rng = self.rng_for(task_id, int(rec["attempt"]) + 1)
        choice, prior = self._pick(task, fresh, cells, int(tstats["routed"]), rng)
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
            return self._fail(rec, now, NO_AGENT, task)
        if int(rec["attempt"]) > 0:
            # A reassignment that found nobody: the task stays assigned (the lifecycle has no
            # assigned -> waiting), its expired attempt counted, and the clock retries.
            if not rec.get("reassign"):
                self.counters["waiting"] += 1
            rec["reassign"] = True
        elif state_of(rec) != TaskState.WAITING:
            if not self._move(task.task_id, rec, TaskState.WAITING):
                return []
            self.counters["waiting"] += 1
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
        rng: random.Random,
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
            self.cfg.strategy, cells, rng, step=routed, prior=prior, prior_weight=weight
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
        rec.pop("reassign", None)
        rec["state"] = TaskState.ASSIGNED.value  # every state but a final one may reassign
        self._moved(task.task_id, TaskState.ASSIGNED, rec["attempt"])
        rec["tried"] = [*rec["tried"], agent]
        rec["expires_at"] = now + self.cfg.assignment_ttl_s
        rec["due_at"] = rec["expires_at"]
        # What rebuilds the same TaskAssigned if this one is lost with a kill (unsent_events).
        rec["pick"] = [kind.value, float(choice.score), choice.epsilon, now, self.policy_version]
        self._unsent(rec)
        self.counters["assigned"] += 1
        return self._assignment(rec, task)

    def _assignment(self, rec: Mapping[str, Any], task: TaskSubmitted) -> TaskAssigned:
        kind, score, epsilon, assigned_at, policy_version = rec["pick"]
        return TaskAssigned(
            event_id=stable_event_id("assignment", task.task_id, rec["attempt"]),
            task_id=task.task_id,
            attempt=rec["attempt"],
            agent_id=rec["agent"],
            policy=PolicyKind(kind),
            strategy=self.cfg.strategy.name,
            policy_version=policy_version,
            score=float(score),
            epsilon=epsilon,
            assigned_at=at(assigned_at),
            expires_at=at(rec["expires_at"]),
            task=AssignedTask.of(task),
        )

    def _unsent(self, rec: dict[str, Any]) -> None:
        """Mark ``rec``'s events (this attempt's assignment, or the final failure) as not
        known delivered: the app clears the mark (:meth:`sent`) once Kafka acknowledged them,
        and a restarted router sends them again (:meth:`on_tick`) if it is still there.
        Only when someone confirms deliveries (the app), like :attr:`moves`."""
        if not self.track_delivery:
            return
        rec["unsent"] = max(int(rec["attempt"]), 1)  # as the events say (a final failure: 1+)
        rec.pop("resends", None)

    def sent(self, task_id: str, attempt: int) -> None:
        """The events of ``attempt`` of ``task_id`` are delivered: clear the record's mark."""
        rec = self.tasks.get(task_id)
        if rec is not None and rec.get("unsent") == attempt:
            rec = dict(rec)
            rec.pop("unsent", None)
            rec.pop("resends", None)
            self.tasks[task_id] = rec

    def unsent_events(self, rec: Mapping[str, Any]) -> list[Event]:
        """The events ``rec`` marks as not known delivered, rebuilt (same event ids)."""
        if rec.get("unsent") is None or rec.get("task") is None:
            return []
        task = TaskSubmitted.model_validate(rec["task"])
        state = state_of(rec)
        if state == TaskState.FAILED and rec.get("by_router"):
            return self._final_events(rec, task)
        if state == TaskState.ASSIGNED and rec.get("pick") and rec["unsent"] == rec["attempt"]:
            return [self._assignment(rec, task)]
        return []

    def _fail(
        self,
        rec: dict[str, Any],
        now: float,
        reason: str,
        task: TaskSubmitted | None = None,
    ) -> list[Event]:
        """The task's final failure: a Trajectory and a Reward from the router itself."""
        task = task or TaskSubmitted.model_validate(rec["task"])
        if not self._move(task.task_id, rec, TaskState.FAILED):
            return []
        rec["done_at"] = now
        rec["due_at"] = now + self.cfg.done_retention_s
        rec["reason"] = reason
        rec["by_router"] = True
        self._unsent(rec)
        return self._final_events(rec, task)

    def _final_events(self, rec: Mapping[str, Any], task: TaskSubmitted) -> list[Event]:
        attempt = max(int(rec["attempt"]), 1)
        tid = f"{task.task_id}:router-final"
        reason = str(rec.get("reason", ""))
        return [
            Trajectory(
                event_id=stable_event_id("final-failure", task.task_id, attempt),
                task_id=task.task_id,
                trajectory_id=tid,
                attempt=attempt,
                agent_id=ROUTER_AGENT,
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
                event_id=stable_event_id("reward", tid, RewardSource.FAILURE.value),
                task_id=task.task_id,
                trajectory_id=tid,
                attempt=attempt,
                agent_id=ROUTER_AGENT,
                task_type=task.task_type,
                policy_version=self.policy_version,
                value=0.0,
                source=RewardSource.FAILURE,
                reason=reason,
            ),
        ]

    # -- the clock --
    def on_tick(self, task_id: str, now: float) -> tuple[list[Event], list[Outcome]]:
        rec = self.tasks.get(task_id)
        if rec is not None and rec.get("unsent") is not None:
            rec = dict(rec)
            events, resends = self.unsent_events(rec), int(rec.get("resends", 0))
            if events and resends < RESENDS:
                # A kill between the record and its events' delivery: send them again (same
                # event ids, so a copy that did arrive counts once downstream).
                rec["resends"] = resends + 1
                self.tasks[task_id] = rec
                self.counters["resent"] += 1
                return events, []
            # Nothing to send any more, or never delivered (dead-lettered each time): go on.
            rec.pop("unsent", None)
            rec.pop("resends", None)
            self.tasks[task_id] = rec
        if rec is None or now < float(rec.get("due_at", 0)):
            return [], []  # stale or duplicate tick: the record is the truth
        rec = dict(rec)
        state = state_of(rec)
        out: list[Event] = []
        outcomes: list[Outcome] = []
        if state in FINAL:
            if self.holding(task_id):
                rec["due_at"] = now + self.cfg.retry_s  # its status is not in Redis yet
                self.tasks[task_id] = rec
                return [], []
            if rec.get("compact"):
                del self.tasks[task_id]  # past the rewards topic's retention: nothing can repeat
            else:
                self.tasks[task_id] = compacted(rec, now + self.cfg.ledger_retention_s)
                self.counters["compacted"] += 1
            return [], []
        if state == TaskState.ASSIGNED and now < self.hold_expiry_until:
            rec["due_at"] = self.hold_expiry_until  # look again after the catch-up grace
            self.tasks[task_id] = rec
            return [], []
        if state in (TaskState.WAITING, TaskState.SUBMITTED) or rec.get("reassign"):
            out = self._assign(task_id, rec, now, avoid=tuple(rec["tried"]))
        elif state == TaskState.ASSIGNED:
            outcomes, out = self._expire(task_id, rec, now)
        self.tasks[task_id] = rec
        return out, outcomes

    def _expire(
        self, task_id: str, rec: dict[str, Any], now: float
    ) -> tuple[list[Outcome], list[Event]]:
        """The current attempt expired: it counts against its agent; reassign or fail."""
        self.counters["expired"] += 1
        attempt, agent = int(rec["attempt"]), str(rec["agent"])
        self._count(rec, rec["task_type"], agent, attempt, self.cfg.failure_value, EXPIRY)
        outcomes = [Outcome(agent, False, f"attempt {attempt} expired")]
        if attempt >= self.cfg.max_attempts:
            self.counters["failed_attempts"] += 1
            return outcomes, self._fail(rec, now, f"no trajectory after {attempt} attempts")
        self.counters["reassigned"] += 1
        return outcomes, self._assign(task_id, rec, now, avoid=tuple(rec["tried"]))

    def due(self, now: float) -> list[tuple[str, str]]:
        """(task type, task id) of the records whose next step is due (a full scan)."""
        return [
            (rec["task_type"], tid)
            for tid, rec in list(self.tasks.items())
            if now >= float(rec.get("due_at", 0))
        ]

    # -- results --
    def on_trajectory(self, traj: Trajectory, now: float) -> list[Outcome]:
        if traj.provider == ROUTER_AGENT or traj.agent_id == ROUTER_AGENT:
            return []  # our own final failure, already accounted for
        self.counters["trajectories"] += 1
        timeout = traj.status == TrajectoryStatus.TIMEOUT
        outcome = Outcome(traj.agent_id, traj.status == TrajectoryStatus.OK, traj.error or "")
        # A worker's TIMEOUT says nothing the router's own clock will not decide: the agent
        # may never have run (an assignment read after its expiry).
        outcomes = [] if timeout else [outcome]
        rec = self.tasks.get(traj.task_id)
        if (
            rec is None
            or state_of(rec) in FINAL
            or int(traj.attempt) != int(rec["attempt"])
            or traj.agent_id != rec["agent"]
        ):
            self.counters["trajectories_stale"] += 1
            return outcomes
        if timeout:
            self.counters["trajectories_timeout_deferred"] += 1
            return []
        rec = dict(rec)
        rec.pop("unsent", None)  # a result of this attempt: its assignment was delivered
        rec.pop("resends", None)
        ok = traj.status == TrajectoryStatus.OK
        if self._move(traj.task_id, rec, TaskState.SUCCEEDED if ok else TaskState.FAILED):
            rec["done_at"] = now
            rec["due_at"] = now + self.cfg.done_retention_s
            self.tasks[traj.task_id] = rec
        return outcomes

    def on_reward(self, reward: Reward, now: float) -> bool:
        """Count ``reward`` for its attempt's agent; False if ignored or already counted.

        An automatic reward counts once per attempt (an error's counts ``failure_value``); a
        human reward replaces the automatic one's contribution, once, whatever the order; a
        TIMEOUT reward is ignored, because the attempt's expiry on the router's clock is what
        counts for it.
        """
        if reward.agent_id == ROUTER_AGENT or reward.source == RewardSource.TIMEOUT:
            self.counters["rewards_ignored"] += 1
            return False  # the router's own bookkeeping, or decided by the router's clock
        rec = self.tasks.get(reward.task_id)
        task_type = reward.task_type or (rec or {}).get("task_type", "")
        if rec is None:
            # Unknown or forgotten task: keep a ledger-only record so a redelivery is caught.
            rec = {
                "task_type": task_type,
                "state": TaskState.SUCCEEDED.value,
                "attempt": reward.attempt,
                "agent": reward.agent_id,
                "tried": [],
                "rewarded": {},
                "done_at": now,
                "due_at": now + self.cfg.done_retention_s,
            }
        rec = dict(rec)
        failed = reward.source == RewardSource.FAILURE
        value = self.cfg.failure_value if failed else reward.value
        kind = HUMAN if reward.source == RewardSource.HUMAN else AUTO
        attempt = reward.attempt
        if kind == HUMAN:
            # `stormline reward` given only a trajectory id does not know the attempt.
            found = AttemptLedger(_ledger(rec.get("rewarded"))).attempt_of(reward.trajectory_id)
            attempt = found if found is not None else attempt
        applied = self._count(
            rec, task_type, reward.agent_id, attempt, value, kind, reward.trajectory_id
        )
        self.tasks[reward.task_id] = rec
        return applied

    def _count(
        self,
        rec: dict[str, Any],
        task_type: str,
        agent: str,
        attempt: int,
        value: float,
        kind: str,
        trajectory_id: str = "",
    ) -> bool:
        """Apply one attempt's outcome to the Q-table through the ledger in ``rec``."""
        ledger = AttemptLedger(_ledger(rec.get("rewarded")))
        decision = ledger.decide(attempt, kind)
        if decision.action == "duplicate":
            self.counters["rewards_duplicate"] += 1
            return False
        old = decision.old
        target = old.agent if old is not None else agent
        key = cell_key(task_type, target)
        cell = QCell.from_dict(self.qtable.get(key))
        if old is not None:
            cell.replace(old.value, value, self.cfg.step_size)
            self.counters["rewards_replaced"] += 1
        else:
            cell.update(value, self.cfg.step_size, self.cfg.discount)
            self.counters["expiries_counted" if kind == EXPIRY else "rewards_applied"] += 1
        self.qtable[key] = cell.to_dict()
        ledger.record(attempt, Entry(target, value, kind, trajectory_id))
        rec["rewarded"] = ledger.to_dict()
        return True


def compacted(rec: Mapping[str, Any], forget_at: float) -> dict[str, Any]:
    """A finished task's record cut to what reward dedup needs (its ledger), until then."""
    return {
        "task_type": rec.get("task_type", ""),
        "state": rec.get("state"),
        "attempt": rec.get("attempt", 0),
        "agent": rec.get("agent"),
        "tried": [],
        "rewarded": _ledger(rec.get("rewarded")),
        "compact": True,
        "due_at": forget_at,
    }


def _ledger(data: Any) -> dict[str, Any]:
    """The ledger of a record; one written by an older router (a list of keys) starts empty."""
    return data if isinstance(data, dict) else {}
