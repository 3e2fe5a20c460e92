"""New versions reach a running server without a restart (LCNET_RELOAD), under steady load.

One server watches the store (and takes reload requests); each new version renames the classes,
so every answer shows which version produced it. Another, with reloading off, serves the same
name and must never swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bentoml
import grpc
import httpx
import psutil
import pytest
from conftest import (
    CLASS_NAMES,
    child_running,
    model_info_from,
    replacement,
    seconds_until_ended,
    workers,
)
from prometheus_client.parser import text_string_to_metric_families

from lcnet_runner.artifact import (
    CHECKSUM_FILE,
    PARAMS_FILE,
    InvalidModelError,
    load_folder,
    verify_checksums,
    write_checksums,
    write_labels_file,
)
from lcnet_runner.protos import lcnet_pb2, lcnet_pb2_grpc
from lcnet_runner.reload import REQUEST_POLL_S, forget_stopped_servers, request_file
from lcnet_runner.servers import server_id
from lcnet_runner.settings import ServingSettings
from lcnet_runner.testing import Server
from train.export import revise, save_to_store

NAME = "reloaded"
TOKEN = "s3cret-token"
CLIENTS = 16  # per protocol


def save_version(base: str, labels: list[str]) -> str:
    """A new version of ``base``'s name with its classes renamed, made the way `python -m train
    export/quantize` make theirs (a copy of the stored folder, changed, stored again)."""
    return revise(base, lambda folder: write_labels_file(folder / "labels.txt", labels))


def save_corrupt_version(trained: dict) -> str:
    """A version whose weights were truncated after they were checksummed (a disk fault, a
    partial copy): it appears in the store already broken."""
    import bentoml

    with bentoml.models.create(NAME) as stored:
        shutil.copytree(trained["export_dir"], stored.path, dirs_exist_ok=True)
        write_checksums(Path(stored.path))
        params = Path(stored.path) / PARAMS_FILE
        params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    return str(stored.tag)


class SteadyLoad:
    """16 HTTP + 16 gRPC closed-loop clients in a thread of their own, until stopped; every
    answer is kept as (time, protocol, ok, version, category, seconds)."""

    def __init__(self, server: Server, image: bytes):
        self.server, self.image = server, image
        self.answers: list[tuple[float, str, bool, str, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    async def _run(self) -> None:
        clients = [self._http() for _ in range(CLIENTS)] + [self._grpc() for _ in range(CLIENTS)]
        await asyncio.gather(*clients)

    def _record(self, protocol: str, ok: bool, version: str, category: str, start: float):
        self.answers.append((start, protocol, ok, version, category, time.monotonic() - start))

    async def _http(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=30) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = await client.post("/classify", files={"image": self.image})
                    ok, answer = response.status_code == 200, response.json()
                    category = answer[0]["category"] if ok else str(answer)
                    self._record("http", ok, response.headers["x-model-version"], category, start)
                except (httpx.HTTPError, KeyError, ValueError) as err:
                    self._record("http", False, "", repr(err), start)

    async def _grpc(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # spread over both workers
        address = f"127.0.0.1:{self.server.grpc_port}"
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = lcnet_pb2_grpc.ClassifierStub(channel)
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    call = stub.Classify(lcnet_pb2.ClassifyRequest(image=self.image), timeout=30)
                    version = dict(await call.initial_metadata())["x-model-version"]
                    category = (await call).predictions[0].category
                    self._record("grpc", True, version, category, start)
                except (grpc.aio.AioRpcError, KeyError) as err:
                    self._record("grpc", False, "", repr(err), start)

    def wait_for(self, tag: str, timeout: float = 120) -> None:
        """Until the last 64 answers (both protocols, so both workers) all came from ``tag``."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            recent = self.answers[-64:]
            if len(recent) == 64 and all(answer[3] == tag for answer in recent):
                return
            time.sleep(0.2)
        raise AssertionError(f"answers did not switch to {tag}: {self.answers[-5:]}")


class FakeRunner:
    """A runner as ServedModel and Reloader see it: its tag, labels, the folder it was loaded
    from (one that exists: still in the store), and close()."""

    def __init__(self, tag: str):
        self.tag, self.labels = tag, CLASS_NAMES
        self.predictor = SimpleNamespace(artifact=SimpleNamespace(path=Path.cwd()))
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def model_info(server: Server) -> dict:
    return httpx.get(f"{server.url}/model").json()


def served_workers(server: Server, model: str) -> dict[str, float]:
    """``/metrics``' count of the workers serving each version of ``model``, each on the
    variant ``/model`` names."""
    info = model_info(server)
    variant = f"{info['engine']}/{info['precision']}"
    text = httpx.get(f"{server.url}/metrics").text
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples if family.name == "lcnet_model_served_workers" else []:
            if sample.labels["model"] == model:
                assert sample.labels["variant"] == variant, sample
                counts[f"{model}:{sample.labels['version']}"] = sample.value
    return counts


def until_served_workers(server: Server, model: str, expected: dict, timeout: float = 60) -> None:
    """Until ``/metrics`` counts ``expected`` workers per version: a replaced worker's count
    arrives as it starts."""
    until = time.monotonic() + timeout
    while (counts := served_workers(server, model)) != expected and time.monotonic() < until:
        time.sleep(0.5)
    assert counts == expected


def settled_reload_state(server: Server, state: str, timeout: float = 60) -> dict:
    """``/model``'s reload status once every answer has said ``state`` for 2 s. One answer
    speaks for the worker that sent it, and each worker polls the store on its own clock (every
    LCNET_RELOAD_INTERVAL_S, 0.5 s here): the first "failed" can come while the other worker has
    not looked yet."""
    until, since, reload = time.monotonic() + timeout, None, {}
    while time.monotonic() < until:
        reload = model_info(server)["reload"]
        if reload["state"] != state:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= 2:
            return reload
        time.sleep(0.1)
    raise AssertionError(f"/model did not settle on reload state {state!r}: {reload}")


def admin_reload(server: Server, token: str | None, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}/admin/reload", json=body, headers=headers)


def grpc_services(server: Server) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
    return {service.name for service in response.list_services_response.service}


@pytest.fixture(scope="module")
def servers(trained: dict):
    first = save_to_store(trained["export_dir"], NAME, load_folder(trained["export_dir"]).info)
    reload = {"LCNET_RELOAD": "watch", "LCNET_RELOAD_INTERVAL_S": "0.5", "LCNET_ADMIN_TOKEN": TOKEN}
    watching = Server(".", {"LCNET_MODEL": NAME, "LCNET_WORKERS": "2", **reload})
    # Reloading off, but with a token: the admin routes exist and say how to turn it on.
    still = Server(".", {"LCNET_MODEL": NAME, "LCNET_WORKERS": "1", "LCNET_ENGINE": "paddle",
                         "LCNET_ADMIN_TOKEN": TOKEN})  # fmt: skip
    try:
        yield first, watching.wait_ready(), still.wait_ready()
    finally:
        watching.stop()
        still.stop()


def test_new_versions_swap_in_under_load_without_a_failed_request(
    servers, trained: dict, capsys: pytest.CaptureFixture
) -> None:
    first, server, still = servers
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    labels = {first: CLASS_NAMES}
    with SteadyLoad(server, image) as load:
        load.wait_for(first)
        swaps_began = time.monotonic()
        for n in (2, 3, 4):  # the watcher finds each new version in the store
            names = [f"v{n} {name}" for name in CLASS_NAMES]
            tag = save_version(first, names)
            labels[tag] = names
            load.wait_for(tag)
        swaps_ended = time.monotonic()
        # A corrupt version (its weights truncated in the store) never replaces the good one.
        bad = save_corrupt_version(trained)
        failed = settled_reload_state(server, "failed")
        assert failed["tag"] == bad, failed
        assert failed["error"].startswith("InvalidModelError: ") and PARAMS_FILE in failed["error"]
        assert "truncated" in failed["error"]
        time.sleep(1)
        # On request, back to an older version (the watcher does not undo it: nothing newer).
        assert admin_reload(server, TOKEN, {"tag": first}).status_code == 202
        load.wait_for(first)
    answers = load.answers
    failures = [answer for answer in answers if not answer[2]]
    assert failures == [], failures[:5]
    # Each answer's class name comes from the version its header names: pinned per request.
    assert all(category in labels[version] for _, _, _, version, category, _ in answers)
    during = [answer[5] for answer in answers if swaps_began <= answer[0] <= swaps_ended]
    with capsys.disabled():
        print(f"\nreload under load: {len(answers)} answers, 0 failed; during 3 swaps p50 "
              f"{1000 * statistics.median(during):.1f} ms, p99 "
              f"{1000 * statistics.quantiles(during, n=100)[98]:.1f} ms")  # fmt: skip
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'lcnet_model_reloads_total{{model="{NAME}",result="failed"}}' in metrics
    # reloading off: the other server still serves what it started with
    assert model_info(still)["tag"] == first
    response = httpx.post(f"{still.url}/classify", files={"image": image})
    assert response.headers["x-model-version"] == first


def test_admin_routes_need_the_token(servers, trained: dict) -> None:
    first, server, still = servers
    assert admin_reload(server, None).status_code == 401
    refused = admin_reload(server, "not-the-token")
    assert refused.status_code == 403 and refused.json() == {"error": "wrong admin token"}
    assert refused.headers["x-model-version"].startswith(f"{NAME}:")  # what serves, as elsewhere
    another = admin_reload(server, TOKEN, {"tag": trained["tag"]})  # stored, another name
    assert another.status_code == 422 and f"serves {NAME!r}" in another.json()["error"]
    unknown = admin_reload(server, TOKEN, {"tag": f"{NAME}:nosuchversion"})
    assert unknown.status_code == 404 and "not in the BentoML store" in unknown.json()["error"]
    assert admin_reload(server, TOKEN, {"tag": 5}).status_code == 422
    for malformed in (f"{NAME}:", "x:y:z", ":abc"):  # not tags at all: the client's mistake
        refused = admin_reload(server, TOKEN, {"tag": malformed})
        assert refused.status_code == 422 and "not a store tag" in refused.json()["error"]
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    for body, status in ((b"{", 422), (b"x" * 5000, 413)):  # malformed, over the 4 kB limit
        response = httpx.post(f"{server.url}/admin/reload", content=body, headers=authorized)
        assert response.status_code == status and set(response.json()) == {"error"}
    document = httpx.get(f"{server.url}/docs.json").json()
    assert document["paths"]["/admin/reload"]["post"]["security"] == [{"adminToken": []}]
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    assert "lcnet.v1.Admin" in grpc_services(server)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = lcnet_pb2_grpc.AdminStub(channel)
        wrong = (("authorization", "Bearer nope"),)
        wrong_first = (*wrong, ("authorization", f"Bearer {TOKEN}"))  # the first counts, as in HTTP
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                               (wrong, grpc.StatusCode.PERMISSION_DENIED),
                               (wrong_first, grpc.StatusCode.PERMISSION_DENIED)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                stub.Reload(lcnet_pb2.ReloadRequest(), metadata=metadata)
            assert err.value.code() == code
        authorized = (("authorization", f"Bearer {TOKEN}"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.Reload(lcnet_pb2.ReloadRequest(tag="x:y:z"), metadata=authorized)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = lcnet_pb2_grpc.ClassifierStub(channel).ModelInfo(lcnet_pb2.ModelInfoRequest())
        accepted = stub.Reload(lcnet_pb2.ReloadRequest(tag=info.tag), metadata=authorized)
        assert (accepted.tag, accepted.state) == (info.tag, "requested")
        assert info.reload.mode == "watch" and info.labels


def test_with_reloading_off_a_reload_request_is_refused(servers, trained: dict) -> None:
    """Without a token there are no admin routes (tests/test_routes.py, test_serving.py); with one
    and LCNET_RELOAD off, a reload is refused with how to turn it on: 409, FAILED_PRECONDITION."""
    first, server, still = servers
    assert admin_reload(still, "wrong").status_code == 403
    response = admin_reload(still, TOKEN)
    assert response.status_code == 409
    refused = "reloading is off: start the server with LCNET_RELOAD=request"
    assert response.json() == {"error": refused}
    assert "/admin/reload" in httpx.get(f"{still.url}/docs.json").json()["paths"]
    with grpc.insecure_channel(f"127.0.0.1:{still.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            lcnet_pb2_grpc.AdminStub(channel).Reload(
                lcnet_pb2.ReloadRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == refused
    assert model_info(still)["reload"] == {"mode": "off"} and model_info(still)["tag"] == first
    # Its worker, restarted after a crash, serves the version the server started with, though
    # the store has a newer one of the name it was given.
    save_version(first, [f"newer {name}" for name in CLASS_NAMES])
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    assert_a_restarted_worker_serves(still, image, first)


def test_a_restarted_worker_serves_what_the_others_serve(servers, trained: dict) -> None:
    """Workers share no channel: a restarted one reads the store and the request file afresh,
    in its own order. Here the last request (back to the first version) is older than the
    newest version, which every worker then followed: the new worker must follow it too. Then
    a newer version fails everywhere: the others keep the last good one, which the new worker
    must find too, not stay on the version the server started with."""
    first, server, still = servers
    image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
    with SteadyLoad(server, image) as load:
        load.wait_for(save_version(first, [f"a {name}" for name in CLASS_NAMES]))
        assert admin_reload(server, TOKEN, {"tag": first}).status_code == 202
        load.wait_for(first)
        newest = save_version(first, [f"b {name}" for name in CLASS_NAMES])
        load.wait_for(newest)
    assert_a_restarted_worker_serves(server, image, newest)
    bad = save_corrupt_version(trained)
    assert settled_reload_state(server, "failed")["tag"] == bad
    assert_a_restarted_worker_serves(server, image, newest)
    assert settled_reload_state(server, "failed")["tag"] == bad  # the new worker says so too


def request_mode_server(trained: dict, name: str) -> tuple[str, Server]:
    """The trained model stored as ``name``, and a 2-worker server of it that reloads on
    request; the version stored."""
    first = save_to_store(trained["export_dir"], name, load_folder(trained["export_dir"]).info)
    env = {"LCNET_MODEL": name, "LCNET_WORKERS": "2", "LCNET_RELOAD": "request",
           "LCNET_ADMIN_TOKEN": TOKEN}  # fmt: skip
    return first, Server(".", env).wait_ready()


def test_request_mode_swaps_only_when_asked(trained: dict) -> None:
    """LCNET_RELOAD=request: a newer version in the store is not served until POST
    /admin/reload, whose empty body means the newest; every worker swaps and counts it."""
    first, server = request_mode_server(trained, "asked")
    try:
        newer = save_version(first, [f"asked {name}" for name in CLASS_NAMES])
        time.sleep(4 * REQUEST_POLL_S)  # what `watch` would have been given to find it
        assert {model_info(server)["tag"] for _ in range(8)} == {first}
        assert served_workers(server, "asked") == {first: 2}
        response = admin_reload(server, TOKEN)
        assert response.status_code == 202
        assert response.json() == {"tag": newer, "state": "requested", "serving": first}
        deadline = time.monotonic() + 60
        for pid in workers(server):
            model_info_from(server, pid, until=lambda info: info["tag"] == newer,
                            timeout=deadline - time.monotonic())  # fmt: skip
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'lcnet_model_reloads_total{model="asked",result="ok"} 2.0' in metrics
        assert served_workers(server, "asked") == {newer: 2, first: 0}
        # The version the server started on, deleted now that nobody serves it: a worker
        # restarted after a crash starts anyway (it failed at every restart, forever).
        bentoml.models.delete(first)
        image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
        assert_a_restarted_worker_serves(server, image, newer)
        # the killed worker, which could not take its count back, is no longer counted
        until_served_workers(server, "asked", {newer: 2, first: 0})
        # A second reload: each version served since the server started stays listed, at 0
        # (prometheus_client's per-worker files cannot forget a series; README says so), even
        # one deleted from the store; what serves now is the versions above 0.
        third = save_version(newer, [f"third {name}" for name in CLASS_NAMES])
        assert admin_reload(server, TOKEN, {"tag": third}).status_code == 202
        until_served_workers(server, "asked", {third: 2, newer: 0, first: 0})
    finally:
        server.stop()


def test_workers_end_on_one_version_after_the_served_one_leaves_the_store(trained: dict) -> None:
    """Deleted after a rollout, the served version can no longer be loaded by a worker BentoML
    restarts: the restarted one started on the server's first version and tried the deleted
    one for good, the other went on serving it from memory, and answers came from two models
    at random. Both now end on the server's first version (what the restarted one can load)."""
    first, server = request_mode_server(trained, "leaving")
    try:
        rolled_out = save_version(first, [f"leaving {name}" for name in CLASS_NAMES])
        assert admin_reload(server, TOKEN, {"tag": rolled_out}).status_code == 202
        until_served_workers(server, "leaving", {rolled_out: 2, first: 0})
        bentoml.models.delete(rolled_out)
        victim = workers(server)[0]
        os.kill(victim, signal.SIGKILL)
        new = replacement(server, victim, 2)
        until_served_workers(server, "leaving", {first: 2, rolled_out: 0})
        # the request for the deleted version, which the new worker reads first, is passed over:
        # no failed reload that nobody asked for, said by one worker and counted at each restart
        time.sleep(4 * REQUEST_POLL_S)
        info = model_info_from(server, new)
        assert (info["tag"], info["reload"]["state"]) == (first, "idle"), info
        failed = 'lcnet_model_reloads_total{model="leaving",result="failed"}'
        assert failed not in httpx.get(f"{server.url}/metrics").text
        image = (trained["dataset"] / "green" / "1.jpg").read_bytes()
        with SteadyLoad(server, image) as load:
            time.sleep(2)
        assert {version for _, _, ok, version, _, _ in load.answers if ok} == {first}
    finally:
        server.stop()


def assert_a_restarted_worker_serves(server: Server, image: bytes, expected: str) -> None:
    """Kill a worker: the one started in its place comes to serve ``expected`` (its own
    ``/model`` says so, once it has looked at the store and the request file), and then every
    answer under load on every worker is ``expected``."""
    victim, count = workers(server)[0], len(workers(server))
    os.kill(victim, signal.SIGKILL)
    new = replacement(server, victim, count)
    model_info_from(server, new, until=lambda info: info["tag"] == expected)
    with SteadyLoad(server, image) as load:
        time.sleep(3)
    assert {version for _, _, ok, version, _, _ in load.answers if ok} == {expected}


def ready(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def set_after(event: threading.Event, seconds: float) -> None:
    threading.Timer(seconds, event.set).start()


def test_a_child_process_is_ended_once_its_caller_is_told_to_stop(monkeypatch) -> None:
    """A worker told to stop ends the child its reload started (SIGTERM, then SIGKILL): it would
    outlive the worker. A child that prints more than a pipe holds still answers whole."""
    from lcnet_runner import child
    from lcnet_runner.child import ChildStoppedError, run_python

    stop = threading.Event()
    printed = run_python(["-c", "print('x' * 1_000_000)"], timeout_s=30, stop=stop)
    assert len(printed) == 1_000_001
    set_after(stop, 0.5)
    start = time.monotonic()
    with pytest.raises(ChildStoppedError):
        run_python(["-c", "import time; time.sleep(60)"], timeout_s=30, stop=stop)
    assert time.monotonic() - start < 1.5
    with pytest.raises(ChildStoppedError, match="not started"):  # stop came before the child
        run_python(["-c", "pass"], timeout_s=30, stop=stop)

    monkeypatch.setattr(child, "STOP_GRACE_S", 0.3)
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    stop = threading.Event()
    set_after(stop, 0.5)
    start = time.monotonic()
    with pytest.raises(ChildStoppedError):
        run_python(["-c", deaf], timeout_s=30, stop=stop)  # killed once its grace is over
    assert time.monotonic() - start < 2
    with pytest.raises(ChildProcessError, match="no answer within 0.5 s"):  # as before
        run_python(["-c", "import time; time.sleep(60)"], timeout_s=0.5, stop=threading.Event())


def test_a_child_process_ends_with_the_process_that_started_it() -> None:
    """A worker killed outright (the OOM killer's SIGKILL) left the child checking a version, or
    racing the engines, running for up to 10 minutes under init."""
    starter = subprocess.Popen([sys.executable, "-c", (
        "from lcnet_runner.child import run_python\n"
        "run_python(['-c', 'import time; time.sleep(60)'], timeout_s=60)")])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(starter.pid).children()):
            assert time.monotonic() < deadline, "no child started"
            time.sleep(0.05)
        [child] = children
        time.sleep(0.5)  # past its first step: ended by the signal it asked for, not its check
        starter.kill()
        starter.wait()
        assert seconds_until_ended(child.pid, timeout=5) < 5, "the child outlived its parent"
    finally:
        starter.kill()
        starter.wait()


def test_a_version_stored_without_checksums_is_loaded_in_a_child_first(
    trained: dict, tmp_path: Path
) -> None:
    """A weights file truncated in a version from before checksums: the throwaway process fails
    (or dies inside native code), never the serving one."""
    from lcnet_runner.reload import try_load_in_child

    folder = tmp_path / "legacy"
    shutil.copytree(trained["export_dir"], folder)
    try_load_in_child(folder)  # intact: loads
    params = folder / PARAMS_FILE
    params.write_bytes(params.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="in a child process failed"):
        try_load_in_child(folder)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LCNET_RELOAD": "sometimes"}, "use one of off, watch, request"),
        ({"LCNET_RELOAD": "watch", "LCNET_MODEL": "pplcnet:v1"}, "pins one"),
        ({"LCNET_RELOAD": "request"}, "needs LCNET_ADMIN_TOKEN"),
        ({"LCNET_RELOAD": "request", "LCNET_ADMIN_TOKEN": " \n"}, "needs LCNET_ADMIN_TOKEN"),
        ({"LCNET_RELOAD": "watch", "LCNET_RELOAD_INTERVAL_S": "0"}, "must be > 0"),
        ({"LCNET_ADMIN_TOKEN": "pässword"}, "must be printable ASCII"),
    ],
)
def test_reload_settings_are_checked_at_start(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSettings.from_env(env)
    watch = ServingSettings.from_env({"LCNET_RELOAD": "watch", "LCNET_ADMIN_TOKEN": "xyzzy"})
    assert watch.model_name == "pplcnet" and "xyzzy" not in repr(watch)
    from_a_file = ServingSettings.from_env({"LCNET_ADMIN_TOKEN": "xyzzy\n"})  # $(cat token)
    assert from_a_file.admin_token == "xyzzy"


def test_checksums_catch_a_changed_file_and_ignore_bentomls_own(tmp_path: Path) -> None:
    (tmp_path / "inference.pdiparams").write_bytes(b"weights" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labels.txt").write_text("a\n")
    assert not verify_checksums(tmp_path)  # nothing recorded
    (tmp_path / "model.yaml").write_text("BentoML rewrites this one when it stores a version")
    write_checksums(tmp_path)
    (tmp_path / "model.yaml").write_text("rewritten")
    assert verify_checksums(tmp_path)
    (tmp_path / "inference.pdiparams").write_bytes(b"weights" * 50)
    with pytest.raises(InvalidModelError, match="inference.pdiparams is missing, truncated"):
        verify_checksums(tmp_path)


def test_stopping_the_reloader_waits_until_it_has_ended() -> None:
    """A worker stops its reloader before it closes gRPC and its model: no swap may begin in
    between."""
    from lcnet_runner.reload import Reloader, ServedModel

    async def start_and_stop() -> bool:
        served = ServedModel(FakeRunner(f"{NAME}:v1"))
        reloader = Reloader(served, NAME, watch=False, interval_s=1, make_runner=lambda _: None)
        reloader.start()
        await asyncio.sleep(0.05)
        await reloader.stop()
        return reloader._task.done()

    assert asyncio.run(start_and_stop())


def test_the_records_of_stopped_servers_are_deleted(tmp_path: Path, monkeypatch) -> None:
    """Each server run left a request file and a served record behind, for good. Only this
    host's are judged: a server in another container sharing the store has pids this one
    cannot see, and its records must stay (its restarted workers rejoin by them)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    folder = request_file("my-model").parent
    folder.mkdir(parents=True)
    elsewhere = folder.parent / "another-host-4026531836"
    elsewhere.mkdir()
    (elsewhere / "my-model-1-1700000000.000.json").write_text("{}")
    stopped = subprocess.Popen([sys.executable, "-c", "pass"])
    stopped_id = server_id(stopped.pid)
    stopped.wait()
    live_id = server_id(os.getpid())
    names = {
        server: [f"my-model-{server.replace(':', '-')}{end}" for end in (".json", ".served.json")]
        for server in (stopped_id, live_id)
    }
    for name in [*names[stopped_id], *names[live_id], "notes.json"]:
        (folder / name).write_text("{}")
    forget_stopped_servers()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names[live_id], "notes.json"])
    assert [p.name for p in elsewhere.iterdir()] == ["my-model-1-1700000000.000.json"]


def test_a_request_file_that_is_no_request_is_passed_over(tmp_path: Path, monkeypatch) -> None:
    """Anything in the shared request file but a request (e.g. written by hand) is ignored, and
    the next real request is acted on: the worker's reloading goes on."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))  # where the request files are
    from lcnet_runner.reload import Reloader, ServedModel, write_request

    reloader = Reloader(
        ServedModel(FakeRunner(f"{NAME}:v1")),
        NAME,
        watch=False,
        interval_s=1,
        make_runner=lambda _: None,
    )
    reloader.request_path.parent.mkdir(parents=True, exist_ok=True)
    for text in ("[]", '{"id": "a", "at": "soon", "tag": "x"}', '"tag"', "{}", "{"):
        reloader.request_path.write_text(text)
        os.utime(reloader.request_path, ns=(0, len(text)))  # a new mtime: read again
        assert reloader._requested() is None, text
    write_request(reloader.request_path, f"{NAME}:v2")
    assert reloader._requested() == f"{NAME}:v2"


def test_a_store_entry_bentoml_cannot_read_is_not_the_requests_fault(trained: dict) -> None:
    """A damaged model.yaml (BentoML's own, which files.sha256 does not cover) was answered 422,
    "not a store tag": the operator's request blamed for the store."""
    from lcnet_runner.handlers import RequestError, request_reload
    from lcnet_runner.reload import resolve

    tag = save_to_store(
        Path(trained["export_dir"]), "damaged", load_folder(trained["export_dir"]).info
    )
    folder = Path(bentoml.models.get(tag).path)
    written = (folder / "model.yaml").read_text()
    without_name = "".join(line for line in written.splitlines(True) if line[:5] != "name:")
    reloader = SimpleNamespace(request=resolve)  # what Reloader.request does first
    try:
        # empty, cut off half-way (YAML's own error), a field missing (a KeyError, once taken
        # for "not in the store", and answered 404 for "model None")
        for damaged in ("", written[: len(written) // 2], without_name):
            (folder / "model.yaml").write_text(damaged)
            with pytest.raises(RequestError) as refused:
                request_reload(reloader, tag)
            assert refused.value.status == 409, (damaged, refused.value)
            assert f"{tag}: its store entry cannot be read" in str(refused.value)
        with pytest.raises(ValueError, match="is not a store tag"):
            resolve("x:y:z")
    finally:
        shutil.rmtree(folder)
    with pytest.raises(RequestError) as refused:  # no tag: the newest of the name, said so
        request_reload(SimpleNamespace(request=lambda tag: resolve(tag or "nothing:latest")), None)
    assert (refused.value.status, str(refused.value)) == (
        404,
        "nothing:latest is not in the BentoML store",
    )


def test_a_worker_whose_reload_failed_here_only_tries_again(tmp_path: Path, monkeypatch) -> None:
    """A version can fail on one worker and load on the others (a child that timed out, memory
    short while two versions were loaded): that worker tries it again, after a wait, instead of
    serving the old version beside theirs for good."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    from lcnet_runner import reload

    monkeypatch.setattr(reload, "REQUEST_POLL_S", 0.01)
    monkeypatch.setattr(reload, "REJOIN_RETRY_S", (0.2, 1.0))
    monkeypatch.setattr(reload, "in_store", lambda tag: True)  # the store's edge
    loads = []

    def load(tag: str) -> FakeRunner:  # the store's edge: the first load of v2 here fails
        loads.append(tag)
        if len(loads) == 1:
            raise MemoryError("a passing failure")
        return FakeRunner(tag)

    async def request_v2_and_wait() -> list:
        served = reload.ServedModel(FakeRunner(f"{NAME}:v1"))
        reloader = reload.Reloader(
            served, NAME, watch=False, interval_s=1, make_runner=lambda _: None
        )
        monkeypatch.setattr(reloader, "_load", load)
        reloader.start()
        reload.write_request(reloader.request_path, f"{NAME}:v2")
        states = []
        for _ in range(300):
            await asyncio.sleep(0.01)
            states.append((reloader.status.state, served.tag))
            if len(loads) == 1:  # failed here; another worker then swaps v2 in
                reload._write_record(reloader.swapped_in, {"tag": f"{NAME}:v2"})
            if served.tag.endswith("v2"):
                break
        await reloader.stop()
        return states

    states = asyncio.run(request_v2_and_wait())
    assert ("failed", f"{NAME}:v1") in states  # served v1 meanwhile, said so
    assert states[-1] == ("idle", f"{NAME}:v2") and loads == [f"{NAME}:v2"] * 2


def test_a_store_that_cannot_be_read_is_said_once(tmp_path: Path, monkeypatch) -> None:
    """Watching, a store entry BentoML cannot read was a log warning at every look (39 in two
    minutes) and nothing in /model or /metrics: now once per cause, in all three, until a look
    reads the store again."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    from lcnet_runner import reload

    counted = []
    reloader = reload.Reloader(
        reload.ServedModel(FakeRunner(f"{NAME}:v1")), NAME, watch=True, interval_s=1,
        make_runner=lambda _: None, on_result=counted.append,
    )  # fmt: skip

    def damaged(tag: str):
        raise KeyError("name")

    monkeypatch.setattr(reload, "find_stored", damaged)
    assert [reloader._newest(), reloader._newest()] == [None, None]
    assert counted == ["failed"]
    assert reloader.describe() == {
        "state": "failed", "tag": f"{NAME}:latest",
        "error": "cannot read the store: KeyError: 'name'",
    }  # fmt: skip
    stored = SimpleNamespace(tag=f"{NAME}:v1", info=SimpleNamespace(creation_time=None))
    monkeypatch.setattr(reload, "find_stored", lambda tag: stored)
    assert reloader._newest() is None  # the version served: nothing to load
    assert reloader.describe() == {"state": "idle", "tag": f"{NAME}:v1", "error": None}


def test_a_reload_is_said_done_while_the_old_version_drains(tmp_path: Path, monkeypatch) -> None:
    """The new version answers from the swap on, but ``/model`` read "loading" and the reload
    went uncounted until the old version's last request had answered (a slow upload: up to the
    body timeout)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    from lcnet_runner import reload

    monkeypatch.setattr(reload, "REQUEST_POLL_S", 0.01)
    monkeypatch.setattr(reload, "in_store", lambda tag: True)  # the store's edge
    counted = []

    async def reload_while_a_request_holds_v1() -> tuple:
        v1 = FakeRunner(f"{NAME}:v1")
        served = reload.ServedModel(v1)
        reloader = reload.Reloader(
            served, NAME, watch=False, interval_s=1, make_runner=lambda _: None,
            on_result=counted.append,
        )  # fmt: skip
        monkeypatch.setattr(reloader, "_load", FakeRunner)
        reloader.start()
        with served.pinned():  # a request still reading its upload, on v1
            reload.write_request(reloader.request_path, f"{NAME}:v2")
            for _ in range(300):
                await asyncio.sleep(0.01)
                if served.tag.endswith("v2"):
                    break
            await asyncio.sleep(0.05)
            while_draining = (reloader.describe(), list(counted), v1.closed)
        await asyncio.sleep(0.05)
        await reloader.stop()
        return while_draining, v1.closed

    while_draining, closed_after = asyncio.run(reload_while_a_request_holds_v1())
    assert while_draining == (
        {"state": "idle", "tag": f"{NAME}:v2", "error": None}, ["ok"], False
    )  # fmt: skip
    assert closed_after  # once its request had answered


def save_unchecksummed_version(trained: dict, name: str) -> str:
    """A version stored the way releases before checksums stored theirs: a reload loads it in a
    child process first."""
    with bentoml.models.create(name) as stored:
        shutil.copytree(trained["export_dir"], stored.path, dirs_exist_ok=True)
        (Path(stored.path) / CHECKSUM_FILE).unlink(missing_ok=True)
    return str(stored.tag)


def child_checking(server: Server) -> psutil.Process:
    """Until a worker's child process loads a version (``try_load_in_child``); that child."""
    return child_running(server, "each_variant")


def test_a_shutdown_during_a_reloads_child_check_is_no_failed_reload(trained: dict) -> None:
    """`kill -TERM -<pgid>` (Ctrl-C, a supervisor stopping the group) also stops the child that
    checks a new version: that was logged and counted as a failed reload."""
    with checking_a_new_version(trained, "stopped") as (server, unchecked, _):
        log, counted = stopped_as_a_group(server, "stopped")
    assert_only_interrupted(log, counted, unchecked, times=1)


@contextlib.contextmanager
def checking_a_new_version(trained: dict, name: str, env: dict[str, str] | None = None):
    """A server (1 worker) serving ``name``, asked to reload a version stored without checksums,
    once a child process checks it: (the server, that version's tag, the child)."""
    save_to_store(trained["export_dir"], name, load_folder(trained["export_dir"]).info)
    env = {"LCNET_MODEL": name, "LCNET_WORKERS": "1", "LCNET_RELOAD": "request",
           "LCNET_ADMIN_TOKEN": TOKEN, **(env or {})}  # fmt: skip
    server = Server(".", env).wait_ready()
    try:
        unchecked = save_unchecksummed_version(trained, name)
        assert admin_reload(server, TOKEN, {"tag": unchecked}).status_code == 202
        yield server, unchecked, child_checking(server)
    finally:
        server.stop()


def stopped_as_a_group(server: Server, name: str) -> tuple[str, dict[str, float]]:
    """`kill -TERM -<pgid>` to the server; then its log and its reloads of ``name`` by result."""
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=30)
    return server.output(), reload_counts(Path(server.home) / "prometheus_multiproc_dir", name)


def assert_only_interrupted(log: str, counted: dict[str, float], tag: str, times: int) -> None:
    """The reload of ``tag`` said and counted interrupted ``times`` times, never failed."""
    assert log.count(f"reload: loading {tag} interrupted by the server's shutdown") == times, log
    assert "keeps serving" not in log and "[ERROR]" not in log and "Traceback" not in log, log
    assert counted == {"interrupted": float(times)}, counted  # not "failed"


# A child check that takes minutes (a large model on a slow disk): the reload's child sleeps
# first. Only that child: the server's processes read this file too.
SLOW_CHILD_CHECK = """
import sys, time
if "each_variant" in " ".join(sys.orig_argv):
    time.sleep(120)
"""


def test_a_stop_signal_to_the_worker_alone_ends_its_reloads_child_check(
    trained: dict, tmp_path: Path
) -> None:
    """BentoML's arbiter stops its workers one by one (`docker stop` of a container whose PID 1
    is `bentoml serve`, `kill -TERM <worker>`): the child checking a version got no signal and
    outlived its worker (which uvicorn ends by the signal once it has shut down), and the
    reload was neither said nor counted. The worker ends its child; the reload is interrupted.
    The arbiter restarts the worker, which takes the request up again until the server stops."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_CHILD_CHECK)
    python_path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    with checking_a_new_version(trained, "stopping", {"PYTHONPATH": python_path}) as (
        server, unchecked, child,
    ):  # fmt: skip
        [worker] = workers(server)
        os.kill(worker, signal.SIGTERM)
        worker_ended_in = seconds_until_ended(worker, timeout=30)
        child_ended_in = seconds_until_ended(child.pid, timeout=5)
        child_checking(server)  # the restarted worker's, stopped with the server's group
        log, counted = stopped_as_a_group(server, "stopping")
    assert worker_ended_in < 10, f"the worker ended {worker_ended_in:.1f} s after SIGTERM:\n{log}"
    assert child_ended_in < 5, f"its child outlived it:\n{log}"
    assert_only_interrupted(log, counted, unchecked, times=2)  # the worker's, its replacement's


def reload_counts(multiprocess_folder: Path, model: str) -> dict[str, float]:
    """``lcnet_model_reloads_total`` by result, read from a stopped server's metric files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(multiprocess_folder))
    return {
        sample.labels["result"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "lcnet_model_reloads_total" and sample.labels["model"] == model
    }
