"""What the service adds around BentoML's HTTP server: ASGI middlewares (the fast routes straight
to their methods; a guard in front of BentoML's own IO on the typed routes, which also documents
their errors) and the settings of its access log and tracing.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from bentoml import get_current_service  # bentoml.X is a lazy import on every access
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import handlers, servers
from .handlers import RequestError, refusal_status
from .http_api import ERROR_MEANINGS, read_upload, receiving, refusal
from .runner import RunnerBusyError
from .settings import ServingSettings


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
        request, runner = Request(scope, receive), get_current_service().served.runner
        try:
            with receiving(request, runner, self.settings):  # from before its body arrives
                await self._guarded(request, field, send)
        except RunnerBusyError as err:  # refused at once (_guarded answers its own refusals)
            await refusal({"error": str(err)}, 503, runner.tag)(scope, receive, send)

    async def _guarded(self, request: Request, field: str, send) -> None:
        """The body read and checked, then its file field(s) and ``top_k`` alone on to
        BentoML; or the refusal."""
        scope, receive = request.scope, request.receive
        try:
            images, top_k = await read_upload(request, self.settings, field)
            if field == "image" and len(images) != 1:
                raise RequestError(422, "send exactly one file in 'image'")
            body, content_type = _multipart_body(field, images, handlers.parse_top_k(top_k))
        except (RequestError, RunnerBusyError) as err:
            version, status = get_current_service().served.tag, refusal_status(err)
            return await refusal({"error": str(err)}, status, version)(scope, receive, send)
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
