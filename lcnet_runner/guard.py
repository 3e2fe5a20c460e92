"""The accuracy guard: which engine × precision variants may serve a model.

Paddle fp32 is the reference. Any other variant (another engine, bf16, INT8) must have been
measured on the model's own evaluation images — ``python -m train fit`` does it on the val split,
``python -m train verify`` and ``quantize`` on any dataset — and may lose at most
``MAX_TOP1_DROP_PT`` points of top-1 accuracy and must agree with the reference's top-1 on at
least ``MIN_AGREEMENT`` of the images. The figures live in ``model_info.json`` (and the store
version's metadata) under ``"accuracy_guard"``; the Predictor refuses a variant without passing
figures unless told ``skip_guard=True``, and re-checks the one it chose on the machine that
serves (the self-check below).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import SELF_CHECK_FILE, ModelArtifact
from .engines import DATASET_ARGUMENT, REFERENCE, Variant
from .hardware import cpu_features

MAX_TOP1_DROP_PT = 0.5
MIN_AGREEMENT = 0.99
GUARD_KEY = "accuracy_guard"  # in model_info.json and the store metadata
# The self-check: a sample of the guard's images, with Paddle fp32's scores on the CPU that
# measured the guard, stored with the model and re-run through the chosen variant where it
# serves (8-bit kernels differ between CPU kinds: an INT8 model that passed on a VNNI CPU can
# answer wrong on an AVX2-only one). Its own bar: near-ties flip legitimately between CPUs, so
# top-1 agreement counts only images whose reference margin is clear, and the scores of the
# reference's top class must stay close on average.
SELF_CHECK_IMAGES = 64
SELF_CHECK_CLEAR_MARGIN = 0.2  # reference top-1 minus top-2 probability
SELF_CHECK_MIN_AGREEMENT = 0.95  # on the clear images
SELF_CHECK_MAX_SCORE_DIFF = 0.05  # mean |Δ probability| of the reference's top class


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


def check(artifact: ModelArtifact, variant: Variant) -> None:
    """Raise AccuracyGuardError unless ``variant`` is the reference or passed on this model."""
    if variant == REFERENCE:
        return
    guard = _guard_of(artifact, variant)
    figures = guard.get("variants", {}).get(str(variant))
    if figures is None:
        raise AccuracyGuardError(
            f"{variant} has not been checked against paddle/fp32 on {artifact.name}: run "
            f"`python -m train verify {artifact.as_argument} {DATASET_ARGUMENT}` (or quantize for "
            "int8), or accept it unchecked with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
        )
    drop_pt, agreement = _figures_of(artifact, variant, figures)
    if not passes(drop_pt, agreement):
        top1 = f"top-1 {0.0 - drop_pt:+.2f} points vs paddle/fp32 (bar: -{MAX_TOP1_DROP_PT})"
        agrees = f"top-1 agreement {100 * agreement:.1f} % (bar: {100 * MIN_AGREEMENT:.0f} %)"
        # Which figure missed its bar: a variant can be more accurate and still disagree.
        checks = ((top1, passes(drop_pt, 1.0)), (agrees, passes(0.0, agreement)))
        missed = " and ".join(figure for figure, ok in checks if not ok)
        held = "".join(f" ({figure} is within its bar)" for figure, ok in checks if ok)
        raise AccuracyGuardError(
            f"{variant} fails the accuracy guard on {artifact.name}: {missed}{held}, on "
            f"{guard.get('images')} {guard.get('split')} images; use another engine/precision "
            "or accept it with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
        )


def _damaged(artifact: ModelArtifact, variant: Variant, what: str) -> AccuracyGuardError:
    """The error for stored guard data (figures, self-check sample) that cannot be read: the
    variant is not usable (auto falls back), and ``verify`` writes them again."""
    return AccuracyGuardError(
        f"{variant} cannot be checked on {artifact.name}: {what}; run `python -m train verify "
        f"{artifact.as_argument} {DATASET_ARGUMENT}` to measure it again, or accept it unchecked "
        "with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
    )


def _guard_of(artifact: ModelArtifact, variant: Variant) -> Mapping[str, Any]:
    """The stored guard, its ``variants`` a mapping; metadata is edited by hand and by older
    versions, so a wrong shape is the variant's failure, not a crash of ``auto``."""
    guard = artifact.info.get(GUARD_KEY) or {}
    if not isinstance(guard, Mapping):
        raise _damaged(artifact, variant, f"its {GUARD_KEY!r} is not a mapping: {guard!r:.80}")
    variants = guard.get("variants") or {}
    if not isinstance(variants, Mapping):
        raise _damaged(artifact, variant, f"its {GUARD_KEY}.variants is not a mapping")
    return {**guard, "variants": variants}


