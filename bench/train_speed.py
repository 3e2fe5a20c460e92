"""Training throughput: our `fit` loop vs a bare Paddle loop on ready tensors, side by side.

    python bench/train_speed.py [--model PPLCNet_x0_25] [--input-size 128] [--batch-size 16]

Five loops on the same model, batch and input size, interleaved over several rounds (machines
here are noisy; medians are compared):
  bare     forward/backward/step on one pre-made tensor batch: the ceiling
  fit      train.training.train_one_epoch on the decoded in-memory cache (random resized crop, flip,
           normalize): what `python -m train fit` runs on a small split
  disk     the same on the memory-mapped disk cache (train.decoded_cache), in the page cache
  cold     the same, the cache evicted from the page cache first: read from disk as it trains
  decode   the same, but decoding each JPEG from disk every step (the naive pipeline)
Prints images/s and the ratios fit/bare (target >= 0.9), disk/fit (target >= 0.95), cold/fit
and decode/bare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from common import cpu_kind

from lcnet_runner.preprocess import decode_resized, normalize
from train.data import DecodedSplit, decode_split
from train.decoded_cache import PIXELS, CacheConfig, load_split
from train.demo_data import write_demo_dataset
from train.model import build_model
from train.split import read_split, split_dataset
from train.training import FitConfig, train_one_epoch


def step(model, optimizer, x: paddle.Tensor, y: paddle.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()


def bare_loop(model, optimizer, n_images: int, config: FitConfig) -> float:
    s = config.input_size
    x = paddle.to_tensor(np.random.default_rng(0).random((config.batch_size, 3, s, s), np.float32))
    y = paddle.to_tensor(np.zeros(config.batch_size, np.int64))
    steps = n_images // config.batch_size
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, x, y)
    return steps * config.batch_size / (time.perf_counter() - start)


def fit_loop(model, optimizer, split: DecodedSplit, config: FitConfig) -> float:
    rng = np.random.default_rng(0)
    return train_one_epoch(model, optimizer, split, config, epoch=0, rng=rng)["images_per_s"]


def cold_loop(model, optimizer, split: DecodedSplit, pixels: Path, config: FitConfig) -> float:
    """``fit_loop`` on the disk cache right after evicting it from the page cache."""
    with open(pixels, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return fit_loop(model, optimizer, split, config)


def decode_loop(model, optimizer, samples, config: FitConfig) -> float:
    """Decode + resize every image every step, in the training process (no cache)."""
    model.train()
    start, seen = time.perf_counter(), 0
    for i in range(0, len(samples) - config.batch_size + 1, config.batch_size):
        batch = samples[i : i + config.batch_size]
        crops = []
        for path, _ in batch:
            image = decode_resized(path, config.preprocess)
            crops.append(np.ascontiguousarray(image[: config.input_size, : config.input_size]))
        x = paddle.to_tensor(normalize(np.stack(crops), config.preprocess))
        step(model, optimizer, x, paddle.to_tensor(np.asarray([label for _, label in batch])))
        seen += len(batch)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x0_25")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=320, help="training images per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(cpu_kind())
    config = FitConfig(
        model=args.model,
        input_size=args.input_size,
        resize_short=round(args.input_size / 0.875),
        batch_size=args.batch_size,
    )
    paddle.base.core.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        # Photos are larger than the crop: write 2× input size JPEGs, as real data would be.
        root = Path(tmp) / "data"
        write_demo_dataset(root, images_per_class=args.images // 4, image_size=2 * args.input_size)
        split_dataset(root, val_ratio=0.0, test_ratio=0.0)
        samples = read_split(root, "train")
        split = decode_split(samples, config.preprocess, workers=2)
        cache = CacheConfig(Path(tmp) / "cache", ram_mb=0)
        mapped = load_split(samples, config.preprocess, cache, name="train", dataset=root)
        pixels = next(cache.folder.glob(f"*/{PIXELS}"))
        model = build_model(config.model, num_classes=4)
        optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
        bare_loop(model, optimizer, 4 * config.batch_size, config)  # warm-up
        results: dict[str, list[float]] = {"bare": [], "fit": [], "disk": [], "cold": [],
                                           "decode": []}  # fmt: skip
        for _ in range(args.rounds):
            results["bare"].append(bare_loop(model, optimizer, len(samples), config))
            results["fit"].append(fit_loop(model, optimizer, split, config))
            results["disk"].append(fit_loop(model, optimizer, mapped, config))
            results["cold"].append(cold_loop(model, optimizer, mapped, pixels, config))
            results["decode"].append(decode_loop(model, optimizer, samples, config))
    median = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"{config.model}, batch {config.batch_size}, {config.input_size} px, "
        f"{len(samples)} images x {args.rounds} rounds (median images/s)"
    )
    for name, value in median.items():
        print(f"  {name:7s} {value:7.1f} img/s   ({', '.join(f'{v:.1f}' for v in results[name])})")
    print(f"fit / bare    = {median['fit'] / median['bare']:.2f}   (target >= 0.90)")
    print(f"disk / fit    = {median['disk'] / median['fit']:.2f}   (target >= 0.95)")
    print(f"cold / fit    = {median['cold'] / median['fit']:.2f}")
    print(f"decode / bare = {median['decode'] / median['bare']:.2f}")


if __name__ == "__main__":
    main()
