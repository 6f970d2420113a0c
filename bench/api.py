"""HTTP API benchmark (issue 17): ``POST /v1/tasks`` batches of 100 into Kafka.

``stormline api`` runs as its own process (as in production) against the broker, registry
and Redis of ``Settings()`` (``stormline up`` or the STORMLINE_* variables), with a fresh
topic prefix and a tenant whose quota does not bind. Each answer is a 202 only once Kafka
acknowledged all 100 tasks. Two phases, pre-built bodies:

* paced: requests sent on a fixed schedule of ``RATE`` tasks/s (open loop: a slow answer does
  not delay the next request, and latency counts from the scheduled send time, so queueing
  shows): ``api_tasks_per_s`` (acknowledged tasks / wall time, target >= 2,000) and
  ``api_request_p50_ms`` / ``api_request_p99_ms`` per request of 100 tasks (target < 100 ms);
* saturated: ``CONCURRENCY`` requests always in flight: ``api_max_tasks_per_s`` and its
  latencies, the API's capacity here;
* ``api_cpu_ms_per_task`` / ``api_cpu_cores``: user + system CPU of the API process over the
  paced phase, per task and per second of wall time;
* ``api_server_{admit,kafka,status}_p99_ms``: the server's own ``Server-Timing`` of the paced
  requests: quota and ids in Redis, Kafka's acknowledgements, the ``submitted`` status;
* ``api_tasks_on_kafka``: end offsets of the tasks topic afterwards (must equal ``api_tasks_sent``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from stormline.api.models import Role

BATCH = 100
# Requests in flight: enough to keep the API busy, few enough that latency is service time.
CONCURRENCY = int(os.environ.get("BENCH_API_CONCURRENCY", "4"))
RATE = float(os.environ.get("BENCH_API_RATE", "2500"))  # tasks/s of the paced phase
REPEATS = 1


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bodies(n: int, run: str) -> list[bytes]:
    return [
        json.dumps(
            {
                "tasks": [
                    {
                        "task_id": f"{run}-{b}-{i}",
                        "task_type": "math",
                        "prompt": f"What is {b} + {i}?",
                        "expected": str(b + i),
                        "required_capabilities": ["math"],
                    }
                    for i in range(BATCH)
                ]
            }
        ).encode()
        for b in range(n)
    ]


async def _load(url: str, key: str, bodies: list[bytes]) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/tasks", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            failures += r.status_code != 202

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    return latencies, wall, failures


def _server_timing(r: httpx.Response) -> dict[str, float]:
    out = {}
    for part in r.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


async def _paced(
    url: str, key: str, bodies: list[bytes]
) -> tuple[list[float], float, int, list[dict[str, float]]]:
    """Request i goes at start + i * BATCH / RATE, whatever the answers before it."""
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    latencies: list[float] = []
    phases: list[dict[str, float]] = []
    failures = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1

        async def one(i: int, body: bytes) -> None:
            nonlocal failures
            due = start + i * BATCH / RATE
            await asyncio.sleep(max(0.0, due - loop.time()))
            r = await client.post("/v1/tasks", content=body, headers=headers)
            latencies.append(loop.time() - due)
            phases.append(_server_timing(r))
            failures += r.status_code != 202

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        wall = loop.time() - start
    return latencies, wall, failures, phases


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(quick: bool = False) -> dict[str, Any]:
    from stormline.deploy.supervisor import settings_environ
    from stormline.schemas.catalog import TASKS
    from stormline.schemas.kafka import end_offsets, ensure_topics
    from stormline.settings import Settings
    from tests.api_fixtures import make_key
    from tests.conftest import free_port, wait_http

    unlimited = {"rate": 1e9, "burst": 1e9, "in_flight": 1e9}
    s = Settings(topic_prefix=f"bench-api-{uuid.uuid4().hex[:6]}.").model_copy(
        update={"api_port": free_port(), "api_tenant_quotas": {"bench": unlimited}}
    )
    ensure_topics(s)
    key = make_key(s, "bench", [Role.SUBMIT])
    env = {**os.environ, **settings_environ(s), "STORMLINE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stormline.cli", "api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{s.api_port}"
    try:
        wait_http(f"{url}/healthz", 180)
        asyncio.run(_load(url, key, _bodies(20, "warm")))  # connections, registry, JIT caches
        n = 50 if quick else 300
        cpu0 = _cpu_s(proc.pid)
        latencies, wall, failures, phases = asyncio.run(_paced(url, key, _bodies(n, "paced")))
        cpu = _cpu_s(proc.pid) - cpu0
        max_lat, max_wall, max_fail = asyncio.run(_load(url, key, _bodies(n, "max")))
    finally:
        proc.terminate()
        proc.wait(30)
    tasks = n * BATCH
    on_kafka = sum(end_offsets(s, TASKS.name(s), TASKS.partitions(s)))
    return {
        "api_tasks_per_s": round(tasks / wall, 1),
        "api_request_p50_ms": round(_quantile(latencies, 0.50) * 1000, 1),
        "api_request_p99_ms": round(_quantile(latencies, 0.99) * 1000, 1),
        "api_cpu_ms_per_task": round(cpu / tasks * 1000, 3),
        "api_cpu_cores": round(cpu / wall, 2),
        "api_paced_rate_tasks_per_s": RATE,
        **{
            f"api_server_{name}_p99_ms": round(
                _quantile([p.get(name, 0.0) for p in phases], 0.99), 1
            )
            for name in ("admit", "kafka", "status")
        },
        "api_max_tasks_per_s": round(tasks / max_wall, 1),
        "api_max_request_p50_ms": round(_quantile(max_lat, 0.50) * 1000, 1),
        "api_max_request_p99_ms": round(_quantile(max_lat, 0.99) * 1000, 1),
        "api_max_concurrency": CONCURRENCY,
        "api_requests": 2 * n,
        "api_failed_requests": failures + max_fail,
        "api_tasks_sent": 2 * tasks,
        "api_tasks_on_kafka": on_kafka - 20 * BATCH,  # less the warm-up's
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
