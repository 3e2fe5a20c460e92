"""Command-line errors: exit code 2 and exactly one readable line on stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RACE_CHILD, ROOT, child_of, run_cli, seconds_until_ended, slow_race
from PIL import Image


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def two_classes(root: Path, per_class: int = 3) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_split_missing_dir(tmp_path: Path) -> None:
    line = one_error_line(run_cli("train", "split", str(tmp_path / "nope"), check=False))
    assert "not found" in line


def test_split_single_class_and_bad_ratios(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "x.png")
    assert "at least 2 classes" in one_error_line(
        run_cli("train", "split", str(tmp_path), check=False)
    )
    data = two_classes(tmp_path / "two")
    result = run_cli(
        "train", "split", str(data), "--val_value", "0.6", "--test_value", "0.5", check=False
    )
    assert "< 1" in one_error_line(result)


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan", "abc"])
def test_split_ratio_is_a_fraction_named_by_its_flag(tmp_path: Path, ratio: str) -> None:
    """argparse's usage, then its error naming the flag (before: the library's ``val_ratio``)."""
    result = run_cli("train", "split", str(tmp_path), f"--val-ratio={ratio}", check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.endswith(
        f"--val-ratio/--val_value: expected a fraction from 0 to below 1, got '{ratio}'"
    )


def test_split_cli_writes_lists_with_paddlex_aliases(tmp_path: Path) -> None:
    data = two_classes(tmp_path / "two", per_class=10)
    result = run_cli("train", "split", str(data), "--val_value", "0.2", "--test_value", "0.1")
    assert "train 14, val 4, test 2" in result.stdout
    assert (data / "labels.txt").read_text() == "a\nb\n"


def test_split_refuses_names_in_gbk_on_a_strict_utf8_stdout(tmp_path: Path, monkeypatch) -> None:
    """A Windows zip's Chinese class folder, unpacked here (GBK bytes): split said its images
    unreadable and dropped the class, or, on a strict UTF-8 stdout, crashed naming it after
    writing the lists."""
    data = two_classes(tmp_path / "data")
    gbk = os.fsdecode(bytes(data) + b"/" + "红色".encode("gbk"))
    Path(gbk).mkdir()
    Image.new("RGB", (16, 16)).save(Path(gbk) / "0.png")
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")
    line = one_error_line(run_cli("train", "split", str(data), check=False))
    assert line.startswith("error: 1 class folder named in bytes that are not UTF-8")
    assert "'\\xba\\xecɫ'; rename it, or unzip the zip again" in line
    assert "unzip -O GBK, or -O CP936" in line
    assert not (data / "train_list.txt").exists()


def test_split_takes_a_huge_photo_without_pillows_warning(tmp_path: Path) -> None:
    """The dataset is the user's own, as predict's images are: a 196 M-pixel panorama was
    skipped as "unreadable" (past Pillow's refusal at 179 M) and one of 100 M warned of a
    "decompression bomb DOS attack"."""
    data = two_classes(tmp_path / "data")
    Image.new("L", (14_000, 14_000)).save(data / "a" / "pano.jpg", quality=50)  # 2.3 MB
    Image.new("L", (10_000, 10_000)).save(data / "b" / "pano.jpg", quality=50)
    result = run_cli("train", "split", str(data), "--val-ratio", "0", "--test-ratio", "0")
    assert "train 8, val 0, test 0 images" in result.stdout
    assert "unreadable" not in result.stdout and result.stderr == ""


def test_split_and_help_start_without_paddle(tmp_path: Path) -> None:
    """Paddle and matplotlib take ~2.5 s to import: only the commands that train or run a
    model load them."""
    data = two_classes(tmp_path / "two", per_class=4)
    script = (
        "import sys; from train.cli import main\n"
        "for argv in (['split', sys.argv[1]], ['fit', '--help'], ['cache', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "print(sorted({'paddle', 'matplotlib'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(data)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]"


def test_help_says_each_default_once_as_it_is_typed() -> None:
    """fit's --help said the cache options' defaults twice ("(default: )" after the words),
    --crop-scale's as a Python tuple, and "(default: False)" after each flag."""
    text = " ".join(run_cli("train", "fit", "--help").stdout.split())
    assert "(default: $LCNET_CACHE or ~/.cache/lcnet-bento) --ram-cache-mb" in text
    assert "(default 64; 0: every split on disk) --early-stop-patience" in text
    assert "area (default: 0.08,1.0) --hflip" in text
    assert "(default: False)" not in text
    assert "(default: 0.2)" in run_cli("train", "split", "--help").stdout  # the others still


@pytest.mark.parametrize(
    "args, resize_short, decay",
    [
        ([], 256, (4, 6, 8)),  # the seed's: PaddleClas's 256 for 224, decay at 4, 6, 8 of 10
        (["--input-size", "64"], 73, (4, 6, 8)),  # 256 would serve the middle 1/16 of a photo
        (["--input-size", "64", "--resize-short", "72"], 72, (4, 6, 8)),
        (["--epochs", "30"], 256, (12, 18, 24)),  # not 22 epochs at 1/1000
        (["--epochs", "30", "--lr-decay-epochs", "5,9"], 256, (5, 9)),
    ],
)
def test_fit_derives_what_it_is_not_told(args: list[str], resize_short: int, decay) -> None:
    from train.cli import build_parser, fit_config

    config = fit_config(build_parser().parse_args(["fit", "data", *args]))
    assert (config.resize_short, config.lr_decay_epochs) == (resize_short, decay)


@pytest.mark.parametrize(
    "changes, args",
    [
        ({"epochs": 3}, ["--epochs", "3"]),  # the README's example: decay at 4, 6, 8 never came
        ({"epochs": 40}, ["--epochs", "40"]),
        ({"input_size": 64}, ["--input-size", "64"]),
        ({"input_size": 64, "resize_short": 120}, ["--input-size", "64", "--resize-short", "120"]),
        ({"epochs": 30, "lr_decay_epochs": (5, 9)}, ["--epochs", "30", "--lr-decay-epochs", "5,9"]),
    ],
)
def test_the_python_api_derives_what_the_cli_derives(changes: dict, args: list[str]) -> None:
    """``train.fit(dir, **changes)`` changes FitConfig's defaults as the flags do; copying the
    defaults' derived fields kept the decay epochs and resize of 10 epochs at 224 px."""
    from train.cli import build_parser, fit_config
    from train.config import FitConfig

    cli = fit_config(build_parser().parse_args(["fit", "data", *args]))
    api = FitConfig().changed(**changes)
    assert (api.resize_short, api.lr_decay_epochs) == (cli.resize_short, cli.lr_decay_epochs)
    again = api.changed(epochs=50, input_size=96)  # derived from 3 epochs at 64 px: again
    if "lr_decay_epochs" not in changes:
        assert again.lr_decay_epochs == (20, 30, 40)
    if "resize_short" not in changes:
        assert again.resize_short == 110


def test_fit_unknown_model_lists_valid_names(tmp_path: Path) -> None:
    data = two_classes(tmp_path / "two")
    line = one_error_line(run_cli("train", "fit", str(data), "--model", "PPLCNet_x9", check=False))
    assert "PPLCNet_x0_25" in line and "PPLCNet_x2_5" in line


def test_fit_missing_pretrained_file(tmp_path: Path) -> None:
    data = two_classes(tmp_path / "two")
    args = ["--pretrained", str(tmp_path / "missing.pdparams"), "--save-dir", str(tmp_path / "o")]
    line = one_error_line(run_cli("train", "fit", str(data), *args, check=False))
    assert "missing.pdparams" in line and "none" in line


def test_evaluate_unknown_tag(tmp_path: Path) -> None:
    data = two_classes(tmp_path / "two")
    result = run_cli("train", "evaluate", "nope:latest", "--dataset", str(data), check=False)
    assert "not in the BentoML store" in one_error_line(result)


@pytest.mark.parametrize(
    "model_labels, difference",
    [(("a", "b, round"), "class 1 is 'b' in the dataset, 'b, round' in the model (2 and 2"),
     (("b", "a"), "class 0 is 'a' in the dataset, 'b' in the model (2 and 2"),
     (("a", "b", "c"), "class 2 is no class in the dataset, 'c' in the model (2 and 3")],
)  # fmt: skip
def test_a_label_mismatch_names_the_first_difference(
    tmp_path: Path, model_labels: tuple[str, ...], difference: str
) -> None:
    """evaluate, verify and quantize said "(4 classes) differs from ... (4 classes)": nothing of
    which class, when a name or the order differed."""
    from lcnet_runner.preprocess import PreprocessConfig
    from train import split_dataset
    from train.evaluation import decode_labelled_split

    data = two_classes(tmp_path / "two")
    split_dataset(data)
    with pytest.raises(ValueError) as refused:
        decode_labelled_split(data, "val", model_labels, PreprocessConfig())
    assert str(refused.value) == (
        f"the dataset's labels.txt differs from the model's labels: {difference} classes); use "
        "the dataset it was trained for"
    )


def test_evaluate_on_a_split_that_lists_nothing(trained: dict, tmp_path: Path) -> None:
    """A split too small for a test image (--test-ratio 0, or tiny classes): said as such, not
    as images that could not be read."""
    data = tmp_path / "data"
    shutil.copytree(trained["dataset"], data)
    (data / "test_list.txt").write_text("")
    result = run_cli("train", "evaluate", trained["tag"], "--dataset", str(data), check=False)
    assert one_error_line(result) == (
        f"error: the test split of {data} lists no images (split with a larger --test-ratio)"
    )


@pytest.mark.parametrize(
    "name, content, says",
    [("missing.jpg", None, "no such image"), ("text.jpg", b"hello", "not an image format"),
     ("folder", "dir", "a folder with no bmp/jpeg/jpg/png/webp image in it")],
)  # fmt: skip
def test_predict_bad_image(trained: dict, tmp_path: Path, name: str, content, says: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    model = trained["export_dir"]
    result = run_cli("lcnet_runner", "predict", str(path), "--model", model, check=False)
    line = one_error_line(result)
    assert name in line and says in line


def test_ctrl_c_while_predict_races_the_engines_is_one_line(trained: dict, tmp_path: Path) -> None:
    """Ctrl-C during `predict`'s engine race (tens of seconds for a new model) printed a
    traceback through subprocess; now one line and exit code 130, the race's child ended."""
    image = _images(tmp_path / "in", 1)[0]
    command = [sys.executable, "-m", "lcnet_runner", "predict", image, "--model",
               trained["export_dir"]]  # fmt: skip
    env = {**os.environ, **slow_race(tmp_path)}
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as cli:
        race = child_of(cli.pid, RACE_CHILD)
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=30)
    assert (cli.returncode, stderr.splitlines()[-1:]) == (130, ["interrupted"]), stderr
    assert "Traceback" not in stderr, stderr
    assert seconds_until_ended(race.pid, timeout=5) < 5


def test_predict_classifies_the_others_around_a_bad_image(trained: dict, tmp_path: Path) -> None:
    """One broken file in a batch loses nothing but itself: every image gets its line, in order,
    the good ones drawn and timed; the exit code and one line on stderr say what failed."""
    good = _images(tmp_path / "in", 3)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(Path(good[0]).read_bytes()[:60])  # a truncated PNG: its header reads
    images = [good[0], str(bad), good[1], good[2]]
    out = tmp_path / "drawn"
    args = ["--model", trained["export_dir"], "--batch-size", "2", "--annotate", str(out)]
    result = run_cli("lcnet_runner", "predict", *images, *args, check=False)
    assert result.returncode == 2
    written = [f"wrote {out / name}" for name in ("0.jpg", "1.jpg", "2.jpg")]
    *drawn, error = result.stderr.splitlines()
    assert drawn == written and error.startswith(f"error: {bad}: cannot decode image")
    lines = result.stdout.splitlines()
    answers = [json.loads(line) for line in lines[:4]]
    assert [a["image"] for a in answers] == images
    assert "error" in answers[1] and str(bad) in answers[1]["error"]
    assert all(len(a["predictions"]) == 1 for a in answers[:1] + answers[2:])
    assert "img_num: 3," in result.stdout  # the latency block: the three classified


def test_predict_takes_a_folder_of_images(trained: dict, tmp_path: Path) -> None:
    """As PaddleX's predict does: the image files directly inside, by name."""
    images = _images(tmp_path / "in", 2)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "sub").mkdir()
    result = run_cli("lcnet_runner", "predict", str(tmp_path / "in"), "--model",
                     trained["export_dir"])  # fmt: skip
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["image"] for a in answers] == images


