"""`stormline evaluator`: trajectories in, one Reward per trajectory out.

Consumes ``trajectories`` in the ``stormline-evaluator`` group, scores each batch (verifiers
inline, LLM-as-judge calls concurrently on an asyncio loop), produces the rewards, waits for
their delivery, then commits the batch's offsets. A crash between delivery and commit can
repeat a reward, but with the same event id (``stable_event_id("reward", trajectory_id,
source)``): the router counts a trajectory once and the sink keeps one row per event id.
The normal path and a SIGTERM never repeat one, because a batch is always finished and
committed before the next poll. The router's own final-failure trajectory is skipped: the
router already gave that task its one Reward. After the commit, the batch's rewards go into
their tasks' Redis statuses in one round trip (best effort: a view; the rewards are on Kafka).

A trajectory that cannot be scored as configured (unknown evaluator, no ``expected`` for a
verifier that needs one, a judge reply without a score, a judge 4xx) goes to dead-letters
with the reason. A judge that is down (429/5xx/timeouts, open breaker) is waited for with
backoff instead: its rewards are late, never lost or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, cast

import redis

from stormline import logs, metrics, state, tracing
from stormline.consumers.evaluator import rules as evaluators
from stormline.consumers.evaluator.rules import Evaluation, EvaluationError, Spec
from stormline.consumers.llm import ErrorKind, LLMProvider, ProviderError
from stormline.consumers.llm.resilience import CircuitBreaker, RetryPolicy, call_with_policy
from stormline.runtime import retry as runtime_retry
from stormline.schemas.catalog import REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventConsumer, EventProducer, Received
from stormline.schemas.models import Reward, Trajectory
from stormline.schemas.serde import Serde
from stormline.settings import Settings

log = logging.getLogger("stormline.evaluator")


class Stopping(Exception):
    """Shutdown was requested while a judge outage held a batch: leave it uncommitted."""


def make_judge(settings: Settings) -> LLMProvider | None:
    """The configured LLM-as-judge provider, or None when STORMLINE_JUDGE_PROVIDER is unset."""
    if not settings.judge_provider:
        return None
    from stormline.consumers.llm.agents import ProviderConfig, ProviderName
    from stormline.consumers.llm.providers import make_provider

    config = ProviderConfig(
        # A setting is any string; ProviderConfig validates it against ProviderName here.
        provider=cast(ProviderName, settings.judge_provider),
        model=settings.judge_model,
        base_url=settings.judge_base_url,
        api_key_env=settings.judge_api_key_env,
        timeout_s=settings.judge_timeout_s,
        max_tokens=300,
    )
    return make_provider(
        config, max_connections=settings.judge_max_in_flight, transport=settings.llm_transport
    )


class EvaluatorService:
    def __init__(
        self,
        settings: Settings,
        *,
        judge: LLMProvider | None = None,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.serde = Serde.from_settings(settings)
        self.producer = EventProducer(settings, self.serde)
        self.consumer = EventConsumer(
            settings,
            self.serde,
            group_id or settings.evaluator_group,
            [TRAJECTORIES],
            dead_letters=self.producer,
        )
        self.judge = judge if judge is not None else make_judge(settings)
        self.rubric = settings.judge_rubric or evaluators.DEFAULT_RUBRIC
        self.retry = RetryPolicy(
            settings.llm_retry_attempts, settings.llm_backoff_base_s, settings.llm_backoff_max_s
        )
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_cooldown_s
        )
        # Around the bounded per-call retry: a judge outage is waited out, without limit.
        self.outage = runtime_retry.RetryPolicy(base_s=settings.llm_backoff_base_s, max_s=30.0)
        self.rewards_topic = REWARDS.name(settings)
        self.loop = asyncio.new_event_loop()
        self._judge_slots: asyncio.Semaphore | None = None
        self._stop = threading.Event()
        self.scored = 0
        self.dead = 0
        self.skipped = 0  # router outcomes, never scored
        self.batches = 0
        self._redis_retry_at = 0.0
        self._histograms: dict[tuple[str, str, str], Any] = {}

    # ------------------------------------------------------------------- lifecycle --
    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: finishing the current batch, then leaving the group", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """While the service serves, what it built before (imports, clients, the registry's
        schemas: ~90,000 objects) is out of the collector's reach, as in the worker and the
        API: a full collection walks only what serving made (handed back afterwards)."""
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()

    def run(self) -> None:
        """Poll, score, produce, flush, commit, until :meth:`stop`; then close."""
        log.info(
            "evaluator started",
            extra={
                "group": self.consumer.group_id,
                "topic": TRAJECTORIES.name(self.settings),
                "judge": self.judge.name if self.judge is not None else None,
            },
        )
        try:
            with self.serving():
                while not self._stop.is_set():
                    self.step()
        except Stopping:
            log.info("stopped while waiting for the judge; the open batch will be re-read")
        finally:
            self.close()

    def step(self, timeout: float = 0.5) -> int:
        """One batch: returns how many rewards were produced."""
        batch = self.consumer.poll_batch(self.settings.evaluator_batch_size, timeout)
        self.dead += batch.dead
        rewards: list[Reward] = []
        if batch.records:
            rewards = self.process(batch.records)
            self.batches += 1
        self.producer.flush()  # rewards and dead letters acknowledged ...
        self.consumer.commit()  # ... before the offsets that produced them
        self._record_status(rewards)
        return len(rewards)

    def _record_status(self, rewards: Sequence[Reward]) -> None:
        """The reward in each task's Redis status (`stormline task`), best effort: the whole
        batch in one round trip, in order (a task scored twice in it keeps the later)."""
        if not rewards or time.monotonic() < self._redis_retry_at:
            return
        try:
            state.record_rewards(
                self.settings, [(rw.task_id, rw.value, rw.source.value) for rw in rewards]
            )
        except (redis.RedisError, OSError) as exc:
            # Status is a view; the rewards are on Kafka. Try again in a while.
            self._redis_retry_at = time.monotonic() + 10
            log.warning("task status not updated in Redis: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        try:
            self.consumer.close()  # leaves the group: partitions move at once
        finally:
            try:
                self.producer.close(timeout=10)
            finally:
                if self.judge is not None:
                    self.loop.run_until_complete(self.judge.aclose())
                self.loop.close()
                log.info(
                    "evaluator stopped",
                    extra={
                        "rewards": self.scored,
                        "dead_letters": self.dead,
                        "router_outcomes_skipped": self.skipped,
                    },
                )

    # --------------------------------------------------------------------- scoring --
    def process(self, records: Sequence[Received[Any]]) -> list[Reward]:
        """Score and produce (not yet flushed); returns the rewards produced."""
        # The router's own final failure already carries the task's one Reward.
        ours = [r for r in records if not evaluators.is_router_outcome(r.event)]
        self.skipped += len(records) - len(ours)
        results = self._score_batch(ours)
        produced: list[Reward] = []
        produce, topic = self.producer.produce, self.rewards_topic
        for rec, result in zip(ours, results, strict=True):
            if isinstance(result, Reward):
                with tracing.continued("stormline.evaluator.reward", rec.headers, _attrs(result)):
                    produce(result, topic=topic)  # + trace headers
                produced.append(result)
                self._observe(result)
            else:
                self.consumer.dead_letter_failed(rec, result)
                self.dead += 1
        self.scored += len(produced)
        return produced

    def _observe(self, rw: Reward) -> None:
        labels = (rw.task_type, rw.agent_id, rw.source.value)
        child = self._histograms.get(labels)
        if child is None:  # labels() validates and locks on every call: once per labels
            child = self._histograms[labels] = metrics.REWARDS.labels(*labels)
        child.observe(rw.value)

    def _score_batch(self, records: Sequence[Received[Any]]) -> list[Reward | Exception]:
        """Each record's Reward, or the exception that dead-letters it, in order.

        With a judge configured, every record goes through the event loop, the judge's calls
        concurrently. Without one, verifiers and the failure policy are plain calls one after
        the other (a coroutine, a task and a log context per record cost more than scoring);
        each record keeps its span. Verifiers log nothing, so no log context is bound.
        """
        if self.judge is not None:
            return self.loop.run_until_complete(self._score_all(records))
        s = self.settings
        results: list[Reward | Exception] = []
        for rec in records:
            traj: Trajectory = rec.event
            try:
                with tracing.continued("stormline.evaluator.score", rec.headers, _attrs(traj)):
                    got = evaluators.evaluate_without_judge(
                        traj,
                        s.evaluator_by_task_type,
                        judge_configured=False,
                        failure_value=s.evaluator_failure_value,
                    )
                    if isinstance(got, Spec):  # without a judge, asking for one raises
                        raise AssertionError(f"a judge's spec without a judge: {got}")
                    results.append(evaluators.reward_for(traj, got))
            except Exception as exc:  # a bad record (or a bug): its dead letter says which
                results.append(exc)
        return results

    async def _score_all(self, records: Sequence[Received[Any]]) -> list[Reward | Exception]:
        if self._judge_slots is None:
            self._judge_slots = asyncio.Semaphore(self.settings.judge_max_in_flight)
        results = await asyncio.gather(
            *(self._traced_score(rec) for rec in records), return_exceptions=True
        )
        out: list[Reward | Exception] = []
        for r in results:
            if isinstance(r, Stopping):
                raise r
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
            out.append(r)
        return out

    async def _traced_score(self, rec: Received[Any]) -> Reward:
        """:meth:`_score` in a span continuing the trajectory's trace; its ids on log lines."""
        traj: Trajectory = rec.event
        with (
            tracing.continued("stormline.evaluator.score", rec.headers, _attrs(traj)),
            logs.bound(task_id=traj.task_id, agent=traj.agent_id),
        ):
            return await self._score(traj)

    async def _score(self, trajectory: Trajectory) -> Reward:
        result = evaluators.evaluate_without_judge(
            trajectory,
            self.settings.evaluator_by_task_type,
            judge_configured=self.judge is not None,
            failure_value=self.settings.evaluator_failure_value,
        )
        if isinstance(result, Spec):
            result = await self._judge(trajectory, result)
        return evaluators.reward_for(trajectory, result)

    async def _judge(self, trajectory: Trajectory, spec: Spec) -> Evaluation:
        """One judge verdict, waiting out an outage (late, never lost or dead-lettered).

        Each call retries within the LLM budget (``call_with_policy``); around it the one
        retry policy, unbounded, waits out what outlasts that budget or opens the breaker.
        A refusal (4xx) is final; a stop request leaves the batch uncommitted.
        """
        assert self.judge is not None and self._judge_slots is not None
        judge, slots, s = self.judge, self._judge_slots, self.settings

        def outage(exc: BaseException) -> bool:
            return _judge_unavailable(exc) and not self._stop.is_set()

        try:
            async for attempt in self.outage.async_retrying(
                outage, log=log, what=f"judge of trajectory {trajectory.trajectory_id}"
            ):
                with attempt:
                    async with slots:
                        return await call_with_policy(
                            lambda: evaluators.judge(
                                judge,
                                trajectory,
                                spec=spec,
                                default_rubric=self.rubric,
                                model=s.judge_model,
                                timeout_s=s.judge_timeout_s,
                            ),
                            policy=self.retry,
                            breaker=self.breaker,
                            timeout_s=s.judge_timeout_s,
                        )
        except ProviderError as exc:
            if _judge_unavailable(exc):
                raise Stopping() from None
            raise EvaluationError(f"judge refused the request: {exc}") from None
        raise AssertionError("unreachable: the retry policy re-raises")


def _attrs(ev: Trajectory | Reward) -> dict[str, str | int]:
    return {"stormline.task_id": ev.task_id, "stormline.agent_id": ev.agent_id}


def _judge_unavailable(exc: BaseException) -> bool:
    """The judge is down or shed load (429/5xx/timeout, open breaker): wait, do not fail."""
    return isinstance(exc, ProviderError) and (exc.retryable or exc.kind == ErrorKind.CIRCUIT_OPEN)


def run(settings: Settings) -> None:
    """Entry point of `stormline evaluator`."""
    # HTTP clients log every request at INFO, URL included (a registry URL may carry
    # credentials); the evaluator's own lines say what matters.
    logs.quiet_http_clients(settings)  # unless STORMLINE_LOG_HTTP_REQUESTS
    tracing.setup(settings, "evaluator")
    metrics.serve(settings.metrics_port, "evaluator", settings.metrics_host)
    service = EvaluatorService(settings)
    service.install_signal_handlers()
    service.run()
