"""The simulated LLM's behaviour, without any transport: solvers, skill table, faults, replies.

Both the HTTP server (``stormline simulate-llm``, :mod:`consumers.llm.simulator`) and the
in-process ``provider: simulated`` (:mod:`consumers.llm.providers.simulated_provider`) answer
through :func:`reply`, so they grade alike.

Grading convention (how the simulator knows the right answer): verifiable demo tasks are
*solvable by a deterministic solver*. A prompt may start with a tag ``[type=NAME]``; NAME is
the task type (it selects the skill row). The simulator then solves the prompt's text:

* ``math``    "What is 17 + 25?"           -> ``42``  (one ``a op b``, op in + - *)
* ``reverse`` "Reverse: stormline"          -> ``enilmrots``
* ``upper``   "Uppercase: hello world"      -> ``HELLO WORLD``
* ``sort``    "Sort: 3, 1, 2"               -> ``1, 2, 3`` (numbers numerically, else text)

Without a tag, the first solver whose pattern matches names the type. A task's ``expected``
is the solver's answer, so producers generate demo tasks with the same rules
(:func:`solve` is importable). With probability ``skill[model][type]`` the reply is the
right answer, otherwise a deterministic near miss. Prompts no solver understands get a
generic reply (type ``*``).

Configuration (YAML or JSON, ``--config``)::

    seed: 7
    default: {skill: {"*": 0.6}, latency_ms: 0, jitter_ms: 0, error_rate: 0.0}
    models:
      sim-math: {skill: {math: 0.95, "*": 0.4}, latency_ms: 200, jitter_ms: 50}
      sim-busy: {requests_per_s: 5, rate_limit_hint: reset}

``requests_per_s`` (0: none) makes a model behave like a rate-limited provider: beyond it (a
bucket of ``max(1, requests_per_s)``) it answers 429 saying when the next request fits, in
the headers ``rate_limit_hint`` names (see :data:`HINTS`).
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, Field


# ----------------------------------------------------------------------- solvers --
def _math(text: str) -> str | None:
    m = re.search(r"(-?\d+)\s*([+\-*])\s*(-?\d+)", text)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _after_colon(text: str, word: str) -> str | None:
    m = re.search(rf"\b{word}\w*\b[^:\n]*:\s*(.+?)\s*$", text, re.I | re.S)
    return m.group(1) if m else None


def _reverse(text: str) -> str | None:
    body = _after_colon(text, "reverse")
    return body[::-1] if body is not None else None


def _upper(text: str) -> str | None:
    body = _after_colon(text, "upper")
    return body.upper() if body is not None else None


def _sort(text: str) -> str | None:
    body = _after_colon(text, "sort")
    if body is None:
        return None
    items = [x.strip() for x in body.split(",") if x.strip()]
    try:
        ordered = [str(n) for n in sorted(int(x) for x in items)]
    except ValueError:
        ordered = sorted(items)
    return ", ".join(ordered)


SOLVERS: dict[str, Callable[[str], str | None]] = {
    "math": _math,
    "reverse": _reverse,
    "upper": _upper,
    "sort": _sort,
}
_TAG = re.compile(r"^\s*\[type=([A-Za-z0-9_.-]+)\]\s*")


def solve(prompt: str) -> tuple[str, str | None]:
    """(task type, right answer or None) for a prompt, by the convention above."""
    tag = _TAG.match(prompt)
    body = prompt[tag.end() :] if tag else prompt
    if tag:
        name = tag.group(1)
        solver = SOLVERS.get(name)
        if solver is not None:
            return name, solver(body)
        return name, next((a for f in SOLVERS.values() if (a := f(body)) is not None), None)
    for name, solver in SOLVERS.items():
        answer = solver(body)
        if answer is not None:
            return name, answer
    return "*", None


def near_miss(answer: str) -> str:
    """A deterministic wrong answer that no normalising verifier accepts."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    if ", " in answer:
        return ", ".join(reversed(answer.split(", "))) + ", 0"
    return answer[1:] + answer[:1] + "?" if len(answer) > 1 else answer + "?"


# ------------------------------------------------------------------------ config --
# How a simulated 429 says when to come back (the headers are the transport's to spell):
# retry-after and the dialect's own rate-limit headers, retry-after alone (whole seconds),
# retry-after as an HTTP date, or only the exhausted limit's remaining 0 and its reset.
Hint = Literal["all", "retry-after", "retry-after-date", "reset"]
HINTS: tuple[str, ...] = get_args(Hint)


class ModelProfile(BaseModel):
    skill: dict[str, float] = Field(default_factory=lambda: {"*": 0.7})
    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    requests_per_s: float = Field(default=0.0, ge=0)  # 0: no rate limit
    rate_limit_hint: Hint = "all"

    def p_correct(self, task_type: str) -> float:
        return self.skill.get(task_type, self.skill.get("*", 0.7))


class SimConfig(BaseModel):
    seed: int | None = None
    default: ModelProfile = Field(default_factory=ModelProfile)
    models: dict[str, ModelProfile] = Field(default_factory=dict)

    def profile(self, model: str) -> ModelProfile:
        return self.models.get(model, self.default)


