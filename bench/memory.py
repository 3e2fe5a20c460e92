"""Idle memory of a whole `bentoml serve` at defaults: every process (arbiter included), as PSS
so shared libraries are not counted twice.

    python bench/memory.py [--model PPLCNet_x1_0]

Serves an exported model (random weights, INT8 included; the guard is skipped) from a fresh
engine-choice cache, so the first start races — the worst case — then with a lone image on one
thread (LCNET_SOLO_THREADS=1), then with the variant named outright (no race at all).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import psutil
from common import ROOT, make_store

from lcnet_runner.testing import Server


def idle_pss_mib(env: dict[str, str]) -> tuple[float, list[tuple[str, float]]]:
    server = Server(str(ROOT), env).wait_ready()
    time.sleep(3)  # let start-up allocations settle
    try:
        root = psutil.Process(server.process.pid)
        rows = []
        for process in [root, *root.children(recursive=True)]:
            try:
                role = "arbiter" if process is root else f"worker {process.pid}"
                rows.append((role, process.memory_full_info().pss / 2**20))
            except psutil.Error:
                continue
        return sum(pss for _, pss in rows), rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    args = parser.parse_args()
    os.environ["LCNET_CACHE"] = tempfile.mkdtemp(prefix="lcnet-bench-cache-")  # a fresh race
    tag = make_store(args.model, int8=True)
    base = {"LCNET_MODEL": tag, "LCNET_SKIP_GUARD": "1"}
    for name, env in (
        ("defaults (first start: races)", {}),
        ("lone image on 1 thread", {"LCNET_SOLO_THREADS": "1"}),
        ("openvino/int8 named", {"LCNET_ENGINE": "openvino", "LCNET_PRECISION": "int8"}),
    ):
        total, rows = idle_pss_mib({**base, **env})
        parts = ", ".join(f"{role} {pss:.0f}" for role, pss in rows)
        print(f"{name}: {total:.0f} MiB PSS ({parts})")


if __name__ == "__main__":
    main()
