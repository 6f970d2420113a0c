"""The stack's commands: up, down, status, demo and doctor, and the tables they print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, JsonFlag, settings_of
from stormline.deploy.doctor import Group as CheckGroup
from stormline.settings import Settings


def up(
    ctx: typer.Context,
    all_services: Annotated[
        bool, typer.Option("--all", help="also run router, workers, evaluator, sink, trainer")
    ] = False,
    workers: Annotated[int, typer.Option(help="agent worker processes (with --all)")] = 2,
    simulator: Annotated[
        bool, typer.Option(help="also run the simulated LLM server (with --all)")
    ] = True,
    trainer: Annotated[bool, typer.Option(help="also run the trainer (with --all)")] = True,
    brokers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=9,
            help="Kafka nodes (KRaft, each broker and controller); 3 replicates every topic "
            "3 times with min.insync.replicas=2. Default: the data directory's cluster, else "
            "STORMLINE_KAFKA_BROKERS (1).",
        ),
    ] = None,
) -> None:
    """Start the embedded stack (Kafka, schema registry, Redis; chDB on disk). Reuses what runs.

    With --all, also create the topics, register the schemas and start Stormline's services
    under a supervisor that restarts them when they crash (logs in <data_dir>/logs/).
    """
    from stormline.deploy.errors import StackError
    from stormline.deploy.stack import EmbeddedStack

    s = settings_of(ctx)
    if brokers is not None:
        s = s.model_copy(update={"kafka_brokers": brokers})
    stack = EmbeddedStack(s, report=lambda m: ui.err.print(f"[dim]·[/dim] {escape(m)}"))
    try:
        with ui.err.status("starting the embedded stack…"):
            statuses = stack.up()
            if all_services:
                stack.up_services(workers=workers, simulator=simulator, trainer=trainer)
    except StackError as exc:
        ui.err.print(f"[red]stormline up failed:[/red] {escape(str(exc))}")
        ui.err.print("`stormline doctor` checks Java, Maven, ports and disk space in one go.")
        raise typer.Exit(ExitCode.FINDING) from exc
    print_services(statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(ExitCode.FINDING)


def down(ctx: typer.Context) -> None:
    """Stop what `stormline up` started. Data stays in the data directory."""
    from stormline.deploy.stack import EmbeddedStack

    stopped = EmbeddedStack(
        settings_of(ctx), report=lambda m: ui.err.print(f"· {escape(m)}")
    ).down()
    ui.console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[
        float | None,
        typer.Option(
            "--watch",
            is_flag=False,
            flag_value=2.0,
            metavar="[SECONDS]",
            help="refresh every SECONDS (default 2) until Ctrl-C",
        ),
    ] = None,
    services_only: Annotated[
        bool, typer.Option("--services-only", help="skip topics, lag, agents, checkpoints")
    ] = False,
) -> None:
    """Services, topics, consumer lag, agent health and endpoints, checkpoints, dead letters.

    Shows the services `up --all` supervises too; dead letters of the last hour. Exits 1 if
    a service is unhealthy (an agent endpoint that does not answer is shown, not counted:
    `stormline doctor` fails on it).
    """
    import time

    s = settings_of(ctx)
    while True:
        statuses = _status_once(s, as_json=as_json, clear=bool(watch), full=not services_only)
        if not watch:
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    if not all(x.healthy for x in statuses):
        raise typer.Exit(ExitCode.FINDING)


def _status_once(s: Settings, *, as_json: bool, clear: bool, full: bool) -> list[Any]:
    """Collect and print one status report; the services' statuses."""
    from stormline.deploy.stack import EmbeddedStack

    stack = EmbeddedStack(s)
    statuses: list[Any] = stack.status()
    supervised = stack.services()
    ops = None
    endpoints = None
    if full:
        from stormline.deploy.doctor import check_agents
        from stormline.deploy.ops import collect

        ops = collect(s)
        endpoints = check_agents(s)
    if as_json:
        doc: dict[str, Any] = {
            "services": [x.as_dict() for x in statuses],
            "supervised": supervised,
        }
        if ops is not None:
            doc.update(ops.as_dict())
        if endpoints is not None:
            doc["agent_endpoints"] = [c.as_dict() for c in endpoints]
        ui.print_json(doc)
        return statuses
    if clear:
        ui.console.clear()
    print_services(statuses)
    if supervised:
        _print_supervised(supervised)
    if ops is not None:
        from stormline.deploy.ops import print_ops

        print_ops(ui.console, ops)
    if endpoints is not None:
        print_checks(endpoints, "agent endpoints (agent registry base_url)")
    return statuses


