"""The trainer through the real broker and one real local Ray (started once per session).

Longer than ~400 lines because the tests share this module's Ray learner (tens of seconds to
start) and its publishing and checkpoint-reading helpers.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from stormline.runtime.connection import client_logger, confluent_config
from stormline.schemas.catalog import CHECKPOINTS, REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventProducer, end_offsets
from stormline.schemas.models import CheckpointPublished, Reward, RewardSource, TaskSubmitted
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.streams.policy import load_policy
from stormline.trainer.checkpoints import ChecksumMismatch, load_checkpoint
from stormline.trainer.distributed import RayLearner
from stormline.trainer.join import Experience, Joiner, SourceRef
from stormline.trainer.policy import (
    PolicyConfig,
    RouterNet,
    encode_experiences,
    evaluate,
)
from stormline.trainer.replay import Range, read_range, replay
from stormline.trainer.service import TrainerService
from stormline.trainer.update import UpdateOutcome
from tests.conftest import settings_env, uncommitted, wait_until
from tests.trainer_events import AGENTS, BEST, reward, world

CFG = PolicyConfig(buckets=4096, dim=16, hidden=32)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def learner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayLearner]:
    """One Ray instance and one 2-worker TorchTrainer for the whole session."""
    import ray

    s = Settings(data_dir=tmp_path_factory.mktemp("ray"), ray_num_workers=2, ray_num_cpus=2)
    lrn = RayLearner(s, CFG).start().ready()
    try:
        yield lrn
    finally:
        lrn.close()
        ray.shutdown()


def tuned(settings: Settings, **kw: object) -> Settings:
    base = {
        "trainer_group_id": f"{settings.topic_prefix}trainer",
        "trainer_epochs": 8,
        "trainer_minibatch": 32,
        "trainer_lr": 0.03,
        "trainer_state_interval_s": 3600.0,
        "trainer_batch_max_wait_s": 3600.0,
    }
    return settings.model_copy(update={**base, **kw})


def publish_world(
    settings: Settings,
    serde: Serde,
    episodes: list,
    *,
    skip_rewards: set[int] = frozenset(),
    rewards_first: bool = False,
) -> None:  # type: ignore[type-arg]
    prod = EventProducer(settings, serde)
    evs: list = []  # type: ignore[type-arg]
    for a, t, r in episodes:
        i = int(t.trajectory_id.split("-")[1])
        pair = [r, t] if rewards_first and i % 3 == 0 else [t, r]
        evs += [a] + [e for e in pair if not (e is r and i in skip_rewards)]
    prod.publish(evs)
    prod.close()


def run_until(svc: TrainerService, pred, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "trainer did not get there in time"
        svc.step(timeout=0.3)


def checkpoints_on_topic(settings: Settings, serde: Serde, n: int) -> list[CheckpointPublished]:
    c = Consumer(
        {
            **confluent_config(settings),
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        },
        logger=client_logger(),
    )
    c.subscribe([CHECKPOINTS.name(settings)])
    out: list[CheckpointPublished] = []
    deadline = time.monotonic() + 20
    while len(out) < n and time.monotonic() < deadline:
        for m in c.consume(10, 0.5):
            if m.error() is None:
                out.append(serde.decode(m.value(), CheckpointPublished))
    c.close()
    return out


# ------------------------------------------------------------------------ DDP update --
def test_two_worker_ddp_update_lowers_loss(learner: RayLearner) -> None:
    j, exps = Joiner(), []
    for i, (_, t, r) in enumerate(world(300, seed=1)):
        ref = SourceRef(topic="t", partition=0, offset=i)
        j.add_trajectory(t, ref, i)
        exps += j.add_reward(r, ref, i)
    data = encode_experiences(CFG, exps)
    torch.manual_seed(0)
    before = evaluate(RouterNet(CFG), data)
    res = learner.update(data, init_state=None, epochs=3, batch_size=32, lr=0.03)
    after_model = RouterNet(CFG)
    after_model.load_state_dict(res.state)
    after = evaluate(after_model, data)
    assert res.metrics["workers"] == 2.0
    assert res.metrics["train_loss"] < res.metrics["train_loss_first_epoch"]
    assert after < 0.5 * before, (before, after)
    # Fine-tuning from those weights keeps lowering the loss.
    res2 = learner.update(data, init_state=res.state, epochs=1, batch_size=32, lr=0.01)
    assert res2.metrics["train_loss"] <= res.metrics["train_loss"] * 1.05


# -------------------------------------- service: join, checkpoint, publish, verify, load --
def test_trainer_publishes_a_verified_checkpoint_the_router_can_load(
    topics: Settings, serde: Serde, learner: RayLearner
) -> None:
    # 120 training samples over 9 (type, agent) cells: 8 epochs left the ranking of close
    # agents to chance in one CI run (0.67 vs 0.62); 30 make it settled, still in seconds.
    s = tuned(topics, trainer_batch_size=150, trainer_holdout_fraction=0.2, trainer_epochs=30)
    episodes = world(150, seed=2)
    # Rewards first for every third episode; 10 duplicate rewards with other values.
    publish_world(s, serde, episodes, rewards_first=True)
    dups = [r.model_copy(update={"value": 1.0 - r.value}) for _, _, r in episodes[:10]]
    prod = EventProducer(s, serde)
    prod.publish(dups)
    prod.close()
    outs: list[UpdateOutcome] = []
    svc = TrainerService(s, learner, serde=serde, cfg=CFG, on_update=outs.append)
    try:
        run_until(svc, lambda: bool(outs) and svc.state.joiner.stats.duplicate_rewards >= 10)
    finally:
        svc.close()
    out = outs[0]
    assert svc.state.joiner.stats.joined == 150
    assert svc.state.joiner.stats.duplicate_rewards == 10
    joined = {e.trajectory_id: e.reward for e in out.trained + out.holdout}
    assert all(
        joined[r.trajectory_id] == r.value for _, _, r in episodes if r.trajectory_id in joined
    )
    [event] = checkpoints_on_topic(s, serde, 1)
    assert event == out.event and event.version == 1 and event.promoted
    assert event.decision.startswith("promoted")
    assert {r.topic for r in event.trained_on} == {
        TRAJECTORIES.name(s),
        REWARDS.name(s),
        s.topic("assignments"),
    }
    meta = json.loads((Path(event.uri) / "meta.json").read_text())
    assert meta["sha256"] == event.sha256 and meta["config"]["buckets"] == CFG.buckets
    # The router's loader: verifies, loads, and the policy learned the world.
    scorer = load_checkpoint(event)
    assert scorer.version == 1
    assert load_policy(event) is not None  # the router's own wrapper around load_checkpoint
    for ty, best in BEST.items():
        text = {"math": "solve integral", "code": "python function", "prose": "essay poem"}[ty]
        task = TaskSubmitted(task_id="q", task_type=ty, prompt=f"please {text}")
        scores = scorer.score(task, AGENTS, {})
        assert max(scores, key=scores.__getitem__) == best, (ty, scores)
    # A tampered copy is refused before anything is deserialised.
    bad = Path(s.data_dir) / "tampered"
    shutil.copytree(event.uri, bad)
    blob = bytearray((bad / "weights.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ChecksumMismatch, match="refusing to load"):
        load_checkpoint(str(bad), event.sha256)
    # The live group committed exactly what it consumed.
    c = Consumer({**confluent_config(s), "group.id": s.trainer_group_id}, logger=client_logger())
    committed = c.committed([TopicPartition(TRAJECTORIES.name(s), p) for p in range(4)], timeout=10)
    c.close()
    assert sum(max(0, tp.offset) for tp in committed) == 150

    # ---- replay of the same range reproduces the training set, live offsets untouched --
    rep = read_range(s, Range(from_offset="0"))
    key = lambda e: (e.trajectory_id, e.reward, e.agent_id, e.task_text)  # noqa: E731
    live = sorted(key(e) for e in out.trained + out.holdout)
    assert sorted(key(e) for e in rep.experiences) == live
    by_time = read_range(s, Range(since=None, until=None))
    assert sorted(key(e) for e in by_time.experiences) == live
    assert all(
        e.propensity in (pytest.approx(0.2), pytest.approx(0.8)) for e in by_time.experiences
    )
    summary = replay(s, Range(from_offset="0"), learner=learner, from_scratch=True)
    assert summary["experiences"] == 150 and summary["version"] == 2
    meta2 = json.loads((Path(summary["uri"]) / "meta.json").read_text())
    assert sorted(meta2["trajectory_ids"]) == sorted(e.trajectory_id for e in out.trained)
    c = Consumer({**confluent_config(s), "group.id": s.trainer_group_id}, logger=client_logger())
    again = c.committed([TopicPartition(TRAJECTORIES.name(s), p) for p in range(4)], timeout=10)
    c.close()
    assert [tp.offset for tp in again] == [tp.offset for tp in committed]


def test_replay_cli_writes_the_joined_range_to_a_topic(topics: Settings, serde: Serde) -> None:
    s = topics
    publish_world(s, serde, world(40, seed=3), skip_rewards={5, 6})
    out_topic = f"{s.topic_prefix}experiences"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stormline.cli",
            "replay",
            "--from-offset",
            "0",
            "--no-train",
            "--to-topic",
            out_topic,
        ],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["experiences"] == 38 and summary["written"] == 38 and summary["unjoined"] == 2
    c = Consumer(
        {
            **confluent_config(s),
            "group.id": f"x-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        },
        logger=client_logger(),
    )
    c.subscribe([out_topic])
    got: list[Experience] = []
    deadline = time.monotonic() + 20
    while len(got) < 38 and time.monotonic() < deadline:
        got += [
            Experience.model_validate_json(m.value())
            for m in c.consume(100, 0.5)
            if m.error() is None
        ]
    c.close()
    assert sorted(e.trajectory_id for e in got) == sorted(
        f"traj-{i}" for i in range(40) if i not in (5, 6)
    )
    bad = subprocess.run(
        [sys.executable, "-m", "stormline.cli", "replay", "--since", "yesterday-ish", "--no-train"],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


# ------------------------------------------------------------ restart loses nothing --
def test_trainer_restart_loses_no_experience(
    topics: Settings, serde: Serde, learner: RayLearner
) -> None:
    s = tuned(topics, trainer_batch_size=10_000, trainer_holdout_fraction=0.0)
    part1 = world(80, seed=4)
    late = set(range(70, 80))  # their rewards come only in the third life
    publish_world(s, serde, part1, skip_rewards=late)
    trained: list[str] = []

    def collect(o: UpdateOutcome) -> None:
        trained.extend(e.trajectory_id for e in o.trained)

    # First life: train on what joined, take more traffic, stop gracefully (SIGTERM path).
    svc = TrainerService(s, learner, serde=serde, cfg=CFG, on_update=collect)
    run_until(svc, lambda: svc.state.joiner.stats.joined == 70)
    svc.update()
    part2a = world(10, seed=5, start=100)
    publish_world(s, serde, part2a)
    run_until(svc, lambda: svc.state.joiner.stats.joined == 80)
    svc.close()
    assert len(trained) == 70

    # Second life: the buffer and the pending join came back; more traffic, then a crash.
    svc2 = TrainerService(s, learner, serde=serde, cfg=CFG, on_update=collect)
    assert len(svc2.state.buffer) == 10 and svc2.state.joiner.pending >= 10
    part2b = world(20, seed=6, start=200)
    publish_world(s, serde, part2b)
    run_until(svc2, lambda: svc2.state.joiner.stats.joined == 100)
    svc2.consumer.raw.close()  # crash: nothing saved or committed in this life
    svc2.producer.close()

    # Third life: the late rewards arrive; everything is trained exactly once.
    prod = EventProducer(s, serde)
    prod.publish([r for _, _, r in part1 if int(r.trajectory_id.split("-")[1]) in late])
    prod.close()
    svc3 = TrainerService(s, learner, serde=serde, cfg=CFG, on_update=collect)
    try:
        run_until(svc3, lambda: svc3.state.joiner.stats.joined == 110)
        svc3.update()
    finally:
        svc3.close()
    expected = sorted(t.trajectory_id for _, t, _ in part1 + part2a + part2b)
    assert sorted(trained) == expected  # each exactly once, none lost
    assert svc3.store.versions() == [1, 2]


def test_a_ray_cluster_gets_every_part_of_stormline() -> None:
    """From a checkout, the card's folders join the namespace only when installed: what a
    cluster's workers get is a wheel with all of them under stormline/."""
    import zipfile

    from stormline.trainer.distributed import _shippable_package

    shipped = _shippable_package()
    assert shipped.endswith(".whl")
    names = zipfile.ZipFile(shipped).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"stormline"}
    for module in ("trainer/distributed.py", "schemas/models.py", "schemas/avro/reward.avsc"):
        assert f"stormline/{module}" in names


