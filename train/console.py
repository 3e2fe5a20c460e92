"""Where a training command's words go: progress on stderr, from rank 0 only in a data-parallel
run; stdout keeps only the command's result (fit's JSON summary, piped to jq). And how it ends
when a signal stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def log(message: str) -> None:
    """Progress on stderr; in a data-parallel run only rank 0 talks."""
    if os.environ.get("PADDLE_TRAINER_ID", "0") == "0":
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_to_stderr() -> Iterator[None]:
    """What a library prints on stdout meanwhile goes to stderr, at the file descriptor (from
    Python and C++ alike: paddle2onnx's progress, NNCF's progress bars), so that stdout keeps
    only what a command prints as its result (fit's JSON summary, piped to jq)."""
    sys.stdout.flush()
    # fd 1, and in rank 0 of a data-parallel run the console's, which Python's stdout writes to
    # there (take_console)
    fds = sorted({1, sys.stdout.fileno()})
    saved = [os.dup(fd) for fd in fds]
    try:
        for fd in fds:
            os.dup2(2, fd)
        yield
    finally:
        sys.stdout.flush()
        for fd, copy in zip(fds, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


class Stopped(BaseException):
    """The command was told to stop by SIGTERM (``kill``, ``timeout``, a job scheduler), which
    ends it as Ctrl+C's KeyboardInterrupt does: what it holds is released on the way out, and it
    says so. Not an Exception, as KeyboardInterrupt is not: a handler of errors must let it
    through (a decoded-cache build deletes its work on an error, and keeps it for the next run
    when stopped)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def _child_dies_of_sigterm() -> None:
    """A child that a library forks while Stopped is in force (OpenVINO's telemetry sender, which
    it terminates after 3 s) dies of SIGTERM without a word, as it would by default: with the
    parent's handler its multiprocessing bootstrap printed a Stopped traceback."""
    if signal.getsignal(signal.SIGTERM) is _stop:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_child_dies_of_sigterm)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM raises Stopped in the main thread meanwhile (Python's default ends the process
    where it stands, without a word). Not in a data-parallel rank: its launcher ends it so, and
    the `fit` that started them speaks for all."""
    if "PADDLE_TRAINERS_NUM" in os.environ:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