def demo(
    ctx: typer.Context,
    tasks: Annotated[int, typer.Option(help="how many demo tasks to publish")] = 2000,
    workers: Annotated[int, typer.Option(help="agent worker processes")] = 2,
    real: Annotated[
        bool, typer.Option(help="real models from deploy/agents.real.yaml (needs API keys)")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every task's reward")] = 900,
    rate: Annotated[float, typer.Option(help="tasks published per second")] = 25.0,
    checkpoint_wait: Annotated[
        float, typer.Option(help="seconds to wait, once all is scored, for a first checkpoint")
    ] = 120.0,
    summary_json: Annotated[
        Path | None, typer.Option(help="also write the summary (figures, checkpoints) as JSON")
    ] = None,
) -> None:
    """Run the whole loop: stack, simulator, router, workers, evaluator, sink, trainer; publish
    verifiable tasks; show live progress; end with analytics, a reward curve and learning."""
    from stormline.deploy.demo import DemoError, run_demo
    from stormline.deploy.errors import StackError

    try:
        result = run_demo(
            settings_of(ctx),
            tasks=tasks,
            workers=workers,
            real=real,
            timeout_s=timeout,
            rate=rate,
            checkpoint_wait_s=checkpoint_wait,
            console=ui.console,
        )
    except (DemoError, StackError) as exc:
        ui.err.print(f"[red]demo failed:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.FINDING) from exc
    if summary_json is not None:
        summary_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["scored"] < result["tasks"]:
        raise typer.Exit(ExitCode.FINDING)


def doctor(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    only: Annotated[
        list[CheckGroup] | None,
        typer.Option("--only", help="run only this group of checks (repeatable)"),
    ] = None,
    skip: Annotated[
        list[CheckGroup] | None,
        typer.Option("--skip", help="leave out this group of checks (repeatable)"),
    ] = None,
) -> None:
    """Check the machine before anything starts: Java, Maven and its repository, free ports,
    the data directory (writable, disk space), the venv's packages, the agent endpoints.

    Each failed check says what to do. Exit 0 when every check passes, 1 otherwise. Creates
    and starts nothing.
    """
    from stormline.deploy.doctor import run_checks

    chosen = [g for g in CheckGroup if (only is None or g in only) and g not in (skip or ())]
    checks = run_checks(settings_of(ctx), chosen)
    ok = all(c.ok for c in checks)
    if as_json:
        ui.print_json({"ok": ok, "checks": [c.as_dict() for c in checks]})
    else:
        print_checks(checks, "stormline doctor")
        failed = sum(not c.ok for c in checks)
        ui.console.print(
            "[green]all checks passed[/green]"
            if ok
            else f"[red]{failed} check{'s' if failed > 1 else ''} failed[/red]: see 'what to do'"
        )
    if not ok:
        raise typer.Exit(ExitCode.FINDING)


def print_checks(checks: list[Any], title: str) -> None:
    from rich.text import Text

    table = ui.table(title, "check", "result", "detail", "what to do")
    for c in checks:
        result = (
            "[dim]skipped[/dim]"
            if c.skipped
            else "[green]ok[/green]"
            if c.ok
            else "[red]FAILED[/red]"
        )
        table.add_row(Text(c.name), result, Text(c.detail), Text(c.fix))
    ui.console.print(table)


def print_services(statuses: list[Any]) -> None:
    table = ui.table(
        "Stormline services", "service", "healthy", "version", "address", "mode", "detail"
    )
    for s in statuses:
        table.add_row(
            s.name,
            ui.yes_no(s.healthy),
            s.version,
            s.address,
            "embedded" if s.managed else "external",
            escape(s.detail),
        )
    ui.console.print(table)


def _print_supervised(rows: list[dict[str, object]]) -> None:
    table = ui.table(
        "supervised services (stormline up --all; logs in <data_dir>/logs/)",
        "service",
        "running",
        "pid",
        "restarts",
        "metrics",
        "command",
    )
    for r in rows:
        port = r.get("metrics")  # STORMLINE_METRICS_BASE_PORT + its place
        metrics = f"http://127.0.0.1:{port}/metrics" if port else "-"
        table.add_row(
            str(r["name"]),
            "[green]yes[/green]" if r["running"] else "[yellow]restarting[/yellow]",
            str(r["pid"]),
            str(r["restarts"]),
            metrics,
            escape(f"stormline {r['command']}"),
        )
    ui.console.print(table)
