"""Benchmark: the router's latency, throughput and CPU, one `stormline router` worker process.

Setup: fresh topics under a unique prefix on the stack named by the STORMLINE_* settings, a
router subprocess, 5 agents kept alive by heartbeats from this process. While ``answering``,
this process plays worker and evaluator with confluent-kafka (cheap): every assignment gets an
OK Trajectory and a Reward at once, so the router handles what a task costs it in the loop
(the task, its assignment, the trajectory, the reward). The assignment TTL is long: nothing
expires. A bare Faust forwarder (bench/forwarder.py: consume 1, produce 1, the router's Faust
settings) runs in the same run on the same broker as the yardstick (issue 14).

* Latency: tasks at 50 and 500 tasks/s; for each, TaskSubmitted.occurred_at (stamped when
  produced) -> TaskAssigned.assigned_at (stamped by the router), p50/p99, plus the same up
  to the moment this process consumed the assignment.
* Routing only: a burst nobody answers; CPU of the router per task over the burst, its rate
  (first to last assigned_at).
* Per task in the loop: a burst of one task type, answered; router CPU from the first task to
  the last reward counted, per task and in forwarder records; how the type spread over the
  partitions (the busiest partition's share of the burst's assignments).
"""

from __future__ import annotations

import os
import random
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

from bench import child_env, cpu_seconds, free_port, percentile
from bench.profile import Profiles, summary
from stormline.runtime.admin import TopicWanted, end_offsets
from stormline.runtime.admin import ensure_topics as ensure_topics_wanted
from stormline.schemas.catalog import AGENT_HEALTH, ASSIGNMENTS, TASKS
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
    WorkerStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
AGENTS = [f"bench-agent-{i}" for i in range(5)]
TYPES = ["math", "reverse", "upper", "sort"]


class _Collector:
    """Reads assignments and health changes; while ``answering``, plays worker and evaluator."""

    def __init__(self, s: Settings, serde: Serde) -> None:
        self.assigned: dict[str, tuple[TaskAssigned, float]] = {}
        self.healthy: set[str] = set()
        self.answering = False
        self.partitions: dict[int, int] = {}  # assignments seen per partition while answering
        self._out = EventProducer(s, serde, **{"linger.ms": 5})
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
                    if self.answering:
                        self._answer(rec.event)
                        self.partitions[rec.partition] = self.partitions.get(rec.partition, 0) + 1
                elif isinstance(rec.event, AgentHealthChanged):
                    self.healthy.add(rec.event.agent_id)
            self._out.poll(0)

    def _answer(self, a: TaskAssigned) -> None:
        tid = f"{a.task_id}-{a.attempt}"
        # Agent i is right with probability 0.5 + 0.1 * i: something to learn.
        ok = random.random() < 0.5 + 0.1 * AGENTS.index(a.agent_id)
        common = {"task_id": a.task_id, "attempt": a.attempt, "agent_id": a.agent_id}
        self._out.produce(
            Trajectory(
                **common,
                trajectory_id=tid,
                task_type=a.task.task_type,
                status=TrajectoryStatus.OK,
                output="4",
            )
        )
        self._out.produce(
            Reward(
                **common,
                trajectory_id=tid,
                task_type=a.task.task_type,
                value=float(ok),
                source=RewardSource.VERIFIER,
            )
        )

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
        self._out.close()


