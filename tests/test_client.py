"""lcnet_runner.client: one error type, with the same status words over HTTP and gRPC, for every
failed call (no answer, no server, a refusal); and `python -m lcnet_runner predict`'s argument and
file-system errors as one readable line."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from lcnet_runner.client import Client, ClientError
from lcnet_runner.preprocess import load_pixels
from lcnet_runner.testing import Server


def _png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def _url(scheme: str, port: int) -> str:
    return f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose socket accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port held (bound, so nothing else takes it) but not listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


CALLS = {
    "classify": lambda c: c.classify(_png()),
    "classify_batch": lambda c: c.classify_batch([_png(), _png()]),
    "model_info": lambda c: c.model_info(),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("scheme", ["http", "grpc"])
@pytest.mark.parametrize(
    "port, timeout, status",
    [("silent_port", 0.5, "DEADLINE_EXCEEDED"), ("closed_port", 5, "UNAVAILABLE")],
)
def test_transport_failures_read_alike(
    request: pytest.FixtureRequest, port: str, timeout: float, status: str, scheme: str, call: str
) -> None:
    """No answer in time, or no server to answer: the same ClientError over HTTP and gRPC."""
    with Client(_url(scheme, request.getfixturevalue(port)), timeout=timeout) as client:
        with pytest.raises(ClientError) as err:
            CALLS[call](client)
    assert err.value.status == status and err.value.message


class _Refusing(BaseHTTPRequestHandler):
    """Answers every GET /model with a non-2xx: JSON {"error"} or (a proxy's) plain text."""

    answers = {
        "/json/model": (503, "application/json", json.dumps({"error": "model is reloading"})),
        "/text/model": (502, "text/plain", "Bad Gateway from the proxy"),
        "/list/model": (500, "application/json", "[1, 2]"),
    }

    def do_GET(self) -> None:
        status, media_type, body = self.answers[self.path]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def refusing_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "prefix, status, message",
    [
        ("/json", 503, "model is reloading"),
        ("/text", 502, "Bad Gateway from the proxy"),
        ("/list", 500, "[1, 2]"),
    ],
)
def test_model_info_refusal_over_http_is_client_error(
    refusing_url: str, prefix: str, status: int, message: str
) -> None:
    with Client(refusing_url + prefix) as client:
        with pytest.raises(ClientError) as err:
            client.model_info()
    assert (err.value.status, err.value.message) == (status, message)


def test_model_info_refusal_from_the_service_is_client_error(server: Server) -> None:
    """The real service's own 404 (a wrong base URL; BentoML's plain-text "Not Found")."""
    with httpx.Client() as raw:
        want = raw.get(f"{server.url}/nowhere/model")
    assert want.status_code == 404
    with Client(f"{server.url}/nowhere") as client:
        with pytest.raises(ClientError) as err:
            client.model_info()
    assert err.value.status == 404
    assert err.value.message == want.text and want.text


@pytest.mark.parametrize("scheme, status", [("http", 422), ("grpc", "INVALID_ARGUMENT")])
def test_empty_batch_is_refused_before_sending(closed_port: int, scheme: str, status) -> None:
    # no server there: an error about the batch (not UNAVAILABLE) shows nothing was sent
    with Client(_url(scheme, closed_port), timeout=5) as client:
        with pytest.raises(ClientError) as err:
            client.classify_batch([])
    assert (err.value.status, err.value.message) == (status, "no images")


@pytest.mark.parametrize("scheme, status", [("http", 422), ("grpc", "INVALID_ARGUMENT")])
@pytest.mark.parametrize("top_k", [0, -3, "3", 1.5, True, None])
def test_a_bad_top_k_is_refused_before_sending(
    closed_port: int, scheme: str, status, top_k
) -> None:
    """Alike over both protocols: a proto raised its own TypeError or ValueError, or read 0 and
    None as unset (one class) where HTTP answered 422."""
    with Client(_url(scheme, closed_port), timeout=5) as client:
        for call in (
            lambda: client.classify(_png(), top_k),
            lambda: client.classify_batch([_png()], top_k),
        ):
            with pytest.raises(ClientError) as err:
                call()
            assert (err.value.status, err.value.message) == (
                status,
                f"top_k must be an integer >= 1, got {top_k!r}",
            )


def test_a_top_k_past_int32_is_clamped_over_grpc(server: Server) -> None:
    with Client(server.grpc_url) as client:
        assert len(client.classify(_png(), top_k=2**40)) == len(client.model_info()["labels"])


@pytest.mark.parametrize("scheme, status", [("http", 422), ("grpc", "INVALID_ARGUMENT")])
def test_empty_batch_against_the_service(server: Server, scheme: str, status) -> None:
    with Client(server.url if scheme == "http" else server.grpc_url) as client:
        with pytest.raises(ClientError) as err:
            client.classify_batch([])
        assert (err.value.status, err.value.message) == (status, "no images")
        assert len(client.classify_batch([_png()])) == 1


def encode_png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_pil_images_in_any_mode_are_sent(server: Server, scheme: str) -> None:
    """PNG holds neither CMYK (a JPEG from print work) nor F or I: the client raised a bare
    OSError for images the server reads. Each is answered as the pixels a Predictor takes from
    it (premultiplied alpha was sent as black where a Predictor sees white)."""
    rgb = Image.new("RGB", (24, 24), (40, 180, 60))
    rgb.paste((200, 30, 30), (0, 0, 12, 24))  # two colours: each mode keeps them apart
    half_clear = rgb.convert("RGBA")
    half_clear.putalpha(128)
    with Client(server.url if scheme == "http" else server.grpc_url) as client:
        for mode in ("CMYK", "F", "I", "LAB", "HSV", "RGBa", "La"):
            image = (half_clear if mode in ("RGBa", "La") else rgb).convert(mode)
            # what the server answers for the pixels a Predictor would take from this image
            as_decoded = encode_png(load_pixels(image))
            assert client.classify(image, top_k=2) == client.classify(as_decoded, top_k=2), mode
        cmyk = io.BytesIO()
        rgb.convert("CMYK").save(cmyk, "JPEG", quality=95)
        as_file = client.classify(cmyk.getvalue(), top_k=2)
        assert client.classify(Image.open(io.BytesIO(cmyk.getvalue())), top_k=2) == as_file
