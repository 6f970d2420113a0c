"""Map SDK exceptions (openai and anthropic share their shapes) to ProviderError kinds."""

from __future__ import annotations

from typing import Any

from consumers.llm import ErrorKind, ProviderError
from stormline.logs import redact

CONNECTIONS_PER_CLIENT = 64


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
