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
model and by prompt, sha256 prefixes of the credentials seen, never the credentials, and the
``timeline`` of the latest requests: ``[monotonic arrival, model, status, prompt[:80]]``);
``POST /admin/reset``; ``POST /admin/config`` replaces the configuration.

A 429 fault with ``"retry_after_s": S`` says when to come back the way the providers do
(a bare 429 says nothing): ``"hint": "all"`` (default) sends ``retry-after`` and the
dialect's own headers (OpenAI: ``retry-after-ms``, ``x-ratelimit-*-requests|tokens``;
Anthropic: ``anthropic-ratelimit-*`` with RFC 3339 resets); ``"retry-after"`` only
``retry-after`` in whole seconds; ``"retry-after-date"`` ``retry-after`` as an HTTP date;
``"reset"`` only the exhausted limit's ``remaining: 0`` and its reset.
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
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stormline.consumers.llm.simulation import (
    HINTS,
    Fault,
    Reply,
    SimConfig,
    SimState,
    reply,
    token_id,
    tokens,
)


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.state = SimState(config, random.Random(config.seed))

    # The body of one answer, shared by both API dialects: (type, text, p), or the Reply of
    # an error.
    async def _answer(
        self, request: Request, body: dict[str, Any]
    ) -> tuple[str, str, float] | Reply:
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
            return r
        return r.task_type, r.text, r.p

    async def chat_completions(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        res = await self._answer(request, body)
        if isinstance(res, Reply):
            return _openai_error(res.status, res.text, _hint_headers("openai", res))
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
        if isinstance(res, Reply):
            return _anthropic_error(res.status, res.text, _hint_headers("anthropic", res))
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
        hint = str(body.get("hint", "all"))
        if hint not in HINTS:
            return _plain(400, f"hint must be one of {', '.join(HINTS)}")
        retry_after_s = body.get("retry_after_s")
        fault = Fault(
            kind=kind,
            remaining=int(body["count"]) if body.get("count") is not None else None,
            until=time.monotonic() + float(seconds) if seconds is not None else None,
            model=body.get("model"),
            hang_s=float(body.get("hang_s", 3600.0)),
            retry_after_s=float(retry_after_s) if retry_after_s is not None else None,
            hint=hint,
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
            "timeline": list(st.timeline),
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


def _openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return Response(
        json.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = "rate_limit_error" if status == 429 else "api_error"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return Response(
        json.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _go_duration(seconds: float) -> str:
    """OpenAI's spelling of a reset: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _hint_headers(dialect: Literal["openai", "anthropic"], r: Reply) -> dict[str, str]:
    """The headers a provider sends with a 429 that says when to come back."""
    s = r.retry_after_s
    if r.status != 429 or s is None:
        return {}
    at = datetime.now(UTC) + timedelta(seconds=s)
    out: dict[str, str] = {}
    if r.hint in ("all", "retry-after"):
        out["retry-after"] = str(math.ceil(s))
    if r.hint == "retry-after-date":
        # HTTP dates have whole seconds: round up, so that it is never early.
        out["retry-after"] = format_datetime(at + timedelta(seconds=1), usegmt=True)
    if r.hint in ("all", "reset"):
        if dialect == "openai":
            out |= {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": _go_duration(s),
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "6ms",
            }
        else:
            out |= {
                "anthropic-ratelimit-requests-limit": "60",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": at.isoformat().replace("+00:00", "Z"),
                "anthropic-ratelimit-tokens-limit": "150000",
                "anthropic-ratelimit-tokens-remaining": "149000",
                "anthropic-ratelimit-tokens-reset": datetime.now(UTC).isoformat(),
            }
    if r.hint == "all" and dialect == "openai":
        out["retry-after-ms"] = str(round(s * 1000))
    return out


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
