"""The dispatcher's wake-up timer, which keeps sub-millisecond time where the event loop's does not.

Event-loop timers count whole milliseconds. uvloop rounds a delay to the nearest one and runs anything under
half of one on the next turn: `call_later(0.0006)` fires after 1.08 ms, `call_later(0.0016)` after 2.08 ms.
asyncio's loop rounds its poll timeout up: 0.2 ms fires after 1.08 ms. A batching window of
`max_delay_ms = 0.7` then held every batch 1.1 ms, and the adaptive policy's loop-bound wait cap, which it
tunes continuously, moved in steps of a millisecond (benchmarks/RESULTS.md, wave 2, tenth session).

On Linux, `WakeTimer` is a timerfd (the kernel's high-resolution timers) that the loop watches like a
socket: it wakes the loop within microseconds of the time asked, and costs two system calls per wait.
Elsewhere, or where a timerfd cannot be made, it falls back to `call_later`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable

log = logging.getLogger("sluice.batcher")

_CLOCK_MONOTONIC = 1  # Linux's clock id, as in <time.h>; timerfd's flags are open()'s (<sys/timerfd.h>)
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _libc_timerfd() -> tuple[Callable[[int, int], int], Callable[..., int]] | None:
    """timerfd_create and timerfd_settime from the C library, or None off Linux or where it lacks them."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _libc_timerfd()


def early_by(loop: asyncio.AbstractEventLoop) -> float:
    """How long before its time the loop's own timer can fire, in seconds: add it to a deadline's timer
    so that a caller never hears of its deadline before it passed.

    uvloop keeps its clock and its timers in whole milliseconds (its clock truncated, a delay rounded), so a
    timer there fires up to ~1.5 ms early; asyncio's loop never fires early."""
    return 1.5e-3 if type(loop).__module__.startswith("uvloop") else 0.0


_warned = False  # the fallback is logged once per process


class WakeTimer:
    """Calls `callback` once, `delay` seconds after `arm(delay)`, unless `disarm()` comes first.

    One armed time at a time; arming again replaces it. Use it on its loop's thread only; `close()` it when
    done (it holds a file descriptor, which a finalizer also closes if it is dropped unclosed).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # time.monotonic() at which the loop-timer fallback may call back
        self._fd = -1
        self._finalizer: Callable[[], object] | None = None
        self._settime: Callable[..., int] | None = None
        create: Callable[[int, int], int] | None = None
        if _TIMERFD is not None:
            create, self._settime = _TIMERFD
        fd = create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC) if create is not None else -1
        if fd >= 0:
            try:
                loop.add_reader(fd, self._fired)
            except Exception:  # a loop that cannot watch it (Windows' proactor), or epoll out of room
                os.close(fd)
            else:
                self._fd = fd
                self._finalizer = weakref.finalize(self, os.close, fd)
        global _warned
        if self._fd < 0 and _TIMERFD is not None and not _warned:
            _warned = True
            log.warning(
                "no timerfd for batching windows (errno %d): they are timed by the event loop, in whole "
                "milliseconds",
                ctypes.get_errno(),
            )
        self._spec = _Itimerspec()
        self._zero = _Itimerspec()
        self.precise = self._fd >= 0
        """True when the timer is a timerfd, False when it is the loop's own (millisecond) timer."""

    def arm(self, delay: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd < 0:
            self._arm_loop_timer(delay)
            return
        spec = self._spec.it_value  # relative to now: no clock to agree on
        nanoseconds = max(round(delay * 1e9), 1)  # 0 would disarm it
        spec.tv_sec, spec.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        assert self._settime is not None
        if self._settime(self._fd, 0, ctypes.byref(self._spec), None) != 0:
            # Not expected (the arguments are always valid); the loop's timer still wakes the dispatcher.
            self._arm_loop_timer(delay)

    def _arm_loop_timer(self, delay: float) -> None:
        self._due = time.monotonic() + delay
        self._handle = self._loop.call_later(delay, self._loop_timer_fired)

    def _loop_timer_fired(self) -> None:
        # uvloop counts a delay from the time its loop turn began, which can be up to a millisecond
        # before arm(): its timer can fire that much early. A window is never cut short: wait out the rest.
        left = self._due - time.monotonic()
        if left > 0:
            self._handle = self._loop.call_later(left, self._loop_timer_fired)
            return
        self._handle = None
        self._callback()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd >= 0:
            assert self._settime is not None
            self._settime(self._fd, 0, ctypes.byref(self._zero), None)  # also clears an unread expiry

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # disarmed after the loop saw it readable: not a wakeup any more
        self._callback()

    def close(self) -> None:
        self.disarm()
        if self._fd >= 0:
            with contextlib.suppress(Exception):  # a loop already closed has let go of it
                self._loop.remove_reader(self._fd)
            if self._finalizer is not None:
                self._finalizer()
            self._fd = -1
