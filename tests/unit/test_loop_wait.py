"""The adaptive policy's wait for company while the event loop is saturated: its cap is found by measuring
rows/s, and a crowd of callers is batched even though the model itself is idle."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import numpy as np
import pytest

from sluice.batcher import Batcher, BatcherConfig
from sluice.batcher.policy import CAP_DITHER, CAP_FLOOR, CAP_STEP, CAP_WINDOW, AdaptivePolicy, LoadModel

MAX_DELAY = 2e-3


def policy(pressure: float) -> AdaptivePolicy:
    config = BatcherConfig(policy="adaptive", max_delay=MAX_DELAY, max_batch_size=64)
    return AdaptivePolicy(config, LoadModel(), lambda: pressure)


def climb(
    policy: AdaptivePolicy,
    rows_per_s: Callable[[float], float],
    windows: int,
    load: Callable[[float], float] = lambda now: 1.0,
) -> list[float]:
    """Dispatches 8 batches per window, each carrying the rows that `rows_per_s(cap)` allows, times
    `load(now)` (how much of the machine the server gets); returns the cap seen at each batch."""
    caps = []
    now = 0.0
    step = CAP_WINDOW / 8
    for _ in range(windows * 8):
        now += step
        wait, _ = policy.plan(2, 0.0, now)  # a head with company due: a loop-bound wait
        assert 0 < wait <= MAX_DELAY
        policy.wait_began(2)
        rows = round(rows_per_s(policy.wait_cap) * load(now) * step)
        policy.dispatched(rows, rows, wait, now)
        caps.append(policy.wait_cap)
    return caps


def test_callers_that_gain_from_short_waits_bring_the_cap_down_to_the_best_one() -> None:
    best = MAX_DELAY / 4
    # Few closed-loop callers: rows/s peak at a short wait, and fall off on both sides.
    caps = climb(policy(1.0), lambda cap: 4000 - 1e6 * abs(cap - best), 40)
    late = caps[-80:]
    assert all(best / CAP_STEP**2 <= cap <= best * CAP_STEP**2 for cap in late), late
    assert min(caps) >= MAX_DELAY * CAP_FLOOR
    assert max(caps) <= MAX_DELAY


def test_a_crowd_that_gains_from_long_waits_keeps_the_full_wait() -> None:
    caps = climb(policy(1.0), lambda cap: 2000 + 1e6 * cap, 40)
    late = caps[-80:]
    assert max(late) == MAX_DELAY  # the centre stays at the top; every other window looks just below it
    assert min(late) >= MAX_DELAY / CAP_DITHER


@pytest.mark.parametrize("best", [MAX_DELAY / 10, MAX_DELAY / 2])
def test_a_machine_whose_load_swings_does_not_throw_the_cap_off_its_optimum(best: float) -> None:

    # Rows/s differ by at most 20% across the caps, while what the machine leaves the server swings by
    # 30% over a few seconds (other processes come and go): more than any step of the cap changes.
    def swing(now: float) -> float:
        return 1.0 + 0.3 * math.sin(2 * math.pi * now / 3.0)

    caps = climb(policy(1.0), lambda cap: 4000 * (1 - 0.05 * math.log2(cap / best) ** 2), 240, swing)
    late = caps[-8 * 120 :]
    assert all(best / CAP_STEP**2 <= cap <= best * CAP_STEP**2 for cap in late), sorted(set(late))


def test_a_pause_in_traffic_does_not_move_the_cap() -> None:
    steady = policy(1.0)
    caps = climb(steady, lambda cap: 3000.0, 16)  # rows/s the same at every cap: the centre stays
    both = set(caps[-16:])
    assert len(both) == 2
    now = 16 * CAP_WINDOW + 5.0  # five idle seconds, then the traffic comes back
    for _ in range(40):
        now += CAP_WINDOW / 8
        wait, _ = steady.plan(2, 0.0, now)
        steady.wait_began(2)
        steady.dispatched(375, 375, wait, now)  # 3000 rows/s again
        assert steady.wait_cap in both


def test_the_cap_does_not_move_while_the_loop_is_not_saturated() -> None:
    idle = policy(0.0)
    start = idle.wait_cap
    now = 0.0
    for _ in range(100):
        now += CAP_WINDOW / 4
        idle.plan(1, 0.0, now)
        idle.dispatched(1, 1, 0.0, now)
    assert idle.wait_cap == start


async def test_a_saturated_loop_batches_a_crowd_although_the_model_is_idle() -> None:
    sizes: list[int] = []

    async def run(instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    config = BatcherConfig(policy="adaptive", max_delay=60.0, max_batch_size=4)
    batcher = Batcher(run, config, name="saturated", pressure=lambda: 1.0)
    batcher.start()
    try:
        calls = [batcher.submit({"x": np.full((1, 1), i, np.float32)}) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*calls), 5)
    finally:
        await batcher.drain(0)
    # With an idle loop the first caller would have run alone at once; here all four share one run, which
    # starts as soon as the batch is full (not after the 60 s max_delay).
    assert sizes == [4]
    assert [r["y"][0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0]
