"""The seed tutorial's latency print, for our Predictor on PP-LCNet x1.0.

    python bench/seed_print.py [--runs 200] [--threads 2]

The seed (PaddleX 2, `use_gpu=True`) printed 53.9 ms/img: 5.9 ms preprocess + 48 ms inference,
for one `cv2.imread` image. Here: the same call shape — one decoded BGR array of a 500×375 photo,
batch 1 — on 2 CPU cores, for Paddle fp32 and each faster variant (random weights, so the
accuracy guard is skipped; speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from common import cpu_kind, every_variant, export_random_model, photo_jpeg, scratch_dir
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(cpu_kind())

    from lcnet_runner.predictor import Timings

    folder = scratch_dir() / "PPLCNet_x1_0"
    export_random_model("PPLCNet_x1_0", folder, int8=True)
    bgr = np.asarray(Image.open(io.BytesIO(photo_jpeg())).convert("RGB"))[:, :, ::-1].copy()
    for variant, predictor in every_variant(folder, args.threads, batch_size=1).items():
        for _ in range(10):  # warm-up
            predictor.predict(bgr, bgr=True)
        timings = Timings()
        for _ in range(args.runs):
            predictor.predict(bgr, bgr=True)
            timings += predictor.timings
        print(f"\n{variant}, {args.threads} threads, {args.runs} runs of one 500x375 BGR array")
        print(timings.latency_block(batch_size=1))


if __name__ == "__main__":
    main()
