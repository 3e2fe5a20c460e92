"""A real `bentoml serve` (HTTP + gRPC, 2 workers) on a tiny trained model, on loopback."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from conftest import CLASS_NAMES, refusal, workers
from PIL import Image

from lcnet_runner import Predictor
from lcnet_runner.client import Client, ClientError
from lcnet_runner.settings import ServingSettings
from lcnet_runner.testing import Server
from train.split import read_split


@pytest.fixture(scope="module")
def images(trained: dict) -> list[bytes]:
    return [path.read_bytes() for path, _ in read_split(trained["dataset"], "test")[:6]]


@pytest.fixture(scope="module")
def expected(trained: dict, images: list[bytes]) -> list[list[dict]]:
    return Predictor(trained["tag"], threads=1).predict(images, top_k=3)


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [p["category_id"] for p in got] == [p["category_id"] for p in want]
    assert [p["category"] for p in got] == [p["category"] for p in want]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_answers_equal_the_in_process_predictor(server: Server, scheme, images, expected) -> None:
    with Client(server.url if scheme == "http" else server.grpc_url) as client:
        for image, want in zip(images, expected, strict=True):
            assert_same(client.classify(image, top_k=3), want)
        batch = client.classify_batch(images, top_k=3)
    assert len(batch) == len(images)
    for got, want in zip(batch, expected, strict=True):
        assert_same(got, want)
        # top 3 of 3 classes: every class name served exactly as the dataset's folder spells it
        assert sorted(p["category"] for p in got) == CLASS_NAMES


def test_model_info_endpoint(server: Server, trained: dict) -> None:
    info = httpx.get(f"{server.url}/model").json()
    with Client(server.grpc_url) as client:
        over_grpc = client.model_info()
    for key in ("tag", "labels", "engine", "precision", "preprocess", "limits", "reload"):
        assert over_grpc[key] == info[key], key
    assert info["tag"] == trained["tag"]
    assert info["architecture"] == "PPLCNet_x0_25"
    assert info["labels"] == CLASS_NAMES
    # auto: the fastest here of the variants that passed the guard; the workers raced once and
    # this process (1 thread, like a worker) reads the same cached answer
    choice = Predictor(trained["tag"], threads=1).choice
    assert choice.race.cached and (info["engine"], info["precision"]) == (
        choice.variant.engine, choice.variant.precision,
    )  # fmt: skip
    served = info["engine_choice"]
    assert served["variant"] == str(choice.variant)
    assert served["race"]["images_per_s"] == choice.race.images_per_s
    assert info["input_size"] == 32 and info["threads"] == 1
    assert info["val_top1"] == trained["val_top1"] and info["test_top1"] == trained["test_top1"]


def test_bentoml_endpoints_keep_working(server: Server) -> None:
    for path in ("/readyz", "/livez"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "lcnet_runner_batch_size" in metrics
    for held in ("images", "bytes"):  # none held once answered
        assert re.search(rf'^lcnet_runner_held_{held}\{{model="[^"]+"\}} 0\.0$', metrics, re.M)
    assert "swagger" in httpx.get(f"{server.url}/").text.lower()
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert spec["openapi"].startswith("3.") and "/readyz" in spec["paths"]


def _counted(server: Server, counter: str, *labels: str) -> float:
    """``counter``'s series that carry every one of ``labels``, summed over workers."""
    text = httpx.get(f"{server.url}/metrics").text
    lines = re.findall(rf"^{counter}\{{([^}}]*)\}} (\S+)", text, re.M)
    return sum(float(v) for found, v in lines if all(label in found for label in labels))


def _grpc_calls(server: Server, code: str) -> float:
    """Classify calls answered ``code``, summed over workers from /metrics."""
    return _counted(server, "lcnet_grpc_requests_total", f'code="{code}"', 'method="Classify"')


