"""Pieces the benchmarks share: a model to measure, a photo, a bounded timing loop, the cheapest
HTTP client, and servers kept up side by side (benchmarks never import each other or the
tests)."""

from __future__ import annotations

import asyncio
import atexit
import functools
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]  # the project folder `bentoml serve` is started in
logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls: a line each at INFO


def scratch_dir(prefix: str = "lcnet-bench-", within: str | None = None) -> Path:
    """A temporary folder removed when the benchmark exits: stores and exported x1.0 models
    left behind ~50 MB a run in /tmp."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=within))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@contextmanager
def servers_up(starts: dict[str, Callable[[], Any]]) -> Iterator[dict[str, Any]]:
    """Servers side by side: each started (``starts``: name → a call returning a
    ``lcnet_runner.testing.ServerProcess``), then all waited for, so they load together, until
    every one idles (all its workers loaded); all stopped at the end, whatever happened. An idle
    server takes no CPU (measured: ≤ 0.02 CPU s per second), so the ones not under load do not
    disturb the one that is."""
    servers: dict[str, Any] = {}
    try:
        for name, start in starts.items():
            servers[name] = start()
        for server in servers.values():
            server.wait_ready(timeout=180)
        for server in servers.values():
            server.wait_settled()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def cpu_kind() -> str:
    """This machine as every benchmark's first line names it (docs/benchmarks.md writes it next to
    each figure: engine rankings differ between CPU kinds): the CPU model, the flags the engines'
    speed depends on, and the cores."""
    from lcnet_runner.hardware import cpu_features, default_threads

    cpu, usable = cpu_features(), default_threads()
    cores = f"{usable} cores" + (f" of {os.cpu_count()}" if usable != os.cpu_count() else "")
    return f"CPU: {cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'}), {cores}"


def rotated(items: Sequence, turn: int) -> list:
    """``items`` starting at ``turn`` (modulo their count): what is measured first changes from
    one round or level to the next, so that no server always meets the machine first."""
    turn %= len(items)
    return [*items[turn:], *items[:turn]]


def smooth_images(count: int, size: int = 224, seed: int = 0):
    """Smooth random uint8 images (NHWC): natural-image-like statistics, no dataset needed."""
    cells = (np.random.default_rng(seed).random((count, 7, 7, 3)) * 255).astype(np.uint8)
    return cells.repeat(-(-size // 7), 1).repeat(-(-size // 7), 2)[:, :size, :size]


def export_random_model(model: str, folder: Path, int8: bool = False) -> dict[str, Any]:
    """A seeded, randomly initialised 1000-class model exported with its ONNX file (speed does
    not depend on the weights) and, with ``int8``, an INT8 variant calibrated on smooth random
    images (fine for timing, meaningless for accuracy); returns its info."""
    import importlib.util

    import paddle

    from lcnet_runner.preprocess import PreprocessConfig
    from train.export import export_inference, export_onnx
    from train.model import build_model

    paddle.seed(0)
    labels = [f"class_{i}" for i in range(1000)]
    info = {"architecture": model, "classes": labels}
    export_inference(build_model(model, 1000), folder, architecture=model, labels=labels,
                     preprocess=PreprocessConfig(), info=info)  # fmt: skip
    export_onnx(folder)  # for the onnxruntime / openvino engines, when installed
    if int8 and importlib.util.find_spec("nncf"):
        from train.quantize import quantize_openvino

        quantize_openvino(folder, smooth_images(100), accuracy_control=False)
    return info


def every_variant(folder: Path, threads: int, batch_size: int = 16) -> dict:
    """A Predictor per engine × precision that runs here, Paddle fp32 first; the guard is
    skipped (random weights: timing only). Prints what it skips and why."""
    from lcnet_runner.predictor import each_variant

    def skipped(variant, reason: str) -> None:
        print(f"  skipped {variant}: {reason}")

    return dict(each_variant(folder, threads=threads, batch_size=batch_size, on_skip=skipped))


def throughput(call: Callable[[], object], items_per_call: int, seconds: float) -> float:
    """Items per second of ``call`` repeated for ``seconds`` (after one warm-up call)."""
    call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        done += items_per_call
    return done / (time.perf_counter() - start)


def photo_jpeg(width: int = 500, height: int = 375) -> bytes:
    """A photo-sized JPEG with texture, so decoding costs what a real photo costs."""
    buffer = io.BytesIO()
    photo(width, height).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def large_image(kind: str) -> bytes:
    """What users also send: a 12 MP phone photo ("photo", 4032×3024 JPEG) or a 4 MP PNG
    ("png", 2400×1800, e.g. a screenshot or an export from an editor)."""
    if kind == "photo":
        return photo_jpeg(4032, 3024)
    buffer = io.BytesIO()
    photo(2400, 1800).save(buffer, "PNG")
    return buffer.getvalue()


LARGE_KINDS = ("photo", "png")


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients, noise and a few shapes: costs what a real photo costs to decode."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 0.4, y * 0.6, (x + y) * 0.2], axis=-1) + rng.normal(
        0, 20, (height, width, 3)
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(20):
        x0, y0 = rng.integers(0, width - 50), rng.integers(0, height - 50)
        draw.ellipse(
            (x0, y0, x0 + 50, y0 + 40), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return image


def make_store(model: str, int8: bool = False) -> str:
    """A 1000-class model in a temporary store; returns its tag."""
    os.environ["BENTOML_HOME"] = str(scratch_dir())
    from train.export import save_to_store

    folder = scratch_dir() / "model"
    return save_to_store(folder, "bench", export_random_model(model, folder, int8=int8))


def multipart(images: list[bytes], port: int, path: str = "/classify", field: str = "image"):
    """A complete HTTP/1.1 request, built once and replayed (the cheapest possible client)."""
    boundary = "lcnetbench"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return post(port, path, f"multipart/form-data; boundary={boundary}", body)


def post(port: int, path: str, content_type: str, body: bytes) -> bytes:
    """A complete HTTP/1.1 POST on loopback, built once and replayed."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


