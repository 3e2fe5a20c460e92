"""``LCNetService``: the BentoML service. Glue only: each worker's instance holds one runner and
its settings; the HTTP routes (methods of the instance, on a mounted FastAPI app) and gRPC (a
server the instance starts) both feed that runner.

What BentoML reads when the class is defined comes from the environment once, at import: the
model reference (``LCNET_MODEL``, so ``bentoml build`` packs it), the worker count
(``LCNET_WORKERS``/``LCNET_THREADS``) and the CORS origins of the mounted app. Everything else —
the runner, its engine choice, the limits — belongs to the instance (``self.settings``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import handlers, http_api
from .artifact import ModelNotFoundError, bentoml_home, load_folder
from .choice import refuse_unusable
from .settings import ServingSettings

logger = logging.getLogger("bentoml.lcnet")  # BentoML shows its own loggers' INFO lines
AT_DEFINITION = ServingSettings.from_env()
http_app = http_api.create_app(AT_DEFINITION.cors_origins)


def _model_reference(tag: str) -> bentoml.models.BentoModel:
    """Declared on the class so `bentoml build` packs the model; checked here so a missing model
    is one clear message instead of a BentoCloud lookup error."""
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise ModelNotFoundError(
            f"model {tag!r} is not in the BentoML store ({bentoml_home()}); train one with "
            "`make demo` or `python -m train fit DATASET`, or set LCNET_MODEL to another tag"
        ) from None
    return bentoml.models.BentoModel(tag)


def _refuse_unusable_variant(settings: ServingSettings) -> None:
    """Check a named engine/precision (accuracy guard, self-check on this CPU) before any worker
    starts: BentoML restarts a worker that fails to initialise forever, so the same error would
    otherwise scroll by and the server never become ready."""
    artifact = load_folder(bentoml.models.get(settings.model).path, tag=settings.model)
    runner = settings.runner
    refuse_unusable(artifact, runner.engine, runner.precision, runner.skip_guard)


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(
    name="lcnet",
    workers=AT_DEFINITION.worker_count,
    traffic={"timeout": 60},
    metrics={"enabled": True},
)
class LCNetService:
    model = _model_reference(AT_DEFINITION.model)
    _refuse_unusable_variant(AT_DEFINITION)

    def __init__(self) -> None:
        from .metrics import PrometheusObserver
        from .runner import LCNetRunner

        self.settings = ServingSettings.from_env()
        artifact = load_folder(self.model.path, tag=str(self.model.tag))
        config = self.settings.runner
        observer = PrometheusObserver(config.max_batch_size)
        self.runner = LCNetRunner(artifact, config, observer)
        logger.info(
            "serving %s on %s (engine=%s, precision=%s requested), %d thread(s)",
            artifact.name, self.runner.predictor.choice.describe(), config.engine,
            config.precision, config.threads,
        )  # fmt: skip
        self.grpc_server = None

    @http_app.post("/classify", **http_api.CLASSIFY_DOC)
    async def classify(self, request: Request) -> JSONResponse:
        return await http_api.answer(http_api.classify(request, self.runner, self.settings))

    @http_app.post("/classify_batch", **http_api.CLASSIFY_BATCH_DOC)
    async def classify_batch(self, request: Request) -> JSONResponse:
        return await http_api.answer(http_api.classify_batch(request, self.runner, self.settings))

    @http_app.post("/image-classification", **http_api.PADDLEX_DOC)
    async def paddlex_classify(self, request: Request) -> JSONResponse:
        return await http_api.paddlex_classify(request, self.runner, self.settings)

    @http_app.get("/model", **http_api.MODEL_DOC)
    async def model_info(self) -> JSONResponse:
        return JSONResponse(handlers.served_model_info(self.runner, self.settings))

    # Typed API for BentoML's clients: `client.predict(image=Path("cat.jpg"), top_k=3)`. The
    # same runner and batches; the body was checked and re-encoded by TypedApiGuard first.
    @bentoml.api(route="/predict")
    async def predict(self, image: Path, top_k: int = 1) -> list[http_api.PredictionOut]:
        """Classify one image (the same answer as /classify)."""
        return await http_api.typed_answer(self.runner.aclassify(image.read_bytes(), top_k))

    @bentoml.api(route="/predict_batch")
    async def predict_batch(
        self, images: list[Path], top_k: int = 1
    ) -> list[list[http_api.PredictionOut]]:
        """Classify several images (the same answer as /classify_batch)."""
        data = [image.read_bytes() for image in images]
        return await http_api.typed_answer(self.runner.aclassify_batch(data, top_k))

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if self.settings.grpc_port:
            from .grpc_api import start_grpc_server

            self.grpc_server = await start_grpc_server(self.runner, self.settings)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        await self.runner.close()


# Before BentoML's own IO on the typed routes (limits: the definition-time settings).
LCNetService.add_asgi_middleware(http_api.TypedApiGuard, settings=AT_DEFINITION)
