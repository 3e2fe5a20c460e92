"""Decoded splits on disk: decode once, memory-map, reuse — memory flat however many images.

A split small enough (``CacheConfig.ram_mb``) is decoded into RAM, as it always was. A larger
one is decoded once, streaming, into ``<cache root>/decoded/<key>/``::

    pixels.u8    every image's uint8 HxWx3 pixels back to back (in a fixed shuffled order)
    index.npz    per split entry: byte offset, height and width (0 × 0: unreadable), label
    meta.json    dataset, split, image count, size, preprocessing, the unreadable files

and memory-mapped: its pages are the kernel's page cache, reclaimable, not the process's memory.
The key hashes every file's (path, size, mtime_ns, ctime_ns, label) and the preprocessing fields
that shape the decode, so a changed file or resize makes a new cache (the stale one of that split is
removed). A cache is built in a hidden folder beside its final name and renamed when complete (a
killed build is never used), under a file lock so two processes never build the same one:
``fit``, ``--resume``, ``evaluate``, ``verify``, ``quantize`` and every data-parallel rank reuse
it. A build syncs what it wrote every ``CHECKPOINT_BYTES``; the next run after a kill or Ctrl+C
goes on from the last such checkpoint instead of decoding everything again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lcnet_runner.artifact import cache_dir, write_text_atomic
from lcnet_runner.cli import error_line
from lcnet_runner.preprocess import (
    InvalidImageError,
    PreprocessConfig,
    image_size,
)

from .console import log
from .data import DecodedSplit, decode_split, decode_stream, resized_size
from .split import DatasetError, list_digest

# Bump when the files or the key's recipe change meaning (2: each file's ctime joined the key):
# a cache of another format is then stale, and its key not found.
FORMAT = 2
DECODED_DIR = "decoded"  # under LCNET_CACHE (or --cache-dir), beside the pretrained weights
PIXELS, INDEX, META = "pixels.u8", "index.npz", "meta.json"
BUILDING = ".building"  # suffix of a cache being written; renamed to the key when complete
# While building: each image's height and width as written (int32 pairs, 0 × 0: unreadable), and
# how much of both files is durable — where a killed build goes on from.
SHAPES_WRITTEN, PROGRESS = "shapes.i32", "progress.json"
CHECKPOINT_BYTES = 64 << 20  # pixels written between two syncs of a build
RAM_MB = 64  # default: splits decoding to less stay in RAM (see CacheConfig.ram_mb)
# Fields of PreprocessConfig that act after the decode (crop, normalisation): a new crop size
# reuses the cache. Every other field — including any added later — is part of the key.
AFTER_DECODE = ("crop_size", "mean", "std")
HEADER_SAMPLE = 256  # files whose headers estimate a split's decoded size
DISK_MARGIN = 512 << 20  # bytes left free on the cache's disk
BLOCK_BYTES = 8 << 20  # a block of the quasi-random order: one sequential read of ~8 MiB
BUILDER_WAIT_S = 300.0  # for the builder rank to take a cache's lock (it needs seconds)


class CacheSpaceError(ValueError):
    """The cache's disk lacks room; the message is one line saying what to do."""


class DamagedCacheError(ValueError):
    """A complete cache whose files no longer agree with its meta.json (a disk fault, a bad
    copy, a truncated file): rebuilt, never read."""


@dataclass(frozen=True)
class CacheConfig:
    """Where decoded caches live and which splits stay in RAM instead.

    ``ram_mb``: a split whose decoded pixels take less stays in RAM (decoding a few hundred
    images costs about as much as writing and syncing their cache, and leaves nothing on disk);
    0 sends every split to disk."""

    root: Path | None = None  # None: lcnet_runner.artifact.cache_dir() (LCNET_CACHE)
    ram_mb: float = RAM_MB

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ram_mb) and self.ram_mb >= 0):  # inf: every split in RAM
            raise ValueError(f"--ram-cache-mb must be a number >= 0, got {self.ram_mb}")

    @property
    def folder(self) -> Path:
        return Path(self.root or cache_dir()) / DECODED_DIR


