"""Synthetic demo dataset: one big random shape per image, four shape classes.

Lets training and serving be exercised end to end without downloading anything.
Only the shape decides the class; position, size, tilt and colours are random.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

_SIZE_RANGE = (0.4, 0.8)  # circumscribed-circle diameter, as a fraction of the image side
_NOISE_STD = 8.0  # mild, so JPEG artefacts and noise never hide the outline
_CROSS_ARM_WIDTH = 0.35  # arm thickness relative to arm length
# Free rotation or random light/dark polarity roughly double what a tiny CNN must learn
# (a tilted square vs. a triangle gets hard at 64 px); this keeps the demo learnable in
# about a minute while pose, size and colour still vary per image.
_MAX_TILT = math.radians(20)


def write_demo_dataset(
    out_dir: str | Path,
    images_per_class: int = 100,
    image_size: int = 96,
    seed: int = 0,
) -> list[str]:
    """Write ``out_dir/<class>/<class>_0000.jpg`` for every demo class; return the classes."""
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = np.random.default_rng(seed)
    for name in DEMO_CLASSES:
        class_dir = Path(out_dir) / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            image = draw_shape(name, image_size, rng)
            image.save(class_dir / f"{name}_{i:04d}.jpg", quality=90)
    return list(DEMO_CLASSES)


def draw_shape(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of shape ``name`` at a random pose, with noise."""
    background, fill = _contrasting_colours(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    # Every shape fits inside its circumscribed circle, so keeping that circle inside
    # the image keeps the whole shape visible at any rotation.
    radius = rng.uniform(*_SIZE_RANGE) * size / 2
    cx, cy = rng.uniform(radius, size - 1 - radius, size=2)
    angle = rng.uniform(-_MAX_TILT, _MAX_TILT)
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(name, cx, cy, radius, angle), fill=fill)

    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, _NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Random ``(background, fill)``: a dark background and a bright shape, always visible."""
    background = tuple(int(c) for c in rng.integers(0, 90, size=3))
    fill = tuple(int(c) for c in rng.integers(165, 256, size=3))
    return background, fill


def _polygon(
    name: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices of ``name`` centred at ``(cx, cy)``, rotated by ``angle``, within ``radius``."""
    if name == "square":
        local = [_polar(radius, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif name == "triangle":
        # Pointing up (image y grows downwards) before the tilt.
        local = [_polar(radius, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif name == "cross":
        # Plus sign whose arm-tip corners (its farthest points) lie on the circle.
        arm = radius / math.hypot(1, _CROSS_ARM_WIDTH / 2)
        half = arm * _CROSS_ARM_WIDTH / 2
        tip_and_inner_corner = [(arm, -half), (arm, half), (half, half)]
        local = [_rotate(p, k * math.pi / 2) for k in range(4) for p in tip_and_inner_corner]
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {DEMO_CLASSES}")
    return [(cx + x, cy + y) for x, y in (_rotate(p, angle) for p in local)]


def _polar(r: float, angle: float) -> tuple[float, float]:
    return (r * math.cos(angle), r * math.sin(angle))


def _rotate(point: tuple[float, float], angle: float) -> tuple[float, float]:
    x, y = point
    c, s = math.cos(angle), math.sin(angle)
    return (x * c - y * s, x * s + y * c)
