"""Memory of a whole `bentoml serve` at defaults, idle and after a bounded load: every process
(arbiter included), as PSS so shared libraries are not counted twice.

    python bench/memory.py [--model PPLCNet_x1_0] [--seconds 2]

Serves an exported model (random weights, INT8 included; the guard is skipped) from a fresh
engine-choice cache, so the first start races — the worst case — then with a lone image on one
thread (LCNET_SOLO_THREADS=1), then with batches of at most 8 (LCNET_MAX_BATCH_SIZE=8: engines
keep kernels and buffers per batch size), then with the variant named outright (no race at all),
then with Paddle fp32. Each server is measured idle (every batch size already warmed), then after
closed-loop HTTP loads of 1 to 64 clients (--seconds each, at most 2,000 requests each), which
form batches of every size: the memory it holds once it has served.
"""

from __future__ import annotations

import argparse
import os

import psutil
from common import ROOT, closed_loop, cpu_kind, make_store, multipart, photo_jpeg, scratch_dir

from lcnet_runner.testing import Server

LOADS = (1, 4, 8, 16, 32, 64)  # clients
Reading = tuple[float, list[tuple[str, float]]]  # MiB in all, and (process role, MiB) each


def pss_mib(server: Server) -> Reading:
    """The server's PSS in all, and per process."""
    root = psutil.Process(server.process.pid)
    rows = []
    for process in [root, *root.children(recursive=True)]:
        try:
            role = "arbiter" if process is root else f"worker {process.pid}"
            rows.append((role, process.memory_full_info().pss / 2**20))
        except psutil.Error:
            continue
    return sum(pss for _, pss in rows), rows


def idle_and_loaded(env: dict[str, str], seconds: float) -> tuple[Reading, Reading]:
    server = Server(str(ROOT), env).wait_ready().wait_settled()  # every worker loaded
    try:
        idle = pss_mib(server)
        request = multipart([photo_jpeg()], server.http_port)
        for clients in LOADS:
            closed_loop(server.http_port, request, clients, seconds, 2000)
        return idle, pss_mib(server)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--seconds", type=float, default=2.0, help="per load level")
    args = parser.parse_args()
    print(cpu_kind())
    os.environ["LCNET_CACHE"] = str(scratch_dir("lcnet-bench-cache-"))  # a fresh race
    tag = make_store(args.model, int8=True)
    base = {"LCNET_MODEL": tag, "LCNET_SKIP_GUARD": "1"}
    for name, env in (
        ("defaults (first start: races)", {}),
        ("lone image on 1 thread", {"LCNET_SOLO_THREADS": "1"}),
        # engines keep kernels and buffers per batch size: what halving the sizes saves
        ("batches of at most 8", {"LCNET_MAX_BATCH_SIZE": "8"}),
        ("openvino/int8 named", {"LCNET_ENGINE": "openvino", "LCNET_PRECISION": "int8"}),
        ("paddle/fp32 named", {"LCNET_ENGINE": "paddle", "LCNET_PRECISION": "fp32"}),
    ):
        (idle, rows), (loaded, _) = idle_and_loaded({**base, **env}, args.seconds)
        parts = ", ".join(f"{role} {pss:.0f}" for role, pss in rows)
        print(f"{name}: {idle:.0f} MiB PSS idle ({parts}); {loaded:.0f} MiB after serving "
              f"{'/'.join(map(str, LOADS))} clients")  # fmt: skip


if __name__ == "__main__":
    main()
