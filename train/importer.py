"""``import``: bring a PaddleClas checkpoint or a PaddleX/PaddleClas exported folder into the store.

Security: a ``.pdparams`` file is a pickle — importing one runs code from it. Import only files
from a source you trust.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcnet_runner.artifact import (
    INFERENCE_YML,
    LABELS_FILE,
    ModelArtifact,
    ModelNotFoundError,
    load_folder,
    read_inference_yml,
    read_labels_file,
    write_info,
    write_labels_file,
    write_text_atomic,
    yml_section,
)
from lcnet_runner.preprocess import PreprocessConfig, default_resize_short

from .config import SCALES
from .export import base_info, export_inference, export_onnx, save_to_store
from .model import build_model
from .pretrained import load_weights, read_state_dict


def read_label_names(labels: str | Path | Sequence[str]) -> list[str]:
    """``--labels``: a file of one class name a line, in class-index order (or, from Python, the
    names themselves). PaddleClas's own label files (``class_id_map_file``: ``0 tench, Tinca
    tinca``) put each class's index first; when every line starts with its own index, 0, 1,
    2…, the indices are dropped, or every answer would name ``0 tench``. Names must differ:
    two classes of one name cannot be told apart."""
    from_file = isinstance(labels, (str, Path))
    names = list(read_labels_file(Path(labels))) if from_file else [str(n) for n in labels]
    numbered = [line.partition(" ") for line in names]
    if all(index == str(i) and name for i, (index, _, name) in enumerate(numbered)):
        names = [name for _, _, name in numbered]
    if twice := sorted(name for name, count in Counter(names).items() if count > 1):
        shown = ", ".join(repr(name) for name in twice[:3])
        where = f"--labels {labels}" if from_file else "labels"
        raise ValueError(f"{where}: each class needs its own name; named twice: {shown}")
    return names


def _classes_of(state: dict) -> int | None:
    """The class count of a PP-LCNet checkpoint's classifier (None if it has none)."""
    bias = state.get("fc.bias")
    return None if bias is None else int(bias.shape[0])


def _architecture_from_yml(folder: Path) -> str | None:
    global_section = yml_section(read_inference_yml(folder), "Global")
    name = str(global_section.get("model_name") or "").replace("PP-LCNet", "PPLCNet")
    return name or None


def relabel(folder: Path, labels: list[str]) -> None:
    """``--labels`` for an exported folder: the names go everywhere the folder records them
    (labels.txt, inference.yml's label_list, model_info.json), so PaddleX and our Predictor read
    the same ones; refused unless there is one name per output of the network."""
    import yaml

    write_labels_file(folder / LABELS_FILE, labels)  # first: a folder may have had none
    outputs = output_width(load_folder(folder))
    if outputs != len(labels):
        raise ValueError(f"--labels: {len(labels)} names, but the model has {outputs} classes")
    config = read_inference_yml(folder)
    topk = yml_section(config, "PostProcess", "Topk")
    topk = {
        **topk,
        "label_list": list(labels),
        "topk": min(int(topk.get("topk") or 5), len(labels)),
    }
    config["PostProcess"] = {**yml_section(config, "PostProcess"), "Topk": topk}
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    write_text_atomic(folder / INFERENCE_YML, text)
    info = load_folder(folder).info
    if info:
        write_info(folder, {**info, "classes": list(labels), "num_classes": len(labels)})


def output_width(artifact: ModelArtifact) -> int:
    """How many classes the network scores: one blank crop through Paddle."""
    from lcnet_runner.engines import PaddleEngine

    size = artifact.preprocess.crop_size
    engine = PaddleEngine(artifact, threads=1, precision="fp32")
    return engine.predict(np.zeros((1, size, size, 3), np.uint8)).shape[-1]


def _copy_folder(
    source: Path, folder: Path, model: str | None, label_list: list[str] | None
) -> dict[str, Any]:
    """An exported folder copied to ``folder`` (relabelled, with a model_info.json); its info."""
    shutil.copytree(source, folder)
    try:
        if label_list:
            relabel(folder, label_list)
        artifact = load_folder(folder)
        architecture = model or _architecture_from_yml(folder)
    except ModelNotFoundError as err:  # a file the user can fix: name theirs, not our copy
        raise type(err)(str(err).replace(str(folder), str(source))) from None
    info = artifact.info or {
        **base_info(architecture, list(artifact.labels), artifact.preprocess),
        "imported_from": source.name,
    }
    write_info(folder, info)
    return info


def import_model(
    source: str | Path,
    *,
    name: str = "pplcnet",
    model: str | None = None,
    labels: str | Path | Sequence[str] | None = None,
    input_size: int = 224,
    resize_short: int = 0,  # 0: input_size × 256/224
) -> str:
    """Store ``source`` as a new version of ``name``; returns the tag.

    ``source`` is an exported folder (labels from ``labels.txt``, ``inference.yml`` or ``labels``)
    or a ``.pdparams`` checkpoint, which needs ``model`` (e.g. ``PPLCNet_x1_0``) and ``labels``:
    a labels file's path, or the class names in class-index order.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, "no such model folder or .pdparams file", str(source))
    label_list = read_label_names(labels) if labels else None
    with tempfile.TemporaryDirectory(prefix="lcnet-import-") as tmp:
        folder = Path(tmp) / "model"
        if source.is_dir():
            info = _copy_folder(source, folder, model, label_list)
        elif source.suffix == ".pdparams" and source.is_file():
            if model not in SCALES or not label_list:
                raise ValueError(
                    "importing a .pdparams checkpoint needs --model (one of "
                    f"{', '.join(SCALES)}) and --labels FILE"
                )
            state = read_state_dict(source)  # a pickle: read once
            classes = _classes_of(state)
            if classes is not None and classes != len(label_list):
                raise ValueError(
                    f"{source} classifies {classes} classes, --labels {labels} names "
                    f"{len(label_list)}"
                )
            network = build_model(model, num_classes=len(label_list))
            load_weights(network, source, strict=True, state=state)
            preprocess = PreprocessConfig(
                crop_size=input_size, resize_short=resize_short or default_resize_short(input_size)
            )
            info = {**base_info(model, label_list, preprocess), "imported_from": source.name}
            export_inference(
                network,
                folder,
                architecture=model,
                labels=label_list,
                preprocess=preprocess,
                info=info,
            )
        else:
            raise ValueError(f"{source}: expected an exported model folder or a .pdparams file")
        export_onnx(folder)
        return save_to_store(folder, name, info)
