"""The routes' contracts through the service's own ASGI app (`LCNetService.to_asgi()`), with a
small real model and runner but no server process: BentoML's routes, `/docs.json` and
middleware are covered too. Fast; the end-to-end tests keep what only a real server shows."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import importlib
import io
import json
import os
import tracemalloc
from collections.abc import Iterator

import bentoml
import numpy as np
import pytest
from conftest import CLASS_NAMES
from PIL import Image
from starlette.testclient import TestClient

from lcnet_runner import Predictor
from lcnet_runner.hardware import default_threads
from lcnet_runner.settings import ServingSettings

JSON_ERROR = {"error"}


def png(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), (40, 180, 60), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


SHOP = "https://shop.example"  # the one origin allowed to call from a browser


@pytest.fixture(scope="module")
def client(trained: dict):
    """The service class defined for the trained model (what BentoML reads at definition time
    comes from the environment), its ASGI app started with its lifespan: one worker's runner."""
    env = {"LCNET_MODEL": trained["tag"], "LCNET_GRPC_PORT": "0", "LCNET_MAX_BATCH_IMAGES": "4",
           "LCNET_MAX_BODY_BYTES": str(1 << 20), "LCNET_CORS_ORIGINS": SHOP}  # fmt: skip
    # LCNET_PINNED too: defining the service records the version it resolved there.
    saved = {k: os.environ.get(k) for k in [*env, "LCNET_PINNED"]}
    os.environ.update(env)
    try:
        import lcnet_runner.service as service

        service = importlib.reload(service)  # defined for this model and these settings
        with TestClient(service.LCNetService.to_asgi(), raise_server_exceptions=False) as client:
            yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_classify_answers_like_the_predictor(client: TestClient, trained: dict) -> None:
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    response = client.post("/classify", files={"image": ("a.jpg", image)}, data={"top_k": "3"})
    assert response.status_code == 200, response.text
    want = Predictor(trained["tag"], threads=1).predict(image, top_k=3)
    got = response.json()
    assert [p["category"] for p in got] == [p["category"] for p in want]
    assert sorted(p["category"] for p in got) == CLASS_NAMES
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)


