"""`execution.lone_on_loop_max_ms`: a lone caller's runs compute on the event loop, once it is clear the caller
is alone, which saves the hand-off to a worker thread and the wake-up after it; concurrent callers go back to
worker threads and batches at once, a model that may wait never runs there, and 0 turns it off."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from sluice.server.app import SluiceServer
from sluice.server.spin import LoneRuns
from sluice.v1 import inference_pb2_grpc as pb_grpc
from stress.harness import python_model
from support import add_digits, request, scrape, serving, serving_stub

SETTLE, PROBE = LoneRuns.SETTLE, LoneRuns.PROBE


def _model(repo: Path, log: Path, *, loop_safe: bool = True, limit_ms: float | None = None) -> None:
    """A python model whose batches of ones take 2 ms and write where they ran (`loop` or `thread`) and
    their rows."""
    code = f"""
    import threading
    import time

    import numpy as np


    class Model:
        loop_safe = {loop_safe!r}

        def predict(self, batch):
            x = batch["x"]
            if x.any():
                time.sleep(0.002)  # a run of a few ms, as the feature is for
                where = "thread" if threading.current_thread().name.startswith("sluice-") else "loop"
                with open({str(log)!r}, "a") as out:
                    out.write(f"{{where}} {{len(x)}}\\n")
            return {{"y": np.asarray(x, dtype=np.float32)}}
    """
    config = python_model(repo, "lone", code) / "config.toml"
    # The default policy, which runs a lone request at once: a window would let company arrive first.
    text = config.read_text().replace('policy = "fixed"', 'policy = "adaptive"')
    config.write_text(text + ("" if limit_ms is None else f"lone_on_loop_max_ms = {limit_ms}\n"))


def _runs(log: Path) -> list[tuple[str, int]]:
    lines = log.read_text().split() if log.exists() else []
    return [(where, int(rows)) for where, rows in zip(lines[::2], lines[1::2], strict=True)]


@asynccontextmanager
async def _serving(repo: Path) -> AsyncIterator[tuple[SluiceServer, pb_grpc.InferenceStub]]:
    """`support.serving` with metrics, and an Inference stub."""
    async with serving(repo, metrics=True) as (server, channel):
        yield server, pb_grpc.InferenceStub(channel)


def _places(server: SluiceServer) -> dict[str, float]:
    """`sluice_runs_total` of the test's model by place, as /metrics shows it."""
    samples = scrape(server)
    return {
        place: samples[f'sluice_runs_total{{model="lone",place="{place}",version="1"}}']
        for place in ("loop", "lone", "thread")
    }


ONES = request("lone", x=np.ones((1, 4), np.float32))


async def _one_caller(stub: pb_grpc.InferenceStub, calls: int) -> None:
    for _ in range(calls):
        response = await stub.Predict(ONES)
        assert np.frombuffer(response.outputs[0].raw_contents, np.float32).tolist() == [1.0] * 4


async def test_a_lone_caller_runs_on_the_event_loop_once_settled(tmp_path: Path) -> None:
    """The first SETTLE runs go to a worker thread (is the caller alone?); then every run computes on the
    event loop's own thread, except every PROBE-th, which a worker thread runs to see whether others come."""
    log = tmp_path / "runs.log"
    # A limit far above the 2 ms runs, so that a busy machine cannot push one of them over it.
    _model(tmp_path / "repo", log, limit_ms=1000.0)
    async with _serving(tmp_path / "repo") as (server, stub):
        before = _places(server)  # the server's own warm-up runs, in worker threads
        await _one_caller(stub, SETTLE + 2 * PROBE + 3)
        after = _places(server)
    places = [where for where, _ in _runs(log)]
    settled = ["loop"] * (PROBE - 1) + ["thread"]
    assert places == ["thread"] * SETTLE + settled * 2 + ["loop"] * 3
    # An operator sees where they ran in /metrics.
    counted = {place: after[place] - before[place] for place in after}
    assert counted == {"loop": 0, "lone": places.count("loop"), "thread": places.count("thread")}
    assert threading.current_thread() is threading.main_thread()  # the loop's thread is the test's


