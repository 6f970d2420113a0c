"""Providers through the real openai and anthropic SDKs against the simulator over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from stormline.consumers.llm import CompletionRequest, ErrorKind, LLMProvider, ProviderError
from stormline.consumers.llm.agents import ProviderConfig
from stormline.consumers.llm.providers import TRANSPORTS, Transport, make_provider
from stormline.consumers.llm.resilience import (
    CallOutcome,
    CircuitBreaker,
    RetryPolicy,
    call_with_policy,
)
from stormline.consumers.llm.simulation import ModelProfile, SimConfig
from stormline.consumers.llm.simulator import ServerThread, Simulator
from tests.conftest import free_port

KEY_VAR = "STORMLINE_TEST_PROVIDER_KEY"
KEY = "fakekey-provider-7f3a9c2e"


@pytest.fixture
def sim() -> Iterator[ServerThread]:
    cfg = SimConfig(
        seed=3,
        models={
            "sim-perfect": ModelProfile(skill={"*": 1.0}),
            "sim-hopeless": ModelProfile(skill={"*": 0.0}),
        },
    )
    with ServerThread(Simulator(cfg).app(), free_port()) as server:
        yield server


def _cfg(
    sim: ServerThread, provider: str, model: str = "sim-perfect", **kw: object
) -> ProviderConfig:
    base = f"{sim.url}/v1" if provider == "openai" else sim.url
    return ProviderConfig(
        provider=provider,
        model=model,
        base_url=base,
        api_key_env=KEY_VAR,
        **kw,  # type: ignore[arg-type]
    )


def _req(
    model: str = "sim-perfect", prompt: str = "[type=math] What is 17 + 25?", **kw: object
) -> CompletionRequest:
    return CompletionRequest(
        agent_id="a", model=model, prompt=prompt, system_prompt="Be exact.", **kw
    )  # type: ignore[arg-type]


def _fault(sim: ServerThread, **body: object) -> None:
    httpx.post(f"{sim.url}/admin/faults", json=body).raise_for_status()


def _stats(sim: ServerThread) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{sim.url}/admin/stats").json()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_completion_through_the_official_sdk(
    sim: ServerThread, provider: str, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    monkeypatch.setenv(KEY_VAR, KEY)
    p = make_provider(
        _cfg(sim, provider, price_in_per_mtok=1000, price_out_per_mtok=2000), transport=transport
    )
    try:
        c = await p.complete(_req())
        assert c.output == "42" and c.provider == provider and c.model == "sim-perfect"
        assert [s.role for s in c.steps] == ["system", "user", "assistant"]
        assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens == 1
        assert c.usage.cost_usd == pytest.approx(
            (c.usage.prompt_tokens * 1000 + c.usage.completion_tokens * 2000) / 1e6
        )
        wrong = await p.complete(_req(model="sim-hopeless"))
        assert wrong.output == "43"  # the simulator's near miss
    finally:
        await p.aclose()
    # The key travelled in the request header (the simulator keeps only a hash of it).
    digest = hashlib.sha256(KEY.encode()).hexdigest()[:16]
    assert _stats(sim)["credential_sha256_16"] == {digest: 2}


async def test_openai_logprobs_and_token_ids_are_recorded(sim: ServerThread) -> None:
    p = make_provider(
        ProviderConfig(provider="openai", model="sim-perfect", base_url=f"{sim.url}/v1")
    )
    try:
        c = await p.complete(_req(prompt="Reverse: abc def", logprobs=True))
    finally:
        await p.aclose()
    step = c.steps[-1]
    assert c.output == "fed cba"
    assert step.token_ids is not None and len(step.token_ids) == 2
    assert step.logprobs is not None and len(step.logprobs) == 2
    assert all(lp <= 0 for lp in step.logprobs)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("429", ErrorKind.RATE_LIMIT),
        ("500", ErrorKind.SERVER),
        ("503", ErrorKind.SERVER),
        ("400", ErrorKind.CLIENT),
        ("hang", ErrorKind.TIMEOUT),
    ],
)
async def test_sdk_errors_map_to_provider_error_kinds(
    sim: ServerThread,
    provider: str,
    transport: Transport,
    fault: str,
    kind: ErrorKind,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    _fault(sim, kind=fault, count=1, hang_s=3)
    p = make_provider(_cfg(sim, provider), transport=transport)
    try:
        with pytest.raises(ProviderError) as ei:
            await p.complete(_req(timeout_s=0.3))
    finally:
        await p.aclose()
    assert ei.value.kind is kind
    assert ei.value.retry_after_s is None  # a bare 429 says nothing about when
    assert KEY not in str(ei.value)
    assert _stats(sim)["requests"] == 1  # SDK retries are off: retries are ours


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("hint", "seconds"),
    [
        ("all", {"openai": 2.5, "anthropic": 3.0}),  # retry-after-ms / whole retry-after
        ("retry-after", {"openai": 3.0, "anthropic": 3.0}),  # whole seconds, rounded up
        ("retry-after-date", {"openai": 3.5, "anthropic": 3.5}),  # HTTP date: 2.5 to 3.5 s
        ("reset", {"openai": 2.5, "anthropic": 2.5}),  # the exhausted limit's reset alone
    ],
)
async def test_a_429_tells_when_to_retry_through_the_sdk_headers(
    sim: ServerThread,
    provider: str,
    hint: str,
    seconds: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    _fault(sim, kind="429", count=1, retry_after_s=2.5, hint=hint)
    p = make_provider(_cfg(sim, provider))
    try:
        with pytest.raises(ProviderError) as ei:
            await p.complete(_req())
    finally:
        await p.aclose()
    assert ei.value.kind is ErrorKind.RATE_LIMIT and ei.value.status == 429
    got = ei.value.rate_limit_hint
    assert got is not None and 2.3 <= got <= seconds[provider]  # (dates: whole seconds)
    assert "retry in" in str(ei.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connection_refused_is_a_server_error(transport: Transport) -> None:
    cfg = ProviderConfig(
        provider="openai", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1"
    )
    p = make_provider(cfg, transport=transport)
    try:
        with pytest.raises(ProviderError) as ei:
            await p.complete(_req(timeout_s=2))
    finally:
        await p.aclose()
    assert ei.value.kind is ErrorKind.SERVER and ei.value.retryable


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_retry_policy_rides_out_transient_faults(
    sim: ServerThread, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    _fault(sim, kind="429", count=1)
    _fault(sim, kind="500", count=1)
    p = make_provider(_cfg(sim, provider))
    out = CallOutcome()
    try:
        c = await call_with_policy(
            lambda: p.complete(_req()),
            policy=RetryPolicy(3, 0.01, 0.05),
            breaker=CircuitBreaker(threshold=10),
            timeout_s=2,
            outcome=out,
        )
    finally:
        await p.aclose()
    assert c.output == "42" and out.tries == 3
    assert _stats(sim)["faults_served"] == {"429": 1, "500": 1}


async def test_simulator_serves_concurrent_requests(sim: ServerThread) -> None:
    p = make_provider(
        ProviderConfig(provider="openai", model="sim-perfect", base_url=f"{sim.url}/v1")
    )
    try:
        outs = await asyncio.gather(
            *(p.complete(_req(prompt=f"What is {i} + {i}?")) for i in range(50))
        )
    finally:
        await p.aclose()
    assert [o.output for o in outs] == [str(2 * i) for i in range(50)]
    async with httpx.AsyncClient() as c:
        models = (await c.get(f"{sim.url}/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {"sim-perfect", "sim-hopeless"}


# ------------------------------------------------------------ in-process simulated --
def _sim_provider(tmp_path: Path, **profile: object) -> LLMProvider:
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "default": profile}))
    return make_provider(ProviderConfig(provider="simulated", model="sim-x", simulator_config=path))


async def test_simulated_provider_answers_by_skill_in_process(tmp_path: Path) -> None:
    right = _sim_provider(tmp_path, skill={"*": 1.0})
    c = await right.complete(_req("sim-x", "What is 17 + 25?"))
    assert (c.output, c.provider, c.model) == ("42", "simulated", "sim-x")
    assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens == 1
    assert [s.role for s in c.steps] == ["system", "user", "assistant"]
    wrong = _sim_provider(tmp_path, skill={"*": 0.0})
    assert (await wrong.complete(_req("sim-x", "Reverse: stormline"))).output != "enilmrots"


async def test_simulated_provider_errors_and_timeouts_are_provider_errors(tmp_path: Path) -> None:
    failing = _sim_provider(tmp_path, error_rate=1.0)
    with pytest.raises(ProviderError) as e:
        await failing.complete(_req("sim-x", "What is 1 + 1?"))
    assert e.value.kind is ErrorKind.SERVER and e.value.status == 500
    slow = _sim_provider(tmp_path, latency_ms=5000)
    with pytest.raises(ProviderError) as e:
        await slow.complete(_req("sim-x", "What is 1 + 1?", timeout_s=0.2))
    assert e.value.kind is ErrorKind.TIMEOUT
