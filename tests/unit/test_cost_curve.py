"""The cost curve behind the adaptive batch limit, fed synthetic runs (no clocks), and through the batcher.

The three shapes are the ones a CPU shows (issue 13): convex, where a batch whose activations outgrow the
caches costs more per element (MiniLM at seq 128: best at a few rows); throughput that grows with the
batch (the digits model: bigger is always better); and flat, where only noise tells sizes apart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.batcher import Batcher, BatcherConfig, PadSpec
from sluice.batcher.policy import CostCurve

Seconds = Callable[[int], float]
"""Run time of a batch of so many input elements."""


def convex(elements: int) -> float:
    """Cheapest per element at 512 elements; each doubling away costs 8%, 32%, 72% ... more."""
    return elements * 1e-6 * (1 + 0.08 * (math.log2(elements) - 9) ** 2)


def growing(elements: int) -> float:
    """A fixed 50 us per run plus 0.1 us per element: per element, bigger is always cheaper."""
    return 50e-6 + elements * 1e-7


def flat(seed: int) -> Seconds:
    """The same cost per element at every size, each run within 3% of it."""
    rng = random.Random(seed)
    return lambda elements: elements * 1e-6 * (1 + rng.uniform(-0.03, 0.03))


def saturate(
    curve: CostCurve, seconds: Seconds, *, per_row: int, max_rows: int, runs: int, queued: int = 1000
) -> list[tuple[int, int]]:
    """Runs `runs` batches from a queue that always holds `queued` rows; (rows run, rows allowed) each."""
    batches = []
    for _ in range(runs):
        rows, limit = curve.rows(queued, per_row, max_rows)
        batches.append((rows, limit))
        curve.record(rows * per_row, seconds(rows * per_row))
    return batches


def settled_after(batches: Sequence[tuple[int, int]], limit: int) -> int:
    """How many batches ran before the limit reached `limit` for good."""
    for start in range(len(batches), 0, -1):
        if batches[start - 1][1] != limit:
            return start
    return 0


def probes(batches: Iterable[tuple[int, int]]) -> int:
    return sum(rows != limit for rows, limit in batches)


# -- the three shapes -----------------------------------------------------------------------------------


def test_a_convex_curve_settles_on_its_cheapest_size_within_twenty_batches() -> None:
    curve = CostCurve()
    batches = saturate(curve, convex, per_row=128, max_rows=64, runs=300)
    assert batches[0] == (64, 64)  # no curve yet: max_batch_size, as before
    assert settled_after(batches, 4) <= 20  # 4 rows of 128 elements: the 512 where it is cheapest
    assert curve.limit == 512
    # Settled, it re-probes the sizes next to the limit rarely: about twice every CURVE_REPROBE runs.
    assert probes(batches[-256:]) <= 256 // 16 + 2
    assert {rows for rows, _ in batches[-256:]} <= {2, 4, 8}


def test_a_convex_curve_climbs_up_from_light_load_runs() -> None:
    curve = CostCurve()
    for _ in range(5):  # one caller at a time: one-row runs only
        curve.record(128, convex(128))
    assert curve.limit == 0  # bigger might be cheaper: nothing limits the batch yet
    batches = saturate(curve, convex, per_row=128, max_rows=64, runs=100)
    assert settled_after(batches, 4) <= 10
    assert max(rows for rows, _ in batches) <= 8  # it never needed to try the sizes past the best


def test_when_bigger_is_always_cheaper_batches_stay_at_max_batch_size() -> None:
    for history in ([], [64] * 5):  # from nothing, and from light-load one-row runs of 64 elements
        curve = CostCurve()
        for elements in history:
            curve.record(elements, growing(elements))
        batches = saturate(curve, growing, per_row=64, max_rows=32, runs=300)
        assert curve.limit == 0
        assert settled_after(batches, 32) <= 12
        assert all(limit == 32 for _, limit in batches[12:])
        # Only the size below is ever re-probed: about once every CURVE_REPROBE runs.
        assert probes(batches[-256:]) <= 256 // 32 + 2


@pytest.mark.parametrize("seed", range(5))
def test_a_flat_noisy_curve_keeps_max_batch_size_and_never_oscillates(seed: int) -> None:
    curve = CostCurve()
    batches = saturate(curve, flat(seed), per_row=128, max_rows=64, runs=300)
    # While each size has run only twice, 3% noise can look like 6%: the limit may step down once, early.
    assert all(limit == 64 for _, limit in batches[8:])
    assert sum(a[1] != b[1] for a, b in itertools.pairwise(batches)) <= 2
    assert curve.limit == 0
    # Noise may make a smaller size look cheapest and send the climb to the sizes next to it, but a size
    # is explored only until it has run twice; else only the size below max is re-probed, every 32 runs.
    assert probes(batches[-256:]) <= 256 // 32 + 1 + 2 * 7


def test_ties_go_to_the_larger_batch() -> None:
    curve = CostCurve()
    for elements, per_element in ((256, 1.00), (512, 1.03), (1024, 1.20)):
        for _ in range(2):
            curve.record(elements, elements * per_element * 1e-6)
    assert curve.limit == 512  # 3% dearer than 256 counts as equal; 20% does not
    assert curve.cost(512) == pytest.approx(512 * 1.03e-6 / 512)
    assert curve.cost(2048) is None


def test_a_batch_one_row_short_counts_with_the_full_one() -> None:
    curve = CostCurve()
    curve.record(63 * 256, 1.0)
    curve.record(64 * 256, 1.0)
    assert curve.cost(64 * 256) is not None  # both runs landed in the same size
    assert curve.cost(32 * 256) is None


def test_a_pre_empted_run_does_not_move_the_limit() -> None:
    # A run the OS pre-empted takes a scheduler slice (milliseconds) where it needed microseconds.
    curve = CostCurve()
    saturate(curve, growing, per_row=64, max_rows=32, runs=100)
    assert curve.limit == 0
    curve.record(32 * 64, 100 * growing(32 * 64))
    assert curve.limit == 0  # the full batch is still the cheapest per element
    # Among a size's first runs too: the second run of 64 elements was pre-empted.
    first = CostCurve()
    for elements, slow in ((32, 1), (32, 1), (64, 1), (64, 100)):
        first.record(elements, slow * growing(elements))
    assert first.limit == 0


def test_a_run_timed_at_zero_seconds_does_not_pin_its_size_at_zero() -> None:
    curve = CostCurve()  # a coarse clock can time a short run at 0 s
    for seconds in [0.0, 1e-3] + [1e-3] * 20:
        curve.record(64, seconds)
    cost = curve.cost(64)
    assert cost is not None
    assert cost > 0.5e-3 / 64


# -- exploration stays within bounds --------------------------------------------------------------------

shapes: list[Seconds] = [convex, growing, flat(0)]


@settings(max_examples=150, deadline=None)
@given(
    shape=st.sampled_from(range(len(shapes))),
    per_row=st.sampled_from([1, 3, 64, 128, 384, 5000]),
    max_rows=st.integers(1, 100),
    queues=st.lists(st.integers(1, 200), min_size=1, max_size=120),
)
def test_exploration_never_exceeds_max_batch_size_nor_what_is_queued(
    shape: int, per_row: int, max_rows: int, queues: list[int]
) -> None:
    curve = CostCurve()
    for queued in queues:
        rows, limit = curve.rows(queued, per_row, max_rows)
        assert 1 <= limit <= max_rows
        assert 1 <= rows <= max_rows
        assert rows == limit or rows <= queued, "a probe larger than the queue would measure a smaller batch"
        run = min(rows, queued)
        curve.record(run * per_row, shapes[shape](run * per_row))


def test_a_short_queue_is_never_probed() -> None:
    curve = CostCurve()
    saturate(curve, convex, per_row=128, max_rows=64, runs=40)
    assert curve.limit == 512
    for _ in range(200):  # a lone caller: every batch is one row, and nothing else is tried
        rows, limit = curve.rows(1, 128, 64)
        assert (rows, limit) == (4, 4)
        curve.record(128, convex(128))


# -- through the batcher --------------------------------------------------------------------------------


class Measured(CostCurve):
    """A curve measured beforehand, which the batcher's own runs leave as it is (their run times are this
    machine's wall-clock noise); it keeps the elements of each run it is told of."""

    def __init__(self, points: Iterable[tuple[int, float]]) -> None:
        super().__init__()
        for elements, seconds in points:
            super().record(elements, seconds)
        self.runs: list[int] = []

    def record(self, elements: int, seconds: float) -> None:
        self.runs.append(elements)


