"""Training side of lcnet-bento: dataset split → fit → evaluate → export → BentoML store.

The Python API is the functions the ``python -m train`` subcommands call.
"""

import warnings

# Paddle warns about a missing C++ compiler cache at import; it never compiles anything here.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from .evaluate import evaluate
from .fit import FitConfig, fit
from .importer import import_model
from .model import SCALES, build_model
from .split import split_dataset

__all__ = ["SCALES", "FitConfig", "build_model", "evaluate", "fit", "import_model", "split_dataset"]
