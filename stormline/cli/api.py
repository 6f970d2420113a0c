"""The HTTP API and what operators do beside it: `api`, `keys create|list|revoke`,
`dead-letters list|replay`."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape

from stormline.cli import ui
from stormline.cli.ui import ExitCode, settings_of
from stormline.settings import Settings

keys_app = typer.Typer(
    help="API keys of the HTTP API (stored hashed in Redis).", no_args_is_help=True
)
dead_letters_app = typer.Typer(
    help="Records that could not be handled: see why, replay them after a fix.",
    no_args_is_help=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]


class RoleChoice(StrEnum):
    submit = "submit"
    read = "read"
    operate = "operate"
    admin = "admin"


def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="STORMLINE_API_HOST (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="STORMLINE_API_PORT (8000)")] = None,
) -> None:
    """Serve the HTTP API (FastAPI, /docs) until SIGTERM: tasks, results, rewards, operators."""
    from stormline import logs, metrics
    from stormline.api.app import serve

    logs.setup(service="api")
    s = settings_of(ctx)
    metrics.serve(s.metrics_port, "api", s.metrics_host)
    serve(s, host, port)


def _redis_call(s: Settings, what: str, fn: Any) -> Any:
    import redis

    try:
        return asyncio.run(fn())
    except (redis.RedisError, OSError) as exc:
        ui.err.print(
            f"[red]Redis at {s.redis_address} did not answer[/red] while {what}: "
            f"{type(exc).__name__}: {escape(str(exc))}. Run `stormline up` or set "
            "STORMLINE_REDIS_URL."
        )
        raise typer.Exit(ExitCode.UNREACHABLE) from exc


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for")],
    role: Annotated[
        list[RoleChoice] | None, typer.Option(help="repeat for several (default: submit, read)")
    ] = None,
    name: Annotated[str, typer.Option(help="a label, e.g. who holds it")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Create a key; it is printed once (only its hash is stored)."""
    from stormline.api.keys import new_key
    from stormline.api.models import Role
    from stormline.api.store import ApiStore

    s = settings_of(ctx)
    roles = [Role(r.value) for r in (role or [RoleChoice.submit, RoleChoice.read])]
    key = new_key()

    async def create() -> Any:
        store = ApiStore(s)
        try:
            return await store.create_key(key, tenant, roles, name)
        finally:
            await store.aclose()

    info = _redis_call(s, "creating the key", create)
    if as_json:
        ui.print_json({**info.model_dump(mode="json"), "api_key": key.api_key})
        return
    ui.err.print(
        f"key {info.key_id} for tenant {escape(tenant)} "
        f"({', '.join(r.value for r in roles)}); keep it, it is not shown again:"
    )
    print(key.api_key)


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every key: id, tenant, roles, name, created, revoked (never the secret)."""
    from datetime import UTC, datetime

    from stormline.api.store import ApiStore

    s = settings_of(ctx)

    async def listing() -> Any:
        store = ApiStore(s)
        try:
            return await store.list_keys()
        finally:
            await store.aclose()

    infos = _redis_call(s, "listing keys", listing)
    if as_json:
        ui.print_json([i.model_dump(mode="json") for i in infos])
        return
    t = ui.table("API keys", "key_id", "tenant", "roles", "name", "created", "revoked")
    for i in infos:
        created = datetime.fromtimestamp(i.created_at, UTC).isoformat(timespec="seconds")
        roles = ", ".join(r.value for r in i.roles)
        t.add_row(i.key_id, escape(i.tenant), roles, escape(i.name), created, ui.yes_no(i.revoked))
    ui.console.print(t)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="from `keys list`")]
) -> None:
    """Revoke a key: every API instance refuses it from its next request. Exit 1: no such key."""
    from stormline.api.store import ApiStore

    s = settings_of(ctx)

    async def revoke() -> bool:
        store = ApiStore(s)
        try:
            return await store.revoke_key(key_id)
        finally:
            await store.aclose()

    if not _redis_call(s, "revoking the key", revoke):
        ui.err.print(f"no key {escape(repr(key_id))}")
        raise typer.Exit(ExitCode.FINDING)
    ui.err.print(f"key {escape(key_id)} revoked")


def _kafka_call(s: Settings, fn: Any, *args: Any) -> Any:
    from stormline.schemas.serde import Serde

    try:
        return fn(s, Serde.from_settings(s), *args)
    except Exception as exc:
        if not ui.unreachable(exc):
            raise
        ui.err.print(f"[red]Kafka or the registry did not answer:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.UNREACHABLE) from exc


@dead_letters_app.command("list")
def dead_letters_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="newest letters per partition")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Dead letters, newest first: letter id, reason, source, a decoded preview."""
    from stormline.api.deadletters import list_letters

    views = _kafka_call(settings_of(ctx), list_letters, limit)
    if as_json:
        ui.print_json([v.model_dump(mode="json") for v in views])
        return
    t = ui.table("dead letters", "letter", "reason", "source", "when", "error", "replayable")
    for v in views:
        src = f"{v.source_topic}[{v.source_partition}]@{v.source_offset}"
        t.add_row(
            v.letter, v.reason, src, v.occurred_at, escape(v.error[:120]), ui.yes_no(v.replayable)
        )
    ui.console.print(t)


@dead_letters_app.command("replay")
def dead_letters_replay(
    ctx: typer.Context,
    letters: Annotated[list[str], typer.Argument(help="letter ids (partition:offset)")],
    as_json: JsonFlag = False,
) -> None:
    """Re-publish letters' original records to their source topics (after the fix).

    Exit 1 if some letters were skipped (named on stderr).
    """
    import re

    from stormline.api.deadletters import replay

    bad = [x for x in letters if not re.fullmatch(r"\d+:\d+", x)]
    if bad:
        ui.err.print(f"[red]not letter ids (partition:offset):[/red] {escape(', '.join(bad))}")
        raise typer.Exit(ExitCode.USAGE)
    out = _kafka_call(settings_of(ctx), replay, letters)
    if as_json:
        ui.print_json(out)
    else:
        for skip in out["skipped"]:
            ui.err.print(f"[yellow]skipped[/yellow] {escape(skip)}")
        ui.console.print(f"replayed {out['replayed']}: {out['topics']}", highlight=False)
    if out["skipped"]:
        raise typer.Exit(ExitCode.FINDING)
