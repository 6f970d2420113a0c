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
  that is stale or duplicated is ignored because the task record is the truth.
* **Bad input** never stops an agent: undecodable or invalid records, and records whose
  handler raised, go to ``dead-letters`` with the reason (the one builder,
  ``stormline.schemas.kafka.dead_letter``).

Kafka plumbing (the Faust app's broker settings, internal topics, the group-less reader) is
in ``streams/kafka.py``; routing decisions are pure, in ``streams/router.py``. Why this file
is longer than ~400 lines: it is the one place where the flow above is wired (agents, their
handlers, clocks and views of one Faust app, each small); splitting the handlers from the
agents that call them would spread one flow over files. The router issue that reworks this
logic is the place to split the views and ``router_config`` out.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import faust
from faust.types import EventT

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
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings
from stormline.streams.health import AgentHealth, Directory, HealthConfig
from stormline.streams.kafka import (
    TABLES,
    app_id,
    ensure_internal_topics,
    faust_app,
    read_broadcast,
)
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
from stormline.streams.strategies import StrategyConfig

log = logging.getLogger("stormline.router")

K_TASK, K_TRAJ, K_REWARD, K_TICK = b"T", b"J", b"R", b"K"
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
        policy_weight=s.router_policy_weight,
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
        self.extra: dict[str, int] = {"dead_letters": 0, "forwarded": 0, "policy_loads": 0}
        self._tick_sent: dict[str, float] = {}
        self._schedule: list[tuple[float, str, str]] = []
        self._last_scan = 0.0
        self._started: float | None = None
        self.app = faust_app(s, self.partitions)
        app = self.app

        def table(name: str) -> Any:
            return app.Table(
                name,
                default=None,
                partitions=self.partitions,
                schema=faust.Schema(key_serializer="json", value_serializer="json"),
            )

        self.qtable, self.tasks, self.types, self.health = (table(t) for t in TABLES)
        self.core = RouterCore(
            self.cfg,
            qtable=self.qtable,
            tasks=_Scheduled(self.tasks, self._schedule),
            types=self.types,
            directory=self.directory,
            rng=random.Random(s.router_seed),
        )

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
            await topic.send(
                key=ev.key().encode(), value=self.serde.encode(topic.get_topic_name(), ev)
            )

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
            await self.t_dead.send(
                key=key or b"", value=self.serde.encode(self.t_dead.get_topic_name(), letter)
            )

    async def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            body = {"k": "out", "ok": o.ok, "detail": o.detail[:500]}
            await self.health_in.send(key=o.agent_id.encode(), value=json.dumps(body).encode())

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
                batch: list[tuple[TaskSubmitted, bytes]] = []
                for ev in events:
                    try:
                        batch.append((self._decode(ev.value, TaskSubmitted), ev.value))
                    except DecodeError as exc:
                        await self.dead_letter(ev, exc.kind, exc.message)
                for task, raw in by_priority(batch):
                    await self.by_type.send(key=task.task_type.encode(), value=K_TASK + raw)
                    self.extra["forwarded"] += 1

        async def forward(stream: Any, etype: type[Trajectory] | type[Reward], kind: bytes) -> None:
            async for ev in stream.events():
                try:
                    event = self._decode(ev.value, etype)
                except DecodeError as exc:
                    await self.dead_letter(ev, exc.kind, exc.message)
                    continue
                key = (event.task_type or MISSING_TYPE).encode()
                await self.by_type.send(key=key, value=kind + ev.value)

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
                    hb = self._decode(ev.value, AgentHeartbeat)
                except DecodeError as exc:
                    await self.dead_letter(ev, exc.kind, exc.message)
                    continue
                stopped = hb.status == WorkerStatus.STOPPED
                for agent in sorted({*hb.agent_ids, *hb.capabilities}):
                    body = {"k": "hb", "caps": hb.capabilities.get(agent), "stopped": stopped}
                    await self.health_in.send(key=agent.encode(), value=json.dumps(body).encode())

    def _wire_owners(self) -> None:
        """The stateful agents: routing per task type, health per agent."""
        app = self.app

        @app.agent(self.by_type, name="route")
        async def route(stream: Any) -> None:
            async for ev in stream.events():
                value: bytes = ev.value
                kind, body = value[:1], value[1:]
                try:
                    await self._route_one(kind, body)
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
                    await self.health_in.send(key=agent.encode(), value=b'{"k": "check"}')

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

    async def _route_one(self, kind: bytes, body: bytes) -> None:
        now = time.time()
        core = self.core
        if kind == K_TASK:
            await self.emit(core.on_task(self._decode(body, TaskSubmitted), now))
        elif kind == K_TRAJ:
            await self.outcomes(core.on_trajectory(self._decode(body, Trajectory), now))
        elif kind == K_REWARD:
            core.on_reward(self._decode(body, Reward), now)
        elif kind == K_TICK:
            events, outcomes = core.on_tick(body.decode(), now)
            await self.emit(events)
            await self.outcomes(outcomes)
        else:
            raise DecodeError("framing", f"unknown router record kind {kind!r}")

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
        # Records written here are on the schedule heap; a periodic full scan catches those
        # recovered from the changelog after a restart or a rebalance.
        if now - self._last_scan > 5.0:
            self._last_scan = now
            due = self.core.due(now)
        while self._schedule and self._schedule[0][0] <= now:
            _, ttype, tid = heapq.heappop(self._schedule)
            due.append((ttype, tid))
        for ttype, tid in due:
            if now - self._tick_sent.get(tid, 0.0) < max(1.0, 2 * self.settings.router_tick_s):
                continue
            self._tick_sent[tid] = now
            await self.by_type.send(key=ttype.encode(), value=K_TICK + tid.encode())
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
            if event.version <= self.policies.get(event.policy, 0) or not event.promoted:
                return
            scorer = await asyncio.get_running_loop().run_in_executor(None, load_policy, event)
            self.policies[event.policy] = event.version
            if scorer is not None:
                self.core.scorer = scorer
                self.core.policy_version = event.policy_version
                self.extra["policy_loads"] += 1

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
    router = create(settings)
    argv = [
        "stormline-router",
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
