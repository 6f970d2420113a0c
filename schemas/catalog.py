"""The topic catalog: every Stormline topic, its key, event type, partitions and retention.

Names here are logical; :func:`TopicSpec.name` applies the settings' topic prefix. Partition
counts and retention default to the values below and are overridden per topic by settings
(``STORMLINE_TOPIC_PARTITIONS='{"tasks": 12}'``, ``STORMLINE_TOPIC_RETENTION_MS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from stormline.runtime.admin import TopicWanted
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    CheckpointPublished,
    DeadLetter,
    Event,
    Reward,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
)
from stormline.settings import Settings

DAY_MS = 24 * 3600 * 1000
FOREVER = -1


@dataclass(frozen=True)
class TopicSpec:
    logical: str
    key: str
    event: type[Event]
    retention_ms: int
    cleanup_policy: str = "delete"
    doc: str = ""

    def name(self, settings: Settings) -> str:
        return settings.topic(self.logical)

    def partitions(self, settings: Settings) -> int:
        return settings.topic_partitions.get(self.logical, settings.default_partitions)

    def retention(self, settings: Settings) -> int:
        return settings.topic_retention_ms.get(self.logical, self.retention_ms)

    def configs(self, settings: Settings) -> dict[str, str]:
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention(settings)),
        }

    def wanted(self, settings: Settings) -> TopicWanted:
        """The topic as ``stormline.runtime.admin.ensure_topics`` creates it."""
        return TopicWanted(
            self.name(settings), self.partitions(settings), None, self.configs(settings)
        )


# tasks, trajectories and rewards are the experience store: replay and retraining read them,
# so they keep 30 days by default (see the README on sizing retention).
TASKS = TopicSpec("tasks", "task_id", TaskSubmitted, 30 * DAY_MS, doc="tasks submitted by clients")
ASSIGNMENTS = TopicSpec(
    "assignments",
    "task_id",
    TaskAssigned,
    7 * DAY_MS,
    doc="one record per attempt, router -> workers",
)
TRAJECTORIES = TopicSpec(
    "trajectories",
    "task_id",
    Trajectory,
    30 * DAY_MS,
    doc="what each attempt did, workers -> evaluators, trainer",
)
REWARDS = TopicSpec(
    "rewards", "task_id", Reward, 30 * DAY_MS, doc="scores, evaluators/humans -> router, trainer"
)
HEARTBEATS = TopicSpec(
    "heartbeats", "worker_id", AgentHeartbeat, 1 * DAY_MS, doc="workers say they are alive"
)
AGENT_HEALTH = TopicSpec(
    "agent-health",
    "agent_id",
    AgentHealthChanged,
    30 * DAY_MS,
    doc="the router's view of each agent",
)
CHECKPOINTS = TopicSpec(
    "checkpoints",
    "policy",
    CheckpointPublished,
    FOREVER,
    doc="trainer -> router; every version is kept",
)
DEAD_LETTERS = TopicSpec(
    "dead-letters",
    "original key",
    DeadLetter,
    30 * DAY_MS,
    doc="what could not be decoded, validated or handled",
)

CATALOG: tuple[TopicSpec, ...] = (
    TASKS,
    ASSIGNMENTS,
    TRAJECTORIES,
    REWARDS,
    HEARTBEATS,
    AGENT_HEALTH,
    CHECKPOINTS,
    DEAD_LETTERS,
)
BY_LOGICAL: dict[str, TopicSpec] = {t.logical: t for t in CATALOG}
BY_EVENT: dict[type[Event], TopicSpec] = {t.event: t for t in CATALOG}


def spec_for(event: Event | type[Event]) -> TopicSpec:
    cls = event if isinstance(event, type) else type(event)
    return BY_EVENT[cls]
