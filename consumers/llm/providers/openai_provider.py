"""OpenAI chat completions through the official SDK; any OpenAI-compatible base_url works."""

from __future__ import annotations

import itertools
import re
import time

import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.chat_completion import Choice

from stormline.consumers.llm import Completion, CompletionRequest, ErrorKind, ProviderError
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.providers._errors import (
    Transport,
    client_pool,
    http_client,
    to_provider_error,
)
from stormline.schemas.models import Step, ToolCall, Usage

# vLLM's `return_tokens_as_token_ids` (and the simulator) spell tokens as "token_id:123".
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class OpenAIProvider:
    def __init__(
        self,
        config: ProviderConfig,
        *,
        max_connections: int = 1024,
        transport: Transport = "aiohttp",
    ) -> None:
        self.config = config
        self.name = config.key
        api_key = config.api_key() or "no-key-needed"
        self._clients = client_pool(
            lambda limits: openai.AsyncOpenAI(
                api_key=api_key,
                base_url=config.base_url,
                max_retries=0,
                timeout=config.timeout_s,
                http_client=http_client(openai, transport, limits),
            ),
            max_connections,
            transport,
        )
        self._next = itertools.cycle(self._clients)

    async def complete(self, request: CompletionRequest) -> Completion:
        messages: list[ChatCompletionMessageParam] = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.append({"role": "user", "content": request.prompt})
        t0 = time.perf_counter()
        try:
            resp = await next(self._next).chat.completions.create(
                model=request.model,
                messages=messages,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                timeout=request.timeout_s,
                logprobs=True if request.logprobs else openai.omit,
            )
        except openai.OpenAIError as exc:
            raise to_provider_error(exc, openai) from None
        latency_ms = (time.perf_counter() - t0) * 1000
        if not resp.choices:
            raise ProviderError(ErrorKind.SERVER, "response has no choices")
        choice = resp.choices[0]
        msg = choice.message
        token_ids, logprobs = _token_logprobs(choice)
        tool_calls = [
            ToolCall(id=tc.id, name=fn.name, arguments=fn.arguments)
            for tc in (msg.tool_calls or [])
            # Custom tool calls have no `function`. By attribute rather than by class, so that a
            # compatible server whose tool calls lack `type` still counts.
            if (fn := getattr(tc, "function", None)) is not None
        ]
        pt = resp.usage.prompt_tokens if resp.usage else 0
        ct = resp.usage.completion_tokens if resp.usage else 0
        steps = []
        if request.system_prompt:
            steps.append(Step(role="system", content=request.system_prompt))
        steps.append(Step(role="user", content=request.prompt))
        steps.append(
            Step(
                role="assistant",
                content=msg.content or "",
                tool_calls=tool_calls,
                prompt_tokens=pt,
                completion_tokens=ct,
                latency_ms=latency_ms,
                token_ids=token_ids,
                logprobs=logprobs,
            )
        )
        return Completion(
            output=msg.content or "",
            provider=self.config.provider,
            model=resp.model or request.model,
            steps=steps,
            usage=Usage(prompt_tokens=pt, completion_tokens=ct, cost_usd=self.config.cost(pt, ct)),
            latency_ms=latency_ms,
        )

    async def aclose(self) -> None:
        for c in self._clients:
            await c.close()


def _token_logprobs(choice: Choice) -> tuple[list[int] | None, list[float] | None]:
    """(token ids when every token is spelled ``token_id:N``, logprobs), when logprobs came."""
    if choice.logprobs is None or not choice.logprobs.content:
        return None, None
    logprobs = [float(t.logprob) for t in choice.logprobs.content]
    ids = [_TOKEN_ID.match(t.token) for t in choice.logprobs.content]
    token_ids = [int(m.group(1)) for m in ids if m] if all(ids) else None
    return token_ids, logprobs
