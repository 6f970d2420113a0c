"""What every command group shares: exit codes, the consoles, tables, JSON and settings_of."""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stormline.settings import Settings


class ExitCode(IntEnum):
    OK = 0
    FINDING = 1  # drift, unhealthy service, incompatible schema, invalid lines, failed check
    USAGE = 2  # bad option/argument/settings (click exits 2 for its own usage errors too)
    UNREACHABLE = 3  # Kafka, the registry, Redis or ClickHouse did not answer


# When stdout is not a terminal (a pipe, a file), rich would fit tables to 80 columns and cut
# ids short; print them whole instead (tables are only as wide as their content).
PIPE_WIDTH = 4096

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output (JSON)")]


def make_console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


# Read them as ``ui.console`` / ``ui.err``: the global options replace both on every run.
console = make_console()
err = make_console(stderr=True)


def reset_consoles() -> None:
    """Decide the consoles per run (a test runner or a pipe may have replaced stdout)."""
    global console, err
    console, err = make_console(), make_console(stderr=True)


def table(title: str, *columns: str) -> Table:
    """A table whose cells fold instead of being cut with an ellipsis: ids survive whole."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def print_json(doc: Any) -> None:
    text = json.dumps(doc, default=str)
    if console.is_terminal:
        console.print_json(text)
    else:
        print(json.dumps(doc, indent=2, default=str))


def settings_of(ctx: typer.Context) -> Settings:
    return ctx.obj


def yes_no(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the service did not answer" (rather than "said no")."""
    import httpx

    from stormline.schemas.serde import RegistryUnavailable

    if isinstance(exc, RegistryUnavailable | httpx.TransportError | ConnectionError | TimeoutError):
        return True
    try:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
    except ImportError:
        pass
    from confluent_kafka import KafkaError, KafkaException

    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code() in {
            KafkaError._TRANSPORT,
            KafkaError._TIMED_OUT,
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._RESOLVE,
            KafkaError.NETWORK_EXCEPTION,
            KafkaError.REQUEST_TIMED_OUT,
        }
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and unreachable(cause)
