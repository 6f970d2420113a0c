"""Benchmark: one agent worker against the simulated LLM server.

Phase 1: the simulator answers after 200 ms; the worker must keep >= 256 calls in flight
and sustain >= 800 tasks/s. Phase 2: 0 ms latency, tasks/s of one worker process.

The floor beside them (issue 16): the bare SDK call, one provider client of this package
against the same simulator at 0 ms with the same calls in flight, no Kafka, no Redis, no
worker: client CPU per call for each SDK (openai, anthropic) and each transport (aiohttp,
the default; httpx). ``worker_0ms_cpu_per_task_vs_sdk_floor`` is the worker's CPU per task
over the floor of the transport it ran with; phase 2 runs again on the other transport
(``worker_0ms_<transport>_*``) for the transport's share of the worker's CPU.

Beside the CPU per task, what explains it: ``*_cpu_busy`` (the worker's CPU over the run's
wall time, of one core: near 1, or near what other processes leave, the rate is limited by
CPU, not by the worker's concurrency), ``worker_0ms_gc_ms_per_task`` (the collector's share)
and ``worker_0ms_redis_round_trips_per_task`` (requests the Redis server read per task: the
worker's Redis work rides one pipelined call per event-loop tick, several tasks' each).

The simulator runs as its own process (`stormline simulate-llm`); the worker runs in this
process against the stack named by the usual STORMLINE_* settings (Kafka, registry,
Redis), each phase on fresh topics. Assignments are produced before the worker starts,
so the figure is the worker's own rate: first assignment started -> last trajectory
acknowledged.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import redis
import yaml

from bench import cpu_seconds, free_port
from stormline.consumers.llm import CompletionRequest
from stormline.consumers.llm.agents import ProviderConfig, parse_registry
from stormline.consumers.llm.providers import (
    TRANSPORTS,
    Transport,
    anthropic_provider,  # noqa: F401  (slow import, kept out of timings)
    make_provider,
    openai_provider,  # noqa: F401  (slow import, kept out of timings)
)
from stormline.consumers.worker.service import Worker
from stormline.schemas.kafka import EventProducer, ensure_topics
from stormline.schemas.models import AssignedTask, PolicyKind, TaskAssigned
from stormline.schemas.serde import Serde
from stormline.settings import Settings

# Calls in flight for the floor: enough to keep the simulator busy at 0 ms, as the worker does.
FLOOR_IN_FLIGHT = 64


def _start_simulator(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    cfg = {
        "seed": 1,
        "models": {
            "bench-200ms": {"skill": {"*": 0.8}, "latency_ms": 200, "jitter_ms": 0},
            "bench-0ms": {"skill": {"*": 0.8}},
        },
    }
    path = workdir / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stormline.cli",
            "simulate-llm",
            "--port",
            str(port),
            "--config",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("simulator did not start")


async def _sdk_calls(
    provider: str, transport: Transport, port: int, n: int, in_flight: int
) -> float:
    """Client CPU ms per call: ``n`` calls, ``in_flight`` at a time, after a warm-up."""
    base = f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")
    cfg = ProviderConfig(provider=provider, model="bench-0ms", base_url=base)  # type: ignore[arg-type]
    client = make_provider(cfg, max_connections=in_flight, transport=transport)
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with gate:
            await client.complete(
                CompletionRequest(agent_id="floor", model=cfg.model, prompt=f"What is {i} + 1?")
            )

    try:
        await asyncio.gather(*(one(i) for i in range(min(n, 200))))  # connections, caches
        cpu0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(n)))
        cpu = time.process_time() - cpu0
    finally:
        await client.aclose()
    return 1000 * cpu / n


def _sdk_floors(port: int, n: int, in_flight: int) -> dict[str, float]:
    """The bare SDK call per SDK and transport (run before any Kafka client exists here, so
    that this process' CPU is the client's alone)."""
    out: dict[str, float] = {}
    for provider in ("openai", "anthropic"):
        for transport in TRANSPORTS:
            ms = asyncio.run(_sdk_calls(provider, transport, port, n, in_flight))
            out[f"sdk_floor_{provider}_{transport}_cpu_ms_per_call"] = round(ms, 3)
    return out


def _phase(
    base: Settings, port: int, sim_pid: int, model: str, n: int, max_in_flight: int
) -> dict[str, float]:
    s = base.model_copy(
        update={
            "topic_prefix": f"bench-worker-{uuid.uuid4().hex[:6]}.",
            "worker_max_in_flight": max_in_flight,
            "worker_heartbeat_interval_s": 2.0,
        }
    )
    ensure_topics(s)
    serde = Serde.from_settings(s)
    registry = parse_registry(
        {
            "agents": [
                {
                    "id": "bench",
                    "provider": "openai",
                    "model": model,
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "concurrency": max_in_flight,
                    "timeout_s": 120,
                }
            ]
        }
    )
    now = datetime.now(UTC)
    events = []
    for i in range(n):
        prompt = f"[type=math] What is {i} + {i % 97}?"
        events.append(
            TaskAssigned(
                task_id=f"b{i}",
                attempt=1,
                agent_id="bench",
                policy=PolicyKind.EXPLORE,
                assigned_at=now,
                expires_at=now + timedelta(hours=1),
                task=AssignedTask(
                    task_id=f"b{i}", task_type="math", prompt=prompt, occurred_at=now
                ),
            )
        )
    producer = EventProducer(s, serde)
    producer.publish(events, timeout=120)
    producer.close()
    del events  # the bench's own objects: a worker process does not hold them
    worker = Worker(s, registry, f"bench-{os.getpid()}", serde=serde)
    r = redis.Redis.from_url(s.redis_address)
    redis0 = _redis_reads(r)
    gc_time = _GcTime()
    cpu0, sim0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(sim_pid)
    wall0 = time.monotonic()
    try:
        stats = asyncio.run(worker.run(until=lambda w: w.stats.processed >= n))
    finally:
        gc_time.close()
    wall = time.monotonic() - wall0
    cpu1, sim1 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(sim_pid)
    redis1 = _redis_reads(r)
    r.close()
    elapsed = stats.last_done - stats.first_started
    worker_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    done = max(stats.processed, 1)
    return {
        "tasks": float(stats.processed),
        "tasks_per_s": stats.processed / elapsed if elapsed > 0 else 0.0,
        "in_flight_max": float(stats.in_flight_max),
        "errors": float(stats.errors),
        "llm_calls": float(stats.llm_calls),
        "worker_cpu_ms_per_task": 1000 * worker_cpu / done,
        "simulator_cpu_ms_per_request": 1000 * (sim1 - sim0) / max(stats.llm_calls, 1),
        # Of one core, over the whole run (start and drain included): near 1, or near what
        # the other processes on the machine leave, the worker is limited by its CPU.
        "worker_cpu_busy": worker_cpu / wall if wall > 0 else 0.0,
        "gc_ms_per_task": 1000 * gc_time.seconds / done,
        "redis_reads_per_task": (redis1 - redis0) / done,
    }


class _GcTime:
    """CPU seconds the collector ran in this process while it is open."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            self.seconds += time.process_time() - self._start

    def close(self) -> None:
        gc.callbacks.remove(self._observe)


