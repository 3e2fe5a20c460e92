"""Native work that may crash a process — reading a model's files, timing its engines — run in a
throwaway interpreter, so that a serving worker sees an exception instead of dying."""

from __future__ import annotations

import signal
import subprocess
import sys


class ChildFailedError(ChildProcessError):
    """The child ended with an error (or was killed by a signal); what it printed until then."""

    def __init__(self, message: str, stdout: str, returncode: int):
        super().__init__(message)
        self.stdout, self.returncode = stdout, returncode

    @property
    def native_fault(self) -> bool:
        """Killed by its own fault (a segfault, an illegal instruction, an abort), not by
        someone else's signal (the OOM killer's SIGKILL, a SIGTERM)."""
        return -self.returncode in FAULT_SIGNALS


FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def run_python(args: list[str], timeout_s: float) -> str:
    """``python *args`` in a fresh interpreter; its stdout. ChildFailedError with the last line
    of its stderr (or its exit code) when it fails; ChildProcessError when it has not finished
    within ``timeout_s``."""
    try:
        done = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise ChildProcessError(f"no answer within {timeout_s:g} s") from None
    if done.returncode != 0:
        if done.returncode < 0:  # killed: whatever it wrote last is not why
            why = f"killed by signal {-done.returncode}"
        else:
            why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ChildFailedError(why, done.stdout, done.returncode)
    return done.stdout
