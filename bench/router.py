"""Benchmark: the router's latency and throughput, one `stormline router` worker process.

Setup: fresh topics under a unique prefix on the stack named by the STORMLINE_* settings, a
router subprocess, 5 agents kept alive by heartbeats from this process (nobody answers the
assignments: this measures routing alone; the assignment TTL is long so nothing expires).

* Latency: tasks are submitted at 500 tasks/s; for each, TaskSubmitted.occurred_at (stamped
  when produced) -> TaskAssigned.assigned_at (stamped by the router), p50/p99, plus the same
  up to the moment this process consumed the assignment.
* Throughput: a burst of tasks is produced as fast as possible; the figure is tasks divided
  by the span between the first and last assigned_at of the burst (the router's own rate).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import cpu_seconds, free_port
from stormline.runtime.admin import TopicWanted, end_offsets
from stormline.runtime.admin import ensure_topics as ensure_topics_wanted
from stormline.schemas.catalog import AGENT_HEALTH, ASSIGNMENTS, TASKS
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    TaskAssigned,
    TaskSubmitted,
    WorkerStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.streams.app import app_id

ROOT = Path(__file__).resolve().parent.parent
AGENTS = [f"bench-agent-{i}" for i in range(5)]
TYPES = ["math", "reverse", "upper", "sort"]


def _env(s: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    for name, value in s.model_dump().items():
        if value is not None:
            env[f"STORMLINE_{name.upper()}"] = (
                value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
            )
    return {**env, **extra}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class _Collector:
    def __init__(self, s: Settings, serde: Serde) -> None:
        self.assigned: dict[str, tuple[TaskAssigned, float]] = {}
        self.healthy: set[str] = set()
        self._stop = threading.Event()
        self._c = EventConsumer(
            s, serde, f"{s.topic_prefix}bench-collector", [ASSIGNMENTS, AGENT_HEALTH]
        )
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for rec in self._c.poll_batch(2000, 0.02):
                now = time.time()
                if isinstance(rec.event, TaskAssigned):
                    self.assigned.setdefault(rec.event.task_id, (rec.event, now))
                elif isinstance(rec.event, AgentHealthChanged):
                    self.healthy.add(rec.event.agent_id)

    def wait(self, pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._c.close()


def run(quick: bool = False) -> dict[str, float | str]:
    base = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    s = base.model_copy(
        update={
            "topic_prefix": f"bench-router-{uuid.uuid4().hex[:6]}.",
            "data_dir": tmp,
            "router_web_port": free_port(),
        }
    )
    ensure_topics(s)
    serde = Serde.from_settings(s)
    producer = EventProducer(s, serde, **{"linger.ms": 1})
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for a in AGENTS:
                producer.produce(
                    AgentHeartbeat(
                        worker_id=f"w-{a}",
                        agent_ids=[a],
                        capabilities={a: ["general"]},
                        status=WorkerStatus.RUNNING,
                    )
                )
            stop.wait(1.0)

    log = (tmp / "router.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stormline.cli", "router", "--log-level", "warning"],
        env=_env(
            s,
            STORMLINE_ROUTER_ASSIGNMENT_TTL_S="3600",
            STORMLINE_ROUTER_DEFAULT_DEADLINE_S="3600",
            STORMLINE_ROUTER_HEARTBEAT_TIMEOUT_S="30",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    fwd = _Forwarder(s, tmp)
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    col = _Collector(s, serde)
    try:
        url = f"http://127.0.0.1:{s.router_web_port}/router/counters/"
        started = time.monotonic()
        ok = col.wait(lambda: col.healthy >= set(AGENTS), 120)
        if not ok:
            raise RuntimeError(f"router not ready: {(tmp / 'router.log').read_text()[-2000:]}")
        startup_s = time.monotonic() - started
        # Warm-up: the first tasks pay for schema registration and the first fetches.
        warm = [
            TaskSubmitted(
                task_id=f"w{i}",
                task_type=TYPES[i % 4],
                prompt="x",
                required_capabilities=["general"],
            )
            for i in range(200)
        ]
        producer.publish(warm)
        col.wait(lambda: all(t.task_id in col.assigned for t in warm), 60)

        def latency(rate: int, seconds: float, tag: str) -> tuple[list[float], list[float], int]:
            n = int(rate * seconds)
            ids = []
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                tid = f"{tag}{i}"
                ids.append(tid)
                producer.produce(
                    TaskSubmitted(
                        task_id=tid,
                        task_type=TYPES[i % 4],
                        prompt="What is 2 + 2?",
                        priority=5,
                        required_capabilities=["general"],
                    )
                )
                producer.poll(0)
            producer.flush()
            col.wait(lambda: all(t in col.assigned for t in ids), 300)
            router_ms, seen_ms = [], []
            for tid in ids:
                if tid in col.assigned:
                    a, recv = col.assigned[tid]
                    sub = a.task.occurred_at.timestamp()
                    router_ms.append((a.assigned_at.timestamp() - sub) * 1000)
                    seen_ms.append((recv - sub) * 1000)
            return router_ms, seen_ms, n

        slow_ms, _, _ = latency(50, 3 if quick else 10, "s")
        rate = 500
        router_ms, seen_ms, n = latency(rate, 4 if quick else 20, "l")
        # -- throughput: a burst --
        burst = 2000 if quick else 10000
        bids = [f"b{i}" for i in range(burst)]
        fwd.wait_for(tasks_topic_size(s), 120)  # the forwarder has caught up: idle now
        cpu0 = cpu_seconds(proc.pid)
        fcpu0 = cpu_seconds(fwd.proc.pid) or 0.0
        before = fwd.forwarded()
        producer.publish(
            TaskSubmitted(
                task_id=tid,
                task_type=TYPES[i % 4],
                prompt="What is 2 + 2?",
                priority=i % 10,
                required_capabilities=["general"],
            )
            for i, tid in enumerate(bids)
        )
        col.wait(lambda: all(t in col.assigned for t in bids), 600)
        cpu_burst = (cpu_seconds(proc.pid) or 0.0) - (cpu0 or 0.0)
        fwd.wait_for(before + burst, 300)
        fcpu = (cpu_seconds(fwd.proc.pid) or 0.0) - fcpu0
        fwd_ms = fcpu * 1000 / max(fwd.forwarded() - before, 1)
        stamps = [col.assigned[t][0].assigned_at.timestamp() for t in bids if t in col.assigned]
        span = max(stamps) - min(stamps) if len(stamps) > 1 else float("nan")
        counters = httpx.get(url, timeout=5).json()
        return {
            "router_latency_rate_tasks_per_s": float(rate),
            "router_latency_tasks": float(len(router_ms)),
            "router_latency_lost_tasks": float(n - len(router_ms)),
            "router_p50_latency_ms": round(statistics.median(router_ms), 2),
            "router_p99_latency_ms": round(_pct(router_ms, 99), 2),
            "router_max_latency_ms": round(max(router_ms), 2),
            "router_p50_submit_to_consumed_ms": round(statistics.median(seen_ms), 2),
            "router_p99_submit_to_consumed_ms": round(_pct(seen_ms, 99), 2),
            "router_p50_latency_ms_at_50_per_s": round(statistics.median(slow_ms), 2),
            "router_p99_latency_ms_at_50_per_s": round(_pct(slow_ms, 99), 2),
            "router_throughput_tasks": float(len(stamps)),
            "router_cpu_ms_per_task": round(cpu_burst * 1000 / max(len(stamps), 1), 3),
            "forwarder_cpu_ms_per_record": round(fwd_ms, 3),
            "router_cpu_per_task_in_forwarder_records": round(
                cpu_burst * 1000 / max(len(stamps), 1) / fwd_ms, 2
            )
            if fwd_ms
            else 0.0,
            "router_busiest_partition_share": _busiest_share(s),
            "router_tasks_per_cpu_second": round(len(stamps) / cpu_burst, 1) if cpu_burst else 0.0,
            "router_host_load_avg_1m": round(os.getloadavg()[0], 2),
            "router_throughput_tasks_per_s": round(len(stamps) / span, 1) if span else 0.0,
            "router_startup_to_ready_s": round(startup_s, 2),
            "router_dead_letters": float(counters.get("dead_letters", -1)),
            "router_strategy": str(counters.get("strategy")),
            "router_note": "one router worker process (its CPU time measured from /proc); "
            "timestamps from one host clock, ms precision; host shared with other load",
        }
    finally:
        stop.set()
        col.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        producer.close()
        fwd.close()


class _Forwarder:
    """bench/forwarder.py as a process: tasks -> <prefix>bench-forwarded, bytes untouched."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        self.s = s
        self.sink = f"{s.topic_prefix}bench-forwarded"
        ensure_topics_wanted(s, [TopicWanted(self.sink, s.default_partitions)])
        env = _env(s, STORMLINE_DATA_DIR=str(tmp / "forwarder"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.forwarder", TASKS.name(s), self.sink],
            env=env,
            stdout=(tmp / "forwarder.log").open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def forwarded(self) -> int:
        return sum(end_offsets(self.s, self.sink, self.s.default_partitions))

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.forwarded() >= n:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tasks_topic_size(s: Settings) -> int:
    return sum(end_offsets(s, TASKS.name(s), TASKS.partitions(s)))


def _busiest_share(s: Settings) -> float:
    """The share of the router's busiest by-type partition (tasks, ticks, results)."""
    ends = end_offsets(s, f"{app_id(s)}-by-type", s.router_partitions or s.default_partitions)
    total = sum(ends)
    return round(max(ends) / total, 3) if total else 0.0


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