def test_predict_classifies_a_huge_image_without_pillows_warning(
    trained: dict, tmp_path: Path
) -> None:
    """The user's own files have no pixel limit; Pillow's "could be decompression bomb DOS
    attack" past 89 M pixels is noise on a CLI's stderr."""
    huge = tmp_path / "scan.png"
    Image.new("1", (9500, 9500)).save(huge)  # 90 M pixels; 12 KB
    result = run_cli("lcnet_runner", "predict", str(huge), "--model", trained["export_dir"])
    assert '"predictions"' in result.stdout
    assert result.stderr == ""


def test_predict_says_how_many_more_failed(trained: dict, tmp_path: Path) -> None:
    images = _images(tmp_path, 1)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"hello")
        images.append(str(tmp_path / name))
    result = run_cli("lcnet_runner", "predict", *images, "--model", trained["export_dir"],
                     check=False)  # fmt: skip
    line = one_error_line(result)
    assert line.startswith(f"error: {tmp_path / 'a.jpg'}: not an image format")
    assert line.endswith("(and 1 other image not classified)")
    assert '"predictions"' in result.stdout.splitlines()[0]


def test_predict_missing_model_folder(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = run_cli("lcnet_runner", "predict", str(image), "--model", str(tmp_path), check=False)
    assert "not an exported model folder" in one_error_line(result)
    assert "PaddleX 2" not in one_error_line(result)


def test_a_paddlex2_export_says_how_to_import_it(tmp_path: Path) -> None:
    """PaddleX 2 exported model.pdmodel + model.yml (its own schema): not read, and said so."""
    for name in ("model.pdmodel", "model.pdiparams", "model.yml"):
        (tmp_path / name).write_bytes(b"")
    result = run_cli("train", "import", str(tmp_path), "--name", "px2", check=False)
    line = one_error_line(result)
    assert "not an exported model folder" in line
    assert "a PaddleX 2 export: import its checkpoint instead" in line


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--model", "PPLCNet_x9"], "unknown model 'PPLCNet_x9'"),
        (["--epochs", "0"], "epochs and batch size must be >= 1"),
        (["--crop-scale", "0.5,2"], "crop scale must satisfy"),
        (["--ram-cache-mb", "-1"], "--ram-cache-mb must be a number >= 0"),
        (["--ram-cache-mb", "inf"], "--ram-cache-mb must be a number >= 0"),  # all in RAM
        (["--lr", "nan"], "--lr=nan: must be from 1e-09 to 100"),  # a NaN model, stored
        (["--lr", "-0.1"], "--lr=-0.1: must be from 1e-09 to 100"),
        (["--weight-decay", "inf"], "--weight-decay=inf: must be from 0 to 1"),
        (["--seed", "-1"], "--seed=-1: must be from 0 to 4294967295"),  # Paddle's traceback
        (["--threads", "2147483648"], "--threads=2147483648: must be from 0 to 1024"),
        (["--early-stop-patience", "-1"], "--early-stop-patience=-1: must be >= 0"),
        (["--name", "my model"], "--name: my model is not a valid BentoML tag"),  # after training
        # weights are found (downloaded) once, by the launcher: ranks wrote one file together
        (["--pretrained", "/no/such.pdparams"], "'/no/such.pdparams': not one of imagenet"),
        (
            ["--input-size", "64", "--resize-short", "32"],
            "--input-size 64 is larger than --resize-short 32",
        ),
        (["--resume"], "--resume: no checkpoint at"),  # before any image is decoded
    ],
)
def test_fit_options_are_checked_before_data_parallel_ranks_start(
    tmp_path: Path, option: list[str], message: str
) -> None:
    """With --procs 2 a rank's error would only reach SAVE_DIR/logs; the user sees it here."""
    data = two_classes(tmp_path / "two")
    args = ["--procs", "2", "--pretrained", "none", "--save-dir", str(tmp_path / "o"), *option]
    line = one_error_line(run_cli("train", "fit", str(data), *args, check=False))
    assert message in line
    assert not (tmp_path / "o" / "logs").exists()  # no launcher started


