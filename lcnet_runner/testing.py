"""A real `bentoml serve` on free loopback ports, for tests, benchmarks and users' own tests of a
service that embeds the runner (no side effects on import)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_home(home: str | None) -> str:
    """A BentoML home of this server's own that shares the store's models and Bentos: every
    `bentoml serve` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` at start, which would wipe
    the metrics of any other server already running on the same home."""
    shared = Path(home or Path.home() / "bentoml")
    own = Path(tempfile.mkdtemp(prefix="lcnet-serve-home-"))
    for name in ("models", "bentos"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (own / name).symlink_to((shared / name).resolve(), target_is_directory=True)
    return str(own)


class ServerProcess:
    """A server's process group on loopback, logging to a temporary file, ready when
    ``ready_path`` answers 200, ended by its own PID (never by name)."""

    ready_path = "/readyz"
    url: str

    def _start(self, command: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{Path(command[0]).name}-",
                                               suffix=".log")  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # workers share the group: stop them all by our PID
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90.0):
        name = f"{Path(self.process.args[0]).name} {self.process.args[1]}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{name} not ready after {timeout}s:\n{self.output()}")

    def wait_settled(self, timeout: float = 90.0, window_s: float = 0.5):
        """Wait until the whole server idles (its processes used < 0.05 CPU s in ``window_s``):
        ``/readyz`` answers once one worker is up, while the others may still be loading and
        warming up their models, taking CPU from whatever is measured next."""
        deadline, before = time.monotonic() + timeout, self._cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(window_s)
            now = self._cpu_seconds()
            if now - before < 0.05:
                return self
            before = now
        raise AssertionError(f"server still busy {timeout}s after it was ready:\n{self.output()}")

    def _cpu_seconds(self) -> float:
        """CPU seconds used so far by the server's live processes."""
        import psutil  # BentoML's dependency

        root = psutil.Process(self.process.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += sum(process.cpu_times()[:2])
            except psutil.Error:
                continue
        return total

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Server(ServerProcess):
    """A real `bentoml serve` on free loopback ports (HTTP and gRPC)."""

    def __init__(self, target: str, env: dict[str, str | None], cwd: Path | None = None):
        """``target``: a project folder or Bento tag, as for ``bentoml serve``; ``cwd``: where to
        run it (default: here); a variable of ``env`` set to None is left unset."""
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        full_env = {
            **os.environ,
            "LCNET_GRPC_PORT": str(self.grpc_port),
            "LCNET_GRPC_HOST": "127.0.0.1",
            **env,
        }
        full_env = {name: value for name, value in full_env.items() if value is not None}
        self.home = full_env["BENTOML_HOME"] = _own_home(full_env.get("BENTOML_HOME"))
        bentoml = str(Path(sys.executable).parent / "bentoml")
        command = [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(self.http_port)]
        self._start(command, full_env, cwd)

    def stop(self) -> None:
        """Stop the server; then remove its own home (its links to the store's models and Bentos
        go, not what they point to) and its claim on the gRPC port."""
        super().stop()
        shutil.rmtree(self.home, ignore_errors=True)
        from .grpc_api import forget_stopped_owner

        forget_stopped_owner(self.grpc_port)
