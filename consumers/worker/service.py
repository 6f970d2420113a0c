"""The agent worker: assignments in, exactly one Trajectory per attempt out.

Stateless; any number run in one consumer group on ``assignments``. One asyncio loop keeps
many LLM calls in flight, bounded per agent (``concurrency`` in agents.yaml) and per worker
(``STORMLINE_WORKER_MAX_IN_FLIGHT``); a slow call only holds its own slot.

This module is the process: the consume loop, rebalances, commits, shutdown. What happens
to one assignment is :mod:`.pipeline`; only after Kafka acknowledged its Trajectory (or, when
handling it raised, its dead letter with the reason) does its offset become committable, so
one bad assignment never pins the partition's commit position. Calls finish out of order, so
commits advance per partition to the lowest offset still in flight
(:class:`~stormline.runtime.commits.OffsetTracker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition

from stormline import metrics, tracing
from stormline.consumers.llm.agents import Registry
from stormline.consumers.worker.heartbeats import Heartbeats
from stormline.consumers.worker.pipeline import Pipeline
from stormline.consumers.worker.providers import ProviderPool
from stormline.consumers.worker.stats import WorkerStats
from stormline.consumers.worker.trajectories import Acks, deliver, trajectory_id
from stormline.logs import bound, redact
from stormline.runtime.commits import COMMIT_WAIT_S, OffsetTracker, commit_on_daemon_thread
from stormline.schemas.catalog import ASSIGNMENTS, DEAD_LETTERS
from stormline.schemas.kafka import EventConsumer, EventProducer, Received, dead_letter
from stormline.schemas.models import DeadLetter, TaskAssigned, TrajectoryStatus, WorkerStatus
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import RedisState

__all__ = ["Worker", "WorkerStats", "run_worker", "trajectory_id"]

log = logging.getLogger("stormline.worker")
RevokeCallback = Callable[[Any, list[TopicPartition]], None]
# A long LLM call must not read as a dead consumer; short fetch waits keep the loop lively.
_CONSUMER_CONFIG: dict[str, Any] = {"max.poll.interval.ms": 600_000, "fetch.wait.max.ms": 50}


@dataclass
class _Clients:
    """What a running worker talks to: opened when :meth:`Worker.run` starts, closed at its end."""

    state: RedisState
    out: EventProducer
    dlq: EventProducer
    consumer: EventConsumer
    acks: Acks

    @classmethod
    def open(
        cls, settings: Settings, serde: Serde, group_id: str, on_revoke: RevokeCallback
    ) -> _Clients:
        dlq = EventProducer(settings, serde)
        consumer = EventConsumer(
            settings,
            serde,
            group_id,
            [ASSIGNMENTS],
            dead_letters=dlq,
            **_CONSUMER_CONFIG,
        )
        consumer.raw.subscribe([ASSIGNMENTS.name(settings)], on_revoke=on_revoke, on_lost=on_revoke)
        out = EventProducer(settings, serde).start()
        return cls(RedisState(settings), out, dlq, consumer, Acks())

    async def close(self) -> None:
        for producer in (self.out, self.dlq):
            with contextlib.suppress(Exception):
                producer.close(10)
        await asyncio.to_thread(self.consumer.close)
        await self.state.aclose()


class Worker:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str | None = None,
        *,
        serde: Serde | None = None,
    ) -> None:
        self.settings: Settings = settings
        self.registry: Registry = registry
        self.worker_id: str = worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.serde: Serde = serde or Serde.from_settings(settings)
        self.group_id: str = settings.topic(settings.worker_group)
        self.stats: WorkerStats = WorkerStats()
        self.tracker: OffsetTracker = OffsetTracker()
        self.providers: ProviderPool = ProviderPool(settings)
        self._tasks: set[asyncio.Task[None]] = set()
        self._room: asyncio.Event = asyncio.Event()
        self._stop: asyncio.Event = asyncio.Event()
        self._draining: bool = False
        self._commit_pending: Future[None] | None = None

    def stop(self) -> None:
        """Stop fetching; in-flight work finishes (bounded), then commit and leave."""
        self._stop.set()

    def draining(self) -> bool:
        return self._draining or self._stop.is_set()

    # -- the process --------------------------------------------------------------------
    async def run(self, until: Callable[[Worker], bool] | None = None) -> WorkerStats:
        s = self.settings
        agents = self.providers.agents(self.registry)
        io = _Clients.open(s, self.serde, self.group_id, self._on_revoke)
        pipeline = Pipeline(
            s,
            self.registry,
            self.worker_id,
            state=io.state,
            out=io.out,
            agents=agents,
            breakers=self.providers.breakers,
            stats=self.stats,
            acks=io.acks,
        )
        heartbeats = Heartbeats(
            s,
            self.registry,
            self.worker_id,
            stats=self.stats,
            state=io.state,
            out=io.out,
            providers=self.providers,
            in_flight=lambda: len(self._tasks),
            draining=self.draining,
        )
        metrics.IN_FLIGHT.watch(self, lambda w: [((), len(w._tasks))])
        metrics.BREAKER_STATE.watch(self.providers, _breaker_samples)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
        await io.state.ping()
        log.info(
            "worker %s serving %d agents in group %s (max in flight %d)%s",
            self.worker_id,
            len(self.registry),
            self.group_id,
            s.worker_max_in_flight,
            f"; {io.state.detail}" if io.state.degraded else "",
        )
        beating = asyncio.create_task(heartbeats.run())
        # What the process built so far (imports, SDK clients, registry: ~250,000 objects)
        # lives as long as it serves: out of the collector's reach, each full collection
        # walks only what serving made. They were ~0.6 ms of CPU per task at 0 ms LLM
        # latency (bench/worker.py); handed back when serving ends.
        gc.freeze()
        try:
            await self._consume(io, pipeline, until)
        finally:
            try:
                await self._shut_down(io, pipeline, heartbeats, beating)
            finally:
                gc.unfreeze()
        return self.stats

    async def _shut_down(
        self, io: _Clients, pipeline: Pipeline, heartbeats: Heartbeats, beating: asyncio.Task[None]
    ) -> None:
        self._draining = True
        await self._drain()
        await self._commit(io.consumer, final=True)
        await pipeline.aclose()  # Redis writes still going (a cache write-behind)
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        heartbeats.send(WorkerStatus.STOPPED)
        await io.close()
        await self.providers.aclose()
        st = self.stats
        st.redis_refused = io.state.refused
        log.info(
            "worker %s stopped: processed=%d errors=%d resent=%d llm_calls=%d "
            "dead_letters=%d expired_skipped=%d expired_calls=%d redis_refused=%d",
            self.worker_id,
            st.processed,
            st.errors,
            st.resent,
            st.llm_calls,
            st.dead_letters,
            st.expired_skipped,
            st.expired_calls,
            st.redis_refused,
        )

    # -- the consume loop ---------------------------------------------------------------
    async def _consume(
        self, io: _Clients, pipeline: Pipeline, until: Callable[[Worker], bool] | None
    ) -> None:
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
                await self._poll(io, pipeline, room)
            if time.monotonic() - last_commit >= s.worker_commit_interval_s:
                await self._commit(io.consumer)
                last_commit = time.monotonic()

    async def _poll(self, io: _Clients, pipeline: Pipeline, room: int) -> None:
        """Fetch up to ``room`` assignments and start one task each."""
        batch = await asyncio.to_thread(
            io.consumer.poll_batch, min(room, 1000), 0.1 if self._tasks else 0.5
        )
        if batch.dead:
            await asyncio.to_thread(io.dlq.flush)
        for rec in batch:
            self.tracker.started((rec.topic, rec.partition), rec.offset)
            task = asyncio.create_task(self._handle(io, pipeline, rec))
            self._tasks.add(task)
            task.add_done_callback(self._finished)
        for tp, pos in batch.positions.items():
            self.tracker.polled(tp, pos)
        n = len(self._tasks)
        self.stats.in_flight_max = max(self.stats.in_flight_max, n)
        if n and not self.stats.first_started:
            self.stats.first_started = time.monotonic()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()

    async def _handle(self, io: _Clients, pipeline: Pipeline, rec: Received[TaskAssigned]) -> None:
        """One assignment to its outcome; its offset is then done whatever the outcome was."""
        self.stats.in_flight += 1
        a = rec.event
        try:
            # The task's trace (from the assignment's headers) and its ids on every log line.
            with (
                tracing.continued("stormline.worker.assignment", rec.headers, _attrs(a)),
                bound(task_id=a.task_id, agent=a.agent_id),
            ):
                await self._outcome(io, pipeline, rec)
            self.stats.last_done = time.monotonic()
            self.tracker.done((rec.topic, rec.partition), rec.offset)
        finally:
            self.stats.in_flight -= 1

    async def _outcome(self, io: _Clients, pipeline: Pipeline, rec: Received[TaskAssigned]) -> None:
        """A Trajectory, or a dead letter with its reason, acknowledged by Kafka.

        Transient faults never reach here: Redis refusals and outages degrade inside
        RedisState, provider faults are Trajectories, delivery retries until acknowledged.
        What does reach here (an unreadable recorded trajectory, a bug) would fail again on
        every redelivery, so it is dead-lettered instead of pinning the commit position.
        A cancellation (a drain hands the assignment back) is not an Exception: it passes.
        """
        try:
            traj = await pipeline.process(rec.event)
        except Exception as exc:
            await self._dead_letter(io, rec, exc)
            return
        with tracing.child("stormline.worker.trajectory", {"stormline.status": traj.status.value}):
            # The Trajectory carries this span's context.
            await deliver(io.out, traj, acks=io.acks)
        self.stats.processed += 1
        metrics.TRAJECTORIES.labels(traj.agent_id, traj.status.value).inc()
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

    async def _dead_letter(self, io: _Clients, rec: Received[TaskAssigned], exc: Exception) -> None:
        self.stats.dead_letters += 1
        self.stats.errors += 1
        reason = redact("".join(traceback.format_exception_only(type(exc), exc)).strip())
        s = self.settings

        def letter() -> DeadLetter:
            built = dead_letter(
                s,
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=rec.key.encode() if rec.key else None,
                value=self.serde.encode(rec.topic, rec.event),
                kind="handler",
                error=f"task {rec.event.task_id} attempt {rec.event.attempt}: {reason}",
                group=self.group_id,
            )
            assert built is not None  # None only for a record read from dead-letters itself
            return built

        await deliver(
            io.out,
            letter,
            what=f"dead letter of the assignment of task {rec.event.task_id}",
            topic=DEAD_LETTERS.name(s),
            key=rec.key or "",
            acks=io.acks,
        )

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
    async def _commit(self, consumer: EventConsumer, final: bool = False) -> None:
        if self._commit_pending is not None and not self._commit_pending.done():
            return  # one commit at a time; the next one carries the newer offsets
        offsets = self.tracker.committable()
        if not offsets:
            return
        fut = commit_on_daemon_thread(
            consumer.raw, [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
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


def _attrs(a: TaskAssigned) -> dict[str, str | int]:
    return {
        "stormline.task_id": a.task_id,
        "stormline.agent_id": a.agent_id,
        "stormline.attempt": a.attempt,
    }


def _breaker_samples(pool: ProviderPool) -> list[tuple[tuple[str, ...], float]]:
    """Each breaker's state, read on the scrape thread without ``state`` (which moves an
    open breaker to half-open: only the event loop may do that, or two probes could go)."""
    out: list[tuple[tuple[str, ...], float]] = []
    for key, b in list(pool.breakers.items()):
        state = b._state.value
        if state == "open" and b.clock() - b._opened_at >= b.cooldown_s:
            state = "half_open"  # what the next call will find
        out.append(((redact(key),), metrics.BREAKER_CODES[state]))
    return out


def run_worker(settings: Settings, worker_id: str | None = None) -> WorkerStats:
    """Entry point of `stormline worker`: load the registry, run until SIGTERM/SIGINT."""
    from stormline.consumers.llm.agents import endpoint_problems, load_registry

    tracing.setup(settings, "worker")
    metrics.serve(settings.metrics_port, "worker", settings.metrics_host)
    registry = load_registry(settings.agents_file, settings)
    # Say once, loudly, what would otherwise be one warning per task and every circuit open.
    for problem in endpoint_problems(registry, settings=settings):
        log.warning(problem)
    return asyncio.run(Worker(settings, registry, worker_id).run())