def test_a_stopped_fit_says_resume_only_for_a_checkpoint_of_its_own(tmp_path: Path) -> None:
    """A checkpoint an earlier run left is that run's: resuming it as the hint said failed (other
    architecture) or, worse, went on with the old run."""
    import argparse

    from train.cli import resumable, run_fit

    checkpoint = tmp_path / "last.pdckpt"
    checkpoint.write_bytes(b"an earlier run's")
    os.utime(checkpoint, (1e9, 1e9))
    fit = argparse.Namespace(func=run_fit, save_dir=str(tmp_path), resume=False)
    started = time.time()
    assert resumable(fit, started) == ""
    assert resumable(argparse.Namespace(**{**vars(fit), "resume": True}), started).endswith(
        f"--resume goes on from {checkpoint})"
    )
    checkpoint.touch()  # this run's first epoch
    assert resumable(fit, started) == f" (the same command with --resume goes on from {checkpoint})"
    assert resumable(argparse.Namespace(func=print), started) == ""


def test_every_command_stops_on_sigterm_and_so_do_quietly_the_children_it_forks() -> None:
    """OpenVINO's telemetry, in `export --format openvino`, forks a sender and terminates it
    after 3 s: with Paddle's SIGTERM handler, which the child inherited, its C++ stack dump
    reached the command's stdout. And `fit` alone stopped on SIGTERM with a word; the others
    died of Paddle's handler with the same dump."""
    script = """
import multiprocessing, os, signal, sys, time
import train.export
from train.cli import main

def wait(ready):
    ready.set()
    time.sleep(60)

def add_format(model, format):  # a library that forks a child and terminates it, then a kill
    ready = multiprocessing.Event()
    child = multiprocessing.Process(target=wait, args=(ready,), daemon=True)
    child.start()
    ready.wait(60)
    child.terminate()
    child.join(60)
    print(f"child ended: {child.exitcode}", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

train.export.add_format = add_format
sys.exit(main(["export", "any:version", "--format", "openvino"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout == ""
    assert "Traceback" not in result.stderr  # the child's, had it raised Stopped
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-2:] == ["child ended: -15", "stopped (SIGTERM)"]


@pytest.mark.parametrize("procs", ["1", "2"])
def test_a_second_fit_into_one_save_dir_is_refused(tmp_path: Path, procs: str) -> None:
    """Two runs wrote one checkpoint, export and history together, and each stored a version
    (a killed data-parallel fit's ranks, trained on, met its --resume there)."""
    import fcntl

    from train.training import FIT_LOCK

    data, save_dir = two_classes(tmp_path / "two"), tmp_path / "run"
    run_cli("train", "split", str(data))
    save_dir.mkdir()
    with open(save_dir / FIT_LOCK, "w") as running:  # a fit writing there
        fcntl.flock(running, fcntl.LOCK_EX)
        args = ["--procs", procs, "--batch-size", "16", "--pretrained", "none",
                "--save-dir", str(save_dir)]  # fmt: skip
        line = one_error_line(run_cli("train", "fit", str(data), *args, check=False))
    assert line == (
        f"error: another fit is writing to {save_dir}: wait for it to end, or choose another "
        "--save-dir"
    )


@pytest.mark.parametrize("procs", ["0", "-2", "abc", "1025"])
def test_procs_is_a_count_or_auto(tmp_path: Path, procs: str) -> None:
    """argparse's usage, then its error line (before: 0 and -2 trained on 1 process unsaid)."""
    result = run_cli("train", "fit", str(tmp_path), f"--procs={procs}", check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"argument --procs: expected auto or a count from 1 to 1024, got '{procs}'")
    )


