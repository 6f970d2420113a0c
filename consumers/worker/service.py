"""The agent worker: assignments in, exactly one Trajectory per attempt out.

Stateless; any number run in one consumer group on ``assignments``. One asyncio loop keeps
many LLM calls in flight, bounded per agent (``concurrency`` in agents.yaml) and per worker
(``STORMLINE_WORKER_MAX_IN_FLIGHT``); a slow call only holds its own slot.

Per assignment: a Trajectory already recorded in Redis for (task, attempt) is re-sent (no
LLM call); otherwise the agent's provider is called with timeout, retries and breaker (and
its fallback provider if that fails), one Trajectory is built (status ok / error / timeout,
never dropped), recorded, produced, and only after Kafka acknowledged it does its offset
become committable. Calls finish out of order, so commits advance per partition to the
lowest offset still in flight (:class:`OffsetTracker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import TopicPartition

from stormline.consumers.llm import (
    Completion,
    CompletionRequest,
    ErrorKind,
    LLMProvider,
    ProviderError,
)
from stormline.consumers.llm.agents import AgentConfig, ProviderConfig, Registry
from stormline.consumers.llm.providers import make_provider
from stormline.consumers.llm.resilience import (
    CallOutcome,
    CircuitBreaker,
    RetryPolicy,
    call_with_policy,
)
from stormline.logs import redact
from stormline.runtime.commits import COMMIT_WAIT_S, TP, OffsetTracker, commit_on_daemon_thread
from stormline.schemas.catalog import ASSIGNMENTS, HEARTBEATS
from stormline.schemas.kafka import DeliveryError, EventConsumer, EventProducer, Received
from stormline.schemas.models import (
    AgentHeartbeat,
    Step,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
    Usage,
    WorkerStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import RedisState

log = logging.getLogger("stormline.worker")
_TRAJ_NS = uuid.UUID("5f0c2a4e-7d1b-4c55-9a63-0b6f1f1c9e21")


def trajectory_id(task_id: str, attempt: int) -> str:
    """Deterministic per attempt, so a duplicate can always be recognised downstream."""
    return str(uuid.uuid5(_TRAJ_NS, f"{task_id}/{attempt}"))


# ------------------------------------------------------------------------- worker --
@dataclass
class WorkerStats:
    processed: int = 0
    errors: int = 0
    resent: int = 0
    llm_calls: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    first_started: float = 0.0
    last_done: float = 0.0


@dataclass
class _AgentRuntime:
    config: AgentConfig
    chain: list[tuple[ProviderConfig, LLMProvider]]
    slots: asyncio.Semaphore


class Worker:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str | None = None,
        *,
        serde: Serde | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.worker_id = worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.serde = serde or Serde.from_settings(settings)
        self.group_id = settings.topic(settings.worker_group)
        self.stats = WorkerStats()
        self.tracker = OffsetTracker()
        self.policy = RetryPolicy(
            settings.llm_retry_attempts, settings.llm_backoff_base_s, settings.llm_backoff_max_s
        )
        self.breakers: dict[str, CircuitBreaker] = {}
        self._agents: dict[str, _AgentRuntime] = {}
        self._providers: dict[ProviderConfig, LLMProvider] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._draining = False
        self._owned: set[TP] = set()
        self._commit_pending: Future[None] | None = None

    # -- set-up -------------------------------------------------------------------------
    def _provider(self, cfg: ProviderConfig) -> LLMProvider:
        # One client per distinct provider config, shared by the agents that use it.
        ident = cfg
        if ident not in self._providers:
            self._providers[ident] = make_provider(
                cfg, max_connections=self.settings.worker_max_in_flight
            )
        self.breakers.setdefault(
            cfg.key,
            CircuitBreaker(
                self.settings.breaker_failure_threshold, self.settings.breaker_cooldown_s
            ),
        )
        return self._providers[ident]

    def _build_agents(self) -> None:
        for agent in self.registry.agents.values():
            primary = agent.provider_config()
            chain = [(primary, self._provider(primary))]
            if agent.fallback is not None:
                chain.append((agent.fallback, self._provider(agent.fallback)))
            self._agents[agent.id] = _AgentRuntime(
                agent, chain, asyncio.Semaphore(agent.concurrency)
            )

    def stop(self) -> None:
        """Stop fetching; in-flight work finishes (bounded), then commit and leave."""
        self._stop.set()

    # -- main loop ----------------------------------------------------------------------
    async def run(self, until: Callable[[Worker], bool] | None = None) -> WorkerStats:
        s = self.settings
        self._build_agents()
        self.state = RedisState(s)
        self.out = EventProducer(s, self.serde).start()
        self.dlq = EventProducer(s, self.serde)
        self.consumer = EventConsumer(
            s,
            self.serde,
            self.group_id,
            [ASSIGNMENTS],
            dead_letters=self.dlq,
            **{"max.poll.interval.ms": 600_000, "fetch.wait.max.ms": 50},
        )
        self.consumer.raw.subscribe(
            [ASSIGNMENTS.name(s)],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
        await self.state.ping()
        log.info(
            "worker %s serving %d agents in group %s (max in flight %d)%s",
            self.worker_id,
            len(self.registry),
            self.group_id,
            s.worker_max_in_flight,
            f"; {self.state.detail}" if self.state.degraded else "",
        )
        heartbeats = asyncio.create_task(self._heartbeats())
        try:
            await self._consume(until)
        finally:
            self._draining = True
            await self._drain()
            await self._commit(final=True)
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
            self._heartbeat(WorkerStatus.STOPPED)
            with contextlib.suppress(Exception):
                self.out.close(10)
            with contextlib.suppress(Exception):
                self.dlq.close(10)
            await asyncio.to_thread(self.consumer.close)
            for p in self._providers.values():
                with contextlib.suppress(Exception):
                    await p.aclose()
            await self.state.aclose()
            log.info(
                "worker %s stopped: processed=%d errors=%d resent=%d llm_calls=%d",
                self.worker_id,
                self.stats.processed,
                self.stats.errors,
                self.stats.resent,
                self.stats.llm_calls,
            )
        return self.stats

    async def _consume(self, until: Callable[[Worker], bool] | None) -> None:
        s = self.settings
        last_commit = time.monotonic()
        while not self._stop.is_set():
            if until is not None and until(self):
                break
            room = s.worker_max_in_flight - len(self._tasks)
            if room <= 0:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), s.worker_commit_interval_s)
            else:
                batch = await asyncio.to_thread(
                    self.consumer.poll_batch, min(room, 1000), 0.1 if self._tasks else 0.5
                )
                if batch.dead:
                    await asyncio.to_thread(self.dlq.flush)
                for rec in batch:
                    tp = (rec.topic, rec.partition)
                    self.tracker.started(tp, rec.offset)
                    task = asyncio.create_task(self._handle(rec))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
                for tp, pos in batch.positions.items():
                    self.tracker.polled(tp, pos)
                n = len(self._tasks)
                self.stats.in_flight_max = max(self.stats.in_flight_max, n)
                if n and not self.stats.first_started:
                    self.stats.first_started = time.monotonic()
            if time.monotonic() - last_commit >= s.worker_commit_interval_s:
                await self._commit()
                last_commit = time.monotonic()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("draining %d in-flight assignments", len(self._tasks))
        _, pending = await asyncio.wait(
            set(self._tasks), timeout=self.settings.worker_shutdown_timeout_s
        )
        for t in pending:
            t.cancel()  # not done, so not committed: the group hands it to another worker
        if pending:
            log.warning("handed back %d unfinished assignments", len(pending))
            await asyncio.wait(pending, timeout=5)

    # -- commits and rebalances ---------------------------------------------------------
    async def _commit(self, final: bool = False) -> None:
        if self._commit_pending is not None and not self._commit_pending.done():
            return  # one commit at a time; the next one carries the newer offsets
        offsets = self.tracker.committable()
        if not offsets:
            return
        fut = commit_on_daemon_thread(
            self.consumer.raw, [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        )
        self._commit_pending = fut

        def confirmed(f: Future[None]) -> None:
            if f.exception() is None:
                self.tracker.committed(offsets)

        fut.add_done_callback(confirmed)
        wait = COMMIT_WAIT_S * (3 if final else 1)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), wait)
        except TimeoutError:
            log.warning(
                "offset commit unanswered after %.0fs (group coordinator unavailable?); "
                "consuming goes on and the commit completes when the broker answers",
                wait,
            )
        except Exception as exc:  # a rebalance took them: the new owner re-reads
            log.info("commit skipped: %s", exc)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._owned |= {(p.topic, p.partition) for p in partitions}

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        offsets = self.tracker.committable(tps)
        if offsets:
            # Asynchronous: this runs inside poll(), which a blocked commit would stall. If it
            # is lost, the new owner re-reads a little and idempotency absorbs the repeats.
            with contextlib.suppress(Exception):
                consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    asynchronous=True,
                )
        self.tracker.forget(tps)
        self._owned -= tps

    # -- one assignment -----------------------------------------------------------------
    async def _handle(self, rec: Received[TaskAssigned]) -> None:
        self.stats.in_flight += 1
        try:
            traj = await self._process(rec.event)
            await self._send(traj)
            self.stats.processed += 1
            if traj.status is not TrajectoryStatus.OK:
                self.stats.errors += 1
                log.warning(
                    "task %s attempt %d (agent %s): %s: %s",
                    traj.task_id,
                    traj.attempt,
                    traj.agent_id,
                    traj.status.value,
                    traj.error,
                )
            self.stats.last_done = time.monotonic()
            self.tracker.done((rec.topic, rec.partition), rec.offset)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("assignment %s left uncommitted", rec.event.task_id)
        finally:
            self.stats.in_flight -= 1

    async def _send(self, traj: Trajectory) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.wrap_future(self.out.send(traj))
                return
            except DeliveryError as exc:
                log.warning("trajectory %s not delivered (%s); retrying", traj.task_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _process(self, a: TaskAssigned) -> Trajectory:
        recorded = await self.state.recorded_trajectory(a.task_id, a.attempt)
        if recorded is not None:
            self.stats.resent += 1
            return recorded
        rt = self._agents.get(a.agent_id)
        if rt is None:
            traj = self._trajectory(
                a,
                status=TrajectoryStatus.ERROR,
                error=f"agent {a.agent_id!r} is not in the registry of worker {self.worker_id} "
                f"({self.registry.path}); add it to agents.yaml",
            )
        elif a.expires_at <= datetime.now(UTC):
            traj = self._trajectory(
                a,
                agent=rt.config,
                status=TrajectoryStatus.TIMEOUT,
                error=f"assignment expired at {a.expires_at.isoformat()} before it started",
            )
        else:
            await self.state.set_status(a.task_id, "running", a.attempt, agent_id=a.agent_id)
            async with rt.slots:
                traj = await self._call(a, rt)
        traj = await self.state.record_trajectory(traj)
        await self.state.set_status(
            a.task_id,
            "succeeded" if traj.status is TrajectoryStatus.OK else "failed",
            a.attempt,
            agent_id=traj.agent_id,
            trajectory_id=traj.trajectory_id,
            output=traj.output,
            error=traj.error,
        )
        return traj

    async def _call(self, a: TaskAssigned, rt: _AgentRuntime) -> Trajectory:
        agent = rt.config
        t0 = time.perf_counter()
        errors: list[str] = []
        last: ProviderError | None = None
        for cfg, provider in rt.chain:
            req = CompletionRequest(
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
            comp = await self._cached(cfg, req)
            if comp is None:
                await self._rate_limit(cfg)
                outcome = CallOutcome()
                try:
                    comp = await call_with_policy(
                        lambda p=provider, r=req: self._counted(p, r),
                        policy=self.policy,
                        breaker=self.breakers[cfg.key],
                        timeout_s=cfg.timeout_s,
                        outcome=outcome,
                    )
                except ProviderError as exc:
                    last = exc
                    errors.append(
                        f"{cfg.provider} {cfg.model}: {outcome.tries} tries: "
                        + " | ".join(outcome.errors)
                    )
                    continue
                await self._cache_put(cfg, req, comp)
            return self._trajectory(
                a,
                agent=agent,
                cfg=cfg,
                status=TrajectoryStatus.OK,
                completion=comp,
                latency_ms=(time.perf_counter() - t0) * 1000,
            )
        status = (
            TrajectoryStatus.TIMEOUT
            if last is not None and last.kind is ErrorKind.TIMEOUT
            else TrajectoryStatus.ERROR
        )
        return self._trajectory(
            a,
            agent=agent,
            cfg=rt.chain[0][0],
            status=status,
            error=redact("; ".join(errors))[:10_000],
            latency_ms=(time.perf_counter() - t0) * 1000,
        )

    async def _counted(self, provider: LLMProvider, req: CompletionRequest) -> Completion:
        self.stats.llm_calls += 1
        return await provider.complete(req)

    async def _rate_limit(self, cfg: ProviderConfig) -> None:
        limits = self.settings.provider_rate_limits
        rate = limits.get(cfg.key, limits.get(cfg.provider))
        if not rate:
            return
        while (wait := await self.state.take_token(cfg.key, rate)) > 0:
            await asyncio.sleep(wait)

    def _cache_key(self, cfg: ProviderConfig, req: CompletionRequest) -> str:
        ident = json.dumps(
            [cfg.key, req.model, req.system_prompt, req.prompt, req.temperature, req.max_tokens]
        )
        return hashlib.sha256(ident.encode()).hexdigest()

    async def _cached(self, cfg: ProviderConfig, req: CompletionRequest) -> Completion | None:
        if not self.settings.response_cache_ttl_s:
            return None
        raw = await self.state.cache_get(self._cache_key(cfg, req))
        if raw is None:
            return None
        self.stats.cache_hits += 1
        return Completion(
            output=raw["output"],
            provider=raw["provider"],
            model=raw["model"],
            steps=[Step.model_validate(x) for x in raw["steps"]],
            usage=Usage.model_validate(raw["usage"]),
            latency_ms=0.0,
        )

    async def _cache_put(self, cfg: ProviderConfig, req: CompletionRequest, c: Completion) -> None:
        ttl = self.settings.response_cache_ttl_s
        if ttl:
            value = {
                "output": c.output,
                "provider": c.provider,
                "model": c.model,
                "steps": [x.model_dump() for x in c.steps],
                "usage": c.usage.model_dump(),
            }
            await self.state.cache_put(self._cache_key(cfg, req), value, ttl)

    def _trajectory(
        self,
        a: TaskAssigned,
        *,
        status: TrajectoryStatus,
        agent: AgentConfig | None = None,
        cfg: ProviderConfig | None = None,
        completion: Completion | None = None,
        error: str | None = None,
        latency_ms: float = 0.0,
    ) -> Trajectory:
        cfg = cfg or agent
        return Trajectory(
            task_id=a.task_id,
            trajectory_id=trajectory_id(a.task_id, a.attempt),
            attempt=a.attempt,
            agent_id=a.agent_id,
            task_type=a.task.task_type,
            provider=completion.provider if completion else (cfg.provider if cfg else ""),
            model=completion.model if completion else (cfg.model if cfg else ""),
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

    # -- heartbeats ---------------------------------------------------------------------
    def _heartbeat(self, status: WorkerStatus | None = None) -> None:
        if status is None:
            status = (
                WorkerStatus.DRAINING
                if self._draining or self._stop.is_set()
                else WorkerStatus.DEGRADED
                if self.state.degraded
                else WorkerStatus.RUNNING
            )
        open_breakers = [k for k, b in self.breakers.items() if b.state != "closed"]
        detail = "; ".join(
            x
            for x in (
                self.state.detail if self.state.degraded else "",
                f"open circuit breakers: {', '.join(open_breakers)}" if open_breakers else "",
            )
            if x
        )
        hb = AgentHeartbeat(
            worker_id=self.worker_id,
            agent_ids=sorted(self.registry.agents),
            capabilities=self.registry.capabilities,
            in_flight=len(self._tasks),
            processed=self.stats.processed,
            errors=self.stats.errors,
            status=status,
            detail=detail or None,
        )
        try:
            self.out.produce(hb, topic=HEARTBEATS.name(self.settings))
        except Exception as exc:
            log.warning("heartbeat not queued: %s", exc)

    async def _heartbeats(self) -> None:
        while True:
            await self.state.ping()
            self._heartbeat()
            await asyncio.sleep(self.settings.worker_heartbeat_interval_s)


def run_worker(settings: Settings, worker_id: str | None = None) -> WorkerStats:
    """Entry point of `stormline worker`: load the registry, run until SIGTERM/SIGINT."""
    from stormline.consumers.llm.agents import endpoint_problems, load_registry

    registry = load_registry(settings.agents_file, settings)
    # Say once, loudly, what would otherwise be one warning per task and every circuit open.
    for problem in endpoint_problems(registry, settings=settings):
        log.warning(problem)
    return asyncio.run(Worker(settings, registry, worker_id).run())
