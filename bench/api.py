"""HTTP API benchmark (issue 17): ``POST /v1/tasks`` batches of 100 into Kafka.

``stormline api`` runs as its own process (as in production) against the broker, registry
and Redis of ``Settings()`` (``stormline up`` or the STORMLINE_* variables), with a fresh
topic prefix and a tenant whose quota does not bind. Each answer is a 202 only once Kafka
acknowledged all 100 tasks.

The load comes from ``GENERATORS`` processes of their own (never the API's event loop, nor
this process's), each a bare HTTP/1.1 client over asyncio with pre-built requests, so that
the client costs little of the 2 cores and its own CPU is measured (``api_client_cpu_*``).

* paced, per rate in ``RATES`` (open loop): request i is due at ``start + i * 100 / rate``
  whatever the answers before it (a stalled answer does not hold the next request back; a
  new connection is opened when all are busy), and its latency counts from the due time, so
  queueing shows (no coordinated omission): ``api_<rate>_tasks_per_s`` (acknowledged tasks /
  wall time), ``api_<rate>_request_{p50,p95,p99,max}_ms``, ``api_<rate>_over_100ms``,
  ``api_<rate>_send_lag_p99_ms`` (how late the client sent: its own share of the latency),
  ``api_<rate>_cpu_ms_per_task`` / ``_cpu_cores`` (user + system CPU of the API process, all
  its threads), the broker's and Redis' CPU per task, the whole machine's busy cores and the
  load average, and the server's own ``Server-Timing`` p99 (admit, kafka, status);
* saturated: ``CONCURRENCY`` requests always in flight: ``api_max_tasks_per_s`` (capacity);
* ``api_tasks_on_kafka``: end offsets of the tasks topic afterwards (equals ``api_tasks_sent``).

``BENCH_API_PROFILE=svg|raw|speedscope`` also runs ``py-spy record --nonblocking`` on the API
process during each paced phase into ``bench/profiles/api_<rate>.<ext>``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.profile import PROFILES, spy_argv
from stormline.api.models import Role

BATCH = 100
RATES = [float(r) for r in os.environ.get("BENCH_API_RATES", "2000,2500").split(",") if r]
SECONDS = float(os.environ.get("BENCH_API_SECONDS", "60"))  # per paced phase
GENERATORS = int(os.environ.get("BENCH_API_GENERATORS", "1"))
CONCURRENCY = int(os.environ.get("BENCH_API_CONCURRENCY", "4"))  # saturated phase
PROFILE = os.environ.get("BENCH_API_PROFILE", "")
REPEATS = 1  # one run is minutes; each paced phase holds >= 1,200 requests


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _body(run: str, b: int) -> bytes:
    tasks = [
        {
            "task_id": f"{run}-{b}-{i}",
            "task_type": "math",
            "prompt": f"What is {b} + {i}?",
            "expected": str(b + i),
            "required_capabilities": ["math"],
        }
        for i in range(BATCH)
    ]
    return json.dumps({"tasks": tasks}).encode()


def _request(host: str, key: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ============================================================ the load generator process ==
class _Client:
    """Keep-alive HTTP/1.1 connections; a request takes an idle one or opens another."""

    IDLE_S = 3.0  # under uvicorn's keep-alive timeout (5 s): no request meets a closing socket

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        return reader, writer, time.monotonic()

    async def fresh(self, n: int) -> None:
        """Close the idle connections and open ``n`` new ones (before a phase)."""
        for _, writer, _ in self.idle:
            writer.close()
        self.idle = [await self._connect() for _ in range(n)]

    async def post(self, raw: bytes) -> tuple[int, dict[str, str]]:
        now = time.monotonic()
        while self.idle and now - self.idle[-1][2] > self.IDLE_S:
            self.idle.pop()[1].close()
        reader, writer, _ = self.idle.pop() if self.idle else await self._connect()
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return status, headers


async def _post(client: _Client, raw: bytes) -> tuple[int, dict[str, str]]:
    """Status 0 for a request that got no answer (counted as failed, never dropped)."""
    try:
        return await client.post(raw)
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
        print(f"bench/api: a request got no answer: {exc!r}", file=sys.stderr)
        return 0, {}


def _server_timing(value: str) -> dict[str, float]:
    out = {}
    for part in value.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


async def _paced(client: _Client, raws: list[bytes], due: list[float]) -> list[list[Any]]:
    """Send raws[i] at due[i] (monotonic clock, shared by every process on the machine)."""
    loop = asyncio.get_running_loop()
    samples: list[list[Any]] = []
    pending = set()

    async def one(raw: bytes, at: float) -> None:
        lag = time.monotonic() - at
        status, headers = await _post(client, raw)
        latency = time.monotonic() - at
        samples.append([at, lag, latency, status, _server_timing(headers.get("server-timing", ""))])

    for raw, at in zip(raws, due, strict=True):
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        t = loop.create_task(one(raw, at))
        pending.add(t)
        t.add_done_callback(pending.discard)
    while pending:
        await asyncio.gather(*pending)
    return samples


async def _closed(client: _Client, raws: list[bytes], concurrency: int) -> list[list[Any]]:
    samples: list[list[Any]] = []
    queue = list(reversed(raws))

    async def worker() -> None:
        while queue:
            raw = queue.pop()
            t0 = time.monotonic()
            status, _ = await _post(client, raw)
            samples.append([t0, 0.0, time.monotonic() - t0, status, {}])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def _generator(conn: Any, host: str, port: int, key: str, jobs: list[dict[str, Any]]) -> None:
    """A child process: build its requests, say ready, run each job at the parent's word."""

    async def main() -> None:
        client = _Client(host, port)
        for job in jobs:
            raws = [_request(host, key, _body(job["run"], b)) for b in job["batches"]]
            conn.send("ready")
            start = conn.recv()
            await client.fresh(16)
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            if job["rate"]:
                due = [start + b * BATCH / job["rate"] for b in job["batches"]]
                samples = await _paced(client, raws, due)
            else:
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                samples = await _closed(client, raws, job["concurrency"])
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
            conn.send({"samples": samples, "cpu_s": cpu, "connections": client.opened})

    asyncio.run(main())


