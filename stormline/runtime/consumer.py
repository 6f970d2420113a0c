"""The byte-level consumers: a group member with the one commit discipline, and a reader.

* :class:`RecordConsumer` joins a group, polls batches of records (errors logged, fatal ones
  raised) and commits only through :mod:`stormline.runtime.commits`: offsets become
  committable when polled (:meth:`RecordConsumer.poll`), the caller commits when its work is
  done (:meth:`RecordConsumer.commit`), and :meth:`RecordConsumer.forget` gives positions
  back to be read again.
* :func:`reader` is a client that assigns partitions itself and never commits (a throw-away
  group id): status, lookups and replays read the cluster without leaving a trace.
* :func:`position` is a record's (topic, partition, offset), typed as never None.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from stormline import metrics
from stormline.runtime.commits import TP, OffsetTracker, commit_tracked
from stormline.runtime.connection import client_logger, confluent_config
from stormline.settings import Settings

log = logging.getLogger("stormline.kafka")


class Position(NamedTuple):
    topic: str
    partition: int
    offset: int


def position(msg: Message) -> Position:
    """A record's topic, partition and offset.

    confluent-kafka types all three as optional: they are None only on error events, which
    callers skip (``msg.error() is not None``) before asking for a record's position.
    """
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"not a record but an error event: {msg.error()}")
    return Position(topic, partition, offset)


def reader(settings: Settings, purpose: str, **overrides: Any) -> Consumer:
    """A consumer for ``assign``-style reads that never commits (``purpose`` names its group)."""
    conf = confluent_config(
        settings,
        **{
            "group.id": f"stormline-{purpose}-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            **overrides,
        },
    )
    return Consumer(conf, logger=client_logger())


class RecordConsumer:
    """A group member that commits only what its caller finished (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        group_id: str,
        topics: Sequence[str],
        *,
        offset_reset: str = "earliest",
        **overrides: Any,
    ) -> None:
        self.group_id = group_id
        self.lag: dict[TP, int] = {}
        conf = confluent_config(
            settings,
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": offset_reset,
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
                "partition.assignment.strategy": "cooperative-sticky",
                # The lag gauge (stormline_consumer_lag) from librdkafka's own report.
                "statistics.interval.ms": metrics.LAG_INTERVAL_MS,
                "stats_cb": self._stats,
                **overrides,
            },
        )
        self.raw = Consumer(conf, logger=client_logger())
        self.raw.subscribe(list(topics))
        self.tracker = OffsetTracker()
        metrics.CONSUMER_LAG.watch(self, metrics.lag_of)  # read at scrape time, while open

    def _stats(self, report: str) -> None:
        self.lag = metrics.lag_from_stats(report)

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Message]:
        """Records (no error events); each becomes committable with the next :meth:`commit`."""
        out = []
        for msg in self.raw.consume(max_records, timeout):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                    if err.fatal():
                        raise KafkaException(err)
                continue
            topic, partition, offset = position(msg)
            self.tracker.polled((topic, partition), offset + 1)
            out.append(msg)
        return out

    def forget(self, partitions: Iterable[TP] | None = None) -> None:
        """Drop uncommitted positions (all, or of ``partitions``) so they are read again."""
        self.tracker.forget(None if partitions is None else set(partitions))

    def commit(self) -> None:
        """Commit everything polled so far (the one discipline: :func:`commit_tracked`)."""
        commit_tracked(self.raw, self.tracker)

    def close(self, drain_s: float = 10.0) -> None:
        """Leave the group, then close.

        The partitions are given back first (unsubscribe, then poll until none is assigned),
        so that ``close()`` has no rebalance callback left to run: librdkafka can block for
        ever in one run from inside ``close()`` (librdkafka #4041, #4527, #4884), and the
        callback holds the GIL, so the whole process would freeze. Records polled on the way
        out were never handed to the caller, so they are not committed: the next owner reads
        them. Past ``drain_s`` it closes anyway.
        """
        metrics.CONSUMER_LAG.unwatch(self)
        deadline = time.monotonic() + drain_s
        try:
            self.raw.unsubscribe()
            while self.raw.assignment() and time.monotonic() < deadline:
                self.raw.poll(0.1)
        except (KafkaException, RuntimeError) as exc:  # closed already, or a fatal error
            log.info("leaving the group before close: %s", exc)
        self.raw.close()
