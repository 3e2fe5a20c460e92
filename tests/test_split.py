"""Tests for train.split: ImageNet folder -> PaddleX list files."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lcnet_runner.preprocess import is_image_file
from train.split import (
    FEW_MISSING,
    SPLITS,
    DatasetError,
    SplitResult,
    read_labels,
    read_split,
    split_dataset,
    unlisted_note,
)

UNICODE_CLASS = "ünïcødé 猫"


def _save(path: Path, fmt: str = "JPEG", size: int = 32) -> None:
    """An image of pixels drawn from its path: no two paths make the same bytes (split says
    byte-identical images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = hashlib.sha256(os.fsencode(path)).digest()
    pixels = hashlib.shake_256(seed).digest(3 * size * size)
    Image.frombytes("RGB", (size, size), pixels).save(path, format=fmt)


def _jpeg_bytes(size: int = 64) -> bytes:
    # Random pixels keep the compressed data large enough to cut in half meaningfully.
    buf = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """cat: 10 good + 2 broken, 'dog house': 7 good, unicode class: 4 good, plus clutter."""
    root = tmp_path / "data"
    for i in range(9):
        _save(root / "cat" / f"cat_{i}.jpg")
    _save(root / "cat" / "UPPER.JPG")
    (root / "cat" / "truncated.jpg").write_bytes(_jpeg_bytes()[:400])
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "cat" / ".hidden.jpg").write_bytes(b"not an image")
    (root / "cat" / "notes.txt").write_text("ignored")
    for i in range(6):
        _save(root / "dog house" / f"dog {i}.jpg")
    _save(root / "dog house" / "dog.png", fmt="PNG")
    for i in range(3):
        _save(root / UNICODE_CLASS / f"mañana {i}.jpg")
    _save(root / UNICODE_CLASS / "画像.jpeg")
    (root / "empty" / "nested").mkdir(parents=True)
    _save(root / ".hidden_class" / "a.jpg")
    _save(root / "stray.jpg")  # directly in the dataset root: ignored
    return root


def _labels_per_split(root: Path) -> dict[str, Counter[int]]:
    return {s: Counter(i for _, i in read_split(root, s)) for s in SPLITS}


def test_split_counts_labels_and_skipped(dataset: Path) -> None:
    result = split_dataset(dataset, val_ratio=0.2, test_ratio=0.1)

    assert result == SplitResult(
        labels=["cat", "dog house", UNICODE_CLASS],
        counts={"train": 15, "val": 4, "test": 2},
        skipped=["cat/truncated.jpg", "cat/zero.jpg"],
        empty=["empty"],  # said, and not a class
        ignored=["cat/notes.txt", "empty/nested"],  # said: a .tiff, or images a level too deep
        small=[f"{UNICODE_CLASS} (4)"],  # no test image
        class_sizes={"cat": 10, "dog house": 7, UNICODE_CLASS: 4},
    )
    # Per class (n -> val, test): 10 -> 2, 1;  7 -> 1, 1;  4 -> 1, 0.
    assert _labels_per_split(dataset) == {
        "train": Counter({0: 7, 1: 5, 2: 3}),
        "val": Counter({0: 2, 1: 1, 2: 1}),
        "test": Counter({0: 1, 1: 1}),
    }
    assert result.notes() == [
        "skipped 2 unreadable images: cat/truncated.jpg, cat/zero.jpg",
        "skipped 1 class folder with no readable image: empty",
        "ignored 2 files or folders in class folders that are not bmp/jpeg/jpg/png/webp images "
        "(images go straight into their class folder): cat/notes.txt, empty/nested",
        f"1 class has too few images for one in val or test: {UNICODE_CLASS} (4)",
    ]
    assert read_labels(dataset) == result.labels
    assert (dataset / "labels.txt").read_text(encoding="utf-8") == "cat\ndog house\nünïcødé 猫\n"


def test_lists_are_disjoint_and_cover_all_good_images(dataset: Path) -> None:
    split_dataset(dataset)
    splits = [read_split(dataset, s) for s in SPLITS]
    paths = [p for samples in splits for p, _ in samples]

    broken = {dataset / "cat" / "truncated.jpg", dataset / "cat" / "zero.jpg"}
    good = {p.absolute() for p in dataset.glob("[!.]*/*") if is_image_file(p)} - broken
    assert len(paths) == len(set(paths)) == len(good) == 21
    assert set(paths) == good


def test_read_split_round_trips_spaces_and_unicode(dataset: Path) -> None:
    split_dataset(dataset)
    labels = read_labels(dataset)
    samples = [s for split in SPLITS for s in read_split(dataset, split)]

    assert all(p.is_absolute() and p.is_file() for p, _ in samples)
    assert all(p.parent.name == labels[i] for p, i in samples)
    names = {p.name for p, _ in samples}
    assert {"dog 0.jpg", "mañana 0.jpg", "画像.jpeg", "UPPER.JPG", "dog.png"} <= names
    written = "".join((dataset / f"{s}_list.txt").read_text("utf-8") for s in SPLITS)
    assert "dog house/dog 0.jpg 1\n" in written


