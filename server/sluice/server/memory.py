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
from collections.abc import Callable

_TRIM_DELAY_S = 0.05
"""How long after a large request arrives or ends to trim: by then gRPC has freed its buffers."""
_MIN_INTERVAL_S = 0.25
"""The shortest time between two trims."""


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
_again = False


def large_request() -> None:
    """Notes that a large request arrived or ended: freed memory is given back shortly after (and once more
    after the last such note, so the memory of the last large call is given back too)."""
    global _scheduled, _again
    if _trim is None:
        return
    if _scheduled:
        _again = True
        return
    _scheduled = True
    asyncio.get_running_loop().call_later(_TRIM_DELAY_S, _run)


def _run() -> None:
    global _scheduled, _again
    assert _trim is not None
    loop = asyncio.get_running_loop()
    # In a worker thread: trimming a large heap takes milliseconds the event loop should not wait for.
    loop.run_in_executor(None, _trim, 0)
    if _again:
        _again = False
        loop.call_later(_MIN_INTERVAL_S, _run)
    else:
        _scheduled = False
