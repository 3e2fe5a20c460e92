"""Engines side by side: images/s per engine × precision × batch size, and top-1 agreement.

    python bench/engines.py [--models PPLCNet_x0_25,PPLCNet_x1_0,PPLCNet_x2_5] [--threads 2]

Exports each model (1000 classes, seeded random weights: speed does not depend on them, and the
agreement column is only a smoke check — judge reduced precision on a trained model's val split
with `python -m train evaluate --engine ... --precision ...`) with its ONNX file, then times the
engines on the same 224 px batches, interleaved, each measurement bounded to --seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from common import export_random_model, throughput  # noqa: E402  (also sets sys.path)

VARIANTS = [("paddle", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="PPLCNet_x0_25,PPLCNet_x1_0,PPLCNet_x2_5")
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from lcnet_runner import Predictor
    from lcnet_runner.engines import cpu_supports_bf16

    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in VARIANTS if v[1] != "bf16" or cpu_supports_bf16()]
    print(
        f"{args.threads} threads; img/s (median of {args.rounds} interleaved rounds) at batch "
        f"{', '.join(map(str, batches))}; agreement = top-1 equal to paddle fp32 on 64 inputs"
    )
    for model in args.models.split(","):
        folder = Path(tempfile.mkdtemp()) / model
        export_random_model(model, folder)
        predictors = {v: Predictor(folder, engine=v[0], precision=v[1], threads=args.threads)
                      for v in variants}  # fmt: skip
        # Smooth random images: natural-image-like statistics for the agreement check.
        probe = (rng.random((64, 7, 7, 3)) * 255).astype(np.uint8).repeat(32, 1).repeat(32, 2)
        reference = predictors[("paddle", "fp32")].infer(probe).argmax(1)
        speed = {(v, b): [] for v in variants for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                batch = probe[:b] if b <= len(probe) else np.resize(probe, (b, *probe.shape[1:]))
                for v in variants:
                    run = lambda infer=predictors[v].infer, batch=batch: infer(batch)  # noqa: E731
                    speed[(v, b)].append(throughput(run, b, args.seconds))
        print(f"\n{model}")
        for v in variants:
            agreement = (predictors[v].infer(probe).argmax(1) == reference).mean()
            cells = "  ".join(f"{statistics.median(speed[(v, b)]):7.1f}" for b in batches)
            print(f"  {v[0]:11s} {v[1]}  {cells}   agreement {100 * agreement:.1f} %")


if __name__ == "__main__":
    main()
