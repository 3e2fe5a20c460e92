"""A small client for the service: ``Client("http://host:3000")`` or ``Client("grpc://host:50051")``."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

from PIL import Image

from .predictor import Prediction, TopKError, checked_top_k
from .preprocess import PREMULTIPLIED

Image_ = Union[str, Path, bytes, Image.Image]


class ClientError(RuntimeError):
    """The request failed, whatever the transport. ``status`` is the server's answer, the HTTP
    status (an ``int``) or the gRPC status name, with its ``{"error"}`` / details as ``message``;
    or, over both transports alike, ``"DEADLINE_EXCEEDED"`` when no answer came within the
    timeout and ``"UNAVAILABLE"`` when the server could not be reached or dropped the connection.
    A worker too busy to take the request answers 503 over HTTP and ``"UNAVAILABLE"`` over
    gRPC: both are worth a retry."""

    def __init__(self, status: int | str, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def encode(image: Image_) -> bytes:
    """Files are sent as they are; PIL images losslessly: as PNG, or as TIFF in the modes PNG
    cannot hold (CMYK, F, I, LAB...), which the server reads as it would the same file; the
    few TIFF cannot hold either as RGB (HSV), or with plain alpha (premultiplied RGBa, La)."""
    if isinstance(image, bytes):
        return image
    if not isinstance(image, Image.Image):
        return Path(image).read_bytes()
    for container in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        try:
            image.save(buffer, container)
            return buffer.getvalue()
        except OSError:  # "cannot write mode CMYK as PNG"
            pass
    buffer = io.BytesIO()
    image.convert(PREMULTIPLIED.get(image.mode, "RGB")).save(buffer, "PNG")
    return buffer.getvalue()


class Client:
    def __init__(self, url: str, timeout: float = 30.0):
        parts = urlsplit(url)
        self.url, self.timeout = url.rstrip("/"), timeout
        if parts.scheme == "grpc":
            import grpc

            from .protos import lcnet_pb2, lcnet_pb2_grpc

            self._pb2, self._grpc = lcnet_pb2, grpc
            self._channel = grpc.insecure_channel(parts.netloc)
            self._stub = lcnet_pb2_grpc.ClassifierStub(self._channel)
        elif parts.scheme in ("http", "https"):
            import httpx

            self._http = httpx.Client(base_url=self.url, timeout=timeout)
            self._stub = None
        else:
            raise ValueError(f"url must start with http://, https:// or grpc://, got {url!r}")

    def classify(self, image: Image_, top_k: int = 1) -> list[Prediction]:
        top_k = self._checked_top_k(top_k)
        if self._stub is not None:
            request = self._pb2.ClassifyRequest(image=encode(image), top_k=top_k)
            return _predictions(self._rpc(self._stub.Classify, request))
        files = [("image", ("image", encode(image)))]
        return self._post("/classify", files, top_k)

    def classify_batch(self, images: Sequence[Image_], top_k: int = 1) -> list[list[Prediction]]:
        top_k, data = self._checked_top_k(top_k), [encode(image) for image in images]
        if not data:
            raise self._refused("no images")
        if self._stub is not None:
            request = self._pb2.ClassifyBatchRequest(images=data, top_k=top_k)
            response = self._rpc(self._stub.ClassifyBatch, request)
            return [_predictions(result) for result in response.results]
        files = [("images", (f"image{i}", d)) for i, d in enumerate(data)]
        return self._post("/classify_batch", files, top_k)

    def model_info(self) -> dict:
        """What the server says of its model (GET /model; gRPC Classifier/ModelInfo)."""
        if self._stub is not None:
            reply = self._rpc(self._stub.ModelInfo, self._pb2.ModelInfoRequest())
            return json.loads(reply.details_json)
        return self._send("GET", "/model")

    def _checked_top_k(self, top_k: int) -> int:
        """``top_k`` refused here as the server would: a proto would raise its own TypeError or
        ValueError, or read 0 as unset; past int32 it is clamped (the server clamps it to the
        class count anyway)."""
        try:
            return min(checked_top_k(top_k), 2**31 - 1)
        except TopKError as err:
            raise self._refused(str(err)) from None

    def _refused(self, message: str) -> ClientError:
        """What the server answers a bad request with (HTTP 422 / INVALID_ARGUMENT), for one
        refused before it is sent."""
        return ClientError(422 if self._stub is None else "INVALID_ARGUMENT", message)

    def _post(self, path: str, files: list, top_k: int):
        return self._send("POST", path, files=files, data={"top_k": str(top_k)})

    def _send(self, method: str, path: str, **kwargs):
        """The JSON of a 2xx answer; anything else a ClientError, with gRPC's names for no answer
        in time (DEADLINE_EXCEEDED) and no server to answer (UNAVAILABLE)."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ClientError("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s") from None
        except httpx.TransportError as err:
            raise ClientError("UNAVAILABLE", f"{self.url}{path}: {_reason(err)}") from None
        except httpx.RequestError as err:  # an answer that could not be read (e.g. its encoding)
            raise ClientError("INTERNAL", f"{self.url}{path}: {_reason(err)}") from None
        if not response.is_success:
            try:
                error = response.json().get("error")
            except (ValueError, AttributeError):  # not JSON, or JSON but no object
                error = None
            message = error if isinstance(error, str) and error else response.text
            raise ClientError(response.status_code, message or response.reason_phrase)
        try:
            return response.json()
        except ValueError:
            raise ClientError(response.status_code, "the answer is not JSON") from None

    def _rpc(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as err:
            raise ClientError(err.code().name, err.details()) from None

    def close(self) -> None:
        if self._stub is not None:
            self._channel.close()
        else:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


def _predictions(response) -> list[Prediction]:
    return [
        {"category_id": p.category_id, "category": p.category, "score": p.score}
        for p in response.predictions
    ]
