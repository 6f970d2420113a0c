"""Docker cannot run here, so the deployment files are checked for structure instead:
docker-compose.kafka.yml, deploy/Dockerfile and deploy/k8s/*.yaml. Every command they run is
looked up in the real CLI (Typer introspection), so a compose or k8s command that the CLI
lacks fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from stormline.cli import app
from stormline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.kafka.yml"
K8S = ROOT / "deploy" / "k8s"
SECRET_NAME = re.compile(r"(API_KEY|PASSWORD|TOKEN|SECRET)", re.I)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")
STORMLINE_SERVICES = ("router", "worker", "evaluator", "sink", "trainer", "simulate-llm", "api")
# The secrets each service may see, and no other (least privilege): compose and k8s alike.
LLM_KEYS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
CLICKHOUSE = {"STORMLINE_CLICKHOUSE_URL"}
COMPOSE_SECRETS = {"worker": LLM_KEYS, "evaluator": LLM_KEYS, "sink": CLICKHOUSE, "cli": CLICKHOUSE}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def cli_group() -> Any:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


def resolve(argv: list[str]) -> tuple[Any, list[str]]:
    """The CLI command that ``argv`` (without the program name) runs, and its arguments."""
    cmd: Any = cli_group()
    args = list(argv)
    while hasattr(cmd, "commands"):
        assert args, f"{argv}: names a command group, not a command"
        name = args.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"`stormline {' '.join(argv)}`: the CLI has no command {name!r}"
        cmd = sub
    return cmd, args


def check_invocation(argv: list[str]) -> None:
    cmd, args = resolve(argv)
    known = {opt for p in cmd.params for opt in p.opts if opt.startswith("-")}
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"`stormline {' '.join(argv)}`: no option {a}"


def stormline_commands() -> dict[str, list[list[str]]]:
    """service -> the stormline invocations it runs, read from the compose file."""
    out: dict[str, list[list[str]]] = {}
    for name, svc in services().items():
        if "build" not in svc:
            continue
        entry = svc.get("entrypoint")
        if entry and entry[:2] == ["sh", "-c"]:
            runs = [
                shlex.split(part)[1:]
                for part in re.split(r"&&|;", entry[2])
                if shlex.split(part)[:1] == ["stormline"]
            ]
        else:
            runs = [list(svc.get("command") or [])]
        out[name] = runs
    return out


# ---------------------------------------------------------------------- compose --
def test_compose_has_the_stack_and_every_service() -> None:
    svc = services()
    for name in (
        "kafka",
        "schema-registry",
        "kafka-ui",
        "redis",
        "clickhouse",
        *STORMLINE_SERVICES,
    ):
        assert name in svc, name
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    roles = svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert "controller" in roles and "broker" in roles  # KRaft, no ZooKeeper
    assert not any("zookeeper" in n for n in svc)


def test_kafka_ui_is_wired_to_the_cluster_and_the_registry() -> None:
    svc = services()
    ui = svc["kafka-ui"]
    assert ui["image"].startswith("ghcr.io/kafbat/kafka-ui")
    env = ui["environment"]
    assert env["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"].split(":")[0] == "kafka"
    registry = env["KAFKA_CLUSTERS_0_SCHEMAREGISTRY"]
    assert registry.startswith("http://schema-registry:")
    # The same Confluent-compatible endpoint the services use.
    assert svc["sink"]["environment"]["STORMLINE_SCHEMA_REGISTRY_URL"] == registry
    assert set(ui["depends_on"]) == {"kafka", "schema-registry"}


def test_every_service_has_a_healthcheck_or_conditioned_dependencies() -> None:
    svc = services()
    conditions = {"service_healthy", "service_started", "service_completed_successfully"}
    for name, s in svc.items():
        health = s.get("healthcheck") or {}
        has_check = bool(health.get("test")) and not health.get("disable")
        deps = s.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in svc, f"{name} depends on unknown service {dep}"
            assert cond.get("condition") in conditions, f"{name} -> {dep}: {cond}"
        assert has_check or deps, f"{name}: neither a healthcheck nor conditioned depends_on"
        if has_check:
            assert health["test"][0] in ("CMD", "CMD-SHELL"), name


def test_volumes_are_named_and_declared() -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    used = set()
    for name, s in doc["services"].items():
        for v in s.get("volumes") or []:
            source = v.split(":")[0] if isinstance(v, str) else v["source"]
            assert not source.startswith(("/", ".")), f"{name}: bind mount {source}, use a volume"
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
    for stateful in ("kafka", "redis", "clickhouse"):
        assert doc["services"][stateful].get("volumes"), stateful
    assert used == declared, f"declared but unused: {declared - used}"


def _env_items(env: Any) -> list[tuple[str, str | None]]:
    if isinstance(env, dict):
        return [(k, None if v is None else str(v)) for k, v in env.items()]
    return [(e.split("=", 1)[0], e.split("=", 1)[1] if "=" in e else None) for e in env or []]


def test_no_literal_secrets() -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"sk-[A-Za-z0-9_\-]{8,}", text)
    for name, s in services().items():
        for key, value in _env_items(s.get("environment")):
            if SECRET_NAME.search(key):
                assert value is None or INTERPOLATION.match(value), f"{name}: {key} has a value"
            for m in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", value or ""):
                assert INTERPOLATION.match(m[2]), f"{name}: {key} embeds a password"
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        # Passed through from the host by name only.
        assert key in services()["worker"]["environment"]


def test_compose_secrets_only_where_used() -> None:
    """Least privilege: a secret reaches only the services that use it; the shared block
    (x-stormline) carries none."""
    shared = compose()["x-stormline"]["environment"]
    assert not [k for k in shared if SECRET_NAME.search(k) or k in CLICKHOUSE], shared
    for name, s in services().items():
        if "build" not in s:
            continue
        env = dict(_env_items(s.get("environment")))
        secrets = {k for k in env if SECRET_NAME.search(k) or k in CLICKHOUSE}
        assert secrets == COMPOSE_SECRETS.get(name, set()), name


def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (volume, read-only) of a service's short-syntax volumes."""
    out = {}
    for v in svc.get("volumes") or []:
        source, target, *mode = v.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def test_compose_router_reads_the_volume_the_trainer_writes_checkpoints_to() -> None:
    """The trainer publishes the path it wrote; the router loads that path. So both mount one
    volume at the path STORMLINE_CHECKPOINT_URI names (the router read-only), and the image
    creates that path owned by the service user (a fresh named volume takes its owner)."""
    svc = services()
    uris = {
        n: dict(_env_items(svc[n]["environment"]))["STORMLINE_CHECKPOINT_URI"]
        for n in svc
        if "build" in svc[n]
    }
    assert len(set(uris.values())) == 1, uris  # every service agrees where checkpoints are
    path = uris["trainer"]
    trainer, router = _mounts(svc["trainer"]), _mounts(svc["router"])
    assert path in trainer and path in router, (trainer, router)
    assert trainer[path][0] == router[path][0], "router and trainer mount different volumes"
    assert router[path][1] and not trainer[path][1], "router read-only, trainer read-write"
    assert trainer["/data"][0] != router["/data"][0]  # their own state stays their own
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p [^&]*{path}\b", dockerfile)
    assert re.search(rf"chown stormline [^&]*{path}\b", dockerfile)


