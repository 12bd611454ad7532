"""The batcher through its public API, with a fake model that holds batches back on an asyncio.Event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from sluice.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchInputError,
    BatchTooLargeError,
    CooArray,
    DeadlineExpiredError,
    ModelRunError,
    OutputMismatchError,
    PadSpec,
    QueueFullError,
)

Array = npt.NDArray[Any]
T = TypeVar("T")


class FakeModel:
    """Records every batch; each run for which `hold_when` holds waits at `gate` until the test opens it."""

    def __init__(self, *, held: bool = False) -> None:
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()
        self.batches: list[dict[str, Array]] = []
        self.instances: list[int] = []
        self.running = 0
        self.most_running = 0
        self.hold_when: Callable[[dict[str, Array]], bool] = lambda inputs: True
        self.fail_when: Callable[[dict[str, Array]], bool] = lambda inputs: False
        self.answer: Callable[[dict[str, Array]], Mapping[str, Any]] = lambda inputs: {"y": inputs["x"] * 2}

    async def run(self, instance: int, inputs: dict[str, Array]) -> Mapping[str, Any]:
        self.batches.append(inputs)
        self.instances.append(instance)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.hold_when(inputs):
                await self.gate.wait()
        finally:
            self.running -= 1
        if self.fail_when(inputs):
            raise ValueError("bad batch")
        return self.answer(inputs)

    @property
    def sizes(self) -> list[int]:
        return [len(next(iter(batch.values()))) for batch in self.batches]


class Recorder:
    """An observer that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def on_enqueue(self, rows: int, queue_rows: int) -> None:
        self.calls.append(("enqueue", (rows, queue_rows)))

    def on_reject(self, reason: str, rows: int) -> None:
        self.calls.append(("reject", (reason, rows)))

    def on_drop(self, reason: str, queued_for: float) -> None:
        self.calls.append(("drop", (reason,)))

    def on_batch(
        self, rows: int, requests: int, queue_waits: Sequence[float], queue_rows: int, busy: int
    ) -> None:
        self.calls.append(("batch", (rows, requests, len(queue_waits), busy)))

    def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
        self.calls.append(("done", (rows, type(error).__name__ if error else None, busy)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for kind, args in self.calls if kind == name]


Make = Callable[..., Batcher]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Builds started batchers ("fixed" with no delay unless told: runs exactly what is queued) and
    drains them at the end, so no task outlives its test."""
    made: list[Batcher] = []

    def build(
        model: FakeModel,
        *,
        observer: Recorder | None = None,
        at_once: Callable[[Mapping[str, Array]], bool] | None = None,
        **options: Any,
    ) -> Batcher:
        options.setdefault("policy", "fixed")
        options.setdefault("max_delay", 0.0)
        options.setdefault("max_batch_size", 8)
        batcher = Batcher(
            model.run, BatcherConfig(**options), name="test", observer=observer, at_once=at_once
        )
        batcher.start()
        made.append(batcher)
        return batcher

    yield build
    for batcher in made:
        await batcher.drain(0)


async def within(awaitable: Awaitable[T]) -> T:
    """Awaits with a bound, so a batcher bug fails the test instead of hanging the suite."""
    return await asyncio.wait_for(awaitable, 5)


async def until(condition: Callable[[], bool]) -> None:
    """Lets other tasks run until `condition` holds (yields only, no timed sleeps)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def rows(*values: float, width: int = 1) -> dict[str, Array]:
    return {"x": np.array([[v] * width for v in values], dtype=np.float32)}


def spawn(batcher: Batcher, inputs: Mapping[str, Array], **options: Any) -> asyncio.Task[dict[str, Array]]:
    return asyncio.create_task(batcher.submit(inputs, **options))


def assert_idle(batcher: Batcher) -> None:
    assert (batcher.queue_rows, batcher.in_flight, batcher.busy) == (0, 0, 0)


async def hold_instance(batcher: Batcher, model: FakeModel) -> asyncio.Task[dict[str, Array]]:
    """Occupies the (single) instance with a request that waits at the model's gate."""
    blocker = spawn(batcher, rows(-1.0))
    await until(lambda: model.running == 1)
    return blocker


# -- size and time bounds -------------------------------------------------------------------------------


async def test_a_full_batch_dispatches_without_waiting_for_the_delay(make: Make) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=4, max_delay=60.0)
    results = await within(asyncio.gather(*(batcher.submit(rows(i)) for i in range(4))))
    assert model.sizes == [4]
    assert [r["y"].tolist() for r in results] == [[[0.0]], [[2.0]], [[4.0]], [[6.0]]]


