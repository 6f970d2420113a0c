"""The stages of one assignment, each with one job; :mod:`.pipeline` puts them in order.

Every stage that needs Redis goes through :class:`~stormline.state.RedisState` and survives
it being down (then: nothing recorded, nothing cached, no limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from stormline.consumers.llm import Completion, CompletionRequest, LLMProvider, ProviderError
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.resilience import (
    CallOutcome,
    CircuitBreaker,
    RetryPolicy,
    call_with_policy,
)
from stormline.consumers.worker.stats import WorkerStats
from stormline.schemas.models import TaskAssigned, Trajectory, TrajectoryStatus
from stormline.state import RedisState


class Idempotency:
    """A Trajectory recorded for (task, attempt) is the answer: re-sent, never recomputed."""

    def __init__(self, state: RedisState, stats: WorkerStats) -> None:
        self.state = state
        self.stats = stats

    async def recorded(self, a: TaskAssigned) -> Trajectory | None:
        traj = await self.state.recorded_trajectory(a.task_id, a.attempt)
        if traj is not None:
            self.stats.resent += 1
        return traj


class Recorder:
    """Task status as the attempt goes, and the one Trajectory that counts for it."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    async def running(self, a: TaskAssigned) -> None:
        await self.state.set_status(a.task_id, "running", a.attempt, agent_id=a.agent_id)

    async def record(self, traj: Trajectory) -> Trajectory:
        """Record ``traj`` (unless another was first) and its final status; return the one
        recorded."""
        traj = await self.state.record_trajectory(traj)
        await self.state.set_status(
            traj.task_id,
            "succeeded" if traj.status is TrajectoryStatus.OK else "failed",
            traj.attempt,
            agent_id=traj.agent_id,
            trajectory_id=traj.trajectory_id,
            output=traj.output,
            error=traj.error,
        )
        return traj


class ResponseCache:
    """Answers to identical requests, for ``STORMLINE_RESPONSE_CACHE_TTL_S`` (0: off)."""

    def __init__(self, state: RedisState, ttl_s: int, stats: WorkerStats) -> None:
        self.state = state
        self.ttl_s = ttl_s
        self.stats = stats

    @staticmethod
    def key(cfg: ProviderConfig, req: CompletionRequest) -> str:
        ident = json.dumps(
            [cfg.key, req.model, req.system_prompt, req.prompt, req.temperature, req.max_tokens]
        )
        return hashlib.sha256(ident.encode()).hexdigest()

    async def get(self, cfg: ProviderConfig, req: CompletionRequest) -> Completion | None:
        if not self.ttl_s:
            return None
        hit = await self.state.cached_response(self.key(cfg, req))
        if hit is None:
            return None
        self.stats.cache_hits += 1
        return Completion(
            output=hit.output,
            provider=hit.provider,
            model=hit.model,
            steps=hit.steps,
            usage=hit.usage,
        )

    async def put(self, cfg: ProviderConfig, req: CompletionRequest, comp: Completion) -> None:
        if self.ttl_s:
            await self.state.cache_response(self.key(cfg, req), comp, self.ttl_s)


class RateLimit:
    """Calls per second per provider (``STORMLINE_PROVIDER_RATE_LIMITS``), shared by every
    worker through one token bucket in Redis."""

    def __init__(self, state: RedisState, limits: dict[str, float]) -> None:
        self.state = state
        self.limits = limits

    async def wait(self, cfg: ProviderConfig) -> None:
        rate = self.limits.get(cfg.key, self.limits.get(cfg.provider))
        if not rate:
            return
        # Not a backoff: the bucket says how long until its next token.
        while (wait := await self.state.take_token(cfg.key, rate)) > 0:
            await asyncio.sleep(wait)


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
        self, cfg: ProviderConfig, provider: LLMProvider, req: CompletionRequest
    ) -> Completion:
        outcome = CallOutcome()
        try:
            return await call_with_policy(
                lambda: self._counted(provider, req),
                policy=self.policy,
                breaker=self.breakers[cfg.key],
                timeout_s=cfg.timeout_s,
                outcome=outcome,
            )
        except ProviderError as exc:
            summary = f"{cfg.provider} {cfg.model}: {outcome.tries} tries: " + " | ".join(
                outcome.errors
            )
            raise CallFailed(exc, summary) from exc

    async def _counted(self, provider: LLMProvider, req: CompletionRequest) -> Completion:
        self.stats.llm_calls += 1
        return await provider.complete(req)
