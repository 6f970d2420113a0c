"""The API's pure parts, no stack: bodies, keys, quotas, the agent view, SSE framing."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from stormline.api.agents import agent_views
from stormline.api.events import later, parse_message, sse
from stormline.api.keys import Principal, matches, new_key, parse_roles, split_key
from stormline.api.models import Role, StatusEvent, Submission, TaskBatch, TaskIn
from stormline.api.quotas import quota_for, refusal, too_large
from stormline.client import parse_sse
from stormline.schemas.lifecycle import TaskState
from stormline.schemas.models import TaskFields
from stormline.settings import Settings


def test_task_in_is_task_fields_without_tenant() -> None:
    ours, theirs = TaskIn.model_fields, TaskFields.model_fields
    assert set(ours) == set(theirs) - {"tenant"}
    for name, f in ours.items():
        if name != "task_id":  # optional here: generated when absent
            assert f.metadata == theirs[name].metadata, name
            assert f.get_default(call_default_factory=True) == theirs[name].get_default(
                call_default_factory=True
            ), name


def test_submission_errors_speak_of_the_form_that_was_meant() -> None:
    ta = TypeAdapter(Submission)
    assert isinstance(ta.validate_python({"task_type": "a", "prompt": "p"}), TaskIn)
    assert isinstance(ta.validate_python({"tasks": [{"task_type": "a", "prompt": "p"}]}), TaskBatch)
    with pytest.raises(ValidationError) as err:
        ta.validate_python({"tasks": [{"task_type": "a", "prompt": ""}]})
    assert [e["loc"] for e in err.value.errors()] == [("batch", "tasks", 0, "prompt")]
    with pytest.raises(ValidationError) as err:
        ta.validate_python({"task_type": "a", "prompt": "p", "tenant": "x"})
    assert [e["loc"] for e in err.value.errors()] == [("one", "tenant")]


def test_keys_hash_and_split() -> None:
    k = new_key()
    key_id, secret = split_key(k.api_key) or ("", "")
    assert key_id == k.key_id and secret not in k.secret_hash
    assert matches(secret, k.secret_hash) and not matches(secret + "x", k.secret_hash)
    for bad in ("", "stl_", "stl_short_x", f"sk_{k.key_id}_{secret}", f"stl_{k.key_id}"):
        assert split_key(bad) is None, bad
    assert new_key().api_key != k.api_key


def test_roles_from_claims_drop_unknown_ones() -> None:
    assert parse_roles(["read", "root", "submit"]) == {Role.READ, Role.SUBMIT}
    assert parse_roles("read  operate,admin") == {Role.READ, Role.OPERATE, Role.ADMIN}
    assert parse_roles(None) == frozenset()
    p = Principal("t", parse_roles("read"), "k")
    assert p.may(Role.READ) and not p.may(Role.ADMIN)


def test_quota_overrides_and_refusals() -> None:
    s = Settings(api_tenant_quotas={"small": {"rate": 2, "in_flight": 10}})
    q = quota_for(s, "small")
    assert (q.rate, q.burst, q.in_flight) == (2.0, s.api_tenant_burst, 10)
    assert quota_for(s, "other").rate == s.api_tenant_rate
    assert too_large(q, 11) is not None and too_large(q, 10) is None
    r = refusal("rate", 0.2, q, 5)
    assert r.retry_after_header == "1" and "nothing" in r.detail
    assert refusal("in_flight", 2.5, q, 1).retry_after_header == "3"


def test_agent_view_shares_and_health() -> None:
    qtable = {
        "math": {"a": {"value": 0.9, "count": 3, "pulls": 3}, "b": {"value": 0.5, "pulls": 1}},
        "sort": {"a": {"value": 0.1, "count": 0, "pulls": 0}},
    }
    directory = {"a": {"capabilities": ["sort", "math"], "status": "healthy"}, "c": {}}
    health = [{"agent_id": "b", "status": "down", "reason": "no heartbeat", "since": "t"}]
    views = {v.agent_id: v for v in agent_views(health, qtable, directory)}
    assert set(views) == {"a", "b", "c"}
    assert views["a"].capabilities == ["math", "sort"] and views["a"].health == "healthy"
    assert views["b"].health == "down" and views["b"].health_reason == "no heartbeat"
    math_a = views["a"].by_task_type[0]
    assert (math_a.task_type, math_a.share, math_a.rewards) == ("math", 0.75, 3)
    assert views["b"].by_task_type[0].share == 0.25
    assert views["a"].by_task_type[1].share is None  # no assignments of that type yet


def test_status_messages_and_sse_framing() -> None:
    ev = parse_message(b'{"task_id": "t", "state": "running", "attempt": 2}')
    assert ev == StatusEvent(task_id="t", state=TaskState.RUNNING, attempt=2)
    assert parse_message(b"not json") is None
    assert parse_message(b'{"task_id": "t", "state": "exploded", "attempt": 1}') is None
    stream = (sse("status", ev.model_dump_json()) + b": keep-alive\n\n").decode()
    assert list(parse_sse(stream.split("\n"))) == [ev]


def test_only_later_changes_are_news() -> None:
    def ev(state: TaskState, attempt: int) -> StatusEvent:
        return StatusEvent(task_id="t", state=state, attempt=attempt)

    running1 = (1, 3)
    assert later(ev(TaskState.SUCCEEDED, 1), running1)
    assert later(ev(TaskState.ASSIGNED, 2), running1)  # a reassignment
    assert not later(ev(TaskState.ASSIGNED, 1), running1)  # older, delivered late
    assert not later(ev(TaskState.RUNNING, 1), running1)  # already sent
    assert later(ev(TaskState.SUBMITTED, 0), None)
