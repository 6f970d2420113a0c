"""The long-running services: worker, evaluator, simulate-llm, router, trainer and sink."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, settings_of
from stormline.settings import Settings


class Strategy(StrEnum):
    thompson = "thompson"
    epsilon_greedy = "epsilon_greedy"
    ucb1 = "ucb1"
    random = "random"
    round_robin = "round_robin"


class Store(StrEnum):
    memory = "memory"
    rocksdb = "rocksdb"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


def evaluator(ctx: typer.Context) -> None:
    """Score trajectories into Reward events (verifiers, LLM-as-judge, failure policy)."""
    from stormline import logs
    from stormline.consumers.evaluator.service import run

    logs.setup(service="evaluator")
    run(settings_of(ctx))


def worker(
    ctx: typer.Context,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="default: worker-<host>-<pid>")
    ] = None,
    agents: Annotated[
        Path | None, typer.Option("--agents", help="agent registry (STORMLINE_AGENTS_FILE)")
    ] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(help="STORMLINE_WORKER_MAX_IN_FLIGHT")
    ] = None,
) -> None:
    """Run an agent worker on `assignments` until SIGTERM (graceful: drains, commits, leaves)."""
    from stormline import logs
    from stormline.consumers.llm.agents import AgentConfigError
    from stormline.consumers.worker.service import run_worker

    logs.setup(service="worker")
    s = settings_of(ctx)
    updates = {"agents_file": agents, "worker_max_in_flight": max_in_flight}
    s = s.model_copy(update={k: v for k, v in updates.items() if v is not None})
    try:
        run_worker(s, worker_id)
    except AgentConfigError as exc:
        ui.err.print(f"[red]bad agent registry:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc


def simulate_llm(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="STORMLINE_SIMULATOR_PORT (8700)")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    config: Annotated[
        Path | None,
        typer.Option("--config", help="skills/latency YAML (see consumers/llm/simulation.py)"),
    ] = None,
) -> None:
    """Serve the simulated LLM (OpenAI- and Anthropic-compatible) for offline runs."""
    from stormline.consumers.llm.simulation import load_config
    from stormline.consumers.llm.simulator import serve

    try:
        cfg = load_config(config)
    except (FileNotFoundError, ValueError) as exc:
        ui.err.print(f"[red]bad simulator config:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    p = port or settings_of(ctx).simulator_port
    ui.err.print(
        f"simulated LLM on http://{host}:{p}/v1 (models: {', '.join(cfg.models)})", markup=False
    )
    serve(cfg, host, p)


def router(
    ctx: typer.Context,
    strategy: Annotated[
        Strategy | None,
        typer.Option(help="routing strategy (default: STORMLINE_ROUTER_STRATEGY)"),
    ] = None,
    web_port: Annotated[
        int | None, typer.Option(help="web views' port (STORMLINE_ROUTER_WEB_PORT)")
    ] = None,
    store: Annotated[
        Store | None,
        typer.Option(help="store of the ledger (default: STORMLINE_ROUTER_STORE, rocksdb)"),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(case_sensitive=False, help="Faust worker log level (STORMLINE_LOG_LEVEL)"),
    ] = None,
    loglevel: Annotated[
        LogLevel | None, typer.Option("--loglevel", case_sensitive=False, hidden=True)
    ] = None,
) -> None:
    """Run the router (a Faust worker): route tasks, learn Q-tables, track agent health."""
    from stormline.streams.app import run_router

    overrides = {
        "router_strategy": strategy.value if strategy else None,
        "router_web_port": web_port,
        "router_store": store.value if store else None,
    }
    try:
        s = Settings(
            **{
                **settings_of(ctx).model_dump(exclude_unset=True),
                **{k: v for k, v in overrides.items() if v is not None},
            }
        )
    except ValueError as exc:
        ui.err.print(f"[red]invalid router settings:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    level = log_level or loglevel
    run_router(s, loglevel=level.value if level else s.log_level.lower())


def trainer(ctx: typer.Context) -> None:
    """Run the trainer: join trajectories + rewards, train on Ray, publish checkpoints."""
    from stormline.trainer.service import serve

    serve(settings_of(ctx))


def sink(ctx: typer.Context) -> None:
    """Consume every Stormline topic into ClickHouse (chDB Parquet parts or a server).

    Exit 3 if the ClickHouse server is not usable or the parts directory cannot be written.
    """
    from stormline import logs
    from stormline.consumers.sink.service import run_sink
    from stormline.consumers.sink.store import StoreError

    logs.setup(service="sink")
    try:
        run_sink(settings_of(ctx))
    except StoreError as exc:
        ui.err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
