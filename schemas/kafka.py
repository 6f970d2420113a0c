"""The Kafka edge for events: typed producer, batch consumer with dead letters, topic admin.

Every Stormline process that is not the Faust router talks to Kafka through these three
classes, so that framing, delivery checks, dead-lettering and commit discipline are written
once:

* :class:`EventProducer` produces a model to its catalog topic under its key; ``flush``
  raises if anything was not delivered.
* :class:`EventConsumer` polls batches, decodes them, sends what cannot be decoded or
  validated (or is too large) to ``dead-letters`` with the reason, and commits offsets only
  when the caller says the batch is done and the dead letters are delivered.
* :func:`ensure_topics` creates the catalog's topics idempotently and reports drift.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from stormline.schemas.catalog import CATALOG, DEAD_LETTERS, TopicSpec, spec_for
from stormline.schemas.models import DeadLetter, Event
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings

log = logging.getLogger("stormline.kafka")
E = TypeVar("E", bound=Event)


def client_logger() -> logging.Logger:
    """librdkafka's own log lines, routed through Python logging at WARNING and above."""
    lg = logging.getLogger("stormline.librdkafka")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.ERROR)
    return lg


class DeliveryError(RuntimeError):
    pass


# =========================================================================== producer ==
class EventProducer:
    """Idempotent producer of events. Thread-safe; ``send`` returns a future per record."""

    def __init__(self, settings: Settings, serde: Serde, **overrides: Any) -> None:
        self.settings = settings
        self.serde = serde
        conf = {
            **settings.kafka_client_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            # The Java client's partitioner (and Faust's): a key lands on the same partition
            # whichever Stormline process or client produced it.
            "partitioner": "murmur2_random",
            "message.max.bytes": max(settings.max_record_bytes * 2, 1_048_576),
            **overrides,
        }
        self._producer = Producer(conf, logger=client_logger())
        self._failed: list[str] = []
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()

    def topic_of(self, event: Event) -> str:
        return spec_for(event).name(self.settings)

    def produce(
        self,
        event: Event,
        *,
        key: str | None = None,
        topic: str | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Queue ``event`` for its catalog topic (or ``topic``); delivery is checked on flush."""
        topic = topic or self.topic_of(event)
        value = self.serde.encode(topic, event)

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                with self._lock:
                    self._failed.append(f"{topic}: {err}")
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key if key is not None else event.key(),
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve callbacks, then retry

    def send(
        self, event: Event, *, key: str | None = None, topic: str | None = None
    ) -> Future[Message]:
        """Like :meth:`produce`, with a future resolved on delivery (needs :meth:`start`)."""
        fut: Future[Message] = Future()

        def done(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                fut.set_result(msg)
            else:
                fut.set_exception(DeliveryError(str(err)))

        self.produce(event, key=key, topic=topic, on_delivery=done)
        return fut

    def start(self) -> EventProducer:
        """Serve delivery callbacks from a background thread (for ``send`` futures)."""
        if self._poller is None:
            self._poller = threading.Thread(
                target=self._poll_loop, name="producer-poll", daemon=True
            )
            self._poller.start()
        return self

    def _poll_loop(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.05)

    def poll(self, timeout: float = 0) -> None:
        self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued is delivered; raise if any record was not."""
        remaining = self._producer.flush(timeout)
        with self._lock:
            failed, self._failed = self._failed, []
        if remaining:
            raise DeliveryError(
                f"{remaining} records not delivered within {timeout:.0f}s "
                f"(is Kafka at {self.settings.bootstrap_servers} reachable?)"
            )
        if failed:
            raise DeliveryError(f"{len(failed)} records failed delivery; first: {failed[0]}")

    def publish(self, events: Iterable[Event], timeout: float = 30.0) -> int:
        """Produce ``events`` and wait for every delivery; returns how many."""
        n = 0
        for ev in events:
            self.produce(ev)
            n += 1
            if n % 1000 == 0:
                self._producer.poll(0)
        self.flush(timeout)
        return n

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.flush(timeout)
        finally:
            self._closing.set()
            if self._poller is not None:
                self._poller.join(timeout=2)


# =========================================================================== consumer ==
@dataclass(frozen=True)
class Received(Generic[E]):
    topic: str
    partition: int
    offset: int
    key: str | None
    event: E
    timestamp_ms: int


@dataclass
class Batch:
    records: list[Received[Any]] = field(default_factory=list)
    dead: int = 0
    # Next offset to commit per (topic, partition): covers good and dead-lettered records.
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.records)


