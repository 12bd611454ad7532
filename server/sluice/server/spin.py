"""Keeping the event loop awake for the next request when requests come close together.

A thread that waits in epoll halts its core; on a virtual machine the host then runs something else there.
The next request finds every cache cold and pays for it in full: measured on a 2-core VM, the loop thread
spent 250 us of CPU on a lone caller's request after such a sleep against 80 us for the same request on a
loop that had not slept (see benchmarks/RESULTS.md). So when the server has answered every request in
flight, the loop polls for the next one for up to `loop_spin_us` instead of sleeping: one callback that
schedules itself again, so each pass of the loop polls its sockets without a timeout.

It spins only where that can pay:
- after the last request in flight is answered, and only if the previous such pause ended with a request
  within the window: a sparse caller (requests further apart than the window) costs nothing;
- only after a lone request (no second one arrived while it was in flight), and not within CROWD_MEMORY of
  a request that was not lone: with concurrent callers the caches stay warm from their traffic, and the
  server's rare empty moments are when the callers, the network and gRPC's own threads are busy; spinning
  then took their CPU (-17% requests/s at 64 callers on 2 cores);
- not while a run or a plugin step computes in a worker thread (`hold`): that thread needs the core, and the
  GIL for its Python parts;
- not at the pause after a run of a model whose ONNX Runtime pool threads spin on after a run (`rest`): they
  already keep a core busy, and the loop spinning too left none to the caller (MiniLM, one caller on 2 cores:
  p50 3.60 -> 3.11 ms without the loop's spin there).
The time the loop spends only spinning is counted (`spun`), so that the measure of a busy loop (`LoopLoad`,
which the adaptive batcher reads) does not take spinning for load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

_T = TypeVar("_T")

CROWD_MEMORY = 0.1
"""Seconds after a crowd (a second request arriving while one was in flight, or a gRPC call beginning while
another is alive: see Calls) during which the loop does not spin, and the adaptive batchers take a saturated
loop for a crowd's. Requests that complete within one step of the loop leave nothing in flight, so between
two pauses a crowd of them looks like a lone caller; but some of its requests do overlap (at 8 closed-loop
digits callers on 2 cores, 43% of them ran in batches of two or more), and a lone caller's never do."""
IDLE_PASS = 10e-6
"""A pass of the loop shorter than this ran nothing but the spin: a bare pass takes 1 to 3 us (uvloop) or 2
to 6 us (asyncio's loop); any real work, even one of gRPC's short steps, counts as work."""


