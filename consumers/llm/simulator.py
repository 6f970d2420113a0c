"""A simulated LLM server for offline runs: OpenAI- and Anthropic-compatible HTTP.

``stormline simulate-llm`` serves ``POST /v1/chat/completions``, ``GET /v1/models`` and
Anthropic's ``POST /v1/messages``, so agents reach it through the real SDKs by base_url.
It is never a silent fallback: an agent uses it only when its base_url says so, or, in
process and without HTTP, when its provider is ``simulated`` (``consumers/providers``).

Grading convention (how the simulator knows the right answer): verifiable demo tasks are
*solvable by a deterministic solver*. A prompt may start with a tag ``[type=NAME]``; NAME is
the task type (it selects the skill row). The simulator then solves the prompt's text:

* ``math``    "What is 17 + 25?"           -> ``42``  (one ``a op b``, op in + - *)
* ``reverse`` "Reverse: stormline"          -> ``enilmrots``
* ``upper``   "Uppercase: hello world"      -> ``HELLO WORLD``
* ``sort``    "Sort: 3, 1, 2"               -> ``1, 2, 3`` (numbers numerically, else text)

Without a tag, the first solver whose pattern matches names the type. A task's ``expected``
is the solver's answer, so producers generate demo tasks with the same rules
(:func:`solve` is importable). With probability ``skill[model][type]`` the reply is the
right answer, otherwise a deterministic near miss. Prompts no solver understands get a
generic reply (type ``*``).

Configuration (YAML or JSON, ``--config``)::

    seed: 7
    default: {skill: {"*": 0.6}, latency_ms: 0, jitter_ms: 0, error_rate: 0.0}
    models:
      sim-math: {skill: {math: 0.95, "*": 0.4}, latency_ms: 200, jitter_ms: 50}

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
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


# ----------------------------------------------------------------------- solvers --
def _math(text: str) -> str | None:
    m = re.search(r"(-?\d+)\s*([+\-*])\s*(-?\d+)", text)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _after_colon(text: str, word: str) -> str | None:
    m = re.search(rf"\b{word}\w*\b[^:\n]*:\s*(.+?)\s*$", text, re.I | re.S)
    return m.group(1) if m else None


def _reverse(text: str) -> str | None:
    body = _after_colon(text, "reverse")
    return body[::-1] if body is not None else None


def _upper(text: str) -> str | None:
    body = _after_colon(text, "upper")
    return body.upper() if body is not None else None


def _sort(text: str) -> str | None:
    body = _after_colon(text, "sort")
    if body is None:
        return None
    items = [x.strip() for x in body.split(",") if x.strip()]
    try:
        ordered = [str(n) for n in sorted(int(x) for x in items)]
    except ValueError:
        ordered = sorted(items)
    return ", ".join(ordered)


SOLVERS: dict[str, Callable[[str], str | None]] = {
    "math": _math,
    "reverse": _reverse,
    "upper": _upper,
    "sort": _sort,
}
_TAG = re.compile(r"^\s*\[type=([A-Za-z0-9_.-]+)\]\s*")


def solve(prompt: str) -> tuple[str, str | None]:
    """(task type, right answer or None) for a prompt, by the convention above."""
    tag = _TAG.match(prompt)
    body = prompt[tag.end() :] if tag else prompt
    if tag:
        name = tag.group(1)
        solver = SOLVERS.get(name)
        if solver is not None:
            return name, solver(body)
        return name, next((a for f in SOLVERS.values() if (a := f(body)) is not None), None)
    for name, solver in SOLVERS.items():
        answer = solver(body)
        if answer is not None:
            return name, answer
    return "*", None


def near_miss(answer: str) -> str:
    """A deterministic wrong answer that no normalising verifier accepts."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    if ", " in answer:
        return ", ".join(reversed(answer.split(", "))) + ", 0"
    return answer[1:] + answer[:1] + "?" if len(answer) > 1 else answer + "?"


