"""Events on Kafka: the typed layer over the runtime kernel (``stormline.runtime``).

The runtime moves bytes (connection config, producer, consumer with the one commit
discipline, admin); this module knows the events, the serde and the topic catalog:

* :class:`EventProducer` produces a model to its catalog topic under its key; ``flush``
  raises if anything was not delivered.
* :class:`EventConsumer` polls batches, decodes them, sends what cannot be decoded or
  validated (or is too large) to ``dead-letters`` with the reason, and commits offsets only
  when the caller says the batch is done and the dead letters are delivered.
* :func:`dead_letter` builds the one :class:`DeadLetter` every part sends (the router too).
* :func:`ensure_topics` creates the catalog's topics idempotently and reports drift.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, Message

from stormline import metrics, tracing
from stormline.runtime import admin as rt_admin
from stormline.runtime.admin import end_offsets
from stormline.runtime.consumer import RecordConsumer, position
from stormline.runtime.producer import DeliveryError, RecordProducer
from stormline.schemas.catalog import CATALOG, DEAD_LETTERS, TopicSpec, spec_for
from stormline.schemas.models import DeadLetter, Event
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings

__all__ = [
    "Batch",
    "DeliveryError",
    "EventConsumer",
    "EventProducer",
    "Received",
    "TopicState",
    "dead_letter",
    "end_offsets",
    "ensure_topics",
]

log = logging.getLogger("stormline.kafka")
E = TypeVar("E", bound=Event)


# ======================================================================= dead letters ==
def dead_letter(
    settings: Settings,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    kind: str,
    error: str,
    group: str,
) -> DeadLetter | None:
    """The dead letter of one record, or None when the record came from dead-letters itself.

    ``raw_value`` keeps at most half of ``max_record_bytes`` (and says so in ``error``): a
    letter carrying a whole oversize record plus its envelope would itself be larger than
    the limit, so every reader of dead-letters (the sink, status) would reject it as
    oversize, and with the default limits the broker (max.message.bytes 1 MiB) refuses it.
    """
    log.warning("dead letter %s[%d]@%d: %s: %s", topic, partition, offset, kind, error)
    if topic == DEAD_LETTERS.name(settings):
        return None  # never re-dead-letter a dead letter: logged and skipped instead
    metrics.DEAD_LETTERS.labels(kind, topic.removeprefix(settings.topic_prefix)).inc()
    keep = settings.max_record_bytes // 2
    if value is not None and len(value) > keep:
        error = f"{error} (raw_value keeps the first {keep} of {len(value)} bytes)"
        value = value[:keep]
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        raw_key=key,
        raw_value=value,
        error_kind=kind,
        error=error[:10_000],
        consumer_group=group,
    )


# =========================================================================== producer ==
class EventProducer:
    """Idempotent producer of events. Thread-safe; ``send`` returns a future per record."""

    def __init__(self, settings: Settings, serde: Serde, **overrides: Any) -> None:
        self.settings = settings
        self.serde = serde
        self.records = RecordProducer(settings, **overrides)

    def topic_of(self, event: Event) -> str:
        return spec_for(event).name(self.settings)

    def produce(
        self,
        event: Event,
        *,
        key: str | bytes | None = None,
        topic: str | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Queue ``event`` for its catalog topic (or ``topic``); delivery is checked on flush."""
        topic = topic or self.topic_of(event)
        value = self.serde.encode(topic, event)
        key = key if key is not None else event.key()
        # The current span's trace context travels with the event (none when tracing is off).
        kw = {"headers": h} if (h := tracing.inject()) else {}
        self.records.produce(topic, value, key, on_delivery=on_delivery, **kw)

    def send(
        self, event: Event, *, key: str | None = None, topic: str | None = None
    ) -> Future[Message]:
        """Like :meth:`produce`, with a future resolved on delivery (needs :meth:`start`)."""
        topic = topic or self.topic_of(event)
        value = self.serde.encode(topic, event)
        kw = {"headers": h} if (h := tracing.inject()) else {}
        return self.records.send(topic, value, key if key is not None else event.key(), **kw)

    def start(self) -> EventProducer:
        """Serve delivery callbacks from a background thread (for ``send`` futures)."""
        self.records.start()
        return self

    def poll(self, timeout: float = 0) -> None:
        self.records.poll(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued is delivered; raise if any record was not."""
        self.records.flush(timeout)

    def publish(self, events: Iterable[Event], timeout: float = 30.0) -> int:
        """Produce ``events`` and wait for every delivery; returns how many."""
        n = 0
        for ev in events:
            self.produce(ev)
            n += 1
            if n % 1000 == 0:
                self.records.poll(0)
        self.flush(timeout)
        return n

    def close(self, timeout: float = 30.0) -> None:
        self.records.close(timeout)


# =========================================================================== consumer ==
@dataclass(frozen=True)
class Received(Generic[E]):
    topic: str
    partition: int
    offset: int
    key: str | None
    event: E
    timestamp_ms: int
    # Kafka headers (the producer's W3C trace context, for tracing.continued); None: none.
    headers: tracing.Headers = None


@dataclass
class Batch:
    records: list[Received[Any]] = field(default_factory=list)
    dead: int = 0
    # Next offset to commit per (topic, partition): covers good and dead-lettered records.
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Received[Any]]:
        return iter(self.records)


class EventConsumer:
    """Consumes catalog topics in batches; bad records go to dead-letters, never stop it.

    Offsets are committed only by :meth:`commit`, which the caller invokes after its handler
    succeeded and its outputs were delivered (the runtime's one commit discipline). A crash
    before that redelivers the batch (at least once); idempotent handlers make that exactly
    once in effect.
    """

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        group_id: str,
        specs: Sequence[TopicSpec],
        *,
        dead_letters: EventProducer | None = None,
        offset_reset: str = "earliest",
        **overrides: Any,
    ) -> None:
        self.settings = settings
        self.serde = serde
        self.group_id = group_id
        self._specs = {s.name(settings): s for s in specs}
        self._dlq = dead_letters or EventProducer(settings, serde)
        self._own_dlq = dead_letters is None
        self.records = RecordConsumer(
            settings, group_id, list(self._specs), offset_reset=offset_reset, **overrides
        )

    @property
    def raw(self) -> Consumer:
        return self.records.raw

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> Batch:
        batch = Batch()
        for msg in self.records.poll(max_records, timeout):
            topic, partition, offset = position(msg)
            batch.positions[(topic, partition)] = offset + 1
            try:
                event = self._decode(msg, topic)
            except DecodeError as exc:
                self.dead_letter(msg, exc.kind, exc.message)
                batch.dead += 1
                continue
            key = msg.key()
            batch.records.append(
                Received(
                    topic,
                    partition,
                    offset,
                    key.decode("utf-8", "replace") if key else None,
                    event,
                    msg.timestamp()[1],
                    msg.headers(),
                )
            )
        return batch

    def _decode(self, msg: Message, topic: str) -> Event:
        value = msg.value()
        limit = self.settings.max_record_bytes
        if value is not None and len(value) > limit:
            raise DecodeError(
                "oversize",
                f"record of {len(value)} bytes exceeds STORMLINE_MAX_RECORD_BYTES={limit}",
            )
        spec = self._specs[topic]
        return self.serde.decode(value, spec.event)

    def dead_letter(self, msg: Message, kind: str, error: str) -> None:
        """Send a record that could not be decoded to dead-letters, with the reason."""
        topic, partition, offset = position(msg)
        self._send(topic, partition, offset, msg.key(), msg.value(), kind, error)

    def dead_letter_failed(self, rec: Received[Any], exc: Exception) -> None:
        """Send a decoded record whose handling failed to dead-letters, with the error."""
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        key = rec.key.encode() if rec.key else None
        value = self.serde.encode(rec.topic, rec.event)
        self._send(rec.topic, rec.partition, rec.offset, key, value, "handler", detail)

    def _send(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        kind: str,
        error: str,
    ) -> None:
        letter = dead_letter(
            self.settings,
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            kind=kind,
            error=error,
            group=self.group_id,
        )
        if letter is not None:
            self._dlq.produce(
                letter,
                topic=DEAD_LETTERS.name(self.settings),
                key=key.decode("utf-8", "replace") if key else "",
            )

    def forget(self, partitions: Iterable[tuple[str, int]] | None = None) -> None:
        """Drop uncommitted positions (all, or of ``partitions``) so they are read again."""
        self.records.forget(partitions)

    def commit(self) -> None:
        """Deliver pending dead letters, then commit everything polled so far."""
        if not self.records.tracker.committable():
            return
        self._dlq.flush()
        self.records.commit()

    def run(
        self,
        handle: Callable[[Received[Any]], None],
        *,
        should_stop: Callable[[], bool],
        outputs: EventProducer | None = None,
        max_records: int = 500,
        timeout: float = 0.5,
    ) -> None:
        """Per-record loop: a handler exception dead-letters that record and goes on."""
        while not should_stop():
            batch = self.poll_batch(max_records, timeout)
            for rec in batch:
                try:
                    handle(rec)
                except Exception as exc:
                    self.dead_letter_failed(rec, exc)
            if outputs is not None:
                outputs.flush()
            self.commit()

    def close(self) -> None:
        try:
            self.records.close()
        finally:
            if self._own_dlq:
                self._dlq.close()


# ============================================================================== admin ==
@dataclass
class TopicState:
    spec: TopicSpec
    name: str
    exists: bool
    created: bool = False
    partitions: int = 0
    end_offsets: list[int] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)


def ensure_topics(
    settings: Settings,
    specs: Sequence[TopicSpec] = CATALOG,
    *,
    create: bool = True,
    timeout: float = 30.0,
) -> list[TopicState]:
    """Create the catalog's topics that are missing; report drift on those that exist."""
    admin = rt_admin.admin_client(settings)
    wanted = [s.wanted(settings) for s in specs]
    md, created = rt_admin.ensure_topics(
        settings, wanted, create=create, admin=admin, timeout=timeout
    )
    existing = [w.name for w in wanted if w.name in md.topics]
    configs = rt_admin.topic_configs(admin, existing, timeout)
    states = []
    for s in specs:
        name = s.name(settings)
        st = TopicState(s, name, name in md.topics, created=name in created)
        if st.exists:
            st.partitions = len(md.topics[name].partitions)
            if st.partitions != s.partitions(settings):
                st.drift.append(f"partitions {st.partitions} != catalog {s.partitions(settings)}")
            for k, want in s.configs(settings).items():
                have = configs.get(name, {}).get(k)
                if have is not None and have != want:
                    st.drift.append(f"{k}={have} != catalog {want}")
        states.append(st)
    return states
