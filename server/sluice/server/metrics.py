"""Prometheus metrics, kept cheap: plain counters and bucket arrays updated on the event loop, turned into
Prometheus families only when /metrics is scraped.

prometheus_client's own Counter and Histogram take a lock and several calls per update (several µs), paid
per request; these cost one list index and an add. One registry per server, no globals.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.batcher.observer import RunTimes

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
MODEL_STATES = ("LOADING", "READY", "UNLOADING", "UNLOADED", "FAILED")
ROW_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
# The reasons sluice.batcher reports; their series start at 0 so that rate() and alerts see the first event.
REJECT_REASONS = ("queue_full", "too_large", "closed")
RUN_PLACES = ("loop", "lone", "thread")
DROP_REASONS = ("deadline", "cancelled", "shutdown")
# The label of requests for a model the server does not have: one fixed series, never the caller's name.
UNKNOWN_MODEL = "_unknown"

# The run that answered the current request (rows, seconds queued, the run), set in the caller's task when
# the batcher hands it its rows and read when the request is counted: only then is its outcome known.
_ANSWERED: ContextVar[tuple[int, float, RunTimes] | None] = ContextVar("sluice_answered", default=None)


class Histogram:
    """Bucket counts and a sum; `observe` is O(log buckets) with no lock (one writer: the event loop)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        counts = self.counts[:]  # one snapshot, so the buckets and the count agree
        total = 0.0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return buckets, self.sum


class Gauged(Protocol):
    """What the queue-depth and busy gauges read from a scheduler."""

    @property
    def queue_rows(self) -> int: ...

    @property
    def batch_limit(self) -> int: ...

    @property
    def wait_cap(self) -> float: ...

    @property
    def busy(self) -> int: ...


class Outcomes:
    """One model version's requests as Triton's statistics count them: each OK request once in success,
    queue and the three compute steps, with its own times; the rest once in fail."""

    __slots__ = (
        "assemble", "failed", "failed_s", "ok", "ok_s", "queue_s", "rows", "run_s", "split_s", "unbatched",
    )  # fmt: skip

    def __init__(self) -> None:
        self.ok = self.failed = self.rows = self.unbatched = 0
        """`unbatched`: OK requests that no batcher run answered (a model without a batch dimension)."""
        self.ok_s = self.failed_s = self.queue_s = self.assemble = self.run_s = self.split_s = 0.0


class BatchTimes:
    """The runs of one batch size: their count and each step's total seconds."""

    __slots__ = ("assemble", "count", "run", "split")

    def __init__(self) -> None:
        self.count = 0
        self.assemble = self.run = self.split = 0.0


class ModelMetrics:
    """Everything measured about one model; its observer methods are what the batcher calls."""

    def __init__(self) -> None:
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.run_time = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(ROW_BUCKETS)
        self.batch_requests = Histogram(ROW_BUCKETS)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.batch_errors = 0
        self.schedulers: list[Gauged] = []  # every loaded version's; read when scraped
        self.runs: dict[int, BatchTimes] = {}
        """Runs that answered their members, by rows."""
        self.places: dict[str, int] = dict.fromkeys(RUN_PLACES, 0)
        """Runs by where they computed (ModelRunner counts them)."""

    # The BatchObserver protocol of sluice.batcher.

    def on_enqueue(self, rows: int, queue_rows: int) -> None:
        pass  # the queue depth is read from the scheduler when scraped

    def on_reject(self, reason: str, rows: int) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def on_drop(self, reason: str, queued_for: float) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def on_batch(
        self, rows: int, requests: int, queue_waits: Sequence[float], queue_rows: int, busy: int
    ) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        observe = self.queue_wait.observe
        for wait in queue_waits:
            observe(wait)

    def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
        self.run_time.observe(run_time)
        if error is not None:
            self.batch_errors += 1

    # Its RunObserver protocol: what exact statistics need.

    def on_run(self, times: RunTimes) -> None:
        size = self.runs.get(times.rows)
        if size is None:
            size = self.runs[times.rows] = BatchTimes()
        size.count += 1
        size.assemble += times.assemble
        size.run += times.run
        size.split += times.split

    def on_answer(self, rows: int, queued_for: float, times: RunTimes) -> None:
        _ANSWERED.set((rows, queued_for, times))

    @property
    def executions(self) -> int:
        """Runs that answered their members."""
        return sum(size.count for size in self.runs.values())


