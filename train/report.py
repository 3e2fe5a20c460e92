"""``python -m train report MODEL``: what is this model? A readable summary of a stored version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcnet_runner.artifact import INT8_FILE, ONNX_FILE, ModelArtifact, load_artifact
from lcnet_runner.engines import DATASET_ARGUMENT
from lcnet_runner.guard import GUARD_KEY

_SHOWN_CLASSES = 12


def _percent(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f} %"


def engines_line(artifact: ModelArtifact) -> str:
    """Which engine files this version carries."""
    if not (artifact.path / ONNX_FILE).is_file():
        return (f"paddle fp32 only (add inference.onnx: python -m train export "
                f"{artifact.as_argument} --format onnx)")  # fmt: skip
    folder = artifact.path
    int8 = ", openvino int8" if (folder / INT8_FILE).is_file() else ""
    return f"paddle fp32 (reference), onnxruntime fp32, openvino fp32/bf16{int8}"


def guard_line(artifact: ModelArtifact) -> str:
    """Which variants passed the accuracy guard (what ``auto`` may pick)."""
    guard = artifact.info.get(GUARD_KEY)
    if not guard:
        return (f"not measured: auto serves paddle fp32 (python -m train verify "
                f"{artifact.as_argument} {DATASET_ARGUMENT})")  # fmt: skip
    verdicts = {True: [], False: []}
    for name, figures in guard["variants"].items():
        verdicts[figures["passed"]].append(f"{name} {100 * figures['agreement']:.1f} %")
    passed, failed = (", ".join(verdicts[key]) or "none" for key in (True, False))
    return (
        f"on {guard['images']} {guard['split']} images, top-1 agreement with paddle fp32: "
        f"passed {passed}; failed {failed}"
    )


def report(model: str | Path) -> str:
    """Tag, architecture, data, accuracy, training and serving facts of a store tag or folder."""
    artifact = load_artifact(model)
    info, pre = artifact.info, artifact.preprocess
    labels = list(artifact.labels)
    shown = ", ".join(labels[:_SHOWN_CLASSES]) + (" …" if len(labels) > _SHOWN_CLASSES else "")
    created = ""
    if artifact.tag:
        import bentoml

        created = bentoml.models.get(artifact.tag).info.creation_time.strftime("%Y-%m-%d %H:%M")
    rows = [
        ("model", artifact.name),
        ("created", created or None),
        ("folder", str(artifact.path)),
        ("architecture", info.get("architecture")),
        ("classes", f"{len(labels)}: {shown}"),
        ("dataset", info.get("dataset") or info.get("imported_from")),
        ("training images", info.get("train_images")),
        ("input", f"resize short side {pre.resize_short}, center crop {pre.crop_size} px "
                  f"({pre.interpolation}), mean {list(pre.mean)}, std {list(pre.std)}"),
        ("val top-1 / top-5",
         f"{_percent(info.get('val_top1'))} / {_percent(info.get('val_top5'))}"),
        ("test top-1 / top-5",
         f"{_percent(info.get('test_top1'))} / {_percent(info.get('test_top5'))}"),
        ("epochs", info.get("epochs") and f"{info['epochs']} (best {info.get('best_epoch')})"),
        ("pretrained", info.get("pretrained")),
        ("augmentation", info.get("crop_scale") and
         f"crop scale {info['crop_scale']}, flip {'on' if info.get('hflip') else 'off'}"),
        ("training time", info.get("training_time_s") and f"{info['training_time_s']} s"),
        ("paddle", info.get("paddle_version")),
        ("engines", engines_line(artifact)),
        ("accuracy guard", guard_line(artifact)),
        ("plots", ", ".join(p.name for p in sorted(artifact.path.glob("*.png"))) or None),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows if value not in (None, ""))
