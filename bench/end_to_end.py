"""End to end: tasks/s from publish to reward, through the real broker and every service.

Runs the simulated LLM (0 ms latency), the router, two workers and the evaluator as
processes (the sink and trainer do not sit between publish and reward, so they are not
started), publishes N tasks at once and times until the last task's reward arrives. It also
reports the CPU milliseconds per task of every process involved (broker, registry, Redis,
simulator, router, workers, evaluator, the publisher), read from /proc. Each run is done
twice: agents reaching the simulator server through the official OpenAI SDK (``end_to_end_*``),
and the same agents with the in-process ``simulated`` provider (``end_to_end_in_process_llm_*``),
which separates the platform's own cost from the client library's. Then, once more each with
half the tasks, every Python service is sampled by py-spy (``bench/profile.py``): the
``*_profile_*`` figures say which library each process's CPU per task went to, and the
collapsed stacks stay in ``bench/profiles/e2e_*.txt`` (``BENCH_PROFILE=0`` skips this).
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

from bench import cpu_seconds, free_port
from bench.profile import Profiles, summary
from stormline.deploy.demo_tasks import demo_tasks
from stormline.deploy.supervisor import ServiceSpec, Supervisor
from stormline.schemas.catalog import CATALOG, REWARDS
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.serde import Serde
from stormline.settings import Settings

# BENCH_PROFILE=0 skips the profiled runs (bench/profiles/e2e_*.txt, summaries in the results).
PROFILE = os.environ.get("BENCH_PROFILE", "1") != "0"
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


def _stack_pids(s: Settings) -> dict[str, int]:
    run = s.data_dir.resolve() / "run"
    out = {}
    for name in ("kafka", "registry", "redis"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((run / f"{name}.pid").read_text().strip())
    return out


def _agents(path: Path, sim_port: int, sim_config: Path, in_process: bool) -> None:
    """The shipped agents, pointed at this run's simulator (server, or in process)."""
    doc = yaml.safe_load(Path("agents.yaml").read_text())
    for agent in doc["agents"]:
        if in_process:
            agent.update(provider="simulated", simulator_config=str(sim_config))
            agent.pop("base_url", None)
        else:
            agent["base_url"] = f"http://127.0.0.1:{sim_port}/v1"
    path.write_text(yaml.safe_dump(doc))


def one_run(
    n: int, workers: int, in_process: bool = False, profile: bool = False
) -> dict[str, float | str]:
    """One timed run; ``in_process``: agents use the in-process simulated provider.

    ``profile``: sample every Python service with py-spy during the window and return, per
    process, where its CPU went (``bench/profile.py``) instead of the timed figures, since
    the samplers share the cores with the loop.
    """
    base = Settings()
    s = base.model_copy(
        update={
            "topic_prefix": f"bench-e2e-{uuid.uuid4().hex[:6]}.",
            "simulator_port": free_port(),
            "router_web_port": free_port(),
        }
    )
    ensure_topics(s)
    serde = Serde.from_settings(s)
    for spec in CATALOG:
        serde.register(spec.name(s), spec.event)
    tmp = Path(tempfile.mkdtemp(prefix="stormline-e2e-"))
    cfg = tmp / "sim.yaml"
    cfg.write_text(yaml.safe_dump(SIM_CONFIG))
    agents = tmp / "agents.yaml"
    _agents(agents, s.simulator_port, cfg, in_process)
    sim_argv = ["simulate-llm", "--config", str(cfg), "--port", str(s.simulator_port)]
    specs = [
        *([] if in_process else [ServiceSpec("simulate-llm", sim_argv)]),
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
        if not in_process:
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
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        spies = Profiles(_profile_prefix(in_process), sup.pids()) if profile else None
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
        cpu = {k: cpu_seconds(pid) for k, pid in pids.items()}
        profiles = spies.stop() if spies else {}
        cpu["publisher+watcher"] = time.process_time() - self0
        cpu0["publisher+watcher"] = 0.0
        watch.close()
    finally:
        sup.stop()
    own: dict[str, float] = {}  # CPU ms per task of each process
    for name, after in cpu.items():
        before = cpu0.get(name)
        if after is not None and before is not None:
            own[name] = (after - before) * 1000 / max(len(done), 1)
    prefix = "end_to_end_in_process_llm_" if in_process else "end_to_end_"
    if profile:
        return {
            f"{prefix}profile_{name.replace('-', '_')}": f"{own.get(name, 0):.2f} ms CPU per "
            f"task ({len(done)} tasks): " + summary(path, own.get(name))
            for name, path in profiles.items()
        }
    # Workers are summed: between them they make one LLM call per task.
    per_task: dict[str, float] = {}
    for name, ms in own.items():
        key = "worker" if name.startswith("worker-") else name.replace("-", "_")
        per_task[key] = per_task.get(key, 0.0) + ms
    figures = {f"{prefix}cpu_ms_per_task_{k.replace('+', '_')}": v for k, v in per_task.items()}
    figures[f"{prefix}cpu_ms_per_task_total"] = sum(per_task.values())
    return {
        **figures,
        f"{prefix}tasks_per_s": len(done) / elapsed,
        f"{prefix}tasks_completed": len(done),
        f"{prefix}tasks_published": n,
        f"{prefix}publish_seconds": published,
        f"{prefix}seconds": elapsed,
    }


def _profile_prefix(in_process: bool) -> str:
    return "e2e_in_process_llm_" if in_process else "e2e_sdk_"


def run(quick: bool = False) -> dict[str, float | str]:
    n = 1000 if quick else 5000
    out: dict[str, float | str] = {**one_run(n, workers=2), **one_run(n, 2, in_process=True)}
    if PROFILE:  # after the timed runs, so the samplers do not slow those
        for in_process in (False, True):
            out.update(one_run(n // 2, 2, in_process=in_process, profile=True))
    out["end_to_end_setup"] = (
        f"{n} tasks, simulated LLM at 0 ms, 1 router, 2 workers, 1 evaluator, all on this "
        "machine's 2 cores; end_to_end_*: agents reach `stormline simulate-llm` through the "
        "official OpenAI SDK; end_to_end_in_process_llm_*: the same agents with "
        "`provider: simulated` (no SDK, no HTTP)"
    )
    return out
