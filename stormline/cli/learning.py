"""Learning from history: the `replay` command (retrain on a range of past events)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, settings_of


def replay(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="start time: ISO 8601 (UTC if no zone) or 30m/2h/7d ago")
    ] = None,
    until: Annotated[str | None, typer.Option(help="end time (exclusive), same formats")] = None,
    from_offset: Annotated[
        str | None, typer.Option(help="N for every partition, or P=N / topic:P=N, comma-separated")
    ] = None,
    to_offset: Annotated[
        str | None, typer.Option(help="end offsets (exclusive), same format")
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch/--fine-tune", help="fresh weights or the latest")
    ] = True,
    train: Annotated[bool, typer.Option("--train/--no-train", help="train on the range")] = True,
    publish: Annotated[
        bool, typer.Option("--publish/--no-publish", help="publish CheckpointPublished")
    ] = True,
    to_topic: Annotated[
        str | None, typer.Option(help="also write the joined experiences (JSON) to this topic")
    ] = None,
) -> None:
    """Re-read trajectories + rewards for a range and retrain; live offsets stay untouched."""
    from rich.progress import Progress

    from stormline.trainer.replay import Range, ReplayError, parse_time
    from stormline.trainer.replay import replay as run_replay

    if (since or until) and (from_offset or to_offset):
        ui.err.print("[red]give a time range (--since/--until) or offsets, not both[/red]")
        raise typer.Exit(ExitCode.USAGE)
    try:
        rng = Range(parse_time(since), parse_time(until), from_offset, to_offset)
        with Progress(console=ui.err, transient=True) as bar:
            task = bar.add_task("reading trajectories and rewards", total=None)
            summary = run_replay(
                settings_of(ctx),
                rng,
                train=train,
                from_scratch=from_scratch,
                to_topic=to_topic,
                publish=publish,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except ReplayError as exc:
        ui.err.print(f"[red]replay:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    ui.print_json(summary)
