"""Wait for published tasks to end, without polling: Redis pub/sub on the task-status channel.

Every applied status change is PUBLISHed on ``<key_prefix>task-status`` as
``{"task_id","state","attempt"}`` (``stormline.state``'s status script). :func:`wait_for`
subscribes first, then reads the tasks' statuses once (a task may have ended before the
subscription), and from then on reads a task's hash only when a message says it reached a
final state. If the subscription breaks, it subscribes again and reads the statuses once
more, since Redis does not replay messages sent meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import redis

from stormline.schemas.lifecycle import FINAL, TaskState
from stormline.settings import Settings
from stormline.state import key_prefix, status_channel

_FINAL = {s.value for s in FINAL}


class NotFinished(TimeoutError):
    """Some tasks had no final state within the timeout; ``done`` holds those that had."""

    def __init__(self, pending: set[str], done: dict[str, dict[str, str]]) -> None:
        super().__init__(f"{len(pending)} tasks not final yet, e.g. {sorted(pending)[:3]}")
        self.pending, self.done = pending, done


def _final_statuses(
    r: redis.Redis, settings: Settings, ids: Iterable[str]
) -> dict[str, dict[str, str]]:
    ids = list(ids)
    pipe = r.pipeline(transaction=False)
    for tid in ids:
        pipe.hgetall(f"{key_prefix(settings)}task:{tid}")
    out = {}
    for tid, raw in zip(ids, pipe.execute(), strict=True):
        st = {k.decode(): v.decode() for k, v in raw.items()}
        if st.get("state") in _FINAL:
            out[tid] = st
    return out


def wait_for(
    settings: Settings, task_ids: Iterable[str], timeout: float | None = None
) -> dict[str, dict[str, str]]:
    """Block until every task has a final state (succeeded, failed, cancelled); return each
    task's status hash. Raises :class:`NotFinished` after ``timeout`` seconds (None: never)."""
    pending = set(task_ids)
    done: dict[str, dict[str, str]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    r = redis.Redis.from_url(settings.redis_address, socket_connect_timeout=2.0)
    try:
        while pending:
            try:
                _listen(r, settings, pending, done, deadline)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)  # then subscribe again and re-read once
    finally:
        r.close()
    return done


def _listen(
    r: redis.Redis,
    settings: Settings,
    pending: set[str],
    done: dict[str, dict[str, str]],
    deadline: float | None,
) -> None:
    p = r.pubsub(ignore_subscribe_messages=True)
    try:
        p.subscribe(status_channel(settings))
        _settle(_final_statuses(r, settings, pending), pending, done)
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NotFinished(set(pending), done)
            msg = p.get_message(timeout=5.0 if left is None else min(left, 5.0))
            if msg is None or msg.get("type") != "message":
                continue
            try:
                d = json.loads(msg["data"])
                tid, state = str(d["task_id"]), TaskState(d["state"])
            except (ValueError, KeyError, TypeError):
                continue
            if tid in pending and state in FINAL:
                _settle(_final_statuses(r, settings, [tid]), pending, done)
    finally:
        p.close()


def _settle(
    found: dict[str, dict[str, str]], pending: set[str], done: dict[str, dict[str, str]]
) -> None:
    done.update(found)
    pending.difference_update(found)
