"""Which `bentoml serve` a worker belongs to, and whether a server named so still runs.

Records the workers of one server share (reload requests, the gRPC port's owner) are named
after its arbiter, the workers' parent, by pid and start time: a later process reusing the pid
is another server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from bentoml._internal.context import server_context


def serving_as_dependency() -> bool:
    """Whether this worker serves ours as a dependency of another service (``bentoml.depends``),
    not as the service `bentoml serve` was started for: BentoML's own reading of its server
    context, where it chooses ``is_main``."""
    return server_context.service_type == "service"


def server_id(pid: int) -> str:
    """A process named so that a later process reusing its pid is another one: ``pid:start``."""
    import psutil

    return f"{pid}:{psutil.Process(pid).create_time():.3f}"


def server_alive(server: str) -> bool:
    """Whether the process ``server_id`` named is still running (not another with its pid)."""
    import psutil

    try:
        return server_id(int(server.partition(":")[0])) == server
    except (psutil.Error, ValueError):
        return False


def this_server() -> str:
    """The `bentoml serve` this worker belongs to: its arbiter, the worker's parent."""
    return server_id(os.getppid())


def on_stop_signal(callback: Callable[[], None]) -> None:
    """Call ``callback`` when SIGTERM or SIGINT tells this worker to stop, then the handler
    already there (uvicorn's: HTTP's graceful stop; or one installed here before). Only in the
    main thread (no signals arrive elsewhere: a test client's lifespan thread), and only on a
    signal something stops the worker gracefully on (else it ends the process: nothing to do)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        stop = signal.getsignal(signum)
        if callable(stop):

            def first_callback(sig: int, frame: Any, stop: Callable = stop) -> None:
                callback()
                stop(sig, frame)

            signal.signal(signum, first_callback)


def end_as_stopped() -> NoReturn:
    """End this worker by SIGTERM, unhandled: as uvicorn ends a worker it stopped once it has
    shut down, for one told to stop before it could serve."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)
    raise SystemExit(1)  # not reached: SIGTERM ends the process


def stop_server(why: str) -> None:
    """Stop this worker's whole `bentoml serve` (a worker that cannot start is otherwise
    restarted forever), and have it exit with 1: stopped by SIGTERM alone it exited 0, which a
    supervisor restarting on failure takes for a clean stop."""
    with contextlib.suppress(OSError):  # no temp folder to write: it stops all the same
        _stop_file(this_server()).write_text(why, encoding="utf-8")
    os.kill(os.getppid(), signal.SIGTERM)  # a worker: its parent is the server


def exit_1_if_stopped() -> None:
    """At the exit of `bentoml serve`'s own process (``atexit``): exit 1 when a worker stopped it
    (``stop_server``). Last of the exit handlers, so flushing what it skips itself."""
    stopped = _stop_file(server_id(os.getpid()))
    if stopped.is_file():
        stopped.unlink(missing_ok=True)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _stop_file(server: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lcnet-stop-{server.replace(':', '-')}"
