"""The accuracy guard: which engine × precision variants may serve a model, and which is fastest.

Paddle fp32 is the reference. Any other variant (another engine, bf16, INT8) must have been
measured on the model's own evaluation images — ``python -m train fit`` does it on the val split,
``python -m train verify`` and ``quantize`` on any dataset — and may lose at most
``MAX_TOP1_DROP_PT`` points of top-1 accuracy and must agree with the reference's top-1 on at
least ``MIN_AGREEMENT`` of the images. The figures live in ``model_info.json`` (and the store
version's metadata) under ``"accuracy_guard"``; the Predictor refuses a variant without passing
figures unless told ``skip_guard=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifact import ModelArtifact
from .engines import ENGINES, PRECISIONS

MAX_TOP1_DROP_PT = 0.5
MIN_AGREEMENT = 0.99
GUARD_KEY = "accuracy_guard"  # in model_info.json and the store metadata
AUTO = "auto"


@dataclass(frozen=True)
class Variant:
    engine: str
    precision: str

    def __str__(self) -> str:
        return f"{self.engine}/{self.precision}"


REFERENCE = Variant("paddle", "fp32")
# Fastest first: PP-LCNet x1.0 at 224 px on 2 cores, batch 1 and 16 (bench/engines.py,
# docs/benchmarks.md). On this AMX CPU bf16 and INT8 run within noise of each other (~1.9× fp32
# on 1 thread), so bf16, which loses less accuracy, comes first; on a CPU without bf16 INT8 is
# the fast one. OpenVINO fp32 edges out ONNX Runtime fp32.
SPEED_ORDER = (
    Variant("openvino", "bf16"),
    Variant("openvino", "int8"),
    Variant("openvino", "fp32"),
    Variant("onnxruntime", "fp32"),
    REFERENCE,
)


class AccuracyGuardError(ValueError):
    """A variant without passing accuracy figures; the message says how to get them."""


def compare(reference: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """A variant's scores against the reference's on the same labelled images."""
    ref_top1, top1 = reference.argmax(1), scores.argmax(1)
    ref_acc, acc = float((ref_top1 == targets).mean()), float((top1 == targets).mean())
    drop_pt = 100 * (ref_acc - acc)
    agreement = float((top1 == ref_top1).mean())
    return {
        "top1": round(acc, 4),
        "top1_drop_pt": round(drop_pt, 2),
        "agreement": round(agreement, 4),
        "max_score_diff": round(float(np.abs(scores - reference).max()), 4),
        "passed": passes(drop_pt, agreement),
    }


def passes(top1_drop_pt: float, agreement: float) -> bool:
    return top1_drop_pt <= MAX_TOP1_DROP_PT + 1e-9 and agreement >= MIN_AGREEMENT - 1e-9


def candidates(engine: str = AUTO, precision: str = AUTO) -> list[Variant]:
    """Variants matching the request, fastest first (``auto`` matches any)."""
    if engine not in (AUTO, *ENGINES):
        raise ValueError(f"unknown engine {engine!r}; choose one of: {AUTO}, {', '.join(ENGINES)}")
    if precision not in (AUTO, *PRECISIONS):
        raise ValueError(
            f"unknown precision {precision!r}; choose one of: {AUTO}, {', '.join(PRECISIONS)}"
        )
    found = [
        v for v in SPEED_ORDER if engine in (AUTO, v.engine) and precision in (AUTO, v.precision)
    ]
    if not found:
        runs = "/".join(v.precision for v in SPEED_ORDER if v.engine == engine)
        raise ValueError(f"the {engine} engine runs {runs} only; bf16 and int8 run on openvino")
    return found


def check(artifact: ModelArtifact, variant: Variant) -> None:
    """Raise AccuracyGuardError unless ``variant`` is the reference or passed on this model."""
    if variant == REFERENCE:
        return
    guard = artifact.info.get(GUARD_KEY) or {}
    figures = (guard.get("variants") or {}).get(str(variant))
    if figures is None:
        raise AccuracyGuardError(
            f"{variant} has not been checked against paddle/fp32 on {artifact.name}: "
            f"run `python -m train verify {artifact.name} --dataset DIR` (or quantize for int8), "
            "or accept it unchecked with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
        )
    if not passes(figures["top1_drop_pt"], figures["agreement"]):
        change, agreement = 0.0 - figures["top1_drop_pt"], 100 * figures["agreement"]
        raise AccuracyGuardError(
            f"{variant} fails the accuracy guard on {artifact.name}: top-1 {change:+.2f} points "
            f"vs paddle/fp32 (bar: -{MAX_TOP1_DROP_PT}), top-1 agreement {agreement:.1f} % "
            f"(bar: {100 * MIN_AGREEMENT:.0f} %) "
            f"on {guard.get('images')} {guard.get('split')} images; use another engine/precision "
            "or accept it with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
        )