# ------------------------------------------------------------------------ config --
class ModelProfile(BaseModel):
    skill: dict[str, float] = Field(default_factory=lambda: {"*": 0.7})
    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    def p_correct(self, task_type: str) -> float:
        return self.skill.get(task_type, self.skill.get("*", 0.7))


class SimConfig(BaseModel):
    seed: int | None = None
    default: ModelProfile = Field(default_factory=ModelProfile)
    models: dict[str, ModelProfile] = Field(default_factory=dict)

    def profile(self, model: str) -> ModelProfile:
        return self.models.get(model, self.default)


# The skill table behind the example agents.yaml; a --config file replaces it.
DEFAULT_CONFIG = SimConfig(
    default=ModelProfile(skill={"*": 0.6}),
    models={
        "sim-generalist": ModelProfile(skill={"*": 0.7}),
        "sim-math": ModelProfile(skill={"math": 0.95, "*": 0.35}),
        "sim-text": ModelProfile(skill={"reverse": 0.95, "upper": 0.97, "sort": 0.9, "*": 0.3}),
        "sim-intern": ModelProfile(skill={"*": 0.45}),
        "sim-expert": ModelProfile(skill={"*": 0.9}, latency_ms=50, jitter_ms=20),
    },
)


def load_config(path: Path | str | None) -> SimConfig:
    if path is None:
        return DEFAULT_CONFIG.model_copy(deep=True)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: simulator config not found")
    return SimConfig.model_validate(yaml.safe_load(p.read_text(encoding="utf-8")) or {})


# ------------------------------------------------------------------------- state --
@dataclass
class Fault:
    kind: str
    remaining: int | None = None
    until: float | None = None
    model: str | None = None
    hang_s: float = 3600.0

    def active(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        return not (self.until is not None and now > self.until)


@dataclass
class SimState:
    config: SimConfig
    rng: random.Random = field(default_factory=random.Random)
    faults: list[Fault] = field(default_factory=list)
    requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)
    credentials: Counter[str] = field(default_factory=Counter)
    faults_served: Counter[str] = field(default_factory=Counter)

    def take_fault(self, model: str) -> Fault | None:
        now = time.monotonic()
        for f in self.faults:
            if f.active(now) and (f.model is None or f.model == model):
                if f.remaining is not None:
                    f.remaining -= 1
                self.faults_served[f.kind] += 1
                return f
        return None


@dataclass(frozen=True)
class Reply:
    """What the simulated model does with one prompt, before any transport."""

    status: int  # 200, or the HTTP error status
    text: str  # the answer, or the error message
    task_type: str = "*"
    p: float = 0.5  # probability of the answer given (logprobs are derived from it)
    delay_s: float = 0.0


def reply(st: SimState, model: str, prompt: str) -> Reply:
    """Decide one reply: fault, latency, error rate, then a right answer or a near miss."""
    st.requests += 1
    st.by_model[model] += 1
    st.by_prompt[prompt] += 1
    profile = st.config.profile(model)
    fault = st.take_fault(model)
    if fault is not None:
        if fault.kind == "hang":
            # Clients time out long before; should one wait, it gets a gateway timeout.
            return Reply(504, "simulated hang", delay_s=fault.hang_s)
        return Reply(int(fault.kind), f"simulated fault {fault.kind}")
    delay = 0.0
    if profile.latency_ms or profile.jitter_ms:
        delay = max(0.0, st.rng.gauss(profile.latency_ms, profile.jitter_ms)) / 1000
    if profile.error_rate and st.rng.random() < profile.error_rate:
        return Reply(500, "simulated server error", delay_s=delay)
    task_type, right = solve(prompt)
    if right is None:
        return Reply(200, f"(simulated {model}) I read: {prompt[:80]}", delay_s=delay)
    p = profile.p_correct(task_type)
    correct = st.rng.random() < p
    text = right if correct else near_miss(right)
    return Reply(200, text, task_type, p if correct else 1 - p, delay)


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text) or [text]


def _token_id(tok: str) -> int:
    return int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=3).digest(), "big") % 100_000


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
                        "token": f"token_id:{_token_id(t)}",
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
