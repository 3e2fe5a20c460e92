"""The runner without BentoML: concurrent callers form batches and get the Predictor's answers."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lcnet_runner import Predictor
from lcnet_runner.batching import BatchStats
from lcnet_runner.engines import PaddleEngine
from lcnet_runner.predictor import TopKError
from lcnet_runner.runner import LCNetRunner, RunnerBusyError, RunnerConfig
from train.split import read_split


class Recorder:
    def __init__(self) -> None:
        self.batches: list[BatchStats] = []
        self.decodes: list[float] = []

    def decoded(self, seconds: float) -> None:
        self.decodes.append(seconds)

    def batch(self, stats: BatchStats) -> None:
        self.batches.append(stats)


def test_concurrent_calls_are_batched_and_correct(trained: dict) -> None:
    images = [path.read_bytes() for path, _ in read_split(trained["dataset"], "test")]
    expected = Predictor(trained["export_dir"], threads=1).predict(images, top_k=2)
    recorder = Recorder()

    async def main() -> tuple[list, list]:
        runner = LCNetRunner(trained["export_dir"], RunnerConfig(max_batch_size=8), recorder)
        singles = await asyncio.gather(*(runner.aclassify(image, top_k=2) for image in images))
        batch = await runner.aclassify_batch(images, top_k=2)
        await runner.close()
        return singles, batch

    singles, batch = asyncio.run(main())
    for got in (singles, batch):
        for result, want in zip(got, expected, strict=True):
            assert [p["category_id"] for p in result] == [p["category_id"] for p in want]
            assert [p["score"] for p in result] == pytest.approx([p["score"] for p in want])
    sizes = [stats.size for stats in recorder.batches]
    assert sum(sizes) == 2 * len(images) and max(sizes) == 8 and len(recorder.decodes) == 36


def test_a_bad_top_k_is_refused_before_decoding(trained: dict) -> None:
    recorder = Recorder()

    async def main() -> None:
        runner = LCNetRunner(trained["export_dir"], RunnerConfig(), recorder)
        try:
            with pytest.raises(TopKError):
                await runner.aclassify(b"not even an image", top_k=0)
            with pytest.raises(TopKError):
                await runner.aclassify_batch([b"not even an image"], top_k=-2)
        finally:
            await runner.close()

    asyncio.run(main())
    assert recorder.decodes == []


@pytest.mark.parametrize("max_delay_ms", [60_000, 0])
def test_requests_the_loop_is_still_reading_join_the_batch(trained: dict, max_delay_ms) -> None:
    """Requests reaching the event loop one turn at a time (as gRPC calls do) join the batch
    while the loop is busy reading them, up to max_delay, with an engine that releases the GIL
    too; with 0 the engine takes what is queued the moment it is free."""
    image = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()
    config = RunnerConfig(engine="onnxruntime", precision="fp32", solo_threads=1,
                          max_delay_ms=max_delay_ms, skip_guard=True)  # fmt: skip
    recorder = Recorder()
    runner = LCNetRunner(trained["export_dir"], config, recorder)

    async def request(turn: int):
        for _ in range(turn):
            await asyncio.sleep(0)
        time.sleep(0.002)  # the loop reading this request
        return await runner.aclassify(image)

    async def main() -> None:
        await asyncio.gather(*(request(turn) for turn in range(6)))
        await runner.close()

    asyncio.run(main())
    sizes = [stats.size for stats in recorder.batches]
    if max_delay_ms:
        assert sizes == [6]
    else:
        assert sizes[0] == 1 and sum(sizes) == 6, sizes


def test_a_lone_image_on_every_core_runs_on_the_event_loops_thread(trained: dict) -> None:
    """While the cores are free a lone image runs right where it was decoded (no wake-up of the
    engine thread); otherwise, and for batches, the engine thread runs it."""
    image = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()
    config = RunnerConfig(engine="onnxruntime", precision="fp32", threads=1, solo_threads=2,
                          skip_guard=True)  # fmt: skip
    runner = LCNetRunner(trained["export_dir"], config)
    predictor, ran = runner.predictor, []
    for kind in ("solo_engine", "engine"):
        engine = getattr(predictor, kind)
        engine.predict = lambda x, predict=engine.predict, kind=kind: (
            ran.append((kind, threading.current_thread() is threading.main_thread())) or predict(x)
        )

    async def main() -> list:
        predictor._cores = 10**6  # every runnable thread has a core
        answers = [await runner.aclassify(image), await runner.aclassify_batch([image] * 2)]
        predictor._cores = 0  # e.g. the other worker is busy
        answers.append(await runner.aclassify(image))
        await runner.close()
        return answers

    lone, pair, busy = asyncio.run(main())
    assert ran == [("solo_engine", True), ("engine", False), ("engine", False)]
    for answer in (pair[0], pair[1], busy):  # 1 thread or 2, the same answer
        assert answer[0]["category_id"] == lone[0]["category_id"]
        assert answer[0]["score"] == pytest.approx(lone[0]["score"], abs=1e-5)


class ThreadRecorder(Recorder):
    """Where each image was decoded: the observer hears of it in the decoding thread."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def decoded(self, seconds: float) -> None:
        self.threads.append(threading.current_thread().name)


