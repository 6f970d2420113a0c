"""One assignment, stage by stage, into exactly one Trajectory.

the agent and the deadline are checked -> the attempt's first Redis call: idempotency (a
recorded Trajectory is re-sent, no call), the status ``running``, the primary provider's
cached answer and, when the agent has a free slot, the first try's rate-limit take -> per
provider of the agent's chain: response cache -> rate limit -> the deadline again, right
before each try goes out (an attempt that expired while it waited for a slot or a token is a
timeout Trajectory, not a call paid twice) -> call with retry and breaker; the fallback
provider when the primary gave no answer -> record (Redis: the Trajectory and the task's
result fields, one call) -> deliver (Kafka acknowledged). A failed call is a Trajectory with
status error or timeout, never a dropped assignment.

Redis calls go through :class:`~stormline.state.HotPath`: the calls every task makes in the
same event-loop tick travel as one pipelined call, so a task's Redis cost is its share of
that call, not round trips of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
    ProviderThrottle,
    RateLimit,
    Recorder,
    ResponseCache,
)
from stormline.consumers.worker.stats import WorkerStats
from stormline.consumers.worker.trajectories import Acks, deliver, trajectory
from stormline.logs import redact
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import TaskAssigned, Trajectory, TrajectoryStatus
from stormline.settings import Settings
from stormline.state import CachedResponse, HotPath, RedisState


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
        acks: Acks | None = None,
    ) -> None:
        s = settings
        self.registry = registry
        self.worker_id = worker_id
        self.out = out
        self.acks = acks
        self.agents = agents
        # Every stage's Redis work of one loop tick, all tasks together: one pipelined call.
        self.hot = HotPath(state)
        self.idempotency = Idempotency(self.hot, stats)
        self.cache = ResponseCache(self.hot, s.response_cache_ttl_s, stats)
        self.rate_limit = RateLimit(self.hot, s.provider_rate_limits, s.provider_token_limits)
        self.call = GuardedCall(
            RetryPolicy(s.llm_retry_attempts, s.llm_backoff_base_s, s.llm_backoff_max_s),
            breakers,
            stats,
        )
        self.recorder = Recorder(self.hot)

    async def run(self, a: TaskAssigned) -> Trajectory:
        """The assignment's Trajectory, recorded and delivered."""
        traj = await self.process(a)
        await deliver(self.out, traj, acks=self.acks)
        return traj

    async def process(self, a: TaskAssigned) -> Trajectory:
        rt = self.agents.get(a.agent_id)
        if rt is None or a.expires_at <= datetime.now(UTC):
            recorded = await self.idempotency.recorded(a)
            if recorded is not None:
                return recorded
            return await self.recorder.record(self._not_run(a, rt))
        cfg = rt.chain[0][0]
        first = _Try(_request(a, rt.config, cfg), None)
        throttle = self.rate_limit.throttle(cfg, first.req)
        # A free slot is taken now, without a wait, so that the first try's budget take can
        # ride the attempt's first Redis call: nothing stands between it and the call then.
        held = not rt.slots.locked()
        if held:
            await rt.slots.acquire()
        try:
            ask = throttle.ask_first() if held else None
            begun = await self.hot.begin(
                a.task_id,
                a.attempt,
                running_for=a.agent_id,
                cache_key=self.cache.key_if_on(cfg, first.req),
                budget=ask,
            )
            if begun.recorded is not None:
                return self.idempotency.resend(a, begun.recorded)
            if ask is not None:
                throttle.answered(begun.wait)
            first = _Try(first.req, throttle, begun.cached, looked_up=True)
            if not held:
                await rt.slots.acquire()
                held = True
            traj = await self._with_fallback(a, rt, first)
        finally:
            if held:
                rt.slots.release()
        return await self.recorder.record(traj)

    def _not_run(self, a: TaskAssigned, rt: AgentRuntime | None) -> Trajectory:
        if rt is None:
            return trajectory(
                a,
                status=TrajectoryStatus.ERROR,
                error=f"agent {a.agent_id!r} is not in the registry of worker {self.worker_id} "
                f"({self.registry.path}); add it to agents.yaml",
            )
        return trajectory(
            a,
            agent=rt.config,
            status=TrajectoryStatus.TIMEOUT,
            error=f"assignment expired at {a.expires_at.isoformat()} before it started",
        )

    async def _with_fallback(self, a: TaskAssigned, rt: AgentRuntime, first: _Try) -> Trajectory:
        """The first provider of the chain that answers; else an error/timeout Trajectory."""
        t0 = time.perf_counter()
        failures: list[CallFailed] = []
        for i, (cfg, provider) in enumerate(rt.chain):
            try:
                one = first if i == 0 else _Try(_request(a, rt.config, cfg), None)
                comp = await self._complete(a, cfg, provider, one)
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
        self, a: TaskAssigned, cfg: ProviderConfig, provider: LLMProvider, one: _Try
    ) -> Completion:
        """One provider: cache -> rate limit -> call with retry and breaker -> cache. The
        call checks the assignment's expiry again right before each try goes out."""
        hit = one.cached if one.looked_up else await self.cache.get(cfg, one.req)
        if hit is not None:
            return self.cache.served(hit)
        # The rate limit is asked before every try (retries and 429 waits included).
        throttle = one.throttle or self.rate_limit.throttle(cfg, one.req)
        comp = await self.call(cfg, provider, one.req, a.expires_at, throttle)
        await throttle.settle(comp)
        await self.cache.put(cfg, one.req, comp)
        return comp

    async def aclose(self) -> None:
        await self.hot.aclose()


@dataclass(frozen=True)
class _Try:
    """One provider's request, with what the attempt's first Redis call found for it."""

    req: CompletionRequest
    throttle: ProviderThrottle | None
    cached: CachedResponse | None = None
    looked_up: bool = False
