"""Official PaddleClas ImageNet weights: download once into a cache, load with a report.

Security: ``.pdparams`` files are pickles — loading one can run code. Load only files you trust.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lcnet_runner.artifact import cache_dir

from .config import SCALES

if TYPE_CHECKING:
    import paddle

_BASE_URL = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/legendary_models"
# PaddleClas publishes SSLD-distilled weights only for these scales.
SSLD_MODELS = frozenset({"PPLCNet_x0_5", "PPLCNet_x1_0", "PPLCNet_x2_5"})
CHOICES = ("imagenet", "imagenet-ssld", "none")


class PretrainedError(RuntimeError):
    """Weights that cannot be had or do not fit; the message says what to do instead."""


@dataclass(frozen=True)
class LoadReport:
    source: str
    loaded: int  # parameters copied
    skipped: tuple[str, ...]  # keys left at their fresh initialisation (e.g. a resized classifier)


def weights_url(architecture: str, variant: str) -> str:
    if architecture not in SCALES:
        raise ValueError(f"unknown model {architecture!r}; choose one of: {', '.join(SCALES)}")
    if variant == "imagenet-ssld":
        if architecture not in SSLD_MODELS:
            raise PretrainedError(
                f"PaddleClas has no SSLD weights for {architecture}; "
                f"use --pretrained imagenet (SSLD exists for {', '.join(sorted(SSLD_MODELS))})"
            )
        return f"{_BASE_URL}/{architecture}_ssld_pretrained.pdparams"
    return f"{_BASE_URL}/{architecture}_pretrained.pdparams"


def download(url: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into the cache unless it is there already; atomic, so no half files."""
    target = cache_dir() / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # two fits may download
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    # HTTPException: the connection dropped mid-body (IncompleteRead), not an OSError
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        partial.unlink(missing_ok=True)
        raise PretrainedError(
            f"cannot download {url} ({getattr(err, 'reason', err)}); without network use "
            "--pretrained none or --pretrained PATH.pdparams"
        ) from None
    try:  # cached only if it holds weights: a proxy's error page answered 200 would stay
        read_state_dict(partial)
    except PretrainedError as err:
        partial.unlink(missing_ok=True)
        raise PretrainedError(f"{url} did not send weights ({err})") from None
    os.replace(partial, target)
    return target


def resolve(spec: str, architecture: str) -> Path | None:
    """``imagenet`` / ``imagenet-ssld`` / ``none`` / a local path → a weights file (or None)."""
    if spec == "none":
        return None
    if spec in CHOICES:
        return download(weights_url(architecture, spec))
    path = Path(spec)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {spec!r}: not one of {', '.join(CHOICES)} nor a file")
    return path


def read_state_dict(path: Path) -> dict:
    """A PaddleClas ``.pdparams`` or one of our checkpoints (its ``model`` entry)."""
    import paddle  # here, not at the top: the CLI imports PretrainedError to report it

    try:
        state = paddle.load(str(path))
    except Exception as err:  # paddle raises many types for a bad file
        raise PretrainedError(f"cannot read weights from {path}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise PretrainedError(f"{path} does not hold a state dict")
    return state


def load_weights(
    model: paddle.nn.Layer, path: Path, *, strict: bool = False, state: dict | None = None
) -> LoadReport:
    """Copy matching parameters; mismatched shapes (a classifier for another class count) are
    skipped and reported. ``strict`` turns any skip into an error (importing a finished model).
    ``state``: the file's, when the caller has read it already."""
    state = read_state_dict(path) if state is None else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and list(v.shape) == list(own[k].shape)}
    skipped = tuple(sorted(set(own) - set(usable)))
    if strict and skipped:
        raise PretrainedError(
            f"{path} does not match the model: {len(skipped)} keys missing or of another shape, "
            f"e.g. {', '.join(skipped[:3])}"
        )
    if not usable:
        raise PretrainedError(
            f"{path}: no parameter matches the model; is it a PP-LCNet checkpoint?"
        )
    model.set_state_dict(usable)
    return LoadReport(source=str(path), loaded=len(usable), skipped=skipped)
