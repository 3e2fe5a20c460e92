"""Decoded splits on disk (``train.decoded_cache``): the same batches and metrics as in RAM, built
once and reused, never used half-built, invalidated by a changed file, shared by ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_fit, write_colour_dataset
from PIL import Image

from lcnet_runner.preprocess import PreprocessConfig
from train import decoded_cache
from train.cli import main
from train.data import (
    AugmentConfig,
    block_shuffled,
    decode_or_none,
    decode_split,
    train_batches,
)
from train.decoded_cache import (
    BUILDING,
    FORMAT,
    INDEX,
    META,
    PIXELS,
    PROGRESS,
    CacheConfig,
    CacheMeta,
    CacheSpaceError,
    MappedImages,
    list_caches,
    load_split,
)
from train.split import read_split, split_dataset

TINY = PreprocessConfig(crop_size=32, resize_short=36)  # tiny_fit's


def small_dataset(root: Path, per_class: int = 8) -> list[tuple[Path, int]]:
    split_dataset(write_colour_dataset(root, per_class=per_class), val_ratio=0, test_ratio=0)
    return read_split(root, "train")


def history(save_dir: Path) -> list[dict]:
    rows = json.loads((save_dir / "history.json").read_text())
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def test_memory_mapped_split_gives_the_same_images_and_batches(tmp_path: Path) -> None:
    samples = small_dataset(tmp_path / "data")
    broken = tmp_path / "data" / "green" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    samples.append((broken, 1))
    ram = decode_split(samples, TINY)
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    built = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    reused = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert isinstance(reused.images, MappedImages)
    assert (built.decoded, reused.decoded) == (len(samples), 0)  # the second load decodes nothing
    assert ram.skipped == built.skipped == reused.skipped == [str(broken)]  # kept in the index
    assert len(ram) == len(reused) == len(samples) - 1
    assert all(np.array_equal(a, b) for a, b in zip(ram.images, reused.images, strict=True))
    assert np.array_equal(ram.labels, reused.labels)
    aug = AugmentConfig(input_size=32)
    for (x, y), (u, v) in zip(
        train_batches(ram, aug, TINY, 5, np.random.default_rng(3)),
        train_batches(reused, aug, TINY, 5, np.random.default_rng(3)),
        strict=True,
    ):
        assert np.array_equal(x, u) and np.array_equal(y, v)
    [entry] = list_caches(disk)
    assert (entry.split, entry.images) == ("train", len(samples) - 1)


def test_a_changed_file_invalidates_the_cache(tmp_path: Path) -> None:
    samples = small_dataset(tmp_path / "data")
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    first = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    old_pixels = np.array(first.images[0])
    path = samples[0][0]
    Image.new("RGB", (48, 48), (255, 255, 0)).save(path)
    # now with another crop size, which acts after the decode: no part of the cache's key
    other_crop = PreprocessConfig(crop_size=28, resize_short=36)
    second = load_split(samples, other_crop, disk, name="train", dataset=tmp_path / "data")
    assert second.decoded == len(samples)  # rebuilt, not reused
    assert not np.array_equal(second.images[0], old_pixels)
    assert np.array_equal(second.images[0], decode_split([samples[0]], TINY).images[0])
    # The stale cache of this split is gone; a touch alone (same bytes, new mtime) also rebuilds.
    assert len(list_caches(disk)) == 1
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data").decoded > 0


def test_a_file_replaced_with_its_size_and_mtime_kept_invalidates_the_cache(
    tmp_path: Path,
) -> None:
    """`cp -p`, `tar x`, `rsync -t`: same size, same mtime, other pixels (a BMP's size is its
    dimensions'), and the old pixels were trained on."""
    samples = small_dataset(tmp_path / "data")
    path = samples[0][0].with_suffix(".bmp")
    Image.new("RGB", (48, 40), (255, 0, 0)).save(path)
    samples[0] = (path, samples[0][1])
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    before = path.stat()
    Image.new("RGB", (48, 40), (0, 0, 255)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    again = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert again.decoded == len(samples)
    assert np.array_equal(again.images[0], decode_split([samples[0]], TINY).images[0])


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: os.truncate(folder / PIXELS, 1000),
        lambda folder: os.truncate(folder / PIXELS, 0),
        lambda folder: (folder / INDEX).write_bytes(b"not a zip"),
        lambda folder: (folder / META).write_text("{"),
    ],
    ids=["truncated", "emptied", "index", "meta"],
)
def test_a_damaged_cache_is_decoded_again(tmp_path: Path, damage, capsys) -> None:
    """A cache whose files no longer agree (a disk fault, a bad copy) failed every later run
    mid-epoch ("cannot mmap an empty file") until `cache clear`: it is made again instead."""
    samples = small_dataset(tmp_path / "data")
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    first = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    expected = [np.array(image) for image in first.images]
    [entry] = list_caches(disk)
    damage(entry.folder)
    again = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert again.decoded == len(samples)
    assert all(np.array_equal(a, b) for a, b in zip(expected, again.images, strict=True))
    assert "is damaged" in capsys.readouterr().err
    reused = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert reused.decoded == 0


