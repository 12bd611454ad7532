"""`loop_spin_us`: once every request in flight is answered, the event loop polls for the next one for that
long instead of sleeping, if requests have been coming that close together; then it sleeps. An idle server
or a sparse caller costs no CPU, a worker thread's run gets the cores, and the batcher does not take the
spinning for load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.server.app import SluiceServer
from sluice.server.scheduling import LoopLoad
from sluice.server.settings import ServerSettings
from sluice.server.spin import CROWD_MEMORY, Calls, LoopSpin
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from stress.harness import gated_model
from support import add_digits, request, scrape


@asynccontextmanager
async def _server(
    repo: Path, spin_us: int, metrics_port: int = -1
) -> AsyncIterator[tuple[SluiceServer, pb_grpc.InferenceStub]]:
    server = SluiceServer(
        ServerSettings(
            model_repository=repo, port=0, metrics_port=metrics_port, http_port=-1, loop_spin_us=spin_us
        )
    )
    await server.start()
    try:
        await server.loaded()
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, pb_grpc.InferenceStub(channel)
    finally:
        await server.stop(0)


def _digits(repo: Path) -> Path:
    add_digits(repo)
    return repo


def _digits_executing(repo: Path, entries: str) -> Path:
    """`repo` with the digits model, `entries` added to its config's [execution] table."""
    config = add_digits(repo) / "config.toml"
    config.write_text(config.read_text().replace("[execution]", f"[execution]\n{entries}"))
    return repo


ONES = request("gated", x=np.ones((1, 4), np.float32))
"""Held in the gated model's run until the test creates the gate file."""
ZEROS = request("gated", x=np.zeros((1, 4), np.float32))
"""Answered at once by the gated model."""


