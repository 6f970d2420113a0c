"""The demo: the whole loop on one machine, from an empty data directory to learned routing.

``stormline demo`` (what ``make demo`` runs) starts the embedded stack, then the simulated
LLM server, router, workers, evaluator, sink and trainer as supervised processes, publishes
a verifiable task set, shows live progress, and ends with the analytics summary, the reward
curve as PNG, the reward in the first and last 20% of tasks, and the checkpoints published.

Each run gets its own topic prefix (``demo-<run>.``) and its own analytics parts, so that a
second run starts from an empty Q-table and shows learning again; the data stays on disk.
With ``--real`` the agents come from ``deploy/agents.real.yaml`` (OpenAI and/or Anthropic,
keys from the environment) and no simulator runs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from stormline.consumers.llm.agents import AgentConfigError, endpoint_problems, load_registry
from stormline.deploy.demo_tasks import demo_tasks
from stormline.deploy.stack import EmbeddedStack
from stormline.deploy.supervisor import Supervisor, default_services, settings_environ
from stormline.schemas.catalog import CATALOG, CHECKPOINTS, REWARDS
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import CheckpointPublished, Reward
from stormline.schemas.serde import Serde
from stormline.settings import Settings

REAL_AGENTS = Path(__file__).parent / "agents.real.yaml"


class DemoError(RuntimeError):
    pass


@dataclass
class Progress:
    total: int
    index: dict[str, int]  # task id -> position in the published order
    rewards: dict[str, Reward] = field(default_factory=dict)  # task id -> last reward
    mix: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    started: float = field(default_factory=time.monotonic)
    first_reward: float | None = None

    def add(self, r: Reward) -> None:
        if r.task_id not in self.index:
            return
        if self.first_reward is None:
            self.first_reward = time.monotonic()
        if r.task_id not in self.rewards:
            self.mix[r.task_type][r.agent_id] += 1
        self.rewards[r.task_id] = r

    @property
    def done(self) -> int:
        return len(self.rewards)

    def window_mean(self, lo: float, hi: float) -> float | None:
        """Mean reward of the tasks published between fractions lo and hi of the run."""
        a, b = int(self.total * lo), int(self.total * hi)
        vals = [r.value for t, r in self.rewards.items() if a <= self.index[t] < b]
        return statistics.fmean(vals) if vals else None

    def table(self) -> Table:
        elapsed = time.monotonic() - self.started
        recent = sorted(self.rewards.values(), key=lambda r: r.occurred_at)[-200:]
        rate = statistics.fmean(r.value for r in recent) if recent else 0.0
        t = Table(
            title=f"demo: {self.done}/{self.total} tasks scored in {elapsed:.0f}s "
            f"({self.done / max(elapsed, 1e-9):.0f}/s), reward rate (last 200) "
            f"{rate:.2f}"
        )
        t.add_column("task type")
        t.add_column("agent mix (tasks routed, first attempts)")
        for task_type in sorted(self.mix):
            counts = self.mix[task_type]
            n = sum(counts.values())
            t.add_row(task_type, "  ".join(f"{a} {c / n:.0%}" for a, c in counts.most_common()))
        return t


def _env_for(s: Settings) -> dict[str, str]:
    """Every setting of the run (its topic prefix, parts dir, trainer batch, simulator port…),
    so that every service, and the agent registry each loads, sees what the demo sees."""
    return {**settings_environ(s), "STORMLINE_DATA_DIR": str(s.data_dir.resolve())}


def run_demo(
    settings: Settings,
    *,
    tasks: int = 2000,
    workers: int = 2,
    real: bool = False,
    timeout_s: float = 900.0,
    rate: float = 25.0,
    checkpoint_wait_s: float = 120.0,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    prefix = f"{settings.topic_prefix}demo-{run_id}."
    updates: dict[str, Any] = {
        "topic_prefix": prefix,
        "sink_parts_dir": settings.data_dir.resolve() / "clickhouse" / f"{prefix}parts",
        "trainer_batch_size": max(64, tasks // 5),
        "trainer_batch_max_wait_s": 60.0,
    }
    if real:
        if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("ANTHROPIC_API_KEY")):
            raise DemoError("--real needs OPENAI_API_KEY or ANTHROPIC_API_KEY in the environment")
        updates["agents_file"] = REAL_AGENTS
    s = settings.model_copy(update=updates)
    try:
        registry = load_registry(s.agents_file, s)
    except AgentConfigError as exc:
        raise DemoError(f"bad agent registry: {exc}") from exc

    stack = EmbeddedStack(s, report=lambda m: console.print(f"[dim]· {m}[/dim]"))
    with console.status("starting the embedded stack"):
        statuses = stack.up()
    if not all(st.healthy for st in statuses):
        raise DemoError("the embedded stack is not healthy; see `stormline status`")
    ensure_topics(s)
    serde = Serde.from_settings(s)
    for spec in CATALOG:
        serde.register(spec.name(s), spec.event)

    logs = s.data_dir.resolve() / "logs" / f"demo-{run_id}"
    sup = Supervisor(
        default_services(s, workers=workers, simulator=not real), logs=logs, env=_env_for(s)
    )
    console.print(f"run [bold]{run_id}[/bold]: topics {prefix}*, logs in {logs}")
    sup.start()
    try:
        for problem in endpoint_problems(registry, settings=s):
            console.print(f"[yellow]warning:[/yellow] {escape(problem)}")
        return _drive(s, serde, sup, tasks, timeout_s, console, run_id, rate, checkpoint_wait_s)
    finally:
        with console.status("stopping the demo's services"):
            sup.stop()


def _drive(
    s: Settings,
    serde: Serde,
    sup: Supervisor,
    n: int,
    timeout_s: float,
    console: Console,
    run_id: str,
    rate: float,
    checkpoint_wait_s: float,
) -> dict[str, Any]:
    task_list = list(demo_tasks(n, run_id=run_id.replace("-", "")))
    progress = Progress(n, {t.task_id: i for i, t in enumerate(task_list)})
    producer = EventProducer(s, serde)
    console.print(
        f"publishing {n} tasks of types {', '.join(sorted({t.task_type for t in task_list}))} "
        f"at {rate:.0f}/s"
    )
    # Paced like live traffic: a burst would be routed in full before the first reward came
    # back, and nothing could be learned from it.
    sent, start = 0, time.monotonic()
    rewards = EventConsumer(s, serde, f"{s.topic_prefix}demo-watch", [REWARDS])
    deadline = time.monotonic() + timeout_s
    try:
        with Live(progress.table(), console=console, refresh_per_second=2) as live:
            while progress.done < n and time.monotonic() < deadline:
                due = min(n, int((time.monotonic() - start) * rate) + 1)
                if sent < due:
                    for task in task_list[sent:due]:
                        producer.produce(task)
                    producer.flush()
                    sent = due
                for rec in rewards.poll_batch(2000, 0.2):
                    progress.add(rec.event)
                sup.tick()
                live.update(progress.table())
    finally:
        rewards.close()
    console.print()
    if progress.done < n:
        console.print(
            f"[yellow]only {progress.done}/{n} tasks were scored within {timeout_s:.0f}s[/yellow]"
        )
    if sent and not _checkpoints(s, serde):
        with console.status(f"waiting up to {checkpoint_wait_s:.0f} s for the first checkpoint"):
            end = time.monotonic() + checkpoint_wait_s
            while time.monotonic() < end and not _checkpoints(s, serde):
                sup.tick()
    return _summary(s, serde, progress, console, run_id)


def _summary(
    s: Settings, serde: Serde, progress: Progress, console: Console, run_id: str
) -> dict[str, Any]:
    first, last = progress.window_mean(0.0, 0.2), progress.window_mean(0.8, 1.0)
    console.print(
        f"reward, first 20% of tasks: [bold]{_f(first)}[/bold]   last 20%: [bold]{_f(last)}[/bold]"
    )
    checkpoints = _checkpoints(s, serde)
    console.print(
        "checkpoints published: "
        + (
            ", ".join(
                f"{c.policy}@{c.version} ({'promoted' if c.promoted else 'kept previous'})"
                for c in checkpoints
            )
            or "none yet"
        )
    )
    png = s.data_dir.resolve() / f"demo-{run_id}-reward-curve.png"
    per_agent = _analytics(s, png, console, expect_rewards=progress.done)
    console.print(
        "this run's topics and analytics stay; to look again, set\n"
        f"  export STORMLINE_TOPIC_PREFIX={s.topic_prefix} "
        f"STORMLINE_SINK_PARTS_DIR={s.sink_parts_dir}\n"
        "and run `stormline status` or `stormline analytics per_agent`",
        soft_wrap=True,
    )
    return {
        "tasks": progress.total,
        "scored": progress.done,
        "reward_first_20": first,
        "reward_last_20": last,
        "checkpoints": [c.version for c in checkpoints],
        "reward_curve_png": str(png) if png.exists() else None,
        "per_agent": per_agent,
    }


def per_agent_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="per agent (from ClickHouse: stormline analytics per_agent)")
    cols = ("agent", "tasks", "LLM calls ok", "mean reward (95% CI)", "p50 / p95 ms", "tokens")
    for col in cols:
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["agent_id"]),
            str(r["tasks"]),
            _f(r.get("success_rate")),
            f"{_f(r.get('mean_reward'))} [{_f(r.get('reward_ci95_low'))}, "
            f"{_f(r.get('reward_ci95_high'))}]",
            f"{_f0(r.get('p50_latency_ms'))} / {_f0(r.get('p95_latency_ms'))}",
            str(r.get("tokens", "")),
        )
    return t


def _f0(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.0f}"


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _checkpoints(s: Settings, serde: Serde) -> list[CheckpointPublished]:
    c = EventConsumer(s, serde, f"{s.topic_prefix}demo-ckpt-{time.time_ns()}", [CHECKPOINTS])
    out: list[CheckpointPublished] = []
    try:
        idle = 0
        while idle < 3:
            batch = c.poll_batch(100, 1.0)
            idle = idle + 1 if not batch.records else 0
            out += [r.event for r in batch]
    finally:
        c.close()
    return sorted(out, key=lambda e: e.version)


def _analytics(
    s: Settings, png: Path, console: Console, expect_rewards: int
) -> list[dict[str, Any]]:
    """Wait up to 30 s for the sink to catch up, then print per-agent figures and plot."""
    from stormline.consumers.sink.analytics import CANNED, plain, plot, run_canned
    from stormline.consumers.sink.store import open_store

    store = open_store(s)
    try:
        for _ in range(60):
            if int(store.query("SELECT count() FROM rewards").rows[0][0]) >= expect_rewards:
                break
            time.sleep(0.5)
        res = run_canned(store, "per_agent")
        console.print(per_agent_table(res.dicts()))
        curve = run_canned(store, "reward_over_time", bucket_seconds=5)
        if curve.rows:
            plot(curve, CANNED["reward_over_time"], png, title="demo reward over time")
            console.print(f"reward curve: {png}")
        return [dict(zip(res.columns, map(plain, row), strict=False)) for row in res.rows]
    finally:
        store.close()
