"""The asyncio adaptive batcher: right results to the right callers, real batches, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lcnet_runner.batching import AdaptiveBatcher, BatcherClosedError, BatchStats


def run(coro):
    return asyncio.run(coro)


def doubler(sleep_s: float = 0.0, sizes: list[int] | None = None):
    def process(items: list[int]) -> list[int]:
        if sizes is not None:
            sizes.append(len(items))
        time.sleep(sleep_s)
        return [x * 2 for x in items]

    return process


def test_each_caller_gets_its_own_result_and_batches_form() -> None:
    stats: list[BatchStats] = []

    async def main() -> list[int]:
        batcher = AdaptiveBatcher(doubler(0.02), max_batch_size=8, on_batch=stats.append)
        results = await asyncio.gather(*(batcher(i) for i in range(40)))
        await batcher.close()
        return results

    assert run(main()) == [i * 2 for i in range(40)]
    sizes = [s.size for s in stats]
    assert sum(sizes) == 40 and max(sizes) == 8 and len(sizes) < 40
    assert all(len(s.queue_wait_s) == s.size and s.run_s >= 0.02 for s in stats)


def test_a_lone_request_is_not_delayed() -> None:
    """On an idle loop nothing else can join the batch, so the batcher never waits for company,
    however long it may: a minute-long max delay must not show."""

    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(), max_delay_ms=60_000)
        await batcher(1)
        assert await asyncio.wait_for(batcher(21), timeout=10) == 42
        await batcher.close()

    run(main())


def handler(batcher: AdaptiveBatcher, x: int, work_steps: int):
    """A request handler: some CPU work in several event-loop turns, then the batcher."""

    async def run() -> int:
        for _ in range(work_steps):
            time.sleep(0.001)  # reading, parsing, decoding
            await asyncio.sleep(0)
        return await batcher(x)

    return run()


@pytest.mark.parametrize("max_delay_ms", [100, 0])
def test_items_of_a_busy_loop_join_the_batch_within_max_delay(max_delay_ms) -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(sizes=sizes), max_delay_ms=max_delay_ms)
        await batcher(0)  # the first request finds an idle loop and runs alone, at once
        sizes.clear()
        first = asyncio.ensure_future(batcher(1))
        others = [handler(batcher, x, work_steps=3) for x in range(2, 9)]
        assert await asyncio.gather(first, *others) == [2 * x for x in range(1, 9)]
        await batcher.close()

    run(main())
    assert sum(sizes) == 8
    if max_delay_ms:  # item 1 waited while the loop worked on the other seven
        assert sizes == [8]
    else:  # item 1 ran at once, alone
        assert sizes[0] == 1


def test_requests_a_turn_away_join_the_batch() -> None:
    """grpc.aio's poller thread hands calls to the loop in a turn that only completes futures;
    each call's handler (its decode) runs in the next turn. Such a light turn is no idle loop:
    the calls it resumed join the batch (they ran one at a time, behind a batch of one)."""
    sizes: list[int] = []

    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(sizes=sizes), max_delay_ms=100)
        await batcher(0)
        sizes.clear()
        loop = asyncio.get_running_loop()
        received = [loop.create_future() for _ in range(7)]

        async def call(x: int, message: asyncio.Future) -> int:
            await message  # the request's message, from the poller
            time.sleep(0.001)  # decoding
            return await batcher(x)

        calls = [call(x, message) for x, message in zip(range(2, 9), received, strict=True)]
        waiting = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)  # every call waits for its message

        def poller_hands_over() -> None:  # what grpc.aio's completion-queue reader does
            for message in received:
                message.set_result(None)

        first = asyncio.ensure_future(batcher(1))
        loop.call_soon(loop.call_soon, poller_hands_over)  # during the batcher's first yield
        assert await asyncio.gather(first, *waiting) == [2 * x for x in range(1, 9)]
        await batcher.close()

    run(main())
    assert sizes == [8]


def test_max_delay_bounds_the_wait_on_a_busy_loop() -> None:
    """A loop kept busy by other work (1 s of it, in 1 ms turns) holds the batch back at most
    max_delay (5 ms): the request is answered long before the noise ends, not after it."""
    turns = 1000
    done: list[int] = []

    async def main() -> int:
        batcher = AdaptiveBatcher(doubler(), max_delay_ms=5)

        async def busy() -> None:
            for _ in range(turns):
                time.sleep(0.001)
                done.append(1)
                await asyncio.sleep(0)

        noise = asyncio.ensure_future(busy())
        await batcher(1)
        turns_when_answered = len(done)
        await noise
        await batcher.close()
        return turns_when_answered

    assert run(main()) < turns // 2


def test_call_many_keeps_order_and_respects_max_batch_size() -> None:
    sizes: list[int] = []

    async def main() -> list[int]:
        batcher = AdaptiveBatcher(doubler(sizes=sizes), max_batch_size=4)
        results = await batcher.call_many(list(range(10)))
        await batcher.close()
        return results

    assert run(main()) == [i * 2 for i in range(10)]
    assert sizes == [4, 4, 2]


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on() -> None:
    def process(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    async def main() -> None:
        batcher = AdaptiveBatcher(process)
        with pytest.raises(ValueError, match="unlucky"):
            await batcher(13)
        assert await batcher(7) == 7
        await batcher.close()

    run(main())


def test_process_here_runs_what_it_takes_on_the_loop_and_leaves_the_rest_to_the_engine() -> None:
    """``process_here`` is offered each batch on the event loop's thread; None sends the batch
    to the engine thread; what it raises fails that batch's callers only."""
    threads: dict[str, set[str]] = {"here": set(), "engine": set()}

    def here(items: list[int]) -> list[int] | None:
        if 13 in items:
            raise ValueError("unlucky")
        if len(items) > 1 or items[0] % 2:
            return None
        threads["here"].add(threading.current_thread().name)
        return [x * 10 for x in items]

    def engine(items: list[int]) -> list[int]:
        threads["engine"].add(threading.current_thread().name)
        return [x * 2 for x in items]

    async def main() -> tuple[list[int], list[int]]:
        batcher = AdaptiveBatcher(engine, process_here=here, name="b")
        lone = [await batcher(x) for x in (2, 3)]
        with pytest.raises(ValueError, match="unlucky"):
            await batcher(13)
        together = await batcher.call_many([4, 5])
        await batcher.close()
        return lone, together

    assert run(main()) == ([20, 6], [8, 10])
    assert threads == {"here": {threading.main_thread().name}, "engine": {"b_0"}}


