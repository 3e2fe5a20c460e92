"""The accuracy guard's figures: every inference variant of an exported model against Paddle fp32
on labelled images (``lcnet_runner.guard`` holds the bar and enforces it at load time)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lcnet_runner.artifact import load_folder, write_info
from lcnet_runner.engines import DATASET_ARGUMENT, REFERENCE, Variant
from lcnet_runner.guard import (
    GUARD_KEY,
    MAX_TOP1_DROP_PT,
    MIN_AGREEMENT,
    SELF_CHECK_IMAGES,
    compare,
    cpu_features,
    write_self_check,
)
from lcnet_runner.predictor import each_variant

from .data import DecodedSplit, sample_crops
from .decoded_cache import CacheConfig
from .evaluation import decode_labelled_split, split_scores
from .export import revise


def guard_figures(
    folder: str | Path,
    split: DecodedSplit,
    split_name: str,
    threads: int | None = None,
    name: str | None = None,
    dataset: str | Path | None = None,
) -> dict[str, Any]:
    """Top-1 loss and agreement of each variant that runs here (engine installed, its file
    present, the CPU able), against Paddle fp32 on the same images. Also writes the self-check
    sample into ``folder``: some of these images with Paddle fp32's scores, which the chosen
    variant must reproduce on the machine that serves (lcnet_runner.guard.self_check).

    A variant that does not run here keeps the figures the folder's earlier guard has of it
    (``kept_from`` says where): ``verify`` on an AVX2 machine erased bf16's, measured with AMX,
    and a server with AMX then never served bf16.

    ``name`` is what the advice for a variant not measured names (make its file with ...): the
    model as the user gave it, when ``folder`` is a temporary copy of a store version (its path
    was gone once the command ended, and kept in the figures). By default the folder.
    ``dataset``: the one that advice names, when given (``--dataset DIR`` else)."""
    artifact = load_folder(folder, tag=name)
    reference, variants, not_here = None, {}, {}
    # Paddle fp32 comes first; each other variant is compared with it on the same images.

    def skipped(variant: Variant, why: str) -> None:
        if dataset is not None:
            why = why.replace(DATASET_ARGUMENT, f"--dataset {shlex.quote(str(dataset))}")
        not_here[str(variant)] = why

    for variant, predictor in each_variant(artifact, threads=threads, on_skip=skipped):
        scores = split_scores(predictor, split)
        if variant == REFERENCE:
            reference = scores
            sample = sample_crops(split, SELF_CHECK_IMAGES, predictor.preprocess_config.crop_size)
            write_self_check(Path(folder), sample, predictor.infer(sample))
        else:
            variants[str(variant)] = compare(reference, scores, split.labels)
    return {
        "split": split_name,
        "images": len(split),
        "reference": str(REFERENCE),
        "reference_top1": round(float((reference.argmax(1) == split.labels).mean()), 4),
        "max_top1_drop_pt": MAX_TOP1_DROP_PT,
        "min_agreement": MIN_AGREEMENT,
        "cpu": cpu_features(),  # the kernels that gave these figures; self-checks cover others
        "variants": {**variants, **_kept_figures(artifact.info.get(GUARD_KEY), not_here)},
        "not_measured": not_here,  # variant → why it did not run here
    }


def _kept_figures(earlier: Any, not_here: dict[str, str]) -> dict[str, Any]:
    """The earlier guard's figures of the variants that did not run here: still those of these
    weights (verify and quantize keep them; fit's new weights come without a guard)."""
    if not isinstance(earlier, dict) or not isinstance(earlier.get("variants"), dict):
        return {}
    where = {key: earlier.get(key) for key in ("cpu", "split", "images")}
    return {
        name: {**figures, "kept_from": figures.get("kept_from", where)}
        for name, figures in earlier["variants"].items()
        if name in not_here and isinstance(figures, dict)
    }


def record_guard(folder: str | Path, figures: dict[str, Any]) -> dict[str, Any]:
    """Store the figures in the folder's model_info.json; returns the updated info."""
    info = {**load_folder(folder).info, GUARD_KEY: figures}
    write_info(Path(folder), info)
    return info


def describe(figures: dict[str, Any]) -> str:
    """One line per variant, for logs and the CLI."""
    head = (
        f"accuracy guard on {figures['images']} {figures['split']} images "
        f"(paddle/fp32 top-1 {100 * figures['reference_top1']:.1f} %):"
    )
    rows = []
    for name, f in figures["variants"].items():
        row = (f"  {name:18s} {'passed' if f['passed'] else 'FAILED':6s}  top-1 "
               f"{100 * f['top1']:.1f} % ({0.0 - f['top1_drop_pt']:+.2f} pt), agreement "
               f"{100 * f['agreement']:.1f} %")  # fmt: skip
        if kept := f.get("kept_from"):
            cpu = (kept.get("cpu") or {}).get("model", "another CPU")
            row += f", kept from {kept.get('split')} on {cpu}"
        rows.append(row)
    for name, why in figures.get("not_measured", {}).items():
        rows.append(f"  {name:18s} not measured here: {why}")
    return "\n".join([head, *rows] if rows else [head, "  no other engine installed"])


def verify(
    model: str | Path,
    dataset: str | Path,
    split: str = "val",
    threads: int | None = None,
    cache: CacheConfig | None = None,
) -> tuple[str, dict[str, Any]]:
    """``python -m train verify``: measure and record the guard figures of every variant on a
    split. A folder is updated in place, a store tag saved as a new version; returns that and
    the figures."""
    figures: dict[str, Any] = {}

    def measure(folder: Path) -> None:
        artifact = load_folder(folder)
        decoded = decode_labelled_split(dataset, split, artifact.labels, artifact.preprocess,
                                        cache=cache)  # fmt: skip
        figures.update(guard_figures(folder, decoded, split, threads, str(model), dataset))
        record_guard(folder, figures)

    return revise(model, measure), figures
