"""Engines side by side: images/s per engine × precision × batch size, and top-1 agreement.

    python bench/engines.py [--models PPLCNet_x0_25,PPLCNet_x1_0,PPLCNet_x2_5] [--threads 2]

Exports each model (1000 classes, seeded random weights: speed does not depend on them, and the
agreement column is only a smoke check — the accuracy guard judges reduced precision on a trained
model's val split, see `python -m train verify`) with its ONNX file and an INT8 variant
(calibrated on smooth random images), then times every engine × precision on the same 224 px
batches, interleaved, each measurement bounded to --seconds.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import (
    cpu_kind,
    every_variant,
    export_random_model,
    scratch_dir,
    smooth_images,
    throughput,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="PPLCNet_x0_25,PPLCNet_x1_0,PPLCNet_x2_5")
    parser.add_argument("--batches", default="1,8,16,32", help="must include 16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(cpu_kind())

    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"{args.threads} threads; img/s (median of {args.rounds} interleaved rounds) at batch "
        f"{', '.join(map(str, batches))}; agreement = top-1 equal to paddle fp32 on 64 inputs"
    )
    for model in args.models.split(","):
        folder = scratch_dir() / model
        export_random_model(model, folder, int8=True)
        predictors = every_variant(folder, args.threads)
        probe = smooth_images(64, seed=1)
        reference = next(iter(predictors.values())).infer(probe).argmax(1)
        speed = {(v, b): [] for v in predictors for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                batch = probe[:b] if b <= len(probe) else np.resize(probe, (b, *probe.shape[1:]))
                for v in predictors:
                    run = lambda infer=predictors[v].infer, batch=batch: infer(batch)  # noqa: E731
                    speed[(v, b)].append(throughput(run, b, args.seconds))
        print(f"\n{model}")
        first = next(iter(predictors))
        for v in predictors:
            agreement = (predictors[v].infer(probe).argmax(1) == reference).mean()
            cells = "  ".join(f"{statistics.median(speed[(v, b)]):7.1f}" for b in batches)
            ratio = statistics.median(speed[(v, 16)]) / statistics.median(speed[(first, 16)])
            print(f"  {v.engine:11s} {v.precision}  {cells}   agreement {100 * agreement:5.1f} %"
                  f"   bs16 / paddle fp32 = {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
