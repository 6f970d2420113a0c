"""What one attempt leaves behind: a deterministic id, one Trajectory, delivered to Kafka."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

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
) -> None:
    """Produce ``event`` (or what ``event()`` builds, again on each try) and wait for Kafka's
    acknowledgement, retrying until it comes."""
    if isinstance(event, Trajectory):
        what = what or f"delivery of the trajectory of task {event.task_id}"
    retrying = _DELIVERY.async_retrying(_undelivered, log=log, what=what or "delivery")
    async for attempt in retrying:
        with attempt:
            ev = event if isinstance(event, Event) else event()
            await asyncio.wrap_future(out.send(ev, topic=topic, key=key))
