"""Serving throughput and latency on loopback, with ratios measured side by side in one run.

    python bench/serve.py [--model PPLCNet_x1_0] [--seconds 6] [--clients 1,8,32,64]
    python bench/serve.py --variants auto,openvino/fp32,onnxruntime/fp32,paddle/fp32

Sets up a throwaway BentoML store with an exported PP-LCNet (random weights: speed does not
depend on them) and a 500×375 JPEG, then measures:
  in-process   one process, Predictor with all cores' threads, batches of 16,
               decode + preprocess + infer (the baseline)
  engine limit the same Predictor's engine alone on pre-decoded crops, batches of 16, all cores:
               what serving could reach if requests cost nothing outside the engine
  served       `bentoml serve` (defaults: 2 workers × 1 thread, greedy batching) under a closed-loop
               load of N concurrent clients, over HTTP and gRPC
  body, typed  the same server's /classify with the JPEG as the whole body (no multipart), and
               its typed /predict (BentoML's clients), at 1 client and at 32
  no batching  the same server with LCNET_MAX_BATCH_SIZE=1, at 32 clients (or the most given)
  overhead     served p50 at 1 client minus the in-process latency of one image on all cores
               (what the machine can do for a lone request), decode + preprocess + infer
  solo off     the server with LCNET_SOLO_THREADS=1 (a lone image on the worker's 1 thread),
               HTTP at 1 client and at 32: what running lone images on every core buys and costs
This machine's speed drifts by tens of percent within minutes, so only neighbours compare like
with like: the three modes' servers are up side by side (an idle server takes no CPU), each load
level is measured for every mode in turn, in an order rotated from level to level, and each
in-process figure just before the served figure it is compared with, while the servers idle.
The model has random weights, so the accuracy guard is skipped (LCNET_SKIP_GUARD=1). By default
the engine is `auto`, as a user's server has it: the fastest variant on this CPU at the workers'
thread count (int8 is quantized on smooth random images for timing only); the in-process figures
use the variant it chose. Name one with --engine/--precision, or several with --variants: each
is measured in turn and a table of the goals per variant ends the run.
Every load level is bounded in time (--seconds) and count (--max-requests).
The load generator is a single asyncio process (raw HTTP/1.1 keep-alive connections, grpc.aio
channels) so it takes as little CPU from the server as possible — it still shares the 2 cores, and
each level prints the cores it took (gRPC's client costs ~3× HTTP's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import (
    ROOT,
    cpu_kind,
    load,
    make_store,
    mean_batch_size,
    photo_jpeg,
    rotated,
    servers_up,
    throughput,
)

from lcnet_runner.hardware import default_threads
from lcnet_runner.testing import Server


class InProcess:
    """The in-process references, held for the whole run and measured next to each served figure
    they are compared with, while the server idles (the machine's speed drifts by tens of
    percent within minutes: pairs measured minutes apart compare two machines)."""

    def __init__(self, tag: str, image: bytes, engine: str, precision: str):
        from lcnet_runner import Predictor
        from lcnet_runner.preprocess import preprocess

        options = {"engine": engine, "precision": precision, "skip_guard": True}
        self.batched = Predictor(tag, batch_size=16, **options)
        self.single = Predictor(tag, batch_size=1, **options)
        self.image = image
        self.crops = np.stack([preprocess(image, self.batched.preprocess_config)] * 16)

    def pipeline(self, seconds: float) -> float:
        """img/s of the whole pipeline, batches of 16 on all cores' threads."""
        return throughput(lambda: self.batched.predict([self.image] * 16), 16, seconds)

    def engine_limit(self, seconds: float) -> float:
        """img/s of the engine alone on pre-decoded crops, batches of 16, all cores."""
        return throughput(lambda: self.batched.infer(self.crops), 16, seconds)

    def single_image_ms(self, seconds: float) -> float:
        """Median latency of one image on all cores: the best a lone request can get."""
        self.single.predict(self.image)
        latencies, until = [], time.perf_counter() + seconds
        while time.perf_counter() < until:
            start = time.perf_counter()
            self.single.predict(self.image)
            latencies.append(time.perf_counter() - start)
        return 1000 * statistics.median(latencies)


def measure_beside(reference: InProcess, clients: int, seconds: float) -> dict[str, float]:
    """The in-process figures a served level is compared with, measured just before it: a lone
    image's latency for 1 client, else the pipeline's and the engine's throughput."""
    if clients == 1:
        figures = {"ms": reference.single_image_ms(seconds / 2)}
        print(f"  in-process single image (all cores, batch 1): {figures['ms']:.2f} ms")
    else:
        figures = {
            "pipeline": reference.pipeline(seconds),
            "limit": reference.engine_limit(seconds / 2),
        }
        print(f"  in-process (1 process, {default_threads()} threads, batch 16): "
              f"{figures['pipeline']:.1f} img/s; engine {figures['limit']:.1f} img/s")  # fmt: skip
    return figures