def test_stormline_services_share_one_image_from_deploy_dockerfile() -> None:
    built = {n: s for n, s in services().items() if "build" in s}
    assert set(STORMLINE_SERVICES) <= set(built)
    assert {s["image"] for s in built.values()} == {"stormline:latest"}
    for s in built.values():
        assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == (
            ROOT / "deploy" / "Dockerfile"
        )
    assert services()["worker"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize("service", sorted(stormline_commands()))
def test_compose_command_exists_in_the_cli(service: str) -> None:
    runs = stormline_commands()[service]
    assert runs and all(runs), f"{service}: no stormline command"
    for argv in runs:
        check_invocation(argv)


def test_a_missing_command_would_be_caught() -> None:
    with pytest.raises(AssertionError, match="no command 'no-such-service'"):
        check_invocation(["no-such-service"])
    with pytest.raises(AssertionError, match="no option --nope"):
        check_invocation(["sink", "--nope"])


# ---------------------------------------------------------------------- Dockerfile --
def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["stormline"]' in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "USER " in text  # not root


# ---------------------------------------------------------------------------- k8s --
def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_k8s_deployments_for_every_service() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert "StatefulSet" not in kinds
    deployments = {
        d["metadata"]["name"].removeprefix("stormline-"): d
        for d in docs
        if d["kind"] == "Deployment"
    }
    for name in ("router", "worker", "evaluator", "sink", "trainer"):
        assert name in deployments, name
    assert deployments["worker"]["spec"]["replicas"] > 1
    for name, d in deployments.items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        check_invocation(c["args"])
        assert {"configMapRef": {"name": "stormline-settings"}} in c["envFrom"], name
        assert d["spec"]["selector"]["matchLabels"].items() <= (
            d["spec"]["template"]["metadata"]["labels"].items()
        )
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustom["resources"]) == sorted(
        f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml"
    )


# The Secret keys each Deployment may read, and no other.
KAFKA_SECRET = {("stormline-kafka", "STORMLINE_KAFKA_SASL_PASSWORD")}
LLM_SECRET = {("stormline-llm", "OPENAI_API_KEY"), ("stormline-llm", "ANTHROPIC_API_KEY")}
K8S_SECRETS = {
    "router": KAFKA_SECRET,
    "worker": KAFKA_SECRET | LLM_SECRET,
    "evaluator": KAFKA_SECRET | LLM_SECRET,
    "sink": KAFKA_SECRET | {("stormline-clickhouse", "STORMLINE_CLICKHOUSE_URL")},
    "trainer": KAFKA_SECRET,
    "api": KAFKA_SECRET,
    "simulate-llm": set(),
}


def deployments() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"].removeprefix("stormline-"): d
        for d in k8s_docs()
        if d["kind"] == "Deployment"
    }


