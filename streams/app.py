"""The router: one faust-streaming app that owns task routing, Q-tables and agent health.

Flow (all Kafka traffic goes through aiokafka inside Faust; every byte through ``Serde``)::

    tasks ─┐ priority batches                   ┌─▶ assignments (TaskAssigned)
    traj. ─┼──▶ <app>-by-type (key task_type) ──┤   route: RouterCore + tables qtable/tasks/types
    rewards┘                ▲ clock ticks       └─▶ trajectories + rewards (final failures)
    heartbeats ─┐                                     │ attempt outcomes
                └──▶ <app>-health (key agent_id) ◀────┘   keep_health: table health ─▶ agent-health
    heartbeats, agent-health, checkpoints ──▶ every worker's Directory and policy (no group)

* **Repartitioning**: tasks, trajectories and rewards are re-keyed by task type onto one
  internal topic, so the worker that owns a partition owns the Q-cells of those task types and
  the records of their tasks; tables are co-partitioned with it. Two workers split the types,
  one worker holds them all, and the decisions per type are the same.
* **Priority**: the stateless forwarder reads tasks in batches (``router_batch_max`` within
  ``router_batch_window_ms``) and forwards each batch highest priority first (stable, so FIFO
  within a priority). Under backlog the batches are full, so a priority-9 task overtakes up to
  a whole batch of lower ones; with no backlog batches hold one task and nothing waits.
* **Health**: one owner per agent (keyed by agent id) runs the state machine of
  ``streams/health.py`` and publishes each change on ``agent-health``; every router worker
  reads that topic (and heartbeats for capabilities) without a consumer group, so all workers
  see every agent.
* **Clock**: Faust tables may only change inside stream iteration, so the timer sends ticks
  (task id, keyed by task type) through the by-type topic and the owner acts on them; a tick
  that is stale or duplicated is ignored because the task record is the truth. Due times are
  on a heap (a tick costs what is due); one full scan after each rebalance adds the records
  recovered from the changelog.
* **Task status**: the states the core decides (assigned, waiting, succeeded, failed) go to
  Redis through ``RedisState.set_status``, which the lifecycle guards (contracts.md).
* **Failures**: a transient one (the registry or a broker away) is retried with backoff and
  the record is not acked meanwhile; a record that can never succeed (undecodable, invalid,
  too large to send, or whose handler raised) goes to ``dead-letters`` with the reason (the
  one builder, ``stormline.schemas.kafka.dead_letter``).
* **Memory**: tables use :mod:`streams.stores` (memory) or RocksDB; after a rebalance a
  worker keeps only the keys of the partitions it owns.

Kafka plumbing (the Faust app's broker settings, internal topics, the group-less reader) is
in ``streams/kafka.py``; routing decisions are pure, in ``streams/router.py``. Why this file
is longer than ~400 lines: it is the one place where the flow above is wired (agents, their
handlers, clocks and views of one Faust app, each small); splitting the handlers from the
agents that call them would spread one flow over files. Issue 14's task-keyed redesign (no
by-type hop, shared statistics) replaces most of this wiring; the views, checkpoint loading
and ``router_config`` split out then.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, TypeVar

import faust
from faust.types import EventT

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
    ROUTER_AGENT,
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
    TABLES,
    app_id,
    ensure_internal_topics,
    faust_app,
    read_broadcast,
    replicas,
)
from stormline.streams.metrics import instrument
from stormline.streams.policy import load_policy
from stormline.streams.qtable import split_key
from stormline.streams.router import (
    Outcome,
    RouterConfig,
    RouterCore,
    at,
    by_priority,
    epoch,
)
from stormline.streams.status import StatusWriter
from stormline.streams.stores import register as register_store
from stormline.streams.strategies import StrategyConfig

log = logging.getLogger("stormline.router")

K_TASK, K_TRAJ, K_REWARD, K_TICK = b"T", b"J", b"R", b"K"
R = TypeVar("R")
# Transient failures (the registry or a broker away) are retried with backoff, never acked;
# the stream waits meanwhile. Only a record that can never succeed goes to dead-letters.
RETRY = RetryPolicy(base_s=0.2, max_s=5.0)


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the registry or a broker unreachable, not the record."""
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError

    if isinstance(exc, MessageSizeTooLargeError):
        return False
    return isinstance(exc, (RegistryUnavailable, OSError, asyncio.TimeoutError, KafkaError))


