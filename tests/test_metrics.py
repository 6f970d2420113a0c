"""Prometheus metrics: every service's /metrics over HTTP while tasks flow, and the pure parts.

The loop test runs router, worker, evaluator, sink, trainer and API as real processes (the
in-process supervisor of ``tests/loop.py``), each with its own ``STORMLINE_METRICS_PORT``,
on the shared stack; it scrapes each one, puts load through (tasks over the API and onto
Kafka, undecodable records), scrapes again and checks that the main metrics moved.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from stormline import metrics
from stormline.api.models import Role
from stormline.deploy.demo_tasks import demo_tasks
from stormline.deploy.supervisor import ServiceSpec, with_metrics_ports
from stormline.runtime.producer import RecordProducer
from stormline.schemas.catalog import TASKS, TRAJECTORIES
from stormline.settings import Settings
from tests.api_fixtures import auth, make_key
from tests.conftest import free_port, settings_env, wait_http, wait_until
from tests.loop import Loop

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "stormline.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ============================================================================ helpers ==
def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


# ========================================================================= pure parts ==
class _Kind:
    value = "server"


class _ProviderError(Exception):
    kind = _Kind()


@pytest.mark.parametrize(
    ("exc", "elapsed", "outcome"),
    [
        (_ProviderError(), 0.1, "server"),
        (TimeoutError(), 0.1, "timeout"),
        (asyncio.CancelledError(), 2.99, "timeout"),  # wait_for cut it at the try's timeout
        (asyncio.CancelledError(), 0.5, "cancelled"),  # a drain cut it
        (ValueError("unreadable"), 0.1, "error"),
    ],
)
def test_an_llm_calls_outcome_comes_from_its_exception(
    exc: BaseException, elapsed: float, outcome: str
) -> None:
    assert metrics._outcome(exc, elapsed, 3.0) == outcome


def test_llm_call_counts_times_and_adds_usage() -> None:
    agent = f"a-{uuid.uuid4().hex[:6]}"
    with metrics.llm_call(agent, "openai", 3.0) as call:
        call.usage(10, 5, 0.002)
    with pytest.raises(TimeoutError), metrics.llm_call(agent, "openai", 3.0):
        raise TimeoutError
    got = {(n, ls): v for (n, ls), v in _registry().items() if ("agent", agent) in ls}
    assert total(got, "stormline_llm_calls_total", outcome="ok") == 1
    assert total(got, "stormline_llm_calls_total", outcome="timeout") == 1
    assert total(got, "stormline_llm_call_duration_seconds_count") == 2
    assert total(got, "stormline_llm_tokens_total", kind="prompt") == 10
    assert total(got, "stormline_llm_tokens_total", kind="completion") == 5
    assert total(got, "stormline_llm_cost_usd_total") == pytest.approx(0.002)


def _registry() -> Samples:
    out: Samples = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class _Owner:
    def __init__(self, n: int, fail: bool = False) -> None:
        self.n, self.fail = n, fail


def _read(o: _Owner) -> list[metrics.Sample]:
    if o.fail:
        raise RuntimeError("Consumer closed")
    return [(("x",), o.n)]


def test_watched_sums_sources_skips_failing_ones_and_forgets_dead_owners() -> None:
    fam = metrics.Watched(f"t_watched_{uuid.uuid4().hex[:6]}", "test", ["k"])
    try:
        a, b, bad = _Owner(2), _Owner(3), _Owner(9, fail=True)
        for o in (a, b, bad):
            fam.watch(o, _read)
        assert fam.samples() == {("x",): 5.0}  # summed; the failing one left out
        del a
        gc.collect()
        assert fam.samples() == {("x",): 3.0}
        fam.unwatch(b)
        assert fam.samples() == {}
    finally:
        REGISTRY.unregister(fam)


def _part(n: int, state: str = "active", **offsets: int) -> dict[str, Any]:
    base = {"hi_offset": -1001, "app_offset": -1001, "committed_offset": -1001}
    base |= {"lo_offset": 0, "consumer_lag": -1, **offsets}
    return {"partition": n, "fetch_state": state, **base}


def test_consumer_lag_comes_from_librdkafkas_statistics_report() -> None:
    # The shapes a real report had (librdkafka's stats_cb on the shared stack).
    report = {
        "topics": {
            "p.trajectories": {
                "partitions": {
                    "0": _part(0, hi_offset=120, committed_offset=100, consumer_lag=20),
                    "1": _part(1, hi_offset=50, app_offset=45),  # read, nothing committed
                    "2": _part(2, hi_offset=30, lo_offset=10),  # nothing read or committed
                    "3": _part(3, "none", hi_offset=9, consumer_lag=9),  # not ours
                    "-1": _part(-1, "none"),  # librdkafka's internal partition
                }
            }
        }
    }
    lag = metrics.lag_from_stats(json.dumps(report))
    assert lag == {("p.trajectories", 0): 20, ("p.trajectories", 1): 5, ("p.trajectories", 2): 20}


def test_up_all_gives_each_service_its_own_metrics_port() -> None:
    specs = [
        ServiceSpec("simulate-llm", ["simulate-llm"]),
        ServiceSpec("router", ["router"]),
        ServiceSpec("worker-1", ["worker"]),
        ServiceSpec("worker-2", ["worker"]),
    ]
    with_metrics_ports(specs, 9400)
    assert [s.metrics_port for s in specs] == [None, 9401, 9402, 9403]
    assert specs[2].env == {"STORMLINE_METRICS_PORT": "9402"}
    off = [ServiceSpec("router", ["router"])]
    assert with_metrics_ports(off, 0)[0].env == {}


def test_serve_survives_a_taken_port_then_serves() -> None:
    if metrics.serving_port() is None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            assert metrics.serve(taken.getsockname()[1], "test") is None  # said, not raised
        assert metrics.serve(0, "test") is None
        metrics.serve(free_port(), "test")
    port = metrics.serving_port()
    assert port is not None
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'stormline_service_info{service="test"} 1.0' in body


# ========================================================================== dashboard ==
def _declared_names() -> set[str]:
    """Every series name this process can export: stormline.metrics and Faust's sensor."""
    from faust.sensors.prometheus import FaustMetrics
    from prometheus_client import CollectorRegistry

    out = set()
    for family in REGISTRY.collect():
        if family.name.startswith("stormline_"):
            out |= _series(family.name, family.type)
    faust = CollectorRegistry()
    FaustMetrics.create(faust, "faust")
    for family in faust.collect():
        out |= _series(family.name, family.type)
    return out


