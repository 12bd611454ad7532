"""When to dispatch: the batching policies and the load estimates the adaptive one is built on.

A policy is asked, with a free instance and `queued` compatible rows whose oldest has waited `waited`
seconds, how much longer to wait for company. The adaptive policy sizes the batch so the model's
instances stay below a target utilisation at the measured load (see docs/batching.md):

    run time  t(b) = alpha + beta * b           (online, exponentially weighted least squares)
    arrivals  lambda rows/s                       (exponentially decayed count)
    b* = lambda * alpha / (k * u - lambda * beta)  (max_batch_size when the denominator <= 0)

At light load b* <= 1 and every request runs at once; as load grows batches grow towards the maximum.

The model is not the only thing a batch costs: collecting, splitting and answering it costs the event loop
too, and the loop also carries every request's gRPC work. When the loop itself is saturated (`pressure`,
its busy fraction, is at least LOOP_SATURATED), each batch saved is throughput gained, so the policy
waits for company even when the model is idle: up to max_delay, but only while requests keep coming. Once
arrivals pause for twice their mean gap, the callers that are coming have come, and waiting longer would
only leave the loop idle. A wait that brings no company (a lone
caller whose next request cannot come before this one is answered) is not repeated for the next 2, 4, 8 ...
batches, so a single busy caller almost never waits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sluice.batcher.config import BatcherConfig

UTILISATION = 0.8
"""Target fraction of time the instances are busy; headroom absorbs bursts."""
RATE_HORIZON = 0.5
"""Seconds over which the arrival rate is averaged (time constant of the decay)."""
FIT_DECAY = 0.95
"""Weight kept by older run-time samples per new one (about the last 20 batches count)."""
LOOP_SATURATED = 0.6
"""Busy fraction of the event loop above which per-batch costs limit throughput."""
MAX_BACKOFF = 1024
"""Most batches dispatched at once after fruitless waits, before waiting is tried again."""


@dataclass(frozen=True, slots=True)
class Estimates:
    """The adaptive policy's view of the model and its load, for metrics and benchmarks."""

    alpha: float
    """Fixed seconds per run."""
    beta: float
    """Seconds per row."""
    arrival_rate: float
    """Rows per second arriving."""
    target_rows: float
    """b*: the batch size that keeps the instances below the target utilisation."""


class LoadModel:
    """Measures arrivals and run times; updated per arrival and per batch, O(1) each."""

    __slots__ = ("_last", "_mass", "_sb", "_sbb", "_sbt", "_st", "_sw", "alpha", "beta")

    def __init__(self) -> None:
        self._mass = 0.0  # rows arrived, each decayed by exp(-age / RATE_HORIZON)
        self._last = 0.0
        self._sw = self._sb = self._st = self._sbb = self._sbt = 0.0
        self.alpha = 0.0  # 0, 0 means "unknown": the adaptive policy then never waits
        self.beta = 0.0

    def on_arrival(self, rows: int, now: float) -> None:
        self._mass = self._mass * math.exp((self._last - now) / RATE_HORIZON) + rows
        self._last = now

    def rate(self, now: float) -> float:
        """Rows per second; a steady rate r gives mass r * RATE_HORIZON."""
        return self._mass * math.exp((self._last - now) / RATE_HORIZON) / RATE_HORIZON

    def on_run(self, rows: int, run_time: float) -> None:
        d = FIT_DECAY
        self._sw = self._sw * d + 1.0
        self._sb = self._sb * d + rows
        self._st = self._st * d + run_time
        self._sbb = self._sbb * d + rows * rows
        self._sbt = self._sbt * d + rows * run_time
        spread = self._sw * self._sbb - self._sb * self._sb
        mean_t = self._st / self._sw
        if spread <= 1e-9 * self._sw * self._sbb:
            # Every batch had the same size (typical at light load): the cost cannot be split between
            # fixed and per-row, so count it all as fixed. That overstates the gain from batching only
            # until batches of other sizes are seen.
            self.alpha, self.beta = mean_t, 0.0
            return
        beta = (self._sw * self._sbt - self._sb * self._st) / spread
        alpha = (self._st - beta * self._sb) / self._sw
        if beta < 0:  # noise; a model does not get faster per row with more rows
            alpha, beta = mean_t, 0.0
        elif alpha < 0:  # fit through the origin instead
            alpha, beta = 0.0, self._sbt / self._sbb
        self.alpha, self.beta = alpha, beta


