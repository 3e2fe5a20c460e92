"""A greedy adaptive batcher for asyncio servers.

Callers (HTTP and gRPC handlers on a worker's event loop) await single items or small lists; one
task takes everything queued (up to ``max_batch_size``) as soon as the engine is free, runs it in
the engine's thread and hands each caller its own result. It never waits for arrivals on an idle
server: it only lets requests the event loop is already working on join the batch, keeping the
engine idle for at most ``max_delay_ms`` (on an idle loop, for a few of its turns: microseconds).

Why asyncio and not a free-running engine thread: Paddle Inference holds the GIL while it runs
(measured here: two predictors in two threads ran no faster than one). An engine thread that
grabs each item the moment it is queued then alternates with the event loop one image at a time,
and batches never form (mean size 1.02 at 32 clients). Taking the queue from the event loop
lets every request that arrived during the previous batch be decoded first, so under load each
batch holds what accumulated. The same wait helps engines that release the GIL wherever
requests reach the loop one at a time (gRPC: each call takes several turns of the loop), so the
batcher's task would otherwise find one or two decoded when the engine frees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

logger = logging.getLogger(__name__)
# A turn of an idle event loop takes ~10 µs; a turn that ran a request handler takes far longer.
_IDLE_TURN_S = 50e-6
# How many turns in a row must look idle before a batch is taken short. One is not enough where
# requests reach the loop from another thread: grpc.aio's poller thread hands a call's
# completions over in a turn that only completes futures, and the call they resume (its decode)
# runs in the next turn; a new call takes a few such hops before its handler runs.
_IDLE_TURNS = 3

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchStats:
    size: int  # items in the batch
    queue_wait_s: tuple[float, ...]  # per item: time from submit to batch start
    run_s: float  # time spent in the process function


class BatcherClosedError(RuntimeError):
    """Raised for calls after close()."""


class _Entry(NamedTuple, Generic[T, R]):
    """A queued item, the future its caller awaits, and when it was queued."""

    item: T
    future: asyncio.Future[R]
    queued_at: float


class AdaptiveBatcher(Generic[T, R]):
    """``await batcher(item)`` → ``process([... item ...])[i]``, batching concurrent callers.

    ``process`` runs in the batcher's one engine thread. ``process_here``, if given, is offered
    each batch first, on the event loop's thread: it returns the results when it ran the batch
    there, or None to leave it to ``process``.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_delay_ms: float = 10.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        process_here: Callable[[list[T]], Sequence[R] | None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must be >= 0")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_ms / 1000.0
        self._on_batch = on_batch
        self._process_here = process_here
        self._name = name
        self._queue: deque[_Entry[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One engine thread: the engine is not re-entrant, and its own threads do the math.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._closed = False

    async def __call__(self, item: T) -> R:
        return (await self.call_many([item]))[0]

    async def call_many(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` together, in order; they may share batches with other callers."""
        if self._closed:
            raise BatcherClosedError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._start_worker(loop)
        now = time.perf_counter()
        futures = [loop.create_future() for _ in items]
        self._queue.extend(_Entry(item, fut, now) for item, fut in zip(items, futures, strict=True))
        self._wakeup.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker task on ``loop``: the first one, or a new one after the last ended or when
        the batcher moves to another loop (a script calling ``asyncio.run`` per call). An Event
        belongs to the first loop that waits on it, and what was queued on a loop that has gone
        can never be answered there."""
        self._wakeup = asyncio.Event()
        self._queue = deque(entry for entry in self._queue if entry.future.get_loop() is loop)
        self._task = loop.create_task(self._worker(), name=self._name)

    def warm_up(self, batches: Iterable[list[T]]) -> None:
        """Run ``process`` on each batch in the engine thread and wait; before serving, so that
        an engine keeping per-thread state builds it in the thread its batches will run in. A
        batch that fails closes the batcher (its thread ends) and raises."""
        try:
            for batch in batches:
                self._executor.submit(self._process, batch).result()
        except BaseException:
            self._closed = True
            self._executor.shutdown(wait=True)  # idle: the failed batch has returned
            raise

    async def close(self) -> None:
        """Stop taking calls, finish what is queued, release the engine thread; idempotent.
        Cancelling the caller (a shutdown deadline) stops the wait, not the draining."""
        self._closed = True
        self._wakeup.set()
        task = self._task
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            # The thread is freed when the worker ends, even if nobody waits for it any more.
            task.add_done_callback(lambda _: self._executor.shutdown(wait=False))
            try:
                # Shielded: cancelling the worker mid-batch would strand every caller queued.
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled() or _being_cancelled():
                    raise  # our caller gave up; the worker goes on draining
        self._executor.shutdown(wait=True)

    def _take(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < self._max_batch_size:
            entry = self._queue.popleft()
            if not entry.future.cancelled():  # the caller went away (client disconnected)
                batch.append(entry)
        return batch

    async def _loop_is_busy(self) -> bool:
        """Yield once; other callbacks ran meanwhile if that took more than a few microseconds."""
        start = time.perf_counter()
        await asyncio.sleep(0)
        return time.perf_counter() - start > _IDLE_TURN_S

    async def _next_batch(self) -> list[_Entry[T, R]]:
        while not self._queue and not self._closed:
            self._wakeup.clear()
            await self._wakeup.wait()
        # Greedy, not hasty: while the event loop is still reading and decoding other requests,
        # let it finish them so they join this batch. The engine stays idle for at most
        # max_delay (counted from now: queued items have usually waited for the last batch).
        deadline = time.perf_counter() + self._max_delay_s
        idle_turns = 0
        while (
            idle_turns < _IDLE_TURNS
            and len(self._queue) < self._max_batch_size
            and time.perf_counter() < deadline
        ):
            idle_turns = 0 if await self._loop_is_busy() else idle_turns + 1
        return self._take()

    async def _worker(self) -> None:
        batch: list[_Entry[T, R]] = []
        try:
            while not (self._closed and not self._queue):
                batch = await self._next_batch()
                if batch:
                    await self._run(batch)
        except BaseException as exc:
            # Cancelled (the loop shutting down) or a bug: no caller may wait forever.
            self._fail_waiting(batch, exc)
            raise

    def _fail_waiting(self, batch: list[_Entry[T, R]], why: BaseException) -> None:
        """Fail the batch taken and everything queued with BatcherClosedError."""
        message = f"{self._name} stopped ({type(why).__name__}) before answering"
        for entry in [*batch, *self._queue]:
            if not entry.future.done():
                entry.future.set_exception(BatcherClosedError(message))
        self._queue.clear()

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        """Run one batch (on the loop via ``process_here``, else in the engine thread) and hand
        each caller its result, or the batch's error."""
        loop = asyncio.get_running_loop()
        items = [entry.item for entry in batch]
        start = time.perf_counter()
        try:
            here = self._process_here(items) if self._process_here else None
            if here is None:
                here = await loop.run_in_executor(self._executor, self._process_safely, items)
            results = list(here)
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self._name}: process returned {len(results)} results for {len(items)} items"
                )
        except Exception as exc:  # a bad batch fails its callers, never the batcher
            error = _futurable(exc, self._name)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(error)
        else:
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        self._report(batch, start)

    def _process_safely(self, items: list[T]) -> Sequence[R]:
        """``process`` in the engine thread; a StopIteration would never reach the worker (the
        future carrying it back to the loop refuses it), so it crosses as a RuntimeError."""
        try:
            return self._process(items)
        except StopIteration as exc:
            raise _futurable(exc, self._name) from exc

    def _report(self, batch: list[_Entry[T, R]], start: float) -> None:
        run_s = time.perf_counter() - start
        if self._on_batch is not None:
            waits = tuple(start - entry.queued_at for entry in batch)
            try:
                self._on_batch(BatchStats(len(batch), waits, run_s))
            except Exception:
                logger.exception("%s: on_batch callback failed", self._name)


def _futurable(exc: Exception, name: str) -> Exception:
    """``exc``, or a RuntimeError for StopIteration, which asyncio futures refuse to hold."""
    if isinstance(exc, StopIteration):
        error = RuntimeError(f"{name}: process raised StopIteration {exc}".rstrip())
        error.__cause__ = exc
        return error
    return exc


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (and must let it through)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
