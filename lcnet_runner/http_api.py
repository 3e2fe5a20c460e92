"""The fast HTTP routes: a FastAPI app mounted on the BentoML service, whose routes are methods
of the service (so each reaches its own instance's runner and settings, and BentoML merges their
OpenAPI into ``/docs.json``).

Why not ``@bentoml.api`` for these: measured on 2 cores, BentoML's input validation and multipart
handling took ~25 % of a worker's CPU, answered several kinds of bad input with 500, and fetches
URLs sent in place of a file (server-side request forgery). Here each route takes the raw
request: every bad request gets a 4xx with ``{"error": "..."}``, limits are enforced while the
body streams in, uploads are only ever read as bytes, and the request body is declared for the
OpenAPI document by hand (``openapi_extra``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
from bentoml import get_current_service  # bentoml.X is a lazy import on every access
from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles

from . import handlers, servers
from .handlers import RequestError, client_error_status
from .runner import LCNetRunner
from .settings import ServingSettings

if TYPE_CHECKING:
    from .reload import Reloader

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


@contextlib.asynccontextmanager
async def _body_arriving(timeout_s: float) -> AsyncIterator[None]:
    """Around the reading of a whole body: 408 when it is still incomplete after ``timeout_s``
    (a client that stalls mid-upload would otherwise hold its request until BentoML's own
    timeout answers 504, as if the server had failed), 499 when the client hung up meanwhile
    (nobody reads that answer, but the log and the metrics then count no server fault). One
    deadline per body: one per chunk cost ~1 % of the throughput at 32 clients
    (docs/benchmarks.md, session 15)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise RequestError(
            499, "the client closed the connection before its body arrived"
        ) from None


def _refuse_declared_excess(request: Request, limit: int) -> None:
    """413 at once when Content-Length already says the body is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    # isdigit() is also true of "²", which int() refuses; past 18 digits it is over any limit.
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise RequestError(413, f"request body is larger than the limit of {limit} bytes")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole request body, refused (413) past ``limit`` bytes, declared or streamed, and
    (408) when it has not all arrived within ``timeout_s``."""
    _refuse_declared_excess(request, limit)
    async with _body_arriving(timeout_s):
        return b"".join([chunk async for chunk in _limited(request, limit)])


def _media_type(request: Request) -> str:
    """The request's Content-Type, lower-cased: media types are case-insensitive (RFC 9110)."""
    return request.headers.get("content-type", "").lower()


# What a body that is the image itself is sent as (``curl --data-binary @cat.jpg -H
# 'Content-Type: image/jpeg'``): one image, no multipart envelope to parse.
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
FORM_TYPE = "application/x-www-form-urlencoded"  # a form that cannot hold a file


async def read_upload(
    request: Request, settings: ServingSettings, field: str
) -> tuple[list[bytes], str | None]:
    """The files in ``field`` and the raw ``top_k`` of a multipart request: a text field, or
    else the query string's (as for an image sent as the body)."""
    media_type = _media_type(request)
    # A form without its file, or nothing at all: what BentoML's own client sends for
    # predict_batch(images=[]), with top_k and without.
    if media_type.startswith(FORM_TYPE) or not media_type and _declared_empty(request):
        raise RequestError(422, f"missing file field {field!r} (send multipart/form-data)")
    if not media_type.startswith("multipart/form-data"):
        raise RequestError(415, "send multipart/form-data with the image as a file field")
    limit = settings.max_body_bytes
    _refuse_declared_excess(request, limit)
    parser = MultiPartParser(
        request.headers,
        _limited(request, limit),
        max_files=settings.max_batch_images,
        max_fields=20,
    )
    try:
        async with _body_arriving(settings.body_timeout_s):
            form = await parser.parse()
    except MultiPartException as err:
        if "Too many files" in err.message:
            raise handlers.too_many_images(settings) from None
        raise RequestError(400, f"malformed multipart body: {err.message}") from None
    try:
        values = form.getlist(field)
        if not values:
            raise RequestError(422, f"missing file field {field!r}")
        if not all(isinstance(v, UploadFile) for v in values):
            # Never treat text as a URL or a path to fetch.
            raise RequestError(422, f"field {field!r} must be a file upload, not text")
        top_k = form.get("top_k")
        if isinstance(top_k, UploadFile):
            raise RequestError(422, "top_k must be a text field, not a file")
        # The form's first: Swagger's "Try it out" sends both (the document declares the query
        # parameter for an image sent as the body).
        if top_k is None:
            top_k = request.query_params.get("top_k")
        return [await v.read() for v in values], top_k
    finally:
        await form.close()


