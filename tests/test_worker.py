"""Agent workers end to end: real broker, registry and Redis, real openai SDK, simulator.

Assignments are produced here as fixtures (the router is another part). Longer than ~400
lines because the tests share this module's simulator, stack and worker fixtures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from confluent_kafka import Consumer, TopicPartition

from stormline.consumers.llm import Completion
from stormline.consumers.llm.agents import load_registry, parse_registry
from stormline.consumers.llm.simulation import ModelProfile, SimConfig, solve
from stormline.consumers.llm.simulator import ServerThread, Simulator
from stormline.consumers.worker.service import Worker, trajectory_id
from stormline.runtime.connection import confluent_config
from stormline.schemas.catalog import ASSIGNMENTS, CATALOG, HEARTBEATS, TRAJECTORIES, TopicSpec
from stormline.schemas.kafka import EventConsumer, EventProducer, end_offsets
from stormline.schemas.models import (
    AgentHeartbeat,
    AssignedTask,
    PolicyKind,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
    Usage,
    WorkerStatus,
    stable_event_id,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import BudgetAsk, HotPath, RedisState, key_prefix, set_status, task_status
from tests.conftest import free_port, settings_env

CLI = [sys.executable, "-m", "stormline.cli"]
# A name that matches no redaction rule, and a value not shaped like a known key: if it
# shows up anywhere, nothing masked it, so the test sees every leak.
KEY_VAR = "SIMKEY_FOR_WORKER_TEST"
KEY = "fakekey-worker-5b1d8e4c27a9"

SIM = SimConfig(
    seed=11,
    models={
        "sim-good": ModelProfile(skill={"*": 1.0}),
        "sim-slow": ModelProfile(skill={"*": 1.0}, latency_ms=150),
        "sim-429": ModelProfile(skill={"*": 1.0}),
        "sim-500": ModelProfile(skill={"*": 1.0}),
        "sim-hang": ModelProfile(skill={"*": 1.0}),
        "sim-flaky": ModelProfile(skill={"*": 1.0}),
    },
)


@pytest.fixture
def sim() -> Iterator[ServerThread]:
    with ServerThread(Simulator(SIM.model_copy(deep=True)).app(), free_port()) as server:
        yield server


def _agents_file(tmp_path: Path, sim: ServerThread) -> Path:
    def agent(aid: str, model: str, **kw: Any) -> dict[str, Any]:
        return {
            "id": aid,
            "provider": "openai",
            "model": model,
            "base_url": f"{sim.url}/v1",
            "api_key_env": KEY_VAR,
            "system_prompt": "Answer with the result only.",
            "capabilities": ["math", "reverse"],
            "concurrency": 16,
            "timeout_s": 5,
            **kw,
        }

    path = tmp_path / "agents.yaml"
    agents = [
        agent("good", "sim-good"),
        agent("good-lp", "sim-good", logprobs=True),
        agent("slow", "sim-slow", concurrency=4),
        agent("a429", "sim-429"),
        agent("a500", "sim-500"),
        agent("ahang", "sim-hang", timeout_s=0.5),
        agent("aflaky", "sim-flaky"),
    ]
    path.write_text(yaml.safe_dump({"agents": agents}))
    return path


def _tuned(settings: Settings, agents: Path, **kw: Any) -> Settings:
    return settings.model_copy(
        update={
            "agents_file": agents,
            "worker_heartbeat_interval_s": 0.5,
            "worker_commit_interval_s": 0.2,
            "llm_retry_attempts": 3,
            "llm_backoff_base_s": 0.01,
            "llm_backoff_max_s": 0.05,
            "breaker_failure_threshold": 100,
            **kw,
        }
    )


def _assignment(
    tid: str, agent: str, prompt: str, *, attempt: int = 1, ttl_s: float = 600
) -> TaskAssigned:
    now = datetime.now(UTC)
    task_type, expected = solve(prompt)
    return TaskAssigned(
        task_id=tid,
        attempt=attempt,
        agent_id=agent,
        policy=PolicyKind.EXPLORE,
        assigned_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
        task=AssignedTask(
            task_id=tid, task_type=task_type, prompt=prompt, expected=expected, occurred_at=now
        ),
    )


def _produce(settings: Settings, serde: Serde, events: list[TaskAssigned]) -> None:
    p = EventProducer(settings, serde)
    p.publish(events)
    p.close()


def _read(
    settings: Settings, serde: Serde, spec: TopicSpec, until: Any, timeout: float = 60
) -> list[Any]:
    """Events of ``spec`` until ``until(events)`` is true (or the timeout)."""
    c = EventConsumer(
        settings, serde, f"{settings.topic_prefix}reader-{uuid.uuid4().hex[:6]}", [spec]
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out):
            out += [r.event for r in c.poll_batch(500, 0.3)]
    finally:
        c.close()
    return out


def _read_all(settings: Settings, serde: Serde, spec: TopicSpec, timeout: float = 60) -> list[Any]:
    """Every event on ``spec`` up to its end offsets now: after the producers stopped (or
    were acknowledged), a positive signal that nothing more is on the way."""
    total = sum(end_offsets(settings, spec.name(settings), spec.partitions(settings)))
    out = _read(settings, serde, spec, lambda o: len(o) >= total, timeout)
    assert len(out) == total, f"read {len(out)} of {total} events of {spec.name(settings)}"
    return out


def _raw_topic_bytes(settings: Settings) -> bytes:
    """Every record's key and value on every catalog topic of this test."""
    c = Consumer(
        {
            **confluent_config(settings),
            "group.id": f"raw-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    blobs = []
    for spec in CATALOG:
        name = spec.name(settings)
        ends = end_offsets(settings, name, spec.partitions(settings))
        want = sum(ends)
        c.assign([TopicPartition(name, p, 0) for p in range(len(ends))])
        got = 0
        deadline = time.monotonic() + 20
        while got < want and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    got += 1
                    blobs += [m.key() or b"", m.value() or b""]
        assert got == want, f"read {got} of {want} records of {name}"
    c.close()
    return b"".join(blobs)


def _committed(settings: Settings, group: str) -> list[int]:
    name = ASSIGNMENTS.name(settings)
    c = Consumer({**confluent_config(settings), "group.id": group})
    parts = [TopicPartition(name, p) for p in range(ASSIGNMENTS.partitions(settings))]
    out = [tp.offset for tp in c.committed(parts, timeout=10)]
    c.close()
    return [max(o, 0) for o in out]


def _stats(sim: ServerThread) -> dict[str, Any]:
    return httpx.get(f"{sim.url}/admin/stats").json()


async def _run_until(
    settings: Settings, n: int, worker_id: str = "w-test", timeout: float = 60
) -> Worker:
    w = Worker(settings, load_registry(settings.agents_file), worker_id)
    await asyncio.wait_for(w.run(until=lambda w: w.stats.processed >= n), timeout)
    return w


# ---------------------------------------------------------------------------- tests --
async def test_assignments_become_trajectories_and_offsets_commit(
    topics: Settings,
    serde: Serde,
    sim: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    s = _tuned(topics, _agents_file(tmp_path, sim))
    events = [
        _assignment(f"m{i}", "good", f"[type=math] What is {i} + {i * 3}?") for i in range(12)
    ]
    events += [_assignment(f"r{i}", "good-lp", f"Reverse: word{i} x") for i in range(6)]
    events += [_assignment(f"s{i}", "slow", f"What is {i} * 7?") for i in range(6)]
    events.append(_assignment("ghost-1", "ghost", "What is 1 + 1?"))
    events.append(_assignment("late-1", "good", "What is 2 + 2?", ttl_s=-1))
    _produce(s, serde, events)

    worker = await _run_until(s, len(events))
    assert worker.stats.in_flight_max > 1  # calls overlapped

    trajs: list[Trajectory] = _read_all(s, serde, TRAJECTORIES)  # the worker has stopped
    by_task = {t.task_id: t for t in trajs}
    assert len(trajs) == len(events) and set(by_task) == {e.task_id for e in events}
    for e in events:
        t = by_task[e.task_id]
        assert t.trajectory_id == trajectory_id(e.task_id, 1) and t.attempt == 1
        assert t.agent_id == e.agent_id and t.expected == e.task.expected
        if e.agent_id in ("good", "good-lp", "slow") and e.task_id != "late-1":
            assert t.status is TrajectoryStatus.OK, t.error
            assert t.output == e.task.expected  # skill 1.0
            assert [st.role for st in t.steps] == ["system", "user", "assistant"]
            assert t.steps[-1].completion_tokens > 0 and t.usage.prompt_tokens > 0
            assert (t.steps[-1].logprobs is not None) == (e.agent_id == "good-lp")
            assert (t.steps[-1].token_ids is not None) == (e.agent_id == "good-lp")
    assert by_task["ghost-1"].status is TrajectoryStatus.ERROR
    assert "not in the registry" in (by_task["ghost-1"].error or "")
    assert by_task["late-1"].status is TrajectoryStatus.TIMEOUT
    assert "expired" in (by_task["late-1"].error or "")
    assert _stats(sim)["requests"] == len(events) - 2  # no call for ghost or expired

    # Offsets committed up to the end, after the trajectories were acknowledged.
    ends = end_offsets(s, ASSIGNMENTS.name(s), ASSIGNMENTS.partitions(s))
    assert _committed(s, worker.group_id) == ends

    st = task_status(s, "m3")
    # The worker marks the attempt running with its result; the final state is the router's.
    assert st is not None and st["state"] == "running" and st["attempt"] == "1"
    assert st["agent_id"] == "good" and st["output"] == "12"
    assert task_status(s, "ghost-1") is None  # never ran; no router here to fail it
    cli = subprocess.run(
        [*CLI, "task", "m3"], env=settings_env(s), capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["state"] == "running"

    hbs: list[AgentHeartbeat] = _read(
        s, serde, HEARTBEATS, lambda o: any(h.status is WorkerStatus.STOPPED for h in o), 20
    )
    last = hbs[-1]
    assert last.worker_id == "w-test" and last.status is WorkerStatus.STOPPED
    assert last.processed == len(events) and last.errors == 2 and last.in_flight == 0
    assert "good-lp" in last.agent_ids and last.capabilities["good"] == ["math", "reverse"]


async def test_redelivered_assignment_resends_without_a_second_call(
    topics: Settings,
    serde: Serde,
    sim: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    s = _tuned(topics, _agents_file(tmp_path, sim))
    a = _assignment("dup-1", "good", "What is 5 + 6?")
    _produce(s, serde, [a])
    await _run_until(s, 1, "w-1")
    _produce(s, serde, [a.model_copy(update={"event_id": uuid.uuid4()})])  # redelivery
    w2 = await _run_until(s, 1, "w-2")
    assert w2.stats.resent == 1 and w2.stats.llm_calls == 0
    trajs = _read_all(s, serde, TRAJECTORIES)  # both workers have stopped
    # The copy is the same event, its id too (issue 15, finding 5): readers keep one.
    assert len(trajs) == 2 and trajs[0] == trajs[1]
    assert trajs[0].event_id == stable_event_id("trajectory", "dup-1", 1)
    assert _stats(sim)["requests"] == 1


async def test_redis_down_keeps_processing_and_says_so(
    topics: Settings,
    serde: Serde,
    sim: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    s = _tuned(topics, _agents_file(tmp_path, sim), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    events = [_assignment(f"n{i}", "good", f"What is {i} + 1?") for i in range(5)]
    _produce(s, serde, events)
    w = await _run_until(s, 5)
    assert w.stats.processed == 5
    trajs = _read_all(s, serde, TRAJECTORIES)
    assert len(trajs) == 5 and all(t.status is TrajectoryStatus.OK for t in trajs)
    hbs = _read(
        s, serde, HEARTBEATS, lambda o: any(h.status is WorkerStatus.STOPPED for h in o), 20
    )
    degraded = [h for h in hbs if h.status is WorkerStatus.DEGRADED]
    assert degraded and "unreachable" in (degraded[0].detail or "")
    assert "running without cache, rate limiter and idempotency" in (degraded[0].detail or "")


def _start_worker(s: Settings, worker_id: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    e = {**settings_env(s), KEY_VAR: KEY, **env}
    return subprocess.Popen(
        [*CLI, "worker", "--worker-id", worker_id],
        env=e,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    return p.wait(timeout)


def test_provider_faults_are_retried_then_recorded_and_keys_never_leak(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    s = _tuned(topics, _agents_file(tmp_path, sim))
    for body in (
        {"kind": "429", "seconds": 120, "model": "sim-429"},
        {"kind": "500", "seconds": 120, "model": "sim-500"},
        {"kind": "hang", "seconds": 120, "model": "sim-hang", "hang_s": 3},
        {"kind": "429", "count": 2, "model": "sim-flaky"},
    ):
        httpx.post(f"{sim.url}/admin/faults", json=body).raise_for_status()
    events = [
        _assignment("f429", "a429", "What is 1 + 2?"),
        _assignment("f500", "a500", "What is 1 + 3?"),
        _assignment("fhang", "ahang", "What is 1 + 4?"),
        _assignment("fflaky", "aflaky", "What is 1 + 5?"),
        _assignment("fok", "good", "What is 1 + 6?"),
    ]
    _produce(s, serde, events)
    log = tmp_path / "worker.log"
    proc = _start_worker(s, "w-faults", log)
    try:
        trajs = _read(s, serde, TRAJECTORIES, lambda o: len(o) >= len(events))
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text()
    trajs = _read_all(s, serde, TRAJECTORIES)  # the worker has exited: all it ever sent
    by = {t.task_id: t for t in trajs}
    assert len(trajs) == len(events)
    assert by["f429"].status is TrajectoryStatus.ERROR
    assert "3 tries" in (by["f429"].error or "") and "rate_limit" in (by["f429"].error or "")
    assert by["f500"].status is TrajectoryStatus.ERROR and "server" in (by["f500"].error or "")
    assert by["fhang"].status is TrajectoryStatus.TIMEOUT and "timeout" in (by["fhang"].error or "")
    assert by["fflaky"].status is TrajectoryStatus.OK and by["fflaky"].output == "6"
    assert by["fok"].status is TrajectoryStatus.OK
    calls = _stats(sim)["by_model"]
    assert {m: calls[m] for m in ("sim-429", "sim-500", "sim-hang", "sim-flaky")} == {
        "sim-429": 3,
        "sim-500": 3,
        "sim-hang": 3,
        "sim-flaky": 3,
    }
    # The key was used (the simulator saw its hash) but is nowhere in logs or events.
    assert hashlib.sha256(KEY.encode()).hexdigest()[:16] in _stats(sim)["credential_sha256_16"]
    logs = log.read_bytes()
    assert b"rate_limit" in logs  # the error trajectories were logged...
    assert KEY.encode() not in logs  # ...without the key
    assert KEY.encode() not in _raw_topic_bytes(s)
    st = task_status(s, "f500")  # running with the error; the final state is the router's
    assert st is not None and st["state"] == "running" and "server" in st["error"]


def test_sigkill_mid_batch_loses_nothing_and_recorded_work_is_not_called_again(
    topics: Settings, serde: Serde, sim: ServerThread, tmp_path: Path
) -> None:
    s = _tuned(topics, _agents_file(tmp_path, sim))
    n = 40
    events = [_assignment(f"k{i}", "slow", f"[type=math] What is {i} + 100?") for i in range(n)]
    prompts = {e.task_id: e.task.prompt for e in events}
    _produce(s, serde, events)
    r = redis.Redis.from_url(s.redis_address)
    pattern = f"{key_prefix(s)}traj:*"

    log1 = tmp_path / "w1.log"
    # Commits far apart: at the kill nothing is committed, so everything is redelivered.
    w1 = _start_worker(s, "w-killed", log1, STORMLINE_WORKER_COMMIT_INTERVAL_S="120")
    deadline = time.monotonic() + 60
    while len(r.keys(pattern)) < n // 3 and time.monotonic() < deadline:
        assert w1.poll() is None, log1.read_text()
        time.sleep(0.05)
    w1.send_signal(signal.SIGKILL)
    w1.wait(10)
    recorded = {k.decode().rsplit(":", 2)[1] for k in r.keys(pattern)}
    assert n // 3 <= len(recorded) < n, "the kill must land mid-batch"
    before = Counter(_stats(sim)["by_prompt"])
    assert all(before[prompts[t]] == 1 for t in recorded)

    log2 = tmp_path / "w2.log"
    w2 = _start_worker(s, "w-heir", log2)
    try:
        seen: dict[str, list[Trajectory]] = {}

        def complete(out: list[Trajectory]) -> bool:
            seen.clear()
            for t in out:
                seen.setdefault(t.task_id, []).append(t)
            return len(seen) == n

        _read(s, serde, TRAJECTORIES, complete, timeout=90)
    finally:
        rc = _stop(w2)
    assert rc == 0, log2.read_text()
    assert set(seen) == set(prompts)  # no task lost
    after = Counter(_stats(sim)["by_prompt"])
    for tid in recorded:
        assert after[prompts[tid]] == 1, f"{tid} was recorded before the kill yet called again"
    for tid, trajs in seen.items():
        assert after[prompts[tid]] in (1, 2)  # 2 only for calls in flight at the kill
        assert len({t.trajectory_id for t in trajs}) == 1
        assert len({t.output for t in trajs}) == 1
    retried = [t for t in prompts if after[prompts[t]] == 2]
    assert not set(retried) & recorded
    assert sum(after.values()) == n + len(retried)
    # The heir committed everything on its graceful exit.
    ends = end_offsets(s, ASSIGNMENTS.name(s), ASSIGNMENTS.partitions(s))
    assert _committed(s, s.topic(s.worker_group)) == ends
    stopped = [json.loads(x) for x in log2.read_text().splitlines() if "stopped:" in x]
    assert stopped, log2.read_text()
    resent = int(stopped[-1]["msg"].split("resent=")[1].split()[0])
    assert resent == len(recorded)  # re-sent from Redis, not recomputed
    for log in (log1, log2):
        assert KEY not in log.read_text()
    assert os.environ.get(KEY_VAR) is None


async def test_response_cache_serves_a_repeated_prompt_without_a_call(
    topics: Settings,
    serde: Serde,
    sim: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    s = _tuned(topics, _agents_file(tmp_path, sim), response_cache_ttl_s=60)
    _produce(s, serde, [_assignment("c1", "good", "What is 8 + 8?")])
    await _run_until(s, 1, "w-c1")
    _produce(s, serde, [_assignment("c2", "good", "What is 8 + 8?")])
    w = await _run_until(s, 1, "w-c2")
    assert w.stats.cache_hits == 1 and w.stats.llm_calls == 0
    trajs = _read_all(s, serde, TRAJECTORIES)  # both workers have stopped
    # c1 and c2 sit on different partitions, so the read order between them is not defined.
    assert [t.output for t in trajs] == ["16", "16"]
    assert sorted(t.task_id for t in trajs) == ["c1", "c2"]
    assert _stats(sim)["requests"] == 1


async def test_rate_limiter_is_a_shared_token_bucket_in_redis(settings: Settings) -> None:
    from stormline.state import RedisState

    a, b = RedisState(settings), RedisState(settings)  # two workers, one bucket
    try:
        waits = [
            await (a if i % 2 else b).take_token("openai@test", rate=1, burst=5) for i in range(5)
        ]
        assert waits == [0.0] * 5  # the burst
        wait = await a.take_token("openai@test", rate=1, burst=5)
        assert 0.0 < wait <= 1.0  # empty: at most one token's time (1 s at 1/s)
        await asyncio.sleep(wait + 0.05)
        assert await b.take_token("openai@test", rate=1, burst=5) == 0.0
        assert not a.degraded and not b.degraded
    finally:
        await a.aclose()
        await b.aclose()


# ------------------------------------------------- the hot path: one call per tick --
def _evalsha_calls(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _traj(tid: str, output: str, attempt: int = 1) -> Trajectory:
    return Trajectory(
        task_id=tid,
        trajectory_id=trajectory_id(tid, attempt),
        attempt=attempt,
        agent_id="a",
        status=TrajectoryStatus.OK,
        output=output,
    )


async def test_the_redis_work_of_a_tick_is_one_call_for_every_task(settings: Settings) -> None:
    """Issue 16: 64 attempts begun together are one script call, finished together another
    (before: four round trips per task), and leave what RedisState's own calls left."""
    state = RedisState(settings)
    hot = HotPath(state)
    r = redis.Redis.from_url(settings.redis_address)
    try:
        await hot.begin("warm", 1, running_for="a")  # the scripts are loaded once, first
        before = _evalsha_calls(r)
        begun = await asyncio.gather(*(hot.begin(f"h{i}", 1, running_for="a") for i in range(64)))
        assert _evalsha_calls(r) - before == 1
        assert all(b.recorded is None and b.cached is None and b.wait is None for b in begun)
        trajs = [_traj(f"h{i}", str(i)) for i in range(64)]
        assert await asyncio.gather(*(hot.finish(t) for t in trajs)) == trajs
        assert _evalsha_calls(r) - before == 2
        st = task_status(settings, "h7")
        assert st is not None and (st["state"], st["attempt"], st["agent_id"]) == (
            "running",
            "1",
            "a",
        )
        assert st["output"] == "7" and st["trajectory_id"] == trajs[7].trajectory_id
        assert (r.ttl(f"{key_prefix(settings)}traj:h7:1") or 0) > 0
        # A redelivery: the record is the answer, and nothing is written.
        again = await hot.begin("h7", 1, running_for="b")
        assert again.recorded == trajs[7]
        assert task_status(settings, "h7") == st
    finally:
        await hot.aclose()
        await state.aclose()
        r.close()


async def test_the_pipelined_calls_keep_the_status_guard_and_the_first_record(
    settings: Settings,
) -> None:
    state = RedisState(settings)
    hot = HotPath(state)
    try:
        # Two copies of one attempt finished in the same tick: the first record counts, and
        # its result fields are the ones written.
        await hot.begin("g2", 1, running_for="a")
        first, second = _traj("g2", "first"), _traj("g2", "second")
        assert await asyncio.gather(hot.finish(first), hot.finish(second)) == [first, first]
        st = task_status(settings, "g2")
        assert st is not None and st["output"] == "first"
        # The router failed the task: a late begin and finish change neither state nor fields.
        assert set_status(settings, "g1", "assigned", 2)
        assert set_status(settings, "g1", "failed", 2, error="attempt 2 expired")
        assert (await hot.begin("g1", 2, running_for="a")).recorded is None
        late = _traj("g1", "late", attempt=2)
        assert await hot.finish(late) == late  # recorded: the result is kept, not counted
        st = task_status(settings, "g1")
        assert st is not None and st["state"] == "failed" and "output" not in st
        # An older attempt never moves the status back either.
        assert (await hot.begin("g1", 1, running_for="a")).recorded is None
        assert task_status(settings, "g1") == st
    finally:
        await hot.aclose()
        await state.aclose()


async def test_a_cached_answer_takes_no_budget_and_a_forgotten_script_falls_back(
    settings: Settings,
) -> None:
    state = RedisState(settings)
    hot = HotPath(state)
    r = redis.Redis.from_url(settings.redis_address)
    one = BudgetAsk("openai@hot-test", rps=1)  # a bucket of one request
    try:
        answer = Completion(output="16", provider="openai", model="m", steps=[], usage=Usage())
        await hot.cache_response("q8", answer, 60)  # written behind, before this tick's reads
        hit = await hot.begin("c1", 1, running_for="a", cache_key="q8", budget=one)
        assert hit.cached is not None and hit.cached.output == "16" and hit.wait is None
        # Redis forgets its scripts (a restart): that task takes RedisState's own calls...
        r.script_flush()
        taken = await hot.begin("c2", 1, running_for="a", budget=one)
        assert taken.wait == 0.0  # the bucket's one request, which the cache hit left
        st = task_status(settings, "c2")
        assert st is not None and st["state"] == "running"
        # ...and the next tick is one pipelined call again, on the same shared budget.
        before = _evalsha_calls(r)
        empty = await hot.begin("c3", 1, running_for="a", budget=one)
        assert _evalsha_calls(r) - before == 1
        assert empty.wait is not None and 0.0 < empty.wait <= 1.0
    finally:
        await hot.aclose()
        await state.aclose()
        r.close()


class _CountingState(RedisState):
    """The real RedisState, counting the budget takes that were round trips of their own."""

    takes = 0

    async def take_budget(self, provider: str, **kw: Any) -> float:
        self.takes += 1
        return await super().take_budget(provider, **kw)


@pytest.mark.parametrize(("concurrency", "own_takes"), [(8, 0), (1, 2)])
async def test_the_first_budget_take_rides_the_first_call_when_a_slot_is_free(
    settings: Settings, serde: Serde, sim: ServerThread, concurrency: int, own_takes: int
) -> None:
    """With a free slot an attempt's first take goes with its first Redis call and is used
    by its first try (not taken twice); an attempt that must wait for a slot asks after the
    wait, right before its try."""
    from stormline.consumers.worker.pipeline import Pipeline
    from stormline.consumers.worker.providers import ProviderPool
    from stormline.consumers.worker.stats import WorkerStats

    s = settings.model_copy(update={"provider_rate_limits": {"openai": 1000.0}})
    registry = parse_registry(
        {
            "agents": [
                {
                    "id": "good",
                    "provider": "openai",
                    "model": "sim-good",
                    "base_url": f"{sim.url}/v1",
                    "concurrency": concurrency,
                }
            ]
        }
    )
    pool = ProviderPool(s)
    state = _CountingState(s)
    stats = WorkerStats()
    out = EventProducer(s, serde)
    pipeline = Pipeline(
        s,
        registry,
        "w-budget",
        state=state,
        out=out,
        agents=pool.agents(registry),
        breakers=pool.breakers,
        stats=stats,
    )
    r = redis.Redis.from_url(s.redis_address)
    try:
        events = [_assignment(f"b{i}", "good", f"What is {i} + 40?") for i in range(3)]
        trajs = await asyncio.gather(*(pipeline.process(a) for a in events))
        assert [t.output for t in trajs] == [e.task.expected for e in events]
        assert stats.llm_calls == 3 and state.takes == own_takes
        key = f"{key_prefix(s)}budget:{registry.agents['good'].provider_config().key}"
        assert r.hget(key, "req") is not None  # the budget in Redis was asked
    finally:
        await pipeline.aclose()
        await pool.aclose()
        await state.aclose()
        out.close(5)
        r.close()
