"""Q-table cells: what the router knows about one (task type, agent) pair. Pure, no I/O.

A cell is stored as a plain dict in a changelog-backed Faust table, so it round-trips through
JSON (:meth:`QCell.to_dict` / :meth:`QCell.from_dict`). It keeps:

* ``value``: the estimate (exponential recency-weighted with a fixed step size, or the sample
  mean when no step size is configured);
* ``count``: rewards applied; ``pulls``: assignments made (UCB's exploration term uses pulls,
  because rewards arrive late and the router keeps routing meanwhile);
* ``successes``/``failures`` for Beta-Bernoulli Thompson sampling and ``total``/``sumsq`` for
  the Gaussian variant; ``binary`` stays true while every reward was exactly 0 or 1.

Outcomes are counted once per attempt by :class:`AttemptLedger` (kept in the task's record):
an attempt's automatic outcome (a verifier/judge/failure reward, or the router's own expiry)
counts once; a later human reward for it, or a real reward for an attempt the router had
already expired, *replaces* the earlier contribution (:meth:`QCell.replace`) exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SEP = "\x1f"  # unit separator: cannot appear in a task type or agent id typed by a human


def cell_key(task_type: str, agent_id: str) -> str:
    return f"{task_type}{SEP}{agent_id}"


def split_key(key: str) -> tuple[str, str]:
    task_type, _, agent_id = key.partition(SEP)
    return task_type, agent_id


@dataclass
class QCell:
    value: float = 0.0
    count: int = 0
    pulls: int = 0
    successes: float = 0.0
    failures: float = 0.0
    total: float = 0.0
    sumsq: float = 0.0
    binary: bool = True
    extra: dict[str, float] = field(default_factory=dict)

    # -- learning --
    def update(
        self, reward: float, step_size: float | None = None, discount: float | None = None
    ) -> QCell:
        """Apply one reward in place and return self.

        ``step_size`` None: sample mean (stationary agents). A fixed step in (0, 1] weights
        recent rewards more, which tracks an agent whose quality drifts (a model upgrade).
        ``discount`` (gamma in (0, 1)) shrinks the Beta/Gaussian evidence before each update,
        so Thompson's posterior forgets at rate gamma and follows an agent that degrades
        (the effective window is about 1/(1-gamma) rewards).
        """
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
        if discount is not None and discount < 1.0:
            self.successes *= discount
            self.failures *= discount
            self.total *= discount
            self.sumsq *= discount
            self.extra["weight"] = self.extra.get("weight", float(self.count)) * discount + 1.0
        self.count += 1
        step = (1.0 / self.count) if step_size is None else step_size
        self.value += step * (reward - self.value)
        self.total += reward
        self.sumsq += reward * reward
        if reward in (0.0, 1.0):
            if reward == 1.0:
                self.successes += 1
            else:
                self.failures += 1
        else:
            self.binary = False
            # Fractional rewards still inform the Beta posterior, as a fractional trial.
            clipped = min(1.0, max(0.0, reward))
            self.successes += clipped
            self.failures += 1.0 - clipped
        return self

    def replace(self, old: float, new: float, step_size: float | None = None) -> QCell:
        """Swap one applied reward ``old`` for ``new`` (a human correction); count unchanged."""
        if not (math.isfinite(old) and math.isfinite(new)):
            raise ValueError("reward must be finite")
        if self.count == 0:
            return self.update(new, step_size)
        self.total += new - old
        self.sumsq += new * new - old * old
        o, n = min(1.0, max(0.0, old)), min(1.0, max(0.0, new))
        self.successes = max(0.0, self.successes + n - o)
        self.failures = max(0.0, self.failures + o - n)
        if new not in (0.0, 1.0):
            self.binary = False
        step = (1.0 / self.count) if step_size is None else step_size
        self.value += step * (new - old)
        return self

    def pulled(self) -> QCell:
        self.pulls += 1
        return self

    # -- statistics --
    @property
    def weight(self) -> float:
        """The evidence behind the sums: ``count``, or its discounted version."""
        return self.extra.get("weight", float(self.count))

    @property
    def mean(self) -> float:
        w = self.weight
        return self.total / w if w > 0 else 0.0

    @property
    def variance(self) -> float:
        w = self.weight
        if w < 2:
            return 0.25  # the largest variance of a [0, 1] reward: an honest prior
        m = self.mean
        return max(self.sumsq / w - m * m, 1e-6)

    # -- storage --
    def to_dict(self) -> dict[str, object]:
        # Spelled out: dataclasses.asdict deep-copies and was a hot spot of routing.
        return {
            "value": self.value,
            "count": self.count,
            "pulls": self.pulls,
            "successes": self.successes,
            "failures": self.failures,
            "total": self.total,
            "sumsq": self.sumsq,
            "binary": self.binary,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QCell:
        """A cell from its :meth:`to_dict` form (a JSON table value, hence ``Any``)."""
        if not data:
            return cls()
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


AUTO, HUMAN, EXPIRY = "auto", "human", "expiry"


@dataclass(frozen=True)
class Entry:
    """What counts for one attempt now: the agent, the value, and where it came from."""

    agent: str
    value: float
    kind: str  # AUTO | HUMAN | EXPIRY
    trajectory_id: str = ""


@dataclass(frozen=True)
class Decision:
    """What to do with an outcome: ``apply`` a new value, ``replace`` ``old``, or nothing."""

    action: str  # "apply" | "replace" | "duplicate"
    old: Entry | None = None


# What may replace what: a human word beats everything; a real reward beats the router's
# own guess that an attempt that expired had failed; nothing replaces a human reward.
_REPLACES = {HUMAN: {AUTO, EXPIRY}, AUTO: {EXPIRY}, EXPIRY: set[str]()}


class AttemptLedger:
    """The outcome counted for each attempt of one task (kept inside its task record).

    Stored as ``{str(attempt): [agent, value, kind, trajectory id]}`` (JSON round-trips).
    """

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._d: dict[str, list[Any]] = {k: list(v) for k, v in (data or {}).items()}

    def get(self, attempt: int) -> Entry | None:
        v = self._d.get(str(attempt))
        if not v:
            return None
        return Entry(str(v[0]), float(v[1]), str(v[2]), str(v[3]) if len(v) > 3 else "")

    def attempt_of(self, trajectory_id: str) -> int | None:
        """The attempt whose outcome came from ``trajectory_id`` (a reward that lacks it)."""
        for k, v in self._d.items():
            if len(v) > 3 and v[3] == trajectory_id:
                return int(k)
        return None

    def decide(self, attempt: int, kind: str) -> Decision:
        old = self.get(attempt)
        if old is None:
            return Decision("apply")
        if old.kind in _REPLACES[kind]:
            return Decision("replace", old)
        return Decision("duplicate", old)

    def record(self, attempt: int, entry: Entry) -> None:
        self._d[str(attempt)] = [entry.agent, entry.value, entry.kind, entry.trajectory_id]

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self._d.items()}
