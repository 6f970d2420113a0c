"""The HTTP API as the tests run it: `stormline api` in a subprocess, keys made in Redis,
and a JWKS server with a key the test generates (for OIDC)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from stormline.api.keys import new_key
from stormline.api.models import Role
from stormline.api.store import ApiStore
from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_http


def make_key(settings: Settings, tenant: str, roles: list[Role]) -> str:
    """A new API key in Redis, through the same store the API reads."""
    key = new_key()

    async def create() -> None:
        store = ApiStore(settings)
        try:
            await store.create_key(key, tenant, roles, "test")
        finally:
            await store.aclose()

    asyncio.run(create())
    return key.api_key


@dataclass
class Jwks:
    """A JWKS endpoint serving one RSA key the test made; it signs the tokens."""

    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    issuer: str = "https://issuer.stormline.test"
    audience: str = "stormline"
    url: str = ""
    fetches: int = 0

    def token(self, key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        body = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "someone",
            "exp": int(time.time()) + 300,
            **claims,
        }
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    @contextmanager
    def serve(self) -> Iterator[Jwks]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        doc = json.dumps({"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(doc.encode())

            def log_message(self, *a: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


@contextmanager
def running_api(settings: Settings, log: Path, **env: str) -> Iterator[str]:
    """`stormline api` on a free port with ``settings``; yields its base URL."""
    port = free_port()
    s = settings.model_copy(update={"api_port": port})
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stormline.cli", "api"],
            env={**settings_env(s), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", 180)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(url: str, path: str, key: str | None, body: Any, **kw: Any) -> httpx.Response:
    headers = auth(key) if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30, **kw)
