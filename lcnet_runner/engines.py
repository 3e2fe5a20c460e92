"""Inference engines: small classes behind one protocol, chosen by name.

An engine takes uint8 NHWC crops, as preprocessing leaves them, and returns what the program
outputs: class probabilities (exports end in softmax, as PaddleClas' do). It never decodes or
crops. Normalizing (mean/std, to float NCHW) is its own first step, so an engine that can fuse it
into its graph does: OpenVINO (measured on x1.0 INT8, AMD EPYC AVX2, 1 thread: ~10 % less time
per batch of 16 than numpy's normalize in front of it; docs/benchmarks.md). Paddle and ONNX
Runtime use ``preprocess.normalize``.

- ``paddle``: Paddle Inference with oneDNN, fp32 — the reference.
- ``onnxruntime``: the stored ``inference.onnx``, fp32 (extra ``onnx``).
- ``openvino``: fp32 or bf16 from the stored ``inference.xml`` (OpenVINO IR) or else
  ``inference.onnx``; int8 from ``inference_int8.xml`` (``python -m train quantize``). Extra
  ``openvino``; bf16 needs a CPU with avx512_bf16 or AMX. OpenVINO picks bf16 by itself on such
  CPUs, so the precision is always set explicitly.
Unlike Paddle, ONNX Runtime and OpenVINO release the GIL while they run.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from .artifact import INT8_FILE, ONNX_FILE, OPENVINO_FILE, ModelArtifact
from .hardware import cpu_supports_bf16, isa_cap, resolve_threads
from .preprocess import PreprocessConfig, normalize

AUTO = "auto"  # any engine / any precision: the Predictor chooses (lcnet_runner.choice)
# The dataset in advice to run a train command: unknown here; train's commands, given one, put it
# in its place (train.guard.guard_figures).
DATASET_ARGUMENT = "--dataset DIR"


@dataclass(frozen=True)
class Variant:
    """One way to run a model: an engine at a precision."""

    engine: str
    precision: str

    def __str__(self) -> str:
        return f"{self.engine}/{self.precision}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        engine, _, precision = text.partition("/")
        return cls(engine, precision)


REFERENCE = Variant("paddle", "fp32")  # what every other variant is measured against


class Engine(Protocol):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]  # what it can run, the one place that says so
    releases_gil: ClassVar[bool]  # while it runs: other threads (decoding, HTTP) go on

    def __init__(self, artifact: ModelArtifact, threads: int, precision: str): ...

    def predict(self, crops: np.ndarray) -> np.ndarray: ...  # uint8 NHWC → N×classes


def cpu_lacks(variant: Variant) -> str | None:
    """Why this CPU cannot run ``variant`` at all (checked before anything is loaded)."""
    if variant.precision == "bf16" and not cpu_supports_bf16():
        if cap := isa_cap():
            return f"bf16 needs avx512_bf16 or AMX, and ONEDNN_MAX_CPU_ISA={cap} turns them off"
        return "bf16 needs a CPU with avx512_bf16 or AMX; this one has neither"
    return None


def cannot_run(variant: Variant, artifact: ModelArtifact) -> str | None:
    """Why ``variant`` cannot run ``artifact`` here, found without loading anything: this CPU,
    or a file the model lacks (an INT8 variant never made). None: ``create_engine`` goes on."""
    try:
        if variant.engine == "onnxruntime":
            _onnx_file(artifact)
        elif variant.engine == "openvino":
            _openvino_file(artifact, variant.precision)
    except ValueError as err:
        return str(err)
    return cpu_lacks(variant)


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(
            f"this engine needs the {extra} extra: pip install 'lcnet-bento[{extra}]'"
        ) from None


def _onnx_file(artifact: ModelArtifact) -> Path:
    path = artifact.path / ONNX_FILE
    if not path.is_file():
        raise ValueError(
            f"{artifact.name} has no {ONNX_FILE}; convert it once with `python -m train export "
            f"{artifact.as_argument} --format onnx` (needs the onnx extra)"
        )
    return path


def _openvino_file(artifact: ModelArtifact, precision: str) -> Path:
    if precision == "int8":
        if not (artifact.path / INT8_FILE).is_file():
            raise ValueError(
                f"{artifact.name} has no INT8 variant; make one with `python -m train quantize "
                f"{artifact.as_argument} {DATASET_ARGUMENT}` (needs the int8 extra)"
            )
        return artifact.path / INT8_FILE
    ir = artifact.path / OPENVINO_FILE
    return ir if ir.is_file() else _onnx_file(artifact)


def _import_paddle_inference():
    """``paddle.inference``, without Paddle's signal handlers.

    Importing Paddle replaces the SIGTERM handler with one that aborts the process on the spot
    ("FatalError: Termination signal is detected"), and ``disable_signal_handler`` then resets it
    to the default action, which kills the process just as fast: either way a server's graceful
    shutdown and every request in flight are lost. So the host's (uvicorn's, BentoML's) handlers
    are put back: at the C level, which works from any thread (a hot reload loads its engine in a
    worker thread, where ``signal.signal`` is refused), and on the main thread also Python's own,
    in case Paddle was imported earlier and its handler is the one that was saved. One thread
    at a time (a process-wide lock for process-wide state): two engines loading at once would
    each save what the other had just disabled.
    """
    with _SIGNALS_LOCK:
        saved = {sig: _c_sigaction(sig) for sig in HOST_SIGNALS}
        kept = {sig: signal.getsignal(sig) for sig in HOST_SIGNALS}
        import paddle
        from paddle import inference

        paddle.disable_signal_handler()
        for sig, action in saved.items():
            _c_sigaction(sig, action)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in kept.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return inference


HOST_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SIGNALS_LOCK = threading.Lock()


def _c_sigaction(sig: int, action: bytes | None = None) -> bytes:
    """The process's C-level action for ``sig`` (set to ``action`` first if given), as the
    opaque bytes of libc's ``struct sigaction``; process-wide, so any thread may call it."""
    libc = ctypes.CDLL(None, use_errno=True)
    old = ctypes.create_string_buffer(256)  # larger than struct sigaction on every libc
    new = ctypes.create_string_buffer(action, 256) if action is not None else None
    if libc.sigaction(sig, new, old) != 0:
        raise OSError(ctypes.get_errno(), f"sigaction({sig}) failed")
    return old.raw


