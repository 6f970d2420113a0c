"""Call policy around LLM providers: retries with backoff, timeouts, circuit breakers.

Retries follow the one retry policy of the project (:class:`stormline.runtime.retry.RetryPolicy`:
exponential backoff with full jitter, the wait after the ``n``-th consecutive failure uniform
in ``[0, min(max_s, base_s * 2**(n-1))]``); :class:`RetryPolicy` here is that policy as LLM
callers configure it, attempts first. Only retryable :class:`~consumers.llm.ProviderError`
kinds (429, 5xx/connection, timeout) are retried. The sleep is injectable so that tests drive
it.

A 429 that says when to come back (``Retry-After`` or the providers' rate-limit headers,
:attr:`~consumers.llm.ProviderError.retry_after_s`) is not a failure of the provider and burns
no try: the call waits that long and goes again within the same try, as often as needed, but
never past ``deadline`` (the assignment's expiry: then it fails, final). A :class:`Throttle`
(the worker's shared budget in Redis) is asked before every request and told of every such
wait, so that every worker calling that provider waits too. A bare 429 (no headers) is a
retryable error like a 5xx.

The circuit breaker is per provider endpoint: closed -> open after ``threshold`` consecutive
retryable failures -> half-open after ``cooldown_s`` (one probe call allowed) -> closed on a
success, open again on a failure. Client errors (4xx) say nothing about provider health and
do not count, nor do 429s with a wait (the provider is up, only busy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from stormline.consumers.llm import ErrorKind, ProviderError
from stormline.consumers.llm.ratelimits import within
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

    tries: int = 0  # requests sent
    errors: list[str] = field(default_factory=list)
    rate_limited: int = 0  # of them, 429s that said when to come back (no try burnt)
    waited_s: float = 0.0  # time spent waiting for them


class Throttle(Protocol):
    """A budget shared by every caller of one provider (the worker's: Redis)."""

    async def acquire(self, deadline: float | None) -> None:
        """Wait until the budget allows one request; raise a final ProviderError when that
        would be after ``deadline`` (monotonic seconds)."""
        ...

    async def hold(self, seconds: float) -> float:
        """A 429 asked for ``seconds``: make every caller wait; return this caller's wait."""
        ...


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
    if err.rate_limit_hint is not None:
        breaker.release_probe()  # busy, not down: says nothing about health
        raise err
    out.errors.append(str(err))
    if err.retryable:
        breaker.record_failure()
    else:
        breaker.release_probe()
    raise err


@dataclass
class _Waits:
    """How one try waits for the budget and for the 429s that say when to come back."""

    throttle: Throttle | None
    deadline: float | None
    sleep: Callable[[float], Awaitable[None]]
    clock: Callable[[], float]


async def _try_riding_429s(
    fn: Callable[[], Awaitable[T]],
    breaker: CircuitBreaker,
    timeout_s: float,
    out: CallOutcome,
    waits: _Waits,
) -> T:
    """One try: budget, request; a 429 with a wait waits (shared) and goes again."""
    while True:
        if waits.throttle is not None:
            try:
                await waits.throttle.acquire(waits.deadline)
            except ProviderError as err:
                out.errors.append(str(err))
                raise
        try:
            return await _one_try(fn, breaker, timeout_s, out)
        except ProviderError as err:
            hint = err.rate_limit_hint
            if hint is None:
                raise
            wait = await waits.throttle.hold(hint) if waits.throttle is not None else hint
            wait = max(wait, hint)
            if not within(wait, waits.clock(), waits.deadline):
                msg = f"{err}; waiting {wait:.3g} s would end after the assignment expires"
                out.errors.append(msg)
                raise ProviderError(
                    ErrorKind.RATE_LIMIT, msg, err.status, retry_after_s=wait, final=True
                ) from None
            out.rate_limited += 1
            out.waited_s += wait
            await waits.sleep(wait)


async def call_with_policy(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: retry.RetryPolicy,
    breaker: CircuitBreaker,
    timeout_s: float,
    outcome: CallOutcome | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    throttle: Throttle | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``fn`` with a per-try timeout, retries and the breaker; raise the last error.

    ``throttle`` is asked before every request and told of every 429 wait; ``deadline``
    (``clock`` seconds, monotonic) bounds those waits.
    """
    out = outcome if outcome is not None else CallOutcome()
    waits = _Waits(throttle, deadline, sleep, clock)
    tries = policy.async_retrying(_retryable).copy(sleep=sleep)
    async for attempt in tries:
        with attempt:
            return await _try_riding_429s(fn, breaker, timeout_s, out, waits)
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
