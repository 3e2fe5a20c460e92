"""Serving side of lcnet-bento: preprocessing, inference engines, the Predictor and the runner.

Never imports ``train``: data flows dataset → train → store → runner → service → client.
"""

import warnings

# Paddle warns about a missing C++ compiler cache at import; it never compiles anything here.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers and editors
    from .artifact import (
        InvalidModelError,
        ModelArtifact,
        ModelNotFoundError,
        load_artifact,
        pinned_model,
    )
    from .predictor import Predictor, TopKError
    from .preprocess import InvalidImageError, PreprocessConfig
    from .runner import LCNetRunner, RunnerConfig

# Imported on first use (PEP 562), as in ``train``: `train` imports the preprocessing alone, and
# the runner's modules (batcher, engine choice, guard) cost it ~0.2 s at every start.
_LAZY = {
    "InvalidModelError": "artifact",
    "ModelArtifact": "artifact",
    "ModelNotFoundError": "artifact",
    "load_artifact": "artifact",
    "pinned_model": "artifact",
    "Predictor": "predictor",
    "TopKError": "predictor",
    "InvalidImageError": "preprocess",
    "PreprocessConfig": "preprocess",
    "LCNetRunner": "runner",
    "RunnerConfig": "runner",
}
__all__ = [
    "InvalidImageError",
    "InvalidModelError",
    "LCNetRunner",
    "ModelArtifact",
    "ModelNotFoundError",
    "Predictor",
    "PreprocessConfig",
    "RunnerConfig",
    "TopKError",
    "load_artifact",
    "pinned_model",
]


def __dir__() -> list[str]:  # what an editor or the REPL completes: the lazy names too
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
