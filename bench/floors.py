"""The libraries' own floors, measured in the same run as the stages built on them (issue 16).

A stage's figure means little on a noisy 2-core machine; its ratio to the bare library doing
the same work, measured minutes apart on the same cores, means the same anywhere. This suite
measures the floors that no other suite already does:

* fastavro alone, per event type (the same example event, its dict prepared once): encodes and
  decodes per second (best of 7 slices taken in turn with the stage's), next to Stormline's
  serde (header + the instance's own fields + fastavro; fastavro + the models built from its
  record, their limits checked: ``stormline.schemas.construct``), and
  ``serde_<type>_{encode,decode}_vs_fastavro`` = serde rate / fastavro rate (target >= 0.9);
* confluent-kafka alone: CPU per record to produce (acks=all, lz4, linger 5 ms: the loop's
  producer settings) and to consume a 150-byte record, this process's CPU (librdkafka's threads
  included) over the wall time of each phase;
* Redis alone: one round trip (``PING``) and one pipelined round trip of four commands, wall
  µs and client CPU µs.

The other floors come from the suites that use them: the SDK call per transport from
``bench/worker.py`` (``sdk_floor_*``), the bare Faust forwarder from ``bench/router.py``.
``python -m bench`` prints every stage beside its floor at the end (``STAGES`` there).
"""

from __future__ import annotations

import io
import resource
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import fastavro

from stormline.schemas.serde import FingerprintRegistry, Serde, parsed_schema

REPEATS = 1  # each figure is already a rate over seconds of work
KAFKA_RECORDS = 50_000


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / elapsed


def _best(fns: list[Callable[[], Any]], seconds: float, rounds: int = 7) -> list[float]:
    """Each function's best rate over ``rounds`` short slices taken in turn: the floor and the
    stage see the same moments of a shared machine, and the best slice is the least disturbed."""
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = max(best[i], _rate(fn, seconds / rounds))
    return best


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def serde_floors(seconds: float) -> dict[str, float]:
    from tests.test_schemas import full_examples  # one instance of every event type

    serde = Serde(FingerprintRegistry())
    out: dict[str, float] = {}
    for ev in full_examples():
        kind = type(ev)
        name = _snake(kind.__name__)
        schema = parsed_schema(kind)
        record = ev.model_dump()
        data = serde.encode("bench", ev)
        body = data[5:]

        def bare_encode(record: dict[str, Any] = record, schema: Any = schema) -> bytes:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, record)
            return buf.getvalue()

        def bare_decode(body: bytes = body, schema: Any = schema) -> Any:
            return fastavro.schemaless_reader(io.BytesIO(body), schema, None)

        serde_decode = partial(serde.decode, data, kind)
        enc_floor, enc, dec_floor, dec = _best(
            [bare_encode, partial(serde.encode, "bench", ev), bare_decode, serde_decode],
            seconds,
        )
        out |= {
            f"fastavro_{name}_encode_per_s": round(enc_floor),
            f"fastavro_{name}_decode_per_s": round(dec_floor),
            f"serde_{name}_encode_per_s": round(enc),
            f"serde_{name}_decode_per_s": round(dec),
            f"serde_{name}_encode_vs_fastavro": round(enc / enc_floor, 3),
            f"serde_{name}_decode_vs_fastavro": round(dec / dec_floor, 3),
            # What the serde adds per record (negative: it saves more of fastavro's own work,
            # its per-call schema parsing and logical-type hook, than its models cost).
            f"serde_{name}_encode_extra_us": round(1e6 / enc - 1e6 / enc_floor, 2),
            f"serde_{name}_decode_extra_us": round(1e6 / dec - 1e6 / dec_floor, 2),
        }
    return out


