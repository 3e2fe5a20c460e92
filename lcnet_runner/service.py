"""``LCNetService``: the BentoML service. Glue only: each worker holds one runner, and HTTP
(a mounted Starlette app) and gRPC (a server started in the worker) both feed it."""

from __future__ import annotations

import logging

import bentoml

from .artifact import ModelNotFoundError, bentoml_home, load_folder
from .choice import refuse_unusable
from .http_api import create_app
from .settings import ServingSettings

logger = logging.getLogger("bentoml.lcnet")  # BentoML shows its own loggers' INFO lines
SETTINGS = ServingSettings.from_env()
http_app = create_app(SETTINGS.cors_origins)


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


def _refuse_unusable_variant(tag: str) -> None:
    """Check a named engine/precision (accuracy guard, self-check on this CPU) before any worker
    starts: BentoML restarts a worker that fails to initialise forever, so the same error would
    otherwise scroll by and the server never become ready."""
    artifact = load_folder(bentoml.models.get(tag).path, tag=tag)
    refuse_unusable(artifact, SETTINGS.engine, SETTINGS.precision, SETTINGS.skip_guard)


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(
    name="lcnet",
    workers=SETTINGS.worker_count,
    traffic={"timeout": 60},
    metrics={"enabled": True},
)
class LCNetService:
    model = _model_reference(SETTINGS.model)
    _refuse_unusable_variant(SETTINGS.model)

    def __init__(self) -> None:
        from .metrics import PrometheusObserver
        from .runner import LCNetRunner

        artifact = load_folder(self.model.path, tag=str(self.model.tag))
        observer = PrometheusObserver(SETTINGS.max_batch_size)
        self.runner = LCNetRunner(artifact, SETTINGS.runner_config(), observer)
        logger.info(
            "serving %s on %s (engine=%s, precision=%s requested), %d thread(s)",
            artifact.name, self.runner.predictor.choice.describe(), SETTINGS.engine,
            SETTINGS.precision, SETTINGS.threads,
        )  # fmt: skip
        http_app.state.runner = self.runner
        http_app.state.settings = SETTINGS
        self.grpc_server = None

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if SETTINGS.grpc_port:
            from .grpc_api import start_grpc_server

            self.grpc_server = await start_grpc_server(self.runner, SETTINGS)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        await self.runner.close()