def test_a_missing_dataset_is_said_before_any_download(tmp_path: Path) -> None:
    args = ["--save-dir", str(tmp_path / "o")]  # --pretrained imagenet: not downloaded
    line = one_error_line(run_cli("train", "fit", str(tmp_path / "nope"), *args, check=False))
    assert line == f"error: dataset directory not found: {tmp_path / 'nope'}"


def test_a_reader_that_leaves_early_is_no_error(trained: dict) -> None:
    """`python -m train report TAG | head -3`: the pipe closes before the report is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "report", trained["tag"]], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    process.stdout.close()  # head has exited
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and b"error" not in stderr.lower(), stderr


def test_os_errors_are_one_line(tmp_path: Path) -> None:
    data = two_classes(tmp_path / "two")
    (tmp_path / "afile").write_text("not a folder")
    save_dir = tmp_path / "afile" / "run"
    args = ["--pretrained", "none", "--save-dir", str(save_dir)]
    line = one_error_line(run_cli("train", "fit", str(data), *args, check=False))
    assert line == f"error: {save_dir}: Not a directory"


def test_error_line_shows_paths_as_given() -> None:
    from train.cli import error_line

    denied = PermissionError(13, "Permission denied", "/data/caf\udce9 ü")
    assert error_line(denied) == "/data/caf\udce9 ü: Permission denied"
    assert error_line(OSError(18, "Invalid cross-device link", "a", None, "b")) == (
        "a -> b: Invalid cross-device link"
    )
    assert error_line(OSError("no errno")) == "no errno"
    assert error_line(ValueError("plain")) == "plain"


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 180, 60)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


@pytest.mark.parametrize(
    "option, value",
    [("--batch-size", "0"), ("--batch-size", "-2"), ("--top-k", "0"), ("--top-k", "-1")],
)
def test_predict_refuses_sizes_below_one(
    trained: dict, tmp_path: Path, option: str, value: str
) -> None:
    images = _images(tmp_path / "in", 3)
    model = trained["export_dir"]
    result = run_cli("lcnet_runner", "predict", *images, "--model", model, option, value,
                     check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # argparse refused it: nothing was classified
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(f"argument {option}: must be >= 1, got {value}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("exists", [True, False])
def test_predict_annotate_several_into_a_file(trained: dict, tmp_path: Path, exists) -> None:
    """A file, or a name like one: not made a folder named out.jpg."""
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out.jpg"
    if exists:
        out.write_bytes(b"keep me")
    args = ["--model", trained["export_dir"], "--annotate", str(out)]
    line = one_error_line(run_cli("lcnet_runner", "predict", *images, *args, check=False))
    assert str(out) in line and "not a folder" in line
    assert out.read_bytes() == b"keep me" if exists else not out.exists()


def test_predict_annotate_refuses_two_images_of_one_name(trained: dict, tmp_path: Path) -> None:
    """a/0.png and b/0.png would both be drawn to out/0.jpg: the first one lost."""
    images = [*_images(tmp_path / "a", 1), *_images(tmp_path / "b", 1)]
    args = ["--model", trained["export_dir"], "--annotate", str(tmp_path / "out")]
    result = run_cli("lcnet_runner", "predict", *images, *args, check=False)
    assert one_error_line(result) == (
        f"error: --annotate: {images[0]}, {images[1]} share a name, so their drawings in "
        f"{tmp_path / 'out'} would overwrite each other"
    )
    assert result.stdout == "" and not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("several", [True, False])
def test_predict_annotate_os_error_is_one_line(
    trained: dict, tmp_path: Path, several: bool
) -> None:
    images = _images(tmp_path / "in", 2 if several else 1)
    if several:  # the folder to create lies under a file
        (tmp_path / "file").write_bytes(b"")
        out, reason = tmp_path / "file" / "sub", "Not a directory"
    else:  # the folder of the image to write is missing
        out, reason = tmp_path / "missing" / "out.jpg", "No such file or directory"
    args = ["--model", trained["export_dir"], "--annotate", str(out)]
    result = run_cli("lcnet_runner", "predict", *images, *args, check=False)
    assert one_error_line(result) == f"error: {out}: {reason}"
    assert len(result.stdout.strip().splitlines()) == len(images)  # the predictions came first


def test_predict_annotate_never_replaces_a_file_it_did_not_draw(
    trained: dict, tmp_path: Path
) -> None:
    """--annotate into the images' own folder, or onto the image itself, replaced the photos;
    a drawing of its own it replaces, so that a second run writes where the first did."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (90 * i, 180, 60)).save(photos / f"{i}.jpg")
    images = [str(photos / "0.jpg"), str(photos / "1.jpg")]
    before = {path: Path(path).read_bytes() for path in images}
    model = ["--model", trained["export_dir"]]
    for command in (
        [*images, *model, "--annotate", str(photos)],
        [images[0], *model, "--annotate", images[0]],
        [images[0], *model, "--annotate", images[1]],
    ):
        result = run_cli("lcnet_runner", "predict", *command, check=False)
        line = one_error_line(result)
        assert "is not a drawing of predict's; choose another place" in line
        assert result.stdout == ""  # refused before any work
    assert {path: Path(path).read_bytes() for path in images} == before
    out = tmp_path / "out"
    for _ in range(2):
        run_cli("lcnet_runner", "predict", *images, *model, "--annotate", str(out))
    run_cli("lcnet_runner", "predict", images[0], *model, "--annotate", str(out))  # a folder
    assert sorted(p.name for p in out.iterdir()) == ["0.jpg", "1.jpg"]


