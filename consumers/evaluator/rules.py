"""Reward logic: turn one Trajectory into one scored Evaluation, then into a Reward event.

Pure code: no Kafka, no Redis. The only I/O is the LLM-as-judge call, and it goes through
the :class:`~consumers.llm.LLMProvider` protocol handed in by the caller.

Evaluator specs are strings, ``name`` or ``name:argument``:

* ``exact`` - the output equals ``expected`` (surrounding whitespace ignored).
* ``normalised`` (or ``normalized``) - equal after Unicode NFKC, case folding, dropping
  punctuation and collapsing whitespace.
* ``regex[:PATTERN]`` - ``re.search`` of PATTERN (default: ``expected``) in the output.
* ``json_schema`` - the output (or its first fenced/embedded JSON block) is JSON and, when
  ``expected`` holds a JSON schema, valid against it.
* ``numeric[:TOL]`` - the last number in the output is within TOL (absolute) of ``expected``;
  without TOL, a relative tolerance of 1e-6.
* ``judge[:RUBRIC]`` - an LLM scores the output 0-10 against RUBRIC (default: the configured
  rubric); the value is score / 10.

Which one runs: the trajectory's ``evaluator`` (copied from the task), else the per-task-type
mapping, else ``normalised`` when ``expected`` is set, else the judge when one is configured.
A trajectory whose status is not ``ok`` skips all of that: the failure policy gives it
``failure_value`` with source ``timeout`` or ``failure`` and the error as reason. The
router's own final-failure trajectory (agent or provider ``stormline-router``) is not
scored at all (:func:`is_router_outcome`): the router gave that task its one outcome.

Why this file is longer than ~400 lines: it is the whole of "how one trajectory is scored",
by family in sections (choosing, verifiers, judge, rewards), each a few dozen lines, and it
is one of the modules held to strict typing (pyproject's ``[tool.mypy]`` list names it).
The seam, when it grows, is the judge section into ``judge.py`` next to it, added to that
strict list in the same change.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from stormline.consumers.llm import CompletionRequest, LLMProvider
from stormline.logs import redact
from stormline.schemas.models import (
    ROUTER_AGENT,
    Reward,
    RewardSource,
    Trajectory,
    TrajectoryStatus,
    stable_event_id,
)

MAX_REASON_CHARS = 2_000
# Python's re has no timeout; bounding what a task-supplied pattern may scan bounds the
# worst case of a pathological pattern.
MAX_REGEX_INPUT_CHARS = 20_000
MAX_PATTERN_CHARS = 2_000

JUDGE_SYSTEM_PROMPT = (
    "You are a strict, fair evaluator of answers written by AI agents. Score the response "
    "against the rubric. Reply with only a JSON object, no prose around it: "
    '{"score": <number from 0 to 10>, "reason": "<one short sentence>", '
    '"criteria": {"<criterion>": <number from 0 to 10>, ...}}. "criteria" is optional.'
)
DEFAULT_RUBRIC = (
    "10: correct, complete and directly answers the task. 5: partly correct or incomplete. "
    "0: wrong, off-topic, harmful or empty."
)

VERIFIERS = ("exact", "normalised", "regex", "json_schema", "numeric")
ALIASES = {"normalized": "normalised", "jsonschema": "json_schema", "llm_judge": "judge"}


class EvaluationError(ValueError):
    """The trajectory cannot be scored as configured; the message says how to fix it."""


@dataclass(frozen=True)
class Evaluation:
    value: float
    source: RewardSource
    components: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    evaluator: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise EvaluationError(f"{self.evaluator}: reward value {self.value} is not finite")


@dataclass(frozen=True)
class Spec:
    name: str
    argument: str | None = None

    @property
    def is_judge(self) -> bool:
        return self.name == "judge"

    def __str__(self) -> str:
        return self.name if self.argument is None else f"{self.name}:{self.argument}"


def parse_spec(text: str) -> Spec:
    name, sep, arg = text.strip().partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in (*VERIFIERS, "judge"):
        raise EvaluationError(
            f"unknown evaluator {text!r}; use one of {', '.join((*VERIFIERS, 'judge'))} "
            "(optionally name:argument)"
        )
    return Spec(name, arg if sep else None)


# ------------------------------------------------------------------------ choosing --
def is_router_outcome(trajectory: Trajectory) -> bool:
    """The router's own final-failure trajectory: the router already gave the task its
    one failure Reward, so scoring it here would give that task a second outcome."""
    return ROUTER_AGENT in (trajectory.agent_id, trajectory.provider)


def choose_evaluator(
    trajectory: Trajectory, by_task_type: dict[str, str], *, judge_configured: bool
) -> Spec:
    """The evaluator for an ok trajectory (see the module docstring for the order)."""
    if trajectory.evaluator:
        return parse_spec(trajectory.evaluator)
    mapped = by_task_type.get(trajectory.task_type) or by_task_type.get("*")
    if mapped:
        return parse_spec(mapped)
    if trajectory.expected is not None:
        return Spec("normalised")
    if judge_configured:
        return Spec("judge")
    raise EvaluationError(
        f"no evaluator for task type {trajectory.task_type!r}: the task has no 'evaluator' "
        "and no 'expected'; set one of them, map the task type in "
        "STORMLINE_EVALUATOR_BY_TASK_TYPE, or configure a judge (STORMLINE_JUDGE_PROVIDER)"
    )


def failure(trajectory: Trajectory, failure_value: float = 0.0) -> Evaluation | None:
    """The failure policy: an Evaluation for a trajectory that did not finish ok, else None."""
    if trajectory.status == TrajectoryStatus.OK:
        return None
    source = (
        RewardSource.TIMEOUT
        if trajectory.status == TrajectoryStatus.TIMEOUT
        else RewardSource.FAILURE
    )
    reason = trajectory.error or f"trajectory status {trajectory.status.value}"
    return Evaluation(
        value=failure_value,
        source=source,
        components={"failed": 1.0},
        reason=reason[:MAX_REASON_CHARS],
        evaluator="failure_policy",
    )


# ----------------------------------------------------------------------- verifiers --
def verify(spec: Spec, output: str | None, expected: str | None) -> Evaluation:
    """Run one verifier. Raises EvaluationError when it cannot run (e.g. no ``expected``)."""
    out = output or ""
    if spec.name == "exact":
        ok = out.strip() == _need(expected, spec).strip()
        return _binary(spec, ok, {"exact_match": float(ok)})
    if spec.name == "normalised":
        want = _need(expected, spec)
        exact = out.strip() == want.strip()
        ok = normalise(out) == normalise(want)
        return _binary(spec, ok, {"normalised_match": float(ok), "exact_match": float(exact)})
    if spec.name == "regex":
        return _regex(spec, out, expected)
    if spec.name == "json_schema":
        return _json_schema(spec, out, expected)
    if spec.name == "numeric":
        return _numeric(spec, out, _need(expected, spec))
    raise EvaluationError(f"{spec} is not a verifier")


_PUNCT_CATEGORIES = ("P",)
# ASCII text is its own NFKC form and casefolds as lower() does, so its punctuation as one
# translate table gives what the per-character path below gives, without a call per character.
_ASCII_PUNCT = {
    c: " " for c in range(128) if unicodedata.category(chr(c)).startswith(_PUNCT_CATEGORIES)
}


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII_PUNCT).split())
    return _normalise_unicode(text)


def _normalise_unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        " " if unicodedata.category(ch).startswith(_PUNCT_CATEGORIES) else ch for ch in text
    )
    return " ".join(text.split())


def _need(expected: str | None, spec: Spec) -> str:
    if expected is None:
        raise EvaluationError(
            f"evaluator {spec} needs the task's 'expected' value, and this task has none"
        )
    return expected


def _binary(spec: Spec, ok: bool, components: dict[str, float], why: str = "") -> Evaluation:
    reason = f"{spec.name}: {'match' if ok else 'no match'}" + (f" ({why})" if why else "")
    return Evaluation(
        value=1.0 if ok else 0.0,
        source=RewardSource.VERIFIER,
        components=components,
        reason=reason[:MAX_REASON_CHARS],
        evaluator=str(spec),
    )


def _regex(spec: Spec, out: str, expected: str | None) -> Evaluation:
    pattern = spec.argument if spec.argument is not None else _need(expected, spec)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise EvaluationError(f"regex pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise EvaluationError(f"invalid regex {pattern!r}: {exc}") from exc
    ok = compiled.search(out[:MAX_REGEX_INPUT_CHARS]) is not None
    return _binary(spec, ok, {"regex_match": float(ok)})


_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.S | re.I)


def extract_json(text: str) -> Any:
    """The JSON value in an LLM answer: the whole text, a fenced block, or the outermost
    {...}/[...] span. Raises ValueError when there is none."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for cand in candidates:
        try:
            return json.loads(cand)
        except ValueError:
            continue
    raise ValueError("no JSON value found in the output")