def test_grpc_calls_are_counted_by_method_and_code(server: Server, images: list[bytes]) -> None:
    """BentoML's request metrics count HTTP alone: gRPC traffic and its refusals were nowhere."""
    ok, refused = _grpc_calls(server, "OK"), _grpc_calls(server, "INVALID_ARGUMENT")
    with Client(server.grpc_url) as client:
        for _ in range(3):
            client.classify(images[0])
        with pytest.raises(ClientError):
            client.classify(b"not an image")
    assert _grpc_calls(server, "OK") == ok + 3
    assert _grpc_calls(server, "INVALID_ARGUMENT") == refused + 1
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(
        r'^lcnet_grpc_request_duration_seconds_count\{[^}]*method="Classify"', text, re.M
    )


def _slow_png() -> bytes:
    """A 25-megapixel PNG of a few hundred KB: ~0.3 s to decode, so a call is still in the
    server when its client gives up."""
    row = (np.arange(5000) % 256).astype(np.uint8)
    pixels = np.broadcast_to(row[None, :, None], (5000, 5000, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _eventually(read, want: float, timeout_s: float = 20.0) -> float:
    """``read()`` once it equals ``want`` (what a worker records after a call ends), or its last
    value when ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_grpc_calls_ended_by_their_client_are_not_counted_ok(server: Server) -> None:
    """A call past its deadline, or cancelled, was counted as OK: a dashboard showed 100 %
    success while clients timed out."""
    import grpc

    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    late, cancelled = _grpc_calls(server, "DEADLINE_EXCEEDED"), _grpc_calls(server, "CANCELLED")
    request = lcnet_pb2.ClassifyRequest(image=_slow_png())
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = lcnet_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(request, timeout=0.1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.Classify.future(request)
        time.sleep(0.1)
        assert call.cancel()
    assert _eventually(lambda: _grpc_calls(server, "DEADLINE_EXCEEDED"), late + 1) == late + 1
    assert _eventually(lambda: _grpc_calls(server, "CANCELLED"), cancelled + 1) == cancelled + 1


@pytest.mark.parametrize("time_remaining, counted", [(-0.2, "DEADLINE_EXCEEDED"), (5.0, "UNKNOWN")])
def test_a_grpc_call_that_fails_outside_a_refusal_is_not_counted_ok(
    time_remaining: float, counted: str
) -> None:
    """Sending a call's initial metadata past its deadline raises in the servicer: the client saw
    DEADLINE_EXCEEDED (UNKNOWN for another exception) and the call was counted OK."""
    import asyncio
    from types import SimpleNamespace

    from lcnet_runner.grpc_api import _measured

    recorded = []
    calls = SimpleNamespace(record=lambda name, code, seconds: recorded.append((name, code)))
    context = SimpleNamespace(code=lambda: None, time_remaining=lambda: time_remaining)

    async def servicer(request, context):
        raise RuntimeError("ExecuteBatchError")  # what grpc.aio raises there

    with pytest.raises(RuntimeError):
        asyncio.run(_measured(servicer, "Classify", calls)(None, context))
    assert recorded == [("Classify", counted)]


class _PastItsDeadline:
    """A call's context once the deadline has passed in gRPC's core before the servicer sent
    its initial metadata (the worker's loop busy meanwhile): the send fails as grpc.aio's does
    then. A race on a real server; only this send is played, the call and deadline are real."""

    def __init__(self, context) -> None:
        self._context = context

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def send_initial_metadata(self, metadata) -> None:
        from grpc._cython.cygrpc import ExecuteBatchError

        time.sleep(max(0.0, self._context.time_remaining()) + 0.05)
        raise ExecuteBatchError('Failed "execute_batch": (SendInitialMetadataOperation,)')


def test_initial_metadata_past_the_deadline_is_no_server_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """grpc.aio logged "ExecuteBatchError raised in core by servicer method" at ERROR with a
    traceback when the version's metadata went out after the client's deadline: the client's
    deadline, not a fault. Now it ends as a cancelled call (DEBUG) and counts DEADLINE_EXCEEDED."""
    import asyncio
    from types import SimpleNamespace

    import grpc

    from lcnet_runner.grpc_api import ClassifierServicer, _measured
    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    recorded = []
    calls = SimpleNamespace(record=lambda name, code, seconds: recorded.append((name, code)))
    served = SimpleNamespace(runner=SimpleNamespace(tag="late:v1"))  # never reached: the send
    servicer = ClassifierServicer(served, None, None)

    async def model_info(request, context):
        return await servicer.ModelInfo(request, _PastItsDeadline(context))

    handler = grpc.unary_unary_rpc_method_handler(
        _measured(model_info, "ModelInfo", calls),
        request_deserializer=lcnet_pb2.ModelInfoRequest.FromString,
        response_serializer=lcnet_pb2.ModelInfoResponse.SerializeToString,
    )

    async def call_with_a_short_deadline() -> grpc.StatusCode:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("lcnet.v1.Classifier", {"ModelInfo": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = lcnet_pb2_grpc.ClassifierStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfo(lcnet_pb2.ModelInfoRequest(), timeout=0.3)
                await asyncio.sleep(0.2)  # the servicer's end, logged by gRPC
                return err.value.code()
        finally:
            await server.stop(None)

    with caplog.at_level(logging.DEBUG, logger="grpc"):
        assert asyncio.run(call_with_a_short_deadline()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert recorded == [("ModelInfo", "DEADLINE_EXCEEDED")]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("RPC cancelled" in r.getMessage() for r in caplog.records)


def _http_answers(server: Server, status: int, path: str) -> float:
    """``path``'s answers of ``status`` as BentoML's metrics count them, summed over workers."""
    labels = (f'http_response_code="{status}"', f'endpoint="{path}"')
    return _counted(server, "bentoml_service_request_total", *labels)


@pytest.mark.parametrize("path", ["/classify", "/predict"])
def test_a_client_that_leaves_before_its_answer_is_not_served(server: Server, path: str) -> None:
    """Clients that sent their image and hung up (a timeout, a retry) were decoded and run for
    nobody and counted as 200: a burst of them kept the workers busy long after they left. Now
    each is dropped where it waits and counted as 499."""
    gone = _http_answers(server, 499, path)
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    body = part + _slow_png() + b"\r\n--x--\r\n"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    clients = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(4)]
    for client in clients:
        client.sendall(head + body)
    # Gone well inside the decode: it takes ~0.2 s on the fastest CPU met (a Zen 5 EPYC), where
    # leaving after 0.2 s let one call be answered first.
    time.sleep(0.05)
    for client in clients:
        client.close()
    assert _eventually(lambda: _http_answers(server, 499, path), gone + 4) == gone + 4


def _batch_histogram(server: Server) -> tuple[float, float]:
    """(batches formed, batches of size 1) summed over workers from /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    count = sum(
        float(v) for v in re.findall(r"^lcnet_runner_batch_size_count\S* (\S+)", text, re.M)
    )
    ones = sum(
        float(v)
        for v in re.findall(r'^lcnet_runner_batch_size_bucket\{[^}]*le="1.0"\S* (\S+)', text, re.M)
    )
    return count, ones


def test_concurrent_requests_form_batches(server: Server, images: list[bytes]) -> None:
    before_count, before_ones = _batch_histogram(server)
    image = images[0]

    def call(_: int) -> int:
        files = {"image": ("x.jpg", image)}
        return httpx.post(f"{server.url}/classify", files=files, timeout=30).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(256)))
    assert statuses == [200] * 256
    count, ones = _batch_histogram(server)
    batches, single = count - before_count, ones - before_ones
    assert batches < 256, "every request ran alone: no batch larger than 1 was formed"
    assert single < batches
    text = httpx.get(f"{server.url}/metrics").text
    for stage in ("decode", "queue_wait", "inference"):
        assert re.search(rf'^lcnet_runner_stage_seconds_count\{{[^}}]*stage="{stage}"', text, re.M)


def _png(size=(8, 8), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 1 if mode == "1" else (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


MULTIPART = "multipart/form-data"
PNG = ("a.png", _png())
BAD_HTTP = [
    ("undecodable", "/classify", {"files": {"image": ("a.jpg", b"not an image")}}, 400),
    ("empty file", "/classify", {"files": {"image": ("a.jpg", b"")}}, 400),
    ("url instead of file", "/classify",
     {"files": {"x": PNG}, "data": {"image": "http://127.0.0.1:9/x.jpg"}}, 422),
    ("url-encoded form", "/classify", {"data": {"image": "abc"}}, 422),  # a form without its file
    ("misspelt field", "/classify", {"files": {"imgae": PNG}}, 422),
    ("top_k zero", "/classify", {"files": {"image": PNG}, "data": {"top_k": "0"}}, 422),
    ("top_k text", "/classify", {"files": {"image": PNG}, "data": {"top_k": "x"}}, 422),
    ("json body", "/classify", {"json": {"image": "abc"}}, 415),
    ("garbage multipart", "/classify",
     {"content": b"--x\r\n\r\n", "headers": {"content-type": f"{MULTIPART}; boundary=x"}}, 400),
    ("no boundary", "/classify", {"content": b"abc", "headers": {"content-type": MULTIPART}}, 400),
    ("too many pixels", "/classify", {"files": {"image": ("big.png", _png((8000, 6000), "1"))}},
     413),
    ("too large body", "/classify", {"files": {"image": ("a.png", b"\0" * (21 << 20))}}, 413),
    ("empty multipart", "/classify_batch",
     {"content": b"--x--\r\n", "headers": {"content-type": f"{MULTIPART}; boundary=x"}}, 422),
    ("too many images", "/classify_batch", {"files": [("images", PNG)] * 70}, 413),
]  # fmt: skip


@pytest.mark.parametrize("name, path, kwargs, status", BAD_HTTP, ids=[b[0] for b in BAD_HTTP])
def test_bad_http_input_gets_a_clear_4xx(server: Server, name, path, kwargs, status) -> None:
    response = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    # ... and the server still answers normally.
    ok = httpx.post(f"{server.url}/classify", files={"image": ("a.png", _png())}, timeout=30)
    assert ok.status_code == 200


def test_huge_top_k_is_clamped_to_the_classes(server: Server) -> None:
    with Client(server.url) as client:
        assert len(client.classify(_png(), top_k=1000)) == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.classify(b"not an image"),
        lambda c: c.classify(b""),
        lambda c: c.classify(_png(), top_k=-1),
        lambda c: c.classify_batch([]),
        lambda c: c.classify_batch([_png()] * 70),
    ],
)
def test_bad_grpc_input_is_invalid_argument(server: Server, call) -> None:
    with Client(server.grpc_url) as client:
        with pytest.raises(ClientError) as err:
            call(client)
        assert err.value.status == "INVALID_ARGUMENT" and err.value.message
        assert len(client.classify(_png())) == 1


def test_every_grpc_answer_names_the_model_version_that_produced_it(
    server: Server, trained: dict
) -> None:
    """In its initial metadata, answered or refused, as HTTP's X-Model-Version header."""
    import grpc

    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc

    image = _png()
    calls = [
        ("Classify", lcnet_pb2.ClassifyRequest(image=image)),
        ("ClassifyBatch", lcnet_pb2.ClassifyBatchRequest(images=[image, image])),
        ("ModelInfo", lcnet_pb2.ModelInfoRequest()),
        ("Classify", lcnet_pb2.ClassifyRequest(image=b"not an image")),
        ("ClassifyBatch", lcnet_pb2.ClassifyBatchRequest(images=[])),
    ]
    codes, versions = [], []
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = lcnet_pb2_grpc.ClassifierStub(channel)
        for method, request in calls:
            try:
                _, call = getattr(stub, method).with_call(request, timeout=30)
            except grpc.RpcError as refused:
                call = refused
            codes.append(call.code().name)
            versions.append(dict(call.initial_metadata()).get("x-model-version"))
    assert codes == ["OK"] * 3 + ["INVALID_ARGUMENT"] * 2
    assert versions == [trained["tag"]] * len(calls)


def test_grpc_health_and_reflection(server: Server) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="lcnet.v1.Classifier"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert "lcnet.v1.Classifier" in names and "grpc.health.v1.Health" in names
        assert "lcnet.v1.Admin" not in names  # no LCNET_ADMIN_TOKEN: no admin service


def _cpu_per_worker(server: Server) -> dict[int, float]:
    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in workers(server)}


