"""The live trainer: consume, join, batch, train, checkpoint, publish, save state, commit.

Consumes ``trajectories`` and ``rewards`` (plus ``assignments`` for the logged score and
propensity, and ``heartbeats`` for agents' capabilities) in the ``stormline-trainer`` group.
Offsets are committed only after the state file (:mod:`trainer.state`) holds everything
they cover: the buffered experiences and the pending join, or after the experiences are
in a published checkpoint. An update saves the state before it publishes the checkpoint,
and a restart settles a checkpoint the last life wrote but did not record (see
:mod:`trainer.state`), so a crash anywhere trains nothing twice. SIGTERM finishes the
current step, saves, commits and exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import torch

from stormline import metrics
from stormline.schemas.catalog import ASSIGNMENTS, CHECKPOINTS, HEARTBEATS, REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventConsumer, EventProducer, Received
from stormline.schemas.models import AgentHeartbeat, Reward, TaskAssigned, Trajectory
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.trainer import state as state_io
from stormline.trainer.checkpoints import (
    CheckpointStore,
    load_state_verified,
    published_event,
    read_meta,
)
from stormline.trainer.distributed import RayLearner
from stormline.trainer.join import HUMAN, Experience, Joiner, SourceRef
from stormline.trainer.policy import PolicyConfig
from stormline.trainer.update import UpdateOutcome, checkpoint_uri, run_update

log = logging.getLogger("stormline.trainer")


def make_joiner(settings: Settings) -> Joiner:
    return Joiner(
        max_entries=settings.trainer_join_max_entries,
        max_wait_ms=int(settings.trainer_join_max_wait_s * 1000),
        assignment_wait_ms=int(settings.trainer_assignment_wait_s * 1000),
        recent_capacity=settings.trainer_join_recent,
    )


def feed(joiner: Joiner, rec: Received[Any]) -> list[Experience]:
    """Route one consumed record into the join; returns the experiences it completes."""
    ref = SourceRef(topic=rec.topic, partition=rec.partition, offset=rec.offset)
    ev = rec.event
    at = rec.timestamp_ms if rec.timestamp_ms > 0 else int(ev.occurred_at.timestamp() * 1000)
    if isinstance(ev, Trajectory):
        return joiner.add_trajectory(ev, ref, at)
    if isinstance(ev, Reward):
        return joiner.add_reward(ev, ref, at)
    if isinstance(ev, TaskAssigned):
        return joiner.add_assignment(ev, ref, at)
    if isinstance(ev, AgentHeartbeat):
        joiner.add_heartbeat(ev)
    return []


class TrainerService:
    def __init__(
        self,
        settings: Settings,
        learner: RayLearner,
        *,
        serde: Serde | None = None,
        cfg: PolicyConfig | None = None,
        on_update: Callable[[UpdateOutcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.learner = learner
        self.cfg = cfg or learner.cfg
        self.serde = serde or Serde.from_settings(settings)
        self.on_update = on_update
        self.store = CheckpointStore(checkpoint_uri(settings), settings.trainer_policy_name)
        self.path = state_io.state_path(settings.data_dir, settings.trainer_group_id)
        self.state = state_io.load(self.path, make_joiner(settings))
        self.producer = EventProducer(settings, self.serde)
        self.consumer = EventConsumer(
            settings,
            self.serde,
            settings.trainer_group_id,
            [TRAJECTORIES, REWARDS, ASSIGNMENTS, HEARTBEATS],
            dead_letters=self.producer,
        )
        self.weights: dict[str, torch.Tensor] | None = self._resume_weights()
        self._buffer_since = time.monotonic()
        self._last_save = time.monotonic()
        self.updates = 0
        metrics.TRAINER_BUFFERED.watch(self, lambda t: [((), len(t.state.buffer))])
        self._recover()

    def _resume_weights(self) -> dict[str, torch.Tensor] | None:
        """Fine-tune from the newest checkpoint this policy has (verified like any consumer)."""
        latest = self.store.latest()
        if latest is None:
            return None
        state, _ = load_state_verified(*latest)
        return state

    def _own(self, version: int) -> dict[str, Any] | None:
        meta = read_meta(self.store.uri_of(version))
        return meta if meta.get("trainer_group") == self.settings.trainer_group_id else None

    def _recover(self) -> None:
        """Settle what the last life left between writing a checkpoint and publishing it."""
        own = [v for v in self.store.versions() if self._own(v) is not None]
        if self.state.version is None:  # no state yet (or format 1): nothing to settle
            self.state.version = own[-1] if own else 0
        for v in own:
            if v <= self.state.version:
                continue
            # Written, not recorded: its experiences must not be trained again.
            meta = cast(dict[str, Any], self._own(v))
            ids = list(meta.get("trajectory_ids", []))
            self.state.joiner.mark_trained(ids)
            gone = set(ids)
            self.state.buffer = [e for e in self.state.buffer if e.trajectory_id not in gone]
            self.state.outbox.append(published_event(self.store, v, meta))
            self.state.version = v
            log.warning("checkpoint v%d was written but not recorded: settled, publishing it", v)
        state_io.save(self.path, self.state)  # from here on a state file always exists
        self._publish_outbox()

    def _publish_outbox(self) -> None:
        if not self.state.outbox:
            return
        for ev in self.state.outbox:
            self.producer.produce(ev, topic=CHECKPOINTS.name(self.settings))
        self.producer.flush()
        self.state.outbox = []

    def _buffer(self, exps: list[Experience]) -> None:
        """Add to the buffer; a human correction takes its automatic experience's place."""
        for e in exps:
            if e.reward_source == HUMAN:
                self.state.buffer = [
                    b for b in self.state.buffer if b.trajectory_id != e.trajectory_id
                ]
            self.state.buffer.append(e)

    # ---------------------------------------------------------------------- loop --
    def poll_once(self, timeout: float = 0.5) -> int:
        """Poll one batch into the join; returns how many experiences it completed."""
        batch = self.consumer.poll_batch(1000, timeout)
        made = 0
        for rec in batch:
            if self.state.applied(rec.topic, rec.partition, rec.offset):
                continue  # already in the state file (redelivered after a crash)
            if not self.state.buffer:
                self._buffer_since = time.monotonic()
            exps = feed(self.state.joiner, rec)
            self._buffer(exps)
            made += len(exps)
            self.state.advance(rec.topic, rec.partition, rec.offset)
        released = self.state.joiner.release()
        self._buffer(released)
        made += len(released)
        for (topic, partition), nxt in batch.positions.items():  # dead-lettered ones too
            self.state.advance(topic, partition, nxt - 1)
        for ev in self.state.joiner.evict():
            log.warning(
                "join evicted %s %s (%s) from %s[%d]@%d",
                ev.side,
                ev.trajectory_id,
                ev.reason,
                ev.ref.topic,
                ev.ref.partition,
                ev.ref.offset,
            )
        return made

    def due(self) -> bool:
        n = len(self.state.buffer)
        if n >= self.settings.trainer_batch_size:
            return True
        waited = time.monotonic() - self._buffer_since
        return (
            n >= self.settings.trainer_min_batch
            and waited >= self.settings.trainer_batch_max_wait_s
        )

    def update(self) -> UpdateOutcome | None:
        """Train on the buffer now (``due()`` decides when the loop calls this)."""
        if not self.state.buffer:
            return None
        out = run_update(
            self.settings,
            self.learner,
            self.store,
            None,  # published below, once the state no longer holds what it trained
            self.state.buffer,
            init_state=self.weights,
            cfg=self.cfg,
            extra_meta={"trainer_group": self.settings.trainer_group_id},
        )
        self.weights = out.state
        self.updates += 1
        metrics.TRAINER_UPDATES.inc()
        metrics.TRAINER_UPDATE_SECONDS.observe(out.seconds)
        metrics.TRAINER_EXPERIENCES.inc(len(out.trained))
        metrics.TRAINER_PROMOTIONS.labels("promoted" if out.event.promoted else "rejected").inc()
        # The held-out experiences were not trained on: they stay buffered for the next update.
        self.state.buffer = list(out.holdout)
        self.state.version = out.event.version
        self.state.outbox.append(out.event)
        self._buffer_since = time.monotonic()
        state_io.save(self.path, self.state)  # state first: a crash after it trains nothing twice
        self._publish_outbox()
        self.save_and_commit()
        if self.on_update is not None:
            self.on_update(out)
        return out

    def save_and_commit(self) -> None:
        state_io.save(self.path, self.state)
        self.consumer.commit()
        self._last_save = time.monotonic()

    def step(self, timeout: float = 0.5) -> UpdateOutcome | None:
        self.poll_once(timeout)
        if self.due():
            return self.update()
        if time.monotonic() - self._last_save >= self.settings.trainer_state_interval_s:
            self.save_and_commit()
        return None

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.step()

    def close(self) -> None:
        """Graceful stop: save the state, commit what it covers, close the clients."""
        try:
            self.save_and_commit()
        finally:
            self.consumer.close()
            self.producer.close()


def serve(settings: Settings) -> None:
    """`stormline trainer`: run until SIGTERM/SIGINT."""
    from stormline import logs
    from stormline.schemas.kafka import ensure_topics

    logs.setup(service="trainer")
    metrics.serve(settings.metrics_port, "trainer", settings.metrics_host)
    ensure_topics(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current step, then saving and committing", signum)
        stop.set()

    learner = RayLearner(settings, PolicyConfig()).start()
    # After ray.init, which installs its own SIGTERM handler (it would abort the process).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    svc = TrainerService(settings, learner)
    log.info("trainer consuming as group %s", settings.trainer_group_id)
    try:
        svc.run(stop.is_set)
    finally:
        svc.close()
        log.info("state saved and offsets committed; stopping the Ray workers")
        # Nothing is left to lose: do not wait long for the TorchTrainer's own shutdown,
        # ray.shutdown() ends its workers either way.
        learner.close(timeout=10.0)
        import ray

        ray.shutdown()
