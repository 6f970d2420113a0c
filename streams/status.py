"""The router's task statuses into Redis, until each one is applied (issue 15).

The router decides assigned, waiting, succeeded and failed; Redis is where users read them.
A write that Redis could not take (down, or refusing the command) used to be dropped: the task
stayed ``running`` in Redis for ever although the router had finished it. Here every decided
status waits in a queue per task, in order, until Redis has applied or refused it (a refusal
is the lifecycle's answer, for good: an older attempt, a state already final); the queue is
retried with backoff by the router's status clock, so the stream never waits for Redis.

What a kill of the router loses (the queue is in memory) is re-derived from its tasks table
after each restart or rebalance: :func:`status_of` is the status a record stands for, and
re-writing it is harmless because the status script only ever moves a task forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from stormline.runtime.retry import RetryPolicy
from stormline.schemas.lifecycle import TaskState
from stormline.state import RedisState

log = logging.getLogger("stormline.router")

Write = tuple[TaskState, int, dict[str, Any]]
RETRY = RetryPolicy(base_s=0.25, max_s=5.0)
BATCH = 1000  # writes per pipelined round trip


def status_of(rec: Mapping[str, Any]) -> Write | None:
    """The status (state, attempt, fields) the router's record ``rec`` stands for.

    None for a record that stands for none the router writes (a ledger-only record, a task
    not decided yet). The attempt is at least 1, as the router writes it.
    """
    try:
        state = TaskState(str(rec.get("state")))
    except ValueError:
        return None
    if rec.get("task") is None:
        return None  # a ledger-only record (a reward for a task this router never knew)
    if rec.get("compact") or state in (TaskState.SUBMITTED, TaskState.RUNNING):
        return None  # compacted long ago (written then), or not the router's to write
    attempt = max(int(rec.get("attempt") or 0), 1)
    fields: dict[str, Any] = {}
    if state == TaskState.ASSIGNED:
        fields["agent_id"] = rec.get("agent")
    elif state == TaskState.FAILED:
        fields["error"] = rec.get("reason")
    return state, attempt, fields


class StatusWriter:
    """A queue of status writes per task, applied in order until Redis answers each."""

    def __init__(self, state: RedisState, retry: RetryPolicy = RETRY) -> None:
        self.state = state
        self.retry = retry
        self.pending: dict[str, list[Write]] = {}
        self.failures = 0
        self.next_try = 0.0
        self.lock = asyncio.Lock()
        self.counters = {"status_applied": 0, "status_refused": 0, "status_retried": 0}

    def add(self, task_id: str, state: TaskState, attempt: int, fields: dict[str, Any]) -> None:
        self.pending.setdefault(task_id, []).append((state, attempt, fields))

    def resync(self, records: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
        """Queue the status of every record (after a restart or rebalance); how many."""
        n = 0
        for task_id, rec in records:
            write = status_of(rec) if rec else None
            if write is not None and task_id not in self.pending:
                self.pending[task_id] = [write]
                n += 1
        return n

    def holds(self, task_id: str) -> bool:
        """Whether a status of ``task_id`` is still to be written (keep its record)."""
        return task_id in self.pending

    async def flush(self) -> bool:
        """Write what is queued, in one pipelined round trip per step of the queues; False
        if Redis is away.

        Never waits: while backing off, or while another flush runs, it returns at once and
        the status clock comes back to it.
        """
        if not self.pending:
            return True
        if self.lock.locked() or time.monotonic() < self.next_try:
            return False
        async with self.lock:
            while self.pending:
                # The head of every task's queue: a task's writes stay in their order.
                heads = [(t, *q[0]) for t, q in list(self.pending.items())[:BATCH]]
                done = await self.state.apply_statuses(heads)
                if done is None:
                    self.failures += 1
                    self.counters["status_retried"] += 1
                    self.next_try = time.monotonic() + self.retry.backoff(self.failures)
                    if self.failures == 1:
                        log.warning(
                            "task statuses not written (Redis away); %d tasks wait, retried "
                            "with backoff",
                            len(self.pending),
                        )
                    return False
                for (task_id, *_), applied in zip(heads, done, strict=True):
                    self.counters["status_applied" if applied else "status_refused"] += 1
                    queue = self.pending[task_id]
                    queue.pop(0)
                    if not queue:
                        del self.pending[task_id]
            if self.failures:
                log.warning("task statuses written again after %d retries", self.failures)
            self.failures = 0
            return True