async def test_batches_never_exceed_max_rows(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model, max_batch_size=4)
    blocker = await hold_instance(batcher, model)
    sizes = [3, 1, 2, 2, 4, 1, 3]
    tasks = [spawn(batcher, rows(*range(n))) for n in sizes]
    await until(lambda: batcher.queue_rows == sum(sizes))
    model.gate.set()
    results = await within(asyncio.gather(blocker, *tasks))
    assert all(size <= 4 for size in model.sizes)
    assert sum(model.sizes) == 1 + sum(sizes)
    for n, result in zip(sizes, results[1:], strict=True):
        assert result["y"][:, 0].tolist() == [2.0 * i for i in range(n)]
    assert_idle(batcher)


async def test_a_partial_batch_runs_once_the_delay_passes(make: Make) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=8, max_delay=0.01)
    result = await within(batcher.submit(rows(1.0, 2.0)))
    assert result["y"].tolist() == [[2.0], [4.0]]
    assert model.sizes == [2]


async def test_rows_are_counted_not_requests(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model, max_batch_size=4)
    blocker = await hold_instance(batcher, model)
    three = spawn(batcher, rows(1, 2, 3))
    two = spawn(batcher, rows(4, 5))
    await until(lambda: batcher.queue_rows == 5)
    model.gate.set()
    await within(asyncio.gather(blocker, three, two))
    assert model.sizes == [1, 3, 2]  # 3 + 2 rows do not fit in one batch of 4


async def test_a_request_larger_than_a_batch_is_rejected(make: Make) -> None:
    recorder = Recorder()
    batcher = make(FakeModel(), max_batch_size=4, observer=recorder)
    with pytest.raises(BatchTooLargeError, match=r"model 'test'.* 5 rows.*max_batch_size=4"):
        await batcher.submit(rows(1, 2, 3, 4, 5))
    assert recorder.named("reject") == [("too_large", 5)]
    assert_idle(batcher)


# -- grouping, padding, priorities ---------------------------------------------------------------------


async def test_incompatible_shapes_and_dtypes_run_in_separate_batches(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model)
    blocker = await hold_instance(batcher, model)
    narrow_a = spawn(batcher, rows(1.0, width=1))
    wide = spawn(batcher, rows(2.0, width=3))
    narrow_b = spawn(batcher, rows(3.0, width=1))
    doubles = spawn(batcher, {"x": np.array([[4.0]], dtype=np.float64)})
    await until(lambda: batcher.queue_rows == 4)
    model.gate.set()
    results = await within(asyncio.gather(blocker, narrow_a, wide, narrow_b, doubles))
    shapes = [(batch["x"].shape, batch["x"].dtype.name) for batch in model.batches]
    assert shapes == [((1, 1), "float32"), ((2, 1), "float32"), ((1, 3), "float32"), ((1, 1), "float64")]
    assert results[2]["y"].tolist() == [[4.0, 4.0, 4.0]]
    assert results[3]["y"].tolist() == [[6.0]]


async def test_padding_batches_different_lengths_and_crops_outputs_back(make: Make) -> None:
    model = FakeModel(held=True)
    model.answer = lambda inputs: {
        "x": inputs["x"] * 10,  # cropped back to each caller's length
        "total": inputs["x"].sum(axis=1, keepdims=True),  # not cropped: sees the pad value
    }
    batcher = make(
        model,
        pad={"x": (PadSpec(axis=1, dim="seq", value=-1),)},
        crop={"x": ((1, "seq"),)},
    )
    blocker = spawn(batcher, {"x": np.ones((1, 4), dtype=np.int64)})
    await until(lambda: model.running == 1)
    short = spawn(batcher, {"x": np.array([[1, 2]], dtype=np.int64)})
    long = spawn(batcher, {"x": np.array([[3, 4, 5, 6], [7, 8, 9, 10]], dtype=np.int64)})
    await until(lambda: batcher.queue_rows == 3)
    model.gate.set()
    _, short_out, long_out = await within(asyncio.gather(blocker, short, long))
    assert model.batches[1]["x"].tolist() == [[1, 2, -1, -1], [3, 4, 5, 6], [7, 8, 9, 10]]
    assert short_out["x"].tolist() == [[10, 20]]
    assert long_out["x"].tolist() == [[30, 40, 50, 60], [70, 80, 90, 100]]
    assert short_out["total"].tolist() == [[1]]  # 1 + 2 - 1 - 1: the model saw the padding


async def test_padding_needs_the_padded_axis(make: Make) -> None:
    batcher = make(FakeModel(), pad={"x": (PadSpec(axis=2, dim="seq"),)})
    with pytest.raises(BatchInputError, match=r"'x' has rank 2.*axis 2"):
        await batcher.submit(rows(1.0))


async def test_higher_priority_runs_first(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model, max_batch_size=1)
    blocker = await hold_instance(batcher, model)
    low = spawn(batcher, rows(1.0), priority=0)
    low_later = spawn(batcher, rows(2.0), priority=0)
    high = spawn(batcher, rows(3.0), priority=5)
    await until(lambda: batcher.queue_rows == 3)
    model.gate.set()
    await within(asyncio.gather(blocker, low, low_later, high))
    assert [batch["x"][0, 0] for batch in model.batches] == [-1.0, 3.0, 1.0, 2.0]


