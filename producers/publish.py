"""Publish tasks: JSONL lines or Python objects -> validated TaskSubmitted events on ``tasks``.

Each input becomes one TaskSubmitted keyed by its ``task_id`` (taken from the input, or a
new uuid4). An input that is not JSON, fails the model's validation (empty prompt, priority
outside 0-9, oversized prompt, unknown field...) or would exceed
``STORMLINE_MAX_RECORD_BYTES`` is reported with its line number and reason and not sent;
the others go on. Success is reported only after every record was acknowledged by the
brokers (idempotent producer, ``acks=all``, then ``flush``); then the tasks get status
``submitted`` in Redis (``stormline task``), best effort. :func:`wait_for` (from
:mod:`.waiting`) then blocks until the tasks end, on Redis pub/sub rather than polling.

Slightly over ~400 lines because ``stormline publish`` (file or stdin, progress, summary;
:func:`run_publish_command`) is here with the loop it reports on, in small functions. The
seam, when it grows, is that front end into ``stormline.cli.tasks``, which calls it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console

from stormline import tracing
from stormline.producers.waiting import NotFinished as NotFinished
from stormline.producers.waiting import wait_for as wait_for
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import TaskFields, TaskSubmitted
from stormline.schemas.serde import Serde
from stormline.settings import Settings

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

log = logging.getLogger("stormline.publish")

# How many invalid lines a report keeps in full; the count is always exact.
MAX_REPORTED_INVALID = 1_000


@dataclass(frozen=True)
class InvalidLine:
    line: int
    reason: str


@dataclass
class PublishReport:
    sent: int = 0
    invalid_count: int = 0
    invalid: list[InvalidLine] = field(default_factory=list)
    seconds: float = 0.0
    task_ids: list[str] = field(default_factory=list)
    status_error: str | None = None

    @property
    def rate(self) -> float:
        """Tasks acknowledged per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.invalid_count == 0

    def add_invalid(self, line: int, reason: str) -> None:
        self.invalid_count += 1
        if len(self.invalid) < MAX_REPORTED_INVALID:
            self.invalid.append(InvalidLine(line, reason))

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "invalid": self.invalid_count,
            "seconds": round(self.seconds, 3),
            "rate_per_s": round(self.rate, 1),
            "status_error": self.status_error,
            "invalid_lines": [{"line": i.line, "reason": i.reason} for i in self.invalid],
        }


class InvalidTask(ValueError):
    pass


def to_task(
    item: dict[str, Any] | TaskFields, max_record_bytes: int | None = None
) -> TaskSubmitted:
    """Validate one input as a TaskSubmitted; raises InvalidTask with a readable reason."""
    if isinstance(item, TaskSubmitted):
        task = item
    elif isinstance(item, TaskFields):
        task = TaskSubmitted.model_validate(item.model_dump())
    elif isinstance(item, dict):
        data = dict(item)
        if data.get("task_id") in (None, ""):
            data["task_id"] = str(uuid.uuid4())
        try:
            task = TaskSubmitted.model_validate(data)
        except ValidationError as exc:
            raise InvalidTask(_reasons(exc)) from exc
    else:
        raise InvalidTask(f"expected a JSON object, got {type(item).__name__}")
    if max_record_bytes is not None:
        _check_size(task, max_record_bytes)
    return task


def _check_size(task: TaskSubmitted, limit: int) -> None:
    # Characters take at most 4 UTF-8 bytes; only tasks that might be too big pay for an
    # exact measure (the Avro body is smaller than this JSON).
    rough = (
        len(task.prompt)
        + len(task.expected or "")
        + sum(len(k) + len(v) for k, v in task.metadata.items())
    )
    if rough * 4 < limit // 2:
        return
    size = len(task.model_dump_json().encode())
    if size > limit:
        raise InvalidTask(
            f"task of about {size} bytes exceeds STORMLINE_MAX_RECORD_BYTES={limit}; "
            "consumers would dead-letter it"
        )


