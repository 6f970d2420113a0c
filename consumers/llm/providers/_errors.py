"""What the openai and anthropic providers share: SDK error mapping and the client pool."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx2

from stormline.consumers.llm import ErrorKind, ProviderError
from stormline.consumers.llm.ratelimits import retry_after
from stormline.logs import redact

Transport = Literal["aiohttp", "httpx"]
TRANSPORTS: tuple[Transport, ...] = ("aiohttp", "httpx")
CONNECTIONS_PER_CLIENT = 64
C = TypeVar("C")


def client_pool(
    make: Callable[[httpx2.Limits], C], max_connections: int, transport: Transport
) -> list[C]:
    """The SDK clients one provider uses round-robin, ``max_connections`` in all.

    httpx's pool scans every connection per request, which costs O(pool) each time; several
    small pools used round-robin keep hundreds of calls in flight cheap. aiohttp's connector
    finds an idle connection in O(1), so that transport gets one client with the whole pool.
    The limits are httpx2's: the openai and anthropic SDKs are built on httpx2 (their
    dependency), not httpx; the aiohttp transport reads the same limits.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown LLM transport {transport!r}; use one of {TRANSPORTS}")
    per_client = max_connections if transport == "aiohttp" else CONNECTIONS_PER_CLIENT
    shards = max(1, -(-max_connections // per_client))
    per = max(1, -(-max_connections // shards))
    limits = httpx2.Limits(max_connections=per, max_keepalive_connections=per)
    return [make(limits) for _ in range(shards)]


def http_client(sdk: Any, transport: Transport, limits: httpx2.Limits) -> httpx2.AsyncClient:
    """The SDK's own client for ``transport`` (its defaults: timeouts, redirects)."""
    if transport == "aiohttp":
        client: httpx2.AsyncClient = sdk.DefaultAioHttpClient(limits=limits)
    else:
        client = sdk.DefaultAsyncHttpxClient(limits=limits)
    return client


def _refused(exc: BaseException) -> bool:
    """A "timeout" that is a refused or reset connection underneath. The aiohttp transport's
    exception map turns every connection error into httpx2's ConnectTimeout."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def to_provider_error(exc: BaseException, sdk: Any) -> ProviderError:
    status = getattr(exc, "status_code", None)
    hint: float | None = None
    if isinstance(exc, sdk.APITimeoutError):
        kind = ErrorKind.SERVER if _refused(exc) else ErrorKind.TIMEOUT
    elif isinstance(exc, sdk.APIStatusError):
        if status == 429:
            kind = ErrorKind.RATE_LIMIT
            # The SDKs' own retries (which read these headers) are off; ours read them.
            hint = retry_after(exc.response.headers, time.time())
        elif status == 408:
            kind = ErrorKind.TIMEOUT
        elif status is not None and status >= 500:
            kind = ErrorKind.SERVER
        else:
            kind = ErrorKind.CLIENT
    elif isinstance(exc, sdk.APIConnectionError):
        kind = ErrorKind.SERVER
    else:
        kind = ErrorKind.CLIENT
    # SDK messages quote the response body; keep them short and free of anything key-shaped.
    message = redact(f"{type(exc).__name__}: {exc}")[:500]
    if hint is not None:
        message += f" (the provider asks to retry in {hint:.3g} s)"
    return ProviderError(kind, message, status=status, retry_after_s=hint)
