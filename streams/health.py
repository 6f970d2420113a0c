"""Agent health: a small state machine with a circuit breaker. Pure: time is passed in.

States and the only transitions allowed (anything else is a bug and raises)::

    unknown  -> healthy   first heartbeat
    unknown  -> down      a worker says it stopped before we ever saw it healthy
    healthy  -> degraded  a run of ``error_threshold`` failed attempts opens the circuit
    healthy  -> down      no heartbeat for ``heartbeat_timeout`` (or the worker stopped)
    degraded -> healthy   ``probe_successes`` probes succeeded after the cool-down
    degraded -> degraded  a probe failed: the circuit re-opens with a fresh cool-down
    degraded -> down      no heartbeat
    down     -> degraded  heartbeats resumed: probe at once, close after the probes succeed

``degraded`` is an open circuit: the router sends nothing until the cool-down is over, then at
most ``probe_tasks`` probes in flight. :func:`probe_ready_at` is the one place that says when
probing starts, so the health keeper and every router worker agree from the published
:class:`~schemas.models.AgentHealthChanged` alone.

Two sides: :class:`AgentHealth` is the state machine its one owner runs per agent;
:class:`ProbeBudget` and :class:`Directory` are what every router worker builds from the
published changes to decide which agents may take a task now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from stormline.schemas.models import HealthStatus

H = HealthStatus
ALLOWED: dict[HealthStatus, frozenset[HealthStatus]] = {
    H.UNKNOWN: frozenset({H.HEALTHY, H.DOWN}),
    H.HEALTHY: frozenset({H.DEGRADED, H.DOWN}),
    H.DEGRADED: frozenset({H.HEALTHY, H.DEGRADED, H.DOWN}),
    H.DOWN: frozenset({H.DEGRADED}),
}


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_timeout_s: float = 15.0
    error_threshold: int = 5
    cooldown_s: float = 30.0
    probe_tasks: int = 2
    probe_successes: int = 2
    # A probe whose outcome has not changed the agent's health by then (its outcome lost, or
    # its attempt expired unseen) no longer holds the probe budget: the assignment TTL.
    probe_timeout_s: float = 60.0


@dataclass(frozen=True)
class Transition:
    agent_id: str
    status: HealthStatus
    previous: HealthStatus
    reason: str
    at: float


def probe_ready_at(
    status: HealthStatus, previous: HealthStatus, since: float, cooldown_s: float
) -> float | None:
    """When a degraded agent may get probes; None when it is not degraded."""
    if status != H.DEGRADED:
        return None
    return since if previous == H.DOWN else since + cooldown_s


@dataclass
class AgentHealth:
    agent_id: str
    status: HealthStatus = H.UNKNOWN
    previous: HealthStatus = H.UNKNOWN
    since: float = 0.0
    last_seen: float = 0.0
    capabilities: list[str] = field(default_factory=list)
    error_run: int = 0
    probe_ok: int = 0
    ok: int = 0
    errors: int = 0

    # -- inputs --
    def heartbeat(
        self, now: float, capabilities: list[str] | None, stopped: bool, cfg: HealthConfig
    ) -> Transition | None:
        if capabilities is not None:
            self.capabilities = sorted(set(capabilities))
        if stopped:
            self.last_seen = 0.0
            if self.status != H.DOWN:
                return self._move(H.DOWN, "its worker reported it stopped", now)
            return None
        self.last_seen = now
        if self.status == H.UNKNOWN:
            return self._move(H.HEALTHY, "first heartbeat", now)
        if self.status == H.DOWN:
            return self._move(H.DEGRADED, "heartbeats resumed; probing", now)
        return None

    def outcome(self, now: float, ok: bool, detail: str, cfg: HealthConfig) -> Transition | None:
        """One attempt finished (``ok``) or failed (error trajectory, expiry)."""
        if ok:
            self.ok += 1
            self.error_run = 0
            if self.status == H.DEGRADED and self._probing(now, cfg):
                self.probe_ok += 1
                if self.probe_ok >= cfg.probe_successes:
                    return self._move(H.HEALTHY, f"{self.probe_ok} probes succeeded", now)
            return None
        self.errors += 1
        self.error_run += 1
        if self.status == H.HEALTHY and self.error_run >= cfg.error_threshold:
            return self._move(
                H.DEGRADED, f"{self.error_run} failed attempts in a row ({detail})", now
            )
        if self.status == H.DEGRADED and self._probing(now, cfg):
            return self._move(H.DEGRADED, f"probe failed ({detail}); circuit re-opened", now)
        return None

    def check(self, now: float, cfg: HealthConfig) -> Transition | None:
        """The clock: missed heartbeats take an agent down."""
        if (
            self.status in (H.HEALTHY, H.DEGRADED)
            and now - self.last_seen > cfg.heartbeat_timeout_s
        ):
            return self._move(H.DOWN, f"no heartbeat for {now - self.last_seen:.1f}s", now)
        return None

    # -- internals --
    def _probing(self, now: float, cfg: HealthConfig) -> bool:
        ready = probe_ready_at(self.status, self.previous, self.since, cfg.cooldown_s)
        return ready is not None and now >= ready

    def _move(self, to: HealthStatus, reason: str, now: float) -> Transition:
        if to not in ALLOWED[self.status]:
            raise ValueError(f"illegal health transition {self.status} -> {to} ({reason})")
        t = Transition(self.agent_id, to, self.status, reason, now)
        self.previous, self.status, self.since = self.status, to, now
        self.probe_ok = 0
        if to == H.DEGRADED and t.previous == H.DOWN:
            self.error_run = 0
        return t

    # -- storage --
    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["status"], d["previous"] = self.status.value, self.previous.value
        return d

    @classmethod
    def from_dict(cls, agent_id: str, data: Mapping[str, Any] | None) -> AgentHealth:
        """The state from its :meth:`to_dict` form (a JSON table value, hence ``Any``)."""
        if not data:
            return cls(agent_id)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        h = cls(**known)
        h.status, h.previous = H(h.status), H(h.previous)
        return h


@dataclass
class ProbeBudget:
    """A router worker's view of one agent: may it get a task now?

    Built from published AgentHealthChanged events; counts the probes this worker sent since
    the last change so that a half-open circuit gets at most ``probe_tasks`` of them.
    """

    status: HealthStatus = H.UNKNOWN
    previous: HealthStatus = H.UNKNOWN
    since: float = 0.0
    probes_sent: int = 0
    last_probe: float = 0.0

    def changed(self, status: HealthStatus, previous: HealthStatus, at: float) -> None:
        self.status, self.previous, self.since, self.probes_sent = status, previous, at, 0

    def admits(self, now: float, cfg: HealthConfig) -> tuple[bool, bool]:
        """(may route to it, the task would be a probe)."""
        if self.status == H.DOWN:
            return False, False
        if self.status != H.DEGRADED:
            return True, False
        ready = probe_ready_at(self.status, self.previous, self.since, cfg.cooldown_s)
        if ready is None or now < ready:
            return False, False
        if self.probes_sent >= cfg.probe_tasks:
            if now - self.last_probe < cfg.probe_timeout_s:
                return False, False
            self.probes_sent = 0  # the probes' outcomes never came: probe again
        return True, True


@dataclass
class Directory:
    """One router worker's view of the agents: capabilities and health, all in memory."""

    health: HealthConfig = field(default_factory=HealthConfig)
    capabilities: dict[str, frozenset[str]] = field(default_factory=dict)
    budgets: dict[str, ProbeBudget] = field(default_factory=dict)

    def heartbeat(self, capabilities: dict[str, list[str]], agent_ids: list[str]) -> None:
        for agent in {*agent_ids, *capabilities}:
            self.capabilities[agent] = frozenset(capabilities.get(agent, []))

    def health_changed(
        self, agent_id: str, status: HealthStatus, previous: HealthStatus, when: float
    ) -> None:
        self.budgets.setdefault(agent_id, ProbeBudget()).changed(status, previous, when)

    def status(self, agent_id: str) -> HealthStatus:
        b = self.budgets.get(agent_id)
        return b.status if b else HealthStatus.UNKNOWN

    def candidates(self, required: list[str], now: float) -> dict[str, bool]:
        """Agents that may take a task needing ``required`` -> whether it would be a probe."""
        need = set(required)
        out: dict[str, bool] = {}
        for agent, caps in self.capabilities.items():
            if not need <= caps:
                continue
            budget = self.budgets.get(agent)
            if budget is None:
                out[agent] = False
                continue
            ok, probe = budget.admits(now, self.health)
            if ok:
                out[agent] = probe
        return out

    def probe_sent(self, agent_id: str, now: float = 0.0) -> None:
        b = self.budgets.get(agent_id)
        if b is not None:
            b.probes_sent += 1
            b.last_probe = now
