"""Data-parallel training on CPUs with Paddle's own launcher (gloo), on one machine or several.

``python -m paddle.distributed.launch --nproc_per_node N train/__main__.py fit ...`` starts N
ranks (``--ips`` for several hosts); ``fit --procs N`` does that for you. Each rank trains on a
disjoint shard of the train split, gradients are averaged by ``paddle.DataParallel``, and only
rank 0 evaluates, writes checkpoints, exports and stores the model (batch-norm running statistics
are not synchronised across ranks, so rank 0's are the ones saved). A split cached on disk
(``decoded_cache``) is built by the first rank on each machine while the others wait for it; each
rank then reads its shard of it. Started by ``fit --procs N``, rank 0 writes to ``fit``'s own
console, so it reads as a single process; the launcher's output and the other ranks' go to
SAVE_DIR/logs.

Measured on 2 cores: 2 processes × 1 thread train PP-LCNet 1.6–1.9× faster than 1 process ×
2 threads (its small convolutions gain little from intra-op threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paddle
import paddle.distributed as dist

from lcnet_runner.hardware import default_threads, resolve_threads

from .console import Stopped

T = TypeVar("T")
# Below this many images per rank and step, batch-norm statistics get too noisy to split a batch.
MIN_BATCH_PER_RANK = 8
LAUNCHER_LOG = "launcher.log"  # in --log_dir, next to the ranks' workerlog.N
# Where rank 0 collects the console of the `fit` that started the launcher (see take_console).
CONSOLE_ENV = "LCNET_CONSOLE_SOCKET"


@dataclass(frozen=True)
class Rank:
    index: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0


SINGLE = Rank()  # not distributed


def init() -> Rank:
    """Join the process group when started by the launcher; a single process otherwise."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world <= 1:
        return SINGLE
    dist.init_parallel_env()
    rank = Rank(dist.get_rank(), dist.get_world_size())
    if rank.main:  # after init_parallel_env: its FLAGS dump and tcp_store lines stay in the log
        take_console()
    return rank


def local_main(rank: Rank) -> bool:
    """The first rank on this machine: it builds what the ranks here share (decoded caches)
    while they wait. The launcher numbers the ranks of each machine from 0."""
    return os.environ.get("PADDLE_LOCAL_RANK", str(rank.index)) == "0"


