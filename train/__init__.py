"""Training side of lcnet-bento: dataset split → fit → evaluate → export → BentoML store.

The Python API is the functions the ``python -m train`` subcommands call.
"""

import warnings

# Paddle warns about a missing C++ compiler cache at import; it never compiles anything here.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers and editors
    from .config import SCALES, FitConfig
    from .evaluate import evaluate
    from .fit import fit
    from .importer import import_model
    from .model import build_model
    from .split import split_dataset

# Where each public name lives. Imported on first use (PEP 562), so that `python -m train split`
# and every `--help` start without loading Paddle and matplotlib (~2.4 s).
_HOMES = {
    "evaluate": "evaluate",
    "FitConfig": "config",
    "fit": "fit",
    "import_model": "importer",
    "SCALES": "config",
    "build_model": "model",
    "split_dataset": "split",
}
__all__ = ["SCALES", "FitConfig", "build_model", "evaluate", "fit", "import_model", "split_dataset"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