class PaddleEngine:
    """Paddle Inference on CPU with oneDNN (MKLDNN), the engine PP-LCNet was designed for."""

    name = "paddle"
    precisions = ("fp32",)
    releases_gil = False

    def __init__(self, artifact: ModelArtifact, threads: int, precision: str):
        inference = _import_paddle_inference()
        config = inference.Config(str(artifact.program_file), str(artifact.params_file))
        config.disable_gpu()
        config.enable_mkldnn()
        # Paddle otherwise picks its own thread count; oversubscribed cores are the most
        # common CPU serving slowdown, so the caller decides.
        config.set_cpu_math_library_num_threads(threads)
        config.disable_glog_info()
        self._preprocess = artifact.preprocess
        self._predictor = inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def predict(self, crops: np.ndarray) -> np.ndarray:
        batch = normalize(crops, self._preprocess)
        self._input.reshape(batch.shape)
        self._input.copy_from_cpu(batch)
        self._predictor.run()
        return self._output.copy_to_cpu()


class OnnxRuntimeEngine:
    name = "onnxruntime"
    precisions = ("fp32",)
    releases_gil = True

    def __init__(self, artifact: ModelArtifact, threads: int, precision: str):
        ort = _require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: paddle2onnx graphs trigger harmless warnings
        # Spinning threads burn ~2× the CPU per image and run slower when workers share cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(_onnx_file(artifact)), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._preprocess = artifact.preprocess

    def predict(self, crops: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: normalize(crops, self._preprocess)})[0]


