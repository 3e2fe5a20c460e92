"""The HTTP API: a thin Starlette app mounted on the BentoML service.

Why not ``@bentoml.api``: measured on 2 cores, BentoML's input validation and multipart handling
took ~25 % of a worker's CPU, answered several kinds of bad input with 500, and fetches URLs sent
in place of a file (server-side request forgery). Here every bad request gets a 4xx with
``{"error": "..."}``, limits are enforced while the body streams in, and uploads are only ever
read as bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import handlers
from .handlers import RequestError, client_error_status
from .runner import LCNetRunner
from .settings import ServingSettings

logger = logging.getLogger(__name__)
UI_DIR = Path(__file__).parent / "ui"


async def _limited(request: Request, limit: int):
    """The request body, refusing more than ``limit`` bytes whatever Content-Length claimed."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestError(413, f"request body is larger than the limit of {limit} bytes")
        yield chunk


async def read_upload(
    request: Request, settings: ServingSettings, field: str
) -> tuple[list[bytes], str | None]:
    """The files in ``field`` and the raw ``top_k`` of a multipart request."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(415, "send multipart/form-data with the image as a file field")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is larger than the limit of {limit} bytes")
    parser = MultiPartParser(
        request.headers,
        _limited(request, limit),
        max_files=settings.max_batch_images,
        max_fields=20,
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        status = 413 if "Too many files" in err.message else 400
        raise RequestError(status, f"malformed multipart body: {err.message}") from None
    try:
        values = form.getlist(field)
        if not values:
            raise RequestError(422, f"missing file field {field!r}")
        if not all(isinstance(v, UploadFile) for v in values):
            # Never treat text as a URL or a path to fetch.
            raise RequestError(422, f"field {field!r} must be a file upload, not text")
        top_k = form.get("top_k")
        return [await v.read() for v in values], top_k if isinstance(top_k, str) else None
    finally:
        await form.close()


def _handler(
    work: Callable[[Request, LCNetRunner, ServingSettings], Awaitable[Any]],
) -> Callable[[Request], Awaitable[JSONResponse]]:
    """Client errors become 4xx JSON; anything else is a logged 500 without internals."""

    async def endpoint(request: Request) -> JSONResponse:
        runner, settings = request.app.state.runner, request.app.state.settings
        try:
            return JSONResponse(await work(request, runner, settings))
        except Exception as err:
            status = client_error_status(err)
            if status is None:
                logger.exception("request failed")
                return JSONResponse({"error": "internal error"}, status_code=500)
            return JSONResponse({"error": str(err)}, status_code=status)

    return endpoint


async def _classify(request: Request, runner: LCNetRunner, settings: ServingSettings) -> Any:
    images, top_k = await read_upload(request, settings, "image")
    if len(images) != 1:
        raise RequestError(422, "send exactly one file in 'image' (use /classify_batch for more)")
    return await handlers.classify(runner, images[0], top_k)


async def _classify_batch(request: Request, runner: LCNetRunner, settings: ServingSettings) -> Any:
    images, top_k = await read_upload(request, settings, "images")
    return await handlers.classify_batch(runner, settings, images, top_k)


async def _model(request: Request, runner: LCNetRunner, settings: ServingSettings) -> Any:
    return handlers.served_model_info(runner, settings)


async def _ui(request: Request) -> FileResponse:
    return FileResponse(UI_DIR / "index.html")


def create_app(cors_origins: str = "") -> Starlette:
    """Routes only; the service puts its runner and settings on ``app.state`` at start-up.
    Cross-origin browser calls are refused unless ``cors_origins`` lists the origins."""
    origins = [origin.strip() for origin in cors_origins.split(",") if origin.strip()]
    middleware = [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"])]
    return Starlette(
        middleware=middleware if origins else [],
        routes=[
            Route("/classify", _handler(_classify), methods=["POST"]),
            Route("/classify_batch", _handler(_classify_batch), methods=["POST"]),
            Route("/model", _handler(_model), methods=["GET"]),
            # A page to try the model: static files shipped in the package, no build, no CDN.
            Route("/ui", _ui, methods=["GET"]),
            Mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui"),
        ],
    )