def test_a_rank_waiting_for_a_cache_nobody_builds_says_so(tmp_path: Path) -> None:
    """A file changed between two ranks' looks at the dataset gives them two keys: the builder
    made its own and the other rank waited, silently, for ever."""
    from train.split import DatasetError

    folder = CacheConfig(tmp_path / "cache").folder / "key-that-nobody-builds"
    folder.parent.mkdir(parents=True)
    with pytest.raises(DatasetError, match="did the dataset change while the training processes"):
        decoded_cache._waited(folder, "train", wait_s=1.0)


def test_a_cache_the_disk_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    """A PNG announcing a 30,000 × 1 image, listed 200,000 times: resized to a short side of 36
    each would take 117 MB (no sliver: under the 40 MP decode_or_none skips), the split ~23 TB,
    which no test disk has; nothing is decoded or written."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    png = tmp_path / "wide.png"
    header = struct.pack(">IIBBBBB", 30_000, 1, 8, 2, 0, 0, 0)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")
                    + chunk(b"IEND", b""))  # fmt: skip
    cache = CacheConfig(tmp_path / "cache", ram_mb=0)
    with pytest.raises(CacheSpaceError, match="free space, pass --cache-dir on a larger disk"):
        load_split([(png, 0)] * 200_000, TINY, cache, name="train", dataset=tmp_path)
    assert [p.suffix for p in cache.folder.iterdir()] == [".lock"]


def test_a_sliver_the_decode_skips_is_left_out_of_the_size_estimate(tmp_path: Path, capsys) -> None:
    """A 1×200,000 PNG (600 kB decoded, 9 kB on disk) resized to a short side of 36 would be
    36×7,200,000: decode_or_none skips it. Counted in the estimate, it made a split of a few
    hundred kB look like ~200 MB: sent to a disk cache, or refused for lack of room."""
    samples = small_dataset(tmp_path / "data")
    sliver = tmp_path / "data" / "green" / "sliver.png"
    Image.new("RGB", (1, 200_000)).save(sliver)
    with_sliver = [*samples, (sliver, 1)]
    assert decode_or_none(sliver, TINY) is None
    estimate = decoded_cache.estimate_bytes(with_sliver, TINY.resize_short)
    assert estimate == pytest.approx(
        decoded_cache.estimate_bytes(samples, TINY.resize_short) * len(with_sliver) / len(samples)
    )
    split = load_split(with_sliver, TINY, CacheConfig(tmp_path / "cache"), name="train",
                       dataset=tmp_path / "data")  # fmt: skip
    assert isinstance(split.images, list) and split.skipped == [str(sliver)]
    assert "decoded → kept in RAM" in capsys.readouterr().err


def test_block_shuffled_order_reads_blocks_sequentially() -> None:
    positions = np.random.default_rng(0).permutation(100) * 1000  # where each image sits on disk
    order = block_shuffled(positions, 8, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(100))
    # Block b holds the images at the 8 consecutive positions 8b..8b+7 (the last one 4): the
    # order visits 13 blocks one after the other, each as one run.
    blocks = positions[order] // 1000 // 8
    assert np.count_nonzero(np.diff(blocks)) == 12 and len(set(blocks.tolist())) == 13
    assert not np.array_equal(blocks, np.sort(blocks))  # the blocks themselves are shuffled
    assert not np.array_equal(order, block_shuffled(positions, 8, np.random.default_rng(2)))


@pytest.mark.slow  # starts a real fit (killed while it builds)
def test_a_killed_build_is_never_used_and_goes_on_from_its_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(300):
            pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    split_dataset(root, val_ratio=0, test_ratio=0)
    cache = tmp_path / "cache"
    args = ["--input-size", "32", "--resize-short", "256", "--pretrained", "none",
            "--cache-dir", str(cache), "--ram-cache-mb", "0",
            "--save-dir", str(tmp_path)]  # fmt: skip
    command = [sys.executable, "-m", "train", "fit", str(root), *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # 600 decoded images of 341×256 take 157 MB: a checkpoint every 64 MiB
        deadline = time.monotonic() + 120
        progress = None
        while time.monotonic() < deadline and process.poll() is None:
            progress = next((cache / "decoded").glob(f"*{BUILDING}/{PROGRESS}"), None)
            if progress:
                break
            time.sleep(0.005)
        process.kill()  # SIGKILL mid-build: no cleanup runs
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -9 and progress is not None, process.stderr.read().decode()
    assert list_caches(CacheConfig(cache)) == []  # the half-written cache is not a cache
    done = json.loads(progress.read_text())["images"]
    samples = read_split(root, "train")
    config = PreprocessConfig(32, 256)
    split = load_split(samples, config, CacheConfig(cache, ram_mb=0), name="train", dataset=root)
    assert 0 < split.decoded == len(samples) - done and len(split) == 600
    assert not list((cache / "decoded").glob(f"*{BUILDING}"))
    in_ram = decode_split(samples, config, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(split.images, in_ram.images, strict=True))


def interrupt_a_build(
    samples: list, disk: CacheConfig, dataset: Path, after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Build ``samples``' cache and stop it with Ctrl+C after ``after`` images, with a checkpoint
    after every image (what a killed build keeps)."""
    monkeypatch.setattr(decoded_cache, "CHECKPOINT_BYTES", 1)
    decode_stream = decoded_cache.decode_stream

    def interrupted(paths, config, workers):
        for n, image in enumerate(decode_stream(paths, config, workers)):
            if n == after:
                raise KeyboardInterrupt
            yield image

    monkeypatch.setattr(decoded_cache, "decode_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_split(samples, TINY, disk, name="train", dataset=dataset)
    monkeypatch.setattr(decoded_cache, "decode_stream", decode_stream)


def test_an_interrupted_build_goes_on_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C keeps the build; the next load decodes only what was not yet durable, and the
    cache is the one an uninterrupted build makes."""
    samples = small_dataset(tmp_path / "data")
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    interrupt_a_build(samples, disk, tmp_path / "data", after=5, monkeypatch=monkeypatch)
    assert list_caches(disk) == []
    split = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert split.decoded == len(samples) - 5 and len(split) == len(samples)
    in_ram = decode_split(samples, TINY, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(split.images, in_ram.images, strict=True))
    (built,) = list_caches(disk)
    assert sorted(p.name for p in built.folder.iterdir()) == sorted([INDEX, META, PIXELS])


def test_a_killed_build_goes_on_where_the_disk_holds_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build the disk had room for, killed: its kept files already took part of that room.
    The next run needs only the rest, not the whole estimate on top of them."""
    samples = small_dataset(tmp_path / "data")
    disk = CacheConfig(tmp_path / "cache", ram_mb=0)
    half = len(samples) // 2
    interrupt_a_build(samples, disk, tmp_path / "data", after=half, monkeypatch=monkeypatch)
    (kept,) = decoded_cache.unfinished_builds(disk)
    written = decoded_cache.folder_bytes(kept)
    # The disk as the killed build left it: room for what is left, not for the whole split.
    needed = decoded_cache.estimate_bytes(samples, TINY.resize_short) + decoded_cache.DISK_MARGIN
    usage = shutil.disk_usage(tmp_path)._replace(free=needed - written // 2)
    monkeypatch.setattr(decoded_cache.shutil, "disk_usage", lambda _: usage._replace(free=0))
    with pytest.raises(
        CacheSpaceError, match=r"needs ≈\S+ MB more \(a killed build's \S+ kB kept\)"
    ):
        load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    monkeypatch.setattr(decoded_cache.shutil, "disk_usage", lambda _: usage)
    split = load_split(samples, TINY, disk, name="train", dataset=tmp_path / "data")
    assert split.decoded == len(samples) - half and len(split) == len(samples)


def test_cache_cli_lists_and_clears_only_decoded_caches(tmp_path: Path, capsys) -> None:
    samples = small_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    load_split(samples, TINY, CacheConfig(cache, ram_mb=0), name="train", dataset=tmp_path / "data")
    weights = cache / "PPLCNet_x0_25_pretrained.pdparams"
    weights.write_bytes(b"weights")
    (cache / "engine-choice").mkdir()
    killed = cache / decoded_cache.DECODED_DIR / f"0123abcd{BUILDING}"  # a killed build's
    killed.mkdir()
    (killed / PIXELS).write_bytes(b"\0" * 3000)
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and f"{tmp_path / 'data'}  train" in listed[0]
    assert f"{len(samples)} images" in listed[0] and listed[2].startswith("1 decoded caches")
    assert listed[1].startswith(f"{killed.name}  unfinished build") and "3.0 kB" in listed[1]
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 decoded caches")
    assert list_caches(CacheConfig(cache)) == [] and weights.is_file() and not killed.exists()
    assert (cache / "engine-choice").is_dir()
    assert main(["fit", str(tmp_path / "data"), "--ram-cache-mb", "-1"]) == 2
    assert capsys.readouterr().err == "error: --ram-cache-mb must be a number >= 0, got -1.0\n"


def test_caches_no_run_will_use_again_are_marked_and_pruned(tmp_path: Path, capsys) -> None:
    """Only a cache of the same split and decode was removed when its files changed: one of
    another resize-short, of a split list since reshuffled, of a deleted dataset stayed for
    good, unmarked, and only `cache clear` (all of them) removed it."""
    samples = small_dataset(tmp_path / "data")
    cache = CacheConfig(tmp_path / "cache", ram_mb=0)
    other_decode = PreprocessConfig(crop_size=32, resize_short=40)
    for config in (TINY, other_decode):
        load_split(samples, config, cache, name="train", dataset=tmp_path / "data")
    gone = small_dataset(tmp_path / "gone")
    load_split(gone, TINY, cache, name="train", dataset=tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    assert sorted(entry.stale or "" for entry in list_caches(cache)) == [
        "",
        "",
        "its dataset is gone",
    ]
    train_list = tmp_path / "data" / "train_list.txt"
    train_list.write_bytes(train_list.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    assert [entry.stale for entry in list_caches(cache)].count(None) == 2  # the same entries
    train_list.write_text("".join(train_list.read_text().splitlines(True)[1:]))  # one image out
    stale = {entry.folder: entry.stale for entry in list_caches(cache) if entry.stale}
    assert sorted(stale.values()) == ["its dataset is gone", *["train_list.txt changed since"] * 2]
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache.root)]) == 0
    assert capsys.readouterr().out.count("  stale: ") == 3
    # a build of the changed split removes its stale caches, whatever their decode
    load_split(read_split(tmp_path / "data", "train"), TINY, cache, name="train",
               dataset=tmp_path / "data")  # fmt: skip
    assert [entry.stale for entry in list_caches(cache)] == [None, "its dataset is gone"]
    assert main(["cache", "clear", "--stale", "--cache-dir", str(cache.root)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 stale decoded caches")
    [kept] = list_caches(cache)
    assert (kept.dataset, kept.stale) == (str(tmp_path / "data"), None)


def test_a_cache_of_another_release_is_stale_not_of_a_changed_dataset(
    tmp_path: Path, capsys
) -> None:
    """A release that reckons keys otherwise never finds an older one's caches: they were listed
    as reusable, kept by `cache clear --stale`, then removed by the next build as made "before
    the dataset changed", which it had not."""
    samples = small_dataset(tmp_path / "data")
    cache = CacheConfig(tmp_path / "cache", ram_mb=0)
    load_split(samples, TINY, cache, name="train", dataset=tmp_path / "data")
    [current] = list_caches(cache)

    def made_by(release_format: int) -> Path:
        old = shutil.copytree(current.folder, current.folder.with_name(f"{release_format:024x}"))
        dataclasses.replace(CacheMeta.read(old), format=release_format).write(old)
        return old

    older, newer = made_by(FORMAT - 1), made_by(FORMAT + 1)
    stale = {entry.folder: entry.stale for entry in list_caches(cache)}
    # A newer release's, installed beside this one (the cache folder is shared), is its own.
    assert stale == {current.folder: None, newer: None,
                     older: f"made by an older release (format {FORMAT - 1})"}  # fmt: skip
    capsys.readouterr()
    assert main(["cache", "clear", "--stale", "--cache-dir", str(cache.root)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 stale decoded caches")
    assert {entry.folder for entry in list_caches(cache)} == {current.folder, newer}
    older = made_by(FORMAT - 1)
    shutil.rmtree(current.folder)  # so that the next load builds, and removes what is stale
    load_split(samples, TINY, cache, name="train", dataset=tmp_path / "data")
    said = capsys.readouterr().err
    assert f"train: removed {older.name}, made by an older release (format {FORMAT - 1})\n" in said
    assert "before the dataset changed" not in said and newer.is_dir()


def test_cache_list_while_a_build_finishes(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build renames its folder when complete: found unfinished, gone when sized, it is no
    error of `cache list` (this exited 2 with the folder's "No such file or directory")."""
    cache = tmp_path / "cache"
    (cache / decoded_cache.DECODED_DIR).mkdir(parents=True)
    finished = cache / decoded_cache.DECODED_DIR / f"0123abcd{BUILDING}"
    monkeypatch.setattr(decoded_cache, "unfinished_builds", lambda _: [finished])
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith(f"{finished.name}  unfinished build")


def test_disk_path_trains_like_ram_and_is_reused(colour_dataset: Path, tmp_path: Path) -> None:
    """Same seed ⇒ the same metrics in RAM and from disk; then a second fit with other
    hyper-parameters and `evaluate` reuse the caches without decoding."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    base = [*tiny_fit(epochs=2), *cache]
    ram = run_cli("train", "fit", str(colour_dataset), *base, "--save-dir", str(tmp_path / "a"))
    disk = run_cli("train", "fit", str(colour_dataset), *base, "--ram-cache-mb", "0",
                   "--save-dir", str(tmp_path / "b"))  # fmt: skip
    for name in ("train", "val", "test"):
        assert f"{name}: " in ram.stderr and "→ kept in RAM" in ram.stderr
        assert f"{name}: " in disk.stderr
    assert disk.stderr.count("(built in") == 3 and "kept in RAM" not in disk.stderr
    assert history(tmp_path / "a") == history(tmp_path / "b")
    one, two = (json.loads(r.stdout.splitlines()[-1]) for r in (ram, disk))
    assert (one["val_top1"], one["test_top1"]) == (two["val_top1"], two["test_top1"])

    other = [*tiny_fit(epochs=1), *cache, "--ram-cache-mb", "0", "--lr", "0.05", "--seed", "1"]
    again = run_cli("train", "fit", str(colour_dataset), *other, "--save-dir", str(tmp_path / "c"))
    assert again.stderr.count("(reused)") == 3 and "building" not in again.stderr
    evaluated = run_cli("train", "evaluate", str(tmp_path / "b" / "inference"), "--dataset",
                        str(colour_dataset), *cache, "--ram-cache-mb", "0", "--confusion-matrix",
                        str(tmp_path / "cm.png"))  # fmt: skip
    assert "test: 18 images" in evaluated.stderr and "(reused)" in evaluated.stderr


def test_two_ranks_share_one_cache(colour_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [*tiny_fit(epochs=1), "--batch-size", "16", "--procs", "2", "--cache-dir", str(cache),
            "--ram-cache-mb", "0", "--save-dir", str(tmp_path / "run")]  # fmt: skip
    result = run_cli("train", "fit", str(colour_dataset), *args)
    assert result.stderr.count("(built in") == 3  # rank 0 built train, val and test once
    assert sorted(entry.split for entry in list_caches(CacheConfig(cache))) == [
        "test", "train", "val"
    ]  # fmt: skip
    # Rank 1 waited for rank 0's train cache and read its own half of it.
    rank1 = (tmp_path / "run" / "logs" / "workerlog.1").read_text()
    assert "rank 1/2: 63 training images, 0 decoded by this rank" in rank1


def test_a_cache_whose_list_does_not_read_is_said_so_not_gone(tmp_path: Path, capsys) -> None:
    """`cache list` called it "train_list.txt is gone" while the file was there with a line it
    could not read: the user looked for a lost file."""
    samples = small_dataset(tmp_path / "data")
    cache = CacheConfig(tmp_path / "cache", ram_mb=0)
    load_split(samples, TINY, cache, name="train", dataset=tmp_path / "data")
    train_list = tmp_path / "data" / "train_list.txt"
    train_list.write_text(train_list.read_text("utf-8") + "green/0.jpg green\n", "utf-8")
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(
        f"  stale: its split list cannot be read: {train_list}:25: expected '<path> "
        "<label_index>', got 'green/0.jpg green'"
    )
    train_list.unlink()
    assert [entry.stale for entry in list_caches(cache)] == ["train_list.txt is gone"]
