"""Inference engines: small classes behind one protocol, chosen by name.

An engine takes a float32 NCHW batch and returns what the program outputs: class probabilities
(exports end in softmax, as PaddleClas' do). It never decodes or preprocesses.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .artifact import ModelArtifact


class Engine(Protocol):
    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...  # float32 NCHW → N×classes


def default_threads() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _import_paddle_inference():
    """``paddle.inference``, without Paddle's signal handlers.

    Importing Paddle replaces the SIGTERM handler with one that aborts the process on the spot
    ("FatalError: Termination signal is detected"), which kills a server's graceful shutdown and
    every request in flight. Keep whatever handlers the host (uvicorn, BentoML) had installed.
    """
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    import paddle
    from paddle import inference

    paddle.disable_signal_handler()
    for sig, handler in kept.items():
        if handler is not None:
            signal.signal(sig, handler)
    return inference


class PaddleEngine:
    """Paddle Inference on CPU with oneDNN (MKLDNN), the engine PP-LCNet was designed for."""

    name = "paddle"

    def __init__(self, artifact: ModelArtifact, threads: int | None = None):
        inference = _import_paddle_inference()
        config = inference.Config(str(artifact.program_file), str(artifact.params_file))
        config.disable_gpu()
        config.enable_mkldnn()
        # Paddle otherwise picks its own thread count; oversubscribed cores are the most
        # common CPU serving slowdown, so the caller decides.
        config.set_cpu_math_library_num_threads(threads or default_threads())
        config.disable_glog_info()
        self._predictor = inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self._input.reshape(batch.shape)
        self._input.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self._predictor.run()
        return self._output.copy_to_cpu()


ENGINES: dict[str, Callable[[ModelArtifact, int | None], Engine]] = {"paddle": PaddleEngine}


def create_engine(name: str, artifact: ModelArtifact, threads: int | None = None) -> Engine:
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}") from None
    return factory(artifact, threads)
