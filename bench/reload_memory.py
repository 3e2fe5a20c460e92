"""Worker memory over repeated model reloads: a swapped-out version must be released.

    python bench/reload_memory.py [--model PPLCNet_x1_0] [--swaps 10] [--race-every-other]

Serves an exported model (random weights, INT8 included; the guard is skipped) at defaults with
LCNET_RELOAD=request, then saves a new version and asks for it (POST /admin/reload) --swaps
times, waiting each time until answers come from the new version on every worker. Prints each
worker's RSS after start and after every swap; the goal is no growth beyond one model's worth
between the first swap and the last (the first swap may still settle allocator pools), and how
long each swap took. With --race-every-other, the engine race is forgotten before every other
swap, so those versions race again as every version did before a model's versions shared it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from common import ROOT, cpu_kind, make_store, photo_jpeg, scratch_dir

from lcnet_runner.artifact import load_folder
from lcnet_runner.testing import Server

TOKEN = "bench-token"


def workers_rss_mib(server: Server) -> list[float]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return sorted(p.memory_info().rss / 2**20 for p in children)


def wait_for_version(server: Server, image: bytes, tag: str, timeout: float = 180) -> None:
    """Until 20 answers in a row (new connections, so every worker) come from ``tag``."""
    until, streak = time.monotonic() + timeout, 0
    while streak < 20:
        if time.monotonic() > until:
            raise SystemExit(f"workers did not switch to {tag}: {server.output()[-2000:]}")
        response = httpx.post(f"{server.url}/classify", files={"image": image})
        streak = streak + 1 if response.headers.get("x-model-version") == tag else 0
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--race-every-other", action="store_true")
    args = parser.parse_args()
    print(cpu_kind())
    first = make_store(args.model, int8=True)

    import bentoml

    from train.export import save_to_store

    folder = Path(bentoml.models.get(first).path)
    races = scratch_dir("lcnet-bench-cache-")
    env = {"LCNET_MODEL": "bench", "LCNET_SKIP_GUARD": "1", "LCNET_RELOAD": "request",
           "LCNET_ADMIN_TOKEN": TOKEN, "LCNET_CACHE": str(races)}  # fmt: skip
    server = Server(str(ROOT), env).wait_ready()
    image = photo_jpeg()
    try:
        wait_for_version(server, image, first)
        rows = [("start", workers_rss_mib(server))]
        for swap in range(1, args.swaps + 1):
            with tempfile.TemporaryDirectory() as tmp:  # the same model, a new version
                copy = Path(tmp) / "model"
                shutil.copytree(folder, copy)
                tag = save_to_store(copy, "bench", load_folder(copy).info)
            race = args.race_every_other and swap % 2 == 1
            if race:
                shutil.rmtree(races / "engine-choice")
            started = time.perf_counter()
            response = httpx.post(f"{server.url}/admin/reload", json={"tag": tag},
                                  headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
            assert response.status_code == 202, response.text
            wait_for_version(server, image, tag)
            seconds = time.perf_counter() - started
            time.sleep(1)  # the old version closes once its last request answered
            label = f"swap {swap} ({seconds:.1f} s{', raced again' if race else ''})"
            rows.append((label, workers_rss_mib(server)))
        for name, rss in rows:
            print(f"{name:30s} worker RSS MiB: {', '.join(f'{r:.0f}' for r in rss)}")
        after_first = sum(rows[1][1])
        growth = sum(rows[-1][1]) - after_first
        print(f"growth from swap 1 to swap {args.swaps}, all workers: {growth:+.0f} MiB "
              f"(start → swap 1: {after_first - sum(rows[0][1]):+.0f} MiB)")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