def kafka_floors(n: int) -> dict[str, float]:
    from confluent_kafka import Producer, TopicPartition

    from stormline.runtime.admin import TopicWanted, ensure_topics
    from stormline.runtime.consumer import reader
    from stormline.runtime.producer import producer_config
    from stormline.settings import Settings

    s = Settings()
    topic = f"bench-floors-{uuid.uuid4().hex[:8]}"
    ensure_topics(s, [TopicWanted(topic, 1)])
    value = b"x" * 150
    producer = Producer(producer_config(s))
    cpu0, t0 = _cpu(), time.perf_counter()
    for i in range(n):
        while True:
            try:
                producer.produce(topic, value, key=str(i % 64).encode())
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("the floor's records were not all acknowledged within 60 s")
    produce_cpu, produce_wall = _cpu() - cpu0, time.perf_counter() - t0

    consumer = reader(s, "bench-floors", **{"fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got, cpu0, t0 = 0, _cpu(), time.perf_counter()
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            got += msg.error() is None
    consume_cpu, consume_wall = _cpu() - cpu0, time.perf_counter() - t0
    consumer.close()
    if got < n:
        raise RuntimeError(f"the floor consumed {got} of {n} records within 120 s")
    return {
        "kafka_floor_records": float(n),
        "kafka_floor_produce_cpu_us_per_record": round(produce_cpu / n * 1e6, 2),
        "kafka_floor_produce_records_per_s": round(n / produce_wall),
        "kafka_floor_consume_cpu_us_per_record": round(consume_cpu / n * 1e6, 2),
        "kafka_floor_consume_records_per_s": round(n / consume_wall),
    }


def redis_floors(n: int) -> dict[str, float]:
    import redis

    from stormline.settings import Settings

    r = redis.Redis.from_url(Settings().redis_address)
    key = f"bench-floors-{uuid.uuid4().hex[:8]}"
    r.ping()

    def pipelined() -> None:
        p = r.pipeline(transaction=False)
        p.hset(key, mapping={"state": "running", "attempt": 1})
        p.expire(key, 60)
        p.get(key + ":idem")
        p.incr(key + ":n")
        p.execute()

    out: dict[str, float] = {}
    for name, fn in (("ping", r.ping), ("pipeline4", pipelined)):
        cpu0, t0 = _cpu(), time.perf_counter()
        for _ in range(n):
            fn()
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        out[f"redis_floor_{name}_wall_us"] = round(wall / n * 1e6, 1)
        out[f"redis_floor_{name}_client_cpu_us"] = round(cpu / n * 1e6, 1)
    r.delete(key, key + ":n")
    return out


def run(quick: bool = False) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    out |= serde_floors(0.3 if quick else 1.0)
    out |= kafka_floors(10_000 if quick else KAFKA_RECORDS)
    out |= redis_floors(2_000 if quick else 10_000)
    out["floors_note"] = (
        "one process, single thread for serde; Kafka and Redis against the stack of Settings() "
        "(the embedded one by default), CPU of this process only"
    )
    return out


# ------------------------------------------------------- every stage beside its floor --
# (stage, its figure, the floor's figure or None for a plain figure, how the ratio or figure
# is read, target). A figure is (suite, key, scale): scale turns it into the unit shared
# with the floor (µs of CPU per record, or a rate).
Fig = tuple[str, str, float]
_KAFKA_HOP: list[Fig] = [
    ("floors", "kafka_floor_consume_cpu_us_per_record", 1.0),
    ("floors", "kafka_floor_produce_cpu_us_per_record", 1.0),
]
STAGES: list[tuple[str, list[Fig], list[Fig] | None, str, float]] = [
    (
        "worker CPU per task ÷ one openai SDK call (aiohttp), 0 ms LLM",
        [("worker", "worker_0ms_worker_cpu_ms_per_task", 1000.0)],
        [("worker", "sdk_floor_openai_aiohttp_cpu_ms_per_call", 1000.0)],
        "<=",
        1.5,
    ),
    (
        "router CPU per routed task ÷ a bare Faust forwarder's per record",
        [("router", "router_cpu_per_task_in_forwarder_records", 1.0)],
        None,
        "<=",
        3.0,
    ),
    (
        "evaluator in the loop, CPU per task ÷ confluent-kafka consume + produce per record",
        [("end_to_end", "end_to_end_in_process_llm_cpu_ms_per_task_evaluator", 1000.0)],
        _KAFKA_HOP,
        "",  # reported beside its floor; the issue sets no ratio
        0.0,
    ),
    (
        "evaluator alone, CPU per event ÷ confluent-kafka consume + produce per record",
        [("evaluator", "evaluator_cpu_us_per_event", 1.0)],
        [
            ("evaluator", "evaluator_floor_kafka_consume_cpu_us_per_record", 1.0),
            ("evaluator", "evaluator_floor_kafka_produce_cpu_us_per_record", 1.0),
        ],
        "",  # the floor of the same run; the issue sets no ratio
        0.0,
    ),
    (
        "evaluator alone, CPU per event ÷ that + fastavro (decode Trajectory, encode Reward)",
        [("evaluator", "evaluator_cpu_us_per_event", 1.0)],
        [
            ("evaluator", "evaluator_floor_kafka_consume_cpu_us_per_record", 1.0),
            ("evaluator", "evaluator_floor_kafka_produce_cpu_us_per_record", 1.0),
            ("evaluator", "evaluator_floor_fastavro_decode_trajectory_us", 1.0),
            ("evaluator", "evaluator_floor_fastavro_encode_reward_us", 1.0),
        ],
        "",
        0.0,
    ),
    (
        "evaluator alone in batches of 20, CPU per event ÷ confluent-kafka consume + produce",
        [("evaluator", "evaluator_batch20_cpu_us_per_event", 1.0)],
        [
            ("evaluator", "evaluator_floor_kafka_consume_cpu_us_per_record", 1.0),
            ("evaluator", "evaluator_floor_kafka_produce_cpu_us_per_record", 1.0),
        ],
        "",
        0.0,
    ),
    (
        "sink ingest, CPU per event ÷ confluent-kafka consume per record",
        [("sink", "sink_ingest_cpu_us_per_event", 1.0)],
        [("sink", "sink_floor_kafka_consume_cpu_us_per_record", 1.0)],
        "",
        0.0,
    ),
    (
        "sink ingest, CPU per event ÷ that + fastavro's decode of the same event mix",
        [("sink", "sink_ingest_cpu_us_per_event", 1.0)],
        [
            ("sink", "sink_floor_kafka_consume_cpu_us_per_record", 1.0),
            ("sink", "sink_floor_fastavro_decode_us_per_event", 1.0),
        ],
        "",
        0.0,
    ),
    (
        "sink ingest, thousand events/s (Kafka -> chDB Parquet parts, one process)",
        [("sink", "sink_ingest_events_per_s", 0.001)],
        None,
        "",
        0.0,
    ),
    (
        "API CPU per task ÷ confluent-kafka produce per record",
        [("api", "api_cpu_ms_per_task", 1000.0)],
        [("floors", "kafka_floor_produce_cpu_us_per_record", 1.0)],
        "",
        0.0,
    ),
    (
        "broker CPU per task (ms), in-process provider",
        [("end_to_end", "end_to_end_in_process_llm_cpu_ms_per_task_kafka", 1.0)],
        None,
        "<=",
        1.0,
    ),
    (
        "loop CPU per task (ms, every process), in-process provider",
        [("end_to_end", "end_to_end_in_process_llm_cpu_ms_per_task_total", 1.0)],
        None,
        "<=",
        3.5,
    ),
    (
        "loop tasks/s, in-process provider",
        [("end_to_end", "end_to_end_in_process_llm_tasks_per_s", 1.0)],
        None,
        ">=",
        500.0,
    ),
    (
        "loop tasks/s through the OpenAI SDK",
        [("end_to_end", "end_to_end_tasks_per_s", 1.0)],
        None,
        ">=",
        300.0,
    ),
]


# Why a stage misses its target, as its profile shows (bench/results.md "Where the CPU goes").
# Keyed by the stage's label, or by its first word for the serde rows (one per event type).
GAPS: dict[str, str] = {
    "serde": "2026-12-05: encode writes the instances' own fields, decode builds the models from "
    "fastavro's record checking only their limits, both without fastavro's per-call schema "
    "parsing and logical-type hook (every type measured at 0.92x or more). Closest: Trajectory "
    "(encode 0.92-0.94x, decode 0.92-0.96x), whose example event holds 4 models (event, step, "
    "tool call, usage): on decode each costs ~0.45 µs to set up as model_validate leaves it "
    "(instance, __dict__, a fresh fields set, extra, private), on encode a dict copy",
    "worker CPU per task ÷ one openai SDK call (aiohttp), 0 ms LLM": "2026-12-04 profile of the "
    "e2e run: per task Stormline's own worker code 0.75-0.79 ms, redis-py 0.38 ms (its "
    "command packing), the SDK 0.33-0.44 ms plus aiohttp 0.2 ms, ~2 ms in all; the worker "
    "suite's own 4.2 ms (one worker process) was not profiled, so its extra 2 ms is unexplained",
    "router CPU per routed task ÷ a bare Faust forwarder's per record": "the router's profile "
    "(5.8 ms per task): aiokafka 1.8 ms, mode (Faust's service runtime) 1.5 ms, faust 0.8 ms, "
    "Stormline's routing 0.8-0.9 ms, redis 0.3-0.4 ms: the Faust hops (repartition, "
    "assignment, changelogs) cost ~4 ms; the router issue (14) redesigns them",
    "broker CPU per task (ms), in-process provider": "1.2 ms; py-spy samples Python only, so "
    "the Java broker's split is not measured: not explained yet",
    "loop CPU per task (ms, every process), in-process provider": "router 5.8 ms of the 8.3 ms "
    "(profile above), then the broker 1.2 ms and the workers 1.0 ms each",
    "loop tasks/s, in-process provider": "CPU-bound at 8.3 ms per task on 2 cores, 5.8 ms of "
    "it in the Faust router",
    "loop tasks/s through the OpenAI SDK": "CPU-bound: the router's 5.8 ms plus workers at "
    "~2 ms each (SDK, aiohttp, redis-py) and the broker",
}


def gap_for(label: str) -> str:
    return GAPS.get(label) or GAPS.get(label.split()[0]) or "not met; no explanation recorded"


def _value(suites: dict[str, Any], figs: list[Fig]) -> float | None:
    total = 0.0
    for suite, key, scale in figs:
        v = suites.get(suite, {}).get(key)
        v = v.get("median") if isinstance(v, dict) else v
        if not isinstance(v, int | float):
            return None
        total += v * scale
    return total


def stage_rows(suites: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(stage, figure, floor, ratio or figure against target, met) for every stage measured."""
    rows = []
    for kind in sorted({k[6:-12] for k in suites.get("floors", {}) if k.endswith("_vs_fastavro")}):
        name, op = kind.rsplit("_", 1)
        stage = _value(suites, [("floors", f"serde_{kind}_per_s", 1.0)])
        floor = _value(suites, [("floors", f"fastavro_{kind}_per_s", 1.0)])
        if stage and floor:
            ratio = stage / floor
            rows.append(
                (
                    f"serde {op} {name} ÷ bare fastavro (records/s)",
                    f"{stage:,.0f}/s",
                    f"{floor:,.0f}/s",
                    f"{ratio:.2f}x (target >= 0.9)",
                    "yes" if ratio >= 0.9 else "no",
                )
            )
    for label, figs, floor_figs, op, target in STAGES:
        stage = _value(suites, figs)
        floor = _value(suites, floor_figs) if floor_figs else None
        if stage is None or (floor_figs and not floor):
            rows.append((label, "not run", "-", f"target {op} {target:g}" if op else "-", "-"))
            continue
        got = stage / floor if floor else stage
        met = got <= target if op == "<=" else got >= target
        aim = f" (target {op} {target:g})" if op else ""
        rows.append(
            (
                label,
                f"{stage:,.4g}",
                f"{floor:,.4g}" if floor else "-",
                f"{got:,.3g}{'x' if floor else ''}{aim}",
                ("yes" if met else "no") if op else "-",
            )
        )
    return rows