# -- admission, deadlines, cancellation ---------------------------------------------------------------


async def test_a_full_queue_rejects_at_once_and_names_the_limit(make: Make) -> None:
    model = FakeModel(held=True)
    recorder = Recorder()
    batcher = make(model, max_batch_size=4, max_queue_rows=4, observer=recorder)
    blocker = await hold_instance(batcher, model)
    queued = spawn(batcher, rows(1, 2, 3))
    await until(lambda: batcher.queue_rows == 3)
    with pytest.raises(QueueFullError, match=r"model 'test'.*3 rows queued.*max_queue_rows=4"):
        await batcher.submit(rows(4, 5))
    assert ("queue_full", 2) in recorder.named("reject")
    model.gate.set()
    await within(asyncio.gather(blocker, queued))


async def test_an_expired_request_never_runs(make: Make) -> None:
    model = FakeModel(held=True)
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    blocker = await hold_instance(batcher, model)
    with pytest.raises(DeadlineExpiredError, match=r"model 'test': deadline expired.*in the queue"):
        await within(batcher.submit(rows(7.0), deadline=time.monotonic() + 0.01))
    assert batcher.queue_rows == 0
    model.gate.set()
    await within(blocker)
    assert len(model.batches) == 1
    assert ("deadline",) in recorder.named("drop")
    assert_idle(batcher)


async def test_a_deadline_already_past_is_refused(make: Make) -> None:
    model = FakeModel()
    batcher = make(model)
    with pytest.raises(DeadlineExpiredError, match="model 'test'"):
        await batcher.submit(rows(1.0), deadline=time.monotonic() - 1)
    assert model.batches == []


async def test_a_deadline_while_running_still_fails_the_caller(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model)
    with pytest.raises(DeadlineExpiredError, match="while its batch ran"):
        await within(batcher.submit(rows(1.0), deadline=time.monotonic() + 0.01))
    model.gate.set()
    await until(lambda: batcher.busy == 0)
    assert_idle(batcher)


@pytest.mark.parametrize("declared", [False, True], ids=["timed", "declared-at-once"])
async def test_a_run_that_holds_the_event_loop_past_the_deadline_is_not_answered(
    make: Make, declared: bool
) -> None:
    # A run that computes on the event loop (the server's lone callers' runs) keeps the deadline's timer from
    # firing until it ends: an answer that comes after the deadline is discarded all the same. Declared with
    # `at_once`, the lone request gets no timer at all, and the deadline is checked when the run ends.
    model = FakeModel()
    model.hold_when = lambda inputs: False
    model.answer = lambda inputs: (time.sleep(0.05), {"y": inputs["x"]})[1]
    batcher = make(model, at_once=(lambda inputs: True) if declared else None)
    with pytest.raises(DeadlineExpiredError, match="while its batch ran"):
        await within(batcher.submit(rows(1.0), deadline=time.monotonic() + 0.01))
    assert model.sizes == [1]
    assert_idle(batcher)


async def test_a_queued_request_keeps_its_deadline_when_runs_are_declared_at_once(make: Make) -> None:
    # `at_once` spares only a request that runs alone at once a timer: one that waits in the queue (the
    # instance busy) still leaves it when its deadline passes, and never runs.
    model = FakeModel(held=True)
    model.hold_when = lambda inputs: bool(inputs["x"][0, 0] == -1.0)
    batcher = make(model, at_once=lambda inputs: True)
    blocker = await hold_instance(batcher, model)
    with pytest.raises(DeadlineExpiredError, match="in the queue"):
        await within(batcher.submit(rows(1.0), deadline=time.monotonic() + 0.01))
    assert batcher.queue_rows == 0
    model.gate.set()
    await within(blocker)
    assert model.sizes == [1]
    assert_idle(batcher)


async def test_an_at_once_hook_that_raises_admits_nothing(make: Make) -> None:
    def broken(inputs: Mapping[str, Array]) -> bool:
        raise RuntimeError("hook bug")

    model = FakeModel()
    batcher = make(model, at_once=broken)
    with pytest.raises(RuntimeError, match="hook bug"):
        await batcher.submit(rows(1.0), deadline=time.monotonic() + 1)
    assert model.batches == []
    assert_idle(batcher)
    assert (await within(batcher.submit(rows(2.0))))["y"].tolist() == [[4.0]]


