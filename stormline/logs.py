"""Structured logging for every Stormline process, and the one list of secrets to mask.

Every line is one JSON object on stderr (:func:`setup`; :func:`dict_config` for Faust), with
``task_id`` and ``agent`` where the code around it said (:func:`bound`) and ``trace_id``/
``span_id`` of the current OpenTelemetry span when tracing is on. HTTP clients' per-request
lines are left out unless ``STORMLINE_LOG_HTTP_REQUESTS`` (:data:`HTTP_LOGGERS`).

Secrets are masked **by value** wherever they would leave the process: in every log record (a
record factory, so handlers that other libraries add later, Faust's included, are covered too)
and, through :func:`secret_needles`, in every event the serde encodes.

The secrets are, in this process:

* values of environment variables whose names look secret (``*_API_KEY``, ``*_PASSWORD``,
  ``*_TOKEN``, ``*_SECRET``) and of those named in ``STORMLINE_SECRET_ENV``;
* the password of any URL with credentials in the environment or the settings
  (``STORMLINE_REDIS_URL``, ``STORMLINE_CLICKHOUSE_URL``, ``STORMLINE_SCHEMA_REGISTRY_URL``,
  ...), raw and percent-decoded;
* every ``SecretStr`` setting (the SASL password) and the variables ``*_api_key_env``
  settings name (:func:`register_settings`);
* whatever a part registers when a secret enters the process (:func:`register_secret`: an
  agent's key read through its ``api_key_env``).

Values shorter than :data:`MIN_SECRET_LEN` are not secrets here (masking ``"abc"`` would
garble every line). Log lines also lose anything shaped like a bearer token or an
OpenAI/Anthropic key. :func:`install_redaction` (what :func:`setup` runs; idempotent) also
rate-limits the Kafka clients' repeated connection errors (:class:`RepeatLimiter`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

try:  # the current span, for trace_id/span_id on each line (stormline.tracing is a peer)
    from opentelemetry.trace import get_current_span
except ImportError:  # pragma: no cover - a dependency, but logging must never need it
    get_current_span = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from stormline.settings import Settings

MIN_SECRET_LEN = 6
MASK = "***"
_SECRET_NAME = re.compile(r"(API_KEY|PASSWORD|TOKEN|SECRET)$", re.I)
_SECRET_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")
# scheme://user:password@ -- the password is what goes (the user name stays readable).
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)([^@/\s]+)@")
# Loggers of the Kafka clients whose connection errors repeat for as long as a broker is away.
# A logger's own filters see only the records logged on it, not its children's: each module.
NOISY_KAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
    "stormline.librdkafka",
)
# One line per request of these (LLM calls, registry look-ups, served pages) drowns the rest:
# WARNING and above only, unless STORMLINE_LOG_HTTP_REQUESTS.
HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "aiohttp.access",
    "aiohttp.client",
    "openai",
    "anthropic",
    "urllib3",
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# The task and agent a line is about, set around a task's processing (worker, router,
# evaluator): asyncio copies them into each task, so concurrent tasks keep their own.
TASK_ID: ContextVar[str | None] = ContextVar("stormline_task_id", default=None)
AGENT: ContextVar[str | None] = ContextVar("stormline_agent", default=None)


@contextlib.contextmanager
def bound(task_id: str | None = None, agent: str | None = None) -> Iterator[None]:
    """Every line logged inside carries ``task_id`` and ``agent`` (those given)."""
    tokens = [(v, v.set(x)) for v, x in ((TASK_ID, task_id), (AGENT, agent)) if x is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# ================================================================ the secrets' list ==
class _Secrets:
    """The process's secrets, with the forms each reader wants, rebuilt on every change."""

    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.values: tuple[str, ...] = ()
        self.needles: tuple[bytes, ...] = ()  # what the serde looks for in encoded events
        self.pattern: re.Pattern[str] | None = None
        self.lock = threading.Lock()

    def rebuild(self) -> None:
        found = {v for v in (*self.registered, *_from_environment()) if len(v) >= MIN_SECRET_LEN}
        values = tuple(sorted(found, key=lambda v: (-len(v), v)))  # longest first
        self.pattern = re.compile("|".join(map(re.escape, values))) if values else None
        self.needles = tuple(v.encode() for v in values)
        self.values = values


SECRETS = _Secrets()


def url_passwords(text: str) -> list[str]:
    """The passwords of the URLs with credentials in ``text``, raw and percent-decoded."""
    out = []
    for m in _URL_CREDENTIALS.finditer(text):
        out += [m.group(2), unquote(m.group(2))]
    return out


def _named_secret_env() -> set[str]:
    """STORMLINE_SECRET_ENV as the settings read it (a JSON list); malformed is the
    settings' error to report, not a reason for this import to fail."""
    try:
        names = json.loads(os.environ.get("STORMLINE_SECRET_ENV") or "[]")
    except ValueError:
        return set()
    return {str(n) for n in names} if isinstance(names, list) else set()


def _from_environment() -> list[str]:
    named = _named_secret_env()
    out = []
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) or name in named:
            out.append(value)
        if "://" in value:
            out += url_passwords(value)
    return out


def register_secret(*values: str | None) -> None:
    """Treat ``values`` as secrets in this process from now on (logs and events)."""
    new = {v for v in values if v and len(v) >= MIN_SECRET_LEN} - SECRETS.registered
    if not new:
        return
    with SECRETS.lock:
        SECRETS.registered |= new
        SECRETS.rebuild()


