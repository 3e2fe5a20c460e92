"""The gRPC API (``lcnet.v1.Classifier``), served from inside each BentoML worker.

``bentoml serve-grpc`` refuses new-SDK services, so each worker starts a ``grpc.aio`` server on
its own event loop at start-up; workers share the port through SO_REUSEPORT, and gRPC requests
feed the same runner (and batches) as HTTP ones. The servicer only translates messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import handlers, servers
from .metrics import GrpcCallMetrics
from .protos import lcnet_pb2, lcnet_pb2_grpc
from .settings import REQUEST_TIMEOUT_S, ServingSettings

if TYPE_CHECKING:
    from .reload import Reloader, ServedModel
    from .runner import LCNetRunner

logger = logging.getLogger("bentoml.lcnet.grpc")  # BentoML shows its own loggers
SERVICE_NAME = lcnet_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
ADMIN_SERVICE_NAME = lcnet_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
VERSION_KEY = handlers.VERSION_HEADER.lower()  # gRPC metadata keys are lowercase
# What a refusal is called in gRPC: these, or INVALID_ARGUMENT for the others (400, 408, 413,
# 422); a server fault is INTERNAL. A busy worker is UNAVAILABLE, which gRPC's retry policies
# retry. (A message past the size limit never reaches this code: gRPC itself answers
# RESOURCE_EXHAUSTED.)
_STATUS_CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _response(predictions: list[dict]) -> lcnet_pb2.ClassifyResponse:
    return lcnet_pb2.ClassifyResponse(predictions=[lcnet_pb2.Prediction(**p) for p in predictions])


async def _call(context: grpc.aio.ServicerContext, work, tag: str | None = None):
    """``work``'s result; or None once the call is refused, its code and details set, for the
    handler to return an empty message (the client sees the status alone). With ``tag``, the
    version that served the call goes first (``_send_version``). Sent once the work is done, not
    before it: sending it is a round trip through grpc.aio's poller thread, and a call waiting
    for it had not decoded its image yet when the engine freed, so batches formed smaller (at
    32 clients, sent first: 4 % fewer calls a second, docs/benchmarks.md).

    Not aborted: grpc.aio keeps an abort's exception on the call's state, and its traceback
    holds the frames that hold the request, a cycle only the garbage collector frees (a burst
    of 17 MB uploads, half refused: a worker stayed 1.1 GB larger, idle, until a collection).
    """
    try:
        result = await work
    except Exception as err:
        code, details = _refusal(err)
    else:
        code = None
    if tag is not None:
        await _send_version(context, tag)
    if code is None:
        return result
    context.set_code(code)
    context.set_details(details)
    return None


def _refusal(err: Exception) -> tuple[grpc.StatusCode, str]:
    status = handlers.refusal_status(err)
    if status is None:
        logger.error("gRPC request failed", exc_info=err)
        return grpc.StatusCode.INTERNAL, "internal error"
    return _STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT), str(err)


async def _send_version(context: grpc.aio.ServicerContext, tag: str) -> None:
    """The version serving the call, as initial metadata (``x-model-version``). A call whose
    deadline passed before this was sent has ended in gRPC's core (the client already has its
    DEADLINE_EXCEEDED): the send fails with ExecuteBatchError (a grpc.aio.InternalError, its
    public name), which grpc.aio logged at ERROR with a traceback, as a fault of the servicer. It
    ends as gRPC's own cancellation of such a call does, CancelledError (logged at DEBUG; counted
    DEADLINE_EXCEEDED by ``_measured``)."""
    try:
        await context.send_initial_metadata(((VERSION_KEY, tag),))
    except grpc.aio.InternalError:
        if _ended_code(context, otherwise="") != "DEADLINE_EXCEEDED":
            raise  # not the deadline: a fault worth its traceback
        raise asyncio.CancelledError("the call's deadline passed") from None


class ClassifierServicer(lcnet_pb2_grpc.ClassifierServicer):
    def __init__(self, served: ServedModel, settings: ServingSettings, reloader: Reloader | None):
        self.served, self.settings, self.reloader = served, settings, reloader

    # A refused call (``_call``: None, its status set) answers an empty message.
    async def Classify(self, request, context):  # noqa: N802 (gRPC method name)
        with self.served.pinned() as runner:
            predictions = await _call(context, self._classify(runner, request), runner.tag)
        return _response(predictions or [])

    async def ClassifyBatch(self, request, context):  # noqa: N802
        with self.served.pinned() as runner:
            results = await _call(context, self._classify_batch(runner, request), runner.tag)
        return lcnet_pb2.ClassifyBatchResponse(results=[_response(r) for r in results or []])

    # The call's bytes are held by the worker until it is answered (``runner.receiving``): gRPC
    # has received the message whole, but a refusal frees it at once.
    async def _classify(self, runner: LCNetRunner, request) -> list[dict]:
        image = request.image  # a copy at each read of the field
        with runner.receiving(len(image)):
            return await handlers.classify(runner, image, request.top_k or None)

    async def _classify_batch(self, runner: LCNetRunner, request) -> list[list[dict]]:
        images = list(request.images)
        with runner.receiving(sum(map(len, images))):
            top_k = request.top_k or None
            return await handlers.classify_batch(runner, self.settings, images, top_k)

    async def ModelInfo(self, request, context):  # noqa: N802
        runner = self.served.runner
        await _send_version(context, runner.tag)
        info = handlers.served_model_info(runner, self.settings, self.reloader)
        reload = {key: value or "" for key, value in info["reload"].items()}
        return lcnet_pb2.ModelInfoResponse(
            tag=info["tag"] or "", labels=info["labels"], engine=info["engine"],
            precision=info["precision"], reload=lcnet_pb2.ReloadStatus(**reload),
            details_json=json.dumps(info, ensure_ascii=False),
        )  # fmt: skip


class AdminServicer(lcnet_pb2_grpc.AdminServicer):
    """Registered only when LCNET_ADMIN_TOKEN is set (then it is in reflection too)."""

    def __init__(self, settings: ServingSettings, reloader: Reloader | None):
        self.settings, self.reloader = settings, reloader

    async def Reload(self, request, context):  # noqa: N802
        async def reload() -> dict[str, str]:
            # The first, as HTTP reads a repeated header (a dict would keep the last one).
            authorization = next(
                (v for k, v in context.invocation_metadata() if k == "authorization"), None
            )
            handlers.check_admin(self.settings, authorization)
            return handlers.request_reload(self.reloader, request.tag or None)

        return lcnet_pb2.ReloadResponse(**(await _call(context, reload()) or {}))


def _add_servicer(
    server: grpc.aio.Server, name: str, servicer: object, calls: GrpcCallMetrics
) -> None:
    """Register ``servicer`` as the generated ``add_*Servicer_to_server`` does, except that a
    request that is not a valid protobuf message is the client's mistake, INVALID_ARGUMENT: gRPC
    parses it before any servicer code runs and answers UNKNOWN with the parser's exception.
    Each call is counted in ``calls`` (BentoML's request metrics count HTTP alone)."""
    service = lcnet_pb2.DESCRIPTOR.services_by_name[name.rpartition(".")[2]]
    methods = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _measured(_refusing_malformed(getattr(servicer, method.name)), method.name, calls),
            request_deserializer=_parsed_or_none(getattr(lcnet_pb2, method.input_type.name)),
            response_serializer=getattr(lcnet_pb2, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))
    server.add_registered_method_handlers(name, methods)


