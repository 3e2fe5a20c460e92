"""Prometheus metrics of the runner, exported on BentoML's ``/metrics`` (all workers merged).

Each metric exists once per process, labelled by ``model``: Prometheus refuses a second metric of
the same name, so every runner of a process (two models in one service, the runner a reload
swaps in) reports to the same ones under its own label.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batching import BatchStats

if TYPE_CHECKING:
    from .runner import LCNetRunner

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1 … 256 images
STAGES = ("decode", "queue_wait", "inference")


@functools.cache
def _metric(kind: str, name: str, documentation: str, **spec: Any) -> Any:
    # Imported once a worker runs, not with this module: BentoML sets the folder where its
    # workers' metrics meet (PROMETHEUS_MULTIPROC_DIR) as a worker starts, after importing the
    # service, and prometheus_client reads it at import (what bentoml.metrics, deprecated in
    # BentoML 1.4.40 for prometheus_client itself, deferred too).
    import prometheus_client

    return getattr(prometheus_client, kind)(name=name, documentation=documentation, **spec)


def _held_gauge(unit: str, what: str, bound: str):
    """``lcnet_runner_held_<unit>``: what the workers hold and have not answered yet, summed
    over the live ones (a runner adds to it as it takes in and answers)."""
    return _metric(
        "Gauge", f"lcnet_runner_held_{unit}",
        f"{what} and not yet answered, all workers: a worker refuses requests (503) while it "
        f"holds {bound}",
        labelnames=("model",), multiprocess_mode="livesum",
    )  # fmt: skip


class PrometheusObserver:
    """Batch sizes the runner formed, per-stage latency (decode, queue wait, inference), and the
    images and request bytes the runners hold (not yet answered), summed over the live
    workers."""

    def __init__(self, model: str):
        batch_size = _metric(
            "Histogram", "lcnet_runner_batch_size",
            "Images per batch formed by the runner's adaptive batcher",
            labelnames=("model",), buckets=_BATCH_BUCKETS,
        )  # fmt: skip
        stage_seconds = _metric(
            "Histogram", "lcnet_runner_stage_seconds",
            "Seconds per image (decode, queue_wait) or per batch (inference)",
            labelnames=("model", "stage"), buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self._batch_size = batch_size.labels(model=model)
        self._stage = {stage: stage_seconds.labels(model=model, stage=stage) for stage in STAGES}
        self._held_images = _held_gauge(
            "images", "Images admitted (decoding, queued, in a batch)", "LCNET_MAX_QUEUED_IMAGES"
        ).labels(model=model)
        self._held_bytes = _held_gauge(
            "bytes", "Bytes of the requests taken in (bodies read or being read)",
            "LCNET_MAX_HELD_BYTES",
        ).labels(model=model)  # fmt: skip

    # Added to, never set: several runners may report to one observer.
    def held(self, change: int) -> None:
        self._held_images.inc(change)

    def held_bytes(self, change: int) -> None:
        self._held_bytes.inc(change)

    def decoded(self, seconds: float) -> None:
        self._stage["decode"].observe(seconds)

    def batch(self, stats: BatchStats) -> None:
        self._batch_size.observe(stats.size)
        for seconds in stats.queue_wait_s:
            self._stage["queue_wait"].observe(seconds)
        self._stage["inference"].observe(stats.run_s)


class ReloadCounter:
    """Model version reloads of one served model, by result."""

    def __init__(self, model: str) -> None:
        self._reloads = _metric(
            "Counter", "lcnet_model_reloads",
            "Model version reloads by result: ok (swapped), failed (old kept) or interrupted "
            "(the worker stopped while it loaded)",
            labelnames=("model", "result"),
        ).labels  # fmt: skip
        self._model = model

    def count(self, result: str) -> None:
        self._reloads(model=self._model, result=result).inc()


class ServedVersions:
    """How many workers serve each version of one model, and on which variant: a reload's
    rollout as it goes, where each worker's ``/model`` speaks for itself alone. Each worker sets
    1 for what it serves, 0 for what it served; ``/metrics`` sums the live workers."""

    def __init__(self, model: str) -> None:
        self._workers = _metric(
            "Gauge", "lcnet_model_served_workers",
            "Workers serving each model version, and on which engine variant",
            labelnames=("model", "version", "variant"), multiprocess_mode="livesum",
        ).labels  # fmt: skip
        self._model = model
        forget_dead_workers()

    def serving(self, runner: LCNetRunner, serving: bool) -> None:
        version = runner.tag.rpartition(":")[2]
        variant = str(runner.predictor.variant)
        self._workers(model=self._model, version=version, variant=variant).set(int(serving))


def forget_dead_workers() -> None:
    """Drop the live-gauge files of workers that are gone. A worker that exits marks its own
    (BentoML does, as it stops); one killed (OOM, SIGKILL) cannot, and its last values would
    be summed for as long as the server runs. The worker started in its place clears them."""
    import prometheus_client.multiprocess
    import psutil

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for file in Path(folder).glob("gauge_live*_*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            prometheus_client.multiprocess.mark_process_dead(int(pid), folder)


class GrpcCallMetrics:
    """gRPC calls by method and status code, and their seconds by method: BentoML's own request
    metrics (``bentoml_service_request_*``) count HTTP alone."""

    def __init__(self) -> None:
        self._calls = _metric(
            "Counter", "lcnet_grpc_requests",
            "gRPC calls by method (Classify, ClassifyBatch, ModelInfo, Reload) and status code",
            labelnames=("method", "code"),
        ).labels  # fmt: skip
        self._seconds = _metric(
            "Histogram", "lcnet_grpc_request_duration_seconds", "Seconds per gRPC call, by method",
            labelnames=("method",), buckets=_LATENCY_BUCKETS,
        ).labels  # fmt: skip

    def record(self, method: str, code: str, seconds: float) -> None:
        self._calls(method=method, code=code).inc()
        self._seconds(method=method).observe(seconds)
