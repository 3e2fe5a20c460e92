"""Numbers checked against their allowed range when a config is made (a runner's, the server's
settings, fit's), each error naming the field the way its user set it."""

from __future__ import annotations

import math
from collections.abc import Callable


def check_ranges(
    config: object, ranges: dict[str, tuple[float, float]], label: Callable[[str], str] = str
) -> None:
    """ValueError naming the first field of ``config`` outside its range in ``ranges``."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not in_range(value, low, high):
            raise ValueError(range_error(label(name), value, low, high))


def in_range(value: float, low: float, high: float) -> bool:
    """Both ends included; NaN is in no range, and infinity in none either."""
    return not math.isinf(value) and low <= value <= high


def range_error(name: str, value: object, low: float, high: float) -> str:
    allowed = f">= {low}" if high == math.inf else f"from {low} to {high}"
    return f"{name}={value!r}: must be {allowed}"
