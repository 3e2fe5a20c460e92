"""Native work that may crash a process — reading a model's files, timing its engines — run in a
throwaway interpreter, so that a serving worker sees an exception instead of dying."""

from __future__ import annotations

import subprocess
import sys


def run_python(args: list[str], timeout_s: float) -> str:
    """``python *args`` in a fresh interpreter; its stdout. ChildProcessError with the last line
    of its stderr when it fails, or when it has not finished within ``timeout_s``."""
    try:
        done = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise ChildProcessError(f"no answer within {timeout_s:g} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise ChildProcessError(lines[-1])
    return done.stdout