class MappedImages(Sequence[np.ndarray]):
    """The images of a cache, each a read-only view of the memory-mapped pixels (no copy)."""

    def __init__(self, pixels: mmap.mmap | None, positions: np.ndarray, shapes: np.ndarray):
        self.pixels, self.positions, self.shapes = pixels, positions, shapes

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        height, width = self.shapes[i]
        count = int(height) * int(width) * 3
        flat = np.frombuffer(self.pixels, np.uint8, count, int(self.positions[i]))
        return flat.reshape(int(height), int(width), 3)

    def take(self, ids: np.ndarray) -> MappedImages:
        return MappedImages(self.pixels, self.positions[ids], self.shapes[ids])


def cache_key(samples: Sequence[tuple[Path, int]], preprocess: PreprocessConfig) -> str:
    """What the decoded pixels depend on: each file's path, size, times and label, and the
    preprocessing fields that shape the decode. The change time too: a file replaced by one of
    the same size with its modification time kept (``cp -p``, ``tar x``, ``rsync -t``) kept the
    old pixels; nothing but the kernel sets ctime, so a write or a rename always moves it."""
    digest = hashlib.sha256()
    shaping = {k: v for k, v in preprocess.to_dict().items() if k not in AFTER_DECODE}
    digest.update(json.dumps({"format": FORMAT, "preprocess": shaping}, sort_keys=True).encode())
    for path, label in samples:
        try:
            stat = os.stat(path)
            times = f"{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
            size = stat.st_size
        except OSError:  # missing now: decoded as unreadable, and a new file makes a new key
            size, times = -1, "-1"
        entry = f"{os.fsdecode(path)}\0{size}\0{times}\0{label}\n"
        digest.update(entry.encode("utf-8", "replace"))
    return digest.hexdigest()[:24]


def estimate_bytes(samples: Sequence[tuple[Path, int]], resize_short: int) -> int:
    """Decoded size of a split from the headers of up to HEADER_SAMPLE evenly spread files,
    leaving out what the decode skips: a sliver counted here (1×4,000,000 at its short-side
    size: 63 GB) sent a split of 3 MB to disk, or refused it for lack of room."""
    if not samples:
        return 0
    step = max(1, len(samples) // HEADER_SAMPLE)
    sizes = []
    for path, _ in samples[::step][:HEADER_SAMPLE]:
        try:
            width, height = image_size(path)
        except (InvalidImageError, FileNotFoundError):
            continue  # skipped by the decode too
        if (size := resized_size(width, height, resize_short)) is None:
            continue  # a sliver: skipped by the decode too
        sizes.append(3 * size[0] * size[1])
    return round(np.mean(sizes) * len(samples)) if sizes else 0


def load_split(
    samples: Sequence[tuple[Path, int]],
    preprocess: PreprocessConfig,
    cache: CacheConfig,
    *,
    name: str,
    dataset: Path,
    workers: int = 2,
    builder: bool = True,
    select: Sequence[int] | None = None,
) -> DecodedSplit:
    """A split decoded once: reused from its disk cache when there is one, else decoded into RAM
    when small, else cached on disk first (by ``builder``; other processes wait for it).
    ``select``: only these entries of ``samples`` (a sample of the split never builds a cache).
    Says on stderr which it chose."""
    folder = cache.folder / cache_key(samples, preprocess)
    if folder.is_dir():
        try:
            return _reused(folder, name, select)
        except DamagedCacheError as err:
            _discard(folder, name, err)
    if select is not None:
        return decode_split([samples[i] for i in select], preprocess, workers=workers, desc=name)
    estimate = estimate_bytes(samples, preprocess.resize_short)
    if estimate < cache.ram_mb * 1e6:
        split = decode_split(samples, preprocess, workers=workers, desc=name)
        size = sum(image.nbytes for image in split.images)
        log(f"{name}: {len(split)} images, {size_text(size)} decoded → kept in RAM "
            f"(under --ram-cache-mb {cache.ram_mb:g})")  # fmt: skip
        return split
    if builder:
        return _build(folder, samples, preprocess, estimate, name, dataset, workers)
    return _waited(folder, name)


def _reused(folder: Path, name: str, select: Sequence[int] | None = None) -> DecodedSplit:
    split, size = open_cache(folder, select)
    log(f"{name}: {len(split)} images, {size_text(size)} decoded → disk cache {folder} (reused)"
        + _order_note(split))  # fmt: skip
    return split


def _discard(folder: Path, name: str, damage: DamagedCacheError) -> None:
    """Delete a damaged cache so that it is made again, unless another process (a data-parallel
    rank) already has: under the lock, the cache is checked once more."""
    with _locked(folder):
        if not folder.is_dir():  # another rank deleted it already
            return
        try:
            open_cache(folder)
        except DamagedCacheError:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"{name}: {damage}; deleted, decoding the split again")


