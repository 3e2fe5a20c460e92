"""INT8 post-training quantization for the OpenVINO engine (NNCF), calibrated on the model's own
training images, then checked by the accuracy guard on its val split.

The seed's PaddleX 2 offered quantization-aware training; post-training quantization needs no
retraining and takes seconds. Calibration images matter: calibrating PP-LCNet on synthetic noise
dropped top-1 to 31 % on a real set, its own training images kept it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lcnet_runner.artifact import INT8_FILE, load_folder
from lcnet_runner.preprocess import normalize

from .console import progress_to_stderr
from .data import sample_crops
from .decoded_cache import CacheConfig
from .evaluation import decode_labelled_split
from .export import export_openvino, revise
from .guard import guard_figures, record_guard
from .split import read_split

CALIBRATION_IMAGES = 300  # NNCF's default subset size; more barely moves the ranges


def require_int8_extra() -> None:
    """Fail before any work (fit checks it before training) when NNCF or OpenVINO is missing."""
    if not all(importlib.util.find_spec(module) for module in ("nncf", "openvino", "paddle2onnx")):
        raise ValueError("INT8 needs the int8 extra: pip install 'lcnet-bento[int8]'")


# Accuracy control: keep the INT8 model's top-1 within this much of Paddle fp32's on the
# calibration images, reverting the most sensitive layers to fp32 until it is (the guard then
# checks the val split). Plain post-training quantization flipped 1–3 of 160 val images of the
# demo's x0.25 at 64 px, failing the guard; with the control: none, at the same speed.
MAX_AGREEMENT_DROP = 0.005


def quantize_openvino(
    folder: str | Path,
    crops: np.ndarray,
    *,
    overflow_fix: bool = True,
    accuracy_control: bool = True,
) -> Path:
    """Write ``inference_int8.xml/.bin``: the OpenVINO IR with INT8 convolutions, activation
    ranges calibrated on ``crops`` (uint8 NHWC), layers that cost agreement with Paddle fp32
    on them kept in fp32. The switches exist for the benchmarks (random weights agree with
    nothing): ``overflow_fix=False`` is NNCF's default, which fixes the first layer only."""
    require_int8_extra()
    import nncf
    import openvino as ov

    folder = Path(folder)
    artifact = load_folder(folder)
    ir = export_openvino(folder)  # always from the current ONNX file, never a stale IR
    samples = nncf.Dataset(list(crops[:, None]), lambda x: normalize(x, artifact.preprocess))
    # 7-bit weights: without VNNI (AVX2, AVX-512 without VNNI) the CPU's 8-bit dot products
    # saturate an intermediate sum, which broke PP-LCNet (hardswish) on an AVX2-only EPYC:
    # 36.9 % agreement with the default, 100 % with the fix (docs/benchmarks.md has its cost).
    # One IR then answers right on every x86 CPU kind.
    fix = nncf.OverflowFix.ENABLE if overflow_fix else nncf.OverflowFix.FIRST_LAYER
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=fix)
    model = ov.Core().read_model(str(ir))
    with progress_to_stderr():  # NNCF's progress bars
        if accuracy_control:
            quantized = _with_accuracy_control(nncf, model, samples, crops, artifact, advanced)
        else:
            quantized = nncf.quantize(model, samples, subset_size=len(crops),
                                      advanced_parameters=advanced)  # fmt: skip
    target = folder / INT8_FILE
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return target


def _with_accuracy_control(nncf, model, samples, crops: np.ndarray, artifact, advanced):
    """NNCF's accuracy-controlled quantization, the metric being top-1 agreement with Paddle
    fp32 on the calibration crops (evaluated 32 images per call)."""
    from lcnet_runner import Predictor

    reference = Predictor(artifact, engine="paddle", precision="fp32").infer(crops).argmax(1)
    labelled = nncf.Dataset(list(zip(crops, reference, strict=True)))

    def agreement(compiled, items) -> float:
        output, hits = compiled.output(0), []
        batch = list(items)
        for i in range(0, len(batch), 32):
            chunk = batch[i : i + 32]
            images = normalize(np.stack([crop for crop, _ in chunk]), artifact.preprocess)
            top1 = compiled(images)[output].argmax(1)
            hits.extend(top1 == np.array([label for _, label in chunk]))
        return float(np.mean(hits))

    nncf.set_log_level(logging.WARNING)  # its INFO lines name every operation it tries
    return nncf.quantize_with_accuracy_control(
        model, samples, labelled, agreement, max_drop=MAX_AGREEMENT_DROP,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(crops),
        advanced_quantization_parameters=advanced,
    )  # fmt: skip


def quantize(
    model: str | Path,
    dataset: str | Path,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    split: str = "val",
    threads: int | None = None,
    seed: int = 0,
    cache: CacheConfig | None = None,
) -> tuple[str, dict[str, Any]]:
    """``python -m train quantize``: calibrate on ``calibration_images`` training images of
    ``dataset``, write the INT8 variant, and record every variant's guard figures on ``split``.
    A folder is updated in place, a store tag saved as a new version; returns that and the
    figures."""
    dataset = Path(dataset)
    if calibration_images < 1:
        raise ValueError("--calibration-images must be at least 1")
    figures: dict[str, Any] = {}

    def add_int8(folder: Path) -> None:
        artifact = load_folder(folder)
        labels, preprocess = artifact.labels, artifact.preprocess
        train = decode_labelled_split(dataset, "train", labels, preprocess,
                                      limit=calibration_images, seed=seed, cache=cache)  # fmt: skip
        quantize_openvino(folder, sample_crops(train, len(train), preprocess.crop_size))
        evaluation = decode_labelled_split(dataset, split, labels, preprocess, cache=cache)
        figures.update(guard_figures(folder, evaluation, split, threads, str(model), dataset))
        record_guard(folder, figures)

    require_int8_extra()  # these fail before anything is copied
    read_split(dataset, "train")
    read_split(dataset, split)
    return revise(model, add_int8), figures
