"""`python -m train fit` for real on generated data: accuracy, files, store entry, resume."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import paddle
import pytest
from conftest import CLASS_NAMES, COLOUR_CLASSES, ROOT, TINY_EPOCHS, run_cli, tiny_fit
from PIL import Image

import train.training
from lcnet_runner.artifact import load_folder
from train import distributed
from train.data import decode_split
from train.plots import _drawable, confusion_matrix, plot_confusion_matrix
from train.pretrained import PretrainedError
from train.report import report
from train.split import (
    _readable_name,
    read_labels,
    read_split,
    split_list,
    split_record,
    trained_on,
)
from train.training import (
    FitConfig,
    changed_settings,
    check_same_run,
    config_of,
    end_of_epoch,
    initial_state,
    learning_rate,
    load_splits,
    pick_best,
    prepare,
    schedule_note,
)


def test_fit_reaches_a_real_accuracy_bar(trained: dict) -> None:
    # Chance is 0.33; the split holds 36 val and 18 test images.
    assert trained["val_top1"] >= 0.85
    assert trained["test_top1"] >= 0.85
    assert trained["architecture"] == "PPLCNet_x0_25"
    assert trained["epochs"] == TINY_EPOCHS


def test_stdout_holds_only_the_result(trained: dict) -> None:
    """`fit ... | jq` works: progress, and paddle2onnx's from C++ too, goes to stderr."""
    assert trained["stdout"].splitlines()[:-1] == [f"saved {trained['tag']} to the BentoML store"]
    assert "[Paddle2ONNX]" in trained["stderr"]


