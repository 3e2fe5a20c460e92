"""BentoML's tracing on the service: the fast routes skip OpenTelemetry while no exporter is
configured (their spans would be built and dropped), and are traced like every route once one is."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import ROOT

from lcnet_runner.testing import Server


@pytest.fixture(scope="module")
def image(trained: dict) -> bytes:
    return (trained["dataset"] / "green" / "3.jpg").read_bytes()


def access_log(server: Server, path: str) -> list[str]:
    """BentoML's access log lines of ``path``; each ends with its trace and span ids when the
    request had a span."""
    return [line for line in server.output().splitlines() if f",path={path}," in line]


def classify_and_ask_model(server: Server, image: bytes) -> None:
    httpx.post(f"{server.url}/classify", files={"image": image}).raise_for_status()
    httpx.get(f"{server.url}/model").raise_for_status()


def test_fast_routes_untraced_without_an_exporter(server: Server, image: bytes) -> None:
    classify_and_ask_model(server, image)
    classified, model = access_log(server, "/classify"), access_log(server, "/model")
    assert classified and model
    assert not any("trace=" in line for line in classified)
    assert all("trace=" in line for line in model)  # the other routes keep BentoML's spans


def test_every_route_traced_with_an_exporter(trained: dict, image: bytes) -> None:
    # "in_memory": BentoML's exporter for tests; any exporter named in the config counts.
    tracing = {"exporter_type": "in_memory", "sample_rate": 1.0}
    overrides = {"services": {"lcnet": {"tracing": tracing}}}  # the service's name
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1",
           "BENTOML_CONFIG_OVERRIDES": json.dumps(overrides)}  # fmt: skip
    server = Server(str(ROOT), env).wait_ready()
    try:
        classify_and_ask_model(server, image)
    finally:
        server.stop()
    for path in ("/classify", "/model"):
        lines = access_log(server, path)
        assert lines and all("sampled=1" in line for line in lines), path
