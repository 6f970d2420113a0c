"""A task's life: one vocabulary and one table of allowed transitions. Pure, no I/O.

The router decides a task's state; the Redis status that users read (``stormline status``,
the HTTP API) uses the same words, so there is one meaning of "assigned" or "failed".
Anything not in :data:`ALLOWED` is refused by :func:`check` and must be logged, never applied::

    submitted -> waiting | assigned | running | succeeded | failed | cancelled
    waiting   -> assigned | running | succeeded | failed | cancelled  (no capable agent yet)
    assigned  -> running | assigned | succeeded | failed | cancelled
    running   -> assigned | succeeded | failed | cancelled
    succeeded, failed, cancelled: final; nothing leaves them

``assigned -> assigned`` and ``running -> assigned`` are a reassignment (the next attempt).
``assigned -> succeeded`` is a result whose "running" mark was never seen (it is advisory);
``submitted/waiting -> running | succeeded``: the router's and the workers' writes race, so a
worker's mark may land before the router's "assigned". Within one attempt a state only moves
forward (:data:`RANK`, :func:`advances`): the router's late "assigned" for attempt 2 never
overwrites a worker's "running" for attempt 2, while "assigned" for attempt 3 does.
A result that arrives after a final state is recorded with the trajectories, but the final
outcome stays what it was: a task has exactly one.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    SUBMITTED = "submitted"
    WAITING = "waiting"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = TaskState
FINAL: frozenset[TaskState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    S.SUBMITTED: frozenset({S.WAITING, S.ASSIGNED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.WAITING: frozenset({S.ASSIGNED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.ASSIGNED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.ASSIGNED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

# How far along one attempt a state is; within an attempt, status only moves to a higher rank.
RANK: dict[TaskState, int] = {
    S.SUBMITTED: 0,
    S.WAITING: 1,
    S.ASSIGNED: 2,
    S.RUNNING: 3,
    S.SUCCEEDED: 4,
    S.FAILED: 4,
    S.CANCELLED: 4,
}


class IllegalTransition(ValueError):
    """A transition the table does not allow; the caller logs it and keeps the old state."""

    def __init__(self, task_id: str, old: TaskState, new: TaskState) -> None:
        super().__init__(f"task {task_id}: {old.value} -> {new.value} is not allowed")
        self.task_id, self.old, self.new = task_id, old, new


def allowed(old: TaskState | None, new: TaskState) -> bool:
    """Whether ``old -> new`` may happen; ``None`` is a task not seen yet (any first state)."""
    return old is None or new in ALLOWED[old]


def check(task_id: str, old: TaskState | None, new: TaskState) -> TaskState:
    """``new`` if the move is allowed, else :class:`IllegalTransition`."""
    if not allowed(old, new):
        assert old is not None
        raise IllegalTransition(task_id, old, new)
    return new


def advances(old: TaskState | None, old_attempt: int, new: TaskState, new_attempt: int) -> bool:
    """Whether a status write of ``new`` at ``new_attempt`` may replace ``old`` at
    ``old_attempt``: allowed by the table, never to an older attempt, and within the same
    attempt only forward (writers race; the later stage's word stands)."""
    if old is None:
        return True
    if new_attempt < old_attempt or not allowed(old, new):
        return False
    return new_attempt > old_attempt or RANK[new] > RANK[old]


def predecessors(new: TaskState) -> frozenset[TaskState]:
    """The states from which ``new`` may be reached (for guards outside Python, e.g. Lua)."""
    return frozenset(old for old, nxt in ALLOWED.items() if new in nxt)
