"""The router: one faust-streaming app that owns task routing, the bandit statistics and health.

Flow (all Kafka traffic goes through aiokafka inside Faust; every byte through ``Serde``)::

    tasks ────────┐ co-partitioned by task id        ┌─▶ assignments (TaskAssigned)
    trajectories ─┼──▶ route (batches) ──────────────┼─▶ trajectories + rewards (final failures)
    rewards ──────┘    RouterCore: tables tasks,     └─▶ <app>-health (outcomes per agent)
                       ledger; the clock (a heap)
    heartbeats ──▶ forward-heartbeats ──▶ <app>-health ──▶ keep-health (table health)
                                                               ──▶ agent-health
    heartbeats, agent-health, checkpoints, <app>-stats ──▶ every worker (no group): Directory,
                       policy, the fleet's statistics

* **No repartition hop**: ``tasks``, ``trajectories`` and ``rewards`` are keyed by task id
  with one partition count, so the worker that owns partition ``p`` of one owns it of all, and
  a task's record, its ledger and the shards it updates live on ``p``. A hot task type spreads
  over every partition and every router worker.
* **Batches**: the route agent handles up to ``router_batch_max`` records at a time (within
  ``router_batch_window_ms``): results first, then tasks highest priority first (FIFO within
  a priority). Every record names its own partition for the table writes it causes
  (:func:`streams.stores.at_partition`), so a batch may mix partitions.
* **Order of effects** (:meth:`Router.finish`): the batch's table writes are acknowledged by
  the broker before any event it decided is sent and before the batch is acked, so a kill
  never leaves an assignment out whose record was lost (a restarted owner could otherwise give
  the same attempt to another agent); the events go out in the background, and those not
  confirmed delivered are sent again by the next owner (same event ids).
* **Statistics**: each worker keeps the shards of its partitions (streams/shards.py) and
  publishes the ones it changed every ``router_stats_interval_s`` to ``<app>-stats``, which
  every worker reads; decisions use the sum over all partitions. The ledger table (RocksDB
  by default) holds the shards and each task's counted outcomes, written once per batch.
* **Clock**: due times are on a heap (a tick costs what is due); the clock changes records
  directly, naming each record's partition. After each rebalance a worker schedules the
  records of the partitions it now owns.
* **Health**: one owner per agent (keyed by agent id) runs the state machine of
  ``streams/health.py`` on heartbeats and on the outcomes each batch reports (one record per
  agent per batch) and publishes each change on ``agent-health``.
* **Task status**: the states the core decides (assigned, waiting, succeeded, failed) go to
  Redis through :class:`streams.status.StatusWriter`, retried until applied.
* **Failures**: a transient one (the registry or a broker away) is retried with backoff and
  the batch is not acked meanwhile; a record that can never succeed (undecodable, invalid,
  too large to send, or whose handler raised) goes to ``dead-letters`` with the reason.

Kafka plumbing (the Faust app's broker settings, internal topics, the group-less reader) is
in ``streams/kafka.py``; decisions are pure, in ``streams/router.py``. Why this file is
longer than ~400 lines: it is the one place where the flow above is wired (agents, their
handlers, clocks and views of one Faust app, each small); splitting the handlers from the
agents that call them would spread one flow over files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import faust
from faust.types import TP, EventT

from stormline import logs, metrics, tracing
from stormline.logs import install_redaction
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.catalog import (
    AGENT_HEALTH,
    ASSIGNMENTS,
    DEAD_LETTERS,
    HEARTBEATS,
    REWARDS,
    TASKS,
    TRAJECTORIES,
)
from stormline.schemas.kafka import dead_letter
from stormline.schemas.lifecycle import FINAL, TaskState
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    CheckpointPublished,
    Event,
    Reward,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    WorkerStatus,
)
from stormline.schemas.serde import DecodeError, RegistryUnavailable, Serde
from stormline.settings import Settings
from stormline.state import RedisState
from stormline.streams.health import AgentHealth, Directory, HealthConfig
from stormline.streams.kafka import (
    CAUGHT_UP,
    app_id,
    committed_offsets,
    ensure_internal_topics,
    faust_app,
    mark_clean_stop,
    partitions,
    read_broadcast,
    read_range,
    replicas,
    reset_tables_after_a_kill,
    snapshot_record,
    stats_topic,
    unstick_recovery,
)
from stormline.streams.ledger import META
from stormline.streams.metrics import instrument
from stormline.streams.policy import load_policy
from stormline.streams.qtable import QCell
from stormline.streams.router import (
    Effects,
    Outcome,
    RouterConfig,
    RouterCore,
    at,
    by_priority,
    epoch,
    sent_key,
)
from stormline.streams.shards import ShardBook
from stormline.streams.status import StatusWriter
from stormline.streams.stores import KeyedTable, at_partition
from stormline.streams.stores import register as register_stores
from stormline.streams.strategies import StrategyConfig

log = logging.getLogger("stormline.router")

R = TypeVar("R")
# Transient failures (the registry or a broker away) are retried with backoff, never acked;
# the stream waits meanwhile. Only a record that can never succeed goes to dead-letters.
RETRY = RetryPolicy(base_s=0.2, max_s=5.0)
DELIVERIES = 64  # batches whose events may wait for delivery at once
CARRY_S = 300.0  # how long a partition taken over remembers its shards' last outcomes
RECOVERY_STALL_S = 20.0  # a table recovery reading nothing this long is sought again
SWEEP_EVERY_S = 1.0  # how often a slice of the ledger is swept for entries past retention
# A partition whose log holds records past what this worker saw, and that delivered nothing
# this long (at two checks in a row), is read by the router itself (Router.undelivered).
UNDELIVERED_AFTER_S = 10.0
SWEEP_SLICE = 1_000  # entries looked at per sweep: ~86M a day, a few ms of CPU a second


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the registry or a broker unreachable, not the record."""
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError

    if isinstance(exc, MessageSizeTooLargeError):
        return False
    return isinstance(exc, (RegistryUnavailable, OSError, asyncio.TimeoutError, KafkaError))


