"""The agents' provider chains: one client per distinct provider config, a breaker per endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from stormline.consumers.llm import LLMProvider
from stormline.consumers.llm.agents import AgentConfig, ProviderConfig, Registry
from stormline.consumers.llm.providers import make_provider
from stormline.consumers.llm.resilience import CircuitBreaker
from stormline.settings import Settings


@dataclass
class AgentRuntime:
    """One agent as the worker serves it: its primary provider, then its fallback, and its
    concurrency slots (``concurrency`` in agents.yaml)."""

    config: AgentConfig
    chain: list[tuple[ProviderConfig, LLMProvider]]
    slots: asyncio.Semaphore


class ProviderPool:
    """Provider clients shared by the agents that use the same config; breakers by endpoint."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.breakers: dict[str, CircuitBreaker] = {}
        self._clients: dict[ProviderConfig, LLMProvider] = {}

    def client(self, cfg: ProviderConfig) -> LLMProvider:
        if cfg not in self._clients:
            self._clients[cfg] = make_provider(
                cfg,
                max_connections=self.settings.worker_max_in_flight,
                transport=self.settings.llm_transport,
            )
        self.breakers.setdefault(
            cfg.key,
            CircuitBreaker(
                self.settings.breaker_failure_threshold, self.settings.breaker_cooldown_s
            ),
        )
        return self._clients[cfg]

    def agents(self, registry: Registry) -> dict[str, AgentRuntime]:
        out: dict[str, AgentRuntime] = {}
        for agent in registry.agents.values():
            primary = agent.provider_config()
            chain = [(primary, self.client(primary))]
            if agent.fallback is not None:
                chain.append((agent.fallback, self.client(agent.fallback)))
            out[agent.id] = AgentRuntime(agent, chain, asyncio.Semaphore(agent.concurrency))
        return out

    def open_breakers(self) -> list[str]:
        return [k for k, b in self.breakers.items() if b.state != "closed"]

    async def aclose(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
