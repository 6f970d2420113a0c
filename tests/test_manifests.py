"""Schema checks of the deployment files: docker-compose.kafka.yml against the Compose
Specification's JSON schema (vendored in deploy/schemas/, see its README), every manifest in
deploy/k8s against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown field
is an error), and the KEDA ScaledObject against KEDA's own model (cloudcoil-models-keda,
generated from KEDA's CRDs). Each check is shown to fail on a deliberately broken file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.kafka.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor the manifests are meant for, and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.rglob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue  # kustomize's own file, not a Kubernetes object
        out += [(str(f.relative_to(ROOT)), d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def check_k8s(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is not a valid object of its kind (every version in K8S_VERSIONS)."""
    if doc.get("apiVersion", "").startswith("keda.sh/"):
        check_keda(doc)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def check_keda(doc: dict[str, Any]) -> None:
    """KEDA's model checks types and required fields; it ignores unknown ones, so a field the
    model dropped on the way back is an unknown field (what the CRD's schema would prune)."""
    assert doc["kind"] == "ScaledObject", doc["kind"]
    model = ScaledObject.model_validate(doc)
    back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if back != doc:
        raise ValueError(f"fields KEDA's ScaledObject does not have: {_dropped(doc, back)}")


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(given, dict):
        return [
            p
            for k, v in given.items()
            for p in ([f"{path}.{k}"] if k not in kept else _dropped(v, kept[k], f"{path}.{k}"))
        ]
    if isinstance(given, list):
        return [
            p
            for i, (a, b) in enumerate(zip(given, kept, strict=True))
            for p in _dropped(a, b, f"{path}[{i}]")
        ]
    return [] if given == kept else [f"{path}={given!r}"]


# ------------------------------------------------------------------------- compose --
def test_compose_file_matches_the_compose_spec_schema() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert compose_errors(doc) == []


@pytest.mark.parametrize(
    ("what", "breakage"),
    [
        ("a misspelt service key", lambda d: d["services"]["router"].update(volume=[])),
        (
            "a dependency condition that does not exist",
            lambda d: d["services"]["api"]["depends_on"].update(
                {"init": {"condition": "service_done"}}
            ),
        ),
        ("a port that is not a port", lambda d: d["services"]["api"].update(ports=[{"x": 1}])),
    ],
    ids=["misspelt-key", "unknown-condition", "bad-port"],
)
def test_a_broken_compose_file_fails_the_schema(what: str, breakage: Any) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    broken = copy.deepcopy(doc)
    breakage(broken)
    assert compose_errors(broken), what


# ---------------------------------------------------------------------------- k8s --
@pytest.mark.parametrize(
    "doc",
    [pytest.param(d, id=f"{p}:{d['kind']}/{d['metadata']['name']}") for p, d in manifests()],
)
def test_manifest_matches_its_schema(doc: dict[str, Any]) -> None:
    check_k8s(doc)


def test_the_manifests_cover_every_kind_they_use() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert {"Namespace", "ConfigMap", "Deployment", "Service"} <= kinds
    assert {"PersistentVolumeClaim", "HorizontalPodAutoscaler", "ScaledObject"} <= kinds


def _router() -> dict[str, Any]:
    (doc,) = [d for p, d in manifests() if d["kind"] == "Deployment" and "router" in p]
    return copy.deepcopy(doc)


def _probe_typo(d: dict[str, Any]) -> None:
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")


def _replicas_text(d: dict[str, Any]) -> None:
    d["spec"]["replicas"] = "two"


def _mount_without_path(d: dict[str, Any]) -> None:
    del d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]


@pytest.mark.parametrize("breakage", [_probe_typo, _replicas_text, _mount_without_path])
def test_a_broken_deployment_fails_the_kubernetes_schema(breakage: Any) -> None:
    doc = _router()
    check_k8s(doc)  # the intact one passes
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        check_k8s(doc)


def _scaled_object() -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == "ScaledObject"]
    return copy.deepcopy(doc)


def test_a_broken_scaled_object_fails_keda_s_model() -> None:
    doc = _scaled_object()
    check_k8s(doc)
    doc["spec"]["minReplicaCount"] = "two"
    with pytest.raises(ValidationError, match="minReplicaCount"):
        check_k8s(doc)
    doc = _scaled_object()
    doc["spec"]["maxReplicaCont"] = 3  # a typo: KEDA would silently prune it
    with pytest.raises(ValueError, match=r"\.spec\.maxReplicaCont"):
        check_k8s(doc)
    doc = _scaled_object()
    del doc["spec"]["scaleTargetRef"]
    with pytest.raises(ValidationError, match="scaleTargetRef"):
        check_k8s(doc)