def test_a_grpc_channel_is_spread_over_the_workers_by_connection_age(
    trained: dict, images: list[bytes]
) -> None:
    """Every call on a gRPC channel goes to the worker that accepted its connection. With
    connections ending after LCNET_GRPC_MAX_CONNECTION_AGE_S the client reconnects and the
    kernel picks a worker anew, so one channel's calls reach both (~20 connections here: all
    on one worker by chance has odds of ~2e-6)."""
    with pytest.raises(ValueError, match="LCNET_GRPC_MAX_CONNECTION_AGE_S='-1': must be from 0"):
        ServingSettings.from_env({"LCNET_GRPC_MAX_CONNECTION_AGE_S": "-1"})
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "2",
           "LCNET_GRPC_MAX_CONNECTION_AGE_S": "0.4"}  # fmt: skip
    server = Server(".", env).wait_ready()
    try:
        server.wait_settled()  # both workers loaded: neither's share below is its model loading
        before = _cpu_per_worker(server)
        with Client(server.grpc_url) as client:
            deadline, calls = time.monotonic() + 8, 0
            while time.monotonic() < deadline and calls < 20_000:
                assert client.classify(images[calls % len(images)])
                calls += 1
        used = {pid: cpu - before.get(pid, 0.0) for pid, cpu in _cpu_per_worker(server).items()}
    finally:
        server.stop()
    assert len(used) == 2 and min(used.values()) > 0.05 * sum(used.values()), used
    assert "Traceback" not in server.output()