def _redis_reads(r: redis.Redis) -> int:
    """Requests the Redis server read so far: one per round trip, however many commands a
    pipelined one carries (all its clients: the worker's heartbeats too; nothing else runs
    during the benchmark). Commands would count each call a Lua script makes."""
    info: dict[str, int] = r.info("stats")
    return int(info["total_reads_processed"])


def run(quick: bool = False) -> dict[str, float | str]:
    base = Settings()
    n200, n0 = (1_000, 500) if quick else (4_000, 2_000)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        sim = _start_simulator(port, Path(tmp))
        try:
            floors = _sdk_floors(port, n0, FLOOR_IN_FLIGHT)
            slow = _phase(base, port, sim.pid, "bench-200ms", n200, base.worker_max_in_flight)
            fast = _phase(base, port, sim.pid, "bench-0ms", n0, base.worker_max_in_flight)
            # The same phase on the other transport, for the transport's share of the worker.
            other = "httpx" if base.llm_transport == "aiohttp" else "aiohttp"
            swapped = base.model_copy(update={"llm_transport": other})
            fast_other = _phase(swapped, port, sim.pid, "bench-0ms", n0, base.worker_max_in_flight)
        finally:
            sim.terminate()
            sim.wait(10)
    floor = floors[f"sdk_floor_openai_{base.llm_transport}_cpu_ms_per_call"]
    return {
        **floors,
        "sdk_floor_in_flight": float(FLOOR_IN_FLIGHT),
        "worker_llm_transport": base.llm_transport,
        "worker_0ms_cpu_per_task_vs_sdk_floor": round(fast["worker_cpu_ms_per_task"] / floor, 2),
        "worker_200ms_tasks": slow["tasks"],
        "worker_200ms_tasks_per_s": round(slow["tasks_per_s"], 1),
        "worker_200ms_in_flight_high_water": slow["in_flight_max"],
        "worker_200ms_error_trajectories": slow["errors"],
        "worker_0ms_tasks": fast["tasks"],
        "worker_0ms_tasks_per_s_per_process": round(fast["tasks_per_s"], 1),
        "worker_0ms_in_flight_high_water": fast["in_flight_max"],
        "worker_200ms_worker_cpu_ms_per_task": round(slow["worker_cpu_ms_per_task"], 3),
        "worker_200ms_worker_cpu_busy": round(slow["worker_cpu_busy"], 2),
        "worker_0ms_worker_cpu_ms_per_task": round(fast["worker_cpu_ms_per_task"], 3),
        "worker_0ms_worker_cpu_busy": round(fast["worker_cpu_busy"], 2),
        "worker_0ms_gc_ms_per_task": round(fast["gc_ms_per_task"], 3),
        "worker_0ms_redis_round_trips_per_task": round(fast["redis_reads_per_task"], 3),
        f"worker_0ms_{other}_worker_cpu_ms_per_task": round(
            fast_other["worker_cpu_ms_per_task"], 3
        ),
        f"worker_0ms_{other}_tasks_per_s_per_process": round(fast_other["tasks_per_s"], 1),
        "simulator_cpu_ms_per_request": round(fast["simulator_cpu_ms_per_request"], 3),
        "worker_max_in_flight_setting": float(base.worker_max_in_flight),
        "cpu_cores": float(os.cpu_count() or 0),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "setup": "1 worker process + simulator process on this machine; Kafka/Redis shared",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
