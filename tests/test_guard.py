"""The accuracy guard: figures measured at fit/verify/quantize time, stored with the model, and
enforced when a Predictor, runner or server picks its engine."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import bentoml
import numpy as np
import pytest
from conftest import refused_start, run_cli

from lcnet_runner import Predictor
from lcnet_runner.artifact import INT8_FILE, SELF_CHECK_FILE, ModelArtifact, load_folder, write_info
from lcnet_runner.engines import (
    REFERENCE,
    Variant,
    all_variants,
    cannot_run,
    cpu_supports_bf16,
    matching_variants,
)
from lcnet_runner.guard import (
    GUARD_KEY,
    AccuracyGuardError,
    check,
    compare,
    passes,
    self_check,
    write_self_check,
)
from lcnet_runner.preprocess import PreprocessConfig
from lcnet_runner.runner import LCNetRunner, RunnerConfig
from lcnet_runner.settings import ServingSettings
from train.split import read_split

needs_int8 = pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="no int8 extra")


def test_compare_applies_the_bar() -> None:
    targets = np.arange(200) % 2
    reference = np.eye(2)[targets]  # 100 % top-1
    one_off, two_off = reference.copy(), reference.copy()
    one_off[[0, 1]] = one_off[[0, 1], ::-1]  # 2 of 200 wrong: -1 point, 99 % agreement
    two_off[[0]] = two_off[[0], ::-1]  # 1 of 200 wrong: -0.5 point, 99.5 % agreement
    assert compare(reference, reference, targets)["passed"]
    assert compare(reference, two_off, targets) == {
        "top1": 0.995, "top1_drop_pt": 0.5, "agreement": 0.995, "max_score_diff": 1.0,
        "passed": True,
    }  # fmt: skip
    failed = compare(reference, one_off, targets)
    assert (failed["top1_drop_pt"], failed["agreement"], failed["passed"]) == (1.0, 0.99, False)


def test_variants_come_from_the_engine_registry() -> None:
    assert all_variants()[0] == REFERENCE
    assert [str(v) for v in all_variants()] == [
        "paddle/fp32", "onnxruntime/fp32", "openvino/fp32", "openvino/bf16", "openvino/int8",
    ]  # fmt: skip
    assert [str(v) for v in matching_variants("openvino")] == [
        "openvino/fp32", "openvino/bf16", "openvino/int8",
    ]  # fmt: skip
    assert [str(v) for v in matching_variants(precision="fp32")] == [
        "paddle/fp32", "onnxruntime/fp32", "openvino/fp32",
    ]  # fmt: skip


INT8 = Variant("openvino", "int8")
GOOD = {"top1": 0.9, "top1_drop_pt": 0.0, "agreement": 1.0, "max_score_diff": 0.0, "passed": True}


def bare_artifact(folder: Path, guard: object) -> ModelArtifact:
    """An artifact with no model files: ``check`` and ``self_check`` read only its info and
    its sample, so these tests need no trained model."""
    files = (folder / "m.pdmodel", folder / "m.pdiparams")
    crop = PreprocessConfig(crop_size=4, resize_short=4)
    return ModelArtifact(folder, *files, ("a", "b"), crop, {GUARD_KEY: guard})


@pytest.mark.parametrize(
    "guard",
    [
        {"variants": {"openvino/int8": {"passed": False}}},  # no figures
        {"variants": {"openvino/int8": {**GOOD, "top1_drop_pt": None}}},
        {"variants": {"openvino/int8": {**GOOD, "agreement": "1.0"}}},
        {"variants": {"openvino/int8": {**GOOD, "agreement": True}}},
        {"variants": {"openvino/int8": {**GOOD, "top1_drop_pt": float("nan")}}},
        {"variants": {"openvino/int8": "passed"}},
        {"variants": ["openvino/int8"]},
        "not measured",
        ["openvino/int8"],
    ],
)
def test_malformed_guard_figures_make_the_variant_unusable(tmp_path: Path, guard) -> None:
    """Hand-edited or older metadata: the guard's own error (what ``auto`` skips), not a
    KeyError/TypeError/AttributeError that would stop ``auto`` before the reference serves."""
    with pytest.raises(AccuracyGuardError, match=r"openvino/int8 cannot be checked"):
        check(bare_artifact(tmp_path, guard), INT8)
    check(bare_artifact(tmp_path, guard), REFERENCE)  # the reference needs no figures
    check(bare_artifact(tmp_path, {"variants": {"openvino/int8": GOOD}}), INT8)


def test_the_commands_a_refusal_advises_quote_the_model_folder(tmp_path: Path) -> None:
    """`python -m train quantize ../out/all out/inference --dataset DIR`, pasted into a shell,
    was two model arguments."""
    folder = tmp_path / "all out (2)"
    folder.mkdir()
    quoted = f"'{folder}'"
    with pytest.raises(AccuracyGuardError) as unchecked:
        check(bare_artifact(folder, {"variants": {}}), INT8)
    with pytest.raises(AccuracyGuardError) as damaged:
        check(bare_artifact(folder, "not measured"), INT8)
    no_int8 = cannot_run(INT8, bare_artifact(folder, {}))
    no_onnx = cannot_run(Variant("onnxruntime", "fp32"), bare_artifact(folder, {}))
    assert f"`python -m train verify {quoted} --dataset DIR` (or quantize" in str(unchecked.value)
    assert f"`python -m train verify {quoted} --dataset DIR` to measure" in str(damaged.value)
    assert f"`python -m train quantize {quoted} --dataset DIR`" in no_int8
    assert f"`python -m train export {quoted} --format onnx`" in no_onnx


def test_a_damaged_self_check_sample_makes_the_variant_unusable(tmp_path: Path) -> None:
    artifact = bare_artifact(tmp_path, {})
    path = tmp_path / SELF_CHECK_FILE
    crops, probs = np.zeros((3, 4, 4, 3), np.uint8), np.full((3, 2), 0.5, np.float32)

    def infer(batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 2), 0.5, np.float32)

    write_self_check(tmp_path, crops, probs)
    assert self_check(artifact, INT8, infer)["passed"]
    whole = path.read_bytes()
    damaged = {
        "truncated": lambda: path.write_bytes(whole[: len(whole) // 2]),
        "no probs": lambda: np.savez_compressed(path, crops=crops),
        "not a zip": lambda: path.write_bytes(b"not numpy"),
        "other classes": lambda: write_self_check(tmp_path, crops, probs[:, :1]),
        "other sizes": lambda: write_self_check(tmp_path, crops, probs[:2]),
    }
    for name, damage in damaged.items():
        damage()
        with pytest.raises(AccuracyGuardError, match=f"{SELF_CHECK_FILE} is damaged"):
            self_check(artifact, INT8, infer)
        assert self_check(artifact, REFERENCE, infer) is None, name


def test_fit_records_the_guard_and_auto_uses_it(trained: dict) -> None:
    figures = bentoml.models.get(trained["tag"]).info.metadata[GUARD_KEY]
    val_images = len(read_split(trained["dataset"], "val"))
    assert (figures["split"], figures["images"]) == ("val", val_images)
    assert figures["reference"] == "paddle/fp32"
    measured = figures["variants"]
    assert {"onnxruntime/fp32", "openvino/fp32"} <= set(measured)
    if importlib.util.find_spec("nncf"):
        assert "openvino/int8" in measured
    for name in ("onnxruntime/fp32", "openvino/fp32"):
        assert measured[name]["agreement"] == 1.0 and measured[name]["passed"], name
    assert figures["cpu"]["flags"] and "model" in figures["cpu"]  # the kernels they came from
    # auto = the fastest here of the variants that passed: the race times every variant that
    # runs here (speed is not accuracy), and each faster one says why it does not serve
    choice = Predictor(trained["tag"], threads=1).choice
    passed = {name for name, f in measured.items() if f["passed"]} | {str(REFERENCE)}
    ranking = list(choice.race.images_per_s)
    assert str(choice.variant) in passed
    assert set(ranking[: ranking.index(str(choice.variant))]) <= set(choice.skipped)
    assert "accuracy guard on" in trained["stderr"]


@pytest.fixture
def folder(trained: dict, tmp_path: Path) -> Path:
    """A copy of the trained export whose guard figures the test rewrites."""
    copy = tmp_path / "model"
    shutil.copytree(trained["export_dir"], copy)
    return copy


def set_figures(folder: Path, **variants: dict) -> None:
    info = load_folder(folder).info
    guard = {**info[GUARD_KEY], "variants": {k.replace("_", "/"): v for k, v in variants.items()}}
    write_info(folder, {**info, GUARD_KEY: guard})


PASS = {"top1": 0.9, "top1_drop_pt": 0.0, "agreement": 1.0, "max_score_diff": 0.01, "passed": True}
FAIL = {"top1": 0.8, "top1_drop_pt": 10.0, "agreement": 0.9, "max_score_diff": 0.5, "passed": False}


def test_a_failing_variant_is_refused_unless_overridden(folder: Path) -> None:
    set_figures(folder, onnxruntime_fp32=FAIL, openvino_fp32=PASS)  # variants every CPU runs
    with pytest.raises(
        AccuracyGuardError, match=r"onnxruntime/fp32 fails the accuracy guard.*-10\.00"
    ):
        Predictor(folder, engine="onnxruntime", precision="fp32")
    with pytest.raises(AccuracyGuardError, match="fails the accuracy guard"):
        LCNetRunner(folder, RunnerConfig(engine="onnxruntime", precision="fp32"))
    assert str(Predictor(folder, precision="fp32", threads=1).variant) != "onnxruntime/fp32"
    auto = Predictor(folder, threads=1).choice  # times it, does not serve it
    assert "onnxruntime/fp32" in auto.race.images_per_s
    assert "fails the accuracy guard" in auto.skipped["onnxruntime/fp32"]
    forced = Predictor(folder, engine="onnxruntime", precision="fp32", skip_guard=True, threads=1)
    assert str(forced.variant) == "onnxruntime/fp32"
    if not cpu_supports_bf16():  # skip_guard skips the guard, not what the CPU can do
        with pytest.raises(ValueError, match="bf16 needs a CPU with avx512_bf16 or AMX"):
            Predictor(folder, engine="openvino", precision="bf16", skip_guard=True, threads=1)
        assert "bf16 needs a CPU" in auto.skipped["openvino/bf16"]
    assert ServingSettings.from_env({"LCNET_SKIP_GUARD": "1"}).runner.skip_guard
    with pytest.raises(ValueError, match="LCNET_SKIP_GUARD='maybe' is not 1 or 0"):
        ServingSettings.from_env({"LCNET_SKIP_GUARD": "maybe"})


def test_serve_refuses_a_failing_variant_before_starting_workers(folder: Path) -> None:
    """A worker whose runner fails to initialise would be restarted by BentoML forever."""
    from train.export import save_to_store

    set_figures(folder, openvino_bf16=FAIL)
    tag = save_to_store(folder, "guarded", load_folder(folder).info)
    env = {"LCNET_MODEL": tag, "LCNET_ENGINE": "openvino", "LCNET_PRECISION": "bf16"}
    assert "openvino/bf16 fails the accuracy guard" in refused_start(env)


def test_a_variant_the_model_lacks_is_refused_at_start_even_unguarded(folder: Path) -> None:
    """LCNET_SKIP_GUARD=1, which the "not checked" error of a missing INT8 variant suggested,
    skipped every start-up check: the workers failed on the missing file and were restarted
    forever (260 times in 10 minutes)."""
    from train.export import save_to_store

    for file in (folder / INT8_FILE, (folder / INT8_FILE).with_suffix(".bin")):
        file.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no INT8 variant; make one with"):
        Predictor(folder, engine="openvino", precision="int8")  # not "not been checked"
    tag = save_to_store(folder, "no-int8", load_folder(folder).info)
    env = {"LCNET_MODEL": tag, "LCNET_ENGINE": "openvino", "LCNET_PRECISION": "int8",
           "LCNET_SKIP_GUARD": "1"}  # fmt: skip
    assert "has no INT8 variant; make one with" in refused_start(env)


def test_a_damaged_version_stored_before_checksums_is_refused_at_start(folder: Path) -> None:
    """Nothing recorded to check its files against: its workers failed to load it, and BentoML
    restarted them forever. It loads once in a child process first, as a reload does."""
    from lcnet_runner.artifact import CHECKSUM_FILE
    from train.export import save_to_store

    tag = save_to_store(folder, "legacy", load_folder(folder).info)
    stored = Path(bentoml.models.get(tag).path)
    (stored / CHECKSUM_FILE).unlink()
    for weights in [*stored.glob("*.pdiparams"), *stored.glob("*.onnx"), *stored.glob("*.bin")]:
        weights.write_bytes(weights.read_bytes()[:1000])
    assert "stored before checksums were recorded, and its files do not load" in refused_start(
        {"LCNET_MODEL": tag}
    )


def test_an_unchecked_variant_is_refused_and_auto_falls_back(folder: Path) -> None:
    info = load_folder(folder).info
    write_info(folder, {k: v for k, v in info.items() if k != GUARD_KEY})
    with pytest.raises(AccuracyGuardError, match=r"not been checked.*python -m train verify"):
        Predictor(folder, engine="onnxruntime", precision="fp32")
    assert Predictor(folder, threads=1).variant == REFERENCE
    result = run_cli("lcnet_runner", "predict", "--model", str(folder), "--engine", "openvino",
                     "--precision", "fp32", str(folder / "curves.png"), check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: openvino/fp32 has not been")


def test_verify_measures_in_place(trained: dict, folder: Path) -> None:
    set_figures(folder)  # none
    result = run_cli("train", "verify", str(folder), "--dataset", str(trained["dataset"]),
                     "--split", "test")  # fmt: skip
    figures = load_folder(folder).info[GUARD_KEY]
    assert figures["split"] == "test" and "openvino/fp32" in figures["variants"]
    assert "accuracy guard on" in result.stdout and f"saved as {folder}" in result.stdout
    mismatch = run_cli("train", "verify", str(folder), "--dataset", str(folder), check=False)
    assert mismatch.returncode == 2
    assert mismatch.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verify_of_a_store_tag_gives_advice_that_names_the_tag(trained: dict, folder: Path) -> None:
    """verify measures a store version in a temporary copy: its advice for a variant not
    measured named that copy, gone once the command ended, and the new version kept the text."""
    from train.export import save_to_store

    for file in (folder / INT8_FILE, (folder / INT8_FILE).with_suffix(".bin")):
        file.unlink(missing_ok=True)
    save_to_store(folder, "verify-advice", load_folder(folder).info)
    result = run_cli("train", "verify", "verify-advice:latest", "--dataset",
                     str(trained["dataset"]), "--split", "test")  # fmt: skip
    stored = bentoml.models.get(result.stdout.strip().split()[-1])
    why = stored.info.metadata[GUARD_KEY]["not_measured"]["openvino/int8"]
    assert why.startswith("verify-advice:latest has no INT8 variant; make one with `python -m "
                          "train quantize verify-advice:latest --dataset "
                          f"{shlex.quote(str(trained['dataset']))}`")  # fmt: skip
    assert f"openvino/int8      not measured here: {why}" in result.stdout


def test_verify_keeps_the_figures_of_what_this_cpu_cannot_run(
    trained: dict, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify on a CPU without bf16 erased the bf16 figures measured on one with AMX, and a
    server with AMX then never served bf16 ("has not been checked"): they are kept, said so."""
    set_figures(folder, openvino_bf16=PASS)
    earlier = load_folder(folder).info[GUARD_KEY]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # bf16 off, as on a CPU without it
    result = run_cli("train", "verify", str(folder), "--dataset", str(trained["dataset"]),
                     "--split", "test")  # fmt: skip
    variants = load_folder(folder).info[GUARD_KEY]["variants"]
    assert variants["openvino/bf16"] == {
        **PASS, "kept_from": {key: earlier[key] for key in ("cpu", "split", "images")}
    }  # fmt: skip
    assert "kept_from" not in variants["openvino/fp32"]  # measured here
    why = "bf16 needs avx512_bf16 or AMX, and ONEDNN_MAX_CPU_ISA=AVX2 turns them off"
    assert f"openvino/bf16      not measured here: {why}" in result.stdout
    assert f"kept from {earlier['split']} on {earlier['cpu']['model']}" in result.stdout