# The skill table behind the example agents.yaml; a --config file replaces it.
DEFAULT_CONFIG = SimConfig(
    default=ModelProfile(skill={"*": 0.6}),
    models={
        "sim-generalist": ModelProfile(skill={"*": 0.7}),
        "sim-math": ModelProfile(skill={"math": 0.95, "*": 0.35}),
        "sim-text": ModelProfile(skill={"reverse": 0.95, "upper": 0.97, "sort": 0.9, "*": 0.3}),
        "sim-intern": ModelProfile(skill={"*": 0.45}),
        "sim-expert": ModelProfile(skill={"*": 0.9}, latency_ms=50, jitter_ms=20),
    },
)


def load_config(path: Path | str | None) -> SimConfig:
    if path is None:
        return DEFAULT_CONFIG.model_copy(deep=True)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: simulator config not found")
    return SimConfig.model_validate(yaml.safe_load(p.read_text(encoding="utf-8")) or {})


# ------------------------------------------------------------------------- state --
@dataclass
class Fault:
    kind: str
    remaining: int | None = None
    until: float | None = None
    model: str | None = None
    hang_s: float = 3600.0
    retry_after_s: float | None = None  # a 429 that says when to retry; None: a bare 429
    hint: str = "all"  # which headers say it (HINTS)

    def active(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        return not (self.until is not None and now > self.until)


@dataclass
class SimState:
    config: SimConfig
    rng: random.Random = field(default_factory=random.Random)
    faults: list[Fault] = field(default_factory=list)
    requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)
    credentials: Counter[str] = field(default_factory=Counter)
    faults_served: Counter[str] = field(default_factory=Counter)
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # (tokens, at)
    # (monotonic arrival time, model, status, prompt's first 80 characters) of the latest
    # requests, oldest first.
    timeline: deque[tuple[float, str, int, str]] = field(
        default_factory=lambda: deque(maxlen=10_000)
    )

    def take_request(self, model: str, rate: float, now: float) -> float:
        """A token bucket per model: 0 if the request fits, else seconds until one does."""
        burst = max(1.0, rate)
        tokens, at = self.buckets.get(model, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
        self.buckets[model] = (tokens - 1 if not wait else tokens, now)
        return wait

    def take_fault(self, model: str) -> Fault | None:
        now = time.monotonic()
        for f in self.faults:
            if f.active(now) and (f.model is None or f.model == model):
                if f.remaining is not None:
                    f.remaining -= 1
                self.faults_served[f.kind] += 1
                return f
        return None


@dataclass(frozen=True)
class Reply:
    """What the simulated model does with one prompt, before any transport."""

    status: int  # 200, or the HTTP error status
    text: str  # the answer, or the error message
    task_type: str = "*"
    p: float = 0.5  # probability of the answer given (logprobs are derived from it)
    delay_s: float = 0.0
    retry_after_s: float | None = None  # a 429's "come back in"
    hint: str = "all"


def reply(st: SimState, model: str, prompt: str) -> Reply:
    """Decide one reply (see :func:`_decide`) and note it on the timeline."""
    r = _decide(st, model, prompt)
    st.timeline.append((time.monotonic(), model, r.status, prompt[:80]))
    return r


def _decide(st: SimState, model: str, prompt: str) -> Reply:
    """Decide one reply: fault, latency, error rate, then a right answer or a near miss."""
    st.requests += 1
    st.by_model[model] += 1
    st.by_prompt[prompt] += 1
    profile = st.config.profile(model)
    fault = st.take_fault(model)
    if fault is not None:
        if fault.kind == "hang":
            # Clients time out long before; should one wait, it gets a gateway timeout.
            return Reply(504, "simulated hang", delay_s=fault.hang_s)
        return Reply(
            int(fault.kind),
            f"simulated fault {fault.kind}",
            retry_after_s=fault.retry_after_s if fault.kind == "429" else None,
            hint=fault.hint,
        )
    if profile.requests_per_s:
        wait = st.take_request(model, profile.requests_per_s, time.monotonic())
        if wait:
            return Reply(
                429,
                f"simulated rate limit of {profile.requests_per_s:g} requests/s",
                retry_after_s=wait,
                hint=profile.rate_limit_hint,
            )
    delay = 0.0
    if profile.latency_ms or profile.jitter_ms:
        delay = max(0.0, st.rng.gauss(profile.latency_ms, profile.jitter_ms)) / 1000
    if profile.error_rate and st.rng.random() < profile.error_rate:
        return Reply(500, "simulated server error", delay_s=delay)
    task_type, right = solve(prompt)
    if right is None:
        return Reply(200, f"(simulated {model}) I read: {prompt[:80]}", delay_s=delay)
    p = profile.p_correct(task_type)
    correct = st.rng.random() < p
    text = right if correct else near_miss(right)
    return Reply(200, text, task_type, p if correct else 1 - p, delay)


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text) or [text]


def token_id(tok: str) -> int:
    """A stable fake token id (vLLM spells token ids as ``token_id:N``)."""
    return int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=3).digest(), "big") % 100_000
