"""``GET /v1/analytics/{name}`` gives a tenant the figures of its own tasks only: the known
data set of tests/sink_data.py through the real sink into chDB, then the API over it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from stormline.api.models import Role
from stormline.consumers.sink import analytics as an
from stormline.settings import Settings
from tests import sink_data
from tests.api_fixtures import auth, make_key, running_api
from tests.test_analytics import _assert_rows, _store, loaded

pytestmark = pytest.mark.slow
__all__ = ["loaded"]  # the fixture: the data set published and sunk into chDB


@pytest.fixture(scope="module")
def api(loaded: tuple[Settings, sink_data.DataSet]) -> Iterator[str]:
    s, _ds = loaded
    with running_api(s, s.data_dir / "api.log") as url:
        yield url


def test_each_tenant_gets_its_own_figures(
    api: str, loaded: tuple[Settings, sink_data.DataSet]
) -> None:
    s, ds = loaded
    store = _store(s)
    seen = {}
    for tenant in ("acme", "default", "nobody"):
        key = make_key(s, tenant, [Role.READ])
        for name in ("tasks_by_status", "per_agent", "regret"):
            r = httpx.get(f"{api}/v1/analytics/{name}", headers=auth(key), timeout=120)
            assert r.status_code == 200, r.text
            want = an.to_json(an.run_canned(store, name, tenant=tenant))
            _assert_rows(r.json(), httpx.Response(200, text=want).json())  # floats: to 1e-9
            seen[(tenant, name)] = r.json()
    total = {
        t: sum(row["tasks"] for row in seen[(t, "tasks_by_status")]) for t in ("acme", "default")
    }
    assert total == {t: sum(1 for x in ds.tasks if x.tenant == t) for t in total}
    assert seen[("nobody", "tasks_by_status")] == []
    assert seen[("acme", "per_agent")] != seen[("default", "per_agent")]


def test_analytics_names_and_parameters_are_checked(
    api: str, loaded: tuple[Settings, sink_data.DataSet]
) -> None:
    s, _ds = loaded
    key = make_key(s, "acme", [Role.READ])
    assert httpx.get(f"{api}/v1/analytics/nope", headers=auth(key), timeout=30).status_code == 404
    for q in ("since=never", "bucket=0"):
        r = httpx.get(f"{api}/v1/analytics/throughput?{q}", headers=auth(key), timeout=30)
        assert r.status_code == 422, (q, r.text)
    submit_only = make_key(s, "acme", [Role.SUBMIT])
    r = httpx.get(f"{api}/v1/analytics/per_agent", headers=auth(submit_only), timeout=30)
    assert r.status_code == 403