def test_wrong_result_count_is_an_error() -> None:
    async def main() -> None:
        batcher = AdaptiveBatcher(lambda items: items[:-1])
        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await batcher(1)
        await batcher.close()

    run(main())


def test_on_batch_errors_are_swallowed() -> None:
    def broken(stats: BatchStats) -> None:
        raise RuntimeError("metrics down")

    async def main() -> int:
        batcher = AdaptiveBatcher(doubler(), on_batch=broken)
        result = await batcher(5)
        await batcher.close()
        return result

    assert run(main()) == 10


def test_cancelled_callers_are_skipped() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(0.05, sizes), max_batch_size=1)
        first = asyncio.ensure_future(batcher(1))
        second = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0.01)  # the first batch is running, the second queued
        second.cancel()
        assert await first == 2
        assert await batcher(3) == 6
        await batcher.close()

    run(main())
    assert sizes == [1, 1]


def test_close_drains_then_refuses() -> None:
    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(0.01), max_batch_size=2)
        pending = asyncio.gather(*(batcher(i) for i in range(5)))
        await asyncio.sleep(0)
        await batcher.close()
        assert await pending == [0, 2, 4, 6, 8]
        with pytest.raises(BatcherClosedError):
            await batcher(1)
        await batcher.close()  # idempotent

    run(main())


