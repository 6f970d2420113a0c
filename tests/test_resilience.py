"""Unit tests of pure logic: retry policy, 429 waits, circuit breaker, offset tracking, agent
registry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stormline.consumers.llm import ErrorKind, ProviderError
from stormline.consumers.llm.agents import AgentConfigError, load_registry, parse_registry
from stormline.consumers.llm.resilience import (
    BreakerState,
    CallOutcome,
    CircuitBreaker,
    RetryPolicy,
    call_with_policy,
)
from stormline.runtime.commits import OffsetTracker
from stormline.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.5, max_s=3.0)
    # The wait after the n-th consecutive failure (stormline.runtime.retry counts from 1).
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (7, 3.0)]:
        delays = [policy.backoff(failures) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the range, not a constant
        assert min(delays) < ceiling * 0.2


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_success()  # a success resets the consecutive count
    for _ in range(3):
        b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()  # the probe failed: open again for a full cool-down
    assert b.state is BreakerState.OPEN
    clock.now = 20.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


async def _no_sleep(_: float) -> None:
    return None


async def test_retries_retryable_errors_then_succeeds() -> None:
    calls: list[int] = []
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)

    async def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ProviderError(ErrorKind.RATE_LIMIT, "429", 429)
        return "ok"

    out = CallOutcome()
    b = CircuitBreaker(threshold=10)
    result = await call_with_policy(
        fn, policy=RetryPolicy(3, 0.1, 1), breaker=b, timeout_s=1, outcome=out, sleep=sleep
    )
    assert result == "ok" and out.tries == 3 and len(slept) == 2
    assert all(0 <= d <= 0.2 for d in slept)
    assert b.state is BreakerState.CLOSED


async def test_gives_up_after_attempts_and_does_not_retry_client_errors() -> None:
    calls = 0

    async def server_error() -> str:
        nonlocal calls
        calls += 1
        raise ProviderError(ErrorKind.SERVER, "500", 500)

    out = CallOutcome()
    with pytest.raises(ProviderError) as ei:
        await call_with_policy(
            server_error,
            policy=RetryPolicy(4, 0, 0),
            breaker=CircuitBreaker(threshold=100),
            timeout_s=1,
            outcome=out,
            sleep=_no_sleep,
        )
    assert ei.value.kind is ErrorKind.SERVER and calls == 4 and len(out.errors) == 4

    calls = 0

    async def client_error() -> str:
        nonlocal calls
        calls += 1
        raise ProviderError(ErrorKind.CLIENT, "400", 400)

    b = CircuitBreaker(threshold=1)
    with pytest.raises(ProviderError) as ei:
        await call_with_policy(
            client_error, policy=RetryPolicy(4, 0, 0), breaker=b, timeout_s=1, sleep=_no_sleep
        )
    assert ei.value.kind is ErrorKind.CLIENT and calls == 1
    assert b.state is BreakerState.CLOSED  # a 4xx says nothing about provider health


async def test_per_try_timeout_is_a_retryable_timeout() -> None:
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return "late"

    with pytest.raises(ProviderError) as ei:
        await call_with_policy(
            slow,
            policy=RetryPolicy(2, 0, 0),
            breaker=CircuitBreaker(threshold=100),
            timeout_s=0.05,
            sleep=_no_sleep,
        )
    assert ei.value.kind is ErrorKind.TIMEOUT and calls == 2


async def test_open_breaker_fails_fast_without_calling() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=2, cooldown_s=30, clock=clock)
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        raise ProviderError(ErrorKind.SERVER, "503", 503)

    with pytest.raises(ProviderError):
        await call_with_policy(
            failing, policy=RetryPolicy(5, 0, 0), breaker=b, timeout_s=1, sleep=_no_sleep
        )
    assert calls == 2  # the breaker opened after two and stopped the third try
    with pytest.raises(ProviderError) as ei:
        await call_with_policy(
            failing, policy=RetryPolicy(5, 0, 0), breaker=b, timeout_s=1, sleep=_no_sleep
        )
    assert ei.value.kind is ErrorKind.CIRCUIT_OPEN and calls == 2


def _hinted(seconds: float) -> ProviderError:
    return ProviderError(ErrorKind.RATE_LIMIT, "429", 429, retry_after_s=seconds)


class FakeThrottle:
    """Records what the policy asks of the shared budget; ``shared`` is what others pushed."""

    def __init__(self, shared: float = 0.0) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.shared = shared

    async def acquire(self, deadline: float | None) -> None:
        self.calls.append(("acquire", deadline))

    async def hold(self, seconds: float) -> float:
        self.calls.append(("hold", seconds))
        return max(seconds, self.shared)


async def test_a_429_that_says_when_waits_and_burns_no_try() -> None:
    calls = 0
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise _hinted(1.5)
        return "ok"

    out = CallOutcome()
    b = CircuitBreaker(threshold=1)  # one counted failure would open it
    throttle = FakeThrottle()
    result = await call_with_policy(
        fn,
        policy=RetryPolicy(1, 0, 0),  # a single try: a burnt one would fail the call
        breaker=b,
        timeout_s=1,
        outcome=out,
        sleep=sleep,
        throttle=throttle,
        deadline=100.0,
        clock=lambda: 0.0,
    )
    assert result == "ok" and calls == 3 and slept == [1.5, 1.5]
    assert (out.tries, out.rate_limited, out.waited_s, out.errors) == (3, 2, 3.0, [])
    assert b.state is BreakerState.CLOSED  # busy is not down
    # The budget is asked before every request and told of every wait.
    assert throttle.calls == [
        ("acquire", 100.0),
        ("hold", 1.5),
        ("acquire", 100.0),
        ("hold", 1.5),
        ("acquire", 100.0),
    ]


async def test_a_429_waits_as_long_as_the_shared_budget_says() -> None:
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)

    results = iter([_hinted(1.0), "ok"])

    async def fn() -> str:
        r = next(results)
        if isinstance(r, ProviderError):
            raise r
        return r

    await call_with_policy(
        fn,
        policy=RetryPolicy(1, 0, 0),
        breaker=CircuitBreaker(),
        timeout_s=1,
        sleep=sleep,
        throttle=FakeThrottle(shared=4.0),  # another worker's 429 asked for longer
    )
    assert slept == [4.0]


async def test_a_429_wait_past_the_deadline_fails_final_without_retrying() -> None:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        raise _hinted(30.0)

    out = CallOutcome()
    with pytest.raises(ProviderError) as ei:
        await call_with_policy(
            fn,
            policy=RetryPolicy(5, 0, 0),
            breaker=CircuitBreaker(),
            timeout_s=1,
            outcome=out,
            sleep=_no_sleep,
            deadline=10.0,
            clock=lambda: 0.0,
        )
    assert calls == 1 and ei.value.kind is ErrorKind.RATE_LIMIT and ei.value.final
    assert not ei.value.retryable and ei.value.rate_limit_hint is None
    assert "after the assignment expires" in out.errors[-1]


async def test_a_bare_429_is_a_retryable_error_that_burns_tries() -> None:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        raise ProviderError(ErrorKind.RATE_LIMIT, "429", 429)  # no headers: no hint

    out = CallOutcome()
    with pytest.raises(ProviderError):
        await call_with_policy(
            fn,
            policy=RetryPolicy(3, 0, 0),
            breaker=CircuitBreaker(threshold=100),
            timeout_s=1,
            outcome=out,
            sleep=_no_sleep,
            throttle=FakeThrottle(),
        )
    assert calls == 3 and out.tries == 3 and out.rate_limited == 0


def test_offset_tracker_commits_only_contiguous_completed_work() -> None:
    t = OffsetTracker()
    tp = ("assignments", 0)
    for off in range(10, 15):
        t.started(tp, off)
    t.polled(tp, 15)
    assert t.committable() == {tp: 10}
    for off in (11, 12, 14):  # finished out of order; 10 and 13 still running
        t.done(tp, off)
    assert t.committable() == {tp: 10}
    t.done(tp, 10)
    assert t.committable() == {tp: 13}
    t.committed({tp: 13})
    assert t.committable() == {}
    t.done(tp, 13)
    assert t.committable() == {tp: 15}
    t.forget({tp})
    assert t.committable() == {}


AGENT = {"id": "a", "provider": "openai", "model": "m", "base_url": "http://x/v1"}


def test_registry_loads_the_shipped_example() -> None:
    reg = load_registry(Path(__file__).parent.parent / "agents.yaml", Settings(simulator_port=8701))
    assert len(reg) == 5
    assert all(a.base_url == "http://127.0.0.1:8701/v1" for a in reg.agents.values())


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([{**AGENT, "provider": "cohere"}], "agent 'a': provider: unknown provider 'cohere'"),
        ([AGENT, {**AGENT}], "agent 'a': duplicate id"),
        ([{"id": "b", "provider": "openai"}], "agent 'b': model: Field required"),
        ([{**AGENT, "concurency": 3}], "agent 'a': concurency: unknown field"),
        ([{**AGENT, "fallback": {"provider": "x", "model": "m"}}], "fallback.provider"),
    ],
)
def test_registry_errors_name_file_and_agent(
    tmp_path: Path, entries: list[dict[str, object]], needle: str
) -> None:
    import yaml

    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump({"agents": entries}))
    with pytest.raises(AgentConfigError) as ei:
        load_registry(path)
    assert str(path) in str(ei.value) and needle in str(ei.value)


def test_api_key_comes_only_from_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = parse_registry({"agents": [{**AGENT, "api_key_env": "MY_TEST_KEY_VAR"}]})
    cfg = reg.agents["a"]
    monkeypatch.delenv("MY_TEST_KEY_VAR", raising=False)
    with pytest.raises(AgentConfigError, match="MY_TEST_KEY_VAR"):
        cfg.api_key()
    monkeypatch.setenv("MY_TEST_KEY_VAR", "value-1234")
    assert cfg.api_key() == "value-1234"
    assert "value-1234" not in cfg.model_dump_json()
    hosted = parse_registry({"agents": [{"id": "h", "provider": "anthropic", "model": "c"}]})
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentConfigError, match="ANTHROPIC_API_KEY"):
        hosted.agents["h"].api_key()
