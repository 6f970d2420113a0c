"""LLM providers: OpenAI (and any OpenAI-compatible base_url), Anthropic, and the in-process
simulated LLM (only where an agent names it).

:func:`make_provider` builds the right :class:`~consumers.llm.LLMProvider` for an agent or a
bare provider config (evaluators use it for LLM-as-judge). The SDKs' own retries are off:
retries, timeouts, breakers and 429 waits are policy in :mod:`consumers.llm.resilience`.
``transport``: the SDKs' HTTP transport, ``aiohttp`` (their ``DefaultAioHttpClient``, the
``[aiohttp]`` extras; about half the client CPU per call) or ``httpx`` (their default).
"""

from __future__ import annotations

from stormline.consumers.llm import LLMProvider
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.providers._errors import TRANSPORTS, Transport


def make_provider(
    config: ProviderConfig, *, max_connections: int = 1024, transport: Transport = "aiohttp"
) -> LLMProvider:
    """The provider for ``config`` (an AgentConfig is a ProviderConfig too)."""
    if config.provider == "openai":
        from stormline.consumers.llm.providers.openai_provider import OpenAIProvider

        return OpenAIProvider(config, max_connections=max_connections, transport=transport)
    if config.provider == "anthropic":
        from stormline.consumers.llm.providers.anthropic_provider import AnthropicProvider

        return AnthropicProvider(config, max_connections=max_connections, transport=transport)
    if config.provider == "simulated":
        from stormline.consumers.llm.providers.simulated_provider import SimulatedProvider

        return SimulatedProvider(config)
    raise ValueError(f"unknown provider {config.provider!r}; use openai, anthropic or simulated")


__all__ = ["TRANSPORTS", "Transport", "make_provider"]