def test_only_small_jpegs_decode_on_the_event_loop(trained: dict) -> None:
    """A JPEG up to inline_decode_bytes decodes on the loop that read it; a PNG, a larger JPEG
    and an array decode on the runner's decode thread, and the loop serves others meanwhile
    (here: a small JPEG sent while a large PNG decodes is answered first). Same answers."""
    small = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((1600, 1200)).save(buffer, "PNG", compress_level=1)
    large_png = buffer.getvalue()  # 2 M pixels: tens of ms to decode
    inputs = {"small JPEG": small, "large PNG": large_png, "array": pixels}
    expected = Predictor(trained["export_dir"], threads=1).predict(list(inputs.values()), bgr=False)
    config = RunnerConfig(inline_decode_bytes=len(small))  # the variant the Predictor chose
    recorder = ThreadRecorder()
    runner = LCNetRunner(trained["export_dir"], config, recorder)
    finished: list[str] = []

    async def classify(name: str, image) -> list:
        answer = await runner.aclassify(image)
        finished.append(name)
        return answer

    async def main() -> list:
        answers = [await classify(name, image) for name, image in inputs.items()]
        large = asyncio.create_task(classify("large PNG", large_png))
        await asyncio.sleep(0)  # the PNG is on the decode thread now
        await classify("small JPEG", small)
        await large
        return answers

    answers = asyncio.run(main())
    assert recorder.threads[:3] == ["MainThread", "lcnet-decode_0", "lcnet-decode_0"]
    assert finished[3:] == ["small JPEG", "large PNG"]
    for got, want in zip(answers, expected, strict=True):
        assert got[0]["category_id"] == want[0]["category_id"]
        assert got[0]["score"] == pytest.approx(want[0]["score"], abs=1e-5)
    runner = LCNetRunner(trained["export_dir"], replace(config, inline_decode_bytes=0), recorder)
    asyncio.run(runner.aclassify(small))
    assert recorder.threads[-1] == "lcnet-decode_0"  # 0: every image on the decode thread
    asyncio.run(runner.close())


