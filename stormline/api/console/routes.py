"""The console: its static pages at ``/console/`` and its JSON at ``/console/api/``.

Every JSON endpoint names its role (``needs``) and runs behind the API's guard, so the
console denies by default exactly like ``/v1``: ``operate`` for the cluster's pages
(overview, agents, topics, learning), ``read`` for a tenant's own tasks. The pages also call
``/v1`` itself (agents, dead letters and their replay, a task's status). ``whoami`` tells the
login form which roles a key has. The static files are public: they hold no data.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles

from stormline.api import routes_ops
from stormline.api.agents import agent_views
from stormline.api.auth import authenticate, needs, principal
from stormline.api.console import live, queries
from stormline.api.console.estimates import circuit, estimates
from stormline.api.keys import Principal
from stormline.api.models import Role
from stormline.api.routes_analytics import _store
from stormline.api.routes_tasks import _owned
from stormline.consumers.sink import analytics as an

STATIC = Path(__file__).with_name("static")
router = APIRouter()
open_router = APIRouter()
Caller = Annotated[Principal, Depends(principal)]
Since = Annotated[str, Query(description="30m, 6h, 7d or an ISO time")]
Bucket = Annotated[int, Query(ge=1, le=86_400, description="seconds")]


def include(app: FastAPI, guarded: list[Any]) -> None:
    """Mount the console on ``app``: JSON routes first (so the static mount does not shadow
    them), ``guarded`` being the ``/v1`` dependencies (the guard)."""
    app.include_router(open_router, prefix="/console/api", tags=["console"])
    app.include_router(router, prefix="/console/api", dependencies=guarded, tags=["console"])
    app.mount("/console", StaticFiles(directory=STATIC, html=True), name="console")


def _since(value: str) -> Any:
    try:
        return an.parse_since(value)
    except an.AnalyticsError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ["query", "since"], "msg": str(exc)}]
        ) from exc


async def _query(request: Request, fn: Any, *args: Any, **kw: Any) -> tuple[Any, str]:
    """A store query in a thread: (rows, "ok"), or (None, why) when the store failed, so a
    page still shows what Kafka said while the analytics store is down or empty."""
    try:
        store = _store(request)
        return await asyncio.to_thread(fn, store, *args, **kw), "ok"
    except Exception as exc:
        return None, f"analytics store: {type(exc).__name__}: {str(exc)[:300]}"


def _sampler(request: Request) -> live.Sampler:
    st = request.app.state
    if getattr(st, "console_sampler", None) is None:
        st.console_sampler = live.Sampler(st.settings)
    s: live.Sampler = st.console_sampler
    return s


async def _sample(request: Request) -> live.Sample:
    try:
        return await asyncio.to_thread(_sampler(request).sample)
    except Exception as exc:
        raise HTTPException(503, f"Kafka did not answer: {type(exc).__name__}: {exc}") from exc


@open_router.get("/whoami")
async def whoami(request: Request) -> dict[str, Any]:
    """The caller's tenant and roles (any valid key; nothing else is told)."""
    st = request.app.state
    who = await authenticate(request, st.settings, st.store)
    return {"tenant": who.tenant, "roles": sorted(r.value for r in who.roles)}


@router.get("/overview")
@needs(Role.OPERATE)
async def overview(request: Request, since: Since = "15m", bucket: Bucket = 10) -> dict[str, Any]:
    """Rates from Kafka's offsets (sampled), lag per group, outcomes and rewards per bucket."""
    s = request.app.state.settings
    sample = await _sample(request)
    history = _sampler(request).history()
    now_rates, series = live.rates(history)
    names = {spec.logical: spec.name(s) for spec in live.CATALOG}
    start = _since(since)
    outcomes, why = await _query(request, queries.rows, queries.OUTCOMES, start, bucket)
    rewards, _ = await _query(request, queries.rows, queries.REWARDS, start, bucket)
    return {
        "at": sample.t,
        "topics": names,
        "totals": {k: live.totals(sample).get(v, 0) for k, v in names.items()},
        "rates": {k: now_rates.get(v) for k, v in names.items()},
        "rate_series": [
            [t, {k: r.get(v, 0.0) for k, v in names.items()}] for t, r in series[-300:]
        ],
        "lag": live.group_totals(sample.lag),
        "lag_series": [[h.t, live.group_totals(h.lag)] for h in history[-300:]],
        "lag_detail": [g for g in sample.lag if g["lag"] > 0],
        "outcomes": outcomes or [],
        "rewards": rewards or [],
        "store": why,
        "bucket_s": bucket,
        "since": since,
        "prefix": s.topic_prefix,
    }


