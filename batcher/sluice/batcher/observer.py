"""The seam through which metrics reach the batcher: it calls an observer and never builds metrics itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BatchObserver(Protocol):
    """Receives batcher events; called on the event loop, so each method must be cheap and not block."""

    def on_enqueue(self, rows: int, queue_rows: int) -> None:
        """A request was admitted; `queue_rows` counts it."""

    def on_reject(self, reason: str, rows: int) -> None:
        """A request was refused at submit: "queue_full", "too_large" or "closed"."""

    def on_drop(self, reason: str, queued_for: float) -> None:
        """A request left without an answer before it ran: "deadline", "cancelled" or "shutdown".

        Also called for a member of a failed batch that leaves before the re-run of its part (see
        BatcherConfig.isolate_failures): its answer was still to come."""

    def on_batch(
        self, rows: int, requests: int, queue_waits: Sequence[float], queue_rows: int, busy: int
    ) -> None:
        """A batch started running; `queue_waits` holds each member's seconds in the queue."""

    def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
        """A batch finished, successfully when `error` is None.

        Called once per batch. When its run raised and parts of it were re-run (isolate_failures),
        `error` is what that first run raised and `run_time` is that run's, whatever the re-runs did:
        the observer sees neither the re-runs nor their time."""


class NullObserver:
    """The default observer: ignores everything."""

    def on_enqueue(self, rows: int, queue_rows: int) -> None:
        pass

    def on_reject(self, reason: str, rows: int) -> None:
        pass

    def on_drop(self, reason: str, queued_for: float) -> None:
        pass

    def on_batch(
        self, rows: int, requests: int, queue_waits: Sequence[float], queue_rows: int, busy: int
    ) -> None:
        pass

    def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
        pass
