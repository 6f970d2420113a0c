"""The contract between agent workers, evaluators (LLM-as-judge) and LLM providers.

Providers live in ``consumers/providers/``; each turns a :class:`CompletionRequest` into a
:class:`Completion` or raises :class:`ProviderError`. Retries, backoff, timeouts and the
per-provider circuit breaker wrap providers from outside (they are policy, not transport).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from stormline.schemas.models import Step, Usage


class ErrorKind(StrEnum):
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate_limit"  # 429
    SERVER = "server"  # 5xx, connection reset
    CLIENT = "client"  # 4xx other than 429: retrying will not help
    CIRCUIT_OPEN = "circuit_open"


RETRYABLE = {ErrorKind.TIMEOUT, ErrorKind.RATE_LIMIT, ErrorKind.SERVER}


class ProviderError(Exception):
    """A call that gave no answer.

    ``retry_after_s``: how long a 429 asked the caller to wait (from its headers, see
    :mod:`consumers.llm.ratelimits`); None when it did not say. ``final``: retrying cannot
    help within this assignment (e.g. the wait a provider asks for ends after its expiry).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        status: int | None = None,
        *,
        retry_after_s: float | None = None,
        final: bool = False,
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        self.final = final

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE and not self.final

    @property
    def rate_limit_hint(self) -> float | None:
        """Seconds to wait before the same call may succeed, when a 429 said so."""
        if self.kind is not ErrorKind.RATE_LIMIT or self.final:
            return None
        return self.retry_after_s


@dataclass(frozen=True)
class CompletionRequest:
    agent_id: str
    model: str
    prompt: str
    system_prompt: str = ""
    max_tokens: int = 512
    temperature: float = 0.0
    timeout_s: float = 60.0
    task_type: str = ""
    logprobs: bool = False


@dataclass
class Completion:
    output: str
    provider: str
    model: str
    steps: list[Step] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0


class LLMProvider(Protocol):
    name: str

    async def complete(self, request: CompletionRequest) -> Completion: ...

    async def aclose(self) -> None: ...
