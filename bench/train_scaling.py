"""Training throughput: 1 process × N threads vs N data-parallel processes × 1 thread.

    python bench/train_scaling.py [--models PPLCNet_x0_25,PPLCNet_x1_0] [--input-size 128]

Runs the real `python -m train fit` on a generated dataset (3 epochs, the last two timed) in both
layouts, interleaved, and prints images/s, the ratio, and what each step has to communicate:
data-parallel training all-reduces every gradient each step, so across machines the network
must carry ~2 × 4 bytes × parameters per step per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_kind, scratch_dir

ROOT = Path(__file__).resolve().parents[1]


def fit_images_per_s(dataset: Path, model: str, size: int, batch: int, procs: int) -> float:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as save_dir:
        command = [
            sys.executable, "-m", "train", "fit", str(dataset), "--model", model,
            "--pretrained", "none", "--input-size", str(size),
            "--resize-short", str(round(size / 0.875)), "--epochs", "3",
            "--batch-size", str(batch), "--procs", str(procs),
            "--threads", str(max(1, cores // procs)), "--save-dir", save_dir, "--name", "scaling",
        ]  # fmt: skip
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        history = json.loads((Path(save_dir) / "history.json").read_text())
    return statistics.mean(row["images_per_s"] for row in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="PPLCNet_x0_25,PPLCNet_x1_0")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(cpu_kind())
    os.environ["BENTOML_HOME"] = str(scratch_dir("lcnet-scaling-"))

    from train.demo_data import write_demo_dataset
    from train.model import build_model
    from train.split import split_dataset

    cores = len(os.sched_getaffinity(0))
    dataset = scratch_dir() / "data"
    write_demo_dataset(dataset, images_per_class=80, image_size=2 * args.input_size)
    split_dataset(dataset, val_ratio=0.1, test_ratio=0.0)
    print(f"{cores} cores, batch {args.batch_size} (global), {args.input_size} px, "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    for model in args.models.split(","):
        results: dict[int, list[float]] = {1: [], cores: []}
        for _ in range(args.rounds):
            for procs in results:
                results[procs].append(
                    fit_images_per_s(dataset, model, args.input_size, args.batch_size, procs)
                )
        one, many = (statistics.median(results[p]) for p in (1, cores))
        params = sum(int(p.numel()) for p in build_model(model, 4).parameters())
        print(
            f"{model}: 1 process × {cores} threads {one:.1f} img/s; "
            f"{cores} processes × 1 thread {many:.1f} img/s; ratio {many / one:.2f}; "
            f"all-reduce per step ≈ {2 * 4 * params / 2**20:.1f} MiB per rank "
            f"({params:,} parameters)"
        )


if __name__ == "__main__":
    main()