class EventConsumer:
    """Consumes catalog topics in batches; bad records go to dead-letters, never stop it.

    Offsets are stored and committed only by :meth:`commit`, which the caller invokes after
    its handler succeeded and its outputs were delivered. A crash before that redelivers
    the batch (at least once); idempotent handlers make that exactly once in effect.
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
        conf = {
            **settings.kafka_client_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": offset_reset,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "partition.assignment.strategy": "cooperative-sticky",
            **overrides,
        }
        self._consumer = Consumer(conf, logger=client_logger())
        self._consumer.subscribe(list(self._specs))
        self._pending: dict[tuple[str, int], int] = {}

    @property
    def raw(self) -> Consumer:
        return self._consumer

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> Batch:
        batch = Batch()
        for msg in self._consumer.consume(max_records, timeout):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                    if err.fatal():
                        raise KafkaException(err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            batch.positions[(topic, partition)] = offset + 1
            try:
                event = self._decode(msg)
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
                )
            )
        self._pending.update(batch.positions)
        return batch

    def _decode(self, msg: Message) -> Event:
        value = msg.value()
        limit = self.settings.max_record_bytes
        if value is not None and len(value) > limit:
            raise DecodeError(
                "oversize",
                f"record of {len(value)} bytes exceeds STORMLINE_MAX_RECORD_BYTES={limit}",
            )
        spec = self._specs[msg.topic()]
        return self.serde.decode(value, spec.event)

    def dead_letter(self, msg: Message, kind: str, error: str) -> None:
        value = msg.value()
        # Keep the dead letter itself well under the size limit, or reading dead-letters
        # back would dead-letter it again.
        keep = self.settings.max_record_bytes // 2
        if value is not None and len(value) > keep:
            error = f"{error} (raw_value keeps the first {keep} of {len(value)} bytes)"
            value = value[:keep]
        self._send_dead_letter(
            msg.topic(), msg.partition(), msg.offset(), msg.key(), value, kind, error
        )

    def _send_dead_letter(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        kind: str,
        error: str,
    ) -> None:
        log.warning("dead letter %s[%d]@%d: %s: %s", topic, partition, offset, kind, error)
        if topic == DEAD_LETTERS.name(self.settings):
            return  # never re-dead-letter a dead letter: logged and skipped instead
        letter = DeadLetter(
            source_topic=topic,
            partition=partition,
            offset=offset,
            raw_key=key,
            raw_value=value,
            error_kind=kind,
            error=error[:10_000],
            consumer_group=self.group_id,
        )
        self._dlq.produce(
            letter,
            topic=DEAD_LETTERS.name(self.settings),
            key=key.decode("utf-8", "replace") if key else "",
        )

    def forget(self, partitions: Iterable[tuple[str, int]] | None = None) -> None:
        """Drop uncommitted positions (all, or of ``partitions``) so they are read again."""
        if partitions is None:
            self._pending.clear()
            return
        for key in partitions:
            self._pending.pop(key, None)

    def commit(self) -> None:
        """Deliver pending dead letters, then commit everything polled so far."""
        if not self._pending:
            return
        self._dlq.flush()
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code in _COORDINATOR_AWAY:
                # The broker (or its group coordinator) is restarting: keep the positions and
                # commit them with the next batch instead of stopping the consumer.
                log.info("commit postponed, no group coordinator yet: %s", exc)
                return
            # A rebalance took the partitions: the new owner re-reads from the last commit.
            if code not in (
                KafkaError.REBALANCE_IN_PROGRESS,
                KafkaError.ILLEGAL_GENERATION,
                KafkaError.UNKNOWN_MEMBER_ID,
                KafkaError._NO_OFFSET,
            ):
                raise
            log.info("commit skipped after rebalance: %s", exc)
        self._pending.clear()

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

    def dead_letter_failed(self, rec: Received[Any], exc: Exception) -> None:
        """Send a decoded record whose handling failed to dead-letters, with the error."""
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self._send_dead_letter(
            rec.topic,
            rec.partition,
            rec.offset,
            rec.key.encode() if rec.key else None,
            self.serde.encode(rec.topic, rec.event),
            "handler",
            detail,
        )

    def close(self) -> None:
        try:
            self._consumer.close()
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


_COORDINATOR_AWAY = {
    KafkaError._WAIT_COORD,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REQUEST_TIMED_OUT,
}


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_client_config(), logger=client_logger())


def ensure_topics(
    settings: Settings,
    specs: Sequence[TopicSpec] = CATALOG,
    *,
    create: bool = True,
    timeout: float = 30.0,
) -> list[TopicState]:
    """Create the catalog's topics that are missing; report drift on those that exist."""
    admin = admin_client(settings)
    md = admin.list_topics(timeout=timeout)
    missing = [s for s in specs if s.name(settings) not in md.topics]
    if create and missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name(settings),
                    s.partitions(settings),
                    1 if _single(md) else 3,
                    config=s.configs(settings),
                )
                for s in missing
            ],
            request_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            log.info("created topic %s", name)
        time.sleep(0.2)
        md = admin.list_topics(timeout=timeout)
    states = []
    existing = [s for s in specs if s.name(settings) in md.topics]
    configs = _describe(admin, [s.name(settings) for s in existing], timeout)
    for s in specs:
        name = s.name(settings)
        st = TopicState(s, name, name in md.topics, created=create and s in missing)
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


def _single(md: Any) -> bool:
    return len(md.brokers) < 3


def _describe(admin: AdminClient, names: list[str], timeout: float) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    out: dict[str, dict[str, str]] = {}
    futures = admin.describe_configs(
        [ConfigResource("topic", n) for n in names], request_timeout=timeout
    )
    for res, fut in futures.items():
        out[res.name] = {k: v.value for k, v in fut.result(timeout).items()}
    return out


def end_offsets(
    settings: Settings,
    topic: str,
    partitions: int,
    admin: AdminClient | None = None,
    retries: int = 20,
) -> list[int]:
    """High watermarks of ``topic``'s partitions (retried while leaders are being elected)."""
    from confluent_kafka.admin import OffsetSpec

    admin = admin or admin_client(settings)
    request = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)}
    for attempt in range(retries):
        try:
            futures = admin.list_offsets(request, request_timeout=10)
            return [futures[tp].result().offset for tp in request]
        except KafkaException:
            if attempt == retries - 1:
                raise
            time.sleep(0.25)
    return []
