"""A worker's memory under a burst of large uploads, with the held-bytes bound and without.

    python bench/burst_memory.py [--uploads 100] [--megabytes 17] [--protocols http,grpc]

One server per setting, one worker each (the tiny PP-LCNet x0.25, random weights; the guard is
skipped): the defaults (``LCNET_MAX_HELD_BYTES`` 256 MiB) and ``LCNET_MAX_HELD_BYTES=0`` (no
bound). Each protocol sends --uploads JPEGs of about --megabytes MB at once (a multipart POST
to /classify on a connection each; gRPC ``Classify`` on a channel each), every upload under the
body limit and the image bound. Prints the answers, and the worker's RSS before, at its peak
(sampled every 10 ms) and 2 s after the burst, side by side in one run. A refused upload (503 /
UNAVAILABLE) is one a client retries; a worker past its container's memory limit is killed
with every request it held.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psutil
from common import ROOT, cpu_kind, make_store, multipart, send_http, servers_up
from PIL import Image

from lcnet_runner.testing import Server

SETTINGS = {"bounded (defaults)": {}, "no bound": {"LCNET_MAX_HELD_BYTES": "0"}}


def noise_jpeg(megabytes: float) -> tuple[bytes, str]:
    """A 4:3 JPEG of noise of about ``megabytes`` MB (quality 90: ~0.85 byte a pixel), and its
    size as ``W×H``: what decodes slowest for its bytes."""
    height = int((megabytes * 1e6 / 0.85 / 12) ** 0.5) * 3
    width = height * 4 // 3
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), f"{width}×{height}"


@contextmanager
def peak_rss(process: psutil.Process) -> Iterator[list[int]]:
    """``[peak]``: the largest RSS of ``process`` sampled every 10 ms meanwhile, in bytes."""
    peak, done = [process.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


async def http_upload(server: Server, image: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        return str(await send_http(reader, writer, multipart([image], server.http_port)))
    finally:
        writer.close()


async def grpc_upload(server: Server, image: bytes) -> str:
    import grpc

    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as ch:
        try:
            await lcnet_pb2_grpc.ClassifierStub(ch).Classify(
                lcnet_pb2.ClassifyRequest(image=image), timeout=120
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
    return "OK"


def burst(server: Server, protocol: str, image: bytes, uploads: int) -> str:
    """The burst's answers and what the worker's RSS did, as one line."""
    [worker] = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                if "worker.service" in " ".join(p.cmdline())]  # fmt: skip
    upload = http_upload if protocol == "http" else grpc_upload

    async def all_at_once() -> list[str]:
        return await asyncio.gather(*(upload(server, image) for _ in range(uploads)))

    before = worker.memory_info().rss
    with peak_rss(worker) as peak:
        start = time.monotonic()
        answers = Counter(asyncio.run(all_at_once()))
        seconds = time.monotonic() - start
        time.sleep(2)
    after = worker.memory_info().rss
    mib = [round(value / 2**20) for value in (before, peak[0], after)]
    return (f"RSS {mib[0]} → peak {mib[1]} → {mib[2]} MiB 2 s after; answers "
            f"{dict(answers)} in {seconds:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--megabytes", type=float, default=17)
    parser.add_argument("--protocols", default="http,grpc")
    args = parser.parse_args()
    print(cpu_kind())
    image, size = noise_jpeg(args.megabytes)
    tag = make_store("PPLCNet_x0_25")
    env = {"LCNET_MODEL": tag, "LCNET_WORKERS": "1", "LCNET_SKIP_GUARD": "1"}
    starts = {name: (lambda extra=extra: Server(str(ROOT), {**env, **extra}))
              for name, extra in SETTINGS.items()}  # fmt: skip
    print(f"{args.uploads} uploads at once of a {size} JPEG, {len(image) / 1e6:.1f} MB; one worker")
    with servers_up(starts) as servers:
        for protocol in args.protocols.split(","):
            for name, server in servers.items():
                print(f"{protocol:4} {name:18} {burst(server, protocol, image, args.uploads)}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
