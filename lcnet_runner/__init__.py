"""Serving side of lcnet-bento: preprocessing, inference engines, the Predictor and the runner.

Never imports ``train``: data flows dataset → train → store → runner → service → client.
"""

import warnings

# Paddle warns about a missing C++ compiler cache at import; it never compiles anything here.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

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
