"""``Predictor``: the seed's ``pdx.deploy.Predictor(model_dir).predict(img)``, for a store tag
or an exported folder."""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
from bentoml.exceptions import InvalidArgument

from .artifact import DEFAULT_MODEL, InvalidModelError, ModelArtifact, load_artifact
from .choice import Choice, choose
from .engines import (
    AUTO,
    ENGINES,
    REFERENCE,
    Engine,
    Variant,
    all_variants,
    create_engine,
)
from .hardware import cores_free, default_threads, resolve_threads
from .preprocess import ImageSource, preprocess


class TopKError(ValueError, InvalidArgument):
    """``top_k`` is not an integer >= 1. Also BentoML's InvalidArgument: raised in a user's
    ``@bentoml.api`` that embeds the runner, BentoML answers 400 with the message, not 500."""


def checked_top_k(top_k: int) -> int:
    """``top_k`` when it is an integer >= 1 (more than the classes is clamped when ranking)."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise TopKError(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


class Prediction(TypedDict):
    """One class of an answer (the seed's PaddleX ``Predictor`` format)."""

    category_id: int
    category: str
    score: float


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

    def latency_block(self, batch_size: int) -> str:
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


class EngineOutputError(RuntimeError):
    """The engine answered scores that are not numbers (NaN, inf): a fault of the model or the
    engine, not of the request, so a server answers 500, never a client error."""


def top_k_predictions(
    probs: np.ndarray, labels: Sequence[str], top_k: int = 1
) -> list[list[Prediction]]:
    """Class probabilities (N×C) → per image, the ``top_k`` classes, best first. Raises
    EngineOutputError for non-finite scores: argmax and argsort rank NaN differently (top-1
    would depend on top_k), and JSON has no NaN."""
    if not np.isfinite(probs).all():  # one pass over N×C floats: cheap beside the engine
        bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
        raise EngineOutputError(
            f"the engine returned non-finite scores (NaN or inf) for image(s) {bad.tolist()[:8]} "
            f"of a batch of {len(probs)}"
        )
    k = max(1, min(top_k, probs.shape[1]))
    if k == 1:  # most requests; argmax takes the first of equal scores, as the stable sort does
        order = probs.argmax(axis=1)[:, None]
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"category_id": int(i), "category": labels[i], "score": float(row[i])} for i in ids]
        for row, ids in zip(probs, order, strict=True)
    ]


