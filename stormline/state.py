"""What stateless workers share, in Redis, behind narrow functions.

* task status by id (hash ``stormline:<prefix>task:<id>``): state (the words of
  :mod:`stormline.schemas.lifecycle`), attempt, agent, trajectory id, output or error, reward.
  Every write goes through one Lua script built from the lifecycle's table (:func:`status_lua`):
  a transition the table does not allow, or a lower attempt, is refused; an applied state change
  is PUBLISHed as JSON ``{"task_id", "state", "attempt"}`` on ``<prefix>task-status``;
* idempotency: the record of the Trajectory of (task, attempt), small (:class:`TrajectoryRecord`:
  the Avro wire format, compressed); a redelivered assignment is answered by re-sending it,
  never by a second LLM call;
* an optional LLM response cache (:class:`CachedResponse`; its encoding lives here);
* a token-bucket rate limiter per provider, shared by every worker (one Lua script).

The worker's whole view of Redis is :class:`RedisState`. Producers, the evaluator and the CLI
use the synchronous helpers at the bottom.

If Redis is unreachable every call degrades to "nothing known" (no cache, no limiter, no
idempotency): :attr:`RedisState.degraded` and :attr:`RedisState.detail` say so, and the
connection is probed again every few seconds rather than on every call. A command Redis
refuses (OOM, READONLY, ...) is retried with the one retry policy, then degrades the same way
for that call (:attr:`RedisState.refusal` says why): a refusal never escapes to the caller.

Longer than ~400 lines because it is the one narrow interface to Redis: its three Lua scripts
(status, token bucket, provider budget) and their callers live together, so that nothing else
talks to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis

from stormline.logs import redact
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.lifecycle import ALLOWED, RANK, TaskState
from stormline.schemas.models import Step, Trajectory, Usage
from stormline.schemas.serde import DecodeError, FingerprintRegistry, Serde
from stormline.settings import Settings

log = logging.getLogger("stormline.state")
T = TypeVar("T")

STATES = tuple(s.value for s in TaskState)
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
# Refusals that pass (memory freed or evicted, failover done, data loaded): retried briefly.
_PASSING = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
)
_PASSING_CODES = ("BUSY", "NOREPLICAS", "MISCONF")  # no class of their own in redis-py
_REFUSAL_RETRY = RetryPolicy(base_s=0.05, max_s=0.5, attempts=3)
REFUSAL_WINDOW_S = 30.0  # a refusal this recent makes the worker report itself degraded

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

# The guarded status write. KEYS[1] the task's hash; ARGV: new state ("" = result fields only,
# no state change), attempt, ttl, channel, task id, then field/value pairs. Returns 1 if applied.
# A missing hash takes any first state. Fields alone need the same attempt in a state that is not
# final yet: a late result must not rewrite the final outcome's fields.
_STATUS = """
local ALLOWED = %s
local FINAL = %s
local RANK = %s
local new, attempt = ARGV[1], tonumber(ARGV[2])
local cur = redis.call('HGET', KEYS[1], 'state')
local cur_attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if attempt < cur_attempt then return 0 end
if new == '' then
  if not cur or FINAL[cur] or attempt ~= cur_attempt then return 0 end
elseif cur then
  if not (ALLOWED[cur] and ALLOWED[cur][new]) then return 0 end
  if attempt == cur_attempt and RANK[new] <= RANK[cur] then return 0 end
