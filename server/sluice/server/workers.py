"""`sluice serve --workers N`: N server processes on one gRPC port (and one REST port), supervised by the one
that started them.

One process answers gRPC from one event loop, about one and a half cores' worth. Workers are full servers
(their own models, batchers and drain), started with the spawn method so that none inherits gRPC's or ONNX
Runtime's threads. On Linux they all bind the gRPC port (and the REST door's) with SO_REUSEPORT and the
kernel spreads new connections over them; elsewhere SO_REUSEPORT does not balance (macOS gives every
connection to one socket), so more than one worker is refused there.

The supervisor holds the ports (bound, not listening, so no connection lands on it and nothing else can take
it while a worker restarts), restarts a worker that dies, forwards SIGTERM and SIGINT so that every worker
drains as one server would (a worker whose supervisor is gone drains too), and serves `/metrics` for all
of them: each worker's samples with a `worker` label, fetched from the worker's own endpoint on loopback
when scraped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sluice.server.settings import ServerSettings

log = logging.getLogger("sluice.server.workers")

START_TIMEOUT_S = 300.0
"""How long a worker may take to load its models and bind its ports."""
RESTARTS_PER_MINUTE = 5
"""More restarts of one worker within a minute mean it cannot run: the server stops instead of looping."""
EXIT_MARGIN_S = 5.0
"""Time past drain_delay_s + grace_period_s that workers get to exit before they are killed."""
SCRAPE_TIMEOUT_S = 2.0


def cpu_count() -> int:
    """Cores this process may run on (a container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(settings: ServerSettings) -> int:
    return cpu_count() if settings.workers == "auto" else settings.workers


def worker_settings(
    settings: ServerSettings, workers: int, index: int, port: int, http_port: int = -1
) -> ServerSettings:
    """One worker's settings: the shared gRPC and REST ports, its share of the inference threads, and
    metrics on loopback for the supervisor only."""
    threads = settings.inference_threads or cpu_count()
    return settings.model_copy(
        update={
            "workers": 1,
            "port": port,
            "inference_threads": max(1, threads // workers),
            "metrics_host": "127.0.0.1",
            "metrics_port": 0 if settings.metrics_port >= 0 else -1,
            "http_port": http_port,
        }
    )


def _worker_main(settings: ServerSettings, index: int, report: Connection) -> None:
    """A worker process: one server that sends its metrics port back, then serves until a signal."""
    from sluice.server.app import SluiceServer, configure_logging
    from sluice.server.cli import run

    configure_logging(settings.log_level, settings.log_format)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = SluiceServer(settings, reuse_port=True)
        await server.start(load_first=True)
        report.send(server.metrics_port)
        # The supervisor never writes again: the pipe turns readable (at its end) only when the supervisor
        # is gone, killed or crashed. A worker left alone drains instead of serving unsupervised.
        loop.add_reader(report.fileno(), stop.set)
        await stop.wait()
        log.info("worker %d: signal received, draining for up to %.1fs", index, settings.grace_period_s)
        await server.stop()

    run(serve(), settings.event_loop)


@dataclass
class Worker:
    """One worker slot: the process now in it, where its metrics are, and when it was restarted."""

    index: int
    process: BaseProcess | None = None
    pipe: Connection | None = None
    """The supervisor's end of the pipe to the worker: held open while the worker runs."""
    metrics_port: int | None = None
    bound: bool = False
    """It has bound its ports and said so (its metrics port is None when metrics are off)."""
    restarts: int = 0
    spawned: float = 0.0
    """When its process was started (time.monotonic())."""
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RESTARTS_PER_MINUTE))


