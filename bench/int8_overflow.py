"""What NNCF's overflow fix (7-bit weights, so INT8 is right on CPUs without VNNI) costs in speed.

    python bench/int8_overflow.py [--model PPLCNet_x1_0] [--threads 1,2]

Quantizes one exported model (seeded random weights: speed does not depend on them) twice,
with NNCF's default (`FIRST_LAYER`) and with `ENABLE` (what `train quantize` uses), then times
both INT8 IRs and the fp32 IR on the same 224 px batches, interleaved, and prints the ratios.
Accuracy is not measured here (random weights): see docs/benchmarks.md for the trained-model
figures and `python -m train verify` for your own model.
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from common import cpu_kind, export_random_model, scratch_dir, smooth_images, throughput

from lcnet_runner.predictor import Predictor
from train.quantize import quantize_openvino


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(cpu_kind())

    root = scratch_dir()
    folders = {"default": root / "default", "overflow fix": root / "fix"}
    export_random_model(args.model, folders["default"])
    shutil.copytree(folders["default"], folders["overflow fix"])
    calibration = smooth_images(100)
    for name, folder in folders.items():
        quantize_openvino(
            folder, calibration, overflow_fix=name == "overflow fix", accuracy_control=False
        )
    print(f"{args.model}; img/s, median of {args.rounds} interleaved rounds")
    probe = smooth_images(64, seed=1)
    for threads in (int(t) for t in args.threads.split(",")):
        engines = {
            "fp32": Predictor(folders["default"], engine="openvino", precision="fp32",
                              threads=threads, skip_guard=True),
            **{f"int8 {name}": Predictor(folder, engine="openvino", precision="int8",
                                         threads=threads, skip_guard=True)
               for name, folder in folders.items()},
        }  # fmt: skip
        for batch_size in (int(b) for b in args.batches.split(",")):
            batch = probe[:batch_size]
            speed = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, predictor in engines.items():
                    run = lambda p=predictor, b=batch: p.infer(b)  # noqa: E731
                    speed[name].append(throughput(run, batch_size, args.seconds))
            median = {name: statistics.median(v) for name, v in speed.items()}
            cells = "  ".join(f"{name} {value:6.1f}" for name, value in median.items())
            ratio = median["int8 overflow fix"] / median["int8 default"]
            print(f"  {threads} thread(s), batch {batch_size:2d}: {cells}   "
                  f"fix / default = {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
