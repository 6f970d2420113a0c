"""The evaluator alone (issue 16): CPU per trajectory scored, beside the libraries' floor.

One :class:`~stormline.consumers.evaluator.service.EvaluatorService` runs in this process
against the stack of ``Settings()`` (Kafka, registry, Redis), driven by its own ``step()``,
on fresh topics. The trajectories look like the loop's: the demo task types, each with its
``expected`` answer (verifiers, no judge), the worker's steps and usage; 90% right, 5% wrong,
4% error and 1% the router's own final failure (read and skipped, never scored).

How it is timed: a warm-up batch first (the group joined, schemas fetched, Redis scripts
loaded), then the evaluator's partitions are paused while the measured trajectories are
published, so that nothing of them is fetched before the clock starts; then resumed, and
this process's CPU (every thread: librdkafka's, the commit thread) is read from there until
every trajectory is scored, its reward acknowledged and the offsets committed. Two phases:
``evaluator_*`` with the default batch size (a backlog: 500 per poll) and
``evaluator_batch20_*`` with 20 per poll, as the loop sees them when rewards trickle in, so
that what is paid per batch (flush, commit, the Redis call) shows.

The floors beside it, measured in the same run (:func:`bench.floors.kafka_floors`, and bare
fastavro for the two events the evaluator reads and writes): confluent-kafka consume +
produce per record, and that plus fastavro's decode of the Trajectory and encode of the
Reward (``evaluator_floor_*``). ``evaluator_cpu_per_event_vs_kafka_floor`` is the stage
figure of ``python -m bench``. ``evaluator_redis_round_trips_per_event`` is the requests the
Redis server read per event (one per round trip, however many commands it carries).

``BENCH_PROFILE=0`` skips a third, profiled run (py-spy on this process, ``bench/profile.py``;
collapsed stacks in ``bench/profiles/evaluator.txt``), whose summary says where the CPU goes.
"""

from __future__ import annotations

import io
import os
import random
import resource
import time
import uuid
from typing import Any

import fastavro
import redis

from bench.floors import _best, kafka_floors
from bench.profile import Profiles, summary
from stormline.consumers.evaluator import rules
from stormline.consumers.evaluator.service import EvaluatorService
from stormline.consumers.llm.simulation import solve
from stormline.deploy.demo_tasks import TASK_TYPES, prompt_for
from stormline.schemas.catalog import DEAD_LETTERS, REWARDS, TRAJECTORIES
from stormline.schemas.kafka import EventProducer, ensure_topics
from stormline.schemas.models import (
    ROUTER_AGENT,
    Reward,
    Step,
    Trajectory,
    TrajectoryStatus,
    Usage,
)
from stormline.schemas.serde import FingerprintRegistry, Serde, parsed_schema
from stormline.settings import Settings

REPEATS = 1  # each phase is already a rate over thousands of events
PROFILE = os.environ.get("BENCH_PROFILE", "1") != "0"


