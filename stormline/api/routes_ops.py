"""Operators' and admins' endpoints: agents, checkpoints, dead letters, replay, API keys.

Agents, checkpoints and dead letters are the cluster's (the ``operate`` role is cluster-wide);
the Kafka reads are blocking client calls, run in threads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, HTTPException, Query, Request

from stormline.api.agents import AgentsOut, agent_views
from stormline.api.auth import needs
from stormline.api.deadletters import LetterView, list_letters, replay
from stormline.api.keys import new_key
from stormline.api.models import KeyCreated, KeyIn, KeyInfo, ReplayIn, ReplayOut, Role
from stormline.settings import Settings

router = APIRouter()
_OPS_TTL_S = 5.0  # operator views are read from whole topics: cache them a few seconds


async def _ops(request: Request) -> Any:
    from stormline.deploy.ops import collect

    st = request.app.state
    cached = getattr(st, "ops_cache", None)
    if cached is not None and time.monotonic() - cached[0] < _OPS_TTL_S:
        return cached[1]
    ops = await asyncio.to_thread(collect, st.settings, st.serde)
    if ops.error:
        raise HTTPException(503, ops.error)
    st.ops_cache = (time.monotonic(), ops)
    return ops


async def _router_views(settings: Settings) -> tuple[dict[str, Any], dict[str, Any], str]:
    base = f"http://{settings.router_web_host}:{settings.router_web_port}/router"
    try:
        async with httpx.AsyncClient(timeout=3.0) as client:
            q = (await client.get(f"{base}/qtable/")).raise_for_status().json()
            h = (await client.get(f"{base}/health/")).raise_for_status().json()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 503:
            return {}, {}, "the router is recovering its tables; its estimates follow shortly"
        return {}, {}, f"router web views at {base} answered {exc.response.status_code}"
    except (httpx.HTTPError, ValueError) as exc:
        return {}, {}, f"router web views at {base} not reachable ({type(exc).__name__})"
    return q, h.get("directory", {}), "ok"


@router.get("/agents", response_model=AgentsOut)
@needs(Role.OPERATE)
async def get_agents(request: Request) -> AgentsOut:
    """Capabilities, health, and per task type the router's share and mean reward."""
    ops, (qtable, directory, router_ok) = await asyncio.gather(
        _ops(request), _router_views(request.app.state.settings)
    )
    health = [
        {"agent_id": a.agent_id, "status": a.status, "reason": a.reason, "since": a.since}
        for a in ops.agents
    ]
    return AgentsOut(agents=agent_views(health, qtable, directory), router=router_ok)


@router.get("/checkpoints")
@needs(Role.OPERATE)
async def get_checkpoints(request: Request) -> dict[str, Any]:
    """The latest checkpoint of each policy (version, uri, promoted, metrics)."""
    from dataclasses import asdict

    ops = await _ops(request)
    return {"checkpoints": [asdict(c) for c in ops.checkpoints]}


@router.get("/dead-letters", response_model=list[LetterView])
@needs(Role.OPERATE)
async def get_dead_letters(
    request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[LetterView]:
    """The newest letters per partition: reason, source, decoded preview where decodable."""
    st = request.app.state
    return await asyncio.to_thread(list_letters, st.settings, st.serde, limit)


@router.post("/dead-letters/replay", response_model=ReplayOut)
@needs(Role.OPERATE)
async def post_replay(request: Request, body: ReplayIn) -> ReplayOut:
    """Re-publish the named letters' original records to their source topics."""
    st = request.app.state
    out = await asyncio.to_thread(replay, st.settings, st.serde, body.letters)
    return ReplayOut.model_validate(out)


@router.post("/keys", response_model=KeyCreated, status_code=201)
@needs(Role.ADMIN)
async def create_key(request: Request, body: KeyIn) -> KeyCreated:
    """A new API key for a tenant; the key is in this answer only (its hash is stored)."""
    key = new_key()
    info = await request.app.state.store.create_key(key, body.tenant, body.roles, body.name)
    return KeyCreated(**info.model_dump(), api_key=key.api_key)


@router.get("/keys", response_model=list[KeyInfo])
@needs(Role.ADMIN)
async def get_keys(request: Request) -> list[KeyInfo]:
    keys: list[KeyInfo] = await request.app.state.store.list_keys()
    return keys


@router.delete("/keys/{key_id}", status_code=204)
@needs(Role.ADMIN)
async def revoke_key(request: Request, key_id: str) -> None:
    if not await request.app.state.store.revoke_key(key_id):
        raise HTTPException(404, f"no key {key_id!r}")
