"""`python -m train import`: PaddleClas checkpoints and exported folders become store versions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import bentoml
import numpy as np
import pytest
import yaml
from conftest import CLASS_NAMES, PADDLE_FP32, run_cli

from lcnet_runner import Predictor
from lcnet_runner.artifact import InvalidModelError, load_folder
from train.split import read_split


def _probs(model: str | Path, trained: dict) -> np.ndarray:
    paths = [path for path, _ in read_split(trained["dataset"], "test")]
    predictor = Predictor(model, threads=1, **PADDLE_FP32)
    return np.stack([[p["score"] for p in r] for r in predictor.predict(paths, top_k=3)])


def import_checkpoint(trained: dict, name: str, labels: Path) -> str:
    """The trained run's best checkpoint stored as ``name`` with ``labels``; its tag."""
    result = run_cli(
        "train", "import", str(trained["save_dir"] / "best.pdparams"), "--name", name,
        "--model", "PPLCNet_x0_25", "--labels", str(labels), "--input-size", "32",
        "--resize-short", "36",
    )  # fmt: skip
    return result.stdout.strip().split()[-1]


def test_import_checkpoint_reproduces_the_model(trained: dict) -> None:
    tag = import_checkpoint(trained, "imported-ckpt", trained["dataset"] / "labels.txt")
    assert tag.startswith("imported-ckpt:")
    np.testing.assert_allclose(
        _probs(tag, trained), _probs(trained["export_dir"], trained), atol=1e-5
    )


def test_paddleclas_label_files_lose_their_indices(trained: dict, tmp_path: Path) -> None:
    """PaddleClas's class_id_map_file puts each class's index first ("0 tench, Tinca tinca")."""
    labels = tmp_path / "class_id_map.txt"
    labels.write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASS_NAMES)))
    tag = import_checkpoint(trained, "paddleclas", labels)
    assert Predictor(tag, threads=1).labels == tuple(CLASS_NAMES)


def test_the_python_api_takes_the_class_names_themselves(trained: dict) -> None:
    """``train.import_model(..., labels=[...])`` (the README's call) raised a TypeError."""
    import train

    tag = train.import_model(trained["export_dir"], name="listed", labels=["sky", "grass", "fire"])
    assert Predictor(tag, threads=1).labels == ("sky", "grass", "fire")
    with pytest.raises(ValueError, match="^labels: each class needs its own name"):
        train.import_model(trained["export_dir"], name="listed", labels=["a", "a", "b"])


def test_import_paddleclas_style_folder(trained: dict, tmp_path: Path) -> None:
    """A PaddleClas export: no labels.txt or model_info.json, labels only in inference.yml."""
    folder = tmp_path / "paddleclas_export"
    shutil.copytree(trained["export_dir"], folder)
    (folder / "labels.txt").unlink()
    (folder / "model_info.json").unlink()
    config = yaml.safe_load((folder / "inference.yml").read_text(encoding="utf-8"))
    config["PreProcess"]["transform_ops"][0] = {"ResizeImage": {"resize_short": 36}}
    (folder / "inference.yml").write_text(yaml.safe_dump(config, allow_unicode=True), "utf-8")

    result = run_cli("train", "import", str(folder), "--name", "imported-folder")
    tag = result.stdout.strip().split()[-1]
    predictor = Predictor(tag)
    assert predictor.labels == tuple(CLASS_NAMES)
    assert predictor.artifact.info["architecture"] == "PPLCNet_x0_25"
    np.testing.assert_allclose(
        _probs(tag, trained), _probs(trained["export_dir"], trained), atol=1e-5
    )