def _gated(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with `gated_model` (stress.harness), and its gate file (not yet there)."""
    repo, gate = tmp_path / "repo", tmp_path / "gate"
    gated_model(repo, gate)
    return repo, gate


def _digit() -> pb.PredictRequest:
    return request("digits", pixels=np.zeros((1, 64), np.float32))


async def _until_inflight(server: SluiceServer, count: int) -> None:
    """Waits (boundedly) until `count` requests are in flight: at least that many, or none for 0."""
    for _ in range(1000):
        inflight = server.plane.inflight
        if (inflight >= count) if count else inflight == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never {count} requests in flight")


async def _cpu_while_idle(seconds: float) -> float:
    """CPU seconds this thread (the event loop's) used while the test slept."""
    before = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - before


async def test_a_caller_sending_back_to_back_keeps_the_loop_spinning_then_it_sleeps(tmp_path: Path) -> None:
    async with _server(_digits(tmp_path / "repo"), spin_us=200_000, metrics_port=0) as (server, stub):
        spin = server.spin
        assert spin is not None
        for _ in range(5):
            await stub.Predict(_digit())
        # Answered, and the requests came close together: the loop polls for the next one.
        assert spin.spinning
        spun = spin.spun
        await asyncio.sleep(0.05)
        assert spin.spun - spun > 0.005
        # What spinning costs is on the metrics endpoint, for an operator who sees the CPU.
        exported = (await asyncio.to_thread(scrape, server))["sluice_loop_spin_seconds_total"]
        assert spun + 0.005 < exported <= spin.spun
        # Once the window has passed without a request the loop sleeps: idleness costs (almost) no CPU.
        await asyncio.sleep(0.25)
        assert not spin.spinning
        assert await _cpu_while_idle(0.25) < 0.05


async def test_a_sparse_caller_costs_no_spinning(tmp_path: Path) -> None:
    async with _server(_digits(tmp_path / "repo"), spin_us=20_000) as (server, stub):
        spin = server.spin
        assert spin is not None
        for _ in range(3):
            await asyncio.sleep(0.05)  # further apart than the window: spinning could not catch the next
            await stub.Predict(_digit())
            assert not spin.spinning
        assert spin.spun == 0.0


async def test_zero_turns_it_off(tmp_path: Path) -> None:
    async with _server(_digits(tmp_path / "repo"), spin_us=0) as (server, stub):
        for _ in range(5):
            await stub.Predict(_digit())
        assert server.spin is None
        assert await _cpu_while_idle(0.2) < 0.05


async def test_spinning_is_not_read_as_load_but_work_while_spinning_is(tmp_path: Path) -> None:
    # A window far longer than the test's sleeps, so the loop spins through all of them.
    async with _server(_digits(tmp_path / "repo"), spin_us=900_000) as (server, stub):
        await stub.Predict(_digit())
        await stub.Predict(_digit())
        spin = server.spin
        assert spin is not None
        assert spin.spinning
        measured = LoopLoad(window=0.01, spin=spin)
        await asyncio.sleep(0.2)
        # A spinning loop must not look busy, or the adaptive policy would hold requests back for company.
        assert measured() < 0.3
        assert spin.spinning

        # Work the loop does between passes (here 30 us of every 100 us) is load, even while it spins.
        loop = asyncio.get_running_loop()
        end = time.monotonic() + 0.2

        def work() -> None:
            started = time.thread_time()
            while time.thread_time() - started < 30e-6:
                pass
            if time.monotonic() < end:
                loop.call_later(70e-6, work)

        measured()
        loop.call_soon(work)
        await asyncio.sleep(0.2)
        assert measured() > 0.1


async def test_no_spinning_while_a_run_computes_in_a_worker_thread(tmp_path: Path) -> None:
    # The run's thread needs the core; it keeps computing after its caller's deadline has passed, and the
    # loop must not start spinning beside it then either.
    repo, gate = _gated(tmp_path)
    config = repo / "gated" / "config.toml"
    # Adaptive: a lone request runs in its caller's task, which the deadline cancels while the run goes on.
    config.write_text(config.read_text().replace('policy = "fixed"', 'policy = "adaptive"'))
    async with _server(repo, spin_us=900_000) as (server, stub):
        spin = server.spin
        assert spin is not None
        await stub.Predict(ZEROS)
        await stub.Predict(ZEROS)
        assert spin.spinning  # two close requests: the loop spins for the next
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Predict(ONES, timeout=0.3)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Nothing in flight any more, but the gated run still computes in its thread.
        await _until_inflight(server, 0)
        await asyncio.sleep(0.01)
        assert not spin.spinning
        gate.touch()
        await stub.Predict(ZEROS)
        await stub.Predict(ZEROS)
        assert spin.spinning


async def test_hold_is_released_by_the_thread_not_by_the_waiter() -> None:
    spin = LoopSpin(10.0)
    now = time.monotonic()
    spin.idle(now)
    spin.arrived(now)  # a request right after a pause: the loop would spin at the next one
    go = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        work = pool.submit(go.wait, 10.0)
        spin.hold_until_done(work)
        waiter = asyncio.ensure_future(asyncio.wrap_future(work))
        await asyncio.sleep(0)
        waiter.cancel()  # the caller stops waiting (a deadline); the thread goes on computing
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        spin.idle(time.monotonic())
        assert not spin.spinning
        go.set()
        work.result(timeout=10.0)
    now = time.monotonic()
    spin.arrived(now)
    spin.idle(now)
    assert spin.spinning
    spin.arrived(time.monotonic())  # a request: the loop has work, so the spinning ends at its next pass
    await asyncio.sleep(0.01)
    assert not spin.spinning


async def test_concurrent_callers_do_not_make_the_loop_spin(tmp_path: Path) -> None:
    # With requests overlapping, the server's empty moments are when its callers and gRPC's threads are
    # busy: spinning then would take their CPU.
    repo, gate = _gated(tmp_path)
    async with _server(repo, spin_us=900_000) as (server, stub):
        spin = server.spin
        assert spin is not None
        await stub.Predict(ZEROS)
        await stub.Predict(ZEROS)
        assert spin.spinning  # a lone caller, back to back
        held = asyncio.ensure_future(stub.Predict(ONES))
        await _until_inflight(server, 1)
        overlapping = asyncio.ensure_future(stub.Predict(ZEROS))
        await _until_inflight(server, 2)
        gate.touch()
        await asyncio.gather(held, overlapping)
        assert server.plane.inflight == 0
        assert not spin.spinning
        # Right after a crowd, requests that happen not to overlap are still the crowd's: no spinning.
        await stub.Predict(ZEROS)
        await stub.Predict(ZEROS)
        assert not spin.spinning
        # A lone caller again, once the crowd is CROWD_MEMORY in the past: the loop spins again.
        await asyncio.sleep(CROWD_MEMORY + 0.01)  # timers may fire a millisecond early
        await stub.Predict(ZEROS)
        await stub.Predict(ZEROS)
        assert spin.spinning


async def test_a_crowd_keeps_the_loop_still_for_a_while_a_lone_caller_never_does() -> None:
    # Requests that complete within one step of the loop leave nothing in flight between them, so each
    # pause looks like a lone caller's; the crowd shows only in the requests of it that do overlap.
    spin = LoopSpin(10.0)
    now = 100.0
    spin.idle(now)
    spin.arrived(now + 1e-4)
    spin.crowded(now + 2e-4)
    for step in range(1, 10):  # pauses after requests that did not overlap, all within CROWD_MEMORY
        now += 1e-4 * step
        spin.arrived(now)
        spin.idle(now + 5e-5)
        assert not spin.spinning
    spin.arrived(now + CROWD_MEMORY)
    spin.idle(now + CROWD_MEMORY + 5e-5)
    assert spin.spinning
    spin.arrived(time.monotonic())  # the spinning ends at the loop's next pass
    await asyncio.sleep(0.01)
    assert not spin.spinning


async def test_a_stream_counts_like_calls(tmp_path: Path) -> None:
    # One message at a time is a lone caller; messages overlapping on the stream are concurrent callers.
    repo, gate = _gated(tmp_path)
    async with _server(repo, spin_us=900_000) as (server, stub):
        spin = server.spin
        assert spin is not None
        call = stub.StreamPredict()
        for _ in range(2):
            await call.write(ZEROS)
            assert (await call.read()).code == 0
        assert spin.spinning
        await call.write(ONES)
        await _until_inflight(server, 1)
        await call.write(ZEROS)
        await _until_inflight(server, 2)
        gate.touch()
        for _ in range(2):
            assert (await call.read()).code == 0
        await _until_inflight(server, 0)
        assert not spin.spinning
        await call.done_writing()


@pytest.mark.parametrize(("spin", "spins_after"), [("runs", False), ("off", False), ("on", True)])
async def test_pool_threads_spin_after_a_run_unless_spin_is_runs_or_off(
    tmp_path: Path, spin: str, spins_after: bool
) -> None:
    # ONNX Runtime's pool threads otherwise spin on for tens of ms after every run (about 30 ms of CPU after
    # a lone 64-row digits run on two threads): a sparse caller would cost far more CPU than its runs.
    # "on" is the control: it shows that the window sees a spinning pool thread.
    repo = _digits_executing(tmp_path / "repo", f'intra_op_threads = 2\nspin = "{spin}"')
    async with _server(repo, spin_us=0) as (_, stub):
        rows = request("digits", pixels=np.ones((64, 64), np.float32))  # big enough to use the pool thread
        used = []
        for _ in range(3):
            await asyncio.sleep(0.3)
            await stub.Predict(rows)
            before = time.process_time()  # every thread of this process: the server's and the pool's
            await asyncio.sleep(0.3)
            used.append(time.process_time() - before)
        if spins_after:
            assert min(used) > 0.01, used
        else:
            assert max(used) < 0.01, used


@pytest.mark.parametrize(("spin", "loop_spins"), [("on", False), ("runs", True), ("off", True)])
async def test_the_loop_does_not_spin_beside_pool_threads_that_spin_on_after_a_run(
    tmp_path: Path, spin: str, loop_spins: bool
) -> None:
    # Pool threads that spin on after a run keep a core busy; the loop spinning too left none for the caller
    # on 2 cores. "runs" and "off" are the controls: their pool threads stop, and the loop spins as usual.
    repo = _digits_executing(tmp_path / "repo", f'intra_op_threads = 2\nspin = "{spin}"\ninline_max_us = 0')
    async with _server(repo, spin_us=900_000) as (server, stub):
        assert server.spin is not None
        for _ in range(3):  # back to back: a lone caller whose next request the loop would wait for
            await stub.Predict(_digit())
        assert server.spin.spinning is loop_spins


async def _until_calls_end(calls: Calls) -> None:
    for _ in range(1000):
        if calls.alive == 0:
            return
        await asyncio.sleep(0.005)
    assert calls.alive == 0


async def test_grpc_calls_alive_tell_a_crowd_from_a_lone_caller(tmp_path: Path) -> None:
    # The adaptive batcher asks this on a saturated loop: a crowd's short waits that gathered nobody were too
    # short, a lone caller's were in vain. Every call counts until gRPC is done with it, whatever its fate.
    repo, gate = _gated(tmp_path)
    async with _server(repo, spin_us=0) as (server, stub):
        calls = server.plane.calls
        for _ in range(5):  # a lone caller: each call has ended before the next begins
            await stub.Predict(ZEROS)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Predict(request("nonexistent", x=np.zeros((1, 4), np.float32)))
        # The caller may hear the status before gRPC is done with the call on the server's side.
        await _until_calls_end(calls)
        assert not calls.crowded()
        held = asyncio.ensure_future(stub.Predict(ONES))
        await _until_inflight(server, 1)
        second = asyncio.ensure_future(stub.Predict(ZEROS))  # begins while the held call is alive
        await _until_inflight(server, 2)
        assert calls.alive == 2
        assert calls.crowded()
        leaving = stub.Predict(ONES)
        await _until_inflight(server, 3)
        leaving.cancel()  # a caller that leaves: its call ends too
        gate.touch()
        await asyncio.gather(held, second)
        await _until_calls_end(calls)
        # The crowd is remembered for a while, then not (a loop's timer may fire a millisecond early).
        await asyncio.sleep(CROWD_MEMORY + 0.01)
        assert not calls.crowded()


async def test_an_idle_open_stream_does_not_make_a_lone_caller_a_crowd(tmp_path: Path) -> None:
    # A stream left open is one caller waiting, not a second caller sending: the loop still spins for
    # the lone caller beside it, and the batchers still take it for a lone caller.
    async with _server(_digits(tmp_path / "repo"), spin_us=900_000) as (server, stub):
        stream = stub.StreamPredict()
        await stream.write(_digit())
        assert (await stream.read()).code == 0
        for _ in range(5):
            await stub.Predict(_digit())
        assert not server.plane.calls.crowded()
        assert server.spin is not None
        assert server.spin.spinning
        await stream.done_writing()


async def test_the_adaptive_batcher_asks_the_servers_calls_whether_callers_crowd(tmp_path: Path) -> None:
    async with _server(_digits(tmp_path / "repo"), spin_us=0) as (server, _):
        scheduler = server.plane.repository.resolve("digits", None).scheduler
        assert scheduler._policy.crowded == server.loop_load.crowded  # type: ignore[attr-defined]


def test_a_crowd_is_remembered_after_its_calls_end() -> None:
    calls = Calls()
    now = time.monotonic()
    assert not calls.began(now)
    assert calls.began(now)  # a second call while the first is alive
    calls.ended()
    calls.ended()
    assert calls.alive == 0
    assert calls.crowded()  # within CROWD_MEMORY of the overlap
    calls.crowd_at = now - CROWD_MEMORY
    assert not calls.crowded()
