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
BATCH = 64  # writes in flight at once while catching up (the pool has room for them)


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

    async def flush(self, only: Iterable[str] | None = None) -> bool:
        """Write what is queued (for ``only`` these tasks, else all); False if Redis is away.

        Never waits: while backing off, or while another flush runs, it returns at once and
        the status clock comes back to it.
        """
        if not self.pending:
            return True
        if self.lock.locked() or time.monotonic() < self.next_try:
            return False
        async with self.lock:
            wanted = list(self.pending) if only is None else only
            ids = [t for t in wanted if t in self.pending]
            for i in range(0, len(ids), BATCH):
                done = await asyncio.gather(*(self._one(t) for t in ids[i : i + BATCH]))
                if not all(done):
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
            if self.failures and not self.pending:
                log.warning("task statuses written again after %d retries", self.failures)
            self.failures = 0
            return True

    async def _one(self, task_id: str) -> bool:
        queue = self.pending.get(task_id, [])
        while queue:
            state, attempt, fields = queue[0]
            applied = await self.state.apply_status(task_id, state, attempt, **fields)
            if applied is None:
                return False
            self.counters["status_applied" if applied else "status_refused"] += 1
            queue.pop(0)
        self.pending.pop(task_id, None)
        return True