@pytest.mark.parametrize(
    ("command", "option"),
    [(("lcnet_runner", "predict", "a.jpg"), "--threads"),
     (("lcnet_runner", "predict", "a.jpg"), "--benchmark"),
     (("train", "fit", "data"), "--threads"),
     (("train", "fit", "data"), "--workers"),
     (("train", "evaluate", "data"), "--threads")],
)  # fmt: skip
def test_clis_refuse_negative_counts(command: tuple[str, ...], option: str) -> None:
    """-1 threads ran Paddle and ONNX Runtime silently and failed OpenVINO; -1 benchmark runs
    printed an empty timing block. argparse refuses them before anything loads."""
    module, *args = command
    result = run_cli(module, *args, option, "-1", check=False)  # nothing is read
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(f"argument {option}: must be >= 0, got -1"), result.stderr


def test_split_keeps_the_split_of_lists_made_on_windows(tmp_path: Path) -> None:
    """PaddleX 2 on Windows writes `a\\0.png 0`: split found no listed image, split afresh and
    wrote new lists over the user's (and fit called every image missing)."""
    data = two_classes(tmp_path / "data", per_class=10)
    run_cli("train", "split", str(data), "--seed", "1")
    val = (data / "val_list.txt").read_text("utf-8")
    for split in ("train", "val", "test"):
        listed = data / f"{split}_list.txt"
        listed.write_text(listed.read_text("utf-8").replace("/", "\\"), "utf-8")
    result = run_cli("train", "split", str(data), "--seed", "2")
    assert "kept the split of 20 images already listed, 0 new distributed" in result.stdout
    assert (data / "val_list.txt").read_text("utf-8") == val