def shard(items: Sequence[T], rank: Rank) -> list[T]:
    """Equal-size shards that together hold every item, so every rank runs the same number of
    steps (a rank with one batch more would wait forever in all-reduce): as PyTorch's
    DistributedSampler does, the first items fill up the last shards (fewer than ``world``, each
    trained twice an epoch). Leaving the remainder out lost the same last images every epoch:
    in a list sorted by class, a last class of one image was never trained."""
    count = len(items)
    padded = [items[i % count] for i in range(-(-count // rank.world) * rank.world)]
    return padded[rank.index :: rank.world]


def all_reduce(values: Sequence[float], rank: Rank, op: str = "sum") -> list[float]:
    if rank.world == 1:
        return list(values)
    tensor = paddle.to_tensor(list(values), dtype="float64")
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return tensor.numpy().tolist()


def broadcast_flag(flag: bool, rank: Rank) -> bool:
    """Rank 0's decision (e.g. early stopping), for every rank."""
    if rank.world == 1:
        return flag
    tensor = paddle.to_tensor([int(flag)], dtype="int64")
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def auto_procs(batch_size: int, cores: int | None = None) -> int:
    """One process per core, as long as each still gets MIN_BATCH_PER_RANK images a step."""
    cores = resolve_threads(cores)
    return max(1, min(cores, batch_size // MIN_BATCH_PER_RANK))


def run_data_parallel(
    fit_args: Sequence[str], procs: str, batch_size: int, threads: int, save_dir: str | Path
) -> bool:
    """``fit --procs N|auto``: re-run ``fit`` with several ranks when that means more than one
    process and this is not a rank already; True when it did. A failed run exits with its code."""
    count = auto_procs(batch_size) if procs == "auto" else int(procs)
    if "PADDLE_TRAINERS_NUM" in os.environ:
        return False
    if count <= 1:
        cores = default_threads()
        if procs == "auto" and cores > 1:  # the README's speed-up, missed unseen
            print(f"training in 1 process: a batch of {batch_size} gives each core fewer than "
                  f"{MIN_BATCH_PER_RANK} images a step (--batch-size {MIN_BATCH_PER_RANK * cores} "
                  f"trains on {cores} processes)", file=sys.stderr)  # fmt: skip
        return False
    threads = threads or max(1, default_threads() // count)
    log_dir = Path(save_dir) / "logs"
    print(
        f"training with {count} data-parallel processes x {threads} threads "
        f"(logs of every rank in {log_dir})",
        file=sys.stderr,
    )
    code = launch(fit_args, count, log_dir, threads)
    if code:
        print(f"data-parallel training failed (exit code {code}); see {log_dir}", file=sys.stderr)
        raise SystemExit(code)
    return True


def launch(fit_args: Sequence[str], procs: int, log_dir: Path, threads: int) -> int:
    """Re-run ``fit`` under ``paddle.distributed.launch`` with ``procs`` ranks; its exit code.

    The launcher's own output (its config dump, status lines and a copy of rank 0's log) goes to
    LOG_DIR/launcher.log; rank 0 writes to this process's stdout and stderr (``take_console``)."""
    entry = Path(__file__).with_name("__main__.py")
    # The user's --procs/--threads come first: argparse keeps the last, so each rank is one
    # process with its share of the threads.
    command = [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(procs),
        "--log_dir", str(log_dir), str(entry), "fit", *fit_args,
        "--procs", "1", "--threads", str(threads),
    ]  # fmt: skip
    # The entry script runs outside its package: make the package importable by path.
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    with (
        # A private (0700) folder: no other user may connect and be handed this terminal.
        tempfile.TemporaryDirectory(prefix="lcnet-") as private,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server,
        open(log_dir / LAUNCHER_LOG, "w") as chatter,
    ):
        env[CONSOLE_ENV] = address = os.path.join(private, "console")
        server.bind(address)
        server.listen()
        # A session of its own: a signal for `fit` reaches the launcher only through
        # ``stopped_together``, once, whoever sent it (a terminal signals its whole group).
        with (
            subprocess.Popen(
                command,
                env=env,
                stdout=chatter,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_dies_with_its_parent,
            ) as proc,  # fmt: skip
            stopped_together(proc) as received,
        ):
            code = lend_console(server, proc)
    if received and code:  # they have ended, not finished: now `fit` ends as it was told
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Stopped(received[0])
    return code  # a signal after rank 0 stored the model changes nothing


@contextlib.contextmanager
def stopped_together(launcher: subprocess.Popen) -> Iterator[list[int]]:
    """While the launcher runs, SIGINT, SIGTERM and SIGHUP sent to `fit` (Ctrl+C, ``kill``,
    ``timeout``, a job scheduler, a closed terminal) go on to the launcher, which ends its ranks
    (a second signal: within 10 s). Yields the signals received. Without this, a `fit` killed
    by pid said "interrupted" while its ranks trained on and later stored a model."""
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            # The launcher ends its ranks on SIGINT and SIGTERM; SIGHUP would end it alone.
            launcher.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {stop: signal.signal(stop, forward) for stop in stops}
    try:
        yield received
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _dies_with_its_parent() -> None:
    """In the launcher, before it starts: SIGTERM when `fit` dies, however it dies (``kill -9``
    too), which ends the ranks as any SIGTERM does; not to be trained on and stored by nobody's
    command. Linux's prctl(PR_SET_PDEATHSIG); elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def lend_console(server: socket.socket, launcher: subprocess.Popen) -> int:
    """Until the launcher exits, pass this process's stdout and stderr to whoever connects
    (rank 0). Descriptors, not paths: the launcher closes inherited ones, and re-opening a file
    by path would start at its beginning; sent over a Unix socket they are the very same files."""
    server.settimeout(0.2)
    while launcher.poll() is None:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        with connection:  # fds 1 and 2 themselves, whatever sys.stdout/stderr were replaced by
            socket.send_fds(connection, [b"console"], [1, 2])
    return launcher.returncode


def take_console() -> None:
    """In rank 0 of ``fit --procs N``: write to the console ``fit`` was started from, as a single
    process does (rank 0's log file, which the launcher copies with its own chatter, is left)."""
    address = os.environ.get(CONSOLE_ENV)
    if not address:  # started by the launcher directly (e.g. several hosts): keep the log file
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(address)
        _, fds, _, _ = socket.recv_fds(client, 16, 2)
    sys.stdout.flush()
    sys.stderr.flush()
    console_out, console_err = fds
    os.dup2(console_err, 2)
    os.close(console_err)
    # Python's stdout only, not fd 1: stdout carries the result, and native writes to fd 1 stay
    # in the rank's log, among them the C++ stack Paddle dumps when the launcher ends the ranks
    # with SIGTERM after a Ctrl+C. A terminal wants each line as it comes.
    buffering = 1 if os.isatty(console_out) else -1  # 1: by line
    sys.stdout = open(console_out, "w", encoding="utf-8", buffering=buffering)  # noqa: SIM115