def exit_to_recover(why: str) -> NoReturn:
    """Exit at once, as a kill -9 would: nothing more is acked or committed, and the restart
    recovers the tables from their changelogs and reads the unacked records again."""
    log.critical("%s; exiting to recover", why)
    logging.shutdown()
    os._exit(75)


async def retrying(what: str, fn: Callable[[], Awaitable[R]]) -> R:
    """``await fn()`` until it succeeds or fails for a reason that is not transient."""
    try:  # the common case without building a retry policy's state per call
        return await fn()
    except Exception as exc:
        if not transient(exc):
            raise
        log.warning("%s failed (%s); retrying with backoff", what, exc)
    async for attempt in RETRY.async_retrying(transient, log=log, what=what):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: the retry policy never stops on a transient failure")


def router_config(s: Settings, partition_count: int = 1) -> RouterConfig:
    from stormline.schemas.catalog import REWARDS as _REWARDS

    if s.router_probe_successes > s.router_probe_tasks:
        raise ValueError(
            "STORMLINE_ROUTER_PROBE_SUCCESSES must not exceed STORMLINE_ROUTER_PROBE_TASKS, "
            "or a half-open circuit could never close"
        )
    discount = s.router_discount
    if discount is None and s.router_step_size is not None:
        discount = 1.0 - s.router_step_size  # the older name of the same recency weighting
    return RouterConfig(
        strategy=StrategyConfig(
            name=s.router_strategy,
            epsilon=s.router_epsilon,
            epsilon_min=s.router_epsilon_min,
            epsilon_decay=s.router_epsilon_decay,
            ucb_c=s.router_ucb_c,
        ),
        health=HealthConfig(
            heartbeat_timeout_s=s.router_heartbeat_timeout_s,
            error_threshold=s.router_circuit_errors,
            cooldown_s=s.router_circuit_cooldown_s,
            probe_tasks=s.router_probe_tasks,
            probe_successes=s.router_probe_successes,
            probe_timeout_s=s.router_assignment_ttl_s,
        ),
        assignment_ttl_s=s.router_assignment_ttl_s,
        max_attempts=s.router_max_attempts,
        retry_s=s.router_retry_s,
        default_deadline_s=s.router_default_deadline_s,
        done_retention_s=s.router_done_retention_s,
        # The rewards topic's retention; -1 (or any value <= 0) keeps them, and the ledger,
        # for ever.
        ledger_retention_s=(
            _REWARDS.retention(s) / 1000.0 if _REWARDS.retention(s) > 0 else math.inf
        ),
        policy_weight=s.router_policy_weight,
        failure_value=s.router_failure_value,
        discount=discount if discount is not None and discount < 1.0 else None,
        cost_weight=s.router_cost_weight,
        partitions=partition_count,
        seed=s.router_seed or 0,
    )


@dataclass
class Batch:
    """What one batch (or one clock tick) decided, to deliver in :meth:`Router.finish`."""

    # (event, the input record it came from or None, trace headers)
    events: list[tuple[Event, EventT[bytes] | None, Any]] = field(default_factory=list)
    outcomes: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    dead: list[tuple[EventT[bytes], str, str]] = field(default_factory=list)  # (record, kind, why)

    def add(self, fx: Effects, source: EventT[bytes] | None, headers: Any = None) -> None:
        self.events += [(e, source, headers) for e in fx.events]
        for o in fx.outcomes:
            self.outcomes[o.agent_id].append(o)


class _ReadAgain:
    """A record Faust skipped, read again (:meth:`Router._read_skipped`), in the shape of
    the Faust events the router handles: ``.message`` (topic, partition, offset, key,
    value, headers) and ``.value``."""

    def __init__(self, record: Any) -> None:
        self.message = record
        self.value = record.value


@dataclass
class _Delivery:
    issued: dict[int, int]  # partition -> highest sequence number of the batch
    batch: Batch | None  # what is still to send (None once sent)
    done: bool = False


