"""The stages of one assignment, each with one job; :mod:`.pipeline` puts them in order.

Every stage that needs Redis goes through :class:`~stormline.state.RedisState` and survives
it being down (then: nothing recorded, nothing cached, no limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime

from stormline import metrics, tracing
from stormline.consumers.llm import (
    Completion,
    CompletionRequest,
    ErrorKind,
    LLMProvider,
    ProviderError,
)
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.ratelimits import estimate_tokens, within
from stormline.consumers.llm.resilience import (
    CallOutcome,
    CircuitBreaker,
    RetryPolicy,
    Throttle,
    call_with_policy,
)
from stormline.consumers.worker.stats import WorkerStats
from stormline.consumers.worker.trajectories import trajectory_event_id
from stormline.schemas.models import TaskAssigned, Trajectory
from stormline.state import BudgetAsk, CachedResponse, HotPath, RedisState


class Idempotency:
    """A Trajectory recorded for (task, attempt) is the answer: re-sent, never recomputed."""

    def __init__(self, hot: HotPath, stats: WorkerStats) -> None:
        self.hot = hot
        self.stats = stats

    async def recorded(self, a: TaskAssigned) -> Trajectory | None:
        """The recorded Trajectory, if any (:class:`~stormline.state.UnreadableRecord` if it
        cannot be read: the caller dead-letters the assignment rather than pay again)."""
        traj = (await self.hot.begin(a.task_id, a.attempt, running_for=None)).recorded
        return None if traj is None else self.resend(a, traj)

    def resend(self, a: TaskAssigned, traj: Trajectory) -> Trajectory:
        self.stats.resent += 1
        # Records of older workers carry a random event id; every copy gets the stable one.
        return traj.model_copy(update={"event_id": trajectory_event_id(a.task_id, a.attempt)})


class Recorder:
    """The one Trajectory that counts for the attempt, and its result fields in the task's
    status (``running`` is written with the attempt's first call, :meth:`HotPath.begin`)."""

    def __init__(self, hot: HotPath) -> None:
        self.hot = hot

    async def record(self, traj: Trajectory) -> Trajectory:
        """Record ``traj`` (unless another was first) and its result fields; return the one
        recorded."""
        # The final state (succeeded/failed) is the router's to write (contracts.md): only it
        # knows whether this attempt's result counts.
        return await self.hot.finish(traj)


class ResponseCache:
    """Answers to identical requests, for ``STORMLINE_RESPONSE_CACHE_TTL_S`` (0: off)."""

    def __init__(self, hot: HotPath, ttl_s: int, stats: WorkerStats) -> None:
        self.hot = hot
        self.ttl_s = ttl_s
        self.stats = stats

    @staticmethod
    def key(cfg: ProviderConfig, req: CompletionRequest) -> str:
        ident = json.dumps(
            [cfg.key, req.model, req.system_prompt, req.prompt, req.temperature, req.max_tokens]
        )
        return hashlib.sha256(ident.encode()).hexdigest()

    def key_if_on(self, cfg: ProviderConfig, req: CompletionRequest) -> str | None:
        return self.key(cfg, req) if self.ttl_s else None

    async def get(self, cfg: ProviderConfig, req: CompletionRequest) -> CachedResponse | None:
        if not self.ttl_s:
            return None
        return await self.hot.cached_response(self.key(cfg, req))

    def served(self, hit: CachedResponse) -> Completion:
        self.stats.cache_hits += 1
        return Completion(
            output=hit.output,
            provider=hit.provider,
            model=hit.model,
            steps=hit.steps,
            usage=hit.usage,
        )

    async def put(self, cfg: ProviderConfig, req: CompletionRequest, comp: Completion) -> None:
        """Written behind, with the attempt's record: nothing waits for it."""
        if self.ttl_s:
            await self.hot.cache_response(self.key(cfg, req), comp, self.ttl_s)


class RateLimit:
    """Each provider's budget, shared by every worker in Redis (on Redis' clock): requests/s
    (``STORMLINE_PROVIDER_RATE_LIMITS``), tokens/minute (``STORMLINE_PROVIDER_TOKEN_LIMITS``:
    a call reserves its prompt/4 + max_tokens, and is charged more if its usage says so), and
    the waits providers ask for with a 429 (``Retry-After``, rate-limit headers): such a 429
    pushes the budget back, so every worker waits until then. Asked before every try; the
    first try's ask can ride the attempt's first Redis call (:meth:`ProviderThrottle.ask_first`).

    A provider with neither limit costs no Redis call, until this worker sees a 429 from it
    that says when to come back; from then on (for ``HOT_S``) it asks too.
    """

    HOT_S = 60.0

    def __init__(
        self,
        state: RedisState | HotPath,
        limits: dict[str, float],
        token_limits: dict[str, float],
    ) -> None:
        self.state = state.state if isinstance(state, HotPath) else state
        self.limits = limits
        self.token_limits = token_limits
        self.hot_until: dict[str, float] = {}

    def throttle(self, cfg: ProviderConfig, req: CompletionRequest) -> ProviderThrottle:
        return ProviderThrottle(self, cfg, req)


class ProviderThrottle:
    """:class:`~stormline.consumers.llm.resilience.Throttle` of one call to one provider."""

    def __init__(self, rl: RateLimit, cfg: ProviderConfig, req: CompletionRequest) -> None:
        self.rl, self.key = rl, cfg.key
        self.rps = rl.limits.get(cfg.key, rl.limits.get(cfg.provider, 0.0))
        self.tpm = rl.token_limits.get(cfg.key, rl.token_limits.get(cfg.provider, 0.0))
        self.estimate = estimate_tokens(req.prompt, req.system_prompt, req.max_tokens)
        self.reserved = 0  # tokens this call holds in the budget
        self._first: float | None = None  # the answer to ask_first, until acquire uses it

    def _limited(self) -> bool:
        hot = self.rl.hot_until.get(self.key, 0.0) > time.monotonic()
        return bool(self.rps or self.tpm or hot)

    def ask_first(self) -> BudgetAsk | None:
        """The first try's take, to be asked with the attempt's first Redis call right
        before the call (the caller holds its slot); None: this provider has no budget."""
        if not self._limited():
            return None
        return BudgetAsk(self.key, self.rps, self.tpm, self.estimate if self.tpm else 0)

    def answered(self, wait: float | None) -> None:
        """What the budget said to :meth:`ask_first` (None: Redis did not answer, so there
        is no shared budget, as with take_budget)."""
        self._first = wait or 0.0

    async def acquire(self, deadline: float | None) -> None:
        wait, self._first = self._first, None
        if wait is None:
            if not self._limited():
                return
            wait = await self._take()
        # Not a backoff: the budget says how long until there is room.
        while wait:
            if not within(wait, time.monotonic(), deadline):
                raise ProviderError(
                    ErrorKind.RATE_LIMIT,
                    f"the shared budget of {self.key} has room in {wait:.3g} s, after the "
                    "assignment expires",
                    final=True,
                )
            await asyncio.sleep(wait)
            wait = await self._take()
        self.reserved = self.estimate if self.tpm else 0

    async def _take(self) -> float:
        tokens = self.estimate if self.tpm else 0
        return await self.rl.state.take_budget(self.key, rps=self.rps, tpm=self.tpm, tokens=tokens)

    async def hold(self, seconds: float) -> float:
        self.rl.hot_until[self.key] = time.monotonic() + self.rl.HOT_S
        refund, self.reserved = -self.reserved, 0  # the provider did not count a 429
        wait = await self.rl.state.take_budget(
            self.key, rps=self.rps, tpm=self.tpm, tokens=refund, hold_s=seconds, take=False
        )
        return max(wait, seconds)  # Redis down: this worker still waits

    async def settle(self, comp: Completion) -> None:
        """Charge what the answer used beyond the reservation (never a refund: providers count
        max_tokens up front too)."""
        extra = comp.usage.prompt_tokens + comp.usage.completion_tokens - self.reserved
        if self.tpm and self.reserved and extra > 0:
            await self.rl.state.take_budget(self.key, tpm=self.tpm, tokens=extra, take=False)


class AttemptExpired(Exception):
    """The assignment expired before its call went out: the router reassigns it, so the call
    would be paid twice. Raised right before the call (after the slot and rate-limit waits)."""


class CallFailed(Exception):
    """A provider gave no answer after its tries: ``summary`` for the trajectory."""

    def __init__(self, error: ProviderError, summary: str) -> None:
        super().__init__(summary)
        self.error = error
        self.summary = summary


class GuardedCall:
    """One provider call with per-try timeout, retries and the provider's circuit breaker."""

    def __init__(
        self, policy: RetryPolicy, breakers: dict[str, CircuitBreaker], stats: WorkerStats
    ) -> None:
        self.policy = policy
        self.breakers = breakers
        self.stats = stats

    async def __call__(
        self,
        cfg: ProviderConfig,
        provider: LLMProvider,
        req: CompletionRequest,
        expires_at: datetime | None = None,
        throttle: Throttle | None = None,
    ) -> Completion:
        """The completion; :class:`CallFailed` after the tries; :class:`AttemptExpired` when
        ``expires_at`` passed before a try went out. ``throttle`` (the rate limit) is asked
        before each try; 429 waits end before ``expires_at``."""
        outcome = CallOutcome()
        deadline = None
        if expires_at is not None:
            deadline = time.monotonic() + (expires_at - datetime.now(UTC)).total_seconds()
        try:
            return await call_with_policy(
                lambda: self._counted(provider, req, expires_at),
                policy=self.policy,
                breaker=self.breakers[cfg.key],
                timeout_s=cfg.timeout_s,
                outcome=outcome,
                throttle=throttle,
                deadline=deadline,
            )
        except ProviderError as exc:
            summary = f"{cfg.provider} {cfg.model}: {outcome.tries} tries: " + " | ".join(
                outcome.errors
            )
            raise CallFailed(exc, summary) from exc
        finally:
            if outcome.tries > 1:
                metrics.LLM_RETRIES.labels(req.agent_id, cfg.provider).inc(outcome.tries - 1)

    async def _counted(
        self, provider: LLMProvider, req: CompletionRequest, expires_at: datetime | None
    ) -> Completion:
        if expires_at is not None and datetime.now(UTC) >= expires_at:
            self.stats.expired_skipped += 1
            metrics.EXPIRED.labels("not_called").inc()
            raise AttemptExpired(f"assignment expired at {expires_at.isoformat()}")
        self.stats.llm_calls += 1
        try:
            with (
                tracing.llm_call(provider.name, req.model) as span,  # GenAI conventions
                metrics.llm_call(req.agent_id, cfg_kind(provider), req.timeout_s) as counted,
            ):
                comp = await provider.complete(req)
                u = comp.usage
                tracing.llm_usage(span, u.prompt_tokens, u.completion_tokens)
                counted.usage(u.prompt_tokens, u.completion_tokens, u.cost_usd)
            return comp
        except (ProviderError, TimeoutError):
            raise
        except Exception as exc:
            # An answer the provider's code could not read (outside its SDK's error handler):
            # a trajectory with the reason, like any client error; retrying will not help.
            detail = f"unreadable answer: {type(exc).__name__}: {str(exc)[:500]}"
            raise ProviderError(ErrorKind.CLIENT, detail) from exc
        finally:
            if expires_at is not None and datetime.now(UTC) > expires_at:
                self.stats.expired_calls += 1  # answered after expiry: maybe paid twice
                metrics.EXPIRED.labels("answered_late").inc()


def cfg_kind(provider: LLMProvider) -> str:
    """openai, anthropic, ...: a provider's name is its endpoint key, ``kind@base_url``."""
    return provider.name.partition("@")[0]
