"""The byte-level producer: idempotent, acks=all, murmur2, delivery errors that raise.

``produce`` queues a record (serving delivery callbacks while the local queue is full);
``flush`` raises :class:`DeliveryError` if anything queued since the last flush was not
delivered; ``send`` returns a future per record (served by :meth:`RecordProducer.start`'s
poll thread). Thread-safe. The typed layer over it is ``stormline.schemas.kafka``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from stormline.runtime.connection import client_logger, confluent_config
from stormline.runtime.partitioning import PARTITIONER
from stormline.settings import Settings

OnDelivery = Callable[[KafkaError | None, Message], None]


class DeliveryError(RuntimeError):
    pass


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return confluent_config(
        settings,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            # The Java client's partitioner (and Faust's): a key lands on the same partition
            # whichever Stormline process or client produced it.
            "partitioner": PARTITIONER,
            "message.max.bytes": max(settings.max_record_bytes * 2, 1_048_576),
            **overrides,
        },
    )


class RecordProducer:
    """Bytes to topics; delivery checked on :meth:`flush` (or per record with :meth:`send`)."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.settings = settings
        self._producer = Producer(producer_config(settings, **overrides), logger=client_logger())
        self._failed: list[str] = []
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()

    def produce(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        on_delivery: OnDelivery | None = None,
        **kw: Any,
    ) -> None:
        """Queue one record; a failed delivery is raised by the next :meth:`flush`."""

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                with self._lock:
                    self._failed.append(f"{topic}: {err}")
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered, **kw)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve callbacks, then retry

    def send(
        self, topic: str, value: bytes | str | None, key: bytes | str | None = None, **kw: Any
    ) -> Future[Message]:
        """Like :meth:`produce`, with a future resolved on delivery (needs :meth:`start`)."""
        fut: Future[Message] = Future()

        def done(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                fut.set_result(msg)
            else:
                fut.set_exception(DeliveryError(str(err)))

        self.produce(topic, value, key, on_delivery=done, **kw)
        return fut

    def start(self) -> RecordProducer:
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

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.flush(timeout)
        finally:
            self._closing.set()
            if self._poller is not None:
                self._poller.join(timeout=2)
