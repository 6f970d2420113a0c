"""A simulated LLM server for offline runs: OpenAI- and Anthropic-compatible HTTP.

``stormline simulate-llm`` serves ``POST /v1/chat/completions``, ``GET /v1/models`` and
Anthropic's ``POST /v1/messages``, so agents reach it through the real SDKs by base_url.
It is never a silent fallback: an agent uses it only when its base_url says so, or, in
process and without HTTP, when its provider is ``simulated`` (``consumers/llm/providers``).
What the simulated model answers (the grading convention, the skill table, faults) is
:mod:`consumers.llm.simulation`; this module is its HTTP transport only.

Admin endpoints for tests: ``POST /admin/faults`` with ``{"kind": "400"|"429"|"500"|"503"|"hang",
"count": N}`` (the next N requests) or ``{"kind": ..., "seconds": S}`` (a time window),
optionally ``"model"``; ``DELETE /admin/faults``; ``GET /admin/stats`` (request counts by
model and by prompt, and sha256 prefixes of the credentials seen, never the credentials);
``POST /admin/reset``; ``POST /admin/config`` replaces the configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stormline.consumers.llm.simulation import (
    Fault,
    SimConfig,
    SimState,
    reply,
    token_id,
    tokens,
)


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.state = SimState(config, random.Random(config.seed))

    # The body of one answer, shared by both API dialects.
    async def _answer(self, request: Request, body: dict[str, Any]) -> tuple[str, str, int] | Any:
        st = self.state
        model = str(body.get("model", ""))
        messages = body.get("messages") or []
        prompt = ""
        for m in reversed(messages):
            if m.get("role") == "user":
                c = m.get("content")
                prompt = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
                break
        cred = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
        st.credentials[hashlib.sha256(cred.removeprefix("Bearer ").encode()).hexdigest()[:16]] += 1
        r = reply(st, model, prompt)
        if r.delay_s:
            await asyncio.sleep(r.delay_s)
        if r.status != 200:
            return r.status, r.text
        return r.task_type, r.text, r.p

    async def chat_completions(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        res = await self._answer(request, body)
        if isinstance(res[0], int):
            return _openai_error(res[0], res[1])
        _, text, p = res
        prompt_tokens = sum(len(tokens(str(m.get("content", "")))) for m in body["messages"])
        toks = tokens(text)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if body.get("logprobs"):
            lp = math.log(max(p, 1e-6)) / max(len(toks), 1)
            choice["logprobs"] = {
                "content": [
                    {
                        "token": f"token_id:{token_id(t)}",
                        "logprob": lp,
                        "bytes": None,
                        "top_logprobs": [],
                    }
                    for t in toks
                ]
            }
        out = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(toks),
                "total_tokens": prompt_tokens + len(toks),
            },
        }
        return Response(json.dumps(out), media_type="application/json")

    async def messages(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        res = await self._answer(request, body)
        if isinstance(res[0], int):
            return _anthropic_error(res[0], res[1])
        _, text, _p = res
        system = body.get("system") or ""
        prompt_tokens = len(tokens(str(system))) + sum(
            len(tokens(str(m.get("content", "")))) for m in body["messages"]
        )
        out = {
            "id": f"msg_{uuid.uuid4().hex[:20]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(tokens(text))},
        }
        return Response(json.dumps(out), media_type="application/json")

    async def models(self, request: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "stormline-simulator"}
            for m in self.state.config.models
        ]
        return Response(json.dumps({"object": "list", "data": data}), media_type="application/json")

    async def add_fault(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        kind = str(body.get("kind", ""))
        if kind not in ("400", "429", "500", "503", "hang"):
            return _plain(400, "kind must be one of 400, 429, 500, 503, hang")
        seconds = body.get("seconds")
        fault = Fault(
            kind=kind,
            remaining=int(body["count"]) if body.get("count") is not None else None,
            until=time.monotonic() + float(seconds) if seconds is not None else None,
            model=body.get("model"),
            hang_s=float(body.get("hang_s", 3600.0)),
        )
        self.state.faults.append(fault)
        return _plain(200, "ok")

    async def clear_faults(self, request: Request) -> Response:
        self.state.faults.clear()
        return _plain(200, "ok")

    async def stats(self, request: Request) -> Response:
        st = self.state
        out = {
            "requests": st.requests,
            "by_model": dict(st.by_model),
            "by_prompt": dict(st.by_prompt),
            "credential_sha256_16": dict(st.credentials),
            "faults_served": dict(st.faults_served),
        }
        return Response(json.dumps(out), media_type="application/json")

    async def reset(self, request: Request) -> Response:
        self.state = SimState(self.state.config, self.state.rng)
        return _plain(200, "ok")

    async def set_config(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        self.state.config = SimConfig.model_validate(body)
        return _plain(200, "ok")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/admin/faults", self.add_fault, methods=["POST"]),
                Route("/admin/faults", self.clear_faults, methods=["DELETE"]),
                Route("/admin/stats", self.stats, methods=["GET"]),
                Route("/admin/reset", self.reset, methods=["POST"]),
                Route("/admin/config", self.set_config, methods=["POST"]),
            ]
        )


async def _json(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _openai_error(400, "request body is not JSON")
    if not isinstance(body, dict):
        return _openai_error(400, "request body must be a JSON object")
    return body


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


def _openai_error(status: int, message: str) -> Response:
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _anthropic_error(status: int, message: str) -> Response:
    kind = "rate_limit_error" if status == 429 else "api_error"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


# ----------------------------------------------------------------------- serving --
# Longer than clients keep idle connections (httpx: 5 s), so that the server never closes
# a connection a client is about to reuse (that race reads as a connection error).
KEEP_ALIVE_S = 75


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Run the simulator in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(
        Simulator(config).app(),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


class ServerThread:
    """The simulator (or any ASGI app) on a background thread; for tests and benchmarks."""

    def __init__(self, app: Any, port: int, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.url = f"http://{host}:{port}"
        cfg = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            backlog=4096,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name="llm-sim", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"simulator did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