def _parsed_or_none(message: type) -> Callable[[bytes], object | None]:
    def parse(data: bytes) -> object | None:
        try:
            return message.FromString(data)
        except DecodeError:
            return None

    return parse


def _refusing_malformed(method: Callable[[Any, Any], Awaitable[Any]]):
    async def call(request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed protobuf message")
        return await method(request, context)

    return call


def _measured(
    method: Callable[[Any, Any], Awaitable[Any]], name: str, calls: GrpcCallMetrics
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request, context):
        start = time.perf_counter()
        code = None
        try:
            return await method(request, context)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            code = _ended_code(context, otherwise="CANCELLED")
            raise
        except Exception:  # an abort (a malformed message) has set its code; else: gRPC's
            if context.code() is None:  # e.g. initial metadata sent past the deadline
                code = _ended_code(context, otherwise="UNKNOWN")
            raise
        finally:
            code = code or (context.code() or grpc.StatusCode.OK).name
            calls.record(name, code, time.perf_counter() - start)

    return call


def _ended_code(context: grpc.aio.ServicerContext, otherwise: str) -> str:
    """What the client saw of a call that ended under it: its deadline, when that has passed
    (to within the moment it took to arrive), or else ``otherwise``: CANCELLED when gRPC
    cancelled it (the client did), UNKNOWN for an exception (what gRPC answers)."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left < 0.05 else otherwise


class GrpcPortTakenError(RuntimeError):
    """Another server's workers serve the gRPC port this server was given."""


def claim_port(port: int, server: str) -> None:
    """Record that ``server`` (its arbiter: ``pid:start time``) serves gRPC on ``port``, or raise
    GrpcPortTakenError when another live server already does. Workers share the port through
    SO_REUSEPORT, which would just as silently let a second server's workers in: the kernel
    would then hand each new connection to either server, and so to either model."""
    try:
        with open(owner_file(port), "a+", encoding="utf-8") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX)
            owner.seek(0)
            holder = owner.read().strip()
            if holder and holder != server and servers.server_alive(holder):
                pid = holder.partition(":")[0]
                raise GrpcPortTakenError(
                    f"gRPC port {port} is served by another server (pid {pid}): choose another "
                    "with LCNET_GRPC_PORT, or turn gRPC off with LCNET_GRPC_PORT=0"
                )
            owner.seek(0)
            owner.truncate()
            owner.write(server)
    except OSError:  # another user's file, a read-only temp folder: unchecked, never fatal
        logger.warning("cannot check who serves gRPC port %s (%s)", port, owner_file(port))


