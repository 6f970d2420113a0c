"""The one commit discipline: offsets become committable only when their work is done.

Work on records may finish out of order (many LLM calls in flight, batches written later); the
position to commit per partition is the lowest offset still in flight. Commits run on a daemon
thread so that a broker without a group coordinator never stalls consuming.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

log = logging.getLogger("stormline.commits")

TP = tuple[str, int]


class OffsetTracker:
    """Committable position per partition while work completes out of order.

    The position to commit is the lowest offset still in flight, or one past the highest
    offset polled when nothing is in flight. Thread-safe (rebalance callbacks run on the
    polling thread).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[TP, set[int]] = {}
        self._high: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def polled(self, tp: TP, next_offset: int) -> None:
        with self._lock:
            self._high[tp] = max(self._high.get(tp, 0), next_offset)

    def started(self, tp: TP, offset: int) -> None:
        with self._lock:
            self._inflight.setdefault(tp, set()).add(offset)

    def done(self, tp: TP, offset: int) -> None:
        with self._lock:
            s = self._inflight.get(tp)
            if s is not None:
                s.discard(offset)

    def committable(self, tps: set[TP] | None = None) -> dict[TP, int]:
        out = {}
        with self._lock:
            for tp, high in self._high.items():
                if tps is not None and tp not in tps:
                    continue
                pending = self._inflight.get(tp)
                pos = min(pending) if pending else high
                if pos > self._committed.get(tp, -1):
                    out[tp] = pos
        return out

    def committed(self, offsets: dict[TP, int]) -> None:
        with self._lock:
            for tp, pos in offsets.items():
                self._committed[tp] = max(self._committed.get(tp, -1), pos)

    def forget(self, tps: set[TP] | None = None) -> None:
        """Drop what is known of ``tps`` (all partitions when None): they are read again."""
        with self._lock:
            if tps is None:
                tps = {*self._inflight, *self._high, *self._committed}
            for tp in tps:
                self._inflight.pop(tp, None)
                self._high.pop(tp, None)
                self._committed.pop(tp, None)


# How long the consume loop waits for a commit before it goes on without the answer.
COMMIT_WAIT_S = 5.0


def commit_on_daemon_thread(consumer: Any, offsets: list[TopicPartition]) -> Future[None]:
    """A synchronous commit that nobody has to wait for.

    After a broker restart librdkafka can hold a synchronous commit for as long as it has
    no group coordinator; in the consume loop that stalled every assignment of the worker
    (seen in the broker-restart fault test). On a daemon thread it blocks neither consuming
    nor the process's exit.
    """
    fut: Future[None] = Future()
    fut.set_running_or_notify_cancel()

    def run() -> None:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    threading.Thread(target=run, name="offset-commit", daemon=True).start()
    return fut


# The broker (or its group coordinator) is restarting: a commit can wait for the next one.
COORDINATOR_AWAY = frozenset(
    {
        KafkaError._WAIT_COORD,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
    }
)
# A rebalance took the partitions: the new owner re-reads from the last commit.
REBALANCED = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._NO_OFFSET,
    }
)


def commit_tracked(
    consumer: Any, tracker: OffsetTracker, *, wait: float = COMMIT_WAIT_S
) -> Future[None] | None:
    """Commit what ``tracker`` says is committable, waiting up to ``wait`` for the answer.

    The blocking form of the discipline (batch consumers: the sink, the evaluator, the
    trainer). A commit that is unanswered in time, or refused because the coordinator is
    away, keeps the positions committable: the next commit carries them. One refused
    after a rebalance drops them (the new owner re-reads). Anything else raises.
    """
    offsets = tracker.committable()
    if not offsets:
        return None
    fut = commit_on_daemon_thread(
        consumer, [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
    )

    def confirmed(f: Future[None]) -> None:
        if f.exception() is None:
            tracker.committed(offsets)

    fut.add_done_callback(confirmed)
    try:
        fut.result(wait)
    except FutureTimeout:
        log.warning("offset commit unanswered after %.0fs; the next commit retries", wait)
    except KafkaException as exc:
        code = exc.args[0].code()
        if code in COORDINATOR_AWAY:
            log.info("commit postponed, no group coordinator yet: %s", exc)
        elif code in REBALANCED:
            log.info("commit skipped after rebalance: %s", exc)
            tracker.forget(set(offsets))
        else:
            raise
    return fut
