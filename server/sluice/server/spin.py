"""Keeping the event loop awake between requests that come close together.

A thread that waits in epoll halts its core; on a virtual machine the host then runs something else there.
The next request finds every cache cold and pays for it in full: measured on a 2-core VM, one caller's
request cost the server 250 us of CPU against 80 us for the same request on a loop that never slept (see
benchmarks/RESULTS.md). So for `loop_spin_us` after each request arrives the loop polls instead of sleeping:
one callback that schedules itself again, so each pass of the loop polls its sockets without a timeout.

It costs at most one core, and only while requests keep coming less than the window apart; an idle server
sleeps as before. A loop busy with requests already sleeps little, and its spinning would take CPU from
whatever shares the machine (a second worker, the clients), so the loop spins only while it is less than
BUSY busy; nor does it spin while a batch computes in a worker thread (`hold`): that run needs the cores.
The time the loop spends only spinning is counted (`spun`), so that the measure of a busy loop (`LoopLoad`,
which the adaptive batcher reads too) does not take spinning for load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

IDLE_PASS = 50e-6
"""A pass of the loop shorter than this ran nothing but the spin (a request takes longer)."""
BUSY = 0.5
"""The busy fraction of the loop (spinning left out) from which it no longer spins."""


class LoopSpin:
    """Polls the event loop for `window` seconds after the last `arrived()`, instead of letting it sleep."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.spun = 0.0
        """Seconds the loop has spent spinning with nothing else to do, in all."""
        self._until = 0.0
        self._last = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # set while spinning
        self._held = 0  # runs computing in worker threads
        self.load: Callable[[], float] | None = None
        """The loop's busy fraction with the spinning left out (a `LoopLoad` made with this spinner);
        unset, the loop spins at any load."""

    @property
    def spinning(self) -> bool:
        return self._loop is not None

    def arrived(self, now: float) -> None:
        """A request arrived at `now` (time.monotonic()): keep spinning until `now + window`."""
        self._until = now + self.window
        if self._loop is None:
            self._start(now)

    def hold(self) -> None:
        """A run starts computing in a worker thread: no spinning until it ends (`release`)."""
        self._held += 1

    def release(self) -> None:
        """The run ended: spinning resumes if the last arrival is less than the window ago."""
        self._held -= 1
        if self._loop is None:
            now = time.monotonic()
            if now < self._until:
                self._start(now)

    def _start(self, now: float) -> None:
        if self.window > 0 and not self._held and (self.load is None or self.load() < BUSY):
            self._loop = asyncio.get_running_loop()
            self._last = now
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        now = time.monotonic()
        step = now - self._last
        self._last = now
        if step < IDLE_PASS:
            self.spun += step
        loop = self._loop
        load = self.load
        if (
            now < self._until
            and loop is not None
            and not loop.is_closed()
            and not self._held
            and (load is None or load() < BUSY)
        ):
            loop.call_soon(self._pass)
        else:
            self._loop = None
