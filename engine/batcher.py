"""Dynamic batching with admission, deadlines and cancellation: concurrent requests of one model
share one runtime call, and no call computes an answer nobody waits for.

Requests wait in a bounded queue; a worker task takes one, gathers more for up to ``max_wait_s``
(only while more requests are known to be on their way, so a lone request does not pay the wait)
or until ``max_batch_size``, and runs the batch in ``executor``, off the event loop. Each request's
future gets its own row of the result. With ``workers`` > 1 that many runtime calls run at once
(the runtime must allow it): one worker gathers at a time, so while one batch runs the next one
fills, and each call can run on its own core (on a few cores, two one-thread calls side by side do
more than one two-thread call, and a call slowed by a busy core does not stall the other).

**Admission** (``incoming``, ``check_admission``). A request is refused at once (``Overloaded``,
with the seconds after which a retry could be taken) when ``max_queue`` requests are already
admitted, or when it could not be answered by its deadline: the queue holds only what can be
answered in time. It would start once it has reached the queue (its way there, from admission: the
body's arrival, parsing, preprocessing, a moving average) and the rows ahead of it are done,
whichever is later, and be answered when that call ends (a moving average of call lengths). The
rows ahead take the measured seconds per row of the queue (a moving average of what recent calls
cost it: when calls ran back to back, the time between their ends, so the gathering, the hand-offs
and a busy machine count), plus what is left of the running call when every worker is busy.

**Sustained overload** (``overload_wait_s``, CoDel's idea applied to admission). A burst may fill
the queue up to what its requests' deadlines allow; but once the queue has not emptied for
``overload_after_s`` (every batch started with requests still waiting) and callers gave up on it
meanwhile (a deadline passed or would have, a caller went away), demand exceeds what the model can
do for callers this impatient, and a queue that deep only makes every answer late: then a request
is admitted only while the expected wait is at most ``overload_wait_s`` (and at least one call's
length: the rows that keep every worker busy until the next batch). Answers stay fast, the work
goes to callers who are still there, and the others are refused at once, with a ``Retry-After``,
instead of waiting out their patience. Patient callers (a closed loop of more clients than a batch
holds) make a standing queue too, but none gives up: they keep their queue. The state has
hysteresis: its own admission empties the queue now and then, so it ends only at a batch that
leaves the queue empty when no request was refused for overload (``overload_wait_s``, or a full
queue) since the previous batch began, nor for ``overload_after_s``: under sustained overload it
holds, and the standing queue stays within ``overload_wait_s``.

**Deadlines.** A request may carry one (``time.monotonic()`` seconds). When the worker reaches a
request whose deadline has passed, or would pass before a call could end (a call's length: its
moving average plus two average deviations, as TCP bounds a round trip),
the request leaves the queue with ``DeadlineExceeded`` and the model never sees it; a caller whose
deadline passes while it waits gets ``DeadlineExceeded`` too. The estimates (the way to the queue,
a call's length) are learned from the requests that get through: when the model is idle (nothing
queued, on its way or running) they may be stale, from a busier moment, and refusing on them would
let none through to renew them, so an idle model admits a request whose deadline has not passed
yet, and runs it when nothing else waits (a predicted miss leaves the queue only while the model's
time is wanted by others).

**Cancellation.** A caller that is cancelled while its request waits (the HTTP layer cancels the
requests of clients that disconnect) takes the request out of the queue: its rows never reach the
model. Rows computed for a caller that went away while its batch ran are counted as abandoned.

**Order** (``order``). ``fifo`` serves the oldest first. ``adaptive`` serves the oldest first until
the oldest live request has waited ``lifo_after_s``, then the newest first (adaptive LIFO, as in
Facebook's queueing of overloaded services): under sustained overload the requests answered are
the fresh ones, whose callers are still there, and the old ones meet their deadline or their
caller's patience and leave without costing a call.

A request may also be a group of items (``submit_group``: the entity pairs of one extraction): a
group is one entry in the queue, its items run in the same batch (never split across two, unless
the group alone is larger than ``max_batch_size``: then it runs in consecutive calls of
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
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from engine.errors import DeadlineExceeded, Overloaded, ShuttingDown

log = logging.getLogger("service.batcher")

Item = TypeVar("Item")
Result = TypeVar("Result")

QueueOrder = Literal["fifo", "adaptive"]
#: Why a request left the queue unanswered by the model (``on_drop``'s first argument).
DropReason = Literal["deadline", "cancelled"]

_QUEUED, _TAKEN, _DROPPED = "queued", "taken", "dropped"
# Weight of the newest call in the seconds-per-row average: about the last 10 calls count.
_SMOOTHING = 0.2


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
    deadline: float | None
    timings: BatchTimings = field(default_factory=BatchTimings)
    state: str = _QUEUED

    @property
    def rows(self) -> int:
        return len(self.items)


class Ticket:
    """An admitted request's place among those on their way to a batcher's queue (``Batcher.admit``);
    released once, by whoever is done with it first."""

    __slots__ = ("_batcher", "admitted")

    def __init__(self, batcher: Batcher):
        self._batcher: Batcher | None = batcher
        self.admitted = time.monotonic()

    def release(self, arrived: bool = False) -> None:
        """Gives the place back; ``arrived``: the request reached the queue (the batcher learns how
        long the way took)."""
        if self._batcher is not None:
            self._batcher._incoming -= 1
            if arrived:
                self._batcher._learn_way(time.monotonic() - self.admitted)
            self._batcher = None


class Batcher(Generic[Item, Result]):
    """Gathers submitted items into batches for ``run_batch`` (called in ``executor``).

    ``run_batch(items)`` must return one result per item, in order, for at most ``max_batch_size``
    items. When it raises on a batch of several items, each item is run again alone: an exception
    fails only the requests whose items raise it on their own.

    ``on_batch(rows, seconds)`` is called after each runtime call, ``on_drop(reason, rows)`` for each
    request that leaves the queue without reaching the model, ``on_abandoned(rows)`` for the rows of
    a call whose caller had gone when it ended.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        order: QueueOrder = "fifo",
        lifo_after_s: float = 0.1,
        workers: int = 1,
        overload_wait_s: float = 0.0,
        overload_after_s: float = 1.0,
        on_batch: Callable[[int, float], None] | None = None,
        on_drop: Callable[[DropReason, int], None] | None = None,
        on_abandoned: Callable[[int], None] | None = None,
        name: str = "batcher",
    ):
        if max_batch_size < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be at least 1")
        if order not in ("fifo", "adaptive"):
            raise ValueError(f"order must be 'fifo' or 'adaptive', not {order!r}")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.order = order
        self.lifo_after_s = lifo_after_s
        self.workers = workers
        self.overload_wait_s = overload_wait_s
        self.overload_after_s = overload_after_s
        self.on_batch = on_batch
        self.on_drop = on_drop
        self.on_abandoned = on_abandoned
        self.name = name
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._arrived: asyncio.Event | None = None
        self._gathering: asyncio.Lock | None = None  # one worker gathers at a time
        self._workers: list[asyncio.Task[None]] = []
        self._incoming = 0  # admitted requests being preprocessed: a batch may wait for them
        self._held: _Pending[Item, Result] | None = None  # did not fit the last batch: opens the next
        self._live_requests = 0  # queued (or held) and still awaited
        self._live_rows = 0
        self._call_seconds = 0.0  # moving average of a runtime call's length
        self._call_deviation = 0.0  # and of its distance from that average
        self._cost_seconds = 0.0  # moving averages of what calls cost the queue: seconds, and rows
        self._cost_rows = 0.0
        self._running: list[float] = []  # when each running call started
        self._way_seconds = 0.0  # moving average of the time from admission to the queue
        self._last_end = 0.0  # when the last call ended, and whether requests were waiting then
        self._backlogged = False
        self._standing_since: float | None = None  # since when every batch left requests waiting
        self._gave_up_at = -math.inf  # when a caller last gave up waiting (see ``overloaded``)
        self._overloaded_since: float | None = None  # the overload state (see the module's docstring)
        self._refused_at = -math.inf  # when a request was last refused for overload
        self._batch_began = -math.inf  # when the last batch began (its gathering ended)
        self._refusals = 0  # refused for overload in the current state, for its log line

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the workers on the running loop."""
        if self._workers:
            return
        self._arrived = asyncio.Event()
        self._gathering = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(), name=f"{self.name}-worker-{n}") for n in range(self.workers)
        ]

    async def stop(self) -> None:
        """Stops the workers; requests still queued fail with ``ShuttingDown``."""
        if not self._workers:
            return
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        waiting = [self._held] if self._held is not None else []
        self._held = None
        waiting += self._queue
        self._queue.clear()
        for pending in waiting:
            self._take(pending)
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown(f"{self.name} is shutting down"))

    @property
    def depth(self) -> int:
        """Requests waiting for a batch and still awaited (not counting the batch running now)."""
        return self._live_requests

    @property
    def alone(self) -> bool:
        """Whether the one request on its way to the queue (admitted, being preprocessed) is all there
        is: no other on its way, none queued, no call running."""
        return self._incoming == 1 and not self._live_requests and not self._running

    @property
    def seconds_per_row(self) -> float:
        """What a row has recently cost the queue, in seconds (0 before the first call): the time from
        the end of one call to the end of the next when they ran back to back (gathering, hand-offs
        and a starved thread included), else the call's own time shared among the workers, over its
        rows."""
        return self._cost_seconds / self._cost_rows if self._cost_rows else 0.0

    @property
    def _call_bound(self) -> float:
        """How long a call may take, for deadlines: the average and two average deviations (as TCP
        bounds a round trip), so that a call a little longer than most still ends in time."""
        return self._call_seconds + 2 * self._call_deviation

    @property
    def overloaded(self) -> bool:
        """Whether the overload state holds: it began once the queue had been standing (never emptied)
        for ``overload_after_s`` and callers gave up on it meanwhile, and ends as the module's
        docstring says."""
        if self._overloaded_since is None and self._standing_long(time.monotonic()):
            self._overloaded_since = time.monotonic()
            self._refusals = 0
            log.info(
                "%s: overloaded (callers give up on a queue standing for %.1f s): admitting only "
                "expected waits up to %.0f ms",
                self.name,
                self.overload_after_s,
                max(self.overload_wait_s, self._call_seconds) * 1000,
            )
        return self._overloaded_since is not None

    def _standing_long(self, now: float) -> bool:
        return (
            self.overload_wait_s > 0
            and self._standing_since is not None
            and self._gave_up_at >= self._standing_since
            and now - self._standing_since >= self.overload_after_s
        )

    def _refused(self, now: float) -> None:
        """A request was refused for overload: the overload state goes on (see ``_batch_begins``)."""
        self._refused_at = now
        self._refusals += 1

    def _batch_begins(self) -> None:
        """At each batch: the queue standing or not, and the overload state's end (hysteresis)."""
        now, previous = time.monotonic(), self._batch_began
        self._batch_began = now
        if self._live_requests:
            if self._standing_since is None:
                self._standing_since = now
            return
        self._standing_since = None
        if (
            self._overloaded_since is not None
            and self._refused_at < previous
            and now - self._refused_at >= self.overload_after_s
        ):
            log.info(
                "%s: no longer overloaded, after %.1f s (%d requests refused for it)",
                self.name,
                now - self._overloaded_since,
                self._refusals,
            )
            self._overloaded_since = None

    def _gave_up(self) -> None:
        """A caller gave up on the queue: its deadline passed or would have, or it went away."""
        self._gave_up_at = time.monotonic()

    # -- admission --------------------------------------------------------------------------
    def expected_wait_s(self, now: float | None = None) -> float:
        """Seconds until a request admitted now would start: the rows ahead of it (queued, and one per
        admitted request on its way to the queue) at the recent seconds per row, plus what is left of
        the running call."""
        now = time.monotonic() if now is None else now
        wait = (self._live_rows + self._incoming) * self.seconds_per_row
        if len(self._running) >= self.workers:  # every worker busy: the first to finish takes it
            wait += max(0.0, min(self._running) + self._call_seconds - now)
        return wait

    def check_admission(self, deadline: float | None = None) -> None:
        """``Overloaded`` if a request with ``deadline`` would be refused now (see ``admit``)."""
        now = time.monotonic()
        if self._incoming + self.depth >= self.max_queue:
            self._refused(now)
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue} requests waiting)",
                self._retry_after(now),
            )
        if deadline is None and not self.overloaded:
            return
        wait = self.expected_wait_s(now)
        if self.overloaded:
            limit = max(self.overload_wait_s, self._call_seconds)
            if wait > limit:
                self._refused(now)
                raise Overloaded(
                    f"the {self.name} is overloaded: its queue would make the request wait about "
                    f"{wait:.2f} s",
                    self._retry_after(now),
                )
        # It starts once it has reached the queue (the body, parsing, preprocessing: ``way_seconds``)
        # and the rows ahead are done, whichever is later; its answer comes when that call ends. An
        # idle model takes it all the same (see the module's docstring: stale estimates).
        idle = not (self._running or self._live_requests or self._incoming)
        if deadline is not None and (
            deadline <= now or (not idle and now + max(wait, self._way_seconds) + self._call_bound > deadline)
        ):
            self._gave_up()
            raise Overloaded(
                f"the {self.name} queue would make the request wait about {wait:.2f} s, past its "
                f"deadline in {max(0.0, deadline - now):.2f} s",
                self._retry_after(now),
            )

    def _retry_after(self, now: float) -> float:
        """Whole seconds after which to retry: those the queue needs to drain as it stands (at least
        one), up to twice that at random, so that the callers refused in one moment do not all come
        back in the same second."""
        drain = max(1, math.ceil(self.expected_wait_s(now)))
        return float(drain + int(random.random() * (drain + 1)))  # randint(drain, 2 * drain), cheaper

    def admit(self, deadline: float | None = None) -> Ticket:
        """Admits a request on its way to the queue (``Overloaded`` when refused: see
        ``check_admission``): until its ticket is released, it counts among the rows ahead of later
        requests, and a forming batch may wait for it. Admitted requests (on their way or queued)
        never exceed ``max_queue``, so neither the preprocessing pool nor the queue can grow without
        bound. A front end may admit a request before reading its body, then hand the ticket to the
        call (``incoming``)."""
        self.check_admission(deadline)
        self._incoming += 1
        return Ticket(self)

    @contextlib.contextmanager
    def incoming(self, deadline: float | None = None, ticket: Ticket | None = None) -> Iterator[None]:
        """Inside, the request is admitted and being preprocessed (``ticket``: admitted already, by
        ``admit``; else admitted now); its ticket is released on leaving."""
        ticket = ticket or self.admit(deadline)
        arrived = False
        try:
            yield
            arrived = True
        finally:
            ticket.release(arrived)

    # -- requests ---------------------------------------------------------------------------
    async def submit(self, item: Item, deadline: float | None = None) -> tuple[Result, BatchTimings]:
        """The item's result once its batch has run (see ``submit_group``)."""
        results, timings = await self.submit_group([item], deadline)
        return results[0], timings

    async def submit_group(
        self, items: Sequence[Item], deadline: float | None = None
    ) -> tuple[list[Result], BatchTimings]:
        """The results of ``items``, one request run in one batch (see the module's docstring), in order.

        ``deadline`` (``time.monotonic()`` seconds): ``DeadlineExceeded`` once it passes without an
        answer; the request then never reaches the model unless its batch had started. Cancelling
        the caller takes the request out of the queue the same way.
        """
        if not items:
            raise ValueError("submit_group needs at least one item")
        if not self._workers or self._arrived is None:
            raise ShuttingDown(f"{self.name} is not running")
        now = time.monotonic()
        if self._live_requests >= self.max_queue:
            self._refused(now)
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue} requests waiting)", self._retry_after(now)
            )
        if len(self._queue) > 2 * self.max_queue:  # entries left by callers that went: sweep them
            self._queue = deque(p for p in self._queue if p.state == _QUEUED)
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        pending = _Pending(list(items), future, now, deadline)
        self._queue.append(pending)
        self._live_requests += 1
        self._live_rows += pending.rows
        future.add_done_callback(lambda _: self._left_queue(pending))
        self._arrived.set()
        if deadline is None:
            results = await future
        else:
            try:
                results = await asyncio.wait_for(future, max(0.0, deadline - now))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"no answer within the request's deadline ({deadline - now:.3g} s)"
                ) from None
        return results, pending.timings

    def _left_queue(self, pending: _Pending[Item, Result]) -> None:
        """A request's future is done: if it was still queued, it leaves the counts (and is dropped)."""
        if pending.state != _QUEUED:
            return
        self._take(pending)
        pending.state = _DROPPED
        if pending.future.cancelled():
            self._dropped(pending)

    def _dropped(self, pending: _Pending[Item, Result]) -> None:
        """Counts a request whose caller stopped waiting before the model ran it: at its deadline, or
        cancelled."""
        self._gave_up()
        if self.on_drop is not None:
            late = pending.deadline is not None and time.monotonic() >= pending.deadline
            self.on_drop("deadline" if late else "cancelled", pending.rows)

    def _take(self, pending: _Pending[Item, Result]) -> None:
        if pending.state == _QUEUED:
            pending.state = _TAKEN
            self._live_requests -= 1
            self._live_rows -= pending.rows

    # -- the worker -------------------------------------------------------------------------
    def _pop(self) -> _Pending[Item, Result] | None:
        """The next live request by the queue's order, or None; drops what can no longer be answered
        in time (``DeadlineExceeded``) and what nobody awaits any more."""
        while self._queue:
            if not self._live(self._queue[0]):
                self._queue.popleft()
                continue
            now = time.monotonic()
            newest_first = self.order == "adaptive" and now - self._queue[0].enqueued > self.lifo_after_s
            pending = self._queue.pop() if newest_first else self._queue.popleft()
            if not self._live(pending):
                continue
            # A predicted miss leaves only while the model's time is wanted by others (a call runs,
            # or more wait); an idle model runs it (its estimate may be stale: module docstring).
            contested = self._running or self._live_requests > 1
            ahead = self._call_bound if contested else 0.0
            if pending.deadline is not None and pending.deadline < now + ahead:
                self._take(pending)
                pending.state = _DROPPED
                self._gave_up()
                if self.on_drop is not None:
                    self.on_drop("deadline", pending.rows)
                pending.future.set_exception(
                    DeadlineExceeded("the request's deadline would pass before a model call could end")
                )
                continue
            self._take(pending)
            return pending
        return None

    def _live(self, pending: _Pending[Item, Result]) -> bool:
        """Whether a queued request is still awaited. A future cancelled a moment ago runs its done
        callback later (``call_soon``): it is taken out of the counts here already."""
        if pending.state == _QUEUED and pending.future.done():
            self._left_queue(pending)
        return pending.state == _QUEUED

    async def _next(self, timeout: float | None = None) -> _Pending[Item, Result] | None:
        """The next live request, waiting for one up to ``timeout`` (None: forever)."""
        assert self._arrived is not None
        while True:
            pending = self._pop()
            if pending is not None:
                return pending
            self._arrived.clear()
            if timeout is None:
                await self._arrived.wait()
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return None
            timeout = 0.0  # arrived: take it if it is live, else stop waiting

    async def _gather(self) -> list[_Pending[Item, Result]]:
        loop = asyncio.get_running_loop()
        first, self._held = self._held, None
        if first is not None and self._live(first):
            self._take(first)
        else:
            first = await self._next()
            assert first is not None
        batch = [first]
        rows = first.rows
        deadline = loop.time() + self.max_wait_s
        try:
            while rows < self.max_batch_size:
                pending = self._pop()
                if pending is None:
                    # Nothing queued: wait only if a request is being preprocessed and time is left.
                    remaining = deadline - loop.time()
                    if self._incoming == 0 or remaining <= 0:
                        break
                    pending = await self._next(remaining)
                    if pending is None:
                        break
                if rows + pending.rows > self.max_batch_size:
                    # A request is never split across batches: it opens the next one (and is counted
                    # as waiting until then).
                    self._held = pending
                    pending.state = _QUEUED
                    self._live_requests += 1
                    self._live_rows += pending.rows
                    break
                batch.append(pending)
                rows += pending.rows
        except asyncio.CancelledError:  # stopping: the requests taken off the queue fail too
            for taken in batch:
                if not taken.future.done():
                    taken.future.set_exception(ShuttingDown(f"{self.name} is shutting down"))
            raise
        return batch

    async def _work(self) -> None:
        while True:
            try:
                await self._one_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not stop every later request
                log.exception("%s: the worker failed on a batch; it goes on with the next", self.name)

    async def _one_batch(self) -> None:
        assert self._gathering is not None
        async with self._gathering:
            batch = await self._gather()
        self._batch_begins()
        # Callers that went away while the batch formed are not computed for.
        live = [p for p in batch if not p.future.done()]
        for pending in batch:
            if pending.future.cancelled():
                self._dropped(pending)
        if not live:
            return
        try:
            await self._run(live)
        except asyncio.CancelledError:
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(ShuttingDown(f"{self.name} is shutting down"))
            raise

    async def _run(self, live: list[_Pending[Item, Result]]) -> None:
        """Runs ``live`` as one batch; if that raises, each item alone (only the failing requests fail)."""
        started = time.monotonic()
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
        elapsed = time.monotonic() - started
        batch_size = min(len(items), self.max_batch_size)
        at = 0
        for pending in live:
            self._answer(pending, list(results[at : at + pending.rows]), started, elapsed, batch_size)
            at += pending.rows

    async def _one_at_a_time(self, pending: _Pending[Item, Result]) -> None:
        """A request of a failed batch, its items run alone: its answers, or the first exception."""
        started = time.monotonic()
        results: list[Result] = []
        try:
            for item in pending.items:
                results += await self._call([item])
        except Exception as error:  # noqa: BLE001 - this request's own failure
            self._fail(pending, error, started)
            return
        self._answer(pending, results, started, time.monotonic() - started, 1)

    async def _call(self, items: list[Item]) -> list[Result]:
        """``run_batch`` in the executor, in batches of at most ``max_batch_size`` (more than one only
        for a group larger than that, which runs alone)."""
        loop = asyncio.get_running_loop()
        results: list[Result] = []
        for at in range(0, len(items), self.max_batch_size):
            chunk = items[at : at + self.max_batch_size]
            started = time.monotonic()
            self._running.append(started)
            try:
                results += await loop.run_in_executor(self.executor, self._checked_run, chunk)
            finally:
                ended = time.monotonic()
                self._running.remove(started)
            seconds = ended - started
            # Back to back (requests were waiting when the last call ended): the whole interval is
            # what the queue paid for these rows; else the call itself, shared among the workers.
            if self._backlogged:
                cost = max(ended - self._last_end, seconds / self.workers)
            else:
                cost = seconds / self.workers
            self._last_end, self._backlogged = ended, self._live_requests + self._incoming > 0
            self._learn(len(chunk), seconds, cost)
            if self.on_batch is not None:
                self.on_batch(len(chunk), seconds)
        return results

    def _learn_way(self, seconds: float) -> None:
        self._way_seconds += _SMOOTHING * (seconds - self._way_seconds)

    def _learn(self, rows: int, seconds: float, cost: float) -> None:
        if not self._cost_rows:
            self._call_seconds, self._cost_seconds, self._cost_rows = seconds, cost, float(rows)
            return
        self._call_deviation += _SMOOTHING * (abs(seconds - self._call_seconds) - self._call_deviation)
        self._call_seconds += _SMOOTHING * (seconds - self._call_seconds)
        self._cost_seconds += _SMOOTHING * (cost - self._cost_seconds)
        self._cost_rows += _SMOOTHING * (rows - self._cost_rows)

    def _answer(
        self,
        pending: _Pending[Item, Result],
        results: list[Result],
        started: float,
        elapsed: float,
        size: int,
    ) -> None:
        pending.timings.queue_wait_s = started - pending.enqueued
        pending.timings.inference_s = elapsed
        pending.timings.batch_size = size
        if not pending.future.done():
            pending.future.set_result(results)
            return
        self._gave_up()
        if self.on_abandoned is not None:
            self.on_abandoned(pending.rows)

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
