"""The agent registry: agents are configuration (``agents.yaml``), not code.

An agent names a provider (``openai`` for OpenAI and any OpenAI-compatible server such as
vLLM, Ollama or ``stormline simulate-llm``; ``anthropic``; ``simulated``, the simulator's
skill table in process, for offline runs and benchmarks that leave out the SDK and HTTP, and
only where an agent names it), a model, a system prompt, its
capabilities, concurrency, timeout, max tokens, temperature and an optional fallback
provider. API keys are never written here: ``api_key_env`` names the environment variable
that holds the key.

File format::

    agents:
      - id: math-fast
        provider: openai
        model: gpt-4o-mini
        base_url: http://127.0.0.1:8700/v1   # optional
        api_key_env: OPENAI_API_KEY          # optional when base_url needs no key
        system_prompt: You solve arithmetic.
        capabilities: [math]
        concurrency: 64
        timeout_s: 30
        max_tokens: 256
        temperature: 0.0
        fallback: {provider: anthropic, model: claude-haiku-4-5, api_key_env: ANTHROPIC_API_KEY}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROVIDERS = ("openai", "anthropic", "simulated")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class AgentConfigError(ValueError):
    """A bad registry file or entry; the message names the file and the agent."""


class ProviderConfig(BaseModel):
    """How to reach one model: enough to build an :class:`~consumers.llm.LLMProvider`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["openai", "anthropic", "simulated"]
    model: str = Field(min_length=1)
    base_url: str | None = None
    simulator_config: Path | None = Field(
        default=None,
        description="provider simulated: the skill/latency YAML of `stormline simulate-llm "
        "--config`; unset means its built-in table.",
    )
    api_key_env: str | None = Field(
        default=None,
        description="Env var holding the key. Unset: the provider's usual variable, or no "
        "key at all for a base_url server that needs none.",
    )
    timeout_s: float = Field(default=60.0, gt=0)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    logprobs: bool = False
    price_in_per_mtok: float = Field(default=0.0, ge=0.0, description="USD per 1M prompt tok")
    price_out_per_mtok: float = Field(default=0.0, ge=0.0, description="USD per 1M output tok")

    @property
    def key(self) -> str:
        """Identity of the endpoint: breakers and rate limits are per provider endpoint."""
        return f"{self.provider}@{self.base_url}" if self.base_url else self.provider

    def api_key(self) -> str | None:
        """The key from the environment (never stored). Raises if a named variable is unset."""
        name = self.api_key_env
        if name:
            value = os.environ.get(name)
            if not value:
                raise AgentConfigError(
                    f"environment variable {name} (api_key_env of {self.provider} model "
                    f"{self.model}) is not set; export it before starting the worker"
                )
            return value
        value = os.environ.get(DEFAULT_KEY_ENV[self.provider])
        if value:
            return value
        if self.base_url:
            return None  # a local OpenAI-compatible server (vLLM, Ollama, simulator)
        raise AgentConfigError(
            f"{self.provider} model {self.model} needs an API key: set "
            f"{DEFAULT_KEY_ENV[self.provider]} or name another variable in api_key_env"
        )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.price_in_per_mtok + completion_tokens * self.price_out_per_mtok
        ) / 1e6


class AgentConfig(ProviderConfig):
    id: str = Field(min_length=1, max_length=256)
    system_prompt: str = ""
    capabilities: list[str] = Field(default_factory=list)
    concurrency: int = Field(default=16, ge=1)
    fallback: ProviderConfig | None = None

    def provider_config(self) -> ProviderConfig:
        return ProviderConfig.model_validate(
            # exclude_unset keeps "was this set?" (the Anthropic provider needs to know).
            self.model_dump(include=set(ProviderConfig.model_fields), exclude_unset=True)
        )


class Registry(BaseModel):
    agents: dict[str, AgentConfig]
    path: str = ""

    def get(self, agent_id: str) -> AgentConfig | None:
        return self.agents.get(agent_id)

    def __len__(self) -> int:
        return len(self.agents)

    @property
    def capabilities(self) -> dict[str, list[str]]:
        return {a.id: list(a.capabilities) for a in self.agents.values()}


def _describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "entry"
        msg = e["msg"]
        if e["type"] == "literal_error" and e["loc"][-1:] == ("provider",):
            msg = f"unknown provider {e.get('input')!r}; use one of {', '.join(PROVIDERS)}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_registry(data: Any, path: str = "<memory>") -> Registry:
    """Validate registry data (the YAML document), with errors naming file and agent id."""
    if isinstance(data, dict) and "agents" in data:
        entries = data["agents"]
    else:
        raise AgentConfigError(f"{path}: expected a mapping with an 'agents:' list")
    if not isinstance(entries, list) or not entries:
        raise AgentConfigError(f"{path}: 'agents' must be a non-empty list of agents")
    agents: dict[str, AgentConfig] = {}
    problems: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(
                f"{path}: entry {i + 1}: expected a mapping, got {type(entry).__name__}"
            )
            continue
        agent_id = entry.get("id", f"<entry {i + 1} without id>")
        try:
            agent = AgentConfig.model_validate(entry)
        except ValidationError as exc:
            problems.append(f"{path}: agent {agent_id!r}: {_describe(exc)}")
            continue
        if agent.id in agents:
            problems.append(f"{path}: agent {agent.id!r}: duplicate id (entry {i + 1})")
            continue
        agents[agent.id] = agent
    if problems:
        raise AgentConfigError("\n".join(problems))
    return Registry(agents=agents, path=path)


def load_registry(path: Path | str) -> Registry:
    p = Path(path)
    if not p.exists():
        raise AgentConfigError(
            f"{p}: agent registry not found; create it (see agents.yaml at the repository "
            "root) or set STORMLINE_AGENTS_FILE / --agents"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"{p}: not valid YAML: {exc}") from exc
    return parse_registry(data, str(p))
