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
        base_url: http://127.0.0.1:${STORMLINE_SIMULATOR_PORT}/v1   # optional
        api_key_env: OPENAI_API_KEY          # optional when base_url needs no key
        system_prompt: You solve arithmetic.
        capabilities: [math]
        concurrency: 64
        timeout_s: 30
        max_tokens: 256
        temperature: 0.0
        fallback: {provider: anthropic, model: claude-haiku-4-5, api_key_env: ANTHROPIC_API_KEY}

Interpolation: ``${NAME}`` and ``${NAME:-default}`` in any string value are replaced when the
registry is loaded (``STORMLINE_*`` settings from the effective settings, other names from the
environment; secrets are refused): see :mod:`consumers.llm.interpolation`.

:func:`endpoint_problems` checks that every agent's ``base_url`` answers (a TCP connect), so a
worker, the demo or ``stormline doctor`` can say "nothing listens there" before any task fails.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stormline.consumers.llm.interpolation import InterpolationError, Variables
from stormline.logs import register_secret

if TYPE_CHECKING:
    from stormline.settings import Settings

ProviderName = Literal["openai", "anthropic", "simulated"]
PROVIDERS: tuple[str, ...] = get_args(ProviderName)
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class AgentConfigError(ValueError):
    """A bad registry file or entry; the message names the file and the agent."""


class ProviderConfig(BaseModel):
    """How to reach one model: enough to build an :class:`~stormline.consumers.llm.LLMProvider`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName
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
            register_secret(value)  # masked by value in logs and events from now on
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


def parse_registry(
    data: Any,
    path: str = "<memory>",
    *,
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
) -> Registry:
    """Validate registry data (the YAML document), with errors naming file and agent id.

    String values are interpolated first (``${NAME}``, ``${NAME:-default}``; see the module
    docstring): ``STORMLINE_*`` settings from ``settings`` (default ``Settings()``), other
    names from ``environ`` (default ``os.environ``).
    """
    if isinstance(data, dict) and "agents" in data:
        entries = data["agents"]
    else:
        raise AgentConfigError(f"{path}: expected a mapping with an 'agents:' list")
    if not isinstance(entries, list) or not entries:
        raise AgentConfigError(f"{path}: 'agents' must be a non-empty list of agents")
    agents: dict[str, AgentConfig] = {}
    problems: list[str] = []
    variables = Variables(settings, environ)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(
                f"{path}: entry {i + 1}: expected a mapping, got {type(entry).__name__}"
            )
            continue
        agent_id = entry.get("id", f"<entry {i + 1} without id>")
        try:
            entry = variables.interpolate(entry, f"{path}: agent {agent_id!r}")
        except InterpolationError as exc:
            problems.append(str(exc))
            continue
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


def load_registry(
    path: Path | str,
    settings: Settings | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Registry:
    """Read and validate the registry file; ``settings``: the effective settings that
    ``${STORMLINE_*}`` references resolve from (default ``Settings()``)."""
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
    return parse_registry(data, str(p), settings=settings, environ=environ)


# ---------------------------------------------------------------- endpoint checks --
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"host {host!r} does not resolve"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _shown(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def _endpoint(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def endpoint_problems(
    agents: Registry | Iterable[AgentConfig],
    *,
    timeout_s: float = 1.0,
    settings: Settings | None = None,
    probe: Callable[[str, int, float], str | None] = _probe,
) -> list[str]:
    """One message per agent (and per fallback) whose ``base_url`` does not answer.

    The check is a TCP connect to the URL's host and port (each distinct endpoint once, in
    parallel, ``timeout_s`` each), so it costs about ``timeout_s`` at most and needs no key.
    Agents without ``base_url`` (the providers' hosted APIs) and ``provider: simulated`` are
    not checked. Each message names the agent, the URL, why, and what to do; ``settings``
    (optional) lets it name the simulator port in effect. An empty list: every endpoint answers.
    """
    where = agents.path if isinstance(agents, Registry) and agents.path else "the agent registry"
    items = agents.agents.values() if isinstance(agents, Registry) else agents
    checks: list[tuple[str, str]] = []  # (who, base_url)
    for agent in items:
        for who, cfg in (
            (f"agent {agent.id!r}", agent),
            (f"agent {agent.id!r} (fallback)", agent.fallback),
        ):
            if cfg is not None and cfg.provider != "simulated" and cfg.base_url:
                checks.append((who, cfg.base_url))
    targets = list(dict.fromkeys(e for _, url in checks if (e := _endpoint(url)) is not None))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(targets)))) as pool:
        answers = dict(
            zip(targets, pool.map(lambda e: probe(e[0], e[1], timeout_s), targets), strict=True)
        )
    port = f"={settings.simulator_port}" if settings is not None else ""
    problems = []
    for who, url in checks:
        target = _endpoint(url)
        if target is None:
            problems.append(
                f"{who}: base_url {_shown(url)!r} is not an http(s) URL with a host; "
                f"fix it in {where}"
            )
            continue
        why = answers[target]
        if why is None:
            continue
        if target[0] in _LOCAL_HOSTS:
            fix = (
                "start `stormline simulate-llm` (it listens on "
                f"STORMLINE_SIMULATOR_PORT{port}) or the local server meant to answer there, "
                f"or fix base_url in {where} "
                "(http://127.0.0.1:${STORMLINE_SIMULATOR_PORT}/v1 follows the simulator's port)"
            )
        else:
            fix = f"check that the server runs and is reachable, or fix base_url in {where}"
        problems.append(f"{who}: nothing answers at {_shown(url)} ({why}); {fix}")
    return problems