def register_settings(settings: Settings) -> None:
    """Register the secrets ``settings`` hold: SecretStr values, URL passwords, the values
    of the variables that ``secret_env`` and ``*_api_key_env`` settings name."""
    from pydantic import SecretStr

    found: list[str | None] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, str) and name.endswith("_api_key_env"):
            found.append(os.environ.get(value))
        elif isinstance(value, str) and "://" in value:
            found += url_passwords(value)
    found += [os.environ.get(name) for name in settings.secret_env]
    register_secret(*found)


def refresh_secrets() -> None:
    """Read the environment again (it is read at import and at every registration)."""
    with SECRETS.lock:
        SECRETS.rebuild()


def secret_values() -> list[str]:
    return list(SECRETS.values)


def secret_needles() -> tuple[bytes, ...]:
    return SECRETS.needles


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret value, URL password and key-shaped token masked."""
    if secrets is not None:
        for value in secrets:
            text = text.replace(value, MASK)
    elif SECRETS.pattern is not None:
        text = SECRETS.pattern.sub(MASK, text)
    return _SECRET_SHAPES.sub(MASK, redact_url(text))


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it masked (the user name stays)."""
    return _URL_CREDENTIALS.sub(rf"\1{MASK}@", text) if "://" in text else text


def redact_tree(value: Any) -> Any:
    """A copy of ``value`` (an event's dump: dicts, lists, str, bytes) with secrets masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        for needle in SECRETS.needles:
            value = value.replace(needle, MASK.encode())
        return value
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value


SECRETS.rebuild()


# ====================================================================== log records ==
def _redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in a record before any handler or filter sees it; untouched if clean."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it itself, later
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # Formatters use exc_text when it is set: the traceback is masked once, here.
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class _RedactingFactory:
    """Wraps the record factory in place, so every record of every logger is masked."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.inner(*args, **kwargs)
        _redact_record(record)
        return record


class RedactSecrets(logging.Filter):
    """A handler filter doing what the record factory does (for handlers made elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


class RepeatLimiter(logging.Filter):
    """One line per (logger, message, node) every ``interval_s`` at WARNING and above; the
    next line that gets through says how many were left out in between.

    The node is every argument but the last (aiokafka's "Unable connect to node with id %s:
    %s" has the node first and the error last), so two nodes are still told apart.
    """

    def __init__(self, interval_s: float, max_keys: int = 1000) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str, str], list[float]] = {}  # key -> [since, left out]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.interval_s <= 0:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, str(record.msg), repr(args[:-1]))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.interval_s:
                seen[1] += 1
                return False
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.msg = (
                f"{record.getMessage()} ({int(seen[1])} more like it in the last "
                f"{now - seen[0]:.0f}s were not logged)"
            )
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
        task_id, agent = TASK_ID.get(), AGENT.get()
        if task_id is not None:
            out["task_id"] = task_id
        if agent is not None:
            out["agent"] = agent
        if get_current_span is not None:
            ctx = get_current_span().get_span_context()
            if ctx.is_valid:
                out["trace_id"] = format(ctx.trace_id, "032x")
                out["span_id"] = format(ctx.span_id, "016x")
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info or record.exc_text:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return redact(json.dumps(out, default=str))


# ============================================================================ setup ==
_CONFIGURED = False  # setup() runs once per process


def install_redaction(settings: Settings | None = None, loggers: Iterable[str] = ()) -> None:
    """Mask secrets in every log record and rate-limit the Kafka clients' connection errors,
    whoever configured the handlers. Idempotent: call it again after a framework (Faust)
    has set up its logging; ``settings`` adds their secrets (:func:`register_settings`)."""
    if settings is None:
        from stormline.settings import Settings

        settings = Settings()
    register_settings(settings)
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
    known = [n for n in logging.root.manager.loggerDict if n.startswith("aiokafka.")]
    for name in {*NOISY_KAFKA_LOGGERS, *known, *loggers}:
        logger = logging.getLogger(name)
        old = [f for f in logger.filters if isinstance(f, RepeatLimiter)]
        if old:
            old[0].interval_s = settings.log_repeat_interval_s
        else:
            logger.addFilter(RepeatLimiter(settings.log_repeat_interval_s))


def setup(
    level: str | int | None = None, service: str = "stormline", settings: Settings | None = None
) -> None:
    """Configure the root logger once per process (idempotent); level from settings."""
    global _CONFIGURED
    root = logging.getLogger()
    if _CONFIGURED:
        return
    if settings is None:
        from stormline.settings import Settings

        settings = Settings()
    install_redaction(settings)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else settings.log_level.upper())
    _CONFIGURED = True
    quiet_http_clients(settings, root.level)


def quiet_http_clients(settings: Settings, level: int = logging.INFO) -> None:
    """HTTP clients and servers at WARNING (unless STORMLINE_LOG_HTTP_REQUESTS); aiokafka
    too (its INFO lines are group joins and fetch chatter, the router's own say more)."""
    for noisy in _quiet(settings):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))


def _quiet(settings: Settings) -> tuple[str, ...]:
    return ("aiokafka",) if settings.log_http_requests else ("aiokafka", *HTTP_LOGGERS)


def dict_config(service: str, level: str, settings: Settings) -> dict[str, Any]:
    """:func:`setup` as a :func:`logging.config.dictConfig` (for Faust's ``logging_config``,
    which the Faust worker applies over any handler set before it starts)."""
    lvl = int(logging.getLevelName(level.upper()))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter, "service": service}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": sys.stderr}
        },
        "root": {"level": lvl, "handlers": ["stderr"]},
        "loggers": {n: {"level": max(logging.WARNING, lvl)} for n in _quiet(settings)},
    }