def cheapest_at(elements: int) -> Measured:
    """Runs measured at half, once and twice `elements`, the middle one cheapest per element by far."""
    return Measured(
        (size, size * cost)
        for size, cost in ((elements // 2, 2e-6), (elements, 1e-6), (elements * 2, 2e-6))
        for _ in range(2)
    )


class Held:
    """A model that doubles its input, holding every run until `gate` opens; records each batch's rows."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sizes: list[int] = []

    async def run(self, instance: int, inputs: dict[str, Any]) -> dict[str, Any]:
        self.sizes.append(len(inputs["x"]))
        await self.gate.wait()
        return {"y": inputs["x"] * 2}


async def fill_then_release(batcher: Batcher, model: Held, requests: list[np.ndarray]) -> list[Any]:
    """One request holds the instance while the rest queue up; then every run is let through."""
    first = asyncio.create_task(batcher.submit({"x": requests[0]}))
    await until(lambda: len(model.sizes) == 1)
    rest = [asyncio.create_task(batcher.submit({"x": x})) for x in requests[1:]]
    await until(lambda: batcher.queue_rows == sum(len(x) for x in requests[1:]))
    model.gate.set()
    return await asyncio.wait_for(asyncio.gather(first, *rest), 5)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_batches_of_a_saturated_queue_respect_the_curves_limit() -> None:
    curve = cheapest_at(64)  # 4 rows of 16 elements
    model = Held()
    config = BatcherConfig(policy="adaptive", max_batch_size=8, max_delay=0.0)
    batcher = Batcher(model.run, config, curve=curve)
    batcher.start()
    results = await fill_then_release(batcher, model, [np.full((1, 16), i, np.float32) for i in range(11)])
    await batcher.drain(0)
    assert model.sizes == [1, 4, 4, 2]
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(11)]
    assert curve.runs == [16, 64, 64, 32]  # every run's input elements reach the curve
    estimates = batcher.estimates
    assert (estimates.limit_rows, estimates.limit_elements) == (4, 64)


async def test_a_settled_limit_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    model = Held()
    config = BatcherConfig(policy="adaptive", max_batch_size=8, max_delay=0.0)
    batcher = Batcher(model.run, config, name="m", curve=cheapest_at(64))
    batcher.start()
    requests = [np.full((1, 16), i, np.float32) for i in range(1 + 4 * 40)]
    with caplog.at_level(logging.INFO, logger="sluice.batcher"):
        await fill_then_release(batcher, model, requests)
    await batcher.drain(0)
    assert model.sizes == [1] + [4] * 40
    lines = [r.getMessage() for r in caplog.records if "batch limit" in r.getMessage()]
    assert lines == [
        "model 'm': batch limit 4 rows (was 8): batches of about 64 input elements run cheapest per element"
    ]


class Synthetic(CostCurve):
    """Records every run at the cost `seconds` gives its elements, not at this machine's wall clock."""

    def __init__(self, seconds: Seconds) -> None:
        super().__init__()
        self.seconds = seconds

    def record(self, elements: int, seconds: float) -> None:
        super().record(elements, self.seconds(elements))


async def test_a_limit_that_noise_pushed_to_one_row_climbs_back_under_a_crowd() -> None:
    curve = Synthetic(growing)
    # Start-up noise: the first batches of 2 and 4 rows ran five times slower than they do.
    for elements, slow in ((16, 1), (16, 1), (32, 5), (32, 5), (64, 5), (64, 5)):
        CostCurve.record(curve, elements, slow * growing(elements))
    assert curve.limit == 16  # one row
    sizes: list[int] = []

    async def run(instance: int, inputs: dict[str, Any]) -> dict[str, Any]:
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    # A saturated event loop and a model that answers at once: a batch forms only while its first request
    # waits for company, and a wait for a limit of one row ends before it starts.
    config = BatcherConfig(policy="adaptive", max_batch_size=8, max_delay=0.05)
    batcher = Batcher(run, config, curve=curve, pressure=lambda: 1.0)
    batcher.start()
    answers: dict[int, float] = {}

    async def caller(first: int) -> None:
        for n in range(first, first + 64):
            answer = await batcher.submit({"x": np.full((1, 16), n, np.float32)})
            answers[n] = float(answer["y"][0, 0])
            await asyncio.sleep(0)  # the caller's next request comes a loop turn later

    await asyncio.wait_for(asyncio.gather(*(caller(1000 * i) for i in range(16))), 20)
    await batcher.drain(0)
    assert answers == {n: 2.0 * n for i in range(16) for n in range(1000 * i, 1000 * i + 64)}
    # Probes of twice the limit gathered their rows and found bigger batches cheaper, size by size.
    assert batcher.estimates.limit_rows == 8
    assert curve.limit == 0
    assert sum(sizes[-32:]) >= 6 * 32, sizes[-32:]


async def test_callers_too_few_to_fill_a_probe_are_rarely_held_for_one() -> None:
    curve = Synthetic(convex)
    saturate(curve, convex, per_row=128, max_rows=16, runs=300)
    assert curve.limit == 512  # 4 rows of 128 elements; a probe of the size above needs 8
    gathered: list[bool] = []
    gather = curve.gathered

    def counted(filled: bool) -> None:
        gathered.append(filled)
        gather(filled)

    curve.gathered = counted  # type: ignore[method-assign]

    async def run(instance: int, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"y": inputs["x"]}

    config = BatcherConfig(policy="adaptive", max_batch_size=16, max_delay=0.01)
    batcher = Batcher(run, config, curve=curve, pressure=lambda: 1.0)
    batcher.start()

    async def caller() -> None:  # 6 closed-loop callers: never 8 rows queued
        for _ in range(1400):
            await batcher.submit({"x": np.zeros((1, 128), np.float32)})
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(6))), 30)
    await batcher.drain(0)
    # About 2,000 batches; a wait for the probe's rows after 32, 64, 128 ... runs, not every 32.
    assert 1 <= len(gathered) <= 8, len(gathered)
    assert not any(gathered)