def owner_file(port: int) -> Path:
    """Where the server serving gRPC on ``port`` is recorded (``claim_port``)."""
    return Path(tempfile.gettempdir()) / f"lcnet-grpc-{port}.owner"


def forget_stopped_owner(port: int) -> None:
    """Remove ``port``'s record when the server it names has stopped (a live one keeps it)."""
    with contextlib.suppress(OSError):
        if not servers.server_alive(owner_file(port).read_text(encoding="utf-8").strip()):
            owner_file(port).unlink()


@dataclass
class GrpcServer:
    """One worker's gRPC server and the health service that speaks for it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    stopping: asyncio.Task | None = None

    async def stop(self) -> None:
        """Calls in flight get as long to finish as BentoML gives an HTTP request (5 s cut a 12 s
        batch off). Health's Watch streams are told NOT_SERVING first; a probe calling Check
        finds the port closed, as an HTTP probe does."""
        await self.begin_stop()

    def begin_stop(self) -> asyncio.Task:
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(self._stop())
        return self.stopping

    async def _stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=REQUEST_TIMEOUT_S)

    def stop_with_http(self) -> None:
        """Begin ``stop`` on the signals that stop the worker's HTTP server (uvicorn's handlers,
        called after this one). BentoML runs shutdown hooks only once HTTP's last request has
        been answered: meanwhile gRPC took new calls and its health said SERVING, and its own
        grace began only then, twice what a pod's termination grace allows."""
        loop = asyncio.get_running_loop()
        servers.on_stop_signal(lambda: loop.call_soon_threadsafe(self.begin_stop))


async def start_grpc_server(
    served: ServedModel, settings: ServingSettings, reloader: Reloader | None = None
) -> GrpcServer:
    """The gRPC server of one worker; raises GrpcPortTakenError when another server's workers
    hold the port, or it cannot be bound (another program holds it)."""
    claim_port(settings.grpc_port, servers.this_server())
    options = [
        ("grpc.so_reuseport", 1),  # every worker binds the same port; the kernel picks one
        ("grpc.max_receive_message_length", settings.max_body_bytes),
    ]
    if settings.grpc_max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(1000 * settings.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", 1000 * REQUEST_TIMEOUT_S),
        ]
    server = grpc.aio.server(options=options)
    calls = GrpcCallMetrics()
    _add_servicer(server, SERVICE_NAME, ClassifierServicer(served, settings, reloader), calls)
    services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if settings.admin_token:
        _add_servicer(server, ADMIN_SERVICE_NAME, AdminServicer(settings, reloader), calls)
        services.append(ADMIN_SERVICE_NAME)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(services, server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:  # "Failed to bind": a program other than a server of ours holds it
        raise GrpcPortTakenError(
            f"gRPC cannot listen on {address}: the port is taken, or {settings.grpc_host} is no "
            "address of this machine: choose another with LCNET_GRPC_PORT or LCNET_GRPC_HOST, "
            "or turn gRPC off with LCNET_GRPC_PORT=0"
        ) from None
    await server.start()
    logger.info("gRPC %s listening on %s", SERVICE_NAME, address)
    return GrpcServer(server, health_servicer)
