"""Property: whatever the sizes, priorities, shapes, interleavings and cancellations, every caller gets
exactly its own rows back in order, and the batcher ends with nothing queued, in flight or busy; and
whichever requests make the model raise, exactly those fail."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.batcher import Batcher, BatcherConfig, ModelRunError, PadSpec

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Request:
    rows: int
    priority: int
    width: int  # requests of different widths cannot share a batch
    length: int  # the padded "seq" length
    yields_before: int
    cancel_after: int | None


@dataclass(frozen=True)
class Scenario:
    policy: Literal["adaptive", "fixed", "none"]
    max_batch_size: int
    instances: int
    padded: bool
    requests: list[Request]
    run_yields: list[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    max_batch_size = draw(st.integers(1, 6))
    request = st.builds(
        Request,
        rows=st.integers(1, max_batch_size),
        priority=st.integers(0, 2),
        width=st.integers(1, 2),
        length=st.integers(1, 4),
        yields_before=st.integers(0, 4),
        cancel_after=st.none() | st.integers(0, 6),
    )
    return Scenario(
        policy=draw(st.sampled_from(["adaptive", "fixed", "none"])),
        max_batch_size=max_batch_size,
        instances=draw(st.integers(1, 3)),
        padded=draw(st.booleans()),
        requests=draw(st.lists(request, min_size=1, max_size=20)),
        run_yields=draw(st.lists(st.integers(0, 3), min_size=1, max_size=8)),
    )


def inputs_of(index: int, request: Request, padded: bool) -> dict[str, Array]:
    ids = index * 100 + np.arange(request.rows, dtype=np.float64)
    inputs: dict[str, Array] = {"x": np.repeat(ids[:, None], request.width, axis=1)}
    if padded:
        positions = np.arange(request.length, dtype=np.int64)
        inputs["tok"] = (ids[:, None].astype(np.int64) * 10) + positions
    return inputs


async def play(scenario: Scenario, poison: frozenset[int] = frozenset()) -> None:
    """Plays `scenario`; the model raises for any batch holding a row of a request indexed in `poison`."""
    runs = 0

    async def run(instance: int, inputs: dict[str, Array]) -> dict[str, Array]:
        nonlocal runs
        assert 0 <= instance < scenario.instances
        assert len(inputs["x"]) <= scenario.max_batch_size
        for _ in range(scenario.run_yields[runs % len(scenario.run_yields)]):
            await asyncio.sleep(0)
        runs += 1
        if poison and np.isin(inputs["x"][:, 0] // 100, list(poison)).any():
            raise ValueError("poison in the batch")
        outputs = {"y": inputs["x"] * 2, "id": inputs["x"][:, 0].copy()}
        if "tok" in inputs:
            outputs["tok"] = inputs["tok"] + 1
        return outputs

    pad = {"tok": (PadSpec(axis=1, dim="seq", value=-7),)} if scenario.padded else {}
    crop = {"tok": ((1, "seq"),)} if scenario.padded else {}
    config = BatcherConfig(
        max_batch_size=scenario.max_batch_size,
        max_delay=0.0005,
        instances=scenario.instances,
        policy=scenario.policy,
        pad=pad,
        crop=crop,
    )
    batcher = Batcher(run, config, name="prop")
    batcher.start()

    async def caller(index: int, request: Request) -> dict[str, Array]:
        for _ in range(request.yields_before):
            await asyncio.sleep(0)
        return await batcher.submit(inputs_of(index, request, scenario.padded), priority=request.priority)

    tasks = [asyncio.create_task(caller(i, r)) for i, r in enumerate(scenario.requests)]
    for step in range(7):
        for task, request in zip(tasks, scenario.requests, strict=True):
            if request.cancel_after == step:
                task.cancel()
        await asyncio.sleep(0)
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    for index, (request, outcome) in enumerate(zip(scenario.requests, outcomes, strict=True)):
        if isinstance(outcome, asyncio.CancelledError):
            assert request.cancel_after is not None
            continue
        if index in poison:
            assert isinstance(outcome, ModelRunError), outcome
            assert isinstance(outcome.__cause__, ValueError)
            continue
        assert isinstance(outcome, dict), outcome
        sent = inputs_of(index, request, scenario.padded)
        np.testing.assert_array_equal(outcome["y"], sent["x"] * 2)
        np.testing.assert_array_equal(outcome["id"], sent["x"][:, 0])
        if scenario.padded:
            np.testing.assert_array_equal(outcome["tok"], sent["tok"] + 1)
    assert batcher.queue_rows == 0
    await asyncio.wait_for(batcher.drain(5), 10)
    assert (batcher.queue_rows, batcher.in_flight, batcher.busy) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_every_caller_gets_exactly_its_own_rows(scenario: Scenario) -> None:
    asyncio.run(play(scenario))


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.sets(st.integers(0, 19)))
def test_exactly_the_requests_that_make_the_model_raise_fail(scenario: Scenario, poison: set[int]) -> None:
    asyncio.run(play(scenario, frozenset(poison)))
