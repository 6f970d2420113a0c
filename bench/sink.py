"""Sink and analytics benchmark (issue 7).

* ``sink_ingest_events_per_s``: events/s the sink moves from Kafka into chDB Parquet parts
  (first event received to last part written, group join excluded), with a realistic mix:
  tasks, assignments, 3-step trajectories, rewards. Needs the broker of ``Settings()``
  (``stormline up`` or STORMLINE_KAFKA_BOOTSTRAP_SERVERS).
  ``sink_ingest_cpu_us_per_event``: this process's CPU (every thread) over the same window,
  beside confluent-kafka's own consume per record measured in the same run
  (``sink_floor_kafka_*``, :func:`bench.floors.kafka_floors`) and bare fastavro's decode of
  the same event mix (``sink_floor_fastavro_decode_us_per_event``); a profiled run after it
  (``sink_ingest_profile``, py-spy, ``BENCH_PROFILE=0`` skips it) says where that CPU goes.
* ``sink_store_rows_per_s``: rows/s of the store alone (event -> rows -> Parquet), no Kafka.
* ``sink_dedup_index_load_s`` / ``sink_dedup_check_batch_s``: one row per event id, its cost:
  loading one table's id index over N stored events (once per partition assignment), and
  checking a batch of 5,000 rows against it with 1% re-sent events (every write).
* ``per_agent_query_s``: the ``per_agent`` canned query over N trajectories + N rewards
  generated straight into the storage format (Parquet parts of the sink's schema, 500k-row
  parts as a compacted store would hold), best of 3 after one warm-up. Target: < 1 s for
  10M events (``per_agent_events`` says how many the figure covers).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.floors import kafka_floors
from bench.profile import Profiles, summary
from stormline.consumers.sink.analytics import run_canned
from stormline.consumers.sink.store import ParquetStore
from stormline.consumers.sink.tables import SCHEMAS, Origin, rows_of
from stormline.schemas import models as m
from stormline.settings import Settings

AGENTS = [f"agent-{i:02d}" for i in range(20)]
# BENCH_PROFILE=0 skips the profiled ingest run (bench/profiles/sink_ingest.txt).
PROFILE = os.environ.get("BENCH_PROFILE", "1") != "0"


def _events(n_tasks: int) -> list[m.Event]:
    out: list[m.Event] = []
    base = datetime.now(UTC) - timedelta(hours=1)
    for i in range(n_tasks):
        at = base + timedelta(milliseconds=i)
        task = m.TaskSubmitted(
            task_id=f"t{i}", task_type="math", prompt=f"What is {i} + 1?", occurred_at=at
        )
        agent = AGENTS[i % len(AGENTS)]
        out.append(task)
        out.append(
            m.TaskAssigned(
                task_id=task.task_id,
                attempt=1,
                agent_id=agent,
                policy=m.PolicyKind.QTABLE,
                strategy="ucb1",
                assigned_at=at,
                expires_at=at + timedelta(minutes=1),
                task=m.AssignedTask.of(task),
            )
        )
        out.append(
            m.Trajectory(
                task_id=task.task_id,
                trajectory_id=f"{task.task_id}-1",
                attempt=1,
                agent_id=agent,
                task_type="math",
                provider="openai",
                model="sim",
                steps=[
                    m.Step(role="system", content="You solve arithmetic."),
                    m.Step(role="user", content=task.prompt, prompt_tokens=20),
                    m.Step(role="assistant", content=str(i + 1), completion_tokens=3),
                ],
                output=str(i + 1),
                status=m.TrajectoryStatus.OK,
                usage=m.Usage(prompt_tokens=20, completion_tokens=3, cost_usd=0.0001),
                latency_ms=120.0,
            )
        )
        out.append(
            m.Reward(
                task_id=task.task_id,
                trajectory_id=f"{task.task_id}-1",
                attempt=1,
                agent_id=agent,
                task_type="math",
                value=1.0,
                source=m.RewardSource.VERIFIER,
            )
        )
    return out


def bench_ingest(n_tasks: int, profile: str | None = None) -> dict[str, float | str]:
    """Events/s and CPU per event of one Sink in this process (every thread), first event
    received to last part written; ``profile``: py-spy on this process meanwhile, and its
    summary instead of the figures (the sampler shares the cores)."""
    from stormline.consumers.sink.service import Sink
    from stormline.schemas.kafka import EventProducer, ensure_topics
    from stormline.schemas.serde import Serde

    base = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        s = base.model_copy(
            update={
                "data_dir": Path(tmp),
                "topic_prefix": f"bench-sink-{uuid.uuid4().hex[:6]}.",
                "sink_group": f"bench-sink-{uuid.uuid4().hex[:6]}",
                "sink_batch_size": 5000,
                "sink_flush_seconds": 1.0,
            }
        )
        ensure_topics(s)
        serde = Serde.from_settings(s)
        events = _events(n_tasks)
        producer = EventProducer(s, serde)
        producer.publish(events)
        producer.close()
        sink = Sink(s, serde=serde)
        spies = Profiles("", {profile: os.getpid()}) if profile else None
        stats = sink.run(until_idle=3.0)
        paths = spies.stop() if spies else {}
        assert stats.events == len(events), (stats.events, len(events))
        assert stats.first_record_at is not None and stats.last_write_at is not None
        assert stats.first_record_cpu is not None and stats.last_write_cpu is not None
        took = stats.last_write_at - stats.first_record_at
        cpu = stats.last_write_cpu - stats.first_record_cpu
        if profile:
            path = paths.get(profile)
            ms = 1000 * cpu / len(events)
            return {
                f"{profile}_profile": f"{ms:.3f} ms CPU per event ({len(events)} events): "
                + (summary(path, ms) if path else "no samples")
            }
        return {
            "sink_ingest_events": float(len(events)),
            "sink_ingest_rows": float(stats.rows),
            "sink_ingest_events_per_s": len(events) / took,
            "sink_ingest_cpu_us_per_event": round(1e6 * cpu / len(events), 2),
            "sink_ingest_cpu_busy": round(cpu / took, 2),
        }


def bench_store(n_tasks: int) -> dict[str, float]:
    events = _events(n_tasks)
    with tempfile.TemporaryDirectory() as tmp:
        store = ParquetStore(Path(tmp))
        t0 = time.perf_counter()
        tables: dict[str, list[dict[str, Any]]] = {}
        for off, ev in enumerate(events):
            for table, row in rows_of(Origin("bench", off % 4, off, 0, None), ev):
                tables.setdefault(table, []).append(row)
        for table, rows in tables.items():
            store.insert(table, rows)
        took = time.perf_counter() - t0
        n_rows = sum(len(r) for r in tables.values())
    return {"sink_store_events_per_s": len(events) / took, "sink_store_rows_per_s": n_rows / took}


def _generate(root: Path, n: int, part_rows: int = 500_000) -> None:
    """``n`` trajectories and ``n`` rewards straight into Parquet parts of the sink's schema."""
    rng = np.random.default_rng(1)
    ts0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    for start in range(0, n, part_rows):
        k = min(part_rows, n - start)
        idx = np.arange(start, start + k)
        agent = pa.array(np.array(AGENTS)[idx % len(AGENTS)])
        task_ids = pa.array([f"t{i // 2}" for i in idx.tolist()])  # two attempts per task
        traj_ids = pa.array([f"t{i // 2}-{i % 2 + 1}" for i in idx.tolist()])
        ts = pa.array(ts0 + idx, pa.timestamp("ms", tz="UTC"))
        common = {
            "topic": pa.array(["bench"] * k),
            "partition": pa.array(np.zeros(k, np.int32)),
            "offset": pa.array(idx.astype(np.int64)),
            "ts": ts,
            "key": task_ids,
            "event_id": traj_ids,
            "occurred_at": ts,
            "schema_version": pa.array(np.ones(k, np.int32)),
        }
        status = np.where(rng.random(k) < 0.8, "ok", "error")
        pt = rng.integers(10, 500, k)
        ct = rng.integers(5, 300, k)
        traj = {
            **common,
            "task_id": task_ids,
            "trajectory_id": traj_ids,
            "attempt": pa.array((idx % 2 + 1).astype(np.int32)),
            "agent_id": agent,
            "task_type": pa.array(np.array(["math", "code", "text"])[idx % 3]),
            "provider": pa.array(["openai"] * k),
            "model": pa.array(["sim"] * k),
            "policy_version": pa.array(["router@1"] * k),
            "status": pa.array(status),
            "error": pa.array([""] * k),
            "output": pa.array([""] * k),
            "n_steps": pa.array(np.full(k, 3, np.int32)),
            "prompt_tokens": pa.array(pt.astype(np.int64)),
            "completion_tokens": pa.array(ct.astype(np.int64)),
            "total_tokens": pa.array((pt + ct).astype(np.int64)),
            "cost_usd": pa.array(rng.random(k) * 0.01),
            "latency_ms": pa.array(rng.gamma(2.0, 150.0, k)),
            "evaluator": pa.array([""] * k),
            "final": pa.array(np.ones(k, bool)),
        }
        rew = {
            **common,
            "task_id": task_ids,
            "trajectory_id": traj_ids,
            "attempt": traj["attempt"],
            "agent_id": agent,
            "task_type": traj["task_type"],
            "policy_version": traj["policy_version"],
            "value": pa.array(np.where(status == "ok", rng.random(k), -rng.random(k))),
            "components": pa.array([[]] * k, SCHEMAS["rewards"].field("components").type),
            "source": pa.array(["verifier"] * k),
            "reason": pa.array([""] * k),
        }
        for table, cols in (("trajectories", traj), ("rewards", rew)):
            t = pa.Table.from_pydict(cols, schema=SCHEMAS[table])
            pq.write_table(t, root / table / f"bench.0.{start:020d}.{start + k - 1:020d}.parquet")


