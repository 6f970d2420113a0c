"""End to end: tasks/s from publish to reward, through the real broker and every service.

Runs the simulated LLM (0 ms latency), the router, two workers and the evaluator as
processes (the sink and trainer do not sit between publish and reward, so they are not
started), publishes N tasks at once and times until the last task's reward arrives. It also
reports the CPU milliseconds per task of every process involved (broker, registry, Redis,
simulator, router, workers, evaluator, the publisher), read from /proc.
Needs the stack of ``Settings()`` (``make bench`` runs ``stormline up`` first).
Target (issue 8): >= 1,000 tasks/s on the 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from deploy.supervisor import ServiceSpec, Supervisor
from producers.demo_tasks import demo_tasks
from schemas.catalog import CATALOG, REWARDS
from schemas.kafka import EventConsumer, EventProducer, ensure_topics
from schemas.serde import Serde
from stormline.settings import Settings

SIM_CONFIG = {"seed": 1, "default": {"skill": {"*": 0.8}, "latency_ms": 0}}


def _wait_ready(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {seconds:.0f}s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (from /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stack_pids(s: Settings) -> dict[str, int]:
    run = s.data_dir.resolve() / "run"
    out = {}
    for name in ("kafka", "registry", "redis"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((run / f"{name}.pid").read_text().strip())
    return out


def one_run(n: int, workers: int) -> dict[str, float]:
    base = Settings()
    s = base.model_copy(
        update={
            "topic_prefix": f"bench-e2e-{uuid.uuid4().hex[:6]}.",
            "simulator_port": _free_port(),
            "router_web_port": _free_port(),
        }
    )
    ensure_topics(s)
    serde = Serde.from_settings(s)
    for spec in CATALOG:
        serde.register(spec.name(s), spec.event)
    tmp = Path(tempfile.mkdtemp(prefix="stormline-e2e-"))
    cfg = tmp / "sim.yaml"
    cfg.write_text(yaml.safe_dump(SIM_CONFIG))
    # The shipped agents, pointed at this run's simulator.
    agents = tmp / "agents.yaml"
    agents.write_text(
        Path("agents.yaml").read_text().replace("127.0.0.1:8700", f"127.0.0.1:{s.simulator_port}")
    )
    specs = [
        ServiceSpec(
            "simulate-llm",
            ["simulate-llm", "--config", str(cfg), "--port", str(s.simulator_port)],
        ),
        ServiceSpec("router", ["router"]),
        *[
            ServiceSpec(f"worker-{i}", ["worker", "--worker-id", f"e2e-{i}"])
            for i in range(workers)
        ],
        ServiceSpec("evaluator", ["evaluator"]),
    ]
    env = {
        "STORMLINE_TOPIC_PREFIX": s.topic_prefix,
        "STORMLINE_DATA_DIR": str(tmp),
        "STORMLINE_ROUTER_WEB_PORT": str(s.router_web_port),
        "STORMLINE_AGENTS_FILE": str(agents),
        "STORMLINE_LOG_LEVEL": "WARNING",
    }
    sup = Supervisor(specs, logs=tmp / "logs", env=env)
    sup.start()
    try:
        _wait_ready(f"http://127.0.0.1:{s.simulator_port}/v1/models")
        tasks = list(demo_tasks(n))
        watch = EventConsumer(s, serde, f"{s.topic_prefix}e2e-watch", [REWARDS])
        # Warm-up: one task per type so that the router knows the agents (heartbeats) and
        # every process has paid its start-up cost before the clock starts.
        warm = list(demo_tasks(8, seed=99, run_id="warm"))
        EventProducer(s, serde).publish(warm)
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while len(seen) < len(warm) and time.monotonic() < deadline:
            seen |= {r.event.task_id for r in watch.poll_batch(1000, 0.5)}
        if len(seen) < len(warm):
            raise RuntimeError(
                f"warm-up: only {len(seen)}/{len(warm)} rewards in 120s; see {tmp / 'logs'}"
            )
        # Where the CPU goes per task is the measured explanation of the throughput.
        pids = {**_stack_pids(s), **sup.pids()}
        cpu0 = {k: _cpu_s(pid) for k, pid in pids.items()}
        self0 = time.process_time()
        start = time.monotonic()
        EventProducer(s, serde).publish(tasks)
        published = time.monotonic() - start
        wanted = {t.task_id for t in tasks}
        done: set[str] = set()
        deadline = time.monotonic() + max(120, n / 50)
        while len(done) < n and time.monotonic() < deadline:
            done |= {r.event.task_id for r in watch.poll_batch(5000, 0.5)} & wanted
        elapsed = time.monotonic() - start
        cpu = {k: _cpu_s(pid) for k, pid in pids.items()}
        cpu["publisher+watcher"] = time.process_time() - self0
        cpu0["publisher+watcher"] = 0.0
        watch.close()
    finally:
        sup.stop()
    # Workers are summed: between them they make one LLM call per task.
    per_task: dict[str, float] = {}
    for name, after in cpu.items():
        before = cpu0.get(name)
        if after is not None and before is not None:
            key = "worker" if name.startswith("worker-") else name.replace("-", "_")
            per_task[key] = per_task.get(key, 0.0) + (after - before) * 1000 / max(len(done), 1)
    figures = {f"end_to_end_cpu_ms_per_task_{k.replace('+', '_')}": v for k, v in per_task.items()}
    figures["end_to_end_cpu_ms_per_task_total"] = sum(per_task.values())
    return {
        **figures,
        "end_to_end_tasks_per_s": len(done) / elapsed,
        "end_to_end_tasks_completed": len(done),
        "end_to_end_tasks_published": n,
        "end_to_end_publish_seconds": published,
        "end_to_end_seconds": elapsed,
    }


def run(quick: bool = False) -> dict[str, float | str]:
    n = 1000 if quick else 5000
    out: dict[str, float | str] = dict(one_run(n, workers=2))
    out["end_to_end_setup"] = (
        f"{n} tasks, simulated LLM at 0 ms, 1 router, 2 workers, "
        "1 evaluator, all on this machine's 2 cores"
    )
    return out