class Predictor:
    """Classify images with an exported PP-LCNet.

    ``model`` is a BentoML store tag (``pplcnet:latest``) or an exported folder; ``engine`` one of
    ``paddle``, ``onnxruntime``, ``openvino`` and ``precision`` fp32, bf16 or int8 (openvino).
    ``auto`` (the default) picks the variant that is fastest on this machine among those that are
    installed, run on this CPU and passed the accuracy guard and its self-check on this model
    (``lcnet_runner.choice``); Paddle fp32 is always among them. An explicitly named variant
    without passing guard figures, or failing its self-check here, is refused unless
    ``skip_guard``. ``threads`` are the engine's CPU threads (default: all cores).
    """

    def __init__(
        self,
        model: str | Path | ModelArtifact = DEFAULT_MODEL,
        *,
        engine: str = AUTO,
        precision: str = AUTO,
        threads: int | None = None,
        batch_size: int = 16,
        skip_guard: bool = False,
        solo_threads: int | None = None,
        race_in_child: bool = False,
        stop: threading.Event | None = None,
    ):
        self.artifact: ModelArtifact = load_artifact(model)
        self.labels = self.artifact.labels
        self.preprocess_config = self.artifact.preprocess
        self.choice: Choice = choose(
            self.artifact, engine, precision, threads, skip_guard, race_in_child=race_in_child,
            stop=stop,
        )  # fmt: skip
        self.variant: Variant = self.choice.variant
        self.engine = self.choice.engine
        self.solo_engine = self._solo_engine(threads, solo_threads)
        self._cores = default_threads()
        # threads a lone image runs on (None: the same as a batch)
        self.solo_threads = solo_threads if self.solo_engine else None
        self.batch_size = batch_size
        self.timings = Timings()
        self._check_output_width()

    def _solo_engine(self, threads: int | None, solo_threads: int | None) -> Engine | None:
        """A second instance of the chosen variant with more threads, for a lone image: a
        serving worker runs 1 thread so that workers decode in parallel under load, yet a lone
        request should use every core. Only for engines that release the GIL (with Paddle the
        worker's event loop would stall)."""
        more = (solo_threads or 0) > resolve_threads(threads)
        if not more or not ENGINES[self.variant.engine].releases_gil:
            return None
        return create_engine(self.variant, self.artifact, solo_threads)

    def _check_output_width(self) -> None:
        """Fail at load time, not at the first request, when labels and classifier disagree.
        A tiny image through the whole pipeline also warms oneDNN up and imports the resize
        backend (OpenCV: ~50 ms), so the first image's timings are its own."""
        crop = preprocess(np.zeros((8, 8, 3), np.uint8), self.preprocess_config)
        width = self.infer(crop[None]).shape[-1]
        if width != len(self.labels):
            raise InvalidModelError(
                f"{self.artifact.name}: the model outputs {width} classes but has "
                f"{len(self.labels)} labels"
            )

    def takes_every_core(self, images: int) -> bool:
        """Whether a batch of ``images`` runs on the solo engine now: a lone image while no more
        threads are runnable than there are cores (``hardware.cores_free``)."""
        return self.solo_engine is not None and images == 1 and cores_free(self._cores)

    def infer(self, crops: np.ndarray, *, solo: bool | None = None) -> np.ndarray:
        """uint8 NHWC crops → class probabilities (N×C); the batch path the runner uses. ``solo``:
        on the solo engine (default: ``takes_every_core``)."""
        solo = self.takes_every_core(len(crops)) if solo is None else solo
        engine = self.solo_engine if solo else self.engine
        return engine.predict(crops)

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        top_k: int = 1,
        *,
        bgr: bool | None = None,
    ) -> list[Prediction] | list[list[Prediction]]:
        """One image → its top-k list; a list of images → one top-k list per image. ``bgr``:
        the channel order of array images, which an array does not carry, so it must be said:
        True for OpenCV's (``cv2.imread``, what PaddleX's Predictor takes), False for RGB (PIL,
        imageio). A cv2 array read as RGB was answered wrong, and confidently."""
        top_k = checked_top_k(top_k)
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if bgr is None and any(isinstance(image, np.ndarray) for image in batch):
            raise ValueError(
                "say the channel order of array images: bgr=True for OpenCV's (cv2.imread, as "
                "PaddleX takes them), bgr=False for RGB (PIL, imageio)"
            )
        timings = Timings(images=len(batch))
        results: list[list[Prediction]] = []
        for start in range(0, len(batch), self.batch_size):
            t0 = time.perf_counter()
            crops = np.stack(
                [
                    preprocess(img, self.preprocess_config, bgr=bgr)
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


def each_variant(
    model: str | Path | ModelArtifact,
    *,
    threads: int | None = None,
    batch_size: int = 16,
    on_skip: Callable[[Variant, str], None] | None = None,
) -> Iterator[tuple[Variant, Predictor]]:
    """A Predictor for every engine × precision that loads here (engine installed, its file
    present, the CPU able), Paddle fp32 — the reference — first, one at a time, guard not
    applied: for measuring the variants (the guard's figures, the benchmarks)."""
    artifact = load_artifact(model)
    for variant in all_variants():  # the registry lists the reference first
        try:
            predictor = Predictor(
                artifact,
                engine=variant.engine,
                precision=variant.precision,
                threads=threads,
                batch_size=batch_size,
                skip_guard=True,
            )
        except ValueError as err:
            if variant == REFERENCE:  # the reference always runs: its failure is the model's
                raise
            if on_skip:
                on_skip(variant, str(err))
            continue
        yield variant, predictor