def test_split_refuses_lists_relative_to_the_folder_above(tmp_path: Path) -> None:
    """`flowers/a/0.png 0` in flowers/train_list.txt: split wrote new lists over them."""
    data = two_classes(tmp_path / "flowers", per_class=10)
    run_cli("train", "split", str(data))
    paths = [data / f"{split}_list.txt" for split in ("train", "val", "test")]
    for listed in paths:
        lines = listed.read_text("utf-8").splitlines()
        listed.write_text("".join(f"flowers/{line}\n" for line in lines), "utf-8")
    lists = [listed.read_bytes() for listed in paths]
    line = one_error_line(run_cli("train", "split", str(data), check=False))
    assert "its paths start with 'flowers/', the dataset folder's own name" in line
    assert line.endswith(f"sed -i 's#^flowers/##' {' '.join(map(str, paths))}")
    assert [listed.read_bytes() for listed in paths] == lists


def test_split_says_classes_out_of_balance(tmp_path: Path) -> None:
    """A class with 10× the images of another: top-1 alone can hide that the small one fails."""
    data = two_classes(tmp_path / "data", per_class=2)
    for i in range(2, 20):
        Image.new("RGB", (16, 16), (0, i * 10, 0)).save(data / "a" / f"{i}.png")
    result = run_cli("train", "split", str(data))
    assert (
        "classes out of balance: a has 20 images, 10× the 2 of b; top-1 can hide how the small "
        "classes fare (evaluate's per_class shows each)"
    ) in result.stdout.splitlines()
    (data / "a" / "19.png").unlink()  # 9.5×
    assert "out of balance" not in run_cli("train", "split", str(data)).stdout


