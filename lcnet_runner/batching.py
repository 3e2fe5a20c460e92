"""Adaptive (greedy) batching for one model engine per worker process.

Callers (asyncio handlers and gRPC threads alike) submit single items; one background thread
forms batches and runs them. The batcher is *greedy*: as soon as the engine is free it flushes
whatever is waiting instead of waiting for a batch to fill. Under load the queue refills while a
batch runs, so batches grow naturally and the engine never idles while work is pending.
BentoML's own dispatcher keeps only one batch in flight and polls for the next one; on a 2-core
CPU we measured 70-80 % engine utilisation with it versus 90-98 % with this greedy loop.

Pure stdlib so it can be tested and used without BentoML.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    size: int  # items in the batch
    queue_wait_s: tuple[float, ...]  # per item: time from submit to batch start
    run_s: float  # time spent in the process function


class BatcherClosedError(RuntimeError):
    """Raised by submit() after close()."""


class AdaptiveBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_delay_ms: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
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
        self._name = name
        # (item, future, submit time); a deque under one Condition lets submit_many enqueue a
        # contiguous run atomically and lets the worker sleep without polling.
        self._queue: deque[tuple[T, Future[R], float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Daemon: a forgotten close() must not hang interpreter shutdown.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    def submit(self, item: T) -> Future[R]:
        return self.submit_many((item,))[0]

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        futures: list[Future[R]] = [Future() for _ in items]
        now = time.perf_counter()
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"{self._name} is closed")
            self._queue.extend((it, fut, now) for it, fut in zip(items, futures, strict=True))
            self._cond.notify()
        return futures

    def __call__(self, item: T) -> R:
        return self.submit(item).result()

    async def acall(self, item: T) -> R:
        # wrap_future propagates asyncio cancellation to the concurrent future, so a cancelled
        # request that has not started yet is skipped by the worker.
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        # Joining ourselves (close() called from process/on_batch) would deadlock.
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> AdaptiveBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker -----------------------------------------------------------------------------

    def _take(self, batch: list[tuple[T, Future[R], float]]) -> None:
        # Caller holds the lock.
        while self._queue and len(batch) < self._max_batch_size:
            batch.append(self._queue.popleft())

    def _next_batch(self) -> list[tuple[T, Future[R], float]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            batch: list[tuple[T, Future[R], float]] = []
            self._take(batch)
            if self._max_delay_s > 0:
                # Optional short wait for stragglers, bounded from when this batch began;
                # closing stops the wait so shutdown stays prompt.
                deadline = time.perf_counter() + self._max_delay_s
                while len(batch) < self._max_batch_size and not self._closed:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    self._take(batch)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            # Skip futures cancelled by their callers; the rest become uncancellable.
            live = [e for e in batch if e[1].set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[tuple[T, Future[R], float]]) -> None:
        items = [e[0] for e in batch]
        start = time.perf_counter()
        try:
            results = list(self._process(items))
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self._name}: process returned {len(results)} results for {len(items)} items"
                )
        except BaseException as exc:  # noqa: BLE001 - a bad batch must never kill the worker
            run_s = time.perf_counter() - start
            for _, fut, _ in batch:
                fut.set_exception(exc)
        else:
            run_s = time.perf_counter() - start
            for (_, fut, _), res in zip(batch, results, strict=True):
                fut.set_result(res)
        if self._on_batch is not None:
            stats = BatchStats(len(batch), tuple(start - e[2] for e in batch), run_s)
            try:
                self._on_batch(stats)
            except Exception:
                logger.exception("%s: on_batch callback failed", self._name)
