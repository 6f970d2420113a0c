"""The data model: one pydantic v2 model per event, kept in step with ``avro/*.avsc``.

Both sides are written by hand; ``tests/test_schemas.py`` proves they list the same fields
and that every model round-trips through its schema. Limits that protect the pipeline
(prompt and output sizes, value ranges, non-empty ids) live here, at the boundary.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_ID_CHARS = 256
MAX_PROMPT_CHARS = 100_000
MAX_OUTPUT_CHARS = 200_000
MAX_STEPS = 256

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


# Events that can be produced again (a re-sent trajectory, a re-scored reward, a router outcome
# after a restart) take their id from what they are about, so every copy has the same id and
# readers downstream (the sink, ClickHouse) can keep one.
_EVENT_NS = uuid.UUID("5f0b3c1e-8d2a-4c6e-9a57-2b1f7d9e4c30")


def stable_event_id(kind: str, *parts: object) -> uuid.UUID:
    """The deterministic ``event_id`` of event ``kind`` about ``parts`` (uuid5).

    trajectory: (task_id, attempt); reward: (trajectory_id, source); router outcomes: the task
    id and attempt they decide. A different ``kind`` never collides with another's ids.
    """
    return uuid.uuid5(_EVENT_NS, "\x1f".join([kind, *map(str, parts)]))


# agent_id and provider of what the router itself emits (its final-failure trajectory and
# reward): bookkeeping, not an agent's work. Here, below router and evaluator, so both name it.
ROUTER_AGENT = "stormline-router"


def utcnow() -> datetime:
    # Avro timestamp-millis keeps milliseconds; truncating here makes round-trips exact.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# ------------------------------------------------------------------------- enums --
# Each Avro enum has a default symbol ("unknown") so that a reader meeting a symbol added
# later decodes it as unknown instead of failing.
class PolicyKind(StrEnum):
    QTABLE = "qtable"
    CHECKPOINT = "checkpoint"
    EXPLORE = "explore"
    BASELINE = "baseline"
    UNKNOWN = "unknown"


class TrajectoryStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"


class RewardSource(StrEnum):
    VERIFIER = "verifier"
    JUDGE = "judge"
    HUMAN = "human"
    TIMEOUT = "timeout"
    FAILURE = "failure"
    UNKNOWN = "unknown"


class WorkerStatus(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    DRAINING = "draining"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    UNKNOWN = "unknown"


# ------------------------------------------------------------------------- base --
class Record(BaseModel):
    """A nested Avro record."""

    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class Event(Record):
    """Every event: an id, a time and the version of its schema."""

    AVRO_NAME: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=utcnow)
    schema_version: int = 1

    @field_validator("occurred_at", "assigned_at", "expires_at", check_fields=False)
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=UTC)

    def key(self) -> str:
        """The Kafka key of this event (see the topic catalog)."""
        raise NotImplementedError


# Field validators whose whole work the Avro schema already does on decode: timestamp-millis
# reads as an aware UTC datetime, which ``_utc`` returns as it is. The serde's decode skips
# them (tests/test_serde_fast.py compares its events with model_validate's); every other
# validator runs there too.
AVRO_SHAPED_VALIDATORS = frozenset({"_utc"})


# ------------------------------------------------------------------------- tasks --
class TaskFields(Record):
    task_id: Id
    tenant: Id = "default"
    task_type: Id
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    priority: int = Field(default=5, ge=0, le=9)
    required_capabilities: list[Id] = Field(default_factory=list, max_length=64)
    expected: str | None = Field(default=None, max_length=MAX_OUTPUT_CHARS)
    evaluator: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    deadline_ms: int | None = Field(default=None, gt=0)
    metadata: dict[str, str] = Field(default_factory=dict)


class TaskSubmitted(Event, TaskFields):
    AVRO_NAME = "io.stormline.events.TaskSubmitted"

    def key(self) -> str:
        return self.task_id


class AssignedTask(TaskFields):
    """The task as submitted, carried inside its assignment."""

    occurred_at: datetime

    @classmethod
    def of(cls, task: TaskSubmitted) -> AssignedTask:
        # The fields of a validated task are valid as they are: no second validation (one
        # per assignment, in the router's hot path); containers copied, not shared.
        values = {name: getattr(task, name) for name in cls.model_fields}
        values["required_capabilities"] = list(task.required_capabilities)
        values["metadata"] = dict(task.metadata)
        return cls.model_construct(**values)


class TaskAssigned(Event):
    AVRO_NAME = "io.stormline.events.TaskAssigned"

    task_id: Id
    attempt: int = Field(ge=1)
    agent_id: Id
    policy: PolicyKind
    strategy: str = ""
    policy_version: str | None = None
    score: float = 0.0
    epsilon: float | None = Field(default=None, ge=0.0, le=1.0)
    assigned_at: datetime
    expires_at: datetime
    task: AssignedTask

    def key(self) -> str:
        return self.task_id


# ------------------------------------------------------------------- trajectories --
class ToolCall(Record):
    id: str
    name: str
    arguments: str


class Step(Record):
    role: str
    content: str = Field(max_length=MAX_OUTPUT_CHARS)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0.0)
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


class Usage(Record):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0.0)


class Trajectory(Event):
    AVRO_NAME = "io.stormline.events.Trajectory"

    task_id: Id
    trajectory_id: Id
    attempt: int = Field(ge=1)
    agent_id: Id
    task_type: str = ""
    provider: str = ""
    model: str = ""
    policy_version: str | None = None
    steps: list[Step] = Field(default_factory=list, max_length=MAX_STEPS)
    output: str | None = Field(default=None, max_length=MAX_OUTPUT_CHARS)
    status: TrajectoryStatus
    error: str | None = Field(default=None, max_length=10_000)
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = Field(default=0.0, ge=0.0)
    expected: str | None = Field(default=None, max_length=MAX_OUTPUT_CHARS)
    evaluator: str | None = None
    final: bool = False

    def key(self) -> str:
        return self.task_id


class Reward(Event):
    AVRO_NAME = "io.stormline.events.Reward"

    task_id: Id
    trajectory_id: Id
    attempt: int = Field(default=0, ge=0)
    agent_id: Id
    task_type: str = ""
    policy_version: str | None = None
    value: float
    components: dict[str, float] = Field(default_factory=dict)
    source: RewardSource
    reason: str | None = Field(default=None, max_length=10_000)

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("reward value must be a finite number")
        return v

    def key(self) -> str:
        return self.task_id


# ------------------------------------------------------------------------ agents --
class AgentHeartbeat(Event):
    AVRO_NAME = "io.stormline.events.AgentHeartbeat"

    worker_id: Id
    agent_ids: list[Id] = Field(default_factory=list)
    capabilities: dict[str, list[str]] = Field(default_factory=dict)
    in_flight: int = Field(default=0, ge=0)
    processed: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    status: WorkerStatus
    detail: str | None = None

    def key(self) -> str:
        return self.worker_id


class AgentHealthChanged(Event):
    AVRO_NAME = "io.stormline.events.AgentHealthChanged"

    agent_id: Id
    status: HealthStatus
    previous: HealthStatus = HealthStatus.UNKNOWN
    reason: str = ""

    def key(self) -> str:
        return self.agent_id


# ------------------------------------------------------------------- checkpoints --
class OffsetRange(Record):
    topic: str
    partition: int = Field(ge=0)
    start_offset: int = Field(ge=0)
    end_offset: int = Field(ge=0)


class CheckpointPublished(Event):
    AVRO_NAME = "io.stormline.events.CheckpointPublished"

    policy: Id
    version: int = Field(ge=1)
    uri: Id
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_on: list[OffsetRange] = Field(default_factory=list)
    promoted: bool = True
    decision: str = ""

    def key(self) -> str:
        return self.policy

    @property
    def policy_version(self) -> str:
        return f"{self.policy}@{self.version}"


class DeadLetter(Event):
    AVRO_NAME = "io.stormline.events.DeadLetter"

    source_topic: str
    partition: int
    offset: int
    raw_key: bytes | None = None
    raw_value: bytes | None = None
    error_kind: str
    error: str
    consumer_group: str = ""

    def key(self) -> str:
        return self.raw_key.decode("utf-8", "replace") if self.raw_key else ""


EVENT_TYPES: tuple[type[Event], ...] = (
    TaskSubmitted,
    TaskAssigned,
    Trajectory,
    Reward,
    AgentHeartbeat,
    AgentHealthChanged,
    CheckpointPublished,
    DeadLetter,
)
