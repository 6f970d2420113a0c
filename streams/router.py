"""The router's decisions, free of Faust: tasks in, assignments and final outcomes out.

:class:`RouterCore` works on plain mutable mappings (the Faust tables in production, dicts in
unit tests) and a clock passed in, so every rule below is testable without Kafka. Every call
names the partition ``p`` of the task it is about: tasks, trajectories and rewards are keyed
by task id with one partition count, so a task's records, its ledger and the statistics
shards it updates all live on its partition, and the worker that owns the partition decides.

* **Matching**: candidates are agents whose capabilities cover the task's required ones and
  whose health admits them (:class:`streams.health.Directory`).
* **Choice**: :func:`streams.strategies.choose_agent` over the fleet's statistics of each
  (task type, candidate) (:class:`streams.shards.ShardBook`), optionally blended with a
  checkpoint scorer. Each decision draws from an RNG seeded with (seed, task id, attempt).
* **Task lifecycle** (one record per task in ``tasks``, states and moves of
  :mod:`stormline.schemas.lifecycle`; an illegal move is refused, logged and counted):
  ``submitted`` -> ``waiting`` (no candidate; retried until the deadline) -> ``assigned``
  (attempt n, expires at t) -> ``succeeded`` / ``failed``. Expiry is the router's decision
  alone, on its clock: a worker's TIMEOUT trajectory does not end the attempt. An attempt that
  expired or ended in an error counts against its agent and is reassigned as attempt n+1,
  preferring an agent not tried yet; after ``max_attempts`` the task gets a final failed
  Trajectory and a Reward from :data:`ROUTER_AGENT`. Nothing is dropped silently.
* **Outcomes** (success, wrong answer, error, expiry) are counted once per attempt by
  :class:`streams.ledger.OutcomeLedger` (``self.outcomes``), exactly once across kills, in a
  ledger that outlives the task record for as long as the rewards topic keeps records; a
  human reward replaces the automatic one; errors and expiries count ``failure_value``;
  ``cost_weight`` subtracts the attempt's cost.
* **Delivery**: a record whose events are not known to be delivered carries ``unsent`` (a
  sequence number of its partition); the app confirms deliveries per partition
  (:meth:`RouterCore.delivered`), and a restarted owner sends again what was not confirmed
  (same event ids) instead of blaming an agent for an assignment it never got.
* **Time**: due times are on a heap (:class:`Schedule`): a tick costs what is due.

Over ~400 lines because :class:`RouterCore` is one state machine over the task record
(assign, wait, expire, fail, reward); its steps are small methods that all read and write
that record, and splitting the class would put the record's rules in two places.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

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
    utcnow,
)
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.ledger import META, OutcomeLedger
from stormline.streams.policy import Scorer
from stormline.streams.qtable import AUTO, EXPIRY, HUMAN, SEP, QCell, cell_key, shard_discount
from stormline.streams.shards import ShardBook
from stormline.streams.strategies import Choice, StrategyConfig, choose_agent

log = logging.getLogger("stormline.router")

NO_AGENT = "no capable healthy agent"
RESENDS = 3  # tries to deliver a record's events again after a restart, then it goes on
ABSOLUTE_MS = 10**12  # a deadline_ms above this is an epoch time, below it a duration
T = TypeVar("T")


@dataclass(frozen=True)
class RouterConfig:
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    assignment_ttl_s: float = 60.0
    max_attempts: int = 3
    retry_s: float = 1.0
    default_deadline_s: float = 300.0
    # How long a finished task's record stays (late trajectories find it); its ledger stays
    # for ``ledger_retention_s``: the rewards topic's retention, so a reward redelivered while
    # the topic still holds it is recognised (issue 14, finding 2).
    done_retention_s: float = 300.0
    ledger_retention_s: float = 30 * 24 * 3600.0
    policy_weight: float = 0.5
    failure_value: float = 0.0  # what an error or an expired attempt counts for its agent
    discount: float | None = None  # gamma of the discounted statistics (None: keep all)
    cost_weight: float = 0.0  # lambda: an outcome counts reward - lambda * its cost (USD)
    partitions: int = 1  # of the task topics: the shards of one pair
    seed: int = 0  # with (task id, attempt): the RNG of each decision


@dataclass(frozen=True)
class Outcome:
    """An attempt's result for the health keeper."""

    agent_id: str
    ok: bool
    detail: str


