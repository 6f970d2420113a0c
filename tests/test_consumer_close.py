"""A group member closes with nothing assigned, through a real broker.

librdkafka can block for ever in a rebalance callback that ``close()`` itself runs (librdkafka
#4041, #4527, #4884), holding the GIL, so the whole process freezes: seen once in CI, a
zombie sink's ``close()``. :meth:`RecordConsumer.close` gives the partitions back first, so the
revoke runs from a poll and ``close()`` has none left to run.
"""

from __future__ import annotations

import time
from typing import Any

from stormline.runtime.consumer import RecordConsumer
from stormline.schemas.catalog import TASKS
from stormline.settings import Settings


class _Spy:
    """The consumer, with its ``close`` recorded (a C type's methods cannot be patched)."""

    def __init__(self, real: Any, events: list[tuple[str, int]]) -> None:
        self._real, self._events = real, events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def close(self) -> None:
        self._events.append(("close", len(self._real.assignment())))
        self._real.close()


def test_close_gives_the_partitions_back_before_closing(topics: Settings) -> None:
    events: list[tuple[str, int]] = []
    c = RecordConsumer(topics, f"{topics.topic_prefix}close", [TASKS.name(topics)])
    c.raw.subscribe(
        [TASKS.name(topics)], on_revoke=lambda _c, parts: events.append(("revoke", len(parts)))
    )
    deadline = time.monotonic() + 30
    while not c.raw.assignment() and time.monotonic() < deadline:
        c.poll(10, 0.2)
    assigned = len(c.raw.assignment())
    assert assigned == topics.default_partitions, "the consumer never got its partitions"

    c.raw = _Spy(c.raw, events)  # type: ignore[assignment]
    started = time.monotonic()
    c.close()
    assert events == [("revoke", assigned), ("close", 0)]
    assert time.monotonic() - started < 10
