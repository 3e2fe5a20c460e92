"""What a training run is asked for: the architectures there are and ``FitConfig``.

Free of Paddle, so that the CLI builds its parser and checks a run's settings before anything
heavy is imported (``python -m train split`` and every ``--help`` start in ~0.5 s, not ~3 s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from lcnet_runner.preprocess import PreprocessConfig, default_resize_short
from lcnet_runner.ranges import check_ranges

from .data import AugmentConfig
from .decoded_cache import RAM_MB, CacheConfig

CHECKPOINT = "last.pdckpt"  # in the save folder: the full state --resume goes on from

# PP-LCNet's widths, by the names PaddleClas gives its models.
SCALES: dict[str, float] = {
    "PPLCNet_x0_25": 0.25,
    "PPLCNet_x0_35": 0.35,
    "PPLCNet_x0_5": 0.5,
    "PPLCNet_x0_75": 0.75,
    "PPLCNet_x1_0": 1.0,
    "PPLCNet_x1_5": 1.5,
    "PPLCNet_x2_0": 2.0,
    "PPLCNet_x2_5": 2.5,
}


def scale_of(name: str) -> float:
    """The width multiplier of a model name; unknown names list the valid ones."""
    try:
        return SCALES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(SCALES)}") from None


def decay_epochs(epochs: int) -> tuple[int, ...]:
    """Where the piecewise schedule divides the learning rate by 10: at 40, 60 and 80 % of the
    run, so that a longer run (the first thing one tries) does not spend its end at 1/1000."""
    return tuple(sorted({max(1, round(share * epochs)) for share in (0.4, 0.6, 0.8)}))


# The settings FitConfig derives when left blank: name → (derived from, how, blank).
DERIVED: dict[str, tuple[str, Callable[[int], Any], Any]] = {
    "resize_short": ("input_size", default_resize_short, 0),
    "lr_decay_epochs": ("epochs", decay_epochs, ()),
}


def holds_derived(values: Mapping[str, Any], name: str) -> bool:
    """Whether ``values`` (a FitConfig's fields, or a checkpoint's record of them: tuples as
    lists) hold for the DERIVED setting ``name`` what FitConfig derives from its source."""
    source, derive, _ = DERIVED[name]
    return _as_field(values[name]) == derive(values[source])


@dataclass(frozen=True)
class FitConfig:
    """Training settings; the defaults are the seed's (PaddleX 2 PPLCNet tutorial)."""

    model: str = "PPLCNet_x1_0"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.01
    schedule: str = "piecewise"  # or "cosine"
    # piecewise: ×0.1 at each; () = at 40, 60 and 80 % of the epochs (the seed's 4, 6, 8 of 10)
    lr_decay_epochs: tuple[int, ...] = ()
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4  # L2, not applied to batch-norm parameters
    input_size: int = 224
    resize_short: int = 0  # 0: input_size × 256/224 (256 for 224, as PaddleClas evaluates)
    resize_backend: str = "cv2"  # OpenCV (PaddleX's default) or "pil"; saved with the model
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    pretrained: str = "imagenet"  # imagenet | imagenet-ssld | none | PATH.pdparams
    seed: int = 0
    workers: int = 0  # decoding threads; 0 = one per core
    cache_dir: str = ""  # decoded caches go in CACHE_DIR/decoded; "" = LCNET_CACHE
    ram_cache_mb: float = RAM_MB  # splits decoding to less stay in RAM; 0 = all on disk
    threads: int = 0  # Paddle compute threads; 0 = one per core
    early_stop_patience: int = 0  # epochs without a better val top-1 before stopping; 0 = off
    save_dir: str = "output/pplcnet"
    name: str = "pplcnet"  # BentoML store model name
    resume: bool = False
    int8: bool = False  # also store an INT8 OpenVINO variant (needs the int8 extra)

    def __post_init__(self) -> None:
        # What the defaults depend on, resolved once: a frozen dataclass sets its own fields so.
        for name, (source, derive, blank) in DERIVED.items():
            if getattr(self, name) == blank:
                object.__setattr__(self, name, derive(getattr(self, source)))
        if self.schedule not in ("piecewise", "cosine"):
            raise ValueError(f"schedule must be 'piecewise' or 'cosine', got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        scale_of(self.model)  # unknown names fail before any data is read
        check_ranges(self, FIT_RANGES, lambda name: "--" + name.replace("_", "-"))
        if self.input_size > self.resize_short:  # said in flags: on --resume one is that run's
            raise ValueError(
                f"--input-size {self.input_size} is larger than --resize-short "
                f"{self.resize_short}, the short side the crop is cut from; give --resize-short "
                f"{default_resize_short(self.input_size)} (or any >= {self.input_size})"
            )
        try:
            bentoml.Tag(self.name)  # what the store takes, known before the run, not after it
        except ValueError as err:
            raise ValueError(f"--name: {err}") from None
        CacheConfig(ram_mb=self.ram_cache_mb)  # so does a negative --ram-cache-mb
        _ = self.preprocess, self.augment  # and bad sizes or crop scale, not mid-run

    def changed(self, **changes: Any) -> FitConfig:
        """A copy with ``changes``, in which what this config derived from a setting that
        changes is derived again: ``FitConfig().changed(epochs=40)`` decays the learning rate
        at 16, 24 and 32, not at the 4, 6 and 8 of the default 10 epochs."""
        for name, (source, _, blank) in DERIVED.items():
            if source in changes and name not in changes and holds_derived(vars(self), name):
                changes[name] = blank
        return dataclasses.replace(self, **changes)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(crop_size=self.input_size, resize_short=self.resize_short,
                                backend=self.resize_backend)  # fmt: skip

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(Path(self.cache_dir) if self.cache_dir else None, self.ram_cache_mb)

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(
            input_size=self.input_size, crop_scale=tuple(self.crop_scale), hflip=self.hflip
        )


# Settings that shape the decoded pixels, the model as it serves and the run's schedule: on
# --resume, those not given are the checkpoint's run's (a flag's default re-decoded every split
# into new caches, trained the last epochs on other pixels and stored the model with a
# preprocessing it barely trained with; an older release's decay epochs, or ones the run named,
# gave way to those derived from --epochs, so the same command resumed another schedule).
KEPT_ON_RESUME = ("input_size", "resize_short", "resize_backend", "lr_decay_epochs")


def resumed_config(options: Mapping[str, Any], saved: Mapping[str, Any]) -> FitConfig:
    """The FitConfig of ``options`` (FitConfig fields) on --resume: a KEPT_ON_RESUME setting
    absent from them (not given) is ``saved``'s, the checkpoint's run's, unless that run derived
    it (resize-short from the input size, decay epochs from --epochs): then it is derived again,
    from this run's input size and epochs, as that run's would have been."""
    kept = {name: _kept(saved, name) for name in KEPT_ON_RESUME
            if name in saved and name not in options}  # fmt: skip
    return FitConfig(**options, **kept)


def _kept(saved: Mapping[str, Any], name: str) -> Any:
    """The value a resume keeps of ``saved``'s setting ``name``: blank, for FitConfig to derive
    again, where that run derived it."""
    if name in DERIVED:
        source, _, blank = DERIVED[name]
        if source in saved and holds_derived(saved, name):
            return blank
    return _as_field(saved[name])


def _as_field(value: Any) -> Any:
    """A checkpoint's record of a setting as FitConfig holds it (a checkpoint keeps tuples as
    lists)."""
    return tuple(value) if isinstance(value, list) else value


# What each number may be, both ends included (see lcnet_runner.runner.RUNNER_RANGES): an lr of
# NaN trained a NaN model that passed the guard and was stored; a seed of -1 was Paddle's
# traceback.
FIT_RANGES = {
    "lr": (1e-9, 100),
    "momentum": (0, 1),
    "weight_decay": (0, 1),
    "warmup_epochs": (0, math.inf),
    "early_stop_patience": (0, math.inf),
    "seed": (0, 2**32 - 1),
    "workers": (0, 1024),
    "threads": (0, 1024),
}
