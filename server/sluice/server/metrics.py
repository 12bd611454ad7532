"""Prometheus metrics: one registry per server (no globals), and the batcher's observer built on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the server exports, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sluice_requests", "Requests answered, by model, method and gRPC status code.",
            ["model", "method", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "sluice_request_duration_seconds", "End-to-end time from request decoded to response built.",
            ["model", "method"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds", "Time a request waited in the batcher's queue before its batch ran.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.run_time = Histogram(
            "sluice_run_duration_seconds", "Time one batch took to run on the model.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_rows = Histogram(
            "sluice_batch_rows", "Rows per batch run.", ["model"], buckets=_ROW_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "sluice_batch_requests", "Requests per batch run.", ["model"], buckets=_ROW_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_rows = Gauge("sluice_queue_rows", "Rows waiting in the queue.", ["model"], registry=r)
        self.busy = Gauge("sluice_instances_busy", "Model instances running a batch.", ["model"], registry=r)
        self.rejected = Counter(
            "sluice_rejected", "Requests refused before queueing, by reason (queue_full, too_large, closed).",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "sluice_dropped", "Queued requests never run, by reason (deadline, cancelled, shutdown).",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.batch_errors = Counter(
            "sluice_batch_errors", "Batches whose run failed.", ["model"], registry=r,
        )  # fmt: skip
        self._request_children: dict[tuple[str, str, str], Any] = {}

    def count_request(self, model: str, method: str, code: str) -> None:
        """Counts one answered request; label children are cached because this runs per request."""
        key = (model, method, code)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(model, method, code)
        child.inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class ModelObserver:
    """The batcher's observer for one model: label children bound once, so each event is a few adds."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._queue_wait = metrics.queue_wait.labels(model)
        self._run_time = metrics.run_time.labels(model)
        self._batch_rows = metrics.batch_rows.labels(model)
        self._batch_requests = metrics.batch_requests.labels(model)
        self._queue_rows = metrics.queue_rows.labels(model)
        self._busy = metrics.busy.labels(model)
        self._rejected = metrics.rejected
        self._dropped = metrics.dropped
        self._errors = metrics.batch_errors.labels(model)
        self._model = model

    def on_enqueue(self, rows: int, queue_rows: int) -> None:
        self._queue_rows.set(queue_rows)

    def on_reject(self, reason: str, rows: int) -> None:
        self._rejected.labels(self._model, reason).inc()

    def on_drop(self, reason: str, queued_for: float) -> None:
        self._dropped.labels(self._model, reason).inc()

    def on_batch(
        self, rows: int, requests: int, queue_waits: Sequence[float], queue_rows: int, busy: int
    ) -> None:
        self._batch_rows.observe(rows)
        self._batch_requests.observe(requests)
        observe = self._queue_wait.observe
        for wait in queue_waits:
            observe(wait)
        self._queue_rows.set(queue_rows)
        self._busy.set(busy)

    def on_batch_done(self, rows: int, run_time: float, error: BaseException | None, busy: int) -> None:
        self._run_time.observe(run_time)
        self._busy.set(busy)
        if error is not None:
            self._errors.inc()