def _declared_empty(request: Request) -> bool:
    headers = request.headers
    return headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers


def invalid_request(err: ValidationError) -> RequestError:
    """422 for a JSON body that does not validate, naming the first field at fault."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])  # empty for the body itself
    return RequestError(422, f"invalid request: {where + ': ' if where else ''}{first['msg']}")


def failure(err: Exception) -> tuple[int, str]:
    """The status and message a route answers an exception with: a client's mistake keeps its
    4xx and message; anything else is logged and becomes a 500 without internals."""
    status = client_error_status(err)
    if status is None:
        logger.exception("request failed")
        return 500, "internal error"
    return status, str(err)


def refusal(body: Any, status: int, version: str) -> JSONResponse:
    """An error answer with the version serving; after a body that did not arrive in time (408)
    the connection is closed, or its slow client trickled on into it after the answer."""
    headers = {handlers.VERSION_HEADER: version}
    if status == 408:
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=headers)


async def answer(work: Awaitable[Any], version: str) -> JSONResponse:
    """A route's answer, or ``{"error"}`` with the status of ``failure``; either way with the
    model version that answered."""
    try:
        return JSONResponse(await work, headers={handlers.VERSION_HEADER: version})
    except Exception as err:
        status, message = failure(err)
        return refusal({"error": message}, status, version)


async def typed_answer(work: Awaitable[Any], version: str, ctx: bentoml.Context) -> Any:
    """The typed routes' answer: the result, or (BentoML passes a Response through, with the
    context's status) the same 4xx ``{"error"}`` as the fast routes for a client's mistake,
    e.g. an undecodable image. Both with the model version that answered. As a dependency, the
    message alone: BentoML's client makes the body its exception's message, which the calling
    service would otherwise show as JSON inside JSON."""
    ctx.response.headers[handlers.VERSION_HEADER] = version
    try:
        return await work
    except Exception as err:
        status = client_error_status(err)
        if status is None:
            raise
        ctx.response.status_code = status
        if servers.serving_as_dependency():
            return PlainTextResponse(str(err), status_code=status)
        return JSONResponse({"error": str(err)}, status_code=status)


async def classify(request: Request, runner: LCNetRunner, settings: ServingSettings) -> Any:
    """One image: the body itself (``top_k`` in the query string) or a multipart file field."""
    content_type = _media_type(request)
    if content_type.startswith(RAW_IMAGE_TYPES):
        image = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        return await handlers.classify(runner, image, request.query_params.get("top_k"))
    if not content_type.startswith(("multipart/form-data", FORM_TYPE)):  # a form: read_upload's
        raise RequestError(415, "send the image as the body (Content-Type image/* or "
                                "application/octet-stream) or as the file field 'image' of "
                                "multipart/form-data")  # fmt: skip
    images, top_k = await read_upload(request, settings, "image")
    if len(images) != 1:
        raise RequestError(422, "send exactly one file in 'image' (use /classify_batch for more)")
    return await handlers.classify(runner, images[0], top_k)


async def classify_batch(request: Request, runner: LCNetRunner, settings: ServingSettings) -> Any:
    images, top_k = await read_upload(request, settings, "images")
    return await handlers.classify_batch(runner, settings, images, top_k)


# What the OpenAPI document says of the routes (the bodies are parsed by hand, above).
class PredictionOut(BaseModel):
    category_id: int
    category: str
    score: float


class ErrorOut(BaseModel):
    error: str


_FILE = {"type": "string", "format": "binary"}
_TOP_K = {"type": "integer", "minimum": 1, "default": 1, "description": "classes per image"}


def _multipart(field: str, many: bool) -> dict[str, Any]:
    image = {"type": "array", "items": _FILE} if many else _FILE
    schema = {"type": "object", "required": [field], "properties": {field: image, "top_k": _TOP_K}}
    content = {"multipart/form-data": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


def _multipart_or_raw(field: str) -> dict[str, Any]:
    """One image, as a multipart file field or as the whole body (``top_k`` in the query)."""
    doc = _multipart(field, many=False)
    raw = {"schema": _FILE}
    doc["requestBody"]["content"].update({"image/*": raw, "application/octet-stream": raw})
    top_k = {**_TOP_K, "description": "classes per image, for an image sent as the body"}
    doc["parameters"] = [{"name": "top_k", "in": "query", "required": False, "schema": top_k}]
    return doc


# What the routes' error statuses mean, in /docs.json (as ErrorOut: {"error": "..."}).
ERROR_MEANINGS = {400: "undecodable image or malformed body", 408: "the body arrived too slowly",
                  413: "too large (body, pixels, images)", 415: "another content type",
                  422: "missing or invalid field", 500: "server fault (no internals)"}  # fmt: skip


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorOut, "description": ERROR_MEANINGS[s]} for s in statuses}


CLASSIFY_DOC = {
    "summary": "Classify one image (multipart file field `image`, or the body itself)",
    "openapi_extra": _multipart_or_raw("image"),
    "responses": {
        200: {"model": list[PredictionOut], "description": "top-k classes, best first"},
        **_errors(400, 408, 413, 415, 422, 500),
    },  # fmt: skip
}
CLASSIFY_BATCH_DOC = {
    "summary": "Classify several images (repeated multipart file field `images`)",
    "openapi_extra": _multipart("images", many=True),
    "responses": {
        200: {"model": list[list[PredictionOut]], "description": "one list per image"},
        **_errors(400, 408, 413, 415, 422, 500),
    },  # fmt: skip
}


class ModelInfoOut(BaseModel):
    """What ``GET /model`` answers (``handlers.served_model_info``), for the OpenAPI document."""

    model_config = ConfigDict(extra="allow")
    tag: str
    architecture: str | None
    labels: list[str]
    input_size: int
    preprocess: dict[str, Any]
    engine: str
    precision: str
    engine_choice: dict[str, Any]  # the variant, its self-check, auto's race, what could not serve
    threads: int
    solo_threads: int | None  # a lone image on every core, when the engine releases the GIL
    max_batch_size: int
    max_delay_ms: float
    val_top1: float | None
    test_top1: float | None
    limits: dict[str, int | float]
    reload: dict[str, Any]  # mode, and the last reload's state, tag and error
    worker: dict[str, int | None]  # which worker answered: each speaks for itself


MODEL_DOC = {
    "summary": "The served model: tag, labels, preprocessing, engine choice, limits, reload state",
    "responses": {200: {"model": ModelInfoOut}},
}


class ReloadIn(BaseModel):
    tag: str | None = None  # a version of the served name; absent: its newest version


class ReloadOut(BaseModel):
    tag: str  # the version every worker will load
    state: str  # "requested"
    serving: str  # the version this worker serves now


RELOAD_DOC = {
    "summary": "Load a new model version in every worker, swap when it passed its checks",
    "description": "Needs `Authorization: Bearer <LCNET_ADMIN_TOKEN>`. Answers 202 at once; "
    "`GET /model` shows `reload.state` (loading, idle, failed) and the `X-Model-Version` header "
    "of every answer the version that produced it.",
    "status_code": 202,
    # For the document only (its security scheme lets Swagger's "Try it out" send the token);
    # the route checks the header itself, as gRPC's metadata (handlers.check_admin).
    "dependencies": [Security(HTTPBearer(auto_error=False, scheme_name="adminToken"))],
    "openapi_extra": {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReloadIn.model_json_schema()}},
        }
    },
    "responses": {
        202: {"model": ReloadOut},
        **{s: {"model": ErrorOut} for s in (401, 403, 404, 409, 422)},
    },  # fmt: skip
}


async def admin_reload(
    request: Request,
    authorization: str | None,
    settings: ServingSettings,
    reloader: Reloader | None,
    version: str,
) -> JSONResponse:
    """``POST /admin/reload``; ``version``: the one serving, in the answer's header."""
    try:
        handlers.check_admin(settings, authorization)
        body = await read_body(request, 4096, settings.body_timeout_s)
        try:
            asked = ReloadIn.model_validate_json(body) if body.strip() else ReloadIn()
        except ValidationError as err:
            raise invalid_request(err) from None
        accepted = handlers.request_reload(reloader, asked.tag)
    except Exception as err:
        status, message = failure(err)
        return refusal({"error": message}, status, version)
    return JSONResponse(accepted, status_code=202, headers={handlers.VERSION_HEADER: version})


