"""The evaluator service against the real broker and registry: one outcome per trajectory.

Issue 15, finding 4: the router's own final-failure trajectory is never scored (the router
gave that task its one Reward), and a trajectory scored again after a crash between producing
and committing gives the same Reward event (same event id), not a second one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from confluent_kafka import TopicPartition

from stormline import state
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


# ------------------------------------------- reward statuses, one round trip a batch --
def test_rewards_recorded_together_are_what_one_call_each_gives(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """record_rewards applies what record_reward would, call by call in the same order (a
    human reward kept over a later automatic one, a task twice in a batch: the later), over
    several script calls when the batch is longer than one."""
    monkeypatch.setattr(state, "REWARDS_CHUNK", 3)
    plan = [("a", 0.0, "verifier"), ("b", 1.0, "human"), ("a", 1.0, "verifier")]
    plan += [("b", 0.25, "verifier"), ("c", -0.5, "failure"), ("d", 1e-05, "judge")]
    plan += [("c", 0.75, "human"), ("c", 0.0, "timeout"), ("e", 1e-05, "judge")]
    one, many = f"one-{uuid.uuid4().hex[:6]}-", f"many-{uuid.uuid4().hex[:6]}-"
    state.record_reward(settings, one + "d", 0.5, "human")  # a person was there first
    state.record_reward(settings, many + "d", 0.5, "human")
    singly = [state.record_reward(settings, one + t, v, src) for t, v, src in plan]
    together = state.record_rewards(settings, [(many + t, v, src) for t, v, src in plan])
    assert together == singly and False in together and True in together
    r = redis.Redis.from_url(settings.redis_address)
    for t in "abcde":
        a, b = state.task_status(settings, one + t), state.task_status(settings, many + t)
        assert a is not None and a == b, t
        assert r.ttl(f"stormline:{settings.topic_prefix}task:{many}{t}") > 0
    assert state.task_status(settings, many + "c") == {"reward": "0.75", "reward_source": "human"}


def test_the_evaluator_records_each_batchs_reward_statuses_in_one_call(
    topics: Settings, serde: Serde, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = state.record_rewards

    def counted(settings: Settings, rewards: Any) -> list[bool]:
        calls.append(len(rewards))
        return real(settings, rewards)

    monkeypatch.setattr(state, "record_rewards", counted)
    batch = [trajectory(f"s{i}", output="4", expected="4") for i in range(40)]
    batch.append(trajectory("s-err", status=TrajectoryStatus.ERROR, output=None))
    batch.append(trajectory("s-human", output="5", expected="4"))
    state.record_reward(topics, "s-human", 1.0, "human")  # feedback before the evaluator
    EventProducer(topics, serde).publish(batch)
    s = topics.model_copy(update={"evaluator_batch_size": 15})
    service = EvaluatorService(s, group_id=f"{s.topic_prefix}evaluator")
    try:
        _run_until_committed(service, s)
    finally:
        service.close()
    assert service.scored == len(batch) and sum(calls) == len(batch)
    assert 0 < len(calls) <= service.batches and max(calls) <= 15
    for t in batch[:-2]:
        assert state.task_status(s, t.task_id) == {"reward": "1.0", "reward_source": "verifier"}
    assert state.task_status(s, "s-err") == {"reward": "0.0", "reward_source": "failure"}
    assert state.task_status(s, "s-human") == {"reward": "1.0", "reward_source": "human"}
