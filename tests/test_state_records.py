"""The idempotency record is small and readable back; the embedded Redis is bounded.

Issue 15, finding 2: the record was the whole Trajectory as JSON, and the embedded Redis had no
``maxmemory``. (How many bytes a task costs is measured in bench/redis_memory.py.)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from stormline.deploy import process
from stormline.deploy.stack_base import StackContext
from stormline.deploy.stack_servers import RedisServer
from stormline.schemas.models import Step, Trajectory, TrajectoryStatus, Usage, stable_event_id
from stormline.schemas.serde import MAGIC
from stormline.settings import Settings
from stormline.state import RedisState, TrajectoryRecord, UnreadableRecord, key_prefix
from tests.conftest import free_port


def _traj(task_id: str = "t1", logprobs: bool = True) -> Trajectory:
    n = 32
    return Trajectory(
        event_id=stable_event_id("trajectory", task_id, 1),
        task_id=task_id,
        trajectory_id=f"tr-{task_id}",
        attempt=1,
        agent_id="good",
        task_type="math",
        provider="openai",
        model="sim-good",
        steps=[
            Step(role="system", content="Answer with the result only."),
            Step(role="user", content="[type=math] What is 3 + 9?"),
            Step(
                role="assistant",
                content="12",
                completion_tokens=n,
                token_ids=list(range(n)) if logprobs else None,
                logprobs=[-0.125 * i for i in range(n)] if logprobs else None,
            ),
        ],
        output="12",
        status=TrajectoryStatus.OK,
        usage=Usage(prompt_tokens=20, completion_tokens=n, cost_usd=0.0001),
        latency_ms=12.5,
        expected="12",
    )


# ------------------------------------------------------------------------------ pure --
def test_the_record_is_the_compressed_avro_of_the_trajectory_and_reads_back() -> None:
    for lp in (False, True):
        t = _traj(logprobs=lp)
        rec = TrajectoryRecord.encode(t)
        wire = zlib.decompress(rec)
        assert wire[0] == MAGIC  # the serde's wire format: what Kafka carries
        assert TrajectoryRecord.decode(rec) == t  # every field, the event id too
        assert len(rec) < len(t.model_dump_json()) / 2  # the old record was this JSON


def test_old_json_records_still_read_and_poisoned_ones_say_why() -> None:
    t = _traj()
    assert TrajectoryRecord.decode(t.model_dump_json().encode()) == t
    bad = json.loads(t.model_dump_json())
    bad["status"] = "exploded"  # a record no current model accepts
    with pytest.raises(
        UnreadableRecord, match=r"recorded trajectory unreadable .*status Input should be"
    ):
        TrajectoryRecord.decode(json.dumps(bad).encode())
    with pytest.raises(UnreadableRecord, match="error"):
        TrajectoryRecord.decode(b"\x78\x9cnot zlib at all")


# ------------------------------------------------------------------------ real Redis --
async def test_redis_keeps_the_small_record_with_its_ttl(settings: Settings) -> None:
    state = RedisState(settings)
    try:
        t = _traj("rec-1")
        assert await state.record_trajectory(t) == t
        r = redis.Redis.from_url(settings.redis_address)
        key = f"{key_prefix(settings)}traj:rec-1:1"
        assert r.get(key) == TrajectoryRecord.encode(t)
        assert 0 < r.ttl(key) <= settings.idempotency_ttl_s
        # A second worker's attempt loses: the first record is the answer, decoded.
        other = t.model_copy(update={"output": "13"})
        assert await state.record_trajectory(other) == t
        assert await state.recorded_trajectory("rec-1", 1) == t
        r.close()
    finally:
        await state.aclose()


@pytest.fixture
def own_redis(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, RedisServer]]:
    """A redis-server of this test, started as ``stormline up`` starts it (stopped at the end)."""
    s = settings.model_copy(
        update={
            "redis_url": None,
            "redis_port": free_port(),
            "data_dir": tmp_path / "own-redis",
            "redis_maxmemory": "64mb",
            "redis_maxmemory_policy": "allkeys-lfu",
        }
    )
    server = RedisServer(StackContext(s))
    server.up()
    try:
        yield s.model_copy(update={"redis_url": s.redis_address}), server
    finally:
        pid = server.ctx.alive("redis", server.marker())
        if pid is not None:
            process.stop_pid(pid, "redis-server", timeout=20)


def test_the_embedded_redis_is_started_with_a_memory_limit_and_policy(
    own_redis: tuple[Settings, RedisServer],
) -> None:
    s, _ = own_redis
    r = redis.Redis.from_url(s.redis_address, decode_responses=True)
    try:
        assert r.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lfu"
    finally:
        r.close()


def test_memory_settings_are_checked() -> None:
    assert Settings().redis_maxmemory_policy == "volatile-lru"
    with pytest.raises(ValueError, match="redis_maxmemory"):
        Settings(redis_maxmemory="lots")
    with pytest.raises(ValueError, match="redis_maxmemory_policy"):
        Settings(redis_maxmemory_policy="evict-everything")