def run(quick: bool = False, profile: bool = False) -> dict[str, float | str]:
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
        env=child_env(
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
        routing_ms = cpu_burst * 1000 / max(len(stamps), 1)
        loop: dict[str, Any] = _loop_burst(s, producer, col, proc.pid, url, 1000 if quick else 5000)
        if profile:  # a second burst under py-spy, so the figures above are not sampled
            spy = Profiles("router_loop_", {"router": proc.pid})
            again = _loop_burst(s, producer, col, proc.pid, url, 1000 if quick else 5000)
            path = spy.stop().get("router")
            ms = float(again["router_loop_cpu_ms_per_task"])
            loop["router_loop_profile"] = summary(path, ms, top=12) if path else "no profile"
        counters = httpx.get(url, timeout=5).json()
        return {
            "router_latency_rate_tasks_per_s": float(rate),
            "router_latency_tasks": float(len(router_ms)),
            "router_latency_lost_tasks": float(n - len(router_ms)),
            "router_p50_latency_ms": round(statistics.median(router_ms), 2),
            "router_p99_latency_ms": round(percentile(router_ms, 99), 2),
            "router_max_latency_ms": round(max(router_ms), 2),
            "router_p50_submit_to_consumed_ms": round(statistics.median(seen_ms), 2),
            "router_p99_submit_to_consumed_ms": round(percentile(seen_ms, 99), 2),
            "router_p50_latency_ms_at_50_per_s": round(statistics.median(slow_ms), 2),
            "router_p99_latency_ms_at_50_per_s": round(percentile(slow_ms, 99), 2),
            "router_throughput_tasks": float(len(stamps)),
            "router_cpu_ms_per_task": round(routing_ms, 3),
            "forwarder_cpu_ms_per_record": round(fwd_ms, 3),
            "router_cpu_per_task_in_forwarder_records": round(routing_ms / fwd_ms, 2)
            if fwd_ms
            else 0.0,
            **loop,
            "router_loop_cpu_per_task_in_forwarder_records": round(
                loop["router_loop_cpu_ms_per_task"] / fwd_ms, 2
            )
            if fwd_ms
            else 0.0,
            "router_tasks_per_cpu_second": round(len(stamps) / cpu_burst, 1) if cpu_burst else 0.0,
            "router_host_load_avg_1m": round(os.getloadavg()[0], 2),
            "router_throughput_tasks_per_s": round(len(stamps) / span, 1) if span else 0.0,
            "router_startup_to_ready_s": round(startup_s, 2),
            "router_dead_letters": float(counters.get("dead_letters", -1)),
            "router_strategy": str(counters.get("strategy")),
            "router_note": "one router worker process (its CPU time measured from /proc); "
            "routing only = a burst nobody answers; loop = one task type, each assignment "
            "answered at once with a Trajectory and a Reward (this process plays worker and "
            "evaluator), CPU from the first task to the last reward counted; timestamps from "
            "one host clock, ms precision",
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
        env = child_env(s, STORMLINE_DATA_DIR=str(tmp / "forwarder"))
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


def _loop_burst(
    s: Settings, producer: EventProducer, col: _Collector, pid: int, url: str, n: int
) -> dict[str, float]:
    """``n`` tasks of one type, answered: the router's CPU per task in the loop."""

    def applied() -> int:
        c = httpx.get(url, timeout=5).json()
        return int(c["rewards_applied"]) + int(c["rewards_duplicate"])

    ids = [f"loop-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    col.answering, col.partitions = True, {}
    start = applied()
    cpu0 = cpu_seconds(pid) or 0.0
    t0 = time.monotonic()
    producer.publish(
        TaskSubmitted(
            task_id=tid,
            task_type="hot",
            prompt="What is 2 + 2?",
            required_capabilities=["general"],
        )
        for tid in ids
    )
    deadline = time.monotonic() + 600
    while applied() < start + n and time.monotonic() < deadline:
        time.sleep(0.05)
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(pid) or 0.0) - cpu0
    col.answering = False
    done = applied() - start
    shares = sorted(col.partitions.values(), reverse=True)
    total = sum(shares)
    return {
        "router_loop_tasks": float(done),
        "router_loop_cpu_ms_per_task": round(cpu * 1000 / max(done, 1), 3),
        "router_loop_tasks_per_s": round(done / wall, 1) if wall else 0.0,
        "router_single_type_partitions_used": float(len(shares)),
        "router_single_type_busiest_partition_share": round(shares[0] / total, 3) if total else 0.0,
    }


def tasks_topic_size(s: Settings) -> int:
    return sum(end_offsets(s, TASKS.name(s), TASKS.partitions(s)))


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv, profile="--profile" in sys.argv), indent=2))
