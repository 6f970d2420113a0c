"""The Python client of Stormline's HTTP API (``stormline api``), sync and async, on httpx.

    from stormline.client import Client

    with Client("http://127.0.0.1:8000", api_key="stl_...") as sl:
        task_id = sl.submit(task_type="math", prompt="What is 6 * 7?", expected="42")
        status = sl.result(task_id, timeout=120)      # through Server-Sent Events
        print(status.state, status.output)
        sl.reward(task_id, 1.0, reason="right answer")

The key defaults to ``STORMLINE_API_KEY`` and the URL to ``STORMLINE_API_URL``. Task ids are
chosen here, before sending, so a batch refused with 429 (quota) or 503 (Kafka) is sent again
unchanged: the same ids make the second try harmless. Bodies and answers are the server's own
pydantic models (``stormline.api.models``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

from stormline.api.models import RewardIn, RewardOut, StatusEvent, TaskIn, TaskPage, TaskStatus

__all__ = ["AsyncClient", "Client", "QuotaExceeded", "StormlineError"]
DEFAULT_URL = "http://127.0.0.1:8000"
RETRIED = {429, 503}  # a refusal that changed nothing: the same request may be sent again


class StormlineError(Exception):
    """An answer that is not a success; ``detail`` is the server's explanation."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.retry_after = status, detail, retry_after


class QuotaExceeded(StormlineError):
    pass


def _check(resp: httpx.Response) -> Any:
    if resp.is_success:
        return resp.json() if resp.content else None
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    ra = resp.headers.get("retry-after")
    retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
    cls = QuotaExceeded if resp.status_code == 429 else StormlineError
    raise cls(resp.status_code, detail, retry_after)


def _task(task: TaskIn | dict[str, Any] | None, fields: dict[str, Any]) -> TaskIn:
    t = task if isinstance(task, TaskIn) else TaskIn.model_validate({**(task or {}), **fields})
    return t if t.task_id else t.model_copy(update={"task_id": str(uuid.uuid4())})


def _body(tasks: list[TaskIn]) -> dict[str, Any]:
    return {"tasks": [t.model_dump(exclude_none=True) for t in tasks]}


class SseParser:
    """Status events from an SSE stream, line by line (comments and keep-alives skipped)."""

    def __init__(self) -> None:
        self.event, self.data = "message", list[str]()

    def feed(self, line: str) -> StatusEvent | None:
        if line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        elif line.startswith("event:"):
            self.event = line[6:].strip()
        elif line == "":
            event, text = self.event, "\n".join(self.data)
            self.event, self.data = "message", []
            # "timeout" (the caller's deadline) carries no status; the stream ends after it.
            if text and event in ("status", "final", "message"):
                return StatusEvent.model_validate(json.loads(text))
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[StatusEvent]:
    parser = SseParser()
    for line in lines:
        if (ev := parser.feed(line)) is not None:
            yield ev


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("STORMLINE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _stream_timeout(
    connect: float | None, timeout: float | None
) -> tuple[httpx.Timeout, dict[str, float]]:
    # The server ends the stream at the deadline; the read timeout only guards a dead server
    # (keep-alives come every 15 s).
    if timeout is None:
        return httpx.Timeout(connect, read=None), {}
    return httpx.Timeout(connect, read=min(timeout, 15.0) + 15.0), {"timeout": timeout}


def _final_or_timeout(status: TaskStatus, timeout: float | None) -> TaskStatus:
    if not status.final:
        raise TimeoutError(f"task {status.task_id} not final within {timeout}s ({status.state})")
    return status


def _chunks(tasks: list[TaskIn], size: int) -> Iterator[list[TaskIn]]:
    for i in range(0, len(tasks), size):
        yield tasks[i : i + size]