class _Load:
    """The generator processes; one job at a time, all of them together."""

    def __init__(self, host: str, port: int, key: str, jobs: list[dict[str, Any]]):
        ctx = mp.get_context("spawn")  # a clean interpreter: nothing of this process's state
        self.pipes, self.procs = [], []
        for g in range(GENERATORS):
            mine = [{**j, "batches": j["batches"][g::GENERATORS]} for j in jobs]
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_generator, args=(child, host, port, key, mine), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, lead_s: float = 1.0) -> tuple[float, list[list[Any]], float, int]:
        for p in self.pipes:
            if p.recv() != "ready":
                raise RuntimeError("a load generator did not start")
        start = time.monotonic() + lead_s
        for p in self.pipes:
            p.send(start)
        out = [p.recv() for p in self.pipes]
        samples = sorted((s for o in out for s in o["samples"]), key=lambda s: s[0])
        conns = sum(o["connections"] for o in out)
        return start, samples, sum(o["cpu_s"] for o in out), conns

    def close(self) -> None:
        for p in self.procs:
            p.join(10)


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def _stack_pids(settings: Any) -> dict[str, int]:
    """The embedded broker's and Redis' pids, where ``stormline up`` of this data dir runs them."""
    out = {}
    for name in ("kafka", "redis"):
        try:
            pid = int((settings.data_dir / "run" / f"{name}.pid").read_text().split()[0])
            _cpu_s(pid)
            out[name] = pid
        except (OSError, ValueError, IndexError):
            pass
    return out