# A stalled server fails its requests (counted as 504) instead of hanging the benchmark.
REQUEST_TIMEOUT_S = 30.0


async def send_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
    """Send one prepared request on a keep-alive connection; returns the status code."""
    writer.write(request)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def http_client(
    port: int, request: bytes, until: float, budget: list[int], out: list, per_connection: int
):
    """Keep-alive, reconnecting every ``per_connection`` requests, like many short client
    sessions. BentoML's HTTP workers share one listening socket and the first to wake accepts a
    whole burst, so long-lived connections opened together can all land on one worker (seen here:
    half the throughput); a front balancer or churn spreads them."""
    while time.perf_counter() < until and budget[0] > 0:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per_connection):
                if time.perf_counter() >= until or budget[0] <= 0:
                    break
                budget[0] -= 1
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        status = await send_http(reader, writer, request)
                except TimeoutError:  # counted, and a new connection for the next request
                    out.append((504, time.perf_counter() - start))
                    break
                out.append((status, time.perf_counter() - start))
        finally:
            writer.close()


async def grpc_client(port: int, image: bytes, until: float, budget: list[int], out: list):
    """One gRPC channel (so one connection) sending ``Classify`` calls one after another; a
    failed call is counted as 503 (UNAVAILABLE) or 500."""
    import grpc

    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    # A private subchannel pool: otherwise every channel of this process shares one TCP
    # connection, and so one server worker.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = lcnet_pb2_grpc.ClassifierStub(channel)
        request = lcnet_pb2.ClassifyRequest(image=image, top_k=1)
        while time.perf_counter() < until and budget[0] > 0:
            budget[0] -= 1
            start = time.perf_counter()
            try:
                await stub.Classify(request, timeout=30)
                status = 200
            except grpc.aio.AioRpcError as err:
                status = 503 if err.code() == grpc.StatusCode.UNAVAILABLE else 500
            out.append((status, time.perf_counter() - start))


