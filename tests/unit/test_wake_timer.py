"""The dispatcher's wake-up timer (sluice.batcher.timer): it fires once, never before its time, not after a
disarm, on both event loops, with or without a timerfd; and a batcher gives its file descriptor back.

How close to its time it fires is a benchmark's business (benchmarks/RESULTS.md), not a test's."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.batcher import Batcher, BatcherConfig
from sluice.batcher import timer as timer_module
from sluice.batcher.timer import WakeTimer

LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(sys.platform == "win32", reason="no uvloop")),
]


def run(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("timerfd", [True, False], ids=["timerfd", "call_later"])
def test_a_timer_fires_once_not_before_its_time_and_not_after_a_disarm(
    kind: str, timerfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not timerfd:
        monkeypatch.setattr(timer_module, "_TIMERFD", None)

    async def main() -> None:
        fired: list[float] = []
        timer = WakeTimer(asyncio.get_running_loop(), lambda: fired.append(time.monotonic()))
        if not timerfd:
            assert not timer.precise
        try:
            for delay in (0.0007, 0.0016, 0.003):
                fired.clear()
                armed = time.monotonic()
                timer.arm(delay)
                await asyncio.sleep(delay + 0.05)
                assert len(fired) == 1, (delay, fired)
                assert fired[0] - armed >= delay * 0.999, (
                    delay,
                    fired[0] - armed,
                )  # a window is never cut short

            fired.clear()
            timer.arm(0.001)
            timer.disarm()
            await asyncio.sleep(0.02)
            assert fired == []

            timer.arm(0.5)
            timer.arm(0.001)  # the second time replaces the first
            await asyncio.sleep(0.02)
            assert len(fired) == 1
        finally:
            timer.close()

    run(kind, main)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
@pytest.mark.parametrize("kind", LOOPS)
def test_batchers_that_waited_give_their_timers_back_when_drained(kind: str) -> None:
    async def main() -> None:
        async def run_batch(instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": inputs["x"] + 1}

        before = open_fds()
        for i in range(20):
            # A fixed 0.7 ms window: each lone request waits for it on the timer.
            config = BatcherConfig(policy="fixed", max_delay=0.0007, max_batch_size=8)
            batcher = Batcher(run_batch, config, name=f"timed{i}")
            batcher.start()
            result = await batcher.submit({"x": np.full((1, 1), i, np.float32)})
            assert result["y"][0, 0] == i + 1
            await batcher.drain(1.0)
        assert open_fds() <= before + 1  # +1: the loop may have opened something of its own meanwhile

    run(kind, main)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
def test_a_batcher_drained_before_its_dispatcher_ran_gives_its_timer_back() -> None:
    async def main() -> None:
        async def run_batch(instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return inputs

        before = open_fds()
        for i in range(20):
            batcher = Batcher(run_batch, BatcherConfig(policy="fixed", max_delay=0.0007), name=f"idle{i}")
            batcher.start()
            await batcher.drain(0)  # the dispatcher task is cancelled before it ever ran
        assert open_fds() <= before + 1

    asyncio.run(main())


@pytest.mark.parametrize(("window", "armed"), [(0.0007, True), (0.0004, False)])
def test_a_window_over_half_a_millisecond_is_timed_and_a_shorter_one_polled(
    window: float, armed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    arm = WakeTimer.arm

    def spy(self: WakeTimer, delay: float) -> None:
        delays.append(delay)
        arm(self, delay)

    monkeypatch.setattr(WakeTimer, "arm", spy)

    async def main() -> None:
        sizes: list[int] = []

        async def run_batch(instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            sizes.append(len(inputs["x"]))
            return inputs

        batcher = Batcher(
            run_batch, BatcherConfig(policy="fixed", max_delay=window, max_batch_size=8), name="w"
        )
        batcher.start()
        try:
            started = time.monotonic()
            await batcher.submit({"x": np.zeros((1, 1), np.float32)})
            assert time.monotonic() - started >= window * 0.999  # the lone request waited out its window
        finally:
            await batcher.drain(1.0)
        assert sizes == [1]

    asyncio.run(main())
    if armed:
        assert delays, "a 0.7 ms window was not timed by the WakeTimer"
        assert all(0 < d <= window for d in delays), delays
    else:
        assert delays == [], "a window of at most 0.5 ms is polled, not timed"
