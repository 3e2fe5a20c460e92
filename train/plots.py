"""Training curves and confusion matrices as PNG files (matplotlib's object API: no global state,
no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (targets, predicted), 1)
    return counts


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Train loss, train/val top-1 and the learning rate per epoch."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    loss, accuracy, lr = figure.subplots(1, 3)
    loss.plot(epochs, [row["train_loss"] for row in history], marker="o", color="tab:red")
    loss.set(title="train loss", xlabel="epoch")
    accuracy.plot(epochs, [row["train_top1"] for row in history], marker="o", label="train top-1")
    if any(row.get("val_top1") is not None for row in history):
        val = [np.nan if row["val_top1"] is None else row["val_top1"] for row in history]
        accuracy.plot(epochs, val, marker="o", label="val top-1")
    accuracy.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    accuracy.legend(loc="lower right")
    lr.plot(epochs, [row["lr"] for row in history], marker="o", color="tab:green")
    lr.set(title="learning rate (epoch start)", xlabel="epoch")
    for axes in (loss, accuracy, lr):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.savefig(path, dpi=100)
    return Path(path)


# Tried in turn for each glyph (matplotlib falls back per glyph): its own DejaVu Sans, then the
# CJK fonts Linux, Windows and macOS ship, for PaddleX's many users with Chinese class names.
FONT_FAMILIES = ("DejaVu Sans", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Source Han Sans SC",
                 "Microsoft YaHei", "SimHei", "PingFang SC")  # fmt: skip


def _font_families() -> list[str]:
    """The families of FONT_FAMILIES installed here."""
    from matplotlib import font_manager

    found = []
    for family in FONT_FAMILIES:
        try:
            font_manager.findfont(family, fallback_to_default=False)
        except ValueError:
            continue
        found.append(family)
    return found


def _drawable(labels: Sequence[str], families: Sequence[str]) -> bool:
    """Whether ``families`` have a glyph for every character of ``labels``."""
    from matplotlib import font_manager, ft2font

    chars = {ord(char) for label in labels for char in label}
    for family in families:
        chars -= set(ft2font.FT2Font(font_manager.findfont(family)).get_charmap())
    return not chars


def plot_confusion_matrix(
    counts: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "confusion matrix"
) -> Path:
    """Rows are true classes, colour is the row share; counts are written in when they fit.

    The figure grows with the class count, and tick labels shrink, so 2 and 100 classes both
    stay readable.
    """
    n = len(labels)
    side = float(np.clip(2.5 + 0.28 * n, 5, 30))
    fontsize = float(np.clip(13 - n / 8, 7, 11))  # a row is 0.28" ≈ 20 pt: 7 pt still fits
    big = 11 + side / 3  # title and axis labels grow with the figure
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class", fontsize=big)
    families = _font_families()
    names = labels if _drawable(labels, families) else [str(i) for i in range(n)]
    ticks = {"fontsize": fontsize, "fontfamily": families}
    axes.set_xticks(range(n), names, rotation=90 if n > 6 else 0, **ticks)
    axes.set_yticks(range(n), names, **ticks)
    axes.set_xlabel("predicted", fontsize=big)
    axes.set_ylabel("true", fontsize=big)
    top1 = np.trace(counts) / max(counts.sum(), 1)
    title = f"{title} (n={counts.sum()}, top-1 {top1:.3f})"
    if names is not labels:  # boxes for every name would tell no row from another
        note = "classes by category_id (the order of labels.txt): no font here draws their names"
        # wrapped to the figure's width (a character is ~0.6 em), not cut at its edges
        title += "\n" + textwrap.fill(note, width=int((side + 1.5) * 72 / (0.6 * big)))
    axes.set_title(title, fontsize=big)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    axes.text(j, i, str(counts[i, j]), ha="center", va="center",
                              color=colour, fontsize=fontsize)  # fmt: skip
    figure.savefig(path, dpi=100)
    return Path(path)