# ------------------------------------------------------------------- crash windows --
def _trained_ids(store_dir: Path, version: int) -> list[str]:
    meta = json.loads((store_dir / f"v{version:06d}" / "meta.json").read_text())
    return sorted(meta["trajectory_ids"])


@pytest.mark.parametrize("point", ["after-publish", "after-checkpoint"])
def test_a_kill_9_during_an_update_trains_nothing_twice(
    topics: Settings, serde: Serde, point: str
) -> None:
    s = tuned(
        topics,
        trainer_batch_size=30,
        trainer_holdout_fraction=0.0,
        trainer_state_interval_s=0.5,
        trainer_assignment_wait_s=0.0,
        ray_num_workers=1,
        ray_num_cpus=1,
    )
    episodes = world(30, seed=7)
    publish_world(s, serde, episodes)
    env = settings_env(s)
    # First life: killed -9 at `point` of its first update.
    crash = subprocess.run(
        [sys.executable, "-m", "tests.trainer_crash", point],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert crash.returncode == -9, crash.stderr[-3000:]
    # Second life: the plain trainer, until it has committed everything there is.
    log = Path(s.data_dir) / "trainer.log"  # a file: a pipe nobody reads would block it
    with log.open("wb") as out:
        life = subprocess.Popen(
            [sys.executable, "-m", "stormline.cli", "trainer"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        topics_read = [TRAJECTORIES.name(s), REWARDS.name(s)]
        wait_until(
            lambda: life.poll() is not None or not uncommitted(s, s.trainer_group_id, topics_read),
            timeout=240,
            what="the restarted trainer to commit every record",
        )
        assert life.poll() is None, "the restarted trainer stopped"
    finally:
        life.send_signal(signal.SIGTERM)
        life.wait(120)
    assert life.returncode == 0, log.read_text()[-3000:]
    store_dir = Path(s.data_dir) / "checkpoints" / s.trainer_policy_name
    events = checkpoints_on_topic(s, serde, 2)
    # One version, trained on every episode once; a re-publication is the same event.
    assert {e.version for e in events} == {1}, [e.version for e in events]
    assert len({e.event_id for e in events}) == 1
    assert sorted(p.name for p in store_dir.iterdir() if p.name.startswith("v")) == ["v000001"]
    assert _trained_ids(store_dir, 1) == sorted(t.trajectory_id for _, t, _ in episodes)


def test_a_checkpoint_without_meta_is_ignored_and_the_trainer_starts(
    topics: Settings, serde: Serde, learner: RayLearner
) -> None:
    s = tuned(topics, trainer_batch_size=20, trainer_holdout_fraction=0.0)
    store_dir = Path(s.data_dir) / "checkpoints" / s.trainer_policy_name
    # A crash between the weights and meta.json of v1 (the old layout wrote in place), and a
    # temporary directory of the new layout left half-written.
    (store_dir / "v000001").mkdir(parents=True)
    (store_dir / "v000001" / "weights.safetensors").write_bytes(b"half a file")
    (store_dir / ".v000002.tmp-0123abcd").mkdir()
    outs: list[UpdateOutcome] = []
    svc = TrainerService(s, learner, serde=serde, cfg=CFG, on_update=outs.append)
    try:
        assert svc.weights is None and svc.store.latest() is None
        publish_world(s, serde, world(20, seed=8))
        run_until(svc, lambda: bool(outs))
    finally:
        svc.close()
    # The new version skips past the leftover, which stays as it was.
    assert outs[0].event.version == 2 and svc.store.versions() == [2]
    assert svc.store.latest() == (svc.store.uri_of(2), outs[0].event.sha256)
    assert (store_dir / "v000001" / "weights.safetensors").read_bytes() == b"half a file"
    [event] = checkpoints_on_topic(s, serde, 1)
    assert event.version == 2


# ------------------------------------------------------------------ human feedback --
def caught_up(svc: TrainerService, s: Settings) -> bool:
    """The trainer has applied every record of the rewards topic there is now."""
    name = REWARDS.name(s)
    ends = end_offsets(s, name, s.default_partitions)
    return all(svc.state.positions.get((name, p), 0) >= end for p, end in enumerate(ends))


def test_the_trainer_trains_a_human_reward_over_the_automatic_one_once(
    topics: Settings, serde: Serde, learner: RayLearner
) -> None:
    s = tuned(topics, trainer_batch_size=10_000, trainer_holdout_fraction=0.0)
    episodes = world(20, seed=9)
    publish_world(s, serde, episodes)

    def human(i: int) -> Reward:
        _, t, r = episodes[i]
        return reward(i, t.agent_id, 1.0 - r.value, t.task_type, source=RewardSource.HUMAN)

    trained: list[list[Experience]] = []
    svc = TrainerService(
        s, learner, serde=serde, cfg=CFG, on_update=lambda o: trained.append(o.trained)
    )
    try:
        run_until(svc, lambda: svc.state.joiner.stats.joined == 20)
        # Human feedback on 5 experiences still buffered: they replace the automatic ones.
        prod = EventProducer(s, serde)
        prod.publish([human(i) for i in range(5)])
        run_until(svc, lambda: caught_up(svc, s))
        svc.update()
        # Feedback on one already trained, and the first 5 delivered again.
        prod.publish([human(i) for i in range(6)])
        prod.close()
        run_until(svc, lambda: caught_up(svc, s))
        svc.update()
    finally:
        svc.close()
    first = trained[0]
    by_id = {e.trajectory_id: e for e in first}
    assert len(first) == 20 and len(by_id) == 20
    for i, (_, t, r) in enumerate(episodes):
        want = 1.0 - r.value if i < 5 else r.value
        assert by_id[t.trajectory_id].reward == want, (i, by_id[t.trajectory_id])
    assert len(trained) == 2, "the correction of a trained experience is trained next"
    assert [(e.trajectory_id, e.reward, e.reward_source) for e in trained[1]] == [
        ("traj-5", 1.0 - episodes[5][2].value, "human")
    ]