def test_import_folder_with_new_labels_renames_them_everywhere(
    trained: dict, tmp_path: Path
) -> None:
    """--labels reaches inference.yml (what PaddleX reads) and model_info.json (the store's
    metadata) too, not only labels.txt; a count other than the model's outputs is refused."""
    renamed = ["sky", "grass", "fire"]
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name}\n" for name in renamed), encoding="utf-8")
    source = str(trained["export_dir"])
    result = run_cli("train", "import", source, "--name", "relabelled", "--labels", str(labels))
    stored = bentoml.models.get(result.stdout.strip().split()[-1])
    folder = Path(stored.path)
    config = yaml.safe_load((folder / "inference.yml").read_text(encoding="utf-8"))
    assert config["PostProcess"]["Topk"]["label_list"] == renamed
    info = json.loads((folder / "model_info.json").read_text(encoding="utf-8"))
    assert (info["classes"], info["num_classes"]) == (renamed, 3)
    assert stored.info.metadata["classes"] == renamed
    assert Predictor(folder).labels == tuple(renamed)

    labels.write_text("a\nb\nc\nd\n", encoding="utf-8")
    result = run_cli("train", "import", source, "--labels", str(labels), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --labels: 4 names, but the model has 3 classes"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{ckpt}"], "needs --model"),
        (["{ckpt}", "--model", "PPLCNet_x1_0", "--labels", "{labels}"], "does not match the model"),
        (["/no/such/dir"], "/no/such/dir: no such model folder or .pdparams file"),
        (["{labels}"], "expected an exported model folder or a .pdparams file"),  # a file
        # the class count of the checkpoint, not its parameter names (3 classes here)
        (["{ckpt}", "--model", "PPLCNet_x0_25", "--labels", "{two}"], "classifies 3 classes, "),
        (["{ckpt}", "--model", "PPLCNet_x0_25", "--labels", "{twice}"], "named twice: 'a'"),
    ],
)
def test_import_errors_are_one_line(
    trained: dict, args: list[str], message: str, tmp_path: Path
) -> None:
    values = {
        "ckpt": trained["save_dir"] / "best.pdparams",
        "labels": trained["dataset"] / "labels.txt",
        "two": tmp_path / "two.txt",
        "twice": tmp_path / "twice.txt",
    }
    values["two"].write_text("a\n\nb\n")  # a blank line: 2 names
    values["twice"].write_text("a\nb\na\n")
    result = run_cli("train", "import", *[a.format(**values) for a in args], check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


# Folders from other tools or hand edits: each file that is not what it should be is named in a
# one-line error, never a traceback. (file, its new text, what the error says)
BROKEN_FILES = {
    "yml not YAML": ("inference.yml", "PreProcess: [unclosed", "is not valid YAML"),
    "yml a list": ("inference.yml", "- PreProcess\n", "expected a mapping, got list"),
    "section a string": ("inference.yml", "PreProcess: resize\n", "PreProcess must be a mapping"),
    "op a string": (
        "inference.yml",
        "PreProcess:\n  transform_ops: [ResizeImage]\n",
        "each transform op",
    ),
    "size a word": (
        "inference.yml",
        "PreProcess:\n  transform_ops:\n  - ResizeImage: {resize_short: big}\n",
        "invalid literal for int()",
    ),
    "std zero": (
        "inference.yml",
        "PreProcess:\n  transform_ops:\n  - ResizeImage: {resize_short: 36}\n"
        "  - CropImage: {size: 32}\n  - NormalizeImage: {std: [0, 0, 0]}\n",
        "std must be positive",
    ),
    "sizes past any model": (  # stored, then 447 GiB asked at warm-up
        "inference.yml",
        "PreProcess:\n  transform_ops:\n  - ResizeImage: {resize_short: 200000}\n"
        "  - CropImage: {size: 100000}\n",
        "resize_short <= 4096",
    ),
    "info not JSON": ("model_info.json", "{", "is not valid JSON"),
    "info a list": ("model_info.json", "[]", "expected a JSON object, got list"),
}


@pytest.mark.parametrize("name", list(BROKEN_FILES))
def test_a_broken_folder_file_is_one_error_line(trained: dict, tmp_path: Path, name: str) -> None:
    file, text, message = BROKEN_FILES[name]
    folder = tmp_path / "broken"
    shutil.copytree(trained["export_dir"], folder)
    (folder / file).write_text(text, "utf-8")
    with pytest.raises(InvalidModelError, match=re.escape(message)):
        load_folder(folder)


def test_labels_that_are_no_names_are_refused_at_once(trained: dict, tmp_path: Path) -> None:
    """1 KB of nested YAML aliases is a label list of 10^9 entries: turning them into names
    hung `import`, `report` and a server's start."""
    folder = tmp_path / "laughs"
    shutil.copytree(trained["export_dir"], folder)
    (folder / "labels.txt").unlink()
    levels = "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    yml = (folder / "inference.yml").read_text(encoding="utf-8")
    (folder / "inference.yml").write_text(
        yml + "bomb:\n  a0: &a0 [x]\n" + levels + "PostProcess:\n  Topk:\n    label_list: [*a8]\n",
        encoding="utf-8",
    )
    with pytest.raises(InvalidModelError, match="label_list must be a list of class names"):
        load_folder(folder)


def test_empty_sections_of_inference_yml_are_empty(trained: dict, tmp_path: Path) -> None:
    """`PostProcess:` with nothing under it is null in YAML: an empty section, not a crash, in
    the Predictor and in import (which writes the labels there); a broken file is one CLI line."""
    folder = tmp_path / "no_postprocess"
    shutil.copytree(trained["export_dir"], folder)
    config = yaml.safe_load((folder / "inference.yml").read_text(encoding="utf-8"))
    config.update(PostProcess=None, Global=None)
    (folder / "inference.yml").write_text(yaml.safe_dump(config), "utf-8")
    assert load_folder(folder).labels == tuple(CLASS_NAMES)

    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name}-x\n" for name in CLASS_NAMES), "utf-8")
    result = run_cli("train", "import", str(folder), "--name", "imported-null",
                     "--labels", str(labels))  # fmt: skip
    assert Predictor(result.stdout.strip().split()[-1]).labels == tuple(
        f"{n}-x" for n in CLASS_NAMES
    )

    (folder / "inference.yml").write_text("PreProcess: [unclosed", "utf-8")
    result = run_cli("train", "import", str(folder), "--name", "imported-broken", check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {folder / 'inference.yml'} is not valid YAML: ")
