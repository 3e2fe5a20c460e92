"""`bentoml build` packs service + model; the Bento serves; a missing model is one clear error."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, bentoml_cli, refused_start

from lcnet_runner.artifact import PINNED_ENV, pinned_model
from lcnet_runner.client import Client
from lcnet_runner.testing import Server
from train.export import revise


@pytest.fixture(scope="module")
def bento_tag(trained: dict) -> str:
    result = bentoml_cli("build", ".", "--output", "tag", env={"LCNET_MODEL": trained["tag"]})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def test_built_bento_serves_its_model(
    bento_tag: str, trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version it packed, though the store has a newer one of the name and LCNET_MODEL is
    not set where it runs (a container's store holds the packed version only)."""
    import bentoml

    newer = revise(trained["tag"], lambda folder: None)
    assert str(bentoml.models.get(trained["tag"].split(":")[0]).tag) == newer
    monkeypatch.delenv("LCNET_MODEL", raising=False)
    # Served from an empty directory: everything must come from the Bento itself.
    server = Server(bento_tag, {}, cwd=tmp_path).wait_ready()
    try:
        assert httpx.get(f"{server.url}/model").json()["tag"] == trained["tag"]
        image = (trained["dataset"] / "green" / "0.jpg").read_bytes()
        with Client(server.url) as client:
            assert client.classify(image)[0]["category"] == "green"
        with Client(server.grpc_url) as client:
            assert client.classify(image)[0]["category"] == "green"
    finally:
        server.stop()
        bentoml.models.delete(newer)


def test_pinned_model_in_a_bento_names_the_version_it_packed(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's service built into a Bento (README section 7) served a newer version of the
    name from the store it ran beside, one the Bento never packed; a version asked as such is
    still served as asked. BentoML imports a Bento's service from its src/ folder."""
    import bentoml

    name = trained["tag"].split(":")[0]
    packed = [{"tag": trained["tag"], "creation_time": "2026-01-02T00:00:00+00:00"}]
    bento = {"services": [{"name": "mine", "models": packed}]}
    (tmp_path / "bento.yaml").write_text(yaml.safe_dump(bento))
    (tmp_path / "src").mkdir()
    monkeypatch.setenv(PINNED_ENV, "{}")
    newer = revise(trained["tag"], lambda folder: None)
    newest = revise(trained["tag"], lambda folder: None)
    try:
        assert str(pinned_model(name).tag) == newest  # outside a Bento: the newest
        monkeypatch.chdir(tmp_path / "src")
        assert str(pinned_model(name).tag) == trained["tag"]
        assert str(pinned_model(f"{name}:latest").tag) == trained["tag"]
        assert str(pinned_model(newest).tag) == newest
        # an A/B pair of an old version and :latest packs two: :latest is the newer of them
        packed.append({"tag": newer, "creation_time": "2026-01-03T00:00:00+00:00"})
        (tmp_path / "bento.yaml").write_text(yaml.safe_dump(bento))
        assert str(pinned_model(f"{name}:latest").tag) == newer
        assert str(pinned_model(trained["tag"]).tag) == trained["tag"]
    finally:
        bentoml.models.delete(newer)
        bentoml.models.delete(newest)


def test_a_bento_with_its_own_models_reloads_from_the_mounted_store(
    bento_tag: str, trained: dict, tmp_path: Path
) -> None:
    """As in a container: BentoML serves the models packed in the Bento folder, while new
    versions arrive in the store at BENTOML_HOME (a mounted volume); `watch` finds them there."""
    import bentoml

    archive = tmp_path / "lcnet.bento"
    assert bentoml_cli("export", bento_tag, str(archive)).returncode == 0
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "bento", filter="data")
    name = trained["tag"].split(":")[0]
    env = {"LCNET_MODEL": name, "LCNET_RELOAD": "watch", "LCNET_RELOAD_INTERVAL_S": "1",
           "LCNET_WORKERS": "1"}  # fmt: skip
    server = Server(str(tmp_path / "bento"), env, cwd=tmp_path).wait_ready()
    newer = None
    try:
        assert httpx.get(f"{server.url}/model").json()["tag"] == trained["tag"]
        newer = revise(trained["tag"], lambda folder: None)
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/model").json()["tag"] != newer:
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(0.5)
    finally:
        server.stop()
        if newer:
            bentoml.models.delete(newer)


def test_export_contains_source_model_and_requirements(bento_tag: str, tmp_path: Path) -> None:
    archive = tmp_path / "lcnet.bento"
    result = bentoml_cli("export", bento_tag, str(archive))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        names = [name.removeprefix("./") for name in tar.getnames()]
    assert "src/service.py" in names and "src/lcnet_runner/protos/lcnet_pb2.py" in names
    assert not any(
        n.startswith(("src/.venv", "src/data", "src/output", "src/tests", "src/examples"))
        for n in names
    )
    assert any(n.startswith("models/") and n.endswith("inference.pdiparams") for n in names)
    requirements = tar_text(archive, "env/python/requirements.txt")
    # every engine `auto` may pick is packed, so a container can choose the fastest on its CPU
    for package in ("paddlepaddle", "onnxruntime", "openvino"):
        assert package in requirements, package


# What `bentoml containerize` runs before it calls a builder: the Dockerfile generation, from
# the project folder as the README says. It is BentoML's internal
# `bentoml._internal.container.construct_containerfile` (no public call does exactly this): a
# BentoML upgrade that moves it fails here loudly, and a `dockerfile_template` outside the
# current folder (bentoml/BentoML#5566) fails here without a container engine.
CONTAINERFILE = """
import sys
import bentoml
from bentoml._internal.container import construct_containerfile

with construct_containerfile(bentoml.bentos.get(sys.argv[1])) as (context, dockerfile):
    print(open(dockerfile, encoding="utf-8").read())
"""


def test_containerize_generates_its_dockerfile_from_the_project_folder(bento_tag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CONTAINERFILE, bento_tag],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dockerfile = result.stdout
    assert "EXPOSE 3000" in dockerfile and "bentoml" in dockerfile and "ENTRYPOINT" in dockerfile


def tar_text(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        return tar.extractfile(f"./{name}").read().decode()


def test_missing_model_is_one_clear_error() -> None:
    missing = "model 'no-such-model:latest' is not in the BentoML store"
    env = {"LCNET_MODEL": "no-such-model:latest"}
    built = bentoml_cli("build", ".", env=env)
    assert built.returncode != 0 and missing in built.stdout + built.stderr
    assert missing in refused_start(env)
