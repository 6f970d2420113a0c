"""The HTTP API over a whole running loop (simulator, router, workers, evaluator as real
processes, tests/loop.py): submit over HTTP, await through SSE and through the client, feed back
a human reward, cancel, wait_for on pub/sub, and the operators' agent view."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stormline.api.models import Role, StatusEvent
from stormline.client import AsyncClient, Client, StormlineError
from stormline.deploy.demo_tasks import demo_tasks
from stormline.producers.publish import publish_tasks, wait_for
from stormline.schemas.catalog import REWARDS
from stormline.schemas.models import Reward, RewardSource
from stormline.settings import Settings
from tests.api_fixtures import auth, make_key, running_api
from tests.conftest import wait_until
from tests.loop import Loop
from tests.test_publish import read_topic

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}
WAIT_S = 90  # a task of this loop ends in seconds; waits this long at most


@pytest.fixture(scope="module")
def loop(stack_settings: Settings, tmp_path_factory: Any) -> Iterator[Loop]:
    with Loop(stack_settings, tmp_path_factory.mktemp("loop"), workers=1) as lp:
        yield lp


@pytest.fixture(scope="module")
def api(loop: Loop) -> Iterator[str]:
    with running_api(loop.s, loop.s.data_dir / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def key(loop: Loop) -> str:
    return make_key(loop.s, "team-a", [Role.SUBMIT, Role.READ])


def _demo(n: int) -> list[dict[str, Any]]:
    out = []
    for t in demo_tasks(n, run_id=uuid.uuid4().hex[:6]):
        d = t.model_dump(include=set(t.model_fields) - {"tenant", "event_id", "occurred_at"})
        d.pop("schema_version", None)
        out.append(d)
    return out


def sse_events(url: str, key: str, task_id: str, timeout: float = WAIT_S) -> list[StatusEvent]:
    """Every event of the task's stream, read raw, until the server ends it."""
    events, data = [], []
    t = httpx.Timeout(10, read=timeout)
    with httpx.stream("GET", f"{url}/v1/tasks/{task_id}/events", headers=auth(key), timeout=t) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + timeout
        for line in r.iter_lines():
            # Keep-alives arrive every 15 s, so this runs even while nothing happens.
            assert time.monotonic() < deadline, f"no final event within {timeout}s: {events}"
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                events.append(StatusEvent.model_validate(json.loads("".join(data))))
                data = []
    return events


def test_submit_over_http_and_await_through_sse(loop: Loop, api: str, key: str) -> None:
    r = httpx.post(f"{api}/v1/tasks", json=_demo(1)[0], headers=auth(key), timeout=30)
    assert r.status_code == 202, r.text
    (tid,) = r.json()["task_ids"]
    events = sse_events(api, key, tid)
    assert events[0].state.value in {"submitted", "waiting", "assigned", "running", *FINAL}
    last = events[-1]
    assert last.state.value in {"succeeded", "failed"} and last.status is not None
    assert last.status.trajectory_id and last.status.agent_id
    assert all(e.status is None for e in events[:-1])  # the whole status only at the end
    states = [e.state.value for e in events]
    assert len(states) == len(set(zip(states, [e.attempt for e in events], strict=True)))


def test_client_result_reward_and_async(loop: Loop, api: str, key: str) -> None:
    with Client(api, key) as client:
        ids = client.submit_many(_demo(3))
        results = [client.result(i, timeout=WAIT_S) for i in ids]
        assert {r.task_id for r in results} == set(ids)
        assert all(r.final and r.trajectory_id for r in results)
        # The evaluator's reward first: the status keeps the latest reward written, and the
        # human one must be it here (an automatic one landing later overwrites it today).
        wait_until(lambda: client.status(ids[0]).reward_source, WAIT_S, "the automatic reward")
        rw = client.reward(ids[0], 1.0, reason="a person liked it")
        assert rw.source == "human" and rw.trajectory_id == results[0].trajectory_id
        status = client.status(ids[0])
        assert status.reward == 1.0 and status.reward_source == "human"
    human = wait_until(
        lambda: [
            ev
            for m in read_topic(loop.s, REWARDS, 1, timeout=5)
            if (ev := loop.serde.decode(m.value(), Reward)).task_id == ids[0]
            and ev.source is RewardSource.HUMAN
        ],
        60,
        "the human reward on the rewards topic",
    )
    assert human[0].value == 1.0 and human[0].reason == "a person liked it"

    async def via_async() -> list[str]:
        async with AsyncClient(api, key) as ac:
            tid = await ac.submit(_demo(1)[0])
            seen = [ev.state.value async for ev in ac.stream(tid, timeout=WAIT_S)]
            final = await ac.result(tid, timeout=30)  # already final: answered at once
            assert final.state.value == seen[-1]
            return seen

    seen = asyncio.run(via_async())
    assert seen[-1] in {"succeeded", "failed"}


def test_cancel_a_task_that_cannot_run_and_not_a_finished_one(
    loop: Loop, api: str, key: str
) -> None:
    task = {**_demo(1)[0], "required_capabilities": ["nobody-has-this"]}
    with Client(api, key) as client:
        tid = client.submit(task)
        wait_until(lambda: client.status(tid).state.value in {"submitted", "waiting"}, 30)
        cancelled = client.cancel(tid)
        assert cancelled.state.value == "cancelled"
        assert client.result(tid, timeout=30).state.value == "cancelled"
        done = client.submit(_demo(1)[0])
        assert client.result(done, timeout=WAIT_S).state.value in {"succeeded", "failed"}
        with pytest.raises(StormlineError) as err:
            client.cancel(done)
        assert err.value.status == 409 and "too late" in str(err.value.detail)


def test_wait_for_published_tasks_without_polling(loop: Loop) -> None:
    tasks = list(demo_tasks(5, run_id=uuid.uuid4().hex[:6]))
    report = publish_tasks(loop.s, tasks)
    assert report.sent == 5
    done = wait_for(loop.s, report.task_ids, timeout=WAIT_S)
    assert set(done) == set(report.task_ids)
    assert all(st["state"] in FINAL for st in done.values())


def test_operators_see_agents_with_the_routers_estimates(loop: Loop, api: str) -> None:
    op = make_key(loop.s, "ops", [Role.OPERATE])

    def estimates() -> list[dict[str, Any]]:
        r = httpx.get(f"{api}/v1/agents", headers=auth(op), timeout=60)
        assert r.status_code == 200, r.text
        return [a for a in r.json()["agents"] if a["by_task_type"]]

    agents = wait_until(estimates, 120, "the router's estimates in /v1/agents", 2.0)
    row = agents[0]["by_task_type"][0]
    assert 0.0 <= row["mean_reward"] <= 1.0 and row["assignments"] >= 1
    assert row["share"] is None or 0.0 < row["share"] <= 1.0