def test_bentoml_clients_call_the_typed_api(server: Server, trained: dict) -> None:
    import asyncio

    import bentoml

    image = trained["dataset"] / "green" / "1.jpg"
    files = {"image": ("a.jpg", image.read_bytes())}
    want = httpx.post(f"{server.url}/classify", files=files, data={"top_k": "3"}).json()
    with bentoml.SyncHTTPClient(server.url) as client:
        assert client.predict(image=image, top_k=3) == want
        assert client.predict_batch(images=[image, image], top_k=3) == [want, want]
        for top_k in ({}, {"top_k": 2}):  # an empty body, or a url-encoded form: a 422 each
            with pytest.raises(bentoml.exceptions.UnprocessableEntity, match="missing file"):
                client.predict_batch(images=[], **top_k)

    async def call_async() -> list:
        async with bentoml.AsyncHTTPClient(server.url) as client:
            return await client.predict(image=image, top_k=3)

    assert asyncio.run(call_async()) == want


def test_a_second_server_on_the_same_grpc_port_refuses_to_start(
    server: Server, trained: dict
) -> None:
    """Workers share their gRPC port (SO_REUSEPORT), which would let a second server's workers
    in just as silently: each new connection would then reach either server, so either model."""
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1",
           "LCNET_GRPC_PORT": str(server.grpc_port)}  # fmt: skip
    assert f"gRPC port {server.grpc_port} is served by another server" in refusal(env)
    for _ in range(8):  # fresh connections: all to the first server
        with Client(server.grpc_url) as client:
            assert client.model_info()["tag"] == trained["tag"]


