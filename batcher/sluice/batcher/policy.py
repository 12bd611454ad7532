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
waits for company even when the model is idle, up to a *wait cap* of at most max_delay. How long is worth
it depends on the callers, which the server cannot see: a crowd of 64 gets more done with full-length waits
and big batches, while 8 callers that each wait for their answer before sending again get more done with
short ones (measured: benchmarks/RESULTS.md). So the cap is found by measuring the objective itself, rows
dispatched per second, in a hill climb: the cap dithers around a centre, window by window, and the centre
moves towards the side whose windows dispatched more rows/s (`_climb`).

Either wait, for the model's sake or the loop's, is judged by what it brought. The mean arrival rate does
not say whether company will come: closed-loop callers answered by one batch send their next requests
together, and a lone caller's next request cannot come before this one is answered. So the policy waits
whenever its rule says company is worth having, and a wait that brings none is not repeated for the next
1, 2, 4 ... batches: a crowd is waited for, a single busy caller almost never.

How big a batch may get is a separate question, answered by the measured cost curve (`CostCurve`): on a
CPU a batch whose activations no longer fit the caches costs more per row than a smaller one, so the
adaptive policy caps batches at the size, in input elements, that ran cheapest per element, and keeps
probing the sizes next to it while the queue is long enough to fill them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sluice.batcher.config import BatcherConfig
from sluice.batcher.pending import Pending

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
CAP_WINDOW = 0.125
"""Seconds of dispatches each rows/s measurement of the climb takes (at 2,000 rows/s, 250 rows)."""
CAP_STEP = 1.5
"""Factor the centre of the loop-bound wait cap moves by per decision: from max_delay to its floor in 7."""
CAP_DITHER = math.sqrt(CAP_STEP)
"""Windows alternate between the centre times and divided by this: the two sides compared differ by
CAP_STEP."""
CAP_TIE = 0.02
"""Log-ratio of rows/s between the two windows of a pair below which the centre stays where it is."""
CAP_FLOOR = 1 / 16
"""Least loop-bound wait cap, as a fraction of max_delay."""
CAP_WINDOW_BATCHES = 4
"""Loop-bound batches a window needs for its rows/s to judge the cap; other windows restart the climb."""
CURVE_SAMPLES = 2
"""Runs a batch size needs before the cost curve trusts its cost (and before it stops probing it)."""
CURVE_WEIGHT = 0.25
"""Weight of a new run in a size's mean cost once it has 4 (its third run weighs a third)."""
CURVE_CLIP = 1.5
"""A run counts at most this many times its size's mean cost: a run the OS pre-empted (a 10 us run that
took 3 ms on a busy core) says nothing about the size and would otherwise rule the mean for many runs."""
CURVE_TIE = 0.05
"""Costs per element within this fraction of the cheapest count as equal; the larger batch wins them, as
fewer batches also save the event loop per-batch work the curve does not see."""
CURVE_REPROBE = 32
"""Runs after which a size next to the limit counts as stale and is run once more to refresh it."""
CURVE_GATHER_PAUSE = 1024
"""Most runs between waits that gather rows for a probe of the size above the limit, after waits that
could not fill one."""
_BUCKETS = 64


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
    limit_rows: int
    """Most rows the adaptive policy lets a batch of the last head's group take: the cost curve's limit
    in rows of that group, max_batch_size while the curve has none (and always, for other policies)."""
    limit_elements: int
    """The cost curve's limit in input elements per batch (after padding); 0 while it has none."""


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


def _bucket(elements: int) -> int:
    """log2(elements) rounded to the nearest integer: buckets are centred on powers of two, so a batch
    one row short of a power of two (a queue not quite full) counts with the full one."""
    return min((elements * 181 >> 7).bit_length() - 1, _BUCKETS - 1)  # 181/128 ~ sqrt(2)


