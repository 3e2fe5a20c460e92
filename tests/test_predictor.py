"""The Predictor on a real exported model: equals dygraph, every input kind, errors at load time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from bentoml.exceptions import InvalidArgument
from conftest import CLASS_NAMES, PADDLE_FP32, run_cli
from PIL import Image

from lcnet_runner import InvalidModelError, ModelNotFoundError, Predictor
from lcnet_runner.handlers import RequestError, refusal_status
from lcnet_runner.hardware import cores_free, cpu_quota, default_threads
from lcnet_runner.predictor import EngineOutputError, TopKError, top_k_predictions
from lcnet_runner.preprocess import ImageTooLargeError, InvalidImageError, normalize, preprocess
from train.model import build_model
from train.split import read_split


@pytest.fixture(scope="module")
def predictor(trained: dict) -> Predictor:
    return Predictor(trained["export_dir"], threads=1)


@pytest.fixture(scope="module")
def split_images(trained: dict) -> list[tuple[Path, int]]:
    return read_split(trained["dataset"], "test")


def test_exported_model_equals_dygraph(trained: dict, split_images) -> None:
    predictor = Predictor(trained["export_dir"], threads=1, **PADDLE_FP32)
    network = build_model("PPLCNet_x0_25", num_classes=len(predictor.labels))
    network.set_state_dict(paddle.load(str(trained["save_dir"] / "best.pdparams")))
    network.eval()
    crops = np.stack([preprocess(path, predictor.preprocess_config) for path, _ in split_images])
    with paddle.no_grad():
        logits = network(paddle.to_tensor(normalize(crops, predictor.preprocess_config)))
    expected = paddle.nn.functional.softmax(logits, axis=-1).numpy()
    np.testing.assert_allclose(predictor.infer(crops), expected, rtol=1e-4, atol=1e-5)


def test_predictions_are_accurate_sorted_probabilities(predictor: Predictor, split_images) -> None:
    results = predictor.predict([path for path, _ in split_images], top_k=3)
    assert len(results) == len(split_images)
    correct = 0
    for result, (_, label) in zip(results, split_images, strict=True):
        assert [set(p) for p in result] == [{"category_id", "category", "score"}] * 3
        scores = [p["score"] for p in result]
        assert scores == sorted(scores, reverse=True) and 0.99 < sum(scores) < 1.01
        assert all(predictor.labels[p["category_id"]] == p["category"] for p in result)
        correct += result[0]["category_id"] == label
    assert correct / len(split_images) >= 0.85


def test_every_input_kind_gives_the_same_answer(predictor: Predictor, split_images) -> None:
    path = split_images[0][0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = predictor.predict(path)
    assert len(expected) == 1
    for source in (str(path), path.read_bytes(), Image.open(path)):
        assert predictor.predict(source) == expected
    assert predictor.predict(rgb, bgr=False) == expected
    assert predictor.predict(rgb[:, :, ::-1].copy(), bgr=True) == expected
    with pytest.raises(ValueError, match="bgr=True for OpenCV's"):  # cv2.imread read as RGB
        predictor.predict([path, rgb])  # was answered wrong, confidently
    with pytest.raises(InvalidImageError, match="PaddleX 2 took float32"):
        predictor.predict(rgb.astype(np.float32), bgr=True)
    pair = predictor.predict([path, path], top_k=2)
    assert predictor.timings.images == 2 and predictor.timings.inference_s > 0
    assert pair == [predictor.predict(path, top_k=2)] * 2


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", True, None])
def test_a_bad_top_k_is_refused_before_any_work(predictor: Predictor, split_images, top_k):
    """As the server (422) and the client refuse it; BentoML's InvalidArgument too, so a user's
    service embedding the runner answers 400. Numbers past the classes are clamped."""
    predictor.timings = None
    with pytest.raises(TopKError, match=r"top_k must be an integer >= 1, got") as refused:
        predictor.predict(split_images[0][0], top_k=top_k)
    assert isinstance(refused.value, InvalidArgument) and predictor.timings is None
    assert len(predictor.predict(split_images[0][0], top_k=np.int64(99))) == len(CLASS_NAMES)


def test_top_k_ranks_ties_alike_for_every_k() -> None:
    probs = np.array([[0.25, 0.5, 0.25, 0.0], [0.4, 0.1, 0.1, 0.4]])
    top_1 = top_k_predictions(probs, "abcd", 1)
    top_3 = top_k_predictions(probs, "abcd", 3)
    assert [r[0]["category"] for r in top_1] == [r[0]["category"] for r in top_3] == ["b", "a"]
    assert [p["category"] for p in top_3[0]] == ["b", "a", "c"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_non_finite_engine_output_is_a_server_error(bad: float, top_k: int) -> None:
    """argmax took NaN as the best class and argsort as the worst, so top-1 depended on top_k,
    and a NaN score reached the JSON answer (Starlette refuses it: a 500 without a cause)."""
    probs = np.array([[0.2, 0.3, 0.5], [0.1, bad, 0.6]])
    with pytest.raises(EngineOutputError, match=r"non-finite scores .* image\(s\) \[1\]") as err:
        top_k_predictions(probs, "abc", top_k)
    assert refusal_status(err.value) is None  # a server fault: 500, never the client's


@pytest.mark.parametrize(
    "error, status",
    [(InvalidImageError("x"), 400), (ImageTooLargeError("x"), 413), (TopKError("x"), 400),
     (RequestError(422, "x"), 422), (ValueError("x"), None)],
)  # fmt: skip
def test_client_errors_keep_the_status_bentoml_gives_them(error: Exception, status) -> None:
    """Our routes and gRPC answer the runner's errors as BentoML does in anyone's service; a
    TopKError reaching them was a 500."""
    assert refusal_status(error) == status


def test_store_tag_and_folder_give_the_same_answer(trained: dict, split_images) -> None:
    paths = [path for path, _ in split_images[:4]]
    # one variant for both: under auto each could win its own race (threads, path differ)
    by_tag = Predictor(trained["tag"], threads=1, **PADDLE_FP32)
    assert by_tag.artifact.tag == trained["tag"]
    by_folder = Predictor(trained["export_dir"], **PADDLE_FP32)
    assert by_tag.predict(paths, top_k=3) == by_folder.predict(paths, top_k=3)


def test_unknown_tag_and_broken_folders_fail_at_load(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not in the BentoML store"):
        Predictor("no-such-model:latest")
    broken = tmp_path / "broken"
    shutil.copytree(trained["export_dir"], broken)
    (broken / "inference.pdiparams").unlink()
    with pytest.raises(ModelNotFoundError, match="missing inference.pdiparams"):
        Predictor(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(trained["export_dir"], mismatched)
    with open(mismatched / "labels.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(InvalidModelError, match="outputs 3 classes but has 4 labels"):
        Predictor(mismatched)


def test_predict_cli_annotates(trained: dict, split_images, tmp_path: Path) -> None:
    path = split_images[0][0]
    out = tmp_path / "annotated.jpg"
    run_cli("lcnet_runner", "predict", str(path), "--model", trained["tag"], "--annotate", str(out))
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert drawn.shape == original.shape
    band = np.abs(drawn[:8] - original[:8]).mean()  # the label band at the top
    assert band > 20 and np.abs(drawn[-8:] - original[-8:]).mean() < 5


def test_predict_cli_prints_results_and_latency_block(trained: dict, split_images) -> None:
    path = str(split_images[0][0])
    result = run_cli(
        "lcnet_runner", "predict", path, path, "--model", trained["tag"], "--top-k", "2",
        "--benchmark", "3",
    )  # fmt: skip
    lines = result.stdout.splitlines()
    first = json.loads(lines[0])
    assert first["image"] == path and len(first["predictions"]) == 2
    assert lines[2].startswith(f"model: {trained['tag']} on ")  # the version, the variant
    assert "Inference Time Info" in result.stdout
    assert "img_num: 6, batch_size: 1" in result.stdout
    assert "preprocess_time_per_im(ms)" in lines[-1]


def test_evaluate_cli_reports_accuracy(trained: dict, tmp_path: Path) -> None:
    png = tmp_path / "cm.png"
    # Paddle fp32: the engine training evaluated with, so the accuracies must match exactly
    args = ["--dataset", str(trained["dataset"]), "--confusion-matrix", str(png),
            "--engine", "paddle", "--precision", "fp32"]  # fmt: skip
    result = run_cli("train", "evaluate", trained["tag"], *args)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["confusion_matrix"] == str(png) and Image.open(png).format == "PNG"
    assert report["split"] == "test" and report["n"] == 18
    assert report["top1"] == trained["test_top1"]
    assert report["top5"] == 1.0 and list(report["per_class"]) == CLASS_NAMES


def test_a_lone_image_runs_on_every_core_when_the_engine_releases_the_gil(trained: dict) -> None:
    """A serving worker batches on 1 thread; a lone image gets a second instance of the same
    variant with more threads — not with Paddle, which would stall the worker's event loop."""
    crops = np.zeros((2, 32, 32, 3), np.uint8)
    options = {"threads": 1, "solo_threads": 2, "skip_guard": True, "precision": "fp32"}
    predictor = Predictor(trained["export_dir"], engine="onnxruntime", **options)
    assert predictor.solo_engine is not None and predictor.solo_threads == 2
    used = []
    solo, batch = predictor.solo_engine.predict, predictor.engine.predict
    predictor.solo_engine.predict = lambda x: used.append("solo") or solo(x)
    predictor.engine.predict = lambda x: used.append("batch") or batch(x)
    predictor._cores = 10**6  # every thread runnable now still fits
    np.testing.assert_allclose(predictor.infer(crops[:1]), predictor.infer(crops)[:1], atol=1e-6)
    predictor._cores = 0  # e.g. the other worker is busy: 1 thread
    predictor.infer(crops[:1])
    assert used == ["solo", "batch", "batch"]
    paddle = Predictor(trained["export_dir"], engine="paddle", **options)
    assert paddle.solo_engine is None and paddle.solo_threads is None