async def _ui(request: Request) -> FileResponse:
    return FileResponse(UI_DIR / "index.html")


def create_app() -> FastAPI:
    """The app the service mounts at ``/``; the service adds the API routes as its own methods."""
    app = FastAPI(title="lcnet", docs_url=None, redoc_url=None, openapi_url=None)
    # A page to try the model: static files shipped in the package, no build, no CDN.
    app.add_api_route("/ui", _ui, methods=["GET"], include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui")
    app.dependency_overrides[get_current_service] = _current_service
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """The app's own refusals (e.g. 405 for a GET on a POST route) in the routes' error shape."""
    return JSONResponse({"error": err.detail}, err.status_code, headers=err.headers)


async def _current_service() -> Any:
    """BentoML binds ``self`` of every route method with ``Depends(get_current_service)``, a
    plain function, which FastAPI runs in a thread pool: a thread hop for every request. Async,
    the same lookup stays on the event loop (measured: 2 workers at 32 clients, see
    docs/benchmarks.md)."""
    return get_current_service()


class DirectRoutes:
    """ASGI middleware that hands a POST to one of ``routes`` (path → name of a route method of
    the service) straight to that method of the worker's service instance.

    The routes stay declared on the mounted FastAPI app, which documents them in ``/docs.json``
    and serves every other request; its layers in between (mount, routing, dependency
    injection, exception middleware) only pass the raw request through to these methods, and
    cost ~6 % of the throughput at 32 clients here (docs/benchmarks.md)."""

    def __init__(self, app, routes: dict[str, str]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send) -> None:
        name = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        route = getattr(get_current_service(), name)
        response = await route(Request(scope, receive))
        await response(scope, receive, send)


# The fast routes: path → name of the service's route method (DirectRoutes hands them over).
FAST_ROUTES = {"/classify": "classify", "/classify_batch": "classify_batch",
               "/image-classification": "paddlex_classify"}  # fmt: skip


class EscapedControls(logging.Filter):
    """Control characters (CR, LF, ESC...) in a record's message written as escapes: BentoML's
    access log writes a request's decoded path as it is, so a URL with %0a added a log line of
    its sender's choosing, and %1b terminal escapes. The message is formatted once, here."""

    CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = self.CONTROLS.sub(_escaped, message), ()
        return True


def _escaped(control: re.Match) -> str:
    return control.group().encode("unicode_escape").decode("ascii")


def escape_access_log() -> None:
    """Put EscapedControls on BentoML's access log (once: defining the service again, as tests
    do, must not stack them)."""
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, EscapedControls) for f in access.filters):
        access.addFilter(EscapedControls())


