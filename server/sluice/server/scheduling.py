"""The per-model scheduling seam: every inference goes through a `Scheduler`, batching or not."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from sluice.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchObserver,
    CooArray,
    DeadlineExpiredError,
    ModelRunError,
    PadSpec,
    QueueFullError,
)
from sluice.batcher.timer import early_by
from sluice.server.metrics import RUN_PLACES
from sluice.server.model import LoadedModel
from sluice.server.spin import Calls, LoneRuns, LoopSpin

Arrays = dict[str, npt.NDArray[np.generic]]

_T = TypeVar("_T")

LONE_MEMORY = 8
"""Lone runs whose cost per element predicts the next one's (the highest of them counts)."""

log = logging.getLogger("sluice.server")


class Scheduler(Protocol):
    """Runs requests on a model; the servicer knows nothing more of how."""

    def start(self) -> None: ...

    async def submit(
        self,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Mapping[str, npt.NDArray[np.generic]]: ...

    async def drain(self, grace: float) -> None: ...

    @property
    def queue_rows(self) -> int:
        """Rows (requests, for a model that does not batch) waiting to run."""

    @property
    def busy(self) -> int:
        """Instances running now."""

    @property
    def batch_limit(self) -> int:
        """Most rows the next batch may take."""

    @property
    def wait_cap(self) -> float:
        """Longest wait for company while the event loop is saturated, in seconds."""


def _nothing() -> None:
    return None


async def measure_thread_hop(samples: int = 25) -> float:
    """Median seconds the event loop spends handing a call to a worker thread and getting its result."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as executor:
        await loop.run_in_executor(executor, _nothing)  # starts the thread
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await loop.run_in_executor(executor, _nothing)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


class ModelRunner:
    """Runs batches of one model version, in worker threads unless a thread hop would cost more than the run.

    ONNX Runtime releases the GIL while it computes, so the event loop keeps serving while a batch runs in a
    worker thread. But handing a batch to a thread and back costs the loop tens to hundreds of µs (about
    175 µs on a small cloud VM): for a model that runs in 20 µs that is most of the work. So a batch whose
    predicted run time is under `inline_limit` runs on the event loop itself, which then never waits on a
    run longer than a thread hop would have cost it. The prediction is a line in the number of input
    elements, fitted at load (one row, then a full batch). It is not refitted from live runs: under CPU
    contention their wall times grow, and a batch pushed to a thread by that would then wait for the GIL
    behind the busy loop and grow slower still.
    """

    def __init__(
        self,
        model: LoadedModel,
        inline_limit: float,
        spin: LoopSpin | None = None,
        lone: LoneRuns | None = None,
        lone_limit: float = 0.0,
        places: dict[str, int] | None = None,
    ) -> None:
        """`spin`, the event loop's spinner if it has one, pauses while a batch computes in a worker
        thread: that thread and ONNX Runtime's pool need the cores the loop would spin on. `lone`, when
        given, lets a lone caller's run expected to take at most `lone_limit` s compute on the event loop
        (see LoneRuns), for a runtime whose runs end on their own (`loop_safe`). `places` counts runs by where
        they computed ("loop", "lone", "thread"; the model's metrics)."""
        self.model = model
        self.inline_limit = inline_limit
        self.spin = spin
        self.lone = lone if lone is not None and lone_limit > 0 and model.loop_safe else None
        self.lone_limit = lone_limit
        self.places = places if places is not None else dict.fromkeys(RUN_PLACES, 0)
        self._lone_costs: deque[float] = deque(maxlen=LONE_MEMORY)
        """Seconds per input element of the last successful lone runs."""
        self.executor = self._executor()
        self._fixed = float("inf")  # nothing runs inline until calibrate() has measured the model
        self._per_element = 0.0
        self._row_elements = 0
        # Instances whose run was cancelled while it computed in a worker thread, which cannot be stopped:
        # the future ends when the thread's run does (see lingering()).
        self._lingering: dict[int, asyncio.Future[None]] = {}

    def _executor(self) -> ThreadPoolExecutor:
        model = self.model
        self._workers = model.instances
        return ThreadPoolExecutor(
            max_workers=model.instances, thread_name_prefix=f"sluice-{model.name}-{model.version}"
        )

    def resize(self) -> None:
        """Matches the worker threads to the model's instances, after `LoadedModel.tune` changed them; only
        before the model serves."""
        if self._workers != self.model.instances:
            self.executor.shutdown(wait=True)
            self.executor = self._executor()

    def calibrate(self, feeds: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Measures run time at one row and at the batch limit; `feeds` holds one row per input."""
        one = _median_run(self.model, feeds)
        elements = self._row_elements = _elements(feeds)
        rows = self.model.max_batch_size
        # A model too slow to run inline at one row never will with more: spare it full-batch runs at load.
        if rows > 1 and one <= self.inline_limit:
            full = {name: _repeat(array, rows) for name, array in feeds.items()}
            more = _elements(full) - elements
            if more > 0:
                self._per_element = max(0.0, (_median_run(self.model, full) - one) / more)
        self._fixed = max(0.0, one - self._per_element * elements)

    def inline_at_one_row(self) -> bool:
        """Whether a one-row batch runs on the event loop (the model is that fast)."""
        return self._fixed + self._per_element * self._row_elements <= self.inline_limit

    def predicted(self, feeds: Mapping[str, npt.NDArray[np.generic]]) -> float:
        """Expected seconds to run `feeds`."""
        return self._fixed + self._per_element * _elements(feeds)

    def on_loop(self, feeds: Mapping[str, npt.NDArray[np.generic]]) -> bool:
        """Whether `run` computes `feeds` on the event loop, never suspending (the batcher's `at_once`, which
        must agree with `run`: so the prediction and `inline_limit` are set before the batcher starts, at
        load, and never after)."""
        return self.predicted(feeds) <= self.inline_limit

    async def run(
        self, instance: int, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        if self.spin is not None and self.model.spins_after_runs:
            self.spin.rest()
        if self.on_loop(feeds):
            self.places["loop"] += 1
            return self.model.run(instance, feeds)
        lone = self.lone
        if lone is not None and lone.alone():
            return await self._run_lone(lone, instance, feeds)
        return await self._in_thread(instance, self.model.run, instance, feeds)

    async def _run_lone(
        self, lone: LoneRuns, instance: int, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        """A lone caller's run: on the event loop when LoneRuns allows it and the recent lone runs say this
        one ends within the limit, else in a worker thread, timed there for the next prediction.

        The prediction is the input elements times the highest cost per element of the last LONE_MEMORY
        successful lone runs: one cheap run (an early exit, a cost that depends on values) must not let a
        long one block the loop. Inputs whose cost an element count does not tell (strings, bytes, sparse
        tensors) never run there."""
        elements = _numeric_elements(feeds)
        costs = self._lone_costs
        if elements and costs and max(costs) * elements <= self.lone_limit and lone.on_loop():
            self.places["lone"] += 1
            cpu, started = time.thread_time(), time.perf_counter()
            try:
                results = self.model.run(instance, feeds)
            finally:
                lone.computed += time.thread_time() - cpu
            costs.append((time.perf_counter() - started) / elements)
            return results
        crowds = lone.crowds
        results, seconds = await self._in_thread(instance, _timed, self.model.run, instance, feeds)
        if elements:
            costs.append(seconds / elements)
        lone.ended(crowds)
        return results

    async def _in_thread(self, instance: int, run: Callable[..., _T], *args: Any) -> _T:
        """`run(*args)` in a worker thread; a cancelled caller leaves `instance` lingering until it ends."""
        loop = asyncio.get_running_loop()
        self.places["thread"] += 1
        work = self.executor.submit(run, *args)
        if self.spin is not None:
            self.spin.hold_until_done(work)
        try:
            return await asyncio.wrap_future(work, loop=loop)
        except asyncio.CancelledError:
            # Cancelling the wrapper cancelled a run still queued for a thread; one already running goes on.
            if not work.done():
                self._lingering[instance] = _ended(work, loop)
            raise

    def lingering(self, instance: int) -> asyncio.Future[None] | None:
        """After a cancelled run of `instance`: a future that ends when its worker thread's run does, or
        None if nothing of it still runs. The scheduler keeps the instance busy until then, so a model
        instance never runs two batches at once (the python runtime's objects rely on it)."""
        ended = self._lingering.pop(instance, None)
        return None if ended is None or ended.done() else ended

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _numeric_elements(feeds: Mapping[str, npt.NDArray[np.generic]]) -> int:
    """Input elements, or 0 when an input is not a dense numeric array (its cost is not in the count)."""
    total = 0
    for array in feeds.values():
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
            return 0
        total += array.size
    return total


def _timed(
    run: Callable[[int, Mapping[str, npt.NDArray[np.generic]]], Mapping[str, npt.NDArray[np.generic]]],
    instance: int,
    feeds: Mapping[str, npt.NDArray[np.generic]],
) -> tuple[Mapping[str, npt.NDArray[np.generic]], float]:
    """`run(instance, feeds)` and the seconds it took, timed in the thread that ran it."""
    started = time.perf_counter()
    results = run(instance, feeds)
    return results, time.perf_counter() - started


def _ended(work: Future[Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future of `loop` that ends (with None, whatever `work` returned or raised) once `work` has."""
    ended: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not ended.done():
            ended.set_result(None)

    def done(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(finish)

    work.add_done_callback(done)
    return ended


def _repeat(array: npt.NDArray[np.generic], rows: int) -> npt.NDArray[np.generic]:
    if isinstance(array, CooArray):
        return CooArray.concat([array] * rows)  # type: ignore[return-value]
    return np.repeat(array, rows, axis=0)


def _elements(feeds: Mapping[str, npt.NDArray[np.generic]]) -> int:
    total = 0
    for array in feeds.values():
        total += array.size
    return total


def _median_run(model: LoadedModel, feeds: Mapping[str, npt.NDArray[np.generic]], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.run(0, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_scheduler(runner: ModelRunner, observer: BatchObserver, loop: LoopLoad | None = None) -> Scheduler:
    """A batcher for models with a batch dimension, a plain concurrency limit for the others."""
    model = runner.model
    config = model.config
    instances = model.instances
    if model.max_batch_size == 0:
        queue = config.batching.max_queue_rows or 32 * model.loaded_instances
        return DirectScheduler(runner, max_queued=queue, name=model.name)
    pad = {
        spec.name: (PadSpec(axis=o.pad.axis, dim=o.pad.dim, value=o.pad.value),)
        for spec in model.inputs
        if (o := config.inputs.get(spec.graph_name)) is not None and o.pad is not None
    }
    crop = {
        spec.name: ((o.crop.axis, o.crop.dim),)
        for spec in model.outputs
        if (o := config.outputs.get(spec.graph_name)) is not None and o.crop is not None
    }
    batching = BatcherConfig(
        max_batch_size=model.max_batch_size,
        max_delay=config.batching.max_delay_ms / 1000,
        max_queue_rows=config.batching.max_queue_rows or 32 * model.max_batch_size * model.loaded_instances,
        instances=instances,
        policy=config.batching.policy,
        pad=pad,
        crop=crop,
    )
    return Batcher(
        runner.run,
        batching,
        name=model.name,
        observer=observer,
        pressure=loop,
        lingering=runner.lingering,
        at_once=runner.on_loop,
        crowded=None if loop is None else loop.crowded,
    )


def loop_time(deadline: float | None) -> float | None:
    """A time.monotonic() deadline on the running event loop's clock (they may differ), for timeout_at.

    Set late by what the loop's timers can fire early (`early_by`): a caller may hear of its deadline that
    much after it passed, never before."""
    if deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.time() + deadline - time.monotonic() + early_by(loop)


class DirectScheduler:
    """For models without a batch dimension: each request is one run, at most one per instance at a time."""

    def __init__(self, runner: ModelRunner, *, max_queued: int, name: str) -> None:
        self._runner = runner
        self._name = name
        self._max_queued = max_queued
        self._free = list(range(runner.model.instances))  # a heap: a run gets the lowest, as in the Batcher
        self._ready = asyncio.Condition()
        self._waiting = 0
        self._releasing: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Nothing to start: runs happen in the callers' tasks."""

    @property
    def queue_rows(self) -> int:
        return self._waiting

    @property
    def busy(self) -> int:
        return self._runner.model.instances - len(self._free)

    @property
    def batch_limit(self) -> int:
        """Every run is one request."""
        return 1

    @property
    def wait_cap(self) -> float:
        """Never waits."""
        return 0.0

    async def submit(
        self,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        if self._closed:
            raise BatcherClosedError(f"model '{self._name}': the server is shutting down")
        if self._waiting >= self._max_queued:
            raise QueueFullError(
                f"model '{self._name}': queue full ({self._waiting} requests waiting, "
                f"limit max_queue_rows={self._max_queued})"
            )
        arrival = time.monotonic()
        if deadline is not None and deadline <= arrival:
            late = (arrival - deadline) * 1e3
            name = self._name
            raise DeadlineExpiredError(f"model '{name}': deadline already passed {late:.1f} ms before submit")
        instance = -1
        ran = cancelled = False
        # One timeout for the queue and the run: the deadline holds while the request runs too, as in a
        # batch, so a caller whose `timeout` parameter passes mid-run hears so then, not when the run ends.
        try:
            async with asyncio.timeout_at(loop_time(deadline)):
                self._waiting += 1
                try:
                    async with self._ready:
                        await self._ready.wait_for(lambda: bool(self._free))
                        instance = heapq.heappop(self._free)
                finally:
                    self._waiting -= 1
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError  # passed as the instance came free: do not start a run for nobody
                ran = True
                try:
                    results = await self._runner.run(instance, inputs)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except Exception as exc:  # the model's own TimeoutError included: it is not the deadline
                    log.error("model '%s' failed to run a request", self._name, exc_info=exc)
                    raise ModelRunError(
                        f"model '{self._name}' failed: {type(exc).__name__}: {exc}", model=self._name
                    ) from exc
        except TimeoutError:
            raise self._late(arrival, ran) from None
        finally:
            if instance >= 0:
                still = self._runner.lingering(instance) if cancelled else None
                if still is None:
                    await self._release(instance)
                else:
                    # The caller left, or its deadline passed, but its run goes on in a worker thread: the
                    # instance is not free until that run ends.
                    still.add_done_callback(lambda _: self._later(self._release(instance)))
        if deadline is not None and time.monotonic() > deadline:
            raise self._late(arrival, ran)  # it ran on the event loop, where the timer could not fire
        return results

    def _late(self, arrival: float, ran: bool) -> DeadlineExpiredError:
        waited = (time.monotonic() - arrival) * 1e3
        where = "while it ran (the result is discarded)" if ran else "in the queue"
        return DeadlineExpiredError(f"model '{self._name}': deadline expired after {waited:.1f} ms {where}")

    def _later(self, release: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(release)
        self._releasing.add(task)  # held: the loop keeps only a weak reference to a task
        task.add_done_callback(self._releasing.discard)

    async def _release(self, instance: int) -> None:
        heapq.heappush(self._free, instance)
        async with self._ready:
            self._ready.notify_all()

    async def drain(self, grace: float) -> None:
        self._closed = True
        try:
            async with asyncio.timeout(grace), self._ready:
                # Instances, not callers: a run whose caller left still computes in its worker thread.
                await self._ready.wait_for(lambda: self.busy == 0 and self._waiting == 0)
        except TimeoutError:
            pass  # What is still running is cancelled with its RPC when the gRPC server stops.


SCHEDSTAT = "/proc/thread-self/schedstat"
"""The calling thread's scheduler statistics (Linux): ns on a CPU, ns waiting for one while ready, slices."""


class LoopLoad:
    """Busy fraction of the event loop's thread over windows of `window` s: the time it computed, and on
    Linux also the time it was ready to compute but waited for a CPU, over wall time.

    The adaptive batcher reads it to tell a saturated loop (where every batch saved is throughput) from an
    idle one (where waiting for company only adds latency). CPU time alone cannot tell them apart on a
    machine short of CPU: a loop with work queued that other threads and processes keep off the cores
    computes only part of the time, and it read as idle (0.53 at 8 closed-loop digits callers on 2 cores
    with one busy process beside them, benchmarks/RESULTS.md), so the batcher stopped batching exactly when
    each batch saved mattered most. The kernel counts that wait per thread (`/proc/thread-self/schedstat`,
    its second field). It counts only in windows where nothing else of the server computed: behind the
    server's own worker threads (a model's runs, at 8 MiniLM callers) the loop waits for the model, and
    waiting for company too cost 8% of the requests/s. The loop's spinner (`spin`) tracks that work, so
    without one the measure is CPU time alone. Call it only on the loop's thread.
    """

    def __init__(
        self,
        window: float = 0.05,
        spin: LoopSpin | None = None,
        lone: LoneRuns | None = None,
        calls: Calls | None = None,
    ) -> None:
        """`spin`, when given, is the loop's spinner: the time the loop spent only spinning is not load.
        `lone` lets lone callers' runs compute on the loop: that time is not load either. `calls`, the
        gRPC calls alive, tells whether a crowd of callers loads the loop (`crowded`)."""
        self._window = window
        self.spin = spin
        self.lone = lone
        self.calls = calls
        self._schedstat: int | None = None  # the loop thread's, opened on that thread at the first window
        self._opened = False
        self._close: weakref.finalize[[int], LoopLoad] | None = None
        self._wall = time.monotonic()
        self._idle = self._not_load()
        self._cpu = time.thread_time() - self._idle
        self._waited = 0.0
        self._held = 0
        self.value = 0.0

    def _not_load(self) -> float:
        """Seconds of the loop thread's CPU so far that were not load: spinning, and lone runs."""
        spin, lone = self.spin, self.lone
        return (spin.spun if spin is not None else 0.0) + (lone.computed if lone is not None else 0.0)

    def _runnable(self) -> float:
        """Seconds the loop's thread has waited for a CPU while ready to run; 0 where nothing says."""
        fd = self._schedstat
        if fd is None:
            return 0.0
        try:
            return int(os.pread(fd, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            self.close()
            return 0.0

    def _open(self) -> None:
        """Opens the calling thread's schedstat, where there is one (Linux) and a spinner to say when it
        counts; kept open, it is one pread a window. The window it opens in is measured by CPU time alone."""
        self._opened = True
        if self.spin is None:
            return  # nothing would tell when the wait counts: CPU time alone, and no file to read
        with contextlib.suppress(OSError):
            fd = self._schedstat = os.open(SCHEDSTAT, os.O_RDONLY)
            self._close = weakref.finalize(self, os.close, fd)
        self._waited = self._runnable()

    def close(self) -> None:
        """Lets go of the schedstat file now (the server stops); the measure goes on by CPU time alone."""
        self._opened = True
        self._schedstat = None
        if self._close is not None:
            self._close()  # once: a finalizer that has run does nothing more

    def crowded(self) -> bool:
        """Whether several callers' calls overlap (see Calls); False when nobody counts them."""
        return self.calls is not None and self.calls.crowded()

    def __call__(self) -> float:
        now = time.monotonic()
        elapsed = now - self._wall
        if elapsed >= self._window:
            if not self._opened:
                self._open()
            idle, waited = self._not_load(), self._runnable()
            spin = self.spin
            held = spin.held if spin is not None else 0
            cpu = time.thread_time() - idle
            busy = max(cpu - self._cpu, 0.0)
            if idle == self._idle and held == self._held and spin is not None and not spin.holding:
                # Only where nothing but the loop computes for the server: a loop waiting behind the
                # server's own worker threads (a model's run, a plugin step) is held up by that work, not
                # by its own, and waiting for company would only delay the next run. A window with
                # spinning or a lone run in it leaves it out too (a spinning loop is always ready to run):
                # only a lone caller is served there.
                busy += max(waited - self._waited, 0.0)
            self.value = min(busy / elapsed, 1.0)
            self._wall, self._cpu, self._waited, self._idle, self._held = now, cpu, waited, idle, held
        return self.value
