"""``LCNetService``: the BentoML service. Glue only: each worker's instance holds the model it
serves (``ServedModel``: one runner, swapped for a new version by ``Reloader`` when
``LCNET_RELOAD`` says so) and its settings; the HTTP routes (methods of the instance, on a mounted
FastAPI app) and gRPC (a server the instance starts) pin the current runner per request.

What BentoML reads when the class is defined comes from the environment once, at import: the
model reference (``LCNET_MODEL``, so ``bentoml build`` packs it; served from a Bento, the version
it packed), the worker count (``LCNET_WORKERS``/``LCNET_THREADS``), the CORS origins of the
mounted app, and whether the fast routes are traced (only when BentoML's own config names an
exporter). Everything else — the runner, its engine choice, the limits — belongs to the instance
(``self.settings``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml._internal.context import server_context
from fastapi import Header
from pydantic import Field
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import handlers, http_api, middleware, paddlex_api, servers
from .artifact import (
    InvalidModelError,
    ModelArtifact,
    ModelNotFoundError,
    load_folder,
    packed_tags,
    pinned_model,
    serving_bento,
    verify_checksums,
)
from .choice import refuse_unusable
from .metrics import PrometheusObserver, ReloadCounter, ServedVersions
from .reload import Reloader, ServedModel, try_load_in_child
from .runner import HeldImages, LCNetRunner
from .settings import REQUEST_TIMEOUT_S, ServingSettings, is_set

logger = logging.getLogger("bentoml.lcnet")  # BentoML shows its own loggers' INFO lines
SERVICE_NAME = "lcnet"


@contextlib.contextmanager
def _refusing_to_serve() -> Iterator[None]:
    """What stops the service at start (a setting out of range, a model missing, a variant
    refused) as BentoML's one line, ``Error: [serve] `serve` failed: <ours>``, exit code 1: as
    itself, it was the last line of a 60-line traceback through click and importlib."""
    try:
        yield
    except (ValueError, ModelNotFoundError) as err:
        raise bentoml.exceptions.BentoMLException(str(err)) from None


with _refusing_to_serve():
    AT_DEFINITION = ServingSettings.from_env()
if server_context.worker_index is None:  # `bentoml serve`'s own process: what its exit says
    atexit.register(servers.exit_1_if_stopped)
http_app = http_api.create_app()


# The typed routes' top_k, documented with its bound (TypedApiGuard refuses 0 over HTTP with
# 422; BentoML checks a call from another service).
TopK = Annotated[int, Field(ge=1, description="how many classes to return, best first")]


def _packed_version() -> str | None:
    """The model version packed for this service in the Bento being served; None outside a
    Bento. A Bento serves the model it was built with, whatever its name, when LCNET_MODEL is
    not set where it runs (in a container its own store holds nothing else)."""
    bento = serving_bento()
    packed = packed_tags(bento, SERVICE_NAME) if bento else []
    return packed[0] if packed else None


def _model_reference(tag: str) -> bentoml.models.BentoModel:
    """Declared on the class so `bentoml build` packs the model, pinned to the version the server
    starts on (``pinned_model``); a missing model is one clear message instead of a BentoCloud
    lookup error."""
    if not is_set("model", os.environ):
        tag = _packed_version() or tag
    try:
        return pinned_model(tag)
    except ModelNotFoundError as err:
        raise type(err)(f"{err} (LCNET_MODEL names the model to serve)") from None


def _refuse_unusable_variant(model: bentoml.models.BentoModel, settings: ServingSettings) -> None:
    """Check the model's files and a named engine/precision (accuracy guard, self-check on this
    CPU) before any worker starts: BentoML restarts a worker that fails to initialise forever, so
    the same error would otherwise scroll by and the server never become ready. Once, where the
    service is defined (`bentoml serve`'s own process): a worker loads the model anyway."""
    if server_context.worker_index is not None:
        return
    stored = bentoml.models.get(model.tag)
    if not verify_checksums(Path(stored.path)):
        _try_loading_unchecked(Path(stored.path), str(model.tag))
    artifact = load_folder(stored.path, tag=str(model.tag))
    runner = settings.runner
    refuse_unusable(artifact, runner.engine, runner.precision, runner.skip_guard)


def _try_loading_unchecked(folder: Path, tag: str) -> None:
    """A version stored before checksums were recorded loads once in a child process, as a
    reload does: damaged, it failed in every worker, which BentoML restarted forever."""
    try:
        try_load_in_child(folder)
    except RuntimeError as err:
        raise InvalidModelError(
            f"{tag} was stored before checksums were recorded, and its files do not load ({err}):"
            " store it again, or serve another version"
        ) from None


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(
    name=SERVICE_NAME,
    workers=AT_DEFINITION.worker_count,
    traffic={"timeout": REQUEST_TIMEOUT_S},
    metrics={"enabled": True},
    # BentoML's access log decodes the request's Content-Type as UTF-8 after the answer's
    # headers went out: one byte past ASCII there and the answer's body was lost.
    logging={"access": {"request_content_type": False}},
    tracing=middleware.tracing_config(SERVICE_NAME),
)
class LCNetService:
    with _refusing_to_serve():
        model = _model_reference(AT_DEFINITION.model)
        _refuse_unusable_variant(model, AT_DEFINITION)

    def __init__(self) -> None:
        self.settings = ServingSettings.from_env()
        self.observer = PrometheusObserver(self.model.tag.name)
        # One bound for the worker: while a reload drains the old version, both runners count.
        self.held = HeldImages(
            self.settings.runner.max_queued_images, self.observer.held,
            byte_limit=self.settings.max_held_bytes, on_bytes_change=self.observer.held_bytes,
        )  # fmt: skip
        self.served = ServedModel(
            self._first_runner(), on_serving=ServedVersions(self.model.tag.name).serving
        )
        self.reloader = None
        if self.settings.reload != "off":
            self.reloader = Reloader(
                self.served,
                str(self.model.tag.name),
                watch=self.settings.reload == "watch",
                interval_s=self.settings.reload_interval_s,
                make_runner=self._runner,
                on_result=ReloadCounter(self.model.tag.name).count,
            )
        self.grpc_server = None

    def _first_runner(self) -> LCNetRunner:
        """The runner of the version the worker starts on. A stop signal while its engine race
        runs (Ctrl-C, or BentoML's arbiter stopping its workers one by one: `docker stop`, a pod
        deleted as it starts) ends the race and the worker, as uvicorn ends it once it serves;
        the race held it for its whole length (tens of seconds), or failed with a traceback."""
        told_to_stop = threading.Event()
        servers.on_stop_signal(told_to_stop.set)
        try:
            return self._runner(load_folder(self.model.path, tag=str(self.model.tag)), told_to_stop)
        except Exception as err:
            if not told_to_stop.is_set():
                raise
            logger.info("start-up interrupted by a stop signal before %s was loaded (%s: %s)",
                        self.model.tag, type(err).__name__, err)  # fmt: skip
            servers.end_as_stopped()

    def _runner(self, artifact: ModelArtifact, stop: threading.Event | None = None) -> LCNetRunner:
        config = self.settings.runner
        runner = LCNetRunner(artifact, config, self.observer, self.held, stop=stop)
        logger.info(
            "serving %s on %s (engine=%s, precision=%s requested), %d thread(s)",
            runner.tag, runner.predictor.choice.describe(), config.engine, config.precision,
            config.threads,
        )  # fmt: skip
        return runner

    @http_app.post("/classify", **http_api.CLASSIFY_DOC)
    async def classify(self, request: Request) -> JSONResponse:
        with self.served.pinned() as runner:
            work = http_api.classify(request, runner, self.settings)
            return await http_api.answer(work, runner.tag)

    @http_app.post("/classify_batch", **http_api.CLASSIFY_BATCH_DOC)
    async def classify_batch(self, request: Request) -> JSONResponse:
        with self.served.pinned() as runner:
            work = http_api.classify_batch(request, runner, self.settings)
            return await http_api.answer(work, runner.tag)

    @http_app.post("/image-classification", **paddlex_api.PADDLEX_DOC)
    async def paddlex_classify(self, request: Request) -> JSONResponse:
        with self.served.pinned() as runner:
            return await paddlex_api.paddlex_classify(request, runner, self.settings)

    @http_app.get("/model", **http_api.MODEL_DOC)
    async def model_info(self) -> JSONResponse:
        runner = self.served.runner
        info = handlers.served_model_info(runner, self.settings, self.reloader)
        return JSONResponse(info, headers={handlers.VERSION_HEADER: runner.tag})

    # Absent from /docs.json (and 404) unless LCNET_ADMIN_TOKEN is set.
    @http_app.post("/admin/reload", include_in_schema=bool(AT_DEFINITION.admin_token),
                   **http_api.RELOAD_DOC)  # fmt: skip
    async def admin_reload(
        self, request: Request, authorization: str | None = Header(None, include_in_schema=False)
    ) -> JSONResponse:
        return await http_api.admin_reload(
            request, authorization, self.settings, self.reloader, self.served.tag
        )

    # Typed API for BentoML's clients: `client.predict(image=Path("cat.jpg"), top_k=3)`. The
    # same runner, batches and checks (handlers) as the fast routes; an HTTP body was checked and
    # re-encoded by TypedApiGuard first, a call from another service (bentoml.depends) was not.
    @bentoml.api(route="/predict")
    async def predict(
        self, image: Path, ctx: bentoml.Context, top_k: TopK = 1
    ) -> list[http_api.PredictionOut]:
        """Classify one image (the same answer as /classify). Errors, as {"error": "..."}: 400
        not an image, 413 too large, 415 not multipart, 422 a missing field or top_k < 1."""
        with self.served.pinned() as runner:
            work = handlers.classify(runner, image.read_bytes(), top_k)
            return await http_api.typed_answer(work, runner.tag, ctx)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(
        self, images: list[Path], ctx: bentoml.Context, top_k: TopK = 1
    ) -> list[list[http_api.PredictionOut]]:
        """Classify several images (the same answer as /classify_batch). Errors, as {"error":
        "..."}: 400 not an image, 413 too large or too many, 415 not multipart, 422 a missing
        field, no image or top_k < 1."""
        with self.served.pinned() as runner:
            photos = [image.read_bytes() for image in images]
            work = handlers.classify_batch(runner, self.settings, photos, top_k)
            return await http_api.typed_answer(work, runner.tag, ctx)

    @bentoml.on_startup
    async def start(self) -> None:
        if _serves_grpc(self.settings):
            from .grpc_api import GrpcPortTakenError, start_grpc_server

            try:
                self.grpc_server = await start_grpc_server(
                    self.served, self.settings, self.reloader
                )
            except GrpcPortTakenError as err:
                _stop_the_server(str(err))
                raise
            self.grpc_server.stop_with_http()
        if self.reloader is not None:
            self.reloader.start()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop()
        await self.served.close()


def _serves_grpc(settings: ServingSettings) -> bool:
    """gRPC on its own port, by default only as the service `bentoml serve` was started for: as
    a dependency of someone else's service, ours opens no port its host did not ask for (and no
    second server's port clashes with it) unless LCNET_GRPC_PORT is set."""
    if not settings.grpc_port:
        return False
    if servers.serving_as_dependency() and not is_set("grpc_port", os.environ):
        logger.info(
            "gRPC off: %s serves as a dependency; LCNET_GRPC_PORT turns it on", SERVICE_NAME
        )
        return False
    return True


def _stop_the_server(why: str) -> None:
    """Stop the whole `bentoml serve`, exit code 1 — as a port taken by another process stops
    it — rather than let BentoML restart a worker that cannot start, again and again. Not as a
    dependency: that server is someone else's service, which BentoML keeps up without ours."""
    logger.error("error: %s", why)
    if server_context.worker_index is not None and not servers.serving_as_dependency():
        servers.stop_server(why)


# Outermost of ours, so that every answer to a listed origin carries CORS headers, the fast
# routes' and the guard's refusals included (BentoML's own CORS comes after its service's
# middlewares: inside them, where the fast routes never pass).
if AT_DEFINITION.cors_origin_list:
    LCNetService.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=AT_DEFINITION.cors_origin_list,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],  # the admin token; an image as the body
        expose_headers=[handlers.VERSION_HEADER],  # or a page's script cannot read it
    )
middleware.escape_access_log()
# Before BentoML's own IO on the typed routes (limits: the definition-time settings).
LCNetService.add_asgi_middleware(middleware.TypedApiGuard, settings=AT_DEFINITION)
# The fast routes' requests go straight to their methods.
LCNetService.add_asgi_middleware(middleware.DirectRoutes, routes=middleware.FAST_ROUTES)
