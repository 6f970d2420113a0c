"""deploy/k8s checked for structure (no cluster runs here; tests/test_manifests.py checks the
same manifests against the Kubernetes OpenAPI schemas): a Deployment per service running a real
CLI command, the Namespace, probes, the router's changelog replication, the checkpoint claim the
router and the trainer share, least-privilege secrets, and KEDA scaling as an option."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from stormline.settings import Settings
from tests.test_deploy_files import CLICKHOUSE, SECRET_NAME, check_invocation

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


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
CLICKHOUSE_SECRET = {("stormline-clickhouse", "STORMLINE_CLICKHOUSE_URL")}
K8S_SECRETS = {
    "router": KAFKA_SECRET,
    "worker": KAFKA_SECRET | LLM_SECRET,
    "evaluator": KAFKA_SECRET | LLM_SECRET,
    "sink": KAFKA_SECRET | CLICKHOUSE_SECRET,
    "trainer": KAFKA_SECRET,
    "api": KAFKA_SECRET | CLICKHOUSE_SECRET,
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
    router = container(deployments()["router"])
    # Not ready while its tables are recovered (503); alive all the while (no restart loop).
    assert router["readinessProbe"]["httpGet"]["path"] == "/router/health/"
    assert router["livenessProbe"]["httpGet"]["path"] == "/router/counters/"
    api = container(deployments()["api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    api_env = {e["name"]: e.get("value") for e in api["env"]}
    assert api_env["STORMLINE_API_PORT"] == "8000" and api_env["STORMLINE_API_HOST"] == "0.0.0.0"
    # The API reads the router's views through the router's Service.
    (router_svc,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "stormline-router"
    ]
    assert api_env["STORMLINE_ROUTER_WEB_HOST"] == router_svc["metadata"]["name"]
    assert int(api_env["STORMLINE_ROUTER_WEB_PORT"]) == router_svc["spec"]["ports"][0]["port"]


def test_k8s_router_changelogs_are_replicated_three_times() -> None:
    """The ConfigMap's settings give the router's changelogs (and the Faust app) 3 replicas
    with 2 in sync, on a cluster of 3 brokers (the pure part of topic creation)."""
    from stormline.runtime.admin import replication_for
    from stormline.streams.kafka import internal_topics

    env = configmap()
    s = Settings(
        **{
            k.removeprefix("STORMLINE_").lower(): v
            for k, v in env.items()
            if "REPLICA" in k  # the settings that decide replication
        }
    )
    rep = replication_for(s, brokers=3)
    # Configured, not guessed from the cluster's size: a smaller cluster refuses the topics
    # instead of creating them with one copy.
    assert replication_for(s, brokers=1).factor == 3
    changelogs = [t for t in internal_topics(s) if t.name.endswith("-changelog")]
    assert changelogs
    for t in changelogs:
        factor = t.replication or rep.factor  # None: the cluster's, as ensure_topics does
        config = rep.topic_config() if t.replication is None else t.config
        assert factor == 3 and config.get("min.insync.replicas") == "2", t
    assert (s.router_replication or rep.factor) == 3  # the Faust app's own factor


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
    """A kustomize Component that the default kustomization leaves out (one line turns it on):
    the ScaledObject on the workers' group and topic, and the CPU HPA deleted."""
    from stormline.schemas.catalog import ASSIGNMENTS

    keda = K8S / "keda"
    component = yaml.safe_load((keda / "kustomization.yaml").read_text())
    default = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert "components" not in default and "keda" not in default["resources"]  # off by default
    assert "# components:\n# - keda" in (K8S / "kustomization.yaml").read_text()
    for r in component["resources"]:
        assert (keda / r).exists(), r
    (so,) = [d for d in yaml.safe_load_all((keda / "worker-scaledobject.yaml").read_text()) if d]
    target = so["spec"]["scaleTargetRef"]["name"]
    assert target in {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "Deployment"}
    (trigger,) = so["spec"]["triggers"]
    s = Settings(topic_prefix=configmap()["STORMLINE_TOPIC_PREFIX"])
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == s.topic(s.worker_group)
    assert trigger["metadata"]["topic"] == ASSIGNMENTS.name(s)
    bootstrap = configmap()["STORMLINE_KAFKA_BOOTSTRAP_SERVERS"]
    assert trigger["metadata"]["bootstrapServers"] == bootstrap
    # The component deletes the CPU HPA on the same Deployment (two HPAs would fight).
    hpas = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "HorizontalPodAutoscaler"}
    (patch,) = component["patches"]
    assert patch["target"]["name"] in hpas and "$patch: delete" in patch["patch"]
