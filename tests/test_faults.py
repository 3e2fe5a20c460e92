"""Faults on a real server: a worker killed under load, an outage seen by /readyz, SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    RACE_CHILD,
    child_running,
    model_info_from,
    replacement,
    seconds_until_ended,
    slow_race,
    workers,
)
from PIL import Image

from lcnet_runner.testing import Server


def jpeg(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def wait_for(predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s")


def ready(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_worker_fails_fast_and_is_replaced(trained: dict) -> None:
    server = Server(".", {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "2"}).wait_ready()
    try:
        image, stop, outcomes = jpeg(64), threading.Event(), []

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        status = http.post(
                            f"{server.url}/classify", files={"image": image}
                        ).status_code
                    except httpx.TransportError as err:  # the connection died with the worker
                        status = type(err).__name__
                    outcomes.append((time.monotonic(), status, time.monotonic() - start))

        with ThreadPoolExecutor(8) as pool:
            try:
                for _ in range(8):
                    pool.submit(client)
                time.sleep(1.5)
                victim = workers(server)[0]
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                new = replacement(server, victim, count=2, timeout=60)
                model_info_from(server, new, timeout=60)  # the new worker serves
                serving = time.monotonic() - killed_at
                time.sleep(1)
            finally:
                stop.set()  # the load is bounded whatever happens
        assert outcomes, "no request was made"
        assert max(seconds for _, _, seconds in outcomes) < 20, "a request hung"
        failed = [status for _, status, _ in outcomes if status != 200]
        assert all(status != 500 for status in failed), failed
        assert len(failed) <= 8, f"only in-flight requests of the killed worker may fail: {failed}"
        late = [status for at, status, _ in outcomes if at > killed_at + serving]
        assert late and all(status == 200 for status in late)
        print(f"a new worker served {serving:.1f}s after the kill; "
              f"{len(failed)} of {len(outcomes)} requests failed")  # fmt: skip
    finally:
        server.stop()


def test_readyz_reflects_an_outage_and_the_recovery(trained: dict) -> None:
    server = Server(".", {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1"}).wait_ready()
    try:
        (victim,) = workers(server)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not ready(server), timeout=10)
        recovery = wait_for(lambda: ready(server), timeout=60)
        response = httpx.post(f"{server.url}/classify", files={"image": jpeg(32)}, timeout=30)
        assert response.status_code == 200
        print(f"ready again {recovery:.1f}s after the worker died")
    finally:
        server.stop()


def test_sigterm_lets_in_flight_requests_finish(trained: dict) -> None:
    """SIGTERM (`docker stop`, Kubernetes) while a request is provably in flight: its body is
    half sent when the signal goes, the rest after. It is answered, and the server exits."""
    server = Server(".", {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1"}).wait_ready()
    image = jpeg(64)
    half_sent, signalled = threading.Event(), threading.Event()

    def body():
        yield image[: len(image) // 2]
        half_sent.set()
        signalled.wait(timeout=30)
        yield image[len(image) // 2 :]

    def call() -> tuple[int | str, float]:
        try:
            status = httpx.post(f"{server.url}/classify", content=body(), timeout=60,
                                headers={"Content-Type": "image/jpeg"}).status_code  # fmt: skip
        except httpx.TransportError as err:
            status = type(err).__name__
        return status, time.monotonic()

    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(call)
            assert half_sent.wait(timeout=30)
            time.sleep(0.5)  # for the worker to take the connection and read the headers
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the server is shutting down when the rest of the body arrives
            signalled.set()
            status, answered = answer.result()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    print(f"answered {answered - sent:.1f}s after SIGTERM")
    assert status == 200, status
    assert answered > sent + 0.5


def test_sigterm_lets_a_long_grpc_call_finish_and_refuses_new_ones(trained: dict) -> None:
    """A gRPC call running when SIGTERM comes gets as long as an HTTP request to finish (it was
    cut off after 5 s, `UNAVAILABLE: Cancelling all calls`). 24 flat 6000×6000 PNGs: ~0.5 s of
    decoding each on one worker (past the default batch budget, raised here). New calls are
    refused from SIGTERM on, as new HTTP connections are: they were taken for as long as an
    HTTP request was still in flight, and gRPC's grace began only after it."""
    from lcnet_runner.client import Client, ClientError

    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1",
           "LCNET_MAX_BATCH_PIXELS": str(10**9)}  # fmt: skip
    server = Server(".", env).wait_ready()
    big = io.BytesIO()
    Image.new("RGB", (6000, 6000), (30, 120, 200)).save(big, "PNG")
    started = threading.Event()

    def call() -> tuple[int | str, float]:
        with Client(server.grpc_url, timeout=120) as client:
            started.set()
            answers = client.classify_batch([big.getvalue()] * 24)
        return len(answers), time.monotonic()

    def http_call() -> int:
        files = [("images", ("a.png", big.getvalue()))] * 4
        return httpx.post(f"{server.url}/classify_batch", files=files, timeout=120).status_code

    try:
        with ThreadPoolExecutor(2) as pool:
            answer = pool.submit(call)
            assert started.wait(timeout=30)
            http_answer = pool.submit(http_call)
            time.sleep(1.0)  # both are being decoded
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with Client(server.grpc_url, timeout=10) as late, pytest.raises(ClientError) as err:
                late.classify(jpeg(64))
            assert err.value.status == "UNAVAILABLE"
            count, answered = answer.result()
            assert http_answer.result() == 200
        assert server.process.wait(timeout=90) == 0
    finally:
        server.stop()
    print(f"answered {answered - sent:.1f}s after SIGTERM")
    assert count == 24
    assert answered > sent + 5  # longer than the old grace: the test can tell them apart


def test_a_stop_signal_during_the_start_up_race_ends_the_worker_at_once(
    trained: dict, tmp_path: Path
) -> None:
    """A worker told to stop while it races the engines for its first load (BentoML's arbiter
    stopping its workers one by one: `docker stop`, a pod deleted as it starts) finished the
    race first, held for its whole length; stopped with its child (Ctrl-C to the group), it
    failed its start-up with a traceback. Both now end the race and the worker at once, said in
    one line; the arbiter restarts a worker stopped alone, which races again."""
    env = {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1", **slow_race(tmp_path)}
    server = Server(".", env)
    try:
        race = child_running(server, RACE_CHILD)
        worker = race.parent().pid
        os.kill(worker, signal.SIGTERM)
        worker_ended_in = seconds_until_ended(worker, timeout=30)
        race_ended_in = seconds_until_ended(race.pid, timeout=5)
        child_running(server, RACE_CHILD)  # the replacement's race
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=30)
        log = server.output()
    finally:
        server.stop()
    assert worker_ended_in < 10, f"the worker ended {worker_ended_in:.1f} s after SIGTERM:\n{log}"
    assert race_ended_in < 5, f"its race outlived it:\n{log}"
    assert log.count("start-up interrupted by a stop signal") == 2, log
    assert "[ERROR]" not in log and "Traceback" not in log, log