async def retrying(what: str, fn: Callable[[], Awaitable[R]]) -> R:
    """``await fn()`` until it succeeds or fails for a reason that is not transient."""
    async for attempt in RETRY.async_retrying(transient, log=log, what=what):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: the retry policy never stops on a transient failure")


def oversize(exc: BaseException) -> bool:
    from aiokafka.errors import MessageSizeTooLargeError

    return isinstance(exc, MessageSizeTooLargeError)


MISSING_TYPE = "<none>"  # trajectories/rewards that name no task type land together


def router_config(s: Settings) -> RouterConfig:
    if s.router_probe_successes > s.router_probe_tasks:
        raise ValueError(
            "STORMLINE_ROUTER_PROBE_SUCCESSES must not exceed STORMLINE_ROUTER_PROBE_TASKS, "
            "or a half-open circuit could never close"
        )
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
        ),
        step_size=s.router_step_size,
        assignment_ttl_s=s.router_assignment_ttl_s,
        max_attempts=s.router_max_attempts,
        retry_s=s.router_retry_s,
        default_deadline_s=s.router_default_deadline_s,
        done_retention_s=s.router_done_retention_s,
        ledger_retention_s=REWARDS.retention(s) / 1000.0,
        policy_weight=s.router_policy_weight,
        failure_value=s.router_failure_value,
        discount=s.router_discount,
        seed=s.router_seed or 0,
    )


