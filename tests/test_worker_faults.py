"""Every assignment ends as a trajectory or a dead letter, and the commit position moves on
(issue 15, findings 1, 3 and 4): through a real broker, registry and Redis (one the test starts
itself when it must refuse writes), the real openai SDK against local servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stormline.consumers.llm.agents import load_registry
from stormline.consumers.llm.simulation import ModelProfile, SimConfig
from stormline.consumers.llm.simulator import ServerThread, Simulator
from stormline.consumers.worker.service import Worker
from stormline.deploy import process
from stormline.deploy.stack_base import StackContext
from stormline.deploy.stack_servers import RedisServer
from stormline.schemas.catalog import ASSIGNMENTS, DEAD_LETTERS, HEARTBEATS, TRAJECTORIES
from stormline.schemas.kafka import end_offsets
from stormline.schemas.models import (
    AgentHeartbeat,
    DeadLetter,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
    WorkerStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import key_prefix, set_status, task_status
from tests.conftest import free_port
from tests.test_worker import (
    KEY,
    KEY_VAR,
    _assignment,
    _committed,
    _produce,
    _read,
    _read_all,
    _tuned,
)

SIM = SimConfig(
    seed=5,
    models={
        "sim-good": ModelProfile(skill={"*": 1.0}),
        "sim-6s": ModelProfile(skill={"*": 1.0}, latency_ms=6000),
    },
)


def _agent(aid: str, model: str, url: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": aid,
        "provider": "openai",
        "model": model,
        "base_url": f"{url}/v1",
        "api_key_env": KEY_VAR,
        "capabilities": ["math"],
        "concurrency": 8,
        "timeout_s": 20,
        **kw,
    }


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.setenv(KEY_VAR, KEY)
    with ServerThread(Simulator(SIM.model_copy(deep=True)).app(), free_port()) as server:
        yield server


def _unreadable_usage_app() -> Starlette:
    """An OpenAI-compatible server whose answer the SDK accepts but Stormline's provider code
    cannot read: negative token counts (a parse error outside the SDK's error handler)."""

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "4"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": -5, "completion_tokens": 1, "total_tokens": -4},
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def _settings(s: Settings, tmp_path: Path, agents: list[dict[str, Any]], **kw: Any) -> Settings:
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump({"agents": agents}))
    return _tuned(s, path, **kw)


async def _run(s: Settings, done: Any, worker_id: str = "w-faults", timeout: float = 60) -> Worker:
    w = Worker(s, load_registry(s.agents_file), worker_id)
    await asyncio.wait_for(w.run(until=done), timeout)
    return w


def _outcomes(w: Worker) -> int:
    return w.stats.processed + getattr(w.stats, "dead_letters", 0)


def _all_committed(s: Settings, w: Worker) -> None:
    ends = end_offsets(s, ASSIGNMENTS.name(s), ASSIGNMENTS.partitions(s))
    assert _committed(s, w.group_id) == ends, "the commit position did not move on"


def _stopped_heartbeat(s: Settings, serde: Serde) -> AgentHeartbeat:
    hbs: list[AgentHeartbeat] = _read(
        s, serde, HEARTBEATS, lambda o: any(h.status is WorkerStatus.STOPPED for h in o), 20
    )
    return [h for h in hbs if h.status is WorkerStatus.STOPPED][-1]


