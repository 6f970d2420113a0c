"""A task's life: one vocabulary and one table of allowed transitions. Pure, no I/O.

The router decides a task's state; the Redis status that users read (``stormline status``,
the HTTP API) uses the same words, so there is one meaning of "assigned" or "failed".
Anything not in :data:`ALLOWED` is refused by :func:`check` and must be logged, never applied::

    submitted -> waiting | assigned | failed | cancelled
    waiting   -> assigned | failed | cancelled           (no capable healthy agent yet)
    assigned  -> running | assigned | succeeded | failed | cancelled
    running   -> assigned | succeeded | failed | cancelled
    succeeded, failed, cancelled: final; nothing leaves them

``assigned -> assigned`` and ``running -> assigned`` are a reassignment (the next attempt).
``assigned -> succeeded`` is a result whose "running" mark was never seen (it is advisory).
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
    S.SUBMITTED: frozenset({S.WAITING, S.ASSIGNED, S.FAILED, S.CANCELLED}),
    S.WAITING: frozenset({S.ASSIGNED, S.FAILED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.ASSIGNED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.ASSIGNED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
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


def predecessors(new: TaskState) -> frozenset[TaskState]:
    """The states from which ``new`` may be reached (for guards outside Python, e.g. Lua)."""
    return frozenset(old for old, nxt in ALLOWED.items() if new in nxt)
