"""What stateless workers share, in Redis, behind narrow functions.

* task status by id (hash ``stormline:<prefix>task:<id>``): state (submitted / assigned /
  running / succeeded / failed), attempt, agent, trajectory id, output or error, reward;
* idempotency: the Trajectory recorded for (task, attempt); a redelivered assignment is
  answered by re-sending it, never by a second LLM call;
* an optional LLM response cache (:class:`CachedResponse`; its encoding lives here);
* a token-bucket rate limiter per provider, shared by every worker (one Lua script).

The worker's whole view of Redis is :class:`RedisState`: :meth:`~RedisState.ping`,
:meth:`~RedisState.set_status`, :meth:`~RedisState.recorded_trajectory` /
:meth:`~RedisState.record_trajectory`, :meth:`~RedisState.cached_response` /
:meth:`~RedisState.cache_response` and :meth:`~RedisState.take_token`. Producers, the
evaluator and the CLI use the synchronous helpers at the bottom.

If Redis is unreachable every call degrades to "nothing known" (no cache, no limiter, no
idempotency): :attr:`RedisState.degraded` and :attr:`RedisState.detail` say so, and the
connection is probed again every few seconds rather than on every call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis

from stormline.logs import redact
from stormline.schemas.models import Step, Trajectory, Usage
from stormline.settings import Settings

log = logging.getLogger("stormline.state")
T = TypeVar("T")

STATES = ("submitted", "assigned", "running", "succeeded", "failed")
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)

# Token bucket on Redis' own clock, so that workers with skewed clocks agree.
# Returns the seconds to wait before asking again ("0" = a token was taken).
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""

# Status never goes back to an older attempt (a late duplicate must not overwrite news).
_STATUS = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local new = tonumber(ARGV[1])
if new < cur then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], %d)
return 1
"""


def key_prefix(settings: Settings) -> str:
    return f"stormline:{settings.topic_prefix}"


class Response(Protocol):
    """What the cache keeps of an LLM answer (an LLM ``Completion`` is one)."""

    output: str
    provider: str
    model: str
    steps: list[Step]
    usage: Usage


@dataclass(frozen=True)
class CachedResponse:
    """An LLM answer served from the cache (latency 0: no call was made)."""

    output: str
    provider: str
    model: str
    steps: list[Step] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    @staticmethod
    def encode(r: Response) -> str:
        return json.dumps(
            {
                "output": r.output,
                "provider": r.provider,
                "model": r.model,
                "steps": [x.model_dump() for x in r.steps],
                "usage": r.usage.model_dump(),
            }
        )

    @classmethod
    def decode(cls, raw: str | bytes) -> CachedResponse:
        d = json.loads(raw)
        return cls(
            output=d["output"],
            provider=d["provider"],
            model=d["model"],
            steps=[Step.model_validate(x) for x in d["steps"]],
            usage=Usage.model_validate(d["usage"]),
        )


