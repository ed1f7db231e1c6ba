"""deploy/k8s manifests: schema-valid for Kubernetes (kubernetes-validate, strict: unknown fields fail), the
ServiceMonitor against its own schema (a CRD: no Kubernetes schema covers it), and consistent with each other
and with the image (labels, ports, probes, volumes, drain timing)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.deploy.conftest import K8S, load_yaml_all

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (part of the dev extra) to validate deploy/k8s"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")

# Oldest Kubernetes we claim (autoscaling/v2 and policy/v1 are GA there) and the newest schemas the package has.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
SERVICEMONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")
CRD_KINDS = {"ServiceMonitor", "PyTorchJob"}  # PyTorchJob: tests/deploy/test_k8s_training.py


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(str(path.relative_to(K8S)), doc) for doc in load_yaml_all(path)]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in by_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def test_the_expected_manifests_exist() -> None:
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "PersistentVolumeClaim"} <= kinds
    assert {d["metadata"]["name"] for d in by_kind("Deployment")} == {"aim", "aim-gpu", "aim-index-writer"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    checked = 0
    for where, doc in manifests():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
        checked += 1
    assert checked >= 8


def test_the_validator_catches_a_misspelt_field() -> None:
    """Guard against a vacuous pass: strict validation must reject an unknown field in a container."""
    deployment = copy.deepcopy(named("Deployment", "aim"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_servicemonitor_matches_its_crd_schema() -> None:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    monitors = by_kind("ServiceMonitor")
    assert monitors
    for monitor in monitors:
        errors = sorted(validator.iter_errors(monitor), key=lambda e: list(e.path))
        assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    bad = copy.deepcopy(monitors[0])
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(validator.iter_errors(bad)), "the schema must reject unknown endpoint fields"
    bad = copy.deepcopy(monitors[0])
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert list(validator.iter_errors(bad)), "the schema must reject a malformed duration"


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_monitor_and_service_reach_every_server_pod() -> None:
    service = named("Service", "aim")
    monitor = named("ServiceMonitor", "aim")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    pdb = named("PodDisruptionBudget", "aim")
    for deployment in (named("Deployment", "aim"), named("Deployment", "aim-gpu")):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
        assert labels_match(service["spec"]["selector"], pod_labels), f"Service misses {deployment['metadata']['name']}"
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    # Two Deployments must never select each other's pods (they would fight over them).
    deployments = by_kind("Deployment")
    for a in deployments:
        for b in deployments:
            if a is not b:
                pod_labels = b["spec"]["template"]["metadata"]["labels"]
                assert not labels_match(a["spec"]["selector"]["matchLabels"], pod_labels), (
                    f"{a['metadata']['name']} selects the pods of {b['metadata']['name']}"
                )
    # Index changes go to the writer alone; the ServiceMonitor scrapes it too (index metrics).
    writer_service = named("Service", "aim-index-writer")
    writer_pods = named("Deployment", "aim-index-writer")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(writer_service["spec"]["selector"], writer_pods)
    assert not labels_match(service["spec"]["selector"], writer_pods)
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], writer_service["metadata"]["labels"])


@pytest.mark.parametrize("name", ["aim", "aim-gpu"])
def test_deployment_probes_drain_and_hardening(name: str) -> None:
    deployment = named("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"] == "http"
    assert {p["containerPort"] for p in container["ports"]} == {Settings().port}
    # preStop pause + the service's own drain must fit in the grace period, or SIGKILL cuts requests off.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    settings = Settings()
    needed = float(pre_stop[1]) + settings.drain_grace_s + settings.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > needed
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The image's USER is 10001 (Dockerfile runtime-base); the pod enforces non-root and a read-only root.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/models", "/index", "/tmp"} <= set(mounts)
    assert mounts["/index"]["readOnly"] is True, "replicas share the index as a read-only snapshot"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {pvc["metadata"]["name"] for pvc in by_kind("PersistentVolumeClaim")}
    config_maps = {e["configMapRef"]["name"] for e in container.get("envFrom", [])}
    assert config_maps <= {cm["metadata"]["name"] for cm in by_kind("ConfigMap")}


def test_index_is_shared_read_only_with_a_single_writer() -> None:
    settings = named("ConfigMap", "aim-settings")["data"]
    assert settings["AIM_INDEX_READ_ONLY"] == "true" and settings["AIM_INDEX_PATH"].startswith("/index/")
    assert "ReadWriteMany" in named("PersistentVolumeClaim", "aim-index")["spec"]["accessModes"]
    writer = named("Deployment", "aim-index-writer")
    assert writer["spec"]["replicas"] == 1 and writer["spec"]["strategy"]["type"] == "Recreate"
    container = writer["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["AIM_INDEX_READ_ONLY"] == "false"
    index_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/index")
    assert not index_mount.get("readOnly")
    assert not any(
        h["spec"]["scaleTargetRef"]["name"] == "aim-index-writer" for h in by_kind("HorizontalPodAutoscaler")
    ), "the writer must never be scaled out"


def test_gpu_deployment_requests_a_gpu() -> None:
    container = named("Deployment", "aim-gpu")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":gpu")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AIM_DEVICE"] == "cuda"


def test_configmap_sets_only_real_settings() -> None:
    known = {f"AIM_{n.upper()}" for n in Settings.model_fields}
    for cm in by_kind("ConfigMap"):
        for key in cm["data"]:
            assert key in known or key.startswith("HF_"), f"ConfigMap {cm['metadata']['name']}: unknown {key}"


def test_hpas_target_existing_deployments() -> None:
    deployments = {d["metadata"]["name"] for d in by_kind("Deployment")}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The custom-metric HPA scales on a metric the service really exports.
    from service.metrics import ServiceMetrics

    exported = {family.name for family in ServiceMetrics().registry.collect()}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in exported