class CostCurve:
    """Seconds per input element of the runs, by batch size in elements; O(1) per run.

    Sizes are bucketed by log2 of the elements a batch held, rounded (bucket k: about 2**k elements);
    each bucket keeps an exponentially weighted mean of seconds per element and a run count. The *limit*
    is the largest bucket whose cost is within CURVE_TIE of the cheapest one among those with
    CURVE_SAMPLES runs; when that is the largest bucket measured there is no limit (bigger may be
    cheaper still, so the batch is as big as the queue and max_batch_size allow).

    Exploration is a hill climb: while the queue can fill it, the next batch is a *probe* of a bucket
    next to the cheapest one that lacks runs (half or double its size), or, every CURVE_REPROBE runs,
    of a bucket next to the limit, to follow a curve that changes. While the bucket above the limit is
    due (`probe_rows_above`), the adaptive policy's waits gather rows for it.
    """

    __slots__ = (
        "_cheapest",
        "_cost",
        "_count",
        "_gather_pause",
        "_gathered",
        "_hi",
        "_limit",
        "_lo",
        "_open",
        "_runs",
        "_seen",
    )

    def __init__(self) -> None:
        self._cost = [0.0] * _BUCKETS
        self._count = [0] * _BUCKETS
        self._seen = [0] * _BUCKETS  # run number of each bucket's latest run
        self._runs = 0
        self._lo = _BUCKETS  # range of buckets with any run
        self._hi = -1
        self._cheapest = -1  # bucket with the lowest cost among those with CURVE_SAMPLES runs; -1: none
        self._limit = -1  # the bucket the limit is taken from; -1: none
        self._open = True  # True: the limit is the largest bucket measured, so it does not bind
        self._gathered = -CURVE_REPROBE  # run number of the last wait that gathered rows for a probe
        self._gather_pause = CURVE_REPROBE  # runs after it before the next such wait

    def record(self, elements: int, seconds: float) -> None:
        """Adds one successful run of a batch of `elements` input elements that took `seconds`."""
        if elements <= 0 or not seconds >= 0.0:  # `not >=` also refuses NaN
            return
        bucket = _bucket(elements)
        count = self._count[bucket] + 1
        self._count[bucket] = count
        cost, mean = seconds / elements, self._cost[bucket]
        if count == 1:
            self._cost[bucket] = cost
        elif count <= CURVE_SAMPLES:
            # The cheapest of the first runs: a pre-empted one among so few would decide the size's fate.
            self._cost[bucket] = min(mean, cost)
        else:
            weight = max(1.0 / count, CURVE_WEIGHT)
            clipped = min(cost, CURVE_CLIP * mean) if mean > 0 else cost  # a 0 s run must not pin it
            self._cost[bucket] = mean + weight * (clipped - mean)
        self._seen[bucket] = self._runs
        self._runs += 1
        self._lo = min(self._lo, bucket)
        self._hi = max(self._hi, bucket)
        self._choose()

    def _choose(self) -> None:
        cost, count = self._cost, self._count
        cheapest = top = -1
        for bucket in range(self._lo, self._hi + 1):
            if count[bucket] >= CURVE_SAMPLES:
                top = bucket
                if cheapest < 0 or cost[bucket] <= cost[cheapest]:
                    cheapest = bucket
        self._cheapest = cheapest
        if cheapest < 0:
            self._limit, self._open = -1, True
            return
        cutoff = cost[cheapest] * (1.0 + CURVE_TIE)
        limit = cheapest
        for bucket in range(cheapest + 1, top + 1):
            if count[bucket] >= CURVE_SAMPLES and cost[bucket] <= cutoff:
                limit = bucket
        self._limit, self._open = limit, limit == top

    def probe_rows_above(self, per_row: int, max_rows: int) -> int:
        """Rows of a probe of the size above the limit, for a group whose rows hold `per_row` elements, if
        one is due (the size lacks runs, or has not run for CURVE_REPROBE runs) and the pause after the
        last wait that gathered rows for one is over; else 0.

        Probes are only ever as big as the queue (see `rows`), and a batch waits only for its limit:
        without gathering for a probe, a limit that noise pushed down would never see a bigger batch again
        once waits end there. The pause is CURVE_REPROBE runs after a probe filled, twice the last one
        after a wait that did not fill it (up to CURVE_GATHER_PAUSE): callers too few to fill the probe
        must not make batch after batch wait for it.
        """
        limit = self._limit
        if self._open or limit < 0 or limit + 1 >= _BUCKETS:
            return 0
        if self._runs - self._gathered < self._gather_pause:
            return 0
        above = limit + 1  # due under the conditions under which `_probe` picks it
        lacking = above == self._cheapest + 1 and self._count[above] < CURVE_SAMPLES
        if not lacking and self._seen[above] >= self._runs - CURVE_REPROBE:
            return 0
        per_row = max(per_row, 1)
        rows = _rows_for(above, per_row, max_rows)
        return rows if _bucket(rows * per_row) == above else 0

    def gathered(self, filled: bool) -> None:
        """A wait gathered rows for a probe of the size above the limit, and `filled` it or not."""
        self._gathered = self._runs
        pause = CURVE_REPROBE if filled else 2 * self._gather_pause
        self._gather_pause = min(pause, CURVE_GATHER_PAUSE)

    @property
    def limit(self) -> int:
        """Most input elements a batch should hold (about: see `rows`); 0 when nothing limits it."""
        return 0 if self._open else 1 << self._limit

    def cost(self, elements: int) -> float | None:
        """Mean seconds per element of batches about this big, None before CURVE_SAMPLES runs."""
        bucket = _bucket(elements)
        return self._cost[bucket] if self._count[bucket] >= CURVE_SAMPLES else None

    def rows(self, queued: int, per_row: int, max_rows: int) -> tuple[int, int]:
        """(rows for the next batch, rows the limit allows) for a group whose rows hold `per_row` input
        elements, with `queued` rows waiting; both are at most max_rows and at least 1.

        The first differs from the second only for a probe, and a probe is only ever a size the queue
        can fill (a probe of a size that cannot be reached would measure a smaller batch instead).
        """
        per_row = max(per_row, 1)
        limit = max_rows if self._open else _rows_for(self._limit, per_row, max_rows)
        if self._cheapest < 0:
            return limit, limit
        probe = self._probe(queued, per_row, max_rows)
        return (limit if probe < 0 else _rows_for(probe, per_row, max_rows)), limit

    def _probe(self, queued: int, per_row: int, max_rows: int) -> int:
        """The bucket to probe next, or -1: first a neighbour of the cheapest bucket that lacks runs (the
        climb), else the stalest neighbour of the limit's bucket once it is CURVE_REPROBE runs old."""
        count, seen = self._count, self._seen
        cheapest, limit = self._cheapest, self._limit
        for bucket in (cheapest + 1, cheapest - 1):
            if _reachable(bucket, queued, per_row, max_rows) and count[bucket] < CURVE_SAMPLES:
                return bucket
        stalest, oldest = -1, self._runs - CURVE_REPROBE
        for bucket in (limit + 1, limit - 1):
            if _reachable(bucket, queued, per_row, max_rows) and seen[bucket] < oldest:
                stalest, oldest = bucket, seen[bucket]
        return stalest


