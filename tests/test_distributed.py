"""Data-parallel training with Paddle's launcher: 2 processes on one machine, on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import bentoml
import psutil
import pytest
from conftest import ROOT, run_cli, tiny_fit

from lcnet_runner.hardware import default_threads
from train.distributed import LAUNCHER_LOG, Rank, auto_procs, run_data_parallel, shard

# 8 images per rank and step; more epochs because a global batch of 16 takes half the steps.
DIST_FIT = [*tiny_fit(epochs=16), "--batch-size", "16", "--lr", "0.02", "--procs", "2"]
# What Paddle's launcher and its ranks print on their own: it belongs in SAVE_DIR/logs.
LAUNCHER_CHATTER = ("LAUNCH INFO", "FLAGS(", "Modified FLAGS", "tcp_store", "tcp_utils")


def summary(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def line_kinds(text: str) -> list[str]:
    """Each line's first word with its digits blanked, runs of one kind counted once (8 epochs
    or 16 read the same); indented lines (a warning's source, the guard's rows) are left out."""
    kinds = (re.sub(r"\d+", "#", line.split()[0]) for line in text.splitlines() if line[:1].strip())
    return [kind for kind, _ in groupby(kinds)]


@pytest.fixture(scope="module")
def two_processes(colour_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """`fit --procs 2` on the colour set: the finished process and its save dir."""
    save_dir = tmp_path_factory.mktemp("dist") / "run"
    args = [*DIST_FIT, "--save-dir", str(save_dir), "--name", "dist"]
    return run_cli("train", "fit", str(colour_dataset), *args), save_dir


def test_shards_are_equal_and_hold_every_item() -> None:
    """11 images on 3 ranks: 4 each, the first one trained twice; the last (in a list sorted by
    class, maybe a class's only image) is trained."""
    items = list(range(11))
    shards = [shard(items, Rank(i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(sum(shards, [])) == [0, *range(11)]
    assert [shard(range(6), Rank(i, 2)) for i in range(2)] == [[0, 2, 4], [1, 3, 5]]
    # fewer images than ranks: still one each (a rank with none would wait in all-reduce)
    assert [shard([7], Rank(i, 3)) for i in range(3)] == [[7], [7], [7]]
    assert [shard([], Rank(i, 2)) for i in range(2)] == [[], []]
    assert auto_procs(batch_size=4, cores=2) == 1  # the seed's batch stays in one process
    assert auto_procs(batch_size=32, cores=2) == 2


def test_one_process_or_a_rank_trains_itself(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert not run_data_parallel([], "1", 64, 0, "unused")
    assert capsys.readouterr().err == ""  # asked for
    assert not run_data_parallel([], "auto", 4, 0, "unused")  # < 8 images a rank: one process
    if default_threads() > 1:  # and said why, with what would use every core
        assert "training in 1 process: a batch of 4" in capsys.readouterr().err
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")  # already started by the launcher
    assert not run_data_parallel([], "2", 64, 0, "unused")


def test_two_processes_train_to_the_bar_and_store_one_version(two_processes: tuple) -> None:
    result, save_dir = two_processes
    assert "training with 2 data-parallel processes" in result.stderr
    report = summary(result.stdout)
    assert report["val_top1"] >= 0.85 and report["test_top1"] >= 0.85
    assert [str(m.tag) for m in bentoml.models.list("dist")] == [report["tag"]]
    assert bentoml.models.get(report["tag"]).info.metadata["train_images"] == 126
    # Each rank trained on its own half of the 126 training images; rank 0 says so on the
    # console only as a single process would, the others in their logs.
    logs = sorted((save_dir / "logs").glob("workerlog.*"))
    assert [log.name for log in logs] == ["workerlog.0", "workerlog.1"]
    assert "rank 1/2: 63 training images" in logs[1].read_text()
    history = json.loads((save_dir / "history.json").read_text())
    assert len(history) == 16


def test_two_processes_print_what_one_process_prints(
    two_processes: tuple, colour_dataset: Path, tmp_path: Path
) -> None:
    """Rank 0 writes to fit's own console; the launcher's chatter goes to SAVE_DIR/logs."""
    two, save_dir = two_processes
    one_epoch = [*DIST_FIT, "--epochs", "1", "--procs", "1", "--save-dir", str(tmp_path)]
    one = run_cli("train", "fit", str(colour_dataset), *one_epoch, "--name", "one")
    for result in (one, two):
        json.loads(result.stdout.splitlines()[-1])  # the summary comes last
        assert "epoch 1/" in result.stderr
        for chatter in LAUNCHER_CHATTER:
            assert chatter not in result.stdout + result.stderr, chatter
    assert line_kinds(two.stdout) == line_kinds(one.stdout)
    extra, *rest = two.stderr.splitlines()  # the one line naming the process count
    assert extra.startswith("training with 2 data-parallel processes")
    assert line_kinds("\n".join(rest)) == line_kinds(one.stderr)
    assert "LAUNCH INFO" in (save_dir / "logs" / LAUNCHER_LOG).read_text()


def test_resume_works_distributed(colour_dataset: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "dist-resume"
    base = [*tiny_fit(epochs=2), "--batch-size", "16", "--procs", "2", "--save-dir", str(save_dir)]
    run_cli("train", "fit", str(colour_dataset), *base, "--name", "dist-resume")
    more = [*base, "--epochs", "3", "--resume", "--name", "dist-resume"]
    result = run_cli("train", "fit", str(colour_dataset), *more)
    assert "resuming from epoch 2" in result.stderr  # rank 0's console is fit's own
    assert [row["epoch"] for row in json.loads((save_dir / "history.json").read_text())] == [
        1,
        2,
        3,
    ]
    assert len(bentoml.models.list("dist-resume")) == 2


@pytest.mark.parametrize(
    "signalled, stop, procs, code, last_line",
    [("group", signal.SIGINT, "2", 130, "interrupted"),  # a terminal's Ctrl+C
     ("pid", signal.SIGTERM, "2", 143, "stopped (SIGTERM)"),  # kill, timeout, a job scheduler
     ("pid", signal.SIGTERM, "1", 143, "stopped (SIGTERM)")],  # it ended without a word
)  # fmt: skip
def test_a_stopped_fit_stops_its_ranks_and_leaves_stdout_clean(
    colour_dataset: Path, tmp_path: Path, signalled: str, stop: int, procs: str, code: int,
    last_line: str,
) -> None:  # fmt: skip
    """A signal to `fit` ends the launcher and every rank before `fit` exits: killed by pid, it
    said "interrupted" while its ranks trained on and later stored a model. Its stdout carries
    only the result: the launcher ends the ranks with SIGTERM, and Paddle's fatal-signal handler
    in rank 0 dumped a C++ stack onto it."""
    args = [*DIST_FIT, "--epochs", "200", "--procs", procs, "--save-dir", str(tmp_path / "run")]
    command = [sys.executable, "-m", "train", "fit", str(colour_dataset), *args]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group, which a terminal's Ctrl+C signals as one
    ) as fit:  # fmt: skip
        try:
            for line in fit.stderr:  # rank 0 trains: its first epoch line is on fit's stderr
                if line.startswith("epoch "):
                    break
            else:
                pytest.fail(f"fit ended before its first epoch: {fit.wait()}")
            launched = psutil.Process(fit.pid).children(recursive=True)  # launcher and ranks
            (os.killpg if signalled == "group" else os.kill)(fit.pid, stop)
            stdout, stderr = fit.communicate(timeout=120)
        finally:
            if fit.poll() is None:
                os.killpg(fit.pid, signal.SIGKILL)
    assert fit.returncode == code, stderr
    assert [p for p in launched if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert stdout == "", stdout
    assert stderr.strip().splitlines()[-1].startswith(last_line)
