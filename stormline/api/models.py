"""The HTTP API's bodies: pure pydantic models, shared by the server and ``stormline.client``.

A task's fields are TaskSubmitted's (``schemas.models.TaskFields``) less ``tenant``, which
comes from the caller's key and is refused in a body (``extra="forbid"``);
``tests/test_api_models.py`` checks that the two lists stay the same.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from stormline.schemas.lifecycle import FINAL, TaskState
from stormline.schemas.models import MAX_ID_CHARS, MAX_OUTPUT_CHARS, MAX_PROMPT_CHARS, Id


class Role(StrEnum):
    """What a key may do; nothing is allowed without one (deny by default)."""

    SUBMIT = "submit"  # tasks and rewards of its tenant (and cancelling them)
    READ = "read"  # its tenant's tasks: status, events, listing
    OPERATE = "operate"  # agents, checkpoints, dead letters, replay
    ADMIN = "admin"  # API keys


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskIn(Body):
    """One task as a caller submits it; ``task_id`` is generated when absent."""

    task_id: Id | None = None
    task_type: Id
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    priority: int = Field(default=5, ge=0, le=9)
    required_capabilities: list[Id] = Field(default_factory=list, max_length=64)
    expected: str | None = Field(default=None, max_length=MAX_OUTPUT_CHARS)
    evaluator: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    deadline_ms: int | None = Field(default=None, gt=0)
    metadata: dict[str, str] = Field(default_factory=dict)


class TaskBatch(Body):
    tasks: list[TaskIn] = Field(min_length=1)


def _one_or_batch(v: Any) -> str:
    # Decide by shape so that a bad body gets the errors of the form it meant, not both.
    if isinstance(v, dict):
        return "batch" if "tasks" in v else "one"
    return "batch" if isinstance(v, TaskBatch) else "one"


Submission = Annotated[
    Annotated[TaskIn, Tag("one")] | Annotated[TaskBatch, Tag("batch")],
    Discriminator(_one_or_batch),
]


class Submitted(Body):
    """The ids of the tasks the brokers acknowledged, in the order given."""

    task_ids: list[str]


FINAL_STATES = FINAL


class TaskStatus(BaseModel):
    """A task's status as Redis holds it (``stormline task``); states are
    ``schemas.lifecycle.TaskState``'s."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    state: TaskState
    attempt: int = 0
    task_type: str | None = None
    agent_id: str | None = None
    trajectory_id: str | None = None
    output: str | None = None
    error: str | None = None
    reward: float | None = None
    reward_source: str | None = None
    submitted_at: float | None = None
    updated_at: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class StatusEvent(BaseModel):
    """One status change as an SSE ``data:`` line (the task-status channel's message)."""

    task_id: str
    state: TaskState
    attempt: int = 0
    status: TaskStatus | None = None  # the whole status, on the final event


class TaskPage(BaseModel):
    tasks: list[TaskStatus]
    next_cursor: str | None = None


class RewardIn(Body):
    """Human feedback on a task: 0 bad .. 1 good; the latest trajectory unless named."""

    task_id: Id
    value: float = Field(ge=0.0, le=1.0)
    reason: str | None = Field(default=None, max_length=10_000)
    trajectory_id: Id | None = None
    agent_id: Id | None = None


class RewardOut(BaseModel):
    task_id: str
    trajectory_id: str
    agent_id: str
    attempt: int
    value: float
    source: str
    event_id: str


class KeyIn(Body):
    tenant: Id
    roles: list[Role] = Field(min_length=1)
    name: str = Field(default="", max_length=200)


class KeyInfo(BaseModel):
    key_id: str
    tenant: str
    roles: list[Role]
    name: str = ""
    created_at: float
    revoked: bool = False


class KeyCreated(KeyInfo):
    api_key: str  # shown once; only its hash is stored


class ReplayIn(Body):
    """Dead letters to re-publish, by ``partition:offset`` on the dead-letters topic."""

    letters: list[Annotated[str, Field(pattern=r"^\d+:\d+$")]] = Field(
        min_length=1, max_length=10_000
    )


class ReplayOut(BaseModel):
    replayed: int
    topics: dict[str, int]
    skipped: list[str] = Field(default_factory=list)
