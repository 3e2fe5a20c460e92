"""``Predictor``: the seed's ``pdx.deploy.Predictor(model_dir).predict(img)``, for a store tag
or an exported folder."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np

from .artifact import DEFAULT_MODEL, ModelArtifact, ModelNotFoundError, load_artifact
from .engines import create_engine
from .preprocess import ImageSource, normalize, preprocess

Prediction = dict  # {"category_id": int, "category": str, "score": float}


@dataclass
class Timings:
    """Wall-clock seconds of the last ``predict`` call, per stage (for the latency block)."""

    images: int = 0
    batches: int = 0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0

    def __add__(self, other: Timings) -> Timings:
        return Timings(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.inference_s + self.postprocess_s

    def report(self, batch_size: int) -> str:
        """The seed's "Inference Time Info" block."""
        total_ms, n = self.total_s * 1000, max(self.images, 1)
        qps = self.images / self.total_s if self.total_s else 0.0
        return (
            "------------------ Inference Time Info ----------------------\n"
            f"total_time(ms): {total_ms:.2f}, img_num: {self.images}, batch_size: {batch_size}\n"
            f"average latency time(ms): {total_ms / n:.2f}, QPS: {qps:.6f}\n"
            f"preprocess_time_per_im(ms): {self.preprocess_s * 1000 / n:.2f}, "
            f"inference_time_per_batch(ms): {self.inference_s * 1000 / max(self.batches, 1):.2f}, "
            f"postprocess_time_per_im(ms): {self.postprocess_s * 1000 / n:.2f}"
        )


def top_k_predictions(
    probs: np.ndarray, labels: Sequence[str], top_k: int = 1
) -> list[list[Prediction]]:
    """Class probabilities (N×C) → per image, the ``top_k`` classes, best first."""
    k = max(1, min(top_k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"category_id": int(i), "category": labels[i], "score": float(row[i])} for i in ids]
        for row, ids in zip(probs, order, strict=True)
    ]


class Predictor:
    """Classify images with an exported PP-LCNet.

    ``model`` is a BentoML store tag (``pplcnet:latest``) or an exported folder; ``engine`` one of
    ``paddle``, ``onnxruntime``, ``openvino`` with ``precision`` fp32 or bf16 (openvino);
    ``threads`` are the engine's CPU threads (default: all cores).
    """

    def __init__(
        self,
        model: str | Path | ModelArtifact = DEFAULT_MODEL,
        *,
        engine: str = "paddle",
        precision: str = "fp32",
        threads: int | None = None,
        batch_size: int = 16,
    ):
        self.artifact: ModelArtifact = load_artifact(model)
        self.labels = self.artifact.labels
        self.config = self.artifact.preprocess
        self.engine = create_engine(engine, self.artifact, threads, precision)
        self.batch_size = batch_size
        self.timings = Timings()
        self._check_output_width()

    def _check_output_width(self) -> None:
        """Fail at load time, not at the first request, when labels and classifier disagree
        (this also warms oneDNN up)."""
        size = self.config.crop_size
        width = self.infer(np.zeros((1, size, size, 3), np.uint8)).shape[-1]
        if width != len(self.labels):
            raise ModelNotFoundError(
                f"{self.artifact.name}: the model outputs {width} classes but has "
                f"{len(self.labels)} labels"
            )

    def infer(self, crops: np.ndarray) -> np.ndarray:
        """uint8 NHWC crops → class probabilities (N×C); the batch path the runner uses."""
        return self.engine.predict(normalize(crops, self.config))

    def predict(
        self, images: ImageSource | Sequence[ImageSource], top_k: int = 1, *, bgr: bool = False
    ) -> list[Prediction] | list[list[Prediction]]:
        """One image → its top-k list; a list of images → one top-k list per image."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        timings = Timings(images=len(batch))
        results: list[list[Prediction]] = []
        for start in range(0, len(batch), self.batch_size):
            t0 = time.perf_counter()
            crops = np.stack(
                [
                    preprocess(img, self.config, bgr=bgr)
                    for img in batch[start : start + self.batch_size]
                ]
            )
            t1 = time.perf_counter()
            probs = self.infer(crops)
            t2 = time.perf_counter()
            results.extend(top_k_predictions(probs, self.labels, top_k))
            t3 = time.perf_counter()
            timings.batches += 1
            timings.preprocess_s += t1 - t0
            timings.inference_s += t2 - t1
            timings.postprocess_s += t3 - t2
        self.timings = timings
        return results[0] if single else results