def test_class_names_are_kept_exactly_from_folder_to_model(tmp_path: Path) -> None:
    """One labels.txt format for datasets and models: edge spaces and U+2028 (a line break to
    str.splitlines()) are part of a name; Windows line ends and a BOM are not."""
    from lcnet_runner.artifact import read_labels_file, write_labels_file

    names = [" edge", "line\u2028sep", "tab\tname ", "红"]
    for name in names:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    split_dataset(tmp_path)
    assert read_labels(tmp_path) == sorted(names)
    assert read_labels_file(tmp_path / "labels.txt") == tuple(sorted(names))
    edited = tmp_path / "edited.txt"
    edited.write_bytes("\ufeffa b\r\n c\r\n\r\n".encode())
    assert read_labels_file(edited) == ("a b", " c")
    with pytest.raises(ValueError, match="single lines"):
        write_labels_file(tmp_path / "bad.txt", ["two\nlines"])


def _lists(dataset: Path) -> dict[str, str]:
    return {s: (dataset / f"{s}_list.txt").read_text("utf-8") for s in SPLITS}


def test_split_is_deterministic_per_seed(dataset: Path) -> None:
    def snapshot(seed: int) -> dict[str, str]:
        split_dataset(dataset, seed=seed, reshuffle=True)
        return _lists(dataset)

    first = snapshot(0)
    assert snapshot(0) == first
    second = snapshot(1)
    assert second != first
    split_dataset(dataset, seed=0)  # without reshuffle: the listed images keep their split
    assert _lists(dataset) == second


def test_a_second_split_keeps_every_listed_images_split(tmp_path: Path) -> None:
    """New images in one class: they are distributed, and no image changes split (one moved
    from test to train would score any model trained on it unfairly); the other classes' lists
    stay as they were."""
    for name in ("cat", "dog"):
        for i in range(20):
            _save(tmp_path / name / f"{i}.jpg")
    split_dataset(tmp_path)
    before = {split: dict(read_split(tmp_path, split)) for split in SPLITS}
    for i in range(20, 30):
        _save(tmp_path / "cat" / f"{i}.jpg")
    result = split_dataset(tmp_path)
    after = {split: dict(read_split(tmp_path, split)) for split in SPLITS}
    for split in SPLITS:
        assert before[split].keys() <= after[split].keys()
    assert result.counts == {"train": 35, "val": 10, "test": 5}  # cat 21:6:3, dog 14:4:2
    assert result.notes()[0].startswith("kept the split of 40 images already listed, 10 new")
    dog = {split: {p for p in after[split] if p.parent.name == "dog"} for split in SPLITS}
    assert dog == {split: {p for p in before[split] if p.parent.name == "dog"} for split in SPLITS}


def test_a_class_the_lists_keep_in_train_is_not_called_too_small(tmp_path: Path) -> None:
    """Every val and test line of one class moved into train: split said the class "has too few
    images for one in val or test" (it has 10), sending the user to collect more."""
    for name in ("cat", "dog"):
        for i in range(10):
            _save(tmp_path / name / f"{i}.jpg", size=8)
    split_dataset(tmp_path)
    lists = {split: (tmp_path / f"{split}_list.txt").read_text("utf-8").splitlines()
             for split in SPLITS}  # fmt: skip
    moved = [line for split in ("val", "test") for line in lists[split] if line.startswith("cat/")]
    (tmp_path / "train_list.txt").write_text("\n".join([*lists["train"], *moved, ""]), "utf-8")
    for split in ("val", "test"):
        kept = [line for line in lists[split] if not line.startswith("cat/")]
        (tmp_path / f"{split}_list.txt").write_text("".join(f"{line}\n" for line in kept))
    result = split_dataset(tmp_path)
    assert result.small == []
    assert (
        "1 class has no image in val or test because the existing lists keep all of its images "
        "in other splits (--reshuffle splits afresh): cat (10 in train)"
    ) in result.notes()
    assert result.counts == {"train": 17, "val": 2, "test": 1}  # the lists' split, kept
    assert split_dataset(tmp_path, reshuffle=True).notes() == []


# How hand-made or other tools' lists separate a path from its label (PaddleX 2 reads each).
LIST_STYLES = {
    "tab": lambda rel, index: f"{rel}\t{index}",
    "two spaces": lambda rel, index: f"{rel}  {index}",
    "trailing space": lambda rel, index: f"{rel} {index} ",
    "./ prefix": lambda rel, index: f"./{rel} {index}",
    "CRLF": lambda rel, index: f"{rel} {index}\r",
    "Windows": lambda rel, index: rel.replace("/", "\\") + f" {index}\r",  # PaddleX 2 there
}