def test_fit_writes_checkpoints_history_plots_and_export(trained: dict) -> None:
    save_dir: Path = trained["save_dir"]
    for name in ("last.pdckpt", "best.pdparams", "history.json"):
        assert (save_dir / name).is_file(), name
    # the split it trained on, which a --resume checks
    assert paddle.load(str(save_dir / "last.pdckpt"))["split"] == split_record(trained["dataset"])
    stored = Path(bentoml.models.get(trained["tag"]).path)
    for folder in (save_dir, stored):  # the plots travel with the model version
        for name, min_width in (("curves.png", 900), ("confusion_matrix.png", 400)):
            with Image.open(folder / name) as png:
                assert png.format == "PNG" and png.width >= min_width, (folder, name)
    assert (stored / "history.json").is_file()
    history = json.loads((save_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, TINY_EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    export = save_dir / "inference"
    for name in ("inference.json", "inference.pdiparams", "inference.yml", "labels.txt"):
        assert (export / name).is_file(), name
    # Written exactly: one name a line, edge spaces and U+2028 kept.
    labels_txt = (export / "labels.txt").read_text(encoding="utf-8")
    assert labels_txt == "".join(f"{name}\n" for name in CLASS_NAMES)


def test_fit_saves_a_store_version_with_labels_and_metadata(trained: dict) -> None:
    model = bentoml.models.get(trained["tag"])
    assert model.info.labels["architecture"] == "PPLCNet_x0_25"
    assert model.info.labels["dataset"] == "colours"
    meta = model.info.metadata
    assert meta["classes"] == sorted(COLOUR_CLASSES)
    assert (meta["input_size"], meta["resize_short"]) == (32, 36)
    assert meta["val_top1"] == trained["val_top1"] and meta["test_top1"] == trained["test_top1"]
    assert meta["epochs"] == TINY_EPOCHS and meta["paddle_version"] and meta["training_time_s"] > 0
    assert meta["mean"] == [0.485, 0.456, 0.406]
    assert (Path(model.path) / "inference.pdiparams").is_file()


def test_resume_continues_from_the_last_checkpoint(trained: dict, tmp_path: Path) -> None:
    save_dir = tmp_path / "resumed"
    shutil.copytree(trained["save_dir"], save_dir)
    (save_dir / "inference" / "left_by_an_earlier_run.npz").write_bytes(b"stale")
    more = TINY_EPOCHS + 1
    args = [*tiny_fit(epochs=more), "--save-dir", str(save_dir), "--resume"]
    trained_for = paddle.load(str(save_dir / "last.pdckpt"))["training_s"]
    result = run_cli("train", "fit", str(trained["dataset"]), *args)
    assert f"resuming from epoch {TINY_EPOCHS}" in result.stderr
    assert f"epoch {more}/{more}" in result.stderr and f"epoch 1/{more}" not in result.stderr
    history = json.loads((save_dir / "history.json").read_text())
    assert len(history) == more
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["training_time_s"] > trained_for  # the first run's time, and this one's
    assert summary["tag"] != trained["tag"]  # a new store version, the old one untouched
    assert bentoml.models.get(trained["tag"]).info.metadata["epochs"] == TINY_EPOCHS
    stored = Path(bentoml.models.get(summary["tag"]).path)
    assert not (stored / "left_by_an_earlier_run.npz").exists()  # a fresh export folder


def test_a_diverging_run_stops_and_stores_nothing(colour_dataset: Path, tmp_path: Path) -> None:
    """lr 100 from scratch: the loss turns NaN or infinite in the first epoch; no model with NaN
    weights may reach the store."""
    before = {str(model.tag) for model in bentoml.models.list()}
    args = [*tiny_fit(epochs=3), "--lr", "100", "--save-dir", str(tmp_path), "--name", "diverged"]
    result = run_cli("train", "fit", str(colour_dataset), *args, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged (loss ") and last.endswith("try a lower --lr")
    assert {str(model.tag) for model in bentoml.models.list()} == before


def test_early_stop_ends_the_run_after_patience_epochs(
    colour_dataset: Path, tmp_path: Path
) -> None:
    """At lr 1e-9 the weights barely move (batch-norm statistics still do): the run ends
    ``patience`` epochs after its best val top-1, long before 30."""
    args = [*tiny_fit(epochs=30), "--lr", "1e-9", "--early-stop-patience", "2",
            "--save-dir", str(tmp_path), "--name", "stopped"]  # fmt: skip
    result = run_cli("train", "fit", str(colour_dataset), *args)
    assert "early stop: no better val top-1 for 2 epochs" in result.stderr
    scores = [row["val_top1"] for row in json.loads((tmp_path / "history.json").read_text())]
    best = scores.index(max(scores))  # the first epoch that reached it
    assert len(scores) == best + 1 + 2 < 30
    assert json.loads(result.stdout.strip().splitlines()[-1])["epochs"] == len(scores)


def test_resume_without_checkpoint_is_a_clear_error(colour_dataset: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train", "fit", str(colour_dataset), *tiny_fit(), "--save-dir", str(tmp_path), "--resume",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resume: no checkpoint")


@pytest.mark.parametrize(
    ("labels", "model", "match"),
    [
        (["a", "b", "c"], "PPLCNet_x0_25", r"other classes \(new: 'c'\)"),
        (["a", "B"], "PPLCNet_x0_25", r"other classes \(new: 'B'; gone: 'b'\)"),
        (["b", "a"], "PPLCNet_x0_25", "the same names in another order"),
        (["a", "b"], "PPLCNet_x0_35", "is a PPLCNet_x0_25 checkpoint, not PPLCNet_x0_35"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(
    tmp_path: Path, labels: list[str], model: str, match: str
) -> None:
    """Renamed, added or reordered classes would resume with a wrong class mapping, another
    architecture with a Paddle traceback: one line saying what differs and what to do."""
    first = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(tmp_path))
    state = initial_state(first, ["a", "b"], None)
    paddle.save(state.checkpoint(["a", "b"], first), str(tmp_path / "last.pdckpt"))
    again = dataclasses.replace(first, model=model, resume=True)
    checkpoint = paddle.load(str(tmp_path / "last.pdckpt"))
    with pytest.raises(ValueError, match=match) as raised:
        check_same_run(checkpoint, labels, again, tmp_path / "last.pdckpt")
    assert "another --save-dir" in str(raised.value) and "\n" not in str(raised.value)
    check_same_run(checkpoint, ["a", "b"], first, tmp_path / "last.pdckpt")


def test_a_resume_says_what_was_changed_not_what_followed() -> None:
    """A higher --epochs is how a finished run trains on: the decay epochs derived from it follow
    and are not a change of the user's (nor with a cosine schedule, which has none)."""
    saved = dataclasses.asdict(FitConfig(epochs=3))  # decay derived: (1, 2)
    assert changed_settings(saved, FitConfig(epochs=4)) == "--epochs 4 (that run: 3)"
    named = FitConfig(epochs=4, lr_decay_epochs=(3,))
    assert changed_settings(saved, named) == (
        "--epochs 4 (that run: 3), --lr-decay-epochs 3 (that run: 1,2)"
    )
    cosine = dataclasses.asdict(FitConfig(epochs=3, schedule="cosine"))
    resumed = FitConfig(epochs=4, schedule="cosine", lr_decay_epochs=(3,))
    assert changed_settings(cosine, resumed) == "--epochs 4 (that run: 3)"
    assert changed_settings({}, FitConfig()) == ""  # an older checkpoint: nothing to compare


def _fit_config(save_dir: Path, *args: str) -> FitConfig:
    """The FitConfig `fit data --save-dir SAVE_DIR ARGS` runs with."""
    from train.cli import build_parser, fit_config

    return fit_config(build_parser().parse_args(["fit", "data", "--save-dir", str(save_dir),
                                                 *args]))  # fmt: skip


def _save_run(save_dir: Path, **settings: Any) -> dict[str, Any]:
    """The settings of a run of ``settings`` whose checkpoint is now in ``save_dir``."""
    run = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(save_dir), **settings)
    paddle.save(initial_state(run, ["a", "b"], None).checkpoint(["a", "b"], run),
                str(save_dir / "last.pdckpt"))  # fmt: skip
    return dataclasses.asdict(run)


def test_a_resume_keeps_that_runs_preprocessing_unless_told(tmp_path: Path) -> None:
    """--input-size, --resize-short and --resize-backend shape the decoded pixels and the served
    model: left out on --resume, they are that run's (the defaults re-decoded every split and
    stored a model serving at 256/cv2 that trained at 72/pil); given, a change is said."""

    def config(*args: str) -> FitConfig:
        return _fit_config(tmp_path, "--resume", *args)

    def saved_run(**settings: Any) -> dict[str, Any]:
        return _save_run(tmp_path, **settings)

    saved = saved_run(input_size=64, resize_short=72, resize_backend="pil")
    kept = config()
    assert (kept.input_size, kept.resize_short, kept.resize_backend) == (64, 72, "pil")
    assert changed_settings(saved, kept) == ""
    told = config("--resize-short", "80", "--resize-backend", "cv2")
    assert changed_settings(saved, told) == (
        "--resize-short 80 (that run: 72), --resize-backend cv2 (that run: pil)"
    )
    saved = saved_run(input_size=64)  # resize-short derived: 73
    larger = config("--input-size", "96")  # derived again, not kept: 110
    assert (larger.resize_short, changed_settings(saved, larger)) == (
        110, "--input-size 96 (that run: 64)"
    )  # fmt: skip
    saved_run(input_size=64, resize_short=72)  # a kept resize-short the new size outgrows
    with pytest.raises(ValueError, match=r"^--input-size 96 is larger than --resize-short 72, .*"
                       r"give --resize-short 110 \(or any >= 96\)$"):  # fmt: skip
        config("--input-size", "96")
    fresh = _fit_config(tmp_path)
    assert (fresh.input_size, fresh.resize_short, fresh.resize_backend) == (224, 256, "cv2")
    # the Python API alike: train.fit(dataset, resume=True, ...) keeps what its keywords leave out
    saved_run(input_size=64, resize_short=72, resize_backend="pil")
    api = config_of({"save_dir": str(tmp_path), "resume": True, "epochs": 4})
    assert (api.input_size, api.resize_short, api.resize_backend, api.epochs) == (64, 72, "pil", 4)


def test_a_resume_of_a_run_from_before_the_resize_backend_goes_on_with_its_own(
    tmp_path: Path, capsys
) -> None:
    """A checkpoint whose settings record no resize backend is of an older release: its resume
    took today's default, trained on its pixels and stored a model serving with them, unsaid.
    Before ram_cache_mb was recorded that release resized with PIL, from then on with OpenCV."""
    _save_run(tmp_path, input_size=64)
    checkpoint = paddle.load(str(tmp_path / "last.pdckpt"))
    del checkpoint["config"]["resize_backend"]
    paddle.save(checkpoint, str(tmp_path / "last.pdckpt"))
    assert _fit_config(tmp_path, "--resume").resize_backend == "cv2"  # it records ram_cache_mb
    del checkpoint["config"]["ram_cache_mb"]
    paddle.save(checkpoint, str(tmp_path / "last.pdckpt"))
    assert _fit_config(tmp_path, "--resume").resize_backend == "pil"
    initial_state(_fit_config(tmp_path, "--resume", "--resize-backend", "cv2"), ["a", "b"], None)
    said = capsys.readouterr().err
    assert (
        "resuming with other settings than that run: --resize-backend cv2 (that run: pil)" in said
    )
    assert "that run's resize backend is not recorded (an older release's)" in said


def test_a_resume_keeps_that_runs_decay_epochs_unless_told(tmp_path: Path, capsys) -> None:
    """The same command resumes the same schedule: decay epochs an older release defaulted to
    (4, 6, 8 whatever --epochs) or that run named stay, and are said, rather than those --epochs
    derives today (the resumed run stayed at lr 0.1 where the run it continues had decayed);
    those that run derived follow a new --epochs; given, a change is said."""
    saved = _save_run(tmp_path, epochs=200, lr_decay_epochs=(4, 6, 8))
    same = _fit_config(tmp_path, "--epochs", "200", "--resume")
    assert (same.lr_decay_epochs, changed_settings(saved, same)) == ((4, 6, 8), "")
    initial_state(same, ["a", "b"], None)
    assert ("keeping that run's learning-rate decay at epochs 4,6,8 (--epochs 200 alone derives "
            "80,120,160; --lr-decay-epochs sets others)") in capsys.readouterr().err  # fmt: skip
    longer = _fit_config(tmp_path, "--epochs", "300", "--resume")
    assert (longer.lr_decay_epochs, changed_settings(saved, longer)) == (
        (4, 6, 8), "--epochs 300 (that run: 200)"
    )  # fmt: skip
    told = _fit_config(tmp_path, "--epochs", "200", "--lr-decay-epochs", "80,120,160", "--resume")
    assert (changed_settings(saved, told), schedule_note(saved, told)) == (
        "--lr-decay-epochs 80,120,160 (that run: 4,6,8)", ""
    )  # fmt: skip
    saved = _save_run(tmp_path, epochs=3)  # decay derived: (1, 2)
    again = _fit_config(tmp_path, "--epochs", "6", "--resume")  # derived again: (2, 4, 5)
    assert again.lr_decay_epochs == (2, 4, 5)
    assert schedule_note(saved, again) == (  # its epoch 4 trains at 10× its epoch 3's rate
        "learning-rate decay follows --epochs 6: at epochs 2,4,5 (that run: 1,2; "
        "--lr-decay-epochs 1,2 keeps that run's)"
    )
    same = _fit_config(tmp_path, "--epochs", "3", "--resume")
    assert schedule_note(saved, same) == ""
    api = config_of({"save_dir": str(tmp_path), "resume": True})  # the default 10 epochs
    assert api.lr_decay_epochs == (4, 6, 8)


def test_what_resume_and_pretrained_refuse_is_said_before_anything_is_decoded(
    colour_dataset: Path, tmp_path: Path, capsys
) -> None:
    """prepare() runs before the splits are decoded (minutes, for a large dataset): a checkpoint
    of another run, one that does not read, or weights that are no checkpoint fail there. A
    resume with other training settings says which."""
    first = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(tmp_path))
    labels = read_labels(colour_dataset)
    paddle.save(initial_state(first, labels, None).checkpoint(labels, first),
                str(tmp_path / "last.pdckpt"))  # fmt: skip
    with pytest.raises(ValueError, match="is a PPLCNet_x0_25 checkpoint, not PPLCNet_x0_35"):
        prepare(colour_dataset, dataclasses.replace(first, model="PPLCNet_x0_35", resume=True))
    again = dataclasses.replace(first, resume=True, epochs=3, lr=0.5)
    prepare(colour_dataset, again)
    initial_state(again, labels, None)
    assert ("resuming with other settings than that run: --epochs 3 (that run: 10), "
            "--lr 0.5 (that run: 0.01)") in capsys.readouterr().err  # fmt: skip
    with pytest.raises(PretrainedError, match="cannot read weights from"):
        prepare(colour_dataset, FitConfig(pretrained=str(colour_dataset / "labels.txt"),
                                          save_dir=str(tmp_path / "new")))  # fmt: skip
    (tmp_path / "last.pdckpt").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="--resume: cannot read"):
        prepare(colour_dataset, dataclasses.replace(first, resume=True))
    weights = initial_state(first, labels, None).model.state_dict()  # best.pdparams copied over
    paddle.save(weights, str(tmp_path / "last.pdckpt"))
    with pytest.raises(ValueError, match="is not a checkpoint fit wrote"):
        prepare(colour_dataset, dataclasses.replace(first, resume=True))


def test_a_resume_refuses_val_or_test_images_that_run_trained_on(
    colour_dataset: Path, tmp_path: Path, capsys
) -> None:
    """A `split --reshuffle` between a run and its resume moved trained images into val/test:
    their scores would flatter the model. Refused before anything is decoded; other changes of
    the lists are said; an older checkpoint, which records no split, still resumes."""
    data = tmp_path / "colours"
    shutil.copytree(colour_dataset, data)
    save_dir = tmp_path / "run"
    first = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(save_dir))
    labels = read_labels(data)
    state = initial_state(first, labels, None)
    state.split = split_record(data)
    checkpoint = state.checkpoint(labels, first)
    paddle.save(checkpoint, str(save_dir / "last.pdckpt"))
    resume = dataclasses.replace(first, resume=True)
    train_lines, val_lines, test_lines = (
        split_list(data, name).read_text(encoding="utf-8").splitlines(keepends=True)
        for name in ("train", "val", "test")
    )

    split_list(data, "val").write_text("".join(val_lines[1:]), encoding="utf-8")
    prepare(data, resume)
    said = capsys.readouterr().err
    assert ("resuming on split lists changed since that run (val: 0 added, 1 removed): its "
            "earlier epochs were trained and scored on the old ones") in said  # fmt: skip

    moved = train_lines[0]
    split_list(data, "train").write_text("".join(train_lines[1:]), encoding="utf-8")
    split_list(data, "test").write_text("".join([*test_lines, moved]), encoding="utf-8")
    args = ["--model", "PPLCNet_x0_25", "--pretrained", "none", "--save-dir", str(save_dir)]
    result = run_cli("train", "fit", str(data), *args, "--resume", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume: 1 val or test image of {data} trained in the run of "
        f"{save_dir / 'last.pdckpt'}: {_readable_name(moved.rpartition(' ')[0])}; its scores "
        "would flatter it. Restore that run's split lists, or leave out --resume to start over"
    )

    # The same move over two resumes: out of train in the first, into val in the next. Each
    # resumed run records what the runs before it trained on, not only its own train list.
    split_list(data, "test").write_text("".join(test_lines), encoding="utf-8")
    after_the_first = split_record(data, earlier=checkpoint["split"])
    assert trained_on(after_the_first, data) == []
    split_list(data, "val").write_text("".join([*val_lines, moved]), encoding="utf-8")
    assert trained_on(after_the_first, data) == [_readable_name(moved.rpartition(" ")[0])]
    assert trained_on(split_record(data), data) == []  # its own train list alone: not seen

    del checkpoint["split"]  # as the previous release wrote it
    paddle.save(checkpoint, str(save_dir / "last.pdckpt"))
    prepare(data, resume)
    assert (
        "records no split (an older release's checkpoint): whether the val and test images "
        "stayed out of that run's training could not be checked" in capsys.readouterr().err
    )


def _weights(state) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in state.model.state_dict().items()}


def test_a_kill_between_the_checkpoint_and_best_weights_keeps_them_together(
    tmp_path: Path, monkeypatch
) -> None:
    """Each epoch that improves writes last.pdckpt and best.pdparams: a run killed between the
    two must still store the weights of the epoch its metrics name (it stored another epoch's,
    scoring what no epoch in its history scored)."""
    config = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(tmp_path))
    labels, stats = ["a", "b"], {"loss": 1.0, "top1": 0.5, "images_per_s": 1.0}
    state = initial_state(config, labels, None)
    end_of_epoch(state, 0, stats, None, labels, config)  # no val split: every epoch improves
    first = _weights(state)
    for param in state.model.parameters():  # what the second epoch's training changes
        param.set_value(param + 1.0)
    second = _weights(state)
    saved = []

    def killed_after_one_file(obj, path: Path) -> None:
        if saved:
            raise KeyboardInterrupt
        saved.append(path.name)
        paddle.save(obj, str(path))

    monkeypatch.setattr(train.training, "save_atomic", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        end_of_epoch(state, 1, stats, None, labels, config)
    monkeypatch.undo()

    resumed = initial_state(dataclasses.replace(config, resume=True), labels, None)
    pick_best(resumed, {}, labels, config)
    expected = second if resumed.best_epoch == 1 else first
    assert all(np.array_equal(w, expected[name]) for name, w in _weights(resumed).items())
    best_file = paddle.load(str(tmp_path / "best.pdparams"))
    assert all(np.array_equal(best_file[name].numpy(), w) for name, w in expected.items())


def test_a_checkpoint_of_the_previous_release_resumes(tmp_path: Path) -> None:
    """Its "best" holds no weights: the best epoch's come from best.pdparams, as they did."""
    config = FitConfig(model="PPLCNet_x0_25", pretrained="none", save_dir=str(tmp_path))
    labels, stats = ["a", "b"], {"loss": 1.0, "top1": 0.5, "images_per_s": 1.0}
    state = initial_state(config, labels, None)
    end_of_epoch(state, 0, stats, None, labels, config)
    best = _weights(state)
    for param in state.model.parameters():  # a later epoch that did not improve
        param.set_value(param + 1.0)
    old = state.checkpoint(labels, config)
    del old["best"]["weights"]
    paddle.save(old, str(tmp_path / "last.pdckpt"))
    resumed = initial_state(dataclasses.replace(config, resume=True), labels, None)
    pick_best(resumed, {}, labels, config)
    assert all(np.array_equal(w, best[name]) for name, w in _weights(resumed).items())


def _trained_weights(dataset: Path, config: FitConfig) -> dict[str, np.ndarray]:
    """fit_prepared's training alone (no export, no store), in this process: with the layer names
    a new process gives (the optimizer's saved state is keyed by them)."""
    paddle.seed(config.seed)
    paddle.base.core.set_num_threads(1)
    labels, splits = load_splits(dataset, config, distributed.SINGLE)
    with paddle.utils.unique_name.guard():
        state = initial_state(config, labels, None)
        train.training.train(state, splits, labels, config, distributed.SINGLE)
    return _weights(state)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    colour_dataset: Path, tmp_path: Path
) -> None:
    """2 epochs, then --resume to 3: the same model as 3 epochs at once (the augmentation and
    dropout draws of epoch 3 depend on the epoch, not on where the process started)."""
    config = FitConfig(model="PPLCNet_x0_25", pretrained="none", input_size=32, resize_short=36,
                       batch_size=16, lr_decay_epochs=(1, 2), epochs=3, workers=1,
                       save_dir=str(tmp_path / "whole"))  # fmt: skip
    whole = _trained_weights(colour_dataset, config)
    parts = dataclasses.replace(config, save_dir=str(tmp_path / "parts"))
    _trained_weights(colour_dataset, dataclasses.replace(parts, epochs=2))
    resumed = _trained_weights(colour_dataset, dataclasses.replace(parts, resume=True))
    assert all(np.array_equal(resumed[name], w) for name, w in whole.items())


