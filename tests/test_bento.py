"""`bentoml build` packs service + model; the Bento serves; a missing model is one clear error."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT
from serverproc import Server

from lcnet_runner.client import Client

pytestmark = pytest.mark.slow
BENTOML = str(Path(sys.executable).parent / "bentoml")


def bentoml_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [BENTOML, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def bento_tag(trained: dict) -> str:
    result = bentoml_cli("build", ".", "--output", "tag", env={"LCNET_MODEL": trained["tag"]})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def test_built_bento_serves_its_model(bento_tag: str, trained: dict, tmp_path: Path) -> None:
    # Served from an empty directory: everything must come from the Bento itself.
    server = Server(bento_tag, {"LCNET_MODEL": trained["tag"]}, cwd=tmp_path).wait_ready()
    try:
        image = (trained["dataset"] / "green" / "0.jpg").read_bytes()
        with Client(server.url) as client:
            assert client.classify(image)[0]["category"] == "green"
        with Client(server.grpc_url) as client:
            assert client.classify(image)[0]["category"] == "green"
    finally:
        server.stop()


def test_export_contains_a_dockerfile_exposing_both_ports(bento_tag: str, tmp_path: Path) -> None:
    archive = tmp_path / "lcnet.bento"
    result = bentoml_cli("export", bento_tag, str(archive))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        names = [name.removeprefix("./") for name in tar.getnames()]
    dockerfile = tar_text(archive, "env/docker/Dockerfile")
    assert "src/service.py" in names and "src/lcnet_runner/protos/lcnet_pb2.py" in names
    assert not any(
        n.startswith(("src/.venv", "src/data", "src/output", "src/tests")) for n in names
    )
    assert any(n.startswith("models/") and n.endswith("inference.pdiparams") for n in names)
    assert "EXPOSE 3000" in dockerfile and "EXPOSE 50051" in dockerfile
    assert "paddlepaddle" in tar_text(archive, "env/python/requirements.txt")


def tar_text(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        return tar.extractfile(f"./{name}").read().decode()


@pytest.mark.parametrize("command", [["build", "."], ["serve", ".", "--port", "1"]])
def test_missing_model_is_one_clear_error(command: list[str]) -> None:
    result = bentoml_cli(*command, env={"LCNET_MODEL": "no-such-model:latest"})
    assert result.returncode != 0
    assert (
        "model 'no-such-model:latest' is not in the BentoML store" in result.stdout + result.stderr
    )
