"""Split an ImageNet-style folder into PaddleX train/val/test list files.

Replaces PaddleX 2's ``paddlex --split_dataset --format ImageNet``: given
``DATASET/<class>/<image>``, writes ``labels.txt`` and ``{train,val,test}_list.txt``
(lines ``class/file.jpg <label_index>``) into ``DATASET``. Unreadable images are left
out and reported instead of breaking training later. Splitting a folder again keeps the split of
every image already listed and distributes only new ones, so no image a model was evaluated on
moves into training; ``reshuffle`` splits afresh.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lcnet_runner.artifact import (
    LABELS_FILE,
    read_labels_file,
    read_lines,
    write_labels_file,
    write_text_atomic,
)
from lcnet_runner.preprocess import IMAGE_EXTENSIONS, InvalidImageError, is_image_file, load_pixels

SPLITS = ("train", "val", "test")
# A list this many of whose images are gone or fewer is read without them, even when they are
# most of it (a small val list whose images were deleted): more is a list written elsewhere.
FEW_MISSING = 5
BOM = "\ufeff"  # what a list saved by Windows' Notepad starts with (mid-list: joined by cat)
IMBALANCE = 10  # the largest class with this many times the images of the smallest is said


class DatasetError(ValueError):
    """A dataset problem the user must fix; message is one readable line."""


@dataclass(frozen=True)
class SplitResult:
    labels: list[str]  # sorted class names
    counts: dict[str, int]  # {"train": n, "val": n, "test": n}
    skipped: list[str]  # relative paths of unreadable images, sorted
    empty: list[str] = field(default_factory=list)  # class folders without a readable image
    kept: int = 0  # images whose split an earlier split's lists gave
    ignored: list[str] = field(default_factory=list)  # other files and sub-folders of classes
    broken: list[str] = field(default_factory=list)  # links in class folders to nothing
    small: list[str] = field(default_factory=list)  # classes too small for a val or test image
    # classes large enough for val and test whose images the lists kept all in other splits
    held_back: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # listed before, in no class folder now
    duplicated: list[str] = field(default_factory=list)  # same bytes in two splits or classes
    class_sizes: dict[str, int] = field(default_factory=dict)  # readable images of each class

    def notes(self) -> list[str]:
        """What was kept and left out, as lines for the user (``split`` prints them, ``fit``
        logs them)."""
        lines = []
        if self.kept:
            new = sum(self.counts.values()) - self.kept
            lines.append(f"kept the split of {self.kept} images already listed, {new} new "
                         "distributed (--reshuffle splits afresh)")  # fmt: skip
        exts = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        small_verb = "has" if len(self.small) == 1 else "have"
        held_verb = "has" if len(self.held_back) == 1 else "have"
        left_out = {
            f"skipped {counted(self.skipped, 'unreadable image')}": self.skipped,
            f"skipped {counted(self.empty, 'class folder')} with no readable image": self.empty,
            f"ignored {counted(self.ignored, 'file or folder', 'files or folders')} in class "
            f"folders that are not {exts} images (images go straight into their class folder)":
                self.ignored,
            f"ignored {counted(self.broken, 'broken link')} (to nothing)": self.broken,
            f"{counted(self.small, 'class', 'classes')} {small_verb} too few images for one in "
            "val or test": self.small,
            f"{counted(self.held_back, 'class', 'classes')} {held_verb} no image in val or test "
            "because the existing lists keep all of its images in other splits (--reshuffle "
            "splits afresh)": self.held_back,
            f"dropped {counted(self.dropped, 'listed image')} no class folder holds now":
                self.dropped,
        }  # fmt: skip
        lines += [f"{what}: {some(names)}" for what, names in left_out.items() if names]
        said = [self.imbalance(), duplicates_line(self.duplicated)]
        return lines + [line for line in said if line]

    def imbalance(self) -> str | None:
        """The line saying the largest class has IMBALANCE times the images of the smallest or
        more, None when it has not."""
        if not self.class_sizes:
            return None
        (large, most), (small, least) = (
            pick(self.class_sizes.items(), key=lambda item: item[1]) for pick in (max, min)
        )
        if most < IMBALANCE * least:
            return None
        return (
            f"classes out of balance: {_readable_name(large)} has {most} images, "
            f"{most / least:.0f}× the {least} of {_readable_name(small)}; top-1 can hide how the "
            "small classes fare (evaluate's per_class shows each)"
        )


def counted(items: Sequence[object], one: str, many: str | None = None) -> str:
    """``3 images``, ``1 image``: how many ``items`` there are, named in the right number."""
    return f"{len(items)} {one if len(items) == 1 else many or one + 's'}"


def some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def split_list(dataset_dir: str | Path, split: str) -> Path:
    """Where a split's list lives: ``DATASET/{split}_list.txt`` (PaddleX's name)."""
    return Path(dataset_dir) / f"{split}_list.txt"


def split_dataset(
    dataset_dir: str | Path,
    val_ratio: float = 0.2,
    test_ratio: float = 0.1,
    seed: int = 0,
    reshuffle: bool = False,
    find_duplicates: bool = True,
) -> SplitResult:
    """Verify every image, split each class by the ratios and write the list files. Images the
    folder's lists already name keep their split unless ``reshuffle``. ``find_duplicates=False``
    leaves ``duplicated`` empty: ``fit`` finds them as it reads the lists, on every run."""
    _check_ratios(val_ratio, test_ratio)
    root = _check_dir(Path(dataset_dir))
    previous = {} if reshuffle else _listed_splits(root)
    good, skipped = _readable_images(root)
    # Classes are defined by readable images, so a class whose files are all broken
    # cannot end up as a label with no samples.
    labels = sorted(good)
    if not labels:
        raise DatasetError(f"no readable images in {root} ({len(skipped)} unreadable)")
    if len(labels) == 1:
        raise DatasetError(f"needs at least 2 classes, found 1: {labels[0]!r}")

    rng = random.Random(seed)
    lists: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    small, held_back = [], []
    for index, label in enumerate(labels):
        files = sorted(good[label])  # sorted first so the shuffle is platform-independent
        split_of = _assign(files, previous.get(label, {}), rng, val_ratio, test_ratio)
        for f, split in split_of.items():
            lists[split].append((f, index))
        name = _readable_name(label)
        if (why := _why_short(split_of, val_ratio, test_ratio)) == TOO_SMALL:
            small.append(f"{name} ({len(files)})")
        elif why == HELD_BACK:
            held_back.append(f"{name} ({_per_split(split_of)})")

    for split, entries in lists.items():
        write_text_atomic(split_list(root, split), "".join(f"{f} {i}\n" for f, i in entries))
    write_labels_file(root / LABELS_FILE, labels)

    return SplitResult(
        labels=labels,
        counts={split: len(entries) for split, entries in lists.items()},
        skipped=sorted(skipped),
        # Said, not refused: a folder made for a class still to be collected is common.
        empty=[_readable_name(d.name) for d in _class_dirs(root) if d.name not in good],
        kept=sum(rel in previous.get(label, {}) for label in labels for rel in good[label]),
        ignored=_ignored(root),
        broken=_broken_links(root),
        small=small,
        held_back=held_back,
        dropped=_dropped(previous, good, skipped),
        duplicated=duplicated(root, labels, _listed_paths(root, lists)) if find_duplicates else [],
        class_sizes={label: len(good[label]) for label in labels},
    )


# Why a class has no image in val or test although its ratio asks for one (``_why_short``).
TOO_SMALL, HELD_BACK = "too small", "held back by the lists"


def _why_short(split_of: dict[str, str], val_ratio: float, test_ratio: float) -> str | None:
    """Why a class (``split_of``: its images' splits) has no image in val or test although the
    ratio asks for some: TOO_SMALL when its size gives that split none (the remedy: more images),
    HELD_BACK when it does but the earlier lists keep its images in the other splits (the remedy:
    --reshuffle); None when it has one in each."""
    n_val, n_test = _split_sizes(len(split_of), val_ratio, test_ratio)
    held = set(split_of.values())
    wanted = (("val", val_ratio, n_val), ("test", test_ratio, n_test))
    short = [size for split, ratio, size in wanted if ratio and split not in held]
    if not short:
        return None
    return HELD_BACK if all(short) else TOO_SMALL


def _per_split(split_of: dict[str, str]) -> str:
    """``20 in train`` or ``16 in train, 4 in val``: where a class's images are."""
    held = Counter(split_of.values())
    return ", ".join(f"{held[split]} in {split}" for split in SPLITS if held[split])


def _listed_paths(
    root: Path, lists: dict[str, list[tuple[str, int]]]
) -> dict[str, list[tuple[Path, int]]]:
    """The lists ``split`` wrote, as ``read_split`` reads them back."""
    absolute = Path(os.path.abspath(root))
    return {split: [(absolute / rel, index) for rel, index in entries]
            for split, entries in lists.items()}  # fmt: skip


def _dropped(
    previous: dict[str, dict[str, str]], good: dict[str, list[str]], skipped: list[str]
) -> list[str]:
    """The images the lists named before that the new ones do not, but for the unreadable ones
    (said as such): deleted since, or moved out of their class folder."""
    kept = {rel for files in good.values() for rel in files}
    listed = (rel for files in previous.values() for rel in files)
    return sorted(
        name for rel in listed if rel not in kept and (name := _readable_name(rel)) not in skipped
    )


def _readable_images(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Each class folder's readable images (``class/file.jpg``), and the images that are not
    (each opened: unreadable ones are left out and listed, never a crash later)."""
    candidates = _find_images(root)
    if not candidates:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(
            f"no images found in {root} (expected <class>/<image> with {exts}){_level_hint(root)}"
        )
    _refuse_unlistable_names(root, candidates)
    good: dict[str, list[str]] = {}
    skipped: list[str] = []
    for path in tqdm(
        candidates, desc="Verifying images", unit="img", disable=None, file=sys.stderr
    ):
        rel = path.relative_to(root).as_posix()
        if _is_readable(path):
            good.setdefault(path.parent.name, []).append(rel)
        else:
            skipped.append(_readable_name(rel))
    return good, skipped


def _level_hint(root: Path) -> str:
    """Where to point split when ``root`` is a folder off by one level: a class folder (the
    images are in it), or a folder around the dataset (its sub-folders hold class folders)."""
    if any(is_image_file(p) for p in root.iterdir()):
        parent = shlex.quote(os.path.normpath(os.path.join(root, os.pardir)))
        return (
            "; its images are straight in it: if it is one class's folder, split the folder "
            f"holding the class folders (python -m train split {parent})"
        )
    if holders := [d for d in _class_dirs(root) if _find_images(d)]:
        one, first = len(holders) == 1, shlex.quote(str(holders[0]))
        names = some([f"'{_readable_name(d.name)}'" for d in holders], 2)
        return (
            f"; {names} {'holds' if one else 'hold'} class folders of images: split "
            f"{'it' if one else 'one of them'} (python -m train split {first})"
        )
    return ""


def _refuse_unlistable_names(root: Path, images: list[Path]) -> None:
    """DatasetError naming the first class folder, else image, whose name no list file can
    hold, and the others of its kind: left out, a class was dropped as "unreadable", split after
    split. A zip made on Windows names its files in the system's code page (GBK for Chinese),
    which Linux keeps as bytes that are not UTF-8."""
    folders = [d.name for d in _class_dirs(root) if _unlistable(d.name)]
    files = [path.relative_to(root).as_posix() for path in images]
    names = folders or [rel for rel in files if _unlistable(rel)]
    if not names:
        return
    why = _unlistable(names[0])
    names = [name for name in names if _unlistable(name) == why]
    what = counted(names, "class folder") if folders else counted(names, "image")
    shown = some([f"'{_readable_name(name)}'" for name in names], 1)
    them = "it" if len(names) == 1 else "them"
    if why == NOT_UTF8:
        raise DatasetError(
            f"{what} named in bytes that are not UTF-8, which no list file can hold: {shown}; "
            f"rename {them}, or unzip the zip again naming the encoding it was made in (unzip -O "
            "GBK, or -O CP936, for Chinese names from Windows)"
        )
    if why == BACKSLASH:
        raise DatasetError(
            f"{what} with a backslash in the name, which list files read as a folder separator "
            f"(as Windows writes them): {shown}; rename {them}"
        )
    raise DatasetError(f"{what} with a line break in the name, which no list file can hold: "
                       f"{shown}; rename {them}")  # fmt: skip


def _ignored(root: Path) -> list[str]:
    """What the class folders hold besides images a split takes: other files (``.tiff``,
    ``.gif``) and sub-folders; hidden ones are no one's images, broken links are said apart."""
    return _names_in_classes(root, lambda p: p.exists() and (p.is_dir() or not is_image_file(p)))


def _broken_links(root: Path) -> list[str]:
    """The symbolic links in the class folders whose target is gone (or a loop): "not an
    image" would send the user looking at a file that is not there."""
    return _names_in_classes(root, lambda p: p.is_symlink() and not p.exists())


def _names_in_classes(root: Path, kept: Callable[[Path], bool]) -> list[str]:
    """The class folders' entries that are not hidden and ``kept`` takes, named for the user."""
    return sorted(
        _readable_name(p.relative_to(root).as_posix())
        for d in _class_dirs(root)
        for p in d.iterdir()
        if not p.name.startswith(".") and kept(p)
    )


def _listed_splits(root: Path) -> dict[str, dict[str, str]]:
    """Per class folder, the split the folder's list files give each of its images
    (``class/file.jpg``), in the lists' order; {} without lists."""
    listed: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        path = split_list(root, split)
        if not path.is_file():
            continue
        try:
            entries = read_list(path)
        except DatasetError as err:  # skipped, its image could move from test into training
            raise DatasetError(f"{err} (--reshuffle splits afresh, without the lists)") from None
        _check_found(root, path, entries, root)
        for entry in entries:
            listed.setdefault(entry.rel.partition("/")[0], {}).setdefault(entry.rel, split)
    return listed


def _assign(
    files: list[str],
    previous: dict[str, str],
    rng: random.Random,
    val_ratio: float,
    test_ratio: float,
) -> dict[str, str]:
    """Each of a class's files' split, listed ones first: one listed before (``previous``: the
    class's) keeps it (moved into training, an image a model was evaluated on would score it
    unfairly); new ones, shuffled, fill val and test up to the ratios, and the rest trains."""
    present = set(files)
    # In the order the lists gave them: a second split of an unchanged folder writes the same files
    split_of = {f: split for f, split in previous.items() if f in present}
    new = [f for f in files if f not in split_of]
    rng.shuffle(new)
    n_val, n_test = _split_sizes(len(files), val_ratio, test_ratio)
    held = Counter(split_of.values())
    new_val = min(len(new), max(0, n_val - held["val"]))
    new_test = min(len(new) - new_val, max(0, n_test - held["test"]))
    for i, f in enumerate(new):
        split_of[f] = "val" if i < new_val else "test" if i < new_val + new_test else "train"
    return split_of


def read_labels(dataset_dir: str | Path) -> list[str]:
    """Class names from ``labels.txt``, in label-index order."""
    path = Path(dataset_dir) / LABELS_FILE
    if not path.is_file():
        raise DatasetError(f"{path} not found; split the dataset first")
    return list(read_labels_file(path))


@dataclass(frozen=True)
class ListEntry:
    """One line of a split list: the image's path in the dataset folder (``class/file.jpg``)
    and its label index."""

    lineno: int
    rel: str
    index: int

    def line(self) -> str:
        """The entry as ``split`` writes it."""
        return f"{self.rel} {self.index}"


def read_list(path: Path) -> list[ListEntry]:
    """A split list's entries; the one reader of a list's lines (for ``split``, which keeps the
    listed images' split, ``fit``, ``evaluate`` and what caches and checkpoints record of a list).

    Read as PaddleX 2 reads them (``line.strip().split()``): the label index is the last field,
    after any white space (a tab, two spaces), and white space after it, a CR or a BOM is no
    part of the line. Unlike PaddleX the path keeps its inner spaces (class and file names have
    them) and its leading ones (``split`` writes a class folder " edge" so), and loses a leading
    ``./``. A backslash separates folders, as in the lists PaddleX 2 writes on Windows
    (``cat\\0001.jpg 0``): a name holding one cannot be listed (``split`` refuses it). A line
    that still does not read is an error naming it: skipped, its image would leave training, or
    change split, in silence."""
    entries = []
    for lineno, line in enumerate(read_lines(path), 1):
        fields = line.removeprefix(BOM).rsplit(maxsplit=1)  # a BOM: lists joined with cat
        if not fields:
            continue
        rel, index = fields if len(fields) == 2 else ("", fields[0])
        rel = rel.replace("\\", "/").removeprefix("./")
        # isascii: int() also takes other scripts' digits, and isdigit() superscripts it does not
        if not rel or not (index.isascii() and index.isdigit()):
            raise DatasetError(f"{path}:{lineno}: expected '<path> <label_index>', got {line!r}")
        entries.append(ListEntry(lineno, rel, int(index)))
    return entries


def read_split(dataset_dir: str | Path, split: str) -> list[tuple[Path, int]]:
    """``(absolute image path, label index)`` pairs from ``{split}_list.txt``."""
    # Normalised: `../ds` and `/data/ds` are one dataset (one decoded cache, one `cache list` name).
    root = Path(os.path.abspath(dataset_dir))
    path = split_list(root, split)
    if not path.is_file():
        raise DatasetError(f"{path} not found; split the dataset first")
    entries = read_list(path)
    if not entries:
        return []
    _check_labels(entries, read_labels(root), path, dataset_dir)
    _check_found(root, path, entries, Path(dataset_dir))
    return [(root / entry.rel, entry.index) for entry in entries]


def _check_labels(
    entries: list[ListEntry], labels: list[str], path: Path, dataset_dir: str | Path
) -> None:
    """DatasetError for a label index past ``labels`` (it would fail deep inside Paddle in
    training, or miscount silently), or one that names another class than the image's class
    folder: labels.txt reordered or edited since the split, whose model would answer one class's
    name for another's images. A folder that is no class name is taken as listed: PaddleX
    datasets need not keep each class in its own folder."""
    classes = set(labels)
    for entry in entries:
        if entry.index >= len(labels):
            raise DatasetError(
                f"{path}:{entry.lineno}: label index {entry.index} is out of range: {LABELS_FILE} "
                f"has {len(labels)} classes (0 to {len(labels) - 1})"
            )
        folder, named = entry.rel.partition("/")[0], labels[entry.index]
        if folder != named and folder in classes:
            raise DatasetError(
                f"{path}:{entry.lineno}: an image of class folder '{_readable_name(folder)}' has "
                f"label index {entry.index}, which {LABELS_FILE} gives to "
                f"'{_readable_name(named)}': {LABELS_FILE} changed since the split; restore it, "
                f"or split again (python -m train split {shlex.quote(str(dataset_dir))})"
            )


def _check_found(root: Path, path: Path, entries: list[ListEntry], given: Path) -> None:
    """DatasetError when a list's paths are relative to another folder: some found only without
    their first folder (a parent: ``flowers/daisy/1.jpg`` in ``flowers/``), however few (those
    images are there: dropped, they would change split); or most of its images not in ``root``,
    and more than a few (written elsewhere, or the images renamed), not deleted since the split.
    ``split`` wrote new lists over them, and ``fit`` trained on what was left or stopped with "no
    training image left". Fewer gone are images deleted since, skipped and said (FEW_MISSING:
    without it, a val list of one image refused the dataset once that image was deleted)."""
    missing = [entry for entry in entries if not (root / entry.rel).exists()]
    if head := _extra_head(root, missing):
        headed = [entry for entry in missing if _found_without(root, entry.rel, head)]
        own = head == Path(os.path.abspath(root)).name  # root may be "."
        where = "the dataset folder's own name" if own else f"not in {given}"
        raise DatasetError(
            f"{path}:{headed[0].lineno}: its paths start with '{_readable_name(head)}/', {where} "
            f"({_readable_name(headed[0].rel)!r}; {len(headed)} of {len(entries)} listed images "
            "are found only without it): paths in a list are relative to the folder holding it; "
            f"drop it from every list, then run again: {_sed_dropping(root, head, given)}"
        )
    if len(missing) * 2 <= len(entries) or len(missing) <= FEW_MISSING:
        return
    first, found = missing[0], f"{len(missing)} of {len(entries)} listed images"
    raise DatasetError(
        f"{path}:{first.lineno}: {found} are not in {given} ({_readable_name(first.rel)!r}): "
        "paths in a list are relative to the folder holding it; fix them, or split afresh with "
        f"new lists over these (python -m train split {shlex.quote(str(given))} --reshuffle)"
    )


def _extra_head(root: Path, missing: list[ListEntry]) -> str | None:
    """The first folder that most ``missing`` paths found only without it start with, or None.
    Never a folder of the dataset: one of its images deleted is no path from elsewhere."""
    heads = Counter(
        head
        for entry in missing
        if _found_without(root, entry.rel, head := entry.rel.partition("/")[0])
    )
    return heads.most_common(1)[0][0] if heads else None


def _found_without(root: Path, rel: str, head: str) -> bool:
    """Whether ``rel`` starts with the folder ``head``, which the dataset does not have, and
    names one of the dataset's files once that is dropped."""
    first, _, rest = rel.partition("/")
    return first == head and bool(rest) and not (root / head).is_dir() and (root / rest).exists()


def _sed_dropping(root: Path, head: str, given: Path) -> str:
    """The command that drops ``head`` and its separator from the start of every line of the
    folder's lists, quoted: a sed script matching the start as the lines of all of them write
    it (``flowers/``, ``./flowers\\`` from Windows), or any of those when the lines differ (one
    script for them all: one run fixes every list)."""
    lists = [split_list(given, split) for split in SPLITS if split_list(given, split).is_file()]
    starts = {start for listed in lists for start in _written_starts(root, listed, head)}
    any_bom = r"\(\xEF\xBB\xBF\)\{0,1\}" if any(s.startswith(BOM) for s in starts) else ""
    any_start = any_bom + r"\(\.[/\\]\)\{0,1\}" + _bre(head) + r"[/\\]"
    pattern = _bre(starts.pop()) if len(starts) == 1 else any_start
    return shlex.join(["sed", "-i", f"s#^{pattern}##", *map(str, lists)])


def _written_starts(root: Path, listed: Path, head: str) -> set[str]:
    """How the lines of ``listed`` whose paths are found only without ``head`` write it."""
    lines = read_lines(listed)
    if lines and listed.read_bytes().startswith(BOM.encode()):  # read_lines took it off
        lines[0] = BOM + lines[0]
    return {
        _written_start(lines[entry.lineno - 1], head)
        for entry in read_list(listed)
        if _found_without(root, entry.rel, head)
    }


def _written_start(line: str, head: str) -> str:
    """How a list ``line`` writes its path's first folder ``head`` and the separator after it,
    with the BOM before them if it has one (``read_list`` took off a BOM and a leading ``./``,
    and read ``\\`` as ``/``)."""
    bom = BOM if line.startswith(BOM) else ""
    line = line.removeprefix(bom)
    dot = line[:2] if line[:2] in ("./", ".\\") else ""
    return bom + line[: len(dot) + len(head) + 1]


def _bre(text: str) -> str:
    """``text`` as a sed basic regular expression matching it literally (``#`` its delimiter); a
    BOM as GNU sed's byte escapes, which match it in any locale (and show in the command)."""
    escaped = "".join(f"\\{c}" if c in "\\.*[]^$#" else c for c in text)
    return escaped.replace(BOM, r"\xEF\xBB\xBF")


# What is read of a file to tell it from others of its size before reading it whole: files that
# differ mostly do so in their first kilobytes (EXIF, tables, the first scans of pixels).
HEAD_BYTES = 4096


def duplicated(
    dataset_dir: str | Path,
    labels: Sequence[str],
    splits: dict[str, Sequence[tuple[Path, int]]],
) -> list[str]:
    """The images the split lists hold more than once, byte for byte, in two splits (a copy in
    train overstates val or test accuracy) or two classes (a labelling error), each as
    ``cat/1.jpg (train) = cat/1 copy.jpg (test)``. ``splits``: each split's ``(absolute image
    path, label index)`` pairs, as ``read_split`` gives them (the caller has read them already).
    Cheap on datasets larger than memory: a stat a file, and only files of one size are read
    (``_same_bytes``)."""
    root = Path(os.path.abspath(dataset_dir))  # as read_split names the files
    listed = [
        (path, split, labels[index]) for split, samples in splits.items() for path, index in samples
    ]
    found = []
    for group in _same_bytes([path for path, _, _ in listed]):
        first, *others = [listed[i] for i in group]
        # Shown: the first copy and one in another split or class, if any
        other = next((copy for copy in others if copy[1:] != first[1:]), None)
        if other is None:
            continue  # the same image twice in one class's train: no harm to a score
        two_classes = first[2] != other[2]
        named = [
            f"{_readable_name(path.relative_to(root).as_posix())} ({split}"
            + (f", {_readable_name(label)})" if two_classes else ")")
            for path, split, label in (first, other)
        ]
        more = f" and {counted(others[1:], 'more copy', 'more copies')}" if others[1:] else ""
        found.append(" = ".join(named) + more)
    return found


def duplicates_line(duplicated: list[str]) -> str | None:
    """The note on ``duplicated``'s images for the user, None without any."""
    if not duplicated:
        return None
    return (
        f"{counted(duplicated, 'image')} listed more than once, byte for byte, in two splits "
        f"(which overstates val and test accuracy) or two classes (a labelling error): "
        f"{some(duplicated, 3)}; keep one copy"
    )


def _same_bytes(paths: Sequence[Path]) -> list[list[int]]:
    """Groups of indices of ``paths`` whose files hold the same bytes (a path listed twice is
    one): by size, then by the first HEAD_BYTES, then by a SHA-256 of the whole file read in
    chunks; a file is only read when another one has its size."""
    groups = [list(range(len(paths)))]
    for key in (_size, _head, _digest_of_file):
        groups = [same for group in groups for same in _grouped(group, paths, key)]
    return groups


def _grouped(ids: list[int], paths: Sequence[Path], key: Callable[[Path], Any]) -> list[list[int]]:
    """``ids`` by the ``key`` of their path: the groups of two or more (a file gone or
    unreadable is in none)."""
    by_key: dict[Any, list[int]] = {}
    for i in ids:
        try:
            by_key.setdefault(key(paths[i]), []).append(i)
        except OSError:
            continue
    return [group for group in by_key.values() if len(group) > 1]


def _size(path: Path) -> int:
    return path.stat().st_size


def _head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(HEAD_BYTES)


def _digest_of_file(path: Path) -> bytes:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


def unlisted_note(dataset_dir: str | Path, shown: int = 3) -> str | None:
    """Lines for the user when the folder holds images no split list names: added since it was
    split (a new class folder included), left out by the split as unreadable, or named so that
    no list file can hold them (a split refuses them). Training keeps the lists as they are (the
    same val and test split every run is what makes runs comparable), so they would be left out
    of it in silence. None when every image is listed."""
    root = Path(os.path.abspath(dataset_dir))  # as read_split names the files
    listed = {
        path
        for split in SPLITS
        if split_list(root, split).is_file()
        for path, _ in read_split(root, split)
    }
    # The ones a split would leave out or refuse, as it would again: advising it looped back.
    new, unreadable, unlistable = [], [], []
    for path in _find_images(root):
        if path in listed:
            continue
        if _unlistable(path.relative_to(root).as_posix()):
            unlistable.append(path)
        elif not _is_readable(path):
            unreadable.append(path)
        else:
            new.append(path)
    given = Path(dataset_dir)  # the folder named as the user named it
    lines = []
    if new:
        known = set(read_labels(root)) if (root / LABELS_FILE).is_file() else set()
        new_classes = sorted({path.relative_to(root).parts[0] for path in new} - known)
        classes = (
            f"; class folders not in {LABELS_FILE}: {', '.join(map(_readable_name, new_classes))}"
        )
        lines.append(
            f"{counted(new, 'image')} in {given} added since the split: "
            f"{_names(root, new, shown)}{classes if new_classes else ''}. Training uses the lists "
            f"as they are; `python -m train split {shlex.quote(str(given))}` adds them (listed "
            "images keep their split)"
        )
    if unreadable:
        lines.append(f"{counted(unreadable, 'unreadable image')} in {given}, in no split list: "
                     f"{_names(root, unreadable, shown)} (fix or delete "
                     f"{'it' if len(unreadable) == 1 else 'them'})")  # fmt: skip
    if unlistable:
        lines.append(
            f"{counted(unlistable, 'image')} in {given}, in no split list, named so that no list "
            f"file can hold them (not UTF-8, a line break or a backslash): "
            f"{_names(root, unlistable, shown)}; "
            f"`python -m train split {shlex.quote(str(given))}` says how to rename them"
        )
    return "\n".join(lines) or None


# What a checkpoint keeps of the split its run trained on (``split_record``), so that a resume
# can tell a val or test image that run trained on: per list, a digest of its entries (paths and
# labels) and its images as sorted 8-byte hashes of their paths, in hex (paddle.save takes no
# bytes): 1.6 MB for 100,000 images.
IMAGE_ID_BYTES = 8


def split_record(dataset_dir: str | Path, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{split: {"digest": hex, "images": hex}}`` of the lists as they are now, and under
    ``"trained_before"`` the images the runs ``earlier`` records (a resumed run's checkpoint)
    trained on that the train list no longer holds: an image taken out of train by one resume
    and put in val by the next was scored as unseen."""
    record: dict[str, Any] = {}
    for name in SPLITS:
        entries = _list_entries(dataset_dir, name)
        images = b"".join(sorted(_image_id(entry.rel) for entry in entries)).hex()
        lines = sorted(entry.line() for entry in entries)  # its order does not matter
        record[name] = {"digest": _digest(lines), "images": images}
    before = _trained_ids(earlier) - _image_ids(record["train"]["images"]) if earlier else set()
    record["trained_before"] = b"".join(sorted(before)).hex()
    return record


def _trained_ids(record: dict[str, Any]) -> set[bytes]:
    """Every image the runs ``record`` speaks for trained on."""
    return _image_ids(record["train"]["images"]) | _image_ids(record.get("trained_before", ""))


def trained_on(record: dict[str, Any], dataset_dir: str | Path) -> list[str]:
    """The val and test images of the lists now that the runs of ``record`` trained on."""
    trained = _trained_ids(record)
    return [
        _readable_name(entry.rel)
        for name in ("val", "test")
        for entry in _list_entries(dataset_dir, name)
        if _image_id(entry.rel) in trained
    ]


def split_changes(record: dict[str, dict[str, Any]], dataset_dir: str | Path) -> list[str]:
    """``val: 2 added, 1 removed`` for each list that changed since ``record`` (``labels
    changed``: the same images under other class indices)."""
    changes, now = [], split_record(dataset_dir)
    for name in SPLITS:
        if record[name]["digest"] == now[name]["digest"]:
            continue
        before, after = _image_ids(record[name]["images"]), _image_ids(now[name]["images"])
        added, removed = len(after - before), len(before - after)
        what = f"{added} added, {removed} removed" if added or removed else "labels changed"
        changes.append(f"{name}: {what}")
    return changes


def list_digest(dataset_dir: str | Path, name: str) -> str | None:
    """SHA-256 of a split list's entries in their order, as ``read_split`` (and so a decoded
    cache's key) takes them, written as ``split`` writes them; None when there is no such list.
    OSError, or ValueError (not UTF-8, a line that does not read), when it cannot be read."""
    path = split_list(dataset_dir, name)
    if not path.is_file():
        return None
    return _digest([entry.line() for entry in read_list(path)])


def _digest(entries: list[str]) -> str:
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()


def _list_entries(dataset_dir: str | Path, name: str) -> list[ListEntry]:
    path = split_list(dataset_dir, name)
    return read_list(path) if path.is_file() else []


def _image_id(rel: str) -> bytes:
    return hashlib.blake2b(rel.encode("utf-8"), digest_size=IMAGE_ID_BYTES).digest()


def _image_ids(packed: str) -> set[bytes]:
    ids = bytes.fromhex(packed)
    return {ids[i : i + IMAGE_ID_BYTES] for i in range(0, len(ids), IMAGE_ID_BYTES)}


def _names(root: Path, paths: list[Path], shown: int) -> str:
    return some([_readable_name(path.relative_to(root).as_posix()) for path in paths], shown)


def _check_ratios(val_ratio: float, test_ratio: float) -> None:
    for name, ratio in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0 <= ratio < 1:
            raise DatasetError(f"{name} must be in [0, 1), got {ratio}")
    if val_ratio + test_ratio >= 1:
        raise DatasetError(
            f"val_ratio + test_ratio must be < 1 to leave training data, "
            f"got {val_ratio} + {test_ratio}"
        )


def _check_dir(root: Path) -> Path:
    if not root.exists():
        raise DatasetError(f"dataset directory not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a directory: {root}")
    return root


def _class_dirs(root: Path) -> list[Path]:
    """The visible immediate subdirectories: one class each."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find_images(root: Path) -> list[Path]:
    """Image files in the class folders, sorted; files in ``root`` are ignored."""
    return sorted(p for d in _class_dirs(root) for p in d.iterdir() if is_image_file(p))


# Why a name cannot be a list's path (``_unlistable``).
LINE_BREAK, BACKSLASH, NOT_UTF8 = "a line break", "a backslash", "bytes that are not UTF-8"


def _unlistable(rel: str) -> str | None:
    """Why a name does not fit a line of a UTF-8 list file, None when it does: a line break; a
    backslash, which a list reads as a folder separator (Windows lists); bytes that are not
    UTF-8 (Linux allows all three; Python maps such bytes to lone surrogates, which cannot be
    written)."""
    if "\n" in rel or "\r" in rel:
        return LINE_BREAK
    if "\\" in rel:
        return BACKSLASH
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    return None


def _readable_name(rel: str) -> str:
    """A file's name as it can be printed: bytes that are not UTF-8 as \\xNN, and control
    characters escaped (a name with ESC[2K and CR erased the warning that named it)."""
    text = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _is_readable(path: Path) -> bool:
    """Whether training will decode ``path``: its own decode (``load_pixels``), drafted small: a
    JPEG decodes at a reduced DCT scale, yet the whole file is read, so truncation is caught."""
    try:
        load_pixels(path, short_side=64)
    except (InvalidImageError, FileNotFoundError):  # FileNotFoundError: gone since listed
        return False
    return True


def _split_sizes(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """``(n_val, n_test)`` for a class of ``n`` images, leaving at least one for training."""
    n_val, n_test = round(n * val_ratio), round(n * test_ratio)
    excess = max(0, n_val + n_test - (n - 1))
    # Test is the least important split for a tiny class, so it gives way first.
    from_test = min(excess, n_test)
    return n_val - (excess - from_test), n_test - from_test
