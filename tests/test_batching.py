"""Tests for lcnet_runner.batching.AdaptiveBatcher."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lcnet_runner.batching import AdaptiveBatcher, BatcherClosedError, BatchStats


def _double_slow(items: list[int]) -> list[int]:
    time.sleep(0.005)
    return [x * 2 for x in items]


def test_results_go_to_right_callers() -> None:
    with (
        AdaptiveBatcher(_double_slow, max_batch_size=8) as b,
        ThreadPoolExecutor(max_workers=16) as pool,
    ):
        results = list(pool.map(b, range(100)))
    assert results == [x * 2 for x in range(100)]


def test_batches_form_under_concurrency() -> None:
    sizes: list[int] = []

    def slow(items: list[int]) -> list[int]:
        time.sleep(0.02)
        return items

    start = threading.Barrier(32)

    def call(x: int) -> int:
        start.wait()
        return b(x)

    with (
        AdaptiveBatcher(slow, max_batch_size=8, on_batch=lambda s: sizes.append(s.size)) as b,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):
        assert list(pool.map(call, range(32))) == list(range(32))
    assert sum(sizes) == 32
    assert max(sizes) > 1
    assert max(sizes) <= 8


def test_single_request_not_delayed() -> None:
    with AdaptiveBatcher(lambda items: items) as b:
        b(0)  # warm-up
        t0 = time.perf_counter()
        assert b(1) == 1
        assert time.perf_counter() - t0 < 0.05


def test_max_delay_groups_items() -> None:
    stats: list[BatchStats] = []
    with AdaptiveBatcher(lambda items: items, max_delay_ms=40, on_batch=stats.append) as b:
        f1 = b.submit(1)
        time.sleep(0.005)
        f2 = b.submit(2)
        assert (f1.result(1), f2.result(1)) == (1, 2)
    assert [s.size for s in stats] == [2]
    assert len(stats[0].queue_wait_s) == 2
    assert stats[0].run_s >= 0


def test_exception_reaches_batch_and_batcher_survives() -> None:
    def process(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValueError("bad item")
        return items

    with AdaptiveBatcher(process, max_delay_ms=30) as b:
        futs = b.submit_many([1, -1, 2])
        for f in futs:
            with pytest.raises(ValueError, match="bad item"):
                f.result(1)
        assert b(5) == 5


def test_wrong_result_count() -> None:
    with (
        AdaptiveBatcher(lambda items: [*items, 0]) as b,
        pytest.raises(RuntimeError, match="returned 2 results for 1 items"),
    ):
        b(1)


def test_on_batch_exception_is_swallowed() -> None:
    def boom(_: BatchStats) -> None:
        raise RuntimeError("callback failed")

    with AdaptiveBatcher(lambda items: items, on_batch=boom) as b:
        assert b(1) == 1
        assert b(2) == 2


def test_cancelled_future_is_skipped() -> None:
    seen: list[int] = []
    gate = threading.Event()

    def process(items: list[int]) -> list[int]:
        gate.wait(1)
        seen.extend(items)
        return items

    with AdaptiveBatcher(process) as b:
        first = b.submit(0)  # occupies the engine while we cancel the next one
        time.sleep(0.01)
        cancelled = b.submit(1)
        kept = b.submit(2)
        assert cancelled.cancel()
        gate.set()
        assert first.result(1) == 0
        assert kept.result(1) == 2
    assert 1 not in seen


def test_acall_from_asyncio() -> None:
    async def main(b: AdaptiveBatcher[int, int]) -> list[int]:
        return await asyncio.gather(*(b.acall(i) for i in range(20)))

    with AdaptiveBatcher(_double_slow) as b:
        assert asyncio.run(main(b)) == [i * 2 for i in range(20)]


def test_submit_many_preserves_order() -> None:
    with AdaptiveBatcher(_double_slow, max_batch_size=4) as b:
        futs = b.submit_many(list(range(50)))
        assert [f.result(1) for f in futs] == [i * 2 for i in range(50)]


def test_close_drains_then_rejects() -> None:
    gate = threading.Event()

    def process(items: list[int]) -> list[int]:
        gate.wait(1)
        return items

    b = AdaptiveBatcher(process, max_batch_size=2)
    futs = b.submit_many(list(range(6)))
    # Close while the engine is still blocked on the first batch: queued work must still run.
    threading.Timer(0.02, gate.set).start()
    b.close()
    assert [f.result(0) for f in futs] == list(range(6))
    with pytest.raises(BatcherClosedError):
        b.submit(1)
    b.close()  # idempotent
    with pytest.raises(BatcherClosedError):
        b.submit_many([1, 2])