def test_corrupt_images_are_skipped_and_reported(colour_dataset: Path, tmp_path: Path) -> None:
    samples = read_split(colour_dataset, "train")[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(samples[0][0].read_bytes()[:200])
    decoded = decode_split([*samples, (broken, 0)], FitConfig().preprocess)
    assert len(decoded) == 5 and decoded.skipped == [str(broken)]


def test_a_class_left_without_training_images_stops_the_run(
    colour_dataset: Path, tmp_path: Path
) -> None:
    """A class folder gone since the split: its files are skipped (missing), and the run stops
    instead of storing a model that answers that class at random."""
    dataset = tmp_path / "colours"
    shutil.copytree(colour_dataset, dataset)
    gone = CLASS_NAMES[1]
    shutil.rmtree(dataset / gone)
    args = [*tiny_fit(epochs=1), "--save-dir", str(tmp_path / "run"), "--name", "untrained"]
    result = run_cli("train", "fit", str(dataset), *args, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no training image left for 1 class: {gone}; split the folder again "
        f"(python -m train split {dataset})"
    )
    lines = result.stderr.splitlines()
    skipped = next(line for line in lines if line.startswith("train: skipped "))
    assert "images missing or unreadable" in skipped and skipped.endswith("more")  # 5 shown
    with pytest.raises(bentoml.exceptions.NotFound):  # nothing stored
        bentoml.models.list("untrained")


def test_a_run_says_it_replaces_an_earlier_runs_checkpoint(
    colour_dataset: Path, tmp_path: Path, capsys
) -> None:
    config = FitConfig(save_dir=str(tmp_path), pretrained="none")
    labels = read_labels(colour_dataset)  # an interrupted run's
    paddle.save(initial_state(config, labels, None).checkpoint(labels, config),
                str(tmp_path / "last.pdckpt"))  # fmt: skip
    initial_state(config, labels, None)
    said = capsys.readouterr().err
    assert f"{tmp_path} holds an earlier run's checkpoint, which this run replaces" in said
    initial_state(dataclasses.replace(config, resume=True), labels, None)
    assert "which this run replaces" not in capsys.readouterr().err


def test_the_package_hands_out_its_functions() -> None:
    """The README's Python API: train.fit and train.evaluate are functions, also once their
    modules are imported (a submodule named like a function replaced it on the package)."""
    import train
    import train.evaluation  # noqa: F401  (what any import of them does)

    assert callable(train.fit) and callable(train.evaluate) and callable(train.build_model)
    assert {name for name in train.__all__ if not hasattr(train, name)} == set()


def test_learning_rate_schedules() -> None:
    seed = FitConfig()  # the seed's lr 0.01, decayed ×0.1 at epochs 4, 6, 8
    lrs = [learning_rate(seed, epoch) for epoch in range(10)]
    assert lrs == pytest.approx([0.01] * 4 + [0.001] * 2 + [0.0001] * 2 + [0.00001] * 2)
    cosine = FitConfig(schedule="cosine", epochs=10, warmup_epochs=2, lr=0.1)
    assert learning_rate(cosine, 0.0) < 0.01
    assert learning_rate(cosine, 1.0) == pytest.approx(0.05, rel=0.01)
    assert learning_rate(cosine, 2.0) == pytest.approx(0.1)
    assert learning_rate(cosine, 10.0) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="schedule"):
        FitConfig(schedule="step")


