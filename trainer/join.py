"""The experience join (pure): trajectories + rewards by ``trajectory_id`` -> Experience.

No I/O here; :mod:`trainer.service` feeds events with their source coordinates and a clock,
and persists :meth:`Joiner.to_dict` (see :mod:`trainer.state`).

* Either side may come first, and a reward may come long after its trajectory. An entry
  waits at most ``max_wait_ms`` of **event time** (the largest record timestamp seen), then
  is evicted and reported. Event time rather than wall time makes the join deterministic in
  the input, so a replay of a range produces the same experiences as the live run did.
* At most ``max_entries`` entries wait; beyond that the oldest are evicted and reported.
* Duplicate rewards: **first wins**, except that a **human** reward (``source=human``) wins
  over an automatic one (verifier, judge, timeout, failure) whatever the arrival order, once:
  before the join it replaces the pending automatic reward; after the join it emits one
  *correction*, the same experience with the human reward (``reward_source == "human"``),
  which the service puts in place of the automatic experience if that one is still
  buffered, or trains next if it was already trained (an update cannot be retracted; the
  correction is what the policy learns from then on). A correction needs the experience's
  context, kept for the ``recent_capacity`` most recently joined trajectories; a human
  reward for an older one is counted (``human_too_late``) and dropped. Any other duplicate is
  almost always an at-least-once redelivery; it is counted and dropped. Joined ids are
  remembered (bounded), with the source their reward came from, so a late duplicate after
  the join is dropped, not re-joined, and a second human reward changes nothing.
* Assignments (optional) and heartbeats add context: the task text and capabilities, the
  router's logged score, epsilon and policy, from which a propensity is derived; agents'
  capabilities from heartbeats. Without an assignment the text falls back to the
  trajectory's first user step. Because topics are read concurrently, an assignment can
  arrive after its trajectory and reward (during catch-up); a joined pair therefore waits up
  to ``assignment_wait_ms`` of event time for it (:meth:`Joiner.release` emits what waited
  long enough), so the logged propensity is not lost to consumption order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stormline.schemas.models import (
    AgentHeartbeat,
    PolicyKind,
    Reward,
    RewardSource,
    Step,
    TaskAssigned,
    Trajectory,
)

HUMAN, AUTO = RewardSource.HUMAN.value, "auto"  # the two kinds of reward source the join tells


def _is_human(rew: _Entry) -> bool:
    return bool(rew.data.get("source") == HUMAN)


class SourceRef(BaseModel):
    topic: str
    partition: int
    offset: int

    model_config = ConfigDict(frozen=True)


class Experience(BaseModel):
    """One joined (context, action, reward) record; general enough for a token-level learner.

    ``steps`` carries the trajectory's steps (with token ids and logprobs when the model
    returned them) when the joiner keeps steps; the router learner does not need them.
    """

    trajectory_id: str
    task_id: str
    attempt: int
    agent_id: str
    task_type: str
    task_text: str
    required_capabilities: list[str] = Field(default_factory=list)
    agent_capabilities: list[str] = Field(default_factory=list)
    reward: float
    reward_components: dict[str, float] = Field(default_factory=dict)
    reward_source: str = ""
    status: str = ""
    provider: str = ""
    model: str = ""
    policy_version: str | None = None
    assignment_policy: str | None = None
    assignment_score: float | None = None
    epsilon: float | None = None
    propensity: float | None = None
    trajectory_at_ms: int = 0
    reward_at_ms: int = 0
    trajectory_ref: SourceRef
    reward_ref: SourceRef
    assignment_ref: SourceRef | None = None
    steps: list[Step] = Field(default_factory=list)


@dataclass(frozen=True)
class Eviction:
    trajectory_id: str
    side: str  # "trajectory" | "reward" | "assignment"
    reason: str  # "expired" | "overflow"
    ref: SourceRef


@dataclass
class JoinStats:
    joined: int = 0
    duplicate_rewards: int = 0
    duplicate_trajectories: int = 0
    human_replaced: int = 0  # a human reward took a pending automatic reward's place
    human_corrections: int = 0  # a human reward after the join: one corrected experience
    human_too_late: int = 0  # ... whose context was no longer kept
    evicted_expired: int = 0
    evicted_overflow: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def propensity_of(policy: str | None, epsilon: float | None) -> float | None:
    """Probability the router picked this arm, from what it logged (an upper bound).

    Greedy picks (qtable / checkpoint) had probability about 1 - epsilon, exploratory picks
    about epsilon (spread over candidates the event does not list, hence an upper bound;
    the weights are clipped anyway). Unknown without epsilon.
    """
    if epsilon is None or policy is None:
        return None
    if policy == PolicyKind.EXPLORE.value:
        return epsilon
    if policy in (PolicyKind.QTABLE.value, PolicyKind.CHECKPOINT.value):
        return 1.0 - epsilon
    return None


def _first_user_text(traj: Trajectory) -> str:
    for s in traj.steps:
        if s.role == "user" and s.content:
            return s.content
    return traj.steps[0].content if traj.steps else ""


@dataclass
class _Entry:
    kind: str
    data: dict[str, Any]  # the event's JSON dump (steps stripped unless kept)
    ref: SourceRef
    at_ms: int


@dataclass
class Joiner:
    max_entries: int = 100_000
    max_wait_ms: int = 86_400_000
    keep_steps: bool = False
    done_capacity: int = 200_000
    assignment_wait_ms: int = 0
    recent_capacity: int = 20_000
    stats: JoinStats = field(default_factory=JoinStats)
    clock_ms: int = 0  # event-time watermark
    # Insertion-ordered, so the oldest entry is first: eviction is O(1).
    _traj: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _rew: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _asg: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    # Joined trajectory id -> the source of the reward it was joined with.
    _done: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # The most recent joined experiences (JSON), for a late human reward's correction.
    _recent: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    _ready: OrderedDict[str, tuple[_Entry, _Entry]] = field(default_factory=OrderedDict)
    _agent_caps: dict[str, list[str]] = field(default_factory=dict)

    # ------------------------------------------------------------------- inputs --
    def add_trajectory(self, t: Trajectory, ref: SourceRef, at_ms: int) -> list[Experience]:
        self._tick(at_ms)
        tid = t.trajectory_id
        if tid in self._done or tid in self._traj:
            self.stats.duplicate_trajectories += 1
            return []
        data = t.model_dump(mode="json", exclude=None if self.keep_steps else {"steps"})
        data["_text"] = _first_user_text(t)
        entry = _Entry("trajectory", data, ref, at_ms)
        rew = self._rew.pop(tid, None)
        if rew is None:
            self._traj[tid] = entry
            return []
        return self._pair(entry, rew)

    def add_reward(self, r: Reward, ref: SourceRef, at_ms: int) -> list[Experience]:
        self._tick(at_ms)
        tid = r.trajectory_id
        human = r.source == RewardSource.HUMAN
        entry = _Entry("reward", r.model_dump(mode="json"), ref, at_ms)
        if tid in self._done:
            if human and self._done[tid] != HUMAN:
                return self._correct(tid, entry)
            self.stats.duplicate_rewards += 1
            return []
        pending = self._rew.get(tid)
        if pending is not None:
            if human and not _is_human(pending):
                self._rew[tid] = entry  # keeps its place: eviction order is arrival order
                self.stats.human_replaced += 1
            else:
                self.stats.duplicate_rewards += 1
            return []
        traj = self._traj.pop(tid, None)
        if traj is None:
            self._rew[tid] = entry
            return []
        return self._pair(traj, entry)

    def _correct(self, tid: str, rew: _Entry) -> list[Experience]:
        """A human reward for a joined trajectory: replace the reward, once."""
        key = f"{rew.data['task_id']}#{rew.data['attempt']}"
        ready = self._ready.get(key)
        self._done[tid] = HUMAN
        if ready is not None and ready[0].data["trajectory_id"] == tid:
            self._ready[key] = (ready[0], rew)  # not emitted yet: it leaves with the human one
            self.stats.human_replaced += 1
            return []
        recent = self._recent.get(tid)
        if recent is None:
            self.stats.human_too_late += 1
            return []
        r = rew.data
        fixed = Experience.model_validate(
            {
                **recent,
                "reward": r["value"],
                "reward_components": r.get("components", {}),
                "reward_source": r.get("source", ""),
                "reward_at_ms": rew.at_ms,
                "reward_ref": rew.ref,
            }
        )
        self._remember(fixed)
        self.stats.human_corrections += 1
        return [fixed]

    def mark_trained(self, trajectory_ids: list[str]) -> None:
        """Treat these as joined (their experiences are in a checkpoint already): after a
        crash between writing a checkpoint and saving the state, their records come again."""
        for tid in trajectory_ids:
            self._traj.pop(tid, None)
            self._rew.pop(tid, None)
            self._done.setdefault(tid, "")
        for key, (t, _) in list(self._ready.items()):
            if t.data["trajectory_id"] in self._done:
                del self._ready[key]
        self._trim_done()

    def add_assignment(self, a: TaskAssigned, ref: SourceRef, at_ms: int) -> list[Experience]:
        self._tick(at_ms)
        key = f"{a.task_id}#{a.attempt}"
        self._asg[key] = _Entry("assignment", a.model_dump(mode="json"), ref, at_ms)
        ready = self._ready.pop(key, None)
        return [self._emit(*ready)] if ready else []

    def release(self, force: bool = False) -> list[Experience]:
        """Emit joined pairs that waited ``assignment_wait_ms`` for an assignment (or all)."""
        out = []
        horizon = self.clock_ms - self.assignment_wait_ms
        while self._ready:
            key, (t, r) = next(iter(self._ready.items()))
            if not force and max(t.at_ms, r.at_ms) >= horizon:
                break
            del self._ready[key]
            out.append(self._emit(t, r))
        return out

    def add_heartbeat(self, h: AgentHeartbeat) -> None:
        for agent in h.agent_ids:
            self._agent_caps[agent] = list(h.capabilities.get(agent, []))

    # ------------------------------------------------------------------ eviction --
    def evict(self) -> list[Eviction]:
        """Drop entries older than ``max_wait_ms`` or beyond ``max_entries``; report them."""
        out: list[Eviction] = []
        horizon = self.clock_ms - self.max_wait_ms
        for side, table in (
            ("trajectory", self._traj),
            ("reward", self._rew),
            ("assignment", self._asg),
        ):
            while table:
                key, entry = next(iter(table.items()))
                if entry.at_ms >= horizon:
                    break
                del table[key]
                out.append(
                    Eviction(entry.data.get("trajectory_id", key), side, "expired", entry.ref)
                )
                self.stats.evicted_expired += 1
        while self.pending > self.max_entries:
            sides = [
                (n, t)
                for n, t in (
                    ("trajectory", self._traj),
                    ("reward", self._rew),
                    ("assignment", self._asg),
                )
                if t
            ]
            if not sides:
                break  # only pairs waiting for assignments: release() bounds those
            side, table = min(sides, key=lambda st: next(iter(st[1].values())).at_ms)
            key, entry = table.popitem(last=False)
            out.append(Eviction(entry.data.get("trajectory_id", key), side, "overflow", entry.ref))
            self.stats.evicted_overflow += 1
        return out

    @property
    def pending(self) -> int:
        return len(self._traj) + len(self._rew) + len(self._asg) + len(self._ready)

    def _tick(self, at_ms: int) -> None:
        self.clock_ms = max(self.clock_ms, at_ms)

    # ---------------------------------------------------------------------- join --
    def _trim_done(self) -> None:
        while len(self._done) > self.done_capacity:
            self._done.popitem(last=False)

    def _remember(self, e: Experience) -> None:
        self._recent[e.trajectory_id] = e.model_dump(mode="json")
        self._recent.move_to_end(e.trajectory_id)
        while len(self._recent) > self.recent_capacity:
            self._recent.popitem(last=False)

    def _pair(self, traj: _Entry, rew: _Entry) -> list[Experience]:
        # From now on, duplicates are dropped; a human reward still corrects an automatic one.
        self._done[traj.data["trajectory_id"]] = HUMAN if _is_human(rew) else AUTO
        self._trim_done()
        key = f"{traj.data['task_id']}#{traj.data['attempt']}"
        if key in self._asg or self.assignment_wait_ms <= 0:
            return [self._emit(traj, rew)]
        self._ready[key] = (traj, rew)
        return []

    def _emit(self, traj: _Entry, rew: _Entry) -> Experience:
        t, r = traj.data, rew.data
        tid = t["trajectory_id"]
        asg = self._asg.pop(f"{t['task_id']}#{t['attempt']}", None)
        task = asg.data["task"] if asg else {}
        a = asg.data if asg else {}
        self.stats.joined += 1
        exp = Experience(
            trajectory_id=tid,
            task_id=t["task_id"],
            attempt=t["attempt"],
            agent_id=t["agent_id"],
            task_type=task.get("task_type") or t.get("task_type") or r.get("task_type") or "",
            task_text=task.get("prompt") or t.get("_text") or "",
            required_capabilities=task.get("required_capabilities", []),
            agent_capabilities=self._agent_caps.get(t["agent_id"], []),
            reward=r["value"],
            reward_components=r.get("components", {}),
            reward_source=r.get("source", ""),
            status=t.get("status", ""),
            provider=t.get("provider", ""),
            model=t.get("model", ""),
            policy_version=t.get("policy_version") or a.get("policy_version"),
            assignment_policy=a.get("policy"),
            assignment_score=a.get("score"),
            epsilon=a.get("epsilon"),
            propensity=propensity_of(a.get("policy"), a.get("epsilon")),
            trajectory_at_ms=traj.at_ms,
            reward_at_ms=rew.at_ms,
            trajectory_ref=traj.ref,
            reward_ref=rew.ref,
            assignment_ref=asg.ref if asg else None,
            steps=[Step.model_validate(s) for s in t.get("steps", [])],
        )
        self._done[tid] = HUMAN if _is_human(rew) else AUTO  # a correction may have come
        self._remember(exp)
        return exp

    # --------------------------------------------------------------- persistence --
    def to_dict(self) -> dict[str, Any]:
        def dump(table: OrderedDict[str, _Entry]) -> list[list[Any]]:
            return [[k, e.kind, e.data, e.ref.model_dump(), e.at_ms] for k, e in table.items()]

        return {
            "clock_ms": self.clock_ms,
            "stats": self.stats.as_dict(),
            "trajectories": dump(self._traj),
            "rewards": dump(self._rew),
            "assignments": dump(self._asg),
            "done": [[k, src] for k, src in self._done.items()],
            "recent": list(self._recent.values()),
            "ready": [
                [
                    k,
                    [t.kind, t.data, t.ref.model_dump(), t.at_ms],
                    [r.kind, r.data, r.ref.model_dump(), r.at_ms],
                ]
                for k, (t, r) in self._ready.items()
            ],
            "agent_caps": self._agent_caps,
        }

    def load_dict(self, d: dict[str, Any]) -> None:
        def load(rows: list[list[Any]]) -> OrderedDict[str, _Entry]:
            return OrderedDict(
                (k, _Entry(kind, data, SourceRef(**ref), at)) for k, kind, data, ref, at in rows
            )

        self.clock_ms = int(d.get("clock_ms", 0))
        self.stats = JoinStats(**d.get("stats", {}))
        self._traj = load(d.get("trajectories", []))
        self._rew = load(d.get("rewards", []))
        self._asg = load(d.get("assignments", []))
        # Format 1 kept ids only: their reward's source is unknown (no correction then).
        self._done = OrderedDict(
            (row, "") if isinstance(row, str) else (row[0], row[1]) for row in d.get("done", [])
        )
        self._recent = OrderedDict((e["trajectory_id"], e) for e in d.get("recent", []))

        def entry(row: list[Any]) -> _Entry:
            return _Entry(row[0], row[1], SourceRef(**row[2]), row[3])

        self._ready = OrderedDict((k, (entry(t), entry(r))) for k, t, r in d.get("ready", []))
        self._agent_caps = {k: list(v) for k, v in d.get("agent_caps", {}).items()}
