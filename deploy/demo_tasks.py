"""The demo task set: verifiable tasks of four types, with their expected answers.

Prompts follow the simulated LLM's grading convention (``consumers/llm/simulation.py``), and
``expected`` is computed by the same solver, so the evaluator's verifiers score real answers
from real models just as well (run the demo with ``--real`` and an API key).
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Iterator

from stormline.consumers.llm.simulation import solve
from stormline.schemas.models import TaskSubmitted

TASK_TYPES = ("math", "reverse", "upper", "sort")
_WORDS = ["storm", "line", "kafka", "agent", "reward", "router", "faust", "policy", "event"]


def prompt_for(task_type: str, rng: random.Random) -> str:
    if task_type == "math":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"[type=math] What is {a} {rng.choice('+-*')} {b}?"
    if task_type == "reverse":
        word = rng.choice(_WORDS) + "".join(rng.choices(string.ascii_lowercase, k=3))
        return f"[type=reverse] Reverse: {word}"
    if task_type == "upper":
        return f"[type=upper] Uppercase: {' '.join(rng.sample(_WORDS, 3))}"
    if task_type == "sort":
        return f"[type=sort] Sort: {', '.join(str(rng.randint(1, 99)) for _ in range(5))}"
    raise ValueError(f"unknown demo task type {task_type!r}; choose from {TASK_TYPES}")


def demo_tasks(
    n: int, seed: int = 7, types: tuple[str, ...] = TASK_TYPES, run_id: str | None = None
) -> Iterator[TaskSubmitted]:
    rng = random.Random(seed)
    run_id = run_id or uuid.uuid4().hex[:8]
    for i in range(n):
        task_type = types[i % len(types)]
        prompt = prompt_for(task_type, rng)
        _, expected = solve(prompt)
        yield TaskSubmitted(
            task_id=f"demo-{run_id}-{i:06d}",
            task_type=task_type,
            prompt=prompt,
            expected=expected,
            required_capabilities=[task_type],
            priority=5,
            metadata={"demo_run": run_id},
        )
