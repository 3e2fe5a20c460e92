"""Native work that may crash a process — reading a model's files, timing its engines — run in a
throwaway interpreter, so that a serving worker sees an exception instead of dying."""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
import threading
import time

STOP_POLL_S = 0.2  # how often a wait for a child looks whether its caller was told to stop
STOP_GRACE_S = 2.0  # a child still running this long after its SIGTERM is killed
# What a child runs first: ``as_child``, then what it was started for.
_AS_CHILD = "from lcnet_runner.child import as_child; as_child()"
_PR_SET_PDEATHSIG = 1  # prctl(2)


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


class ChildStoppedError(ChildProcessError):
    """The child was ended (or not started) because its caller was told to stop: no fault of
    the child's work."""


FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def run_python(args: list[str], timeout_s: float, stop: threading.Event | None = None) -> str:
    """``python *args`` in a fresh interpreter that ends with this process (``as_child``); its
    stdout. ChildFailedError with the last line of its stderr (or its exit code) when it fails;
    ChildProcessError when it has not finished within ``timeout_s``; ChildStoppedError when
    ``stop`` is set first (a worker told to stop: the child would outlive it), the child then
    ended."""
    if stop is not None and stop.is_set():
        raise ChildStoppedError("not started: the caller is stopping")
    command = [sys.executable, "-c", _AS_CHILD, str(os.getpid()), *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            stdout, stderr = _output_when_ended(child, timeout_s, stop)
        except BaseException:  # e.g. Ctrl-C in a CLI: no child left running (as subprocess.run)
            child.kill()
            raise
    if child.returncode != 0:
        if child.returncode < 0:  # killed: whatever it wrote last is not why
            why = f"killed by signal {-child.returncode}"
        else:
            why = (stderr.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
        raise ChildFailedError(why, stdout, child.returncode)
    return stdout


def _output_when_ended(
    child: subprocess.Popen, timeout_s: float, stop: threading.Event | None
) -> tuple[str, str]:
    """The child's stdout and stderr once it has exited, read as it writes them (a child that
    prints more than a pipe holds would wait for a reader forever). Waits in slices so that a
    ``stop`` ends it within STOP_POLL_S."""
    deadline = time.monotonic() + timeout_s
    slice_s = STOP_POLL_S if stop is not None else timeout_s
    while True:
        try:
            return child.communicate(timeout=max(0.0, min(slice_s, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:  # retrying loses none of its output
            pass
        if stop is not None and stop.is_set():
            _end(child)
            raise ChildStoppedError("ended: the caller is stopping") from None
        if time.monotonic() >= deadline:
            child.kill()
            child.communicate()
            raise ChildProcessError(f"no answer within {timeout_s:g} s") from None


def _end(child: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if the child has not exited STOP_GRACE_S later; reaped."""
    child.terminate()
    try:
        child.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()


def as_child() -> None:
    """The child's side of ``run_python``: ask Linux to end it (SIGTERM) when the process that
    started it ends, then run ``-c CODE`` or ``-m MODULE`` with the arguments after it, as
    ``python`` would. A worker killed outright (the OOM killer's SIGKILL, a SIGTERM while it
    started) left its engine race or version check running for up to 10 minutes, reparented."""
    parent, option, target, *rest = sys.argv[1:]
    _end_with(int(parent))
    if option == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


def _end_with(parent: int) -> None:
    """SIGTERM this process once ``parent`` (the thread of it that started this one, which waits
    for it) ends; exits at once if it already has. Linux only: elsewhere nothing is asked."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request was made: nobody waits for us
        raise SystemExit(f"the process that started this one ({parent}) has ended")