def _series(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


def test_the_dashboard_is_grafana_json_and_names_only_declared_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["uid"] and isinstance(doc["schemaVersion"], int)
    panels = doc["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 12
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    declared = _declared_names()
    used = set()
    for expr in exprs:
        found = set(re.findall(r"\b((?:stormline|faust)_[a-z0-9_]+)", expr))
        assert found, f"no Stormline metric in {expr!r}"
        used |= found
    assert used <= declared, f"not declared in stormline/metrics.py: {used - declared}"
    for family in ("stormline_router_tasks_routed_total", "stormline_llm_call_duration_seconds"):
        assert any(u.startswith(family) for u in used)


# ====================================================================== the real loop ==
SERVICES = ("router", "worker-0", "evaluator", "sink", "trainer", "api")


@pytest.fixture(scope="module")
def loop(stack_settings: Settings, tmp_path_factory: Any) -> Iterator[Loop]:
    lp = Loop(
        stack_settings,
        tmp_path_factory.mktemp("metrics"),
        workers=1,
        sink=True,
        trainer=True,
        # One Ray worker: the machine is shared; FAST_LOOP_ENV trains on 100 experiences.
        extra_env={"STORMLINE_RAY_NUM_WORKERS": "1", "STORMLINE_RAY_NUM_CPUS": "1"},
    )
    api_port = free_port()
    lp.sup.specs.append(ServiceSpec("api", ["api", "--port", str(api_port)]))
    for spec in lp.sup.specs:
        if spec.name != "simulate-llm":
            spec.metrics_port = free_port()
            spec.env["STORMLINE_METRICS_PORT"] = str(spec.metrics_port)
    lp.api_url = f"http://127.0.0.1:{api_port}"  # type: ignore[attr-defined]
    with lp:
        yield lp


def _url(loop: Loop, service: str) -> str:
    (spec,) = [s for s in loop.sup.specs if s.name == service]
    return f"http://127.0.0.1:{spec.metrics_port}/metrics"


def _bad_records(s: Settings, n: int) -> None:
    """Bytes that are not Avro on tasks (the router's) and trajectories (evaluator, sink,
    trainer): each reader dead-letters them with reason "framing"."""
    p = RecordProducer(s)
    for i in range(n):
        p.produce(TASKS.name(s), b"not avro", key=f"bad-{i}".encode())
        p.produce(TRAJECTORIES.name(s), b"not avro", key=f"bad-{i}".encode())
    p.flush(30)


def test_every_service_serves_metrics_that_move_under_load(loop: Loop) -> None:
    for name in SERVICES:
        wait_http(_url(loop, name), 120)
    key = make_key(loop.s, "team-m", [Role.SUBMIT, Role.READ])
    api = loop.api_url  # type: ignore[attr-defined]
    wait_http(f"{api}/healthz", 120)
    loop.publish(20)
    loop.wait_flowing(rewards=5)
    before = {name: scrape(_url(loop, name)) for name in SERVICES}

    fields = {"task_id", "task_type", "prompt", "expected", "evaluator", "priority"}
    tasks = [
        t.model_dump(mode="json", include=fields)
        for t in demo_tasks(10, run_id=uuid.uuid4().hex[:6])
    ]
    r = httpx.post(f"{api}/v1/tasks", json={"tasks": tasks}, headers=auth(key), timeout=30)
    assert r.status_code == 202, r.text
    loop.publish(120)  # with the 20 above: the trainer's batch of 100 experiences
    _bad_records(loop.s, 3)

    def moved(service: str, metric: str, by: float = 1, **labels: str) -> bool:
        now = total(scrape(_url(loop, service)), metric, **labels)
        return now >= total(before[service], metric, **labels) + by

    checks = [
        ("router", "stormline_router_tasks_routed_total", 100, {"strategy": "thompson"}),
        ("router", "stormline_router_events_total", 100, {"event": "assigned"}),
        ("router", "faust_messages_received_total", 100, {}),
        ("router", "stormline_dead_letters_total", 3, {"reason": "framing", "topic": "tasks"}),
        ("worker-0", "stormline_llm_calls_total", 100, {"outcome": "ok"}),
        ("worker-0", "stormline_llm_call_duration_seconds_count", 100, {}),
        ("worker-0", "stormline_llm_tokens_total", 100, {"kind": "completion"}),
        ("worker-0", "stormline_worker_trajectories_total", 100, {}),
        ("evaluator", "stormline_reward_value_count", 100, {}),
        ("evaluator", "stormline_dead_letters_total", 3, {"reason": "framing"}),
        ("sink", "stormline_sink_rows_written_total", 100, {"table": "trajectories"}),
        ("api", "stormline_api_tasks_submitted_total", 10, {}),
        ("trainer", "stormline_trainer_updates_total", 1, {}),
    ]
    for service, metric, by, labels in checks:
        wait_until(
            lambda s=service, m=metric, b=by, ls=labels: moved(s, m, b, **ls),
            timeout=150,
            what=f"{service}: {metric}{labels} up by {by}",
        )

    after = {name: scrape(_url(loop, name)) for name in SERVICES}
    worker, router = after["worker-0"], after["router"]
    assert total(worker, "stormline_llm_breaker_state") == 0  # every endpoint closed
    assert "stormline_worker_in_flight" in names(worker)
    assert total(router, "stormline_router_agent_status", status="healthy") == 3
    lag = [(ls, v) for (n, ls), v in after["evaluator"].items() if n == "stormline_consumer_lag"]
    assert lag and all(v >= 0 for _, v in lag)

    def trainer_lag() -> list[frozenset[tuple[str, str]]]:
        got = scrape(_url(loop, "trainer"))
        return [ls for (n, ls) in got if n == "stormline_consumer_lag"]

    lagging = wait_until(trainer_lag, timeout=40, what="the trainer's consumer lag")
    assert all(("group", loop.s.trainer_group_id) in ls for ls in lagging)
    decisions = total(after["trainer"], "stormline_trainer_promotion_decisions_total")
    assert decisions == total(after["trainer"], "stormline_trainer_updates_total")
    # Faust's own sensor and ours on the router's web port too.
    web = scrape(f"http://127.0.0.1:{loop.s.router_web_port}/metrics")
    assert {"faust_messages_received_total", "stormline_router_tasks_routed_total"} <= names(web)


# ===================================================================== `up --all` path ==
def test_up_all_serves_each_services_metrics_where_status_says(
    settings: Settings, tmp_path: Path
) -> None:
    """The operator's path: `up --all`, then `status` names each service's /metrics URL."""
    s = settings.model_copy(
        update={
            "simulator_port": free_port(),
            "router_web_port": free_port(),
            "api_port": free_port(),
            "metrics_base_port": free_port(),  # base + 1 ... base + 5: free enough in practice
        }
    )
    env = {
        **settings_env(s),
        "STORMLINE_AGENTS_FILE": str(Path(__file__).parent.parent / "agents.yaml"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "stormline.cli", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    up = cli("up", "--all", "--workers", "1", "--no-trainer")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        rows = json.loads(cli("status", "--json", "--services-only").stdout)["supervised"]
        ports = {r["name"]: r["metrics"] for r in rows}
        base = s.metrics_base_port
        assert ports == {
            "simulate-llm": None,
            "router": base + 1,
            "worker-1": base + 2,
            "evaluator": base + 3,
            "sink": base + 4,
            "api": base + 5,
        }
        service = {"worker-1": "worker"}
        for name, port in ports.items():
            if port is None:
                continue
            url = f"http://127.0.0.1:{port}/metrics"
            wait_http(url, 120)
            info = f'stormline_service_info{{service="{service.get(name, name)}"}} 1.0'
            assert info in httpx.get(url, timeout=10).text, name
        env["COLUMNS"] = "250"  # the table at full width, URLs unwrapped
        table = cli("status", "--services-only")
        assert f"http://127.0.0.1:{base + 2}/metrics" in table.stdout, table.stdout
    finally:
        cli("down")
