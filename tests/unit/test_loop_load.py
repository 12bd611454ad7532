"""The event loop's busy fraction, which the adaptive batchers read: a loop that has work but is kept off the
CPU is busy, not idle, or batching stops exactly when a machine runs short of CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sluice.server.scheduling import LoopLoad

SCHEDSTAT = Path("/proc/thread-self/schedstat")


@contextmanager
def sharing_one_cpu() -> Iterator[None]:
    """This thread and a process that computes without pause pinned to the same CPU: the thread gets
    about half of it, whatever else the machine is doing."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.05)  # the hog is running before anything is measured
        yield
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()


def compute(seconds: float) -> None:
    """Keeps this thread ready to run for `seconds` of wall time."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not SCHEDSTAT.exists() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
async def test_a_loop_kept_off_the_cpu_reads_as_saturated() -> None:
    load = LoopLoad(window=0.01)
    await asyncio.sleep(0.02)
    load()  # the first window: the measure starts on the loop's thread
    with sharing_one_cpu():
        started, cpu = time.monotonic(), time.thread_time()
        load()
        compute(0.3)
        busy = load()
        share = (time.thread_time() - cpu) / (time.monotonic() - started)
    assert share < 0.8, f"the thread was not kept off the CPU (it computed {share:.2f} of the time)"
    # By CPU time alone it would read `share`: a loop that looks half idle, whose batcher stops waiting.
    assert busy > 0.9


async def idle_then_work() -> tuple[float, float]:
    """What a new LoopLoad reads for 0.1 s of sleeping, then for 0.1 s of computing."""
    load = LoopLoad(window=0.01)
    await asyncio.sleep(0.02)
    load()
    await asyncio.sleep(0.1)
    idle = load()
    compute(0.1)
    return idle, load()


async def test_an_idle_loop_reads_as_idle_and_work_as_work() -> None:
    idle, busy = await idle_then_work()
    assert idle < 0.3
    assert busy > 0.7


async def test_without_schedstat_it_counts_cpu_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError("no schedstat here")

    monkeypatch.setattr(os, "open", refuse)
    idle, busy = await idle_then_work()
    assert idle < 0.3
    assert busy > 0.5  # CPU time alone: what the machine's neighbours leave of it