def test_a_grpc_port_another_program_holds_stops_the_server(trained: dict) -> None:
    """Not a server of ours (no claim to read): binding fails, and `bentoml serve` stops with the
    reason instead of restarting the worker forever."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1", "LCNET_GRPC_PORT": str(port)}
        assert f"gRPC cannot listen on 127.0.0.1:{port}" in refusal(env)


def test_a_grpc_port_is_claimed_by_one_live_server(tmp_path, monkeypatch) -> None:
    """The owner file's rules: the same server again is fine, another live one is refused, a
    dead one's claim is taken over, and a temp folder that cannot be written never stops a
    server."""
    from lcnet_runner.grpc_api import GrpcPortTakenError, claim_port
    from lcnet_runner.servers import server_id

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    me, other = server_id(os.getpid()), server_id(os.getppid())
    claim_port(50123, me)
    claim_port(50123, me)
    with pytest.raises(GrpcPortTakenError, match=f"pid {os.getpid()}"):
        claim_port(50123, other)
    (tmp_path / "lcnet-grpc-50123.owner").write_text("999999999:1.000")  # no such process
    claim_port(50123, other)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing" / "folder"))
    claim_port(50123, me)


def test_a_grpc_refusal_frees_its_image_at_once(trained: dict) -> None:
    """A refusal aborted inside the except block that caught it, so the error stayed in its own
    traceback's frame, and with it the request's image, until a garbage-collector pass (a burst
    of UNAVAILABLE to 14 MB images held +1 GiB for minutes). An abort anywhere did the same with
    the request message itself, which holds the image outside Python's allocator: grpc.aio
    keeps the abort's exception on the call's state (a worker stayed 1.1 GB larger after a burst
    of 17 MB uploads). A grpc.aio server on this thread's loop, as a worker runs it, with a
    runner that holds its bound."""
    import asyncio
    import gc
    import tracemalloc

    import grpc

    from lcnet_runner import grpc_api
    from lcnet_runner.metrics import GrpcCallMetrics
    from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc
    from lcnet_runner.reload import ServedModel
    from lcnet_runner.runner import HeldImages, LCNetRunner, RunnerConfig
    from lcnet_runner.testing import free_port

    image = bytes(2_000_000)  # any bytes: refused before decoding (gRPC's limit: 4 MB)
    held = HeldImages(limit=1)
    held.count = 1  # as while it holds its bound
    runner = LCNetRunner(trained["tag"], RunnerConfig(), held=held)

    async def refusals() -> tuple[list[str], int, int]:
        server, port = grpc.aio.server(), free_port()
        servicer = grpc_api.ClassifierServicer(
            ServedModel(runner), ServingSettings.from_env({}), None
        )
        grpc_api._add_servicer(server, grpc_api.SERVICE_NAME, servicer, GrpcCallMetrics())
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = lcnet_pb2_grpc.ClassifierStub(channel)
                request = lcnet_pb2.ClassifyRequest(image=image)
                gc.collect()
                gc.disable()
                tracemalloc.start()
                for _ in range(5):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Classify(request, timeout=30)
                    codes.append(err.value.code().name)
                await asyncio.sleep(0.2)
                before = tracemalloc.get_traced_memory()[0]
                messages = sum(isinstance(o, lcnet_pb2.ClassifyRequest) for o in gc.get_objects())
                gc.collect()
                held = before - tracemalloc.get_traced_memory()[0]
                return codes, held, messages - 1  # ours: ``request``
        finally:
            tracemalloc.stop()
            gc.enable()
            await server.stop(None)

    codes, held, messages_left = asyncio.run(refusals())
    assert codes == ["UNAVAILABLE"] * 5
    assert held < len(image), f"{held} bytes freed only by the collector"
    assert messages_left == 0, f"{messages_left} refused requests left to the collector"