@pytest.mark.parametrize("style", LIST_STYLES)
def test_lists_written_otherwise_read_alike_and_keep_their_split(tmp_path: Path, style) -> None:
    """split kept no image's split of such lists (it wrote new ones over them) and fit refused
    them or found every image missing; a class folder's leading space stays part of its name."""
    for name in ("cat", " edge"):
        for i in range(10):
            _save(tmp_path / name / f"{i}.jpg")
    split_dataset(tmp_path, seed=1)
    before = {split: read_split(tmp_path, split) for split in SPLITS}
    for split in SPLITS:
        lines = (tmp_path / f"{split}_list.txt").read_text("utf-8").splitlines()
        restyled = [LIST_STYLES[style](*line.rsplit(" ", 1)) for line in lines]
        (tmp_path / f"{split}_list.txt").write_text("\n".join(restyled) + "\n", "utf-8")
    assert {split: read_split(tmp_path, split) for split in SPLITS} == before
    assert split_dataset(tmp_path, seed=2).kept == 20
    assert {split: read_split(tmp_path, split) for split in SPLITS} == before


def test_a_list_line_split_cannot_read_is_refused_not_skipped(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        for i in range(5):
            _save(tmp_path / name / f"{i}.jpg")
    split_dataset(tmp_path)
    val = tmp_path / "val_list.txt"
    val.write_text(val.read_text("utf-8") + "dog/9.jpg dog\n", "utf-8")
    lists = _lists(tmp_path)
    with pytest.raises(DatasetError, match=r"val_list\.txt:3: expected .* \(--reshuffle splits"):
        split_dataset(tmp_path)
    assert _lists(tmp_path) == lists
    split_dataset(tmp_path, reshuffle=True)  # the way out the error names


def test_tiny_classes_keep_a_training_image(tmp_path: Path) -> None:
    _save(tmp_path / "one" / "a.jpg")
    for name in ("a.jpg", "b.jpg"):
        _save(tmp_path / "two" / name)

    # one: val=round(0.6)=1, test=0 -> val gives way.
    # two: val=round(1.2)=1, test=round(0.6)=1 -> test gives way first.
    result = split_dataset(tmp_path, val_ratio=0.6, test_ratio=0.3)

    assert result.counts == {"train": 2, "val": 1, "test": 0}
    assert _labels_per_split(tmp_path)["train"] == Counter({0: 1, 1: 1})
    assert _labels_per_split(tmp_path)["val"] == Counter({1: 1})


def test_zero_test_ratio_writes_empty_test_list(dataset: Path) -> None:
    result = split_dataset(dataset, val_ratio=0.2, test_ratio=0.0)

    assert result.counts["test"] == 0
    assert (dataset / "test_list.txt").read_text() == ""
    assert read_split(dataset, "test") == []


def test_is_image_file(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.webp", ".c.jpg", "d.txt"):
        (tmp_path / name).touch()
    (tmp_path / "dir.png").mkdir()

    found = {p.name for p in tmp_path.iterdir() if is_image_file(p)}
    assert found == {"a.JPG", "b.webp"}


@pytest.mark.parametrize(
    ("val_ratio", "test_ratio", "match"),
    [
        (-0.1, 0.1, r"val_ratio must be in \[0, 1\), got -0.1"),
        (1.0, 0.0, r"val_ratio must be in \[0, 1\)"),
        (0.2, 1.5, r"test_ratio must be in \[0, 1\)"),
        (0.6, 0.4, r"val_ratio \+ test_ratio must be < 1"),
    ],
)
def test_bad_ratios(dataset: Path, val_ratio: float, test_ratio: float, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        split_dataset(dataset, val_ratio=val_ratio, test_ratio=test_ratio)


def test_missing_or_non_directory_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset directory not found"):
        split_dataset(tmp_path / "nope")
    (tmp_path / "file").touch()
    with pytest.raises(DatasetError, match="not a directory"):
        split_dataset(tmp_path / "file")


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").touch()
    _save(tmp_path / "stray.jpg")
    with pytest.raises(DatasetError, match="no images found in"):
        split_dataset(tmp_path)


def test_a_folder_one_level_off_says_where_the_class_folders_are(tmp_path: Path) -> None:
    """A class folder given (its images straight in it), or the folder around the dataset:
    "no images found" alone left the user guessing."""
    for name in ("cat", "dog"):
        for i in range(3):
            _save(tmp_path / "wrap" / "pets" / name / f"{i}.jpg")
    with pytest.raises(DatasetError) as too_deep:
        split_dataset(tmp_path / "wrap" / "pets" / "cat")
    assert str(too_deep.value).endswith(
        "; its images are straight in it: if it is one class's folder, split the folder holding "
        f"the class folders (python -m train split {tmp_path / 'wrap' / 'pets'})"
    )
    with pytest.raises(DatasetError) as too_high:
        split_dataset(tmp_path / "wrap")
    assert str(too_high.value).endswith(
        "; 'pets' holds class folders of images: split it (python -m train split "
        f"{tmp_path / 'wrap' / 'pets'})"
    )


def test_a_broken_link_is_said_as_one(dataset: Path) -> None:
    """It was "ignored ... not bmp/jpeg/jpg/png/webp images", a name that is one."""
    (dataset / "cat" / "gone.jpg").symlink_to(dataset / "nothing.jpg")
    result = split_dataset(dataset)
    assert (result.broken, result.ignored) == (["cat/gone.jpg"], ["cat/notes.txt", "empty/nested"])
    assert "ignored 1 broken link (to nothing): cat/gone.jpg" in result.notes()


def test_no_readable_images(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "broken.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no readable images .*\(2 unreadable\)"):
        split_dataset(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "a.jpg")
    (tmp_path / "dog").mkdir()  # no images, so not a class
    with pytest.raises(DatasetError, match="needs at least 2 classes, found 1: 'cat'"):
        split_dataset(tmp_path)
    assert not (tmp_path / "train_list.txt").exists()


def test_read_split_missing_list(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"val_list\.txt not found"):
        read_split(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"labels\.txt not found"):
        read_labels(tmp_path)


def test_read_split_rejects_malformed_line(tmp_path: Path) -> None:
    (tmp_path / "train_list.txt").write_text("cat/a.jpg 0\ncat/b.jpg\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"train_list\.txt:2: expected"):
        read_split(tmp_path, "train")


def _save_as(root: Path, rel: bytes) -> None:
    """An image at ``rel``, bytes as Linux allows them in a name, in ``root``."""
    path = Path(os.fsdecode(bytes(root) + b"/" + rel))
    _save(path, size=8)


NOT_UTF8_FIX = ("rename it, or unzip the zip again naming the encoding it was made in (unzip -O "
                "GBK, or -O CP936, for Chinese names from Windows)")  # fmt: skip


@pytest.mark.parametrize(
    ("rel", "says"),
    [("红色".encode("gbk") + b"/0.jpg",
      f"1 class folder named in bytes that are not UTF-8, which no list file can hold: "
      f"'\\xba\\xecɫ'; {NOT_UTF8_FIX}"),
     (b"a/caf\xe9.jpg", f"1 image named in bytes that are not UTF-8, which no list file can "
                        f"hold: 'a/caf\\xe9.jpg'; {NOT_UTF8_FIX}"),
     (b"a/two\nlines.jpg", "1 image with a line break in the name, which no list file can hold: "
                           "'a/two\\nlines.jpg'; rename it"),
     (b"a\\b/0.jpg", "1 class folder with a backslash in the name, which list files read as a "
                     "folder separator (as Windows writes them): 'a\\b'; rename it")],
)  # fmt: skip
def test_a_name_no_list_can_hold_is_refused_before_any_list_is_written(
    tmp_path: Path, rel: bytes, says: str
) -> None:
    """A zip made on Windows and unpacked here names Chinese folders in GBK bytes (Linux allows
    any bytes but "/" in a name): skipped as unreadable, a whole class was dropped, split after
    split, and told to split again."""
    for name in ("a", "b"):
        for i in range(3):
            _save(tmp_path / name / f"{i}.jpg")
    _save_as(tmp_path, rel)
    with pytest.raises(DatasetError) as refused:
        split_dataset(tmp_path)
    assert str(refused.value) == says
    assert not (tmp_path / "train_list.txt").exists()


def test_fit_says_which_unlisted_images_no_list_can_hold(tmp_path: Path) -> None:
    for name in ("a", "b"):
        for i in range(3):
            _save(tmp_path / name / f"{i}.jpg")
    split_dataset(tmp_path)
    _save_as(tmp_path, "红色".encode("gbk") + b"/0.jpg")
    _save(tmp_path / "new\x1b[2K" / "0.jpg")
    assert unlisted_note(tmp_path).splitlines() == [
        f"1 image in {tmp_path} added since the split: new\\x1b[2K/0.jpg; class folders not in "
        f"labels.txt: new\\x1b[2K. Training uses the lists as they are; `python -m train split "
        f"{tmp_path}` adds them (listed images keep their split)",
        f"1 image in {tmp_path}, in no split list, named so that no list file can hold them (not "
        f"UTF-8, a line break or a backslash): \\xba\\xecɫ/0.jpg; `python -m train split "
        f"{tmp_path}` says how to rename them",
    ]


@pytest.mark.parametrize("name", ["labels.txt", "val_list.txt"])
def test_a_labels_file_or_list_not_in_utf8_is_named(tmp_path: Path, name: str) -> None:
    """Saved as GBK by a Windows editor: Python's own error named no file."""
    (tmp_path / "labels.txt").write_text("cat\ndog\n", encoding="utf-8")
    (tmp_path / "val_list.txt").write_text("cat/a.jpg 0\n", encoding="utf-8")
    (tmp_path / name).write_bytes(codecs.BOM_UTF8 + "cat/a.jpg 0\n中文/b.jpg 1\n".encode("gbk"))
    with pytest.raises(ValueError, match=rf"{name}:2: not UTF-8 text \(byte 0xd6\); re-save"):
        read_split(tmp_path, "val")


@pytest.mark.parametrize(
    ("index", "match"),
    [("2", "label index 2 is out of range"), ("7", "labels.txt has 2 classes"),
     ("²", "expected '<path> <label_index>'"), ("١", "expected '<path> <label_index>'")],
)  # fmt: skip
def test_read_split_rejects_a_label_index_out_of_range_or_not_ascii(
    tmp_path: Path, index: str, match: str
) -> None:
    """Checked where the lists are read: otherwise Paddle fails mid-training with an
    IndexError, or val/test miscount. int() takes other scripts' digits: only 0-9 count."""
    (tmp_path / "labels.txt").write_text("cat\ndog\n", encoding="utf-8")
    lines = f"cat/a.jpg 0\ndog/b.jpg 1\ndog/c.jpg {index}\n"
    (tmp_path / "val_list.txt").write_text(lines, encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"val_list\.txt:3: .*{re.escape(match)}"):
        read_split(tmp_path, "val")


@pytest.mark.parametrize(
    ("labels", "given_to"), [("dog house\ncat\n", "dog house"), ("bird\ncat\ndog house\n", "bird")]
)
def test_labels_changed_since_the_split_are_refused(
    tmp_path: Path, labels: str, given_to: str
) -> None:
    """Two lines of labels.txt swapped trained a model answering one class's name for the
    other's images (val and test top-1 1.0); a line put first was said as "no training image
    left for 1 class"."""
    for name in ("cat", "dog house"):
        for i in range(5):
            _save(tmp_path / name / f"{i}.jpg")
    split_dataset(tmp_path)
    (tmp_path / "labels.txt").write_text(labels, encoding="utf-8")
    with pytest.raises(DatasetError) as refused:
        read_split(tmp_path, "train")
    assert str(refused.value) == (
        f"{tmp_path / 'train_list.txt'}:1: an image of class folder 'cat' has label index 0, "
        f"which labels.txt gives to '{given_to}': labels.txt changed since the split; restore "
        f"it, or split again (python -m train split {tmp_path})"
    )


def test_lists_whose_folders_are_no_class_names_are_taken_as_they_are(tmp_path: Path) -> None:
    """PaddleX datasets need not keep each class in its own folder."""
    (tmp_path / "labels.txt").write_text("cat\ndog\n", encoding="utf-8")
    (tmp_path / "val_list.txt").write_text("images/1.jpg 1\nimages/2.jpg 0\n", encoding="utf-8")
    for name in ("1.jpg", "2.jpg"):
        _save(tmp_path / "images" / name)
    assert [index for _, index in read_split(tmp_path, "val")] == [1, 0]


def test_fit_says_which_images_no_list_names(dataset: Path, capsys) -> None:
    """Images added after the split (a new class folder too) are in no list, so training would
    leave them out in silence: fit says so where it reads the lists (once, on rank 0), and keeps
    the lists as they are."""
    from train.distributed import SINGLE, Rank
    from train.training import FitConfig, load_splits

    split_dataset(dataset)
    lists = {split: (dataset / f"{split}_list.txt").read_bytes() for split in SPLITS}
    config = FitConfig(ram_cache_mb=64)
    load_splits(dataset, config, SINGLE)
    err = capsys.readouterr().err  # unreadable then, and now: a split would not take them either
    assert "2 unreadable images in" in err and "cat/truncated.jpg, cat/zero.jpg (fix or" in err
    assert "python -m train split" not in err

    (dataset / "cat" / "truncated.jpg").unlink()
    (dataset / "cat" / "zero.jpg").unlink()
    assert unlisted_note(dataset) is None
    _save(dataset / "cat" / "new.jpg")
    for i in range(4):
        _save(dataset / "bird" / f"{i}.jpg")
    load_splits(dataset, config, Rank(1, 2))
    assert "added since the split" not in capsys.readouterr().err
    labels, _ = load_splits(dataset, config, SINGLE)
    err = capsys.readouterr().err
    assert "5 images in" in err and "bird/0.jpg, bird/1.jpg, bird/2.jpg and 2 more" in err
    assert "python -m train split" in err
    assert "class folders not in labels.txt: bird." in err
    assert "bird" not in labels
    assert {split: (dataset / f"{split}_list.txt").read_bytes() for split in SPLITS} == lists


def test_the_split_fit_advises_quotes_the_folder(tmp_path: Path) -> None:
    """`python -m train split ../ds/my photos (2024)/DATASET`, pasted into a shell, failed."""
    dataset = tmp_path / "my photos (2024)" / "DATASET"
    for name in ("a", "b"):
        for i in range(3):
            _save(dataset / name / f"{i}.jpg")
    split_dataset(dataset)
    _save(dataset / "a" / "new.jpg")
    assert f"`python -m train split '{dataset}'` adds them" in unlisted_note(dataset)


def test_read_split_names_one_dataset_one_way(dataset: Path, monkeypatch) -> None:
    """`../data` and its absolute path give the same file paths: one decoded cache, not two."""
    split_dataset(dataset)
    (dataset.parent / "elsewhere").mkdir()
    monkeypatch.chdir(dataset.parent / "elsewhere")
    assert read_split("../data", "train") == read_split(dataset, "train")
    assert all(".." not in path.parts for path, _ in read_split("../data", "train"))


def test_a_file_whose_pillow_plugin_fails_oddly_is_skipped(tmp_path: Path, monkeypatch) -> None:
    """Pillow lets a plugin's own exception through (NotImplementedError here); training's decode
    maps it to InvalidImageError and skips the file, and split, using that decode, skips it too
    (it aborted the whole split before)."""
    from PIL import ImageFile

    class Unfinished(ImageFile.ImageFile):
        format = "LCNETFAKE"

        def _open(self) -> None:
            raise NotImplementedError("this variant of the format is not supported")

    monkeypatch.setitem(Image.OPEN, "LCNETFAKE", (Unfinished, lambda prefix: prefix[:4] == b"FAKE"))
    monkeypatch.setattr(Image, "ID", ["LCNETFAKE", *Image.ID])
    for name in ("a", "b"):
        for i in range(3):
            _save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "a" / "odd.png").write_bytes(b"FAKE" + bytes(64))
    result = split_dataset(tmp_path)
    assert result.skipped == ["a/odd.png"]
    assert sum(result.counts.values()) == 6


def test_file_names_are_printed_with_their_control_characters_escaped(dataset: Path) -> None:
    """A name holding ESC[2K and ESC[G (or CR, which split refuses in a name) erased, on a
    terminal, the warning that named it."""
    (dataset / "cat" / "x\x1b[2K\x1b[Gall images OK.jpg").write_bytes(b"not an image")
    notes = "\n".join(split_dataset(dataset).notes())
    assert "cat/x\\x1b[2K\\x1b[Gall images OK.jpg" in notes and "\x1b" not in notes


def _two_classes(root: Path, per_class: int = 10) -> Path:
    for name in ("cat", "dog"):
        for i in range(per_class):
            _save(root / name / f"{i}.jpg", size=8)
    return root


def _rewrite_lists(root: Path, rewrite) -> None:
    for split in SPLITS:
        listed = root / f"{split}_list.txt"
        lines = listed.read_text("utf-8").splitlines()
        listed.write_text("".join(f"{rewrite(line)}\n" for line in lines), "utf-8")


@pytest.mark.parametrize(
    ("rewrite", "script"),
    [(lambda line: f"my flowers/{line}", "s#^my flowers/##"),
     (lambda line: ".\\my flowers\\" + line.replace("/", "\\"), "s#^\\.\\\\my flowers\\\\##")],
    ids=["slash", "windows"],
)  # fmt: skip
def test_lists_relative_to_the_folder_above_are_refused_with_the_fix(
    tmp_path: Path, rewrite, script: str
) -> None:
    """PaddleX users' lists written from the folder above (``flowers/daisy/1.jpg`` in
    ``flowers/``): split found none of the listed images and wrote new lists over them; fit said
    every image missing and "no training image left"."""
    data = _two_classes(tmp_path / "my flowers")
    split_dataset(data, seed=1)
    before = {split: read_split(data, split) for split in SPLITS}
    first = (data / "train_list.txt").read_text("utf-8").split(" ")[0]
    _rewrite_lists(data, rewrite)
    lists = _lists(data)
    with pytest.raises(DatasetError) as refused:
        split_dataset(data, seed=2)
    assert _lists(data) == lists
    paths = " ".join(f"'{data / f'{split}_list.txt'}'" for split in SPLITS)
    sed = f"sed -i '{script}' {paths}"
    assert str(refused.value) == (
        f"{data / 'train_list.txt'}:1: its paths start with 'my flowers/', the dataset folder's "
        f"own name ('my flowers/{first}'; 14 of 14 listed images are found only without it): "
        "paths in a list are relative to the folder holding it; drop it from every list, then "
        f"run again: {sed}"
    )
    with pytest.raises(DatasetError, match="its paths start with 'my flowers/'"):
        read_split(data, "val")  # fit's, evaluate's
    subprocess.run(shlex.split(sed), check=True)  # the fix, as said
    assert split_dataset(data, seed=2).kept == 20
    assert {split: read_split(data, split) for split in SPLITS} == before


def test_lists_whose_lines_start_differently_are_fixed_by_one_sed(tmp_path: Path) -> None:
    """Train's lines prefixed `my flowers/`, val's `./my flowers/`, one test line of three: the
    sed said fixed train's (and the test line) only, and the next run asked for another."""
    data = _two_classes(tmp_path / "my flowers")
    split_dataset(data, seed=1)
    before = {split: read_split(data, split) for split in SPLITS}
    prefixes = {
        "train": ["my flowers/"] * 14,
        "val": ["./my flowers/"] * 4,
        "test": ["my flowers/", ""],
    }
    for split, added in prefixes.items():
        listed = data / f"{split}_list.txt"
        lines = listed.read_text("utf-8").splitlines()
        listed.write_text(
            "".join(f"{start}{line}\n" for start, line in zip(added, lines, strict=False))
        )
    with pytest.raises(DatasetError) as refused:
        split_dataset(data, seed=2)
    sed = str(refused.value).split("then run again: ")[1]
    assert sed.startswith(r"sed -i 's#^\(\.[/\\]\)\{0,1\}my flowers[/\\]##' ")
    subprocess.run(shlex.split(sed), check=True)  # once
    assert split_dataset(data, seed=2).kept == 20
    assert {split: read_split(data, split) for split in SPLITS} == before


def test_lists_saved_with_a_bom_are_fixed_by_the_sed_said(tmp_path: Path) -> None:
    """Lists written from the folder above and saved by Notepad, a BOM before each first line:
    the sed said matched every line but those, and the next run asked for another."""
    data = _two_classes(tmp_path / "my flowers")
    split_dataset(data, seed=1)
    before = {split: read_split(data, split) for split in SPLITS}
    _rewrite_lists(data, lambda line: f"my flowers/{line}")
    for split in SPLITS:
        listed = data / f"{split}_list.txt"
        listed.write_bytes(b"\xef\xbb\xbf" + listed.read_bytes())
    with pytest.raises(DatasetError) as refused:
        split_dataset(data, seed=2)
    sed = str(refused.value).split("then run again: ")[1]
    assert sed.startswith(
        r"sed -i 's#^\(\xEF\xBB\xBF\)\{0,1\}\(\.[/\\]\)\{0,1\}my flowers[/\\]##' "
    )
    subprocess.run(shlex.split(sed), check=True)  # once
    assert split_dataset(data, seed=2).kept == 20
    assert {split: read_split(data, split) for split in SPLITS} == before


def test_a_few_lines_written_from_elsewhere_are_refused_not_dropped(tmp_path: Path) -> None:
    """One test line of two prefixed `my flowers/`: its image, there all along, was said "dropped
    ... no class folder holds now" and distributed again, maybe into train."""
    data = _two_classes(tmp_path / "my flowers")
    split_dataset(data, seed=1)
    test = data / "test_list.txt"
    first, second = test.read_text("utf-8").splitlines()
    test.write_text(f"{first}\nmy flowers/{second}\n", "utf-8")
    with pytest.raises(DatasetError) as refused:
        split_dataset(data, seed=2)
    paths = " ".join(shlex.quote(str(data / f"{split}_list.txt")) for split in SPLITS)
    assert str(refused.value) == (
        f"{test}:2: its paths start with 'my flowers/', the dataset folder's own name ('my "
        f"flowers/{second.split(' ')[0]}'; 1 of 2 listed images are found only without it): "
        "paths in a list are relative to the folder holding it; drop it from every list, then "
        f"run again: sed -i 's#^my flowers/##' {paths}"
    )


def test_lists_naming_images_not_there_are_never_written_over(tmp_path: Path) -> None:
    """Most listed images not in the folder: split wrote new lists over the user's, unsaid."""
    data = _two_classes(tmp_path)
    split_dataset(data)
    for path in data.glob("*/*.jpg"):
        path.rename(path.with_name(f"img_{path.name}"))
    lists = _lists(data)
    with pytest.raises(DatasetError) as refused:
        split_dataset(data)
    assert _lists(data) == lists
    first = lists["train"].split(" ")[0]
    assert str(refused.value) == (
        f"{data / 'train_list.txt'}:1: 14 of 14 listed images are not in {data} ('{first}'): "
        "paths in a list are relative to the folder holding it; fix them, or split afresh with "
        f"new lists over these (python -m train split {data} --reshuffle)"
    )
    assert split_dataset(data, reshuffle=True).counts == {"train": 14, "val": 4, "test": 2}


def test_listed_images_deleted_since_are_dropped_and_said(tmp_path: Path) -> None:
    data = _two_classes(tmp_path)
    split_dataset(data)
    for name in ("cat/0.jpg", "cat/1.jpg"):
        (data / name).unlink()
    result = split_dataset(data)
    assert "dropped 2 listed images no class folder holds now: cat/0.jpg, cat/1.jpg" in (
        result.notes()
    )
    assert result.kept == sum(result.counts.values()) == 18


def test_a_small_list_that_lost_its_images_is_not_refused(tmp_path: Path) -> None:
    """A val list of one image, deleted since: "1 of 1 listed images are not in" refused the
    whole dataset, in split and fit alike, where any other deleted image is dropped and said."""
    data = _two_classes(tmp_path)
    split_dataset(data)
    val = data / "val_list.txt"
    only = val.read_text("utf-8").splitlines()[0]
    val.write_text(f"{only}\n", "utf-8")
    (data / only.split(" ")[0]).unlink()
    assert [path.name for path, _ in read_split(data, "val")] == [Path(only.split(" ")[0]).name]
    result = split_dataset(data)  # fit's load_split skips the image and says so
    assert f"dropped 1 listed image no class folder holds now: {only.split(' ')[0]}" in (
        result.notes()
    )


def test_one_list_written_elsewhere_is_refused_though_the_others_are_right(tmp_path: Path) -> None:
    """A val list whose paths are from another machine (absolute, here) while train's are right:
    its images are in the folder under other names, so dropping them would split them again,
    most into training. More than a few gone, and most of the list: refused, not written over."""
    data = _two_classes(tmp_path, per_class=20)
    split_dataset(data)
    val = data / "val_list.txt"
    before = val.read_text("utf-8")
    assert len(before.splitlines()) > FEW_MISSING
    val.write_text("".join(f"/elsewhere/{line}\n" for line in before.splitlines()), "utf-8")
    with pytest.raises(DatasetError, match=r"val_list.txt:1: 8 of 8 listed images are not in"):
        split_dataset(data)
    assert val.read_text("utf-8").startswith("/elsewhere/")


def test_byte_identical_images_across_splits_or_classes_are_said(tmp_path: Path, capsys) -> None:
    """A copy of a test image in train overstates test accuracy; one image in two class folders
    is a labelling error. split said neither, nor did fit."""
    from train.distributed import SINGLE
    from train.training import FitConfig, load_splits

    data = _two_classes(tmp_path)
    split_dataset(data)
    tested = next(path for path, _ in read_split(data, "test") if path.parent.name == "cat")
    trained = next(path for path, _ in read_split(data, "train") if path.parent.name == "cat")
    shutil.copy(tested, data / "cat" / "copy.jpg")  # new: distributed to train
    shutil.copy(trained, data / "dog" / "from cat.jpg")
    shutil.copy(trained, data / "cat" / "again.jpg")  # the same class and split: no harm
    result = split_dataset(data)
    line = (
        f"2 images listed more than once, byte for byte, in two splits (which overstates val and "
        f"test accuracy) or two classes (a labelling error): cat/{trained.name} (train, cat) = "
        f"dog/from cat.jpg (train, dog) and 1 more copy, cat/copy.jpg (train) = "
        f"cat/{tested.name} (test); keep one copy"
    )
    assert result.notes()[-1] == line
    load_splits(data, FitConfig(ram_cache_mb=64), SINGLE)
    assert line in capsys.readouterr().err.splitlines()


def test_fit_splitting_a_folder_itself_compares_its_images_once(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """fit on a folder without lists split it, comparing every image's bytes for the
    duplicates, left the note out, then compared them all again as it read the lists."""
    import train.split
    from train.distributed import SINGLE
    from train.training import FitConfig, load_splits, prepare

    data = _two_classes(tmp_path / "data")
    shutil.copy(data / "cat" / "0.jpg", data / "dog" / "from cat.jpg")
    compared = []
    same_bytes = train.split._same_bytes
    # A spy, no stand-in: the comparison runs as ever, and is counted.
    monkeypatch.setattr(train.split, "_same_bytes", lambda paths: compared.append(paths) or
                        same_bytes(paths))  # fmt: skip
    config = FitConfig(pretrained="none", save_dir=str(tmp_path / "run"), ram_cache_mb=64)
    prepare(data, config)
    load_splits(data, config, SINGLE)
    assert len(compared) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "byte for byte" in line]
    assert len(said) == 1 and "dog/from cat.jpg" in said[0]


def test_files_of_one_size_and_head_are_told_apart_by_all_their_bytes(tmp_path: Path) -> None:
    from train.split import HEAD_BYTES, _same_bytes

    head = bytes(HEAD_BYTES)
    files = {"a": head + b"1", "b": head + b"2", "c": head + b"1", "d": b"other size"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    paths = [tmp_path / name for name in files] + [tmp_path / "a", tmp_path / "gone"]
    assert _same_bytes(paths) == [[0, 2, 4]]  # a, c and a listed again