end
if new ~= '' then redis.call('HSET', KEYS[1], 'state', new) end
redis.call('HSET', KEYS[1], 'attempt', ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if new ~= '' then
  redis.call('PUBLISH', ARGV[4], cjson.encode({task_id = ARGV[5], state = new, attempt = attempt}))
end
return 1
"""


def _lua_set(names: Any) -> str:
    return "{" + ", ".join(f"[{json.dumps(str(n))}] = true" for n in sorted(names)) + "}"


def status_lua(allowed: dict[TaskState, frozenset[TaskState]] = ALLOWED) -> str:
    """The status script with ``allowed`` (the lifecycle's table) as a Lua table. Pure."""
    rows = ", ".join(f"[{json.dumps(old.value)}] = {_lua_set(nxt)}" for old, nxt in allowed.items())
    final = [old for old, nxt in allowed.items() if not nxt]
    rank = "{" + ", ".join(f"[{json.dumps(st.value)}] = {r}" for st, r in RANK.items()) + "}"
    return _STATUS % ("{" + rows + "}", _lua_set(final), rank)


def key_prefix(settings: Settings) -> str:
    return f"stormline:{settings.topic_prefix}"


def status_channel(settings: Settings) -> str:
    """The pub/sub channel of applied status changes (SSE, ``wait_for``)."""
    return f"{key_prefix(settings)}task-status"


def _status_args(
    settings: Settings, task_id: str, state: TaskState | str, attempt: int, fields: dict[str, Any]
) -> list[Any]:
    args: list[Any] = [
        str(state),
        attempt,
        settings.idempotency_ttl_s,
        status_channel(settings),
        task_id,
        "updated_at",
        time.time(),
    ]
    for k, v in fields.items():
        if v is not None:
            args += [k, str(v)[:2000]]
    return args


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


class UnreadableRecord(ValueError):
    """A recorded trajectory that cannot be read back (an old format, a schema now unknown)."""


class TrajectoryRecord:
    """The idempotency record of one attempt: its Trajectory as Avro (the serde's wire format,
    the schema id a fingerprint of this package's schemas, so no registry is asked), zlib.

    Records written before this format (JSON) are still read, until their TTL ends them.
    """

    _SERDE = Serde(FingerprintRegistry())

    @classmethod
    def encode(cls, traj: Trajectory) -> bytes:
        return zlib.compress(cls._SERDE.encode("idempotency", traj), 6)

    @classmethod
    def decode(cls, raw: bytes | str) -> Trajectory:
        raw = raw.encode() if isinstance(raw, str) else raw
        try:
            if raw[:1] == b"{":  # the JSON record of older workers
                return Trajectory.model_validate_json(raw)
            return cls._SERDE.decode(zlib.decompress(raw), Trajectory)
        except (ValueError, zlib.error, DecodeError) as exc:  # pydantic's ValidationError too
            raise UnreadableRecord(
                f"recorded trajectory unreadable ({len(raw)} bytes): "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            ) from exc


def _passing(exc: BaseException) -> bool:
    return isinstance(exc, _PASSING) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(_PASSING_CODES)
    )


class RedisState:
    """Async access for workers; every method survives Redis being down or refusing."""

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
        self.refused: int = 0  # commands Redis refused, after their retries
        self.refusal: str = ""  # the last refusal, for heartbeats and logs
        self._refused_at: float = -REFUSAL_WINDOW_S
        self._next_probe: float = 0.0
        self._bucket = self._r.register_script(_BUCKET)
        self._status = self._r.register_script(status_lua())

    @property
    def refusing(self) -> bool:
        """Whether Redis refused a command lately (then idempotency may not hold)."""
        return time.monotonic() - self._refused_at < REFUSAL_WINDOW_S

    async def _safe(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        if self.degraded and time.monotonic() < self._next_probe:
            return default
        try:
            async for attempt in _REFUSAL_RETRY.async_retrying(_passing):
                with attempt:
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
        except redis.ResponseError as exc:
            self._refused(exc)
            return default
        if self.degraded:
            self.degraded, self.detail = False, ""
            log.warning("redis at %s reachable again", _where(self.settings))
        return result

    def _refused(self, exc: redis.ResponseError) -> None:
        text = (
            f"redis at {_where(self.settings)} refused a command ({type(exc).__name__}: "
            f"{redact(str(exc))[:200]})"
        )
        self.refused += 1
        if text != self.refusal or not self.refusing:  # once per kind, not once per call
            log.warning("%s (refusal %d; that call goes on without Redis)", text, self.refused)
        self.refusal, self._refused_at = text, time.monotonic()

    async def ping(self) -> bool:
        return await self._safe(self._r.ping, False)

    # -- idempotency --------------------------------------------------------------------
    def _traj_key(self, task_id: str, attempt: int) -> str:
        return f"{self.prefix}traj:{task_id}:{attempt}"

    async def recorded_trajectory(self, task_id: str, attempt: int) -> Trajectory | None:
        """The Trajectory recorded for the attempt; :class:`UnreadableRecord` if there is one
        that cannot be read back."""
        raw = await self._safe(lambda: self._r.get(self._traj_key(task_id, attempt)), None)
        return TrajectoryRecord.decode(raw) if raw else None

    async def record_trajectory(self, traj: Trajectory) -> Trajectory:
        """Record ``traj`` unless one is recorded already; return the one that counts."""
        key = self._traj_key(traj.task_id, traj.attempt)
        ttl = self.settings.idempotency_ttl_s
        value = TrajectoryRecord.encode(traj)
        if len(value) > self.settings.max_record_bytes:
            # Kafka's readers refuse a record this large anyway; Redis does not keep it either.
            log.warning("trajectory of %s not recorded: %d bytes", traj.task_id, len(value))
            return traj

        async def op() -> Trajectory:
            if await self._r.set(key, value, nx=True, ex=ttl):
                return traj
            raw = await self._r.get(key)
            return TrajectoryRecord.decode(raw) if raw else traj

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

    async def apply_status(
        self, task_id: str, state: TaskState | str, attempt: int, **fields: Any
    ) -> bool | None:
        """:meth:`set_status`, telling "refused" (False: the lifecycle said no, for good) from
        "not known" (None: Redis down or refusing the command), which a writer that must see
        its status applied (the router's decisions) tries again."""
        args = _status_args(self.settings, task_id, TaskState(state), attempt, fields)
        keys = [f"{self.prefix}task:{task_id}"]
        out = await self._safe(lambda: self._status(keys=keys, args=args), None)
        return None if out is None else bool(out)

    async def apply_statuses(
        self, writes: Sequence[tuple[str, TaskState | str, int, dict[str, Any]]]
    ) -> list[bool] | None:
        """:meth:`apply_status` for many tasks (task id, state, attempt, fields) in one round
        trip (a pipeline, in order); None if Redis did not answer (then none is known)."""
        if not writes:
            return []

        sha = self._status.sha

        async def op() -> list[Any]:
            # EVALSHA by hand: a pipeline that carries Script objects asks SCRIPT EXISTS
            # first on every execute (a second round trip); the script is loaded once, and
            # again if Redis lost it (a restart).
            for _ in range(2):
                pipe = self._r.pipeline(transaction=False)
                for task_id, state, attempt, fields in writes:
                    args = _status_args(self.settings, task_id, TaskState(state), attempt, fields)
                    pipe.execute_command("EVALSHA", sha, 1, f"{self.prefix}task:{task_id}", *args)
                try:
                    return list(await pipe.execute())
                except redis.exceptions.NoScriptError:
                    await self._r.script_load(self._status.script)
            raise redis.exceptions.NoScriptError("the status script could not be loaded")

        out = await self._safe(op, None)
        return None if out is None else [bool(x) for x in out]

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
  if wait == 0 and rps > 0 then req = req - 1 end
  if wait == 0 and tpm > 0 then tok = tok - need end
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


@functools.lru_cache(maxsize=8)
def _sync_script(address: str) -> Any:
    return _client(address).register_script(status_lua())


def set_status(
    settings: Settings, task_id: str, state: TaskState | str, attempt: int, **fields: Any
) -> bool:
    """:meth:`RedisState.set_status`, blocking (the same script, the same rules)."""
    args = _status_args(settings, task_id, TaskState(state), attempt, fields)
    keys = [f"{key_prefix(settings)}task:{task_id}"]
    return bool(_sync_script(settings.redis_address)(keys=keys, args=args))


def task_status(settings: Settings, task_id: str) -> dict[str, str] | None:
    raw = _sync(settings).hgetall(f"{key_prefix(settings)}task:{task_id}")
    if not raw:
        return None
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def mark_submitted(settings: Settings, task_ids: list[str]) -> list[bool]:
    """Status ``submitted`` (attempt 0) for tasks not seen yet, through the status script
    (nothing leads back to submitted, so a known task keeps its state). Which applied."""
    script = _sync_script(settings.redis_address)
    pipe = _sync(settings).pipeline(transaction=False)
    for tid in task_ids:
        args = _status_args(settings, tid, TaskState.SUBMITTED, 0, {})
        script(keys=[f"{key_prefix(settings)}task:{tid}"], args=args, client=pipe)
    return [bool(x) for x in pipe.execute()]


# A human reward replaces the automatic one and is never replaced by an automatic one that
# arrives later (the evaluator may lag behind a person's feedback).
_REWARD = """
if ARGV[2] ~= 'human' and redis.call('HGET', KEYS[1], 'reward_source') == 'human' then
  return 0
end
redis.call('HSET', KEYS[1], 'reward', ARGV[1], 'reward_source', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def record_reward(settings: Settings, task_id: str, value: float, source: str = "") -> bool:
    """The task's reward in its status; False when a human reward is already there."""
    key = f"{key_prefix(settings)}task:{task_id}"
    # The TTL: never a key without one (the maxmemory policy evicts only keys that have one).
    done = _sync(settings).eval(_REWARD, 1, key, value, source, settings.idempotency_ttl_s)
    return bool(done)


# ==================================================================== worker hot path ==
# Issue 16: the worker's Redis work in one pipelined call per event-loop tick, for every
# task that reached the same point in that tick. Added beside RedisState, whose methods stay
# as they were: they are the fallback whenever the pipelined call fails (Redis down, a
# refusal, a script Redis forgot after a restart), so every fault takes the path it took
# before and is retried, counted and reported the same way.


def _lua_function(name: str, script: str) -> str:
    """``script`` (a whole script reading KEYS and ARGV) as a local Lua function of (KEYS,
    ARGV): the parameters shadow the globals, so the very text RedisState runs (the status
    script built from the lifecycle's table, the provider budget) runs per task here."""
    return f"local function {name}(KEYS, ARGV)\n{script}\nend\n"


# ARGV is a run of segments, each its length and then its items.
_SEGMENTS = """
local pos = 1
local function segment()
  local n, seg = tonumber(ARGV[pos]), {}
  for j = 1, n do seg[j] = ARGV[pos + j] end
  pos = pos + n + 1
  return seg
end
"""

# Per task, KEYS: its record, its status hash, its cached answer, its provider's budget ('' when
# not asked); ARGV: the status script's arguments (empty: the status is not touched) and the
# budget script's (empty: not asked). A recorded trajectory is the whole answer (nothing is
# written, no budget taken); a cached answer takes no budget. Per task {record, cached, wait}.
_BEGIN_MANY = """
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k = i * 4
  local status, budget = segment(), segment()
  local rec = redis.call('GET', KEYS[k + 1])
  local hit, wait = false, false
  if not rec then
    if #status > 0 then apply_status({KEYS[k + 2]}, status) end
    if KEYS[k + 3] ~= '' then hit = redis.call('GET', KEYS[k + 3]) end
    if not hit and #budget > 0 then wait = take_budget({KEYS[k + 4]}, budget) end
  end
  out[i + 1] = {rec, hit, wait}
end
return out
"""

# Per task, KEYS: its record, its status hash; ARGV: the record ({value, ttl}; empty: too large
# to keep) and the status script's arguments (result fields). Per task 1 when its record was
# kept (or none is kept) and its fields written, else the record that was there first (whose
# fields the caller writes).
_FINISH_MANY = """
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local rec, status = segment(), segment()
  local first = false
  if #rec > 0 and not redis.call('SET', KEYS[2 * i + 1], rec[1], 'NX', 'EX', rec[2]) then
    first = redis.call('GET', KEYS[2 * i + 1])
  end
  if first then
    out[i + 1] = first
  else
    apply_status({KEYS[2 * i + 2]}, status)
    out[i + 1] = 1
  end
end
return out
"""


def begin_many_lua() -> str:
    return (
        _lua_function("apply_status", status_lua())
        + _lua_function("take_budget", RedisState._BUDGET_LUA)
        + _SEGMENTS
        + _BEGIN_MANY
    )


def finish_many_lua() -> str:
    return _lua_function("apply_status", status_lua()) + _SEGMENTS + _FINISH_MANY


def _segment(items: list[Any]) -> list[Any]:
    return [len(items), *items]


@dataclass(frozen=True)
class BudgetAsk:
    """One take from a provider's shared budget (the arguments of
    :meth:`RedisState.take_budget`, ``take=True``)."""

    provider: str
    rps: float = 0.0
    tpm: float = 0.0
    tokens: float = 0.0

    def args(self) -> list[Any]:
        burst = max(self.rps, 1.0) if self.rps else 0
        return [self.rps, burst, self.tpm, self.tokens, 0.0, 1]


@dataclass(frozen=True)
class Begun:
    """What an attempt's first Redis call found: the trajectory recorded for it (then nothing
    was written and nothing taken), the cached answer, the budget's wait (None: not asked,
    or Redis did not answer: then there is no shared budget, as with take_budget)."""

    recorded: Trajectory | None = None
    cached: CachedResponse | None = None
    wait: float | None = None


@dataclass
class _Tick:
    begins: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = field(default_factory=list)
    finishes: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = field(default_factory=list)
    writes: list[tuple[tuple[Any, ...], Callable[[], Coroutine[Any, Any, Any]]]] = field(
        default_factory=list
    )


class HotPath:
    """The worker's Redis calls, gathered per event-loop tick into one pipelined call.

    Every task that asks in the same tick rides the same pipeline: :meth:`begin` (the
    idempotency record, the ``running`` status, the cached answer, the first budget take)
    and :meth:`finish` (the record with NX and the result fields) are one Lua script each
    per tick for all those tasks, and write-behind commands (:meth:`cache_response`,
    :meth:`charge_budget`) go along. A task's own cost is then packing its arguments and
    reading its reply, not a round trip.

    If the pipelined call fails for a task, that task takes RedisState's own methods, as it
    did before, with their retries, degradation and counting.
    """

    CHUNK = 128  # tasks per script call: one call must not hold Redis for long

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self._tick: _Tick | None = None
        self._sending: set[asyncio.Task[Any]] = set()
        self._begin = state._r.register_script(begin_many_lua())
        self._finish = state._r.register_script(finish_many_lua())
        self._budget = state._r.register_script(RedisState._BUDGET_LUA)
        self._loaded = False

    # -- the calls ---------------------------------------------------------------------
    async def begin(
        self,
        task_id: str,
        attempt: int,
        *,
        running_for: str | None,
        cache_key: str | None = None,
        budget: BudgetAsk | None = None,
    ) -> Begun:
        """The attempt's record; if there is none: status ``running`` (when ``running_for``,
        the agent, is given), the answer cached under ``cache_key``, one take of ``budget``."""
        s = self.state
        status = []
        if running_for is not None:
            fields = {"agent_id": running_for}
            status = _status_args(s.settings, task_id, TaskState.RUNNING, attempt, fields)
        keys = [
            s._traj_key(task_id, attempt),
            f"{s.prefix}task:{task_id}",
            f"{s.prefix}cache:{cache_key}" if cache_key else "",
            f"{s.prefix}budget:{budget.provider}" if budget else "",
        ]
        args = [*_segment(status), *_segment(budget.args() if budget else [])]
        reply = _NOT_SENT if s.degraded else await self._ask(self._queue().begins, keys, args)
        if isinstance(reply, list) and len(reply) == 3:
            rec, hit, wait = reply
            return Begun(
                TrajectoryRecord.decode(rec) if rec else None,
                CachedResponse.decode(hit) if hit else None,
                float(wait) if wait is not None else None,
            )
        await self._failed(reply)
        return await self._begin_alone(task_id, attempt, running_for, cache_key, budget)

    async def _begin_alone(
        self,
        task_id: str,
        attempt: int,
        running_for: str | None,
        cache_key: str | None,
        budget: BudgetAsk | None,
    ) -> Begun:
        s = self.state
        recorded = await s.recorded_trajectory(task_id, attempt)
        if recorded is not None:
            return Begun(recorded)
        if running_for is not None:
            await s.set_status(task_id, TaskState.RUNNING, attempt, agent_id=running_for)
        cached = await s.cached_response(cache_key) if cache_key else None
        wait = None
        if budget is not None and cached is None:
            b = budget
            wait = await s.take_budget(b.provider, rps=b.rps, tpm=b.tpm, tokens=b.tokens)
        return Begun(None, cached, wait)

    async def finish(self, traj: Trajectory) -> Trajectory:
        """Record ``traj`` unless one is recorded already, and the result fields of the one
        that counts (:meth:`RedisState.record_trajectory` + :meth:`RedisState.set_result`)."""
        s = self.state
        value = TrajectoryRecord.encode(traj)
        record: list[Any] = [value, s.settings.idempotency_ttl_s]
        if len(value) > s.settings.max_record_bytes:
            # Kafka's readers refuse a record this large anyway; Redis does not keep it either.
            log.warning("trajectory of %s not recorded: %d bytes", traj.task_id, len(value))
            record = []
        keys = [s._traj_key(traj.task_id, traj.attempt), f"{s.prefix}task:{traj.task_id}"]
        args = [*_segment(record), *_segment(_result_args(s.settings, traj))]
        reply = _NOT_SENT if s.degraded else await self._ask(self._queue().finishes, keys, args)
        if reply == 1:
            return traj
        if isinstance(reply, bytes):  # another copy was recorded first: it counts
            first = TrajectoryRecord.decode(reply)
            await s.set_result(first.task_id, first.attempt, **_result_fields(first))
            return first
        await self._failed(reply)
        if record:
            traj = await s.record_trajectory(traj)
        await s.set_result(traj.task_id, traj.attempt, **_result_fields(traj))
        return traj

    async def cached_response(self, key: str) -> CachedResponse | None:
        return await self.state.cached_response(key)

    async def cache_response(self, key: str, response: Response, ttl_s: int) -> None:
        """Write-behind: queued with this tick's pipeline (with the attempt's record, when the
        caller records next), not waited for."""
        value = CachedResponse.encode(response)
        cmd = ("SET", f"{self.state.prefix}cache:{key}", value, "EX", ttl_s)
        self._write(cmd, lambda: self.state.cache_response(key, response, ttl_s))

    def charge_budget(self, provider: str, *, tpm: float, tokens: float) -> None:
        """Write-behind :meth:`RedisState.take_budget` ``take=False``: an answer used more
        tokens than it reserved."""
        args = [0.0, 0, tpm, tokens, 0.0, 0]
        key = f"{self.state.prefix}budget:{provider}"
        self._write(
            ("EVALSHA", self._budget.sha, 1, key, *args),
            lambda: self.state.take_budget(provider, tpm=tpm, tokens=tokens, take=False),
        )

    async def aclose(self) -> None:
        """Wait for the pipelined calls still going (write-behind ones included)."""
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    # -- the tick ----------------------------------------------------------------------
    def _queue(self) -> _Tick:
        tick = self._tick
        if tick is None:
            tick = self._tick = _Tick()
            # Starts on the next tick, so everything asked in this one goes with it.
            task = asyncio.get_running_loop().create_task(self._send(tick))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return tick

    @staticmethod
    async def _ask(
        into: list[tuple[list[str], list[Any], asyncio.Future[Any]]],
        keys: list[str],
        args: list[Any],
    ) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        into.append((keys, args, fut))
        return await fut

    def _write(self, cmd: tuple[Any, ...], alone: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        if self.state.degraded:
            task = asyncio.get_running_loop().create_task(alone())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            return
        self._queue().writes.append((cmd, alone))

    async def _send(self, tick: _Tick) -> None:
        if self._tick is tick:
            self._tick = None
        # Writes first: a read asked later in the tick sees a write asked earlier.
        commands: list[tuple[Any, ...]] = [cmd for cmd, _ in tick.writes]
        owners: list[list[asyncio.Future[Any]]] = []
        for ops, script in ((tick.begins, self._begin), (tick.finishes, self._finish)):
            for c in range(0, len(ops), self.CHUNK):
                chunk = ops[c : c + self.CHUNK]
                keys = [k for ks, _, _ in chunk for k in ks]
                args = [a for _, xs, _ in chunk for a in xs]
                commands.append(("EVALSHA", script.sha, len(keys), *keys, *args))
                owners.append([f for _, _, f in chunk])
        replies: list[Any]
        try:
            if not self._loaded:
                for script in (self._begin, self._finish, self._budget):
                    await self.state._r.script_load(script.script)
                self._loaded = True
            pipe = self.state._r.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every task of the tick falls back to its own calls
            replies = [exc] * len(commands)
        except BaseException:
            for owner in owners:
                for f in owner:
                    f.cancel()
            raise
        written, replies = replies[: len(tick.writes)], replies[len(tick.writes) :]
        for owner, reply in zip(owners, replies, strict=True):
            each = reply if isinstance(reply, list) and len(reply) == len(owner) else None
            for i, f in enumerate(owner):
                if not f.done():  # a task cancelled meanwhile (a drain) wants nothing
                    f.set_result(reply if each is None else each[i])
        for (_, alone), reply in zip(tick.writes, written, strict=True):
            if isinstance(reply, Exception):
                try:
                    await self._failed(reply)
                    await alone()
                except Exception as exc:  # nobody waits for a write-behind: say it
                    log.warning("redis write not done: %s", redact(str(exc))[:200])

    async def _failed(self, reply: Any) -> None:
        """Bookkeeping before a task falls back to RedisState's own calls."""
        if isinstance(reply, redis.exceptions.NoScriptError):
            self._loaded = False  # Redis restarted: load the scripts again with the next tick
        elif isinstance(reply, _REDIS_DOWN):
            # Degrade now, as RedisState would, so that the fallbacks do not each wait on
            # a connection first.
            async def again() -> None:
                raise reply

            await self.state._safe(again, None)
        elif isinstance(reply, Exception) and not isinstance(reply, redis.ResponseError):
            raise reply  # not Redis' answer: a bug, as RedisState would raise it


_NOT_SENT = object()  # degraded: straight to RedisState, which probes and recovers


def _result_fields(traj: Trajectory) -> dict[str, Any]:
    return {
        "agent_id": traj.agent_id,
        "trajectory_id": traj.trajectory_id,
        "output": traj.output,
        "error": traj.error,
    }


def _result_args(settings: Settings, traj: Trajectory) -> list[Any]:
    return _status_args(settings, traj.task_id, "", traj.attempt, _result_fields(traj))


# =============================================================== evaluator rewards ==
# Issue 16: the evaluator's reward statuses of one poll batch in one round trip. The rule is
# record_reward's own script, run per task inside one script call (the same text, as a local
# Lua function), so a batch applies exactly what that many record_reward calls in order would.
# record_reward stays as it was for everyone else. The values and sources travel as one JSON
# argument (redis-py packs each argument in Python: three per task cost ~2 µs of client CPU,
# one JSON text ~1 µs), the values as the text record_reward's repr() gives them; the reply
# names only the refused tasks (their positions), as it is usually empty.
_REWARDS_MANY = """
local ttl = ARGV[1]
local rows = cjson.decode(ARGV[2])
local refused = {}
for i = 1, #KEYS do
  if record_one({KEYS[i]}, {rows[i][1], rows[i][2], ttl}) == 0 then
    refused[#refused + 1] = i
  end
end
return refused
"""
REWARDS_CHUNK = 1000  # tasks per script call: one call must not hold Redis for long


@functools.lru_cache(maxsize=8)
def _rewards_script(address: str) -> Any:
    return _client(address).register_script(_lua_function("record_one", _REWARD) + _REWARDS_MANY)


def record_rewards(settings: Settings, rewards: Sequence[tuple[str, float, str]]) -> list[bool]:
    """:func:`record_reward` for each (task id, value, source), in order, in one round trip
    per :data:`REWARDS_CHUNK`; which applied (False where a human reward was there).

    Raises what redis-py raises (Redis down, a refusal); a chunk already sent stays applied.
    """
    script = _rewards_script(settings.redis_address)
    prefix = f"{key_prefix(settings)}task:"
    done: list[bool] = []
    for c in range(0, len(rewards), REWARDS_CHUNK):
        chunk = rewards[c : c + REWARDS_CHUNK]
        rows = json.dumps([[repr(float(value)), source] for _, value, source in chunk])
        keys = [prefix + task_id for task_id, _, _ in chunk]
        # redis-py's Script: EVALSHA, loaded again by itself if Redis forgot it (a restart).
        refused = script(keys=keys, args=[settings.idempotency_ttl_s, rows])
        applied = [True] * len(chunk)
        for i in refused:
            applied[int(i) - 1] = False
        done += applied
    return done
