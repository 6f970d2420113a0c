"""Tasks in, feedback out: the `publish`, `reward` and `task` commands."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, settings_of


class RewardSourceChoice(StrEnum):
    human = "human"
    verifier = "verifier"
    judge = "judge"
    timeout = "timeout"
    failure = "failure"


def publish(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="JSONL file of tasks, or - for stdin")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    status: Annotated[
        bool, typer.Option(help="mark the tasks 'submitted' in Redis (`stormline task`)")
    ] = True,
) -> None:
    """Publish tasks from JSONL, one TaskSubmitted per line (task_id generated if absent).

    Exit 0: every line sent and acknowledged. 1: some lines were invalid (reported with
    their line numbers; the valid ones were still sent). 2: the file cannot be read.
    3: the brokers (or the registry) did not acknowledge the tasks.
    """
    from stormline.producers.publish import run_publish_command

    raise typer.Exit(
        run_publish_command(
            settings_of(ctx), source, ui.console, ui.err, as_json, mark_submitted=status
        )
    )


def reward(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="the task the feedback is about")],
    value: Annotated[float, typer.Argument(help="0 (bad) .. 1 (good)", min=0.0, max=1.0)],
    source: Annotated[
        RewardSourceChoice, typer.Option(help="who gave the feedback")
    ] = RewardSourceChoice.human,
    trajectory_id: Annotated[
        str | None, typer.Option(help="default: the task's latest trajectory")
    ] = None,
    agent_id: Annotated[str | None, typer.Option(help="default: that trajectory's agent")] = None,
    reason: Annotated[str | None, typer.Option(help="free text kept with the reward")] = None,
) -> None:
    """Record feedback on a task as a Reward event (looks up its latest trajectory).

    Exit 1 if the task has no trajectory to attach it to; 3 if Kafka or the registry does not
    answer.
    """
    from stormline.producers.feedback import FeedbackError, record_reward

    try:
        rw = record_reward(
            settings_of(ctx),
            task_id,
            value,
            source=source.value,
            trajectory_id=trajectory_id,
            agent_id=agent_id,
            reason=reason,
        )
    except FeedbackError as exc:
        ui.err.print(f"[red]reward not recorded:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.FINDING) from exc
    except Exception as exc:
        if not ui.unreachable(exc):
            raise
        ui.err.print(f"[red]reward not recorded:[/red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    ui.print_json(json.loads(rw.model_dump_json()))


def task(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="the task's id")],
) -> None:
    """Show a task's status from Redis: state, attempt, agent, output or error, reward.

    Exit 1 for an unknown (or expired) task id; 3 if Redis does not answer.
    """
    import redis

    from stormline.state import task_status

    s = settings_of(ctx)
    try:
        st = task_status(s, task_id)
    except (redis.RedisError, OSError) as exc:
        ui.err.print(
            f"[red]Redis at {s.redis_address} did not answer:[/red] {type(exc).__name__}: "
            f"{escape(str(exc))}. "
            "Run `stormline up` or set STORMLINE_REDIS_URL."
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if st is None:
        ui.err.print(f"no status for task {escape(repr(task_id))} (unknown id, or expired)")
        raise typer.Exit(ExitCode.FINDING)
    ui.print_json({"task_id": task_id, **st})
