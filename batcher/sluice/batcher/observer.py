"""The seam through which metrics reach the batcher: it calls an observer and never builds metrics itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


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


class RunTimes:
    """One run that answered its batch: shared by every member, so a member's statistics cost no copy.

    A plain class with slots: a frozen dataclass costs about 1 µs more to build, once per batch."""

    __slots__ = ("assemble", "rows", "run", "split", "started")

    def __init__(self, rows: int, started: float, assemble: float, run: float, split: float) -> None:
        self.rows = rows
        self.started = started
        """time.monotonic() when the run began: the end of each member's wait in the queue."""
        self.assemble = assemble
        """Seconds spent building the batched inputs from the members' (Triton's compute_input)."""
        self.run = run
        """Seconds the model ran, thread hand-off included (compute_infer)."""
        self.split = split
        """Seconds spent checking the outputs and handing each member its rows (compute_output)."""


@runtime_checkable
class RunObserver(Protocol):
    """Also receives what exact per-request statistics need; the batcher calls these only on observers
    that have them, so a plain BatchObserver keeps working."""

    def on_run(self, times: RunTimes) -> None:
        """A run answered its members (re-runs of parts of a failed batch included): once per run."""

    def on_answer(self, rows: int, queued_for: float, times: RunTimes) -> None:
        """A member got its rows of `times`' run; called in the caller's own task, when its `submit`
        returns, so the observer can tie it to the request's fate (what the caller answers)."""


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
