"""The evaluator service against the real broker and registry: one outcome per trajectory.

Issue 15, finding 4: the router's own final-failure trajectory is never scored (the router
gave that task its one Reward), and a trajectory scored again after a crash between producing
and committing gives the same Reward event (same event id), not a second one.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from stormline.consumers.evaluator.service import EvaluatorService
from stormline.schemas.catalog import REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventProducer, end_offsets
from stormline.schemas.models import (
    ROUTER_AGENT,
    Reward,
    RewardSource,
    TrajectoryStatus,
    stable_event_id,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests.test_publish import read_topic, trajectory


def _committed_to_end(service: EvaluatorService, s: Settings) -> bool:
    n = TRAJECTORIES.partitions(s)
    got = service.consumer.raw.committed(
        [TopicPartition(TRAJECTORIES.name(s), p) for p in range(n)], timeout=10
    )
    ends = end_offsets(s, TRAJECTORIES.name(s), n)
    return [max(tp.offset, 0) for tp in got] == ends


def _run_until_committed(service: EvaluatorService, s: Settings, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.step()
        if _committed_to_end(service, s):
            return
    raise AssertionError("the evaluator did not commit every trajectory in time")


def test_router_final_failure_trajectory_is_not_scored(topics: Settings, serde: Serde) -> None:
    final = {"status": TrajectoryStatus.ERROR, "output": None, "final": True}
    EventProducer(topics, serde).publish(
        [
            trajectory("worked", output="4", expected="4"),
            # As the router emits it now (agent and provider are the router) ...
            trajectory(
                "failed",
                trajectory_id="failed:router-final",
                agent_id=ROUTER_AGENT,
                provider=ROUTER_AGENT,
                error="no trajectory after 3 attempts",
                **final,
            ),
            # ... and as it did before (the last agent tried, provider the router).
            trajectory(
                "failed-old",
                trajectory_id="failed-old:router-final",
                agent_id="agent-b",
                provider=ROUTER_AGENT,
                error="no trajectory after 3 attempts",
                **final,
            ),
        ]
    )
    service = EvaluatorService(topics, group_id=f"{topics.topic_prefix}evaluator")
    try:
        _run_until_committed(service, topics)  # the positive sign: all three were read
    finally:
        service.close()
    rewards = [serde.decode(m.value(), Reward) for m in read_topic(topics, REWARDS, 1)]
    assert [(r.task_id, r.value, r.source) for r in rewards] == [
        ("worked", 1.0, RewardSource.VERIFIER)
    ]


class _Crash(BaseException):
    """Stands for kill -9 between the rewards' delivery and the offsets' commit."""


def test_trajectory_scored_again_after_a_crash_gives_the_same_reward_event(
    topics: Settings, serde: Serde
) -> None:
    trajectories = [trajectory(f"t{i}", output="4", expected="4") for i in range(5)]
    trajectories.append(trajectory("t-err", status=TrajectoryStatus.ERROR, output=None))
    EventProducer(topics, serde).publish(trajectories)
    group = f"{topics.topic_prefix}evaluator"

    crashing = EvaluatorService(topics, group_id=group)

    def crash(*_a: Any, **_k: Any) -> None:
        raise _Crash

    crashing.consumer.commit = crash  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            crashing.step()  # produces and flushes, then "dies" before the commit
    crashing.consumer.raw.close()  # what the broker sees of a killed process: it is gone
    crashing.producer.close(timeout=10)
    first = [serde.decode(m.value(), Reward) for m in read_topic(topics, REWARDS, 1)]
    assert first, "the crashing evaluator produced no reward"

    again = EvaluatorService(topics, group_id=group)
    try:
        _run_until_committed(again, topics)
    finally:
        again.close()
    rewards = [
        serde.decode(m.value(), Reward)
        for m in read_topic(topics, REWARDS, len(first) + len(trajectories))
    ]
    by_trajectory: dict[str, set[str]] = {}
    for r in rewards:
        by_trajectory.setdefault(r.trajectory_id, set()).add(str(r.event_id))
        assert r.event_id == stable_event_id("reward", r.trajectory_id, r.source.value)
    assert set(by_trajectory) == {t.trajectory_id for t in trajectories}
    assert len(rewards) > len(trajectories), "the restart scored nothing twice: no test"
    assert all(len(ids) == 1 for ids in by_trajectory.values()), by_trajectory
