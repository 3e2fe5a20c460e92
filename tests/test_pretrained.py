"""Pretrained weights: local files, the cached download (network mocked), clear offline errors."""

from __future__ import annotations

import http.client
import io
import urllib.error
import urllib.request
from pathlib import Path

import paddle
import pytest

from train import pretrained
from train.model import build_model


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class x0.25 checkpoint in PaddleClas' format, made here (no download)."""
    path = tmp_path_factory.mktemp("ckpt") / "PPLCNet_x0_25_pretrained.pdparams"
    paddle.seed(1)
    paddle.save(build_model("PPLCNet_x0_25", 1000).state_dict(), str(path))
    return path


def test_local_checkpoint_loads_and_reinitialises_the_classifier(imagenet_checkpoint: Path) -> None:
    model = build_model("PPLCNet_x0_25", num_classes=3)
    report = pretrained.load_weights(
        model, pretrained.resolve(str(imagenet_checkpoint), "PPLCNet_x0_25")
    )
    assert report.skipped == ("fc.bias", "fc.weight")
    assert report.loaded == 144
    official = paddle.load(str(imagenet_checkpoint))
    assert paddle.allclose(model.state_dict()["conv1.conv.weight"], official["conv1.conv.weight"])


def test_strict_load_refuses_a_mismatch(imagenet_checkpoint: Path) -> None:
    with pytest.raises(pretrained.PretrainedError, match="does not match"):
        pretrained.load_weights(build_model("PPLCNet_x0_5", 1000), imagenet_checkpoint, strict=True)


def test_imagenet_is_downloaded_once_into_the_cache(imagenet_checkpoint, monkeypatch) -> None:
    calls = []

    def fake_urlopen(url: str, timeout: float):
        calls.append(url)
        return io.BytesIO(imagenet_checkpoint.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    first = pretrained.resolve("imagenet", "PPLCNet_x0_25")
    second = pretrained.resolve("imagenet", "PPLCNet_x0_25")
    assert first == second == pretrained.cache_dir() / "PPLCNet_x0_25_pretrained.pdparams"
    assert calls == [pretrained.weights_url("PPLCNet_x0_25", "imagenet")]
    assert calls[0].endswith("/legendary_models/PPLCNet_x0_25_pretrained.pdparams")


def test_offline_download_error_suggests_alternatives(monkeypatch) -> None:
    def offline(url: str, timeout: float):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(pretrained.PretrainedError, match="--pretrained none or --pretrained PATH"):
        pretrained.resolve("imagenet", "PPLCNet_x0_5")
    assert not list(pretrained.cache_dir().glob("*.part"))


class Dropped(io.BytesIO):
    def read(self, *args: object) -> bytes:
        raise http.client.IncompleteRead(b"part")


@pytest.mark.parametrize(
    "answer, message",
    [
        (lambda: io.BytesIO(b"<html>proxy login</html>"), "did not send weights"),
        (Dropped, "cannot download"),  # the connection dropped mid-body: not an OSError
    ],
)
def test_a_bad_download_is_one_error_and_caches_nothing(monkeypatch, answer, message) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: answer())
    with pytest.raises(pretrained.PretrainedError, match=message):
        pretrained.resolve("imagenet", "PPLCNet_x0_75")
    assert not list(pretrained.cache_dir().glob("PPLCNet_x0_75*"))  # nor a .part


def test_ssld_weights_exist_only_for_some_scales() -> None:
    assert pretrained.weights_url("PPLCNet_x1_0", "imagenet-ssld").endswith(
        "PPLCNet_x1_0_ssld_pretrained.pdparams"
    )
    with pytest.raises(pretrained.PretrainedError, match="no SSLD weights"):
        pretrained.weights_url("PPLCNet_x0_25", "imagenet-ssld")
