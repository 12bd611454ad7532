"""`sluice serve --workers N`: one port, N processes, one server as far as callers and Prometheus can tell.

Each test runs a real `sluice serve --workers 2` and opens its calls on separate connections (a local
subchannel pool each), since the kernel spreads connections, not calls, over the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from sluice.clients.codec import to_tensor
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from stress.harness import ServerProcess, gated_model, sluice_serve
from support import add_digits

CONNECTIONS = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The supervisor's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_worker(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            worker = dict(labels)["worker"]
            totals[worker] = totals.get(worker, 0.0) + value
    return totals


def until(condition: Callable[[], bool], timeout: float) -> bool:
    """Checks `condition` every 50 ms for at most `timeout` seconds: the supervisor's state is seen only
    through its log and its metrics endpoint."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def workers(repo: Path, log: Path, metrics_port: int, **settings: object) -> Iterator[ServerProcess]:
    with sluice_serve(
        repo, log, settings={"workers": 2, "metrics_port": metrics_port, "grace_period_s": 10, **settings}
    ) as server:
        yield server


def worker_pids(log: Path) -> list[tuple[int, int]]:
    """(worker, pid) for every start the supervisor logged, in order."""
    return [(int(w), int(p)) for w, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", log.read_text())]


async def predict_on_fresh_connections(address: str, model: str, rows: np.ndarray, count: int) -> list[str]:
    """`count` Predicts, each on a connection of its own; returns their final status names."""

    async def one(i: int) -> str:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            request = pb.PredictRequest(model=model, id=str(i), inputs=[to_tensor("pixels", rows)])
            try:
                await pb_grpc.InferenceStub(channel).Predict(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_workers_share_the_port_split_the_threads_and_report_together(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    add_digits(repo)
    log = tmp_path / "server.log"
    metrics = free_port()
    with workers(repo, log, metrics, inference_threads=4) as server:
        rows = np.zeros((1, 64), dtype=np.float32)
        statuses = await predict_on_fresh_connections(server.address, "digits", rows, CONNECTIONS)
        assert statuses.count("OK") == CONNECTIONS, statuses
        answered = per_worker(await asyncio.to_thread(scrape, metrics), "sluice_requests_total")
        # Every call counted once, by the worker that answered it; the kernel gave both workers some.
        assert sum(answered.values()) == CONNECTIONS, answered
        assert set(answered) == {"0", "1"}
        assert all(count > 0 for count in answered.values()), answered
    # inference_threads is the whole server's: each of the two workers gets half.
    assert len(re.findall(r"model loaded name=digits .*threads=2 ", log.read_text())) == 2


async def test_every_worker_serves_the_rest_door_on_one_port(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    add_digits(repo)
    log = tmp_path / "server.log"
    metrics = free_port()
    http = free_port()
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    ).encode()

    def infer() -> int:
        # urllib opens a connection per request, so the kernel may hand each to either worker.
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/v2/models/digits/infer", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            status: int = answer.status
            return status

    with workers(repo, log, metrics, http_port=http):
        statuses = await asyncio.gather(*(asyncio.to_thread(infer) for _ in range(CONNECTIONS)))
        assert statuses == [200] * CONNECTIONS
        samples = await asyncio.to_thread(scrape, metrics)
    answered = {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "sluice_requests_total" and dict(labels).get("method") == "REST ModelInfer"
    }
    # Every call counted once, by the worker that answered it; the kernel gave both workers some.
    assert sum(answered.values()) == CONNECTIONS, answered
    assert set(answered) == {"0", "1"}, answered


async def test_a_killed_worker_is_restarted_and_counted(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    add_digits(repo)
    log = tmp_path / "server.log"
    metrics = free_port()
    with workers(repo, log, metrics) as server:
        (_, victim), *_ = [(w, p) for w, p in worker_pids(log) if w == 1]
        os.kill(victim, signal.SIGKILL)
        restarted = await asyncio.to_thread(until, lambda: len(worker_pids(log)) == 3, 60)
        assert restarted, f"worker 1 was not restarted; log:\n{log.read_text()[-2000:]}"
        assert "worker 1 (pid" in log.read_text()
        samples = await asyncio.to_thread(scrape, metrics)
        assert per_worker(samples, "sluice_worker_restarts_total") == {"0": 0.0, "1": 1.0}
        rows = np.zeros((1, 64), dtype=np.float32)
        statuses = await predict_on_fresh_connections(server.address, "digits", rows, CONNECTIONS)
        assert statuses.count("OK") == CONNECTIONS, statuses


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    gate = tmp_path / "gate"
    gated_model(repo, gate, name="gated", max_batch_size=1)
    log = tmp_path / "server.log"
    metrics = free_port()
    with workers(repo, log, metrics) as server:
        rows = np.ones((1, 4), dtype=np.float32)

        async def one(i: int) -> str:
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                request = pb.PredictRequest(model="gated", id=str(i), inputs=[to_tensor("x", rows)])
                try:
                    await pb_grpc.InferenceStub(channel).Predict(request, timeout=30)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

        calls = [asyncio.create_task(one(i)) for i in range(CONNECTIONS)]

        def all_held() -> bool:
            # Every call accepted, held at the gate: a batch of one running in each worker, the rest queued.
            samples = scrape(metrics)
            busy = per_worker(samples, "sluice_instances_busy")
            queued = sum(per_worker(samples, "sluice_queue_rows").values())
            return busy == {"0": 1.0, "1": 1.0} and queued + 2 == CONNECTIONS

        assert await asyncio.to_thread(until, all_held, 30), scrape(metrics)
        server.signal(signal.SIGTERM)
        gate.touch()
        statuses = await asyncio.wait_for(asyncio.gather(*calls), 30)
        code = await asyncio.to_thread(server.wait, 30)
    assert statuses == ["OK"] * CONNECTIONS
    assert code == 0, log.read_text()[-2000:]
    assert log.read_text().count("signal received, draining") == 2


def test_settings_workers_cannot_share_are_refused() -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sluice.server.cli", "serve", "--port", "0", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    socket_path = serve("--workers", "2", "--unix-socket", "/tmp/sluice-test.sock")
    assert socket_path.returncode == 2
    assert "one socket path cannot be shared by several workers" in socket_path.stderr
    zero = serve("--workers", "0")
    assert zero.returncode == 2
    assert "field 'workers': expected a number of processes (1 or more) or 'auto' (got '0')" in zero.stderr


async def test_workers_serve_with_metrics_off(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    add_digits(repo)
    with workers(repo, tmp_path / "server.log", -1) as server:
        rows = np.zeros((1, 64), dtype=np.float32)
        statuses = await predict_on_fresh_connections(server.address, "digits", rows, 4)
        assert statuses == ["OK"] * 4
        server.signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 30) == 0