@needs_int8
def test_quantize_stores_a_new_version_with_int8(trained: dict, tmp_path: Path) -> None:
    result = run_cli("train", "quantize", trained["tag"], "--dataset", str(trained["dataset"]),
                     "--calibration-images", "40")  # fmt: skip
    tag = result.stdout.strip().split()[-1]
    assert tag != trained["tag"] and tag.startswith("pplcnet:")
    stored = bentoml.models.get(tag)
    assert (Path(stored.path) / INT8_FILE).is_file()
    int8 = stored.info.metadata[GUARD_KEY]["variants"]["openvino/int8"]
    # the recorded verdict is the bar applied to the recorded figures (a 32 px toy model may
    # well fail it; the guard's job is to say so)
    assert int8["passed"] == passes(int8["top1_drop_pt"], int8["agreement"])
    assert f"openvino/int8      {'passed' if int8['passed'] else 'FAILED'}" in result.stdout
    report = run_cli("train", "evaluate", tag, "--dataset", str(trained["dataset"]), "--engine",
                     "openvino", "--precision", "int8", "--split", "val",
                     "--confusion-matrix", str(tmp_path / "cm.png"))  # fmt: skip
    evaluated = json.loads(report.stdout)
    assert evaluated["precision"] == "int8"
    # evaluate shows the same comparison the guard recorded (same images, same engines)
    assert evaluated["vs_paddle_fp32"]["agreement"] == int8["agreement"]


