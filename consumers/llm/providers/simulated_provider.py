"""The simulated LLM in process: the same grading and skill table as `stormline simulate-llm`.

Only an agent whose registry entry says ``provider: simulated`` gets it; it is never a
fallback. It leaves out the SDK and HTTP, so that offline runs and benchmarks measure the
platform rather than the client libraries (the simulator server measures those).
"""

from __future__ import annotations

import asyncio
import random
import time

from stormline.consumers.llm import Completion, CompletionRequest, ErrorKind, ProviderError
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.simulation import SimState, load_config, reply, tokens
from stormline.schemas.models import Step, Usage


class SimulatedProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.key
        sim = load_config(config.simulator_config)
        self.state = SimState(sim, random.Random(sim.seed))

    async def complete(self, request: CompletionRequest) -> Completion:
        t0 = time.perf_counter()
        r = reply(self.state, request.model, request.prompt)
        if r.delay_s > request.timeout_s:
            await asyncio.sleep(request.timeout_s)
            raise ProviderError(ErrorKind.TIMEOUT, f"no reply within {request.timeout_s}s")
        if r.delay_s:
            await asyncio.sleep(r.delay_s)
        if r.status != 200:
            if r.status == 429:
                kind = ErrorKind.RATE_LIMIT
            elif r.status >= 500:
                kind = ErrorKind.SERVER
            else:
                kind = ErrorKind.CLIENT
            raise ProviderError(kind, r.text, status=r.status, retry_after_s=r.retry_after_s)
        latency_ms = (time.perf_counter() - t0) * 1000
        steps = [Step(role="user", content=request.prompt)]
        if request.system_prompt:
            steps.insert(0, Step(role="system", content=request.system_prompt))
        pt = sum(len(tokens(s.content)) for s in steps)
        ct = len(tokens(r.text))
        steps.append(
            Step(
                role="assistant",
                content=r.text,
                prompt_tokens=pt,
                completion_tokens=ct,
                latency_ms=latency_ms,
            )
        )
        return Completion(
            output=r.text,
            provider=self.config.provider,
            model=request.model,
            steps=steps,
            usage=Usage(prompt_tokens=pt, completion_tokens=ct, cost_usd=self.config.cost(pt, ct)),
            latency_ms=latency_ms,
        )

    async def aclose(self) -> None:
        return None