@router.get("/agents")
@needs(Role.OPERATE)
async def agents(request: Request, since: Since = "15m", bucket: Bucket = 10) -> dict[str, Any]:
    """/v1/agents' view plus circuit state, cost and latency, the router's estimates with
    their uncertainty, and each agent's share of its task types over time."""
    st = request.app.state
    ops, (qtable, directory, router_ok) = await asyncio.gather(
        routes_ops._ops(request), routes_ops._router_views(st.settings)
    )
    health = [asdict(a) for a in ops.agents]
    views = agent_views(health, qtable, directory)
    start = _since(since)
    per_agent, why = await _query(request, queries.rows, an.PER_AGENT, start)
    share, _ = await _query(request, queries.rows, queries.SHARE, start, bucket)
    stats = {r["agent_id"]: r for r in per_agent or []}
    now, cooldown = time.time(), st.settings.router_circuit_cooldown_s
    by_id = {a["agent_id"]: a for a in health}
    out = []
    for v in views:
        h = by_id.get(v.agent_id, {})
        since_t = _epoch(h.get("since"))
        out.append(
            {
                **v.model_dump(),
                "circuit": circuit(v.health, h.get("previous", ""), since_t, cooldown, now),
                "stats": stats.get(v.agent_id),
            }
        )
    return {
        "agents": out,
        "estimates": [e.model_dump() for e in estimates(qtable)],
        "share": queries.share_series(share or []),
        "router": router_ok,
        "store": why,
    }


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


@router.get("/tasks")
@needs(Role.READ)
async def recent_tasks(
    request: Request, who: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> dict[str, Any]:
    """The tenant's newest tasks in the analytics store, with their status from Redis."""
    found, why = await _query(request, queries.recent_tasks, who.tenant, limit)
    store = request.app.state.store
    out = []
    for r in found or []:
        rec = await store.status(r["task_id"]) or {}
        out.append({**r, "state": rec.get("state"), "agent_id": rec.get("agent_id")})
    return {"tasks": out, "store": why}


@router.get("/tasks/{task_id}")
@needs(Role.READ)
async def task_timeline(request: Request, task_id: str, who: Caller) -> dict[str, Any]:
    """A task's status (Redis) and its events in order (the analytics store), with each
    event's time since submission."""
    status = await _owned(request, who, task_id)
    events, why = await _query(request, queries.timeline, task_id, who.tenant)
    return {"status": status.model_dump(mode="json"), "events": events or [], "store": why}


@router.get("/topics")
@needs(Role.OPERATE)
async def topics(request: Request) -> dict[str, Any]:
    s = request.app.state.settings
    sample = await _sample(request)
    cat = live.catalog_of(s)
    return {
        "prefix": s.topic_prefix,
        "topics": [
            {
                "name": t,
                "partitions": len(ends),
                "messages": sum(ends) - sum(sample.lows[t]),
                "end_offsets": ends,
                "event": cat[t].event.__name__ if t in cat else None,
                "doc": cat[t].doc if t in cat else "",
            }
            for t, ends in sample.ends.items()
        ],
    }


@router.get("/topics/{topic}/messages")
@needs(Role.OPERATE)
async def messages(
    request: Request,
    topic: str,
    partition: Annotated[int | None, Query(ge=0)] = None,
    offset: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=live.MAX_MESSAGES)] = 50,
) -> dict[str, Any]:
    """Messages of one of this deployment's topics: the newest, or from ``offset``."""
    st = request.app.state
    sample = await _sample(request)
    if topic not in sample.ends:
        raise HTTPException(404, f"no topic {topic!r} under prefix {st.settings.topic_prefix!r}")
    if partition is not None and partition >= len(sample.ends[topic]):
        raise HTTPException(404, f"{topic} has {len(sample.ends[topic])} partitions")
    rows = await asyncio.to_thread(
        live.browse, st.settings, st.serde, topic, sample, partition, offset, limit
    )
    return {"topic": topic, "messages": rows}


@router.get("/learning")
@needs(Role.OPERATE)
async def learning(request: Request, since: Since = "6h", bucket: Bucket = 30) -> dict[str, Any]:
    """Reward and cumulative regret against a random baseline, checkpoints, A/B by policy."""
    start = _since(since)
    regret, why = await _query(request, queries.rows, queries.REGRET, start, bucket)
    ab, _ = await _query(request, queries.rows, queries.AB, start, bucket)
    cps, _ = await _query(request, queries.rows, queries.CHECKPOINTS)
    arms, _ = await _query(request, queries.rows, an.REWARD_OVER_TIME, start, bucket)
    return {
        "regret": queries.cumulative_regret(regret or []),
        "ab": queries.ab_rows(ab or []),
        "reward_over_time": arms or [],
        "checkpoints": queries.checkpoint_rows(cps or []),
        "store": why,
    }