class RedisState:
    """Async access for workers; every method survives Redis being down."""

    PROBE_EVERY_S = 2.0

    def __init__(self, settings: Settings, client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = key_prefix(settings)
        # A blocking pool: hundreds of concurrent tasks queue for a connection instead of
        # failing with MaxConnectionsError (which would read as "Redis down").
        self._r = client or aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_address,
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                # Waiting for a pooled connection must not read as "Redis down".
                max_connections=settings.worker_max_in_flight + 16,
                timeout=60,
            )
        )
        self.degraded: bool = False
        self.detail: str = ""
        self._next_probe: float = 0.0
        self._bucket = self._r.register_script(_BUCKET)
        self._status = self._r.register_script(_STATUS % settings.idempotency_ttl_s)

    async def _safe(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        if self.degraded and time.monotonic() < self._next_probe:
            return default
        try:
            result = await op()
        except _REDIS_DOWN as exc:
            self._next_probe = time.monotonic() + self.PROBE_EVERY_S
            if not self.degraded:
                self.degraded = True
                self.detail = (
                    f"redis at {_where(self.settings)} unreachable ({type(exc).__name__}: "
                    f"{redact(str(exc))[:200]}); "
                    "running without cache, rate limiter and idempotency"
                )
                log.warning(self.detail)
            return default
        if self.degraded:
            self.degraded, self.detail = False, ""
            log.warning("redis at %s reachable again", _where(self.settings))
        return result

    async def ping(self) -> bool:
        return await self._safe(self._r.ping, False)

    # -- idempotency --------------------------------------------------------------------
    def _traj_key(self, task_id: str, attempt: int) -> str:
        return f"{self.prefix}traj:{task_id}:{attempt}"

    async def recorded_trajectory(self, task_id: str, attempt: int) -> Trajectory | None:
        raw = await self._safe(lambda: self._r.get(self._traj_key(task_id, attempt)), None)
        return Trajectory.model_validate_json(raw) if raw else None

    async def record_trajectory(self, traj: Trajectory) -> Trajectory:
        """Record ``traj`` unless one is recorded already; return the one that counts."""
        key = self._traj_key(traj.task_id, traj.attempt)
        ttl = self.settings.idempotency_ttl_s

        async def op() -> Trajectory:
            if await self._r.set(key, traj.model_dump_json(), nx=True, ex=ttl):
                return traj
            raw = await self._r.get(key)
            return Trajectory.model_validate_json(raw) if raw else traj

        return await self._safe(op, traj)

    # -- response cache -----------------------------------------------------------------
    async def cached_response(self, key: str) -> CachedResponse | None:
        """The answer cached under ``key`` (a digest of the request), if any."""
        raw = await self._safe(lambda: self._r.get(f"{self.prefix}cache:{key}"), None)
        return CachedResponse.decode(raw) if raw else None

    async def cache_response(self, key: str, response: Response, ttl_s: int) -> None:
        value = CachedResponse.encode(response)
        await self._safe(lambda: self._r.set(f"{self.prefix}cache:{key}", value, ex=ttl_s), None)

    # -- rate limiter -------------------------------------------------------------------
    async def take_token(self, provider: str, rate: float, burst: float | None = None) -> float:
        """Seconds to wait before asking again; 0 means go. 0 too when Redis is down."""

        async def op() -> float:
            wait = await self._bucket(
                keys=[f"{self.prefix}bucket:{provider}"], args=[rate, burst or max(rate, 1)]
            )
            return float(wait)

        return await self._safe(op, 0.0)

    # -- task status --------------------------------------------------------------------
    async def set_status(
        self, task_id: str, state: TaskState | str, attempt: int, **fields: Any
    ) -> bool:
        """Move the task to ``state`` if the lifecycle allows it and ``attempt`` is not lower
        than the current one; PUBLISH the change. Whether it applied (False if Redis is down)."""
        args = _status_args(self.settings, task_id, TaskState(state), attempt, fields)
        keys = [f"{self.prefix}task:{task_id}"]
        return bool(await self._safe(lambda: self._status(keys=keys, args=args), 0))

    async def set_result(self, task_id: str, attempt: int, **fields: Any) -> bool:
        """Result fields (trajectory_id, output, error) of the current attempt, no state change;
        refused once the task is final or at another attempt."""
        args = _status_args(self.settings, task_id, "", attempt, fields)
        keys = [f"{self.prefix}task:{task_id}"]
        return bool(await self._safe(lambda: self._status(keys=keys, args=args), 0))

    async def aclose(self) -> None:
        with contextlib.suppress(*_REDIS_DOWN):
            await self._r.aclose()

    # -- shared provider budget (the LLM rate limits; owned by consumers/llm's engineer) ----
    # KEYS[1] the provider's budget. ARGV: requests/s, their burst, tokens/minute, tokens,
    # hold seconds, take (1) or adjust (0). On Redis' clock, so that skewed workers agree.
    _BUDGET_LUA = """
local rps, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local need, hold, take = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'req', 'tok', 'ts', 'until')
local dt = math.max(0, now - (tonumber(b[3]) or now))
local req = math.min(burst, (tonumber(b[1]) or burst) + dt * rps)
local tok = math.min(tpm, (tonumber(b[2]) or tpm) + dt * tpm / 60)
local untl = tonumber(b[4]) or 0
if hold > 0 then untl = math.max(untl, now + hold) end
local wait = math.max(0, untl - now)
if not take then
  tok = math.min(tpm, tok - need)
elseif wait == 0 then
  if rps > 0 and req < 1 then wait = (1 - req) / rps end
  local want = math.min(need, tpm)
  if tpm > 0 and tok < want then wait = math.max(wait, (want - tok) * 60 / tpm) end
  if wait == 0 then
    req = req - 1
    tok = tok - need
  end
end
redis.call('HSET', KEYS[1], 'req', string.format('%.6f', req), 'tok', string.format('%.6f', tok),
  'ts', string.format('%.6f', now), 'until', string.format('%.6f', untl))
local refill = 60
if rps > 0 then refill = math.max(refill, burst / rps) end
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(0, untl - now) + refill) * 1000))
return string.format('%.6f', wait)
"""

    async def take_budget(
        self,
        provider: str,
        *,
        rps: float = 0.0,
        burst: float | None = None,
        tpm: float = 0.0,
        tokens: float = 0.0,
        hold_s: float = 0.0,
        take: bool = True,
    ) -> float:
        """One request (and ``tokens``) from the provider's budget shared by every worker:
        ``rps`` requests/s (bucket of ``burst``, default ``max(rps, 1)``) and ``tpm`` tokens a
        minute (bucket of one minute's worth); 0 = no such limit. ``hold_s``: a 429 asked
        for that long; nobody takes from the budget before it has passed.

        Returns the seconds to wait before asking again; 0 means taken. ``take=False`` only
        adjusts (``tokens`` > 0 charges, < 0 refunds; the hold) and returns the hold left.
        0 when Redis is down (then there is no shared budget).
        """
        script = self.__dict__.get("_budget")
        if script is None:
            script = self.__dict__["_budget"] = self._r.register_script(self._BUDGET_LUA)
        args = [rps, (burst or max(rps, 1.0)) if rps else 0, tpm, tokens, hold_s, int(take)]

        async def op() -> float:
            return float(await script(keys=[f"{self.prefix}budget:{provider}"], args=args))

        return await self._safe(op, 0.0)


def _where(settings: Settings) -> str:
    # The URL may carry a password; name only host and port.
    from urllib.parse import urlsplit

    u = urlsplit(settings.redis_address)
    return f"{u.hostname}:{u.port or 6379}"


# -------------------------------------------------------------- synchronous helpers --
# For CLIs and other parts (publish marks tasks submitted, evaluators record rewards).
@functools.lru_cache(maxsize=8)
def _client(address: str) -> redis.Redis:
    return redis.Redis.from_url(address, socket_connect_timeout=2.0, socket_timeout=5.0)


def _sync(settings: Settings) -> redis.Redis:
    return _client(settings.redis_address)


def task_status(settings: Settings, task_id: str) -> dict[str, str] | None:
    raw = _sync(settings).hgetall(f"{key_prefix(settings)}task:{task_id}")
    if not raw:
        return None
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def mark_submitted(settings: Settings, task_ids: list[str]) -> None:
    r = _sync(settings)
    pipe = r.pipeline(transaction=False)
    for tid in task_ids:
        key = f"{key_prefix(settings)}task:{tid}"
        pipe.hsetnx(key, "state", "submitted")
        pipe.hsetnx(key, "attempt", 0)
        pipe.expire(key, settings.idempotency_ttl_s)
    pipe.execute()


def record_reward(settings: Settings, task_id: str, value: float, source: str = "") -> None:
    key = f"{key_prefix(settings)}task:{task_id}"
    _sync(settings).hset(key, mapping={"reward": value, "reward_source": source})