class Effects(NamedTuple):
    """What handling one input decided: events to send and outcomes for the health keeper."""

    events: list[Event]
    outcomes: list[Outcome]


def epoch(dt: datetime) -> float:
    return dt.timestamp()


def at(ts: float) -> datetime:
    d = datetime.fromtimestamp(ts, UTC)
    return d.replace(microsecond=d.microsecond // 1000 * 1000)


def state_of(rec: Mapping[str, Any]) -> TaskState:
    return TaskState(str(rec.get("state")))


def by_priority(batch: list[tuple[TaskSubmitted, T]]) -> list[tuple[TaskSubmitted, T]]:
    """A batch of tasks, highest priority first, FIFO within a priority (a stable sort).

    This is how priority works under backlog: the router reads its inputs in batches of up
    to ``router_batch_max`` and routes each batch's tasks in this order, so a priority-9 task
    overtakes every lower-priority task of its batch. A batch holds what arrived within the
    batch window; with no backlog that is one task and nobody waits for priority.
    """
    return sorted(batch, key=lambda tv: -tv[0].priority)


def sent_key(partition: int) -> str:
    """The tasks table's key of the highest delivered sequence number of ``partition``."""
    return f"{META}sent{SEP}{partition}"


class Schedule:
    """Due times of task records on a heap: (due at, partition, task id).

    A record may be pushed more than once (each write); the record is the truth, and an
    entry whose record is gone or due later is skipped when popped.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []

    def push(self, due_at: float, partition: int, task_id: str) -> None:
        heapq.heappush(self._heap, (due_at, partition, task_id))

    def pop_due(self, now: float, ready: Callable[[int], bool]) -> list[tuple[int, str]]:
        """Entries due by ``now`` on partitions ``ready`` (others are dropped: their new
        owner schedules them from its own scan)."""
        out: list[tuple[int, str]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, p, tid = heapq.heappop(heap)
            if ready(p):
                out.append((p, tid))
        return out

    def __len__(self) -> int:
        return len(self._heap)


# --------------------------------------------------------------------------- core --
class RouterCore:
    def __init__(
        self,
        cfg: RouterConfig,
        *,
        tasks: MutableMapping[str, Any],
        ledger: MutableMapping[str, Any],
        directory: Directory,
        book: ShardBook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.tasks = tasks
        self.ledger = ledger
        self.book = book if book is not None else ShardBook()
        self.directory = directory
        self.schedule = Schedule()
        # A seeded ``rng`` (tests, benchmarks) picks the decisions' base seed; otherwise the
        # configured one, so that every router process decides an attempt the same way.
        self.seed = rng.getrandbits(64) if rng is not None else cfg.seed
        self.discount = shard_discount(cfg.discount, cfg.partitions)
        self.scorer: Scorer | None = None
        # Expiries wait until then (the app sets it to the end of its catch-up grace).
        self.hold_expiry_until = 0.0
        self.policy_version: str | None = None
        # (task id, state, attempt) of every applied move, for the Redis status writer; kept
        # only when someone drains them (the app), so a benchmark's core does not grow.
        self.keep_moves = False
        self.moves: list[tuple[str, TaskState, int]] = []
        # Whether the app confirms deliveries (:meth:`delivered`); see _unsent.
        self.track_delivery = False
        self.seq: dict[int, int] = {}  # the last sequence number given out per partition
        self.issued: dict[int, int] = {}  # ... since the app last took them (to confirm)
        self.hold: dict[int, float] = {}  # no expiry on a partition before (a takeover's grace)
        # Whether a task's record must be kept (its status is not written yet): the app's.
        self.holding: Callable[[str], bool] = lambda task_id: False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "tasks",
                "tasks_duplicate",
                "assigned",
                "probes",
                "waiting",
                "expired",
                "reassigned",
                "errors_reassigned",
                "failed_no_agent",
                "failed_attempts",
                "trajectories",
                "trajectories_stale",
                "trajectories_timeout_deferred",
                "rewards_applied",
                "rewards_replaced",
                "rewards_duplicate",
                "rewards_ignored",
                "rewards_recovered",
                "expiries_counted",
                "illegal_transitions",
                "forgotten",
                "resent",
            ),
            0,
        )

        # What counts each outcome once (and the ledger table's writes): streams/ledger.py.
        self.outcomes = OutcomeLedger(
            ledger, self.book, self.counters, self.discount, cfg.ledger_retention_s
        )

    def rng_for(self, task_id: str, attempt: int) -> random.Random:
        """The RNG of the decision for ``attempt`` of ``task_id`` (a str seed is hashed)."""
        return random.Random(f"{self.seed}\x1f{task_id}\x1f{attempt}")

    # -- records --
    def _put(self, task_id: str, rec: dict[str, Any]) -> None:
        self.tasks[task_id] = rec
        self.schedule.push(float(rec.get("due_at", 0)), int(rec.get("p", 0)), task_id)

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
    def on_task(
        self, task: TaskSubmitted, now: float, p: int = 0, trace: dict[str, str] | None = None
    ) -> list[Event]:
        self.counters["tasks"] += 1
        # A redelivered task (its record drives it), or one already finished and forgotten
        # (its ledger says so): a replayed topic or a re-published id is not routed again.
        # (A ledger entry from a reward alone, seen before its task, does not say so.)
        if task.task_id in self.tasks or self.outcomes.done(task.task_id):
            self.counters["tasks_duplicate"] += 1
            return []
        rec: dict[str, Any] = {
            "task": task.model_dump(mode="json"),
            "task_type": task.task_type,
            "p": p,
            "state": TaskState.SUBMITTED.value,
            "attempt": 0,
            "agent": None,
            "tried": [],
            "deadline_at": self._deadline(task),
            "due_at": now,
        }
        if trace:
            rec["trace"] = trace  # a later attempt (the clock's) continues the task's trace
        events = self._assign(task.task_id, rec, now, avoid=(), task=task)
        self._put(task.task_id, rec)
        return events

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
        cells = {a: self.book.cell(cell_key(task.task_type, a)) for a in fresh}
        routed = sum(c.pulls for c in cells.values())  # epsilon decays per task of a type
        rng = self.rng_for(task_id, int(rec["attempt"]) + 1)
        choice, prior = self._pick(task, fresh, cells, routed, rng)
        agent = choice.agent_id
        self.book.pull(int(rec["p"]), cell_key(task.task_type, agent))
        if fresh[agent]:
            self.directory.probe_sent(agent, now)
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
            # assigned -> waiting), its last attempt counted, and the clock retries.
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
        strategy thinks of it: its statistics predate the outage, and a circuit that waits for
        the strategy to pick a poor agent again might never close.
        """
        probing = sorted(a for a, is_probe in fresh.items() if is_probe)
        if probing:
            a = probing[0]
            return Choice(a, cells[a].value, PolicyKind.EXPLORE.value), None
        prior, weight = self._prior(task, fresh)
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
        # Built from values this router made or a validated task holds: not validated again.
        return TaskAssigned.model_construct(
            event_id=stable_event_id("assignment", task.task_id, rec["attempt"]),
            # The decision's time, not the send's: a re-sent copy is the same event.
            occurred_at=at(assigned_at),
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

    # -- delivery --
    def _unsent(self, rec: dict[str, Any]) -> None:
        """Mark ``rec``'s events (this attempt's assignment, or the final failure) as not
        known delivered, with the next sequence number of its partition; the app confirms
        delivered sequence numbers per partition (:meth:`delivered`). Only when someone
        confirms deliveries (the app), like :attr:`moves`."""
        if not self.track_delivery:
            return
        rec["unsent"] = self._next_seq(int(rec["p"]))
        rec.pop("resends", None)

    def delivered(self, partition: int, seq: int) -> None:
        """Every event of ``partition`` up to sequence number ``seq`` is delivered."""
        self.tasks[sent_key(partition)] = {"p": partition, "sent": seq}

    def is_unsent(self, rec: Mapping[str, Any]) -> bool:
        u = rec.get("unsent")
        if u is None:
            return False
        mark = self.tasks.get(sent_key(int(rec.get("p", 0)))) or {}
        return int(u) > int(mark.get("sent", 0))

    def adopt(
        self,
        partition: int,
        records: Iterable[tuple[str, Mapping[str, Any]]],
        hold_until: float = 0.0,
    ) -> int:
        """Schedule the records of a partition this worker now owns (after a rebalance or a
        restart): each at its due time, those with events not known delivered at once.
        Expiries on it wait until ``hold_until``: the results sent while it had no owner are
        still in its backlog. Returns how many records there were."""
        self.hold[partition] = hold_until
        n, top = 0, 0
        for tid, rec in records:
            if tid.startswith(META) or not rec:
                continue
            n += 1
            top = max(top, int(rec.get("unsent") or 0))
            due = 0.0 if self.is_unsent(rec) else float(rec.get("due_at", 0))
            self.schedule.push(due, partition, tid)
        mark = self.tasks.get(sent_key(partition)) or {}
        self.seq[partition] = max(self.seq.get(partition, 0), top, int(mark.get("sent", 0)))
        return n

    def unsent_events(self, rec: Mapping[str, Any]) -> list[Event]:
        """The events ``rec`` marks as not known delivered, rebuilt (same event ids)."""
        if not self.is_unsent(rec) or rec.get("task") is None:
            return []
        task = TaskSubmitted.model_validate(rec["task"])
        state = state_of(rec)
        if state == TaskState.FAILED and rec.get("by_router"):
            return self._final_events(rec, task)
        if state == TaskState.ASSIGNED and rec.get("pick"):
            return [self._assignment(rec, task)]
        return []

    # -- final failure --
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
        # The decision's time, not the send's: a re-sent copy is the same event.
        when = at(float(rec["done_at"])) if "done_at" in rec else utcnow()
        return [
            Trajectory(
                event_id=stable_event_id("final-failure", task.task_id, attempt),
                occurred_at=when,
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
                occurred_at=when,
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
    def on_tick(self, task_id: str, now: float) -> Effects:
        """The record of ``task_id`` came due (or may have: a tick is idempotent, the
        record is the truth)."""
        rec = self.tasks.get(task_id)
        if rec is None:
            return Effects([], [])  # gone: the record is the truth
        if self.is_unsent(rec):
            rec = dict(rec)
            events, resends = self.unsent_events(rec), int(rec.get("resends", 0))
            if events and resends < RESENDS:
                # A kill between the record and its events' delivery: send them again (same
                # event ids, so a copy that did arrive counts once downstream).
                rec["resends"] = resends + 1
                rec["unsent"] = self._next_seq(int(rec["p"]))
                self._put(task_id, rec)
                self.counters["resent"] += 1
                return Effects(events, [])
            # Nothing to send any more, or never delivered (dead-lettered each time): go on.
            rec.pop("unsent", None)
            rec.pop("resends", None)
            self._put(task_id, rec)
        if now < float(rec.get("due_at", 0)):
            return Effects([], [])  # a stale heap entry: the record is due later
        return self._due(task_id, dict(rec), now)

    def cannot_assign(self, task_id: str, attempt: int, reason: str, now: float) -> Effects:
        """Attempt ``attempt``'s assignment can never be sent (too large for the broker): the
        task fails now, no agent blamed (none ever saw it)."""
        rec = self.tasks.get(task_id)
        if rec is None or state_of(rec) != TaskState.ASSIGNED or int(rec["attempt"]) != attempt:
            return Effects([], [])
        rec = dict(rec)
        events = self._fail(rec, now, reason)
        self._put(task_id, rec)
        return Effects(events, [])

    def _next_seq(self, p: int) -> int:
        self.seq[p] = self.issued[p] = self.seq.get(p, 0) + 1
        return self.seq[p]

    def _due(self, task_id: str, rec: dict[str, Any], now: float) -> Effects:
        state = state_of(rec)
        if state in FINAL:
            if self.holding(task_id):
                rec["due_at"] = now + self.cfg.retry_s  # its status is not in Redis yet
                self._put(task_id, rec)
            else:
                self._forget(task_id, rec, now)
            return Effects([], [])
        hold = max(self.hold_expiry_until, self.hold.get(int(rec.get("p", 0)), 0.0))
        if state == TaskState.ASSIGNED and now < hold:
            rec["due_at"] = hold  # look again after the catch-up grace
            self._put(task_id, rec)
            return Effects([], [])
        out = Effects([], [])
        if state in (TaskState.WAITING, TaskState.SUBMITTED) or rec.get("reassign"):
            out = Effects(self._assign(task_id, rec, now, avoid=tuple(rec["tried"])), [])
        elif state == TaskState.ASSIGNED:
            out = self._expire(task_id, rec, now)
        self._put(task_id, rec)
        return out

    def _forget(self, task_id: str, rec: Mapping[str, Any], now: float) -> None:
        """A finished task's record goes; its ledger stays (a replayed task is not routed
        again, a redelivered reward not counted again), with one written if it had none."""
        self.outcomes.finished(task_id, rec, now)
        del self.tasks[task_id]
        self.counters["forgotten"] += 1

    def _expire(self, task_id: str, rec: dict[str, Any], now: float) -> Effects:
        """The current attempt expired: it counts against its agent; reassign or fail."""
        self.counters["expired"] += 1
        attempt, agent = int(rec["attempt"]), str(rec["agent"])
        self.outcomes.count(task_id, rec, agent, attempt, self.cfg.failure_value, EXPIRY, now)
        outcomes = [Outcome(agent, False, f"attempt {attempt} expired")]
        events = self._next_attempt(task_id, rec, now, f"attempt {attempt} expired")
        return Effects(events, outcomes)

    def _next_attempt(self, task_id: str, rec: dict[str, Any], now: float, why: str) -> list[Event]:
        """Attempt n ended without a result that counts: reassign, or fail after the last."""
        if int(rec["attempt"]) >= self.cfg.max_attempts:
            self.counters["failed_attempts"] += 1
            return self._fail(rec, now, f"{why}; no result after {rec['attempt']} attempts")
        self.counters["reassigned"] += 1
        return self._assign(task_id, rec, now, avoid=tuple(rec["tried"]))

    def due(self, now: float, ready: Callable[[int], bool] = lambda p: True) -> list[str]:
        """The task ids whose record may be due by ``now`` (see :meth:`on_tick`)."""
        return [tid for _, tid in self.schedule.pop_due(now, ready)]

    # -- results --
    def on_trajectory(self, traj: Trajectory, now: float, p: int = 0) -> Effects:
        if traj.provider == ROUTER_AGENT or traj.agent_id == ROUTER_AGENT:
            return Effects([], [])  # our own final failure, already accounted for
        self.counters["trajectories"] += 1
        ok = traj.status == TrajectoryStatus.OK
        timeout = traj.status == TrajectoryStatus.TIMEOUT
        # A worker's TIMEOUT says nothing the router's own clock will not decide: the agent
        # may never have run (an assignment read after its expiry).
        outcomes = [] if timeout else [Outcome(traj.agent_id, ok, traj.error or "")]
        rec = self.tasks.get(traj.task_id)
        if rec is None:
            self.counters["trajectories_stale"] += 1
            return Effects([], outcomes)
        rec = dict(rec)
        trajs = rec.get("trajs") or {}
        new_id = trajs.get(str(traj.attempt)) != traj.trajectory_id
        # Which attempt a trajectory was, for a human reward that names only the former.
        rec["trajs"] = {**trajs, str(traj.attempt): traj.trajectory_id}
        stale = (
            state_of(rec) in FINAL
            or int(traj.attempt) != int(rec["attempt"])
            or traj.agent_id != rec["agent"]
        )
        if stale or timeout:
            if new_id:
                self._put(traj.task_id, rec)
            if stale:
                self.counters["trajectories_stale"] += 1
                return Effects([], outcomes)
            self.counters["trajectories_timeout_deferred"] += 1
            return Effects([], [])
        rec.pop("unsent", None)  # a result of this attempt: its assignment was delivered
        rec.pop("resends", None)
        events: list[Event] = []
        if ok:
            if self._move(traj.task_id, rec, TaskState.SUCCEEDED):
                rec["done_at"] = now
                rec["due_at"] = now + self.cfg.done_retention_s
        else:
            # An error is the agent's outcome (its FAILURE reward counts it); the task goes on
            # with another agent while attempts remain.
            self.counters["errors_reassigned"] += 1
            why = f"attempt {traj.attempt} failed: {(traj.error or 'error')[:300]}"
            events = self._next_attempt(traj.task_id, rec, now, why)
        self._put(traj.task_id, rec)
        return Effects(events, outcomes)

    def on_reward(self, reward: Reward, now: float, p: int = 0) -> bool:
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
        if rec is None:
            rec = {"p": p, "task_type": reward.task_type}  # finished and forgotten, or unknown
        failed = reward.source == RewardSource.FAILURE
        value = self.cfg.failure_value if failed else reward.value
        cost = reward.components.get("cost_usd", 0.0)
        if self.cfg.cost_weight and not failed:
            value -= self.cfg.cost_weight * cost
        kind = HUMAN if reward.source == RewardSource.HUMAN else AUTO
        task_id, trajectory_id, agent = reward.task_id, reward.trajectory_id, reward.agent_id
        attempt = self.outcomes.attempt_of(task_id, trajectory_id, agent, reward.attempt, kind, rec)
        return self.outcomes.count(task_id, rec, agent, attempt, value, kind, now, trajectory_id)
