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


# ------------------------------------------------------------------ schemas, topics --
schemas_app = typer.Typer(
    help="Avro schemas: register them, check compatibility.", no_args_is_help=True
)
topics_app = typer.Typer(help="The topic catalog on the cluster.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(topics_app, name="topics")


@schemas_app.command("register")
def schemas_register(ctx: typer.Context) -> None:
    """Register every event schema under <topic>-value in the schema registry."""
    from schemas.catalog import CATALOG
    from schemas.serde import RegistryUnavailable, Serde

    s = settings_of(ctx)
    serde = Serde.from_settings(s)
    table = Table(title=f"schemas in {s.registry_url}")
    for col in ("subject", "event", "id"):
        table.add_column(col)
    try:
        for spec in CATALOG:
            sid = serde.register(spec.name(s), spec.event)
            table.add_row(f"{spec.name(s)}-value", spec.event.__name__, str(sid))
    except RegistryUnavailable as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(table)


@schemas_app.command("check")
def schemas_check(
    ctx: typer.Context,
    offline: Annotated[bool, typer.Option(help="skip the registry, use fastavro only")] = False,
) -> None:
    """Prove every schema backward compatible with the last released version. Exit 1 if not."""
    from schemas.compat import check

    s = settings_of(ctx)
    results = check(registry_url=None if offline else s.registry_url)
    table = Table(title="backward compatibility with the last release")
    for col in ("event", "release", "method", "compatible", "problem"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.event,
            r.released,
            r.method,
            "[green]yes[/green]" if r.compatible else "[red]no[/red]",
            r.problem,
        )
    console.print(table)
    if not all(r.compatible for r in results):
        raise typer.Exit(1)


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create the catalog's topics that are missing (idempotent); report drift."""
    _topics(settings_of(ctx), create=True)


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """List the catalog's topics: partitions, end offsets, retention, drift. Exit 1 on drift."""
    _topics(settings_of(ctx), create=False)


def _topics(s: Settings, *, create: bool) -> None:
    from schemas.kafka import end_offsets, ensure_topics

    try:
        states = ensure_topics(s, create=create, timeout=15)
    except Exception as exc:
        err.print(
            f"[red]Kafka at {s.bootstrap_servers} did not answer: {exc}[/red] "
            "Run `stormline up` or set STORMLINE_KAFKA_BOOTSTRAP_SERVERS."
        )
        raise typer.Exit(1) from exc
    table = Table(title=f"topics on {s.bootstrap_servers}")
    for col in ("topic", "event", "key", "partitions", "messages", "retention.ms", "state"):
        table.add_column(col)
    for st in states:
        msgs = sum(end_offsets(s, st.name, st.partitions)) if st.exists else 0
        state = (
            "[red]missing[/red]"
            if not st.exists
            else "[yellow]drift: " + "; ".join(st.drift) + "[/yellow]"
            if st.drift
            else "[green]created[/green]"
            if st.created
            else "ok"
        )
        table.add_row(
            st.name,
            st.spec.event.__name__,
            st.spec.key,
            str(st.partitions),
            str(msgs),
            str(st.spec.retention(s)),
            state,
        )
    console.print(table)
    if any(st.drift or not st.exists for st in states):
        raise typer.Exit(1)


# ------------------------------------------------- producers and workers (issue 4) --

# ------------------------------------------------------------------ router (issue 5) --

# ----------------------------------------------------------------- trainer (issue 6) --

# ------------------------------------------------------- sink and analytics (issue 7) --


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