def _json_schema(spec: Spec, out: str, expected: str | None) -> Evaluation:
    schema: Any = None
    if expected is not None and expected.strip():
        try:
            schema = json.loads(expected)
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except (ValueError, jsonschema.SchemaError) as exc:
            msg = exc.message if isinstance(exc, jsonschema.SchemaError) else str(exc)
            raise EvaluationError(
                f"json_schema: the task's 'expected' is not a valid JSON schema: {msg}"
            ) from exc
    try:
        value = extract_json(out)
    except ValueError:
        return _binary(spec, False, {"json_parsed": 0.0, "schema_valid": 0.0}, "output is not JSON")
    if schema is None:
        return _binary(spec, True, {"json_parsed": 1.0, "schema_valid": 1.0})
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    ok = not errors
    why = "" if ok else f"{len(errors)} schema error(s), first: {errors[0].message}"
    return _binary(
        spec,
        ok,
        {"json_parsed": 1.0, "schema_valid": float(ok), "schema_errors": float(len(errors))},
        why[:500],
    )


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The last number written in ``text`` ("The answer is 1,234.5." -> 1234.5)."""
    found = [m.group(0) for m in _NUMBER.finditer(text) if any(c.isdigit() for c in m.group(0))]
    for raw in reversed(found):
        try:
            value = float(raw.replace(",", ""))
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return None


def _numeric(spec: Spec, out: str, expected: str) -> Evaluation:
    want = parse_number(expected)
    if want is None:
        raise EvaluationError(f"numeric: the task's 'expected' {expected[:80]!r} is not a number")
    abs_tol = 0.0
    rel_tol = 1e-6
    if spec.argument is not None:
        try:
            abs_tol = float(spec.argument)
        except ValueError as exc:
            raise EvaluationError(
                f"numeric: tolerance {spec.argument!r} is not a number (use numeric:0.01)"
            ) from exc
        if not math.isfinite(abs_tol) or abs_tol < 0:
            raise EvaluationError("numeric: tolerance must be a finite number >= 0")
        rel_tol = 0.0
    got = parse_number(out)
    if got is None:
        return _binary(spec, False, {"numeric_parsed": 0.0}, "no number in the output")
    err = abs(got - want)
    ok = math.isclose(got, want, rel_tol=rel_tol, abs_tol=max(abs_tol, 1e-12))
    components = {"numeric_parsed": 1.0, "within_tolerance": float(ok)}
    if math.isfinite(err):
        components["abs_error"] = err
    return _binary(spec, ok, components, f"got {got:g}, expected {want:g}")


# -------------------------------------------------------------------------- judge --
def task_prompt(trajectory: Trajectory) -> str:
    """The task as the agent saw it: the first user message of its steps."""
    for step in trajectory.steps:
        if step.role == "user":
            return step.content
    return ""


def judge_request(
    trajectory: Trajectory,
    *,
    rubric: str,
    model: str,
    max_tokens: int = 300,
    timeout_s: float = 30.0,
) -> CompletionRequest:
    parts = [f"Rubric:\n{rubric}", f"Task:\n{task_prompt(trajectory) or '(not recorded)'}"]
    if trajectory.expected is not None:
        parts.append(f"Reference answer:\n{trajectory.expected}")
    parts.append(f"Response to score:\n{trajectory.output or ''}")
    return CompletionRequest(
        agent_id="stormline-judge",
        model=model,
        prompt="\n\n".join(parts),
        system_prompt=JUDGE_SYSTEM_PROMPT,
        max_tokens=max_tokens,
        temperature=0.0,
        timeout_s=timeout_s,
        task_type=trajectory.task_type,
    )


_SCORE = re.compile(r"score\W{0,5}(-?\d+(?:\.\d+)?)", re.I)


def parse_judgement(text: str, spec: Spec | None = None) -> Evaluation:
    """The judge's reply (JSON preferred, "score: N" accepted) as an Evaluation."""
    spec = spec or Spec("judge")
    score: float | None = None
    reason = ""
    components: dict[str, float] = {}
    try:
        data = extract_json(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and _is_number(data.get("score")):
        score = float(data["score"])
        reason = str(data.get("reason") or "")
        criteria = data.get("criteria")
        if isinstance(criteria, dict):
            for name, val in list(criteria.items())[:20]:
                if _is_number(val):
                    components[f"judge_{str(name)[:64]}"] = min(max(float(val) / 10, 0.0), 1.0)
    else:
        m = _SCORE.search(text)
        if m:
            score = float(m.group(1))
            reason = text.strip()
    if score is None or not math.isfinite(score):
        raise EvaluationError(f"judge reply has no score: {text[:200]!r}")
    components["judge_score"] = score
    return Evaluation(
        value=min(max(score / 10, 0.0), 1.0),
        source=RewardSource.JUDGE,
        components=components,
        reason=f"judge: {reason}"[:MAX_REASON_CHARS] if reason else "judge",
        evaluator=str(spec),
    )


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


async def judge(
    provider: LLMProvider,
    trajectory: Trajectory,
    *,
    spec: Spec,
    default_rubric: str,
    model: str,
    timeout_s: float = 30.0,
) -> Evaluation:
    """Ask ``provider`` to score the trajectory. ProviderError propagates to the caller."""
    rubric = spec.argument or default_rubric
    request = judge_request(trajectory, rubric=rubric, model=model, timeout_s=timeout_s)
    completion = await provider.complete(request)
    return parse_judgement(completion.output, spec)


# ------------------------------------------------------------------------ rewards --
def reward_for(trajectory: Trajectory, evaluation: Evaluation) -> Reward:
    """The Reward event: the score plus what identifies the attempt it scores.

    Its id comes from the trajectory and the source, so a trajectory scored again (after an
    evaluator restart between producing and committing) gives the same event, not a second.
    The attempt's cost rides along as the ``cost_usd`` component, for cost-aware routing
    (the router may read a reward before its trajectory).
    """
    components = dict(evaluation.components)
    if trajectory.usage.cost_usd:
        components["cost_usd"] = trajectory.usage.cost_usd
    return Reward(
        event_id=stable_event_id("reward", trajectory.trajectory_id, evaluation.source.value),
        task_id=trajectory.task_id,
        trajectory_id=trajectory.trajectory_id,
        attempt=trajectory.attempt,
        agent_id=trajectory.agent_id,
        task_type=trajectory.task_type,
        policy_version=trajectory.policy_version,
        value=evaluation.value,
        components=components,
        source=evaluation.source,
        # A judge's reply or a provider's error text is outside our control: no key that is
        # in this process's environment may ride along into the event.
        reason=redact(evaluation.reason) if evaluation.reason else evaluation.reason,
    )


def evaluate_without_judge(
    trajectory: Trajectory,
    by_task_type: dict[str, str],
    *,
    judge_configured: bool,
    failure_value: float = 0.0,
) -> Evaluation | Spec:
    """Everything that needs no LLM: the failure policy or a verifier's Evaluation; the
    judge's Spec when the judge must run (the caller awaits :func:`judge`)."""
    failed = failure(trajectory, failure_value)
    if failed is not None:
        return failed
    spec = choose_evaluator(trajectory, by_task_type, judge_configured=judge_configured)
    if spec.is_judge:
        if not judge_configured:
            raise EvaluationError(
                "evaluator 'judge' requested but no judge is configured; set "
                "STORMLINE_JUDGE_PROVIDER and STORMLINE_JUDGE_MODEL"
            )
        return spec
    return verify(spec, trajectory.output, trajectory.expected)
