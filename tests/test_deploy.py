"""Kubernetes manifests: valid against the API schemas (offline) and consistent with the service."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lcnet_runner.settings import REQUEST_TIMEOUT_S, ServingSettings

kubernetes_validate = pytest.importorskip("kubernetes_validate")
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kubernetes" / name).read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_deployment_matches_the_service_settings() -> None:
    (container,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    settings = ServingSettings.from_env(env)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 3000, "grpc": settings.grpc_port}
    # CPU request = workers × threads, so the pod never oversubscribes its cores.
    assert (
        int(container["resources"]["requests"]["cpu"]) == settings.workers * settings.runner.threads
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A rollout never lowers capacity, and a pod leaves the Service before it stops listening.
    deployment = load("deployment.yaml")["spec"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["template"]["spec"]
    assert (
        0
        < container["lifecycle"]["preStop"]["sleep"]["seconds"]
        < pod["terminationGracePeriodSeconds"]
    )
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    service_ports = {p["name"]: p["targetPort"] for p in load("service.yaml")["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}
    assert load("hpa.yaml")["spec"]["scaleTargetRef"]["name"] == "lcnet"
    # The HPA owns the replica count; a drain takes one pod of them at a time.
    assert "replicas" not in deployment and load("hpa.yaml")["spec"]["minReplicas"] >= 2
    assert load("pdb.yaml")["spec"]["selector"] == deployment["selector"]
    # Threads follow the pod's CPU request, not its node's cores.
    assert settings.runner.solo_threads == int(container["resources"]["requests"]["cpu"])
    # Long enough for preStop and the longest request BentoML lets run.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= container["lifecycle"]["preStop"]["sleep"]["seconds"] + REQUEST_TIMEOUT_S
