"""The serde's fast decode at the edges: every limit of every model, schema evolution, and
uuid and timestamp values read plain (pure tests, no registry).

Each limit is tried right at its bound and just past it, in a record fastavro writes alone (no
pydantic on the way), and the fast path must say what ``model_validate`` says.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import annotated_types as at
import fastavro
import pytest
from pydantic import BaseModel, ValidationError

from stormline.schemas import convert
from stormline.schemas import models as m
from stormline.schemas import serde as serde_module
from stormline.schemas.serde import DecodeError, FingerprintRegistry, Serde, schema_str
from tests.test_schemas import NOW, full_examples
from tests.test_serde_fast import assert_same_model, fast_decode, raw_bytes


@pytest.fixture
def serde() -> Serde:
    return Serde(FingerprintRegistry())


# -------------------------------------------------------------------------- limits --
def _values(meta: tuple[Any, ...], sample: Any) -> Iterator[tuple[str, Any, bool]]:
    """(label, value, valid) at and just past every bound in ``meta``."""
    step = 1 if isinstance(sample, int) and not isinstance(sample, bool) else 0.5
    for c in meta:
        if isinstance(c, at.MinLen) and c.min_length:
            yield f"min_length {c.min_length}", _sized(sample, c.min_length), True
            yield f"min_length {c.min_length} - 1", _sized(sample, c.min_length - 1), False
        elif isinstance(c, at.MaxLen):
            yield f"max_length {c.max_length}", _sized(sample, c.max_length), True
            yield f"max_length {c.max_length} + 1", _sized(sample, c.max_length + 1), False
        elif isinstance(c, at.Ge):
            yield f"ge {c.ge}", c.ge, True
            yield f"ge {c.ge} - {step}", c.ge - step, False
        elif isinstance(c, at.Le):
            yield f"le {c.le}", c.le, True
            yield f"le {c.le} + {step}", c.le + step, False
        elif isinstance(c, at.Gt):
            yield f"gt {c.gt} + {step}", c.gt + step, True
            yield f"gt {c.gt}", c.gt, False
        elif getattr(c, "pattern", None):
            yield "pattern, a trailing newline", sample + "\n", False
            yield "pattern, upper case", sample.upper(), False
        if isinstance(c, at.Ge | at.Le) and isinstance(sample, float):
            yield "NaN", math.nan, False


def _sized(sample: Any, n: int) -> Any:
    if isinstance(sample, str):
        return "x" * n
    assert isinstance(sample, list) and sample, "a sized list needs an item to repeat"
    return [sample[0]] * n


def _limits(model: type[BaseModel], record: dict[str, Any], path: str) -> Iterator[Any]:
    """(path, setter, value, valid) for every limit of ``model`` and the models inside it."""
    for name, info in model.model_fields.items():
        shape = convert.shape_of(info.annotation, info.metadata)
        here = f"{path}.{name}"
        sample = record[name]
        if sample is None:
            continue  # the full examples set every optional field

        def put(value: Any, rec: dict[str, Any] = record, key: str = name) -> None:
            rec[key] = value

        for label, value, valid in _values(shape.meta, sample):
            yield f"{here} {label}", put, value, valid
        item = shape.item
        if item is not None and item.meta and shape.kind == "list" and sample:

            def put_item(value: Any, rec: dict[str, Any] = record, key: str = name) -> None:
                rec[key] = [value, *rec[key][1:]]

            for label, value, valid in _values(item.meta, sample[0]):
                yield f"{here}[0] {label}", put_item, value, valid
        nested = item if item is not None else shape
        if nested.kind == "model":
            inner = sample[0] if isinstance(sample, list) else sample
            if inner is not None:
                yield from _limits(nested.tp, inner, f"{here}[0]" if item else here)


def _limit_cases() -> list[Any]:
    cases = []
    for event in full_examples():
        kind = type(event)
        count = len(list(_limits(kind, event.model_dump(), kind.__name__)))
        cases += [pytest.param(event, i, id=f"{kind.__name__}-{i}") for i in range(count)]
    return cases


@pytest.mark.parametrize(("event", "index"), _limit_cases())
def test_every_limit_rejects_what_validation_rejects(
    serde: Serde, event: m.Event, index: int
) -> None:
    kind = type(event)
    record = event.model_dump()
    label, put, value, valid = list(_limits(kind, record, kind.__name__))[index]
    put(value)
    data = raw_bytes(serde, kind, record)
    try:
        validated = kind.model_validate(serde.decode_record(data, kind))
    except ValidationError:
        validated = None
    assert (validated is not None) == valid, f"the test's own idea of {label} is wrong"
    if valid:
        assert_same_model(serde.decode(data, kind), validated, label)
        assert_same_model(fast_decode(data, kind), validated, label)
    else:
        with pytest.raises(DecodeError) as info:
            serde.decode(data, kind)
        assert info.value.kind == "validation", label
        with pytest.raises(ValueError):  # the fast path itself says no, not only pydantic
            fast_decode(data, kind)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_reward_that_is_not_finite_is_rejected(serde: Serde, value: float) -> None:
    record = full_examples()[3].model_dump()
    record["value"] = value
    with pytest.raises(DecodeError) as info:
        serde.decode(raw_bytes(serde, m.Reward, record), m.Reward)
    assert info.value.kind == "validation" and "finite" in info.value.message


def test_the_limit_cases_cover_every_constrained_field() -> None:
    """So that a limit added to a model is tested here without anyone listing it."""
    seen = {
        label.split(" ")[0]
        for e in full_examples()
        for label, *_ in _limits(type(e), e.model_dump(), type(e).__name__)
    }
    for want in (
        "TaskSubmitted.priority",
        "TaskSubmitted.required_capabilities[0]",
        "TaskAssigned.task.prompt",
        "TaskAssigned.epsilon",
        "Trajectory.steps[0].latency_ms",
        "Trajectory.usage.cost_usd",
        "CheckpointPublished.sha256",
        "CheckpointPublished.trained_on[0].end_offset",
        "AgentHeartbeat.agent_ids[0]",
    ):
        assert want in seen, want


# ------------------------------------------------------------------------ evolution --
def _older_task_schema() -> dict[str, Any]:
    """TaskSubmitted as an older producer might have had it: fields in another order, and no
    metadata, deadline or evaluator yet."""
    schema = json.loads(schema_str(m.TaskSubmitted))
    dropped = {"metadata", "deadline_ms", "evaluator"}
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in dropped][::-1]
    return schema


def test_a_record_in_an_older_schema_decodes_as_validation_would() -> None:
    writer = _older_task_schema()
    registry = FingerprintRegistry()
    sid = registry.id_for("t-value", json.dumps(writer))
    serde = Serde(registry)
    record = {
        "event_id": uuid.UUID(int=1),
        "occurred_at": NOW,
        "schema_version": 1,
        "task_id": "t-old",
        "tenant": "acme",
        "task_type": "math",
        "prompt": "2+2?",
        "priority": 3,
        "required_capabilities": ["math"],
        "expected": "4",
    }
    buf = io.BytesIO()
    buf.write(b"\x00" + sid.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), record)
    data = buf.getvalue()
    got = serde.decode(data, m.TaskSubmitted)
    assert_same_model(
        got, m.TaskSubmitted.model_validate(serde.decode_record(data, m.TaskSubmitted))
    )
    assert got.metadata == {} and got.deadline_ms is None and got.evaluator is None
    assert got.task_id == "t-old" and got.occurred_at == NOW
    bad = dict(record, priority=11)  # validation still runs on this path
    buf = io.BytesIO()
    buf.write(b"\x00" + sid.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), bad)
    with pytest.raises(DecodeError) as info:
        serde.decode(buf.getvalue(), m.TaskSubmitted)
    assert info.value.kind == "validation"


def test_an_enum_symbol_the_reader_lacks_reads_as_unknown() -> None:
    writer = json.loads(schema_str(m.AgentHealthChanged))
    status = writer["fields"][[f["name"] for f in writer["fields"]].index("status")]
    status["type"]["symbols"] = [*status["type"]["symbols"], "quarantined"]
    registry = FingerprintRegistry()
    sid = registry.id_for("h-value", json.dumps(writer))
    record = full_examples()[5].model_dump() | {"status": "quarantined"}
    buf = io.BytesIO()
    buf.write(b"\x00" + sid.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), record)
    got = Serde(registry).decode(buf.getvalue(), m.AgentHealthChanged)
    assert got.status is m.HealthStatus.UNKNOWN and got.previous is m.HealthStatus.HEALTHY


def test_promoted_types_decode_as_validation_would() -> None:
    """A writer with float where the reader has double: fastavro promotes, pydantic validates."""
    writer = json.loads(schema_str(m.Reward))
    for f in writer["fields"]:
        if f["name"] == "value":
            f["type"] = "float"
        if f["name"] == "components":
            f["type"] = {"type": "map", "values": "float"}
    registry = FingerprintRegistry()
    sid = registry.id_for("r-value", json.dumps(writer))
    serde = Serde(registry)
    record = full_examples()[3].model_dump() | {"value": 0.25, "components": {"a": 0.5}}
    buf = io.BytesIO()
    buf.write(b"\x00" + sid.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), record)
    data = buf.getvalue()
    got = serde.decode(data, m.Reward)
    assert_same_model(got, m.Reward.model_validate(serde.decode_record(data, m.Reward)))
    assert got.value == 0.25 and got.components == {"a": 0.5}


@pytest.mark.parametrize("event", full_examples(), ids=lambda e: type(e).__name__)
def test_records_in_the_released_schemas_decode(event: m.Event) -> None:
    """Every released schema, as a writer: what a producer of that release sent."""
    registry = FingerprintRegistry()
    serde = Serde(registry)
    for path in sorted(
        serde_module.RELEASED_DIR.glob(f"*/{serde_module.schema_file(type(event))}")
    ):
        writer = json.loads(path.read_text())
        names = {f["name"] for f in writer["fields"]}
        record = {k: v for k, v in event.model_dump().items() if k in names}
        buf = io.BytesIO()
        buf.write(b"\x00" + registry.id_for("r-value", path.read_text()).to_bytes(4, "big"))
        fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), record)
        data = buf.getvalue()
        want = type(event).model_validate(serde.decode_record(data, type(event)))
        assert_same_model(serde.decode(data, type(event)), want, str(path))


# -------------------------------------------------------------- logical types, plain --
@pytest.mark.parametrize(
    "millis",
    [0, 1, -1, 999, -999, 1_798_000_000_123, -62_135_596_800_000, 253_402_300_799_999],
)
def test_timestamps_read_plain_make_fastavros_datetimes(serde: Serde, millis: int) -> None:
    record = full_examples()[5].model_dump() | {"occurred_at": millis}
    data = raw_bytes(serde, m.AgentHealthChanged, record)  # fastavro writes a long as it is
    want = serde.decode_record(data, m.AgentHealthChanged)["occurred_at"]  # fastavro's datetime
    got = serde.decode(data, m.AgentHealthChanged).occurred_at
    assert_same_model(got, want, str(millis))
    assert_same_model(fast_decode(data, m.AgentHealthChanged).occurred_at, want, str(millis))


def test_a_timestamp_datetime_cannot_hold_fails_as_it_did(serde: Serde) -> None:
    record = full_examples()[5].model_dump() | {"occurred_at": 1 << 62}
    with pytest.raises(DecodeError) as info:
        serde.decode(raw_bytes(serde, m.AgentHealthChanged, record), m.AgentHealthChanged)
    assert info.value.kind == "avro"


@pytest.mark.parametrize(
    "text",
    [
        "12345678-9abc-def0-1234-56789abcdef0",
        "12345678-9ABC-DEF0-1234-56789ABCDEF0",
        "123456789abcdef0123456789abcdef0",
        "{12345678-9abc-def0-1234-56789abcdef0}",
        "urn:uuid:12345678-9abc-def0-1234-56789abcdef0",
        "1-2-3-4-5-6-7-8-9-a-b-c-d-e-f-0-1-2-3-4-5-6-7-8-9-a-b-c-d-e-f-0",
        "+2345678-9abc-def0-1234-56789abcdef0",
        " 2345678-9abc-def0-1234-56789abcdef0",
        "12345678_9abc_def0_1234_56789abcdef0"[:32],
        "12345678-9abc-def0-1234-56789abcdef",
        "12345678-9abc-def0-1234-56789abcdefg",
        "",
        "not a uuid",
    ],
)
def test_uuids_read_plain_decode_as_fastavro_reads_them(serde: Serde, text: str) -> None:
    """Whatever string a foreign producer put there: the same UUID as fastavro's uuid.UUID(s),
    or the same error kind as before."""
    record = full_examples()[5].model_dump()
    plain = json.loads(schema_str(m.AgentHealthChanged))
    plain["fields"][0]["type"] = "string"  # writes any string; same fingerprint, same id
    buf = io.BytesIO()
    buf.write(b"\x00" + serde.register("t", m.AgentHealthChanged).to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(plain), record | {"event_id": text})
    data = buf.getvalue()
    try:
        want: Any = serde.decode_record(data, m.AgentHealthChanged)["event_id"]
    except DecodeError as exc:
        want = exc.kind
    try:
        got: Any = serde.decode(data, m.AgentHealthChanged).event_id
    except DecodeError as exc:
        got = exc.kind
    assert_same_model(got, want, text)
    if isinstance(want, uuid.UUID):
        assert got.is_safe == want.is_safe and str(got) == str(want)
