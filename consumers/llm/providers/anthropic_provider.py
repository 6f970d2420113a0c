"""Anthropic messages through the official SDK (base_url settable for tests and gateways)."""

from __future__ import annotations

import itertools
import json
import time

import anthropic
from anthropic.types import MessageParam

from stormline.consumers.llm import Completion, CompletionRequest
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.providers._errors import (
    Transport,
    client_pool,
    http_client,
    to_provider_error,
)
from stormline.schemas.models import Step, ToolCall, Usage


class AnthropicProvider:
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
            lambda limits: anthropic.AsyncAnthropic(
                api_key=api_key,
                base_url=config.base_url,
                max_retries=0,
                timeout=config.timeout_s,
                http_client=http_client(anthropic, transport, limits),
            ),
            max_connections,
            transport,
        )
        self._next = itertools.cycle(self._clients)

    async def complete(self, request: CompletionRequest) -> Completion:
        messages: list[MessageParam] = [{"role": "user", "content": request.prompt}]
        # This SDK no longer lists temperature; send it only when the agent asks for it.
        extra_body = (
            {"temperature": request.temperature}
            if "temperature" in self.config.model_fields_set
            else None
        )
        t0 = time.perf_counter()
        try:
            resp = await next(self._next).messages.create(
                model=request.model,
                max_tokens=request.max_tokens,
                messages=messages,
                timeout=request.timeout_s,
                system=request.system_prompt or anthropic.omit,
                extra_body=extra_body,
            )
        except anthropic.AnthropicError as exc:
            raise to_provider_error(exc, anthropic) from None
        latency_ms = (time.perf_counter() - t0) * 1000
        text = "".join(b.text for b in resp.content if b.type == "text")
        tool_calls = [
            ToolCall(id=b.id, name=b.name, arguments=json.dumps(b.input))
            for b in resp.content
            if b.type == "tool_use"
        ]
        pt, ct = resp.usage.input_tokens, resp.usage.output_tokens
        steps = []
        if request.system_prompt:
            steps.append(Step(role="system", content=request.system_prompt))
        steps.append(Step(role="user", content=request.prompt))
        steps.append(
            Step(
                role="assistant",
                content=text,
                tool_calls=tool_calls,
                prompt_tokens=pt,
                completion_tokens=ct,
                latency_ms=latency_ms,
            )
        )
        return Completion(
            output=text,
            provider=self.config.provider,
            model=resp.model or request.model,
            steps=steps,
            usage=Usage(prompt_tokens=pt, completion_tokens=ct, cost_usd=self.config.cost(pt, ct)),
            latency_ms=latency_ms,
        )

    async def aclose(self) -> None:
        for c in self._clients:
            await c.close()
