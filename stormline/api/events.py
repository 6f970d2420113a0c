"""Status changes as they happen: one Redis subscription per API process, fanned out.

``stormline.state.set_status`` PUBLISHes ``{"task_id","state","attempt"}`` on
``<key_prefix>task-status`` for every change it applies. :class:`StatusHub` holds the one
subscription and hands each message to the watchers of that task (the SSE streams); a final
state also takes the task out of its tenant's in-flight set. After a (re)subscription every
watcher is told to re-read its task's status once, since messages sent while the
subscription was down are not replayed by Redis; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import redis
import redis.asyncio as aioredis

from stormline.api.models import FINAL_STATES, StatusEvent, TaskState, TaskStatus
from stormline.settings import Settings
from stormline.state import status_channel

log = logging.getLogger("stormline.api.events")

# None in a watcher's queue means "re-read the status": a message may have been missed.
Item = StatusEvent | None


def parse_message(data: bytes | str) -> StatusEvent | None:
    """A channel message as an event; None for one that is not ours (logged)."""
    try:
        d = json.loads(data)
        return StatusEvent(task_id=d["task_id"], state=TaskState(d["state"]), attempt=d["attempt"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignored a task-status message that is not one: %s", exc)
        return None


def sse(event: str, data: str) -> bytes:
    """One Server-Sent Event (``data`` is one line of JSON)."""
    return f"event: {event}\ndata: {data}\n\n".encode()


class StatusHub:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        on_final: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.r = client
        self.on_final = on_final
        self.watchers: dict[str, set[asyncio.Queue[Item]]] = defaultdict(set)
        self.subscribed = asyncio.Event()
        self._finals: list[str] = []

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Queue[Item]]:
        """A queue of the task's status events while the block runs (register before you
        read the current status, so that no change falls between the two)."""
        q: asyncio.Queue[Item] = asyncio.Queue()
        self.watchers[task_id].add(q)
        try:
            yield q
        finally:
            qs = self.watchers.get(task_id)
            if qs is not None:
                qs.discard(q)
                if not qs:
                    del self.watchers[task_id]

    def dispatch(self, ev: StatusEvent) -> None:
        for q in self.watchers.get(ev.task_id, ()):
            q.put_nowait(ev)
        if ev.state in FINAL_STATES:
            self._finals.append(ev.task_id)

    async def run(self) -> None:
        """Subscribe and dispatch until cancelled; reconnects when Redis goes away."""
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(status_channel(self.settings))
                self.subscribed.set()
                for qs in list(self.watchers.values()):
                    for q in qs:
                        q.put_nowait(None)
                await self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("task-status subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is not None and msg.get("type") == "message":
                ev = parse_message(msg["data"])
                if ev is not None:
                    self.dispatch(ev)
            if self._finals and (msg is None or len(self._finals) >= 500):
                done, self._finals = self._finals, []
                await self.on_final(done)


_RANK = {
    TaskState.SUBMITTED: 0,
    TaskState.WAITING: 1,
    TaskState.ASSIGNED: 2,
    TaskState.RUNNING: 3,
    TaskState.SUCCEEDED: 4,
    TaskState.FAILED: 4,
    TaskState.CANCELLED: 4,
}


def later(ev: StatusEvent, last: tuple[int, int] | None) -> bool:
    """Whether ``ev`` is news after ``last`` (attempt, rank): a message already reflected by
    the status read at the start, or an older one, is not sent again."""
    return last is None or (ev.attempt, _RANK[ev.state]) > last


async def status_events(
    hub: StatusHub,
    task_id: str,
    read: Callable[[], Awaitable[TaskStatus | None]],
    keepalive_s: float = 15.0,
    timeout_s: float | None = None,
) -> AsyncIterator[bytes]:
    """SSE bytes for one task: its status now, each change, and the end at a final state
    (or a ``timeout`` event after ``timeout_s``, so a caller's deadline is exact).

    Each change is sent as its message says (so quick successive changes all show); the hash
    is read at the start, after a resubscription, and for the final event's whole status.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    with hub.watch(task_id) as q:
        last: tuple[int, int] | None = None
        current = await read()
        item: Item = (
            None
            if current is None
            else StatusEvent(task_id=task_id, state=current.state, attempt=current.attempt)
        )
        while True:
            if item is not None and later(item, last):
                last = (item.attempt, _RANK[item.state])
                if item.state in FINAL_STATES:
                    item.status = current if current and current.final else await read()
                    yield sse("final", item.model_dump_json())
                    return
                yield sse("status", item.model_dump_json())
            current = None
            left = keepalive_s if deadline is None else min(keepalive_s, deadline - loop.time())
            if left <= 0:
                yield sse("timeout", json.dumps({"task_id": task_id, "timeout_s": timeout_s}))
                return
            try:
                item = await asyncio.wait_for(q.get(), left)
            except TimeoutError:
                yield b": keep-alive\n\n"
                item = None
                continue
            if item is None:  # resubscribed: a change may have been missed
                current = await read()
                if current is not None:
                    item = StatusEvent(
                        task_id=task_id, state=current.state, attempt=current.attempt
                    )
