"""Who is calling, and may they: API keys (hashed in Redis) and optional OIDC JWTs.

Deny by default: the ``/v1`` router runs :func:`guard` before every endpoint, and the guard
refuses any endpoint that does not name its role with :func:`needs`, so a new endpoint is
closed until someone decides who may call it. Credentials come as ``Authorization: Bearer
<token>`` or ``X-API-Key: <key>``; a token that is not a Stormline key is checked as a JWT
against ``STORMLINE_API_OIDC_JWKS_URL`` when one is set.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import anyio
import jwt
from fastapi import HTTPException, Request

from stormline.api.keys import PREFIX, Principal, matches, parse_roles, split_key
from stormline.api.models import Role
from stormline.api.store import ApiStore
from stormline.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
_ROLE_ATTR = "__stormline_role__"


def needs(role: Role) -> Callable[[F], F]:
    """Mark an endpoint with the role that may call it (read by :func:`guard`)."""

    def mark(fn: F) -> F:
        setattr(fn, _ROLE_ATTR, role)
        return fn

    return mark


def role_of(endpoint: Any) -> Role | None:
    return getattr(endpoint, _ROLE_ATTR, None)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def credential(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(request: Request, settings: Settings, store: ApiStore) -> Principal:
    token = credential(request)
    if token is None:
        raise _unauthorized("no credentials: send Authorization: Bearer <api key or token>")
    if token.startswith(PREFIX):
        return await _from_key(token, store)
    if settings.api_oidc_jwks_url:
        return await anyio.to_thread.run_sync(_from_jwt, token, settings)
    raise _unauthorized("not a Stormline API key (and no OIDC issuer is configured)")


async def _from_key(token: str, store: ApiStore) -> Principal:
    parts = split_key(token)
    if parts is None:
        raise _unauthorized("malformed API key")
    key_id, secret = parts
    rec = await store.key_record(key_id)
    # One message for unknown, wrong and revoked keys: a caller learns nothing about ids.
    if rec is None or rec.get("revoked") == "1" or not matches(secret, rec.get("hash", "")):
        raise _unauthorized("invalid or revoked API key")
    return Principal(rec["tenant"], parse_roles(rec.get("roles", "")), key_id)


@lru_cache(maxsize=4)
def _jwks(url: str) -> jwt.PyJWKClient:
    # PyJWKClient caches the key set and refetches it when it meets an unknown key id.
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)


def _from_jwt(token: str, settings: Settings) -> Principal:
    assert settings.api_oidc_jwks_url is not None
    try:
        key = _jwks(settings.api_oidc_jwks_url).get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"],
            audience=settings.api_oidc_audience,
            issuer=settings.api_oidc_issuer,
            options={"require": ["exp"], "verify_aud": settings.api_oidc_audience is not None},
        )
    except jwt.PyJWKClientConnectionError as exc:
        raise HTTPException(503, f"the OIDC key set could not be fetched: {exc}") from exc
    except jwt.PyJWTError as exc:
        raise _unauthorized(f"invalid token: {exc}") from exc
    tenant = claims.get(settings.api_oidc_tenant_claim)
    if not isinstance(tenant, str) or not tenant:
        raise _unauthorized(f"the token has no {settings.api_oidc_tenant_claim!r} claim")
    roles = parse_roles(claims.get(settings.api_oidc_roles_claim))
    return Principal(tenant, roles, str(claims.get("sub", "")))


async def guard(request: Request) -> None:
    """The ``/v1`` router's dependency: authenticate, then check the endpoint's role."""
    route = request.scope.get("route")
    role = role_of(getattr(route, "endpoint", None))
    principal = await authenticate(request, request.app.state.settings, request.app.state.store)
    if role is None:
        raise HTTPException(403, "no role grants this endpoint")
    if not principal.may(role):
        raise HTTPException(403, f"this endpoint needs the {role.value!r} role")
    request.state.principal = principal


def principal(request: Request) -> Principal:
    """The caller, once :func:`guard` let it through (a dependency of endpoints)."""
    p: Principal = request.state.principal
    return p