@pytest.mark.parametrize("declared", [False, True], ids=["timed", "declared-at-once"])
async def test_a_deadline_met_leaves_the_caller_alone_afterwards(make: Make, declared: bool) -> None:
    # The deadline is a timer that cancels the caller's task: once the answer is in, it must be gone, or the
    # caller would be cancelled later, somewhere else.
    model = FakeModel()
    model.hold_when = lambda inputs: False
    batcher = make(model, at_once=(lambda inputs: True) if declared else None)

    async def caller() -> str:
        await batcher.submit(rows(1.0), deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.1)  # well past the deadline
        return "still running"

    assert await within(caller()) == "still running"


async def test_a_cancelled_caller_is_never_run_and_frees_its_rows(make: Make) -> None:
    model = FakeModel(held=True)
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    blocker = await hold_instance(batcher, model)
    doomed = spawn(batcher, rows(1, 2))
    await until(lambda: batcher.queue_rows == 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queue_rows == 0
    assert ("cancelled",) in recorder.named("drop")
    model.gate.set()
    await within(blocker)
    assert (await within(batcher.submit(rows(5.0))))["y"].tolist() == [[10.0]]
    assert model.sizes == [1, 1]
    assert_idle(batcher)


async def test_a_caller_cancelled_as_its_batch_forms_is_not_run(make: Make) -> None:
    model = FakeModel(held=True)
    doomed: list[asyncio.Task[dict[str, Array]]] = []

    class CancelOnDone(Recorder):
        # Cancels the waiting caller from inside the batcher's bookkeeping, the instant before the next
        # batch is collected, so the caller has had no chance to take its request out of the queue.
        def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
            super().on_batch_done(rows, run_time, error, busy)
            if doomed:
                doomed.pop().cancel()

    recorder = CancelOnDone()
    batcher = make(model, observer=recorder)
    blocker = await hold_instance(batcher, model)
    doomed.append(spawn(batcher, rows(1.0)))
    kept = spawn(batcher, rows(2.0))
    cancelled = doomed[0]
    await until(lambda: batcher.queue_rows == 2)
    model.gate.set()
    results = await within(asyncio.gather(blocker, kept))
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert results[1]["y"].tolist() == [[4.0]]
    assert [batch["x"][:, 0].tolist() for batch in model.batches] == [[-1.0], [2.0]]
    assert ("cancelled",) in recorder.named("drop")
    assert_idle(batcher)


async def test_inputs_that_cannot_batch_are_refused(make: Make) -> None:
    batcher = make(FakeModel())
    with pytest.raises(BatchInputError, match=r"'a' has 2 rows, 'b' has 3"):
        await batcher.submit({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})
    with pytest.raises(BatchInputError, match="'s' is a scalar"):
        await batcher.submit({"s": np.array(1.0)})
    with pytest.raises(BatchInputError, match="0 rows"):
        await batcher.submit({"x": np.zeros((0, 1))})
    with pytest.raises(BatchInputError, match="no inputs"):
        await batcher.submit({})
    assert_idle(batcher)


# -- failures ------------------------------------------------------------------------------------------


async def test_without_isolation_a_failing_batch_fails_all_its_members(make: Make) -> None:
    model = FakeModel(held=True)
    model.fail_when = lambda inputs: bool((inputs["x"] == 0).any())
    batcher = make(model, isolate_failures=False)
    blocker = await hold_instance(batcher, model)
    bad = spawn(batcher, rows(0.0, width=2))
    bad_too = spawn(batcher, rows(1.0, width=2))  # same batch as `bad`
    good = spawn(batcher, rows(3.0))
    await until(lambda: batcher.queue_rows == 3)
    model.gate.set()
    outcomes = await within(asyncio.gather(blocker, bad, bad_too, good, return_exceptions=True))
    for failed in outcomes[1:3]:
        assert isinstance(failed, ModelRunError)
        assert str(failed) == "model 'test' failed: ValueError: bad batch"
        assert isinstance(failed.__cause__, ValueError)
    assert isinstance(outcomes[3], dict)
    assert outcomes[3]["y"].tolist() == [[6.0]]
    assert model.sizes == [1, 2, 1]  # nothing re-run
    assert (await within(batcher.submit(rows(4.0))))["y"].tolist() == [[8.0]]
    assert_idle(batcher)


async def test_outputs_without_a_row_per_input_row_fail_every_member(make: Make) -> None:
    model = FakeModel(held=True)
    model.answer = lambda inputs: {"y": inputs["x"][:1]}
    batcher = make(model)
    model.gate.set()
    with pytest.raises(OutputMismatchError, match=r"model 'test': output 'y' has 1 rows, expected 2"):
        await within(batcher.submit(rows(1, 2)))
    model.gate.clear()
    blocker = await hold_instance(batcher, model)
    first = spawn(batcher, rows(1.0))
    second = spawn(batcher, rows(2.0))
    await until(lambda: batcher.queue_rows == 2)
    model.gate.set()
    outcomes = await within(asyncio.gather(blocker, first, second, return_exceptions=True))
    assert isinstance(outcomes[0], dict)  # alone in its batch: 1 row in, 1 row out
    assert all(isinstance(o, OutputMismatchError) and "expected 2" in str(o) for o in outcomes[1:])
    assert model.sizes == [2, 1, 2]  # a model bug, not a poison row: no part is re-run
    assert_idle(batcher)


async def test_an_output_that_is_not_an_array_is_a_mismatch(make: Make) -> None:
    model = FakeModel()
    model.answer = lambda inputs: {"y": 3.0}
    batcher = make(model)
    with pytest.raises(OutputMismatchError, match="output 'y' must be an array"):
        await within(batcher.submit(rows(1.0)))


# -- failure isolation ----------------------------------------------------------------------------------

POISON = 13.0


def poisoned(inputs: dict[str, Array]) -> bool:
    """The fake model's failure: it raises for any batch holding a POISON value."""
    return bool((inputs["x"] == POISON).any())


async def as_one_batch(
    batcher: Batcher, model: FakeModel, requests: Sequence[Mapping[str, Array]]
) -> list[Any]:
    """Queues `requests` behind a held request, so that they run as one batch; returns their outcomes."""
    blocker = await hold_instance(batcher, model)
    tasks = [spawn(batcher, request) for request in requests]
    await until(lambda: batcher.queue_rows == sum(len(request["x"]) for request in requests))
    model.gate.set()
    outcomes = await within(asyncio.gather(blocker, *tasks, return_exceptions=True))
    assert isinstance(outcomes[0], dict)
    return outcomes[1:]


async def fail_then_hold(
    batcher: Batcher,
    model: FakeModel,
    requests: Sequence[Mapping[str, Array]],
    hold: Callable[[dict[str, Array]], bool],
    deadlines: Mapping[int, float] | None = None,
) -> list[asyncio.Task[dict[str, Array]]]:
    """Runs `requests` as one batch that fails, and holds the re-run of the part for which `hold` holds.

    `deadlines` maps a request's index to its deadline."""
    blocker = await hold_instance(batcher, model)
    deadlines = deadlines or {}
    tasks = [spawn(batcher, request, deadline=deadlines.get(i)) for i, request in enumerate(requests)]
    await until(lambda: batcher.queue_rows == sum(len(request["x"]) for request in requests))
    opened, model.gate = model.gate, asyncio.Event()
    model.hold_when = hold
    opened.set()  # the blocker goes on, the batch fails at once, its re-runs go on until `hold`
    await within(blocker)
    await until(lambda: model.running == 1)
    return tasks


def batcher_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "sluice.batcher"]