class LoopSpin:
    """Polls the event loop for up to `window` seconds after the server goes idle (`idle()`), until a
    request arrives (`arrived()`)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.spun = 0.0
        """Seconds the loop has spent spinning with nothing else to do, in all."""
        self._idle_since = -window  # when the server last answered its last request in flight
        self._close = False  # the last pause ended with a request within the window
        self._crowded = False  # a second request arrived while one was in flight, since the last pause
        self._crowd_at = -CROWD_MEMORY  # when that last happened
        self._rest = False  # a run whose pool threads spin on after it ended since the last pause
        self._until = 0.0
        self._last = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # set while spinning
        self._threads: set[Hashable] = set()  # work computing in worker threads (`hold`)
        self.held = 0
        """Works held so far (`hold`): whether a worker thread computed in a span of time."""

    @property
    def spinning(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def arrived(self, now: float) -> None:
        """A request arrived at `now` (time.monotonic()) with none in flight: the loop has work, so the
        spinning (if any) ends at its next pass."""
        self._close = now - self._idle_since < self.window
        self._crowded = False
        self._until = 0.0

    def crowded(self, now: float) -> None:
        """A second request arrived at `now` while one was in flight: no spinning at the next pause, nor at
        any pause for CROWD_MEMORY after it."""
        self._crowded = True
        self._crowd_at = now

    def rest(self) -> None:
        """A run of a model whose pool threads spin on after it: no spinning at the next pause."""
        self._rest = True

    def idle(self, now: float) -> None:
        """The last request in flight was answered at `now`: spin for the next one, if they come close."""
        self._idle_since = now
        rest, self._rest = self._rest, False
        if (
            not self._close
            or self._crowded
            or now - self._crowd_at < CROWD_MEMORY
            or rest
            or self._threads
            or self.window <= 0
        ):
            return
        self._until = now + self.window
        if not self.spinning:
            self._loop = asyncio.get_running_loop()
            self._last = now
            self._loop.call_soon(self._pass)

    @property
    def holding(self) -> bool:
        """Whether work computes in a worker thread now."""
        return bool(self._threads)

    def hold(self, work: Hashable) -> None:
        """`work` computes in a worker thread: no spinning until `release(work)`."""
        self._threads.add(work)
        self.held += 1

    def release(self, work: Hashable) -> None:
        """`work` ended. Safe to call from any thread (a concurrent future's done callback, say)."""
        self._threads.discard(work)

    def hold_until_done(self, work: Future[Any]) -> None:
        """No spinning until the worker thread is done with `work`, not merely until its caller stops
        waiting for it (a deadline, a caller leaving): the thread goes on computing either way."""
        self.hold(work)
        work.add_done_callback(self.release)

    def _pass(self) -> None:
        now = time.monotonic()
        step = now - self._last
        self._last = now
        if step < IDLE_PASS:
            self.spun += step
        if now < self._until and not self._threads and self._loop is not None:
            self._loop.call_soon(self._pass)
        else:
            self._loop = None


class Calls:
    """Unary gRPC calls alive, from when their handler starts until gRPC has finished them (the answer
    sent), and when one last started while another was alive, or two requests were in flight at once
    (the data plane says so): a crowd.

    The door's count of requests in flight cannot see a crowd whose requests each complete within one step
    of the event loop (a small model on a saturated loop): each handler has returned before the next one
    starts. gRPC still holds an answered call while it sends the answer, so concurrent callers' calls
    overlap there (at 64 closed-loop digits callers on 2 cores, a quarter or more of the calls started
    while another was alive where the door saw none), and a lone caller's never do: its next call comes
    after its answer."""

    def __init__(self) -> None:
        self.alive = 0
        self.crowd_at = -CROWD_MEMORY
        """When a call last started while another was alive, or two requests were in flight at once
        (time.monotonic())."""

    def began(self, now: float) -> bool:
        """A call started at `now`; returns whether another one was alive."""
        crowd = self.alive > 0
        if crowd:
            self.crowd_at = now
        self.alive += 1
        return crowd

    def ended(self, _context: object = None) -> None:
        """A call ended (gRPC calls it with the call's context, on the event loop)."""
        self.alive -= 1

    def crowded(self) -> bool:
        """Whether calls are alive side by side (two streams, say), or one started while another was alive
        within the last CROWD_MEMORY seconds."""
        return self.alive > 1 or time.monotonic() - self.crowd_at < CROWD_MEMORY


async def in_worker(pool: Executor, spin: LoopSpin | None, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` in one of `pool`'s threads; the event loop does not spin until that thread is done with
    it (it needs the core, and the GIL for its Python parts), even if the caller stops waiting first."""
    future = pool.submit(work, *args)
    if spin is not None:
        spin.hold_until_done(future)
    return await asyncio.wrap_future(future)


class LoneRuns:
    """Tells when a lone caller's run may compute on the event loop itself, not in a worker thread.

    Handing a run to a worker thread and back costs more than the hand-off: the loop sleeps in epoll while
    the run computes, and the answer waits for the loop's thread to be woken and scheduled again, with cold
    caches. For a lone caller of a model that runs in a few ms that is a large share of its latency (MiniLM at
    seq 16 on a 2-core VM: p50 3.69 -> 3.17 ms, see benchmarks/RESULTS.md). While a run computes on the
    loop, nothing else is served, so it does that only where nobody else is there to be served:
    - no other request is in flight anywhere in the server when the run starts (`requests`);
    - the last `SETTLE` such runs, in worker threads, saw no second request arrive (`crowded`) from their
      start to their end: a steady lone caller, not concurrent callers that happened to leave a gap;
    - every `PROBE`-th lone run still goes to a worker thread: on the loop, a request that arrives meanwhile
      is only read after the run, when it looks lone too, so only a run in a thread can see a crowd coming.
      A probe that sees one doubles the calm runs asked for next time (up to `MOST`), so that callers whose
      runs rarely overlap (short runs) do not flip back and forth; a calm probe halves it again.
    A request that arrives during a run on the loop waits for the run to end, which the recent lone runs
    predict to be within the model's `execution.lone_on_loop_max_ms` (ModelRunner._run_lone).
    """

    SETTLE = 8
    PROBE = 16
    MOST = 1024

    def __init__(self) -> None:
        self.requests: Callable[[], int] = lambda: 0
        """Requests in flight in the whole server (the data plane sets it)."""
        self.crowds = 0
        """Times a second request arrived while one was in flight."""
        self.computed = 0.0
        """Seconds of the loop thread's CPU spent computing lone runs: time the loop was not busy serving,
        which the measure of a busy loop (`LoopLoad`) leaves out."""
        self._need = self.SETTLE  # calm runs asked for before runs go on the loop
        self._calm = 0  # lone runs in worker threads in a row with no crowd during them
        self._lone = 0  # lone runs since the last probe
        self._probing = False

    def crowded(self) -> None:
        """A second request arrived while one was in flight."""
        self.crowds += 1
        self._calm = 0

    def alone(self) -> bool:
        """Whether the request about to run is the only one in flight in the server."""
        return self.requests() == 1

    def on_loop(self) -> bool:
        """For a lone run: True to compute it on the loop, False for a worker thread (settling or probing)."""
        if self._calm < self._need:
            return False
        self._lone += 1
        if self._lone >= self.PROBE:
            self._lone = 0
            self._probing = True
            return False
        return True

    def ended(self, crowds: int) -> None:
        """A lone run in a worker thread ended; `crowds` is what `self.crowds` was when it started."""
        calm = crowds == self.crowds
        if calm:
            self._calm += 1
        if self._probing:
            self._probing = False
            self._need = max(self._need // 2, self.SETTLE) if calm else min(self._need * 2, self.MOST)
