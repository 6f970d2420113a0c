"""API keys and who holds them: the key format, hashing, claims to roles. Pure, no I/O.

A key reads ``stl_<key_id>_<secret>``: ``key_id`` names the stored record (so a check is one
lookup, no scan) and only ``sha256(secret)`` is stored. The secret has 256 bits of entropy,
so a fast hash is enough (a slow one guards low-entropy passwords, which these are not).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from stormline.api.models import Role

PREFIX = "stl_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and its roles (from an API key or an OIDC token)."""

    tenant: str
    roles: frozenset[Role]
    subject: str  # the key id or the token's ``sub``: names the caller in logs, never a secret

    def may(self, role: Role) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class NewKey:
    key_id: str
    api_key: str
    secret_hash: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, f"{PREFIX}{key_id}_{secret}", hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(api_key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    if not api_key.startswith(PREFIX):
        return None
    key_id, sep, secret = api_key[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or not secret:
        return None
    return key_id, secret


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def parse_roles(raw: Iterable[str] | str | None) -> frozenset[Role]:
    """Known roles among ``raw`` (a list, or a space/comma-separated string); others dropped."""
    if raw is None:
        return frozenset()
    items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
    known = {r.value: r for r in Role}
    return frozenset(known[str(x)] for x in items if str(x) in known)
