"""Tests for train.demo_data: the synthetic shapes dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from train.demo_data import DEMO_CLASSES, write_demo_dataset
from train.split import split_dataset


def _read_all(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_writes_decodable_rgb_images_per_class(tmp_path: Path) -> None:
    classes = write_demo_dataset(tmp_path / "demo", images_per_class=5, image_size=64)

    assert classes == list(DEMO_CLASSES) and len(classes) == 4
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(DEMO_CLASSES)
    for name in classes:
        files = sorted((tmp_path / "demo" / name).iterdir())
        assert [f.name for f in files] == [f"{name}_{i:04d}.jpg" for i in range(5)]
        for f in files:
            with Image.open(f) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
                # The shape must stand out from the background, not vanish in noise.
                assert np.asarray(im).std() > 20


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_demo_dataset(tmp_path / name, images_per_class=3, image_size=48, seed=seed)

    a, b, c = (_read_all(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_overwrites_existing_files_and_can_be_split(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, images_per_class=4, image_size=32, seed=1)
    write_demo_dataset(tmp_path, images_per_class=4, image_size=32, seed=0)
    fresh = tmp_path / "fresh"
    write_demo_dataset(fresh, images_per_class=4, image_size=32, seed=0)
    assert {k: v for k, v in _read_all(tmp_path).items() if not k.startswith("fresh/")} == (
        _read_all(fresh)
    )

    result = split_dataset(fresh, val_ratio=0.25, test_ratio=0.25)
    assert result.labels == sorted(DEMO_CLASSES)
    assert result.counts == {"train": 8, "val": 4, "test": 4} and not result.skipped