def assert_answers(values: Sequence[float], outcomes: Sequence[Any]) -> None:
    """Each request of POISON failed with the model's own error; each other got its own rows."""
    for value, outcome in zip(values, outcomes, strict=True):
        if value == POISON:
            assert isinstance(outcome, ModelRunError), (value, outcome)
            assert str(outcome) == "model 'test' failed: ValueError: bad batch"
            assert isinstance(outcome.__cause__, ValueError)
        else:
            assert isinstance(outcome, dict), (value, outcome)
            assert outcome["y"].tolist() == [[2.0 * value]]


async def test_a_poison_request_fails_alone_and_the_rest_of_its_batch_is_answered(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    values = [0.0, 1.0, 2.0, 3.0, 4.0, POISON, 6.0, 7.0]
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"):
        outcomes = await as_one_batch(batcher, model, [rows(value) for value in values])
    assert_answers(values, outcomes)
    # The batch, then both halves of each part that failed, depth first, down to the poison request:
    # 2 runs a level.
    assert [batch["x"][:, 0].tolist() for batch in model.batches[1:]] == [
        values,
        [0.0, 1.0, 2.0, 3.0],
        [4.0, POISON, 6.0, 7.0],
        [4.0, POISON],
        [4.0],
        [POISON],
        [6.0, 7.0],
    ]
    (logged,) = batcher_log(caplog)  # once for the batch, not once per request or per re-run
    assert logged.levelno == logging.ERROR
    assert logged.getMessage() == (
        "model 'test': a run of 8 requests (8 rows) raised; re-running its parts (6 runs): 1 failed, 7 rescued"
    )
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], ValueError)
    # The observer sees the batch once, failed with what its run raised; re-runs are not batches.
    assert recorder.named("batch") == [(1, 1, 1, 1), (8, 8, 8, 1)]
    assert recorder.named("done") == [(1, None, 0), (8, "ValueError", 0)]
    assert recorder.named("drop") == []
    assert (await within(batcher.submit(rows(5.0))))["y"].tolist() == [[10.0]]
    assert_idle(batcher)


