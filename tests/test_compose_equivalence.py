"""docker-compose.kafka.yml learns: a checkpoint the trainer writes reaches the router.

No Docker engine runs here, so tests/compose_emulation.py runs each Stormline service's own
command with its own environment and volumes, in its own mount namespace, against the real
embedded stack (see that module for what is mapped and how). The loop runs as compose would
run it: init, simulate-llm, router, two workers, evaluator, trainer and the API; tasks go in
through the cli service (``docker compose run --rm -T cli publish -``), and so does the API key
the test reads the API with (``stormline keys create``). The sink is not run: it
writes to a ClickHouse server (STORMLINE_CLICKHOUSE_URL), which the embedded stack does not
have (it has chDB in-process).

Test-only settings, the same for every service: a topic prefix (the stack may be shared), and
STORMLINE_TRAINER_BATCH_MAX_WAIT_S=5 so that the trainer updates on its first few dozen
experiences instead of after 512 or 5 minutes. Nothing about paths, volumes or hosts.

A control router runs beside them: the router service exactly as composed, but without the
``checkpoints`` volume (as the file was before the two shared it), on its own prefix, fed the
same CheckpointPublished event. It must not load it: that is what makes this test able to fail.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import httpx
import pytest

from stormline.deploy.demo_tasks import demo_tasks
from stormline.schemas.catalog import CHECKPOINTS
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import CheckpointPublished
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests.compose_emulation import Deployment, Service, namespaces_available
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.timeout(900)

RUN = ["init", "simulate-llm", "router", "worker", "evaluator", "trainer", "api"]
TASKS = 48
CONTROL = "router-control"


def counters(dep: Deployment, router: str = "router") -> dict[str, object]:
    """The router's own view (its web port, as its compose healthcheck reads it)."""
    try:
        got = httpx.get(f"http://{dep.address(router, 6066)}/router/counters/", timeout=3)
        return dict(got.json()) if got.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def first_checkpoint(s: Settings, serde: Serde, timeout: float) -> CheckpointPublished:
    c = EventConsumer(s, serde, f"{s.topic_prefix}check-{uuid.uuid4().hex[:4]}", [CHECKPOINTS])
    try:
        return wait_until(
            lambda: next((r.event for r in c.poll_batch(10, 1.0)), None),
            timeout,
            "the trainer's first CheckpointPublished",
        )
    finally:
        c.close()


def test_a_checkpoint_the_trainer_writes_reaches_the_router(
    stack_settings: Settings, tmp_path: Path
) -> None:
    why = namespaces_available()
    assert why is None, f"this test runs each service in its own mount namespace: {why}"
    prefix = f"c{uuid.uuid4().hex[:6]}."
    dep = Deployment(
        tmp_path,
        stack_settings,
        host_env={"CLICKHOUSE_PASSWORD": "not-used-by-these-services"},
        overrides={"STORMLINE_TOPIC_PREFIX": prefix, "STORMLINE_TRAINER_BATCH_MAX_WAIT_S": "5"},
    )
    services = [dep.build(n) for n in RUN]
    control = control_router(dep, f"k{uuid.uuid4().hex[:6]}.")
    logs = tmp_path / "logs"
    try:
        dep.up(RUN, logs)
        dep.start(control, logs)
        dep.wait("router", "service_healthy", 240)
        # Tasks in, as an operator would: `docker compose run --rm cli publish -`.
        cli = dep.build("cli")
        lines = "".join(t.model_dump_json() + "\n" for t in demo_tasks(TASKS, seed=5))
        out = dep.run(cli, ["stormline", "publish", "-", "--json"], lines.encode())
        assert out.returncode == 0, out.stderr.decode()[-2000:]

        s = stack_settings.model_copy(update={"topic_prefix": prefix})
        serde = Serde.from_settings(s)
        event = first_checkpoint(s, serde, timeout=600)
        # Written where the trainer's compose volume is, under the path compose mounts it at.
        assert event.promoted, event.decision
        assert event.uri.startswith(f"{dep.root}/checkpoints/"), event.uri
        on_volume = dep.volume_dir("checkpoints") / event.uri.removeprefix(
            f"{dep.root}/checkpoints/"
        )
        assert json.loads((on_volume / "meta.json").read_text())["sha256"] == event.sha256

        # ... and the router loaded it: its view and its log say which version.
        view = wait_until(
            lambda: (c := counters(dep)).get("policy_version") == event.policy_version and c,
            120,
            f"the router's view to report {event.policy_version}",
        )
        assert int(view["policy_loads"]) >= 1  # type: ignore[call-overload]
        router_log = (logs / "router-1.log").read_text()
        assert f"loaded policy {event.policy_version} from {event.uri}" in router_log

        # The API, as composed, reaches the router's views and lists the checkpoint.
        key = dep.run(cli, ["stormline", "keys", "create", "--tenant", "ops", "--role", "operate"])
        assert key.returncode == 0, key.stderr.decode()[-2000:]
        api = f"http://{dep.address('api', 8000)}/v1"
        auth = {"X-API-Key": key.stdout.decode().strip()}
        assert httpx.get(f"{api}/agents", headers=auth, timeout=30).json()["router"] == "ok"
        listed = httpx.get(f"{api}/checkpoints", headers=auth, timeout=60).json()["checkpoints"]
        assert [(c["policy"], c["version"]) for c in listed] == [(event.policy, event.version)]

        # The control router (no checkpoints volume) gets the same event and cannot load it.
        ks = stack_settings.model_copy(
            update={"topic_prefix": control.env["STORMLINE_TOPIC_PREFIX"]}
        )
        kserde = Serde.from_settings(ks)
        ensure_topics(ks, [CHECKPOINTS])
        producer = EventProducer(ks, kserde)
        producer.publish([event])
        producer.close()
        control_log = logs / f"{CONTROL}-1.log"
        wait_until(
            lambda: f"policy {event.policy_version} not loaded" in control_log.read_text(),
            240,
            "the control router to try the checkpoint",
        )
        assert "no checkpoint weights at" in control_log.read_text()
        assert counters(dep, CONTROL).get("policy_version") is None
        # Whatever else ran, every service of the loop is still up, and the API answers.
        for svc in services:
            if svc.name != "init":
                assert all(p.poll() is None for p in svc.procs), f"{svc.name} exited"
        assert dep.healthy(dep.services["api"]), "the api's healthcheck (/readyz) fails"
    finally:
        dep.stop()


def control_router(dep: Deployment, prefix: str) -> Service:
    """The router service as composed, minus the checkpoints volume, on its own prefix."""
    svc = copy.deepcopy(dep.doc["services"]["router"])
    svc["volumes"] = [v for v in svc["volumes"] if not v.startswith("checkpoints:")]
    dep.ports[(CONTROL, 6066)] = f"127.0.0.1:{free_port()}"
    built = dep.build(CONTROL, svc)
    built.env["STORMLINE_TOPIC_PREFIX"] = prefix
    return built