def _rows_for(bucket: int, per_row: int, max_rows: int) -> int:
    """Rows of `per_row` elements nearest to the centre of `bucket`, within 1..max_rows."""
    return min(max(((1 << bucket) + per_row // 2) // per_row, 1), max_rows)


def _reachable(bucket: int, queued: int, per_row: int, max_rows: int) -> bool:
    """Whether a batch of this group can land in `bucket`, and the queue holds enough rows for it."""
    if not 0 <= bucket < _BUCKETS:
        return False
    rows = _rows_for(bucket, per_row, max_rows)
    return rows <= queued and _bucket(rows * per_row) == bucket


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
        self.limit_rows = config.max_batch_size
        """Most rows the last head's group may put in a batch, probes aside: waiting for more gains
        nothing."""
        self.wait_cap = 0.0 if self.single_request else config.max_delay
        """Longest wait for company while the event loop is saturated (the adaptive policy measures it)."""

    loop_bound = False
    """True while the current wait is for the event loop's sake (see AdaptivePolicy)."""

    def dispatched(self, rows: int, queued: int, waited: float, now: float) -> None:
        """Told of every batch as it leaves: its rows, the compatible rows queued just before it was taken
        (its own included), how long its first request waited, and the time."""

    def wait_began(self, queued: int) -> None:
        """The dispatcher sleeps on the wait `plan` just returned, with `queued` compatible rows queued."""

    def wait_abandoned(self) -> None:
        """The rows waited for left (their callers gave up) before a batch did: no batch ends that wait."""

    def on_run(self, rows: int, elements: int, seconds: float) -> None:
        """Told of every successful run: its rows, its input elements after padding, its seconds."""
        self.load.on_run(rows, seconds)

    def batch_rows(self, head: Pending, queued: int) -> int:
        """Most rows the batch built around `head` may take, with `queued` rows of its group waiting."""
        return self.max_rows

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
        load = self.load
        return Estimates(load.alpha, load.beta, load.rate(now), self.target_rows(now), self.max_rows, 0)


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
    """Waits only when the expected company arrives within max_delay and is needed to keep up, and caps
    batches at the size the cost curve finds cheapest per element."""

    def __init__(
        self,
        config: BatcherConfig,
        load: LoadModel,
        pressure: Callable[[], float] | None,
        curve: CostCurve | None = None,
        crowded: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(config, load, pressure)
        self.crowded = crowded
        """Whether several callers are sending (None: never known); see `_backs_off`."""
        self._skip = 0  # batches still to dispatch at once after a fruitless wait
        self._backoff = 1
        self.loop_bound = False
        self._waiting = False  # the batch now forming was waited for
        self._wait_rows = 0  # compatible rows queued when that wait began
        self._gathering = 0  # ... and the rows it gathered for a probe (0: none)
        self._planned = (False, 0)  # (loop-bound, probe rows gathered) of the wait `plan` last returned
        self._per_row = 0  # input elements per row of the last batch's first request
        self.curve = curve if curve is not None else CostCurve()
        # The wait cap dithers around it (see `_climb`). It starts at max_delay / 2: 2 moves from
        # max_delay, 6 from the floor, and (for max_delay above ~1.2 ms) with both sides above the waits
        # short enough to be polled for (SPIN_MAX in sluice.batcher.core): from there, a crowd that does
        # best with long waits (64 digits callers) took a second or more to climb out.
        self._centre = config.max_delay / 2
        self.wait_cap = self._bounded(self._centre * CAP_DITHER)  # the first window is "up"
        self._window_start = -1.0
        self._window_rows = 0
        self._window_bound = 0  # loop-bound batches in the window
        self._window = 0  # the window's place in the up, down, down, up sequence
        self._first = 0.0  # rows/s of the first window of the pair under way

    def on_run(self, rows: int, elements: int, seconds: float) -> None:
        self.load.on_run(rows, seconds)
        self.curve.record(elements, seconds)

    def batch_rows(self, head: Pending, queued: int) -> int:
        curve = self.curve
        if queued <= 1:
            return self.max_rows  # the batch is the head alone, whatever the limit
        per_row = self._per_row = sum(array.size for array in head.inputs.values()) // head.rows
        rows, self.limit_rows = curve.rows(queued, per_row, self.max_rows)
        return max(rows, head.rows)  # the head always fits, or the batch would be empty

    def estimates(self, now: float) -> Estimates:
        load = self.load
        return Estimates(
            load.alpha,
            load.beta,
            load.rate(now),
            self.target_rows(now),
            self.limit_rows,
            self.curve.limit,
        )

    def dispatched(self, rows: int, queued: int, waited: float, now: float) -> None:
        self._climb(rows, now)
        if self._gathering:
            self.curve.gathered(queued >= self._gathering)
        if self._waiting:  # (while backing off, only a crowd waits: see `_backs_off`)
            if queued > self._wait_rows:
                self._backoff, self._skip = 1, 0
            elif self._backs_off(self.loop_bound, now):
                # Nothing joined while it waited: the callers cannot send more until answered.
                self._skip = self._backoff
                self._backoff = min(2 * self._backoff, MAX_BACKOFF)
        elif self._skip:
            self._skip -= 1
        self.wait_abandoned()

    def wait_began(self, queued: int) -> None:
        bound, gathering = self._planned
        self.loop_bound |= bound
        self._gathering = max(self._gathering, gathering)
        if not self._waiting:
            self._waiting, self._wait_rows = True, queued

    def wait_abandoned(self) -> None:
        self.loop_bound = self._waiting = False
        self._gathering = 0

    def _climb(self, rows: int, now: float) -> None:
        """Counts a dispatched batch; at the end of a window, moves the wait cap (see the module docs).

        Windows alternate the cap between the centre times CAP_DITHER ("up") and divided by it ("down"),
        in the order up, down, down, up, so that a steady drift favours each side in turn. After each pair
        the centre moves one CAP_STEP towards the side that dispatched more rows/s, or stays when they
        tie. Comparing sides a window apart cancels the
        slow swings a shared machine adds to rows/s, which a climb comparing each window with the one
        before takes for signal.
        """
        if self._window_start < 0:
            self._window_start = now
        self._window_rows += rows
        self._window_bound += self.loop_bound
        elapsed = now - self._window_start
        if elapsed < CAP_WINDOW:
            return
        rate = self._window_rows / elapsed
        window = self._window
        if self._window_bound < CAP_WINDOW_BATCHES or rate <= 0 or elapsed > 2 * CAP_WINDOW:
            window = 0  # the loop was not saturated, or traffic paused: start the comparison afresh
        elif window % 2 == 0:
            self._first = rate
            window += 1
        else:
            up, down = (self._first, rate) if window == 1 else (rate, self._first)
            gain = math.log(up / down)  # both > 0: a window with no rows restarts the comparison
            if abs(gain) > CAP_TIE:
                self._centre = self._bounded(self._centre * (CAP_STEP if gain > 0 else 1.0 / CAP_STEP))
            window = (window + 1) % 4
        self._window = window
        self.wait_cap = self._bounded(self._centre * (CAP_DITHER if window in (0, 3) else 1.0 / CAP_DITHER))
        self._window_start, self._window_rows, self._window_bound = now, 0, 0

    def _backs_off(self, bound: bool, now: float) -> bool:
        """Whether fruitless waits back off: not on a saturated loop while callers crowd the server and
        this model's requests come often enough to join within max_delay. There the callers' next requests
        wait in gRPC for the loop, and a short wait that gathered none of them says it was too short, which
        the wait cap's climb answers; backing off (up to MAX_BACKOFF batches without a wait) left 64
        closed-loop digits callers on 2 cores unbatched for seconds at a time, the cap stuck at its floor.
        A lone caller is never a crowd, and a sparse caller of a model beside another model's crowd
        expects nobody within max_delay: their waits still back off, nobody joins them however long."""
        if not bound or self.crowded is None:
            return True
        return self.load.rate(now) * self.max_delay < 1.0 or not self.crowded()

    def _bounded(self, cap: float) -> float:
        """`cap` within max_delay * CAP_FLOOR ... max_delay."""
        return min(max(cap, self.max_delay * CAP_FLOOR), self.max_delay)

    def plan(self, queued: int, waited: float, now: float) -> tuple[float, int]:
        left = self.max_delay - waited
        enough = self.limit_rows
        gathering = 0
        if enough < self.max_rows and self._per_row:
            probe = self.curve.probe_rows_above(self._per_row, self.max_rows)
            if probe > enough:
                enough = gathering = probe
        if left <= 0 or queued >= enough:
            return 0.0, 0
        bound = self.pressure is not None and self.pressure() >= LOOP_SATURATED
        if self._skip and self._backs_off(bound, now):
            return 0.0, 0
        if bound:
            left = self.wait_cap - waited
            if left <= 0:
                return 0.0, 0
        else:
            target = min(self.target_rows(now), float(enough))
            if queued >= target:
                return 0.0, 0
            # Dispatching `queued` rows now would keep the instances busier than UTILISATION: wait for
            # company even when the mean arrival rate says the target will not fill in time. Closed-loop
            # callers answered by the last batch send their next requests together, within the window;
            # a wait that brings nobody (a lone caller) backs off instead.
            enough, gathering = math.ceil(target), 0
        self._planned = (bound, gathering)
        return left, enough


def make_policy(
    config: BatcherConfig,
    load: LoadModel,
    pressure: Callable[[], float] | None = None,
    curve: CostCurve | None = None,
    crowded: Callable[[], bool] | None = None,
) -> Policy:
    """The policy `config` names; only the adaptive one uses (and feeds) the cost curve, and asks whether
    callers crowd the server."""
    if config.policy == "adaptive":
        return AdaptivePolicy(config, load, pressure, curve, crowded)
    kinds: dict[str, type[Policy]] = {"fixed": FixedPolicy, "none": NoBatching}
    return kinds[config.policy](config, load, pressure)
