"""Docker cannot run here, so the deployment files are checked for structure instead:
docker-compose.kafka.yml and deploy/Dockerfile (deploy/k8s in tests/test_k8s_files.py). Every
command they run is looked up in the real CLI (Typer introspection), so a compose or k8s command
that the CLI lacks fails here. tests/test_compose_equivalence.py runs the compose services;
tests/test_manifests.py checks the files against their schemas."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from stormline.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.kafka.yml"
SECRET_NAME = re.compile(r"(API_KEY|PASSWORD|TOKEN|SECRET)", re.I)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")
STORMLINE_SERVICES = ("router", "worker", "evaluator", "sink", "trainer", "simulate-llm", "api")
# The secrets each service may see, and no other (least privilege): compose and k8s alike.
LLM_KEYS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
CLICKHOUSE = {"STORMLINE_CLICKHOUSE_URL"}
COMPOSE_SECRETS = {
    "worker": LLM_KEYS,
    "evaluator": LLM_KEYS,
    "sink": CLICKHOUSE,
    "api": CLICKHOUSE,  # /v1/analytics
    "cli": CLICKHOUSE,
}


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
    # A fresh volume takes the image's ownership from its first mount: init mounts it
    # read-write, and every Stormline service waits for init.
    assert _mounts(svc["init"]).get(path) == (trainer[path][0], False)
    for name in ("router", "trainer"):
        assert svc[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p [^&]*{path}\b", dockerfile)
    assert re.search(rf"chown stormline [^&]*{path}\b", dockerfile)


def test_compose_api_listens_on_8000_and_reaches_the_router() -> None:
    svc = services()
    api = dict(_env_items(svc["api"]["environment"]))
    assert svc["api"]["command"] == ["api"] and "8000:8000" in svc["api"]["ports"]
    assert (api["STORMLINE_API_HOST"], api["STORMLINE_API_PORT"]) == ("0.0.0.0", "8000")
    assert "/readyz" in " ".join(svc["api"]["healthcheck"]["test"])
    # Its router views come from the router service (its own 127.0.0.1 is not the router).
    router_port = svc["router"]["command"][svc["router"]["command"].index("--web-port") + 1]
    assert (api["STORMLINE_ROUTER_WEB_HOST"], api["STORMLINE_ROUTER_WEB_PORT"]) == (
        "router",
        router_port,
    )


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