# Beside the fast route's multipart upload ("http"), each measured at 1 client and at the
# compared level: the typed @bentoml.api route BentoML's clients call (a multipart upload to
# /predict), and /classify with the JPEG as the whole body (common.load's "body").
OTHER_HTTP = {"typed": "typed /predict", "body": "/classify, the JPEG as the body"}


def load_level(
    server: Server, protocol: str, image: bytes, clients: int, seconds: float, max_requests: int,
    per_connection: int = 20,
) -> dict:  # fmt: skip
    """Closed loop: each client sends its next request when the previous one answers."""
    sent, path = ("http", "/predict") if protocol == "typed" else (protocol, "/classify")
    return load(server, sent, image, clients, seconds, max_requests,
                path=path, per_connection=per_connection)  # fmt: skip


def plan(mode: str, levels: list[int], compared: int) -> list[tuple[str, int]]:
    """(protocol, clients) to measure: every level on the fast routes; the typed route (what
    BentoML's clients call) and the fast route with the image as the body at 1 client and at the
    compared level; without batching, only the compared level."""
    if mode == "solo off":
        return [("http", c) for c in dict.fromkeys([1, compared]) if c in levels]
    if mode != "batching":
        return [(protocol, compared) for protocol in ("http", "grpc")]
    others = [(p, c) for p in OTHER_HTTP for c in dict.fromkeys([1, compared]) if c in levels]
    return [(protocol, c) for protocol in ("http", "grpc") for c in levels] + others