def test_a_close_given_up_on_still_drains_and_frees_the_thread() -> None:
    """``wait_for(close(), deadline)`` at shutdown: the deadline cancelled the worker mid-batch,
    and every queued and running caller waited forever."""

    async def main() -> list[int]:
        batcher = AdaptiveBatcher(doubler(0.05), max_batch_size=2, name="given-up")
        callers = asyncio.gather(*(batcher(i) for i in range(4)))
        await asyncio.sleep(0.01)  # the first batch is running, the second queued
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.close(), 0.01)
        results = await asyncio.wait_for(callers, 2)
        await asyncio.wait_for(batcher.close(), 2)  # idempotent, and done by now
        return results

    assert run(main()) == [0, 2, 4, 6]
    assert not any(t.name.startswith("given-up") for t in threading.enumerate())


def test_a_cancelled_worker_fails_its_callers() -> None:
    """The worker task cancelled (the loop shutting down): callers get an error, not a hang."""

    async def main() -> None:
        batcher = AdaptiveBatcher(doubler(0.05), max_batch_size=1)
        callers = [asyncio.ensure_future(batcher(i)) for i in range(3)]
        await asyncio.sleep(0.01)  # the first batch is running, two queued
        batcher._task.cancel()
        for caller in callers:
            with pytest.raises(BatcherClosedError, match="stopped"):
                await asyncio.wait_for(caller, 2)
        await asyncio.wait_for(batcher.close(), 2)  # not the worker's CancelledError

    run(main())


def stop_at_zero(items: list[int]) -> list[int] | None:
    if 0 in items:
        raise StopIteration  # e.g. next() on an exhausted iterator inside an engine
    return None


@pytest.mark.parametrize("where", ["engine", "here"])
def test_an_engine_raising_stopiteration_fails_its_batch_only(where: str) -> None:
    """asyncio futures refuse StopIteration: the batch's callers, or the worker, hung."""

    def engine(items: list[int]) -> list[int]:
        stop_at_zero(items)
        return [x * 2 for x in items]

    async def main() -> None:
        here = stop_at_zero if where == "here" else None
        batcher = AdaptiveBatcher(engine, process_here=here)
        with pytest.raises(RuntimeError, match="process raised StopIteration"):
            await asyncio.wait_for(batcher(0), 2)
        assert await asyncio.wait_for(batcher(5), 2) == 10
        await batcher.close()

    run(main())


def test_warm_up_runs_in_the_engine_thread_and_a_failure_closes_the_batcher() -> None:
    threads: list[str] = []

    def process(items: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        if items == [0]:
            raise RuntimeError("engine failed")
        return items

    async def serve(batcher: AdaptiveBatcher) -> int:
        result = await batcher(3)
        await batcher.close()
        return result

    batcher = AdaptiveBatcher(process, name="warm")
    batcher.warm_up([[1], [1, 2]])
    assert run(serve(batcher)) == 3
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0].startswith("warm")

    failing = AdaptiveBatcher(process, name="failing")
    with pytest.raises(RuntimeError, match="engine failed"):
        failing.warm_up([[1], [0], [2]])
    assert not any(t.name.startswith("failing") for t in threading.enumerate())
    with pytest.raises(BatcherClosedError):
        run(failing(1))


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        AdaptiveBatcher(doubler(), max_batch_size=0)
    with pytest.raises(ValueError):
        AdaptiveBatcher(doubler(), max_delay_ms=-1)


def test_one_event_loop_after_another() -> None:
    """Scripts drive the runner with ``asyncio.run`` per call: the batcher follows them to each
    new loop (its worker was bound to the first: the second call failed, or hung once that loop
    had closed), and closes from yet another."""
    batcher = AdaptiveBatcher(doubler())
    assert run(batcher(1)) == 2
    assert run(batcher(2)) == 4  # the first loop cancelled the worker as it ended
    closed = asyncio.new_event_loop()
    assert closed.run_until_complete(batcher(3)) == 6
    closed.close()  # without cancelling the worker: still pending on a loop that is gone
    assert run(batcher.call_many([4, 5])) == [8, 10]
    run(batcher.close())
    with pytest.raises(BatcherClosedError):
        run(batcher(6))
