"""Human feedback: ``stormline reward TASK_ID VALUE`` as a Reward event on ``rewards``.

A Reward names the trajectory and agent it scores. When the caller does not name them, the
latest Trajectory of the task is looked up on the ``trajectories`` topic: only the partition
that holds the task's key is read, backwards from its end in growing windows, decoding only
records with that key. Stormline's producers use murmur2 (as Java, aiokafka and Faust do;
``stormline.runtime.partitioning``); a plain librdkafka client defaults to CRC32
(``consistent_random``). Both candidates are read first, the other partitions only if
neither holds the key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from confluent_kafka import Consumer, KafkaError, TopicPartition

from stormline.runtime.consumer import position, reader
from stormline.runtime.partitioning import partition_for
from stormline.schemas.catalog import REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import Reward, RewardSource, Trajectory, stable_event_id
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings

log = logging.getLogger("stormline.feedback")


class FeedbackError(ValueError):
    """The feedback cannot be recorded as given; the message says what to pass instead."""


# --------------------------------------------------------------------- partitioners --
def candidate_partitions(key: str, partitions: int) -> list[int]:
    """Where a key's records are: murmur2's partition, CRC32's, then all the others."""
    first = [partition_for(key, partitions), partition_for(key, partitions, "consistent")]
    ordered = list(dict.fromkeys(first))
    return ordered + [p for p in range(partitions) if p not in ordered]


# ---------------------------------------------------------------------------- lookup --
@dataclass(frozen=True)
class Found:
    trajectory: Trajectory
    partition: int
    offset: int


def find_latest_trajectory(
    settings: Settings,
    task_id: str,
    *,
    trajectory_id: str | None = None,
    serde: Serde | None = None,
    timeout: float = 30.0,
    first_window: int = 1_000,
) -> Found | None:
    """The last Trajectory recorded for ``task_id`` (with ``trajectory_id`` if given)."""
    serde = serde or Serde.from_settings(settings)
    topic = TRAJECTORIES.name(settings)
    deadline = time.monotonic() + timeout
    # A throw-away group that never commits: the lookup leaves no trace.
    consumer = reader(
        settings,
        "reward-lookup",
        **{
            "enable.partition.eof": True,
            # The end of a partition is only seen by a fetch that finds nothing new; do not
            # let the broker hold that fetch for the default 500 ms.
            "fetch.wait.max.ms": 10,
        },
    )
    try:
        md = consumer.list_topics(topic, timeout=max(deadline - time.monotonic(), 1))
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        key = task_id.encode()
        for partition in candidate_partitions(task_id, len(meta.partitions)):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=max(deadline - time.monotonic(), 1)
            )
            end, window = high, first_window
            while end > low:
                start = max(low, end - window)
                hit = _scan(
                    consumer, serde, topic, partition, start, end, key, trajectory_id, deadline
                )
                if hit is not None:
                    return hit
                end, window = start, window * 4
        return None
    finally:
        consumer.close()


def _scan(
    consumer: Consumer,
    serde: Serde,
    topic: str,
    partition: int,
    start: int,
    end: int,
    key: bytes,
    trajectory_id: str | None,
    deadline: float,
) -> Found | None:
    """The last matching record in [start, end) of one partition."""
    consumer.assign([TopicPartition(topic, partition, start)])
    best: Found | None = None
    while True:
        if time.monotonic() > deadline:
            raise FeedbackError(
                f"looking up the trajectory of this task on {topic} took too long; "
                "pass --trajectory-id and --agent-id"
            )
        # consume() waits for its whole timeout unless the batch fills: keep it short.
        msgs = consumer.consume(1000, 0.1)
        done = False
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done = True
                    continue
                raise FeedbackError(f"reading {topic}[{partition}] failed: {err}")
            offset = position(msg).offset
            if offset >= end:
                done = True
                break
            if msg.key() == key:
                try:
                    traj = serde.decode(msg.value(), Trajectory)
                except DecodeError:
                    continue
                if trajectory_id is None or traj.trajectory_id == trajectory_id:
                    best = Found(traj, partition, offset)
            if offset >= end - 1:
                done = True
        if not msgs:
            # Nothing fetched: done once the position passed the range (e.g. it ends with
            # transaction markers); an invalid position means the fetch has not started.
            (pos,) = consumer.position([TopicPartition(topic, partition)])
            done = pos.offset >= end
        if done:
            return best


