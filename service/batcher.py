"""Dynamic batching: concurrent requests of one model share one ONNX Runtime call.

Requests wait in a bounded queue; a single worker task takes the first, gathers more for up to
``max_wait_s`` (only while more requests are known to be on their way, so a lone request does not
pay the wait) or until ``max_batch_size``, and runs the batch in a dedicated thread, off the event
loop. Each request's future gets its own row of the result. A full queue refuses at once
(``QueueFull``, a 503 with Retry-After upstream): the wait of an admitted request is bounded by
the queue length times the batch time, never unbounded.

A request may also be a group of items (``submit_group``: the entity pairs of one ``POST /extract``):
a group is one entry in the queue, its items run in the same batch (never split across two, unless
the group alone is larger than ``max_batch_size``: then it runs in consecutive batches of
``max_batch_size``, alone) and its results come back together. A batch is filled with whole
requests: one whose items would take it past ``max_batch_size`` opens the next batch instead.

A request never fails because of its batch-mates: when ``run_batch`` raises for a batch of several
items, the batch is run again one item at a time, so the exception reaches only the request (or
requests) whose item raises it alone, and the others get their answers (a group fails with the first
exception of its items).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("service.batcher")

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """The model's queue is full: the request is refused rather than kept waiting."""


class BatcherClosed(Exception):
    """The service is shutting down."""


@dataclass
class BatchTimings:
    """What one request spent in the batcher, for the latency histograms."""

    queue_wait_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0


@dataclass
class _Pending(Generic[Item, Result]):
    """One request in the queue: one item, or a group of items answered together."""

    items: list[Item]
    future: asyncio.Future[list[Result]]
    enqueued: float
    timings: BatchTimings = field(default_factory=BatchTimings)

    @property
    def rows(self) -> int:
        return len(self.items)


