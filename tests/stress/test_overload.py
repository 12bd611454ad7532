"""Overload: far more concurrent calls or streams than the server takes must each end OK or
RESOURCE_EXHAUSTED with a message naming the limit, never a bare CANCELLED or INTERNAL from gRPC core."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from stress.harness import (
    PREDICT,
    RAW,
    STREAM_PREDICT,
    Ledger,
    gated_model,
    predict_bytes,
    sluice_serve,
    stream_answer,
)

# A RESOURCE_EXHAUSTED must name the setting to raise (max_queue_rows, SLUICE_MAX_...): gRPC's own
# "Concurrent RPC limit exceeded!" tells an operator nothing.
SETTING = re.compile(r"SLUICE_[A-Z_]+|\bmax_[a-z_]+")


def _names_a_limit(message: str) -> bool:
    return SETTING.search(message) is not None


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: gRPC core's pending-call limit (1000 soft, 3000 hard) ends about 2500 of 6000 calls "
    "CANCELLED before Sluice sees them; none RESOURCE_EXHAUSTED",
)
async def test_6000_concurrent_calls_end_ok_or_resource_exhausted_naming_the_limit(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    gate = tmp_path / "gate"
    # The model's own queue takes every row: what is refused is refused by the server's call limits.
    gated_model(repo, gate, name="m", max_batch_size=256, max_queue_rows=100_000)
    ledger = Ledger()
    with sluice_serve(repo, tmp_path / "server.log") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            predict = channel.unary_unary(PREDICT, **RAW)

            async def call(i: int) -> None:
                call_id = f"u{i}"
                ledger.start(call_id)
                try:
                    await predict(predict_bytes("m", call_id), timeout=60)
                except grpc.aio.AioRpcError as error:
                    ledger.end_with(call_id, error)
                else:
                    ledger.end(call_id, grpc.StatusCode.OK)

            calls = [asyncio.create_task(call(i)) for i in range(6000)]
            # The gate opens once every call has been sent or has already ended: all 6000 were concurrent.
            await _until_sent(calls, ledger, 6000)
            gate.touch()
            await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert server.health() == "SERVING"
    ledger.assert_only({"OK", "RESOURCE_EXHAUSTED"}, what="of 6000 concurrent calls")
    vague = [c for c in ledger.select() if c.code == "RESOURCE_EXHAUSTED" and not _names_a_limit(c.message)]
    assert not vague, f"{len(vague)} RESOURCE_EXHAUSTED name no limit:\n{ledger.report(vague)}"


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: of 3000 concurrent streams, some end INTERNAL 'Internal error from Core' or CANCELLED "
    "(gRPC core's pending-call limit)",
)
async def test_3000_concurrent_streams_end_ok_or_resource_exhausted_naming_the_limit(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    gate = tmp_path / "gate"
    gated_model(repo, gate, name="m", max_batch_size=256, max_queue_rows=100_000)
    ledger = Ledger()
    answers = Ledger()  # the in-band answer of each stream's one request
    with sluice_serve(repo, tmp_path / "server.log") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            open_stream = channel.stream_stream(STREAM_PREDICT, **RAW)

            async def stream(i: int) -> None:
                call_id = f"s{i}"
                ledger.start(call_id)
                answers.start(call_id)
                call = open_stream(timeout=60)
                try:
                    await call.write(predict_bytes("m", call_id))
                    await call.done_writing()
                    async for raw in call:
                        got_id, code, message = stream_answer(raw)
                        answers.end(got_id, code, message)
                except grpc.aio.AioRpcError as error:
                    ledger.end_with(call_id, error)
                else:
                    ledger.end(call_id, grpc.StatusCode.OK)

            streams = [asyncio.create_task(stream(i)) for i in range(3000)]
            await _until_sent(streams, ledger, 3000)
            gate.touch()
            await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert server.health() == "SERVING"
    ledger.assert_only({"OK", "RESOURCE_EXHAUSTED"}, what="of 3000 concurrent streams")
    refused = [c for c in ledger.select() if c.code == "RESOURCE_EXHAUSTED" and not _names_a_limit(c.message)]
    assert not refused, f"{len(refused)} RESOURCE_EXHAUSTED name no limit:\n{ledger.report(refused)}"
    # A stream that ended OK answered its request: nothing was lost inside a stream either.
    ok_streams = {c.id for c in ledger.select() if c.code == "OK"}
    inside = [c for c in answers.select() if c.id in ok_streams]
    lost = [c for c in inside if c.code not in ("OK", "RESOURCE_EXHAUSTED")]
    assert not lost, f"{len(lost)} requests of streams that ended OK got no answer:\n{answers.report(lost)}"
    vague = [c for c in inside if c.code == "RESOURCE_EXHAUSTED" and not _names_a_limit(c.message)]
    assert not vague, f"{len(vague)} in-band RESOURCE_EXHAUSTED name no limit:\n{answers.report(vague)}"


async def _until_sent(tasks: list[asyncio.Task[None]], ledger: Ledger, count: int) -> None:
    """Returns once the client has had the chance to send every call: the loop has run each task to its
    first await and the channel has flushed; bounded at 20 s."""
    assert len(ledger.calls) <= count
    for _ in range(200):
        await asyncio.sleep(0.1)
        if len(ledger.calls) == count:
            break
    # One more beat lets the last writes leave the client's transport.
    await asyncio.sleep(0.5)