def tracing_config(service_name: str) -> dict[str, Any]:
    """The service's default ``tracing`` config: the fast routes left out of OpenTelemetry
    unless BentoML's config (a file or overrides, loaded when bentoml is imported) names an
    exporter, for this service or at its top level. Without one — BentoML's default — every
    request's spans are built and dropped: ~7 % of a worker's throughput at 32 clients
    (docs/benchmarks.md). With one, every route is traced as BentoML does: nothing is set,
    since a user's config overrides a service's defaults key by key and an exclusion set here
    would outlive their exporter."""
    # BentoML has no public reader of its loaded config.
    from bentoml._internal.configuration.containers import BentoMLContainer

    config = BentoMLContainer.config.get()
    service = (config.get("services") or {}).get(service_name) or {}
    for tracing in (config.get("tracing"), service.get("tracing")):
        if (tracing or {}).get("exporter_type"):
            return {}
    paths = "|".join(re.escape(path) for path in FAST_ROUTES)
    return {"excluded_urls": [f"^[a-z]+://[^/]*({paths})$"]}  # OpenTelemetry matches full URLs


# The typed routes (`@bentoml.api` methods, for BentoML's clients) and their file field.
TYPED_ROUTES = {"/predict": "image", "/predict_batch": "images"}


class TypedApiGuard:
    """ASGI middleware in front of BentoML's own request handling on the typed routes.

    BentoML 1.4.40's IO answers 500 to several malformed multipart bodies, fetches a URL sent as
    text where a file belongs (server-side request forgery) and names its temporary files after
    the uploaded file name. So the body is parsed here first, with the fast routes' parser and
    limits: anything malformed gets the usual 4xx ``{"error"}``; what passes is re-encoded with
    only the file field(s) — plain names, no text values — and ``top_k``, and handed on. Another
    method gets a JSON 405, and ``/docs.json`` lists the errors these routes really answer."""

    def __init__(self, app, settings: ServingSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        field = TYPED_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if field is None:
            if scope["type"] == "http" and scope.get("path") == "/docs.json":
                return await _documented(self.app, scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":  # BentoML's 405 is plain text
            version = get_current_service().served.tag
            refused = refusal({"error": "Method Not Allowed"}, 405, version)
            refused.headers["Allow"] = "POST"
            return await refused(scope, receive, send)
        if _internal(scope):
            if servers.serving_as_dependency():
                return await self.app(scope, receive, send)
            # BentoML refuses it here too, but with a JSON list for a body
            message = f"{PICKLE_TYPE.decode()} is only for calls between services"
            return await JSONResponse({"error": message}, 415)(scope, receive, send)
        try:
            images, top_k = await read_upload(Request(scope, receive), self.settings, field)
            if field == "image" and len(images) != 1:
                raise RequestError(422, "send exactly one file in 'image'")
            body, content_type = _multipart_body(field, images, handlers.parse_top_k(top_k))
        except RequestError as err:
            version = get_current_service().served.tag
            return await refusal({"error": str(err)}, err.status, version)(scope, receive, send)
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]

        async def replay():  # the new body once; then what the client does (e.g. hang up)
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app({**scope, "headers": headers}, replay, send)


async def _documented(app, scope, receive, send) -> None:
    """``/docs.json`` with the typed routes' errors as they are: BentoML lists its own
    exceptions' (400, 404, 500) for every ``@bentoml.api``, while these answer what this guard
    and the handlers refuse with, as the fast routes do, and never 404."""
    start, chunks = {}, []

    async def keep(message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    body = b"".join(chunks)
    if start.get("status") == 200:
        spec = json.loads(body)
        errors = {str(status): {"description": meaning, "content": {"application/json": {
                      "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
                  for status, meaning in ERROR_MEANINGS.items()}  # fmt: skip
        for path in TYPED_ROUTES:
            if operation := spec.get("paths", {}).get(path, {}).get("post"):
                operation["responses"] = {"200": operation["responses"].get("200"), **errors}
        body = json.dumps(spec).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
    await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


PICKLE_TYPE = b"application/vnd.bentoml+pickle"  # what BentoML's services send each other


def _internal(scope) -> bool:
    """A call from another service of the same deployment (``bentoml.depends``): BentoML sends
    pickles between its own processes and refuses them itself on the public (main) server."""
    content_types = [value for key, value in scope["headers"] if key == b"content-type"]
    # The first one, as Starlette and BentoML read it (a dict would keep the last: a second
    # header could then wave a multipart body past this guard), and its media type compared
    # exactly as BentoML does: a look-alike would pass here and reach BentoML's JSON parsing,
    # with no body limit.
    return bool(content_types) and content_types[0].split(b";")[0].strip() == PICKLE_TYPE


def _multipart_body(field: str, images: list[bytes], top_k: int) -> tuple[bytes, bytes]:
    # Random and in no file: a file holding a known boundary would add parts of its own (a URL
    # as text, which BentoML fetches).
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in image for image in images):
        boundary = secrets.token_hex(16)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
        for image in images
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode()
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}".encode()