def test_every_batch_size_is_warmed_in_the_thread_that_runs_batches(
    trained: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paddle keeps its per-shape kernels per thread: warmed on the loading thread, the engine
    thread would build (and hold) a second set under load (~300 MiB a worker for x1.0)."""
    ran: list[tuple[int, str]] = []
    predict = PaddleEngine.predict
    monkeypatch.setattr(
        PaddleEngine,
        "predict",
        lambda engine, batch: (
            ran.append((len(batch), threading.current_thread().name)) or predict(engine, batch)
        ),
    )
    config = RunnerConfig(engine="paddle", precision="fp32", max_batch_size=4)
    runner = LCNetRunner(trained["export_dir"], config)
    engine_threads = {name for _, name in ran if name.startswith("lcnet-runner")}
    assert sorted(size for size, name in ran if name in engine_threads) == [1, 2, 3, 4]
    image = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()

    async def serve() -> None:
        await runner.aclassify_batch([image] * 3)
        await runner.close()

    asyncio.run(serve())
    assert len(engine_threads) == 1 and ran[-1] == (3, engine_threads.pop())


def test_a_batch_is_refused_from_its_headers_past_its_pixel_budget(trained: dict) -> None:
    """64 PNGs just under the per-image limit held a worker for a minute (then 504): a request
    is refused at once, before any decoding, when its images would decode to more in all."""
    import io

    from PIL import Image

    from lcnet_runner.preprocess import ImageTooLargeError

    big = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(big, "PNG")  # 1 M pixels; a JPEG counts drafted
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(photo, "JPEG")  # decodes at 1/8: 500×375

    async def main(images: list[bytes]) -> list:
        config = RunnerConfig(max_pixels=20_000_000, max_batch_pixels=2_500_000)
        runner = LCNetRunner(trained["export_dir"], config)
        try:
            return await runner.aclassify_batch(images)
        finally:
            await runner.close()

    assert len(asyncio.run(main([big.getvalue()] * 2 + [photo.getvalue()] * 2))) == 4
    with pytest.raises(
        ImageTooLargeError, match=r"limit of 2500000 pixels a request \(the first 3: 3000000\)"
    ):
        asyncio.run(main([big.getvalue()] * 3))
    # Counted up to the first image past the limit: the last is not even opened.
    with pytest.raises(ImageTooLargeError, match=r"the 4 images .* \(the first 3: 3000000\)"):
        asyncio.run(main([big.getvalue()] * 3 + [b"not even an image"]))


def test_a_busy_runner_refuses_at_once_and_takes_requests_again_as_it_answers(
    trained: dict,
) -> None:
    """A worker's queue had no bound: past it clients waited up to BentoML's timeout (504). While
    it holds max_queued_images, a new request is refused before any work, as BentoML's 503; a
    request is admitted whole while there is any room (a batch larger than the room would never
    pass), and the room comes back as answers go."""

    small = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()
    large = io.BytesIO()
    Image.new("RGB", (1600, 1200), (30, 120, 200)).save(large, "PNG")  # on the decode thread

    async def main() -> None:
        runner = LCNetRunner(trained["export_dir"], RunnerConfig(max_queued_images=2))
        first = asyncio.create_task(runner.aclassify_batch([large.getvalue()] * 3))
        await asyncio.sleep(0)  # the batch holds 3 images, decoding
        with pytest.raises(RunnerBusyError, match=r"holds 3 image\(s\)") as busy:
            await runner.aclassify(small)
        assert busy.value.error_code == 503
        assert len(await first) == 3
        assert len(await runner.aclassify(small)) == 1
        await runner.close()

    asyncio.run(main())
    # A runner in one's own service has no bound unless asked; a server's has one.
    from lcnet_runner.settings import ServingSettings

    assert RunnerConfig().max_queued_images == 0
    assert ServingSettings.from_env({}).runner.max_queued_images == 512
    assert ServingSettings.from_env({"LCNET_MAX_QUEUED_IMAGES": "0"}).runner.max_queued_images == 0


class HeldCount:
    """An observer that keeps the running count ``held`` reports (the service's is a gauge)."""

    def __init__(self) -> None:
        self.count, self.seen = 0, []

    def decoded(self, seconds: float) -> None:
        pass

    def batch(self, stats) -> None:
        pass

    def held(self, change: int) -> None:
        self.count += change
        self.seen.append(self.count)


def test_the_images_a_runner_holds_are_counted_for_model_and_metrics(trained: dict) -> None:
    """How close a worker is to its 503s was nowhere to be seen: ``/model`` shows each worker's
    count, ``/metrics`` the gauge the observer keeps. Observers written before ``held`` existed
    still serve."""
    image = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()

    async def main(observer) -> list[int]:
        runner = LCNetRunner(trained["export_dir"], RunnerConfig(), observer)
        batch = asyncio.create_task(runner.aclassify_batch([image] * 3))
        await asyncio.sleep(0)  # admitted, decoding
        held_meanwhile = runner.held_images
        await runner.aclassify(image)
        await batch
        await runner.close()
        return [held_meanwhile, runner.held_images]

    observer = HeldCount()
    assert asyncio.run(main(observer)) == [3, 0]
    assert observer.seen == [3, 4, 3, 0] and observer.count == 0

    class Older:  # decoded and batch only
        decoded, batch = HeldCount.decoded, HeldCount.batch

    assert asyncio.run(main(Older())) == [3, 0]


def test_runners_that_share_a_bound_hold_at_most_it_together(trained: dict) -> None:
    """A server's worker gives every runner it makes one bound: while a reload drains the old
    version's requests, the new version admitted up to the bound again (twice it in memory)."""
    from lcnet_runner.runner import HeldImages

    image = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()

    async def main() -> None:
        held = HeldImages(limit=2)
        old, new = (LCNetRunner(trained["export_dir"], RunnerConfig(), held=held) for _ in "ab")
        draining = asyncio.create_task(old.aclassify_batch([image] * 2))
        await asyncio.sleep(0)  # the old version holds the bound
        with pytest.raises(RunnerBusyError, match=r"holds 2 image\(s\) \(its limit: 2\)"):
            await new.aclassify(image)
        await draining
        assert len(await new.aclassify(image)) == 1 and new.held_images == 0
        await asyncio.gather(old.close(), new.close())

    asyncio.run(main())


def test_a_server_holds_request_bytes_up_to_its_bound() -> None:
    """A server counts the bytes of each request it takes in, from before its body is read
    (``receiving``): 100 uploads of 17 MB, each under the image bound, took one worker from
    330 MB to 2 GB. A request is admitted whole while there is any room, and the bytes are
    given back when it is answered or fails."""
    from lcnet_runner.runner import HeldImages

    changes: list[int] = []  # what /metrics' lcnet_runner_held_bytes is told
    held = HeldImages(limit=0, byte_limit=100, on_bytes_change=changes.append)
    with held.receiving(60), held.receiving(60):  # 60 left room: the second passes whole
        assert held.bytes == 120
        with pytest.raises(
            RunnerBusyError, match=r"holds 120 bytes of requests \(its limit: 100\)"
        ):
            with held.receiving(1):
                pass
    with pytest.raises(ValueError), held.receiving(500):
        raise ValueError("a bad image")
    assert held.bytes == 0 and changes == [60, 60, -60, -60, 500, -500]
    unbounded = HeldImages(limit=0)
    with unbounded.receiving(10**12):
        with unbounded.receiving(10**12):
            assert unbounded.bytes == 2 * 10**12


def test_memory_is_given_back_once_the_last_large_request_is_answered(
    trained: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc kept what a burst of 20 MB images had freed: a worker stayed 600 MB larger. Given
    back (malloc_trim) when the last large request in flight is answered; small ones never pay."""
    import lcnet_runner.runner as runner_module

    released = []
    monkeypatch.setattr(runner_module, "release_free_memory", lambda: released.append(1))
    monkeypatch.setattr(runner_module, "LARGE_REQUEST_BYTES", 50_000)
    small = next(iter(read_split(trained["dataset"], "test")))[0].read_bytes()
    large = io.BytesIO()
    Image.effect_noise((400, 300), 60).convert("RGB").save(large, "PNG")  # ~350 KB

    async def main() -> None:
        runner = LCNetRunner(trained["export_dir"], RunnerConfig())
        await asyncio.gather(*(runner.aclassify(small) for _ in range(4)))
        assert len(small) < 50_000 and not released
        await asyncio.gather(runner.aclassify(large.getvalue()),
                             runner.aclassify_batch([large.getvalue()] * 2))  # fmt: skip
        # given back on the decode thread: what was submitted to it before this has run
        await asyncio.get_running_loop().run_in_executor(runner._decoder, lambda: None)
        # refused as it arrives (a server's bound): gRPC had received the call whole
        runner._held.byte_limit = runner._held.bytes = 1
        with pytest.raises(RunnerBusyError), runner.receiving(len(large.getvalue())):
            pass
        await asyncio.get_running_loop().run_in_executor(runner._decoder, lambda: None)
        await runner.close()

    asyncio.run(main())
    assert released == [1, 1]