@needs_int8
def test_quantize_checks_the_split_it_evaluates_on_first(trained: dict, tmp_path: Path) -> None:
    """A missing split list was found only after calibration and quantization had run."""
    dataset = tmp_path / "no_test_split"
    shutil.copytree(trained["dataset"], dataset)
    (dataset / "test_list.txt").unlink()
    result = run_cli("train", "quantize", trained["tag"], "--dataset", str(dataset),
                     "--split", "test", check=False)  # fmt: skip
    assert result.returncode == 2
    assert "test_list.txt" in result.stderr.strip().splitlines()[-1]
    assert "Statistics collection" not in result.stderr  # NNCF's progress: nothing ran


def test_reexport_drops_files_converted_from_the_old_program(folder: Path) -> None:
    """A second fit into the same save dir (or a resumed one) must not leave the previous
    model's ONNX/OpenVINO/INT8 files beside the new program: engines would serve stale weights
    (seen: openvino fp32 'agreeing' 95 % with paddle fp32 after a resume)."""
    from lcnet_runner.artifact import DERIVED_FILES
    from train.export import export_inference
    from train.model import build_model

    artifact = load_folder(folder)
    for name in DERIVED_FILES:
        (folder / name).write_text("stale")
    export_inference(build_model("PPLCNet_x0_25", 3), folder, architecture="PPLCNet_x0_25",
                     labels=list(artifact.labels), preprocess=artifact.preprocess,
                     info=artifact.info)  # fmt: skip
    assert not any((folder / name).exists() for name in DERIVED_FILES)


