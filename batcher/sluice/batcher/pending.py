"""Queued requests, and the queue that holds them until a batch takes them.

Requests are grouped by what can be concatenated (input names, dtypes and non-batch shapes), and within a
group kept in one FIFO lane per priority. Collecting a batch therefore reads only compatible requests in
priority-then-arrival order and never rescans the ones it must leave behind; with one group (the usual
case) it is a few pops. Requests that leave early are marked and skipped lazily, so removing one is O(1).
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy.typing as npt

from sluice.batcher.observer import RunTimes

Array = npt.NDArray[Any]
Arrays = Mapping[str, Array]
GroupKey = tuple[tuple[str, str, tuple[int | None, ...]], ...]
"""Per input, sorted by name: (name, dtype.str, shape[1:] with padded axes as None)."""

QUEUED: Final = 0
TAKEN: Final = 1
DROPPED: Final = 2

NO_LENGTHS: Final[Mapping[str, int]] = MappingProxyType({})
"""Shared by every request when nothing is padded, so the fast path allocates no dict."""


@dataclass(eq=False, slots=True)
class Pending:
    """One submitted request: its inputs, where its answer goes, and what orders and bounds it."""

    inputs: Arrays
    rows: int
    priority: int
    seq: int
    """Admission order; breaks ties between equal arrival times."""
    arrival: float
    deadline: float | None
    key: GroupKey
    lengths: Mapping[str, int]
    """Padded dim name -> this request's length on it."""
    future: asyncio.Future[dict[str, Array]]
    state: int = QUEUED
    ran: RunTimes | None = None
    """The run that answered it, for a RunObserver."""
    expired: bool = False
    """Its deadline passed while its caller waited (the caller's task was cancelled for it)."""


class _Group:
    """The queued requests of one group key: a FIFO lane per priority."""

    __slots__ = ("count", "dead", "lanes", "order", "rows")

    def __init__(self) -> None:
        self.lanes: dict[int, deque[Pending]] = {}
        self.order: list[int] = []  # negated priorities, ascending: order[0] is the highest priority
        self.rows = 0
        self.count = 0  # live requests; the group is deleted when it reaches 0
        self.dead = 0  # dropped requests still sitting in a lane

    def push(self, item: Pending) -> None:
        lane = self.lanes.get(item.priority)
        if lane is None:
            lane = self.lanes[item.priority] = deque()
            bisect.insort(self.order, -item.priority)
        lane.append(item)
        self.rows += item.rows
        self.count += 1

    def head(self) -> Pending:
        """The highest-priority oldest live request; only called while count > 0."""
        while True:
            priority = -self.order[0]
            lane = self.lanes[priority]
            while lane:
                item = lane[0]
                if item.state == QUEUED:
                    return item
                lane.popleft()
                self.dead -= 1
            del self.lanes[priority]
            del self.order[0]

    def take(self, max_rows: int, max_items: int) -> tuple[list[Pending], int]:
        """Removes requests in order while they fit; stops at the first that does not (keeps order fair)."""
        taken: list[Pending] = []
        rows = 0
        while self.count and len(taken) < max_items:
            item = self.head()
            if rows + item.rows > max_rows:
                break
            self.lanes[item.priority].popleft()
            item.state = TAKEN
            taken.append(item)
            rows += item.rows
            self.rows -= item.rows
            self.count -= 1
        return taken, rows

    def drop(self, item: Pending) -> None:
        item.state = DROPPED
        self.rows -= item.rows
        self.count -= 1
        self.dead += 1
        # Dropped entries wait in their lane until a batch reaches them; if the model is stuck while
        # callers keep timing out they would pile up, so compact once they outnumber the live ones.
        if self.dead > 2 * self.count + 32:
            for priority, lane in list(self.lanes.items()):
                live = deque(queued for queued in lane if queued.state == QUEUED)
                if live:
                    self.lanes[priority] = live
                else:
                    del self.lanes[priority]
            self.order = sorted(-priority for priority in self.lanes)
            self.dead = 0


class PendingQueue:
    """All queued requests of one batcher, counted in rows."""

    __slots__ = ("_groups", "rows")

    def __init__(self) -> None:
        self._groups: dict[GroupKey, _Group] = {}
        self.rows = 0

    def push(self, item: Pending) -> None:
        group = self._groups.get(item.key)
        if group is None:
            group = self._groups[item.key] = _Group()
        group.push(item)
        self.rows += item.rows

    def head(self) -> Pending | None:
        """The request the next batch is built around: highest priority, then oldest, across groups."""
        best: Pending | None = None
        for group in self._groups.values():
            item = group.head()
            if (
                best is None
                or item.priority > best.priority
                or (item.priority == best.priority and item.seq < best.seq)
            ):
                best = item
        return best

    def group_rows(self, key: GroupKey) -> int:
        """Rows queued that could join a batch with `key`, all priorities."""
        group = self._groups.get(key)
        return 0 if group is None else group.rows

    def take(self, key: GroupKey, max_rows: int, max_items: int) -> list[Pending]:
        """Removes the requests of one batch: group `key`, priority-then-arrival order, up to max_rows."""
        group = self._groups.get(key)
        if group is None:
            return []
        taken, rows = group.take(max_rows, max_items)
        self.rows -= rows
        if not group.count:
            del self._groups[key]
        return taken

    def discard(self, item: Pending) -> bool:
        """Removes a request that is still queued; False if a batch already took it."""
        if item.state != QUEUED:
            return False
        group = self._groups[item.key]
        group.drop(item)
        self.rows -= item.rows
        if not group.count:
            del self._groups[item.key]
        return True

    def clear(self) -> list[Pending]:
        """Removes and returns every queued request."""
        left = [
            item
            for group in self._groups.values()
            for lane in group.lanes.values()
            for item in lane
            if item.state == QUEUED
        ]
        for item in left:
            item.state = DROPPED
        self._groups.clear()
        self.rows = 0
        return left
