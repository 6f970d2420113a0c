"""``GET /v1/agents``'s view, shaped from what the router and the cluster say. Pure, no I/O.

Inputs: the router's web views (``/router/qtable/``: ``{task_type: {agent: QCell dict}}``;
``/router/health/``: its directory of capabilities and status) and the latest
AgentHealthChanged per agent on ``agent-health`` (``stormline.deploy.ops``). Per task type an
agent's ``share`` is its part of the router's assignments (``pulls``) and ``mean_reward`` the
router's current estimate (``value``) over ``rewards`` counted rewards.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TypeEstimate(BaseModel):
    task_type: str
    share: float | None
    mean_reward: float
    rewards: int
    assignments: int


class AgentView(BaseModel):
    agent_id: str
    capabilities: list[str] = Field(default_factory=list)
    health: str = "unknown"
    health_reason: str = ""
    health_since: str | None = None
    by_task_type: list[TypeEstimate] = Field(default_factory=list)


class AgentsOut(BaseModel):
    agents: list[AgentView]
    router: str  # "ok", or why the router's estimates are missing


def agent_views(
    health: list[dict[str, Any]], qtable: dict[str, dict[str, Any]], directory: dict[str, Any]
) -> list[AgentView]:
    views: dict[str, AgentView] = {}

    def view(agent: str) -> AgentView:
        return views.setdefault(agent, AgentView(agent_id=agent))

    for agent, d in directory.items():
        v = view(agent)
        v.capabilities = sorted(d.get("capabilities", []))
        v.health = str(d.get("status", v.health))
    for row in health:  # the published health wins over the directory's copy
        v = view(row["agent_id"])
        v.health, v.health_reason, v.health_since = row["status"], row["reason"], row["since"]
    for task_type, cells in sorted(qtable.items()):
        pulls = sum(int(c.get("pulls", 0)) for c in cells.values())
        for agent, c in sorted(cells.items()):
            view(agent).by_task_type.append(
                TypeEstimate(
                    task_type=task_type,
                    share=int(c.get("pulls", 0)) / pulls if pulls else None,
                    mean_reward=float(c.get("value", 0.0)),
                    rewards=int(c.get("count", 0)),
                    assignments=int(c.get("pulls", 0)),
                )
            )
    return [views[a] for a in sorted(views)]
