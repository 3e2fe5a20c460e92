"""lcnet-bento as a BentoML plugin: runners embedded in a user's own service (two models)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import bentoml
import httpx
import psutil
import pytest
from conftest import CLASS_NAMES, ROOT, replacement, run_cli, workers

from lcnet_runner import Predictor
from lcnet_runner.testing import Server


@pytest.fixture(scope="module")
def second_model(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another store model: the trained network under other class names."""
    labels = tmp_path_factory.mktemp("labels") / "labels.txt"
    labels.write_text("".join(f"other {i}\n" for i in range(len(CLASS_NAMES))), encoding="utf-8")
    result = run_cli("train", "import", trained["export_dir"], "--name", "other",
                     "--labels", str(labels))  # fmt: skip
    return result.stdout.strip().split()[-1]


def test_a_user_service_embeds_two_runners(trained: dict, second_model: str, tmp_path) -> None:
    """Two models side by side, B named by ``other:latest``: pinned, so a worker BentoML
    restarts after a newer ``other`` was stored still serves what B served (it resolved
    ``:latest`` again and answered with another model than its siblings)."""
    env = {"LCNET_MODEL_A": trained["tag"], "LCNET_MODEL_B": "other:latest"}
    server = Server("service:ABPair", env, cwd=ROOT / "examples" / "ab_pair").wait_ready()
    try:
        image = trained["dataset"] / "green" / "3.jpg"
        with bentoml.SyncHTTPClient(server.url) as client:
            answer = client.compare(image=Path(image), top_k=2)
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f"newer {i}\n" for i in range(len(CLASS_NAMES))))
        run_cli(
            "train", "import", trained["export_dir"], "--name", "other", "--labels", str(labels)
        )
        (victim,) = workers(server)
        os.kill(victim, signal.SIGKILL)
        replacement(server, victim, count=1)
        with bentoml.SyncHTTPClient(server.url, server_ready_timeout=60) as client:
            again = client.compare(image=Path(image), top_k=2)
        assert again == answer
        # Not an image: BentoML answers the runner's InvalidImageError with 400, not 500.
        refused = httpx.post(f"{server.url}/compare", files={"image": ("a.txt", b"words")})
        assert refused.status_code == 400 and "not an image format" in refused.text
        metrics = httpx.get(f"{server.url}/metrics").text  # each side its own series
        for side, tag in (("a", trained["tag"]), ("b", second_model)):
            assert f'lcnet_runner_batch_size_count{{model="{side}/{tag}"' in metrics
    finally:
        server.stop()
    for got, model in ((answer["a"], trained["tag"]), (answer["b"], second_model)):
        want = Predictor(model, threads=1).predict(image, top_k=2)
        assert [p["category"] for p in got] == [p["category"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)
    assert answer["b"][0]["category"].startswith("other ")
    assert answer["agree"] is False  # same network, other names


def best_category(trained: dict, photo: Path) -> str:
    return Predictor(trained["tag"], threads=1).predict(photo, top_k=1)[0]["category"]


def listening(server: Server) -> list:
    """The addresses the server's processes listen on."""
    addresses = []
    for process in [server.process, *psutil.Process(server.process.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            connections = psutil.Process(process.pid).net_connections("inet")
            addresses += [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
    return addresses


def test_another_service_composes_ours_with_depends(trained: dict) -> None:
    # LCNET_GRPC_PORT unset: a dependency opens no gRPC port its host did not ask for
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1", "LCNET_GRPC_PORT": None}
    server = Server("service:Shop", env, cwd=ROOT / "examples" / "compose").wait_ready()
    try:
        addresses = listening(server)
        assert all(a.ip == "127.0.0.1" and a.port != 50051 for a in addresses), addresses
        assert "gRPC off: lcnet serves as a dependency" in server.output()
        photo = trained["dataset"] / "green" / "4.jpg"
        with bentoml.SyncHTTPClient(server.url) as client:
            answer = client.tag_product(photo=photo)
            assert client.tag_products(photos=[photo, photo]) == [best_category(trained, photo)] * 2
        # ours checks a batch from another service as one over HTTP: none is a 422, not a 500
        assert httpx.post(f"{server.url}/tag_products", json={"photos": []}).status_code == 422
        # ours answers another service with the message alone, not JSON for it to wrap again
        # (BentoML 1.4 puts an error it answers in a list: [{"error": ...}])
        refused = httpx.post(f"{server.url}/tag_product", files={"photo": ("a.txt", b"words")})
        assert refused.status_code == 400
        [said] = refused.json()
        assert said["error"].startswith("not an image format the server reads (JPEG, PNG")
    finally:
        server.stop()
    (best,) = Predictor(trained["tag"], threads=1).predict(photo, top_k=1)
    assert answer == {"tag": best["category"], "confident": best["score"] >= 0.5}
