"""Preprocessing cost per image: decode + resize-short + center-crop (+ normalize), side by side.

    python bench/preprocess.py [--seconds 2]

For a 500×375 and a 4000×3000 JPEG: ms/img with draft-mode JPEG decoding (what the Predictor, the
server and training use) and without it (a full-size decode), and the share of preprocessing in
one image's end-to-end time with PP-LCNet x1.0 on Paddle at batch 1, 1 thread. Then the decode
itself, the two ways alternated call by call (machines drift): libjpeg-turbo straight into numpy
(what preprocess does) against Pillow's decode of the same pixels.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from common import cpu_kind, export_random_model, scratch_dir, throughput
from PIL import Image, ImageFilter

from lcnet_runner import Predictor
from lcnet_runner.preprocess import (
    PreprocessConfig,
    eval_crop,
    load_image,
    load_pixels,
    normalize,
    preprocess,
)


def jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.filter(ImageFilter.GaussianBlur(2)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def alternated_ms(
    first: Callable[[], object], second: Callable[[], object], seconds: float
) -> list[float]:
    """Mean ms per call of each, called in turn so both see the same machine."""
    spent, calls, start = [0.0, 0.0], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i, call in enumerate((first, second)):
            began = time.perf_counter()
            call()
            spent[i] += time.perf_counter() - began
        calls += 1
    return [1000 * total / calls for total in spent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(cpu_kind())
    config = PreprocessConfig()
    folder = scratch_dir() / "model"
    export_random_model("PPLCNet_x1_0", folder)
    predictor = Predictor(folder, threads=1)
    crop = preprocess(jpeg(500, 375), config)[None]
    infer_ms = 1000 / throughput(lambda: predictor.infer(crop), 1, args.seconds)
    print(f"inference, x1.0 paddle batch 1, 1 thread: {infer_ms:.2f} ms/img")
    for width, height in ((500, 375), (4000, 3000)):
        data = jpeg(width, height)

        def with_draft(data: bytes = data) -> np.ndarray:
            return normalize(preprocess(data, config)[None], config)

        def without_draft(data: bytes = data) -> np.ndarray:
            return normalize(eval_crop(load_pixels(data), config)[None], config)

        drafted = 1000 / throughput(with_draft, 1, args.seconds)
        full = 1000 / throughput(without_draft, 1, args.seconds)
        share = drafted / (drafted + infer_ms)
        print(f"{width}x{height} JPEG ({len(data) // 1024} KiB): {drafted:.2f} ms/img with draft "
              f"decoding, {full:.2f} without ({full / drafted:.1f}x); preprocessing is "
              f"{100 * share:.0f} % of end-to-end")  # fmt: skip
        libjpeg, pillow = alternated_ms(
            lambda data=data: preprocess(data, config),
            lambda data=data: eval_crop(load_image(data, short_side=config.resize_short), config),
            args.seconds,
        )
        print(f"  decode + crop: {libjpeg:.2f} ms libjpeg-turbo straight to numpy, {pillow:.2f} "
              f"ms Pillow's decode ({libjpeg / pillow:.2f}x), same pixels")  # fmt: skip


if __name__ == "__main__":
    main()
