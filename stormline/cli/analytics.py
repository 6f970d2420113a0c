"""The `analytics` command: canned queries or your own SQL over the sink's tables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, settings_of
from stormline.settings import Settings


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def analytics(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="canned query; omit to list them (or use --sql)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="only events since: 30m, 6h, 7d, or an ISO time")
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="output format")] = (
        OutputFormat.table
    ),
    plot: Annotated[Path | None, typer.Option(help="write a PNG of a time series")] = None,
    bucket: Annotated[int, typer.Option(help="time-series bucket in seconds", min=1)] = 60,
    sql: Annotated[
        str | None, typer.Option(help="run your own SQL over the tables (tasks, rewards, ...)")
    ] = None,
) -> None:
    """Canned analytics over the sink's tables, or your own SQL; table/json/csv, PNG plots.

    Exit 2 for a bad query name, time or SQL; 3 if the ClickHouse server does not answer.
    """
    from stormline.consumers.sink import analytics as an
    from stormline.consumers.sink.store import Result

    if name is None and sql is None:
        listing = Result(["name", "what"], [(c.name, c.doc) for c in an.CANNED.values()])
        _print_result(listing, fmt, "canned queries (stormline analytics NAME)")
        return
    start = _check_query(name, sql, since, plot)
    with _read_only_store(settings_of(ctx)) as store:
        res = _run_query(store, name, sql, start, bucket, plot)
    _print_result(res, fmt, name or "query")


def _check_query(name: str | None, sql: str | None, since: str | None, plot: Path | None) -> Any:
    """Refuse a bad combination, query name or time (exit 2); the start time."""
    from stormline.consumers.sink import analytics as an

    if name is not None and sql is not None:
        ui.err.print("[red]give a canned query NAME or --sql, not both[/red]")
        raise typer.Exit(ExitCode.USAGE)
    if name is not None and name not in an.CANNED:
        ui.err.print(
            f"[red]no canned query {escape(repr(name))}[/red]; "
            f"choose one of: {', '.join(an.CANNED)}"
        )
        raise typer.Exit(ExitCode.USAGE)
    try:
        start = an.parse_since(since)
        if sql is not None and plot is not None:
            raise an.AnalyticsError("--plot draws canned time series, not --sql results")
    except an.AnalyticsError as exc:
        ui.err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.USAGE) from exc
    return start


def _run_query(
    store: Any, name: str | None, sql: str | None, start: Any, bucket: int, plot: Path | None
) -> Any:
    """Run your SQL or the canned query (and draw its plot); exits on a failed query."""
    from stormline.consumers.sink import analytics as an
    from stormline.consumers.sink.store import StoreError

    try:
        if sql is not None:
            return store.query(an.render_sql(sql, start, bucket))
        res = an.run_canned(store, name or "", since=start, bucket_seconds=bucket)
        if plot is not None:
            an.plot(res, an.CANNED[name or ""], plot)
            ui.err.print(f"wrote {plot}", markup=False)
        return res
    except an.AnalyticsError as exc:
        ui.err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.USAGE) from exc
    except StoreError as exc:
        ui.err.print(f"[red]{escape(str(exc))}[/red]")
        # Your own SQL failing is most likely the SQL; a canned query failing is a finding.
        raise typer.Exit(ExitCode.USAGE if sql is not None else ExitCode.FINDING) from exc


class _read_only_store:
    """The analytics store, opened without creating anything under the data directory.

    chDB's parts directory is made by the sink; before the sink ever ran there is nothing to
    read, so the queries run over empty tables in a throwaway directory instead. A ClickHouse
    server that does not answer exits 3.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tmp: str | None = None

    def __enter__(self) -> Any:
        from stormline.consumers.sink.store import ParquetStore, StoreError, open_store, parts_dir

        s = self.settings
        if s.clickhouse_url:
            store = open_store(s)
            try:
                store.client()  # type: ignore[attr-defined]  # only the server store has one; connects now
            except StoreError as exc:
                ui.err.print(f"[red]{escape(str(exc))}[/red]")
                raise typer.Exit(ExitCode.UNREACHABLE) from exc
            return store
        root = parts_dir(s)
        if root.is_dir():
            return open_store(s)
        import tempfile

        ui.err.print(
            f"[dim]no events stored yet ({root} does not exist; `stormline sink` writes it): "
            "the tables are empty[/dim]"
        )
        self.tmp = tempfile.mkdtemp(prefix="stormline-empty-")
        return ParquetStore(Path(self.tmp))

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def _print_result(res: Any, fmt: OutputFormat, title: str) -> None:
    from rich.text import Text

    from stormline.consumers.sink import analytics as an

    if fmt is OutputFormat.json:
        print(an.to_json(res))
    elif fmt is OutputFormat.csv:
        print(an.to_csv(res), end="")
    else:
        table = ui.table(title, *res.columns)
        for r in res.rows:
            table.add_row(*(Text(an.cell(v)) for v in r))
        ui.console.print(table)
