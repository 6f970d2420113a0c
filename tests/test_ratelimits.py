"""Pure: what a provider's 429 headers say about when to retry, and what a call reserves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from stormline.consumers.llm.ratelimits import (
    estimate_tokens,
    parse_duration,
    parse_instant,
    retry_after,
    within,
)
from stormline.consumers.llm.simulation import SimConfig, SimState

NOW = datetime(2026, 12, 3, 16, 0, 0, tzinfo=UTC)
T = NOW.timestamp()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("2.5", 2.5),  # a bare number is seconds
        ("7m12s", 432.0),
        ("", None),
        ("soon", None),
        ("5x", None),
        ("1s junk", None),
    ],
)
def test_openai_reset_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_instants_rfc3339_and_http_dates_count_from_now() -> None:
    later = NOW + timedelta(seconds=42)
    assert parse_instant(later.isoformat(), T) == pytest.approx(42)
    assert parse_instant(later.isoformat().replace("+00:00", "Z"), T) == pytest.approx(42)
    assert parse_instant(format_datetime(later, usegmt=True), T) == pytest.approx(42)
    assert parse_instant((NOW - timedelta(seconds=5)).isoformat(), T) == 0.0  # past: go now
    assert parse_instant("not a date", T) is None


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # OpenAI's precise header wins over its rounded one.
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"Retry-After": "3"}, 3.0),  # header names are case-insensitive
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": format_datetime(NOW + timedelta(seconds=9), usegmt=True)}, 9.0),
        # No retry-after: the exhausted limits say when they reset; the latest one counts.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1.2s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            360.0,
        ),
        # A limit with room left says nothing, whatever its reset.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "800ms",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            0.8,
        ),
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": (NOW + timedelta(seconds=30))
                .isoformat()
                .replace("+00:00", "Z"),
                "anthropic-ratelimit-output-tokens-remaining": "0",
                "anthropic-ratelimit-output-tokens-reset": (
                    NOW + timedelta(seconds=45)
                ).isoformat(),
                "anthropic-ratelimit-tokens-remaining": "5000",
                "anthropic-ratelimit-tokens-reset": (NOW + timedelta(seconds=90)).isoformat(),
            },
            45.0,
        ),
        ({"retry-after": "soon", "retry-after-ms": "x"}, None),  # unreadable: says nothing
        ({"x-ratelimit-remaining-requests": "0"}, None),  # exhausted, but no reset
        ({"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "1s"}, None),
        ({"content-type": "application/json"}, None),  # a bare 429
    ],
)
def test_retry_after_from_429_headers(headers: dict[str, str], seconds: float | None) -> None:
    got = retry_after(headers, T)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


def test_a_bad_retry_after_falls_through_to_the_resets() -> None:
    headers = {
        "retry-after": "whenever",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "2s",
    }
    assert retry_after(headers, T) == pytest.approx(2.0)


def test_token_estimate_is_prompt_chars_over_four_plus_max_tokens() -> None:
    assert estimate_tokens("", "", 0) == 0
    assert estimate_tokens("abcd", "", 0) == 1
    assert estimate_tokens("abcde", "", 0) == 2  # rounded up: never under the provider's count
    assert estimate_tokens("a" * 30, "b" * 10, 100) == 110
    assert estimate_tokens("abc", "", -5) == 1  # a nonsense max_tokens reserves nothing extra


def test_a_wait_fits_only_if_it_ends_before_the_deadline() -> None:
    assert within(5.0, 100.0, None)
    assert within(4.9, 100.0, 105.0)
    assert not within(5.0, 100.0, 105.0)
    assert not within(0.0, 106.0, 105.0)


def test_the_simulated_providers_own_limit_is_a_bucket_that_says_when() -> None:
    st = SimState(SimConfig())
    # 2 requests/s: a burst of 2, then one every half second; a refused one takes nothing.
    assert [st.take_request("m", 2.0, 10.0) for _ in range(2)] == [0.0, 0.0]
    assert st.take_request("m", 2.0, 10.0) == pytest.approx(0.5)
    assert st.take_request("m", 2.0, 10.2) == pytest.approx(0.3)
    assert st.take_request("m", 2.0, 10.5) == 0.0
    assert st.take_request("other", 2.0, 10.5) == 0.0  # per model
    slow = SimState(SimConfig())
    assert slow.take_request("m", 0.5, 0.0) == 0.0  # under 1/s: a bucket of one
    assert slow.take_request("m", 0.5, 1.0) == pytest.approx(1.0)  # half refilled
