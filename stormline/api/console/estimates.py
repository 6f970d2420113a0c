"""The router's estimate per (task type, agent) with its uncertainty, and circuit states.

Pure, no I/O. The uncertainty is the posterior the router's Thompson strategy samples from
(``streams.strategies.thompson_samples``): Beta(1 + successes, 1 + failures) for 0/1
rewards, else a normal of the cell's mean with sd sqrt(variance / (n + 1)). The interval is
mean +- 1.96 sd of that posterior (a normal approximation for the Beta), clipped to [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from stormline.schemas.models import HealthStatus
from stormline.streams.health import probe_ready_at
from stormline.streams.qtable import QCell

Z95 = 1.96


class Estimate(BaseModel):
    task_type: str
    agent_id: str
    value: float  # the router's current estimate (what greedy routing compares)
    posterior_mean: float
    sd: float
    low: float
    high: float
    rewards: int
    assignments: int
    share: float | None  # the agent's part of this task type's assignments


def posterior(cell: QCell) -> tuple[float, float]:
    """(mean, sd) of the distribution Thompson sampling draws this cell's score from."""
    if cell.binary:
        a, b = 1.0 + cell.successes, 1.0 + cell.failures
        return a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))
    n = cell.count
    return (cell.mean if n else 0.5), math.sqrt(cell.variance / (n + 1))


def estimates(qtable: dict[str, dict[str, Any]]) -> list[Estimate]:
    """One row per (task type, agent) of the router's ``/router/qtable/`` view."""
    out: list[Estimate] = []
    for task_type, cells in sorted(qtable.items()):
        parsed = {a: QCell.from_dict(c) for a, c in cells.items()}
        pulls = sum(c.pulls for c in parsed.values())
        for agent, cell in sorted(parsed.items()):
            mean, sd = posterior(cell)
            out.append(
                Estimate(
                    task_type=task_type,
                    agent_id=agent,
                    value=cell.value,
                    posterior_mean=mean,
                    sd=sd,
                    low=max(0.0, mean - Z95 * sd),
                    high=min(1.0, mean + Z95 * sd),
                    rewards=cell.count,
                    assignments=cell.pulls,
                    share=cell.pulls / pulls if pulls else None,
                )
            )
    return out


def circuit(status: str, previous: str, since: float | None, cooldown_s: float, now: float) -> str:
    """The agent's circuit breaker as the router sees it (``streams.health``): closed while
    healthy, open while degraded and cooling down, half-open once probes may go."""
    try:
        st, prev = HealthStatus(status), HealthStatus(previous or "unknown")
    except ValueError:
        return "unknown"
    if st is HealthStatus.HEALTHY:
        return "closed"
    if st is HealthStatus.DOWN:
        return "open (no heartbeat)"
    if st is HealthStatus.DEGRADED:
        ready = probe_ready_at(st, prev, since or now, cooldown_s)
        return "half-open (probing)" if ready is not None and now >= ready else "open"
    return "unknown"