class OpenVinoEngine:
    name = "openvino"
    precisions = ("fp32", "bf16", "int8")
    releases_gil = True

    def __init__(self, artifact: ModelArtifact, threads: int, precision: str):
        ov = _require("openvino", "openvino")
        core = ov.Core()
        config = {
            # int8: the quantized convolutions run int8 whatever the hint; the rest stays f32.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            # OpenVINO pins its threads to cores as if it had the machine to itself, and every
            # process picks the same ones: both serving workers' 1-thread engines ran on core 0
            # while core 1 idled 10 % of the time (docs/benchmarks.md). The OS places them.
            "ENABLE_CPU_PINNING": False,
        }
        model = core.read_model(str(_openvino_file(artifact, precision)))
        model = _taking_crops(ov, model, artifact.preprocess)
        self._request = core.compile_model(model, "CPU", config).create_infer_request()

    def predict(self, crops: np.ndarray) -> np.ndarray:
        self._request.infer({0: np.ascontiguousarray(crops)})
        return self._request.get_output_tensor(0).data.copy()


def _taking_crops(ov, model, preprocess: PreprocessConfig):
    """``model`` (float NCHW input) behind OpenVINO's own preprocessing steps, so it takes
    uint8 NHWC crops: (x - 255·mean) / (255·std) = (x/255 - mean) / std, fused with the graph's
    first operations instead of a pass over the batch in numpy."""
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    steps.input().model().set_layout(ov.Layout("NCHW"))
    steps.input().preprocess().convert_element_type(ov.Type.f32).mean(
        [255 * m for m in preprocess.mean]
    ).scale([255 * s for s in preprocess.std])
    return steps.build()


# The registry: every engine, reference first. What runs where is derived from it.
ENGINES: dict[str, type[Engine]] = {
    engine.name: engine for engine in (PaddleEngine, OnnxRuntimeEngine, OpenVinoEngine)
}


def all_variants() -> list[Variant]:
    """Every engine × precision the registry knows, the reference first."""
    return [Variant(name, p) for name, engine in ENGINES.items() for p in engine.precisions]


def matching_variants(engine: str = AUTO, precision: str = AUTO) -> list[Variant]:
    """The variants a request names (``auto`` matches any); unknown or impossible names raise
    ValueError saying what exists."""
    if engine not in (AUTO, *ENGINES):
        raise ValueError(f"unknown engine {engine!r}; choose one of: {AUTO}, {', '.join(ENGINES)}")
    precisions = list(dict.fromkeys(v.precision for v in all_variants()))
    if precision not in (AUTO, *precisions):
        raise ValueError(
            f"unknown precision {precision!r}; choose one of: {AUTO}, {', '.join(precisions)}"
        )
    found = [
        v for v in all_variants()
        if engine in (AUTO, v.engine) and precision in (AUTO, v.precision)
    ]  # fmt: skip
    if not found:
        elsewhere = [v.engine for v in all_variants() if v.precision == precision]
        raise ValueError(
            f"the {engine} engine runs {'/'.join(ENGINES[engine].precisions)} only; "
            f"{precision} runs on {', '.join(elsewhere)}"
        )
    return found


def create_engine(variant: Variant, artifact: ModelArtifact, threads: int | None = None) -> Engine:
    """``variant``'s engine for ``artifact`` on ``threads`` (None or 0: every core this process
    may use). ValueError, in one line, for a variant this CPU or this model cannot run."""
    (checked,) = matching_variants(variant.engine, variant.precision)
    if reason := cpu_lacks(checked):
        raise ValueError(reason)
    try:
        return ENGINES[checked.engine](artifact, resolve_threads(threads), checked.precision)
    except ValueError:
        raise
    # A file the engine refuses (ONNX Runtime's InvalidProtobuf, OpenVINO's RuntimeError): the
    # one-line error of a variant that cannot serve, not a traceback.
    except Exception as err:
        raise ValueError(f"{checked} cannot load {artifact.name}: {error_text(err)}") from None


def error_text(err: Exception) -> str:
    """Why an engine failed, on one line: our own errors (ValueError) say it in words; an
    engine's exception also needs its type to be understood. OpenVINO's messages span several
    lines (its C++ call sites), and these end up in one-line CLI errors and logs."""
    text = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())