# ------------------------------------------------------------- Redis refuses writes --
@pytest.fixture
def refusing_redis(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A redis-server of this test (as ``stormline up`` starts it) that refuses every write:
    out of memory (maxmemory 1 byte, noeviction) or a read-only replica."""
    own = settings.model_copy(
        update={"redis_url": None, "redis_port": free_port(), "data_dir": tmp_path / "redis"}
    )
    server = RedisServer(StackContext(own))
    server.up()
    r = redis.Redis.from_url(own.redis_address)
    if request.param == "oom":
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
    else:  # a replica of a master that does not exist: READONLY for every write
        r.replicaof("127.0.0.1", free_port())
    try:
        with pytest.raises((redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
            r.set("probe", "x")
        yield own.redis_address
    finally:
        r.close()
        pid = server.ctx.alive("redis", server.marker())
        if pid is not None:
            process.stop_pid(pid, "redis-server", timeout=20)


@pytest.mark.parametrize("refusing_redis", ["oom", "readonly"], indirect=True)
async def test_a_redis_that_refuses_writes_never_pins_the_commit_position(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path, refusing_redis: str
) -> None:
    s = _settings(topics, tmp_path, [_agent("good", "sim-good", sim.url)], redis_url=refusing_redis)
    events = [_assignment(f"o{i}", "good", f"What is {i} + 2?") for i in range(6)]
    _produce(s, serde, events)
    w = await _run(s, lambda w: _outcomes(w) >= len(events))
    trajs: list[Trajectory] = _read_all(s, serde, TRAJECTORIES)
    assert sorted(t.task_id for t in trajs) == sorted(e.task_id for e in events)
    assert all(t.status is TrajectoryStatus.OK for t in trajs)
    _all_committed(s, w)
    assert w.stats.redis_refused > 0 and w.stats.dead_letters == 0
    assert task_status(s, "o1") is None  # nothing could be written, and nothing pretended to
    last = _stopped_heartbeat(s, serde)
    assert "refused a command" in (last.detail or "")
    assert "running without idempotency" in (last.detail or "")


# ------------------------------------------------------ a poisoned recorded trajectory --
async def test_an_unreadable_recorded_trajectory_is_dead_lettered_and_the_rest_goes_on(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    s = _settings(topics, tmp_path, [_agent("good", "sim-good", sim.url)])
    events = [_assignment(f"p{i}", "good", f"What is {i} + 3?") for i in range(4)]
    # An old worker's JSON record that today's model rejects (a status it no longer knows).
    old = Trajectory(
        task_id="p1", trajectory_id="x", attempt=1, agent_id="good", status=TrajectoryStatus.OK
    ).model_dump(mode="json")
    old["status"] = "exploded"
    r = redis.Redis.from_url(s.redis_address)
    r.set(f"{key_prefix(s)}traj:p1:1", json.dumps(old), ex=600)
    r.close()
    _produce(s, serde, events)
    w = await _run(s, lambda w: _outcomes(w) >= len(events))
    trajs: list[Trajectory] = _read_all(s, serde, TRAJECTORIES)
    assert sorted(t.task_id for t in trajs) == ["p0", "p2", "p3"]
    letters: list[DeadLetter] = _read_all(s, serde, DEAD_LETTERS)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.source_topic == ASSIGNMENTS.name(s) and letter.error_kind == "handler"
    assert "task p1 attempt 1" in letter.error and "recorded trajectory unreadable" in letter.error
    assert "status" in letter.error
    # The letter carries the assignment itself, so it can be replayed.
    assert serde.decode(letter.raw_value, TaskAssigned).task_id == "p1"
    _all_committed(s, w)
    assert w.stats.dead_letters == 1 and w.stats.llm_calls == 3  # never paid again for p1
    assert "dead-lettered assignments: 1" in (_stopped_heartbeat(s, serde).detail or "")


# ------------------------------------------- a provider answer its code cannot read --
async def test_an_answer_the_provider_cannot_read_is_an_error_trajectory(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    with ServerThread(_unreadable_usage_app(), free_port()) as bad:
        agents = [_agent("good", "sim-good", sim.url), _agent("odd", "odd-1", bad.url)]
        s = _settings(topics, tmp_path, agents)
        events = [
            _assignment("u0", "odd", "What is 2 + 2?"),
            _assignment("u1", "good", "What is 2 + 3?"),
            _assignment("u2", "odd", "What is 2 + 4?"),
        ]
        _produce(s, serde, events)
        w = await _run(s, lambda w: _outcomes(w) >= len(events))
    by = {t.task_id: t for t in _read_all(s, serde, TRAJECTORIES)}
    assert set(by) == {"u0", "u1", "u2"}
    assert by["u1"].status is TrajectoryStatus.OK
    for tid in ("u0", "u2"):
        assert by[tid].status is TrajectoryStatus.ERROR
        assert "unreadable answer: ValidationError" in (by[tid].error or "")
        assert "1 tries" in (by[tid].error or "")  # not retried: it would not help
    _all_committed(s, w)
    assert w.stats.dead_letters == 0


# ------------------------------------------------- expiry, right before the LLM call --
async def test_an_assignment_that_expires_while_queued_is_not_called(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    """Concurrency 1 and a 6 s model: of three assignments valid for 4 s, the first is called
    (and answers after its expiry: counted), the two queued behind it expire while they wait
    for the slot and are not called (issue 15, finding 3: they were, and paid twice)."""
    agents = [
        _agent("good", "sim-good", sim.url),
        _agent("one", "sim-6s", sim.url, concurrency=1),
    ]
    s = _settings(topics, tmp_path, agents)
    w = Worker(s, load_registry(s.agents_file), "w-expiry")
    running = asyncio.create_task(w.run(until=lambda w: _outcomes(w) >= 4))
    await asyncio.to_thread(_produce, s, serde, [_assignment("warm", "good", "What is 1 + 1?")])
    while w.stats.processed < 1:  # the worker is up and consuming
        assert not running.done()
        await asyncio.sleep(0.05)
    queued = [_assignment(f"q{i}", "one", f"What is {i} + 9?", ttl_s=4) for i in range(3)]
    await asyncio.to_thread(_produce, s, serde, queued)
    await asyncio.wait_for(running, 60)
    by = {t.task_id: t for t in _read_all(s, serde, TRAJECTORIES)}
    statuses = sorted(by[q.task_id].status.value for q in queued)
    assert statuses == ["ok", "timeout", "timeout"]
    for q in queued:
        t = by[q.task_id]
        if t.status is TrajectoryStatus.TIMEOUT:
            assert "expired" in (t.error or "") and "not called" in (t.error or "")
    calls = httpx.get(f"{sim.url}/admin/stats").json()["by_model"]
    assert calls.get("sim-6s") == 1
    assert w.stats.expired_skipped == 2 and w.stats.expired_calls == 1
    detail = _stopped_heartbeat(s, serde).detail or ""
    assert "expired attempts: 2 not called, 1 calls answered after expiry" in detail


# --------------------------------------------------- a late result after final failure --
async def test_a_late_trajectory_after_the_final_failure_keeps_the_outcome(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    """Issue 15, finding 4: the router declared the task failed; the worker's late answer for
    that attempt is recorded and delivered, but the Redis status stays "failed"."""
    s = _settings(topics, tmp_path, [_agent("good", "sim-good", sim.url)])
    assert set_status(s, "late", "assigned", 2)
    assert set_status(s, "late", "failed", 2, error="attempt 2 expired; no attempts left")
    _produce(s, serde, [_assignment("late", "good", "What is 20 + 1?", attempt=2)])
    w = await _run(s, lambda w: _outcomes(w) >= 1)
    (traj,) = _read_all(s, serde, TRAJECTORIES)
    assert traj.status is TrajectoryStatus.OK and traj.output == "21"  # the result is kept
    st = task_status(s, "late")
    assert st is not None and st["state"] == "failed" and st["attempt"] == "2"
    assert st["error"] == "attempt 2 expired; no attempts left" and "output" not in st
    _all_committed(s, w)
