"""The serde's hot path gives what pydantic and fastavro gave (pure tests, no registry).

Decode builds models from fastavro's records without validating them again
(schemas/construct.py); encode writes the instances' own field values (schemas/convert.py);
both read and write uuid and timestamp fields as plain string and long. These tests hold them
to the old path: every event type decodes to what ``model_validate`` makes of the same record
(values, types, field order, fields set) and encodes to the bytes ``model_dump`` and fastavro
gave. tests/test_serde_edges.py holds the limits, schema evolution and odd values.
"""

from __future__ import annotations

import io
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest
from pydantic import BaseModel, ValidationInfo, field_serializer, field_validator

from stormline.schemas import construct, convert, datum
from stormline.schemas import models as m
from stormline.schemas import serde as serde_module
from stormline.schemas.serde import (
    FingerprintRegistry,
    Serde,
    lean_schema,
    parsed_schema,
)
from tests.test_schemas import NOW, full_examples, minimal_examples


def defaults_examples() -> list[m.Event]:
    """Every event type with only its required fields: every default in play."""
    task = m.TaskSubmitted(task_id="t", task_type="x", prompt="p")
    return [
        task,
        m.TaskAssigned(
            task_id="t",
            attempt=1,
            agent_id="a",
            policy=m.PolicyKind.QTABLE,
            assigned_at=NOW,
            expires_at=NOW + timedelta(seconds=1),
            task=m.AssignedTask.of(task),
        ),
        m.Trajectory(
            task_id="t", trajectory_id="r", attempt=1, agent_id="a", status=m.TrajectoryStatus.OK
        ),
        m.Reward(
            task_id="t", trajectory_id="r", agent_id="a", value=0.5, source=m.RewardSource.JUDGE
        ),
        m.AgentHeartbeat(worker_id="w", status=m.WorkerStatus.RUNNING),
        m.AgentHealthChanged(agent_id="a", status=m.HealthStatus.HEALTHY),
        m.CheckpointPublished(policy="p", version=1, uri="u", sha256="0" * 64),
        m.DeadLetter(source_topic="s", partition=0, offset=0, error_kind="k", error="e"),
    ]


def rich_trajectory() -> m.Trajectory:
    """Several steps, some with tool calls and some without, token ids and none."""
    steps = [
        m.Step(role="system", content="be brief"),
        m.Step(
            role="assistant",
            content="calling",
            tool_calls=[
                m.ToolCall(id="c1", name="calc", arguments="{}"),
                m.ToolCall(id="c2", name="web", arguments='{"q": "x"}'),
            ],
            token_ids=[],
            logprobs=[],
        ),
        m.Step(role="tool", content="42", prompt_tokens=3, token_ids=[5], logprobs=[-1.5]),
    ]
    return m.Trajectory(
        task_id="t",
        trajectory_id="r",
        attempt=3,
        agent_id="a",
        steps=steps,
        status=m.TrajectoryStatus.TIMEOUT,
        usage=m.Usage(prompt_tokens=1),
    )


EXAMPLES = full_examples() + minimal_examples() + defaults_examples() + [rich_trajectory()]
IDS = [f"{type(e).__name__}-{i}" for i, e in enumerate(EXAMPLES)]


@pytest.fixture
def serde() -> Serde:
    return Serde(FingerprintRegistry())


def _old_encode(serde: Serde, topic: str, event: m.Event) -> bytes:
    """Serde.encode before issue 16: the header, then fastavro over model_dump()."""
    buf = io.BytesIO()
    buf.write(b"\x00" + serde.register(topic, type(event)).to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, parsed_schema(type(event)), event.model_dump())
    return buf.getvalue()


