"""Provider rate limits for real: 429s with Retry-After and the providers' rate-limit headers
through the official openai and anthropic SDKs against the simulator, the budget every worker
shares in Redis (requests/s, tokens/minute, 429 holds), and one worker end to end on Kafka.

"Workers" here are what a worker process holds: its own RedisState (own connection pool),
its own rate-limit stage and its own SDK clients; they share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from stormline.consumers.llm import Completion, CompletionRequest, LLMProvider
from stormline.consumers.llm.agents import ProviderConfig, parse_registry
from stormline.consumers.llm.providers import make_provider
from stormline.consumers.llm.ratelimits import estimate_tokens
from stormline.consumers.llm.resilience import CircuitBreaker, RetryPolicy
from stormline.consumers.llm.simulation import ModelProfile, SimConfig
from stormline.consumers.llm.simulator import ServerThread, Simulator
from stormline.consumers.worker.service import Worker
from stormline.consumers.worker.stages import GuardedCall, RateLimit
from stormline.consumers.worker.stats import WorkerStats
from stormline.schemas.catalog import TRAJECTORIES
from stormline.schemas.kafka import EventConsumer, EventProducer
from stormline.schemas.models import AssignedTask, PolicyKind, TaskAssigned, TrajectoryStatus
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import RedisState, key_prefix
from tests.conftest import free_port

PROMPT = "[type=math] What is 1 + 2?"


@pytest.fixture
def sim() -> Iterator[ServerThread]:
    cfg = SimConfig(
        seed=5,
        models={
            "sim-a": ModelProfile(skill={"*": 1.0}),
            # A provider that allows 10 requests a second (a bucket of 10), like a real one.
            "sim-busy": ModelProfile(skill={"*": 1.0}, requests_per_s=10, rate_limit_hint="reset"),
        },
    )
    with ServerThread(Simulator(cfg).app(), free_port()) as server:
        yield server


@pytest.fixture
async def states(settings: Settings) -> AsyncIterator[tuple[RedisState, RedisState]]:
    a, b = RedisState(settings), RedisState(settings)
    yield a, b
    await a.aclose()
    await b.aclose()


def _cfg(sim: ServerThread, provider: str = "openai", **kw: Any) -> ProviderConfig:
    base = f"{sim.url}/v1" if provider == "openai" else sim.url
    return ProviderConfig(provider=provider, model="sim-a", base_url=base, **kw)


def _req(cfg: ProviderConfig, prompt: str = PROMPT) -> CompletionRequest:
    return CompletionRequest(
        agent_id="a", model=cfg.model, prompt=prompt, max_tokens=cfg.max_tokens, timeout_s=5
    )


def _fault(sim: ServerThread, **body: object) -> None:
    httpx.post(f"{sim.url}/admin/faults", json=body).raise_for_status()


def _timeline(sim: ServerThread) -> list[tuple[float, int, str]]:
    """(arrival, status, prompt) of each request the simulator saw, oldest first."""
    rows = httpx.get(f"{sim.url}/admin/stats").json()["timeline"]
    return [(t, status, prompt) for t, _model, status, prompt in rows]


class _Worker:
    """The rate-limit and call stages of one worker, as the pipeline strings them."""

    def __init__(self, state: RedisState, cfg: ProviderConfig, **limits: dict[str, float]) -> None:
        self.cfg = cfg
        self.provider: LLMProvider = make_provider(cfg)
        self.rate_limit = RateLimit(state, limits.get("rps", {}), limits.get("tpm", {}))
        # One try only: a 429 that burnt it would fail the call.
        self.call = GuardedCall(
            RetryPolicy(1, 0, 0), {cfg.key: CircuitBreaker(threshold=1)}, WorkerStats()
        )

    async def complete(self, prompt: str = PROMPT) -> Completion:
        req = _req(self.cfg, prompt)
        throttle = self.rate_limit.throttle(self.cfg, req)
        expires = datetime.now(UTC) + timedelta(seconds=60)
        comp = await self.call(self.cfg, self.provider, req, expires, throttle)
        await throttle.settle(comp)
        return comp


# ------------------------------------------------------------- the budget in Redis --
async def test_token_budget_arithmetic_on_redis(states: tuple[RedisState, RedisState]) -> None:
    a, b = states
    key = f"openai@{uuid.uuid4().hex[:6]}"
    # 600 tokens/minute: 10 a second, a bucket of one minute's worth; a and b share it.
    assert await a.take_budget(key, tpm=600, tokens=400) == 0
    assert await b.take_budget(key, tpm=600, tokens=195) == 0
    wait = await a.take_budget(key, tpm=600, tokens=105)  # ~5 left: ~100 missing at 10/s
    assert 9.0 < wait <= 10.0
    assert await b.take_budget(key, tpm=600, tokens=-300, take=False) == 0  # a refund
    assert await a.take_budget(key, tpm=600, tokens=105) == 0
    await b.take_budget(key, tpm=600, tokens=300, take=False)  # an answer used more: charged
    wait = await a.take_budget(key, tpm=600, tokens=10)
    assert 10.5 < wait <= 11.0  # ~305 - 105 - 300 = ~-100 left: ~110 missing
    # A request larger than the whole budget waits for a full bucket, not forever.
    other = f"openai@{uuid.uuid4().hex[:6]}"
    assert await a.take_budget(other, tpm=600, tokens=900) == 0
    assert 89.0 < await b.take_budget(other, tpm=600, tokens=900) <= 90.0  # from -300 to 600


async def test_a_hold_stops_every_worker_and_only_grows(
    states: tuple[RedisState, RedisState],
) -> None:
    a, b = states
    key = f"openai@{uuid.uuid4().hex[:6]}"
    assert await b.take_budget(key, rps=100) == 0
    held = await a.take_budget(key, rps=100, hold_s=5, take=False)
    assert 4.9 < held <= 5.0
    assert 4.8 < await b.take_budget(key, rps=100) <= 5.0  # b takes nothing before it ends
    assert 4.8 < await b.take_budget(key, hold_s=1, take=False) <= 5.0  # a shorter one: no-op
    # Requests per second as before: a burst of max(rps, 1), then 1/rps apart.
    rps_key = f"openai@{uuid.uuid4().hex[:6]}"
    assert [await a.take_budget(rps_key, rps=2) for _ in range(2)] == [0.0, 0.0]
    assert 0.4 < await b.take_budget(rps_key, rps=2) <= 0.5


# --------------------------------------------------------- 429s through the SDKs --
@pytest.mark.parametrize(
    ("provider", "hint", "at_least_s"),
    [
        ("openai", "all", 1.2),  # retry-after-ms 1200 (retry-after says 2)
        ("openai", "reset", 1.2),  # only x-ratelimit-remaining-requests: 0, reset 1.2s
        ("openai", "retry-after-date", 1.2),  # an HTTP date (whole seconds, rounded up)
        ("anthropic", "all", 2.0),  # retry-after 2 (whole seconds) beside the RFC 3339 reset
        ("anthropic", "reset", 1.2),  # only anthropic-ratelimit-requests-*: the RFC 3339 reset
    ],
)
async def test_a_429_with_retry_after_is_honoured_and_the_try_still_succeeds(
    sim: ServerThread,
    states: tuple[RedisState, RedisState],
    provider: str,
    hint: str,
    at_least_s: float,
) -> None:
    _fault(sim, kind="429", count=1, retry_after_s=1.2, hint=hint)
    w = _Worker(states[0], _cfg(sim, provider))
    try:
        comp = await w.complete()
    finally:
        await w.provider.aclose()
    assert comp.output == "3"
    (t429, s1, _), (t200, s2, _) = _timeline(sim)
    assert (s1, s2) == (429, 200)
    assert t200 - t429 >= at_least_s  # the retry came after the wait it was asked for
    assert w.call.breakers[w.cfg.key].state == "closed"  # threshold 1, and not opened


async def test_two_workers_share_the_wait_a_429_asked_for(
    sim: ServerThread, settings: Settings, states: tuple[RedisState, RedisState]
) -> None:
    cfg = _cfg(sim)
    limits = {"rps": {"openai": 1000.0}}  # a budget far above this test's rate
    a, b = _Worker(states[0], cfg, **limits), _Worker(states[1], cfg, **limits)
    _fault(sim, kind="429", count=1, retry_after_s=2.0, hint="all")
    budget = f"{key_prefix(settings)}budget:{cfg.key}"
    r = redis.Redis.from_url(settings.redis_address)
    try:
        first = asyncio.create_task(a.complete("What is 2 + 2?"))
        # A positive sign that a's 429 pushed the shared budget back, before b starts.
        deadline = time.monotonic() + 10
        while not float(r.hget(budget, "until") or 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert float(r.hget(budget, "until") or 0), "the 429 never reached Redis"
        second = await b.complete("What is 3 + 3?")
        assert (await first).output == "4" and second.output == "6"
    finally:
        await a.provider.aclose()
        await b.provider.aclose()
        r.close()
    timeline = _timeline(sim)
    assert [s for _, s, _ in timeline] == [429, 200, 200]  # b never got a 429 of its own
    t429 = timeline[0][0]
    assert all(t - t429 >= 2.0 for t, _, _ in timeline[1:])  # b waited as long as a


async def test_the_tokens_per_minute_budget_throttles_every_worker(
    sim: ServerThread, states: tuple[RedisState, RedisState]
) -> None:
    cfg = _cfg(sim, max_tokens=24)
    per_call = estimate_tokens(PROMPT, "", 24)
    assert per_call == 31
    tpm = 60.0 * per_call  # a bucket of 60 calls, refilled at one call a second
    limits = {"tpm": {cfg.key: tpm}}
    workers = [_Worker(states[0], cfg, **limits), _Worker(states[1], cfg, **limits)]
    n = 64  # 4 calls beyond the bucket: the last cannot go before 4 s
    start = time.monotonic()
    try:
        outs = await asyncio.gather(*(workers[i % 2].complete() for i in range(n)))
    finally:
        for w in workers:
            await w.provider.aclose()
    assert [c.output for c in outs] == ["3"] * n
    # An answer that used less than its reservation is not refunded (the providers count
    # max_tokens up front too): each call cost exactly its estimate.
    assert all(c.usage.prompt_tokens + c.usage.completion_tokens < per_call for c in outs)
    arrivals = sorted(t for t, status, _ in _timeline(sim) if status == 200)
    assert len(arrivals) == n
    # What arrived by any moment never exceeds the bucket plus what refilled since the start.
    for i, t in enumerate(arrivals, start=1):
        assert i * per_call <= tpm + (t - start) * tpm / 60 + 1e-6, (i, t - start)
    assert arrivals[-1] - start >= 4.0


async def test_a_budget_below_the_providers_limit_is_never_refused(
    sim: ServerThread, states: tuple[RedisState, RedisState]
) -> None:
    cfg = _cfg(sim).model_copy(update={"model": "sim-busy"})
    limits = {"rps": {cfg.key: 5.0}}  # half the simulated provider's 10/s
    workers = [_Worker(states[0], cfg, **limits), _Worker(states[1], cfg, **limits)]
    start = time.monotonic()
    try:
        outs = await asyncio.gather(*(workers[i % 2].complete() for i in range(15)))
    finally:
        for w in workers:
            await w.provider.aclose()
    assert [c.output for c in outs] == ["3"] * 15
    timeline = _timeline(sim)
    assert [st for _, st, _ in timeline] == [200] * 15  # no 429 at all
    assert timeline[-1][0] - start >= (15 - 5) / 5.0  # a burst of 5, then 5 a second


async def test_without_a_budget_a_worker_rides_the_providers_429s_with_one_try_each(
    sim: ServerThread, states: tuple[RedisState, RedisState]
) -> None:
    cfg = _cfg(sim).model_copy(update={"model": "sim-busy"})
    w = _Worker(states[0], cfg)  # no budget configured: only what the 429s say
    try:
        outs = await asyncio.gather(*(w.complete() for _ in range(25)))
    finally:
        await w.provider.aclose()
    assert [c.output for c in outs] == ["3"] * 25  # over the provider's burst, none failed
    statuses = [st for _, st, _ in _timeline(sim)]
    # How many 429s depends on how fast the calls go out; at least one must have come.
    assert statuses.count(200) == 25 and statuses.count(429) >= 1


# ------------------------------------------------------------- one worker on Kafka --
def _assignment(task_id: str, prompt: str) -> TaskAssigned:
    now = datetime.now(UTC)
    return TaskAssigned(
        task_id=task_id,
        attempt=1,
        agent_id="limited",
        policy=PolicyKind.EXPLORE,
        assigned_at=now,
        expires_at=now + timedelta(minutes=5),
        task=AssignedTask(task_id=task_id, task_type="math", prompt=prompt, occurred_at=now),
    )


def test_a_worker_rides_out_a_429_without_burning_its_only_try(
    topics: Settings, serde: Serde, sim: ServerThread
) -> None:
    s = topics.model_copy(
        update={
            "llm_retry_attempts": 1,
            "breaker_failure_threshold": 1,
            "provider_token_limits": {"openai": 100_000.0},
            "worker_heartbeat_interval_s": 0.5,
            "worker_commit_interval_s": 0.2,
        }
    )
    registry = parse_registry(
        {
            "agents": [
                {
                    "id": "limited",
                    "provider": "openai",
                    "model": "sim-a",
                    "base_url": f"{sim.url}/v1",
                    "timeout_s": 5,
                }
            ]
        }
    )
    _fault(sim, kind="429", count=2, retry_after_s=1.0, hint="retry-after")
    events = [_assignment(f"r{i}", f"What is {i} + 1?") for i in range(3)]
    producer = EventProducer(s, serde)
    producer.publish(events)
    producer.close()
    worker = Worker(s, registry, "w-429", serde=serde)
    stats = asyncio.run(asyncio.wait_for(worker.run(until=lambda w: w.stats.processed >= 3), 60))
    assert stats.processed == 3 and stats.errors == 0
    c = EventConsumer(s, serde, f"{s.topic_prefix}reader", [TRAJECTORIES])
    trajs: list[Any] = []
    deadline = time.monotonic() + 30
    try:
        while len(trajs) < 3 and time.monotonic() < deadline:
            trajs += [r.event for r in c.poll_batch(100, 0.3)]
    finally:
        c.close()
    assert sorted((t.task_id, t.status, t.output) for t in trajs) == [
        (f"r{i}", TrajectoryStatus.OK, str(i + 1)) for i in range(3)
    ]
    timeline = _timeline(sim)
    statuses = [st for _, st, _ in timeline]
    assert statuses.count(429) == 2 and statuses.count(200) == 3
    # Each 429'd task went again only after the second it was asked to wait (retry-after: 1);
    # one task may get both 429s (its retry met the second), and still its only try succeeded.
    rate_limited = {prompt: t for t, st, prompt in timeline if st == 429}  # the latest each
    for t, st, prompt in timeline:
        if st == 200 and prompt in rate_limited:
            assert t - rate_limited[prompt] >= 1.0, prompt
