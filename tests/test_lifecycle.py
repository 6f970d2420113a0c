"""The task state machine's table: pure, no Kafka."""

from __future__ import annotations

import itertools
import uuid

import pytest

from stormline.schemas.lifecycle import (
    ALLOWED,
    FINAL,
    RANK,
    IllegalTransition,
    TaskState,
    advances,
    allowed,
    check,
    predecessors,
)
from stormline.schemas.models import stable_event_id


def test_every_state_has_a_row_and_final_states_have_no_exit() -> None:
    assert set(ALLOWED) == set(TaskState)
    for s in FINAL:
        assert not ALLOWED[s]
    for old, new in itertools.product(FINAL, TaskState):
        assert not allowed(old, new)


def test_a_late_result_cannot_undo_a_final_failure() -> None:
    with pytest.raises(IllegalTransition, match="failed -> succeeded"):
        check("t1", TaskState.FAILED, TaskState.SUCCEEDED)
    assert check("t1", TaskState.RUNNING, TaskState.SUCCEEDED) is TaskState.SUCCEEDED


def test_reassignment_and_first_sight() -> None:
    assert allowed(TaskState.ASSIGNED, TaskState.ASSIGNED)
    assert allowed(TaskState.RUNNING, TaskState.ASSIGNED)
    assert not allowed(TaskState.RUNNING, TaskState.SUBMITTED)
    assert allowed(None, TaskState.RUNNING)  # a worker's mark before publish's


def test_predecessors_invert_the_table() -> None:
    for new in TaskState:
        for old in TaskState:
            assert (old in predecessors(new)) == (new in ALLOWED[old])
    assert predecessors(TaskState.SUBMITTED) == frozenset()
    assert TaskState.RUNNING in ALLOWED[TaskState.SUBMITTED]


def test_stable_event_ids_are_deterministic_and_kind_scoped() -> None:
    a = stable_event_id("trajectory", "t1", 2)
    assert a == stable_event_id("trajectory", "t1", 2)
    assert isinstance(a, uuid.UUID) and a.version == 5
    assert a != stable_event_id("trajectory", "t1", 3)
    assert a != stable_event_id("reward", "t1", 2)
    # parts are separated: ("t1", "2x") and ("t12", "x") must not meet
    assert stable_event_id("k", "t1", "2x") != stable_event_id("k", "t12", "x")


def test_within_an_attempt_status_only_moves_forward() -> None:
    assert set(RANK) == set(TaskState)
    assert not advances(TaskState.RUNNING, 2, TaskState.ASSIGNED, 2)  # the router's late word
    assert advances(TaskState.RUNNING, 2, TaskState.ASSIGNED, 3)  # a reassignment
    assert advances(TaskState.SUBMITTED, 0, TaskState.RUNNING, 1)  # a worker before the router
    assert not advances(TaskState.ASSIGNED, 3, TaskState.RUNNING, 2)  # an older attempt
    assert not advances(TaskState.FAILED, 3, TaskState.SUCCEEDED, 4)  # final stays final
    assert advances(None, 0, TaskState.RUNNING, 1)
