"""What the router knows about one (task type, agent) pair: sufficient statistics. Pure, no I/O.

A :class:`QCell` holds sums, not an estimate that only its writer could update: the count of
outcomes and their discounted weight, the sum and sum of squares of the rewards, the
Beta-Bernoulli successes/failures, and the assignments made (``pulls``; UCB's exploration term
uses them, because rewards arrive late and the router keeps routing meanwhile). Sums add, so
the statistics of a pair are kept as *shards*, one per partition of the task topics, each
written by the one router worker that owns its partition, and the fleet's view of a pair is
the sum of its shards (:func:`merge`; :mod:`streams.shards` keeps that sum current).

``value`` is the estimate the strategies read: the (discounted) mean ``total / weight``.
``discount`` (gamma in (0, 1)) shrinks a cell's evidence before each outcome, so the estimate
follows an agent whose quality drifts (a provider that degrades, a model upgrade); the window
is about ``1/(1-gamma)`` outcomes of the cell. A cell sees about 1/P of its pair's traffic
when the pair is spread over P partitions, so :func:`shard_discount` gives each shard
``gamma**P``: the fleet's window stays ``1/(1-gamma)`` outcomes of the pair.

Outcomes are counted once per attempt by :class:`AttemptLedger` (kept per task in the
router's ledger table): an attempt's automatic outcome (a verifier/judge/failure reward, or
the router's own expiry) counts once; a later human reward for it, or a real reward for an
attempt the router had already expired, *replaces* the earlier contribution
(:meth:`QCell.replace`) exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

SEP = "\x1f"  # unit separator: cannot appear in a task type or agent id typed by a human


def cell_key(task_type: str, agent_id: str) -> str:
    return f"{task_type}{SEP}{agent_id}"


def split_key(key: str) -> tuple[str, str]:
    task_type, _, agent_id = key.partition(SEP)
    return task_type, agent_id


def shard_discount(discount: float | None, partitions: int) -> float | None:
    """The per-shard discount that keeps the pair's window at ``1/(1-discount)`` outcomes."""
    if discount is None or discount >= 1.0:
        return None
    return float(discount ** max(partitions, 1))


