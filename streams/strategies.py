"""Choosing an agent among candidates from their Q-cells. Pure: the RNG is passed in.

Strategies: ``epsilon_greedy`` (ε decays per task type as ``max(ε_min, ε0·decay^n)``),
``ucb1`` (mean + c·sqrt(2 ln N / n), unvisited agents first), ``thompson`` (Beta-Bernoulli
while every reward was 0/1, Gaussian on the sample mean otherwise), and two baselines,
``random`` and ``round_robin``, for the learning benchmark.

A trained policy (a checkpoint scorer) may add a prior: each candidate's index becomes
``(1-w)·index + w·prior`` before the arg-max. The ε-greedy exploration step ignores the
prior on purpose: exploring is what keeps the Q-table honest about the policy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stormline.streams.qtable import QCell

STRATEGIES = ("epsilon_greedy", "ucb1", "thompson", "random", "round_robin")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "thompson"
    epsilon: float = 0.2
    epsilon_min: float = 0.01
    epsilon_decay: float = 0.995
    ucb_c: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {STRATEGIES}")


@dataclass(frozen=True)
class Choice:
    agent_id: str
    score: float
    kind: str  # "qtable" | "explore" | "baseline" (PolicyKind values)
    epsilon: float | None = None


def decayed_epsilon(cfg: StrategyConfig, step: int) -> float:
    return max(cfg.epsilon_min, cfg.epsilon * cfg.epsilon_decay ** max(step, 0))


def choose_agent(
    cfg: StrategyConfig,
    cells: Mapping[str, QCell],
    rng: random.Random,
    *,
    step: int = 0,
    prior: Mapping[str, float] | None = None,
    prior_weight: float = 0.0,
) -> Choice:
    """Pick one of ``cells``' agents. ``step``: tasks of this type routed so far."""
    if not cells:
        raise ValueError("no candidates to choose from")
    agents = sorted(cells)  # a stable order makes seeded runs reproducible
    name = cfg.name
    if name == "random":
        a = rng.choice(agents)
        return Choice(a, cells[a].value, "baseline")
    if name == "round_robin":
        a = agents[step % len(agents)]
        return Choice(a, cells[a].value, "baseline")
    if name == "epsilon_greedy":
        eps = decayed_epsilon(cfg, step)
        if rng.random() < eps:
            a = rng.choice(agents)
            return Choice(a, cells[a].value, "explore", eps)
        index = {a: cells[a].value if cells[a].count else math.inf for a in agents}
        a, s = _argmax(index, rng, prior, prior_weight)
        return Choice(a, s, "qtable", eps)
    if name == "ucb1":
        a, s = _argmax(ucb_index(cells, cfg.ucb_c), rng, prior, prior_weight)
        return Choice(a, s, "qtable")
    # thompson
    a, s = _argmax(thompson_samples(cells, rng), rng, prior, prior_weight)
    return Choice(a, s, "qtable")


def ucb_index(cells: Mapping[str, QCell], c: float) -> dict[str, float]:
    # Exploration counts pulls, not rewards: rewards arrive late and counting only them would
    # send every task of a burst to the same untried agent.
    total = sum(max(cell.pulls, cell.count) for cell in cells.values())
    out: dict[str, float] = {}
    for a, cell in cells.items():
        n = max(cell.pulls, cell.count)
        if n == 0:
            out[a] = math.inf
            continue
        mean = cell.value if cell.count else 1.0  # optimistic until the first reward lands
        out[a] = mean + c * math.sqrt(2.0 * math.log(max(total, 1)) / n)
    return out


def thompson_samples(cells: Mapping[str, QCell], rng: random.Random) -> dict[str, float]:
    out: dict[str, float] = {}
    # In a stable order: the candidates come in the order heartbeats arrived (or a set's, by
    # the process's hash seed), and a seeded decision must not depend on either.
    for a in sorted(cells):
        cell = cells[a]
        if cell.binary:
            out[a] = rng.betavariate(1.0 + cell.successes, 1.0 + cell.failures)
        else:
            n = cell.weight  # the (discounted) evidence behind the mean
            mean = cell.mean if n > 0 else 0.5
            sd = math.sqrt(cell.variance / (n + 1))
            out[a] = rng.gauss(mean, sd)
    return out


def _argmax(
    index: Mapping[str, float],
    rng: random.Random,
    prior: Mapping[str, float] | None,
    weight: float,
) -> tuple[str, float]:
    if prior and weight > 0:
        index = {
            a: v if math.isinf(v) else (1 - weight) * v + weight * prior.get(a, 0.0)
            for a, v in index.items()
        }
    best = max(index.values())
    ties: Sequence[str] = [a for a, v in index.items() if v == best]
    a = ties[0] if len(ties) == 1 else rng.choice(sorted(ties))
    return a, (best if math.isfinite(best) else 1.0)
