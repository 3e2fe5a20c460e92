"""Shared fixtures: an isolated BentoML store and one tiny model trained for real, once per run."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from lcnet_runner.testing import Server

# Before anything imports bentoml: every test (and every subprocess) uses a throwaway store,
# removed when the run ends.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="lcnet-test-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ["LCNET_CACHE"] = tempfile.mkdtemp(prefix="lcnet-test-cache-")
THROWAWAY = (os.environ["BENTOML_HOME"], os.environ["LCNET_CACHE"])


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in THROWAWAY:
        shutil.rmtree(folder, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # the repository carries every file its tests read

# A user's clone has nothing beside it (this workspace's ../shared is not theirs), so a test
# that opens or lists a file next to the repository passes here and fails there. Every such
# access in the test process is recorded; it fails collection or the test that made it.
OUTSIDE_REPOSITORY: list[str] = []
_NEIGHBOURS, _INSIDE = str(ROOT.parent) + os.sep, str(ROOT) + os.sep


def _record_outside_access(event: str, args: tuple) -> None:
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    if not isinstance(args[0], (str, bytes, os.PathLike)):
        return  # a file descriptor
    path = os.path.abspath(os.fsdecode(args[0]))
    if path.startswith(_NEIGHBOURS) and not (path + os.sep).startswith(_INSIDE):
        OUTSIDE_REPOSITORY.append(path)


if ROOT.parent != Path(ROOT.anchor):  # a clone at the top of the file system has no neighbours
    sys.addaudithook(_record_outside_access)


# A test is slow (seconds to a minute) when it trains or serves: it needs one of these fixtures,
# or (training on data of its own) says so with @pytest.mark.slow.
SLOW_FIXTURES = {"colour_dataset", "trained", "server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    if OUTSIDE_REPOSITORY:
        raise pytest.UsageError(f"test modules read outside the repository: {OUTSIDE_REPOSITORY}")


@pytest.fixture(autouse=True)
def pillows_limit_restored():
    """A CLI's ``main`` lifts Pillow's pixel limit for its whole process (the user's own images,
    ``read_own_images_at_any_size``); run in-process by a test, it lifted it for every later one."""
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture(autouse=True)
def _stays_inside_the_repository():
    seen = len(OUTSIDE_REPOSITORY)
    yield
    assert OUTSIDE_REPOSITORY[seen:] == [], "the test reached outside the repository"


# Class names with an inner and an edge space and a non-ASCII name ending in U+2028 (a line
# separator to str.splitlines(), legal in a folder name): each must survive every file format on
# the way from split to a served answer, unchanged.
COLOUR_CLASSES = {" blue sky": (40, 90, 220), "green": (40, 180, 60), "红\u2028": (220, 40, 40)}
CLASS_NAMES = sorted(COLOUR_CLASSES)  # label-index order
# 8 epochs were enough on AVX2 EPYC; on an AVX-512 Xeon seed 0 stopped at 0.83 val top-1 (CPU
# kinds round differently, and a few epochs from scratch amplify it). 12 reached 0.94-1.0 there
# across seeds 0-3 at lr 0.01; on a Zen 5 EPYC (AVX-512 bf16) seed 0 stopped at 0.86 / 0.83 val /
# test, and lr 0.02 reached 0.97-1.0 / 1.0 across seeds 0-3 in the same 12 epochs.
TINY_EPOCHS = 12
# Tests that compare scores with Paddle itself (dygraph, PaddleX) pin the reference variant:
# under `auto` a CPU with bf16 serves bf16, whose scores differ in the third decimal.
PADDLE_FP32 = {"engine": "paddle", "precision": "fp32"}


def tiny_fit(epochs: int = TINY_EPOCHS) -> list[str]:
    """x0.25 from scratch at 32 px: ~7 s, >= 0.9 on the colour set across seeds and CPU kinds."""
    return [
        "--model", "PPLCNet_x0_25", "--pretrained", "none", "--input-size", "32",
        "--resize-short", "36", "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.02",
        "--schedule", "cosine", "--crop-scale", "0.5,1", "--workers", "2",
    ]  # fmt: skip


def write_colour_dataset(root: Path, per_class: int = 60, size: int = 48, seed: int = 0) -> Path:
    """Noisy images whose class is their dominant colour: learnable in a few epochs from scratch."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOUR_CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.asarray(rgb, np.float32) + rng.normal(0, 25, 3)
            pixels = base + rng.normal(0, 30, (size, size + 8 * (i % 3), 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


def run_cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def bentoml_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The venv's `bentoml` command, run in the project folder."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), *args], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def refusal(env: dict[str, str]) -> str:
    """What `bentoml serve .` prints when it refuses to start (it exits: a server that restarts
    its workers forever would time out); on loopback ports, and a server that starts after all
    is stopped (and fails the test)."""
    server = Server(".", env)
    try:
        with pytest.raises(AssertionError, match="exited early"):
            server.wait_ready(timeout=300)
    finally:
        server.stop()
    # 0 would tell a supervisor that restarts on failure (systemd, docker) of a clean stop
    assert server.process.returncode == 1, server.process.returncode
    return server.output()


def refused_start(env: dict[str, str]) -> str:
    """The last line of ``refusal``: the reason, when the server's own check refused."""
    return refusal(env).strip().splitlines()[-1]


def workers(server: Server) -> list[int]:
    """PIDs of the live worker processes (a killed one lingers as a zombie until reaped)."""
    pids = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "worker.service" in " ".join(
                child.cmdline()
            ):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


# The engine race takes minutes (many variants of a large model on a slow machine): its child
# process sleeps first. Only that child: every process started reads this.
SLOW_RACE = """
import sys, time
if "lcnet_runner.choice" in " ".join(sys.orig_argv):
    time.sleep(120)
"""
RACE_CHILD = "lcnet_runner.choice"  # in a race child's command line


def slow_race(tmp_path: Path) -> dict[str, str]:
    """The environment for processes whose engine race (``RACE_CHILD``) sleeps 2 minutes first,
    with no race cached, so that they race."""
    hooks = tmp_path / "slow-race"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RACE)
    python_path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": python_path, "LCNET_CACHE": str(tmp_path / "cache")}


def child_of(pid: int, marker: str, timeout: float = 60.0) -> psutil.Process:
    """Until a process below ``pid`` runs with ``marker`` in its command line (a child of
    ``lcnet_runner.child.run_python``); that process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if marker in " ".join(process.cmdline()):
                    return process
        time.sleep(0.05)
    raise AssertionError(f"no process ran {marker!r} in {timeout}s")


def child_running(server: Server, marker: str) -> psutil.Process:
    """``child_of`` a server's process group leader: a worker's child."""
    try:
        return child_of(server.process.pid, marker)
    except AssertionError as err:
        raise AssertionError(f"{err}:\n{server.output()}") from None


def seconds_until_ended(pid: int, timeout: float) -> float:
    """How long process ``pid`` (not ours: a server's) took to end, or ``timeout``; a zombie,
    waiting for its parent to reap it, has ended."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return time.monotonic() - start


def replacement(server: Server, victim: int, count: int, timeout: float = 90.0) -> int:
    """The PID of the worker BentoML starts in place of ``victim`` (killed), once it exists."""
    deadline = time.monotonic() + timeout
    while victim in (live := workers(server)) or len(live) < count:
        assert time.monotonic() < deadline, f"worker {victim} was not replaced in {timeout}s"
        time.sleep(0.2)
    return max(live, key=lambda pid: psutil.Process(pid).create_time())


def model_info_from(server: Server, pid: int, until=lambda info: True, timeout: float = 90.0):
    """``GET /model`` as answered by worker ``pid``, once it says what ``until`` accepts: proof
    that this worker serves. Each request takes a new connection, which the kernel hands to any
    worker; answers from the others are skipped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = httpx.get(f"{server.url}/model", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            info = {}
        if info.get("worker", {}).get("pid") == pid and until(info):
            return info
        time.sleep(0.1)
    raise AssertionError(f"worker {pid} did not answer /model as expected in {timeout}s")


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_colour_dataset(tmp_path_factory.mktemp("data") / "colours")
    run_cli("train", "split", str(root))
    return root


@pytest.fixture(scope="session")
def trained(colour_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python -m train fit` on the colour set (with its INT8 variant when the int8 extra is
    installed); its final JSON line plus where it saved."""
    save_dir = tmp_path_factory.mktemp("run")
    int8 = ["--int8"] if importlib.util.find_spec("nncf") else []
    result = run_cli(
        "train", "fit", str(colour_dataset), *tiny_fit(), *int8, "--save-dir", str(save_dir)
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {**summary, "save_dir": save_dir, "dataset": colour_dataset, "stderr": result.stderr,
            "stdout": result.stdout}  # fmt: skip


@pytest.fixture(scope="session")
def server(trained: dict):
    """The repository's service (2 workers × 1 thread, the default on 2 cores) on the tiny model."""
    srv = Server(".", {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "2"}).wait_ready()
    yield srv
    srv.stop()