class Policy:
    """Base: decides how long the head of the queue may still wait."""

    single_request = False
    """True when each batch holds exactly one request."""

    def __init__(self, config: BatcherConfig, load: LoadModel, pressure: Callable[[], float] | None) -> None:
        self.max_rows = config.max_batch_size
        self.max_delay = config.max_delay
        self.instances = config.instances
        self.load = load
        self.pressure = pressure

    loop_bound = False
    """True while the current wait is for the event loop's sake (see AdaptivePolicy)."""

    def quiet_gap(self, now: float) -> float:
        """A pause in arrivals this long (twice the mean gap) means the callers are all waiting already."""
        rate = self.load.rate(now)
        return 2.0 / rate if rate > 0 else 0.0

    def dispatched(self, rows: int, head_rows: int, waited: float) -> None:
        """Told of every batch as it leaves: its rows, its first request's rows, how long that one waited."""

    def plan(self, queued: int, waited: float, now: float) -> tuple[float, int]:
        """(seconds to keep waiting, compatible rows that would end the wait); <= 0 seconds: dispatch now."""
        raise NotImplementedError

    def target_rows(self, now: float) -> float:
        """b*, capped at max_batch_size."""
        load = self.load
        if load.alpha <= 0:
            return 0.0
        rate = load.rate(now)
        room = self.instances * UTILISATION - rate * load.beta
        if room <= 0:
            return float(self.max_rows)
        return min(rate * load.alpha / room, float(self.max_rows))

    def estimates(self, now: float) -> Estimates:
        return Estimates(self.load.alpha, self.load.beta, self.load.rate(now), self.target_rows(now))


class NoBatching(Policy):
    """Every request runs alone, at once."""

    single_request = True

    def plan(self, queued: int, waited: float, now: float) -> tuple[float, int]:
        return 0.0, 0


class FixedPolicy(Policy):
    """Waits for a full batch or max_delay, whichever comes first."""

    def plan(self, queued: int, waited: float, now: float) -> tuple[float, int]:
        if queued >= self.max_rows:
            return 0.0, 0
        return self.max_delay - waited, self.max_rows


class AdaptivePolicy(Policy):
    """Waits only when the expected company arrives within max_delay and is needed to keep up."""

    def __init__(self, config: BatcherConfig, load: LoadModel, pressure: Callable[[], float] | None) -> None:
        super().__init__(config, load, pressure)
        self._skip = 0  # batches still to dispatch at once after a fruitless wait
        self._backoff = 1
        self.loop_bound = False

    def dispatched(self, rows: int, head_rows: int, waited: float) -> None:
        if self._skip:
            self._skip -= 1
        elif self.loop_bound:
            if rows > head_rows:
                self._backoff = 1
            else:
                self._skip = self._backoff
                self._backoff = min(2 * self._backoff, MAX_BACKOFF)
        self.loop_bound = False

    def plan(self, queued: int, waited: float, now: float) -> tuple[float, int]:
        left = self.max_delay - waited
        if left <= 0 or queued >= self.max_rows:
            return 0.0, 0
        if self.pressure is not None and not self._skip and self.pressure() >= LOOP_SATURATED:
            self.loop_bound = True
            return left, self.max_rows
        target = self.target_rows(now)
        if queued >= target:
            return 0.0, 0
        rate = self.load.rate(now)
        if rate <= 0 or (target - queued) / rate > left:
            return 0.0, 0  # waiting cannot gain: the rows would not arrive in time
        return left, math.ceil(target)


def make_policy(
    config: BatcherConfig, load: LoadModel, pressure: Callable[[], float] | None = None
) -> Policy:
    kinds: dict[str, type[Policy]] = {"adaptive": AdaptivePolicy, "fixed": FixedPolicy, "none": NoBatching}
    return kinds[config.policy](config, load, pressure)
