"""The gRPC API (``lcnet.v1.Classifier``), served from inside each BentoML worker.

``bentoml serve-grpc`` refuses new-SDK services, so each worker starts a ``grpc.aio`` server on
its own event loop at start-up; workers share the port through SO_REUSEPORT, and gRPC requests
feed the same runner (and batches) as HTTP ones. The servicer only translates messages.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import handlers
from .protos import lcnet_pb2, lcnet_pb2_grpc
from .runner import LCNetRunner
from .settings import ServingSettings

logger = logging.getLogger(__name__)
SERVICE_NAME = lcnet_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name


def _response(predictions: list[dict]) -> lcnet_pb2.ClassifyResponse:
    return lcnet_pb2.ClassifyResponse(predictions=[lcnet_pb2.Prediction(**p) for p in predictions])


class ClassifierServicer(lcnet_pb2_grpc.ClassifierServicer):
    def __init__(self, runner: LCNetRunner, settings: ServingSettings):
        self.runner, self.settings = runner, settings

    async def _call(self, context: grpc.aio.ServicerContext, work):
        try:
            return await work
        except Exception as err:
            if handlers.client_error_status(err) is None:
                logger.exception("gRPC request failed")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def Classify(self, request, context):  # noqa: N802 (gRPC method name)
        predictions = await self._call(
            context, handlers.classify(self.runner, request.image, request.top_k)
        )
        return _response(predictions)

    async def ClassifyBatch(self, request, context):  # noqa: N802
        results = await self._call(
            context,
            handlers.classify_batch(
                self.runner, self.settings, list(request.images), request.top_k
            ),
        )
        return lcnet_pb2.ClassifyBatchResponse(results=[_response(r) for r in results])


async def start_grpc_server(runner: LCNetRunner, settings: ServingSettings) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),  # every worker binds the same port
            ("grpc.max_receive_message_length", settings.max_body_bytes),
        ]
    )
    lcnet_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(runner, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    server.add_insecure_port(address)
    await server.start()
    logger.info("gRPC %s listening on %s", SERVICE_NAME, address)
    return server
