"""The `stormline` command line: one Typer app, each command a thin shell over a part's API.

Global options override settings (CLI flag > STORMLINE_* environment > .env > default).

Exit codes mean the same for every command (:class:`ExitCode`): 0 ok; 1 a finding (drift, an
unhealthy service, an incompatible schema, invalid lines, a failed doctor check); 2 a usage
error (bad option, argument or settings; click's own code); 3 infrastructure that did not answer
(Kafka, the schema registry, Redis, ClickHouse).
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stormline.deploy.doctor import Group as CheckGroup
from stormline.settings import Settings


class ExitCode(IntEnum):
    OK = 0
    FINDING = 1  # drift, unhealthy service, incompatible schema, invalid lines, failed check
    USAGE = 2  # bad option/argument/settings (click exits 2 for its own usage errors too)
    UNREACHABLE = 3  # Kafka, the registry, Redis or ClickHouse did not answer


class Strategy(StrEnum):
    thompson = "thompson"
    epsilon_greedy = "epsilon_greedy"
    ucb1 = "ucb1"
    random = "random"
    round_robin = "round_robin"


class Store(StrEnum):
    memory = "memory"
    rocksdb = "rocksdb"


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class RewardSourceChoice(StrEnum):
    human = "human"
    verifier = "verifier"
    judge = "judge"
    timeout = "timeout"
    failure = "failure"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


app = typer.Typer(
    help="Stormline: route tasks to LLM agents over Kafka, record, score and learn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
# When stdout is not a terminal (a pipe, a file), rich would fit tables to 80 columns and cut
# ids short; print them whole instead (tables are only as wide as their content).
PIPE_WIDTH = 4096


def _make_console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


console = _make_console()
err = _make_console(stderr=True)


def _table(title: str, *columns: str) -> Table:
    """A table whose cells fold instead of being cut with an ellipsis: ids survive whole."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _print_json(doc: Any) -> None:
    text = json.dumps(doc, default=str)
    if console.is_terminal:
        console.print_json(text)
    else:
        print(json.dumps(doc, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("stormline")
        except PackageNotFoundError:
            v = "unknown (not installed: pip install -e .)"
        print(f"stormline {v}")
        raise typer.Exit(ExitCode.OK)


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
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    global console, err
    # Decided per run (a test runner or a pipe may have replaced stdout since import).
    console, err = _make_console(), _make_console(stderr=True)
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
        err.print(f"[red]invalid settings:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc


# ------------------------------------------------------------------------- the stack --
@app.command()
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
) -> None:
    """Start the embedded stack (Kafka, schema registry, Redis; chDB on disk). Reuses what runs.

    With --all, also create the topics, register the schemas and start Stormline's services
    under a supervisor that restarts them when they crash (logs in <data_dir>/logs/).
    """
    from stormline.deploy.errors import StackError
    from stormline.deploy.stack import EmbeddedStack

    stack = EmbeddedStack(settings_of(ctx), report=lambda m: err.print(f"[dim]·[/dim] {escape(m)}"))
    try:
        with err.status("starting the embedded stack…"):
            statuses = stack.up()
            if all_services:
                stack.up_services(workers=workers, simulator=simulator, trainer=trainer)
    except StackError as exc:
        err.print(f"[red]stormline up failed:[/red] {escape(str(exc))}")
        err.print("`stormline doctor` checks Java, Maven, ports and disk space in one go.")
        raise typer.Exit(ExitCode.FINDING) from exc
    _print_services(statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(ExitCode.FINDING)


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop what `stormline up` started. Data stays in the data directory."""
    from stormline.deploy.stack import EmbeddedStack

    stopped = EmbeddedStack(settings_of(ctx), report=lambda m: err.print(f"· {escape(m)}")).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
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

    from stormline.deploy.stack import EmbeddedStack

    s = settings_of(ctx)
    while True:
        stack = EmbeddedStack(s)
        statuses = stack.status()
        supervised = stack.services()
        ops = None
        endpoints = None
        if not services_only:
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
            _print_json(doc)
        else:
            if watch:
                console.clear()
            _print_services(statuses)
            if supervised:
                _print_supervised(supervised)
            if ops is not None:
                from stormline.deploy.ops import print_ops

                print_ops(console, ops)
            if endpoints is not None:
                _print_checks(endpoints, "agent endpoints (agent registry base_url)")
        if not watch:
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    if not all(x.healthy for x in statuses):
        raise typer.Exit(ExitCode.FINDING)


# ------------------------------------------------------------------ schemas, topics --
schemas_app = typer.Typer(
    help="Avro schemas: register them, check compatibility.", no_args_is_help=True
)
topics_app = typer.Typer(help="The topic catalog on the cluster.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(topics_app, name="topics")


JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output (JSON)")]


@schemas_app.command("register")
def schemas_register(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Register every event schema under <topic>-value in the schema registry.

    Exit 3 if the registry does not answer.
    """
    from stormline.schemas.catalog import CATALOG
    from stormline.schemas.serde import RegistryUnavailable, Serde

    s = settings_of(ctx)
    serde = Serde.from_settings(s)
    rows = []
    try:
        for spec in CATALOG:
            sid = serde.register(spec.name(s), spec.event)
            rows.append(
                {"subject": f"{spec.name(s)}-value", "event": spec.event.__name__, "id": sid}
            )
    except RegistryUnavailable as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if as_json:
        _print_json(rows)
        return
    table = _table(f"schemas in {s.registry_url}", "subject", "event", "id")
    for r in rows:
        table.add_row(r["subject"], r["event"], str(r["id"]))
    console.print(table)


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
        if registry is None or not _unreachable(exc):
            raise
        err.print(
            f"[red]the schema registry at {registry} did not answer[/red] "
            f"({type(exc).__name__}: {escape(str(exc))}). Run `stormline up`, set "
            "STORMLINE_SCHEMA_REGISTRY_URL, or check with fastavro alone: --offline"
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if as_json:
        _print_json([r.__dict__ for r in results])
    else:
        table = _table(
            "backward compatibility with the last release",
            "event",
            "release",
            "method",
            "compatible",
            "problem",
        )
        for r in results:
            table.add_row(
                r.event,
                r.released,
                r.method,
                "[green]yes[/green]" if r.compatible else "[red]no[/red]",
                escape(r.problem),
            )
        console.print(table)
    if not all(r.compatible for r in results):
        raise typer.Exit(ExitCode.FINDING)


def _unreachable(exc: BaseException) -> bool:
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
    return cause is not None and cause is not exc and _unreachable(cause)


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
    from stormline.schemas.kafka import end_offsets, ensure_topics

    try:
        states = ensure_topics(s, create=create, timeout=15)
    except Exception as exc:
        if not _unreachable(exc):
            err.print(
                f"[red]topics on {s.bootstrap_servers}:[/red] {type(exc).__name__}: "
                + escape(str(exc))
            )
            raise typer.Exit(ExitCode.FINDING) from exc
        err.print(
            f"[red]Kafka at {s.bootstrap_servers} did not answer:[/red] {escape(str(exc))} "
            "Run `stormline up` or set STORMLINE_KAFKA_BOOTSTRAP_SERVERS."
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
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
    if as_json:
        _print_json(rows)
    else:
        table = _table(
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
        console.print(table)
    if any(r["state"] in ("drift", "missing") for r in rows):
        raise typer.Exit(ExitCode.FINDING)


# ------------------------------------------------- producers and workers (issue 4) --


@app.command()
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
        run_publish_command(settings_of(ctx), source, console, err, as_json, mark_submitted=status)
    )


@app.command()
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
        err.print(f"[red]reward not recorded:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.FINDING) from exc
    except Exception as exc:
        if not _unreachable(exc):
            raise
        err.print(f"[red]reward not recorded:[/red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    _print_json(json.loads(rw.model_dump_json()))


@app.command()
def evaluator(ctx: typer.Context) -> None:
    """Score trajectories into Reward events (verifiers, LLM-as-judge, failure policy)."""
    from stormline import logs
    from stormline.consumers.evaluator.service import run

    logs.setup(service="evaluator")
    run(settings_of(ctx))


# agent workers, simulated LLM server, task status (issue 4, consumers/worker.py)
@app.command()
def worker(
    ctx: typer.Context,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="default: worker-<host>-<pid>")
    ] = None,
    agents: Annotated[
        Path | None, typer.Option("--agents", help="agent registry (STORMLINE_AGENTS_FILE)")
    ] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(help="STORMLINE_WORKER_MAX_IN_FLIGHT")
    ] = None,
) -> None:
    """Run an agent worker on `assignments` until SIGTERM (graceful: drains, commits, leaves)."""
    from stormline import logs
    from stormline.consumers.llm.agents import AgentConfigError
    from stormline.consumers.worker.service import run_worker

    logs.setup(service="worker")
    s = settings_of(ctx)
    updates = {"agents_file": agents, "worker_max_in_flight": max_in_flight}
    s = s.model_copy(update={k: v for k, v in updates.items() if v is not None})
    try:
        run_worker(s, worker_id)
    except AgentConfigError as exc:
        err.print(f"[red]bad agent registry:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc


@app.command("simulate-llm")
def simulate_llm(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="STORMLINE_SIMULATOR_PORT (8700)")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    config: Annotated[
        Path | None, typer.Option("--config", help="skills/latency YAML (see consumers/simulator)")
    ] = None,
) -> None:
    """Serve the simulated LLM (OpenAI- and Anthropic-compatible) for offline runs."""
    from stormline.consumers.llm.simulator import load_config, serve

    try:
        cfg = load_config(config)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]bad simulator config:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    p = port or settings_of(ctx).simulator_port
    err.print(
        f"simulated LLM on http://{host}:{p}/v1 (models: {', '.join(cfg.models)})", markup=False
    )
    serve(cfg, host, p)


@app.command()
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
        err.print(
            f"[red]Redis at {s.redis_address} did not answer:[/red] {type(exc).__name__}: "
            f"{escape(str(exc))}. "
            "Run `stormline up` or set STORMLINE_REDIS_URL."
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc
    if st is None:
        err.print(f"no status for task {escape(repr(task_id))} (unknown id, or expired)")
        raise typer.Exit(ExitCode.FINDING)
    _print_json({"task_id": task_id, **st})


# ------------------------------------------------------------------ router (issue 5) --


@app.command()
def router(
    ctx: typer.Context,
    strategy: Annotated[
        Strategy | None,
        typer.Option(help="routing strategy (default: STORMLINE_ROUTER_STRATEGY)"),
    ] = None,
    web_port: Annotated[
        int | None, typer.Option(help="web views' port (STORMLINE_ROUTER_WEB_PORT)")
    ] = None,
    store: Annotated[
        Store | None, typer.Option(help="table store (default: STORMLINE_ROUTER_STORE)")
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(case_sensitive=False, help="Faust worker log level (STORMLINE_LOG_LEVEL)"),
    ] = None,
    loglevel: Annotated[
        LogLevel | None, typer.Option("--loglevel", case_sensitive=False, hidden=True)
    ] = None,
) -> None:
    """Run the router (a Faust worker): route tasks, learn Q-tables, track agent health."""
    from stormline.streams.app import run_worker

    overrides = {
        "router_strategy": strategy.value if strategy else None,
        "router_web_port": web_port,
        "router_store": store.value if store else None,
    }
    try:
        s = Settings(
            **{
                **settings_of(ctx).model_dump(exclude_unset=True),
                **{k: v for k, v in overrides.items() if v is not None},
            }
        )
    except ValueError as exc:
        err.print(f"[red]invalid router settings:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    level = log_level or loglevel
    run_worker(s, loglevel=level.value if level else s.log_level.lower())


# ----------------------------------------------------------------- trainer (issue 6) --
@app.command()
def trainer(ctx: typer.Context) -> None:
    """Run the trainer: join trajectories + rewards, train on Ray, publish checkpoints."""
    from stormline.trainer.service import serve

    serve(settings_of(ctx))


@app.command()
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
        err.print("[red]give a time range (--since/--until) or offsets, not both[/red]")
        raise typer.Exit(ExitCode.USAGE)
    try:
        rng = Range(parse_time(since), parse_time(until), from_offset, to_offset)
        with Progress(console=err, transient=True) as bar:
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
        err.print(f"[red]replay:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    _print_json(summary)


# ------------------------------------------------------- sink and analytics (issue 7) --
@app.command()
def sink(ctx: typer.Context) -> None:
    """Consume every Stormline topic into ClickHouse (chDB Parquet parts or a server).

    Exit 3 if the ClickHouse server is not usable or the parts directory cannot be written.
    """
    from stormline import logs
    from stormline.consumers.sink.service import run_sink
    from stormline.consumers.sink.store import StoreError

    logs.setup(service="sink")
    try:
        run_sink(settings_of(ctx))
    except StoreError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc


@app.command()
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
    from stormline.consumers.sink.store import Result, StoreError

    if name is None and sql is None:
        listing = Result(["name", "what"], [(c.name, c.doc) for c in an.CANNED.values()])
        _print_result(listing, fmt, "canned queries (stormline analytics NAME)")
        return
    if name is not None and sql is not None:
        err.print("[red]give a canned query NAME or --sql, not both[/red]")
        raise typer.Exit(ExitCode.USAGE)
    if name is not None and name not in an.CANNED:
        err.print(
            f"[red]no canned query {escape(repr(name))}[/red]; "
            f"choose one of: {', '.join(an.CANNED)}"
        )
        raise typer.Exit(ExitCode.USAGE)
    s = settings_of(ctx)
    try:
        start = an.parse_since(since)
        if sql is not None and plot is not None:
            raise an.AnalyticsError("--plot draws canned time series, not --sql results")
    except an.AnalyticsError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(ExitCode.USAGE) from exc
    with _read_only_store(s) as store:
        try:
            if sql is not None:
                res = store.query(an.render_sql(sql, start, bucket))
            else:
                res = an.run_canned(store, name or "", since=start, bucket_seconds=bucket)
                if plot is not None:
                    an.plot(res, an.CANNED[name or ""], plot)
                    err.print(f"wrote {plot}", markup=False)
        except an.AnalyticsError as exc:
            err.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(ExitCode.USAGE) from exc
        except StoreError as exc:
            err.print(f"[red]{escape(str(exc))}[/red]")
            # Your own SQL failing is most likely the SQL; a canned query failing is a finding.
            raise typer.Exit(ExitCode.USAGE if sql is not None else ExitCode.FINDING) from exc
    _print_result(res, fmt, name or "query")


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
                store.client()  # type: ignore[attr-defined]
            except StoreError as exc:
                err.print(f"[red]{escape(str(exc))}[/red]")
                raise typer.Exit(ExitCode.UNREACHABLE) from exc
            return store
        root = parts_dir(s)
        if root.is_dir():
            return open_store(s)
        import tempfile

        err.print(
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
        table = _table(title, *res.columns)
        for r in res.rows:
            table.add_row(*(Text(an.cell(v)) for v in r))
        console.print(table)


# --------------------------------------------------------------- the whole loop (issue 8) --
@app.command()
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
            console=console,
        )
    except (DemoError, StackError) as exc:
        err.print(f"[red]demo failed:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.FINDING) from exc
    if summary_json is not None:
        summary_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["scored"] < result["tasks"]:
        raise typer.Exit(ExitCode.FINDING)


# ------------------------------------------------------------------- doctor (issue 12) --
@app.command()
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
        _print_json({"ok": ok, "checks": [c.as_dict() for c in checks]})
    else:
        _print_checks(checks, "stormline doctor")
        failed = sum(not c.ok for c in checks)
        console.print(
            "[green]all checks passed[/green]"
            if ok
            else f"[red]{failed} check{'s' if failed > 1 else ''} failed[/red]: see 'what to do'"
        )
    if not ok:
        raise typer.Exit(ExitCode.FINDING)


def _print_checks(checks: list[Any], title: str) -> None:
    from rich.text import Text

    table = _table(title, "check", "result", "detail", "what to do")
    for c in checks:
        result = (
            "[dim]skipped[/dim]"
            if c.skipped
            else "[green]ok[/green]"
            if c.ok
            else "[red]FAILED[/red]"
        )
        table.add_row(Text(c.name), result, Text(c.detail), Text(c.fix))
    console.print(table)


def _print_services(statuses: list) -> None:  # type: ignore[type-arg]
    table = _table(
        "Stormline services", "service", "healthy", "version", "address", "mode", "detail"
    )
    for s in statuses:
        table.add_row(
            s.name,
            "[green]yes[/green]" if s.healthy else "[red]no[/red]",
            s.version,
            s.address,
            "embedded" if s.managed else "external",
            escape(s.detail),
        )
    console.print(table)


def _print_supervised(rows: list[dict[str, object]]) -> None:
    table = _table(
        "supervised services (stormline up --all; logs in <data_dir>/logs/)",
        "service",
        "running",
        "pid",
        "restarts",
        "command",
    )
    for r in rows:
        table.add_row(
            str(r["name"]),
            "[green]yes[/green]" if r["running"] else "[yellow]restarting[/yellow]",
            str(r["pid"]),
            str(r["restarts"]),
            escape(f"stormline {r['command']}"),
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
