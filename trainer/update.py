"""One policy update: split, train with Ray, gate, checkpoint, publish. Shared by the live
service and by replay."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stormline.schemas.catalog import CHECKPOINTS
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import CheckpointPublished, OffsetRange
from stormline.settings import Settings
from stormline.trainer.checkpoints import CheckpointStore, gate, load_state_verified
from stormline.trainer.distributed import RayLearner
from stormline.trainer.join import Experience
from stormline.trainer.policy import PolicyConfig, RouterNet, encode_experiences, evaluate

log = logging.getLogger("stormline.trainer.update")


def checkpoint_uri(settings: Settings) -> str:
    return settings.checkpoint_uri or str((settings.data_dir / "checkpoints").resolve())


def trained_on(exps: Sequence[Experience]) -> list[OffsetRange]:
    """Per topic/partition, [first offset, last offset + 1) of the records behind ``exps``."""
    spans: dict[tuple[str, int], list[int]] = {}
    for e in exps:
        for ref in (e.trajectory_ref, e.reward_ref, e.assignment_ref):
            if ref is None:
                continue
            s = spans.setdefault((ref.topic, ref.partition), [ref.offset, ref.offset + 1])
            s[0], s[1] = min(s[0], ref.offset), max(s[1], ref.offset + 1)
    return [
        OffsetRange(topic=t, partition=p, start_offset=a, end_offset=b)
        for (t, p), (a, b) in sorted(spans.items())
    ]


def split_holdout(
    exps: Sequence[Experience], fraction: float
) -> tuple[list[Experience], list[Experience]]:
    """The newest ``fraction`` (by reward time) is held out: the gate judges on recent data."""
    ordered = sorted(exps, key=lambda e: (e.reward_at_ms, e.trajectory_id))
    k = int(len(ordered) * fraction)
    if k == 0 or len(ordered) - k < 1:
        return list(ordered), []
    return ordered[:-k], ordered[-k:]


@dataclass
class UpdateOutcome:
    event: CheckpointPublished
    state: dict[str, torch.Tensor]
    trained: list[Experience]
    holdout: list[Experience]
    seconds: float


def run_update(
    settings: Settings,
    learner: RayLearner,
    store: CheckpointStore,
    producer: EventProducer | None,
    exps: Sequence[Experience],
    *,
    init_state: dict[str, torch.Tensor] | None,
    cfg: PolicyConfig,
    extra_meta: dict[str, object] | None = None,
) -> UpdateOutcome:
    t0 = time.perf_counter()
    if not exps:
        raise ValueError("an update needs at least one experience")
    train, holdout = split_holdout(exps, settings.trainer_holdout_fraction)
    data = encode_experiences(cfg, train)
    res = learner.update(
        data,
        init_state=init_state,
        epochs=settings.trainer_epochs,
        batch_size=settings.trainer_minibatch,
        lr=settings.trainer_lr,
    )
    held = encode_experiences(cfg, holdout)
    candidate = RouterNet(cfg)
    candidate.load_state_dict(res.state)
    cand_loss = evaluate(candidate, held)
    current_loss = None
    promoted = store.promoted()
    if promoted is not None:
        cur_state, meta = load_state_verified(*promoted)
        cur = RouterNet(PolicyConfig.from_dict(meta["config"]))
        cur.load_state_dict(cur_state)
        current_loss = evaluate(cur, held) if len(holdout) else None
    decision = gate(cand_loss, current_loss, settings.trainer_promotion_margin)
    metrics = {
        **res.metrics,
        "experiences": float(len(exps)),
        "holdout": float(len(holdout)),
        "holdout_loss": cand_loss,
        "mean_reward": float(sum(e.reward for e in exps) / max(1, len(exps))),
    }
    if current_loss is not None:
        metrics["current_holdout_loss"] = current_loss
    event = store.write(
        res.state,
        cfg,
        metrics=metrics,
        trained_on=trained_on(train),
        promoted=decision.promoted,
        decision=decision.reason,
        extra={"trajectory_ids": [e.trajectory_id for e in train], **(extra_meta or {})},
    )
    if producer is not None:
        producer.produce(event, topic=CHECKPOINTS.name(settings))
        producer.flush()
    log.info("checkpoint v%d %s: %s", event.version, event.uri, decision.reason)
    return UpdateOutcome(event, res.state, train, holdout, time.perf_counter() - t0)
