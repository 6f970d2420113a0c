"""Q-table cells: what the router knows about one (task type, agent) pair. Pure, no I/O.

A cell is stored as a plain dict in a changelog-backed Faust table, so it round-trips through
JSON (:meth:`QCell.to_dict` / :meth:`QCell.from_dict`). It keeps:

* ``value``: the estimate (exponential recency-weighted with a fixed step size, or the sample
  mean when no step size is configured);
* ``count``: rewards applied; ``pulls``: assignments made (UCB's exploration term uses pulls,
  because rewards arrive late and the router keeps routing meanwhile);
* ``successes``/``failures`` for Beta-Bernoulli Thompson sampling and ``total``/``sumsq`` for
  the Gaussian variant; ``binary`` stays true while every reward was exactly 0 or 1.

Rewards are deduplicated by :func:`reward_key` (trajectory id and attempt): the caller keeps
the set of keys already applied (see ``streams/app.py``), so a redelivered or late reward for
an old attempt is counted once.
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


def reward_key(trajectory_id: str, attempt: int) -> str:
    return f"{trajectory_id}#{attempt}"


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
    def update(self, reward: float, step_size: float | None = None) -> QCell:
        """Apply one reward in place and return self.

        ``step_size`` None: sample mean (stationary agents). A fixed step in (0, 1] weights
        recent rewards more, which tracks an agent whose quality drifts (a model upgrade).
        """
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
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

    def pulled(self) -> QCell:
        self.pulls += 1
        return self

    # -- statistics --
    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def variance(self) -> float:
        if self.count < 2:
            return 0.25  # the largest variance of a [0, 1] reward: an honest prior
        m = self.mean
        return max(self.sumsq / self.count - m * m, 1e-6)

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


class RewardLedger:
    """The keys of rewards already applied, for one task (kept inside its task record)."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self._keys = list(keys or [])

    def seen(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> bool:
        """Record ``key``; False if it was already there (a duplicate)."""
        if key in self._keys:
            return False
        self._keys.append(key)
        return True

    def keys(self) -> list[str]:
        return list(self._keys)
