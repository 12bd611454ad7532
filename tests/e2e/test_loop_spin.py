"""`loop_spin_us`: after a request the event loop polls for that long instead of sleeping, then sleeps; an
idle server uses no CPU, and the batcher does not take the spinning for load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np

from sluice.server.app import SluiceServer
from sluice.server.scheduling import LoopLoad
from sluice.server.settings import ServerSettings
from sluice.server.spin import LoopSpin
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_digits, request


@asynccontextmanager
async def _server(repo: Path, spin_us: int) -> AsyncIterator[tuple[SluiceServer, pb_grpc.InferenceStub]]:
    add_digits(repo)
    server = SluiceServer(
        ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1, loop_spin_us=spin_us)
    )
    await server.start()
    try:
        await server.loaded()
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, pb_grpc.InferenceStub(channel)
    finally:
        await server.stop(0)


def _digit() -> pb.PredictRequest:
    return request("digits", pixels=np.zeros((1, 64), np.float32))


async def _cpu_while_idle(seconds: float) -> float:
    """CPU seconds this thread (the event loop's) used while the test slept."""
    before = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - before


async def test_the_loop_sleeps_again_once_requests_stop(tmp_path: Path) -> None:
    async with _server(tmp_path / "repo", spin_us=1000) as (server, stub):
        for _ in range(20):
            await stub.Predict(_digit())
        # 1 ms after the last request the loop sleeps: a quarter second of idleness costs (almost) no CPU.
        await asyncio.sleep(0.05)
        assert server.spin is not None
        assert not server.spin.spinning
        assert await _cpu_while_idle(0.25) < 0.05


async def test_spinning_is_not_read_as_load(tmp_path: Path) -> None:
    # A window far longer than the test's sleeps, so the loop spins through all of them.
    async with _server(tmp_path / "repo", spin_us=900_000) as (server, stub):
        await stub.Predict(_digit())
        spin = server.spin
        assert spin is not None
        assert spin.spinning
        spun = spin.spun
        measured = LoopLoad(window=0.01, spin=spin)
        await asyncio.sleep(0.2)
        busy = measured()
        assert spin.spinning
        # The loop did spin (its thread ran), but the batcher's measure of a busy loop sees it idle: a
        # spinning loop must not make the adaptive policy hold requests back for company.
        assert spin.spun - spun > 0.02
        assert busy < 0.3, busy


async def test_zero_turns_it_off(tmp_path: Path) -> None:
    async with _server(tmp_path / "repo", spin_us=0) as (server, stub):
        await stub.Predict(_digit())
        assert server.spin is None
        assert await _cpu_while_idle(0.2) < 0.05


async def test_no_spinning_while_a_run_computes_in_a_worker_thread() -> None:
    # The worker thread and ONNX Runtime's pool need the cores the loop would spin on.
    spin = LoopSpin(10.0)
    spin.arrived(time.monotonic())
    assert spin.spinning
    spin.hold()
    await asyncio.sleep(0.01)
    assert not spin.spinning
    spin.arrived(time.monotonic())
    await asyncio.sleep(0.01)
    assert not spin.spinning
    # The run's answer goes out and the next request comes soon: the loop spins again until then.
    spin.release()
    assert spin.spinning
