"""Pieces the benchmarks share: a model to measure, and a bounded timing loop."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def smooth_images(count: int, size: int = 224, seed: int = 0):
    """Smooth random uint8 images (NHWC): natural-image-like statistics, no dataset needed."""
    import numpy as np

    cells = (np.random.default_rng(seed).random((count, 7, 7, 3)) * 255).astype(np.uint8)
    return cells.repeat(-(-size // 7), 1).repeat(-(-size // 7), 2)[:, :size, :size]


def export_random_model(model: str, folder: Path, int8: bool = False) -> dict[str, Any]:
    """A seeded, randomly initialised 1000-class model exported with its ONNX file (speed does
    not depend on the weights) and, with ``int8``, an INT8 variant calibrated on smooth random
    images (fine for timing, meaningless for accuracy); returns its info."""
    import importlib.util

    import paddle

    from lcnet_runner.preprocess import PreprocessConfig
    from train.export import export_inference, export_onnx
    from train.model import build_model

    paddle.seed(0)
    labels = [f"class_{i}" for i in range(1000)]
    info = {"architecture": model, "classes": labels}
    export_inference(build_model(model, 1000), folder, architecture=model, labels=labels,
                     preprocess=PreprocessConfig(), info=info)  # fmt: skip
    export_onnx(folder)  # for the onnxruntime / openvino engines, when installed
    if int8 and importlib.util.find_spec("nncf"):
        from train.quantize import quantize_openvino

        quantize_openvino(folder, smooth_images(100))
    return info


def every_variant(folder: Path, threads: int, batch_size: int = 16) -> dict:
    """A Predictor per engine × precision that runs here, Paddle fp32 first; the guard is
    skipped (random weights: timing only). Prints what it skips and why."""
    from lcnet_runner.predictor import each_variant

    def skipped(variant, reason: str) -> None:
        print(f"  skipped {variant}: {reason}")

    return dict(each_variant(folder, threads=threads, batch_size=batch_size, on_skip=skipped))


def throughput(call: Callable[[], object], items_per_call: int, seconds: float) -> float:
    """Items per second of ``call`` repeated for ``seconds`` (after one warm-up call)."""
    call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        done += items_per_call
    return done / (time.perf_counter() - start)
