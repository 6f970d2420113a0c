"""Call policy around LLM providers: retries with backoff, timeouts, circuit breakers.

Retries follow the one retry policy of the project (:class:`stormline.runtime.retry.RetryPolicy`:
exponential backoff with full jitter, the wait after the ``n``-th consecutive failure uniform
in ``[0, min(max_s, base_s * 2**(n-1))]``); :class:`RetryPolicy` here is that policy as LLM
callers configure it, attempts first. Only retryable :class:`~consumers.llm.ProviderError`
kinds (429, 5xx/connection, timeout) are retried. The sleep is injectable so that tests drive
it.

The circuit breaker is per provider endpoint: closed -> open after ``threshold`` consecutive
retryable failures -> half-open after ``cooldown_s`` (one probe call allowed) -> closed on a
success, open again on a failure. Client errors (4xx) say nothing about provider health and
do not count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from stormline.consumers.llm import ErrorKind, ProviderError
from stormline.runtime import retry

T = TypeVar("T")


class RetryPolicy(retry.RetryPolicy):
    """The one retry policy, bounded by attempts (``STORMLINE_LLM_RETRY_ATTEMPTS``).

    Positional order as the LLM settings read: ``RetryPolicy(attempts, base_s, max_s)``.
    """

    def __init__(self, attempts: int = 3, base_s: float = 0.25, max_s: float = 8.0) -> None:
        super().__init__(base_s=base_s, max_s=max_s, attempts=max(1, attempts))


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    threshold: int = 5
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _state: BreakerState = BreakerState.CLOSED
    _failures: int = 0
    _opened_at: float = 0.0
    _probing: bool = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """May a call go out now? In half-open, exactly one probe is let through."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self.clock()
            self._probing = False

    def release_probe(self) -> None:
        """A probe ended without a verdict on health (e.g. a client error): allow another."""
        self._probing = False


@dataclass
class CallOutcome:
    """What happened across the tries of one call (kept for the trajectory)."""

    tries: int = 0
    errors: list[str] = field(default_factory=list)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


async def _one_try(
    fn: Callable[[], Awaitable[T]], breaker: CircuitBreaker, timeout_s: float, out: CallOutcome
) -> T:
    """One try through the breaker and the timeout; the breaker learns its verdict."""
    if not breaker.allow():
        err = ProviderError(ErrorKind.CIRCUIT_OPEN, "circuit breaker open for this provider")
        out.errors.append(str(err))
        raise err
    out.tries += 1
    try:
        result = await asyncio.wait_for(fn(), timeout_s)
    except TimeoutError:
        err = ProviderError(ErrorKind.TIMEOUT, f"no answer within {timeout_s:g}s")
    except ProviderError as exc:
        err = exc
    else:
        breaker.record_success()
        return result
    out.errors.append(str(err))
    if err.retryable:
        breaker.record_failure()
    else:
        breaker.release_probe()
    raise err


async def call_with_policy(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: retry.RetryPolicy,
    breaker: CircuitBreaker,
    timeout_s: float,
    outcome: CallOutcome | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``fn`` with a per-try timeout, retries and the breaker; raise the last error."""
    out = outcome if outcome is not None else CallOutcome()
    tries = policy.async_retrying(_retryable).copy(sleep=sleep)
    async for attempt in tries:
        with attempt:
            return await _one_try(fn, breaker, timeout_s, out)
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
