"""Call policy around LLM providers: retries with backoff, timeouts, circuit breakers.

Pure logic (no I/O of its own): the clock, the sleep and the random source are injected so
that tests drive them. Retries use exponential backoff with full jitter: before retry ``n``
(0-based) the caller sleeps ``uniform(0, min(max_s, base_s * 2**n))``. Only retryable
:class:`~consumers.llm.ProviderError` kinds (429, 5xx/connection, timeout) are retried.

The circuit breaker is per provider endpoint: closed -> open after ``threshold`` consecutive
retryable failures -> half-open after ``cooldown_s`` (one probe call allowed) -> closed on a
success, open again on a failure. Client errors (4xx) say nothing about provider health and
do not count.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from stormline.consumers.llm import ErrorKind, ProviderError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_s: float = 0.25
    max_s: float = 8.0

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Full-jitter delay before retry number ``retry`` (0 = the first retry)."""
        ceiling = min(self.max_s, self.base_s * (2**retry))
        return (rng or random).uniform(0.0, ceiling)


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


async def call_with_policy(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    timeout_s: float,
    outcome: CallOutcome | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn`` with a per-try timeout, retries and the breaker; raise the last error."""
    out = outcome if outcome is not None else CallOutcome()
    last: ProviderError | None = None
    for attempt in range(policy.attempts):
        if attempt:
            await sleep(policy.backoff(attempt - 1, rng))
        if not breaker.allow():
            err = ProviderError(ErrorKind.CIRCUIT_OPEN, "circuit breaker open for this provider")
            out.errors.append(str(err))
            raise err
        out.tries += 1
        try:
            result = await asyncio.wait_for(fn(), timeout_s)
        except TimeoutError:
            last = ProviderError(ErrorKind.TIMEOUT, f"no answer within {timeout_s:g}s")
        except ProviderError as exc:
            last = exc
        else:
            breaker.record_success()
            return result
        out.errors.append(str(last))
        if not last.retryable:
            breaker.release_probe()
            raise last
        breaker.record_failure()
    assert last is not None
    raise last
