"""Trainer benchmark: join throughput, Ray training throughput (1 and 2 workers), latency from
the last experience to CheckpointPublished (through the broker of ``Settings()``: ``make bench``
runs ``stormline up`` first),
and generalisation to a held-out task type on a simulated environment.

    .venv/bin/python -m bench.trainer [--quick]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stormline.schemas.models import (
    AssignedTask,
    PolicyKind,
    Reward,
    RewardSource,
    Step,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.settings import Settings
from stormline.trainer.join import Experience, Joiner, SourceRef
from stormline.trainer.policy import PolicyConfig, RouterNet, Scorer, encode_experiences

# --------------------------------------------------------------- simulated environment --
# Two families of task types; agents' hidden success probabilities depend on the family,
# with per-type variation. A task's text mixes family words and type words, so a held-out
# type is recognisable by its family vocabulary alone.
FAMILY_WORDS = {
    "math": ["equation", "solve", "number", "proof", "variable", "compute", "formula"],
    "code": ["function", "program", "bug", "compile", "variable", "test", "module"],
    "text": ["essay", "summary", "tone", "paragraph", "story", "audience", "style"],
}
TYPE_WORDS = {
    "math-algebra": ["polynomial", "factor", "linear"],
    "math-geometry": ["triangle", "angle", "circle"],
    "math-calculus": ["integral", "derivative", "limit"],
    "code-python": ["python", "list", "dict"],
    "code-sql": ["select", "join", "table"],
    "text-email": ["email", "reply", "subject"],
    "text-poem": ["rhyme", "verse", "stanza"],
}
AGENT_SKILL = {  # agent -> family -> base success probability
    "mathlete": {"math": 0.85, "code": 0.3, "text": 0.2},
    "coder": {"math": 0.35, "code": 0.85, "text": 0.25},
    "writer": {"math": 0.15, "code": 0.2, "text": 0.8},
    "generalist": {"math": 0.5, "code": 0.5, "text": 0.5},
}
AGENTS = sorted(AGENT_SKILL)
HELD_OUT = "math-calculus"


def success_p(agent: str, task_type: str) -> float:
    fam = task_type.split("-")[0]
    jitter = (zlib.crc32(f"{agent}/{task_type}".encode()) % 7 - 3) * 0.01  # per-type variation
    return min(0.95, max(0.05, AGENT_SKILL[agent][fam] + jitter))


def sim_text(rng: random.Random, task_type: str) -> str:
    fam = task_type.split("-")[0]
    words = rng.sample(FAMILY_WORDS[fam], 3) + rng.sample(TYPE_WORDS[task_type], 2)
    rng.shuffle(words)
    return "please " + " ".join(words)


def sim_experiences(n: int, seed: int, types: list[str]) -> list[Experience]:
    """Logged data from a uniformly exploring router (propensity 1/len(AGENTS))."""
    rng = random.Random(seed)
    ref = SourceRef(topic="sim", partition=0, offset=0)
    out = []
    for i in range(n):
        ty = rng.choice(types)
        agent = rng.choice(AGENTS)
        out.append(
            Experience(
                trajectory_id=f"s{i}",
                task_id=f"s{i}",
                attempt=1,
                agent_id=agent,
                task_type=ty,
                task_text=sim_text(rng, ty),
                reward=1.0 if rng.random() < success_p(agent, ty) else 0.0,
                propensity=1.0 / len(AGENTS),
                trajectory_ref=ref,
                reward_ref=ref,
            )
        )
    return out


def heldout_reward(scorer: Scorer, n: int, seed: int) -> float:
    rng = random.Random(seed)
    total = 0.0
    for i in range(n):
        task = TaskSubmitted(task_id=f"h{i}", task_type=HELD_OUT, prompt=sim_text(rng, HELD_OUT))
        scores = scorer.score(task, AGENTS, {})
        total += success_p(max(scores, key=scores.__getitem__), HELD_OUT)  # expected reward
    return total / n


# ------------------------------------------------------------------------- events --
def episode(i: int, rng: random.Random) -> tuple[TaskAssigned, Trajectory, Reward]:
    ty = rng.choice([t for t in TYPE_WORDS if t != HELD_OUT])
    agent = rng.choice(AGENTS)
    text = sim_text(rng, ty)
    now = datetime.now(UTC)
    a = TaskAssigned(
        task_id=f"task-{i}",
        attempt=1,
        agent_id=agent,
        policy=PolicyKind.EXPLORE,
        score=0.0,
        epsilon=1.0,
        assigned_at=now,
        expires_at=now + timedelta(minutes=5),
        task=AssignedTask(task_id=f"task-{i}", task_type=ty, prompt=text, occurred_at=now),
    )
    t = Trajectory(
        task_id=f"task-{i}",
        trajectory_id=f"traj-{i}",
        attempt=1,
        agent_id=agent,
        task_type=ty,
        steps=[Step(role="user", content=text), Step(role="assistant", content="done")],
        status=TrajectoryStatus.OK,
    )
    r = Reward(
        task_id=f"task-{i}",
        trajectory_id=f"traj-{i}",
        agent_id=agent,
        value=1.0 if rng.random() < success_p(agent, ty) else 0.0,
        source=RewardSource.VERIFIER,
    )
    return a, t, r


def bench_join(n: int) -> float:
    rng = random.Random(0)
    eps = [episode(i, rng) for i in range(n)]
    j = Joiner()
    ref = SourceRef(topic="t", partition=0, offset=0)
    t0 = time.perf_counter()
    made = 0
    for k, (a, t, r) in enumerate(eps):
        j.add_assignment(a, ref, k)
        if k % 2:  # half the rewards arrive first
            j.add_reward(r, ref, k)
            made += len(j.add_trajectory(t, ref, k))
        else:
            j.add_trajectory(t, ref, k)
            made += len(j.add_reward(r, ref, k))
        if k % 1000 == 0:
            j.evict()
    dt = time.perf_counter() - t0
    assert made == n
    return n / dt


def bench_training(lrn: Any, n: int, started: float) -> dict[str, float]:
    workers = lrn.num_workers
    data = encode_experiences(lrn.cfg, sim_experiences(n, 1, list(TYPE_WORDS)))
    lrn.update(data, init_state=None, epochs=1, batch_size=64, lr=0.01)  # warm-up
    res = lrn.update(data, init_state=None, epochs=2, batch_size=64, lr=0.01)
    return {
        f"train_samples_per_s_{workers}_workers": res.metrics["train_samples"]
        / res.metrics["train_seconds"],
        f"torchtrainer_start_s_{workers}_workers": started,
    }


def bench_latency_and_generalisation(
    settings: Settings, lrn: Any, quick: bool
) -> dict[str, float | str]:
    from confluent_kafka import KafkaException

    from stormline.runtime.admin import admin_client
    from stormline.runtime.consumer import reader
    from stormline.schemas.catalog import CHECKPOINTS
    from stormline.schemas.kafka import EventProducer, ensure_topics
    from stormline.schemas.models import CheckpointPublished
    from stormline.schemas.serde import Serde
    from stormline.trainer.checkpoints import load_checkpoint
    from stormline.trainer.service import TrainerService

    out: dict[str, float | str] = {}
    cfg = lrn.cfg
    # Generalisation: train on every type but one, score the held-out one.
    n = 3000 if quick else 12000
    train_types = [t for t in TYPE_WORDS if t != HELD_OUT]
    data = encode_experiences(cfg, sim_experiences(n, 2, train_types))
    # 8 epochs over 2 DDP ranks take as many optimizer steps as 4 epochs in one process.
    res = lrn.update(data, init_state=None, epochs=8, batch_size=64, lr=0.01)
    model = RouterNet(cfg)
    model.load_state_dict(res.state)
    scorer = Scorer(model)
    out["heldout_type"] = HELD_OUT
    out["heldout_neural_policy_expected_reward"] = heldout_reward(scorer, 500, 9)
    out["heldout_qtable_cold_start_expected_reward"] = sum(
        success_p(a, HELD_OUT) for a in AGENTS
    ) / len(AGENTS)
    out["heldout_oracle_expected_reward"] = max(success_p(a, HELD_OUT) for a in AGENTS)
    out["generalisation_train_experiences"] = float(n)

    try:
        admin_client(settings).list_topics(timeout=5)
    except KafkaException:
        out["last_experience_to_checkpoint_published_s"] = (
            f"skipped: no broker at {settings.kafka_bootstrap_servers} (run `stormline up`)"
        )
        return out
    # Latency: the live service, the real broker, one batch.
    batch = 200 if quick else 1000
    s = settings.model_copy(
        update={
            "topic_prefix": f"bench{uuid.uuid4().hex[:6]}.",
            "trainer_batch_size": batch,
            "trainer_group_id": f"bench-trainer-{uuid.uuid4().hex[:6]}",
            "trainer_epochs": 2,
        }
    )
    ensure_topics(s)
    serde = Serde.from_settings(s)
    published = threading.Event()
    svc = TrainerService(s, lrn, serde=serde, cfg=cfg, on_update=lambda o: published.set())
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop.is_set,), daemon=True)
    th.start()
    rng = random.Random(3)
    eps = [episode(i, rng) for i in range(batch)]
    prod = EventProducer(s, serde)
    prod.publish([e for a, t, _ in eps for e in (a, t)])
    watcher = reader(s, "bench")
    watcher.subscribe([CHECKPOINTS.name(s)])
    watcher.consume(1, 1.0)  # join the group before the clock starts
    prod.publish([r for _, _, r in eps])
    t_last = time.perf_counter()
    event = None
    while event is None and time.perf_counter() - t_last < 300:
        for m in watcher.consume(1, 0.2):
            if m.error() is None:
                event = serde.decode(m.value(), CheckpointPublished)
    t_pub = time.perf_counter()
    watcher.close()
    stop.set()
    th.join(30)
    svc.close()
    prod.close()
    if event is None:
        out["last_experience_to_checkpoint_published_s"] = "failed: no checkpoint in 300s"
    else:
        out["last_experience_to_checkpoint_published_s"] = t_pub - t_last
        out["latency_batch_experiences"] = float(batch)
        out["latency_checkpoint_promoted"] = str(event.promoted)
        load_checkpoint(event)  # verified load, as the router does
    return out


def run(quick: bool = False) -> dict[str, float | str]:
    import ray

    cfg = PolicyConfig()
    data_dir = Path(tempfile.mkdtemp(prefix="stormline-bench-trainer-"))
    settings = Settings(data_dir=data_dir, ray_num_cpus=2)
    results: dict[str, float | str] = {}
    results["join_experiences_per_s"] = bench_join(5_000 if quick else 50_000)
    t0 = time.perf_counter()
    from stormline.trainer.distributed import RayLearner, start_ray

    start_ray(settings)
    results["ray_init_s"] = time.perf_counter() - t0
    try:
        n = 4_000 if quick else 20_000
        results["train_samples_per_measure"] = float(n * 2)
        for workers in (1, 2):
            t1 = time.perf_counter()
            lrn = RayLearner(settings, cfg, num_workers=workers).start().ready()
            try:
                results.update(bench_training(lrn, n, time.perf_counter() - t1))
                if workers == 2:
                    results.update(bench_latency_and_generalisation(settings, lrn, quick))
            finally:
                lrn.close()
    finally:
        ray.shutdown()
    return results


if __name__ == "__main__":
    out: dict[str, Any] = run(quick="--quick" in sys.argv)
    print(json.dumps(out, indent=2))


# One run takes minutes (repetitions happen inside where the docstring says so).
REPEATS = 1