def trajectories(n: int, run: str, seed: int = 3) -> list[Trajectory]:
    """``n`` trajectories as workers write them (see the module docstring for the mix)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task_type = TASK_TYPES[i % len(TASK_TYPES)]
        prompt = prompt_for(task_type, rng)
        expected = solve(prompt)[1] or ""
        task_id = f"{run}-{i:07d}"
        roll = rng.random()
        status, output, error, agent = TrajectoryStatus.OK, expected, None, f"agent-{i % 4}"
        if roll < 0.05:
            output = expected + "?"
        elif roll < 0.09:
            status, output, error = TrajectoryStatus.ERROR, None, "server: 503 after 3 tries"
        elif roll < 0.10:
            status, output, error = TrajectoryStatus.ERROR, None, "no trajectory after 3 attempts"
            agent = ROUTER_AGENT
        out.append(
            Trajectory(
                task_id=task_id,
                trajectory_id=f"{task_id}:1",
                attempt=1,
                agent_id=agent,
                task_type=task_type,
                provider="simulated" if agent != ROUTER_AGENT else ROUTER_AGENT,
                model="sim-generalist",
                policy_version="router@1",
                steps=[
                    Step(role="user", content=prompt, prompt_tokens=18),
                    Step(role="assistant", content=output or "", completion_tokens=4),
                ],
                output=output,
                status=status,
                error=error,
                usage=Usage(prompt_tokens=18, completion_tokens=4, cost_usd=0.00002),
                latency_ms=3.5,
                expected=expected,
                final=True,
            )
        )
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reads(r: redis.Redis) -> int:
    info: dict[str, Any] = r.info("stats")
    return int(info["total_reads_processed"])


def _drain(service: EvaluatorService, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while service.scored + service.skipped + service.dead < total:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the evaluator finished {service.scored + service.skipped + service.dead} "
                f"of {total} trajectories in {timeout:.0f}s"
            )
        service.step(0.2)


def phase(n: int, batch_size: int, profile: str | None = None) -> dict[str, float | str]:
    """One timed run over ``n`` trajectories (see the module docstring)."""
    base = Settings()
    s = base.model_copy(
        update={
            "topic_prefix": f"bench-eval-{uuid.uuid4().hex[:6]}.",
            "evaluator_group": f"bench-eval-{uuid.uuid4().hex[:6]}",
            "evaluator_batch_size": batch_size,
        }
    )
    ensure_topics(s, [TRAJECTORIES, REWARDS, DEAD_LETTERS])
    serde = Serde.from_settings(s)
    producer = EventProducer(s, serde)
    service = EvaluatorService(s)
    r = redis.Redis.from_url(s.redis_address)
    warm = trajectories(200, f"warm{uuid.uuid4().hex[:4]}", seed=9)
    measured = trajectories(n, f"run{uuid.uuid4().hex[:4]}")
    try:
        producer.publish(warm)
        _drain(service, len(warm), 120)
        # Nothing of the measured batch may be fetched before the clock starts.
        assigned = service.consumer.raw.assignment()
        service.consumer.raw.pause(assigned)
        producer.publish(measured, timeout=120)
        producer.close()
        before = (service.scored, service.skipped, service.dead, service.batches)
        with service.serving():  # as its run() serves
            spies = Profiles("", {profile: os.getpid()}) if profile else None
            service.consumer.raw.resume(assigned)
            reads0, cpu0, t0 = _reads(r), _cpu(), time.perf_counter()
            _drain(service, len(warm) + n, max(120, n / 100))
            cpu, wall, reads = _cpu() - cpu0, time.perf_counter() - t0, _reads(r) - reads0
        paths = spies.stop() if spies else {}
    finally:
        service.close()
        r.close()
    scored, skipped, dead, batches = (
        now - then
        for now, then in zip(
            (service.scored, service.skipped, service.dead, service.batches), before, strict=True
        )
    )
    if profile:
        path = paths.get(profile)
        return {
            f"{profile}_profile": f"{1000 * cpu / n:.3f} ms CPU per event ({n} events, batches "
            f"of {batch_size}): " + (summary(path, 1000 * cpu / n) if path else "no samples")
        }
    return {
        "events": float(n),
        "rewards": float(scored),
        "router_outcomes_skipped": float(skipped),
        "dead_letters": float(dead),
        "batches": float(batches),
        "events_per_s": round(n / wall),
        "cpu_us_per_event": round(1e6 * cpu / n, 2),
        "cpu_busy": round(cpu / wall, 2),
        "redis_round_trips_per_event": round(reads / n, 4),
    }


def serde_floor(seconds: float) -> dict[str, float]:
    """Bare fastavro: decode of one loop Trajectory, encode of its Reward (µs each)."""
    traj = trajectories(1, "floor")[0]
    evaluation = rules.evaluate_without_judge(traj, {}, judge_configured=False)
    assert isinstance(evaluation, rules.Evaluation)
    record = rules.reward_for(traj, evaluation).model_dump()
    body = Serde(FingerprintRegistry()).encode("floor", traj)[5:]
    t_schema, r_schema = parsed_schema(Trajectory), parsed_schema(Reward)

    def decode() -> Any:
        return fastavro.schemaless_reader(io.BytesIO(body), t_schema, None)

    def encode() -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, r_schema, record)
        return buf.getvalue()

    dec, enc = _best([decode, encode], seconds)
    return {
        "evaluator_floor_fastavro_decode_trajectory_us": round(1e6 / dec, 2),
        "evaluator_floor_fastavro_encode_reward_us": round(1e6 / enc, 2),
    }


def run(quick: bool = False) -> dict[str, float | str]:
    n = 5_000 if quick else 20_000
    out: dict[str, float | str] = {}
    floors = kafka_floors(10_000 if quick else 50_000)
    out |= {k.replace("kafka_floor", "evaluator_floor_kafka"): v for k, v in floors.items()}
    out |= serde_floor(0.3 if quick else 1.0)
    for name, size in (("evaluator", Settings().evaluator_batch_size), ("evaluator_batch20", 20)):
        out |= {f"{name}_{k}": v for k, v in phase(n if size > 20 else n // 4, size).items()}
    kafka = float(out["evaluator_floor_kafka_consume_cpu_us_per_record"]) + float(
        out["evaluator_floor_kafka_produce_cpu_us_per_record"]
    )
    libs = (
        kafka
        + float(out["evaluator_floor_fastavro_decode_trajectory_us"])
        + float(out["evaluator_floor_fastavro_encode_reward_us"])
    )
    for name in ("evaluator", "evaluator_batch20"):
        cpu = float(out[f"{name}_cpu_us_per_event"])
        out[f"{name}_cpu_per_event_vs_kafka_floor"] = round(cpu / kafka, 2)
        out[f"{name}_cpu_per_event_vs_kafka_fastavro_floor"] = round(cpu / libs, 2)
    if PROFILE:
        out |= phase(n, Settings().evaluator_batch_size, profile="evaluator")
    out["evaluator_load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["evaluator_setup"] = (
        "one EvaluatorService in this process, verifiers only (no judge), Redis task status on; "
        "floors: confluent-kafka 150-byte records (produce acks=all lz4 linger 5 ms; consume), "
        "bare fastavro; CPU of this process, every thread"
    )
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
