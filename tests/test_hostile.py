"""A corpus of bad and odd requests against a real server, over HTTP and gRPC.

Odd-but-valid images get 200 and a sensible answer; bad ones a 4xx / INVALID_ARGUMENT with a
message; never a 5xx, a hang or a dead worker, and the server answers normally afterwards.
"""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES
from PIL import Image

from lcnet_runner.client import Client, ClientError
from lcnet_runner.testing import Server


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photo(size=(64, 48), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo((80, 40)), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    image = photo().convert("P")
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [photo().convert("P") for _ in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def sixteen_bit() -> bytes:
    return encode(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG")


PROGRESSIVE = encode(photo(), "JPEG", progressive=True)


def rescanned(scans: int) -> bytes:
    """The progressive JPEG with its last scan repeated: each scan decodes over every block
    (410 of them on a 40 MP picture held a worker for 26 s)."""
    last = PROGRESSIVE[PROGRESSIVE.rindex(b"\xff\xda") : -2]
    return PROGRESSIVE[:-2] + last * scans + PROGRESSIVE[-2:]


def bomb() -> bytes:
    """A few hundred KB that decode to 400 million pixels."""
    return encode(Image.new("1", (20_000, 20_000)), "PNG")


def dds_unknown_format() -> bytes:
    """A DDS header Pillow reads, then refuses with NotImplementedError (not an OSError)."""
    header = bytearray(120)
    struct.pack_into("<3I", header, 0, 0x1007, 4, 4)
    struct.pack_into("<4I", header, 68, 32, 0, 0, 0)
    return b"DDS " + struct.pack("<I", 124) + bytes(header) + b"\0" * 64


JPEG = encode(photo(), "JPEG")
# name → (image bytes, HTTP status, gRPC status)
IMAGES = {
    "jpeg": (JPEG, 200, "OK"),
    "png": (encode(photo(), "PNG"), 200, "OK"),
    "webp": (encode(photo(), "WEBP"), 200, "OK"),
    "bmp": (encode(photo(), "BMP"), 200, "OK"),
    "tiff": (encode(photo(), "TIFF"), 200, "OK"),
    "1x1 pixel": (encode(photo((1, 1)), "PNG"), 200, "OK"),
    "greyscale": (encode(photo(mode="L"), "PNG"), 200, "OK"),
    "grey + alpha": (encode(photo(mode="LA"), "PNG"), 200, "OK"),
    "rgba": (encode(photo(mode="RGBA"), "PNG"), 200, "OK"),
    "cmyk jpeg": (encode(photo(mode="CMYK"), "JPEG"), 200, "OK"),
    "16-bit png": (sixteen_bit(), 200, "OK"),
    "palette + transparency": (palette_with_transparency(), 200, "OK"),
    "exif rotated": (exif_rotated(), 200, "OK"),
    "animated gif": (animated_gif(), 200, "OK"),
    "progressive jpeg": (PROGRESSIVE, 200, "OK"),
    "jpeg of 300 scans": (rescanned(290), 400, "INVALID_ARGUMENT"),
    "ico (decoded whole as Pillow opens it)": (encode(photo(), "ICO"), 400, "INVALID_ARGUMENT"),
    "panorama 4000x20": (encode(photo((4000, 20)), "JPEG"), 200, "OK"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], 400, "INVALID_ARGUMENT"),
    "jpeg header only": (JPEG[:20], 400, "INVALID_ARGUMENT"),
    "zero bytes": (b"", 400, "INVALID_ARGUMENT"),
    "html as image": (b"<!doctype html><html><body>hi</body></html>", 400, "INVALID_ARGUMENT"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 400,
            "INVALID_ARGUMENT"),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, "INVALID_ARGUMENT"),
    "plain text": (b"just some words", 400, "INVALID_ARGUMENT"),
    "random bytes": (np.random.default_rng(1).bytes(5000), 400, "INVALID_ARGUMENT"),
    "decompression bomb": (bomb(), 413, "INVALID_ARGUMENT"),
    "sliver 1x200000 (huge once resized)": (encode(Image.new("L", (1, 200_000)), "PNG"), 413,
                                            "INVALID_ARGUMENT"),
    "dds of an unknown pixel format": (dds_unknown_format(), 400, "INVALID_ARGUMENT"),
}  # fmt: skip


def assert_still_serving(server: Server) -> None:
    response = httpx.post(f"{server.url}/classify", files={"image": ("ok.jpg", JPEG)}, timeout=30)
    assert response.status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.parametrize("sent_as", ["multipart", "body"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_images_over_http(server: Server, name: str, sent_as: str) -> None:
    data, status, _ = IMAGES[name]
    # As a body, whatever the bytes are, they claim to be an image.
    sent = raw(data, "application/octet-stream") if sent_as == "body" else upload(data=data)
    response = httpx.post(f"{server.url}/classify", timeout=30, **sent)
    assert response.status_code == status, response.text
    body = response.json()
    if status == 200:
        assert len(body) == 1 and body[0]["category"] in CLASS_NAMES
    else:
        assert body["error"] and "Traceback" not in body["error"]
    assert_still_serving(server)


@pytest.mark.parametrize("name", list(IMAGES))
def test_images_over_grpc(server: Server, name: str) -> None:
    data, _, status = IMAGES[name]
    with Client(server.grpc_url) as client:
        if status == "OK":
            assert len(client.classify(data)) == 1
        else:
            with pytest.raises(ClientError) as err:
                client.classify(data)
            assert err.value.status == status and err.value.message
        assert len(client.classify(JPEG)) == 1


def upload(field: str = "image", data: bytes = JPEG, filename: str = "a.jpg", **form) -> dict:
    return {"files": {field: (filename, data)}, "data": form}


def raw(
    body: bytes | list[bytes], content_type: str | bytes = "multipart/form-data; boundary=x"
) -> dict:
    return {"content": body, "headers": {"content-type": content_type}}


MULTIPART_JPEG = (
    b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    + JPEG
    + b"\r\n--x--\r\n"
)
TWO_IMAGES = {"files": [("image", ("a", JPEG))] * 2}
URL_IN_FIELD = {"files": {"x": ("a", JPEG)}, "data": {"image": "http://127.0.0.1:9/x.jpg"}}
BAD_IN_BATCH = {"files": [("images", ("a", JPEG)), ("images", ("b", b"no"))]}
# name → (path, request, HTTP status)
REQUESTS = {
    "missing image field": ("/classify", upload(field="x", top_k="1"), 422),
    "misspelt field": ("/classify", upload(field="imgae"), 422),
    "two images on /classify": ("/classify", TWO_IMAGES, 422),
    "url instead of file": ("/classify", URL_IN_FIELD, 422),
    "top_k 0": ("/classify", upload(top_k="0"), 422),
    "top_k -1": ("/classify", upload(top_k="-1"), 422),
    "top_k text": ("/classify", upload(top_k="three"), 422),
    "top_k huge (clamped)": ("/classify", upload(top_k="99999"), 200),
    "json body": ("/classify", {"json": {"image": "aGVsbG8="}}, 415),
    "url-encoded form": ("/classify", {"data": {"image": "x"}}, 422),  # a form, without the file
    "no content type": ("/classify", {"content": b"abc"}, 415),
    "empty multipart": ("/classify", raw(b"--x--\r\n"), 422),
    "garbage multipart": ("/classify", raw(b"--x\r\n\r\n"), 400),
    "multipart without boundary": ("/classify", raw(b"abc", "multipart/form-data"), 400),
    "oversized body": ("/classify", upload(data=b"\0" * (21 << 20)), 413),
    "oversized image body": ("/classify", raw(b"\0" * (21 << 20), "image/jpeg"), 413),
    "image body streamed past the limit": (
        "/classify",
        raw([b"\0" * (1 << 20)] * 21, "image/jpeg"),
        413,
    ),  # chunked: no Content-Length to refuse early
    "image body, top_k text": ("/classify?top_k=three", raw(JPEG, "image/jpeg"), 422),
    "image body on the batch route": ("/classify_batch", raw(JPEG, "image/jpeg"), 415),
    # media types are case-insensitive
    "image body, upper-case type": ("/classify", raw(JPEG, "IMAGE/JPEG"), 200),
    "multipart, mixed-case type": (
        "/classify",
        raw(MULTIPART_JPEG, "Multipart/Form-Data; boundary=x"),
        200,
    ),
    # BentoML's access log decoded it as UTF-8 once the headers were out: the body was lost
    "latin-1 byte in the content type": ("/classify", raw(JPEG, b"image/jpeg; x=\xe9"), 200),
    # a second Content-Type must not pass for BentoML's internal pickles (Starlette reads the
    # first): the typed route's guard parses the multipart body, and refuses it
    "two content types on /predict": (
        "/predict",
        {
            "content": b"--x\r\n\r\n",
            "headers": [
                ("content-type", "multipart/form-data; boundary=x"),
                ("content-type", "application/vnd.bentoml+pickle"),
            ],
        },
        400,
    ),
    "empty batch": ("/classify_batch", upload(field="x"), 422),
    "too many images": ("/classify_batch", {"files": [("images", ("a", JPEG))] * 65}, 413),
    "batch with one bad image": ("/classify_batch", BAD_IN_BATCH, 400),
    "path traversal filename": ("/classify", upload(filename="../../../tmp/x.jpg"), 200),
    "unicode filename": ("/classify", upload(filename="図 画像 😀.jpg"), 200),
    "255-character filename": ("/classify", upload(filename="a" * 251 + ".jpg"), 200),
    "5000-character filename": ("/classify", upload(filename="a" * 5000 + ".jpg"), 400),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_odd_requests_over_http(server: Server, name: str) -> None:
    path, kwargs, status = REQUESTS[name]
    response = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]
    assert_still_serving(server)


def test_filenames_are_never_used_as_paths(server: Server, tmp_path: Path, trained: dict) -> None:
    """The uploaded name points at an existing image of another class: the server must classify
    the uploaded bytes, and neither read nor overwrite the file the name points at."""
    target = tmp_path / f"decoy-{uuid.uuid4().hex}.jpg"
    target.write_bytes((trained["dataset"] / "green" / "0.jpg").read_bytes())
    before = target.read_bytes()
    uploaded = (trained["dataset"] / CLASS_NAMES[0] / "0.jpg").read_bytes()
    hostile = "../" * 12 + str(target).lstrip("/")
    answers = {}
    for name in ("plain.jpg", hostile, str(target)):
        response = httpx.post(f"{server.url}/classify", files={"image": (name, uploaded)},
                              data={"top_k": "3"}, timeout=30)  # fmt: skip
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    assert answers[hostile] == answers[str(target)] == answers["plain.jpg"]
    assert target.read_bytes() == before


def test_no_cors_and_no_internals_by_default(server: Server) -> None:
    headers = {"Origin": "http://evil.example"}
    response = httpx.post(f"{server.url}/classify", files={"image": JPEG}, headers=headers)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    error = httpx.post(f"{server.url}/classify", files={"image": b"x"}).json()["error"]
    assert "Traceback" not in error and "/" not in error  # no stack traces, no server paths


def test_wrong_method_and_unknown_path(server: Server) -> None:
    wrong_method = httpx.get(f"{server.url}/classify")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "Method Not Allowed"}
    # BentoML's own router answers an unknown path (in plain text: the mounted app never sees it)
    assert httpx.post(f"{server.url}/no-such-endpoint").status_code == 404


def test_a_malformed_grpc_message_is_invalid_argument(server: Server) -> None:
    """Bytes that are no protobuf message: gRPC's own parser answered UNKNOWN with its
    exception's repr."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        classify = channel.unary_unary("/lcnet.v1.Classifier/Classify")  # bytes as they are
        with pytest.raises(grpc.RpcError) as err:
            classify(b"\xff\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "malformed protobuf message"
    assert_still_serving(server)


@pytest.mark.parametrize("top_k", [-1, -100])
def test_bad_top_k_over_grpc(server: Server, top_k: int) -> None:
    with Client(server.grpc_url) as client:
        with pytest.raises(ClientError) as err:
            client.classify(JPEG, top_k=top_k)
        assert err.value.status == "INVALID_ARGUMENT" and "top_k" in err.value.message


def test_oversized_grpc_message_is_refused(server: Server) -> None:
    with Client(server.grpc_url) as client:
        with pytest.raises(ClientError) as err:
            client.classify(b"\0" * (21 << 20))
        assert err.value.status == "RESOURCE_EXHAUSTED"
        assert len(client.classify(JPEG)) == 1


@pytest.fixture(scope="module")
def impatient(trained: dict):
    """A server that waits 1 s for a request body (LCNET_BODY_TIMEOUT_S; 30 s by default)."""
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1", "LCNET_BODY_TIMEOUT_S": "1"}
    server = Server(".", env).wait_ready()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/classify", "image/jpeg"),
        ("/classify", "multipart/form-data; boundary=x"),
        ("/predict", "multipart/form-data; boundary=x"),
        ("/image-classification", "application/json"),
    ],
)
def test_a_body_that_stalls_gets_408(impatient: Server, path: str, content_type: str) -> None:
    """Content-Length promises 2,600 bytes, 10 arrive, then nothing: a 408 with a JSON message
    once the body timeout passes, where BentoML's own timeout answered 504 after 60 s; and the
    connection closed after it (a slow client trickled on into it)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 2600\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", impatient.http_port), timeout=20) as sock:
        sock.sendall(head.encode() + b"--x\r\nabcde")
        answer = b""
        while chunk := sock.recv(4096):  # to the end: the server closes the connection
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"408", answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    message = body["error"] if "error" in body else body["errorMsg"]  # PaddleX's envelope
    assert message == "the request body did not arrive within 1 s"
    assert_still_serving(impatient)


@pytest.mark.parametrize(
    "name", ["LCNET_BODY_TIMEOUT_S", "LCNET_RELOAD_INTERVAL_S", "LCNET_GRPC_MAX_CONNECTION_AGE_S"]
)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_duration_that_is_no_number_is_refused_at_start(name: str, value: str) -> None:
    """float() reads them, and every comparison with NaN is false, so they passed the checks:
    a NaN body timeout answered every upload 408 at once, a NaN reload interval never looked,
    an infinite connection age failed every worker's gRPC start (again on each restart)."""
    from lcnet_runner.settings import ServingSettings

    with pytest.raises(ValueError, match=f"{name}='{value}' is not a finite number"):
        ServingSettings.from_env({name: value})


@pytest.mark.parametrize(
    "name, value, message",
    [
        # each of these started workers that failed at once, again on every restart...
        ("LCNET_MAX_BATCH_SIZE", "0", "must be from 1 to 1024"),
        ("LCNET_MAX_DELAY_MS", "-5", "must be from 0 to 60000"),
        (
            "LCNET_GRPC_MAX_CONNECTION_AGE_S",
            "2200000",
            "must be from 0 to 2147483",
        ),  # a C int of ms
        ("LCNET_MAX_BODY_BYTES", "2147483648", "must be from 1 to 2147483647"),
        ("LCNET_THREADS", "-1", "must be from 0 to 1024"),
        ("LCNET_GRPC_PORT", "70000", "must be from 0 to 65535"),
        ("LCNET_ENGINE", "tensorrt", "LCNET_ENGINE / LCNET_PRECISION: unknown engine 'tensorrt'"),
        # ...or a server that looked healthy and refused every request
        ("LCNET_MAX_BODY_BYTES", "-1", "must be from 1 to 2147483647"),
        ("LCNET_MAX_PIXELS", "0", "must be >= 1"),
        ("LCNET_MAX_BATCH_IMAGES", "0", "must be >= 1"),
        ("LCNET_WORKERS", "x", "is not a whole number"),
        ("LCNET_GRPC_HOST", "999.1.1.1", "neither an IP address nor a host name"),  # exited 0
        # a folder: a traceback about BentoML tags
        ("LCNET_MODEL", "output/pplcnet/inference", "store a folder with `python -m train import"),
        (
            "LCNET_MODEL",
            "out/my model",
            "store a folder with `python -m train import 'out/my model'`",
        ),
    ],
)
def test_a_setting_out_of_its_range_is_refused_at_start(
    name: str, value: str, message: str
) -> None:
    from lcnet_runner.settings import ServingSettings

    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        ServingSettings.from_env({name: value})
    assert str(refused.value).count("\n") == 0 and name in str(refused.value)


def test_a_runner_config_out_of_its_range_is_refused() -> None:
    """The same ranges for a plugin user's own RunnerConfig, named as its fields."""
    from lcnet_runner.runner import RunnerConfig

    with pytest.raises(ValueError, match=re.escape("max_batch_size=0: must be from 1 to 1024")):
        RunnerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        RunnerConfig(precision="fp8")
