"""The Redis task status: one Lua script built from the lifecycle's table (pure tests of the
translation), and its rules on a real Redis (every transition, attempts, pub/sub, submitted)."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid

import pytest
import redis

from stormline.schemas.lifecycle import ALLOWED, FINAL, RANK, TaskState, advances
from stormline.settings import Settings
from stormline.state import (
    RedisState,
    mark_submitted,
    record_reward,
    set_status,
    status_channel,
    status_lua,
    task_status,
)

S = TaskState


def _lua_table(script: str, name: str) -> str:
    m = re.search(rf"^local {name} = (.*)$", script, re.M)
    assert m, f"no {name} table in the script"
    return m.group(1)


def _parse_rows(table: str) -> dict[str, set[str]]:
    """The Lua table ``{["a"] = {["b"] = true, ...}, ...}`` back into Python."""
    rows = re.findall(r'\["(\w+)"\] = \{([^{}]*)\}', table)
    return {old: set(re.findall(r'\["(\w+)"\] = true', body)) for old, body in rows}


# ------------------------------------------------------------------------------ pure --
def test_the_script_carries_exactly_the_lifecycle_table() -> None:
    script = status_lua()
    rows = _parse_rows(_lua_table(script, "ALLOWED"))
    assert rows == {old.value: {n.value for n in nxt} for old, nxt in ALLOWED.items()}
    final = set(re.findall(r'\["(\w+)"\] = true', _lua_table(script, "FINAL")))
    assert final == {s.value for s in FINAL}
    rank = dict(re.findall(r'\["(\w+)"\] = (\d+)', _lua_table(script, "RANK")))
    assert rank == {st.value: str(r) for st, r in RANK.items()}


def test_the_translation_follows_any_table() -> None:
    toy = {S.SUBMITTED: frozenset({S.RUNNING}), S.RUNNING: frozenset()}
    script = status_lua(toy)
    assert _parse_rows(_lua_table(script, "ALLOWED")) == {
        "submitted": {"running"},
        "running": set(),
    }
    assert _lua_table(script, "FINAL") == '{["running"] = true}'


# ------------------------------------------------------------------------ real Redis --
def _tid() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_every_transition_is_applied_exactly_when_the_table_allows_it(settings: Settings) -> None:
    for (old, new), later in itertools.product(itertools.product(S, S), (0, 1)):
        tid = _tid()
        assert set_status(settings, tid, old, 1)  # a missing hash takes any first state
        applied = set_status(settings, tid, new, 1 + later, agent_id="a")
        assert applied == advances(old, 1, new, 1 + later), f"{old} -> {new} (+{later})"
        st = task_status(settings, tid)
        assert st is not None and st["state"] == (new if applied else old).value
        assert st["attempt"] == str(1 + later if applied else 1)


def test_the_routers_late_assigned_never_undoes_a_workers_running(settings: Settings) -> None:
    tid = _tid()
    assert set_status(settings, tid, S.SUBMITTED, 0)
    assert set_status(settings, tid, S.RUNNING, 2)  # the worker's mark landed first
    assert not set_status(settings, tid, S.ASSIGNED, 2)  # the router's, for the same attempt
    assert set_status(settings, tid, S.ASSIGNED, 3)  # a reassignment moves on
    st = task_status(settings, tid)
    assert st is not None and (st["state"], st["attempt"]) == ("assigned", "3")


def test_a_lower_attempt_never_applies_and_fields_need_the_same_live_attempt(
    settings: Settings,
) -> None:
    tid = _tid()
    assert set_status(settings, tid, S.ASSIGNED, 2)
    assert not set_status(settings, tid, S.RUNNING, 1)  # a late worker of attempt 1
    assert set_status(settings, tid, S.RUNNING, 2)
    st = task_status(settings, tid)
    assert st is not None and (st["state"], st["attempt"]) == ("running", "2")


async def test_a_late_success_after_the_final_failure_is_refused(settings: Settings) -> None:
    """Issue 15, finding 4: a late trajectory of the last attempt flipped "failed" to
    "succeeded"; the worker's own writes go through the same guard."""
    state = RedisState(settings)
    tid = _tid()
    try:
        assert await state.set_status(tid, S.RUNNING, 3, agent_id="a")
        assert set_status(settings, tid, S.FAILED, 3, error="expired 3 times")  # the router
        assert not await state.set_result(tid, 3, output="42", trajectory_id="late")
        assert not await state.set_status(tid, S.SUCCEEDED, 3, output="42")
        assert not await state.set_status(tid, S.SUCCEEDED, 4)  # nor a higher attempt
        st = task_status(settings, tid)
        assert st is not None and st["state"] == "failed" and st["attempt"] == "3"
        assert st["error"] == "expired 3 times" and "output" not in st
        # Before the final state, the result fields of the current attempt are written.
        other = _tid()
        assert await state.set_status(other, S.RUNNING, 1)
        assert not await state.set_result(other, 2, output="x")  # not its attempt
        assert await state.set_result(other, 1, output="7", trajectory_id="tr")
        st = task_status(settings, other)
        assert st is not None and (st["state"], st["output"]) == ("running", "7")
    finally:
        await state.aclose()


