"""Giving memory back to the system after large requests, so that RSS follows what is really in use.

A request of tens of MiB arrives in many buffers that gRPC and Python free when its call ends, but glibc
keeps freed memory in its heaps (and a fragmented heap cannot shrink from the top). A few large requests,
rejected ones included, would leave the server's RSS gigabytes higher for good. So after a large request
the server asks glibc to return its free pages (`malloc_trim`), at most a few times a second; small
requests, the hot path, never pay for it. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable

_TRIM_DELAY_S = 0.05
"""How long after a large request arrives to trim: by then its call has usually ended."""
_MIN_INTERVAL_S = 0.25


def _malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_trim = _malloc_trim()
_scheduled = False
_last = 0.0


def large_request() -> None:
    """Notes that a large request arrived: freed memory is given back shortly after (on the event loop)."""
    global _scheduled
    if _trim is None or _scheduled:
        return
    _scheduled = True
    loop = asyncio.get_running_loop()
    delay = max(_TRIM_DELAY_S, _last + _MIN_INTERVAL_S - time.monotonic())
    loop.call_later(delay, _run, loop)


def _run(loop: asyncio.AbstractEventLoop) -> None:
    global _scheduled, _last
    _scheduled = False
    _last = time.monotonic()
    assert _trim is not None
    # In a worker thread: trimming a large heap takes milliseconds the event loop should not wait for.
    loop.run_in_executor(None, _trim, 0)


def trim_now() -> None:
    """Gives free memory back at once (after a model is unloaded, say)."""
    if _trim is not None:
        _trim(0)
