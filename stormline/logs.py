"""Structured logging for every Stormline process: one JSON object per line on stderr.

Secrets never reach a log line: :class:`RedactSecrets` masks the values of environment
variables whose names look secret (``*_API_KEY``, ``*_PASSWORD``, ``*_TOKEN``, ``*_SECRET``)
and anything shaped like a bearer token or an OpenAI/Anthropic key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_SECRET_NAME = re.compile(r"(API_KEY|PASSWORD|TOKEN|SECRET)$", re.I)
_SECRET_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")
_CONFIGURED = False  # setup() runs once per process
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def redact(text: str, secrets: list[str] | None = None) -> str:
    for value in secrets if secrets is not None else secret_values():
        text = text.replace(value, "***")
    return _SECRET_SHAPES.sub("***", text)


class RedactSecrets(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self._secrets)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "stormline") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "service": self.service,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


def setup(level: str | int | None = None, service: str = "stormline") -> None:
    """Configure the root logger once per process (idempotent); level from settings."""
    global _CONFIGURED
    root = logging.getLogger()
    if _CONFIGURED:
        return
    if level is None:
        from stormline.settings import Settings

        level = Settings().log_level.upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RedactSecrets())
    root.handlers[:] = [handler]
    root.setLevel(level)
    _CONFIGURED = True
    # One line per HTTP request (LLM calls, registry look-ups) drowns everything else.
    for noisy in (
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "openai",
        "anthropic",
        "aiokafka",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