def test_applied_changes_are_published_and_refused_ones_are_not(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_address)
    sub = r.pubsub()
    sub.subscribe(status_channel(settings))
    try:
        deadline = time.monotonic() + 5
        # The server's confirmation: from here on, every publish reaches this subscriber.
        while (m := sub.get_message(timeout=0.2)) is None or m["type"] != "subscribe":
            assert time.monotonic() < deadline, "no subscribe confirmation"
        tid = _tid()
        assert set_status(settings, tid, S.RUNNING, 1)
        assert set_status(settings, tid, S.FAILED, 1)
        assert not set_status(settings, tid, S.SUCCEEDED, 1)  # refused: no message
        assert set_status(settings, (mark := _tid()), S.CANCELLED, 1)  # a positive sign
        got: list[dict[str, object]] = []
        while len(got) < 3 and time.monotonic() < deadline + 10:
            msg = sub.get_message(timeout=0.5)
            if msg is not None:
                got.append(json.loads(msg["data"]))
        assert got == [
            {"task_id": tid, "state": "running", "attempt": 1},
            {"task_id": tid, "state": "failed", "attempt": 1},
            {"task_id": mark, "state": "cancelled", "attempt": 1},
        ]
    finally:
        sub.close()
        r.close()


def test_mark_submitted_follows_the_same_rules(settings: Settings) -> None:
    known, new = _tid(), _tid()
    assert set_status(settings, known, S.RUNNING, 1)
    assert mark_submitted(settings, [known, new]) == [False, True]
    assert (task_status(settings, known) or {})["state"] == "running"
    st = task_status(settings, new)
    assert st is not None and (st["state"], st["attempt"]) == ("submitted", "0")
    ttl = redis.Redis.from_url(settings.redis_address).ttl(
        f"stormline:{settings.topic_prefix}task:{new}"
    )
    assert 0 < ttl <= settings.idempotency_ttl_s


def test_unknown_state_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(ValueError, match="'done' is not a valid TaskState"):
        set_status(settings, _tid(), "done", 1)


def test_a_later_automatic_reward_never_replaces_a_human_one(settings: Settings) -> None:
    """Found by the API's loop test: the status kept whichever reward was written last."""
    tid = _tid()
    assert record_reward(settings, tid, 0.0, "verifier")
    assert record_reward(settings, tid, 1.0, "human")  # a person's word replaces the verifier's
    assert not record_reward(settings, tid, 0.0, "verifier")  # the evaluator, late
    st = task_status(settings, tid)
    assert st is not None and (st["reward"], st["reward_source"]) == ("1.0", "human")
    assert record_reward(settings, tid, 0.5, "human")  # a second opinion still counts
    assert (task_status(settings, tid) or {})["reward"] == "0.5"