def test_the_resize_backend_is_a_training_choice_saved_with_the_model(trained: dict) -> None:
    assert FitConfig().preprocess.backend == "cv2"  # PaddleX's default
    assert FitConfig(resize_backend="pil").preprocess.backend == "pil"
    with pytest.raises(ValueError, match="backend"):
        FitConfig(resize_backend="skimage").preprocess  # noqa: B018
    assert load_folder(trained["export_dir"]).preprocess.backend == "cv2"


def test_report_answers_what_is_this_model(trained: dict) -> None:
    text = report(trained["tag"])
    for expected in (trained["tag"], "PPLCNet_x0_25", f"3: {', '.join(CLASS_NAMES)}", "colours",
                     f"{100 * trained['test_top1']:.1f} %", "curves.png",
                     "top-1 agreement with paddle fp32: passed"):  # fmt: skip
        assert expected in text, expected


def test_confusion_matrix_counts() -> None:
    counts = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_class_names_no_font_here_draws_become_their_ids(tmp_path: Path) -> None:
    """Chinese class names (PaddleX's users have many) were drawn as boxes, with a warning per
    glyph: a CJK font draws them where one is installed, else the axes show category ids."""
    assert _drawable(["cat", "dog (2)"], ["DejaVu Sans"])
    assert not _drawable(["猫", "dog"], ["DejaVu Sans"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_confusion_matrix(np.eye(2, dtype=int), ["猫", "狗"], tmp_path / "cm.png")
    assert Image.open(path).format == "PNG"
    # the note under the title is wrapped, not cut by the figure's edges (at 8 classes it was)
    path = plot_confusion_matrix(np.eye(8, dtype=int), ["猫"] * 8, tmp_path / "cm8.png")
    top = np.asarray(Image.open(path).convert("L"))[:60]  # the title's rows
    assert top[:, :2].min() > 250 and top[:, -2:].min() > 250  # white at both edges


def versions(name: str) -> list:
    try:
        return bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []


@pytest.mark.slow  # trains (not through the shared fixtures)
def test_odd_and_broken_images_never_stop_training(tmp_path: Path) -> None:
    """Split skips what cannot be read; fit converts odd modes and skips files broken later."""
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    odd = root / "cats"
    base = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    base.convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(odd / "sixteen.png")
    base.convert("L").save(odd / "grey.png")
    base.convert("P").save(odd / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 8
    base.save(odd / "rotated.jpg", exif=exif)
    base.save(odd / "ユニコード 名前.jpg")
    base.save(odd / "really_a_png.jpg", format="PNG")
    base.save(odd / ".hidden.jpg")
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "truncated.jpg").write_bytes((odd / "0.jpg").read_bytes()[:300])
    # readable, but resized to its short side 1×200,000 would be 36×7,200,000 pixels (777 MB)
    Image.new("RGB", (1, 200_000)).save(odd / "sliver.png")

    result = run_cli("train", "split", str(root), "--val-ratio", "0.2", "--test-ratio", "0")
    assert "skipped 2 unreadable images: cats/empty.jpg, cats/truncated.jpg" in result.stdout
    (root / "dogs" / "5.jpg").write_bytes(b"broken after the split")
    result = run_cli(
        "train", "fit", str(root), *tiny_fit(epochs=1), "--save-dir", str(tmp_path / "run"),
        "--name", "odd",
    )  # fmt: skip
    assert "dogs/5.jpg" in result.stderr and "cats/sliver.png" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["tag"].startswith("odd:")


def test_a_killed_run_resumes_and_stores_one_version(colour_dataset: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "killed"
    args = [*tiny_fit(epochs=TINY_EPOCHS), "--save-dir", str(save_dir), "--name", "killed"]
    command = [sys.executable, "-m", "train", "fit", str(colour_dataset), *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (save_dir / "last.pdckpt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.kill()  # SIGKILL mid-run, some epochs done
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -9
    assert versions("killed") == []  # nothing half-written became a version
    done = len(paddle.load(str(save_dir / "last.pdckpt"))["history"])
    assert 1 <= done < TINY_EPOCHS

    result = run_cli("train", "fit", str(colour_dataset), *args, "--resume")
    assert f"resuming from epoch {done}" in result.stderr
    history = json.loads((save_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, TINY_EPOCHS + 1))
    assert len(versions("killed")) == 1
    assert json.loads(result.stdout.splitlines()[-1])["val_top1"] >= 0.85


def test_a_failed_store_write_leaves_no_version(trained: dict, monkeypatch) -> None:
    """BentoML builds a version in a temporary folder: a crash while copying stores nothing."""
    import train.export

    def disk_full(src, dst, **kwargs):
        (Path(dst) / "inference.json").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.export.shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.export.save_to_store(trained["export_dir"], "atomic", {"architecture": "x"})
    assert versions("atomic") == []
    assert bentoml.models.get(trained["tag"]).info.metadata["epochs"] == TINY_EPOCHS


def test_a_val_split_left_with_no_readable_image_is_as_if_absent(
    colour_dataset: Path, tmp_path: Path
) -> None:
    """Files that broke after the split: the run said "need at least one array to concatenate"
    after its first epoch; now it trains as without a val split, and says what it skipped."""
    data = tmp_path / "colours"
    shutil.copytree(colour_dataset, data)
    for path, _ in read_split(data, "val"):
        path.write_bytes(b"broken after the split")
    result = run_cli("train", "fit", str(data), *tiny_fit(epochs=1), "--save-dir",
                     str(tmp_path / "run"), "--name", "no-val")  # fmt: skip
    assert "val: skipped" in result.stderr
    assert "no val images (val_list.txt lists none readable): the last epoch is kept" in (
        result.stderr
    )
    assert "val_top1 —  val_top5 —" in result.stderr  # not Python's None
    assert json.loads(result.stdout.splitlines()[-1])["tag"].startswith("no-val:")


def test_the_guards_advice_after_fit_names_the_stored_version(
    colour_dataset: Path, tmp_path: Path
) -> None:
    """fit without --int8 advised `python -m train quantize RUN/inference --dataset ...`: the
    export folder, which quantize updates in place while the stored version (what predict,
    evaluate and the server load) stays without INT8; the stored guard kept that text too."""
    pytest.importorskip("openvino")  # else the int8 row says the extra is missing
    result = run_cli("train", "fit", str(colour_dataset), *tiny_fit(epochs=1), "--save-dir",
                     str(tmp_path / "run"), "--name", "advised")  # fmt: skip
    tag = json.loads(result.stdout.splitlines()[-1])["tag"]
    advice = (
        f"{tag} has no INT8 variant; make one with `python -m train quantize {tag} --dataset "
        f"{shlex.quote(str(colour_dataset))}` (needs the int8 extra)"
    )
    assert f"openvino/int8      not measured here: {advice}" in result.stderr
    stored = bentoml.models.get(tag).info.metadata["accuracy_guard"]
    assert stored["not_measured"]["openvino/int8"] == advice
