"""Training side of lcnet-bento: dataset split → fit → evaluate → export → BentoML store.

The Python API is the functions the ``python -m train`` subcommands call.
"""

import warnings

# Paddle warns about a missing C++ compiler cache at import; it never compiles anything here.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
# Paddle's batch norm says so at every training run's first step, as if something were wrong.
warnings.filterwarnings("ignore", message="When training, we now always track global mean")

import importlib
from typing import TYPE_CHECKING

from .config import SCALES, FitConfig
from .split import split_dataset

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers and editors
    from .evaluation import evaluate
    from .importer import import_model
    from .model import build_model
    from .training import fit

# The functions that need Paddle, imported on first use (PEP 562), so that `python -m train
# split` and every `--help` start without loading Paddle and matplotlib (~2.4 s). No name here
# is also a submodule's: importing that submodule would replace the function on the package.
_LAZY = {"evaluate": "evaluation", "fit": "training", "import_model": "importer",
         "build_model": "model"}  # fmt: skip
__all__ = ["SCALES", "FitConfig", "build_model", "evaluate", "fit", "import_model", "split_dataset"]


def __dir__() -> list[str]:  # what an editor or the REPL completes: the lazy names too
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
