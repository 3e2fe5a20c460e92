"""Prometheus metrics of the runner, exported on BentoML's ``/metrics`` (all workers merged)."""

from __future__ import annotations

from .batching import BatchStats

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class PrometheusObserver:
    """Batch sizes the runner formed, and per-stage latency: decode, queue wait, inference."""

    def __init__(self, max_batch_size: int):
        import bentoml  # its metrics work across BentoML's worker processes

        self.batch_size = bentoml.metrics.Histogram(
            name="lcnet_runner_batch_size",
            documentation="Images per batch formed by the runner's adaptive batcher",
            buckets=tuple(float(2**i) for i in range(max_batch_size.bit_length() + 1)),
        )
        self.stage_seconds = bentoml.metrics.Histogram(
            name="lcnet_runner_stage_seconds",
            documentation="Seconds per image (decode, queue_wait) or per batch (inference)",
            labelnames=["stage"],
            buckets=_LATENCY_BUCKETS,
        )

    def decoded(self, seconds: float) -> None:
        self.stage_seconds.labels(stage="decode").observe(seconds)

    def batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        wait = self.stage_seconds.labels(stage="queue_wait")
        for seconds in stats.queue_wait_s:
            wait.observe(seconds)
        self.stage_seconds.labels(stage="inference").observe(stats.run_s)


class ReloadCounter:
    def __init__(self) -> None:
        import bentoml

        self.reloads = bentoml.metrics.Counter(
            name="lcnet_model_reloads",
            documentation="Model version reloads by result: ok (swapped) or failed (old kept)",
            labelnames=["result"],
        )

    def count(self, result: str) -> None:
        self.reloads.labels(result=result).inc()
