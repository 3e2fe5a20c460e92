"""The runner: one Predictor plus an adaptive batcher, held in-process by each serving worker.

HTTP and gRPC handlers on the worker's event loop call ``aclassify`` / ``aclassify_batch``;
decoding happens in the handler, the uint8 crops queue, and whatever is queued when the engine
is free runs as one batch (a lone image on an idle machine runs right there, on every core).
Measured on 2 cores, keeping the model in the worker that received the request beat a separate
runner process by ~2× (every process hop costs 2–3.5 ms of CPU per request). Works without
BentoML: tests and scripts can drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from bentoml.exceptions import ServiceUnavailable

from .artifact import DEFAULT_MODEL, ModelArtifact
from .batching import AdaptiveBatcher, BatchStats
from .engines import matching_variants
from .hardware import resolve_threads
from .predictor import Prediction, Predictor, checked_top_k, top_k_predictions
from .preprocess import (
    MAX_PIXELS,
    ImageSource,
    ImageTooLargeError,
    InvalidImageError,
    image_size,
    is_small_jpeg,
    preprocess,
)
from .ranges import check_ranges

# A request whose images are more bytes than this in all is large: its memory is given back to
# the system once it is answered (``_giving_back_memory``). Photos of a few MB are not.
LARGE_REQUEST_BYTES = 8 * 1024 * 1024


class RunnerBusyError(ServiceUnavailable):
    """The runner already holds ``max_queued_images`` (or its server's worker the request bytes
    of ``LCNET_MAX_HELD_BYTES``): retry shortly. The server answers it 503 with Retry-After (gRPC
    UNAVAILABLE). BentoML's ServiceUnavailable: in one's own ``@bentoml.api`` BentoML answers it
    503, with its generic message and a logged traceback, so catch it there (README, "Embed the
    runner")."""


class HeldImages:
    """The images admitted and not yet answered (decoding, queued, in a batch) against a bound:
    past it a new request raises RunnerBusyError at once. One runner has its own; a server's
    runners of one worker share one, so that while a reload drains the old version the worker
    still holds at most ``limit`` images in all. ``on_change`` is told each rise and fall (a
    gauge on ``/metrics``; ``on_bytes_change`` of the bytes). Used from one event loop.

    A server also counts the bytes of the requests it takes in (``receiving``), from before
    their bodies are read until they are answered, against ``byte_limit``: 512 images of the
    largest size allowed would be 10 GB, and a burst of 100 uploads of 17 MB, each under the
    image bound, took one worker from 330 MB to 2.0 GB over HTTP and 3.8 GB over gRPC."""

    def __init__(
        self,
        limit: int,
        on_change: Callable[[int], None] | None = None,
        byte_limit: int = 0,
        on_bytes_change: Callable[[int], None] | None = None,
    ):
        self.limit, self.count = limit, 0  # limit 0: no bound
        self.byte_limit, self.bytes = byte_limit, 0  # byte_limit 0: no bound
        self._on_change, self._on_bytes_change = on_change, on_bytes_change

    def refuse_if_busy(self) -> None:
        if self.limit and self.count >= self.limit:
            raise RunnerBusyError(
                f"the server is busy: this worker holds {self.count} image(s) (its limit: "
                f"{self.limit}); retry shortly"
            )
        if self.byte_limit and self.bytes >= self.byte_limit:
            raise RunnerBusyError(
                f"the server is busy: this worker holds {self.bytes} bytes of requests (its "
                f"limit: {self.byte_limit}); retry shortly"
            )

    @contextlib.contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """``count`` images held meanwhile, unless ``refuse_if_busy`` refuses them. A request is
        admitted whole when there is any room: a batch larger than the room left would
        otherwise never pass."""
        self.refuse_if_busy()
        self._change(count)
        try:
            yield
        finally:
            self._change(-count)

    @contextlib.contextmanager
    def receiving(self, size: int) -> Iterator[None]:
        """A request of ``size`` bytes held meanwhile (from before its body is read until it is
        answered), unless ``refuse_if_busy`` refuses it; admitted whole when there is any room,
        as ``holding`` admits images."""
        self.refuse_if_busy()
        self._change_bytes(size)
        try:
            yield
        finally:
            self._change_bytes(-size)

    def _change(self, change: int) -> None:
        self.count += change
        if self._on_change is not None:
            self._on_change(change)

    def _change_bytes(self, change: int) -> None:
        self.bytes += change
        if self._on_bytes_change is not None:
            self._on_bytes_change(change)


def _bytes_in(images: Sequence[ImageSource]) -> int:
    """The bytes of the encoded images among ``images`` (decoded ones hold no upload)."""
    return sum(len(image) for image in images if isinstance(image, bytes))


class RunnerObserver(Protocol):
    """Where the runner reports timings (the service wires Prometheus histograms in)."""

    def decoded(self, seconds: float) -> None: ...

    def batch(self, stats: BatchStats) -> None: ...

    def held(self, change: int) -> None:
        """The images held (admitted, not yet answered) went up or down by ``change``; optional:
        observers written before it have no such method."""


@dataclass(frozen=True)
class RunnerConfig:
    engine: str = "auto"  # auto: the fastest variant that passed the accuracy guard
    precision: str = "auto"
    skip_guard: bool = False  # serve a variant without passing accuracy figures
    threads: int = 1  # engine threads; workers × threads should not exceed the cores
    # A lone image (a batch of one) runs on this many threads: 0 = every core, 1 = as batches.
    # Engines that hold the GIL (Paddle) always run it as batches.
    solo_threads: int = 0
    max_batch_size: int = 16
    # How long a busy event loop may hold back a batch so the requests it is reading join it; 0:
    # never (an idle loop never waits). Measured, x1.0 on 2 cores (docs/benchmarks.md): Paddle,
    # which blocks the loop while it runs, +15 % at 8 clients; OpenVINO INT8 over gRPC, whose
    # requests reach the loop one at a time, batches 2.4 → 5.3 and +7–10 % at 32 clients.
    max_delay_ms: float = 10.0
    max_pixels: int = MAX_PIXELS  # decoded image size limit (decompression bombs)
    # What the images of one request may decode to in all: 64 PNGs just under max_pixels held
    # a worker for a minute (and answered 504); this is ~4 s of decoding.
    max_batch_pixels: int = 4 * MAX_PIXELS
    # A JPEG of up to this many bytes decodes on the event loop that read it: libjpeg-turbo
    # decodes it in time about proportional to its file (at reduced scale, ~13 ms a MB: ~20 ms
    # for a 12 MP phone photo), and photos sent one after another were 9–23 % fewer a second
    # through a thread (docs/benchmarks.md). Every other image decodes on the runner's decode
    # thread, as its time grows with its pixels whatever its file's size (a 4 MP PNG ~60 ms,
    # 40 MP ~1 s), so the worker goes on reading and answering other requests. 0: all there.
    inline_decode_bytes: int = 8 * 1024 * 1024
    # Images the runner holds at once, from a request's admission to its answer (decoding,
    # queued, in a batch); while it holds this many a new request raises RunnerBusyError at once:
    # past a bound, a queue only grows in wait. 0: no bound. The server sets one (settings.py).
    max_queued_images: int = 0

    def __post_init__(self) -> None:
        matching_variants(self.engine, self.precision)  # an unknown name: what exists instead
        check_ranges(self, RUNNER_RANGES)


# What each number may be, both ends included: refused when the config is made, rather than
# in every worker as it starts (BentoML restarts them forever) or as a server that refuses every
# request. Thread counts beyond a C int fail inside the engines.
RUNNER_RANGES = {
    "threads": (0, 1024),
    "solo_threads": (0, 1024),
    "max_batch_size": (1, 1024),
    "max_delay_ms": (0, 60_000),
    "max_pixels": (1, math.inf),
    "max_batch_pixels": (1, math.inf),
    "inline_decode_bytes": (0, math.inf),
    "max_queued_images": (0, math.inf),
}


class LCNetRunner:
    def __init__(
        self,
        model: str | Path | ModelArtifact = DEFAULT_MODEL,
        config: RunnerConfig = RunnerConfig(),
        observer: RunnerObserver | None = None,
        held: HeldImages | None = None,
        stop: threading.Event | None = None,
    ):
        """``stop``: set when the process begins to stop; it ends the engine race's child
        process (``choice.choose``), which would outlive it (a server's reload)."""
        self.config = config
        self.predictor = Predictor(
            model,
            engine=config.engine,
            precision=config.precision,
            threads=config.threads,
            skip_guard=config.skip_guard,
            solo_threads=resolve_threads(config.solo_threads),
            race_in_child=True,  # a serving process keeps only the engine it serves
            stop=stop,
        )
        self.labels = self.predictor.labels
        self.tag = self.predictor.artifact.name  # the version, shown with every answer
        self._observer = observer
        self._batcher: AdaptiveBatcher[np.ndarray, np.ndarray] = AdaptiveBatcher(
            self._infer,
            max_batch_size=config.max_batch_size,
            max_delay_ms=config.max_delay_ms,
            on_batch=observer.batch if observer else None,
            process_here=self._infer_lone_image_here,
            name="lcnet-runner",
        )
        # One thread, so large images decode one at a time per worker, as they did on the
        # event loop: their pixels are most of what a worker's memory holds under hostile load.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="lcnet-decode")
        # Shared when given (a server's worker), so its ``max_queued_images`` is not this one's.
        if held is None:
            held = HeldImages(config.max_queued_images, getattr(observer, "held", None))
        self._held = held
        self._large_in_flight = 0  # requests of over LARGE_REQUEST_BYTES (``_giving_back_memory``)
        self._warm_up()

    @classmethod
    def from_model(
        cls,
        model: str | Path | ModelArtifact = DEFAULT_MODEL,
        *,
        observer: RunnerObserver | None = None,
        **config: Any,
    ) -> LCNetRunner:
        """A runner for a store tag or exported folder, e.g. in one's own ``@bentoml.service``:
        ``LCNetRunner.from_model("pplcnet:latest", engine="auto", threads=1)``; keywords are
        RunnerConfig's fields. Call ``await runner.aclassify(image, top_k)`` from an async API
        method (image: bytes, a path, a PIL image or an RGB array) and ``await runner.close()``
        at shutdown."""
        return cls(model, RunnerConfig(**config), observer)

    def _warm_up(self) -> None:
        """Run every batch size once before serving, in the threads that will run them: engines
        build (and cache) kernels per input shape, so the first batch of each size is slow and
        grows memory, and Paddle keeps that cache per thread. Measured on x1.0: warmed on the
        loading thread, Paddle's batches built a second cache (~300 MiB a worker) in the engine
        thread under load; OpenVINO's and ONNX Runtime's caches are shared between threads."""
        size = self.predictor.preprocess_config.crop_size
        blank = np.zeros((size, size, 3), np.uint8)
        self._batcher.warm_up([blank] * n for n in range(1, self.config.max_batch_size + 1))
        if self.predictor.solo_engine is not None:  # lone images: on the event loop's thread
            self.predictor.infer(blank[None], solo=True)

    def _infer(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        # The engine thread's batches: ``_infer_lone_image_here`` already declined a lone image.
        return list(self.predictor.infer(np.stack(crops), solo=False))

    def _infer_lone_image_here(self, crops: list[np.ndarray]) -> list[np.ndarray] | None:
        """A lone image on every core runs on the event loop's own thread, which just decoded
        it, instead of waking the engine thread: its core is awake and its caches warm. Measured
        at 1 client: p50 ~1 ms lower (docs/benchmarks.md). The loop is blocked meanwhile, but
        only while the machine has no other runnable thread for the cores (else: None, and the
        batch goes to the engine thread)."""
        if not self.predictor.takes_every_core(len(crops)):
            return None
        return list(self.predictor.infer(np.stack(crops), solo=True))

    def decode(self, image: ImageSource) -> np.ndarray:
        """Decode + crop in the caller's thread; raises InvalidImageError for bad input."""
        start = time.perf_counter()
        crop = preprocess(
            image, self.predictor.preprocess_config, max_pixels=self.config.max_pixels
        )
        if self._observer:
            self._observer.decoded(time.perf_counter() - start)
        return crop

    async def _decoded(self, image: ImageSource) -> np.ndarray:
        """``decode`` where it costs least: a JPEG up to ``inline_decode_bytes`` right here, on
        the event loop; anything else on the decode thread (Pillow, libjpeg-turbo and OpenCV let
        go of the GIL), while the loop goes on serving other requests."""
        if is_small_jpeg(image, self.config.inline_decode_bytes):
            return self.decode(image)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, self.decode, image)

    def describe(self) -> dict[str, Any]:
        """What this runner serves and how: the model, its engine and its batching (``/model``
        shows it, with the server's limits and reload state)."""
        artifact, predictor = self.predictor.artifact, self.predictor
        return {
            "tag": artifact.tag,
            "architecture": artifact.info.get("architecture"),
            "labels": list(artifact.labels),
            "input_size": artifact.preprocess.crop_size,
            "preprocess": artifact.preprocess.to_dict(),
            "engine": predictor.variant.engine,
            "precision": predictor.variant.precision,
            "engine_choice": predictor.choice.summary(),
            "threads": self.config.threads,
            "solo_threads": predictor.solo_threads,
            "max_batch_size": self.config.max_batch_size,
            "max_delay_ms": self.config.max_delay_ms,
            "inline_decode_bytes": self.config.inline_decode_bytes,
            "val_top1": artifact.info.get("val_top1"),
            "test_top1": artifact.info.get("test_top1"),
        }

    def _format(self, probs: Sequence[np.ndarray], top_k: int) -> list[list[Prediction]]:
        return top_k_predictions(np.stack(probs), self.labels, top_k)

    async def aclassify(self, image: ImageSource, top_k: int = 1) -> list[Prediction]:
        top_k = checked_top_k(top_k)
        with self._held.holding(1), self._giving_back_memory(_bytes_in([image])):
            probs = await self._batcher(await self._decoded(image))
        return self._format([probs], top_k)[0]

    async def aclassify_batch(
        self, images: Sequence[ImageSource], top_k: int = 1
    ) -> list[list[Prediction]]:
        """All images are decoded first, so one bad image fails the request before any work;
        its error says which image it was."""
        top_k = checked_top_k(top_k)
        if not images:
            return []
        self._check_batch_pixels(images)
        with self._held.holding(len(images)), self._giving_back_memory(_bytes_in(images)):
            crops = []
            for index, image in enumerate(images):
                with _naming(index, len(images)):
                    crops.append(await self._decoded(image))
                # A JPEG's decode holds the worker's event loop: between images, let it read the
                # other connections' requests (64 of them would otherwise stall them, and a
                # SIGTERM meanwhile would drop them as not yet started).
                await asyncio.sleep(0)
            probs = await self._batcher.call_many(crops)
        return self._format(probs, top_k)

    @contextlib.contextmanager
    def receiving(self, size: int) -> Iterator[None]:
        """A server's request of ``size`` bytes held meanwhile, from before it reads the body;
        RunnerBusyError while its HeldImages are at a bound (a worker that is behind would
        otherwise take in every upload, whole, only to refuse it). Large, its memory is given
        back once it is answered or refused: gRPC has received a refused call whole."""
        with self._giving_back_memory(size), self._held.receiving(size):
            yield

    @property
    def held_images(self) -> int:
        """Images admitted and not yet answered (by every runner sharing this one's count)."""
        return self._held.count

    @property
    def held_bytes(self) -> int:
        """Bytes of the requests a server took in and has not answered yet (``receiving``)."""
        return self._held.bytes

    @contextlib.contextmanager
    def _giving_back_memory(self, size: int) -> Iterator[None]:
        """When the last large request in flight (of ``size`` bytes) has been answered, the
        memory its copies took goes back to the system. glibc keeps what is freed: once a block
        of megabytes has been freed it stops mapping such blocks apart, and a burst of 100
        images of 20 MB over gRPC (which copies each three times) left a worker 600 MB larger
        for good, though holding nothing (docs/reliability.md)."""
        large = size > LARGE_REQUEST_BYTES
        self._large_in_flight += large
        try:
            yield
        finally:
            self._large_in_flight -= large
            if large and not self._large_in_flight:
                with contextlib.suppress(RuntimeError):  # closed meanwhile: the process ends
                    self._decoder.submit(release_free_memory)

    def _check_batch_pixels(self, images: Sequence[ImageSource]) -> None:
        """ImageTooLargeError, from the headers alone, when the images would decode to more than
        ``max_batch_pixels`` (a JPEG counts at the reduced scale it decodes at)."""
        short_side, each = self.predictor.preprocess_config.resize_short, self.config.max_pixels
        total = 0
        for index, image in enumerate(images):
            with _naming(index, len(images)):
                total += math.prod(image_size(image, short_side, each))
            if total > self.config.max_batch_pixels:  # the rest need not even be opened
                raise ImageTooLargeError(
                    f"the {len(images)} images decode to more than the limit of "
                    f"{self.config.max_batch_pixels} pixels a request (the first {index + 1}: "
                    f"{total}): send them in smaller batches"
                )

    async def close(self) -> None:
        await self._batcher.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # no glibc (musl, macOS): nothing to call
        return None


def release_free_memory() -> None:
    """Give the memory glibc's malloc holds free back to the system (``malloc_trim``)."""
    if trim := _malloc_trim():
        trim(0)


@contextlib.contextmanager
def _naming(index: int, count: int) -> Iterator[None]:
    """An InvalidImageError raised inside, said of the ``index``-th of ``count`` images: one bad
    image fails a batch, and the caller of 64 could not tell which (its kind, a 400 or a 413,
    stays)."""
    try:
        yield
    except InvalidImageError as err:
        raise type(err)(f"image {index + 1} of {count}: {err}") from None