def assert_same_model(got: Any, want: Any, where: str = "") -> None:
    """Equal, and of the same type, all the way down; models with the same __dict__ order and
    the same fields set."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, BaseModel):
        assert list(got.__dict__) == list(want.__dict__), where
        assert got.model_fields_set == want.model_fields_set, where
        assert got.__pydantic_extra__ == want.__pydantic_extra__, where
        assert got.__pydantic_private__ == want.__pydantic_private__, where
        for name, value in want.__dict__.items():
            assert_same_model(got.__dict__[name], value, f"{where}.{name}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_model(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k, w in want.items():
            assert_same_model(got[k], w, f"{where}[{k!r}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, where
        if isinstance(want, datetime):
            assert got.utcoffset() == want.utcoffset(), where


def fast_builder(event_type: type[m.Event]) -> Callable[[dict[str, Any]], Any]:
    build = construct.builder(event_type, parsed_schema(event_type), m.AVRO_SHAPED_VALIDATORS)
    assert build is not None, f"{event_type.__name__} has no fast decode"
    return build


def fast_decode(data: bytes, event_type: type[m.Event]) -> Any:
    """The fast path alone: the lean read, then the builder (raises where it says no)."""
    record = fastavro.schemaless_reader(io.BytesIO(data[5:]), lean_schema(event_type), None)
    return fast_builder(event_type)(record)


# ------------------------------------------------------------------------ equality --
@pytest.mark.parametrize("event", EXAMPLES, ids=IDS)
def test_fast_decode_is_what_validation_gives(serde: Serde, event: m.Event) -> None:
    data = serde.encode("t", event)
    kind = type(event)
    validated = kind.model_validate(serde.decode_record(data, kind))
    built = fast_decode(data, kind)  # raises if it rejects
    decoded = serde.decode(data, kind)
    assert_same_model(built, validated, kind.__name__)
    assert_same_model(decoded, validated, kind.__name__)
    assert decoded == event
    assert decoded.model_dump_json() == validated.model_dump_json() == event.model_dump_json()


@pytest.mark.parametrize("event", EXAMPLES, ids=IDS)
def test_encode_writes_the_bytes_model_dump_wrote(serde: Serde, event: m.Event) -> None:
    assert serde.encode("t", event) == _old_encode(serde, "t", event)


@pytest.mark.parametrize("event", EXAMPLES, ids=IDS)
def test_fastavros_public_functions_give_the_same(
    serde: Serde, event: m.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled per-datum functions (the fast path) and the public schemaless ones agree."""
    assert datum.COMPILED is not None, "fastavro's compiled functions were not taken"
    data = serde.encode("t", event)
    back = serde.decode(data, type(event))
    kind = type(event)
    monkeypatch.setattr(datum, "read_datum", datum.public_read)
    monkeypatch.setattr(datum, "write_datum", datum.public_write)
    serde_module._read_plan.cache_clear()  # it holds the reader it chose
    try:
        plan = serde_module._read_plan(kind)
        assert plan is not None and plan[0] is datum.public_read
        public = Serde(FingerprintRegistry())
        assert public.encode("t", event) == data
        assert_same_model(public.decode(data, kind), back, kind.__name__)
    finally:
        serde_module._read_plan.cache_clear()


def test_every_event_type_has_both_fast_paths() -> None:
    for kind in m.EVENT_TYPES:
        fast_builder(kind)
        assert convert.dumper(kind, parsed_schema(kind)) is not None, kind.__name__


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_values_only_fastavro_takes_are_written_as_before(serde: Serde) -> None:
    """A naive datetime (fastavro takes it as local time), a str for a UUID, an int for a
    datetime: fields nothing validates after construction, written as model_dump() was."""
    assert time.localtime(0).tm_hour != 0
    naive = full_examples()[5]
    naive.occurred_at = datetime(2026, 1, 2, 3, 4, 5, 678_901)
    as_text = full_examples()[1]
    as_text.event_id = "0f0e0d0c-0b0a-0908-0706-050403020100"  # type: ignore[assignment]
    as_int = full_examples()[7]
    as_int.occurred_at = 1_798_000_000_123  # type: ignore[assignment]
    nested = full_examples()[1]
    assert isinstance(nested, m.TaskAssigned)
    nested.task.occurred_at = datetime(2026, 1, 2)
    for event in (naive, as_text, as_int, nested):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic's serializer warns of the odd types
            assert serde.encode("t", event) == _old_encode(serde, "t", event)


