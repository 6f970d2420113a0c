"""The FastAPI app: wiring, body limits, error shapes, health, and ``serve`` for the CLI.

Errors are JSON and say what is wrong: 4xx for the caller's mistakes (422 carries pydantic's
error list), 413 for a body over ``STORMLINE_API_MAX_BODY_BYTES``, 503 with Retry-After when
Kafka or Redis does not answer. ``/healthz`` is the process, ``/readyz`` its dependencies;
both, ``/docs`` and ``/openapi.json`` are open; everything under ``/v1`` needs a credential
and a role (``stormline.api.auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stormline.api import routes_analytics, routes_ops, routes_tasks
from stormline.api.auth import guard
from stormline.api.console import routes as console
from stormline.api.events import StatusHub
from stormline.api.publisher import BatchPublisher
from stormline.api.store import ApiStore
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import TaskSubmitted
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import RedisState

log = logging.getLogger("stormline.api")


JSON = b"application/json"


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed, before it is parsed;
    415 for a body that is not JSON."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = declared not in (None, b"0") or b"transfer-encoding" in headers
        if has_body and kind != JSON:
            # Without this FastAPI reads the body as a string and answers with a puzzle.
            body = {"detail": "send the body as JSON, with Content-Type: application/json"}
            return await JSONResponse(body, status_code=415)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {"detail": f"request body over {self.limit} bytes (STORMLINE_API_MAX_BODY_BYTES)"}
        await JSONResponse(body, status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    st = app.state
    settings: Settings = st.settings
    st.serde = Serde.from_settings(settings)
    st.producer = EventProducer(settings, st.serde)
    st.publisher = BatchPublisher(settings, st.producer)
    st.store = ApiStore(settings)
    st.state = RedisState(settings)
    st.log = log
    # Its own connection, without a socket timeout: a subscription is idle for long spells.
    listener = aioredis.Redis.from_url(settings.redis_address, socket_connect_timeout=2.0)
    st.hub = StatusHub(settings, listener, _on_final(st.store))
    hub_task = asyncio.create_task(st.hub.run())
    with contextlib.suppress(Exception):  # fail later, per request, if the registry is down
        await asyncio.to_thread(st.serde.register, TASKS.name(settings), TaskSubmitted)
    try:
        yield
    finally:
        hub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hub_task
        await asyncio.to_thread(st.producer.close, 10)
        await st.state.aclose()
        await st.store.aclose()
        await listener.aclose()


def _on_final(store: ApiStore) -> Any:
    async def finished(task_ids: list[str]) -> None:
        pipe = store.r.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hget(store.task_key(tid), "tenant")
        tenants = await pipe.execute()
        for tid, tenant in zip(task_ids, tenants, strict=True):
            t = tenant.decode() if isinstance(tenant, bytes) else tenant
            await store.finished(t or routes_tasks.DEFAULT_TENANT, tid)

    return finished


async def _mark_submitted(settings: Settings, ids: list[str]) -> None:
    """Status ``submitted`` for acknowledged tasks, best effort (the record is on Kafka)."""
    from stormline.state import mark_submitted

    try:
        await asyncio.to_thread(mark_submitted, settings, ids)
    except (redis.RedisError, OSError) as exc:
        log.warning("task status not recorded in Redis: %s", exc)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Stormline",
        version="1",
        summary="Submit tasks to LLM agents, await results, feed back rewards, operate.",
        lifespan=_lifespan,
    )
    app.state.settings = settings

    async def mark(ids: list[str]) -> None:
        await _mark_submitted(settings, ids)

    app.state.mark_submitted = mark
    v1 = [Depends(guard)]
    app.include_router(routes_tasks.router, prefix="/v1", dependencies=v1, tags=["tasks"])
    app.include_router(routes_ops.router, prefix="/v1", dependencies=v1, tags=["operate"])
    app.include_router(routes_analytics.router, prefix="/v1", dependencies=v1, tags=["analytics"])
    console.include(app, v1)  # the operators' console: /console/ and /console/api/
    app.add_api_route("/healthz", _healthz, methods=["GET"], tags=["health"])
    app.add_api_route("/readyz", _readyz, methods=["GET"], tags=["health"])
    app.add_exception_handler(redis.RedisError, _unavailable)
    app.add_exception_handler(ConnectionError, _unavailable)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    return app


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(
        {"detail": f"a dependency did not answer ({type(exc).__name__}); try again"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _healthz() -> dict[str, Any]:
    return {"ok": True}


async def _readyz(request: Request) -> JSONResponse:
    """Kafka, the schema registry and Redis, each reachable or why not."""
    import httpx

    from stormline.runtime.admin import admin_client

    settings: Settings = request.app.state.settings
    checks: dict[str, str] = {}

    def kafka() -> None:
        admin_client(settings).list_topics(timeout=3)

    async def check(name: str, probe: Any) -> None:
        try:
            await probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {str(exc)[:200]}"

    async def registry() -> None:
        async with httpx.AsyncClient(timeout=3) as c:
            (await c.get(f"{settings.registry_url.rstrip('/')}/subjects")).raise_for_status()

    await asyncio.gather(
        check("kafka", lambda: asyncio.to_thread(kafka)),
        check("registry", registry),
        check("redis", request.app.state.store.ping),
    )
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API under uvicorn until SIGTERM/SIGINT (graceful: in-flight requests finish)."""
    import uvicorn

    app = create_app(settings)
    # Everything imported and built so far lives as long as the process: moved out of the
    # collector's reach, a full collection no longer walks it, which was the API's latency
    # tail (gen-2 passes of up to ~0.5 s on a loaded machine, 2 s in all over a 10 s bench).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep stormline.logs' JSON handler: uvicorn's own config replaces it
        access_log=False,
        timeout_graceful_shutdown=10,
    )
