"""``/v1/tasks`` and ``/v1/rewards``: submit, read, stream, cancel, list, feed back.

A tenant sees only its own tasks: a task whose status names another tenant is answered 404,
exactly like an unknown one. The tenant of a submitted task is the caller's, never the body's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from stormline.api.auth import needs, principal
from stormline.api.events import status_events
from stormline.api.keys import Principal
from stormline.api.models import (
    FINAL_STATES,
    RewardIn,
    RewardOut,
    Role,
    Submission,
    Submitted,
    TaskBatch,
    TaskIn,
    TaskPage,
    TaskState,
    TaskStatus,
)
from stormline.api.publisher import PartialDelivery
from stormline.api.quotas import quota_for, refusal, too_large
from stormline.producers.publish import InvalidTask, to_task
from stormline.schemas.kafka import DeliveryError
from stormline.schemas.models import TaskSubmitted

router = APIRouter()
Caller = Annotated[Principal, Depends(principal)]
DEFAULT_TENANT = "default"  # TaskSubmitted's own default: tasks published without the API


def _invalid(loc: list[str | int], msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ["body", *loc], "msg": msg}])


def _events(body: TaskIn | TaskBatch, tenant: str, max_bytes: int) -> list[TaskSubmitted]:
    items = [body] if isinstance(body, TaskIn) else body.tasks
    batch = isinstance(body, TaskBatch)
    out, seen = [], set()
    for i, item in enumerate(items):
        data = item.model_dump()
        data["task_id"] = data["task_id"] or str(uuid.uuid4())
        loc: list[str | int] = ["tasks", i] if batch else []
        if data["task_id"] in seen:
            raise _invalid([*loc, "task_id"], f"task_id {data['task_id']!r} appears twice")
        seen.add(data["task_id"])
        try:
            out.append(to_task({**data, "tenant": tenant}, max_bytes))
        except InvalidTask as exc:
            raise _invalid(loc, str(exc)) from exc
    return out


@router.post("/tasks", response_model=Submitted, status_code=202)
@needs(Role.SUBMIT)
async def submit_tasks(request: Request, response: Response, body: Submission, who: Caller) -> Any:
    """Submit one task or ``{"tasks": [...]}``; answered once Kafka holds every one of them.

    All or nothing: a bad task, a task id owned by another tenant, or a quota refuses the
    whole request before anything is published (422, 409, 429 with Retry-After).
    """
    st = request.app.state
    n = 1 if isinstance(body, TaskIn) else len(body.tasks)
    if n > st.settings.api_max_batch:
        limit = st.settings.api_max_batch
        raise _invalid(["tasks"], f"at most {limit} tasks per request", "too_long")
    tasks = _events(body, who.tenant, st.settings.max_record_bytes)
    quota = quota_for(st.settings, who.tenant)
    if (big := too_large(quota, n)) is not None:
        raise _invalid(["tasks"], big.detail, "too_long")
    t0 = time.perf_counter()
    adm = await st.store.admit(who.tenant, quota, [(t.task_id, t.task_type) for t in tasks])
    if adm.kind == "conflict":
        raise HTTPException(409, f"task ids already used by another tenant: {list(adm.conflicts)}")
    if not adm.ok:
        no = refusal(adm.kind, adm.wait_s, quota, n)
        return JSONResponse(
            {"detail": no.detail, "reason": no.reason, "retry_after_s": round(no.retry_after_s, 3)},
            status_code=429,
            headers={"Retry-After": no.retry_after_header},
        )
    ids = [t.task_id for t in tasks]
    t1 = time.perf_counter()
    try:
        await st.publisher.publish(tasks)
    except DeliveryError as exc:
        delivered = exc.delivered if isinstance(exc, PartialDelivery) else []
        await st.store.release(who.tenant, [i for i in ids if i not in set(delivered)])
        return JSONResponse(
            {
                "detail": f"Kafka did not acknowledge the tasks ({exc}); send the same request "
                "again: task ids make a resubmission harmless",
                "task_ids": ids,
                "acknowledged": delivered,
            },
            status_code=503,
            headers={"Retry-After": "1"},
        )
    t2 = time.perf_counter()
    await st.mark_submitted(ids)
    # Where the time went (the bench reads it): quota and ids in Redis, Kafka's acks, status.
    response.headers["Server-Timing"] = ", ".join(
        f"{name};dur={ms * 1000:.1f}"
        for name, ms in (
            ("admit", t1 - t0),
            ("kafka", t2 - t1),
            ("status", time.perf_counter() - t2),
        )
    )
    return Submitted(task_ids=ids)


async def _owned(request: Request, who: Principal, task_id: str) -> TaskStatus:
    rec = await request.app.state.store.status(task_id)
    if rec is None or "state" not in rec or rec.get("tenant", DEFAULT_TENANT) != who.tenant:
        raise HTTPException(404, f"no task {task_id!r} (unknown, expired, or not this tenant's)")
    return to_status(task_id, rec)


def to_status(task_id: str, rec: dict[str, str]) -> TaskStatus:
    fields = {k: v for k, v in rec.items() if k not in {"tenant", "hash"} and v != ""}
    return TaskStatus.model_validate({**fields, "task_id": task_id})


@router.get("/tasks/{task_id}", response_model=TaskStatus)
@needs(Role.READ)
async def get_task(request: Request, task_id: str, who: Caller) -> TaskStatus:
    """Status, attempt, agent, output or error, reward."""
    return await _owned(request, who, task_id)


@router.get(
    "/tasks/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
@needs(Role.READ)
async def task_events(
    request: Request,
    task_id: str,
    who: Caller,
    timeout: Annotated[float | None, Query(gt=0, le=86_400, description="seconds")] = None,
) -> StreamingResponse:
    """Server-Sent Events: ``status`` per change, then one ``final`` with the whole status
    (or one ``timeout`` event once ``timeout`` seconds passed without a final state)."""
    await _owned(request, who, task_id)

    async def read() -> TaskStatus | None:
        rec = await request.app.state.store.status(task_id)
        return to_status(task_id, rec) if rec and "state" in rec else None

    return StreamingResponse(
        status_events(request.app.state.hub, task_id, read, timeout_s=timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_CANCEL_TRIES = 5  # each refusal means the task moved on; it is final after a few moves


@router.post("/tasks/{task_id}/cancel", response_model=TaskStatus)
@needs(Role.SUBMIT)
async def cancel_task(request: Request, task_id: str, who: Caller) -> TaskStatus:
    """Mark the task ``cancelled`` (through the guarded status); again: the same answer;
    409 once it succeeded or failed."""
    st = request.app.state
    now = await _owned(request, who, task_id)
    # The router may move the task (submitted/0 -> waiting/1) between our read and our write,
    # which the guarded write refuses as stale: read again and retry at the newer attempt.
    for _ in range(_CANCEL_TRIES):
        if now.state in FINAL_STATES:
            break
        applied = await st.state.apply_status(task_id, TaskState.CANCELLED.value, now.attempt)
        if applied is None:
            raise HTTPException(503, "the task status store did not answer; cancel again")
        now = await _owned(request, who, task_id)
    if now.state is not TaskState.CANCELLED:
        raise HTTPException(409, f"task {task_id!r} is {now.state.value}: too late to cancel")
    await st.store.finished(who.tenant, task_id)
    return now


@router.get("/tasks", response_model=TaskPage)
@needs(Role.READ)
async def list_tasks(
    request: Request,
    who: Caller,
    status: TaskState | None = None,
    type: Annotated[str | None, Query(max_length=256)] = None,
    since: Annotated[str | None, Query(description="30m, 6h, 7d or an ISO time")] = None,
    cursor: Annotated[str | None, Query(pattern=r"^\d+(\.\d+)?:\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    """The tenant's tasks, oldest first, filtered; pass ``next_cursor`` back for the next
    page (a filtered page may hold fewer than ``limit`` tasks)."""
    if cursor is not None:
        start, offset = float(cursor.split(":")[0]), int(cursor.split(":")[1])
    else:
        start, offset = _since(since), 0
    rows, more = await request.app.state.store.page(who.tenant, start, offset, limit)
    tasks = [to_status(tid, rec) for tid, rec in rows if "state" in rec]
    tasks = [
        t
        for t in tasks
        if (status is None or t.state is status) and (type is None or t.task_type == type)
    ]
    return TaskPage(tasks=tasks, next_cursor=f"{start}:{offset + limit}" if more else None)


def _since(value: str | None) -> float:
    from stormline.consumers.sink.analytics import AnalyticsError, parse_since

    try:
        return parse_since(value).timestamp()
    except AnalyticsError as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ["query", "since"], "msg": str(exc)}]
        ) from exc


@router.post("/rewards", response_model=RewardOut, status_code=201)
@needs(Role.SUBMIT)
async def post_reward(request: Request, body: RewardIn, who: Caller) -> RewardOut:
    """Human feedback on one of the tenant's tasks, as a Reward event (source human)."""
    from stormline.producers.feedback import FeedbackError, record_reward

    await _owned(request, who, body.task_id)
    settings = request.app.state.settings
    started = time.monotonic()
    try:
        rw = await asyncio.to_thread(
            record_reward,
            settings,
            body.task_id,
            body.value,
            source="human",
            trajectory_id=body.trajectory_id,
            agent_id=body.agent_id,
            reason=body.reason,
            lookup_timeout=10.0,
        )
    except FeedbackError as exc:
        raise HTTPException(409, str(exc)) from exc
    request.app.state.log.info("reward for %s in %.3fs", body.task_id, time.monotonic() - started)
    return RewardOut(
        task_id=rw.task_id,
        trajectory_id=rw.trajectory_id,
        agent_id=rw.agent_id,
        attempt=rw.attempt,
        value=rw.value,
        source=rw.source.value,
        event_id=str(rw.event_id),
    )