# ---------------------------------------------------------------------------- record --
class _Lineage(TypedDict):
    """What a Reward says of the trajectory it scores (Reward's fields of the same names)."""

    trajectory_id: str
    agent_id: str
    attempt: NotRequired[int]
    task_type: NotRequired[str]
    policy_version: NotRequired[str | None]


def record_reward(
    settings: Settings,
    task_id: str,
    value: float,
    *,
    source: RewardSource | str = RewardSource.HUMAN,
    trajectory_id: str | None = None,
    agent_id: str | None = None,
    reason: str | None = None,
    producer: EventProducer | None = None,
    lookup_timeout: float = 30.0,
) -> Reward:
    """Publish a Reward for ``task_id`` and return it once the brokers acknowledged it.

    Values are in [0, 1], like the evaluators'. When ``trajectory_id`` or ``agent_id`` is
    missing, the task's latest Trajectory supplies them (and task type, attempt and policy
    version); FeedbackError says to pass them when there is none.
    """
    src = _checked_source(source)
    if not 0.0 <= value <= 1.0:
        raise FeedbackError(f"reward value {value} is outside [0, 1] (0 = bad, 1 = good)")
    if not task_id:
        raise FeedbackError("TASK_ID must not be empty")
    serde = Serde.from_settings(settings)
    lineage = _lineage(settings, serde, task_id, trajectory_id, agent_id, lookup_timeout)
    reward = Reward(
        # One human reward per trajectory (contracts): a repeat is the same event, and the
        # router replaces the automatic reward's contribution with it once.
        event_id=stable_event_id("reward", lineage["trajectory_id"], src.value),
        task_id=task_id,
        value=value,
        source=src,
        reason=reason,
        components={src.value: value},
        **lineage,
    )
    _publish(settings, serde, reward, producer)
    _record_status(settings, reward)
    return reward


def _checked_source(source: RewardSource | str) -> RewardSource:
    """``source`` as a RewardSource a caller may record (not the decoder's 'unknown')."""
    try:
        src = RewardSource(source)
    except ValueError as exc:
        allowed = ", ".join(s.value for s in RewardSource if s is not RewardSource.UNKNOWN)
        raise FeedbackError(f"unknown reward source {source!r}; use one of {allowed}") from exc
    if src is RewardSource.UNKNOWN:
        raise FeedbackError("reward source 'unknown' is reserved for decoding; use 'human'")
    return src


def _lineage(
    settings: Settings,
    serde: Serde,
    task_id: str,
    trajectory_id: str | None,
    agent_id: str | None,
    lookup_timeout: float,
) -> _Lineage:
    """The ids given, the rest from the task's latest Trajectory when either is missing."""
    if trajectory_id is not None and agent_id is not None:
        return {"trajectory_id": trajectory_id, "agent_id": agent_id}
    found = find_latest_trajectory(
        settings, task_id, trajectory_id=trajectory_id, serde=serde, timeout=lookup_timeout
    )
    if found is None:
        what = f"trajectory {trajectory_id!r} of task" if trajectory_id else "trajectory for"
        raise FeedbackError(
            f"no {what} {task_id!r} on topic {TRAJECTORIES.name(settings)}; "
            "pass --trajectory-id and --agent-id to record the reward anyway"
        )
    t = found.trajectory
    return {
        "trajectory_id": t.trajectory_id if trajectory_id is None else trajectory_id,
        "agent_id": t.agent_id if agent_id is None else agent_id,
        "attempt": t.attempt,
        "task_type": t.task_type,
        "policy_version": t.policy_version,
    }


def _publish(
    settings: Settings, serde: Serde, reward: Reward, producer: EventProducer | None
) -> None:
    """Send ``reward`` and wait for the brokers' acknowledgement."""
    own = producer is None
    producer = producer or EventProducer(settings, serde)
    try:
        producer.produce(reward, topic=REWARDS.name(settings))
        producer.flush(30)
    finally:
        if own:
            producer.close(timeout=5)


def _record_status(settings: Settings, reward: Reward) -> None:
    """The reward in the task's Redis status too (best effort: the event is the record)."""
    import redis

    from stormline.state import record_reward as record_status

    try:
        record_status(settings, reward.task_id, reward.value, reward.source.value)
    except (redis.RedisError, OSError) as exc:
        log.warning("task status not updated in Redis: %s: %s", type(exc).__name__, exc)
