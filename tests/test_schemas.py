"""Models and Avro schemas agree, round-trip, validate, and evolve compatibly (pure tests)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from stormline.schemas import models as m
from stormline.schemas.compat import check, resolution_problem
from stormline.schemas.serde import (
    AVRO_DIR,
    DecodeError,
    FingerprintRegistry,
    Serde,
    fingerprint_id,
    schema_file,
    schema_str,
)

NOW = datetime(2026, 11, 21, 12, 0, 0, 123000, tzinfo=UTC)


def full_examples() -> list[m.Event]:
    """One instance of every event with every optional field set."""
    task = m.TaskSubmitted(
        task_id="t-1",
        tenant="acme",
        task_type="math",
        prompt="17+25?",
        priority=7,
        required_capabilities=["math"],
        expected="42",
        evaluator="numeric",
        deadline_ms=60_000,
        metadata={"source": "test"},
        occurred_at=NOW,
    )
    step = m.Step(
        role="assistant",
        content="42",
        prompt_tokens=10,
        completion_tokens=2,
        latency_ms=12.5,
        token_ids=[1, 2],
        logprobs=[-0.1, -0.2],
        tool_calls=[m.ToolCall(id="c1", name="calc", arguments='{"a":17}')],
    )
    return [
        task,
        m.TaskAssigned(
            task_id="t-1",
            attempt=2,
            agent_id="a1",
            policy=m.PolicyKind.CHECKPOINT,
            strategy="thompson",
            policy_version="neural@3",
            score=0.8,
            epsilon=0.1,
            assigned_at=NOW,
            expires_at=NOW + timedelta(seconds=30),
            task=m.AssignedTask.of(task),
        ),
        m.Trajectory(
            task_id="t-1",
            trajectory_id="tr-1",
            attempt=2,
            agent_id="a1",
            task_type="math",
            provider="openai",
            model="gpt",
            policy_version="neural@3",
            steps=[step],
            output="42",
            status=m.TrajectoryStatus.OK,
            error="none",
            usage=m.Usage(prompt_tokens=10, completion_tokens=2, cost_usd=0.001),
            latency_ms=13.0,
            expected="42",
            evaluator="numeric",
            final=True,
        ),
        m.Reward(
            task_id="t-1",
            trajectory_id="tr-1",
            attempt=2,
            agent_id="a1",
            task_type="math",
            policy_version="neural@3",
            value=1.0,
            components={"exact": 1.0},
            source=m.RewardSource.VERIFIER,
            reason="match",
        ),
        m.AgentHeartbeat(
            worker_id="w1",
            agent_ids=["a1"],
            capabilities={"a1": ["math"]},
            in_flight=3,
            processed=10,
            errors=1,
            status=m.WorkerStatus.DEGRADED,
            detail="redis down",
        ),
        m.AgentHealthChanged(
            agent_id="a1",
            status=m.HealthStatus.DOWN,
            previous=m.HealthStatus.HEALTHY,
            reason="no heartbeat",
        ),
        m.CheckpointPublished(
            policy="neural",
            version=3,
            uri="file:///ckpt/3",
            sha256="a" * 64,
            metrics={"loss": 0.1},
            trained_on=[m.OffsetRange(topic="rewards", partition=0, start_offset=0, end_offset=10)],
            promoted=False,
            decision="worse by 0.2",
        ),
        m.DeadLetter(
            source_topic="tasks",
            partition=1,
            offset=5,
            raw_key=b"k",
            raw_value=b"\x00\x01",
            error_kind="framing",
            error="bad",
            consumer_group="g",
        ),
    ]


def minimal_examples() -> list[m.Event]:
    return [
        m.TaskSubmitted(task_id="t", task_type="x", prompt="p"),
        m.Reward(
            task_id="t", trajectory_id="r", agent_id="a", value=0.0, source=m.RewardSource.UNKNOWN
        ),
        m.Trajectory(
            task_id="t", trajectory_id="r", attempt=1, agent_id="a", status=m.TrajectoryStatus.ERROR
        ),
    ]


def _avro_fields(schema: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f for f in schema["fields"]}


def _record_named(schema: Any, name: str) -> dict[str, Any] | None:
    """Find a nested record definition by name anywhere in a schema."""
    if isinstance(schema, dict):
        if schema.get("type") == "record" and schema.get("name") == name:
            return schema
        for v in schema.values():
            found = _record_named(v, name)
            if found:
                return found
    if isinstance(schema, list):
        for v in schema:
            found = _record_named(v, name)
            if found:
                return found
    return None


@pytest.mark.parametrize("event_type", m.EVENT_TYPES, ids=lambda t: t.__name__)
def test_model_and_schema_list_the_same_fields(event_type: type[m.Event]) -> None:
    schema = json.loads(schema_str(event_type))
    assert f"{schema['namespace']}.{schema['name']}" == event_type.AVRO_NAME
    avro = _avro_fields(schema)
    assert set(avro) == set(event_type.model_fields)
    for name, field in event_type.model_fields.items():
        avro_type = avro[name]["type"]
        optional_in_avro = isinstance(avro_type, list) and "null" in avro_type
        optional_in_model = type(None) in getattr(field.annotation, "__args__", ())
        assert optional_in_avro == optional_in_model, name
        # A field with a default in the model has one in Avro, so old data stays readable.
        if not field.is_required() and name not in ("event_id", "occurred_at"):
            assert "default" in avro[name], f"{event_type.__name__}.{name} needs an Avro default"


@pytest.mark.parametrize(
    ("model", "record"),
    [
        (m.Step, "Step"),
        (m.ToolCall, "ToolCall"),
        (m.Usage, "Usage"),
        (m.OffsetRange, "OffsetRange"),
        (m.AssignedTask, "AssignedTask"),
    ],
)
def test_nested_records_match_their_models(model: type[BaseModel], record: str) -> None:
    found = None
    for path in AVRO_DIR.glob("*.avsc"):
        found = found or _record_named(json.loads(path.read_text()), record)
    assert found is not None
    assert {f["name"] for f in found["fields"]} == set(model.model_fields)


def test_assigned_task_carries_every_task_field() -> None:
    payload = set(m.TaskSubmitted.model_fields) - {"event_id", "schema_version"}
    assert set(m.AssignedTask.model_fields) == payload


@pytest.mark.parametrize(
    "event", full_examples() + minimal_examples(), ids=lambda e: type(e).__name__
)
def test_every_model_round_trips_through_its_schema(event: m.Event) -> None:
    serde = Serde(FingerprintRegistry())
    data = serde.encode("topic", event)
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == fingerprint_id(schema_str(type(event)))
    assert serde.decode(data, type(event)) == event


def test_enum_defaults_exist_for_evolution() -> None:
    for path in AVRO_DIR.glob("*.avsc"):
        text = json.loads(path.read_text())
        for enum in _all_of_type(text, "enum"):
            assert enum.get("default") in enum["symbols"], f"{path.name}: {enum['name']}"


def _all_of_type(schema: Any, kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(schema, dict):
        if schema.get("type") == kind:
            out.append(schema)
        for v in schema.values():
            out += _all_of_type(v, kind)
    elif isinstance(schema, list):
        for v in schema:
            out += _all_of_type(v, kind)
    return out


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": ""},
        {"prompt": "x" * (m.MAX_PROMPT_CHARS + 1)},
        {"priority": 10},
        {"priority": -1},
        {"task_id": ""},
        {"task_type": ""},
        {"deadline_ms": 0},
    ],
)
def test_task_validation_limits(bad: dict[str, Any]) -> None:
    fields = {"task_id": "t", "task_type": "x", "prompt": "p", **bad}
    with pytest.raises(ValidationError):
        m.TaskSubmitted(**fields)


def test_reward_must_be_finite() -> None:
    with pytest.raises(ValidationError):
        m.Reward(
            task_id="t",
            trajectory_id="r",
            agent_id="a",
            value=float("nan"),
            source=m.RewardSource.HUMAN,
        )


def test_decode_errors_name_their_kind() -> None:
    serde = Serde(FingerprintRegistry())
    good = serde.encode("t", m.TaskSubmitted(task_id="t", task_type="x", prompt="p"))
    cases = {
        "framing": b"\x07garbage",
        "unknown-schema": b"\x00\xff\xff\xff\xff" + good[5:],
        "avro": good[:8],
    }
    for kind, data in cases.items():
        with pytest.raises(DecodeError) as info:
            serde.decode(data, m.TaskSubmitted)
        assert info.value.kind == kind


def test_mock_registry_serde_for_unit_use() -> None:
    from stormline.schemas.serde import ConfluentRegistry

    serde = Serde(ConfluentRegistry("mock://unit"))
    ev = m.TaskSubmitted(task_id="t", task_type="x", prompt="p")
    assert serde.decode(serde.encode("tasks", ev), m.TaskSubmitted) == ev


# ---------------------------------------------------------------- compatibility --
def test_current_schemas_are_backward_compatible_with_the_last_release() -> None:
    results = check()
    assert results and all(r.compatible for r in results), [r for r in results if not r.compatible]


def _reward_schema() -> dict[str, Any]:
    return json.loads(schema_str(m.Reward))


def test_a_new_required_field_is_caught() -> None:
    new = _reward_schema()
    new["fields"].append({"name": "judge_id", "type": "string"})
    assert resolution_problem(schema_str(m.Reward), json.dumps(new))


def test_a_changed_field_type_is_caught() -> None:
    new = _reward_schema()
    for f in new["fields"]:
        if f["name"] == "value":
            f["type"] = "string"
    assert resolution_problem(schema_str(m.Reward), json.dumps(new))


def test_an_optional_field_with_default_is_compatible() -> None:
    new = _reward_schema()
    new["fields"].append({"name": "judge_id", "type": ["null", "string"], "default": None})
    assert resolution_problem(schema_str(m.Reward), json.dumps(new)) == ""


def test_check_catches_an_incompatible_current_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for path in AVRO_DIR.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    broken = _reward_schema()
    broken["fields"] = [f for f in broken["fields"] if f["name"] != "source"]
    broken["fields"].append({"name": "grader", "type": "long"})
    (tmp_path / schema_file(m.Reward)).write_text(json.dumps(broken))
    results = {r.event: r for r in check(current_dir=tmp_path)}
    assert not results["Reward"].compatible
    assert results["TaskSubmitted"].compatible


def test_event_defaults_are_fresh() -> None:
    a, b = (m.TaskSubmitted(task_id="t", task_type="x", prompt="p") for _ in range(2))
    assert a.event_id != b.event_id and isinstance(a.event_id, uuid.UUID)
    assert a.occurred_at.tzinfo is not None
