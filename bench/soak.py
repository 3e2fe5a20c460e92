"""Soak: a fixed number of mixed requests at high concurrency; errors and memory growth.

    python bench/soak.py [--requests 5000] [--clients 64] [--model PPLCNet_x1_0]
                         [--engine openvino --precision bf16]

Starts `bentoml serve .` with the default configuration (and the engine named, accuracy guard
skipped: the model has random weights) on a throwaway store, then sends
--requests requests from --clients concurrent loopback clients, each request drawn at random:
40 % HTTP /classify, 10 % HTTP /classify_batch (4 images), 40 % gRPC Classify, 10 % gRPC
ClassifyBatch. Bounded by count and by --max-seconds. Reports errors, 503s, throughput, and the
resident memory of every server process after each thousand requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import httpx
import psutil
from common import (
    REQUEST_TIMEOUT_S,
    ROOT,
    cpu_kind,
    make_store,
    multipart,
    photo_jpeg,
    send_http,
)


def rss_mib(server) -> dict[int, float]:
    processes = [
        psutil.Process(server.process.pid),
        *psutil.Process(server.process.pid).children(recursive=True),
    ]
    sizes = {}
    for process in processes:
        try:
            sizes[process.pid] = process.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return sizes


async def soak(server, image: bytes, requests: int, clients: int, max_seconds: float) -> dict:
    import grpc

    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    single = multipart([image], server.http_port)
    batch = multipart([image] * 4, server.http_port, "/classify_batch", "images")
    grpc_single = lcnet_pb2.ClassifyRequest(image=image)
    grpc_batch = lcnet_pb2.ClassifyBatchRequest(images=[image] * 4)
    counts = {"sent": 0, "ok": 0, "errors": 0, "503": 0, "reconnects": 0}
    address = ("127.0.0.1", server.http_port)
    kinds = {"http": 0, "http batch": 0, "grpc": 0, "grpc batch": 0}
    memory: dict[str, dict[int, float]] = {}
    deadline = time.perf_counter() + max_seconds

    def record(status: int) -> None:
        counts["ok" if status == 200 else "errors"] += 1
        counts["503"] += status == 503
        done = counts["ok"] + counts["errors"]
        if done % 1000 == 0:
            memory[done] = rss_mib(server)

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=options
        ) as channel:
            stub = lcnet_pb2_grpc.ClassifierStub(channel)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
            try:
                while counts["sent"] < requests and time.perf_counter() < deadline:
                    counts["sent"] += 1
                    kind = rng.choices(list(kinds), weights=(4, 1, 4, 1))[0]
                    kinds[kind] += 1
                    try:
                        async with asyncio.timeout(REQUEST_TIMEOUT_S):  # a stalled server
                            if kind.startswith("http"):
                                request = single if kind == "http" else batch
                                try:
                                    status = await send_http(reader, writer, request)
                                except ConnectionResetError:
                                    # The server closed the idle keep-alive connection (uvicorn's
                                    # 5 s timeout while this client was busy with gRPC): reconnect
                                    # and resend, as HTTP clients do.
                                    counts["reconnects"] += 1
                                    writer.close()
                                    reader, writer = await asyncio.open_connection(*address)
                                    status = await send_http(reader, writer, request)
                            elif kind == "grpc":
                                await stub.Classify(grpc_single, timeout=REQUEST_TIMEOUT_S)
                                status = 200
                            else:
                                await stub.ClassifyBatch(grpc_batch, timeout=REQUEST_TIMEOUT_S)
                                status = 200
                    except grpc.aio.AioRpcError as err:
                        status = 503 if err.code() == grpc.StatusCode.UNAVAILABLE else 500
                    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as err:
                        print(f"{kind}: {err!r}", file=sys.stderr)
                        status = 599
                        reader, writer = await asyncio.open_connection(
                            "127.0.0.1", server.http_port
                        )
                    record(status)
            finally:
                writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    memory[counts["ok"] + counts["errors"]] = rss_mib(server)
    return {**counts, "kinds": kinds, "seconds": elapsed, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--engine", default="auto", help="auto: the variant the race picks here")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    print(cpu_kind())

    from lcnet_runner.testing import Server

    tag = make_store(args.model, int8=args.precision == "int8")
    env = {"LCNET_MODEL": tag, "LCNET_ENGINE": args.engine, "LCNET_PRECISION": args.precision,
           "LCNET_SKIP_GUARD": "1"}  # fmt: skip
    server = Server(str(ROOT), env).wait_ready()
    served = httpx.get(f"{server.url}/model").json()["engine_choice"]["variant"]
    print(f"serving {tag} on {served}")
    try:
        result = asyncio.run(
            soak(server, photo_jpeg(), args.requests, args.clients, args.max_seconds)
        )
    finally:
        server.stop()
    problems = [line for line in server.output().splitlines() if "ERROR" in line]
    print(f"server log: {len(problems)} error lines", *problems[:5], sep="\n  ")
    done = result["ok"] + result["errors"]
    print(f"{args.model}: {done} requests ({result['kinds']}) from {args.clients} clients "
          f"in {result['seconds']:.1f}s = {done / result['seconds']:.1f} req/s")  # fmt: skip
    print(
        f"ok {result['ok']}, errors {result['errors']}, 503s {result['503']}, "
        f"idle keep-alive connections re-opened {result['reconnects']}"
    )
    samples = result["memory"]
    print("resident memory (MiB) of each server process after N requests:")
    print("  N      " + "  ".join(f"pid {pid:>7}" for pid in samples[max(samples)]))
    for n, sizes in sorted(samples.items()):
        print(
            f"  {n:<6} " + "  ".join(f"{sizes.get(pid, 0):11.1f}" for pid in samples[max(samples)])
        )
    first, last = samples.get(1000, {}), samples[max(samples)]
    if growth := {pid: round(last[pid] - first[pid], 1) for pid in last if pid in first}:
        print(f"growth from the first to the last thousand requests: {growth} MiB")


if __name__ == "__main__":
    main()