def summarize(out: list[tuple[int, float]], elapsed: float) -> dict[str, Any]:
    """Throughput and latency of the 2xx answers; every other status counted as an error."""
    ok = [latency for status, latency in out if 200 <= status < 300]
    latencies = sorted(ok) or [float("nan")]
    statuses: dict[int, int] = {}
    for status, _ in out:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "rps": len(ok) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "errors": len(out) - len(ok),
        "503": statuses.get(503, 0),
        "statuses": statuses,
    }


Client = Callable[[float, list[int], list], Awaitable[None]]  # (until, budget, out) → one client


def run_clients(
    client: Client, clients: int, seconds: float, max_requests: int, beside: Client | None = None
) -> dict[str, Any]:
    """``clients`` concurrent copies of ``client``, each sending its next request when the
    previous one answers, for at most ``seconds`` and ``max_requests`` in all. ``beside``: one
    more client alongside (e.g. sending large images), summarized apart as ``"beside"``."""
    out: list[tuple[int, float]] = []
    beside_out: list[tuple[int, float]] = []
    budget = [max_requests]

    async def staggered(i: int):
        await asyncio.sleep(0.002 * i)  # clients arrive over time, not in one burst
        await client(until, budget, out)

    async def run() -> float:
        start = time.perf_counter()
        extra = [beside(until, [max_requests], beside_out)] if beside else []
        await asyncio.gather(*(staggered(i) for i in range(clients)), *extra)
        return time.perf_counter() - start

    until, cpu_before = time.perf_counter() + seconds, time.process_time()
    elapsed = asyncio.run(run())
    # The load generator shares the machine with the server: what it took is not the server's.
    summary = {
        **summarize(out, elapsed),
        "client_cores": (time.process_time() - cpu_before) / elapsed,
    }
    return {**summary, "beside": summarize(beside_out, elapsed)} if beside else summary


def closed_loop(
    port: int, request: bytes, clients: int, seconds: float, max_requests: int,
    per_connection: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """``clients`` HTTP clients replaying ``request`` (``run_clients``)."""
    client = functools.partial(http_client, port, request, per_connection=per_connection)
    return run_clients(client, clients, seconds, max_requests)


PROTOCOLS = ("http", "grpc", "body")  # what ``load`` sends: see there


def load(
    server: Any, protocol: str, image: bytes, clients: int, seconds: float, max_requests: int,
    *, path: str = "/classify", per_connection: int = 5, beside: bytes | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``clients`` closed-loop clients sending ``image`` to ``server`` (a
    ``lcnet_runner.testing.Server``): over "grpc" (``Classify``, a channel each), "http" (a
    multipart POST to ``path``) or "body" (the image as the whole body of a POST to ``path``).
    ``beside``: one more client sends this image alongside, the same way (``run_clients``)."""

    def client(image: bytes) -> Client:
        if protocol == "grpc":
            return functools.partial(grpc_client, server.grpc_port, image)
        if protocol == "body":
            request = post(server.http_port, path, "image/jpeg", image)  # the server sniffs it
        else:
            request = multipart([image], server.http_port, path=path)
        return functools.partial(
            http_client, server.http_port, request, per_connection=per_connection
        )

    extra = client(beside) if beside is not None else None
    return run_clients(client(image), clients, seconds, max_requests, extra)


def mean_batch_size(url: str) -> float:
    """The mean size of the batches a server formed so far (its /metrics, all workers)."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics").text
    sums = re.findall(r"^lcnet_runner_batch_size_sum\S* (\S+)", text, re.M)
    counts = re.findall(r"^lcnet_runner_batch_size_count\S* (\S+)", text, re.M)
    total = sum(float(count) for count in counts)
    return sum(float(value) for value in sums) / total if total else float("nan")
