"""What the openai and anthropic providers share: SDK error mapping and the client pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import httpx2

from stormline.consumers.llm import ErrorKind, ProviderError
from stormline.logs import redact

CONNECTIONS_PER_CLIENT = 64
C = TypeVar("C")


def client_pool(make: Callable[[httpx2.Limits], C], max_connections: int) -> list[C]:
    """Several SDK clients of at most CONNECTIONS_PER_CLIENT connections each.

    httpx's pool scans every connection per request, which costs O(pool) each time; several
    small pools used round-robin keep hundreds of calls in flight cheap. The limits are
    httpx2's: the openai and anthropic SDKs are built on httpx2 (their dependency), not httpx.
    """
    shards = max(1, -(-max_connections // CONNECTIONS_PER_CLIENT))
    per = max(1, -(-max_connections // shards))
    limits = httpx2.Limits(max_connections=per, max_keepalive_connections=per)
    return [make(limits) for _ in range(shards)]


def to_provider_error(exc: BaseException, sdk: Any) -> ProviderError:
    status = getattr(exc, "status_code", None)
    if isinstance(exc, sdk.APITimeoutError):
        kind = ErrorKind.TIMEOUT
    elif isinstance(exc, sdk.APIStatusError):
        if status == 429:
            kind = ErrorKind.RATE_LIMIT
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
    return ProviderError(kind, message, status=status)
