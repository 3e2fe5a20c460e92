"""Which `bentoml serve` a worker belongs to, and whether a server named so still runs.

Records the workers of one server share (reload requests, the gRPC port's owner) are named
after its arbiter, the workers' parent, by pid and start time: a later process reusing the pid
is another server.
"""

from __future__ import annotations

import os

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
