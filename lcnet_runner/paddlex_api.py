"""PaddleX 3 basic serving's image-classification protocol on our runner, so its clients switch
by host only: POST /image-classification {"image": "<base64>", "topk": N} → {"logId",
"errorCode": 0, "errorMsg": "Success", "result": {"categories": [{"id", "name", "score"}]}};
errors are {"logId", "errorCode", "errorMsg"} with errorCode = the HTTP status, as PaddleX does,
plus our routes' "error" (the same message), which PaddleX's clients ignore."""

from __future__ import annotations

import base64
import binascii
import uuid

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import handlers
from .handlers import RequestError
from .http_api import (
    failure,
    invalid_request,
    read_body,
    receiving,
    refusal,
    unless_client_left,
)
from .runner import LCNetRunner
from .settings import ServingSettings


class PaddleXRequest(BaseModel):
    image: str  # base64; PaddleX also fetches URLs, which a server here never does
    topk: int | None = None
    visualize: bool | None = None  # accepted, not drawn: "image" in the result stays null


async def paddlex_classify(request: Request, runner: LCNetRunner, settings: ServingSettings):
    log_id = uuid.uuid4().hex
    try:
        with receiving(request, runner, settings):
            predictions = await _classify(request, runner, settings)
    except Exception as err:
        status, message = failure(err)
        error = {"logId": log_id, "errorCode": status, "errorMsg": message, "error": message}
        return refusal(error, status, runner.tag)
    categories = [{"id": p["category_id"], "name": p["category"], "score": p["score"]}
                  for p in predictions]  # fmt: skip
    result = {"categories": categories, "image": None}
    answer = {"logId": log_id, "errorCode": 0, "errorMsg": "Success", "result": result}
    return JSONResponse(answer, headers={handlers.VERSION_HEADER: runner.tag})


async def _classify(request: Request, runner: LCNetRunner, settings: ServingSettings) -> list:
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        asked = PaddleXRequest.model_validate_json(body)
    except ValidationError as err:
        raise invalid_request(err) from None
    if asked.topk is not None and asked.topk < 1:
        raise RequestError(422, "topk must be > 0")
    image = _base64_image(asked.image)
    top_k = asked.topk or min(5, len(runner.labels))  # PaddleX's Topk default
    return await unless_client_left(request, runner.aclassify(image, top_k))


def _base64_image(text: str) -> bytes:
    if text.strip().lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise RequestError(422, "image URLs are not fetched; send the image as base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # wrapped in lines (base64.encodebytes, `openssl base64`), which PaddleX accepts
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image is not valid base64") from None


class PaddleXCategory(BaseModel):
    id: int
    name: str
    score: float


class PaddleXResult(BaseModel):
    categories: list[PaddleXCategory]
    image: str | None = None


class PaddleXResponse(BaseModel):
    logId: str
    errorCode: int
    errorMsg: str
    result: PaddleXResult | None = None
    error: str | None = None  # on a refusal: errorMsg again, under our routes' key


PADDLEX_DOC = {
    "summary": "PaddleX 3 serving compatible: base64 image in JSON (URLs are refused)",
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PaddleXRequest.model_json_schema()}},
        }
    },  # fmt: skip
    "responses": {
        200: {"model": PaddleXResponse},
        **{status: {"model": PaddleXResponse} for status in (400, 408, 413, 422, 500, 503)},
    },  # fmt: skip
}
