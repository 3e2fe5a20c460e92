"""INT8 post-training quantization for the OpenVINO engine (NNCF), calibrated on the model's own
training images, then checked by the accuracy guard on its val split.

The seed's PaddleX 2 offered quantization-aware training; post-training quantization needs no
retraining and takes seconds. Calibration images matter: calibrating PP-LCNet on synthetic noise
dropped top-1 to 31 % on a real set, its own training images kept it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from lcnet_runner.artifact import INT8_FILE, load_folder
from lcnet_runner.preprocess import normalize

from .data import DecodedSplit, eval_batches
from .evaluate import decode_labelled_split
from .export import export_openvino, revise
from .guard import guard_figures, record_guard
from .split import read_split

CALIBRATION_IMAGES = 300  # NNCF's default subset size; more barely moves the ranges


def calibration_crops(split: DecodedSplit, count: int, crop_size: int, seed: int = 0) -> np.ndarray:
    """Center crops (what serving feeds the model) of ``count`` random images of a split."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.permutation(len(split))[:count])
    subset = DecodedSplit([split.images[i] for i in ids], split.labels[ids], [])
    return np.concatenate([crops for crops, _ in eval_batches(subset, crop_size, 64)])


def require_int8_extra() -> None:
    """Fail before any work (fit checks it before training) when NNCF or OpenVINO is missing."""
    if not all(importlib.util.find_spec(module) for module in ("nncf", "openvino", "paddle2onnx")):
        raise ValueError("INT8 needs the int8 extra: pip install 'lcnet-bento[int8]'")


def quantize_openvino(folder: str | Path, crops: np.ndarray) -> Path:
    """Write ``inference_int8.xml/.bin``: the OpenVINO IR with INT8 convolutions, activation
    ranges calibrated on ``crops`` (uint8 NHWC)."""
    require_int8_extra()
    import nncf
    import openvino as ov

    folder = Path(folder)
    artifact = load_folder(folder)
    ir = export_openvino(folder)  # always from the current ONNX file, never a stale IR
    samples = nncf.Dataset(list(crops[:, None]), lambda x: normalize(x, artifact.preprocess))
    quantized = nncf.quantize(ov.Core().read_model(str(ir)), samples, subset_size=len(crops))
    target = folder / INT8_FILE
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return target


def quantize(
    model: str | Path,
    dataset: str | Path,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    split: str = "val",
    threads: int | None = None,
    seed: int = 0,
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
                                      limit=calibration_images, seed=seed)  # fmt: skip
        quantize_openvino(folder, calibration_crops(train, len(train), preprocess.crop_size))
        evaluation = decode_labelled_split(dataset, split, labels, preprocess)
        figures.update(guard_figures(folder, evaluation, split, threads))
        record_guard(folder, figures)

    require_int8_extra()  # both fail before anything is copied
    read_split(dataset, "train")
    return revise(model, add_int8), figures