def _reasons(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "string_too_long":
            msg = f"{msg} (got {len(str(e.get('input', '')))})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_lines(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | InvalidLine]]:
    """(line number, object) per non-blank line; InvalidLine for text that is not a JSON
    object. Line numbers start at 1 and count blank lines."""
    for n, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            yield n, InvalidLine(n, f"not JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield n, InvalidLine(n, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, obj


Progress = Callable[[int], None]
Item = dict[str, Any] | TaskFields | InvalidLine


def publish_tasks(
    settings: Settings,
    items: Iterable[dict[str, Any] | TaskFields],
    *,
    producer: EventProducer | None = None,
    on_progress: Progress | None = None,
    mark_submitted: bool = True,
    timeout: float = 60.0,
) -> PublishReport:
    """Validate and publish tasks; returns once every valid one is acknowledged.

    ``items`` are dicts (a missing ``task_id`` gets a uuid4) or TaskSubmitted/TaskFields
    models; the report names invalid ones by their 1-based position and lists the ids of
    those sent. Raises DeliveryError if the brokers did not acknowledge everything within
    ``timeout``.
    """
    return publish_numbered(
        settings,
        enumerate(items, start=1),
        producer=producer,
        on_progress=on_progress,
        keep_ids=True,
        mark_submitted=mark_submitted,
        timeout=timeout,
    )


def publish_stream(
    settings: Settings,
    stream: IO[str],
    *,
    producer: EventProducer | None = None,
    on_progress: Progress | None = None,
    mark_submitted: bool = True,
    timeout: float = 60.0,
) -> PublishReport:
    """Publish a JSONL text stream (a file or stdin); invalid lines named by line number."""
    return publish_numbered(
        settings,
        parse_lines(stream),
        producer=producer,
        on_progress=on_progress,
        keep_ids=False,
        mark_submitted=mark_submitted,
        timeout=timeout,
    )


def publish_numbered(
    settings: Settings,
    numbered: Iterable[tuple[int, Item]],
    *,
    producer: EventProducer | None = None,
    on_progress: Progress | None = None,
    keep_ids: bool = True,
    mark_submitted: bool = True,
    timeout: float = 60.0,
) -> PublishReport:
    """The loop behind both entry points. ``on_progress(n)``: n more inputs were handled.

    With ``mark_submitted``, tasks whose delivery is confirmed get status ``submitted`` in
    Redis (chunk by chunk; never over a newer status). Redis being down costs the status,
    not the publish: the report says so.
    """
    own = producer is None
    producer = producer or EventProducer(settings, Serde.from_settings(settings))
    topic = TASKS.name(settings)
    report = PublishReport()
    status = _StatusMarker(settings) if mark_submitted else None
    acked = [0]

    def delivered(err: object, _msg: object) -> None:
        if err is None:
            acked[0] += 1

    started = time.perf_counter()
    handled = 0
    try:
        for line, item in numbered:
            task = _valid_task(line, item, settings.max_record_bytes, report)
            if task is not None:
                # One trace per task, from here to its reward (nothing when tracing is off).
                with tracing.root("stormline.publish", {"stormline.task_id": task.task_id}):
                    producer.produce(task, topic=topic, on_delivery=delivered)
                if keep_ids:
                    report.task_ids.append(task.task_id)
                if status is not None and status.add(task.task_id):
                    producer.flush(timeout)  # status only for what the brokers hold
                    status.mark()
            handled += 1
            if handled >= 500:
                producer.poll(0)  # serve delivery callbacks while producing
                if on_progress is not None:
                    on_progress(handled)
                handled = 0
        producer.flush(timeout)
        if status is not None:
            status.mark()
            report.status_error = status.error
    finally:
        report.sent = acked[0]
        report.seconds = time.perf_counter() - started
        if own:
            producer.close(timeout=5)
    if on_progress is not None and handled:
        on_progress(handled)
    return report


def _valid_task(
    line: int, item: Item, max_bytes: int, report: PublishReport
) -> TaskSubmitted | None:
    """``item`` as a task to send, or None once the report says why it is invalid."""
    if isinstance(item, InvalidLine):
        report.add_invalid(item.line, item.reason)
        return None
    try:
        return to_task(item, max_bytes)
    except InvalidTask as exc:
        report.add_invalid(line, str(exc))
        return None


class _StatusMarker:
    """Buffers delivered task ids and marks them ``submitted`` in Redis, best effort."""

    CHUNK = 10_000

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ids: list[str] = []
        self.error: str | None = None

    def add(self, task_id: str) -> bool:
        """Buffer an id; True when the chunk is full and should be marked."""
        if self.error is not None:
            return False
        self.ids.append(task_id)
        return len(self.ids) >= self.CHUNK

    def mark(self) -> None:
        if self.error is not None or not self.ids:
            return
        import redis

        from stormline.state import mark_submitted

        try:
            mark_submitted(self.settings, self.ids)
        except (redis.RedisError, OSError) as exc:
            # Redis is the status view, not the record: the tasks are on Kafka all the same.
            self.error = f"task status not recorded in Redis ({type(exc).__name__}: {exc})"
            log.warning(self.error)
        self.ids = []


# ------------------------------------------------------------------------------ CLI --
def run_publish_command(
    settings: Settings,
    source: str,
    out: Console,
    err: Console,
    as_json: bool = False,
    mark_submitted: bool = True,
) -> int:
    """`stormline publish FILE|-`: progress on stderr, summary on stdout; the exit code."""
    from stormline.schemas.kafka import DeliveryError

    tracing.setup(settings, "publish")
    opened = _open_source(source, err)
    if opened is None:
        return 2
    stream, total = opened
    progress = _progress_bar(err, disable=as_json)
    try:
        with progress:
            bar = progress.add_task("tasks", total=total)
            report = publish_stream(
                settings,
                stream,
                on_progress=lambda n: progress.advance(bar, n),
                mark_submitted=mark_submitted,
            )
    except DeliveryError as exc:
        err.print(f"[red]publish failed:[/red] {exc}")
        return 3
    except Exception as exc:  # registry down, bad credentials, ...
        err.print(f"[red]publish failed:[/red] {type(exc).__name__}: {exc}")
        return 3
    finally:
        if stream is not sys.stdin:
            stream.close()
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        _print_report(settings, report, out, err)
    return 0 if report.ok else 1


def _open_source(source: str, err: Console) -> tuple[IO[str], int | None] | None:
    """The input stream and its count of non-blank lines (None for stdin); None if missing."""
    if source == "-":
        return sys.stdin, None
    path = Path(source)
    if not path.is_file():
        err.print(f"[red]no such file: {source}[/red] (give a JSONL file, or - for stdin)")
        return None
    with path.open("rb") as fh:
        total = sum(1 for line in fh if line.strip())
    return path.open(encoding="utf-8", errors="replace"), total


def _progress_bar(err: Console, *, disable: bool) -> RichProgress:
    """The transient progress bar on stderr (none with --json)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("publishing"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


def _print_report(settings: Settings, report: PublishReport, out: Console, err: Console) -> None:
    """Invalid lines and warnings on stderr, the summary on stdout."""
    from rich.markup import escape

    for bad in report.invalid:
        err.print(
            f"[yellow]line {bad.line}:[/yellow] {escape(bad.reason)}",
            highlight=False,
            soft_wrap=True,
        )
    if report.status_error:
        err.print(f"[yellow]warning:[/yellow] {escape(report.status_error)}")
    if report.invalid_count > len(report.invalid):
        err.print(f"... and {report.invalid_count - len(report.invalid)} more invalid lines")
    out.print(
        f"sent {report.sent} tasks to {TASKS.name(settings)}, "
        f"invalid {report.invalid_count}, {report.seconds:.2f} s, "
        f"{report.rate:,.0f} tasks/s",
        highlight=False,
    )