@pytest.mark.parametrize(
    ("loop_safe", "limit_ms"),
    [(False, None), (True, 0.0), (True, 1e-6)],
    ids=["model-may-wait", "turned-off", "runs-longer-than-the-limit"],
)
async def test_runs_stay_in_worker_threads(tmp_path: Path, loop_safe: bool, limit_ms: float | None) -> None:
    """A class that does not say `loop_safe = True` may wait on something (an event, I/O) and would stall
    every caller; 0 turns the feature off; a run expected to take longer than the limit stays off the loop."""
    log = tmp_path / "runs.log"
    _model(tmp_path / "repo", log, loop_safe=loop_safe, limit_ms=limit_ms)
    async with serving_stub(tmp_path / "repo") as stub:
        await _one_caller(stub, SETTLE + PROBE)
    assert [where for where, _ in _runs(log)] == ["thread"] * (SETTLE + PROBE)


async def test_concurrent_callers_go_back_to_worker_threads_and_batches(tmp_path: Path) -> None:
    """Settled on a lone caller, then eight callers at once: on the loop their requests would be read one by
    one after each run and never batch; the next probe sees them, and from then on they run in worker threads
    in batches. Every request still gets its own answer."""
    log = tmp_path / "runs.log"
    _model(tmp_path / "repo", log, limit_ms=1000.0)
    async with serving_stub(tmp_path / "repo") as stub:
        await _one_caller(stub, SETTLE + 2)
        settled = len(_runs(log))
        await asyncio.gather(*(_one_caller(stub, 12) for _ in range(8)))
        crowded = len(_runs(log))
        await _one_caller(stub, 2 * SETTLE + 1)
    crowd = _runs(log)[settled:crowded]
    assert sum(rows for _, rows in crowd) == 8 * 12
    assert all(rows == 1 for where, rows in crowd if where == "loop")  # only lone requests run there
    assert max(rows for _, rows in crowd) > 1  # batching came back
    # At most the runs until the next probe computed on the loop.
    assert sum(where == "loop" for where, _ in crowd) < PROBE, crowd
    # The probe that saw the crowd asks for twice the calm runs before a lone caller's go back there: more
    # than SETTLE after the crowd. (Not exactly 2 * SETTLE: the crowd's last requests, its callers finishing
    # one by one, can already run calm in worker threads.)
    alone_again = [where for where, _ in _runs(log)[crowded:]]
    assert alone_again[: SETTLE + 1] == ["thread"] * (SETTLE + 1), alone_again
    assert "loop" in alone_again, alone_again  # and then they do


async def test_a_long_request_of_a_settled_lone_caller_stays_off_the_loop(tmp_path: Path) -> None:
    """The prediction is elements times the highest cost per element of the recent lone runs: a 64-row
    request (128 ms at this model's 0.5 ms per element) goes to a thread, even right after a run that cost
    almost nothing (a batch of zeros returns at once)."""
    log = tmp_path / "runs.log"
    _model(tmp_path / "repo", log, limit_ms=100.0)
    async with serving_stub(tmp_path / "repo") as stub:
        await _one_caller(stub, SETTLE + 2)
        await stub.Predict(request("lone", x=np.zeros((1, 4), np.float32)))
        await stub.Predict(request("lone", x=np.ones((64, 4), np.float32)))
        await _one_caller(stub, 1)
    assert _runs(log)[SETTLE:] == [("loop", 1), ("loop", 1), ("thread", 64), ("loop", 1)]


async def test_a_model_faster_than_a_thread_hand_off_counts_its_runs_on_the_loop(tmp_path: Path) -> None:
    add_digits(tmp_path / "repo")
    async with _serving(tmp_path / "repo") as (server, stub):
        before = scrape(server)
        for _ in range(5):
            await stub.Predict(request("digits", pixels=np.zeros((1, 64), np.float32)))
        after = scrape(server)
    runs = {
        place: after[key] - before[key]
        for place in ("loop", "lone", "thread")
        if (key := f'sluice_runs_total{{model="digits",place="{place}",version="1"}}')
    }
    assert runs == {"loop": 5, "lone": 0, "thread": 0}
