"""The HTTP API against the real broker, registry and Redis: `stormline api` in a subprocess.

Roles (a table of role x endpoint, every endpoint of /openapi.json in it), tenants, bad bodies,
quotas (429 + Retry-After, nothing lost), OIDC against a JWKS this test serves. No router runs
here: tasks stay ``submitted``, which is what the in-flight quota and the isolation need. The
loop (results, SSE, rewards, cancel) is tests/test_api_loop.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from stormline.api.app import create_app
from stormline.api.models import Role
from stormline.client import Client, QuotaExceeded
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import ensure_topics
from stormline.schemas.models import TaskSubmitted
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import set_status, task_status
from tests.api_fixtures import Jwks, auth, make_key, post, running_api
from tests.test_publish import read_topic

pytestmark = pytest.mark.slow
QUOTAS = {
    "slow": {"rate": 2, "burst": 5},
    "tight": {"in_flight": 3},
}


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    with Jwks().serve() as j:
        yield j


@pytest.fixture(scope="module")
def api_settings(stack_settings: Settings, jwks: Jwks, tmp_path_factory: Any) -> Settings:
    s = stack_settings.model_copy(
        update={
            "topic_prefix": f"a{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path_factory.mktemp("api"),
            "api_tenant_quotas": QUOTAS,
            "api_max_batch": 50,
            "api_max_body_bytes": 200_000,
            "api_oidc_jwks_url": jwks.url,
            "api_oidc_issuer": jwks.issuer,
            "api_oidc_audience": jwks.audience,
        }
    )
    ensure_topics(s)
    return s


@pytest.fixture(scope="module")
def api(api_settings: Settings) -> Iterator[str]:
    with running_api(api_settings, api_settings.data_dir / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def keys(api_settings: Settings) -> dict[str, str]:
    """One key per single role, one with none, for tenant "acme"."""
    out = {r.value: make_key(api_settings, "acme", [r]) for r in Role}
    out["none"] = make_key(api_settings, "acme", [])
    return out


def _task(**kw: Any) -> dict[str, Any]:
    return {"task_type": "qa", "prompt": f"question {uuid.uuid4().hex[:6]}", **kw}


def tasks_on_kafka(settings: Settings, expect: int) -> list[TaskSubmitted]:
    serde = Serde.from_settings(settings)
    return [serde.decode(m.value(), TaskSubmitted) for m in read_topic(settings, TASKS, expect)]


# ========================================================================== roles ==
# (method, path, body or None, the role that may call it). Unknown ids: allowed calls get
# 404/409/200, never 401/403, which is what the table checks.
UNKNOWN = "no-such-task"
ENDPOINTS: list[tuple[str, str, Any, Role]] = [
    ("POST", "/v1/tasks", _task(), Role.SUBMIT),
    ("GET", f"/v1/tasks/{UNKNOWN}", None, Role.READ),
    ("GET", f"/v1/tasks/{UNKNOWN}/events", None, Role.READ),
    ("POST", f"/v1/tasks/{UNKNOWN}/cancel", None, Role.SUBMIT),
    ("GET", "/v1/tasks", None, Role.READ),
    ("POST", "/v1/rewards", {"task_id": UNKNOWN, "value": 1.0}, Role.SUBMIT),
    ("GET", "/v1/analytics/tasks_by_status", None, Role.READ),
    ("GET", "/v1/agents", None, Role.OPERATE),
    ("GET", "/v1/checkpoints", None, Role.OPERATE),
    ("GET", "/v1/dead-letters", None, Role.OPERATE),
    ("POST", "/v1/dead-letters/replay", {"letters": ["0:0"]}, Role.OPERATE),
    ("POST", "/v1/keys", {"tenant": "other", "roles": ["read"]}, Role.ADMIN),
    ("GET", "/v1/keys", None, Role.ADMIN),
    ("DELETE", "/v1/keys/0123456789abcdef", None, Role.ADMIN),
]


def _call(url: str, method: str, path: str, body: Any, headers: dict[str, str]) -> int:
    r = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
    return r.status_code


def test_every_endpoint_is_in_the_role_table(api: str) -> None:
    """A new endpoint fails here until the table says who may call it."""
    spec = httpx.get(f"{api}/openapi.json", timeout=10).json()
    served = {
        (m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/v1/")
    }
    table = {(m, p.replace(UNKNOWN, "{task_id}")) for m, p, _b, _r in ENDPOINTS}
    table = {(m, "/v1/keys/{key_id}" if p.startswith("/v1/keys/") else p) for m, p in table}
    table = {(m, "/v1/analytics/{name}" if "/analytics/" in p else p) for m, p in table}
    assert served == table


def test_each_role_reaches_only_its_endpoints(api: str, keys: dict[str, str]) -> None:
    wrong = []
    for method, path, body, needed in ENDPOINTS:
        assert _call(api, method, path, body, {}) == 401, (method, path, "no credential")
        assert _call(api, method, path, body, auth("stl_0123456789abcdef_nope")) == 401
        for holder, key in keys.items():
            code = _call(api, method, path, body, auth(key))
            allowed = holder == needed.value
            if allowed != (code not in (401, 403)):
                wrong.append(f"{holder} {method} {path} -> {code}")
    assert not wrong, "role boundaries broken:\n" + "\n".join(wrong)


def test_revoked_key_is_refused(api: str, api_settings: Settings, keys: dict[str, str]) -> None:
    key = make_key(api_settings, "acme", [Role.READ])
    assert httpx.get(f"{api}/v1/tasks", headers=auth(key), timeout=10).status_code == 200
    key_id = key.split("_")[1]
    r = httpx.delete(f"{api}/v1/keys/{key_id}", headers=auth(keys["admin"]), timeout=10)
    assert r.status_code == 204
    assert httpx.get(f"{api}/v1/tasks", headers=auth(key), timeout=10).status_code == 401


# ======================================================================== tenants ==
def test_a_tenant_sees_only_its_own_tasks(api: str, api_settings: Settings) -> None:
    a = make_key(api_settings, "tenant-a", [Role.SUBMIT, Role.READ])
    b = make_key(api_settings, "tenant-b", [Role.SUBMIT, Role.READ])
    r = post(api, "/v1/tasks", a, _task())
    assert r.status_code == 202, r.text
    (tid,) = r.json()["task_ids"]
    assert httpx.get(f"{api}/v1/tasks/{tid}", headers=auth(a), timeout=10).json()["state"]
    for method, path, body in [
        ("GET", f"/v1/tasks/{tid}", None),
        ("GET", f"/v1/tasks/{tid}/events", None),
        ("POST", f"/v1/tasks/{tid}/cancel", None),
        ("POST", "/v1/rewards", {"task_id": tid, "value": 0.5}),
    ]:
        assert _call(api, method, path, body, auth(b)) == 404, (method, path)
    listed_b = httpx.get(f"{api}/v1/tasks", headers=auth(b), timeout=10).json()["tasks"]
    listed_a = httpx.get(f"{api}/v1/tasks", headers=auth(a), timeout=10).json()["tasks"]
    assert tid not in {t["task_id"] for t in listed_b}
    assert tid in {t["task_id"] for t in listed_a}
    # B cannot take A's task id either: the whole batch is refused, nothing published.
    r = post(api, "/v1/tasks", b, {"tasks": [_task(task_id="b-own"), _task(task_id=tid)]})
    assert r.status_code == 409 and tid in r.text
    # The tenant comes from the key: a body that names one is refused.
    r = post(api, "/v1/tasks", a, _task(tenant="tenant-b"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "tenant"
    mine = [t for t in tasks_on_kafka(api_settings, 1) if t.task_id in {tid, "b-own"}]
    assert [(t.task_id, t.tenant) for t in mine] == [(tid, "tenant-a")]


# ===================================================================== bad bodies ==
BAD_BODIES: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("not JSON", "{bad", {"content-type": "application/json"}, 422, "json_invalid"),
    ("form, not JSON", "a=b", {"content-type": "application/x-www-form-urlencoded"}, 415, "JSON"),
    ("empty prompt", {"task_type": "qa", "prompt": ""}, {}, 422, "prompt"),
    ("no task_type", {"prompt": "p"}, {}, 422, "task_type"),
    ("priority 10", _task(priority=10), {}, 422, "priority"),
    ("unknown field", _task(colour="red"), {}, 422, "colour"),
    ("empty batch", {"tasks": []}, {}, 422, "tasks"),
    ("bad task in batch", {"tasks": [_task(), {"task_type": "qa"}]}, {}, 422, "prompt"),
    ("batch over the limit", {"tasks": [_task() for _ in range(51)]}, {}, 422, "at most 50"),
    ("same id twice", {"tasks": [_task(task_id="x"), _task(task_id="x")]}, {}, 422, "twice"),
    ("body over the limit", _task(prompt="x" * 250_000), {}, 413, "bytes"),
    ("a list", [_task()], {}, 422, "dictionary"),
]


@pytest.mark.parametrize(("what", "body", "headers", "code", "says"), BAD_BODIES)
def test_bad_bodies_get_a_4xx_that_says_why(
    api: str,
    keys: dict[str, str],
    what: str,
    body: Any,
    headers: dict[str, str],
    code: int,
    says: str,
) -> None:
    h = {**auth(keys["submit"]), **headers}
    if isinstance(body, str):
        r = httpx.post(f"{api}/v1/tasks", content=body, headers=h, timeout=30)
    else:
        r = httpx.post(f"{api}/v1/tasks", json=body, headers=h, timeout=30)
    assert r.status_code == code, (what, r.text)
    assert says in r.text, (what, r.text)


def test_bad_bodies_published_nothing(
    api: str, api_settings: Settings, keys: dict[str, str]
) -> None:
    for _what, body, headers, _code, _says in BAD_BODIES:
        h = {**auth(keys["submit"]), **headers}
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        httpx.post(f"{api}/v1/tasks", headers=h, timeout=30, **kw)
    # A good one after them: once it is read, nothing of the bad ones is there.
    marker = post(api, "/v1/tasks", keys["submit"], _task(task_type="marker")).json()
    found = tasks_on_kafka(api_settings, 1)
    assert marker["task_ids"][0] in {t.task_id for t in found}
    assert not [t for t in found if t.task_id == "x" or "colour" in t.metadata]
    assert all(t.prompt != "" and t.priority <= 9 for t in found)


def test_bad_queries_and_other_bodies_get_4xx(api: str, keys: dict[str, str]) -> None:
    h = auth(keys["read"])
    for q in ("since=yesterday", "limit=0", "status=done", "cursor=zz"):
        r = httpx.get(f"{api}/v1/tasks?{q}", headers=h, timeout=10)
        assert r.status_code == 422, (q, r.text)
    h = auth(keys["submit"])
    for body in ({"task_id": "t", "value": 2}, {"value": 1}, {"task_id": "t", "value": "high"}):
        r = httpx.post(f"{api}/v1/rewards", json=body, headers=h, timeout=10)
        assert r.status_code == 422, (body, r.text)
    r = httpx.post(
        f"{api}/v1/dead-letters/replay",
        json={"letters": ["x"]},
        timeout=10,
        headers=auth(keys["operate"]),
    )
    assert r.status_code == 422


# ========================================================================= quotas ==
def test_burst_over_quota_gets_429_and_nothing_is_lost(api: str, api_settings: Settings) -> None:
    key = make_key(api_settings, "slow", [Role.SUBMIT, Role.READ])
    tasks = [_task(task_id=f"slow-{i}") for i in range(40)]
    refused: list[dict[str, Any]] = []
    with ThreadPoolExecutor(len(tasks)) as pool:  # all at once, however slow the machine
        answers = list(pool.map(lambda t: post(api, "/v1/tasks", key, t), tasks))
    for t, r in zip(tasks, answers, strict=True):
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "rate" in r.json()["detail"] and "nothing" in r.json()["detail"]
            refused.append(t)
        else:
            assert r.status_code == 202, r.text
    assert refused, "40 tasks at once over a 2/s, burst 5 quota were all admitted"
    with Client(api, key) as client:
        with pytest.raises(QuotaExceeded):
            client.max_retries = 0
            for _ in range(20):
                client.submit(_task())
        client.max_retries = 30
        ids = client.submit_many(refused, batch=5)  # waits out Retry-After, same ids again
    assert ids == [t["task_id"] for t in refused]
    want = {t["task_id"] for t in tasks}
    got = [t.task_id for t in tasks_on_kafka(api_settings, 40) if t.task_id.startswith("slow-")]
    assert sorted(got) == sorted(want), "a task lost or published twice"


def test_in_flight_quota_frees_up_when_a_task_ends(api: str, api_settings: Settings) -> None:
    key = make_key(api_settings, "tight", [Role.SUBMIT, Role.READ])
    ids = [post(api, "/v1/tasks", key, _task()).json()["task_ids"][0] for _ in range(3)]
    r = post(api, "/v1/tasks", key, _task())
    assert r.status_code == 429 and r.json()["reason"] == "in_flight"
    assert r.headers["retry-after"] == "1"
    c = httpx.post(f"{api}/v1/tasks/{ids[0]}/cancel", headers=auth(key), timeout=10)
    assert c.status_code == 200 and c.json()["state"] == "cancelled"
    assert post(api, "/v1/tasks", key, _task()).status_code == 202
    again = httpx.post(f"{api}/v1/tasks/{ids[0]}/cancel", headers=auth(key), timeout=10)
    assert again.status_code == 200 and again.json()["state"] == "cancelled"  # idempotent


def test_a_cancel_wins_over_the_router_moving_the_task(api_settings: Settings) -> None:
    """The router writes ``waiting`` at attempt 1 over ``submitted`` at attempt 0 between the
    cancel's read and its write (in the app, in this process, so that the move lands exactly
    there): the cancel still applies. It once answered 409 "is waiting: too late to cancel"."""
    key = make_key(api_settings, "racing", [Role.SUBMIT, Role.READ])
    with TestClient(create_app(api_settings)) as http:
        r = http.post("/v1/tasks", json=_task(), headers=auth(key))
        assert r.status_code == 202, r.text
        tid = r.json()["task_ids"][0]
        store = http.app.state.store  # type: ignore[attr-defined]
        read = store.status
        moved = []

        async def read_then_router_moves(task_id: str) -> dict[str, str] | None:
            rec = await read(task_id)
            if not moved:
                moved.append(set_status(api_settings, task_id, "waiting", 1))
            return rec

        store.status = read_then_router_moves
        c = http.post(f"/v1/tasks/{tid}/cancel", headers=auth(key))
    assert moved == [True], "the router's move did not apply: the race was not set up"
    assert c.status_code == 200 and c.json()["state"] == "cancelled", c.text
    assert task_status(api_settings, tid)["state"] == "cancelled"


# =========================================================================== OIDC ==
def test_oidc_tokens_from_the_jwks(api: str, jwks: Jwks) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    good = jwks.token(tenant="oidc-t", roles=["submit", "read"])
    r = post(api, "/v1/tasks", good, _task())
    assert r.status_code == 202, r.text
    (tid,) = r.json()["task_ids"]
    assert httpx.get(f"{api}/v1/tasks/{tid}", headers=auth(good), timeout=10).status_code == 200
    reader = jwks.token(tenant="oidc-t", roles="read")  # a space-separated claim works too
    assert httpx.get(f"{api}/v1/tasks/{tid}", headers=auth(reader), timeout=10).status_code == 200
    assert post(api, "/v1/tasks", reader, _task()).status_code == 403
    other = jwks.token(tenant="oidc-u", roles=["read"])
    assert httpx.get(f"{api}/v1/tasks/{tid}", headers=auth(other), timeout=10).status_code == 404
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (
        jwks.token(key=stranger, tenant="oidc-t", roles=["read"]),
        jwks.token(tenant="oidc-t", roles=["read"], exp=1),
        jwks.token(tenant="oidc-t", roles=["read"], aud="someone-else"),
        jwks.token(roles=["read"]),
        "not-a-jwt",
    ):
        r = httpx.get(f"{api}/v1/tasks", headers=auth(bad), timeout=10)
        assert r.status_code == 401, r.text
    assert jwks.fetches >= 1


def test_health_ready_and_docs_are_open(api: str) -> None:
    assert httpx.get(f"{api}/healthz", timeout=10).json() == {"ok": True}
    ready = httpx.get(f"{api}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {
        "ready": True,
        "kafka": "ok",
        "registry": "ok",
        "redis": "ok",
    }
    assert "swagger" in httpx.get(f"{api}/docs", timeout=10).text.lower()
    assert "/v1/tasks" in httpx.get(f"{api}/openapi.json", timeout=10).json()["paths"]


def test_readyz_says_which_dependency_is_down(api_settings: Settings, tmp_path: Path) -> None:
    from tests.conftest import free_port

    dead = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with running_api(dead, tmp_path / "api.log") as url:
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["kafka"] == "ok" and body["registry"] == "ok" and body["redis"] != "ok"
        key = "stl_0123456789abcdef_whatever"
        r = httpx.get(f"{url}/v1/tasks", headers=auth(key), timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_listing_pages_and_filters(api: str, api_settings: Settings) -> None:
    key = make_key(api_settings, "lister", [Role.SUBMIT, Role.READ])
    with Client(api, key) as client:
        ids = client.submit_many([_task(task_type="pg") for _ in range(5)])
        ids += client.submit_many([_task(task_type="other")])
        assert [t.task_id for t in client.tasks(limit=2)] == ids  # three pages, oldest first
        assert [t.task_id for t in client.tasks(type="pg", status="submitted")] == ids[:5]
        assert list(client.tasks(status="succeeded")) == []
        assert [t.task_id for t in client.tasks(since="10m")] == ids
        assert list(client.tasks(since="2999-01-01T00:00")) == []
    page = httpx.get(f"{api}/v1/tasks?limit=2", headers=auth(key), timeout=10).json()
    assert len(page["tasks"]) == 2 and page["next_cursor"]