def test_evaluate_names_every_class_one_with_no_test_image_too(
    trained: dict, tmp_path: Path
) -> None:
    """A class with no image in the split was left out of per_class: read as if it did not
    exist. Now it is there with 0 images and no top-1 (nothing to measure it on)."""
    from conftest import CLASS_NAMES

    data = tmp_path / "data"
    shutil.copytree(trained["dataset"], data)
    test_list = data / "test_list.txt"
    kept = [line for line in test_list.read_text("utf-8").splitlines() if line.endswith(" 0")]
    test_list.write_text("".join(f"{line}\n" for line in kept), "utf-8")
    result = run_cli("train", "evaluate", trained["tag"], "--dataset", str(data), "--engine",
                     "paddle", "--precision", "fp32", "--confusion-matrix", "")  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    assert list(report["per_class"]) == CLASS_NAMES
    assert report["per_class_n"] == {CLASS_NAMES[0]: len(kept), CLASS_NAMES[1]: 0,
                                     CLASS_NAMES[2]: 0}  # fmt: skip
    assert isinstance(report["per_class"][CLASS_NAMES[0]], float)
    assert report["per_class"][CLASS_NAMES[1]] is report["per_class"][CLASS_NAMES[2]] is None


def test_fit_names_the_folder_to_split_again(tmp_path: Path) -> None:
    """A class left with no training image: `split the folder again (python -m train split)`,
    the folder known."""
    data = two_classes(tmp_path / "my data", per_class=10)
    run_cli("train", "split", str(data))
    for line in (data / "train_list.txt").read_text("utf-8").splitlines():
        if line.startswith("b/"):
            (data / line.split(" ")[0]).write_bytes(b"broken since the split")
    result = run_cli("train", "fit", str(data), "--pretrained", "none", "--save-dir",
                     str(tmp_path / "run"), check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no training image left for 1 class: b; split the folder again (python -m train "
        f"split '{data}')"
    )