async def test_two_poison_requests_fail_and_multi_row_requests_get_their_own_rows(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    batcher = make(model)
    requests = [rows(0, 1), rows(POISON), rows(2), rows(3, 4), rows(6, POISON)]
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"):
        outcomes = await as_one_batch(batcher, model, requests)
    for request, outcome in zip(requests, outcomes, strict=True):
        if POISON in request["x"]:
            assert isinstance(outcome, ModelRunError)
        else:
            assert isinstance(outcome, dict)
            assert outcome["y"].tolist() == (request["x"] * 2).tolist()
    (logged,) = batcher_log(caplog)
    assert logged.getMessage().endswith("2 failed, 3 rescued")
    assert_idle(batcher)


async def test_a_batch_where_every_request_is_poison_fails_each_after_2n_minus_1_runs(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    batcher = make(model)
    values = [POISON] * 4
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"):
        outcomes = await as_one_batch(batcher, model, [rows(value) for value in values])
    assert_answers(values, outcomes)
    assert model.sizes == [1, 4, 2, 1, 1, 2, 1, 1]
    (logged,) = batcher_log(caplog)
    assert logged.getMessage().endswith("(6 runs): 4 failed, 0 rescued")
    assert_idle(batcher)


async def test_re_runs_are_padded_to_their_own_longest_member_and_cropped_back(make: Make) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    model.answer = lambda inputs: {"y": inputs["x"] * 10}
    batcher = make(model, pad={"x": (PadSpec(axis=1, dim="seq", value=-1),)}, crop={"y": ((1, "seq"),)})
    lengths = [2, 4, 3, 1]
    requests = [{"x": np.arange(1, n + 1, dtype=np.int64)[None, :] + 10 * i} for i, n in enumerate(lengths)]
    requests[1]["x"][0, 2] = POISON
    outcomes = await as_one_batch(batcher, model, requests)
    assert isinstance(outcomes[1], ModelRunError)
    for i in (0, 2, 3):
        assert outcomes[i]["y"].tolist() == (requests[i]["x"] * 10).tolist()
    # The batch padded to 4, the poison half to 4 (then each alone), the other half to its own longest.
    assert [batch["x"].shape for batch in model.batches[1:]] == [(4, 4), (2, 4), (1, 2), (1, 4), (2, 3)]
    assert model.batches[-1]["x"].tolist() == [[21, 22, 23], [31, -1, -1]]
    assert_idle(batcher)


async def test_a_caller_that_leaves_during_isolation_is_not_re_run(make: Make) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    values = [POISON, 1.0, 2.0, 3.0]
    tasks = await fail_then_hold(
        batcher,
        model,
        [rows(value) for value in values],
        lambda inputs: len(inputs["x"]) == 2 and poisoned(inputs),
    )
    tasks[2].cancel()  # while the part [POISON, 1] is re-run
    with pytest.raises(asyncio.CancelledError):
        await tasks[2]
    model.gate.set()
    outcomes = await within(asyncio.gather(*tasks[:2], tasks[3], return_exceptions=True))
    assert_answers([POISON, 1.0, 3.0], outcomes)
    assert [batch["x"][:, 0].tolist() for batch in model.batches[1:]] == [
        [POISON, 1.0, 2.0, 3.0],
        [POISON, 1.0],
        [POISON],
        [1.0],
        [3.0],  # the caller of 2.0 left: its part re-runs without it
    ]
    assert recorder.named("drop") == [("cancelled",)]
    assert_idle(batcher)


async def test_a_deadline_that_passes_during_isolation_fails_only_that_caller(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    values = [POISON, 1.0, 2.0, 3.0]
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"):
        tasks = await fail_then_hold(
            batcher,
            model,
            [rows(value) for value in values],
            # The first re-run with POISON in it: [POISON, 1] (unless the batch formed without 2.0).
            lambda inputs: poisoned(inputs) and len(model.batches) > 2,
            deadlines={2: time.monotonic() + 0.5},
        )
        if len(model.batches[1]["x"]) != 4:
            pytest.skip("the deadline passed before the batch formed (a very slow machine)")
        # The part [POISON, 1] is held while the deadline of 2.0 passes.
        with pytest.raises(DeadlineExpiredError, match="model 'test': deadline expired"):
            await within(tasks[2])
        model.gate.set()
        outcomes = await within(asyncio.gather(*tasks[:2], tasks[3], return_exceptions=True))
    assert_answers([POISON, 1.0, 3.0], outcomes)
    assert model.batches[-1]["x"].tolist() == [[3.0]]
    assert ("deadline",) in recorder.named("drop")
    (logged,) = batcher_log(caplog)
    assert logged.getMessage().endswith("1 failed, 2 rescued, 1 left before an answer")
    assert_idle(batcher)


async def test_drain_during_isolation_keeps_answers_given_and_closes_the_rest(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(held=True)
    model.fail_when = poisoned
    batcher = make(model)
    values = [POISON, 1.0, 2.0, 3.0]
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"):
        tasks = await fail_then_hold(
            batcher,
            model,
            [rows(value) for value in values],
            lambda inputs: len(inputs["x"]) == 2 and 2.0 in inputs["x"],
        )
        await within(batcher.drain(0.0))
    outcomes = await within(asyncio.gather(*tasks, return_exceptions=True))
    assert_answers([POISON, 1.0], outcomes[:2])
    for closed in outcomes[2:]:
        assert isinstance(closed, BatcherClosedError)
    (logged,) = batcher_log(caplog)
    assert logged.getMessage().endswith("1 failed, 1 rescued, 2 cut short by shutdown")
    assert_idle(batcher)


async def test_a_lone_request_that_raises_is_logged_once(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel()
    model.fail_when = poisoned
    batcher = make(model)
    with caplog.at_level(logging.WARNING, logger="sluice.batcher"), pytest.raises(ModelRunError):
        await within(batcher.submit(rows(POISON)))
    (logged,) = batcher_log(caplog)
    assert logged.getMessage() == "model 'test': a run of 1 request (1 row) raised; its request failed"
    assert logged.exc_info is not None
    assert model.sizes == [1]


class Unsliceable(np.ndarray):
    """An output that passes the row check but breaks when split back to the callers."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("cannot slice")


async def test_outputs_that_cannot_be_split_fail_their_callers_and_the_batcher_serves_on(make: Make) -> None:
    model = FakeModel(held=True)
    model.answer = lambda inputs: {"y": np.zeros((len(inputs["x"]), 1)).view(Unsliceable)}
    batcher = make(model)
    outcomes = await as_one_batch(batcher, model, [rows(1.0), rows(2.0)])
    assert all(isinstance(o, ModelRunError) and "RuntimeError: cannot slice" in str(o) for o in outcomes)
    model.answer = lambda inputs: {"y": inputs["x"] * 2}
    assert (await within(batcher.submit(rows(4.0))))["y"].tolist() == [[8.0]]
    assert_idle(batcher)


# -- instances, policies, drain ------------------------------------------------------------------------


async def test_two_instances_run_two_batches_at_once(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model, instances=2, policy="none")
    first = spawn(batcher, rows(1.0))
    second = spawn(batcher, rows(2.0))
    await until(lambda: model.running == 2)
    assert batcher.busy == 2
    assert sorted(model.instances) == [0, 1]
    third = spawn(batcher, rows(3.0))
    await until(lambda: batcher.queue_rows == 1)  # both instances busy: it waits
    model.gate.set()
    await within(asyncio.gather(first, second, third))
    assert model.most_running == 2
    assert_idle(batcher)


async def test_a_batch_alone_runs_on_instance_0_whichever_instance_finished_last(make: Make) -> None:
    # A runtime may run instance 0 differently when it is alone (the onnx runtime's elastic threads give it
    # every thread), so a lone batch must get instance 0 even after instance 1 was the last one freed.
    model = FakeModel(held=True)
    batcher = make(model, instances=3, policy="none")
    first_gate = model.gate
    first = spawn(batcher, rows(1.0))
    await until(lambda: model.running == 1)
    model.gate = asyncio.Event()
    second = spawn(batcher, rows(2.0))
    await until(lambda: model.running == 2)
    first_gate.set()
    await within(first)
    model.gate.set()
    await within(second)
    await within(spawn(batcher, rows(3.0)))
    assert model.instances == [0, 1, 0]
    assert_idle(batcher)


async def test_a_cancelled_run_that_goes_on_keeps_its_instance_until_it_ends() -> None:
    # A run in a worker thread cannot be stopped when its caller leaves: the runtime says so through
    # `lingering`, and the instance is not handed to another batch until that run really ends.
    model = FakeModel(held=True)
    still: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asked: list[int] = []

    def lingering(instance: int) -> asyncio.Future[None] | None:
        asked.append(instance)
        return still

    config = BatcherConfig(max_batch_size=8, max_delay=0.0, instances=2, policy="none")
    batcher = Batcher(model.run, config, name="test", lingering=lingering)
    batcher.start()
    try:
        left = spawn(batcher, rows(1.0))
        await until(lambda: model.running == 1)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(left)
        assert asked == [0]
        assert batcher.busy == 1
        second = spawn(batcher, rows(2.0))
        await until(lambda: model.running == 1 and len(model.instances) == 2)
        assert model.instances == [0, 1]
        model.gate.set()
        assert (await within(second))["y"].tolist() == [[4.0]]
        assert batcher.busy == 1  # the first run has not ended yet
        still.set_result(None)
        await until(lambda: batcher.busy == 0)
        await within(batcher.submit(rows(3.0)))
        assert model.instances == [0, 1, 0]
        assert asked == [0]  # only a cancelled run is asked about
    finally:
        await batcher.drain(0)


async def test_policy_none_runs_every_request_alone(make: Make) -> None:
    model = FakeModel(held=True)
    batcher = make(model, policy="none")
    blocker = await hold_instance(batcher, model)
    tasks = [spawn(batcher, rows(float(i))) for i in range(3)]
    await until(lambda: batcher.queue_rows == 3)
    model.gate.set()
    await within(asyncio.gather(blocker, *tasks))
    assert model.sizes == [1, 1, 1, 1]


async def test_adaptive_runs_a_lone_request_without_waiting_for_the_delay(make: Make) -> None:
    model = FakeModel()
    batcher = make(model, policy="adaptive", max_delay=60.0)
    for value in range(5):
        result = await within(batcher.submit(rows(float(value))))
        assert result["y"].tolist() == [[2.0 * value]]
    assert model.sizes == [1] * 5
    assert batcher.estimates.target_rows < 1


async def test_drain_runs_what_is_queued_and_refuses_new_requests(make: Make) -> None:
    model = FakeModel(held=True)
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    blocker = await hold_instance(batcher, model)
    queued = [spawn(batcher, rows(float(i))) for i in range(3)]
    await until(lambda: batcher.queue_rows == 3)
    draining = asyncio.create_task(batcher.drain(5.0))
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosedError, match="model 'test'"):
        await batcher.submit(rows(9.0))
    assert ("closed", 0) in recorder.named("reject")
    model.gate.set()
    await within(draining)
    results = await within(asyncio.gather(blocker, *queued))
    assert [r["y"][0, 0] for r in results] == [-2.0, 0.0, 2.0, 4.0]
    assert_idle(batcher)


async def test_drain_fails_what_is_left_when_grace_runs_out(make: Make) -> None:
    model = FakeModel(held=True)  # never released
    recorder = Recorder()
    batcher = make(model, observer=recorder, max_batch_size=1)
    blocker = await hold_instance(batcher, model)
    queued = spawn(batcher, rows(1.0))
    await until(lambda: batcher.queue_rows == 1)
    await within(batcher.drain(0.0))
    assert_idle(batcher)
    for task in (blocker, queued):
        with pytest.raises(BatcherClosedError, match="model 'test': shut down before the request"):
            await within(task)
    assert ("shutdown",) in recorder.named("drop")
    with pytest.raises(BatcherClosedError):
        await batcher.submit(rows(2.0))


async def test_the_observer_sees_each_batch_once(make: Make) -> None:
    model = FakeModel(held=True)
    recorder = Recorder()
    batcher = make(model, observer=recorder)
    blocker = await hold_instance(batcher, model)
    tasks = [spawn(batcher, rows(float(i))) for i in range(3)]
    await until(lambda: batcher.queue_rows == 3)
    model.gate.set()
    await within(asyncio.gather(blocker, *tasks))
    assert recorder.named("enqueue") == [(1, 1), (1, 1), (1, 2), (1, 3)]
    assert recorder.named("batch") == [(1, 1, 1, 1), (3, 3, 3, 1)]
    assert recorder.named("done") == [(1, None, 0), (3, None, 0)]


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_delay": -1.0}, "max_delay"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"max_batch_size": 8, "max_queue_rows": 4}, "max_queue_rows"),
        ({"instances": 0}, "instances"),
        ({"policy": "eager"}, "policy"),
        ({"pad": {"x": (PadSpec(1, "seq"), PadSpec(1, "len"))}}, "axis twice"),
        ({"crop": {"y": ((1, "seq"),)}}, "not padded"),
        ({"isolate_failures": "yes"}, "isolate_failures"),
    ],
)
def test_bad_settings_are_refused_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**options)


def test_pad_axis_zero_is_the_batch() -> None:
    with pytest.raises(ValueError, match="axis 0 is the batch"):
        PadSpec(axis=0, dim="seq")


async def test_sparse_inputs_batch_as_coo_with_row_indices_offset(make: Make) -> None:
    model = FakeModel()

    def answer(inputs: dict[str, Any]) -> Mapping[str, Any]:
        coo = inputs["x"]
        assert isinstance(coo, CooArray)  # never densified on the way
        return {"y": coo.todense().sum(axis=1)}

    model.answer = answer
    batcher = make(model, max_delay=60.0, max_batch_size=3)  # runs once all three rows are in
    dense = [np.array([[0, 3, 0]], dtype=np.float32), np.array([[1, 0, 0], [0, 0, 5]], dtype=np.float32)]
    coo: list[Any] = [CooArray.from_dense(d) for d in dense]
    results = await within(asyncio.gather(*(batcher.submit({"x": c}) for c in coo)))
    assert len(model.batches) == 1
    batch = model.batches[0]["x"]
    assert isinstance(batch, CooArray)
    assert batch.shape == (3, 3)
    np.testing.assert_array_equal(batch.todense(), np.concatenate(dense))
    np.testing.assert_array_equal(results[0]["y"], [3])
    np.testing.assert_array_equal(results[1]["y"], [1, 5])
