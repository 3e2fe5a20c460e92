"""Pieces the benchmarks share: a model to measure, and a bounded timing loop."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def export_random_model(model: str, folder: Path) -> dict[str, Any]:
    """A seeded, randomly initialised 1000-class model exported with its ONNX file (speed does
    not depend on the weights); returns its info."""
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
    return info


def throughput(call: Callable[[], object], items_per_call: int, seconds: float) -> float:
    """Items per second of ``call`` repeated for ``seconds`` (after one warm-up call)."""
    call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        done += items_per_call
    return done / (time.perf_counter() - start)
