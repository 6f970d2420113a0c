"""Status changes reach callers as they happen: SSE, the client's ``result`` and
``wait_for``, all on the task-status channel that ``stormline.state.set_status`` publishes on.

The changes are written here through the real guarded status script (what the router and
the workers call), so the stream's contents are known exactly; the whole loop doing the same
is tests/test_api_loop.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stormline.api.models import Role, StatusEvent
from stormline.client import Client, parse_sse
from stormline.producers.publish import NotFinished, wait_for
from stormline.schemas.kafka import ensure_topics
from stormline.schemas.lifecycle import TaskState
from stormline.settings import Settings
from stormline.state import set_status
from tests.api_fixtures import auth, make_key, running_api
from tests.conftest import wait_until

pytestmark = pytest.mark.slow
S = TaskState


@pytest.fixture(scope="module")
def s(stack_settings: Settings, tmp_path_factory: Any) -> Settings:
    out = stack_settings.model_copy(
        update={
            "topic_prefix": f"s{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path_factory.mktemp("api-status"),
            "api_tenant_quotas": {"pair": {"in_flight": 2}},
        }
    )
    ensure_topics(out)
    return out


@pytest.fixture(scope="module")
def api(s: Settings) -> Iterator[str]:
    with running_api(s, s.data_dir / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def key(s: Settings) -> str:
    return make_key(s, "team", [Role.SUBMIT, Role.READ])


def _task() -> dict[str, Any]:
    return {"task_type": "qa", "prompt": f"q {uuid.uuid4().hex[:6]}"}


class Background(threading.Thread):
    """Runs ``fn`` and keeps its result (or exception) for the test to check."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc


def test_sse_streams_each_change_then_the_final_status(s: Settings, api: str, key: str) -> None:
    with Client(api, key) as client:
        tid = client.submit(_task())
    events: list[StatusEvent] = []

    def read() -> None:
        t = httpx.Timeout(10, read=60)
        url = f"{api}/v1/tasks/{tid}/events"
        with httpx.stream("GET", url, headers=auth(key), timeout=t) as r:
            for ev in parse_sse(r.iter_lines()):
                events.append(ev)

    reader = Background(read)
    reader.start()
    wait_until(lambda: events, 30, "the stream's first event")
    assert set_status(s, tid, S.ASSIGNED, 1, agent_id="agent-x")
    wait_until(lambda: len(events) >= 2, 30, "the assigned event")
    assert set_status(s, tid, S.RUNNING, 1)
    assert not set_status(s, tid, S.SUBMITTED, 0)  # refused by the guard: no event
    assert set_status(s, tid, S.SUCCEEDED, 1, output="42", trajectory_id="traj-1")
    reader.join(30)
    assert not reader.is_alive() and reader.error is None
    assert [(e.state, e.attempt) for e in events] == [
        (S.SUBMITTED, 0),
        (S.ASSIGNED, 1),
        (S.RUNNING, 1),
        (S.SUCCEEDED, 1),
    ]
    final = events[-1].status
    assert final is not None and final.output == "42" and final.agent_id == "agent-x"


def test_client_result_and_wait_for_return_when_tasks_end(s: Settings, api: str, key: str) -> None:
    with Client(api, key) as client:
        ids = client.submit_many([_task() for _ in range(4)])
        waiting = Background(lambda: wait_for(s, ids, timeout=60))
        result = Background(lambda: Client(api, key).result(ids[0], timeout=60))
        waiting.start()
        result.start()
        wait_until(lambda: waiting.is_alive() and result.is_alive(), 10)
        for i, tid in enumerate(ids):
            set_status(s, tid, S.ASSIGNED, 1)
            set_status(s, tid, S.FAILED if i % 2 else S.SUCCEEDED, 1, output=f"out {i}")
        waiting.join(30)
        result.join(30)
        assert waiting.error is None and result.error is None
        assert set(waiting.result) == set(ids)
        assert {st["state"] for st in waiting.result.values()} == {"succeeded", "failed"}
        assert result.result.state is S.SUCCEEDED and result.result.output == "out 0"
        # Already final: answered from the current status, at once.
        assert client.result(ids[1], timeout=10).state is S.FAILED
        assert wait_for(s, ids, timeout=5) == waiting.result


def test_wait_for_says_which_tasks_did_not_end(s: Settings, api: str, key: str) -> None:
    with Client(api, key) as client:
        a, b = client.submit_many([_task(), _task()])
    set_status(s, a, S.CANCELLED, 0)
    with pytest.raises(NotFinished) as err:
        wait_for(s, [a, b], timeout=1.5)
    assert err.value.pending == {b} and set(err.value.done) == {a}
    with Client(api, key) as client, pytest.raises(TimeoutError):
        client.result(b, timeout=1.5)


def test_a_final_status_frees_in_flight_quota(s: Settings, api: str) -> None:
    key = make_key(s, "pair", [Role.SUBMIT, Role.READ])
    with Client(api, key, max_retries=0) as client:
        first, _second = client.submit_many([_task(), _task()])
        r = httpx.post(f"{api}/v1/tasks", json=_task(), headers=auth(key), timeout=10)
        assert r.status_code == 429 and r.json()["reason"] == "in_flight"
        set_status(s, first, S.ASSIGNED, 1)
        set_status(s, first, S.SUCCEEDED, 1)
        assert client.submit(_task())


def test_result_deadline_holds_past_the_keepalive_interval(api: str, key: str) -> None:
    """Keep-alives (every 15 s) must not extend a caller's deadline: the server ends the
    stream at ``timeout`` with a ``timeout`` event, and the client raises."""
    import time

    with Client(api, key) as client:
        tid = client.submit(_task())
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.result(tid, timeout=17)
        took = time.monotonic() - started
    assert 17 <= took < 25, took
    r = httpx.get(
        f"{api}/v1/tasks/{tid}/events?timeout=1", headers=auth(key), timeout=httpx.Timeout(30)
    )
    assert r.text.rstrip().split("\n")[-2:] == [
        "event: timeout",
        f'data: {{"task_id": "{tid}", "timeout_s": 1.0}}',
    ]
