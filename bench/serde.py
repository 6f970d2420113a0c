"""Serde benchmark: events/s encoded and decoded on one core, against json as the baseline.

Targets (issue 3): >=150k/s encode and decode for TaskSubmitted, >=30k/s for a ~2 KB,
five-step Trajectory. Measured with the fingerprint registry so no network is involved;
the registry only matters for the first encode of each (topic, type).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from stormline.schemas import models as m
from stormline.schemas.serde import FingerprintRegistry, Serde


def task() -> m.TaskSubmitted:
    return m.TaskSubmitted(
        task_id="task-000123",
        tenant="acme",
        task_type="math",
        prompt="What is 17 + 25? Answer with the number only.",
        priority=6,
        required_capabilities=["math"],
        expected="42",
        metadata={"source": "bench"},
    )


def trajectory() -> m.Trajectory:
    steps = [
        m.Step(role=role, content=text, prompt_tokens=40, completion_tokens=60, latency_ms=120.0)
        for role, text in [
            ("system", "You are a careful solver. " * 10),
            ("user", "Solve the following problem step by step. " * 10),
            ("assistant", "Let us reason about it carefully. " * 14),
            ("tool", '{"result": 42, "steps": ["17+25", "=42"]} ' * 6),
            ("assistant", "The answer is 42. " * 12),
        ]
    ]
    return m.Trajectory(
        task_id="task-000123",
        trajectory_id="traj-000123-1",
        attempt=1,
        agent_id="agent-a",
        task_type="math",
        provider="openai",
        model="sim-a",
        steps=steps,
        output="42",
        status=m.TrajectoryStatus.OK,
        usage=m.Usage(prompt_tokens=200, completion_tokens=300, cost_usd=0.0012),
        latency_ms=600.0,
        expected="42",
    )


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(200):
            fn()
        n += 200
    return n / elapsed


def run(quick: bool = False) -> dict[str, float | str]:
    seconds = 0.5 if quick else 2.0
    serde = Serde(FingerprintRegistry())
    out: dict[str, float | str] = {}
    for name, ev in (("task_submitted", task()), ("trajectory", trajectory())):
        kind = type(ev)
        data = serde.encode("bench", ev)
        as_json = ev.model_dump_json()
        plain = ev.model_dump(mode="json")
        out[f"serde_{name}_bytes"] = len(data)
        out[f"serde_{name}_encode_per_s"] = _rate(partial(serde.encode, "bench", ev), seconds)
        out[f"serde_{name}_decode_per_s"] = _rate(partial(serde.decode, data, kind), seconds)
        out[f"serde_{name}_decode_unvalidated_per_s"] = _rate(
            partial(serde.decode_record, data, kind), seconds
        )
        out[f"json_{name}_encode_per_s"] = _rate(ev.model_dump_json, seconds)
        out[f"json_{name}_decode_per_s"] = _rate(
            partial(kind.model_validate_json, as_json), seconds
        )
        out[f"json_{name}_plain_dumps_per_s"] = _rate(partial(json.dumps, plain), seconds)
    out["serde_note"] = (
        "one core, single thread; encode = 5-byte header + the instance's fields + fastavro's "
        "compiled write; decode = fastavro's compiled read + the models built from the record, "
        "their limits checked (no pydantic validation); decode_unvalidated = decode_record, "
        "the dict through fastavro's public reader"
    )
    return out
