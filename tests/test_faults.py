"""Faults on a real server: a worker killed under load, an outage seen by /readyz, SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from conftest import workers
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
                alive = lambda: victim not in workers(server) and len(workers(server)) == 2  # noqa: E731
                recovery = wait_for(alive, timeout=60)
                time.sleep(2)
            finally:
                stop.set()  # the load is bounded whatever happens
        assert outcomes, "no request was made"
        assert max(seconds for _, _, seconds in outcomes) < 20, "a request hung"
        failed = [status for _, status, _ in outcomes if status != 200]
        assert all(status != 500 for status in failed), failed
        assert len(failed) <= 8, f"only in-flight requests of the killed worker may fail: {failed}"
        late = [status for at, status, _ in outcomes if at > killed_at + recovery + 1]
        assert late and all(status == 200 for status in late)
        print(f"worker replaced after {recovery:.1f}s; {len(failed)} of {len(outcomes)} failed")
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
    server = Server(".", {"LCNET_MODEL": trained["tag"], "LCNET_WORKERS": "1"}).wait_ready()
    # Slow requests: 32 large (smooth, so small) JPEGs each, several in flight at the signal.
    y, x = np.mgrid[0:1600, 0:1600]
    smooth = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, "JPEG", quality=80)
    files = [("images", (f"{i}.jpg", buffer.getvalue())) for i in range(32)]
    started = threading.Barrier(5)

    def call() -> int | str:
        started.wait()
        try:
            return httpx.post(f"{server.url}/classify_batch", files=files, timeout=60).status_code
        except httpx.TransportError as err:
            return type(err).__name__

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call) for _ in range(4)]
            started.wait()
            time.sleep(0.3)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)  # as `docker stop` / Kubernetes do
            results = [f.result() for f in futures]
        server.process.wait(timeout=60)
    finally:
        server.stop()
    print(f"stopped {time.monotonic() - sent:.1f}s after SIGTERM; answers {results}")
    assert results == [200] * 4, results
