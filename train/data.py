"""Training data on a CPU: decode every image once, then crop and flip arrays.

Decoding JPEGs every step roughly halves training throughput on 2 cores, and DataLoader worker
processes take cores from the model. So each split is decoded once (in a thread pool — PIL
releases the GIL) into uint8 arrays at resize-short size, kept in RAM when small and otherwise
in a memory-mapped cache on disk (``decoded_cache``); evaluation then takes the center crop with
``lcnet_runner``'s own functions, and training takes random resized crops + flips.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lcnet_runner.preprocess import (
    MAX_PIXELS,
    InvalidImageError,
    PreprocessConfig,
    center_crop,
    decode_resized,
    resize,
    short_side_size,
)

# Pixels past which an image resized to its short side is a sliver that the decode skips (and the
# size estimate of a split leaves out: both ask ``resized_size``).
MAX_RESIZED_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: PaddleX 2's RandomCrop (a random resized crop) + horizontal flip."""

    input_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop scale must satisfy 0 < MIN <= MAX <= 1, got {low},{high}")


@dataclass
class DecodedSplit:
    """A split's decoded images: a list in RAM, or views of a memory-mapped cache
    (``decoded_cache.MappedImages``); everything downstream only indexes ``images``."""

    images: Sequence[np.ndarray]  # uint8 HxWx3, short side = resize_short
    labels: np.ndarray  # int64 class index per image
    skipped: list[str]  # files that could not be decoded
    decoded: int = 0  # images decoded to make it: 0 when a disk cache was reused
    # > 0: train in quasi-random order, shuffled blocks of this many images consecutive on disk
    # (a cache larger than RAM is then read sequentially); 0: a plain permutation.
    block_images: int = 0
    whole: int = 0  # a subset's (a rank's shard): the images of the split it was taken from

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, ids: Sequence[int]) -> DecodedSplit:
        """These images (e.g. a data-parallel rank's shard), still views of the same backing."""
        ids = np.asarray(ids, dtype=np.int64)
        take = getattr(self.images, "take", None)  # a mapped cache keeps its disk positions
        images = take(ids) if take else [self.images[i] for i in ids]
        return DecodedSplit(
            images, self.labels[ids], [], self.decoded, self.block_images, self.whole or len(self)
        )

    def training_order(self, rng: np.random.Generator) -> np.ndarray:
        """A new order each epoch; the same draws from ``rng`` whatever backs the images when
        ``block_images`` is 0, so a seed gives identical batches from RAM and from disk."""
        if not self.block_images:
            return rng.permutation(len(self))
        return block_shuffled(self.images.positions, self.block_images, rng)


def block_shuffled(positions: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """FFCV's quasi-random order: images sorted by where they sit on disk, cut into blocks of
    ``block``, the blocks shuffled, then the images within each block."""
    by_position = np.argsort(positions, kind="stable")
    blocks = [by_position[i : i + block] for i in range(0, len(by_position), block)]
    return np.concatenate(
        [rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))] or [by_position]
    )


def resized_size(width: int, height: int, resize_short: int) -> tuple[int, int] | None:
    """(width, height) of a ``width``×``height`` image resized to its short side, or None for a
    sliver that ``decode_or_none`` skips: over MAX_RESIZED_PIXELS, the limit it decodes with."""
    size = short_side_size(width, height, resize_short)
    return None if size[0] * size[1] > MAX_RESIZED_PIXELS else size


def decode_or_none(path: Path, config: PreprocessConfig) -> np.ndarray | None:
    """The same decode as serving's preprocess(), draft scaling included; None if unreadable,
    or a sliver that resized would be too large to hold (1×20,000 → 256×5,120,000: 3.9 GB; see
    ``resized_size``). A large photo trains as it always did: serving's limit on decoded pixels
    is not applied."""
    try:
        return decode_resized(path, config, max_resized_pixels=MAX_RESIZED_PIXELS)
    except (InvalidImageError, OSError):
        return None


def decode_stream(
    paths: Iterable[Path], config: PreprocessConfig, workers: int
) -> Iterator[np.ndarray | None]:
    """Decoded images in the order of ``paths`` (None for unreadable ones), decoded ahead by
    ``workers`` threads but never more than a few per thread: memory stays flat however many."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.submit(decode_or_none, path, config))
            if len(pending) >= 4 * max(1, workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_split(
    samples: Sequence[tuple[Path, int]],
    config: PreprocessConfig,
    *,
    workers: int = 2,
    desc: str = "decode",
) -> DecodedSplit:
    """Decode and resize every image once into RAM; unreadable files are skipped and listed,
    never fatal."""
    images, labels, skipped = [], [], []
    decoded = decode_stream([path for path, _ in samples], config, workers)
    progress = tqdm(zip(samples, decoded, strict=True), total=len(samples), desc=desc,
                    disable=None, leave=False)  # fmt: skip
    for (path, label), image in progress:
        if image is None:
            skipped.append(str(path))
        else:
            images.append(image)
            labels.append(label)
    return DecodedSplit(images, np.asarray(labels, dtype=np.int64), skipped, len(samples))


def random_resized_crop(
    image: np.ndarray, rng: np.random.Generator, aug: AugmentConfig, preprocess: PreprocessConfig
) -> np.ndarray:
    """torchvision/PaddleX RandomResizedCrop on a uint8 HWC array (10 tries, then center crop)."""
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*aug.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            break
    else:
        side = min(width, height)
        w = h = side
        left, top = (width - side) // 2, (height - side) // 2
    # Resized like evaluation and serving resize (the model's backend and interpolation).
    box = (left, top, left + w, top + h)
    return resize(image, (aug.input_size, aug.input_size), preprocess, box)


def train_batches(
    split: DecodedSplit,
    aug: AugmentConfig,
    preprocess: PreprocessConfig,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled uint8 NHWC batches with augmentation; the last partial batch is kept."""
    order = split.training_order(rng)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        crops = np.stack([random_resized_crop(split.images[i], rng, aug, preprocess) for i in ids])
        if aug.hflip:
            flip = rng.random(len(ids)) < 0.5
            crops[flip] = crops[flip, :, ::-1]
        yield crops, split.labels[ids]


def sample_crops(split: DecodedSplit, count: int, crop_size: int, seed: int = 0) -> np.ndarray:
    """Center crops (what serving feeds the model) of ``count`` random images of a split, in
    split order: INT8 calibration, the self-check sample."""
    ids = np.sort(np.random.default_rng(seed).permutation(len(split))[:count])
    return np.concatenate([crops for crops, _ in eval_batches(split.subset(ids), crop_size, 64)])


def eval_batches(
    split: DecodedSplit, crop_size: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Center crops in order: exactly serving's ``lcnet_runner.preprocess.preprocess()`` of each
    file (the split holds ``decode_resized``'s pixels, draft decoding included: decode_or_none)."""
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        crops = np.stack([center_crop(image, crop_size) for image in images])
        yield crops, split.labels[start : start + batch_size]