def test_timestamps_write_as_fastavro_writes_them(serde: Serde) -> None:
    """The dumper's arithmetic for an aware datetime against fastavro's own, over datetimes
    from year 1 to 9999, every millisecond rounding, and zones other than UTC."""
    rng = random.Random(16)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))]
    event = full_examples()[7]
    for _ in range(3000):
        seconds = rng.randrange(-62_135_596_800 + 86_400, 253_402_300_799 - 86_400)
        when = convert.EPOCH + timedelta(seconds=seconds, microseconds=rng.randrange(1_000_000))
        event.occurred_at = when.astimezone(rng.choice(zones))
        assert serde.encode("t", event) == _old_encode(serde, "t", event), event.occurred_at


def test_a_nested_model_swapped_for_a_dict_still_encodes(serde: Serde) -> None:
    event = full_examples()[1]
    assert isinstance(event, m.TaskAssigned)
    want = serde.encode("t", event)
    event.task = event.task.model_dump()  # type: ignore[assignment]  # no validate_assignment
    with pytest.warns(UserWarning):  # pydantic's serializer warns of the dict, as before
        assert serde.encode("t", event) == want


def raw_bytes(serde: Serde, event_type: type[m.Event], record: dict[str, Any]) -> bytes:
    """``record`` in the wire format, written by fastavro alone: no pydantic on the way."""
    buf = io.BytesIO()
    buf.write(b"\x00" + serde.register("t", event_type).to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, parsed_schema(event_type), record)
    return buf.getvalue()


def test_decode_takes_the_fast_path(serde: Serde, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pydantic validation on the way in for a valid record of this process's schema."""
    events = full_examples()
    encoded = [serde.encode("t", e) for e in events]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model_validate on the fast path")

    for event, data in zip(events, encoded, strict=True):
        monkeypatch.setattr(type(event), "model_validate", refuse)
        assert serde.decode(data, type(event)) == event


# ----------------------------------------------------------------- what it declines --
def test_models_the_generator_cannot_stand_in_for_keep_pydantic() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Mini",
            "fields": [{"name": "name", "type": "string"}, {"name": "n", "type": "int"}],
        }
    )

    class Plain(BaseModel):
        name: str
        n: int

    class Before(BaseModel):
        name: str
        n: int

        @field_validator("name", mode="before")
        @classmethod
        def _strip(cls, v: Any) -> Any:
            return v.strip()

    class Serialized(BaseModel):
        name: str
        n: int

        @field_serializer("name")
        def _upper(self, v: str) -> str:
            return v.upper()

    class Tupled(BaseModel):
        name: str
        n: tuple[int, int]

    assert construct.builder(Plain, schema) is not None
    assert construct.builder(Before, schema) is None
    assert convert.dumper(Serialized, schema) is None
    assert construct.builder(Serialized, schema) is not None  # decoding is not serializing
    assert construct.builder(Tupled, schema) is None
    assert convert.dumper(Tupled, schema) is None
    assert convert.dumper(Plain, schema) is not None
    built = construct.builder(Plain, schema)
    assert built is not None and built({"name": " x ", "n": 1}) == Plain(name=" x ", n=1)


def test_a_model_and_schema_that_disagree_keep_pydantic() -> None:
    """A float field over an Avro long (pydantic makes 1 into 1.0), an optional on one side
    only: the builder would not give what validation gives, so there is none."""

    class Floaty(BaseModel):
        name: str
        n: float

    class Maybe(BaseModel):
        name: str | None
        n: int

    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Mini",
            "fields": [{"name": "name", "type": "string"}, {"name": "n", "type": "long"}],
        }
    )
    assert construct.builder(Floaty, schema) is None
    assert construct.builder(Maybe, schema) is None


def test_a_validator_that_takes_info_keeps_pydantic() -> None:
    class Informed(BaseModel):
        name: str
        n: int

        @field_validator("n")
        @classmethod
        def _check(cls, v: int, info: ValidationInfo) -> int:
            return v

    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Mini",
            "fields": [{"name": "name", "type": "string"}, {"name": "n", "type": "int"}],
        }
    )
    assert construct.builder(Informed, schema) is None