Results = dict[tuple[str, str, int], dict]  # (mode, protocol, clients) → load figures
Beside = dict[tuple[str, int], dict[str, float]]  # (protocol, clients) → in-process neighbours
MODES = (("batching", {}), ("no batching", {"LCNET_MAX_BATCH_SIZE": "1"}),
         ("solo off", {"LCNET_SOLO_THREADS": "1"}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--seconds", type=float, default=6.0, help="per load level")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per load level")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--requests-per-connection", type=int, default=5)
    parser.add_argument("--engine", default="auto", help="auto | paddle | onnxruntime | openvino")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8")
    parser.add_argument(
        "--variants", default="", help="engine[/precision],... in turn, e.g. auto,paddle/fp32"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if max(levels) < 2:  # found out only after every level was measured
        parser.error("--clients: the ratios are taken at a level above 1, e.g. 1,32")
    print(cpu_kind())
    compared = 32 if 32 in levels else max(levels)  # the level the ratios are taken at
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    variants = variants or [(args.engine, args.precision)]

    tag = make_store(args.model, int8=any(p in ("int8", "auto") for _, p in variants))
    image = photo_jpeg()
    print(
        f"model {args.model} ({tag}), 500x375 JPEG of {len(image)} bytes, {default_threads()} cores"
    )
    table = {}
    for asked in variants:
        engine, precision = served_variant(tag, *asked)
        results, beside = measure(tag, image, engine, precision, args, levels, compared)
        table[f"{engine}/{precision}"] = report(results, beside, levels, compared)
    if len(table) > 1:
        print_goals(table, compared)


def parse_variant(text: str) -> tuple[str, str]:
    """``engine[/precision]`` → (engine, precision); the precision defaults to auto."""
    engine, _, precision = text.partition("/")
    return engine, precision or "auto"


def served_variant(tag: str, engine: str, precision: str) -> tuple[str, str]:
    """What the workers (1 thread each) will serve for ``engine``/``precision``: the same cached
    race they read."""
    from lcnet_runner import Predictor

    choice = Predictor(tag, engine=engine, precision=precision, threads=1, skip_guard=True).choice
    print(f"serving {choice.describe()}")
    return choice.variant.engine, choice.variant.precision


def measure(
    tag: str, image: bytes, engine: str, precision: str, args: argparse.Namespace,
    levels: list[int], compared: int,
) -> tuple[Results, Beside]:  # fmt: skip
    """Every mode's server of ``engine``/``precision`` under every planned load, each goal's
    in-process neighbour measured just before it. The modes' servers are up side by side (an
    idle server takes no CPU) and each load level is measured for every mode in turn, so the
    figures a ratio divides are seconds apart, not minutes."""
    reference = InProcess(tag, image, engine, precision)
    env = {"LCNET_MODEL": tag, "LCNET_ENGINE": engine, "LCNET_PRECISION": precision,
           "LCNET_SKIP_GUARD": "1"}  # fmt: skip
    results: Results = {}
    beside: Beside = {}
    starts = {
        mode: lambda extra=extra: Server(str(ROOT), {**env, **extra}) for mode, extra in MODES
    }
    with servers_up(starts) as servers:
        for i, (protocol, clients) in enumerate(all_levels(levels, compared)):
            for mode in modes_at((protocol, clients), levels, compared, rotation=i):
                if mode == "batching" and protocol in ("http", "grpc") and clients in (1, compared):
                    beside[(protocol, clients)] = measure_beside(reference, clients, args.seconds)
                r = measure_level(servers[mode], protocol, image, clients, args)
                results[(mode, protocol, clients)] = r
                print(
                    f"{mode:11s} {protocol:5s} {clients:3d} clients: {r['rps']:7.1f} req/s  "
                    f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                    f"errors {r['errors']}  503s {r['503']}  client {r['client_cores']:.2f} cores"
                )
        for mode, server in servers.items():
            print(f"{mode}: mean batch size formed {mean_batch_size(server.url):.2f}")
    return results, beside


def all_levels(levels: list[int], compared: int) -> list[tuple[str, int]]:
    """Every (protocol, clients) some mode measures, by client count: the protocols' figures
    at one count are neighbours too, and a lone client never follows the heaviest load."""
    planned = [level for mode, _ in MODES for level in plan(mode, levels, compared)]
    return sorted(dict.fromkeys(planned), key=lambda level: levels.index(level[1]))


def modes_at(level: tuple[str, int], levels: list[int], compared: int, rotation: int) -> list[str]:
    """The modes that measure ``level``, in an order rotated level by level."""
    return rotated([mode for mode, _ in MODES if level in plan(mode, levels, compared)], rotation)


def measure_level(server: Server, protocol: str, image: bytes, clients: int, args) -> dict:
    load_level(server, protocol, image, clients, 1.0, 200)  # warm-up
    return load_level(
        server, protocol, image, clients, args.seconds, args.max_requests,
        args.requests_per_connection,
    )  # fmt: skip


def goals(results: Results, beside: Beside, compared: int) -> dict[str, float]:
    """The goals' figures per protocol, each served figure against its in-process neighbour."""
    figures = {}
    for protocol in ("http", "grpc"):
        served, near = results[("batching", protocol, compared)], beside[(protocol, compared)]
        figures[f"{protocol} ÷ in-process"] = served["rps"] / near["pipeline"]
        figures[f"{protocol} ÷ engine limit"] = served["rps"] / near["limit"]
        if (protocol, 1) in beside:
            lone = results[("batching", protocol, 1)]["p50_ms"] - beside[(protocol, 1)]["ms"]
            figures[f"{protocol} overhead ms"] = lone
    return figures


def report(results: Results, beside: Beside, levels: list[int], compared: int) -> dict[str, float]:
    """Print the goals' figures and what else the run shows; return the goals' figures."""
    batching = {(protocol, clients): r for (mode, protocol, clients), r in results.items()
                if mode == "batching"}  # fmt: skip
    figures = goals(results, beside, compared)
    for protocol in ("http", "grpc"):
        off = results[("no batching", protocol, compared)]
        print(
            f"{protocol}: served@{compared} / in-process = "
            f"{figures[f'{protocol} ÷ in-process']:.2f} (target >= 1.0); batching on / off "
            f"@{compared} = {batching[(protocol, compared)]['rps'] / off['rps']:.2f} "
            "(reported, no target)"
        )
        print(f"{protocol}: served@{compared} / engine limit = "
              f"{figures[f'{protocol} ÷ engine limit']:.2f} "
              "(target >= 0.6 on AVX2, >= 0.45 with AMX bf16)")  # fmt: skip
        if f"{protocol} overhead ms" in figures:
            print(f"{protocol}: served p50 @1 client - in-process single image = "
                  f"{figures[f'{protocol} overhead ms']:.2f} ms (target <= 3)")  # fmt: skip
    for protocol, name in OTHER_HTTP.items():
        if (protocol, compared) in batching:
            ratio = batching[(protocol, compared)]["rps"] / batching[("http", compared)]["rps"]
            print(f"{name} ÷ fast /classify (multipart) @{compared} = {ratio:.2f}")
        if (protocol, 1) in batching and ("http", 1) in batching:
            extra = batching[(protocol, 1)]["p50_ms"] - batching[("http", 1)]["p50_ms"]
            print(f"{name} p50 @1 client - fast /classify p50 @1 client = {extra:.2f} ms")
    for clients in dict.fromkeys([1, compared]):
        on, off = batching.get(("http", clients)), results.get(("solo off", "http", clients))
        if on and off:
            ratio = on["rps"] / off["rps"]
            print(f"http @{clients}: lone images on every core ÷ on 1 thread: req/s {ratio:.2f}, "
                  f"p50 {on['p50_ms']:.1f} vs {off['p50_ms']:.1f} ms")  # fmt: skip
    top = max(levels)
    errors = sum(batching[(p, top)]["errors"] for p in ("http", "grpc"))
    print(f"errors or 503s at {top} clients: {errors}")
    return figures


def print_goals(table: dict[str, dict[str, float]], compared: int) -> None:
    """One line per variant: the goals' figures over HTTP / gRPC."""
    print(f"\n{'variant':18s} {'p50 @1 - in-process ms':>24s} {f'@{compared} ÷ in-process':>18s} "
          f"{f'@{compared} ÷ engine limit':>20s}   (HTTP / gRPC)")  # fmt: skip
    for variant, figures in table.items():
        cells = [
            " / ".join(f"{figures.get(f'{p} {goal}', float('nan')):.2f}" for p in ("http", "grpc"))
            for goal in ("overhead ms", "÷ in-process", "÷ engine limit")
        ]
        print(f"{variant:18s} {cells[0]:>24s} {cells[1]:>18s} {cells[2]:>20s}")


if __name__ == "__main__":
    main()
