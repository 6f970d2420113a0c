"""AgentHeartbeat events: what a worker serves, how it is doing, and why not well."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from stormline.consumers.llm.agents import Registry
from stormline.consumers.worker.providers import ProviderPool
from stormline.consumers.worker.stats import WorkerStats
from stormline.schemas.catalog import HEARTBEATS
from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import AgentHeartbeat, WorkerStatus
from stormline.settings import Settings
from stormline.state import RedisState

log = logging.getLogger("stormline.worker")


class Heartbeats:
    """One heartbeat every ``STORMLINE_WORKER_HEARTBEAT_INTERVAL_S``, and a last one on exit."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str,
        *,
        stats: WorkerStats,
        state: RedisState,
        out: EventProducer,
        providers: ProviderPool,
        in_flight: Callable[[], int],
        draining: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.worker_id = worker_id
        self.stats = stats
        self.state = state
        self.out = out
        self.providers = providers
        self.in_flight = in_flight
        self.draining = draining
        self.topic = HEARTBEATS.name(settings)

    def _status(self) -> WorkerStatus:
        if self.draining():
            return WorkerStatus.DRAINING
        degraded = self.state.degraded or self.state.refusing
        return WorkerStatus.DEGRADED if degraded else WorkerStatus.RUNNING

    def _detail(self) -> str | None:
        open_breakers = self.providers.open_breakers()
        st = self.stats
        parts = [
            self.state.detail if self.state.degraded else "",
            f"{self.state.refusal} ({self.state.refused} refused; running without idempotency "
            "for those)"
            if self.state.refusing
            else "",
            f"open circuit breakers: {', '.join(open_breakers)}" if open_breakers else "",
            f"expired attempts: {st.expired_skipped} not called, {st.expired_calls} calls "
            "answered after expiry"
            if st.expired_skipped or st.expired_calls
            else "",
            f"dead-lettered assignments: {st.dead_letters}" if st.dead_letters else "",
        ]
        return "; ".join(x for x in parts if x) or None

    def send(self, status: WorkerStatus | None = None) -> None:
        hb = AgentHeartbeat(
            worker_id=self.worker_id,
            agent_ids=sorted(self.registry.agents),
            capabilities=self.registry.capabilities,
            in_flight=self.in_flight(),
            processed=self.stats.processed,
            errors=self.stats.errors,
            status=status or self._status(),
            detail=self._detail(),
        )
        try:
            self.out.produce(hb, topic=self.topic)
        except Exception as exc:
            log.warning("heartbeat not queued: %s", exc)

    async def run(self) -> None:
        """Probe Redis (so that the status says whether it is reachable), then beat."""
        while True:
            await self.state.ping()
            self.send()
            await asyncio.sleep(self.settings.worker_heartbeat_interval_s)