def test_fit_int8_without_the_extra_fails_before_training(
    colour_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The missing extra is the edge we fake: nncf 'not installed'."""
    from train.training import FitConfig, fit

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nncf" else find_spec(name, *a),
    )
    with pytest.raises(ValueError, match=r"pip install 'lcnet-bento\[int8\]'"):
        fit(colour_dataset, FitConfig(int8=True, pretrained="none", save_dir=str(tmp_path)))
    assert not list(tmp_path.glob("*.pd*"))  # nothing trained or checkpointed


def test_report_advice_names_the_model_it_reports_on(folder: Path) -> None:
    """It said `python -m train export MODEL` and `verify MODEL`, the model being the one asked
    about (the dataset, which the model does not record, stays DIR)."""
    info = load_folder(folder).info
    write_info(folder, {k: v for k, v in info.items() if k != GUARD_KEY})
    (folder / "inference.onnx").unlink()
    spaced = folder.rename(folder.with_name("my model"))
    report = run_cli("train", "report", str(spaced)).stdout
    assert (f"paddle fp32 only (add inference.onnx: python -m train export '{spaced}' --format "
            "onnx)") in report  # fmt: skip
    assert (f"not measured: auto serves paddle fp32 (python -m train verify '{spaced}' --dataset "
            "DIR)") in report  # fmt: skip