async def test_the_fixed_policy_ignores_the_curve() -> None:
    model = Held()
    config = BatcherConfig(policy="fixed", max_batch_size=8, max_delay=0.0)
    batcher = Batcher(model.run, config, curve=cheapest_at(64))
    batcher.start()
    await fill_then_release(batcher, model, [np.full((1, 16), i, np.float32) for i in range(11)])
    await batcher.drain(0)
    assert model.sizes == [1, 8, 2]
    assert batcher.estimates.limit_rows == 8
    assert batcher.estimates.limit_elements == 0


async def test_the_curve_counts_padded_elements_and_sizes_rows_by_the_head() -> None:
    curve = cheapest_at(64)
    model = Held()
    config = BatcherConfig(
        policy="adaptive",
        max_batch_size=8,
        max_delay=0.0,
        pad={"x": (PadSpec(axis=1, dim="seq"),)},
    )
    batcher = Batcher(model.run, config, curve=curve)
    batcher.start()
    # The head has 32 elements a row: the limit of 64 elements is 2 of its rows.
    lengths = [32, 32, 16, 8, 8]
    await fill_then_release(batcher, model, [np.ones((1, n), np.float32) for n in lengths])
    await batcher.drain(0)
    assert model.sizes == [1, 2, 2]
    assert curve.runs == [32, 2 * 32, 2 * 8]  # the 16-long request was padded to 32
