"""OpenAI chat completions through the official SDK; any OpenAI-compatible base_url works."""

from __future__ import annotations

import itertools
import re
import time

import openai

from stormline.consumers.llm import Completion, CompletionRequest, ErrorKind, ProviderError
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.providers._errors import client_pool, to_provider_error
from stormline.schemas.models import Step, ToolCall, Usage

# vLLM's `return_tokens_as_token_ids` (and the simulator) spell tokens as "token_id:123".
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class OpenAIProvider:
    def __init__(self, config: ProviderConfig, *, max_connections: int = 1024) -> None:
        self.config = config
        self.name = config.key
        api_key = config.api_key() or "no-key-needed"
        self._clients = client_pool(
            lambda limits: openai.AsyncOpenAI(
                api_key=api_key,
                base_url=config.base_url,
                max_retries=0,
                timeout=config.timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits),
            ),
            max_connections,
        )
        self._next = itertools.cycle(self._clients)

    async def complete(self, request: CompletionRequest) -> Completion:
        messages: list[dict[str, str]] = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.append({"role": "user", "content": request.prompt})
        extra = {"logprobs": True} if request.logprobs else {}
        t0 = time.perf_counter()
        try:
            resp = await next(self._next).chat.completions.create(
                model=request.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                timeout=request.timeout_s,
                **extra,  # type: ignore[arg-type]
            )
        except openai.OpenAIError as exc:
            raise to_provider_error(exc, openai) from None
        latency_ms = (time.perf_counter() - t0) * 1000
        if not resp.choices:
            raise ProviderError(ErrorKind.SERVER, "response has no choices")
        choice = resp.choices[0]
        msg = choice.message
        token_ids: list[int] | None = None
        logprobs: list[float] | None = None
        if choice.logprobs is not None and choice.logprobs.content:
            logprobs = [float(t.logprob) for t in choice.logprobs.content]
            ids = [_TOKEN_ID.match(t.token) for t in choice.logprobs.content]
            if all(ids):
                token_ids = [int(m.group(1)) for m in ids if m]
        tool_calls = [
            ToolCall(id=tc.id, name=tc.function.name, arguments=tc.function.arguments)
            for tc in (msg.tool_calls or [])
            if getattr(tc, "function", None) is not None
        ]
        pt = resp.usage.prompt_tokens if resp.usage else 0
        ct = resp.usage.completion_tokens if resp.usage else 0
        steps = [Step(role=m["role"], content=m["content"]) for m in messages]
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
