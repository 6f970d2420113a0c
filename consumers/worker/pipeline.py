"""One assignment, stage by stage, into exactly one Trajectory.

idempotency (a recorded Trajectory is re-sent, no call) -> the agent and the deadline are
checked -> per provider of the agent's chain: response cache -> rate limit -> the deadline
again, right before each try goes out (an attempt that expired while it waited for a slot or
a token is a timeout Trajectory, not a call paid twice) -> call with retry and breaker; the
fallback provider when the primary gave no answer -> record (Redis: the Trajectory and the
task's status) -> deliver (Kafka acknowledged). A failed call is a Trajectory with status
error or timeout, never a dropped assignment.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from stormline.consumers.llm import Completion, CompletionRequest, ErrorKind, LLMProvider
from stormline.consumers.llm.agents import AgentConfig, ProviderConfig, Registry
from stormline.consumers.llm.resilience import CircuitBreaker, RetryPolicy
from stormline.consumers.worker.providers import AgentRuntime
from stormline.consumers.worker.stages import (
    AttemptExpired,
    CallFailed,
    GuardedCall,
    Idempotency,
    RateLimit,
    Recorder,
    ResponseCache,
)
from stormline.consumers.worker.stats import WorkerStats
from stormline.consumers.worker.trajectories import deliver, trajectory
from stormline.logs import redact
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import TaskAssigned, Trajectory, TrajectoryStatus
from stormline.settings import Settings
from stormline.state import RedisState


def _request(a: TaskAssigned, agent: AgentConfig, cfg: ProviderConfig) -> CompletionRequest:
    return CompletionRequest(
        agent_id=agent.id,
        model=cfg.model,
        prompt=a.task.prompt,
        system_prompt=agent.system_prompt,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        timeout_s=cfg.timeout_s,
        task_type=a.task.task_type,
        logprobs=cfg.logprobs,
    )


class Pipeline:
    """The stages of one worker, built once per run over its agents, Redis state and producer."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str,
        *,
        state: RedisState,
        out: EventProducer,
        agents: dict[str, AgentRuntime],
        breakers: dict[str, CircuitBreaker],
        stats: WorkerStats,
    ) -> None:
        s = settings
        self.registry = registry
        self.worker_id = worker_id
        self.out = out
        self.agents = agents
        self.idempotency = Idempotency(state, stats)
        self.cache = ResponseCache(state, s.response_cache_ttl_s, stats)
        self.rate_limit = RateLimit(state, s.provider_rate_limits, s.provider_token_limits)
        self.call = GuardedCall(
            RetryPolicy(s.llm_retry_attempts, s.llm_backoff_base_s, s.llm_backoff_max_s),
            breakers,
            stats,
        )
        self.recorder = Recorder(state)

    async def run(self, a: TaskAssigned) -> Trajectory:
        """The assignment's Trajectory, recorded and delivered."""
        traj = await self.process(a)
        await deliver(self.out, traj)
        return traj

    async def process(self, a: TaskAssigned) -> Trajectory:
        recorded = await self.idempotency.recorded(a)
        if recorded is not None:
            return recorded
        return await self.recorder.record(await self._attempt(a))

    async def _attempt(self, a: TaskAssigned) -> Trajectory:
        rt = self.agents.get(a.agent_id)
        if rt is None:
            return trajectory(
                a,
                status=TrajectoryStatus.ERROR,
                error=f"agent {a.agent_id!r} is not in the registry of worker {self.worker_id} "
                f"({self.registry.path}); add it to agents.yaml",
            )
        if a.expires_at <= datetime.now(UTC):
            return trajectory(
                a,
                agent=rt.config,
                status=TrajectoryStatus.TIMEOUT,
                error=f"assignment expired at {a.expires_at.isoformat()} before it started",
            )
        await self.recorder.running(a)
        async with rt.slots:
            return await self._with_fallback(a, rt)

    async def _with_fallback(self, a: TaskAssigned, rt: AgentRuntime) -> Trajectory:
        """The first provider of the chain that answers; else an error/timeout Trajectory."""
        t0 = time.perf_counter()
        failures: list[CallFailed] = []
        for cfg, provider in rt.chain:
            try:
                comp = await self._complete(a, cfg, provider, _request(a, rt.config, cfg))
            except CallFailed as exc:
                failures.append(exc)
                continue
            except AttemptExpired as exc:
                tried = "; ".join(f.summary for f in failures)
                return trajectory(
                    a,
                    agent=rt.config,
                    cfg=cfg,
                    status=TrajectoryStatus.TIMEOUT,
                    error=redact(
                        f"{exc} while waiting for a slot, a rate-limit token or a retry; "
                        f"not called{f' (before: {tried})' if tried else ''}"
                    )[:10_000],
                    latency_ms=(time.perf_counter() - t0) * 1000,
                )
            return trajectory(
                a,
                agent=rt.config,
                cfg=cfg,
                status=TrajectoryStatus.OK,
                completion=comp,
                latency_ms=(time.perf_counter() - t0) * 1000,
            )
        timed_out = bool(failures) and failures[-1].error.kind is ErrorKind.TIMEOUT
        return trajectory(
            a,
            agent=rt.config,
            cfg=rt.chain[0][0],
            status=TrajectoryStatus.TIMEOUT if timed_out else TrajectoryStatus.ERROR,
            error=redact("; ".join(f.summary for f in failures))[:10_000],
            latency_ms=(time.perf_counter() - t0) * 1000,
        )

    async def _complete(
        self, a: TaskAssigned, cfg: ProviderConfig, provider: LLMProvider, req: CompletionRequest
    ) -> Completion:
        """One provider: cache -> rate limit -> call with retry and breaker -> cache. The
        call checks the assignment's expiry again right before each try goes out."""
        comp = await self.cache.get(cfg, req)
        if comp is None:
            # The rate limit is asked before every try (retries and 429 waits included).
            throttle = self.rate_limit.throttle(cfg, req)
            comp = await self.call(cfg, provider, req, a.expires_at, throttle)
            await throttle.settle(comp)
            await self.cache.put(cfg, req, comp)
        return comp