def test_cors_allows_the_origins_listed_and_no_other(client: TestClient, trained: dict) -> None:
    """A browser's preflight and its upload from a listed origin carry the header that lets the
    page read the answer; another origin's do not (the browser then hides the answer)."""
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = client.options("/classify", headers={"Origin": SHOP, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == SHOP
    other = client.options("/classify", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    for path in ("/classify", "/predict", "/classify_batch", "/predict_batch"):
        field = "images" if path.endswith("batch") else "image"
        preflight_here = client.options(path, headers={"Origin": SHOP, **preflight})
        assert preflight_here.headers.get("access-control-allow-origin") == SHOP, path
        for origin, allows in ((SHOP, True), ("https://evil.example", False)):
            answer = client.post(path, files={field: ("a.jpg", image)}, headers={"Origin": origin})
            assert answer.status_code == 200, (path, answer.text)
            assert ("access-control-allow-origin" in answer.headers) is allows, path
    # a refusal too, or the page cannot read why; and the version header, readable by the page
    refused = client.post("/predict", content=b"x", headers={"Origin": SHOP})
    assert refused.status_code == 415 and refused.headers["access-control-allow-origin"] == SHOP
    assert "x-model-version" in refused.headers["access-control-expose-headers"].lower()
    for path, header in (("/classify", "content-type"), ("/admin/reload", "authorization")):
        asked = {"Origin": SHOP, **preflight, "Access-Control-Request-Headers": header}
        assert client.options(path, headers=asked).status_code == 200, path  # was 400


def test_classify_batch_keeps_order(client: TestClient, trained: dict) -> None:
    names = ["green/1.jpg", f"{CLASS_NAMES[0]}/1.jpg", "green/2.jpg"]
    files = [("images", (n, (trained["dataset"] / n).read_bytes())) for n in names]
    response = client.post("/classify_batch", files=files)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 3 and all(len(a) == 1 for a in answers)
    singles = [
        client.post("/classify", files={"image": f}).json() for _, f in files
    ]  # fmt: skip
    assert answers == singles


def test_classify_takes_the_image_as_the_body(client: TestClient, trained: dict) -> None:
    """``curl --data-binary @a.jpg -H 'Content-Type: image/jpeg' .../classify?top_k=3``: the
    same answer as the multipart upload."""
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    multipart = client.post("/classify", files={"image": ("a.jpg", image)}, data={"top_k": "3"})
    for content_type in ("image/jpeg", "application/octet-stream"):
        raw = client.post("/classify?top_k=3", **body(image, content_type))
        assert raw.status_code == 200, raw.text
        assert raw.json() == multipart.json()
        assert raw.headers["x-model-version"] == trained["tag"]
    default = client.post("/classify", **body(png(), PNG))
    assert default.status_code == 200 and len(default.json()) == 1  # top_k defaults to 1


MULTIPART, JPEG, PNG = "multipart/form-data", "image/jpeg", "image/png"


def body(data: bytes, content_type: str) -> dict:
    """A request whose whole body is ``data``."""
    return {"content": data, "headers": {"content-type": content_type}}


# Bad requests and their status: the fast routes, then the typed ones (BentoML's IO behind
# a guard) under the same contract, where an odd file name is no reason to refuse.
BAD_REQUESTS = [
    pytest.param(
        "/classify", {"files": {"image": ("a.jpg", b"not an image")}}, 400, id="undecodable"
    ),
    pytest.param("/classify", {"files": {"image": ("a.jpg", b"")}}, 400, id="empty"),
    pytest.param("/classify", {"data": {"image": "http://127.0.0.1/x.jpg"}}, 422, id="text-url"),
    pytest.param(
        "/classify",
        {"files": {"image": ("a.png", png())}, "data": {"top_k": "0"}},
        422,
        id="top_k-0",
    ),
    pytest.param(
        "/classify",
        {"files": {"image": ("a.png", png())}, "data": {"top_k": "many"}},
        422,
        id="top_k-text",
    ),
    pytest.param("/classify", {"files": {"picture": ("a.png", png())}}, 422, id="misnamed"),
    pytest.param("/classify", {"json": {"image": "abc"}}, 415, id="json"),
    pytest.param("/classify", body(b"abc", "text/plain"), 415, id="text"),
    pytest.param("/classify", body(b"not an image", JPEG), 400, id="body-undecodable"),
    pytest.param("/classify", body(b"", JPEG), 400, id="body-empty"),
    pytest.param("/classify?top_k=0", body(png(), PNG), 422, id="body-top_k-0"),
    pytest.param("/classify?top_k=many", body(png(), PNG), 422, id="body-top_k-text"),
    pytest.param("/classify", body(b"\0" * (2 << 20), PNG), 413, id="body-too-large"),
    pytest.param(
        "/classify", {"files": {"image": ("a.png", b"\0" * (2 << 20))}}, 413, id="too-large"
    ),
    pytest.param(
        "/classify_batch", {"files": [("images", ("a.png", png()))] * 5}, 413, id="too-many"
    ),
    pytest.param(
        "/classify_batch", {"files": {"other": ("a.png", png())}}, 422, id="batch-misnamed"
    ),
    pytest.param(
        "/predict", {"files": {"image": ("a.jpg", b"not an image")}}, 400, id="typed-undecodable"
    ),
    pytest.param(
        "/predict",
        {"data": {"image": "http://127.0.0.1:1/x.jpg"}, "files": {"x": b""}},
        422,
        id="typed-url-as-text",
    ),
    pytest.param(
        "/predict", {"json": {"image": "http://127.0.0.1:1/x.jpg"}}, 415, id="typed-json-url"
    ),
    pytest.param("/predict", body(b"garbage", MULTIPART), 400, id="typed-garbage"),
    pytest.param(
        "/predict",
        {"files": {"image": ("a.png", png())}, "data": {"top_k": "x"}},
        422,
        id="typed-top_k-text",
    ),
    pytest.param(
        "/predict",
        {"files": {"image": ("a.png", png())}, "data": {"top_k": "0"}},
        422,
        id="typed-top_k-0",
    ),
    pytest.param("/predict", {"files": {"picture": ("a.png", png())}}, 422, id="typed-misnamed"),
    pytest.param("/predict", {"files": [("image", ("a.png", png()))] * 2}, 422, id="typed-two"),
    pytest.param(
        "/predict",
        {"files": {"image": ("../" * 40 + "x" * 300, png())}},
        200,
        id="typed-hostile-name",
    ),
    pytest.param(
        "/predict_batch", {"files": [("images", ("a.png", png()))] * 5}, 413, id="typed-too-many"
    ),
    pytest.param(
        "/predict_batch",
        {"data": {"images": "/etc/passwd"}, "files": {"x": b""}},
        422,
        id="typed-path-as-text",
    ),
    # a form without its file, or no body at all: what BentoML's client sends for
    # predict_batch(images=[]), with top_k and without
    pytest.param("/predict_batch", {"data": {"images": "/etc/passwd"}}, 422, id="typed-urlencoded"),
    pytest.param("/predict_batch", {}, 422, id="typed-nothing"),
    pytest.param("/classify_batch", {}, 422, id="nothing"),
    # /classify's 415 says both ways to send one image: as the body, or as a file field
    pytest.param("/classify", {}, 415, id="nothing-for-one"),
    pytest.param("/classify", {"data": {"top_k": "3"}}, 422, id="urlencoded"),
    # BentoML's internal type from a client: refused, with our body (BentoML's is a JSON list)
    pytest.param("/predict", body(b"x", "application/vnd.bentoml+pickle"), 415, id="typed-pickle"),
    # BentoML reads a look-alike of its internal type as JSON, with no limit on the body
    pytest.param(
        "/predict", body(b"{}", "application/vnd.bentoml+pickle-x"), 415, id="typed-pickle-ish"
    ),
    pytest.param(
        "/classify",
        {"files": {"image": ("a.png", png()), "top_k": ("k", b"3")}},
        422,
        id="top_k-file",
    ),
]


@pytest.mark.parametrize("path", ["/classify", "/classify_batch", "/predict"])
def test_an_upload_cut_off_before_its_closing_boundary_is_said_so(
    client: TestClient, path: str
) -> None:
    """Starlette drops an unfinished part in silence: it was "missing file field 'image'"."""
    field = "images" if path == "/classify_batch" else "image"
    part = (f'--x\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + png()  # fmt: skip
    for cut_off in (part, part + b"\r\n--x"):
        response = client.post(path, **body(cut_off, f"{MULTIPART}; boundary=x"))
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": "malformed multipart body: it ends before its closing boundary"
        }
    whole = client.post(path, **body(part + b"\r\n--x--\r\n", f"{MULTIPART}; boundary=x"))
    assert whole.status_code == 200, whole.text


@pytest.mark.parametrize("path, kwargs, status", BAD_REQUESTS)
def test_bad_requests_get_a_json_4xx(client: TestClient, path, kwargs, status) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    if status != 200:
        assert set(response.json()) == JSON_ERROR and response.json()["error"]


@pytest.mark.parametrize("path", ["/classify_batch", "/predict_batch"])
def test_a_bad_image_in_a_batch_is_named(client: TestClient, path: str) -> None:
    """One bad image fails the whole batch: which one, or a caller of 64 must bisect."""
    files = [("images", ("a.png", png())), ("images", ("b.jpg", b"\xff\xd8 truncated"))]
    response = client.post(path, files=files)
    assert response.status_code == 400
    assert response.json()["error"].startswith("image 2 of 2: ")


@pytest.mark.parametrize("path", ["/classify_batch", "/predict_batch"])
def test_too_many_images_are_said_as_over_grpc(client: TestClient, path: str) -> None:
    """The multipart parser's own words were "malformed multipart body: Too many files"."""
    response = client.post(path, files=[("images", ("a.png", png()))] * 5)
    assert (response.status_code, response.json()) == (
        413, {"error": "at most 4 images per request"}
    )  # fmt: skip


def test_model_route_describes_the_served_model(client: TestClient, trained: dict) -> None:
    from lcnet_runner.http_api import ModelInfoOut

    info = client.get("/model").json()
    ModelInfoOut.model_validate(info, strict=False)  # what /docs.json says it answers
    documented = client.get("/docs.json").json()["paths"]["/model"]["get"]["responses"]["200"]
    assert documented["content"]["application/json"]["schema"]
    assert info["tag"] == trained["tag"] and info["labels"] == CLASS_NAMES
    assert info["limits"]["max_batch_images"] == 4  # the instance's settings
    assert info["limits"]["max_queued_images"] == 512
    assert info["engine_choice"]["variant"] == f"{info['engine']}/{info['precision']}"
    # a lone image runs on every core unless the engine holds the GIL (paddle)
    cores = default_threads()
    solo = cores if info["engine"] != "paddle" and cores > info["threads"] else None
    assert info["solo_threads"] == solo
    assert info["worker"]["pid"] == os.getpid()  # in process here; which worker, when served
    assert info["worker"]["held_images"] == 0  # none admitted and not yet answered
    assert info["worker"]["held_bytes"] == 0 and info["limits"]["max_held_bytes"] == 256 * 2**20


def test_bentoml_routes_and_the_ui_are_served(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs.json").json()["openapi"].startswith("3.")
    assert "<title>" in client.get("/ui").text
    assert client.get("/classify").status_code == 405


def test_openapi_documents_every_route(client: TestClient) -> None:
    """Swagger at / reads /docs.json: the fast routes are there with their bodies and answers."""
    spec = client.get("/docs.json").json()
    paths = spec["paths"]
    for path, field in (("/classify", "image"), ("/classify_batch", "images")):
        post = paths[path]["post"]
        body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["required"] == [field] and set(body["properties"]) == {field, "top_k"}
        assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
    classify = paths["/classify"]["post"]  # one image may also be the whole body
    assert {"image/*", "application/octet-stream"} <= set(classify["requestBody"]["content"])
    assert [(p["name"], p["in"]) for p in classify["parameters"]] == [("top_k", "query")]
    assert "get" in paths["/model"]
    for path in ("/predict", "/predict_batch", "/image-classification"):  # typed, PaddleX
        assert "post" in paths[path], path
    for path in ("/predict", "/predict_batch"):  # BentoML's schema: the bound on top_k
        post = paths[path]["post"]
        body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["properties"]["top_k"]["minimum"] == 1
        assert "415 not multipart" in post["description"]
        # the errors they answer, as the fast routes' (BentoML lists 400, 404, 500 for any)
        assert set(post["responses"]) == {"200", "400", "408", "413", "415", "422", "500", "503"}
        error = post["responses"]["413"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorOut"}
        assert "PredictionOut" in json.dumps(post["responses"]["200"])
        refused = client.get(path)
        assert (refused.status_code, refused.json()) == (405, {"error": "Method Not Allowed"})
    assert not any(path.startswith("/ui") for path in paths)
    schemas = spec["components"]["schemas"]
    assert set(schemas["PredictionOut"]["properties"]) == {"category_id", "category", "score"}
    assert set(schemas["ErrorOut"]["properties"]) == {"error"}


def test_typed_routes_answer_like_the_fast_ones(client: TestClient, trained: dict) -> None:
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    fast = client.post("/classify", files={"image": ("a.jpg", image)}, data={"top_k": "2"})
    typed = client.post("/predict", files={"image": ("a.jpg", image)}, data={"top_k": "2"})
    assert typed.status_code == 200, typed.text
    assert typed.json() == fast.json()
    files = [("images", ("a.jpg", image)), ("images", ("b.png", png()))]
    batch = client.post("/predict_batch", files=files)
    assert batch.status_code == 200 and len(batch.json()) == 2
    assert batch.json()[0] == client.post("/classify", files={"image": image}).json()


def test_a_file_holding_a_boundary_stays_one_file(client: TestClient) -> None:
    """The typed routes' guard re-encodes the upload for BentoML: a file that holds the
    boundary it used (a fixed one, once) would have added a part of its own, a URL to fetch."""
    smuggled = png() + (
        b'\r\n--lcnet-typed-api\r\nContent-Disposition: form-data; name="image"\r\n\r\n'
        b"http://127.0.0.1:1/x.jpg\r\n--lcnet-typed-api--\r\n"
    )  # after the PNG's end: still the same image to a decoder
    typed = client.post("/predict", files={"image": ("a.png", smuggled)})
    assert typed.status_code == 200, typed.text
    assert typed.json() == client.post("/classify", files={"image": ("a.png", png())}).json()


def test_top_k_may_be_in_the_query_string_of_a_multipart_request(client: TestClient) -> None:
    for path in ("/classify?top_k=2", "/predict?top_k=2"):
        response = client.post(path, files={"image": ("a.png", png())})
        assert response.status_code == 200 and len(response.json()) == 2, (path, response.text)
    # in both (Swagger's "Try it out" sends both): the form's
    both = client.post("/classify?top_k=1", files={"image": ("a.png", png())}, data={"top_k": "2"})
    assert len(both.json()) == 2


def test_a_content_length_that_is_no_number_is_not_a_server_fault() -> None:
    from starlette.requests import Request

    from lcnet_runner.handlers import RequestError
    from lcnet_runner.http_api import _refuse_declared_excess

    for declared, refused in (("²", False), ("9" * 5000, True), ("10", False), ("2000", True)):
        request = Request({"type": "http", "headers": [(b"content-length", declared.encode())]})
        if refused:
            with pytest.raises(RequestError, match="larger than the limit"):
                _refuse_declared_excess(request, 1000)
        else:
            _refuse_declared_excess(request, 1000)  # the body's own length decides


def test_paddlex_serving_clients_switch_by_host_only(client: TestClient, trained: dict) -> None:
    """Requests built and answers read with the installed PaddleX's own serving schemas."""
    import base64

    from paddlex.inference.serving.infra.models import (
        AIStudioNoResultResponse,
        AIStudioResultResponse,
    )
    from paddlex.inference.serving.schemas.image_classification import (
        INFER_ENDPOINT,
        InferRequest,
        InferResult,
    )

    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    request = InferRequest(image=base64.b64encode(image).decode(), topk=2)
    response = client.post(INFER_ENDPOINT, json=request.model_dump(exclude_none=True))
    assert response.status_code == 200, response.text
    answer = AIStudioResultResponse[InferResult].model_validate(response.json())
    fast = client.post("/classify", files={"image": image}, data={"top_k": "2"}).json()
    assert [(c.id, c.name) for c in answer.result.categories] == [
        (p["category_id"], p["category"]) for p in fast
    ]
    assert [c.score for c in answer.result.categories] == pytest.approx([p["score"] for p in fast])
    default = client.post(INFER_ENDPOINT, json={"image": request.image}).json()
    assert len(default["result"]["categories"]) == len(CLASS_NAMES)  # min(5, classes)
    wrapped = base64.encodebytes(image).decode()  # 76-character lines, as PaddleX accepts
    in_lines = client.post(INFER_ENDPOINT, json={"image": wrapped, "topk": 2}).json()
    assert in_lines["result"] == response.json()["result"]

    for body, status in (
        ({"image": "http://127.0.0.1:1/cat.jpg"}, 422),  # never fetched
        ({"image": "not base64!"}, 422),
        ({"image": base64.b64encode(b"not an image").decode()}, 400),
        ({"image": request.image, "topk": 0}, 422),
        ({"topk": 1}, 422),
    ):
        error = client.post(INFER_ENDPOINT, json=body)
        assert error.status_code == status, (body, error.text)
        parsed = AIStudioNoResultResponse.model_validate(error.json())
        assert parsed.errorCode == status and parsed.errorMsg and parsed.logId
        assert error.json()["error"] == parsed.errorMsg  # our routes' key too
    assert client.post(INFER_ENDPOINT, content=b"{").status_code == 422
    missing = client.post(INFER_ENDPOINT, json={"topk": 1}).json()["errorMsg"]
    assert missing == "invalid request: image: Field required"  # the field named


def test_every_answer_names_the_model_version_that_produced_it(
    client: TestClient, trained: dict
) -> None:
    image = ("a.jpg", (trained["dataset"] / "green" / "1.jpg").read_bytes())
    answers = [
        client.post("/classify", files={"image": image}),
        client.post("/classify_batch", files=[("images", image)]),
        client.post("/predict", files={"image": image}),
        client.post("/predict_batch", files=[("images", image)]),
        client.post("/image-classification", json={"image": base64.b64encode(image[1]).decode()}),
        client.get("/model"),
        client.post("/classify", files={"image": ("a.jpg", b"not an image")}),  # a 400
        client.post("/predict", files={"image": ("a.jpg", b"not an image")}),
        client.post("/predict", content=b"x"),  # refused before BentoML's IO: 415
        client.post("/predict_batch", files=[("images", image)], data={"top_k": "0"}),  # 422
    ]
    assert [a.status_code for a in answers] == [200] * 6 + [400] * 2 + [415, 422]
    assert {a.headers["x-model-version"] for a in answers} == {trained["tag"]}


def test_admin_routes_do_not_exist_without_a_token(client: TestClient) -> None:
    response = client.post("/admin/reload", json={})
    assert response.status_code == 404 and response.json() == {"error": "not found"}
    assert "/admin/reload" not in client.get("/docs.json").json()["paths"]
    assert client.get("/model").json()["reload"] == {"mode": "off"}


def test_fast_routes_skip_fastapi_and_answer_as_through_it(
    client: TestClient, trained: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POSTs to the fast routes go straight to their methods (FastAPI never binds ``self``),
    and answer as FastAPI's path does, errors included."""
    import bentoml

    from lcnet_runner.middleware import FAST_ROUTES
    from lcnet_runner.service import http_app

    bound = []

    async def counting_binder():
        bound.append(1)
        return bentoml.get_current_service()

    monkeypatch.setitem(http_app.dependency_overrides, bentoml.get_current_service, counting_binder)
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    base64_image = base64.b64encode(image).decode()
    requests = [
        ("/classify", {"files": {"image": ("a.jpg", image)}, "data": {"top_k": "2"}}),
        ("/classify", {"files": {"image": ("a.jpg", b"not an image")}}),
        ("/classify_batch", {"files": [("images", ("a.jpg", image))] * 2}),
        ("/image-classification", {"json": {"image": base64_image, "topk": 2}}),
    ]
    for path, kwargs in requests:
        direct = client.post(path, **kwargs)
        assert not bound, f"{path} went through FastAPI's routing"
        with monkeypatch.context() as routes:
            routes.delitem(FAST_ROUTES, path)  # DirectRoutes reads this dict at each request
            via_fastapi = client.post(path, **kwargs)
        assert bound, f"{path} did not go through FastAPI once it was no fast route"
        bound.clear()
        assert direct.status_code == via_fastapi.status_code
        assert direct.headers["content-type"] == via_fastapi.headers["content-type"]
        answer, expected = direct.json(), via_fastapi.json()
        if path == "/image-classification":
            assert answer.pop("logId") != expected.pop("logId")
        assert answer == expected


def _post_raw(
    client: TestClient, path: str, content_type: str, length: int, body: list[bytes]
) -> tuple[list[dict], int]:
    """POST ``path`` straight to the ASGI app, declaring ``length`` bytes but sending only the
    chunks of ``body``, then hanging up (unless they make ``length``: then waiting for the
    answer): the messages sent back, and how often it was read."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 3000),
        "headers": [(b"content-type", content_type.encode()),
                    (b"content-length", str(length).encode())],
    }  # fmt: skip
    arriving = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in body]
    whole = sum(map(len, body)) == length
    if whole:
        arriving[-1]["more_body"] = False
    sent, reads = [], 0

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        if not arriving and whole:
            await asyncio.Event().wait()  # a client waiting for its answer
        return arriving.pop(0) if arriving else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    client.portal.call(client.app, scope, receive, send)
    return sent, reads


@pytest.mark.parametrize("content_type", [JPEG, f"{MULTIPART}; boundary=x"])
def test_a_client_that_hangs_up_mid_body_is_no_server_fault(
    client: TestClient, content_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette's ClientDisconnect reached the catch-all: "request failed" with a traceback
    and a 500 in the log and metrics, a server fault that was none. Now a 499, as nginx logs it."""
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n\xff\xd8'
    sent, _ = _post_raw(client, "/classify", content_type, 5000, body=[part])
    assert sent[0]["status"] == 499
    assert "request failed" not in caplog.text


def test_the_access_log_escapes_control_characters(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """BentoML logs a request's decoded path as it is: %0a in a URL wrote a log line of the
    sender's choosing (and %1b, terminal escapes)."""
    with caplog.at_level("INFO", logger="bentoml.access"):
        client.get("/x%0a2026-12-02 [ERROR] [entoml.lcnet] forged%1b[2K")
    [line] = [r.getMessage() for r in caplog.records if r.name == "bentoml.access"]
    assert "\n" not in line and "\x1b" not in line
    assert "/x\\n2026-12-02 [ERROR] [entoml.lcnet] forged\\x1b[2K" in line


@contextlib.contextmanager
def held_for_the_collector() -> Iterator[list[int]]:
    """How many bytes of what runs inside the ``with`` only a garbage-collector pass frees (a
    reference cycle holds them), in Python's allocations of every thread; set at its end."""
    held = [0]
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        yield held
        before = tracemalloc.get_traced_memory()[0]
        gc.collect()
        held[0] = before - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        gc.enable()


def test_a_refused_body_is_freed_at_once(client: TestClient) -> None:
    """A failed request's task held its exception, whose traceback held the task: every refused
    upload stayed in memory until a garbage-collector pass (503s to 14 MB uploads: +600 MiB)."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(600_000)  # a PNG's signature, no image: a 400
    with held_for_the_collector() as held:  # sent raw: TestClient's httpx has cycles of its own
        sent, _ = _post_raw(client, "/classify", PNG, len(body), body=[body])
    assert sent[0]["status"] == 400
    assert held[0] < len(body) / 2, held


@pytest.mark.parametrize(
    "headers, held",
    [({"content-length": "1000"}, 1000),  # what it says it sends
     ({"transfer-encoding": "chunked"}, 20 * 2**20),  # no size said: as much as it may send
     ({"content-length": "9" * 40}, 20 * 2**20)],  # over the limit (refused 413 once read)
)  # fmt: skip
def test_a_request_is_held_at_its_declared_size_from_before_its_body_is_read(
    headers: dict, held: int
) -> None:
    """A worker counts a request's bytes before reading its body: 100 uploads of 17 MB read at
    once took one worker to 2 GB, each under the image bound."""
    from starlette.requests import Request

    from lcnet_runner.http_api import receiving

    class Runner:  # the seam: what the route asks the runner to hold
        def receiving(self, size: int) -> contextlib.AbstractContextManager:
            self.size = size
            return contextlib.nullcontext()

    runner = Runner()
    scope = {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    with receiving(Request(scope), runner, ServingSettings.from_env({})):
        assert runner.size == held


@pytest.fixture(params=["images", "bytes"])
def busy(client: TestClient, monkeypatch: pytest.MonkeyPatch, request) -> None:
    """The worker as it is while it holds LCNET_MAX_QUEUED_IMAGES images, or the request bytes
    of LCNET_MAX_HELD_BYTES."""
    held = bentoml.get_current_service().held
    if request.param == "images":
        monkeypatch.setattr(held, "count", held.limit)
    else:
        monkeypatch.setattr(held, "bytes", held.byte_limit)


@pytest.mark.usefixtures("busy")
def test_a_busy_worker_answers_503_with_retry_after_on_every_route(
    client: TestClient, trained: dict
) -> None:
    """Before, its queue only grew, and clients waited up to BentoML's timeout (a 504)."""
    image = ("a.jpg", (trained["dataset"] / "green" / "1.jpg").read_bytes())
    answers = {
        path: client.post(path, files={field: image})
        for path, field in [("/classify", "image"), ("/predict", "image"),
                            ("/classify_batch", "images"), ("/predict_batch", "images")]
    }  # fmt: skip
    base64_image = base64.b64encode(image[1]).decode()
    answers["/image-classification"] = client.post("/image-classification",
                                                   json={"image": base64_image})  # fmt: skip
    for path, answer in answers.items():
        assert answer.status_code == 503, path
        assert answer.headers["retry-after"] == "1", path
        assert answer.json()["error"].startswith("the server is busy: "), path
    assert answers["/image-classification"].json()["errorCode"] == 503
    documented = client.get("/docs.json").json()["paths"]
    assert all("503" in documented[path]["post"]["responses"] for path in answers)


@pytest.mark.usefixtures("busy")
@pytest.mark.parametrize(
    "path, content_type",
    [("/classify", PNG), ("/predict", f"{MULTIPART}; boundary=x"),
     ("/classify_batch", f"{MULTIPART}; boundary=x")],
)  # fmt: skip
def test_a_busy_worker_refuses_before_the_body_arrives(
    client: TestClient, path: str, content_type: str
) -> None:
    """A worker that is behind took in every upload, whole, only to refuse it."""
    sent, read = _post_raw(client, path, content_type, 500_000, body=[])  # had it read: a 499
    assert (sent[0]["status"], read) == (503, 0)


@pytest.mark.usefixtures("busy")
def test_a_busy_worker_is_unavailable_over_grpc(client: TestClient) -> None:
    """UNAVAILABLE: what gRPC's retry policies retry."""
    from lcnet_runner.client import Client, ClientError
    from lcnet_runner.grpc_api import start_grpc_server
    from lcnet_runner.testing import free_port

    service = bentoml.get_current_service()
    port = free_port()
    settings = dataclasses.replace(service.settings, grpc_port=port, grpc_host="127.0.0.1")
    server = client.portal.call(start_grpc_server, service.served, settings)
    try:
        with Client(f"grpc://127.0.0.1:{port}") as grpc_client, pytest.raises(ClientError) as err:
            grpc_client.classify(png())
        assert err.value.status == "UNAVAILABLE"
        assert err.value.message.startswith("the server is busy: ")
    finally:
        client.portal.call(server.stop)
