"""The event loop's busy fraction, which the adaptive batchers read: a loop that has work but is kept off the
CPU is busy, not idle, or batching stops exactly when a machine runs short of CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sluice.batcher.policy import LOOP_SATURATED
from sluice.server import scheduling
from sluice.server.scheduling import LoopLoad
from sluice.server.spin import LoopSpin

# Computes until told to stop, for 30 s at most, and not a moment after the test process is gone.
HOG = """
import os, sys, time
parent, end = os.getppid(), time.monotonic() + 30
print("computing", flush=True)
while time.monotonic() < end and os.getppid() == parent:
    pass
"""


def waited_for_a_cpu() -> int:
    """ns this thread has waited for a CPU while ready to run (the kernel's count)."""
    return int(Path(scheduling.SCHEDSTAT).read_text().split()[1])


@contextmanager
def sharing_one_cpu() -> Iterator[None]:
    """This thread and a process that computes without pause pinned to the same CPU: the thread gets
    about half of it, whatever else the machine is doing. Skips where affinity cannot be set."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "computing"
        try:
            os.sched_setaffinity(hog.pid, {cpu})
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            pytest.skip(f"cannot pin threads to a CPU here: {exc}")
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)
    finally:
        hog.kill()
        hog.wait()
        hog.stdout.close()


def compute(seconds: float) -> None:
    """Keeps this thread ready to run for `seconds` of wall time."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


needs_schedstat = pytest.mark.skipif(
    not Path(scheduling.SCHEDSTAT).exists() or not hasattr(os, "sched_setaffinity"),
    reason="needs /proc/thread-self/schedstat and sched_setaffinity",
)


@needs_schedstat
async def test_a_loop_kept_off_the_cpu_reads_as_saturated() -> None:
    busy, share = await kept_off_the_cpu(LoopSpin(0.0))
    # By CPU time alone it would read `share`: a loop that looks half idle, whose batcher stops waiting.
    assert busy >= LOOP_SATURATED
    assert busy > share + 0.2


@needs_schedstat
async def test_a_loop_waiting_behind_the_servers_own_threads_is_not_saturated_by_it() -> None:
    # A model's run in a worker thread holds the loop up: waiting for company would only delay the next run.
    spin = LoopSpin(0.0)
    work = object()
    spin.hold(work)
    busy, share = await kept_off_the_cpu(spin)
    spin.release(work)
    assert busy == pytest.approx(share, abs=0.15)

    def brief() -> None:
        spin.hold(work)
        spin.release(work)

    # And a window that merely saw such work start and end counts it the same way.
    busy, share = await kept_off_the_cpu(spin, brief)
    assert busy == pytest.approx(share, abs=0.15)


async def kept_off_the_cpu(
    spin: LoopSpin | None, meanwhile: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """What LoopLoad reads for 0.3 s of a loop that computes without pause but shares its CPU, and the
    share of that time it computed; skips where it cannot be kept off the CPU. `meanwhile` runs at the
    start of that window."""
    load = LoopLoad(window=0.01, spin=spin)
    await asyncio.sleep(0.02)
    load()  # the first window: the measure starts on the loop's thread
    with sharing_one_cpu():
        started, cpu, waited = time.monotonic(), time.thread_time(), waited_for_a_cpu()
        load()
        meanwhile()
        compute(0.3)
        busy = load()
        share = (time.thread_time() - cpu) / (time.monotonic() - started)
        if share >= 0.8 or waited_for_a_cpu() == waited:
            pytest.skip(f"the thread was not kept off the CPU here (it computed {share:.2f} of the time)")
    return busy, share


@needs_schedstat
async def test_without_a_spinner_to_track_the_servers_threads_it_counts_cpu_time() -> None:
    busy, share = await kept_off_the_cpu(None)
    assert busy == pytest.approx(share, abs=0.15)


async def idle_then_work() -> tuple[float, float, float]:
    """What a new LoopLoad reads for 0.1 s of sleeping, then for 0.1 s of computing; and the share of the
    second 0.1 s the thread computed."""
    load = LoopLoad(window=0.01, spin=LoopSpin(0.0))
    await asyncio.sleep(0.02)
    load()
    await asyncio.sleep(0.1)
    idle = load()
    started, cpu = time.monotonic(), time.thread_time()
    compute(0.1)
    busy = load()
    return idle, busy, (time.thread_time() - cpu) / (time.monotonic() - started)


async def test_an_idle_loop_reads_as_idle_and_work_as_work() -> None:
    idle, busy, share = await idle_then_work()
    assert idle < 0.4
    assert busy >= min(share, LOOP_SATURATED)


async def test_without_schedstat_it_counts_cpu_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduling, "SCHEDSTAT", "/nonexistent/schedstat")
    idle, busy, share = await idle_then_work()
    assert idle < 0.4
    assert busy == pytest.approx(share, abs=0.15)  # CPU time alone: what the machine leaves the thread


async def test_a_stopped_measure_lets_go_of_its_file() -> None:
    load = LoopLoad(window=0.01, spin=LoopSpin(0.0))
    await asyncio.sleep(0.02)
    load()
    load.close()
    load.close()  # twice is harmless
    compute(0.02)
    assert load() > 0.0  # still measuring, by CPU time