def _profile(pid: int, rate: float, seconds: float) -> subprocess.Popen[bytes] | None:
    if not PROFILE:
        return None
    PROFILES.mkdir(exist_ok=True)
    ext = {"svg": "svg", "raw": "txt", "speedscope": "json"}[PROFILE]
    cmd = spy_argv(pid, PROFILES / f"api_{rate:.0f}.{ext}", PROFILE)
    return subprocess.Popen(
        [*cmd, "--duration", str(int(seconds))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _paced_figures(
    tag: str, rate: float, samples: list[list[Any]], start: float, cpu: dict[str, float]
) -> dict[str, Any]:
    lat = [s[2] * 1000 for s in samples]
    ok = [s for s in samples if s[3] == 202]
    wall = max(s[0] + s[2] for s in samples) - start
    tasks = len(ok) * BATCH
    f: dict[str, Any] = {
        f"{tag}_rate_tasks_per_s": rate,
        f"{tag}_requests": len(samples),
        f"{tag}_failed_requests": len(samples) - len(ok),
        f"{tag}_tasks_per_s": round(tasks / wall, 1),
        **{f"{tag}_request_p{q}_ms": round(_q(lat, q / 100), 1) for q in (50, 95, 99)},
        f"{tag}_request_max_ms": round(max(lat), 1),
        f"{tag}_over_100ms": sum(x >= 100 for x in lat),
        f"{tag}_send_lag_p99_ms": round(_q([s[1] * 1000 for s in samples], 0.99), 1),
    }
    for name in ("admit", "kafka", "status"):
        f[f"{tag}_server_{name}_p99_ms"] = round(_q([s[4].get(name, 0.0) for s in ok], 0.99), 1)
    for who, secs in cpu.items():
        f[f"{tag}_{who}_cpu_ms_per_task"] = round(secs / tasks * 1000, 4)
        f[f"{tag}_{who}_cpu_cores"] = round(secs / wall, 3)
    return f


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
    seconds = 10.0 if quick else SECONDS
    warm: dict[str, Any] = {"run": "warm", "batches": list(range(100)), "rate": 2000.0}
    jobs = [warm]
    for rate in RATES:
        n = int(rate * seconds / BATCH)
        jobs.append({"run": f"paced{rate:.0f}", "batches": list(range(n)), "rate": rate})
    n_max = 100 if quick else 400
    sat = {"run": "max", "batches": list(range(n_max)), "rate": 0, "concurrency": CONCURRENCY}
    jobs.append(sat)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stormline.cli", "api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack = _stack_pids(s)
    out: dict[str, Any] = {"api_generators": GENERATORS, "api_paced_seconds": seconds}
    sent = 0
    try:
        wait_http(f"http://127.0.0.1:{s.api_port}/healthz", 180)
        load = _Load("127.0.0.1", s.api_port, key, jobs)
        _, warm_samples, _, _ = load.run()  # connections, registry, caches
        sent += sum(x[3] == 202 for x in warm_samples) * BATCH
        for rate in RATES:
            load_avg = os.getloadavg()[0]
            pids = {"api": proc.pid, **stack}
            cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
            busy0 = _busy_s()
            spy = _profile(proc.pid, rate, seconds)
            start, samples, client_cpu, conns = load.run(lead_s=1.5 if spy else 1.0)
            cpu = {k: _cpu_s(p) - cpu0[k] for k, p in pids.items()}
            cpu["client"] = client_cpu
            cpu["machine"] = _busy_s() - busy0
            tag = f"api_{rate:.0f}"
            out |= _paced_figures(tag, rate, samples, start, cpu)
            out[f"{tag}_load_avg_1m_before"] = round(load_avg, 2)
            out[f"{tag}_client_connections"] = conns
            sent += sum(x[3] == 202 for x in samples) * BATCH
            if spy is not None:
                spy.wait(seconds + 30)
        t0, max_samples, _, _ = load.run()
        max_wall = max(x[0] + x[2] for x in max_samples) - t0
        load.close()
    finally:
        proc.terminate()
        proc.wait(30)
    ok_max = sum(x[3] == 202 for x in max_samples)
    sent += ok_max * BATCH
    max_lat = [x[2] * 1000 for x in max_samples]
    out |= {
        "api_max_tasks_per_s": round(ok_max * BATCH / max_wall, 1),
        "api_max_request_p50_ms": round(_q(max_lat, 0.5), 1),
        "api_max_request_p99_ms": round(_q(max_lat, 0.99), 1),
        "api_max_concurrency": CONCURRENCY,
        "api_tasks_sent": sent,
        "api_tasks_on_kafka": sum(end_offsets(s, TASKS.name(s), TASKS.partitions(s))),
    }
    # The headline figures (the targets of issue 17) are those of the first rate.
    head = f"api_{RATES[0]:.0f}"
    out["api_tasks_per_s"] = out[f"{head}_tasks_per_s"]
    out["api_request_p99_ms"] = out[f"{head}_request_p99_ms"]
    out["api_cpu_ms_per_task"] = out[f"{head}_api_cpu_ms_per_task"]
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