class Batcher(Generic[Item, Result]):
    """Gathers submitted items into batches for ``run_batch`` (called in ``executor``).

    ``run_batch(items)`` must return one result per item, in order, for at most ``max_batch_size``
    items. When it raises on a batch of several items, each item is run again alone: an exception
    fails only the requests whose items raise it on their own.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.name = name
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._incoming = 0  # requests being preprocessed: a batch may wait for them
        self._held: _Pending[Item, Result] | None = None  # did not fit the last batch: opens the next

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the worker on the running loop (call from the app's lifespan)."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"{self.name}-worker")

    async def stop(self) -> None:
        """Stops the worker; requests still queued fail with ``BatcherClosed``."""
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        assert self._queue is not None
        waiting = [self._held] if self._held is not None else []
        self._held = None
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return queued + (self._held is not None)

    # -- requests ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Admits a request (``QueueFull`` if ``max_queue`` are already admitted and not yet running).

        While inside, the request is being preprocessed: a forming batch may wait for it. Admitted
        requests (being preprocessed or queued) never exceed ``max_queue``, so neither the
        preprocessing pool nor the queue can grow without bound.
        """
        if self._incoming + self.depth >= self.max_queue:
            raise QueueFull(f"{self.name}: {self.max_queue} requests are already waiting")
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def submit(self, item: Item, timeout_s: float | None = None) -> tuple[Result, BatchTimings]:
        """The item's result once its batch has run; ``QueueFull`` at once when the queue is full.

        On timeout (``asyncio.TimeoutError``) the request is dropped from its batch if that has
        not started yet.
        """
        results, timings = await self.submit_group([item], timeout_s)
        return results[0], timings

    async def submit_group(
        self, items: Sequence[Item], timeout_s: float | None = None
    ) -> tuple[list[Result], BatchTimings]:
        """The results of ``items``, one request run in one batch (see the module's docstring), in order.

        Queue, timeout and failures as for ``submit``: the group is one request.
        """
        if not items:
            raise ValueError("submit_group needs at least one item")
        if self._queue is None or self._worker is None:
            raise BatcherClosed(f"{self.name} is not running")
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        pending = _Pending(list(items), future, time.perf_counter())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.name}: {self.max_queue} requests are already waiting") from None
        results = await asyncio.wait_for(future, timeout_s)
        return results, pending.timings

    # -- the worker -------------------------------------------------------------------------
    async def _gather(self) -> list[_Pending[Item, Result]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first, self._held = self._held, None
        batch = [first if first is not None else await self._queue.get()]
        rows = batch[0].rows
        deadline = loop.time() + self.max_wait_s
        while rows < self.max_batch_size:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                # Nothing queued: wait only if a request is being preprocessed and time is left.
                remaining = deadline - loop.time()
                if self._incoming == 0 or remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                except asyncio.CancelledError:  # stopping: the requests taken off the queue fail too
                    for taken in batch:
                        if not taken.future.done():
                            taken.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))
                    raise
            if rows + pending.rows > self.max_batch_size:
                self._held = pending  # a request is never split across batches: it opens the next one
                break
            batch.append(pending)
            rows += pending.rows
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            # Requests that timed out or were cancelled while queued are dropped.
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            try:
                await self._run(live)
            except asyncio.CancelledError:
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))
                raise

    async def _run(self, live: list[_Pending[Item, Result]]) -> None:
        """Runs ``live`` as one batch; if that raises, each item alone (only the failing requests fail)."""
        started = time.perf_counter()
        items = [item for pending in live for item in pending.items]
        try:
            results = await self._call(items)
        except Exception as error:  # noqa: BLE001 - the worker lives on; only the failing requests fail
            if len(items) == 1:  # the caller gets the exception (and logs it, or maps it to a 4xx)
                self._fail(live[0], error, started)
                return
            log.warning(
                "%s: a batch of %d failed (%s: %s); running its items one at a time",
                self.name,
                len(items),
                type(error).__name__,
                error,
            )
            for pending in live:
                if not pending.future.done():
                    await self._one_at_a_time(pending)
            return
        elapsed = time.perf_counter() - started
        batch_size = min(len(items), self.max_batch_size)
        at = 0
        for pending in live:
            self._answer(pending, list(results[at : at + pending.rows]), started, elapsed, batch_size)
            at += pending.rows

    async def _one_at_a_time(self, pending: _Pending[Item, Result]) -> None:
        """A request of a failed batch, its items run alone: its answers, or the first exception."""
        started = time.perf_counter()
        results: list[Result] = []
        try:
            for item in pending.items:
                results += await self._call([item])
        except Exception as error:  # noqa: BLE001 - this request's own failure
            self._fail(pending, error, started)
            return
        self._answer(pending, results, started, time.perf_counter() - started, 1)

    async def _call(self, items: list[Item]) -> list[Result]:
        """``run_batch`` in the executor, in batches of at most ``max_batch_size`` (more than one only
        for a group larger than that, which runs alone)."""
        loop = asyncio.get_running_loop()
        results: list[Result] = []
        for at in range(0, len(items), self.max_batch_size):
            chunk = items[at : at + self.max_batch_size]
            started = time.perf_counter()
            results += await loop.run_in_executor(self.executor, self._checked_run, chunk)
            if self.on_batch is not None:
                self.on_batch(len(chunk), time.perf_counter() - started)
        return results

    @staticmethod
    def _answer(
        pending: _Pending[Item, Result], results: list[Result], started: float, elapsed: float, size: int
    ) -> None:
        pending.timings.queue_wait_s = started - pending.enqueued
        pending.timings.inference_s = elapsed
        pending.timings.batch_size = size
        if not pending.future.done():
            pending.future.set_result(results)

    @staticmethod
    def _fail(pending: _Pending[Item, Result], error: Exception, started: float) -> None:
        pending.timings.queue_wait_s = started - pending.enqueued
        if not pending.future.done():
            pending.future.set_exception(error)

    def _checked_run(self, items: list[Item]) -> Sequence[Result]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results
