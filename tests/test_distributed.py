"""Data-parallel training with Paddle's launcher: 2 processes on one machine, on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import pytest
from conftest import run_cli, tiny_fit

from train.distributed import Rank, auto_procs, shard

pytestmark = pytest.mark.slow
# 8 images per rank and step; more epochs because a global batch of 16 takes half the steps.
DIST_FIT = [*tiny_fit(epochs=16), "--batch-size", "16", "--lr", "0.02", "--procs", "2"]


def summary(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder() -> None:
    items = list(range(11))
    shards = [shard(items, Rank(i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(sum(shards, [])) == list(range(9))
    assert auto_procs(batch_size=4, cores=2) == 1  # the seed's batch stays in one process
    assert auto_procs(batch_size=32, cores=2) == 2


def test_two_processes_train_to_the_bar_and_store_one_version(
    colour_dataset: Path, tmp_path: Path
) -> None:
    save_dir = tmp_path / "dist"
    args = [*DIST_FIT, "--save-dir", str(save_dir), "--name", "dist"]
    result = run_cli("train", "fit", str(colour_dataset), *args)
    assert "training with 2 data-parallel processes" in result.stderr
    report = summary(result.stdout)
    assert report["val_top1"] >= 0.85 and report["test_top1"] >= 0.85
    assert [str(m.tag) for m in bentoml.models.list("dist")] == [report["tag"]]
    # Each rank trained on its own half of the 126 training images.
    logs = sorted((save_dir / "logs").glob("workerlog.*"))
    assert [log.name for log in logs] == ["workerlog.0", "workerlog.1"]
    for index, log in enumerate(logs):
        assert f"rank {index}/2: 63 training images" in log.read_text()
    history = json.loads((save_dir / "history.json").read_text())
    assert len(history) == 16


def test_resume_works_distributed(colour_dataset: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "dist-resume"
    base = [*tiny_fit(epochs=2), "--batch-size", "16", "--procs", "2", "--save-dir", str(save_dir)]
    run_cli("train", "fit", str(colour_dataset), *base, "--name", "dist-resume")
    more = [*base, "--epochs", "3", "--resume", "--name", "dist-resume"]
    result = run_cli("train", "fit", str(colour_dataset), *more)
    assert "resuming from epoch 2" in result.stdout + result.stderr
    assert [row["epoch"] for row in json.loads((save_dir / "history.json").read_text())] == [
        1,
        2,
        3,
    ]
    assert len(bentoml.models.list("dist-resume")) == 2
