"""What one attempt leaves behind: a deterministic id, one Trajectory, delivered to Kafka."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable

from confluent_kafka import KafkaError, Message

from stormline.consumers.llm import Completion
from stormline.consumers.llm.agents import AgentConfig, ProviderConfig
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.kafka import DeliveryError, EventProducer
from stormline.schemas.models import (
    Event,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
    Usage,
    stable_event_id,
)
from stormline.schemas.serde import RegistryUnavailable

log = logging.getLogger("stormline.worker")
_TRAJ_NS = uuid.UUID("5f0c2a4e-7d1b-4c55-9a63-0b6f1f1c9e21")
# A trajectory is never dropped: delivery is retried until Kafka acknowledges it.
_DELIVERY = RetryPolicy(base_s=0.5, max_s=10.0)


def trajectory_id(task_id: str, attempt: int) -> str:
    """Deterministic per attempt, so a duplicate can always be recognised downstream."""
    return str(uuid.uuid5(_TRAJ_NS, f"{task_id}/{attempt}"))


def trajectory_event_id(task_id: str, attempt: int) -> uuid.UUID:
    """The event id of the attempt's Trajectory: every copy (a re-send) has the same one."""
    return stable_event_id("trajectory", task_id, attempt)


def trajectory(
    a: TaskAssigned,
    *,
    status: TrajectoryStatus,
    agent: AgentConfig | None = None,
    cfg: ProviderConfig | None = None,
    completion: Completion | None = None,
    error: str | None = None,
    latency_ms: float = 0.0,
) -> Trajectory:
    """The Trajectory of assignment ``a``: the completion's, else the provider's identity."""
    named = cfg or agent
    return Trajectory(
        event_id=trajectory_event_id(a.task_id, a.attempt),
        task_id=a.task_id,
        trajectory_id=trajectory_id(a.task_id, a.attempt),
        attempt=a.attempt,
        agent_id=a.agent_id,
        task_type=a.task.task_type,
        provider=completion.provider if completion else (named.provider if named else ""),
        model=completion.model if completion else (named.model if named else ""),
        policy_version=a.policy_version,
        steps=completion.steps if completion else [],
        output=completion.output if completion else None,
        status=status,
        error=error,
        usage=completion.usage if completion else Usage(),
        latency_ms=latency_ms,
        expected=a.task.expected,
        evaluator=a.task.evaluator,
    )


class Acks:
    """Kafka's acknowledgements of produced events, handed to the event loop in bursts.

    The producer's poll thread reports each delivery. A future per record from another
    thread (``asyncio.wrap_future``) wakes the loop once per record: a self-pipe write and a
    callback each. Here the reports queue up, and one wake-up resolves every report that came
    in meanwhile (one per ``poll`` of the producer, for all the records it delivered).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reports: collections.deque[tuple[asyncio.Future[None], str | None]] = (
            collections.deque()
        )
        self._woken = False

    def sent(
        self, out: EventProducer, event: Event, *, topic: str | None, key: str | None
    ) -> asyncio.Future[None]:
        """Produce ``event``; the future resolves when Kafka acknowledged it (or raises
        :class:`DeliveryError`)."""
        fut = self._loop.create_future()

        def delivered(err: KafkaError | None, _msg: Message) -> None:  # the poll thread
            self._reports.append((fut, None if err is None else str(err)))
            if not self._woken:
                self._woken = True
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self._loop.call_soon_threadsafe(self._resolve)

        out.produce(event, topic=topic, key=key, on_delivery=delivered)
        return fut

    def _resolve(self) -> None:
        # Cleared before the queue is read: a report queued after this line wakes again.
        self._woken = False
        while self._reports:
            fut, err = self._reports.popleft()
            if fut.done():  # its task was cancelled (a drain hands it back)
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(DeliveryError(err))


def _undelivered(exc: BaseException) -> bool:
    # The registry down: the event cannot be encoded yet; it will be once the registry is back.
    return isinstance(exc, DeliveryError | RegistryUnavailable)


async def deliver(
    out: EventProducer,
    event: Event | Callable[[], Event],
    *,
    what: str = "",
    topic: str | None = None,
    key: str | None = None,
    acks: Acks | None = None,
) -> None:
    """Produce ``event`` (or what ``event()`` builds, again on each try) and wait for Kafka's
    acknowledgement, retrying until it comes (the one retry policy's backoff between tries).
    ``acks``: the acknowledgements come in bursts (:class:`Acks`) instead of one future each."""
    failures = 0
    while True:
        try:
            ev = event if isinstance(event, Event) else event()
            if acks is None:
                await asyncio.wrap_future(out.send(ev, topic=topic, key=key))
            else:
                await acks.sent(out, ev, topic=topic, key=key)
            return
        except Exception as exc:
            if not _undelivered(exc):
                raise
            failures += 1
            wait = _DELIVERY.backoff(failures)
            if not what and isinstance(event, Trajectory):
                what = f"delivery of the trajectory of task {event.task_id}"
            log.warning(
                "%s failed (attempt %d: %s); retrying in %.2fs",
                what or "delivery",
                failures,
                exc,
                wait,
            )
            await asyncio.sleep(wait)
