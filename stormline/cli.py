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
    from deploy.errors import StackError
    from deploy.stack import EmbeddedStack

    stack = EmbeddedStack(settings_of(ctx), report=lambda m: err.print(f"[dim]·[/dim] {m}"))
    try:
        with err.status("starting the embedded stack…"):
            statuses = stack.up()
            if all_services:
                stack.up_services(workers=workers, simulator=simulator, trainer=trainer)
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
    """Services (and those `up --all` supervises), topics, consumer lag, agent health,
    checkpoints, recent dead letters.

    Exits 1 if any service is unhealthy.
    """
    import time

    from deploy.stack import EmbeddedStack

    s = settings_of(ctx)
    while True:
        stack = EmbeddedStack(s)
        statuses = stack.status()
        supervised = stack.services()
        ops = None
        if not services_only:
            from consumers.ops import collect

            ops = collect(s)
        if as_json:
            doc = {"services": [x.as_dict() for x in statuses], "supervised": supervised}
            if ops is not None:
                doc.update(ops.as_dict())
            console.print_json(json.dumps(doc, default=str))
        else:
            if watch:
                console.clear()
            _print_services(statuses)
            if supervised:
                _print_supervised(supervised)
            if ops is not None:
                from consumers.ops import print_ops

                print_ops(console, ops)
        if not watch:
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    if not all(x.healthy for x in statuses):
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
    their line numbers; the valid ones were still sent). 2: the file cannot be read or the
    brokers did not acknowledge the tasks.
    """
    from producers.publish import run_publish_command

    raise typer.Exit(
        run_publish_command(settings_of(ctx), source, console, err, as_json, mark_submitted=status)
    )


@app.command()
def reward(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="the task the feedback is about")],
    value: Annotated[float, typer.Argument(help="0 (bad) .. 1 (good)")],
    source: Annotated[str, typer.Option(help="human, verifier, judge, ...")] = "human",
    trajectory_id: Annotated[
        str | None, typer.Option(help="default: the task's latest trajectory")
    ] = None,
    agent_id: Annotated[str | None, typer.Option(help="default: that trajectory's agent")] = None,
    reason: Annotated[str | None, typer.Option(help="free text kept with the reward")] = None,
) -> None:
    """Record feedback on a task as a Reward event (looks up its latest trajectory)."""
    from producers.feedback import FeedbackError, record_reward

    try:
        rw = record_reward(
            settings_of(ctx),
            task_id,
            value,
            source=source,
            trajectory_id=trajectory_id,
            agent_id=agent_id,
            reason=reason,
        )
    except FeedbackError as exc:
        err.print(f"[red]reward not recorded:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print_json(rw.model_dump_json())


@app.command()
def evaluator(ctx: typer.Context) -> None:
    """Score trajectories into Reward events (verifiers, LLM-as-judge, failure policy)."""
    from consumers.evaluator_service import run
    from stormline import logs

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
    from consumers.agents import AgentConfigError
    from consumers.worker import run_worker
    from stormline import logs

    logs.setup(service="worker")
    s = settings_of(ctx)
    updates = {"agents_file": agents, "worker_max_in_flight": max_in_flight}
    s = s.model_copy(update={k: v for k, v in updates.items() if v is not None})
    try:
        run_worker(s, worker_id)
    except AgentConfigError as exc:
        err.print(f"[red]bad agent registry:[/red] {exc}")
        raise typer.Exit(2) from exc


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
    from consumers.simulator import load_config, serve

    try:
        cfg = load_config(config)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]bad simulator config:[/red] {exc}")
        raise typer.Exit(2) from exc
    p = port or settings_of(ctx).simulator_port
    err.print(f"simulated LLM on http://{host}:{p}/v1 (models: {', '.join(cfg.models)})")
    serve(cfg, host, p)


@app.command()
def task(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="the task's id")],
) -> None:
    """Show a task's status from Redis: state, attempt, agent, output or error, reward."""
    from consumers.state import task_status

    s = settings_of(ctx)
    try:
        st = task_status(s, task_id)
    except Exception as exc:
        err.print(f"[red]Redis did not answer:[/red] {type(exc).__name__}; is it running?")
        raise typer.Exit(2) from exc
    if st is None:
        err.print(f"no status for task {task_id!r} (unknown id, or expired)")
        raise typer.Exit(1)
    console.print_json(json.dumps({"task_id": task_id, **st}))


# ------------------------------------------------------------------ router (issue 5) --