def _figures_of(artifact: ModelArtifact, variant: Variant, figures: Any) -> tuple[float, float]:
    """``figures``' top-1 drop and agreement, each a finite real number (bool is not one)."""
    if not isinstance(figures, Mapping):
        raise _damaged(artifact, variant, f"its guard entry is not a mapping: {figures!r:.80}")
    numbers = []
    for key in ("top1_drop_pt", "agreement"):
        value = figures.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _damaged(artifact, variant, f"its guard entry has no number {key!r}: {value!r}")
        if not math.isfinite(value):
            raise _damaged(artifact, variant, f"its guard entry's {key!r} is {value!r}")
        numbers.append(float(value))
    return numbers[0], numbers[1]


def write_self_check(folder: Path, crops: np.ndarray, reference_probs: np.ndarray) -> None:
    """Store the sample (uint8 NHWC center crops) with Paddle fp32's probabilities on it."""
    np.savez_compressed(folder / SELF_CHECK_FILE, crops=crops, probs=reference_probs)


def self_check_figures(reference: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """A variant's probabilities on the sample against the stored reference's, and the bar.
    ``agreement`` is None when no sample image has a clear top class (a model barely trained):
    then only the scores are compared (it read 100 %, of nothing)."""
    ranked = np.sort(reference, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] >= SELF_CHECK_CLEAR_MARGIN
    top = reference.argmax(1)
    agree = probs.argmax(1) == top
    agreement = round(float(agree[clear].mean()), 4) if clear.any() else None
    rows = np.arange(len(top))
    score_diff = float(np.abs(probs[rows, top] - reference[rows, top]).mean())
    return {
        "images": len(top),
        "clear": int(clear.sum()),
        "agreement": agreement,
        "mean_score_diff": round(score_diff, 4),
        "passed": (agreement is None or agreement >= SELF_CHECK_MIN_AGREEMENT - 1e-9)
        and score_diff <= SELF_CHECK_MAX_SCORE_DIFF + 1e-9,
    }


def self_check_text(figures: Mapping[str, Any]) -> str:
    """The figures in words, for the log, the CLI and a refusal."""
    scores = f"mean score change {figures['mean_score_diff']:.3f}"
    if figures["agreement"] is None:
        return f"top-1 not compared: none of {figures['images']} sample images is clear; {scores}"
    clear = f"{figures['clear']} clear sample images"
    return f"top-1 agreement {100 * figures['agreement']:.1f} % on {clear}, {scores}"


def self_check(
    artifact: ModelArtifact, variant: Variant, infer: Callable[[np.ndarray], np.ndarray]
) -> dict[str, Any] | None:
    """Run the stored sample through ``infer`` (uint8 crops → probabilities) on this machine;
    its figures, or None when the model carries no sample (imported, or stored before
    self-checks). Raises AccuracyGuardError when the variant disagrees with the reference."""
    path = artifact.path / SELF_CHECK_FILE
    if variant == REFERENCE or not path.is_file():
        return None
    crops, reference = _load_sample(artifact, variant, path)
    probs = np.concatenate([infer(crops[i : i + 16]) for i in range(0, len(crops), 16)])
    figures = self_check_figures(reference, probs)
    if not figures["passed"]:
        raise AccuracyGuardError(
            f"{variant} fails its self-check on this CPU ({cpu_features()['model']}) for "
            f"{artifact.name}: {self_check_text(figures)} (bars: "
            f"{100 * SELF_CHECK_MIN_AGREEMENT:.0f} % and {SELF_CHECK_MAX_SCORE_DIFF}); its "
            "stored guard figures were measured on "
            "another CPU: run `python -m train verify` here, use another engine/precision, or "
            "accept it with skip_guard / --skip-guard / LCNET_SKIP_GUARD=1"
        )
    return figures


def _load_sample(artifact: ModelArtifact, variant: Variant, path: Path) -> tuple[np.ndarray, ...]:
    """The stored crops and reference probabilities; a damaged file (truncated copy, missing
    array) makes the variant unusable here rather than crash ``auto``, which serves the
    reference instead."""
    try:
        with np.load(path) as sample:
            crops, reference = sample["crops"], sample["probs"]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        why = f"{SELF_CHECK_FILE} is damaged ({type(err).__name__}: {err})"
        raise _damaged(artifact, variant, why) from None
    n, crop = (len(crops) if crops.ndim else 0), artifact.preprocess.crop_size
    if not n or crops.shape != (n, crop, crop, 3) or reference.shape != (n, len(artifact.labels)):
        shapes = f"crops {crops.shape}, probs {reference.shape}"
        why = f"{SELF_CHECK_FILE} is damaged: its arrays do not fit the model ({shapes})"
        raise _damaged(artifact, variant, why)
    return crops, reference
