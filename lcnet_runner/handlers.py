"""Request handling shared by the transports: what a request means, its limits and its errors,
and what `/model` says. HTTP (http_api) and gRPC (grpc_api) both call these functions."""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bentoml._internal.context import server_context
from bentoml.exceptions import InvalidArgument, ServiceUnavailable

from .artifact import ModelNotFoundError
from .predictor import Prediction, TopKError, checked_top_k
from .reload import UnreadableModelError
from .runner import LCNetRunner
from .settings import ServingSettings

if TYPE_CHECKING:
    from .reload import Reloader

VERSION_HEADER = "X-Model-Version"  # on every answer: the model version that produced it
# On a 503 (the worker busy): when to try again. A second: a worker answers hundreds of images.
RETRY_AFTER_S = 1


class RequestError(Exception):
    """A client error: an HTTP status (gRPC maps it to a status code, INVALID_ARGUMENT for most)
    and a message safe to return."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def refusal_status(error: Exception) -> int | None:
    """The HTTP status of a request refused: for the client's mistake (4xx), or while the worker
    is too busy to take it (503, RunnerBusyError); None for a server fault. The runner's own
    refusals (a bad image, too many pixels, a bad ``top_k``, busy) are BentoML exceptions and
    carry the status BentoML answers them with in anyone's service: the same one here."""
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, (InvalidArgument, ServiceUnavailable)):
        return int(error.error_code)
    return None


def parse_top_k(value: Any) -> int:
    """``top_k`` as a request carries it (text, or gRPC's integer), checked as the Predictor
    checks it (more than the class count is clamped to it); absent or empty mean the default, 1
    (gRPC passes a proto's unset 0 as absent)."""
    if value is None or value == "":
        return 1
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        top_k = str(value)[:50]  # refused below, as a Predictor refuses what is not an integer
    try:
        return checked_top_k(top_k)
    except TopKError as err:
        raise RequestError(422, str(err)) from None


async def classify(runner: LCNetRunner, image: bytes, top_k: Any) -> list[Prediction]:
    return await runner.aclassify(image, parse_top_k(top_k))  # decoding rejects empty bytes


async def classify_batch(
    runner: LCNetRunner, settings: ServingSettings, images: Sequence[bytes], top_k: Any
) -> list[list[Prediction]]:
    top_k = parse_top_k(top_k)
    if not images:
        raise RequestError(422, "no images")
    if len(images) > settings.max_batch_images:
        raise too_many_images(settings)
    return await runner.aclassify_batch(images, top_k)


def too_many_images(settings: ServingSettings) -> RequestError:
    return RequestError(413, f"at most {settings.max_batch_images} images per request")


def served_model_info(
    runner: LCNetRunner, settings: ServingSettings, reloader: Reloader | None = None
) -> dict[str, Any]:
    return {
        **runner.describe(),
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "body_timeout_s": settings.body_timeout_s,
            "max_pixels": settings.runner.max_pixels,
            "max_batch_pixels": settings.runner.max_batch_pixels,
            "max_batch_images": settings.max_batch_images,
            "max_queued_images": settings.runner.max_queued_images,
            "max_held_bytes": settings.max_held_bytes,
        },
        "reload": {"mode": settings.reload, **(reloader.describe() if reloader else {})},
        # Each worker answers for itself (its version, its reload, its load): which one this is.
        "worker": {
            "index": server_context.worker_index,
            "pid": os.getpid(),
            "held_images": runner.held_images,  # against limits.max_queued_images
            "held_bytes": runner.held_bytes,  # against limits.max_held_bytes
        },
    }


def check_admin(settings: ServingSettings, authorization: str | None) -> None:
    """The admin routes exist only with LCNET_ADMIN_TOKEN; then they need it as a bearer token
    (compared in constant time)."""
    if not settings.admin_token:
        raise RequestError(404, "not found")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(401, "send the admin token as 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
        raise RequestError(403, "wrong admin token")


def request_reload(reloader: Reloader | None, tag: str | None) -> dict[str, str]:
    """Record which version every worker should load (``None``: the newest of the served name);
    the workers load it in the background and swap when it passed its checks."""
    if reloader is None:
        raise RequestError(409, "reloading is off: start the server with LCNET_RELOAD=request")
    if tag is not None and not tag.strip():
        raise RequestError(422, "tag must be a store tag such as 'pplcnet:<version>'")
    try:
        resolved = reloader.request(tag or None)
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    except ModelNotFoundError as err:
        raise RequestError(404, str(err)) from None
    except UnreadableModelError as err:  # the store's fault, not the request's
        raise RequestError(409, str(err)) from None
    return {"tag": resolved, "state": "requested", "serving": reloader.served.tag}
