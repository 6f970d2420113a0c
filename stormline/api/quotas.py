"""Per-tenant quotas: which limits apply, and what a refusal tells the caller. Pure, no I/O.

The counting itself is one Lua script in Redis (``stormline.api.store``), so every API
instance shares the same buckets and in-flight sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stormline.settings import Settings


@dataclass(frozen=True)
class Quota:
    rate: float  # tasks per second, refilled continuously
    burst: float  # bucket size: tasks at once
    in_flight: int  # submitted and not yet final


def quota_for(settings: Settings, tenant: str) -> Quota:
    """The tenant's quota: its override in ``api_tenant_quotas``, else the defaults."""
    o = settings.api_tenant_quotas.get(tenant, {})
    return Quota(
        rate=float(o.get("rate", settings.api_tenant_rate)),
        burst=float(o.get("burst", settings.api_tenant_burst)),
        in_flight=int(o.get("in_flight", settings.api_tenant_in_flight)),
    )


@dataclass(frozen=True)
class Refusal:
    """Why a submission was not admitted; nothing of it was published."""

    reason: str  # "rate" | "in_flight" | "too_large"
    retry_after_s: float
    detail: str

    @property
    def retry_after_header(self) -> str:
        # Retry-After is whole seconds (RFC 9110); never 0, which would invite a hot loop.
        return str(max(1, math.ceil(self.retry_after_s)))


def too_large(quota: Quota, n: int) -> Refusal | None:
    """A batch that no wait could admit (larger than the bucket or the in-flight quota)."""
    if n > quota.burst or n > quota.in_flight:
        return Refusal(
            "too_large",
            0.0,
            f"a batch of {n} tasks exceeds this tenant's burst ({quota.burst:g}) or in-flight "
            f"quota ({quota.in_flight}); send smaller batches",
        )
    return None


def refusal(kind: str, wait_s: float, quota: Quota, n: int) -> Refusal:
    if kind == "rate":
        detail = f"over this tenant's rate of {quota.rate:g} tasks/s (batch of {n})"
    else:
        detail = f"this tenant has {quota.in_flight} tasks in flight at most (batch of {n})"
    return Refusal(kind, wait_s, detail + "; nothing of this request was published")