@app.command()
def router(
    ctx: typer.Context,
    strategy: Annotated[
        str | None,
        typer.Option(help="epsilon_greedy|ucb1|thompson|random|round_robin (ROUTER_STRATEGY)"),
    ] = None,
    web_port: Annotated[int | None, typer.Option(help="STORMLINE_ROUTER_WEB_PORT")] = None,
    store: Annotated[str | None, typer.Option(help="memory|rocksdb (ROUTER_STORE)")] = None,
    loglevel: Annotated[str, typer.Option(help="Faust worker log level")] = "info",
) -> None:
    """Run the router (a Faust worker): route tasks, learn Q-tables, track agent health."""
    from streams.app import run_worker

    overrides = {"router_strategy": strategy, "router_web_port": web_port, "router_store": store}
    try:
        s = Settings(
            **{
                **settings_of(ctx).model_dump(exclude_unset=True),
                **{k: v for k, v in overrides.items() if v is not None},
            }
        )
    except ValueError as exc:
        err.print(f"[red]invalid router settings:[/red] {exc}")
        raise typer.Exit(2) from exc
    run_worker(s, loglevel=loglevel)


# ----------------------------------------------------------------- trainer (issue 6) --
@app.command()
def trainer(ctx: typer.Context) -> None:
    """Run the trainer: join trajectories + rewards, train on Ray, publish checkpoints."""
    from trainer.service import serve

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

    from trainer.replay import Range, ReplayError, parse_time
    from trainer.replay import replay as run_replay

    if (since or until) and (from_offset or to_offset):
        err.print("[red]give a time range (--since/--until) or offsets, not both[/red]")
        raise typer.Exit(2)
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
        err.print(f"[red]replay:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(summary, default=str))


# ------------------------------------------------------- sink and analytics (issue 7) --
@app.command()
def sink(ctx: typer.Context) -> None:
    """Consume every Stormline topic into ClickHouse (chDB Parquet parts or a server)."""
    from consumers.clickhouse import StoreError
    from consumers.sink import run_sink
    from stormline import logs

    logs.setup(service="sink")
    try:
        run_sink(settings_of(ctx))
    except StoreError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


@app.command()
def analytics(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="canned query; omit to list them (or use --sql)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="only events since: 30m, 6h, 7d, or an ISO time")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    plot: Annotated[Path | None, typer.Option(help="write a PNG of a time series")] = None,
    bucket: Annotated[int, typer.Option(help="time-series bucket in seconds")] = 60,
    sql: Annotated[
        str | None, typer.Option(help="run your own SQL over the tables (tasks, rewards, ...)")
    ] = None,
) -> None:
    """Canned analytics over the sink's tables, or your own SQL; table/json/csv, PNG plots."""
    from consumers import analytics as an
    from consumers.clickhouse import StoreError, open_store

    if fmt not in ("table", "json", "csv"):
        err.print(f"[red]--format {fmt!r}: use table, json or csv[/red]")
        raise typer.Exit(2)
    if name is None and sql is None:
        table = Table(title="canned queries (stormline analytics NAME)")
        table.add_column("name")
        table.add_column("what")
        for c in an.CANNED.values():
            table.add_row(c.name, c.doc)
        console.print(table)
        return
    if name is not None and sql is not None:
        err.print("[red]give a canned query NAME or --sql, not both[/red]")
        raise typer.Exit(2)
    try:
        store = open_store(settings_of(ctx))
        start = an.parse_since(since)
        if sql is not None:
            if plot is not None:
                raise an.AnalyticsError("--plot draws canned time series, not --sql results")
            res = store.query(an.render_sql(sql, start, bucket))
        else:
            res = an.run_canned(store, name or "", since=start, bucket_seconds=bucket)
            if plot is not None:
                an.plot(res, an.CANNED[name or ""], plot)
                err.print(f"wrote {plot}")
    except (an.AnalyticsError, StoreError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2 if isinstance(exc, an.AnalyticsError) else 1) from exc
    if fmt == "json":
        print(an.to_json(res))
    elif fmt == "csv":
        print(an.to_csv(res), end="")
    else:
        table = Table(title=name or "query")
        for c in res.columns:
            table.add_column(c)
        for r in res.rows:
            table.add_row(*(an.cell(v) for v in r))
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
    from deploy.demo import DemoError, run_demo
    from deploy.errors import StackError

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
        err.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    if summary_json is not None:
        summary_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["scored"] < result["tasks"]:
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


def _print_supervised(rows: list[dict[str, object]]) -> None:
    table = Table(title="supervised services (stormline up --all; logs in <data_dir>/logs/)")
    for col in ("service", "running", "pid", "restarts", "command"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["name"]),
            "[green]yes[/green]" if r["running"] else "[yellow]restarting[/yellow]",
            str(r["pid"]),
            str(r["restarts"]),
            f"stormline {r['command']}",
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
