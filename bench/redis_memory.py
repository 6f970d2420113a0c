"""Redis memory per task: what the worker leaves in Redis for one attempt, old and new record.

Per task the worker keeps, for ``STORMLINE_IDEMPOTENCY_TTL_S``: the task's status hash (state,
attempt, agent, trajectory id, output or error, reward) and the idempotency record of its
attempt. Before issue 15 the record was the whole Trajectory as JSON; now it is the Trajectory
in the serde's Avro wire format, zlib-compressed (stormline.state.TrajectoryRecord).

Measured on a redis-server of its own (started as ``stormline up`` starts it), INFO
used_memory before and after N tasks written through the real RedisState calls; three shapes
of trajectory. ``python -m bench.redis_memory [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from stormline.deploy import process
from stormline.deploy.stack_base import StackContext
from stormline.deploy.stack_servers import RedisServer
from stormline.schemas.lifecycle import TaskState
from stormline.schemas.models import Step, Trajectory, TrajectoryStatus, Usage, stable_event_id
from stormline.settings import Settings
from stormline.state import RedisState, key_prefix, mark_submitted

WORDS = "the of a to in is it that for on with as was by at from this be or are an".split()  # noqa: SIM905


def _text(n_chars: int, rnd: random.Random) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rnd.choice(WORDS) if rnd.random() < 0.7 else f"w{rnd.randrange(10_000)}")
    return " ".join(out)[:n_chars]


def trajectory(i: int, shape: str, rnd: random.Random) -> Trajectory:
    """short: a simulator-like math task; logprobs: the same with 64 tokens of logprobs and
    token ids (a trainable agent); long: a 2,000-character prompt and a 600-character answer."""
    prompt = f"[type=math] What is {i} + {i * 3}?" if shape != "long" else _text(2000, rnd)
    answer = str(4 * i) if shape != "long" else _text(600, rnd)
    n = 64 if shape == "logprobs" else len(answer) // 4 + 1
    lp = shape == "logprobs"
    tid = f"task-{i:08d}"
    return Trajectory(
        event_id=stable_event_id("trajectory", tid, 1),
        task_id=tid,
        trajectory_id=str(stable_event_id("t", tid, 1)),
        attempt=1,
        agent_id="agent-a",
        task_type="math",
        provider="openai",
        model="gpt-4o-mini",
        steps=[
            Step(role="system", content="Answer with the result only."),
            Step(role="user", content=prompt),
            Step(
                role="assistant",
                content=answer,
                prompt_tokens=len(prompt) // 4,
                completion_tokens=n,
                latency_ms=rnd.uniform(100, 900),
                token_ids=[rnd.randrange(100_000) for _ in range(n)] if lp else None,
                logprobs=[rnd.uniform(-6, 0) for _ in range(n)] if lp else None,
            ),
        ],
        output=answer,
        status=TrajectoryStatus.OK,
        usage=Usage(prompt_tokens=len(prompt) // 4, completion_tokens=n, cost_usd=0.00012),
        latency_ms=rnd.uniform(100, 900),
        expected=answer,
    )


async def _write_new(s: Settings, trajs: list[Trajectory]) -> None:
    """What publish and the worker write now, through their real calls."""
    mark_submitted(s, [t.task_id for t in trajs])
    state = RedisState(s)

    async def one(t: Trajectory) -> None:
        await state.set_status(t.task_id, TaskState.RUNNING, 1, agent_id=t.agent_id)
        await state.record_trajectory(t)
        await state.set_result(
            t.task_id, 1, trajectory_id=t.trajectory_id, output=t.output, error=t.error
        )
        await state.set_status(t.task_id, TaskState.SUCCEEDED, 1)

    try:
        for i in range(0, len(trajs), 200):  # as a worker does: many attempts in flight
            await asyncio.gather(*(one(t) for t in trajs[i : i + 200]))
    finally:
        await state.aclose()


def _write_old(s: Settings, r: redis.Redis, trajs: list[Trajectory]) -> None:
    """What the worker wrote before: the same hash, the record as the Trajectory's JSON."""
    p, ttl = key_prefix(s), s.idempotency_ttl_s
    pipe = r.pipeline(transaction=False)
    for t in trajs:
        pipe.set(f"{p}traj:{t.task_id}:1", t.model_dump_json(), ex=ttl)
        key = f"{p}task:{t.task_id}"
        pipe.hset(
            key,
            mapping={
                "state": "succeeded",
                "attempt": 1,
                "updated_at": 1.7e9,
                "agent_id": t.agent_id,
                "trajectory_id": t.trajectory_id,
                "output": (t.output or "")[:2000],
            },
        )
        pipe.expire(key, ttl)
    pipe.execute()


def _used(r: redis.Redis) -> int:
    """Memory of the data: used_memory less the client buffers (a worker's connection pool
    is not what a task costs)."""
    mem = r.info("memory")
    return int(mem["used_memory"]) - int(mem["mem_clients_normal"])


def measure(s: Settings, n: int) -> dict[str, float]:
    r = redis.Redis.from_url(s.redis_address)
    out: dict[str, float] = {}
    for shape in ("short", "logprobs", "long"):
        rnd = random.Random(7)
        trajs = [trajectory(i, shape, rnd) for i in range(n)]
        for fmt in ("old", "new"):
            r.flushall()
            base = _used(r)
            if fmt == "new":
                asyncio.run(_write_new(s, trajs))
            else:
                _write_old(s, r, trajs)
            out[f"redis_bytes_per_task_{shape}_{fmt}"] = (_used(r) - base) / n
            sample = r.get(f"{key_prefix(s)}traj:{trajs[0].task_id}:1") or b""
            out[f"record_bytes_{shape}_{fmt}"] = float(len(sample))
    r.close()
    return out


def run(quick: bool = False) -> dict[str, float]:
    n = 1_000 if quick else 5_000
    with tempfile.TemporaryDirectory() as tmp:
        from tests.conftest import free_port

        s = Settings(data_dir=Path(tmp), redis_port=free_port(), redis_url=None, topic_prefix="b.")
        server = RedisServer(StackContext(s))
        server.up()
        try:
            return measure(s.model_copy(update={"redis_url": s.redis_address}), n)
        finally:
            pid = server.ctx.alive("redis", server.marker())
            if pid is not None:
                process.stop_pid(pid, "redis-server", timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    result: dict[str, Any] = run(quick=args.quick)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
