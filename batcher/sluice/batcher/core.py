"""The Batcher: admits requests, forms batches in one dispatcher task, and runs them on model instances.

Flow: `submit` validates and queues a `Pending` carrying its own future (or, when an instance is free,
nothing is queued and the policy would not wait, runs it alone at once in the caller's task); the
dispatcher sleeps until the first request arrives, asks the policy how long to wait for company (waking
early on arrivals), then *collects* a batch from the queue and *runs* it in its own task on a free
instance, so the next batch forms while this one runs. Everything is timed with time.monotonic().
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from sluice.batcher.batch import Batch, _set_exception_if_pending
from sluice.batcher.config import BatcherConfig
from sluice.batcher.errors import (
    BatcherClosedError,
    BatchInputError,
    BatchTooLargeError,
    DeadlineExpiredError,
    ModelRunError,
    OutputMismatchError,
    QueueFullError,
)
from sluice.batcher.observer import BatchObserver, NullObserver, RunObserver, RunTimes
from sluice.batcher.pending import DROPPED, NO_LENGTHS, TAKEN, Array, Arrays, GroupKey, Pending, PendingQueue
from sluice.batcher.policy import CostCurve, Estimates, LoadModel, make_policy
from sluice.batcher.sparse import CooArray
from sluice.batcher.timer import WakeTimer, early_by

RunFn = Callable[[int, dict[str, Array]], Awaitable[Mapping[str, Array]]]
"""(instance index, batched inputs) -> batched outputs, one row per input row."""

LingerFn = Callable[[int], "asyncio.Future[Any] | None"]
"""(instance index) -> None, or a future that ends when that instance's cancelled run has really stopped."""

AtOnceFn = Callable[[Arrays], bool]
"""(a request's inputs) -> whether a run of them alone ends without `run` suspending (it computes on the
event loop). It must agree with `run` for the same inputs for the batcher's whole life: a run it calls at
once that does suspend keeps its caller waiting past the deadline, until the run ends."""

log = logging.getLogger("sluice.batcher")

LIMIT_SETTLED = 16
"""Batches a new batch limit must hold before it is logged: the log says where the curve settled, not
each step of its climb."""
LIMIT_LOG_EVERY = 10.0
"""Seconds between two log lines about the batch limit."""
SPIN_MAX = 0.5e-3
"""Waits for company this short are not timed: the dispatcher looks again on the loop's next turn. Under
uvloop that is what such a delay got anyway, and at 8 closed-loop digits callers it served ~10% more than
sleeping on a precise timer for the same wait (benchmarks/RESULTS.md, wave 2, tenth session)."""


