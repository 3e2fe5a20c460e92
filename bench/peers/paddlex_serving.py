"""PaddleX 3 basic serving (`paddlex --serve`) as a user runs it, in a virtual environment of the
benchmark's own, loading our exported folder; started on a loopback port and ended by its PID.

PaddleX 3.7.2's image-classification app answers HTTP 500 to every request as shipped: the
pipeline gives ``class_ids`` as a numpy array and the app passes it to a pydantic model that
wants ints. ``patch`` rewrites that one expression in the benchmark's own environment (never in
the project's): ``[int(i) for i in numpy.ravel(result["class_ids"])]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from lcnet_runner.testing import ServerProcess

PADDLEX = "paddlex[cv,serving]==3.7.2"
APP = "inference/serving/basic_serving/_pipeline_apps/image_classification.py"
BUGGY = 'result["class_ids"]'
FIXED = '[int(i) for i in numpy.ravel(result["class_ids"])]'


def venv_python(folder: Path) -> Path:
    """The interpreter of a PaddleX serving environment in ``folder``, created on first use
    (``paddlex[cv,serving]`` and the same paddlepaddle version as ours: Paddle fp32 in both)."""
    python = folder / "bin" / "python"
    ready = folder / ".lcnet-ready"
    if ready.exists():
        return python
    try:
        paddle = f"paddlepaddle=={metadata.version('paddlepaddle')}"
    except metadata.PackageNotFoundError:
        paddle = "paddlepaddle"
    print(
        f"creating PaddleX's serving environment in {folder} ({PADDLEX}, {paddle}); "
        "this installs ~1.7 GB from the package index once, about 2 minutes…",
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         PADDLEX, paddle],
        check=True,
    )  # fmt: skip
    ready.touch()
    print("PaddleX's serving environment is ready", flush=True)
    return python


def patch(python: Path) -> str:
    """Apply the one-line class_ids fix to the app file in ``python``'s environment (idempotent);
    refuses to touch the project's own environment. Returns what was done."""
    code = "import os, paddlex; print(os.path.dirname(paddlex.__file__))"
    root = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    app = Path(root.stdout.strip()) / APP
    text = app.read_text()
    if FIXED in text:
        return f"already patched: {app}"
    if Path(sys.prefix).resolve() in app.resolve().parents:
        raise SystemExit(
            f"{app} belongs to the project's own environment: the benchmark patches PaddleX only "
            "in an environment of its own (omit --paddlex-python, or point it elsewhere)"
        )
    if text.count(BUGGY) != 2 or "import numpy" in text:
        raise SystemExit(f"{app}: not the PaddleX 3.7.2 app this fix was written for")
    text = text.replace(BUGGY, FIXED).replace(
        "from typing import", "import numpy\nfrom typing import", 1
    )
    app.write_text(text)
    return f"patched: {app}"


def pipeline_config(model_dir: Path, model_name: str, folder: Path) -> Path:
    """The image_classification pipeline's config, loading ``model_dir``, visualisation off."""
    path = folder / "image_classification.yaml"
    path.write_text(
        "pipeline_name: image_classification\n"
        "SubModules:\n"
        "  ImageClassification:\n"
        "    module_name: image_classification\n"
        f"    model_name: {model_name}\n"
        f"    model_dir: {model_dir}\n"
        "    batch_size: 4\n"  # PaddleX's default; serving infers one image per request
        "    topk: 5\n"
        "Serving:\n"
        "  visualize: false\n"
    )
    return path


class PaddleXServer(ServerProcess):
    """`paddlex --serve` on a loopback port, ready when its /health answers."""

    ready_path = "/health"

    def __init__(self, python: Path, config: Path, port: int, env: dict[str, str] | None = None):
        self.http_port, self.url = port, f"http://127.0.0.1:{port}"
        full_env = {
            **os.environ,
            # its model-hoster connectivity check at start (no internet here; timing unaffected)
            "PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK": "True",
            **(env or {}),
        }
        full_env.pop("VIRTUAL_ENV", None)
        full_env["PATH"] = f"{python.parent}{os.pathsep}{full_env.get('PATH', '')}"
        self._start([str(python.parent / "paddlex"), "--serve", "--pipeline", str(config),
                     "--host", "127.0.0.1", "--port", str(port)], full_env)  # fmt: skip
