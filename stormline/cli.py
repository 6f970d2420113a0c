"""The `stormline` command line: one Typer app, each command a thin shell over a part's API.

Global options override settings (CLI flag > STORMLINE_* environment > .env > default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stormline.settings import Settings

app = typer.Typer(
    help="Stormline: route tasks to LLM agents over Kafka, record, score and learn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


def settings_of(ctx: typer.Context) -> Settings:
    return ctx.obj  # type: ignore[no-any-return]


@app.callback()
def _global(
    ctx: typer.Context,
    data_dir: Annotated[Path | None, typer.Option(help="STORMLINE_DATA_DIR")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="STORMLINE_TOPIC_PREFIX")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="STORMLINE_KAFKA_BOOTSTRAP_SERVERS")
    ] = None,
    registry_url: Annotated[str | None, typer.Option(help="STORMLINE_SCHEMA_REGISTRY_URL")] = None,
    redis_url: Annotated[str | None, typer.Option(help="STORMLINE_REDIS_URL")] = None,
    clickhouse_url: Annotated[str | None, typer.Option(help="STORMLINE_CLICKHOUSE_URL")] = None,
) -> None:
    overrides = {
        "data_dir": data_dir,
        "topic_prefix": topic_prefix,
        "kafka_bootstrap_servers": bootstrap_servers,
        "schema_registry_url": registry_url,
        "redis_url": redis_url,
        "clickhouse_url": clickhouse_url,
    }
    try:
        ctx.obj = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


# ------------------------------------------------------------------------- the stack --
@app.command()
def up(ctx: typer.Context) -> None:
    """Start the embedded stack (Kafka, schema registry, Redis; chDB on disk). Reuses what runs."""
    from deploy.errors import StackError
    from deploy.stack import EmbeddedStack

    stack = EmbeddedStack(settings_of(ctx), report=lambda m: err.print(f"[dim]·[/dim] {m}"))
    try:
        with err.status("starting the embedded stack…"):
            statuses = stack.up()
    except StackError as exc:
        err.print(f"[red]stormline up failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    _print_services(statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop what `stormline up` started. Data stays in the data directory."""
    from deploy.stack import EmbeddedStack

    stopped = EmbeddedStack(settings_of(ctx), report=lambda m: err.print(f"· {m}")).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show each service's version, address and health. Exits 1 if any is unhealthy."""
    from deploy.stack import EmbeddedStack

    statuses = EmbeddedStack(settings_of(ctx)).status()
    if as_json:
        console.print_json(json.dumps({"services": [s.as_dict() for s in statuses]}))
    else:
        _print_services(statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


def _print_services(statuses: list) -> None:  # type: ignore[type-arg]
    table = Table(title="Stormline services")
    for col in ("service", "healthy", "version", "address", "mode", "detail"):
        table.add_column(col)
    for s in statuses:
        table.add_row(
            s.name,
            "[green]yes[/green]" if s.healthy else "[red]no[/red]",
            s.version,
            s.address,
            "embedded" if s.managed else "external",
            s.detail,
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