class Batcher:
    """Batches the requests of one model and runs them on `config.instances` concurrent instances."""

    def __init__(
        self,
        run: RunFn,
        config: BatcherConfig,
        *,
        name: str = "model",
        observer: BatchObserver | None = None,
        pressure: Callable[[], float] | None = None,
        curve: CostCurve | None = None,
        lingering: LingerFn | None = None,
        at_once: AtOnceFn | None = None,
        crowded: Callable[[], bool] | None = None,
    ) -> None:
        """`pressure`, when given, returns the busy fraction (0..1) of the event loop the batcher runs on;
        the adaptive policy batches harder while it is saturated. It is called on the loop's thread.

        `crowded`, when given, says whether several callers are sending (the server sees their calls
        overlap), whatever this model's queue shows. On a saturated loop the adaptive policy then takes a
        wait that gathered nobody for a wait too short, not for a lone caller: it does not back off.

        `curve`, when given, is the cost curve the adaptive policy starts from and feeds (one measured
        before, or a test's); by default it starts empty.

        `lingering`, when given, is asked after a run of an instance was cancelled (its caller left, or a
        drain ran out of time) whether the work goes on regardless, as a run in a worker thread does: it
        returns a future that ends when it stops, and until then the instance stays busy, so `run` is still
        called at most once at a time per instance.

        `at_once`, when given, says whether a run of a request's inputs alone ends without `run`
        suspending (it computes on the event loop; see AtOnceFn). No timer could fire during such a run, so
        a request that runs alone at once is not given one for its deadline: it is checked when the run
        ends. Queued requests keep theirs."""
        self._run = run
        self._at_once = at_once
        self._lingering = lingering
        self._config = config
        self._name = name
        self._observer: BatchObserver = observer if observer is not None else NullObserver()
        # Checked once here, so a batcher without one pays nothing per request for it.
        self._timed: RunObserver | None = observer if isinstance(observer, RunObserver) else None
        self._load = LoadModel()
        self._policy = make_policy(config, self._load, pressure, curve, crowded)
        self._logged_limit = config.max_batch_size  # the batch limit in rows last logged
        self._next_limit_log = 0.0
        self._limit_seen = config.max_batch_size  # the limit of the last batch collected,
        self._limit_held = 0  # and for how many batches since it moved
        self._pad = config.pad
        self._crop = config.crop
        self._queue = PendingQueue()
        self._seq = itertools.count()
        # Free instance indexes, a heap: a batch gets the lowest, so one that runs alone is always instance 0
        # (a runtime may run it differently, see the onnx runtime's elastic threads).
        self._free = list(range(config.instances))
        self._tasks: set[asyncio.Task[None]] = set()
        # Callers running their own single-request batch (see _run_alone), and those drain() cut short.
        self._callers_running: dict[asyncio.Task[Any], Pending] = {}
        self._aborted: set[Pending] = set()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._turned = False  # the last wakeup was a polling turn's (see `_wait`)
        self._timer: WakeTimer | None = None  # made by start() if it may wait; closed with the dispatcher
        # Admissions wake the dispatcher only once the queue reaches this many rows: under saturation
        # (every instance busy) it is sys.maxsize, so arrivals cost no wakeup at all.
        self._wake_rows = 1
        self._idle = asyncio.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._late = 0.0
        self._dispatcher: asyncio.Task[None] | None = None

    # -- public surface -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> BatcherConfig:
        return self._config

    @property
    def queue_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._queue.rows

    @property
    def in_flight(self) -> int:
        """Rows in batches that are running."""
        return self._in_flight

    @property
    def busy(self) -> int:
        """Batches running (instances in use)."""
        return self._config.instances - len(self._free)

    @property
    def batch_limit(self) -> int:
        """Most rows the next batch may take (the adaptive policy's cost-curve limit, else max_batch_size)."""
        return self._policy.limit_rows

    @property
    def wait_cap(self) -> float:
        """Longest wait for company while the event loop is saturated, in seconds: the adaptive policy's
        measured cap (see sluice.batcher.policy), max_delay for a fixed window, 0 without batching."""
        return self._policy.wait_cap

    @property
    def estimates(self) -> Estimates:
        """The measured run-time model and load, the batch size they call for, and the batch limit the
        cost curve sets."""
        return self._policy.estimates(time.monotonic())

    def start(self) -> None:
        """Starts the dispatcher task; call once, inside the running event loop that will submit."""
        if self._dispatcher is not None:
            raise RuntimeError(f"batcher for model '{self._name}' is already started")
        self._loop = asyncio.get_running_loop()
        self._late = early_by(self._loop)  # a deadline's timer never fires before the deadline
        if not self._policy.single_request:
            # Made now, not at the first wait: a batcher holds the same descriptors from start to drain.
            self._timer = WakeTimer(self._loop, self._wakeup.set)
        self._dispatcher = self._loop.create_task(self._dispatch(), name=f"sluice-batcher-{self._name}")
        self._dispatcher.add_done_callback(self._on_dispatcher_done)

    async def submit(
        self, inputs: Arrays, *, priority: int = 0, deadline: float | None = None
    ) -> dict[str, Array]:
        """Runs `inputs` (rows on axis 0) in some batch and returns this request's rows of the outputs.

        `deadline` is an absolute time.monotonic() value: past it the caller gets DeadlineExpiredError,
        whether the request is still queued (it is removed and never runs) or already running (the
        result is discarded).
        """
        item, alone, untimed = self._admit(inputs, priority, deadline)
        timer: asyncio.TimerHandle | None = None
        task: asyncio.Task[Any] | None = None
        entered = 0
        if deadline is not None and not untimed:
            # A timer that cancels this task at the deadline, told apart from other cancellations by
            # `item.expired`: asyncio.timeout does the same at twice the cost, on every request.
            assert self._loop is not None
            task = asyncio.current_task()
            entered = 0 if task is None else task.cancelling()
            timer = self._loop.call_later(deadline - time.monotonic() + self._late, self._expire, item, task)
        try:
            result = await (self._run_alone(item) if alone else self._answer(item))
            if deadline is not None and not item.expired and (now := time.monotonic()) > deadline:
                # The deadline passed while the batch ran on the event loop, where its timer could not fire.
                raise DeadlineExpiredError(
                    f"model '{self._name}': deadline expired after {(now - item.arrival) * 1e3:.1f} ms "
                    "while its batch ran (the result is discarded)"
                )
            if self._timed is not None and item.ran is not None:
                self._timed.on_answer(item.rows, item.ran.started - item.arrival, item.ran)
            return result
        except asyncio.CancelledError:
            if item.expired and task is not None:
                item.expired = False  # its cancellation is taken back here, once
                if task.uncancel() <= entered:  # the deadline's alone, not the caller's too
                    return self._expired(item)
            task = asyncio.current_task()
            if item in self._aborted:
                # drain() cancelled this caller's own run when the grace ran out: a shutdown, not a caller
                # leaving, so the caller hears it as one.
                self._aborted.discard(item)
                if task is not None:
                    task.uncancel()
                item.future.exception()
                raise BatcherClosedError(
                    f"model '{self._name}': shut down before the request finished (drain grace ran out)"
                ) from None
            if not self._abandon(item, "cancelled") and item.future.done() and not item.future.cancelled():
                item.future.exception()  # answered as the caller left: mark it read, or asyncio logs it
            raise
        finally:
            if timer is not None:
                timer.cancel()
                if item.expired and task is not None:
                    # The deadline cancelled this task, but what it awaited swallowed the cancellation (a
                    # run function that ignores it) and the answer came: take the cancellation back.
                    task.uncancel()

    @staticmethod
    def _expire(item: Pending, task: asyncio.Task[Any] | None) -> None:
        """The deadline passed: a caller still waiting for its answer stops waiting (see `_expired`)."""
        if not item.future.done() and task is not None:
            item.expired = True
            task.cancel()

    def _expired(self, item: Pending) -> dict[str, Array]:
        """What a caller whose deadline passed gets: its answer if it came in the same instant, else
        DeadlineExpiredError saying where the request was."""
        future = item.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._answered(item)
            return future.result()
        queued = self._abandon(item, "deadline") or item.state == DROPPED
        where = "in the queue" if queued else "while its batch ran (the result is discarded)"
        waited = (time.monotonic() - item.arrival) * 1e3
        raise DeadlineExpiredError(
            f"model '{self._name}': deadline expired after {waited:.1f} ms {where}"
        ) from None

    def _answered(self, item: Pending) -> None:
        timed, ran = self._timed, item.ran
        if timed is not None and ran is not None:
            timed.on_answer(item.rows, ran.started - item.arrival, ran)

    async def _answer(self, item: Pending) -> dict[str, Array]:
        """A queued request's answer, from the batch the dispatcher puts it in."""
        if self._queue.rows >= self._wake_rows:
            self._wakeup.set()
        return await item.future

    async def _run_alone(self, item: Pending) -> dict[str, Array]:
        """Runs a request that was never queued (see `_admit`) alone, in the caller's own task: that saves
        the dispatcher's turn of the event loop and a task. Only this caller is in the batch, so only this
        caller is affected if it is cancelled."""
        batch = Batch([item])
        task = asyncio.current_task()
        assert task is not None
        self._callers_running[task] = item
        try:
            await self._run_batch(batch, self._start(batch, item))
        finally:
            del self._callers_running[task]
        return await item.future

    async def drain(self, grace: float) -> None:
        """Stops admitting, runs what is queued and in flight for up to `grace` seconds, fails the rest.

        On return nothing is queued and no batch task is left; runs still executing in a worker thread
        cannot be stopped, they are only no longer waited for.
        """
        if not self._closing:
            self._closing = True
            self._wakeup.set()  # the dispatcher stops waiting for company
        self._check_idle()
        if not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(grace, 0.0)):
                    await self._idle.wait()
        now = time.monotonic()
        for item in self._queue.clear():
            _set_exception_if_pending(
                item.future,
                BatcherClosedError(
                    f"model '{self._name}': shut down before the request ran "
                    f"(drain grace of {grace:g} s ran out)"
                ),
            )
            self._observer.on_drop("shutdown", now - item.arrival)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()  # members fail with BatcherClosedError in _run_batch
        for task, item in list(self._callers_running.items()):
            self._aborted.add(item)
            task.cancel()
            tasks.append(task)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            tasks.append(self._dispatcher)
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                # Reading a cancelled task's outcome lets go of its CancelledError, whose traceback would
                # otherwise keep this batcher (and the model behind it) alive on CPython 3.11.
                with contextlib.suppress(asyncio.CancelledError):
                    task.exception()

    # -- admission -------------------------------------------------------------------------------------

    def _admit(self, inputs: Arrays, priority: int, deadline: float | None) -> tuple[Pending, bool, bool]:
        """The request; whether it runs alone at once instead of being queued (an instance is free,
        nothing else is queued so the dispatcher is not gathering a batch, and the policy would not
        wait); and whether its deadline needs no timer (it is such a run, with a deadline, and `at_once`
        says it cannot suspend)."""
        if self._closing:
            self._observer.on_reject("closed", 0)
            raise BatcherClosedError(
                f"model '{self._name}': the batcher is shutting down, not accepting requests"
            )
        if self._loop is None:
            raise RuntimeError(f"batcher for model '{self._name}' is not started; call start() first")
        rows, key, lengths = self._describe(inputs)
        config = self._config
        if rows > config.max_batch_size:
            self._observer.on_reject("too_large", rows)
            raise BatchTooLargeError(
                f"model '{self._name}': request has {rows} rows, more than max_batch_size="
                f"{config.max_batch_size}; send at most {config.max_batch_size} rows per request"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._observer.on_drop("deadline", 0.0)
            raise DeadlineExpiredError(
                f"model '{self._name}': deadline already passed {(now - deadline) * 1e3:.1f} ms before submit"
            )
        queue = self._queue
        if queue.rows + rows > config.max_queue_rows:
            self._observer.on_reject("queue_full", rows)
            raise QueueFullError(
                f"model '{self._name}': queue full ({queue.rows} rows queued, {rows} more requested, "
                f"limit max_queue_rows={config.max_queue_rows})"
            )
        free = bool(self._free) and not queue.rows
        # Asked before anything is recorded, so that a hook that raises leaves nothing half-admitted.
        untimed = free and deadline is not None and self._at_once is not None and self._at_once(inputs)
        item = Pending(
            inputs, rows, priority, next(self._seq), now, deadline, key, lengths, self._loop.create_future()
        )
        self._load.on_arrival(rows, now)
        if free and self._policy.plan(rows, 0.0, now)[0] <= 0:
            item.state = TAKEN
            self._observer.on_enqueue(rows, rows)
            return item, True, untimed
        queue.push(item)
        self._observer.on_enqueue(rows, queue.rows)
        return item, False, False

    def _describe(self, inputs: Arrays) -> tuple[int, GroupKey, Mapping[str, int]]:
        """Rows, group key and padded lengths of a request; raises BatchInputError if it cannot batch."""
        if not inputs:
            raise BatchInputError(f"model '{self._name}': the request has no inputs")
        pad = self._pad
        if len(inputs) == 1 and not pad:
            # The usual request: one dense input and nothing padded.
            ((name, array),) = inputs.items()
            if type(array) is np.ndarray and array.ndim and array.shape[0]:
                return array.shape[0], ((name, array.dtype.str, array.shape[1:]),), NO_LENGTHS
        lengths: dict[str, int] | None = {} if pad else None
        rows = -1
        first = ""
        key: list[tuple[str, str, tuple[int | None, ...]]] = []
        for name in sorted(inputs):
            array = inputs[name]
            if not isinstance(array, np.ndarray | CooArray):
                raise BatchInputError(
                    f"model '{self._name}': input '{name}' is a {type(array).__name__}, not a numpy array"
                )
            shape = array.shape
            if not shape:
                raise BatchInputError(
                    f"model '{self._name}': input '{name}' is a scalar; "
                    "every input needs a leading batch axis"
                )
            if rows < 0:
                rows, first = shape[0], name
            elif shape[0] != rows:
                raise BatchInputError(
                    f"model '{self._name}': inputs disagree on the batch dimension: "
                    f"'{first}' has {rows} rows, '{name}' has {shape[0]}"
                )
            specs = pad.get(name) if lengths is not None else None
            if specs is None or isinstance(array, CooArray):
                key.append(
                    (
                        name,
                        "coo" + array.dtype.str if isinstance(array, CooArray) else array.dtype.str,
                        shape[1:],
                    )
                )
                continue
            assert lengths is not None
            tail: list[int | None] = list(shape[1:])
            for spec in specs:
                if spec.axis >= len(shape):
                    raise BatchInputError(
                        f"model '{self._name}': input '{name}' has rank {len(shape)}, but padding axis "
                        f"{spec.axis} (dim '{spec.dim}') needs rank >= {spec.axis + 1}"
                    )
                length = shape[spec.axis]
                known = lengths.setdefault(spec.dim, length)
                if known != length:
                    raise BatchInputError(
                        f"model '{self._name}': inputs disagree on dim '{spec.dim}': length {known} "
                        f"elsewhere, {length} on axis {spec.axis} of '{name}'"
                    )
                tail[spec.axis - 1] = None
            key.append((name, array.dtype.str, tuple(tail)))
        if rows == 0:
            raise BatchInputError(f"model '{self._name}': the request has 0 rows")
        return rows, tuple(key), lengths or NO_LENGTHS

    def _abandon(self, item: Pending, reason: str) -> bool:
        """The caller stopped waiting: a still-queued request leaves the queue (and its rows) now."""
        if not self._queue.discard(item):
            return False
        self._observer.on_drop(reason, time.monotonic() - item.arrival)
        self._check_idle()
        return True

    # -- dispatch --------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        queue = self._queue
        policy = self._policy
        while True:
            if not self._free:
                self._wake_rows = sys.maxsize  # only a finished batch can change anything
                await self._wait()
                continue
            head = queue.head()
            if head is None:
                policy.wait_abandoned()
                self._wake_rows = 1
                await self._wait()
                continue
            if not self._closing:
                now = time.monotonic()
                queued = queue.group_rows(head.key)
                wait, enough = policy.plan(queued, now - head.arrival, now)
                if wait > 0:
                    # Any admission counts towards `enough` (conservative when groups differ).
                    self._wake_rows = queue.rows + enough - queued
                    policy.wait_began(queued)
                    await self._wait(wait)
                    continue
            batch = self._collect(head)
            if batch is None:
                policy.wait_abandoned()
                self._check_idle()
            elif self._config.instances == 1:
                # No other batch could start before this one ends, so run it here: no task, no wakeup.
                await self._run_batch(batch, self._start(batch, head))
            else:
                self._spawn(batch, head)

    async def _wait(self, limit: float | None = None) -> None:
        # Cleared here, right before sleeping (and between the turns of a polled wait, after checking
        # what could have set it): the caller checked the state with no await since, so no wakeup is lost.
        self._wakeup.clear()
        if limit is None:
            await self._wakeup.wait()
            return
        assert self._loop is not None
        if limit <= SPIN_MAX:
            # Not timed: the dispatcher looks again after each of the loop's turns, which read what has
            # arrived meanwhile (what uvloop does with such a delay anyway), until enough rows are queued,
            # a drain begins or the wait is over. Only then does it plan again: a plan per turn cost a
            # saturated loop 5,000-9,000 plans a second at 8 digits callers.
            end = time.monotonic() + limit
            loop = self._loop
            while True:
                self._turned = False
                turn = loop.call_soon(self._turn)
                try:
                    await self._wakeup.wait()
                finally:
                    turn.cancel()
                if (
                    not self._turned
                    or self._closing
                    or self._queue.rows >= self._wake_rows
                    or time.monotonic() >= end
                ):
                    return
                self._wakeup.clear()
        timer = self._timer
        if timer is None:
            timer = self._timer = WakeTimer(self._loop, self._wakeup.set)
        timer.arm(limit)  # cheaper than asyncio.timeout, and on time to the microsecond (see its module)
        try:
            await self._wakeup.wait()
        finally:
            timer.disarm()

    def _turn(self) -> None:
        """A turn of the loop passed while the dispatcher polled (see `_wait`)."""
        self._turned = True
        self._wakeup.set()

    def _collect(self, head: Pending) -> Batch | None:
        """Takes the next batch out of the queue: `head`'s group, priority then arrival, while it fits."""
        policy = self._policy
        max_items = 1 if policy.single_request else sys.maxsize
        max_rows = policy.batch_rows(head, self._queue.group_rows(head.key))
        limit = policy.limit_rows
        if limit != self._limit_seen:
            self._limit_seen, self._limit_held = limit, 0
        else:
            self._limit_held += 1
            logged = self._logged_limit
            if self._limit_held >= LIMIT_SETTLED and (2 * limit <= logged or limit >= 2 * logged):
                self._log_limit(limit)
        members = self._queue.take(head.key, max_rows, max_items)
        # Drop callers that gave up between their last chance to leave the queue and now.
        members = self._still_waiting(members, "in the queue")
        return Batch(members) if members else None

    def _log_limit(self, limit: int) -> None:
        """One INFO line for a settled batch limit 2x or more away from the one last logged, at most every
        LIMIT_LOG_EVERY seconds."""
        now = time.monotonic()
        if now < self._next_limit_log:
            return
        self._next_limit_log = now + LIMIT_LOG_EVERY
        elements = self._policy.estimates(now).limit_elements
        if elements:
            why = f"batches of about {elements} input elements run cheapest per element"
        else:
            why = "the largest batches measured run cheapest per element"
        log.info("model '%s': batch limit %d rows (was %d): %s", self._name, limit, self._logged_limit, why)
        self._logged_limit = limit

    def _still_waiting(self, members: list[Pending], where: str) -> list[Pending]:
        """`members` less those whose caller left or whose deadline passed; the latter get
        DeadlineExpiredError, saying they expired `where`. Both count as drops."""
        now = time.monotonic()
        if not any(m.future.done() or (m.deadline is not None and m.deadline <= now) for m in members):
            return members
        live = []
        for member in members:
            expired = member.deadline is not None and member.deadline <= now
            if member.future.done():
                member.state = DROPPED
                self._observer.on_drop("deadline" if expired else "cancelled", now - member.arrival)
            elif expired:
                member.state = DROPPED
                _set_exception_if_pending(
                    member.future,
                    DeadlineExpiredError(
                        f"model '{self._name}': deadline expired after "
                        f"{(now - member.arrival) * 1e3:.1f} ms {where}"
                    ),
                )
                self._observer.on_drop("deadline", now - member.arrival)
            else:
                live.append(member)
        return live

    def _spawn(self, batch: Batch, head: Pending) -> None:
        """Runs `batch` in a task of its own, so the next batch can form and start meanwhile."""
        assert self._loop is not None
        task = self._loop.create_task(self._run_batch(batch, self._start(batch, head)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start(self, batch: Batch, head: Pending) -> int:
        """Claims a free instance for `batch`, built around `head`; returns the instance's index."""
        now = time.monotonic()
        queued = batch.rows + self._queue.group_rows(head.key)
        self._policy.dispatched(batch.rows, queued, now - head.arrival, now)
        instance = heapq.heappop(self._free)
        self._in_flight += batch.rows
        self._observer.on_batch(
            batch.rows,
            len(batch.members),
            [now - m.arrival for m in batch.members],
            self._queue.rows,
            self.busy,
        )
        return instance

    async def _run_batch(self, batch: Batch, instance: int) -> None:
        """Runs one batch on `instance` and answers its members; a failure fails only them and, with
        isolate_failures, only those of them whose own rows make the model raise."""
        name = self._name
        error: BaseException | None = None
        start = time.monotonic()
        run_time = 0.0
        try:
            error, run_time = await self._run_once(batch, instance)
            if isinstance(error, OutputMismatchError):
                # A model bug, not a poison row: the model ran, so re-running parts would only repeat it.
                log.error("%s; every request of the batch failed", error)
            elif error is not None:
                if self._config.isolate_failures and len(batch.members) > 1:
                    await self._isolate(batch, instance, error)
                else:
                    cause = error
                    batch.fail(lambda: _run_error(name, cause))
                    log.error(
                        "model '%s': a run of %s raised; %s",
                        name,
                        _size(batch),
                        "its request failed"
                        if len(batch.members) == 1
                        else "every request of it failed (isolate_failures is off)",
                        exc_info=error,
                    )
        except asyncio.CancelledError as exc:
            error = exc
            run_time = time.monotonic() - start
            batch.fail(lambda: BatcherClosedError(f"model '{name}': shut down before the request finished"))
            raise
        except Exception as exc:
            # Not the run's failure (that is returned, not raised) but splitting its outputs: fail what is
            # still unanswered rather than leave callers waiting or stop the dispatcher.
            error = exc
            cause = exc  # `exc` is unbound once the except clause ends
            batch.fail(lambda: _run_error(name, cause))
            log.error("model '%s': answering a run of %s failed", name, _size(batch), exc_info=exc)
        finally:
            self._in_flight -= batch.rows
            still = None
            if isinstance(error, asyncio.CancelledError) and self._lingering is not None:
                still = self._lingering(instance)
            if still is None:
                self._release(instance)
            else:
                still.add_done_callback(lambda _: self._release(instance))
            self._observer.on_batch_done(batch.rows, run_time, error, self.busy)
            self._check_idle()

    def _release(self, instance: int) -> None:
        """`instance` is free again."""
        heapq.heappush(self._free, instance)
        if self._wake_rows == sys.maxsize:
            # The dispatcher sleeps until an instance frees up: this one did.
            self._wake_rows = 1
            if self._queue.rows:
                self._wakeup.set()
        self._check_idle()

    async def _run_once(self, batch: Batch, instance: int) -> tuple[Exception | None, float]:
        """Runs `batch` and answers its members if the outputs split back into their rows.

        Returns what went wrong, if anything, and the run's seconds. An OutputMismatchError has already
        failed every member; any other error is not yet told to them, so that they can be re-run.
        """
        began = start = time.monotonic()
        try:
            inputs = batch.inputs(self._pad)
            start = time.monotonic()
            outputs = await self._run(instance, inputs)
        except Exception as exc:
            return exc, time.monotonic() - start
        ended = time.monotonic()
        run_time = ended - start
        problem = batch.mismatch(outputs, self._crop)
        if problem is not None:
            message = f"model '{self._name}': {problem}"
            batch.fail(lambda: OutputMismatchError(message, model=self._name))
            return OutputMismatchError(message, model=self._name), run_time
        batch.deliver(outputs, self._crop)
        # Elements as run, pads included: what the run's cost grows with.
        self._policy.on_run(batch.rows, sum(array.size for array in inputs.values()), run_time)
        timed = self._timed
        if timed is not None:
            times = RunTimes(batch.rows, began, start - began, run_time, time.monotonic() - ended)
            for member in batch.members:
                member.ran = times
            timed.on_run(times)
        return None, run_time

    async def _isolate(self, batch: Batch, instance: int, error: Exception) -> None:
        """Finds the members whose own rows make the model raise, by re-running halves of the failed
        batch one after another on the instance it holds, so that every other member gets its answer.

        With one such member among n this costs about 2*log2(n) runs. Logs the failure once, with the
        traceback of the batch's run and what re-running made of it.
        """
        tally = _Tally()
        try:
            await self._rerun_halves(batch.members, instance, tally)
        finally:
            members = len(batch.members)
            cut_short = members - tally.failed - tally.rescued - tally.left
            outcome = f"{tally.failed} failed, {tally.rescued} rescued"
            if tally.left:
                outcome += f", {tally.left} left before an answer"
            if cut_short:
                outcome += f", {cut_short} cut short by shutdown"
            log.log(
                logging.ERROR if tally.failed or cut_short else logging.WARNING,
                "model '%s': a run of %s raised; re-running its parts (%d runs): %s",
                self._name,
                _size(batch),
                tally.reruns,
                outcome,
                exc_info=error,
            )

    async def _rerun_halves(self, members: list[Pending], instance: int, tally: _Tally) -> None:
        half = len(members) // 2
        await self._rerun(members[:half], instance, tally)
        await self._rerun(members[half:], instance, tally)

    async def _rerun(self, members: list[Pending], instance: int, tally: _Tally) -> None:
        """Re-runs part of a failed batch; if that fails too, a lone member fails, more are split again."""
        live = self._still_waiting(members, "while its failed batch was re-run in parts")
        tally.left += len(members) - len(live)
        if not live:
            return
        part = Batch(live)
        tally.reruns += 1
        error, _ = await self._run_once(part, instance)
        if error is None:
            answered = sum(not member.future.cancelled() for member in live)
            tally.rescued += answered
            tally.left += len(live) - answered
        elif isinstance(error, OutputMismatchError) or len(live) == 1:
            if not isinstance(error, OutputMismatchError):
                cause = error
                part.fail(lambda: _run_error(self._name, cause))
            tally.failed += len(live)
        else:
            await self._rerun_halves(live, instance, tally)

    def _check_idle(self) -> None:
        if (
            self._closing
            and not self._queue.rows
            and not self._in_flight
            and len(self._free) == self._config.instances
        ):
            self._idle.set()

    def _on_dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if self._timer is not None:  # here, not in the task: a task cancelled before its first step runs none
            self._timer.close()
            self._timer = None
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not a load condition: stop admitting and fail what waits rather than hang callers.
        log.error("batcher for model '%s' stopped", self._name, exc_info=task.exception())
        self._closing = True
        now = time.monotonic()
        for item in self._queue.clear():
            _set_exception_if_pending(
                item.future, BatcherClosedError(f"model '{self._name}': the batcher stopped unexpectedly")
            )
            self._observer.on_drop("shutdown", now - item.arrival)


class _Tally:
    """What isolating a failed batch made of its members, for the one log line it ends with."""

    __slots__ = ("failed", "left", "reruns", "rescued")

    def __init__(self) -> None:
        self.failed = 0
        self.rescued = 0
        self.left = 0
        self.reruns = 0


def _size(batch: Batch) -> str:
    requests, rows = len(batch.members), batch.rows
    return f"{requests} request{'s' if requests != 1 else ''} ({rows} row{'s' if rows != 1 else ''})"


def _run_error(name: str, cause: Exception) -> ModelRunError:
    error = ModelRunError(f"model '{name}' failed: {type(cause).__name__}: {cause}", model=name)
    error.__cause__ = cause
    return error
