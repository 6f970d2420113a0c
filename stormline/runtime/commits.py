"""The one commit discipline: offsets become committable only when their work is done.

Work on records may finish out of order (many LLM calls in flight, batches written later); the
position to commit per partition is the lowest offset still in flight. Commits run on a daemon
thread so that a broker without a group coordinator never stalls consuming.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from confluent_kafka import TopicPartition

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

    def forget(self, tps: set[TP]) -> None:
        with self._lock:
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