def _waited(folder: Path, name: str, wait_s: float = BUILDER_WAIT_S) -> DecodedSplit:
    """A data-parallel rank other than the builder: wait until the cache is complete. The lock
    is held by the builder for the whole build; polling covers a builder that has not taken it
    yet (if it dies, the launcher stops every rank). A cache that nobody starts building within
    ``wait_s`` is another key than the builder's: a file changed between the ranks' looks at the
    dataset, and waiting on would hang the run without a word."""
    deadline = time.monotonic() + wait_s
    while True:
        with _locked(folder):  # waits here while the builder builds
            if folder.is_dir():
                return _reused(folder, name)
        if time.monotonic() > deadline:
            raise DatasetError(
                f"{name}: no process started decoding {folder.name} in {wait_s:.0f} s: did the "
                "dataset change while the training processes started? Run the command again"
            )
        time.sleep(0.5)


def _build(
    folder: Path,
    samples: Sequence[tuple[Path, int]],
    preprocess: PreprocessConfig,
    estimate: int,
    name: str,
    dataset: Path,
    workers: int,
) -> DecodedSplit:
    _check_writable(folder.parent)
    with _locked(folder):
        if folder.is_dir():  # another process built it while this one waited for the lock
            return _reused(folder, name)
        temp = folder.with_name(folder.name + BUILDING)
        # A killed build's files are part of the estimate and already off the free space: a
        # build killed at 15 of 20 GB needed 15 GB more than it had been allowed to start with.
        written = folder_bytes(temp)
        free = shutil.disk_usage(folder.parent).free
        if estimate - written + DISK_MARGIN > free:
            raise CacheSpaceError(_no_room(name, estimate, folder.parent, free, written))
        log(f"{name}: {len(samples)} images, ≈{size_text(estimate)} decoded → disk cache {folder} "
            f"(building; {size_text(free)} free)")  # fmt: skip
        started = time.perf_counter()
        try:
            temp.mkdir(exist_ok=True)  # may hold a killed build's checkpoint
            decoded = _write(temp, samples, preprocess, workers, name, dataset)
            os.replace(temp, folder)
            _fsync_dir(folder.parent)
        except OSError as err:
            shutil.rmtree(temp, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                free = shutil.disk_usage(folder.parent).free
                raise CacheSpaceError(_no_room(name, estimate, folder.parent, free)) from None
            raise
        except Exception:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        # Ctrl+C (KeyboardInterrupt) leaves the build, like a kill, for the next run to go on.
    split, size = open_cache(folder)
    split.decoded = decoded
    seconds = time.perf_counter() - started
    log(f"{name}: {len(split)} images, {size_text(size)} decoded → disk cache {folder} "
        f"(built in {seconds:.1f} s)" + _order_note(split))  # fmt: skip
    for stale, why in _stale_caches(folder):
        shutil.rmtree(stale, ignore_errors=True)
        log(f"{name}: removed {stale.name}, {why}")
    return split


def _write(
    temp: Path,
    samples: Sequence[tuple[Path, int]],
    preprocess: PreprocessConfig,
    workers: int,
    name: str,
    dataset: Path,
) -> int:
    """Decode into ``temp``, streaming, and sync it to disk; returns how many images this call
    decoded (a killed build's checkpoint is gone on from). Images are written in a fixed shuffled
    order so that consecutive ones — a block of the quasi-random order — mix classes (split lists
    go class by class)."""
    count = len(samples)
    order = np.random.default_rng(0).permutation(count)
    done, position = _resume_point(temp)
    if done:
        log(f"{name}: going on from a killed build's checkpoint: {done:,} of {count:,} images, "
            f"{size_text(position)} already decoded")  # fmt: skip
    decoded = decode_stream((samples[i][0] for i in order[done:]), preprocess, workers)
    with open(temp / PIXELS, "ab") as pixels, open(temp / SHAPES_WRITTEN, "ab") as shapes_out:
        synced = position
        bar = tqdm(decoded, initial=done, total=count, desc=name, disable=None, leave=False)
        for written, image in enumerate(bar, start=done + 1):
            shape = (0, 0) if image is None else image.shape[:2]
            if image is not None:
                pixels.write(np.ascontiguousarray(image).data)
                position += image.nbytes
            shapes_out.write(np.asarray(shape, np.int32).tobytes())
            if position - synced >= CHECKPOINT_BYTES or written == count:
                _checkpoint(temp, (pixels, shapes_out), written, position)
                synced = position
    _write_index(temp, samples, order, name, dataset, preprocess)
    return count - done


def _checkpoint(temp: Path, files, images: int, position: int) -> None:
    """Make the first ``images`` of the build durable, then say so (atomically)."""
    for file in files:
        file.flush()
        os.fsync(file.fileno())
    write_text_atomic(temp / PROGRESS, json.dumps({"images": images, "bytes": position}))


def _resume_point(temp: Path) -> tuple[int, int]:
    """(images, bytes) of ``temp`` a killed build made durable, both files cut back to it; (0, 0)
    and empty files when there is nothing to go on from."""
    done = position = 0
    try:
        progress = json.loads((temp / PROGRESS).read_text(encoding="utf-8"))
        done, position = int(progress["images"]), int(progress["bytes"])
        shapes = _shapes_written(temp, done)
        whole = len(shapes) == done and (temp / PIXELS).stat().st_size >= position
        if not whole or int(_image_bytes(shapes).sum()) != position:
            done = position = 0
    except (OSError, ValueError, KeyError, TypeError):
        done = position = 0
    for file, length in ((PIXELS, position), (SHAPES_WRITTEN, 8 * done)):
        with open(temp / file, "ab") as out:
            out.truncate(length)
    return done, position


def _shapes_written(temp: Path, images: int = -1) -> np.ndarray:
    """The (height, width) of the first ``images`` written (-1: all), in the order written."""
    count = 2 * images if images >= 0 else -1
    return np.fromfile(temp / SHAPES_WRITTEN, np.int32, count=count).reshape(-1, 2)


def _image_bytes(shapes: np.ndarray) -> np.ndarray:
    """Bytes of the HxWx3 uint8 image of each (height, width)."""
    return 3 * shapes.astype(np.int64).prod(axis=1)


def _write_index(
    temp: Path,
    samples: Sequence[tuple[Path, int]],
    order: np.ndarray,
    name: str,
    dataset: Path,
    preprocess: PreprocessConfig,
) -> None:
    """index.npz and meta.json from the shapes written in ``order``; the build's own files go."""
    in_order = _shapes_written(temp)
    sizes = _image_bytes(in_order)
    positions, shapes = np.zeros(len(samples), np.int64), np.zeros((len(samples), 2), np.int32)
    positions[order], shapes[order] = np.cumsum(sizes) - sizes, in_order
    positions[shapes[:, 0] == 0] = 0  # unreadable: no pixels
    labels = np.asarray([label for _, label in samples], np.int64)
    with open(temp / INDEX, "wb") as out:
        np.savez(out, positions=positions, shapes=shapes, labels=labels)
        out.flush()
        os.fsync(out.fileno())
    skipped = [os.fsdecode(samples[i][0]) for i in np.flatnonzero(shapes[:, 0] == 0)]
    meta = CacheMeta(
        dataset=os.fsdecode(os.path.abspath(dataset)),
        split=name,
        images=len(samples) - len(skipped),
        bytes=int(sizes.sum()),
        preprocess=preprocess.to_dict(),
        skipped=skipped,
        list_digest=_digest_now(Path(dataset), name),
    )
    meta.write(temp)
    for leftover in (SHAPES_WRITTEN, PROGRESS):
        (temp / leftover).unlink(missing_ok=True)
    _fsync_dir(temp)


def _digest_now(dataset: Path, name: str) -> str | None:
    """The split list's digest at the end of a build, None when it no longer reads (edited
    meanwhile): raised, it deleted the build, whose pixels are no less good (the cache is then
    never said stale for its list, as one built before digests were kept)."""
    try:
        return list_digest(dataset, name)
    except (OSError, ValueError):
        return None


def open_cache(folder: Path, select: Sequence[int] | None = None) -> tuple[DecodedSplit, int]:
    """A complete cache as a DecodedSplit of memory-mapped images (``select``: only these
    entries of its split list), and the cache's size in bytes. DamagedCacheError when its files
    do not agree with each other."""
    meta, positions, shapes, labels = _checked_files(folder)
    entries = np.arange(len(labels)) if select is None else np.asarray(select, np.int64)
    kept = entries[shapes[entries, 0] > 0]
    pixels = None
    if meta.bytes:
        with open(folder / PIXELS, "rb") as file:
            pixels = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    images = MappedImages(pixels, positions[kept], shapes[kept])
    skipped = meta.skipped if select is None else _unreadable(meta, entries, shapes)
    split = DecodedSplit(images, labels[kept], skipped, decoded=0)
    if meta.bytes > _physical_memory() // 2:
        mean = meta.bytes / max(1, meta.images)
        split.block_images = max(1, round(BLOCK_BYTES / mean))
    # "last used" for `cache list`; a read-only cache is still usable.
    with contextlib.suppress(OSError):
        os.utime(folder / META)
    return split, meta.bytes


def _checked_files(folder: Path) -> tuple[CacheMeta, np.ndarray, np.ndarray, np.ndarray]:
    """meta.json and the index, checked against each other and the pixels file's size (a
    truncated file failed mid-epoch as "offset must be non-negative", in every later run)."""
    try:
        meta = CacheMeta.read(folder)
        with np.load(folder / INDEX) as index:
            positions, shapes, labels = index["positions"], index["shapes"], index["labels"]
        pixels_bytes = (folder / PIXELS).stat().st_size if meta.bytes else 0
        ends = positions + _image_bytes(shapes)
        agree = (
            len(positions) == len(shapes) == len(labels) == len(meta.skipped) + meta.images
            and pixels_bytes == meta.bytes
            and (ends.max(initial=0) <= pixels_bytes)
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise DamagedCacheError(f"the decoded cache {folder} is damaged ({err})") from None
    if not agree:
        raise DamagedCacheError(f"the decoded cache {folder} is damaged (its files disagree)")
    return meta, positions, shapes, labels


def _unreadable(meta: CacheMeta, entries: np.ndarray, shapes: np.ndarray) -> list[str]:
    """The unreadable files among ``entries`` (meta.json lists them in split order)."""
    unreadable = np.flatnonzero(shapes[:, 0] == 0)
    path_of = dict(zip(unreadable.tolist(), meta.skipped, strict=True))
    return [path_of[i] for i in entries.tolist() if i in path_of]


@dataclass(frozen=True)
class CacheMeta:
    """A cache's ``meta.json``: where its images come from, how many, their size in bytes, the
    preprocessing they were decoded with and the files that could not be decoded."""

    dataset: str  # the dataset folder, absolute
    split: str
    images: int  # decoded; the unreadable ones are ``skipped``
    bytes: int  # of pixels.u8
    preprocess: dict[str, Any]  # PreprocessConfig.to_dict()
    skipped: list[str]
    format: int = FORMAT
    list_digest: str | None = None  # of the split list it was built from (None: before this)

    def staleness(self) -> str | None:
        """Why no run will use this cache again (made by an older release, its dataset or its
        split list gone, or that list changed since: a reshuffle); None when one may. A file
        changed under an unchanged list makes a new key too, which a build of that split finds
        (``_stale_caches``)."""
        if self.format < FORMAT:  # its key is reckoned otherwise: no run of this release finds it
            return f"made by an older release (format {self.format})"
        if not Path(self.dataset).is_dir():
            return "its dataset is gone"
        try:
            digest = list_digest(Path(self.dataset), self.split)
        except (OSError, ValueError) as err:  # said as "gone", the user looked for a lost file
            return f"its split list cannot be read: {error_line(err)}"
        if digest is None:
            return f"{self.split}_list.txt is gone"
        if self.list_digest is not None and digest != self.list_digest:
            return f"{self.split}_list.txt changed since"
        return None

    @property
    def decoding(self) -> dict[str, Any]:
        """The preprocessing the pixels depend on (what the cache's key holds of it)."""
        return {k: v for k, v in self.preprocess.items() if k not in AFTER_DECODE}

    def write(self, folder: Path) -> None:
        with open(folder / META, "w", encoding="utf-8") as out:
            json.dump(dataclasses.asdict(self), out, indent=1, ensure_ascii=False)
            out.flush()
            os.fsync(out.fileno())

    @classmethod
    def read(cls, folder: Path) -> CacheMeta:
        """OSError, ValueError or TypeError when ``folder`` holds no meta.json of this layout."""
        fields = json.loads((folder / META).read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise TypeError(f"{folder / META} is not a JSON object")
        return cls(**fields)


@dataclass(frozen=True)
class CacheEntry:
    """One decoded cache, as ``python -m train cache list`` shows it."""

    folder: Path
    dataset: str
    split: str
    images: int
    bytes: int
    last_used: float  # seconds since the epoch
    stale: str | None = None  # why no run will use it again (CacheMeta.staleness)

    def line(self) -> str:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used))
        stale = f"  stale: {self.stale}" if self.stale else ""
        return (f"{self.folder.name}  {self.dataset}  {self.split:5s}  {self.images:>9,d} images"
                f"  {size_text(self.bytes):>9s}  last used {used}{stale}")  # fmt: skip


def list_caches(cache: CacheConfig) -> list[CacheEntry]:
    """The complete decoded caches under ``cache``'s folder, most recently used first."""
    entries = []
    for folder in sorted(cache.folder.glob("*")) if cache.folder.is_dir() else []:
        if not folder.is_dir() or folder.name.endswith(BUILDING):
            continue
        try:
            meta = CacheMeta.read(folder)
            used = (folder / META).stat().st_mtime
        except (OSError, ValueError, TypeError):
            continue  # not one of ours
        entries.append(CacheEntry(folder, meta.dataset, meta.split, meta.images, meta.bytes, used,
                                  meta.staleness()))  # fmt: skip
    return sorted(entries, key=lambda entry: -entry.last_used)


def clear_caches(cache: CacheConfig, stale_only: bool = False) -> tuple[int, int]:
    """Delete every decoded cache (complete, or left by a killed build) that no process is
    building, or (``stale_only``) the complete ones no run will use again; the pretrained
    weights and engine choices beside them stay. (count, bytes)."""
    count = freed = 0
    for entry in list_caches(cache):
        if stale_only and not entry.stale:
            continue
        with _locked(entry.folder, wait=False) as mine:
            if mine:
                shutil.rmtree(entry.folder, ignore_errors=True)
                count, freed = count + 1, freed + entry.bytes
    if stale_only:
        return count, freed
    for temp in unfinished_builds(cache):
        with _locked(temp.with_name(temp.name[: -len(BUILDING)]), wait=False) as mine:
            if mine:  # not being built right now: a killed build's leftovers
                freed += folder_bytes(temp)
                shutil.rmtree(temp, ignore_errors=True)
    # The empty <key>.lock files stay: deleting one a waiting process has open would let a
    # second process lock a new file of the same name and build the same cache.
    return count, freed


def unfinished_builds(cache: CacheConfig) -> list[Path]:
    """The folders of builds not finished: one running now, or a killed one's (a later run of the
    same split goes on from it; after the dataset changed, only ``cache clear`` removes it)."""
    return sorted(cache.folder.glob(f"*{BUILDING}")) if cache.folder.is_dir() else []


def folder_bytes(folder: Path) -> int:
    """The size of ``folder``'s files. ``cache list`` sizes builds that may be running: a file
    (a checkpoint's temp file, renamed) or the folder (renamed when complete) that vanishes
    meanwhile counts as nothing, not as an error."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for file in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size if file.is_file() else 0
    return total


def _stale_caches(folder: Path) -> Iterator[tuple[Path, str]]:
    """Other caches of the same dataset and split that no run will use again, each with why, for
    the log: of the same decode, made before the files changed (the decode compared without the
    fields of AFTER_DECODE, as the key leaves them out: a cache first built for another crop size
    is one of them); of any decode, made from a split list since changed (a reshuffle) or by
    an older release (the dataset need not have changed). A newer release's is left alone."""
    meta = CacheMeta.read(folder)
    for entry in list_caches(CacheConfig(root=folder.parent.parent)):
        if entry.folder == folder or (entry.dataset, entry.split) != (meta.dataset, meta.split):
            continue
        other = CacheMeta.read(entry.folder)
        if other.format > FORMAT:  # a newer release's, installed beside this one: its to judge
            continue
        if other.format < FORMAT:
            yield entry.folder, str(entry.stale)
        elif entry.stale or other.decoding == meta.decoding:
            yield entry.folder, "the cache of this split before the dataset changed"


@contextmanager
def _locked(folder: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``<folder>.lock`` for building or deleting that cache; yields
    whether it was taken (``wait=False`` gives up at once when another process holds it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the decoded cache folder {folder}: {err.strerror}; "
                         "pass --cache-dir on a writable disk") from None  # fmt: skip
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the decoded cache folder {folder} is not writable; "
                         "pass --cache-dir on a writable disk")  # fmt: skip


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a crash cannot undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _order_note(split: DecodedSplit) -> str:
    if not split.block_images:
        return ""
    return (f"; larger than half the RAM: read in shuffled blocks of {split.block_images} "
            "consecutive images")  # fmt: skip


def _no_room(name: str, estimate: int, where: Path, free: int, written: int = 0) -> str:
    need = size_text(estimate - written + DISK_MARGIN)
    more = f" more (a killed build's {size_text(written)} kept)" if written else ""
    return (f"the decoded {name} split needs ≈{need}{more} on {where} (with "
            f"{size_text(DISK_MARGIN)} to spare) but it has {size_text(free)} free: free space, "
            "pass --cache-dir on a larger disk, or lower --resize-short")  # fmt: skip


def size_text(count: float) -> str:
    """1.2 GB, 9.1 MB, 512 B: decimal units, as disk sizes are sold."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""
