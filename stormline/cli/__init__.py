"""The `stormline` command line: one Typer app, each command a thin shell over a part's API.

Global options override settings (CLI flag > STORMLINE_* environment > .env > default).

Exit codes mean the same for every command (:class:`ExitCode`): 0 ok; 1 a finding (drift, an
unhealthy service, an incompatible schema, invalid lines, a failed doctor check); 2 a usage
error (bad option, argument or settings; click's own code); 3 infrastructure that did not answer
(Kafka, the schema registry, Redis, ClickHouse).

This module owns the app, the global options and ``main``; each command group lives in a module
of its own: ``stack`` (up, down, status, demo, doctor), ``catalog`` (topics, schemas), ``tasks``
(publish, reward, task), ``services`` (worker, evaluator, simulate-llm, router, trainer, sink),
``learning`` (replay), ``analytics``; ``ui`` holds what they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from stormline.cli import analytics, api, catalog, learning, services, stack, tasks, ui
from stormline.cli.ui import ExitCode, settings_of
from stormline.settings import Settings

__all__ = ["ExitCode", "app", "main", "settings_of"]

app = typer.Typer(
    help="Stormline: route tasks to LLM agents over Kafka, record, score and learn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("stormline")
        except PackageNotFoundError:
            v = "unknown (not installed: pip install -e .)"
        print(f"stormline {v}")
        raise typer.Exit(ExitCode.OK)


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
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    ui.reset_consoles()
    overrides: dict[str, Any] = {
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
        ui.err.print(f"[red]invalid settings:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc


# In this order in `stormline --help`.
for _command in (
    stack.up,
    stack.down,
    stack.status,
    tasks.publish,
    tasks.reward,
    services.evaluator,
    services.worker,
    services.simulate_llm,
    tasks.task,
    services.router,
    services.trainer,
    learning.replay,
    services.sink,
    analytics.analytics,
    stack.demo,
    stack.doctor,
    api.api,
):
    app.command(_command.__name__.replace("_", "-"))(_command)
app.add_typer(catalog.schemas_app, name="schemas")
app.add_typer(catalog.topics_app, name="topics")
app.add_typer(api.keys_app, name="keys")
app.add_typer(api.dead_letters_app, name="dead-letters")


def main() -> None:
    app()