class Client:
    """Blocking client; one connection pool, closed by ``close()`` or ``with``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
    ) -> None:
        url = base_url or os.environ.get("STORMLINE_API_URL", DEFAULT_URL)
        self.http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)
        self.max_retries = max_retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post_tasks(self, tasks: list[TaskIn]) -> list[str]:
        for attempt in range(self.max_retries + 1):
            resp = self.http.post("/v1/tasks", json=_body(tasks))
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                ids: list[str] = _check(resp)["task_ids"]
                return ids
            time.sleep(float(resp.headers.get("retry-after", "1")))
        raise AssertionError("unreachable")

    def submit(self, task: TaskIn | dict[str, Any] | None = None, **fields: Any) -> str:
        """Submit one task (a TaskIn, a dict, or its fields); returns its id once on Kafka."""
        return self._post_tasks([_task(task, fields)])[0]

    def submit_many(self, tasks: Iterable[TaskIn | dict[str, Any]], batch: int = 500) -> list[str]:
        """Submit tasks in batches; waits out 429 (Retry-After) and resends the same batch."""
        items = [_task(t, {}) for t in tasks]
        return [i for chunk in _chunks(items, batch) for i in self._post_tasks(chunk)]

    def status(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(_check(self.http.get(f"/v1/tasks/{task_id}")))

    def stream(self, task_id: str, timeout: float | None = None) -> Iterator[StatusEvent]:
        """The task's status events as they happen, ending with the final one (or after
        ``timeout`` seconds: the server then ends the stream without one)."""
        t, params = _stream_timeout(self.http.timeout.connect, timeout)
        url = f"/v1/tasks/{task_id}/events"
        with self.http.stream("GET", url, params=params, timeout=t) as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            yield from parse_sse(resp.iter_lines())

    def result(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """Block until the task is final; its whole status. TimeoutError after ``timeout``."""
        try:
            for ev in self.stream(task_id, timeout=timeout):
                if ev.status is not None:
                    return ev.status
        except httpx.ReadTimeout as exc:
            raise TimeoutError(f"task {task_id} not final within {timeout}s") from exc
        return _final_or_timeout(self.status(task_id), timeout)

    def cancel(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(_check(self.http.post(f"/v1/tasks/{task_id}/cancel")))

    def reward(self, task_id: str, value: float, **kw: Any) -> RewardOut:
        """Human feedback (0..1) on the task's latest trajectory (or ``trajectory_id=``)."""
        body = RewardIn(task_id=task_id, value=value, **kw).model_dump(exclude_none=True)
        return RewardOut.model_validate(_check(self.http.post("/v1/rewards", json=body)))

    def tasks(self, **filters: Any) -> Iterator[TaskStatus]:
        """Every task of the tenant matching ``status=``, ``type=``, ``since=``, page by page."""
        params = {k: v for k, v in filters.items() if v is not None}
        while True:
            page = TaskPage.model_validate(_check(self.http.get("/v1/tasks", params=params)))
            yield from page.tasks
            if page.next_cursor is None:
                return
            params["cursor"] = page.next_cursor


class AsyncClient:
    """The same calls, awaitable."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
    ) -> None:
        url = base_url or os.environ.get("STORMLINE_API_URL", DEFAULT_URL)
        self.http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)
        self.max_retries = max_retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post_tasks(self, tasks: list[TaskIn]) -> list[str]:
        for attempt in range(self.max_retries + 1):
            resp = await self.http.post("/v1/tasks", json=_body(tasks))
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                ids: list[str] = _check(resp)["task_ids"]
                return ids
            await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
        raise AssertionError("unreachable")

    async def submit(self, task: TaskIn | dict[str, Any] | None = None, **fields: Any) -> str:
        return (await self._post_tasks([_task(task, fields)]))[0]

    async def submit_many(
        self, tasks: Iterable[TaskIn | dict[str, Any]], batch: int = 500
    ) -> list[str]:
        items = [_task(t, {}) for t in tasks]
        out: list[str] = []
        for chunk in _chunks(items, batch):
            out += await self._post_tasks(chunk)
        return out

    async def status(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(_check(await self.http.get(f"/v1/tasks/{task_id}")))

    async def stream(
        self, task_id: str, timeout: float | None = None
    ) -> AsyncIterator[StatusEvent]:
        t, params = _stream_timeout(self.http.timeout.connect, timeout)
        url = f"/v1/tasks/{task_id}/events"
        async with self.http.stream("GET", url, params=params, timeout=t) as resp:
            if not resp.is_success:
                await resp.aread()
                _check(resp)
            parser = SseParser()
            async for line in resp.aiter_lines():
                if (ev := parser.feed(line)) is not None:
                    yield ev

    async def result(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        try:
            async for ev in self.stream(task_id, timeout=timeout):
                if ev.status is not None:
                    return ev.status
        except httpx.ReadTimeout as exc:
            raise TimeoutError(f"task {task_id} not final within {timeout}s") from exc
        return _final_or_timeout(await self.status(task_id), timeout)

    async def cancel(self, task_id: str) -> TaskStatus:
        resp = await self.http.post(f"/v1/tasks/{task_id}/cancel")
        return TaskStatus.model_validate(_check(resp))

    async def reward(self, task_id: str, value: float, **kw: Any) -> RewardOut:
        body = RewardIn(task_id=task_id, value=value, **kw).model_dump(exclude_none=True)
        return RewardOut.model_validate(_check(await self.http.post("/v1/rewards", json=body)))