@dataclass
class QCell:
    value: float = 0.0
    count: int = 0
    pulls: int = 0
    weight: float = 0.0
    successes: float = 0.0
    failures: float = 0.0
    total: float = 0.0
    sumsq: float = 0.0
    binary: bool = True
    fixes: int = 0  # outcomes replaced (a human correction): a change that count misses

    # -- learning --
    def update(self, reward: float, discount: float | None = None) -> QCell:
        """Count one outcome in place and return self (``discount``: see the module)."""
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
        if discount is not None and discount < 1.0:
            self.weight *= discount
            self.successes *= discount
            self.failures *= discount
            self.total *= discount
            self.sumsq *= discount
        self.count += 1
        self.weight += 1.0
        self.total += reward
        self.sumsq += reward * reward
        if reward not in (0.0, 1.0):
            self.binary = False
        # Fractional rewards still inform the Beta posterior, as a fractional trial.
        clipped = min(1.0, max(0.0, reward))
        self.successes += clipped
        self.failures += 1.0 - clipped
        self.value = self.mean
        return self

    def replace(self, old: float, new: float, weight: float = 1.0) -> QCell:
        """Swap one counted outcome ``old`` for ``new`` (a human correction); count unchanged.

        ``weight``: what the old outcome weighs now (under a discount it has decayed since
        it was counted: gamma to the number of outcomes counted after it); the new one takes
        its place at that weight, so the mean stays within the rewards' range.
        """
        if not (math.isfinite(old) and math.isfinite(new)):
            raise ValueError("reward must be finite")
        if self.count == 0:
            return self.update(new)
        self.total += (new - old) * weight
        self.sumsq += (new * new - old * old) * weight
        o, n = min(1.0, max(0.0, old)), min(1.0, max(0.0, new))
        self.successes = max(0.0, self.successes + (n - o) * weight)
        self.failures = max(0.0, self.failures + (o - n) * weight)
        if new not in (0.0, 1.0):
            self.binary = False
        self.fixes += 1
        self.value = self.mean
        return self

    def pulled(self) -> QCell:
        self.pulls += 1
        return self

    # -- statistics --
    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else 0.0

    @property
    def variance(self) -> float:
        if self.weight < 2:
            return 0.25  # the largest variance of a [0, 1] reward: an honest prior
        m = self.mean
        return max(self.sumsq / self.weight - m * m, 1e-6)

    # -- storage --
    def to_dict(self) -> dict[str, object]:
        # Spelled out: dataclasses.asdict deep-copies and was a hot spot of routing.
        return {
            "value": self.value,
            "count": self.count,
            "pulls": self.pulls,
            "weight": self.weight,
            "successes": self.successes,
            "failures": self.failures,
            "total": self.total,
            "sumsq": self.sumsq,
            "binary": self.binary,
            "fixes": self.fixes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QCell:
        """A cell from its :meth:`to_dict` form (a JSON table value, hence ``Any``)."""
        if not data:
            return cls()
        cell = cls(**{k: data[k] for k in _FIELDS if k in data})
        if "weight" not in data:  # written before the weight was a field of its own
            cell.weight = float((data.get("extra") or {}).get("weight", cell.count))
        return cell


_FIELDS = tuple(f.name for f in fields(QCell))


def merge(cells: Iterable[QCell]) -> QCell:
    """The sum of shards: the statistics of their pair over all of them."""
    out = QCell()
    for c in cells:
        out.count += c.count
        out.pulls += c.pulls
        out.weight += c.weight
        out.successes += c.successes
        out.failures += c.failures
        out.total += c.total
        out.sumsq += c.sumsq
        out.fixes += c.fixes
        out.binary = out.binary and c.binary
    out.value = out.mean
    return out


AUTO, HUMAN, EXPIRY = "auto", "human", "expiry"


@dataclass(frozen=True)
class Entry:
    """What counts for one attempt now: the agent, the value, where it came from, and how
    many outcomes its shard had counted then (how far a discount has decayed it since)."""

    agent: str
    value: float
    kind: str  # AUTO | HUMAN | EXPIRY
    trajectory_id: str = ""
    counted_at: int | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with an outcome: ``apply`` a new value, ``replace`` ``old``, or nothing."""

    action: str  # "apply" | "replace" | "duplicate"
    old: Entry | None = None


# What may replace what: a human word beats everything; a real reward beats the router's
# own guess that an attempt that expired had failed; nothing replaces a human reward.
_REPLACES = {HUMAN: {AUTO, EXPIRY}, AUTO: {EXPIRY}, EXPIRY: set[str]()}


class AttemptLedger:
    """The outcome counted for each attempt of one task (the router's ledger table).

    Stored as ``{str(attempt): [agent, value, kind, trajectory id, counted at]}`` (JSON
    round-trips). Attempt 0 holds a human reward that named no attempt and matched none.
    """

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._d: dict[str, list[Any]] = {k: list(v) for k, v in (data or {}).items()}

    def get(self, attempt: int) -> Entry | None:
        v = self._d.get(str(attempt))
        if not v:
            return None
        trajectory_id = str(v[3]) if len(v) > 3 else ""
        counted_at = int(v[4]) if len(v) > 4 and v[4] is not None else None
        return Entry(str(v[0]), float(v[1]), str(v[2]), trajectory_id, counted_at)

    def attempt_of(self, trajectory_id: str) -> int | None:
        """The attempt whose outcome came from ``trajectory_id`` (a reward that lacks it)."""
        for k, v in self._d.items():
            if len(v) > 3 and v[3] == trajectory_id:
                return int(k)
        return None

    def unnamed_attempt_of(self, agent: str) -> int | None:
        """The latest attempt of ``agent`` whose outcome names no trajectory (an expiry)."""
        found = [int(k) for k, v in self._d.items() if v[0] == agent and not (v[3:4] or [""])[0]]
        return max(found) if found else None

    def decide(self, attempt: int, kind: str) -> Decision:
        old = self.get(attempt)
        if old is None:
            return Decision("apply")
        if old.kind in _REPLACES[kind]:
            return Decision("replace", old)
        return Decision("duplicate", old)

    def record(self, attempt: int, entry: Entry) -> None:
        self._d[str(attempt)] = [
            entry.agent,
            entry.value,
            entry.kind,
            entry.trajectory_id,
            entry.counted_at,
        ]

    def __len__(self) -> int:
        return len(self._d)

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self._d.items()}
