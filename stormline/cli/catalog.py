"""The `schemas` and `topics` command groups: the event schemas and the topic catalog."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, JsonFlag, settings_of
from stormline.settings import Settings

schemas_app = typer.Typer(
    help="Avro schemas: register them, check compatibility.", no_args_is_help=True
)
topics_app = typer.Typer(help="The topic catalog on the cluster.", no_args_is_help=True)


@schemas_app.command("register")
def schemas_register(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Register every event schema under <topic>-value in the schema registry.

    Exit 3 if the registry does not answer.
    """
    from stormline.schemas.catalog import CATALOG
    from stormline.schemas.serde import RegistryUnavailable, Serde

    s = settings_of(ctx)
    serde = Serde.from_settings(s)
    rows: list[dict[str, Any]] = []
    try:
        for spec in CATALOG:
            sid = serde.register(spec.name(s), spec.event)
            rows.append(
                {"subject": f"{spec.name(s)}-value", "event": spec.event.__name__, "id": sid}
            )
    except RegistryUnavailable as exc:
        ui.err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if as_json:
        ui.print_json(rows)
        return
    table = ui.table(f"schemas in {s.registry_url}", "subject", "event", "id")
    for r in rows:
        table.add_row(r["subject"], r["event"], str(r["id"]))
    ui.console.print(table)


@schemas_app.command("check")
def schemas_check(
    ctx: typer.Context,
    offline: Annotated[bool, typer.Option(help="skip the registry, use fastavro only")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Prove every schema backward compatible with the last released version.

    Exit 1 if one is not; 3 if the registry does not answer (--offline skips it).
    """
    from stormline.schemas.compat import check

    s = settings_of(ctx)
    registry = None if offline else s.registry_url
    try:
        results = check(registry_url=registry)
    except Exception as exc:
        if registry is None or not ui.unreachable(exc):
            raise
        ui.err.print(
            f"[red]the schema registry at {registry} did not answer[/red] "
            f"({type(exc).__name__}: {escape(str(exc))}). Run `stormline up`, set "
            "STORMLINE_SCHEMA_REGISTRY_URL, or check with fastavro alone: --offline"
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if as_json:
        ui.print_json([r.__dict__ for r in results])
    else:
        table = ui.table(
            "backward compatibility with the last release",
            "event",
            "release",
            "method",
            "compatible",
            "problem",
        )
        for r in results:
            table.add_row(r.event, r.released, r.method, ui.yes_no(r.compatible), escape(r.problem))
        ui.console.print(table)
    if not all(r.compatible for r in results):
        raise typer.Exit(ExitCode.FINDING)


@topics_app.command("create")
def topics_create(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Create the catalog's topics that are missing (idempotent); report drift.

    Exit 1 on drift; 3 if Kafka does not answer.
    """
    _topics(settings_of(ctx), create=True, as_json=as_json)


@topics_app.command("list")
def topics_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the catalog's topics: partitions, end offsets, retention, drift.

    Exit 1 on drift or a missing topic; 3 if Kafka does not answer.
    """
    _topics(settings_of(ctx), create=False, as_json=as_json)


def _topics(s: Settings, *, create: bool, as_json: bool = False) -> None:
    rows = _topic_rows(s, _topic_states(s, create=create))
    if as_json:
        ui.print_json(rows)
    else:
        _print_topics(s, rows)
    if any(r["state"] in ("drift", "missing") for r in rows):
        raise typer.Exit(ExitCode.FINDING)


def _topic_states(s: Settings, *, create: bool) -> list[Any]:
    """The catalog's topics on the cluster (created first if ``create``); exits on errors."""
    from stormline.schemas.kafka import ensure_topics

    try:
        states: list[Any] = ensure_topics(s, create=create, timeout=15)
    except Exception as exc:
        if not ui.unreachable(exc):
            ui.err.print(
                f"[red]topics on {s.bootstrap_servers}:[/red] {type(exc).__name__}: "
                + escape(str(exc))
            )
            raise typer.Exit(ExitCode.FINDING) from exc
        ui.err.print(
            f"[red]Kafka at {s.bootstrap_servers} did not answer:[/red] {escape(str(exc))} "
            "Run `stormline up` or set STORMLINE_KAFKA_BOOTSTRAP_SERVERS."
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    return states


def _topic_rows(s: Settings, states: list[Any]) -> list[dict[str, Any]]:
    from stormline.schemas.kafka import end_offsets

    rows = []
    for st in states:
        state = (
            "missing"
            if not st.exists
            else "drift"
            if st.drift
            else "created"
            if st.created
            else "ok"
        )
        rows.append(
            {
                "topic": st.name,
                "event": st.spec.event.__name__,
                "key": st.spec.key,
                "partitions": st.partitions,
                "messages": sum(end_offsets(s, st.name, st.partitions)) if st.exists else 0,
                "retention_ms": st.spec.retention(s),
                "state": state,
                "drift": list(st.drift),
            }
        )
    return rows


def _print_topics(s: Settings, rows: list[dict[str, Any]]) -> None:
    table = ui.table(
        f"topics on {s.bootstrap_servers}",
        "topic",
        "event",
        "key",
        "partitions",
        "messages",
        "retention.ms",
        "state",
    )
    colour = {"missing": "red", "drift": "yellow", "created": "green"}
    for r in rows:
        text = escape("drift: " + "; ".join(r["drift"])) if r["drift"] else r["state"]
        c = colour.get(r["state"])
        table.add_row(
            r["topic"],
            r["event"],
            r["key"],
            str(r["partitions"]),
            str(r["messages"]),
            str(r["retention_ms"]),
            f"[{c}]{text}[/{c}]" if c else text,
        )
    ui.console.print(table)