class Router:
    """The Faust app and its parts; :func:`create` builds one from settings."""

    def __init__(self, settings: Settings) -> None:
        s = self.settings = settings
        self.serde = Serde.from_settings(s)
        self.cfg = router_config(s)
        self.partitions = s.router_partitions or s.default_partitions
        self.directory = Directory(health=self.cfg.health)
        self.policies: dict[str, int] = {}
        self.extra: dict[str, int] = {
            "dead_letters": 0,
            "forwarded": 0,
            "policy_loads": 0,
            "policy_load_failures": 0,
        }
        # policy -> (checkpoint, failed loads, next try): loads to try again.
        self._retry_checkpoint: dict[str, tuple[CheckpointPublished, int, float]] = {}
        self._tick_sent: dict[str, float] = {}
        self._schedule: list[tuple[float, str, str]] = []
        self._rescan = True  # a full scan of the tasks table, once after each rebalance
        self._started: float | None = None
        self.app = faust_app(s, self.partitions, replicas(s))
        app = self.app

        store = register_store() if s.router_store == "memory" else None

        def table(name: str) -> Any:
            return app.Table(
                name,
                default=None,
                store=store,
                partitions=self.partitions,
                schema=faust.Schema(key_serializer="json", value_serializer="json"),
            )

        self.qtable, self.tasks, self.types, self.health = (table(t) for t in TABLES)
        # The task statuses users read: the router decides assigned/waiting/final (contracts).
        self.state = RedisState(s)
        # Each decided status is written until Redis has taken it (issue 15).
        self.status = StatusWriter(self.state)
        self.core = RouterCore(
            self.cfg,
            qtable=self.qtable,
            tasks=_Scheduled(self.tasks, self._schedule),
            types=self.types,
            directory=self.directory,
        )
        self.core.keep_moves = True
        self.core.track_delivery = True  # emit() confirms what Kafka acknowledged
        self.core.holding = self.status.holds  # a final record stays until its status is out

        def raw_topic(name: str, internal: bool = False) -> Any:
            kw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
            if internal:
                kw.update(partitions=self.partitions, internal=True)
            return app.topic(name, **kw)

        self.t_tasks = raw_topic(TASKS.name(s))
        self.t_traj = raw_topic(TRAJECTORIES.name(s))
        self.t_rewards = raw_topic(REWARDS.name(s))
        self.t_heartbeats = raw_topic(HEARTBEATS.name(s))
        self.t_assign = raw_topic(ASSIGNMENTS.name(s))
        self.t_health_out = raw_topic(AGENT_HEALTH.name(s))
        self.t_dead = raw_topic(DEAD_LETTERS.name(s))
        self.by_type = raw_topic(f"{app_id(s)}-by-type", internal=True)
        self.health_in = raw_topic(f"{app_id(s)}-health", internal=True)
        self._wire()

    # ----------------------------------------------------------------- output helpers --
    async def emit(self, events: Iterable[Event]) -> None:
        topics = {
            TaskAssigned: self.t_assign,
            Trajectory: self.t_traj,
            Reward: self.t_rewards,
            AgentHealthChanged: self.t_health_out,
        }
        for ev in events:
            topic = topics[type(ev)]

            async def send(topic: Any = topic, ev: Event = ev) -> Any:
                value = self.serde.encode(topic.get_topic_name(), ev)
                # Inside the route span: the assignment carries the task's trace onwards.
                headers = tracing.inject()
                sent = await topic.send(key=ev.key().encode(), value=value, headers=headers)
                # Delivered (acks=all), not just buffered: only then may the task's record
                # say so (below), or a kill could lose an event the record counts as sent.
                return await sent

            await retrying(f"sending {type(ev).__name__}", send)
            if isinstance(ev, TaskAssigned):
                metrics.TASKS_ROUTED.labels(ev.task.task_type, ev.agent_id, ev.strategy).inc()
            # The final failure's Reward is sent after its Trajectory: both are out now.
            if isinstance(ev, TaskAssigned) or (
                isinstance(ev, Reward) and ev.agent_id == ROUTER_AGENT
            ):
                self.core.sent(ev.task_id, ev.attempt)

    async def dead_letter(
        self, ev: EventT[bytes], kind: str, error: str, raw: bytes | None = None
    ) -> None:
        msg = ev.message
        self.extra["dead_letters"] += 1
        value = raw if raw is not None else msg.value
        key = msg.key if isinstance(msg.key, bytes) else None
        letter = dead_letter(
            self.settings,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=key,
            value=value if isinstance(value, bytes) else None,
            kind=kind,
            error=error,
            group=app_id(self.settings),
        )
        if letter is not None:

            async def send() -> Any:
                value = self.serde.encode(self.t_dead.get_topic_name(), letter)
                return await self.t_dead.send(key=key or b"", value=value)

            await retrying("sending a dead letter", send)

    async def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            body = json.dumps({"k": "out", "ok": o.ok, "detail": o.detail[:500]}).encode()
            await self.forward(self.health_in, o.agent_id.encode(), body)

    async def forward(self, topic: Any, key: bytes, value: bytes, headers: Any = None) -> None:
        """Send to one of the router's own topics, retrying transient failures."""
        await retrying(
            f"sending to {topic.get_topic_name()}",
            lambda: topic.send(key=key, value=value, headers=headers),
        )

    async def decoded(self, ev: EventT[bytes], etype: type[Any], raw: bytes | None = None) -> Any:
        """``raw`` (the event's value by default) decoded; transient failures retried.

        DecodeError (a record that can never decode) is the caller's to dead-letter.
        """
        value = ev.value if raw is None else raw

        async def decode() -> Any:
            return self._decode(value, etype)

        return await retrying(f"decoding {etype.__name__}", decode)

    # ------------------------------------------------------------------------ agents --
    def _wire(self) -> None:
        self._wire_forwarders()
        self._wire_owners()
        self._wire_clocks()
        self._wire_views()

    def _wire_forwarders(self) -> None:
        """Input topics onto the internal by-type and health topics (stateless)."""
        app, s = self.app, self.settings

        @app.agent(self.t_tasks, name="forward-tasks")
        async def forward_tasks(stream: Any) -> None:
            async for events in stream.take_events(
                s.router_batch_max, s.router_batch_window_ms / 1000
            ):
                batch: list[tuple[TaskSubmitted, Any]] = []
                for ev in events:
                    try:
                        batch.append((await self.decoded(ev, TaskSubmitted), ev))
                    except DecodeError as exc:
                        await self.dead_letter(ev, exc.kind, exc.message)
                for task, ev in by_priority(batch):
                    await self._forward_one(ev, task.task_type.encode(), K_TASK)
                    self.extra["forwarded"] += 1

        async def forward(stream: Any, etype: type[Trajectory] | type[Reward], kind: bytes) -> None:
            async for ev in stream.events():
                try:
                    event = await self.decoded(ev, etype)
                except DecodeError as exc:
                    await self.dead_letter(ev, exc.kind, exc.message)
                    continue
                await self._forward_one(ev, (event.task_type or MISSING_TYPE).encode(), kind)

        @app.agent(self.t_traj, name="forward-trajectories")
        async def forward_trajectories(stream: Any) -> None:
            await forward(stream, Trajectory, K_TRAJ)

        @app.agent(self.t_rewards, name="forward-rewards")
        async def forward_rewards(stream: Any) -> None:
            await forward(stream, Reward, K_REWARD)

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

    async def _forward_one(self, ev: EventT[bytes], key: bytes, kind: bytes) -> None:
        """One input record onto the by-type topic; one too large to send is dead-lettered."""
        try:
            await self.forward(self.by_type, key, kind + ev.value, ev.message.headers or None)
        except Exception as exc:
            if not oversize(exc):
                raise
            await self.dead_letter(ev, "oversize", f"{type(exc).__name__}: {exc}")

    def _wire_owners(self) -> None:
        """The stateful agents: routing per task type, health per agent."""
        app = self.app

        @app.agent(self.by_type, name="route")
        async def route(stream: Any) -> None:
            async for ev in stream.events():
                value: bytes = ev.value
                kind, body = value[:1], value[1:]
                try:
                    await self._route_one(ev, kind, body)
                    await self._record_moves()
                except DecodeError as exc:
                    await self.dead_letter(ev, exc.kind, exc.message, raw=body)
                except Exception as exc:
                    log.exception("router handler failed")
                    await self.dead_letter(ev, "handler", f"{type(exc).__name__}: {exc}", raw=body)

        @app.agent(self.health_in, name="keep-health")
        async def keep_health(stream: Any) -> None:
            async for ev in stream.events():
                try:
                    agent = ev.key.decode()
                    msg = json.loads(ev.value)
                    await self._health_one(agent, msg)
                except Exception as exc:
                    log.exception("health handler failed")
                    await self.dead_letter(ev, "handler", f"{type(exc).__name__}: {exc}")

    def _wire_clocks(self) -> None:
        """Timers (through the by-type/health topics) and the broadcast reader."""
        app, s = self.app, self.settings

        @app.on_rebalance_complete.connect
        def rebalanced(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            self._rescan = True  # records recovered from the changelog are not on the heap

        @app.timer(interval=s.router_tick_s, name="task-clock")
        async def task_clock() -> None:
            await self._ticks()

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

        @app.timer(interval=1.0, name="checkpoint-clock")
        async def checkpoint_clock() -> None:
            await self._retry_checkpoints()

        @app.task
        async def redaction() -> None:
            # Faust has configured its logging handlers by now (app tasks start with the
            # worker): mask secrets by value in every record of theirs too.
            install_redaction(s, loggers=("faust", "mode", "aiokafka"))

        @app.task
        async def broadcast() -> None:
            await self._broadcast()

    def _wire_views(self) -> None:
        app = self.app

        @app.page("/router/qtable/")
        async def qtable_view(web: Any, request: Any) -> Any:
            return web.json(self.qtable_snapshot())

        @app.page("/router/health/")
        async def health_view(web: Any, request: Any) -> Any:
            return web.json(self.health_snapshot())

        @app.page("/router/counters/")
        async def counters_view(web: Any, request: Any) -> Any:
            return web.json(self.counters())

    # ----------------------------------------------------------------------- handlers --
    def _decode(self, raw: bytes | None, etype: type[Any]) -> Any:
        if raw is not None and len(raw) > self.settings.max_record_bytes:
            raise DecodeError("oversize", f"record of {len(raw)} bytes exceeds max_record_bytes")
        return self.serde.decode(raw, etype)

    async def _route_one(self, ev: EventT[bytes], kind: bytes, body: bytes) -> None:
        core = self.core
        if kind == K_TASK:
            task = await self.decoded(ev, TaskSubmitted, body)
            attrs = {"stormline.task_id": task.task_id, "stormline.task_type": task.task_type}
            with (
                tracing.continued("stormline.router.route", ev.message.headers, attrs),
                logs.bound(task_id=task.task_id),
            ):
                await self.emit(core.on_task(task, time.time()))
                self._keep_trace(task.task_id)
        elif kind == K_TRAJ:
            traj = await self.decoded(ev, Trajectory, body)
            await self.outcomes(core.on_trajectory(traj, time.time()))
        elif kind == K_REWARD:
            core.on_reward(await self.decoded(ev, Reward, body), time.time())
        elif kind == K_TICK:
            now = time.time()
            with self._trace_of(body.decode()):  # a waiting or expired task's next attempt
                events, outcomes = core.on_tick(body.decode(), now)
                await self.emit(events)
            await self.outcomes(outcomes)
        else:
            raise DecodeError("framing", f"unknown router record kind {kind!r}")

    def _keep_trace(self, task_id: str) -> None:
        """With tracing on, the task's record keeps its trace context (the route span's),
        so that a later attempt (assigned by the clock) continues the same trace."""
        headers = tracing.inject()
        rec = self.tasks.get(task_id) if headers else None
        if rec is not None and headers:
            self.tasks[task_id] = {**rec, "trace": {k: v.decode() for k, v in headers}}

    def _trace_of(self, task_id: str) -> Any:
        rec = self.tasks.get(task_id) if tracing.enabled() else None
        if not rec or "trace" not in rec or rec.get("state") in FINAL:  # StrEnum: str equal
            return contextlib.nullcontext()
        attrs = {"stormline.task_id": task_id}
        return tracing.continued("stormline.router.route", rec["trace"], attrs)

    async def _record_moves(self) -> None:
        """The task states the core decided, into Redis (guarded there by the lifecycle).

        Best effort, like every RedisState call: the events are the record, and a status
        Redis refused (an older attempt, a final state) was not news anyway.
        """
        moves, self.core.moves = self.core.moves, []
        for task_id, state, attempt in moves:
            rec = self.tasks.get(task_id) or {}
            fields: dict[str, Any] = {}
            if state == TaskState.ASSIGNED:
                fields["agent_id"] = rec.get("agent")
            elif state == TaskState.FAILED:
                fields["error"] = rec.get("reason")
            self.status.add(task_id, state, attempt, fields)
        if moves:
            # At once if Redis answers; otherwise the status clock retries (never waits here).
            await self.status.flush(only=[m[0] for m in moves])

    async def _health_one(self, agent: str, msg: dict[str, Any]) -> None:
        now = time.time()
        h = AgentHealth.from_dict(agent, self.health.get(agent))
        k = msg.get("k")
        if k == "hb":
            t = h.heartbeat(now, msg.get("caps"), bool(msg.get("stopped")), self.cfg.health)
        elif k == "out":
            if h.status.value == "unknown":
                return  # outcomes of an agent never seen alive do not create it
            t = h.outcome(now, bool(msg.get("ok")), str(msg.get("detail", "")), self.cfg.health)
        elif k == "check":
            t = h.check(now, self.cfg.health)
        else:
            raise ValueError(f"unknown health message {k!r}")
        self.health[agent] = h.to_dict()
        if t is not None:
            log.info("agent %s: %s -> %s (%s)", agent, t.previous, t.status, t.reason)
            await self.emit(
                [
                    AgentHealthChanged(
                        agent_id=agent,
                        status=t.status,
                        previous=t.previous,
                        reason=t.reason,
                        occurred_at=at(t.at),
                    )
                ]
            )

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

    async def _ticks(self) -> None:
        now = time.time()
        self._grace_until()
        due: list[tuple[str, str]] = []
        # Records written here are on the schedule heap, so a tick costs what is due; one full
        # scan after each rebalance catches the records recovered from the changelog.
        if self._rescan:
            self._rescan = False
            records = list(self.tasks.items())
            for tid, rec in records:
                # A record whose events may not have been delivered (a kill) is due now.
                due_at = 0.0 if rec.get("unsent") is not None else float(rec.get("due_at", 0))
                heapq.heappush(self._schedule, (due_at, rec.get("task_type", ""), tid))
            # Statuses queued before a kill, or lost in Redis, are re-derived from the records.
            queued = self.status.resync(records)
            if queued:
                log.info("re-writing the task status of %d records from the tasks table", queued)
        while self._schedule and self._schedule[0][0] <= now:
            _, ttype, tid = heapq.heappop(self._schedule)
            rec = self.tasks.get(tid)
            # Gone (a partition this worker lost, or forgotten) or rescheduled since: the
            # record is the truth, and its newer heap entry will come.
            if rec is not None and (
                float(rec.get("due_at", 0)) <= now or rec.get("unsent") is not None
            ):
                due.append((ttype, tid))
        gap = max(1.0, 2 * self.settings.router_tick_s)
        for ttype, tid in due:
            sent = self._tick_sent.get(tid, 0.0)
            if now - sent < gap:
                # A tick is in flight: look again once it should have been handled.
                heapq.heappush(self._schedule, (sent + gap, ttype, tid))
                continue
            self._tick_sent[tid] = now
            await self.forward(self.by_type, ttype.encode(), K_TICK + tid.encode())
        if len(self._tick_sent) > 100_000:
            cutoff = now - 60
            self._tick_sent = {k: v for k, v in self._tick_sent.items() if v > cutoff}

    # -------------------------------------------------------------- broadcast reader --
    async def _broadcast(self) -> None:
        """Every worker reads heartbeats, agent-health and checkpoints in full (no group)."""
        async for event in read_broadcast(self.settings, self.serde):
            await self._on_broadcast(event)

    async def _on_broadcast(self, event: Event) -> None:
        if isinstance(event, AgentHeartbeat):
            self.directory.heartbeat(event.capabilities, event.agent_ids)
        elif isinstance(event, AgentHealthChanged):
            self.directory.health_changed(
                event.agent_id, event.status, event.previous, epoch(event.occurred_at)
            )
        elif isinstance(event, CheckpointPublished):
            await self._load_checkpoint(event)

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

    # -------------------------------------------------------------------------- views --
    def qtable_snapshot(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, cell in list(self.qtable.items()):
            task_type, agent = split_key(key)
            out.setdefault(task_type, {})[agent] = cell
        return out

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
            "tasks_tracked": len(self.tasks),
            "owned_partitions": self.owned_partitions(),
        }

    def owned_partitions(self) -> list[int]:
        """The by-type partitions (the Q-table slices) this worker owns now."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:
            return []  # not started or mid-rebalance
        name = self.by_type.get_topic_name()
        return sorted(tp.partition for tp in assigned if tp.topic == name)


class _Scheduled(MutableMapping[str, Any]):
    """The tasks table, plus a heap of due times for the records this worker writes.

    Every method delegates to the Faust table (get, items and ``in`` included, so that none
    falls back to the slower MutableMapping mixins); only ``__setitem__`` adds to the heap.
    """

    def __init__(self, table: Any, heap: list[tuple[float, str, str]]) -> None:
        self._t = table
        self._heap = heap

    def get(self, key: str, default: Any = None) -> Any:
        return self._t.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._t

    def __getitem__(self, key: str) -> Any:
        return self._t[key]

    def __setitem__(self, key: str, rec: Any) -> None:
        self._t[key] = rec
        heapq.heappush(self._heap, (float(rec.get("due_at", 0)), rec.get("task_type", ""), key))

    def __delitem__(self, key: str) -> None:
        del self._t[key]

    def items(self) -> Any:
        return self._t.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def create(settings: Settings) -> Router:
    return Router(settings)


def run_router(settings: Settings, loglevel: str = "info") -> None:
    """Ensure the catalog and internal topics exist, then run the Faust worker (blocks)."""
    from stormline.schemas.kafka import ensure_topics

    ensure_topics(settings)
    ensure_internal_topics(settings)
    tracing.setup(settings, "router")
    metrics.serve(settings.metrics_port, "router", settings.metrics_host)
    router = create(settings)
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
    saved = sys.argv
    sys.argv = argv
    try:
        router.app.main()
    finally:
        sys.argv = saved