@pytest.mark.parametrize(
    ("own", "files", "quota"),
    [("0::/\n", {"cpu.max": "200000 100000"}, 2.0),  # cgroup v2 in a container (its own root)
     ("0::/pod/c1\n", {"pod/c1/cpu.max": "150000 100000", "cpu.max": "max 100000"}, 1.5),
     ("0::/\n", {"cpu.max": "max 100000"}, None),  # no limit
     ("4:cpu,cpuacct:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "50000",
                                       "cpu/cpu.cfs_period_us": "100000"}, 0.5),  # v1, root
     ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
      None),
     ("4:memory:/x\n", {}, None)],
)  # fmt: skip
def test_cpu_quota_is_read_from_the_process_cgroup(
    tmp_path: Path, own: str, files: dict, quota: float | None
) -> None:
    (tmp_path / "self_cgroup").write_text(own)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text + "\n")
    assert cpu_quota(tmp_path / "fs", tmp_path / "self_cgroup") == quota


def test_default_threads_are_the_cores_allowed_and_no_more_than_the_quota(monkeypatch) -> None:
    """`docker run --cpus 2` on a 64-core host: 2 workers' worth, not 64."""
    from lcnet_runner import hardware

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "cpu_quota", lambda: None)
    assert default_threads() == cores
    monkeypatch.setattr(hardware, "cpu_quota", lambda: 0.5)
    assert default_threads() == 1
    monkeypatch.setattr(hardware, "cpu_quota", lambda: cores - 0.5)
    assert default_threads() == cores
    monkeypatch.setattr(hardware, "cpu_quota", lambda: 1000.0)
    assert default_threads() == cores


def test_cores_are_free_while_no_more_threads_are_runnable_than_cores(tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    for running, free in ((1, True), (2, True), (3, False)):
        loadavg.write_text(f"0.52 0.58 0.59 {running}/115 4242\n")
        assert cores_free(2, str(loadavg)) is free
    assert cores_free(2, str(tmp_path / "absent"))  # not Linux: every core

    if not Path("/proc/loadavg").exists():
        return
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        time.sleep(0.3)
        assert not cores_free(2)  # three spinning processes (and this one) on 2 cores
    finally:
        for process in busy:
            process.kill()
            process.wait()