def container(d: dict[str, Any]) -> dict[str, Any]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return c


def configmap() -> dict[str, str]:
    (cm,) = [d for d in k8s_docs() if d["metadata"]["name"] == "stormline-settings"]
    return cm["data"]


def test_k8s_settings_are_real_and_no_secret_in_a_configmap() -> None:
    docs = k8s_docs()
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret values in manifests"
    names = [*configmap()]
    for d in deployments().values():
        names += [e["name"] for e in container(d).get("env", []) if "value" in e]
    for key in names:
        assert key.startswith("STORMLINE_"), key
        assert key.removeprefix("STORMLINE_").lower() in Settings.model_fields, key
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in cm["data"].items():
            assert not SECRET_NAME.search(key) and key not in CLICKHOUSE, key
            assert not re.search(r"://[^/@\s]+:[^@\s]+@", value), f"{key}: a password"


def test_k8s_each_deployment_gets_only_the_secret_keys_it_needs() -> None:
    got = {}
    for name, d in deployments().items():
        c = container(d)
        assert not [e for e in c.get("envFrom", []) if "secretRef" in e], f"{name}: all keys"
        refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e]
        assert all(r.get("optional") is True for r in refs), name  # simulated runs need none
        got[name] = {(r["name"], r["key"]) for r in refs}
        # No Kubernetes API token either: nothing here talks to the API server.
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, name
    assert got == K8S_SECRETS


def test_k8s_namespace_and_probes_on_every_deployment() -> None:
    docs = k8s_docs()
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert ns["metadata"]["name"] == kustom["namespace"] == "stormline"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "stormline"
    }
    for name, d in deployments().items():
        c = container(d)
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in c, f"{name}: no {probe}"
            p = c[probe]
            if "httpGet" in p:
                assert p["httpGet"]["port"] in ports, f"{name}: {probe} on an unexposed port"
            else:  # no HTTP port: the probe runs a real CLI command
                assert p["exec"]["command"][0] == "stormline", name
                check_invocation(p["exec"]["command"][1:])
    api = container(deployments()["api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    api_env = {e["name"]: e.get("value") for e in api["env"]}
    assert api_env["STORMLINE_API_PORT"] == "8000" and api_env["STORMLINE_API_HOST"] == "0.0.0.0"


def test_k8s_router_changelogs_are_replicated_three_times() -> None:
    from stormline.streams.kafka import internal_topics

    env = configmap()
    assert env["STORMLINE_ROUTER_REPLICATION"] == "3"
    s = Settings(router_replication=int(env["STORMLINE_ROUTER_REPLICATION"]))
    changelogs = [t for t in internal_topics(s) if t.name.endswith("-changelog")]
    assert changelogs and {t.replication for t in changelogs} == {3}


def test_k8s_router_and_trainer_share_a_read_write_many_checkpoint_claim() -> None:
    """Router and trainer may be on different nodes: one ReadWriteMany claim, mounted by both
    at the path STORMLINE_CHECKPOINT_URI names (the router read-only), the pods' group owning
    it (fsGroup) so the trainer's uid can write."""
    path = configmap()["STORMLINE_CHECKPOINT_URI"]
    claims = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    seen = {}
    for name in ("router", "trainer"):
        d = deployments()[name]
        pod = d["spec"]["template"]["spec"]
        (mount,) = [m for m in container(d)["volumeMounts"] if m["mountPath"] == path]
        (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claim = vol["persistentVolumeClaim"]["claimName"]
        seen[name] = (claim, bool(mount.get("readOnly")))
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    assert seen["router"][0] == seen["trainer"][0], seen
    assert seen == {"router": (seen["router"][0], True), "trainer": (seen["trainer"][0], False)}
    assert claims[seen["router"][0]]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_keda_lag_scaling_is_an_option_off_by_default() -> None:
    from stormline.schemas.catalog import ASSIGNMENTS

    keda = K8S / "keda"
    overlay = yaml.safe_load((keda / "kustomization.yaml").read_text())
    default = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "keda" not in " ".join(default["resources"])  # off by default
    assert ".." in overlay["resources"]
    for r in overlay["resources"]:
        assert (keda / r).exists(), r
    (so,) = [d for d in yaml.safe_load_all((keda / "worker-scaledobject.yaml").read_text()) if d]
    target = so["spec"]["scaleTargetRef"]["name"]
    assert target in {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "Deployment"}
    (trigger,) = so["spec"]["triggers"]
    s = Settings(topic_prefix=configmap()["STORMLINE_TOPIC_PREFIX"])
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == s.topic(s.worker_group)
    assert trigger["metadata"]["topic"] == ASSIGNMENTS.name(s)
    assert (
        trigger["metadata"]["bootstrapServers"] == configmap()["STORMLINE_KAFKA_BOOTSTRAP_SERVERS"]
    )
    # The overlay deletes the CPU HPA on the same Deployment (two HPAs would fight).
    hpas = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "HorizontalPodAutoscaler"}
    (patch,) = overlay["patches"]
    assert patch["target"]["name"] in hpas and "$patch: delete" in patch["patch"]
