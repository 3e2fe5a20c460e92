"""Export a trained network for inference and save it as a new version in the BentoML store."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import paddle

from lcnet_runner.artifact import (
    DERIVED_FILES,
    ONNX_FILE,
    OPENVINO_FILE,
    load_folder,
    write_checksums,
    write_metadata,
)
from lcnet_runner.preprocess import PreprocessConfig

from .console import progress_to_stderr


class WithSoftmax(paddle.nn.Layer):
    """The exported program ends in softmax, as PaddleClas exports do: PaddleX and every engine
    then read class probabilities straight from the output."""

    def __init__(self, network: paddle.nn.Layer):
        super().__init__()
        self.network = network

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.softmax(self.network(x), axis=-1)


def export_inference(
    model: paddle.nn.Layer,
    out_dir: str | Path,
    *,
    architecture: str,
    labels: list[str],
    preprocess: PreprocessConfig,
    info: dict[str, Any],
) -> Path:
    """Write the Paddle inference program + weights, and the metadata that makes the folder
    self-describing (``paddlex.create_model`` and our Predictor both read it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in DERIVED_FILES:  # a re-export into the same folder (fit --resume, a second fit)
        (out_dir / name).unlink(missing_ok=True)
    was_training = model.training
    model.eval()
    size = preprocess.crop_size
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "x")]
    paddle.jit.save(WithSoftmax(model), str(out_dir / "inference"), input_spec=spec)
    if was_training:
        model.train()
    write_metadata(
        out_dir, architecture=architecture, labels=labels, preprocess=preprocess, info=info
    )
    return out_dir


def export_onnx(folder: str | Path, *, required: bool = False) -> Path | None:
    """Convert the exported Paddle program to ``inference.onnx`` (opset 17: lower opsets split
    Hardswish, which runs ~2× slower in OpenVINO), checked against Paddle on one batch.

    Without paddle2onnx (the ``onnx`` extra) it returns None, or fails when ``required``.
    """
    folder = Path(folder)
    try:
        import paddle2onnx
    except ImportError:
        if required:
            raise ValueError(
                "ONNX export needs the onnx extra: pip install 'lcnet-bento[onnx]'"
            ) from None
        return None
    artifact = load_folder(folder)
    target = folder / ONNX_FILE
    try:
        # optimize_tool="None": the default one pip-installs packages at run time.
        with progress_to_stderr():
            paddle2onnx.export(
                str(artifact.program_file), str(artifact.params_file), save_file=str(target),
                opset_version=17, enable_onnx_checker=True, optimize_tool="None",
            )  # fmt: skip
    except SystemExit:  # paddle2onnx reports failures by exiting
        raise ValueError(f"paddle2onnx could not convert {artifact.program_file}") from None
    return target


def base_info(
    architecture: str | None, labels: list[str], preprocess: PreprocessConfig
) -> dict[str, Any]:
    """The facts every stored model carries (``fit`` and ``import`` add their own)."""
    return {
        "architecture": architecture,
        "task": "image-classification",
        "framework": "paddle",
        "classes": labels,
        "num_classes": len(labels),
        "input_size": preprocess.crop_size,
        "resize_short": preprocess.resize_short,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "paddle_version": paddle.__version__,
    }


def store_labels(info: dict[str, Any]) -> dict[str, str]:
    """The few facts worth filtering ``bentoml models list`` by."""
    keys = ("architecture", "dataset", "framework", "task")
    return {k: str(info[k]) for k in keys if info.get(k) is not None}


def new_tag(name: str) -> str:
    """``name:version``, a version of ``name`` not stored yet: what advice written before the
    folder is stored (the accuracy guard's, kept in its model_info.json) names it by, so that the
    user can paste it; ``save_to_store`` then stores the folder under it."""
    import bentoml

    return str(bentoml.Tag.from_taglike(name).make_new_version())


def save_to_store(folder: str | Path, name: str, info: dict[str, Any]) -> str:
    """Copy an exported folder into the store as a new version of ``name`` (or as the version
    ``name:version`` names, from ``new_tag``); returns the tag.

    BentoML builds the version in a temporary directory and moves it into place only when the
    ``with`` block succeeds, so a failed save never leaves a half-written version behind.
    """
    import bentoml
    from bentoml.exceptions import BentoMLException
    from bentoml.models import ModelContext

    artifact = load_folder(folder)  # refuse to store something we could not serve
    context = ModelContext(
        framework_name="paddle", framework_versions={"paddlepaddle": paddle.__version__}
    )
    metadata = {k: v for k, v in info.items() if v is not None}
    try:
        with bentoml.models.create(
            name,
            labels=store_labels(info),
            metadata=metadata,
            module="lcnet_runner",
            context=context,
        ) as stored:
            shutil.copytree(artifact.path, stored.path, dirs_exist_ok=True)
            write_checksums(Path(stored.path))  # what a reload checks before loading
    except BentoMLException as err:
        raise ValueError(f"cannot save model {name!r} to the BentoML store: {err}") from None
    return str(stored.tag)


def export_openvino(folder: str | Path) -> Path:
    """Convert ``inference.onnx`` (made first if missing) to OpenVINO IR, ``inference.xml/.bin``.

    ``ov.convert_model`` folds batch norms and the depthwise weights into constants (reading the
    ONNX directly keeps them as a computed subgraph): the engine loads it without converting,
    and NNCF can quantize the depthwise convolutions of this graph.
    """
    folder = Path(folder)
    onnx = folder / ONNX_FILE
    if not onnx.is_file():
        export_onnx(folder, required=True)
    try:
        import openvino as ov
    except ImportError:
        raise ValueError(
            "OpenVINO export needs the openvino extra: pip install 'lcnet-bento[openvino]'"
        ) from None
    target = folder / OPENVINO_FILE
    ov.save_model(ov.convert_model(str(onnx)), str(target), compress_to_fp16=False)
    return target


EXPORT_FORMATS = {"onnx": partial(export_onnx, required=True), "openvino": export_openvino}


def revise(model: str | Path, change: Callable[[Path], object]) -> str:
    """Apply ``change`` to a model's folder. An exported folder changes in place; a store
    version is immutable, so it is copied, changed and stored as a new version of the same name
    (metadata from the changed model_info.json). Returns the folder or the new tag."""
    if Path(model).is_dir():
        change(Path(model))
        return str(model)
    from lcnet_runner.artifact import load_artifact

    artifact = load_artifact(model)
    with tempfile.TemporaryDirectory(prefix="lcnet-revise-") as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(artifact.path, folder)
        change(folder)
        return save_to_store(folder, str(artifact.tag).split(":")[0], load_folder(folder).info)


def add_format(model: str | Path, fmt: str) -> str:
    """``python -m train export MODEL --format onnx|openvino``; returns the folder or new tag."""
    return revise(model, EXPORT_FORMATS[fmt])
