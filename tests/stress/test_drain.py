"""SIGTERM under load: every call the server accepted before the signal is answered; later ones are
refused with UNAVAILABLE, so that a rolling restart loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from stress.harness import (
    PREDICT,
    RAW,
    STREAM_PREDICT,
    Ledger,
    predict_bytes,
    sleepy_model,
    sluice_serve,
    stream_answer,
)

LOST = {"CANCELLED", "UNKNOWN", "INTERNAL", "UNFINISHED", "DEADLINE_EXCEEDED"}
GRACE_S = 10.0
PIPELINE = 4


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    repo.mkdir()
    # Each batch sleeps: calls stay in flight at the signal without the model using the CPU.
    sleepy_model(repo, "m", sleep_s=0.02, max_batch_size=64, max_queue_rows=100_000)
    return repo


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: calls in flight at SIGTERM end CANCELLED (gRPC's stop() cancels them long before "
    "the grace period ends)",
)
async def test_sigterm_under_256_closed_loop_callers_loses_nothing(tmp_path: Path) -> None:
    ledger = Ledger()
    with sluice_serve(
        _repo(tmp_path), tmp_path / "server.log", settings={"grace_period_s": GRACE_S}
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            predict = channel.unary_unary(PREDICT, **RAW)
            warmed = asyncio.Event()

            async def caller(c: int) -> None:
                # A caller goes on until it is refused (it would then go to another replica); 400 at most.
                for n in range(400):
                    call_id = f"c{c}-{n}"
                    ledger.start(call_id)
                    try:
                        await predict(predict_bytes("m", call_id), timeout=GRACE_S + 10)
                    except grpc.aio.AioRpcError as error:
                        ledger.end_with(call_id, error)
                        if error.code() == grpc.StatusCode.UNAVAILABLE and "refused" not in ledger.marks:
                            ledger.mark("refused")
                        return
                    ledger.end(call_id, grpc.StatusCode.OK)
                    if len(ledger.calls) >= 1024:
                        warmed.set()

            callers = [asyncio.create_task(caller(c)) for c in range(256)]
            await asyncio.wait_for(warmed.wait(), 30)
            ledger.mark("signal", server.signal(signal.SIGTERM))
            await asyncio.wait_for(asyncio.gather(*callers), GRACE_S + 15)
        code = await asyncio.to_thread(server.wait, GRACE_S + 5)
    assert len(ledger.select(before="signal")) >= 1024
    # A call sent just after the signal may still be accepted before the server acts on it: it too must be
    # answered. So no call at all may be lost, and every call is answered OK or refused UNAVAILABLE.
    ledger.assert_none(LOST, what="calls")
    ledger.assert_only({"OK", "UNAVAILABLE"}, what="calls")
    ledger.assert_only({"UNAVAILABLE"}, after="refused", what="calls started after the first refusal")
    assert code == 0, f"sluice serve exited {code}"


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: at SIGTERM, some runs end open streams CANCELLED with requests they had sent "
    "unanswered (about 1 run in 3 here)",
)
async def test_sigterm_under_300_open_streams_answers_every_request_sent(tmp_path: Path) -> None:
    requests = Ledger()  # every request by id: its in-band answer, or its stream's end if none came
    streams = Ledger()
    with sluice_serve(
        _repo(tmp_path), tmp_path / "server.log", settings={"grace_period_s": GRACE_S}
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            open_stream = channel.stream_stream(STREAM_PREDICT, **RAW)
            warmed = asyncio.Event()

            async def stream(s: int) -> None:
                stream_id = f"s{s}"
                streams.start(stream_id)
                call = open_stream(timeout=GRACE_S + 10)
                unanswered: set[str] = set()
                # Up to PIPELINE requests in flight per stream, as a bulk client sends them.
                window = asyncio.Semaphore(PIPELINE)
                stop = asyncio.Event()

                async def write() -> None:
                    for n in range(400):
                        await window.acquire()
                        if stop.is_set():
                            break
                        call_id = f"s{s}-{n}"
                        requests.start(call_id)
                        unanswered.add(call_id)
                        await call.write(predict_bytes("m", call_id))
                    await call.done_writing()

                writer = asyncio.create_task(write())
                try:
                    while (raw := await call.read()) is not grpc.aio.EOF:
                        got_id, code, message = stream_answer(raw)
                        requests.end(got_id, code, message)
                        unanswered.discard(got_id)
                        if code == "UNAVAILABLE":
                            # When the refusal arrived: anything sent after it must be refused too.
                            requests.marks.setdefault("refused", time.monotonic())
                            stop.set()
                        if len(requests.calls) >= 2048:
                            warmed.set()
                        window.release()
                    await writer
                    status, details = (await call.code()), (await call.details())
                except grpc.aio.AioRpcError as error:
                    status, details = error.code(), error.details() or ""
                finally:
                    writer.cancel()
                streams.end(stream_id, status, details)
                for call_id in unanswered:
                    # Never answered: what the caller knows of it is how its stream ended.
                    end = f"{status.name} (stream)" if status != grpc.StatusCode.OK else "UNFINISHED"
                    requests.end(call_id, end, details)

            tasks = [asyncio.create_task(stream(s)) for s in range(300)]
            await asyncio.wait_for(warmed.wait(), 30)
            requests.mark("signal", server.signal(signal.SIGTERM))
            await asyncio.wait_for(asyncio.gather(*tasks), GRACE_S + 15)
        code = await asyncio.to_thread(server.wait, GRACE_S + 5)
    lost = {*LOST, *(f"{c} (stream)" for c in LOST)}
    assert len(requests.select(before="signal")) >= 2048
    # As for unary calls: a request sent just after the signal may still be accepted, and must be answered.
    requests.assert_none(lost, what="requests")
    refused = {"UNAVAILABLE", "UNAVAILABLE (stream)"}
    requests.assert_only({"OK", *refused}, what="requests")
    if "refused" in requests.marks:
        requests.assert_only(refused, after="refused", what="requests sent after the first refusal")
    streams.assert_none(LOST - {"UNFINISHED"}, what="streams")
    assert code == 0, f"sluice serve exited {code}"
