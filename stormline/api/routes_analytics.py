"""``GET /v1/analytics/{name}``: the sink's canned queries over the caller's tenant only.

The queries are ``stormline.consumers.sink.analytics``'s (``stormline analytics``), run with
``tenant=`` the caller's, so every figure is the one of that tenant's tasks. The store (chDB
over the sink's Parquet parts, or a ClickHouse server) is opened on first use and its
blocking queries run in a thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from stormline.api.auth import needs, principal
from stormline.api.keys import Principal
from stormline.api.models import Role

router = APIRouter()


def _store(request: Request) -> Any:
    from stormline.consumers.sink.store import open_store

    st = request.app.state
    if getattr(st, "analytics_store", None) is None:
        st.analytics_store = open_store(st.settings)
    return st.analytics_store


@router.get("/analytics/{name}")
@needs(Role.READ)
async def get_analytics(
    request: Request,
    name: str,
    who: Annotated[Principal, Depends(principal)],
    since: Annotated[str | None, Query(description="30m, 6h, 7d or an ISO time")] = None,
    bucket: Annotated[int, Query(ge=1, le=86_400, description="seconds")] = 60,
) -> list[dict[str, Any]]:
    """Rows of canned query ``name`` (per_agent, reward_over_time, regret, tasks_by_status,
    dead_letters, throughput) over this tenant's tasks."""
    from stormline.consumers.sink import analytics as an
    from stormline.consumers.sink.store import StoreError

    if name not in an.CANNED:
        raise HTTPException(404, f"no canned query {name!r}; choose one of: {', '.join(an.CANNED)}")
    try:
        start = an.parse_since(since)
    except an.AnalyticsError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ["query", "since"], "msg": str(exc)}]
        ) from exc
    store = _store(request)
    try:
        res = await asyncio.to_thread(
            an.run_canned, store, name, since=start, bucket_seconds=bucket, tenant=who.tenant
        )
    except StoreError as exc:
        raise HTTPException(503, f"the analytics store did not answer: {exc}") from exc
    rows: list[dict[str, Any]] = json.loads(an.to_json(res))
    return rows