class Router:
    """The Faust app and its parts; :func:`create` builds one from settings."""

    def __init__(self, settings: Settings, partition_count: int | None = None) -> None:
        s = self.settings = settings
        self.serde = Serde.from_settings(s)
        self.partitions = partition_count or partitions(s)
        self.cfg = router_config(s, self.partitions)
        self.directory = Directory(health=self.cfg.health)
        self.policies: dict[str, int] = {}
        self.extra: dict[str, int] = dict.fromkeys(
            (
                "dead_letters",
                "batches",
                "records",
                "policy_loads",
                "policy_load_failures",
                "records_read_again",
            ),
            0,
        )
        # policy -> (checkpoint, failed loads, next try): loads to try again.
        self._retry_checkpoint: dict[str, tuple[CheckpointPublished, int, float]] = {}
        self._started: float | None = None
        self._sweep: Iterator[tuple[str, Any]] | None = None
        self.ready: set[int] = set()  # partitions owned and recovered
        self.rebalanced_once = False  # the views answer only after the first recovery
        self.interrupted = False  # a stop cut table writes halfway: not a clean stop
        self.broadcast_read = False  # the shards other workers published, read to the end
        # (topic, partition) -> the next offset this worker must see (see _read_skipped)
        self._next: dict[tuple[str, int], int | None] = {}
        self._seen_at: dict[tuple[str, int], float] = {}  # when it last delivered (monotonic)
        self._suspects: dict[tuple[str, int], int | None] = {}  # behind at the last check
        self._rebalances = 0  # rebalances ended: a check that spans one is dropped
        self.lock = asyncio.Lock()  # one batch or clock tick changes the tables at a time
        self._outbox = asyncio.Event()  # batches wait in _deliveries for deliver()
        self._confirming = True  # until a delivery round fails (then a restart resends)
        self._acks: list[Any] = []  # sends acknowledged with the table writes (_durable)
        self._unsendable: list[tuple[str, int, str]] = []  # assignments the broker refused
        self._deliveries: collections.deque[_Delivery] = collections.deque()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self.app = faust_app(s, self.partitions, replicas(s))
        register_stores()
        self.tasks = self._table("tasks", "memory://")
        self.ledger = self._table("ledger", f"{s.router_store}://")
        self.health = self.app.Table(
            "health",
            default=None,
            partitions=self.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
        )
        # The task statuses users read: the router decides assigned/waiting/final (contracts).
        self.state = RedisState(s)
        # Each decided status is written until Redis has taken it (issue 15).
        self.status = StatusWriter(self.state)
        self.book = ShardBook()
        self.core = RouterCore(
            self.cfg,
            tasks=self.tasks,
            ledger=self.ledger,
            book=self.book,
            directory=self.directory,
        )
        self.core.keep_moves = True
        self.core.track_delivery = True  # finish() confirms what Kafka acknowledged
        self.core.outcomes.buffered = True  # finish() writes the ledger once per batch
        self.core.holding = self.status.holds  # a final record stays until its status is out
        self._wire_topics()
        self._wire()

    def _table(self, name: str, store: str) -> Any:
        table = KeyedTable(
            self.app,
            name=name,
            default=None,
            store=store,
            partitions=self.partitions,
            beacon=self.app.tables.beacon,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
        )
        return self.app.tables.add(table)

    def _wire_topics(self) -> None:
        app, s = self.app, self.settings

        def raw(*names: str, internal: bool = False, n: int | None = None) -> Any:
            kw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
            if internal:
                kw.update(partitions=n or self.partitions, internal=True)
            return app.topic(*names, **kw)

        self.kinds: dict[str, type[Event]] = {
            TASKS.name(s): TaskSubmitted,
            TRAJECTORIES.name(s): Trajectory,
            REWARDS.name(s): Reward,
        }
        self.t_inputs = raw(*self.kinds)
        self.t_heartbeats = raw(HEARTBEATS.name(s))
        self.out: dict[type[Event], Any] = {
            TaskAssigned: raw(ASSIGNMENTS.name(s)),
            Trajectory: raw(TRAJECTORIES.name(s)),
            Reward: raw(REWARDS.name(s)),
            AgentHealthChanged: raw(AGENT_HEALTH.name(s)),
        }
        self.t_dead = raw(DEAD_LETTERS.name(s))
        self.health_in = raw(f"{app_id(s)}-health", internal=True)
        self.t_stats = raw(stats_topic(s), internal=True, n=1)

    # ------------------------------------------------------------------ batches --
    async def handle(self, events: list[EventT[bytes]]) -> None:
        """One batch of input records: decode, decide (results first, then tasks by
        priority), deliver."""
        decoded: list[tuple[EventT[bytes], Any]] = []
        for ev in await self._read_skipped(events):
            etype = self.kinds[ev.message.topic]
            try:
                decoded.append((ev, await self.decoded(ev, etype)))
            except DecodeError as exc:
                await self.dead_letter(ev, exc.kind, exc.message)
        async with self.settled():
            batch = Batch()
            now = time.time()
            tasks: list[tuple[TaskSubmitted, EventT[bytes]]] = []
            for ev, obj in decoded:
                if ev.message.partition not in self.ready:
                    continue  # moved to another worker meanwhile: it reads the record again
                if isinstance(obj, TaskSubmitted):
                    tasks.append((obj, ev))
                else:
                    self._guarded(ev, batch, functools.partial(self._result, ev, obj, now))
            for task, ev in by_priority(tasks):
                self._guarded(ev, batch, functools.partial(self._task, ev, task, now))
            self.extra["batches"] += 1
            self.extra["records"] += len(events)
            await self.finish(batch)

    async def _read_skipped(self, events: list[EventT[bytes]]) -> list[Any]:
        """``events`` with any record Faust skipped before them read again, in order.

        faust-streaming 0.15.3 can lose the first records of a partition right after a
        restart's recovery (seen in the chaos test: a worker started, and the first one or
        two records after the committed offset of three partitions never reached the
        agent), and its gap bookkeeping then commits past them: four tasks were never
        routed. So the worker checks that each partition's offsets follow on from the
        group's committed offset, and reads what is missing itself before the batch.
        """
        unknown = {
            (ev.message.topic, ev.message.partition)
            for ev in events
            if ev.message.partition in self.ready
            and (ev.message.topic, ev.message.partition) not in self._next
        }
        if unknown:
            group = app_id(self.settings)
            self._next.update(
                await retrying(
                    "reading the committed offsets",
                    lambda: committed_offsets(self.settings, group, unknown),
                )
            )
        out: list[Any] = []
        for ev in events:
            msg = ev.message
            tp = (msg.topic, msg.partition)
            want = self._next.get(tp)
            if msg.partition in self.ready and want is not None and msg.offset > want:
                again = await retrying(
                    "reading skipped records",
                    functools.partial(
                        read_range, self.settings, msg.topic, msg.partition, want, msg.offset
                    ),
                )
                log.warning(
                    "%s[%d]: offsets %d to %d never reached the router; read again (%d records)",
                    msg.topic,
                    msg.partition,
                    want,
                    msg.offset - 1,
                    len(again),
                )
                self.extra["records_read_again"] += len(again)
                out += [_ReadAgain(rec) for rec in again]
            out.append(ev)
            self._next[tp] = msg.offset + 1
            self._seen_at[tp] = time.monotonic()
        return out

    async def undelivered(self) -> None:
        """Read the records Faust never delivered, where no later record shows the gap.

        :meth:`_read_skipped` catches a record Faust skipped when a later one of the same
        partition arrives. When none does (the skipped record was the partition's last, as
        for a task published alone right after a restart), this clock does: a partition
        whose log ends past the next offset this worker must see, and that delivered
        nothing for :data:`UNDELIVERED_AFTER_S` at two checks in a row, has the missing
        records read here and handled as a batch. A record Faust was about to deliver after
        all is handled twice, which every handler absorbs (redelivery after a crash is the
        same case).
        """
        if self.app.rebalancing or not self.ready:
            return
        generation, now = self._rebalances, time.monotonic()
        idle = {
            (topic, p)
            for topic in self.kinds
            for p in self.ready
            if now - self._seen_at.get((topic, p), now) >= UNDELIVERED_AFTER_S
        }
        if not idle:
            return
        unknown = {tp for tp in idle if tp not in self._next}
        committed: dict[tuple[str, int], int | None] = {}
        if unknown:
            group = app_id(self.settings)
            committed = await retrying(
                "reading the committed offsets",
                lambda: committed_offsets(self.settings, group, unknown),
            )
        try:
            ends = await self.app.consumer.highwaters(*(TP(t, p) for t, p in idle))
        except Exception as exc:  # the broker away: the next check asks again
            log.info("undelivered check: end offsets not read (%s)", exc)
            return
        if generation != self._rebalances:
            return  # the partitions moved meanwhile: what was read above is stale
        for tp, offset in committed.items():
            self._next.setdefault(tp, offset)  # unless a record arrived meanwhile
        suspects, self._suspects = self._suspects, {}
        events: list[Any] = []
        for topic, p in sorted(idle):
            tp = (topic, p)
            end = ends.get(TP(topic, p))
            start = self._next.get(tp)
            delivered = self._seen_at.get(tp, now) > now  # a record arrived meanwhile
            if end is None or (start or 0) >= end or delivered:
                continue
            if tp not in suspects or suspects[tp] != start:
                self._suspects[tp] = start  # behind: act if it still is at the next check
                continue
            again = await retrying(
                "reading undelivered records",
                functools.partial(read_range, self.settings, topic, p, start or 0, end),
            )
            log.warning(
                "%s[%d]: offsets %d to %d never reached the router in %.0fs; read by the "
                "router itself (%d records)",
                topic,
                p,
                start or 0,
                end - 1,
                now - self._seen_at.get(tp, now),
                len(again),
            )
            self.extra["records_read_again"] += len(again)
            events += [_ReadAgain(rec) for rec in again]
        if events:
            await self.handle(events)

    def _result(self, ev: EventT[bytes], obj: Any, now: float) -> tuple[Effects, Any]:
        p = ev.message.partition
        with at_partition(p):
            if isinstance(obj, Trajectory):
                return self.core.on_trajectory(obj, now, p), None
            self.core.on_reward(obj, now, p)
            return Effects([], []), None

    def _task(self, ev: EventT[bytes], task: TaskSubmitted, now: float) -> tuple[Effects, Any]:
        p = ev.message.partition
        attrs = {"stormline.task_id": task.task_id, "stormline.task_type": task.task_type}
        with (
            at_partition(p),
            tracing.continued("stormline.router.route", ev.message.headers, attrs),
            logs.bound(task_id=task.task_id),
        ):
            headers = tracing.inject()  # the assignment carries the task's trace onwards
            trace = {k: v.decode() for k, v in headers} if headers else None
            return Effects(self.core.on_task(task, now, p, trace), []), headers

    def _guarded(
        self,
        ev: EventT[bytes],
        batch: Batch,
        step: Callable[[], tuple[Effects, Any]],
    ) -> None:
        """Run one record's step; a step that raises dead-letters its record (after the
        batch's decisions, which never wait), the rest goes on."""
        try:
            fx, headers = step()
        except Exception as exc:
            log.exception("router handler failed")
            batch.dead.append((ev, "handler", f"{type(exc).__name__}: {exc}"))
            return
        batch.add(fx, ev, headers)

    @contextlib.asynccontextmanager
    async def settled(self) -> AsyncIterator[None]:
        """The tables to change, outside any rebalance: which partitions are this worker's
        is known only after one (and :meth:`rebalanced` needs the lock during it)."""
        while True:
            while self.app.rebalancing:
                await asyncio.sleep(0.05)
            await self.lock.acquire()
            if not self.app.rebalancing:
                break
            self.lock.release()
        try:
            yield
        except asyncio.CancelledError:
            self.interrupted = True  # a stop cut table writes halfway: not a clean stop
            raise
        finally:
            self.lock.release()

    async def finish(self, batch: Batch) -> None:
        """Deliver what ``batch`` decided, in the order that keeps the guarantees.

        Called with the tables locked, right after the batch's decisions. The table writes
        are made here and awaited until the broker acknowledged them: only then may an
        event they caused leave (a restarted owner could otherwise give the same attempt to
        another agent), and only then is the batch acked to Faust (which commits offsets
        after its own producer flush, which may return before its writes are out). The
        events go out in the background (:meth:`deliver`), so the next batch is decided
        while this one's are acknowledged; deliveries are confirmed in batch order
        (:meth:`_confirm`).
        """
        self._record_moves()
        self._write_ledger()
        self._confirm()
        issued, self.core.issued = self.core.issued, {}
        for agent, theirs in batch.outcomes.items():
            # With the table writes, acknowledged before the batch is: a probe's outcome lost
            # with a kill would leave its agent's circuit half-open.
            body = json.dumps({"k": "out", "n": [[o.ok, o.detail[:500]] for o in theirs]})
            sent = self.health_in.send_soon(key=agent.encode(), value=body.encode())
            self._acks.append(sent)
        await self._durable()
        for ev, kind, why in batch.dead:
            await self.dead_letter(ev, kind, why)
        if batch.events:
            while len(self._deliveries) >= DELIVERIES:  # back-pressure: the broker lags
                await asyncio.sleep(0.005)
                self._confirm()
            self._deliveries.append(_Delivery(issued, batch))
            self._outbox.set()
        # At once if Redis answers; otherwise the status clock retries (never waits here).
        if self.status.pending:
            self._background(self.status.flush())

    async def _durable(self) -> None:
        """Until the broker acknowledged every table write made so far.

        A write the producer gave up on (the broker away past its timeouts) leaves this
        process's tables ahead of their changelogs: it exits at once, as a kill -9 would,
        so that nothing more is acked or committed, and its restart recovers from the
        changelogs and reads the records again."""
        pending = self.tasks.take_unacked() + self.ledger.take_unacked() + self._acks
        self._acks = []
        if not pending:
            return
        try:
            await asyncio.gather(*pending)
        except Exception as exc:
            exit_to_recover(f"a table write was not acknowledged ({exc})")

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def deliver(self) -> None:
        """Send the events of every batch decided since the last round (their table writes
        are acknowledged already: :meth:`finish`), all at once, so that under load one
        round of produce requests serves many batches."""
        while True:
            await self._outbox.wait()
            self._outbox.clear()
            rounds = [d for d in self._deliveries if d.batch is not None]
            batches = [d.batch for d in rounds if d.batch is not None]
            events = [e for b in batches for e in b.events]
            try:
                await asyncio.gather(*(self._send(e, src, h) for e, src, h in events))
            except Exception:
                # What was not sent stays marked unsent in its records; no delivery is
                # confirmed from now on, so a restart sends every one not known delivered.
                log.exception("delivering %d events failed", len(events))
                self._confirming = False
            finally:
                for d in rounds:
                    d.batch, d.done = None, True

    def _confirm(self) -> None:
        """Confirm the deliveries done so far, oldest first, while the partition is ours.

        A partition's watermark may only pass a sequence number once every event up to it is
        delivered, so a batch is confirmed only after every earlier one."""
        while self._deliveries and self._deliveries[0].done:
            for p, seq in self._deliveries.popleft().issued.items():
                if self._confirming and p in self.ready and not self.app.rebalancing:
                    with at_partition(p):
                        self.core.delivered(p, seq)

    def _write_ledger(self) -> None:
        """The ledger writes of the outcomes just counted (shards first: RouterCore says why)."""
        for key, value in self.core.outcomes.take_writes(time.time()):
            with at_partition(int(value["p"])):
                self.ledger[key] = value

    async def _send(self, ev: Event, source: EventT[bytes] | None, headers: Any) -> None:
        name = self.out[type(ev)].get_topic_name()
        producer = self.app.producer

        async def send() -> Any:
            value = self.serde.encode(name, ev)
            # Faust's producer (the tables' one, so its flush covers both) without the
            # Topic.send wrapping per message.
            sent = await producer.send(name, ev.key().encode(), value, None, None, headers)
            return await sent  # delivered (acks=all), not just buffered

        try:
            await retrying(f"sending {type(ev).__name__}", send)
        except Exception as exc:  # too large for the broker: it can never be sent
            log.error("could not send %s of task %s: %s", type(ev).__name__, ev.key(), exc)
            if source is not None:
                await self.dead_letter(source, "oversize", f"{type(exc).__name__}: {exc}")
            if isinstance(ev, TaskAssigned):  # its task fails at the next tick, nobody blamed
                why = f"assignment could not be sent: {type(exc).__name__}: {exc}"[:500]
                self._unsendable.append((ev.task_id, ev.attempt, why))
            return
        if isinstance(ev, TaskAssigned):
            self._routed(ev.task.task_type, ev.agent_id).inc()

    @functools.lru_cache(maxsize=4096)  # noqa: B019  (one router per process, bounded)
    def _routed(self, task_type: str, agent: str) -> Any:
        return metrics.TASKS_ROUTED.labels(task_type, agent, self.cfg.strategy.name)

    def _record_moves(self) -> None:
        """The task states the core decided, queued for Redis (guarded there by the
        lifecycle); :meth:`finish` flushes the queue without waiting for a Redis away."""
        moves, self.core.moves = self.core.moves, []
        for task_id, state, attempt in moves:
            rec = self.tasks.get(task_id) or {}
            fields: dict[str, Any] = {}
            if state == TaskState.ASSIGNED:
                fields["agent_id"] = rec.get("agent")
            elif state == TaskState.FAILED:
                fields["error"] = rec.get("reason")
            self.status.add(task_id, state, attempt, fields)

    # --------------------------------------------------------------- the clock --
    async def tick(self) -> None:
        """Every record that came due: expire, reassign, retry, resend, forget."""
        if self.app.rebalancing:
            return
        self._grace_until()
        async with self.settled():
            now = time.time()
            batch = Batch()
            unsendable, self._unsendable = self._unsendable, []
            for tid, attempt, why in unsendable:
                rec = self.tasks.get(tid)
                if rec is not None and rec.get("p") in self.ready:
                    with at_partition(int(rec["p"])):
                        batch.add(self.core.cannot_assign(tid, attempt, why, now), None)
            for p, tid in self.core.schedule.pop_due(now, self.ready.__contains__):
                rec = self.tasks.get(tid)
                with at_partition(p), self._trace_of(rec):
                    try:
                        fx = self.core.on_tick(tid, now)
                    except Exception:
                        log.exception("router clock failed on task %s", tid)
                        continue
                    batch.add(fx, None, tracing.inject() if fx.events else None)
            await self.finish(batch)

    def _trace_of(self, rec: Any) -> Any:
        if not tracing.enabled() or not rec or "trace" not in rec or rec.get("state") in FINAL:
            return contextlib.nullcontext()
        attrs = {"stormline.task_id": rec.get("task", {}).get("task_id", "")}
        return tracing.continued("stormline.router.route", rec["trace"], attrs)

    def _grace_until(self) -> float:
        """End of the catch-up grace after this worker started.

        After a restart the tables hold the last heartbeat times and attempt expiries from
        before the outage, while the heartbeats and trajectories sent meanwhile are still in
        the backlog. Judging agents down or attempts expired before that backlog is read
        would punish them for the router's own outage, so the clocks wait one heartbeat
        timeout first.
        """
        if self._started is None:
            self._started = time.time()
            self.core.hold_expiry_until = self._started + self.cfg.health.heartbeat_timeout_s
        return self._started + self.cfg.health.heartbeat_timeout_s

    async def rebalanced(self) -> None:
        """After a rebalance's recovery: own the partitions assigned now, drop the rest."""
        name = TASKS.name(self.settings)
        assigned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == name}
        async with self.lock:
            for p in self.ready - assigned:
                self.book.disown(p)
            gained = assigned - self.ready
            self.ready = assigned
            self._next.clear()  # each partition's next offset is the group's committed one
            self._rebalances += 1
            self._suspects.clear()
            since = time.monotonic()
            self._seen_at = {(topic, p): since for topic in self.kinds for p in assigned}
            records = [
                (tid, rec)
                for tid, rec in list(self.tasks.items())
                if rec and not tid.startswith(META) and rec.get("p") in gained
            ]
            now = time.time()
            # The backlog of a partition taken over is read before its attempts expire; the
            # outcomes its shards' last writes counted are remembered while it is re-read.
            hold = now + self.cfg.health.heartbeat_timeout_s
            for p in sorted(gained):
                with at_partition(p):
                    mine = [(t, r) for t, r in records if r.get("p") == p]
                    self.core.adopt(p, mine, hold_until=hold)
                    shards = self.core.outcomes.load_partition(p, carry_until=now + CARRY_S)
                    self.book.own(p, shards)
            self._sweep = None
            # Statuses queued before a kill, or lost in Redis, are re-derived from the records.
            queued = self.status.resync(records)
            self.rebalanced_once = True
        log.info(
            "owning partitions %s (%d records taken over, %d statuses re-queued)",
            sorted(assigned),
            len(records),
            queued,
        )

    async def publish_stats(self) -> None:
        """The shards this worker changed, to every router worker."""
        for p, pair, cell in self.book.take_dirty():
            key, value = snapshot_record(p, pair, cell.to_dict())
            await self.forward(self.t_stats, key, value)

    async def sweep(self) -> None:
        """Forget ledger entries past the rewards topic's retention, a slice at a time.

        The slice is read outside the lock (a read of the table's own snapshot), so a long
        ledger's sweep never holds the routing up; only the deletes take the lock.
        """
        if self.app.rebalancing:
            return
        if self._sweep is None:
            items = self.ledger.items()
            # A dict must not change under its iterator; RocksDB's iterator reads a
            # snapshot, so a long ledger is never copied into memory.
            self._sweep = iter(list(items)) if _in_memory(self.ledger) else iter(items)
        chunk = []
        try:
            for _ in range(SWEEP_SLICE):
                chunk.append(next(self._sweep))
        except StopIteration:
            self._sweep = None
        except Exception:  # the table moved under the iterator (a rebalance): start over
            self._sweep = None
        now = time.time()
        expired = self.core.outcomes.expired(chunk, now)
        if not expired:
            return
        async with self.settled():
            for p, key in expired:
                if p in self.ready:
                    with at_partition(p):
                        # Read again: the slice's copy may predate a reward counted since.
                        if self.core.outcomes.expired([(key, self.ledger.get(key))], now):
                            self.ledger.pop(key, None)

    # ----------------------------------------------------------------- plumbing --
    async def decoded(self, ev: EventT[bytes], etype: type[Any]) -> Any:
        """``ev``'s value decoded; transient failures (the registry away) retried.

        DecodeError (a record that can never decode) is the caller's to dead-letter.
        """
        value = ev.value
        if value is not None and len(value) > self.settings.max_record_bytes:
            raise DecodeError("oversize", f"record of {len(value)} bytes exceeds max_record_bytes")
        try:
            return self.serde.decode(value, etype)
        except RegistryUnavailable:
            pass

        async def decode() -> Any:
            return self.serde.decode(value, etype)

        return await retrying(f"decoding {etype.__name__}", decode)

    async def forward(self, topic: Any, key: bytes, value: bytes, headers: Any = None) -> None:
        """Send to one of the router's own topics, retrying transient failures."""
        await retrying(
            f"sending to {topic.get_topic_name()}",
            lambda: topic.send(key=key, value=value, headers=headers),
        )

    async def dead_letter(self, ev: EventT[bytes], kind: str, error: str) -> None:
        msg = ev.message
        self.extra["dead_letters"] += 1
        key = msg.key if isinstance(msg.key, bytes) else None
        letter = dead_letter(
            self.settings,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=key,
            value=msg.value if isinstance(msg.value, bytes) else None,
            kind=kind,
            error=error,
            group=app_id(self.settings),
        )
        if letter is not None:

            async def send() -> Any:
                value = self.serde.encode(self.t_dead.get_topic_name(), letter)
                return await self.t_dead.send(key=key or b"", value=value)

            await retrying("sending a dead letter", send)

    # ------------------------------------------------------------------- agents --
    def _wire(self) -> None:
        app, s = self.app, self.settings

        @app.agent(self.t_inputs, name="route")
        async def route(stream: Any) -> None:
            async for events in stream.take_events(
                s.router_batch_max, s.router_batch_window_ms / 1000
            ):
                # take_events acks the batch in a finally, also when a stop cancels the
                # handler halfway or the handler raises: a reference of our own keeps its
                # offsets uncommitted until the batch is done, so such a batch is read again.
                for ev in events:
                    ev.message.incref()
                try:
                    await self.handle(events)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or not task.cancelling():
                        # Not a stop: a future inside was cancelled. Faust would restart the
                        # agent with this batch held, pinning its partitions' commits.
                        exit_to_recover("a batch was cancelled from inside")
                    log.warning(
                        "stopped with a batch in hand (%d records): not committed, it is read "
                        "again at the next start",
                        len(events),
                    )
                    raise
                except Exception as exc:
                    log.exception("a batch of %d records failed", len(events))
                    exit_to_recover(f"a batch failed ({type(exc).__name__})")
                for ev in events:
                    ev.message.decref()

        @app.agent(self.t_heartbeats, name="forward-heartbeats")
        async def forward_heartbeats(stream: Any) -> None:
            async for ev in stream.events():
                try:
                    hb = await self.decoded(ev, AgentHeartbeat)
                except DecodeError as exc:
                    await self.dead_letter(ev, exc.kind, exc.message)
                    continue
                stopped = hb.status == WorkerStatus.STOPPED
                for agent in sorted({*hb.agent_ids, *hb.capabilities}):
                    body = {"k": "hb", "caps": hb.capabilities.get(agent), "stopped": stopped}
                    await self.forward(self.health_in, agent.encode(), json.dumps(body).encode())

        @app.agent(self.health_in, name="keep-health")
        async def keep_health(stream: Any) -> None:
            async for ev in stream.events():
                try:
                    await self._health_one(ev.key.decode(), json.loads(ev.value))
                except Exception as exc:
                    log.exception("health handler failed")
                    await self.dead_letter(ev, "handler", f"{type(exc).__name__}: {exc}")

        self._wire_clocks()
        self._wire_views()

    def _wire_clocks(self) -> None:
        app, s = self.app, self.settings

        @app.on_rebalance_complete.connect
        async def on_rebalanced(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            await self.rebalanced()

        @app.timer(interval=s.router_tick_s, name="task-clock")
        async def task_clock() -> None:
            await self.tick()

        @app.timer(interval=s.router_tick_s, name="health-clock")
        async def health_clock() -> None:
            now = time.time()
            if now < self._grace_until():
                return
            timeout = self.cfg.health.heartbeat_timeout_s
            for agent, rec in list(self.health.items()):
                if (
                    rec
                    and rec.get("status") in ("healthy", "degraded")
                    and now - float(rec.get("last_seen", 0)) > timeout
                ):
                    await self.forward(self.health_in, agent.encode(), b'{"k": "check"}')

        @app.timer(interval=0.25, name="status-clock")
        async def status_clock() -> None:
            await self.status.flush()

        @app.timer(interval=s.router_stats_interval_s, name="stats-clock")
        async def stats_clock() -> None:
            await self.publish_stats()

        @app.timer(interval=SWEEP_EVERY_S, name="sweep-clock")
        async def sweep_clock() -> None:
            await self.sweep()

        @app.timer(interval=UNDELIVERED_AFTER_S / 2, name="undelivered-clock")
        async def undelivered_clock() -> None:
            await self.undelivered()

        @app.timer(interval=RECOVERY_STALL_S / 4, name="recovery-watchdog")
        async def recovery_watchdog() -> None:
            await unstick_recovery(app, RECOVERY_STALL_S)

        @app.timer(interval=1.0, name="checkpoint-clock")
        async def checkpoint_clock() -> None:
            await self._retry_checkpoints()

        @app.task
        async def redaction() -> None:
            # Faust has configured its logging handlers by now (app tasks start with the
            # worker): mask secrets by value in every record of theirs too.
            install_redaction(s, loggers=("faust", "mode", "aiokafka"))

        @app.task
        async def deliverer() -> None:
            await self.deliver()

        @app.task
        async def broadcast() -> None:
            async for item in read_broadcast(self.settings, self.serde):
                await self._on_broadcast(item)

    def recovering(self) -> bool:
        """Whether this worker's view of the fleet is being rebuilt right now: before the
        first rebalance's recovery has ended, during a later one, or before the shards the
        other workers published were read to the end once."""
        return not (self.rebalanced_once and self.broadcast_read) or bool(self.app.rebalancing)

    def _wire_views(self) -> None:
        app = self.app

        def table_view(snapshot: Callable[[], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
            # The web server starts before the tables are recovered: a view served then
            # would show a partial table as if it were the whole (a Q-table missing most of
            # its counts). 503 until recovery ends, as a readiness probe expects.
            async def serve(web: Any, request: Any) -> Any:
                if self.recovering():
                    return web.json(
                        {"error": "the router is recovering its tables; ask again shortly"},
                        status=503,
                        headers={"Retry-After": "1"},
                    )
                return web.json(snapshot())

            return serve

        app.page("/router/qtable/", name="router-qtable")(table_view(self.qtable_snapshot))
        app.page("/router/health/", name="router-health")(table_view(self.health_snapshot))

        @app.page("/router/counters/", name="router-counters")
        async def counters_view(web: Any, request: Any) -> Any:
            # Always answers (the liveness probe): "recovering" says whether it is ready.
            return web.json(self.counters())

    # ------------------------------------------------------------------- health --
    async def _health_one(self, agent: str, msg: dict[str, Any]) -> None:
        now = time.time()
        h = AgentHealth.from_dict(agent, self.health.get(agent))
        k = msg.get("k")
        changes = []
        if k == "hb":
            changes.append(
                h.heartbeat(now, msg.get("caps"), bool(msg.get("stopped")), self.cfg.health)
            )
        elif k == "out":
            if h.status.value == "unknown":
                return  # outcomes of an agent never seen alive do not create it
            for ok, detail in msg.get("n") or [[msg.get("ok"), msg.get("detail", "")]]:
                changes.append(h.outcome(now, bool(ok), str(detail), self.cfg.health))
        elif k == "check":
            changes.append(h.check(now, self.cfg.health))
        else:
            raise ValueError(f"unknown health message {k!r}")
        self.health[agent] = h.to_dict()
        for t in changes:
            if t is None:
                continue
            log.info("agent %s: %s -> %s (%s)", agent, t.previous, t.status, t.reason)
            change = AgentHealthChanged(
                agent_id=agent,
                status=t.status,
                previous=t.previous,
                reason=t.reason,
                occurred_at=at(t.at),
            )
            await self._send(change, None, None)

    # --------------------------------------------------------- broadcast reader --
    async def _on_broadcast(self, item: Any) -> None:
        if item is CAUGHT_UP:
            self.broadcast_read = True
        elif isinstance(item, tuple):  # a published shard
            p, pair, data = item
            self.book.snapshot(p, pair, QCell.from_dict(data))
        elif isinstance(item, AgentHeartbeat):
            self.directory.heartbeat(item.capabilities, item.agent_ids)
        elif isinstance(item, AgentHealthChanged):
            self.directory.health_changed(
                item.agent_id, item.status, item.previous, epoch(item.occurred_at)
            )
        elif isinstance(item, CheckpointPublished):
            await self._load_checkpoint(item)

    async def _load_checkpoint(self, event: CheckpointPublished) -> bool:
        """Load ``event``'s policy; a version counts as seen only once it loaded (issue 18).

        A load that failed (the file not there yet on a shared volume, a read error) is
        retried by the checkpoint clock with backoff, until it loads or a newer one comes.
        """
        if event.version <= self.policies.get(event.policy, 0) or not event.promoted:
            self._retry_checkpoint.pop(event.policy, None)
            return False
        scorer = await asyncio.get_running_loop().run_in_executor(None, load_policy, event)
        if scorer is None:
            failures = self._retry_checkpoint.get(event.policy, (event, 0, 0.0))[1] + 1
            wait = min(60.0, 2.0 * 2 ** min(failures - 1, 5))
            log.warning(
                "checkpoint %s v%d not loaded (try %d); retrying in %.0fs",
                event.policy,
                event.version,
                failures,
                wait,
            )
            self._retry_checkpoint[event.policy] = (event, failures, time.time() + wait)
            self.extra["policy_load_failures"] += 1
            return False
        self._retry_checkpoint.pop(event.policy, None)
        self.policies[event.policy] = event.version
        self.core.scorer = scorer
        self.core.policy_version = event.policy_version
        self.extra["policy_loads"] += 1
        return True

    async def _retry_checkpoints(self) -> None:
        now = time.time()
        for event, _, at_ in list(self._retry_checkpoint.values()):
            if now >= at_:
                await self._load_checkpoint(event)

    # -------------------------------------------------------------------- views --
    def qtable_snapshot(self) -> dict[str, dict[str, Any]]:
        """The fleet's statistics per task type and agent (the sum of every shard)."""
        return {
            task_type: {agent: cell.to_dict() for agent, cell in agents.items()}
            for task_type, agents in self.book.by_type().items()
        }

    def health_snapshot(self) -> dict[str, Any]:
        return {
            "owned": {a: rec for a, rec in list(self.health.items())},
            "directory": {
                a: {
                    "capabilities": sorted(self.directory.capabilities.get(a, ())),
                    "status": self.directory.status(a).value,
                }
                for a in sorted({*self.directory.capabilities, *self.directory.budgets})
            },
        }

    def counters(self) -> dict[str, Any]:
        return {
            **self.core.counters,
            **self.extra,
            **self.status.counters,
            "status_pending": len(self.status.pending),
            "strategy": self.cfg.strategy.name,
            "policy_version": self.core.policy_version,
            "tasks_tracked": len(self.tasks)
            - sum(1 for p in range(self.partitions) if sent_key(p) in self.tasks),
            "scheduled": len(self.core.schedule),
            "owned_partitions": sorted(self.ready),
            "recovering": self.recovering(),
        }


def _in_memory(table: Any) -> bool:
    return not type(table.data).__name__.startswith("KeyedRocks")


def create(settings: Settings) -> Router:
    return Router(settings)


def run_router(settings: Settings, loglevel: str = "info") -> None:
    """Ensure the catalog and internal topics exist, then run the Faust worker (blocks)."""
    from stormline.runtime.admin import admin_client
    from stormline.schemas.kafka import ensure_topics
    from stormline.streams.kafka import check_copartitioned

    ensure_topics(settings)
    count = check_copartitioned(settings, admin_client(settings).list_topics(timeout=30))
    ensure_internal_topics(settings, count)
    tracing.setup(settings, "router")
    metrics.serve(settings.metrics_port, "router", settings.metrics_host)
    router = Router(settings, count)
    instrument(router)  # Faust's Prometheus sensor; /metrics on the web port too
    # JSON lines like every Stormline process: Faust applies this over its own colour format,
    # and --quiet drops its banner and spinner (plain text on stdout).
    router.app.conf.logging_config = logs.dict_config("router", loglevel, settings)
    argv = [
        "stormline-router",
        "--quiet",
        "worker",
        "--loglevel",
        {"warning": "warn", "critical": "crit"}.get(loglevel.lower(), loglevel.lower()),
        "--web-host",
        settings.router_web_host,
        "--web-port",
        str(settings.router_web_port),
    ]
    reset_tables_after_a_kill(router.app)
    saved = sys.argv
    sys.argv = argv
    try:
        router.app.main()  # always ends in SystemExit: 0 after a stop (SIGTERM), 1 on a crash
    except SystemExit as exc:
        # Only a stop that finished its batches leaves table files that match the changelogs
        # (a crash, or a batch cut halfway, may leave writes the broker never acknowledged).
        if exc.code in (0, None) and not router.interrupted:
            mark_clean_stop(router.app)
        raise
    finally:
        sys.argv = saved


__all__ = ["Router", "create", "router_config", "run_router"]
