"""Reward logic, pure: verifiers, evaluator choice, failure policy, judge parsing."""

from __future__ import annotations

import json
import random

import pytest

from stormline.consumers.evaluator import rules as ev
from stormline.consumers.evaluator.rules import Evaluation, EvaluationError, Spec
from stormline.consumers.llm import Completion, CompletionRequest, ErrorKind, ProviderError
from stormline.schemas.models import RewardSource, Step, Trajectory, TrajectoryStatus


def traj(**kw: object) -> Trajectory:
    base: dict[str, object] = {
        "task_id": "t1",
        "trajectory_id": "tr1",
        "attempt": 2,
        "agent_id": "a1",
        "task_type": "qa",
        "policy_version": "router@3",
        "status": TrajectoryStatus.OK,
        "output": "4",
    }
    base.update(kw)
    return Trajectory.model_validate(base)


# ------------------------------------------------------------------------- verifiers --
def test_exact_ignores_only_surrounding_whitespace() -> None:
    assert ev.verify(Spec("exact"), " Paris\n", "Paris").value == 1.0
    r = ev.verify(Spec("exact"), "paris", "Paris")
    assert r.value == 0.0
    assert r.components == {"exact_match": 0.0}
    assert r.source == RewardSource.VERIFIER


@pytest.mark.parametrize(
    ("output", "expected", "value"),
    [
        ("  The  Eiffel Tower!", "the eiffel tower", 1.0),
        ("PARIS.", "Paris", 1.0),
        ("\uff30\uff41\uff52\uff49\uff53", "paris", 1.0),  # full-width letters: NFKC
        ("Paris, France", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_normalised_match(output: str, expected: str, value: float) -> None:
    r = ev.verify(Spec("normalised"), output, expected)
    assert r.value == value
    assert r.components["normalised_match"] == value


def test_normalising_ascii_text_takes_the_same_rules_as_any_text() -> None:
    """ASCII text is normalised through a translate table; it must give what the
    per-character Unicode rules give, for every ASCII character and mixes of them."""
    every = "".join(chr(c) for c in range(128))
    rng = random.Random(11)
    samples = [every, every[::-1], "  The  Eiffel Tower!", "A_b-c", "x\x1fy\x0bz", ""]
    samples += ["".join(rng.choices(every, k=rng.randint(1, 60))) for _ in range(3_000)]
    for text in samples:
        assert text.isascii()
        assert ev.normalise(text) == ev._normalise_unicode(text), repr(text)
    assert ev.normalise("Caf\u00e9, S\u00c3O!") == "caf\u00e9 s\u00e3o"  # the Unicode rules


def test_normalised_reports_exact_component_too() -> None:
    r = ev.verify(ev.parse_spec("normalized"), "paris", "Paris")
    assert r.components == {"normalised_match": 1.0, "exact_match": 0.0}


def test_regex_from_expected_or_argument() -> None:
    assert ev.verify(Spec("regex"), "answer: 42", r"\b42\b").value == 1.0
    assert ev.verify(Spec("regex"), "answer: 421", r"\b42\b").value == 0.0
    assert ev.verify(ev.parse_spec(r"regex:^yes"), "yes sir", None).value == 1.0
    with pytest.raises(EvaluationError, match="invalid regex"):
        ev.verify(Spec("regex"), "x", "(")


def test_json_schema_validity() -> None:
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }
    )
    good = ev.verify(Spec("json_schema"), 'Here:\n```json\n{"name": "a", "age": 3}\n```', schema)
    assert good.value == 1.0
    assert good.components["schema_valid"] == 1.0
    bad = ev.verify(Spec("json_schema"), '{"name": "a", "age": "three"}', schema)
    assert bad.value == 0.0
    assert bad.components == {"json_parsed": 1.0, "schema_valid": 0.0, "schema_errors": 1.0}
    assert "three" in (bad.reason or "")
    not_json = ev.verify(Spec("json_schema"), "no json here", schema)
    assert not_json.components["json_parsed"] == 0.0
    # no schema: any JSON passes
    assert ev.verify(Spec("json_schema"), "[1, 2]", None).value == 1.0
    with pytest.raises(EvaluationError, match="not a valid JSON schema"):
        ev.verify(Spec("json_schema"), "{}", '{"type": 12}')


def test_numeric_tolerance() -> None:
    assert ev.verify(Spec("numeric"), "The answer is 1,234.5.", "1234.5").value == 1.0
    assert ev.verify(Spec("numeric"), "about 3.14", "3.14159").value == 0.0
    close = ev.verify(ev.parse_spec("numeric:0.01"), "about 3.14", "3.14159")
    assert close.value == 1.0
    assert close.components["abs_error"] == pytest.approx(0.00159)
    assert ev.verify(Spec("numeric"), "-2e3", "-2000").value == 1.0
    none = ev.verify(Spec("numeric"), "no idea", "5")
    assert none.value == 0.0
    assert none.components == {"numeric_parsed": 0.0}
    with pytest.raises(EvaluationError, match="not a number"):
        ev.verify(Spec("numeric"), "5", "five")
    with pytest.raises(EvaluationError, match="tolerance"):
        ev.verify(ev.parse_spec("numeric:abc"), "5", "5")


def test_verifier_without_expected_says_what_is_missing() -> None:
    with pytest.raises(EvaluationError, match="'expected'"):
        ev.verify(Spec("exact"), "x", None)


def test_values_stay_in_unit_interval() -> None:
    cases = [
        (Spec("exact"), "a", "a"),
        (Spec("normalised"), "a", "b"),
        (Spec("regex"), "a", "a"),
        (Spec("json_schema"), "{}", None),
        (Spec("numeric"), "1", "2"),
    ]
    for spec, out, exp in cases:
        assert 0.0 <= ev.verify(spec, out, exp).value <= 1.0


# ---------------------------------------------------------------------- choice --
def test_choice_order_task_then_type_then_expected_then_judge() -> None:
    mapping = {"math": "numeric:0.5", "*": "regex:.+"}
    assert ev.choose_evaluator(
        traj(evaluator="exact", task_type="math"), mapping, judge_configured=True
    ) == Spec("exact")
    assert ev.choose_evaluator(traj(task_type="math"), mapping, judge_configured=False) == Spec(
        "numeric", "0.5"
    )
    assert ev.choose_evaluator(traj(task_type="other"), mapping, judge_configured=False) == Spec(
        "regex", ".+"
    )
    assert ev.choose_evaluator(traj(expected="4"), {}, judge_configured=True) == Spec("normalised")
    assert ev.choose_evaluator(traj(), {}, judge_configured=True).is_judge
    with pytest.raises(EvaluationError, match="STORMLINE_EVALUATOR_BY_TASK_TYPE"):
        ev.choose_evaluator(traj(), {}, judge_configured=False)
    with pytest.raises(EvaluationError, match="unknown evaluator"):
        ev.choose_evaluator(traj(evaluator="bleu"), {}, judge_configured=False)


def test_evaluate_without_judge_scores_a_correct_answer() -> None:
    res = ev.evaluate_without_judge(traj(expected=" 4 "), {}, judge_configured=False)
    assert isinstance(res, Evaluation)
    reward = ev.reward_for(traj(expected="4"), res)
    assert reward.value == 1.0
    assert (reward.task_id, reward.trajectory_id, reward.agent_id) == ("t1", "tr1", "a1")
    assert (reward.attempt, reward.task_type, reward.policy_version) == (2, "qa", "router@3")
    assert reward.source == RewardSource.VERIFIER


def test_a_reward_carries_its_attempts_cost_for_cost_aware_routing() -> None:
    t = traj(expected="4", usage={"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.02})
    res = ev.evaluate_without_judge(t, {}, judge_configured=False)
    assert isinstance(res, Evaluation)
    assert ev.reward_for(t, res).components["cost_usd"] == 0.02
    assert "cost_usd" not in ev.reward_for(traj(expected="4"), res).components


def test_judge_requested_without_a_judge_is_an_error() -> None:
    with pytest.raises(EvaluationError, match="STORMLINE_JUDGE_PROVIDER"):
        ev.evaluate_without_judge(traj(evaluator="judge"), {}, judge_configured=False)
    spec = ev.evaluate_without_judge(traj(evaluator="judge:be kind"), {}, judge_configured=True)
    assert spec == Spec("judge", "be kind")


# ---------------------------------------------------------------- failure policy --
@pytest.mark.parametrize(
    ("status", "source"),
    [
        (TrajectoryStatus.ERROR, RewardSource.FAILURE),
        (TrajectoryStatus.TIMEOUT, RewardSource.TIMEOUT),
        (TrajectoryStatus.UNKNOWN, RewardSource.FAILURE),
    ],
)
def test_failure_policy(status: TrajectoryStatus, source: RewardSource) -> None:
    t = traj(status=status, error="server: 500 after 3 tries", output=None, expected="4")
    res = ev.evaluate_without_judge(t, {}, judge_configured=True)
    assert isinstance(res, Evaluation)
    assert (res.value, res.source, res.reason) == (0.0, source, "server: 500 after 3 tries")
    assert ev.failure(t, failure_value=-1.0).value == -1.0  # type: ignore[union-attr]
    assert ev.failure(traj()) is None


# ------------------------------------------------------------------------- judge --
def test_parse_judgement_json_and_plain() -> None:
    r = ev.parse_judgement(
        'Sure.\n```json\n{"score": 7, "reason": "mostly right", "criteria": {"accuracy": 8}}\n```'
    )
    assert r.value == pytest.approx(0.7)
    assert r.components == {"judge_accuracy": pytest.approx(0.8), "judge_score": 7.0}
    assert r.source == RewardSource.JUDGE
    assert "mostly right" in (r.reason or "")
    assert ev.parse_judgement("Score: 12/10").value == 1.0  # clamped
    assert ev.parse_judgement("score = 0").value == 0.0
    with pytest.raises(EvaluationError, match="no score"):
        ev.parse_judgement("I cannot decide")


def test_judge_request_carries_rubric_task_reference_and_response() -> None:
    t = traj(
        steps=[Step(role="system", content="sys"), Step(role="user", content="What is 2+2?")],
        expected="4",
        output="four",
    )
    req = ev.judge_request(t, rubric="R-U-B-R-I-C", model="m")
    for part in ("R-U-B-R-I-C", "What is 2+2?", "Reference answer:\n4", "four"):
        assert part in req.prompt
    assert req.model == "m"
    assert req.temperature == 0.0
    assert "JSON" in req.system_prompt


class ScriptedProvider:
    """A provider that answers from a script: unit tests of the judge's own logic only."""

    name = "scripted"

    def __init__(self, replies: list[str | ProviderError]) -> None:
        self.replies = replies
        self.requests: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, ProviderError):
            raise reply
        return Completion(output=reply, provider="scripted", model=request.model)

    async def aclose(self) -> None:
        return None


async def test_judge_uses_spec_rubric_over_default() -> None:
    p = ScriptedProvider(['{"score": 9, "reason": "good"}'])
    r = await ev.judge(
        p, traj(), spec=Spec("judge", "only facts"), default_rubric="DEFAULT", model="j"
    )
    assert r.value == pytest.approx(0.9)
    assert "only facts" in p.requests[0].prompt
    assert "DEFAULT" not in p.requests[0].prompt


async def test_judge_provider_errors_propagate() -> None:
    p = ScriptedProvider([ProviderError(ErrorKind.RATE_LIMIT, "slow down", 429)])
    with pytest.raises(ProviderError):
        await ev.judge(p, traj(), spec=Spec("judge"), default_rubric="r", model="j")


# ------------------------------------------------------------------ one outcome each --
def test_router_outcomes_are_recognised_by_agent_or_provider() -> None:
    from stormline.schemas.models import ROUTER_AGENT

    assert ev.is_router_outcome(traj(agent_id=ROUTER_AGENT, provider=ROUTER_AGENT))
    assert ev.is_router_outcome(traj(agent_id="a1", provider=ROUTER_AGENT))  # older router
    assert not ev.is_router_outcome(traj(provider="openai"))


def test_reward_event_id_is_derived_from_trajectory_and_source() -> None:
    from stormline.schemas.models import stable_event_id

    t = traj(output="4", expected="4")
    once = ev.reward_for(t, ev.verify(Spec("exact"), t.output, t.expected))
    again = ev.reward_for(t, ev.verify(Spec("exact"), t.output, t.expected))
    assert once.event_id == again.event_id == stable_event_id("reward", "tr1", "verifier")
    other = ev.reward_for(traj(trajectory_id="tr2"), Evaluation(1.0, RewardSource.VERIFIER))
    assert other.event_id != once.event_id
    human = ev.reward_for(t, Evaluation(1.0, RewardSource.HUMAN))
    assert human.event_id == stable_event_id("reward", "tr1", "human") != once.event_id
