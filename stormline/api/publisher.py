"""Tasks onto Kafka from the event loop: a batch is acknowledged when the brokers hold all of it.

The app's one :class:`~stormline.schemas.kafka.EventProducer` (idempotent, ``acks=all``)
serves every request; a request waits on one future for its whole batch, resolved by the
producer's poll thread when the last delivery report arrives, so requests do not wait on each
other's records the way a shared ``flush`` would make them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

from confluent_kafka import KafkaError, Message

from stormline import metrics, tracing
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import DeliveryError, EventProducer
from stormline.schemas.models import TaskSubmitted
from stormline.settings import Settings


class PartialDelivery(DeliveryError):
    """Some records of a batch were not acknowledged; ``delivered`` names those that were."""

    def __init__(self, failed: list[str], delivered: list[str], first: str) -> None:
        super().__init__(f"{len(failed)} of {len(failed) + len(delivered)} tasks failed: {first}")
        self.failed, self.delivered = failed, delivered


class BatchPublisher:
    def __init__(self, settings: Settings, producer: EventProducer) -> None:
        self.topic = TASKS.name(settings)
        self.producer = producer.start()
        tracing.setup(settings, "api")  # the API process's tracing, as its settings say

    async def publish(self, tasks: list[TaskSubmitted], timeout: float = 30.0) -> None:
        """Return once every task is acknowledged; raise PartialDelivery otherwise."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        lock = threading.Lock()
        left = [len(tasks)]
        failed: dict[str, str] = {}

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def delivered(err: KafkaError | None, msg: Message) -> None:
            # Runs on the poll thread (or this one, when produce had to wait for room).
            with lock:
                if err is not None:
                    key = msg.key()
                    failed[key.decode() if isinstance(key, bytes) else str(key)] = str(err)
                left[0] -= 1
                last = left[0] == 0
            if last:
                loop.call_soon_threadsafe(resolve)

        # One trace per request: its tasks' spans, publish to reward, are under this one.
        with tracing.root("stormline.publish", {"stormline.tasks": len(tasks)}):
            for task in tasks:
                self.producer.produce(task, topic=self.topic, on_delivery=delivered)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError as exc:
            raise DeliveryError(
                f"the brokers did not acknowledge {left[0]} of {len(tasks)} tasks within "
                f"{timeout:.0f}s"
            ) from exc
        published = Counter(t.task_type for t in tasks if t.task_id not in failed)
        for task_type, n in published.items():
            metrics.TASKS_SUBMITTED.labels(task_type).inc(n)
        if failed:
            ok = [t.task_id for t in tasks if t.task_id not in failed]
            raise PartialDelivery(list(failed), ok, next(iter(failed.values())))
