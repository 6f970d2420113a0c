"""The one retry policy: how every part of Stormline waits before trying again.

Exponential backoff with full jitter (each wait is uniform in [0, min(max, base * 2**n)]), so
that many clients failing together do not retry together. Built on tenacity; a caller names
what to retry on and, for a bounded retry, how many attempts or how long.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import stop_base

RetryOn = Callable[[BaseException], bool]


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.25
    max_s: float = 8.0
    attempts: int | None = None  # None: no limit on attempts
    deadline_s: float | None = None  # None: no limit on time

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1 = the first)."""
        ceiling = min(self.max_s, self.base_s * 2 ** max(0, failures - 1))
        return random.uniform(0, ceiling)

    def _kwargs(self, retry_on: RetryOn, log: logging.Logger | None, what: str) -> dict[str, Any]:
        stops: list[stop_base] = []
        if self.attempts is not None:
            stops.append(stop_after_attempt(self.attempts))
        if self.deadline_s is not None:
            stops.append(stop_after_delay(self.deadline_s))

        def before_sleep(state: RetryCallState) -> None:
            if log is not None and state.outcome is not None:
                log.warning(
                    "%s failed (attempt %d: %s); retrying in %.2fs",
                    what or "call",
                    state.attempt_number,
                    state.outcome.exception(),
                    state.next_action.sleep if state.next_action else 0.0,
                )

        return {
            "stop": stop_any(*stops) if stops else stop_never,
            "wait": wait_random_exponential(multiplier=self.base_s, max=self.max_s),
            "retry": retry_if_exception(retry_on),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def retrying(
        self,
        retry_on: RetryOn,
        *,
        log: logging.Logger | None = None,
        what: str = "",
        sleep: Callable[[float], None] | None = None,
    ) -> Retrying:
        """``for attempt in policy.retrying(...): with attempt: call()`` (blocking).

        ``sleep`` replaces ``time.sleep`` between attempts, e.g. to keep serving a consumer
        group while waiting.
        """
        kwargs = self._kwargs(retry_on, log, what)
        if sleep is not None:
            kwargs["sleep"] = sleep
        return Retrying(**kwargs)

    def async_retrying(
        self, retry_on: RetryOn, *, log: logging.Logger | None = None, what: str = ""
    ) -> AsyncRetrying:
        """``async for attempt in policy.async_retrying(...): with attempt: await call()``."""
        return AsyncRetrying(**self._kwargs(retry_on, log, what))
