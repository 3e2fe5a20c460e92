"""Accuracy: metrics from class scores, of the model being trained (dygraph) or of a stored or
exported one (``evaluate``)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from lcnet_runner import Predictor
from lcnet_runner.engines import AUTO, REFERENCE
from lcnet_runner.guard import compare
from lcnet_runner.preprocess import PreprocessConfig, normalize

from .data import DecodedSplit, eval_batches
from .decoded_cache import CacheConfig, load_split
from .plots import confusion_matrix, plot_confusion_matrix
from .split import read_labels, read_split


def classification_metrics(
    scores: np.ndarray, targets: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """top-1, top-5 (or top-C for fewer classes), image count, and per class (every one, in
    label order) its top-1 and its image count: a class with no image has top-1 None, as the
    whole has with none, never a number (it was left out, unseen in a split too small for it)."""
    n = len(targets)
    per_class_n = {name: int((targets == i).sum()) for i, name in enumerate(class_names)}
    if n == 0:
        return {"top1": None, "top5": None, "n": 0, "per_class": dict.fromkeys(class_names),
                "per_class_n": per_class_n}  # fmt: skip
    k = min(5, scores.shape[1])
    top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hit1 = top_k[:, 0] == targets
    hit5 = (top_k == targets[:, None]).any(axis=1)
    per_class = {
        name: round(float(hit1[targets == i].mean()), 4) if per_class_n[name] else None
        for i, name in enumerate(class_names)
    }
    return {
        "top1": round(float(hit1.mean()), 4),
        "top5": round(float(hit5.mean()), 4),
        "n": n,
        "per_class": per_class,
        "per_class_n": per_class_n,
    }


def dygraph_scores(
    model: paddle.nn.Layer, split: DecodedSplit, preprocess: PreprocessConfig
) -> np.ndarray:
    """Logits of the model being trained on a decoded split, with the serving crops."""
    model.eval()
    outputs = []
    with paddle.no_grad():
        for crops, _ in eval_batches(split, preprocess.crop_size, batch_size=64):
            outputs.append(model(paddle.to_tensor(normalize(crops, preprocess))).numpy())
    return np.concatenate(outputs)


def dygraph_metrics(
    model: paddle.nn.Layer,
    split: DecodedSplit | None,
    labels: Sequence[str],
    preprocess: PreprocessConfig,
) -> dict[str, Any]:
    """``classification_metrics`` of the model being trained on a decoded split ({} without one)."""
    if split is None:
        return {}
    return classification_metrics(dygraph_scores(model, split, preprocess), split.labels, labels)


def _first_difference(dataset_labels: Sequence[str], model_labels: Sequence[str]) -> str:
    """Where the dataset's classes and the model's first differ, in words: a count alone ("4 and 4
    classes") hid a renamed class or another order."""
    index, (in_dataset, in_model) = next(
        (index, pair)
        for index, pair in enumerate(zip_longest(dataset_labels, model_labels))
        if pair[0] != pair[1]
    )
    named = [repr(name) if name is not None else "no class" for name in (in_dataset, in_model)]
    return f"class {index} is {named[0]} in the dataset, {named[1]} in the model"


def decode_labelled_split(
    dataset: str | Path,
    split: str,
    labels: Sequence[str],
    preprocess: PreprocessConfig,
    limit: int | None = None,
    seed: int = 0,
    cache: CacheConfig | None = None,
) -> DecodedSplit:
    """One split of ``dataset`` (``limit``: a random sample of it) decoded for a model with
    ``labels``, after checking the dataset has exactly those classes; the split's disk cache
    (``fit`` built it) is reused when there is one."""
    dataset_labels = read_labels(dataset)
    if list(dataset_labels) != list(labels):
        raise ValueError(
            f"the dataset's labels.txt differs from the model's labels: "
            f"{_first_difference(dataset_labels, labels)} ({len(dataset_labels)} and {len(labels)} "
            "classes); use the dataset it was trained for"
        )
    samples = read_split(dataset, split)
    if not samples:
        raise ValueError(f"the {split} split of {dataset} lists no images (split with a larger "
                         f"--{split}-ratio)")  # fmt: skip
    select = None
    if limit is not None and len(samples) > limit:
        select = sorted(np.random.default_rng(seed).permutation(len(samples))[:limit])
    decoded = load_split(samples, preprocess, cache or CacheConfig(), name=split,
                         dataset=Path(dataset), select=select)  # fmt: skip
    if not len(decoded):
        raise ValueError(f"the {split} split of {dataset} has no readable images")
    return decoded


def split_scores(predictor: Predictor, split: DecodedSplit, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of every image of a decoded split, center-cropped as in serving."""
    crop = predictor.preprocess_config.crop_size
    return np.concatenate(
        [predictor.infer(crops) for crops, _ in eval_batches(split, crop, batch_size)]
    )


def evaluate(
    model: str | Path,
    dataset: str | Path,
    split: str = "test",
    *,
    engine: str = AUTO,
    precision: str = AUTO,
    threads: int | None = None,
    confusion_png: str | Path | None = None,
    cache: CacheConfig | None = None,
) -> dict[str, Any]:
    """Accuracy of a stored model (tag) or exported folder on one split of a dataset, with the
    engine/precision serving would use (``auto``) or the one named; any variant other than
    Paddle fp32 is also compared with Paddle fp32 on the same images (the accuracy guard).
    ``confusion_png`` also writes the confusion matrix there; ``cache``: where decoded splits
    are cached (default: LCNET_CACHE)."""
    # A variant named outright is measured whatever its guard figures say: this is how to see them.
    named = engine != AUTO and precision != AUTO
    predictor = Predictor(model, engine=engine, precision=precision, threads=threads,
                          skip_guard=named, race_in_child=True)  # fmt: skip
    decoded = decode_labelled_split(dataset, split, predictor.labels, predictor.preprocess_config,
                                    cache=cache)  # fmt: skip
    probs = split_scores(predictor, decoded)
    metrics = classification_metrics(probs, decoded.labels, predictor.labels)
    result = {"model": predictor.artifact.name, "engine": predictor.variant.engine,
              "precision": predictor.variant.precision, "split": split, **metrics}  # fmt: skip
    if predictor.variant != REFERENCE:
        paddle_fp32 = Predictor(predictor.artifact, engine="paddle", precision="fp32",
                                threads=threads)  # fmt: skip
        result["vs_paddle_fp32"] = compare(
            split_scores(paddle_fp32, decoded), probs, decoded.labels
        )
    if confusion_png:
        counts = confusion_matrix(decoded.labels, probs.argmax(axis=1), len(predictor.labels))
        title = f"{predictor.artifact.name}: {split} split"
        result["confusion_matrix"] = str(
            plot_confusion_matrix(counts, predictor.labels, confusion_png, title=title)
        )
    return {**result, "skipped": decoded.skipped}