def bench_per_agent(n_each: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ParquetStore(root)
        t0 = time.perf_counter()
        _generate(root, n_each)
        gen = time.perf_counter() - t0
        run_canned(store, "per_agent")  # warm-up: schema inference, page cache
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = run_canned(store, "per_agent")
            times.append(time.perf_counter() - t0)
        assert len(res.rows) == len(AGENTS)
        assert sum(r["attempts"] for r in res.dicts()) == n_each
        size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    return {
        "per_agent_events": float(2 * n_each),
        "per_agent_query_s": min(times),
        "per_agent_query_median_s": sorted(times)[1],
        "per_agent_data_mb": size / 1e6,
        "per_agent_generate_s": gen,
        "per_agent_cpus": str(os.cpu_count()),
    }


def _filler(f: pa.Field, n: int) -> pa.Array:
    """``n`` default values of ``f`` (null where it may be)."""
    if f.nullable:
        return pa.nulls(n, f.type)
    t = f.type
    if pa.types.is_string(t):
        return pa.array([""] * n, t)
    if pa.types.is_list(t) or pa.types.is_map(t):
        return pa.array([[]] * n, t)
    if pa.types.is_boolean(t):
        return pa.array([False] * n, t)
    return pa.array(np.zeros(n, np.int64)).cast(t)


def bench_dedup(n_stored: int, batch: int = 5_000) -> dict[str, float]:
    """One row per event id: loading a table's id index (once per assignment) and checking
    a batch against it (every write), with 1% of the batch re-sent events (exact check)."""
    from stormline.consumers.sink.dedup import SeenIds, first_copies

    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ParquetStore(root)
        ids = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**63, n_stored)]
        ts = pa.array(np.zeros(n_stored, np.int64), pa.timestamp("ms", tz="UTC"))
        cols = {f.name: _filler(f, n_stored) for f in SCHEMAS["rewards"]}
        cols.update(
            topic=pa.array(["bench"] * n_stored),
            partition=pa.array(np.zeros(n_stored, np.int32)),
            offset=pa.array(np.arange(n_stored, dtype=np.int64)),
            event_id=pa.array(ids),
            ts=ts,
            occurred_at=ts,
            value=pa.array(np.ones(n_stored)),
        )
        data = pa.Table.from_pydict(cols, schema=SCHEMAS["rewards"])
        pq.write_table(data, root / "rewards" / f"bench.0.{0:020d}.{n_stored - 1:020d}.parquet")
        query = lambda sql: store.query(sql).rows  # noqa: E731
        t0 = time.perf_counter()
        seen = SeenIds.load("rewards", store.query_arrow)
        load = time.perf_counter() - t0
        fresh = [str(uuid.uuid4()) for _ in range(batch)]
        fresh[: batch // 100] = ids[: batch // 100]  # re-sent: the table has them
        rows = [
            {"topic": "bench", "partition": 0, "offset": n_stored + i, "event_id": e}
            for i, e in enumerate(fresh)
        ]
        t0 = time.perf_counter()
        keep = first_copies(rows, seen, query, "rewards")
        check = time.perf_counter() - t0
        assert len(keep) == batch - batch // 100
    return {
        "sink_dedup_stored_ids": float(n_stored),
        "sink_dedup_index_load_s": load,
        "sink_dedup_check_batch_s": check,
        "sink_dedup_batch": float(batch),
    }


def decode_floor(seconds: float) -> dict[str, float]:
    """Bare fastavro: decode of the ingest's event mix, µs per event (each type's example at
    its share of the mix, best of 7 slices)."""
    import io

    import fastavro

    from bench.floors import _best
    from stormline.schemas.serde import FingerprintRegistry, Serde, parsed_schema

    serde = Serde(FingerprintRegistry())
    mix = _events(1)  # one of each: a task, its assignment, trajectory and reward
    bodies = [(serde.encode("floor", ev)[5:], parsed_schema(type(ev))) for ev in mix]

    def decode_mix() -> None:
        for body, schema in bodies:
            fastavro.schemaless_reader(io.BytesIO(body), schema, None)

    (rate,) = _best([decode_mix], seconds)
    return {"sink_floor_fastavro_decode_us_per_event": round(1e6 / rate / len(bodies), 2)}


def run(quick: bool = False, *, only_ingest: bool = False) -> dict[str, float | str]:
    """``only_ingest``: the ingest figures, their floor and profile only (issue 16's check)."""
    out: dict[str, float | str] = {}
    floors = kafka_floors(10_000 if quick else 50_000)
    out |= {k.replace("kafka_floor", "sink_floor_kafka"): v for k, v in floors.items()}
    out |= decode_floor(0.3 if quick else 1.0)
    if not only_ingest:
        out.update(bench_dedup(100_000 if quick else 1_000_000))
        out.update(bench_store(2_000 if quick else 20_000))
    out.update(bench_ingest(1_000 if quick else 10_000))
    floor = float(out["sink_floor_kafka_consume_cpu_us_per_record"])
    cpu = float(out["sink_ingest_cpu_us_per_event"])
    out["sink_ingest_cpu_per_event_vs_kafka_consume_floor"] = round(cpu / floor, 2)
    out["sink_ingest_cpu_per_event_vs_kafka_fastavro_floor"] = round(
        cpu / (floor + float(out["sink_floor_fastavro_decode_us_per_event"])), 2
    )
    if PROFILE:
        out.update(bench_ingest(1_000 if quick else 10_000, profile="sink_ingest"))
    if not only_ingest:
        out.update(bench_per_agent(500_000 if quick else 5_000_000))
    out["sink_load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv, only_ingest="--ingest" in sys.argv), indent=2))


# One run takes minutes (repetitions happen inside where the docstring says so).
REPEATS = 1
