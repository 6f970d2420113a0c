"""What the API keeps in Redis: keys, admission (quotas + tenant ownership), task index.

Every API instance shares it. Keys (all under ``stormline.state.key_prefix``):

* ``apikey:<key_id>`` hash (tenant, roles, name, created_at, revoked, hash) and the
  ``apikeys`` set of ids;
* the task status hash ``task:<id>`` (``stormline.state``'s): the API adds ``tenant``,
  ``task_type`` and ``submitted_at`` when it admits a task;
* ``tenant:<t>:bucket`` (token bucket), ``tenant:<t>:inflight`` (zset of tasks not known
  final, by admission time) and ``tenant:<t>:tasks`` (zset index for listing).

:data:`_ADMIT` does a batch's admission in one script, so that it is all or nothing: a task id
owned by another tenant, a full in-flight set or an empty bucket refuses the whole batch
before anything is changed. It reads task hashes it does not declare in KEYS: fine on one
Redis (the embedded one, or a primary with replicas), not on Redis Cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from stormline.api.keys import NewKey, parse_roles
from stormline.api.models import KeyInfo, Role
from stormline.api.quotas import Quota
from stormline.settings import Settings
from stormline.state import key_prefix

_ADMIT = """
local pfx, tenant = ARGV[1], ARGV[2]
local rate, burst, maxin = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = (#ARGV - 6) / 2
local conflicts = {}
for i = 7, #ARGV, 2 do
  local owner = redis.call('HGET', pfx .. 'task:' .. ARGV[i], 'tenant')
  if owner and owner ~= tenant then table.insert(conflicts, ARGV[i]) end
end
if #conflicts > 0 then return {'conflict', unpack(conflicts)} end
local final = {succeeded = true, failed = true, cancelled = true}
if redis.call('ZCARD', KEYS[2]) + n > maxin then
  -- The set may hold tasks that ended while no API instance listened: drop those first.
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, 999)) do
    local st = redis.call('HGET', pfx .. 'task:' .. id, 'state')
    if (st and final[st]) or redis.call('EXISTS', pfx .. 'task:' .. id) == 0 then
      redis.call('ZREM', KEYS[2], id)
    end
  end
  if redis.call('ZCARD', KEYS[2]) + n > maxin then return {'in_flight', '1'} end
end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < n then return {'rate', tostring((n - tokens) / rate)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
for i = 7, #ARGV, 2 do
  local key = pfx .. 'task:' .. ARGV[i]
  -- A microsecond apart, so that the index lists a batch in the order it was given.
  local at = now + (i - 7) / 2 * 0.000001
  redis.call('HSETNX', key, 'tenant', tenant)
  redis.call('HSETNX', key, 'task_type', ARGV[i + 1])
  redis.call('HSETNX', key, 'submitted_at', tostring(at))
  redis.call('EXPIRE', key, ttl)
  redis.call('ZADD', KEYS[2], 'NX', at, ARGV[i])
  redis.call('ZADD', KEYS[3], 'NX', at, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return {'ok'}
"""


@dataclass(frozen=True)
class Admission:
    ok: bool
    kind: str = ""  # "conflict" | "in_flight" | "rate" when refused
    wait_s: float = 0.0
    conflicts: tuple[str, ...] = ()


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class ApiStore:
    def __init__(self, settings: Settings, client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = key_prefix(settings)
        self.r = client or aioredis.Redis.from_url(
            settings.redis_address, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        self._admit = self.r.register_script(_ADMIT)

    def _tenant_key(self, tenant: str, what: str) -> str:
        return f"{self.prefix}tenant:{tenant}:{what}"

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    # -- keys ---------------------------------------------------------------------------
    async def create_key(self, key: NewKey, tenant: str, roles: list[Role], name: str) -> KeyInfo:
        info = KeyInfo(
            key_id=key.key_id, tenant=tenant, roles=roles, name=name, created_at=time.time()
        )
        mapping = {
            "hash": key.secret_hash,
            "tenant": tenant,
            "roles": " ".join(r.value for r in roles),
            "name": name,
            "created_at": str(info.created_at),
            "revoked": "0",
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(f"{self.prefix}apikey:{key.key_id}", mapping=mapping)  # type: ignore[arg-type]
        pipe.sadd(f"{self.prefix}apikeys", key.key_id)
        await pipe.execute()
        return info

    async def key_record(self, key_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(f"{self.prefix}apikey:{key_id}")
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def list_keys(self) -> list[KeyInfo]:
        ids = sorted(_text(i) for i in await self.r.smembers(f"{self.prefix}apikeys"))
        out = []
        for key_id in ids:
            rec = await self.key_record(key_id)
            if rec is not None:
                out.append(key_info(key_id, rec))
        return out

    async def revoke_key(self, key_id: str) -> bool:
        key = f"{self.prefix}apikey:{key_id}"
        if not await self.r.exists(key):
            return False
        await self.r.hset(key, "revoked", "1")
        return True

    # -- admission ----------------------------------------------------------------------
    async def admit(self, tenant: str, quota: Quota, tasks: list[tuple[str, str]]) -> Admission:
        """Take ``len(tasks)`` tokens and reserve the (task_id, task_type) pairs, or nothing."""
        args: list[Any] = [
            self.prefix,
            tenant,
            quota.rate,
            quota.burst,
            quota.in_flight,
            self.settings.idempotency_ttl_s,
        ]
        for task_id, task_type in tasks:
            args += [task_id, task_type]
        keys = [self._tenant_key(tenant, w) for w in ("bucket", "inflight", "tasks")]
        res = [_text(x) for x in await self._admit(keys=keys, args=args)]
        if res[0] == "ok":
            return Admission(True)
        if res[0] == "conflict":
            return Admission(False, "conflict", conflicts=tuple(res[1:]))
        return Admission(False, res[0], wait_s=float(res[1]))

    async def release(self, tenant: str, task_ids: list[str]) -> None:
        """Tasks that were admitted but not published leave the in-flight set."""
        if task_ids:
            await self.r.zrem(self._tenant_key(tenant, "inflight"), *task_ids)

    async def finished(self, tenant: str, task_id: str) -> None:
        # Idempotent, so every API instance may do it for every final status it hears.
        await self.r.zrem(self._tenant_key(tenant, "inflight"), task_id)

    # -- status -------------------------------------------------------------------------
    async def status(self, task_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(self.task_key(task_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def page(
        self, tenant: str, since: float, offset: int, limit: int
    ) -> tuple[list[tuple[str, dict[str, str]]], bool]:
        """A page of the tenant's task index from ``since`` (oldest first), and whether more."""
        raw = await self.r.zrangebyscore(
            self._tenant_key(tenant, "tasks"), since, "+inf", start=offset, num=limit + 1
        )
        more = len(raw) > limit
        ids = [_text(i) for i in raw[:limit]]
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.task_key(task_id))
        rows = await pipe.execute()
        out = [
            (tid, {_text(k): _text(v) for k, v in row.items()})
            for tid, row in zip(ids, rows, strict=True)
        ]
        return out, more

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def aclose(self) -> None:
        await self.r.aclose()


def key_info(key_id: str, rec: dict[str, str]) -> KeyInfo:
    return KeyInfo(
        key_id=key_id,
        tenant=rec.get("tenant", ""),
        roles=sorted(parse_roles(rec.get("roles", "")), key=lambda r: r.value),
        name=rec.get("name", ""),
        created_at=float(rec.get("created_at", 0)),
        revoked=rec.get("revoked") == "1",
    )
