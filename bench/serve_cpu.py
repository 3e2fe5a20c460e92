"""Where a served request's CPU goes: per worker, its event loop against its other threads.

    python bench/serve_cpu.py [--protocol grpc|body] [--clients 32] [--seconds 12] [--env ...]

Starts `bentoml serve` at its defaults (x1.0 with random weights and INT8, guard skipped), loads
it with N closed-loop clients sending the 500×375 JPEG (HTTP: /classify, multipart or with
``--protocol body`` the JPEG as the body; gRPC: Classify, one channel each), and reads every
thread's CPU time from /proc before and after: the worker's main thread is its event loop (HTTP
or gRPC handling, decoding, answers), the rest is mostly the engine (and, over gRPC, grpc's own
threads). Prints CPU ms per request of each, the machine's idle and steal cores (what the load
left unused) and the mean batch. Bounded by --seconds and --max-requests. Linux only (per-thread
times from /proc, through psutil).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import psutil
from common import PROTOCOLS, ROOT, cpu_kind, load, make_store, mean_batch_size, photo_jpeg

from lcnet_runner.testing import Server


def thread_cpu(root_pid: int) -> Counter:
    """CPU seconds per (worker pid, 'event loop' | 'other threads') of the server's workers."""
    seconds: Counter = Counter()
    root = psutil.Process(root_pid)
    for process in root.children(recursive=True):
        try:
            for thread in process.threads():
                kind = "event loop" if thread.id == process.pid else "other threads"
                seconds[(process.pid, kind)] += thread.user_time + thread.system_time
        except psutil.Error:
            continue
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument(
        "--env", action="extend", nargs="+", default=[], help="LCNET_X=value for the server"
    )
    args = parser.parse_args()
    print(cpu_kind())
    tag = make_store(args.model, int8=True)
    env = {"LCNET_MODEL": tag, "LCNET_SKIP_GUARD": "1"}
    env.update(item.split("=", 1) for item in args.env)
    server = Server(str(ROOT), env).wait_ready(timeout=180).wait_settled()
    try:
        image = photo_jpeg()
        load(server, args.protocol, image, args.clients, 2.0, 2_000)  # warm-up
        cores_before, threads_before = psutil.cpu_times(), thread_cpu(server.process.pid)
        start = time.perf_counter()
        result = load(server, args.protocol, image, args.clients, args.seconds, args.max_requests)
        elapsed = time.perf_counter() - start
        cores_after, threads_after = psutil.cpu_times(), thread_cpu(server.process.pid)
        requests = result["rps"] * elapsed
        print(f"{args.clients} {args.protocol} clients: {result['rps']:.1f} req/s, "
              f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
              f"errors {result['errors']}; "
              f"mean batch {mean_batch_size(server.url):.2f}")  # fmt: skip
        # Per request a worker answered, assuming the workers split the requests evenly.
        share = requests / max(1, len({pid for pid, _ in threads_after}))
        total = 0.0
        for (pid, kind), after in sorted(threads_after.items()):
            used = after - threads_before.get((pid, kind), 0.0)
            total += used
            print(f"  worker {pid} {kind:13s} {used:6.2f} s CPU, {1000 * used / share:5.2f} ms "
                  "per request it answered")  # fmt: skip
        unused = {
            field: (getattr(cores_after, field) - getattr(cores_before, field)) / elapsed
            for field in ("idle", "steal")
            if hasattr(cores_after, field)
        }
        print(f"  server {total / elapsed:.2f} cores, {1000 * total / requests:.2f} ms CPU per "
              f"request; load generator {result['client_cores']:.2f} cores; machine unused: "
              + ", ".join(f"{k} {v:.2f} cores" for k, v in unused.items()))  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
