"""What a provider's 429 says about when to come back, and what a call costs a token budget.

Pure functions, no I/O. :func:`retry_after` reads the headers the providers send with a 429:

* ``retry-after-ms`` (OpenAI): milliseconds;
* ``retry-after`` (both, RFC 9110): delay-seconds or an HTTP date;
* otherwise the limits that are exhausted (``remaining`` is 0) and when they reset:
  OpenAI ``x-ratelimit-remaining-{requests,tokens}`` / ``x-ratelimit-reset-{requests,tokens}``
  (durations such as ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``); Anthropic
  ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining`` / ``-reset``
  (RFC 3339 timestamps). The latest reset wins: every exhausted limit must have refilled.

A 429 without any of these says nothing about when to retry; the caller then treats it like
any retryable error (a try with backoff).

:func:`estimate_tokens` is what one request reserves from a tokens-per-minute budget before
it is sent: the prompt's characters / 4 (rounded up) plus ``max_tokens``, the way OpenAI's
limiter counts a request before it has an answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Anthropic and OpenAI name the same idea differently; each pair is (remaining, reset).
_LIMIT_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    *(
        (f"anthropic-ratelimit-{what}-remaining", f"anthropic-ratelimit-{what}-reset")
        for what in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
CHARS_PER_TOKEN = 4


def parse_duration(text: str) -> float | None:
    """Seconds of an OpenAI reset duration (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``, ``0.5``)."""
    text = text.strip().lower()
    try:
        return max(0.0, float(text))  # a bare number is seconds
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_instant(text: str, now: float) -> float | None:
    """Seconds from ``now`` (epoch seconds) until an RFC 3339 or HTTP date; 0 if past."""
    text = text.strip()
    when: datetime | None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a naive ISO stamp is taken as UTC too
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _retry_after_value(text: str, now: float) -> float | None:
    """``Retry-After``: delay-seconds, or an HTTP date."""
    try:
        seconds = float(text.strip())
    except ValueError:
        return parse_instant(text, now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _reset(text: str, now: float) -> float | None:
    """A reset header: a duration (OpenAI) or a timestamp (Anthropic)."""
    duration = parse_duration(text)
    return duration if duration is not None else parse_instant(text, now)


def _exhausted(remaining: str) -> bool:
    try:
        return float(remaining.strip()) <= 0
    except ValueError:
        return False


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds a 429 asks the caller to wait, from its headers; None when it does not say.

    ``now``: the current time in epoch seconds (dates in headers are absolute).
    """
    h = {k.lower(): v for k, v in headers.items()}
    if (ms := h.get("retry-after-ms")) is not None:
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value / 1000)
    if (ra := h.get("retry-after")) is not None and (
        seconds := _retry_after_value(ra, now)
    ) is not None:
        return seconds
    resets = [
        seconds
        for remaining, reset in _LIMIT_HEADERS
        if _exhausted(h.get(remaining, ""))
        and (seconds := _reset(h.get(reset, ""), now)) is not None
    ]
    return max(resets) if resets else None


def estimate_tokens(prompt: str, system_prompt: str, max_tokens: int) -> int:
    """What a request reserves from a tokens-per-minute budget before it is sent."""
    chars = len(prompt) + len(system_prompt)
    return -(-chars // CHARS_PER_TOKEN) + max(0, max_tokens)


def within(wait_s: float, now: float, deadline: float | None) -> bool:
    """May a caller wait ``wait_s`` from ``now`` and still try before ``deadline``?"""
    return deadline is None or now + wait_s < deadline