class Metrics(Collector):
    """All of a server's metrics, registered in a registry of its own."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, int], ModelMetrics] = {}
        """Per model version."""
        self.requests: dict[tuple[str, str, str, str], int] = {}
        """(model, version, method, code): calls answered; version "" when no version was resolved."""
        self.latency: dict[tuple[str, str, str], Histogram] = {}
        self.outcomes: dict[tuple[str, str], Outcomes] = {}
        """(model, version): what ModelStatistics reports."""
        self._outcome_of: dict[tuple[str, str, str], Outcomes] = {}  # by latency's key: one lookup less
        self.overload: dict[str, int] = {"max_inflight": 0, "max_streams": 0}
        self.model_states: Callable[[], Iterable[tuple[str, str, str]]] | None = None
        """Every model version as (model, version, state), read when scraped (the repository sets it)."""
        self.loop_spun: Callable[[], float] | None = None
        """Seconds the event loop has spent only spinning for a lone caller's next request (the server sets
        it when the loop spins)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self._http: WSGIServer | None = None
        self.registry.register(self)

    def model(self, name: str, version: int) -> ModelMetrics:
        """One model version's measures (kept after it is unloaded: counters never go back)."""
        key = (name, version)
        found = self.models.get(key)
        if found is None:
            found = self.models[key] = ModelMetrics()
        return found

    def count_request(self, model: str, version: str, method: str, code: str, seconds: float) -> None:
        """Counts one answered request and its end-to-end time; `model` is "" for an unknown model."""
        model = model or UNKNOWN_MODEL
        key = (model, version, method, code)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        timed = (model, version, method)
        latency = self.latency.get(timed)
        if latency is None:
            latency = self.latency[timed] = Histogram(LATENCY_BUCKETS)
            self._outcome_of[timed] = self.outcomes.setdefault((model, version), Outcomes())
        latency.observe(seconds)
        answered = _ANSWERED.get()
        if answered is not None:
            _ANSWERED.set(None)  # one request's run, counted once whatever the request's fate
        outcome = self._outcome_of[timed]
        if code != "OK":
            outcome.failed += 1
            outcome.failed_s += seconds
            return
        outcome.ok += 1
        outcome.ok_s += seconds
        if answered is None:
            outcome.unbatched += 1
            return
        rows, queued_for, times = answered
        outcome.rows += rows
        outcome.queue_s += queued_for
        outcome.assemble += times.assemble
        outcome.run_s += times.run
        outcome.split_s += times.split

    def count_overload(self, limit: str) -> None:
        """Counts one call or stream refused because the server was at `limit`."""
        self.overload[limit] = self.overload.get(limit, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sluice_requests",
            "Requests answered, by model, version (empty when none was resolved), method and gRPC status "
            "code.",
            labels=["model", "version", "method", "code"],
        )  # fmt: skip
        for (model, version, method, code), count in list(self.requests.items()):
            requests.add_metric([model, version, method, code], count)
        yield requests
        latency = HistogramMetricFamily(
            "sluice_request_duration_seconds", "End-to-end time of a request inside the server.",
            labels=["model", "version", "method"],
        )  # fmt: skip
        for (model, version, method), hist in list(self.latency.items()):
            buckets, total = hist.cumulative()
            latency.add_metric([model, version, method], buckets, total)
        yield latency
        overload = CounterMetricFamily(
            "sluice_overload", "Calls and streams refused with RESOURCE_EXHAUSTED, by the limit reached.",
            labels=["limit"],
        )  # fmt: skip
        for limit, count in list(self.overload.items()):
            overload.add_metric([limit], count)
        yield overload
        if self.loop_spun is not None:
            spun = CounterMetricFamily(
                "sluice_loop_spin_seconds",
                "CPU seconds the event loop spent polling for a lone caller's next request instead of "
                "sleeping (loop_spin_us, docs/scale.md).",
                value=self.loop_spun(),
            )
            yield spun
        models = list(self.models.items())
        for attr, name, doc in (
            (
                "queue_wait",
                "sluice_queue_wait_seconds",
                "Time a request waited in the queue before its batch ran.",
            ),
            ("run_time", "sluice_run_duration_seconds", "Time one batch took to run on the model."),
            ("batch_rows", "sluice_batch_rows", "Rows per batch run."),
            ("batch_requests", "sluice_batch_requests", "Requests per batch run."),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model", "version"])
            for (model, number), m in models:
                buckets, total = getattr(m, attr).cumulative()
                family.add_metric([model, str(number)], buckets, total)
            yield family
        labels = ["model", "version"]
        queue = GaugeMetricFamily("sluice_queue_rows", "Rows waiting in the queue.", labels=labels)
        busy = GaugeMetricFamily("sluice_instances_busy", "Model instances running a batch.", labels=labels)
        batch_limit = GaugeMetricFamily(
            "sluice_batch_limit_rows",
            "Most rows the next batch may take: the adaptive policy's limit from the measured cost curve, "
            "else max_batch_size (1 for a model without a batch dimension).",
            labels=labels,
        )  # fmt: skip
        wait_cap = GaugeMetricFamily(
            "sluice_batch_wait_cap_seconds",
            "Longest wait for company while the event loop is saturated: the adaptive policy's cap, found "
            "by measuring rows/s (docs/batching.md); max_delay for a fixed window, 0 without batching.",
            labels=labels,
        )  # fmt: skip
        errors = CounterMetricFamily("sluice_batch_errors", "Batches whose run failed.", labels=labels)
        places = CounterMetricFamily(
            "sluice_runs",
            "Runs by where they computed: loop (on the event loop, faster than a thread hand-off), lone (a "
            "lone caller's, on the event loop: execution.lone_on_loop_max_ms), thread (a worker thread).",
            labels=[*labels, "place"],
        )  # fmt: skip
        rejected = CounterMetricFamily(
            "sluice_rejected", "Requests refused before queueing, by reason (queue_full, too_large, closed).",
            labels=[*labels, "reason"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "sluice_dropped", "Queued requests never run, by reason (deadline, cancelled, shutdown).",
            labels=[*labels, "reason"],
        )  # fmt: skip
        for (model, number), m in models:
            version = str(number)
            # A snapshot: an unloaded version's scheduler leaves the list on the event loop's thread.
            schedulers = list(m.schedulers)
            queue.add_metric([model, version], sum(s.queue_rows for s in schedulers))
            busy.add_metric([model, version], sum(s.busy for s in schedulers))
            if schedulers:
                batch_limit.add_metric([model, version], max(s.batch_limit for s in schedulers))
                wait_cap.add_metric([model, version], max(s.wait_cap for s in schedulers))
            errors.add_metric([model, version], m.batch_errors)
            for place, count in list(m.places.items()):
                places.add_metric([model, version, place], count)
            for reason, count in list(m.rejected.items()):
                rejected.add_metric([model, version, reason], count)
            for reason, count in list(m.dropped.items()):
                dropped.add_metric([model, version, reason], count)
        yield from (queue, busy, batch_limit, wait_cap, errors, places, rejected, dropped)
        if self.model_states is not None:
            states = GaugeMetricFamily(
                "sluice_model_state",
                "1 for each model version's state (LOADING, READY, UNLOADING, UNLOADED, FAILED), 0 for the "
                'others; version "" for a model whose config or directories failed.',
                labels=["model", "version", "state"],
            )
            for model, version, state in self.model_states():
                for name in MODEL_STATES:
                    states.add_metric([model, version, name], 1.0 if name == state else 0.0)
            yield states

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stops the /metrics endpoint, if it was started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