class WorkerMetrics(Collector):
    """Every worker's samples, labelled `worker`, and the supervisor's restart counts."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for worker in list(self.workers):
            if worker.metrics_port is None:
                continue
            url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as page:
                    text = page.read().decode()
            except OSError:
                continue  # a worker that is restarting: its samples come back with it
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                label = {"worker": str(worker.index)}
                merged.samples.extend(s._replace(labels={**s.labels, **label}) for s in family.samples)
        yield from families.values()
        restarts = CounterMetricFamily(
            "sluice_worker_restarts", "Workers restarted after they died.", labels=["worker"]
        )
        for worker in self.workers:
            restarts.add_metric([str(worker.index)], worker.restarts)
        yield restarts


class Supervisor:
    """Starts the workers, restarts the ones that die, and stops them all on SIGTERM or SIGINT."""

    def __init__(self, settings: ServerSettings, workers: int) -> None:
        self.settings = settings
        self.workers = [Worker(i) for i in range(workers)]
        self.context = multiprocessing.get_context("spawn")
        self.port = settings.port
        self.http_port = -1
        self._stopping = False
        self._wake_read, self._wake_write = socket.socketpair()

    def _reserve_port(self, port: int, setting: str = "port") -> socket.socket:
        """A socket bound to `port` (0: a free one), shareable, not listening: it keeps the port for the
        workers while one restarts, and no connection lands on it. An OSError says which `setting`."""
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        try:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((host, port))
        except OSError as exc:
            holder.close()
            exc.setting = setting  # type: ignore[attr-defined]
            raise
        return holder

    def _spawn(self, worker: Worker) -> None:
        """Starts the worker's process; it reports its metrics port on its pipe once its ports are bound.
        Every worker loads its models before it binds: the kernel hands a bound worker new connections at
        once, and those must find models ready, not one worker ready and the next still loading."""
        if worker.pipe is not None:
            worker.pipe.close()
        receive, send = self.context.Pipe()
        settings = worker_settings(self.settings, len(self.workers), worker.index, self.port, self.http_port)
        process = self.context.Process(
            target=_worker_main,
            args=(settings, worker.index, send),
            name=f"sluice-worker-{worker.index}",
        )
        process.start()
        send.close()
        worker.process = process
        worker.pipe = receive
        worker.metrics_port = None
        worker.bound = False
        worker.spawned = time.monotonic()

    def _reported(self, worker: Worker) -> None:
        assert worker.pipe is not None
        assert worker.process is not None
        try:
            worker.metrics_port = worker.pipe.recv()
            worker.bound = True
        except EOFError:
            return  # it died before binding: its sentinel says so next
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _signalled(self) -> bool:
        # A method, not the attribute: the signal handler sets it between any two lines of a loop.
        return self._stopping

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._wake_write.send(b"\0")

    def run(self) -> int:
        """Serves until SIGTERM or SIGINT; returns the exit status (0 when every worker drained cleanly)."""
        holders = [self._reserve_port(self.settings.port)]
        self.port = holders[0].getsockname()[1]
        http = None
        try:
            if self.settings.http_port >= 0:
                # Every worker serves the REST door too, on one shared port like gRPC's.
                holders.append(self._reserve_port(self.settings.http_port, "http_port"))
                self.http_port = holders[-1].getsockname()[1]
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._signal)
            for worker in self.workers:
                self._spawn(worker)
            if not self._started():
                status = self._stop_all()
                # Stopped by a signal while starting is a clean stop, as for a single process.
                return status if self._signalled() else 1
            metrics_port = None
            if self.settings.metrics_port >= 0:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(WorkerMetrics(self.workers))
                http, _ = start_http_server(self.settings.metrics_port, self.settings.metrics_host, registry)
                metrics_port = http.server_port
            host = self.settings.host
            shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            if ":" in shown:
                shown = f"[{shown}]"  # an IPv6 address, as a URL and grpc write it
            print(f"listening on {shown}:{self.port}", flush=True)
            if metrics_port is not None:
                print(f"metrics on http://{self.settings.metrics_host}:{metrics_port}/metrics", flush=True)
            if self.http_port >= 0:
                print(f"rest on http://{shown}:{self.http_port}/v2", flush=True)
            log.info("%d workers serving on port %d", len(self.workers), self.port)
            if not self._supervise():
                self._stop_all()
                return 1
            return self._stop_all()
        finally:
            if http is not None:
                http.shutdown()
                http.server_close()
            for holder in holders:
                holder.close()

    def _started(self) -> bool:
        """Waits until every worker has bound its ports; False if one dies or hangs first, or on a signal."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._signalled() and any(not w.bound for w in self.workers):
            waiting = {w.pipe: w for w in self.workers if not w.bound and w.pipe is not None}
            sentinels = {w.process.sentinel: w for w in waiting.values() if w.process is not None}
            ready = wait([*waiting, *sentinels, self._wake_read], max(0.0, deadline - time.monotonic()))
            if not ready:
                log.error("workers did not bind their ports within %.0fs: stopping", START_TIMEOUT_S)
                return False
            for item in ready:
                if item in waiting:
                    self._reported(waiting[item])
            for item in ready:
                worker = sentinels.get(item) if isinstance(item, int) else None
                if worker is not None and not worker.bound:
                    log.error("worker %d failed to start (status %s): stopping", worker.index,
                              worker.process.exitcode if worker.process else None)  # fmt: skip
                    return False
        return not self._signalled()

    def _supervise(self) -> bool:
        """Restarts workers that die until a signal comes; False when one keeps dying or hangs starting."""
        while not self._signalled():
            sentinels = {w.process.sentinel: w for w in self.workers if w.process is not None}
            pending = {w.pipe: w for w in self.workers if not w.bound and w.pipe is not None}
            ready = wait([*sentinels, *pending, self._wake_read], 1.0 if pending else None)
            if self._signalled():
                break
            for item in ready:
                if item in pending:
                    self._reported(pending[item])
            now = time.monotonic()
            for worker in pending.values():
                if not worker.bound and now - worker.spawned > START_TIMEOUT_S:
                    log.error("worker %d did not bind its ports within %.0fs: stopping", worker.index,
                              START_TIMEOUT_S)  # fmt: skip
                    return False
            for item in ready:
                dead = sentinels.get(item) if isinstance(item, int) else None
                if dead is None:
                    continue
                assert dead.process is not None
                log.warning("worker %d (pid %s) exited with status %s: restarting it", dead.index,
                            dead.process.pid, dead.process.exitcode)  # fmt: skip
                if len(dead.recent) == RESTARTS_PER_MINUTE and now - dead.recent[0] < 60:
                    log.error("worker %d died %d times within a minute: stopping", dead.index,
                              RESTARTS_PER_MINUTE)  # fmt: skip
                    return False
                dead.recent.append(now)
                dead.restarts += 1
                self._spawn(dead)
        return True

    def _stop_all(self) -> int:
        """SIGTERM to every worker, which drains; SIGKILL to any still running past its grace."""
        live = [w.process for w in self.workers if w.process is not None and w.process.is_alive()]
        for process in live:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        settings = self.settings
        deadline = time.monotonic() + settings.drain_delay_s + settings.grace_period_s + EXIT_MARGIN_S
        status = 0
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker pid %s still running after its grace period: killing it", process.pid)
                process.kill()
                process.join()
            if process.exitcode != 0:
                status = 1
        for worker in self.workers:
            if worker.pipe is not None:
                worker.pipe.close()
        log.info("stopped")
        return status


def serve(settings: ServerSettings) -> int:
    """`sluice serve` with more than one worker."""
    if not sys.platform.startswith("linux"):
        print("sluice serve: workers > 1 needs Linux (SO_REUSEPORT balancing)", file=sys.stderr)
        return 2
    try:
        return Supervisor(settings, worker_count(settings)).run()
    except OSError as exc:
        # A port taken between the preflight and the supervisor's binding of it.
        if exc.errno != errno.EADDRINUSE:
            raise
        from sluice.server.cli import _port_taken

        setting = getattr(exc, "setting", "port")
        print(
            f"sluice serve: {_port_taken(setting, settings.host, getattr(settings, setting))}",
            file=sys.stderr,
        )
        return 2
